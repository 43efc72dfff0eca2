#!/usr/bin/env bash
# Configures build-gpu against the LibTorch inside the machine's PyTorch (CUDA backend on, no
# tests or benchmarks, portable code) and builds the given targets; the GPU scripts share it.
#   scripts/gpu-build.sh TARGET... [-- EXTRA_CMAKE_ARGS...]
# Logs: $OUT/configure.log and $OUT/build.log. PY names the Python whose torch is used.
# Header-only dependencies the GPU image may lack travel in build-deps/ (scripts/gpu-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
PY=${PY:-$(command -v python3)}
mkdir -p "$OUT"
targets=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do targets+=("$1"); shift; done
[ $# -gt 0 ] && shift
PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
[ -d build-deps ] && PREFIX="$PREFIX;$PWD/build-deps"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTOKMIX_CUDA=ON -DTOKMIX_TESTS=OFF -DTOKMIX_BENCH=OFF \
  -DTOKMIX_NATIVE=OFF -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" "$@" >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log"; exit 1; }
for t in "${targets[@]}"; do
  time cmake --build build-gpu -j"$(nproc)" --target "$t" >>"$OUT/build.log" 2>&1 ||
    { grep -B2 -A8 -m5 "error" "$OUT/build.log"; tail -20 "$OUT/build.log"; exit 1; }
done
