#!/usr/bin/env bash
# test_tune.sh — `moegen tune` end to end on a tiny spec with a small budget: the table, the
# database, a layer that then runs the tuned variants (and says so), and the candidates that
# must fail without taking the tuner down (injected: a compile failure, a crash, a hang, a
# wrong answer), each with its label; corrupt and stale databases fall back to the default
# with a warning; another CPU of the same family uses the file through the family rung.
# Needs MOEGEN_BINARY and MOEGEN_SOURCE_DIR (set by CTest).
set -u
moegen=${MOEGEN_BINARY:?}
work=$(mktemp -d /tmp/moegen-tune-XXXXXX)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/check_lib.sh"

spec=$work/tiny.yaml
printf 'name: tiny_tune\nnum_experts: 6\nnum_experts_per_tok: 2\nhidden_size: 32\nmoe_intermediate_size: 48\ndtype: fp32\n' >"$spec"
db=$work/db
common=(--cache-dir "$work/cache")

# Candidates run in rounds of --jobs in sweep order, so candidates 0-4 (the default and the faults)
# are compiled and timed in the first three rounds; the budget leaves room for those on a loaded CI
# machine under the sanitizers (the hang takes its whole time limit, 8 s).
expect "tune: a tiny spec with faults injected into candidates 1-4" 0 \
    env MOEGEN_TUNE_INJECT="compile:1,crash:2,wrong:3,hang:4" \
    "$moegen" tune "$spec" --tokens 1,8,64 --budget 45 --timeout 8 --repeat 3 --jobs 2 --evict-mb 0 --out "$db" "${common[@]}"
contains "tune --evict-mb 0 times with warm caches" "warm caches (--evict-mb 0)"
contains "tune prints the table" "| tokens | timed | best variant | median | untuned (default heuristic) | speedup |"
contains "tune: the first bucket starts at 1" "| 1-2 | 1 |"
contains "tune: the last bucket is open" "| 23-inf | 64 |"
contains "tune: a compile failure is FAIL with the compiler's reason" "compile: "
contains "tune: a crash is FAIL with the signal" "crashed: signal 11"
contains "tune: a hang is killed at its time limit" "timeout: no result within 8 s (killed)"
contains "tune: a wrong answer is FAIL from the verifier" "wrong output: "
contains "tune: PASS / FAIL / INVALID counts" "4 FAIL"
contains "tune: says where the database went" "database: $db/"
file=$(find "$db" -name '*.tune' | head -1)
if [ -n "$file" ] && grep -q '^bucket 1-2 ' "$file" && grep -q '^routing: skewed$' "$file"; then
    pass "tune: the database file has the buckets and the routing"
else
    fail "tune: no database file with the buckets under $db"
fi
# The winners never come from a failed candidate: the table names only PASS variants.
table_variants=$(printf '%s\n' "$out" | grep '^| [0-9]' | awk -F'|' '{gsub(/ /, "", $4); print $4}')
failed_variants=$(printf '%s\n' "$out" | grep '^  FAIL ' | awk '{print $2}' | tr -d ':')
bad=0
for v in $table_variants; do printf '%s\n' "$failed_variants" | grep -qx -- "$v" && bad=1; done
if [ "$bad" -eq 0 ]; then pass "tune: no failed candidate wins a bucket"; else fail "tune: a failed candidate won"; fi

# The tuner's own memory does not grow with the candidates (each is loaded in a child): a sweep
# of one timed candidate and the sweep above peak within 16 MiB of each other.
peak_many=$(printf '%s\n' "$out" | sed -n 's/^tuner process peak memory: \([0-9.]*\) MiB$/\1/p')
candidates_many=$(printf '%s\n' "$out" | sed -n 's/^candidates: \([0-9]*\) PASS.*/\1/p')
expect "tune: a sweep that times only the default" 0 "$moegen" tune "$spec" --tokens 1,8,64 --budget 1 --repeat 1 \
    --no-write "${common[@]}"
