"""The gallery: ``index.html`` (layers -> feature maps), a page per layer showing, for each
feature map, the grid of projections beside the grid of image patches (the paper's Figure 2),
with activation values and source file names; a PNG per feature map and a PNG grid per layer;
``topk.json``; and the log of skipped files.

The pages come from the Jinja2 templates ``index.html`` and ``layer.html`` (:mod:`.pages`):
self-contained and offline (no scripts, no fonts or styles from elsewhere, every link relative and
pointing at a file of the gallery), and autoescaped, so a file name is only ever text (names never
appear in a URL). Every file is written atomically, and ``index.html`` last: a folder without it
is not a finished gallery.
"""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from . import pages
from .io import atomic_write_bytes, atomic_write_text
from .project import LayerTiles
from .topk import LayerTop

GAP = 2  # pixels between tiles
SPLIT = 10  # pixels between the projection grid and the patch grid
BACKGROUND = (255, 255, 255)
MONTAGE_WIDTH = 2400  # target width of a layer's PNG grid
# topk.json's strings for the activations JSON has no number for: JavaScript's spellings, which
# Python's float() and JavaScript's Number() read back as the values they name.
NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def log_text(value: str) -> str:
    """A file name for a one-line-per-entry log: control characters and backslashes escaped,
    bytes that are not UTF-8 as ``\\xNN``."""
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\x{ord(ch):02x}"))
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass
class RunInfo:
    """What the pages say about the run."""

    arch: str
    weights: Optional[str]
    untrained: bool
    data: str
    preprocess: Dict[str, object]
    top: int
    images: int
    skipped: int
    mode: str = "deconvnet"
    notes: List[str] = field(default_factory=list)


def layer_page(layer: str) -> str:
    return f"layer-{layer}.html"


def cell_png(layer: str, channel: int) -> str:
    return f"layers/{layer}/f{channel:04d}.png"


def montage_png(layer: str) -> str:
    return f"layers/{layer}.png"


def grid_shape(k: int) -> Tuple[int, int]:
    """(rows, columns) of the grid for ``k`` entries: 3x3 for 9."""
    columns = math.ceil(math.sqrt(k))
    return math.ceil(k / columns), columns


