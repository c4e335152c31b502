"""The autograd oracle of GUIDE section 2, in float64, for any traced model: the gradient of
<seed, activation> with respect to the input, where every ReLU's backward is replaced by
relu(incoming signal) ("deconvnet"), by relu(signal) masked by the forward activation
("guided"), or kept ("backprop"; ReLU6's mask is 0 < x < 6), and the normalisations' backward by
the identity ("deconvnet" only). Everything else (convolutions, BatchNorm, pools, residual adds,
concatenations, views) is left to autograd.

Independent of the engine: the graph is torchvision's own ``create_feature_extractor``, its
ReLU/ReLU6/LRN modules and functional ReLUs are swapped for the custom backward by this file,
and max pooling is routed through PyTorch's own ``return_indices`` argmaxes. Those argmaxes and
the guided masks come from a first forward in the model's own dtype (what the engine records),
so float64 does not break a near-tie differently from the engine's forward; the float64 pass
then gathers at those indices (whose autograd backward is the scatter-add adjoint).
"""

from __future__ import annotations

import copy
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor


class _Tape:
    """Masks and argmaxes, captured in call order by the first pass and replayed by the second."""

    def __init__(self) -> None:
        self.capture = True
        self.items: List[torch.Tensor] = []
        self.at = 0

    def put(self, value: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.items.append(value)
            return value
        value = self.items[self.at]
        self.at += 1
        return value


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, mode: str, top: float) -> torch.Tensor:
        ctx.mode = mode
        ctx.save_for_backward(mask)
        return x.clamp(0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        mask = mask.to(grad.dtype)
        if ctx.mode == "deconvnet":
            return torch.relu(grad), None, None, None
        if ctx.mode == "guided":
            return torch.relu(grad) * mask, None, None, None
        return grad * mask, None, None, None


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Rectifier(nn.Module):
    def __init__(self, tape: _Tape, state: dict, top: float) -> None:
        super().__init__()
        self.tape, self.state, self.top = tape, state, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tape.capture:
            out = x.clamp(0, self.top)
            self.tape.put((out > 0) & (out < self.top))
            return out
        return _RuleReLU.apply(x, self.tape.put(None), self.state["mode"], self.top)


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


_FUNCTIONAL_RELUS = {F.relu, torch.relu, torch.relu_, F.relu6}
_FUNCTIONAL_POOLS = {F.max_pool2d, torch.max_pool2d}
_POOL_NAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _pool_args(node: fx.Node) -> Tuple:
    values = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    values.update(zip(("input",) + _POOL_NAMES, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k != "return_indices"})
    if values["stride"] is None:
        values["stride"] = values["kernel_size"]
    return tuple(values[k] for k in _POOL_NAMES)


def _swap_modules(root: nn.Module, tape: _Tape, state: dict) -> None:
    for name, module in list(root.named_modules()):
        for key, child in list(module.named_children()):
            if type(child) in (nn.ReLU, nn.ReLU6):
                setattr(module, key, _Rectifier(tape, state, 6.0 if isinstance(child, nn.ReLU6) else float("inf")))
            elif isinstance(child, nn.MaxPool2d):
                stride = child.kernel_size if child.stride is None else child.stride
                setattr(module, key, _RoutedMaxPool(tape, child.kernel_size, stride, child.padding, child.dilation,
                                                    child.ceil_mode))
            elif isinstance(child, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
                setattr(module, key, _Normalisation(child, state))


def _swap_functions(gm: fx.GraphModule, tape: _Tape, state: dict) -> None:
    """Functional ReLUs and max pools become calls of swapped modules."""
    count = 0
    for node in list(gm.graph.nodes):
        functional_relu = node.op == "call_function" and node.target in _FUNCTIONAL_RELUS
        method_relu = node.op == "call_method" and node.target in ("relu", "relu_")
        if functional_relu or method_relu:
            top = 6.0 if node.target is F.relu6 else float("inf")
            module: nn.Module = _Rectifier(tape, state, top)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
            module = _RoutedMaxPool(tape, *_pool_args(node))
        else:
            continue
        count += 1
        name = f"_oracle_swap_{count}"
        gm.add_module(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


class GraphOracle:
    """The oracle for one model and one layer (a feature-extraction node name)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.tape = _Tape()
        self.state = {"mode": "deconvnet"}
        self.extractors: Dict[Tuple[torch.dtype, torch.device], nn.Module] = {}
        was = model.training
        try:  # a copy of the layers it uses: the swaps below must not touch the model under test
            base = copy.deepcopy(create_feature_extractor(model.eval(), return_nodes={layer: "out"})).eval()
        finally:
            model.train(was)
        _swap_modules(base, self.tape, self.state)
        _swap_functions(base, self.tape, self.state)
        self.base = base.eval()

    def _extractor(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        key = (dtype, device)
        if key not in self.extractors:
            shared = {id(self.tape): self.tape, id(self.state): self.state}  # one tape for both passes
            self.extractors[key] = copy.deepcopy(self.base, memo=shared).to(device=device, dtype=dtype).eval()
        return self.extractors[key]

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor,
                 positions: Optional[torch.Tensor] = None, mode: str = "deconvnet") -> torch.Tensor:
        self.state["mode"] = mode
        x = images[rows.to(images.device)]
        self.tape.capture, self.tape.items, self.tape.at = True, [], 0
        with torch.no_grad():
            self._extractor(x.dtype, x.device)(x)
        self.tape.capture = False
        x64 = x.double().detach().requires_grad_(True)
        activation = self._extractor(torch.float64, x.device)(x64)["out"]
        seed = torch.zeros_like(activation)
        b = torch.arange(rows.shape[0], device=activation.device)
        channels = channels.to(activation.device)
        if positions is None:
            seed[b, channels] = activation[b, channels].detach()
        else:
            positions = positions.to(activation.device)
            seed[b, channels, positions[:, 0], positions[:, 1]] = \
                activation[b, channels, positions[:, 0], positions[:, 1]].detach()
        (grad,) = torch.autograd.grad(activation, x64, seed)
        return grad


_ORACLES: "weakref.WeakKeyDictionary[nn.Module, Dict[str, GraphOracle]]" = weakref.WeakKeyDictionary()


def graph_oracle(model: nn.Module, images: torch.Tensor, layer: str, rows: torch.Tensor, channels: torch.Tensor,
                 positions: Optional[torch.Tensor] = None, mode: str = "deconvnet") -> torch.Tensor:
    """(B, 3, H, W) float64 projections of the selections at node ``layer``, by autograd."""
    per_layer = _ORACLES.setdefault(model, {})
    if layer not in per_layer:
        per_layer[layer] = GraphOracle(model, layer)
    return per_layer[layer](images, rows, channels, positions, mode)


def oracle(dn, rec, images: torch.Tensor, layer: str, rows: torch.Tensor, channels: torch.Tensor,
           positions: Optional[torch.Tensor] = None, mode: str = "deconvnet") -> torch.Tensor:
    """:func:`graph_oracle` for a layer named as the engine names it (zoo aliases included)."""
    return graph_oracle(dn.model, images, dn.resolve(layer), rows, channels, positions, mode)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))

