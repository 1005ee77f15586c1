% -- router.cu.tpl — stage 1 on the GPU. One block routes ROUTER_TOKENS tokens:
% -- phase 1 computes their fp32 logits as a small tiled GEMM (each logit summed by one
% -- thread in a fixed k order, so results are reproducible); phase 2 gives each token to
% -- one warp for scores, group limit, top-k (lane-parallel argmax, lower index wins
% -- ties), weights and the per-token loss terms.
% local moe = import("templates/lib/moe.lua")
% local r = spec.router
% local softmax = r.score_function == "softmax"
% local noise = moe.uses_noise(spec)
% local aux = moe.aux_kind(spec)
% local P = gen.prefix
/* ---- Stage 1: router ------------------------------------------------------------------ */

#define ROUTER_THREADS MOEGEN_CUDA_ROUTER_THREADS /* moegen_cuda_abi.h: the runtime launches with it */
#define ROUTER_WARPS (ROUTER_THREADS / 32)
#define ROUTER_EXPERT_CHUNK 64
#define ROUTER_K_CHUNK 32
#define EXPERTS_PER_LANE ((NUM_EXPERTS + 31) / 32)
#define ROUTER_OUTPUTS (ROUTER_TOKENS * ROUTER_EXPERT_CHUNK / ROUTER_THREADS)
static_assert(ROUTER_TOKENS * ROUTER_EXPERT_CHUNK % ROUTER_THREADS == 0, "router tile splits evenly");

/* Phase 1: logits of tokens [t0, t0 + n_tokens) into a.logits (sanitized). */
__device__ void router_logits(const moegen_cuda_args &a, long long t0, int n_tokens) {
    __shared__ float x_tile[ROUTER_TOKENS][ROUTER_K_CHUNK + 1];
    __shared__ float w_tile[ROUTER_EXPERT_CHUNK][ROUTER_K_CHUNK + 1];
    const elem_t *x = (const elem_t *)a.x;
    const float *router_w = a.w.router_w;
    for (int e0 = 0; e0 < NUM_EXPERTS; e0 += ROUTER_EXPERT_CHUNK) {
        float acc[ROUTER_OUTPUTS];
#pragma unroll
        for (int o = 0; o < ROUTER_OUTPUTS; o++) acc[o] = 0.0f;
        for (int k0 = 0; k0 < HIDDEN; k0 += ROUTER_K_CHUNK) {
            __syncthreads();
            for (int i = threadIdx.x; i < ROUTER_TOKENS * ROUTER_K_CHUNK; i += ROUTER_THREADS) {
                const int t = i / ROUTER_K_CHUNK, k = i % ROUTER_K_CHUNK;
                float v = 0.0f;
                if (t < n_tokens && k0 + k < HIDDEN) {
                    const long long token = t0 + t;
                    v = elem_to_float(x[token * HIDDEN + k0 + k]);
% if moe.uses_jitter(spec) then
                    /* Input jitter (train mode): x * U(1 - eps, 1 + eps), router input only. */
                    const float u = rng_uniform(a.rng_offset, RNG_STREAM_JITTER,
                                                (unsigned long long)token * HIDDEN + k0 + k);
                    v *= (1.0f - INPUT_JITTER) + u * (2.0f * INPUT_JITTER);
% end
                }
                x_tile[t][k] = v;
            }
            for (int i = threadIdx.x; i < ROUTER_EXPERT_CHUNK * ROUTER_K_CHUNK; i += ROUTER_THREADS) {
                const int e = i / ROUTER_K_CHUNK, k = i % ROUTER_K_CHUNK;
                w_tile[e][k] = (e0 + e < NUM_EXPERTS && k0 + k < HIDDEN)
                                   ? router_w[(long long)(e0 + e) * HIDDEN + k0 + k] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int o = 0; o < ROUTER_OUTPUTS; o++) {
                const int idx = threadIdx.x + o * ROUTER_THREADS;
                const int t = idx / ROUTER_EXPERT_CHUNK, e = idx % ROUTER_EXPERT_CHUNK;
#pragma unroll 8
                for (int k = 0; k < ROUTER_K_CHUNK; k++) acc[o] += x_tile[t][k] * w_tile[e][k];
            }
        }
#pragma unroll
        for (int o = 0; o < ROUTER_OUTPUTS; o++) {
            const int idx = threadIdx.x + o * ROUTER_THREADS;
            const int t = idx / ROUTER_EXPERT_CHUNK, e = idx % ROUTER_EXPERT_CHUNK;
            if (t < n_tokens && e0 + e < NUM_EXPERTS) {
% if r.router_bias then
                float logit = acc[o] + a.w.router_b[e0 + e];
% else
                float logit = acc[o];
% end
                if (isnan(logit)) logit = -INF;              /* NaN counts as -inf */
                if (logit == INF) logit = FLOAT_MAX;         /* +inf: largest finite */
                a.logits[(t0 + t) * NUM_EXPERTS + e0 + e] = logit;
            }
        }
    }
    __syncthreads(); /* the block's logits are visible to every warp of phase 2 */
}

