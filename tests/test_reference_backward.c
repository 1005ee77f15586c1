/* test_reference_backward.c — the reference backward (moe_ref_backward) against central
 * finite differences of the reference forward, and the used_token / forced_kept options of
 * the forward.
 *
 * The differentiated function is the forward's own
 *     L = sum_{t,h} dy[t][h] y[t][h] + aux_coeff aux_loss + z_coeff z_loss
 * (docs/numerics.md §8), evaluated in double from moe_ref_forward's result. Each sampled
 * entry of a weight or of x is moved in its fp32 storage by +-d and +-d/2 (d a power of two;
 * every test value is a multiple of 2^-20 times a power of two, so the moved values are
 * exact in fp32, and the actual steps are measured anyway). A sample is skipped when any of
 * the four runs routes differently from the base run (other experts, order, or another
 * zero pattern of the combine weights), or when the two central differences disagree by
 * more than FD_KINK allowances (a kink: a relu unit or a loss count switching inside the
 * step). The remaining samples compare the analytic gradient with the Richardson
 * extrapolation of the two differences.
 *
 * Tolerances. The forward runs in double and the perturbed inputs are exact, so fp32
 * storage costs nothing here: the differences carry only double rounding
 * (about 1e-16 |L| / d, below 1e-11) and truncation (O(d^4) after extrapolation). A check
 * passes when |fd - an| <= FD_RTOL |an| + FD_ATOL max|an over the tensor| + FD_FLOOR (the
 * "allowance"). Over 60 fill seeds of the whole matrix (about 120000 samples) the worst
 * smooth sample used 2e-4 of its allowance and the two differences of smooth samples agreed
 * within 2.3 allowances, while every kink disagreed by more than 170 (and 200 seeds pass);
 * the deliberately wrong gradient (x 1.01) misses by four orders of magnitude.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"
#include "spec.h"
#include "tensors.h"

#define FD_STEP 0x1p-10   /* d; the second difference uses d / 2 */
#define FD_RTOL 1e-6      /* relative to |analytic| */
#define FD_ATOL 1e-7      /* relative to the largest |analytic| of the tensor */
#define FD_FLOOR 1e-9     /* absolute: double rounding of L over the step */
#define FD_KINK 3.0       /* the two differences disagree by more allowances: not smooth */
#define FD_SIGNIFICANT 8  /* samples among entries with a significant gradient, per tensor */
#define FD_ANY 4          /* samples among all entries, per tensor */

/* ---- a problem: spec, tensors, dy, options ---------------------------------------------- */

typedef struct case_def {
    const char *name;
    int n_experts, top_k;
    int64_t hidden, ffn, n_tokens;
    const char *activation;
    const char *extra; /* YAML appended to the top-level keys */
    double aux_coeff, z_coeff;
    const char *used;  /* NULL, or one char per token: '1' used, '0' masked */
} case_def;

typedef struct problem {
    moegen_spec spec;
    int64_t n_tokens;
    moe_tensors ts;
    moegen_kernel_weights w;
    float *dy;
    uint8_t used[64];
    moe_ref_options opt;
    double aux_coeff, z_coeff;
    double step;          /* the finite-difference step d (FD_STEP) */
    uint64_t sample_seed; /* which entries are sampled */
    moe_ref_result base;
} problem;

static uint64_t rng_next(uint64_t *state) { /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* A uniform multiple of 2^-20 in [-1, 1). */
static double rng_value(uint64_t *state) {
    return (double)((int64_t)(rng_next(state) >> 43) - (1 << 20)) * 0x1p-20;
}

static double power_of_two_scale(int64_t fan_in) { /* largest 2^-n <= 1/sqrt(fan_in) */
    double s = 1.0;
    while (s * s * (double)fan_in > 1.0)
        s *= 0.5;
    return s;
}

static void parse_spec(const char *yaml, moegen_spec *spec) {
    moegen_error err;
    memset(&err, 0, sizeof(err));
    if (moegen_spec_parse(yaml, strlen(yaml), "test_reference_backward", spec, &err) != MOEGEN_OK)
        fail_msg("spec does not parse: %s\n%s", err.message, yaml);
}

static void case_yaml(const case_def *c, const char *dtype, char *yaml, size_t size) {
    int written = snprintf(yaml, size,
                           "name: backward-%s\nnum_experts: %d\nnum_experts_per_tok: %d\nhidden_size: %lld\n"
                           "moe_intermediate_size: %lld\nactivation: %s\ndtype: %s\n%s",
                           c->name, c->n_experts, c->top_k, (long long)c->hidden, (long long)c->ffn,
                           c->activation, dtype, c->extra ? c->extra : "");
    assert_true(written > 0 && (size_t)written < size);
}

/* Fills every tensor with multiples of 2^-20 scaled by a power of two like an initialized
 * layer: x in [-1, 1), router_w larger than 1/sqrt(H) so routing is decisive. */
static void fill_tensors(problem *p, uint64_t seed) {
    const moegen_spec *spec = &p->spec;
    double scale[MOE_T_COUNT];
    for (int i = 0; i < MOE_T_COUNT; i++)
        scale[i] = 0.125; /* biases */
    scale[MOE_T_X] = 1.0;
    scale[MOE_T_ROUTER_W] = 2.0 * power_of_two_scale(spec->hidden_size);
    scale[MOE_T_W1] = scale[MOE_T_SHARED_W1] = scale[MOE_T_RESIDUAL_W1] = power_of_two_scale(spec->hidden_size);
    scale[MOE_T_SHARED_GATE] = scale[MOE_T_RESIDUAL_COEF_W] = power_of_two_scale(spec->hidden_size);
    scale[MOE_T_W2] = scale[MOE_T_RESIDUAL_W2] = power_of_two_scale(spec->moe_intermediate_size);
    scale[MOE_T_SHARED_W2] = power_of_two_scale(spec->shared.count ? spec->shared.intermediate_size : 16);
    scale[MOE_T_SCORE_BIAS] = 0.0625;
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < MOE_T_COUNT; i++)
        for (size_t n = 0; n < p->ts.t[i].n_elems; n++)
            moe_tensor_set(&p->ts, i, n, rng_value(&state) * scale[i]);
}

