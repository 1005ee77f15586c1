/* reference_backward.c — the independent MoE backward: plain loops in double precision.
 *
 * Written from docs/numerics.md §8 (the chain) and §9 (used_token) alone, like the
 * forward in reference.c: it shares no code with gen/ or templates/, and none with the
 * kernels' backward. Comments cite the rules as "§8.2.3" (numerics.md section 8.2,
 * step 3).
 *
 * Structure:
 *   1. the forward's routing and capacity passes (moe_ref_forward_decisions, same
 *      options) give the constants of the backward (§8.1): every route's expert, whether
 *      it is valid and whether it was kept, and the loss counts c / c1;
 *   2. every token, independently: recompute in double what the chain differentiates
 *      (router input, logits, scores, router weights, combine weights, expert outputs,
 *      residual coefficients, shared gate), then walk §8.2 from the output back,
 *      accumulating the weight gradients in token order and writing dx[t].
 * Nothing is rounded to the layer dtype (the forward rounds nothing either).
 */
#include "reference.h"
#include "reference_internal.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKWARD_WHY_BYTES 256
#define SUM_FLOOR 1e-20 /* §1.9, §2.4, §4: max(sum, 1e-20) */

static int backward_fail(char *why, const char *format, ...) {
    if (why) {
        va_list args;
        va_start(args, format);
        vsnprintf(why, BACKWARD_WHY_BYTES, format, args);
        va_end(args);
    }
    return -1;
}

/* ---- reading the layer dtype ------------------------------------------------------------ */

typedef struct dtype_reader {
    moegen_dtype dtype;
    double *table; /* [65536] widened 16-bit patterns; NULL for fp32 */
} dtype_reader;

static double element(const dtype_reader *reader, const void *base, int64_t index) {
    if (reader->dtype == MOEGEN_DTYPE_FP32)
        return ((const float *)base)[index];
    return reader->table[((const uint16_t *)base)[index]];
}

static const void *advance(const dtype_reader *reader, const void *base, int64_t elements) {
    if (!base)
        return NULL;
    size_t bytes = reader->dtype == MOEGEN_DTYPE_FP32 ? sizeof(float) : sizeof(uint16_t);
    return (const char *)base + (size_t)elements * bytes;
}

/* ---- activations and their derivatives (§3.1, §8.2.4) ---------------------------------- */

static int is_gated(moegen_activation activation) {
    return activation == MOEGEN_ACT_SWIGLU || activation == MOEGEN_ACT_GEGLU;
}

static double logistic(double v) { return 1.0 / (1.0 + exp(-v)); }

static const double PI = 3.14159265358979323846;

/* The plain activation, or the gate's activation of a gated one. */
static double act_value(moegen_activation activation, double v) {
    switch (activation) {
    case MOEGEN_ACT_RELU:
        return v < 0.0 ? 0.0 : v;
    case MOEGEN_ACT_GELU:
    case MOEGEN_ACT_GEGLU:
        return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    case MOEGEN_ACT_GELU_TANH: {
        double c = sqrt(2.0 / PI);
        return 0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v)));
    }
    case MOEGEN_ACT_SILU:
    case MOEGEN_ACT_SWIGLU:
        return v * logistic(v);
    }
    return NAN;
}

/* act'(v): relu' = 1 for v > 0 else 0 (0 at 0 and for NaN); silu' = σ (1 + v (1 - σ));
 * gelu' = Φ + v φ; gelu_tanh' as §8.2.4 writes it. */
static double act_derivative(moegen_activation activation, double v) {
    switch (activation) {
    case MOEGEN_ACT_RELU:
        return v > 0.0 ? 1.0 : 0.0;
    case MOEGEN_ACT_GELU:
    case MOEGEN_ACT_GEGLU: {
        double cdf = 0.5 * (1.0 + erf(v / sqrt(2.0)));
        double density = exp(-0.5 * v * v) / sqrt(2.0 * PI);
        return cdf + v * density;
    }
    case MOEGEN_ACT_GELU_TANH: {
        double c = sqrt(2.0 / PI);
        double t = tanh(c * (v + 0.044715 * v * v * v));
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v);
    }
    case MOEGEN_ACT_SILU:
    case MOEGEN_ACT_SWIGLU: {
        double s = logistic(v);
        return s * (1.0 + v * (1.0 - s));
    }
    }
    return NAN;
}

/* ---- one FFN: forward (kept for its backward) and backward (§3.1-§3.3, §8.2.4) ------------ */

typedef struct ffn_params {
    const void *w1, *b1, *w2, *b2; /* [F1][H], [F1], [H][F], [H]; biases may be NULL */
    int64_t ffn;                   /* F */
} ffn_params;

typedef struct ffn_grad {
    double *w1, *b1, *w2, *b2; /* same layouts; b1 / b2 NULL without biases */
} ffn_grad;

typedef struct ffn_state {
    double *pre;    /* [F1] a = W1 u + b1 */
    double *hidden; /* [F]  h */
    double *dh;     /* [F]  */
    double *dpre;   /* [F1] */
} ffn_state;

