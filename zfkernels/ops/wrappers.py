"""Typed Python wrappers around the ``torch.ops.zfkernels`` kernels.

The wrappers only normalise arguments (an int or a pair, ``stride`` defaulting to
``kernel_size``, ``output_size`` turned into an output padding) and keep PyTorch's argument
order (``maxpool_switches`` as ``F.max_pool2d``); every check on tensors
happens in the C++ kernels (and in the fake kernels of ``fake.py`` under tracing), so
calling ``torch.ops.zfkernels.*`` directly is exactly as safe.

These are inference ops without a derivative: their autograd formula raises, so a backward
pass through them fails with a message naming the op instead of returning a wrong gradient
(``zfkernels/ops/autograd.py``; ``tests/test_op_registration.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .sizes import projected_size

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
    op: str, kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair, dilation: IntPair = 1
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """``(kernel, stride, padding, dilation)`` as pairs; ``stride`` defaults to ``kernel_size``."""
    kernel = pair(kernel_size, op, "kernel_size")
    strides = kernel if stride is None else pair(stride, op, "stride")
    return kernel, strides, pair(padding, op, "padding"), pair(dilation, op, "dilation")


def maxpool_switches(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max pooling that also returns the argmax *switches*, in ``F.max_pool2d``'s argument order.

    Returns ``(out, switches)``: ``out`` equals ``F.max_pool2d(x, kernel_size, stride, padding,
    dilation, ceil_mode)`` exactly (NaN included); ``switches`` is ``uint8`` of ``out``'s shape,
    holding the argmax's tap ``ky * kW + kx`` inside its window, whose origin is
    ``(oh * sH - pH, ow * sW - pW)``; tap ``(ky, kx)`` is pixel ``origin + (ky * dH, kx * dW)``.
    Ties go to the first maximum in row-major order. ``x`` is ``(N, C, H, W)`` or unbatched
    ``(C, H, W)``.
    """
    kernel, strides, pad, dil = geometry("maxpool_switches", kernel_size, stride, padding, dilation)
    return torch.ops.zfkernels.maxpool_switches(x, kernel, strides, pad, bool(ceil_mode), dil)


def switches_to_indices(
    switches: torch.Tensor,
    input_size: IntPair,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Convert switches to PyTorch's ``return_indices=True`` indices (int64, flat ``h * W + w``)."""
    size = pair(input_size, "switches_to_indices", "input_size")
    kernel, strides, pad, dil = geometry("switches_to_indices", kernel_size, stride, padding, dilation)
    return torch.ops.zfkernels.switches_to_indices(switches, size, kernel, strides, pad, dil)


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
    """Switch-guided unpooling: the exact adjoint of max pooling.

    Every pixel of the ``input_size`` map receives the **sum** of the ``y`` values whose
    window's argmax (its switch) is that pixel: ``aten.max_pool2d_with_indices_backward`` with the
    same geometry, as a deterministic gather. With ``rows`` (int64 ``(B,)``), row ``b`` of ``y``
    uses ``switches[rows[b]]``, so many projections share one image's switches. With
    ``rectify=True`` the result goes through ReLU in the same pass. ``y`` and ``switches`` may
    both be unbatched ``(C, h, w)`` (without ``rows``).
    """
    size = pair(input_size, "unpool", "input_size")
    kernel, strides, pad, dil = geometry("unpool", kernel_size, stride, padding, dilation)
    return torch.ops.zfkernels.unpool(y, switches, size, kernel, strides, pad, rows, bool(rectify), dil)


def output_padding_for(
    op: str,
    in_size: Tuple[int, int],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    output_size: Optional[IntPair],
    dilation: Tuple[int, int] = (1, 1),
) -> Tuple[int, int]:
    """The output padding that makes a transposed convolution produce ``output_size``: at least
    the smallest size, and less than ``max(stride, dilation)`` beyond it (what
    ``F.conv_transpose2d`` accepts as ``output_padding``)."""
    if output_size is None:
        return (0, 0)
    want = pair(output_size, op, "output_size")
    result = []
    for axis in range(2):
        smallest = projected_size(in_size[axis], kernel[axis], stride[axis], padding[axis], dilation[axis])
        extra = want[axis] - smallest
        reach = max(stride[axis], dilation[axis])
        if not 0 <= extra < reach:
            raise ValueError(
                f"{op}: output_size {tuple(want)} is not reachable from an input of "
                f"{tuple(in_size)} with kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation} "
                f"(axis {axis} must lie in [{smallest}, {smallest + reach - 1}])"
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
    groups: int = 1,
    dilation: IntPair = 1,
    channels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Transposed-filter projection: ``F.conv_transpose2d(x, weight, None, stride, padding,
    output_padding, groups, dilation)``, with the output padding picked by ``output_size``.

    ``weight`` is the forward convolution's ``(C_out, C_in / groups, kH, kW)``; ``x`` is
    ``(B, C_out, h, w)`` or unbatched ``(C_out, h, w)``, and the result has ``C_in`` channels.
    With ``channels`` (int64 ``(B,)``), ``x`` is ``(B, 1, h, w)``: row ``b`` is one selected map
    of the forward conv's output channel ``channels[b]``, projected through that filter alone
    onto its group's ``C_in / groups`` input channels; the row's other channels are zero.
    """
    strides = pair(stride, "project", "stride")
    pad = pair(padding, "project", "padding")
    dil = pair(dilation, "project", "dilation")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"project: groups must be an int, got {groups!r}")
    out_pad = (0, 0)
    if output_size is not None:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or weight.dim() != 4:
            raise ValueError("project: output_size needs a 4-D (or unbatched 3-D) x and a 4-D weight")
        out_pad = output_padding_for(
            "project",
            (x.shape[-2], x.shape[-1]),
            (weight.shape[2], weight.shape[3]),
            strides,
            pad,
            output_size,
            dil,
        )
    return torch.ops.zfkernels.project(x, weight, strides, pad, out_pad, channels, groups, dil)
