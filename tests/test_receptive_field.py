"""Receptive fields: the boxes of ``Deconvnet.receptive_field`` against hand-derived ones, and the
receptive-field cropping of single-activation projections against a plain full-map deconvnet.

The crop is where an off-by-one would hide: transposed-convolution extents, 3x3/2 pooling
windows that straddle a crop edge, ceil-mode windows that hang off the map, padding at the
image border. So the selections here sit on the corners and edges of every layer's map, on
image sizes that are odd and not square.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from zfkernels import models, ops
from zfkernels.engine import Deconvnet

# --- the boxes, derived by hand from the layer geometry -------------------------------------


def zfnet_box_1d(layer: str, i: int) -> Tuple[int, int]:
    """ZFNet, one axis, unclipped [start, stop): conv1 7/2 pad 1, pool1 3/2, conv2 5/2,
    pool2 3/2, conv3-5 3/1 pad 1 (worked out on paper, see docs/engine.md)."""
    return {
        "conv1": (2 * i - 1, 2 * i - 1 + 7),
        "conv2": (8 * i - 1, 8 * i - 1 + 27),
        "conv3": (16 * i - 17, 16 * i - 17 + 75),
        "conv4": (16 * i - 33, 16 * i - 33 + 107),
        "conv5": (16 * i - 49, 16 * i - 49 + 139),
    }[layer]


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "conv4", "conv5"])
def test_zfnet_boxes_equal_the_hand_derived_ones(layer):
    dn = Deconvnet(models.zfnet(seed=0))
    size = {"conv1": 110, "conv2": 26}.get(layer, 13)
    assert dn.map_sizes((224, 224))[layer] == (size, size)
    for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size // 2, size // 3), (size - 1, size - 1)]:
        (y0, y1), (x0, x1) = zfnet_box_1d(layer, y), zfnet_box_1d(layer, x)
        want = (max(x0, 0), max(y0, 0), min(x1, 224), min(y1, 224))
        assert dn.receptive_field(layer, y, x, (224, 224)) == want


def test_known_receptive_field_sizes():
    """The textbook sizes: ZFNet conv5 sees 139 pixels, AlexNet conv5 163, VGG16 conv5_3 196."""
    for arch, layer, pos, extent in [("zfnet", "conv5", 6, 139), ("alexnet", "conv5", 6, 163), ("vgg16", "conv5_3", 7, 196)]:
        dn = Deconvnet(models.build(arch, seed=0))
        x0, y0, x1, y1 = dn.receptive_field(layer, pos, pos, (448, 448))  # big enough to clip nothing
        assert (x1 - x0, y1 - y0) == (extent, extent), arch


def test_vgg16_boxes():
    dn = Deconvnet(models.vgg16(seed=0))
    # conv1_1 3x3 pad 1: the 3x3 neighbourhood; conv1_2: 5x5; conv2_1 (after the 2/2 pool): rows
    # [y-1, y+2) of pool1's output -> [2y-2, 2y+4) of conv1_2's -> [2y-4, 2y+6) of pixels.
    assert dn.receptive_field("conv1_1", 5, 7, (224, 224)) == (6, 4, 9, 7)
    assert dn.receptive_field("conv1_2", 5, 7, (224, 224)) == (5, 3, 10, 8)
    assert dn.receptive_field("conv2_1", 5, 7, (224, 224)) == (14 - 4, 10 - 4, 14 + 6, 10 + 6)
    assert dn.receptive_field("conv1_1", 0, 223, (224, 224)) == (222, 0, 224, 2)


def test_boxes_clip_to_the_image_of_the_given_size():
    dn = Deconvnet(models.zfnet(seed=0).eval())
    assert dn.record(torch.zeros(1, 3, 161, 97)).activations["conv5"].shape[-2:] == (9, 5)
    # Bottom-right: rows [16*8-49, +139) = [79, 218), columns [15, 154), cut at the image.
    assert dn.receptive_field("conv5", 8, 4, (161, 97)) == (15, 79, 97, 161)
    assert dn.receptive_field("conv5", 0, 0, (161, 97)) == (0, 0, 90, 90)
    with pytest.raises(IndexError, match=r"outside the 9x5 map of conv5"):
        dn.receptive_field("conv5", 9, 0, (161, 97))
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'image_size'"):
        dn.receptive_field("conv5", 0, 0)


def test_map_sizes_equal_the_recorded_ones():
    for arch, size in [("zfnet", (231, 199)), ("zfnet", (224, 224)), ("alexnet", (227, 203)), ("vgg16", (70, 53))]:
        dn = Deconvnet(models.build(arch, seed=0).eval())
        rec = dn.record(torch.zeros(1, 3, *size))
        sizes = dn.map_sizes(size)
        assert list(sizes) == dn.layers, arch
        for layer in dn.layers:
            assert tuple(rec.activations[layer].shape[-2:]) == sizes[layer], (arch, layer)
            assert dn.shape_of(layer, size) == tuple(rec.activations[layer].shape[1:]), (arch, layer)


def test_receptive_field_rejects_bad_positions():
    dn = Deconvnet(models.zfnet(seed=0))
    with pytest.raises(IndexError, match=r"y=13 is outside the 13x13 map of conv5"):
        dn.receptive_field("conv5", 13, 0, (224, 224))
    with pytest.raises(IndexError, match=r"x=-1 is outside the 110x110 map of conv1"):
        dn.receptive_field("conv1", 0, -1, (224, 224))
    with pytest.raises(TypeError, match=r"y must be an int"):
        dn.receptive_field("conv1", 1.5, 0, (224, 224))
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'; did you mean .*; valid layers: conv1, conv2, conv3"):
        dn.receptive_field("conv9", 0, 0, (224, 224))
    with pytest.raises(ValueError, match=r"fc6 is not a feature map"):
        dn.receptive_field("fc6", 0, 0, (224, 224))
    with pytest.raises(ValueError, match=r"images of 20x20 do not fit this model: step 'features.4' \(conv\)"):
        dn.receptive_field("conv1", 0, 0, (20, 20))


# --- the crop against the full computation --------------------------------------------------


def plain_deconvnet(model: nn.Module, images: torch.Tensor, layer: str, rows, channels, positions) -> torch.Tensor:
    """A straightforward full-map deconvnet in float32, independent of the engine: its own
    forward (PyTorch's pooling indices), a scatter-add unpool, full-size transposed convs."""
    dn_names = Deconvnet(model).layers  # only for the layer names
    modules: List[nn.Module] = list(model.features)
    x, saved, conv_count, acts = images, [], 0, None
    indices = {}  # module index -> the pool's PyTorch indices, for the way down
    with torch.no_grad():
        for i, m in enumerate(modules):
            saved.append(x.shape[-2:])
            if isinstance(m, nn.Conv2d):
                x = m(x)
            elif isinstance(m, nn.ReLU):
                x = torch.relu(x)
                if dn_names[conv_count] == layer:
                    acts = x
                    break
                conv_count += 1
            elif isinstance(m, nn.MaxPool2d):
                x, indices[i] = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, return_indices=True)
            else:
                x = m(x)
        b = torch.arange(rows.shape[0], device=images.device)
        signal = torch.zeros((rows.shape[0],) + acts.shape[1:], dtype=acts.dtype, device=acts.device)
        signal[b, channels, positions[:, 0], positions[:, 1]] = acts[rows, channels, positions[:, 0], positions[:, 1]]
        top = len(saved) - 1  # the ReLU of `layer`
        for i in range(top - 1, -1, -1):
            m, below = modules[i], saved[i]
            if isinstance(m, nn.Conv2d):
                extent = [(signal.shape[2 + a] - 1) * m.stride[a] - 2 * m.padding[a] + m.kernel_size[a] for a in range(2)]
                out_pad = [below[a] - extent[a] for a in range(2)]
                signal = F.conv_transpose2d(signal, m.weight, None, m.stride, m.padding, out_pad)
            elif isinstance(m, nn.ReLU):
                signal = torch.relu(signal)
            elif isinstance(m, nn.MaxPool2d):
                idx = indices[i][rows].flatten(2)
                out = signal.new_zeros(signal.shape[0], signal.shape[1], below[0] * below[1])
                out.scatter_add_(2, idx, signal.flatten(2))
                signal = out.view(signal.shape[0], signal.shape[1], below[0], below[1])
            # normalisation: identity on the way down
    return signal


