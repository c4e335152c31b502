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
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from ..deconvnet import MODES, Deconvnet
from ..errors import UsageError
from ..job import data as data_mod
from ..job import gallery
from ..job.checkpoint import ScanState
from ..job.console import progress_bar, say
from ..job.distributed import Distributed, init_distributed
from ..job.io import atomic_write_text
from ..job.project import project_selections, selected_images
from ..job.scan import ScanInterrupted, ScanPlan, num_channels, result_from_state, run_scan
from ..models import untrained_warning
from .common import (add_model_options, add_quiet_option, load_model, non_negative_int, parse_index_list, positive_int,
                     prepare_out, resolve_device)

T = TypeVar("T")
DEFAULT_OUT = "zfk-out"
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
    parser.add_argument("--layers", metavar="LIST",
                        help="comma-separated conv layers, e.g. conv1,conv5 (VGG16: conv5_3). Default: every conv layer")
    parser.add_argument("--top", type=positive_int, default=9, metavar="K",
                        help="activations per feature map, one per image (default: 9)")
    parser.add_argument("--features", metavar="LIST",
                        help="which feature maps of each layer: numbers and inclusive ranges, e.g. 0-15,40. Default: all")
    parser.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
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


def resolve_layers(model: nn.Module, text: Optional[str]) -> List[str]:
    """``--layers`` in network order; unknown names are an error listing the valid ones."""
    names = Deconvnet(model).layers
    if text is None:
        return list(names)
    asked = [part.strip() for part in text.split(",") if part.strip()]
    if not asked:
        raise UsageError("--layers: no layer names given")
    unknown = [name for name in asked if name not in names]
    if unknown:
        raise UsageError(f"--layers: unknown layer {unknown[0]!r}; this network has {', '.join(names)}")
    return [name for name in names if name in asked]


def resolve_features(model: nn.Module, layers: Sequence[str], text: Optional[str]) -> Dict[str, torch.Tensor]:
    """Feature maps per layer: all, or ``--features`` (each must exist in every chosen layer)."""
    counts = num_channels(model)
    if text is None:
        return {name: torch.arange(counts[name], dtype=torch.int64) for name in layers}
    picked = parse_index_list(text, "--features")
    for name in layers:
        if picked[-1] >= counts[name]:
            raise UsageError(f"--features: {picked[-1]} is out of range for {name}, which has {counts[name]} feature maps "
                           f"(0-{counts[name] - 1})")
    return {name: torch.tensor(picked, dtype=torch.int64) for name in layers}


def resolve_images(data: Optional[str], limit: Optional[int], out: Path) -> Tuple[data_mod.ImageList, str]:
    """The images of the run and how to describe their source."""
    if data is None:
        images = data_mod.sample_images()
        if not images.files:
            raise UsageError("no --data given and the sample photographs installed with zfkernels are missing; pass --data DIR")
        if limit is not None:
            images.files = images.files[:limit]
        return images, "sample photographs installed with zfkernels (public domain and CC0; not ImageNet)"
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
    """Everything pass 1's result depends on; ``--resume`` refuses a checkpoint that differs."""
    names = hashlib.sha256("\0".join(images.files).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "arch": args.arch,
        "weights": weights_digest(args.weights),
        "seed": None if args.weights else args.seed,
        "images": len(images.files),
        "image_names": names,
        "layers": list(layers),
        "features": {name: channels[name].tolist() for name in layers},
        "top": args.top,
        "batch_size": args.batch_size,
        "decoder": decoder,
        "dtype": str(dtype),
    }


