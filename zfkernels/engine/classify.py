"""Node classification: every node of a traced model becomes a step of a kind the deconvnet has a
rule for (docs/engine.md, "Semantics"), or is refused naming the node. The operation tables,
:class:`Step`, and :class:`NodeClassifier`, the part of :class:`~.capture.Graph` that reads
nodes one by one."""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import convnext, swin_transformer

from ..receptive_field import Window

# -- the supported operations ------------------------------------------------------------------

#: Step kinds. ``relu`` and ``relu6`` are the rectifiers; ``activation`` any other pointwise
#: activation phi(x) = x * g(x) (SiLU, GELU, Hardswish, Mish, ELU, LeakyReLU, Tanh);
#: ``rearrange`` moves elements without arithmetic (view, permute, slicing, pad, roll…);
#: ``linear`` is ``nn.Linear``/``F.linear``; ``affine`` is any other linear map whose transpose
#: autograd gives (adaptive pooling, mean); ``identity`` covers dropout, stochastic depth and
#: ``nn.Identity``; ``bias`` adds a constant; ``scale`` multiplies by a number; ``product``
#: multiplies by a constant or frozen tensor (layer scale, a hand-written gate, attention
#: weights times values); ``gate`` is torchvision's ``SqueezeExcitation``; ``norm`` a
#: LayerNorm/GroupNorm/RMSNorm; ``attention`` ``nn.MultiheadAttention``,
#: ``F.scaled_dot_product_attention`` or Swin's ``shifted_window_attention``; ``frozen`` a
#: sigmoid/hard-sigmoid/softmax output or a value computed from such outputs alone; ``opaque``
#: any other operation, allowed only where no signal reaches it.
KINDS = ("input", "conv", "bn", "relu", "relu6", "activation", "maxpool", "avgpool", "add", "cat", "rearrange",
         "linear", "affine", "identity", "bias", "scale", "product", "gate", "norm", "attention", "frozen", "lrn",
         "opaque")
RECTIFIERS = ("relu", "relu6")
ACTIVATIONS = RECTIFIERS + ("activation",)
NORMALISATIONS = (nn.LocalResponseNorm, nn.CrossMapLRN2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

#: Pointwise activations by module type: the function name the rules know and its settings.
ACTIVATION_MODULES: Dict[type, Callable[[nn.Module], Dict[str, Any]]] = {
    nn.SiLU: lambda m: {"fn": "silu"},
    nn.GELU: lambda m: {"fn": "gelu", "approximate": m.approximate},
    nn.Hardswish: lambda m: {"fn": "hardswish"},
    nn.Mish: lambda m: {"fn": "mish"},
    nn.ELU: lambda m: {"fn": "elu", "alpha": float(m.alpha)},
    nn.LeakyReLU: lambda m: {"fn": "leaky_relu", "negative_slope": float(m.negative_slope)},
    nn.Tanh: lambda m: {"fn": "tanh"},
}
_ACTIVATION_FUNCTIONS: Dict[Callable, Tuple[str, Tuple[str, ...], Dict[str, Any]]] = {
    F.silu: ("silu", ("input", "inplace"), {}),
    F.gelu: ("gelu", ("input", "approximate"), {"approximate": "none"}),
    F.hardswish: ("hardswish", ("input", "inplace"), {}),
    F.mish: ("mish", ("input", "inplace"), {}),
    F.elu: ("elu", ("input", "alpha", "inplace"), {"alpha": 1.0}),
    F.leaky_relu: ("leaky_relu", ("input", "negative_slope", "inplace"), {"negative_slope": 0.01}),
    torch.tanh: ("tanh", ("input",), {}),
    F.tanh: ("tanh", ("input",), {}),
}
_ACTIVATION_METHODS = {"tanh": "tanh", "tanh_": "tanh"}
_FROZEN_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_FROZEN_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax}
_FROZEN_METHODS = {"sigmoid", "sigmoid_", "softmax"}
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div, operator.matmul,
                      torch.matmul, torch.einsum, torch.bmm}
