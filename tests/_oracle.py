"""The autograd oracle of the deconvnet (docs/engine.md, "Semantics: one rule per operation";
issue #18 for the activations, gates, normalisations and attention), for any traced model: the
gradient of <seed, activation> with respect to the input, with these backward rules.

- Pointwise activations phi(x) = x * g(x) (ReLU, ReLU6, LeakyReLU, SiLU, GELU, Hardswish, Mish,
  ELU, Tanh; module, functional or method, in place or not): ``deconvnet`` sends relu(signal)
  down, ``guided`` relu(signal) * g(x) (for ReLU the mask [x > 0], for ReLU6 0 < x < 6),
  ``backprop`` the true gradient.
- Sigmoid and hard-sigmoid outputs (the gates s of ``a * s``: squeeze-excitation, by module or by
  hand) are frozen (detached): the signal goes to ``a`` times ``s``, nothing down the gate branch.
- LayerNorm (and ConvNeXt's LayerNorm2d, which calls ``F.layer_norm``), GroupNorm and RMSNorm
  keep their mean subtraction but their std (rms) is frozen.
- Softmax outputs (the attention weights A of ``nn.MultiheadAttention``,
  ``F.scaled_dot_product_attention``, Swin's ``shifted_window_attention``, MaxViT's einsum
  attention) are frozen: values receive A^T * signal, queries and keys nothing.
- LRN: identity in ``deconvnet`` mode, its true gradient otherwise; max pooling: the argmaxes of
  the first pass. Everything else (convolutions, BatchNorm, linear layers, adds, cat, class
  tokens, position embeddings, layer scale, permutes, reshapes, rolls) is left to autograd.
In ``backprop`` mode nothing is frozen: it is the network's true gradient.

Independent of the engine: the graph is torchvision's own ``create_feature_extractor``, copied;
this file swaps its activation, gate, softmax, max-pool and LRN modules, rewrites its functional
and method calls of those, and, while the oracle runs, patches the ``torch.nn.functional`` (and
``torch.sigmoid``/``tanh``/``softmax``) functions that leaf modules and fx-wrapped functions call
by name (``nn.LayerNorm``, ``nn.MultiheadAttention`` through ``scaled_dot_product_attention``,
Swin's ``shifted_window_attention`` through ``F.softmax``); the patches are undone afterwards,
and the MHA fast path (which would bypass them) is off meanwhile.

Two passes. The first runs in the model's own dtype (what the engine records) with the original
functions, and writes to a tape what is discontinuous: ReLU/ReLU6 masks, max-pool argmaxes, the
clip regions of Hardswish and the sign of LeakyReLU and ELU. The second runs in ``dtype``
(float64 by default; float32 serves as a batched autograd reference) with the rules, replaying
the tape, so that it does not break a near-tie differently from the engine's forward.

Layouts: a layer's output is addressed as a (B, C, H, W) map (``present``): ``"NCHW"`` as is,
``"NHWC"`` (Swin, ConvNeXt's channels-last tensors) at [b, y, x, c], ``"tokens"`` (ViT: (B, 1+H*W,
C), class token first) at token 1 + y*W + x; a whole-map seed covers every patch token and never
the class token.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import types
import weakref
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

MODES = ("deconvnet", "guided", "backprop")
LAYOUTS = ("NCHW", "NHWC", "tokens")


class _Tape:
    """Masks, regions and argmaxes, captured in call order by the first pass and replayed by the
    second."""

    def __init__(self) -> None:
        self.capture = True
        self.items: List[torch.Tensor] = []
        self.at = 0

    def put(self, value: Optional[torch.Tensor], like: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.capture:
            self.items.append(value)
            return value
        if self.at >= len(self.items):
            raise RuntimeError("oracle: the second pass made more taped calls than the first")
        value = self.items[self.at]
        self.at += 1
        if like is not None and value.shape != like.shape:
            raise RuntimeError(f"oracle: taped call {self.at - 1} out of step ({tuple(value.shape)} recorded, "
                               f"{tuple(like.shape)} now)")
        return value


class _Rectify(torch.autograd.Function):
    """phi(x) going up; going down relu(signal) (deconvnet), relu(signal) * gain (guided) or
    signal * gain (backprop: used for ReLU/ReLU6 only, where gain is the taped mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: Callable, gain: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.mode = mode
        ctx.save_for_backward(gain)
        return value(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gain,) = ctx.saved_tensors
        gain = gain.to(grad.dtype)
        if ctx.mode == "deconvnet":
            return torch.relu(grad), None, None, None
        if ctx.mode == "guided":
            return torch.relu(grad) * gain, None, None, None
        return grad * gain, None, None, None


# The functions the rules call, taken before any patching (torch.sigmoid, torch.tanh and
# F.softmax are patched while the oracle runs).
_SIGMOID, _TANH, _SOFTMAX = torch.sigmoid, torch.tanh, F.softmax
_ORIGINAL: Dict[str, Callable] = {name: getattr(F, name) for name in (
    "silu", "gelu", "hardswish", "mish", "elu", "leaky_relu", "hardsigmoid", "layer_norm", "group_norm", "rms_norm",
    "scaled_dot_product_attention")}


class _Rules:
    """One method per rule, named after the function it replaces and with its signature; bound
    to the oracle's tape and mode."""

    def __init__(self, tape: _Tape, state: dict) -> None:
        self.tape, self.state = tape, state
        self.calls: Counter = Counter()  # rule -> calls in the last second pass

    def call(self, rule: str, *args, **kwargs):
        if not self.tape.capture:
            self.calls[rule] += 1
        return getattr(self, rule)(*args, **kwargs)

    @property
    def _rules_apply(self) -> bool:
        """Whether the rules act now (the second pass, not in backprop mode): activations
        rectify the signal; statistics, gates and attention weights are detached."""
        return not self.tape.capture and self.state["mode"] != "backprop"

    def _region(self, x: torch.Tensor, region: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.tape.put(region(x) if self.tape.capture else None, like=x)

    def _activate(self, x: torch.Tensor, value: Callable, gain: Callable[[torch.Tensor], torch.Tensor]):
        if not self._rules_apply:  # first pass, or backprop: the function itself, its true gradient
            return value(x)
        return _Rectify.apply(x, value, gain(x.detach()), self.state["mode"])

    # -- rectifiers: masks from the first pass, in every mode (as before issue #18) --
    def _rectify(self, x: torch.Tensor, top: float) -> torch.Tensor:
        if self.tape.capture:
            out = x.clamp(0, top)
            self.tape.put((out > 0) & (out < top))
            return out
        return _Rectify.apply(x, lambda t: t.clamp(0, top), self.tape.put(None, like=x), self.state["mode"])

    def relu(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._rectify(input, float("inf"))

    def relu6(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._rectify(input, 6.0)

    # -- smooth activations: g(x) from the second pass's own input --
    def silu(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._activate(input, _ORIGINAL["silu"], _SIGMOID)

    def gelu(self, input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        if approximate == "tanh":  # g = phi(x)/x of the tanh approximation
            def gain(x):
                return 0.5 * (1 + _TANH(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        else:  # g = Phi(x), the normal CDF
            def gain(x):
                return 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return self._activate(input, functools.partial(_ORIGINAL["gelu"], approximate=approximate), gain)

    def mish(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._activate(input, _ORIGINAL["mish"], lambda x: _TANH(F.softplus(x)))

    def tanh(self, input: torch.Tensor) -> torch.Tensor:
        def gain(x):  # tanh(x)/x, 1 at 0
            return torch.where(x == 0, torch.ones_like(x), _TANH(x) / torch.where(x == 0, torch.ones_like(x), x))
        return self._activate(input, _TANH, gain)

    # -- piecewise activations: the piece from the first pass --
    def hardswish(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        # 0: x <= -3 (g = 0), 1: -3 < x < 3 (g = (x + 3)/6), 2: x >= 3 (g = 1), as PyTorch's hardswish
        piece = self._region(input, lambda x: (x > -3).to(torch.int8) + (x >= 3).to(torch.int8))

        def gain(x):
            return torch.where(piece == 1, (x + 3) / 6, (piece == 2).to(x.dtype))
        return self._activate(input, _ORIGINAL["hardswish"], gain)

    def leaky_relu(self, input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
        positive = self._region(input, lambda x: x > 0)
        return self._activate(input, functools.partial(_ORIGINAL["leaky_relu"], negative_slope=negative_slope),
                              lambda x: torch.where(positive, torch.ones_like(x), torch.full_like(x, negative_slope)))

    def elu(self, input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
        positive = self._region(input, lambda x: x > 0)

        def gain(x):  # 1 for x > 0; alpha (e^x - 1)/x below, alpha at 0 (PyTorch's phi'(0), the left limit)
            safe = torch.where(x == 0, torch.ones_like(x), x)
            below = torch.where(x == 0, torch.full_like(x, alpha), alpha * torch.expm1(x) / safe)
            return torch.where(positive, torch.ones_like(x), below)
        return self._activate(input, functools.partial(_ORIGINAL["elu"], alpha=alpha), gain)

    # -- gates and attention weights: frozen --
    def sigmoid(self, input: torch.Tensor) -> torch.Tensor:
        out = _SIGMOID(input)
        return out.detach() if self._rules_apply else out

    def hardsigmoid(self, input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        out = _ORIGINAL["hardsigmoid"](input)
        return out.detach() if self._rules_apply else out

    def softmax(self, input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = _SOFTMAX(input, dim=dim, dtype=dtype)
        return out.detach() if self._rules_apply else out

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if not self._rules_apply:
            return _ORIGINAL["scaled_dot_product_attention"](query, key, value, attn_mask=attn_mask,
                                                             dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                             enable_gqa=enable_gqa)
        if dropout_p:
            raise ValueError("oracle: attention dropout (dropout_p > 0); run the model in eval mode")
        if enable_gqa:  # each group of query heads shares a key/value head
            repeat = query.size(-3) // key.size(-3)
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        scores = query @ key.transpose(-2, -1) * (query.size(-1) ** -0.5 if scale is None else scale)
        n, s = query.size(-2), key.size(-2)
        if is_causal:
            scores = scores.masked_fill(~torch.ones(n, s, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        return _SOFTMAX(scores, dim=-1).detach() @ value

    # -- normalisations: mean subtraction kept, std frozen --
    def layer_norm(self, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if not self._rules_apply:
            return _ORIGINAL["layer_norm"](input, normalized_shape, weight, bias, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        centred = input - input.mean(dims, keepdim=True)
        out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps).detach()
        return _affine(out, weight, bias)

    def group_norm(self, input, num_groups, weight=None, bias=None, eps=1e-5):
        if not self._rules_apply:
            return _ORIGINAL["group_norm"](input, num_groups, weight, bias, eps)
        grouped = input.reshape(input.size(0), num_groups, -1)
        centred = grouped - grouped.mean(-1, keepdim=True)
        out = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()).reshape(input.shape)
        per_channel = (1, -1) + (1,) * (input.dim() - 2)
        return _affine(out, None if weight is None else weight.view(per_channel),
                       None if bias is None else bias.view(per_channel))

    def rms_norm(self, input, normalized_shape, weight=None, eps=None):
        if not self._rules_apply:
            return _ORIGINAL["rms_norm"](input, normalized_shape, weight, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        eps = torch.finfo(input.dtype).eps if eps is None else eps  # as torch.rms_norm
        return _affine(input * torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps).detach(), weight, None)


def _affine(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is not None:
        x = x * weight
    return x if bias is None else x + bias


class _Call(nn.Module):
    """A swapped module or a rewritten call: the rule of that name, with the module's settings."""

    def __init__(self, rules: _Rules, rule: str, **settings) -> None:
        super().__init__()
        self.rules, self.rule, self.settings = rules, rule, settings

    def forward(self, *args, **kwargs):
        return self.rules.call(self.rule, *args, **self.settings, **kwargs)


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _RoutedMaxPool(nn.Module):
    def __init__(self, tape: _Tape, kernel, stride, padding, dilation, ceil_mode) -> None:
        super().__init__()
        self.tape, self.args = tape, (kernel, stride, padding, dilation, ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tape.capture:
            out, indices = F.max_pool2d(x, *self.args, return_indices=True)
            self.tape.put(indices)
            return out
        indices = self.tape.put(None)
        return torch.gather(x.flatten(2), 2, indices.flatten(2)).view(indices.shape)


class _Normalisation(nn.Module):
    def __init__(self, module: nn.Module, state: dict) -> None:
        super().__init__()
        self.module, self.state = module, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state["mode"] == "deconvnet" and x.requires_grad:
            return _IdentityBackward.apply(x, self.module)
        if x.dtype in (torch.float16, torch.bfloat16):  # as the engine: no half-precision LRN kernel on CPU
            return self.module(x.float()).to(x.dtype)
        return self.module(x)


# Modules swapped for a rule (exact types), with the settings the rule takes from them.
_MODULE_RULES: Dict[type, Callable[[nn.Module], Tuple[str, dict]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Mish: lambda m: ("mish", {}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.Softmax: lambda m: ("softmax", {"dim": m.dim}),
}
# Functions and methods the traced graph calls, rewritten to a rule.
_FUNCTION_RULES: Dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.silu: "silu", F.gelu: "gelu", F.hardswish: "hardswish", F.mish: "mish", F.elu: "elu", F.elu_: "elu",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", torch.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
    torch.softmax: "softmax", F.softmax: "softmax",
    F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.rms_norm: "rms_norm",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
}
_METHOD_RULES = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
                 "sigmoid_": "sigmoid", "softmax": "softmax"}
# Functions patched by name while the oracle runs: what leaf modules (nn.LayerNorm, nn.GELU inside
# torchvision's MLP is swapped, but nn.MultiheadAttention calls scaled_dot_product_attention/softmax
# by global name) and fx-wrapped functions (Swin's shifted_window_attention: F.softmax) call.
_PATCHED: Tuple[Tuple[object, str], ...] = tuple((F, name) for name in (
    "relu", "relu6", "silu", "gelu", "hardswish", "mish", "elu", "leaky_relu", "tanh", "sigmoid", "hardsigmoid",
    "softmax", "layer_norm", "group_norm", "rms_norm", "scaled_dot_product_attention")) + tuple(
    (torch, name) for name in ("sigmoid", "tanh", "softmax"))
_FUNCTIONAL_POOLS = {F.max_pool2d, torch.max_pool2d}
_POOL_NAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


@contextlib.contextmanager
def _patched(rules: _Rules):
    """The functions of ``_PATCHED`` routed to ``rules`` and the MHA fast path off, both undone on
    exit (an exception included)."""
    with contextlib.ExitStack() as stack:
        for namespace, name in _PATCHED:
            stack.enter_context(mock.patch.object(namespace, name, functools.partial(rules.call, name)))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        torch.backends.mha.set_fastpath_enabled(False)  # a native kernel would bypass the patches
        yield


def _pool_args(node: fx.Node) -> Tuple:
    values = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    values.update(zip(("input",) + _POOL_NAMES, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k != "return_indices"})
    if values["stride"] is None:
        values["stride"] = values["kernel_size"]
    return tuple(values[k] for k in _POOL_NAMES)


def _swap_modules(root: nn.Module, rules: _Rules) -> None:
    """Modules of ``_MODULE_RULES``, max pools and LRN swapped; functions of ``_FUNCTION_RULES``
    that a module holds as an attribute (``nn.TransformerEncoderLayer``'s activation) too."""
    for name, module in list(root.named_modules()):
        for key, value in list(vars(module).items()):
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) and value in _FUNCTION_RULES:
                setattr(module, key, functools.partial(rules.call, _FUNCTION_RULES[value]))
        for key, child in list(module.named_children()):
            kind = type(child)
            if kind is nn.Hardtanh and (child.min_val, child.max_val) == (0.0, 6.0):
                kind = nn.ReLU6
            if kind in _MODULE_RULES:
                rule, settings = _MODULE_RULES[kind](child)
                setattr(module, key, _Call(rules, rule, **settings))
            elif isinstance(child, nn.MaxPool2d):
                stride = child.kernel_size if child.stride is None else child.stride
                setattr(module, key, _RoutedMaxPool(rules.tape, child.kernel_size, stride, child.padding,
                                                    child.dilation, child.ceil_mode))
            elif isinstance(child, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
                setattr(module, key, _Normalisation(child, rules.state))


def _swap_functions(gm: fx.GraphModule, rules: _Rules) -> None:
    """Functional and method calls of the rules' functions, and functional max pools, become
    calls of swapped modules (an fx graph holds the function objects: patching names would not
    reach them)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
            module, args, kwargs = _RoutedMaxPool(rules.tape, *_pool_args(node)), (node.args[0],), {}
        elif node.op == "call_function" and node.target in _FUNCTION_RULES:
            module, args, kwargs = _Call(rules, _FUNCTION_RULES[node.target]), node.args, node.kwargs
        elif node.op == "call_method" and node.target in _METHOD_RULES:
            module, args, kwargs = _Call(rules, _METHOD_RULES[node.target]), node.args, node.kwargs
        else:
            continue
        count += 1
        name = f"_oracle_swap_{count}"
        gm.add_module(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, args, kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _grid(tokens: int, grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"grid {tuple(grid)} does not hold {tokens} patch tokens")
        return tuple(grid)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} patch tokens are not a square: give the grid")
    return side, side


def present(output: torch.Tensor, layout: str = "NCHW", grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A node's raw output as the (B, C, H, W) map the selections address: ``"NCHW"`` as is,
    ``"NHWC"`` permuted, ``"tokens"`` (B, 1 + H*W, C) without the class token (token 0), patch
    (y, x) being token 1 + y*W + x; ``grid`` (H, W) defaults to the square of H*W tokens.
    Differentiable (a view or a copy)."""
    if layout == "NCHW":
        return output
    if layout == "NHWC":
        return output.permute(0, 3, 1, 2)
    if layout == "tokens":
        b, n, c = output.shape
        h, w = _grid(n - 1, grid)
        return output[:, 1:].transpose(1, 2).reshape(b, c, h, w)
    raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")


def presented_output(model: nn.Module, images: torch.Tensor, layer: str, layout: str = "NCHW",
                     grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The unpatched model's output at node ``layer`` (torchvision's ``create_feature_extractor``,
    eval mode), presented as (B, C, H, W)."""
    was = model.training
    try:
        with torch.no_grad():
            out = create_feature_extractor(model.eval(), return_nodes={layer: "out"})(images)["out"]
    finally:
        model.train(was)
    return present(out, layout, grid)


class GraphOracle:
    """The oracle for one model and one layer (a feature-extraction node name)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self.tape = _Tape()
        self.state = {"mode": "deconvnet"}
        self.rules = _Rules(self.tape, self.state)
        self.extractors: Dict[Tuple[torch.dtype, torch.device], nn.Module] = {}
        was = model.training
        try:  # a copy of the layers it uses: the swaps below must not touch the model under test
            base = copy.deepcopy(create_feature_extractor(model.eval(), return_nodes={layer: "out"})).eval()
        finally:
            model.train(was)
        _swap_modules(base, self.rules)
        _swap_functions(base, self.rules)
        self.base = base.eval()

    def _extractor(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        key = (dtype, device)
        if key not in self.extractors:
            # one tape, mode and set of rules for every copy (the first pass and the second)
            shared = {id(self.tape): self.tape, id(self.state): self.state, id(self.rules): self.rules}
            self.extractors[key] = copy.deepcopy(self.base, memo=shared).to(device=device, dtype=dtype).eval()
        return self.extractors[key]

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor,
                 positions: Optional[torch.Tensor] = None, mode: str = "deconvnet", layout: str = "NCHW",
                 grid: Optional[Tuple[int, int]] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.state["mode"] = mode
        x = images[rows.to(images.device)]
        self.tape.capture, self.tape.items, self.tape.at = True, [], 0
        self.rules.calls.clear()
        with _patched(self.rules):
            with torch.no_grad():
                self._extractor(x.dtype, x.device)(x)
            self.tape.capture = False
            xd = x.to(dtype).detach().requires_grad_(True)
            output = self._extractor(dtype, x.device)(xd)["out"]
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"oracle: node {self.layer!r} gives a {type(output).__name__}, not a tensor")
        activation = present(output, layout, grid)
        if self.tape.at != len(self.tape.items):
            raise RuntimeError(f"oracle: the second pass replayed {self.tape.at} of {len(self.tape.items)} taped calls")
        seed = torch.zeros_like(activation)
        b = torch.arange(rows.shape[0], device=activation.device)
        channels = channels.to(activation.device)
        if positions is None:
            seed[b, channels] = activation[b, channels].detach()
        else:
            positions = positions.to(activation.device)
            seed[b, channels, positions[:, 0], positions[:, 1]] = \
                activation[b, channels, positions[:, 0], positions[:, 1]].detach()
        (grad,) = torch.autograd.grad(activation, xd, seed)
        return grad


_ORACLES: "weakref.WeakKeyDictionary[nn.Module, Dict[str, GraphOracle]]" = weakref.WeakKeyDictionary()


def graph_oracle(model: nn.Module, images: torch.Tensor, layer: str, rows: torch.Tensor, channels: torch.Tensor,
                 positions: Optional[torch.Tensor] = None, mode: str = "deconvnet", layout: str = "NCHW",
                 grid: Optional[Tuple[int, int]] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, C_in, H, W) projections (in ``dtype``) of the selections at node ``layer``, by
    autograd: selection i is image ``rows[i]``, channel ``channels[i]`` of the layer's map as
    ``present(output, layout, grid)`` shows it, at ``positions[i]`` = (y, x), or the whole map
    when ``positions`` is None. One backward for all the selections."""
    per_layer = _ORACLES.setdefault(model, {})
    if layer not in per_layer:
        per_layer[layer] = GraphOracle(model, layer)
    return per_layer[layer](images, rows, channels, positions, mode, layout, grid, dtype)


def oracle(dn, rec, images: torch.Tensor, layer: str, rows: torch.Tensor, channels: torch.Tensor,
           positions: Optional[torch.Tensor] = None, mode: str = "deconvnet", **kwargs) -> torch.Tensor:
    """:func:`graph_oracle` for a layer named as the engine names it (zoo aliases included)."""
    return graph_oracle(dn.model, images, dn.resolve(layer), rows, channels, positions, mode, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))
