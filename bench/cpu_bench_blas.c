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
 * Two schedules on T > 1 threads; the worker times both on each shape and keeps the faster:
 *   gemm-threads      experts one after another, OpenBLAS threading each GEMM (T threads);
 *   experts-parallel  T OpenMP threads, each with single-threaded OpenBLAS and its own buffers,
 *                     take whole experts (largest first); router and shared experts split by
 *                     token rows; the threads' partial outputs summed at the end.
 * Experts with more rows than CHUNK_ROWS are run in chunks of CHUNK_ROWS (bounds the buffers).
 *
 * bf16: cblas_sbgemm (bf16 in, fp32 out) is looked up at run time, because Debian's 0.3.21
 * declares it in cblas.h but is built without it. Without it the bf16 weights are converted to
 * fp32 copies once, at setup, and the loop runs in fp32 (gathered rows converted on the fly).
 */
#define _GNU_SOURCE
#include <cblas.h>
#include <dlfcn.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#include "cpu_bench.h"
#include "tensors.h"

typedef void (*sbgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint, blasint, blasint,
                          float, const bfloat16 *, blasint, const bfloat16 *, blasint, float, float *, blasint);

#define CHUNK_ROWS 1024

/* One thread's buffers. */
typedef struct scratch {
    void *a;      /* [chunk][H] gathered rows: fp32, or bf16 on the sbgemm path */
    float *h;     /* [chunk][max(F1, F1s)] GEMM1 */
    void *act;    /* [chunk][max(F, Fs)] activation: fp32, or bf16 on the sbgemm path */
    float *o;     /* [chunk][H] GEMM2 */
    float *gate;  /* [chunk] shared-expert gate */
    float *yacc;  /* [max_S][H] this thread's part of y, fp32 */
} scratch;

struct blas_loop {
    int64_t max_S, chunk;
    size_t elem;               /* bytes per element of the loop's storage: 2 (sbgemm) or 4 */
    int64_t F1max, Fmax;
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
    int32_t *order;            /* [E] experts with routes, most rows first (experts-parallel) */
    int n_active;
    scratch *sc;               /* one per thread, allocated on first use */
    int n_sc;
};

const char *blas_schedule_name(int schedule) {
    return schedule == BLAS_EXPERTS_PARALLEL ? "experts-parallel" : "gemm-threads";
}

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
    b->chunk = max_S < CHUNK_ROWS ? max_S : CHUNK_ROWS;
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
    b->elem = b->sbgemm ? 2 : 4;
    b->F1max = m->F1 > m->F1s ? m->F1 : m->F1s;
    b->Fmax = m->F > m->Fs ? m->F : m->Fs;
    const size_t S = (size_t)max_S, H = (size_t)m->H;
    b->xf = malloc(S * H * sizeof(float));
    b->logits = malloc(S * (size_t)m->E * sizeof(float));
    b->own_ids = malloc(S * (size_t)m->k * sizeof(int32_t));
    b->own_weights = malloc(S * (size_t)m->k * sizeof(float));
    b->count = malloc((size_t)m->E * sizeof(int64_t));
    b->offset = malloc(((size_t)m->E + 1) * sizeof(int64_t));
    b->row_token = malloc(S * (size_t)m->k * sizeof(int32_t));
    b->row_weight = malloc(S * (size_t)m->k * sizeof(float));
    b->order = malloc((size_t)m->E * sizeof(int32_t));
    if (!b->xf || !b->logits || !b->own_ids || !b->own_weights || !b->count || !b->offset || !b->row_token ||
        !b->row_weight || !b->order)
        goto oom;
    return b;
oom:
    snprintf(why, why_size, "out of memory for the OpenBLAS loop's buffers and weight copies");
    blas_loop_free(b);
    return NULL;
}

static void scratch_free(scratch *sc) {
    free(sc->a);
    free(sc->h);
    free(sc->act);
    free(sc->o);
    free(sc->gate);
    free(sc->yacc);
}

