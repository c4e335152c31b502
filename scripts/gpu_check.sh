#!/usr/bin/env bash
# On a machine with a GPU and torch already installed: build for that GPU's architecture with
# the register report, run the CUDA tests, then the benchmarks on CUDA. Logs go to ${OUT:-gpu-out}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
arch=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
echo "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)') arch $arch"
ZFK_CUDA_ARCH_LIST="$arch" ZFK_PTXAS_VERBOSE=1 MAX_JOBS=16 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
grep -E "Compiling entry|Used [0-9]+ registers|spill" "$OUT/build.log" > "$OUT/ptxas.txt"
$PY -m pytest -q -p no:cacheprovider -m cuda "${@:-tests}" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -15
$PY benchmarks/bench_ops.py --device cuda --dtype float32 bfloat16 --json "$OUT/bench_ops_cuda.json" > "$OUT/bench_ops_cuda.log" 2>&1
grep -E "^(maxpool|unpool|project)" "$OUT/bench_ops_cuda.log"
if [ -f benchmarks/bench_deconvnet.py ]; then
  $PY benchmarks/bench_deconvnet.py --device cuda --json "$OUT/bench_deconvnet_cuda.json" > "$OUT/bench_deconvnet_cuda.log" 2>&1
  tail -12 "$OUT/bench_deconvnet_cuda.log"
fi
