/* reference.c — the independent MoE forward: plain loops in double precision.
 *
 * Place in the pipeline: outside it. Generated kernels (every backend) are checked
 * against this file, so it is written from docs/numerics.md and
 * docs/numerics.md alone and shares no code with gen/ or templates/: it only
 * reads the validated `moegen_spec` fields and the tensor layouts of
 * templates/common/moegen_kernel_abi.h. Comments cite the rules as "§1.4"
 * (numerics.md section 1, rule 4).
 *
 * The forward runs in three passes, each a plain loop:
 *   1. every token: widen x, jitter the router input, logits, sanitize, scores,
 *      group limit, top-k, router weights, decision margin, loss statistics;
 *   2. every expert: rank its routes by the capacity priority, keep the first C
 *      (routes of tokens masked by used_token take no part, §9; forced_kept, when
 *      given, replaces the ranking); then every token: final (renormalized) combine
 *      weights;
 *   3. every token in the mask: experts, combine, residual MLP, shared experts.
 * Everything is double. The only deliberate fp32 step is the DeepSpeed capacity
 * formula (§2.1), which the contract states in fp32; and logits are clamped to the
 * fp32 range the way an fp32 router would overflow (see moe_ref_sanitize_logit).
 * Clarity beats speed, but nothing is wasteful: weights are widened on the fly (a
 * 65536-entry table for fp16 / bf16), never copied whole, so huge specs can be
 * checked on a sample of tokens through the token mask.
 *
 * The backward (reference_backward.c) runs passes 1 and 2 through
 * moe_ref_forward_decisions (reference_internal.h) to see the same decisions.
 */
#include "reference.h"
#include "reference_internal.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REFERENCE_WHY_BYTES 256
#define WEIGHT_SUM_FLOOR 1e-20 /* §1.9, §2.4: sums are clamped below by this */

/* ---- exact widening of stored 16-bit floats ------------------------------------------ */

/* Exact value of IEEE binary16 bits: subnormals, signed zeros, infinities, NaN. */
double moe_ref_half_to_double(uint16_t bits) {
    int negative = (bits >> 15) & 1;
    int exponent = (bits >> 10) & 0x1f;
    int mantissa = bits & 0x3ff;
    double magnitude;
    if (exponent == 0x1f)
        magnitude = mantissa ? NAN : INFINITY;
    else if (exponent == 0) /* zero or subnormal: mantissa * 2^-24 */
        magnitude = ldexp((double)mantissa, -24);
    else /* normal: (1024 + mantissa) * 2^(exponent - 15 - 10) */
        magnitude = ldexp((double)(1024 + mantissa), exponent - 25);
    return negative ? -magnitude : magnitude;
}

/* Exact value of bfloat16 bits (the top half of an fp32), every class included. */
double moe_ref_bf16_to_double(uint16_t bits) {
    int negative = (bits >> 15) & 1;
    int exponent = (bits >> 7) & 0xff;
    int mantissa = bits & 0x7f;
    double magnitude;
    if (exponent == 0xff)
        magnitude = mantissa ? NAN : INFINITY;
    else if (exponent == 0) /* zero or subnormal: mantissa * 2^-133 */
        magnitude = ldexp((double)mantissa, -133);
    else /* normal: (128 + mantissa) * 2^(exponent - 127 - 7) */
        magnitude = ldexp((double)(128 + mantissa), exponent - 134);
    return negative ? -magnitude : magnitude;
}

/* ---- the counter-based RNG (§5) -------------------------------------------------------- */

static uint64_t rng_mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* u(seed, offset, stream, index) of §5: an odd multiple of 2^-24 in (0, 1). */
double moe_ref_uniform(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t index) {
    uint64_t r = rng_mix(seed ^ rng_mix(offset ^ rng_mix(stream ^ rng_mix(index))));
    uint64_t odd = (r >> 41) * 2 + 1; /* odd, in [1, 2^24 - 1] */
    return ldexp((double)odd, -24);
}

enum { STREAM_JITTER = 1, STREAM_GUMBEL = 2, STREAM_PRIORITY = 3 };

/* ---- reading tensors in the layer dtype -------------------------------------------------- */

typedef struct tensor_reader {
    moegen_dtype dtype;
    const double *half_table; /* widened value of every 16-bit pattern; NULL for fp32 */
} tensor_reader;

static double read_element(const tensor_reader *reader, const void *base, int64_t index) {
    if (reader->dtype == MOEGEN_DTYPE_FP32)
        return ((const float *)base)[index];
    return reader->half_table[((const uint16_t *)base)[index]];
}

/* sum_i base[offset + i] * vector[i], left to right. */
static double dot_with_row(const tensor_reader *reader, const void *base, int64_t offset,
                           const double *vector, int64_t length) {
    double sum = 0.0;
    if (reader->dtype == MOEGEN_DTYPE_FP32) {
        const float *row = (const float *)base + offset;
        for (int64_t i = 0; i < length; i++)
            sum += (double)row[i] * vector[i];
    } else {
        const uint16_t *row = (const uint16_t *)base + offset;
        const double *table = reader->half_table;
        for (int64_t i = 0; i < length; i++)
            sum += table[row[i]] * vector[i];
    }
    return sum;
}

static double dot_fp32(const float *row, const double *vector, int64_t length) {
    double sum = 0.0;
    for (int64_t i = 0; i < length; i++)
        sum += (double)row[i] * vector[i];
    return sum;
}

/* ---- activations and the expert MLP (§3.1, §3.3) ---------------------------------------------- */

static int activation_is_gated(moegen_activation activation) {
    return activation == MOEGEN_ACT_SWIGLU || activation == MOEGEN_ACT_GEGLU;
}

static double gelu_exact(double v) { return 0.5 * v * (1.0 + erf(v / sqrt(2.0))); }

static double silu(double v) { return v / (1.0 + exp(-v)); }

/* The plain activation, or the gate's activation for a gated one. NaN propagates. */
static double activate(moegen_activation activation, double v) {
    switch (activation) {
    case MOEGEN_ACT_RELU:
        return v < 0.0 ? 0.0 : v;
    case MOEGEN_ACT_GELU:
    case MOEGEN_ACT_GEGLU:
        return gelu_exact(v);
    case MOEGEN_ACT_GELU_TANH: {
        const double c = sqrt(2.0 / 3.14159265358979323846); /* sqrt(2 / pi) */
        return 0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v)));
    }
    case MOEGEN_ACT_SILU:
    case MOEGEN_ACT_SWIGLU:
        return silu(v);
    }
    return NAN;
}

/* One MLP with the expert's shape: w1 [F1][H], b1 [F1], w2 [H][F], b2 [H] (biases may
 * be NULL), each pointer already advanced to this MLP's slice. */
typedef struct mlp_view {
    const void *w1, *b1, *w2, *b2;
    int64_t ffn; /* F */
} mlp_view;

