"""Evaluating one traced node on given values, and what a forward keeps for the way down."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def evaluate(node: fx.Node, lookup: Callable[[fx.Node], Any], root: nn.Module) -> Any:
    """One fx node on the values ``lookup`` gives its argument nodes (in-place variants run out of
    place, so no earlier output is ever overwritten)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lookup)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        method = node.target[:-1] if node.target.endswith("_") and not node.target.startswith("_") else node.target
        return getattr(args[0], method)(*args[1:], **kwargs)
    if node.op == "get_attr":
        value: Any = root
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    target = node.target
    if target is operator.iadd:
        target = operator.add
    if target is operator.imul:
        target = operator.mul
    if target is torch.relu_ or target is F.relu_:
        target = torch.relu
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    return target(*args, **kwargs)


@dataclass
class Tape:
    """What one forward keeps besides the activations asked for: max-pool switches
    (``ops.maxpool_switches``), the normalisations' inputs, what each rule saves for its way down
    (``saved``: an activation's input, a gate, a normalisation's sigma, attention weights),
    every step's output shape and the non-tensor values (sizes) the graph computed."""

    switches: Dict[str, torch.Tensor] = field(default_factory=dict)
    norm_inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    saved: Dict[str, Any] = field(default_factory=dict)
    shapes: Dict[str, torch.Size] = field(default_factory=dict)
    env: Dict[fx.Node, Any] = field(default_factory=dict)
    inputs: Dict[str, Any] = field(default_factory=dict)  # rearrange/cat step -> its input shapes (index maps)


def normalise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalisations in float32 for half-precision maps (PyTorch's CPU LocalResponseNorm has no
    bfloat16 kernel, and a sum of squares deserves float anyway)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return module(x.float()).to(x.dtype)
    return module(x)


def bound_arguments(step: Any, lookup: Callable[[fx.Node], Any], names: Sequence[str]) -> Dict[str, Any]:
    """A step's fx-node arguments evaluated by ``lookup``, by name (positional ones named after
    ``names``)."""
    args, kwargs = fx.node.map_arg((step.node.args, step.node.kwargs), lookup)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound
