"""zfkernels: fast deconvnet visualisation (Zeiler & Fergus, 2013) with hand-written kernels.

Importing the package loads the compiled extension ``zfkernels._C``, which registers the
``torch.ops.zfkernels`` operators on CPU (always) and CUDA (when compiled in), and their fake
kernels for tracing.
"""

from __future__ import annotations

from . import ops  # loads the compiled extension: registers torch.ops.zfkernels.*
from . import models
from .engine import Deconvnet, Recording
from .ops import build_info, has_cuda, maxpool_switches, project, reference, switches_to_indices, unpool

__all__ = [
    "Deconvnet",
    "Recording",
    "build_info",
    "has_cuda",
    "maxpool_switches",
    "models",
    "ops",
    "project",
    "reference",
    "switches_to_indices",
    "unpool",
]
