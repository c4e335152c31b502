"""Invariance (Section 4, Figure 5): how far the features of layer 1 and layer 7 move, and how
the probability of the true class changes, as an image is translated vertically, scaled and
rotated.

Transforms act on the image resized as for evaluation (short side 256; the network's own
sizes, :func:`zfkernels.models.eval_transform`: 342 for Inception v3), and the network sees the
usual 224x224 (299x299) centre window of the result; what comes from outside the resized image is the
ImageNet mean pixel (0 after normalisation). Exactly:

- ``translate d`` (pixels, whole numbers): the content moves down by ``d`` (up for ``d < 0``),
  i.e. the window is taken ``d`` rows higher; a pure copy, no resampling.
- ``scale s``: the content is magnified ``s`` times about the window's centre (``s < 1``
  shrinks it; bilinear, no antialiasing).
- ``rotate a`` (degrees): the content turns ``a`` degrees counter-clockwise about the window's
  centre (bilinear).

The identity (0, 1, 0) is the plain centre crop. The distance at a layer is
``||f(x) - f(T x)|| / ||f(x)||``: Euclidean, relative to the untransformed image's feature norm
(NaN when that norm is 0), with ``f`` the post-ReLU output: layer 1 = the first conv layer, layer 7
= fc7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..job import data as data_mod
from ..models import ZOO_TRANSFORM, EvalTransform, channels_last
from . import common

TRANSFORMS = ("translate", "scale", "rotate")
IDENTITY = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}
UNITS = {"translate": "vertical translation (pixels)", "scale": "scale", "rotate": "rotation (degrees)"}
DEFAULT_VALUES = {
    "translate": [float(d) for d in range(-60, 61, 10)],
    "scale": [round(1.0 + 0.1 * k, 10) for k in range(9)],  # 1.0 .. 1.8, as Figure 5
    "rotate": [float(a) for a in range(0, 360, 10)],
}


def resized(path: Path, transform: EvalTransform = ZOO_TRANSFORM) -> torch.Tensor:
    """The uint8 ``(3, h, w)`` image resized as for evaluation (short side ``transform.resize``,
    256 by default), before the crop."""
    from torchvision.transforms import functional as TF

    image = data_mod.decode(path)
    w, h = image.size
    if max(w, h) > data_mod.EXTREME_ASPECT * min(w, h):
        raise UsageError(f"{path}: an aspect ratio above {data_mod.EXTREME_ASPECT:g} is too elongated to transform")
    mode = TF.InterpolationMode(transform.interpolation)
    return data_mod.to_chw_uint8(TF.resize(image, transform.resize, interpolation=mode, antialias=True))


def window_origin(height: int, width: int, crop: int = data_mod.CROP) -> tuple:
    """``(top, left)`` of the centre crop, as torchvision's ``CenterCrop`` rounds it."""
    return data_mod.crop_origin(height, width, crop)


