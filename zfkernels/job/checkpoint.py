"""Pass 1's checkpoints: ``torch.save`` of tensors and plain values, loaded with
``weights_only=True``, written atomically. A checkpoint holds the merged top-K of the batch slots
done so far and the list of those slots.

Reading one back checks it twice: :meth:`ScanState.load` that it has the shape of a checkpoint
(keys, types, dtypes, shapes), and :meth:`ScanState.check` that its content is what a scan of this
run's plan can have produced (slots, image indices, counts, values, order, layers, maps), so a
damaged or hand-edited file is refused with what is wrong instead of yielding a wrong gallery."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import torch

from .io import atomic_write
from .topk import EMPTY, rank_key

CHECKPOINT_VERSION = 2  # 2: EMPTY is 2^32 - 1 (version 1 used 2^63 - 1)
LAYER_KEYS = ("channels", "values", "images", "positions", "map_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why, in one line."""


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
        """Read a checkpoint (``weights_only=True``: nothing but tensors and plain values) and
        check its form; :class:`CheckpointError` (a ``ValueError``) says what is wrong."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}); "
                                  "start again without --resume") from error
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path} is of another version; start again without --resume")
        try:
            state = cls._from_payload(payload)
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise CheckpointError(f"checkpoint {path} is not a zfk checkpoint ({detail}); "
                                  "start again without --resume") from None
        return state

    @classmethod
    def _from_payload(cls, payload: Mapping[str, object]) -> "ScanState":
        """The state from a loaded payload, with every field's type and form checked (content
        is :meth:`check`'s business)."""
        fingerprint, topk = payload["fingerprint"], payload["topk"]
        if not isinstance(fingerprint, dict) or not isinstance(topk, dict):
            raise TypeError("fingerprint and topk must be dicts")
        done, skipped = payload["done"], payload["skipped"]
        if not isinstance(done, list) or not all(_is_int(s) for s in done):
            raise TypeError("done must be a list of slot numbers")
        if not isinstance(skipped, list) or not all(
                isinstance(e, (list, tuple)) and len(e) == 2 and _is_int(e[0]) and isinstance(e[1], str) for e in skipped):
            raise TypeError("skipped must be a list of [image, reason]")
        if not _is_int(payload["scanned"]) or not isinstance(payload["complete"], bool):
            raise TypeError("scanned must be an integer and complete a boolean")
        for name, layer in topk.items():
            _check_layer_form(name, layer)
        return cls(fingerprint, list(done), topk, [(int(i), r) for i, r in skipped], int(payload["scanned"]),
                   payload["complete"])

    def check(self, *, count: int, slot_size: int, top: int, channels: Mapping[str, torch.Tensor],
              map_sizes: Mapping[str, Tuple[int, int]]) -> None:
        """Raise :class:`CheckpointError` (``"is inconsistent (what is wrong); ..."``, to follow
        the checkpoint's name) unless this state is one that pass 1 can have written
        for ``count`` images in slots of ``slot_size``, the top ``top`` of the feature maps
        ``channels`` (per layer, in order) with maps of ``map_sizes``."""
        try:
            self._check(count, slot_size, top, channels, map_sizes)
        except ValueError as error:
            raise CheckpointError(f"is inconsistent ({error}); start again without --resume") from None

    def _check(self, count: int, slot_size: int, top: int, channels: Mapping[str, torch.Tensor],
               map_sizes: Mapping[str, Tuple[int, int]]) -> None:
        slots = (count + slot_size - 1) // slot_size
        if len(set(self.done)) != len(self.done) or any(not 0 <= s < slots for s in self.done):
            raise ValueError(f"its done slots are not distinct slots of 0-{slots - 1}")
        if self.complete != (len(self.done) == slots):
            raise ValueError(f"it says complete={self.complete} with {len(self.done)} of {slots} slots done")
        covered = set()
        for s in self.done:
            covered.update(range(s * slot_size, min((s + 1) * slot_size, count)))
        failed = [i for i, _ in self.skipped]
        if len(set(failed)) != len(failed) or not set(failed) <= covered:
            raise ValueError("its skipped files are not distinct images of its done slots")
        if self.scanned != len(covered) - len(failed):
            raise ValueError(f"it counts {self.scanned} images scanned where its slots hold "
                             f"{len(covered)} images less {len(failed)} skipped")
        if list(self.topk) != list(channels):
            raise ValueError(f"it holds the layers {', '.join(self.topk) or 'none'}, not {', '.join(channels)}")
        usable = covered - set(failed)
        for name, layer in self.topk.items():
            _check_layer_content(name, layer, channels[name], top, map_sizes[name], usable, min(top, self.scanned))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layer_form(name: object, layer: object) -> None:
    if not isinstance(name, str) or not isinstance(layer, dict) or sorted(layer) != sorted(LAYER_KEYS):
        raise ValueError(f"layer {name!r} must hold {', '.join(LAYER_KEYS)}")
    wanted = {"channels": torch.int64, "values": torch.float32, "images": torch.int64, "positions": torch.int64}
    for key, dtype in wanted.items():
        tensor = layer[key]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.layout != torch.strided:
            raise TypeError(f"layer {name}: {key} must be a {dtype} tensor")
    c = layer["channels"]
    if c.dim() != 1 or any(layer[k].dim() != 2 or layer[k].shape[0] != c.numel() for k in ("values", "images", "positions")) \
            or not layer["values"].shape == layer["images"].shape == layer["positions"].shape:
        raise ValueError(f"layer {name}: values, images and positions must be (feature maps, K) beside channels (feature maps,)")
    size = layer["map_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise ValueError(f"layer {name}: map_size must be two positive integers")


def _check_layer_content(name: str, layer: Dict[str, object], channels: torch.Tensor, top: int,
                         map_size: Tuple[int, int], usable: set, filled: int) -> None:
    """One layer's top-K against the plan; ``usable`` are the images it may name, ``filled``
    how many entries each map must hold (every scanned image is a candidate of every map)."""
    values, images, positions = layer["values"], layer["images"], layer["positions"]
    if not torch.equal(layer["channels"], channels.cpu().to(torch.int64)):
        raise ValueError(f"{name}'s feature maps are not those asked for")
    if values.shape[1] != top:
        raise ValueError(f"{name} keeps {values.shape[1]} entries per map, not --top {top}")
    if list(layer["map_size"]) != list(map_size):
        raise ValueError(f"{name}'s maps are {tuple(layer['map_size'])}, not {tuple(map_size)}")
    empty = images == EMPTY
    named = images[~empty]
    bad = named[~torch.isin(named, torch.tensor(sorted(usable), dtype=torch.int64))]
    if bad.numel():
        raise ValueError(f"{name} names image {int(bad[0])}, which is no scanned image of its done slots")
    if bool((positions < 0).any()) or bool((positions >= map_size[0] * map_size[1]).any()):
        raise ValueError(f"{name} holds positions outside its {map_size[0]}x{map_size[1]} maps")
    counts = (~empty).sum(dim=1)
    if bool((counts != filled).any()):
        raise ValueError(f"{name} holds {int(counts.min())}-{int(counts.max())} entries per map where "
                         f"{filled} images were scanned")
    if bool(empty[:, :filled].any()):
        raise ValueError(f"{name} holds unfilled entries before filled ones")
    if bool((values[empty] != -math.inf).any()):
        raise ValueError(f"{name} holds values in unfilled entries")
    # Best first, as the merge leaves them: keys strictly descending along each row (distinct
    # images give distinct keys; unfilled entries, all alike, come last). A NaN is a value pass 1
    # keeps (it ranks as -inf), so a NaN ahead of a number is out of order.
    head = rank_key(values[:, :filled], images[:, :filled])
    if filled > 1 and bool((head[:, 1:] >= head[:, :-1]).any()):
        raise ValueError(f"{name}'s entries are not in rank order")
    named_in_row = images[:, :filled].sort(dim=1).values
    if filled > 1 and bool((named_in_row[:, 1:] == named_in_row[:, :-1]).any()):
        raise ValueError(f"{name} names an image twice in one map (one entry per image)")