/* Buffers for n threads: 0, or -1 when out of memory. */
static int reserve(blas_loop *b, const bench_moe *m, int n) {
    if (n <= b->n_sc) return 0;
    scratch *sc = realloc(b->sc, (size_t)n * sizeof *sc);
    if (!sc) return -1;
    b->sc = sc;
    const size_t C = (size_t)b->chunk, H = (size_t)m->H;
    for (; b->n_sc < n; b->n_sc++) {
        scratch *t = &b->sc[b->n_sc];
        memset(t, 0, sizeof *t);
        t->a = malloc(C * H * b->elem);
        t->h = malloc(C * (size_t)b->F1max * sizeof(float));
        t->act = malloc(C * (size_t)b->Fmax * b->elem);
        t->o = malloc(C * H * sizeof(float));
        t->gate = malloc(C * sizeof(float));
        t->yacc = malloc((size_t)b->max_S * H * sizeof(float));
        if (!t->a || !t->h || !t->act || !t->o || !t->gate || !t->yacc) {
            scratch_free(t);
            return -1;
        }
    }
    return 0;
}

void blas_loop_free(blas_loop *b) {
    if (!b) return;
    for (int i = 0; i < b->n_sc; i++) scratch_free(&b->sc[i]);
    free(b->sc);
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
    free(b->order);
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

/* GEMM1, activation and GEMM2 of one expert on n rows a[n][H]; the result in sc->o.
 * a, w1: [F1][H], w2: [H][F] are in the loop's storage type (bf16 on the sbgemm path, else fp32). */
static void expert_ffn(const blas_loop *b, const bench_moe *m, scratch *sc, int64_t n, const void *a, const void *w1,
                       const void *w2, int64_t F, int64_t F1) {
    const int64_t H = m->H;
    const int gated = F1 == 2 * F;
    if (b->sbgemm) {
        b->sbgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)F1, (blasint)H, 1.0f, a,
                  (blasint)H, w1, (blasint)H, 0.0f, sc->h, (blasint)F1);
    } else if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)F1, (blasint)H, 1.0f, w1, (blasint)H, a, 1, 0.0f, sc->h, 1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)F1, (blasint)H, 1.0f, a,
                    (blasint)H, w1, (blasint)H, 0.0f, sc->h, (blasint)F1);
    }
    for (int64_t r = 0; r < n; r++) {
        const float *h = sc->h + r * F1;
        if (b->sbgemm) {
            uint16_t *out = (uint16_t *)sc->act + r * F;
            for (int64_t j = 0; j < F; j++)
                out[j] = moe_float_to_bf16(bench_act(m->act, h[j], gated ? h[F + j] : 1.0f));
        } else {
            float *out = (float *)sc->act + r * F;
            for (int64_t j = 0; j < F; j++) out[j] = bench_act(m->act, h[j], gated ? h[F + j] : 1.0f);
        }
    }
    if (b->sbgemm) {
        b->sbgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)H, (blasint)F, 1.0f, sc->act,
                  (blasint)F, w2, (blasint)F, 0.0f, sc->o, (blasint)H);
    } else if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)H, (blasint)F, 1.0f, w2, (blasint)F, sc->act, 1, 0.0f,
                    sc->o, 1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)n, (blasint)H, (blasint)F, 1.0f, sc->act,
                    (blasint)F, w2, (blasint)F, 0.0f, sc->o, (blasint)H);
    }
}

/* x rows [t0, t1) in fp32 (bf16 layers). */
static void convert_rows(blas_loop *b, const bench_moe *m, int64_t t0, int64_t t1) {
    const uint16_t *xb = m->x;
    for (int64_t i = t0 * m->H; i < t1 * m->H; i++) b->xf[i] = bench_bf16_to_float(xb[i]);
}