def edge_selections(act: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corners, edges, the next-to-edge positions and the centre of every image's map, each in
    the feature map with the largest activation there (positive: a zero seed proves nothing)."""
    n, _, h, w = act.shape
    spots = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (1, 1), (h - 2, w - 2), (h // 2, 0), (0, w // 2), (h // 2, w // 2)}
    rows, channels, positions = [], [], []
    for r in range(n):
        for y, x in sorted(spots):
            y, x = min(max(y, 0), h - 1), min(max(x, 0), w - 1)
            c = int(act[r, :, y, x].argmax())
            if act[r, c, y, x] > 0:
                rows.append(r), channels.append(c), positions.append((y, x))
    return (
        torch.tensor(rows, dtype=torch.int64, device=act.device),
        torch.tensor(channels, dtype=torch.int64, device=act.device),
        torch.tensor(positions, dtype=torch.int64, device=act.device).view(-1, 2),
    )


@pytest.mark.parametrize(
    "arch,size",
    [("zfnet", (224, 224)), ("zfnet", (231, 199)), ("zfnet", (97, 120)), ("alexnet", (227, 203)), ("vgg16", (70, 53))],
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}",
)
def test_cropped_projection_equals_the_full_computation_at_the_borders(arch, size, device):
    model = models.build(arch, seed=0).eval().to(device)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3)).to(device)
    dn = Deconvnet(model)
    rec = dn.record(images)
    for layer in dn.layers:
        rows, channels, positions = edge_selections(rec.activations[layer])
        assert rows.numel() > 0, layer
        ours = dn.project(rec, layer, rows, channels, positions, chunk_size=7)
        full = plain_deconvnet(model, images, layer, rows, channels, positions)
        error = float((ours - full).norm() / full.norm())
        assert error < 1e-5, f"{arch} {size} {layer}: {error:.2e}"
        for b in range(rows.shape[0]):  # nothing outside the box, whatever the rounding
            x0, y0, x1, y1 = dn.receptive_field(layer, int(positions[b, 0]), int(positions[b, 1]), size)
            outside = ours[b].abs().sum(0)
            outside[y0:y1, x0:x1] = 0
            assert not outside.any(), f"{layer} selection {b}: signal outside its receptive field"


def _record_kernel_inputs(monkeypatch) -> List[Tuple[str, Tuple[int, ...]]]:
    """Wrap ops.project and ops.unpool so that each call appends ``(op, input shape)`` to the
    returned list."""
    shapes: List[Tuple[str, Tuple[int, ...]]] = []
    real_project, real_unpool = ops.project, ops.unpool

    def project(x, *args, **kwargs):
        shapes.append(("project", tuple(x.shape)))
        return real_project(x, *args, **kwargs)

    def unpool(y, *args, **kwargs):
        shapes.append(("unpool", tuple(y.shape)))
        return real_unpool(y, *args, **kwargs)

    monkeypatch.setattr(ops, "project", project)
    monkeypatch.setattr(ops, "unpool", unpool)
    return shapes


def test_single_activation_cost_does_not_grow_with_the_image(monkeypatch):
    """The tensors that go through the kernels for an interior activation have the same shapes
    on a 224x224 and a 448x448 image: only the receptive field is computed."""
    shapes = _record_kernel_inputs(monkeypatch)
    monkeypatch.setattr("zfkernels.engine.fastpaths.FOLD_MAX_CHANNELS", 0)  # conv1 through ops.project too, so it is seen
    model = models.zfnet(seed=0).eval()
    seen = []
    for side in (224, 448):
        dn = Deconvnet(model)
        images = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        rec = dn.record(images)
        act = rec.activations["conv4"]
        y = x = 6  # interior in both: its receptive field clips nothing
        channel = int(act[0, :, y, x].argmax())
        shapes.clear()
        out = dn.project(rec, "conv4", torch.tensor([0]), torch.tensor([channel]), torch.tensor([[y, x]]))
        assert out.shape == (1, 3, side, side)
        seen.append(list(shapes))
    assert seen[0] == seen[1] and len(seen[0]) == 6  # 4 projections (conv4..conv1) and 2 unpools
    assert max(s[-1] for _, s in seen[0]) < 224 // 2  # never a full map


# --- branching graphs: unions of boxes -----------------------------------------------------


def test_resnet_boxes_are_the_union_over_branches():
    """ResNet-18 by hand: the stem conv 7/2 pad 3 sees [2y-3, 2y+4); after the 3/2 pool and
    layer1.0's first 3x3 conv, [4y-9, 4y+10); after its second conv and the residual add, the
    conv branch's [4y-13, 4y+14) holds the identity branch's [4y-5, 4y+4), so it is the union."""
    dn = Deconvnet(torchvision.models.resnet18(weights=None).eval())
    size = (128, 96)
    for layer, (lo, hi) in {"relu": (-3, 4), "layer1.0.relu": (-9, 10), "layer1.0.relu_1": (-13, 14)}.items():
        step = 2 if layer == "relu" else 4
        h, w = dn.map_sizes(size)[layer]
        for y, x in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:
            want = (max(step * x + lo, 0), max(step * y + lo, 0), min(step * x + hi, size[1]), min(step * y + hi, size[0]))
            assert dn.receptive_field(layer, y, x, size) == want, (layer, y, x)


def _kernel_shapes(monkeypatch, dn: Deconvnet, layer: str, sides, position) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """The shapes that reach ops.project / ops.unpool projecting one activation, per image side."""
    shapes = _record_kernel_inputs(monkeypatch)
    seen = []
    for side in sides:
        images = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        rec = dn.record(images, [layer])
        act = rec.activations[dn.resolve(layer)]
        y, x = position
        shapes.clear()
        out = dn.project(rec, layer, torch.tensor([0]), torch.tensor([int(act[0, :, y, x].argmax())]), torch.tensor([[y, x]]))
        assert out.shape == (1, 3, side, side) and out.abs().sum() > 0
        seen.append(list(shapes))
    return seen


def test_vgg_bn_keeps_the_fast_path(monkeypatch):
    """VGG16-BN (conv/BN/ReLU/pool chain): a single activation of conv2_1's ReLU is projected on
    its receptive field alone, whatever the image size (BatchNorm folded into the convs)."""
    dn = Deconvnet(torchvision.models.vgg16_bn(weights=None).eval())
    seen = _kernel_shapes(monkeypatch, dn, "features.9", (64, 128), (10, 12))
    assert seen[0] == seen[1] and [kind for kind, _ in seen[0]] == ["project", "unpool", "project", "project"]
    assert max(shape[-1] for _, shape in seen[0]) < 16


def test_resnet_boxes_do_not_grow_with_the_image(monkeypatch):
    dn = Deconvnet(torchvision.models.resnet18(weights=None).eval())
    seen = _kernel_shapes(monkeypatch, dn, "layer1.1.relu_1", (64, 128), (8, 9))
    assert seen[0] == seen[1]
    assert max(shape[-1] for _, shape in seen[0]) < 32  # never a 32x32 (64 px image) map or larger
