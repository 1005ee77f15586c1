#!/usr/bin/env bash
# test_cli.sh — the `moegen` command end to end: help and exit codes, check (canonical
# form and hash), gen (write-if-changed; --backend cuda for every --arch form), run (verify,
# --save / --load round trip), bench's output rule (--json) and the --plot charts of bench
# and run, and one-line errors. Needs MOEGEN_BINARY and MOEGEN_SOURCE_DIR (set by CTest).
set -u
moegen=${MOEGEN_BINARY:?}
src=${MOEGEN_SOURCE_DIR:?}
work=$(mktemp -d /tmp/moegen-cli-XXXXXX)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/check_lib.sh"

expect "no arguments prints usage and fails" 1 "$moegen"
contains "usage names the commands" "commands:"
for cmd in check gen run bench; do
    expect "$cmd --help succeeds" 0 "$moegen" "$cmd" --help
    contains "$cmd --help shows usage" "usage: moegen $cmd"
done
expect "unknown command fails" 1 "$moegen" frobnicate
contains "unknown command error is one line" "moegen: unknown command 'frobnicate'"

# check: canonical form and hash, stable under reordering and comments
expect "check accepts the demo spec" 0 "$moegen" check "$src/specs/demo.yaml"
contains "check prints the hash" "# sha256: "
hash1=$(printf '%s' "$out" | sed -n 's/^# sha256: //p')
{ echo "# reordered copy"; echo "dtype: bf16"; grep -v '^#' "$src/specs/demo.yaml" | grep -v '^dtype:'; } > "$work/reordered.yaml"
expect "check accepts a reordered copy" 0 "$moegen" check "$work/reordered.yaml"
hash2=$(printf '%s' "$out" | sed -n 's/^# sha256: //p')
if [ -n "$hash1" ] && [ "$hash1" = "$hash2" ]; then pass "reordered spec has the same hash"; else fail "hashes differ: $hash1 vs $hash2"; fi
printf 'name: bad\nnum_experts: 4\nnum_experts_per_tok: 9\nhidden_size: 32\nmoe_intermediate_size: 16\n' > "$work/bad.yaml"
expect "check rejects a bad spec" 1 "$moegen" check "$work/bad.yaml"
contains "bad spec error has file:line:col" "bad.yaml:3:"
lines=$(printf '%s\n' "$out" | wc -l)
if [ "$lines" -eq 1 ]; then pass "bad spec error is one line"; else fail "error has $lines lines: $out"; fi
expect "check of a missing file fails" 1 "$moegen" check "$work/missing.yaml"

# gen: files, then nothing rewritten
expect "gen writes the sources" 0 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen"
contains "gen reports four files written" "# 4 of 4 files written"
for f in moe_demo.c moe_demo.h moegen_kernel_abi.h moe_demo.flags; do
    if [ -f "$work/gen/$f" ]; then pass "gen wrote $f (stable name)"; else fail "gen did not write $f"; fi
done
contains "gen names the target it compiled for" "; target "
expect "gen again rewrites nothing" 0 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen"
contains "gen reports no files written" "# 0 of 4 files written"
expect "gen --target avx2" 0 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-avx2" --target avx2
contains "gen --target avx2 says so" "target avx2"
if grep -q -- "-mavx2" "$work/gen-avx2/moe_demo.flags" && ! grep -q -- "-mavx512f" "$work/gen-avx2/moe_demo.flags"; then
    pass "the avx2 flags file has AVX2 and no AVX-512"
