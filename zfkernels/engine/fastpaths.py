"""The CPU fast paths of the way down: a convolution's transpose on a box as matrix products where
oneDNN's transposed convolution is slow, and BatchNorm's scale, which the plan folds into the
convolution below it (docs/engine.md, "Fast paths")."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..receptive_field import Window
from .boxes import Box, Signal


def transpose(signal: Signal, shape: Tuple[int, int], below_shape: Tuple[int, int], window: Window, weight: torch.Tensor,
               groups: int) -> Signal:
    """A convolution's (or plain average pooling's) transpose on a signal, whole map or box."""
    below = (int(below_shape[-2]), int(below_shape[-1]))
    box = signal.box
    if box.is_map(shape):
        patches = None
        if signal.channels is None and groups == 1 and signal.value.device.type == "cpu":
            patches = project_patches(signal.value, weight, window)
        if patches is not None and patches.shape[-2] <= below[0] and patches.shape[-1] <= below[1]:
            # A patchify stem (ViT, ConvNeXt, Swin): the map below is the patches, then what
            # no patch covers (nothing, or the remainder of a size the stride does not divide).
            out = F.pad(patches, (0, below[1] - patches.shape[-1], 0, below[0] - patches.shape[-2]))
            return Signal(out, Box.whole(out.shape[0], below[0], below[1], out.device))
        # Whole maps: the layer's own padding, and output_size lands exactly on the map below.
        out = ops.project(signal.value, weight, window.stride, window.padding, below, groups=groups,
                          dilation=window.dilation, channels=signal.channels)
        return Signal(out, Box.whole(out.shape[0], below[0], below[1], out.device))
    if signal.channels is None and groups == 1 and signal.value.device.type == "cpu":
        out = project_as_matmul(signal.value, weight, window)
        if out is None:
            out = project_patches(signal.value, weight, window)
    else:
        out = None
    if out is None:
        out = ops.project(signal.value, weight, window.stride, 0, groups=groups, dilation=window.dilation,
                          channels=signal.channels)
    value, new_box = box.down(window).clip(out, below)
    return Signal(value, new_box)


def project_patches(x: torch.Tensor, weight: torch.Tensor, window: Window) -> Optional[torch.Tensor]:
    """``ops.project(x, weight, stride, 0)`` for a convolution whose kernel equals its stride
    (non-overlapping patches, no padding, no dilation: the stems of ViT, ConvNeXt and Swin,
    ConvNeXt's downsampling): each output pixel receives one tap, so the transpose is one
    matrix product per selection and a pixel shuffle. ``None`` for other convolutions. Only the
    networks of issue #18 have such layers, so the ReLU families' bits are untouched."""
    if window.stride != window.kernel or window.padding != (0, 0) or window.dilation != (1, 1) or \
            window.kernel == (1, 1) or x.dtype not in (torch.float32, torch.float64):
        return None
    batch, c_out, h, w = x.shape
    c_in, k_h, k_w = weight.shape[1], weight.shape[2], weight.shape[3]
    columns = torch.matmul(weight.reshape(c_out, -1).t(), x.reshape(batch, c_out, h * w))
    return columns.view(batch, c_in, k_h, k_w, h, w).permute(0, 1, 4, 2, 5, 3).reshape(batch, c_in, h * k_h, w * k_w)


MATMUL_MIN_PIXELS = 100  # below this a box's batched matrix products are too small to beat oneDNN
FOLD_MAX_CHANNELS = 4  # oneDNN's transposed convolution is slow onto this few channels (the stem)


def project_as_matmul(x: torch.Tensor, weight: torch.Tensor, window: Window) -> Optional[torch.Tensor]:
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


def bn_tensors(bn: nn.Module) -> Tuple[Optional[torch.Tensor], ...]:
    return (bn.weight, bn.running_var)


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """γ / √(running_var + ε): the eval-mode BatchNorm's linear part, per channel."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
    return scale.to(bn.running_var.dtype)


