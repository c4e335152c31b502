"""Any ReLU CNN: torchvision's families through the graph engine, with random weights (nothing is
downloaded), small inputs and fp32.

- the graph's layer names are torchvision's feature-extraction node names, and the one forward
  walker's activations equal torchvision's own ``create_feature_extractor``;
- projections in deconvnet and guided mode, of single activations and whole maps, equal the
  float64 autograd oracle (``_oracle.graph_oracle``) at two layers of every family;
- EfficientNet, ConvNeXt, ViT, data-dependent control flow and unknown layer names are refused
  with messages that name the operation and its node (or close names).
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from zfkernels.engine import Deconvnet
from zfkernels.engine import Unsupported, graph_of, layer_aliases, projectable_layers, walk

from _oracle import graph_oracle, relative_error

# family -> (builder keyword arguments, smallest comfortable input size, two layers to project)
FAMILIES: Dict[str, Tuple[dict, int, Tuple[str, str]]] = {
    "resnet18": ({}, 64, ("layer1.0.relu_1", "layer2")),
    "resnet50": ({}, 64, ("layer1.1.relu_2", "layer2.0.relu_2")),
    "vgg16_bn": ({}, 64, ("features.9", "features.42")),
    "densenet121": ({}, 64, ("features.denseblock1.denselayer2.relu2", "features.transition1.relu")),
    "googlenet": ({"init_weights": False, "aux_logits": False}, 64, ("conv3.relu", "inception3a.cat")),
    "inception_v3": ({"init_weights": False, "aux_logits": False}, 80, ("Conv2d_4a_3x3.relu", "Mixed_5b.cat")),
    "mobilenet_v2": ({}, 64, ("features.2.conv.0", "features.4.conv.1")),
    "squeezenet1_1": ({}, 64, ("features.3.cat", "features.7.expand3x3_activation")),
    "shufflenet_v2_x1_0": ({}, 64, ("stage2.0.branch1.4", "stage2.1.view_1")),
    "resnext50_32x4d": ({}, 64, ("layer1.0.relu_1", "layer2.0.relu_2")),
    "wide_resnet50_2": ({}, 64, ("layer1.0.relu", "layer1.2.relu_2")),
}


@functools.lru_cache(maxsize=2)  # the families are large: keep the last two, not all eleven alive
def family(name: str) -> nn.Module:
    """The family's network with seeded random weights, and BatchNorm statistics and affine
    parameters drawn at random too (a fresh BatchNorm is nearly the identity, which would hide
    a wrong scale)."""
    kwargs = FAMILIES[name][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(tvm, name)(weights=None, **kwargs).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0, 0.2)
                    module.running_var.uniform_(0.3, 3.0)
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.normal_(0, 0.2)
        return model


def images(name: str, count: int = 2) -> torch.Tensor:
    size = FAMILIES[name][1]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_layers_are_node_names_and_activations_equal_torchvision(name):
    model = family(name)
    layers = projectable_layers(model)
    assert layers and set(layers) <= set(get_graph_node_names(model)[1])
    picked = sorted({layers[0], layers[len(layers) // 2], layers[-1], *FAMILIES[name][2]} & set(layers) | {
        graph_of(model).resolve(FAMILIES[name][2][1])})
    x = images(name)
    with torch.no_grad():
        ours = dict(walk(graph_of(model), x, picked))
        theirs = create_feature_extractor(model, return_nodes=picked)(x)
    rectified = set(graph_of(model).rectified_nodes)
    for layer in picked:
        assert torch.equal(ours[layer], theirs[layer]), layer
        if layer in rectified:  # a rectifier's output, or a concatenation of them (not a block output)
            assert bool((ours[layer] >= 0).all()), layer


def test_resnet_names_a_module_called_twice_and_a_stage_by_its_path():
    model = family("resnet18")
    layers = projectable_layers(model)
    assert ["layer1.0.relu", "layer1.0.relu_1"] == [n for n in layers if n.startswith("layer1.0.")]
    assert graph_of(model).resolve("layer2") == "layer2.1.relu_1"
    assert "fc" not in " ".join(layers)  # the classifier has no feature maps


def test_functional_and_in_place_relus_count_alike():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.relu(self.a(x), inplace=True)
            x = self.act(self.b(x)).relu_()
            return torch.relu(self.c(x)) + x[:, :, 1:-1, 1:-1]

    model = Net().eval()
    # ...and the model's output, a map: the root module's block output.
    assert projectable_layers(model) == ["relu", "act", "relu_", "relu_1", "add"]
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(dict(walk(graph_of(model), x, ["add"]))["add"], model(x.clone()))


def test_zoo_aliases_sit_next_to_node_names():
    from zfkernels import models

    model = models.vgg16(seed=0)
    aliases = layer_aliases(model)
    assert aliases["conv1_1"] == "features.1" and aliases["conv5_3"] == "features.29" and aliases["fc7"] == "classifier.4"
    assert graph_of(model).layers[:2] == ["conv1_1", "conv1_2"]
    assert projectable_layers(model)[:2] == ["features.1", "features.3"]


class _Softplussed(nn.Module):
    """An activation that is not x * g(x) with a rule of its own (docs/engine.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Softplus()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Squared(_Softplussed):
    """A product of two data tensors that is not a gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * torch.relu(y)


class _Squashed(_Softplussed):
    """A sigmoid used as an activation, not as a gate: freezing it would be silently wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x)) + 1.0


