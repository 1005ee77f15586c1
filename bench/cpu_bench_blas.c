/* cpu_bench_blas.c — the per-expert OpenBLAS loop, an anchor of bench/cpu.sh.
 *
 * One forward, in the strongest plain form of the loop a framework would write around a BLAS:
 *   1. router: logits = x · Wrᵀ (cblas_sgemm), then softmax and top-k per token (timed, as every
 *      anchor computes its router; the experts below are dispatched by moegen's routing so that
 *      the output can be checked against moegen's y);
 *   2. group the routes by expert (a counting sort; dropped routes, weight 0, are skipped);
 *   3. per expert with rows: gather its rows, GEMM1 (x · W1ᵀ, F1 columns), the activation,
 *      GEMM2 (· W2ᵀ), then y[token] += weight · row. cblas_sgemv when the expert has one row;
 *   4. shared experts on every token (with the sigmoid gate when the spec has one);
 *   5. y rounded to the layer dtype.
 * OpenBLAS threads each GEMM (openblas_set_num_threads); everything else runs on the calling
 * thread, so no second thread pool competes with OpenBLAS's.
 *
 * bf16: cblas_sbgemm (bf16 in, fp32 out) is looked up at run time, because Debian's 0.3.21
 * declares it in cblas.h but is built without it. Without it the bf16 weights are converted to
 * fp32 copies once, at setup, and the loop runs in fp32 (gathered rows converted on the fly).
 */
#define _GNU_SOURCE
#include <cblas.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#include "cpu_bench.h"
#include "tensors.h"

typedef void (*sbgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint, blasint, blasint,
                          float, const bfloat16 *, blasint, const bfloat16 *, blasint, float, float *, blasint);

struct blas_loop {
    int64_t max_S;
    sbgemm_fn sbgemm;          /* bf16 layers with cblas_sbgemm: the bf16 path */
    float *w1f, *w2f;          /* bf16 layers without it: fp32 copies of the weights */
    float *sw1f, *sw2f;
    float *xf;                 /* [max_S][H] x in fp32 (bf16 layers) */
    float *logits;             /* [max_S][E] */
    int32_t *own_ids;          /* [max_S][k] the router's own top-k (timed, not used) */
    float *own_weights;
    int64_t *count, *offset;   /* [E], [E + 1] */
    int32_t *row_token;        /* [max_S * k] routes grouped by expert */
    float *row_weight;
    void *a;                   /* [max_S][H] gathered rows: fp32, or bf16 on the sbgemm path */
    float *h;                  /* [max_S][max(F1, F1s)] GEMM1 */
    void *act;                 /* [max_S][max(F, Fs)] activation: fp32, or bf16 on the sbgemm path */
    float *o;                  /* [max_S][H] GEMM2 */
    float *yacc;               /* [max_S][H] combine in fp32 (bf16 layers) */
    float *gate;               /* [max_S] shared-expert gate */
};

int blas_loop_has_sbgemm(void) { return dlsym(RTLD_DEFAULT, "cblas_sbgemm") != NULL; }

static float *to_fp32_copy(const void *bf16, size_t n) {
    float *f = malloc(n * sizeof *f);
    const uint16_t *b = bf16;
    if (f)
        for (size_t i = 0; i < n; i++) f[i] = bench_bf16_to_float(b[i]);
    return f;
}

