"""Issue #18: the deconvnet on every torchvision classifier (random init, nothing downloaded).

- **Coverage.** Each of the builders of ``torchvision.models.list_models(module=torchvision.models)``
  (80 of them) is accepted by ``Deconvnet``, built with its parameters on the meta device
  (tracing needs shapes only, and the largest hold 600M parameters). Its default layers are
  layers of the engine, resolve to torchvision feature-extraction node names, and the layout
  ``dn.layout_of`` gives each agrees with the rank and shape of the node's raw output, computed
  independently by ``create_feature_extractor`` on the meta device at the builder's evaluation
  crop (torchvision's own weights preset).
- **Exactness.** One representative of each family issue #18 adds (EfficientNet, EfficientNetV2,
  MobileNetV3, RegNetY, ConvNeXt, ViT, Swin, Swin V2, MaxViT), at an early layer and one of its
  default (stage) layers, on two of the package's photographs at 224x224: the engine's recorded
  activation is the node's output presented as (B, C, H, W); its projections of single
  activations and of whole maps, in all three modes, equal the float64 autograd oracle
  (``_oracle.graph_oracle``, independent of the engine) to 1e-9 in float64, and in float32 are
  no further from it than the oracle's own float32 autograd (with a stated slack).
- **Refusals.** Data-dependent control flow, a product of two data tensors that is not a gate,
  and activations no rule covers (``nn.Softplus``, ``F.softplus``, a custom autograd function)
  are refused at construction with ``zfkernels.engine.Unsupported`` naming the node; the twin of
  each, with the one operation replaced by a covered one, is accepted.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from zfkernels import Deconvnet, models
from zfkernels.engine import Unsupported

import _arch_factory
from _images import SAMPLES, load
from _oracle import LAYOUTS, MODES, graph_oracle, present, presented_output, relative_error

BUILDERS: List[str] = sorted(torchvision.models.list_models(module=torchvision.models))


# -- coverage -----------------------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter and buffer registered inside the block is moved to the meta device as it
    is registered, so that the builders' initialisers then run on shapes alone.

    (``with torch.device("meta")`` is not enough: RegNet's builder computes its widths with torch
    ops and reads them back with ``.tolist()``, which a meta tensor cannot do. Here those plain
    computations stay on the CPU; only what the module keeps goes to meta.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(self, name, param):
        register_parameter(self, name, param)
        if param is not None:
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def torchvision_crop(arch: str) -> int:
    """The crop of the builder's default weights' evaluation transform, from torchvision's own
    preset (224 for most, 299 for Inception v3, 384 for EfficientNetV2-S, 518 for ViT-H/14 …)."""
    return int(torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0])


def test_every_builder_is_listed():
    """The parametrisation below covers the issue's 80 builders (and any torchvision adds)."""
    assert len(BUILDERS) >= 80
    assert {"efficientnet_b0", "vit_h_14", "maxvit_t", "swin_v2_b", "regnet_y_128gf"} <= set(BUILDERS)


# (MaxViT's 1500-node graph takes 7 s to trace and classify on 2 cores; every other builder under 5 s)
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "maxvit_t" else a for a in BUILDERS])
def test_every_builder_is_accepted_and_its_default_layers_resolve(arch):
    with parameters_on_meta():
        model = models.build(arch, seed=0).eval()
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # nothing was computed
    dn = Deconvnet(model)
    layers = models.default_layers(arch, model)
    assert layers and len(set(layers)) == len(layers), layers
    if not models.is_zoo(arch):  # (the zoo's AlexNet and VGG16 show every conv layer)
        assert len(layers) <= 8, layers  # each stage's output: a handful, not hundreds
    nodes = set(get_graph_node_names(model, suppress_diff_warning=True)[1])
    assert all(dn.resolve(layer) in nodes for layer in dn.layers)  # node names (and the zoo's aliases of them)
    steps = [dn.resolve(layer) for layer in layers]
    # each default layer is a layer of the engine, or the node a listed alias stands for (VGG-style
    # stacks list conv1_1 … in place of their nodes)
    listed = {dn.resolve(layer) for layer in dn.layers}
    assert set(steps) <= listed, sorted(set(steps) - listed)

    # The raw outputs, at the network's own crop, by torchvision alone: a token grid is (B, 1 + H*W, C),
    # a map (B, C, H, W) or channels-last (B, H, W, C). Every torchvision classifier's maps are
    # square at a square input, so the presented map (B, C, H, W) must be square: a 4-D output read
    # in the wrong layout would give (W, C) or (C, H) as its spatial size.
    crop = torchvision_crop(arch)
    extractor = create_feature_extractor(model, return_nodes=steps, suppress_diff_warning=True)
    with torch.no_grad():
        raw = extractor(torch.empty(1, 3, crop, crop, device="meta"))
    for layer, step in zip(layers, steps):
        layout = dn.layout_of(layer)
        assert layout in LAYOUTS, (layer, layout)
        assert (raw[step].dim() == 3) == (layout == "tokens"), (layer, layout, tuple(raw[step].shape))
        shown = present(raw[step], layout)
        assert shown.dim() == 4 and shown.shape[-1] == shown.shape[-2] > 0, (layer, layout, tuple(raw[step].shape))


