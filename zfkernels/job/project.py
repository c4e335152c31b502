"""Pass 2: re-read only the images pass 1 selected, record each once, project every selection of
every layer in batched ``Deconvnet.project`` calls, and crop the receptive-field patch of each
selection from the projection and from the image, as fixed-size tiles for the gallery.

A tile shows the whole (unclipped) receptive field, so a projection and its image patch always
line up; what falls outside the image is mid-grey in both. Projections are displayed per tile
with zero at mid-grey and the largest magnitude at full scale (the sign is visible, and a tile
with nothing in it stays grey). Receptive fields smaller than the tile are enlarged by pixel
replication (an integer factor), larger ones reduced with an antialiased filter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import Deconvnet, ModelGeometry
from ..engine.boxes import Box
from ..engine.boxes import crop as crop_box
from . import data as data_mod
from .timing import StageClock
from .topk import LayerTop

MIN_TILE = 48  # receptive fields below this are enlarged by an integer factor
MAX_TILE = 96  # and above it reduced
PROJECTION_CHUNK = 128  # selections per project call: bounds the (B, 3, H, W) output
RECORD_BUDGET = 1 << 30  # bytes of recorded maps per pass-2 batch
GREY = 128


def tile_size(field_size: int) -> int:
    """Display size of a layer's tiles for a receptive field of ``field_size`` pixels."""
    if field_size < MIN_TILE:
        return field_size * math.ceil(MIN_TILE / field_size)
    return min(field_size, MAX_TILE)


@dataclass(frozen=True)
class FieldGeometry:
    """A layer's receptive field: activation ``(y, x)`` sees the square of ``size`` pixels at
    ``(y * stride + offset, x * stride + offset)`` (the offset is negative: padding)."""

    size: Tuple[int, int]
    stride: Tuple[int, int]
    offset: Tuple[int, int]

    @classmethod
    def of(cls, dn: ModelGeometry, layer: str, image_size: Tuple[int, int] = (data_mod.CROP, data_mod.CROP)) -> "FieldGeometry":
        """From the engine's unclipped receptive boxes of activations (0, 0) and (1, 1) (a
        layer whose field is the whole image gets stride 0: every tile shows all of it)."""
        y0, x0, h, w = dn.receptive_box(layer, 0, 0, image_size)
        height, width = dn.shape_of(layer, image_size)[-2:]
        y1, x1, _, _ = dn.receptive_box(layer, min(1, height - 1), min(1, width - 1), image_size)
        return cls((h, w), (y1 - y0, x1 - x0), (y0, x0))

    @property
    def whole(self) -> bool:
        """Every activation sees the whole image (attention, or a global pooling, below it)."""
        return self.stride == (0, 0)


@dataclass
class LayerTiles:
    """Tiles of one layer: ``projections`` and ``patches`` are uint8 ``(C, K, T, T, 3)``;
    ``filled[j, r]`` says whether entry ``r`` of row ``j`` was drawn (False: no such entry, or
    its image could not be read again)."""

    layer: str
    tile: int
    geometry: FieldGeometry
    projections: np.ndarray
    patches: np.ndarray
    filled: np.ndarray


@dataclass
class ProjectionResult:
    tiles: Dict[str, LayerTiles]
    failures: List[Tuple[int, str]]
    images: int
    projections: int
    timings: Dict[str, float]
    seconds: float


def _allocate(shape: Tuple[int, ...], scratch: Optional[Path], name: str) -> np.ndarray:
    """A zeroed uint8 array, backed by a file under ``scratch`` when given (tiles of big models
    need not sit in memory)."""
    if scratch is None:
        return np.zeros(shape, dtype=np.uint8)
    scratch.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape)