def transform_images(image: torch.Tensor, transform: str, values: Sequence[float], crop: int = data_mod.CROP) -> torch.Tensor:
    """``(V, 3, crop, crop)``: the centre window of ``image`` (normalised ``(3, h, w)``, the
    resized image) after each transform of the sweep (see the module's docstring)."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform_images: unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    _, height, width = image.shape
    if height < crop or width < crop:
        raise ValueError(f"transform_images: the image ({height}x{width}) is smaller than the {crop}x{crop} window")
    top, left = window_origin(height, width, crop)
    device = image.device
    out = image.new_zeros((len(values), 3, crop, crop))
    r = torch.arange(crop, device=device)
    for k, value in enumerate(values):
        value = float(value)
        if value == IDENTITY[transform]:
            out[k] = image[:, top:top + crop, left:left + crop]
        elif transform == "translate":
            if not value.is_integer():
                raise ValueError(f"transform_images: translations are whole pixels, got {value}")
            rows = top - int(value) + r
            inside = (rows >= 0) & (rows < height)
            picked = image[:, rows.clamp(0, height - 1), left:left + crop]
            out[k] = torch.where(inside[None, :, None], picked, torch.zeros((), dtype=image.dtype, device=device))
        else:
            out[k] = _resample(image, transform, value, top, left, crop)
    return out


def _resample(image: torch.Tensor, transform: str, value: float, top: int, left: int, crop: int) -> torch.Tensor:
    """One scaled or rotated window, by bilinear sampling at the source of each output pixel."""
    _, height, width = image.shape
    dtype = torch.float64
    centre_y, centre_x = top + crop / 2.0, left + crop / 2.0
    offsets = torch.arange(crop, dtype=dtype, device=image.device) + 0.5 - crop / 2.0
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    if transform == "scale":
        if value <= 0:
            raise ValueError(f"transform_images: scales must be positive, got {value}")
        sy, sx = dy / value, dx / value
    else:  # rotate: the source of an output pixel is that pixel turned clockwise on screen
        a = math.radians(value)
        sx = dx * math.cos(a) - dy * math.sin(a)
        sy = dx * math.sin(a) + dy * math.cos(a)
    grid = torch.stack([2 * (centre_x + sx) / width - 1, 2 * (centre_y + sy) / height - 1], dim=-1)
    sampled = F.grid_sample(image.unsqueeze(0).to(dtype), grid.unsqueeze(0), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled[0].to(image.dtype)


@dataclass
class InvarianceCurves:
    """One transform's sweep: ``distance[layer]`` and ``probability`` are ``(N, V)`` (images x
    values); ``raw_distance[layer]`` without the normalisation, ``norm[layer]`` ``(N,)``."""

    transform: str
    values: List[float]
    layers: List[str]
    distance: Dict[str, torch.Tensor]
    raw_distance: Dict[str, torch.Tensor]
    norm: Dict[str, torch.Tensor]
    probability: torch.Tensor


def invariance_curves(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[int],
    transform: str,
    values: Sequence[float],
    layers: Sequence[str],
    *,
    batch_size: int = 64,
    crop: int = data_mod.CROP,
    progress=None,
) -> InvarianceCurves:
    """The curves of Figure 5 for each normalised resized image ``(3, h, w)`` (on the model's
    device) and its true class: every transformed copy's ``crop`` x ``crop`` window goes through
    the network, ``batch_size`` at a time."""
    extractor = common.FeatureExtractor(model)
    extractor.check(layers)
    taps = list(layers) + ["logits"]
    distance = {layer: [] for layer in layers}
    raw = {layer: [] for layer in layers}
    norms = {layer: [] for layer in layers}
    probability = []
    with channels_last(model):  # once for every image: it rewrites each conv weight
        for image, target in zip(images, targets):
            # The untransformed image rides in the same batches as its copies (row 0).
            copies = transform_images(image, transform, [IDENTITY[transform]] + list(values), crop)
            every = common.forward_batched(extractor, copies, taps, batch_size)
            features = {name: value[1:] for name, value in every.items()}
            for layer in layers:
                f0 = every[layer][:1].flatten(1).double()
                d = (features[layer].flatten(1).double() - f0).norm(dim=1)
                n = f0.norm()
                raw[layer].append(d)
                norms[layer].append(n)
                distance[layer].append(d / n if n > 0 else torch.full_like(d, math.nan))
            logits = features["logits"].float()
            if not 0 <= target < logits.shape[1]:
                raise ValueError(f"invariance_curves: target class {target} is outside the model's {logits.shape[1]} classes")
            probability.append(torch.softmax(logits, dim=1)[:, target])
            if progress is not None:
                progress(len(values))
    return InvarianceCurves(transform, [float(v) for v in values], list(layers),
                            {k: torch.stack(v).cpu() for k, v in distance.items()},
                            {k: torch.stack(v).cpu() for k, v in raw.items()},
                            {k: torch.stack(v).cpu() for k, v in norms.items()},
                            torch.stack(probability).cpu())


# -- the figure and the command ----------------------------------------------------------------


def render(path: Path, curves: InvarianceCurves, example: torch.Tensor, names: Sequence[str],
           layer_titles: Sequence[str]) -> None:
    """Figure 5's row for one transform: examples of the first image, the two distance curves
    and the true-class probability, one curve per image."""
    shown = sorted(set(np.linspace(0, len(curves.values) - 1, min(5, len(curves.values))).round().astype(int).tolist()))
    fig = common.new_figure(20, 4.4)
    grid = fig.add_gridspec(1, 4, width_ratios=[1.3, 1, 1, 1])
    strip = fig.add_subfigure(grid[0]).subplots(1, len(shown))
    strip = np.atleast_1d(strip)
    pixels = data_mod.denormalize(example[shown])
    for ax, k, picture in zip(strip, shown, pixels):
        ax.imshow(common.to_hwc(picture))
        ax.set_title(f"{curves.values[k]:g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    panels = [fig.add_subplot(grid[c]) for c in (1, 2, 3)]
    series = [curves.distance[layer] for layer in curves.layers] + [curves.probability]
    titles = [f"(b) {layer_titles[0]}: ||f(x) - f(Tx)|| / ||f(x)||", f"(c) {layer_titles[1]}: ||f(x) - f(Tx)|| / ||f(x)||",
              "(d) p(true class)"]
    for ax, data, title in zip(panels, series, titles):
        for n, name in enumerate(names):
            ax.plot(curves.values, data[n].numpy(), marker=".", label=common.plain(name[:40]))
        ax.set_xlabel(UNITS[curves.transform])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    panels[2].set_ylim(bottom=0)
    panels[2].legend(fontsize=7, loc="best")
    common.save_figure(fig, path)