static void run_forward(const problem *p, moe_ref_result *res) {
    char why[256];
    if (moe_ref_forward(&p->spec, p->n_tokens, p->ts.t[MOE_T_X].data, &p->w, &p->opt, res, why) != 0)
        fail_msg("moe_ref_forward: %s", why);
}

static void problem_create(problem *p, const case_def *c, uint64_t seed) {
    char yaml[2048];
    memset(p, 0, sizeof(*p));
    case_yaml(c, "fp32", yaml, sizeof(yaml));
    parse_spec(yaml, &p->spec);
    p->n_tokens = c->n_tokens;
    assert_int_equal(moe_tensors_alloc(&p->spec, c->n_tokens, &p->ts), 0);
    fill_tensors(p, seed);
    moe_tensors_weights(&p->ts, &p->w);
    p->dy = calloc((size_t)(c->n_tokens * c->hidden + 1), sizeof(float));
    assert_non_null(p->dy);
    uint64_t state = seed * 0xbf58476d1ce4e5b9ull + 7;
    for (int64_t i = 0; i < c->n_tokens * c->hidden; i++)
        p->dy[i] = (float)rng_value(&state);
    p->opt.rng_offset = 11;
    if (c->used) {
        assert_int_equal((int64_t)strlen(c->used), c->n_tokens);
        for (int64_t t = 0; t < c->n_tokens; t++)
            p->used[t] = c->used[t] == '1';
        p->opt.used_token = p->used;
    }
    p->aux_coeff = c->aux_coeff;
    p->z_coeff = c->z_coeff;
    p->step = FD_STEP;
    p->sample_seed = seed;
    run_forward(p, &p->base);
}

static void problem_destroy(problem *p) {
    moe_ref_result_free(&p->base);
    moe_tensors_free(&p->ts);
    free(p->dy);
    moegen_spec_free(&p->spec);
}

static void run_backward(const problem *p, moe_ref_grads *grads) {
    char why[256];
    if (moe_ref_backward(&p->spec, p->n_tokens, p->ts.t[MOE_T_X].data, &p->w, &p->opt, p->dy, p->aux_coeff,
                         p->z_coeff, grads, why) != 0)
        fail_msg("moe_ref_backward: %s", why);
}

/* L of a forward result. */
static double loss_of(const problem *p, const moe_ref_result *res) {
    double sum = 0.0;
    for (int64_t i = 0; i < p->n_tokens * p->spec.hidden_size; i++)
        sum += (double)p->dy[i] * res->y[i];
    return sum + p->aux_coeff * res->aux_loss + p->z_coeff * res->z_loss;
}

/* 1 when res routed exactly as the base: same experts in the same order, same kept pattern. */
static int same_routing(const problem *p, const moe_ref_result *res) {
    int64_t routes = p->n_tokens * p->spec.top_k;
    for (int64_t r = 0; r < routes; r++)
        if (res->ids[r] != p->base.ids[r] || (res->weights[r] == 0.0) != (p->base.weights[r] == 0.0))
            return 0;
    return 1;
}

/* ---- the finite-difference comparison --------------------------------------------------- */

typedef struct fd_stats {
    int checked, skipped_routing, skipped_kink, failed;
    double worst;          /* largest |fd - an| / (its allowance) over checked samples */
    char first_failure[320];
} fd_stats;

/* Runs the forward with *entry moved to original + step; returns L, and *routed = 0 when the
 * routing changed; *actual gets the step after rounding to fp32. */
static double moved_loss(const problem *p, float *entry, float original, double step, double *actual,
                         int *routed) {
    *entry = (float)((double)original + step);
    *actual = (double)*entry - (double)original;
    moe_ref_result res;
    run_forward(p, &res);
    double loss = loss_of(p, &res);
    if (!same_routing(p, &res))
        *routed = 0;
    moe_ref_result_free(&res);
    *entry = original;
    return loss;
}

/* Checks analytic[index] (times `factor`, 1 unless testing that errors are caught) against
 * central differences of L in `entry`. scale: the largest |analytic| of the tensor. */
static void check_entry(const problem *p, const char *tensor, size_t index, float *entry, double analytic,
                        double scale, fd_stats *st) {
    float original = *entry;
    double fd[2];
    int routed = 1;
    for (int i = 0; i < 2; i++) {
        double step = p->step / (double)(1 << i), up, down;
        double l_up = moved_loss(p, entry, original, step, &up, &routed);
        double l_down = moved_loss(p, entry, original, -step, &down, &routed);
        assert_true(up > 0.0 && down < 0.0);
        fd[i] = (l_up - l_down) / (up - down);
    }
    if (!routed) {
        st->skipped_routing++;
        return;
    }
    double allowance = FD_RTOL * fabs(analytic) + FD_ATOL * scale + FD_FLOOR;
    /* Smooth in the step, the two differences agree to O(d^2) (below one allowance in
     * practice); a relu unit or a loss count switching inside the step makes them disagree.
     * A switch between d/2 and d leaves the d/2 difference exact and moves the
     * extrapolation by a third of the disagreement, so 3 allowances let nothing through.
     * The allowance of this test is sized by the differences themselves, so that a wrong
     * (say, zero) analytic value cannot turn a smooth sample into a skipped one. */
    double smooth_allowance = FD_RTOL * fmax(fabs(analytic), fabs(fd[1])) + FD_ATOL * scale + FD_FLOOR;
    if (fabs(fd[0] - fd[1]) > FD_KINK * smooth_allowance) {
        st->skipped_kink++;
        return;
    }
    double extrapolated = fd[1] + (fd[1] - fd[0]) / 3.0; /* Richardson: O(d^4) */
    double error = fabs(extrapolated - analytic);
    st->checked++;
    if (error / allowance > st->worst)
        st->worst = error / allowance;
    if (!(error <= allowance)) {
        if (st->failed++ == 0)
            snprintf(st->first_failure, sizeof(st->first_failure),
                     "%s[%zu]: analytic %.12g, finite difference %.12g (d: %.12g, d/2: %.12g)", tensor, index,
                     analytic, extrapolated, fd[0], fd[1]);
    }
}

/* Samples entries of one fp32 tensor: FD_SIGNIFICANT among those whose gradient is at
 * least 1e-3 of the tensor's largest, FD_ANY among all (zeros must be zeros too). */