/* out[H] = W2 act(W1 u + b1) + b2, keeping a and h in state. */
static void ffn_forward(const dtype_reader *reader, const ffn_params *p, moegen_activation activation,
                        int64_t hidden, const double *u, ffn_state *state, double *out) {
    int gated = is_gated(activation);
    int64_t ffn = p->ffn, rows = gated ? 2 * ffn : ffn;
    for (int64_t r = 0; r < rows; r++) {
        double sum = 0.0;
        for (int64_t h = 0; h < hidden; h++)
            sum += element(reader, p->w1, r * hidden + h) * u[h];
        if (p->b1)
            sum += element(reader, p->b1, r);
        state->pre[r] = sum;
    }
    for (int64_t i = 0; i < ffn; i++)
        state->hidden[i] = gated ? act_value(activation, state->pre[i]) * state->pre[ffn + i]
                                 : act_value(activation, state->pre[i]);
    for (int64_t h = 0; h < hidden; h++) {
        double sum = 0.0;
        for (int64_t i = 0; i < ffn; i++)
            sum += element(reader, p->w2, h * ffn + i) * state->hidden[i];
        if (p->b2)
            sum += element(reader, p->b2, h);
        out[h] = sum;
    }
}

/* Given do[H] and the state of ffn_forward on u: adds to the weight gradients and writes
 * du[H] = W1^T da. */
static void ffn_backward(const dtype_reader *reader, const ffn_params *p, const ffn_grad *g,
                         moegen_activation activation, int64_t hidden, const double *u,
                         const double *d_out, ffn_state *state, double *du) {
    int gated = is_gated(activation);
    int64_t ffn = p->ffn, rows = gated ? 2 * ffn : ffn;
    for (int64_t i = 0; i < ffn; i++)
        state->dh[i] = 0.0;
    for (int64_t h = 0; h < hidden; h++) { /* dW2 += do (x) h, db2 += do, dh = W2^T do */
        double d = d_out[h];
        for (int64_t i = 0; i < ffn; i++) {
            g->w2[h * ffn + i] += d * state->hidden[i];
            state->dh[i] += element(reader, p->w2, h * ffn + i) * d;
        }
        if (g->b2)
            g->b2[h] += d;
    }
    for (int64_t i = 0; i < ffn; i++) {
        double a = state->pre[i];
        if (gated) {
            state->dpre[i] = state->dh[i] * state->pre[ffn + i] * act_derivative(activation, a);
            state->dpre[ffn + i] = state->dh[i] * act_value(activation, a);
        } else {
            state->dpre[i] = state->dh[i] * act_derivative(activation, a);
        }
    }
    for (int64_t h = 0; h < hidden; h++)
        du[h] = 0.0;
    for (int64_t r = 0; r < rows; r++) { /* dW1 += da (x) u, db1 += da, du = W1^T da */
        double d = state->dpre[r];
        for (int64_t h = 0; h < hidden; h++) {
            g->w1[r * hidden + h] += d * u[h];
            du[h] += element(reader, p->w1, r * hidden + h) * d;
        }
        if (g->b1)
            g->b1[r] += d;
    }
}

/* ---- router pieces (§1.2-§1.4) ------------------------------------------------------------ */

static int valid_logit(double z) { return z != -INFINITY; }

/* softmax over the valid entries (max subtracted); invalid give 0, no valid entry all 0. */
static void softmax_over_valid(const double *z, int n, double *out) {
    double max_value = -INFINITY, sum = 0.0;
    for (int e = 0; e < n; e++)
        if (valid_logit(z[e]) && z[e] > max_value)
            max_value = z[e];
    for (int e = 0; e < n; e++) {
        out[e] = valid_logit(z[e]) ? exp(z[e] - max_value) : 0.0;
        sum += out[e];
    }
    for (int e = 0; e < n; e++)
        out[e] = sum > 0.0 ? out[e] / sum : 0.0;
}

static void router_scores(moegen_score_fn function, const double *z, int n, double *s) {
    if (function == MOEGEN_SCORE_SOFTMAX) {
        softmax_over_valid(z, n, s);
        return;
    }
    for (int e = 0; e < n; e++) {
        if (!valid_logit(z[e]))
            s[e] = 0.0;
        else if (function == MOEGEN_SCORE_SIGMOID)
            s[e] = logistic(z[e]);
        else /* sqrt(softplus(z)), softplus = max(z, 0) + log1p(exp(-|z|)) */
            s[e] = sqrt(fmax(z[e], 0.0) + log1p(exp(-fabs(z[e]))));
    }
}

/* ---- allocation ------------------------------------------------------------------------- */

static double *zeros(int64_t count) {
    if (count < 0 || (uint64_t)count > SIZE_MAX / sizeof(double) / 2)
        return NULL;
    return calloc(count > 0 ? (size_t)count : 1, sizeof(double));
}

void moe_ref_grads_free(moe_ref_grads *grads) {
    if (!grads)
        return;
    double *arrays[] = {grads->dx, grads->router_w, grads->router_b, grads->w1, grads->b1,
                        grads->w2, grads->b2, grads->shared_w1, grads->shared_b1,
                        grads->shared_w2, grads->shared_b2, grads->shared_gate,
                        grads->residual_w1, grads->residual_b1, grads->residual_w2,
                        grads->residual_b2, grads->residual_coef_w, grads->residual_coef_b,
                        grads->residual_coef_w_scale, grads->residual_coef_b_scale,
                        grads->shared_gate_scale};
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++)
        free(arrays[i]);
    memset(grads, 0, sizeof(*grads));
}

