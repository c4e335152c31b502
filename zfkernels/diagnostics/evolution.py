"""Feature evolution during training (Figure 4): for chosen feature maps, the strongest activation
across a dataset at each of several checkpoints, projected to pixels by the deconvnet, as a
montage with a row per feature map and a column per checkpoint.

Each checkpoint is the main job at ``top = 1``: pass 1 (:func:`zfkernels.scan.run_scan`) finds
the single strongest activation of every chosen map over the images, pass 2
(:func:`zfkernels.patches.project_selections`) projects it and crops its receptive field from
the projection and from the image (the tiles of the ``zfk visualize`` gallery).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import data as data_mod
from .. import gallery
from ..cliutil import CliError, add_device_option, load_model, positive_int, prepare_out, resolve_device, say
from ..models import ARCHITECTURES
from . import _common

Entry = Optional[Tuple[int, float, int, int]]  # (image index, value, y, x); None: no image


@dataclass
class EvolutionResult:
    """Per layer: ``projections`` and ``patches`` uint8 ``(F, K, T, T, 3)`` (feature maps x
    checkpoints), ``filled`` ``(F, K)``, and ``entries[layer][f][k]`` the selected activation."""

    channels: Dict[str, List[int]]
    projections: Dict[str, np.ndarray]
    patches: Dict[str, np.ndarray]
    filled: Dict[str, np.ndarray]
    entries: Dict[str, List[List[Entry]]]


def feature_evolution(
    models: Iterable[nn.Module],
    images: data_mod.ImageList,
    channels: Dict[str, torch.Tensor],
    device: torch.device,
    *,
    batch_size: int = 32,
    quiet: bool = True,
) -> EvolutionResult:
    """Figure 4 for ``models`` (the checkpoints, in order; a generator loads them one at a time)
    and the feature maps ``channels`` (``{layer: int64 indices}``) over ``images``."""
    columns: List[Tuple[object, object]] = []
    for k, model in enumerate(models):
        scan, projected = _common.top_projections(model, images, channels, 1, device, batch_size=batch_size, quiet=quiet,
                                                  description=f"checkpoint {k + 1}")
        columns.append((scan, projected))
    if not columns:
        raise ValueError("feature_evolution: no checkpoints")
    result = EvolutionResult({name: c.tolist() for name, c in channels.items()}, {}, {}, {}, {})
    for layer in channels:
        result.projections[layer] = np.stack([p.tiles[layer].projections[:, 0] for _, p in columns], axis=1)
        result.patches[layer] = np.stack([p.tiles[layer].patches[:, 0] for _, p in columns], axis=1)
        result.filled[layer] = np.stack([p.tiles[layer].filled[:, 0] for _, p in columns], axis=1)
        result.entries[layer] = [
            [(s.layers[layer].entries(j) or [None])[0] for s, _ in columns] for j in range(len(channels[layer]))
        ]
    return result


def montage(tiles: np.ndarray, filled: np.ndarray, gap: int = 4) -> np.ndarray:
    """``(F, K, T, T, 3)`` tiles -> one image, row ``f`` and column ``k`` holding tile
    ``[f, k]`` (white where nothing was found)."""
    rows, cols = tiles.shape[:2]
    return gallery.tile_grid(tiles.reshape((rows * cols,) + tiles.shape[2:]), cols, gap, filled=filled.reshape(-1))


def render(path: Path, sheet: np.ndarray, tile: int, gap: int, row_labels: Sequence[str], column_labels: Sequence[str],
           title: str) -> None:
    """The montage with its feature maps (rows) and checkpoints (columns) labelled."""
    height, width = sheet.shape[:2]
    fig = _common.new_figure(max(4.0, width / 60 + 2), max(3.0, height / 60 + 1.5))
    ax = fig.add_subplot()
    ax.imshow(sheet, interpolation="nearest")
    ax.set_xticks([c * (tile + gap) + tile / 2 for c in range(len(column_labels))], column_labels, rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks([r * (tile + gap) + tile / 2 for r in range(len(row_labels))], row_labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    _common.save_figure(fig, path)


# -- the command -------------------------------------------------------------------------------

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
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), default="zfnet", help="architecture (default: zfnet)")
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder, searched recursively")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images")
    parser.add_argument("--layers", metavar="LIST", help="comma-separated conv layers (default: every conv layer)")
    parser.add_argument("--features", default="0-7", metavar="LIST",
                        help="feature maps of each layer: numbers and ranges, e.g. 0-7,40 (default: 0-7)")
    add_device_option(parser)
    _common.finish_parser(parser, run, batch_size=32)


def load_checkpoints(arch: str, paths: Sequence[str], device: torch.device) -> Iterable[nn.Module]:
    """The checkpoints as models, one at a time; a file that does not fit ``arch`` is a
    :class:`CliError` naming it (every file is checked before the first scan)."""
    files = _common.check_files_exist(paths, "--checkpoints")
    for path in files:  # fail before any work: load each once on the CPU
        _load(arch, path, torch.device("cpu"))
    return (_load(arch, path, device) for path in files)


def _load(arch: str, path: Path, device: torch.device) -> nn.Module:
    try:
        return load_model(arch, str(path), 0, device)
    except CliError as error:
        raise CliError(f"--checkpoints {path}: {error}") from None


def run(args: argparse.Namespace) -> int:
    """``zfk evolution``; returns the exit status."""
    from ..visualize import resolve_features, resolve_images, resolve_layers

    device = resolve_device(args.device)
    out_path = Path(args.out)
    images, source = resolve_images(args.data, args.limit, out_path)
    reference = load_model(args.arch, None, 0, torch.device("cpu"))  # layer names and sizes only
    layers = resolve_layers(reference, args.layers)
    channels = resolve_features(reference, layers, args.features)
    del reference
    models = load_checkpoints(args.arch, args.checkpoints, device)
    out = prepare_out(out_path)
    folder = _common.subfolder(out, "evolution")
    say(f"evolution: {len(args.checkpoints)} checkpoint(s), {len(images.files)} images, layers {', '.join(layers)}", args.quiet)
    result = feature_evolution(models, images, channels, device, batch_size=args.batch_size, quiet=args.quiet)
    labels = [_common.plain(Path(p).name) for p in args.checkpoints]
    sections = []
    gap = 4
    for layer in layers:
        rows = [f"{layer} {c}" for c in result.channels[layer]]
        tile = result.projections[layer].shape[2]
        for kind, tiles in (("projections", result.projections[layer]), ("patches", result.patches[layer])):
            render(folder / f"{layer}-{kind}.png", montage(tiles, result.filled[layer], gap), tile, gap, rows, labels,
                   f"{layer}: strongest activation per checkpoint ({kind})")
        sections.append(
            f"<h2>{gallery.text(layer)}</h2>"
            + _common.figure_html(f"{layer}-projections.png", f"{layer} projections per checkpoint")
            + f"<p><a href=\"{gallery.href(layer + '-patches.png')}\">the image patches</a></p>")
    document = {
        "command": "evolution", "arch": args.arch, "checkpoints": list(args.checkpoints), "data": source,
        "images": len(images.files),
        "layers": {layer: [{"channel": c, "per_checkpoint": [
            None if e is None else {"image": images.files[e[0]], "value": e[1], "y": e[2], "x": e[3]}
            for e in result.entries[layer][j]]} for j, c in enumerate(result.channels[layer])] for layer in layers},
    }
    _common.write_json(folder / "evolution.json", document)
    body = (
        f"<table><tr><th>architecture</th><td>{gallery.text(args.arch)}</td></tr>"
        f"<tr><th>checkpoints (columns)</th><td>{'<br>'.join(gallery.text(p) for p in args.checkpoints)}</td></tr>"
        f"<tr><th>images</th><td>{gallery.text(source)}: {len(images.files)}</td></tr></table>\n"
        "<p>Each row a feature map, each column a checkpoint: the deconvnet projection of the map's strongest "
        "activation over all the images at that checkpoint (its receptive field; zero at mid-grey). "
        "The numbers: <a href=\"evolution.json\">evolution.json</a>.</p>\n" + "\n".join(sections))
    _common.write_page(out, "evolution", body)
    say(f"evolution -> {folder / 'index.html'}", args.quiet)
    return 0
