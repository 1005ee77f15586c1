/* test_forward.c — the generated forward against the independent reference, over
 * the test matrix: k in {1, ..., 8}, E from 1 to 256, every score function and order,
 * group-limited routing (both group scores, both masks), every capacity formula and
 * priority, dropless, pad-to-capacity, renormalization, each activation, each dtype,
 * biases, shared experts, residual MoE, weight on input, train-mode randomness, the
 * DeepSpeed presets, tokens in {0, 1, 2, odd, large}, exact ties, NaN / Inf / 1e30
 * logits, NaN input rows and a hot expert. Also: bitwise determinism across runs and
 * thread counts.
 *
 * Each case is a spec (YAML) compiled through the real pipeline (templates -> host C
 * compiler -> dlopen, or NVRTC -> CUDA module), run on seeded tensors, and checked by
 * tests/reference/verify.c.
 *
 * The same binary runs the matrix on the GPU when MOEGEN_TEST_DEVICE=cuda (CTest
 * label `gpu`): tensors are copied to the device, the CUDA backend runs, and the
 * outputs come back for the same checks. Without a usable GPU those tests skip and
 * say why.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cuda_api.h"
#include "moegen.h"
#include "patterns.h"
#include "tensors.h"
#include "verify.h"


typedef struct forward_case {
    const char *name;
    const char *yaml; /* without the name line */
    moe_data_pattern data;
    int64_t tokens[6];
    int n_tokens;
    const char *variant; /* kernel variant overrides, or NULL for the default */
} forward_case;

#define TOKENS_DEFAULT {0, 1, 2, 33, 300}, 5, NULL /* the default variant */
#define TOKENS_LARGE {1, 17, 2049}, 3, NULL
#define TOKENS_DEFAULT_WITH(variant) {0, 1, 2, 33, 300}, 5, variant
#define TOKENS_LARGE_WITH(variant) {1, 17, 2049}, 3, variant

static const char *BASE = "num_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                          "moe_intermediate_size: 32\n";

