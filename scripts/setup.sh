#!/usr/bin/env bash
# Fresh-clone setup: a virtual environment in .venv with the pinned torch, the project's
# dependencies, and zfkernels built in place against that torch (--no-build-isolation).
# CUDA kernels are compiled whenever a CUDA toolkit is found (see setup.py for the switches).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
# torch 2.14.1 is the CUDA 13 build (it can build CUDA extensions; the CPU-only file cannot).
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy pillow tqdm matplotlib jinja2 scikit-learn pytest expecttest
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import zfkernels, json; print('zfkernels build:', json.dumps(zfkernels.build_info()))"
