#!/usr/bin/env bash
# The main job of `make demo`: the framework's instances, their analysis, the CPU benchmark of
# the mixing op, and the quick reproduction of the paper's Table 1. Outputs under out/.
set -euo pipefail
BUILD=${1:-build}
T=$BUILD/tokmix
mkdir -p out
echo "== the framework's instances: row size and decode cache (entries) against n"
"$T" patterns
echo
echo "== a row of pow2 and of its cache-efficient lattice (1-indexed, as in the spec)"
"$T" pattern pow2 --row 100
"$T" pattern pow2-lattice --row 100
echo
echo "== cost, cache, shortest path and congestion at n = 4096"
"$T" analyze --instances --n 4096
echo
echo "== the mixing op on this CPU (rows in out/bench-mix.json; 'make bench' adds T = 65536)"
"$T" bench mix --T 1024,4096,16384 --json out/bench-mix.json
echo
echo "== Table 1, quick preset: 9 structures x copy, associative recall, multi-hop (out/table1/)"
"$T" reproduce table1 --preset quick --out out/table1
