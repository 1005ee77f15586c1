#!/usr/bin/env bash
# test.sh — install, build and run the whole test suite: the optimized build (every
# label, real model specs included), then the ASan + UBSan build (every label but the
# real model specs, which only repeat the CLI at bigger sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2> /dev/null || echo 2)

scripts/setup.sh
echo "== tests: optimized build"
(cd build && ctest --output-on-failure -j "$jobs")

scripts/setup.sh sanitize
echo "== tests: AddressSanitizer + UndefinedBehaviorSanitizer build"
(cd build-sanitize && ctest --output-on-failure -j "$jobs" -LE real)
