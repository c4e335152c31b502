"""The rules: for each step kind, its forward (what a recording keeps) and its way down, in one
table (:data:`RULES`). Adding an operation means adding a kind in
:mod:`zfkernels.engine.capture`, a rule here, and its test against the oracle (docs/engine.md,
"Adding an operation").

Going down, a rule receives the signal on its step's output (a :class:`~.boxes.Signal`, box or
raw form) and returns the signal on each input it sends one to. Semantics (docs/engine.md): the
gradient of <seed, layer output> with respect to the image, where activations rectify the signal
(``deconvnet``: ``relu(signal)``; ``guided``: ``relu(signal) * g(x)``, g = phi(x)/x), gates,
normalisation statistics and attention weights are frozen at their recorded values, and every
other operation is its exact transpose with biases dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import ops
from .boxes import Box, Signal, View, crop, dense
from .activations import gain, phi
from .evaluate import Tape, bound_arguments, evaluate, normalise
from .fastpaths import bn_scale, transpose
from .frozen import SoftmaxCapture, SoftmaxReplay, mha_weights, norm_statistics, sdpa_weights

Forward = Callable[[Any, Sequence[torch.Tensor], Callable[[fx.Node], Any], nn.Module, Optional[Tape]], torch.Tensor]
Down = Callable[["Context", Any, Signal], List[Tuple[str, Signal]]]


@dataclass
class Rule:
    """One step kind's forward and way down (``None``: no signal ever reaches the kind)."""

    forward: Forward
    down: Optional[Down]


@dataclass
class Context:
    """What a rule going down may read: the engine (its caches), the graph, the recording, the
    geometry of the recorded size, the selections' image rows, the mode and the plan."""

    engine: Any
    graph: Any
    rec: Any
    geometry: Any
    rows: torch.Tensor
    mode: str
    plan: Any

    def view(self, name: str) -> View:
        return self.geometry.view(name)

    def on(self, name: str, value: torch.Tensor) -> Signal:
        """A dense raw value on step ``name``'s output as a signal."""
        return self.geometry.view(name).on(value)

    def per_selection(self, value: torch.Tensor) -> torch.Tensor:
        """A recorded value's rows for the selections: indexed by ``rows`` when its first
        dimension is the recording's images, else as it is (a constant broadcast over them)."""
        if value.dim() and value.shape[0] == self.rec.num_images:
            return value[self.rows]
        return value


# -- forwards ------------------------------------------------------------------------------------


def default_forward(step: Any, values: Sequence[torch.Tensor], lookup: Callable[[fx.Node], Any], root: nn.Module,
                    tape: Optional[Tape]) -> torch.Tensor:
    """The step as the model computes it: its module (a leaf block's child) or its fx node."""
    if step.node is None:
        return step.module(values[0])
    return evaluate(step.node, lookup, root)


def _relu_forward(step, values, lookup, root, tape):
    return torch.relu(values[0])


def _relu6_forward(step, values, lookup, root, tape):
    return F.hardtanh(values[0], 0.0, 6.0)


