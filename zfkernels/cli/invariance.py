"""``zfk invariance``: the command line of :mod:`zfkernels.diagnostics.invariance`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Tuple

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics.invariance import (DEFAULT_VALUES, TRANSFORMS, UNITS, InvarianceCurves, invariance_curves, render,
                                      resized, transform_images)
from ..errors import UsageError
from ..job import data as data_mod
from ..job.console import progress_bar, say
from .common import (add_label_option, add_model_options, finish_parser, load_model, model_description, model_header,
                     prepare_out, quoted, resolve_device, resolve_layers, warn_untrained)

DESCRIPTION = """\
Invariance (the paper's Section 4, Figure 5). Each image is translated vertically, scaled and
rotated (--transform picks which; --values overrides one sweep); for every transformed copy,
the relative Euclidean distance of its layer-1 (first conv) and layer-7 (fc7) features from the
original's, and the probability of the true class (the synset in the file name, or --label).
Writes --out/invariance/: a PNG per transform, invariance.json and index.html.
"""


# Every transformed copy of an image goes through the network at once and its layer-1 features
# are kept until the distances are taken: 13 MB a copy for VGG16's conv1_1 (1.3 GB at this bound).
MAX_VALUES = 100


def limits(transform: str, crop: int = data_mod.CROP) -> Tuple[float, float, str]:
    """How far a sweep of ``transform`` can usefully go on the network's ``crop`` x ``crop``
    window, and why (the message quotes it)."""
    if transform == "translate":
        return -crop, crop, f"a longer shift moves all of the {crop}x{crop} crop out of the window"
    if transform == "scale":
        return 1 / crop, crop, f"past {crop} one pixel fills the window, below 1/{crop} the crop shrinks under a pixel"
    return -360, 360, "degrees; past a full turn a smaller turn repeats"


def sweep_values(text: str, transform: str, crop: int = data_mod.CROP) -> List[float]:
    """``--values`` for ``transform``: at most :data:`MAX_VALUES` finite numbers inside its
    :func:`limits` on a ``crop`` x ``crop`` window (translations in whole pixels)."""
    parts = [v for v in text.split(",") if v.strip()]
    if len(parts) > MAX_VALUES:
        raise UsageError(f"--values: {len(parts)} values; at most {MAX_VALUES} (every transformed copy's features "
                         "are held in memory at once)")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise UsageError(f"--values: {quoted(text)} is not a comma-separated list of numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--values: {quoted(text)} is not a comma-separated list of finite numbers")
    if transform == "translate" and not all(v.is_integer() for v in values):
        raise UsageError("--values: translations are whole pixels")
    low, high, why = limits(transform, crop)
    outside = next((v for v in values if not low <= v <= high), None)
    if outside is not None:
        raise UsageError(f"--values: {outside:g} is outside {low:.4g}..{high:g} for {transform} ({why})")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``invariance`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("invariance", help="feature distances and class probability under transformations (Figure 5)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(parser)
    parser.add_argument("--transform", nargs="+", choices=TRANSFORMS, default=list(TRANSFORMS),
                        help="which sweeps (default: all three)")
    parser.add_argument("--values", metavar="LIST",
                        help="comma-separated sweep values for a single --transform, at most 100: translate whole "
                             "pixels -224..224, scale 1/224..224 (299 for Inception v3: the network's crop), "
                             "rotate -360..360 degrees (defaults: translate -60..60 "
                             "step 10 pixels, scale 1.0..1.8 step 0.1, rotate 0..350 step 10 degrees); a list that starts with a minus "
                             "needs the = form: --values=-30,0,30")
    parser.add_argument("--layers", metavar="A,B",
                        help="the two layers whose features are compared: conv layers (conv1 …), fc6/fc7 or node names "
                             "(default: the paper's layers 1 and 7: the first conv layer and fc7; on a network without "
                             "fc7, its deepest feature map)")
    add_label_option(parser)
    finish_parser(parser, run)


def run(args: argparse.Namespace) -> int:
    """``zfk invariance``; returns the exit status."""
    device = resolve_device(args.device)
    preset = models.eval_transform(args.arch)  # the network's sizes
    transforms = list(dict.fromkeys(args.transform))
    sweeps = {t: DEFAULT_VALUES[t] for t in transforms}
    if args.values is not None:
        if len(transforms) != 1:
            raise UsageError("--values: give exactly one --transform with it")
        sweeps[transforms[0]] = sweep_values(args.values, transforms[0], preset.crop)
    files = diagnostics_common.check_files_exist(args.images, "IMAGE")
    targets = diagnostics_common.true_classes(files, args.label)
    pictures = []
    for path in files:
        try:
            pictures.append(resized(path, preset))
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"IMAGE: cannot read {path} ({data_mod.describe_error(error)})") from None
    model = load_model(args.arch, args.weights, args.seed, device)
    warn_untrained(args)
    paper = diagnostics_common.paper_layers(model)
    extractor = diagnostics_common.FeatureExtractor(model)
    layers = resolve_layers(args.layers, extractor.conv_layers + extractor.fc_layers, [paper.layer1, paper.layer7])
    if len(layers) != 2:
        raise UsageError(f"--layers: give two layers (the figure compares two), got {', '.join(layers)}")
    titles = ([f"layer 1 ({layers[0]})", f"layer 7 ({layers[1]})"] if args.layers is None else list(layers))
    out = prepare_out(Path(args.out))
    folder = diagnostics_common.subfolder(out, "invariance")
    images = [data_mod.normalize(p.unsqueeze(0))[0].to(device) for p in pictures]
    names = [f.name for f in files]
    total = sum(len(v) for v in sweeps.values()) * len(files)
    results: Dict[str, InvarianceCurves] = {}
    with progress_bar(total, "invariance", "copy", args.quiet) as bar:
        for transform, values in sweeps.items():
            curves = invariance_curves(model, images, targets, transform, values, layers, batch_size=args.batch_size,
                                       crop=preset.crop, progress=bar.update)
            results[transform] = curves
            example = transform_images(images[0], transform, values, preset.crop).cpu()
            render(folder / f"{transform}.png", curves, example, names, titles)
    document = {
        "command": "invariance", "model": model_description(args), "layers": {"1": layers[0], "7": layers[1]},
        "resize": preset.resize, "crop": preset.crop,
        "images": [{"image": str(f), "true_class": t, "name": diagnostics_common.class_name(t)} for f, t in zip(files, targets)],
        "distance": "||f(x) - f(Tx)|| / ||f(x)|| (Euclidean, post-ReLU features; null when ||f(x)|| = 0)",
        "transforms": {t: {"values": c.values, "distance": c.distance, "raw_distance": c.raw_distance,
                           "feature_norm": c.norm, "p_true": c.probability} for t, c in results.items()},
    }
    diagnostics_common.write_json(folder / "invariance.json", document)
    diagnostics_common.write_page(
        out, "invariance", model=model_header(args), layers=layers, titles=titles, resize=preset.resize, crop=preset.crop,
        images=[{"name": n, "target": t, "target_name": diagnostics_common.class_name(t)} for n, t in zip(names, targets)],
        sections=[{"heading": UNITS[t], "figure": f"{t}.png", "alt": f"invariance to {t}"} for t in results])
    say(f"invariance: {len(files)} image(s), {', '.join(results)} -> {folder / 'index.html'}", args.quiet)
    return 0
