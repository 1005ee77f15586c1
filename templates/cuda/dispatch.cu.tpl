% -- dispatch.cu.tpl — stage 2 on the GPU: capacity, drop priority, expert-contiguous
% -- rows and the GEMM problem table, with no host round trip (the capacity arrives as an
% -- argument; every launch shape depends only on S). Ordered decisions (token-major /
% -- choice-major ranks) are made by one warp scanning the routes in order, 32 at a time,
% -- with __match_any_sync giving each lane its rank among same-expert lanes (ordered_rank);
% -- that keeps the result identical to the CPU backend's sequential loops.
% local moe = import("templates/lib/moe.lua")
% local cap = spec.capacity
% local dropless = cap.mode == "dropless"
% -- `ranked` is the one decision whether this module has P_dispatch_rank: the runtime
% -- looks the kernel up by name and launches it when it is there (moegen_cuda_abi.h).
% local ranked = not dropless and (cap.priority == "probs" or cap.priority == "random")
% local P = gen.prefix
/* ---- Stage 2: capacity and permutation ---------------------------------------------- */

#define DISPATCH_THREADS MOEGEN_CUDA_DISPATCH_THREADS /* moegen_cuda_abi.h: the runtime launches with these */
#define RANK_THREADS MOEGEN_CUDA_RANK_THREADS

/* Rank of this lane's route among routes of the same expert, for a warp walking routes
 * in order 32 at a time: base[expert] (routes of that expert already seen) plus the
 * same-expert lanes below this one; then base advances past this chunk. expert -1 = no
 * route (returns -1). Deterministic: the result depends only on the route order. */
__device__ __forceinline__ int ordered_rank(int expert, int *base) {
    const int lane = threadIdx.x % 32;
    const unsigned same = __match_any_sync(FULL_MASK, expert);
    const int rank = expert >= 0 ? base[expert] + __popc(same & ((1u << lane) - 1u)) : -1;
    __syncwarp();
    if (expert >= 0 && lane == __ffs(same) - 1) base[expert] += __popc(same); /* lowest lane of the group */
    __syncwarp();
    return rank;
}

/* Counts, bucket order (token-major within each expert) and, for position priorities,
 * which routes are kept. */
extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS) ${P}_dispatch_count(const moegen_cuda_args a) {
    __shared__ int count[NUM_EXPERTS];
    __shared__ int base[NUM_EXPERTS];
    const long long n_routes = a.n_tokens * TOP_K;
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += DISPATCH_THREADS) count[e] = 0;
    __syncthreads();
    for (long long r = threadIdx.x; r < n_routes; r += DISPATCH_THREADS)
        if (a.route_valid[r]) atomicAdd(&count[a.route_expert[r]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        long long offset = 0;
        for (int e = 0; e < NUM_EXPERTS; e++) {
            a.bucket_offset[e] = offset;
            base[e] = (int)offset;
            offset += count[e];
        }
        a.bucket_offset[NUM_EXPERTS] = offset;
    }
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += DISPATCH_THREADS) {
        a.expert_count[e] = count[e];
        if (a.counts_before) a.counts_before[e] = count[e];
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        /* Bucket order: every valid route, expert by expert, tokens ascending. */
        for (long long start = 0; start < n_routes; start += 32) {
            const long long route = start + threadIdx.x;
            const int expert = route < n_routes && a.route_valid[route] ? a.route_expert[route] : -1;
            const int rank = ordered_rank(expert, base);
            if (expert < 0) continue;
            a.route_bucket[rank] = (int)route;
% if dropless or ranked then
            a.route_kept[route] = 1; /* ${dropless and "dropless" or "ranked later by priority"} */
% elseif cap.priority == "position" then
            a.route_kept[route] = rank - a.bucket_offset[expert] < a.capacity; /* first C in token order */
% else
            a.route_kept[route] = 0; /* decided by the choice-major scan below */
% end
        }
    }
    for (long long r = threadIdx.x; r < n_routes; r += DISPATCH_THREADS)
        if (!a.route_valid[r]) a.route_kept[r] = 0;
% if not dropless and cap.priority == "position_choice_major" then
    __syncthreads();
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += DISPATCH_THREADS) base[e] = 0;
    __syncthreads();
    if (threadIdx.x < 32) {
        /* position, choice-major: all first choices in token order, then second, ... */
        for (long long start = 0; start < n_routes; start += 32) {
            const long long i = start + threadIdx.x;
            const long long route = (i % a.n_tokens) * TOP_K + i / a.n_tokens;
            const int expert = i < n_routes && a.route_valid[route] ? a.route_expert[route] : -1;
            const int rank = ordered_rank(expert, base);
            if (expert >= 0) a.route_kept[route] = rank < a.capacity;
        }
    }
% end
}
% if ranked then

__device__ __forceinline__ float priority_key(const moegen_cuda_args &a, long long route) {
% if cap.priority == "probs" then
    return a.route_weight[route]; /* router weight after normalization and scaling */
% else
    return rng_uniform(a.rng_offset, RNG_STREAM_PRIORITY, (unsigned long long)route);
% end
}

/* ${cap.priority} priority: a route of an over-full expert is kept when fewer than C routes
 * of that expert rank above it (key descending, then token ascending). */