static const forward_case CASES[] = {
    /* ---- top-k and expert counts ---- */
    {"k1_e16", "num_experts: 16\nnum_experts_per_tok: 1\nhidden_size: 64\nmoe_intermediate_size: 32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"k2_e8_default", NULL, MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"k4_e16", "num_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\nmoe_intermediate_size: 32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"k8_e64", "num_experts: 64\nnum_experts_per_tok: 8\nhidden_size: 64\nmoe_intermediate_size: 32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"e1_k1", "num_experts: 1\nnum_experts_per_tok: 1\nhidden_size: 32\nmoe_intermediate_size: 16\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"e7_k3_odd_sizes", "num_experts: 7\nnum_experts_per_tok: 3\nhidden_size: 48\nmoe_intermediate_size: 80\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"e256_k8", "num_experts: 256\nnum_experts_per_tok: 8\nhidden_size: 64\nmoe_intermediate_size: 16\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"k_equals_e", "num_experts: 4\nnum_experts_per_tok: 4\nhidden_size: 32\nmoe_intermediate_size: 32\n"
                   "router:\n  norm_topk_prob: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"large_tokens", "num_experts: 16\nnum_experts_per_tok: 2\nhidden_size: 128\nmoe_intermediate_size: 64\n", MOE_DATA_RANDOM, TOKENS_LARGE},

    /* ---- score functions and orders ---- */
    {"softmax_then_topk", "router:\n  order: softmax_then_topk\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"softmax_then_topk_norm_scaled", "router:\n  order: softmax_then_topk\n  norm_topk_prob: true\n"
                                      "  routed_scaling_factor: 1.5\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"sigmoid", "router:\n  score_function: sigmoid\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"sigmoid_bias_norm_scaled", "router:\n  score_function: sigmoid\n  score_bias: true\n"
                                 "  norm_topk_prob: true\n  routed_scaling_factor: 2.5\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"sqrtsoftplus", "router:\n  score_function: sqrtsoftplus\n  norm_topk_prob: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"router_bias", "router:\n  router_bias: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- group-limited routing ---- */
    {"groups_sigmoid_topm_neg_inf", "num_experts: 32\nnum_experts_per_tok: 4\n"
                                    "router:\n  score_function: sigmoid\n  score_bias: true\n  norm_topk_prob: true\n"
                                    "  n_group: 4\n  topk_group: 2\n  group_topm: 2\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"groups_sigmoid_topm_zero_mask", "num_experts: 32\nnum_experts_per_tok: 4\n"
                                      "router:\n  score_function: sigmoid\n  score_bias: true\n"
                                      "  n_group: 4\n  topk_group: 2\n  group_mask: zero\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"groups_softmax_max", "num_experts: 16\nnum_experts_per_tok: 2\n"
                           "router:\n  order: softmax_then_topk\n  n_group: 4\n  topk_group: 1\n  group_score: max\n",
     MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- capacity ---- */
    {"ds_formula_probs", "capacity:\n  mode: factor\n  formula: deepspeed\n  capacity_factor: 1.0\n"
                         "  min_capacity: 4\n  priority: probs\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"ds_formula_position", "capacity:\n  mode: factor\n  formula: deepspeed\n  eval_capacity_factor: 0.75\n"
                            "  priority: position\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"ds_formula_choice_major_renorm", "capacity:\n  mode: factor\n  formula: deepspeed\n  capacity_factor: 1.25\n"
                                       "  priority: position_choice_major\n  renormalize: true\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"megatron_formula_random", "capacity:\n  mode: factor\n  formula: megatron\n  capacity_factor: 0.5\n"
                                "  priority: random\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"megatron_formula_probs_pad", "capacity:\n  mode: factor\n  formula: megatron\n  capacity_factor: 1.0\n"
                                   "  priority: probs\n  pad_to_capacity: true\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"fixed_capacity_pad_renorm", "capacity:\n  mode: fixed\n  expert_capacity: 3\n  pad_to_capacity: true\n"
                                  "  renormalize: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"capacity_above_tokens", "capacity:\n  mode: fixed\n  expert_capacity: 1000\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    /* top-k not a power of two with capacity and no renormalization: GCC 12.2 used to
     * miscompile the combine weights here (tests/compiler/masked_group_load.c) */
    {"k3_factor_probs_no_renorm", "num_experts_per_tok: 3\ncapacity:\n  mode: factor\n  capacity_factor: 1.0\n"
                                  "  renormalize: false\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"k5_fixed_position_no_renorm", "num_experts: 16\nnum_experts_per_tok: 5\ndtype: fp32\n"
                                    "capacity:\n  mode: fixed\n  expert_capacity: 20\n  priority: position\n",
     MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"k6_factor_choice_major_scaled", "num_experts: 12\nnum_experts_per_tok: 6\nrouter:\n  routed_scaling_factor: 2.5\n"
                                      "capacity:\n  mode: factor\n  capacity_factor: 0.8\n  priority: position_choice_major\n",
     MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"k7_factor_random_renorm_scaled", "num_experts: 16\nnum_experts_per_tok: 7\nrouter:\n  routed_scaling_factor: 2.5\n"
                                       "capacity:\n  mode: factor\n  capacity_factor: 0.6\n  priority: random\n"
                                       "  renormalize: true\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    /* the DeepSpeed formula with k = 3: f32(k * cf) rounded once gives C = 99 (not 100) */
    {"deepspeed_k3_cf055_480_tokens", "semantics: deepspeed\nnum_experts_per_tok: 3\n"
                                      "capacity:\n  eval_capacity_factor: 0.55\n", MOE_DATA_HOT_EXPERT, {480, 479}, 2, NULL},
    {"dropless_renormalize", "capacity:\n  mode: dropless\n  renormalize: true\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},

    /* ---- activations, dtypes, biases ---- */
    {"relu_fp32", "activation: relu\ndtype: fp32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"gelu_fp16", "activation: gelu\ndtype: fp16\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"gelu_tanh_bf16", "activation: gelu_tanh\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"silu_fp32", "activation: silu\ndtype: fp32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"swiglu_fp16", "activation: swiglu\ndtype: fp16\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"geglu_fp32_bias", "activation: geglu\ndtype: fp32\nexpert_bias: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- shared experts, residual, weight on input ---- */
    {"shared_gated", "shared_experts:\n  count: 1\n  intermediate_size: 48\n  gate: true\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"two_shared_same_size_bias", "expert_bias: true\nshared_experts:\n  count: 2\n  intermediate_size: 32\n",
     MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"residual_moe", "semantics: deepspeed\nnum_experts_per_tok: 1\nuse_residual: true\nactivation: gelu\n"
                     "dtype: fp32\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"weight_on_input", "num_experts_per_tok: 1\nweight_on_input: true\nrouter:\n  score_function: sigmoid\n",
     MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- train mode randomness ---- */
    {"train_jitter", "mode: train\nrouter:\n  input_jitter: 0.01\n  seed: 7\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"train_rsample_k1", "mode: train\nsemantics: deepspeed\nnum_experts_per_tok: 1\n"
                         "router:\n  noise: rsample\n  seed: 3\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},
    {"train_rsample_k2", "mode: train\nsemantics: deepspeed\nrouter:\n  noise: rsample\n  seed: 11\n",
     MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- presets ---- */
    {"deepspeed_top1", "semantics: deepspeed\nnum_experts_per_tok: 1\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"deepspeed_top2", "semantics: deepspeed\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"deepspeed_top4", "semantics: deepspeed\nnum_experts: 16\nnum_experts_per_tok: 4\n", MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT},
    {"aux_none", "router:\n  aux_loss: none\n", MOE_DATA_RANDOM, TOKENS_DEFAULT},

    /* ---- special data ---- */
    {"exact_ties_softmax", "router:\n  order: softmax_then_topk\n", MOE_DATA_TIES, TOKENS_DEFAULT},
    {"exact_ties_sigmoid_groups", "num_experts: 16\nnum_experts_per_tok: 4\n"
                                  "router:\n  score_function: sigmoid\n  n_group: 4\n  topk_group: 2\n",
     MOE_DATA_TIES, TOKENS_DEFAULT},
    {"nonfinite_logits_softmax", "dtype: fp32\nrouter:\n  router_bias: true\n  order: softmax_then_topk\n",
     MOE_DATA_NONFINITE, TOKENS_DEFAULT},
    {"nonfinite_logits_topk_softmax", "dtype: fp32\nnum_experts_per_tok: 4\nrouter:\n  router_bias: true\n",
     MOE_DATA_NONFINITE, TOKENS_DEFAULT},
    {"nonfinite_logits_sigmoid", "dtype: bf16\nrouter:\n  router_bias: true\n  score_function: sigmoid\n"
                                 "  norm_topk_prob: true\n", MOE_DATA_NONFINITE, TOKENS_DEFAULT},
    {"identity_experts", "activation: relu\ndtype: fp32\nhidden_size: 32\nmoe_intermediate_size: 64\n"
                         "router:\n  norm_topk_prob: true\n", MOE_DATA_IDENTITY, TOKENS_DEFAULT},

    /* ---- fp32 outer-product GEMMs (gemm=outer): short row and column tiles, every vector
     * width, gated and not, biases, shared experts, the residual MLP, weight on input ---- */
    {"outer_swiglu_bias_6x4", "activation: swiglu\ndtype: fp32\nexpert_bias: true\n", MOE_DATA_RANDOM, 
     TOKENS_DEFAULT_WITH("gemm=outer,tile_cols=6,tile_rows=4,block_rows=128,block_cols=30")},
    {"outer_gelu_odd_tile_5x3", "num_experts: 7\nnum_experts_per_tok: 3\nhidden_size: 48\nmoe_intermediate_size: 80\n"
                                "activation: gelu\ndtype: fp32\n", MOE_DATA_RANDOM, 
     TOKENS_LARGE_WITH("gemm=outer,tile_cols=5,tile_rows=3,block_rows=48,block_cols=15")},
    {"outer_shared_residual_v8", "semantics: deepspeed\nnum_experts_per_tok: 1\nuse_residual: true\nactivation: relu\n"
                                 "dtype: fp32\nshared_experts:\n  count: 2\n  intermediate_size: 48\n  gate: true\n",
     MOE_DATA_HOT_EXPERT, TOKENS_DEFAULT_WITH("gemm=outer,vector_floats=8,tile_cols=2,tile_rows=3,block_rows=24,block_cols=6")},
    {"outer_weight_on_input_v4", "num_experts_per_tok: 1\nweight_on_input: true\ndtype: fp32\n"
                                 "router:\n  score_function: sigmoid\n", MOE_DATA_RANDOM, 
     TOKENS_DEFAULT_WITH("gemm=outer,vector_floats=4,tile_cols=4,tile_rows=3,block_rows=12,block_cols=8")},
    {"outer_capacity_drops_16x1", "dtype: fp32\nactivation: silu\ncapacity:\n  mode: factor\n  capacity_factor: 0.5\n"
                                  "  priority: probs\n", MOE_DATA_HOT_EXPERT, 
     TOKENS_DEFAULT_WITH("gemm=outer,tile_cols=16,tile_rows=1,block_rows=16,block_cols=16")},
};

/* Compose the YAML of a case: BASE, then the case's lines (later keys of the same
 * name would be duplicates, so the case's top-level sizes replace BASE's). */
static void case_yaml(const forward_case *c, char *buf, size_t size) {
    const char *body = c->yaml ? c->yaml : "";
    size_t used = (size_t)snprintf(buf, size, "name: %s\n", c->name);
    const char *line = BASE;
    while (*line) { /* copy BASE lines whose key the case does not set */
        const char *end = strchr(line, '\n');
        size_t key_len = (size_t)(strchr(line, ':') - line);
        char key[64];
        snprintf(key, sizeof key, "%.*s:", (int)key_len, line);
        int overridden = strncmp(body, key, strlen(key)) == 0;
        for (const char *p = strstr(body, key); p && !overridden; p = strstr(p + 1, key))
            overridden = p[-1] == '\n';
        if (!overridden) used += (size_t)snprintf(buf + used, size - used, "%.*s\n", (int)(end - line), line);
        line = end + 1;
    }
    snprintf(buf + used, size - used, "%s", body);
}

typedef struct kernel_outputs {
    void *y;
    int32_t *ids;
    float *topk_weights, *router_weights;
    int64_t counts_before[1024], counts_after[1024];
    moegen_forward_stats stats;
} kernel_outputs;

static void outputs_alloc(kernel_outputs *o, const moegen_spec *spec, int64_t S) {
    memset(o, 0, sizeof *o);
    o->y = calloc((size_t)(S * spec->hidden_size + 1), moegen_dtype_size(spec->dtype));
    o->ids = calloc((size_t)(S * spec->top_k + 1), sizeof(int32_t));
    o->topk_weights = calloc((size_t)(S * spec->top_k + 1), sizeof(float));
    o->router_weights = calloc((size_t)(S * spec->top_k + 1), sizeof(float));
    assert_non_null(o->y);
    assert_non_null(o->ids);
    assert_non_null(o->topk_weights);
    assert_non_null(o->router_weights);
}

static void outputs_free(kernel_outputs *o) {
    free(o->y);
    free(o->ids);
    free(o->topk_weights);
    free(o->router_weights);
}

/* ---- The device under test ---------------------------------------------------------------- */

static int on_gpu(void) {
    const char *device = getenv("MOEGEN_TEST_DEVICE");
    return device && !strcmp(device, "cuda");
}

/* Device copies of one case's tensors and outputs (CUDA runs only). */
typedef struct device_copies {
    moegen_cuda cu;
    moegen_cu_device device;
    moegen_cu_context context;
    moegen_cu_device_pointer tensor[MOE_T_COUNT];
    moegen_cu_device_pointer y, ids, topk_weights, router_weights, counts_before, counts_after;
} device_copies;

#define CU_CHECK(call)                                                                  \
    do {                                                                                \
        moegen_cu_result result_ = (call);                                              \
        if (result_ != 0) fail_msg("%s failed with CUDA error %d", #call, (int)result_); \
    } while (0)

static moegen_cu_device_pointer device_alloc(device_copies *d, size_t bytes) {
    moegen_cu_device_pointer p = 0;
    if (bytes) CU_CHECK(d->cu.cuMemAlloc(&p, bytes));
    return p;
}

static void device_open(device_copies *d) {
    memset(d, 0, sizeof *d);
    moegen_error err;
    if (moegen_cuda_open(&d->cu, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    CU_CHECK(d->cu.cuDeviceGet(&d->device, 0));
    CU_CHECK(d->cu.cuDevicePrimaryCtxRetain(&d->context, d->device));
    CU_CHECK(d->cu.cuCtxSetCurrent(d->context));
}

static void device_upload(device_copies *d, const moe_tensors *ts, const moegen_spec *spec) {
    for (int i = 0; i < MOE_T_COUNT; i++) {
        size_t bytes = ts->t[i].n_elems * moe_tensor_elem_bytes(ts, i);
        d->tensor[i] = device_alloc(d, bytes);
        if (bytes) CU_CHECK(d->cu.cuMemcpyHtoD(d->tensor[i], ts->t[i].data, bytes));
    }
    const size_t S = (size_t)ts->n_tokens, K = (size_t)spec->top_k, E = (size_t)spec->num_experts;
    d->y = device_alloc(d, S * spec->hidden_size * moegen_dtype_size(spec->dtype));
    d->ids = device_alloc(d, S * K * 4);
    d->topk_weights = device_alloc(d, S * K * 4);
    d->router_weights = device_alloc(d, S * K * 4);
    d->counts_before = device_alloc(d, E * 8);
    d->counts_after = device_alloc(d, E * 8);
}

static void device_free(device_copies *d) {
    moegen_cu_device_pointer all[] = {d->y, d->ids, d->topk_weights, d->router_weights, d->counts_before, d->counts_after};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]) d->cu.cuMemFree(all[i]);
    for (int i = 0; i < MOE_T_COUNT; i++)
        if (d->tensor[i]) d->cu.cuMemFree(d->tensor[i]);
    memset(d->tensor, 0, sizeof d->tensor);
    d->y = d->ids = d->topk_weights = d->router_weights = d->counts_before = d->counts_after = 0;
}

static void device_close(device_copies *d) {
    device_free(d);
    if (d->context) d->cu.cuDevicePrimaryCtxRelease(d->device);
    moegen_cuda_close(&d->cu);
}

#define DEVICE_POINTER(p) ((void *)(uintptr_t)(p))

static void run_forward(moegen_layer *layer, const moe_tensors *ts, kernel_outputs *o) {
    moegen_forward_io io = {
        .n_tokens = ts->n_tokens, .x = ts->t[MOE_T_X].data, .y = o->y, .topk_ids = o->ids,
        .topk_weights = o->topk_weights, .router_weights = o->router_weights,
        .counts_before = o->counts_before, .counts_after = o->counts_after, .rng_offset = 5,
    };
    moegen_error err;
    moegen_status st = moegen_layer_forward(layer, &io, &o->stats, &err);
    if (st != MOEGEN_OK) fail_msg("forward: %s", err.message);
}

/* The same forward on the GPU: copy in, run, copy the outputs back into `o`. */
static void run_forward_on_device(device_copies *d, moegen_layer *layer, const moegen_spec *spec,
                                  const moe_tensors *ts, kernel_outputs *o) {
    const size_t S = (size_t)ts->n_tokens, K = (size_t)spec->top_k, E = (size_t)spec->num_experts;
    moegen_forward_io io = {
        .n_tokens = ts->n_tokens, .x = DEVICE_POINTER(d->tensor[MOE_T_X]), .y = DEVICE_POINTER(d->y),
        .topk_ids = DEVICE_POINTER(d->ids), .topk_weights = DEVICE_POINTER(d->topk_weights),
        .router_weights = DEVICE_POINTER(d->router_weights), .counts_before = DEVICE_POINTER(d->counts_before),
        .counts_after = DEVICE_POINTER(d->counts_after), .rng_offset = 5,
    };
    moegen_error err;
    if (moegen_layer_forward(layer, &io, &o->stats, &err) != MOEGEN_OK) fail_msg("forward: %s", err.message);
    CU_CHECK(d->cu.cuCtxSynchronize());
    if (S > 0) {
        CU_CHECK(d->cu.cuMemcpyDtoH(o->y, d->y, S * spec->hidden_size * moegen_dtype_size(spec->dtype)));
        CU_CHECK(d->cu.cuMemcpyDtoH(o->ids, d->ids, S * K * 4));
        CU_CHECK(d->cu.cuMemcpyDtoH(o->topk_weights, d->topk_weights, S * K * 4));
        CU_CHECK(d->cu.cuMemcpyDtoH(o->router_weights, d->router_weights, S * K * 4));
    }
    CU_CHECK(d->cu.cuMemcpyDtoH(o->counts_before, d->counts_before, E * 8));
    CU_CHECK(d->cu.cuMemcpyDtoH(o->counts_after, d->counts_after, E * 8));
}

static void bind_device_tensors(moegen_layer *layer, const device_copies *d) {
    moegen_weights w = {
        .router_w = DEVICE_POINTER(d->tensor[MOE_T_ROUTER_W]), .router_b = DEVICE_POINTER(d->tensor[MOE_T_ROUTER_B]),
        .score_bias = DEVICE_POINTER(d->tensor[MOE_T_SCORE_BIAS]), .w1 = DEVICE_POINTER(d->tensor[MOE_T_W1]),
        .b1 = DEVICE_POINTER(d->tensor[MOE_T_B1]), .w2 = DEVICE_POINTER(d->tensor[MOE_T_W2]),
        .b2 = DEVICE_POINTER(d->tensor[MOE_T_B2]), .shared_w1 = DEVICE_POINTER(d->tensor[MOE_T_SHARED_W1]),
        .shared_b1 = DEVICE_POINTER(d->tensor[MOE_T_SHARED_B1]), .shared_w2 = DEVICE_POINTER(d->tensor[MOE_T_SHARED_W2]),
        .shared_b2 = DEVICE_POINTER(d->tensor[MOE_T_SHARED_B2]), .shared_gate = DEVICE_POINTER(d->tensor[MOE_T_SHARED_GATE]),
        .residual_w1 = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_W1]), .residual_b1 = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_B1]),
        .residual_w2 = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_W2]), .residual_b2 = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_B2]),
        .residual_coef_w = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_COEF_W]),
        .residual_coef_b = DEVICE_POINTER(d->tensor[MOE_T_RESIDUAL_COEF_B]),
    };
    moegen_error err;
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) fail_msg("bind: %s", err.message);
}

