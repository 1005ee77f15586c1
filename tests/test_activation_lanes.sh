#!/usr/bin/env bash
# test_activation_lanes.sh — for every activation, generate a module (`moegen gen`) and compile
# activation_lanes.c against it with the module's flags, by every C compiler present (cc,
# clang): the vector activation of the AMX epilogue must give the scalar activation's bits
# (docs/numerics.md §3). Skips (77) where the host compiler does not target AVX-512.
# Needs MOEGEN_BINARY and MOEGEN_SOURCE_DIR (set by CTest).
set -u
moegen=${MOEGEN_BINARY:?}
src=${MOEGEN_SOURCE_DIR:?}
work=$(mktemp -d /tmp/moegen-lanes-XXXXXX)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/check_lib.sh"

ran=0
for act in swiglu silu gelu_tanh gelu geglu relu; do
    sed "s/^activation: .*/activation: $act/" "$src/specs/demo.yaml" > "$work/$act.yaml"
    expect "gen: $act" 0 "$moegen" gen "$work/$act.yaml" -o "$work/$act"
    flags=$(cat "$work/$act/moe_demo.flags" 2> /dev/null)
    case " $flags " in *" -mavx512f "*) ;; *) echo "skip: the module's flags have no -mavx512f"; exit 77 ;; esac
    for cc in cc clang; do
        command -v "$cc" > /dev/null || continue
        # shellcheck disable=SC2086 # the module's flags are words
        expect "$act, $cc: compiles" 0 "$cc" $flags -DMODULE="\"$work/$act/moe_demo.c\"" \
            "$src/tests/activation_lanes.c" -o "$work/$act-$cc" -lm
        expect "$act, $cc: vector and scalar activations give the same bits" 0 "$work/$act-$cc"
        ran=1
    done
done
[ "$ran" -eq 1 ] || fail "no compiler ran"
finish
