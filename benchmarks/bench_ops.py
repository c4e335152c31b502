"""Benchmark every zfkernels op against the pure-PyTorch reference on real ZFNet / AlexNet shapes.

    python benchmarks/bench_ops.py                      # CPU, and CUDA when a GPU is visible
    python benchmarks/bench_ops.py --device cpu --json bench-results/ops.json

torch.utils.benchmark (warm-up, synchronisation, blocked_autorange); reference and zfkernels
in the same run; prints a Compare table, then one line per case with the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import zfkernels
from zfkernels import reference
from _report import write_results  # (benchmarks/ is on sys.path when run as a script)

BATCH = 32  # the batch the main job's pass 2 records

# (name, shape of the pooled map, kernel, stride, ceil_mode): ZFNet / AlexNet pools at 224x224.
POOLS = [
    ("pool1", (BATCH, 96, 110, 110), 3, 2, True),
    ("pool2", (BATCH, 256, 26, 26), 3, 2, True),
    ("pool5", (BATCH, 256, 13, 13), 3, 2, False),
]

# (name, weight (C_out, C_in, k, k), stride, padding, map fed in (h, w), output size): the
# transposed filters of ZFNet's conv1..conv5.
CONVS = [
    ("conv1", (96, 3, 7, 7), 2, 1, (110, 110), (224, 224)),
    ("conv2", (256, 96, 5, 5), 2, 0, (26, 26), (55, 55)),
    ("conv3", (384, 256, 3, 3), 1, 1, (13, 13), (13, 13)),
    ("conv4", (384, 384, 3, 3), 1, 1, (13, 13), (13, 13)),
    ("conv5", (256, 384, 3, 3), 1, 1, (13, 13), (13, 13)),
]
SELECTIONS = 576  # 64 feature maps x top 9: the paper's Figure 2 workload for one layer
DENSE_BATCH = 32


def _timer(fn: Callable[[], object], label: str, sub_label: str, description: str, threads: int) -> benchmark.Measurement:
    timer = benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        label=label,
        sub_label=sub_label,
        description=description,
        num_threads=threads,
    )
    return timer.blocked_autorange(min_run_time=1.0)


def _cases(device: torch.device, dtype: torch.dtype) -> List[Dict[str, object]]:
    """(label, sub_label, reference fn, zfkernels fn) for each benchmarked case."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases: List[Dict[str, object]] = []
    tag = str(dtype).replace("torch.", "")
    for name, shape, k, s, ceil in POOLS:
        x = torch.randn(shape, generator=gen).to(device, dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        sub = f"{name} {'x'.join(map(str, shape))} {k}/{s}{' ceil' if ceil else ''} {tag}"
        cases.append(dict(
            label="maxpool_switches", sub_label=sub + " NCHW",
            ref=lambda x=x, k=k, s=s, c=ceil: F.max_pool2d(x, k, s, 0, ceil_mode=c, return_indices=True),
            ours=lambda x=x, k=k, s=s, c=ceil: zfkernels.maxpool_switches(x, k, s, 0, ceil_mode=c),
        ))
        cases.append(dict(
            label="maxpool_switches", sub_label=sub + " channels-last",
            ref=lambda x=x_cl, k=k, s=s, c=ceil: F.max_pool2d(x, k, s, 0, ceil_mode=c, return_indices=True),
            ours=lambda x=x_cl, k=k, s=s, c=ceil: zfkernels.maxpool_switches(x, k, s, 0, ceil_mode=c),
        ))
        pooled, switches = zfkernels.maxpool_switches(x, k, s, 0, ceil_mode=ceil)
        y = torch.randn(pooled.shape, generator=gen).to(device, dtype)
        size = (shape[2], shape[3])
        cases.append(dict(
            label="unpool(rectify=True)", sub_label=sub,
            ref=lambda y=y, sw=switches, size=size, k=k, s=s: reference.unpool(y, sw, size, k, s, 0, rectify=True),
            ours=lambda y=y, sw=switches, size=size, k=k, s=s: zfkernels.unpool(y, sw, size, k, s, 0, rectify=True),
        ))
    for name, wshape, s, p, hw, out_size in CONVS:
        weight = torch.randn(wshape, generator=gen).to(device, dtype)
        maps = torch.randn((SELECTIONS, 1) + hw, generator=gen).to(device, dtype)
        channels = torch.randint(0, wshape[0], (SELECTIONS,), generator=gen).to(device)
        sub = f"{name} {SELECTIONS}x1x{hw[0]}x{hw[1]} -> {wshape[1]}x{out_size[0]}x{out_size[1]} {tag}"
        cases.append(dict(
            label="project(channels=)", sub_label=sub,
            ref=lambda m=maps, w=weight, s=s, p=p, o=out_size, c=channels: reference.project(m, w, s, p, o, channels=c),
            ours=lambda m=maps, w=weight, s=s, p=p, o=out_size, c=channels: zfkernels.project(m, w, s, p, o, channels=c),
        ))
        dense = torch.randn((DENSE_BATCH, wshape[0]) + hw, generator=gen).to(device, dtype)
        cases.append(dict(
            label="project (dense)", sub_label=f"{name} {DENSE_BATCH}x{wshape[0]}x{hw[0]}x{hw[1]} {tag}",
            ref=lambda x=dense, w=weight, s=s, p=p, o=out_size: reference.project(x, w, s, p, o),
            ours=lambda x=dense, w=weight, s=s, p=p, o=out_size: zfkernels.project(x, w, s, p, o),
        ))
    return cases


def run(devices: List[str], dtypes: List[torch.dtype], only: str | None) -> List[Dict[str, object]]:
    results: List[benchmark.Measurement] = []
    rows: List[Dict[str, object]] = []
    for device_name in devices:
        device = torch.device(device_name)
        threads = torch.get_num_threads()
        for dtype in dtypes:
            for case in _cases(device, dtype):
                if only and only not in case["label"] and only not in case["sub_label"]:
                    continue
                label, sub = case["label"], f"{case['sub_label']} [{device_name}]"
                ref = _timer(case["ref"], label, sub, "reference", threads)
                ours = _timer(case["ours"], label, sub, "zfkernels", threads)
                results += [ref, ours]
                row = dict(op=label, case=sub, device=device_name, reference_ms=ref.median * 1e3,
                           zfkernels_ms=ours.median * 1e3, speedup=ref.median / ours.median)
                rows.append(row)
                print(f"{label:22s} {sub:60s} ref {row['reference_ms']:9.3f} ms  ours {row['zfkernels_ms']:9.3f} ms"
                      f"  x{row['speedup']:.2f}", flush=True)
    benchmark.Compare(results).print()
    return rows


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], nargs="+", default=["float32"])
    parser.add_argument("--only", help="run only the cases whose op or shape contains this text")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench_ops.json"))
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not zfkernels.has_cuda():
        if args.device == "cuda":
            sys.exit("bench_ops: --device cuda, but no GPU is visible or the CUDA kernels were not compiled")
        devices.remove("cuda")
    if "cuda" in devices:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = run(devices, [getattr(torch, name) for name in args.dtype], args.only)
    write_results(args.json, rows, "cuda" in devices, argv)


if __name__ == "__main__":
    main()