typedef struct mlp_scratch {
    double *pre;    /* [F1] */
    double *hidden; /* [F] */
} mlp_scratch;

/* out[H] = W2 h (+ b2), h = act(W1 in (+ b1)) or act(gate) * up for gated ones. */
static void mlp_forward(const tensor_reader *reader, const mlp_view *mlp, moegen_activation activation,
                        int64_t hidden_size, const double *input, mlp_scratch *scratch, double *out) {
    int gated = activation_is_gated(activation);
    int64_t ffn = mlp->ffn, ffn_rows = gated ? 2 * ffn : ffn;
    for (int64_t row = 0; row < ffn_rows; row++) {
        scratch->pre[row] = dot_with_row(reader, mlp->w1, row * hidden_size, input, hidden_size);
        if (mlp->b1)
            scratch->pre[row] += read_element(reader, mlp->b1, row);
    }
    for (int64_t i = 0; i < ffn; i++)
        scratch->hidden[i] = gated ? activate(activation, scratch->pre[i]) * scratch->pre[ffn + i]
                                   : activate(activation, scratch->pre[i]);
    for (int64_t h = 0; h < hidden_size; h++) {
        out[h] = dot_with_row(reader, mlp->w2, h * ffn, scratch->hidden, ffn);
        if (mlp->b2)
            out[h] += read_element(reader, mlp->b2, h);
    }
}

/* ---- router: logits and scores (§1.2-§1.4) ---------------------------------------------------- */

/* §1.3 on a double logit. The reference sums in double, where an fp32 router would
 * overflow: a value that rounds to +-inf in fp32 is treated as that infinity (so +
 * becomes the largest float and - becomes invalid), and one beyond the largest float
 * that still rounds to it is clamped to it. Inside the fp32 range nothing changes. */
double moe_ref_sanitize_logit(double z) {
    const double fp32_overflow = 0x1.ffffffp127; /* halfway past FLT_MAX: rounds to inf */
    if (isnan(z))
        return -INFINITY;
    if (z > FLT_MAX)
        return FLT_MAX;
    if (z <= -fp32_overflow)
        return -INFINITY;
    if (z < -FLT_MAX)
        return -FLT_MAX;
    return z;
}

static int logit_is_valid(double z) { return z != -INFINITY; }

/* Softmax with max subtraction over the valid entries; invalid give 0, and a row
 * with no valid entry gives all 0. */
static void softmax_valid(const double *z, int n, double *out) {
    double max_value = -INFINITY, sum = 0.0;
    for (int e = 0; e < n; e++)
        if (logit_is_valid(z[e]) && z[e] > max_value)
            max_value = z[e];
    for (int e = 0; e < n; e++) {
        out[e] = logit_is_valid(z[e]) ? exp(z[e] - max_value) : 0.0;
        sum += out[e];
    }
    for (int e = 0; e < n; e++)
        out[e] = sum > 0.0 ? out[e] / sum : 0.0;
}

/* logsumexp over the valid entries; -INFINITY when there is none. */
static double logsumexp_valid(const double *z, int n) {
    double max_value = -INFINITY, sum = 0.0;
    for (int e = 0; e < n; e++)
        if (logit_is_valid(z[e]) && z[e] > max_value)
            max_value = z[e];
    if (max_value == -INFINITY)
        return -INFINITY;
    for (int e = 0; e < n; e++)
        if (logit_is_valid(z[e]))
            sum += exp(z[e] - max_value);
    return max_value + log(sum);
}

/* §1.4: scores s of the router's score function. */
static void compute_scores(moegen_score_fn function, const double *z, int n, double *s) {
    if (function == MOEGEN_SCORE_SOFTMAX) {
        softmax_valid(z, n, s);
        return;
    }
    for (int e = 0; e < n; e++) {
        if (!logit_is_valid(z[e]))
            s[e] = 0.0;
        else if (function == MOEGEN_SCORE_SIGMOID)
            s[e] = 1.0 / (1.0 + exp(-z[e]));
        else /* sqrtsoftplus; softplus(z) = max(z, 0) + log1p(exp(-|z|)) never overflows */
            s[e] = sqrt(fmax(z[e], 0.0) + log1p(exp(-fabs(z[e]))));
    }
}

/* ---- router: selection (§1.5-§1.9) ---------------------------------------------------------- */

typedef struct router_scratch {
    double *scores;        /* [E] s */
    double *selection;     /* [E] sel, after the group mask */
    double *noisy;         /* [E] z + gumbel */
    double *probabilities; /* [E] p for the aux loss */
    double *group_scores;  /* [G] */
    unsigned char *candidate; /* [E] valid logit and not masked to -inf by the group step */
    unsigned char *chosen;    /* [E] */
    unsigned char *valid;     /* [E] valid logit */
    unsigned char *group_kept;     /* [G] */
    unsigned char *group_has_valid; /* [G] */
} router_scratch;

/* Index of the largest key among allowed entries not yet taken (ties: the lower
 * index), or -1 when none is left. */
static int best_remaining(const double *key, const unsigned char *allowed, const unsigned char *taken,
                          int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (allowed[i] && !taken[i] && (best < 0 || key[i] > key[best]))
            best = i;
    return best;
}

/* Records one decision's gap between the last selected and the best rejected
 * candidate (0 for an exact tie), keeping the smallest in *margin. */
static void note_decision(double last_selected, double best_rejected, double *margin) {
    double gap = last_selected == best_rejected ? 0.0 : last_selected - best_rejected;
    if (gap < *margin)
        *margin = gap;
}

/* §1.7: group-limited routing on sel; masks the experts of dropped groups in place. */
static void limit_to_groups(const moegen_router_spec *router, int n_experts, router_scratch *scratch,
                            double *margin) {
    int n_groups = router->n_group, group_size = n_experts / n_groups;
    double *sel = scratch->selection;
    for (int g = 0; g < n_groups; g++) {
        int first = g * group_size;
        double score = -INFINITY;
        int n_valid = 0;
        for (int e = first; e < first + group_size; e++)
            n_valid += scratch->valid[e];
        if (n_valid > 0 && router->group_score == MOEGEN_GROUP_SCORE_MAX) {
            for (int e = first; e < first + group_size; e++)
                if (scratch->valid[e] && (score == -INFINITY || sel[e] > score))
                    score = sel[e];
        } else if (n_valid > 0) { /* topm_sum: the group_topm largest valid sel values */
            int terms = router->group_topm < n_valid ? router->group_topm : n_valid;
            score = 0.0;
            memset(scratch->chosen + first, 0, (size_t)group_size);
            for (int r = 0; r < terms; r++) {
                int best = best_remaining(sel + first, scratch->valid + first, scratch->chosen + first,
                                          group_size);
                scratch->chosen[first + best] = 1;
                score += sel[first + best];
            }
            memset(scratch->chosen + first, 0, (size_t)group_size);
        }
        scratch->group_scores[g] = score;
        scratch->group_has_valid[g] = n_valid > 0;
    }

    unsigned char all_groups[MOEGEN_MAX_EXPERTS];
    memset(all_groups, 1, (size_t)n_groups);
    memset(scratch->group_kept, 0, (size_t)n_groups);
    int last_kept = -1;
    for (int r = 0; r < router->topk_group && r < n_groups; r++) {
        last_kept = best_remaining(scratch->group_scores, all_groups, scratch->group_kept, n_groups);
        scratch->group_kept[last_kept] = 1;
    }
    int rejected = best_remaining(scratch->group_scores, scratch->group_has_valid, scratch->group_kept,
                                  n_groups);
    if (last_kept >= 0 && rejected >= 0)
        note_decision(scratch->group_scores[last_kept], scratch->group_scores[rejected], margin);

    for (int e = 0; e < n_experts; e++) {
        if (scratch->group_kept[e / group_size])
            continue;
        if (router->group_mask == MOEGEN_GROUP_MASK_NEG_INF) {
            sel[e] = -INFINITY;
            scratch->candidate[e] = 0;
        } else if (scratch->valid[e]) {
            sel[e] = 0.0; /* zero mask: the expert stays a candidate */
        }
    }
}


