#!/usr/bin/env bash
# `tokmix bench decode` on the CPU: rows for every model and context, cache bytes as the
# patterns say (the lattice's flat, attention's growing with the context), clear errors for bad
# input.   bench_decode.sh TOKMIX_BINARY REPO_DIR
set -uo pipefail
TOKMIX=$1
REPO=$2
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
"$TOKMIX" bench decode --models "$REPO/configs/models/tiny-pow2-lattice.json,$REPO/configs/models/tiny-attention.json" \
  --contexts 8,300 --steps 3 --batch 2 --json "$DIR/rows.json" >"$DIR/out" 2>&1 || { cat "$DIR/out"; fail "bench decode"; }
python3 - "$DIR/rows.json" <<'EOP' || fail "rows: $(cat "$DIR/rows.json")"
import json, sys
rows = json.load(open(sys.argv[1]))
assert len(rows) == 4, rows
by = {(r["model"], r["context"]): r for r in rows}
for r in rows:
    assert r["tokens_per_s"] > 0 and r["batch"] == 2 and r["steps"] == 3, r
    assert r["graph_tokens_per_s"] == 0 and r["graph_max_rel_diff"] < 0, r  # no CUDA graphs on the CPU
lat = [by[("tiny-pow2-lattice", c)]["cache_bytes_per_seq"] for c in (8, 300)]
att = [by[("tiny-attention", c)]["cache_bytes_per_seq"] for c in (8, 300)]
assert lat[0] == lat[1] > 0, lat          # the cache is allocated for the longest context
assert att[0] == att[1] > 10 * lat[0], (att, lat)
EOP
# bad input: a clear message, a non-zero exit, no crash. Messages go to grep as here-strings:
# `echo | grep -q` races under pipefail (grep may exit before echo's last write, SIGPIPE).
echo "not json" >"$DIR/bad.json"
out=$("$TOKMIX" bench decode --models "$DIR/bad.json" 2>&1) && fail "a non-JSON model was accepted"
grep -q "is not JSON" <<<"$out" || fail "non-JSON model: $out"
out=$("$TOKMIX" bench decode --models "$REPO/configs/models/tiny-pow2.json" --contexts 0 2>&1) && fail "context 0 was accepted"
grep -qi "contexts: value 0 is not positive; expected an integer >= 1" <<<"$out" || fail "context 0: $out"
out=$("$TOKMIX" bench decode --models "$DIR/missing.json" 2>&1) && fail "a missing file was accepted"
grep -qi "missing.json" <<<"$out" || fail "missing file: $out"
echo "bench decode: OK"