static void bind_tensors(moegen_layer *layer, const moe_tensors *ts) {
    moegen_kernel_weights k;
    moe_tensors_weights(ts, &k);
    moegen_weights w = {
        .router_w = k.router_w, .router_b = k.router_b, .score_bias = k.score_bias, .w1 = k.w1,
        .b1 = k.b1, .w2 = k.w2, .b2 = k.b2, .shared_w1 = k.shared_w1, .shared_b1 = k.shared_b1,
        .shared_w2 = k.shared_w2, .shared_b2 = k.shared_b2, .shared_gate = k.shared_gate,
        .residual_w1 = k.residual_w1, .residual_b1 = k.residual_b1, .residual_w2 = k.residual_w2,
        .residual_b2 = k.residual_b2, .residual_coef_w = k.residual_coef_w,
        .residual_coef_b = k.residual_coef_b,
    };
    moegen_error err;
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) fail_msg("bind: %s", err.message);
}

/* Checks the layer-independent invariants of the rules: valid, distinct ids; no NaN
 * output. */
static void check_invariants(const moegen_spec *spec, int64_t S, const kernel_outputs *o) {
    const int K = spec->top_k;
    for (int64_t t = 0; t < S; t++)
        for (int j = 0; j < K; j++) {
            int32_t id = o->ids[t * K + j];
            assert_true(id >= 0 && id < spec->num_experts);
            for (int i = 0; i < j; i++) assert_int_not_equal(id, o->ids[t * K + i]);
            assert_false(isnan(o->topk_weights[t * K + j]));
        }
    if (spec->dtype == MOEGEN_DTYPE_FP32) {
        const float *y = o->y;
        for (int64_t i = 0; i < S * spec->hidden_size; i++) assert_false(isnan(y[i]));
    }
}

