"""Pass 1's checkpoints: ``torch.save`` of tensors and plain values, loaded with
``weights_only=True``, written atomically. A checkpoint holds the merged top-K of the batch slots
done so far and the list of those slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .io import atomic_write

CHECKPOINT_VERSION = 2  # 2: EMPTY is 2^32 - 1 (version 1 used 2^63 - 1)


@dataclass
class ScanState:
    """What a checkpoint holds: the merged top-K over the ``done`` batch slots, the files that
    could not be read among them, how many images were scanned, and whether pass 1 finished."""

    fingerprint: Dict[str, object]
    done: List[int] = field(default_factory=list)
    topk: Dict[str, Dict[str, object]] = field(default_factory=dict)
    skipped: List[Tuple[int, str]] = field(default_factory=list)
    scanned: int = 0
    complete: bool = False

    def save(self, path: Path) -> None:
        """Write atomically (the previous checkpoint stays intact until the new one is whole)."""
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "done": sorted(self.done),
            "topk": self.topk,
            "skipped": [[int(i), str(r)] for i, r in sorted(self.skipped)],
            "scanned": int(self.scanned),
            "complete": bool(self.complete),
        }
        atomic_write(path, lambda handle: torch.save(payload, handle))

    @classmethod
    def load(cls, path: Path) -> "ScanState":
        """Read a checkpoint (``weights_only=True``: nothing but tensors and plain values)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}); start again without --resume") from error
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path} is of another version; start again without --resume")
        try:  # a version-1 dict that lacks what a checkpoint holds is refused, not a KeyError
            state = cls(payload["fingerprint"], [int(s) for s in payload["done"]], payload["topk"],
                        [(int(i), str(r)) for i, r in payload["skipped"]], int(payload["scanned"]),
                        bool(payload["complete"]))
            if not isinstance(state.fingerprint, dict) or not isinstance(state.topk, dict):
                raise TypeError("fingerprint and topk must be dicts")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"checkpoint {path} is not a zfk checkpoint ({type(error).__name__}: {error}); "
                             "start again without --resume") from None
        return state
