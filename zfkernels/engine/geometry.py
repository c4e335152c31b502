"""Geometry of one traced model at one input size, computed once (``Graph.geometry(size)``):
every step's output shape (a forward on fake tensors: no arithmetic), its layout (``"NCHW"``,
``"NHWC"`` for channels-last grids, ``"tokens"`` for ``(B, [class,] H*W, C)`` sequences, or
``None``), how each layer is presented as a ``(B, C, H, W)`` map, receptive boxes, and what a
recording keeps per image. Callers that only need sizes, channels or receptive fields read this
instead of building a ``Deconvnet``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from .boxes import View
from .capture import Graph
from .classify import RECTIFIERS, Step
from .evaluate import Tape
from .rules import boxable_avgpool
from ..receptive_field import clip_box
from .walk import rearrangement_index, walk

FAKE_BATCH = 1  # the fake forward behind shapes and receptive fields runs on one image

#: Kinds that act position by position on a grid (a box goes through them unchanged).
POSITIONWISE = ("relu", "relu6", "activation", "bn", "add", "bias", "identity", "scale", "lrn", "gate")


@dataclass(frozen=True)
class Labels:
    """What each dimension of a step's output is: ``N`` (images), ``C`` (channels), ``H``/``W``
    (a grid), ``L`` (a grid flattened into tokens, ``grid`` its (h, w) and ``prefix`` the
    constant tokens before it, a class token), ``1`` (a dimension of size one), ``X`` (other)."""

    dims: Tuple[str, ...]
    grid: Optional[Tuple[int, int]] = None
    prefix: int = 0

    def layout(self) -> Optional[str]:
        dims = tuple("C" if d == "1" else d for d in self.dims)
        if dims == ("N", "C", "H", "W"):
            return "NCHW"
        if dims == ("N", "H", "W", "C"):
            return "NHWC"
        if dims == ("N", "L", "C") and self.grid is not None:
            return "tokens"
        return None


UNKNOWN = Labels(())


class Geometry:
    """Shapes, layouts, presentation and receptive boxes of ``graph`` for images of ``size``."""

    def __init__(self, graph: Graph, size: Tuple[int, int]) -> None:
        if min(size) < 1:
            raise ValueError(f"Deconvnet: image size {size} must be positive")
        self.graph, self.size = graph, (int(size[0]), int(size[1]))
        self.failure: Optional[ValueError] = None  # where images of this size stop fitting the model
        self.tape = self._fake_forward()
        self.shapes: Dict[str, torch.Size] = self.tape.shapes
        self.labels: Dict[str, Labels] = {}
        # Where labels are lost (a window partition, a head split): for each element of one
        # image's output, the flat grid position (y * W + x) it lives at, and the grid.
        self.places: Dict[str, Tuple[torch.Tensor, Tuple[int, int]]] = {}
        for name in graph.order:
            if name in self.shapes:
                labels = self._labels_of(graph.steps[name])
                self.labels[name] = labels if len(labels.dims) == len(self.shapes[name]) else UNKNOWN
                if self.labels[name].layout() is None:
                    self._track(graph.steps[name])
        self._views: Dict[str, View] = {}
        self._rearrangements: Dict[str, Tuple[str, torch.Tensor, bool]] = {}

    def _fake_forward(self) -> Tape:
        from torch._subclasses.fake_tensor import FakeTensorMode

        graph = self.graph
        tape = Tape()
        weight = next(iter(graph.model.parameters()), None)
        like = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
        last = graph.output if graph.output is not None else graph.order[-1]
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            fake = torch.empty((FAKE_BATCH, 3) + self.size, **like)
            try:
                for _ in walk(graph, fake, [last], tape=tape):
                    pass
            except ValueError as error:
                # Images of this size do not fit past some step (a classifier sized for another
                # input): the steps before it keep their shapes; asking about one after it
                # raises this error (see ``shape``).
                self.failure = error
        tape.switches.clear()
        tape.norm_inputs.clear()
        tape.saved.clear()
        return tape

    # -- layouts --------------------------------------------------------------------------------

    def _labels_of(self, step: Step) -> Labels:
        shape = tuple(self.shapes[step.name])
        kind = step.kind
        if kind == "input":
            return Labels(("N", "C", "H", "W"))
        sources = self.graph.signal_inputs(step.name) or step.inputs
        src = self.labels.get(sources[0], UNKNOWN) if sources else UNKNOWN
        src_shape = tuple(self.shapes[sources[0]]) if sources and sources[0] in self.shapes else ()
        if kind in ("conv", "maxpool", "avgpool", "lrn", "bn"):
            return Labels(("N", "C", "H", "W")) if src.layout() == "NCHW" and len(shape) == 4 else UNKNOWN
        if kind in ("affine", "frozen", "opaque"):
            return UNKNOWN
        if kind == "linear":
            return src if src.dims and src.dims[-1] in ("C", "1") and len(shape) == len(src_shape) > 2 else UNKNOWN
        if kind == "cat":
            pieces = step.options["pieces"]
            first = next(p for p in pieces if p is not None)
            labels = self.labels.get(first, UNKNOWN)
            dim = step.options["dim"] % len(shape)
            if labels.dims and labels.dims[dim] == "L":
                leading = sum(self.tape.inputs[step.name][i] for i, p in enumerate(pieces[:pieces.index(first)]))
                if any(p is None for p in pieces[pieces.index(first) + 1:]) or sum(p is not None for p in pieces) > 1:
                    return UNKNOWN
                return Labels(labels.dims, labels.grid, labels.prefix + leading)
            return labels if len(shape) == len(labels.dims) else UNKNOWN
        if kind == "rearrange":
            return self._rearranged(step, src, src_shape, shape)
        # Position by position (activations, norms, gates, products, attention, adds…).
        return src if len(shape) == len(src_shape) else UNKNOWN

    def _place(self, name: str) -> Optional[Tuple[torch.Tensor, Tuple[int, int]]]:
        """Step ``name``'s places: tracked, or from its grid layout."""
        if name in self.places:
            return self.places[name]
        layout = self.layout(name)
        if layout not in ("NCHW", "NHWC"):
            return None
        c, h, w = self.presented_shape(name)
        grid = torch.arange(h * w).view(h, w)
        place = grid.view(1, h, w).expand(c, h, w) if layout == "NCHW" else grid.view(h, w, 1).expand(h, w, c)
        return place, (h, w)

    def _track(self, step: Step) -> None:
        """Follow places through a step whose labels are lost, and give it a grid layout again
        where its elements sit as a (C, H, W) or (H, W, C) grid of the tracked positions (MaxViT's
        window departition)."""
        shape = tuple(int(d) for d in self.shapes[step.name][1:])
        found = None
        inputs = self.graph.signal_inputs(step.name) or step.inputs
        if step.kind == "rearrange" and inputs:
            source = self._place(inputs[0])
            if source is not None:
                try:
                    index = rearrangement_index(self.graph, step, self.tape.inputs[step.name], self.tape.env,
                                                torch.device("cpu"))
                except Exception:  # noqa: BLE001 (an index map that cannot be made: no places)
                    index = None
                if index is not None:
                    flat = source[0].reshape(-1)
                    found = (torch.where(index >= 0, flat[index.clamp(min=0)], torch.full_like(index, -1)), source[1])
        elif step.kind in POSITIONWISE + ("norm", "product", "attention"):
            for name in inputs:
                source = self._place(name)
                if source is not None and tuple(source[0].shape) == shape:
                    found = source
                    break
        elif step.kind == "linear" and inputs:
            source = self._place(inputs[0])
            if source is not None and source[0].dim() == len(shape) and bool((source[0] == source[0][..., :1]).all()):
                found = (source[0][..., :1].expand(shape), source[1])
        if found is None:
            return
        place, (h, w) = found
        grid = torch.arange(h * w).view(h, w)
        if shape == (shape[0], h, w) and torch.equal(place, grid.view(1, h, w).expand(shape)):
            self.labels[step.name] = Labels(("N", "C", "H", "W"))
        elif shape == (h, w, shape[-1]) and torch.equal(place, grid.view(h, w, 1).expand(shape)):
            self.labels[step.name] = Labels(("N", "H", "W", "C"))
        else:
            self.places[step.name] = found

    def _rearranged(self, step: Step, src: Labels, before: Tuple[int, ...], after: Tuple[int, ...]) -> Labels:
        if not src.dims or len(src.dims) != len(before):
            return UNKNOWN
        dims = _permutation(step, len(before))
        if dims is not None:
            return Labels(tuple(src.dims[d] for d in dims), src.grid, src.prefix)
        node = step.node
        if node is not None and node.op == "call_function" and node.target is operator.getitem:
            return _indexed(src, node.args[1], len(before))
        if len(after) == len(before):
            return src
        return _reshaped(src, before, after)

    def shape(self, name: str) -> torch.Size:
        """Step ``name``'s output shape for one image; the fake pass's error where images of
        this size do not reach it."""
        found = self.shapes.get(name)
        if found is None:
            if self.failure is not None:
                raise self.failure
            raise ValueError(f"Deconvnet: step {name!r} is not computed from the image")
        return found

    def layout(self, name: str) -> Optional[str]:
        """``"NCHW"``, ``"NHWC"``, ``"tokens"`` or ``None`` for step ``name``'s output."""
        labels = self.labels.get(name)
        return None if labels is None else labels.layout()

    def is_map(self, name: str) -> bool:
        """Whether step ``name``'s output is a feature map or a token grid (presentable as
        ``(B, C, H, W)``)."""
        layout = self.layout(name)
        if layout == "tokens":
            labels = self.labels[name]
            return self.shapes[name][1] == labels.prefix + labels.grid[0] * labels.grid[1]
        return layout is not None

    def view(self, name: str) -> View:
        """How step ``name``'s output is seen going down (:class:`~.boxes.View`)."""
        found = self._views.get(name)
        if found is None:
            found = self._views[name] = View(self.layout(name), tuple(self.shape(name)[1:]))
        return found

    def presented_shape(self, name: str) -> Tuple[int, int, int]:
        """``(C, H, W)`` of step ``name`` as a map."""
        shape = tuple(int(d) for d in self.shape(name)[1:])
        layout = self.layout(name)
        if layout == "NHWC":
            return shape[2], shape[0], shape[1]
        if layout == "tokens":
            h, w = self.labels[name].grid
            return shape[1], h, w
        return shape  # type: ignore[return-value]

    def present(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Step ``name``'s raw output ``(N, …)`` as ``(N, C, H, W)``: channels-last grids
        permuted (a view), token sequences without their class token on the patch grid."""
        layout = self.layout(name)
        if layout == "NHWC":
            return value.permute(0, 3, 1, 2)
        if layout == "tokens":
            labels = self.labels[name]
            h, w = labels.grid
            return value[:, labels.prefix:, :].transpose(1, 2).reshape(value.shape[0], value.shape[2], h, w)
        return value

    def token(self, name: str) -> int:
        """The index of patch (0, 0) in a token layer's sequence (after its class token)."""
        return self.labels[name].prefix

    # -- rearrangements ------------------------------------------------------------------------

    def rearrangement(self, step: Step) -> Tuple[str, torch.Tensor, bool]:
        """``("swap", flat index, True)`` for a permute between channels first and channels
        last (the same presented map); ``("channels", source channel of each output channel,
        injective)`` when the step only permutes or selects whole channels of a map (a channel
        shuffle); else ``("flat", flat index of each output element (-1: padding),
        injective)``. On the CPU; the engine caches copies per device."""
        found = self._rearrangements.get(step.name)
        if found is not None:
            return found
        input_shape = self.tape.inputs[step.name]
        index = rearrangement_index(self.graph, step, input_shape, self.tape.env, torch.device("cpu"))
        valid = index[index >= 0]
        injective = valid.numel() == torch.unique(valid).numel()
        found = ("flat", index, injective)
        source = self.graph.steps[step.name].inputs[0]
        before, after = self.view(source), self.view(step.name)
        if before.boxed and after.boxed and before.presented == after.presented and before.layout != after.layout:
            ident = torch.arange(math.prod(before.raw_shape)).view((1,) + before.raw_shape)
            if torch.equal(after.unpresent(before.present(ident))[0], index):
                found = ("swap", index, True)
        if found[0] == "flat" and index.dim() == 3 and len(input_shape) == 4 and \
                tuple(index.shape[1:]) == tuple(input_shape[2:]) and self.layout(step.name) == "NCHW":
            plane = input_shape[2] * input_shape[3]
            base = index[:, :1, :1]
            channel = base.flatten() // plane
            if bool((base % plane == 0).all()) and torch.equal(index, base + torch.arange(plane).view(1, *index.shape[1:])):
                found = ("channels", channel, injective)
        self._rearrangements[step.name] = found
        return found

    # -- receptive boxes -------------------------------------------------------------------------

    def passes_box(self, step: Step) -> bool:
        """Whether a box on step's output goes to its inputs unchanged (a positionwise step on a
        grid, a cat over channels, a channel shuffle or a layout swap)."""
        layout = self.layout(step.name)
        if layout not in ("NCHW", "NHWC"):
            return False
        kind = step.kind
        if kind in POSITIONWISE:
            return all(self.layout(i) in ("NCHW", "NHWC") and self.view(i).presented == self.view(step.name).presented
                       for i in self.graph.signal_inputs(step.name))
        if kind == "linear":
            return layout == "NHWC" and self.layout(step.inputs[0]) == "NHWC"
        if kind == "norm":
            how = step.options["how"]
            return self.layout(step.inputs[0]) == layout and (
                (how == "layer2d" and layout == "NCHW") or (how in ("layer", "rms") and layout == "NHWC"
                                                            and len(self.shapes[step.name]) == 4
                                                            and _normalised_dims(step) == 1))
        if kind == "product":
            source = self.graph.signal_inputs(step.name)[0]
            return self.view(source).raw_shape == self.view(step.name).raw_shape and self.layout(source) == layout
        if kind == "cat":
            dim = step.options["dim"] % 4
            return dim == {"NCHW": 1, "NHWC": 3}[layout] and all(
                self.layout(p) == layout for p in step.options["pieces"] if p is not None)
        if kind == "rearrange":
            return self.rearrangement(step)[0] in ("swap", "channels")
        return False

    def receptive_box(self, name: str, y: int, x: int) -> Tuple[int, int, int, int]:
        """Unclipped ``(y0, x0, h, w)`` of the pixels activation ``(y, x)`` of step ``name``
        can reach: down every path, the union where branches meet, the whole image below an
        operation that mixes positions (attention, adaptive pooling, a spatial reshape)."""
        whole = (0, 0) + self.size
        self.shape(name)
        if not self.view(name).boxed:
            return whole
        boxes: Dict[str, Tuple[int, int, int, int]] = {name: (y, y + 1, x, x + 1)}
        for step_name in reversed(self.graph.signal_ancestors(name)):
            box = boxes.pop(step_name, None)
            if box is None:
                continue
            step = self.graph.steps[step_name]
            if step.kind == "input":
                y0, y1, x0, x1 = box
                return y0, x0, y1 - y0, x1 - x0
            if step.kind in ("conv", "maxpool") or (step.kind == "avgpool" and boxable_avgpool(step)):
                from ..receptive_field import down

                y0, h = down(box[0], box[1] - box[0], step.window, 0)
                x0, w = down(box[2], box[3] - box[2], step.window, 1)
                below = (y0, y0 + h, x0, x0 + w)
            elif self.passes_box(step):
                below = box
            else:
                return whole
            for source in self.graph.signal_inputs(step_name):
                old = boxes.get(source)
                boxes[source] = below if old is None else (
                    min(old[0], below[0]), max(old[1], below[1]), min(old[2], below[2]), max(old[3], below[3]))
        raise ValueError(f"Deconvnet: {name!r} does not depend on the image")

    def field_lengths(self, name: str) -> Tuple[List[int], List[int]]:
        """The clipped receptive-field height of each row and width of each column of step
        ``name``'s map (boxes go down each axis separately, so the field of (i, i) gives row
        i's extent and column i's)."""
        _, h, w = self.presented_shape(name)
        per_axis: Tuple[List[int], List[int]] = ([], [])
        for i in range(max(h, w)):
            y0, x0, bh, bw = self.receptive_box(name, min(i, h - 1), min(i, w - 1))
            if i < h:
                per_axis[0].append(min(y0 + bh, self.size[0]) - max(y0, 0))
            if i < w:
                per_axis[1].append(min(x0 + bw, self.size[1]) - max(x0, 0))
        return per_axis

    # -- what a recording keeps -------------------------------------------------------------------

    def kept_bytes(self, kept: Sequence[str], below: Sequence[str]) -> int:
        """Bytes a recording keeps per image: the outputs of ``kept`` at 4 bytes an element, and
        what the rules of ``below`` save (switches at 1 byte, activations' inputs, attention
        weights)."""
        total = sum(4 * math.prod(self.shape(name)[1:]) for name in dict.fromkeys(kept))
        for name in below:
            step = self.graph.steps[name]
            if step.kind == "maxpool":
                total += math.prod(self.shapes[name][1:])
            elif step.kind in ("lrn", "activation"):
                total += 4 * math.prod(self.shapes[step.inputs[0]][1:])
            elif step.kind == "attention" and step.options["how"] == "mha":
                length = int(self.shapes[name][1])
                total += 4 * step.module.num_heads * length * length
            elif step.kind == "attention":
                total += 4 * math.prod(self.shapes[name][1:]) * 8  # windows of tokens: weights ~ a few maps
        return total


def _normalised_dims(step: Step) -> int:
    if step.module is not None:
        return len(getattr(step.module, "normalized_shape", (0,)))
    args = step.node.args
    shape = args[1] if len(args) > 1 else step.node.kwargs.get("normalized_shape")
    return 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (tuple, list)) else 0


