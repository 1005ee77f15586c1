/* capacity.c — capacity per expert (see capacity.h). */
#include "capacity.h"

#include <math.h>

double moegen_spec_capacity_factor(const moegen_spec *spec) {
    const moegen_capacity_spec *c = &spec->capacity;
    return spec->mode == MOEGEN_MODE_TRAIN ? c->capacity_factor : c->eval_capacity_factor;
}

float moegen_spec_deepspeed_capacity_scale(const moegen_spec *spec) {
    /* DeepSpeed's gate passes torch.tensor(capacity_factor * k): the product of two
     * Python numbers (double), rounded once to the fp32 tensor. */
    return (float)((double)spec->top_k * moegen_spec_capacity_factor(spec));
}

int64_t moegen_spec_capacity(const moegen_spec *spec, int64_t n_tokens) {
    const moegen_capacity_spec *c = &spec->capacity;
    if (c->mode == MOEGEN_CAP_DROPLESS) return -1;
    if (c->mode == MOEGEN_CAP_FIXED) return c->expert_capacity;
    if (c->formula == MOEGEN_CAP_FORMULA_DEEPSPEED) {
        /* torch.ceil(f32(S / E) * scale) in fp32: S / E is a Python float (double)
         * that meets an fp32 tensor, so it is rounded to fp32 first. */
        const float tokens_per_expert = (float)((double)n_tokens / (double)spec->num_experts);
        const float product = tokens_per_expert * moegen_spec_deepspeed_capacity_scale(spec);
        const int64_t capacity = (int64_t)ceilf(product);
        return capacity > c->min_capacity ? capacity : c->min_capacity;
    }
    return (int64_t)ceil((double)(n_tokens * spec->top_k) / spec->num_experts *
                         moegen_spec_capacity_factor(spec));
}

int64_t moegen_spec_max_rows(const moegen_spec *spec, int64_t n_tokens) {
    if (spec->capacity.mode != MOEGEN_CAP_DROPLESS && spec->capacity.pad_to_capacity)
        return (int64_t)spec->num_experts * moegen_spec_capacity(spec, n_tokens);
    return n_tokens * spec->top_k;
}
