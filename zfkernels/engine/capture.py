"""Graph capture: any eval-mode ``nn.Module`` traced by torchvision's feature-extraction tracer,
and every node classified into a step kind the deconvnet has a rule for (docs/engine.md,
"Semantics"). Tracing is :mod:`.tracing`, the node-by-node classification :mod:`.classify`; the rules
themselves live in :mod:`zfkernels.engine.rules`, one per kind.

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

import difflib
import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .classify import ACTIVATIONS, NORMALISATIONS, RECTIFIERS, NodeClassifier, Step, pair
from .tracing import trace, traceable

# -- the graph -----------------------------------------------------------------------------------


class Graph(NodeClassifier):
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
        root = traceable(model)  # the traced root: the model, or its zoo-style wrapper
        # graph_of caches graphs in a WeakKeyDictionary keyed by the model: a strong reference
        # to the model from here would keep every model ever traced alive. The zoo wrapper
        # holds only the model's parts, so it may be kept as it is.
        self._root: Callable[[], Optional[nn.Module]] = weakref.ref(root) if root is model else (lambda: root)
        self.graph, self.names = trace(root)
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