peak_one=$(printf '%s\n' "$out" | sed -n 's/^tuner process peak memory: \([0-9.]*\) MiB$/\1/p')
contains "tune times with cold caches by default" "cold caches (--evict-mb)"
# Even on a spent budget the default heuristic's variant of every count is timed (this fp32 spec
# runs outer products from 48 tokens: moegen_variant_default_ranges), so no bucket is slower than
# the untuned layer.
if printf '%s\n' "$out" | grep -q '"variant": "[^"]*outer[^"]*", "state": "PASS"'; then
    pass "tune: the heuristic's outer-product variant is timed on a spent budget"
else
    fail "tune: no PASS outer-product candidate on a spent budget: $out"
fi
slower=$(printf '%s\n' "$out" | grep '^| [0-9]' | awk -F'|' '{s = $7; gsub(/[ x]/, "", s); if (s + 0 < 1) print}')
if [ -z "$slower" ] && [ "$(printf '%s\n' "$out" | grep -c '^| [0-9]')" -eq 3 ]; then
    pass "tune: every bucket at least as fast as the untuned layer"
else
    fail "tune: a bucket slower than the default heuristic, or rows missing: $slower"
fi
if [ -n "$peak_many" ] && [ -n "$peak_one" ] &&
    awk -v a="$peak_many" -v b="$peak_one" 'BEGIN { exit !(a - b < 16) }'; then
    pass "tune: peak memory $peak_many MiB over $candidates_many PASS candidates vs $peak_one MiB for one"
else
    fail "tune: peak memory grew with the candidates: '$peak_many' MiB vs '$peak_one' MiB"
fi

expect "a layer of the tuned shape uses the database" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 40 "${common[@]}"
contains "run says which rung and file" "tuning: exact: $file"
contains "the tuned layer verifies" "verify against the double-precision reference"
lacks "the tuned layer verifies ok" "FAILED"
expect "--no-tuning runs the default" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 40 --no-tuning "${common[@]}"
contains "--no-tuning is reported" "tuning: default heuristic (tuning off)"
expect "--variant wins over the database" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 4 --variant tile_rows=2 "${common[@]}"
contains "--variant is reported" "tuning: explicit variant"

# Incumbents: a re-tune races the variants of the database it replaces, whatever the budget,
# against its own finalists, alternated; the race's medians decide.
cp "$file" "$work/tuned.tune"
set_bucket_variant() { # the variant column of bucket 1-2 of $file
    awk -v v="$1" '$1 == "bucket" && $2 == "1-2" { $6 = v } { print }' "$work/tuned.tune" >"$file"
}
set_bucket_variant gemm=fma,tile_rows=5,block_rows=40
expect "a re-tune on a spent budget" 0 "$moegen" tune "$spec" --tokens 1,8,64 --budget 1 --repeat 2 --evict-mb 0 \
    --no-write --out "$db" "${common[@]}"
contains "the re-tune names the database it races" "racing the variants of $file"
if printf '%s\n' "$out" | grep '^race at 1 tokens' | grep -q 'v16r5c[0-9]*b40x[0-9]*q[0-9]*fma_[0-9a-f]* (replaced database)'; then
    pass "tune: the incumbent's variant (tile_rows=5) races at 1 token on a spent budget"
else
    fail "tune: no race at 1 token with the incumbent's tile_rows=5 variant: $out"
fi
# --keep-margin 100: no race beats the replaced database's variant by 100 %, so it stays, unless
# it was slower than the untuned variant in the race (a tuned layer is never slower than the
# untuned one in the measured run). Which case happened is read off the race line; slow:0 runs the
# untuned variant 3x per timing in the race at 1 token, which makes the first case the likely one
# and is the drift the tuner must warn about.
expect "--keep-margin 100, the untuned variant slowed down in the race" 0 env MOEGEN_TUNE_INJECT="slow:0" \
    "$moegen" tune "$spec" --tokens 1,8,64 --budget 1 --repeat 1 --race-rounds 3 --keep-margin 100 --evict-mb 0 \
    --no-write --out "$db" "${common[@]}"