/* Routes one token from its sanitized logits z[E] (§1.5-§1.9): fills ids[k]
 * (selection order, invalid routes last) and router_weights[k] (0 for invalid
 * routes), lowers *margin, copies the selection keys into selection_out[E], and
 * returns the number of valid routes. score_bias is
 * read only for sigmoid / sqrtsoftplus with router.score_bias. */
static int route_token(const moegen_spec *spec, const float *score_bias, int train, uint64_t rng_offset,
                       int64_t token, const double *z, router_scratch *scratch, int32_t *ids,
                       double *router_weights, double *margin, double *selection_out) {
    const moegen_router_spec *router = &spec->router;
    int n_experts = spec->num_experts, top_k = spec->top_k;
    int softmax = router->score_function == MOEGEN_SCORE_SOFTMAX;
    int topk_then_softmax = softmax && router->order == MOEGEN_ORDER_TOPK_THEN_SOFTMAX;
    double *sel = scratch->selection;

    compute_scores(router->score_function, z, n_experts, scratch->scores);
    for (int e = 0; e < n_experts; e++) { /* §1.5 */
        scratch->valid[e] = (unsigned char)logit_is_valid(z[e]);
        scratch->candidate[e] = scratch->valid[e];
        if (!scratch->valid[e])
            sel[e] = -INFINITY;
        else if (topk_then_softmax)
            sel[e] = z[e];
        else if (!softmax && router->score_bias)
            sel[e] = scratch->scores[e] + (double)score_bias[e];
        else
            sel[e] = scratch->scores[e];
        if (isnan(sel[e])) /* only a NaN score_bias gets here */
            sel[e] = -INFINITY;
    }
    if (router->n_group > 1)
        limit_to_groups(router, n_experts, scratch, margin);
    memcpy(selection_out, sel, (size_t)n_experts * sizeof *sel); /* the keys the picks compare */

    /* §1.6: rsample noise. The noisy choice ranks the same candidates as the clean
     * one (those the group step left) by z + gumbel. */
    int noisy = train && router->noise == MOEGEN_NOISE_RSAMPLE && softmax && top_k <= 2;
    if (noisy)
        for (int e = 0; e < n_experts; e++) {
            double u = moe_ref_uniform(router->seed, rng_offset, STREAM_GUMBEL,
                                       (uint64_t)token * (uint64_t)n_experts + (uint64_t)e);
            scratch->noisy[e] = z[e] - log(-log(u));
        }

    /* §1.8: top-k. Without noise the k picks are one decision (last selected vs
     * best rejected) plus the order of the picks (each pick vs the next: the slot order
     * is part of the result); with noise every slot is its own decision. */
    memset(scratch->chosen, 0, (size_t)n_experts);
    int n_valid = 0;
    for (int j = 0; j < top_k; j++) {
        const double *key = noisy && (top_k == 1 || j == 1) ? scratch->noisy : sel;
        int e = best_remaining(key, scratch->candidate, scratch->chosen, n_experts);
        if (e < 0)
            break;
        scratch->chosen[e] = 1;
        ids[j] = e;
        n_valid++;
        if (!noisy && j > 0) /* the order of two picks */
            note_decision(key[ids[j - 1]], key[e], margin);
        if (noisy || j == top_k - 1) {
            int rejected = best_remaining(key, scratch->candidate, scratch->chosen, n_experts);
            if (rejected >= 0)
                note_decision(key[e], key[rejected], margin);
        }
    }
    for (int j = n_valid, e = 0; j < top_k; j++) { /* invalid routes: lowest unused ids */
        while (scratch->chosen[e])
            e++;
        scratch->chosen[e] = 1;
        ids[j] = e;
    }

    /* §1.9: router weights. */
    for (int j = 0; j < top_k; j++)
        router_weights[j] = j < n_valid ? scratch->scores[ids[j]] : 0.0;
    if (topk_then_softmax && n_valid > 0) {
        double max_logit = -INFINITY, sum = 0.0;
        for (int j = 0; j < n_valid; j++)
            max_logit = fmax(max_logit, z[ids[j]]);
        for (int j = 0; j < n_valid; j++) {
            router_weights[j] = exp(z[ids[j]] - max_logit);
            sum += router_weights[j];
        }
        for (int j = 0; j < n_valid; j++)
            router_weights[j] /= sum;
    }
    if (router->norm_topk_prob) {
        double sum = 0.0;
        for (int j = 0; j < n_valid; j++)
            sum += router_weights[j];
        for (int j = 0; j < n_valid; j++)
            router_weights[j] /= fmax(sum, WEIGHT_SUM_FLOOR);
    }
    for (int j = 0; j < n_valid; j++)
        router_weights[j] *= router->routed_scaling_factor;
    return n_valid;
}

/* ---- auxiliary losses (§4) ---------------------------------------------------------------- */

typedef struct loss_sums {
    double *probability_sums; /* [E] sum_t p[t][e] */
    int64_t *balance_counts;  /* [E] c (megatron) or c1 (deepspeed k <= 2) */
    double z_loss_sum;
} loss_sums;

static int uses_first_choice_counts(const moegen_spec *spec) {
    return spec->router.aux_loss == MOEGEN_AUX_DEEPSPEED && spec->top_k <= 2;
}

/* Adds one token to the loss sums. first_choice: the token's valid first expert
 * from its own routing, or -1. counted: 0 for a token masked out by used_token (§9):
 * its scores still enter the means P_e, but it adds nothing to the counts c / c1. */
