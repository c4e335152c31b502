"""This process's place in a ``torchrun`` job: joining it (NCCL on GPU, gloo on CPU) and the
few collectives the passes use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .topk import LayerTop


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one). ``control`` is a
    gloo group for small host-side messages, so they never wait on the GPU stream."""

    rank: int = 0
    world: int = 1
    control: Optional[object] = None

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_gather_objects(self, obj: object) -> List[object]:
        if not self.active:
            return [obj]
        out: List[object] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def any(self, flags: Sequence[bool]) -> List[bool]:
        """Element-wise OR of ``flags`` over all processes."""
        if not self.active:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in t.tolist()]

    def gather_states(self, layers: Dict[str, LayerTop]) -> List[Dict[str, Dict[str, object]]]:
        """Every process's top-K state (tensors through the main backend, on the device)."""
        if not self.active:
            return [{name: top.state() for name, top in layers.items()}]
        states: List[Dict[str, Dict[str, object]]] = [dict() for _ in range(self.world)]
        for name, top in layers.items():
            gathered = {}
            for key in ("values", "images", "positions"):
                mine = getattr(top, key).contiguous()
                parts = [torch.empty_like(mine) for _ in range(self.world)]
                dist.all_gather(parts, mine)
                gathered[key] = parts
            for r in range(self.world):
                states[r][name] = {"channels": top.channels.cpu(), "map_size": list(top.map_size),
                                   **{key: gathered[key][r].cpu() for key in gathered}}
        return states


def init_distributed(device: torch.device) -> Distributed:
    """Join the ``torchrun`` job described by the environment, if any (NCCL for CUDA devices,
    gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Distributed(dist.get_rank(), dist.get_world_size(), control)
