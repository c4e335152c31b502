"""Graph capture: any eval-mode ``nn.Module`` traced by torchvision's feature-extraction tracer,
and every node classified into a step kind the deconvnet has a rule for (docs/engine.md,
"Semantics"). The rules themselves live in :mod:`zfkernels.engine.rules`, one per kind.

Names are torchvision's feature-extraction node names
(``torchvision.models.feature_extraction.get_graph_node_names(model)[1]``): ``layer1.0.relu_1``,
``features.denseblock2.denselayer3.relu2``. A torchvision leaf block (``Conv2dNormActivation``,
torchvision's ``MLP``, any leaf ``nn.Sequential``) is one node whose children run as steps named
``<node>.0``, ``<node>.1``…, the last one carrying the node's own name. The zoo's ``.features``
stacks (ZFNet, AlexNet, VGG16) also answer to ``conv1``…``conv5`` / ``conv1_1``… and ``fc6``,
``fc7``; a module path (``layer2``) names the last node inside it, as in
``create_feature_extractor``.

Frozen values (docs/engine.md, "Why freeze"): sigmoid, hard-sigmoid and softmax outputs, and
whatever is computed from them alone, are constants going down. A step whose only readers are
frozen values (the branch of a squeeze-excitation, the queries and keys of an attention) never
receives a signal, so it may be any operation. Anything else without a rule is refused when the
graph is built, naming the node.
"""

from __future__ import annotations

import builtins
import difflib
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import convnext, swin_transformer
from torchvision.models.feature_extraction import NodePathTracer

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


# -- tracing -------------------------------------------------------------------------------------


class _ControlFlow(Exception):
    """A traced value decides a Python branch (``if x.sum() > 0``): the node it comes from."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


class _Tracer(NodePathTracer):
    """torchvision's tracer, which names the node whose value a Python branch would need."""

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise _ControlFlow(self.node_to_qualname.get(obj.node, obj.node.name))


def _tracer() -> NodePathTracer:
    """torchvision's tracer with its defaults (torchvision.ops modules as leaves, math wrapped)."""
    leaves = [obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)]
    return _Tracer(autowrap_modules=(math, torchvision.ops), leaf_modules=leaves)


def _trace(model: nn.Module) -> Tuple[fx.Graph, Dict[fx.Node, str]]:
    """The eval-mode graph of ``model`` and each node's feature-extraction name."""
    tracer = _tracer()
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


