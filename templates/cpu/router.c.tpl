% -- router.c.tpl — stage 1: router logits in fp32, scores, group-limited top-k with
% -- moegen's determinism rules, weights, and the per-block partial sums of the losses
% -- (docs/numerics.md §1 and §4). Parallel over blocks of ROUTER_BLOCK tokens.
% local moe = import("templates/lib/moe.lua")
% local r = spec.router
% local softmax = r.score_function == "softmax"
% local noise = moe.uses_noise(spec)
% local aux = moe.aux_kind(spec)
/* ---- Stage 1: router ------------------------------------------------------------------ */

% include("templates/common/router_scores.c.tpl")

/* Index of the largest candidate score not yet taken, or -1 if every candidate left is
 * -inf (invalid). Strict '>' makes the lower index win ties. */
static inline int argmax_untaken(const float *candidate, const uint8_t *taken, int n) {
    int best = -1;
    for (int e = 0; e < n; e++)
        if (!taken[e] && candidate[e] > -INFINITY && (best < 0 || candidate[e] > candidate[best]))
            best = e;
    return best;
}
% if r.n_group > 1 then

% local group_rule = r.group_score == "max" and "the largest" or "the sum of the top GROUP_TOPM"
/* Group-limited routing: keep the TOPK_GROUP best groups (group score: ${group_rule}
 * selection scores of the group), mask the experts of the others (${r.group_mask}). */
static void limit_groups(float sel[NUM_EXPERTS]) {
    float group_score[N_GROUP];
    for (int g = 0; g < N_GROUP; g++) {
        const float *member = sel + g * EXPERTS_PER_GROUP;
% if r.group_score == "max" then
        float best = -INFINITY;
        for (int i = 0; i < EXPERTS_PER_GROUP; i++)
            if (member[i] > best) best = member[i];
        group_score[g] = best;
% else
        uint8_t taken[EXPERTS_PER_GROUP] = {0};
        float sum = 0.0f;
        int n_valid = 0;
        for (int m = 0; m < GROUP_TOPM; m++) {
            int best = argmax_untaken(member, taken, EXPERTS_PER_GROUP);
            if (best < 0) break;
            taken[best] = 1;
            sum += member[best];
            n_valid++;
        }
        group_score[g] = n_valid > 0 ? sum : -INFINITY;
% end
    }
    uint8_t kept[N_GROUP] = {0};
    for (int n = 0; n < TOPK_GROUP; n++) {
        int best = -1;
        for (int g = 0; g < N_GROUP; g++)
            if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
        kept[best] = 1;
    }
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (!kept[e / EXPERTS_PER_GROUP])
% if r.group_mask == "zero" then
            if (sel[e] > -INFINITY) sel[e] = 0.0f; /* Hugging Face DeepSeek-V3 masking */
% else
            sel[e] = -INFINITY;
% end
}
% end

