/* kernel_grads.h — the public gradient buffers (moegen_grads, include/moegen/moegen.h) as the
 * generated modules take them (moegen_kernel_grads, moegen_kernel_abi.h): the same fields in
 * the same order, without `accumulate` (a separate argument there). One home for the CPU and
 * CUDA backends' conversion. */
#ifndef MOEGEN_RUNTIME_KERNEL_GRADS_H
#define MOEGEN_RUNTIME_KERNEL_GRADS_H

#include "moegen.h"
#include "moegen_kernel_abi.h"

static inline moegen_kernel_grads moegen_kernel_grads_of(const moegen_grads *g) {
    return (moegen_kernel_grads){g->router_w,       g->router_b,       g->w1,           g->b1,
                                 g->w2,             g->b2,             g->shared_w1,    g->shared_b1,
                                 g->shared_w2,      g->shared_b2,      g->shared_gate,  g->residual_w1,
                                 g->residual_b1,    g->residual_w2,    g->residual_b2,  g->residual_coef_w,
                                 g->residual_coef_b};
}

#endif
