"""The gallery: ``index.html`` (layers -> feature maps), a page per layer showing, for each
feature map, the grid of projections beside the grid of image patches (the paper's Figure 2),
with activation values and source file names; a PNG per feature map and a PNG grid per layer;
``topk.json``; and the log of skipped files.

Self-contained and offline: no scripts, no fonts or styles from elsewhere, every link relative
and pointing at a file of the gallery. Everything derived from a file name is HTML-escaped
(names only ever appear as text, never in a URL). Every file is written atomically, and
``index.html`` last: a folder without it is not a finished gallery.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_write_bytes, atomic_write_text
from .project import LayerTiles
from .topk import LayerTop

GAP = 2  # pixels between tiles
SPLIT = 10  # pixels between the projection grid and the patch grid
BACKGROUND = (255, 255, 255)
MONTAGE_WIDTH = 2400  # target width of a layer's PNG grid

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1,h2{font-weight:600}a{color:#0645ad}
.warn{background:#fee;border:2px solid #c00;padding:.6em 1em;font-weight:600;color:#900}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.maps{display:flex;flex-wrap:wrap;gap:1.2em}
.fm{background:#fff;border:1px solid #ddd;padding:.6em;max-width:100%}
.fm h3{margin:.1em 0 .4em;font-size:1em}
.fm img{display:block;image-rendering:pixelated}
.fm ol{margin:.4em 0 0;padding-left:1.6em;font-size:12px}
.fm .v{font-variant-numeric:tabular-nums;font-weight:600}
.fm .f{word-break:break-all}
.links a{margin-right:.5em}
code{background:#eee;padding:0 .2em}
"""


def text(value: object) -> str:
    """HTML-escape anything shown as text (file names may hold <, &, quotes, or bytes that are
    not UTF-8: those are shown as U+FFFD)."""
    s = str(value)
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(s, quote=True)


