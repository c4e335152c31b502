"""The paper's Figure 2 workload on ZFNet: the top-9 single activations of 64 feature maps of a
layer (576 projections from 16 images), for each of conv1 ... conv5, through
``Deconvnet.project`` against the plain batched pure-PyTorch deconvnet (full-image
``F.conv_transpose2d``, the adjoint reference unpool, ReLU).

    python benchmarks/bench_deconvnet.py --device cpu --json bench-results/bench_deconvnet.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import zfkernels
from zfkernels import models, reference
from zfkernels.deconvnet import Deconvnet, Recording
from _report import SHARED_IMAGES, write_results  # (benchmarks/ is on sys.path when run as a script)

IMAGES, MAPS, TOP = 16, 64, 9


def load_images(count: int) -> Tuple[torch.Tensor, str]:
    """Real photographs from ../shared when present (ImageNet eval transform), else noise."""
    if SHARED_IMAGES.is_dir():
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        files = sorted(SHARED_IMAGES.iterdir())[:count]
        return torch.stack([tf(Image.open(f).convert("RGB")) for f in files]), f"{count} ImageNet sample photographs"
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0)), f"{count} random images"


def figure2_selections(act: torch.Tensor, maps: int, top: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the first `maps` feature maps, the `top` images with the strongest activation (one
    per image, at its argmax): rows, channels, positions."""
    n, c, h, w = act.shape
    peak, where = act[:, :maps].flatten(2).max(dim=2)  # (N, maps)
    best = peak.topk(min(top, n), dim=0).indices  # (top, maps)
    channels = torch.arange(maps, device=act.device).repeat(best.shape[0])
    rows = best.flatten()
    flat = where[rows, channels]
    return rows, channels, torch.stack([flat // w, flat % w], dim=1)


def plain_deconvnet(dn: Deconvnet, rec: Recording, layer: str, rows: torch.Tensor, channels: torch.Tensor,
                    positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """The straightforward batched deconvnet in pure PyTorch, on full maps at every level."""
    top = next(i for i, s in enumerate(dn.stages) if s.kind == "conv" and s.name == layer)
    act = rec.activations[layer]
    outs = []
    for start in range(0, rows.shape[0], chunk):
        r, c, p = rows[start:start + chunk], channels[start:start + chunk], positions[start:start + chunk]
        b = torch.arange(r.shape[0], device=act.device)
        signal = torch.zeros((r.shape[0],) + tuple(act.shape[1:]), dtype=act.dtype, device=act.device)
        signal[b, c, p[:, 0], p[:, 1]] = act[r, c, p[:, 0], p[:, 1]]
        for i in range(top, -1, -1):
            stage = dn.stages[i]
            below = rec.sizes[i]
            if stage.kind == "conv":
                w = stage.window
                out_pad = [below[a] - ((signal.shape[2 + a] - 1) * w.stride[a] - 2 * w.padding[a] + w.kernel[a]) for a in range(2)]
                signal = F.conv_transpose2d(signal, stage.module.weight, None, w.stride, w.padding, out_pad)
            elif stage.kind == "relu" and i != top:
                signal = torch.relu(signal)
            elif stage.kind == "pool":
                w = stage.window
                signal = reference.unpool(signal, rec.switches[i], below, w.kernel, w.stride, w.padding, rows=r)
        outs.append(signal)
    return torch.cat(outs)


def run(device: torch.device, layers: List[str], chunk: int) -> Tuple[List[Dict[str, object]], str]:
    images, source = load_images(IMAGES)
    dn = Deconvnet(models.zfnet(seed=0).eval().to(device))
    with torch.no_grad():
        rec = dn.record(images.to(device))
    results, rows_out = [], []
    for layer in layers:
        rows, channels, positions = figure2_selections(rec.activations[layer], MAPS, TOP)
        sub = f"ZFNet {layer}: {rows.shape[0]} single activations from {IMAGES} images [{device.type}]"
        with torch.no_grad():
            ours_out = dn.project(rec, layer, rows, channels, positions, chunk_size=chunk)
            ref_out = plain_deconvnet(dn, rec, layer, rows, channels, positions, chunk)
        error = float((ours_out - ref_out).norm() / ref_out.norm().clamp_min(1e-30))
        timers = {
            "reference": lambda: plain_deconvnet(dn, rec, layer, rows, channels, positions, chunk),
            "zfkernels": lambda: dn.project(rec, layer, rows, channels, positions, chunk_size=chunk),
        }
        measured = {}
        for description, fn in timers.items():
            t = benchmark.Timer("with torch.no_grad(): fn()", globals={"fn": fn, "torch": torch},
                                label="Deconvnet.project (Figure 2 workload)", sub_label=sub, description=description,
                                num_threads=torch.get_num_threads())
            measured[description] = t.blocked_autorange(min_run_time=2.0)
            results.append(measured[description])
        row = dict(layer=layer, selections=int(rows.shape[0]), device=device.type,
                   reference_ms=measured["reference"].median * 1e3, zfkernels_ms=measured["zfkernels"].median * 1e3,
                   speedup=measured["reference"].median / measured["zfkernels"].median, relative_error=error)
        rows_out.append(row)
        print(f"{layer}: reference {row['reference_ms']:9.1f} ms  zfkernels {row['zfkernels_ms']:8.1f} ms  "
              f"x{row['speedup']:.2f}  (rel. difference {error:.1e})", flush=True)
    benchmark.Compare(results).print()
    return rows_out, source


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if zfkernels.has_cuda() else "cpu")
    parser.add_argument("--layers", nargs="+", default=["conv1", "conv2", "conv3", "conv4", "conv5"])
    parser.add_argument("--chunk-size", type=int, default=192, help="selections per batch, both sides")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench_deconvnet.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not zfkernels.has_cuda():
            sys.exit("bench_deconvnet: --device cuda, but no GPU is visible or the CUDA kernels were not compiled")
        torch.backends.cudnn.allow_tf32 = False
    rows, source = run(device, args.layers, args.chunk_size)
    write_results(args.json, rows, device.type == "cuda", argv, images=source)


if __name__ == "__main__":
    main()
