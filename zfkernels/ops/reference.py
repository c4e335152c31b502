"""Pure-PyTorch reference of every zfkernels op, with the same signatures.

Tests and benchmarks compare the kernels against these. They are built only from stock
PyTorch operators: pooling through ``F.max_pool2d(return_indices=True)``, unpooling as the
adjoint of max pooling through ``scatter_add_`` on the indices (never ``F.max_unpool2d``,
which overwrites where overlapping windows share an argmax), projection through
``F.conv_transpose2d``. Half-precision inputs are computed in float32 and rounded once at the
end, which is the kernels' contract too (float accumulation).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .wrappers import IntPair, geometry, output_padding_for, pair


def _window_origins(
    out_size: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column origins ``oh * sH - pH`` and ``ow * sW - pW``, shaped to broadcast."""
    oh = torch.arange(out_size[0], device=device) * stride[0] - padding[0]
    ow = torch.arange(out_size[1], device=device) * stride[1] - padding[1]
    return oh.view(-1, 1), ow.view(1, -1)


def maxpool_switches(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(return_indices=True)`` with the indices turned into uint8 switches."""
    kernel, strides, pad = geometry("maxpool_switches", kernel_size, stride, padding)
    # Through a contiguous copy: PyTorch's CUDA channels-last kernel reports index 0 (not the
    # window's first pixel) for a window of nothing but -inf, which is no switch at all.
    out, indices = F.max_pool2d(x.contiguous(), kernel, strides, pad, ceil_mode=ceil_mode, return_indices=True)
    width = x.shape[-1]
    row0, col0 = _window_origins((out.shape[-2], out.shape[-1]), strides, pad, x.device)
    offsets = (indices // width - row0) * kernel[1] + (indices % width - col0)
    return out, offsets.to(torch.uint8)


def switches_to_indices(
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
) -> torch.Tensor:
    """Flat ``h * W + w`` indices into the pooled map, as ``return_indices=True`` gives them."""
    _, width = pair(input_size, "switches_to_indices", "input_size")
    kernel, strides, pad = geometry("switches_to_indices", kernel_size, stride, padding)
    row0, col0 = _window_origins((switches.shape[-2], switches.shape[-1]), strides, pad, switches.device)
    offsets = switches.to(torch.int64)
    return (row0 + offsets // kernel[1]) * width + (col0 + offsets % kernel[1])


def unpool(
    y: torch.Tensor,
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    *,
    rows: Optional[torch.Tensor] = None,
    rectify: bool = False,
) -> torch.Tensor:
    """The adjoint of max pooling: ``scatter_add_`` of ``y`` at the switches' pixels."""
    height, width = pair(input_size, "unpool", "input_size")
    if rows is not None:
        switches = switches[rows]
    indices = switches_to_indices(switches, (height, width), kernel_size, stride, padding)
    batch, channels = y.shape[0], y.shape[1]
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros(batch, channels, height * width, dtype=acc_dtype, device=y.device)
    out.scatter_add_(2, indices.reshape(batch, channels, -1), y.reshape(batch, channels, -1).to(acc_dtype))
    if rectify:
        out = torch.relu(out)
    return out.view(batch, channels, height, width).to(y.dtype)


def project(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_size: Optional[IntPair] = None,
    *,
    channels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.conv_transpose2d`` without bias; with ``channels``, a per-sample weight gather and a
    grouped transposed convolution (one group per selection)."""
    strides = pair(stride, "project", "stride")
    pad = pair(padding, "project", "padding")
    kernel = (weight.shape[2], weight.shape[3])
    out_pad = output_padding_for("project", (x.shape[2], x.shape[3]), kernel, strides, pad, output_size)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, ws = x.to(acc_dtype), weight.to(acc_dtype)
    if channels is None:
        out = F.conv_transpose2d(xs, ws, None, strides, pad, out_pad)
        return out.to(x.dtype)
    batch = x.shape[0]
    out_h = (x.shape[2] - 1) * strides[0] - 2 * pad[0] + kernel[0] + out_pad[0]
    out_w = (x.shape[3] - 1) * strides[1] - 2 * pad[1] + kernel[1] + out_pad[1]
    if batch == 0:
        return x.new_zeros((0, weight.shape[1], out_h, out_w))
    per_sample = ws[channels]  # (B, C_in, kH, kW): group b maps 1 channel to C_in channels
    out = F.conv_transpose2d(xs.reshape(1, batch, x.shape[2], x.shape[3]), per_sample, None, strides, pad, out_pad, groups=batch)
    return out.view(batch, weight.shape[1], out_h, out_w).to(x.dtype)
