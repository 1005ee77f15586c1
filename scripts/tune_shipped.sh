#!/usr/bin/env bash
# tune_shipped.sh — tune every shipped spec that fits in this machine's memory on the CPU and
# keep the results: the databases under tuning/ (the repository's, which layers fall back to),
# the tables and the JSON lines of every candidate under bench/results/<cpu>-<date>-tune/.
#
#   scripts/tune_shipped.sh [--budget-scale X] [--only a,b]
#
# Per-spec budgets (seconds) scale with the layer's size; the whole run takes about 35 minutes
# on 2 cores. Run it on a quiet machine: every candidate is timed while nothing else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=1
only=""
while [ $# -gt 0 ]; do
    case $1 in
    --budget-scale) scale=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "tune_shipped.sh: unknown option $1" >&2; exit 1 ;;
    esac
done
scripts/setup.sh >/dev/null
moegen=build/moegen
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1 | tr -c 'A-Za-z0-9.\n' '-' | tr -s '-')
out=bench/results/cpu-${cpu%-}-$(date -u +%Y-%m-%d)-tune
mkdir -p "$out" tuning
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) CPUs"
    echo "commit: $(git rev-parse --short HEAD)"
    echo "compiler: $(cc --version | head -1)"
} >"$out/machine.txt"
# spec budget-seconds tokens
while read -r spec budget tokens; do
    if [ -n "$only" ] && ! printf ',%s,' "$only" | grep -q ",$spec,"; then continue; fi
    b=$(awk -v b="$budget" -v s="$scale" 'BEGIN { printf "%d", b * s }')
    echo "== $spec (budget $b s, tokens $tokens)"
    cmd=("$moegen" tune "specs/$spec.yaml" --tokens "$tokens" --budget "$b" --out tuning)
    echo "${cmd[*]}" >"$out/$spec.command"
    "${cmd[@]}" >"$out/$spec.md" 2>"$out/$spec.jsonl" || echo "   $spec: tune failed (see $out/$spec.jsonl)"
    cat "$out/$spec.md"
done <<'SPECS'
demo 150 1,16,128,1024
switch-base-8 150 1,16,128,1024
olmoe-1b-7b 300 1,16,128,1024
qwen1.5-moe-a2.7b 300 1,16,128,1024
qwen3-30b-a3b 420 1,16,128,1024
mixtral-8x7b 600 1,16,128,1024
SPECS
echo "results: $out; databases: tuning/"
