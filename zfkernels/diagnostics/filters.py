"""Filter comparison (Section 4.1, Figure 6): the layer-1 filters of a model, and of a second one
beside it (AlexNet's 11x11 stride-4 filters against ZFNet's 7x7 stride-2), plus the top
deconvnet projections of layer-2 feature maps over an image folder.

Each filter is shown normalised on its own: its weights (all three colour channels together)
mapped linearly so that its minimum is 0 and its maximum 1 (a constant filter is mid-grey).
"Layer 2" is the second conv layer (conv2; conv1_2 on VGG16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError
from ..job import gallery
from ..engine import graph_of
from ..models import ARCHITECTURES, FACTORY, ArchitectureError, check_arch, torchvision_classifiers
from . import common


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution in forward order (layer 1), from its traced graph: the
    stem of a ResNet or an Inception, ``features.0`` of the zoo."""
    graph = graph_of(model)
    for name in graph.order:
        if graph.steps[name].kind == "conv":
            return graph.steps[name].module
    raise ValueError("the model has no convolution")


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
    """``--compare ARCH[:WEIGHTS]`` (WEIGHTS a file or ``torchvision``). ARCH is anything
    ``--arch`` takes (:func:`zfkernels.models.check_arch`); a ``module.path:callable`` factory
    keeps its own colon, so its weights come after a second one
    (``mypkg.nets:build:weights.pth``)."""
    name, _, rest = text.partition(":")
    attribute, _, after = rest.partition(":")
    # What follows the first colon is a weights file (or 'torchvision') unless ARCH is no name
    # the registry knows and it reads as a callable's name, not as a file's.
    names_weights = (name in ARCHITECTURES or name in torchvision_classifiers() or attribute == "torchvision"
                     or attribute.endswith((".pth", ".pt")) or not FACTORY.match(f"{name}:{attribute}"))
    arch, weights = (name, rest) if names_weights else (f"{name}:{attribute}", after)
    try:
        check_arch(arch)
    except ArchitectureError as error:
        raise UsageError(f"--compare: {error} (as ARCH or ARCH:WEIGHTS)") from None
    return ModelSpec(arch, weights or None)


def render_filters(path: Path, grids: List[Tuple[str, np.ndarray, nn.Conv2d]]) -> None:
    """Layer-1 filter grids side by side, each titled with its geometry."""
    fig = common.new_figure(7.5 * len(grids), 7.0)
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (label, grid, conv) in zip(axes, grids):
        ax.imshow(grid, interpolation="nearest")
        k, s = conv.kernel_size, conv.stride
        ax.set_title(f"{common.plain(label)}\nlayer 1: {conv.out_channels} filters {k[0]}x{k[1]}, stride {s[0]}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    common.save_figure(fig, path)


def layer2_sheet(projections: np.ndarray, filled: np.ndarray, columns: int) -> np.ndarray:
    """``(F, K, T, T, 3)`` top-K projection tiles of F feature maps -> one image: each map's
    K tiles as a square grid, the maps' grids ``columns`` to a row."""
    per_map = gallery.grid_shape(projections.shape[1])[1]
    cells = [gallery.tile_grid(tiles, per_map, gap=1, filled=shown) for tiles, shown in zip(projections, filled)]
    return gallery.tile_grid(np.stack(cells), columns, gap=6)
