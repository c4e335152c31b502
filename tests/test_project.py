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


def with_groups_and_dilations(geometries, groups=(1, 2, "depthwise"), dilations=(1, 2, 3)):
    """(weight shape, stride, padding, map, output_size, groups, dilation): each geometry with
    groups 1, 2 (where they divide C_out) and depthwise (weight (C_out, 1, kH, kW), groups C_out),
    at dilations 1-3 (output_size grown by the dilated kernel's extra span)."""
    out = []
    for wshape, s, p, hw, out_size in geometries:
        c_out, _, kh, kw = wshape
        for g in groups:
            if g == "depthwise":
                g, wshape_g = c_out, (c_out, 1, kh, kw)
            elif c_out % g:
                continue
            else:
                wshape_g = wshape
            for d in dilations:
                grown = None if out_size is None else (out_size[0] + (d - 1) * (kh - 1), out_size[1] + (d - 1) * (kw - 1))
                out.append((wshape_g, s, p, hw, grown, g, d))
    return out


def geometry_id(g) -> str:
    return f"w{'x'.join(map(str, g[0]))}-s{g[1]}p{g[2]}g{g[5]}d{g[6]}"


def output_padding(hw, wshape, s, p, d, out_size):
    """By hand from F.conv_transpose2d's size formula, (h - 1) * s - 2p + d (k - 1) + 1 + op."""
    if out_size is None:
        return (0, 0)
    s, p = zfkernels.ops.pair(s, "t", "s"), zfkernels.ops.pair(p, "t", "p")
    return tuple(out_size[a] - ((hw[a] - 1) * s[a] - 2 * p[a] + d * (wshape[2 + a] - 1) + 1) for a in range(2))


