"""Receptive-field arithmetic: where a box of one feature map comes from in the map below.

A box is an origin (may be negative: padding) and a size, per axis. Going down through a layer
of kernel k, stride s and padding p, the positions [o, o + n) receive signal from
[o * s - p, (o + n - 1) * s - p + k) below: the support of a transposed convolution, and of the
adjoint of max pooling, of a box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class Window:
    """Kernel, stride and padding of one convolution or max pooling, per axis (H, W)."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]


def down(origin: int, size: int, kernel: int, stride: int, padding: int) -> Tuple[int, int]:
    """The box below that a box ``[origin, origin + size)`` reaches down to."""
    return origin * stride - padding, (size - 1) * stride + kernel


def box_below(
    windows: Sequence[Window], y: int, x: int, height: int = 1, width: int = 1
) -> Tuple[int, int, int, int]:
    """Origin and size ``(y0, x0, h, w)`` in the input of the first window of ``windows``
    (ordered bottom-up) reached from the box at ``(y, x)`` of size ``height x width`` on top."""
    y0, x0, h, w = y, x, height, width
    for window in reversed(windows):
        y0, h = down(y0, h, window.kernel[0], window.stride[0], window.padding[0])
        x0, w = down(x0, w, window.kernel[1], window.stride[1], window.padding[1])
    return y0, x0, h, w


def receptive_field(
    windows: Sequence[Window], y: int, x: int, image_size: Tuple[int, int]
) -> Tuple[int, int, int, int]:
    """The receptive field of activation ``(y, x)`` on top of ``windows`` as a half-open pixel box
    ``(x0, y0, x1, y1)`` clipped to the image (padding counted, then cut off)."""
    y0, x0, h, w = box_below(windows, y, x)
    height, width = image_size
    return max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
