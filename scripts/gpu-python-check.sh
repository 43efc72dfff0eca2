#!/usr/bin/env bash
# The Python package on the GPU machine: builds libtokmix_torch.so with the CUDA backend against
# the LibTorch inside the machine's PyTorch, runs tests/python with that PyTorch (CUDA tests
# included) and bench/python_peers.py on the GPU, in one call.
#   scripts/gpu-python-check.sh [pytest arguments]
# Logs go to $OUT (the device tool brings that folder back), else build-gpu/out.
# Header-only dependencies the GPU image may lack (nlohmann_json) can travel in build-deps/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-python-check.log") 2>&1
PY=${PYTHON:-python3}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
OUT="$OUT" PY="$PY" bash scripts/gpu-build.sh tokmix_torch
export TOKMIX_LIBRARY=$PWD/build-gpu/lib/libtokmix_torch.so PYTHONPATH=$PWD/python TOKMIX_CRASH_REPORT=1
# flash-linear-attention for the side-by-side figure, when carried as source (the image has no
# fla; e.g. `git archive HEAD fla | tar -x -C build/fla-py` in its repository, carry build/fla-py)
if [ -d build/fla-py/fla ]; then PYTHONPATH=$PYTHONPATH:$PWD/build/fla-py; fi
if "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -p no:faulthandler tests/python -rs "$@" || status=$?
else
  echo "pytest is not importable by $PY: tests/python not run"
fi
# one libstdc++ in the process (CMakeLists.txt says why): no definition of its own in our library
nm -D --defined-only build-gpu/lib/libtokmix_torch.so >"$OUT/nm.txt"  # (a pipe into grep -q would fail under pipefail)
if grep -q "codecvt.*do_unshift" "$OUT/nm.txt"; then
  echo "libtokmix_torch.so carries its own libstdc++"; status=1
fi
"$PY" bench/python_peers.py --device cuda --T 1024,4096 --reps 10
# the attention pattern through tokmix's generic kernel is quadratic: SDPA alone stands for it at 16K
"$PY" bench/python_peers.py --device cuda --dtype bfloat16 --T 4096,16384 --reps 10 \
  --patterns local:64,first-order,pow2,sq1,pow2-lattice,sq1-lattice
rm -f "$OUT/nm.txt"
exit ${status:-0}
