"""unpool: the exact adjoint of max pooling, against the scatter_add_ reference and by its
defining property, with rows=, rectify, every dtype and layout, and every refusal."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import reference

from conftest import DTYPES, LAYOUTS, POOL_GEOMETRIES, SMALL_GEOMETRIES, hostile, tolerance
from _dilation import dilated_id, with_dilations


def pooled(device, size, k, s, p, ceil, d=1, batch=2, channels=3, kind="normal", seed=0):
    """Switches of a pooled ``kind`` map (see conftest.hostile) and a random y of their shape."""
    gen = torch.Generator().manual_seed(seed)
    x = hostile((batch, channels) + size, kind, gen).to(device)
    out, switches = zfkernels.maxpool_switches(x, k, s, p, d, ceil)
    y = torch.randn(out.shape, generator=gen).to(device)
    return x, y, switches


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("kind", ["normal", "ties", "relu"])
def test_matches_reference(device, geometry, rectify, kind):
    size, k, s, p, ceil, d = geometry
    _, y, switches = pooled(device, size, k, s, p, ceil, d, kind=kind, seed=zlib.crc32(repr((geometry, kind)).encode()))
    got = zfkernels.unpool(y, switches, size, k, s, p, d, rectify=rectify)
    want = reference.unpool(y, switches, size, k, s, p, d, rectify=rectify)
    assert got.shape == (y.shape[0], y.shape[1]) + size
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
def test_equals_aten_max_pool2d_backward(device, geometry):
    """The adjoint is PyTorch's own max-pooling backward, given PyTorch's indices of the same map."""
    size, k, s, p, ceil, d = geometry
    x, y, switches = pooled(device, size, k, s, p, ceil, d, kind="ties", seed=6)
    y = y.double()
    _, indices = F.max_pool2d(x.double(), k, s, p, d, ceil_mode=ceil, return_indices=True)
    kernel, stride, pad, dil = zfkernels.ops.geometry("test", k, s, p, d)
    want = torch.ops.aten.max_pool2d_with_indices_backward(y, x.double(), kernel, stride, pad, dil, ceil, indices)
    torch.testing.assert_close(zfkernels.unpool(y, switches, size, k, s, p, d), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
def test_is_the_adjoint_of_pooling(device, geometry):
    """<gather(x at the switches), y> == <x, unpool(y)> for any x and y, in float64."""
    size, k, s, p, ceil, d = geometry
    _, y, switches = pooled(device, size, k, s, p, ceil, d, kind="ties", seed=3)
    x = torch.randn((y.shape[0], y.shape[1]) + size, dtype=torch.float64, device=device)
    y = y.double()
    indices = zfkernels.switches_to_indices(switches, size, k, s, p, d)
    gathered = torch.gather(x.flatten(2), 2, indices.flatten(2)).view_as(y)
    lhs = (gathered * y).sum()
    rhs = (x * zfkernels.unpool(y, switches, size, k, s, p, d)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", with_dilations(SMALL_GEOMETRIES, (1, 2)), ids=dilated_id)
def test_is_the_adjoint_of_pooling_in_float32_with_rows(device, geometry):
    """The same identity for float32 unpooling through rows=: the inner products in float64,
    row b pairing y[b] with image rows[b]'s switches."""
    size, k, s, p, ceil, d = geometry
    _, _, switches = pooled(device, size, k, s, p, ceil, d, batch=3, channels=4, kind="relu", seed=4)
    rows = torch.tensor([2, 0, 2, 1, 2], device=device)
    gen = torch.Generator().manual_seed(5)
    y = torch.randn((5,) + tuple(switches.shape[1:]), generator=gen).to(device)
    x = torch.randn((5, 4) + size, generator=gen, dtype=torch.float64).to(device)
    indices = zfkernels.switches_to_indices(switches, size, k, s, p, d)[rows]
    lhs = (torch.gather(x.flatten(2), 2, indices.flatten(2)).view(y.shape) * y.double()).sum()
    unpooled = zfkernels.unpool(y, switches, size, k, s, p, d, rows=rows)
    assert unpooled.dtype == torch.float32
    rhs = (x * unpooled.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-5)