def tile_grid(tiles: np.ndarray, columns: int, gap: int = GAP, background: int = BACKGROUND[0],
              filled: Optional[np.ndarray] = None) -> np.ndarray:
    """``(K, h, w, 3)`` uint8 tiles -> one ``(rows*h + gaps, columns*w + gaps, 3)`` image, row by
    row; tiles not ``filled`` ``(K,)`` (nothing was found for them) stay background."""
    k, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(k / columns))
    sheet = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), background, dtype=np.uint8)
    for n in range(k):
        if filled is not None and not filled[n]:
            continue
        y, x = (n // columns) * (h + gap), (n % columns) * (w + gap)
        sheet[y:y + h, x:x + w] = tiles[n]
    return sheet


def compose_cell(projections: np.ndarray, patches: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """One feature map's picture: the grid of projections, a gap, the grid of patches.
    ``projections``/``patches`` are ``(K, T, T, 3)`` uint8, ``filled`` ``(K,)``."""
    columns = grid_shape(projections.shape[0])[1]
    left = tile_grid(projections, columns, filled=filled)
    right = tile_grid(patches, columns, filled=filled)
    split = np.full((left.shape[0], SPLIT, 3), BACKGROUND, dtype=np.uint8)
    return np.concatenate([left, split, right], axis=1)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def montage(cells: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """A layer's PNG grid: every feature map's cell, reduced to fit :data:`MONTAGE_WIDTH`
    columns-wise, labelled with its feature-map number."""
    h, w = cells[0].shape[:2]
    columns = max(1, min(len(cells), round(math.sqrt(len(cells) * h / w * 1.6))))
    scale = min(1.0, MONTAGE_WIDTH / (columns * (w + 8)))
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    label_h = 12
    rows = math.ceil(len(cells) / columns)
    sheet = Image.new("RGB", (columns * (cw + 8), rows * (ch + label_h + 8)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, (cell, label) in enumerate(zip(cells, labels)):
        x = (n % columns) * (cw + 8) + 4
        y = (n // columns) * (ch + label_h + 8) + 4
        image = Image.fromarray(cell, "RGB")
        if scale < 1.0:
            image = image.resize((cw, ch), Image.BILINEAR, reducing_gap=2.0)
        draw.text((x, y), label, fill=(60, 60, 60))
        sheet.paste(image, (x, y + label_h))
    return np.asarray(sheet)


def render_layer(
    out: Path,
    layer: str,
    top: LayerTop,
    tiles: LayerTiles,
    files: Sequence[str],
    info: RunInfo,
    layers: Sequence[str],
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Write one layer's cell PNGs, its PNG grid and its page (``layer.html``)."""
    (out / "layers" / layer).mkdir(parents=True, exist_ok=True)
    cells: List[np.ndarray] = []
    labels: List[str] = []
    maps: List[Dict[str, object]] = []
    k = top.values.shape[1]
    # PNG encoding is most of the rendering time and Pillow's encoder releases the GIL: encode
    # on every core (the bytes are the same whatever the thread).
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    pending = []

    def write_png(path: Path, array: np.ndarray) -> None:
        atomic_write_bytes(path, png_bytes(array))
        if progress is not None:
            progress(1)

    for j, channel in enumerate(top.channels.tolist()):
        cell = compose_cell(tiles.projections[j], tiles.patches[j], tiles.filled[j])
        pending.append(pool.submit(write_png, out / cell_png(layer, channel), cell))
        cells.append(cell)
        labels.append(str(channel))
        entries = [{"value": value, "name": files[image], "y": y, "x": x, "filled": bool(tiles.filled[j, r])}
                   for r, (image, value, y, x) in enumerate(top.entries(j))]
        maps.append({
            "channel": channel, "png": cell_png(layer, channel), "height": cell.shape[0], "width": cell.shape[1],
            "alt": f"{layer} feature map {channel}: projections (left) and image patches (right) of its top {k}",
            "entries": entries,
        })
    with pool:
        if cells:
            atomic_write_bytes(out / montage_png(layer), png_bytes(montage(cells, labels)))
        for future in pending:
            future.result()  # (re-raises a failed write)
    size = tiles.geometry.size
    page = pages.render(
        "layer.html", title=f"{info.arch} {layer}", info=info, layer=layer,
        layers=[{"name": name, "page": layer_page(name)} for name in layers],
        top=k, grid=grid_shape(k), field=(size[1], size[0]), whole=tiles.geometry.whole, tile=tiles.tile,
        map=top.map_size,
        montage=montage_png(layer), maps=maps,
    )
    atomic_write_text(out / layer_page(layer), page)


def render_index(out: Path, tops: Dict[str, LayerTop], tiles: Dict[str, LayerTiles], info: RunInfo,
                 total_channels: Dict[str, int]) -> None:
    """Write ``index.html`` (``index.html`` template; last: its presence marks a finished gallery)."""
    layers = []
    for layer, top in tops.items():
        size = tiles[layer].geometry.size
        layers.append({
            "name": layer, "page": layer_page(layer), "montage": montage_png(layer), "channels": top.channels.tolist(),
            "total": total_channels.get(layer, top.channels.numel()), "map": top.map_size, "field": (size[1], size[0]),
            "whole": tiles[layer].geometry.whole,
        })
    page = pages.render("index.html", title=f"zfk visualize: {info.arch}", info=info, layers=layers,
                        diagnostics=(out / "diagnostics.html").is_file())
    atomic_write_text(out / "index.html", page)


def json_value(value: float) -> Union[float, str]:
    """An activation as ``topk.json`` holds it: a finite value as a number, NaN, +inf and -inf
    as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (:data:`NONFINITE`)."""
    return value if math.isfinite(value) else NONFINITE[str(value)]


def topk_document(arch: str, weights: Optional[str], preprocess: Dict[str, object], tops: Dict[str, LayerTop],
                  files: Sequence[str], boxes: Callable[[str, int, int], Tuple[int, int, int, int]]) -> Dict[str, object]:
    """``topk.json``'s content: ``{"arch", "weights", "preprocess", "layers": {layer: [{"channel",
    "top": [{"image", "value", "y", "x", "box"}, ...]}, ...]}}``, entries best first; a value
    that is not finite is a string (:func:`json_value`)."""
    layers: Dict[str, List[Dict[str, object]]] = {}
    for layer, top in tops.items():
        maps = []
        for j, channel in enumerate(top.channels.tolist()):
            entries = []
            for image, value, y, x in top.entries(j):
                entries.append({
                    "image": files[image],
                    "value": json_value(value),
                    "y": y,
                    "x": x,
                    "box": list(boxes(layer, y, x)),
                })
            maps.append({"channel": channel, "top": entries})
        layers[layer] = maps
    return {"arch": arch, "weights": weights, "preprocess": preprocess, "layers": layers}


def write_topk(out: Path, document: Dict[str, object]) -> None:
    """``topk.json``, atomically. ASCII with escapes, so any file name round-trips."""
    atomic_write_text(out / "topk.json", json.dumps(document, indent=1, ensure_ascii=True) + "\n")


def write_skipped(out: Path, entries: Sequence[Tuple[str, str]]) -> None:
    """``skipped.txt``: one ``path<TAB>reason`` line per file that was not used."""
    lines = ["# files zfk visualize did not use: path (relative to the data folder) <TAB> reason"]
    lines += [f"{log_text(path)}\t{log_text(reason)}" for path, reason in entries]
    atomic_write_bytes(out / "skipped.txt", ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace"))
