#!/usr/bin/env bash
# test_ep_mpi.sh — expert parallelism over MPI (tests/test_ep_mpi.c under mpirun):
# every case at P = 2 and 4, each rank bitwise equal to ep_size 1 and verified; then the
# faults at P = 3: a rank that never calls forward and a killed rank (every survivor must
# return MOEGEN_ERR_COMM within the deadline), and a rank with another spec (every rank
# must fail at open naming it). Needs TEST_EP_MPI (the binary) and mpirun on PATH.
# Open MPI aborts the whole job when a rank dies unless --enable-recovery is given; with
# it, the survivors run on and report.
set -u
binary=${TEST_EP_MPI:?}
failures=0
pass() { echo "ok   - $1"; }
fail() { echo "FAIL - $1"; failures=$((failures + 1)); }
mpi() { # mpi NP ARGS...: run under mpirun with a hard limit, output in $out
    local np=$1
    shift
    out=$(timeout 600 mpirun --allow-run-as-root --oversubscribe --enable-recovery -np "$np" "$binary" "$@" 2>&1)
}
export MOEGEN_COMM_TIMEOUT=${MOEGEN_COMM_TIMEOUT:-120}
for np in 2 4; do
    mpi "$np" cases
    printf '%s\n' "$out" | grep '^\[rank' | grep -v ' ok ' | head -n 20
    passed=$(printf '%s\n' "$out" | grep -c "^\[rank [0-9]*/$np\] PASS")
    if [ "$passed" -eq "$np" ]; then pass "P=$np: every case bitwise equal to ep_size 1 on all $np ranks"
    else fail "P=$np cases: $(printf '%s' "$out" | tail -n 15)"; fi
done

# open waits up to MOEGEN_COMM_TIMEOUT; the faulty forward runs under the binary's 3 s
for mode in never-forward kill mismatch; do
    start=$(date +%s)
    mpi 3 "$mode"
    elapsed=$(($(date +%s) - start))
    survivors=$(printf '%s\n' "$out" | grep -c 'survived: ')
    expected=2
    [ "$mode" = mismatch ] && expected=3
    if [ "$survivors" -eq "$expected" ] && ! printf '%s' "$out" | grep -q 'FAIL'; then
        pass "$mode: $survivors ranks returned an error within the deadline (${elapsed} s in all)"
        printf '%s\n' "$out" | grep 'survived: ' | head -n 1
    else
        fail "$mode: $survivors of $expected ranks reported: $(printf '%s' "$out" | tail -n 15)"
    fi
    if [ "$mode" = mismatch ] && ! printf '%s' "$out" | grep 'survived: ' | grep -q 'rank 1 has spec'; then
        fail "mismatch: the message does not name rank 1"
    fi
done
echo "$failures failure(s)"
[ "$failures" -eq 0 ]
