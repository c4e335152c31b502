"""maxpool_switches against F.max_pool2d and the reference switches, over geometry, dtypes,
layouts and hostile values."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import reference

from conftest import (
    DTYPES,
    HOSTILE_KINDS,
    LAYOUTS,
    POOL_GEOMETRIES,
    SMALL_GEOMETRIES,
    assert_same_values,
    geometry_id,
    hostile,
)
from _dilation import dilated_id, with_dilations


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_matches_max_pool2d_and_reference(device, geometry, kind):
    size, k, s, p, ceil, d = geometry
    gen = torch.Generator().manual_seed(zlib.crc32(repr(geometry + (kind,)).encode()))
    x = hostile((2, 3) + size, kind, gen).to(device)
    out, switches = zfkernels.maxpool_switches(x, k, s, p, d, ceil)
    expected, indices = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert_same_values(out, expected)
    assert switches.dtype == torch.uint8 and switches.shape == out.shape
    _, ref_switches = reference.maxpool_switches(x, k, s, p, d, ceil)
    assert torch.equal(switches, ref_switches)
    # Independent bridge: the switches address exactly PyTorch's argmax pixels.
    assert torch.equal(zfkernels.switches_to_indices(switches, size, k, s, p, d), indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_dtypes_and_layouts(device, dtype, layout_name):
    gen = torch.Generator().manual_seed(7)
    base = hostile((3, 5, 17, 15), "ties", gen) + 0.25 * torch.randn(3, 5, 17, 15, generator=gen).round()
    x = LAYOUTS[layout_name](base.to(device, dtype))
    for k, s, p, d, ceil in [(3, 2, 0, 1, True), (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False),
                             (5, 3, 2, 1, True), (3, 2, 1, 2, True), (3, 2, 0, 3, False), (2, 1, 1, (2, 3), True)]:
        out, switches = zfkernels.maxpool_switches(x, k, s, p, d, ceil)
        expected, indices = F.max_pool2d(x.contiguous(), k, s, p, d, ceil_mode=ceil, return_indices=True)
        assert_same_values(out, expected)
        assert torch.equal(zfkernels.switches_to_indices(switches, x.shape[-2:], k, s, p, d), indices)


def check_against_pytorch(x, geometry):
    """out == F.max_pool2d (NaN-aware), uint8 switches == the reference's, indices == PyTorch's.

    The indices (and so the reference switches) come from PyTorch on the NCHW-contiguous copy:
    PyTorch's CUDA channels-last max-pool kernel starts every window's index at 0 (pixel (0, 0)
    of the plane, usually outside the window), so a window holding only -inf gets index 0 there,
    while its NCHW and CPU kernels give the window's first pixel, as the switches do.
    """
    size, k, s, p, ceil, d = geometry
    out, switches = zfkernels.maxpool_switches(x, k, s, p, d, ceil)
    assert_same_values(out, F.max_pool2d(x, k, s, p, d, ceil_mode=ceil))
    expected, indices = F.max_pool2d(x.contiguous(), k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert_same_values(out, expected)
    assert switches.dtype == torch.uint8 and switches.element_size() == 1 and switches.shape == out.shape
    _, ref_switches = reference.maxpool_switches(x.contiguous(), k, s, p, d, ceil)
    assert torch.equal(switches, ref_switches)
    assert torch.equal(zfkernels.switches_to_indices(switches, size, k, s, p, d), indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_values_in_every_dtype_and_layout(device, dtype, layout_name, kind):
    for geometry in with_dilations(SMALL_GEOMETRIES, (1, 2)):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((geometry, kind, str(dtype))).encode()))
        base = hostile((2, 4) + geometry[0], kind, gen)
        x = LAYOUTS[layout_name](base.to(device, dtype))
        check_against_pytorch(x, geometry)


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
@pytest.mark.parametrize("layout_name", ["channels_last", "sliced"])
def test_every_geometry_in_strided_layouts(device, geometry, layout_name):
    for kind in ("ties", "nonfinite"):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((geometry, kind, layout_name)).encode()))
        x = LAYOUTS[layout_name](hostile((2, 5) + geometry[0], kind, gen).to(device))
        check_against_pytorch(x, geometry)


@pytest.mark.parametrize("dilation", [1, 2])
def test_unbatched_input_gives_unbatched_output(device, dilation):
    x = torch.randn(5, 13, 12, device=device)
    out, switches = zfkernels.maxpool_switches(x, 3, 2, 1, dilation, True)
    expected, indices = F.max_pool2d(x, 3, 2, 1, dilation, ceil_mode=True, return_indices=True)
    assert out.dim() == 3 and switches.shape == out.shape
    assert_same_values(out, expected)
    assert torch.equal(zfkernels.switches_to_indices(switches, (13, 12), 3, 2, 1, dilation), indices)
    batched = zfkernels.maxpool_switches(x[None], 3, 2, 1, dilation, True)
    assert torch.equal(batched[0][0], out) and torch.equal(batched[1][0], switches)


def test_dilated_switch_is_the_tap_not_the_pixel_offset(device):
    """Dilation 2: tap (1, 2) of a 3x3 window sits 2 rows and 4 columns from its origin; its
    switch is 1 * 3 + 2 = 5, by the guide's definition."""
    x = torch.zeros(1, 1, 5, 5, device=device)
    x[0, 0, 2, 4] = 1.0
    out, switches = zfkernels.maxpool_switches(x, 3, 1, 0, 2)
    assert out.item() == 1.0 and switches.item() == 5


