#!/usr/bin/env bash
# Associative recall (MQAR, T = 256, N = 16, V = 8192, Zoology's setting) on the GPU machine:
# which settings of the framework lift the sparse patterns (coefficient mode, state width
# d_value, model width, short convolution, MLP, hybrids with a local A side), beside attention
# and dense recurrence at the same widths. Builds the tokmix executable unless build-gpu/tokmix
# exists, runs the grid several runs at a time per GPU, prints a table, writes $OUT/mqar.json.
#   scripts/gpu-mqar.sh        (carry: build-deps)
# Settings (environment): STEPS (3000), LRS ("1e-3 3e-3"), PER_GPU (9 concurrent runs),
# LIMIT (seconds; runs still going then are stopped and reported from their last evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-mqar.log") 2>&1
STEPS=${STEPS:-3000} LRS=${LRS:-"1e-3 3e-3"} PER_GPU=${PER_GPU:-9} LIMIT=${LIMIT:-100000}
[ -x build-gpu/tokmix ] || OUT="$OUT" bash scripts/gpu-build.sh tokmix_cli -- -DTOKMIX_GLOO=OFF
TOKMIX=$PWD/build-gpu/tokmix
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
DIR=$PWD/build-gpu/mqar
rm -rf "$DIR"; mkdir -p "$DIR"
# name | model fields (2 layers, no positions: Zoology's recall models) | mixer
GRID=(
  'attention d128|"d_model":128,"mlp":false|{"type":"attention","heads":2}'
  'dense d128|"d_model":128,"mlp":false|{"type":"dense","heads":2}'
  'pow2 d128|"d_model":128,"mlp":false|{"type":"pow2","heads":2}'
  'pow2 d128 d_value 512|"d_model":128,"mlp":false|{"type":"pow2","heads":2,"d_key":64,"d_value":512}'
  'pow2 d128 gate|"d_model":128,"mlp":false|{"type":"pow2","heads":2,"mode":"gate"}'
  'pow2 d128 gate d_value 512|"d_model":128,"mlp":false|{"type":"pow2","heads":2,"mode":"gate","d_key":64,"d_value":512}'
  'A=local:16 B=pow2 d128|"d_model":128,"mlp":false|{"type":"hybrid","a":"local:16","b":"pow2","heads":2}'
  'pow2-lattice d128|"d_model":128,"mlp":false|{"type":"pow2-lattice","heads":2}'
  'sq1 d128|"d_model":128,"mlp":false|{"type":"sq1","heads":2}'
  'sq1-lattice d128|"d_model":128,"mlp":false|{"type":"sq1-lattice","heads":2}'
  'sq1-lattice d128 d_value 512|"d_model":128,"mlp":false|{"type":"sq1-lattice","heads":2,"d_key":64,"d_value":512}'
  'attention d512 +MLP|"d_model":512,"mlp":true|{"type":"attention","heads":8}'
  'pow2 d512 +MLP|"d_model":512,"mlp":true|{"type":"pow2","heads":8}'
  'pow2 d512 +MLP 2 heads|"d_model":512,"mlp":true|{"type":"pow2","heads":2}'
  'pow2 d512 +MLP gate|"d_model":512,"mlp":true|{"type":"pow2","heads":8,"mode":"gate"}'
  'sq1-lattice d512 +MLP|"d_model":512,"mlp":true|{"type":"sq1-lattice","heads":8}'
  'pow2-lattice d512 +MLP|"d_model":512,"mlp":true|{"type":"pow2-lattice","heads":8}'
  'sq1 d512 +MLP|"d_model":512,"mlp":true|{"type":"sq1","heads":8}'
)
i=0
start=$SECONDS
jobs_of() { jobs -rp | wc -l; }
for row in "${GRID[@]}"; do
  IFS='|' read -r name model mixer <<<"$row"
  for lr in $LRS; do
    run="$DIR/run$i"; mkdir -p "$run"
    cat >"$run/config.json" <<EOC
{"comment": "$name", "model": {$model, "n_layers": 2, "positions": "none", "mixer": $mixer},
 "task": "mqar:T=256,N=16,V=8192", "batch_size": 64, "steps": $STEPS, "lr": $lr, "eval_every": 250, "eval_batches": 16,
 "log_every": 250, "seed": 0, "device": "cuda", "bf16": true, "out": "$run/out"}
EOC
    echo "$name|$lr" >"$run/name"
    CUDA_VISIBLE_DEVICES=$((i % NGPU)) "$TOKMIX" train --config "$run/config.json" >"$run/log" 2>&1 &
    i=$((i + 1))
    while [ "$(jobs_of)" -ge $((PER_GPU * NGPU)) ]; do sleep 1; done
  done
done
while [ "$(jobs_of)" -gt 0 ] && [ $((SECONDS - start)) -lt "$LIMIT" ]; do sleep 2; done
[ "$(jobs_of)" -gt 0 ] && { echo "time limit: stopping $(jobs_of) runs (reported from their last evaluation)"; kill $(jobs -rp) 2>/dev/null || true; }
wait || true
python3 scripts/mqar_summary.py "$DIR" "$OUT/mqar.json"
