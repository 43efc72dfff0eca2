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
OUT="$OUT" bash scripts/gpu-build.sh gpu_check
./build-gpu/gpu_check "$@"
