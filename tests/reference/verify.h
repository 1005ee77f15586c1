/* verify.h — compare a kernel's forward outputs with the independent reference.
 *
 * Used by the test matrix and by `moegen run`. The rules (docs/numerics.md §6):
 *  - routing: ids equal; a token whose reference decision margin is positive and below
 *    MOE_VERIFY_AMBIGUOUS_MARGIN may differ (fp32 vs double near-tie), exact ties may not;
 *  - when some tokens were ambiguous and differ, or a capacity decision of the probs
 *    priority was a near-tie (relative weight gap below the margin), capacity, weights and
 *    y are compared against a second reference run that takes the kernel's routing and
 *    fp32 router weights as given (stage-wise check), so one near-tie cannot hide or fake
 *    an error downstream;
 *  - y within the per-dtype tolerance where the reference is finite; where it is not (a
 *    NaN input row through a shared expert or the residual MLP) the kernel must give the
 *    same NaN or Inf; weights within 1e-4 relative, counts exact, losses within 1e-4
 *    relative (plus a small absolute slack).
 */
#ifndef MOEGEN_TESTS_VERIFY_H
#define MOEGEN_TESTS_VERIFY_H

#include <stdint.h>

#include "moegen_kernel_abi.h"
#include "reference.h"
#include "spec.h"

#define MOE_VERIFY_AMBIGUOUS_MARGIN 1e-5

/* What the kernel produced for S tokens. */
typedef struct moe_kernel_result {
    const void *y;                /* [S][H] layer dtype */
    const int32_t *ids;           /* [S][k] */
    const float *topk_weights;    /* [S][k] final */
    const float *router_weights;  /* [S][k] before capacity */
    const int64_t *counts_before; /* [E] */
    const int64_t *counts_after;  /* [E] */
    int64_t n_dropped;
    int64_t capacity;
    double aux_loss;
    double z_loss;
} moe_kernel_result;

typedef struct moe_verify_report {
    int ok;                       /* every check passed */
    int64_t tokens_compared;      /* tokens whose y was compared */
    int64_t ambiguous_tokens;     /* near-tie tokens whose routing differed (allowed) */
    int ambiguous_capacity;       /* a probs-priority capacity decision was a near-tie */
    int used_forced_routing;      /* the stage-wise reference run was needed */
    double max_abs_error;         /* largest |y - ref| */
    double max_scaled_error;      /* largest |y - ref| / (atol + rtol |ref|); <= 1 passes */
    double rtol, atol;            /* the tolerance used (atol already scaled) */
    char message[512];            /* first failure, or a one-line summary */
} moe_verify_report;

/* Per-dtype tolerance: rtol and atol relative to max |ref|. */
void moe_verify_tolerance(moegen_dtype dtype, double *rtol, double *atol_rel);

/* Run the reference on (x, w) and compare. `token_mask` (may be NULL) limits which
 * tokens' y is compared (the reference skips the expert work of the others).
 * Returns 0 when the comparison ran (see report->ok), -1 if the reference failed
 * (message in report->message). */
int moe_verify(const moegen_spec *spec, int64_t n_tokens, const void *x,
               const moegen_kernel_weights *w, uint64_t rng_offset, const uint8_t *token_mask,
               const moe_kernel_result *kernel, moe_verify_report *report);

#endif
