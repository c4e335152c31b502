"""The range of every number of a training run, in one table.

The same :class:`Bound` checks a value wherever it comes from: ``zfk train``'s options (the
argparse types of :mod:`zfkernels.cli.train`), :class:`~zfkernels.train.recipe.Recipe` and
:class:`~zfkernels.train.loop.TrainConfig` on construction (so the Python API takes no run the
loop cannot finish either), and the configuration in a resumed ``train-state.pth``. A value out
of range is a ``ValueError`` that says the range and why it is bounded, before anything is
written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Union

import torch

Number = Union[int, float]


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` for an ``int`` or a finite ``float`` (``low_open``/``high_open``:
    that end excluded); ``why`` says where the bound comes from."""

    kind: type
    low: Number
    high: Number
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def describe(self) -> str:
        """``"an integer from 1 to 999 (...)"``, ``"a number >= 0 and < 1"``, ``"a finite number > 0"``."""
        if self.kind is int:
            text = f"an integer from {self.low} to {self.high}"
        elif math.isinf(self.high):
            text = f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = (f"a number {'>' if self.low_open else '>='} {self.low:g} "
                    f"and {'<' if self.high_open else '<='} {self.high:g}")
        return f"{text} ({self.why})" if self.why else text

    def check(self, value: object) -> Number:
        """``value`` if it is in range (an ``int`` given for a ``float`` becomes one), else a
        ``ValueError`` saying the range. Booleans are not numbers here."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and isinstance(value, float)):
            raise ValueError(f"must be {self.describe()}, got {shown(value)}")
        try:
            number: Number = float(value) if self.kind is float else value
        except OverflowError:  # an int past float's range
            number = math.inf
        inside = ((self.kind is int or math.isfinite(number))
                  and (number > self.low if self.low_open else number >= self.low)
                  and (number < self.high if self.high_open else number <= self.high))
        if not inside:
            raise ValueError(f"must be {self.describe()}, got {shown(value)}")
        return number


def shown(value: object, limit: int = 40) -> str:
    """``value`` for a message, cut short (a 5,000-digit number must not become a long line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


MAX_EPOCHS = 999  # epoch-NNN.pth: three digits, so the checkpoints sort in epoch order
MAX_SIDE = 2048  # pixels; ZFNet's activations at 2048 px are 84 times those at the paper's 224
MAX_WIDTH = 2.0  # the parameters grow as the width squared: 62 million at 1, 250 million at 2
SEED_LIMIT = 2**64  # torch.manual_seed's range; the streams derived from the seed wrap into it

BOUNDS: Dict[str, Bound] = {
    "epochs": Bound(int, 1, MAX_EPOCHS, why="epoch-NNN.pth has three digits"),
    "batch_size": Bound(int, 1, 65536, why="a global minibatch"),
    "lr": Bound(float, 0.0, math.inf, low_open=True),
    "momentum": Bound(float, 0.0, 1.0, high_open=True, why="at 1 or above the velocity grows without bound"),
    "weight_decay": Bound(float, 0.0, math.inf),
    "dropout": Bound(float, 0.0, 1.0, high_open=True, why="a probability; at 1 nothing reaches fc8"),
    "renorm": Bound(float, 0.0, math.inf),
    "init_std": Bound(float, 0.0, math.inf, low_open=True),
    "warmup": Bound(int, 0, 10**6, why="steps"),
    "plateau_patience": Bound(int, 0, MAX_EPOCHS, why="epochs"),
    "plateau_factor": Bound(float, 0.0, 1.0, low_open=True, high_open=True),
    "seed": Bound(int, 0, SEED_LIMIT - 1, why="torch.manual_seed's range"),
    "resize": Bound(int, 1, MAX_SIDE, why="pixels"),
    "crop": Bound(int, 1, MAX_SIDE, why="pixels"),
    "width": Bound(float, 0.0, MAX_WIDTH, low_open=True,
                   why="the parameters grow as its square: 62 million at 1, 250 million at 2"),
    "save_every": Bound(int, 0, 10**9, why="steps; 0: only after each epoch"),
}


class FieldError(ValueError):
    """A field of the run's configuration that is wrong: ``field`` (its name, which is the option's
    without the dashes) and ``problem`` (what is wrong, to follow the name)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def check_fields(values: Dict[str, object]) -> None:
    """Check each of ``values`` that has a bound (a :class:`FieldError` names the first wrong one)."""
    for name, value in values.items():
        bound = BOUNDS.get(name)
        if bound is not None:
            try:
                bound.check(value)
            except ValueError as error:
                raise FieldError(name, str(error)) from None


def wrap_seed(value: int) -> int:
    """A seed derived from the run's seed (``seed * k + i``), wrapped into torch's range so that
    every seed the run takes gives valid streams."""
    return value % SEED_LIMIT


def non_finite(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity."""
    return [name for name, value in tensors.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
