/* test_sweep_sampler.c — the sweep's spec sampler (tests/sweep/spec_sampler.c) covers the
 * whole spec space and never writes a spec the loader rejects.
 *
 * 4000 seeded samples must all validate, and between them reach every value of every
 * enum field, every top-k from 1 to 16 and larger ones, odd expert counts, sizes that
 * are not powers of two, every capacity mode with and without padding and
 * renormalization, groups, shared experts, residual, weight on input, train-mode
 * randomness and both presets. The same seed must give the same text.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "spec.h"
#include "spec_sampler.h"

#define SAMPLES 4000

typedef struct coverage {
    int top_k[65], activation[6], dtype[3], score[3], order[2], group_score[2], group_mask[2], aux[3];
    int capacity_mode[3], formula[2], priority[4], semantics[2], mode[2];
    int large_k, odd_experts, odd_width, groups, shared, shared_gate, residual, weight_on_input, rsample;
    int jitter, score_bias, router_bias, norm, scaling, pad, renormalize, expert_bias, min_capacity;
} coverage;

static void count(coverage *c, const moegen_spec *s) {
    c->top_k[s->top_k]++;
    c->activation[s->activation]++;
    c->dtype[s->dtype]++;
    c->score[s->router.score_function]++;
    c->semantics[s->semantics]++;
    c->mode[s->mode]++;
    c->aux[s->router.aux_loss]++;
    c->capacity_mode[s->capacity.mode]++;
    if (s->router.score_function == MOEGEN_SCORE_SOFTMAX) c->order[s->router.order]++;
    if (s->router.n_group > 1) {
        c->groups++;
        c->group_score[s->router.group_score]++;
        c->group_mask[s->router.group_mask]++;
    }
    if (s->capacity.mode == MOEGEN_CAP_FACTOR) {
        c->formula[s->capacity.formula]++;
        c->min_capacity += s->capacity.formula == MOEGEN_CAP_FORMULA_DEEPSPEED && s->capacity.min_capacity != 4 &&
                           s->capacity.min_capacity != 0;
    }
    if (s->capacity.mode != MOEGEN_CAP_DROPLESS) {
        c->priority[s->capacity.priority]++;
        c->pad += s->capacity.pad_to_capacity;
    }
    c->renormalize += s->capacity.renormalize;
    c->large_k += s->top_k > 16;
    c->odd_experts += s->num_experts % 2 == 1 && s->num_experts > 1;
    c->odd_width += (s->hidden_size & (s->hidden_size - 1)) != 0 || (s->moe_intermediate_size & (s->moe_intermediate_size - 1)) != 0;
    c->shared += s->shared.count > 0;
    c->shared_gate += s->shared.count > 0 && s->shared.gate;
    c->residual += s->use_residual;
    c->weight_on_input += s->weight_on_input;
    c->rsample += s->router.noise == MOEGEN_NOISE_RSAMPLE;
    c->jitter += s->router.input_jitter > 0;
    c->score_bias += s->router.score_bias;
    c->router_bias += s->router.router_bias;
    c->norm += s->router.norm_topk_prob;
    c->scaling += s->router.routed_scaling_factor != 1.0;
    c->expert_bias += s->expert_bias;
}

static void every_sample_validates_and_the_samples_cover_the_spec_space(void **state) {
    (void)state;
    static coverage c;
    memset(&c, 0, sizeof c);
    for (uint64_t i = 0; i < SAMPLES; i++) {
        char yaml[4096], name[32];
        snprintf(name, sizeof name, "sample-%llu", (unsigned long long)i);
        moe_choices choices;
        moe_choices_seeded(&choices, i * 7919 + 1);
        moe_sample_limits limits = MOE_SAMPLE_SWEEP_LIMITS;
        assert_int_equal(moe_sample_spec(&choices, &limits, name, yaml, sizeof yaml), 0);
        moegen_spec spec;
        moegen_error err;
        if (moegen_spec_parse(yaml, strlen(yaml), name, &spec, &err) != MOEGEN_OK)
            fail_msg("sample %llu was rejected: %s\n%s", (unsigned long long)i, err.message, yaml);
        count(&c, &spec);
        moegen_spec_free(&spec);
    }
    for (int k = 1; k <= 16; k++)
        if (!c.top_k[k]) fail_msg("no sample has top-k %d", k);
#define ALL(field, n)                                                              \
    for (int v = 0; v < (n); v++)                                                  \
        if (!c.field[v]) fail_msg("no sample has %s value %d", #field, v);
    ALL(activation, 6)
    ALL(dtype, 3)
    ALL(score, 3)
    ALL(order, 2)
    ALL(group_score, 2)
    ALL(group_mask, 2)
    ALL(aux, 3)
    ALL(capacity_mode, 3)
    ALL(formula, 2)
    ALL(priority, 4)
    ALL(semantics, 2)
    ALL(mode, 2)
#undef ALL
    const int *flags[] = {&c.large_k, &c.odd_experts, &c.odd_width, &c.groups, &c.shared, &c.shared_gate,
                          &c.residual, &c.weight_on_input, &c.rsample, &c.jitter, &c.score_bias, &c.router_bias,
                          &c.norm, &c.scaling, &c.pad, &c.renormalize, &c.expert_bias, &c.min_capacity};
    const char *names[] = {"k > 16", "odd E", "non-power-of-two widths", "groups", "shared experts",
                           "shared gate", "residual", "weight on input", "rsample", "jitter", "score bias",
                           "router bias", "norm_topk_prob", "scaling", "pad_to_capacity", "renormalize",
                           "expert bias", "min_capacity"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        if (*flags[i] < 10) fail_msg("only %d samples have %s", *flags[i], names[i]);
        print_message("  %-24s %5d of %d samples\n", names[i], *flags[i], SAMPLES);
    }
}

static void a_seed_names_one_spec(void **state) {
    (void)state;
    char a[4096], b[4096];
    moe_sample_limits limits = MOE_SAMPLE_SWEEP_LIMITS;
    moe_choices c1, c2;
    moe_choices_seeded(&c1, 12345);
    moe_choices_seeded(&c2, 12345);
    assert_int_equal(moe_sample_spec(&c1, &limits, "x", a, sizeof a), 0);
    assert_int_equal(moe_sample_spec(&c2, &limits, "x", b, sizeof b), 0);
    assert_string_equal(a, b);
}

static void fuzz_bytes_give_valid_small_specs(void **state) {
    (void)state;
    uint8_t bytes[256];
    for (int round = 0; round < 500; round++) {
        for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (uint8_t)((i * 131 + round * 17) ^ (round >> 2));
        moe_choices c;
        moe_choices_from_bytes(&c, bytes, (size_t)(round % 257));
        moe_sample_limits limits = MOE_SAMPLE_SMALL_LIMITS;
        char yaml[4096];
        assert_int_equal(moe_sample_spec(&c, &limits, "fuzz", yaml, sizeof yaml), 0);
        moegen_spec spec;
        moegen_error err;
        if (moegen_spec_parse(yaml, strlen(yaml), "fuzz", &spec, &err) != MOEGEN_OK)
            fail_msg("round %d was rejected: %s\n%s", round, err.message, yaml);
        assert_true(spec.num_experts <= 16 && spec.hidden_size <= 64 && spec.moe_intermediate_size <= 64);
        moegen_spec_free(&spec);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_sample_validates_and_the_samples_cover_the_spec_space),
        cmocka_unit_test(a_seed_names_one_spec),
        cmocka_unit_test(fuzz_bytes_give_valid_small_specs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
