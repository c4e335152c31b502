"""``zfk visualize``: the main job. For every feature map of every chosen layer, the top-K
activations across an image folder, each projected to pixel space by the deconvnet beside the
image patch that caused it (the paper's Figure 2), as an offline HTML gallery.

Pass 1 (:mod:`.scan`) streams the folder once and keeps the running top-K on the device,
checkpointing as it goes; pass 2 (:mod:`.patches`) re-reads only the selected images and
projects every selection of a layer in batched ``Deconvnet.project`` calls; the gallery
(:mod:`.gallery`) is written last, ``index.html`` after everything it links to.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from ..engine import MODES, ModelGeometry
from ..errors import UsageError
from .. import models
from ..job import data as data_mod
from ..job import gallery
from ..job.checkpoint import CheckpointError, ScanState
from ..job.console import progress_bar, say
from ..job.distributed import Distributed, init_distributed
from ..job.io import atomic_write_text
from ..job.project import ProjectionResult, project_selections, selected_images
from ..job.scan import ScanInterrupted, ScanPlan, ScanResult, map_sizes, num_channels, result_from_state, run_scan
from ..models import untrained_warning
from .common import (LAYERS_HELP, add_model_options, add_quiet_option, batch_size_int, feature_layers, index_ranges,
                     load_model, non_negative_int, parse_index_list, positive_int, prepare_out, resolve_device)

T = TypeVar("T")
DEFAULT_OUT = "zfk-out"
DEFAULT_TOP = 9  # the paper's 3x3 grids
CHECKPOINT = "checkpoint.pt"
DESCRIPTION = """\
For every feature map of the chosen layers: the K strongest activations across the images of
--data (one per image, at its strongest position), each projected down to pixel space by the
deconvnet beside the image patch that caused it (the paper's Figure 2), as an HTML gallery in
--out: index.html, a page per layer, PNG grids, topk.json and skipped.txt.

Without --data it runs on seven freely licensed sample photographs installed with zfkernels;
without --weights on a seeded random, UNTRAINED network.

Interrupted (Ctrl-C, SIGTERM, a kill) it leaves a consistent checkpoint in --out; run the same
command with --resume to finish with the same result as an uninterrupted run. Under
`torchrun --nproc-per-node N -m zfkernels visualize ...` the folder is sharded over processes.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``visualize`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser(
        "visualize",
        help="top-K deconvnet projections of every feature map across an image folder (Figure 2)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="DIR",
                        help="image folder, searched recursively (flat like ImageNet's val, or class subfolders; "
                             "JPEG, PNG and whatever Pillow reads). Default: the sample photographs installed with zfkernels")
    add_model_options(parser)
    parser.add_argument("--layers", metavar="LIST", help=LAYERS_HELP)
    parser.add_argument("--top", type=positive_int, default=DEFAULT_TOP, metavar="K",
                        help=f"activations per feature map, one per image, so at most the number of images "
                             f"(default: {DEFAULT_TOP})")
    parser.add_argument("--features", metavar="LIST",
                        help="which feature maps of each layer: numbers and inclusive ranges, e.g. 0-15,40. Default: all")
    parser.add_argument("--batch-size", type=batch_size_int, default=64, metavar="N",
                        help="images per forward pass (default: 64). Part of the checkpoint: --resume needs the same")
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="decoding processes (default: the CPU count, at most 8 on the CPU, where they share the cores with the "
                             "forward, and 32 on CUDA, where decoding is what pass 1 waits for; 0 decodes in this process)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted run from the checkpoint in --out (same arguments)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="only the first N images (in sorted path order)")
    parser.add_argument("--mode", choices=MODES, default="deconvnet",
                        help="how signals go down through ReLUs: the paper's deconvnet (default), guided backprop, or "
                             "the plain gradient")
    parser.add_argument("--decoder", choices=("auto", "pillow", "nvjpeg"), default="auto",
                        help="JPEG decoding: nvjpeg on the GPU (batched; anything it refuses falls back to Pillow), "
                             "Pillow on the CPU, or auto = nvjpeg when running on CUDA and available (default)")
    parser.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                        help="seconds between checkpoints during pass 1 (default: 60)")
    add_quiet_option(parser)
    parser.set_defaults(run=run)


# -- argument resolution -----------------------------------------------------------------------


def resolve_features(model: nn.Module, layers: Sequence[str], text: Optional[str]) -> Dict[str, torch.Tensor]:
    """Feature maps per layer: all, or ``--features`` (each must exist in every chosen layer;
    checked on the ranges, before any list is built)."""
    counts = num_channels(model)
    if text is None:
        return {name: torch.arange(counts[name], dtype=torch.int64) for name in layers}
    largest = max(last for _, last in index_ranges(text, "--features"))
    for name in layers:
        if largest >= counts[name]:
            raise UsageError(f"--features: {largest} is out of range for {name}, which has {counts[name]} feature maps "
                             f"(0-{counts[name] - 1})")
    picked = parse_index_list(text, "--features", limit=min(counts[name] for name in layers))
    return {name: torch.tensor(picked, dtype=torch.int64) for name in layers}


def resolve_top(top: int, images: int) -> int:
    """``--top``: one entry per image per map, so at most the number of images (or the default
    9, for folders with fewer)."""
    if top > max(images, DEFAULT_TOP):
        raise UsageError(f"--top {top}: more than the {images} images of the run (each map keeps one entry per image)")
    return top


def resolve_images(data: Optional[str], limit: Optional[int], out: Path) -> Tuple[data_mod.ImageList, str]:
    """The images of the run and how to describe their source."""
    if data is None:
        images = data_mod.sample_images()
        if not images.files:
            raise UsageError("no --data given and the sample photographs installed with zfkernels are missing; pass --data DIR")
        return images.first(limit), "sample photographs installed with zfkernels (public domain and CC0; not ImageNet)"
    root = Path(data)
    if not root.exists():
        raise UsageError(f"--data {data}: no such folder")
    if not root.is_dir():
        raise UsageError(f"--data {data}: not a folder")
    try:
        images = data_mod.discover(root, limit, exclude=out)
    except OSError as error:
        raise UsageError(f"--data {data}: cannot read the folder ({error.strerror or error})") from None
    if not images.files:
        raise UsageError(f"--data {data}: no image files found (searched recursively; {len(images.ignored)} other files)")
    return images, str(root)


def weights_digest(weights: Optional[str]) -> Optional[str]:
    """SHA-256 of the weights file (what a resumed run must share with the first)."""
    if weights is None or weights == "torchvision":
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(args: argparse.Namespace, images: data_mod.ImageList, layers: Sequence[str],
                channels: Dict[str, torch.Tensor], decoder: str, dtype: torch.dtype) -> Dict[str, object]:
    """Everything pass 1's result depends on; ``--resume`` refuses a checkpoint that differs.
    The images are identified by their names and, apart, by the resolved folder and each file's
    size and modification time (another folder with the same names, a file rewritten)."""
    names = hashlib.sha256("\0".join(images.files).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "arch": args.arch,
        "weights": weights_digest(args.weights),
        "seed": None if args.weights else args.seed,
        "images": len(images.files),
        "image_names": names,
        "image_files": images.identity(),
        "layers": list(layers),
        "features": {name: channels[name].tolist() for name in layers},
        "top": args.top,
        "batch_size": args.batch_size,
        "decoder": decoder,
        "dtype": str(dtype),
        "transform": dataclasses.astuple(images.transform),
    }


def _differences(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def out_files(layers: Sequence[str]) -> List[str]:
    """The files a run writes into ``--out`` (each must be a file there if it exists)."""
    fixed = ["index.html", "topk.json", "run.json", "skipped.txt", CHECKPOINT]
    return fixed + [gallery.layer_page(layer) for layer in layers] + [gallery.montage_png(layer) for layer in layers]


# -- the job -----------------------------------------------------------------------------------


@dataclass
class Job:
    """A run with every argument checked and the output folder ready: what :func:`prepare`
    gives the stages."""

    args: argparse.Namespace
    device: torch.device
    distributed: Distributed
    quiet: bool
    out: Path
    source: str
    model: nn.Module
    decoder: str
    workers: int
    plan: ScanPlan
    resume: Optional[ScanState]

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def images(self) -> data_mod.ImageList:
        return self.plan.images


def run(args: argparse.Namespace) -> int:
    """``zfk visualize``; returns the exit status."""
    began = time.perf_counter()
    device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        # One GPU per process, chosen before NCCL starts (it binds to the current device).
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    distributed = init_distributed(device)
    try:
        job = prepare(args, device, distributed, args.quiet or distributed.rank != 0)
        try:
            scan = pass_1(job)
        except ScanInterrupted as stop:
            print(f"zfk visualize: interrupted by {stop}; pass 1 checkpoint written to {job.checkpoint}. "
                  "Run the same command with --resume to finish.", file=sys.stderr)
            return 128 + int(stop.signum)
        except data_mod.WorkersFailed as failure:
            print(f"zfk visualize: error: pass 1 stopped: {failure}. The last checkpoint is in {job.checkpoint}: "
                  "run the same command with --resume to go on.", file=sys.stderr)
            return 1
        if distributed.rank != 0:
            return 0  # pass 2 and the gallery are rank 0's (they touch only K x maps images)
        pass1_memory = _peak_memory(device)  # pass 1's peak: what must not grow with the dataset
        try:
            projected = pass_2(job, scan)
        except data_mod.WorkersFailed as failure:
            print(f"zfk visualize: error: pass 2 stopped: {failure}. Pass 1 is complete in {job.checkpoint}: "
                  "run the same command with --resume to go on.", file=sys.stderr)
            return 1
        summary = render(job, scan, projected, pass1_memory, began)
        _print_summary(job.out, summary, args.weights is None)
        return 0
    finally:
        if distributed.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def prepare(args: argparse.Namespace, device: torch.device, distributed: Distributed, quiet: bool) -> Job:
    """Check every argument against what the model and the data allow, then (nothing was
    written before) prepare the output folder: lock it, read the checkpoint to resume from, or
    clear the previous run's gallery."""
    out = Path(args.out)
    images, source = resolve_images(args.data, args.limit, out)
    try:
        model = load_model(args.arch, args.weights, args.seed, device)
    except UsageError as error:  # name the argument, as every other error does (--arch's already do)
        raise UsageError(str(error) if str(error).startswith("--") else f"--weights: {error}") from None
    layers = feature_layers(args.arch, model, args.layers)
    images = images.seen_as(models.eval_transform(args.arch))  # the network's input size
    channels = resolve_features(model, layers, args.features)
    top = resolve_top(args.top, len(images.files))
    decoder = _pick_decoder(args.decoder, device)
    if not 0 <= args.checkpoint_every < math.inf:
        raise UsageError(f"--checkpoint-every: must be a number of seconds, at least 0, got {args.checkpoint_every}")
    dtype = next(model.parameters()).dtype
    slots = data_mod.Slots(len(images.files), args.batch_size)
    plan = ScanPlan(images, slots, layers, channels, top, fingerprint(args, images, layers, channels, decoder, dtype))
    # More workers than batches would only wait.
    default_workers = min(32 if device.type == "cuda" else 8, os.cpu_count() or 1)
    workers = min(args.workers if args.workers is not None else default_workers, slots.num_slots)

    # The output folder: only rank 0 touches it (and holds its lock); every process gets the
    # result, or stops on rank 0's error.
    out = _on_rank_0(distributed, lambda: prepare_out(out, files=out_files(layers),
                                                           folders=["layers", *(f"layers/{layer}" for layer in layers)]))
    resume = _on_rank_0(distributed, lambda: _load_resume(args.resume, out / CHECKPOINT, plan, model, quiet))
    if distributed.rank == 0 and resume is None:
        _clear_previous(out)
    if args.weights is None:
        say(untrained_warning(args.arch, args.seed), distributed.rank != 0)
    return Job(args, device, distributed, quiet, out, source, model, decoder, workers, plan, resume)


def pass_1(job: Job) -> ScanResult:
    """The scan (or its result from a complete checkpoint)."""
    resume, plan = job.resume, job.plan
    if resume is not None and resume.complete:
        say("pass 1: complete in the checkpoint; going straight to pass 2", job.quiet)
        return result_from_state(resume)
    done = resume.done if resume is not None else []
    if resume is not None:
        say(f"pass 1: resuming after {len(done)} of {plan.slots.num_slots} batches", job.quiet)
    remaining = len(job.images.files) - sum(len(plan.slots.indices(s)) for s in done)
    with progress_bar(remaining, "pass 1 (scan)", "img", job.quiet) as bar:
        return run_scan(job.model, plan, job.device, workers=job.workers, gpu_jpeg=job.decoder == "nvjpeg",
                        checkpoint=job.checkpoint, checkpoint_every=job.args.checkpoint_every, resume=resume,
                        distributed=job.distributed, progress=bar.update)


def pass_2(job: Job, scan: ScanResult) -> ProjectionResult:
    """The deconvnet projections of every selection (rank 0)."""
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    with progress_bar(len(selected_images(scan.layers)), "pass 2 (project)", "img", job.quiet) as bar, \
            data_mod.worker_guard():
        return project_selections(job.model, scan.layers, job.images, job.device, batch_size=job.args.batch_size,
                                  workers=job.workers, gpu_jpeg=job.decoder == "nvjpeg", mode=job.args.mode,
                                  progress=bar.update)


def render(job: Job, scan: ScanResult, projected: ProjectionResult, pass1_memory: Dict[str, Optional[float]],
           began: float) -> Dict[str, object]:
    """The gallery, ``topk.json``, ``skipped.txt`` and ``run.json``, then ``index.html`` last;
    returns the run's summary."""
    args, out, files = job.args, job.out, job.images.files
    rendering = time.perf_counter()
    skipped = _skipped_entries(job.images, scan.skipped, projected.failures)
    untrained = args.weights is None
    info = gallery.RunInfo(
        arch=args.arch, weights=args.weights, untrained=untrained, data=job.source,
        preprocess=data_mod.preprocess_description(job.decoder, job.images.transform), top=job.plan.top, images=scan.scanned,
        skipped=len(skipped), mode=args.mode,
        notes=[] if not untrained else [f"Random network seed: {args.seed}."],
    )
    layers = job.plan.layers
    with progress_bar(sum(top.channels.numel() for top in scan.layers.values()), "render", "map", job.quiet) as bar:
        for layer in layers:
            gallery.render_layer(out, layer, scan.layers[layer], projected.tiles[layer], files, info, layers, bar.update)
    gallery.write_topk(out, _topk_document(job, scan, info))
    gallery.write_skipped(out, skipped)
    summary = {
        "images": len(files),
        "scanned": scan.scanned,
        "skipped": len(skipped),
        "selected_images": projected.images,
        "projections": projected.projections,
        "device": str(job.device),
        "processes": job.distributed.world,
        "seconds": {**_stage_times(scan, projected, time.perf_counter() - rendering),
                    "total": time.perf_counter() - began},
        "pass1_images_per_second": scan.images_this_run / scan.seconds if scan.seconds else None,
        "peak_memory_mb": {"pass 1": pass1_memory, "whole run": _peak_memory(job.device)},
    }
    atomic_write_text(out / "run.json", json.dumps(summary, indent=1) + "\n")
    gallery.render_index(out, scan.layers, projected.tiles, info, num_channels(job.model))
    return summary


def _topk_document(job: Job, scan: ScanResult, info: gallery.RunInfo) -> Dict[str, object]:
    """``topk.json``'s content, whole: the selections with their receptive fields, and how they
    were made."""
    shapes = ModelGeometry(job.model)
    size = job.images.size
    selections = gallery.topk_document(info.arch, info.weights, info.preprocess, scan.layers, job.images.files,
                                       lambda layer, y, x: shapes.receptive_field(layer, y, x, size))
    return {**selections, "untrained": info.untrained, "mode": info.mode}


class _StoppedElsewhere(UsageError):
    """Another process reported the error; this one stops quietly."""

    silent = True


def _on_rank_0(distributed: Distributed, action: Callable[[], T]) -> T:
    """``action()`` on rank 0 alone (what touches --out); every process gets its result, and
    its error stops every process (so the others do not wait for rank 0 forever; only rank 0
    prints the message)."""
    result, failure = None, None
    if distributed.rank == 0:
        try:
            result = action()
        except UsageError as error:
            failure = str(error)
    if distributed.active:
        result, failure = distributed.all_gather_objects((result, failure))[0]
    if failure is not None:
        raise UsageError(failure) if distributed.rank == 0 else _StoppedElsewhere(failure)
    return result


def _pick_decoder(choice: str, device: torch.device) -> str:
    if choice == "pillow":
        return "pillow"
    available = data_mod.gpu_jpeg_available(device)
    if choice == "nvjpeg" and not available:
        raise UsageError("--decoder nvjpeg: GPU JPEG decoding needs --device cuda and torchvision's nvjpeg support")
    return "nvjpeg" if available else "pillow"


def _load_resume(resume: bool, checkpoint: Path, plan: ScanPlan, model: nn.Module, quiet: bool) -> Optional[ScanState]:
    """The checkpoint to resume from: it must have been made with the same settings and data,
    and its content must be what a scan of ``plan`` can have written."""
    if not resume:
        return None
    if not checkpoint.is_file():
        say(f"--resume: no checkpoint in {checkpoint.parent}; starting from the beginning", quiet)
        return None
    try:
        state = ScanState.load(checkpoint)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    differ = _differences(state.fingerprint, plan.fingerprint)
    if differ:
        raise UsageError(f"--resume: the checkpoint in {checkpoint.parent} was made with other settings or data "
                         f"({', '.join(differ)} differ); rerun with the same arguments, or without --resume to start over")
    try:
        state.check(count=plan.slots.count, slot_size=plan.slots.size, top=plan.top, channels=plan.channels,
                    map_sizes=map_sizes(model, plan.layers, plan.images.size))
    except CheckpointError as error:
        raise UsageError(f"--resume: checkpoint {checkpoint} {error}") from None
    return state


def _clear_previous(out: Path) -> None:
    """A fresh run: remove the previous run's finished marks first, so a half-finished folder is
    never taken for a complete gallery (``index.html`` comes back last)."""
    # Also the previous run's pages and pictures (another set of layers would leave stale ones),
    # and temporary files of writes that a kill interrupted. (prepare_out made sure that none of
    # these is a link or a folder.)
    finished = [out / name for name in ("index.html", "topk.json", "run.json", CHECKPOINT)]
    for path in finished + list(out.glob("layer-*.html")) + list(out.glob(".*.tmp")):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / "layers", ignore_errors=True)


def _skipped_entries(images: data_mod.ImageList, *failure_lists: Sequence[Tuple[int, str]]) -> List[Tuple[str, str]]:
    entries = {images.files[index]: reason for failures in failure_lists for index, reason in failures}
    return sorted(list(images.ignored) + list(entries.items()))


def _stage_times(scan, projected, render_seconds: float) -> Dict[str, float]:
    stages = {f"pass 1 {name}": seconds for name, seconds in scan.timings.items()}
    stages["pass 1"] = scan.seconds
    stages.update({f"pass 2 {name}": seconds for name, seconds in projected.timings.items()})
    stages["pass 2"] = projected.seconds
    stages["render"] = render_seconds
    return stages


def _peak_memory(device: torch.device) -> Dict[str, Optional[float]]:
    """Peak resident memory of this process so far and, on CUDA, peak memory allocated on the
    GPU since the last reset (MiB)."""
    import resource

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"host_rss": host, "cuda_allocated": gpu}


def _print_summary(out: Path, summary: Dict[str, object], untrained: bool) -> None:
    seconds = summary["seconds"]
    rate = summary["pass1_images_per_second"]
    lines = [
        f"zfk visualize: {summary['scanned']} images scanned, {summary['skipped']} skipped "
        f"({out / 'skipped.txt'}), {summary['projections']} projections from {summary['selected_images']} images",
        "  time: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()),
    ]
    if rate:
        lines.append(f"  pass 1: {rate:.1f} images/s")
    lines.append(f"  gallery: {out / 'index.html'}")
    if untrained:
        lines.append("  (UNTRAINED network: pass --weights for learned features)")
    print("\n".join(lines), flush=True)
