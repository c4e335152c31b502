"""Fake (meta) kernels: output shapes, dtypes and the shape checks of the C++ kernels, so the ops
trace under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.

The checks mirror ``csrc/checks.h`` (same messages); value checks that need the data (switch
values, index ranges) happen only in the real kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float4d(op: str, name: str, t: torch.Tensor, dims: str) -> None:
    torch._check_value(t.dim() == 4, lambda: f"{op}: expected a 4-D {name} {dims}, got {t.dim()}-D")
    torch._check_type(
        t.dtype in _FLOATS, lambda: f"{op}: {name} must be float32, float16 or bfloat16 (or float64), got {t.dtype}"
    )


def _pooled_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    out = (size + 2 * p - (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _check_pool_geometry(
    op: str, in_h: int, in_w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> None:
    kernel, stride, padding = list(kernel), list(stride), list(padding)
    torch._check_value(kernel[0] > 0 and kernel[1] > 0, lambda: f"{op}: kernel_size must be positive, got {kernel}")
    torch._check_value(stride[0] > 0 and stride[1] > 0, lambda: f"{op}: stride must be positive, got {stride}")
    torch._check_value(
        all(0 <= p and 2 * p <= k for p, k in zip(padding, kernel)),
        lambda: f"{op}: padding must be between 0 and half of kernel_size, got padding {padding} for kernel_size {kernel}",
    )
    torch._check_value(
        kernel[0] * kernel[1] <= 256,
        lambda: f"{op}: kernel_size {kernel} has {kernel[0] * kernel[1]} elements per window; "
        "uint8 switches address at most 256",
    )
    torch._check_value(in_h > 0 and in_w > 0, lambda: f"{op}: the pooled map must be non-empty, got {in_h}x{in_w}")
    torch._check_value(
        in_h + 2 * padding[0] >= kernel[0] and in_w + 2 * padding[1] >= kernel[1],
        lambda: f"{op}: kernel_size {kernel} is larger than the padded input",
    )


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("zfkernels::maxpool_switches")
def _maxpool_switches_fake(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    op = "maxpool_switches"
    _check_float4d(op, "input x", x, "(N, C, H, W)")
    height, width = x.shape[2], x.shape[3]
    _check_pool_geometry(op, height, width, kernel_size, stride, padding)
    out_h = _pooled_size(height, kernel_size[0], stride[0], padding[0], ceil_mode)
    out_w = _pooled_size(width, kernel_size[1], stride[1], padding[1], ceil_mode)
    torch._check_value(out_h > 0 and out_w > 0, lambda: f"{op}: output size would be {out_h}x{out_w}")
    shape = (x.shape[0], x.shape[1], out_h, out_w)
    fmt = _memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    switches = torch.empty(shape, dtype=torch.uint8, device=x.device).contiguous(memory_format=fmt)
    return out, switches


def _check_switches(op: str, switches: torch.Tensor) -> None:
    torch._check_value(switches.dim() == 4, lambda: f"{op}: expected 4-D switches (N, C, h, w), got {switches.dim()}-D")
    torch._check_type(
        switches.dtype == torch.uint8,
        lambda: f"{op}: switches must be uint8 (as maxpool_switches returns them), got {switches.dtype}",
    )


def _check_unpool_geometry(
    op: str,
    input_size: Sequence[int],
    out_h: int,
    out_w: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> None:
    torch._check_value(
        input_size[0] > 0 and input_size[1] > 0, lambda: f"{op}: input_size must be positive, got {list(input_size)}"
    )
    _check_pool_geometry(op, input_size[0], input_size[1], kernel, stride, padding)
    fits = any(
        _pooled_size(input_size[0], kernel[0], stride[0], padding[0], ceil) == out_h
        and _pooled_size(input_size[1], kernel[1], stride[1], padding[1], ceil) == out_w
        for ceil in (False, True)
    )
    torch._check_value(
        fits, lambda: f"{op}: input_size {list(input_size)} cannot have produced a pooled map of {out_h}x{out_w}"
    )


@torch.library.register_fake("zfkernels::switches_to_indices")
def _switches_to_indices_fake(
    switches: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:
    op = "switches_to_indices"
    _check_switches(op, switches)
    _check_unpool_geometry(op, input_size, switches.shape[2], switches.shape[3], kernel_size, stride, padding)
    return torch.empty(switches.shape, dtype=torch.int64, device=switches.device).contiguous(
        memory_format=_memory_format(switches)
    )


def _check_index_vector(op: str, name: str, index: torch.Tensor, length: int, ref: torch.Tensor, ref_name: str) -> None:
    torch._check_type(index.dtype == torch.int64, lambda: f"{op}: {name} must be int64, got {index.dtype}")
    torch._check_value(
        index.dim() == 1 and index.shape[0] == length,
        lambda: f"{op}: {name} must be 1-D of length {length} (one per row), got shape {list(index.shape)}",
    )
    torch._check_value(
        index.device == ref.device,
        lambda: f"{op}: {name} is on {index.device} but {ref_name} is on {ref.device}; move them to one device",
    )


@torch.library.register_fake("zfkernels::unpool")
def _unpool_fake(
    y: torch.Tensor,
    switches: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    rows: Optional[torch.Tensor],
    rectify: bool,
) -> torch.Tensor:
    op = "unpool"
    _check_float4d(op, "y", y, "(B, C, h, w)")
    _check_switches(op, switches)
    torch._check_value(
        switches.device == y.device,
        lambda: f"{op}: switches is on {switches.device} but y is on {y.device}; move them to one device",
    )
    if rows is None:
        torch._check_value(
            switches.shape == y.shape,
            lambda: f"{op}: switches shape {list(switches.shape)} does not match y's shape {list(y.shape)}",
        )
    else:
        torch._check_value(
            switches.shape[1:] == y.shape[1:],
            lambda: f"{op}: switches shape {list(switches.shape)} does not match y's (C, h, w) {list(y.shape[1:])}",
        )
        _check_index_vector(op, "rows", rows, y.shape[0], y, "y")
    _check_unpool_geometry(op, input_size, y.shape[2], y.shape[3], kernel_size, stride, padding)
    shape = (y.shape[0], y.shape[1], input_size[0], input_size[1])
    return torch.empty(shape, dtype=y.dtype, device=y.device).contiguous(memory_format=_memory_format(y))


def _projected_size(size: int, k: int, s: int, p: int, op_: int) -> int:
    return (size - 1) * s - 2 * p + k + op_


@torch.library.register_fake("zfkernels::project")
def _project_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    channels: Optional[torch.Tensor],
) -> torch.Tensor:
    op = "project"
    _check_float4d(op, "x", x, "(B, C_out, h, w)")
    torch._check_value(
        weight.dim() == 4, lambda: f"{op}: weight must be a 4-D (C_out, C_in, kH, kW) tensor, got {weight.dim()}-D"
    )
    torch._check_type(weight.dtype == x.dtype, lambda: f"{op}: weight has dtype {weight.dtype} but x has {x.dtype}")
    torch._check_value(
        weight.device == x.device,
        lambda: f"{op}: weight is on {weight.device} but x is on {x.device}; move them to one device",
    )
    torch._check_value(stride[0] > 0 and stride[1] > 0, lambda: f"{op}: stride must be positive, got {list(stride)}")
    torch._check_value(padding[0] >= 0 and padding[1] >= 0, lambda: f"{op}: padding must be non-negative")
    torch._check_value(
        all(0 <= o < s for o, s in zip(output_padding, stride)),
        lambda: f"{op}: output_padding must be non-negative and smaller than stride",
    )
    if channels is None:
        torch._check_value(
            x.shape[1] == weight.shape[0],
            lambda: f"{op}: x has {x.shape[1]} channels but weight expects C_out = {weight.shape[0]}",
        )
    else:
        torch._check_value(
            x.shape[1] == 1, lambda: f"{op}: with channels=, x must be (B, 1, h, w), got {x.shape[1]} channels"
        )
        _check_index_vector(op, "channels", channels, x.shape[0], x, "x")
    out_h = _projected_size(x.shape[2], weight.shape[2], stride[0], padding[0], output_padding[0])
    out_w = _projected_size(x.shape[3], weight.shape[3], stride[1], padding[1], output_padding[1])
    torch._check_value(out_h > 0 and out_w > 0, lambda: f"{op}: output size would be {out_h}x{out_w}")
    shape = (x.shape[0], weight.shape[1], out_h, out_w)
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=_memory_format(x))
