"""What the diagnostics share: the paper's layer numbers on each model, a forward pass that taps
named layers, ImageNet labels, image loading, occluding boxes, pass 1 + pass 2 for a few feature
maps, and writing figures, JSON and pages into ``--out``.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (the Agg renderer, no
pyplot), so nothing here touches matplotlib's global backend or needs a display.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..engine import graph_of, walk
from ..engine.classify import RECTIFIERS
from ..errors import UsageError
from ..job import data as data_mod
from ..job import gallery
from ..job import pages
from ..job import project as patches
from ..job.console import check_files_exist, progress_bar, say
from ..job.io import atomic_write_bytes, atomic_write_text
from ..job.project import ProjectionResult, project_selections
from ..job.scan import ScanPlan, ScanResult, run_scan
from ..models import ZOO_TRANSFORM, EvalTransform

# -- the paper's layers on our models ------------------------------------------------------------

PAGES = {
    "occlusion": "Occlusion sensitivity (Section 4.2, Figure 7)",
    "correspondence": "Correspondence analysis (Section 4.3, Table 7)",
    "invariance": "Invariance to translation, scale and rotation (Section 4, Figure 5)",
    "evolution": "Feature evolution during training (Figure 4)",
    "filters": "Layer-1 filters and layer-2 projections (Section 4.1, Figure 6)",
    "probe": "Linear probes of each layer (Section 5, Tables 4-6)",
}


@dataclass(frozen=True)
class PaperLayers:
    """The paper's "layer 1", "layer 2", "layer 5" and "layer 7" on a model: the first, second
    and last conv layers (post-ReLU; conv1, conv2, conv5 on ZFNet/AlexNet, conv1_1, conv1_2,
    conv5_3 on VGG16) and ``fc7``, the post-ReLU output of the classifier's second linear layer.
    A network whose classifier has fewer hidden ReLU layers (torchvision's ResNets, DenseNets …:
    one linear layer on the pooled maps) has no fc7: its layer 7 is the last hidden layer of the
    classifier when there is one, else the deepest feature map (layer 5)."""

    layer1: str
    layer2: str
    layer5: str
    layer7: str


def paper_layers(model: nn.Module) -> PaperLayers:
    """The paper's layer numbers for ``model`` (see :class:`PaperLayers`)."""
    extractor = FeatureExtractor(model)
    convs = extractor.conv_layers
    fcs = extractor.fc_layers
    if not convs:
        raise ValueError("the model has no projectable feature map (a conv followed by a ReLU)")
    layer7 = fcs[1] if len(fcs) >= 2 else (fcs[-1] if fcs else convs[-1])
    return PaperLayers(convs[0], convs[1] if len(convs) > 1 else convs[0], convs[-1], layer7)


class FeatureExtractor:
    """One forward pass through the model's graph (the walker of :mod:`zfkernels.engine.walk`, the one
    pass 1 and ``Deconvnet.record`` use) that returns the outputs of the requested layers: the
    projectable layers by the engine's names (``conv1`` …, ``conv5_3``, or node names such as
    ``layer2.1.relu_1``), the classifier's ReLUs (``fc6``, ``fc7`` … on the zoo, counted from 6
    as in the paper; node names elsewhere), any other node name, and ``"logits"``. The pass
    stops after the deepest layer asked for."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = graph_of(model)
        self.conv_layers: List[str] = list(self.graph.layers)
        fcs = [alias for alias in self.graph.aliases if alias.startswith("fc")]
        if not fcs:  # the rectifiers below the feature maps: the classifier's hidden layers
            shapes = self.graph.geometry(self.graph.canonical_size)
            fcs = [name for name in self.graph.order if self.graph.steps[name].kind in RECTIFIERS
                   and not shapes.is_map(name) and name in self.graph.node_names]
        self.fc_layers: List[str] = fcs

    @property
    def layers(self) -> List[str]:
        return self.conv_layers + self.fc_layers + ["logits"]

    def check(self, layers: Sequence[str], what: str = "layers") -> None:
        for name in layers:
            try:
                self.graph.resolve(name)
            except ValueError as error:
                raise ValueError(f"{what}: {error}") from None

    def __call__(self, images: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``{layer: (N, ...) tensor}`` for ``images`` ``(N, 3, H, W)`` (no autograd)."""
        self.check(layers)
        steps: Dict[str, List[str]] = {}
        for name in layers:
            steps.setdefault(self.graph.resolve(name), []).append(name)
        out: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            # The layout the model's weights are in (see channels_last()): a conv mixing layouts is slow.
            weight = next((p for p in self.model.parameters() if p.dim() == 4), None)
            if weight is not None and weight.is_contiguous(memory_format=torch.channels_last) \
                    and not weight.is_contiguous():
                images = images.contiguous(memory_format=torch.channels_last)
            for step, value in walk(self.graph, images, steps, keep=steps):
                for name in steps[step]:
                    out[name] = self.graph.present(step, value)  # token and channels-last grids as (N, C, H, W)
        return out