static void test_case(void **state) {
    const forward_case *c = *state;
    char yaml[2048];
    case_yaml(c, yaml, sizeof yaml);
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), c->name, &spec, &err) != MOEGEN_OK)
        fail_msg("spec: %s\n%s", err.message, yaml);
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = on_gpu() ? MOEGEN_DEVICE_CUDA : MOEGEN_DEVICE_CPU;
    options.n_threads = 2;
    if (c->variant && !on_gpu()) options.variant = c->variant; /* CPU variants */
    moegen_layer *layer = NULL;
    if (moegen_layer_open_string(yaml, strlen(yaml), c->name, &options, &layer, &err) != MOEGEN_OK)
        fail_msg("open: %s", err.message);
    device_copies device;
    memset(&device, 0, sizeof device);
    if (on_gpu()) device_open(&device);

    for (int i = 0; i < c->n_tokens; i++) {
        const int64_t S = c->tokens[i];
        moe_tensors ts;
        assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
        moe_tensors_fill(&ts, 1000 + (uint64_t)i);
        moe_tensors_apply_pattern(&spec, &ts, c->data);
        kernel_outputs o;
        outputs_alloc(&o, &spec, S);
        if (on_gpu()) {
            device_upload(&device, &ts, &spec);
            bind_device_tensors(layer, &device);
            run_forward_on_device(&device, layer, &spec, &ts, &o);
            device_free(&device);
        } else {
            bind_tensors(layer, &ts);
            run_forward(layer, &ts, &o);
        }
        check_invariants(&spec, S, &o);

        moegen_kernel_weights w;
        moe_tensors_weights(&ts, &w);
        moe_kernel_result kernel = {
            .y = o.y, .ids = o.ids, .topk_weights = o.topk_weights, .router_weights = o.router_weights,
            .counts_before = o.counts_before, .counts_after = o.counts_after,
            .n_dropped = o.stats.n_dropped, .capacity = o.stats.capacity,
            .aux_loss = o.stats.aux_loss, .z_loss = o.stats.z_loss,
        };
        moe_verify_report report;
        assert_int_equal(moe_verify(&spec, S, ts.t[MOE_T_X].data, &w, 5, NULL, &kernel, &report), 0);
        if (!report.ok) fail_msg("%s, %lld tokens: %s", c->name, (long long)S, report.message);
        print_message("  %-34s S=%-5lld %s\n", c->name, (long long)S, report.message);
        if (c->data == MOE_DATA_TIES || c->data == MOE_DATA_NONFINITE) /* exact decisions only */
            assert_int_equal(report.ambiguous_tokens, 0);
        outputs_free(&o);
        moe_tensors_free(&ts);
    }
    moegen_layer_close(layer);
    if (on_gpu()) device_close(&device);
    moegen_spec_free(&spec);
}