else fail "avx2 flags: $(cat "$work/gen-avx2/moe_demo.flags")"; fi
expect "gen --target with a bad name" 1 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-bad" --target avx9
contains "gen --target lists the names" "native, base, avx2"
expect "gen --expect-prefix that differs" 1 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-x" --expect-prefix moe_other
contains "gen --expect-prefix names both" "moe_demo, but the build expects moe_other"
expect "gen without -o fails" 1 "$moegen" gen "$src/specs/demo.yaml"
# gen --backend cuda: --arch goes through the one parser of sm_XX (moegen_cuda_arch_parse);
# sm_100a used to be read as sm_10 and refused
for arch in sm_80 sm_86 sm_90a sm_100a sm_100f sm_120 sm_120f sm_121a; do
    sm=${arch#sm_}
    sm=${sm%[af]}
    expect "gen --backend cuda --arch $arch" 0 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-$arch" --backend cuda --arch "$arch"
    contains "gen --arch $arch renders the sm_$sm variant" "variant cuda_sm${sm}_"
    if ls "$work/gen-$arch"/moe_*.cu > /dev/null 2>&1 && [ -f "$work/gen-$arch/moegen_cuda_abi.h" ]; then
        pass "gen --arch $arch writes the .cu source and moegen_cuda_abi.h"
    else
        fail "gen --arch $arch: files missing: $(ls "$work/gen-$arch")"
    fi
done
expect "gen --backend cuda defaults to sm_80" 0 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-default" --backend cuda
contains "the default variant is sm_80's" "variant cuda_sm80_"
for arch in sm_100x sm_8 sm_080 sm_80a sm_90f sm_122 sm_130 compute_90 SM_90 ""; do
    expect "gen --arch '$arch' is refused" 1 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-bad" --backend cuda --arch "$arch"
    contains "gen --arch '$arch' says why" "moegen: gen: --arch: "
    lines=$(printf '%s\n' "$out" | wc -l)
    if [ "$lines" -eq 1 ]; then pass "gen --arch '$arch' error is one line"; else fail "error has $lines lines: $out"; fi
done
if [ ! -e "$work/gen-bad" ]; then pass "a refused --arch writes nothing"; else fail "a refused --arch created $work/gen-bad"; fi
expect "gen --arch sm_70 parses but the CUDA backend needs sm_80" 1 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-70" --backend cuda --arch sm_70
contains "sm_70 is refused by the variant check" "needs sm_80"
# generate-and-link: compile the generated source into a program of our own
cat > "$work/link.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include "moegen_kernel_abi.h"
const moegen_kernel_info *PREFIX_info(void);
size_t PREFIX_workspace_bytes(int64_t);
int PREFIX_forward(const moegen_kernel_args *);
int main(void) {
    const moegen_kernel_info *info = PREFIX_info();
    printf("experts %d top_k %d workspace %zu\n", info->num_experts, info->top_k, PREFIX_workspace_bytes(16));
    return info->num_experts == 8 ? 0 : 1;
}
C
prefix=$(basename "$(ls "$work"/gen/moe_*.c)" .c)
sed -i "s/PREFIX/$prefix/g" "$work/link.c"
if cc -O2 -fopenmp -I"$work/gen" "$work/link.c" "$work/gen/$prefix.c" -lm -o "$work/link" 2> "$work/link.log" && "$work/link" > /dev/null; then
    pass "generated source links into a user program"
else
    fail "generate-and-link: $(cat "$work/link.log")"
fi

# run: verify, save, load
export MOEGEN_CACHE_DIR="$work/cache"
expect "run verifies the demo spec" 0 "$moegen" run "$src/specs/demo.yaml" --tokens 64 --repeat 2 --save "$work/saved"
contains "run reports a passing verification" "verify against the double-precision reference"
contains "run reports throughput" "GFLOP/s"
for f in x router_w w1 w2 y topk_ids topk_weights router_weights counts_before counts_after aux_loss z_loss; do
    if [ -f "$work/saved/$f.npy" ]; then pass "--save wrote $f.npy"; else fail "--save did not write $f.npy"; fi
done
cp "$work/saved/y.npy" "$work/y_first.npy"
expect "run --load reproduces the saved run" 0 "$moegen" run "$src/specs/demo.yaml" --load "$work/saved" --repeat 1 --save "$work/saved"
if cmp -s "$work/y_first.npy" "$work/saved/y.npy"; then pass "loaded run gives bitwise the same y"; else fail "y differs after --load"; fi
expect "run with zero tokens" 0 "$moegen" run "$src/specs/demo.yaml" --tokens 0 --repeat 1

# run --backward: training steps, verified; gradients saved; dy loaded back gives the same bits
expect "run --backward verifies the gradients" 0 "$moegen" run "$src/specs/test-features.yaml" --device cpu \
    --tokens 19 --repeat 1 --backward --aux-coeff 0.01 --z-coeff 0.001 --save "$work/train"
contains "the backward is timed against the forward" "the forward"
contains "the gradients are verified" "verify gradients against the double-precision reference backward"
for f in dy dx grad_w1 grad_w2 grad_router_w grad_shared_gate grad_residual_coef_w grad_b2; do
    if [ -f "$work/train/$f.npy" ]; then pass "--backward --save wrote $f.npy"; else fail "--backward --save did not write $f.npy"; fi
done
cp "$work/train/grad_w1.npy" "$work/grad_w1_first.npy"
expect "run --backward --load reads dy.npy" 0 "$moegen" run "$src/specs/test-features.yaml" --device cpu \
    --load "$work/train" --repeat 1 --backward --aux-coeff 0.01 --z-coeff 0.001 --save "$work/train"
contains "dy comes from the file" "dy dy.npy"
if cmp -s "$work/grad_w1_first.npy" "$work/train/grad_w1.npy"; then pass "loaded dy gives bitwise the same grad_w1"; else fail "grad_w1 differs after --load"; fi
expect "run --backward with zero tokens" 0 "$moegen" run "$src/specs/demo.yaml" --device cpu --tokens 0 --repeat 1 --backward
expect "--aux-coeff needs --backward" 1 "$moegen" run "$src/specs/demo.yaml" --aux-coeff 0.1
contains "the coefficient error says why" "only mean something with --backward"
expect "--z-coeff must be a finite number" 1 "$moegen" run "$src/specs/demo.yaml" --backward --z-coeff nan
expect "run rejects an unknown option" 1 "$moegen" run "$src/specs/demo.yaml" --frob 1
expect "run rejects a bad token count" 1 "$moegen" run "$src/specs/demo.yaml" --tokens -3
contains "bad token count names the option" "--tokens"
rm "$work/saved/w1.npy"
expect "run --load with a missing file fails" 1 "$moegen" run "$src/specs/demo.yaml" --load "$work/saved"
contains "missing file is named" "w1.npy"

# faults: nothing in an output folder or a --load folder can make moegen wait forever
mkdir -p "$work/fifo-gen"
mkfifo "$work/fifo-gen/$(basename "$(ls "$work"/gen/moe_*.c)")"
expect "gen refuses a FIFO where a generated file goes (no hang)" 1 timeout 20 "$moegen" gen "$src/specs/demo.yaml" -o "$work/fifo-gen"
contains "the FIFO is named as not a regular file" "is not a regular file"
mkdir -p "$work/fifo-load"
mkfifo "$work/fifo-load/x.npy"
expect "run --load refuses a FIFO x.npy (no hang)" 1 timeout 20 "$moegen" run "$src/specs/demo.yaml" --load "$work/fifo-load"
contains "the FIFO x.npy is named" "x.npy: not a regular file"
# a 4 TiB x.npy (sparse): refused from its header, before any data is read
mkdir -p "$work/huge"
python_header() { # a version 1.0 .npy header for shape (S, 256) of '<u2', padded to 128 bytes
    local dict="{'descr': '<u2', 'fortran_order': False, 'shape': ($1, 256), }"
    printf '\x93NUMPY\x01\x00\x76\x00%-117s\n' "$dict"
}
python_header 8589934592 > "$work/huge/x.npy"
if truncate -s $((128 + 8589934592 * 512)) "$work/huge/x.npy" 2> /dev/null; then
    expect "run --load of a 4 TiB x.npy is refused before reading it" 1 timeout 20 "$moegen" run "$src/specs/demo.yaml" --load "$work/huge"
    contains "the refusal says how much memory it needs" "this process can allocate"
else
    echo "skip - this file system cannot hold a 4 TiB sparse file"
fi
expect "bench checks memory like run" 1 timeout 20 "$moegen" bench "$src/specs/demo.yaml" --tokens 1,2000000000
contains "bench names the limit" "limited by"

# bench output: the table on stdout, or with --json JSON lines alone on stdout (the table on
# stderr); notices always on stderr. --plot FILE: an SVG chart (bench: time and tokens/s
# against the token count; run: the load of every expert before and after capacity).
check_py() { # check_py NAME PYTHON ARGS...: pass when the Python code exits 0, else fail with its output
    local name=$1 code=$2 result
    shift 2
    if ! command -v python3 > /dev/null; then echo "skip - $name (no python3)"; return; fi
    if result=$(python3 -c "$code" "$@" 2>&1); then pass "$name"; else fail "$name: $result"; fi
}
json_lines='
import json, sys
lines = open(sys.argv[1]).read().splitlines()
rows = [json.loads(line) for line in lines]
assert all(isinstance(r, dict) for r in rows), "a line is not an object"
assert [r["tokens"] for r in rows] == [int(t) for t in sys.argv[2].split(",")], rows
assert all(r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in rows), rows
assert not any("floor_ms" in r for r in rows), "a GPU floor in a CPU row"'
svg_count='
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
for spec in sys.argv[2:]:
    tag, cls, want = spec.split(":")
    got = sum(1 for e in root.iter("{http://www.w3.org/2000/svg}" + tag) if cls in (e.get("class") or "").split())
    assert got == int(want), "%d %s.%s, wanted %s" % (got, tag, cls, want)'
"$moegen" bench "$src/specs/demo.yaml" --device cpu --tokens 1,3 --repeat 1 --json --plot "$work/bench.svg" \
    > "$work/bench.jsonl" 2> "$work/bench.err"
if [ $? -eq 0 ]; then pass "bench --json --plot succeeds"; else fail "bench --json --plot: $(cat "$work/bench.err")"; fi
check_py "bench --json: stdout is JSON lines only, one per token count, no floor on the CPU" "$json_lines" "$work/bench.jsonl" 1,3
if grep -q '^| tokens |' "$work/bench.err" && grep -q '^tuning: ' "$work/bench.err"; then
    pass "bench --json: the table and the notices go to stderr"
else
    fail "bench --json stderr: $(cat "$work/bench.err")"
fi
check_py "bench --plot: the SVG parses, 2 points per panel, no floor on the CPU" "$svg_count" "$work/bench.svg" \
    circle:point:4 circle:bound:0
"$moegen" bench "$src/specs/demo.yaml" --device cpu --tokens 2 --repeat 1 > "$work/bench.md" 2> "$work/bench.err"
if [ $? -eq 0 ] && grep -q '^| tokens | median | min | tokens/s | GFLOP/s | GB/s |$' "$work/bench.md" &&
    [ "$(grep -c '^|' "$work/bench.md")" -eq 3 ] && ! grep -q '[{]' "$work/bench.md"; then
    pass "bench: stdout is the table alone, without the GPU floor columns"
else
    fail "bench stdout: $(cat "$work/bench.md" "$work/bench.err")"
fi
if grep -q '^tuning: ' "$work/bench.err" && ! grep -q '^tuning: ' "$work/bench.md"; then
    pass "bench: the notices go to stderr"
else
    fail "bench notices: $(cat "$work/bench.err")"
fi
expect "run --plot writes the expert load" 0 "$moegen" run "$src/specs/demo.yaml" --tokens 16 --repeat 1 --plot "$work/load.svg"
check_py "run --plot: 8 experts x (before, after) bars, no capacity line when dropless" "$svg_count" "$work/load.svg" \
    rect:bar:16 line:reference:0
expect "run --plot with capacity" 0 "$moegen" run "$src/specs/test-features.yaml" --device cpu --tokens 19 --repeat 1 \
    --plot "$work/capacity.svg"
check_py "run --plot: the capacity line" "$svg_count" "$work/capacity.svg" rect:bar:16 line:reference:1
expect "run --plot again" 0 "$moegen" run "$src/specs/demo.yaml" --tokens 16 --repeat 1 --plot "$work/load2.svg"
if cmp -s "$work/load.svg" "$work/load2.svg"; then pass "the same counts give the same SVG bytes"; else fail "run --plot is not deterministic"; fi
for cmd in bench run; do
    expect "$cmd --plot into a missing folder fails" 1 "$moegen" "$cmd" "$src/specs/demo.yaml" --tokens 1 \
        --plot "$work/no-such-folder/plot.svg"
    contains "$cmd --plot names the missing folder" "moegen: $cmd: --plot: cannot write $work/no-such-folder/plot.svg"
    lines=$(printf '%s\n' "$out" | wc -l)
    if [ "$lines" -eq 1 ]; then pass "$cmd --plot error is one line"; else fail "error has $lines lines: $out"; fi
done
expect "bench --plot onto a folder fails" 1 "$moegen" bench "$src/specs/demo.yaml" --tokens 1 --plot "$work"
contains "the folder is named" "is a folder"


# Templates from a directory instead of the built-in ones (gen --templates, $MOEGEN_TEMPLATE_DIR)
cp -r "$src/templates" "$work/tpl"
sed -i '1a /* a-custom-template-line */' "$work/tpl/cpu/layer.c.tpl"
expect "gen --templates DIR" 0 "$moegen" gen "$src/specs/test-fp32.yaml" -o "$work/gen-tpl" --templates "$work/tpl"
contains "gen names the template directory" "templates $work/tpl"
if grep -q "a-custom-template-line" "$work/gen-tpl/moe_test_fp32.c"; then pass "the generated source comes from DIR"
else fail "the custom template line is not in the generated source"; fi
expect "run under \$MOEGEN_TEMPLATE_DIR" 0 env MOEGEN_TEMPLATE_DIR="$work/tpl" "$moegen" run "$src/specs/test-fp32.yaml" --tokens 8
contains "run names the template directory" "templates: $work/tpl"
contains "run from DIR verifies" "verify against the double-precision reference"
expect "a template directory that does not exist" 1 env MOEGEN_TEMPLATE_DIR="$work/none" "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-none"
contains "the error names the variable and the path" "\$MOEGEN_TEMPLATE_DIR names $work/none, which is not a directory"
rm "$work/tpl/cpu/entry.c.tpl"
expect "a template directory missing a partial" 1 "$moegen" gen "$src/specs/demo.yaml" -o "$work/gen-part" --templates "$work/tpl"
contains "the error names the missing template" "no template 'templates/cpu/entry.c.tpl'"
finish
