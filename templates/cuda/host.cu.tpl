% -- host.cu.tpl — the host-side forward of the CUDA module, for generate-and-link: `nvcc -c`
% -- on the generated .cu gives an object with ${P}_forward (workspace checks, capacity, the
% -- launch sequence on the caller's stream). NVRTC never sees it (__CUDACC_RTC__). The
% -- workspace layout and the steps come from moegen_cuda_launch.h, which the runtime's
% -- driver-API path walks too; the capacity rule and the required tensors from the shared
% -- partials the CPU module uses.
% local moe = import("templates/lib/moe.lua")
% local P = gen.prefix
% local cap = spec.capacity
% local ranked = cap.mode ~= "dropless" and (cap.priority == "probs" or cap.priority == "random")
% local dtype_code = ({ fp32 = 0, fp16 = 1, bf16 = 2 })[spec.dtype]

#if !defined(__CUDACC_RTC__)
/* ---- Host-side forward (nvcc only) ------------------------------------------------------ */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "${gen.header_name}"
#include "moegen_cuda_launch.h"

% include("templates/common/capacity.c.tpl")

% include("templates/common/weights.c.tpl")

/* Largest token count one call accepts: route and row indices are int32. */
#define MAX_TOKENS (INT32_MAX / TOP_K)

static const moegen_cuda_layer LAYER = {
    NUM_EXPERTS, TOP_K, HIDDEN, FFN, SHARED_EXPERTS, ${spec.shared.count > 0 and spec.shared.ffn_size or 0},
    ${spec.use_residual and 1 or 0} /* residual */, ${moe.aux_kind(spec) ~= "none" and 1 or 0} /* aux loss */,
    (int)sizeof(elem_t), TILE_M, TILE_N, WARPS_M, WARPS_N, ROUTER_TOKENS, ${ranked and 1 or 0} /* dispatch_rank */,
    FFN_ROWS, ${spec.shared.count > 0 and spec.shared.ffn_rows or 0}, ${spec.shared.count > 0 and spec.shared.gate and 1 or 0} /* shared gate */};

/* The build pin's definition (${gen.header_name}). */
extern "C" const char ${P}_build_${gen.build_id}[] = "${gen.build_id}";

extern "C" const moegen_kernel_info *${P}_info(void) {
    static const moegen_kernel_info info = {
        MOEGEN_KERNEL_ABI_VERSION, "${spec.hash}", "${variant.name}",
        NUM_EXPERTS, TOP_K, HIDDEN, FFN, FFN_ROWS, ${dtype_code} /* ${spec.dtype} */, "cuda sm_${variant.cuda.sm}"};
    return &info;
}

extern "C" const char *${P}_describe(void) {
    return "${P}: spec sha256:${spec.hash}, variant ${variant.name}, moegen ${gen.version}, build ${gen.build_id}, "
           "kernels cuda sm_${variant.cuda.sm}";
}

extern "C" size_t ${P}_workspace_bytes(int64_t n_tokens) {
    if (n_tokens < 0 || n_tokens > MAX_TOKENS || max_rows_for(n_tokens) > INT32_MAX) return 0;
    return moegen_cuda_layout_for(&LAYER, n_tokens, max_rows_for(n_tokens)).total;
}

/* Launch one step of moegen_cuda_launch.h on `stream`. */
static void launch_step(const moegen_cuda_step *step, const moegen_cuda_args &a, cudaStream_t stream) {
    const dim3 grid(step->grid_x, step->grid_y), block(step->threads);
    const size_t shared = MOEGEN_CUDA_DYNAMIC_SHARED_BYTES;
    switch (step->kind) {
    case MOEGEN_CUDA_ZERO_AUX_COUNTS:
        cudaMemsetAsync(a.aux_counts, 0, sizeof(int) * NUM_EXPERTS, stream);
        break;
    case MOEGEN_CUDA_ROUTER:
        ${P}_router<<<grid, block, shared, stream>>>(a);
        break;
    case MOEGEN_CUDA_DISPATCH_COUNT:
        ${P}_dispatch_count<<<grid, block, shared, stream>>>(a);
        break;
% if ranked then
    case MOEGEN_CUDA_DISPATCH_RANK:
        ${P}_dispatch_rank<<<grid, block, shared, stream>>>(a);
        break;
% end
    case MOEGEN_CUDA_DISPATCH_PLACE:
        ${P}_dispatch_place<<<grid, block, shared, stream>>>(a);
        break;
    case MOEGEN_CUDA_GEMM1:
    case MOEGEN_CUDA_GEMM2: {
        const moegen_cuda_group &g = step->group;
        const bool first = step->kind == MOEGEN_CUDA_GEMM1;
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
        if (g.ffn == ${shape.ffn}) {
            if (first) ${P}_${shape.name}_gemm1<<<grid, block, shared, stream>>>(a, g.group, g.first, g.count);
            else ${P}_${shape.name}_gemm2<<<grid, block, shared, stream>>>(a, g.group, g.first, g.count);
        }
% end
        break;
    }
    case MOEGEN_CUDA_COMBINE:
        ${P}_combine<<<grid, block, shared, stream>>>(a);
        break;
    case MOEGEN_CUDA_LOSSES:
        ${P}_losses<<<grid, block, shared, stream>>>(a);
        break;
    }
}

/* The forward on `stream` (a cudaStream_t; NULL: the default stream). Every pointer in args is
 * a device pointer, except args->out itself, a host struct; workspace: device memory of
 * ${P}_workspace_bytes(n_tokens) bytes, 256-byte aligned. Asynchronous: out->capacity is set
 * at once; the dropped-route count and the losses stay on the device until
 * ${P}_read_stats. used_token and train_keep are not supported here (EARG). */
extern "C" int ${P}_forward(const moegen_kernel_args *args, void *stream_handle) {
    if (!args) return MOEGEN_KERNEL_EARG;
    if (args->abi_version != MOEGEN_KERNEL_ABI_VERSION) return MOEGEN_KERNEL_EABI;
    const int64_t S = args->n_tokens;
    moegen_kernel_outputs *out = args->out;
    if (!out || S < 0 || S > MAX_TOKENS || args->used_token || args->train_keep) return MOEGEN_KERNEL_EARG;
    if (S > 0 && (!args->x || !out->y)) return MOEGEN_KERNEL_EARG;
    if (!weights_present(&args->w)) return MOEGEN_KERNEL_EARG;
    const int64_t max_rows = max_rows_for(S);
    if (max_rows > INT32_MAX) return MOEGEN_KERNEL_EARG;
    cudaStream_t stream = (cudaStream_t)stream_handle;
    out->capacity = capacity_for(S);
    out->n_dropped = 0;
    out->aux_loss = out->z_loss = 0.0;
    if (S == 0) { /* nothing to launch: empty counts */
        if (out->counts_before) cudaMemsetAsync(out->counts_before, 0, sizeof(int64_t) * NUM_EXPERTS, stream);
        if (out->counts_after) cudaMemsetAsync(out->counts_after, 0, sizeof(int64_t) * NUM_EXPERTS, stream);
        return cudaPeekAtLastError() == cudaSuccess ? MOEGEN_KERNEL_OK : MOEGEN_KERNEL_ECUDA;
    }
    const moegen_cuda_layout L = moegen_cuda_layout_for(&LAYER, S, max_rows);
    if (!args->workspace || args->workspace_bytes < L.total) return MOEGEN_KERNEL_EWORKSPACE;
    moegen_cuda_args a;
    memset(&a, 0, sizeof a);
    a.n_tokens = S;
    a.capacity = out->capacity;
    a.max_rows = max_rows;
    a.rng_offset = args->rng_offset;
    a.x = args->x;
    a.w = args->w;
    a.y = out->y;
    a.topk_ids = out->topk_ids;
    a.topk_weights = out->topk_weights;
    a.router_weights = out->router_weights;
    a.counts_before = (long long *)out->counts_before;
    a.counts_after = (long long *)out->counts_after;
    moegen_cuda_carve(&L, (char *)args->workspace, &a);
    moegen_cuda_step steps[MOEGEN_CUDA_MAX_STEPS];
    const int n = moegen_cuda_forward_steps(&LAYER, S, max_rows, MOEGEN_CUDA_STAGE_ALL, 7u, steps);
    for (int i = 0; i < n; i++) {
        launch_step(&steps[i], a, stream);
        if (cudaPeekAtLastError() != cudaSuccess) return MOEGEN_KERNEL_ECUDA;
    }
    return MOEGEN_KERNEL_OK;
}

/* Wait for the forward on `stream` and copy its dropped-route count and losses into args->out
 * (the same args as the ${P}_forward call, workspace untouched since). */
extern "C" int ${P}_read_stats(const moegen_kernel_args *args, void *stream_handle) {
    if (!args || !args->out) return MOEGEN_KERNEL_EARG;
    if (args->n_tokens <= 0) return MOEGEN_KERNEL_OK; /* the forward set them */
    const int64_t S = args->n_tokens;
    const moegen_cuda_layout L = moegen_cuda_layout_for(&LAYER, S, max_rows_for(S));
    if (!args->workspace || args->workspace_bytes < L.total) return MOEGEN_KERNEL_EWORKSPACE;
    cudaStream_t stream = (cudaStream_t)stream_handle;
    long long stats_dropped = 0;
    double stats_losses[2] = {0.0, 0.0};
    const char *base = (const char *)args->workspace + L.stats;
    cudaMemcpyAsync(&stats_dropped, base, 8, cudaMemcpyDeviceToHost, stream);
    cudaMemcpyAsync(stats_losses, base + 8, 16, cudaMemcpyDeviceToHost, stream);
    if (cudaStreamSynchronize(stream) != cudaSuccess) return MOEGEN_KERNEL_ECUDA;
    args->out->n_dropped = stats_dropped;
    args->out->aux_loss = stats_losses[0];
    args->out->z_loss = stats_losses[1];
    return MOEGEN_KERNEL_OK;
}
#endif /* !__CUDACC_RTC__ */
