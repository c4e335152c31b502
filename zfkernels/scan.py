"""Pass 1: stream the dataset once and keep, for every (layer, feature map), the top K images by
their single strongest activation in that map, with its position.

Per batch and layer: the spatial max and its first (row-major) argmax of every map of every
image, then a merge of those candidates into the running top-K, all on the device. Ranking is
lexicographic: larger value first, ties to the smaller image index (the earlier file), NaN
ranked as -inf. Because a merge of two top-K lists under a total order is the top-K of their
union, the running result is exactly what a brute-force sort of every (image, map) value
picks, whatever the order in which batches arrive: that is what makes resuming and sharding
over processes give the same answer as one uninterrupted run.

Memory does not grow with the dataset: K entries per feature map, plus one batch.

Checkpoints (``torch.save`` of tensors and plain values, loaded with ``weights_only=True``)
hold the merged top-K of the batch slots done so far and the list of those slots; they are
written atomically. Under ``torchrun`` every process scans its share of the slots, the shares
are merged at each checkpoint and at the end (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from . import data as data_mod
from ._io import atomic_write
from ._timing import StageClock
from .deconvnet import parse_features
from .models import channels_last

# Image index of an unfilled slot: ranks after every image. Image indices stay below it (2^32 - 1
# files at most), so an index fits the low half of a 64-bit ranking key.
EMPTY = (1 << 32) - 1
CHECKPOINT_VERSION = 2  # 2: EMPTY is 2^32 - 1 (version 1 used 2^63 - 1)


# -- ranking -----------------------------------------------------------------------------------


def rank_key(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """int64 keys, one per entry, whose *descending* order is (value descending, image index
    ascending): the float32 value's bits mapped to a signed integer of the same order in the
    high 32 bits, ``EMPTY - image`` in the low 32. Distinct images give distinct keys; only
    unfilled slots (all alike) share one. NaN values must have been mapped to -inf by the
    caller."""
    v = values.float() + 0.0  # -0.0 -> +0.0: values that compare equal must get equal keys
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
    occurrence in row-major order. ``(N, C, H, W)`` -> two ``(N, C)`` tensors; NaN becomes -inf.

    Reduces over the spatial axes of the (N, H, W, C) view, which is free for the channels-last
    activations pass 1 computes (no copy of the map)."""
    n, c, h, w = activation.shape
    flat = activation.permute(0, 2, 3, 1).reshape(n, h * w, c)
    values, positions = flat.max(dim=1)  # ties: the first index (PyTorch documents this)
    values = torch.nan_to_num(values, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
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


# -- the forward -------------------------------------------------------------------------------


class FeatureTaps:
    """Run ``model.features`` only as far as the deepest requested layer, yielding each requested
    layer's post-ReLU activation as soon as it exists (so it is reduced while still warm)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        stages = parse_features(model.features)
        names = [s.name for s in stages if s.kind == "conv"]
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}; valid layers: {', '.join(names)}")
        self.taps = {i: s.name for i, s in enumerate(stages) if s.kind == "relu" and s.name in layers}
        self.modules = list(model.features.children())[: max(self.taps) + 1]

    def __call__(self, x: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
        for i, module in enumerate(self.modules):
            x = module(x)
            if i in self.taps:
                yield self.taps[i], x


def map_sizes(model: nn.Module, layers: Sequence[str], image_size: Tuple[int, int] = (data_mod.CROP, data_mod.CROP)) -> Dict[str, Tuple[int, int]]:
    """Each requested layer's map size for ``image_size`` inputs (arithmetic, no forward)."""
    from .deconvnet import Deconvnet

    dn = Deconvnet(model)
    sizes = dn.map_sizes(image_size)
    # sizes[i] enters stage i, so a conv stage's output is sizes[i + 1].
    return {s.name: sizes[i + 1] for i, s in enumerate(dn.stages) if s.kind == "conv" and s.name in layers}


class Scanner:
    """The running top-K of every requested (layer, feature map) on ``device``."""

    def __init__(self, model: nn.Module, layers: Sequence[str], channels: Dict[str, torch.Tensor], top: int,
                 device: torch.device) -> None:
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        self.device = torch.device(device)
        self.taps = FeatureTaps(model, layers)
        sizes = map_sizes(model, layers)
        self.layers: Dict[str, LayerTop] = {
            name: LayerTop.empty(channels[name], top, sizes[name], self.device) for name in layers
        }
        # Select the requested maps only when that is not all of them (saves a gather).
        counts = num_channels(model)
        self._select = {
            name: None if torch.equal(channels[name].cpu(), torch.arange(counts[name], dtype=torch.int64))
            else channels[name].to(self.device)
            for name in layers
        }

    def update(self, images: torch.Tensor, indices: torch.Tensor, clock: Optional[StageClock] = None) -> None:
        """One batch: ``images`` normalised ``(N, 3, H, W)`` on the device, ``indices`` their
        ``(N,)`` int64 positions in the file list."""
        if images.shape[0] == 0:
            return
        clock = clock or StageClock(torch.device("cpu"))
        forward = self.taps(images)
        while True:
            with clock("forward"):
                item = next(forward, None)
            if item is None:
                break
            name, act = item
            with clock("top-K"):
                values, positions = spatial_max(act)
                select = self._select[name]
                if select is not None:
                    values, positions = values.index_select(1, select), positions.index_select(1, select)
                top = self.layers[name]
                n, c = values.shape
                top.merge(values.t(), indices.view(1, n).expand(c, n), positions.t())

    def state(self) -> Dict[str, Dict[str, object]]:
        return {name: top.state() for name, top in self.layers.items()}

    def load_state(self, state: Dict[str, Dict[str, object]]) -> None:
        for name, layer_state in state.items():
            self.layers[name] = LayerTop.from_state(layer_state, self.device)

    def merge_states(self, states: Sequence[Dict[str, Dict[str, object]]]) -> None:
        """Merge other scanners' states (e.g. other processes') into this one."""
        self.layers = {name: top.to(self.device) for name, top in merge_states([self.state(), *states]).items()}


def merge_states(states: Sequence[Dict[str, Dict[str, object]]]) -> Dict[str, LayerTop]:
    """The top-K of several states' union, on the CPU (any order gives the same result)."""
    merged = {name: LayerTop.from_state(s, torch.device("cpu")) for name, s in states[0].items()}
    for state in states[1:]:
        for name, layer_state in state.items():
            other = LayerTop.from_state(layer_state, torch.device("cpu"))
            merged[name].merge(other.values, other.images, other.positions)
    return merged


def num_channels(model: nn.Module) -> Dict[str, int]:
    """Feature maps per conv layer, in network order."""
    return {s.name: s.module.out_channels for s in parse_features(model.features) if s.kind == "conv"}


# -- checkpoints -------------------------------------------------------------------------------


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


# -- processes ---------------------------------------------------------------------------------


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

    def gather_states(self, scanner: Scanner) -> List[Dict[str, Dict[str, object]]]:
        """Every process's top-K state (tensors through the main backend, on the device)."""
        if not self.active:
            return [scanner.state()]
        states: List[Dict[str, Dict[str, object]]] = [dict() for _ in range(self.world)]
        for name, top in scanner.layers.items():
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
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Distributed(dist.get_rank(), dist.get_world_size(), control)


class ScanInterrupted(Exception):
    """Pass 1 stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[Dict[str, int]]:
    """SIGINT/SIGTERM set a flag (checked between batches: checkpoint, then stop); a second
    SIGINT interrupts at once."""
    flag: Dict[str, int] = {}

    def handler(signum: int, frame: object) -> None:
        if flag:
            raise KeyboardInterrupt
        flag["signum"] = signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- the pass ----------------------------------------------------------------------------------


@dataclass
class ScanPlan:
    """Everything pass 1 needs besides the model."""

    images: data_mod.ImageList
    slots: data_mod.Slots
    layers: List[str]
    channels: Dict[str, torch.Tensor]
    top: int
    fingerprint: Dict[str, object]


@dataclass
class ScanResult:
    layers: Dict[str, LayerTop]  # on the CPU
    skipped: List[Tuple[int, str]]
    scanned: int
    timings: Dict[str, float]
    seconds: float
    images_this_run: int


def run_scan(
    model: nn.Module,
    plan: ScanPlan,
    device: torch.device,
    *,
    workers: int = 0,
    gpu_jpeg: bool = False,
    checkpoint: Optional[Path] = None,
    checkpoint_every: float = 60.0,
    resume: Optional[ScanState] = None,
    distributed: Optional[Distributed] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> ScanResult:
    """Pass 1 over ``plan``'s batch slots not yet ``done`` in ``resume``.

    Writes ``checkpoint`` (rank 0) every ``checkpoint_every`` seconds and when stopped by
    SIGINT/SIGTERM (then raises :class:`ScanInterrupted`), and once more, complete, at the end.
    The model runs in channels-last layout (faster convolutions on CPU and GPU) and is put back
    afterwards."""
    distributed = distributed or Distributed()
    device = torch.device(device)
    began = time.perf_counter()
    if plan.slots.count >= EMPTY:
        raise ValueError(f"pass 1 ranks at most {EMPTY - 1} images, got {plan.slots.count}")
    clock = StageClock(device)
    with channels_last(model):
        scanner = Scanner(model, plan.layers, plan.channels, plan.top, device)
        done = set(resume.done) if resume else set()
        skipped_before = list(resume.skipped) if resume else []
        scanned_before = resume.scanned if resume else 0
        if resume and distributed.rank == 0:  # the others start empty; the merge adds them up
            scanner.load_state(resume.topk)
        remaining = [s for s in range(plan.slots.num_slots) if s not in done]
        shares = [remaining[r::distributed.world] for r in range(distributed.world)]
        mine = shares[distributed.rank]
        steps = len(shares[0])  # rank 0 has the most
        loader = data_mod.make_loader(plan.images, plan.slots.batches(mine), workers, pin_memory=device.type == "cuda",
                                      gpu_jpeg=gpu_jpeg)
        failures: List[Tuple[int, str]] = []
        scanned = 0
        last_checkpoint = time.monotonic()

        def merged(steps_done: int, complete: bool) -> ScanState:
            """Every process's share so far, merged (a collective: all ranks call it together);
            rank 0 writes it as the checkpoint."""
            states = distributed.gather_states(scanner)
            all_failures = distributed.all_gather_objects(failures)
            counts = distributed.all_gather_objects(scanned)
            slots_done = set(done)
            for share in shares:
                slots_done.update(share[:steps_done])
            layers = merge_states(states)
            state = ScanState(plan.fingerprint, sorted(slots_done), {n: t.state() for n, t in layers.items()},
                              sorted(skipped_before + [f for part in all_failures for f in part]),
                              scanned_before + sum(counts), complete)
            if distributed.rank == 0 and checkpoint is not None:
                state.save(checkpoint)
            return state

        stopped = False
        with _stop_on_signals() as stop:
            batches = iter(loader)
            for step in range(steps):
                if step < len(mine):
                    waited = time.perf_counter()
                    batch = next(batches)
                    clock.add("data wait", time.perf_counter() - waited)
                    clock.add("decode (worker CPU)", batch.decode_seconds)
                    failures.extend(batch.failures)
                    with clock("to device"):
                        indices, crops, more = data_mod.decode_on_device(batch, device)
                        failures.extend(more)
                        images = data_mod.normalize(crops).contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode():
                        scanner.update(images, indices, clock)
                    scanned += int(indices.numel())
                if progress is not None:  # every process's slot of this step (they go in lockstep)
                    progress(sum(len(plan.slots.indices(share[step])) for share in shares if step < len(share)))
                due = checkpoint is not None and time.monotonic() - last_checkpoint >= checkpoint_every
                want_checkpoint, stopped = distributed.any([due, bool(stop)])
                if stopped:
                    break
                if want_checkpoint and step + 1 < steps:
                    merged(step + 1, complete=False)
                    last_checkpoint = time.monotonic()
            steps_done = step + 1 if steps else 0
            final = merged(steps_done, complete=steps_done == steps)
            # A signal that came after the last step's check (during the final write) stops the
            # run too, once that write is whole (--resume goes on from it); all processes agree.
            stopped = distributed.any([stopped or bool(stop)])[0]
        if stopped:
            raise ScanInterrupted(stop.get("signum", signal.SIGTERM))
        # final.scanned already sums every process's count.
        return result_from_state(final, clock.totals(), time.perf_counter() - began, final.scanned - scanned_before)


def result_from_state(state: ScanState, timings: Optional[Dict[str, float]] = None, seconds: float = 0.0,
                      images_this_run: int = 0) -> ScanResult:
    """Pass 1's result from a finished state: the one it just merged, or one read back from its
    checkpoint (then nothing was timed or scanned in this run)."""
    layers = {name: LayerTop.from_state(s, torch.device("cpu")) for name, s in state.topk.items()}
    return ScanResult(layers, sorted(state.skipped), state.scanned, timings or {}, seconds, images_this_run)
