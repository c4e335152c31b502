"""``zfk filters``: the command line of :mod:`zfkernels.diagnostics.filters`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from .. import models as models_mod
from ..diagnostics import common as diagnostics_common
from ..diagnostics.filters import ModelSpec, filter_grid, first_conv, layer2_sheet, parse_compare, render_filters
from ..errors import UsageError
from ..job.console import say
from ..models import untrained_warning
from .common import add_model_options, finish_parser, int_in_range, load_model, positive_int, prepare_out, resolve_device

# Pass 1 keeps the top K of every layer-2 map on the device and the page shows K tiles a map: a
# figure's worth, not a whole dataset's.
MAX_TOP = 100
TOP = int_in_range(1, MAX_TOP, "projections a feature map's sheet shows")

DESCRIPTION = """\
Filter comparison (the paper's Section 4.1, Figure 6). Renders the layer-1 filters of --arch
(each normalised to [0, 1] on its own) and, with --compare ARCH[:WEIGHTS], those of a second model
beside them (e.g. --arch zfnet --compare alexnet:torchvision: 7x7/2 against 11x11/4). With --data,
also the top --top deconvnet projections of layer-2 feature maps (--features) of each model over
the images (the main job's pass 1 and pass 2). Writes --out/filters/: PNGs, filters.json and
index.html.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``filters`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("filters", help="layer-1 filters, two models side by side, layer-2 projections (Figure 6)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--compare", metavar="ARCH[:WEIGHTS]",
                        help="a second model beside the first: an architecture, optionally with a weights file or "
                             "'torchvision' (without: seeded random with --seed)")
    parser.add_argument("--data", metavar="DIR", help="image folder for the layer-2 projections (without it: filters only)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images of --data")
    parser.add_argument("--features", default="0-15", metavar="LIST",
                        help="layer-2 feature maps to show: numbers and ranges (default: 0-15)")
    parser.add_argument("--top", type=TOP, default=9, metavar="K",
                        help=f"projections per feature map, at most {MAX_TOP} (default: 9)")
    finish_parser(parser, run, batch_size=32)


def run(args: argparse.Namespace) -> int:
    """``zfk filters``; returns the exit status."""
    from .visualize import resolve_features, resolve_images

    device = resolve_device(args.device)
    specs = [ModelSpec(args.arch, args.weights)]
    if args.compare:
        specs.append(parse_compare(args.compare))
    out_path = Path(args.out)
    images = None
    if args.data is not None:
        images, source = resolve_images(args.data, args.limit, out_path)
    models = []
    for n, spec in enumerate(specs):
        try:
            model = load_model(spec.arch, spec.weights, args.seed, device)
        except UsageError as error:
            raise UsageError(f"--compare: {str(error).removeprefix('--arch: ')}" if n else str(error)) from None
        if spec.weights is None:
            say(untrained_warning(spec.arch, args.seed))
        models.append(model)
    out = prepare_out(out_path)
    folder = diagnostics_common.subfolder(out, "filters")
    convs = [first_conv(m) for m in models]
    grids = [(spec.label, filter_grid(conv.weight.cpu()), conv) for spec, conv in zip(specs, convs)]
    render_filters(folder / "layer1.png", grids)
    document: Dict[str, object] = {"command": "filters", "normalisation": "per filter: (w - min) / (max - min) over its 3*k*k weights",
                                   "models": []}
    sections = []  # the page's layer-2 sheets
    for spec, model, conv in zip(specs, models, convs):
        flat = conv.weight.detach().flatten(1)
        entry: Dict[str, object] = {
            "arch": spec.arch, "weights": spec.weights, "seed": None if spec.weights else args.seed,
            "layer1": {"filters": conv.out_channels, "kernel": list(conv.kernel_size), "stride": list(conv.stride),
                       "padding": list(conv.padding), "min": flat.min(1).values, "max": flat.max(1).values},
        }
        if images is not None:
            layer2 = diagnostics_common.paper_layers(model).layer2
            channels = resolve_features(model, [layer2], args.features)
            seen = images.seen_as(models_mod.eval_transform(spec.arch))  # each network's own input size
            scan, projected = diagnostics_common.top_projections(model, seen, channels, args.top, device, batch_size=args.batch_size,
                                                      quiet=args.quiet, description=f"{spec.arch} {layer2}")
            tiles = projected.tiles[layer2]
            png = f"layer2-{len(document['models'])}-{spec.arch}.png"
            sheet = layer2_sheet(tiles.projections, tiles.filled, columns=4)
            fig = diagnostics_common.new_figure(max(4.0, sheet.shape[1] / 80), max(3.0, sheet.shape[0] / 80 + 0.6))
            ax = fig.add_subplot()
            ax.imshow(sheet, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{diagnostics_common.plain(spec.label)}: {layer2} maps {', '.join(map(str, channels[layer2].tolist()))}, top {args.top} each",
                         fontsize=9)
            diagnostics_common.save_figure(fig, folder / png)
            top = scan.layers[layer2]
            entry["layer2"] = {"layer": layer2, "maps": [
                {"channel": c, "top": [{"image": images.files[i], "value": v, "y": y, "x": x} for i, v, y, x in top.entries(j)]}
                for j, c in enumerate(top.channels.tolist())]}
            sections.append({"heading": f"{spec.label}: layer 2 ({layer2})", "figure": png,
                             "alt": f"{spec.arch} layer-2 projections"})
        document["models"].append(entry)
    diagnostics_common.write_json(folder / "filters.json", document)
    diagnostics_common.write_page(
        out, "filters", warnings=[untrained_warning(s.arch, args.seed) for s in specs if s.weights is None],
        models=[s.label for s in specs], sections=sections,
        layer2=None if images is None else {"top": args.top, "images": len(images.files), "source": source})
    say(f"filters -> {folder / 'index.html'}", args.quiet)
    return 0
