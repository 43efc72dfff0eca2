#!/usr/bin/env bash
# The Python package on the GPU machine: builds libtokmix_torch.so with the CUDA backend against
# the LibTorch inside the machine's PyTorch, runs tests/python with that PyTorch (CUDA tests
# included) and bench/python_peers.py on the GPU, in one call.
#   scripts/gpu-python-check.sh [pytest arguments]
# Logs go to $OUT (the device tool brings that folder back), else build-gpu/out.
# Header-only dependencies the GPU image may lack (nlohmann_json) can travel in build-deps/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-python-check.log") 2>&1
PY=${PYTHON:-python3}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
[ -d build-deps ] && PREFIX="$PREFIX;$PWD/build-deps"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTOKMIX_CUDA=ON -DTOKMIX_TESTS=OFF -DTOKMIX_BENCH=OFF \
  -DTOKMIX_NATIVE=OFF -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" >"$OUT/configure-python.log" 2>&1 ||
  { tail -40 "$OUT/configure-python.log"; exit 1; }
time cmake --build build-gpu -j"$(nproc)" --target tokmix_torch >"$OUT/build-python.log" 2>&1 ||
  { grep -B2 -A8 -m5 "error" "$OUT/build-python.log"; tail -20 "$OUT/build-python.log"; exit 1; }
export TOKMIX_LIBRARY=$PWD/build-gpu/lib/libtokmix_torch.so PYTHONPATH=$PWD/python
if "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/python -rs "$@" || status=$?
else
  echo "pytest is not importable by $PY: tests/python not run"
fi
"$PY" bench/python_peers.py --device cuda --T 1024,4096,16384 --reps 10
"$PY" bench/python_peers.py --device cuda --dtype bfloat16 --T 4096,16384 --reps 10
exit ${status:-0}
