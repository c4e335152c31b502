"""Fake (meta) kernels: output shapes, dtypes and layouts, with every check that shape inference
needs, so the ops trace under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.

Each check mirrors one in ``csrc/checks.h`` / ``csrc/*_host.h``, in the same order and with the
same message, so a refusal reads the same eagerly and under tracing
(``tests/test_op_registration.py`` runs every refusal both ways). Checks that need the data
(switch values, index ranges) happen only in the real kernels.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .sizes import pooled_size, projected_size

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_EXTENT = 1 << 30  # coordinates are 32-bit in the kernels (csrc/checks.h, kMaxExtent)
# c10::ScalarType's names, as the C++ messages print a dtype.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _check_value(condition: bool, message: str) -> None:
    torch._check_value(condition, lambda: message)


def _check_type(condition: bool, message: str) -> None:
    torch._check_type(condition, lambda: message)


def _batched_map(op: str, name: str, t: torch.Tensor, dims: str) -> torch.Tensor:
    _check_value(t.dim() in (3, 4), f"{op}: expected a 4-D {name} {dims} (or 3-D without the batch), got {t.dim()}-D")
    for size in t.shape[-3:]:
        _check_value(size < _MAX_EXTENT, f"{op}: {name} has a dimension of {size} (limit 2^30)")
    _check_type(
        t.dtype in _FLOATS,
        f"{op}: {name} must be float32, float16 or bfloat16 (or float64), got {_dtype_name(t.dtype)}",
    )
    return t.unsqueeze(0) if t.dim() == 3 else t


def _batched_switches(op: str, switches: torch.Tensor) -> torch.Tensor:
    _check_value(
        switches.dim() in (3, 4),
        f"{op}: expected 4-D switches (N, C, h, w) (or 3-D without the batch), got {switches.dim()}-D",
    )
    _check_type(
        switches.dtype == torch.uint8,
        f"{op}: switches must be uint8 (as maxpool_switches returns them), got {_dtype_name(switches.dtype)}",
    )
    return switches.unsqueeze(0) if switches.dim() == 3 else switches


def _check_pair(op: str, name: str, v: Sequence[int]) -> None:
    _check_value(len(v) == 2, f"{op}: {name} must have two values (H, W), got {len(v)}")
    _check_value(v[0] < _MAX_EXTENT and v[1] < _MAX_EXTENT, f"{op}: {name} {list(v)} is too large (limit 2^30)")


def _check_positive_pair(op: str, name: str, v: Sequence[int]) -> None:
    _check_pair(op, name, v)
    _check_value(v[0] > 0 and v[1] > 0, f"{op}: {name} must be positive, got {list(v)}")


def _check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check_value(
        t.device == ref.device,
        f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device",
    )


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty_like_layout(shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A new 4-D tensor in the layout the kernels pick for ``like`` (csrc/checks.h, prefers_channels_last)."""
    return torch.empty(shape, dtype=dtype, device=like.device).contiguous(memory_format=_memory_format(like))


def _unbatch(t: torch.Tensor, batched: bool) -> torch.Tensor:
    return t if batched else t.squeeze(0)


