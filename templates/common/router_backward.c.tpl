% -- router_backward.c.tpl — the router's backward for one token (docs/numerics.md §8.2 steps
% -- 5-9): from d loss / d combine weights through capacity renormalization, scaling,
% -- norm_topk_prob, the score function in either order, and the load-balancing and z losses,
% -- to d loss / d logits. One home for both backends: the CPU backward calls it per token, the
% -- CUDA backward per token in one thread. The includer defines TOKEN_FN and includes
% -- router_scores.c.tpl first.
% local moe = import("templates/lib/moe.lua")
% local r = spec.router
% local softmax = r.score_function == "softmax"
% local aux = moe.aux_kind(spec)
/* One token's d loss / d logits (numerics §8.2 steps 5-9) into dz[NUM_EXPERTS], from:
 *   z         its sanitized logits [NUM_EXPERTS];
 *   ids, valid, row, weight  its routes [TOP_K]: expert, valid, row (-1: dropped, invalid or
 *             a padding token) and router weight (after norm and scaling, before capacity);
 *   dw_final  d loss / d combine weight [TOP_K];
 *   aux_grad  aux_coeff * d aux / d p[t][e] (the same for every token);
 *   z_coeff, n_tokens  the z-loss coefficient and the token count it averages over. */
TOKEN_FN void router_backward_token(const float *z, const int *ids, const unsigned char *valid, const int *row,
                                    const float *weight, const float *dw_final, const float *aux_grad,
                                    float z_coeff, long long n_tokens, float *dz) {
    float s[NUM_EXPERTS], ds[NUM_EXPERTS];
    router_scores(z, s);
    for (int e = 0; e < NUM_EXPERTS; e++) ds[e] = dz[e] = 0.0f;

    /* Capacity: the final weights from the router weights (§8.2.5). */
    float dw[TOP_K];
% if spec.capacity.renormalize then
    float kept_sum = 0.0f, kept_dot = 0.0f;
    for (int j = 0; j < TOP_K; j++)
        if (row[j] >= 0) {
            kept_sum += weight[j];
            kept_dot += dw_final[j] * weight[j];
        }
    const float kept_norm = kept_sum > WEIGHT_SUM_EPS ? kept_sum : WEIGHT_SUM_EPS;
    const float kept_mean = kept_sum > WEIGHT_SUM_EPS ? kept_dot / kept_norm : 0.0f;
    for (int j = 0; j < TOP_K; j++)
        dw[j] = row[j] >= 0 ? ROUTED_SCALING_FACTOR / kept_norm * (dw_final[j] - kept_mean) : 0.0f;
% else
    (void)weight; /* no renormalization after drops */
    for (int j = 0; j < TOP_K; j++) dw[j] = row[j] >= 0 ? dw_final[j] : 0.0f;
% end
% if r.routed_scaling_factor ~= 1 then
    for (int j = 0; j < TOP_K; j++) dw[j] *= ROUTED_SCALING_FACTOR; /* routed_scaling_factor */
% end

    /* The router weights from the scores (§8.2.6). */
% local need_v = r.norm_topk_prob or (softmax and r.order == "topk_then_softmax")
% if need_v then
    float v[TOP_K]; /* the weights before norm_topk_prob */
% if softmax and r.order == "topk_then_softmax" then
    float v_max = -INFINITY, v_sum = 0.0f;
    for (int j = 0; j < TOP_K; j++)
        if (valid[j] && z[ids[j]] > v_max) v_max = z[ids[j]];
    for (int j = 0; j < TOP_K; j++) {
        v[j] = valid[j] ? expf(z[ids[j]] - v_max) : 0.0f;
        v_sum += v[j];
    }
    for (int j = 0; j < TOP_K; j++) v[j] = valid[j] ? v[j] / v_sum : 0.0f;
% else
    for (int j = 0; j < TOP_K; j++) v[j] = valid[j] ? s[ids[j]] : 0.0f;
% end
% end
    float dv[TOP_K];
% if r.norm_topk_prob then
    float v_total = 0.0f;
    for (int j = 0; j < TOP_K; j++) v_total += v[j];
    const float v_norm = v_total > WEIGHT_SUM_EPS ? v_total : WEIGHT_SUM_EPS;
    float w_dot = 0.0f;
    for (int j = 0; j < TOP_K; j++) w_dot += dw[j] * (v[j] / v_norm);
    if (!(v_total > WEIGHT_SUM_EPS)) w_dot = 0.0f;
    for (int j = 0; j < TOP_K; j++) dv[j] = valid[j] ? (dw[j] - w_dot) / v_norm : 0.0f;
% else
    for (int j = 0; j < TOP_K; j++) dv[j] = valid[j] ? dw[j] : 0.0f;
% end
% if softmax and r.order == "topk_then_softmax" then
    float v_dot = 0.0f;
    for (int j = 0; j < TOP_K; j++) v_dot += v[j] * dv[j];
    for (int j = 0; j < TOP_K; j++)
        if (valid[j]) dz[ids[j]] += v[j] * (dv[j] - v_dot);
% else
    for (int j = 0; j < TOP_K; j++)
        if (valid[j]) ds[ids[j]] += dv[j];
% end
% if aux ~= "none" then

    /* Load-balancing loss (§8.2.7). */
%   if softmax or aux == "ds_first_choice" then
%     if softmax then
    const float *p = s; /* softmax over all experts */
%     else
    float p[NUM_EXPERTS];
    router_softmax(z, p);
%     end
    float p_dot = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) p_dot += p[e] * aux_grad[e];
    for (int e = 0; e < NUM_EXPERTS; e++) dz[e] += p[e] * (aux_grad[e] - p_dot);
