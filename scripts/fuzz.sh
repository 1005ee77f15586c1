#!/usr/bin/env bash
# fuzz.sh — build the libFuzzer targets (clang, ASan + UBSan) and run each for a while:
# fuzz_spec (bytes -> spec loader, canonical round trip), fuzz_template (bytes as a
# template), fuzz_generate (sampled valid specs -> both backends' templates), fuzz_npy
# (bytes as an .npy file), fuzz_forward (sampled small specs -> generated C compiled with
# the host compiler, run, compared with the reference). Seeds: the shipped specs,
# templates and saved arrays.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 15: the short CI run)
# A crash leaves crash-* in build-fuzz/findings/<target>/ and fails the script; add the
# input as a regression case to the target's unit test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
packages=(clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" > /dev/null
fi
cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DMOEGEN_FUZZ=ON \
    -DMOEGEN_BUILD_TESTS=OFF > /dev/null
cmake --build build-fuzz -j "$(nproc 2> /dev/null || echo 2)" --target fuzz_spec fuzz_template fuzz_generate fuzz_npy fuzz_forward > /dev/null
export MOEGEN_CACHE_DIR="$PWD/build-fuzz/cache" # fuzz_forward compiles; keep its modules
for target in spec template generate npy forward; do
    corpus=build-fuzz/corpus/$target findings=build-fuzz/findings/$target
    mkdir -p "$corpus" "$findings"
    case $target in
    spec) cp specs/*.yaml "$corpus/" ;;
    template) cp templates/cpu/*.tpl templates/common/*.tpl "$corpus/" ;;
    npy) printf '\x93NUMPY\x01\x00v\x00{'"'"'descr'"'"': '"'"'<f4'"'"', '"'"'fortran_order'"'"': False, '"'"'shape'"'"': (2,), }                                                      \n\x00\x00\x80\x3f\x00\x00\x00\x40' > "$corpus/seed.npy" ;;
    esac
    echo "== fuzz_$target: ${seconds}s"
    (cd "$findings" && ASAN_OPTIONS=detect_leaks=1 ../../fuzz_$target -max_total_time="$seconds" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 "../../corpus/$target" 2>&1 | tail -n 2)
done
echo "fuzz: no crashes"