_PRODUCT_METHODS = {"mul", "mul_", "__mul__", "__rmul__", "div", "div_", "__truediv__", "matmul", "__matmul__", "bmm"}
_NORM_FUNCTIONS = {F.layer_norm: "layer", F.group_norm: "group", F.rms_norm: "rms"}
_WINDOW_ATTENTION = {swin_transformer.shifted_window_attention}
_PAD_FUNCTIONS = {F.pad, swin_transformer._patch_merging_pad}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_TUPLE_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_TUPLE_METHODS = {"chunk", "split", "tensor_split", "unbind"}
_REARRANGE_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                        torch.swapaxes, torch.narrow, torch.movedim, torch.t, torch.roll} | _PAD_FUNCTIONS
_REARRANGE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "squeeze", "unsqueeze",
                      "swapaxes", "narrow", "movedim", "t", "expand", "expand_as", "view_as", "reshape_as", "repeat",
                      "roll"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.getitem, builtins.getattr, builtins.int, builtins.len}
_AFFINE_FUNCTIONS = {F.adaptive_avg_pool2d, torch.mean}
_AFFINE_METHODS = {"mean"}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_AVG_POOL_FUNCTIONS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout}
_CHECKS = {torch._assert}

MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
MAX_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
AVG_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                     "divisor_override": None}


