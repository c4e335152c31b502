"""The paper's training recipe (Zeiler & Fergus 2013, Section 3), as ``zfk train`` runs it:
the hyperparameters, the initialisation, SGD with momentum, the learning rate of every step
(a warm-up, then drops on a validation plateau), and the renormalisation of conv filters after
every step."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

from .bounds import FieldError, check_fields, shown


@dataclass(frozen=True)
class Recipe:
    """Every number of the recipe. Defaults are the paper's where it gives one and where it
    learns: minibatch 128, learning rate 1e-2, momentum 0.9, dropout 0.5, filter radius 1e-1,
    70 epochs. The paper gives no weight decay; 5e-4 is AlexNet's (Krizhevsky et al. 2012),
    which the paper follows. What differs from the paper, and why, is in docs/train.md:
    the initialisation (``init``), a linear warm-up of the rate over the first ``warmup`` steps,
    and the plateau rule (``plateau_patience`` epochs without a lower validation error drop the
    rate by ``plateau_factor``; the paper anneals "manually ... when the validation error
    plateaus"), which starts counting when the warm-up ends. :data:`PAPER` is the paper's recipe
    itself. Every number is checked against :data:`zfkernels.train.bounds.BOUNDS`."""

    epochs: int = 70
    batch_size: int = 128
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    renorm: float = 0.1
    init: str = "kaiming"
    init_std: float = 1e-2
    warmup: int = 16
    plateau_patience: int = 3
    plateau_factor: float = 0.1

    def __post_init__(self) -> None:
        check_fields({name: value for name, value in self.as_dict().items() if not (name == "lr" and value is None)})
        if self.init not in INITS:
            raise FieldError("init", f"must be one of {', '.join(INITS)}, got {shown(self.init)}")

    @property
    def rate(self) -> float:
        """The learning rate after the warm-up and before any plateau drop: ``lr``, or without
        one the paper's 1e-2 at its minibatch of 128 scaled linearly to ``batch_size``
        (Goyal et al. 2017's rule: the same step per image seen; 1.25e-3 at 16)."""
        return self.lr if self.lr is not None else PAPER_LR * self.batch_size / PAPER_BATCH

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


PAPER_LR, PAPER_BATCH = 1e-2, 128
INITS = ("kaiming", "paper", "torchvision")
# The paper's own recipe (``zfk train --recipe paper``): its rate whatever the minibatch, its
# initialisation, no warm-up.
PAPER: Dict[str, object] = {"lr": PAPER_LR, "init": "paper", "warmup": 0}


def initialise(model: nn.Module, init: str, std: float) -> None:
    """Initialise ``model``'s conv and linear layers, drawing from the global torch RNG (the
    caller seeds it); every bias 0 except under ``"torchvision"``.

    - ``"kaiming"`` (the default): He et al.'s N(0, 2 / fan-in) for the conv layers, which keeps
      the signal's scale through them (conv1's filters start at RMS 0.117, and the first
      renormalisation brings them to 0.1), and LeCun's N(0, 1 / fan-in) for the linear layers
      (fc6, fc7, fc8: 0.0104, 0.0156, 0.0156 at full size). He et al.'s rule on fc6 and fc7 too
      made the first step at the paper's rate overshoot (the loss jumped to 28) and the network
      never recovered; a fixed N(0, 0.01) learns at full size, but at a quarter width its fc
      layers start 2 to 3 times smaller than LeCun's and learn too slowly (docs/train.md);
    - ``"paper"``: every weight from N(0, ``std``), the paper's 1e-2. Through eight layers this
      shrinks the signal about 3000-fold (each layer multiplies its scale by about
      ``std * sqrt(fan_in) / sqrt(2)``), so learning starts only after a long plateau;
    - ``"torchvision"``: the layers' own PyTorch defaults, left as constructed."""
    if init not in INITS:
        raise ValueError(f"initialise: init must be one of {', '.join(INITS)}, not {init!r}")
    if init == "torchvision":
        return
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module in layers:
        if init == "paper":
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):  # LeCun's N(0, 1 / fan-in): a gain of 1, not a ReLU's 2
            nn.init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
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
    return torch.optim.SGD(model.parameters(), lr=recipe.rate, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


@dataclass
class Schedule:
    """The learning rate of every step: ``lr`` x the warm-up's ramp x ``plateau_factor`` to the
    number of ``drops``. The ramp rises linearly over the first ``warmup`` steps of the run,
    ``(step + 1) / warmup``, and is 1 after them. The plateau rule is ``ReduceLROnPlateau``'s
    (mode ``min``, no cooldown) on the validation top-1 error, once an epoch, but it acts only on
    epochs that end after the warm-up: an epoch counts as bad when its error is not below the
    lowest so far, and ``plateau_patience + 1`` bad epochs in a row drop the rate. ``best``,
    ``bad_epochs`` and ``drops`` are the whole state (saved with the run)."""

    best: float = math.inf
    bad_epochs: int = 0
    drops: int = 0

    def lr(self, recipe: Recipe, step: int) -> float:
        """The rate of global step ``step`` (0-based, counted over the whole run)."""
        ramp = min(1.0, (step + 1) / recipe.warmup) if recipe.warmup else 1.0
        return recipe.rate * ramp * recipe.plateau_factor ** self.drops

    def epoch_end(self, recipe: Recipe, error: float, steps_done: int) -> None:
        """Count the epoch that ended after ``steps_done`` steps of the run, with validation top-1
        ``error``."""
        if steps_done < recipe.warmup:  # the rate is still rising: an error that does not fall yet is no plateau
            return
        if error < self.best:
            self.best, self.bad_epochs = error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > recipe.plateau_patience:
            self.drops, self.bad_epochs = self.drops + 1, 0

    def state_dict(self) -> Dict[str, object]:
        return asdict(self)
