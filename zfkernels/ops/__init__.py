"""The ``torch.ops.zfkernels`` operators and everything about them in Python.

Importing this package loads the compiled extension ``zfkernels._C`` (which registers the
operators on CPU, and on CUDA when compiled in), their fake kernels for tracing
(:mod:`.fake`) and the autograd formula that refuses a backward pass (:mod:`.autograd`).
:mod:`.wrappers` holds the typed Python entry points, :mod:`.reference` a pure-PyTorch
reference of every op, :mod:`.sizes` the output-size formulas, :mod:`.build` what was compiled.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension links against it)

from .. import _C  # noqa: F401  (registers torch.ops.zfkernels.*)
from . import autograd  # noqa: F401  (backward through the ops raises)
from . import fake  # noqa: F401  (registers the fake kernels)
from . import reference
from .build import build_info, has_cuda
from .sizes import pooled_size, projected_size
from .wrappers import (IntPair, geometry, maxpool_switches, output_padding_for, pair, project, switches_to_indices,
                       unpool)

__all__ = [
    "IntPair",
    "build_info",
    "geometry",
    "has_cuda",
    "maxpool_switches",
    "output_padding_for",
    "pair",
    "pooled_size",
    "project",
    "projected_size",
    "reference",
    "switches_to_indices",
    "unpool",
]
