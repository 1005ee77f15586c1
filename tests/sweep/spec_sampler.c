/* spec_sampler.c — random valid specs (see spec_sampler.h).
 *
 * The draw order is fixed, so a seed names a spec. Each field is either written or left
 * to its default (also a choice), and written only where specs/README.md says it
 * applies. The rules that tie fields together (k <= E, groups divide E, the kept groups
 * hold k experts, group_topm <= E / G, rsample needs softmax, k <= 2 and one group,
 * weight_on_input needs k = 1, min_capacity needs the deepspeed formula, ...) are
 * followed by drawing the dependent field after the fields it depends on.
 */
#include "spec_sampler.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ---- choices ------------------------------------------------------------------------------- */

void moe_choices_seeded(moe_choices *c, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->state = seed;
}

void moe_choices_from_bytes(moe_choices *c, const uint8_t *data, size_t size) {
    memset(c, 0, sizeof *c);
    c->bytes = data;
    c->n_bytes = size;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint32_t moe_choose(moe_choices *c, uint32_t n) {
    if (n <= 1) return 0;
    if (!c->bytes) return (uint32_t)(splitmix64(&c->state) % n);
    uint32_t value = 0; /* enough bytes for n, little-endian; zeros once the input is used up */
    for (uint32_t range = 1; range < n && range <= 0xffffffu; range <<= 8)
        value = (value << 8) | (c->at < c->n_bytes ? c->bytes[c->at++] : 0u);
    return value % n;
}

/* ---- text ------------------------------------------------------------------------------------ */

typedef struct writer {
    char *out;
    size_t size, used;
    int overflow;
} writer;

static void emit(writer *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void emit(writer *w, const char *fmt, ...) {
    if (w->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(w->out + w->used, w->size - w->used, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= w->size - w->used) w->overflow = 1;
    else w->used += (size_t)n;
}

static int one_in(moe_choices *c, uint32_t n) { return moe_choose(c, n) == 0; }
static const char *boolean(int value) { return value ? "true" : "false"; }

/* A positive decimal literal with two decimals in [lo/100, hi/100], e.g. "0.55". */
static void decimal(moe_choices *c, int lo, int hi, char *out, size_t size) {
    int hundredths = lo + (int)moe_choose(c, (uint32_t)(hi - lo + 1));
    snprintf(out, size, "%d.%02d", hundredths / 100, hundredths % 100);
}

static int min_int(int a, int b) { return a < b ? a : b; }

/* An integer in [lo, hi]. */
static int between(moe_choices *c, int lo, int hi) {
    return hi <= lo ? lo : lo + (int)moe_choose(c, (uint32_t)(hi - lo + 1));
}

/* ---- the spec ------------------------------------------------------------------------------------ */

static const char *const ACTIVATIONS[] = {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"};
static const char *const DTYPES[] = {"fp32", "fp16", "bf16"};
static const char *const SCORES[] = {"softmax", "sigmoid", "sqrtsoftplus"};
static const char *const ORDERS[] = {"softmax_then_topk", "topk_then_softmax"};
static const char *const GROUP_SCORES[] = {"topm_sum", "max"};
static const char *const GROUP_MASKS[] = {"neg_inf", "zero"};
static const char *const AUX_LOSSES[] = {"none", "deepspeed", "megatron"};
static const char *const CAPACITY_MODES[] = {"dropless", "factor", "fixed"};
static const char *const FORMULAS[] = {"deepspeed", "megatron"};
static const char *const PRIORITIES[] = {"probs", "position", "position_choice_major", "random"};
static const char *const SCALING[] = {"0.5", "1.5", "2.5", "16.0", "0.001", "1.0"};
static const char *const JITTER[] = {"0.01", "0.1", "0.3", "0.0"};
#define PICK(c, list) (list)[moe_choose((c), sizeof(list) / sizeof((list)[0]))]

/* A width: a multiple of 16 up to max_width, small ones more often. */
static int width(moe_choices *c, int max_width) {
    int steps = max_width / 16;
    if (one_in(c, 2)) steps = min_int(steps, 6);
    return 16 * between(c, 1, steps);
}

static int draw_experts(moe_choices *c, int max_experts) {
    static const int SPECIAL[] = {1, 2, 3, 8, 60, 64, 128, 160};
    switch (moe_choose(c, 10)) {
    case 0: case 1: case 2: case 3:
        return between(c, 1, min_int(16, max_experts));
    case 4: case 5: case 6:
        return between(c, 1, min_int(64, max_experts));
    case 7: case 8:
        return between(c, 1, max_experts);
    default: {
        int e = PICK(c, SPECIAL);
        return e <= max_experts ? e : max_experts;
    }
    }
}

/* A divisor of e greater than 1 (e itself at worst), or 1 when e == 1. */
static int draw_group_count(moe_choices *c, int e) {
    int divisors[64], n = 0;
    for (int d = 2; d <= e && n < 64; d++)
        if (e % d == 0) divisors[n++] = d;
    return n ? divisors[moe_choose(c, (uint32_t)n)] : 1;
}

int moe_sample_spec(moe_choices *c, const moe_sample_limits *limits, const char *name, char *yaml,
                    size_t size) {
    writer w = {yaml, size, 0, 0};
    char number[32];
    const int deepspeed = one_in(c, 2);
    const int experts = draw_experts(c, limits->max_experts);
    const int k_max = min_int(min_int(experts, limits->max_top_k), 64);
    const int top_k = one_in(c, 5) ? between(c, 1, k_max) : between(c, 1, min_int(16, k_max));
    const int train = one_in(c, 2);
    emit(&w, "name: %s\n", name);
    if (one_in(c, 4) == 0 || deepspeed) emit(&w, "semantics: %s\n", deepspeed ? "deepspeed" : "megatron");
    emit(&w, "num_experts: %d\nnum_experts_per_tok: %d\n", experts, top_k);
    emit(&w, "hidden_size: %d\nmoe_intermediate_size: %d\n", width(c, limits->max_width), width(c, limits->max_width));
    if (!one_in(c, 6)) emit(&w, "activation: %s\n", PICK(c, ACTIVATIONS));
    if (!one_in(c, 6)) emit(&w, "dtype: %s\n", PICK(c, DTYPES));
    if (one_in(c, 8)) emit(&w, "ep_size: 1\n");
    if (train || one_in(c, 3)) emit(&w, "mode: %s\n", train ? "train" : "eval");
    if (one_in(c, 3)) emit(&w, "expert_bias: %s\n", boolean(!one_in(c, 3)));
    if (one_in(c, 5)) emit(&w, "use_residual: %s\n", boolean(!one_in(c, 4)));
    if (top_k == 1 && one_in(c, 3)) emit(&w, "weight_on_input: %s\n", boolean(!one_in(c, 4)));

    /* router */
    const char *score = one_in(c, 4) ? NULL : PICK(c, SCORES); /* NULL: the default, softmax */
    const int softmax = !score || !strcmp(score, "softmax");
    const int groups = experts >= 2 && one_in(c, 3) ? draw_group_count(c, experts) : 1;
    const int rsample = softmax && top_k <= 2 && groups == 1 && one_in(c, 3);
    char router[1024] = "";
    writer r = {router, sizeof router, 0, 0};
    if (score) emit(&r, "  score_function: %s\n", score);
    if (softmax && !one_in(c, 3)) emit(&r, "  order: %s\n", PICK(c, ORDERS));
    if (one_in(c, 2)) emit(&r, "  norm_topk_prob: %s\n", boolean(one_in(c, 2)));
    if (one_in(c, 3)) emit(&r, "  routed_scaling_factor: %s\n", PICK(c, SCALING));
    if (groups > 1) {
        const int per_group = experts / groups;
        const int kept_min = (top_k + per_group - 1) / per_group;
        const int kept = between(c, kept_min, groups);
        emit(&r, "  n_group: %d\n", groups);
        if (kept != groups || one_in(c, 2)) emit(&r, "  topk_group: %d\n", kept);
        if (one_in(c, 2)) emit(&r, "  group_topm: %d\n", between(c, 1, per_group));
        if (one_in(c, 2)) emit(&r, "  group_score: %s\n", PICK(c, GROUP_SCORES));
        if (one_in(c, 2)) emit(&r, "  group_mask: %s\n", PICK(c, GROUP_MASKS));
    } else if (one_in(c, 8)) {
        emit(&r, "  n_group: 1\n");
    }
    if (!softmax && one_in(c, 2)) emit(&r, "  score_bias: %s\n", boolean(!one_in(c, 3)));
    if (one_in(c, 3)) emit(&r, "  router_bias: %s\n", boolean(!one_in(c, 3)));
    if (one_in(c, 4)) emit(&r, "  input_jitter: %s\n", PICK(c, JITTER));
    if (rsample) emit(&r, "  noise: rsample\n");
    else if (one_in(c, 10)) emit(&r, "  noise: none\n");
    if (one_in(c, 3)) emit(&r, "  seed: %u\n", moe_choose(c, 1000000));
    if (one_in(c, 2)) emit(&r, "  aux_loss: %s\n", PICK(c, AUX_LOSSES));

    if (r.overflow) return -1;
    if (r.used > 0) emit(&w, "router:\n%s", router);

    /* capacity: the mode is chosen, then written unless the other keys imply it */
    const char *mode = PICK(c, CAPACITY_MODES);
    const int factor = !strcmp(mode, "factor"), fixed = !strcmp(mode, "fixed");
    char body[512] = "";
    writer b = {body, sizeof body, 0, 0};
    int implied = 0; /* the written keys select `mode` on their own */
    if (factor) {
        const char *formula = one_in(c, 3) ? NULL : PICK(c, FORMULAS);
        const int ds_formula = formula ? !strcmp(formula, "deepspeed") : deepspeed;
        if (one_in(c, 2)) {
            decimal(c, 5, 300, number, sizeof number);
            emit(&b, "  capacity_factor: %s\n", number);
            implied = 1;
        }
        if (one_in(c, 2)) {
            decimal(c, 5, 300, number, sizeof number);
            emit(&b, "  eval_capacity_factor: %s\n", number);
            implied = 1;
        }
        if (formula) emit(&b, "  formula: %s\n", formula);
        if (ds_formula && one_in(c, 2)) emit(&b, "  min_capacity: %d\n", between(c, 0, 8));
        implied = implied || deepspeed; /* the deepspeed preset's default mode is factor */
    } else if (fixed) {
        emit(&b, "  expert_capacity: %d\n", one_in(c, 4) ? between(c, 1, 4) : between(c, 1, 300));
        implied = 1;
    } else {
        implied = !deepspeed; /* the megatron preset's default mode is dropless */
    }
    if (strcmp(mode, "dropless") != 0) {
        if (one_in(c, 2)) emit(&b, "  priority: %s\n", PICK(c, PRIORITIES));
        if (one_in(c, 4)) emit(&b, "  pad_to_capacity: %s\n", boolean(!one_in(c, 4)));
    }
    if (one_in(c, 2)) emit(&b, "  renormalize: %s\n", boolean(one_in(c, 2)));
    if (b.overflow) return -1;
    if (b.used > 0 || !implied) {
        emit(&w, "capacity:\n");
        if (!implied || !one_in(c, 3)) emit(&w, "  mode: %s\n", mode);
        emit(&w, "%s", body);
    }

    /* shared experts */
    if (one_in(c, 3)) {
        const int count = one_in(c, 4) ? 0 : between(c, 1, 3);
        emit(&w, "shared_experts:\n  count: %d\n", count);
        if (count > 0) {
            emit(&w, "  intermediate_size: %d\n", width(c, limits->max_width));
            if (one_in(c, 2)) emit(&w, "  gate: %s\n", boolean(one_in(c, 2)));
        }
    }
    return w.overflow ? -1 : 0;
}
