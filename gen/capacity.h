/* capacity.h — the capacity C per expert for S tokens (docs/numerics.md §2.1).
 *
 * Place in the pipeline: spec -> [gen] -> ... -> launch. The CUDA runtime computes C on
 * the host from the validated spec and passes it to the kernels, so every launch
 * shape depends only on S and no kernel needs a host round trip. (The generated CPU
 * code carries the same formula as a specialized function, so that generated sources
 * compile on their own; tests check both against the reference.)
 */
#ifndef MOEGEN_GEN_CAPACITY_H
#define MOEGEN_GEN_CAPACITY_H

#include <stdint.h>

#include "spec.h"

/* cf of the spec's mode: capacity_factor in train mode, eval_capacity_factor in eval. */
double moegen_spec_capacity_factor(const moegen_spec *spec);

/* The DeepSpeed formula's fp32 scale f32(k * cf), the product formed in double and
 * rounded once (docs/numerics.md §2.1). The generator emits it as a constant, so the
 * generated code and this file share one definition. */
float moegen_spec_deepspeed_capacity_scale(const moegen_spec *spec);

/* C for n_tokens >= 0 tokens in the spec's mode; -1 when the spec is dropless. */
int64_t moegen_spec_capacity(const moegen_spec *spec, int64_t n_tokens);

/* Rows the routed experts process at most for n_tokens tokens: E * C with
 * pad_to_capacity, else n_tokens * k. */
int64_t moegen_spec_max_rows(const moegen_spec *spec, int64_t n_tokens);

#endif
