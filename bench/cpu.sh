#!/usr/bin/env bash
# bench/cpu.sh — one command: moegen's CPU forward beside its anchors on the same shapes, in the
# same run, with the ratios and the machine's limits (bench/cpu_bench.py says what is measured).
#
#   bench/cpu.sh [--quick] [--specs a,b] [--dtypes fp32,bf16] [--tokens 1,16,128,1024,4096]
#                [--threads 1,2] [--rounds N] [--max-gflop X] [--evict-mb N] [--out DIR] [--no-torch] ...
#
# It installs what it needs, idempotently: Debian packages (apt-get: compilers, CMake, OpenBLAS),
# ggml built from the llama.cpp sources that the llama-cpp-python sdist ships (pip download, then
# CMake, into build-bench/, which git ignores), and PyTorch where python3 cannot import it (the
# machine's environment of scripts/setup.sh python; the PyTorch rows are skipped, with a message,
# if that fails). Then it builds the worker and the
# limit probe (CMake targets moegen_cpu_bench, moegen_cpu_limits) in build-bench/moegen and runs
# bench/cpu_bench.py with the arguments given. The markdown table goes to stdout, one JSON line per
# row to build-bench/cpu-bench.jsonl (or DIR/rows.jsonl); --out DIR also keeps the raw logs, the
# exact commands and the machine's description there, for bench/results/<cpu>-<date>/.
#
# Time: --quick (demo + qwen3-30b-a3b, S in {1, 128}) takes about 3 minutes on 2 cores, plus about 4
# the first time (building ggml). The default (every spec but test-*, fp32 and bf16, S up to 4096,
# 1 and 2 threads; mixtral-8x7b at S = 4096 is skipped by --max-gflop 1000; deepseek-v3 does not fit
# in 24 GiB and is skipped with its size) is estimated at about an hour on a quiet 2-core machine
# (45-90 minutes: it has not been run whole yet).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=build-bench
mkdir -p "$work"
llcpp_version=${MOEGEN_LLAMA_CPP_PYTHON_VERSION:-0.3.36}

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
    --out) out=${args[$((i + 1))]:-} ;;
    --out=*) out=${args[$i]#--out=} ;;
    -h | --help) exec python3 bench/cpu_bench.py --help ;;
    esac
done
commands=()
note() { echo "cpu.sh: $*" >&2; }
run() { # run and remember a set-up command
    commands+=("$*")
    "$@"
}

# ---- Debian packages ------------------------------------------------------------------------------
packages=(build-essential cmake pkg-config liblua5.4-dev libyaml-dev libopenblas-dev python3 python3-pip util-linux)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    note "installing ${missing[*]}"
    run "${sudo_cmd[@]}" apt-get update -qq
    run "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# ---- ggml from the llama-cpp-python sdist (never committed: build-bench/ is ignored) -------------
ggml_prefix=$root/$work/ggml
build_ggml() {
    local dl=$work/dl sdist src=$work/ggml-src
    sdist=$(ls "$dl"/llama_cpp_python-"$llcpp_version".tar.gz 2> /dev/null || true)
    if [ -z "$sdist" ]; then
        mkdir -p "$dl"
        run python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$llcpp_version" -d "$dl" ||
            return 1
        sdist=$dl/llama_cpp_python-$llcpp_version.tar.gz
    fi
    rm -rf "$src" "$work/ggml-build" "$ggml_prefix"
    mkdir -p "$src"
    run tar -xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$llcpp_version/vendor/llama.cpp/ggml" ||
        return 1
    # The sdist leaves out ggml.pc.in, which ggml's CMakeLists configures when built on its own.
    [ -f "$src/ggml/ggml.pc.in" ] || : > "$src/ggml/ggml.pc.in"
    # GIT_CEILING_DIRECTORIES: ggml's CMakeLists asks git for its commit, which would be ours.
    run env GIT_CEILING_DIRECTORIES="$root/$work" cmake -S "$src/ggml" -B "$work/ggml-build" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DGGML_BUILD_TESTS=OFF \
        -DGGML_BUILD_EXAMPLES=OFF > "$work/ggml-build.log" 2>&1 || return 1
    run cmake --build "$work/ggml-build" -j "$(nproc)" >> "$work/ggml-build.log" 2>&1 || return 1
    run cmake --install "$work/ggml-build" --prefix "$ggml_prefix" >> "$work/ggml-build.log" 2>&1 || return 1
    echo "$ggml_stamp" > "$ggml_prefix/stamp"
}
ggml_stamp="llama-cpp-python $llcpp_version sdist, vendor/llama.cpp/ggml, GGML_NATIVE=ON, shared"
export MOEGEN_GGML_SOURCE=$ggml_stamp
ggml_dir=""
if [ "$(cat "$ggml_prefix/stamp" 2> /dev/null)" != "$ggml_stamp" ]; then
    note "building ggml from llama-cpp-python $llcpp_version's sources (a few minutes, once)"
    build_ggml || note "ggml could not be built (see $work/ggml-build.log); the ggml rows are skipped"
fi
[ -f "$ggml_prefix/lib/cmake/ggml/ggml-config.cmake" ] && ggml_dir=$ggml_prefix/lib/cmake/ggml

# ---- the worker and the limit probe -----------------------------------------------------------------
cmake_args=(-S . -B "$work/moegen" -DCMAKE_BUILD_TYPE=Release -DMOEGEN_BUILD_TESTS=OFF)
[ -n "$ggml_dir" ] && cmake_args+=("-Dggml_DIR=$ggml_dir")
if ! run cmake "${cmake_args[@]}" > "$work/moegen-build.log" 2>&1 ||
    ! run cmake --build "$work/moegen" -j "$(nproc)" --target moegen_cpu_bench moegen_cpu_limits \
        >> "$work/moegen-build.log" 2>&1; then
    note "the benchmark did not build (is OpenBLAS installed?): see $work/moegen-build.log"
    exit 1
fi

# ---- PyTorch ---------------------------------------------------------------------------------------
# python3 where it imports torch; else the machine's virtual environment (scripts/setup.sh python
# installs PyTorch there once, the same one the package's tests use).
python=python3
torch_args=()
case " $* " in *" --no-torch "*) ;; *)
    if ! python3 -c 'import torch' > /dev/null 2>&1; then
        note "python3 has no PyTorch: using the machine's environment (scripts/setup.sh python)"
        commands+=("scripts/setup.sh python")
        if ! python=$(scripts/setup.sh python) || ! "$python" -c 'import torch' > /dev/null 2>&1; then
            note "PyTorch could not be installed; the pytorch rows are skipped"
            python=python3
            torch_args=(--no-torch)
        fi
    fi ;;
esac

# ---- the run ----------------------------------------------------------------------------------------
cmd=("$python" bench/cpu_bench.py "${torch_args[@]}" "$@")
if [ -n "$out" ]; then
    mkdir -p "$out"
    {
        echo "# set-up commands bench/cpu.sh ran this time (none listed: everything was already there)"
        for c in "${commands[@]}"; do echo "$c"; done
        echo "# the run (bench/cpu.sh ${*}):"
        echo "${cmd[*]}"
        echo "# the worker and limit commands are in driver.log"
    } > "$out/commands.txt"
    "${cmd[@]}" 2> >(tee "$out/driver.log" >&2)
else
    "${cmd[@]}"
fi
