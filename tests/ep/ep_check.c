/* ep_check.c — one rank's check of the expert-parallel contract (see ep_check.h). */
#include "ep_check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backward_io.h"
#include "forward_io.h"
#include "spec.h"
#include "tensors.h"
#include "verify.h"

#define BASE "num_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 32\n"

const ep_case EP_CASES[] = {
    {"ep_dropless_k2", BASE "dtype: fp32\n", {40, 23, 0, 57}, MOE_DATA_RANDOM, NULL},
    {"ep_bf16_k2_hot_expert", BASE, {64, 64, 64, 64}, MOE_DATA_HOT_EXPERT, NULL},
    {"ep_k4_e16_uneven", "num_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 48\nmoe_intermediate_size: 80\n",
     {100, 1, 33, 0}, MOE_DATA_RANDOM, NULL},
    {"ep_megatron_capacity_drops", BASE "capacity:\n  mode: factor\n  capacity_factor: 0.5\n  priority: probs\n",
     {96, 40, 17, 128}, MOE_DATA_HOT_EXPERT, NULL},
    {"ep_deepspeed_top2_capacity", "semantics: deepspeed\n" BASE "capacity:\n  capacity_factor: 1.0\n",
     {80, 0, 45, 31}, MOE_DATA_HOT_EXPERT, NULL},
    {"ep_fixed_capacity_pad_renorm", BASE "capacity:\n  mode: fixed\n  expert_capacity: 5\n  pad_to_capacity: true\n"
                                     "  renormalize: true\n", {50, 12, 0, 77}, MOE_DATA_RANDOM, NULL},
    {"ep_random_priority_k3", "num_experts: 12\nnum_experts_per_tok: 3\nhidden_size: 32\nmoe_intermediate_size: 48\n"
                              "capacity:\n  mode: factor\n  capacity_factor: 0.75\n  priority: random\n",
     {70, 9, 30, 2}, MOE_DATA_HOT_EXPERT, NULL},
    {"ep_shared_experts_gated", BASE "shared_experts:\n  count: 2\n  intermediate_size: 48\n  gate: true\n",
     {33, 66, 5, 0}, MOE_DATA_RANDOM, NULL},
    {"ep_residual_deepspeed_top1", "semantics: deepspeed\nnum_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
                                   "moe_intermediate_size: 32\nuse_residual: true\nactivation: gelu\n",
     {48, 7, 0, 19}, MOE_DATA_HOT_EXPERT, NULL},
    {"ep_weight_on_input_sigmoid", "num_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
                                   "moe_intermediate_size: 32\nweight_on_input: true\nexpert_bias: true\n"
                                   "router:\n  score_function: sigmoid\n", {25, 50, 75, 3}, MOE_DATA_RANDOM, NULL},
    {"ep_groups_sigmoid_bias", "num_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\nmoe_intermediate_size: 32\n"
                               "router:\n  score_function: sigmoid\n  score_bias: true\n  norm_topk_prob: true\n"
                               "  n_group: 4\n  topk_group: 2\n  routed_scaling_factor: 2.5\n",
     {60, 30, 90, 1}, MOE_DATA_TIES, NULL},
    {"ep_train_jitter_fp16", BASE "dtype: fp16\nmode: train\nrouter:\n  input_jitter: 0.01\n  seed: 9\n",
     {32, 16, 8, 4}, MOE_DATA_RANDOM, NULL},
    {"ep_no_tokens_anywhere", BASE, {0, 0, 0, 0}, MOE_DATA_RANDOM, NULL},
    /* outer products: an expert's rows differ between the two sides (every rank's rows
     * against this rank's), and each output is still one chain per lane */
    {"ep_fp32_outer_swiglu_bias", "num_experts: 8\nnum_experts_per_tok: 3\nhidden_size: 64\nmoe_intermediate_size: 48\n"
                                  "dtype: fp32\nexpert_bias: true\nactivation: swiglu\n",
     {70, 19, 0, 41}, MOE_DATA_RANDOM, "gemm=outer,tile_cols=6,tile_rows=2,block_rows=32,block_cols=12"},
};
const int EP_CASE_COUNT = (int)(sizeof EP_CASES / sizeof EP_CASES[0]);

