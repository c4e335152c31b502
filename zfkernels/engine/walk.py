"""The one forward walker: pass 1, the diagnostics, ``Deconvnet.record`` and the geometry pass
all run the traced graph through :func:`walk`, each step by its rule's forward
(:mod:`zfkernels.engine.rules`)."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.fx as fx

from .capture import Graph
from .classify import Step
from .evaluate import Tape, evaluate
from .rules import RULES


def walk(graph: Graph, images: torch.Tensor, wanted: Iterable[str], *, keep: Iterable[str] = (),
         tape: Optional[Tape] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """The one forward walker: run ``graph`` on ``images`` in forward order, yield
    ``(step, output)`` for each step in ``wanted`` as soon as it is computed, and stop after the
    last of them. Outputs no later step reads are freed as the walk goes, except ``keep``'s.
    With a ``tape``, also keep what a recording needs (see :class:`Tape`)."""
    wanted = set(wanted)
    keep = set(keep) | wanted
    if not wanted:
        return
    last = max(graph.position[name] for name in wanted)
    needed = graph.ancestors(graph.order[last])
    needed_set = set(needed)
    for name in wanted:
        if name not in needed_set:  # a wanted step on another branch than the deepest
            needed_set.update(graph.ancestors(name))
    order = [name for name in graph.order if name in needed_set]
    last_use = {}
    for i, name in enumerate(order):
        for source in graph.reads(name):
            last_use[source] = i
    env: Dict[fx.Node, Any] = tape.env if tape is not None else {}  # non-tensor values (sizes, chunk tuples)
    outputs: Dict[str, torch.Tensor] = {}

    def lookup(node: fx.Node) -> Any:
        if graph.values.get(node) == "tensor":
            return outputs[graph.step_of[node]]
        if node not in env:  # sizes, constants and chunk tuples: evaluated when first read
            env[node] = evaluate(node, lookup, graph.model)
        return env[node]

    pending = len(wanted)
    try:
        for i, name in enumerate(order):
            step = graph.steps[name]
            values = [outputs[source] for source in step.inputs]
            if step.kind == "input":
                value = images
            else:
                try:
                    value = RULES[step.kind].forward(step, values, lookup, graph.model, tape)
                except RuntimeError as error:
                    shape = tuple(values[0].shape[-2:]) if values and values[0].dim() == 4 else tuple(values[0].shape)
                    raise ValueError(
                        f"Deconvnet: images of {images.shape[-2]}x{images.shape[-1]} do not fit this model: step {name!r} "
                        f"({step.kind}) receives a {'x'.join(map(str, shape))} map ({str(error).splitlines()[0]})"
                    ) from error
            outputs[name] = value
            if tape is not None:
                tape.shapes[name] = value.shape
            if name in wanted:
                yield name, value
                pending -= 1
                if pending == 0:
                    return
            for source in graph.reads(name):
                if last_use.get(source) == i and source not in keep:
                    outputs.pop(source, None)
    finally:
        # ``lookup`` refers to itself (it recurses through ``evaluate``), so this frame's
        # variables form a reference cycle that only the cyclic collector frees. Tensors are
        # few Python objects, so that collector rarely runs and every batch's maps would stay
        # alive until it does: leave the cycle holding nothing.
        outputs.clear()
        del lookup


def rearrangement_index(graph: Graph, step: Step, input_shape: torch.Size, env: Dict[fx.Node, Any],
                        device: torch.device) -> torch.Tensor:
    """Where each output element of a ``rearrange`` step comes from: an int64 tensor of one
    image's output shape holding flat indices into one image's input, ``-1`` where the step
    pads with zeros, found by running the step on an index tensor (same sizes as the recorded
    forward; indices count from 1 there, so that padding's zeros stand apart). Raises
    ``ValueError`` when the step mixes images (its output rows would differ)."""
    per_image = math.prod(input_shape[1:])
    index = torch.arange(1, per_image + 1, device=device).repeat(input_shape[0]).view(input_shape)
    local: Dict[fx.Node, Any] = {}
    node = step.node
    if node is None:  # a leaf block's Flatten
        out = step.module(index)
    else:
        tuple_node = node.args[0] if graph.values.get(node.args[0]) == "tuple" else None
        source = graph.tuple_source[tuple_node] if tuple_node is not None else next(
            n for n in node.all_input_nodes if graph.values.get(n) == "tensor")

        def lookup(n: fx.Node) -> Any:
            if n is source:
                return index
            if n in local:
                return local[n]
            if n is tuple_node:
                local[n] = evaluate(n, lookup, graph.model)
                return local[n]
            return env[n]

        out = evaluate(node, lookup, graph.model)
        del lookup  # it refers to itself: free the index maps now, not at the next cyclic collection
    if out.shape[0] != input_shape[0] or (input_shape[0] > 1 and not bool((out == out[:1]).all())):
        raise ValueError(f"Deconvnet: step {step.name!r} mixes the batch's images; it cannot be projected per image")
    return (out[0] - 1).contiguous()
