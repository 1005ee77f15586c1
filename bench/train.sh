#!/usr/bin/env bash
# bench/train.sh — one command: moegen's CPU training backward timed against moegen's own forward and
# against PyTorch CPU autograd of the equivalent eager MoE block, in the same run (bench/train_bench.py
# says what is measured and how the two are made to do the same work).
#
#   bench/train.sh [--quick] [--specs a,b] [--dtypes bf16,fp32|spec] [--tokens 1,64,512] [--threads 1,2]
#                  [--repeat N] [--rounds N] [--out DIR] [--no-torch] [--no-split] ...
#
# It installs what it needs, idempotently: Debian packages (apt-get: compilers, CMake, Lua, libyaml),
# PyTorch's CPU wheel when torch is not importable (the PyTorch columns stay empty, with a message, if
# that fails). Then it builds the worker (CMake target moegen_train_bench) in build-bench/moegen, as
# bench/cpu.sh does, and runs bench/train_bench.py with the arguments given. The markdown tables go to
# stdout, one JSON line per row to build-bench/train-bench.jsonl (or DIR/rows.jsonl); --out DIR also keeps
# the raw logs (per spec and dtype: the worker's transcript and every timed step), the exact commands and
# the machine's description there, for bench/results/cpu-<cpu>-<date>-train/.
#
# --quick: demo and qwen3-30b-a3b, S in {16, 256}, 1 and 2 threads, bf16 and fp32: about 5 minutes on
# 2 cores. The default (every spec but test-*, S in {1, 64, 512}, bf16 and fp32, 1 and 2 threads) skips
# what does not fit in --max-gib (18: weights, fp32 gradients, saved state and PyTorch's gradients) and
# shapes over --max-gflop (150 GFLOP per forward: mixtral-8x7b at S = 512), each with the reason;
# deepseek-v3 never fits in 24 GiB. `--dtypes spec` (each spec's own dtype) took 27 minutes on 2 cores
# shared with other work; the default with both dtypes has not been run whole (about twice that).
# Each batch of timed steps first waits (up to --quiet-wait 60 s) for the rest of the machine to be
# quiet; the load seen during the timed steps is recorded and flagged in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
work=build-bench
mkdir -p "$work"

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
    --out) out=${args[$((i + 1))]:-} ;;
    --out=*) out=${args[$i]#--out=} ;;
    -h | --help) exec python3 bench/train_bench.py --help ;;
    esac
done
commands=()
note() { echo "train.sh: $*" >&2; }
run() { # run and remember a set-up command
    commands+=("$*")
    "$@"
}

# ---- Debian packages ------------------------------------------------------------------------------
packages=(build-essential cmake pkg-config liblua5.4-dev libyaml-dev python3 python3-pip)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    note "installing ${missing[*]}"
    run "${sudo_cmd[@]}" apt-get update -qq
    run "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# ---- the worker -------------------------------------------------------------------------------------
# The same build folder as bench/cpu.sh (its ggml_DIR, when set there, stays in the CMake cache).
if ! run cmake -S . -B "$work/moegen" -DCMAKE_BUILD_TYPE=Release -DMOEGEN_BUILD_TESTS=OFF \
    > "$work/moegen-train-build.log" 2>&1 ||
    ! run cmake --build "$work/moegen" -j "$(nproc)" --target moegen_train_bench \
        >> "$work/moegen-train-build.log" 2>&1; then
    note "the benchmark worker did not build: see $work/moegen-train-build.log"
    exit 1
fi

# ---- PyTorch (CPU wheel) ----------------------------------------------------------------------------
torch_args=()
if ! python3 -c 'import torch' > /dev/null 2>&1; then
    note "installing PyTorch's CPU wheel"
    if ! run python3 -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu ||
        ! python3 -c 'import torch' > /dev/null 2>&1; then
        note "PyTorch could not be installed; the PyTorch columns stay empty"
        torch_args=(--no-torch)
    fi
fi

# ---- the run ----------------------------------------------------------------------------------------
cmd=(python3 bench/train_bench.py "${torch_args[@]}" "$@")
if [ -n "$out" ]; then
    mkdir -p "$out"
    {
        echo "# set-up commands bench/train.sh ran this time (the build always runs; packages only when missing)"
        for c in "${commands[@]}"; do echo "$c"; done
        echo "# the run (bench/train.sh ${*}):"
        echo "${cmd[*]}"
        echo "# the worker commands, one per spec and dtype, are in driver.log"
    } > "$out/commands.txt"
    "${cmd[@]}" 2> >(tee "$out/driver.log" >&2)
else
    "${cmd[@]}"
fi
