/* tensors.c — allocate and fill the tensors of one layer call (see tensors.h). */
#include "tensors.h"

#include <math.h>
#include <pthread.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

static void describe(moe_tensor *t, const char *name, int fp32, int ndim, int64_t d0, int64_t d1,
                     int64_t d2) {
    t->name = name;
    t->fp32 = fp32;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->shape[2] = d2;
    t->n_elems = 1;
    for (int i = 0; i < ndim; i++) t->n_elems *= (size_t)t->shape[i];
}

/* Fill ts->t[] with names and shapes; n_elems = 0 for unused tensors. */
static void describe_all(const moegen_spec *spec, int64_t S, moe_tensors *ts) {
    const int64_t E = spec->num_experts, H = spec->hidden_size, F = spec->moe_intermediate_size;
    const int64_t F1 = moegen_spec_ffn_rows(spec);
    const int64_t Ns = spec->shared.count;
    const int64_t Fs = Ns ? spec->shared.intermediate_size : 0;
    const int64_t F1s = moegen_activation_is_gated(spec->activation) ? 2 * Fs : Fs;
    const int bias = spec->expert_bias;
    memset(ts, 0, sizeof *ts);
    ts->dtype = spec->dtype;
    ts->n_tokens = S;
    moe_tensor *t = ts->t;
    describe(&t[MOE_T_X], "x", 0, 2, S, H, 0);
    describe(&t[MOE_T_ROUTER_W], "router_w", 1, 2, E, H, 0);
    describe(&t[MOE_T_ROUTER_B], "router_b", 1, 1, spec->router.router_bias ? E : 0, 0, 0);
    describe(&t[MOE_T_SCORE_BIAS], "score_bias", 1, 1, spec->router.score_bias ? E : 0, 0, 0);
    describe(&t[MOE_T_W1], "w1", 0, 3, E, F1, H);
    describe(&t[MOE_T_B1], "b1", 0, 2, bias ? E : 0, F1, 0);
    describe(&t[MOE_T_W2], "w2", 0, 3, E, H, F);
    describe(&t[MOE_T_B2], "b2", 0, 2, bias ? E : 0, H, 0);
    describe(&t[MOE_T_SHARED_W1], "shared_w1", 0, 3, Ns, F1s, H);
    describe(&t[MOE_T_SHARED_B1], "shared_b1", 0, 2, bias ? Ns : 0, F1s, 0);
    describe(&t[MOE_T_SHARED_W2], "shared_w2", 0, 3, Ns, H, Fs);
    describe(&t[MOE_T_SHARED_B2], "shared_b2", 0, 2, bias ? Ns : 0, H, 0);
    describe(&t[MOE_T_SHARED_GATE], "shared_gate", 1, 1, Ns && spec->shared.gate ? H : 0, 0, 0);
    const int64_t R = spec->use_residual ? 1 : 0;
    describe(&t[MOE_T_RESIDUAL_W1], "residual_w1", 0, 2, R * F1, H, 0);
    describe(&t[MOE_T_RESIDUAL_B1], "residual_b1", 0, 1, R * bias * F1, 0, 0);
    describe(&t[MOE_T_RESIDUAL_W2], "residual_w2", 0, 2, R * H, F, 0);
    describe(&t[MOE_T_RESIDUAL_B2], "residual_b2", 0, 1, R * bias * H, 0, 0);
    describe(&t[MOE_T_RESIDUAL_COEF_W], "residual_coef_w", 1, 2, R * 2, H, 0);
    describe(&t[MOE_T_RESIDUAL_COEF_B], "residual_coef_b", 1, 1, R * 2, 0, 0);
}

size_t moe_tensor_elem_bytes(const moe_tensors *ts, int i) {
    return ts->t[i].fp32 ? 4 : moegen_dtype_size(ts->dtype);
}

size_t moe_tensors_bytes(const moegen_spec *spec, int64_t n_tokens) {
    moe_tensors ts;
    describe_all(spec, n_tokens, &ts);
    size_t total = 0;
    for (int i = 0; i < MOE_T_COUNT; i++) total += ts.t[i].n_elems * moe_tensor_elem_bytes(&ts, i);
    return total;
}

int moe_tensors_alloc(const moegen_spec *spec, int64_t n_tokens, moe_tensors *ts) {
    describe_all(spec, n_tokens, ts);
    for (int i = 0; i < MOE_T_COUNT; i++) {
        if (ts->t[i].n_elems == 0) continue;
        ts->t[i].data = calloc(ts->t[i].n_elems, moe_tensor_elem_bytes(ts, i));
        if (!ts->t[i].data) {
            moe_tensors_free(ts);
            return -1;
        }
    }
    return 0;
}

void moe_tensors_free(moe_tensors *ts) {
    for (int i = 0; i < MOE_T_COUNT; i++) {
        free(ts->t[i].data);
        ts->t[i].data = NULL;
    }
}

uint16_t moe_float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