def make(device, wshape, hw, rows=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(wshape, generator=gen).to(device)
    x = torch.randn((rows, 1) + hw, generator=gen).to(device)
    channels = torch.randint(0, wshape[0], (rows,), generator=gen).to(device)
    return weight, x, channels


def one_hot_dense(x, channels, c_out):
    """The (B, C_out, h, w) map that holds row b's selected map at channel channels[b], zero elsewhere."""
    dense = torch.zeros((x.shape[0], c_out) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    dense[torch.arange(x.shape[0], device=x.device), channels] = x[:, 0]
    return dense


@pytest.mark.parametrize("geometry", with_groups_and_dilations(GEOMETRIES), ids=geometry_id)
def test_channels_matches_grouped_conv_transpose(device, geometry):
    wshape, s, p, hw, out_size, groups, d = geometry
    weight, x, channels = make(device, wshape, hw)
    channels[3] = channels[0]  # repeats
    got = zfkernels.project(x, weight, s, p, out_size, groups=groups, dilation=d, channels=channels)
    want = reference.project(x, weight, s, p, out_size, groups=groups, dilation=d, channels=channels)
    assert got.shape == want.shape and got.dtype == x.dtype and got.shape[1] == wshape[1] * groups
    if out_size is not None:
        assert tuple(got.shape[-2:]) == tuple(out_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Independent check: the dense projection of a one-hot map, straight through PyTorch.
    dense = F.conv_transpose2d(one_hot_dense(x, channels, wshape[0]), weight, None, s, p,
                               output_padding(hw, wshape, s, p, d, out_size), groups, d)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", with_groups_and_dilations(GEOMETRIES), ids=geometry_id)
def test_dense_matches_conv_transpose(device, geometry):
    wshape, s, p, hw, out_size, groups, d = geometry
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(wshape, generator=gen).to(device)
    x = torch.randn((3, wshape[0]) + hw, generator=gen).to(device)
    got = zfkernels.project(x, weight, s, p, out_size, groups=groups, dilation=d)
    if out_size is not None:
        assert tuple(got.shape[-2:]) == tuple(out_size)
    want = F.conv_transpose2d(x, weight, None, s, p, output_padding(hw, wshape, s, p, d, out_size), groups, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, reference.project(x, weight, s, p, out_size, groups=groups, dilation=d),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wshape,groups", [((12, 20, 3, 3), 1), ((12, 10, 3, 3), 2), ((12, 16, 3, 3), 4),
                                           ((12, 1, 3, 3), 12)])
def test_channels_equals_dense_on_a_one_hot_map(device, wshape, groups):
    """Projecting one feature map alone equals the dense projection with every other map zero;
    outside the selected filter's group the projection is exactly zero."""
    weight, x, channels = make(device, wshape, (6, 6), rows=4)
    got = zfkernels.project(x, weight, 1, 1, groups=groups, channels=channels)
    torch.testing.assert_close(got, zfkernels.project(one_hot_dense(x, channels, wshape[0]), weight, 1, 1, groups=groups),
                               rtol=1e-5, atol=1e-5)
    per_group = wshape[1]
    for b, c in enumerate(channels.tolist()):
        group = c // (wshape[0] // groups)
        outside = torch.ones(got.shape[1], dtype=torch.bool)
        outside[group * per_group : (group + 1) * per_group] = False
        assert (got[b, outside.to(device)] == 0).all()


@pytest.mark.parametrize("groups,dilation", [(1, 1), (2, 2), ("depthwise", 1)])
def test_unbatched_input_gives_unbatched_output(device, groups, dilation):
    weight = torch.randn(8, 3, 3, 3, device=device) if groups != "depthwise" else torch.randn(8, 1, 3, 3, device=device)
    groups = 8 if groups == "depthwise" else groups
    x = torch.randn(8, 5, 6, device=device)
    got = zfkernels.project(x, weight, 2, 1, (10 + 2 * (dilation - 1), 12 + 2 * (dilation - 1)), groups=groups,
                            dilation=dilation)
    want = F.conv_transpose2d(x, weight, None, 2, 1, (1, 1), groups, dilation)
    assert got.dim() == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("wshape,s,p,groups,d", [((8, 20, 3, 3), 1, 1, 1, 1), ((6, 3, 7, 7), 2, 1, 1, 1),
                                                 ((6, 24, 5, 5), 2, 0, 1, 1), ((8, 16, 3, 3), 2, 1, 2, 2),
                                                 ((6, 1, 3, 3), 2, 1, 6, 1), ((6, 2, 3, 3), 1, 2, 3, 3)])
def test_dtypes_and_layouts(device, dtype, layout_name, wshape, s, p, groups, d):
    weight, x, channels = make(device, wshape, (7, 8), rows=5, seed=2)
    weight, x = LAYOUTS[layout_name](weight.to(dtype)), LAYOUTS[layout_name](x.to(dtype))
    got = zfkernels.project(x, weight, s, p, groups=groups, dilation=d, channels=channels)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.project(x, weight, s, p, groups=groups, dilation=d, channels=channels),
                               **tolerance(dtype))
    dense = torch.randn((2, wshape[0], 7, 8), generator=torch.Generator().manual_seed(3)).to(device, dtype)
    got = zfkernels.project(LAYOUTS[layout_name](dense), weight, s, p, groups=groups, dilation=d)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.project(dense, weight.contiguous(), s, p, groups=groups, dilation=d),
                               **tolerance(dtype))


def test_non_finite_weights_propagate_like_the_reference(device):
    weight, x, channels = make(device, (4, 3, 3, 3), (5, 5), rows=3)
    weight[channels[0], 1, 1, 1] = float("inf")
    got = zfkernels.project(x, weight, 2, 1, channels=channels)
    want = reference.project(x, weight, 2, 1, channels=channels)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("groups", [1, 6])
