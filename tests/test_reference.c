/* test_reference.c — unit tests of the independent reference forward (tests/reference).
 *
 * The reference is the yardstick of every generated kernel, so these tests check it
 * against hand computations of docs/numerics.md, one rule at a time, on tiny layers
 * whose specs are filled in C (no YAML). Most routing tests use H = E with an
 * identity router, so x[t] *is* the logit row; special logits (NaN, inf) come from
 * the router bias instead, since inf * 0 in the router product would give NaN.
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

#include "capacity.h"
#include "reference.h"

/* ---- helpers ------------------------------------------------------------------------------ */

#define EXPECT_NEAR(actual, expected, tolerance)                                                   \
    do {                                                                                           \
        double actual_value = (actual), expected_value = (expected);                               \
        if (!(fabs(actual_value - expected_value) <= (tolerance)))                                 \
            fail_msg("%s = %.17g, expected %.17g (line %d)", #actual, actual_value,                \
                     expected_value, __LINE__);                                                    \
    } while (0)

static double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

/* A spec with every feature off: fp32, relu, eval mode, dropless, softmax then top-k. */
static moegen_spec make_spec(int n_experts, int top_k, int64_t hidden, int64_t ffn) {
    moegen_spec spec;
    memset(&spec, 0, sizeof(spec));
    snprintf(spec.name, sizeof(spec.name), "reference_test");
    snprintf(spec.ident, sizeof(spec.ident), "reference_test");
    spec.num_experts = n_experts;
    spec.top_k = top_k;
    spec.hidden_size = hidden;
    spec.moe_intermediate_size = ffn;
    spec.activation = MOEGEN_ACT_RELU;
    spec.dtype = MOEGEN_DTYPE_FP32;
    spec.ep_size = 1;
    spec.mode = MOEGEN_MODE_EVAL;
    spec.router.score_function = MOEGEN_SCORE_SOFTMAX;
    spec.router.order = MOEGEN_ORDER_SOFTMAX_THEN_TOPK;
    spec.router.routed_scaling_factor = 1.0;
    spec.router.n_group = 1;
    spec.router.topk_group = 1;
    spec.router.group_topm = 1;
    spec.router.seed = 1234;
    spec.capacity.mode = MOEGEN_CAP_DROPLESS;
    spec.capacity.capacity_factor = 1.0;
    spec.capacity.eval_capacity_factor = 1.0;
    return spec;
}

/* An fp32 layer: every tensor allocated (zeroed) whatever the spec's flags. */
typedef struct test_layer {
    moegen_spec spec;
    int64_t n_tokens;
    float *x, *router_w, *router_b, *score_bias;
    float *w1, *b1, *w2, *b2;
    float *shared_w1, *shared_b1, *shared_w2, *shared_b2, *shared_gate;
    float *residual_w1, *residual_b1, *residual_w2, *residual_b2, *residual_coef_w, *residual_coef_b;
    moegen_kernel_weights weights;
} test_layer;

static float *zeroed_floats(int64_t count) {
    float *p = calloc((size_t)(count > 0 ? count : 1), sizeof(float));
    assert_non_null(p);
    return p;
}

static void layer_create(test_layer *layer, const moegen_spec *spec, int64_t n_tokens) {
    int64_t E = spec->num_experts, H = spec->hidden_size, F = spec->moe_intermediate_size;
    int gated = spec->activation == MOEGEN_ACT_SWIGLU || spec->activation == MOEGEN_ACT_GEGLU;
    int64_t F1 = gated ? 2 * F : F;
    int64_t Ns = spec->shared.count, Fs = spec->shared.intermediate_size, F1s = gated ? 2 * Fs : Fs;
    memset(layer, 0, sizeof(*layer));
    layer->spec = *spec;
    layer->n_tokens = n_tokens;
    layer->x = zeroed_floats(n_tokens * H);
    layer->router_w = zeroed_floats(E * H);
    layer->router_b = zeroed_floats(E);
    layer->score_bias = zeroed_floats(E);
    layer->w1 = zeroed_floats(E * F1 * H);
    layer->b1 = zeroed_floats(E * F1);
    layer->w2 = zeroed_floats(E * H * F);
    layer->b2 = zeroed_floats(E * H);
    layer->shared_w1 = zeroed_floats(Ns * F1s * H);
    layer->shared_b1 = zeroed_floats(Ns * F1s);
    layer->shared_w2 = zeroed_floats(Ns * H * Fs);
    layer->shared_b2 = zeroed_floats(Ns * H);
    layer->shared_gate = zeroed_floats(H);
    layer->residual_w1 = zeroed_floats(F1 * H);
    layer->residual_b1 = zeroed_floats(F1);
    layer->residual_w2 = zeroed_floats(H * F);
    layer->residual_b2 = zeroed_floats(H);
    layer->residual_coef_w = zeroed_floats(2 * H);
    layer->residual_coef_b = zeroed_floats(2);
    moegen_kernel_weights weights = {
        .router_w = layer->router_w, .router_b = layer->router_b, .score_bias = layer->score_bias,
        .w1 = layer->w1, .b1 = layer->b1, .w2 = layer->w2, .b2 = layer->b2,
        .shared_w1 = layer->shared_w1, .shared_b1 = layer->shared_b1,
        .shared_w2 = layer->shared_w2, .shared_b2 = layer->shared_b2,
        .shared_gate = layer->shared_gate,
        .residual_w1 = layer->residual_w1, .residual_b1 = layer->residual_b1,
        .residual_w2 = layer->residual_w2, .residual_b2 = layer->residual_b2,
        .residual_coef_w = layer->residual_coef_w, .residual_coef_b = layer->residual_coef_b,
    };
    layer->weights = weights;
}

static void layer_destroy(test_layer *layer) {
    float *buffers[] = {layer->x, layer->router_w, layer->router_b, layer->score_bias, layer->w1,
                        layer->b1, layer->w2, layer->b2, layer->shared_w1, layer->shared_b1,
                        layer->shared_w2, layer->shared_b2, layer->shared_gate, layer->residual_w1,
                        layer->residual_b1, layer->residual_w2, layer->residual_b2,
                        layer->residual_coef_w, layer->residual_coef_b};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++)
        free(buffers[i]);
}

static void layer_run(const test_layer *layer, const moe_ref_options *options, moe_ref_result *res) {
    char why[256];
    int status = moe_ref_forward(&layer->spec, layer->n_tokens, layer->x, &layer->weights, options, res,
                                 why);
    if (status != 0)
        fail_msg("moe_ref_forward failed: %s", why);
}

/* Router = identity (needs H == E): x[t] is token t's logit row. */
static void layer_set_logits(test_layer *layer, const double *logits) {
    int64_t E = layer->spec.num_experts, H = layer->spec.hidden_size;
    assert_int_equal(E, H);
    memset(layer->router_w, 0, (size_t)(E * H) * sizeof(float));
    for (int64_t e = 0; e < E; e++)
        layer->router_w[e * H + e] = 1.0f;
    for (int64_t i = 0; i < layer->n_tokens * H; i++)
        layer->x[i] = (float)logits[i];
}

/* Every expert (and the residual MLP) the identity in relu form (needs F == 2H):
 * W1 = [I; -I], W2 = [I, -I], so relu(x) - relu(-x) = x. */
static void layer_set_identity_experts(test_layer *layer) {
    int64_t E = layer->spec.num_experts, H = layer->spec.hidden_size, F = layer->spec.moe_intermediate_size;
    assert_int_equal(F, 2 * H);
    for (int64_t e = 0; e < E; e++)
        for (int64_t h = 0; h < H; h++) {
            layer->w1[(e * F + h) * H + h] = 1.0f;
            layer->w1[(e * F + H + h) * H + h] = -1.0f;
            layer->w2[(e * H + h) * F + h] = 1.0f;
            layer->w2[(e * H + h) * F + H + h] = -1.0f;
        }
}