/* Allocates (zeroed) every gradient the spec has. Returns 0 or -1. */
static int allocate_grads(const moegen_spec *spec, int64_t n_tokens, moe_ref_grads *g) {
    int64_t E = spec->num_experts, H = spec->hidden_size, F = spec->moe_intermediate_size;
    int gated = is_gated(spec->activation);
    int64_t F1 = gated ? 2 * F : F;
    int64_t Ns = spec->shared.count, Fs = spec->shared.intermediate_size, F1s = gated ? 2 * Fs : Fs;
    int bias = spec->expert_bias;
    int failed = 0;
#define ALLOCATE(field, count)                                                                     \
    do {                                                                                           \
        g->field = zeros(count);                                                                   \
        failed |= g->field == NULL;                                                                \
    } while (0)
    ALLOCATE(dx, n_tokens * H);
    ALLOCATE(router_w, E * H);
    if (spec->router.router_bias)
        ALLOCATE(router_b, E);
    ALLOCATE(w1, E * F1 * H);
    ALLOCATE(w2, E * H * F);
    if (bias) {
        ALLOCATE(b1, E * F1);
        ALLOCATE(b2, E * H);
    }
    if (Ns > 0) {
        ALLOCATE(shared_w1, Ns * F1s * H);
        ALLOCATE(shared_w2, Ns * H * Fs);
        if (bias) {
            ALLOCATE(shared_b1, Ns * F1s);
            ALLOCATE(shared_b2, Ns * H);
        }
        if (spec->shared.gate) {
            ALLOCATE(shared_gate, H);
            ALLOCATE(shared_gate_scale, H);
        }
    }
    if (spec->use_residual) {
        ALLOCATE(residual_w1, F1 * H);
        ALLOCATE(residual_w2, H * F);
        if (bias) {
            ALLOCATE(residual_b1, F1);
            ALLOCATE(residual_b2, H);
        }
        ALLOCATE(residual_coef_w, 2 * H);
        ALLOCATE(residual_coef_b, 2);
        ALLOCATE(residual_coef_w_scale, 2 * H);
        ALLOCATE(residual_coef_b_scale, 2);
    }
#undef ALLOCATE
    return failed ? -1 : 0;
}

/* Per-token buffers. */
typedef struct token_work {
    double *x_row, *dy_row, *multiplier, *router_input; /* [H] */
    double *raw_logits, *z, *s, *ds, *dz, *p, *gp;      /* [E] */
    unsigned char *passes;                              /* [E] gradient passes the sanitize step */
    double *v, *w_hat, *w, *w_final, *dw_final, *dw, *dv; /* [k] */
    double *outputs;                                    /* [k][H] routed expert outputs */
    double *y_moe, *upstream, *d_out, *du, *inputs, *mlp_out, *shared_sum; /* [H] */
    ffn_state ffn;
} token_work;

static void free_token_work(token_work *tw) {
    double *arrays[] = {tw->x_row, tw->dy_row, tw->multiplier, tw->router_input, tw->raw_logits,
                        tw->z, tw->s, tw->ds, tw->dz, tw->p, tw->gp, tw->v, tw->w_hat, tw->w,
                        tw->w_final, tw->dw_final, tw->dw, tw->dv, tw->outputs, tw->y_moe,
                        tw->upstream, tw->d_out, tw->du, tw->inputs, tw->mlp_out, tw->shared_sum,
                        tw->ffn.pre, tw->ffn.hidden, tw->ffn.dh, tw->ffn.dpre};
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++)
        free(arrays[i]);
    free(tw->passes);
    memset(tw, 0, sizeof(*tw));
}

static int allocate_token_work(const moegen_spec *spec, token_work *tw) {
    int64_t E = spec->num_experts, H = spec->hidden_size, k = spec->top_k;
    int64_t widest = spec->moe_intermediate_size;
    if (spec->shared.count > 0 && spec->shared.intermediate_size > widest)
        widest = spec->shared.intermediate_size;
    memset(tw, 0, sizeof(*tw));
    double **h_arrays[] = {&tw->x_row, &tw->dy_row, &tw->multiplier, &tw->router_input, &tw->y_moe,
                           &tw->upstream, &tw->d_out, &tw->du, &tw->inputs, &tw->mlp_out,
                           &tw->shared_sum};
    double **e_arrays[] = {&tw->raw_logits, &tw->z, &tw->s, &tw->ds, &tw->dz, &tw->p, &tw->gp};
    double **k_arrays[] = {&tw->v, &tw->w_hat, &tw->w, &tw->w_final, &tw->dw_final, &tw->dw, &tw->dv};
    int failed = 0;
    for (size_t i = 0; i < sizeof(h_arrays) / sizeof(h_arrays[0]); i++)
        failed |= (*h_arrays[i] = zeros(H)) == NULL;
    for (size_t i = 0; i < sizeof(e_arrays) / sizeof(e_arrays[0]); i++)
        failed |= (*e_arrays[i] = zeros(E)) == NULL;
    for (size_t i = 0; i < sizeof(k_arrays) / sizeof(k_arrays[0]); i++)
        failed |= (*k_arrays[i] = zeros(k)) == NULL;
    failed |= (tw->outputs = zeros(k * H)) == NULL;
    failed |= (tw->ffn.pre = zeros(2 * widest)) == NULL;
    failed |= (tw->ffn.hidden = zeros(widest)) == NULL;
    failed |= (tw->ffn.dh = zeros(widest)) == NULL;
    failed |= (tw->ffn.dpre = zeros(2 * widest)) == NULL;
    failed |= (tw->passes = calloc((size_t)E, 1)) == NULL;
    return failed ? -1 : 0;
}

