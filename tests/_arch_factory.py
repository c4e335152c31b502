"""Factories for ``--arch module.path:callable`` in the tests (``_arch_factory:tiny`` …)."""

from __future__ import annotations

import torch.nn as nn

NOT_CALLABLE = 5


class Tiny(nn.Module):
    """A small conv/ReLU/pool network in the zoo's layout (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def tiny() -> nn.Module:
    return Tiny()


class Strided(nn.Module):
    """Two stages at two resolutions, with functional ReLUs (no ``.features``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = nn.functional.relu(self.stem(x))
        x = self.down(x).relu()
        return self.head(x.mean((2, 3)))


def not_a_module() -> int:
    return 3


def broken() -> nn.Module:
    raise RuntimeError("the factory could not build\nits network")
