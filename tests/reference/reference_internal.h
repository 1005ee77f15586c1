/* reference_internal.h — what reference.c shares with reference_backward.c, and no one else.
 *
 * The backward must see exactly the routing decisions of the forward run with the same
 * options (which routes are valid, which survived capacity, and the counts c / c1 of the
 * load-balancing loss), so it runs the forward's first two passes through this entry point
 * rather than re-deriving them. Everything the backward differentiates (logits, scores,
 * router weights, expert outputs) it recomputes itself in double.
 */
#ifndef MOEGEN_TESTS_REFERENCE_INTERNAL_H
#define MOEGEN_TESTS_REFERENCE_INTERNAL_H

#include <stdint.h>

#include "reference.h"

/* Per-route decisions of one forward call, [S][k] each, plus the loss counts. */
typedef struct moe_ref_decisions {
    unsigned char *route_valid;  /* a valid route (§1.8): not a fill slot, valid logit */
    unsigned char *route_kept;   /* valid, of a used token (§9) and kept by capacity (§2.2) */
    int64_t *balance_counts;     /* [E] the aux loss counts: c1 (deepspeed, k <= 2) or c
                                    (otherwise), masked tokens left out; 0 for aux_loss none */
} moe_ref_decisions;

/* moe_ref_forward, with the decisions handed out (decisions may be NULL). With
 * compute_outputs = 0 the third pass (experts, combine, shared, residual) is skipped and
 * res->y stays 0. Returns 0 or -1 (why). */
int moe_ref_forward_decisions(const moegen_spec *spec, int64_t n_tokens, const void *x,
                              const moegen_kernel_weights *w, const moe_ref_options *opt,
                              int compute_outputs, moe_ref_result *res,
                              moe_ref_decisions *decisions, char *why);
void moe_ref_decisions_free(moe_ref_decisions *decisions);

/* §1.3 on a logit summed in double (see reference.c): NaN -> -inf, beyond the fp32 range
 * clamped the way an fp32 router would overflow. */
double moe_ref_sanitize_logit(double z);

#endif
