"""The autograd oracle of GUIDE section 2, in float64: the gradient of <seed, activation> with
respect to the input, where every ReLU's backward is replaced by relu(incoming signal)
("deconvnet"), by relu(signal) masked by the forward activation ("guided"), or kept
("backprop"), and the normalisations' backward by the identity ("deconvnet" only).

Max pooling takes the recorded switches (a gather at their indices, whose autograd backward is
the scatter-add adjoint), so the oracle and the engine route through the same argmaxes even
where float64 would break a near-tie differently.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import zfkernels
from zfkernels.deconvnet import Deconvnet, Recording


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: str) -> torch.Tensor:
        out = torch.relu(x)
        ctx.mode = mode
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        mask = (out > 0).to(grad.dtype)
        if ctx.mode == "deconvnet":
            return torch.relu(grad), None
        if ctx.mode == "guided":
            return torch.relu(grad) * mask, None
        return grad * mask, None


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def oracle(
    dn: Deconvnet,
    rec: Recording,
    images: torch.Tensor,
    layer: str,
    rows: torch.Tensor,
    channels: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    mode: str = "deconvnet",
) -> torch.Tensor:
    """(B, 3, H, W) float64 projections of the selections, by autograd."""
    x = images[rows].double().detach().requires_grad_(True)
    h = x
    activation = None
    for i, stage in enumerate(dn.stages):
        if stage.kind == "conv":
            conv = stage.module
            bias = None if conv.bias is None else conv.bias.double()
            h = F.conv2d(h, conv.weight.double(), bias, conv.stride, conv.padding)
        elif stage.kind == "relu":
            h = _DeconvReLU.apply(h, mode)
            if stage.name == layer:
                activation = h
                break
        elif stage.kind == "pool":
            w = stage.window
            switches = rec.switches[i][rows]
            indices = zfkernels.switches_to_indices(switches, h.shape[-2:], w.kernel, w.stride, w.padding)
            h = torch.gather(h.flatten(2), 2, indices.flatten(2)).view(indices.shape)
        else:
            # Parameter-free normalisations (LocalResponseNorm) run on float64 as they are.
            h = _IdentityBackward.apply(h, stage.module) if mode == "deconvnet" else stage.module(h)
    assert activation is not None
    seed = torch.zeros_like(activation)
    b = torch.arange(rows.shape[0], device=activation.device)
    rows, channels = rows.to(activation.device), channels.to(activation.device)
    positions = None if positions is None else positions.to(activation.device)
    if positions is None:
        seed[b, channels] = activation[b, channels].detach()
    else:
        seed[b, channels, positions[:, 0], positions[:, 1]] = activation[b, channels, positions[:, 0], positions[:, 1]].detach()
    (grad,) = torch.autograd.grad(activation, x, seed)
    return grad


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))