static void check_tensor(const problem *p, const char *tensor, float *data, size_t count, const double *analytic,
                         double factor, uint64_t seed, fd_stats *st) {
    if (!data || count == 0)
        return;
    assert_non_null(analytic);
    double scale = 0.0;
    for (size_t i = 0; i < count; i++)
        scale = fmax(scale, fabs(analytic[i] * factor));
    size_t *significant = malloc(count * sizeof(size_t)), n_significant = 0;
    assert_non_null(significant);
    for (size_t i = 0; i < count; i++)
        if (fabs(analytic[i] * factor) >= 1e-3 * scale && scale > 0.0)
            significant[n_significant++] = i;
    uint64_t state = seed | 1;
    for (int s = 0; s < FD_SIGNIFICANT && n_significant > 0; s++) {
        size_t i = significant[rng_next(&state) % n_significant];
        check_entry(p, tensor, i, data + i, analytic[i] * factor, scale, st);
    }
    for (int s = 0; s < FD_ANY; s++) {
        size_t i = rng_next(&state) % count;
        check_entry(p, tensor, i, data + i, analytic[i] * factor, scale, st);
    }
    free(significant);
}

/* Every tensor the spec has, against grads (times factor). */
static void check_all(const problem *p, const moe_ref_grads *g, double factor, fd_stats *st) {
    static const struct {
        int tensor;
        size_t offset; /* of the gradient array in moe_ref_grads */
    } pairs[] = {
        {MOE_T_X, offsetof(moe_ref_grads, dx)},
        {MOE_T_ROUTER_W, offsetof(moe_ref_grads, router_w)},
        {MOE_T_ROUTER_B, offsetof(moe_ref_grads, router_b)},
        {MOE_T_W1, offsetof(moe_ref_grads, w1)},
        {MOE_T_B1, offsetof(moe_ref_grads, b1)},
        {MOE_T_W2, offsetof(moe_ref_grads, w2)},
        {MOE_T_B2, offsetof(moe_ref_grads, b2)},
        {MOE_T_SHARED_W1, offsetof(moe_ref_grads, shared_w1)},
        {MOE_T_SHARED_B1, offsetof(moe_ref_grads, shared_b1)},
        {MOE_T_SHARED_W2, offsetof(moe_ref_grads, shared_w2)},
        {MOE_T_SHARED_B2, offsetof(moe_ref_grads, shared_b2)},
        {MOE_T_SHARED_GATE, offsetof(moe_ref_grads, shared_gate)},
        {MOE_T_RESIDUAL_W1, offsetof(moe_ref_grads, residual_w1)},
        {MOE_T_RESIDUAL_B1, offsetof(moe_ref_grads, residual_b1)},
        {MOE_T_RESIDUAL_W2, offsetof(moe_ref_grads, residual_w2)},
        {MOE_T_RESIDUAL_B2, offsetof(moe_ref_grads, residual_b2)},
        {MOE_T_RESIDUAL_COEF_W, offsetof(moe_ref_grads, residual_coef_w)},
        {MOE_T_RESIDUAL_COEF_B, offsetof(moe_ref_grads, residual_coef_b)},
    };
    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
        const moe_tensor *t = &p->ts.t[pairs[i].tensor];
        const double *analytic = *(double *const *)((const char *)g + pairs[i].offset);
        if (t->n_elems == 0) {
            if (pairs[i].tensor != MOE_T_X && analytic != NULL)
                fail_msg("gradient of %s is allocated though the spec lacks it", t->name);
            continue;
        }
        if (!analytic)
            fail_msg("gradient of %s is missing", t->name);
        check_tensor(p, t->name, t->data, t->n_elems, analytic, factor,
                     p->sample_seed * 0x9e3779b97f4a7c15ull + i * 977, st);
    }
    /* score_bias steers selection only (§8.1): L does not move with it while routing holds */
    const moe_tensor *bias = &p->ts.t[MOE_T_SCORE_BIAS];
    if (bias->n_elems > 0) {
        double zero[MOEGEN_MAX_EXPERTS] = {0};
        check_tensor(p, bias->name, bias->data, bias->n_elems, zero, factor, p->sample_seed + 5, st);
    }
}

/* ---- the matrix ----------------------------------------------------------------------------- */

