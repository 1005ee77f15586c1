#!/usr/bin/env bash
# bench/run.sh — one command that builds (unless MOEGEN_BUILD points at a build), checks
# and times moegen on the GPU for the shipped real specs at tokens 1..16384, with the
# anchors of bench/anchors.py measured in the same run, and writes
# bench/results/<device>-<date>/{results.md, *.jsonl, *.log, commands.txt}.
#   bench/run.sh [OUT_DIR]
# Fits in one 10-minute call on an H100 (each spec's timings are bounded by --repeat).
set -u
cd "$(dirname "$0")/.."
build=${MOEGEN_BUILD:-build}
if [ ! -x "$build/moegen" ]; then scripts/setup.sh || exit 1; fi
moegen="$build/moegen"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' )
out=${1:-bench/results/${device:-gpu}-$(date +%Y-%m-%d)}
mkdir -p "$out"
tokens=${MOEGEN_BENCH_TOKENS:-1,16,128,1024,4096,16384}
specs=${MOEGEN_BENCH_SPECS:-"mixtral-8x7b qwen3-30b-a3b qwen1.5-moe-a2.7b olmoe-1b-7b deepseek-v3 switch-base-8"}
export MOEGEN_CACHE_DIR=$(mktemp -d /tmp/moegen-bench-cache-XXXXXX)
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) uncommitted files"
    echo "tokens: $tokens"
} > "$out/commands.txt"
for spec in $specs; do
    cmd="$moegen bench specs/$spec.yaml --device cuda --tokens 1 --repeat 1"
    echo "$cmd   # cold compile (empty cache)" >> "$out/commands.txt"
    timeout 300 $cmd --json > "$out/$spec.cold.jsonl" 2> "$out/$spec.cold.log"
    cmd="$moegen bench specs/$spec.yaml --device cuda --tokens $tokens --repeat 20"
    echo "$cmd" >> "$out/commands.txt"
    timeout 300 $cmd --json > "$out/$spec.moegen.jsonl" 2> "$out/$spec.moegen.log" || echo "moegen bench $spec failed (exit $?)" >> "$out/$spec.moegen.log"
    cmd="python3 bench/anchors.py specs/$spec.yaml --tokens $tokens --repeat 10"
    echo "$cmd" >> "$out/commands.txt"
    timeout 300 $cmd > "$out/$spec.anchors.jsonl" 2> "$out/$spec.anchors.log" || echo "anchors $spec failed (exit $?)" >> "$out/$spec.anchors.log"
    cat "$out/$spec.moegen.log"
done
python3 bench/report.py "$out"
rm -rf "$MOEGEN_CACHE_DIR"