def pair(value: Any) -> Tuple[int, int]:
    """An int or a pair as ``(h, w)``."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass
class Step:
    """One tensor-valued operation of the graph, in forward order.

    ``inputs`` are the names of the steps whose outputs it reads (tensor arguments, in order;
    constants are left out), ``node`` the fx node it comes from (``None`` inside a leaf block),
    ``module`` the module it calls, ``window`` its geometry (conv, pools), ``options`` the rest
    (``dim`` of a cat, ``factor`` of a scale, the pooling flags, an activation's function),
    ``signal`` which inputs receive the signal going down (a product's data operand, an
    attention's values; ``None`` for all)."""

    name: str
    kind: str
    inputs: Tuple[str, ...]
    node: Optional[fx.Node] = None
    module: Optional[nn.Module] = None
    window: Optional[Window] = None
    options: Dict[str, Any] = field(default_factory=dict)
    signal: Optional[Tuple[int, ...]] = None  # the inputs (by index) a signal goes to; None: all
    users: List[str] = field(default_factory=list)


class Unsupported(ValueError):
    """The model holds an operation the deconvnet has no rule for."""


def describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {type(root.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', str(node.target))}"


def bind(node: fx.Node, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """A functional call's arguments by name (positional ones named after ``names``)."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def pool_window(bound: Dict[str, Any]) -> Window:
    kernel = pair(bound["kernel_size"])
    stride = kernel if bound.get("stride") in (None, [], ()) else pair(bound["stride"])
    return Window(kernel, stride, pair(bound.get("padding", 0)), pair(bound.get("dilation", 1)),
                  bool(bound.get("ceil_mode", False)))


def module_step(module: nn.Module, name: str, source: str, node: Optional[fx.Node]) -> Optional[Step]:
    """The step of a module call, or ``None`` when the deconvnet has no rule for it."""
    inputs = (source,)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or module.padding == "same" and any(k % 2 == 0 for k in pair(module.kernel_size)):
            return None
        padding = (0, 0) if module.padding == "valid" else (
            tuple(d * (k - 1) // 2 for d, k in zip(pair(module.dilation), pair(module.kernel_size)))
            if module.padding == "same" else pair(module.padding))
        window = Window(pair(module.kernel_size), pair(module.stride), padding, pair(module.dilation))
        return Step(name, "conv", inputs, node, module, window, {"groups": module.groups})
    if isinstance(module, (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
        if isinstance(module, nn.BatchNorm2d) and not module.track_running_stats:
            return None
        return Step(name, "bn", inputs, node, module)
    if isinstance(module, nn.ReLU):
        return Step(name, "relu", inputs, node, module)
    if isinstance(module, nn.ReLU6) or (type(module) is nn.Hardtanh and module.min_val == 0 and module.max_val == 6):
        return Step(name, "relu6", inputs, node, module)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            return None
        return Step(name, "maxpool", inputs, node, module, pool_window(vars(module)))
    if isinstance(module, nn.AvgPool2d):
        return Step(name, "avgpool", inputs, node, module, pool_window({**vars(module), "dilation": 1}),
                    {"count_include_pad": module.count_include_pad, "divisor_override": module.divisor_override})
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return Step(name, "affine", inputs, node, module)
    if isinstance(module, nn.Linear):
        return Step(name, "linear", inputs, node, module)
    if isinstance(module, nn.Flatten):
        return Step(name, "rearrange", inputs, node, module)
    if isinstance(module, DROPOUTS + (nn.Identity,)):
        return Step(name, "identity", inputs, node, module)
    if isinstance(module, NORMALISATIONS):
        return Step(name, "lrn", inputs, node, module)
    if type(module) in ACTIVATION_MODULES:
        return Step(name, "activation", inputs, node, module, options=ACTIVATION_MODULES[type(module)](module))
    if isinstance(module, _FROZEN_MODULES):
        return Step(name, "frozen", inputs, node, module, options={"source": f"module {type(module).__name__}"})
    if isinstance(module, convnext.LayerNorm2d):  # channels first: F.layer_norm over C after a permute
        return Step(name, "norm", inputs, node, module, options={"how": "layer2d"})
    if isinstance(module, nn.LayerNorm):
        return Step(name, "norm", inputs, node, module, options={"how": "layer"})
    if isinstance(module, nn.GroupNorm):
        return Step(name, "norm", inputs, node, module, options={"how": "group"})
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return Step(name, "norm", inputs, node, module, options={"how": "rms"})
    if isinstance(module, torchvision.ops.SqueezeExcitation):
        return Step(name, "gate", inputs, node, module)
    if isinstance(module, torchvision.ops.StochasticDepth):
        return Step(name, "identity", inputs, node, module)
    if isinstance(module, torchvision.ops.Permute):
        return Step(name, "rearrange", inputs, node, module)
    return None


class NodeClassifier:
    """Turns fx nodes into :class:`Step` s in forward order; :class:`~.capture.Graph` is one. It
    fills ``steps``, ``values``, ``step_of``, ``tuple_source`` and ``frozen``, which the graph
    sets up, reading the traced root through ``model``."""

    steps: Dict[str, "Step"]
    values: Dict[fx.Node, str]
    step_of: Dict[fx.Node, str]
    tuple_source: Dict[fx.Node, fx.Node]
    frozen: set
    names: Dict[fx.Node, str]
    model: nn.Module

    # -- classification ----------------------------------------------------------------------

    def _refuse(self, node: fx.Node, what: Optional[str] = None) -> None:
        name = self.names.get(node, node.name)
        raise Unsupported(
            f"Deconvnet: {type(self.model).__name__} is not supported: node {name!r} ({what or describe(node, self.model)}) "
            "is not an operation the deconvnet can project through (supported: convolutions, BatchNorm in eval, "
            "ReLU, ReLU6, LeakyReLU, SiLU, GELU, Hardswish, Mish, ELU, Tanh, sigmoid/hard-sigmoid gates, "
            "LayerNorm/GroupNorm/RMSNorm, attention, max/avg/adaptive-avg pooling, add, cat/chunk/split/view/"
            "permute/pad/roll, linear, dropout, LocalResponseNorm, identity; docs/engine.md)"
        )

    def _add(self, step: Step) -> str:
        self.steps[step.name] = step
        if step.kind == "frozen":
            self.frozen.add(step.name)
        return step.name

    def _tensor_args(self, node: fx.Node) -> List[fx.Node]:
        found: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if self.values.get(n) == "tensor" else None)
        return found

    def _classify(self, node: fx.Node) -> None:
        name = self.names.get(node, node.name)
        if node.op == "placeholder":
            if self.output is not None or any(s.kind == "input" for s in self.steps.values()):
                self._refuse(node, "a second input")
            self.values[node] = "tensor"
            self.step_of[node] = self._add(Step(name, "input", ()))
            return
        if node.op == "get_attr":
            self.values[node] = "const"
            return
        if node.op == "output":
            outs = self._tensor_args(node)
            if len(outs) != 1:
                self._refuse(node, f"{len(outs)} tensor outputs")
            self.output = self.step_of[outs[0]]
            return
        tensors = self._tensor_args(node)
        kinds = set()
        fx.node.map_arg((node.args, node.kwargs), lambda n: kinds.add(self.values.get(n)))
        if not tensors:
            if kinds & {"tuple", "attention"} and node.op == "call_function" and node.target is operator.getitem:
                self._classify_tuple_item(node, name)
                return
            # Sizes, their arithmetic, and constants: evaluated, never projected through.
            self.values[node] = "const" if "const" in kinds and "shape" not in kinds else "shape"
            if node.op == "call_function" and node.target in _CHECKS:
                self.values[node] = "none"
            return
        self.values[node] = "tensor"
        if all(self.step_of[t] in self.frozen for t in tensors):
            # Computed from frozen values alone (a gate's arithmetic): frozen too.
            self._new(node, name, "frozen", tensors)
        elif node.op == "call_module":
            self._classify_module(node, name, tensors)
        elif node.op == "call_method":
            self._classify_method(node, name, tensors)
        else:
            self._classify_function(node, name, tensors)

    def _new(self, node: fx.Node, name: str, kind: str, inputs: Sequence[fx.Node], **extra: Any) -> None:
        self.step_of[node] = self._add(Step(name, kind, tuple(self.step_of[n] for n in inputs), node=node, **extra))

    def _opaque(self, node: fx.Node, name: str, tensors: Sequence[fx.Node], what: Optional[str] = None) -> None:
        """A step without a rule: evaluated going up, refused if a signal can reach it."""
        self._new(node, name, "opaque", tensors, options={"refusal": what or describe(node, self.model)})

    def _classify_tuple_item(self, node: fx.Node, name: str) -> None:
        source = node.args[0]
        self.values[node] = "tensor"
        origin = self.tuple_source[source]
        if self.values.get(source) == "attention":  # (output, weights)[0] of nn.MultiheadAttention
            if node.args[1] != 0:
                if node.users:
                    self._refuse(node, "the attention weights of nn.MultiheadAttention (need_weights)")
                self.values[node] = "none"  # (x, _ = attention(...)): unused
                return
            self._new(node, name, "identity", [origin])
            return
        self._new(node, name, "rearrange", [origin])

    def _classify_module(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        module = self.model.get_submodule(node.target)
        if isinstance(module, nn.MultiheadAttention):
            self._classify_mha(node, name, module)
            return
        if len(tensors) != 1:
            self._opaque(node, name, tensors)
            return
        source = self.step_of[tensors[0]]
        if isinstance(module, nn.Sequential):  # a torchvision leaf block: its children as a chain
            children = list(module.children())
            for i, child in enumerate(children):
                step_name = name if i == len(children) - 1 else f"{name}.{i}"
                step = module_step(child, step_name, source, None)
                if step is None:
                    self._refuse(node, f"module {type(module).__name__} holding {type(child).__name__}")
                source = self._add(step)
            if not children:
                source = self._add(Step(name, "identity", (source,), node=node, module=module))
            self.step_of[node] = source
            return
        step = module_step(module, name, source, node)
        if step is None:
            self._opaque(node, name, tensors)
            return
        self.step_of[node] = self._add(step)

    def _classify_mha(self, node: fx.Node, name: str, module: nn.MultiheadAttention) -> None:
        bound = bind(node, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                             "average_attn_weights", "is_causal"),
                      {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "is_causal": False})
        if not module.batch_first:
            self._refuse(node, "nn.MultiheadAttention with batch_first=False")
        if any(bound[k] is not None for k in ("key_padding_mask", "attn_mask")) or bound["is_causal"]:
            self._refuse(node, "nn.MultiheadAttention with a mask")
        if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
            self._refuse(node, "nn.MultiheadAttention with bias_k, add_zero_attn or kdim/vdim")
        parts = [bound["query"], bound["key"], bound["value"]]
        if any(self.values.get(p) != "tensor" for p in parts):
            self._refuse(node, "nn.MultiheadAttention on a constant")
        value = parts[2]
        inputs = list(dict.fromkeys(parts))
        self.values[node] = "attention"
        self.tuple_source[node] = node
        step = Step(name, "attention", tuple(self.step_of[p] for p in inputs), node=node, module=module,
                    options={"how": "mha", "parts": tuple(inputs.index(p) for p in parts)},
                    signal=(inputs.index(value),))
        self.step_of[node] = self._add(step)

    def _classify_method(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        target = node.target
        if target in _RELU_METHODS:
            self._new(node, name, "relu", tensors[:1])
        elif target in _ACTIVATION_METHODS:
            self._new(node, name, "activation", tensors[:1], options={"fn": _ACTIVATION_METHODS[target]})
        elif target in _FROZEN_METHODS:
            self._new(node, name, "frozen", tensors, options={"source": f"method .{target}()"})
        elif target in _ADD_METHODS:
            self._classify_add(node, name, tensors)
        elif target in _TUPLE_METHODS and len(tensors) == 1:
            self.values[node] = "tuple"
            self.tuple_source[node] = tensors[0]
        elif target in _REARRANGE_METHODS and len(tensors) == 1:
            self._new(node, name, "rearrange", tensors)
        elif target in _AFFINE_METHODS and len(tensors) == 1:
            self._new(node, name, "affine", tensors)
        elif target in _SHAPE_METHODS:
            self.values[node] = "shape"
        elif target in ("mul", "div", "__mul__", "__truediv__") and len(tensors) == 1 and isinstance(node.args[1], (int, float)):
            factor = float(node.args[1])
            self._new(node, name, "scale", tensors, options={"factor": factor if "mul" in target else 1.0 / factor})
        elif target in _PRODUCT_METHODS:
            self._classify_product(node, name, tensors)
        else:
            self._opaque(node, name, tensors)

    def _classify_function(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        target = node.target
        if target in _RELU_FUNCTIONS:
            self._new(node, name, "relu", tensors[:1])
        elif target is F.relu6 or (target is F.hardtanh and bind(node, ("input", "min_val", "max_val"),
                                                                   {"min_val": -1.0, "max_val": 1.0}).get("min_val") == 0.0
                                   and bind(node, ("input", "min_val", "max_val"), {}).get("max_val") == 6.0):
            self._new(node, name, "relu6", tensors[:1])
        elif target in _ACTIVATION_FUNCTIONS and node.args and node.args[0] is tensors[0] and len(tensors) == 1:
            fn, names, defaults = _ACTIVATION_FUNCTIONS[target]
            bound = bind(node, names, defaults)
            options = {"fn": fn, **{k: bound[k] for k in defaults}}
            self._new(node, name, "activation", tensors, options=options)
        elif target in _FROZEN_FUNCTIONS:
            self._new(node, name, "frozen", tensors, options={"source": f"function {target.__name__}"})
        elif target in _ADD_FUNCTIONS:
            self._classify_add(node, name, tensors)
        elif target in _CAT_FUNCTIONS:
            pieces = node.args[0] if node.args else node.kwargs.get("tensors", ())
            if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
                self._refuse(node, "cat of a non-list")
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            data = [self.values.get(p) == "tensor" for p in pieces]
            if sum(data) != len(tensors) or any(self.step_of[p] in self.frozen for p, d in zip(pieces, data) if d):
                self._opaque(node, name, tensors, "cat of a frozen value")
                return
            self._new(node, name, "cat", tensors, options={
                "dim": int(dim), "pieces": tuple(self.step_of[p] if d else None for p, d in zip(pieces, data))})
        elif target in _TUPLE_FUNCTIONS and len(tensors) == 1:
            self.values[node] = "tuple"
            self.tuple_source[node] = tensors[0]
        elif target is operator.getitem and len(tensors) == 1 and node.args[0] is tensors[0]:
            self._new(node, name, "rearrange", tensors)  # slicing a tensor
        elif target in _REARRANGE_FUNCTIONS and len(tensors) == 1 and node.args and node.args[0] is tensors[0]:
            if target is F.pad and bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None}
                                         ).get("mode") != "constant":
                self._opaque(node, name, tensors, "F.pad other than constant")
                return
            self._new(node, name, "rearrange", tensors)
        elif target in _AFFINE_FUNCTIONS and len(tensors) == 1:
            self._new(node, name, "affine", tensors)
        elif target in _MAX_POOL_FUNCTIONS and len(tensors) == 1:
            bound = bind(node, MAX_POOL_ARGS, MAX_POOL_DEFAULTS)
            if bound["return_indices"]:
                self._refuse(node, "max_pool2d with return_indices")
            self._new(node, name, "maxpool", tensors, window=pool_window(bound))
        elif target in _AVG_POOL_FUNCTIONS and len(tensors) == 1:
            bound = bind(node, AVG_POOL_ARGS, AVG_POOL_DEFAULTS)
            self._new(node, name, "avgpool", tensors, window=pool_window({**bound, "dilation": 1}),
                      options={k: bound[k] for k in ("count_include_pad", "divisor_override")})
        elif target is F.linear and len(tensors) == 1 and node.args[0] is tensors[0]:
            self._new(node, name, "linear", tensors)
        elif target in _DROPOUT_FUNCTIONS and len(tensors) == 1:
            self._new(node, name, "identity", tensors)
        elif target in (operator.mul, operator.truediv, torch.mul) and len(tensors) == 1 and \
                any(isinstance(a, (int, float)) for a in node.args):
            number = next(float(a) for a in node.args if isinstance(a, (int, float)))
            factor = number if target is not operator.truediv else 1.0 / number
            if target is operator.truediv and node.args[0] is not tensors[0]:
                self._refuse(node, "a number divided by a tensor")
            self._new(node, name, "scale", tensors, options={"factor": factor})
        elif target in _PRODUCT_FUNCTIONS:
            self._classify_product(node, name, tensors)
        elif target in _NORM_FUNCTIONS and node.args and node.args[0] is tensors[0] and len(tensors) == 1:
            self._classify_norm_function(node, name, tensors)
        elif target is F.scaled_dot_product_attention:
            self._classify_sdpa(node, name, tensors)
        elif target in _WINDOW_ATTENTION and node.args and node.args[0] is tensors[0] and len(tensors) == 1:
            self._new(node, name, "attention", tensors, options={"how": "window"})
        elif target in _CHECKS:
            self.values[node] = "none"
        elif target is builtins.getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
            self.values[node] = "shape"
        else:
            self._opaque(node, name, tensors)

    def _classify_add(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        if node.kwargs.get("alpha", 1) != 1:
            self._opaque(node, name, tensors, "add with alpha")
        elif len(tensors) == 2 and len(node.args) >= 2 and node.args[0] is not node.args[1]:
            self._new(node, name, "add", tensors)
        elif len(tensors) == 1 and not (len(node.args) >= 2 and node.args[0] is node.args[1]):
            self._new(node, name, "bias", tensors)  # a tensor plus a constant: dropped going down
        else:
            self._opaque(node, name, tensors, "x + x")

    def _classify_product(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        """``a * s``, ``a / s``, ``A @ v``, ``einsum``: linear in its one operand that is neither
        a constant nor frozen (``options["data"]`` is that operand's step)."""
        data = [t for t in tensors if self.step_of[t] not in self.frozen]
        if len(data) != 1 or sum(1 for a in node.args if a is data[0]) + sum(
                1 for a in node.kwargs.values() if a is data[0]) != 1:
            self._opaque(node, name, tensors, f"{describe(node, self.model)}: a product of two data tensors that is "
                                              "not a gate (neither is a sigmoid/softmax output or a constant)")
            return
        divides = node.target in (operator.truediv, torch.div, "div", "div_", "__truediv__")
        if divides and (not node.args or node.args[0] is not data[0]):
            self._opaque(node, name, tensors, "division by a data tensor")
            return
        signal = tensors.index(data[0])
        self._new(node, name, "product", tensors, signal=(signal,), options={"operands": tuple(tensors)})

    def _classify_norm_function(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        how = _NORM_FUNCTIONS[node.target]
        names = {"layer": ("input", "normalized_shape", "weight", "bias", "eps"),
                 "group": ("input", "num_groups", "weight", "bias", "eps"),
                 "rms": ("input", "normalized_shape", "weight", "eps")}[how]
        self._new(node, name, "norm", tensors, options={"how": how, "names": names})

    def _classify_sdpa(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        bound = bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                      {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
        if bound["dropout_p"] or bound["enable_gqa"]:
            self._opaque(node, name, tensors, "scaled_dot_product_attention with dropout or grouped queries")
            return
        if any(self.values.get(bound[k]) != "tensor" for k in ("query", "key", "value")):
            self._opaque(node, name, tensors, "scaled_dot_product_attention on constants")
            return
        value = bound["value"]
        if isinstance(bound["attn_mask"], fx.Node) and self.values.get(bound["attn_mask"]) == "tensor" and \
                self.step_of[bound["attn_mask"]] not in self.frozen:
            self._opaque(node, name, tensors, "scaled_dot_product_attention with a data-dependent mask")
            return
        self._new(node, name, "attention", tensors, options={"how": "sdpa"}, signal=(tensors.index(value),))
