"""Filter comparison (Section 4.1, Figure 6): the layer-1 filters of a model, and of a second one
beside it (AlexNet's 11x11 stride-4 filters against ZFNet's 7x7 stride-2), plus the top
deconvnet projections of layer-2 feature maps over an image folder.

Each filter is shown normalised on its own: its weights (all three colour channels together)
mapped linearly so that its minimum is 0 and its maximum 1 (a constant filter is mid-grey).
"Layer 2" is the second conv layer (conv2; conv1_2 on VGG16).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import gallery
from ..cliutil import CliError, add_model_options, load_model, positive_int, prepare_out, resolve_device, say, untrained_warning
from ..models import ARCHITECTURES
from . import _common


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution (layer 1)."""
    for module in model.features.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError("the model has no convolution in .features")


def normalise_filters(weight: torch.Tensor) -> torch.Tensor:
    """``(C, 3, k, k)`` filters mapped to [0, 1] each on its own: ``(w - min) / (max - min)``
    over the filter's ``3 * k * k`` weights; a constant filter becomes 0.5."""
    flat = weight.detach().double().flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(1e-300), torch.full_like(flat, 0.5))
    return scaled.view(weight.shape).float()


def filter_grid(weight: torch.Tensor, columns: Optional[int] = None, gap: int = 1) -> np.ndarray:
    """The normalised RGB filters as one uint8 ``(H, W, 3)`` image: filter ``c`` at row
    ``c // columns``, column ``c % columns`` (default: ``ceil(sqrt(C))`` columns), ``gap``
    white pixels between filters."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"filter_grid: expected RGB filters (C, 3, k, k), got {tuple(weight.shape)}")
    columns = columns or gallery.grid_shape(weight.shape[0])[1]
    pixels = (normalise_filters(weight) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if pixels.shape[1] != pixels.shape[2]:  # non-square kernels: pad to square tiles
        side = max(pixels.shape[1:3])
        padded = np.full((pixels.shape[0], side, side, 3), 255, dtype=np.uint8)
        padded[:, :pixels.shape[1], :pixels.shape[2]] = pixels
        pixels = padded
    return gallery.tile_grid(pixels, columns, gap)


@dataclass
class ModelSpec:
    """A model to show: ``arch`` and ``weights`` (``None``: seeded random)."""

    arch: str
    weights: Optional[str]

    @property
    def label(self) -> str:
        return f"{self.arch} ({'untrained, seeded random' if self.weights is None else Path(self.weights).name})"


def parse_compare(text: str) -> ModelSpec:
    """``--compare ARCH[:WEIGHTS]`` (WEIGHTS a file or ``torchvision``)."""
    arch, _, weights = text.partition(":")
    if arch not in ARCHITECTURES:
        raise CliError(f"--compare: unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)} "
                       "(as ARCH or ARCH:WEIGHTS)")
    return ModelSpec(arch, weights or None)


def render_filters(path: Path, grids: List[Tuple[str, np.ndarray, nn.Conv2d]]) -> None:
    """Layer-1 filter grids side by side, each titled with its geometry."""
    fig = _common.new_figure(7.5 * len(grids), 7.0)
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (label, grid, conv) in zip(axes, grids):
        ax.imshow(grid, interpolation="nearest")
        k, s = conv.kernel_size, conv.stride
        ax.set_title(f"{_common.plain(label)}\nlayer 1: {conv.out_channels} filters {k[0]}x{k[1]}, stride {s[0]}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    _common.save_figure(fig, path)


def layer2_sheet(projections: np.ndarray, filled: np.ndarray, columns: int) -> np.ndarray:
    """``(F, K, T, T, 3)`` top-K projection tiles of F feature maps -> one image: each map's
    K tiles as a square grid, the maps' grids ``columns`` to a row."""
    per_map = gallery.grid_shape(projections.shape[1])[1]
    cells = [gallery.tile_grid(tiles, per_map, gap=1, filled=shown) for tiles, shown in zip(projections, filled)]
    return gallery.tile_grid(np.stack(cells), columns, gap=6)