/* Route one token: top-k experts, router weights, loss partial sums. */
static void route_token(forward_state *st, int64_t t, double *prob_sums, int64_t *counts,
                        double *z_sum) {
    const float *z = st->logits + t * NUM_EXPERTS;
    const int used = !st->used_token || st->used_token[t]; /* 0: a padding token (§9) */
    float score[NUM_EXPERTS], sel[NUM_EXPERTS];
    router_scores(z, score);
% if softmax and r.order == "topk_then_softmax" then
    for (int e = 0; e < NUM_EXPERTS; e++) sel[e] = z[e]; /* select on logits */
% elseif r.score_bias then
    const float *bias = st->w->score_bias; /* selection only */
    for (int e = 0; e < NUM_EXPERTS; e++) sel[e] = z[e] > -INFINITY ? score[e] + bias[e] : -INFINITY;
% else
    for (int e = 0; e < NUM_EXPERTS; e++) sel[e] = z[e] > -INFINITY ? score[e] : -INFINITY;
% end
% if r.n_group > 1 then
    limit_groups(sel);
% end
% if noise then

    /* rsample: Gumbel noise on the logits for the ${spec.top_k == 1 and "choice" or "second choice"} (train mode). */
    float noisy[NUM_EXPERTS];
    for (int e = 0; e < NUM_EXPERTS; e++) {
        float u = rng_uniform(st->rng_offset, RNG_STREAM_GUMBEL, (uint64_t)t * NUM_EXPERTS + e);
        noisy[e] = z[e] > -INFINITY ? z[e] - logf(-logf(u)) : -INFINITY;
    }
% end

    int32_t *ids = st->route_expert + t * TOP_K;
    float *weight = st->route_weight + t * TOP_K;
    uint8_t *valid = st->route_valid + t * TOP_K;
    uint8_t taken[NUM_EXPERTS] = {0};
    for (int j = 0; j < TOP_K; j++) {
% if noise and spec.top_k == 1 then
        int best = argmax_untaken(noisy, taken, NUM_EXPERTS);
% elseif noise then
        int best = argmax_untaken(j == 1 ? noisy : sel, taken, NUM_EXPERTS);
% else
        int best = argmax_untaken(sel, taken, NUM_EXPERTS);
% end
        valid[j] = best >= 0;
        if (best < 0) /* fewer than TOP_K valid experts: lowest unused id, weight 0 */
            for (best = 0; taken[best]; best++) {
            }
        taken[best] = 1;
        ids[j] = best;
    }

    /* Router weights. */
% if softmax and r.order == "topk_then_softmax" then
    float max = -INFINITY;
    for (int j = 0; j < TOP_K; j++)
        if (valid[j] && z[ids[j]] > max) max = z[ids[j]];
    float sum = 0.0f;
    for (int j = 0; j < TOP_K; j++) {
        weight[j] = valid[j] ? expf(z[ids[j]] - max) : 0.0f;
        sum += weight[j];
    }
    for (int j = 0; j < TOP_K; j++) weight[j] = valid[j] ? weight[j] / sum : 0.0f;
% else
    for (int j = 0; j < TOP_K; j++) weight[j] = valid[j] ? score[ids[j]] : 0.0f;
% end
% if r.norm_topk_prob then
    float weight_sum = 0.0f;
    for (int j = 0; j < TOP_K; j++) weight_sum += weight[j];
    weight_sum = weight_sum > WEIGHT_SUM_EPS ? weight_sum : WEIGHT_SUM_EPS;
    for (int j = 0; j < TOP_K; j++) weight[j] /= weight_sum;
% end
% if r.routed_scaling_factor ~= 1 then
    for (int j = 0; j < TOP_K; j++) weight[j] *= ROUTED_SCALING_FACTOR;
% end
% if aux ~= "none" then

    /* Load-balancing loss partial sums (${aux}). */
%   if softmax then
    const float *prob = score; /* softmax over all experts */
%   elseif aux == "ds_first_choice" then
    float prob[NUM_EXPERTS];
    router_softmax(z, prob);
%   else
    float prob[NUM_EXPERTS]; /* scores normalized to sum 1 */
    float score_sum = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) score_sum += z[e] > -INFINITY ? score[e] : 0.0f;
    score_sum = score_sum > WEIGHT_SUM_EPS ? score_sum : WEIGHT_SUM_EPS;
    for (int e = 0; e < NUM_EXPERTS; e++) prob[e] = z[e] > -INFINITY ? score[e] / score_sum : 0.0f;
%   end
    for (int e = 0; e < NUM_EXPERTS; e++) prob_sums[e] += prob[e];
%   if aux == "ds_first_choice" then
    if (used && valid[0]) counts[ids[0]]++; /* first choices of used tokens */
%   else
    float plain[NUM_EXPERTS]; /* plain top-k: no group limit, bias, capacity or noise */
    uint8_t plain_taken[NUM_EXPERTS] = {0};
    for (int e = 0; e < NUM_EXPERTS; e++) plain[e] = z[e] > -INFINITY ? prob[e] : -INFINITY;
    for (int j = 0; used && j < TOP_K; j++) { /* used tokens only */
        int best = argmax_untaken(plain, plain_taken, NUM_EXPERTS);
        if (best < 0) break;
        plain_taken[best] = 1;
        counts[best]++;
    }
%   end
% else
    (void)prob_sums;
    (void)counts;
% end

    /* z-loss partial sum: logsumexp over valid logits, squared. */
    float z_max = -INFINITY;
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (z[e] > z_max) z_max = z[e];
    if (z_max > -INFINITY) {
        float exp_sum = 0.0f;
        for (int e = 0; e < NUM_EXPERTS; e++) exp_sum += expf(z[e] - z_max);
        double lse = (double)z_max + log((double)exp_sum);
        *z_sum += lse * lse;
    }

    /* A padding token keeps its ids and router weights but is never counted or dispatched. */
    if (!used)
        for (int j = 0; j < TOP_K; j++) valid[j] = 0;
}