/* Deterministic values in [-1, 1). */
static float test_random(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(*state >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

static void fill_random(float *p, int64_t count, uint64_t *state, float scale) {
    for (int64_t i = 0; i < count; i++)
        p[i] = scale * test_random(state);
}

static void assert_ids_valid_and_distinct(const moe_ref_result *res) {
    for (int64_t t = 0; t < res->n_tokens; t++)
        for (int j = 0; j < res->top_k; j++) {
            int32_t id = res->ids[t * res->top_k + j];
            assert_true(id >= 0 && id < res->num_experts);
            for (int i = 0; i < j; i++)
                assert_int_not_equal(id, res->ids[t * res->top_k + i]);
        }
}

static void assert_all_finite(const double *values, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        if (!isfinite(values[i]))
            fail_msg("value %lld is %g", (long long)i, values[i]);
}

/* ---- identity experts --------------------------------------------------------------------- */

static void reference_identity_experts_return_the_input(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 8);
    spec.router.norm_topk_prob = 1;
    test_layer layer;
    layer_create(&layer, &spec, 16);
    uint64_t random_state = 7;
    fill_random(layer.x, 16 * 4, &random_state, 3.0f);
    fill_random(layer.router_w, 4 * 4, &random_state, 1.0f);
    layer_set_identity_experts(&layer);
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    for (int64_t i = 0; i < 16 * 4; i++)
        EXPECT_NEAR(res.y[i], layer.x[i], 1e-12);
    for (int64_t t = 0; t < 16; t++)
        EXPECT_NEAR(res.weights[t * 2] + res.weights[t * 2 + 1], 1.0, 1e-15);
    assert_ids_valid_and_distinct(&res);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* Same in a 16-bit layer dtype: x and expert weights are stored bits. */
static void check_identity_in_half_dtype(moegen_dtype dtype, uint16_t one, uint16_t minus_one) {
    enum { E = 4, K = 2, H = 4, F = 8, S = 8 };
    moegen_spec spec = make_spec(E, K, H, F);
    spec.dtype = dtype;
    spec.router.norm_topk_prob = 1;
    static uint16_t x[S * H], w1[E * F * H], w2[E * H * F];
    float router_w[E * H];
    uint64_t random_state = 11;
    fill_random(router_w, E * H, &random_state, 1.0f);
    memset(w1, 0, sizeof(w1));
    memset(w2, 0, sizeof(w2));
    for (int e = 0; e < E; e++)
        for (int h = 0; h < H; h++) {
            w1[(e * F + h) * H + h] = one;
            w1[(e * F + H + h) * H + h] = minus_one;
            w2[(e * H + h) * F + h] = one;
            w2[(e * H + h) * F + H + h] = minus_one;
        }
    for (int i = 0; i < S * H; i++) { /* finite normal values with random sign and mantissa */
        random_state = random_state * 6364136223846793005ull + 1442695040888963407ull;
        uint16_t bits = (uint16_t)(random_state >> 48);
        if (dtype == MOEGEN_DTYPE_FP16)
            x[i] = (uint16_t)((bits & 0x83ff) | (uint16_t)((12 + (bits >> 10) % 6) << 10));
        else
            x[i] = (uint16_t)((bits & 0x807f) | (uint16_t)((124 + (bits >> 7) % 6) << 7));
    }
    moegen_kernel_weights weights = {.router_w = router_w, .w1 = w1, .w2 = w2};
    moe_ref_result res;
    char why[256];
    assert_int_equal(moe_ref_forward(&spec, S, x, &weights, NULL, &res, why), 0);
    for (int i = 0; i < S * H; i++) {
        double expected = dtype == MOEGEN_DTYPE_FP16 ? moe_ref_half_to_double(x[i])
                                                     : moe_ref_bf16_to_double(x[i]);
        EXPECT_NEAR(res.y[i], expected, 1e-12);
    }
    moe_ref_result_free(&res);
}

static void reference_identity_experts_return_the_input_in_fp16_and_bf16(void **state) {
    (void)state;
    check_identity_in_half_dtype(MOEGEN_DTYPE_FP16, 0x3c00, 0xbc00);
    check_identity_in_half_dtype(MOEGEN_DTYPE_BF16, 0x3f80, 0xbf80);
}

/* ---- score functions, order, normalization ------------------------------------------------------ */

/* One token with the given logits through an identity router (H = E). */
static void route_one_token(const moegen_spec *spec, const double *logits, moe_ref_result *res) {
    test_layer layer;
    moegen_spec copy = *spec;
    copy.hidden_size = copy.num_experts;
    layer_create(&layer, &copy, 1);
    layer_set_logits(&layer, logits);
    layer_run(&layer, NULL, res);
    layer_destroy(&layer);
}

static void reference_softmax_then_topk_weights_are_the_softmax_probabilities(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    const double logits[4] = {1, 2, 3, 0};
    double z = exp(0) + exp(1) + exp(2) + exp(3);
    moe_ref_result res;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 2);
    assert_int_equal(res.ids[1], 1);
    EXPECT_NEAR(res.router_weights[0], exp(3) / z, 1e-15);
    EXPECT_NEAR(res.router_weights[1], exp(2) / z, 1e-15);
    EXPECT_NEAR(res.weights[1], exp(2) / z, 1e-15);
    EXPECT_NEAR(res.margin[0], (exp(2) - exp(1)) / z, 1e-15); /* probability units */
    moe_ref_result_free(&res);
}

static void reference_topk_then_softmax_weights_are_the_softmax_of_the_chosen_logits(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.router.order = MOEGEN_ORDER_TOPK_THEN_SOFTMAX;
    const double logits[4] = {1, 2, 3, 0};
    moe_ref_result res;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 2);
    assert_int_equal(res.ids[1], 1);
    EXPECT_NEAR(res.router_weights[0], 1.0 / (1.0 + exp(-1.0)), 1e-15);
    EXPECT_NEAR(res.router_weights[1], exp(-1.0) / (1.0 + exp(-1.0)), 1e-15);
    EXPECT_NEAR(res.margin[0], 1.0, 0.0); /* logit units: 2 - 1 */
    moe_ref_result_free(&res);
}

static void reference_sigmoid_selection_adds_the_score_bias_but_weights_do_not(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.router.score_function = MOEGEN_SCORE_SIGMOID;
    spec.router.score_bias = 1;
    spec.hidden_size = 4;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    const double logits[4] = {0, 1, 2, -1};
    layer_set_logits(&layer, logits);
    const float bias[4] = {0.0f, 0.0f, -1.0f, 2.0f};
    memcpy(layer.score_bias, bias, sizeof(bias));
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    /* sel = [0.5, 0.731, -0.119, 2.269] -> experts 3 then 1; weights are the bare s */
    assert_int_equal(res.ids[0], 3);
    assert_int_equal(res.ids[1], 1);
    EXPECT_NEAR(res.router_weights[0], sigmoid(-1.0), 1e-15);
    EXPECT_NEAR(res.router_weights[1], sigmoid(1.0), 1e-15);
    EXPECT_NEAR(res.margin[0], sigmoid(1.0) - 0.5, 1e-15);
    moe_ref_result_free(&res);

    layer.spec.router.norm_topk_prob = 1;
    layer_run(&layer, NULL, &res);
    double sum = sigmoid(-1.0) + sigmoid(1.0);
    EXPECT_NEAR(res.router_weights[0], sigmoid(-1.0) / sum, 1e-15);
    EXPECT_NEAR(res.router_weights[1], sigmoid(1.0) / sum, 1e-15);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_sqrtsoftplus_scores_are_finite_for_huge_logits(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 4, 4, 1);
    spec.router.score_function = MOEGEN_SCORE_SQRTSOFTPLUS;
    spec.router.router_bias = 1;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    const float bias[4] = {0.0f, 30.0f, -1e30f, 1e30f};
    memcpy(layer.router_b, bias, sizeof(bias));
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    const int32_t expected_ids[4] = {3, 1, 0, 2};
    for (int j = 0; j < 4; j++)
        assert_int_equal(res.ids[j], expected_ids[j]);
    EXPECT_NEAR(res.router_weights[0], sqrt((double)1e30f), 1.0);
    EXPECT_NEAR(res.router_weights[1], sqrt(30.0 + log1p(exp(-30.0))), 1e-14);
    EXPECT_NEAR(res.router_weights[2], sqrt(log(2.0)), 1e-15);
    EXPECT_NEAR(res.router_weights[3], 0.0, 0.0);
    assert_int_equal(res.counts_before[2], 1); /* a huge negative logit is still valid */
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_normalization_then_scaling_multiplies_the_normalized_weights(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.router.norm_topk_prob = 1;
    spec.router.routed_scaling_factor = 2.5;
    const double logits[4] = {1, 2, 3, 0};
    moe_ref_result res;
    route_one_token(&spec, logits, &res);
    EXPECT_NEAR(res.router_weights[0], 2.5 * exp(3) / (exp(3) + exp(2)), 1e-14);
    EXPECT_NEAR(res.router_weights[1], 2.5 * exp(2) / (exp(3) + exp(2)), 1e-14);
    moe_ref_result_free(&res);

    spec.router.norm_topk_prob = 0; /* scaling alone */
    spec.router.score_function = MOEGEN_SCORE_SIGMOID;
    spec.router.routed_scaling_factor = 2.0;
    route_one_token(&spec, logits, &res);
    EXPECT_NEAR(res.router_weights[0], 2.0 * sigmoid(3.0), 1e-15);
    EXPECT_NEAR(res.router_weights[1], 2.0 * sigmoid(2.0), 1e-15);
    moe_ref_result_free(&res);
}

/* ---- group-limited routing ---------------------------------------------------------------------- */

static void reference_group_limit_keeps_the_best_groups_by_top_m_sum_or_by_max(void **state) {
    (void)state;
    moegen_spec spec = make_spec(8, 2, 8, 1);
    spec.router.order = MOEGEN_ORDER_TOPK_THEN_SOFTMAX; /* sel = z, so sel can be negative */
    spec.router.n_group = 4;
    spec.router.topk_group = 2;
    spec.router.group_topm = 2;
    const double logits[8] = {5, -10, 3, 3, 4, 0, -1, -1};
    moe_ref_result res;

    /* top-2 sums [-5, 6, 4, -2]: groups 1 and 2; then 4 (4), and 3 vs 3 -> expert 2 */
    spec.router.group_score = MOEGEN_GROUP_SCORE_TOPM_SUM;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 4);
    assert_int_equal(res.ids[1], 2);
    EXPECT_NEAR(res.router_weights[0], 1.0 / (1.0 + exp(-1.0)), 1e-15);
    EXPECT_NEAR(res.margin[0], 0.0, 0.0); /* the 3 / 3 tie inside group 1 */
    moe_ref_result_free(&res);

    /* max [5, 3, 4, -1]: groups 0 and 2; experts 0 (5) and 4 (4) */
    spec.router.group_score = MOEGEN_GROUP_SCORE_MAX;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 0);
    assert_int_equal(res.ids[1], 4);
    EXPECT_NEAR(res.margin[0], 1.0, 0.0); /* group level: 4 kept vs 3 dropped */
    moe_ref_result_free(&res);

    /* a group with fewer valid experts than group_topm sums what it has */
    spec.router.group_score = MOEGEN_GROUP_SCORE_TOPM_SUM;
    spec.router.router_bias = 1;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer_set_logits(&layer, logits);
    layer.router_b[3] = NAN; /* group 1 now scores 3: groups 2 (4) and 1 (3) */
    layer_run(&layer, NULL, &res);
    assert_int_equal(res.ids[0], 4);
    assert_int_equal(res.ids[1], 2);
    /* groups: 3 kept vs -2 dropped; experts: 3 vs 0; the order of the two picks: 4 vs 3 */
    EXPECT_NEAR(res.margin[0], 1.0, 0.0);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_zero_group_mask_can_pick_an_expert_the_neg_inf_mask_drops(void **state) {
    (void)state;
    moegen_spec spec = make_spec(8, 2, 8, 1);
    spec.router.order = MOEGEN_ORDER_TOPK_THEN_SOFTMAX;
    spec.router.n_group = 4;
    spec.router.topk_group = 1;
    spec.router.group_score = MOEGEN_GROUP_SCORE_MAX;
    const double logits[8] = {-1, -2, -3, -4, -5, -6, -7, -8};
    moe_ref_result res;

    spec.router.group_mask = MOEGEN_GROUP_MASK_NEG_INF;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 0);
    assert_int_equal(res.ids[1], 1);
    EXPECT_NEAR(res.margin[0], 1.0, 0.0); /* groups: 0 (-1) vs 1 (-3); the order of picks: -1 vs -2 */
    moe_ref_result_free(&res);

    /* masked experts get sel = 0 > -1 and stay valid: experts 2 and 3 (ties: lower index) */
    spec.router.group_mask = MOEGEN_GROUP_MASK_ZERO;
    route_one_token(&spec, logits, &res);
    assert_int_equal(res.ids[0], 2);
    assert_int_equal(res.ids[1], 3);
    EXPECT_NEAR(res.router_weights[0], 1.0 / (1.0 + exp(-1.0)), 1e-15); /* softmax of z, not sel */
    EXPECT_NEAR(res.margin[0], 0.0, 0.0);
    assert_int_equal(res.counts_before[2], 1);
    moe_ref_result_free(&res);

    /* an invalid expert of a dropped group stays invalid under the zero mask */
    spec.router.router_bias = 1;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer_set_logits(&layer, logits);
    layer.router_b[2] = NAN;
    layer_run(&layer, NULL, &res);
    assert_int_equal(res.ids[0], 3);
    assert_int_equal(res.ids[1], 4);
    assert_int_equal(res.counts_before[2], 0);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* ---- ties, special values ----------------------------------------------------------------------- */