static const case_def CASES[] = {
    {"softmax_then_topk", 8, 2, 16, 16, 7, "relu",
     "router:\n  order: softmax_then_topk\n  aux_loss: megatron\n", 0.3, 0.2, NULL},
    {"topk_then_softmax_norm_rsf", 8, 3, 16, 16, 6, "silu",
     "router:\n  order: topk_then_softmax\n  norm_topk_prob: true\n  routed_scaling_factor: 2.5\n"
     "  aux_loss: megatron\n", 0.5, 0.1, NULL},
    {"softmax_norm_rsf_router_bias", 6, 3, 32, 16, 5, "gelu",
     "router:\n  order: softmax_then_topk\n  norm_topk_prob: true\n  routed_scaling_factor: 1.75\n"
     "  router_bias: true\n  aux_loss: none\n", 0.0, 0.3, NULL},
    {"sigmoid_groups_score_bias", 8, 3, 16, 16, 7, "gelu_tanh",
     "router:\n  score_function: sigmoid\n  norm_topk_prob: true\n  routed_scaling_factor: 2.5\n"
     "  score_bias: true\n  n_group: 4\n  topk_group: 2\n  aux_loss: megatron\n", 0.4, 0.1, NULL},
    {"sigmoid_no_norm_rsf", 8, 2, 16, 16, 6, "silu",
     "router:\n  score_function: sigmoid\n  routed_scaling_factor: 1.5\n  router_bias: true\n"
     "  aux_loss: megatron\n", 0.3, 0.2, NULL},
    {"sqrtsoftplus_groups_max_zero", 8, 2, 16, 16, 7, "swiglu",
     "router:\n  score_function: sqrtsoftplus\n  routed_scaling_factor: 1.5\n  n_group: 4\n"
     "  topk_group: 2\n  group_score: max\n  group_mask: zero\n  aux_loss: megatron\n", 0.5, 0.2, NULL},
    {"sqrtsoftplus_norm_topm", 8, 3, 16, 16, 6, "geglu",
     "router:\n  score_function: sqrtsoftplus\n  norm_topk_prob: true\n  routed_scaling_factor: 2.0\n"
     "  n_group: 2\n  topk_group: 1\n  group_topm: 2\n  aux_loss: megatron\n", 0.4, 0.1, NULL},
    {"softmax_groups_topk_then_softmax", 8, 2, 16, 16, 6, "relu",
     "router:\n  order: topk_then_softmax\n  n_group: 4\n  topk_group: 2\n  aux_loss: megatron\n", 0.2,
     0.2, NULL},
    {"capacity_probs_renormalize", 4, 2, 16, 16, 7, "swiglu",
     "router:\n  order: softmax_then_topk\n  aux_loss: megatron\ncapacity:\n  mode: factor\n"
     "  capacity_factor: 0.5\n  formula: megatron\n  priority: probs\n  renormalize: true\n", 0.2, 0.1, NULL},
    {"capacity_fixed_choice_major", 4, 2, 16, 16, 7, "geglu",
     "router:\n  norm_topk_prob: true\n  routed_scaling_factor: 1.25\ncapacity:\n  expert_capacity: 2\n"
     "  priority: position_choice_major\n", 0.2, 0.1, NULL},
    {"capacity_random_pad_renormalize", 4, 3, 16, 16, 7, "relu",
     "mode: train\nrouter:\n  order: softmax_then_topk\n  routed_scaling_factor: 1.5\ncapacity:\n"
     "  mode: factor\n  capacity_factor: 0.75\n  priority: random\n  renormalize: true\n"
     "  pad_to_capacity: true\n", 0.3, 0.1, NULL},
    {"capacity_sigmoid_norm_no_renormalize", 4, 2, 16, 16, 7, "gelu_tanh",
     "router:\n  score_function: sigmoid\n  norm_topk_prob: true\n  routed_scaling_factor: 2.5\n"
     "  aux_loss: megatron\ncapacity:\n  expert_capacity: 2\n  priority: probs\n", 0.3, 0.1, NULL},
    {"capacity_position_no_renormalize", 4, 2, 16, 16, 7, "gelu",
     "router:\n  order: softmax_then_topk\ncapacity:\n  expert_capacity: 3\n  priority: position\n", 0.3, 0.1,
     NULL},
    {"weight_on_input_bias_drops", 4, 1, 16, 16, 7, "swiglu",
     "weight_on_input: true\nexpert_bias: true\nrouter:\n  score_function: sigmoid\n  aux_loss: megatron\n"
     "capacity:\n  expert_capacity: 1\n", 0.3, 0.2, NULL},
    {"weight_on_input_softmax", 4, 1, 16, 16, 5, "gelu_tanh",
     "weight_on_input: true\nrouter:\n  order: softmax_then_topk\n  routed_scaling_factor: 2.0\n", 0.3, 0.1,
     NULL},
    {"shared_gate_expert_bias", 4, 2, 16, 16, 6, "silu",
     "expert_bias: true\nshared_experts:\n  count: 2\n  intermediate_size: 32\n  gate: true\n", 0.2, 0.1, NULL},
    {"shared_plain", 4, 2, 16, 16, 5, "geglu", "shared_experts:\n  count: 1\n  intermediate_size: 16\n", 0.2, 0.1,
     NULL},
    {"residual_deepspeed_k1", 4, 1, 16, 16, 7, "gelu_tanh",
     "semantics: deepspeed\nuse_residual: true\nexpert_bias: true\ncapacity:\n  min_capacity: 1\n", 0.5,
     0.2, NULL},
    {"residual_shared_k2", 4, 2, 16, 16, 6, "relu",
     "use_residual: true\nshared_experts:\n  count: 1\n  intermediate_size: 16\n  gate: true\n", 0.3, 0.1, NULL},
    {"deepspeed_k1_drops", 4, 1, 16, 16, 7, "gelu",
     "semantics: deepspeed\ncapacity:\n  min_capacity: 1\n  capacity_factor: 0.5\n", 0.7, 0.3, NULL},
    {"deepspeed_k2_sigmoid", 4, 2, 16, 16, 7, "silu",
     "semantics: deepspeed\nrouter:\n  score_function: sigmoid\ncapacity:\n  min_capacity: 1\n"
     "  capacity_factor: 0.75\n", 0.7, 0.3, NULL},
    {"deepspeed_k3_sigmoid_megatron_formula", 8, 3, 16, 16, 6, "swiglu",
     "semantics: deepspeed\nrouter:\n  score_function: sigmoid\n  norm_topk_prob: true\ncapacity:\n"
     "  mode: dropless\n", 0.7, 0.3, NULL},
    {"deepspeed_k3_softmax", 8, 3, 16, 16, 6, "gelu",
     "semantics: deepspeed\ncapacity:\n  mode: dropless\n", 0.7, 0.3, NULL},
    {"train_jitter_noise_k2", 8, 2, 16, 16, 7, "silu",
     "semantics: deepspeed\nmode: train\nrouter:\n  input_jitter: 0.1\n  noise: rsample\n  seed: 42\n"
     "capacity:\n  min_capacity: 1\n", 0.5, 0.2, NULL},
    {"train_jitter_noise_k1", 4, 1, 16, 16, 7, "relu",
     "semantics: deepspeed\nmode: train\nrouter:\n  input_jitter: 0.05\n  noise: rsample\n  seed: 7\n"
     "capacity:\n  min_capacity: 1\n", 0.5, 0.2, NULL},
    {"train_jitter_sigmoid_megatron", 8, 2, 32, 16, 6, "gelu_tanh",
     "mode: train\nrouter:\n  score_function: sigmoid\n  input_jitter: 0.2\n  seed: 3\n  router_bias: true\n",
     0.4, 0.2, NULL},
    {"used_token_deepspeed_k1", 4, 1, 16, 16, 7, "gelu",
     "semantics: deepspeed\nshared_experts:\n  count: 1\n  intermediate_size: 16\ncapacity:\n"
     "  min_capacity: 1\n", 0.6, 0.3, "1011011"},
    {"used_token_deepspeed_k2_residual", 4, 2, 16, 16, 7, "swiglu",
     "semantics: deepspeed\nuse_residual: true\ncapacity:\n  min_capacity: 1\n", 0.6, 0.3, "0110111"},
    {"used_token_megatron_capacity", 4, 2, 16, 16, 7, "silu",
     "router:\n  order: softmax_then_topk\n  norm_topk_prob: true\n  aux_loss: megatron\ncapacity:\n"
     "  mode: factor\n  capacity_factor: 0.5\n  renormalize: true\n", 0.6, 0.3, "1101101"},
    {"used_token_sigmoid_megatron", 8, 3, 16, 16, 6, "relu",
     "router:\n  score_function: sigmoid\n  aux_loss: megatron\n", 0.6, 0.3, "100111"},
    {"z_loss_only_one_token", 8, 2, 16, 16, 1, "geglu",
     "router:\n  router_bias: true\n  aux_loss: none\n", 0.0, 1.0, NULL},
    {"all_experts_k_equals_e", 4, 4, 16, 16, 3, "silu",
     "router:\n  order: topk_then_softmax\n  aux_loss: megatron\n", 0.3, 0.3, NULL},
};
#define N_CASES (sizeof(CASES) / sizeof(CASES[0]))

