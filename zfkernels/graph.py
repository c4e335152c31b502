"""Graph capture: any eval-mode ``nn.Module`` traced by torchvision's feature-extraction tracer,
every node classified into the operations the deconvnet knows (GUIDE section 2), and one forward
walker on node outputs that pass 1, the diagnostics and ``Deconvnet.record`` all use.

Names are torchvision's feature-extraction node names
(``torchvision.models.feature_extraction.get_graph_node_names(model)[1]``): ``layer1.0.relu_1``,
``features.denseblock2.denselayer3.relu2``. A torchvision leaf block (``Conv2dNormActivation``,
any leaf ``nn.Sequential``) is one node whose children run as steps named ``<node>.0``,
``<node>.1``…, the last one carrying the node's own name. The zoo's ``.features`` stacks
(ZFNet, AlexNet, VGG16) also answer to ``conv1``…``conv5`` / ``conv1_1``… and ``fc6``, ``fc7``;
a module path (``layer2``) names the last node inside it, as in ``create_feature_extractor``.

Anything outside the supported operations is refused when the graph is built, naming the first
unsupported operation and its node.
"""

from __future__ import annotations

import builtins
import difflib
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import NodePathTracer

from .receptive_field import Window

# -- the supported operations ------------------------------------------------------------------

#: Step kinds. ``relu`` and ``relu6`` are the rectifiers; ``rearrange`` moves elements without
#: arithmetic (view, transpose, slicing, chunk…); ``linear`` is ``nn.Linear``/``F.linear``;
#: ``affine`` is any other linear map whose transpose autograd gives (adaptive pooling, mean);
#: ``identity`` covers dropout and ``nn.Identity``; ``bias`` adds a constant; ``scale``
#: multiplies by a number.
KINDS = ("input", "conv", "bn", "relu", "relu6", "maxpool", "avgpool", "add", "cat", "rearrange", "linear",
         "affine", "identity", "bias", "scale", "lrn")
RECTIFIERS = ("relu", "relu6")
NORMALISATIONS = (nn.LocalResponseNorm, nn.CrossMapLRN2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_TUPLE_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_TUPLE_METHODS = {"chunk", "split", "tensor_split", "unbind"}
_REARRANGE_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                        torch.swapaxes, torch.narrow, torch.movedim, torch.t}
_REARRANGE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "squeeze", "unsqueeze",
                      "swapaxes", "narrow", "movedim", "t", "expand", "expand_as", "view_as", "reshape_as", "repeat"}
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
    (``dim`` of a cat, ``factor`` of a scale, the pooling flags)."""

    name: str
    kind: str
    inputs: Tuple[str, ...]
    node: Optional[fx.Node] = None
    module: Optional[nn.Module] = None
    window: Optional[Window] = None
    options: Dict[str, Any] = field(default_factory=dict)
    users: List[str] = field(default_factory=list)


class Unsupported(ValueError):
    """The model holds an operation the deconvnet has no rule for."""


# -- tracing -------------------------------------------------------------------------------------


def _tracer() -> NodePathTracer:
    """torchvision's tracer with its defaults (torchvision.ops modules as leaves, math wrapped)."""
    leaves = [obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)]
    return NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=leaves)