/* Best untaken valid candidate of this lane: experts lane, lane + 32, ... */
__device__ __forceinline__ void lane_best(const float (&candidate)[EXPERTS_PER_LANE], unsigned taken,
                                          float &value, int &index) {
    value = -INF;
    index = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++)
        if (!(taken >> i & 1u) && candidate[i] > value) { /* strict: lower index wins */
            value = candidate[i];
            index = (int)(threadIdx.x % 32) + 32 * i;
        }
}
% if r.n_group > 1 then
% local group_rule = r.group_score == "max" and "the largest" or "the sum of the top GROUP_TOPM"
% local mask_rule = r.group_mask == "zero" and "sel = 0 for valid experts" or "sel = -inf"

/* Group limit: group score = ${group_rule} selection scores; keep the TOPK_GROUP best
 * groups (lower index wins ties); experts of the other groups get ${mask_rule}.
 * `sel` is this warp's [NUM_EXPERTS] row in shared memory. */
__device__ void limit_groups(float *sel, float *group_score) {
    const int lane = threadIdx.x % 32;
    for (int g = lane; g < N_GROUP; g += 32) {
        const float *member = sel + g * EXPERTS_PER_GROUP;
% if r.group_score == "max" then
        float best = -INF;
        for (int i = 0; i < EXPERTS_PER_GROUP; i++) best = fmaxf(best, member[i]);
        group_score[g] = best;
% else
        float sum = 0.0f, previous = INF;
        int n_valid = 0, previous_index = -1;
        for (int m = 0; m < GROUP_TOPM; m++) { /* m-th best valid member: below the previous one */
            int best = -1;
            for (int i = 0; i < EXPERTS_PER_GROUP; i++) {
                const bool after_previous = member[i] < previous || (member[i] == previous && i > previous_index);
                if (after_previous && member[i] > -INF && (best < 0 || member[i] > member[best])) best = i;
            }
            if (best < 0) break;
            previous = member[best];
            previous_index = best;
            sum += member[best];
            n_valid++;
        }
        group_score[g] = n_valid > 0 ? sum : -INF;
% end
    }
    __syncwarp();
    /* Keep TOPK_GROUP groups: each round takes the best group ranked below the last one
     * (score descending, then index ascending), so no per-group flags are needed. */
    float last_value = INF;
    int last_index = -1;
    for (int n = 0; n < TOPK_GROUP; n++) {
        float value = -INF;
        int index = 0x7fffffff;
        for (int g = lane; g < N_GROUP; g += 32)
            if ((group_score[g] < last_value || (group_score[g] == last_value && g > last_index)) &&
                (index == 0x7fffffff || group_score[g] > value)) {
                value = group_score[g];
                index = g;
            }
        /* -inf groups (no valid expert) may still be kept when nothing better is left;
         * index 0x7fffffff marks a lane with no candidate left */
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            float other_value = __shfl_xor_sync(FULL_MASK, value, offset);
            int other_index = __shfl_xor_sync(FULL_MASK, index, offset);
            bool other_better = other_index != 0x7fffffff &&
                                (index == 0x7fffffff || other_value > value ||
                                 (other_value == value && other_index < index));
            if (other_better) {
                value = other_value;
                index = other_index;
            }
        }
        last_value = value;
        last_index = index;
    }
    __syncwarp();
    /* A group is kept when it ranks at or above the last kept one. */
    for (int e = lane; e < NUM_EXPERTS; e += 32) {
        const int g = e / EXPERTS_PER_GROUP;
        const bool kept = group_score[g] > last_value || (group_score[g] == last_value && g <= last_index);
        if (!kept)
% if r.group_mask == "zero" then
            if (sel[e] > -INF) sel[e] = 0.0f; /* Hugging Face DeepSeek-V3 masking */
% else
            sel[e] = -INF;
% end
    }
    __syncwarp();
}
% end

/* Phase 2: route token t with one warp. */
__device__ void route_token(const moegen_cuda_args &a, long long t, float *warp_row, float *warp_groups) {
    const int lane = threadIdx.x % 32;
    const float *z_row = a.logits + t * NUM_EXPERTS;
    float z[EXPERTS_PER_LANE], score[EXPERTS_PER_LANE], sel[EXPERTS_PER_LANE];
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) {
        const int e = lane + 32 * i;
        z[i] = e < NUM_EXPERTS ? z_row[e] : -INF;
    }
    float z_max = -INF;
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) z_max = fmaxf(z_max, z[i]);
    z_max = warp_max(z_max);
    float exp_sum = 0.0f; /* sum of exp(z - max) over valid logits */
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) exp_sum += z_max == -INF ? 0.0f : expf(z[i] - z_max);
    exp_sum = warp_sum(exp_sum);