blas_loop *blas_loop_create(const bench_moe *m, int64_t max_S, const char **bf16_mode, char *why, size_t why_size) {
    blas_loop *b = calloc(1, sizeof *b);
    if (!b) goto oom;
    b->max_S = max_S;
    *bf16_mode = "fp32";
    if (m->bf16) {
        b->sbgemm = (sbgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sbgemm");
        if (b->sbgemm) {
            *bf16_mode = "bf16 via cblas_sbgemm";
        } else {
            *bf16_mode = "bf16 weights converted to fp32 at setup (this OpenBLAS has no cblas_sbgemm)";
            const size_t n1 = (size_t)m->E * m->F1 * m->H, n2 = (size_t)m->E * m->H * m->F;
            if (!(b->w1f = to_fp32_copy(m->w1, n1)) || !(b->w2f = to_fp32_copy(m->w2, n2))) goto oom;
            if (m->n_shared) {
                const size_t s1 = (size_t)m->n_shared * m->F1s * m->H, s2 = (size_t)m->n_shared * m->H * m->Fs;
                if (!(b->sw1f = to_fp32_copy(m->shared_w1, s1)) || !(b->sw2f = to_fp32_copy(m->shared_w2, s2)))
                    goto oom;
            }
        }
    }
    const size_t S = (size_t)max_S, H = (size_t)m->H;
    const size_t F1 = (size_t)(m->F1 > m->F1s ? m->F1 : m->F1s), F = (size_t)(m->F > m->Fs ? m->F : m->Fs);
    const size_t elem = b->sbgemm ? 2 : 4;
    b->xf = malloc(S * H * sizeof(float));
    b->logits = malloc(S * (size_t)m->E * sizeof(float));
    b->own_ids = malloc(S * (size_t)m->k * sizeof(int32_t));
    b->own_weights = malloc(S * (size_t)m->k * sizeof(float));
    b->count = malloc((size_t)m->E * sizeof(int64_t));
    b->offset = malloc(((size_t)m->E + 1) * sizeof(int64_t));
    b->row_token = malloc(S * (size_t)m->k * sizeof(int32_t));
    b->row_weight = malloc(S * (size_t)m->k * sizeof(float));
    b->a = malloc(S * H * elem);
    b->h = malloc(S * F1 * sizeof(float));
    b->act = malloc(S * F * elem);
    b->o = malloc(S * H * sizeof(float));
    b->yacc = malloc(S * H * sizeof(float));
    b->gate = malloc(S * sizeof(float));
    if (!b->xf || !b->logits || !b->own_ids || !b->own_weights || !b->count || !b->offset || !b->row_token ||
        !b->row_weight || !b->a || !b->h || !b->act || !b->o || !b->yacc || !b->gate)
        goto oom;
    return b;
oom:
    snprintf(why, why_size, "out of memory for the OpenBLAS loop's buffers and weight copies");
    blas_loop_free(b);
    return NULL;
}

void blas_loop_free(blas_loop *b) {
    if (!b) return;
    free(b->w1f);
    free(b->w2f);
    free(b->sw1f);
    free(b->sw2f);
    free(b->xf);
    free(b->logits);
    free(b->own_ids);
    free(b->own_weights);
    free(b->count);
    free(b->offset);
    free(b->row_token);
    free(b->row_weight);
    free(b->a);
    free(b->h);
    free(b->act);
    free(b->o);
    free(b->yacc);
    free(b->gate);
    free(b);
}

/* Softmax over E logits, the k largest (ties: lower index), renormalized when the spec says so. */
static void router_topk(const bench_moe *m, const float *z, int32_t *ids, float *w) {
    float max = z[0], sum = 0.0f;
    for (int e = 1; e < m->E; e++) max = z[e] > max ? z[e] : max;
    for (int e = 0; e < m->E; e++) sum += expf(z[e] - max);
    float kept = 0.0f;
    for (int j = 0; j < m->k; j++) {
        int best = -1;
        for (int e = 0; e < m->E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || z[e] > z[best])) best = e;
        }
        ids[j] = best;
        w[j] = expf(z[best] - max) / sum;
        kept += w[j];
    }
    if (m->norm_topk_prob)
        for (int j = 0; j < m->k; j++) w[j] /= kept;
}

/* GEMM1, activation and GEMM2 of one expert on n rows a[n][H]; the result in b->o.
 * a, w1: [F1][H], w2: [H][F] are in the loop's storage type (bf16 on the sbgemm path, else fp32). */
static void expert_ffn(blas_loop *b, const bench_moe *m, int64_t n, const void *a, const void *w1, const void *w2,
                       int64_t F, int64_t F1) {
    const int64_t H = m->H;
    const int gated = F1 == 2 * F;
    if (b->sbgemm) {
        b->sbgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)F1, (blasint)H, 1.0f, a,
                  (blasint)H, w1, (blasint)H, 0.0f, b->h, (blasint)F1);
    } else if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)F1, (blasint)H, 1.0f, w1, (blasint)H, a, 1, 0.0f, b->h, 1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)F1, (blasint)H, 1.0f, a,
                    (blasint)H, w1, (blasint)H, 0.0f, b->h, (blasint)F1);
    }
    for (int64_t r = 0; r < n; r++) {
        const float *h = b->h + r * F1;
        if (b->sbgemm) {
            uint16_t *out = (uint16_t *)b->act + r * F;
            for (int64_t j = 0; j < F; j++)
                out[j] = moe_float_to_bf16(bench_act(m->act, h[j], gated ? h[F + j] : 1.0f));
        } else {
            float *out = (float *)b->act + r * F;
            for (int64_t j = 0; j < F; j++) out[j] = bench_act(m->act, h[j], gated ? h[F + j] : 1.0f);
        }
    }
    if (b->sbgemm) {
        b->sbgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)H, (blasint)F, 1.0f, b->act,
                  (blasint)F, w2, (blasint)F, 0.0f, b->o, (blasint)H);
    } else if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)H, (blasint)F, 1.0f, w2, (blasint)F, b->act, 1, 0.0f, b->o,
                    1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)H, (blasint)F, 1.0f, b->act,
                    (blasint)F, w2, (blasint)F, 0.0f, b->o, (blasint)H);
    }
}