/* ---- the backward -------------------------------------------------------------------------- */

typedef struct backward_context {
    const moegen_spec *spec;
    int64_t n_tokens;
    const dtype_reader *reader;
    const void *x, *dy;
    const moegen_kernel_weights *w;
    uint64_t rng_offset;
    double aux_coeff, z_coeff;
    const int32_t *ids;                 /* [S][k] */
    const moe_ref_decisions *decisions; /* valid, kept, counts */
    moe_ref_grads *grads;
} backward_context;

static ffn_params expert_params(const backward_context *c, int64_t e) {
    const moegen_spec *spec = c->spec;
    int64_t H = spec->hidden_size, F = spec->moe_intermediate_size;
    int64_t F1 = is_gated(spec->activation) ? 2 * F : F;
    ffn_params p = {advance(c->reader, c->w->w1, e * F1 * H),
                    spec->expert_bias ? advance(c->reader, c->w->b1, e * F1) : NULL,
                    advance(c->reader, c->w->w2, e * H * F),
                    spec->expert_bias ? advance(c->reader, c->w->b2, e * H) : NULL, F};
    return p;
}

static ffn_grad expert_grad(const backward_context *c, int64_t e) {
    const moegen_spec *spec = c->spec;
    int64_t H = spec->hidden_size, F = spec->moe_intermediate_size;
    int64_t F1 = is_gated(spec->activation) ? 2 * F : F;
    moe_ref_grads *g = c->grads;
    ffn_grad d = {g->w1 + e * F1 * H, g->b1 ? g->b1 + e * F1 : NULL, g->w2 + e * H * F,
                  g->b2 ? g->b2 + e * H : NULL};
    return d;
}

static ffn_params shared_params(const backward_context *c, int64_t i) {
    const moegen_spec *spec = c->spec;
    int64_t H = spec->hidden_size, Fs = spec->shared.intermediate_size;
    int64_t F1s = is_gated(spec->activation) ? 2 * Fs : Fs;
    ffn_params p = {advance(c->reader, c->w->shared_w1, i * F1s * H),
                    spec->expert_bias ? advance(c->reader, c->w->shared_b1, i * F1s) : NULL,
                    advance(c->reader, c->w->shared_w2, i * H * Fs),
                    spec->expert_bias ? advance(c->reader, c->w->shared_b2, i * H) : NULL, Fs};
    return p;
}

static ffn_grad shared_grad(const backward_context *c, int64_t i) {
    const moegen_spec *spec = c->spec;
    int64_t H = spec->hidden_size, Fs = spec->shared.intermediate_size;
    int64_t F1s = is_gated(spec->activation) ? 2 * Fs : Fs;
    moe_ref_grads *g = c->grads;
    ffn_grad d = {g->shared_w1 + i * F1s * H, g->shared_b1 ? g->shared_b1 + i * F1s : NULL,
                  g->shared_w2 + i * H * Fs, g->shared_b2 ? g->shared_b2 + i * H : NULL};
    return d;
}

/* §1.1-§1.4 recomputed for token t: multipliers m, router input x*m, raw and sanitized
 * logits, which logits pass a gradient (§8.1), scores. */
static void recompute_router(const backward_context *c, int64_t t, token_work *tw) {
    const moegen_spec *spec = c->spec;
    int E = spec->num_experts;
    int64_t H = spec->hidden_size;
    double epsilon = spec->router.input_jitter;
    int jitter = spec->mode == MOEGEN_MODE_TRAIN && epsilon > 0.0;
    for (int64_t h = 0; h < H; h++) {
        double m = 1.0;
        if (jitter) /* §1.1: m = (1 - eps) + u(seed, offset, 1, t*H + h) * 2 eps */
            m = (1.0 - epsilon) + moe_ref_uniform(spec->router.seed, c->rng_offset, 1,
                                                  (uint64_t)t * (uint64_t)H + (uint64_t)h) *
                                      (2.0 * epsilon);
        tw->multiplier[h] = m;
        tw->router_input[h] = tw->x_row[h] * m;
    }
    for (int e = 0; e < E; e++) {
        double sum = 0.0;
        for (int64_t h = 0; h < H; h++)
            sum += (double)c->w->router_w[(int64_t)e * H + h] * tw->router_input[h];
        if (spec->router.router_bias)
            sum += (double)c->w->router_b[e];
        tw->raw_logits[e] = sum;
        tw->z[e] = moe_ref_sanitize_logit(sum);
        /* §8.1: a logit NaN or infinite (in fp32) before sanitizing passes no gradient;
         * a sum beyond the fp32 range is one an fp32 router would have made infinite or
         * clamped. */
        tw->passes[e] = (unsigned char)(valid_logit(tw->z[e]) && fabs(sum) <= FLT_MAX);
    }
    router_scores(spec->router.score_function, tw->z, E, tw->s);
}

