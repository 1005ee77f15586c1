/* capacity.c — capacity per expert (see capacity.h). */
#include "capacity.h"

#include <math.h>

int64_t moegen_spec_capacity(const moegen_spec *spec, int64_t n_tokens) {
    const moegen_capacity_spec *c = &spec->capacity;
    if (c->mode == MOEGEN_CAP_DROPLESS) return -1;
    if (c->mode == MOEGEN_CAP_FIXED) return c->expert_capacity;
    const double factor = spec->mode == MOEGEN_MODE_TRAIN ? c->capacity_factor : c->eval_capacity_factor;
    if (c->formula == MOEGEN_CAP_FORMULA_DEEPSPEED) {
        /* DeepSpeed forms the product in fp32: f32(S / E) * f32(k * f32(cf)). */
        const float tokens_per_expert = (float)((double)n_tokens / (double)spec->num_experts);
        const float k_times_factor = (float)spec->top_k * (float)factor;
        const int64_t capacity = (int64_t)ceilf(tokens_per_expert * k_times_factor);
        return capacity > c->min_capacity ? capacity : c->min_capacity;
    }
    return (int64_t)ceil((double)(n_tokens * spec->top_k) / spec->num_experts * factor);
}

int64_t moegen_spec_max_rows(const moegen_spec *spec, int64_t n_tokens) {
    if (spec->capacity.mode != MOEGEN_CAP_DROPLESS && spec->capacity.pad_to_capacity)
        return (int64_t)spec->num_experts * moegen_spec_capacity(spec, n_tokens);
    return n_tokens * spec->top_k;
}
