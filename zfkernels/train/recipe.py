"""The paper's training recipe (Zeiler & Fergus 2013, Section 3), as ``zfk train`` runs it:
the hyperparameters, the initialisation, SGD with momentum, the learning-rate drop on a
validation plateau, and the renormalisation of conv filters after every step."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterator

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Recipe:
    """Every number of the recipe. Defaults are the paper's where it gives one: minibatch 128,
    learning rate 1e-2, momentum 0.9, dropout 0.5, filter radius 1e-1, 70 epochs. The paper gives
    no weight decay; 5e-4 is AlexNet's (Krizhevsky et al. 2012), which the paper follows.
    ``plateau_patience`` epochs without a better validation error drop the rate by
    ``plateau_factor`` (the paper anneals "manually ... when the validation error plateaus")."""

    epochs: int = 70
    batch_size: int = 128
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    renorm: float = 0.1
    init: str = "kaiming"
    init_std: float = 1e-2
    plateau_patience: int = 3
    plateau_factor: float = 0.1

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


INITS = ("kaiming", "paper", "torchvision")


def initialise(model: nn.Module, init: str, std: float) -> None:
    """Initialise ``model``'s conv and linear layers, drawing from the global torch RNG (the
    caller seeds it); every bias 0 except under ``"torchvision"``.

    - ``"paper"``: every weight from N(0, ``std``), the paper's 1e-2. Through eight layers this
      shrinks the signal about 3000-fold (each layer multiplies its scale by about
      ``std * sqrt(fan_in) / sqrt(2)``), so learning starts only after a long plateau;
    - ``"kaiming"`` (the default): He et al.'s N(0, 2 / fan_in) for the layers followed by a
      ReLU, which keeps the scale through the depth, and N(0, ``std``) for the last linear
      layer (the classifier), as the paper;
    - ``"torchvision"``: the layers' own PyTorch defaults, left as constructed."""
    if init not in INITS:
        raise ValueError(f"initialise: init must be one of {', '.join(INITS)}, not {init!r}")
    if init == "torchvision":
        return
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, module in enumerate(layers):
        if init == "paper" or i == len(layers) - 1:
            nn.init.normal_(module.weight, mean=0.0, std=std)
        else:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def conv_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """The weight of every ``nn.Conv2d`` of ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            yield module.weight


@torch.no_grad()
def renormalise_filters(model: nn.Module, radius: float) -> None:
    """The paper's renormalisation: each conv filter (one output channel's weights, over all its
    input channels and taps) whose RMS exceeds ``radius`` is scaled down to RMS ``radius``;
    the others, and biases, are left alone. ``radius <= 0`` does nothing."""
    if radius <= 0:
        return
    for weight in conv_weights(model):
        # RMS in float32 at least (a bf16 mean of thousands of squares would round coarsely).
        rms = weight.detach().float().pow(2).mean(dim=tuple(range(1, weight.dim())), keepdim=True).sqrt()
        # Only filters strictly above the radius are touched, so a filter at the radius keeps its bits.
        scale = torch.where(rms > radius, radius / rms, torch.ones_like(rms))
        weight.mul_(scale.to(weight.dtype))


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with the recipe's momentum and weight decay on every parameter (as AlexNet's)."""
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The automatic annealing: x``plateau_factor`` when the validation top-1 error has not
    improved for ``plateau_patience`` epochs (stepped with that error once per epoch)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=recipe.plateau_factor,
                                                      patience=recipe.plateau_patience)
