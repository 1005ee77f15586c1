/* backward_io.h — what one training backward takes and gives as the tests, the sweep and
 * the CLI hold it: the upstream gradient dy and dx (layer dtype), and an fp32 gradient
 * buffer for every weight tensor the spec has (moegen_grads). */
#ifndef MOEGEN_TESTS_BACKWARD_IO_H
#define MOEGEN_TESTS_BACKWARD_IO_H

#include <stddef.h>
#include <stdint.h>

#include "moegen.h"
#include "spec.h"
#include "tensors.h"

typedef struct moe_backward_buffers {
    void *dy, *dx;         /* [S][H] layer dtype */
    moegen_grads grads;    /* every gradient the spec has, zeroed; accumulate = 0 */
    size_t n[MOE_T_COUNT]; /* elements of each gradient, indexed like moe_tensors (MOE_T_X: dx) */
} moe_backward_buffers;

/* Allocate for S tokens of `spec`; dy is filled with seeded values in [-1, 1) (exact in
 * every dtype). 0, or -1 when out of memory (nothing left allocated). */
int moe_backward_alloc(moe_backward_buffers *b, const moegen_spec *spec, int64_t S, uint64_t seed);
void moe_backward_free(moe_backward_buffers *b);

/* The moegen_grads field of moe_tensors index i, or NULL (MOE_T_X: dx is separate;
 * MOE_T_SCORE_BIAS: it has no gradient). */
float **moe_grads_field(moegen_grads *g, int i);

/* The gradient buffer of moe_tensors index i (MOE_T_X: dx as bytes of the layer dtype;
 * MOE_T_SCORE_BIAS: NULL, it has no gradient). */
float *moe_backward_grad(const moe_backward_buffers *b, int i);

/* 1 if dx and every gradient hold the same bits in a and b. */
int moe_backward_same_bits(const moegen_spec *spec, const moe_backward_buffers *a, const moe_backward_buffers *b);

#endif
