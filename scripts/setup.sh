#!/usr/bin/env bash
# setup.sh — install what moegen needs (Debian packages) and build it.
#   scripts/setup.sh              optimized build in build/
#   scripts/setup.sh sanitize     ASan + UBSan build in build-sanitize/
#   scripts/setup.sh python       the Python environment of the package's tests and the CPU
#                                 benchmark's PyTorch rows: a virtual environment per machine
#                                 ($MOEGEN_PYENV, default ~/.cache/moegen/pyenv) that sees the
#                                 system's packages and gets PyTorch once, when it cannot import
#                                 torch; prints its python's path (the only line on stdout)
# Idempotent: installs only missing packages, rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang and libomp: the sweep and test_compiler also compile generated code with clang;
# locales: the locale test builds de_DE.UTF-8 with localedef; Open MPI: expert-parallel
# runs across processes (mpirun) and their tests.
# python3-venv, python3-dev: the Python package's environment and its extension (scripts/python_test.sh).
packages=(build-essential cmake pkg-config liblua5.4-dev libyaml-dev libcmocka-dev clang libomp-dev locales
          openmpi-bin libopenmpi-dev python3-venv python3-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" > /dev/null
fi

jobs=$(nproc 2> /dev/null || echo 2)
if [ "${1:-}" = python ]; then
    env=${MOEGEN_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moegen/pyenv}
    if [ ! -x "$env/bin/python" ]; then
        mkdir -p "$(dirname "$env")"
        python3 -m venv --system-site-packages "$env" >&2
    fi
    if ! "$env/bin/python" -c "import torch" > /dev/null 2>&1; then # once per machine
        echo "setup: installing PyTorch (CPU wheel) into $env" >&2
        # PyTorch's CPU-only index first (a smaller wheel); where that host cannot be reached,
        # the default index (PyPI: the same torch, with its CUDA libraries).
        if ! "$env/bin/python" -m pip install -q --disable-pip-version-check --retries 1 --timeout 20 torch \
            --index-url https://download.pytorch.org/whl/cpu >&2; then
            echo "setup: PyTorch's CPU index failed; installing torch from the default index" >&2
            "$env/bin/python" -m pip install -q --disable-pip-version-check torch >&2
        fi
    fi
    echo "$(cd "$env" && pwd)/bin/python"
    exit 0
fi
if [ "${1:-}" = sanitize ]; then
    cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Debug -DMOEGEN_SANITIZE=ON > /dev/null
    cmake --build build-sanitize -j "$jobs" > /dev/null
else
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
    cmake --build build -j "$jobs" > /dev/null
fi