def _permutation(step: Step, ndim: int) -> Optional[Tuple[int, ...]]:
    """The dims of a permute/transpose/swapaxes step (``None`` for other rearrangements)."""
    if isinstance(step.module, torchvision.ops.Permute):
        return tuple(int(d) % ndim for d in step.module.dims)
    node = step.node
    if node is None:
        return None
    target = node.target
    args = list(node.args[1:])
    if target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = node.kwargs.get("dims", dims)
        if not all(isinstance(d, int) for d in dims):
            return None
        return tuple(int(d) % ndim for d in dims)
    if target in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
        if len(args) < 2 or not all(isinstance(a, int) for a in args[:2]):
            return None
        a, b = args[0] % ndim, args[1] % ndim
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    return None


def _indexed(src: Labels, index: Any, ndim: int) -> Labels:
    """Labels after ``x[index]``: integer indices drop their dimension, slices keep it."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(item is None or isinstance(item, fx.Node) for item in items):
        return UNKNOWN
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (ndim - len(items))
    dims = tuple(d for d, item in zip(src.dims, items) if not isinstance(item, int))
    if len(dims) == len(src.dims):
        return src
    return Labels(dims, src.grid, src.prefix) if "L" in dims else Labels(dims)


def _reshaped(src: Labels, before: Tuple[int, ...], after: Tuple[int, ...]) -> Labels:
    """Labels after a view/reshape/flatten/(un)squeeze, by aligning sizes: equal sizes keep
    their label, H and W merged become L (remembering the grid), L split into the grid becomes
    H and W, dimensions of size one come and go, anything else is X."""
    out: List[str] = []
    grid, prefix = src.grid, src.prefix
    i = j = 0
    while j < len(after):
        if i < len(before) and before[i] == after[j]:
            out.append(src.dims[i])
            i, j = i + 1, j + 1
            continue
        if after[j] == 1:
            out.append("1")
            j += 1
            continue
        if i < len(before) and before[i] == 1:
            i += 1
            continue
        k, product = i, 1
        while k < len(before) and product < after[j]:
            product *= before[k]
            k += 1
        if product == after[j] and k - i > 1:
            merged = src.dims[i:k]
            if merged == ("H", "W"):
                out.append("L")
                grid, prefix = (before[i], before[i + 1]), 0
            else:
                out.append("X")
            i, j = k, j + 1
            continue
        k, product = j, 1
        while i < len(before) and k < len(after) and product < before[i]:
            product *= after[k]
            k += 1
        if i < len(before) and product == before[i] and k - j > 1:
            if src.dims[i] == "L" and src.grid == tuple(after[j:k]) and src.prefix == 0:
                out.extend(("H", "W"))
            else:
                out.extend("X" * (k - j))
            i, j = i + 1, k
            continue
        return UNKNOWN
    if i != len(before) and not all(d == 1 for d in before[i:]):
        return UNKNOWN
    return Labels(tuple(out), grid if "L" in out else None, prefix if "L" in out else 0)


class ModelGeometry:
    """Layer-level sizes, layouts and receptive fields of one model, for any input size, from its
    traced graph (no recording, no projection): what pages, pass 1 and batch sizing need.
    :class:`~.deconvnet.Deconvnet` extends it."""

    def __init__(self, model: nn.Module) -> None:
        from .capture import graph_of

        self.model = model
        self.graph: Graph = graph_of(model)
        self.layers: List[str] = list(self.graph.layers)

    def resolve(self, layer: str) -> str:
        """The graph step a layer name (node name, alias or module path) stands for."""
        return self.graph.resolve(layer)

    def layout_of(self, layer: str) -> str:
        """How ``layer``'s raw output is laid out: ``"NCHW"``, ``"NHWC"`` (a channels-last grid)
        or ``"tokens"`` (``(B, [class,] H*W, C)``); ``rec.activations`` always presents it as
        ``(B, C, H, W)``."""
        name = self.resolve(layer)
        return self.graph.geometry(self.graph.canonical_size).layout(name) or "NCHW"

    def _below(self, targets: Sequence[str]) -> List[str]:
        seen: Dict[str, None] = {}
        for name in targets:
            seen.update(dict.fromkeys(self.graph.ancestors(name)))
        return [name for name in self.graph.order if name in seen]

    def _kept(self, name: str) -> bool:
        return self.graph.steps[name].kind in RECTIFIERS or name in self.graph.nodes

    # -- sizes and receptive fields -----------------------------------------------------------

    def geometry(self, image_size: Tuple[int, int]) -> Geometry:
        """Shapes, layouts and receptive boxes for images of ``image_size``, computed once per
        size from a forward on fake tensors. Raises ``ValueError`` naming the step where the
        images do not fit the model, when that is at or before one of its layers (a classifier
        sized for another input does not matter here)."""
        geometry = self.graph.geometry(image_size)
        if geometry.failure is not None and any(name not in geometry.shapes for name in self.graph.nodes):
            raise geometry.failure
        return geometry

    def layout(self, image_size: Tuple[int, int]) -> Tape:
        """Every step's output shape (and the graph's sizes) for one image of ``image_size``."""
        return self.geometry(image_size).tape

    def map_sizes(self, image_size: Tuple[int, int]) -> Dict[str, Tuple[int, int]]:
        """``{layer: (h, w)}`` of every projectable layer (by the names of ``layers``) for images
        of ``image_size``."""
        geometry = self.geometry(image_size)
        return {layer: geometry.presented_shape(step)[1:] for layer, step in zip(self.layers, self.graph.nodes)}

    def recorded_bytes(self, image_size: Tuple[int, int], layers: Optional[Sequence[str]] = None) -> int:
        """Bytes a recording keeps per image of ``image_size`` (maps at 4 bytes an element,
        switches at 1), for ``record(images, layers)`` (the forward's own peak comes on top)."""
        targets = [self.resolve(layer) for layer in (self.layers if layers is None else layers)]
        below = self._below(targets)
        return self.geometry(image_size).kept_bytes([n for n in below if self._kept(n)] + targets, below)

    def shape_of(self, layer: str, image_size: Tuple[int, int]) -> Tuple[int, ...]:
        """One image's shape of ``layer`` as presented (``(C, h, w)`` for a feature map or a
        token grid)."""
        name = self.resolve(layer)
        geometry = self.geometry(image_size)
        if geometry.is_map(name):
            return tuple(int(d) for d in geometry.presented_shape(name))
        return tuple(int(d) for d in geometry.shapes[name][1:])

    def num_channels(self) -> Dict[str, int]:
        """Feature maps per projectable layer (by the names of ``layers``)."""
        geometry = self.geometry(self.graph.canonical_size)
        return {layer: int(geometry.presented_shape(step)[0]) for layer, step in zip(self.layers, self.graph.nodes)}

    def receptive_box(self, layer: str, y: int, x: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """Unclipped ``(y0, x0, h, w)`` of the pixels activation ``(y, x)`` of ``layer`` can
        reach: down every path, the union where branches meet, the whole image below an
        operation that mixes positions."""
        return self.geometry(image_size).receptive_box(self.resolve(layer), y, x)

    def receptive_field(self, layer: str, y: int, x: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (half-open, clipped to the image) that activation
        ``(y, x)`` of ``layer`` sees in images of ``image_size``. ``(y, x)`` outside the
        layer's map raises ``IndexError``."""
        if image_size is None or len(tuple(image_size)) != 2:
            raise TypeError("Deconvnet.receptive_field: image_size must be (height, width)")
        size = (int(image_size[0]), int(image_size[1]))
        name = self.resolve(layer)
        geometry = self.geometry(size)
        if not geometry.is_map(name):
            raise ValueError(f"Deconvnet.receptive_field: {layer} is not a feature map")
        _, height, width = geometry.presented_shape(name)
        for axis, value, limit in (("y", y, height), ("x", x, width)):
            if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)) or (
                isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point())
            ):
                raise TypeError(f"Deconvnet.receptive_field: {axis} must be an int, got {value!r}")
            if not 0 <= int(value) < limit:
                raise IndexError(
                    f"Deconvnet.receptive_field: {axis}={int(value)} is outside the {height}x{width} map of {layer} "
                    f"(images {size[0]}x{size[1]})"
                )
        return clip_box(*geometry.receptive_box(name, int(y), int(x)), size)

