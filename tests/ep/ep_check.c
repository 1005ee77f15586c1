/* ep_check.c — one rank's check of the expert-parallel contract (see ep_check.h). */
#include "ep_check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward_io.h"
#include "spec.h"
#include "tensors.h"
#include "verify.h"

#define BASE "num_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 32\n"

const ep_case EP_CASES[] = {
    {"ep_dropless_k2", BASE "dtype: fp32\n", {40, 23, 0, 57}, MOE_DATA_RANDOM},
    {"ep_bf16_k2_hot_expert", BASE, {64, 64, 64, 64}, MOE_DATA_HOT_EXPERT},
    {"ep_k4_e16_uneven", "num_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 48\nmoe_intermediate_size: 80\n",
     {100, 1, 33, 0}, MOE_DATA_RANDOM},
    {"ep_megatron_capacity_drops", BASE "capacity:\n  mode: factor\n  capacity_factor: 0.5\n  priority: probs\n",
     {96, 40, 17, 128}, MOE_DATA_HOT_EXPERT},
    {"ep_deepspeed_top2_capacity", "semantics: deepspeed\n" BASE "capacity:\n  capacity_factor: 1.0\n",
     {80, 0, 45, 31}, MOE_DATA_HOT_EXPERT},
    {"ep_fixed_capacity_pad_renorm", BASE "capacity:\n  mode: fixed\n  expert_capacity: 5\n  pad_to_capacity: true\n"
                                     "  renormalize: true\n", {50, 12, 0, 77}, MOE_DATA_RANDOM},
    {"ep_random_priority_k3", "num_experts: 12\nnum_experts_per_tok: 3\nhidden_size: 32\nmoe_intermediate_size: 48\n"
                              "capacity:\n  mode: factor\n  capacity_factor: 0.75\n  priority: random\n",
     {70, 9, 30, 2}, MOE_DATA_HOT_EXPERT},
    {"ep_shared_experts_gated", BASE "shared_experts:\n  count: 2\n  intermediate_size: 48\n  gate: true\n",
     {33, 66, 5, 0}, MOE_DATA_RANDOM},
    {"ep_residual_deepspeed_top1", "semantics: deepspeed\nnum_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
                                   "moe_intermediate_size: 32\nuse_residual: true\nactivation: gelu\n",
     {48, 7, 0, 19}, MOE_DATA_HOT_EXPERT},
    {"ep_weight_on_input_sigmoid", "num_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
                                   "moe_intermediate_size: 32\nweight_on_input: true\nexpert_bias: true\n"
                                   "router:\n  score_function: sigmoid\n", {25, 50, 75, 3}, MOE_DATA_RANDOM},
    {"ep_groups_sigmoid_bias", "num_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\nmoe_intermediate_size: 32\n"
                               "router:\n  score_function: sigmoid\n  score_bias: true\n  norm_topk_prob: true\n"
                               "  n_group: 4\n  topk_group: 2\n  routed_scaling_factor: 2.5\n",
     {60, 30, 90, 1}, MOE_DATA_TIES},
    {"ep_train_jitter_fp16", BASE "dtype: fp16\nmode: train\nrouter:\n  input_jitter: 0.01\n  seed: 9\n",
     {32, 16, 8, 4}, MOE_DATA_RANDOM},
    {"ep_no_tokens_anywhere", BASE, {0, 0, 0, 0}, MOE_DATA_RANDOM},
};
const int EP_CASE_COUNT = (int)(sizeof EP_CASES / sizeof EP_CASES[0]);

static int run_layer(const char *yaml, const char *name, moegen_comm *comm, const moegen_weights *w,
                     const moe_tensors *ts, uint64_t rng_offset, moe_outputs *o, moegen_layer_desc *desc, char *why,
                     size_t why_size) {
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.n_threads = 2;
    options.tuning = MOEGEN_TUNING_OFF; /* the contract compares one variant on both sides */
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
    if (run_layer(yaml_ep, name_ep, comm, &local_w, &ts, rng_offset, &a, &desc_ep, why, why_size) != 0) goto done;
    if (run_layer(yaml_one, name_one, NULL, &all_w, &ts, rng_offset, &b, &desc_one, why, why_size) != 0) goto done;
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
    snprintf(why, why_size, "rank %d of %d: %lld tokens bitwise equal to ep_size 1; sent %llu B, received %llu B; "
             "reference %s", rank, ranks, (long long)S, (unsigned long long)a.stats.bytes_sent,
             (unsigned long long)a.stats.bytes_received, report.message);
    rc = 0;
done:
    moe_outputs_free(&a);
    moe_outputs_free(&b);
    moe_tensors_free(&ts);
    moe_tensors_free(&own);
    moegen_spec_free(&spec);
    return rc;
}
