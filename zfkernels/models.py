"""The models: a thin zoo and a registry of every network ``--arch`` can name.

The zoo is ZFNet exactly as the paper's Figure 3, AlexNet and VGG16 in torchvision's module
layout (so torchvision state dicts load and give torchvision's logits). Each zoo model has
``.features`` (an ``nn.Sequential`` of ``Conv2d``, ``ReLU``, ``MaxPool2d`` and normalisation
modules, in forward order), ``.avgpool`` and ``.classifier``, like torchvision.

:func:`build` also takes any torchvision classification builder (``resnet50``, ``vgg16_bn``,
``densenet121`` …, ``torchvision.models.list_models(module=torchvision.models)``) and
``module.path:callable``, a user's factory returning an ``nn.Module``. Whether the deconvnet
can run a network is the engine's decision, not the registry's.

Nothing is downloaded: ``weights`` is a local file, or ``"torchvision"`` for torchvision's own
file of the builder's default ImageNet weights, already in the local torch hub cache.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torchvision

WeightsArg = Optional[Union[str, Path]]



@functools.lru_cache(maxsize=None)
def torchvision_classifiers() -> Tuple[str, ...]:
    """The names of torchvision's classification builders, sorted (``resnet50``, ``vgg16_bn`` …)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def torchvision_default_weights(arch: str) -> "torchvision.models.WeightsEnum":
    """The builder's default ImageNet weights entry (``ResNet50_Weights.IMAGENET1K_V2`` for
    ``resnet50``): its file name, categories and evaluation transform."""
    return torchvision.models.get_model_weights(arch).DEFAULT


class _TorchvisionFiles(Mapping):
    """Builder name -> the file name torchvision saves its default ImageNet weights under in
    ``torch.hub.get_dir()/checkpoints`` (e.g. ``resnet50-11ad3fa6.pth``), read from the weights
    entry's URL (nothing is fetched)."""

    def __getitem__(self, arch: str) -> str:
        if arch not in torchvision_classifiers():
            raise KeyError(arch)
        return torchvision_default_weights(arch).url.rsplit("/", 1)[-1]

    def __iter__(self) -> Iterator[str]:
        return iter(torchvision_classifiers())

    def __len__(self) -> int:
        return len(torchvision_classifiers())


TORCHVISION_FILES: Mapping[str, str] = _TorchvisionFiles()


class ZFNet(nn.Module):
    """Zeiler & Fergus (2013), Figure 3, for 224x224 inputs.

    conv1 96 7x7/2 pad 1 -> 110x110; max pool 3x3/2 (ceil) -> 55x55; contrast normalisation;
    conv2 256 5x5/2 -> 26x26; max pool 3x3/2 (ceil) -> 13x13; contrast normalisation;
    conv3 384 3x3 pad 1, conv4 384 3x3 pad 1, conv5 256 3x3 pad 1 -> 13x13; max pool 3x3/2 -> 6x6;
    fc6 4096, fc7 4096 (ReLU, dropout 0.5), fc8 ``num_classes``.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # 224 -> 110
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),  # 110 -> 55
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(96, 256, kernel_size=5, stride=2),  # 55 -> 26
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),  # 26 -> 13
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 13 -> 6
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))  # identity at 224x224; other sizes still fit fc6
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@contextmanager
def channels_last(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in channels-last layout inside the block (faster convolutions on CPU and
    GPU; feed it channels-last inputs), and put it back in the default layout afterwards."""
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _construct(factory: Callable[[], nn.Module], seed: Optional[int]) -> nn.Module:
    """Build under a fixed seed (without disturbing the caller's RNG) when one is given."""
    if seed is None:
        return factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def zfnet(num_classes: int = 1000, weights: WeightsArg = None, *, seed: Optional[int] = None) -> ZFNet:
    """ZFNet as in the paper's Figure 3; ``weights`` a state-dict file (see :func:`load_weights`)."""
    model = _construct(lambda: ZFNet(num_classes), seed)
    if weights is not None:
        if str(weights) == "torchvision":
            raise ValueError("zfnet: torchvision has no ZFNet weights; pass a .pth/.pt file")
        load_weights(model, weights, "zfnet")
    return model


