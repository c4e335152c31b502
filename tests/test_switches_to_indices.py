"""switches_to_indices: the bridge to PyTorch's return_indices=True, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import reference

from conftest import LAYOUTS, POOL_GEOMETRIES, hostile
from _dilation import dilated_id, with_dilations


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize(
    "geometry",
    with_dilations([((11, 13), 3, 2, 1, True), ((9, 9), (3, 2), (1, 3), (1, 1), False), ((6, 7), 2, 2, 0, True)]),
    ids=dilated_id,
)
def test_equals_return_indices(device, layout_name, geometry):
    size, k, s, p, ceil, d = geometry
    x = torch.randn((2, 4) + size, device=device)
    _, switches = zfkernels.maxpool_switches(x, k, s, p, d, ceil)
    _, indices = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    got = zfkernels.switches_to_indices(LAYOUTS[layout_name](switches), size, k, s, p, d)
    assert got.dtype == torch.int64
    assert torch.equal(got, indices)
    assert torch.equal(reference.switches_to_indices(switches, size, k, s, p, d), indices)


def test_unbatched_switches_give_unbatched_indices(device):
    x = torch.randn(4, 13, 11, device=device)
    _, switches = zfkernels.maxpool_switches(x, 3, 2, 1, 2, True)
    _, indices = F.max_pool2d(x, 3, 2, 1, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(zfkernels.switches_to_indices(switches, (13, 11), 3, 2, 1, 2), indices)


def test_round_trip_from_pytorch_indices(device):
    """Indices from PyTorch -> switches (reference) -> indices (kernel): the identity."""
    x = torch.randn(3, 2, 20, 17, device=device)
    _, indices = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    _, switches = reference.maxpool_switches(x, 3, 2, 1, ceil_mode=True)
    assert torch.equal(zfkernels.switches_to_indices(switches, (20, 17), 3, 2, 1), indices)


@pytest.mark.parametrize("geometry", with_dilations(POOL_GEOMETRIES), ids=dilated_id)
def test_round_trip_over_every_geometry(device, geometry):
    """PyTorch's indices of a tie-heavy map -> switches (reference arithmetic) -> indices (kernel)."""
    size, k, s, p, ceil, d = geometry
    x = hostile((2, 3) + size, "ties", torch.Generator().manual_seed(1)).to(device)
    _, indices = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    _, switches = reference.maxpool_switches(x, k, s, p, d, ceil)
    assert torch.equal(zfkernels.switches_to_indices(switches, size, k, s, p, d), indices)


@pytest.mark.parametrize("geometry", [((9, 11), (3, 2), (2, 1), (0, 0)), ((13, 13), 5, 3, 0), ((7, 8), 7, 1, 0)])
def test_arbitrary_switches_convert_and_invert(device, geometry):
    """Any switch is valid without padding and ceil_mode; the kernel's indices invert back to
    the switches by the window arithmetic of the guide (flat h * W + w, origin oh * sH, ow * sW)."""
    size, k, s, p = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    out_h, out_w = (size[0] - kh) // sh + 1, (size[1] - kw) // sw + 1
    switches = torch.randint(0, kh * kw, (2, 3, out_h, out_w), generator=torch.Generator().manual_seed(2), dtype=torch.uint8).to(device)
    got = zfkernels.switches_to_indices(switches, size, k, s, p)
    assert torch.equal(got, reference.switches_to_indices(switches, size, k, s, p))
    rows, cols = got // size[1], got % size[1]
    row0 = (torch.arange(out_h, device=device) * sh).view(-1, 1)
    col0 = (torch.arange(out_w, device=device) * sw).view(1, -1)
    assert ((rows - row0) >= 0).all() and ((rows - row0) < kh).all()
    assert ((cols - col0) >= 0).all() and ((cols - col0) < kw).all()
    assert torch.equal(((rows - row0) * kw + (cols - col0)).to(torch.uint8), switches)


