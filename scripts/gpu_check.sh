#!/usr/bin/env bash
# On a machine with a GPU and torch already installed: build for that GPU's architecture with
# the register report, then run one or more stages. Logs go to ${OUT:-gpu-out}.
#
#   scripts/gpu_check.sh build tests ops        # the CUDA tests and the op benchmarks
#   scripts/gpu_check.sh build visualize        # the main job's benchmark (and a nvjpeg gallery run)
#
# Stages: build, tests, ops (bench_ops + bench_deconvnet), visualize (bench_visualize),
# occlusion (bench_occlusion). Real images: $ZFK_SAMPLE_IMAGES (default ../shared/...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
IMAGES="${ZFK_SAMPLE_IMAGES:-../shared/data/imagenet-sample}"

stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(build tests ops)
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      # setup.py refuses a library that links libstdc++ statically (its refusals of bad input would
      # segfault), which the lent H100 image's default CXX (a wrapper in /opt/gcc) does.
      [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
      arch=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
      echo "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)') arch $arch"
      if [ ! -f zfkernels/_build_info.json ] || ! grep -q "\"$arch\"" zfkernels/_build_info.json; then
        ZFK_CUDA_ARCH_LIST="$arch" ZFK_PTXAS_VERBOSE=1 MAX_JOBS=16 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
          || { tail -50 "$OUT/build.log"; exit 1; }
        grep -E "Compiling entry|Used [0-9]+ registers|spill" "$OUT/build.log" > "$OUT/ptxas.txt"
      fi
      ;;
    tests)
      # The refusal tests run apart: should a C++ exception kill the process (a library linked
      # against another C++ runtime than torch's), the other results are kept.
      $PY -m pytest -q -p no:cacheprovider -m cuda -k "not rejects and not corrupt" tests 2>&1 | tee "$OUT/pytest-cuda.log" | tail -8
      $PY -m pytest -q -p no:cacheprovider -m cuda -k "rejects or corrupt" tests 2>&1 | tee "$OUT/pytest-cuda-refusals.log" | tail -4
      ;;
    ops)
      $PY benchmarks/bench_ops.py --device cuda --dtype float32 bfloat16 --json "$OUT/bench_ops_cuda.json" > "$OUT/bench_ops_cuda.log" 2>&1
      grep -E "^(maxpool|unpool|project)" "$OUT/bench_ops_cuda.log"
      $PY benchmarks/bench_deconvnet.py --device cuda --json "$OUT/bench_deconvnet_cuda.json" > "$OUT/bench_deconvnet_cuda.log" 2>&1
      tail -12 "$OUT/bench_deconvnet_cuda.log"
      ;;
    visualize)
      # A short run with synchronous launches first: a device-side assert then names the kernel
      # that raised it instead of surfacing at a later synchronisation.
      smoke=$(mktemp -d)
      CUDA_LAUNCH_BLOCKING=1 timeout 300 $PY -m zfkernels visualize --data "$IMAGES" --limit 256 --device cuda \
        --out "$smoke/out" > "$OUT/visualize-smoke.log" 2>&1
      echo "smoke run (256 images, CUDA_LAUNCH_BLOCKING=1): exit $?"; tail -12 "$OUT/visualize-smoke.log"
      cp "$smoke/out/topk.json" "$smoke/out/run.json" "$OUT/" 2>/dev/null; rm -rf "$smoke"
      # Logs go straight to files (a pipe would lose the buffered tail if the call is cut off).
      timeout 480 $PY benchmarks/bench_visualize.py --device cuda --images "$IMAGES" --repeat "${ZFK_REPEAT:-16}" \
        --json "$OUT/bench_visualize_cuda.json" > "$OUT/bench_visualize_cuda.log" 2>&1
      echo "bench_visualize: exit $?"; grep -v "^\$" "$OUT/bench_visualize_cuda.log" | tail -14
      ;;
    occlusion)
      $PY benchmarks/bench_occlusion.py --device cuda --json "$OUT/bench_occlusion_cuda.json" 2>&1 | tee "$OUT/bench_occlusion_cuda.log" | tail -8
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
