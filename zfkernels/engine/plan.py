"""The plan of a projection from one top layer: which steps the signal passes going down, in
which order, which BatchNorms fold into the convolution below them, which rectifiers a max pool
rectifies while unpooling, and whether ``backprop`` mode needs the network's own autograd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch.nn as nn

from .capture import Graph
from .classify import RECTIFIERS

#: Step kinds whose true gradient is not their deconvnet rule with the rectification left out:
#: a gate's and a normalisation's statistics, and attention weights, depend on the input.
NOT_FROZEN_IN_BACKPROP = ("gate", "norm", "attention")


@dataclass
class Plan:
    """For one top layer: the steps a signal passes below it, in reverse forward order; the
    rectifiers a max pool rectifies while unpooling (their only reader is that pool); the
    BatchNorms folded into the convolution below them (that convolution's only reader); and
    ``autograd_backprop``: ``backprop`` mode runs autograd through the network, since a gate,
    a normalisation or an attention below the layer has a gradient through its statistics."""

    order: List[str]
    fused: set
    folded: set
    folded_into: Dict[str, nn.Module]
    autograd_backprop: bool

    @classmethod
    def of(cls, graph: Graph, top: str) -> "Plan":
        order = list(reversed(graph.signal_ancestors(top)))
        inside = set(order)
        fused, folded, folded_into = set(), set(), {}
        autograd_backprop = False
        for name in order:
            step = graph.steps[name]
            if step.kind in NOT_FROZEN_IN_BACKPROP or (
                    step.kind == "product" and any(i in graph.frozen for i in step.inputs)):
                autograd_backprop = True
            if step.kind == "maxpool":
                below = graph.steps[step.inputs[0]]
                if below.kind in RECTIFIERS and below.name != top and \
                        [u for u in below.users if u in inside] == [name]:
                    fused.add(below.name)
            if step.kind == "bn" and name != top:
                below = graph.steps[step.inputs[0]]
                if below.kind == "conv" and [u for u in below.users if u in inside] == [name]:
                    folded.add(name)
                    folded_into[below.name] = step.module
        return cls(order, fused, folded, folded_into, autograd_backprop)