/* Group setup: on the GPU run, skip everything (with the reason) when no GPU is usable. */
static int gpu_setup(void **state) {
    (void)state;
    if (!on_gpu()) return 0;
    moegen_cuda cu;
    moegen_error err;
    if (moegen_cuda_open(&cu, &err) != MOEGEN_OK) {
        print_message("GPU tests skipped: %s\n", err.message);
        return 0;
    }
    moegen_cuda_close(&cu);
    return 0;
}

static int gpu_usable(void) {
    moegen_cuda cu;
    moegen_error err;
    if (moegen_cuda_open(&cu, &err) != MOEGEN_OK) return 0;
    moegen_cuda_close(&cu);
    return 1;
}

static void test_case_or_skip(void **state) {
    if (on_gpu() && !gpu_usable()) skip();
    test_case(state);
}

/* One run of `yaml` per variants[r] (NULL: the default) and threads[r] on the same
 * inputs: bitwise identical outputs. */
static void check_bitwise_equal_runs(const char *yaml, const char *const *variants, const int *threads, int n_runs) {
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), "determinism", &spec, &err), MOEGEN_OK);
    const int64_t S = 777;
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
    moe_tensors_fill(&ts, 42);
    kernel_outputs runs[8];
    assert_true(n_runs <= 8);
    for (int r = 0; r < n_runs; r++) {
        moegen_open_options options;
        moegen_open_options_init(&options);
        options.device = on_gpu() ? MOEGEN_DEVICE_CUDA : MOEGEN_DEVICE_CPU;
        options.n_threads = threads[r];
        options.variant = variants[r];
        moegen_layer *layer;
        if (moegen_layer_open_string(yaml, strlen(yaml), NULL, &options, &layer, &err) != MOEGEN_OK)
            fail_msg("open: %s", err.message);
        outputs_alloc(&runs[r], &spec, S);
        if (on_gpu()) {
            device_copies device;
            device_open(&device);
            device_upload(&device, &ts, &spec);
            bind_device_tensors(layer, &device);
            run_forward_on_device(&device, layer, &spec, &ts, &runs[r]);
            device_close(&device);
        } else {
            bind_tensors(layer, &ts);
            run_forward(layer, &ts, &runs[r]);
        }
        moegen_layer_close(layer);
    }
    const size_t y_bytes = (size_t)S * spec.hidden_size * moegen_dtype_size(spec.dtype);
    for (int r = 1; r < n_runs; r++) {
        assert_memory_equal(runs[0].y, runs[r].y, y_bytes);
        assert_memory_equal(runs[0].ids, runs[r].ids, (size_t)S * spec.top_k * sizeof(int32_t));
        assert_memory_equal(runs[0].topk_weights, runs[r].topk_weights, (size_t)S * spec.top_k * sizeof(float));
        assert_true(runs[0].stats.aux_loss == runs[r].stats.aux_loss);
        assert_true(runs[0].stats.z_loss == runs[r].stats.z_loss);
    }
    for (int r = 0; r < n_runs; r++) outputs_free(&runs[r]);
    moe_tensors_free(&ts);
    moegen_spec_free(&spec);
}