def _traceable(model: nn.Module) -> nn.Module:
    if type(model).forward is nn.Module.forward and all(hasattr(model, part) for part in ("features", "avgpool", "classifier")):
        return ZooForward(model)
    return model


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {type(root.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', str(node.target))}"


def _bind(node: fx.Node, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """A functional call's arguments by name (positional ones named after ``names``)."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


# -- the graph -----------------------------------------------------------------------------------


class Graph:
    """The classified graph of one model: ``steps`` in forward order (see :class:`Step`),
    ``layers`` (the names pages use: the zoo's aliases where it has them, else node names),
    ``nodes`` (every projectable node name) and ``aliases`` (alias -> step name).

    Shapes, layouts and receptive boxes per input size come from :meth:`geometry`, computed
    once per size (:mod:`zfkernels.engine.geometry`)."""

    @property
    def model(self) -> nn.Module:
        """The traced root: the model, or its zoo-style wrapper."""
        root = self._root()
        if root is None:
            raise ReferenceError("Deconvnet: the model this graph was traced from no longer exists")
        return root

    def __init__(self, model: nn.Module) -> None:
        root = _traceable(model)  # the traced root: the model, or its zoo-style wrapper
        # graph_of caches graphs in a WeakKeyDictionary keyed by the model: a strong reference
        # to the model from here would keep every model ever traced alive. The zoo wrapper
        # holds only the model's parts, so it may be kept as it is.
        self._root: Callable[[], Optional[nn.Module]] = weakref.ref(root) if root is model else (lambda: root)
        self.graph, self.names = _trace(root)
        self.steps: Dict[str, Step] = {}
        self.values: Dict[fx.Node, str] = {}  # node -> "tensor" | "const" | "shape" | "tuple" | "none"
        self.step_of: Dict[fx.Node, str] = {}  # tensor node -> the step holding its value
        self.tuple_source: Dict[fx.Node, fx.Node] = {}  # chunk/split node -> its tensor input
        self.frozen: set = set()  # steps whose value is a constant going down
        self.reached: set = set()  # steps a signal can reach from the output
        self.output: Optional[str] = None
        self._reads: Dict[str, Tuple[str, ...]] = {}
        self._geometries: Dict[Tuple[int, int], Any] = {}  # image size -> engine.geometry.Geometry
        self._layers: Optional[Tuple[List[str], List[str]]] = None
        size = getattr(model, "image_size", 224)
        self.canonical_size: Tuple[int, int] = pair(size) if isinstance(size, (int, tuple, list)) else (224, 224)
        for node in self.graph.nodes:
            self._classify(node)
        for step in self.steps.values():
            for name in step.inputs:
                self.steps[name].users.append(step.name)
        self.order = list(self.steps)
        self.position = {name: i for i, name in enumerate(self.order)}
        self._check_signal_paths()
        self.aliases: Dict[str, str] = _zoo_aliases(model, self)

    @property
    def node_names(self) -> set:
        return set(self.names.values())

    def geometry(self, image_size: Tuple[int, int]) -> Any:
        """Shapes, layouts and receptive boxes for images of ``image_size``
        (:class:`zfkernels.engine.geometry.Geometry`), computed once per size."""
        from .geometry import Geometry  # geometry runs the walker, which reads this module

        size = (int(image_size[0]), int(image_size[1]))
        found = self._geometries.get(size)
        if found is None:
            found = self._geometries[size] = Geometry(self, size)
        return found

    def _listing(self) -> Tuple[List[str], List[str]]:
        if self._layers is None:
            geometry = self.geometry(self.canonical_size)
            nodes = [name for name in self.order if name in self.node_names and geometry.is_map(name)
                     and self._projectable(name)]
            by_step = {step: alias for alias, step in self.aliases.items() if not alias.startswith("fc")}
            self._layers = (nodes, [by_step.get(name, name) for name in nodes])
        return self._layers

    def present(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Step ``name``'s raw output as ``(N, C, H, W)`` (channels-last grids permuted, token
        sequences on their patch grid without the class token), by the layout found at the
        canonical size: no geometry pass at ``value``'s size, so pass 1 runs nothing but the
        network itself."""
        geometry = self.geometry(self.canonical_size)
        layout = geometry.layout(name)
        if layout == "NHWC":
            return value.permute(0, 3, 1, 2)
        if layout != "tokens":
            return value
        labels = geometry.labels[name]
        tokens = value.shape[1] - labels.prefix
        h0, w0 = labels.grid
        h = h0 if tokens == h0 * w0 else max(1, round(math.sqrt(tokens * h0 / w0)))
        if tokens % h:
            raise ValueError(f"Deconvnet: {tokens} tokens of {name!r} do not make a grid like its {h0}x{w0}")
        return value[:, labels.prefix:, :].transpose(1, 2).reshape(value.shape[0], value.shape[2], h, tokens // h)

    @property
    def nodes(self) -> List[str]:
        """Every projectable node, in forward order: activation outputs, block outputs and
        rectified concatenations whose output is a feature map or a token grid (at the model's
        canonical input size)."""
        return self._listing()[0]

    @property
    def rectified_nodes(self) -> List[str]:
        """The :attr:`nodes` that are an activation's output or a concatenation of rectified
        maps (no block outputs): the layers of the ReLU families before issue #18."""
        return [name for name in self.nodes if self.steps[name].kind in ACTIVATIONS or self._rectified(name)]

    def _rectified(self, name: str) -> bool:
        step = self.steps[name]
        if step.kind == "cat":
            return all(self._ends_in_rectifier(i) for i in step.inputs)
        return step.kind == "rearrange" and step.node is not None and _is_channel_shuffle_view(step, self) and \
            self._ends_in_rectifier(step.inputs[0])

    @property
    def layers(self) -> List[str]:
        """:attr:`nodes` by the names pages use (the zoo's aliases where it has them)."""
        return self._listing()[1]

    # -- classification ----------------------------------------------------------------------

    def _refuse(self, node: fx.Node, what: Optional[str] = None) -> None:
        name = self.names.get(node, node.name)
        raise Unsupported(
            f"Deconvnet: {type(self.model).__name__} is not supported: node {name!r} ({what or _describe(node, self.model)}) "
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
        self._new(node, name, "opaque", tensors, options={"refusal": what or _describe(node, self.model)})

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
                step = _module_step(child, step_name, source, None)
                if step is None:
                    self._refuse(node, f"module {type(module).__name__} holding {type(child).__name__}")
                source = self._add(step)
            if not children:
                source = self._add(Step(name, "identity", (source,), node=node, module=module))
            self.step_of[node] = source
            return
        step = _module_step(module, name, source, node)
        if step is None:
            self._opaque(node, name, tensors)
            return
        self.step_of[node] = self._add(step)

    def _classify_mha(self, node: fx.Node, name: str, module: nn.MultiheadAttention) -> None:
        bound = _bind(node, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
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
        elif target is F.relu6 or (target is F.hardtanh and _bind(node, ("input", "min_val", "max_val"),
                                                                   {"min_val": -1.0, "max_val": 1.0}).get("min_val") == 0.0
                                   and _bind(node, ("input", "min_val", "max_val"), {}).get("max_val") == 6.0):
            self._new(node, name, "relu6", tensors[:1])
        elif target in _ACTIVATION_FUNCTIONS and node.args and node.args[0] is tensors[0] and len(tensors) == 1:
            fn, names, defaults = _ACTIVATION_FUNCTIONS[target]
            bound = _bind(node, names, defaults)
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
            if target is F.pad and _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None}
                                         ).get("mode") != "constant":
                self._opaque(node, name, tensors, "F.pad other than constant")
                return
            self._new(node, name, "rearrange", tensors)
        elif target in _AFFINE_FUNCTIONS and len(tensors) == 1:
            self._new(node, name, "affine", tensors)
        elif target in _MAX_POOL_FUNCTIONS and len(tensors) == 1:
            bound = _bind(node, MAX_POOL_ARGS, MAX_POOL_DEFAULTS)
            if bound["return_indices"]:
                self._refuse(node, "max_pool2d with return_indices")
            self._new(node, name, "maxpool", tensors, window=_pool_window(bound))
        elif target in _AVG_POOL_FUNCTIONS and len(tensors) == 1:
            bound = _bind(node, AVG_POOL_ARGS, AVG_POOL_DEFAULTS)
            self._new(node, name, "avgpool", tensors, window=_pool_window({**bound, "dilation": 1}),
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
            self._opaque(node, name, tensors, f"{_describe(node, self.model)}: a product of two data tensors that is "
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
        bound = _bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
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

    # -- where the signal goes ---------------------------------------------------------------

    def signal_inputs(self, name: str) -> Tuple[str, ...]:
        """The inputs of step ``name`` that receive its signal going down (all its inputs but
        frozen ones; for a product or an attention, only the data operand or the values)."""
        step = self.steps[name]
        if step.kind in ("frozen", "input"):
            return ()
        if step.signal is not None:
            return tuple(step.inputs[i] for i in step.signal)
        return step.inputs

    def _check_signal_paths(self) -> None:
        """Refuse, naming the node, any step a signal can reach from the output without a rule:
        an opaque operation, or a sigmoid/softmax used other than as a gate or attention
        weights (freezing it there would be silently wrong)."""
        if self.output is None:
            return
        seen = {self.output}
        stack = [self.output]
        while stack:
            name = stack.pop()
            step = self.steps[name]
            if step.kind == "opaque":
                self._refuse(step.node, step.options.get("refusal"))
            if step.kind == "frozen":
                while "source" not in step.options:  # computed from frozen values: name the first
                    step = self.steps[step.inputs[0]]
                what = step.options["source"]
                self._refuse(step.node, f"{what} whose output is used other than as a gate or attention weights")
            for source in self.signal_inputs(name):
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
        self.reached = seen

    # -- what can be projected ---------------------------------------------------------------

    def _projectable(self, name: str) -> bool:
        """A pointwise activation's output, a gate's (squeeze-excitation) output, a block output
        (the last node of a composite module, other than a pooling, an identity or an
        ``affine`` reduction), or a concatenation of
        projectable maps (through max pooling and rearrangements): a block whose every path
        ends in a rectifier. Steps outside the signal's reach (a gate's branch) are not."""
        step = self.steps[name]
        if name not in self.reached or step.kind in ("frozen", "input"):
            return False
        if step.kind in ACTIVATIONS or step.kind == "gate":  # a squeeze-excitation module's gated output too
            return True
        if step.kind == "cat":
            return all(self._ends_in_rectifier(i) for i in step.inputs)
        if step.kind == "rearrange" and step.node is not None and not any(
                self.steps[u].kind == "rearrange" for u in step.users) and _is_channel_shuffle_view(step, self) and \
                self._ends_in_rectifier(step.inputs[0]):
            return True
        return name in self.block_outputs and step.kind not in ("maxpool", "avgpool", "affine", "identity")

    @property
    def block_outputs(self) -> set:
        """The last node inside each composite module (``features.1.2`` -> ``features.1.2.add``):
        a node named ``<module>.<op>`` belongs to every module its name's prefixes name."""
        found = getattr(self, "_block_outputs", None)
        if found is None:
            last: Dict[str, str] = {}
            for node_name in self.order:
                if node_name not in self.node_names:
                    continue
                parts = node_name.split(".")
                for i in range(1, len(parts)):
                    last[".".join(parts[:i])] = node_name
            found = self._block_outputs = set(last.values())
            if self.output is not None and self.output in self.node_names:  # the model itself is a block
                found.add(self.output)
        return found

    def _ends_in_rectifier(self, name: str) -> bool:
        step = self.steps[name]
        if step.kind in ("rearrange", "maxpool"):
            return self._ends_in_rectifier(step.inputs[0])
        return step.kind in RECTIFIERS or (step.kind == "cat" and all(self._ends_in_rectifier(i) for i in step.inputs))

    def resolve(self, layer: str) -> str:
        """The step a layer name means: a node name, a zoo alias, or a module path (its last
        node). Raises ``ValueError`` with close names for anything else."""
        if not isinstance(layer, str):
            raise TypeError(f"Deconvnet: a layer name must be a str, got {type(layer).__name__}")
        if layer in self.aliases:
            return self.aliases[layer]
        if layer in self.steps and layer in self.node_names:
            return layer
        if layer == "logits" and self.output is not None:
            return self.output
        inside = [name for name in self.order if name.startswith(layer + ".") and name in self.node_names]
        if inside and inside[-1] in self.nodes:
            return inside[-1]
        raise ValueError(unknown_layer_message(layer, self.layers, [*self.nodes, *self.aliases]))

    def reads(self, name: str) -> Tuple[str, ...]:
        """The steps whose outputs ``name`` reads: its inputs, and those its size arguments
        (``x.size()``…) come from."""
        cached = self._reads.get(name)
        if cached is None:
            step = self.steps[name]
            found = list(step.inputs)
            seen: set = set()

            def visit(n: fx.Node) -> None:
                if n in seen:
                    return
                seen.add(n)
                if self.values.get(n) == "tensor":
                    found.append(self.step_of[n])
                    return
                fx.node.map_arg((n.args, n.kwargs), visit)

            if step.node is not None:
                fx.node.map_arg((step.node.args, step.node.kwargs), visit)
            cached = self._reads[name] = tuple(dict.fromkeys(found))
        return cached

    def ancestors(self, name: str) -> List[str]:
        """The steps ``name`` depends on going up, itself included, in forward order."""
        return self._closure(name, self.reads)

    def signal_ancestors(self, name: str) -> List[str]:
        """The steps a signal seeded at ``name`` passes through going down, itself included,
        in forward order (frozen values and the branches only they read are left out)."""
        return self._closure(name, self.signal_inputs)

    def _closure(self, name: str, edges: Callable[[str], Sequence[str]]) -> List[str]:
        seen = {name}
        stack = [name]
        while stack:
            for i in edges(stack.pop()):
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return [n for n in self.order if n in seen]


def unknown_layer_message(layer: str, layers: Sequence[str], others: Sequence[str] = ()) -> str:
    """``unknown layer 'x'; did you mean …? valid layers: …`` with difflib's close names."""
    candidates = list(dict.fromkeys([*layers, *others]))
    close = difflib.get_close_matches(str(layer), candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(layers[:40]) + (f" … ({len(layers)} in all)" if len(layers) > 40 else "")
    return f"unknown layer {layer!r}{hint}; valid layers: {shown}"


def _view_dims(node: fx.Node) -> Optional[int]:
    """How many dimensions a view/reshape asks for (``None`` for other nodes)."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
    elif node.op == "call_function" and node.target is torch.reshape:
        shape = node.args[1:]
    else:
        return None
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return len(shape)


def _is_channel_shuffle_view(step: Step, graph: Graph) -> bool:
    """A view/reshape back to four dimensions (the last view of a channel shuffle)."""
    return step.node is not None and _view_dims(step.node) == 4


def _pool_window(bound: Dict[str, Any]) -> Window:
    kernel = pair(bound["kernel_size"])
    stride = kernel if bound.get("stride") in (None, [], ()) else pair(bound["stride"])
    return Window(kernel, stride, pair(bound.get("padding", 0)), pair(bound.get("dilation", 1)),
                  bool(bound.get("ceil_mode", False)))


def _module_step(module: nn.Module, name: str, source: str, node: Optional[fx.Node]) -> Optional[Step]:
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
        return Step(name, "maxpool", inputs, node, module, _pool_window(vars(module)))
    if isinstance(module, nn.AvgPool2d):
        return Step(name, "avgpool", inputs, node, module, _pool_window({**vars(module), "dilation": 1}),
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


# -- the zoo's aliases ---------------------------------------------------------------------------


def _zoo_aliases(model: nn.Module, graph: Graph) -> Dict[str, str]:
    """``conv1``… (``conv1_1``… when the first block holds several convolutions) for the ReLU
    after each convolution of a zoo-style ``.features`` stack (Conv2d, ReLU, MaxPool2d, LRN
    only), and ``fc6``, ``fc7``… for the ReLUs after the classifier's linear layers."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return {}
    children = list(features.named_children())
    allowed = (nn.Conv2d, nn.ReLU, nn.MaxPool2d) + NORMALISATIONS + (nn.Identity,)
    if not children or not all(isinstance(m, allowed) for _, m in children):
        return {}
    blocks: List[List[str]] = [[]]  # per pooling block: the node of each conv's ReLU
    for i, (_, module) in enumerate(children):
        if isinstance(module, nn.Conv2d):
            if i + 1 >= len(children) or not isinstance(children[i + 1][1], nn.ReLU):
                return {}
            blocks[-1].append(f"features.{children[i + 1][0]}")
        elif isinstance(module, nn.MaxPool2d) and blocks[-1]:
            blocks.append([])
    vgg_style = len(blocks[0]) > 1
    aliases: Dict[str, str] = {}
    count = 0
    for b, block in enumerate(blocks, start=1):
        for j, node in enumerate(block, start=1):
            count += 1
            if node in graph.steps:
                aliases[f"conv{b}_{j}" if vgg_style else f"conv{count}"] = node
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential):
        linear = 0
        for key, module in classifier.named_children():
            if isinstance(module, nn.Linear):
                linear += 1
            elif isinstance(module, nn.ReLU) and linear and f"classifier.{key}" in graph.steps:
                aliases[f"fc{5 + linear}"] = f"classifier.{key}"
    return aliases




# -- the one forward walker ---------------------------------------------------------------------

_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, Graph]" = weakref.WeakKeyDictionary()


def graph_of(model: nn.Module) -> Graph:
    """The model's :class:`Graph`, traced once per model object (steps hold the live modules,
    so loading other weights later is seen)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Deconvnet: the model must be an nn.Module, got {type(model).__name__}")
    graph = _GRAPHS.get(model)
    if graph is None:
        graph = Graph(model)
        _GRAPHS[model] = graph
    return graph


def projectable_layers(model: nn.Module) -> List[str]:
    """Every projectable node of ``model`` in forward order: the output of a ReLU or ReLU6 (or
    of a torchvision leaf block ending in one), or a concatenation of such maps, that is still a
    feature map (not in the classifier). Names are feature-extraction node names. Raises
    :class:`Unsupported` (a ``ValueError``) for a model the deconvnet cannot handle."""
    return list(graph_of(model).nodes)


def layer_aliases(model: nn.Module) -> Dict[str, str]:
    """The zoo's alias -> node name (``conv1`` -> ``features.1``); empty for other models."""
    return dict(graph_of(model).aliases)
