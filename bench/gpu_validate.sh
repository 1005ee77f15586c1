#!/usr/bin/env bash
# bench/gpu_validate.sh — the GPU correctness run: CUDA API tests, the forward matrix on
# the GPU, the layer tests (fallback path included), compute-sanitizer memcheck /
# racecheck / initcheck on the small specs (forward, and a training step with the backward),
# the training backward verified against the reference backward on the small specs, and
# `moegen run --device cuda` (verified against the reference) on every shipped spec. Logs to OUT_DIR (default $OUT or ./gpu-logs).
#   MOEGEN_BUILD=build bench/gpu_validate.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
build=${MOEGEN_BUILD:-build}
out=${1:-${OUT:-gpu-logs}}
mkdir -p "$out"
export MOEGEN_SOURCE_DIR=$PWD MOEGEN_BINARY=$PWD/$build/moegen
export MOEGEN_CACHE_DIR=$(mktemp -d /tmp/moegen-gpu-cache-XXXXXX)
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
status=0
step() { # step NAME TIMEOUT COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc ($(tail -n 1 "$out/$name.log"))"
    [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
step test_cuda_api 120 "$build/tests/test_cuda_api"
MOEGEN_TEST_DEVICE=cuda step test_forward_gpu 420 "$build/tests/test_forward"
step test_layer 120 "$build/tests/test_layer"
for spec in demo test-capacity test-features test-fp32; do
    for tool in memcheck racecheck initcheck; do
        step "sanitizer-$tool-$spec" 150 "$sanitizer" --tool "$tool" --error-exitcode 9 \
            "$build/moegen" run "specs/$spec.yaml" --device cuda --tokens 67 --repeat 1
        step "sanitizer-$tool-backward-$spec" 240 "$sanitizer" --tool "$tool" --error-exitcode 9 \
            "$build/moegen" run "specs/$spec.yaml" --device cuda --tokens 67 --repeat 1 --backward \
            --aux-coeff 0.01 --z-coeff 0.001
    done
    step "backward-$spec" 240 "$build/moegen" run "specs/$spec.yaml" --device cuda --tokens 130 --repeat 3 \
        --backward --aux-coeff 0.01 --z-coeff 0.001
done
if [ "${MOEGEN_SKIP_RUNS:-0}" != 1 ]; then
    for spec in specs/*.yaml; do
        step "run-$(basename "$spec" .yaml)" 240 "$build/moegen" run "$spec" --device cuda --tokens 256 --repeat 5
    done
fi
rm -rf "$MOEGEN_CACHE_DIR"
echo "gpu_validate: status $status"
exit $status