def test_empty_batch(device):
    switches = torch.zeros(0, 3, 5, 5, dtype=torch.uint8, device=device)
    assert zfkernels.switches_to_indices(switches, (11, 11), 3, 2).shape == (0, 3, 5, 5)


ERRORS = (RuntimeError, ValueError, TypeError)


def test_rejects_corrupt_switches(device):
    switches = torch.zeros(1, 1, 5, 5, dtype=torch.uint8, device=device)
    switches[0, 0, 2, 2] = 9  # a 3x3 window has offsets 0..8
    with pytest.raises(ValueError, match=r"switches_to_indices: switches hold 1 value"):
        zfkernels.switches_to_indices(switches, (11, 11), 3, 2)


def test_rejects_switches_into_the_padding(device):
    switches = torch.full((1, 1, 6, 6), 4, dtype=torch.uint8, device=device)
    switches[0, 0, 0, 0] = 0  # window (0, 0) starts at (-1, -1): offset 0 is padding
    with pytest.raises(ValueError, match=r"switches_to_indices: switches hold 1 value"):
        zfkernels.switches_to_indices(switches, (11, 11), 3, 2, 1)


def test_rejects_other_dtype(device):
    with pytest.raises(TypeError, match=r"switches_to_indices: switches must be uint8"):
        zfkernels.switches_to_indices(torch.zeros(1, 1, 5, 5, dtype=torch.int64, device=device), (11, 11), 3, 2)


def test_rejects_input_size_that_cannot_fit(device):
    switches = torch.zeros(1, 1, 5, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: input_size \[20, 20\] cannot have produced"):
        zfkernels.switches_to_indices(switches, (20, 20), 3, 2)


@pytest.mark.parametrize("stride", [0, -1])
def test_rejects_non_positive_stride(device, stride):
    switches = torch.zeros(1, 1, 5, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: stride must be positive"):
        zfkernels.switches_to_indices(switches, (11, 11), 3, stride)


def test_rejects_padding_over_half_the_kernel(device):
    switches = torch.zeros(1, 1, 5, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: padding"):
        zfkernels.switches_to_indices(switches, (11, 11), 3, 2, 2)


def test_rejects_windows_above_256_elements(device):
    switches = torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: kernel_size .* 289 elements"):
        zfkernels.switches_to_indices(switches, (34, 34), 17)


@pytest.mark.parametrize("dilation", [0, (2, -1)])
def test_rejects_non_positive_dilation(device, dilation):
    switches = torch.zeros(1, 1, 5, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: dilation must be positive"):
        zfkernels.switches_to_indices(switches, (11, 11), 3, 2, 0, dilation)


def test_rejects_dilated_window_larger_than_the_padded_input(device):
    switches = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"switches_to_indices: kernel_size \[3, 3\] with dilation \[5, 5\] spans 11x11"):
        zfkernels.switches_to_indices(switches, (10, 10), 3, 1, 0, 5)


def test_rejects_switches_between_dilated_taps_outside_the_map(device):
    """Dilation 3, stride 2, ceil_mode: the last window (origin 2) has taps at pixels 2, 5 and 8
    of an 8-pixel row; tap 2 is past the end."""
    switches = torch.zeros(1, 1, 1, 2, dtype=torch.uint8, device=device)
    assert zfkernels.switches_to_indices(switches + 1, (1, 8), (1, 3), (1, 2), 0, (1, 3)).flatten().tolist() == [3, 5]
    switches[0, 0, 0, 1] = 2
    with pytest.raises(ValueError, match=r"switches_to_indices: switches hold 1 value"):
        zfkernels.switches_to_indices(switches, (1, 8), (1, 3), (1, 2), 0, (1, 3))


def test_rejects_wrong_rank(device):
    with pytest.raises(ValueError, match=r"switches_to_indices: expected 4-D switches"):
        zfkernels.switches_to_indices(torch.zeros(5, 5, dtype=torch.uint8, device=device), (11, 11), 3, 2)
