/* reference.h — an independent MoE forward in plain double-precision loops.
 *
 * This is the yardstick the generated kernels are tested against. It is written
 * from docs/numerics.md (summarized in README.md "What the layer computes")
 * and shares no code with templates/ or gen/ beyond reading the validated spec
 * struct and the documented tensor layouts (templates/common/moegen_kernel_abi.h).
 * Everything is computed in double: inputs in fp16/bf16 are widened exactly.
 *
 * The CLI (`moegen run`) links it to verify runs; tests link it for the matrix.
 */
#ifndef MOEGEN_TESTS_REFERENCE_H
#define MOEGEN_TESTS_REFERENCE_H

#include <stdint.h>

#include "moegen_kernel_abi.h"
#include "spec.h"

typedef struct moe_ref_options {
    /* Optional routing override: when both are non-NULL, these ids and router
     * weights ([S][k], before capacity) replace the reference's own routing, so
     * capacity, experts and combine can be checked on exactly the kernel's routing
     * (stage-wise checking where near-ties make routing ambiguous). */
    const int32_t *forced_ids;
    const float *forced_router_weights;
    /* Optional [S] mask: expert / shared / residual outputs are computed only for
     * tokens with mask[t] != 0 (others' y rows are left 0). Routing, capacity,
     * counts and losses always cover every token. Lets huge specs verify a sample. */
    const uint8_t *token_mask;
    uint64_t rng_offset;
} moe_ref_options;

typedef struct moe_ref_result {
    int64_t n_tokens;
    int top_k, num_experts;
    int64_t hidden;
    double *y;              /* [S][H] */
    int32_t *ids;           /* [S][k] selection order */
    double *router_weights; /* [S][k] before capacity */
    double *weights;        /* [S][k] final combine weights, 0 for dropped */
    int64_t *counts_before; /* [E] */
    int64_t *counts_after;  /* [E] */
    int64_t n_dropped;
    int64_t capacity;       /* -1 for dropless */
    double aux_loss;
    double z_loss;
    /* [S] smallest gap between a selected and a rejected candidate seen while
     * choosing this token's experts (expert level and group level, in selection
     * score units): 0 = an exact tie decided by the lower-index rule; INFINITY = no
     * comparison was close to mattering (e.g. k == E). A tiny positive gap marks
     * a token whose choice may legitimately differ between fp32 and double. */
    double *margin;
    /* [S][E] the key each expert's pick was decided on (the selection score of §1.8,
     * after the group step: -inf for an invalid or masked expert). */
    double *selection;
    /* The closest capacity decision of the `probs` priority: over the experts that drop
     * routes, the smallest relative gap (last kept weight - first dropped) / last kept
     * weight; 0 for an exact tie (the lower token wins), INFINITY when no expert drops a
     * route by weight. A tiny positive gap marks an expert whose kept set may
     * legitimately differ between fp32 and double weights. */
    double capacity_margin;
} moe_ref_result;

/* Run the reference forward for S tokens. `x` and the tensors in `w` use the
 * layouts and dtypes of the ABI header. Returns 0, or -1 on allocation failure
 * or bad arguments (message in `why` if non-NULL, up to 256 bytes). */
int moe_ref_forward(const moegen_spec *spec, int64_t n_tokens, const void *x,
                    const moegen_kernel_weights *w, const moe_ref_options *opt,
                    moe_ref_result *res, char *why);

void moe_ref_result_free(moe_ref_result *res);

/* moegen's counter-based RNG (README.md "Randomness"), written here independently:
 * a uniform in (0, 1) for (seed, offset, stream, index). */
double moe_ref_uniform(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t index);

/* Exact widening of stored fp16 / bf16 bits to double. */
double moe_ref_half_to_double(uint16_t bits);
double moe_ref_bf16_to_double(uint16_t bits);

#endif