def alexnet(weights: WeightsArg = None, *, num_classes: int = 1000, seed: Optional[int] = None) -> nn.Module:
    """AlexNet in torchvision's layout; ``weights="torchvision"`` uses torchvision's cached file."""
    model = _construct(lambda: torchvision.models.alexnet(weights=None, num_classes=num_classes), seed)
    if weights is not None:
        load_weights(model, weights, "alexnet")
    return model


def vgg16(weights: WeightsArg = None, *, num_classes: int = 1000, seed: Optional[int] = None) -> nn.Module:
    """VGG16 (no batch norm) in torchvision's layout; ``weights="torchvision"`` as for AlexNet."""
    model = _construct(lambda: torchvision.models.vgg16(weights=None, num_classes=num_classes), seed)
    if weights is not None:
        load_weights(model, weights, "vgg16")
    return model


ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {"zfnet": zfnet, "alexnet": alexnet, "vgg16": vgg16}

# module.path:callable, each part a dotted Python identifier.
FACTORY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")

# What torchvision's builders set when they load their own ImageNet weights, beyond num_classes:
# these two normalise the input their way and load (then drop) the auxiliary classifiers.
TORCHVISION_WEIGHTS_OPTIONS: Dict[str, Dict[str, bool]] = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
AUXILIARY_CLASSIFIERS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


class ArchitectureError(ValueError):
    """An architecture name that gives no network: unknown, or a factory that cannot be
    imported, called, or returns no ``nn.Module`` (one line)."""


def architectures() -> List[str]:
    """Every architecture name :func:`build` knows: the zoo, then torchvision's classification
    builders (``module.path:callable`` factories come on top)."""
    return list(ARCHITECTURES) + [name for name in torchvision_classifiers() if name not in ARCHITECTURES]