static void accumulate_losses(const moegen_spec *spec, const double *z, int first_choice, int counted,
                              router_scratch *scratch, loss_sums *sums) {
    int n_experts = spec->num_experts;
    double lse = logsumexp_valid(z, n_experts);
    if (lse != -INFINITY)
        sums->z_loss_sum += lse * lse;
    if (spec->router.aux_loss == MOEGEN_AUX_NONE)
        return;

    double *p = scratch->probabilities;
    if (uses_first_choice_counts(spec) || spec->router.score_function == MOEGEN_SCORE_SOFTMAX) {
        softmax_valid(z, n_experts, p);
    } else {
        double sum = 0.0;
        compute_scores(spec->router.score_function, z, n_experts, p);
        for (int e = 0; e < n_experts; e++)
            sum += p[e];
        for (int e = 0; e < n_experts; e++)
            p[e] /= fmax(sum, WEIGHT_SUM_FLOOR);
    }
    for (int e = 0; e < n_experts; e++)
        sums->probability_sums[e] += p[e];
    if (!counted)
        return;

    if (uses_first_choice_counts(spec)) {
        if (first_choice >= 0)
            sums->balance_counts[first_choice]++;
        return;
    }
    /* plain top-k on p over valid entries: no groups, bias, capacity or noise */
    for (int e = 0; e < n_experts; e++)
        scratch->valid[e] = (unsigned char)logit_is_valid(z[e]);
    memset(scratch->chosen, 0, (size_t)n_experts);
    for (int j = 0; j < spec->top_k; j++) {
        int e = best_remaining(p, scratch->valid, scratch->chosen, n_experts);
        if (e < 0)
            break;
        scratch->chosen[e] = 1;
        sums->balance_counts[e]++;
    }
}

static void finish_losses(const moegen_spec *spec, int64_t n_tokens, const loss_sums *sums,
                          moe_ref_result *res) {
    res->aux_loss = 0.0;
    res->z_loss = 0.0;
    if (n_tokens == 0)
        return;
    double tokens = (double)n_tokens;
    res->z_loss = sums->z_loss_sum / tokens;
    if (spec->router.aux_loss == MOEGEN_AUX_NONE)
        return;
    double routes = uses_first_choice_counts(spec) ? tokens : (double)spec->top_k * tokens;
    double sum = 0.0;
    for (int e = 0; e < spec->num_experts; e++)
        sum += (sums->probability_sums[e] / tokens) * (double)sums->balance_counts[e] / routes;
    res->aux_loss = (double)spec->num_experts * sum;
}

/* ---- capacity (§2) ---------------------------------------------------------------------- */

/* §2.1. Returns -1 for dropless. The DeepSpeed formula is evaluated in fp32: each
 * fp32 product below is formed exactly in double (two 24-bit significands need at
 * most 48 bits) and then rounded once to float, which is the fp32 product. */
static int64_t compute_capacity(const moegen_spec *spec, int64_t n_tokens, int train) {
    const moegen_capacity_spec *capacity = &spec->capacity;
    double factor = train ? capacity->capacity_factor : capacity->eval_capacity_factor;
    double value;
    switch (capacity->mode) {
    case MOEGEN_CAP_DROPLESS:
        return -1;
    case MOEGEN_CAP_FIXED:
        return capacity->expert_capacity;
    case MOEGEN_CAP_FACTOR:
        break;
    }
    if (capacity->formula == MOEGEN_CAP_FORMULA_DEEPSPEED) {
        /* DeepSpeed: torch.tensor(capacity_factor * k) rounds the double product once;
         * (num_tokens / num_experts) is a double that meets that fp32 tensor. */
        float tokens_per_expert = (float)((double)n_tokens / (double)spec->num_experts);
        float k_times_factor = (float)((double)spec->top_k * factor);
        float product = (float)((double)tokens_per_expert * (double)k_times_factor);
        value = ceil((double)product);
        if (value < (double)capacity->min_capacity)
            value = (double)capacity->min_capacity;
    } else {
        value = ceil((double)n_tokens * (double)spec->top_k / (double)spec->num_experts * factor);
    }
    if (!(value < 0x1p62)) /* absurd factors: more than any expert can receive */
        value = 0x1p62;
    return (int64_t)value;
}

typedef struct ranked_route {
    double key; /* larger ranks first */
    int64_t token;
    int slot;
} ranked_route;

/* key descending (NaN last), then token ascending, then slot ascending. */
static int compare_ranked_routes(const void *left, const void *right) {
    const ranked_route *a = left, *b = right;
    int a_nan = isnan(a->key), b_nan = isnan(b->key);
    if (a_nan != b_nan)
        return a_nan - b_nan;
    if (!a_nan && a->key != b->key)
        return a->key > b->key ? -1 : 1;
    if (a->token != b->token)
        return a->token < b->token ? -1 : 1;
    return (a->slot > b->slot) - (a->slot < b->slot);
}

/* §2.2 ranking key of route (token, slot) for the spec's priority. */
static double priority_key(const moegen_spec *spec, uint64_t rng_offset, int64_t token, int slot,
                           double router_weight) {
    switch (spec->capacity.priority) {
    case MOEGEN_PRIORITY_PROBS:
        return router_weight;
    case MOEGEN_PRIORITY_POSITION:
        return 0.0; /* token order decides */
    case MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR:
        return -(double)slot;
    case MOEGEN_PRIORITY_RANDOM:
        return moe_ref_uniform(spec->router.seed, rng_offset, STREAM_PRIORITY,
                               (uint64_t)token * (uint64_t)spec->top_k + (uint64_t)slot);
    }
    return 0.0;
}

/* §2.2-§2.3: marks kept[t*k + j] for the first C routes of each expert and fills
 * the counts. `route_valid` must already leave out the routes of tokens masked by
 * used_token (§9: they take no slot and are not counted). With forced_kept (the
 * caller's capacity decisions) a valid route is kept exactly when forced_kept says
 * so, whatever the mode and C. Returns -1 on allocation failure. */
