/* tensors.h — every tensor of one MoE layer call, allocated and filled for tests and
 * for `moegen run` (random inputs and weights, or loaded from .npy files).
 *
 * Layouts and dtypes are those of templates/common/moegen_kernel_abi.h. Only the
 * tensors the spec uses are allocated; the others stay NULL with n_elems 0.
 */
#ifndef MOEGEN_TESTS_TENSORS_H
#define MOEGEN_TESTS_TENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_kernel_abi.h"
#include "spec.h"

typedef struct moe_tensor {
    const char *name;      /* file stem for --save / --load, e.g. "w1" */
    int ndim;
    int64_t shape[3];
    int fp32;              /* 1: always float; 0: the layer dtype */
    size_t n_elems;
    void *data;            /* NULL when the spec does not use it */
} moe_tensor;

enum {
    MOE_T_X, MOE_T_ROUTER_W, MOE_T_ROUTER_B, MOE_T_SCORE_BIAS, MOE_T_W1, MOE_T_B1, MOE_T_W2,
    MOE_T_B2, MOE_T_SHARED_W1, MOE_T_SHARED_B1, MOE_T_SHARED_W2, MOE_T_SHARED_B2,
    MOE_T_SHARED_GATE, MOE_T_RESIDUAL_W1, MOE_T_RESIDUAL_B1, MOE_T_RESIDUAL_W2,
    MOE_T_RESIDUAL_B2, MOE_T_RESIDUAL_COEF_W, MOE_T_RESIDUAL_COEF_B, MOE_T_COUNT
};

typedef struct moe_tensors {
    moegen_dtype dtype;
    int64_t n_tokens;
    moe_tensor t[MOE_T_COUNT];
} moe_tensors;

/* Describe and allocate (zeroed) every tensor `spec` uses for n_tokens tokens.
 * Returns 0, or -1 when out of memory (everything freed). */
int moe_tensors_alloc(const moegen_spec *spec, int64_t n_tokens, moe_tensors *ts);

/* Bytes the tensors of `spec` take for n_tokens tokens (before allocating). */
size_t moe_tensors_bytes(const moegen_spec *spec, int64_t n_tokens);

/* Fill with seeded uniform values scaled like an initialized layer (weights about
 * 1/sqrt(fan_in), x in [-1, 1)). Every value is a multiple of a power of two with a
 * 6-bit numerator, so it is exact in every dtype and small dot products are exact in fp32. */
void moe_tensors_fill(moe_tensors *ts, uint64_t seed);

/* Bytes per element of tensor i. */
size_t moe_tensor_elem_bytes(const moe_tensors *ts, int i);

/* Set one element of tensor i from a double (rounded to the storage type). */
void moe_tensor_set(moe_tensors *ts, int i, size_t index, double value);

/* The weights as the kernel ABI takes them. */
void moe_tensors_weights(const moe_tensors *ts, moegen_kernel_weights *w);

void moe_tensors_free(moe_tensors *ts);

/* Round-to-nearest-even conversions from float to stored fp16 / bf16 bits. */
uint16_t moe_float_to_half(float f);
uint16_t moe_float_to_bf16(float f);

#endif
