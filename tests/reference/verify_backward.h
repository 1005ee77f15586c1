/* verify_backward.h — compare a kernel's training backward with the independent reference
 * backward (reference.h: moe_ref_backward), tensor by tensor.
 *
 * Used by test_backward, the differential sweep (moegen_sweep --backward) and
 * `moegen run --mode train --backward`. The rules (docs/numerics.md §8.4):
 *  - the reference runs on the kernel's routing and capacity decisions (its topk_ids, and
 *    which routes have a non-zero combine weight), so a near-tie that fp32 resolved
 *    otherwise than double is not a gradient error (the forward's verify checks routing);
 *  - every gradient tensor within the dtype's tolerance of §6, atol relative to the largest
 *    absolute value of that tensor's reference; where the reference is not finite the
 *    kernel must give the same NaN or Inf.
 */
#ifndef MOEGEN_TESTS_VERIFY_BACKWARD_H
#define MOEGEN_TESTS_VERIFY_BACKWARD_H

#include <stdint.h>

#include "moegen.h"
#include "moegen_kernel_abi.h"
#include "spec.h"

/* The forward the gradients belong to, and the kernel's routing of it. */
typedef struct moe_backward_case {
    int64_t n_tokens;
    const void *x;                /* [S][H] layer dtype */
    const moegen_kernel_weights *w;
    uint64_t rng_offset;
    const uint8_t *used_token;    /* [S] or NULL */
    const int32_t *ids;           /* [S][k] the kernel's topk_ids */
    const float *router_weights;  /* [S][k] the kernel's router weights (before capacity) */
    const float *topk_weights;    /* [S][k] the kernel's combine weights (0 = dropped) */
    const void *dy;               /* [S][H] layer dtype */
    double aux_coeff, z_coeff;
} moe_backward_case;

typedef struct moe_backward_report {
    int ok;
    int n_tensors;                /* gradient tensors compared */
    double max_scaled_error;      /* largest |err| / (atol + rtol |ref|) over every tensor; <= 1 passes */
    char worst[32];               /* the tensor where it was */
    char message[512];            /* first failure, or a one-line summary */
} moe_backward_report;

/* Run the reference backward and compare dx (layer dtype; NULL: not compared) and every
 * non-NULL gradient of g (fp32). Returns 0 when the comparison ran (see report->ok), -1 when
 * the reference failed (message in report->message). */
int moe_verify_backward(const moegen_spec *spec, const moe_backward_case *c, const void *dx,
                        const moegen_grads *g, moe_backward_report *report);

#endif