% if softmax then
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++)
        score[i] = z_max == -INF ? 0.0f : expf(z[i] - z_max) / exp_sum;
% elseif r.score_function == "sigmoid" then
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) score[i] = z[i] > -INF ? sigmoid(z[i]) : 0.0f;
% else
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) { /* sqrt(softplus(z)), stable for large |z| */
        const float softplus = z[i] > 20.0f ? z[i] + log1pf(expf(-z[i])) : log1pf(expf(z[i]));
        score[i] = z[i] > -INF ? sqrtf(softplus) : 0.0f;
    }
% end
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) {
% if softmax and r.order == "topk_then_softmax" then
        sel[i] = z[i]; /* select on logits */
        (void)score[i];
% elseif r.score_bias then
        const int e = lane + 32 * i;
        sel[i] = z[i] > -INF ? score[i] + a.w.score_bias[e < NUM_EXPERTS ? e : 0] : -INF; /* selection only */
        if (isnan(sel[i])) sel[i] = -INF;
% else
        sel[i] = z[i] > -INF ? score[i] : -INF;
% end
    }
% if r.n_group > 1 then
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++)
        if (lane + 32 * i < NUM_EXPERTS) warp_row[lane + 32 * i] = sel[i];
    __syncwarp();
    limit_groups(warp_row, warp_groups);
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++)
        if (lane + 32 * i < NUM_EXPERTS) sel[i] = warp_row[lane + 32 * i];
    __syncwarp();
% else
    (void)warp_row;
    (void)warp_groups;
% end
% if noise then

    /* rsample: Gumbel noise on the logits for the ${spec.top_k == 1 and "choice" or "second choice"} (train mode). */
    float noisy[EXPERTS_PER_LANE];
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) {
        const int e = lane + 32 * i;
        const float u = rng_uniform(a.rng_offset, RNG_STREAM_GUMBEL, (unsigned long long)t * NUM_EXPERTS + e);
        noisy[i] = z[i] > -INF ? z[i] - logf(-logf(u)) : -INF;
    }
% end

    /* Top-k: TOP_K rounds of warp argmax; fewer valid experts than TOP_K fill the
     * remaining slots with the lowest unused ids (weight 0, invalid routes). */
    unsigned taken = 0;
    int ids[TOP_K];
    bool valid[TOP_K];
#pragma unroll
    for (int j = 0; j < TOP_K; j++) {
        float value;
        int index;
% if noise and spec.top_k == 1 then
        lane_best(noisy, taken, value, index);
% elseif noise then
        if (j == 1) lane_best(noisy, taken, value, index);
        else lane_best(sel, taken, value, index);
% else
        lane_best(sel, taken, value, index);
% end
        warp_argmax(value, index);
        valid[j] = value > -INF;
        if (!valid[j]) { /* lowest expert id not taken yet */
            int lowest = 0x7fffffff;
#pragma unroll
            for (int i = EXPERTS_PER_LANE - 1; i >= 0; i--)
                if (!(taken >> i & 1u) && lane + 32 * i < NUM_EXPERTS) lowest = lane + 32 * i;
            index = warp_min_int(lowest);
        }
        ids[j] = index;
        if (index % 32 == lane) taken |= 1u << (index / 32);
    }

    /* Router weights (every lane computes them the same way). */
    float weight[TOP_K];
% if softmax and r.order == "topk_then_softmax" then
    float chosen_max = -INF;
#pragma unroll
    for (int j = 0; j < TOP_K; j++)
        if (valid[j]) chosen_max = fmaxf(chosen_max, z_row[ids[j]]);
    float chosen_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < TOP_K; j++) {
        weight[j] = valid[j] ? expf(z_row[ids[j]] - chosen_max) : 0.0f;
        chosen_sum += weight[j];
    }
#pragma unroll
    for (int j = 0; j < TOP_K; j++) weight[j] = valid[j] ? weight[j] / chosen_sum : 0.0f;
% else
#pragma unroll
    for (int j = 0; j < TOP_K; j++) {
        const int owner = ids[j] % 32, slot = ids[j] / 32;
        float mine = 0.0f;
#pragma unroll
        for (int i = 0; i < EXPERTS_PER_LANE; i++)
            if (i == slot) mine = score[i];
        const float s = __shfl_sync(FULL_MASK, mine, owner);
        weight[j] = valid[j] ? s : 0.0f;
    }