/* Same inputs, three runs, 2, 2 and 1 threads: bitwise identical outputs. */
static void forward_is_bitwise_reproducible_across_runs_and_thread_counts(void **state) {
    (void)state;
    if (on_gpu() && !gpu_usable()) skip(); /* before anything is allocated */
    const char *yaml = "name: determinism\nnum_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\n"
                       "moe_intermediate_size: 48\nshared_experts:\n  count: 1\n  intermediate_size: 32\n"
                       "capacity:\n  mode: factor\n  priority: random\n";
    const char *variants[] = {NULL, NULL, NULL};
    const int threads[] = {2, 2, 1};
    check_bitwise_equal_runs(yaml, variants, threads, 3);
}

/* gemm=outer: every output is one k-ascending chain in one vector lane, so the micro-kernel
 * tile, the task blocking and the thread count leave the bits unchanged. */
static void outer_products_give_the_same_bits_for_every_tile_blocking_and_thread_count(void **state) {
    (void)state;
    if (on_gpu()) skip(); /* a CPU variant */
    const char *yaml = "name: outer_bits\nnum_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\n"
                       "moe_intermediate_size: 48\ndtype: fp32\nexpert_bias: true\n"
                       "shared_experts:\n  count: 1\n  intermediate_size: 32\n";
    const char *variants[] = {
        "gemm=outer,tile_cols=6,tile_rows=4,block_rows=64,block_cols=96",
        "gemm=outer,tile_cols=6,tile_rows=4,block_rows=64,block_cols=96",
        "gemm=outer,tile_cols=2,tile_rows=1,block_rows=16,block_cols=2",
        "gemm=outer,tile_cols=10,tile_rows=2,block_rows=160,block_cols=10",
    };
    const int threads[] = {2, 1, 2, 1};
    check_bitwise_equal_runs(yaml, variants, threads, 4);
}

