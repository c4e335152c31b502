"""Atomic file writes: a reader (or a run interrupted at any instant) sees the old file or the
new one, never half of one. Write beside the target, flush to disk, then rename over it."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Union


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


# The umask can only be read by setting it; the gallery writes from several threads, and one
# reading it between another's set and restore would take the temporary value for the real one.
_UMASK_LOCK = threading.Lock()


def _default_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file (0666 less the umask)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.
    The file gets the usual permissions (``mkstemp``'s private 0600 would leave a gallery
    unreadable to a web server or another user)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _default_mode())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