def _differences(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


# -- the job -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``zfk visualize``; returns the exit status."""
    began = time.perf_counter()
    device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        # One GPU per process, chosen before NCCL starts (it binds to the current device).
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    distributed = init_distributed(device)
    quiet = args.quiet or distributed.rank != 0
    try:
        return _run(args, device, distributed, quiet, began)
    finally:
        if distributed.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, device: torch.device, distributed: Distributed, quiet: bool, began: float) -> int:
    # Every argument is checked before anything is written.
    out = Path(args.out)
    images, source = resolve_images(args.data, args.limit, out)
    try:
        model = load_model(args.arch, args.weights, args.seed, device)
    except UsageError as error:  # name the argument, as every other error does (--arch's already do)
        raise UsageError(str(error) if str(error).startswith("--") else f"--weights: {error}") from None
    layers = resolve_layers(model, args.layers)
    channels = resolve_features(model, layers, args.features)
    decoder = _pick_decoder(args.decoder, device)
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: must be at least 0 seconds, got {args.checkpoint_every}")
    out = _on_rank_0(distributed, lambda: prepare_out(out))
    if args.weights is None:
        say(untrained_warning(args.arch, args.seed), distributed.rank != 0)
    workers = args.workers if args.workers is not None else min(32 if device.type == "cuda" else 8, os.cpu_count() or 1)
    dtype = next(model.parameters()).dtype
    plan = ScanPlan(images, data_mod.Slots(len(images.files), args.batch_size), layers, channels, args.top,
                    fingerprint(args, images, layers, channels, decoder, dtype))
    checkpoint = out / CHECKPOINT
    resume_state = _on_rank_0(distributed, lambda: _load_resume(args.resume, checkpoint, plan.fingerprint, quiet))
    if distributed.rank == 0 and resume_state is None:
        _clear_previous(out)

    # Pass 1.
    if resume_state is not None and resume_state.complete:
        say("pass 1: complete in the checkpoint; going straight to pass 2", quiet)
        scan = result_from_state(resume_state)
    else:
        done = len(resume_state.done) if resume_state else 0
        remaining = len(images.files) - sum(len(plan.slots.indices(s)) for s in (resume_state.done if resume_state else []))
        if resume_state is not None:
            say(f"pass 1: resuming after {done} of {plan.slots.num_slots} batches", quiet)
        try:
            with progress_bar(remaining, "pass 1 (scan)", "img", quiet) as bar:
                scan = run_scan(model, plan, device, workers=workers, gpu_jpeg=decoder == "nvjpeg", checkpoint=checkpoint,
                                checkpoint_every=args.checkpoint_every, resume=resume_state, distributed=distributed,
                                progress=bar.update)
        except ScanInterrupted as stop:
            print(f"zfk visualize: interrupted by {stop}; pass 1 checkpoint written to {checkpoint}. "
                  "Run the same command with --resume to finish.", file=sys.stderr)
            return 128 + int(stop.signum)
    if distributed.rank != 0:
        return 0  # pass 2 and the gallery are rank 0's (they touch only K x maps images)

    pass1_memory = _peak_memory(device)  # pass 1's peak: what must not grow with the dataset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Pass 2.
    with progress_bar(len(selected_images(scan.layers)), "pass 2 (project)", "img", quiet) as bar:
        projected = project_selections(model, scan.layers, images, device, batch_size=args.batch_size, workers=workers,
                                       gpu_jpeg=decoder == "nvjpeg", mode=args.mode, progress=bar.update)

    # The gallery.
    rendering = time.perf_counter()
    skipped = _skipped_entries(images, scan.skipped, projected.failures)
    untrained = args.weights is None
    info = gallery.RunInfo(
        arch=args.arch, weights=args.weights, untrained=untrained, data=source,
        preprocess=data_mod.preprocess_description(decoder), top=args.top, images=scan.scanned,
        skipped=len(skipped), mode=args.mode,
        notes=[] if not untrained else [f"Random network seed: {args.seed}."],
    )
    dn = Deconvnet(model)
    crop = (data_mod.CROP, data_mod.CROP)
    document = gallery.topk_document(args.arch, args.weights, info.preprocess, scan.layers, images.files,
                                     lambda layer, y, x: dn.receptive_field(layer, y, x, crop))
    document["untrained"] = untrained
    document["mode"] = args.mode
    total_maps = sum(top.channels.numel() for top in scan.layers.values())
    with progress_bar(total_maps, "render", "map", quiet) as bar:
        for layer in layers:
            gallery.render_layer(out, layer, scan.layers[layer], projected.tiles[layer], images.files, info, layers,
                                 bar.update)
    gallery.write_topk(out, document)
    gallery.write_skipped(out, skipped)
    stages = _stage_times(scan, projected, time.perf_counter() - rendering)
    summary = {
        "images": len(images.files),
        "scanned": scan.scanned,
        "skipped": len(skipped),
        "selected_images": projected.images,
        "projections": projected.projections,
        "device": str(device),
        "processes": distributed.world,
        "seconds": {**stages, "total": time.perf_counter() - began},
        "pass1_images_per_second": scan.images_this_run / scan.seconds if scan.seconds else None,
        "peak_memory_mb": {"pass 1": pass1_memory, "whole run": _peak_memory(device)},
    }
    atomic_write_text(out / "run.json", json.dumps(summary, indent=1) + "\n")
    gallery.render_index(out, scan.layers, projected.tiles, info, num_channels(model))
    _print_summary(out, summary, untrained)
    return 0


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


def _load_resume(resume: bool, checkpoint: Path, expected: Dict[str, object], quiet: bool) -> Optional[ScanState]:
    if not resume:
        return None
    if not checkpoint.is_file():
        say(f"--resume: no checkpoint in {checkpoint.parent}; starting from the beginning", quiet)
        return None
    try:
        state = ScanState.load(checkpoint)
    except ValueError as error:
        raise UsageError(f"--resume: {error}") from None
    differ = _differences(state.fingerprint, expected)
    if differ:
        raise UsageError(f"--resume: the checkpoint in {checkpoint.parent} was made with other settings "
                       f"({', '.join(differ)} differ); rerun with the same arguments, or without --resume to start over")
    return state


def _clear_previous(out: Path) -> None:
    """A fresh run: remove the previous run's finished marks first, so a half-finished folder is
    never taken for a complete gallery (``index.html`` comes back last)."""
    # Also the previous run's pages and pictures (another set of layers would leave stale ones),
    # and temporary files of writes that a kill interrupted.
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