/* Router logits and top-k of token rows [t0, t1). */
static void router_rows(blas_loop *b, const bench_moe *m, const float *xf, int64_t t0, int64_t t1) {
    const int64_t H = m->H;
    const int E = m->E, k = m->k;
    if (t1 - t0 == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, E, (blasint)H, 1.0f, m->router_w, (blasint)H, xf + t0 * H, 1, 0.0f,
                    b->logits + t0 * E, 1);
    else if (t1 > t0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)(t1 - t0), E, (blasint)H, 1.0f, xf + t0 * H,
                    (blasint)H, m->router_w, (blasint)H, 0.0f, b->logits + t0 * E, E);
    for (int64_t t = t0; t < t1; t++) router_topk(m, b->logits + t * E, b->own_ids + t * k, b->own_weights + t * k);
}

/* moegen's routes grouped by expert, in token order; the experts with routes, most rows first. */
static void group_routes(blas_loop *b, const bench_moe *m) {
    const int E = m->E, k = m->k;
    const int64_t S = m->S;
    memset(b->count, 0, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < S * k; i++)
        if (m->weights[i] != 0.0f && m->ids[i] >= 0 && m->ids[i] < E) b->count[m->ids[i]]++;
    b->offset[0] = 0;
    b->n_active = 0;
    for (int e = 0; e < E; e++) {
        b->offset[e + 1] = b->offset[e] + b->count[e];
        if (b->count[e]) b->order[b->n_active++] = e;
    }
    for (int i = 1; i < b->n_active; i++) /* insertion sort by rows, descending */
        for (int j = i; j > 0 && b->count[b->order[j]] > b->count[b->order[j - 1]]; j--) {
            const int32_t e = b->order[j];
            b->order[j] = b->order[j - 1];
            b->order[j - 1] = e;
        }
    for (int e = 0; e < E; e++) b->count[e] = b->offset[e];
    for (int64_t i = 0; i < S * k; i++) {
        const int32_t e = m->ids[i];
        if (m->weights[i] == 0.0f || e < 0 || e >= E) continue;
        b->row_token[b->count[e]] = (int32_t)(i / k);
        b->row_weight[b->count[e]++] = m->weights[i];
    }
}

/* Expert e on its routes, in chunks: gather, FFN, acc[token] += weight * row. */
static void expert_rows(const blas_loop *b, const bench_moe *m, scratch *sc, const float *xf, int e, float *acc) {
    const int64_t H = m->H;
    const char *w1 = b->w1f ? (const char *)b->w1f : m->w1, *w2 = b->w2f ? (const char *)b->w2f : m->w2;
    w1 += (size_t)e * m->F1 * H * b->elem;
    w2 += (size_t)e * H * m->F * b->elem;
    for (int64_t first = b->offset[e]; first < b->offset[e + 1]; first += b->chunk) {
        const int64_t n = b->offset[e + 1] - first < b->chunk ? b->offset[e + 1] - first : b->chunk;
        for (int64_t r = 0; r < n; r++) {
            const int64_t t = b->row_token[first + r];
            if (b->sbgemm) memcpy((uint16_t *)sc->a + r * H, (const uint16_t *)m->x + t * H, (size_t)H * 2);
            else memcpy((float *)sc->a + r * H, xf + t * H, (size_t)H * 4);
        }
        expert_ffn(b, m, sc, n, sc->a, w1, w2, m->F, m->F1);
        for (int64_t r = 0; r < n; r++) {
            float *dst = acc + (int64_t)b->row_token[first + r] * H;
            const float w = b->row_weight[first + r], *src = sc->o + r * H;
            for (int64_t c = 0; c < H; c++) dst[c] += w * src[c];
        }
    }
}

