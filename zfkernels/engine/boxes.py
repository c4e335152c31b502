"""Boxes and signals: a signal going down is either a box form, ``(B, C, h, w)`` values on a box of
a feature map presented as ``(B, C, H, W)`` (channels-last grids are permuted views), with one
box origin per selection and a size common to the batch; or a raw form, the dense tensor of the
step's output (token sequences, classifier vectors, anything a box cannot describe).

A single activation is projected inside its box instead of the whole map: boxes go down
convolutions and poolings exactly, merge as their union where branches meet, and become the
whole map only where an operation mixes positions (adaptive pooling, attention, a spatial
reshape). On a conv/BN/activation/pool chain the box is the receptive field, so the cost does
not grow with the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..receptive_field import Window


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




@dataclass
class Signal:
    """The signal on one step's output going down: ``value`` ``(B, C, h, w)`` on ``box`` of the
    presented map, or with ``channels`` ``(B,)`` a single channel per selection (``value``
    ``(B, 1, h, w)``); with ``box`` ``None``, ``value`` is the dense raw tensor."""

    value: torch.Tensor
    box: Optional[Box]
    channels: Optional[torch.Tensor] = None


class View:
    """How one step's output is seen going down: its ``layout`` (``"NCHW"``, ``"NHWC"``,
    ``"tokens"`` or ``None``), one image's raw shape, and for the two grid layouts the presented
    ``(C, H, W)`` a box form lives on."""

    def __init__(self, layout: Optional[str], raw: Tuple[int, ...]) -> None:
        self.layout = layout
        self.raw_shape = tuple(int(d) for d in raw)
        self.boxed = layout in ("NCHW", "NHWC")
        if layout == "NCHW":
            self.presented: Optional[Tuple[int, int, int]] = self.raw_shape  # type: ignore[assignment]
        elif layout == "NHWC":
            h, w, c = self.raw_shape
            self.presented = (c, h, w)
        else:
            self.presented = None

    @property
    def channels(self) -> int:
        return self.presented[0] if self.presented is not None else self.raw_shape[0]

    @property
    def size(self) -> Tuple[int, int]:
        return self.presented[1], self.presented[2]

    def present(self, tensor: torch.Tensor) -> torch.Tensor:
        """A raw ``(N, …)`` tensor of this step's layout as ``(N, C, H, W)`` (a view)."""
        return tensor.permute(0, 3, 1, 2) if self.layout == "NHWC" else tensor

    def unpresent(self, value: torch.Tensor) -> torch.Tensor:
        return value.permute(0, 2, 3, 1) if self.layout == "NHWC" else value

    def raw(self, signal: Signal) -> torch.Tensor:
        """The signal as the dense raw tensor of the step's output."""
        if signal.box is None:
            return signal.value
        return self.unpresent(self.whole(dense(signal, self.channels)).value)

    def on(self, value: torch.Tensor) -> Signal:
        """A dense raw tensor as a signal: a whole-map box form where the layout has a grid."""
        if not self.boxed:
            return Signal(value, None)
        value = self.present(value)
        return Signal(value, Box.whole(value.shape[0], value.shape[-2], value.shape[-1], value.device))

    def whole(self, signal: Signal) -> Signal:
        """The signal on its whole map (the box pasted at its place)."""
        if signal.box is None or signal.box.is_map(self.size):
            return signal
        return Signal(signal.box.paste(signal.value, self.size),
                      Box.whole(signal.value.shape[0], self.size[0], self.size[1], signal.value.device), signal.channels)

    def settle(self, signal: Signal) -> Signal:
        """A box at least as large as its map becomes the whole map (cheaper, and exact); a box
        form on a step without a grid becomes raw."""
        box = signal.box
        if box is None:
            return signal
        if not self.boxed:
            raise AssertionError("a box form on a step without a grid")
        if box.is_map(self.size):
            return signal
        if box.h * box.w >= self.size[0] * self.size[1]:
            return self.whole(signal)
        return signal

    def accumulate(self, a: Signal, b: Signal) -> Signal:
        """The sum of two signals on one step's output (branches meeting going down): on the
        union of their boxes."""
        if a.box is None or b.box is None:
            return Signal(self.raw(a) + self.raw(b), None)
        if not (a.channels is not None and a.channels is b.channels):
            a, b = dense(a, self.channels), dense(b, self.channels)
        if a.box.same(b.box):
            return Signal(a.value + b.value, a.box, a.channels)
        box = a.box.union(b.box)
        return self.settle(Signal(box.place(a.value, a.box) + box.place(b.value, b.box), box, a.channels))

    def crop(self, tensor: torch.Tensor, rows: torch.Tensor, signal: Signal) -> torch.Tensor:
        """A recorded raw tensor of this step's output shape (an activation's input, its output)
        where ``signal`` lives: rows ``rows``, on its box and channels in box form."""
        if signal.box is None:
            return tensor[rows]
        return crop(self.present(tensor), rows, signal.box, signal.channels)


def dense(signal: Signal, channels: int) -> Signal:
    """All channels: a single-channel signal placed at its channel of zero maps."""
    if signal.channels is None:
        return signal
    value = signal.value
    out = value.new_zeros((value.shape[0], channels) + tuple(value.shape[2:]))
    out[torch.arange(value.shape[0], device=value.device), signal.channels] = value[:, 0]
    return Signal(out, signal.box)
