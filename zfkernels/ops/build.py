"""What the compiled extension holds, as recorded by ``setup.py`` at build time."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Dict

import torch


@lru_cache(maxsize=1)
def build_info() -> Dict[str, Any]:
    """What was compiled: ``{"cpu": True, "cuda": bool, "cuda_version": str | None,
    "cuda_archs": [...], "torch": str}`` (from ``_build_info.json`` written by ``setup.py``)."""
    text = resources.files("zfkernels").joinpath("_build_info.json").read_text()
    return json.loads(text)


def has_cuda() -> bool:
    """True only when the CUDA kernels were compiled in *and* a GPU is visible."""
    return bool(build_info().get("cuda")) and torch.cuda.is_available()
