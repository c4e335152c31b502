"""The deconvnet engine: record a batch of images once, then project any number of selected
activations down to pixel space in large batches, with the zfkernels ops doing the work.

Semantics (GUIDE section 2): the seed is the selected activation(s) of a conv layer's ReLU output;
going down, transposed filters without bias (``project``; the first step with ``channels=``),
unpooling with the image's switches (``unpool``), ReLU of the reconstructed signal, contrast
normalisation skipped. ``mode="guided"`` also masks by the forward activation and
``mode="backprop"`` is the plain gradient (mask only); both take the normalisation's true
gradient, so each equals its autograd definition.

A single activation (``positions``) is computed only inside its receptive field: each level
holds a box per selection (an origin, which may lie in the padding, and a size common to the
batch) instead of the whole map, so the cost does not grow with the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import ops
from .receptive_field import Window, receptive_field

MODES = ("deconvnet", "guided", "backprop")
NORMALISATIONS = (nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity)
IndexLike = Union[torch.Tensor, Sequence[int]]


@dataclass
class Stage:
    """One module of ``model.features``: ``kind`` is conv, relu, pool or norm."""

    kind: str
    module: nn.Module
    name: Optional[str] = None  # the conv layer a conv or its ReLU belongs to
    window: Optional[Window] = None  # conv and pool geometry
    ceil_mode: bool = False


@dataclass
class Recording:
    """One forward pass: post-ReLU activations of every conv layer (``activations[name]``), the
    uint8 switches of every max pool (once per image), and what the backward modes need."""

    images_shape: Tuple[int, ...]
    activations: Dict[str, torch.Tensor]
    switches: Dict[int, torch.Tensor]  # stage index -> (N, C, h, w) uint8
    sizes: List[Tuple[int, int]]  # map size entering each stage, then the output of the last
    norm_inputs: Dict[int, torch.Tensor]  # stage index -> the normalisation's input
    owner: object = field(repr=False, default=None)

    @property
    def num_images(self) -> int:
        return self.images_shape[0]


def _pair(v: Union[int, Tuple[int, ...], str]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def parse_features(features: nn.Module) -> List[Stage]:
    """The stages of ``features`` with their conv layer names (``conv1``…, or ``conv1_1``… for
    VGG-like nets whose first block has several convolutions)."""
    modules = list(features.children()) if isinstance(features, nn.Sequential) else [features]
    stages: List[Stage] = []
    for module in modules:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or _pair(module.dilation) != (1, 1) or isinstance(module.padding, str):
                raise ValueError(f"Deconvnet: unsupported convolution {module} (groups, dilation or string padding)")
            window = Window(_pair(module.kernel_size), _pair(module.stride), _pair(module.padding))
            stages.append(Stage("conv", module, window=window))
        elif isinstance(module, nn.ReLU):
            if not stages or stages[-1].kind != "conv":
                raise ValueError("Deconvnet: every ReLU must follow a convolution")
            stages.append(Stage("relu", module))
        elif isinstance(module, nn.MaxPool2d):
            if _pair(module.dilation) != (1, 1) or module.return_indices:
                raise ValueError(f"Deconvnet: unsupported max pooling {module}")
            kernel = _pair(module.kernel_size)
            stride = kernel if module.stride is None else _pair(module.stride)
            stages.append(Stage("pool", module, window=Window(kernel, stride, _pair(module.padding)), ceil_mode=module.ceil_mode))
        elif isinstance(module, NORMALISATIONS):
            stages.append(Stage("norm", module))
        else:
            raise ValueError(
                f"Deconvnet: unsupported module {type(module).__name__} in features "
                "(supported: Conv2d, ReLU, MaxPool2d, LocalResponseNorm)"
            )
    for i, stage in enumerate(stages):
        if stage.kind == "conv" and (i + 1 >= len(stages) or stages[i + 1].kind != "relu"):
            raise ValueError("Deconvnet: every convolution must be followed by a ReLU")
    _name_convs(stages)
    return stages


def _name_convs(stages: List[Stage]) -> None:
    blocks: List[List[Stage]] = [[]]
    for stage in stages:
        if stage.kind == "conv":
            blocks[-1].append(stage)
        elif stage.kind == "pool" and blocks[-1]:
            blocks.append([])
    vgg_style = len(blocks[0]) > 1
    count = 0
    for b, block in enumerate(blocks, start=1):
        for j, conv in enumerate(block, start=1):
            count += 1
            conv.name = f"conv{b}_{j}" if vgg_style else f"conv{count}"
    for i, stage in enumerate(stages):
        if stage.kind == "relu":
            stage.name = stages[i - 1].name


class Deconvnet:
    """``dn = Deconvnet(model)``; ``rec = dn.record(images)``; ``dn.project(rec, layer, rows,
    channels, positions=None)`` -> ``(B, 3, H, W)`` projections in pixel space."""

    def __init__(self, model: nn.Module) -> None:
        features = getattr(model, "features", None)
        if features is None:
            raise ValueError("Deconvnet: the model needs a .features module (as torchvision's and zfkernels.models)")
        self.model = model
        self.stages = parse_features(features)
        self.layers: List[str] = [s.name for s in self.stages if s.kind == "conv"]
        self._image_size: Tuple[int, int] = (224, 224)

    # -- forward ------------------------------------------------------------------------------

    def record(self, images: torch.Tensor) -> Recording:
        """One forward pass over ``(N, 3, H, W)`` float images, keeping every conv layer's
        post-ReLU activations and every pool's uint8 switches."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Deconvnet.record: images must be an (N, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"Deconvnet.record: images must be floating point, got {images.dtype}")
        weight = self.stages[0].module.weight if self.stages and self.stages[0].kind == "conv" else None
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
        self.map_sizes((images.shape[-2], images.shape[-1]))  # images too small for the model: say so before the forward
        activations: Dict[str, torch.Tensor] = {}
        switches: Dict[int, torch.Tensor] = {}
        norm_inputs: Dict[int, torch.Tensor] = {}
        sizes: List[Tuple[int, int]] = []
        x = images
        with torch.no_grad():
            for i, stage in enumerate(self.stages):
                sizes.append((x.shape[-2], x.shape[-1]))
                if stage.kind == "conv":
                    x = stage.module(x)
                elif stage.kind == "relu":
                    x = torch.relu(x)
                    activations[stage.name] = x
                elif stage.kind == "pool":
                    w = stage.window
                    x, switches[i] = ops.maxpool_switches(x, w.kernel, w.stride, w.padding, stage.ceil_mode)
                else:
                    norm_inputs[i] = x
                    x = _normalise(stage.module, x)
        sizes.append((x.shape[-2], x.shape[-1]))
        self._image_size = (images.shape[-2], images.shape[-1])
        return Recording(tuple(images.shape), activations, switches, sizes, norm_inputs, owner=self)

    # -- receptive fields ---------------------------------------------------------------------

    def _windows_below(self, layer: str) -> List[Window]:
        top = self._conv_index(layer)
        return [s.window for s in self.stages[: top + 1] if s.window is not None]

    def map_sizes(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The map size entering each stage for images of ``image_size``, then the last stage's
        output (what ``Recording.sizes`` holds), by PyTorch's output-size arithmetic. Raises
        ``ValueError`` naming the stage where the images are too small for the model."""
        size = (int(image_size[0]), int(image_size[1]))
        if min(size) < 1:
            raise ValueError(f"Deconvnet: image size {size} must be positive")
        sizes = [size]
        for stage in self.stages:
            if stage.window is not None:
                w = stage.window
                out = []
                for axis in range(2):
                    n, k, s, p = size[axis], w.kernel[axis], w.stride[axis], w.padding[axis]
                    if n + 2 * p < k:
                        raise ValueError(
                            f"Deconvnet: images of {image_size[0]}x{image_size[1]} are too small for this model: "
                            f"{stage.name or stage.kind} ({type(stage.module).__name__}, kernel {w.kernel}) "
                            f"receives a {size[0]}x{size[1]} map"
                        )
                    o = (n + 2 * p - k + (s - 1 if stage.ceil_mode else 0)) // s + 1
                    if stage.ceil_mode and (o - 1) * s >= n + p:  # the last window must start inside the map
                        o -= 1
                    out.append(o)
                size = (out[0], out[1])
            sizes.append(size)
        return sizes

    def receptive_field(
        self, layer: str, y: int, x: int, image_size: Optional[Tuple[int, int]] = None
    ) -> Tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (half-open, clipped to the image) that activation
        ``(y, x)`` of ``layer`` sees; ``image_size`` defaults to the last recorded images'.
        ``(y, x)`` outside the layer's map raises ``IndexError``."""
        top = self._conv_index(layer)
        size = tuple(image_size or self._image_size)
        height, width = self.map_sizes(size)[top + 1]
        for name, value, limit in (("y", y, height), ("x", x, width)):
            if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)) or (
                isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point())
            ):
                raise TypeError(f"Deconvnet.receptive_field: {name} must be an int, got {value!r}")
            if not 0 <= int(value) < limit:
                raise IndexError(
                    f"Deconvnet.receptive_field: {name}={int(value)} is outside the {height}x{width} map of {layer} "
                    f"(images {size[0]}x{size[1]})"
                )
        return receptive_field(self._windows_below(layer), int(y), int(x), size)

    # -- projection ---------------------------------------------------------------------------

    def _conv_index(self, layer: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.kind == "conv" and stage.name == layer:
                return i
        raise ValueError(f"Deconvnet: unknown layer {layer!r}; valid layers: {', '.join(self.layers)}")

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
        only that activation, else the whole map. Selections go through each layer as one batch
        of at most ``chunk_size`` (a memory bound). Returns ``(B, 3, H, W)``."""
        if not isinstance(rec, Recording):
            raise TypeError(f"Deconvnet.project: rec must be a Recording from Deconvnet.record, got {type(rec).__name__}")
        if rec.owner is not self:
            raise ValueError("Deconvnet.project: rec was recorded by another Deconvnet (record with this one)")
        if mode not in MODES:
            raise ValueError(f"Deconvnet.project: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if chunk_size < 1:
            raise ValueError(f"Deconvnet.project: chunk_size must be positive, got {chunk_size}")
        top = self._conv_index(layer)
        act = rec.activations[layer]
        rows = self._index("rows", rows, None, rec.num_images, f"{rec.num_images} recorded images").to(act.device)
        channels = self._index("channels", channels, rows.shape[0], act.shape[1], f"{layer} has {act.shape[1]} feature maps").to(act.device)
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
                raise TypeError("Deconvnet.project: positions must be an int64 tensor of (y, x) rows")
            if positions.shape != (rows.shape[0], 2):
                raise ValueError(f"Deconvnet.project: positions must be ({rows.shape[0]}, 2), got {tuple(positions.shape)}")
            positions = positions.to(act.device)
            h, w = act.shape[-2:]
            if positions.numel() and not (
                bool((positions >= 0).all()) and int(positions[:, 0].max()) < h and int(positions[:, 1].max()) < w
            ):
                raise ValueError(f"Deconvnet.project: positions hold (y, x) outside the {h}x{w} map of {layer}")
        height, width = rec.images_shape[-2:]
        out = act.new_zeros((rows.shape[0], 3, height, width))
        for start in range(0, rows.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            pos = None if positions is None else positions[part]
            out[part] = self._project_chunk(rec, top, rows[part], channels[part], pos, mode)
        return out

    def _project_chunk(
        self,
        rec: Recording,
        top: int,
        rows: torch.Tensor,
        channels: torch.Tensor,
        positions: Optional[torch.Tensor],
        mode: str,
    ) -> torch.Tensor:
        act = rec.activations[self.stages[top].name]
        batch = rows.shape[0]
        map_h, map_w = act.shape[-2:]
        if positions is None:
            signal = act[rows, channels].unsqueeze(1)  # whole maps: (B, 1, h, w)
            box = Box.whole(batch, map_h, map_w, act.device)
        else:
            signal = act[rows, channels, positions[:, 0], positions[:, 1]].view(batch, 1, 1, 1)
            box = Box(positions[:, 0].clone(), positions[:, 1].clone(), 1, 1, uniform=False)
        i = top
        first = True
        while i >= 0:
            stage = self.stages[i]
            below = rec.sizes[i]  # the map this stage's input lives on
            if stage.kind == "conv":
                weight = stage.module.weight.detach().to(signal.dtype)
                signal, box = _project(signal, box, weight, stage.window, below, channels if first else None)
                first = False
            elif stage.kind == "relu" and i != top:  # the top ReLU is the identity on its own output
                signal = _rectify(signal, mode, _forward_mask(rec.activations[stage.name], rows, box) if mode != "deconvnet" else None)
            elif stage.kind == "pool":
                fuse = mode == "deconvnet" and i > 0 and self.stages[i - 1].kind == "relu"
                signal, box = _unpool(signal, box, rec.switches[i], rows, stage.window, below, fuse)
                if fuse:
                    i -= 1  # the ReLU below was applied in the same pass
            elif stage.kind == "norm" and mode != "deconvnet":
                signal = _norm_backward(stage.module, crop(rec.norm_inputs[i], rows, box), signal)
            i -= 1
        return box.paste(signal, rec.images_shape[-2:])


# -- the steps, on a box per selection ---------------------------------------------------------


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

    def down(self, window: Window) -> "Box":
        y0 = self.y0 * window.stride[0] - window.padding[0]
        x0 = self.x0 * window.stride[1] - window.padding[1]
        h = (self.h - 1) * window.stride[0] + window.kernel[0]
        w = (self.w - 1) * window.stride[1] + window.kernel[1]
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
        """Drop what fell off the map: crop when every selection shares the box, else zero it."""
        if self.uniform and self.y0.numel():
            y0, x0 = int(self.y0[0]), int(self.x0[0])
            top, left = max(0, -y0), max(0, -x0)
            bottom, right = min(self.h, size[0] - y0), min(self.w, size[1] - x0)
            signal = signal[:, :, top:bottom, left:right]
            box = Box(self.y0 + top, self.x0 + left, bottom - top, right - left, uniform=True)
            return signal, box
        return signal * self.inside(size, signal.dtype), self

    def paste(self, signal: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The box contents placed on a zero (B, C, H, W) map (parts off the map dropped)."""
        batch, channels = signal.shape[:2]
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


def crop(tensor: torch.Tensor, rows: torch.Tensor, box: Box) -> torch.Tensor:
    """``tensor[rows]`` restricted to each selection's box (clamped outside the map)."""
    if box.is_map(tensor.shape[-2:]):
        return tensor[rows]
    ys, xs = box.grid()
    ys = ys.clamp(0, tensor.shape[-2] - 1)
    xs = xs.clamp(0, tensor.shape[-1] - 1)
    picked = tensor[rows[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (B, h, w, C)
    return picked.permute(0, 3, 1, 2)


def _project(
    signal: torch.Tensor,
    box: Box,
    weight: torch.Tensor,
    window: Window,
    below: Tuple[int, int],
    channels: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Box]:
    if box.is_map((signal.shape[-2], signal.shape[-1])) and box.uniform:
        # Whole maps: the layer's own padding, and output_size lands exactly on the map below.
        out = ops.project(signal, weight, window.stride, window.padding, below, channels=channels)
        return out, Box.whole(signal.shape[0], below[0], below[1], signal.device)
    out = ops.project(signal, weight, window.stride, 0, channels=channels)
    return box.down(window).clip(out, below)


def _unpool(
    signal: torch.Tensor,
    box: Box,
    switches: torch.Tensor,
    rows: torch.Tensor,
    window: Window,
    below: Tuple[int, int],
    rectify: bool,
) -> Tuple[torch.Tensor, Box]:
    if box.is_map(switches.shape[-2:]):
        # Whole maps: every selection reads its image's switches in place (rows=), no copies.
        out = ops.unpool(signal, switches, below, window.kernel, window.stride, window.padding, rows=rows, rectify=rectify)
        return out, Box.whole(signal.shape[0], below[0], below[1], signal.device)
    # A box of windows: its switches (a few bytes per selection) unpool as a padding-free
    # pooling of the box's own pixels; switch offsets are relative to their window, so they
    # hold unchanged. Windows off the map carry zero signal; their switch 0 adds nothing.
    off_map = ~box.inside(switches.shape[-2:], torch.bool)
    box_switches = crop(switches, rows, box).masked_fill(off_map, 0).contiguous()
    size = ((box.h - 1) * window.stride[0] + window.kernel[0], (box.w - 1) * window.stride[1] + window.kernel[1])
    out = ops.unpool(signal, box_switches, size, window.kernel, window.stride, 0, rectify=rectify)
    return box.down(window).clip(out, below)


def _forward_mask(activation: torch.Tensor, rows: torch.Tensor, box: Box) -> torch.Tensor:
    return crop(activation, rows, box) > 0


def _rectify(signal: torch.Tensor, mode: str, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mode == "deconvnet":
        return torch.relu(signal)
    if mode == "guided":
        return torch.relu(signal) * mask
    return signal * mask  # backprop: the ReLU's true gradient


def _norm_backward(module: nn.Module, inputs: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The normalisation's true vector-Jacobian product (it acts per position across channels,
    so a spatial crop of its input gives the exact result on the crop). Also under
    ``torch.inference_mode()`` (pass 2 runs in it): autograd is switched back on around a
    normal-tensor copy of the input, since inference tensors cannot take part in autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_normalise(module, x), x, signal)
    return grad


def _normalise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalisations in float32 for half-precision maps (PyTorch's CPU LocalResponseNorm has no
    bfloat16 kernel, and a sum of squares deserves float anyway)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return module(x.float()).to(x.dtype)
    return module(x)
