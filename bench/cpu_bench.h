/* cpu_bench.h — what the CPU benchmark worker (bench/cpu_bench.c) hands to its anchors: one
 * MoE layer's tensors and the routing moegen chose for one token count.
 *
 * The anchors compute the same layer as moegen does, with moegen's routing, so that their
 * outputs can be checked against moegen's y before their times are compared:
 *   bench/cpu_bench_blas.c  a per-expert loop over OpenBLAS (sgemm / sgemv, sbgemm when present);
 *   bench/cpu_bench_ggml.c  ggml's MUL_MAT_ID graph as llama.cpp builds it for a MoE FFN.
 * Both also compute the router logits and a top-k (timed like the rest of the forward); the
 * experts are dispatched by moegen's topk_ids / topk_weights. Layouts are those of
 * templates/common/moegen_kernel_abi.h; only fp32 and bf16 layers are benchmarked.
 */
#ifndef MOEGEN_BENCH_CPU_BENCH_H
#define MOEGEN_BENCH_CPU_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "spec.h"

typedef struct bench_moe {
    /* the layer */
    int E, k;
    int64_t H, F, F1;          /* F1 = 2F for gated activations (gate rows first, then up) */
    moegen_activation act;
    int bf16;                  /* 1: bf16 storage; 0: fp32 */
    int norm_topk_prob;        /* the router renormalizes its top-k weights */
    int n_shared;              /* shared experts, each of Fs (F1s rows in its W1) */
    int64_t Fs, F1s;
    const float *router_w;     /* [E][H] fp32 */
    const void *w1, *w2;       /* [E][F1][H], [E][H][F] */
    const void *shared_w1, *shared_w2; /* [n_shared][F1s][H], [n_shared][H][Fs] */
    const float *shared_gate;  /* [H] fp32, or NULL: the shared output is added with weight 1 */
    /* this call */
    int64_t S;
    int n_threads;
    const void *x;             /* [S][H] layer dtype */
    const int32_t *ids;        /* [S][k] moegen's experts */
    const float *weights;      /* [S][k] moegen's combine weights; 0 for a dropped route */
} bench_moe;

/* ---- numerics shared by the anchors -------------------------------------------------------- */

static inline float bench_bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
/* The activation of numerics.md §3 on a (gated: act(gate) * up). */
float bench_act(moegen_activation act, float gate, float up);

/* ---- the per-expert OpenBLAS loop (cpu_bench_blas.c) ------------------------------------------ */

typedef struct blas_loop blas_loop;

/* Whether this OpenBLAS exports cblas_sbgemm (else bf16 layers need fp32 weight copies). */
int blas_loop_has_sbgemm(void);

/* Buffers for up to max_S tokens. bf16 layers use cblas_sbgemm when this OpenBLAS exports it;
 * otherwise their weights are converted to fp32 copies here, once (how: *bf16_mode). Returns
 * NULL with a reason in why[]. */
blas_loop *blas_loop_create(const bench_moe *m, int64_t max_S, const char **bf16_mode, char *why, size_t why_size);
/* The two schedules of the loop on T > 1 threads (cpu_bench_blas.c says what they do). */
enum { BLAS_GEMM_THREADS = 0, BLAS_EXPERTS_PARALLEL = 1 };
const char *blas_schedule_name(int schedule);

/* One forward of m (its S, threads, x and routing) into y ([S][H] layer dtype). 0, or -1 when
 * the buffers of that many threads cannot be allocated. */
int blas_loop_run(blas_loop *b, const bench_moe *m, void *y, int schedule);
void blas_loop_free(blas_loop *b);

/* ---- ggml's MUL_MAT_ID (cpu_bench_ggml.c; a stub when ggml was not built) --------------------- */

typedef struct ggml_moe ggml_moe;

/* Build the graph for m's S and threads. The layer's x is converted to the fp32 activations
 * ggml takes (outside the timed part, as llama.cpp's activations are fp32). NULL with a reason
 * when ggml is missing or fails. */
ggml_moe *ggml_moe_create(const bench_moe *m, char *why, size_t why_size);
/* ggml_graph_compute only: the timed part. 0, or -1 when ggml reports a failure. */
int ggml_moe_run(ggml_moe *g);
/* y [S][H] fp32 of the last run. */
const float *ggml_moe_output(const ggml_moe *g);
void ggml_moe_free(ggml_moe *g);
/* "ggml 0.x.y" or why there is none. */
const char *ggml_moe_version(void);

#endif
