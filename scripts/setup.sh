#!/usr/bin/env bash
# Set up .venv, and do nothing when nothing changed (the README runs this before every command).
#
#   1. .venv with torch 2.14.1 and torchvision 0.29.1 (the oldest torch the library supports, so
#      the tests run against it; the library itself loads in every later torch), the project's
#      dependencies and its test and bench extras (pyproject.toml). Skipped while pyproject.toml
#      and this script are unchanged.
#   2. zfkernels installed in development mode (pip install -e, once), its library built in
#      place. Rebuilt (incrementally, by ninja) only when csrc/, setup.py, the torch version or a
#      build switch (ZFK_CPU_ONLY, ZFK_CUDA_ARCH_LIST, TORCH_CUDA_ARCH_LIST, CUDA_HOME, CXX)
#      changed.
# CUDA kernels are compiled whenever a CUDA toolkit is found: for the visible GPU, or without one
# for a single PTX target (see setup.py for the switches).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_PAIR=(torch==2.14.1 torchvision==0.29.1)  # the CUDA 13 build: it can build CUDA extensions
VPY=.venv/bin/python
say() { echo "[setup] $*"; }

if [ ! -x "$VPY" ]; then
  "$PYTHON" -m venv .venv
fi

digest() { sha256sum | cut -d' ' -f1; }

deps_key=$( { cat pyproject.toml scripts/setup.sh; echo "${TORCH_PAIR[*]}"; } | digest)
if [ "$(cat .venv/.zfk-deps 2>/dev/null)" != "$deps_key" ]; then
  say "installing the dependencies"
  "$VPY" -m pip install -q --upgrade pip setuptools wheel ninja
  # pyproject.toml's dependencies and its test and bench extras, with torch at the oldest release.
  "$VPY" - > .venv/.zfk-requirements.txt <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["test"] + extras["bench"]))
EOF
  "$VPY" -m pip install -q "${TORCH_PAIR[@]}" -r .venv/.zfk-requirements.txt
  echo "$deps_key" > .venv/.zfk-deps
fi

build_key=$( {
  find csrc -type f | LC_ALL=C sort | xargs cat
  cat setup.py
  "$VPY" -c "import torch; print(torch.__version__)"
  echo "${ZFK_CPU_ONLY:-}|${ZFK_CUDA_ARCH_LIST:-}|${TORCH_CUDA_ARCH_LIST:-}|${CUDA_HOME:-}|${CXX:-}|$(command -v nvcc || true)"
} | digest)
library=$(ls zfkernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ ! -f .venv/.zfk-installed ]; then
  say "installing zfkernels in development mode and building its library"
  MAX_JOBS="${MAX_JOBS:-2}" "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  touch .venv/.zfk-installed
  echo "$build_key" > .venv/.zfk-build
elif [ -z "$library" ] || [ "$(cat .venv/.zfk-build 2>/dev/null)" != "$build_key" ]; then
  say "building the library (csrc/, setup.py, torch or a build switch changed)"
  MAX_JOBS="${MAX_JOBS:-2}" "$VPY" setup.py -q build_ext --inplace
  echo "$build_key" > .venv/.zfk-build
fi
"$VPY" -c "import zfkernels, json; print('zfkernels build:', json.dumps(zfkernels.build_info()))"