/* gemm=outer: an expert's row block of at most a few rows runs lanes across weight rows
 * instead of token panels (outer.c.tpl, AVX-512) with the same k-ascending chains, so a token's
 * output does not depend on the batch around it: the first tokens alone (every expert a few
 * rows) give the bits of the same tokens inside a batch of 300 (every expert on panels, tails
 * of every length). Gated with biases and shared experts; and relu with the input scaled by
 * the router weight (one route per token); in train mode (the pre-activations too). */
static void outer_products_give_a_token_the_same_bits_in_any_batch(void **state) {
    (void)state;
    if (on_gpu()) skip(); /* a CPU variant */
    const char *yamls[] = {
        "name: outer_batch\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 80\n"
        "dtype: fp32\nactivation: swiglu\nexpert_bias: true\nshared_experts:\n  count: 1\n  intermediate_size: 48\n",
        "name: outer_batch_woi\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 48\nmoe_intermediate_size: 32\n"
        "dtype: fp32\nactivation: relu\nweight_on_input: true\nmode: train\nrouter:\n  score_function: sigmoid\n",
    };
    const char *variant = "gemm=outer,tile_cols=6,tile_rows=4,block_rows=64,block_cols=48";
    const int64_t S_BIG = 300, small[] = {1, 2, 3, 5, 9, 17, 33};
    for (size_t y = 0; y < sizeof yamls / sizeof yamls[0]; y++) {
        moegen_spec spec;
        moegen_error err;
        assert_int_equal(moegen_spec_parse(yamls[y], strlen(yamls[y]), "outer_batch", &spec, &err), MOEGEN_OK);
        moe_tensors ts;
        assert_int_equal(moe_tensors_alloc(&spec, S_BIG, &ts), 0);
        moe_tensors_fill(&ts, 17);
        moegen_open_options options;
        moegen_open_options_init(&options);
        options.device = MOEGEN_DEVICE_CPU;
        options.n_threads = 2;
        options.variant = variant;
        moegen_layer *layer;
        if (moegen_layer_open_string(yamls[y], strlen(yamls[y]), NULL, &options, &layer, &err) != MOEGEN_OK)
            fail_msg("open: %s", err.message);
        bind_tensors(layer, &ts);
        kernel_outputs big;
        outputs_alloc(&big, &spec, S_BIG);
        run_forward(layer, &ts, &big);
        const size_t row_bytes = (size_t)spec.hidden_size * moegen_dtype_size(spec.dtype);
        for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) {
            moe_tensors prefix = ts; /* the same x, its first tokens */
            prefix.n_tokens = small[i];
            kernel_outputs o;
            outputs_alloc(&o, &spec, small[i]);
            run_forward(layer, &prefix, &o);
            assert_memory_equal(o.ids, big.ids, (size_t)small[i] * spec.top_k * sizeof(int32_t));
            if (memcmp(o.y, big.y, (size_t)small[i] * row_bytes) != 0)
                fail_msg("%s: the first %lld tokens alone differ from the same tokens in a batch of %lld",
                         spec.name, (long long)small[i], (long long)S_BIG);
            outputs_free(&o);
        }
        outputs_free(&big);
        moegen_layer_close(layer);
        moe_tensors_free(&ts);
        moegen_spec_free(&spec);
    }
}

