#!/usr/bin/env bash
# Associative recall (MQAR, T = 256, N = 16, V = 8192, Zoology's setting) on the GPU machine:
# which settings of the framework lift the sparse patterns (coefficient mode, head width, short
# convolution, output gate, hybrids with a local A side), at the width and depth of the
# attention baseline. Builds the tokmix executable unless build-gpu/tokmix exists, runs the
# grid several runs at a time per GPU, prints a table, writes $OUT/mqar.json.
#   scripts/gpu-mqar.sh        (carry: build-deps)
# Settings (environment): STEPS (3000), LRS ("1e-3 3e-3"), PER_GPU (6 concurrent runs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-mqar.log") 2>&1
STEPS=${STEPS:-3000} LRS=${LRS:-"1e-3 3e-3"} PER_GPU=${PER_GPU:-6}
[ -x build-gpu/tokmix ] || OUT="$OUT" bash scripts/gpu-build.sh tokmix_cli -- -DTOKMIX_GLOO=OFF
TOKMIX=$PWD/build-gpu/tokmix
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
DIR=$PWD/build-gpu/mqar
rm -rf "$DIR"; mkdir -p "$DIR"
# name | mixer JSON (d_model 128, 2 layers, no MLP: Zoology's recall models)
GRID=(
  'attention|{"type":"attention","heads":2}'
  'pow2|{"type":"pow2","heads":2}'
  'pow2 1 head|{"type":"pow2","heads":1}'
  'pow2 gate|{"type":"pow2","heads":2,"mode":"gate"}'
  'pow2 out-gate qk-norm|{"type":"pow2","heads":2,"output_gate":true,"qk_norm":true}'
  'pow2 no conv|{"type":"pow2","heads":2,"conv":0}'
  'A=local:16 B=pow2|{"type":"hybrid","a":"local:16","b":"pow2","heads":2}'
  'A=local:16 B=pow2 1 head|{"type":"hybrid","a":"local:16","b":"pow2","heads":1}'
  'pow2-lattice|{"type":"pow2-lattice","heads":2}'
  'pow2-lattice 1 head|{"type":"pow2-lattice","heads":1}'
  'A=local:16 B=pow2-lattice|{"type":"hybrid","a":"local:16","b":"pow2-lattice","heads":2}'
  'sq1|{"type":"sq1","heads":2}'
  'sq1 1 head|{"type":"sq1","heads":1}'
  'A=local:16 B=sq1|{"type":"hybrid","a":"local:16","b":"sq1","heads":2}'
  'sq1-lattice|{"type":"sq1-lattice","heads":2}'
  'sq1-lattice 1 head|{"type":"sq1-lattice","heads":1}'
  'A=local:16 B=sq1-lattice|{"type":"hybrid","a":"local:16","b":"sq1-lattice","heads":2}'
)
i=0
jobs_of() { jobs -rp | wc -l; }
for row in "${GRID[@]}"; do
  name=${row%%|*}; mixer=${row#*|}
  for lr in $LRS; do
    run="$DIR/run$i"; mkdir -p "$run"
    cat >"$run/config.json" <<EOC
{"comment": "$name", "model": {"d_model": 128, "n_layers": 2, "positions": "none", "mlp": false, "mixer": $mixer},
 "task": "mqar:T=256,N=16,V=8192", "batch_size": 64, "steps": $STEPS, "lr": $lr, "eval_every": 500, "eval_batches": 16,
 "log_every": 500, "seed": 0, "device": "cuda", "bf16": true, "out": "$run/out"}
EOC
    echo "$name|$lr" >"$run/name"
    CUDA_VISIBLE_DEVICES=$((i % NGPU)) "$TOKMIX" train --config "$run/config.json" >"$run/log" 2>&1 &
    i=$((i + 1))
    while [ "$(jobs_of)" -ge $((PER_GPU * NGPU)) ]; do sleep 1; done
  done
done
wait || true
python3 - "$DIR" "$OUT/mqar.json" <<'EOP'
import json, os, sys
d, out = sys.argv[1], sys.argv[2]
best = {}
for r in sorted(os.listdir(d)):
    name, lr = open(f"{d}/{r}/name").read().strip().split("|")
    try:
        res = json.load(open(f"{d}/{r}/out/result.json"))
    except Exception:
        print(f"{name} lr {lr}: FAILED:", open(f"{d}/{r}/log").read()[-300:]); continue
    row = {"name": name, "lr": float(lr), "accuracy": 100 * res["eval_accuracy"], "best": 100 * res["best_accuracy"],
           "params": res["parameters"], "tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"]}
    if name not in best or row["best"] > best[name]["best"]: best[name] = row
print(f"\nMQAR T=256 N=16 V=8192 (best of the learning rates): accuracy %")
print(f"{'setting':32s} {'params':>9s} {'lr':>7s} {'final':>7s} {'best':>7s} {'tok/s':>10s}")
for r in best.values():
    print(f"{r['name']:32s} {r['params']:9d} {r['lr']:7.0e} {r['accuracy']:7.2f} {r['best']:7.2f} {r['tokens_per_s']:10.0f}")
json.dump(list(best.values()), open(out, "w"), indent=1)
EOP
