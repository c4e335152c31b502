"""The architecture registry (``zfkernels.models.build`` and ``--arch``): torchvision's builders
at random init against the builders themselves, ``module.path:callable`` factories,
``--weights torchvision`` from a local hub cache (never a download), the evaluation sizes,
the default layers (real node names, few, rectified) and the one-line refusals."""

from __future__ import annotations

import urllib.request

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from zfkernels import cli, models

import _arch_factory

# The families the deconvnet is to run (small or cheap ones first); slow to build: the rest.
FAMILIES = ["squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet50", "resnext50_32x4d", "densenet121",
            pytest.param("googlenet", marks=pytest.mark.slow), pytest.param("inception_v3", marks=pytest.mark.slow),
            pytest.param("wide_resnet50_2", marks=pytest.mark.slow), pytest.param("vgg16_bn", marks=pytest.mark.slow)]
# torchvision warns when these two are built without saying how to initialise them.
QUIET_INIT = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}


def torchvision_reference(arch: str, seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **QUIET_INIT.get(arch, {}), **options)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to fetch a file fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache: ``$TORCH_HOME/hub/checkpoints``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return folder


# -- building ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_builds_as_torchvision_builds_it(arch, no_network):
    model = models.build(arch, seed=3, num_classes=10)
    want = torchvision_reference(arch, 3, num_classes=10)
    assert type(model) is type(want)
    ours, theirs = model.state_dict(), want.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the same seed gives torchvision's own weights"


def test_seeded_builds_repeat_and_leave_the_rng_alone():
    before = torch.random.get_rng_state()
    first = models.build("squeezenet1_1", seed=1, num_classes=5)
    again = models.build("squeezenet1_1", seed=1, num_classes=5)
    other = models.build("squeezenet1_1", seed=2, num_classes=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first.features[0].weight, again.features[0].weight)
    assert not torch.equal(first.features[0].weight, other.features[0].weight)
    assert first.classifier[1].out_channels == 5
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(first.eval()(x), torchvision_reference("squeezenet1_1", 1, num_classes=5).eval()(x))


def test_every_listed_builder_is_an_architecture():
    names = models.architectures()
    assert names[:3] == ["zfnet", "alexnet", "vgg16"] and len(names) == len(set(names))
    assert set(names) == {"zfnet"} | set(torchvision.models.list_models(module=torchvision.models))
    for arch in ("resnet50", "vgg16_bn", "googlenet", "wide_resnet50_2", "_arch_factory:tiny", "a.b.c:d.e"):
        assert models.check_arch(arch) == arch


# -- module.path:callable --------------------------------------------------------------------------


def test_a_factory_is_imported_called_and_seeded(tmp_path):
    model = models.build("_arch_factory:tiny", seed=4)
    torch.manual_seed(4)
    want = _arch_factory.tiny()
    assert isinstance(model, _arch_factory.Tiny)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    path = tmp_path / "tiny.pth"
    torch.save(models.build("_arch_factory:tiny", seed=9).state_dict(), path)
    loaded = models.build("_arch_factory:tiny", str(path))
    assert torch.equal(loaded.features[0].weight, models.build("_arch_factory:tiny", seed=9).features[0].weight)
    assert isinstance(models.build("_arch_factory:Strided"), _arch_factory.Strided)  # a class is a callable too


@pytest.mark.parametrize("arch, message", [
    ("_no_such_module:build", r"^_no_such_module:build: cannot import module '_no_such_module' \(ModuleNotFoundError: "),
    ("_arch_factory:missing", r"^_arch_factory:missing: module '_arch_factory' has no 'missing'$"),
    ("_arch_factory:NOT_CALLABLE", r"NOT_CALLABLE is a int, not a callable returning an nn.Module$"),
    ("_arch_factory:not_a_module", r"not_a_module\(\) returned a int, not an nn.Module$"),
    ("_arch_factory:broken", r"calling broken\(\) failed \(RuntimeError: the factory could not build\)$"),
])
def test_factory_failures_are_one_line(arch, message):
    with pytest.raises(models.ArchitectureError, match=message) as error:
        models.build(arch)
    assert "\n" not in str(error.value)


def test_a_factory_takes_no_torchvision_weights_and_no_class_count():
    with pytest.raises(ValueError, match=r"--weights torchvision is for torchvision's builders"):
        models.build("_arch_factory:tiny", "torchvision")
    with pytest.raises(ValueError, match=r"num_classes is for the zoo and torchvision's builders"):
        models.build("_arch_factory:tiny", num_classes=3)


# -- --weights torchvision -------------------------------------------------------------------------


def test_torchvision_weights_come_from_the_hub_cache(hub, no_network):
    name = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    assert models.TORCHVISION_FILES["squeezenet1_1"] == name == "squeezenet1_1-b8a52dc0.pth"
    with pytest.raises(FileNotFoundError) as error:
        models.build("squeezenet1_1", "torchvision")
    assert str(error.value) == (f"squeezenet1_1: torchvision's weights are not in the local cache; nothing is downloaded. "
                                f"Put {name} at {hub / name} (or pass its path as weights)")
    hub.mkdir(parents=True)
    saved = models.build("squeezenet1_1", seed=6).state_dict()
    torch.save(saved, hub / name)
    model = models.build("squeezenet1_1", "torchvision", seed=0)  # (the seed does not matter: the file does)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.slow