/* §1.9 and §2.4 recomputed from the logits for token t's valid / kept routes. */
static void recompute_weights(const backward_context *c, int64_t t, token_work *tw) {
    const moegen_spec *spec = c->spec;
    const moegen_router_spec *router = &spec->router;
    int k = spec->top_k;
    const int32_t *ids = c->ids + t * k;
    const unsigned char *valid = c->decisions->route_valid + t * k;
    const unsigned char *kept = c->decisions->route_kept + t * k;
    int topk_then_softmax =
        router->score_function == MOEGEN_SCORE_SOFTMAX && router->order == MOEGEN_ORDER_TOPK_THEN_SOFTMAX;
    double rsf = router->routed_scaling_factor;

    for (int j = 0; j < k; j++)
        tw->v[j] = valid[j] ? tw->s[ids[j]] : 0.0;
    if (topk_then_softmax) { /* softmax over the chosen valid logits */
        double max_logit = -INFINITY, sum = 0.0;
        for (int j = 0; j < k; j++)
            if (valid[j])
                max_logit = fmax(max_logit, tw->z[ids[j]]);
        for (int j = 0; j < k; j++) {
            tw->v[j] = valid[j] ? exp(tw->z[ids[j]] - max_logit) : 0.0;
            sum += tw->v[j];
        }
        for (int j = 0; j < k; j++)
            tw->v[j] = sum > 0.0 ? tw->v[j] / sum : 0.0;
    }
    double valid_sum = 0.0;
    for (int j = 0; j < k; j++)
        if (valid[j])
            valid_sum += tw->v[j];
    for (int j = 0; j < k; j++) {
        tw->w_hat[j] = router->norm_topk_prob ? tw->v[j] / fmax(valid_sum, SUM_FLOOR) : tw->v[j];
        tw->w[j] = tw->w_hat[j] * rsf;
    }
    double kept_sum = 0.0;
    for (int j = 0; j < k; j++)
        if (kept[j])
            kept_sum += tw->w[j];
    for (int j = 0; j < k; j++) {
        if (!kept[j])
            tw->w_final[j] = 0.0;
        else if (spec->capacity.renormalize)
            tw->w_final[j] = tw->w[j] / fmax(kept_sum, SUM_FLOOR) * rsf;
        else
            tw->w_final[j] = tw->w[j];
    }
}

/* §8.2.5-§8.2.6: dw' -> dw -> dŵ -> dv -> ds (or dz for topk_then_softmax). */
static void router_weights_backward(const backward_context *c, int64_t t, token_work *tw) {
    const moegen_spec *spec = c->spec;
    const moegen_router_spec *router = &spec->router;
    int k = spec->top_k;
    const int32_t *ids = c->ids + t * k;
    const unsigned char *valid = c->decisions->route_valid + t * k;
    const unsigned char *kept = c->decisions->route_kept + t * k;
    double rsf = router->routed_scaling_factor;

    /* §8.2.5 capacity */
    double kept_sum = 0.0, kept_dot = 0.0;
    for (int j = 0; j < k; j++)
        if (kept[j]) {
            kept_sum += tw->w[j];
            kept_dot += tw->dw_final[j] * tw->w[j];
        }
    double kept_sigma = fmax(kept_sum, SUM_FLOOR);
    for (int j = 0; j < k; j++) {
        if (!kept[j])
            tw->dw[j] = 0.0;
        else if (spec->capacity.renormalize)
            tw->dw[j] = (rsf / kept_sigma) *
                        (tw->dw_final[j] - (kept_sum > SUM_FLOOR ? kept_dot / kept_sigma : 0.0));
        else
            tw->dw[j] = tw->dw_final[j];
    }

    /* §8.2.6 scaling, then norm_topk_prob */
    double valid_sum = 0.0, hat_dot = 0.0;
    for (int j = 0; j < k; j++)
        if (valid[j]) {
            valid_sum += tw->v[j];
            hat_dot += rsf * tw->dw[j] * tw->w_hat[j];
        }
    double valid_sigma = fmax(valid_sum, SUM_FLOOR);
    for (int j = 0; j < k; j++) {
        double d_hat = valid[j] ? rsf * tw->dw[j] : 0.0;
        if (valid[j] && router->norm_topk_prob)
            tw->dv[j] = (d_hat - (valid_sum > SUM_FLOOR ? hat_dot : 0.0)) / valid_sigma;
        else
            tw->dv[j] = d_hat;
    }

    if (router->score_function == MOEGEN_SCORE_SOFTMAX && router->order == MOEGEN_ORDER_TOPK_THEN_SOFTMAX) {
        double dot = 0.0;
        for (int j = 0; j < k; j++)
            if (valid[j])
                dot += tw->v[j] * tw->dv[j];
        for (int j = 0; j < k; j++)
            if (valid[j])
                tw->dz[ids[j]] += tw->v[j] * (tw->dv[j] - dot);
    } else {
        for (int j = 0; j < k; j++)
            if (valid[j])
                tw->ds[ids[j]] += tw->dv[j];
    }
}

