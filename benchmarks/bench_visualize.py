"""The main job end to end: ``zfk visualize`` (by default ZFNet, every conv layer, every feature
map, top 9; ``--arch``/``--layers``/``--features`` choose others) over the 800 ImageNet sample
photographs, and over the same set repeated 4 times (3,200 images) to show that memory does
not grow with the dataset.

Measured in the same run:
  * the bare forward throughput: the network up to its deepest visualized layer on a batch of
    already decoded, normalised images resident on the device (channels-last, as pass 1 runs it), timed with
    ``torch.utils.benchmark`` (warm-up, synchronisation);
  * each whole job in a fresh process (so its peak memory is its own): images/s of pass 1 and
    pass 2, the time of each stage (from the job's ``run.json``), peak host and GPU memory.
Target: pass 1 at >= 70% of the bare forward throughput. From the measured stage costs it
estimates the time of ImageNet's 50,000 validation images.

    python benchmarks/bench_visualize.py --device cpu --json bench-results/bench_visualize.json
    python benchmarks/bench_visualize.py --device cpu --arch resnet50 --features 0-3 --json bench-results/bench_visualize_resnet50.json
    python benchmarks/bench_visualize.py --device cpu --arch efficientnet_b0 --features 0-3 --json bench-results/bench_visualize_efficientnet_b0.json
    python benchmarks/bench_visualize.py --device cpu --arch vit_b_16 --features 0-3 --json bench-results/bench_visualize_vit_b_16.json

Any torchvision classifier the engine takes works with ``--arch`` (issue #18: EfficientNet-B0 and
ViT-B/16 have the same 70% target); a ViT's layers are token grids, which pass 1 ranks on the
patch grid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.utils.benchmark as benchmark

import zfkernels
from zfkernels.job import data as data_mod
from zfkernels import Deconvnet, models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from _report import SHARED_IMAGES, write_results  # (benchmarks/ is on sys.path when run as a script)

IMAGENET_VAL = 50_000
TARGET = 0.70
TOP = 9  # zfk visualize's default --top


def deepest_node(model: torch.nn.Module, dn: Deconvnet, layers: List[str]) -> str:
    """The deepest of ``layers`` as a feature-extraction node name (``Deconvnet.resolve``), by
    the order of torchvision's eval-mode nodes."""
    was = model.training
    try:
        order = {name: i for i, name in enumerate(get_graph_node_names(model.eval())[1])}
    finally:
        model.train(was)
    return max((dn.resolve(name) for name in layers), key=order.__getitem__)


def feature_maps(dn: Deconvnet, layers: List[str], size: int) -> int:
    """The feature maps of ``layers`` (as ``record`` presents them: a token grid's channels
    too), from a recording of one blank ``size`` x ``size`` image."""
    with torch.no_grad():
        rec = dn.record(torch.zeros(1, 3, size, size), layers)
    return sum(int(rec.activations[dn.resolve(name)].shape[1]) for name in layers)


