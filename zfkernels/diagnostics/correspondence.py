"""Correspondence analysis (Section 4.3, Table 7): does occluding the same object part in
different images change the features in the same way?

For a part ``p`` and images ``i = 1..N``: ``eps_i = x_i - x~_i``, the feature vector of image
``i`` at a layer minus that of the image with the part occluded. The statistic is

    Delta = sum over pairs i < j of H(sign(eps_i), sign(eps_j)),

``H`` the Hamming distance: the number of components whose signs differ, ``sign`` taking the
three values -1, 0 and +1 (a component that does not change, ``sign = 0``, is a value of its own:
it differs from -1 and from +1). We report ``Delta / (pairs * D)``, the mean fraction of the
``D`` components whose sign differs between two images (``pairs = N (N - 1) / 2``): that is the
scale of the paper's numbers. Low means consistent: the part is represented the same way.

``Random``: the same number of occlusions at random positions. Trial ``t`` occludes each image
``i`` with one box of image ``i``'s mean part size (rounded) at a uniformly random position
fully inside the crop (a seeded generator); each trial gives one Delta, and the row shows the
mean and standard deviation over trials. A part's row shows Delta's normalised value and the
standard deviation over the pairs ``i < j`` of ``H / D``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import data as data_mod
from .. import gallery
from ..cliutil import CliError, add_model_options, load_model, non_negative_int, prepare_out, resolve_device, say
from ..models import channels_last
from . import _common

COORDINATES = ("crop", "original")


# -- the statistic -----------------------------------------------------------------------------


def pairwise_hamming(signs: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` int64 Hamming distances between the rows of ``signs`` ``(N, D)`` (values -1, 0,
    +1): entry ``(i, j)`` counts the components where rows ``i`` and ``j`` differ. Computed as
    ``D`` minus the agreements, which are sums of one-hot products (exact in float64)."""
    if signs.dim() != 2:
        raise ValueError(f"pairwise_hamming: signs must be (N, D), got {tuple(signs.shape)}")
    agree = torch.zeros((signs.shape[0], signs.shape[0]), dtype=torch.float64, device=signs.device)
    for value in (-1, 0, 1):
        onehot = (signs == value).to(torch.float64)
        agree += onehot @ onehot.T
    return signs.shape[1] - agree.round().to(torch.int64)


@dataclass
class SignChange:
    """One cell of Table 7: ``mean`` ± ``std`` (normalised, see the module's docstring),
    ``delta`` the raw sum (for the random row: its mean over trials), ``dimension`` ``D``."""

    mean: float
    std: float
    delta: float
    dimension: int
    pairs: int
    values: List[float] = field(default_factory=list)  # per pair (a part) or per trial (random)


def sign_change(eps: torch.Tensor) -> SignChange:
    """Delta of ``eps`` ``(N, ...)`` (one row per image) with its normalisation and the
    standard deviation over pairs."""
    n = eps.shape[0]
    if n < 2:
        raise ValueError("sign_change: needs at least two images")
    signs = torch.sign(eps.reshape(n, -1))
    dimension = signs.shape[1]
    h = pairwise_hamming(signs)
    i, j = torch.triu_indices(n, n, offset=1)
    pairs = h[i, j]
    delta = int(pairs.sum())
    fractions = pairs.double() / dimension
    std = float(fractions.std()) if fractions.numel() > 1 else 0.0
    return SignChange(delta / (fractions.numel() * dimension), std, float(delta), dimension, fractions.numel(),
                      fractions.tolist())


