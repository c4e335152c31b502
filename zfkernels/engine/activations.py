"""Pointwise activations phi(x) = x * g(x) other than ReLU and ReLU6 (docs/engine.md,
"Pointwise activations"): the function itself, out of place, and its factor g(x) = phi(x) / x,
which guided mode multiplies the rectified signal by."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F


def phi(options: Dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """A pointwise activation (not ReLU/ReLU6) by its options, out of place."""
    fn = options["fn"]
    if fn == "silu":
        return F.silu(x)
    if fn == "gelu":
        return F.gelu(x, approximate=options.get("approximate", "none"))
    if fn == "hardswish":
        return F.hardswish(x)
    if fn == "mish":
        return F.mish(x)
    if fn == "elu":
        return F.elu(x, options.get("alpha", 1.0))
    if fn == "leaky_relu":
        return F.leaky_relu(x, options.get("negative_slope", 0.01))
    if fn == "tanh":
        return torch.tanh(x)
    raise AssertionError(fn)


def gain(options: Dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """g(x) = phi(x) / x, the factor guided mode multiplies the rectified signal by (docs/engine.md,
    "Pointwise activations"), with its limit where x = 0."""
    fn = options["fn"]
    if fn == "silu":
        return torch.sigmoid(x)
    if fn == "gelu":
        if options.get("approximate", "none") == "tanh":
            return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    if fn == "hardswish":  # 0 at or below -3, (x + 3) / 6 between, 1 at or above 3 (PyTorch's pieces)
        return torch.where(x <= -3, torch.zeros_like(x), torch.where(x >= 3, torch.ones_like(x), (x + 3) / 6))
    if fn == "mish":
        return torch.tanh(F.softplus(x))
    if fn == "leaky_relu":
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, options.get("negative_slope", 0.01)))
    if fn == "elu":  # alpha (e^x - 1) / x below 0, alpha at 0 (PyTorch's phi'(0), the left limit)
        alpha = options.get("alpha", 1.0)
        safe = torch.where(x == 0, torch.ones_like(x), x)
        below = torch.where(x == 0, torch.full_like(x, alpha), alpha * torch.expm1(x) / safe)
        return torch.where(x > 0, torch.ones_like(x), below)
    if fn == "tanh":  # tanh(x) / x, 1 at 0
        safe = torch.where(x == 0, torch.ones_like(x), x)
        return torch.where(x == 0, torch.ones_like(x), torch.tanh(x) / safe)
    raise AssertionError(fn)