def _trace(model: nn.Module) -> Tuple[fx.Graph, Dict[fx.Node, str]]:
    """The eval-mode graph of ``model`` and each node's feature-extraction name."""
    tracer = _tracer()
    training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
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
    ``nodes`` (every projectable node name) and ``aliases`` (alias -> step name)."""

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
        self.output: Optional[str] = None
        self._reads: Dict[str, Tuple[str, ...]] = {}
        self.layouts: Dict[Tuple[int, int], "Tape"] = {}  # image size -> shapes (Deconvnet.layout)
        for node in self.graph.nodes:
            self._classify(node)
        for step in self.steps.values():
            for name in step.inputs:
                self.steps[name].users.append(step.name)
        self.order = list(self.steps)
        self.position = {name: i for i, name in enumerate(self.order)}
        self.spatial = self._spatial_steps()
        self.nodes: List[str] = [name for name in self.order if self._projectable(name) and name in self.spatial
                                 and name in self.node_names]
        self.aliases: Dict[str, str] = _zoo_aliases(model, self)
        by_step = {step: alias for alias, step in self.aliases.items() if not alias.startswith("fc")}
        self.layers: List[str] = [by_step.get(name, name) for name in self.nodes]

    @property
    def node_names(self) -> set:
        return set(self.names.values())

    # -- classification ----------------------------------------------------------------------

    def _refuse(self, node: fx.Node, what: Optional[str] = None) -> None:
        name = self.names.get(node, node.name)
        raise Unsupported(
            f"Deconvnet: {type(self.model).__name__} is not supported: node {name!r} ({what or _describe(node, self.model)}) "
            "is not an operation the deconvnet can project through (supported: Conv2d, BatchNorm2d in eval, ReLU, ReLU6, "
            "max/avg/adaptive-avg pooling, add, cat/chunk/split/view/transpose/flatten, linear, dropout, "
            "LocalResponseNorm, identity)"
        )

    def _add(self, step: Step) -> str:
        self.steps[step.name] = step
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
            if "tuple" in kinds and node.op == "call_function" and node.target is operator.getitem:
                self._classify_tuple_item(node, name)
                return
            # Sizes, their arithmetic, and constants: evaluated, never projected through.
            self.values[node] = "const" if "const" in kinds and "shape" not in kinds else "shape"
            if node.op == "call_module" or (node.op == "call_function" and node.target in _CHECKS):
                self.values[node] = "none"
            return
        self.values[node] = "tensor"
        if node.op == "call_module":
            self._classify_module(node, name, tensors)
        elif node.op == "call_method":
            self._classify_method(node, name, tensors)
        else:
            self._classify_function(node, name, tensors)

    def _new(self, node: fx.Node, name: str, kind: str, inputs: Sequence[fx.Node], **extra: Any) -> None:
        self.step_of[node] = self._add(Step(name, kind, tuple(self.step_of[n] for n in inputs), node=node, **extra))

    def _classify_tuple_item(self, node: fx.Node, name: str) -> None:
        source = node.args[0]
        self.values[node] = "tensor"
        self._new(node, name, "rearrange", [self.tuple_source[source]])

    def _classify_module(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        module = self.model.get_submodule(node.target)
        if len(tensors) != 1:
            self._refuse(node)
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
            self._refuse(node)
        self.step_of[node] = self._add(step)

    def _classify_method(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        target = node.target
        if target in _RELU_METHODS:
            self._new(node, name, "relu", tensors[:1])
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
        else:
            self._refuse(node)

    def _classify_function(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        target = node.target
        if target in _RELU_FUNCTIONS:
            self._new(node, name, "relu", tensors[:1])
        elif target is F.relu6 or (target is F.hardtanh and _bind(node, ("input", "min_val", "max_val"),
                                                                   {"min_val": -1.0, "max_val": 1.0}).get("min_val") == 0.0
                                   and _bind(node, ("input", "min_val", "max_val"), {}).get("max_val") == 6.0):
            self._new(node, name, "relu6", tensors[:1])
        elif target in _ADD_FUNCTIONS:
            self._classify_add(node, name, tensors)
        elif target in _CAT_FUNCTIONS:
            pieces = node.args[0] if node.args else node.kwargs.get("tensors", ())
            if not isinstance(pieces, (list, tuple)) or len(pieces) != len(tensors) or \
                    any(self.values.get(p) != "tensor" for p in pieces):
                self._refuse(node, "cat of tensors and constants")
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            self._new(node, name, "cat", tensors, options={"dim": int(dim)})
        elif target in _TUPLE_FUNCTIONS and len(tensors) == 1:
            self.values[node] = "tuple"
            self.tuple_source[node] = tensors[0]
        elif target is operator.getitem and len(tensors) == 1 and node.args[0] is tensors[0]:
            self._new(node, name, "rearrange", tensors)  # slicing a tensor
        elif target in _REARRANGE_FUNCTIONS and len(tensors) == 1:
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
        elif target in _CHECKS:
            self.values[node] = "none"
        elif target is builtins.getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
            self.values[node] = "shape"
        else:
            self._refuse(node)

    def _classify_add(self, node: fx.Node, name: str, tensors: List[fx.Node]) -> None:
        if node.kwargs.get("alpha", 1) != 1:
            self._refuse(node, "add with alpha")
        if len(tensors) == 2:
            self._new(node, name, "add", tensors)
        else:  # a tensor plus a constant: the constant is a bias, dropped going down
            self._new(node, name, "bias", tensors)

    # -- what can be projected ---------------------------------------------------------------

    def _spatial_steps(self) -> set:
        """Steps whose output is still a feature map: not at or below a linear layer, an
        ``affine`` reduction or a flatten/view (those belong to the classifier)."""
        flat: set = set()
        for name in self.order:
            step = self.steps[name]
            below = any(i in flat for i in step.inputs)
            if below or step.kind in ("linear", "affine") or _flattens(step):
                flat.add(name)
        return {name for name in self.order if name not in flat}

    def _projectable(self, name: str) -> bool:
        """A rectifier's output, or a concatenation of projectable maps (through max pooling
        and rearrangements): a block whose every path ends in a ReLU."""
        step = self.steps[name]
        if step.kind in RECTIFIERS:
            return True
        if step.kind == "cat":
            return all(self._ends_in_rectifier(i) for i in step.inputs)
        if step.kind == "rearrange" and step.node is not None and not any(
                self.steps[u].kind == "rearrange" for u in step.users) and _is_channel_shuffle_view(step, self):
            return self._ends_in_rectifier(step.inputs[0])
        return False

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
        if inside and self._projectable(inside[-1]):
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
        """The steps ``name`` depends on, itself included, in forward order."""
        seen = {name}
        stack = [name]
        while stack:
            for i in self.reads(stack.pop()):
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


def _flattens(step: Step) -> bool:
    """A flatten, or a view/reshape to at most two dimensions: the way into a classifier."""
    if step.kind != "rearrange":
        return False
    if isinstance(step.module, nn.Flatten):
        return True
    node = step.node
    if node is None:
        return False
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        return True
    dims = _view_dims(node)
    return dims is not None and dims <= 2


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
    if target is torch.relu_ or target is F.relu_:
        target = torch.relu
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    return target(*args, **kwargs)


@dataclass
class Tape:
    """What one forward keeps besides the activations asked for: max-pool switches
    (``ops.maxpool_switches``), the normalisations' inputs, every step's output shape and the
    non-tensor values (sizes) the graph computed."""

    switches: Dict[str, torch.Tensor] = field(default_factory=dict)
    norm_inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: Dict[str, torch.Size] = field(default_factory=dict)
    env: Dict[fx.Node, Any] = field(default_factory=dict)
    inputs: Dict[str, Any] = field(default_factory=dict)  # rearrange step -> its input value (index maps)


def run_step(step: Step, values: Sequence[torch.Tensor], lookup: Callable[[fx.Node], Any], root: nn.Module,
             tape: Optional[Tape]) -> torch.Tensor:
    """One step forward, with eval-mode semantics whatever the modules' mode (BatchNorm on its
    running statistics, dropout the identity) and no in-place writes into earlier outputs."""
    kind = step.kind
    x = values[0] if values else None
    if kind == "relu":
        return torch.relu(x)
    if kind == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    if kind == "bn":
        m = step.module
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    if kind == "conv" and step.node is None:
        return step.module(x)
    if kind == "maxpool":
        w = step.window
        if tape is not None:
            from . import ops  # the ops load the compiled extension: only a recording needs them

            out, tape.switches[step.name] = ops.maxpool_switches(x, w.kernel, w.stride, w.padding, dilation=w.dilation,
                                                                 ceil_mode=w.ceil_mode)
            return out
        return F.max_pool2d(x, w.kernel, w.stride, w.padding, w.dilation, w.ceil_mode)
    if kind == "identity":
        return x
    if kind == "lrn":
        if tape is not None:
            tape.norm_inputs[step.name] = x
        return normalise(step.module, x)
    if kind == "add" and step.node is not None:
        return values[0] + values[1] if step.node.target is not torch.add else torch.add(values[0], values[1])
    if step.node is None:  # a leaf block's child: linear, pools, flatten…
        return step.module(x)
    return evaluate(step.node, lookup, root)


def normalise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalisations in float32 for half-precision maps (PyTorch's CPU LocalResponseNorm has no
    bfloat16 kernel, and a sum of squares deserves float anyway)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return module(x.float()).to(x.dtype)
    return module(x)


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
                    value = run_step(step, values, lookup, graph.model, tape)
                except RuntimeError as error:
                    shape = tuple(values[0].shape[-2:]) if values and values[0].dim() == 4 else tuple(values[0].shape)
                    raise ValueError(
                        f"Deconvnet: images of {images.shape[-2]}x{images.shape[-1]} do not fit this model: step {name!r} "
                        f"({step.kind}) receives a {'x'.join(map(str, shape))} map ({str(error).splitlines()[0]})"
                    ) from error
            outputs[name] = value
            if tape is not None:
                tape.shapes[name] = value.shape
                if step.kind == "rearrange":
                    tape.inputs[name] = values[0].shape
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
    image's output shape holding flat indices into one image's input, found by running the step
    on an index tensor (same sizes as the recorded forward). Raises ``ValueError`` when the step
    mixes images (its output rows would differ)."""
    per_image = math.prod(input_shape[1:])
    index = torch.arange(per_image, device=device).repeat(input_shape[0]).view(input_shape)
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
    return out[0].contiguous()
