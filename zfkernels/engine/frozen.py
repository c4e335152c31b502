"""What the rules freeze at their recorded values (docs/engine.md, "Why freeze"): a
normalisation's sigma, attention weights (``nn.MultiheadAttention``'s, ``scaled_dot_product_attention``'s)
and the softmax outputs inside a function the graph keeps whole (Swin's
``shifted_window_attention``), captured going up and replayed going down."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .evaluate import bound_arguments


def norm_statistics(step: Any, x: torch.Tensor, lookup: Callable[[fx.Node], Any]) -> Dict[str, Any]:
    """What the normalisation's rule freezes: ``rstd`` = 1/sigma (per normalised group, kept
    dimensions of size 1), and the weight, dims or groups its transpose needs."""
    how = step.options["how"]
    module = step.module
    if module is not None:
        if how == "group":
            settings = {"groups": module.num_groups, "weight": module.weight, "eps": module.eps}
        elif how == "layer2d":
            settings = {"dims": (1,), "weight": module.weight, "eps": module.eps}
        else:
            dims = tuple(range(-len(module.normalized_shape), 0))
            settings = {"dims": dims, "weight": module.weight, "eps": module.eps}
    else:
        bound = bound_arguments(step, lookup, step.options["names"])
        if how == "group":
            settings = {"groups": int(bound["num_groups"]), "weight": bound.get("weight"), "eps": bound.get("eps", 1e-5)}
        else:
            shape = bound["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            settings = {"dims": tuple(range(-len(shape), 0)), "weight": bound.get("weight"),
                        "eps": bound.get("eps", 1e-5 if how == "layer" else None)}
    eps = settings["eps"]
    if how == "rms" and eps is None:
        eps = torch.finfo(x.dtype).eps  # as torch.rms_norm
    if how == "group":
        grouped = x.reshape(x.shape[0], settings["groups"], -1)
        rstd = torch.rsqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps)
    elif how == "rms":
        rstd = torch.rsqrt(x.pow(2).mean(settings["dims"], keepdim=True) + eps)
    else:
        rstd = torch.rsqrt(x.var(settings["dims"], unbiased=False, keepdim=True) + eps)
    weight = settings["weight"]
    return {"how": how, "rstd": rstd, "weight": None if weight is None else weight.detach(),
            "dims": settings.get("dims"), "groups": settings.get("groups")}


def mha_weights(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention``'s attention weights per head, ``(N, heads, L, S)`` (batch first)."""
    e, heads = module.embed_dim, module.num_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias
    q = F.linear(query, weight[:e], None if bias is None else bias[:e])
    k = F.linear(key, weight[e:2 * e], None if bias is None else bias[e:2 * e])
    n, length, source = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(n, length, heads, e // heads).transpose(1, 2)
    k = k.view(n, source, heads, e // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) * (e // heads) ** -0.5, dim=-1)


def sdpa_weights(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                 scale: Optional[float]) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s softmax output (PyTorch's documented formula)."""
    scores = query @ key.transpose(-2, -1) * (query.size(-1) ** -0.5 if scale is None else scale)
    n, s = query.size(-2), key.size(-2)
    if causal:
        scores = scores.masked_fill(~torch.ones(n, s, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)


class SoftmaxCapture(TorchFunctionMode):
    """Records every softmax output computed inside the block, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAXES:
            self.outputs.append(out)
        return out


class SoftmaxReplay(TorchFunctionMode):
    """Inside the block, each softmax returns the next of ``outputs`` instead (frozen attention
    weights: what follows is linear in the values)."""

    def __init__(self, outputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = list(outputs)
        self.at = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SOFTMAXES:
            out = self.outputs[self.at]
            self.at += 1
            return out
        return func(*args, **(kwargs or {}))
