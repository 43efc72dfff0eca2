#!/usr/bin/env bash
# Data-parallel training on a machine with 2 GPUs and PyTorch 2.x (NCCL), in one call:
#   1. builds the tokmix executable (-DTOKMIX_CUDA=ON, NCCL) against the machine's LibTorch;
#   2. checks: 2 GPUs x batch 8 give the weights of 1 GPU x batch 16 (fp32, 20 steps);
#   3. measures tokens/s of the same job on 1 GPU and on 2 GPUs (batch per GPU fixed) and
#      prints the scaling efficiency;
#   4. (FAILURE_TEST=1, default) kills one of two ranks mid-run and times how long the other
#      takes to stop with an error (--dist-timeout 20).
#   scripts/gpu-ddp.sh
# Settings (environment): STEPS (120), D_MODEL (512), LAYERS (8), T (512), BATCH (32 per GPU),
# MIXER (pow2; any mixer type of docs/model.md), BF16 (true), FAILURE_TEST (1), CORPUS (a corpus
# directory, e.g. data/kjv-bpe8192 built here by `tokmix corpus` and carried: a language model;
# default: MQAR).
# A smoke test of the script itself on CPU (Gloo): TOKMIX_BIN=build/tokmix DEVICE=cpu PY=/usr/bin/python3
# (skips the GPU checks and the build).
# Logs go to $OUT (the device tool brings that folder back), else build-gpu/out.
# Header-only dependencies the GPU image may lack (nlohmann_json, CLI11) travel in build-deps/
# (fill it here with scripts/gpu-deps.sh and carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-ddp.log") 2>&1
export NCCL_NVLS_ENABLE=0  # NVLink multicast off
STEPS=${STEPS:-120} D_MODEL=${D_MODEL:-512} LAYERS=${LAYERS:-8} T=${T:-512} BATCH=${BATCH:-32}
MIXER=${MIXER:-pow2} BF16=${BF16:-true} FAILURE_TEST=${FAILURE_TEST:-1}
DEVICE=${DEVICE:-cuda} PY=${PY:-$(command -v python3)}  # a path: the function below must not call itself
python3() { "$PY" "$@"; }

if [ -z "${TOKMIX_BIN:-}" ]; then
echo "tokmix $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv || true
nvidia-smi topo -m || true
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$NGPU" -ge 2 ] || { echo "gpu-ddp: needs 2 GPUs, found $NGPU"; exit 1; }

TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
TORCH_NCCL=$(python3 -c 'import torch; v = torch.cuda.nccl.version(); print(".".join(map(str, v)) if isinstance(v, tuple) else v)')
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
# nccl.h of the NCCL that LibTorch runs with (ProcessGroupNCCL's layout depends on its version)
nccl_version() { awk '/#define NCCL_MAJOR/{a=$3} /#define NCCL_MINOR/{b=$3} /#define NCCL_PATCH/{c=$3} END{print a"."b"."c}' "$1/nccl.h"; }
NCCL_INC=""
CANDIDATES=("${NCCL_INCLUDE_DIR:-}" $(python3 -c 'import site, glob; print(" ".join(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/**/include", recursive=True)))') /usr/local/cuda/include /usr/include)
for d in "${CANDIDATES[@]}"; do
  [ -n "$d" ] && [ -f "$d/nccl.h" ] || continue
  v=$(nccl_version "$d")
  echo "nccl.h $v in $d"
  if [ "$v" = "$TORCH_NCCL" ]; then NCCL_INC=$d; break; fi
  [ -z "$NCCL_INC" ] && NCCL_INC=$d
done
[ -n "$NCCL_INC" ] || { echo "gpu-ddp: no nccl.h found (set NCCL_INCLUDE_DIR)"; exit 1; }
[ "$(nccl_version "$NCCL_INC")" = "$TORCH_NCCL" ] || echo "gpu-ddp: WARNING nccl.h $(nccl_version "$NCCL_INC") differs from LibTorch's NCCL $TORCH_NCCL"

