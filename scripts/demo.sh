#!/usr/bin/env bash
# The main job of `make demo`: the pattern table and the CPU benchmark of the mixing op.
set -euo pipefail
BUILD=${1:-build}
mkdir -p out
echo "== the framework's instances: row size and decode cache (entries) against n"
"$BUILD/tokmix" patterns
echo
echo "== a row of pow2 and of its cache-efficient lattice (1-indexed, as in the spec)"
"$BUILD/tokmix" pattern pow2 --row 100
"$BUILD/tokmix" pattern pow2-lattice --row 100
echo
echo "== the mixing op on this CPU (rows also in out/bench-mix.json)"
"$BUILD/tokmix" bench mix --json out/bench-mix.json