contains "a machine that changed speed is a warning" "the machine changed speed during the run"
race_line=$(printf '%s\n' "$out" | grep '^race at 1 tokens') # the kept note of another count's race is its own
race_entries=$(printf '%s\n' "$race_line" | sed 's/^[^:]*: //; s/;.*//' | tr ',' '\n')
kept_note() { printf '%s' "$race_line" | grep -qF "kept the replaced database's variant"; }
untuned_ms=$(printf '%s\n' "$race_entries" | awk '/\(untuned\)/ {print $1}')
replaced_ms=$(printf '%s\n' "$race_entries" | awk '/\(replaced database\)/ {print $1}')
# Another finalist at or below the replaced variant's (printed, rounded) median: then the kept note
# is due; none: the replaced variant was the race's fastest and wins without the rule.
beaten=$(printf '%s\n' "$race_entries" | awk -v r="$replaced_ms" '!/\(replaced database\)/ && $1 <= r + 0' | head -1)
r5_wins=0
printf '%s\n' "$out" | grep -q '^| 1-2 | 1 | cpu_fp32_e6k2_h32f48_v16r5c[0-9]*b40x' && r5_wins=1
if [ -z "$untuned_ms" ] || [ -z "$replaced_ms" ]; then
    fail "tune: no race at 1 token with the untuned and the replaced variant: $out"
elif awk -v a="$replaced_ms" -v b="$untuned_ms" 'BEGIN { exit !(a < b) }'; then
    if [ "$r5_wins" -eq 1 ]; then pass "tune: the replaced variant ($replaced_ms ms, untuned $untuned_ms) is kept"
    else fail "tune: --keep-margin 100 replaced bucket 1-2's variant: $out"; fi
    if [ -z "$beaten" ]; then
        if kept_note; then fail "the replaced variant was the race's fastest, yet a kept note: $race_line"
        else pass "the replaced variant was the race's fastest: no kept note"; fi
    elif ! kept_note; then
        # not kept by the rule: then it must have been the fastest, tied in the printed digits
        if awk -v a="$beaten" -v r="$replaced_ms" 'BEGIN { split(a, f, " "); exit !(f[1] + 0 == r + 0) }'; then
            pass "tune: the replaced variant tied the race's fastest in the printed digits ($replaced_ms ms)"
        else
            fail "tune: a faster finalist ($beaten) and no kept note: $out"
        fi
    else
        pass "the race line says the variant was kept"
    fi
elif awk -v a="$replaced_ms" -v b="$untuned_ms" 'BEGIN { exit !(a > b) }'; then
    if [ "$r5_wins" -eq 0 ]; then pass "tune: the replaced variant, slower than the untuned one ($replaced_ms > $untuned_ms ms), is not kept"
    else fail "tune: a replaced variant slower than the untuned one was kept: $out"; fi
    if kept_note; then fail "a kept note for a variant slower than the untuned one: $race_line"
    else pass "no kept note for a variant slower than the untuned one"; fi
else # equal in the printed digits: either rule may have applied; the run must still have a winner
    contains "tune: bucket 1-2 has a winner" "| 1-2 | 1 | cpu_fp32_e6k2_h32f48_"
fi
expect "--no-incumbent" 0 "$moegen" tune "$spec" --tokens 1,8 --budget 1 --repeat 1 --race-rounds 0 --no-incumbent \
    --evict-mb 0 --no-write --out "$db" "${common[@]}"
lacks "--no-incumbent races no database" "racing the variants"
lacks "--race-rounds 0 runs no race" "rounds alternated"
set_bucket_variant gemm=fma,tile_rows=5
expect "an incumbent variant that no longer fits" 0 "$moegen" tune "$spec" --tokens 1,8 --budget 1 --repeat 1 \
    --race-rounds 1 --evict-mb 0 --no-write --out "$db" "${common[@]}"
contains "a variant that no longer fits is a note naming the file" "$file: not racing its variant for 1 tokens: variant: "
printf 'bucket 2-1 nonsense\n' >>"$file"
expect "a corrupt database at the output path" 0 "$moegen" tune "$spec" --tokens 1,8 --budget 1 --repeat 1 \
    --race-rounds 1 --evict-mb 0 --no-write --out "$db" "${common[@]}"
