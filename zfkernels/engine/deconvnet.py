"""The deconvnet: record a batch of images once, then project any number of selected activations
down to pixel space in large batches, each step by its rule (:mod:`zfkernels.engine.rules`), with
the zfkernels ops doing the heavy work.

Semantics (docs/engine.md, "Semantics"): the projection of a seed at a layer is the gradient of
<seed, layer output> with respect to the image, with activations rectifying the signal
(``mode="deconvnet"``: ``relu(signal)``; ``"guided"``: ``relu(signal) * g(x)``), gates,
normalisation statistics and attention weights frozen at their recorded values, and every other
operation's exact transpose with biases dropped. ``mode="backprop"`` is the network's true
gradient: where a gate, a normalisation or an attention lies below the layer it is computed by
autograd through the network itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .boxes import Box, Signal
from .classify import Step
from .evaluate import Tape
from .fastpaths import bn_scale, bn_tensors
from .geometry import Geometry, ModelGeometry
from .plan import Plan
from .rules import RULES, Context
from .walk import walk

MODES = ("deconvnet", "guided", "backprop")
IndexLike = Union[torch.Tensor, Sequence[int]]
AUTOGRAD_CHUNK = 16  # selections per autograd pass in backprop mode (a memory bound)


@dataclass
class Recording:
    """One forward pass: ``activations[layer]`` of every recorded layer presented as
    ``(N, C, H, W)`` (by node name, alias and the names asked for), ``outputs[step]`` the raw
    outputs the rules read, the uint8 switches of every max pool, the normalisations' inputs,
    every step's output shape, what the rules saved (:class:`~.evaluate.Tape`) and the images
    (``backprop`` through gates and attention runs the network again)."""

    images_shape: Tuple[int, ...]
    activations: Dict[str, torch.Tensor]
    switches: Dict[str, torch.Tensor]
    norm_inputs: Dict[str, torch.Tensor]
    shapes: Dict[str, torch.Size]
    tape: Tape = field(repr=False, default_factory=Tape)
    owner: object = field(repr=False, default=None)
    outputs: Dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    images: Optional[torch.Tensor] = field(repr=False, default=None)

    @property
    def num_images(self) -> int:
        return self.images_shape[0]


class Deconvnet(ModelGeometry):
    """``dn = Deconvnet(model)``; ``rec = dn.record(images)``; ``dn.project(rec, layer, rows,
    channels, positions=None)`` -> ``(B, 3, H, W)`` projections in pixel space.

    ``model`` is any ``nn.Module`` that torchvision's feature-extraction tracer can trace and
    that is built from the supported operations (docs/engine.md); anything else raises
    :class:`~.capture.Unsupported` (a ``ValueError``) here, naming the node and the operation.
    ``layers`` lists the projectable layers (node names; the zoo's ``conv1``… aliases where they
    exist): activation outputs, block outputs and rectified concatenations whose output is a
    feature map or a token grid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._plans: Dict[str, Plan] = {}
        self._weights: Dict[Tuple[str, torch.dtype, torch.device], Tuple[Tuple[int, ...], torch.Tensor]] = {}
        self._indices: Dict[Tuple[str, Tuple[int, ...], torch.device], Tuple[str, torch.Tensor, bool]] = {}
        self._extents: Dict[Tuple[str, Tuple[int, int], torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

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
        names = list(self.layers if layers is None else layers)
        targets = [self.resolve(layer) for layer in names]
        geometry = self.geometry((images.shape[-2], images.shape[-1]))  # images too small for the model: say so first
        wanted = [name for name in self._below(targets) if self._kept(name)] + targets
        tape = Tape()
        with torch.no_grad():
            outputs = dict(walk(self.graph, images, wanted, keep=wanted, tape=tape))
        activations: Dict[str, torch.Tensor] = {}
        for layer, step in zip(names, targets):
            activations[step] = activations[layer] = geometry.present(step, outputs[step])
        for name in self.graph.nodes:
            if name in outputs and name not in activations:
                activations[name] = geometry.present(name, outputs[name])
        for alias, step in self.graph.aliases.items():  # the zoo's names reach the same tensors
            if step in activations:
                activations[alias] = activations[step]
        return Recording(tuple(images.shape), activations, tape.switches, tape.norm_inputs, tape.shapes, tape,
                         owner=self, outputs=outputs, images=images)

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
            per_axis = self.geometry(size).field_lengths(name)
            lengths = self._extents[key] = tuple(torch.tensor(v, device=positions.device) for v in per_axis)
        # By height, then width: a chunk's common box is its largest height by its largest
        # width, and this order keeps both small together better than the area alone would.
        key = lengths[0][positions[:, 0]] * (size[1] + 1) + lengths[1][positions[:, 1]]
        return torch.argsort(key, stable=True)

    def _plan(self, top: str) -> Plan:
        plan = self._plans.get(top)
        if plan is None:
            plan = self._plans[top] = Plan.of(self.graph, top)
        return plan

    def _seed(self, rec: Recording, top: str, rows: torch.Tensor, channels: torch.Tensor,
              positions: Optional[torch.Tensor], geometry: Geometry) -> Signal:
        """The selected activations of ``top`` with everything else zero: a box form on a grid
        (one channel per selection), the raw tokens of a token grid, or a raw vector."""
        act = rec.activations[top]
        batch = rows.shape[0]
        every = torch.arange(batch, device=act.device)
        if geometry.view(top).boxed:
            if positions is None:
                return Signal(act[rows, channels].unsqueeze(1), Box.whole(batch, act.shape[-2], act.shape[-1], act.device),
                              channels)
            value = act[rows, channels, positions[:, 0], positions[:, 1]].view(batch, 1, 1, 1)
            return Signal(value, Box(positions[:, 0].clone(), positions[:, 1].clone(), 1, 1, uniform=False), channels)
        raw = rec.outputs[top]
        value = raw.new_zeros((batch,) + tuple(raw.shape[1:]))
        if geometry.is_map(top):  # a token grid: patch (y, x) is token start + y * W + x
            start, width = geometry.token(top), act.shape[-1]
            if positions is None:
                tokens = start + torch.arange(act.shape[-2] * width, device=act.device)
                value[every[:, None], tokens[None, :], channels[:, None]] = act[rows, channels].flatten(1)
            else:
                tokens = start + positions[:, 0] * width + positions[:, 1]
                value[every, tokens, channels] = act[rows, channels, positions[:, 0], positions[:, 1]]
            return Signal(value, None)
        value[every, channels] = act[rows, channels]
        return Signal(value, None)

    def _project_chunk(self, rec: Recording, top: str, rows: torch.Tensor, channels: torch.Tensor,
                       positions: Optional[torch.Tensor], mode: str) -> torch.Tensor:
        plan = self._plan(top)
        geometry = self.geometry(tuple(rec.images_shape[-2:]))
        seed = self._seed(rec, top, rows, channels, positions, geometry)
        if mode == "backprop" and plan.autograd_backprop:
            return self._true_gradient(rec, top, rows, geometry.view(top).raw(seed))
        context = Context(self, self.graph, rec, geometry, rows, mode, plan)
        pending: Dict[str, Signal] = {top: seed}
        for name in plan.order:
            signal = pending.pop(name, None)
            if signal is None:
                continue
            step = self.graph.steps[name]
            if step.kind == "input":
                return geometry.view(name).raw(signal)
            for source, part in RULES[step.kind].down(context, step, signal):
                view = geometry.view(source)
                part = view.settle(part)
                pending[source] = part if source not in pending else view.accumulate(pending[source], part)
        raise ValueError(f"Deconvnet: {top!r} does not depend on the image")

    def _true_gradient(self, rec: Recording, top: str, rows: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """``backprop`` below a gate, a normalisation or an attention: autograd through the
        network on the recorded images, in chunks of selections (a memory bound)."""
        if rec.images is None:
            raise ValueError("Deconvnet.project: this recording kept no images; record again for backprop mode")
        parts = []
        for start in range(0, rows.shape[0], AUTOGRAD_CHUNK):
            part = slice(start, start + AUTOGRAD_CHUNK)
            with torch.inference_mode(False), torch.enable_grad():
                x = rec.images[rows[part]].clone().requires_grad_(True)
                ((_, y),) = list(walk(self.graph, x, [top]))
                (grad,) = torch.autograd.grad(y, x, seed[part].clone())
            parts.append(grad)
        return torch.cat(parts)

    # -- caches the rules read ----------------------------------------------------------------

    def weight(self, step: Step, plan: Plan, like: torch.Tensor) -> torch.Tensor:
        """The convolution's weight, times the BatchNorm scale above it when folded; cached per
        dtype and device until a parameter changes."""
        conv = step.module
        bn = plan.folded_into.get(step.name)
        tensors = [conv.weight] + ([] if bn is None else [t for t in bn_tensors(bn) if t is not None])
        version = tuple(id(t) for t in tensors) + tuple(t._version for t in tensors)
        key = (step.name + ("+" + bn.__class__.__name__ if bn is not None else ""), like.dtype, like.device)
        cached = self._weights.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        with torch.no_grad():
            weight = conv.weight.detach()
            if bn is not None:
                weight = weight * bn_scale(bn).view(-1, 1, 1, 1)
            weight = weight.to(device=like.device, dtype=like.dtype).contiguous()
        self._weights[key] = (version, weight)
        return weight

    def rearrangement(self, step: Step, rec: Recording, device: torch.device) -> Tuple[str, torch.Tensor, bool]:
        """The geometry's classification of a rearrangement at the recording's size
        (:meth:`Geometry.rearrangement`), its index on ``device``."""
        size = tuple(rec.images_shape[-2:])
        key = (step.name, size, device)
        cached = self._indices.get(key)
        if cached is None:
            how, index, injective = self.geometry(size).rearrangement(step)
            cached = self._indices[key] = (how, index.to(device), injective)
        return cached