/* GPU only: a second layer of the same spec in the process reuses the loaded module
 * (in-process module cache) and both layers compute the same bits. */
static void two_cuda_layers_of_one_spec_share_the_module(void **state) {
    (void)state;
    if (!on_gpu() || !gpu_usable()) skip();
    const char *yaml = "name: shared_module\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                       "moe_intermediate_size: 32\n";
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), "shared", &spec, &err), MOEGEN_OK);
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CUDA;
    moegen_layer *first, *second;
    if (moegen_layer_open_string(yaml, strlen(yaml), NULL, &options, &first, &err) != MOEGEN_OK ||
        moegen_layer_open_string(yaml, strlen(yaml), NULL, &options, &second, &err) != MOEGEN_OK)
        fail_msg("open: %s", err.message);
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(second, &desc), MOEGEN_OK);
    assert_int_equal(desc.cache_hit, 1);
    const int64_t S = 100;
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
    moe_tensors_fill(&ts, 9);
    device_copies device;
    device_open(&device);
    device_upload(&device, &ts, &spec);
    kernel_outputs a, b;
    outputs_alloc(&a, &spec, S);
    outputs_alloc(&b, &spec, S);
    bind_device_tensors(first, &device);
    bind_device_tensors(second, &device);
    run_forward_on_device(&device, first, &spec, &ts, &a);
    moegen_layer_close(first); /* the module stays loaded for the second layer */
    run_forward_on_device(&device, second, &spec, &ts, &b);
    assert_memory_equal(a.y, b.y, (size_t)S * spec.hidden_size * moegen_dtype_size(spec.dtype));
    moegen_layer_close(second);
    device_close(&device);
    outputs_free(&a);
    outputs_free(&b);
    moe_tensors_free(&ts);
    moegen_spec_free(&spec);
}

int main(void) {
    enum { N = sizeof CASES / sizeof CASES[0] };
    struct CMUnitTest tests[N + 4];
    for (int i = 0; i < N; i++) {
        tests[i] = (struct CMUnitTest){CASES[i].name, test_case_or_skip, NULL, NULL, (void *)&CASES[i]};
    }
    tests[N] = (struct CMUnitTest)cmocka_unit_test(forward_is_bitwise_reproducible_across_runs_and_thread_counts);
    tests[N + 1] = (struct CMUnitTest)cmocka_unit_test(two_cuda_layers_of_one_spec_share_the_module);
    tests[N + 2] = (struct CMUnitTest)cmocka_unit_test(outer_products_give_the_same_bits_for_every_tile_blocking_and_thread_count);
    tests[N + 3] = (struct CMUnitTest)cmocka_unit_test(outer_products_give_a_token_the_same_bits_in_any_batch);
    return cmocka_run_group_tests_name(on_gpu() ? "forward matrix (cuda)" : "forward matrix (cpu)", tests,
                                       gpu_setup, NULL);
}