def test_channels_last_output_follows_input(device):
    x = torch.randn(2, 8, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
    out, switches = zfkernels.maxpool_switches(x, 3, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert switches.is_contiguous(memory_format=torch.channels_last)


def test_nan_picks_the_last_nan_of_the_window(device):
    x = torch.zeros(1, 1, 3, 3, device=device)
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 2, 0] = float("nan")
    x[0, 0, 1, 1] = 5.0
    out, switches = zfkernels.maxpool_switches(x, 3)
    assert torch.isnan(out).all()
    assert switches.item() == 2 * 3 + 0  # row 2, column 0: the later NaN, as PyTorch picks


def test_ties_pick_the_first_maximum(device):
    x = torch.tensor([[[[1.0, 4.0, 4.0], [4.0, 0.0, 4.0], [2.0, 4.0, 3.0]]]], device=device)
    _, switches = zfkernels.maxpool_switches(x, 3)
    assert switches.item() == 1


@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_empty_batch(device, ceil, dtype, layout_name):
    x = LAYOUTS[layout_name](torch.randn(0, 4, 12, 12, device=device, dtype=dtype))
    out, switches = zfkernels.maxpool_switches(x, 3, 2, 0, ceil_mode=ceil)
    expected = F.max_pool2d(x, 3, 2, 0, ceil_mode=ceil)
    assert out.shape == expected.shape == switches.shape == ((0, 4, 6, 6) if ceil else (0, 4, 5, 5))
    assert out.dtype == dtype and switches.dtype == torch.uint8
    assert out.device == x.device and switches.device == x.device
    assert zfkernels.switches_to_indices(switches, (12, 12), 3, 2).shape == out.shape


def test_switch_memory_is_one_byte_per_pooled_element(device):
    x = torch.randn(2, 96, 110, 110, device=device)
    out, switches = zfkernels.maxpool_switches(x, 3, 2, 0, ceil_mode=True)
    _, indices = F.max_pool2d(x, 3, 2, 0, ceil_mode=True, return_indices=True)
    switch_bytes = switches.numel() * switches.element_size()
    assert switch_bytes == out.numel()
    assert indices.numel() * indices.element_size() == 8 * switch_bytes


def test_repeated_calls_are_bitwise_identical(device):
    x = torch.randn(4, 16, 55, 55, device=device)
    first = zfkernels.maxpool_switches(x, 3, 2, 1, ceil_mode=True)
    for _ in range(3):
        again = zfkernels.maxpool_switches(x, 3, 2, 1, ceil_mode=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_int_and_pair_arguments_agree(device):
    x = torch.randn(1, 2, 9, 9, device=device)
    a = zfkernels.maxpool_switches(x, 3, 2, 1)
    b = zfkernels.maxpool_switches(x, (3, 3), [2, 2], (1, 1))
    c = zfkernels.maxpool_switches(x, 3, None, 1)  # stride defaults to kernel_size
    d = zfkernels.maxpool_switches(x, 3, 3, 1)
    assert torch.equal(a[1], b[1]) and torch.equal(c[1], d[1])


# --- bad input: one test per refusal -------------------------------------------------------

ERRORS = (RuntimeError, ValueError, TypeError)


def test_rejects_wrong_rank(device):
    for shape in ((8, 8), (1, 1, 3, 8, 8)):
        with pytest.raises(ERRORS, match=r"maxpool_switches: expected a 4-D input x .* \(or 3-D without the batch\)"):
            zfkernels.maxpool_switches(torch.randn(shape, device=device), 2)


def test_rejects_integer_dtype(device):
    with pytest.raises(TypeError, match=r"maxpool_switches: input x must be float"):
        zfkernels.maxpool_switches(torch.ones(1, 1, 4, 4, dtype=torch.int64, device=device), 2)


def test_rejects_kernel_larger_than_padded_input(device):
    with pytest.raises(ValueError, match=r"maxpool_switches: kernel_size .* larger than the padded input"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 4, 4, device=device), 7, 1, 1)


def test_rejects_padding_over_half_the_kernel(device):
    with pytest.raises(ValueError, match=r"maxpool_switches: padding"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 8, 8, device=device), 3, 2, 2)