def bare_forward(device: torch.device, batch_size: int, files: List[Path], arch: str, model: torch.nn.Module,
                 layers: List[str], dn: Deconvnet) -> Dict[str, float]:
    """Images/s of the network alone on decoded images already on the device (channels-last, as
    pass 1 runs it): the zoo's whole ``model.features`` (the default layers reach its end), and
    torchvision's own ``create_feature_extractor`` up to the deepest visualized layer for the
    others (a ViT's encoder layer: the token sequence, class token included)."""
    transform = models.eval_transform(arch)
    crops = torch.stack([data_mod.load_crop(f, transform) for f in files[:batch_size]])
    if crops.shape[0] < batch_size:  # a folder smaller than a batch: repeat it
        crops = crops.repeat((batch_size + crops.shape[0] - 1) // crops.shape[0], 1, 1, 1)[:batch_size]
    x = data_mod.normalize(crops.to(device)).contiguous(memory_format=torch.channels_last)
    model = model.to(device).to(memory_format=torch.channels_last)
    if models.is_zoo(arch):
        network, what = model.features, f"{arch} features"
    else:
        deepest = deepest_node(model, dn, layers)
        network, what = create_feature_extractor(model, [deepest]), f"{arch} up to {deepest}"
    timer = benchmark.Timer("with torch.inference_mode(): network(x)", globals={"network": network, "x": x, "torch": torch},
                            label="zfk visualize", sub_label=f"{what}, batch {batch_size} [{device.type}]",
                            description="bare forward", num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=3.0)
    benchmark.Compare([measured]).print()
    return {"batch_ms": measured.median * 1e3, "images_per_second": batch_size / measured.median}


def repeated_folder(source: Path, copies: int, root: Path) -> Path:
    """``copies`` subfolders holding copies of ``source``'s files (the set repeated). Copies, not
    links: discovery follows no link out of ``--data`` and reads a file with several names once."""
    folder = root / f"x{copies}"
    for c in range(copies):
        sub = folder / f"copy{c}"
        sub.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            shutil.copyfile(f, sub / f.name)
    return folder


def whole_job(data: Path, out: Path, device: torch.device, batch_size: int, options: List[str]) -> Dict[str, object]:
    """``zfk visualize`` (with ``options`` added) in a fresh process; its ``run.json``."""
    command = [sys.executable, "-m", "zfkernels", "visualize", "--data", str(data), "--out", str(out), "--device",
               str(device), "--batch-size", str(batch_size), "--quiet"] + options
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    summary = json.loads((out / "run.json").read_text())
    return summary


def estimate_imagenet(job: Dict[str, object], all_projections: int) -> Dict[str, float]:
    """Seconds for ImageNet val (50,000 images, the same layers and K, every feature map) from
    one job's stage costs: pass 1 scales with the images; pass 2 makes ``all_projections``
    (K per feature map of the layers; the job may have projected only some maps) at the job's
    cost per projection, and records more distinct images (at most one per selection);
    rendering is per feature map."""
    seconds = job["seconds"]
    pass1 = IMAGENET_VAL / job["pass1_images_per_second"]
    selected = job["selected_images"]
    scale = all_projections / max(job["projections"], 1)
    per_image_pass2 = (seconds["pass 2"] - seconds.get("pass 2 projection", 0.0)) / max(selected, 1)
    distinct_at_scale = min(all_projections, IMAGENET_VAL)
    pass2 = seconds.get("pass 2 projection", 0.0) * scale + per_image_pass2 * distinct_at_scale
    render = seconds["render"] * scale
    return {"pass 1": pass1, "pass 2": pass2, "render": render, "total": pass1 + pass2 + render}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if zfkernels.has_cuda() else "cpu")
    parser.add_argument("--images", type=Path, default=SHARED_IMAGES, help="the image folder (default: the 800 samples)")
    parser.add_argument("--repeat", type=int, default=4, help="the second job runs the folder this many times over")
    parser.add_argument("--arch", default="zfnet", help="zfk visualize's --arch (default: zfnet)")
    parser.add_argument("--layers", default=None, help="zfk visualize's --layers (default: the arch's default layers)")
    parser.add_argument("--features", default=None,
                        help="zfk visualize's --features (pass 2's size; pass 1's forward costs the same)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: the job's own)")
    parser.add_argument("--decoder", default=None, help="zfk visualize's --decoder (default: the job's own)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the galleries under this folder")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench_visualize.json"))
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        sys.exit(f"bench_visualize: {args.images} is absent (the 800 ImageNet samples live in ../shared)")
    device = torch.device(args.device)
    if device.type == "cuda" and not zfkernels.has_cuda():
        sys.exit("bench_visualize: --device cuda, but no GPU is visible or the CUDA kernels were not compiled")
    files = sorted(p for p in args.images.iterdir() if p.is_file())
    model = models.build(args.arch, seed=0).eval()
    layers = args.layers.split(",") if args.layers else models.default_layers(args.arch, model)
    size = models.eval_transform(args.arch).crop
    dn = Deconvnet(model)
    maps = feature_maps(dn, layers, size)
    bare = bare_forward(device, args.batch_size, files, args.arch, model, layers, dn)
    print(f"bare forward: {bare['images_per_second']:.1f} images/s", flush=True)

    options = (["--workers", str(args.workers)] if args.workers is not None else []) + (
        ["--decoder", args.decoder] if args.decoder else []) + ["--arch", args.arch, "--layers", ",".join(layers)] + (
        ["--features", args.features] if args.features else [])
    scratch = Path(tempfile.mkdtemp(prefix="zfk-bench-"))
    jobs = {}
    try:
        for copies in (1, args.repeat):
            data = args.images if copies == 1 else repeated_folder(args.images, copies, scratch)
            out = (args.keep or scratch) / f"gallery-{copies}x"
            jobs[copies] = whole_job(data, out, device, args.batch_size, options)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    for copies, job in jobs.items():
        s = job["seconds"]
        ratio = job["pass1_images_per_second"] / bare["images_per_second"]
        row = {
            "arch": args.arch,
            "layers": layers,
            "features": args.features or "all",
            "images": job["scanned"],
            "pass1_images_per_second": job["pass1_images_per_second"],
            "pass1_vs_bare_forward": ratio,
            "pass2_images_per_second": job["selected_images"] / s["pass 2"],
            "projections": job["projections"],
            "seconds": s,
            "peak_memory_mb": job["peak_memory_mb"],
            "imagenet_val_estimate_s": estimate_imagenet(job, maps * TOP),
        }
        rows.append(row)
        mem, first = job["peak_memory_mb"]["whole run"], job["peak_memory_mb"]["pass 1"]
        gpu = (f", GPU {first['cuda_allocated']:.0f} MiB in pass 1, {mem['cuda_allocated']:.0f} MiB in pass 2"
               if mem.get("cuda_allocated") is not None else "")
        print(f"{job['scanned']} images: pass 1 {row['pass1_images_per_second']:.1f} img/s "
              f"({100 * ratio:.0f}% of the bare forward; target {100 * TARGET:.0f}%), pass 2 "
              f"{row['pass2_images_per_second']:.1f} img/s, total {s['total']:.1f} s; peak host RSS "
              f"{first['host_rss']:.0f} MiB after pass 1, {mem['host_rss']:.0f} MiB in all{gpu}")
        print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items()))
        est = row["imagenet_val_estimate_s"]
        print(f"  ImageNet val (50,000 images) estimate: pass 1 {est['pass 1'] / 60:.1f} min, pass 2 "
              f"{est['pass 2'] / 60:.1f} min, render {est['render'] / 60:.1f} min, total {est['total'] / 60:.1f} min")
    write_results(args.json, rows, device.type == "cuda", argv, images=str(args.images), bare_forward=bare,
                  target_pass1_vs_bare=TARGET)


if __name__ == "__main__":
    main()
