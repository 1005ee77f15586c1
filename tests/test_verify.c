/* test_verify.c — the verifier's routing rules (tests/reference/verify.c) can fail.
 *
 * A "kernel" result is made from the reference's own run (so it passes), then its routing
 * is changed the way a kernel could get it wrong or legitimately differ:
 *   - two experts whose router rows are identical (an exact tie) in the other order: an
 *     error, whatever else happens in the token;
 *   - two experts whose keys differ by about 2e-8 (a near-tie fp32 may resolve either way)
 *     in the other order, in a token that also has an exact tie: allowed, and counted;
 *   - an expert far below the picks chosen instead of one of them: an error.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "reference.h"
#include "spec.h"
#include "tensors.h"
#include "verify.h"

/* Five experts, top-3: logits 2, 2, 1 + 2^-22, 1, 0 for the one token (x = e_0), so the
 * picks are 0, 1 (an exact tie: lower index first), then 2 over 3 by a hair; experts 2
 * and 3 have the same FFN, so either gives the same y. */
static const char *YAML = "name: verify\nnum_experts: 5\nnum_experts_per_tok: 3\nhidden_size: 16\n"
                          "moe_intermediate_size: 16\ndtype: fp32\nactivation: relu\n";

typedef struct fixture {
    moegen_spec spec;
    moe_tensors ts;
    moegen_kernel_weights w;
    moe_ref_result ref;
    float y[16], topk_weights[3], router_weights[3];
    int32_t ids[3];
    int64_t counts_before[5], counts_after[5];
    moe_kernel_result kernel;
} fixture;