static void reference_exact_ties_go_to_the_lower_index(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    const double equal[4] = {1, 1, 1, 1};
    moe_ref_result res;
    route_one_token(&spec, equal, &res);
    assert_int_equal(res.ids[0], 0);
    assert_int_equal(res.ids[1], 1);
    EXPECT_NEAR(res.router_weights[0], 0.25, 1e-15);
    EXPECT_NEAR(res.margin[0], 0.0, 0.0);
    moe_ref_result_free(&res);

    /* tied groups: group 0 */
    spec.router.n_group = 2;
    spec.router.topk_group = 1;
    spec.top_k = 1;
    route_one_token(&spec, equal, &res);
    assert_int_equal(res.ids[0], 0);
    EXPECT_NEAR(res.margin[0], 0.0, 0.0);
    moe_ref_result_free(&res);

    /* every expert chosen: no rejected candidate, but the order of the picks is decided by
     * the smallest gap between consecutive softmax scores (the slot order is part of the
     * result): p2 - p3 = (e - 1) / (e^3 + e^2 + e + 1) */
    spec = make_spec(4, 4, 4, 1);
    const double distinct[4] = {3, 2, 1, 0};
    const double total = exp(3.0) + exp(2.0) + exp(1.0) + 1.0;
    route_one_token(&spec, distinct, &res);
    EXPECT_NEAR(res.margin[0], (exp(1.0) - 1.0) / total, 1e-15);
    moe_ref_result_free(&res);
    /* k = 1: one pick, so no order; the best rejected is expert 1: p0 - p1 */
    spec = make_spec(4, 1, 4, 1);
    route_one_token(&spec, distinct, &res);
    EXPECT_NEAR(res.margin[0], (exp(3.0) - exp(2.0)) / total, 1e-15);
    moe_ref_result_free(&res);
    /* E = k = 1: nothing to decide */
    spec = make_spec(1, 1, 1, 1);
    route_one_token(&spec, distinct, &res);
    assert_true(isinf(res.margin[0]) && res.margin[0] > 0);
    moe_ref_result_free(&res);
}

typedef struct special_case {
    const char *name;
    int top_k;
    moegen_score_fn score_function;
    float bias[4];
    int32_t ids[2][4]; /* per order: softmax_then_topk, topk_then_softmax */
    double weights[4]; /* router weights; < 0 = not checked */
} special_case;

static void reference_nan_and_inf_logits_give_valid_distinct_ids_and_finite_output(void **state) {
    (void)state;
    const float inf = INFINITY, nan = NAN;
    /* Selection on softmax probabilities sees the underflowed ones as exact ties
     * (lower index wins); selection on logits still tells them apart. */
    const special_case cases[] = {
        {"NaN row", 2, MOEGEN_SCORE_SOFTMAX, {nan, nan, nan, nan}, {{0, 1}, {0, 1}}, {0, 0}},
        {"NaN row, sigmoid", 3, MOEGEN_SCORE_SIGMOID, {nan, nan, nan, nan}, {{0, 1, 2}, {0, 1, 2}}, {0, 0, 0}},
        {"one NaN", 4, MOEGEN_SCORE_SOFTMAX, {nan, 1, 2, 3}, {{3, 2, 1, 0}, {3, 2, 1, 0}}, {-1, -1, -1, 0}},
        {"+Inf", 2, MOEGEN_SCORE_SOFTMAX, {inf, 0, 1, 2}, {{0, 1}, {0, 3}}, {1, 0}},
        {"several +Inf", 3, MOEGEN_SCORE_SOFTMAX, {inf, inf, 0, inf}, {{0, 1, 3}, {0, 1, 3}},
         {1. / 3, 1. / 3, 1. / 3}},
        {"+Inf, sigmoid", 2, MOEGEN_SCORE_SIGMOID, {inf, 0, 1, 2}, {{0, 3}, {0, 3}}, {1, -1}},
        {"+-1e30", 2, MOEGEN_SCORE_SOFTMAX, {1e30f, -1e30f, 0, 5}, {{0, 1}, {0, 3}}, {1, 0}},
        {"+-1e30, sigmoid", 4, MOEGEN_SCORE_SIGMOID, {1e30f, -1e30f, 0, 5}, {{0, 3, 2, 1}, {0, 3, 2, 1}},
         {1, -1, 0.5, 0}},
        {"-Inf", 2, MOEGEN_SCORE_SOFTMAX, {-inf, -inf, -inf, 2}, {{3, 0}, {3, 0}}, {1, 0}},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const special_case *sc = &cases[c];
        moegen_spec spec = make_spec(4, sc->top_k, 4, 8);
        spec.router.score_function = sc->score_function;
        spec.router.router_bias = 1;
        test_layer layer;
        layer_create(&layer, &spec, 2);
        memcpy(layer.router_b, sc->bias, sizeof(sc->bias));
        for (int i = 0; i < 2 * 4; i++)
            layer.x[i] = 1.0f + (float)i;
        layer_set_identity_experts(&layer);
        for (int order = 0; order < 2; order++) {
            layer.spec.router.order = order ? MOEGEN_ORDER_TOPK_THEN_SOFTMAX : MOEGEN_ORDER_SOFTMAX_THEN_TOPK;
            moe_ref_result res;
            layer_run(&layer, NULL, &res);
            assert_ids_valid_and_distinct(&res);
            assert_all_finite(res.y, 2 * 4);
            assert_all_finite(res.router_weights, 2 * sc->top_k);
            for (int t = 0; t < 2; t++)
                for (int j = 0; j < sc->top_k; j++) {
                    int32_t id = res.ids[t * sc->top_k + j];
                    double weight = res.router_weights[t * sc->top_k + j];
                    if (id != sc->ids[order][j])
                        fail_msg("%s, order %d: slot %d chose %d, expected %d", sc->name, order, j, (int)id,
                                 (int)sc->ids[order][j]);
                    if (sc->weights[j] >= 0 && !(fabs(weight - sc->weights[j]) <= 1e-15))
                        fail_msg("%s, order %d: slot %d weighs %.17g, expected %.17g", sc->name, order, j,
                                 weight, sc->weights[j]);
                }
            moe_ref_result_free(&res);
        }
        layer_destroy(&layer);
    }
}

