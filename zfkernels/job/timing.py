"""Per-stage wall time that does not stall the device: on CUDA, stages are timed with events
read back lazily (no synchronisation per batch); on the CPU, with ``perf_counter``."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Deque, Dict, Iterator, Tuple

import torch


class StageClock:
    """``with clock("forward"): ...`` adds the block's time to the ``"forward"`` total."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._totals: Dict[str, float] = defaultdict(float)
        self._pending: Deque[Tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
            self._drain(wait=False)
        else:
            began = time.perf_counter()
            yield
            self._totals[name] += time.perf_counter() - began

    def add(self, name: str, seconds: float) -> None:
        """Add host-measured seconds (e.g. time spent waiting for the loader)."""
        self._totals[name] += seconds

    def _drain(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][2].query()):
            name, start, end = self._pending.popleft()
            end.synchronize()
            self._totals[name] += start.elapsed_time(end) / 1e3

    def totals(self) -> Dict[str, float]:
        """Seconds per stage (waits for the device to finish what was timed)."""
        self._drain(wait=True)
        return dict(self._totals)
