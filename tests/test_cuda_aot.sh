#!/usr/bin/env bash
# test_cuda_aot.sh — CUDA generate-and-link (templates/cuda/host.cu.tpl): for specs that cover
# each launch path (a ranking drop priority and its P_dispatch_rank, shared experts with their
# own GEMM pair, the residual MLP, fp32 / fp16 / bf16), `moegen gen --backend cuda` and
# `nvcc -c` build the object, a C program compiled by cc links it, and the host side answers
# without a GPU: describe, workspace sizing, and the argument checks. Where a GPU is present
# the forward itself runs in test_forward_gpu through the runtime, which walks the same steps
# (moegen_cuda_launch.h); this test never launches a kernel. Exit 77 (skipped) without nvcc.
set -u
src=${MOEGEN_SOURCE_DIR:?}
moegen=${MOEGEN_BINARY:?}
. "$src/tests/check_lib.sh"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$nvcc" ]; then
    echo "SKIP: no nvcc (set NVCC); CUDA generate-and-link not checked"
    exit 77
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/moegen-cuda-aot.XXXXXX")
trap 'rm -rf "$work"' EXIT

cat > "$work/main.c" <<'C'
/* Links a generated CUDA layer; PREFIX is its moe_<ident>. No kernel is launched. */
#include <stdio.h>
#include <string.h>
#include LAYER_HEADER
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(PREFIX, name)
int main(void) {
    const moegen_kernel_info *info = FN(_info)();
    printf("describe: %s\n", FN(_describe)());
    printf("info: abi %d experts %d k %d kernels %s\n", info->abi_version, info->num_experts, info->top_k,
           info->kernel_path);
    const size_t small = FN(_workspace_bytes)(1), big = FN(_workspace_bytes)(4096);
    printf("workspace: %zu %zu grows %d negative %zu\n", small, big, big > small, FN(_workspace_bytes)(-1));
    moegen_kernel_outputs out;
    memset(&out, 0, sizeof out);
    moegen_kernel_args a;
    memset(&a, 0, sizeof a);
    a.out = &out;
    a.n_tokens = 8;
    printf("abi mismatch: %d\n", FN(_forward)(&a, NULL));
    a.abi_version = MOEGEN_KERNEL_ABI_VERSION;
    printf("no tensors: %d\n", FN(_forward)(&a, NULL));
    static char fake[64]; /* never dereferenced: every check fails before a launch */
    a.x = fake;
    out.y = fake;
    a.w = (moegen_kernel_weights){(const float *)fake, (const float *)fake, (const float *)fake, fake, fake, fake, fake,
                                  fake, fake, fake, fake, (const float *)fake, fake, fake, fake, fake,
                                  (const float *)fake, (const float *)fake};
    a.workspace = fake;
    a.workspace_bytes = 64;
    printf("small workspace: %d\n", FN(_forward)(&a, NULL));
    a.used_token = (const uint8_t *)fake;
    printf("used_token: %d\n", FN(_forward)(&a, NULL));
    return 0;
}
C
for spec in test-capacity test-features demo test-fp32; do
    out_dir=$work/$spec
    expect "$spec: gen --backend cuda" 0 "$moegen" gen "$src/specs/$spec.yaml" --backend cuda --arch sm_90a -o "$out_dir"
    prefix=$(printf '%s\n' "$out" | sed -n 's|.*/\(moe_[A-Za-z0-9_]*\)\.cu$|\1|p')
    for f in "$prefix.cu" "$prefix.h" moegen_cuda_abi.h moegen_cuda_launch.h moegen_kernel_abi.h; do
        if [ -f "$out_dir/$f" ]; then pass "$spec: wrote $f"; else fail "$spec: $f missing"; fi
    done
    expect "$spec: nvcc -c" 0 "$nvcc" -O1 -std=c++17 -arch=sm_90a -c "$out_dir/$prefix.cu" -o "$out_dir/layer.o"
    expect "$spec: cc compiles a C caller against the header" 0 cc -std=c11 -Wall -Wextra -Werror -I"$out_dir" \
        -DPREFIX="$prefix" "-DLAYER_HEADER=\"$prefix.h\"" -c "$work/main.c" -o "$out_dir/main.o"
    expect "$spec: links with nvcc" 0 "$nvcc" "$out_dir/main.o" "$out_dir/layer.o" -o "$out_dir/caller"
    expect "$spec: the caller runs without a GPU" 0 "$out_dir/caller"
    contains "$spec: describe names the spec" "$prefix: spec sha256:"
    contains "$spec: kernels for sm_90" "kernels cuda sm_90"
    contains "$spec: workspace grows with tokens and refuses negative counts" "grows 1 negative 0"
    contains "$spec: an ABI mismatch is EABI" "abi mismatch: -3"
    contains "$spec: missing tensors are EARG" "no tensors: -1"
    contains "$spec: a short workspace is EWORKSPACE" "small workspace: -2"
    contains "$spec: used_token is refused (EARG)" "used_token: -1"
done
finish
