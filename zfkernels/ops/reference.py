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

from .sizes import projected_size
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
    dilation: IntPair = 1,
    ceil_mode: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(return_indices=True)`` with the indices turned into uint8 switches."""
    kernel, strides, pad, dil = geometry("maxpool_switches", kernel_size, stride, padding, dilation)
    # Through a contiguous copy: PyTorch's CUDA channels-last kernel reports index 0 (not the
    # window's first pixel) for a window of nothing but -inf, which is no switch at all.
    out, indices = F.max_pool2d(x.contiguous(), kernel, strides, pad, dil, ceil_mode=ceil_mode, return_indices=True)
    width = x.shape[-1]
    row0, col0 = _window_origins((out.shape[-2], out.shape[-1]), strides, pad, x.device)
    offsets = ((indices // width - row0) // dil[0]) * kernel[1] + (indices % width - col0) // dil[1]
    return out, offsets.to(torch.uint8)


def switches_to_indices(
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Flat ``h * W + w`` indices into the pooled map, as ``return_indices=True`` gives them."""
    _, width = pair(input_size, "switches_to_indices", "input_size")
    kernel, strides, pad, dil = geometry("switches_to_indices", kernel_size, stride, padding, dilation)
    row0, col0 = _window_origins((switches.shape[-2], switches.shape[-1]), strides, pad, switches.device)
    offsets = switches.to(torch.int64)
    return (row0 + (offsets // kernel[1]) * dil[0]) * width + (col0 + (offsets % kernel[1]) * dil[1])


def unpool(
    y: torch.Tensor,
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    rows: Optional[torch.Tensor] = None,
    rectify: bool = False,
) -> torch.Tensor:
    """The adjoint of max pooling: ``scatter_add_`` of ``y`` at the switches' pixels."""
    height, width = pair(input_size, "unpool", "input_size")
    if rows is not None:
        switches = switches[rows]
    indices = switches_to_indices(switches, (height, width), kernel_size, stride, padding, dilation)
    planes = y.shape[:-2]  # (B, C), or (C,) unbatched
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros(*planes, height * width, dtype=acc_dtype, device=y.device)
    out.scatter_add_(-1, indices.reshape(*planes, -1), y.reshape(*planes, -1).to(acc_dtype))
    if rectify:
        out = torch.relu(out)
    return out.view(*planes, height, width).to(y.dtype)


def project(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_size: Optional[IntPair] = None,
    *,
    groups: int = 1,
    dilation: IntPair = 1,
    channels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.conv_transpose2d`` without bias; with ``channels``, a per-sample weight gather and a
    grouped transposed convolution (one group per selection): selection ``b``'s weight is its
    filter ``weight[channels[b]]`` placed on its group's input channels, zero on the others."""
    strides = pair(stride, "project", "stride")
    pad = pair(padding, "project", "padding")
    dil = pair(dilation, "project", "dilation")
    kernel = (weight.shape[2], weight.shape[3])
    out_pad = output_padding_for("project", (x.shape[-2], x.shape[-1]), kernel, strides, pad, output_size, dil)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, ws = x.to(acc_dtype), weight.to(acc_dtype)
    if channels is None:
        out = F.conv_transpose2d(xs, ws, None, strides, pad, out_pad, groups, dil)
        return out.to(x.dtype)
    batch, c_in = x.shape[0], weight.shape[1] * groups
    out_h, out_w = (projected_size(x.shape[2 + a], kernel[a], strides[a], pad[a], dil[a], out_pad[a]) for a in range(2))
    if batch == 0:
        return x.new_zeros((0, c_in, out_h, out_w))
    # (B, groups, C_in / groups, kH, kW): each selection's filter in its group's slot.
    per_sample = ws.new_zeros((batch, groups) + tuple(weight.shape[1:]))
    per_sample[torch.arange(batch, device=x.device), channels // (weight.shape[0] // groups)] = ws[channels]
    out = F.conv_transpose2d(
        xs.reshape(1, batch, x.shape[2], x.shape[3]), per_sample.view(batch, c_in, *kernel), None, strides, pad, out_pad,
        groups=batch, dilation=dil,
    )
    return out.view(batch, c_in, out_h, out_w).to(x.dtype)
