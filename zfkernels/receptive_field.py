"""Receptive-field arithmetic: where a box of one feature map comes from in the map below.

A box is an origin (may be negative: padding) and a size, per axis. Going down through a layer
of kernel k, stride s, padding p and dilation d, the positions [o, o + n) receive signal from
[o * s - p, (o + n - 1) * s - p + d * (k - 1) + 1) below: the support of a transposed
convolution, and of the adjoint of max or average pooling, of a box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class Window:
    """Kernel, stride, padding and dilation of one convolution or pooling, per axis (H, W), and
    whether a pooling counts partial windows (``ceil_mode``)."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def span(self, axis: int) -> int:
        """Pixels one window covers along ``axis`` (the dilated kernel)."""
        return self.dilation[axis] * (self.kernel[axis] - 1) + 1


def down(origin: int, size: int, window: Window, axis: int) -> Tuple[int, int]:
    """The box below (origin, size) that a box ``[origin, origin + size)`` reaches down to."""
    return origin * window.stride[axis] - window.padding[axis], (size - 1) * window.stride[axis] + window.span(axis)


def box_below(
    windows: Sequence[Window], y: int, x: int, height: int = 1, width: int = 1
) -> Tuple[int, int, int, int]:
    """Origin and size ``(y0, x0, h, w)`` in the input of the first window of ``windows``
    (ordered bottom-up) reached from the box at ``(y, x)`` of size ``height x width`` on top."""
    y0, x0, h, w = y, x, height, width
    for window in reversed(windows):
        y0, h = down(y0, h, window, 0)
        x0, w = down(x0, w, window, 1)
    return y0, x0, h, w


def clip_box(y0: int, x0: int, h: int, w: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """An unclipped box ``(y0, x0, h, w)`` as a half-open pixel box ``(x0, y0, x1, y1)`` cut at
    the image's border (padding counted, then cut off)."""
    height, width = image_size
    return max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)


def receptive_field(
    windows: Sequence[Window], y: int, x: int, image_size: Tuple[int, int]
) -> Tuple[int, int, int, int]:
    """The receptive field of activation ``(y, x)`` on top of a chain of ``windows`` as a
    half-open pixel box ``(x0, y0, x1, y1)`` clipped to the image."""
    return clip_box(*box_below(windows, y, x), image_size)