/* §8.2.7-§8.2.8: the load-balancing loss and the z-loss on token t's logits. */
static void loss_backward(const backward_context *c, token_work *tw) {
    const moegen_spec *spec = c->spec;
    int E = spec->num_experts;
    double S = (double)c->n_tokens;
    moegen_aux_loss aux = spec->router.aux_loss;

    if (aux != MOEGEN_AUX_NONE && c->aux_coeff != 0.0) {
        int first_choice = aux == MOEGEN_AUX_DEEPSPEED && spec->top_k <= 2;
        double divisor = first_choice ? S * S : (double)spec->top_k * S * S;
        for (int e = 0; e < E; e++) /* ∂aux/∂p[t][e] */
            tw->gp[e] = (double)E * (double)c->decisions->balance_counts[e] / divisor;
        if (first_choice || spec->router.score_function == MOEGEN_SCORE_SOFTMAX) {
            softmax_over_valid(tw->z, E, tw->p);
            double dot = 0.0;
            for (int e = 0; e < E; e++)
                dot += tw->p[e] * tw->gp[e];
            for (int e = 0; e < E; e++)
                if (valid_logit(tw->z[e]))
                    tw->dz[e] += c->aux_coeff * tw->p[e] * (tw->gp[e] - dot);
        } else { /* p = s / max(sum_valid s, 1e-20) */
            double sum = 0.0, dot = 0.0;
            for (int e = 0; e < E; e++)
                sum += tw->s[e];
            double sigma = fmax(sum, SUM_FLOOR);
            for (int e = 0; e < E; e++)
                dot += tw->gp[e] * tw->s[e] / sigma;
            for (int e = 0; e < E; e++)
                if (valid_logit(tw->z[e]))
                    tw->ds[e] += c->aux_coeff * (tw->gp[e] - (sum > SUM_FLOOR ? dot : 0.0)) / sigma;
        }
    }

    if (c->z_coeff != 0.0) {
        double max_value = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++)
            if (valid_logit(tw->z[e]) && tw->z[e] > max_value)
                max_value = tw->z[e];
        if (max_value != -INFINITY) { /* a row with no valid logit contributes 0 */
            for (int e = 0; e < E; e++)
                if (valid_logit(tw->z[e]))
                    sum += exp(tw->z[e] - max_value);
            double lse = max_value + log(sum);
            softmax_over_valid(tw->z, E, tw->p);
            for (int e = 0; e < E; e++)
                if (valid_logit(tw->z[e]))
                    tw->dz[e] += c->z_coeff * 2.0 * lse * tw->p[e] / S;
        }
    }
}

/* §8.2.9-§8.2.10: scores to logits, logits to the router weights and x. */
static void router_backward(const backward_context *c, int64_t t, token_work *tw) {
    const moegen_spec *spec = c->spec;
    int E = spec->num_experts;
    int64_t H = spec->hidden_size;
    double *dx = c->grads->dx + t * H;

    switch (spec->router.score_function) {
    case MOEGEN_SCORE_SOFTMAX: {
        double dot = 0.0;
        for (int e = 0; e < E; e++)
            dot += tw->s[e] * tw->ds[e];
        for (int e = 0; e < E; e++)
            if (valid_logit(tw->z[e]))
                tw->dz[e] += tw->s[e] * (tw->ds[e] - dot);
        break;
    }
    case MOEGEN_SCORE_SIGMOID:
        for (int e = 0; e < E; e++)
            if (valid_logit(tw->z[e]))
                tw->dz[e] += tw->ds[e] * tw->s[e] * (1.0 - tw->s[e]);
        break;
    case MOEGEN_SCORE_SQRTSOFTPLUS:
        for (int e = 0; e < E; e++)
            if (valid_logit(tw->z[e]) && tw->s[e] > 0.0)
                tw->dz[e] += tw->ds[e] * logistic(tw->z[e]) / (2.0 * tw->s[e]);
        break;
    }

    /* Every token's term is added, zero or not: as in IEEE arithmetic (and PyTorch), a router
     * input that is not finite makes the router weight's gradient non-finite even where its
     * token's d loss / d logit is 0 (numerics §8.1). */
    for (int e = 0; e < E; e++) {
        double d = tw->passes[e] ? tw->dz[e] : 0.0;
        const float *row = c->w->router_w + (int64_t)e * H;
        double *grad_row = c->grads->router_w + (int64_t)e * H;
        for (int64_t h = 0; h < H; h++) {
            grad_row[h] += d * tw->router_input[h];
            dx[h] += tw->multiplier[h] * (d * (double)row[h]);
        }
        if (c->grads->router_b)
            c->grads->router_b[e] += d;
    }
}