/* Copy token t's row of x into row r of the gather buffer, in the loop's storage type. */
static void gather_row(blas_loop *b, const bench_moe *m, const float *xf, int64_t t, int64_t r) {
    const size_t H = (size_t)m->H;
    if (b->sbgemm) memcpy((uint16_t *)b->a + r * H, (const uint16_t *)m->x + t * H, H * 2);
    else memcpy((float *)b->a + r * H, xf + t * H, H * 4);
}

void blas_loop_run(blas_loop *b, const bench_moe *m, void *y) {
    const int64_t S = m->S, H = m->H;
    const int E = m->E, k = m->k;
    openblas_set_num_threads(m->n_threads);

    /* x in fp32 for the router (and for the experts on the fp32 path) */
    const float *xf = m->x;
    if (m->bf16) {
        const uint16_t *xb = m->x;
        for (int64_t i = 0; i < S * H; i++) b->xf[i] = bench_bf16_to_float(xb[i]);
        xf = b->xf;
    }
    float *acc = m->bf16 ? b->yacc : y;
    memset(acc, 0, (size_t)(S * H) * sizeof(float));

    /* 1. router */
    if (S == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, E, (blasint)H, 1.0f, m->router_w, (blasint)H, xf, 1, 0.0f,
                    b->logits, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)S, E, (blasint)H, 1.0f, xf, (blasint)H,
                    m->router_w, (blasint)H, 0.0f, b->logits, E);
    for (int64_t t = 0; t < S; t++) router_topk(m, b->logits + t * E, b->own_ids + t * k, b->own_weights + t * k);

    /* 2. routes grouped by expert, in token order */
    memset(b->count, 0, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < S * k; i++)
        if (m->weights[i] != 0.0f && m->ids[i] >= 0 && m->ids[i] < E) b->count[m->ids[i]]++;
    b->offset[0] = 0;
    for (int e = 0; e < E; e++) b->offset[e + 1] = b->offset[e] + b->count[e];
    for (int e = 0; e < E; e++) b->count[e] = b->offset[e];
    for (int64_t i = 0; i < S * k; i++) {
        const int32_t e = m->ids[i];
        if (m->weights[i] == 0.0f || e < 0 || e >= E) continue;
        b->row_token[b->count[e]] = (int32_t)(i / k);
        b->row_weight[b->count[e]++] = m->weights[i];
    }

    /* 3. experts, in chunks of at most max_S rows */
    const size_t elem = b->sbgemm ? 2 : 4;
    for (int e = 0; e < E; e++) {
        const char *w1 = b->w1f ? (const char *)b->w1f : m->w1, *w2 = b->w2f ? (const char *)b->w2f : m->w2;
        w1 += (size_t)e * m->F1 * H * elem;
        w2 += (size_t)e * H * m->F * elem;
        for (int64_t first = b->offset[e]; first < b->offset[e + 1]; first += b->max_S) {
            const int64_t n = b->offset[e + 1] - first < b->max_S ? b->offset[e + 1] - first : b->max_S;
            for (int64_t r = 0; r < n; r++) gather_row(b, m, xf, b->row_token[first + r], r);
            expert_ffn(b, m, n, b->a, w1, w2, m->F, m->F1);
            for (int64_t r = 0; r < n; r++) {
                float *dst = acc + (int64_t)b->row_token[first + r] * H;
                const float w = b->row_weight[first + r], *src = b->o + r * H;
                for (int64_t c = 0; c < H; c++) dst[c] += w * src[c];
            }
        }
    }

    /* 4. shared experts on every token */
    if (m->n_shared) {
        for (int64_t t = 0; t < S; t++) b->gate[t] = 1.0f;
        if (m->shared_gate) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)S, (blasint)H, 1.0f, xf, (blasint)H, m->shared_gate, 1,
                        0.0f, b->gate, 1);
            for (int64_t t = 0; t < S; t++) b->gate[t] = 1.0f / (1.0f + expf(-b->gate[t]));
        }
        const void *a = b->sbgemm ? m->x : (const void *)xf;
        for (int i = 0; i < m->n_shared; i++) {
            const char *w1 = b->sw1f ? (const char *)b->sw1f : m->shared_w1;
            const char *w2 = b->sw2f ? (const char *)b->sw2f : m->shared_w2;
            expert_ffn(b, m, S, a, w1 + (size_t)i * m->F1s * H * elem, w2 + (size_t)i * H * m->Fs * elem, m->Fs,
                       m->F1s);
            for (int64_t t = 0; t < S; t++)
                for (int64_t c = 0; c < H; c++) acc[t * H + c] += b->gate[t] * b->o[t * H + c];
        }
    }

    /* 5. y in the layer dtype */
    if (m->bf16) {
        uint16_t *yb = y;
        for (int64_t i = 0; i < S * H; i++) yb[i] = moe_float_to_bf16(acc[i]);
    }
}
