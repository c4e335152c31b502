"""Occlusion sensitivity (Section 4.2, Figure 7): a grey square slid over the image; for every
position of the square, the total activation of the image's strongest layer-5 feature map, the
probability of the true class and the most probable class. All occluded copies of an image go
through the network in batches on the device.

The grid. With an image of ``H x W``, stride ``s`` and a square of side ``k``, the map has
``ceil(H / s) x ceil(W / s)`` cells; cell ``(i, j)`` is the square centred on the stride block
``[i*s, (i+1)*s) x [j*s, (j+1)*s)``: rows ``[i*s + s//2 - k//2, i*s + s//2 - k//2 + k)``, columns
likewise, clipped to the image. So the map, enlarged ``s`` times, lies exactly over the image
and every pixel is covered by some square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..engine import Deconvnet
from ..job.topk import ranked, spatial_max
from ..models import channels_last
from . import common


def occlusion_grid(height: int, width: int, size: int, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The occluder's extents: ``rows`` ``(R, 2)`` and ``cols`` ``(C, 2)`` of half-open
    ``[start, stop)`` pixel ranges, ``R = ceil(height / stride)``, ``C = ceil(width / stride)``
    (see the module's docstring). Cell ``(i, j)`` occludes ``rows[i] x cols[j]``."""
    if size < 1 or stride < 1:
        raise ValueError(f"occlusion_grid: size and stride must be positive, got size={size}, stride={stride}")

    def extents(n: int) -> torch.Tensor:
        starts = torch.arange(0, n, stride) + stride // 2 - size // 2
        return torch.stack([starts.clamp(0, n), (starts + size).clamp(0, n)], dim=1)

    return extents(height), extents(width)


def grid_boxes(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(R*C, 4)`` boxes ``(x0, y0, x1, y1)`` of every cell, row by row."""
    r, c = rows.shape[0], cols.shape[0]
    ys = rows.repeat_interleave(c, dim=0)
    xs = cols.repeat(r, 1)
    return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)


@dataclass
class OcclusionMaps:
    """One image's maps over the occluder positions (``(R, C)`` each): ``activation`` (total of
    feature map ``channel`` of ``layer``), ``probability`` (softmax probability of ``target``),
    ``top_class`` and ``top_probability`` (the most probable class and its probability)."""

    rows: torch.Tensor
    cols: torch.Tensor
    layer: str
    channel: int
    target: int
    activation: torch.Tensor
    probability: torch.Tensor
    top_class: torch.Tensor
    top_probability: torch.Tensor


def occlusion_maps(
    model: nn.Module,
    image: torch.Tensor,
    *,
    layer: str,
    channel: int,
    target: int,
    size: int = 50,
    stride: int = 8,
    fill: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    progress: Optional[Callable[[int], None]] = None,
) -> OcclusionMaps:
    """Occlusion maps of one normalised ``(3, H, W)`` image (on the model's device): every
    occluded copy (square of side ``size``, grid of ``stride``, filled with ``fill``, a
    normalised ``(3,)``, default 0 = the ImageNet mean pixel) is evaluated, ``batch_size``
    copies per forward pass."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"occlusion_maps: image must be (3, H, W), got {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"occlusion_maps: batch_size must be positive, got {batch_size}")
    extractor = common.FeatureExtractor(model)
    extractor.check([layer])
    fill = torch.zeros(3) if fill is None else fill
    height, width = image.shape[-2:]
    rows, cols = occlusion_grid(height, width, size, stride)
    boxes = grid_boxes(rows, cols).to(image.device)
    totals, probabilities, top_classes, top_probabilities = [], [], [], []
    with channels_last(model):
        for start in range(0, boxes.shape[0], batch_size):
            _occlusion_batch(extractor, image, boxes[start:start + batch_size], fill, layer, channel, target,
                             (totals, probabilities, top_classes, top_probabilities))
            if progress is not None:
                progress(min(batch_size, boxes.shape[0] - start))
    shape = (rows.shape[0], cols.shape[0])
    return OcclusionMaps(rows, cols, layer, channel, target,
                         torch.cat(totals).view(shape).cpu(), torch.cat(probabilities).view(shape).cpu(),
                         torch.cat(top_classes).view(shape).cpu(), torch.cat(top_probabilities).view(shape).cpu())


def _occlusion_batch(extractor: common.FeatureExtractor, image: torch.Tensor, part: torch.Tensor, fill: torch.Tensor,
                     layer: str, channel: int, target: int, out: Tuple[List[torch.Tensor], ...]) -> None:
    """One batch of occluded copies: append their map totals, p(target), top classes and their
    probabilities to the four lists of ``out``."""
    totals, probabilities, top_classes, top_probabilities = out
    copies = common.occlude(image.unsqueeze(0).expand(part.shape[0], -1, -1, -1), part, fill)
    features = extractor(copies, [layer, "logits"])
    logits = features["logits"].float()
    if not 0 <= target < logits.shape[1]:
        raise ValueError(f"occlusion_maps: target class {target} is outside the model's {logits.shape[1]} classes")
    totals.append(features[layer][:, channel].float().sum(dim=(-2, -1)))
    p = torch.softmax(logits, dim=1)
    probabilities.append(p[:, target])
    best = p.max(dim=1)
    top_probabilities.append(best.values)
    top_classes.append(best.indices)


@dataclass
class Strongest:
    """The unoccluded image's strongest feature map of a layer: ``channel`` holds the largest
    single activation (``value``, at ``(y, x)``, first in row-major order; ties to the lower
    channel), whose map sums to ``total``."""

    channel: int
    value: float
    y: int
    x: int
    total: float


def strongest_map(model: nn.Module, image: torch.Tensor, layer: str) -> Strongest:
    """:class:`Strongest` of ``layer`` for one normalised ``(3, H, W)`` image."""
    return strongest_of(common.FeatureExtractor(model)(image.unsqueeze(0), [layer])[layer])


def strongest_of(act: torch.Tensor) -> Strongest:
    """:class:`Strongest` of one image's activations ``(1, C, H, W)`` of a layer."""
    values, positions = spatial_max(act.float())
    values = ranked(values)  # a NaN map ranks last, as in pass 1
    channel = int(values[0].argmax())  # the first of equal maxima: the lower channel
    position = int(positions[0, channel])
    width = act.shape[-1]
    return Strongest(channel, float(values[0, channel]), position // width, position % width,
                     float(act[0, channel].float().sum()))


def project_strongest(model: nn.Module, image: torch.Tensor, layer: str, strongest: Strongest) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """The deconvnet projection of the strongest activation alone (``Deconvnet.project`` at its
    position), ``(3, H, W)``, and its receptive field ``(x0, y0, x1, y1)``."""
    dn = Deconvnet(model)
    rec = dn.record(image.unsqueeze(0))
    positions = torch.tensor([[strongest.y, strongest.x]], dtype=torch.int64)
    projection = dn.project(rec, layer, [0], [strongest.channel], positions)[0]
    return projection, dn.receptive_field(layer, strongest.y, strongest.x, tuple(image.shape[-2:]))


# -- the figure --------------------------------------------------------------------------------

LEGEND_CLASSES = 9  # classes named in panel (e); the rest are "other"


def class_map_colours(top_class: torch.Tensor) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """Panel (e): an index image (0 .. n-1 for the most frequent classes by area, n for the
    rest) and ``(class, cells)`` of the named ones, most frequent first (ties: lower class)."""
    classes, counts = torch.unique(top_class, return_counts=True)
    order = sorted(zip(classes.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0]))
    named = order[:LEGEND_CLASSES]
    index = np.full(top_class.shape, len(named), dtype=np.int64)
    values = top_class.numpy()
    for n, (cls, _) in enumerate(named):
        index[values == cls] = n
    return index, named