@pytest.mark.parametrize("model, operation", [
    (_Softplussed, r"node 'act' \(module Softplus\)"),
    (_Squared, r"node 'mul' \(function mul: a product of two data tensors that is not a gate"),
    (_Squashed, r"node 'sigmoid' \(function sigmoid whose output is used other than as a gate"),
])
def test_refuses_what_it_cannot_project(model, operation):
    with pytest.raises(Unsupported, match=operation):
        projectable_layers(model())


def test_takes_gates_and_refuses_data_dependent_control_flow():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return y * torch.sigmoid(y)

    class Branchy(Gate):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.relu(y) if y.sum() > 0 else y

    assert projectable_layers(Gate()) == ["relu", "mul"]  # the gate's output is the model's block output
    with pytest.raises(ValueError, match=r"Branchy cannot be traced by torch.fx: data-dependent control flow"):
        projectable_layers(Branchy())


def test_unknown_layer_suggests_close_names():
    graph = graph_of(family("resnet18"))
    with pytest.raises(ValueError, match=r"unknown layer 'layer1.0.relu_3'; did you mean layer1.0.relu_1, layer1.0.relu"):
        graph.resolve("layer1.0.relu_3")


# -- projections against the float64 autograd oracle --------------------------------------------

TOLERANCE = 1e-5


def strongest(act: torch.Tensor, per_image: int = 2) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the ``per_image`` feature maps with the largest activation, at their argmax."""
    n, _, _, w = act.shape
    peak, where = act.flatten(2).max(dim=2)
    rows = torch.arange(n).repeat_interleave(per_image)
    channels = peak.topk(per_image, dim=1).indices.flatten()
    flat = where[rows, channels]
    return rows, channels, torch.stack([flat // w, flat % w], dim=1)


def check_against_oracle(model: nn.Module, x: torch.Tensor, layer: str, modes=("deconvnet", "guided"),
                         below: float = float("inf")) -> None:
    """Selections: the strongest activations below ``below`` (a ReLU6's saturated seeds have a
    zero guided projection, which would prove nothing)."""
    dn = Deconvnet(model)
    node = dn.resolve(layer)
    rec = dn.record(x, [layer])
    act = rec.activations[node]
    rows, channels, positions = strongest(torch.where(act < below, act, torch.zeros_like(act)))
    for mode in modes:
        for pos in (positions, None):
            ours = dn.project(rec, layer, rows, channels, pos, mode=mode)
            want = graph_oracle(model, x, node, rows, channels, pos, mode=mode)
            assert want.abs().sum() > 0
            error = relative_error(ours, want)
            what = "single" if pos is not None else "whole map"
            assert error < TOLERANCE, f"{layer} {mode} {what}: {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_projections_equal_the_oracle(name):
    model = family(name)
    for layer in FAMILIES[name][2]:
        check_against_oracle(model, images(name), layer)


def test_relu6_masks_saturation_in_guided_and_backprop_modes():
    """A ReLU6 whose inputs often exceed 6 (large weights): the guided and backprop masks are
    0 < x < 6, the deconvnet rule relu(signal); through a depthwise conv, a residual add and BN."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU6()
            self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.bn(self.conv(x)))
            return torch.nn.functional.relu6(self.depthwise(y) + y)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv.weight.mul_(8)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        y = model.act(model.bn(model.conv(x)))
    assert bool((y >= 6).any()) and bool(((y > 0) & (y < 6)).any())  # both sides of the mask occur
    for layer in ("act", "relu6"):
        check_against_oracle(model, x, layer, modes=("deconvnet", "guided", "backprop"), below=6.0)