def href(path: str) -> str:
    """A relative URL to one of the gallery's own files, escaped for an attribute."""
    return html.escape(urllib.parse.quote(path), quote=True)


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


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{text(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _run_header(info: RunInfo) -> str:
    parts = []
    if info.untrained:
        parts.append(
            "<p class=\"warn\">These weights are UNTRAINED: a seeded random network. The pictures show what random "
            "filters respond to, not learned features. Pass --weights for a trained network.</p>"
        )
    weights = "seeded random (untrained)" if info.weights is None else info.weights
    parts.append(
        "<table>"
        f"<tr><th>architecture</th><td>{text(info.arch)}</td></tr>"
        f"<tr><th>weights</th><td>{text(weights)}</td></tr>"
        f"<tr><th>images</th><td>{text(info.data)}: {info.images} scanned, "
        f"<a href=\"skipped.txt\">{info.skipped} skipped</a></td></tr>"
        f"<tr><th>preprocessing</th><td>{text(info.preprocess.get('transform', ''))}; "
        f"{text(info.preprocess.get('color', ''))}; decoder {text(info.preprocess.get('decoder', ''))}</td></tr>"
        f"<tr><th>selection</th><td>top {info.top} images per feature map by their strongest activation; "
        f"projections by the {text(info.mode)}</td></tr>"
        "<tr><th>files</th><td><a href=\"topk.json\">topk.json</a></td></tr>"
        "</table>"
    )
    for note in info.notes:
        parts.append(f"<p>{text(note)}</p>")
    return "\n".join(parts)


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
    """Write one layer's cell PNGs, its PNG grid and its page."""
    (out / "layers" / layer).mkdir(parents=True, exist_ok=True)
    cells: List[np.ndarray] = []
    labels: List[str] = []
    sections: List[str] = []
    rows, columns = grid_shape(top.values.shape[1])
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
        items = []
        for r, (image, value, y, x) in enumerate(top.entries(j)):
            name = files[image]
            missing = "" if tiles.filled[j, r] else " <em>(could not be read again)</em>"
            items.append(
                f"<li><span class=\"v\">{value:.4g}</span> <span class=\"f\" title=\"{text(name)}\">{text(name)}</span> "
                f"<span class=\"p\">(y {y}, x {x})</span>{missing}</li>"
            )
        if not items:
            items.append("<li><em>no image</em></li>")
        h, w = cell.shape[:2]
        alt = f"{layer} feature map {channel}: projections (left) and image patches (right) of its top {top.values.shape[1]}"
        sections.append(
            f"<section class=\"fm\" id=\"f{channel}\"><h3>{text(layer)} · feature map {channel}</h3>"
            f"<img src=\"{href(cell_png(layer, channel))}\" width=\"{w}\" height=\"{h}\" loading=\"lazy\" alt=\"{text(alt)}\">"
            f"<ol>{''.join(items)}</ol></section>"
        )
    with pool:
        if cells:
            atomic_write_bytes(out / montage_png(layer), png_bytes(montage(cells, labels)))
        for future in pending:
            future.result()  # (re-raises a failed write)
    g = tiles.geometry
    nav = " ".join(
        f"<a href=\"{href(layer_page(name))}\">{text(name)}</a>" if name != layer else f"<strong>{text(name)}</strong>"
        for name in layers
    )
    body = (
        f"<p class=\"links\"><a href=\"index.html\">index</a> · layers: {nav}</p>\n"
        f"<h1>{text(info.arch)} {text(layer)}</h1>\n{_run_header(info)}\n"
        f"<p>Each feature map: on the left the {text(info.mode)} projections of its top {top.values.shape[1]} "
        f"activations ({rows}×{columns}, best first, row by row), on the right the image patches that caused them. "
        f"Receptive field {g.size[1]}×{g.size[0]} pixels of the 224×224 crop, shown at {tiles.tile}×{tiles.tile}; "
        f"projections have zero at mid-grey. Feature map {top.map_size[0]}×{top.map_size[1]}. "
        f"<a href=\"{href(montage_png(layer))}\">The whole layer as one PNG</a>.</p>\n"
        f"<div class=\"maps\">\n" + "\n".join(sections) + "\n</div>"
    )
    atomic_write_text(out / layer_page(layer), page(f"{info.arch} {layer}", body))


def render_index(out: Path, tops: Dict[str, LayerTop], tiles: Dict[str, LayerTiles], info: RunInfo,
                 total_channels: Dict[str, int]) -> None:
    """Write ``index.html`` (last: its presence marks a finished gallery)."""
    rows = []
    lists = []
    for layer, top in tops.items():
        g = tiles[layer].geometry
        rows.append(
            f"<tr><td><a href=\"{href(layer_page(layer))}\">{text(layer)}</a></td>"
            f"<td>{top.channels.numel()} of {total_channels.get(layer, top.channels.numel())}</td>"
            f"<td>{top.map_size[0]}×{top.map_size[1]}</td><td>{g.size[1]}×{g.size[0]}</td>"
            f"<td><a href=\"{href(montage_png(layer))}\">PNG grid</a></td></tr>"
        )
        links = " ".join(
            f"<a href=\"{href(layer_page(layer))}#f{c}\">{c}</a>" for c in top.channels.tolist()
        )
        lists.append(f"<h2 id=\"{text(layer)}\">{text(layer)}</h2>\n<p class=\"links\">feature maps: {links}</p>")
    extra = ""
    if (out / "diagnostics.html").is_file():
        extra = "<p class=\"links\"><a href=\"diagnostics.html\">The paper's other diagnostics (occlusion, correspondence, invariance, evolution, filters)</a></p>\n"
    body = (
        f"<h1>zfk visualize: {text(info.arch)}</h1>\n{_run_header(info)}\n{extra}"
        "<h2>Layers</h2>\n<table><tr><th>layer</th><th>feature maps</th><th>map</th><th>receptive field</th>"
        "<th></th></tr>\n" + "\n".join(rows) + "\n</table>\n" + "\n".join(lists)
    )
    atomic_write_text(out / "index.html", page(f"zfk visualize: {info.arch}", body))


def topk_document(arch: str, weights: Optional[str], preprocess: Dict[str, object], tops: Dict[str, LayerTop],
                  files: Sequence[str], boxes: Callable[[str, int, int], Tuple[int, int, int, int]]) -> Dict[str, object]:
    """``topk.json``'s content: ``{"arch", "weights", "preprocess", "layers": {layer: [{"channel",
    "top": [{"image", "value", "y", "x", "box"}, ...]}, ...]}}``, entries best first."""
    layers: Dict[str, List[Dict[str, object]]] = {}
    for layer, top in tops.items():
        maps = []
        for j, channel in enumerate(top.channels.tolist()):
            entries = []
            for image, value, y, x in top.entries(j):
                entries.append({
                    "image": files[image],
                    "value": value if math.isfinite(value) else None,
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
