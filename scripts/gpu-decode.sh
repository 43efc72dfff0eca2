#!/usr/bin/env bash
# Whole-model decoding on the GPU, eager against CUDA-graph replays, in one call: builds the
# CLI, times `tokmix bench decode` for the gpu LM preset's models (the graph's logits must equal
# the eager step's), then checks that `tokmix generate` gives the same greedy text both ways
# after a short training run (needs data/kjv-bpe8192, carried: the GPU machine has no network;
# without it that check is skipped).
#   scripts/gpu-decode.sh          (carry: build-deps, data/kjv-bpe8192)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-decode.log") 2>&1
[ -x build-gpu/tokmix ] || OUT="$OUT" bash scripts/gpu-build.sh tokmix_cli -- -DTOKMIX_GLOO=OFF
grep -i "libstdc++" "$OUT/configure.log" || true
# one libstdc++: none of its code may be linked into the executable itself
# grep reads all of nm's output (no -q): an early exit would SIGPIPE nm and, under pipefail, hide a match
if nm -C --defined-only build-gpu/tokmix | grep "codecvt<char16_t.*do_unshift" >/dev/null; then
  echo "FAIL: build-gpu/tokmix carries its own libstdc++"; exit 1
fi
T=build-gpu/tokmix
$T bench decode --device cuda --models configs/models/gpu-lm-attention.json,configs/models/gpu-lm-pow2-lattice.json,configs/models/gpu-lm-sq1-lattice.json,configs/models/gpu-lm-first-order.json \
  --contexts 512,4096,32768 --steps ${STEPS:-64} --json "$OUT/decode.json"
$T bench decode --device cuda --models configs/models/gpu-lm-pow2-lattice.json,configs/models/gpu-lm-attention.json \
  --contexts 4096 --batch 16 --steps 32 --json "$OUT/decode-batch16.json"
if [ -f data/kjv-bpe8192/train.bin ]; then
  $T reproduce lm --preset gpu --only pow2-lattice --steps 20 --out build-gpu/lm-decode >"$OUT/lm-train.log" 2>&1 || { tail -30 "$OUT/lm-train.log"; exit 1; }
  ck=build-gpu/lm-decode/pow2-lattice/checkpoint
  for g in "" --no-cuda-graph; do
    $T generate --checkpoint $ck --device cuda --prompt "And God said" --max-tokens 200 --temperature 0 --quiet $g --json "$OUT/gen$g.json" 2>&1 | tail -2
  done
  python3 - "$OUT/gen.json" "$OUT/gen--no-cuda-graph.json" <<'EOP'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
ta, tb = a["results"][0]["tokens"], b["results"][0]["tokens"]
print(f"generate: graph {a['decode_tokens_per_s']:.1f} tok/s (cuda_graph={a['cuda_graph']}), eager {b['decode_tokens_per_s']:.1f} tok/s")
same = sum(x == y for x, y in zip(ta, tb))
print(f"greedy tokens equal: {same} of {len(ta)}")
sys.exit(0 if ta == tb and a["cuda_graph"] else 1)
EOP
fi
