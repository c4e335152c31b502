"""Pass 1: stream the dataset once and keep, for every (layer, feature map), the top K images by
their single strongest activation in that map, with its position.

Per batch and layer: the spatial max and its first (row-major) argmax of every map of every
image, then a merge of those candidates into the running top-K, all on the device
(:mod:`zfkernels.job.topk`). Memory does not grow with the dataset: K entries per feature map,
plus one batch. Checkpoints (:mod:`zfkernels.job.checkpoint`) are written atomically; under
``torchrun`` every process scans its share of the slots, and the shares are merged at each
checkpoint and at the end (:mod:`zfkernels.job.distributed`).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..engine import ModelGeometry
from ..engine import graph_of, walk
from ..models import channels_last
from . import data as data_mod
from .checkpoint import ScanState
from .distributed import Distributed
from .signals import StopRequest
from .timing import StageClock
from .topk import EMPTY, LayerTop, merge_states, spatial_max


class FeatureTaps:
    """Pass 1's forward: the graph walker (:func:`zfkernels.graph.walk`) run only as far as the
    deepest requested layer, yielding each requested layer's activation as soon as it exists
    (so it is reduced while still warm). Layers are node names or the zoo's aliases."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.graph = graph_of(model)
        self.steps: Dict[str, List[str]] = {}
        for name in layers:
            self.steps.setdefault(self.graph.resolve(name), []).append(name)

    def __call__(self, x: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
        for step, value in walk(self.graph, x, self.steps):
            value = self.graph.present(step, value)  # token and channels-last grids as (N, C, H, W)
            for name in self.steps[step]:
                yield name, value


def map_sizes(model: nn.Module, layers: Sequence[str], image_size: Tuple[int, int] = (data_mod.CROP, data_mod.CROP)) -> Dict[str, Tuple[int, int]]:
    """Each requested layer's map size for ``image_size`` inputs (from the graph, no computation)."""
    shapes = ModelGeometry(model)
    return {name: shapes.shape_of(name, image_size)[-2:] for name in layers}


class Scanner:
    """The running top-K of every requested (layer, feature map) on ``device``."""

    def __init__(self, model: nn.Module, layers: Sequence[str], channels: Dict[str, torch.Tensor], top: int,
                 device: torch.device, image_size: Tuple[int, int] = (data_mod.CROP, data_mod.CROP)) -> None:
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        self.device = torch.device(device)
        self.taps = FeatureTaps(model, layers)
        sizes = map_sizes(model, layers, image_size)
        self.layers: Dict[str, LayerTop] = {
            name: LayerTop.empty(channels[name], top, sizes[name], self.device) for name in layers
        }
        # Select the requested maps only when that is not all of them (saves a gather).
        counts = num_channels(model, layers)
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


def num_channels(model: nn.Module, layers: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Feature maps per layer: ``layers`` (node names or aliases), by default every projectable
    layer in network order (``Deconvnet(model).layers``)."""
    shapes = ModelGeometry(model)
    names = shapes.layers if layers is None else layers
    return {name: shapes.shape_of(name, (data_mod.CROP, data_mod.CROP))[0] for name in names}


class ScanInterrupted(Exception):
    """Pass 1 stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
        scanner = Scanner(model, plan.layers, plan.channels, plan.top, device, plan.images.size)
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
            states = distributed.gather_states(scanner.layers)
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
        # A worker's death is one line (WorkersFailed); the workers end with the pass, however it ends.
        with data_mod.worker_guard(loader), StopRequest().installed() as stop:
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
            raise ScanInterrupted(stop.signum or signal.SIGTERM)
        # final.scanned already sums every process's count.
        return result_from_state(final, clock.totals(), time.perf_counter() - began, final.scanned - scanned_before)


def result_from_state(state: ScanState, timings: Optional[Dict[str, float]] = None, seconds: float = 0.0,
                      images_this_run: int = 0) -> ScanResult:
    """Pass 1's result from a finished state: the one it just merged, or one read back from its
    checkpoint (then nothing was timed or scanned in this run)."""
    layers = {name: LayerTop.from_state(s, torch.device("cpu")) for name, s in state.topk.items()}
    return ScanResult(layers, sorted(state.skipped), state.scanned, timings or {}, seconds, images_this_run)
