"""``zfk correspondence``: the command line of :mod:`zfkernels.diagnostics.correspondence`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics.correspondence import CorrespondenceResult, correspondence, read_parts
from ..errors import UsageError
from ..job import data as data_mod
from ..job.console import say
from .common import (add_model_options, finish_parser, int_in_range, load_model, model_description, model_header,
                     prepare_out, resolve_device, resolve_layers, seed_int, warn_untrained)

# Each part and each random trial keeps the sign of every feature of every image (a byte each)
# until the table is made: the trials are bounded, and so is their memory with the images and
# layers asked for.
MAX_TRIALS = 1000
TRIALS = int_in_range(0, MAX_TRIALS, "random occlusions, each holding every image's feature signs")
SIGN_BYTES = 2 * 2**30

DESCRIPTION = """\
Correspondence analysis (the paper's Section 4.3, Table 7). For each part in --parts (a box per
image), occlude it in every image and compare the sign patterns of the feature changes across
images: Delta = sum over pairs i<j of the Hamming distance between sign(x_i - x~_i) and
sign(x_j - x~_j), shown as the mean fraction of differing signs; the same for --trials random
occlusions of the same size. Low values: the part is represented consistently. Writes
--out/correspondence/: table.png, correspondence.json and index.html.

parts.json:
  {"coordinates": "crop",                   (or "original": pixels of the image file)
   "parts": {"left eye": {"dog1.jpg": [x0, y0, x1, y1], "dog2.jpg": [...], ...},
             "nose":     {...}}}
