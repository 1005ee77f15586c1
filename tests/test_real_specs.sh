#!/usr/bin/env bash
# test_real_specs.sh — `moegen run` on every shipped real-model spec that fits in this
# machine's memory, verified against the reference (a sample of tokens for the big ones).
# A spec that does not fit must fail with the clear "needs about N GiB" error, not crash.
set -u
moegen=${MOEGEN_BINARY:?}
src=${MOEGEN_SOURCE_DIR:?}
tokens=${MOEGEN_REAL_SPEC_TOKENS:-32}
failures=0
for spec in "$src"/specs/*.yaml; do
    name=$(basename "$spec" .yaml)
    out=$("$moegen" run "$spec" --tokens "$tokens" --repeat 1 2>&1)
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok   - $name: $(printf '%s\n' "$out" | grep -E 'median|verify' | tr -s ' ' | tr '\n' ' ')"
    elif printf '%s' "$out" | grep -q "this process can allocate"; then
        echo "ok   - $name does not fit here: $out"
    else
        echo "FAIL - $name (exit $rc):"
        printf '%s\n' "$out"
        failures=$((failures + 1))
    fi
done
[ "$failures" -eq 0 ]