def random_boxes(sizes: torch.Tensor, height: int, width: int, trials: int, generator: torch.Generator) -> torch.Tensor:
    """``(trials, N, 4)`` boxes ``(x0, y0, x1, y1)``: for each trial and image ``n`` a box of
    ``sizes[n] = (h, w)`` at a uniformly random position inside ``height x width``."""
    n = sizes.shape[0]
    h, w = sizes[:, 0], sizes[:, 1]
    if bool((h > height).any() or (w > width).any()):
        raise ValueError("random_boxes: a box is larger than the image")
    y0 = (torch.rand((trials, n), generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    x0 = (torch.rand((trials, n), generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=2)


@dataclass
class CorrespondenceResult:
    """Table 7: ``parts[part][layer]`` and ``random[layer]`` (``None`` without trials), with the
    random boxes used (``(trials, N, 4)``)."""

    layers: List[str]
    parts: Dict[str, Dict[str, SignChange]]
    random: Optional[Dict[str, SignChange]]
    boxes: torch.Tensor


def correspondence(
    model: nn.Module,
    images: torch.Tensor,
    parts: Dict[str, torch.Tensor],
    layers: Sequence[str],
    *,
    trials: int = 10,
    seed: int = 0,
    fill: Optional[torch.Tensor] = None,
    batch_size: int = 64,
) -> CorrespondenceResult:
    """Table 7 for normalised ``images`` ``(N, 3, H, W)`` (on the model's device) and
    ``parts`` ``{name: (N, 4) boxes (x0, y0, x1, y1)}``, at ``layers`` (names as
    :class:`_common.FeatureExtractor`'s). All occluded copies are evaluated ``batch_size`` at a
    time."""
    n, _, height, width = images.shape
    if n < 2:
        raise ValueError("correspondence: needs at least two images")
    fill = torch.zeros(3) if fill is None else fill
    extractor = _common.FeatureExtractor(model)
    extractor.check(layers)
    generator = torch.Generator().manual_seed(seed)
    if trials > 0:
        stacked = torch.stack([boxes for boxes in parts.values()])  # (P, N, 4)
        sizes = torch.stack([stacked[..., 3] - stacked[..., 1], stacked[..., 2] - stacked[..., 0]], -1).double().mean(0)
        sizes = (sizes + 0.5).floor().long()  # round half up
        trial_boxes = random_boxes(sizes, height, width, trials, generator)
    else:
        trial_boxes = torch.zeros((0, n, 4), dtype=torch.int64)
    groups = [boxes.to(torch.int64) for boxes in parts.values()] + list(trial_boxes)
    with channels_last(model):
        base = _common.forward_batched(extractor, images, layers, batch_size)
        signs = _occluded_signs(extractor, images, base, groups, layers, fill, batch_size)
    names = list(parts)
    table = {name: {layer: sign_change(signs[layer][g]) for layer in layers} for g, name in enumerate(names)}
    random = None
    if trials > 0:
        random = {}
        for layer in layers:
            per_trial = [sign_change(signs[layer][len(names) + t]) for t in range(trials)]
            means = torch.tensor([s.mean for s in per_trial], dtype=torch.float64)
            random[layer] = SignChange(float(means.mean()), float(means.std()) if trials > 1 else 0.0,
                                       float(np.mean([s.delta for s in per_trial])), per_trial[0].dimension,
                                       per_trial[0].pairs, means.tolist())
    return CorrespondenceResult(list(layers), table, random, trial_boxes)


def _occluded_signs(extractor: _common.FeatureExtractor, images: torch.Tensor, base: Dict[str, torch.Tensor],
                    groups: Sequence[torch.Tensor], layers: Sequence[str], fill: torch.Tensor,
                    batch_size: int) -> Dict[str, torch.Tensor]:
    """``{layer: (G, N, D) int8}`` signs of ``x - x~`` for each group of boxes (one box per
    image), the occluded copies of all groups going through the network together in batches."""
    n = images.shape[0]
    copies = [(g, i) for g in range(len(groups)) for i in range(n)]
    out = {layer: torch.empty((len(groups), n, base[layer][0].numel()), dtype=torch.int8, device=images.device)
           for layer in layers}
    for start in range(0, len(copies), batch_size):
        chunk = copies[start:start + batch_size]
        group = torch.tensor([g for g, _ in chunk], device=images.device)
        index = torch.tensor([i for _, i in chunk], device=images.device)
        boxes = torch.stack([groups[g][i] for g, i in chunk]).to(images.device)
        features = extractor(_common.occlude(images[index], boxes, fill), layers)
        for layer in layers:
            eps = (base[layer][index] - features[layer]).flatten(1)
            out[layer][group, index] = torch.sign(eps).to(torch.int8)  # (distinct (g, i) pairs)
    return out


# -- parts.json --------------------------------------------------------------------------------


def crop_box(box: Sequence[float], size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """A box ``(x0, y0, x1, y1)`` in pixels of an original image of ``size = (width, height)``
    -> the same region in its 224x224 evaluation crop (Resize(256) then CenterCrop(224)),
    rounded outwards and clipped to the crop. Raises ``ValueError`` when nothing of it is in
    the crop."""
    w, h = size
    ow, oh = data_mod.resized_size(w, h)
    top, left = data_mod.crop_origin(oh, ow)
    sx, sy = ow / w, oh / h
    x0 = max(0, math.floor(box[0] * sx) - left)
    y0 = max(0, math.floor(box[1] * sy) - top)
    x1 = min(data_mod.CROP, math.ceil(box[2] * sx) - left)
    y1 = min(data_mod.CROP, math.ceil(box[3] * sy) - top)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the box lies outside the 224x224 centre crop")
    return x0, y0, x1, y1


def read_parts(path: Path, files: Sequence[Path], sizes: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """``parts.json`` -> ``{part: (N, 4) int64 boxes in crop pixels}``, one box per image of
    ``files`` (in that order); ``sizes`` are the original ``(width, height)``. Every mistake is
    a :class:`CliError` naming the part and the image."""
    what = f"--parts {path}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CliError(f"{what}: not a readable JSON file ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("parts"), dict) or not document["parts"]:
        raise CliError(f"{what}: expected {{\"parts\": {{PART: {{IMAGE: [x0, y0, x1, y1], ...}}, ...}}}}")
    coordinates = document.get("coordinates", "crop")
    if coordinates not in COORDINATES:
        raise CliError(f"{what}: \"coordinates\" must be one of {', '.join(COORDINATES)}, got {coordinates!r}")
    names = [f.name for f in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CliError(f"--images: two images are both named {duplicates[0]!r}; parts.json tells images apart by file name")
    out: Dict[str, torch.Tensor] = {}
    for part, boxes in document["parts"].items():
        if not isinstance(boxes, dict):
            raise CliError(f"{what}: part {part!r} must map image file names to boxes [x0, y0, x1, y1]")
        unknown = sorted(set(boxes) - set(names))
        if unknown:
            raise CliError(f"{what}: part {part!r} has a box for {unknown[0]!r}, which is not among --images")
        rows = []
        for name, (width, height) in zip(names, sizes):
            if name not in boxes:
                raise CliError(f"{what}: part {part!r} has no box for image {name!r}")
            box = boxes[name]
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise CliError(f"{what}: part {part!r}, image {name!r}: a box is [x0, y0, x1, y1] (4 numbers), got {box!r}")
            x0, y0, x1, y1 = box
            limit_w, limit_h = (data_mod.CROP, data_mod.CROP) if coordinates == "crop" else (width, height)
            if not (0 <= x0 < x1 <= limit_w and 0 <= y0 < y1 <= limit_h):
                raise CliError(f"{what}: part {part!r}, image {name!r}: box {box} is not inside the "
                               f"{limit_w}x{limit_h} {'evaluation crop' if coordinates == 'crop' else 'image'} "
                               f"(need 0 <= x0 < x1 <= {limit_w}, 0 <= y0 < y1 <= {limit_h})")
            if coordinates == "original":
                try:
                    rows.append(crop_box(box, (width, height)))
                except ValueError as error:
                    raise CliError(f"{what}: part {part!r}, image {name!r}: {error}") from None
            else:
                if not all(float(v).is_integer() for v in box):
                    raise CliError(f"{what}: part {part!r}, image {name!r}: crop boxes are whole pixels, got {box}")
                rows.append(tuple(int(v) for v in box))
        out[part] = torch.tensor(rows, dtype=torch.int64)
    return out


# -- the command -------------------------------------------------------------------------------

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
default in the 224x224 evaluation crop (Resize(256) + CenterCrop(224)) the network sees.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``correspondence`` to ``zfk``'s sub-commands."""
    parser = subparsers.add_parser("correspondence", help="correspondence of object parts across images (Table 7)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="two or more image files")
    parser.add_argument("--parts", required=True, metavar="JSON", help="the part boxes (format above)")
    add_model_options(parser)
    parser.add_argument("--layers", metavar="LIST",
                        help="comma-separated layers: conv layers (conv5, conv5_3 …) or fc6/fc7 "
                             "(default: the paper's layers 5 and 7: the last conv layer and fc7)")
    parser.add_argument("--trials", type=non_negative_int, default=10, metavar="N",
                        help="random occlusions to compare with (default: 10; 0: none)")
    parser.add_argument("--trial-seed", type=int, default=0, metavar="SEED",
                        help="seed of the random occlusions (default: 0)")
    parser.add_argument("--fill", default="mean", help="occluder colour: mean (default), grey or a grey level 0-255")
    _common.finish_parser(parser, run)


def _image_sizes(files: Sequence[Path]) -> List[Tuple[int, int]]:
    from PIL import Image

    sizes = []
    for path in files:
        with Image.open(path) as image:
            sizes.append(image.size)
    return sizes


def _cell(change: SignChange) -> str:
    return f"{change.mean:.4f} ± {change.std:.4f}"


def render(path: Path, result: CorrespondenceResult) -> None:
    """Table 7 as a bar chart: a bar per row and layer with its ± error bar."""
    rows = list(result.parts) + (["Random"] if result.random else [])
    cells = [result.parts[name] for name in result.parts] + ([result.random] if result.random else [])
    fig = _common.new_figure(max(6.0, 1.2 * len(rows) * len(result.layers) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(result.layers)
    for k, layer in enumerate(result.layers):
        xs = np.arange(len(rows)) + (k - (len(result.layers) - 1) / 2) * width
        ax.bar(xs, [c[layer].mean for c in cells], width, yerr=[c[layer].std for c in cells], capsize=3, label=layer)
    ax.set_xticks(np.arange(len(rows)), [_common.plain(r) for r in rows])
    ax.set_ylabel("mean feature sign change\n(fraction of differing signs per pair)")
    ax.legend(title="layer")
    ax.set_title("Correspondence (Table 7): lower = more consistent across images")
    _common.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """``zfk correspondence``; returns the exit status."""
    device = resolve_device(args.device)
    fill = _common.fill_value(args.fill)
    if len(args.images) < 2:
        raise CliError("--images: the analysis compares images: give at least two")
    files, crops = _common.load_images(args.images, "--images")
    parts = read_parts(Path(args.parts), files, _image_sizes(files))
    model = load_model(args.arch, args.weights, args.seed, device)
    _common.warn_untrained(args)
    paper = _common.paper_layers(model)
    layers = [paper.layer5, paper.layer7] if args.layers is None else [p.strip() for p in args.layers.split(",") if p.strip()]
    extractor = _common.FeatureExtractor(model)
    usable = extractor.conv_layers + extractor.fc_layers
    bad = [name for name in layers if name not in usable]
    if not layers or bad:
        raise CliError(f"--layers: unknown layer {bad[0] if bad else args.layers!r}; choose from {', '.join(usable)}")
    out = prepare_out(Path(args.out))
    folder = _common.subfolder(out, "correspondence")
    say(f"correspondence: {len(parts)} part(s) and {args.trials} random trial(s) over {len(files)} images", args.quiet)
    result = correspondence(model, data_mod.normalize(crops).to(device), parts, layers, trials=args.trials,
                            seed=args.trial_seed, fill=fill, batch_size=args.batch_size)
    render(folder / "table.png", result)
    document = {
        "command": "correspondence", "model": _common.model_description(args), "layers": layers,
        "images": [str(f) for f in files], "fill": args.fill, "trials": args.trials, "trial_seed": args.trial_seed,
        "statistic": "Delta = sum over pairs i<j of Hamming(sign(eps_i), sign(eps_j)), eps = x - x_occluded; "
                     "mean = Delta / (pairs * D); a part's std is over pairs, Random's mean/std over trials",
        "parts": {name: {"boxes": parts[name], **{layer: vars(c) for layer, c in result.parts[name].items()}}
                  for name in parts},
        "random": None if result.random is None else {"boxes": result.boxes, **{layer: vars(c) for layer, c in result.random.items()}},
    }
    _common.write_json(folder / "correspondence.json", document)
    header = "".join(f"<th>{gallery.text(layer)}</th>" for layer in layers)
    rows = [f"<tr><td>{gallery.text(name)}</td>" + "".join(f"<td>{_cell(c[layer])}</td>" for layer in layers) + "</tr>"
            for name, c in result.parts.items()]
    if result.random:
        rows.append("<tr><td>Random</td>" + "".join(f"<td>{_cell(result.random[layer])}</td>" for layer in layers) + "</tr>")
    dims = ", ".join(f"{gallery.text(layer)}: D = {result.parts[next(iter(parts))][layer].dimension}" for layer in layers)
    body = (
        f"{_common.model_header(args)}\n"
        f"<p>{len(files)} images: {', '.join(gallery.text(f.name) for f in files)}. Occluder fill: {gallery.text(args.fill)}.</p>\n"
        f"<table><tr><th rowspan=\"2\">Occlusion location</th><th colspan=\"{len(layers)}\">Mean feature sign change</th></tr>"
        f"<tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>\n"
        f"<p>Each cell: Δ / (pairs · D), the mean fraction of the D feature components whose sign of change "
        f"x − x̃ differs between two images ({dims}; {math.comb(len(files), 2)} pairs; sign 0 counts as its own value). "
        f"Parts: ± the standard deviation over pairs. Random: {args.trials} trials of one random box per image "
        f"(each image's mean part size), mean ± standard deviation over trials. "
        f"The numbers: <a href=\"correspondence.json\">correspondence.json</a>.</p>\n"
        + _common.figure_html("table.png", "correspondence table as a bar chart"))
    _common.write_page(out, "correspondence", body)
    say(f"correspondence -> {folder / 'index.html'}", args.quiet)
    return 0