static int apply_capacity(const moegen_spec *spec, int64_t n_tokens, uint64_t rng_offset,
                          const unsigned char *route_valid, const uint8_t *forced_kept,
                          moe_ref_result *res, unsigned char *kept) {
    int n_experts = spec->num_experts, top_k = spec->top_k;
    int64_t n_routes = n_tokens * top_k;
    for (int64_t r = 0; r < n_routes; r++)
        if (route_valid[r])
            res->counts_before[res->ids[r]]++;
    if (forced_kept) { /* no decision of ours: nothing was close */
        res->capacity_margin = INFINITY;
        res->n_dropped = 0;
        for (int64_t r = 0; r < n_routes; r++) {
            kept[r] = (unsigned char)(route_valid[r] && forced_kept[r]);
            if (kept[r])
                res->counts_after[res->ids[r]]++;
        }
        for (int e = 0; e < n_experts; e++)
            res->n_dropped += res->counts_before[e] - res->counts_after[e];
        return 0;
    }
    if (res->capacity < 0) { /* dropless: every valid route is kept */
        memcpy(kept, route_valid, (size_t)n_routes);
        memcpy(res->counts_after, res->counts_before, (size_t)n_experts * sizeof(int64_t));
        res->n_dropped = 0;
        return 0;
    }

    /* group the valid routes by expert (token-major inside each), then rank each group */
    int64_t *starts = calloc((size_t)n_experts + 1, sizeof(int64_t));
    int64_t *filled = calloc((size_t)n_experts, sizeof(int64_t));
    ranked_route *ranked = malloc((size_t)(n_routes > 0 ? n_routes : 1) * sizeof(ranked_route));
    if (!starts || !filled || !ranked) {
        free(starts);
        free(filled);
        free(ranked);
        return -1;
    }
    for (int e = 0; e < n_experts; e++)
        starts[e + 1] = starts[e] + res->counts_before[e];
    for (int64_t t = 0; t < n_tokens; t++)
        for (int j = 0; j < top_k; j++) {
            int64_t r = t * top_k + j;
            if (!route_valid[r])
                continue;
            int e = res->ids[r];
            ranked_route *slot = &ranked[starts[e] + filled[e]++];
            slot->key = priority_key(spec, rng_offset, t, j, res->router_weights[r]);
            slot->token = t;
            slot->slot = j;
        }

    memset(kept, 0, (size_t)n_routes);
    res->n_dropped = 0;
    res->capacity_margin = INFINITY;
    for (int e = 0; e < n_experts; e++) {
        int64_t count = res->counts_before[e];
        qsort(ranked + starts[e], (size_t)count, sizeof(ranked_route), compare_ranked_routes);
        int64_t keep = count < res->capacity ? count : res->capacity;
        if (keep < 0) /* a negative fixed capacity keeps nothing */
            keep = 0;
        if (spec->capacity.priority == MOEGEN_PRIORITY_PROBS && keep > 0 && keep < count) {
            const double last_kept = ranked[starts[e] + keep - 1].key, first_dropped = ranked[starts[e] + keep].key;
            const double gap = last_kept == first_dropped ? 0.0 : (last_kept - first_dropped) / fabs(last_kept);
            if (gap < res->capacity_margin) res->capacity_margin = gap;
        }
        for (int64_t i = 0; i < keep; i++)
            kept[ranked[starts[e] + i].token * top_k + ranked[starts[e] + i].slot] = 1;
        res->counts_after[e] = keep;
        res->n_dropped += count - keep;
    }
    free(starts);
    free(filled);
    free(ranked);
    return 0;
}

/* §2.4: final combine weights of every route. */
static void final_weights(const moegen_spec *spec, int64_t n_tokens, const unsigned char *kept,
                          moe_ref_result *res) {
    int top_k = spec->top_k;
    for (int64_t t = 0; t < n_tokens; t++) {
        const double *router_weights = res->router_weights + t * top_k;
        double *weights = res->weights + t * top_k;
        double kept_sum = 0.0;
        for (int j = 0; j < top_k; j++)
            if (kept[t * top_k + j])
                kept_sum += router_weights[j];
        for (int j = 0; j < top_k; j++) {
            if (!kept[t * top_k + j])
                weights[j] = 0.0;
            else if (spec->capacity.renormalize)
                weights[j] = router_weights[j] / fmax(kept_sum, WEIGHT_SUM_FLOOR) *
                             spec->router.routed_scaling_factor;
            else
                weights[j] = router_weights[j];
        }
    }
}

/* ---- the forward ------------------------------------------------------------------------- */

static int fail(char *why, const char *format, ...) {
    if (why) {
        va_list args;
        va_start(args, format);
        vsnprintf(why, REFERENCE_WHY_BYTES, format, args);
        va_end(args);
    }
    return -1;
}

/* The spec fields the reference indexes with, and the tensors they require. */
static int check_arguments(const moegen_spec *spec, int64_t n_tokens, const void *x,
                           const moegen_kernel_weights *w, const moe_ref_options *opt,
                           const moe_ref_result *res, char *why) {
    if (!spec || !w || !res)
        return fail(why, "reference: spec, weights and result are required");
    if (n_tokens < 0)
        return fail(why, "reference: n_tokens (%lld) is negative", (long long)n_tokens);
    if (n_tokens > 0 && (spec->hidden_size > INT64_MAX / n_tokens || MOEGEN_MAX_TOP_K > INT64_MAX / n_tokens))
        return fail(why, "reference: n_tokens (%lld) is too large", (long long)n_tokens);
    if (n_tokens > 0 && !x)
        return fail(why, "reference: x is required for %lld tokens", (long long)n_tokens);
    if (spec->dtype != MOEGEN_DTYPE_FP32 && spec->dtype != MOEGEN_DTYPE_FP16 &&
        spec->dtype != MOEGEN_DTYPE_BF16)
        return fail(why, "reference: unknown dtype %d", (int)spec->dtype);
    if (spec->num_experts < 1 || spec->num_experts > MOEGEN_MAX_EXPERTS)
        return fail(why, "reference: num_experts (%d) out of range", spec->num_experts);
    if (spec->top_k < 1 || spec->top_k > spec->num_experts)
        return fail(why, "reference: top_k (%d) must be in [1, num_experts]", spec->top_k);
    if (spec->hidden_size < 1 || spec->moe_intermediate_size < 1)
        return fail(why, "reference: hidden_size and moe_intermediate_size must be positive");
    const moegen_router_spec *router = &spec->router;
    if (router->n_group < 1 || spec->num_experts % router->n_group != 0)
        return fail(why, "reference: n_group (%d) must divide num_experts (%d)", router->n_group,
                    spec->num_experts);
    if (router->n_group > 1 && (router->topk_group < 1 || router->topk_group > router->n_group))
        return fail(why, "reference: topk_group (%d) must be in [1, n_group]", router->topk_group);
    if (router->n_group > 1 && router->group_score == MOEGEN_GROUP_SCORE_TOPM_SUM &&
        router->group_topm < 1)
        return fail(why, "reference: group_topm (%d) must be positive", router->group_topm);
    if (spec->shared.count < 0 || spec->shared.count > MOEGEN_MAX_SHARED_EXPERTS ||
        (spec->shared.count > 0 && spec->shared.intermediate_size < 1))
        return fail(why, "reference: bad shared expert count or size");
    if (!w->router_w || !w->w1 || !w->w2)
        return fail(why, "reference: router_w, w1 and w2 are required");
    if (router->router_bias && !w->router_b)
        return fail(why, "reference: router.router_bias needs router_b");
    if (router->score_bias && router->score_function != MOEGEN_SCORE_SOFTMAX && !w->score_bias)
        return fail(why, "reference: router.score_bias needs score_bias");
    if (spec->expert_bias && (!w->b1 || !w->b2))
        return fail(why, "reference: expert_bias needs b1 and b2");
    if (spec->shared.count > 0 &&
        (!w->shared_w1 || !w->shared_w2 || (spec->expert_bias && (!w->shared_b1 || !w->shared_b2)) ||
         (spec->shared.gate && !w->shared_gate)))
        return fail(why, "reference: shared experts need shared_w1, shared_w2 (and their biases, gate)");
    if (spec->use_residual &&
        (!w->residual_w1 || !w->residual_w2 || !w->residual_coef_w || !w->residual_coef_b ||
         (spec->expert_bias && (!w->residual_b1 || !w->residual_b2))))
        return fail(why, "reference: use_residual needs residual_w1, residual_w2, residual_coef_w/b "
                         "(and biases)");
    if (opt && ((opt->forced_ids == NULL) != (opt->forced_router_weights == NULL)))
        return fail(why, "reference: forced_ids and forced_router_weights go together");
    return 0;
}

