"""Benchmark `zfk occlusion`'s batching: the maps of one 224x224 photograph (ZFNet, seeded random
weights, a 50-pixel square at stride 8: 28 x 28 = 784 positions) computed by
`zfkernels.diagnostics.occlusion.occlusion_maps` (all occluded copies, --batch-size per forward,
the model channels-last) against the plain loop, one forward pass per position (timed with the
model in the default layout and channels-last, to tell batching from layout).

    python benchmarks/bench_occlusion.py --device cpu --json benchmarks/results/bench_occlusion_cpu.json
    python benchmarks/bench_occlusion.py --device cuda

torch.utils.benchmark (warm-up, synchronisation, blocked_autorange); both in the same run, on the
same image; prints a Compare table and the speed-up, checks that both give the same maps, and
writes JSON. The photograph is n01440764_tench.JPEG from ../shared/data/imagenet-sample (or
$ZFK_SAMPLE_IMAGES).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.utils.benchmark as benchmark

from zfkernels.job import data as data_mod
from zfkernels import models
from zfkernels.diagnostics import common
from zfkernels.diagnostics.occlusion import grid_boxes, occlusion_grid, occlusion_maps, strongest_map
from _report import SHARED_IMAGES, write_results  # (benchmarks/ is on sys.path when run as a script)

IMAGE = "n01440764_tench.JPEG"
TARGET = 0  # tench


def loop_maps(model: torch.nn.Module, image: torch.Tensor, layer: str, channel: int, size: int, stride: int) -> Dict[str, torch.Tensor]:
    """The reference: one forward pass per occluder position, the square written in place."""
    extractor = common.FeatureExtractor(model)
    rows, cols = occlusion_grid(image.shape[-2], image.shape[-1], size, stride)
    totals, probabilities, classes = [], [], []
    for x0, y0, x1, y1 in grid_boxes(rows, cols).tolist():
        copy = image.clone()
        copy[:, y0:y1, x0:x1] = 0.0  # the ImageNet mean pixel
        out = extractor(copy.unsqueeze(0), [layer, "logits"])
        totals.append(out[layer][0, channel].sum())
        p = torch.softmax(out["logits"][0], 0)
        probabilities.append(p[TARGET])
        classes.append(p.argmax())
    shape = (rows.shape[0], cols.shape[0])
    return {"activation": torch.stack(totals).view(shape), "probability": torch.stack(probabilities).view(shape),
            "top_class": torch.stack(classes).view(shape)}


def run(device: torch.device, arch: str, size: int, stride: int, batch_sizes: List[int], min_run_time: float) -> List[Dict[str, object]]:
    model = models.build(arch, seed=0).eval().to(device)
    image = data_mod.normalize(data_mod.load_crop(SHARED_IMAGES / IMAGE).unsqueeze(0))[0].to(device)
    layer = common.paper_layers(model).layer5
    channel = strongest_map(model, image, layer).channel
    rows, cols = occlusion_grid(224, 224, size, stride)
    positions = rows.shape[0] * cols.shape[0]
    sub = f"{arch} 224x224, square {size} stride {stride}: {positions} positions [{device.type}]"
    threads = torch.get_num_threads()

    def timer(fn, description: str) -> benchmark.Measurement:
        return benchmark.Timer(stmt="fn()", globals={"fn": fn}, label="occlusion maps", sub_label=sub,
                               description=description, num_threads=threads).blocked_autorange(min_run_time=min_run_time)

    with torch.inference_mode():
        reference = loop_maps(model, image, layer, channel, size, stride)
        loop = timer(lambda: loop_maps(model, image, layer, channel, size, stride), "loop (1 forward per position)")
        # The library runs the model channels-last; the same layout for the loop separates the
        # gain of batching from the gain of the layout.
        with models.channels_last(model):
            loop_cl = timer(lambda: loop_maps(model, image, layer, channel, size, stride), "loop, channels-last")
        results, rows_out = [loop, loop_cl], []
        for batch in batch_sizes:
            maps = occlusion_maps(model, image, layer=layer, channel=channel, target=TARGET, size=size, stride=stride,
                                  batch_size=batch)
            difference = max(float((maps.activation - reference["activation"].cpu()).abs().max() / reference["activation"].abs().max()),
                             float((maps.probability - reference["probability"].cpu()).abs().max()))
            same_classes = bool(torch.equal(maps.top_class, reference["top_class"].cpu()))
            batched = timer(lambda b=batch: occlusion_maps(model, image, layer=layer, channel=channel, target=TARGET,
                                                           size=size, stride=stride, batch_size=b), f"batched ({batch} per forward)")
            results.append(batched)
            row = dict(case=sub, device=device.type, positions=positions, batch_size=batch, loop_ms=loop.median * 1e3,
                       loop_channels_last_ms=loop_cl.median * 1e3, batched_ms=batched.median * 1e3,
                       speedup=loop.median / batched.median, speedup_same_layout=loop_cl.median / batched.median,
                       max_difference=difference, same_top_classes=same_classes)
            rows_out.append(row)
            print(f"{sub}: loop {row['loop_ms']:.1f} ms (channels-last {row['loop_channels_last_ms']:.1f} ms), "
                  f"batched ({batch}) {row['batched_ms']:.1f} ms: x{row['speedup']:.2f} "
                  f"(x{row['speedup_same_layout']:.2f} against the channels-last loop); "
                  f"max difference {difference:.1e}, same top classes: {same_classes}", flush=True)
    benchmark.Compare(results).print()
    return rows_out


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=list(models.ARCHITECTURES), default="zfnet")
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64], help="batched runs to time (default: 64)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange (default: 1)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench_occlusion.json"))
    args = parser.parse_args(argv)
    if not (SHARED_IMAGES / IMAGE).is_file():
        sys.exit(f"bench_occlusion: {SHARED_IMAGES / IMAGE} is missing (set ZFK_SAMPLE_IMAGES to the sample folder)")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_occlusion: --device cuda, but no GPU is visible")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = run(torch.device(args.device), args.arch, args.size, args.stride, args.batch_size, args.min_run_time)
    write_results(args.json, rows, args.device == "cuda", argv, image=IMAGE)


if __name__ == "__main__":
    main()