static int case_has_drops(const problem *p) { return p->base.n_dropped > 0; }

/* A seed of the case's name, so that adding a case moves no other. */
static uint64_t name_seed(const char *name) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *name; name++)
        h = (h ^ (unsigned char)*name) * 1099511628211ull;
    return h;
}

static void run_case(const case_def *c, uint64_t seed, fd_stats *st, int *dropped) {
    problem p;
    problem_create(&p, c, seed);
    *dropped = case_has_drops(&p);
    moe_ref_grads grads;
    run_backward(&p, &grads);
    check_all(&p, &grads, 1.0, st);
    moe_ref_grads_free(&grads);
    problem_destroy(&p);
}

static void backward_matches_finite_differences(void **state) {
    (void)state;
    int total_checked = 0, total_skipped = 0;
    double worst = 0.0;
    for (size_t i = 0; i < N_CASES; i++) {
        const case_def *c = &CASES[i];
        fd_stats st;
        memset(&st, 0, sizeof(st));
        int dropped = 0;
        run_case(c, name_seed(c->name), &st, &dropped);
        int skipped = st.skipped_routing + st.skipped_kink;
        print_message("%-40s checked %3d, skipped %2d (routing %d, kink %d), worst %.3g of the allowance%s\n",
                      c->name, st.checked, skipped, st.skipped_routing, st.skipped_kink, st.worst,
                      dropped ? ", drops routes" : "");
        if (st.failed)
            fail_msg("%s: %d of %d samples disagree; first: %s", c->name, st.failed, st.checked,
                     st.first_failure);
        if (st.checked < 3 * skipped || st.checked < 20)
            fail_msg("%s: too few samples checked (%d, %d skipped)", c->name, st.checked, skipped);
        if ((strstr(c->name, "capacity") || strstr(c->name, "drops")) && !dropped)
            fail_msg("%s: meant to drop routes, but the base run drops none", c->name);
        total_checked += st.checked;
        total_skipped += skipped;
        if (st.worst > worst)
            worst = st.worst;
    }
    print_message("all cases: %d samples checked, %d skipped, worst %.3g of the allowance\n", total_checked,
                  total_skipped, worst);
}

/* The comparison must be able to fail: the analytic gradient times 1.01 is caught in
 * (nearly) every significant sample. */
static void wrong_gradient_is_detected(void **state) {
    (void)state;
    const case_def *c = &CASES[0];
    problem p;
    problem_create(&p, c, 77);
    moe_ref_grads grads;
    run_backward(&p, &grads);
    fd_stats right, wrong;
    memset(&right, 0, sizeof(right));
    memset(&wrong, 0, sizeof(wrong));
    check_all(&p, &grads, 1.0, &right);
    check_all(&p, &grads, 1.01, &wrong);
    assert_int_equal(right.failed, 0);
    print_message("x 1.01: %d of %d checked samples fail\n", wrong.failed, wrong.checked);
    assert_true(wrong.failed > 0);
    assert_true(wrong.failed >= wrong.checked / 2);
    /* A single wrong entry is caught too. */
    double saved = grads.w2[0];
    fd_stats one;
    memset(&one, 0, sizeof(one));
    grads.w2[0] = saved + 1e-3 * (fabs(saved) + 1e-3);
    check_entry(&p, "w2", 0, (float *)p.ts.t[MOE_T_W2].data, grads.w2[0], fabs(saved) + 1e-3, &one);
    assert_int_equal(one.checked, 1);
    assert_int_equal(one.failed, 1);
    grads.w2[0] = saved;
    moe_ref_grads_free(&grads);
    problem_destroy(&p);
}

/* A sample whose perturbation moves routing is skipped, not compared: a router bias moved
 * by +-2 makes its expert win (or lose) some token's slot. */
static void routing_changes_are_skipped(void **state) {
    (void)state;
    const case_def c = {"routing_skip", 8, 2, 16, 16, 7, "silu",
                        "router:\n  order: softmax_then_topk\n  router_bias: true\n", 0.0, 0.0, NULL};
    problem p;
    problem_create(&p, &c, name_seed(c.name));
    moe_ref_grads grads;
    run_backward(&p, &grads);
    p.step = 2.0;
    fd_stats st;
    memset(&st, 0, sizeof(st));
    float *router_b = p.ts.t[MOE_T_ROUTER_B].data;
    for (int e = 0; e < p.spec.num_experts; e++)
        check_entry(&p, "router_b", (size_t)e, router_b + e, grads.router_b[e] * 1.5, 1.0, &st);
    assert_int_equal(st.skipped_routing, p.spec.num_experts);
    assert_int_equal(st.checked, 0);
    moe_ref_grads_free(&grads);
    problem_destroy(&p);
}

/* §8.1: a logit that is NaN or -inf (here through router_b) passes no gradient; the other
 * experts' gradients still match finite differences. */