@pytest.mark.parametrize("stride", [0, -1, (1, 0)])
def test_rejects_non_positive_stride(device, stride):
    with pytest.raises(ValueError, match=r"maxpool_switches: stride"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 8, 8, device=device), 3, stride)


def test_rejects_non_positive_kernel(device):
    with pytest.raises(ValueError, match=r"maxpool_switches: kernel_size"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 8, 8, device=device), (0, 2))


@pytest.mark.parametrize("dilation", [0, -1, (1, 0)])
def test_rejects_non_positive_dilation(device, dilation):
    with pytest.raises(ValueError, match=r"maxpool_switches: dilation must be positive"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 8, 8, device=device), 3, 1, 0, dilation)


def test_rejects_dilated_window_larger_than_padded_input(device):
    # 3 taps at dilation 4 span 9 pixels; the padded input has 8.
    with pytest.raises(ValueError, match=r"maxpool_switches: kernel_size \[3, 3\] with dilation \[4, 4\] spans 9x9, "
                                         r"larger than the padded input \(8, 8\)"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 6, 6, device=device), 3, 1, 1, 4)


def test_rejects_windows_that_read_no_pixel(device):
    # 2 taps at dilation 3 from origin -1 read rows -1 and 2 of a 2-row map: padding only.
    with pytest.raises(ValueError, match=r"maxpool_switches: .* the windows of row 0 read no pixel of the 2x5 input"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 2, 5, device=device), 2, 1, (1, 0), (3, 1))


def test_rejects_windows_above_256_elements(device):
    with pytest.raises(ValueError, match=r"maxpool_switches: kernel_size .* 289 elements"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 20, 20, device=device), 17)


def test_rejects_malformed_kernel_argument(device):
    with pytest.raises(TypeError, match=r"maxpool_switches: kernel_size"):
        zfkernels.maxpool_switches(torch.randn(1, 1, 8, 8, device=device), (2, 2, 2))