static void reference_invalid_routes_are_never_counted_or_combined(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 3, 4, 8);
    spec.router.router_bias = 1;
    test_layer layer;
    layer_create(&layer, &spec, 2);
    const float bias[4] = {NAN, -INFINITY, 1, NAN};
    memcpy(layer.router_b, bias, sizeof(bias));
    for (int i = 0; i < 2 * 4; i++)
        layer.x[i] = 1.0f;
    layer_set_identity_experts(&layer);
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    assert_int_equal(res.ids[0], 2); /* the only valid expert, then the lowest unused ids */
    assert_int_equal(res.ids[1], 0);
    assert_int_equal(res.ids[2], 1);
    const int64_t expected_counts[4] = {0, 0, 2, 0};
    for (int e = 0; e < 4; e++)
        assert_int_equal(res.counts_before[e], expected_counts[e]);
    EXPECT_NEAR(res.weights[0], 1.0, 1e-15);
    EXPECT_NEAR(res.weights[1], 0.0, 0.0);
    for (int i = 0; i < 2 * 4; i++)
        EXPECT_NEAR(res.y[i], 1.0, 1e-15);
    assert_true(isinf(res.margin[0]));
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* Logits are summed in double; where an fp32 router would overflow, the reference
 * behaves as the overflowed fp32 value would after sanitizing. */
static void reference_logits_beyond_the_fp32_range_act_as_overflowed_fp32_logits(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 2, 1);
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer.x[0] = 3e38f;
    layer.x[1] = 3e38f;
    const float rows[4 * 2] = {1, 1, 0, 1, -1, -1, 0.5f, 0.5f}; /* z = [6e38, 3e38, -6e38, 3e38] */
    memcpy(layer.router_w, rows, sizeof(rows));
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    /* expert 0 is clamped to the largest float; expert 2 overflows to -inf: invalid */
    assert_int_equal(res.ids[0], 0);
    assert_int_equal(res.ids[1], 1);
    assert_int_equal(res.counts_before[2], 0);
    EXPECT_NEAR(res.z_loss, pow(FLT_MAX + log(1.0 + 2.0 * exp(3e38 - FLT_MAX)), 2.0), 1e62);
    assert_true(isfinite(res.z_loss));
    moe_ref_result_free(&res);
    layer.spec.top_k = 4;
    layer_run(&layer, NULL, &res);
    assert_int_equal(res.ids[3], 2); /* the fill slot */
    EXPECT_NEAR(res.router_weights[3], 0.0, 0.0);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* ---- capacity ------------------------------------------------------------------------------------ */

/* Capacity for S tokens that all tie (so all go to experts 0..k-1). */
static int64_t capacity_for(const moegen_spec *spec, int64_t n_tokens, moe_ref_result *res) {
    moegen_spec copy = *spec;
    copy.hidden_size = copy.num_experts;
    test_layer layer;
    layer_create(&layer, &copy, n_tokens);
    layer_run(&layer, NULL, res);
    layer_destroy(&layer);
    return res->capacity;
}

static void reference_deepspeed_capacity_is_formed_in_fp32(void **state) {
    (void)state;
    moe_ref_result res;
    moegen_spec spec = make_spec(3, 1, 3, 1);
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_DEEPSPEED;
    /* 35/3 * 1.2: fp32 gives 14.000001 -> 15, double and exact give 14 */
    spec.capacity.eval_capacity_factor = 1.2;
    assert_int_equal(capacity_for(&spec, 35, &res), 15);
    assert_int_equal(res.counts_before[0], 35);
    assert_int_equal(res.counts_after[0], 15);
    assert_int_equal(res.n_dropped, 20);
    moe_ref_result_free(&res);
    /* 25/3 * 2 * 0.9: fp32 gives 14.999999 -> 15, double gives 15.000000000000002 -> 16 */
    spec.top_k = 2;
    spec.capacity.eval_capacity_factor = 0.9;
    assert_int_equal(capacity_for(&spec, 25, &res), 15);
    moe_ref_result_free(&res);
    /* min_capacity: ceil(4/8 * 1) = 1, raised to 4 */
    spec = make_spec(8, 1, 8, 1);
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_DEEPSPEED;
    spec.capacity.min_capacity = 4;
    assert_int_equal(capacity_for(&spec, 4, &res), 4);
    assert_int_equal(res.n_dropped, 0);
    moe_ref_result_free(&res);
    assert_int_equal(capacity_for(&spec, 0, &res), 4);
    moe_ref_result_free(&res);
}

/* The DeepSpeed formula for k >= 3, where forming k * cf matters. Expected values were
 * computed with DeepSpeed's own expression in PyTorch 2.15 (sharded_moe.py):
 *   capacity = torch.ceil((S / E) * torch.tensor(cf * k)).to(torch.int64), raised to
 *   min_capacity;
 * the last column is what rounding cf to fp32 and multiplying by k in fp32 gives (the rule
 * moegen followed before), where it differs. The same table checks gen/capacity.c. */
static const struct {
    int64_t tokens;
    int experts, top_k;
    double factor;
    int64_t min_capacity, deepspeed;
} DEEPSPEED_CAPACITY[] = {
    {480, 8, 3, 0.55, 4, 99}, /* fp32 k * f32(cf): 100 */
    {4200, 60, 9, 1.1, 4, 693}, /* 694 */
    {1000, 10, 9, 0.9, 4, 811}, /* 810 */
    {1660, 8, 6, 2.2, 4, 2739}, /* 2740 */
    {1350, 10, 6, 0.3, 4, 243}, /* 244 */
    {2800, 10, 7, 0.3, 4, 588}, /* 589 */
    {4040, 7, 7, 1.7, 4, 6868}, /* 6869 */
    {780, 3, 3, 2.2, 4, 1716}, /* 1717 */
    {2400, 16, 3, 1.1, 4, 495}, /* 496 */
    {3400, 12, 12, 2.2, 4, 7480}, /* 7481 */
    {440, 6, 3, 1.3, 4, 287}, /* 286 */
    {2200, 12, 7, 0.3, 4, 385}, /* 386 */
    {4930, 12, 12, 1.7, 4, 8381}, /* 8382 */
    {1970, 64, 3, 1.1, 4, 102},
    {2637, 16, 3, 0.35, 0, 174},
    {440, 64, 3, 0.1, 4, 4},
    {1162, 16, 3, 1.3, 0, 284},
    {1339, 64, 4, 0.1, 0, 9},
    {138, 64, 3, 1.15, 4, 8},
};

static void reference_and_generator_deepspeed_capacity_match_deepspeed_for_k_at_least_3(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof DEEPSPEED_CAPACITY / sizeof DEEPSPEED_CAPACITY[0]; i++) {
        moe_ref_result res;
        moegen_spec spec = make_spec(DEEPSPEED_CAPACITY[i].experts, DEEPSPEED_CAPACITY[i].top_k,
                                     DEEPSPEED_CAPACITY[i].experts, 1);
        spec.capacity.mode = MOEGEN_CAP_FACTOR;
        spec.capacity.formula = MOEGEN_CAP_FORMULA_DEEPSPEED;
        spec.capacity.eval_capacity_factor = DEEPSPEED_CAPACITY[i].factor;
        spec.capacity.min_capacity = DEEPSPEED_CAPACITY[i].min_capacity;
        const int64_t tokens = DEEPSPEED_CAPACITY[i].tokens;
        assert_int_equal(moegen_spec_capacity(&spec, tokens), DEEPSPEED_CAPACITY[i].deepspeed);
        assert_int_equal(capacity_for(&spec, tokens, &res), DEEPSPEED_CAPACITY[i].deepspeed);
        moe_ref_result_free(&res);
    }
}

static void reference_megatron_capacity_is_formed_in_double(void **state) {
    (void)state;
    moe_ref_result res;
    moegen_spec spec = make_spec(3, 2, 3, 1);
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_MEGATRON;
    spec.capacity.min_capacity = 4; /* ignored by this formula */
    spec.capacity.eval_capacity_factor = 0.9;
    assert_int_equal(capacity_for(&spec, 25, &res), 16); /* 25*2/3*0.9 = 15.000000000000002 */
    moe_ref_result_free(&res);
    spec = make_spec(4, 1, 4, 1);
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_MEGATRON;
    assert_int_equal(capacity_for(&spec, 10, &res), 3); /* ceil(2.5) */
    assert_int_equal(res.n_dropped, 7);
    moe_ref_result_free(&res);
    assert_int_equal(capacity_for(&spec, 1, &res), 1); /* ceil(0.25), no minimum */
    moe_ref_result_free(&res);
}

static void reference_train_mode_uses_capacity_factor_and_eval_mode_eval_capacity_factor(void **state) {
    (void)state;
    moe_ref_result res;
    moegen_spec spec = make_spec(4, 1, 4, 1);
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_MEGATRON;
    spec.capacity.capacity_factor = 1.0;
    spec.capacity.eval_capacity_factor = 2.0;
    spec.mode = MOEGEN_MODE_TRAIN;
    assert_int_equal(capacity_for(&spec, 8, &res), 2);
    moe_ref_result_free(&res);
    spec.mode = MOEGEN_MODE_EVAL;
    assert_int_equal(capacity_for(&spec, 8, &res), 4);
    moe_ref_result_free(&res);
}

static void reference_fixed_capacity_keeps_that_many_and_dropless_keeps_all(void **state) {
    (void)state;
    moe_ref_result res;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.capacity.mode = MOEGEN_CAP_FIXED;
    spec.capacity.expert_capacity = 3;
    assert_int_equal(capacity_for(&spec, 5, &res), 3);
    assert_int_equal(res.counts_before[0], 5);
    assert_int_equal(res.counts_after[0], 3);
    assert_int_equal(res.counts_after[1], 3);
    assert_int_equal(res.n_dropped, 4);
    moe_ref_result_free(&res);
    spec.capacity.mode = MOEGEN_CAP_DROPLESS;
    assert_int_equal(capacity_for(&spec, 5, &res), -1);
    assert_int_equal(res.counts_after[0], 5);
    assert_int_equal(res.n_dropped, 0);
    moe_ref_result_free(&res);
}