def _bn_forward(step, values, lookup, root, tape):
    m = step.module
    return F.batch_norm(values[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _maxpool_forward(step, values, lookup, root, tape):
    w = step.window
    if tape is not None:
        out, tape.switches[step.name] = ops.maxpool_switches(values[0], w.kernel, w.stride, w.padding,
                                                             dilation=w.dilation, ceil_mode=w.ceil_mode)
        return out
    return F.max_pool2d(values[0], w.kernel, w.stride, w.padding, w.dilation, w.ceil_mode)


def _identity_forward(step, values, lookup, root, tape):
    return values[0]


def _lrn_forward(step, values, lookup, root, tape):
    if tape is not None:
        tape.norm_inputs[step.name] = values[0]
    return normalise(step.module, values[0])


def _add_forward(step, values, lookup, root, tape):
    if step.node is not None and step.node.target is torch.add:
        return torch.add(values[0], values[1])
    return values[0] + values[1]


def _activation_forward(step, values, lookup, root, tape):
    if tape is not None:
        tape.saved[step.name] = values[0]
    return phi(step.options, values[0])


def _product_forward(step, values, lookup, root, tape):
    out = default_forward(step, values, lookup, root, tape)
    if tape is not None:  # the frozen operands (a gate, attention weights); the data operand is not kept
        tape.saved[step.name] = tuple(None if i in step.signal else v for i, v in enumerate(values))
    return out


def _gate_forward(step, values, lookup, root, tape):
    scale = step.module._scale(values[0])  # torchvision's SqueezeExcitation: forward is scale * input
    if tape is not None:
        tape.saved[step.name] = scale
    return scale * values[0]


def _norm_forward(step, values, lookup, root, tape):
    out = default_forward(step, values, lookup, root, tape)
    if tape is not None:
        tape.saved[step.name] = norm_statistics(step, values[0], lookup)
    return out


def _attention_forward(step, values, lookup, root, tape):
    how = step.options["how"]
    if how == "mha":
        parts = [values[i] for i in step.options["parts"]]
        out = evaluate(step.node, lookup, root)[0]
        if tape is not None:
            tape.saved[step.name] = mha_weights(step.module, parts[0], parts[1])
        return out
    if how == "sdpa":
        out = evaluate(step.node, lookup, root)
        if tape is not None:
            bound = bound_arguments(step, lookup, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"))
            tape.saved[step.name] = sdpa_weights(bound["query"], bound["key"], bound.get("attn_mask"),
                                                 bool(bound.get("is_causal", False)), bound.get("scale"))
        return out
    if tape is None:
        return evaluate(step.node, lookup, root)
    with SoftmaxCapture() as capture:  # Swin's shifted_window_attention: its softmax outputs
        out = evaluate(step.node, lookup, root)
    tape.saved[step.name] = capture.outputs
    return out


def _cat_forward(step, values, lookup, root, tape):
    out = evaluate(step.node, lookup, root)
    if tape is not None:
        pieces = step.node.args[0] if step.node.args else step.node.kwargs["tensors"]
        dim = step.options["dim"] % out.dim()
        tape.inputs[step.name] = tuple(int(lookup(p).shape[dim]) for p in pieces)
    return out


def _rearrange_forward(step, values, lookup, root, tape):
    if tape is not None:
        tape.inputs[step.name] = values[0].shape
    return default_forward(step, values, lookup, root, tape)


# -- ways down -----------------------------------------------------------------------------------


def _rectifier_down(ctx: Context, step, signal: Signal):
    value = signal.value
    if ctx.mode != "deconvnet":
        y = ctx.view(step.name).crop(ctx.rec.outputs[step.name], ctx.rows, signal)
        mask = (y > 0) if step.kind == "relu" else (y > 0) & (y < 6)
        value = torch.relu(value) * mask if ctx.mode == "guided" else value * mask
    else:
        value = torch.relu(value)
    return [(step.inputs[0], Signal(value, signal.box, signal.channels))]


def _activation_down(ctx: Context, step, signal: Signal):
    value = signal.value
    if ctx.mode == "deconvnet":
        value = torch.relu(value)
    else:
        x = ctx.view(step.name).crop(ctx.rec.tape.saved[step.name], ctx.rows, signal)
        if ctx.mode == "guided":
            value = torch.relu(value) * gain(step.options, x)
        else:  # the true gradient, by autograd on the pointwise function
            with torch.inference_mode(False), torch.enable_grad():
                x = x.clone().requires_grad_(True)
                (value,) = torch.autograd.grad(phi(step.options, x), x, value.clone())
    return [(step.inputs[0], Signal(value, signal.box, signal.channels))]


def _pass_down(ctx: Context, step, signal: Signal):
    return [(step.inputs[0], signal)]


def _scale_down(ctx: Context, step, signal: Signal):
    return [(step.inputs[0], Signal(signal.value * step.options["factor"], signal.box, signal.channels))]


def _add_down(ctx: Context, step, signal: Signal):
    return [(name, signal) for name in step.inputs]


def _per_channel(signal: Signal, factor: torch.Tensor) -> torch.Tensor:
    """``factor`` ``(C,)`` or ``(B, C)`` shaped to multiply a box form (one channel per
    selection where the signal has ``channels``)."""
    if signal.channels is not None:
        picked = factor[signal.channels] if factor.dim() == 1 else factor[torch.arange(factor.shape[0]), signal.channels]
        return picked.view(-1, *([1] * (signal.value.dim() - 1)))
    if factor.dim() == 1:
        return factor.view(1, -1, *([1] * (signal.value.dim() - 2)))
    return factor.view(factor.shape[0], factor.shape[1], *([1] * (signal.value.dim() - 2)))


def _bn_down(ctx: Context, step, signal: Signal):
    if step.name in ctx.plan.folded:
        return [(step.inputs[0], signal)]  # folded into the convolution below
    scale = bn_scale(step.module).to(signal.value.dtype)
    if signal.box is None:
        signal = ctx.on(step.name, signal.value)
    return [(step.inputs[0], Signal(signal.value * _per_channel(signal, scale), signal.box, signal.channels))]


def _conv_down(ctx: Context, step, signal: Signal):
    source = step.inputs[0]
    weight = ctx.engine.weight(step, ctx.plan, signal.value)
    return [(source, transpose(signal, ctx.view(step.name).size, ctx.view(source).size, step.window, weight,
                               step.options["groups"]))]


def boxable_avgpool(step) -> bool:
    """An average pooling whose every window divides by the full kernel: a plain transposed
    window (partial windows from padding or ceil mode go through autograd instead)."""
    w = step.window
    return step.options.get("divisor_override") is None and not w.ceil_mode and (
        step.options.get("count_include_pad", True) or w.padding == (0, 0))


def _avgpool_down(ctx: Context, step, signal: Signal):
    if not boxable_avgpool(step):
        return _affine_down(ctx, step, signal)
    view = ctx.view(step.name)
    signal = dense(signal, view.channels)
    k = step.window.kernel
    weight = signal.value.new_full((view.channels, 1, k[0], k[1]), 1.0 / (k[0] * k[1]))
    source = step.inputs[0]
    return [(source, transpose(signal, view.size, ctx.view(source).size, step.window, weight, view.channels))]


def _maxpool_down(ctx: Context, step, signal: Signal):
    source = step.inputs[0]
    signal = dense(signal, ctx.view(step.name).channels)
    fuse = ctx.mode == "deconvnet" and source in ctx.plan.fused
    target = ctx.graph.steps[source].inputs[0] if fuse else source
    switches = ctx.rec.switches[step.name]
    below = ctx.view(source).size
    w = step.window
    box = signal.box
    if box.is_map(switches.shape[-2:]):
        # Whole maps: every selection reads its image's switches in place (rows=), no copies.
        out = ops.unpool(signal.value, switches, below, w.kernel, w.stride, w.padding, w.dilation, rows=ctx.rows,
                         rectify=fuse)
        return [(target, Signal(out, Box.whole(out.shape[0], below[0], below[1], out.device)))]
    # A box of windows: its switches (a few bytes per selection) unpool as a padding-free
    # pooling of the box's own pixels; switch offsets are relative to their window, so they
    # hold unchanged. Windows off the map carry zero signal; their switch 0 adds nothing.
    off_map = ~box.inside(switches.shape[-2:], torch.bool)
    box_switches = crop(switches, ctx.rows, box).masked_fill(off_map, 0).contiguous()
    size = ((box.h - 1) * w.stride[0] + w.span(0), (box.w - 1) * w.stride[1] + w.span(1))
    out = ops.unpool(signal.value, box_switches, size, w.kernel, w.stride, 0, w.dilation, rectify=fuse)
    value, new_box = box.down(w).clip(out, below)
    return [(target, Signal(value, new_box))]


def _lrn_down(ctx: Context, step, signal: Signal):
    if ctx.mode == "deconvnet":
        return [(step.inputs[0], signal)]  # the paper skips contrast normalisation going down
    signal = dense(signal, ctx.view(step.name).channels)
    inputs = crop(ctx.rec.norm_inputs[step.name], ctx.rows, signal.box)
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(normalise(step.module, x), x, signal.value.clone())
    return [(step.inputs[0], Signal(grad, signal.box))]


def _cat_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    dim = step.options["dim"] % (len(view.raw_shape) + 1)
    sizes = ctx.rec.tape.inputs[step.name]
    channel_dim = {"NCHW": 1, "NHWC": 3}.get(view.layout)
    parts = []
    offset = 0
    if signal.box is not None and dim == channel_dim:
        signal = dense(signal, view.channels)
        for source, size in zip(step.options["pieces"], sizes):
            if source is not None:
                parts.append((source, Signal(signal.value.narrow(1, offset, size), signal.box)))
            offset += size
        return parts
    value = view.raw(signal)
    for source, size in zip(step.options["pieces"], sizes):
        if source is not None:
            parts.append((source, ctx.on(source, value.narrow(dim, offset, size))))
        offset += size
    return parts


def _rearrange_down(ctx: Context, step, signal: Signal):
    source = step.inputs[0]
    how, index, injective = ctx.engine.rearrangement(step, ctx.rec, signal.value.device)
    view, below = ctx.view(step.name), ctx.view(source)
    batch = signal.value.shape[0]
    if how == "swap" and signal.box is not None:
        return [(source, signal)]  # channels first <-> channels last: the same presented map
    if how == "channels" and signal.box is not None:
        signal = dense(signal, view.channels)
        value = signal.value
        out = value.new_zeros((batch, below.channels) + tuple(value.shape[2:]))
        out.index_copy_(1, index, value) if injective else out.index_add_(1, index, value)
        return [(source, Signal(out, signal.box))]
    value = view.raw(signal).reshape(batch, -1)
    out = value.new_zeros((batch, math.prod(below.raw_shape)))
    flat = index.flatten()
    keep = flat >= 0  # padding reads nothing
    if not bool(keep.all()):
        flat, value = flat[keep], value[:, keep]
    out.index_copy_(1, flat, value) if injective else out.index_add_(1, flat, value)
    return [(source, ctx.on(source, out.view((batch,) + below.raw_shape)))]


def _linear_weight(ctx: Context, step) -> torch.Tensor:
    if step.module is not None:
        return step.module.weight
    node = step.node
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    return ctx.rec.tape.env[weight] if isinstance(weight, fx.Node) else weight


def _linear_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    source = step.inputs[0]
    weight = _linear_weight(ctx, step).detach().to(signal.value.dtype)
    if signal.box is not None and view.layout == "NHWC":  # over the channels of a channels-last grid
        signal = dense(signal, view.channels)
        value = signal.value
        b, c, h, w = value.shape
        out = torch.matmul(weight.t(), value.reshape(b, c, h * w)).view(b, weight.shape[1], h, w)
        return [(source, Signal(out, signal.box))]
    return [(source, ctx.on(source, view.raw(signal) @ weight))]


def vjp(ctx: Context, step, signal: torch.Tensor, replace: Optional[Dict[fx.Node, torch.Tensor]] = None,
        modes: Sequence[TorchFunctionMode] = ()) -> torch.Tensor:
    """The step's transpose by autograd with respect to its signal input: the step is linear
    (affine) in it with everything else fixed, so the gradient at zero is exact. ``replace``
    gives values for other argument nodes (frozen operands per selection); constants and sizes
    come from the recording. Also under ``torch.inference_mode()`` (pass 2 runs in it)."""
    source = ctx.graph.signal_inputs(step.name)[0]
    below = ctx.view(source)
    replace = replace or {}
    with torch.inference_mode(False), torch.enable_grad():
        # Values recorded under inference mode (pass 2) cannot be saved for a backward: copies.
        replace = {node: _normal(value) for node, value in replace.items()}
        for mode in modes:
            if isinstance(mode, SoftmaxReplay):
                mode.outputs = [_normal(value) for value in mode.outputs]
        x = signal.new_zeros((signal.shape[0],) + below.raw_shape).requires_grad_(True)
        if step.node is None:
            y = step.module(x)
        else:
            def lookup(n: fx.Node) -> Any:
                if n in replace:
                    return replace[n]
                if ctx.graph.values.get(n) == "tensor" and ctx.graph.step_of[n] == source:
                    return x
                return _normal(ctx.rec.tape.env[n])

            with _entered(modes):
                y = evaluate(step.node, lookup, ctx.graph.model)
            del lookup
        (grad,) = torch.autograd.grad(y, x, signal.clone())
    return grad


def _normal(value: Any) -> Any:
    """A normal-tensor copy of an inference tensor (anything else as it is)."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


class _entered:
    def __init__(self, modes: Sequence[TorchFunctionMode]) -> None:
        self.modes = list(modes)

    def __enter__(self) -> None:
        for mode in self.modes:
            mode.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def _affine_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    source = step.inputs[0]
    return [(source, ctx.on(source, vjp(ctx, step, view.raw(signal))))]


_MULTIPLY = {"mul", "mul_", "__mul__", "__rmul__", torch.mul}


def _is_multiply(node: fx.Node) -> bool:
    import operator

    return node.target in _MULTIPLY or node.target in (operator.mul, operator.imul)


def _product_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    (data,) = step.signal
    source = step.inputs[data]
    below = ctx.view(source)
    saved = ctx.rec.tape.saved[step.name]
    operands = step.options["operands"]
    others = [v for i, v in enumerate(saved) if i != data]
    const = [a for a in list(step.node.args) + list(step.node.kwargs.values())
             if isinstance(a, fx.Node) and a not in operands]
    if signal.box is not None and _is_multiply(step.node) and below.raw_shape == view.raw_shape and \
            len(others) + len(const) == 1:
        other = others[0] if others else ctx.rec.tape.env[const[0]]
        if not isinstance(other, torch.Tensor):
            other = torch.tensor(other, dtype=signal.value.dtype, device=signal.value.device)
        factor = _broadcast_on(ctx, view, other.to(signal.value.dtype), signal)
        return [(source, Signal(signal.value * factor, signal.box, signal.channels))]
    replace = {node: value for i, (node, value) in enumerate(zip(operands, saved)) if i != data}
    replace = {node: ctx.per_selection(value).detach() for node, value in replace.items()}
    return [(source, ctx.on(source, vjp(ctx, step, view.raw(signal), replace)))]


def _broadcast_on(ctx: Context, view: View, other: torch.Tensor, signal: Signal) -> torch.Tensor:
    """A recorded factor (per image) or a constant, broadcast against the step's raw output and
    cropped where the box-form ``signal`` lives."""
    ndim = len(view.raw_shape) + 1
    if other.dim() < ndim:
        other = other.reshape((1,) * (ndim - other.dim()) + tuple(other.shape))
    batch = signal.value.shape[0]
    other = other.detach()
    if other.shape[0] == ctx.rec.num_images and other.shape[0] > 1:
        rows = ctx.rows
    else:
        other, rows = other[:1], torch.zeros(batch, dtype=torch.int64, device=other.device)
    presented = view.present(other)
    if presented.shape[-2:] == (1, 1):  # one factor per channel (a layer scale, a gate): no need to spread it
        if signal.channels is not None and presented.shape[1] != 1:
            return presented[rows, signal.channels].view(batch, 1, 1, 1)
        return presented[rows] if rows is ctx.rows else presented
    full = view.present(other.expand((other.shape[0],) + view.raw_shape))
    return crop(full, rows, signal.box, signal.channels)


def _gate_down(ctx: Context, step, signal: Signal):
    scale = ctx.rec.tape.saved[step.name][ctx.rows].to(signal.value.dtype)  # (B, C, 1, 1)
    if signal.box is None:
        signal = ctx.on(step.name, signal.value)
    factor = _per_channel(signal, scale.flatten(1))
    return [(step.inputs[0], Signal(signal.value * factor, signal.box, signal.channels))]


def _norm_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    source = step.inputs[0]
    stats = ctx.rec.tape.saved[step.name]
    how, weight, rstd = stats["how"], stats["weight"], stats["rstd"]
    dtype = signal.value.dtype
    over_channels = (how == "layer2d" and view.layout == "NCHW") or (
        how in ("layer", "rms") and view.layout == "NHWC" and stats["dims"] == (-1,))
    if signal.box is not None and over_channels:
        signal = dense(signal, view.channels)
        value = signal.value
        if weight is not None:
            value = value * weight.to(dtype).view(1, -1, 1, 1)
        value = value * view.crop(rstd, ctx.rows, Signal(value, signal.box)).to(dtype)
        if how != "rms":
            value = value - value.mean(1, keepdim=True)
        return [(source, Signal(value, signal.box))]
    value = view.raw(signal)
    rstd = ctx.per_selection(rstd).to(dtype)
    if how == "group":
        if weight is not None:
            value = value * weight.to(dtype).view(1, -1, *([1] * (value.dim() - 2)))
        grouped = value.reshape(value.shape[0], stats["groups"], -1) * rstd
        value = (grouped - grouped.mean(-1, keepdim=True)).reshape(value.shape)
    else:
        if weight is not None:
            value = value * (weight.to(dtype).view(1, -1, 1, 1) if how == "layer2d" else weight.to(dtype))
        value = value * rstd
        if how != "rms":
            value = value - value.mean(stats["dims"], keepdim=True)
    return [(source, ctx.on(source, value))]


def _attention_down(ctx: Context, step, signal: Signal):
    view = ctx.view(step.name)
    value = view.raw(signal)
    how = step.options["how"]
    source = ctx.graph.signal_inputs(step.name)[0]
    saved = ctx.rec.tape.saved[step.name]
    if how == "mha":
        module = step.module
        e, heads = module.embed_dim, module.num_heads
        weights = ctx.per_selection(saved).to(value.dtype)  # (B, heads, L, S)
        b, length = value.shape[0], value.shape[1]
        grad = value @ module.out_proj.weight.detach().to(value.dtype)
        grad = grad.view(b, length, heads, e // heads).transpose(1, 2)
        grad = weights.transpose(-2, -1) @ grad  # the values receive A^T signal
        grad = grad.transpose(1, 2).reshape(b, weights.shape[-1], e)
        grad = grad @ module.in_proj_weight.detach()[2 * e:].to(value.dtype)
        return [(source, ctx.on(source, grad))]
    if how == "sdpa":
        weights = ctx.per_selection(saved).to(value.dtype)
        grad = weights.transpose(-2, -1) @ value
        return [(source, ctx.on(source, grad.sum_to_size((value.shape[0],) + ctx.view(source).raw_shape)))]
    n = ctx.rec.num_images
    frozen = []
    for weights in saved:  # (N * windows, heads, P, P), images first: each selection's windows
        per_image = weights.reshape(n, -1, *weights.shape[1:])[ctx.rows]
        frozen.append(per_image.reshape(-1, *weights.shape[1:]).to(value.dtype))
    return [(source, ctx.on(source, vjp(ctx, step, value, modes=[SoftmaxReplay(frozen)])))]


RULES: Dict[str, Rule] = {
    "input": Rule(default_forward, None),
    "conv": Rule(default_forward, _conv_down),
    "bn": Rule(_bn_forward, _bn_down),
    "relu": Rule(_relu_forward, _rectifier_down),
    "relu6": Rule(_relu6_forward, _rectifier_down),
    "activation": Rule(_activation_forward, _activation_down),
    "maxpool": Rule(_maxpool_forward, _maxpool_down),
    "avgpool": Rule(default_forward, _avgpool_down),
    "add": Rule(_add_forward, _add_down),
    "cat": Rule(_cat_forward, _cat_down),
    "rearrange": Rule(_rearrange_forward, _rearrange_down),
    "linear": Rule(default_forward, _linear_down),
    "affine": Rule(default_forward, _affine_down),
    "identity": Rule(_identity_forward, _pass_down),
    "bias": Rule(default_forward, _pass_down),
    "scale": Rule(default_forward, _scale_down),
    "product": Rule(_product_forward, _product_down),
    "gate": Rule(_gate_forward, _gate_down),
    "norm": Rule(_norm_forward, _norm_down),
    "attention": Rule(_attention_forward, _attention_down),
    "lrn": Rule(_lrn_forward, _lrn_down),
    "frozen": Rule(default_forward, None),
    "opaque": Rule(default_forward, None),
}