%   else
    float s_total = 0.0f; /* p = s / max(sum s, 1e-20) */
    for (int e = 0; e < NUM_EXPERTS; e++) s_total += z[e] > -INFINITY ? s[e] : 0.0f;
    const float s_norm = s_total > WEIGHT_SUM_EPS ? s_total : WEIGHT_SUM_EPS;
    float p_dot = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) p_dot += z[e] > -INFINITY ? aux_grad[e] * (s[e] / s_norm) : 0.0f;
    if (!(s_total > WEIGHT_SUM_EPS)) p_dot = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (z[e] > -INFINITY) ds[e] += (aux_grad[e] - p_dot) / s_norm;
%   end
% else
    (void)aux_grad;
% end

    /* z-loss (§8.2.8): z_coeff * 2 lse softmax / S. */
    if (z_coeff != 0.0f) {
        float z_max = -INFINITY;
        for (int e = 0; e < NUM_EXPERTS; e++)
            if (z[e] > z_max) z_max = z[e];
        if (z_max > -INFINITY) {
            float exp_sum = 0.0f;
            for (int e = 0; e < NUM_EXPERTS; e++) exp_sum += expf(z[e] - z_max);
            const float lse = (float)((double)z_max + log((double)exp_sum));
            const float scale = z_coeff * 2.0f * lse / (float)n_tokens;
            for (int e = 0; e < NUM_EXPERTS; e++) dz[e] += scale * (expf(z[e] - z_max) / exp_sum);
        }
    }

    /* Scores to logits (§8.2.9); logits that were not finite pass nothing. */
% if softmax then
    float s_dot = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) s_dot += s[e] * ds[e];
    for (int e = 0; e < NUM_EXPERTS; e++) dz[e] += s[e] * (ds[e] - s_dot);
% elseif r.score_function == "sigmoid" then
    for (int e = 0; e < NUM_EXPERTS; e++) dz[e] += ds[e] * s[e] * (1.0f - s[e]);
% else
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (s[e] > 0.0f) dz[e] += ds[e] * sigmoid(z[e]) / (2.0f * s[e]);
% end
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (!(z[e] > -INFINITY && z[e] < FLT_MAX)) dz[e] = 0.0f;
}

/* aux_coeff * d aux / d p[t][e] for an expert the loss counted `count` routes of (the same
 * for every token; numerics §8.2.7). */
TOKEN_FN float aux_gradient_of(double aux_coeff, long long count, long long n_tokens) {
% if aux == "none" then
    (void)aux_coeff;
    (void)count;
    (void)n_tokens;
    return 0.0f;
% else
    const double n = (double)n_tokens;
%   if aux == "ds_first_choice" then
    return (float)(aux_coeff * NUM_EXPERTS * (double)count / (n * n));
%   else
    return (float)(aux_coeff * NUM_EXPERTS * (double)count / ((double)TOP_K * n * n));
%   end
% end
}
