"""project: the transposed-filter projection, dense and with channels=, against
F.conv_transpose2d (through the reference), and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import reference

from conftest import DTYPES, LAYOUTS, tolerance

# weight (C_out, C_in, kH, kW), stride, padding, the map fed in (h, w), output_size or None
GEOMETRIES = [
    ((8, 5, 3, 3), 1, 1, (7, 6), None),
    ((8, 5, 3, 3), 1, 0, (4, 4), None),
    ((8, 20, 3, 3), 1, 1, (5, 5), None),  # >= 16 output channels: the CPU's by-channel loop
    ((8, 5, 5, 5), 2, 0, (6, 6), (15, 15)),  # output_size picks output padding 1
    ((6, 24, 5, 5), 2, 0, (6, 6), None),
    ((4, 3, 7, 7), 2, 1, (5, 9), (14, 21)),  # ZFNet conv1-like, mixed output padding
    ((6, 2, 3, 3), 3, 1, (4, 4), None),
    ((6, 2, 1, 1), 1, 0, (4, 4), None),
    ((5, 3, 3, 2), (2, 1), (1, 0), (3, 5), None),
    ((4, 2, 7, 7), 1, 4, (9, 9), None),  # padding beyond the kernel: the shared body
    ((5, 3, 3, 3), 3, 0, (4, 5), (12, 17)),  # stride 3, output padding 2 on one axis
    ((3, 4, 5, 5), 3, 2, (1, 1), None),  # a 1x1 map
    ((4, 3, 1, 1), 2, 0, (3, 4), (6, 8)),  # 1x1 kernel, stride 2: output padding fills zeros
]


def make(device, wshape, hw, rows=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(wshape, generator=gen).to(device)
    x = torch.randn((rows, 1) + hw, generator=gen).to(device)
    channels = torch.randint(0, wshape[0], (rows,), generator=gen).to(device)
    return weight, x, channels


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"w{'x'.join(map(str, g[0]))}-s{g[1]}p{g[2]}")
def test_channels_matches_grouped_conv_transpose(device, geometry):
    wshape, s, p, hw, out_size = geometry
    weight, x, channels = make(device, wshape, hw)
    channels[3] = channels[0]  # repeats
    got = zfkernels.project(x, weight, s, p, out_size, channels=channels)
    want = reference.project(x, weight, s, p, out_size, channels=channels)
    assert got.shape == want.shape and got.dtype == x.dtype
    if out_size is not None:
        assert tuple(got.shape[-2:]) == tuple(out_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Independent check of the reference path: one plain conv_transpose2d per row.
    for b in (0, 5):
        out_pad = zfkernels.ops.output_padding_for("t", hw, wshape[2:], zfkernels.ops.pair(s, "t", "s"), zfkernels.ops.pair(p, "t", "p"), out_size)
        one = F.conv_transpose2d(x[b : b + 1], weight[channels[b] : channels[b] + 1], None, s, p, out_pad)
        torch.testing.assert_close(got[b : b + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"w{'x'.join(map(str, g[0]))}-s{g[1]}p{g[2]}")
def test_dense_matches_conv_transpose(device, geometry):
    wshape, s, p, hw, out_size = geometry
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(wshape, generator=gen).to(device)
    x = torch.randn((3, wshape[0]) + hw, generator=gen).to(device)
    got = zfkernels.project(x, weight, s, p, out_size)
    if out_size is not None:
        assert tuple(got.shape[-2:]) == tuple(out_size)
    torch.testing.assert_close(got, reference.project(x, weight, s, p, out_size), rtol=1e-5, atol=1e-5)


def test_channels_equals_dense_on_a_one_hot_map(device):
    """Projecting one feature map alone equals the dense projection with every other map zero."""
    weight, x, channels = make(device, (12, 20, 3, 3), (6, 6), rows=4)
    dense_in = torch.zeros(4, 12, 6, 6, device=device)
    dense_in[torch.arange(4, device=device), channels] = x[:, 0]
    torch.testing.assert_close(
        zfkernels.project(x, weight, 1, 1, channels=channels), zfkernels.project(dense_in, weight, 1, 1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("wshape,s,p", [((8, 20, 3, 3), 1, 1), ((6, 3, 7, 7), 2, 1), ((6, 24, 5, 5), 2, 0)])
def test_dtypes_and_layouts(device, dtype, layout_name, wshape, s, p):
    weight, x, channels = make(device, wshape, (7, 8), rows=5, seed=2)
    weight, x = LAYOUTS[layout_name](weight.to(dtype)), LAYOUTS[layout_name](x.to(dtype))
    got = zfkernels.project(x, weight, s, p, channels=channels)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.project(x, weight, s, p, channels=channels), **tolerance(dtype))
    dense = torch.randn((2, wshape[0], 7, 8), generator=torch.Generator().manual_seed(3)).to(device, dtype)
    got = zfkernels.project(LAYOUTS[layout_name](dense), weight, s, p)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.project(dense, weight.contiguous(), s, p), **tolerance(dtype))


def test_non_finite_weights_propagate_like_the_reference(device):
    weight, x, channels = make(device, (4, 3, 3, 3), (5, 5), rows=3)
    weight[channels[0], 1, 1, 1] = float("inf")
    got = zfkernels.project(x, weight, 2, 1, channels=channels)
    want = reference.project(x, weight, 2, 1, channels=channels)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_repeated_calls_are_bitwise_identical(device):
    weight, x, channels = make(device, (16, 32, 3, 3), (13, 13), rows=20)
    first = zfkernels.project(x, weight, 1, 1, channels=channels)
    for _ in range(3):
        assert torch.equal(first, zfkernels.project(x, weight, 1, 1, channels=channels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_repeated_calls_are_bitwise_identical(device, dtype):
    """The dense path too (on CUDA it must not let the library pick a nondeterministic algorithm)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 16, 5, 5, generator=gen).to(device, dtype)
    x = torch.randn(8, 32, 13, 13, generator=gen).to(device, dtype)
    first = zfkernels.project(x, weight, 2, 1)
    for _ in range(3):
        assert torch.equal(first, zfkernels.project(x, weight, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(device, dtype):
    weight = torch.randn(8, 5, 3, 3, device=device, dtype=dtype)
    x = torch.randn(0, 1, 6, 6, device=device, dtype=dtype)
    channels = torch.zeros(0, dtype=torch.int64, device=device)
    for got, shape in (
        (zfkernels.project(x, weight, 2, 1, channels=channels), (0, 5, 11, 11)),
        (zfkernels.project(torch.randn(0, 8, 6, 6, device=device, dtype=dtype), weight, 2, 1), (0, 5, 11, 11)),
        (zfkernels.project(x, weight, 2, 1, output_size=(12, 11), channels=channels), (0, 5, 12, 11)),
    ):
        assert got.shape == shape and got.dtype == dtype and got.device == x.device


# --- bad input: one test per refusal -------------------------------------------------------


def test_rejects_wrong_rank(device):
    with pytest.raises(ValueError, match=r"project: expected a 4-D x"):
        zfkernels.project(torch.randn(8, 6, device=device), torch.randn(8, 5, 3, 3, device=device))
    with pytest.raises(ValueError, match=r"project: weight must be a 4-D"):
        zfkernels.project(torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, device=device))


def test_rejects_integer_dtype(device):
    with pytest.raises(TypeError, match=r"project: x must be float"):
        zfkernels.project(torch.ones(1, 8, 6, 6, dtype=torch.int32, device=device), torch.randn(8, 5, 3, 3, device=device))


def test_rejects_mixed_dtypes(device):
    with pytest.raises(TypeError, match=r"project: weight has dtype"):
        zfkernels.project(torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device).half())