static void invalid_logits_pass_no_gradient(void **state) {
    (void)state;
    const case_def c = {"invalid_logits", 8, 2, 16, 16, 5, "silu",
                        "router:\n  order: softmax_then_topk\n  router_bias: true\n  aux_loss: megatron\n", 0.5,
                        0.5, NULL};
    problem p;
    problem_create(&p, &c, 13);
    float *router_b = p.ts.t[MOE_T_ROUTER_B].data;
    router_b[1] = NAN;
    router_b[6] = -INFINITY;
    moe_ref_result_free(&p.base);
    run_forward(&p, &p.base);
    for (int64_t r = 0; r < p.n_tokens * p.spec.top_k; r++)
        assert_true(p.base.ids[r] != 1 && p.base.ids[r] != 6);
    moe_ref_grads grads;
    run_backward(&p, &grads);
    int64_t H = p.spec.hidden_size;
    for (int64_t h = 0; h < H; h++)
        assert_true(grads.router_w[1 * H + h] == 0.0 && grads.router_w[6 * H + h] == 0.0);
    assert_true(grads.router_b[1] == 0.0 && grads.router_b[6] == 0.0);
    for (int64_t n = 0; n < p.n_tokens * H; n++)
        assert_true(isfinite(grads.dx[n]));
    fd_stats st;
    memset(&st, 0, sizeof(st));
    check_tensor(&p, "x", p.ts.t[MOE_T_X].data, p.ts.t[MOE_T_X].n_elems, grads.dx, 1.0, 3, &st);
    check_tensor(&p, "router_w", p.ts.t[MOE_T_ROUTER_W].data, p.ts.t[MOE_T_ROUTER_W].n_elems, grads.router_w,
                 1.0, 4, &st);
    check_tensor(&p, "w1", p.ts.t[MOE_T_W1].data, p.ts.t[MOE_T_W1].n_elems, grads.w1, 1.0, 5, &st);
    if (st.failed)
        fail_msg("%s", st.first_failure);
    assert_true(st.checked >= 24);
    moe_ref_grads_free(&grads);
    problem_destroy(&p);
}

/* ---- zero tokens, dtypes, argument errors ------------------------------------------------- */

static void zero_tokens_give_zero_gradients(void **state) {
    (void)state;
    const case_def c = {"zero_tokens", 4, 2, 16, 16, 0, "swiglu",
                        "expert_bias: true\nuse_residual: true\nrouter:\n  router_bias: true\n"
                        "shared_experts:\n  count: 1\n  intermediate_size: 16\n  gate: true\n", 1.0, 1.0, NULL};
    problem p;
    problem_create(&p, &c, 5);
    moe_ref_grads grads;
    char why[256];
    assert_int_equal(moe_ref_backward(&p.spec, 0, NULL, &p.w, NULL, NULL, 1.0, 1.0, &grads, why), 0);
    const double *arrays[] = {grads.router_w, grads.router_b, grads.w1, grads.b1, grads.w2, grads.b2,
                              grads.shared_w1, grads.shared_b1, grads.shared_w2, grads.shared_b2,
                              grads.shared_gate, grads.residual_w1, grads.residual_b1, grads.residual_w2,
                              grads.residual_b2, grads.residual_coef_w, grads.residual_coef_b};
    const int tensors[] = {MOE_T_ROUTER_W, MOE_T_ROUTER_B, MOE_T_W1, MOE_T_B1, MOE_T_W2, MOE_T_B2,
                           MOE_T_SHARED_W1, MOE_T_SHARED_B1, MOE_T_SHARED_W2, MOE_T_SHARED_B2,
                           MOE_T_SHARED_GATE, MOE_T_RESIDUAL_W1, MOE_T_RESIDUAL_B1, MOE_T_RESIDUAL_W2,
                           MOE_T_RESIDUAL_B2, MOE_T_RESIDUAL_COEF_W, MOE_T_RESIDUAL_COEF_B};
    assert_non_null(grads.dx);
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) {
        assert_non_null(arrays[i]);
        for (size_t n = 0; n < p.ts.t[tensors[i]].n_elems; n++)
            assert_true(arrays[i][n] == 0.0);
    }
    moe_ref_grads_free(&grads);
    moe_ref_grads_free(&grads); /* a freed (zeroed) struct is fine */
    moe_ref_grads_free(NULL);
    problem_destroy(&p);
}

/* fp16 / bf16 layers: the values are widened exactly, so a 16-bit layer whose values are
 * representable gives the very gradients of the fp32 layer holding the same values. */
static void half_dtypes_widen_exactly(void **state) {
    (void)state;
    const case_def c = {"dtypes", 4, 2, 16, 16, 5, "swiglu",
                        "expert_bias: true\nuse_residual: true\nrouter:\n  order: softmax_then_topk\n"
                        "  aux_loss: megatron\nshared_experts:\n  count: 1\n  intermediate_size: 16\n"
                        "  gate: true\n", 0.5, 0.5, "11011"};
    const char *dtypes[] = {"fp16", "bf16"};
    for (int d = 0; d < 2; d++) {
        problem p;
        problem_create(&p, &c, 31 + d);
        /* round every layer-dtype value (and dy) to the 16-bit type, in the fp32 layer */
        moe_tensors half;
        moegen_spec half_spec;
        char yaml[2048];
        case_yaml(&c, dtypes[d], yaml, sizeof(yaml));
        parse_spec(yaml, &half_spec);
        assert_int_equal(moe_tensors_alloc(&half_spec, c.n_tokens, &half), 0);
        for (int i = 0; i < MOE_T_COUNT; i++) {
            float *values = p.ts.t[i].data;
            for (size_t n = 0; n < p.ts.t[i].n_elems; n++) {
                if (!half.t[i].fp32) {
                    uint16_t bits = d == 0 ? moe_float_to_half(values[n]) : moe_float_to_bf16(values[n]);
                    values[n] = (float)(d == 0 ? moe_ref_half_to_double(bits) : moe_ref_bf16_to_double(bits));
                }
                moe_tensor_set(&half, i, n, values[n]);
            }
        }
        uint16_t *half_dy = calloc((size_t)(c.n_tokens * c.hidden), sizeof(uint16_t));
        assert_non_null(half_dy);
        for (int64_t n = 0; n < c.n_tokens * c.hidden; n++) {
            half_dy[n] = d == 0 ? moe_float_to_half(p.dy[n]) : moe_float_to_bf16(p.dy[n]);
            p.dy[n] = (float)(d == 0 ? moe_ref_half_to_double(half_dy[n]) : moe_ref_bf16_to_double(half_dy[n]));
        }
        moe_ref_grads full, narrow;
        run_backward(&p, &full);
        moegen_kernel_weights half_w;
        moe_tensors_weights(&half, &half_w);
        char why[256];
        assert_int_equal(moe_ref_backward(&half_spec, c.n_tokens, half.t[MOE_T_X].data, &half_w, &p.opt, half_dy,
                                          p.aux_coeff, p.z_coeff, &narrow, why),
                         0);
        const double *a[] = {full.dx, full.router_w, full.w1, full.b1, full.w2, full.b2, full.shared_w1,
                             full.shared_gate, full.residual_w2, full.residual_coef_w};
        const double *b[] = {narrow.dx, narrow.router_w, narrow.w1, narrow.b1, narrow.w2, narrow.b2,
                             narrow.shared_w1, narrow.shared_gate, narrow.residual_w2, narrow.residual_coef_w};
        const int sizes_of[] = {MOE_T_X, MOE_T_ROUTER_W, MOE_T_W1, MOE_T_B1, MOE_T_W2, MOE_T_B2,
                                MOE_T_SHARED_W1, MOE_T_SHARED_GATE, MOE_T_RESIDUAL_W2, MOE_T_RESIDUAL_COEF_W};
        double largest = 0.0;
        for (size_t i = 0; i < sizeof(a) / sizeof(a[0]); i++)
            for (size_t n = 0; n < p.ts.t[sizes_of[i]].n_elems; n++) {
                if (a[i][n] != b[i][n])
                    fail_msg("%s: gradient %zu[%zu] differs: %.17g vs %.17g", dtypes[d], i, n, a[i][n], b[i][n]);
                largest = fmax(largest, fabs(a[i][n]));
            }
        assert_true(largest > 0.0);
        moe_ref_grads_free(&full);
        moe_ref_grads_free(&narrow);
        free(half_dy);
        moe_tensors_free(&half);
        moegen_spec_free(&half_spec);
        problem_destroy(&p);
    }
}

