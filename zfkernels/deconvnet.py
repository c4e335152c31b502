"""The deconvnet engine for any ReLU CNN: record a batch of images once, then project any number
of selected activations down to pixel space in large batches, with the zfkernels ops doing the
work.

Semantics (GUIDE section 2; docs/engine.md has the table): the projection of a seed at a layer
is the gradient of <seed, activation> with respect to the image, with every rectifier's backward
replaced by ``relu(signal)`` (``mode="deconvnet"``), ``relu(signal) * [x > 0]`` ("guided") or
kept (``signal * [x > 0]``, "backprop"; ReLU6's mask is ``0 < x < 6``), and every other
operation's exact transpose with biases dropped: convolutions through ``ops.project``,
BatchNorm as a per-channel scale folded into the convolution below it, max pooling through
``ops.unpool`` with the recorded switches, average pooling as its adjoint, a residual add
sending the signal to both inputs, cat/chunk/shuffle/view by slicing and permuting,
normalisations skipped in deconvnet mode, the rest (linear, adaptive pooling) as autograd.

The graph comes from :mod:`zfkernels.graph`. A single activation (``positions``) is projected
inside a box per selection (an origin, which may lie in the padding, and a size common to the
batch) instead of the whole map: boxes go down convolutions and poolings exactly, merge as
their union where branches meet, and become the whole map only where an operation mixes
positions (adaptive pooling, a spatial reshape). On a conv/BN/ReLU/pool chain the box is the
receptive field, so the cost does not grow with the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .graph import RECTIFIERS, Graph, Step, Tape, evaluate, graph_of, normalise, rearrangement_index, walk
from .receptive_field import Window, clip_box, down

MODES = ("deconvnet", "guided", "backprop")
IndexLike = Union[torch.Tensor, Sequence[int]]
LAYOUT_BATCH = 1  # the fake forward behind map sizes and receptive fields runs on one image


@dataclass
class Recording:
    """One forward pass: the outputs of every rectifier and projectable step below the recorded
    layers (``activations[step]``), the uint8 switches of every max pool, the normalisations'
    inputs, every step's output shape, and the graph's non-tensor values (sizes)."""

    images_shape: Tuple[int, ...]
    activations: Dict[str, torch.Tensor]
    switches: Dict[str, torch.Tensor]
    norm_inputs: Dict[str, torch.Tensor]
    shapes: Dict[str, torch.Size]
    tape: Tape = field(repr=False, default_factory=Tape)
    owner: object = field(repr=False, default=None)

    @property
    def num_images(self) -> int:
        return self.images_shape[0]


@dataclass
class Signal:
    """The signal on one step's output going down: ``value`` ``(B, C, h, w)`` on ``box`` of the
    map (``None``: not a feature map, the whole tensor), or with ``channels`` ``(B,)`` a single
    channel per selection, ``value`` ``(B, 1, h, w)``."""

    value: torch.Tensor
    box: Optional["Box"]
    channels: Optional[torch.Tensor] = None


class Deconvnet:
    """``dn = Deconvnet(model)``; ``rec = dn.record(images)``; ``dn.project(rec, layer, rows,
    channels, positions=None)`` -> ``(B, 3, H, W)`` projections in pixel space.

    ``model`` is any ``nn.Module`` that torchvision's feature-extraction tracer can trace and
    that is built from the supported operations (:mod:`zfkernels.graph`); anything else raises
    ``ValueError`` here, naming the first unsupported operation and its node. ``layers`` lists
    the projectable layers (node names; the zoo's ``conv1``… aliases where they exist)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph: Graph = graph_of(model)
        self.layers: List[str] = list(self.graph.layers)
        self._plans: Dict[str, "_Plan"] = {}
        self._weights: Dict[Tuple[str, torch.dtype, torch.device], Tuple[Tuple[int, ...], torch.Tensor]] = {}
        self._indices: Dict[Tuple[str, torch.Size, torch.device], Tuple[str, torch.Tensor, bool]] = {}
        self._extents: Dict[Tuple[str, Tuple[int, int], torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def resolve(self, layer: str) -> str:
        """The graph step a layer name (node name, alias or module path) stands for."""
        return self.graph.resolve(layer)

    # -- forward ------------------------------------------------------------------------------

    def record(self, images: torch.Tensor, layers: Optional[Sequence[str]] = None) -> Recording:
        """One forward pass over ``(N, 3, H, W)`` float images, as far as the deepest of
        ``layers`` (default: every projectable layer), keeping what projections need."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Deconvnet.record: images must be an (N, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"Deconvnet.record: images must be floating point, got {images.dtype}")
        weight = next(iter(self.model.parameters()), None)
        if weight is not None and images.device != weight.device:
            raise ValueError(
                f"Deconvnet.record: images are on {images.device} but the model is on {weight.device}; "
                "move one to the other"
            )
        if weight is not None and images.dtype != weight.dtype:
            raise TypeError(
                f"Deconvnet.record: images are {images.dtype} but the model is {weight.dtype}; "
                "convert one to the other (model.to(dtype) or images.to(dtype))"
            )
        targets = [self.resolve(layer) for layer in (self.layers if layers is None else layers)]
        self.layout((images.shape[-2], images.shape[-1]))  # images too small for the model: say so first
        wanted = [name for name in self._below(targets) if self._kept(name)] + targets
        tape = Tape()
        with torch.no_grad():
            activations = dict(walk(self.graph, images, wanted, keep=wanted, tape=tape))
        for alias, step in self.graph.aliases.items():  # the zoo's names reach the same tensors
            if step in activations:
                activations[alias] = activations[step]
        return Recording(tuple(images.shape), activations, tape.switches, tape.norm_inputs, tape.shapes, tape, owner=self)

    def _below(self, targets: Sequence[str]) -> List[str]:
        seen: Dict[str, None] = {}
        for name in targets:
            seen.update(dict.fromkeys(self.graph.ancestors(name)))
        return [name for name in self.graph.order if name in seen]

    def _kept(self, name: str) -> bool:
        return self.graph.steps[name].kind in RECTIFIERS or name in self.graph.nodes

    # -- sizes and receptive fields -----------------------------------------------------------

    def layout(self, image_size: Tuple[int, int]) -> Tape:
        """Every step's output shape (and the graph's sizes) for one image of ``image_size``,
        from a forward on fake tensors (no computation), up to the deepest projectable layer.
        Raises ``ValueError`` naming the step where the images are too small for the model."""
        size = (int(image_size[0]), int(image_size[1]))
        if min(size) < 1:
            raise ValueError(f"Deconvnet: image size {size} must be positive")
        tape = self.graph.layouts.get(size)
        if tape is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            tape = Tape()
            last = self.graph.nodes[-1] if self.graph.nodes else self.graph.output
            weight = next(iter(self.model.parameters()), None)
            like = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                fake = torch.empty((LAYOUT_BATCH, 3) + size, **like)
                for _ in walk(self.graph, fake, [last], tape=tape):
                    pass
            tape.switches.clear()
            tape.norm_inputs.clear()
            self.graph.layouts[size] = tape
        return tape

    def map_sizes(self, image_size: Tuple[int, int]) -> Dict[str, Tuple[int, int]]:
        """``{layer: (h, w)}`` of every projectable layer (by the names of ``layers``) for images
        of ``image_size``."""
        shapes = self.layout(image_size).shapes
        return {layer: (int(shapes[step][-2]), int(shapes[step][-1]))
                for layer, step in zip(self.layers, self.graph.nodes) if len(shapes[step]) == 4}

    def recorded_bytes(self, image_size: Tuple[int, int], layers: Optional[Sequence[str]] = None) -> int:
        """Bytes a recording keeps per image of ``image_size`` (maps at 4 bytes an element,
        switches at 1), for ``record(images, layers)`` (the forward's own peak comes on top)."""
        tape = self.layout(image_size)
        targets = [self.resolve(layer) for layer in (self.layers if layers is None else layers)]
        total = 0
        for name in dict.fromkeys([n for n in self._below(targets) if self._kept(n)] + targets):
            total += 4 * math.prod(tape.shapes[name][1:])
        for name in self._below(targets):
            kind = self.graph.steps[name].kind
            if kind in ("maxpool", "lrn"):
                total += (1 if kind == "maxpool" else 4) * math.prod(tape.shapes[name if kind == "maxpool" else
                                                                               self.graph.steps[name].inputs[0]][1:])
        return total

    def shape_of(self, layer: str, image_size: Tuple[int, int]) -> Tuple[int, ...]:
        """One image's output shape of ``layer`` (``(C, h, w)`` for a feature map)."""
        return tuple(int(d) for d in self.layout(image_size).shapes[self.resolve(layer)][1:])

    def num_channels(self) -> Dict[str, int]:
        """Feature maps per projectable layer (by the names of ``layers``)."""
        shapes = self.layout((224, 224)).shapes
        return {layer: int(shapes[step][1]) for layer, step in zip(self.layers, self.graph.nodes)}

    def receptive_box(self, layer: str, y: int, x: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """Unclipped ``(y0, x0, h, w)`` of the pixels activation ``(y, x)`` of ``layer`` can
        reach: down every path, the union where branches meet, the whole map below an operation
        that mixes positions."""
        name = self.resolve(layer)
        tape = self.layout(image_size)
        boxes: Dict[str, Tuple[int, int, int, int]] = {name: (y, y + 1, x, x + 1)}
        for step_name in reversed(self.graph.ancestors(name)):
            box = boxes.pop(step_name, None)
            if box is None:
                continue
            step = self.graph.steps[step_name]
            if step.kind == "input":
                y0, y1, x0, x1 = box
                return y0, x0, y1 - y0, x1 - x0
            for source in step.inputs:
                below = self._box_below(step, box, tape, source)
                old = boxes.get(source)
                boxes[source] = below if old is None else (
                    min(old[0], below[0]), max(old[1], below[1]), min(old[2], below[2]), max(old[3], below[3]))
        raise ValueError(f"Deconvnet: {layer!r} does not depend on the image")

    def _box_below(self, step: Step, box: Tuple[int, int, int, int], tape: Tape,
                   source: str) -> Tuple[int, int, int, int]:
        shapes = tape.shapes
        if step.kind in ("conv", "maxpool") or (step.kind == "avgpool" and _boxable_avgpool(step)):
            y0, h = down(box[0], box[1] - box[0], step.window, 0)
            x0, w = down(box[2], box[3] - box[2], step.window, 1)
            return y0, y0 + h, x0, x0 + w
        if step.kind in _POSITIONWISE or (step.kind == "cat" and _cat_dim(step, shapes) == 1) or (
                step.kind == "rearrange" and self._rearrangement(step, tape)[0] == "channels"):
            return box
        below = shapes[source]
        return (0, int(below[-2]), 0, int(below[-1])) if len(below) == 4 else box

    def receptive_field(self, layer: str, y: int, x: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (half-open, clipped to the image) that activation
        ``(y, x)`` of ``layer`` sees in images of ``image_size``. ``(y, x)`` outside the
        layer's map raises ``IndexError``."""
        if image_size is None or len(tuple(image_size)) != 2:
            raise TypeError("Deconvnet.receptive_field: image_size must be (height, width)")
        size = (int(image_size[0]), int(image_size[1]))
        name = self.resolve(layer)
        shape = self.layout(size).shapes.get(name)
        if shape is None or len(shape) != 4:
            raise ValueError(f"Deconvnet.receptive_field: {layer} is not a feature map")
        height, width = int(shape[-2]), int(shape[-1])
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
        return clip_box(*self.receptive_box(layer, int(y), int(x), size), size)

    # -- projection ---------------------------------------------------------------------------

    def _index(self, name: str, values: IndexLike, length: Optional[int], limit: int, what: str) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            # No dtype= here: that would truncate a list of floats to ints silently.
            values = torch.as_tensor(values)
            if values.numel() == 0:
                values = values.to(torch.int64)
        if values.dtype != torch.int64:
            raise TypeError(f"Deconvnet.project: {name} must be int64, got {values.dtype}")
        if values.dim() != 1 or (length is not None and values.shape[0] != length):
            want = "1-D" if length is None else f"1-D of length {length}"
            raise ValueError(f"Deconvnet.project: {name} must be {want}, got shape {tuple(values.shape)}")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
            raise ValueError(f"Deconvnet.project: {name} holds values outside [0, {limit}) ({what})")
        return values

    def project(
        self,
        rec: Recording,
        layer: str,
        rows: IndexLike,
        channels: IndexLike,
        positions: Optional[torch.Tensor] = None,
        *,
        mode: str = "deconvnet",
        chunk_size: int = 256,
    ) -> torch.Tensor:
        """Project selections to pixel space: for each ``b``, image ``rows[b]``, feature map
        ``channels[b]`` of ``layer``, and with ``positions`` (int64 ``(B, 2)`` of ``(y, x)``)
        only that activation, else the whole map. Selections go down the graph as one batch of
        at most ``chunk_size`` (a memory bound), sharing their image's switches. Returns
        ``(B, 3, H, W)``."""
        if not isinstance(rec, Recording):
            raise TypeError(f"Deconvnet.project: rec must be a Recording from Deconvnet.record, got {type(rec).__name__}")
        if rec.owner is not self:
            raise ValueError("Deconvnet.project: rec was recorded by another Deconvnet (record with this one)")
        if mode not in MODES:
            raise ValueError(f"Deconvnet.project: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if chunk_size < 1:
            raise ValueError(f"Deconvnet.project: chunk_size must be positive, got {chunk_size}")
        name = self.resolve(layer)
        if name not in rec.activations:
            raise ValueError(f"Deconvnet.project: {layer} was not recorded (record(images, layers=[...]) stopped before it)")
        act = rec.activations[name]
        rows = self._index("rows", rows, None, rec.num_images, f"{rec.num_images} recorded images").to(act.device)
        channels = self._index("channels", channels, rows.shape[0], act.shape[1], f"{layer} has {act.shape[1]} feature maps").to(act.device)
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
                raise TypeError("Deconvnet.project: positions must be an int64 tensor of (y, x) rows")
            if act.dim() != 4:
                raise ValueError(f"Deconvnet.project: {layer} is not a feature map; project it without positions")
            if positions.shape != (rows.shape[0], 2):
                raise ValueError(f"Deconvnet.project: positions must be ({rows.shape[0]}, 2), got {tuple(positions.shape)}")
            positions = positions.to(act.device)
            h, w = act.shape[-2:]
            if positions.numel() and not (
                bool((positions >= 0).all()) and int(positions[:, 0].max()) < h and int(positions[:, 1].max()) < w
            ):
                raise ValueError(f"Deconvnet.project: positions hold (y, x) outside the {h}x{w} map of {layer}")
        height, width = rec.images_shape[-2:]
        batch = rows.shape[0]
        if batch == 0:
            return act.new_zeros((0, 3, height, width))
        if batch <= chunk_size:
            return self._project_chunk(rec, name, rows, channels, positions, mode)
        out = act.new_empty((batch, 3, height, width))
        # Chunks of selections with similar receptive fields on the image: a chunk computes on
        # boxes of a size common to it, so a chunk of corner activations (fields mostly off
        # the image) stays small instead of taking the size of a central one.
        order = None if positions is None else self.field_order(name, positions, (height, width))
        for start in range(0, batch, chunk_size):
            part = slice(start, start + chunk_size) if order is None else order[start:start + chunk_size]
            pos = None if positions is None else positions[part]
            out[part] = self._project_chunk(rec, name, rows[part], channels[part], pos, mode)
        return out

    def field_order(self, layer: str, positions: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """The selections at ``positions`` ``(B, 2)`` of ``layer`` ordered by the height, then
        the width, of their receptive fields clipped to images of ``image_size`` (a stable
        sort: ties keep their order)."""
        name = self.resolve(layer)
        size = (int(image_size[0]), int(image_size[1]))
        key = (name, size, positions.device)
        lengths = self._extents.get(key)
        if lengths is None:
            # Boxes go down each axis separately, so the field of (i, i) gives row i's extent
            # and column i's: one receptive_box per diagonal position.
            shape = self.layout(size).shapes[name]
            h, w = int(shape[-2]), int(shape[-1])
            per_axis: List[List[int]] = [[], []]
            for i in range(max(h, w)):
                y0, x0, bh, bw = self.receptive_box(name, min(i, h - 1), min(i, w - 1), size)
                if i < h:
                    per_axis[0].append(min(y0 + bh, size[0]) - max(y0, 0))
                if i < w:
                    per_axis[1].append(min(x0 + bw, size[1]) - max(x0, 0))
            lengths = self._extents[key] = tuple(torch.tensor(v, device=positions.device) for v in per_axis)
        # By height, then width: a chunk's common box is its largest height by its largest
        # width, and this order keeps both small together better than the area alone would.
        key = lengths[0][positions[:, 0]] * (size[1] + 1) + lengths[1][positions[:, 1]]
        return torch.argsort(key, stable=True)

    def _plan(self, top: str) -> "_Plan":
        plan = self._plans.get(top)
        if plan is None:
            plan = self._plans[top] = _Plan.of(self.graph, top)
        return plan

    def _project_chunk(self, rec: Recording, top: str, rows: torch.Tensor, channels: torch.Tensor,
                       positions: Optional[torch.Tensor], mode: str) -> torch.Tensor:
        plan = self._plan(top)
        act = rec.activations[top]
        batch = rows.shape[0]
        if act.dim() != 4:
            value = act.new_zeros((batch,) + tuple(act.shape[1:]))
            value[torch.arange(batch, device=act.device), channels] = act[rows, channels]
            seed = Signal(value, None)
        elif positions is None:
            seed = Signal(act[rows, channels].unsqueeze(1), Box.whole(batch, act.shape[-2], act.shape[-1], act.device), channels)
        else:
            value = act[rows, channels, positions[:, 0], positions[:, 1]].view(batch, 1, 1, 1)
            seed = Signal(value, Box(positions[:, 0].clone(), positions[:, 1].clone(), 1, 1, uniform=False), channels)
        pending: Dict[str, Signal] = {top: seed}
        for name in plan.order:
            signal = pending.pop(name, None)
            if signal is None:
                continue
            step = self.graph.steps[name]
            if step.kind == "input":
                signal = _whole(_dense(signal, 3), rec.shapes[name])
                return signal.value
            for source, part in self._down(step, signal, rec, rows, mode, plan):
                shape = rec.shapes[source]
                part = _settle(part, shape)
                pending[source] = part if source not in pending else _accumulate(pending[source], part, shape)
        raise ValueError(f"Deconvnet: {top!r} does not depend on the image")

    # -- one step down ------------------------------------------------------------------------

    def _down(self, step: Step, signal: Signal, rec: Recording, rows: torch.Tensor, mode: str,
              plan: "_Plan") -> List[Tuple[str, Signal]]:
        kind = step.kind
        shape = rec.shapes[step.name]
        source = step.inputs[0] if step.inputs else None
        if kind in RECTIFIERS:
            value = signal.value
            if mode != "deconvnet":
                y = crop(rec.activations[step.name], rows, signal.box, signal.channels)
                mask = (y > 0) if kind == "relu" else (y > 0) & (y < 6)
                value = torch.relu(value) * mask if mode == "guided" else value * mask
            else:
                value = torch.relu(value)
            return [(source, Signal(value, signal.box, signal.channels))]
        if kind in ("identity", "bias"):
            return [(source, signal)]
        if kind == "scale":
            return [(source, Signal(signal.value * step.options["factor"], signal.box, signal.channels))]
        if kind == "add":
            return [(name, signal) for name in step.inputs]
        if kind == "bn":
            if step.name in plan.folded:
                return [(source, signal)]  # folded into the convolution below
            scale = _bn_scale(step.module).to(signal.value.dtype)
            if signal.channels is not None:
                factor = scale[signal.channels].view(-1, *([1] * (signal.value.dim() - 1)))
            else:
                factor = scale.view(1, -1, *([1] * (signal.value.dim() - 2)))
            return [(source, Signal(signal.value * factor, signal.box, signal.channels))]
        if kind == "conv":
            weight = self._weight(step, plan, signal.value)
            groups = step.options["groups"]
            return [(source, _transpose(signal, shape, rec.shapes[source], step.window, weight, groups))]
        if kind == "avgpool" and _boxable_avgpool(step):
            signal = _dense(signal, shape[1])
            k = step.window.kernel
            weight = signal.value.new_full((shape[1], 1, k[0], k[1]), 1.0 / (k[0] * k[1]))
            return [(source, _transpose(signal, shape, rec.shapes[source], step.window, weight, shape[1]))]
        if kind == "maxpool":
            return [self._unpool(step, _dense(signal, shape[1]), rec, rows, mode, plan)]
        if kind == "lrn":
            if mode == "deconvnet":
                return [(source, signal)]  # the paper skips contrast normalisation going down
            signal = _dense(signal, shape[1])
            inputs = crop(rec.norm_inputs[step.name], rows, signal.box)
            return [(source, Signal(_norm_backward(step.module, inputs, signal.value), signal.box))]
        if kind == "cat":
            return self._split(step, signal, rec)
        if kind == "rearrange":
            return [(source, self._unrearrange(step, signal, rec))]
        if kind == "linear":
            value = _whole(_dense(signal, shape[1]), shape).value
            weight = step.module.weight if step.module is not None else _linear_weight(step, rec)
            return [(source, _signal_on(value @ weight.detach().to(value.dtype), rec.shapes[source]))]
        # affine (adaptive pooling, mean) and average pooling that is not a plain window: autograd.
        value = _whole(_dense(signal, shape[1]), shape).value
        return [(source, _signal_on(self._vjp(step, rec, value), rec.shapes[source]))]

    def _weight(self, step: Step, plan: "_Plan", like: torch.Tensor) -> torch.Tensor:
        """The convolution's weight, times the BatchNorm scale above it when folded; cached per
        dtype and device until a parameter changes."""
        conv = step.module
        bn = plan.folded_into.get(step.name)
        tensors = [conv.weight] + ([] if bn is None else [t for t in _bn_tensors(bn) if t is not None])
        version = tuple(id(t) for t in tensors) + tuple(t._version for t in tensors)
        key = (step.name + ("+" + bn.__class__.__name__ if bn is not None else ""), like.dtype, like.device)
        cached = self._weights.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        with torch.no_grad():
            weight = conv.weight.detach()
            if bn is not None:
                weight = weight * _bn_scale(bn).view(-1, 1, 1, 1)
            weight = weight.to(device=like.device, dtype=like.dtype).contiguous()
        self._weights[key] = (version, weight)
        return weight

    def _unpool(self, step: Step, signal: Signal, rec: Recording, rows: torch.Tensor, mode: str,
                plan: "_Plan") -> Tuple[str, Signal]:
        source = step.inputs[0]
        fuse = mode == "deconvnet" and source in plan.fused
        target = self.graph.steps[source].inputs[0] if fuse else source
        switches = rec.switches[step.name]
        below = tuple(rec.shapes[source][-2:])
        w = step.window
        box = signal.box
        if box.is_map(switches.shape[-2:]):
            # Whole maps: every selection reads its image's switches in place (rows=), no copies.
            out = ops.unpool(signal.value, switches, below, w.kernel, w.stride, w.padding, w.dilation, rows=rows,
                             rectify=fuse)
            return target, Signal(out, Box.whole(out.shape[0], below[0], below[1], out.device))
        # A box of windows: its switches (a few bytes per selection) unpool as a padding-free
        # pooling of the box's own pixels; switch offsets are relative to their window, so they
        # hold unchanged. Windows off the map carry zero signal; their switch 0 adds nothing.
        off_map = ~box.inside(switches.shape[-2:], torch.bool)
        box_switches = crop(switches, rows, box).masked_fill(off_map, 0).contiguous()
        size = ((box.h - 1) * w.stride[0] + w.span(0), (box.w - 1) * w.stride[1] + w.span(1))
        out = ops.unpool(signal.value, box_switches, size, w.kernel, w.stride, 0, w.dilation, rectify=fuse)
        value, new_box = box.down(w).clip(out, below)
        return target, Signal(value, new_box)

    def _split(self, step: Step, signal: Signal, rec: Recording) -> List[Tuple[str, Signal]]:
        shape = rec.shapes[step.name]
        dim = _cat_dim(step, rec.shapes)
        if dim == 1 or signal.box is None:
            signal = _dense(signal, shape[1])
        if dim != 1:
            signal = _whole(signal, shape)
        parts = []
        offset = 0
        for name in step.inputs:
            size = rec.shapes[name][dim]
            value = signal.value.narrow(dim, offset, size)
            offset += size
            box = signal.box if dim == 1 else (Box.whole(value.shape[0], value.shape[-2], value.shape[-1], value.device)
                                               if value.dim() == 4 else None)
            parts.append((name, Signal(value, box)))
        return parts

    def _rearrangement(self, step: Step, tape: Tape,
                       device: torch.device = torch.device("cpu")) -> Tuple[str, torch.Tensor, bool]:
        """``("channels", source channel of each output channel, injective)`` when the step only
        permutes or selects whole channels of a map (a channel shuffle), else ``("flat",
        flat index of each output element, injective)``."""
        input_shape = tape.inputs[step.name]
        key = (step.name, input_shape, device)
        cached = self._indices.get(key)
        if cached is None:
            index = rearrangement_index(self.graph, step, input_shape, tape.env, device)
            injective = index.numel() == torch.unique(index).numel()
            cached = ("flat", index, injective)
            if index.dim() == 3 and len(input_shape) == 4 and tuple(index.shape[1:]) == tuple(input_shape[2:]):
                plane = input_shape[2] * input_shape[3]
                base = index[:, :1, :1]
                source = base.flatten() // plane
                if bool((base % plane == 0).all()) and torch.equal(
                        index, base + torch.arange(plane, device=device).view(1, *index.shape[1:])):
                    cached = ("channels", source, injective)
            self._indices[key] = cached
        return cached

    def _unrearrange(self, step: Step, signal: Signal, rec: Recording) -> Signal:
        device = signal.value.device
        how, index, injective = self._rearrangement(step, rec.tape, device)
        input_shape = rec.tape.inputs[step.name]
        batch = signal.value.shape[0]
        if how == "channels" and signal.box is not None:
            signal = _dense(signal, rec.shapes[step.name][1])
            value = signal.value
            out = value.new_zeros((batch, input_shape[1]) + tuple(value.shape[2:]))
            out.index_copy_(1, index, value) if injective else out.index_add_(1, index, value)
            return Signal(out, signal.box)
        shape = rec.shapes[step.name]
        value = _whole(_dense(signal, shape[1]) if len(shape) > 1 else signal, shape).value.reshape(batch, -1)
        out = value.new_zeros((batch, math.prod(input_shape[1:])))
        flat = index.flatten()
        out.index_copy_(1, flat, value) if injective else out.index_add_(1, flat, value)
        return _signal_on(out.view((batch,) + tuple(input_shape[1:])), input_shape)

    def _vjp(self, step: Step, rec: Recording, signal: torch.Tensor) -> torch.Tensor:
        """The step's transpose by autograd: it is linear in its input, so the gradient at zero
        is exact. Also under ``torch.inference_mode()`` (pass 2 runs in it)."""
        input_shape = rec.shapes[step.inputs[0]]
        with torch.inference_mode(False), torch.enable_grad():
            x = signal.new_zeros((signal.shape[0],) + tuple(input_shape[1:])).requires_grad_(True)
            if step.node is None:
                y = step.module(x)
            else:
                def lookup(n: fx.Node) -> Any:
                    if self.graph.values.get(n) == "tensor":
                        return x
                    return rec.tape.env[n]

                y = evaluate(step.node, lookup, self.graph.model)
            (grad,) = torch.autograd.grad(y, x, signal.clone())
        return grad


# -- the plan of a projection ------------------------------------------------------------------


@dataclass
class _Plan:
    """For one top layer: the steps below it in reverse order, the rectifiers a max pool
    rectifies while unpooling (their only reader is that pool), and the BatchNorms folded into
    the convolution below them (that convolution's only reader)."""

    order: List[str]
    fused: set
    folded: set
    folded_into: Dict[str, nn.Module]

    @classmethod
    def of(cls, graph: Graph, top: str) -> "_Plan":
        order = list(reversed(graph.ancestors(top)))
        inside = set(order)
        fused, folded, folded_into = set(), set(), {}
        for name in order:
            step = graph.steps[name]
            if step.kind == "maxpool":
                below = graph.steps[step.inputs[0]]
                if below.kind in RECTIFIERS and below.name != top and \
                        [u for u in below.users if u in inside] == [name]:
                    fused.add(below.name)
            if step.kind == "bn" and name != top:
                below = graph.steps[step.inputs[0]]
                if below.kind == "conv" and [u for u in below.users if u in inside] == [name]:
                    folded.add(name)
                    folded_into[below.name] = step.module
        return cls(order, fused, folded, folded_into)


_POSITIONWISE = ("relu", "relu6", "bn", "add", "bias", "identity", "scale", "lrn")


def _boxable_avgpool(step: Step) -> bool:
    """An average pooling whose every window divides by the full kernel: a plain transposed
    window (partial windows from padding or ceil mode go through autograd instead)."""
    w = step.window
    return step.options.get("divisor_override") is None and not w.ceil_mode and (
        step.options.get("count_include_pad", True) or w.padding == (0, 0))


def _cat_dim(step: Step, shapes: Dict[str, torch.Size]) -> int:
    dim = step.options["dim"]
    return dim % len(shapes[step.name])


def _bn_tensors(bn: nn.Module) -> Tuple[Optional[torch.Tensor], ...]:
    return (bn.weight, bn.running_var)


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    """γ / √(running_var + ε): the eval-mode BatchNorm's linear part, per channel."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
    return scale.to(bn.running_var.dtype)


def _linear_weight(step: Step, rec: Recording) -> torch.Tensor:
    node = step.node
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    return rec.tape.env[weight] if isinstance(weight, fx.Node) else weight


def _signal_on(value: torch.Tensor, shape: torch.Size) -> Signal:
    """A dense signal of a whole tensor: a whole-map box when it is a feature map."""
    if value.dim() == 4:
        return Signal(value, Box.whole(value.shape[0], value.shape[-2], value.shape[-1], value.device))
    return Signal(value, None)


def _dense(signal: Signal, channels: int) -> Signal:
    """All channels: a single-channel signal placed at its channel of zero maps."""
    if signal.channels is None:
        return signal
    value = signal.value
    out = value.new_zeros((value.shape[0], channels) + tuple(value.shape[2:]))
    out[torch.arange(value.shape[0], device=value.device), signal.channels] = value[:, 0]
    return Signal(out, signal.box)


def _whole(signal: Signal, shape: torch.Size) -> Signal:
    """The signal on its whole map (the box pasted at its place)."""
    size = (int(shape[-2]), int(shape[-1])) if len(shape) == 4 else None
    if signal.box is None or size is None or signal.box.is_map(size):
        return signal
    return Signal(signal.box.paste(signal.value, size), Box.whole(signal.value.shape[0], size[0], size[1],
                                                                  signal.value.device), signal.channels)


def _settle(signal: Signal, shape: torch.Size) -> Signal:
    """A box at least as large as its map becomes the whole map (cheaper, and exact)."""
    box = signal.box
    if box is None or len(shape) != 4 or box.is_map(shape[-2:]):
        return signal
    if box.h * box.w >= int(shape[-2]) * int(shape[-1]):
        return _whole(signal, shape)
    return signal


def _accumulate(a: Signal, b: Signal, shape: torch.Size) -> Signal:
    """The sum of two signals on one step's output (branches meeting going down): on the union
    of their boxes."""
    if a.box is None or b.box is None:
        return Signal(_whole(_dense(a, shape[1]), shape).value + _whole(_dense(b, shape[1]), shape).value, None)
    if not (a.channels is not None and a.channels is b.channels):
        a, b = _dense(a, shape[1]), _dense(b, shape[1])
    if a.box.same(b.box):
        return Signal(a.value + b.value, a.box, a.channels)
    box = a.box.union(b.box)
    return _settle(Signal(box.place(a.value, a.box) + box.place(b.value, b.box), box, a.channels), shape)


def _transpose(signal: Signal, shape: torch.Size, below_shape: torch.Size, window: Window, weight: torch.Tensor,
               groups: int) -> Signal:
    """A convolution's (or plain average pooling's) transpose on a signal, whole map or box."""
    below = (int(below_shape[-2]), int(below_shape[-1]))
    box = signal.box
    if box.is_map(shape[-2:]):
        # Whole maps: the layer's own padding, and output_size lands exactly on the map below.
        out = ops.project(signal.value, weight, window.stride, window.padding, below, groups=groups,
                          dilation=window.dilation, channels=signal.channels)
        return Signal(out, Box.whole(out.shape[0], below[0], below[1], out.device))
    if signal.channels is None and groups == 1 and signal.value.device.type == "cpu":
        out = _project_as_matmul(signal.value, weight, window)
    else:
        out = None
    if out is None:
        out = ops.project(signal.value, weight, window.stride, 0, groups=groups, dilation=window.dilation,
                          channels=signal.channels)
    value, new_box = box.down(window).clip(out, below)
    return Signal(value, new_box)


MATMUL_MIN_PIXELS = 100  # below this a box's batched matrix products are too small to beat oneDNN
FOLD_MAX_CHANNELS = 4  # oneDNN's transposed convolution is slow onto this few channels (the stem)


def _project_as_matmul(x: torch.Tensor, weight: torch.Tensor, window: Window) -> Optional[torch.Tensor]:
    """``ops.project(x, weight, stride, 0, dilation=...)`` on the CPU as matrix products where
    oneDNN's transposed convolution is slow: a 1x1 filter is one product per selection (placed
    on the stride's grid), and a projection onto at most FOLD_MAX_CHANNELS maps (a network's
    first convolution) is the product with every tap followed by ``F.fold``. ``None`` where
    neither applies or the box is too small to gain. The same arithmetic, summed in another
    order (the tests hold both to the float64 oracle)."""
    batch, c_out, h, w = x.shape
    if h * w < MATMUL_MIN_PIXELS or x.dtype not in (torch.float32, torch.float64):
        return None
    c_in, k_h, k_w = weight.shape[1], weight.shape[2], weight.shape[3]
    (s_h, s_w), (d_h, d_w) = window.stride, window.dilation
    size = ((h - 1) * s_h + window.span(0), (w - 1) * s_w + window.span(1))  # as Box.down
    if (k_h, k_w) == (1, 1):
        product = torch.matmul(weight.view(c_out, c_in).t(), x.reshape(batch, c_out, h * w)).view(batch, c_in, h, w)
        if (s_h, s_w) == (1, 1):
            return product
        out = x.new_zeros((batch, c_in) + size)
        out[:, :, ::s_h, ::s_w] = product
        return out
    if c_in <= FOLD_MAX_CHANNELS:
        columns = torch.matmul(weight.reshape(c_out, -1).t(), x.reshape(batch, c_out, h * w))
        return F.fold(columns, size, (k_h, k_w), dilation=(d_h, d_w), stride=(s_h, s_w))
    return None


# -- boxes ---------------------------------------------------------------------------------------


class Box:
    """Per-selection origins (y0, x0) on the current map and the common size (h, w)."""

    def __init__(self, y0: torch.Tensor, x0: torch.Tensor, h: int, w: int, uniform: bool) -> None:
        self.y0, self.x0, self.h, self.w = y0, x0, h, w
        self.uniform = uniform  # every selection has the same origin (whole-map projections)

    @classmethod
    def whole(cls, batch: int, h: int, w: int, device: torch.device) -> "Box":
        zero = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(zero, zero, h, w, uniform=True)

    def is_map(self, size: Tuple[int, int]) -> bool:
        return self.uniform and (self.h, self.w) == tuple(size) and (self.y0.numel() == 0 or int(self.y0[0]) == 0 and int(self.x0[0]) == 0)

    def same(self, other: "Box") -> bool:
        """The same positions for every selection."""
        return (self.h, self.w) == (other.h, other.w) and (self.y0 is other.y0 or torch.equal(self.y0, other.y0)) and (
            self.x0 is other.x0 or torch.equal(self.x0, other.x0))

    def union(self, other: "Box") -> "Box":
        """The smallest box (of a size common to the batch) holding both, per selection."""
        y0, x0 = torch.minimum(self.y0, other.y0), torch.minimum(self.x0, other.x0)
        if y0.numel() == 0:
            return Box(y0, x0, max(self.h, other.h), max(self.w, other.w), self.uniform and other.uniform)
        h = int((torch.maximum(self.y0 + self.h, other.y0 + other.h) - y0).max())
        w = int((torch.maximum(self.x0 + self.w, other.x0 + other.w) - x0).max())
        return Box(y0, x0, h, w, self.uniform and other.uniform)

    def place(self, value: torch.Tensor, box: "Box") -> torch.Tensor:
        """``value`` on ``box`` placed on a zero map of this (enclosing) box."""
        if self.same(box):
            return value
        batch, channels = value.shape[:2]
        out = value.new_zeros((batch, channels, self.h, self.w))
        if batch == 0:
            return out
        dy, dx = box.y0 - self.y0, box.x0 - self.x0
        if bool((dy == dy[0]).all()) and bool((dx == dx[0]).all()):
            oy, ox = int(dy[0]), int(dx[0])
            out[:, :, oy:oy + box.h, ox:ox + box.w] = value
            return out
        ys = dy[:, None] + torch.arange(box.h, device=dy.device)
        xs = dx[:, None] + torch.arange(box.w, device=dx.device)
        flat = (ys[:, :, None] * self.w + xs[:, None, :]).flatten(1)[:, None, :].expand(batch, channels, -1)
        return out.view(batch, channels, -1).scatter_(2, flat, value.flatten(2)).view(out.shape)

    def down(self, window: Window) -> "Box":
        y0 = self.y0 * window.stride[0] - window.padding[0]
        x0 = self.x0 * window.stride[1] - window.padding[1]
        h = (self.h - 1) * window.stride[0] + window.span(0)
        w = (self.w - 1) * window.stride[1] + window.span(1)
        return Box(y0, x0, h, w, self.uniform)

    def grid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Map coordinates of the box's rows (B, h) and columns (B, w)."""
        ys = self.y0[:, None] + torch.arange(self.h, device=self.y0.device)
        xs = self.x0[:, None] + torch.arange(self.w, device=self.x0.device)
        return ys, xs

    def inside(self, size: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, h, w) mask of the box positions that lie on the map."""
        ys, xs = self.grid()
        valid_y = (ys >= 0) & (ys < size[0])
        valid_x = (xs >= 0) & (xs < size[1])
        return (valid_y[:, None, :, None] & valid_x[:, None, None, :]).to(dtype)

    def clip(self, signal: torch.Tensor, size: Tuple[int, int]) -> Tuple[torch.Tensor, "Box"]:
        """Drop what fell off the map. A box every selection shares is cropped. Otherwise each
        selection's box is moved onto the map, on the smallest common size that holds every
        selection's on-map part (``signal`` is cropped, or gathered where the moves differ), so
        no later step computes on padding; a box that cannot shrink has its off-map part
        zeroed in place (``signal`` is the caller's fresh output)."""
        if self.y0.numel() == 0:
            return signal, self
        if self.uniform:
            y0, x0 = int(self.y0[0]), int(self.x0[0])
            top, left = max(0, -y0), max(0, -x0)
            bottom, right = min(self.h, size[0] - y0), min(self.w, size[1] - x0)
            signal = signal[:, :, top:bottom, left:right]
            box = Box(self.y0 + top, self.x0 + left, bottom - top, right - left, uniform=True)
            return signal, box
        # Per axis: each selection's on-map extent [lo, hi), their common length, and the origin
        # that puts a box of that length on the map around the extent (lo, or earlier at the
        # far edge). One small tensor of bounds, read back once.
        starts = torch.stack([self.y0, self.x0])
        lengths = torch.tensor([[self.h], [self.w]], device=starts.device)
        limits = torch.tensor([[int(size[0])], [int(size[1])]], device=starts.device)
        lo = starts.clamp(min=0)
        hi = torch.minimum(starts + lengths, limits)
        common = (hi - lo).amax(dim=1).clamp(min=1)
        origin = torch.minimum(lo, limits - common[:, None])
        shift = origin - starts  # where the new box starts inside the old one, per selection
        facts = torch.cat([common, (starts < 0).any(dim=1) | (starts + lengths > limits).any(dim=1),
                           shift.amin(dim=1), shift.amax(dim=1), origin.amin(dim=1) == origin.amax(dim=1)]).tolist()
        h, w, off_y, off_x, dy_min, dx_min, dy_max, dx_max, same_y, same_x = (int(v) for v in facts)
        if (h, w) == (self.h, self.w):
            if off_y or off_x:
                signal.mul_(self.inside(size, signal.dtype))
            return signal, self
        box = Box(origin[0], origin[1], h, w, uniform=bool(same_y and same_x))
        if dy_min == dy_max and dx_min == dx_max and dy_min >= 0 and dx_min >= 0:
            return signal[:, :, dy_min:dy_min + h, dx_min:dx_min + w], box
        ys = shift[0][:, None] + torch.arange(h, device=starts.device)  # (B, h) rows of the old box
        xs = shift[1][:, None] + torch.arange(w, device=starts.device)
        valid = ((ys >= 0) & (ys < self.h))[:, :, None] & ((xs >= 0) & (xs < self.w))[:, None, :]
        flat = ys.clamp(0, self.h - 1)[:, :, None] * self.w + xs.clamp(0, self.w - 1)[:, None, :]
        batch, channels = signal.shape[:2]
        picked = signal.reshape(batch, channels, -1).gather(2, flat.view(batch, 1, -1).expand(batch, channels, -1))
        picked = picked.view(batch, channels, h, w)
        if dy_min < 0 or dx_min < 0 or dy_max + h > self.h or dx_max + w > self.w:
            picked.mul_(valid[:, None].to(picked.dtype))
        return picked, box

    def paste(self, signal: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The box contents placed on a zero (B, C, H, W) map (parts off the map dropped)."""
        batch, channels = signal.shape[:2]
        size = (int(size[0]), int(size[1]))
        if self.is_map(size):
            return signal
        out = signal.new_zeros((batch, channels, size[0] * size[1]))
        if batch == 0:
            return out.view(batch, channels, size[0], size[1])
        ys, xs = self.grid()
        valid = self.inside(size, torch.bool)[:, 0]
        flat = (ys.clamp(0, size[0] - 1)[:, :, None] * size[1] + xs.clamp(0, size[1] - 1)[:, None, :])
        values = torch.where(valid[:, None], signal, torch.zeros((), dtype=signal.dtype, device=signal.device))
        # Off-map positions add exact zeros at a clamped pixel: the sum is exact in any order.
        index = flat.flatten(1)[:, None, :].expand(batch, channels, -1)
        out.scatter_add_(2, index, values.flatten(2))
        return out.view(batch, channels, size[0], size[1])


def crop(tensor: torch.Tensor, rows: torch.Tensor, box: Optional[Box], channels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tensor[rows]`` restricted to each selection's box (clamped outside the map); with
    ``channels``, only channel ``channels[b]`` of row ``b`` (``(B, 1, h, w)``)."""
    if box is None or box.is_map(tensor.shape[-2:]):
        return tensor[rows] if channels is None else tensor[rows, channels].unsqueeze(1)
    ys, xs = box.grid()
    ys = ys.clamp(0, tensor.shape[-2] - 1)
    xs = xs.clamp(0, tensor.shape[-1] - 1)
    if channels is not None:
        return tensor[rows[:, None, None], channels[:, None, None], ys[:, :, None], xs[:, None, :]].unsqueeze(1)
    picked = tensor[rows[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (B, h, w, C)
    return picked.permute(0, 3, 1, 2)


def _norm_backward(module: nn.Module, inputs: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The normalisation's true vector-Jacobian product (it acts per position across channels,
    so a spatial crop of its input gives the exact result on the crop). Also under
    ``torch.inference_mode()`` (pass 2 runs in it): autograd is switched back on around a
    normal-tensor copy of the input, since inference tensors cannot take part in autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(normalise(module, x), x, signal)
    return grad
