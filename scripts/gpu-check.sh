#!/usr/bin/env bash
# Builds the CUDA backend against the LibTorch inside the machine's PyTorch, checks it against
# the CPU float64 op and benchmarks it, in one call (the GPU machine is lent by the minute).
#   scripts/gpu-check.sh [--check-only]
# Logs go to $OUT (the device tool brings that folder back), else build-gpu/out.
# Header-only dependencies the GPU image may lack (nlohmann_json) can travel in build-deps/
# (a CMake prefix: build-deps/include, build-deps/share/cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
PREFIX="$TORCH_PREFIX"
[ -d build-deps ] && PREFIX="$PREFIX;$PWD/build-deps"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTOKMIX_CUDA=ON -DTOKMIX_TESTS=OFF -DTOKMIX_BENCH=OFF \
  -DTOKMIX_NATIVE=OFF -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log"; exit 1; }
time cmake --build build-gpu -j"$(nproc)" --target gpu_check >"$OUT/build.log" 2>&1 || { grep -B2 -A8 -m5 "error" "$OUT/build.log"; tail -20 "$OUT/build.log"; exit 1; }
./build-gpu/gpu_check "$@"