Images are named by their file name (as in --images); boxes are half-open pixel boxes, by
default in the evaluation crop the network sees (Resize(256) + CenterCrop(224); Inception v3:
Resize(342) + CenterCrop(299)).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``correspondence`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("correspondence", help="correspondence of object parts across images (Table 7)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="two or more image files")
    parser.add_argument("--parts", required=True, metavar="JSON", help="the part boxes (format above)")
    add_model_options(parser)
    parser.add_argument("--layers", metavar="LIST",
                        help="comma-separated layers: conv layers (conv5, conv5_3 …), fc6/fc7, or node names on other "
                             "networks (layer4.1.relu_1 …) (default: the paper's layers 5 and 7: the last conv layer "
                             "and fc7; on a network without fc7, its deepest feature map)")
    parser.add_argument("--trials", type=TRIALS, default=10, metavar="N",
                        help=f"random occlusions to compare with, at most {MAX_TRIALS} (default: 10; 0: none)")
    parser.add_argument("--trial-seed", type=seed_int, default=0, metavar="SEED",
                        help="seed of the random occlusions, 0 <= seed < 2^64 (default: 0)")
    parser.add_argument("--fill", default="mean", help="occluder colour: mean (default), grey or a grey level 0-255")
    finish_parser(parser, run)


def _image_sizes(files: Sequence[Path]) -> List[Tuple[int, int]]:
    from PIL import Image

    sizes = []
    for path in files:
        with Image.open(path) as image:
            sizes.append(image.size)
    return sizes


def check_sign_memory(extractor: diagnostics_common.FeatureExtractor, sample: torch.Tensor, layers: Sequence[str],
                      images: int, groups: int) -> None:
    """Refuse, naming --trials, a table whose sign patterns ``(groups, images, features)`` would
    take more than :data:`SIGN_BYTES`; the features per layer come from one forward of ``sample``."""
    features = sum(t[0].numel() for t in extractor(sample, layers).values())
    needed = groups * images * features
    if needed > SIGN_BYTES:
        raise UsageError(f"--trials: {groups} occlusions (parts and trials) of {images} images at {', '.join(layers)} "
                         f"({features} features each) need {needed / 2**30:.1f} GiB of sign patterns; at most "
                         f"{SIGN_BYTES // 2**30} GiB ({SIGN_BYTES // (images * features)} occlusions) fit")


def render(path: Path, result: CorrespondenceResult) -> None:
    """Table 7 as a bar chart: a bar per row and layer with its ± error bar."""
    rows = list(result.parts) + (["Random"] if result.random else [])
    cells = [result.parts[name] for name in result.parts] + ([result.random] if result.random else [])
    fig = diagnostics_common.new_figure(max(6.0, 1.2 * len(rows) * len(result.layers) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(result.layers)
    for k, layer in enumerate(result.layers):
        xs = np.arange(len(rows)) + (k - (len(result.layers) - 1) / 2) * width
        ax.bar(xs, [c[layer].mean for c in cells], width, yerr=[c[layer].std for c in cells], capsize=3, label=layer)
    ax.set_xticks(np.arange(len(rows)), [diagnostics_common.plain(r) for r in rows])
    ax.set_ylabel("mean feature sign change\n(fraction of differing signs per pair)")
    ax.legend(title="layer")
    ax.set_title("Correspondence (Table 7): lower = more consistent across images")
    diagnostics_common.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """``zfk correspondence``; returns the exit status."""
    device = resolve_device(args.device)
    fill = diagnostics_common.fill_value(args.fill)
    if len(args.images) < 2:
        raise UsageError("--images: the analysis compares images: give at least two")
    preset = models.eval_transform(args.arch)  # the network's sizes
    files, crops = diagnostics_common.load_images(args.images, "--images", preset)
    parts = read_parts(Path(args.parts), files, _image_sizes(files), preset)
    model = load_model(args.arch, args.weights, args.seed, device)
    warn_untrained(args)
    paper = diagnostics_common.paper_layers(model)
    extractor = diagnostics_common.FeatureExtractor(model)
    layers = resolve_layers(args.layers, extractor.conv_layers + extractor.fc_layers,
                            list(dict.fromkeys([paper.layer5, paper.layer7])))
    check_sign_memory(extractor, data_mod.normalize(crops[:1]).to(device), layers, len(files), len(parts) + args.trials)
    out = prepare_out(Path(args.out))
    folder = diagnostics_common.subfolder(out, "correspondence")
    say(f"correspondence: {len(parts)} part(s) and {args.trials} random trial(s) over {len(files)} images", args.quiet)
    result = correspondence(model, data_mod.normalize(crops).to(device), parts, layers, trials=args.trials,
                            seed=args.trial_seed, fill=fill, batch_size=args.batch_size)
    render(folder / "table.png", result)
    document = {
        "command": "correspondence", "model": model_description(args), "layers": layers,
        "images": [str(f) for f in files], "crop": preset.crop, "fill": args.fill, "trials": args.trials, "trial_seed": args.trial_seed,
        "statistic": "Delta = sum over pairs i<j of Hamming(sign(eps_i), sign(eps_j)), eps = x - x_occluded; "
                     "mean = Delta / (pairs * D); a part's std is over pairs, Random's mean/std over trials",
        "parts": {name: {"boxes": parts[name], **{layer: vars(c) for layer, c in result.parts[name].items()}}
                  for name in parts},
        "random": None if result.random is None else {"boxes": result.boxes, **{layer: vars(c) for layer, c in result.random.items()}},
    }
    diagnostics_common.write_json(folder / "correspondence.json", document)
    rows = [{"name": name, "cells": [c[layer] for layer in layers]} for name, c in result.parts.items()]
    if result.random:
        rows.append({"name": "Random", "cells": [result.random[layer] for layer in layers]})
    first = result.parts[next(iter(parts))]
    diagnostics_common.write_page(out, "correspondence", model=model_header(args), images=[f.name for f in files],
                                  fill=args.fill, layers=layers, rows=rows, trials=args.trials,
                                  dimensions=[first[layer].dimension for layer in layers], pairs=math.comb(len(files), 2))
    say(f"correspondence -> {folder / 'index.html'}", args.quiet)
    return 0