/* Frees every array of a result and zeroes it; NULL and a zeroed result are fine. */
void moe_ref_result_free(moe_ref_result *res) {
    if (!res)
        return;
    free(res->y);
    free(res->ids);
    free(res->router_weights);
    free(res->weights);
    free(res->counts_before);
    free(res->counts_after);
    free(res->margin);
    free(res->selection);
    memset(res, 0, sizeof(*res));
}

/* calloc of count elements, never returning NULL for count 0 unless out of memory. */
static void *allocate_zeroed(int64_t count, size_t element_bytes) {
    if (count < 0 || (uint64_t)count > SIZE_MAX / element_bytes / 2)
        return NULL;
    return calloc(count > 0 ? (size_t)count : 1, element_bytes);
}

/* Buffers that live for one call. */
typedef struct forward_work {
    double *half_table;          /* [65536] for fp16 / bf16 */
    double *x_row;               /* [H] clean input of one token */
    double *router_input;        /* [H] jittered input */
    double *logits;              /* [E] */
    double *own_weights;         /* [k] */
    int32_t *own_ids;            /* [k] */
    unsigned char *route_valid;  /* [S*k] */
    unsigned char *route_kept;   /* [S*k] */
    unsigned char *route_counted; /* [S*k] valid and of a used token (§9) */
    double *expert_input;        /* [H] */
    double *expert_output;       /* [H] */
    double *moe_sum;             /* [H] */
    double *shared_sum;          /* [H] */
    mlp_scratch mlp;
    router_scratch router;
    loss_sums losses;
} forward_work;

static void free_work(forward_work *work) {
    void *buffers[] = {work->half_table, work->x_row, work->router_input, work->logits,
                       work->own_weights, work->own_ids, work->route_valid, work->route_kept,
                       work->route_counted,
                       work->expert_input, work->expert_output, work->moe_sum, work->shared_sum,
                       work->mlp.pre, work->mlp.hidden, work->router.scores, work->router.selection,
                       work->router.noisy, work->router.probabilities, work->router.group_scores,
                       work->router.candidate, work->router.chosen, work->router.valid,
                       work->router.group_kept, work->router.group_has_valid,
                       work->losses.probability_sums, work->losses.balance_counts};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++)
        free(buffers[i]);
}

static int allocate_work(const moegen_spec *spec, int64_t n_tokens, forward_work *work) {
    int64_t n_experts = spec->num_experts, hidden = spec->hidden_size, top_k = spec->top_k;
    int64_t expert_rows = activation_is_gated(spec->activation) ? 2 * spec->moe_intermediate_size
                                                                : spec->moe_intermediate_size;
    int64_t shared_rows = activation_is_gated(spec->activation) ? 2 * spec->shared.intermediate_size
                                                                : spec->shared.intermediate_size;
    int64_t ffn_rows = spec->shared.count > 0 && shared_rows > expert_rows ? shared_rows : expert_rows;
    memset(work, 0, sizeof(*work));
    if (spec->dtype != MOEGEN_DTYPE_FP32) {
        work->half_table = allocate_zeroed(65536, sizeof(double));
        if (work->half_table)
            for (uint32_t bits = 0; bits < 65536; bits++)
                work->half_table[bits] = spec->dtype == MOEGEN_DTYPE_FP16
                                             ? moe_ref_half_to_double((uint16_t)bits)
                                             : moe_ref_bf16_to_double((uint16_t)bits);
    }
    work->x_row = allocate_zeroed(hidden, sizeof(double));
    work->router_input = allocate_zeroed(hidden, sizeof(double));
    work->logits = allocate_zeroed(n_experts, sizeof(double));
    work->own_weights = allocate_zeroed(top_k, sizeof(double));
    work->own_ids = allocate_zeroed(top_k, sizeof(int32_t));
    work->route_valid = allocate_zeroed(n_tokens * top_k, 1);
    work->route_kept = allocate_zeroed(n_tokens * top_k, 1);
    work->route_counted = allocate_zeroed(n_tokens * top_k, 1);
    work->expert_input = allocate_zeroed(hidden, sizeof(double));
    work->expert_output = allocate_zeroed(hidden, sizeof(double));
    work->moe_sum = allocate_zeroed(hidden, sizeof(double));
    work->shared_sum = allocate_zeroed(hidden, sizeof(double));
    work->mlp.pre = allocate_zeroed(ffn_rows, sizeof(double));
    work->mlp.hidden = allocate_zeroed(ffn_rows, sizeof(double));
    work->router.scores = allocate_zeroed(n_experts, sizeof(double));
    work->router.selection = allocate_zeroed(n_experts, sizeof(double));
    work->router.noisy = allocate_zeroed(n_experts, sizeof(double));
    work->router.probabilities = allocate_zeroed(n_experts, sizeof(double));
    work->router.group_scores = allocate_zeroed(spec->router.n_group, sizeof(double));
    work->router.candidate = allocate_zeroed(n_experts, 1);
    work->router.chosen = allocate_zeroed(n_experts, 1);
    work->router.valid = allocate_zeroed(n_experts, 1);
    work->router.group_kept = allocate_zeroed(spec->router.n_group, 1);
    work->router.group_has_valid = allocate_zeroed(spec->router.n_group, 1);
    work->losses.probability_sums = allocate_zeroed(n_experts, sizeof(double));
    work->losses.balance_counts = allocate_zeroed(n_experts, sizeof(int64_t));
    if ((spec->dtype != MOEGEN_DTYPE_FP32 && !work->half_table) || !work->x_row ||
        !work->router_input || !work->logits || !work->own_weights || !work->own_ids ||
        !work->route_valid || !work->route_kept || !work->route_counted || !work->expert_input ||
        !work->expert_output ||
        !work->moe_sum || !work->shared_sum || !work->mlp.pre || !work->mlp.hidden ||
        !work->router.scores || !work->router.selection || !work->router.noisy ||
        !work->router.probabilities || !work->router.group_scores || !work->router.candidate ||
        !work->router.chosen || !work->router.valid || !work->router.group_kept ||
        !work->router.group_has_valid || !work->losses.probability_sums ||
        !work->losses.balance_counts)
        return -1;
    return 0;
}