uint16_t moe_float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    uint32_t exponent = magnitude >> 23;
    if (exponent < 113) {
        if (exponent < 102) return (uint16_t)sign;
        uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u, shift = 126 - exponent;
        uint32_t q = significand >> shift, rem = significand & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((exponent - 112u) << 10) | ((magnitude & 0x7fffffu) >> 13);
    uint32_t rem = magnitude & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

void moe_tensor_set(moe_tensors *ts, int i, size_t index, double value) {
    moe_tensor *t = &ts->t[i];
    if (t->fp32 || ts->dtype == MOEGEN_DTYPE_FP32) ((float *)t->data)[index] = (float)value;
    else if (ts->dtype == MOEGEN_DTYPE_FP16) ((uint16_t *)t->data)[index] = moe_float_to_half((float)value);
    else ((uint16_t *)t->data)[index] = moe_float_to_bf16((float)value);
}

static uint64_t next_random(uint64_t *state) { /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* Largest power of two not above 1/sqrt(n). */
static double fan_in_scale(int64_t n) {
    double s = 1.0;
    while (s * s * (double)n > 1.0) s *= 0.5;
    return s;
}

/* Values are drawn per block of FILL_BLOCK elements from a generator seeded by (seed,
 * tensor, block), so the result does not depend on how many threads fill. */
#define FILL_BLOCK ((size_t)1 << 20)

typedef struct fill_job {
    moe_tensors *ts;
    uint64_t seed;
    double scale[MOE_T_COUNT];
    size_t next_block[MOE_T_COUNT];
    pthread_mutex_t lock;
} fill_job;

static void fill_block(fill_job *job, int i, size_t block) {
    moe_tensors *ts = job->ts;
    uint64_t state = job->seed * 0x9e3779b97f4a7c15ull + (uint64_t)(i + 1) * 0xbf58476d1ce4e5b9ull +
                     (uint64_t)block * 0x94d049bb133111ebull;
    if (state == 0) state = 1;
    const size_t end = (block + 1) * FILL_BLOCK < ts->t[i].n_elems ? (block + 1) * FILL_BLOCK : ts->t[i].n_elems;
    for (size_t n = block * FILL_BLOCK; n < end; n++) {
        int numerator = (int)(next_random(&state) >> 57) - 64; /* -64..63 */
        moe_tensor_set(ts, i, n, numerator / 64.0 * job->scale[i]);
    }
}

static void *fill_worker(void *arg) {
    fill_job *job = arg;
    for (;;) {
        int tensor = -1;
        size_t block = 0;
        pthread_mutex_lock(&job->lock);
        for (int i = 0; i < MOE_T_COUNT && tensor < 0; i++)
            if (job->next_block[i] * FILL_BLOCK < job->ts->t[i].n_elems) {
                tensor = i;
                block = job->next_block[i]++;
            }
        pthread_mutex_unlock(&job->lock);
        if (tensor < 0) return NULL;
        fill_block(job, tensor, block);
    }
}

void moe_tensors_fill(moe_tensors *ts, uint64_t seed) {
    const int64_t H = ts->t[MOE_T_X].shape[1];
    const int64_t F = ts->t[MOE_T_W2].shape[2];
    fill_job job;
    memset(&job, 0, sizeof job);
    job.ts = ts;
    job.seed = seed;
    double *scale = job.scale;
    for (int i = 0; i < MOE_T_COUNT; i++) scale[i] = 0.125; /* biases */
    scale[MOE_T_X] = 1.0;
    scale[MOE_T_ROUTER_W] = scale[MOE_T_W1] = scale[MOE_T_SHARED_W1] = fan_in_scale(H);
    scale[MOE_T_RESIDUAL_W1] = scale[MOE_T_SHARED_GATE] = scale[MOE_T_RESIDUAL_COEF_W] = fan_in_scale(H);
    scale[MOE_T_W2] = scale[MOE_T_RESIDUAL_W2] = fan_in_scale(F);
    if (ts->t[MOE_T_SHARED_W2].n_elems) scale[MOE_T_SHARED_W2] = fan_in_scale(ts->t[MOE_T_SHARED_W2].shape[2]);
    scale[MOE_T_SCORE_BIAS] = 0.0625;
    pthread_mutex_init(&job.lock, NULL);
    size_t total = 0;
    for (int i = 0; i < MOE_T_COUNT; i++) total += ts->t[i].n_elems;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = total < 4 * FILL_BLOCK ? 0 : (int)(cpus > 32 ? 32 : cpus);
    pthread_t threads[32];
    int started = 0;
    for (; started < n_threads; started++)
        if (pthread_create(&threads[started], NULL, fill_worker, &job) != 0) break;
    fill_worker(&job); /* this thread helps (and does everything when none started) */
    for (int t = 0; t < started; t++) pthread_join(threads[t], NULL);
    pthread_mutex_destroy(&job.lock);
}

void moe_tensors_weights(const moe_tensors *ts, moegen_kernel_weights *w) {
    memset(w, 0, sizeof *w);
    const moe_tensor *t = ts->t;
    w->router_w = t[MOE_T_ROUTER_W].data;
    w->router_b = t[MOE_T_ROUTER_B].data;
    w->score_bias = t[MOE_T_SCORE_BIAS].data;
    w->w1 = t[MOE_T_W1].data;
    w->b1 = t[MOE_T_B1].data;
    w->w2 = t[MOE_T_W2].data;
    w->b2 = t[MOE_T_B2].data;
    w->shared_w1 = t[MOE_T_SHARED_W1].data;
    w->shared_b1 = t[MOE_T_SHARED_B1].data;
    w->shared_w2 = t[MOE_T_SHARED_W2].data;
    w->shared_b2 = t[MOE_T_SHARED_B2].data;
    w->shared_gate = t[MOE_T_SHARED_GATE].data;
    w->residual_w1 = t[MOE_T_RESIDUAL_W1].data;
    w->residual_b1 = t[MOE_T_RESIDUAL_B1].data;
    w->residual_w2 = t[MOE_T_RESIDUAL_W2].data;
    w->residual_b2 = t[MOE_T_RESIDUAL_B2].data;
    w->residual_coef_w = t[MOE_T_RESIDUAL_COEF_W].data;
    w->residual_coef_b = t[MOE_T_RESIDUAL_COEF_B].data;
}