def record_batch_size(model: nn.Module, dn: ModelGeometry, requested: int, layers: Optional[Sequence[str]] = None,
                      image_size: Tuple[int, int] = (data_mod.CROP, data_mod.CROP)) -> int:
    """At most ``requested`` images per recording, fewer when their maps would exceed
    :data:`RECORD_BUDGET` (VGG16 keeps ~55 MB of maps per 224x224 image)."""
    per_image = dn.recorded_bytes(image_size, layers)
    return max(1, min(requested, RECORD_BUDGET // max(per_image, 1)))


def _crop(source: torch.Tensor, rows: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor,
          size: Tuple[int, int], fill: float) -> torch.Tensor:
    """``(B, C, h, w)`` windows of ``source[rows]`` at ``(y0, x0)``; positions off the image
    get ``fill`` (the engine's per-selection box crop, which clamps, then the fill)."""
    box = Box(y0, x0, size[0], size[1], uniform=False)
    picked = crop_box(source, rows, box)
    return torch.where(box.inside(source.shape[-2:], torch.bool), picked,
                       torch.full((), fill, dtype=picked.dtype, device=picked.device))


def display_projection(p: torch.Tensor) -> torch.Tensor:
    """Float projections ``(B, 3, h, w)`` -> [0, 1] with zero at 0.5, per selection."""
    scale = p.abs().flatten(1).amax(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    return (0.5 + 0.5 * p / scale).clamp(0, 1)


def _to_tile(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``(B, 3, h, w)`` floats in [0, 1] -> ``(B, T, T, 3)`` uint8."""
    if x.shape[-1] != tile or x.shape[-2] != tile:
        if tile >= max(x.shape[-2:]):
            x = F.interpolate(x, size=(tile, tile), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def selected_images(layers: Dict[str, LayerTop]) -> List[int]:
    """The distinct images pass 1 selected (what pass 2 reads), in file order."""
    return sorted({image for top in layers.values() for j in range(top.channels.numel())
                   for image, *_ in top.entries(j)})


def project_selections(
    model: nn.Module,
    layers: Dict[str, LayerTop],
    images: data_mod.ImageList,
    device: torch.device,
    *,
    batch_size: int = 64,
    workers: int = 0,
    gpu_jpeg: bool = False,
    mode: str = "deconvnet",
    scratch: Optional[Path] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> ProjectionResult:
    """Pass 2 for the top-K of ``layers`` (pass 1's result): tiles of every filled entry."""
    began = time.perf_counter()
    device = torch.device(device)
    clock = StageClock(device)
    dn = Deconvnet(model)
    tiles: Dict[str, LayerTiles] = {}
    # Per layer: which (row, rank) entries come from which image, at which position.
    wanted: Dict[str, Dict[int, List[Tuple[int, int, int, int, int]]]] = {}
    for name, top in layers.items():
        geometry = FieldGeometry.of(dn, name, images.size)
        size = tile_size(max(geometry.size))
        c, k = top.values.shape
        tiles[name] = LayerTiles(name, size, geometry, _allocate((c, k, size, size, 3), scratch, f"{name}-projections"),
                                 _allocate((c, k, size, size, 3), scratch, f"{name}-patches"), np.zeros((c, k), dtype=bool))
        per_image: Dict[int, List[Tuple[int, int, int, int, int]]] = {}
        for j in range(c):
            for r, (image, _, y, x) in enumerate(top.entries(j)):
                per_image.setdefault(image, []).append((j, r, int(top.channels[j]), y, x))
        wanted[name] = per_image
    distinct = selected_images(layers)
    size = record_batch_size(model, dn, batch_size, list(layers), images.size)
    batches = [(b, distinct[b * size:(b + 1) * size]) for b in range((len(distinct) + size - 1) // size)]
    loader = data_mod.make_loader(images, batches, workers, pin_memory=device.type == "cuda", gpu_jpeg=gpu_jpeg)
    failures: List[Tuple[int, str]] = []
    count = 0
    with torch.inference_mode():
        waited = time.perf_counter()
        for batch in loader:
            clock.add("data wait", time.perf_counter() - waited)
            clock.add("decode (worker CPU)", batch.decode_seconds)
            failures.extend(batch.failures)
            indices, crops, more = data_mod.decode_on_device(batch, device)
            failures.extend(more)
            row_of = {int(i): n for n, i in enumerate(indices.tolist())}
            with clock("forward (record)"):
                rec = dn.record(data_mod.normalize(crops), list(layers))
            pixels = crops.float().div_(255)
            for name, per_image in wanted.items():
                picks = [(row_of[i],) + entry for i in row_of if i in per_image for entry in per_image[i]]
                if len(picks) > PROJECTION_CHUNK:  # chunks of similar receptive fields: smaller boxes
                    at = torch.tensor([[e[4], e[5]] for e in picks], dtype=torch.int64)
                    picks = [picks[k] for k in dn.field_order(name, at, tuple(crops.shape[-2:])).tolist()]
                for start in range(0, len(picks), PROJECTION_CHUNK):
                    chunk = picks[start:start + PROJECTION_CHUNK]
                    with clock("projection"):
                        _project_chunk(dn, rec, name, chunk, pixels, tiles[name], device, mode)
                    count += len(chunk)
            if progress is not None:
                progress(len(batch) + len(batch.failures))
            waited = time.perf_counter()
    return ProjectionResult(tiles, sorted(failures), len(distinct), count, clock.totals(), time.perf_counter() - began)


def _project_chunk(dn: Deconvnet, rec: object, layer: str, chunk: Sequence[Tuple[int, int, int, int, int, int]],
                   pixels: torch.Tensor, out: LayerTiles, device: torch.device, mode: str) -> None:
    """Project ``chunk`` = ``(row, j, rank, channel, y, x)`` entries (``mode``: how signals cross
    the ReLUs, as :meth:`Deconvnet.project`) and store their tiles."""
    rows = torch.tensor([e[0] for e in chunk], dtype=torch.int64, device=device)
    channels = torch.tensor([e[3] for e in chunk], dtype=torch.int64, device=device)
    positions = torch.tensor([[e[4], e[5]] for e in chunk], dtype=torch.int64, device=device)
    projected = dn.project(rec, layer, rows, channels, positions, mode=mode, chunk_size=PROJECTION_CHUNK)
    g = out.geometry
    y0 = positions[:, 0] * g.stride[0] + g.offset[0]
    x0 = positions[:, 1] * g.stride[1] + g.offset[1]
    every = torch.arange(len(chunk), device=device)
    projection = display_projection(_crop(projected.float(), every, y0, x0, g.size, 0.0))
    patch = _crop(pixels, rows, y0, x0, g.size, GREY / 255)
    projection_tiles = _to_tile(projection, out.tile).numpy()
    patch_tiles = _to_tile(patch, out.tile).numpy()
    for n, (_, j, rank, _, _, _) in enumerate(chunk):
        out.projections[j, rank] = projection_tiles[n]
        out.patches[j, rank] = patch_tiles[n]
        out.filled[j, rank] = True
