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


# -- networks the deconvnet refuses (issue #18), each beside a twin it accepts ----------------------
#
# A stem (conv, ReLU), then ``part``, then a head conv: ``part`` holds the one operation under test,
# in a submodule of that name, so that its nodes are named ``part.…`` by torchvision's
# feature-extraction tracer (``part`` alone for a leaf module).

import torch  # noqa: E402 (the factories above need only torch.nn)


class Refusable(nn.Module):
    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.part = part
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.part(nn.functional.relu(self.stem(x))))


class DataDependentBranch(nn.Module):
    """``if x.sum() > 0``: which way the forward goes depends on the data (node ``part.gt``)."""

    def forward(self, x):
        if x.sum() > 0:
            return nn.functional.gelu(x)
        return x


class StraightLine(nn.Module):
    """The accepted twin of :class:`DataDependentBranch`: the same activation, no branch."""

    def forward(self, x):
        return nn.functional.gelu(x)


class Bilinear(nn.Module):
    """``x * conv(x)``: a product of two data tensors that is not a gate (node ``part.mul``):
    neither factor is a sigmoid or hard-sigmoid, so no rule says which one to freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * self.conv(x)


class HandGate(Bilinear):
    """The accepted twin of :class:`Bilinear`: ``x * sigmoid(conv(x))``, a squeeze-excitation-like
    gate written by hand."""

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class FunctionalSoftplus(nn.Module):
    """``F.softplus``: an activation no rule covers (node ``part.softplus``)."""

    def forward(self, x):
        return nn.functional.softplus(x)


class FunctionalSilu(nn.Module):
    """The accepted twin of :class:`FunctionalSoftplus`."""

    def forward(self, x):
        return nn.functional.silu(x)


class _MemoryEfficientSwish(torch.autograd.Function):
    """x·σ(x) with a hand-written backward, as some EfficientNet ports write their activation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


def custom_swish(x):
    return _MemoryEfficientSwish.apply(x)


torch.fx.wrap("custom_swish")  # a call the tracer records as is (else it traces into forward)


class CustomFunction(nn.Module):
    """A custom autograd function called as an activation (node ``part.custom_swish``): the
    engine cannot know what its backward does, so it must refuse it."""

    def forward(self, x):
        return custom_swish(x)


def _refusable(part: nn.Module) -> nn.Module:
    return Refusable(part).eval()


def data_dependent_branch() -> nn.Module:
    return _refusable(DataDependentBranch())


def straight_line() -> nn.Module:
    return _refusable(StraightLine())


def bilinear() -> nn.Module:
    return _refusable(Bilinear())


def hand_gate() -> nn.Module:
    return _refusable(HandGate())


def softplus_module() -> nn.Module:
    return _refusable(nn.Softplus())


def silu_module() -> nn.Module:
    return _refusable(nn.SiLU())


def softplus_function() -> nn.Module:
    return _refusable(FunctionalSoftplus())


def silu_function() -> nn.Module:
    return _refusable(FunctionalSilu())


def custom_function() -> nn.Module:
    return _refusable(CustomFunction())
