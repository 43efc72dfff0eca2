#!/usr/bin/env bash
# Kernel-level check and timing of the CUDA mixing op without LibTorch (bench/kernel_check.cu):
# CUDA kernels against the CPU kernels in float64 for every chain layout, then forward and
# backward kernel times at the benchmark shapes. Needs only nvcc, so the binary can be built on
# the CPU machine and carried to the GPU machine:
#   scripts/kernel-check.sh --build-only    # here: build-kc/kernel_check
#   scripts/kernel-check.sh [--bench-only]  # builds if needed, runs; log in $OUT or build-kc/
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
mkdir -p build-kc
if [ ! -x build-kc/kernel_check ] || [ "${1:-}" = "--build-only" ]; then
  "$NVCC" -std=c++17 -O3 -arch=sm_90 -lineinfo --expt-relaxed-constexpr -Iinclude -Xcompiler -fopenmp \
    bench/kernel_check.cu src/ops/cuda/mix_cuda.cu src/ops/cpu/mix_cpu.cpp src/core/pattern.cpp \
    -o build-kc/kernel_check -Xcompiler -static-libstdc++ -Xcompiler -static-libgcc -lgomp
fi
[ "${1:-}" = "--build-only" ] && exit 0
OUT=${OUT:-$PWD/build-kc}
./build-kc/kernel_check "$@" 2>&1 | tee "$OUT/kernel-check.log" | grep -v '^PASS'
