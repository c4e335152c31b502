"""Stopping a long run cleanly: SIGINT and SIGTERM become a request that the run checks between
steps (it writes its state, then stops), and a second SIGINT interrupts at once. Pass 1 and
``zfk train`` share this."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional


class StopRequest:
    """Set by the first SIGINT/SIGTERM while :meth:`installed`; ``signum`` says which came."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # the second signal: the user means now
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Catch the signals inside the block, and give the previous handlers back after it."""
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        try:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with the main thread
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