def _check_pool_args(op: str, in_h: int, in_w: int, kernel: List[int], stride: List[int], padding: List[int],
                     dilation: List[int]) -> None:
    _check_positive_pair(op, "kernel_size", kernel)
    _check_positive_pair(op, "stride", stride)
    _check_pair(op, "padding", padding)
    _check_positive_pair(op, "dilation", dilation)
    _check_value(
        all(0 <= p and 2 * p <= k for p, k in zip(padding, kernel)),
        f"{op}: padding must be between 0 and half of kernel_size, got padding {padding} for kernel_size {kernel}",
    )
    _check_value(
        kernel[0] * kernel[1] <= 256,
        f"{op}: kernel_size {kernel} has {kernel[0] * kernel[1]} elements per window; uint8 switches address at most 256",
    )
    _check_value(in_h > 0 and in_w > 0, f"{op}: the pooled map must be non-empty, got {in_h}x{in_w}")
    span_h, span_w = (kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1
    _check_value(
        in_h + 2 * padding[0] >= span_h and in_w + 2 * padding[1] >= span_w,
        f"{op}: kernel_size {kernel} with dilation {dilation} spans {span_h}x{span_w}, larger than the padded input "
        f"({in_h + 2 * padding[0]}, {in_w + 2 * padding[1]})",
    )


def _taps_inside(origin: int, k: int, d: int, size: int) -> Tuple[int, int]:
    begin = -(origin // d) if origin < 0 else 0  # ceil(-origin / d)
    return begin, min(k, -((origin - size) // d))


def _window_without_pixels(size: int, out: int, k: int, s: int, p: int, d: int) -> int:
    """csrc/checks.h, window_without_pixels: the first window reading no pixel, or -1."""
    inside_lo = min(-(-p // s), out)
    inside_hi = max(min((size - 1 - (k - 1) * d + p) // s + 1, out), inside_lo)
    for o in list(range(inside_lo)) + list(range(inside_hi, out)):
        begin, end = _taps_inside(o * s - p, k, d, size)
        if begin >= end:
            return o
    return -1


def _check_windows_read_pixels(op: str, size: Tuple[int, int], out: Tuple[int, int], kernel: List[int],
                               stride: List[int], padding: List[int], dilation: List[int]) -> None:
    row = _window_without_pixels(size[0], out[0], kernel[0], stride[0], padding[0], dilation[0])
    column = _window_without_pixels(size[1], out[1], kernel[1], stride[1], padding[1], dilation[1])
    _check_value(
        row < 0 and column < 0,
        f"{op}: with kernel_size {kernel}, padding {padding} and dilation {dilation}, the windows of "
        f"{'row ' if row >= 0 else 'column '}{row if row >= 0 else column} read no pixel of the {size[0]}x{size[1]} "
        "input (all their taps fall in the padding or between pixels)",
    )


def _check_unpool_geometry(op: str, input_size: List[int], out_h: int, out_w: int, kernel: List[int],
                           stride: List[int], padding: List[int], dilation: List[int]) -> None:
    _check_pair(op, "input_size", input_size)
    _check_value(input_size[0] > 0 and input_size[1] > 0, f"{op}: input_size must be positive, got {input_size}")
    _check_pool_args(op, input_size[0], input_size[1], kernel, stride, padding, dilation)
    sizes = [
        [pooled_size(input_size[a], kernel[a], stride[a], padding[a], dilation[a], ceil) for a in range(2)]
        for ceil in (False, True)
    ]
    _check_value(
        [out_h, out_w] in sizes,
        f"{op}: input_size {input_size} cannot have produced a pooled map of {out_h}x{out_w} with kernel_size "
        f"{kernel}, stride {stride}, padding {padding}, dilation {dilation} (it gives {sizes[0][0]}x{sizes[0][1]}, "
        f"or {sizes[1][0]}x{sizes[1][1]} with ceil_mode)",
    )
    _check_windows_read_pixels(op, (input_size[0], input_size[1]), (out_h, out_w), kernel, stride, padding, dilation)


def _check_index_vector(op: str, name: str, index: torch.Tensor, length: int, ref: torch.Tensor, ref_name: str) -> None:
    _check_type(index.dtype == torch.int64, f"{op}: {name} must be int64, got {_dtype_name(index.dtype)}")
    _check_value(
        index.dim() == 1 and index.shape[0] == length,
        f"{op}: {name} must be 1-D of length {length} (one per row), got shape {list(index.shape)}",
    )
    _check_same_device(op, name, index, ref_name, ref)


@torch.library.register_fake("zfkernels::maxpool_switches")
def _maxpool_switches_fake(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    dilation: Sequence[int] = (1, 1),
) -> Tuple[torch.Tensor, torch.Tensor]:
    op = "maxpool_switches"
    kernel, stride, padding, dilation = list(kernel_size), list(stride), list(padding), list(dilation)
    x = _batched_map(op, "input x", input, "(N, C, H, W)")
    height, width = x.shape[2], x.shape[3]
    _check_pool_args(op, height, width, kernel, stride, padding, dilation)
    out_h = pooled_size(height, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = pooled_size(width, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    _check_value(out_h > 0 and out_w > 0, f"{op}: output size would be {out_h}x{out_w} for input x of {height}x{width}")
    _check_windows_read_pixels(op, (height, width), (out_h, out_w), kernel, stride, padding, dilation)
    shape = (x.shape[0], x.shape[1], out_h, out_w)
    batched = input.dim() == 4
    return (_unbatch(_empty_like_layout(shape, x.dtype, x), batched),
            _unbatch(_empty_like_layout(shape, torch.uint8, x), batched))


@torch.library.register_fake("zfkernels::switches_to_indices")
def _switches_to_indices_fake(
    input: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    op = "switches_to_indices"
    switches = _batched_switches(op, input)
    _check_unpool_geometry(op, list(input_size), switches.shape[2], switches.shape[3], list(kernel_size), list(stride),
                           list(padding), list(dilation))
    return _unbatch(_empty_like_layout(switches.shape, torch.int64, switches), input.dim() == 4)


@torch.library.register_fake("zfkernels::unpool")
def _unpool_fake(
    y_in: torch.Tensor,
    switches_in: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    rows: Optional[torch.Tensor],
    rectify: bool,
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    op = "unpool"
    y = _batched_map(op, "y", y_in, "(B, C, h, w)")
    switches = _batched_switches(op, switches_in)
    _check_same_device(op, "switches", switches, "y", y)
    batched = y_in.dim() == 4
    if rows is not None:
        _check_value(batched, f"{op}: rows= needs a batched y (B, C, h, w), got a 3-D y")
        _check_value(
            switches_in.dim() == 4 and switches.shape[1:] == y.shape[1:],
            f"{op}: switches shape {list(switches_in.shape)} does not match y's (C, h, w) {list(y.shape[1:])}",
        )
        _check_index_vector(op, "rows", rows, y.shape[0], y, "y")
    else:
        _check_value(
            switches_in.shape == y_in.shape,
            f"{op}: switches shape {list(switches_in.shape)} does not match y's shape {list(y_in.shape)} "
            "(pass rows= to share switches between rows)",
        )
    _check_unpool_geometry(op, list(input_size), y.shape[2], y.shape[3], list(kernel_size), list(stride),
                           list(padding), list(dilation))
    shape = (y.shape[0], y.shape[1], input_size[0], input_size[1])
    return _unbatch(_empty_like_layout(shape, y.dtype, y), batched)


@torch.library.register_fake("zfkernels::project")
def _project_fake(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    channels: Optional[torch.Tensor],
    groups: int = 1,
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    op = "project"
    stride, padding, output_padding, dilation = list(stride), list(padding), list(output_padding), list(dilation)
    _check_value(
        channels is None or input.dim() == 4,
        f"{op}: with channels=, x must be 4-D (B, 1, h, w) -- one selected feature map per row -- got {input.dim()}-D",
    )
    x = _batched_map(op, "x", input, "(B, C_out, h, w)")
    _check_value(
        weight.dim() == 4, f"{op}: weight must be a 4-D (C_out, C_in / groups, kH, kW) tensor, got {weight.dim()}-D"
    )
    _check_type(
        weight.dtype == x.dtype,
        f"{op}: weight has dtype {_dtype_name(weight.dtype)} but x has {_dtype_name(x.dtype)}",
    )
    _check_same_device(op, "weight", weight, "x", x)
    for size in weight.shape:
        _check_value(size < _MAX_EXTENT, f"{op}: a dimension of weight is {size}, too large (limit 2^30)")
    _check_value(
        weight.numel() > 0,
        f"{op}: weight of shape {list(weight.shape)} is empty (C_out, C_in / groups, kH and kW must all be positive)",
    )
    _check_positive_pair(op, "stride", stride)
    _check_pair(op, "padding", padding)
    _check_pair(op, "output_padding", output_padding)
    _check_positive_pair(op, "dilation", dilation)
    _check_value(padding[0] >= 0 and padding[1] >= 0, f"{op}: padding must be non-negative, got {padding}")
    for axis in range(2):
        _check_value(
            output_padding[axis] >= 0
            and (output_padding[axis] < stride[axis] or output_padding[axis] < dilation[axis]),
            f"{op}: output_padding must be non-negative and smaller than stride or dilation, got {output_padding} "
            f"for stride {stride} and dilation {dilation}",
        )
        span = (weight.shape[2 + axis] - 1) * dilation[axis] + 1
        _check_value(span < _MAX_EXTENT, f"{op}: the dilated kernel's span is {span}, too large (limit 2^30)")
    c_out = weight.shape[0]
    _check_value(groups > 0, f"{op}: groups must be positive, got {groups}")
    _check_value(
        c_out % groups == 0,
        f"{op}: groups = {groups} does not divide weight's C_out = {c_out} "
        "(weight is the forward convolution's (C_out, C_in / groups, kH, kW))",
    )
    if channels is not None:
        _check_value(
            x.shape[1] == 1,
            f"{op}: with channels=, x must be (B, 1, h, w) -- one selected feature map per row -- got "
            f"{x.shape[1]} channels",
        )
        _check_index_vector(op, "channels", channels, x.shape[0], x, "x")
    else:
        _check_value(
            x.shape[1] == c_out,
            f"{op}: x has {x.shape[1]} channels but weight expects C_out = {c_out} "
            "(weight is the forward convolution's (C_out, C_in / groups, kH, kW))",
        )
    out_h, out_w = (
        projected_size(x.shape[2 + a], weight.shape[2 + a], stride[a], padding[a], dilation[a], output_padding[a])
        for a in range(2)
    )
    _check_value(
        x.shape[2] > 0 and x.shape[3] > 0 and out_h > 0 and out_w > 0,
        f"{op}: output size would be {out_h}x{out_w} for x of {x.shape[2]}x{x.shape[3]} (padding {padding} too large?)",
    )
    _check_value(
        out_h < _MAX_EXTENT and out_w < _MAX_EXTENT,
        f"{op}: output size would be {out_h}x{out_w} for x of {x.shape[2]}x{x.shape[3]} (limit 2^30)",
    )
    out_channels = weight.shape[1] * groups
    _check_value(
        out_channels < _MAX_EXTENT,
        f"{op}: the projection's channel count C_in is {out_channels}, too large (limit 2^30)",
    )
    shape = (x.shape[0], out_channels, out_h, out_w)
    return _unbatch(_empty_like_layout(shape, x.dtype, x), input.dim() == 4)
