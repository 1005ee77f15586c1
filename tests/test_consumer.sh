#!/usr/bin/env bash
# test_consumer.sh — moegen used from another project, built three ways (tests/consumer):
#   package       `cmake --install` of this build, then find_package(moegen CONFIG) and
#                 moegen_generate(); moegen::moegen (shared) and moegen::moegen_static, and
#                 (where nvcc is) a CUDA layer, BACKEND cuda, whose host side runs without a GPU
#   subdirectory  add_subdirectory of this source tree, moegen_generate()
#   pkg-config    `moegen gen` by hand, `cc @moe_consumer.flags`, `pkg-config --cflags --libs moegen`
# Each way generates the layer at build time, runs it and the JIT against the consumer's own
# reference, then edits the spec (E 4 -> 6, k 2 -> 3), rebuilds and checks that the new layer
# is the one linked (its spec hash is `moegen check`'s). The pkg-config way also links an
# object of the old generation with code compiled against the new header: a link error.
# Needs MOEGEN_SOURCE_DIR and MOEGEN_BUILD_DIR (the build tree to install); MOEGEN_SANITIZE=ON
# builds the consumers with ASan + UBSan like the library.
set -u
src=${MOEGEN_SOURCE_DIR:?}
build=${MOEGEN_BUILD_DIR:?}
. "$src/tests/check_lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/moegen-consumer.XXXXXX")
trap 'rm -rf "$work"' EXIT
export MOEGEN_CACHE_DIR=$work/cache
sanitize_flags=""
if [ "${MOEGEN_SANITIZE:-OFF}" = ON ]; then sanitize_flags="-fsanitize=address,undefined -fno-omit-frame-pointer"; fi

expect "install into a fresh prefix" 0 cmake --install "$build" --prefix "$work/prefix"
moegen=$work/prefix/bin/moegen
for f in bin/moegen lib/libmoegen.so lib/libmoegen.a include/moegen/moegen.h include/moegen/moegen_status.h \
    include/moegen/moegen_kernel_abi.h lib/cmake/moegen/moegenConfig.cmake lib/cmake/moegen/moegen_generate.cmake \
    lib/pkgconfig/moegen.pc share/moegen/tuning share/moegen/templates/cpu/layer.c.tpl; do
    if [ -e "$work/prefix/$f" ]; then pass "installed $f"; else fail "installed $f: missing"; fi
done
# The public header compiles alone, with only the installed include directory.
printf '#include <moegen/moegen.h>\nint main(void) { moegen_open_options o; moegen_open_options_init(&o); return 0; }\n' \
    > "$work/alone.c"
expect "moegen.h needs nothing but include/" 0 cc -c -I"$work/prefix/include" -o "$work/alone.o" "$work/alone.c"

hash_of() { "$moegen" check "$1" | sed -n 's/^# sha256: //p'; }
set_shape() { # set_shape E K: the spec with E experts and top-K
    sed -e "s/^num_experts: .*/num_experts: $1/" -e "s/^num_experts_per_tok: .*/num_experts_per_tok: $2/" \
        "$src/tests/consumer/consumer.yaml" > "$work/spec.yaml"
}
check_run() { # check_run WAY BINARY E K: the binary passes and links the spec as it is now
    local way=$1 binary=$2
    expect "$way: $(basename "$binary") E=$3 k=$4 passes" 0 "$binary" "$work/spec.yaml"
    contains "$way: $(basename "$binary") links the E=$3 k=$4 layer" "shape: E=$3 k=$4 "
    contains "$way: $(basename "$binary") links the spec's current hash" "linked spec: $(hash_of "$work/spec.yaml")"
}
cmake_way() { # cmake_way WAY BUILD_DIR CMAKE_ARGS...
    local way=$1 dir=$2
    shift 2
    set_shape 4 2
    expect "$way: configure" 0 cmake -S "$src/tests/consumer" -B "$dir" -DCONSUMER_SPEC="$work/spec.yaml" \
        -DCMAKE_BUILD_TYPE=Release "-DCMAKE_C_FLAGS=$sanitize_flags" "$@"
    expect "$way: build" 0 cmake --build "$dir" -j 2
    check_run "$way" "$dir/consumer" 4 2
    [ -x "$dir/consumer_static" ] && check_run "$way" "$dir/consumer_static" 4 2
    [ -x "$dir/consumer_cuda" ] && check_run "$way" "$dir/consumer_cuda" 4 2
    sleep 1 # a new mtime on file systems with one-second timestamps
    set_shape 6 3
    expect "$way: rebuild after the spec edit" 0 cmake --build "$dir" -j 2
    check_run "$way" "$dir/consumer" 6 3
    [ -x "$dir/consumer_static" ] && check_run "$way" "$dir/consumer_static" 6 3
    [ -x "$dir/consumer_cuda" ] && check_run "$way" "$dir/consumer_cuda" 6 3
    expect "$way: a build with nothing changed" 0 cmake --build "$dir" -j 2
    lacks "$way: nothing is generated again" "moegen: generating"
}

cuda_args=()
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ "${MOEGEN_SANITIZE:-OFF}" = ON ]; then
    echo "note: sanitizer build; the CUDA layer of the package way is built in the plain build only"
elif [ -x "$nvcc" ]; then
    cuda_args=(-DCONSUMER_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc")
else
    echo "note: no nvcc; the CUDA layer of the package way is not built"
fi
cmake_way package "$work/package" -DCMAKE_PREFIX_PATH="$work/prefix" -DCONSUMER_STATIC=ON "${cuda_args[@]}"
cmake_way subdirectory "$work/subdirectory" -DMOEGEN_CONSUMER_MODE=subdirectory -DMOEGEN_SOURCE="$src" \
    -DMOEGEN_SANITIZE="${MOEGEN_SANITIZE:-OFF}"

# pkg-config: generate and compile by hand.
export PKG_CONFIG_PATH=$work/prefix/lib/pkgconfig
pc=$work/pkgconfig
mkdir -p "$pc"
build_pc() { # build_pc TAG: generate, compile the layer and main.c, link against libmoegen.so
    expect "pkg-config: moegen gen ($1)" 0 "$moegen" gen "$work/spec.yaml" -o "$pc/gen"
    expect "pkg-config: compile the layer ($1)" 0 cc $sanitize_flags @"$pc/gen/moe_consumer.flags" -c \
        "$pc/gen/moe_consumer.c" -o "$pc/layer-$1.o"
    expect "pkg-config: compile main.c ($1)" 0 cc $sanitize_flags $(pkg-config --cflags moegen) -I"$pc/gen" -c \
        "$src/tests/consumer/main.c" -o "$pc/main-$1.o"
}
link_pc() { # link_pc MAIN LAYER OUTPUT
    cc $sanitize_flags "$1" "$2" -o "$3" $(pkg-config --libs moegen) -Wl,-rpath,"$work/prefix/lib" -fopenmp -lm
}
set_shape 4 2
build_pc old
expect "pkg-config: link" 0 link_pc "$pc/main-old.o" "$pc/layer-old.o" "$pc/consumer"
check_run pkg-config "$pc/consumer" 4 2
set_shape 6 3
build_pc new
expect "pkg-config: an old layer object with the new header does not link" 1 \
    link_pc "$pc/main-new.o" "$pc/layer-old.o" "$pc/stale"
contains "pkg-config: the link error names the build pin" "moe_consumer_build_"
expect "pkg-config: the new generation links" 0 link_pc "$pc/main-new.o" "$pc/layer-new.o" "$pc/consumer"
check_run pkg-config "$pc/consumer" 6 3
finish
