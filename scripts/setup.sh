#!/usr/bin/env bash
# setup.sh — install what moegen needs (Debian packages) and build it.
#   scripts/setup.sh              optimized build in build/
#   scripts/setup.sh sanitize     ASan + UBSan build in build-sanitize/
#   scripts/setup.sh python       PyTorch (the CPU wheel, once per machine) for the Python
#                                 package's tests (scripts/python_test.sh)
# Idempotent: installs only missing packages, rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang and libomp: the sweep and test_compiler also compile generated code with clang;
# locales: the locale test builds de_DE.UTF-8 with localedef; Open MPI: expert-parallel
# runs across processes (mpirun) and their tests.
packages=(build-essential cmake pkg-config liblua5.4-dev libyaml-dev libcmocka-dev clang libomp-dev locales
          openmpi-bin libopenmpi-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" > /dev/null
fi

jobs=$(nproc 2> /dev/null || echo 2)
if [ "${1:-}" = python ]; then
    python3 -m venv --help > /dev/null 2>&1 || { echo "setup: python3 with venv is needed" >&2; exit 1; }
    if ! python3 -c "import torch" > /dev/null 2>&1; then
        echo "setup: installing PyTorch (CPU wheel) for python3"
        python3 -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
    exit 0
fi
if [ "${1:-}" = sanitize ]; then
    cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Debug -DMOEGEN_SANITIZE=ON > /dev/null
    cmake --build build-sanitize -j "$jobs" > /dev/null
else
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
    cmake --build build -j "$jobs" > /dev/null
fi
