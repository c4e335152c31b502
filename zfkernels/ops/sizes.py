"""Output sizes of pooling and (transposed) convolution, once, as PyTorch computes them.

The C++ kernels (``csrc/checks.h``, ``csrc/project_host.h``), the fake kernels and the engine's
map sizes all use these formulas; this module is their Python side.
"""

from __future__ import annotations


def pooled_size(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1, ceil_mode: bool = False) -> int:
    """Length of one axis after a pooling or convolution window, as PyTorch's
    ``pooling_output_shape`` computes it (a convolution is the ``ceil_mode=False`` case).

    With ``ceil_mode`` a partial last window counts too, unless it would start in the right
    padding. May be zero or negative when the dilated window does not fit the padded input.
    """
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * padding - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def projected_size(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1, output_padding: int = 0) -> int:
    """Length of one axis after a transposed convolution, as ``F.conv_transpose2d`` computes it."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1 + output_padding