static void setup(fixture *f) {
    memset(f, 0, sizeof *f);
    moegen_error err;
    if (moegen_spec_parse(YAML, strlen(YAML), "verify", &f->spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    assert_int_equal(moe_tensors_alloc(&f->spec, 1, &f->ts), 0);
    moe_tensors_fill(&f->ts, 7);
    const int64_t H = 16, F1 = moegen_spec_ffn_rows(&f->spec);
    float *x = f->ts.t[MOE_T_X].data, *router = f->ts.t[MOE_T_ROUTER_W].data;
    memset(x, 0, H * sizeof *x);
    x[0] = 1.0f;
    const float logits[5] = {2.0f, 2.0f, 1.0f + 0x1p-22f, 1.0f, 0.0f};
    for (int e = 0; e < 5; e++) {
        memset(router + e * H, 0, H * sizeof *router);
        router[e * H] = logits[e];
    }
    float *w1 = f->ts.t[MOE_T_W1].data, *w2 = f->ts.t[MOE_T_W2].data;
    memcpy(w1 + 3 * F1 * H, w1 + 2 * F1 * H, (size_t)(F1 * H) * sizeof *w1);
    memcpy(w2 + 3 * H * 16, w2 + 2 * H * 16, (size_t)(H * 16) * sizeof *w2);
    moe_tensors_weights(&f->ts, &f->w);
    char why[256];
    moe_ref_options options = {0};
    if (moe_ref_forward(&f->spec, 1, x, &f->w, &options, &f->ref, why) != 0) fail_msg("reference: %s", why);
    assert_int_equal(f->ref.ids[0], 0);
    assert_int_equal(f->ref.ids[1], 1);
    assert_int_equal(f->ref.ids[2], 2);
    for (int h = 0; h < H; h++) f->y[h] = (float)f->ref.y[h];
    for (int j = 0; j < 3; j++) {
        f->ids[j] = f->ref.ids[j];
        f->topk_weights[j] = (float)f->ref.weights[j];
        f->router_weights[j] = (float)f->ref.router_weights[j];
    }
    memcpy(f->counts_before, f->ref.counts_before, sizeof f->counts_before);
    memcpy(f->counts_after, f->ref.counts_after, sizeof f->counts_after);
    f->kernel = (moe_kernel_result){
        .y = f->y, .ids = f->ids, .topk_weights = f->topk_weights, .router_weights = f->router_weights,
        .counts_before = f->counts_before, .counts_after = f->counts_after, .n_dropped = f->ref.n_dropped,
        .capacity = f->ref.capacity, .aux_loss = f->ref.aux_loss, .z_loss = f->ref.z_loss,
    };
}

static void teardown(fixture *f) {
    moe_ref_result_free(&f->ref);
    moe_tensors_free(&f->ts);
    moegen_spec_free(&f->spec);
}

static void swap_slots(fixture *f, int a, int b) {
    int32_t id = f->ids[a];
    f->ids[a] = f->ids[b];
    f->ids[b] = id;
    float weight = f->topk_weights[a];
    f->topk_weights[a] = f->topk_weights[b];
    f->topk_weights[b] = weight;
    weight = f->router_weights[a];
    f->router_weights[a] = f->router_weights[b];
    f->router_weights[b] = weight;
}

/* The kernel routes slot `slot` to `expert` instead (counts follow). */
static void reroute(fixture *f, int slot, int expert) {
    f->counts_before[f->ids[slot]]--;
    f->counts_after[f->ids[slot]]--;
    f->ids[slot] = expert;
    f->counts_before[expert]++;
    f->counts_after[expert]++;
}

static moe_verify_report verify(fixture *f) {
    moe_verify_report report;
    assert_int_equal(moe_verify(&f->spec, 1, f->ts.t[MOE_T_X].data, &f->w, 0, NULL, &f->kernel, &report), 0);
    return report;
}

static void the_reference_own_routing_passes(void **state) {
    (void)state;
    fixture f;
    setup(&f);
    moe_verify_report report = verify(&f);
    if (!report.ok) fail_msg("%s", report.message);
    assert_int_equal(report.ambiguous_tokens, 0);
    assert_true(f.ref.margin[0] == 0.0); /* the token's smallest gap is the exact tie */
    teardown(&f);
}

static void an_exact_tie_in_the_other_order_is_an_error(void **state) {
    (void)state;
    fixture f;
    setup(&f);
    swap_slots(&f, 0, 1);
    moe_verify_report report = verify(&f);
    assert_false(report.ok);
    assert_non_null(strstr(report.message, "routing differs at token 0 from slot 0"));
    teardown(&f);
}

static void a_near_tie_in_the_other_order_is_allowed_beside_an_exact_tie(void **state) {
    (void)state;
    fixture f;
    setup(&f);
    reroute(&f, 2, 3); /* expert 3 instead of 2: keys 2e-8 apart, same FFN */
    moe_verify_report report = verify(&f);
    if (!report.ok) fail_msg("%s", report.message);
    assert_int_equal(report.ambiguous_tokens, 1);
    assert_true(report.used_forced_routing);
    teardown(&f);
}

static void a_pick_far_below_the_others_is_an_error(void **state) {
    (void)state;
    fixture f;
    setup(&f);
    reroute(&f, 2, 4); /* logit 0 instead of 1 + 2^-22 */
    moe_verify_report report = verify(&f);
    assert_false(report.ok);
    assert_non_null(strstr(report.message, "routing differs at token 0 from slot 2"));
    teardown(&f);
}

static void an_output_off_by_more_than_the_tolerance_is_an_error(void **state) {
    (void)state;
    fixture f;
    setup(&f);
    f.y[5] += 0.01f * (fabsf(f.y[5]) + 1.0f);
    moe_verify_report report = verify(&f);
    assert_false(report.ok);
    assert_non_null(strstr(report.message, "y[0][5]"));
    teardown(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_reference_own_routing_passes),
        cmocka_unit_test(an_exact_tie_in_the_other_order_is_an_error),
        cmocka_unit_test(a_near_tie_in_the_other_order_is_allowed_beside_an_exact_tie),
        cmocka_unit_test(a_pick_far_below_the_others_is_an_error),
        cmocka_unit_test(an_output_off_by_more_than_the_tolerance_is_an_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
