#!/usr/bin/env bash
# The `tokmix generate` command at its edges (docs/lm.md): trains a tiny byte-level model on a
# small text for a few steps, then checks each input's defined behaviour: a result or a clear
# error, never a crash.   generate_edges.sh TOKMIX_BINARY
set -uo pipefail
TOKMIX=$1
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
for i in $(seq 400); do echo "and the lord spake unto moses, saying, speak unto the children of israel"; done >"$DIR/text.txt"
cat >"$DIR/train.json" <<EOC
{"model": {"d_model": 32, "n_layers": 1, "positions": "none", "max_context": 64,
           "mixer": {"type": "pow2-lattice", "heads": 2, "conv": 3}},
 "corpus": {"sources": ["$DIR/text.txt"], "tokenizer": "byte", "out": "$DIR/corpus"},
 "context": 64, "batch_size": 8, "steps": 40, "lr": 1e-2, "eval_every": 40, "eval_batches": 1,
 "log_every": 40, "threads": 1, "out": "$DIR/run"}
EOC
"$TOKMIX" train --config "$DIR/train.json" >"$DIR/train.log" 2>&1 || { cat "$DIR/train.log"; fail "training"; }
CK="$DIR/run/checkpoint"
gen() { "$TOKMIX" generate --checkpoint "$CK" --temperature 0 --seed 1 "$@"; }

# a one-token prompt: a result
out=$(gen --prompt "a" --max-tokens 20 2>"$DIR/err") || fail "one-token prompt: $(cat "$DIR/err")"
[ "${#out}" -ge 20 ] || fail "one-token prompt gave '$out'"
grep -q "decode .* tokens/s; cache [0-9]* bytes" "$DIR/err" || fail "no speed and cache report: $(cat "$DIR/err")"
# an empty prompt: starts from a line break
out=$(gen --prompt "" --max-tokens 10 2>"$DIR/err") || fail "empty prompt: $(cat "$DIR/err")"
[ -n "$out" ] || fail "empty prompt gave nothing"
# a prompt longer than the context: its last tokens are kept, with a note
long=$(printf 'x%.0s' $(seq 200))
gen --prompt "$long" --max-tokens 8 --quiet >"$DIR/out" 2>"$DIR/err" || fail "long prompt: $(cat "$DIR/err")"
grep -q "first 144 tokens were dropped" "$DIR/err" || fail "long prompt: no note of dropped tokens: $(cat "$DIR/err")"
# max-tokens at the context: a clear error
gen --prompt "a" --max-tokens 64 >/dev/null 2>"$DIR/err" && fail "max-tokens 64 accepted"
grep -q "max_tokens = 64; expected in \[0, 64)" "$DIR/err" || fail "max-tokens message: $(cat "$DIR/err")"
# a token id outside the vocabulary: a clear error naming it
gen --ids 1,2,300 --max-tokens 4 >/dev/null 2>"$DIR/err" && fail "id 300 accepted"
grep -q "token id 300" "$DIR/err" || fail "id message: $(cat "$DIR/err")"
gen --ids 1,x --max-tokens 4 >/dev/null 2>"$DIR/err" && fail "id x accepted"
grep -q "'x' is not an integer" "$DIR/err" || fail "bad id message: $(cat "$DIR/err")"
# a non-UTF-8 prompt: the byte tokenizer takes any bytes
gen --prompt "$(printf 'ab\xff\xfe')" --max-tokens 4 --quiet >/dev/null 2>"$DIR/err" || fail "non-UTF-8 prompt: $(cat "$DIR/err")"
# bad sampling options
gen --prompt "a" --temperature -1 >/dev/null 2>"$DIR/err" && fail "temperature -1 accepted"
grep -q "temperature" "$DIR/err" || fail "temperature message: $(cat "$DIR/err")"
gen --prompt "a" --top-p 0 >/dev/null 2>"$DIR/err" && fail "top-p 0 accepted"
# a batch of prompts from a file, as JSON
printf 'and the\nspeak unto\n\n' >"$DIR/prompts.txt"
gen --prompts "$DIR/prompts.txt" --max-tokens 12 --json "$DIR/gen.json" >/dev/null 2>"$DIR/err" || fail "prompts file: $(cat "$DIR/err")"
[ "$(grep -c '"completion"' "$DIR/gen.json")" = 3 ] || fail "prompts file: expected 3 completions in $(cat "$DIR/gen.json")"
# the learned text: greedy decoding continues the corpus's sentence
out=$(gen --prompt "and the lord spake unto" --max-tokens 12 2>/dev/null)
case "$out" in *"moses"*) ;; *) echo "note: after 40 steps the model continued with '$out'";; esac
# perplexity of the checkpoint on its corpus
"$TOKMIX" eval --checkpoint "$CK" --corpus "$DIR/corpus" >"$DIR/eval" 2>&1 || fail "eval --corpus: $(cat "$DIR/eval")"
grep -q "perplexity .*bits per byte" "$DIR/eval" || fail "eval output: $(cat "$DIR/eval")"
echo "generate edges: all defined"