static void bad_arguments_are_refused(void **state) {
    (void)state;
    problem p;
    problem_create(&p, &CASES[0], 9);
    moe_ref_grads grads;
    char why[256];
    assert_int_equal(moe_ref_backward(&p.spec, p.n_tokens, p.ts.t[MOE_T_X].data, &p.w, NULL, NULL, 0.0, 0.0,
                                      &grads, why),
                     -1);
    assert_non_null(strstr(why, "dy"));
    assert_null(grads.dx);
    assert_int_equal(moe_ref_backward(&p.spec, -1, p.ts.t[MOE_T_X].data, &p.w, NULL, p.dy, 0.0, 0.0, &grads, why),
                     -1);
    assert_null(grads.w1);
    assert_int_equal(moe_ref_backward(&p.spec, p.n_tokens, p.ts.t[MOE_T_X].data, &p.w, NULL, p.dy, NAN, 0.0,
                                      &grads, why),
                     -1);
    assert_int_equal(moe_ref_backward(&p.spec, p.n_tokens, p.ts.t[MOE_T_X].data, &p.w, NULL, p.dy, 0.0, 0.0,
                                      NULL, why),
                     -1);
    problem_destroy(&p);
}

/* ---- forced routing ----------------------------------------------------------------------- */

/* Forcing the reference's own ids, weights and kept marks changes nothing; forcing other
 * kept marks moves exactly those routes, in the forward and in the backward. */
static void forced_routing_is_honoured(void **state) {
    (void)state;
    const case_def *c = NULL;
    for (size_t i = 0; i < N_CASES; i++)
        if (strcmp(CASES[i].name, "capacity_probs_renormalize") == 0)
            c = &CASES[i];
    assert_non_null(c);
    problem p;
    problem_create(&p, c, 21);
    int64_t routes = p.n_tokens * p.spec.top_k;
    assert_true(p.base.n_dropped > 0);
    int32_t *ids = calloc((size_t)routes, sizeof(int32_t));
    float *weights = calloc((size_t)routes, sizeof(float));
    uint8_t *kept = calloc((size_t)routes, 1);
    assert_true(ids && weights && kept);
    for (int64_t r = 0; r < routes; r++) {
        ids[r] = p.base.ids[r];
        weights[r] = (float)p.base.router_weights[r];
        kept[r] = p.base.weights[r] != 0.0;
    }
    moe_ref_grads own, forced;
    run_backward(&p, &own);
    p.opt.forced_ids = ids;
    p.opt.forced_router_weights = weights;
    p.opt.forced_kept = kept;
    run_backward(&p, &forced);
    for (int64_t n = 0; n < p.n_tokens * p.spec.hidden_size; n++)
        assert_true(own.dx[n] == forced.dx[n]);
    for (size_t n = 0; n < p.ts.t[MOE_T_W1].n_elems; n++)
        assert_true(own.w1[n] == forced.w1[n]);
    for (size_t n = 0; n < p.ts.t[MOE_T_ROUTER_W].n_elems; n++)
        assert_true(own.router_w[n] == forced.router_w[n]);
    moe_ref_grads_free(&forced);

    /* keep everything: no drops, counts_after == counts_before, and the backward now sends
     * gradient to the previously dropped routes' experts */
    memset(kept, 1, (size_t)routes);
    moe_ref_result res;
    run_forward(&p, &res);
    assert_int_equal(res.n_dropped, 0);
    for (int e = 0; e < p.spec.num_experts; e++)
        assert_int_equal(res.counts_after[e], res.counts_before[e]);
    assert_int_equal(res.capacity, p.base.capacity);
    for (int64_t r = 0; r < routes; r++)
        assert_true(res.weights[r] != 0.0);
    moe_ref_result_free(&res);
    /* the backward follows: the expert of a route the capacity had dropped now gets that
     * route's term in its w2 gradient */
    run_backward(&p, &forced);
    int64_t dropped_route = -1;
    for (int64_t r = 0; r < routes && dropped_route < 0; r++)
        if (p.base.weights[r] == 0.0)
            dropped_route = r;
    assert_true(dropped_route >= 0);
    int expert = p.base.ids[dropped_route];
    int64_t H = p.spec.hidden_size, F = p.spec.moe_intermediate_size;
    double change = 0.0;
    for (int64_t n = 0; n < H * F; n++)
        change += fabs(own.w2[expert * H * F + n] - forced.w2[expert * H * F + n]);
    assert_true(change > 0.0);
    moe_ref_grads_free(&forced);
    moe_ref_grads_free(&own);

    /* drop everything: y of a spec without shared / residual paths is 0 and only the losses
     * carry gradient to the router */
    memset(kept, 0, (size_t)routes);
    run_forward(&p, &res);
    assert_int_equal(res.n_dropped, res.counts_before[0] + res.counts_before[1] + res.counts_before[2] +
                                        res.counts_before[3]);
    for (int64_t n = 0; n < p.n_tokens * p.spec.hidden_size; n++)
        assert_true(res.y[n] == 0.0);
    moe_ref_result_free(&res);
    run_backward(&p, &forced);
    for (size_t n = 0; n < p.ts.t[MOE_T_W1].n_elems; n++)
        assert_true(forced.w1[n] == 0.0);
    moe_ref_grads_free(&forced);

    free(ids);
    free(weights);
    free(kept);
    problem_destroy(&p);
}

