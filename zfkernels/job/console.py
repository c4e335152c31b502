"""What the user sees while a job runs: one-line messages and progress bars on stderr (stdout
stays clean for summaries), and the files they name."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Iterable, List, Optional, TextIO

from tqdm.auto import tqdm

from ..errors import UsageError


def progress_bar(total: int, description: str, unit: str, quiet: bool) -> tqdm:
    """A tqdm bar with rate and ETA on stderr; disabled (every call a no-op) when ``quiet``.
    Use it as a context manager, and pass ``bar.update`` where a progress callback is wanted."""
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                disable=quiet)


def say(message: str, quiet: bool = False, *, stream: Optional[TextIO] = None) -> None:
    """A line for the user, on stderr unless ``stream`` is given."""
    if not quiet:
        print(message, file=stream or sys.stderr, flush=True)


def check_files_exist(paths: Iterable[str], what: str) -> List[Path]:
    """Each path must be an existing regular file; ``what`` names the option in the error. Only
    the file's status is read: a named pipe is refused without being opened (reading one waits
    for a writer, forever)."""
    out = []
    for p in paths:
        path = Path(p)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:  # (also a link to nothing)
            raise UsageError(f"{what}: {p} does not exist") from None
        except OSError as error:
            raise UsageError(f"{what}: {p} cannot be read ({error.strerror or error})") from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"{what}: {p} is a folder, not a file")
        if not stat.S_ISREG(mode):
            kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or a socket"
            raise UsageError(f"{what}: {p} is {kind}, not a regular file")
        out.append(path)
    return out
