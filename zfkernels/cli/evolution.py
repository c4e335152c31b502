"""``zfk evolution``: the command line of :mod:`zfkernels.diagnostics.evolution`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics.evolution import feature_evolution, montage, render
from ..errors import UsageError
from ..job.console import say
from .common import (LAYERS_HELP, add_device_option, arch_name, feature_layers, finish_parser, load_model, positive_int,
                     prepare_out, resolve_device)

DESCRIPTION = """\
Feature evolution (the paper's Figure 4). For each --checkpoints file (state dicts of the same
--arch, in training order), the strongest activation of each chosen feature map across the
images of --data, projected to pixels by the deconvnet: a montage per layer with a row per
feature map and a column per checkpoint (and one of the image patches). Reuses the main job's
pass 1 and pass 2 at top 1. Writes --out/evolution/: PNGs, evolution.json and index.html.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evolution`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("evolution", help="the strongest activation of chosen features across checkpoints (Figure 4)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PTH",
                        help="state-dict files of --arch (.pth/.pt, loaded with weights_only=True), in training order")
    parser.add_argument("--arch", type=arch_name, default="zfnet", metavar="ARCH",
                        help="architecture of the checkpoints, as for visualize: zfnet (default), alexnet, vgg16, a "
                             "torchvision classification builder (resnet50 …) or module.path:callable")
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder, searched recursively")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images")
    parser.add_argument("--layers", metavar="LIST", help=LAYERS_HELP)
    parser.add_argument("--features", default="0-7", metavar="LIST",
                        help="feature maps of each layer: numbers and ranges, e.g. 0-7,40 (default: 0-7)")
    add_device_option(parser)
    finish_parser(parser, run, batch_size=32)


def load_checkpoints(arch: str, paths: Sequence[str], device: torch.device) -> Iterable[nn.Module]:
    """The checkpoints as models, one at a time; a file that does not fit ``arch`` is a
    :class:`UsageError` naming it (every file is checked before the first scan)."""
    files = diagnostics_common.check_files_exist(paths, "--checkpoints")
    for path in files:  # fail before any work: load each once on the CPU
        _load(arch, path, torch.device("cpu"))
    return (_load(arch, path, device) for path in files)


def _load(arch: str, path: Path, device: torch.device) -> nn.Module:
    try:
        return load_model(arch, str(path), 0, device)
    except UsageError as error:
        raise UsageError(f"--checkpoints {path}: {error}") from None


def run(args: argparse.Namespace) -> int:
    """``zfk evolution``; returns the exit status."""
    from .visualize import resolve_features, resolve_images

    device = resolve_device(args.device)
    out_path = Path(args.out)
    images, source = resolve_images(args.data, args.limit, out_path)
    images = images.seen_as(models.eval_transform(args.arch))  # the network's input size
    reference = load_model(args.arch, None, 0, torch.device("cpu"))  # layer names and sizes only
    layers = feature_layers(args.arch, reference, args.layers)
    channels = resolve_features(reference, layers, args.features)
    del reference
    networks = load_checkpoints(args.arch, args.checkpoints, device)
    out = prepare_out(out_path)
    folder = diagnostics_common.subfolder(out, "evolution")
    say(f"evolution: {len(args.checkpoints)} checkpoint(s), {len(images.files)} images, layers {', '.join(layers)}", args.quiet)
    result = feature_evolution(networks, images, channels, device, batch_size=args.batch_size, quiet=args.quiet)
    labels = [diagnostics_common.plain(Path(p).name) for p in args.checkpoints]
    gap = 4
    for layer in layers:
        rows = [f"{layer} {c}" for c in result.channels[layer]]
        tile = result.projections[layer].shape[2]
        for kind, tiles in (("projections", result.projections[layer]), ("patches", result.patches[layer])):
            render(folder / f"{layer}-{kind}.png", montage(tiles, result.filled[layer], gap), tile, gap, rows, labels,
                   f"{layer}: strongest activation per checkpoint ({kind})")
    document = {
        "command": "evolution", "arch": args.arch, "checkpoints": list(args.checkpoints), "data": source,
        "images": len(images.files),
        "layers": {layer: [{"channel": c, "per_checkpoint": [
            None if e is None else {"image": images.files[e[0]], "value": e[1], "y": e[2], "x": e[3]}
            for e in result.entries[layer][j]]} for j, c in enumerate(result.channels[layer])] for layer in layers},
    }
    diagnostics_common.write_json(folder / "evolution.json", document)
    diagnostics_common.write_page(
        out, "evolution", arch=args.arch, checkpoints=list(args.checkpoints), source=source, images=len(images.files),
        layers=[{"name": layer, "projections": f"{layer}-projections.png", "patches": f"{layer}-patches.png"}
                for layer in layers])
    say(f"evolution -> {folder / 'index.html'}", args.quiet)
    return 0
