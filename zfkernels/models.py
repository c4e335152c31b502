"""A thin model zoo: ZFNet exactly as the paper's Figure 3, AlexNet and VGG16 in torchvision's
module layout (so torchvision state dicts load and give torchvision's logits).

Every model has ``.features`` (an ``nn.Sequential`` of ``Conv2d``, ``ReLU``, ``MaxPool2d`` and
normalisation modules, in forward order), ``.avgpool`` and ``.classifier``, like torchvision.
Nothing is downloaded: ``weights`` is a local file, or ``"torchvision"`` for torchvision's own
file already in the local torch hub cache.
"""

from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn
import torchvision

WeightsArg = Optional[Union[str, Path]]

# torchvision's file names for its ImageNet weights (torchvision.models.*_Weights.IMAGENET1K_V1).
TORCHVISION_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth"}


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


def build(arch: str, weights: WeightsArg = None, *, seed: Optional[int] = None) -> nn.Module:
    """``build("zfnet" | "alexnet" | "vgg16", weights)``: the zoo by name."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](weights=weights, seed=seed)


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
