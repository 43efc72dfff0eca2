#!/usr/bin/env bash
# Paired CPU kernel timings of a revision against the working tree (perf-notes v21, v22): both
# builds of src/ops/cpu/mix_cpu.cpp in one process, alternating. Needs a build (make test).
#   bash bench/dev/paired_rev.sh REV PATTERN T [REPS] [fwd|bwd] [D (64)]
# TOKMIX_CPU_BLOCK_ROWS=R in the environment forces the working tree's block size (0: row kernels).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { echo "usage: $0 REV PATTERN T [REPS] [fwd|bwd]"; exit 2; }
[ -f build/libtokmix_core.a ] || { echo "build/ has no libtokmix_core.a: run make test first"; exit 1; }
REV=$1; shift
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
FLAGS=(-std=c++17 -O3 -march=native -fopenmp -Iinclude -Ibench/dev -I"$W")
sed 's/#pragma once//' include/tokmix/kernels.h >"$W/kernels_ab.h"
git show "$REV:src/ops/cpu/mix_cpu.cpp" | sed 's#"tokmix/kernels.h"#"kernels_ab.h"#' >"$W/a.cpp"
sed 's#"tokmix/kernels.h"#"kernels_ab.h"#' src/ops/cpu/mix_cpu.cpp >"$W/b.cpp"
g++ "${FLAGS[@]}" -Dkernels=kernels_a -c "$W/a.cpp" -o "$W/a.o" &
g++ "${FLAGS[@]}" -Dkernels=kernels_b -c "$W/b.cpp" -o "$W/b.o" &
g++ "${FLAGS[@]}" -c bench/dev/paired_kernels.cpp -o "$W/main.o"
wait
g++ "${FLAGS[@]}" "$W/main.o" "$W/a.o" "$W/b.o" build/libtokmix_core.a -o "$W/paired_kernels"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$W/paired_kernels" "$@"