def test_mobilenet_backprop_equals_the_plain_gradient():
    check_against_oracle(family("mobilenet_v2"), images("mobilenet_v2"), "features.4.conv.1", modes=("backprop",))


def test_pass_one_taps_yield_node_outputs_and_stop_at_the_deepest_layer():
    """Pass 1's taps on a branching model: the requested node outputs as torchvision computes
    them, in network order, and nothing past the deepest one runs."""
    from zfkernels.job.scan import FeatureTaps, map_sizes, num_channels

    model = family("resnet18")
    layers = ["layer1.0.relu_1", "layer2"]
    x = images("resnet18")
    with torch.no_grad():
        want = create_feature_extractor(model, return_nodes={"layer1.0.relu_1": "a", "layer2.1.relu_1": "b"})(x)
    from torch._subclasses.fake_tensor import FakeTensor

    called = []
    # Real inputs only: the graph's geometry (shapes, layouts) is one pass on fake tensors per
    # model, which computes nothing (docs/engine.md).
    hook = model.layer3[0].conv1.register_forward_pre_hook(
        lambda module, inputs: None if isinstance(inputs[0], FakeTensor) else called.append(True))
    try:
        with torch.no_grad():
            got = list(FeatureTaps(model, layers)(x))
            model.layer3[0].conv1(torch.zeros(1, 128, 4, 4))  # the hook does fire on a call
    finally:
        hook.remove()
    assert called == [True]
    called.clear()
    assert [name for name, _ in got] == layers
    assert torch.equal(got[0][1], want["a"]) and torch.equal(got[1][1], want["b"])
    assert map_sizes(model, layers, (64, 64)) == {"layer1.0.relu_1": (16, 16), "layer2": (8, 8)}
    assert num_channels(model, layers) == {"layer1.0.relu_1": 64, "layer2": 128}


@pytest.mark.parametrize("name, layer", [("resnet18", "layer1.0.relu_1"), ("vgg16_bn", "features.9")])
def test_positions_everywhere_in_small_chunks_equal_the_oracle(name, layer):
    """Activations all over a map, in chunks ordered by their receptive fields: corners, edges and
    centres share chunks whose boxes are moved onto the map at a smaller common size (the
    mapping back to the caller's order included); each projection equals the oracle's."""
    model = family(name)
    x = images(name)
    dn = Deconvnet(model)
    node = dn.resolve(layer)
    rec = dn.record(x, [layer])
    h, w = rec.activations[node].shape[-2:]
    # Every corner and edge, and a grid inside (about 9 x 9 positions: the oracle is float64).
    along = [torch.unique(torch.cat([torch.arange(0, n, max(1, n // 8)), torch.tensor([n - 1])])) for n in (h, w)]
    ys, xs = torch.meshgrid(*along, indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=1).repeat(2, 1)
    rows = torch.arange(2).repeat_interleave(ys.numel())
    act = rec.activations[node]
    channels = act[rows, :, positions[:, 0], positions[:, 1]].argmax(dim=1)  # a non-zero seed at each
    order = dn.field_order(layer, positions, tuple(x.shape[-2:]))
    assert not torch.equal(order, torch.arange(rows.shape[0]))  # the chunks really are reordered
    ours = dn.project(rec, layer, rows, channels, positions, chunk_size=24)
    want = graph_oracle(model, x, node, rows, channels, positions)
    assert bool((want.flatten(1).abs().sum(dim=1) > 0).all())
    assert relative_error(ours, want) < TOLERANCE
    # Per selection too (a selection put back in another's place would be off by its whole
    # norm); looser, since a few projections are small sums of large cancelling terms.
    per_selection = (ours.double() - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert float(per_selection.max()) < 1e-3
