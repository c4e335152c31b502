"""zfkernels: fast deconvnet visualisation (Zeiler & Fergus, 2013) with hand-written kernels.

Importing the package loads the compiled extension ``zfkernels._C``, which registers the
``torch.ops.zfkernels`` operators on CPU (always) and CUDA (when compiled in), and their fake
kernels for tracing.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension links against it)

from . import _C  # noqa: F401  (registers torch.ops.zfkernels.*)
from . import _autograd  # noqa: F401  (backward through the ops raises)
from . import _fake  # noqa: F401  (registers the fake kernels)
from ._build import build_info, has_cuda
from .ops import maxpool_switches, project, switches_to_indices, unpool
from . import models
from .deconvnet import Deconvnet, Recording

__all__ = [
    "Deconvnet",
    "Recording",
    "build_info",
    "has_cuda",
    "maxpool_switches",
    "models",
    "project",
    "switches_to_indices",
    "unpool",
]