def forward_batched(extractor: FeatureExtractor, images: torch.Tensor, layers: Sequence[str],
                    batch_size: int) -> Dict[str, torch.Tensor]:
    """:class:`FeatureExtractor` over ``images`` in batches of ``batch_size``, concatenated."""
    parts: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    for start in range(0, images.shape[0], batch_size):
        for name, value in extractor(images[start:start + batch_size], layers).items():
            parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


# -- ImageNet labels ---------------------------------------------------------------------------

WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> Tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids, sorted: class ``i`` is ``imagenet_synsets()[i]``
    (package data, taken from timm's ``imagenet_synsets.txt``)."""
    text = resources.files(__package__).joinpath("imagenet_synsets.txt").read_text(encoding="ascii")
    return tuple(text.split())


@functools.lru_cache(maxsize=1)
def class_names() -> Tuple[str, ...]:
    """Display names of the 1000 classes, torchvision's (``_IMAGENET_CATEGORIES``)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def class_name(index: int) -> str:
    """``"281 tabby"``-style name of class ``index`` (just the number beyond the 1000 classes)."""
    names = class_names()
    return names[index] if 0 <= index < len(names) else f"class {index}"


def synset_of(path: Path) -> Optional[str]:
    """The ImageNet synset a file is labelled with: the first ``nXXXXXXXX`` in its name, else in
    the name of a folder above it (class subfolders); ``None`` when there is none."""
    for part in [path.name] + [p.name for p in path.parents]:
        match = WNID.search(part)
        if match:
            return match.group(0)
    return None


def parse_label(text: str, what: str = "--label") -> int:
    """A class given as an index (``281``) or a WordNet id (``n02123045``)."""
    text = text.strip()
    synsets = imagenet_synsets()
    if text.isdigit():
        index = int(text)
        if index >= len(synsets):
            raise UsageError(f"{what}: class index {index} is out of range (0-{len(synsets) - 1})")
        return index
    if text in synsets:
        return synsets.index(text)
    raise UsageError(f"{what}: {text!r} is neither a class index (0-999) nor an ImageNet synset id like n02123045")


def true_classes(paths: Sequence[Path], labels: Optional[Sequence[str]]) -> List[int]:
    """Each image's true class: ``labels`` (one for all images, or one per image), else the
    synset in its file name."""
    if labels:
        if len(labels) not in (1, len(paths)):
            raise UsageError(f"--label: give one label for all images or one per image ({len(paths)}), got {len(labels)}")
        parsed = [parse_label(text) for text in labels]
        return parsed * len(paths) if len(parsed) == 1 else parsed
    synsets = imagenet_synsets()
    out = []
    for path in paths:
        wnid = synset_of(path)
        if wnid is None:
            raise UsageError(f"{path}: no ImageNet synset (like n01440764) in the file name; pass --label INDEX|SYNSET")
        if wnid not in synsets:
            raise UsageError(f"{path}: {wnid} is not one of the 1000 ImageNet classes; pass --label INDEX|SYNSET")
        out.append(synsets.index(wnid))
    return out


# -- images ------------------------------------------------------------------------------------


def load_images(paths: Sequence[str], what: str,
                transform: EvalTransform = ZOO_TRANSFORM) -> Tuple[List[Path], torch.Tensor]:
    """Existing image files -> their uint8 ``(N, 3, crop, crop)`` evaluation crops under the
    network's ``transform`` (224x224 by default; a missing or unreadable file is a
    :class:`UsageError` naming it)."""
    files = check_files_exist(paths, what)
    crops = []
    for path in files:
        try:
            crops.append(data_mod.load_crop(path, transform))
        except Exception as error:  # any decoder failure is the user's file
            raise UsageError(f"{what}: cannot read {path} ({data_mod.describe_error(error)})") from None
    return files, torch.stack(crops)


def fill_value(text: str) -> torch.Tensor:
    """``--fill``: ``mean`` (the ImageNet mean pixel: 0 after normalisation), ``grey`` (128) or a
    grey level 0-255, as a normalised ``(3,)`` tensor."""
    if text == "mean":
        return torch.zeros(3)
    level = 128 if text in ("grey", "gray") else None
    if level is None:
        try:
            level = int(text)
        except ValueError:
            raise UsageError(f"--fill: {text!r} is not mean, grey or a grey level 0-255") from None
        if not 0 <= level <= 255:
            raise UsageError(f"--fill: grey level {level} is outside 0-255")
    return data_mod.normalize(torch.full((1, 3, 1, 1), level, dtype=torch.uint8)).view(3)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 1, H, W)`` bool masks of half-open boxes ``(B, 4)`` = ``(x0, y0, x1, y1)``."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_y = (rows >= boxes[:, 1:2]) & (rows < boxes[:, 3:4])
    in_x = (cols >= boxes[:, 0:1]) & (cols < boxes[:, 2:3])
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)


def occlude(images: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Copies of ``images`` ``(B, 3, H, W)`` with box ``b`` of ``boxes`` ``(B, 4)`` set to
    ``fill`` ``(3,)`` (normalised values)."""
    mask = box_mask(boxes.to(images.device), images.shape[-2], images.shape[-1])
    return torch.where(mask, fill.to(images.device, images.dtype).view(1, 3, 1, 1), images)


