#!/usr/bin/env bash
# Table 1 with the paper preset on the GPU machine: builds build-gpu/tokmix, runs
#   tokmix reproduce table1 --preset paper --device cuda --resume --out $RUNS [ARGS...]
# and copies results.json, settings.json, table1.dat and runs.tgz (every run's result.json and
# options.json, no checkpoints) to $OUT. Runs (one learning rate of one structure and task)
# already finished in $RUNS with the same settings are reused, so the preset can run in pieces
# across calls of 10 minutes: unpack an earlier runs.tgz into $RUNS (default build-table1), carry
# that folder, pass --only for the rows still missing, and a last call without --only prints the
# whole table. All nine rows take about 30 minutes of one H200 (108 runs of 4000 steps, 13-16 s
# each, the dense recurrence 25 s through its dense form). The runs can be read back anywhere:
# `tokmix reproduce table1 --preset paper --device cuda --resume --out DIR` on a CPU machine, with
# every run finished in DIR, prints the table and draws the chart without training.
#   scripts/gpu-table1.sh --only pow2,sq1        (carry: build-deps, and build-table1 to resume)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
RUNS=${RUNS:-build-table1}
mkdir -p "$OUT" "$RUNS"
[ -x build-gpu/tokmix ] || OUT="$OUT" bash scripts/gpu-build.sh tokmix_cli -- -DTOKMIX_GLOO=OFF
./build-gpu/tokmix reproduce table1 --preset paper --device cuda --resume --out "$RUNS" "$@" 2>&1 | tee "$OUT/table1.log" | grep -v '^step'
cp "$RUNS"/results.json "$RUNS"/settings.json "$RUNS"/table1.dat "$OUT"/ 2>/dev/null || true
(cd "$RUNS" && find . -name result.json -o -name options.json | tar czf "$OUT/runs.tgz" -T -)
