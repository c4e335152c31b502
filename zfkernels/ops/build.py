"""What the compiled extension holds, as recorded by ``setup.py`` at build time, and the torch it
runs on."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Dict

import torch


@lru_cache(maxsize=1)
def _recorded() -> Dict[str, Any]:
    text = resources.files("zfkernels").joinpath("_build_info.json").read_text()
    return json.loads(text)


def build_info() -> Dict[str, Any]:
    """What was compiled, and what runs it: ``{"cpu": True, "cuda": bool, "cuda_version": str |
    None, "cuda_archs": [...], "torch": str, "stable_abi": str, "torch_runtime": str}``.

    ``torch`` is the torch the library was built against, ``stable_abi`` the oldest torch it loads
    in (the stable ABI version it targets), ``torch_runtime`` the torch running now (2.14 or any
    later release). All but ``torch_runtime`` come from ``_build_info.json``, written by
    ``setup.py``."""
    return dict(_recorded(), torch_runtime=torch.__version__)


def has_cuda() -> bool:
    """True only when the CUDA kernels were compiled in *and* a GPU is visible."""
    return bool(build_info().get("cuda")) and torch.cuda.is_available()