/* The shared experts on token rows [t0, t1), in chunks, added into acc. */
static void shared_rows(const blas_loop *b, const bench_moe *m, scratch *sc, const float *xf, int64_t t0, int64_t t1,
                        float *acc) {
    const int64_t H = m->H;
    for (int64_t first = t0; first < t1; first += b->chunk) {
        const int64_t n = t1 - first < b->chunk ? t1 - first : b->chunk;
        for (int64_t r = 0; r < n; r++) sc->gate[r] = 1.0f;
        if (m->shared_gate) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)n, (blasint)H, 1.0f, xf + first * H, (blasint)H,
                        m->shared_gate, 1, 0.0f, sc->gate, 1);
            for (int64_t r = 0; r < n; r++) sc->gate[r] = 1.0f / (1.0f + expf(-sc->gate[r]));
        }
        const void *a = b->sbgemm ? (const void *)((const uint16_t *)m->x + first * H) : (const void *)(xf + first * H);
        for (int i = 0; i < m->n_shared; i++) {
            const char *w1 = b->sw1f ? (const char *)b->sw1f : m->shared_w1;
            const char *w2 = b->sw2f ? (const char *)b->sw2f : m->shared_w2;
            expert_ffn(b, m, sc, n, a, w1 + (size_t)i * m->F1s * H * b->elem, w2 + (size_t)i * H * m->Fs * b->elem,
                       m->Fs, m->F1s);
            for (int64_t r = 0; r < n; r++)
                for (int64_t c = 0; c < H; c++) acc[(first + r) * H + c] += sc->gate[r] * sc->o[r * H + c];
        }
    }
}

/* gemm-threads: one thread walks the experts; OpenBLAS threads every GEMM. */
static void run_gemm_threads(blas_loop *b, const bench_moe *m, void *y) {
    const int64_t S = m->S, H = m->H;
    openblas_set_num_threads(m->n_threads);
    if (m->bf16) convert_rows(b, m, 0, S);
    const float *xf = m->bf16 ? b->xf : m->x;
    float *acc = m->bf16 ? b->sc[0].yacc : y;
    memset(acc, 0, (size_t)(S * H) * sizeof(float));
    router_rows(b, m, xf, 0, S);
    group_routes(b, m);
    for (int i = 0; i < b->n_active; i++) expert_rows(b, m, &b->sc[0], xf, b->order[i], acc);
    if (m->n_shared) shared_rows(b, m, &b->sc[0], xf, 0, S, acc);
    if (m->bf16)
        for (int64_t i = 0; i < S * H; i++) ((uint16_t *)y)[i] = moe_float_to_bf16(acc[i]);
}

/* experts-parallel: T threads with single-threaded OpenBLAS; whole experts to each thread. */
static void run_experts_parallel(blas_loop *b, const bench_moe *m, void *y) {
    const int64_t S = m->S, H = m->H;
    const int T = m->n_threads;
    openblas_set_num_threads(1);
    const float *xf = m->bf16 ? b->xf : m->x;
#pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        scratch *sc = &b->sc[tid];
        const int64_t t0 = S * tid / nt, t1 = S * (tid + 1) / nt;
        if (m->bf16) convert_rows(b, m, t0, t1);
        memset(sc->yacc, 0, (size_t)(S * H) * sizeof(float));
#pragma omp barrier
        router_rows(b, m, xf, t0, t1);
#pragma omp barrier
#pragma omp single
        group_routes(b, m);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < b->n_active; i++) expert_rows(b, m, sc, xf, b->order[i], sc->yacc);
        if (m->n_shared) shared_rows(b, m, sc, xf, t0, t1, sc->yacc);
#pragma omp barrier
        for (int64_t i = t0 * H; i < t1 * H; i++) { /* y = the sum of the threads' parts */
            float v = 0.0f;
            for (int t = 0; t < nt; t++) v += b->sc[t].yacc[i];
            if (m->bf16) ((uint16_t *)y)[i] = moe_float_to_bf16(v);
            else ((float *)y)[i] = v;
        }
    }
}

int blas_loop_run(blas_loop *b, const bench_moe *m, void *y, int schedule) {
    const int threads = schedule == BLAS_EXPERTS_PARALLEL ? m->n_threads : 1;
    if (reserve(b, m, threads) != 0) return -1;
    if (schedule == BLAS_EXPERTS_PARALLEL) run_experts_parallel(b, m, y);
    else run_gemm_threads(b, m, y);
    return 0;
}
