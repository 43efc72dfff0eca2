#!/usr/bin/env bash
# The crash report (src/core/crash_report.cpp): a tokmix process that receives SIGSEGV in the
# middle of work prints the signal, the instruction with its module and a stack, then dies of
# the same signal (exit status 128 + 11), rather than vanishing or hanging.
#   crash_report.sh TOKMIX_BINARY
set -uo pipefail
TOKMIX=$1
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
fail() { echo "FAIL: $*"; cat "$DIR/err"; exit 1; }
# long enough to be interrupted: sq1 at T = 65536 takes seconds per pass
"$TOKMIX" bench mix --patterns sq1 --T 65536 --reps 5 --threads 1 --dense-max-T 0 >/dev/null 2>"$DIR/err" &
pid=$!
sleep 2
kill -SEGV "$pid" 2>/dev/null || fail "the process ended before the signal"
wait "$pid"
rc=$?
[ "$rc" = 139 ] || fail "exit status $rc; expected 139 (death by SIGSEGV)"
grep -q "tokmix: fatal signal 11" "$DIR/err" || fail "no report line"
grep -q "  instruction 0x" "$DIR/err" || fail "no faulting instruction"
grep -q "stack unwound:" "$DIR/err" || fail "no unwound stack"
grep -Eq "tokmix|libtokmix|\.so" "$DIR/err" || fail "no module named in the stack"
echo "crash report: ok ($(wc -l <"$DIR/err") lines)"