PREFIX="$TORCH_PREFIX"
[ -d build-deps ] && PREFIX="$PREFIX;$PWD/build-deps"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTOKMIX_CUDA=ON -DTOKMIX_TESTS=OFF -DTOKMIX_BENCH=OFF \
  -DTOKMIX_NATIVE=OFF -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" -DTOKMIX_NCCL_INCLUDE_DIR="$NCCL_INC" -DTOKMIX_GLOO=OFF \
  >"$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
grep "tokmix distributed backends" "$OUT/configure.log" || true
time cmake --build build-gpu -j"$(nproc)" --target tokmix_cli >"$OUT/build.log" 2>&1 ||
  { grep -B2 -A8 -m5 "error" "$OUT/build.log"; tail -20 "$OUT/build.log"; exit 1; }
TOKMIX=$PWD/build-gpu/tokmix
else
  TOKMIX=$(realpath "$TOKMIX_BIN")
fi
RUNS=$PWD/build-gpu/runs  # checkpoints stay here; metrics and results are copied to $OUT
rm -rf "$RUNS"
mkdir -p "$RUNS"

# --- 2. the same weights -----------------------------------------------------------------------
cat >"$RUNS/check.json" <<EOF
{"model": {"d_model": 64, "n_layers": 2, "positions": "none", "mixer": {"type": "$MIXER", "heads": 4}},
 "task": "copy:T=64,L=16,V=32", "batch_size": 16, "steps": 20, "lr": 3e-3, "eval_every": 10, "eval_batches": 2,
 "log_every": 5, "seed": 1, "device": "$DEVICE", "bf16": false}
EOF
"$TOKMIX" train --config "$RUNS/check.json" --out "$RUNS/check-1" >"$OUT/check-1.log" 2>&1 || { tail -20 "$OUT/check-1.log"; exit 1; }
"$TOKMIX" launch --nproc 2 --master-port 0 -- "$TOKMIX" train --config "$RUNS/check.json" --out "$RUNS/check-2" \
  --batch-size 8 --distributed --dist-timeout 120 >"$OUT/check-2.log" 2>&1 || { tail -30 "$OUT/check-2.log"; exit 1; }
python3 - "$RUNS/check-1/checkpoint/model.safetensors" "$RUNS/check-2/checkpoint/model.safetensors" <<'EOF'
import json, struct, sys, torch
def load(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    out = {}
    for k, v in head.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(b[8 + n + s:8 + n + e]), dtype=dt[v["dtype"]]).reshape(v["shape"]).float()
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
# by tensor norm, and by element (Adam magnifies the rounding of near-zero gradient elements)
norm = max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item() for k in a)
elem = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a)
print(f"same-weights check: 1 GPU x batch 16 vs 2 GPUs x batch 8 after 20 steps: relative difference {norm:.2e} (norm),",
      f"{elem:.2e} (element)", "(ok)" if norm < 1e-4 else "(TOO LARGE)")
EOF

# --- 3. throughput ------------------------------------------------------------------------------
# the data: a language-model corpus (CORPUS=dir of `tokmix corpus`, carried with the tree) or MQAR
if [ -n "${CORPUS:-}" ]; then DATA="\"corpus\": \"$PWD/$CORPUS\", \"context\": $T"; WHAT="language model on $CORPUS";
else DATA="\"task\": \"mqar:T=$T,N=$((T / 8)),V=8192\""; WHAT="LM-sized backbone on MQAR"; fi
cat >"$RUNS/speed.json" <<EOF
{"comment": "data-parallel throughput: $WHAT",
 "model": {"d_model": $D_MODEL, "n_layers": $LAYERS, "positions": "none", "max_context": $T, "mixer": {"type": "$MIXER", "heads": 8}},
 $DATA, "batch_size": $BATCH, "steps": $STEPS, "lr": 1e-3, "eval_every": 0, "eval_batches": 4,
 "log_every": 10, "seed": 0, "device": "$DEVICE", "bf16": $BF16}