/* The whole chain of §8.2 for token t. */
static void token_backward(const backward_context *c, int64_t t, token_work *tw) {
    const moegen_spec *spec = c->spec;
    int E = spec->num_experts, k = spec->top_k;
    int64_t H = spec->hidden_size;
    moegen_activation act = spec->activation;
    const int32_t *ids = c->ids + t * k;
    const unsigned char *kept = c->decisions->route_kept + t * k;
    double *dx = c->grads->dx + t * H;

    for (int64_t h = 0; h < H; h++) {
        tw->x_row[h] = element(c->reader, c->x, t * H + h);
        tw->dy_row[h] = element(c->reader, c->dy, t * H + h);
    }
    for (int e = 0; e < E; e++)
        tw->ds[e] = tw->dz[e] = 0.0;
    for (int j = 0; j < k; j++)
        tw->dw_final[j] = 0.0;
    recompute_router(c, t, tw);
    recompute_weights(c, t, tw);

    /* forward of the routed experts (§3.1-§3.5), outputs kept per slot */
    for (int64_t h = 0; h < H; h++)
        tw->y_moe[h] = 0.0;
    for (int j = 0; j < k; j++) {
        if (!kept[j])
            continue;
        ffn_params p = expert_params(c, ids[j]);
        double *o = tw->outputs + (int64_t)j * H;
        double scale = spec->weight_on_input ? tw->w_final[j] : 1.0;
        for (int64_t h = 0; h < H; h++)
            tw->inputs[h] = scale * tw->x_row[h];
        ffn_forward(c->reader, &p, act, H, tw->inputs, &tw->ffn, o);
        for (int64_t h = 0; h < H; h++)
            tw->y_moe[h] += (spec->weight_on_input ? 1.0 : tw->w_final[j]) * o[h];
    }

    /* §8.2.1 shared experts: each gets γ g; dγ = g . Σ shared_i(x) */
    if (spec->shared.count > 0) {
        double gamma = 1.0;
        if (spec->shared.gate) {
            double logit = 0.0;
            for (int64_t h = 0; h < H; h++)
                logit += (double)c->w->shared_gate[h] * tw->x_row[h];
            gamma = logistic(logit);
        }
        for (int64_t h = 0; h < H; h++) {
            tw->shared_sum[h] = 0.0;
            tw->d_out[h] = gamma * tw->dy_row[h];
        }
        for (int i = 0; i < spec->shared.count; i++) {
            ffn_params p = shared_params(c, i);
            ffn_grad g = shared_grad(c, i);
            ffn_forward(c->reader, &p, act, H, tw->x_row, &tw->ffn, tw->mlp_out);
            for (int64_t h = 0; h < H; h++)
                tw->shared_sum[h] += tw->mlp_out[h];
            ffn_backward(c->reader, &p, &g, act, H, tw->x_row, tw->d_out, &tw->ffn, tw->du);
            for (int64_t h = 0; h < H; h++)
                dx[h] += tw->du[h];
        }
        if (spec->shared.gate) {
            double d_gamma = 0.0, d_gamma_abs = 0.0;
            for (int64_t h = 0; h < H; h++) {
                d_gamma += tw->dy_row[h] * tw->shared_sum[h];
                d_gamma_abs += fabs(tw->dy_row[h] * tw->shared_sum[h]);
            }
            double d_nu = d_gamma * gamma * (1.0 - gamma);
            for (int64_t h = 0; h < H; h++) {
                c->grads->shared_gate[h] += d_nu * tw->x_row[h];
                c->grads->shared_gate_scale[h] += d_gamma_abs * gamma * (1.0 - gamma) * fabs(tw->x_row[h]);
                dx[h] += d_nu * (double)c->w->shared_gate[h];
            }
        }
    }

    /* §8.2.2 residual: y_main = y_moe c0 + mlp(x) c1 */
    if (spec->use_residual) {
        double q[2], coef[2], dc[2], dq[2];
        for (int i = 0; i < 2; i++) {
            q[i] = (double)c->w->residual_coef_b[i];
            double sum = 0.0;
            for (int64_t h = 0; h < H; h++)
                sum += (double)c->w->residual_coef_w[i * H + h] * tw->x_row[h];
            q[i] += sum;
        }
        double top = fmax(q[0], q[1]);
        double e0 = exp(q[0] - top), e1 = exp(q[1] - top);
        coef[0] = e0 / (e0 + e1);
        coef[1] = e1 / (e0 + e1);
        ffn_params p = {c->w->residual_w1, spec->expert_bias ? c->w->residual_b1 : NULL, c->w->residual_w2,
                        spec->expert_bias ? c->w->residual_b2 : NULL, spec->moe_intermediate_size};
        ffn_grad g = {c->grads->residual_w1, c->grads->residual_b1, c->grads->residual_w2,
                      c->grads->residual_b2};
        ffn_forward(c->reader, &p, act, H, tw->x_row, &tw->ffn, tw->mlp_out);
        double dc_abs[2] = {0.0, 0.0};
        dc[0] = dc[1] = 0.0;
        for (int64_t h = 0; h < H; h++) {
            dc[0] += tw->dy_row[h] * tw->y_moe[h];
            dc[1] += tw->dy_row[h] * tw->mlp_out[h];
            dc_abs[0] += fabs(tw->dy_row[h] * tw->y_moe[h]);
            dc_abs[1] += fabs(tw->dy_row[h] * tw->mlp_out[h]);
            tw->upstream[h] = coef[0] * tw->dy_row[h];
            tw->d_out[h] = coef[1] * tw->dy_row[h];
        }
        ffn_backward(c->reader, &p, &g, act, H, tw->x_row, tw->d_out, &tw->ffn, tw->du);
        for (int64_t h = 0; h < H; h++)
            dx[h] += tw->du[h];
        double mean = coef[0] * dc[0] + coef[1] * dc[1];
        double mean_abs = coef[0] * dc_abs[0] + coef[1] * dc_abs[1];
        for (int i = 0; i < 2; i++) {
            dq[i] = coef[i] * (dc[i] - mean);
            double dq_abs = coef[i] * (dc_abs[i] + mean_abs);
            c->grads->residual_coef_b[i] += dq[i];
            c->grads->residual_coef_b_scale[i] += dq_abs;
            for (int64_t h = 0; h < H; h++) {
                c->grads->residual_coef_w[i * H + h] += dq[i] * tw->x_row[h];
                c->grads->residual_coef_w_scale[i * H + h] += dq_abs * fabs(tw->x_row[h]);
                dx[h] += dq[i] * (double)c->w->residual_coef_w[i * H + h];
            }
        }
    } else {
        memcpy(tw->upstream, tw->dy_row, (size_t)H * sizeof(double));
    }

    /* §8.2.3-§8.2.4 combine and the routed experts, slot order */
    for (int j = 0; j < k; j++) {
        if (!kept[j])
            continue;
        ffn_params p = expert_params(c, ids[j]);
        ffn_grad g = expert_grad(c, ids[j]);
        const double *o = tw->outputs + (int64_t)j * H;
        double scale = spec->weight_on_input ? tw->w_final[j] : 1.0;
        for (int64_t h = 0; h < H; h++)
            tw->inputs[h] = scale * tw->x_row[h];
        ffn_forward(c->reader, &p, act, H, tw->inputs, &tw->ffn, tw->mlp_out); /* a, h again */
        if (spec->weight_on_input) { /* u = w' x, output added with weight 1 */
            ffn_backward(c->reader, &p, &g, act, H, tw->inputs, tw->upstream, &tw->ffn, tw->du);
            double d_weight = 0.0;
            for (int64_t h = 0; h < H; h++) {
                dx[h] += tw->w_final[j] * tw->du[h];
                d_weight += tw->x_row[h] * tw->du[h];
            }
            tw->dw_final[j] = d_weight;
        } else {
            double d_weight = 0.0;
            for (int64_t h = 0; h < H; h++) {
                tw->d_out[h] = tw->w_final[j] * tw->upstream[h];
                d_weight += tw->upstream[h] * o[h];
            }
            tw->dw_final[j] = d_weight;
            ffn_backward(c->reader, &p, &g, act, H, tw->inputs, tw->d_out, &tw->ffn, tw->du);
            for (int64_t h = 0; h < H; h++)
                dx[h] += tw->du[h];
        }
    }

    router_weights_backward(c, t, tw); /* §8.2.5-§8.2.6 */
    loss_backward(c, tw);              /* §8.2.7-§8.2.8 */
    router_backward(c, t, tw);         /* §8.2.9-§8.2.10 */
}

