"""The deconvnet engine against the float64 autograd oracle of GUIDE section 2, on real
photographs, for every conv layer of ZFNet, AlexNet and VGG16 with seeded random weights."""

from __future__ import annotations

from typing import Tuple

import pytest
import torch

from zfkernels import models
from zfkernels.engine import Deconvnet

from _images import GRAYSCALE, SAMPLES, imagenet, load_files
from _oracle import oracle, relative_error

# The package's photographs first (the cameraman is grayscale): the tests that take the first one
# or two see the same images everywhere; an ImageNet one, where present, adds breadth to the rest.
IMAGES = [SAMPLES / "chelsea_cat.jpg", SAMPLES / GRAYSCALE, SAMPLES / "coffee.jpg"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return load_files(IMAGES + imagenet(["n02096051_Airedale.JPEG"]))


def strongest_selections(act: torch.Tensor, per_image: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image, its `per_image` feature maps with the largest activations, at their argmax:
    the kind of selections the main job makes (and nonzero even with random weights)."""
    n, c, h, w = act.shape
    peak, where = act.flatten(2).max(dim=2)  # (N, C)
    top = peak.topk(per_image, dim=1).indices  # (N, per_image)
    rows = torch.arange(n).repeat_interleave(per_image)
    channels = top.flatten()
    flat = where[rows, channels]
    positions = torch.stack([flat // w, flat % w], dim=1)
    return rows, channels, positions


def check_layer(dn: Deconvnet, rec, images, layer: str, mode: str = "deconvnet", per_image: int = 2) -> None:
    rows, channels, positions = strongest_selections(rec.activations[layer], per_image)
    for pos in (positions, None):
        ours = dn.project(rec, layer, rows, channels, pos, mode=mode)
        want = oracle(dn, rec, images, layer, rows, channels, pos, mode=mode)
        assert ours.shape == want.shape == (rows.shape[0], 3) + tuple(images.shape[-2:])
        assert want.abs().sum() > 0
        error = relative_error(ours, want)
        assert error < TOLERANCE, f"{layer} {mode} {'single' if pos is not None else 'whole map'}: {error:.2e}"


@pytest.mark.parametrize("arch", ["zfnet", "alexnet"])
def test_every_layer_equals_the_oracle(photos, arch, device):
    dn = Deconvnet(models.build(arch, seed=0).eval().to(device))
    images = photos.to(device)
    rec = dn.record(images)
    for layer in dn.layers:
        check_layer(dn, rec, images, layer)


@pytest.mark.slow
def test_vgg16_layers_equal_the_oracle(photos):
    dn = Deconvnet(models.vgg16(seed=0).eval())
    images = photos[:1]
    rec = dn.record(images)
    assert dn.layers[:3] == ["conv1_1", "conv1_2", "conv2_1"] and dn.layers[-1] == "conv5_3" and len(dn.layers) == 13
    for layer in ("conv1_2", "conv2_1", "conv3_3", "conv4_3", "conv5_3"):
        check_layer(dn, rec, images, layer, per_image=2)


@pytest.mark.parametrize("mode", ["guided", "backprop"])
def test_guided_and_backprop_equal_their_autograd_definitions(photos, mode, device):
    dn = Deconvnet(models.zfnet(seed=0).eval().to(device))
    images = photos[:2].to(device)
    rec = dn.record(images)
    for layer in ("conv1", "conv2", "conv5"):
        check_layer(dn, rec, images, layer, mode=mode)


@pytest.mark.parametrize("mode", ["deconvnet", "guided", "backprop"])
def test_projections_under_inference_mode_equal_those_outside_it(photos, mode, device):
    """Pass 2 records and projects under ``torch.inference_mode()``; the normalisation's
    true gradient (guided, backprop) must still be taken there."""
    dn = Deconvnet(models.zfnet(seed=0).eval().to(device))
    images = photos[:2].to(device)
    rec = dn.record(images)
    rows, channels, positions = strongest_selections(rec.activations["conv2"], 2)
    want = dn.project(rec, "conv2", rows, channels, positions, mode=mode)
    with torch.inference_mode():
        rec = dn.record(images)
        got = dn.project(rec, "conv2", rows, channels, positions, mode=mode)
    assert torch.equal(got, want)


def test_modes_differ_from_each_other(photos):
    dn = Deconvnet(models.zfnet(seed=0).eval())
    rec = dn.record(photos[:1])
    rows, channels, positions = strongest_selections(rec.activations["conv5"], 1)
    results = [dn.project(rec, "conv5", rows, channels, positions, mode=m) for m in ("deconvnet", "guided", "backprop")]
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[1], results[2])


def test_receptive_field_contains_the_support_and_matches_the_analytic_box(photos):
    dn = Deconvnet(models.zfnet(seed=0).eval())
    rec = dn.record(photos[:2])
    for layer in dn.layers:
        rows, channels, positions = strongest_selections(rec.activations[layer], 3)
        out = dn.project(rec, layer, rows, channels, positions)
        for b in range(rows.shape[0]):
            y, x = positions[b].tolist()
            x0, y0, x1, y1 = dn.receptive_field(layer, y, x, (224, 224))
            assert (x0, y0, x1, y1) == analytic_box(dn, layer, y, x, (224, 224))
            support = out[b].abs().sum(0).nonzero()
            assert support.numel() > 0
            assert y0 <= support[:, 0].min() and support[:, 0].max() < y1
            assert x0 <= support[:, 1].min() and support[:, 1].max() < x1


def analytic_box(dn: Deconvnet, layer: str, y: int, x: int, size) -> Tuple[int, int, int, int]:
    """The textbook recurrence, bottom-up over the modules of ``model.features`` up to the layer's
    ReLU: jump j, field r, first centre c (independent of the top-down box arithmetic in
    zfkernels.receptive_field and of the engine's graph)."""
    last = int(dn.resolve(layer).split(".")[1])
    boxes = []
    for axis, pos in ((0, y), (1, x)):
        j, r, c = 1, 1, 0.0
        for module in list(dn.model.features)[: last + 1]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
                k, s, p = (_two(module.kernel_size)[axis], _two(module.stride)[axis], _two(module.padding)[axis])
                c = c + ((k - 1) / 2 - p) * j
                r = r + (k - 1) * j
                j = j * s
        centre = c + pos * j
        lo, hi = int(centre - (r - 1) / 2), int(centre + (r - 1) / 2) + 1
        boxes.append((max(lo, 0), min(hi, size[axis])))
    (y0, y1), (x0, x1) = boxes
    return x0, y0, x1, y1


def _two(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def test_chunking_and_batching_do_not_change_results(photos):
    dn = Deconvnet(models.zfnet(seed=0).eval())
    rec = dn.record(photos)
    rows, channels, positions = strongest_selections(rec.activations["conv3"], 4)
    whole = dn.project(rec, "conv3", rows, channels, positions)
    chunked = dn.project(rec, "conv3", rows, channels, positions, chunk_size=5)
    one = dn.project(rec, "conv3", rows[7:8], channels[7:8], positions[7:8])
    assert torch.equal(whole, chunked)
    torch.testing.assert_close(one[0], whole[7], rtol=1e-6, atol=1e-7)
    assert torch.equal(whole, dn.project(rec, "conv3", rows, channels, positions))  # deterministic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_the_oracle(photos, dtype):
    """A half-precision forward routes through its own argmaxes; given those switches, the
    projection matches the float64 oracle to half-precision accuracy (float accumulation)."""
    dn = Deconvnet(models.zfnet(seed=0).eval().to(dtype))
    images = photos[:2].to(dtype)
    rec = dn.record(images)
    for layer in ("conv2", "conv5"):
        rows, channels, positions = strongest_selections(rec.activations[layer].float(), 2)
        out = dn.project(rec, layer, rows, channels, positions)
        assert out.dtype == dtype
        want = oracle(dn, rec, images, layer, rows, channels, positions)
        assert relative_error(out.float(), want) < 3e-2


def test_empty_selection(photos):
    dn = Deconvnet(models.zfnet(seed=0).eval())
    rec = dn.record(photos[:1])
    empty = torch.zeros(0, dtype=torch.int64)
    assert dn.project(rec, "conv4", empty, empty, torch.zeros(0, 2, dtype=torch.int64)).shape == (0, 3, 224, 224)


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    dn = Deconvnet(models.zfnet(seed=0).eval())
    rec = dn.record(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    return dn, rec


def test_rejects_unknown_layer(small):
    dn, rec = small
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'; did you mean conv5, conv4, conv3, conv2, conv1\?; "
                                         r"valid layers: conv1, conv2, conv3, conv4, conv5"):
        dn.project(rec, "conv9", [0], [0])


def test_rejects_rows_and_channels_out_of_range(small):
    dn, rec = small
    with pytest.raises(ValueError, match=r"rows holds values outside \[0, 2\)"):
        dn.project(rec, "conv1", torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"channels holds values outside \[0, 96\)"):
        dn.project(rec, "conv1", torch.tensor([0]), torch.tensor([96]))


def test_rejects_wrong_dtypes_and_lengths(small):
    dn, rec = small
    with pytest.raises(TypeError, match=r"rows must be int64"):
        dn.project(rec, "conv1", torch.tensor([0], dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"channels must be 1-D of length 1"):
        dn.project(rec, "conv1", torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"positions must be an int64"):
        dn.project(rec, "conv1", torch.tensor([0]), torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"positions must be \(1, 2\)"):
        dn.project(rec, "conv1", torch.tensor([0]), torch.tensor([0]), torch.tensor([[0, 1, 2]]))


def test_rejects_positions_off_the_map(small):
    dn, rec = small
    with pytest.raises(ValueError, match=r"positions hold \(y, x\) outside the 13x13 map of conv5"):
        dn.project(rec, "conv5", torch.tensor([0]), torch.tensor([0]), torch.tensor([[13, 0]]))


def test_rejects_bad_images():
    dn = Deconvnet(models.zfnet(seed=0))
    with pytest.raises(ValueError, match=r"images must be an \(N, 3, H, W\) tensor"):
        dn.record(torch.randn(2, 1, 224, 224))
    with pytest.raises(TypeError, match=r"images must be floating point"):
        dn.record(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_rejects_a_record_from_another_model(small):
    dn, rec = small
    other = Deconvnet(models.zfnet(seed=1))
    with pytest.raises(ValueError, match=r"rec was recorded by another Deconvnet"):
        other.project(rec, "conv1", [0], [0])


def test_rejects_unknown_mode_and_unsupported_models(small):
    dn, rec = small
    with pytest.raises(ValueError, match=r"mode must be one of deconvnet, guided, backprop"):
        dn.project(rec, "conv1", [0], [0], mode="gradcam")
    # Softplus is not x * g(x) with a rule of its own (docs/engine.md): refused, named.
    with pytest.raises(ValueError, match=r"node 'features.1' \(module Softplus\) is not an operation the deconvnet can "
                                         r"project"):
        Deconvnet(_with_features(torch.nn.Conv2d(3, 4, 3), torch.nn.Softplus()))


class _Features(torch.nn.Module):
    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _with_features(*modules: torch.nn.Module) -> torch.nn.Module:
    return _Features(*modules)
