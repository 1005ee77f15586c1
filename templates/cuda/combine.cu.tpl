% -- combine.cu.tpl — stage 4 on the GPU: one block per token sums its kept routes' expert
% -- outputs in slot order (fp32, no atomics), mixes in the residual MLP and the shared
% -- experts, and rounds to the layer dtype once. Then the loss reduction: one block, a
% -- fixed partition and a fixed tree, so the losses are reproducible bit for bit.
% local moe = import("templates/lib/moe.lua")
% local aux = moe.aux_kind(spec)
% local P = gen.prefix
/* ---- Stage 4: combine and losses ------------------------------------------------------ */

#define COMBINE_THREADS MOEGEN_CUDA_COMBINE_THREADS /* moegen_cuda_abi.h: the runtime launches with it */
% if spec.use_residual or spec.shared.gate then

/* x[t] . v over HIDDEN in fp32, reduced by the block in a fixed order; every thread gets it. */
__device__ float block_dot(const elem_t *x, const float *v, float *scratch) {
    float sum = 0.0f;
    for (int h = threadIdx.x; h < HIDDEN; h += COMBINE_THREADS) sum += elem_to_float(x[h]) * v[h];
    sum = warp_sum(sum);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = sum;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < COMBINE_THREADS / 32; w++) total += scratch[w];
    return total;
}
% end

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) ${P}_combine(const moegen_cuda_args a) {
    const long long t = blockIdx.x;
    const int *row = a.route_row + t * TOP_K;
% if not spec.weight_on_input then
    const float *weight = a.route_final + t * TOP_K;
% end
% if spec.use_residual or spec.shared.gate then
    __shared__ float scratch[COMBINE_THREADS / 32];
    const elem_t *x = (const elem_t *)a.x + t * HIDDEN;
% end
% if spec.use_residual then
    /* Residual MoE coefficients: softmax(x . Wc^T + bc). */
    const float c0 = block_dot(x, a.w.residual_coef_w, scratch) + a.w.residual_coef_b[0];
    const float c1 = block_dot(x, a.w.residual_coef_w + HIDDEN, scratch) + a.w.residual_coef_b[1];
    const float c_max = fmaxf(c0, c1), e0 = expf(c0 - c_max), e1 = expf(c1 - c_max);
    const float moe_coef = e0 / (e0 + e1), mlp_coef = e1 / (e0 + e1);
% end
% if spec.shared.count > 0 and spec.shared.gate then
    const float shared_gate = sigmoid(block_dot(x, a.w.shared_gate, scratch));
% end
    elem_t *y = (elem_t *)a.y + t * HIDDEN;
    for (int h = threadIdx.x; h < HIDDEN; h += COMBINE_THREADS) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < TOP_K; j++) {
            if (row[j] < 0) continue; /* dropped or invalid route */
% if spec.weight_on_input then
            acc += a.expert_out[(long long)row[j] * HIDDEN + h]; /* the weight scaled the input */
% else
            acc += weight[j] * a.expert_out[(long long)row[j] * HIDDEN + h];
% end
        }
% if spec.use_residual then
        acc = acc * moe_coef + a.residual_out[t * HIDDEN + h] * mlp_coef;
% end
% if spec.shared.count > 0 then
        float shared = 0.0f;
        for (int i = 0; i < SHARED_EXPERTS; i++) shared += a.shared_out[((long long)i * a.n_tokens + t) * HIDDEN + h];
%   if spec.shared.gate then
        acc += shared_gate * shared;
%   else
        acc += shared;
%   end
% end
        y[h] = float_to_elem(acc);
    }
}

#define LOSS_THREADS MOEGEN_CUDA_LOSS_THREADS /* moegen_cuda_abi.h */

/* Sum v over the block in a fixed order (thread partition, then a fixed tree). */
__device__ double block_sum(double v, double *scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int stride = LOSS_THREADS / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        __syncthreads();
    }
    const double total = scratch[0];
    __syncthreads();
    return total;
}

/* z loss, aux loss (${aux}) and the dropped-route count. */
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) ${P}_losses(const moegen_cuda_args a) {
    __shared__ double scratch[LOSS_THREADS];
    const long long n_tokens = a.n_tokens;
    double z = 0.0;
    for (long long t = threadIdx.x; t < n_tokens; t += LOSS_THREADS) z += a.lse_squared[t];
    z = block_sum(z, scratch);
% if aux == "none" then
    double aux = 0.0;
% else
    double aux = 0.0;
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += LOSS_THREADS) {
        double prob = 0.0;
        for (long long t = 0; t < n_tokens; t++) prob += a.aux_probs[t * NUM_EXPERTS + e];
%   if aux == "ds_first_choice" then
        aux += (prob / n_tokens) * ((double)a.aux_counts[e] / n_tokens);
%   else
        aux += (prob / n_tokens) * ((double)a.aux_counts[e] / ((double)TOP_K * n_tokens));
%   end
    }
    aux = NUM_EXPERTS * block_sum(aux, scratch);
% end
    long long dropped = 0;
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += LOSS_THREADS) dropped += a.expert_count[e] - a.expert_kept[e];
    dropped = (long long)block_sum((double)dropped, scratch);
    if (threadIdx.x == 0) {
        *a.stat_z_loss = z / n_tokens;
        *a.stat_aux_loss = aux;
        *a.stat_dropped = dropped;
    }
}