/* Router for tokens [block * ROUTER_BLOCK, ...): fp32 input, logits, routing. */
static void route_block(forward_state *st, int64_t block) {
    const int64_t t0 = block * ROUTER_BLOCK;
    const int64_t t1 = min_i64(t0 + ROUTER_BLOCK, st->n_tokens);
    const moegen_kernel_weights *w = st->w;

    for (int64_t t = t0; t < t1; t++) {
        const elem_t *src = st->x + t * HIDDEN;
        float *dst = st->router_input + t * HIDDEN;
% if moe.uses_jitter(spec) then
        /* Input jitter (train mode): x * U(1 - eps, 1 + eps), router input only. */
        for (int64_t h = 0; h < HIDDEN; h++) {
            float u = rng_uniform(st->rng_offset, RNG_STREAM_JITTER, (uint64_t)t * HIDDEN + h);
            dst[h] = elem_to_float(src[h]) * ((1.0f - INPUT_JITTER) + u * (2.0f * INPUT_JITTER));
        }
% else
        for (int64_t h = 0; h < HIDDEN; h++) dst[h] = elem_to_float(src[h]);
% end
    }

    /* Logits: up to TILE_ROWS tokens x TILE_COLS experts per micro-kernel call; a tile
     * that overhangs the experts repeats the last one and drops those results. */
    for (int64_t t = t0; t < t1; t += TILE_ROWS) {
        const int rows = (int)min_i64(TILE_ROWS, t1 - t);
        const float *a[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; i++) a[i] = st->router_input + tile_row(t, i, t1) * HIDDEN;
        for (int e = 0; e < NUM_EXPERTS; e += TILE_COLS) {
            const int e_next = e + TILE_COLS < NUM_EXPERTS ? e + TILE_COLS : 0; /* the next tile's */
            const float *b[TILE_COLS], *next[TILE_COLS];
            for (int j = 0; j < TILE_COLS; j++) {
                b[j] = w->router_w + tile_row(e, j, NUM_EXPERTS) * HIDDEN;
                next[j] = w->router_w + tile_row(e_next, j, NUM_EXPERTS) * HIDDEN;
            }
            float out[TILE_ROWS][TILE_COLS];
            ${moe.dot_name("float", "float", spec.hidden_size)}(rows, a, b, next, out);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < TILE_COLS && e + j < NUM_EXPERTS; j++) {
% if r.router_bias then
                    float logit = out[i][j] + w->router_b[e + j];
% else
                    float logit = out[i][j];
% end
                    if (isnan(logit)) logit = -INFINITY; /* NaN counts as -inf */
                    if (logit == INFINITY) logit = FLT_MAX; /* +inf: largest finite */
                    st->logits[(t + i) * NUM_EXPERTS + e + j] = logit;
                }
        }
    }

    double *prob_sums = st->block_prob_sums + block * NUM_EXPERTS;
    int64_t *counts = st->block_counts + block * NUM_EXPERTS;
    double z_sum = 0.0;
    for (int e = 0; e < NUM_EXPERTS; e++) {
        prob_sums[e] = 0.0;
        counts[e] = 0;
    }
    for (int64_t t = t0; t < t1; t++) route_token(st, t, prob_sums, counts, &z_sum);
    st->block_z_sums[block] = z_sum;
}

/* Stage 1 entry: route every token, then reduce the loss partial sums in block order
 * (the result does not depend on the thread count). */
static void run_router(forward_state *st, int n_threads) {
    const int64_t n_blocks = st->n_router_blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t block = 0; block < n_blocks; block++) route_block(st, block);

    const double n_tokens = (double)st->n_tokens;
    double z_total = 0.0;
    for (int64_t block = 0; block < n_blocks; block++) z_total += st->block_z_sums[block];
    st->z_loss = z_total / n_tokens;
% if aux == "none" then
    st->aux_loss = 0.0;
% else
    double loss = 0.0;
    for (int e = 0; e < NUM_EXPERTS; e++) {
        double prob_total = 0.0;
        int64_t count_total = 0;
        for (int64_t block = 0; block < n_blocks; block++) {
            prob_total += st->block_prob_sums[block * NUM_EXPERTS + e];
            count_total += st->block_counts[block * NUM_EXPERTS + e];
        }
%   if aux == "ds_first_choice" then
        loss += (prob_total / n_tokens) * ((double)count_total / n_tokens);
%   else
        loss += (prob_total / n_tokens) * ((double)count_total / (TOP_K * n_tokens));
%   end
    }
    st->aux_loss = NUM_EXPERTS * loss;
% end
}

