/* forward_io.h — what one forward takes and gives as the tests, the sweep and the CLI hold
 * it: the weights of a moe_tensors as moegen_layer_bind takes them, and the outputs,
 * allocated for S tokens, handed to the layer as a moegen_forward_io and to the verifier as
 * a moe_kernel_result. */
#ifndef MOEGEN_TESTS_FORWARD_IO_H
#define MOEGEN_TESTS_FORWARD_IO_H

#include <stdint.h>

#include "moegen.h"
#include "tensors.h"
#include "verify.h"

typedef struct moe_outputs {
    void *y;                         /* [S][H] layer dtype */
    int32_t *ids;                    /* [S][k] */
    float *topk_weights, *router_weights; /* [S][k] */
    int64_t *counts_before, *counts_after; /* [E] */
    moegen_forward_stats stats;
} moe_outputs;

/* Zeroed outputs for S tokens of `spec`; 0, or -1 when out of memory (nothing left allocated). */
int moe_outputs_alloc(moe_outputs *o, const moegen_spec *spec, int64_t S);
void moe_outputs_free(moe_outputs *o);

/* The forward's io: the tokens of `ts`, these outputs. */
moegen_forward_io moe_outputs_io(moe_outputs *o, const moe_tensors *ts, uint64_t rng_offset);

/* What the verifier compares. */
moe_kernel_result moe_outputs_result(const moe_outputs *o);

/* The kernel-ABI weights as moegen_layer_bind takes them (the same pointers). */
void moe_bind_weights(const moegen_kernel_weights *k, moegen_weights *w);

/* Move the expert tensors of `w` (w1, b1, w2, b2) on to expert `first_expert`, as a rank of
 * an expert-parallel layer binds them; works on host and device pointers alike. */
void moe_bind_local_experts(const moegen_spec *spec, int first_expert, moegen_weights *w);

/* Both: the weights of `ts` from expert `first_expert` on (0: all of them). */
void moe_tensors_bind_weights(const moegen_spec *spec, const moe_tensors *ts, int first_expert, moegen_weights *w);

#endif
