#!/usr/bin/env bash
# sweep.sh — the long differential sweep: N random valid specs (tests/sweep/spec_sampler.c),
# each generated, compiled, run on random tokens and compared with the double-precision
# reference, on the default host compiler and, where installed, on clang (both at once).
#   scripts/sweep.sh [N] [SEED]        (default N = 500, SEED = the date, e.g. 20261130)
# Failing specs are saved with their data plan in build/sweep-<compiler>/failures/: copy
# one into tests/regressions/ (with a comment on what it found) to make it a regression
# test. Logs: build/sweep-<compiler>/log. Exit status 1 when any case failed.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-500}
seed=${2:-$(date +%Y%m%d)}
scripts/setup.sh
compilers=(cc)
command -v clang > /dev/null && compilers+=(clang)
pids=()
for compiler in "${compilers[@]}"; do
    out=build/sweep-$compiler
    rm -rf "$out/failures"
    mkdir -p "$out"
    # each compiler gets its own seed range and its own cache (modules are per compiler anyway)
    offset=0
    [ "$compiler" = clang ] && offset=1
    MOEGEN_CACHE_DIR="$PWD/$out/cache" build/tests/moegen_sweep --seed $((seed * 2 + offset)) --count "$count" \
        --compiler "$compiler" --quiet --failures "$out/failures" > "$out/log" 2>&1 &
    pids+=($!)
    echo "sweep: $count specs on $compiler, seed $((seed * 2 + offset)), log $out/log"
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    tail -n 1 "build/sweep-${compilers[$i]}/log"
done
exit $status
