% -- combine.c.tpl — stage 4: y = sum over kept routes (slot order) of weight * expert
% -- output, in fp32, then the residual mix and the shared experts, cast to the layer
% -- dtype once (docs/numerics.md §3). Parallel over tokens; no atomics.
% local moe = import("templates/lib/moe.lua")
% local chunk = 16
% for _, c in ipairs({256, 128, 64, 32}) do
%   if chunk == 16 and spec.hidden_size % c == 0 then chunk = c end
% end
/* ---- Stage 4: combine ------------------------------------------------------------------ */

#define COMBINE_CHUNK ${chunk} /* hidden columns per step; divides HIDDEN */

/* x[t] . v for an fp32 vector v of HIDDEN values, in fp32. */
static __attribute__((unused)) float dot_x_fp32(const elem_t *x, const float *v) {
    float sum = 0.0f;
    for (int64_t h = 0; h < HIDDEN; h++) sum += elem_to_float(x[h]) * v[h];
    return sum;
}

static void run_combine(const forward_state *st, elem_t *y, int n_threads) {
    const int64_t n_tokens = st->n_tokens;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t t = 0; t < n_tokens; t++) {
        const int32_t *row = st->route_row + t * TOP_K;
        const float *weight = st->route_final + t * TOP_K;
% if spec.use_residual then
        /* Residual MoE coefficients: softmax(x . Wc^T + bc). */
        const elem_t *x = st->x + t * HIDDEN;
        float c0 = dot_x_fp32(x, st->w->residual_coef_w) + st->w->residual_coef_b[0];
        float c1 = dot_x_fp32(x, st->w->residual_coef_w + HIDDEN) + st->w->residual_coef_b[1];
        float c_max = c0 > c1 ? c0 : c1;
        float e0 = expf(c0 - c_max), e1 = expf(c1 - c_max);
        const float moe_coef = e0 / (e0 + e1), mlp_coef = e1 / (e0 + e1);
% end
% if spec.shared.count > 0 and spec.shared.gate then
        const float shared_gate = sigmoid(dot_x_fp32(st->x + t * HIDDEN, st->w->shared_gate));
% end
        for (int64_t h0 = 0; h0 < HIDDEN; h0 += COMBINE_CHUNK) {
            float acc[COMBINE_CHUNK];
            for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] = 0.0f;
            for (int j = 0; j < TOP_K; j++) {
                if (row[j] < 0) continue; /* dropped or invalid route */
                const float *o = st->expert_out + (int64_t)row[j] * HIDDEN + h0;
% if spec.weight_on_input then
                (void)weight; /* the weight was applied to the expert's input */
                for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += o[h];
% else
                const float wj = weight[j];
                for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += wj * o[h];
% end
            }
% if spec.use_residual then
            const float *mlp = st->residual_out + t * HIDDEN + h0;
            for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] = acc[h] * moe_coef + mlp[h] * mlp_coef;
% end
% if spec.shared.count > 0 then
            for (int h = 0; h < COMBINE_CHUNK; h++) {
                float shared = 0.0f;
                for (int i = 0; i < SHARED_EXPERTS; i++)
                    shared += st->shared_out[((int64_t)i * n_tokens + t) * HIDDEN + h0 + h];
%   if spec.shared.gate then
                acc[h] += shared_gate * shared;
%   else
                acc[h] += shared;
%   end
            }
% end
            elem_t *dst = y + t * HIDDEN + h0;
            for (int h = 0; h < COMBINE_CHUNK; h++) dst[h] = float_to_elem(acc[h]);
        }
    }
}

