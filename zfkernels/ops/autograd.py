"""The ops are inference-only. Without an autograd kernel PyTorch would only warn and let a
backward pass return no gradient for their inputs — a silently wrong gradient. Each op gets an
autograd formula that raises instead, naming the op."""

from __future__ import annotations

from typing import Any, Callable

import torch

OPS = ("maxpool_switches", "switches_to_indices", "unpool", "project")


def _refuse_backward(op: str) -> Callable[..., Any]:
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(
            f"zfkernels.{op}: this op is inference-only and has no gradient; run it under torch.no_grad() "
            "or on detached tensors (use the autograd formulation in zfkernels.reference to differentiate)"
        )

    return backward


for _op in OPS:
    torch.library.register_autograd(f"zfkernels::{_op}", _refuse_backward(_op))