/* The hot-expert layer: 4 tokens, E = 4, k = 2, identity router and experts.
 * Expert 0 receives (t0, slot 1, p 0.475), (t1, slot 1, p 0.12), (t2, slot 0, p 0.29),
 * (t3, slot 0, p 0.98); expert 1 receives t0 slot 0, t2 slot 1, t3 slot 1; expert 2 t1. */
static const double hot_logits[4 * 4] = {
    3.0, 3.1, -9, -9, /* ids 1, 0 */
    1.0, -9, 3.0, -9, /* ids 2, 0 */
    1.0, 0.9, 0.8, 0.7, /* ids 0, 1 */
    4.0, 0.0, -9, -9, /* ids 0, 1 */
};

static void hot_expert_layer(test_layer *layer, moegen_priority priority, int renormalize) {
    moegen_spec spec = make_spec(4, 2, 4, 8);
    spec.capacity.mode = MOEGEN_CAP_FIXED;
    spec.capacity.expert_capacity = 2;
    spec.capacity.priority = priority;
    spec.capacity.renormalize = renormalize;
    layer_create(layer, &spec, 4);
    layer_set_logits(layer, hot_logits);
    layer_set_identity_experts(layer);
}

/* Which tokens kept their route to expert 0 (a bit per token). */
static unsigned kept_on_expert_zero(const moe_ref_result *res) {
    unsigned mask = 0;
    for (int t = 0; t < 4; t++)
        for (int j = 0; j < 2; j++)
            if (res->ids[t * 2 + j] == 0 && res->weights[t * 2 + j] > 0)
                mask |= 1u << t;
    return mask;
}