# -- the command -------------------------------------------------------------------------------

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
    parser.add_argument("--top", type=positive_int, default=9, metavar="K", help="projections per feature map (default: 9)")
    _common.finish_parser(parser, run, batch_size=32)


def run(args: argparse.Namespace) -> int:
    """``zfk filters``; returns the exit status."""
    from ..visualize import resolve_features, resolve_images

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
        except CliError as error:
            raise CliError(f"--compare: {error}" if n else str(error)) from None
        if spec.weights is None:
            say(untrained_warning(spec.arch, args.seed))
        models.append(model)
    out = prepare_out(out_path)
    folder = _common.subfolder(out, "filters")
    convs = [first_conv(m) for m in models]
    grids = [(spec.label, filter_grid(conv.weight.cpu()), conv) for spec, conv in zip(specs, convs)]
    render_filters(folder / "layer1.png", grids)
    document: Dict[str, object] = {"command": "filters", "normalisation": "per filter: (w - min) / (max - min) over its 3*k*k weights",
                                   "models": []}
    sections = [_common.figure_html("layer1.png", "layer-1 filters")]
    for spec, model, conv in zip(specs, models, convs):
        flat = conv.weight.detach().flatten(1)
        entry: Dict[str, object] = {
            "arch": spec.arch, "weights": spec.weights, "seed": None if spec.weights else args.seed,
            "layer1": {"filters": conv.out_channels, "kernel": list(conv.kernel_size), "stride": list(conv.stride),
                       "padding": list(conv.padding), "min": flat.min(1).values, "max": flat.max(1).values},
        }
        if images is not None:
            layer2 = _common.paper_layers(model).layer2
            channels = resolve_features(model, [layer2], args.features)
            scan, projected = _common.top_projections(model, images, channels, args.top, device, batch_size=args.batch_size,
                                                      quiet=args.quiet, description=f"{spec.arch} {layer2}")
            tiles = projected.tiles[layer2]
            png = f"layer2-{len(document['models'])}-{spec.arch}.png"
            sheet = layer2_sheet(tiles.projections, tiles.filled, columns=4)
            fig = _common.new_figure(max(4.0, sheet.shape[1] / 80), max(3.0, sheet.shape[0] / 80 + 0.6))
            ax = fig.add_subplot()
            ax.imshow(sheet, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{_common.plain(spec.label)}: {layer2} maps {', '.join(map(str, channels[layer2].tolist()))}, top {args.top} each",
                         fontsize=9)
            _common.save_figure(fig, folder / png)
            top = scan.layers[layer2]
            entry["layer2"] = {"layer": layer2, "maps": [
                {"channel": c, "top": [{"image": images.files[i], "value": v, "y": y, "x": x} for i, v, y, x in top.entries(j)]}
                for j, c in enumerate(top.channels.tolist())]}
            sections.append(f"<h2>{gallery.text(spec.label)}: layer 2 ({gallery.text(layer2)})</h2>"
                            + _common.figure_html(png, f"{spec.arch} layer-2 projections"))
        document["models"].append(entry)
    _common.write_json(folder / "filters.json", document)
    header = "".join(f"<p class=\"warn\">{gallery.text(untrained_warning(s.arch, args.seed))}</p>" for s in specs if s.weights is None)
    body = (
        f"{header}\n<p>Models: {', '.join(gallery.text(s.label) for s in specs)}. Layer-1 filters, each normalised to "
        "[0, 1] on its own (its minimum black, its maximum white, over all three colour channels)."
        + ("" if images is None else f" Layer 2: the top {args.top} deconvnet projections (receptive fields, zero at "
           f"mid-grey) of each chosen feature map over {len(images.files)} images of {gallery.text(source)}.")
        + " The numbers: <a href=\"filters.json\">filters.json</a>.</p>\n" + "\n".join(sections))
    _common.write_page(out, "filters", body)
    say(f"filters -> {folder / 'index.html'}", args.quiet)
    return 0
