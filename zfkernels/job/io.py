"""Atomic file writes: a reader (or a run interrupted at any instant) sees the old file or the
new one, never half of one. Write beside the target, flush to disk, then rename over it.

Inside a zfk output folder (a folder holding the regular file :data:`OUTPUT_MARKER`) no link is
ever followed: the rename replaces a link at the target instead of writing through it, and a
write whose folder is reached through a link below the output folder is refused."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Optional, Union


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


OUTPUT_MARKER = ".zfk"  # the file that makes a folder a zfk output folder


def output_root(folder: Union[str, Path]) -> Optional[Path]:
    """The zfk output folder that ``folder`` lies in (itself or the nearest ancestor, by its
    path as written, holding a regular :data:`OUTPUT_MARKER`), or ``None``."""
    here = Path(os.path.abspath(folder))
    for candidate in (here, *here.parents):
        try:
            if stat.S_ISREG(os.lstat(candidate / OUTPUT_MARKER).st_mode):
                return candidate
        except OSError:
            continue
    return None


def check_no_link_below(root: Path, folder: Union[str, Path]) -> None:
    """Raise ``OSError(ELOOP)`` if ``folder`` or a folder between it and ``root`` (its ancestor)
    is a symbolic link: a write there would land outside ``root``."""
    here = Path(os.path.abspath(folder))
    while here != root and root in here.parents:
        if os.path.islink(here):
            raise OSError(errno.ELOOP, f"{here} is a symbolic link inside the output folder {root}; "
                                       "zfk never writes through one", str(here))
        here = here.parent


def atomic_write(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.
    The file gets the usual permissions (``mkstemp``'s private 0600 would leave a gallery
    unreadable to a web server or another user). In a zfk output folder, a link between the
    folder and ``path`` is refused (``OSError``), and a link at ``path`` is replaced, not
    followed; a folder at ``path`` is refused (``IsADirectoryError``) before anything is written."""
    path = Path(path)
    root = output_root(path.parent)
    if root is not None:
        check_no_link_below(root, path.parent)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder; a file was to be written there", str(path))
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