static void reference_each_priority_keeps_its_own_routes_on_a_hot_expert(void **state) {
    (void)state;
    test_layer layer;
    moe_ref_result res;
    const int32_t expected_ids[8] = {1, 0, 2, 0, 0, 1, 0, 1};

    hot_expert_layer(&layer, MOEGEN_PRIORITY_PROBS, 0);
    layer_run(&layer, NULL, &res);
    for (int i = 0; i < 8; i++)
        assert_int_equal(res.ids[i], expected_ids[i]);
    assert_int_equal(kept_on_expert_zero(&res), (1u << 3) | (1u << 0));
    const int64_t before[4] = {4, 3, 1, 0}, after[4] = {2, 2, 1, 0};
    for (int e = 0; e < 4; e++) {
        assert_int_equal(res.counts_before[e], before[e]);
        assert_int_equal(res.counts_after[e], after[e]);
    }
    assert_int_equal(res.n_dropped, 3);
    moe_ref_result_free(&res);
    layer_destroy(&layer);

    hot_expert_layer(&layer, MOEGEN_PRIORITY_POSITION, 0);
    layer_run(&layer, NULL, &res);
    assert_int_equal(kept_on_expert_zero(&res), (1u << 0) | (1u << 1));
    moe_ref_result_free(&res);
    layer_destroy(&layer);

    hot_expert_layer(&layer, MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR, 0);
    layer_run(&layer, NULL, &res);
    assert_int_equal(kept_on_expert_zero(&res), (1u << 2) | (1u << 3));
    moe_ref_result_free(&res);
    layer_destroy(&layer);

    /* random: the two routes with the largest u(seed, offset, 3, t*k + j) */
    hot_expert_layer(&layer, MOEGEN_PRIORITY_RANDOM, 0);
    moe_ref_options options = {.rng_offset = 5};
    layer_run(&layer, &options, &res);
    double keys[4];
    for (int t = 0; t < 4; t++) {
        int slot = res.ids[t * 2] == 0 ? 0 : 1;
        keys[t] = moe_ref_uniform(layer.spec.router.seed, 5, 3, (uint64_t)(t * 2 + slot));
    }
    unsigned expected = 0;
    for (int pick = 0; pick < 2; pick++) {
        int best = -1;
        for (int t = 0; t < 4; t++)
            if (!(expected & (1u << t)) && (best < 0 || keys[t] > keys[best]))
                best = t;
        expected |= 1u << best;
    }
    assert_int_equal(kept_on_expert_zero(&res), expected);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_probs_priority_ties_keep_the_lower_token(void **state) {
    (void)state;
    moegen_spec spec = make_spec(2, 1, 2, 1);
    spec.capacity.mode = MOEGEN_CAP_FIXED;
    spec.capacity.expert_capacity = 1;
    spec.capacity.priority = MOEGEN_PRIORITY_PROBS;
    test_layer layer;
    layer_create(&layer, &spec, 3);
    const double logits[6] = {1, 0, 2, 1, 1, 0}; /* all to expert 0 with p = sigmoid(1) */
    layer_set_logits(&layer, logits);
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    assert_true(res.weights[0] > 0);
    EXPECT_NEAR(res.weights[1], 0.0, 0.0);
    EXPECT_NEAR(res.weights[2], 0.0, 0.0);
    assert_int_equal(res.n_dropped, 2);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_renormalize_rescales_the_surviving_weights_of_a_token(void **state) {
    (void)state;
    test_layer layer;
    moe_ref_result plain, renormalized;
    /* position: expert 0 keeps t0, t1; expert 1 keeps t0, t2. t2 loses its expert-0
     * route, t3 loses both. */
    hot_expert_layer(&layer, MOEGEN_PRIORITY_POSITION, 0);
    layer_run(&layer, NULL, &plain);
    layer.spec.capacity.renormalize = 1;
    layer.spec.router.routed_scaling_factor = 1.5;
    layer_run(&layer, NULL, &renormalized);

    /* t2: ids (0, 1); the route to 1 survives */
    EXPECT_NEAR(plain.weights[4], 0.0, 0.0);
    EXPECT_NEAR(plain.weights[5], plain.router_weights[5], 0.0);
    EXPECT_NEAR(renormalized.weights[4], 0.0, 0.0);
    EXPECT_NEAR(renormalized.weights[5], 1.5, 1e-15);
    /* t0 keeps both: w / sum * 1.5, where the router weights already carry 1.5 */
    double sum = renormalized.router_weights[0] + renormalized.router_weights[1];
    EXPECT_NEAR(renormalized.weights[0], renormalized.router_weights[0] / sum * 1.5, 1e-15);
    EXPECT_NEAR(renormalized.weights[0] + renormalized.weights[1], 1.5, 1e-15);
    /* t3 lost everything: y = 0; identity experts give y[t] = (sum of weights) x[t] */
    for (int h = 0; h < 4; h++) {
        EXPECT_NEAR(plain.y[3 * 4 + h], 0.0, 0.0);
        EXPECT_NEAR(renormalized.y[3 * 4 + h], 0.0, 0.0);
        EXPECT_NEAR(renormalized.y[2 * 4 + h], 1.5 * layer.x[2 * 4 + h], 1e-14);
        EXPECT_NEAR(plain.y[2 * 4 + h], plain.router_weights[5] * layer.x[2 * 4 + h], 1e-14);
    }
    moe_ref_result_free(&plain);
    moe_ref_result_free(&renormalized);
    layer_destroy(&layer);

    /* dropless too: unnormalized top-2 softmax weights become w / sum */
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.capacity.renormalize = 1;
    const double logits[4] = {1, 2, 3, 0};
    route_one_token(&spec, logits, &renormalized);
    EXPECT_NEAR(renormalized.router_weights[0], exp(3) / (exp(0) + exp(1) + exp(2) + exp(3)), 1e-15);
    EXPECT_NEAR(renormalized.weights[0], exp(3) / (exp(3) + exp(2)), 1e-15);
    moe_ref_result_free(&renormalized);
}

static void reference_pad_to_capacity_changes_no_result(void **state) {
    (void)state;
    test_layer layer;
    moe_ref_result plain, padded;
    hot_expert_layer(&layer, MOEGEN_PRIORITY_PROBS, 1);
    layer_run(&layer, NULL, &plain);
    layer.spec.capacity.pad_to_capacity = 1;
    layer_run(&layer, NULL, &padded);
    assert_memory_equal(plain.y, padded.y, 4 * 4 * sizeof(double));
    assert_memory_equal(plain.weights, padded.weights, 4 * 2 * sizeof(double));
    assert_memory_equal(plain.counts_after, padded.counts_after, 4 * sizeof(int64_t));
    assert_int_equal(plain.capacity, padded.capacity);
    moe_ref_result_free(&plain);
    moe_ref_result_free(&padded);
    layer_destroy(&layer);
}

/* ---- losses -------------------------------------------------------------------------------------- */

static void reference_megatron_aux_loss_is_one_at_perfect_balance(void **state) {
    (void)state;
    for (int top_k = 1; top_k <= 2; top_k++) {
        moegen_spec spec = make_spec(4, top_k, 4, 1);
        spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
        test_layer layer;
        layer_create(&layer, &spec, 4);
        double logits[16] = {0};
        for (int t = 0; t < 4; t++) {
            logits[t * 4 + t] = 3.0;
            logits[t * 4 + (t + 1) % 4] = 2.0;
        }
        layer_set_logits(&layer, logits);
        moe_ref_result res;
        layer_run(&layer, NULL, &res);
        EXPECT_NEAR(res.aux_loss, 1.0, 1e-15);
        moe_ref_result_free(&res);
        /* the same with sigmoid scores normalized per token */
        layer.spec.router.score_function = MOEGEN_SCORE_SIGMOID;
        layer_run(&layer, NULL, &res);
        EXPECT_NEAR(res.aux_loss, 1.0, 1e-15);
        moe_ref_result_free(&res);
        layer_destroy(&layer);
    }
}

static void reference_aux_losses_match_hand_computations(void **state) {
    (void)state;
    /* two tokens, E = 2, both prefer expert 0 */
    const double logits[4] = {1, 0, 2, 0};
    double p0 = sigmoid(1.0), p1 = sigmoid(2.0); /* softmax probability of expert 0 */
    moegen_spec spec = make_spec(2, 1, 2, 1);
    test_layer layer;
    layer_create(&layer, &spec, 2);
    layer_set_logits(&layer, logits);
    moe_ref_result res;

    layer.spec.router.aux_loss = MOEGEN_AUX_DEEPSPEED; /* E * sum_e mean_t p * c1 / S */
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.aux_loss, 2.0 * ((p0 + p1) / 2.0) * 2.0 / 2.0, 1e-15);
    moe_ref_result_free(&res);

    layer.spec.router.aux_loss = MOEGEN_AUX_NONE;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.aux_loss, 0.0, 0.0);
    moe_ref_result_free(&res);

    /* sigmoid + megatron: p = s / sum s; counts from a plain top-1 on p */
    layer.spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
    layer.spec.router.score_function = MOEGEN_SCORE_SIGMOID;
    double q0 = sigmoid(1.0) / (sigmoid(1.0) + 0.5), q1 = sigmoid(2.0) / (sigmoid(2.0) + 0.5);
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.aux_loss, 2.0 * ((q0 + q1) / 2.0) * 2.0 / (1.0 * 2.0), 1e-15);
    moe_ref_result_free(&res);
    layer_destroy(&layer);

    /* deepspeed k = 2 counts first choices only */
    spec = make_spec(3, 2, 3, 1);
    spec.router.aux_loss = MOEGEN_AUX_DEEPSPEED;
    layer_create(&layer, &spec, 2);
    const double three[6] = {2, 1, 0, 0, 1, 2}; /* first choices 0 and 2 */
    layer_set_logits(&layer, three);
    layer_run(&layer, NULL, &res);
    double z = exp(0) + exp(1) + exp(2);
    double mean[3] = {(exp(2) + exp(0)) / z / 2, (exp(1) + exp(1)) / z / 2, (exp(0) + exp(2)) / z / 2};
    EXPECT_NEAR(res.aux_loss, 3.0 * (mean[0] * 1 + mean[2] * 1) / 2.0, 1e-15);
    moe_ref_result_free(&res);
    /* megatron k = 2: counts of the plain top-2 = [1, 2, 1] over k*S = 4 */
    layer.spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.aux_loss, 3.0 * (mean[0] * 1 + mean[1] * 2 + mean[2] * 1) / 4.0, 1e-15);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_z_loss_is_the_mean_squared_logsumexp(void **state) {
    (void)state;
    moegen_spec spec = make_spec(2, 1, 2, 1);
    test_layer layer;
    layer_create(&layer, &spec, 2);
    const double logits[4] = {0, 0, 2, 2};
    layer_set_logits(&layer, logits);
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    double lse0 = log(2.0), lse1 = 2.0 + log(2.0);
    EXPECT_NEAR(res.z_loss, (lse0 * lse0 + lse1 * lse1) / 2.0, 1e-15);
    moe_ref_result_free(&res);
    /* a row without a valid logit contributes 0 but still counts */
    layer.spec.router.router_bias = 1;
    layer.router_b[0] = NAN;
    layer.router_b[1] = -INFINITY;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.z_loss, 0.0, 0.0);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_zero_tokens_give_zero_losses_and_empty_outputs(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    test_layer layer;
    layer_create(&layer, &spec, 0);
    moe_ref_result res;
    assert_int_equal(moe_ref_forward(&layer.spec, 0, NULL, &layer.weights, NULL, &res, NULL), 0);
    EXPECT_NEAR(res.aux_loss, 0.0, 0.0);
    EXPECT_NEAR(res.z_loss, 0.0, 0.0);
    assert_int_equal(res.n_dropped, 0);
    assert_int_equal(res.counts_before[0], 0);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* ---- randomness: jitter, noise, the RNG ------------------------------------------------------------ */

static void reference_uniform_matches_known_values_on_the_2_to_the_minus_24_grid(void **state) {
    (void)state;
    /* numerators computed independently (Python, arbitrary-precision integers) */
    const struct {
        uint64_t seed, offset, stream, index, odd;
    } known[] = {
        {0, 0, 0, 0, 2175093},
        {42, 0, 1, 0, 2562215},
        {42, 7, 2, 5, 508101},
        {0xdeadbeefull, 123456789, 3, 1000000, 6728797},
        {UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX, 10249831},
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
        double u = moe_ref_uniform(known[i].seed, known[i].offset, known[i].stream, known[i].index);
        assert_true(u > 0.0 && u < 1.0);
        assert_true(u == (double)known[i].odd / 16777216.0);
        assert_true(u == (double)(float)u); /* exact in fp32 */
    }
    for (uint64_t index = 0; index < 1000; index++) {
        double scaled = moe_ref_uniform(9, 1, 2, index) * 16777216.0;
        assert_true(scaled == floor(scaled) && fmod(scaled, 2.0) == 1.0);
    }
}

static void reference_jitter_scales_the_router_input_in_train_mode_only(void **state) {
    (void)state;
    /* E = 1, H = 2: z[t] = x[t] . router_w, read back through z_loss = mean z^2 */
    moegen_spec spec = make_spec(1, 1, 2, 1);
    spec.router.input_jitter = 0.01;
    spec.router.seed = 42;
    test_layer layer;
    layer_create(&layer, &spec, 2);
    layer.router_w[0] = 1.0f;
    layer.router_w[1] = 1.0f;
    layer.x[0 * 2 + 0] = 1.0f; /* token 0 uses index 0 */
    layer.x[1 * 2 + 1] = 1.0f; /* token 1 uses index t*H + h = 3 */
    moe_ref_options options = {.rng_offset = 7};
    moe_ref_result res;
    layer_run(&layer, &options, &res);
    EXPECT_NEAR(res.z_loss, 1.0, 0.0); /* eval: no jitter */
    moe_ref_result_free(&res);

    layer.spec.mode = MOEGEN_MODE_TRAIN;
    layer_run(&layer, &options, &res);
    double m0 = 0.99 + moe_ref_uniform(42, 7, 1, 0) * 0.02, m1 = 0.99 + moe_ref_uniform(42, 7, 1, 3) * 0.02;
    EXPECT_NEAR(res.z_loss, (m0 * m0 + m1 * m1) / 2.0, 1e-15);
    assert_true(fabs(res.z_loss - 1.0) > 1e-6);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_rsample_chooses_on_noisy_logits_and_weighs_with_clean_scores(void **state) {
    (void)state;
    enum { E = 8, S = 16 };
    moegen_spec spec = make_spec(E, 1, E, 1);
    spec.mode = MOEGEN_MODE_TRAIN;
    spec.router.noise = MOEGEN_NOISE_RSAMPLE;
    spec.router.seed = 99;
    test_layer layer;
    layer_create(&layer, &spec, S);
    double logits[S * E];
    for (int i = 0; i < S * E; i++)
        logits[i] = (i % 3) * 0.25;
    layer_set_logits(&layer, logits);
    moe_ref_options options = {.rng_offset = 3};
    moe_ref_result res;

    for (int top_k = 1; top_k <= 2; top_k++) {
        layer.spec.top_k = top_k;
        layer_run(&layer, &options, &res);
        int differs_from_clean = 0;
        for (int t = 0; t < S; t++) {
            double noisy[E], clean[E], z = 0;
            for (int e = 0; e < E; e++) {
                double u = moe_ref_uniform(99, 3, 2, (uint64_t)(t * E + e));
                noisy[e] = logits[t * E + e] - log(-log(u));
                clean[e] = logits[t * E + e];
                z += exp(clean[e]);
            }
            int first = 0, second = -1;
            const double *first_key = top_k == 1 ? noisy : clean;
            for (int e = 1; e < E; e++)
                if (first_key[e] > first_key[first])
                    first = e;
            for (int e = 0; e < E; e++)
                if (e != first && (second < 0 || noisy[e] > noisy[second]))
                    second = e;
            assert_int_equal(res.ids[t * top_k], first);
            EXPECT_NEAR(res.router_weights[t * top_k], exp(clean[first]) / z, 1e-15);
            if (top_k == 2) {
                assert_int_equal(res.ids[t * 2 + 1], second);
                EXPECT_NEAR(res.router_weights[t * 2 + 1], exp(clean[second]) / z, 1e-15);
            }
            int clean_best = 0;
            for (int e = 1; e < E; e++)
                if (clean[e] > clean[clean_best])
                    clean_best = e;
            differs_from_clean |= top_k == 1 && first != clean_best;
            assert_true(res.margin[t] >= 0.0 && isfinite(res.margin[t]));
        }
        if (top_k == 1)
            assert_true(differs_from_clean);
        moe_ref_result_free(&res);
    }

    layer.spec.mode = MOEGEN_MODE_EVAL; /* no noise: the clean choice, expert 2 (logit 0.5) for t = 0 */
    layer.spec.top_k = 1;
    layer_run(&layer, &options, &res);
    assert_int_equal(res.ids[0], 2);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* ---- experts, combine, residual, shared ---------------------------------------------------------- */

static void reference_each_activation_matches_its_formula(void **state) {
    (void)state;
    const struct {
        moegen_activation activation;
        double at_one, at_minus_half; /* act(x) for plain ones, act(x) * x for gated ones */
    } cases[] = {
        {MOEGEN_ACT_RELU, 1.0, 0.0},
        {MOEGEN_ACT_GELU, 0.8413447460685429, -0.15426876936299344},
        {MOEGEN_ACT_GELU_TANH, 0.8411919906082768, -0.15428599017485606},
        {MOEGEN_ACT_SILU, 0.7310585786300049, -0.1887703343990727},
        {MOEGEN_ACT_SWIGLU, 0.7310585786300049, -0.1887703343990727 * -0.5},
        {MOEGEN_ACT_GEGLU, 0.8413447460685429, -0.15426876936299344 * -0.5},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        moegen_spec spec = make_spec(1, 1, 1, 1);
        spec.activation = cases[c].activation;
        int gated = spec.activation == MOEGEN_ACT_SWIGLU || spec.activation == MOEGEN_ACT_GEGLU;
        test_layer layer;
        layer_create(&layer, &spec, 2);
        layer.w1[0] = 1.0f;
        if (gated)
            layer.w1[1] = 1.0f; /* up row */
        layer.w2[0] = 1.0f;
        layer.x[0] = 1.0f;
        layer.x[1] = -0.5f;
        moe_ref_result res;
        layer_run(&layer, NULL, &res);
        EXPECT_NEAR(res.y[0], cases[c].at_one, 1e-15);
        EXPECT_NEAR(res.y[1], cases[c].at_minus_half, 1e-15);
        moe_ref_result_free(&res);
        layer_destroy(&layer);
    }
}

static void reference_expert_biases_enter_both_projections(void **state) {
    (void)state;
    moegen_spec spec = make_spec(1, 1, 1, 1);
    spec.expert_bias = 1;
    spec.activation = MOEGEN_ACT_SWIGLU;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer.w1[0] = 1.0f;    /* gate */
    layer.w1[1] = 1.0f;    /* up */
    layer.b1[0] = 0.5f;
    layer.b1[1] = -0.25f;
    layer.w2[0] = 2.0f;
    layer.b2[0] = 0.125f;
    layer.x[0] = 1.0f;
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.y[0], 2.0 * (1.2263617142904655 * 0.75) + 0.125, 1e-15);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_weight_on_input_scales_what_the_expert_sees(void **state) {
    (void)state;
    moegen_spec spec = make_spec(2, 1, 1, 1);
    spec.expert_bias = 1;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer.router_w[0] = 1.0f; /* z = [1, 0]: expert 0 with w = sigmoid(1) */
    layer.x[0] = 1.0f;
    layer.w1[0] = 1.0f;
    layer.b1[0] = -0.5f;
    layer.w2[0] = 2.0f;
    layer.b2[0] = 0.25f;
    double w = sigmoid(1.0);
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.y[0], w * (2.0 * 0.5 + 0.25), 1e-15);
    moe_ref_result_free(&res);
    layer.spec.weight_on_input = 1;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.y[0], 2.0 * (w - 0.5) + 0.25, 1e-15);
    EXPECT_NEAR(res.weights[0], w, 1e-15);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

static void reference_residual_and_shared_experts_add_as_specified(void **state) {
    (void)state;
    moegen_spec spec = make_spec(1, 1, 1, 1);
    spec.use_residual = 1;
    spec.shared.count = 2;
    spec.shared.intermediate_size = 1;
    spec.shared.gate = 1;
    test_layer layer;
    layer_create(&layer, &spec, 1);
    layer.x[0] = 2.0f;
    layer.w1[0] = 1.0f;
    layer.w2[0] = 3.0f; /* expert: 6 */
    layer.residual_w1[0] = 1.0f;
    layer.residual_w2[0] = 5.0f; /* residual MLP: 10 */
    layer.residual_coef_w[0] = 0.5f; /* coefficient logits [1, -0.5] */
    layer.residual_coef_b[1] = -0.5f;
    layer.shared_w1[0] = 1.0f;
    layer.shared_w1[1] = 1.0f;
    layer.shared_w2[0] = 1.0f;
    layer.shared_w2[1] = 2.0f; /* shared: 2 + 4 */
    layer.shared_gate[0] = 0.25f; /* gate sigmoid(0.5) */
    moe_ref_result res;
    layer_run(&layer, NULL, &res);
    double a0 = sigmoid(1.5), a1 = 1.0 - a0;
    EXPECT_NEAR(res.y[0], 6.0 * a0 + 10.0 * a1 + sigmoid(0.5) * 6.0, 1e-14);
    moe_ref_result_free(&res);

    layer.spec.shared.gate = 0;
    layer.spec.use_residual = 0;
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.y[0], 6.0 + 6.0, 1e-14);
    moe_ref_result_free(&res);

    layer.spec.expert_bias = 1; /* biases in every MLP */
    layer.spec.use_residual = 1;
    layer.b1[0] = 1.0f;
    layer.b2[0] = 0.5f;       /* expert: 3 * 3 + 0.5 = 9.5 */
    layer.residual_b1[0] = -1.0f;
    layer.residual_b2[0] = 1.0f; /* residual: 5 * 1 + 1 = 6 */
    layer.shared_b1[1] = 1.0f;
    layer.shared_b2[0] = 0.25f; /* shared: 2 + 0.25 and 2 * 3 */
    layer_run(&layer, NULL, &res);
    EXPECT_NEAR(res.y[0], 9.5 * a0 + 6.0 * a1 + 2.25 + 6.0, 1e-14);
    moe_ref_result_free(&res);
    layer_destroy(&layer);
}

/* ---- options: token mask, forced routing ------------------------------------------------------------ */

static void random_layer(test_layer *layer, int64_t n_tokens) {
    moegen_spec spec = make_spec(16, 4, 32, 16);
    spec.activation = MOEGEN_ACT_SWIGLU;
    spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
    spec.router.norm_topk_prob = 1;
    spec.capacity.mode = MOEGEN_CAP_FACTOR;
    spec.capacity.formula = MOEGEN_CAP_FORMULA_MEGATRON;
    spec.capacity.eval_capacity_factor = 1.0;
    spec.capacity.priority = MOEGEN_PRIORITY_PROBS;
    spec.capacity.renormalize = 1;
    spec.shared.count = 1;
    spec.shared.intermediate_size = 16;
    layer_create(layer, &spec, n_tokens);
    uint64_t random_state = 3;
    fill_random(layer->x, n_tokens * 32, &random_state, 1.0f);
    fill_random(layer->router_w, 16 * 32, &random_state, 0.5f);
    fill_random(layer->w1, 16 * 32 * 32, &random_state, 0.2f);
    fill_random(layer->w2, 16 * 32 * 16, &random_state, 0.2f);
    fill_random(layer->shared_w1, 32 * 32, &random_state, 0.2f);
    fill_random(layer->shared_w2, 32 * 16, &random_state, 0.2f);
}

static void reference_token_mask_computes_only_the_selected_rows(void **state) {
    (void)state;
    enum { S = 64, H = 32 };
    test_layer layer;
    random_layer(&layer, S);
    uint8_t mask[S];
    for (int t = 0; t < S; t++)
        mask[t] = (uint8_t)(t % 3 == 0);
    moe_ref_options options = {.token_mask = mask};
    moe_ref_result full, sampled;
    layer_run(&layer, NULL, &full);
    layer_run(&layer, &options, &sampled);
    assert_true(full.n_dropped > 0);
    for (int t = 0; t < S; t++)
        for (int h = 0; h < H; h++)
            EXPECT_NEAR(sampled.y[t * H + h], mask[t] ? full.y[t * H + h] : 0.0, 0.0);
    assert_memory_equal(full.counts_after, sampled.counts_after, 16 * sizeof(int64_t));
    assert_memory_equal(full.weights, sampled.weights, S * 4 * sizeof(double));
    EXPECT_NEAR(sampled.aux_loss, full.aux_loss, 0.0);
    EXPECT_NEAR(sampled.z_loss, full.z_loss, 0.0);
    assert_int_equal(sampled.n_dropped, full.n_dropped);
    /* invariants of a capacity run */
    assert_ids_valid_and_distinct(&full);
    int64_t before = 0, after = 0;
    for (int e = 0; e < 16; e++) {
        before += full.counts_before[e];
        after += full.counts_after[e];
        assert_true(full.counts_after[e] <= full.capacity);
    }
    assert_int_equal(before, S * 4);
    assert_int_equal(before - after, full.n_dropped);
    for (int t = 0; t < S; t++) {
        double sum = 0;
        for (int j = 0; j < 4; j++)
            sum += full.weights[t * 4 + j];
        assert_true(sum == 0.0 || fabs(sum - 1.0) < 1e-12);
        assert_true(full.margin[t] >= 0.0);
    }
    moe_ref_result_free(&full);
    moe_ref_result_free(&sampled);
    layer_destroy(&layer);
}

static void reference_forced_routing_replaces_the_routing_but_not_the_losses(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 8);
    spec.router.aux_loss = MOEGEN_AUX_MEGATRON;
    test_layer layer;
    layer_create(&layer, &spec, 2);
    const double logits[8] = {1, 2, 3, 0, 0.5, -1, 2, 1};
    layer_set_logits(&layer, logits);
    layer_set_identity_experts(&layer);
    const int32_t forced_ids[4] = {3, 1, 0, 2};
    const float forced_weights[4] = {0.625f, 0.25f, 0.5f, 0.125f};
    moe_ref_options options = {.forced_ids = forced_ids, .forced_router_weights = forced_weights};
    moe_ref_result own, forced;
    layer_run(&layer, NULL, &own);
    layer_run(&layer, &options, &forced);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(forced.ids[i], forced_ids[i]);
        EXPECT_NEAR(forced.router_weights[i], forced_weights[i], 0.0);
        EXPECT_NEAR(forced.weights[i], forced_weights[i], 0.0);
    }
    for (int h = 0; h < 4; h++) {
        EXPECT_NEAR(forced.y[h], 0.875 * logits[h], 1e-15);
        EXPECT_NEAR(forced.y[4 + h], 0.625 * logits[4 + h], 1e-15);
    }
    const int64_t counts[4] = {1, 1, 1, 1};
    for (int e = 0; e < 4; e++)
        assert_int_equal(forced.counts_before[e], counts[e]);
    EXPECT_NEAR(forced.aux_loss, own.aux_loss, 0.0);
    EXPECT_NEAR(forced.z_loss, own.z_loss, 0.0);
    EXPECT_NEAR(forced.margin[0], own.margin[0], 0.0);
    moe_ref_result_free(&own);
    moe_ref_result_free(&forced);

    /* a forced route to an expert whose logit is invalid is not counted */
    layer.spec.router.router_bias = 1;
    layer.router_b[3] = NAN;
    layer_run(&layer, &options, &forced);
    assert_int_equal(forced.counts_before[3], 0);
    EXPECT_NEAR(forced.weights[0], 0.0, 0.0);
    moe_ref_result_free(&forced);

    /* repeated ids are refused */
    const int32_t repeated[4] = {1, 1, 0, 2};
    options.forced_ids = repeated;
    char why[256];
    assert_int_equal(moe_ref_forward(&layer.spec, 2, layer.x, &layer.weights, &options, &forced, why), -1);
    assert_non_null(strstr(why, "forced_ids"));
    assert_null(forced.y);
    layer_destroy(&layer);
}

