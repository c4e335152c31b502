"""Benchmark every zfkernels op against PyTorch on real shapes (ZFNet / AlexNet, ResNeXt-50,
MobileNetV2), in the same run, with ratios.

    python benchmarks/bench_ops.py                      # CPU, and CUDA when a GPU is visible
    python benchmarks/bench_ops.py --device cpu --json bench-results/ops.json
    python benchmarks/bench_ops.py --device cpu --baseline HEAD~3   # + that revision's kernels

Each row names its baseline: PyTorch's fastest way to do the same job where there is one
(``F.max_pool2d(return_indices=True)``; ``aten.max_pool2d_with_indices_backward`` given PyTorch's
own int64 indices, plus ``relu``; ``F.conv_transpose2d``, dense, grouped or depthwise), and the
pure-PyTorch ``zfkernels.reference`` where that is the only formulation (``project(channels=)``).
With ``--baseline REV``, the CPU kernels of git revision REV are built beside the current ones
(benchmarks/_baseline.py) and timed in the same run ("before").

torch.utils.benchmark (warm-up, synchronisation, blocked_autorange); prints a Compare table, then
one line per case with the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import zfkernels
from zfkernels import reference
from _report import write_results  # (benchmarks/ is on sys.path when run as a script)

BATCH = 32  # the batch the main job's pass 2 records

# (name, shape of the pooled map, kernel, stride, dilation, ceil_mode): ZFNet / AlexNet pools at
# 224x224, and pool1 dilated.
POOLS = [
    ("pool1", (BATCH, 96, 110, 110), 3, 2, 1, True),
    ("pool1 dilated", (BATCH, 96, 110, 110), 3, 2, 2, True),
    ("pool2", (BATCH, 256, 26, 26), 3, 2, 1, True),
    ("pool5", (BATCH, 256, 13, 13), 3, 2, 1, False),
]

# (name, weight (C_out, C_in / groups, k, k), stride, padding, groups, map fed in (h, w), output
# size): the transposed filters of ZFNet's conv1..conv5, ResNeXt-50's layer3 grouped 3x3
# (layer3.1.conv2: 512 -> 512 in 32 groups at 14x14) and MobileNetV2's features.2 depthwise 3x3
# (96 channels, stride 2, 112x112 -> 56x56).
CONVS = [
    ("conv1", (96, 3, 7, 7), 2, 1, 1, (110, 110), (224, 224)),
    ("conv2", (256, 96, 5, 5), 2, 0, 1, (26, 26), (55, 55)),
    ("conv3", (384, 256, 3, 3), 1, 1, 1, (13, 13), (13, 13)),
    ("conv4", (384, 384, 3, 3), 1, 1, 1, (13, 13), (13, 13)),
    ("conv5", (256, 384, 3, 3), 1, 1, 1, (13, 13), (13, 13)),
    ("resnext50 layer3.1.conv2", (512, 16, 3, 3), 1, 1, 32, (14, 14), (14, 14)),
]
DEPTHWISE = ("mobilenet_v2 features.2 depthwise", (96, 1, 3, 3), 2, 1, 96, (56, 56), (112, 112))
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


def aten_unpool(y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, k: int, s: int, d: int, ceil: bool) -> torch.Tensor:
    """PyTorch's own way to the adjoint: its max-pooling backward, given its int64 indices, then ReLU."""
    return torch.relu_(torch.ops.aten.max_pool2d_with_indices_backward(y, x, [k, k], [s, s], [0, 0], [d, d], ceil, indices))


def selection_scatter(maps: torch.Tensor, weight: torch.Tensor, channels: torch.Tensor, groups: int, stride: int,
                      padding: int) -> torch.Tensor:
    """The fastest channels= projection with groups in stock PyTorch that we know: each selection
    through its filter alone onto its group's channels (one grouped transposed convolution), then
    placed into a zero map of all C_in channels."""
    b, (h, w), per_group = maps.shape[0], maps.shape[-2:], weight.shape[1]
    selected = F.conv_transpose2d(maps.reshape(1, b, h, w), weight[channels], None, stride, padding, groups=b)
    out = maps.new_zeros((b, groups, per_group) + tuple(selected.shape[-2:]))
    out[torch.arange(b, device=maps.device), channels // (weight.shape[0] // groups)] = selected.view(b, per_group,
                                                                                                      *selected.shape[-2:])
    return out.flatten(1, 2)