extern "C" __global__ void __launch_bounds__(RANK_THREADS) ${P}_dispatch_rank(const moegen_cuda_args a) {
    const long long route = (long long)blockIdx.x * RANK_THREADS + threadIdx.x;
    if (route >= a.n_tokens * TOP_K || !a.route_valid[route]) return;
    const int expert = a.route_expert[route];
    const long long first = a.bucket_offset[expert], n = a.bucket_offset[expert + 1] - first;
    if (n <= a.capacity) return;
    const float key = priority_key(a, route);
    const long long token = route / TOP_K;
    long long above = 0;
    for (long long i = 0; i < n; i++) {
        const long long other = a.route_bucket[first + i];
        const float other_key = priority_key(a, other);
        above += other_key > key || (other_key == key && other / TOP_K < token);
    }
    a.route_kept[route] = above < a.capacity;
}
% end

/* Rows of the kept routes (expert-contiguous, tokens ascending), padding rows, combine
 * weights, and the problem table every grouped GEMM launch reads. */
extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS) ${P}_dispatch_place(const moegen_cuda_args a) {
    __shared__ int kept[NUM_EXPERTS];
    __shared__ int base[NUM_EXPERTS];
    const long long n_routes = a.n_tokens * TOP_K;
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += DISPATCH_THREADS) kept[e] = 0;
    __syncthreads();
    for (long long r = threadIdx.x; r < n_routes; r += DISPATCH_THREADS)
        if (a.route_kept[r]) atomicAdd(&kept[a.route_expert[r]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        long long offset = 0;
        int tiles = 0;
        for (int e = 0; e < NUM_EXPERTS; e++) {
            const long long rows = PAD_TO_CAPACITY ? a.capacity : kept[e];
            a.expert_offset[e] = offset;
            base[e] = (int)offset;
            a.problems[e].row_start = offset;
            a.problems[e].n_rows = rows;
            a.problems[e].tile_start = tiles;
            a.problems[e].weight_index = e;
            tiles += (int)((rows + TILE_M - 1) / TILE_M);
            offset += rows;
        }
        a.expert_offset[NUM_EXPERTS] = offset;
        a.group_tiles[MOEGEN_GROUP_ROUTED] = tiles;
        const int token_tiles = (int)((a.n_tokens + TILE_M - 1) / TILE_M);
        for (int i = 0; i < SHARED_EXPERTS; i++) {
            moegen_cuda_problem *p = &a.problems[NUM_EXPERTS + i];
            p->row_start = (long long)i * a.n_tokens;
            p->n_rows = a.n_tokens;
            p->tile_start = i * token_tiles;
            p->weight_index = i;
        }
        a.group_tiles[MOEGEN_GROUP_SHARED] = SHARED_EXPERTS * token_tiles;
        moegen_cuda_problem *residual = &a.problems[NUM_EXPERTS + SHARED_EXPERTS];
        residual->row_start = 0;
        residual->n_rows = a.n_tokens;
        residual->tile_start = 0;
        residual->weight_index = 0;
        a.group_tiles[MOEGEN_GROUP_RESIDUAL] = token_tiles;
    }
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += DISPATCH_THREADS) {
        a.expert_kept[e] = kept[e];
        if (a.counts_after) a.counts_after[e] = kept[e];
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        for (long long start = 0; start < n_routes; start += 32) {
            const long long route = start + threadIdx.x;
            const int expert = route < n_routes && a.route_kept[route] ? a.route_expert[route] : -1;
            const int row = ordered_rank(expert, base);
            if (expert < 0) continue;
            a.route_row[route] = row;
            a.row_token[row] = (int)(route / TOP_K);
        }
    }
    for (long long r = threadIdx.x; r < n_routes; r += DISPATCH_THREADS)
        if (!a.route_kept[r]) a.route_row[r] = -1;
% if not dropless and spec.capacity.pad_to_capacity then
    for (long long row = threadIdx.x; row < a.max_rows; row += DISPATCH_THREADS) {
        const long long expert = row / a.capacity;
        if (row - expert * a.capacity >= kept[expert]) a.row_token[row] = -1; /* padding row */
    }
% end
    __syncthreads();

    /* Combine weights of kept routes${cap.renormalize and ", renormalized per token" or ""}. */
    for (long long t = threadIdx.x; t < a.n_tokens; t += DISPATCH_THREADS) {
        const float *weight = a.route_weight + t * TOP_K;
        const unsigned char *is_kept = a.route_kept + t * TOP_K;
        float *final_weight = a.route_final + t * TOP_K;
% if cap.renormalize then
        float kept_sum = 0.0f;
        for (int j = 0; j < TOP_K; j++)
            if (is_kept[j]) kept_sum += weight[j];
        kept_sum = kept_sum > WEIGHT_SUM_EPS ? kept_sum : WEIGHT_SUM_EPS;
%   if spec.router.routed_scaling_factor ~= 1 then
        for (int j = 0; j < TOP_K; j++) final_weight[j] = is_kept[j] ? weight[j] / kept_sum * ROUTED_SCALING_FACTOR : 0.0f;
%   else
        for (int j = 0; j < TOP_K; j++) final_weight[j] = is_kept[j] ? weight[j] / kept_sum : 0.0f;
%   end
% else
        for (int j = 0; j < TOP_K; j++) final_weight[j] = is_kept[j] ? weight[j] : 0.0f;
% end
        for (int j = 0; j < TOP_K; j++) {
% if spec.weight_on_input then
            if (is_kept[j]) a.row_scale[a.route_row[t * TOP_K + j]] = final_weight[j]; /* the expert sees w * x */
% end
            if (a.topk_ids) a.topk_ids[t * TOP_K + j] = a.route_expert[t * TOP_K + j];
            if (a.topk_weights) a.topk_weights[t * TOP_K + j] = final_weight[j];
            if (a.router_weights) a.router_weights[t * TOP_K + j] = weight[j];
        }
    }
}