% end
% if r.norm_topk_prob then
    float weight_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < TOP_K; j++) weight_sum += weight[j];
    weight_sum = weight_sum > WEIGHT_SUM_EPS ? weight_sum : WEIGHT_SUM_EPS;
#pragma unroll
    for (int j = 0; j < TOP_K; j++) weight[j] /= weight_sum;
% end
% if r.routed_scaling_factor ~= 1 then
#pragma unroll
    for (int j = 0; j < TOP_K; j++) weight[j] *= ROUTED_SCALING_FACTOR;
% end
    if (lane < TOP_K) { /* lane j writes slot j */
        int my_id = 0;
        float my_weight = 0.0f;
        bool my_valid = false;
#pragma unroll
        for (int j = 0; j < TOP_K; j++)
            if (j == lane) {
                my_id = ids[j];
                my_weight = weight[j];
                my_valid = valid[j];
            }
        a.route_expert[t * TOP_K + lane] = my_id;
        a.route_weight[t * TOP_K + lane] = my_weight;
        a.route_valid[t * TOP_K + lane] = my_valid;
    }
% if spec.top_k > 32 then
    for (int j = 32 + lane; j < TOP_K; j += 32) { /* top-k above 32 */
        int my_id = 0;
        float my_weight = 0.0f;
        bool my_valid = false;
        for (int q = 0; q < TOP_K; q++)
            if (q == j) {
                my_id = ids[q];
                my_weight = weight[q];
                my_valid = valid[q];
            }
        a.route_expert[t * TOP_K + j] = my_id;
        a.route_weight[t * TOP_K + j] = my_weight;
        a.route_valid[t * TOP_K + j] = my_valid;
    }
% end
% if aux ~= "none" then

    /* Load-balancing loss terms (${aux}): this token's probabilities and counts. */
    float prob[EXPERTS_PER_LANE];
%   if softmax or aux == "ds_first_choice" then
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) /* softmax over all experts */
        prob[i] = z_max == -INF ? 0.0f : expf(z[i] - z_max) / exp_sum;
%   else
    float score_sum = 0.0f; /* scores normalized to sum 1 */
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) score_sum += z[i] > -INF ? score[i] : 0.0f;
    score_sum = warp_sum(score_sum);
    score_sum = score_sum > WEIGHT_SUM_EPS ? score_sum : WEIGHT_SUM_EPS;
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) prob[i] = z[i] > -INF ? score[i] / score_sum : 0.0f;
%   end
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++)
        if (lane + 32 * i < NUM_EXPERTS) a.aux_probs[t * NUM_EXPERTS + lane + 32 * i] = prob[i];
%   if aux == "ds_first_choice" then
    if (lane == 0 && valid[0]) atomicAdd(&a.aux_counts[ids[0]], 1); /* first choices */
%   else
    /* plain top-k on the probabilities: no group limit, bias, capacity or noise */
    float plain[EXPERTS_PER_LANE];
#pragma unroll
    for (int i = 0; i < EXPERTS_PER_LANE; i++) plain[i] = z[i] > -INF ? prob[i] : -INF;
    unsigned plain_taken = 0;
    for (int j = 0; j < TOP_K; j++) {
        float value;
        int index;
        lane_best(plain, plain_taken, value, index);
        warp_argmax(value, index);
        if (!(value > -INF)) break;
        if (index % 32 == lane) {
            plain_taken |= 1u << (index / 32);
            atomicAdd(&a.aux_counts[index], 1);
        }
    }
%   end
% end

    /* z-loss term: logsumexp over valid logits, squared (0 for a row with none). */
    if (lane == 0) {
        const double lse = z_max == -INF ? 0.0 : (double)z_max + log((double)exp_sum);
        a.lse_squared[t] = lse * lse;
    }
}

extern "C" __global__ void __launch_bounds__(ROUTER_THREADS) ${P}_router(const moegen_cuda_args a) {
    const long long t0 = (long long)blockIdx.x * ROUTER_TOKENS;
    const int n_tokens = (int)min_ll(ROUTER_TOKENS, a.n_tokens - t0);
    router_logits(a, t0, n_tokens);
% if r.n_group > 1 then
    __shared__ float rows[ROUTER_WARPS][NUM_EXPERTS];
    __shared__ float groups[ROUTER_WARPS][N_GROUP];
    float *warp_row = rows[threadIdx.x / 32];
    float *warp_groups = groups[threadIdx.x / 32];
% else
    float *warp_row = nullptr, *warp_groups = nullptr;
% end
    for (int t = threadIdx.x / 32; t < n_tokens; t += ROUTER_WARPS) route_token(a, t0 + t, warp_row, warp_groups);
}