contains "a corrupt database is not raced, with the reason" "not racing the database at the output path: $file:"
printf 'name: tiny_other\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\nmoe_intermediate_size: 32\ndtype: fp32\n' \
    >"$work/other.yaml"
expect "another shape's database as --incumbent" 0 "$moegen" tune "$work/other.yaml" --incumbent "$work/tuned.tune" \
    --tokens 1 --budget 1 --repeat 1 --race-rounds 1 --evict-mb 0 --no-write "${common[@]}"
contains "another shape's database is raced with a note" "; for another shape: backend=cpu E=6 k=2 H=32 F=48"
expect "a missing --incumbent file is an error" 1 "$moegen" tune "$spec" --incumbent "$work/none.tune" --no-write \
    "${common[@]}"
contains "the --incumbent error names the file" "tune: --incumbent $work/none.tune"
cp "$work/tuned.tune" "$file"

# Another CPU of the same family: the family rung.
other=$(dirname "$file")/cpu-Another-Model-Of-The-Family.tune
sed 's/^device: .*/device: cpu Another Model Of The Family/' "$file" >"$other"
mv "$file" "$work/exact.tune"
expect "a same-family file is used" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 4 "${common[@]}"
contains "run reports the family rung" "tuning: family: $other"
rm -f "$other"
mv "$work/exact.tune" "$file"

# Corrupt and stale files: a warning and the default, never a failure.
cp "$file" "$work/good.tune"
printf 'bucket 2-1 nonsense\n' >>"$file"
expect "a corrupt database still opens" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 4 "${common[@]}"
contains "a corrupt database is a warning naming the file" "warning: "
contains "a corrupt database falls back to the default" "tuning: default heuristic"
sed 's/^moegen: .*/moegen: 0.0.1/' "$work/good.tune" >"$file"
expect "a stale database still opens" 0 env MOEGEN_TUNING_DIR="$db" "$moegen" run "$spec" --tokens 4 "${common[@]}"
contains "a stale database is a warning saying so" "0.0.1"
contains "a stale database falls back to the default" "tuning: default heuristic"
cp "$work/good.tune" "$file"

# Bad requests are one-line errors.
printf 'name: tiny_ep\nep_size: 2\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 16\nmoe_intermediate_size: 16\n' >"$work/ep.yaml"
expect "tune refuses an expert-parallel spec" 1 "$moegen" tune "$work/ep.yaml" --no-write "${common[@]}"
contains "the ep refusal says why" "expert-parallel layers are not tuned"
expect "tune refuses an unknown routing" 1 "$moegen" tune "$spec" --routing lumpy
contains "the routing error lists the choices" "skewed, uniform, zipf:S or from:DIR"
# Replaying saved routing: a run's topk_ids drive the timed tokens.
expect "run --save writes topk_ids" 0 "$moegen" run "$spec" --tokens 20 --save "$work/saved" "${common[@]}"
expect "tune --routing from:DIR" 0 "$moegen" tune "$spec" --routing from:"$work/saved" --tokens 1,16 --budget 5 \
    --repeat 2 --no-write "${common[@]}"
contains "the replay is announced" "replaying the routing of 20 saved tokens"
python3 -c "import numpy" 2>/dev/null && python3 - "$work/bad" <<'PY'
import numpy as np, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
np.save(os.path.join(sys.argv[1], "topk_ids.npy"), np.array([[0, 0]], dtype=np.int32))
PY
if [ -f "$work/bad/topk_ids.npy" ]; then
    expect "a saved routing naming one expert twice is refused" 1 "$moegen" tune "$spec" --routing from:"$work/bad" --no-write
    contains "the refusal names the token" "token 0 names expert 0 twice"
fi
expect "tune refuses decreasing token counts" 1 "$moegen" tune "$spec" --tokens 8,2
expect "tune refuses a negative --evict-mb" 1 "$moegen" tune "$spec" --evict-mb -1
contains "tune --evict-mb names the option" "--evict-mb"
expect "tune --help" 0 "$moegen" tune --help
contains "tune --help shows usage" "usage: moegen tune"

finish
