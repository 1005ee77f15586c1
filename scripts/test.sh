#!/usr/bin/env bash
# test.sh — install, build and run the whole test suite: the optimized build (every
# label, real model specs included; the `gpu` tests skip with a message where there is
# no GPU), the Python package's pytest suite (scripts/python_test.sh), then the ASan +
# UBSan build (every label but the real model specs, which only repeat the CLI at bigger
# sizes, and `gpu`, since the CUDA driver needs ASan's protect_shadow_gap=0), then a short
# run of every fuzz target (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2> /dev/null || echo 2)

scripts/setup.sh
echo "== tests: optimized build"
(cd build && ctest --output-on-failure -j "$jobs")

echo "== tests: the Python package (python/tests, PyTorch)"
scripts/python_test.sh

scripts/setup.sh sanitize
echo "== tests: AddressSanitizer + UndefinedBehaviorSanitizer build"
(cd build-sanitize && ctest --output-on-failure -j "$jobs" -LE "real|gpu")

echo "== fuzz targets (a short run; scripts/fuzz.sh SECONDS for longer)"
scripts/fuzz.sh 15