static int run_layer(const char *yaml, const char *name, const char *variant, moegen_comm *comm, const moegen_weights *w,
                     const moe_tensors *ts, uint64_t rng_offset, moe_outputs *o, moegen_layer_desc *desc, char *why,
                     size_t why_size) {
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.n_threads = 2;
    options.tuning = MOEGEN_TUNING_OFF; /* the contract compares one variant on both sides */
    options.variant = variant;
    options.comm = comm;
    moegen_layer *layer = NULL;
    moegen_error err;
    if (moegen_layer_open_string(yaml, strlen(yaml), name, &options, &layer, &err) != MOEGEN_OK ||
        moegen_layer_describe(layer, desc) != MOEGEN_OK || moegen_layer_bind(layer, w, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s: %s", name, err.message);
        moegen_layer_close(layer);
        return -1;
    }
    moegen_forward_io io = moe_outputs_io(o, ts, rng_offset);
    int rc = 0;
    if (moegen_layer_forward(layer, &io, &o->stats, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s: forward: %s", name, err.message);
        rc = -1;
    }
    moegen_layer_close(layer);
    return rc;
}

static int same(const void *a, const void *b, size_t bytes) { return bytes == 0 || memcmp(a, b, bytes) == 0; }

/* Rank q's tensors of case c: the weights every rank shares, q's own tokens, the pattern. */
static int case_tensors(const ep_case *c, const moegen_spec *spec, int q, moe_tensors *ts) {
    const int64_t S = c->tokens[q % 4];
    moe_tensors own;
    memset(&own, 0, sizeof own);
    if (moe_tensors_alloc(spec, S, ts) != 0) return -1;
    if (moe_tensors_alloc(spec, S, &own) != 0) {
        moe_tensors_free(ts);
        return -1;
    }
    moe_tensors_fill(ts, 4242);                    /* the same weights on every rank */
    moe_tensors_fill(&own, 1000 + (uint64_t)q);    /* rank q's own tokens */
    if (S > 0)
        memcpy(ts->t[MOE_T_X].data, own.t[MOE_T_X].data, ts->t[MOE_T_X].n_elems * moe_tensor_elem_bytes(ts, MOE_T_X));
    moe_tensors_apply_pattern(spec, ts, c->pattern);
    moe_tensors_free(&own);
    return 0;
}

#define EP_AUX_COEFF 0.1
#define EP_Z_COEFF 0.01
#define EP_RNG_OFFSET 17

/* One training step (forward_train + backward) of `ts`'s tokens on a fresh layer; the
 * gradients into b (the expert ones at experts [first, ...): an expert-parallel rank's
 * slices). */
static int train_layer(const char *yaml, const char *name, moegen_comm *comm, const moegen_weights *w,
                       const moe_tensors *ts, const moegen_spec *spec, int first, moe_backward_buffers *b, char *why,
                       size_t why_size) {
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.n_threads = 2;
    options.tuning = MOEGEN_TUNING_OFF;
    options.comm = comm;
    moegen_layer *layer = NULL;
    moegen_error err;
    moe_outputs o;
    if (moe_outputs_alloc(&o, spec, ts->n_tokens) != 0) {
        snprintf(why, why_size, "out of memory");
        return -1;
    }
    int rc = -1;
    moegen_saved *saved = NULL;
    if (moegen_layer_open_string(yaml, strlen(yaml), name, &options, &layer, &err) != MOEGEN_OK ||
        moegen_layer_bind(layer, w, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s: %s", name, err.message);
        goto done;
    }
    moegen_forward_io io = moe_outputs_io(&o, ts, EP_RNG_OFFSET);
    if (moegen_layer_forward_train(layer, &io, &saved, NULL, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s: forward_train: %s", name, err.message);
        goto done;
    }
    moegen_grads g = b->grads; /* the expert gradients from expert `first` on */
    const int64_t H = spec->hidden_size, F = spec->moe_intermediate_size, F1 = moegen_spec_ffn_rows(spec);
    g.w1 += first * F1 * H;
    g.w2 += first * H * F;
    if (g.b1) g.b1 += first * F1;
    if (g.b2) g.b2 += first * H;
    moegen_backward_io bio = {.dy = b->dy, .dx = b->dx, .aux_coeff = EP_AUX_COEFF, .z_coeff = EP_Z_COEFF};
    /* the split backward: dx now, the weight gradients after */
    if (moegen_layer_backward(layer, saved, &bio, NULL, &err) != MOEGEN_OK ||
        moegen_layer_backward_weights(layer, saved, &g, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s: backward: %s", name, err.message);
        goto done;
    }
    rc = 0;
done:
    moegen_saved_free(saved);
    moegen_layer_close(layer);
    moe_outputs_free(&o);
    return rc;
}

/* The backward's contract (docs/training.md): dx and the replicated weights' gradients equal,
 * bit for bit, those of an ep_size = 1 layer on this rank's tokens; the local experts'
 * gradients equal the sum over ranks of the ep_size = 1 gradients of each rank's tokens
 * (within fp32 rounding: the ranks' rows are one sum there, a sum of sums here). */
static int check_backward(const ep_case *c, moegen_comm *comm, const moegen_spec *spec, const char *yaml_ep,
                          const char *name_ep, const char *yaml_one, const char *name_one, char *why, size_t why_size) {
    const int rank = moegen_comm_rank(comm), ranks = moegen_comm_size(comm);
    const int local = spec->num_experts / ranks, first = rank * local;
    moe_tensors ts;
    moe_backward_buffers ep, one, sum;
    memset(&ts, 0, sizeof ts);
    memset(&ep, 0, sizeof ep);
    memset(&one, 0, sizeof one);
    memset(&sum, 0, sizeof sum);
    int rc = -1;
    const int64_t S = c->tokens[rank % 4];
    if (case_tensors(c, spec, rank, &ts) != 0 || moe_backward_alloc(&ep, spec, S, 77 + (uint64_t)rank) != 0 ||
        moe_backward_alloc(&one, spec, S, 77 + (uint64_t)rank) != 0 || moe_backward_alloc(&sum, spec, 0, 0) != 0) {
        snprintf(why, why_size, "out of memory");
        goto done;
    }
    moegen_weights local_w, all_w;
    moe_tensors_bind_weights(spec, &ts, first, &local_w);
    moe_tensors_bind_weights(spec, &ts, 0, &all_w);
    if (train_layer(yaml_ep, name_ep, comm, &local_w, &ts, spec, first, &ep, why, why_size) != 0) goto done;
    if (train_layer(yaml_one, name_one, NULL, &all_w, &ts, spec, 0, &one, why, why_size) != 0) goto done;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const int expert = i == MOE_T_W1 || i == MOE_T_B1 || i == MOE_T_W2 || i == MOE_T_B2;
        const float *a = moe_backward_grad(&ep, i), *b = moe_backward_grad(&one, i);
        if (expert || !a) continue;
        const size_t bytes = i == MOE_T_X ? ep.n[i] * moegen_dtype_size(spec->dtype) : ep.n[i] * sizeof(float);
        if (!same(a, b, bytes)) {
            snprintf(why, why_size, "rank %d of %d, %lld tokens: gradient %d (%s) differs from the ep_size = 1 "
                     "layer's", rank, ranks, (long long)S, i, i == MOE_T_X ? "dx" : ts.t[i].name);
            goto done;
        }
    }
    /* every rank's ep_size = 1 expert gradients, summed in rank order */
    for (int q = 0; q < ranks; q++) {
        moe_tensors tq;
        moe_backward_buffers bq;
        if (case_tensors(c, spec, q, &tq) != 0 ||
            moe_backward_alloc(&bq, spec, c->tokens[q % 4], 77 + (uint64_t)q) != 0) {
            snprintf(why, why_size, "out of memory");
            goto done;
        }
        moegen_weights wq;
        moe_tensors_bind_weights(spec, &tq, 0, &wq);
        int failed = train_layer(yaml_one, name_one, NULL, &wq, &tq, spec, 0, &bq, why, why_size);
        for (int i = MOE_T_W1; !failed && i <= MOE_T_B2; i++) {
            float *acc = moe_backward_grad(&sum, i);
            const float *add = moe_backward_grad(&bq, i);
            if (acc)
                for (size_t j = 0; j < sum.n[i]; j++) acc[j] += add[j];
        }
        moe_backward_free(&bq);
        moe_tensors_free(&tq);
        if (failed) goto done;
    }
    const int64_t H = spec->hidden_size, F = spec->moe_intermediate_size, F1 = moegen_spec_ffn_rows(spec);
    const int64_t per_expert[4] = {F1 * H, F1, H * F, H}; /* w1, b1, w2, b2 */
    for (int i = MOE_T_W1; i <= MOE_T_B2; i++) {
        const float *a = moe_backward_grad(&ep, i), *b = moe_backward_grad(&sum, i);
        if (!a) continue;
        const size_t from = (size_t)(first * per_expert[i - MOE_T_W1]), n = (size_t)(local * per_expert[i - MOE_T_W1]);
        double max = 0.0;
        for (size_t j = from; j < from + n; j++) max = fmax(max, fabs(b[j]));
        for (size_t j = from; j < from + n; j++)
            if (!(fabs(a[j] - b[j]) <= 1e-5 * max + 1e-5 * fabs(b[j]))) {
                snprintf(why, why_size, "rank %d of %d: %s[%zu] = %.9g; the ranks' ep_size = 1 gradients sum to %.9g",
                         rank, ranks, ts.t[i].name, j, a[j], b[j]);
                goto done;
            }
    }
    rc = 0;
done:
    moe_backward_free(&ep);
    moe_backward_free(&one);
    moe_backward_free(&sum);
    moe_tensors_free(&ts);
    return rc;
}

int ep_check_case(const ep_case *c, moegen_comm *comm, char *why, size_t why_size) {
    const int rank = moegen_comm_rank(comm), ranks = moegen_comm_size(comm);
    char yaml_ep[4096], yaml_one[4096], name_ep[128], name_one[128];
    snprintf(name_ep, sizeof name_ep, "%s_ep%d", c->name, ranks);
    snprintf(name_one, sizeof name_one, "%s_ep1", c->name);
    snprintf(yaml_ep, sizeof yaml_ep, "name: %s\nep_size: %d\n%s", c->name, ranks, c->yaml);
    snprintf(yaml_one, sizeof yaml_one, "name: %s\n%s", c->name, c->yaml);
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(yaml_one, strlen(yaml_one), c->name, &spec, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%s", err.message);
        return -1;
    }
    const int64_t S = c->tokens[rank % 4];
    const int local = spec.num_experts / ranks, first = rank * local;
    moe_tensors ts, own;
    memset(&ts, 0, sizeof ts);
    memset(&own, 0, sizeof own);
    moe_outputs a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    int rc = -1;
    if (moe_tensors_alloc(&spec, S, &ts) != 0 || moe_tensors_alloc(&spec, S, &own) != 0 ||
        moe_outputs_alloc(&a, &spec, S) != 0 || moe_outputs_alloc(&b, &spec, S) != 0) {
        snprintf(why, why_size, "out of memory");
        goto done;
    }
    moe_tensors_fill(&ts, 4242);                 /* the same weights on every rank */
    moe_tensors_fill(&own, 1000 + (uint64_t)rank); /* this rank's own tokens */
    if (S > 0)
        memcpy(ts.t[MOE_T_X].data, own.t[MOE_T_X].data, ts.t[MOE_T_X].n_elems * moe_tensor_elem_bytes(&ts, MOE_T_X));
    moe_tensors_apply_pattern(&spec, &ts, c->pattern);

    moegen_layer_desc desc_ep, desc_one;
    moegen_weights local_w, all_w;
    moe_tensors_bind_weights(&spec, &ts, first, &local_w);
    moe_tensors_bind_weights(&spec, &ts, 0, &all_w);
    const uint64_t rng_offset = 17;
    if (run_layer(yaml_ep, name_ep, c->variant, comm, &local_w, &ts, rng_offset, &a, &desc_ep, why, why_size) != 0) goto done;
    if (run_layer(yaml_one, name_one, c->variant, NULL, &all_w, &ts, rng_offset, &b, &desc_one, why, why_size) != 0) goto done;
    if (desc_ep.rank != rank || desc_ep.ep_size != ranks || desc_ep.first_expert != first ||
        desc_ep.n_local_experts != local) {
        snprintf(why, why_size, "describe: rank %d of %d, experts %d+%d; expected %d of %d, %d+%d", desc_ep.rank,
                 desc_ep.ep_size, desc_ep.first_expert, desc_ep.n_local_experts, rank, ranks, first, local);
        goto done;
    }
    const size_t routes = (size_t)S * spec.top_k, E = (size_t)spec.num_experts;
    const struct {
        const char *what;
        const void *x, *y;
        size_t bytes;
    } parts[] = {
        {"y", a.y, b.y, (size_t)S * spec.hidden_size * moegen_dtype_size(spec.dtype)},
        {"topk_ids", a.ids, b.ids, routes * sizeof(int32_t)},
        {"topk_weights", a.topk_weights, b.topk_weights, routes * sizeof(float)},
        {"router_weights", a.router_weights, b.router_weights, routes * sizeof(float)},
        {"counts_before", a.counts_before, b.counts_before, E * sizeof(int64_t)},
        {"counts_after", a.counts_after, b.counts_after, E * sizeof(int64_t)},
        {"n_dropped", &a.stats.n_dropped, &b.stats.n_dropped, sizeof(int64_t)},
        {"capacity", &a.stats.capacity, &b.stats.capacity, sizeof(int64_t)},
        {"aux_loss", &a.stats.aux_loss, &b.stats.aux_loss, sizeof(double)},
        {"z_loss", &a.stats.z_loss, &b.stats.z_loss, sizeof(double)},
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (!same(parts[i].x, parts[i].y, parts[i].bytes)) {
            snprintf(why, why_size, "rank %d of %d, %lld tokens: %s differs from the ep_size = 1 layer's", rank, ranks,
                     (long long)S, parts[i].what);
            goto done;
        }
    moegen_kernel_weights k;
    moe_tensors_weights(&ts, &k);
    moe_kernel_result kernel = moe_outputs_result(&a);
    moe_verify_report report;
    if (moe_verify(&spec, S, ts.t[MOE_T_X].data, &k, rng_offset, NULL, &kernel, &report) != 0 || !report.ok) {
        snprintf(why, why_size, "rank %d: against the reference: %s", rank, report.message);
        goto done;
    }
    char forward_note[512];
    snprintf(forward_note, sizeof forward_note, "%.300s", report.message);
    if (check_backward(c, comm, &spec, yaml_ep, name_ep, yaml_one, name_one, why, why_size) != 0) goto done;
    snprintf(why, why_size, "rank %d of %d: %lld tokens bitwise equal to ep_size 1, forward and backward; sent %llu "
             "B, received %llu B; reference %s", rank, ranks, (long long)S, (unsigned long long)a.stats.bytes_sent,
             (unsigned long long)a.stats.bytes_received, forward_note);
    rc = 0;
done:
    moe_outputs_free(&a);
    moe_outputs_free(&b);
    moe_tensors_free(&ts);
    moe_tensors_free(&own);
    moegen_spec_free(&spec);
    return rc;
}