def test_shared_argmax_sums_where_max_unpool2d_overwrites(device):
    """Overlapping 3x3/2 windows that share their argmax: the adjoint adds both values."""
    x = torch.zeros(1, 1, 5, 5, device=device)
    x[0, 0, 2, 2] = 10.0  # the centre pixel is the max of all four overlapping windows
    pooled_x, switches = zfkernels.maxpool_switches(x, 3, 2)
    assert pooled_x.shape[-2:] == (2, 2)
    y = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=device)
    ours = zfkernels.unpool(y, switches, (5, 5), 3, 2)
    assert ours[0, 0, 2, 2].item() == 1.0 + 2.0 + 3.0 + 4.0
    assert ours.sum().item() == 10.0
    _, indices = F.max_pool2d(x, 3, 2, return_indices=True)
    overwritten = F.max_unpool2d(y, indices, 3, 2, output_size=(5, 5))
    assert overwritten[0, 0, 2, 2].item() in (1.0, 2.0, 3.0, 4.0)
    assert not torch.equal(ours, overwritten)


@pytest.mark.parametrize("rectify", [False, True])
def test_rows_equals_indexing_the_switches(device, rectify):
    _, _, switches = pooled(device, (23, 21), 3, 2, 1, True, batch=4, channels=5)
    for rows in ([2, 0, 2, 3, 1, 1, 0], [3], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]):
        rows_t = torch.tensor(rows, device=device)
        y = torch.randn((len(rows),) + tuple(switches.shape[1:]), device=device)
        got = zfkernels.unpool(y, switches, (23, 21), 3, 2, 1, rows=rows_t, rectify=rectify)
        want = zfkernels.unpool(y, switches[rows_t], (23, 21), 3, 2, 1, rectify=rectify)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, reference.unpool(y, switches, (23, 21), 3, 2, 1, rows=rows_t, rectify=rectify))


