/* reference.h — an independent MoE forward and backward in plain double-precision loops.
 *
 * This is the yardstick the generated kernels are tested against. It is written
 * from docs/numerics.md (summarized in README.md "What the layer computes")
 * and shares no code with templates/ or gen/ beyond reading the validated spec
 * struct and the documented tensor layouts (templates/common/moegen_kernel_abi.h).
 * Everything is computed in double: inputs in fp16/bf16 are widened exactly.
 *
 * The backward (moe_ref_backward, reference_backward.c) is written from the math of
 * docs/numerics.md §8 alone, never from the generated kernels' backward: it reuses
 * only the forward's routing decisions (reference_internal.h) and recomputes every
 * differentiated quantity itself. tests/test_reference_backward.c checks it against
 * central finite differences of this forward.
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
    /* Optional [S] padding mask of the layer (docs/numerics.md §9; NULL = every token
     * used). A token with used_token[t] == 0 is routed and reported (ids, router
     * weights), but all its routes are treated as dropped: not counted in
     * counts_before / counts_after (nor as dropped), no capacity slot, combine weight
     * 0, routed output 0. The capacity C still comes from all S tokens; the aux loss
     * counts c / c1 leave it out while the score means P_e and the divisions by S cover
     * all S; the z-loss, shared experts and the residual path include it. Unlike
     * token_mask this changes the layer's result. */
    const uint8_t *used_token;
    /* Optional [S][k] capacity override, meant to go with forced_ids: 1 = the route
     * survived capacity. When given, a valid route of a used token is kept exactly
     * when forced_kept says so (whatever the capacity mode, C and priority, which are
     * then not applied; capacity is still reported), so a test can reproduce a
     * kernel's exact capacity decisions when router weights are near-tied. Invalid
     * routes and routes of masked tokens are never kept, whatever it says. */
    const uint8_t *forced_kept;
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

/* Gradients of L = sum(dy . y) + aux_coeff * aux_loss + z_coeff * z_loss (docs/numerics.md §8),
 * every array double, in the layouts of the corresponding weights; NULL for tensors the spec
 * lacks (router_b without router.router_bias; b1, b2, shared_b1, shared_b2, residual_b1,
 * residual_b2 without expert_bias; shared_* without shared experts, shared_gate without
 * shared_experts.gate; residual_* without use_residual). score_bias gets no gradient (§8.1).
 * dx, router_w, w1 and w2 are always allocated (dx with one element when S = 0). */
typedef struct moe_ref_grads {
    double *dx;                                   /* [S][H] */
    double *router_w, *router_b;                  /* [E][H], [E] */
    double *w1, *b1, *w2, *b2;                    /* [E][F1][H], [E][F1], [E][H][F], [E][H] */
    double *shared_w1, *shared_b1, *shared_w2, *shared_b2, *shared_gate; /* [Ns][F1s][H] ... [H] */
    double *residual_w1, *residual_b1, *residual_w2, *residual_b2;
    double *residual_coef_w, *residual_coef_b;    /* [2][H], [2] */
    /* The same sums over |terms| for the gradients that come from one dot product over H per
     * token (the residual coefficients', the shared gate's): the size of the rounding a kernel
     * may make there, which the difference of two large dot products can leave far above the
     * gradient itself (verify_backward.c scales those tolerances by these). */
    double *residual_coef_w_scale, *residual_coef_b_scale, *shared_gate_scale;
} moe_ref_grads;

/* The exact gradients of the reference forward's L, in double, by the chain of §8.2.
 * dy: [S][H] in the layer dtype (like x). Uses the same routing as moe_ref_forward with the
 * same options: it runs the forward's routing and capacity passes (so used_token, forced_ids
 * with forced_router_weights, forced_kept and rng_offset mean what they mean there), and
 * treats every selection and capacity decision as a constant (§8.1). Router weights and their
 * derivatives are always recomputed in double from the logits (with forced_ids, from the
 * logits of the forced experts, not from forced_router_weights). y is differentiated before
 * any rounding, and h is not rounded (as in the forward). token_mask is ignored: every token
 * is differentiated. *grads is overwritten (not accumulated). Returns 0, or -1 with the
 * reason in `why` (up to 256 bytes) and *grads zeroed. */
int moe_ref_backward(const moegen_spec *spec, int64_t n_tokens, const void *x,
                     const moegen_kernel_weights *w, const moe_ref_options *opt, const void *dy,
                     double aux_coeff, double z_coeff, moe_ref_grads *grads, char *why);

/* Frees every array of grads and zeroes it; NULL and a zeroed struct are fine. */
void moe_ref_grads_free(moe_ref_grads *grads);

/* moegen's counter-based RNG (README.md "Randomness"), written here independently:
 * a uniform in (0, 1) for (seed, offset, stream, index). */
double moe_ref_uniform(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t index);

/* Exact widening of stored fp16 / bf16 bits to double. */
double moe_ref_half_to_double(uint16_t bits);
double moe_ref_bf16_to_double(uint16_t bits);

#endif