# -- pass 1 + pass 2 for a few feature maps ----------------------------------------------------


def top_projections(model: nn.Module, images: data_mod.ImageList, channels: Dict[str, torch.Tensor], top: int,
                    device: torch.device, *, batch_size: int = 32, quiet: bool = True,
                    description: str = "scan") -> Tuple[ScanResult, ProjectionResult]:
    """The ``top`` strongest activations of each requested feature map over ``images`` (pass 1,
    :func:`zfkernels.scan.run_scan`) and their deconvnet projections as tiles (pass 2,
    :func:`zfkernels.patches.project_selections`)."""
    layers = list(channels)
    plan = ScanPlan(images, data_mod.Slots(len(images.files), batch_size), layers, channels, top, fingerprint={})
    with progress_bar(len(images.files), f"{description}: pass 1", "img", quiet) as bar:
        scan = run_scan(model, plan, device, progress=bar.update)
    if scan.skipped:
        names = ", ".join(gallery.log_text(images.files[i]) for i, _ in scan.skipped[:3])
        say(f"{description}: {len(scan.skipped)} image(s) could not be read and were skipped ({names} …)", quiet)
    projected = project_selections(model, scan.layers, images, device, batch_size=batch_size)
    return scan, projected


def display_projection(projection: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` projection as an ``(H, W, 3)`` float image in [0, 1] with zero at mid-grey
    and the largest magnitude at full scale (the gallery's tiles, :func:`patches.display_projection`)."""
    return patches.display_projection(projection.float()[None])[0].permute(1, 2, 0).cpu().numpy()


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """A uint8 ``(3, H, W)`` tensor as an ``(H, W, 3)`` array for ``imshow``."""
    return image.permute(1, 2, 0).cpu().numpy()


# -- output ------------------------------------------------------------------------------------


def plain(value: object) -> str:
    """Text for matplotlib from a file or part name: shown as written (``$`` would start
    mathtext), bytes that are not UTF-8 as U+FFFD (the renderer refuses lone surrogates)."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text.replace("$", r"\$")


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg renderer (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(figure, path: Path) -> None:
    """The figure as a PNG at ``path``, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def jsonable(value: object) -> object:
    """Tensors, arrays and numbers as plain JSON values; NaN and infinities as ``null``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, document: Dict[str, object]) -> None:
    """``document`` as JSON (ASCII, so any file name round-trips), atomically."""
    atomic_write_text(path, json.dumps(jsonable(document), indent=1, ensure_ascii=True, allow_nan=False) + "\n")


def subfolder(out: Path, name: str) -> Path:
    """``out/name`` (a diagnostic's own folder), created."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_page(out: Path, name: str, **context: object) -> Path:
    """``out/name/index.html`` from the template ``name.html`` with ``context`` (plain values:
    the template escapes them), under the diagnostic's title; then refresh
    ``out/diagnostics.html``. Returns the page's path."""
    page = out / name / "index.html"
    atomic_write_text(page, pages.render(f"{name}.html", title=f"zfk {name}", heading=PAGES[name], **context))
    write_index(out)
    return page


def write_index(out: Path) -> None:
    """``out/diagnostics.html``: a link to every diagnostic page present in ``out``."""
    present = [{"name": name, "title": title, "page": f"{name}/index.html"}
               for name, title in PAGES.items() if (out / name / "index.html").is_file()]
    atomic_write_text(out / "diagnostics.html", pages.render("diagnostics.html", title="zfk diagnostics",
                                                             pages=present, gallery=(out / "index.html").is_file()))
