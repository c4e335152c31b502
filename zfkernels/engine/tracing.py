"""Tracing: torchvision's feature-extraction tracer, run on the model in eval mode, with the node a
data-dependent branch needs named in the refusal."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import NodePathTracer

from .classify import Unsupported


class _ControlFlow(Exception):
    """A traced value decides a Python branch (``if x.sum() > 0``): the node it comes from."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


class _Tracer(NodePathTracer):
    """torchvision's tracer, which names the node whose value a Python branch would need."""

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise _ControlFlow(self.node_to_qualname.get(obj.node, obj.node.name))


def make_tracer() -> NodePathTracer:
    """torchvision's tracer with its defaults (torchvision.ops modules as leaves, math wrapped)."""
    leaves = [obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)]
    return _Tracer(autowrap_modules=(math, torchvision.ops), leaf_modules=leaves)


def trace(model: nn.Module) -> Tuple[fx.Graph, Dict[fx.Node, str]]:
    """The eval-mode graph of ``model`` and each node's feature-extraction name."""
    tracer = make_tracer()
    training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
    except _ControlFlow as error:
        raise Unsupported(f"Deconvnet: {type(model).__name__} cannot be traced by torch.fx: data-dependent control flow "
                          f"at node {error.node!r} (its value decides a Python branch)") from None
    except Exception as error:  # fx's TraceError, or anything the model's forward raises on a Proxy
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "control flow" in text or isinstance(error, fx.proxy.TraceError):
            reason = f"data-dependent control flow ({text})"
        else:
            reason = f"{type(error).__name__}: {text}"
        raise Unsupported(f"Deconvnet: {type(model).__name__} cannot be traced by torch.fx: {reason}") from error
    finally:
        model.train(training)
    return graph, dict(tracer.node_to_qualname)


class ZooForward(nn.Module):
    """The zoo's forward (``features`` -> ``avgpool`` -> flatten -> ``classifier``) for a model
    that holds those three modules but no ``forward`` of its own; the modules are the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = model.features, model.avgpool, model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def traceable(model: nn.Module) -> nn.Module:
    if type(model).forward is nn.Module.forward and all(hasattr(model, part) for part in ("features", "avgpool", "classifier")):
        return ZooForward(model)
    return model