def test_non_finite_weights_propagate_like_conv_transpose_in_dense_projections(device, groups):
    """Depthwise dense projections run a hand-written loop on the CPU; an infinite weight must still
    give PyTorch's infinities and NaNs (that loop adds exact zeros, so it is not used then)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn((6, 6 // groups, 3, 3), generator=gen).to(device)
    weight[2, 0, 1, 1] = float("inf")
    x = torch.randn((2, 6, 5, 5), generator=gen).to(device)
    x[0, 2, 2, 2] = 0.0
    got = zfkernels.project(x, weight, 2, 1, groups=groups)
    want = F.conv_transpose2d(x, weight, None, 2, 1, 0, groups)
    assert torch.isnan(want).any() and torch.isinf(want).any()
    torch.testing.assert_close(got, want, equal_nan=True)


def test_repeated_calls_are_bitwise_identical(device):
    weight, x, channels = make(device, (16, 32, 3, 3), (13, 13), rows=20)
    first = zfkernels.project(x, weight, 1, 1, channels=channels)
    for _ in range(3):
        assert torch.equal(first, zfkernels.project(x, weight, 1, 1, channels=channels))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 4, 32])
def test_dense_repeated_calls_are_bitwise_identical(device, dtype, groups):
    """The dense path too (on CUDA it must not let the library pick a nondeterministic algorithm)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 16 if groups < 32 else 1, 5, 5, generator=gen).to(device, dtype)
    x = torch.randn(8, 32, 13, 13, generator=gen).to(device, dtype)
    first = zfkernels.project(x, weight, 2, 1, groups=groups)
    for _ in range(3):
        assert torch.equal(first, zfkernels.project(x, weight, 2, 1, groups=groups))


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


def test_rejects_output_padding_not_below_stride_or_dilation(device):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: output_padding must be .* smaller than stride or dilation"):
        torch.ops.zfkernels.project(x, w, [2, 2], [1, 1], [2, 0], None)
    # below the dilation is fine, as in F.conv_transpose2d
    got = torch.ops.zfkernels.project(x, w, [2, 2], [1, 1], [2, 0], None, 1, [3, 3])
    torch.testing.assert_close(got, F.conv_transpose2d(x, w, None, 2, 1, (2, 0), 1, 3))


@pytest.mark.parametrize("dilation", [0, -1, (2, 0)])
def test_rejects_non_positive_dilation(device, dilation):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: dilation must be positive"):
        zfkernels.project(x, w, dilation=dilation)


@pytest.mark.parametrize("groups", [3, 16])
def test_rejects_groups_that_do_not_divide_the_filters(device, groups):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=rf"project: groups = {groups} does not divide weight's C_out = 8"):
        zfkernels.project(x, w, groups=groups)
    with pytest.raises(ValueError, match=rf"project: groups = {groups} does not divide"):
        zfkernels.project(x[:, :1], w, groups=groups, channels=torch.tensor([0], device=device))


@pytest.mark.parametrize("groups", [0, -2])
def test_rejects_non_positive_groups(device, groups):
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: groups must be positive"):
        zfkernels.project(x, w, groups=groups)


@pytest.mark.parametrize("wshape", [(0, 5, 3, 3), (8, 0, 3, 3)])
def test_rejects_an_empty_weight(device, wshape):
    x = torch.randn(1, wshape[0], 6, 6, device=device)
    with pytest.raises(ValueError, match=r"project: weight of shape \[.*\] is empty"):
        zfkernels.project(x, torch.randn(wshape, device=device))


def test_rejects_channels_with_unbatched_x(device):
    with pytest.raises(ValueError, match=r"project: with channels=, x must be 4-D"):
        zfkernels.project(torch.randn(1, 6, 6, device=device), torch.randn(8, 5, 3, 3, device=device),
                          channels=torch.tensor([0], device=device))


def test_rejects_outputs_beyond_32_bit_coordinates(device):
    """A stride of 2^29 + 1 over 3 rows would give 2^30 + 3 output rows: past what the kernels'
    32-bit coordinates hold, so refused before anything is allocated."""
    x, w = torch.randn(1, 1, 3, 1, device=device), torch.randn(2, 1, 1, 1, device=device)
    for channels in (None, torch.tensor([1], device=device)):
        with pytest.raises(ValueError, match=r"project: output size would be 1073741827x1 .*limit 2\^30"):
            zfkernels.project(x if channels is not None else x.expand(1, 2, 3, 1), w, (2**29 + 1, 1), channels=channels)