# -- exactness against the float64 autograd oracle ----------------------------------------------

# family representative -> its early layer and one of its default (stage) layers, with the layout
# of each node's raw output (read off torchvision's source: Swin's stages and ConvNeXt between its
# block's two permutes are channels-last, ViT's encoder layers are token sequences).
FAMILIES: Dict[str, Tuple[Tuple[str, str], Tuple[str, str]]] = {
    # a depthwise conv's SiLU, above a squeeze-excitation gate; the last block at 28x28
    "efficientnet_b0": (("features.2.0.block.1", "NCHW"), ("features.3.1.add", "NCHW")),
    # fused MBConv (SiLU, no gate); MBConv with SE gates, 14x14
    "efficientnet_v2_s": (("features.1.1.add", "NCHW"), ("features.5.8.add", "NCHW")),
    # a depthwise conv's Hardswish, above ReLUs and a hard-sigmoid gate; Hardswish, gates, a residual add
    "mobilenet_v3_small": (("features.4.block.1", "NCHW"), ("features.8.add", "NCHW")),
    # the first block's output (a sigmoid gate over a grouped conv and ReLUs); the second stage's output
    "regnet_y_400mf": (("trunk_output.block1.block1-0.activation", "NCHW"),
                       ("trunk_output.block2.block2-2.activation", "NCHW")),
    # inside a block, channels-last: the GELU after LayerNorm and Linear; the second stage's last CNBlock
    "convnext_tiny": (("features.1.0.block.4", "NHWC"), ("features.3.2.add", "NCHW")),
    # the first and the third encoder layers: class token, position embedding, attention, GELU, LayerNorm
    "vit_b_16": (("encoder.layers.encoder_layer_0.add_1", "tokens"), ("encoder.layers.encoder_layer_2.add_1", "tokens")),
    # a (non-shifted) window-attention block; the second stage's last block, after patch merging
    "swin_t": (("features.1.0.add_1", "NHWC"), ("features.3.1.add_1", "NHWC")),
    "swin_v2_t": (("features.1.0.add_1", "NHWC"), ("features.3.1.add_1", "NHWC")),
    # MBConv (BatchNorm, GELU, sigmoid gate); the first stage's output, after block and grid attention
    "maxvit_t": (("blocks.0.layers.0.layers.MBconv.add", "NCHW"),
                 ("blocks.0.layers.1.layers.grid_attention.departition_op.reshape_1", "NCHW")),
}

PHOTOS = ["astronaut.jpg", "chelsea_cat.jpg"]  # two of the package's photographs: a clean clone has them
FLOAT64_TOLERANCE = 1e-9
# float32: the engine and the oracle's float32 autograd compute the same sums in different orders
# (the engine folds BatchNorm into filters, crops to receptive fields, batches the selections
# differently), so their rounding errors are of the same size but not equal: the engine may be
# FLOAT32_SLACK times as far from the float64 oracle, plus FLOAT32_FLOOR (2 float32 epsilons, relative)
# for when the oracle's own error happens to be tiny, or a float32 near-tie at a rectifier breaks
# differently in the engine's forward than in the oracle's. (Measured at these layers, the oracle's
# own float32 error is 1e-7 to 8e-7.)
FLOAT32_SLACK = 1.5
FLOAT32_FLOOR = 2 * torch.finfo(torch.float32).eps


def family(arch: str) -> nn.Module:
    """The family's network with seeded random weights, its normalisations' statistics and affine
    parameters and ConvNeXt's layer scale drawn at random too: a fresh BatchNorm or LayerNorm is
    nearly the identity and ConvNeXt's layer scale starts at 1e-6, which would hide a wrong scale
    or a wrong rule inside its blocks behind the residual path."""
    from torchvision.models.convnext import CNBlock

    model = models.build(arch, seed=0).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.3, 3.0)
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.2)
            if isinstance(module, CNBlock):
                module.layer_scale.uniform_(0.2, 1.0)
    return model