static void reference_bad_arguments_are_refused_with_a_reason(void **state) {
    (void)state;
    moegen_spec spec = make_spec(4, 2, 4, 1);
    test_layer layer;
    layer_create(&layer, &spec, 1);
    moe_ref_result res;
    char why[256];
    assert_int_equal(moe_ref_forward(NULL, 1, layer.x, &layer.weights, NULL, &res, why), -1);
    layer.spec.top_k = 5;
    assert_int_equal(moe_ref_forward(&layer.spec, 1, layer.x, &layer.weights, NULL, &res, why), -1);
    assert_non_null(strstr(why, "top_k"));
    layer.spec.top_k = 2;
    layer.spec.router.router_bias = 1;
    layer.weights.router_b = NULL;
    assert_int_equal(moe_ref_forward(&layer.spec, 1, layer.x, &layer.weights, NULL, &res, why), -1);
    assert_non_null(strstr(why, "router_b"));
    assert_int_equal(moe_ref_forward(&layer.spec, -1, layer.x, &layer.weights, NULL, &res, why), -1);
    layer_destroy(&layer);
}

/* ---- 16-bit converters --------------------------------------------------------------------------- */

static void reference_half_and_bf16_widening_is_exact_on_special_values(void **state) {
    (void)state;
    const struct {
        uint16_t bits;
        double value;
    } half[] = {
        {0x0000, 0.0},          {0x3c00, 1.0},           {0xc000, -2.0},
        {0x7bff, 65504.0},      {0x0001, 0x1p-24},       {0x03ff, 1023 * 0x1p-24},
        {0x0400, 0x1p-14},      {0x3555, 0.333251953125}, {0x8001, -0x1p-24},
        {0x7c00, INFINITY},     {0xfc00, -INFINITY},
    }, bf16[] = {
        {0x0000, 0.0},              {0x3f80, 1.0},        {0xc000, -2.0},
        {0x7f7f, 0x1.fep127},       {0x0001, 0x1p-133},   {0x007f, 127 * 0x1p-133},
        {0x0080, 0x1p-126},         {0x4049, 3.140625},   {0x8001, -0x1p-133},
        {0x7f80, INFINITY},         {0xff80, -INFINITY},
    };
    for (size_t i = 0; i < sizeof(half) / sizeof(half[0]); i++)
        assert_true(moe_ref_half_to_double(half[i].bits) == half[i].value);
    for (size_t i = 0; i < sizeof(bf16) / sizeof(bf16[0]); i++)
        assert_true(moe_ref_bf16_to_double(bf16[i].bits) == bf16[i].value);
    assert_true(signbit(moe_ref_half_to_double(0x8000)) && moe_ref_half_to_double(0x8000) == 0.0);
    assert_true(signbit(moe_ref_bf16_to_double(0x8000)) && moe_ref_bf16_to_double(0x8000) == 0.0);
    assert_true(isnan(moe_ref_half_to_double(0x7e00)) && isnan(moe_ref_half_to_double(0xfc01)));
    assert_true(isnan(moe_ref_bf16_to_double(0x7fc0)) && isnan(moe_ref_bf16_to_double(0xff81)));
    /* bf16 is the top half of an fp32: compare every pattern with the hardware's float */
    for (uint32_t bits = 0; bits < 65536; bits++) {
        uint32_t wide = bits << 16;
        float f;
        memcpy(&f, &wide, sizeof(f));
        double d = moe_ref_bf16_to_double((uint16_t)bits);
        assert_true(isnan(f) ? isnan(d) : d == (double)f);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(reference_identity_experts_return_the_input),
        cmocka_unit_test(reference_identity_experts_return_the_input_in_fp16_and_bf16),
        cmocka_unit_test(reference_softmax_then_topk_weights_are_the_softmax_probabilities),
        cmocka_unit_test(reference_topk_then_softmax_weights_are_the_softmax_of_the_chosen_logits),
        cmocka_unit_test(reference_sigmoid_selection_adds_the_score_bias_but_weights_do_not),
        cmocka_unit_test(reference_sqrtsoftplus_scores_are_finite_for_huge_logits),
        cmocka_unit_test(reference_normalization_then_scaling_multiplies_the_normalized_weights),
        cmocka_unit_test(reference_group_limit_keeps_the_best_groups_by_top_m_sum_or_by_max),
        cmocka_unit_test(reference_zero_group_mask_can_pick_an_expert_the_neg_inf_mask_drops),
        cmocka_unit_test(reference_exact_ties_go_to_the_lower_index),
        cmocka_unit_test(reference_nan_and_inf_logits_give_valid_distinct_ids_and_finite_output),
        cmocka_unit_test(reference_invalid_routes_are_never_counted_or_combined),
        cmocka_unit_test(reference_logits_beyond_the_fp32_range_act_as_overflowed_fp32_logits),
        cmocka_unit_test(reference_deepspeed_capacity_is_formed_in_fp32),
        cmocka_unit_test(reference_and_generator_deepspeed_capacity_match_deepspeed_for_k_at_least_3),
        cmocka_unit_test(reference_megatron_capacity_is_formed_in_double),
        cmocka_unit_test(reference_train_mode_uses_capacity_factor_and_eval_mode_eval_capacity_factor),
        cmocka_unit_test(reference_fixed_capacity_keeps_that_many_and_dropless_keeps_all),
        cmocka_unit_test(reference_each_priority_keeps_its_own_routes_on_a_hot_expert),
        cmocka_unit_test(reference_probs_priority_ties_keep_the_lower_token),
        cmocka_unit_test(reference_renormalize_rescales_the_surviving_weights_of_a_token),
        cmocka_unit_test(reference_pad_to_capacity_changes_no_result),
        cmocka_unit_test(reference_megatron_aux_loss_is_one_at_perfect_balance),
        cmocka_unit_test(reference_aux_losses_match_hand_computations),
        cmocka_unit_test(reference_z_loss_is_the_mean_squared_logsumexp),
        cmocka_unit_test(reference_zero_tokens_give_zero_losses_and_empty_outputs),
        cmocka_unit_test(reference_uniform_matches_known_values_on_the_2_to_the_minus_24_grid),
        cmocka_unit_test(reference_jitter_scales_the_router_input_in_train_mode_only),
        cmocka_unit_test(reference_rsample_chooses_on_noisy_logits_and_weighs_with_clean_scores),
        cmocka_unit_test(reference_each_activation_matches_its_formula),
        cmocka_unit_test(reference_expert_biases_enter_both_projections),
        cmocka_unit_test(reference_weight_on_input_scales_what_the_expert_sees),
        cmocka_unit_test(reference_residual_and_shared_experts_add_as_specified),
        cmocka_unit_test(reference_token_mask_computes_only_the_selected_rows),
        cmocka_unit_test(reference_forced_routing_replaces_the_routing_but_not_the_losses),
        cmocka_unit_test(reference_bad_arguments_are_refused_with_a_reason),
        cmocka_unit_test(reference_half_and_bf16_widening_is_exact_on_special_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