int moe_ref_backward(const moegen_spec *spec, int64_t n_tokens, const void *x,
                     const moegen_kernel_weights *w, const moe_ref_options *opt, const void *dy,
                     double aux_coeff, double z_coeff, moe_ref_grads *grads, char *why) {
    if (why)
        why[0] = '\0';
    if (!grads)
        return backward_fail(why, "reference backward: grads is required");
    memset(grads, 0, sizeof(*grads));
    if (!spec)
        return backward_fail(why, "reference backward: spec is required");
    if (n_tokens > 0 && !dy)
        return backward_fail(why, "reference backward: dy is required for %lld tokens",
                             (long long)n_tokens);
    if (!isfinite(aux_coeff) || !isfinite(z_coeff))
        return backward_fail(why, "reference backward: aux_coeff and z_coeff must be finite");

    /* §8.1: the forward's decisions are the constants of the backward. This also checks
     * the arguments the forward checks. */
    moe_ref_result routing;
    moe_ref_decisions decisions;
    if (moe_ref_forward_decisions(spec, n_tokens, x, w, opt, 0, &routing, &decisions, why) != 0)
        return -1;

    int status = 0;
    dtype_reader reader = {spec->dtype, NULL};
    token_work tw;
    memset(&tw, 0, sizeof(tw));
    if (spec->dtype != MOEGEN_DTYPE_FP32) {
        reader.table = zeros(65536);
        if (reader.table)
            for (uint32_t bits = 0; bits < 65536; bits++)
                reader.table[bits] = spec->dtype == MOEGEN_DTYPE_FP16 ? moe_ref_half_to_double((uint16_t)bits)
                                                                      : moe_ref_bf16_to_double((uint16_t)bits);
    }
    if ((spec->dtype != MOEGEN_DTYPE_FP32 && !reader.table) || allocate_grads(spec, n_tokens, grads) != 0 ||
        allocate_token_work(spec, &tw) != 0) {
        status = backward_fail(why, "reference backward: out of memory for %lld tokens", (long long)n_tokens);
        goto done;
    }

    backward_context context = {spec, n_tokens, &reader, x, dy, w, opt ? opt->rng_offset : 0, aux_coeff,
                                z_coeff, routing.ids, &decisions, grads};
    for (int64_t t = 0; t < n_tokens; t++)
        token_backward(&context, t, &tw);

done:
    free_token_work(&tw);
    free(reader.table);
    moe_ref_decisions_free(&decisions);
    moe_ref_result_free(&routing);
    if (status != 0)
        moe_ref_grads_free(grads);
    return status;
}