def check_arch(arch: str) -> str:
    """``arch`` when :func:`build` can take it (a zoo name, a torchvision classification builder
    or ``module.path:callable``); otherwise a one-line :class:`ArchitectureError` with the
    closest names."""
    if arch in ARCHITECTURES or arch in torchvision_classifiers() or FACTORY.match(arch):
        return arch
    close = difflib.get_close_matches(arch.lower(), architectures(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ArchitectureError(f"unknown architecture {arch!r}; {hint}give zfnet, alexnet, vgg16, a torchvision classification "
                     f"builder (resnet50, vgg16_bn, densenet121 …) or module.path:callable")


def is_zoo(arch: str) -> bool:
    """The zoo's own networks (``.features`` stacks, layer aliases conv1 …)."""
    return arch in ARCHITECTURES


def build(arch: str, weights: WeightsArg = None, *, seed: Optional[int] = None,
          num_classes: Optional[int] = None) -> nn.Module:
    """The network ``arch`` names: ``zfnet``/``alexnet``/``vgg16`` (the zoo), any torchvision
    classification builder (``resnet50`` …, built with ``weights=None``), or
    ``module.path:callable`` (the module imported, the callable called with no arguments; it
    must return an ``nn.Module``). Random weights come from ``seed`` when given (the caller's
    RNG untouched); ``weights`` is a state-dict file, or ``"torchvision"`` for the builder's
    default ImageNet file in the local hub cache (:func:`load_weights`; never downloaded).
    ``num_classes`` (zoo and torchvision builders) defaults to 1000. Every mistake is a
    one-line ``ValueError`` or ``FileNotFoundError``."""
    check_arch(arch)
    if is_zoo(arch):
        return ARCHITECTURES[arch](weights=weights, seed=seed, **({} if num_classes is None else {"num_classes": num_classes}))
    if arch in torchvision_classifiers():
        return _torchvision_model(arch, weights, seed, num_classes)
    if num_classes is not None:
        raise ValueError(f"{arch}: num_classes is for the zoo and torchvision's builders; a factory decides its own")
    model = _construct(lambda: _call_factory(arch), seed)
    if weights is not None:
        if str(weights) == "torchvision":
            raise ValueError(f"{arch}: --weights torchvision is for torchvision's builders; give a state-dict file")
        load_weights(model, weights, arch)
    return model


def _torchvision_model(arch: str, weights: WeightsArg, seed: Optional[int], num_classes: Optional[int]) -> nn.Module:
    """A torchvision builder's network; with its own weights, configured as the builder does."""
    own = weights is not None and str(weights) == "torchvision"
    options: Dict[str, object] = {}
    if num_classes is not None:
        if own and num_classes != len(torchvision_default_weights(arch).meta["categories"]):
            raise ValueError(f"{arch}: torchvision's weights have {len(torchvision_default_weights(arch).meta['categories'])} "
                             f"classes, not {num_classes}")
        options["num_classes"] = num_classes
    if own:
        options.update(TORCHVISION_WEIGHTS_OPTIONS.get(arch, {}))
    elif "init_weights" in TORCHVISION_WEIGHTS_OPTIONS.get(arch, {}):
        options["init_weights"] = True  # torchvision's default, said out loud (it warns when left unset)
    if arch.startswith("vit_"):
        # A ViT's position embedding fixes its input size: build it for its weights' own crop
        # (518 for vit_h_14's SWAG weights), so that random init and torchvision's file agree.
        options["image_size"] = eval_transform(arch).crop
    model = _construct(lambda: torchvision.models.get_model(arch, weights=None, **options), seed)
    if weights is not None:
        load_weights(model, weights, arch)
    if own:  # as the builder does once its weights are in: the auxiliary classifiers go
        for name in AUXILIARY_CLASSIFIERS.get(arch, ()):
            setattr(model, name, None)
        if arch in AUXILIARY_CLASSIFIERS:
            model.aux_logits = False
    return model


def _call_factory(arch: str) -> nn.Module:
    """``module.path:callable`` -> the module its callable returns (each failure one line)."""
    module_name, attribute = FACTORY.match(arch).groups()
    try:
        target: object = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises while importing
        raise ArchitectureError(f"{arch}: cannot import module {module_name!r} ({type(error).__name__}: {error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ArchitectureError(f"{arch}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ArchitectureError(f"{arch}: {attribute} is a {type(target).__name__}, not a callable returning an nn.Module")
    try:
        model = target()
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else ""
        raise ArchitectureError(f"{arch}: calling {attribute}() failed ({type(error).__name__}: {message})") from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{arch}: {attribute}() returned a {type(model).__name__}, not an nn.Module")
    return model


@dataclass(frozen=True)
class EvalTransform:
    """A network's ImageNet evaluation transform: resize the shorter side to ``resize`` (with
    ``interpolation``), centre-crop ``crop`` x ``crop``."""

    resize: int
    crop: int
    interpolation: str = "bilinear"


ZOO_TRANSFORM = EvalTransform(resize=256, crop=224)


def eval_transform(arch: str) -> EvalTransform:
    """The evaluation transform ``arch``'s network expects: for torchvision's builders, the one
    of their default ImageNet weights (``weights.transforms()``: 256/224 for most, 232/224 for
    the ResNets' second recipe, 342/299 for Inception v3); 256/224 for ZFNet and factories."""
    check_arch(arch)
    if arch not in torchvision_classifiers():
        return ZOO_TRANSFORM
    preset = torchvision_default_weights(arch).transforms()  # torchvision's ImageClassification preset
    return EvalTransform(resize=int(preset.resize_size[0]), crop=int(preset.crop_size[0]),
                         interpolation=str(preset.interpolation.value))


# -- default layers ----------------------------------------------------------------------------


def output_shapes(model: nn.Module, layers: List[str], size: int = 224) -> Dict[str, Tuple[int, ...]]:
    """``(C, H, W)`` (or whatever it is) of each named node's output for a ``size`` x ``size``
    image, from a forward on the meta device: no arithmetic, and ``model`` left as it was."""
    from torchvision.models.feature_extraction import create_feature_extractor

    was_training = model.training
    try:
        extractor = create_feature_extractor(model.eval(), return_nodes=layers, suppress_diff_warning=True)
    finally:
        model.train(was_training)
    meta = {key: torch.empty_like(value, device="meta") for key, value in
            list(extractor.named_parameters()) + list(extractor.named_buffers())}
    with torch.no_grad():
        outputs = torch.func.functional_call(extractor, meta, (torch.empty(1, 3, size, size, device="meta"),))
    return {name: tuple(outputs[name].shape[1:]) for name in layers}


def _before_each_max_pool(model: nn.Module) -> List[str]:
    """``features.i`` for the child before each max pool of ``model.features``, and its last
    child when that is no pool (VGG's blocks, SqueezeNet's stages)."""
    children = list(model.features.children())
    ends = [i - 1 for i, child in enumerate(children) if isinstance(child, nn.MaxPool2d) and i > 0]
    if not isinstance(children[-1], nn.MaxPool2d):
        ends.append(len(children) - 1)
    return [f"features.{i}" for i in ends]


# Each torchvision family's stages, as the modules (node-name prefixes) whose last node is the
# stage's output, and whether that is the last rectified node (the ReLU families, as before issue
# #18) or the last node of any kind (a block output); the table in docs/models.md shows each.
STAGES: List[Tuple[str, Callable[[nn.Module], List[str]], bool]] = [
    (r"(resnet|resnext|wide_resnet)\d", lambda m: ["layer1", "layer2", "layer3", "layer4"], True),
    (r"vgg\d", _before_each_max_pool, True),
    (r"squeezenet", _before_each_max_pool, True),
    (r"densenet", lambda m: ["features.transition1", "features.transition2", "features.transition3", "relu"], True),
    (r"mobilenet_v2", lambda m: ["features.0", "features.3", "features.6", "features.13", "features.18"], True),
    (r"googlenet", lambda m: ["conv1", "conv3", "inception3b", "inception4e", "inception5b"], True),
    (r"inception_v3", lambda m: ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"], True),
    (r"shufflenet_v2", lambda m: ["conv1", "stage2", "stage3", "stage4", "conv5"], True),
    (r"regnet_", lambda m: ["stem", "trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"], True),
    # issue #18: block outputs (residual adds, channels-last grids, token grids)
    (r"efficientnet_b", lambda m: ["features.1", "features.2", "features.3", "features.5", "features.8"], False),
    (r"efficientnet_v2", lambda m: ["features.1", "features.2", "features.3", "features.5", "features.7"], False),
    (r"mobilenet_v3", lambda m: [f"features.{i}" for i in ((0, 1, 3, 8, 12) if len(m.features) == 13
                                                           else (1, 3, 6, 12, 16))], False),
    (r"convnext_", lambda m: ["features.1", "features.3", "features.5", "features.7"], False),
    (r"swin_", lambda m: ["features.1", "features.3", "features.5", "features.7"], False),
    (r"vit_", lambda m: [f"encoder.layers.encoder_layer_{(len(m.encoder.layers) * q) // 4 - 1}" for q in (1, 2, 3, 4)], False),
    (r"maxvit_", lambda m: ["stem"] + [f"blocks.{i}" for i in range(len(m.blocks))], False),
]


def default_layers(arch: str, model: nn.Module) -> List[str]:
    """The layers ``zfk`` shows when ``--layers`` is not given. The zoo: every conv layer
    (``conv1`` …). A torchvision family: each stage's output, the last node inside each stage
    module of :data:`STAGES`: for the ReLU families the last rectified one (an activation's
    output, or a concatenation of them: ResNets' final ReLU of ``layer1`` … ``layer4``, VGG's
    ReLU before each max pool, DenseNet's transitions), for the families of issue #18 the
    stage's block output (ConvNeXt's and ViT's residual adds, Swin's channels-last grids). Any
    other network: the last rectified node at each spatial resolution. A few layers, not
    hundreds, as feature-extraction node names. A network the engine cannot run raises its
    ``ValueError``."""
    from .engine import graph_of

    if is_zoo(arch):
        return list(graph_of(model).layers)
    graph = graph_of(model)
    entry = next(((stages, rectified) for pattern, stages, rectified in STAGES if re.match(pattern, arch)), None)
    if entry is not None:
        stages, rectified = entry
        layers = graph.rectified_nodes if rectified else graph.nodes
        inside = lambda name, stage: name == stage or name.startswith(stage + ".")  # noqa: E731
        return [[name for name in layers if inside(name, stage)][-1] for stage in stages(model)]
    geometry = graph.geometry((eval_transform(arch).crop,) * 2)
    last: Dict[Tuple[int, ...], str] = {}
    for name in graph.rectified_nodes or graph.nodes:
        size = tuple(geometry.presented_shape(name)[1:])
        last.pop(size, None)  # (re-inserted: the order is that of each resolution's last node)
        last[size] = name
    return list(last.values())


def torchvision_weights_path(arch: str) -> Path:
    """Where torchvision keeps its downloaded file for ``arch`` (the local torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[arch]


def _state_dict_from(obj: object, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: not a state dict (nor a checkpoint with a 'state_dict' or 'model' entry)")
    # Checkpoints saved from DataParallel / DDP prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_failure(path: Path, error: Exception) -> str:
    """One line on why ``torch.load`` failed: not a PyTorch file at all, or a file holding
    objects that ``weights_only=True`` refuses (torch's message runs over many lines)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty"
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(b"PK\x03\x04") and not is_zip:
        # A zip archive keeps its directory at its end: one that starts as a zip but has no
        # directory was cut short (an interrupted download or save), not some other format.
        return "the file is truncated or corrupt (a zip archive without its end)"
    if not is_zip and not head.startswith(b"\x80"):
        return "not a PyTorch weights file (torch.save writes a zip archive)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(error).__name__)
    if isinstance(error, EOFError) or "unexpected EOF" in str(error) or "corrupt" in str(error).lower():
        return f"the file is truncated or corrupt ({detail})"
    if "weights_only" in str(error) or "Unsupported global" in str(error):
        return f"it holds more than tensors, which weights_only=True refuses ({detail})"
    return f"{type(error).__name__}: {detail}"


def load_weights(model: nn.Module, weights: Union[str, Path], arch: str) -> nn.Module:
    """Load a state dict (or a checkpoint holding one under ``state_dict`` / ``model``) from a
    ``.pth``/``.pt`` file with ``torch.load(weights_only=True)``. Keys that are missing,
    unexpected or of another shape are all named in one ``ValueError``."""
    if str(weights) == "torchvision":
        if arch not in TORCHVISION_FILES:
            raise ValueError(f"{arch}: torchvision has no weights for this architecture")
        path = torchvision_weights_path(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"{arch}: torchvision's weights are not in the local cache; nothing is downloaded. "
                f"Put {TORCHVISION_FILES[arch]} at {path} (or pass its path as weights)"
            )
    else:
        path = Path(weights)
        if path.is_dir():
            raise ValueError(f"{arch}: weights {path} is a folder, not a weights file (.pth/.pt)")
        if not path.exists():
            raise FileNotFoundError(f"{arch}: weights file {path} does not exist")
        if not path.is_file():  # a named pipe or a device: never opened, reading one can wait forever
            raise ValueError(f"{arch}: weights {path} is not a regular file (a named pipe or a device?); "
                             "pass a .pth/.pt file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or a corrupt file: say which file, and why
        raise ValueError(f"{arch}: cannot load weights from {path}: {_load_failure(path, error)}") from error
    state = _state_dict_from(loaded, f"{arch} weights {path}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        parts = [f"{arch}: weights {path} do not fit the architecture"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:12])}{' …' if len(keys) > 12 else ''}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state)
    return model


def untrained_warning(arch: str, seed: int) -> str:
    """The loud warning shown wherever a seeded random (untrained) network is used."""
    return (f"WARNING: no --weights given: using a seeded random {arch} (seed {seed}). It is UNTRAINED: the pictures "
            f"show what random filters respond to, not learned features. Pass --weights PATH for a trained network.")