def test_rejects_channel_mismatch(device):
    with pytest.raises(ValueError, match=r"project: x has 7 channels but weight expects C_out = 8"):
        zfkernels.project(torch.randn(1, 7, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device))


def test_rejects_several_maps_per_row_with_channels(device):
    with pytest.raises(ValueError, match=r"project: with channels=, x must be \(B, 1, h, w\)"):
        zfkernels.project(torch.randn(2, 3, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device), channels=torch.tensor([0, 1], device=device))


@pytest.mark.parametrize("channels", [[0, 8], [-1, 0]])
def test_rejects_channels_out_of_range(device, channels):
    with pytest.raises(ValueError, match=r"project: channels holds indices outside \[0, 8\)"):
        zfkernels.project(torch.randn(2, 1, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device), channels=torch.tensor(channels, device=device))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_rejects_channels_of_wrong_dtype(device, dtype):
    x, w = torch.randn(2, 1, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(TypeError, match=r"project: channels must be int64"):
        zfkernels.project(x, w, channels=torch.tensor([0, 1], dtype=dtype, device=device))


def test_rejects_channels_of_wrong_length(device):
    x, w = torch.randn(2, 1, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: channels must be 1-D of length 2"):
        zfkernels.project(x, w, channels=torch.tensor([0, 1, 2], device=device))


@pytest.mark.parametrize("stride", [0, -1, (1, 0)])
def test_rejects_non_positive_stride(device, stride):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: stride must be positive"):
        zfkernels.project(x, w, stride)


def test_rejects_unreachable_output_size(device):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: output_size \(20, 20\) is not reachable"):
        zfkernels.project(x, w, 2, 1, output_size=(20, 20))


def test_rejects_output_padding_not_below_stride(device):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: output_padding must be"):
        torch.ops.zfkernels.project(x, w, [2, 2], [1, 1], [2, 0], None)


@pytest.mark.cuda
@pytest.mark.skipif(not zfkernels.has_cuda(), reason="needs a CUDA GPU and the CUDA kernels")
def test_rejects_tensors_on_different_devices():
    x, w = torch.randn(2, 1, 6, 6), torch.randn(8, 5, 3, 3)
    with pytest.raises(ValueError, match=r"project: weight is on cuda"):
        zfkernels.project(x, w.cuda(), channels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"project: channels is on cuda"):
        zfkernels.project(x, w, channels=torch.tensor([0, 1], device="cuda"))