static int allocate_result(const moegen_spec *spec, int64_t n_tokens, moe_ref_result *res) {
    int64_t routes = n_tokens * spec->top_k;
    if (spec->hidden_size > 0 && n_tokens > INT64_MAX / spec->hidden_size)
        return -1;
    res->n_tokens = n_tokens;
    res->top_k = spec->top_k;
    res->num_experts = spec->num_experts;
    res->hidden = spec->hidden_size;
    res->y = allocate_zeroed(n_tokens * spec->hidden_size, sizeof(double));
    res->ids = allocate_zeroed(routes, sizeof(int32_t));
    res->router_weights = allocate_zeroed(routes, sizeof(double));
    res->weights = allocate_zeroed(routes, sizeof(double));
    res->counts_before = allocate_zeroed(spec->num_experts, sizeof(int64_t));
    res->counts_after = allocate_zeroed(spec->num_experts, sizeof(int64_t));
    res->margin = allocate_zeroed(n_tokens, sizeof(double));
    res->selection = allocate_zeroed(n_tokens * spec->num_experts, sizeof(double));
    if (!res->y || !res->ids || !res->router_weights || !res->weights || !res->counts_before ||
        !res->counts_after || !res->margin || !res->selection)
        return -1;
    return 0;
}

/* Widens token t's row of x into out[H]. */
static void read_token(const tensor_reader *reader, const void *x, int64_t token, int64_t hidden,
                       double *out) {
    for (int64_t h = 0; h < hidden; h++)
        out[h] = read_element(reader, x, token * hidden + h);
}

/* Pass 1 for one token: router input (§1.1), logits (§1.2-§1.3), own routing, the
 * routing used downstream (own or forced), losses. Returns -1 on bad forced ids. */
static int route_one_token(const moegen_spec *spec, const tensor_reader *reader, const void *x,
                           const moegen_kernel_weights *w, const moe_ref_options *opt, int train,
                           int64_t t, forward_work *work, moe_ref_result *res, char *why) {
    int n_experts = spec->num_experts, top_k = spec->top_k;
    int64_t hidden = spec->hidden_size;
    uint64_t rng_offset = opt ? opt->rng_offset : 0;
    double epsilon = spec->router.input_jitter;
    double *z = work->logits;

    read_token(reader, x, t, hidden, work->x_row);
    for (int64_t h = 0; h < hidden; h++) {
        double multiplier = 1.0;
        if (train && epsilon > 0.0) {
            double u = moe_ref_uniform(spec->router.seed, rng_offset, STREAM_JITTER,
                                       (uint64_t)t * (uint64_t)hidden + (uint64_t)h);
            multiplier = (1.0 - epsilon) + u * (2.0 * epsilon);
        }
        work->router_input[h] = work->x_row[h] * multiplier;
    }
    for (int e = 0; e < n_experts; e++) {
        double logit = dot_fp32(w->router_w + (int64_t)e * hidden, work->router_input, hidden);
        if (spec->router.router_bias)
            logit += (double)w->router_b[e];
        z[e] = moe_ref_sanitize_logit(logit);
    }

    res->margin[t] = INFINITY;
    int n_valid = route_token(spec, w->score_bias, train, rng_offset, t, z, &work->router, work->own_ids,
                              work->own_weights, &res->margin[t], res->selection + t * n_experts);
    int32_t *ids = res->ids + t * top_k;
    double *router_weights = res->router_weights + t * top_k;
    unsigned char *route_valid = work->route_valid + t * top_k;
    if (opt && opt->forced_ids) {
        /* A forced route is valid when its slot is one the reference's own routing
         * filled with a valid route and its own logit is valid: invalid routes are
         * the trailing fill slots, and near-ties never change how many there are. */
        memset(work->router.chosen, 0, (size_t)n_experts);
        for (int j = 0; j < top_k; j++) {
            int32_t id = opt->forced_ids[t * top_k + j];
            if (id < 0 || id >= n_experts || work->router.chosen[id])
                return fail(why, "reference: forced_ids of token %lld slot %d (%d) is out of range or "
                                 "repeated", (long long)t, j, (int)id);
            work->router.chosen[id] = 1;
            ids[j] = id;
            router_weights[j] = (double)opt->forced_router_weights[t * top_k + j];
            route_valid[j] = (unsigned char)(j < n_valid && logit_is_valid(z[id]));
        }
    } else {
        for (int j = 0; j < top_k; j++) {
            ids[j] = work->own_ids[j];
            router_weights[j] = work->own_weights[j];
            route_valid[j] = (unsigned char)(j < n_valid);
        }
    }
    int used = !opt || !opt->used_token || opt->used_token[t];
    accumulate_losses(spec, z, n_valid > 0 ? work->own_ids[0] : -1, used, &work->router, &work->losses);
    return 0;
}

/* base advanced by offset elements of the layer dtype; NULL stays NULL. */
static const void *tensor_slice(const tensor_reader *reader, const void *base, int64_t offset) {
    if (!base)
        return NULL;
    size_t element_bytes = reader->dtype == MOEGEN_DTYPE_FP32 ? sizeof(float) : sizeof(uint16_t);
    return (const char *)base + (size_t)offset * element_bytes;
}

/* The MLP of one expert, residual MLP or shared expert: `index` selects the slice of
 * tensors laid out [count][F1][H], [count][F1], [count][H][F], [count][H]. */
static mlp_view slice_mlp(const tensor_reader *reader, const void *w1, const void *b1, const void *w2,
                          const void *b2, int with_bias, int gated, int64_t index, int64_t ffn,
                          int64_t hidden) {
    int64_t ffn_rows = gated ? 2 * ffn : ffn;
    mlp_view mlp = {
        .w1 = tensor_slice(reader, w1, index * ffn_rows * hidden),
        .b1 = with_bias ? tensor_slice(reader, b1, index * ffn_rows) : NULL,
        .w2 = tensor_slice(reader, w2, index * hidden * ffn),
        .b2 = with_bias ? tensor_slice(reader, b2, index * hidden) : NULL,
        .ffn = ffn,
    };
    return mlp;
}

/* Pass 3 for one token: experts and combine (§3.1-§3.5), residual (§3.6), shared
 * experts (§3.7); writes y[t] in double (§3.2, §3.8: the reference rounds nothing). */
