"""Feature evolution during training (Figure 4): for chosen feature maps, the strongest activation
across a dataset at each of several checkpoints, projected to pixels by the deconvnet, as a
montage with a row per feature map and a column per checkpoint.

Each checkpoint is the main job at ``top = 1``: pass 1 (:func:`zfkernels.scan.run_scan`) finds
the single strongest activation of every chosen map over the images, pass 2
(:func:`zfkernels.patches.project_selections`) projects it and crops its receptive field from
the projection and from the image (the tiles of the ``zfk visualize`` gallery).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..job import data as data_mod
from ..job import gallery
from . import common

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
        scan, projected = common.top_projections(model, images, channels, 1, device, batch_size=batch_size, quiet=quiet,
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
    fig = common.new_figure(max(4.0, width / 60 + 2), max(3.0, height / 60 + 1.5))
    ax = fig.add_subplot()
    ax.imshow(sheet, interpolation="nearest")
    ax.set_xticks([c * (tile + gap) + tile / 2 for c in range(len(column_labels))], column_labels, rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks([r * (tile + gap) + tile / 2 for r in range(len(row_labels))], row_labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    common.save_figure(fig, path)
