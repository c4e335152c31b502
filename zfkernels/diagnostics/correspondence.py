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

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError
from ..job import data as data_mod
from ..job.console import check_files_exist
from ..models import ZOO_TRANSFORM, EvalTransform, channels_last
from . import common

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
    :class:`common.FeatureExtractor`'s). All occluded copies are evaluated ``batch_size`` at a
    time."""
    n, _, height, width = images.shape
    if n < 2:
        raise ValueError("correspondence: needs at least two images")
    fill = torch.zeros(3) if fill is None else fill
    extractor = common.FeatureExtractor(model)
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
        base = common.forward_batched(extractor, images, layers, batch_size)
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


def _occluded_signs(extractor: common.FeatureExtractor, images: torch.Tensor, base: Dict[str, torch.Tensor],
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
        features = extractor(common.occlude(images[index], boxes, fill), layers)
        for layer in layers:
            eps = (base[layer][index] - features[layer]).flatten(1)
            out[layer][group, index] = torch.sign(eps).to(torch.int8)  # (distinct (g, i) pairs)
    return out


# -- parts.json --------------------------------------------------------------------------------


def crop_box(box: Sequence[float], size: Tuple[int, int],
             transform: EvalTransform = ZOO_TRANSFORM) -> Tuple[int, int, int, int]:
    """A box ``(x0, y0, x1, y1)`` in pixels of an original image of ``size = (width, height)``
    -> the same region in its evaluation crop (``transform``: Resize(256) then CenterCrop(224)
    by default), rounded outwards and clipped to the crop. Raises ``ValueError`` when nothing of
    it is in the crop."""
    w, h = size
    crop = transform.crop
    ow, oh = data_mod.resized_size(w, h, transform.resize)
    top, left = data_mod.crop_origin(oh, ow, crop)
    sx, sy = ow / w, oh / h
    x0 = max(0, math.floor(box[0] * sx) - left)
    y0 = max(0, math.floor(box[1] * sy) - top)
    x1 = min(crop, math.ceil(box[2] * sx) - left)
    y1 = min(crop, math.ceil(box[3] * sy) - top)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the box lies outside the {crop}x{crop} centre crop")
    return x0, y0, x1, y1


# parts.json is {"parts": {PART: {IMAGE: [x0, y0, x1, y1]}}}: four levels deep, a box per part and
# image, numbers of a few digits. Bounds far above that keep a hostile file from exhausting memory,
# the parser's recursion or Python's integer conversion (which refuses over 4,300 digits).
MAX_PARTS_BYTES = 2**20
MAX_PARTS_DEPTH = 16
MAX_NUMBER_CHARS = 32


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``; brackets inside strings do
    not count. Linear and without recursion, so it can run before the parser does."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    codes = np.frombuffer(bare.encode("utf-8"), dtype=np.uint8)  # UTF-8 never hides an ASCII bracket
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _number(kind: type):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS}): {text[:20]}...")
        return kind(text)

    return parse


def _constant(name: str):
    raise ValueError(f"{name} is not a pixel coordinate")


def read_parts_json(path: Path, what: str) -> object:
    """The document in ``path``: a regular file (a named pipe is never opened) of at most
    :data:`MAX_PARTS_BYTES`, nested at most :data:`MAX_PARTS_DEPTH` deep, with numbers of at most
    :data:`MAX_NUMBER_CHARS` characters; anything else is a one-line :class:`UsageError`."""
    check_files_exist([str(path)], "--parts")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_PARTS_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{what}: not a readable JSON file ({error})") from None
    if len(raw) > MAX_PARTS_BYTES:
        raise UsageError(f"{what}: larger than {MAX_PARTS_BYTES // 2**20} MiB; a parts file holds a box per part and image")
    depth = json_depth(text)
    if depth > MAX_PARTS_DEPTH:
        raise UsageError(f"{what}: arrays and objects nested {depth} deep (at most {MAX_PARTS_DEPTH}; the format is 4 deep)")
    try:
        return json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except json.JSONDecodeError as error:
        raise UsageError(f"{what}: not a readable JSON file ({error})") from None
    except ValueError as error:  # from the number hooks
        raise UsageError(f"{what}: {error}") from None


def read_parts(path: Path, files: Sequence[Path], sizes: Sequence[Tuple[int, int]],
               transform: EvalTransform = ZOO_TRANSFORM) -> Dict[str, torch.Tensor]:
    """``parts.json`` -> ``{part: (N, 4) int64 boxes in crop pixels}``, one box per image of
    ``files`` (in that order); ``sizes`` are the original ``(width, height)``, ``transform`` the
    network's evaluation transform (the crop the boxes live in). Every mistake is a
    :class:`UsageError` naming the part and the image."""
    what = f"--parts {path}"
    document = read_parts_json(Path(path), what)
    if not isinstance(document, dict) or not isinstance(document.get("parts"), dict) or not document["parts"]:
        raise UsageError(f"{what}: expected {{\"parts\": {{PART: {{IMAGE: [x0, y0, x1, y1], ...}}, ...}}}}")
    coordinates = document.get("coordinates", "crop")
    if coordinates not in COORDINATES:
        raise UsageError(f"{what}: \"coordinates\" must be one of {', '.join(COORDINATES)}, got {coordinates!r}")
    names = [f.name for f in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"--images: two images are both named {duplicates[0]!r}; parts.json tells images apart by file name")
    out: Dict[str, torch.Tensor] = {}
    for part, boxes in document["parts"].items():
        if not isinstance(boxes, dict):
            raise UsageError(f"{what}: part {part!r} must map image file names to boxes [x0, y0, x1, y1]")
        unknown = sorted(set(boxes) - set(names))
        if unknown:
            raise UsageError(f"{what}: part {part!r} has a box for {unknown[0]!r}, which is not among --images")
        rows = []
        for name, (width, height) in zip(names, sizes):
            if name not in boxes:
                raise UsageError(f"{what}: part {part!r} has no box for image {name!r}")
            box = boxes[name]
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise UsageError(f"{what}: part {part!r}, image {name!r}: a box is [x0, y0, x1, y1] (4 numbers), got {box!r}")
            x0, y0, x1, y1 = box
            limit_w, limit_h = (transform.crop, transform.crop) if coordinates == "crop" else (width, height)
            if not (0 <= x0 < x1 <= limit_w and 0 <= y0 < y1 <= limit_h):
                raise UsageError(f"{what}: part {part!r}, image {name!r}: box {box} is not inside the "
                               f"{limit_w}x{limit_h} {'evaluation crop' if coordinates == 'crop' else 'image'} "
                               f"(need 0 <= x0 < x1 <= {limit_w}, 0 <= y0 < y1 <= {limit_h})")
            if coordinates == "original":
                try:
                    rows.append(crop_box(box, (width, height), transform))
                except ValueError as error:
                    raise UsageError(f"{what}: part {part!r}, image {name!r}: {error}") from None
            else:
                if not all(float(v).is_integer() for v in box):
                    raise UsageError(f"{what}: part {part!r}, image {name!r}: crop boxes are whole pixels, got {box}")
                rows.append(tuple(int(v) for v in box))
        out[part] = torch.tensor(rows, dtype=torch.int64)
    return out
