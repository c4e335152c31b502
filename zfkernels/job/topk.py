"""Ranking and the running top-K of pass 1: per (image, map) the spatial max and its first
argmax, and the merge of candidates into each feature map's top K under a total order.

Ranking is lexicographic: larger value first, ties to the smaller image index (the earlier
file), NaN ranked as -inf (but kept as NaN in the values, so that pages and ``topk.json`` show
it as it is). Because a merge of two top-K lists under a total order is the top-K of their union,
the running result is exactly what a brute-force sort of every (image, map) value picks, whatever
the order in which batches arrive: that is what makes resuming and sharding over processes give
the same answer as one uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

# Image index of an unfilled slot: ranks after every image. Image indices stay below it (2^32 - 1
# files at most), so an index fits the low half of a 64-bit ranking key.
EMPTY = (1 << 32) - 1

def ranked(values: torch.Tensor) -> torch.Tensor:
    """``values`` as the ranking sees them: NaN as -inf. Only for comparing: the values kept in
    a top-K stay NaN, so that a NaN activation is shown as NaN."""
    return torch.where(torch.isnan(values), -math.inf, values)


def rank_key(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """int64 keys, one per entry, whose *descending* order is (value descending, image index
    ascending): the float32 value's bits mapped to a signed integer of the same order in the
    high 32 bits, ``EMPTY - image`` in the low 32. Distinct images give distinct keys; only
    unfilled slots (all alike) share one. NaN gets -inf's key (:func:`ranked`)."""
    v = ranked(values.float()) + 0.0  # -0.0 -> +0.0: values that compare equal must get equal keys
    bits = v.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    return ordered * (1 << 32) + (EMPTY - images)


# Comparisons per chunk of rows in select_top (rows x M x M booleans): bounds its memory.
RANK_BUDGET = 1 << 24


def select_top(
    values: torch.Tensor, images: torch.Tensor, positions: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of each row under (value descending, image ascending), best
    first.

    Each entry's rank is counted: how many entries of its row have a larger key, plus the equal
    ones to its left (only unfilled slots are equal, and they are identical, so the result is
    exact). The ranks are a permutation of the columns, inverted by a scatter. No sort or top-k
    kernel is involved: the CPU and the GPU run the same comparisons, so the CPU tests check
    what the GPU computes (a stable CUDA argsort of rows holding -inf returned out-of-range
    indices on an H100 with torch 2.11)."""
    key = rank_key(values, images)
    c, m = key.shape
    k = min(k, m)
    column = torch.arange(m, device=key.device)
    left_of = column.view(1, m) < column.view(m, 1)  # [i, j]: column j is left of column i
    rows = max(1, RANK_BUDGET // (m * m))
    ranks = []
    for start in range(0, c, rows):
        mine = key[start:start + rows].unsqueeze(2)  # entry i
        other = key[start:start + rows].unsqueeze(1)  # entry j
        ranks.append(((other > mine) | ((other == mine) & left_of)).sum(dim=2))
    rank = torch.cat(ranks) if ranks else torch.zeros((0, m), dtype=torch.int64, device=key.device)
    order = torch.empty_like(rank).scatter_(1, rank, column.expand(c, m))[:, :k]
    return values.gather(1, order), images.gather(1, order), positions.gather(1, order)


def spatial_max(activation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (image, map): the largest activation and the flat position ``y * W + x`` of its first
    occurrence in row-major order. ``(N, C, H, W)`` -> two ``(N, C)`` tensors. A map holding a NaN
    has the value NaN at its first NaN (``max`` propagates NaN), which ranks as -inf (:func:`ranked`).

    Reduces over the spatial axes of the (N, H, W, C) view, which is free for the channels-last
    activations pass 1 computes (no copy of the map)."""
    n, c, h, w = activation.shape
    flat = activation.permute(0, 2, 3, 1).reshape(n, h * w, c)
    values, positions = flat.max(dim=1)  # ties: the first index (PyTorch documents this)
    return values, positions


@dataclass
class LayerTop:
    """Top-K of one layer: row ``j`` is feature map ``channels[j]``; ``values``, ``images`` (index
    into the file list, :data:`EMPTY` when unfilled) and ``positions`` (flat ``y * W + x`` in a
    map of ``map_size``) are ``(C, K)``, best first."""

    channels: torch.Tensor
    values: torch.Tensor
    images: torch.Tensor
    positions: torch.Tensor
    map_size: Tuple[int, int]

    @classmethod
    def empty(cls, channels: torch.Tensor, k: int, map_size: Tuple[int, int], device: torch.device) -> "LayerTop":
        c = channels.numel()
        return cls(
            channels.to(device),
            torch.full((c, k), -math.inf, dtype=torch.float32, device=device),
            torch.full((c, k), EMPTY, dtype=torch.int64, device=device),
            torch.zeros((c, k), dtype=torch.int64, device=device),
            map_size,
        )

    def merge(self, values: torch.Tensor, images: torch.Tensor, positions: torch.Tensor) -> None:
        """Merge candidates (``(C, M)`` each) into the running top-K."""
        k = self.values.shape[1]
        self.values, self.images, self.positions = select_top(
            torch.cat([self.values, values.float()], 1),
            torch.cat([self.images, images], 1),
            torch.cat([self.positions, positions], 1),
            k,
        )

    def to(self, device: torch.device) -> "LayerTop":
        return LayerTop(self.channels.to(device), self.values.to(device), self.images.to(device),
                        self.positions.to(device), self.map_size)

    def state(self) -> Dict[str, object]:
        return {"channels": self.channels.cpu(), "values": self.values.cpu(), "images": self.images.cpu(),
                "positions": self.positions.cpu(), "map_size": list(self.map_size)}

    @classmethod
    def from_state(cls, state: Dict[str, object], device: torch.device) -> "LayerTop":
        return cls(state["channels"].to(device), state["values"].to(device), state["images"].to(device),
                   state["positions"].to(device), tuple(state["map_size"]))

    def entries(self, channel_row: int) -> List[Tuple[int, float, int, int]]:
        """``(image, value, y, x)`` of the filled entries of row ``channel_row``, best first."""
        w = self.map_size[1]
        out = []
        for value, image, position in zip(self.values[channel_row].tolist(), self.images[channel_row].tolist(),
                                          self.positions[channel_row].tolist()):
            if image != EMPTY:
                out.append((image, value, position // w, position % w))
        return out


def merge_states(states: Sequence[Dict[str, Dict[str, object]]]) -> Dict[str, LayerTop]:
    """The top-K of several states' union, on the CPU (any order gives the same result)."""
    merged = {name: LayerTop.from_state(s, torch.device("cpu")) for name, s in states[0].items()}
    for state in states[1:]:
        for name, layer_state in state.items():
            other = LayerTop.from_state(layer_state, torch.device("cpu"))
            merged[name].merge(other.values, other.images, other.positions)
    return merged