def test_rows_accepts_a_strided_index_vector(device):
    _, _, switches = pooled(device, (11, 11), 3, 2, 0, True, batch=3)
    rows = torch.tensor([2, 9, 0, 9, 1, 9], device=device)[::2]
    y = torch.randn((3,) + tuple(switches.shape[1:]), device=device)
    assert torch.equal(zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=rows), zfkernels.unpool(y, switches[rows.contiguous()], (11, 11), 3, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("y_layout", list(LAYOUTS))
@pytest.mark.parametrize("switch_layout", list(LAYOUTS))
@pytest.mark.parametrize("geometry", with_dilations([((17, 19), 3, 2, 1, True)] + SMALL_GEOMETRIES, (1, 2)),
                         ids=dilated_id)
def test_dtypes_and_layouts(device, dtype, y_layout, switch_layout, geometry):
    """Values only: the output's own layout may be either."""
    size, k, s, p, ceil, d = geometry
    _, y, switches = pooled(device, size, k, s, p, ceil, d, batch=2, channels=6, kind="ties", seed=5)
    y = LAYOUTS[y_layout](y.to(dtype))
    sw = LAYOUTS[switch_layout](switches)
    for rectify in (False, True):
        got = zfkernels.unpool(y, sw, size, k, s, p, d, rectify=rectify)
        assert got.dtype == dtype and got.shape == (2, 6) + size
        want = reference.unpool(y.contiguous(), switches, size, k, s, p, d, rectify=rectify)
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dilation", [1, 2])
def test_layouts_give_bitwise_equal_results(device, dilation):
    """Every CPU loop order (and the GPU gather) adds the same terms in the same order."""
    size = (31, 29)
    _, y, switches = pooled(device, size, 3, 2, 0, True, dilation, batch=3, channels=8, kind="ties", seed=9)
    results = [zfkernels.unpool(LAYOUTS[a](y), LAYOUTS[b](switches), size, 3, 2, 0, dilation, rectify=True)
               for a in LAYOUTS for b in LAYOUTS]
    for r in results[1:]:
        assert torch.equal(r.contiguous(), results[0].contiguous())


@pytest.mark.parametrize("dilation", [1, 3])
def test_unbatched_input_gives_unbatched_output(device, dilation):
    _, y, switches = pooled(device, (13, 12), 3, 2, 1, True, dilation, batch=1, channels=4, seed=12)
    got = zfkernels.unpool(y[0], switches[0], (13, 12), 3, 2, 1, dilation, rectify=True)
    assert got.shape == (4, 13, 12)
    assert torch.equal(got, zfkernels.unpool(y, switches, (13, 12), 3, 2, 1, dilation, rectify=True)[0])
    torch.testing.assert_close(got, reference.unpool(y[0], switches[0], (13, 12), 3, 2, 1, dilation, rectify=True))


def test_rectify_keeps_nan_and_zeroes_negatives(device):
    x = torch.zeros(1, 1, 4, 4, device=device)
    x[0, 0, 0, 0] = 1.0
    _, switches = zfkernels.maxpool_switches(x, 2)
    y = torch.tensor([[[[-2.0, float("nan")], [3.0, float("inf")]]]], device=device)
    got = zfkernels.unpool(y, switches, (4, 4), 2, rectify=True)
    torch.testing.assert_close(got, torch.relu(reference.unpool(y, switches, (4, 4), 2)), equal_nan=True)
    assert torch.isnan(got).sum() == 1 and torch.isinf(got).sum() == 1 and got[~torch.isnan(got)].min() == 0


def test_repeated_calls_are_bitwise_identical(device):
    _, y, switches = pooled(device, (110, 110), 3, 2, 0, True, batch=2, channels=16, seed=11)
    rows = torch.tensor([1, 0, 1], device=device)
    y3 = torch.randn((3,) + tuple(y.shape[1:]), device=device)
    first = zfkernels.unpool(y3, switches, (110, 110), 3, 2, rows=rows, rectify=True)
    for _ in range(3):
        assert torch.equal(first, zfkernels.unpool(y3, switches, (110, 110), 3, 2, rows=rows, rectify=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rectify", [False, True])
def test_empty_batch(device, dtype, rectify):
    switches = torch.zeros(2, 3, 5, 5, dtype=torch.uint8, device=device)
    y = torch.randn(0, 3, 5, 5, device=device, dtype=dtype)
    rows = torch.zeros(0, dtype=torch.int64, device=device)
    for got in (
        zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=rows, rectify=rectify),
        zfkernels.unpool(y, switches[:0], (11, 11), 3, 2, rectify=rectify),
    ):
        assert got.shape == (0, 3, 11, 11) and got.dtype == dtype and got.device == y.device


# --- bad input: one test per refusal -------------------------------------------------------


def valid(device):
    _, y, switches = pooled(device, (11, 11), 3, 2, 0, False, batch=2, channels=3)
    return y, switches


def test_rejects_wrong_rank(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: expected a 4-D y"):
        zfkernels.unpool(y[0, 0], switches, (11, 11), 3, 2)
    with pytest.raises(ValueError, match=r"unpool: switches shape .* does not match y's shape"):
        zfkernels.unpool(y[0], switches, (11, 11), 3, 2)  # an unbatched y needs unbatched switches


def test_rejects_integer_y(device):
    y, switches = valid(device)
    with pytest.raises(TypeError, match=r"unpool: y must be float"):
        zfkernels.unpool(y.long(), switches, (11, 11), 3, 2)


def test_rejects_switches_of_another_dtype(device):
    y, switches = valid(device)
    with pytest.raises(TypeError, match=r"unpool: switches must be uint8"):
        zfkernels.unpool(y, switches.long(), (11, 11), 3, 2)


def test_rejects_switches_of_another_shape(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: switches shape .* does not match y"):
        zfkernels.unpool(y, switches[:, :2], (11, 11), 3, 2)


def test_rejects_corrupt_switches(device):
    y, switches = valid(device)
    bad = switches.clone()
    bad[1, 2, 3, 4] = 200
    with pytest.raises(ValueError, match=r"unpool: switches hold 1 value\(s\) .*corrupt"):
        zfkernels.unpool(y, bad, (11, 11), 3, 2)


def test_rejects_switches_pointing_into_padding(device):
    _, y, switches = pooled(device, (11, 11), 3, 2, 1, False)
    bad = switches.clone()
    bad[0, 0, 0, 0] = 0  # window (0, 0) starts at (-1, -1)
    with pytest.raises(ValueError, match=r"unpool: switches hold 1 value"):
        zfkernels.unpool(y, bad, (11, 11), 3, 2, 1)


def test_rejects_input_size_that_cannot_have_produced_y(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: input_size \[15, 11\] cannot have produced"):
        zfkernels.unpool(y, switches, (15, 11), 3, 2)


@pytest.mark.parametrize("rows", [[0, 2], [-1, 0], [0, 5]])
def test_rejects_rows_out_of_range(device, rows):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: rows holds indices outside \[0, 2\)"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=torch.tensor(rows, device=device))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_rejects_rows_of_wrong_dtype(device, dtype):
    y, switches = valid(device)
    with pytest.raises(TypeError, match=r"unpool: rows must be int64"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=torch.tensor([0, 1], dtype=dtype, device=device))


def test_rejects_rows_of_wrong_length(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: rows must be 1-D of length 2"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=torch.tensor([0, 1, 1], device=device))


@pytest.mark.parametrize("stride", [0, -2, (2, 0)])
def test_rejects_non_positive_stride(device, stride):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: stride must be positive"):
        zfkernels.unpool(y, switches, (11, 11), 3, stride)


def test_rejects_padding_over_half_the_kernel(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: padding"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, 2)


def test_rejects_windows_above_256_elements(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: kernel_size .* 400 elements"):
        zfkernels.unpool(y, switches, (11, 11), 20, 2)


def test_rejects_kernel_larger_than_the_padded_input(device):
    y = torch.randn(1, 1, 1, 1, device=device)
    switches = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"unpool: kernel_size .* larger than the padded input"):
        zfkernels.unpool(y, switches, (3, 3), 5, 1)


@pytest.mark.cuda
@pytest.mark.skipif(not zfkernels.has_cuda(), reason="needs a CUDA GPU and the CUDA kernels")
def test_rejects_tensors_on_different_devices():
    y, switches = valid("cpu")
    with pytest.raises(ValueError, match=r"unpool: switches is on cuda"):
        zfkernels.unpool(y, switches.cuda(), (11, 11), 3, 2)
    with pytest.raises(ValueError, match=r"unpool: rows is on cuda"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, rows=torch.tensor([0, 1], device="cuda"))


@pytest.mark.parametrize("dilation", [0, -2, (1, 0)])
def test_rejects_non_positive_dilation(device, dilation):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: dilation must be positive"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, 0, dilation)


def test_rejects_dilated_window_larger_than_the_padded_input(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: kernel_size \[3, 3\] with dilation \[6, 6\] spans 13x13"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, 0, 6)


def test_rejects_switches_of_another_dilation(device):
    """Dilation changes the pooled size: switches of 3x3/2 windows do not fit dilation 2."""
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: input_size \[11, 11\] cannot have produced .* dilation \[2, 2\]"):
        zfkernels.unpool(y, switches, (11, 11), 3, 2, 0, 2)


def test_rejects_rows_with_unbatched_y(device):
    y, switches = valid(device)
    with pytest.raises(ValueError, match=r"unpool: rows= needs a batched y"):
        zfkernels.unpool(y[0], switches, (11, 11), 3, 2, rows=torch.tensor([0], device=device))


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_counts_every_corrupt_switch_inside_and_on_the_border(device, layout_name):
    """The validation pass tests windows inside the map by a byte compare and border windows
    (padding, a ceil_mode overhang) by their taps: both kinds are counted, in every layout."""
    size = (12, 13)
    _, y, switches = pooled(device, size, 3, 2, 1, True, batch=2, channels=5)  # 7x7 windows, borders all round
    bad = switches.clone()
    bad[0, 1, 2, 3] = 9     # inside: beyond the 3x3 window
    bad[1, 4, 4, 5] = 255   # inside
    bad[1, 0, 0, 3] = 1     # top border: tap (0, 1) is in the padding row
    bad[0, 2, 3, 0] = 3     # left border: tap (1, 0) is in the padding column
    bad[0, 3, 5, 6] = 8     # right border: tap (2, 2) lies past the last column
    bad[1, 2, 6, 2] = 200   # bottom border, beyond the window: counted once
    with pytest.raises(ValueError, match=r"unpool: switches hold 6 value\(s\)"):
        zfkernels.unpool(LAYOUTS[layout_name](y), LAYOUTS[layout_name](bad), size, 3, 2, 1)
    with pytest.raises(ValueError, match=r"switches_to_indices: switches hold 6 value\(s\)"):
        zfkernels.switches_to_indices(LAYOUTS[layout_name](bad), size, 3, 2, 1)


def test_large_outputs_are_ordinary_tensors(device):
    """Outputs of 2 MiB or more come from a huge-page allocator on the CPU: they still hold the
    right values, resize, copy, share and free like any tensor."""
    size = (256, 256)  # 1 x 8 x 256 x 256 float32: exactly 2 MiB
    _, y, switches = pooled(device, size, 2, 2, 0, False, batch=1, channels=8, seed=13)
    got = zfkernels.unpool(y, switches, size, 2, 2, rectify=True)
    assert got.untyped_storage().nbytes() == 2 << 20
    want = reference.unpool(y, switches, size, 2, 2, rectify=True)
    assert torch.equal(got, want)
    clone, view = got.clone(), got[0, 3]
    got.resize_(2, 8, 256, 256)  # grows the storage: the allocator's blocks are resizable
    assert torch.equal(got[0], want[0]) and torch.equal(clone, want)
    got[0, 3].fill_(1.0)
    del got
    assert (view == 1.0).all()  # a view keeps the storage alive after its tensor is gone
