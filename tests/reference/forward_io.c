/* forward_io.c — the weights and outputs of one forward (see forward_io.h). */
#include "forward_io.h"

#include <stdlib.h>
#include <string.h>

int moe_outputs_alloc(moe_outputs *o, const moegen_spec *spec, int64_t S) {
    memset(o, 0, sizeof *o);
    const size_t routes = (size_t)S * spec->top_k + 1;
    o->y = calloc((size_t)S * spec->hidden_size + 1, moegen_dtype_size(spec->dtype));
    o->ids = calloc(routes, sizeof *o->ids);
    o->topk_weights = calloc(routes, sizeof *o->topk_weights);
    o->router_weights = calloc(routes, sizeof *o->router_weights);
    o->counts_before = calloc((size_t)spec->num_experts, sizeof *o->counts_before);
    o->counts_after = calloc((size_t)spec->num_experts, sizeof *o->counts_after);
    if (o->y && o->ids && o->topk_weights && o->router_weights && o->counts_before && o->counts_after) return 0;
    moe_outputs_free(o);
    return -1;
}

void moe_outputs_free(moe_outputs *o) {
    free(o->y);
    free(o->ids);
    free(o->topk_weights);
    free(o->router_weights);
    free(o->counts_before);
    free(o->counts_after);
    memset(o, 0, sizeof *o);
}

moegen_forward_io moe_outputs_io(moe_outputs *o, const moe_tensors *ts, uint64_t rng_offset) {
    return (moegen_forward_io){
        .n_tokens = ts->n_tokens, .x = ts->t[MOE_T_X].data, .y = o->y, .topk_ids = o->ids,
        .topk_weights = o->topk_weights, .router_weights = o->router_weights,
        .counts_before = o->counts_before, .counts_after = o->counts_after, .rng_offset = rng_offset,
    };
}

moe_kernel_result moe_outputs_result(const moe_outputs *o) {
    return (moe_kernel_result){
        .y = o->y, .ids = o->ids, .topk_weights = o->topk_weights, .router_weights = o->router_weights,
        .counts_before = o->counts_before, .counts_after = o->counts_after, .n_dropped = o->stats.n_dropped,
        .capacity = o->stats.capacity, .aux_loss = o->stats.aux_loss, .z_loss = o->stats.z_loss,
    };
}

void moe_bind_weights(const moegen_kernel_weights *k, moegen_weights *w) {
    *w = (moegen_weights){
        .router_w = k->router_w, .router_b = k->router_b, .score_bias = k->score_bias, .w1 = k->w1, .b1 = k->b1,
        .w2 = k->w2, .b2 = k->b2, .shared_w1 = k->shared_w1, .shared_b1 = k->shared_b1, .shared_w2 = k->shared_w2,
        .shared_b2 = k->shared_b2, .shared_gate = k->shared_gate, .residual_w1 = k->residual_w1,
        .residual_b1 = k->residual_b1, .residual_w2 = k->residual_w2, .residual_b2 = k->residual_b2,
        .residual_coef_w = k->residual_coef_w, .residual_coef_b = k->residual_coef_b,
    };
}

void moe_bind_local_experts(const moegen_spec *spec, int first_expert, moegen_weights *w) {
    const size_t elem = moegen_dtype_size(spec->dtype), e = (size_t)first_expert;
    const size_t H = (size_t)spec->hidden_size, F = (size_t)spec->moe_intermediate_size;
    const size_t F1 = (size_t)moegen_spec_ffn_rows(spec);
    w->w1 = (const char *)w->w1 + e * F1 * H * elem;
    if (w->b1) w->b1 = (const char *)w->b1 + e * F1 * elem;
    w->w2 = (const char *)w->w2 + e * H * F * elem;
    if (w->b2) w->b2 = (const char *)w->b2 + e * H * elem;
}

void moe_tensors_bind_weights(const moegen_spec *spec, const moe_tensors *ts, int first_expert, moegen_weights *w) {
    moegen_kernel_weights k;
    moe_tensors_weights(ts, &k);
    moe_bind_weights(&k, w);
    moe_bind_local_experts(spec, first_expert, w);
}