def test_rejects_a_dilated_span_beyond_32_bit_coordinates(device):
    x, w = torch.randn(1, 1, 3, 3, device=device), torch.randn(2, 1, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"project: the dilated kernel's span is 1073741825, too large"):
        zfkernels.project(x, w, dilation=2**29, channels=torch.tensor([1], device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not zfkernels.has_cuda(), reason="needs a CUDA GPU and the CUDA kernels")
def test_rejects_tensors_on_different_devices():
    x, w = torch.randn(2, 1, 6, 6), torch.randn(8, 5, 3, 3)
    with pytest.raises(ValueError, match=r"project: weight is on cuda"):
        zfkernels.project(x, w.cuda(), channels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"project: channels is on cuda"):
        zfkernels.project(x, w, channels=torch.tensor([0, 1], device="cuda"))


def taps_one_by_one(x, weight, channels, s, p, d, groups, acc_dtype):
    """project(channels=) as its contract spells the arithmetic out: per output element, the taps
    in (ky, kx) order added one at a time to a zero in the accumulation type, each product rounded
    before its add (no fused multiply-add), then rounded once to x's dtype. PyTorch's elementwise
    ops round every product and every sum, so this is bit-exact, whatever loop the CPU runs."""
    rows, _, h, w = x.shape
    c_out, per_group, kh, kw = weight.shape
    oh, ow = (h - 1) * s - 2 * p + d * (kh - 1) + 1, (w - 1) * s - 2 * p + d * (kw - 1) + 1
    xa, wa = x.to(acc_dtype)[:, 0], weight.to(acc_dtype)[channels]  # (rows, h, w), (rows, C_in/groups, kh, kw)
    acc = torch.zeros((rows, per_group, oh, ow), dtype=acc_dtype)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * d - p, kx * d - p  # input (iy, ix) lands on (iy * s + y0, ix * s + x0)
            iy = [i for i in range(h) if 0 <= i * s + y0 < oh]
            ix = [i for i in range(w) if 0 <= i * s + x0 < ow]
            if not iy or not ix:
                continue
            term = torch.zeros_like(acc)
            term[:, :, iy[0] * s + y0 : iy[-1] * s + y0 + 1 : s, ix[0] * s + x0 : ix[-1] * s + x0 + 1 : s] = (
                xa[:, None, iy[0] : iy[-1] + 1, ix[0] : ix[-1] + 1] * wa[:, :, ky, kx, None, None])
            acc = acc + term  # + 0.0 where no tap reaches: exact, as the sum is never -0.0
    out = torch.zeros((rows, per_group * groups, oh, ow), dtype=acc_dtype)
    for b, c in enumerate(channels.tolist()):
        first = c // (c_out // groups) * per_group
        out[b, first : first + per_group] = acc[b]
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("wshape,s,p,groups,d", [((24, 40, 3, 3), 1, 1, 1, 1),   # conv5-like, a partial channel block
                                                 ((16, 32, 3, 3), 2, 1, 2, 2),   # grouped, dilated
                                                 ((8, 20, 5, 5), 2, 0, 1, 1),    # conv2-like
                                                 ((6, 3, 7, 7), 2, 1, 1, 1),     # conv1-like: few channels
                                                 ((6, 1, 3, 3), 2, 1, 6, 3)])    # depthwise, dilated
def test_channels_is_bitwise_the_tap_by_tap_sum(device, dtype, wshape, s, p, groups, d):
    """Every CPU loop order (channel blocks, padded rows) adds the same products in the shared
    body's order with the same rounding, on every vector width the library was built for."""
    if torch.device(device).type == "cuda":
        pytest.skip("nvcc contracts multiply-adds (--fmad=true); the unfused sum is the CPU's promise")
    weight, x, channels = make(device, wshape, (9, 8), rows=6, seed=8)
    weight, x = weight.to(dtype), x.to(dtype)
    got = zfkernels.project(x, weight, s, p, groups=groups, dilation=d, channels=channels)
    want = taps_one_by_one(x, weight, channels, s, p, d, groups, torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got, want)
