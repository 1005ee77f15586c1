/* backward_io.c — buffers of one training backward (see the header). */
#include "backward_io.h"

#include <stdlib.h>
#include <string.h>

float **moe_grads_field(moegen_grads *g, int i) {
    switch (i) {
    case MOE_T_ROUTER_W: return &g->router_w;
    case MOE_T_ROUTER_B: return &g->router_b;
    case MOE_T_W1: return &g->w1;
    case MOE_T_B1: return &g->b1;
    case MOE_T_W2: return &g->w2;
    case MOE_T_B2: return &g->b2;
    case MOE_T_SHARED_W1: return &g->shared_w1;
    case MOE_T_SHARED_B1: return &g->shared_b1;
    case MOE_T_SHARED_W2: return &g->shared_w2;
    case MOE_T_SHARED_B2: return &g->shared_b2;
    case MOE_T_SHARED_GATE: return &g->shared_gate;
    case MOE_T_RESIDUAL_W1: return &g->residual_w1;
    case MOE_T_RESIDUAL_B1: return &g->residual_b1;
    case MOE_T_RESIDUAL_W2: return &g->residual_w2;
    case MOE_T_RESIDUAL_B2: return &g->residual_b2;
    case MOE_T_RESIDUAL_COEF_W: return &g->residual_coef_w;
    case MOE_T_RESIDUAL_COEF_B: return &g->residual_coef_b;
    default: return NULL;
    }
}

static uint64_t next(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int moe_backward_alloc(moe_backward_buffers *b, const moegen_spec *spec, int64_t S, uint64_t seed) {
    memset(b, 0, sizeof *b);
    moe_tensors shapes; /* the tensors' sizes: a gradient has its weight's */
    if (moe_tensors_alloc(spec, 0, &shapes) != 0) return -1;
    int ok = 1;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        float **s = moe_grads_field(&b->grads, i);
        if (!s || !shapes.t[i].data) continue;
        b->n[i] = shapes.t[i].n_elems;
        *s = calloc(b->n[i] ? b->n[i] : 1, sizeof(float));
        ok = ok && *s;
    }
    moe_tensors_free(&shapes);
    const size_t elem = moegen_dtype_size(spec->dtype), n = (size_t)S * (size_t)spec->hidden_size;
    b->n[MOE_T_X] = n;
    b->dy = calloc(n ? n : 1, elem);
    b->dx = calloc(n ? n : 1, elem);
    if (!ok || !b->dy || !b->dx) {
        moe_backward_free(b);
        return -1;
    }
    uint64_t state = seed ^ 0x6479u;
    for (size_t i = 0; i < n; i++) {
        const float v = (float)((int)(next(&state) >> 58) - 32) / 32.0f; /* k / 32, k in [-32, 32): exact */
        if (spec->dtype == MOEGEN_DTYPE_FP32) ((float *)b->dy)[i] = v;
        else if (spec->dtype == MOEGEN_DTYPE_FP16) ((uint16_t *)b->dy)[i] = moe_float_to_half(v);
        else ((uint16_t *)b->dy)[i] = moe_float_to_bf16(v);
    }
    return 0;
}

void moe_backward_free(moe_backward_buffers *b) {
    if (!b) return;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        float **s = moe_grads_field(&b->grads, i);
        if (s) free(*s);
    }
    free(b->dy);
    free(b->dx);
    memset(b, 0, sizeof *b);
}

float *moe_backward_grad(const moe_backward_buffers *b, int i) {
    if (i == MOE_T_X) return b->dx;
    float **s = moe_grads_field((moegen_grads *)&b->grads, i);
    return s ? *s : NULL;
}

int moe_backward_same_bits(const moegen_spec *spec, const moe_backward_buffers *a, const moe_backward_buffers *b) {
    if (memcmp(a->dx, b->dx, a->n[MOE_T_X] * moegen_dtype_size(spec->dtype)) != 0) return 0;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        if (i == MOE_T_X) continue;
        const float *x = moe_backward_grad(a, i), *y = moe_backward_grad(b, i);
        if ((x == NULL) != (y == NULL)) return 0;
        if (x && memcmp(x, y, a->n[i] * sizeof(float)) != 0) return 0;
    }
    return 1;
}