EOF
# steady state: tokens between the metrics rows of step 20 and of the last step before the final
# evaluation, over the seconds between them (start-up, NCCL set-up and evaluation left out)
steady() {
  python3 - "$1/metrics.jsonl" "$2" "$T" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if "eval_loss" not in r]
a = next(r for r in rows if r["step"] >= 20); b = rows[-1]
print((b["step"] - a["step"]) * int(sys.argv[2]) * int(sys.argv[3]) / (b["seconds"] - a["seconds"]))
EOF
}
echo "== 1 GPU, batch $BATCH"
"$TOKMIX" train --config "$RUNS/speed.json" --out "$RUNS/speed-1" 2>&1 | tail -4
echo "== 2 GPUs (NCCL), batch $BATCH per GPU"
"$TOKMIX" launch --nproc 2 --master-port 0 -- "$TOKMIX" train --config "$RUNS/speed.json" --out "$RUNS/speed-2" \
  --distributed --dist-timeout 300 2>&1 | tail -6
for n in 1 2; do mkdir -p "$OUT/speed-$n" && cp "$RUNS/speed-$n"/{metrics.jsonl,result.json,options.json} "$OUT/speed-$n/"; done
TPS1=$(steady "$RUNS/speed-1" "$BATCH")
TPS2=$(steady "$RUNS/speed-2" "$((2 * BATCH))")
python3 - "$TPS1" "$TPS2" <<EOF
import sys
t1, t2 = float(sys.argv[1]), float(sys.argv[2])
print(f"$WHAT: d_model $D_MODEL, $LAYERS layers, mixer $MIXER, T $T, batch $BATCH per GPU, bf16 $BF16, $STEPS steps")
print(f"tokens/s: 1 GPU {t1:,.0f} | 2 GPUs {t2:,.0f} | speed-up {t2 / t1:.2f}x | scaling efficiency {100 * t2 / (2 * t1):.1f}%")
EOF

# --- 4. a rank dies ----------------------------------------------------------------------------
if [ "$FAILURE_TEST" = 1 ]; then
  sed -e 's/"steps": 20/"steps": 100000, "checkpoint_every": 50/' -e 's/"eval_every": 10/"eval_every": 0/' "$RUNS/check.json" >"$RUNS/fail.json"
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      "$TOKMIX" train --config "$RUNS/fail.json" --out "$RUNS/fail" --distributed --dist-timeout 20 >"$OUT/fail-rank$r.log" 2>&1 &
    eval "PID$r=\$!"
  done
  for _ in $(seq 600); do grep -q "step 200/" "$OUT/fail-rank0.log" 2>/dev/null && break; sleep 0.1; done
  kill -9 "$PID1"
  T0=$(date +%s.%N)
  for _ in $(seq 1200); do kill -0 "$PID0" 2>/dev/null || break; sleep 0.1; done  # at most 120 s
  if kill -0 "$PID0" 2>/dev/null; then
    echo "failure test: rank 1 killed; rank 0 still running after 120 s (timeout 20 s): FAILED"
    kill -9 "$PID0"
  fi
  set +e
  wait "$PID0"
  RC=$?
  set -e
  T1=$(date +%s.%N)
  echo "failure test: rank 1 killed; rank 0 exited with code $RC after $(python3 -c "print(round($T1 - $T0, 1))") s (timeout 20 s):"
  grep -m1 "error" "$OUT/fail-rank0.log" || tail -3 "$OUT/fail-rank0.log"
  kill -9 "$PID0" 2>/dev/null || true
  python3 -c "import json; print('checkpoint left at step', json.load(open('$RUNS/fail/checkpoint/checkpoint.json'))['step'])" || true
fi