/* ---- used_token in the forward (§9) ------------------------------------------------------- */

static double softmax_entry(const double *z, int n, int e) {
    double top = z[0], sum = 0.0;
    for (int i = 1; i < n; i++)
        top = fmax(top, z[i]);
    for (int i = 0; i < n; i++)
        sum += exp(z[i] - top);
    return exp(z[e] - top) / sum;
}

static void used_token_forward_rules(void **state) {
    (void)state;
    /* deepspeed k = 1, position priority, C = 2 from all 7 tokens; shared expert present */
    const case_def c = {"used_rules", 4, 1, 16, 16, 7, "relu",
                        "semantics: deepspeed\nshared_experts:\n  count: 1\n  intermediate_size: 16\n"
                        "capacity:\n  min_capacity: 1\n", 1.0, 1.0, NULL};
    problem p;
    problem_create(&p, &c, 3);
    const int E = 4;
    const int64_t S = 7, H = 16;
    moe_ref_result all = p.base, masked;
    uint8_t used[7] = {0, 1, 1, 0, 1, 1, 1};
    p.opt.used_token = used;
    run_forward(&p, &masked);

    assert_int_equal(masked.capacity, all.capacity); /* C from all S */
    int64_t expected_before[4] = {0}, expected_c1[4] = {0};
    for (int64_t t = 0; t < S; t++) {
        assert_int_equal(masked.ids[t], all.ids[t]); /* still routed and reported */
        assert_true(masked.router_weights[t] == all.router_weights[t]);
        if (used[t]) {
            expected_before[masked.ids[t]]++;
            expected_c1[masked.ids[t]]++;
        } else {
            assert_true(masked.weights[t] == 0.0);
        }
    }
    int64_t dropped = 0;
    for (int e = 0; e < E; e++) {
        assert_int_equal(masked.counts_before[e], expected_before[e]);
        int64_t expected_after = expected_before[e] < masked.capacity ? expected_before[e] : masked.capacity;
        assert_int_equal(masked.counts_after[e], expected_after); /* masked tokens take no slot */
        dropped += expected_before[e] - expected_after;
    }
    assert_int_equal(masked.n_dropped, dropped);
    /* position priority: the first `capacity` used tokens of each expert are kept */
    int64_t seen[4] = {0};
    for (int64_t t = 0; t < S; t++) {
        if (!used[t])
            continue;
        int e = masked.ids[t];
        assert_int_equal(masked.weights[t] != 0.0, seen[e] < masked.capacity);
        seen[e]++;
    }
    /* a masked token's y is its shared expert's output alone: the unmasked run's y minus the
     * routed part */
    for (int64_t t = 0; t < S; t++)
        if (!used[t] && all.weights[t] != 0.0) {
            double differs = 0.0;
            for (int64_t h = 0; h < H; h++)
                differs += fabs(all.y[t * H + h] - masked.y[t * H + h]);
            assert_true(differs > 0.0);
        }
    /* z-loss over every token; aux loss: P_e over all S, c1 over used tokens, / S */
    assert_true(fabs(masked.z_loss - all.z_loss) <= 1e-15 * fabs(all.z_loss));
    double P[4] = {0}, z[4];
    const float *x = p.ts.t[MOE_T_X].data, *router_w = p.ts.t[MOE_T_ROUTER_W].data;
    for (int64_t t = 0; t < S; t++) {
        for (int e = 0; e < E; e++) {
            z[e] = 0.0;
            for (int64_t h = 0; h < H; h++)
                z[e] += (double)router_w[e * H + h] * (double)x[t * H + h];
        }
        for (int e = 0; e < E; e++)
            P[e] += softmax_entry(z, E, e) / (double)S;
    }
    double expected_aux = 0.0;
    for (int e = 0; e < E; e++)
        expected_aux += P[e] * (double)expected_c1[e] / (double)S;
    expected_aux *= E;
    assert_true(fabs(masked.aux_loss - expected_aux) <= 1e-12 * expected_aux);
    assert_true(masked.aux_loss < all.aux_loss);

    /* every token masked: nothing counted or routed, y is the shared experts alone */
    uint8_t none[7] = {0};
    p.opt.used_token = none;
    moe_ref_result empty;
    run_forward(&p, &empty);
    assert_true(empty.aux_loss == 0.0);
    assert_int_equal(empty.n_dropped, 0);
    for (int e = 0; e < E; e++)
        assert_int_equal(empty.counts_after[e], 0);
    moe_ref_grads grads;
    run_backward(&p, &grads);
    for (size_t n = 0; n < p.ts.t[MOE_T_W1].n_elems; n++)
        assert_true(grads.w1[n] == 0.0);
    double shared_grad = 0.0, router_grad = 0.0;
    for (size_t n = 0; n < p.ts.t[MOE_T_SHARED_W1].n_elems; n++)
        shared_grad += fabs(grads.shared_w1[n]);
    for (size_t n = 0; n < p.ts.t[MOE_T_ROUTER_W].n_elems; n++)
        router_grad += fabs(grads.router_w[n]);
    assert_true(shared_grad > 0.0);
    assert_true(router_grad > 0.0); /* the z-loss (and aux P_e with zero counts: 0) */
    moe_ref_grads_free(&grads);
    moe_ref_result_free(&empty);
    moe_ref_result_free(&masked);
    problem_destroy(&p); /* frees p.base (== all) */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(backward_matches_finite_differences),
        cmocka_unit_test(wrong_gradient_is_detected),
        cmocka_unit_test(routing_changes_are_skipped),
        cmocka_unit_test(invalid_logits_pass_no_gradient),
        cmocka_unit_test(zero_tokens_give_zero_gradients),
        cmocka_unit_test(half_dtypes_widen_exactly),
        cmocka_unit_test(bad_arguments_are_refused),
        cmocka_unit_test(forced_routing_is_honoured),
        cmocka_unit_test(used_token_forward_rules),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
