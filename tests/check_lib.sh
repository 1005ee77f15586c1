# check_lib.sh — the assertions the shell tests share (sourced by test_cli.sh, test_tune.sh):
# each prints "ok   - NAME" or "FAIL - NAME ..." and counts failures; the test ends with
# `finish`, which fails the script if any check failed.
failures=0
pass() { echo "ok   - $1"; }
fail() { echo "FAIL - $1"; failures=$((failures + 1)); }
expect() { # expect NAME STATUS COMMAND...: run COMMAND, require exit STATUS, keep output in $out
    local name=$1 status=$2
    shift 2
    out=$("$@" 2>&1)
    local rc=$?
    if [ "$rc" -eq "$status" ]; then pass "$name"; else fail "$name (exit $rc, wanted $status): $out"; fi
}
contains() { if printf '%s' "$out" | grep -qF -- "$2"; then pass "$1"; else fail "$1: '$2' not in: $out"; fi; }
lacks() { if printf '%s' "$out" | grep -qF -- "$2"; then fail "$1: '$2' in: $out"; else pass "$1"; fi; }
finish() {
    echo "$failures failure(s)"
    [ "$failures" -eq 0 ]
}
