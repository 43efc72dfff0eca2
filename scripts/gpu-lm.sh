#!/usr/bin/env bash
# Language modeling on the GPU machine, in one call: builds the tokmix executable (CUDA) unless
# build-gpu/tokmix exists (scripts/gpu-ddp.sh builds the same one), then runs
# `tokmix reproduce lm --preset gpu`, split over the GPUs present (one process per GPU, each its
# own mixers), and a generation from one of the trained checkpoints.
#   scripts/gpu-lm.sh            (carry: build-deps and data/kjv-bpe8192, built here with
#                                 `tokmix corpus --source kjv --tokenizer bpe:8192 --out data/kjv-bpe8192`)
# Settings (environment): STEPS (the preset's), ONLY (mixer types, comma-separated; default all).
# Results go to $OUT (else build-gpu/out): results-all.json, curves.csv, lm-<gpu>.log, generate.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-lm.log") 2>&1
nvidia-smi --query-gpu=index,name,memory.total --format=csv || true
# build logs stay in build-gpu/out (the device tool brings back 8 files at most)
[ -x build-gpu/tokmix ] || OUT="$PWD/build-gpu/out" bash scripts/gpu-build.sh tokmix_cli -- -DTOKMIX_GLOO=OFF
TOKMIX=$PWD/build-gpu/tokmix
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
ALL=${ONLY:-attention,pow2-lattice,first-order,sq1-lattice,pow2,recurrence,sq1}
IFS=, read -ra MIXERS <<<"$ALL"
STEPS_ARG=()
[ -n "${STEPS:-}" ] && STEPS_ARG=(--steps "$STEPS")
pids=()
for ((g = 0; g < NGPU; g++)); do
  mine=()
  for ((i = g; i < ${#MIXERS[@]}; i += NGPU)); do mine+=("${MIXERS[i]}"); done
  [ ${#mine[@]} -gt 0 ] || continue
  list=$(IFS=,; echo "${mine[*]}")
  CUDA_VISIBLE_DEVICES=$g "$TOKMIX" reproduce lm --preset gpu --only "$list" "${STEPS_ARG[@]}" --out "$PWD/build-gpu/lm-$g" \
    >"$OUT/lm-$g.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
# one file of results (a JSON array, one element per GPU) and one of curves (mixer,metrics row)
"${PY:-python3}" - "$NGPU" "$OUT/results-all.json" <<'PYEOF' || true
import json, os, sys
n, out = int(sys.argv[1]), sys.argv[2]
res = []
for g in range(n):
    p = f"build-gpu/lm-{g}/results.json"
    if os.path.exists(p):
        res.append(json.load(open(p)))
json.dump(res, open(out, "w"), indent=1)
PYEOF
for ((g = 0; g < NGPU; g++)); do
  [ -f "$OUT/lm-$g.log" ] || continue  # a GPU with no mixer of the list
  for d in build-gpu/lm-$g/*/; do
    [ -f "$d/metrics.csv" ] && tail -n +2 "$d/metrics.csv" | sed "s|^|$(basename "$d"),|"
  done
  sed -n '/^Language modeling/,$p' "$OUT/lm-$g.log" >&2
done >"$OUT/curves.csv"
[ $rc = 0 ] || { echo "a reproduce process failed:"; for f in "$OUT"/lm-*.log; do echo "== $f"; tail -n 60 "$f"; done; exit 1; }
# generation through prefill and cached decoding on the GPU (token ids: the BPE decoder is a
# CPU-side module this machine may lack)
CK=$(ls -d build-gpu/lm-*/pow2-lattice/checkpoint 2>/dev/null | head -1 || true)
[ -n "$CK" ] && "$TOKMIX" generate --checkpoint "$CK" --ids 1,2,3 --device cuda --max-tokens 256 --temperature 0.8 --quiet --json "$OUT/generate.json" 2>&1 | tail -2
exit 0
