"""``zfk occlusion``: the command line of :mod:`zfkernels.diagnostics.occlusion`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import torch

from .. import models
from ..diagnostics import common as diagnostics_common
from ..diagnostics.occlusion import grid_boxes, occlusion_grid, occlusion_maps, project_strongest, render, strongest_of
from ..errors import UsageError
from ..engine import unknown_layer_message
from ..job import data as data_mod
from ..job.console import progress_bar, say
from .common import (add_label_option, add_model_options, finish_parser, int_in_range, load_model, model_description,
                     model_header, prepare_out, resolve_device, warn_untrained)

# The square and its steps live on the network's evaluation crop (224x224; Inception v3's
# 299x299): a square of the crop's side already covers all of it, and a step of it leaves one
# position. The bound here is far above any network's crop (torchvision's largest is 518); each
# run checks its own network's (check_on_crop).
MAX_CROP = 1024
CROP_PIXELS = int_in_range(1, MAX_CROP, f"pixels of the network's crop, at most {MAX_CROP}x{MAX_CROP}")


def check_on_crop(option: str, value: int, crop: int) -> None:
    """``--size``/``--stride`` on the network's ``crop`` x ``crop`` window, or a one-line error."""
    if value > crop:
        raise UsageError(f"{option}: must be from 1 to {crop} (pixels of the {crop}x{crop} crop this network sees), "
                         f"got {value}")


DESCRIPTION = """\
Occlusion sensitivity (the paper's Section 4.2, Figure 7). A grey square of --size pixels slides
over each image's evaluation crop (224x224; 299x299 for Inception v3) in steps of --stride; every
occluded copy is evaluated (--batch-size at a time). Per image, as functions of the square's
position: (b) the total activation of the layer-5 feature map that holds the unoccluded image's
strongest activation, (c) that activation projected to pixels by the deconvnet, (d) the
probability of the true class (from the ImageNet synset in the file name, or --label), (e) the
most probable class. Writes
--out/occlusion/: a PNG per image, occlusion.json and index.html.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``occlusion`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("occlusion", help="occlusion sensitivity maps (Figure 7)", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(parser)
    parser.add_argument("--size", type=CROP_PIXELS, default=50, metavar="PIXELS",
                        help="side of the square, 1 to the crop's side (224; default: 50)")
    parser.add_argument("--stride", type=CROP_PIXELS, default=8, metavar="PIXELS",
                        help="step between positions, 1 to the crop's side (default: 8: a 28x28 map on 224x224)")
    parser.add_argument("--fill", default="mean",
                        help="the square's colour: mean (the ImageNet mean pixel, 0 after normalisation; default), "
                             "grey (128) or a grey level 0-255")
    add_label_option(parser)
    parser.add_argument("--layer", metavar="NAME",
                        help="the layer whose strongest map is followed: a conv layer (conv5 …) or a node name "
                             "(layer4.1.relu_1 …) (default: the last conv layer, conv5; VGG16 conv5_3; the deepest "
                             "feature map elsewhere)")
    finish_parser(parser, run)


def run(args: argparse.Namespace) -> int:
    """``zfk occlusion``; returns the exit status."""
    device = resolve_device(args.device)
    fill = diagnostics_common.fill_value(args.fill)
    preset = models.eval_transform(args.arch)  # the network's sizes
    check_on_crop("--size", args.size, preset.crop)
    check_on_crop("--stride", args.stride, preset.crop)
    paths, crops = diagnostics_common.load_images(args.images, "IMAGE", preset)
    targets = diagnostics_common.true_classes(paths, args.label)
    model = load_model(args.arch, args.weights, args.seed, device)
    warn_untrained(args)
    extractor = diagnostics_common.FeatureExtractor(model)
    layer = args.layer or diagnostics_common.paper_layers(model).layer5
    if layer not in extractor.conv_layers:
        raise UsageError(f"--layer: {layer!r} is not a conv layer of {args.arch} "
                         f"({unknown_layer_message(layer, extractor.conv_layers)})")
    out = prepare_out(Path(args.out))
    folder = diagnostics_common.subfolder(out, "occlusion")
    images = data_mod.normalize(crops).to(device)
    rows, cols = occlusion_grid(images.shape[-2], images.shape[-1], args.size, args.stride)
    positions = rows.shape[0] * cols.shape[0]
    # The occluder at the centre cell, drawn on each image as the figure's example.
    centre = grid_boxes(rows, cols)[(rows.shape[0] // 2) * cols.shape[0] + cols.shape[0] // 2]
    entries: List[Dict[str, object]] = []
    shown: List[Dict[str, object]] = []  # what the page says of each image
    with progress_bar(positions * len(paths), "occlusion", "copy", args.quiet) as bar:
        for n, (path, image, target) in enumerate(zip(paths, images, targets)):
            unoccluded = extractor(image.unsqueeze(0), [layer, "logits"])  # one forward for both
            strongest = strongest_of(unoccluded[layer])
            maps = occlusion_maps(model, image, layer=layer, channel=strongest.channel, target=target, size=args.size,
                                  stride=args.stride, fill=fill, batch_size=args.batch_size, progress=bar.update)
            projection, field = project_strongest(model, image, layer, strongest)
            p = torch.softmax(unoccluded["logits"][0].float(), 0)
            png = f"image{n:03d}.png"
            example = data_mod.denormalize(diagnostics_common.occlude(image[None], centre[None], fill))[0].cpu()
            render(folder / png, example, path.name, maps, strongest, projection, field)
            entries.append({
                "image": str(path), "figure": png,
                "true_class": {"index": target, "synset": diagnostics_common.imagenet_synsets()[target], "name": diagnostics_common.class_name(target)},
                "unoccluded": {"p_true": float(p[target]), "top_class": int(p.argmax()), "top_name": diagnostics_common.class_name(int(p.argmax())),
                               "top_probability": float(p.max())},
                "strongest": {"layer": layer, "channel": strongest.channel, "value": strongest.value, "y": strongest.y,
                              "x": strongest.x, "total": strongest.total, "receptive_field": list(field)},
                "activation": maps.activation, "p_true": maps.probability, "top_class": maps.top_class,
                "top_probability": maps.top_probability,
            })
            shown.append({
                "name": path.name, "figure": png, "target": target, "target_name": diagnostics_common.class_name(target),
                "p_true": float(p[target]), "predicted": int(p.argmax()),
                "predicted_name": diagnostics_common.class_name(int(p.argmax())), "p_max": float(p.max()),
                "channel": strongest.channel, "value": strongest.value, "y": strongest.y, "x": strongest.x,
                "total": strongest.total,
            })
    document = {
        "command": "occlusion", "model": model_description(args),
        "size": args.size, "stride": args.stride, "fill": args.fill, "fill_normalised": fill, "layer": layer,
        "grid": {"rows": rows, "cols": cols,
                 "rule": f"cell (i, j) occludes rows[i] x cols[j] (half-open pixel ranges of the {preset.crop}x{preset.crop} crop); "
                         "centred on the stride block [i*stride, (i+1)*stride), clipped to the image"},
        "images": entries,
    }
    diagnostics_common.write_json(folder / "occlusion.json", document)
    diagnostics_common.write_page(out, "occlusion", model=model_header(args), size=args.size, fill=args.fill,
                                  grid=(rows.shape[0], cols.shape[0]), stride=args.stride, layer=layer, images=shown)
    say(f"occlusion: {len(paths)} image(s), {positions} positions each -> {folder / 'index.html'}", args.quiet)
    return 0
