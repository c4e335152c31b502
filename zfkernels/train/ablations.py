"""The networks ``zfk train`` builds: ZFNet and AlexNet as in the zoo, and the paper's Table 3
ablations of ZFNet.

Table 3 ("Removed layers ...") trains ZFNet with some layers taken out:

============================== ================================================================
``zfnet-no-fc6-fc7``           fc6 and fc7 (with their ReLUs and dropouts) removed: fc8 reads
                               the 256x6x6 pool5 maps directly
``zfnet-no-conv3-conv4``       conv3 and conv4 (with their ReLUs) removed: conv5 reads conv2's
                               256 pooled maps, so it has 256 input channels instead of 384
``zfnet-no-conv3-conv4-fc6-fc7`` both of the above
============================== ================================================================

Every variant keeps the zoo's module layout (``.features``, ``.avgpool``, ``.classifier``), so
the deconvnet, ``zfk probe`` and the diagnostics' feature extractor take it as they take ZFNet;
its conv layers are named ``conv1``, ``conv2``, ``conv3`` by position, as the engine names them.
``zfnet`` and ``alexnet`` are the zoo's own classes (:class:`zfkernels.models.ZFNet`,
torchvision's AlexNet), so their checkpoints load unchanged in every ``zfk`` command.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional

import torch
import torch.nn as nn
import torchvision

from ..errors import UsageError
from ..models import ZFNet
from .bounds import MAX_SIDE, non_finite

# Removed layers of each ablation, by the paper's layer numbers (3, 4: conv3, conv4; 6, 7: fc6, fc7).
ABLATIONS: Dict[str, FrozenSet[int]] = {
    "zfnet-no-fc6-fc7": frozenset({6, 7}),
    "zfnet-no-conv3-conv4": frozenset({3, 4}),
    "zfnet-no-conv3-conv4-fc6-fc7": frozenset({3, 4, 6, 7}),
}


def _lrn() -> nn.Module:
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)  # as models.ZFNet


class AblatedZFNet(nn.Module):
    """ZFNet (:class:`zfkernels.models.ZFNet`, the paper's Figure 3) without the layers in
    ``removed`` (a subset of {3, 4, 6, 7}: conv3, conv4, fc6, fc7); every other layer as there.
    ``width`` scales every layer's filters or units (1: the paper's 96-256-384-384-256 and 4096)."""

    def __init__(self, removed: FrozenSet[int], num_classes: int = 1000, dropout: float = 0.5,
                 width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"AblatedZFNet: width must be positive, not {width}")

        def scaled(channels: int) -> int:
            return max(1, round(channels * width))

        if not removed <= {3, 4, 6, 7}:
            raise ValueError(f"AblatedZFNet: only layers 3, 4, 6 and 7 can be removed, not {sorted(removed - {3, 4, 6, 7})}")
        features: List[nn.Module] = [
            nn.Conv2d(3, scaled(96), kernel_size=7, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _lrn(),
            nn.Conv2d(scaled(96), scaled(256), kernel_size=5, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _lrn(),
        ]
        channels = scaled(256)
        for layer in (3, 4):
            if layer not in removed:
                features += [nn.Conv2d(channels, scaled(384), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = scaled(384)
        features += [nn.Conv2d(channels, scaled(256), kernel_size=3, padding=1), nn.ReLU(inplace=True),
                     nn.MaxPool2d(kernel_size=3, stride=2)]
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        inputs = scaled(256) * 6 * 6
        classifier: List[nn.Module] = []
        for layer in (6, 7):
            if layer not in removed:
                classifier += [nn.Dropout(p=dropout), nn.Linear(inputs, scaled(4096)), nn.ReLU(inplace=True)]
                inputs = scaled(4096)
        classifier.append(nn.Linear(inputs, num_classes))
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


TRAIN_ARCHITECTURES = ("zfnet", "alexnet") + tuple(ABLATIONS)


def build_network(arch: str, num_classes: int = 1000, dropout: float = 0.5, width: float = 1.0) -> nn.Module:
    """A freshly constructed (not yet initialised by the recipe) network named ``arch``, one of
    :data:`TRAIN_ARCHITECTURES`. ``zfnet`` at width 1 is the zoo's own class; AlexNet has no
    width but 1."""
    if arch not in TRAIN_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(TRAIN_ARCHITECTURES)}")
    if arch == "alexnet":
        if width != 1:
            raise ValueError("alexnet: only width 1 (torchvision's AlexNet) is built")
        return torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    if arch == "zfnet" and width == 1:
        return ZFNet(num_classes, dropout)
    return AblatedZFNet(ABLATIONS.get(arch, frozenset()), num_classes, dropout, width)


def smallest_input(model: nn.Module, largest: int) -> Optional[int]:
    """The side of the smallest square image ``model`` takes, up to ``largest`` (``None``: not
    even that). Each size is tried with a forward on the meta device (shapes only: no memory, no
    arithmetic of ours, ``model`` left as it is); larger inputs give larger maps, so a bisection
    finds it."""
    meta = {name: torch.empty_like(value, device="meta")
            for name, value in list(model.named_parameters()) + list(model.named_buffers())}

    def takes(side: int) -> bool:
        try:
            with torch.no_grad():
                torch.func.functional_call(model, meta, (torch.empty(1, 3, side, side, device="meta"),))
        except RuntimeError:  # "Output size is too small" at some pooling or convolution
            return False
        return True

    if not takes(largest):
        return None
    low, high = 1, largest  # takes(high) holds throughout
    while low < high:
        middle = (low + high) // 2
        if takes(middle):
            high = middle
        else:
            low = middle + 1
    return high


def check_crop(model: nn.Module, crop: int, name: str) -> None:
    """Refuse (:class:`UsageError`, naming ``--crop``) a crop smaller than ``model`` takes, before
    anything runs: not a failing forward after an epoch's decoding. ``name`` names the network."""
    smallest = smallest_input(model, MAX_SIDE)
    if smallest is None:
        raise UsageError(f"--crop {crop}: {name} takes no image up to {MAX_SIDE}x{MAX_SIDE} pixels")
    if crop < smallest:
        raise UsageError(f"--crop {crop}: {name} takes images of at least {smallest}x{smallest} pixels (smaller ones "
                         "leave a pooling layer nothing to pool)")


def check_finite(model: nn.Module, weights: object) -> None:
    """Refuse (:class:`UsageError`, naming ``--weights``) weights holding a NaN or an infinity: a
    run from them could only diverge, and a probe of them would be noise."""
    bad = non_finite(model.state_dict())
    if bad:
        raise UsageError(f"--weights {weights}: {bad[0]} holds NaN or infinite values"
                         f"{f' (and {len(bad) - 1} other tensors)' if len(bad) > 1 else ''}")
