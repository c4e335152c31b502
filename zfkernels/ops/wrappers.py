"""Typed Python wrappers around the ``torch.ops.zfkernels`` kernels.

The wrappers only normalise arguments (an int or a pair, ``stride`` defaulting to
``kernel_size``, ``output_size`` turned into an output padding); every check on tensors
happens in the C++ kernels (and in the fake kernels of ``fake.py`` under tracing), so
calling ``torch.ops.zfkernels.*`` directly is exactly as safe.

These are inference ops without a derivative: their autograd formula raises, so a backward
pass through them fails with a message naming the op instead of returning a wrong gradient
(``zfkernels/ops/autograd.py``; ``tests/test_op_registration.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, op: str, name: str) -> Tuple[int, int]:
    """Turn an int or a 2-sequence of ints into a pair, with an error naming ``op`` and ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got a bool")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, torch.Size) or (isinstance(value, Sequence) and not isinstance(value, str)):
        items = tuple(value)
        if len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return (int(items[0]), int(items[1]))
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def geometry(
    op: str, kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    kernel = pair(kernel_size, op, "kernel_size")
    strides = kernel if stride is None else pair(stride, op, "stride")
    return kernel, strides, pair(padding, op, "padding")


def maxpool_switches(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max pooling that also returns the argmax *switches*.

    Returns ``(out, switches)``: ``out`` equals ``F.max_pool2d(x, kernel_size, stride, padding,
    ceil_mode=ceil_mode)`` exactly (NaN included); ``switches`` is ``uint8`` of ``out``'s shape,
    holding the argmax's offset ``ky * kW + kx`` inside its window, whose origin is
    ``(oh * sH - pH, ow * sW - pW)``. Ties go to the first maximum in row-major order.
    """
    kernel, strides, pad = geometry("maxpool_switches", kernel_size, stride, padding)
    return torch.ops.zfkernels.maxpool_switches(x, kernel, strides, pad, bool(ceil_mode))


def switches_to_indices(
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
) -> torch.Tensor:
    """Convert switches to PyTorch's ``return_indices=True`` indices (int64, flat ``h * W + w``)."""
    size = pair(input_size, "switches_to_indices", "input_size")
    kernel, strides, pad = geometry("switches_to_indices", kernel_size, stride, padding)
    return torch.ops.zfkernels.switches_to_indices(switches, size, kernel, strides, pad)


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
    """Switch-guided unpooling: the exact adjoint of max pooling.

    Every pixel of the ``input_size`` map receives the **sum** of the ``y`` values whose
    window's argmax (its switch) is that pixel. With ``rows`` (int64 ``(B,)``), row ``b`` of
    ``y`` uses ``switches[rows[b]]``, so many projections share one image's switches. With
    ``rectify=True`` the result goes through ReLU in the same pass.
    """
    size = pair(input_size, "unpool", "input_size")
    kernel, strides, pad = geometry("unpool", kernel_size, stride, padding)
    return torch.ops.zfkernels.unpool(y, switches, size, kernel, strides, pad, rows, bool(rectify))


def output_padding_for(
    op: str,
    in_size: Tuple[int, int],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    output_size: Optional[IntPair],
) -> Tuple[int, int]:
    """The output padding that makes a transposed convolution produce ``output_size``."""
    if output_size is None:
        return (0, 0)
    want = pair(output_size, op, "output_size")
    result = []
    for axis in range(2):
        smallest = (in_size[axis] - 1) * stride[axis] - 2 * padding[axis] + kernel[axis]
        extra = want[axis] - smallest
        if not 0 <= extra < stride[axis]:
            raise ValueError(
                f"{op}: output_size {tuple(want)} is not reachable from an input of "
                f"{tuple(in_size)} with kernel {kernel}, stride {stride}, padding {padding} "
                f"(axis {axis} must lie in [{smallest}, {smallest + stride[axis] - 1}])"
            )
        result.append(extra)
    return (result[0], result[1])


def project(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_size: Optional[IntPair] = None,
    *,
    channels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Transposed-filter projection: ``F.conv_transpose2d(x, weight, stride, padding)``, no bias.

    ``weight`` is the forward convolution's ``(C_out, C_in, kH, kW)``. ``output_size`` ``(H, W)``
    picks the output padding. With ``channels`` (int64 ``(B,)``), ``x`` is ``(B, 1, h, w)``: one
    selected feature map per row, projected through ``weight[channels[b]]`` alone.
    """
    strides = pair(stride, "project", "stride")
    pad = pair(padding, "project", "padding")
    out_pad = (0, 0)
    if output_size is not None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or weight.dim() != 4:
            raise ValueError("project: output_size needs 4-D x and weight")
        out_pad = output_padding_for(
            "project",
            (x.shape[2], x.shape[3]),
            (weight.shape[2], weight.shape[3]),
            strides,
            pad,
            output_size,
        )
    return torch.ops.zfkernels.project(x, weight, strides, pad, out_pad, channels)