def test_googlenet_with_its_weights_is_configured_as_torchvision_configures_it(hub, no_network):
    """torchvision's builder, given its weights, normalises the input its own way and drops the
    auxiliary classifiers once the file (which holds them) is in."""
    file = hub / models.TORCHVISION_FILES["googlenet"]
    file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    full = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    torch.save(full.state_dict(), file)
    model = models.build("googlenet", "torchvision")
    assert model.transform_input and not model.aux_logits and model.aux1 is None and model.aux2 is None
    assert torch.equal(model.conv1.conv.weight, full.conv1.conv.weight)
    with pytest.raises(ValueError, match=r"torchvision's weights have 1000 classes, not 10"):
        models.build("googlenet", "torchvision", num_classes=10)


# -- input size --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, resize, crop", [
    ("zfnet", 256, 224), ("alexnet", 256, 224), ("vgg16", 256, 224), ("vgg16_bn", 256, 224),
    ("resnet50", 232, 224),  # torchvision's second ResNet-50 recipe (its default weights)
    ("mobilenet_v2", 232, 224), ("googlenet", 256, 224), ("inception_v3", 342, 299), ("_arch_factory:tiny", 256, 224),
])
def test_evaluation_sizes_follow_the_model(arch, resize, crop):
    assert models.eval_transform(arch) == models.EvalTransform(resize=resize, crop=crop, interpolation="bilinear")


# -- default layers --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, want", [
    ("resnet18", ["layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]),
    # Bottlenecks: blocks 3, 4, 6, 3, each ending in its third ReLU
    ("resnet50", ["layer1.2.relu_2", "layer2.3.relu_2", "layer3.5.relu_2", "layer4.2.relu_2"]),
    ("mobilenet_v2", ["features.0", "features.3.conv.1", "features.6.conv.1", "features.13.conv.1", "features.18"]),
    ("squeezenet1_1", ["features.1", "features.4.cat", "features.7.cat", "features.12.cat"]),  # Fire modules' outputs
    pytest.param("vgg16_bn", [f"features.{i}" for i in (5, 12, 22, 32, 42)], marks=pytest.mark.slow),  # 42: conv5_3's ReLU
    pytest.param("densenet121", ["features.transition1.relu", "features.transition2.relu", "features.transition3.relu",
                                 "relu"], marks=pytest.mark.slow),
    ("_arch_factory:Strided", ["relu", "relu_1"]),  # no family: the last at each resolution
])
def test_default_layers_are_few_rectified_stage_outputs(arch, want):
    model = models.build(arch, seed=0, **({} if ":" in arch else {"num_classes": 10})).eval()
    layers = models.default_layers(arch, model)
    assert layers == want
    nodes = get_graph_node_names(model, suppress_diff_warning=True)[1]
    assert set(layers) <= set(nodes) and len(layers) <= 8
    # Each is a ReLU's output, deeper ones at coarser resolutions (a forward at a small size).
    with torch.no_grad():
        outputs = create_feature_extractor(model, return_nodes=layers, suppress_diff_warning=True)(torch.randn(1, 3, 96, 96))
    sizes = [outputs[name].shape[-1] for name in layers]
    assert sizes == sorted(sizes, reverse=True)
    assert all(bool((outputs[name] >= 0).all()) and bool((outputs[name] > 0).any()) for name in layers)


def test_the_zoo_keeps_every_conv_layer_by_default():
    assert models.default_layers("zfnet", models.build("zfnet", seed=0)) == ["conv1", "conv2", "conv3", "conv4", "conv5"]


# -- the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["visualize"], ["occlusion", "x.jpg"], ["invariance", "x.jpg"],
                                     ["correspondence", "--images", "a.jpg", "b.jpg", "--parts", "p.json"],
                                     ["filters"]])
def test_a_misspelt_arch_is_one_line_with_close_names(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--arch", "resnt50", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"zfk {command[0]}: error: argument --arch: unknown architecture 'resnt50'; did you mean resnet50" in err
    assert not (tmp_path / "out").exists()


def test_a_network_the_engine_refuses_and_a_broken_factory_are_one_line(tmp_path, capsys):
    for arch, message in (("_arch_factory:softplus_module", "--arch _arch_factory:softplus_module: the deconvnet cannot "
                                                            "run this network: "),
                          ("_arch_factory:missing", "--arch: _arch_factory:missing: module '_arch_factory' has no 'missing'")):
        status = cli.main(["visualize", "--arch", arch, "--out", str(tmp_path / arch.replace(":", "-")), "--device", "cpu",
                           "--workers", "0", "--quiet"])
        err = capsys.readouterr().err
        assert status == 2 and f"zfk visualize: error: {message}" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("text, arch, weights", [
    ("alexnet", "alexnet", None),
    ("alexnet:torchvision", "alexnet", "torchvision"),
    ("resnet50:/models/r50.pth", "resnet50", "/models/r50.pth"),
    ("_arch_factory:tiny", "_arch_factory:tiny", None),  # a factory keeps its colon
    ("mypkg.nets:build:mine.pth", "mypkg.nets:build", "mine.pth"),  # its weights after a second one
    ("mypkg.nets:build:/w/a:b.pth", "mypkg.nets:build", "/w/a:b.pth"),
])
def test_filters_compare_takes_any_arch_and_its_weights(text, arch, weights):
    from zfkernels.diagnostics.filters import parse_compare

    spec = parse_compare(text)
    assert (spec.arch, spec.weights) == (arch, weights)


@pytest.mark.parametrize("text", ["resnt50", "resnt50:torchvision", "resnt50:weights.pth"])
def test_filters_compare_refuses_a_misspelt_arch_with_close_names(text):
    from zfkernels.diagnostics.filters import parse_compare
    from zfkernels.errors import UsageError

    with pytest.raises(UsageError, match=r"^--compare: unknown architecture 'resnt50'; did you mean resnet50"):
        parse_compare(text)