static void compute_token_output(const moegen_spec *spec, const tensor_reader *reader, const void *x,
                                 const moegen_kernel_weights *w, int64_t t, forward_work *work,
                                 moe_ref_result *res) {
    int top_k = spec->top_k;
    int64_t hidden = spec->hidden_size, ffn = spec->moe_intermediate_size;
    int gated = activation_is_gated(spec->activation);
    double *x_row = work->x_row, *output = work->expert_output, *y = res->y + t * hidden;

    read_token(reader, x, t, hidden, x_row);
    memset(work->moe_sum, 0, (size_t)hidden * sizeof(double));
    for (int j = 0; j < top_k; j++) { /* combine in slot order */
        int64_t route = t * top_k + j;
        if (!work->route_kept[route])
            continue;
        double weight = res->weights[route];
        mlp_view expert = slice_mlp(reader, w->w1, w->b1, w->w2, w->b2, spec->expert_bias, gated,
                                    res->ids[route], ffn, hidden);
        if (spec->weight_on_input) { /* §3.4: the expert sees w*x, its output counts once */
            for (int64_t h = 0; h < hidden; h++)
                work->expert_input[h] = weight * x_row[h];
            mlp_forward(reader, &expert, spec->activation, hidden, work->expert_input, &work->mlp, output);
            for (int64_t h = 0; h < hidden; h++)
                work->moe_sum[h] += output[h];
        } else {
            mlp_forward(reader, &expert, spec->activation, hidden, x_row, &work->mlp, output);
            for (int64_t h = 0; h < hidden; h++)
                work->moe_sum[h] += weight * output[h];
        }
    }

    if (spec->use_residual) {
        double coefficient_logits[2], coefficients[2];
        for (int i = 0; i < 2; i++)
            coefficient_logits[i] = dot_fp32(w->residual_coef_w + i * hidden, x_row, hidden) +
                                    (double)w->residual_coef_b[i];
        double max_logit = fmax(coefficient_logits[0], coefficient_logits[1]);
        double e0 = exp(coefficient_logits[0] - max_logit), e1 = exp(coefficient_logits[1] - max_logit);
        coefficients[0] = e0 / (e0 + e1);
        coefficients[1] = e1 / (e0 + e1);
        mlp_view residual = slice_mlp(reader, w->residual_w1, w->residual_b1, w->residual_w2,
                                      w->residual_b2, spec->expert_bias, gated, 0, ffn, hidden);
        mlp_forward(reader, &residual, spec->activation, hidden, x_row, &work->mlp, output);
        for (int64_t h = 0; h < hidden; h++)
            y[h] = work->moe_sum[h] * coefficients[0] + output[h] * coefficients[1];
    } else {
        memcpy(y, work->moe_sum, (size_t)hidden * sizeof(double));
    }

    if (spec->shared.count > 0) {
        double gate = 1.0;
        if (spec->shared.gate)
            gate = 1.0 / (1.0 + exp(-dot_fp32(w->shared_gate, x_row, hidden)));
        memset(work->shared_sum, 0, (size_t)hidden * sizeof(double));
        for (int i = 0; i < spec->shared.count; i++) {
            mlp_view shared = slice_mlp(reader, w->shared_w1, w->shared_b1, w->shared_w2, w->shared_b2,
                                        spec->expert_bias, gated, i, spec->shared.intermediate_size,
                                        hidden);
            mlp_forward(reader, &shared, spec->activation, hidden, x_row, &work->mlp, output);
            for (int64_t h = 0; h < hidden; h++)
                work->shared_sum[h] += output[h];
        }
        for (int64_t h = 0; h < hidden; h++)
            y[h] += gate * work->shared_sum[h];
    }
}

/* The forward's three passes (see reference_internal.h). On failure returns -1 with
 * the reason in `why` and leaves *res and *decisions zeroed (nothing to free). */
int moe_ref_forward_decisions(const moegen_spec *spec, int64_t n_tokens, const void *x,
                              const moegen_kernel_weights *w, const moe_ref_options *opt,
                              int compute_outputs, moe_ref_result *res,
                              moe_ref_decisions *decisions, char *why) {
    if (why)
        why[0] = '\0';
    if (res)
        memset(res, 0, sizeof(*res));
    if (decisions)
        memset(decisions, 0, sizeof(*decisions));
    if (check_arguments(spec, n_tokens, x, w, opt, res, why) != 0)
        return -1;

    forward_work work;
    int train = spec->mode == MOEGEN_MODE_TRAIN;
    uint64_t rng_offset = opt ? opt->rng_offset : 0;
    int status = 0;
    if (allocate_work(spec, n_tokens, &work) != 0 || allocate_result(spec, n_tokens, res) != 0) {
        status = fail(why, "reference: out of memory for %lld tokens", (long long)n_tokens);
        goto done;
    }
    tensor_reader reader = {spec->dtype, work.half_table};

    for (int64_t t = 0; t < n_tokens; t++) /* pass 1: routing and losses */
        if (route_one_token(spec, &reader, x, w, opt, train, t, &work, res, why) != 0) {
            status = -1;
            goto done;
        }
    finish_losses(spec, n_tokens, &work.losses, res);

    /* pass 2: capacity. pad_to_capacity (§2.5) changes no result, so it is ignored.
     * §9: the routes of tokens masked by used_token take no slot and are not counted
     * (C still comes from all S tokens). */
    const unsigned char *counted = work.route_valid;
    if (opt && opt->used_token) {
        for (int64_t t = 0; t < n_tokens; t++)
            for (int j = 0; j < spec->top_k; j++) {
                int64_t r = t * spec->top_k + j;
                work.route_counted[r] = (unsigned char)(work.route_valid[r] && opt->used_token[t]);
            }
        counted = work.route_counted;
    }
    res->capacity = compute_capacity(spec, n_tokens, train);
    if (apply_capacity(spec, n_tokens, rng_offset, counted, opt ? opt->forced_kept : NULL, res,
                       work.route_kept) != 0) {
        status = fail(why, "reference: out of memory ranking routes");
        goto done;
    }
    final_weights(spec, n_tokens, work.route_kept, res);

    if (compute_outputs)
        for (int64_t t = 0; t < n_tokens; t++) /* pass 3: outputs */
            if (!opt || !opt->token_mask || opt->token_mask[t])
                compute_token_output(spec, &reader, x, w, t, &work, res);

    if (decisions) { /* hand the per-route marks and the loss counts over */
        decisions->route_valid = work.route_valid;
        decisions->route_kept = work.route_kept;
        decisions->balance_counts = work.losses.balance_counts;
        work.route_valid = work.route_kept = NULL;
        work.losses.balance_counts = NULL;
    }

done:
    free_work(&work);
    if (status != 0)
        moe_ref_result_free(res);
    return status;
}

void moe_ref_decisions_free(moe_ref_decisions *decisions) {
    if (!decisions)
        return;
    free(decisions->route_valid);
    free(decisions->route_kept);
    free(decisions->balance_counts);
    memset(decisions, 0, sizeof(*decisions));
}

/* The forward (see reference.h). On failure returns -1 with the reason in `why`
 * and leaves *res zeroed (nothing to free). */
int moe_ref_forward(const moegen_spec *spec, int64_t n_tokens, const void *x,
                    const moegen_kernel_weights *w, const moe_ref_options *opt,
                    moe_ref_result *res, char *why) {
    return moe_ref_forward_decisions(spec, n_tokens, x, w, opt, 1, res, NULL, why);
}