def _pool_cases(device: torch.device, dtype: torch.dtype, gen: torch.Generator, tag: str, old) -> List[Dict[str, object]]:
    cases: List[Dict[str, object]] = []
    for name, shape, k, s, d, ceil in POOLS:
        x = torch.randn(shape, generator=gen).to(device, dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        sub = f"{name} {'x'.join(map(str, shape))} {k}/{s}{f' d{d}' if d > 1 else ''}{' ceil' if ceil else ''} {tag}"
        old_pool = old if (old is not None and d == 1) else None
        for layout, xin in (("NCHW", x), ("channels-last", x_cl)):
            cases.append(dict(
                label="maxpool_switches", sub_label=f"{sub} {layout}", baseline="F.max_pool2d(return_indices=True)",
                ref=lambda x=xin, k=k, s=s, d=d, c=ceil: F.max_pool2d(x, k, s, 0, d, c, return_indices=True),
                ours=lambda x=xin, k=k, s=s, d=d, c=ceil: zfkernels.maxpool_switches(x, k, s, 0, d, c),
                before=None if old_pool is None else
                (lambda x=xin, k=k, s=s, c=ceil, old=old_pool: old.maxpool_switches(x, [k, k], [s, s], [0, 0], c)),
            ))
        _, switches = zfkernels.maxpool_switches(x, k, s, 0, d, ceil)
        _, indices = F.max_pool2d(x, k, s, 0, d, ceil, return_indices=True)
        y = torch.randn(switches.shape, generator=gen).to(device, dtype)
        size = (shape[2], shape[3])
        ours = lambda y=y, sw=switches, size=size, k=k, s=s, d=d: zfkernels.unpool(y, sw, size, k, s, 0, d, rectify=True)
        before = None if old_pool is None else (
            lambda y=y, sw=switches, size=size, k=k, s=s, old=old_pool: old.unpool(
                y, sw, list(size), [k, k], [s, s], [0, 0], None, True))
        cases.append(dict(
            label="unpool(rectify=True)", sub_label=sub, baseline="aten.max_pool2d_with_indices_backward + relu",
            ref=lambda y=y, x=x, i=indices, k=k, s=s, d=d, c=ceil: aten_unpool(y, x, i, k, s, d, c),
            ours=ours, before=before,
        ))
        cases.append(dict(
            label="unpool(rectify=True)", sub_label=sub, baseline="reference.unpool (switches -> indices, scatter_add_)",
            ref=lambda y=y, sw=switches, size=size, k=k, s=s, d=d: reference.unpool(y, sw, size, k, s, 0, d, rectify=True),
            ours=ours, before=None,  # timed once, in the row above
        ))
    return cases


def _conv_cases(device: torch.device, dtype: torch.dtype, gen: torch.Generator, tag: str, old) -> List[Dict[str, object]]:
    cases: List[Dict[str, object]] = []
    for name, wshape, s, p, groups, hw, out_size in CONVS:
        weight = torch.randn(wshape, generator=gen).to(device, dtype)
        maps = torch.randn((SELECTIONS, 1) + hw, generator=gen).to(device, dtype)
        channels = torch.randint(0, wshape[0], (SELECTIONS,), generator=gen).to(device)
        c_in = wshape[1] * groups
        sub = (f"{name} {SELECTIONS}x1x{hw[0]}x{hw[1]} -> {c_in}x{out_size[0]}x{out_size[1]}"
               f"{f' groups={groups}' if groups > 1 else ''} {tag}")
        out_pad = zfkernels.ops.output_padding_for("bench", hw, wshape[2:], (s, s), (p, p), out_size)
        old_conv = old if (old is not None and groups == 1) else None
        ours = lambda m=maps, w=weight, s=s, p=p, o=out_size, c=channels, g=groups: zfkernels.project(
            m, w, s, p, o, groups=g, channels=c)
        cases.append(dict(
            label="project(channels=)", sub_label=sub, baseline="reference.project (per-sample weights, groups=B)",
            ref=lambda m=maps, w=weight, s=s, p=p, o=out_size, c=channels, g=groups: reference.project(
                m, w, s, p, o, groups=g, channels=c),
            ours=ours,
            before=None if old_conv is None else (
                lambda m=maps, w=weight, s=s, p=p, op=out_pad, c=channels, old=old_conv: old.project(
                    m, w, [s, s], [p, p], list(op), c)),
        ))
        if groups > 1:
            cases.append(dict(
                label="project(channels=)", sub_label=sub, baseline="group's filters by groups=B, scattered into zeros",
                ref=lambda m=maps, w=weight, c=channels, g=groups, s=s, p=p: selection_scatter(m, w, c, g, s, p),
                ours=ours, before=None,
            ))
        dense = torch.randn((DENSE_BATCH, wshape[0]) + hw, generator=gen).to(device, dtype)
        cases.append(_dense_case(name, dense, weight, s, p, out_pad, out_size, groups, tag, old_conv))
    name, wshape, s, p, groups, hw, out_size = DEPTHWISE
    weight = torch.randn(wshape, generator=gen).to(device, dtype)
    dense = torch.randn((DENSE_BATCH, wshape[0]) + hw, generator=gen).to(device, dtype)
    out_pad = zfkernels.ops.output_padding_for("bench", hw, wshape[2:], (s, s), (p, p), out_size)
    cases.append(_dense_case(name, dense, weight, s, p, out_pad, out_size, groups, tag, None))
    return cases


def _dense_case(name, dense, weight, s, p, out_pad, out_size, groups, tag, old) -> Dict[str, object]:
    hw = tuple(dense.shape[-2:])
    return dict(
        label="project (dense)",
        sub_label=f"{name} {DENSE_BATCH}x{dense.shape[1]}x{hw[0]}x{hw[1]}{f' groups={groups}' if groups > 1 else ''} {tag}",
        baseline=f"F.conv_transpose2d{f'(groups={groups})' if groups > 1 else ''}",
        ref=lambda x=dense, w=weight, s=s, p=p, op=out_pad, g=groups: F.conv_transpose2d(x, w, None, s, p, op, g),
        ours=lambda x=dense, w=weight, s=s, p=p, o=out_size, g=groups: zfkernels.project(x, w, s, p, o, groups=g),
        before=None if old is None else (
            lambda x=dense, w=weight, s=s, p=p, op=out_pad: old.project(x, w, [s, s], [p, p], list(op), None)),
    )


def _cases(device: torch.device, dtype: torch.dtype, old) -> List[Dict[str, object]]:
    """(label, sub_label, baseline, its fn, zfkernels fn, the baseline build's fn or None) per case."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    tag = str(dtype).replace("torch.", "")
    return _pool_cases(device, dtype, gen, tag, old) + _conv_cases(device, dtype, gen, tag, old)


def run(devices: List[str], dtypes: List[torch.dtype], only: Optional[str], old) -> List[Dict[str, object]]:
    results: List[benchmark.Measurement] = []
    rows: List[Dict[str, object]] = []
    for device_name in devices:
        device = torch.device(device_name)
        threads = torch.get_num_threads()
        for dtype in dtypes:
            for case in _cases(device, dtype, old if device_name == "cpu" else None):
                if only and only not in case["label"] and only not in case["sub_label"]:
                    continue
                label, sub = case["label"], f"{case['sub_label']} [{device_name}] vs {case['baseline']}"
                ref = _timer(case["ref"], label, sub, "PyTorch / reference", threads)
                ours = _timer(case["ours"], label, sub, "zfkernels", threads)
                results += [ref, ours]
                row = dict(op=label, case=f"{case['sub_label']} [{device_name}]", baseline=case["baseline"],
                           device=device_name, reference_ms=ref.median * 1e3, zfkernels_ms=ours.median * 1e3,
                           speedup=ref.median / ours.median)
                line = (f"{label:22s} {row['case']:72s} {case['baseline']:52s} ref {row['reference_ms']:9.3f} ms"
                        f"  ours {row['zfkernels_ms']:9.3f} ms  x{row['speedup']:.2f}")
                if case["before"] is not None:
                    before = _timer(case["before"], label, sub, "before", threads)
                    results.append(before)
                    row.update(before_ms=before.median * 1e3, speedup_before=ref.median / before.median)
                    line += f"  (before {row['before_ms']:9.3f} ms, x{row['speedup_before']:.2f})"
                rows.append(row)
                print(line, flush=True)
    benchmark.Compare(results).print()
    return rows


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], nargs="+", default=["float32"])
    parser.add_argument("--only", help="run only the cases whose op or shape contains this text")
    parser.add_argument("--baseline", metavar="REV", help="also time git revision REV's CPU kernels (\"before\")")
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
    old = None
    if args.baseline:
        from _baseline import build_baseline

        torch.ops.load_library(build_baseline(args.baseline))
        old = torch.ops.zfkernels_old
    rows = run(devices, [getattr(torch, name) for name in args.dtype], args.only, old)
    write_results(args.json, rows, "cuda" in devices, argv, baseline=args.baseline)


if __name__ == "__main__":
    main()