def render(path: Path, example: torch.Tensor, name: str, maps: OcclusionMaps, strongest: Strongest,
           projection: torch.Tensor, field: Tuple[int, int, int, int]) -> None:
    """Figure 7's five panels for one image: (a) the input with one occluder position, (b) the
    strongest layer-5 map's total activation, (c) its strongest activation projected, (d) the
    probability of the true class, (e) the most probable class; as a PNG at ``path``.
    ``example`` is the uint8 ``(3, H, W)`` input with the occluder at one position."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    height, width = example.shape[-2:]
    extent = (0, width, height, 0)  # map cells drawn over the image pixels they stand for
    fig = common.new_figure(22, 5.2)
    axes = fig.subplots(1, 5)
    a, b, c, d, e = axes
    a.imshow(common.to_hwc(example))
    a.set_title(f"(a) {common.plain(name)}\ntrue class: {common.class_name(maps.target)}", fontsize=9)
    im = b.imshow(maps.activation.numpy(), extent=extent, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=b, shrink=0.8)
    b.set_title(f"(b) total activation of {maps.layer} map {maps.channel}\n(unoccluded: {strongest.total:.4g})", fontsize=9)
    c.imshow(common.display_projection(projection))
    fx0, fy0, fx1, fy1 = field
    c.add_patch(Rectangle((fx0, fy0), fx1 - fx0, fy1 - fy0, fill=False, edgecolor="black", linewidth=1.5))
    c.set_title(f"(c) {maps.layer} map {maps.channel}: its strongest activation\n"
                f"(y {strongest.y}, x {strongest.x}) projected; box = receptive field", fontsize=9)
    im = d.imshow(maps.probability.numpy(), extent=extent, cmap="magma", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=d, shrink=0.8)
    d.set_title(f"(d) p({common.class_name(maps.target)})", fontsize=9)
    index, named = class_map_colours(maps.top_class)
    palette = [tuple(v) for v in _palette(len(named))] + [(0.8, 0.8, 0.8, 1.0)]
    e.imshow(index, extent=extent, cmap=ListedColormap(palette), vmin=-0.5, vmax=len(palette) - 0.5,
             interpolation="nearest")
    handles = [Patch(color=palette[n], label=f"{cls} {common.class_name(cls)} ({count} positions)") for n, (cls, count) in enumerate(named)]
    if (index == len(named)).any():
        handles.append(Patch(color=palette[-1], label="other classes"))
    e.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.04), fontsize=7, frameon=False, ncol=1)
    e.set_title("(e) most probable class", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    common.save_figure(fig, path)


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](np.arange(n))
