#!/usr/bin/env bash
# Paired CPU kernel timings of perf-notes v16 and v17 (this host's speed swings 2x between runs,
# so versions are compared in one process, alternating). Needs a build (make test or make demo).
#   bash bench/dev/paired.sh [OLD_REV (default bc45840: the backward before v16)] [THREADS (default 2)]
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${1:-bc45840}
export OMP_NUM_THREADS=${2:-2}
[ -f build/libtokmix_core.a ] || { echo "build/ has no libtokmix_core.a: run make test first"; exit 1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
FLAGS=(-std=c++17 -O3 -march=native -fopenmp -Iinclude -I"$W")
git show "$OLD:include/tokmix/kernels.h" | sed 's/#pragma once//' >"$W/kernels_old.h"
git show "$OLD:src/ops/cpu/mix_cpu.cpp" | sed 's#"tokmix/kernels.h"#"kernels_old.h"#' >"$W/old_mix.cpp"
g++ "${FLAGS[@]}" -Dkernels=kernels_old -c "$W/old_mix.cpp" -o "$W/old_mix.o"
g++ "${FLAGS[@]}" -c src/ops/cpu/mix_cpu.cpp -o "$W/mix.o"
g++ "${FLAGS[@]}" bench/dev/paired_backward.cpp "$W/old_mix.o" "$W/mix.o" build/libtokmix_core.a -o "$W/paired_backward"
g++ "${FLAGS[@]}" bench/dev/paired_forward_copy.cpp "$W/mix.o" build/libtokmix_core.a -o "$W/paired_forward_copy"
for T in 4096 16384 65536; do "$W/paired_backward" pow2 $T 7; done
"$W/paired_backward" sq1 16384 5
for T in 1024 4096 16384 65536; do "$W/paired_forward_copy" pow2 $T 9; done
for T in 4096 16384; do "$W/paired_forward_copy" sq1 $T 5; done