def strongest(shown: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 0's two strongest feature maps and image 1's strongest, each at its (first) argmax:
    positive seeds, whose projections are not zero in any mode, two of them sharing an image's
    recording. (Three, not four: the oracle runs one image row per selection, and float64 ViT-B
    is slow on two cores.)"""
    w = shown.shape[-1]
    peak, where = shown.flatten(2).max(dim=2)
    top = peak.topk(2, dim=1).indices
    rows, channels = torch.tensor([0, 0, 1]), torch.stack([top[0, 0], top[0, 1], top[1, 0]])
    flat = where[rows, channels]
    return rows, channels, torch.stack([flat // w, flat % w], dim=1)


def per_selection_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The worst relative error over the selections (one large projection must not hide another's error)."""
    return max(relative_error(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_representatives_stage_layer_is_a_default_layer(arch):
    """The second layer tested below is one the gallery shows by default (docs/models.md's table)."""
    with parameters_on_meta():
        model = models.build(arch, seed=0).eval()
    assert FAMILIES[arch][1][0] in models.default_layers(arch, model)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_new_family_equals_the_oracle(arch):
    model32 = family(arch)
    model64 = copy.deepcopy(model32).double()
    x32 = load(SAMPLES, PHOTOS)
    x64 = x32.double()
    layers = [layer for layer, _ in FAMILIES[arch]]
    dn32, dn64 = Deconvnet(model32), Deconvnet(model64)
    rec32, rec64 = dn32.record(x32, layers=layers), dn64.record(x64, layers=layers)
    failures = []
    for layer, layout in FAMILIES[arch]:
        assert layer in dn64.layers and dn64.layout_of(layer) == layout, (layer, dn64.layout_of(layer))
        shown = presented_output(model64, x64, layer, layout)
        assert rec64.activations[layer].shape == shown.shape  # always (B, C, H, W), the class token left out
        assert relative_error(rec64.activations[layer], shown) < FLOAT64_TOLERANCE, layer
        assert rec32.activations[layer].shape == shown.shape
        rows, channels, positions = strongest(shown)
        for mode in MODES:
            for pos in (positions, None):
                what = f"{layer} {mode} {'single' if pos is not None else 'whole map'}"
                want = graph_oracle(model64, x64, layer, rows, channels, pos, mode=mode, layout=layout)
                assert all(float(w.norm()) > 0 for w in want), what  # a projection that proves something
                ours = dn64.project(rec64, layer, rows, channels, pos, mode=mode)
                assert ours.shape == want.shape and ours.dtype == torch.float64, what
                error = per_selection_error(ours, want)
                if not error < FLOAT64_TOLERANCE:
                    failures.append(f"{what} float64: {error:.2e}")
                # float32: the engine's and the oracle's float32 autograd, both against the float64 oracle
                theirs = graph_oracle(model32, x32, layer, rows, channels, pos, mode=mode, layout=layout,
                                      dtype=torch.float32)
                ours = dn32.project(rec32, layer, rows, channels, pos, mode=mode)
                assert ours.dtype == torch.float32, what
                bound = FLOAT32_SLACK * relative_error(theirs, want) + FLOAT32_FLOOR
                error = relative_error(ours, want)
                if not error <= bound:
                    failures.append(f"{what} float32: {error:.2e} > {bound:.2e}")
    assert not failures, "\n".join(failures)


# -- refusals -----------------------------------------------------------------------------------

# factory in _arch_factory -> the node its refusal must name, and the accepted twin
REFUSED = {
    "data_dependent_branch": ("part.gt", "straight_line"),  # if x.sum() > 0: the comparison decides
    "bilinear": ("part.mul", "hand_gate"),  # x * conv(x), beside x * sigmoid(conv(x))
    "softplus_module": ("part", "silu_module"),  # nn.Softplus, beside nn.SiLU
    "softplus_function": ("part.softplus", "silu_function"),  # F.softplus, beside F.silu
    "custom_function": ("part.custom_swish", "silu_function"),  # a custom autograd function
}


def test_unsupported_is_a_value_error():
    assert issubclass(Unsupported, ValueError)


@pytest.mark.parametrize("factory", list(REFUSED))
def test_refused_at_construction_naming_the_node(factory):
    node, twin = REFUSED[factory]
    with pytest.raises(Unsupported, match=rf"(?<![\w.]){re.escape(node)}(?![\w.])"):
        Deconvnet(getattr(_arch_factory, factory)())
    # The same network with that one operation replaced by a covered one is accepted, and projects
    # as the oracle says (so the refusal above is that operation's, not the network's).
    model = getattr(_arch_factory, twin)().double()
    dn = Deconvnet(model)
    layer = dn.layers[-1]
    x = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rec = dn.record(x, layers=[layer])
    rows, channels, positions = torch.tensor([0, 1]), torch.tensor([1, 3]), torch.tensor([[2, 3], [5, 0]])
    for mode in MODES:
        for pos in (positions, None):
            want = graph_oracle(model, x, dn.resolve(layer), rows, channels, pos, mode=mode)
            ours = dn.project(rec, layer, rows, channels, pos, mode=mode)
            assert relative_error(ours, want) < FLOAT64_TOLERANCE, (layer, mode, pos is None)
