/* moegen_cuda_abi.h — the contract between the generated CUDA module and the runtime.
 *
 * Place in the pipeline: gen emits CUDA C++ against this header; NVRTC compiles it (the
 * runtime passes this file to NVRTC as an in-memory header); runtime/cuda_backend.c
 * fills a moegen_cuda_args with device pointers and launches the module's kernels, in
 * this order, on one stream (module prefix P; S tokens, k routes per token):
 *
 *   kernel            grid                            threads per block
 *   P_router          ceil(S / ROUTER_TOKENS)         MOEGEN_CUDA_ROUTER_THREADS
 *                     logits, scores, top-k, loss terms
 *   P_dispatch_count  1                               MOEGEN_CUDA_DISPATCH_THREADS
 *                     counts, per-expert order, position keeps
 *   P_dispatch_rank   ceil(S*k / RANK_THREADS)        MOEGEN_CUDA_RANK_THREADS
 *                     priority rank inside over-full experts; optional: only the
 *                     modules whose drop priority ranks routes (probs, random) have it
 *   P_dispatch_place  1                               MOEGEN_CUDA_DISPATCH_THREADS
 *                     rows, offsets, weights, GEMM problem table
 *   P_<shape>_gemm1   (m tiles bound, n tiles)        MOEGEN_CUDA_GEMM_THREADS(warps)
 *                     GEMM1 + activation -> hidden, one launch per problem group
 *   P_<shape>_gemm2   (m tiles bound, n tiles)        MOEGEN_CUDA_GEMM_THREADS(warps)
 *                     GEMM2 + bias -> expert_out (fp32)
 *   P_combine         S                               MOEGEN_CUDA_COMBINE_THREADS
 *                     y = weighted sum + residual + shared
 *   P_losses          1                               MOEGEN_CUDA_LOSS_THREADS
 *                     aux loss, z loss, dropped routes
 *   P_ep_pack         rows to send                    MOEGEN_CUDA_EP_PACK_THREADS
 *                     expert parallelism only (runtime/ep.c): the kept rows a rank
 *                     sends, gathered from x in the permutation's order
 *
 * The training backward (moegen_cuda_backward_args; the forward ran into the same workspace):
 *
 *   P_bwd_combine           S                          MOEGEN_CUDA_BWD_TOKEN_THREADS
 *                           d loss / d expert outputs, combine weights, coefficients
 *   P_<shape>_bwd_pre       (m tiles bound, ceil(F1 / BWD_TILE))   MOEGEN_CUDA_BWD_GEMM_THREADS
 *   P_<shape>_bwd_dh        (m tiles bound, ceil(F / BWD_TILE))    per problem group, as the
 *   P_<shape>_bwd_du        (m tiles bound, ceil(H / BWD_TILE))    forward's GEMMs
 *   P_bwd_tokens            S                          MOEGEN_CUDA_BWD_TOKEN_THREADS
 *                           the router's backward, dx
 *   ---- weight gradients (moegen_layer_backward with grads, or backward_weights later) ----
 *   P_<shape>_bwd_weights   (MOEGEN_CUDA_BWD_WEIGHT_BLOCKS(H, F, F1), problems)
 *   P_bwd_dense_weights     (MOEGEN_CUDA_BWD_DENSE_BLOCKS(H, M), 1), once per dense tensor
 *                           (router: M = E; residual coefficient: 2; shared gate: 1)
 *
 * <shape> is "f<ffn size>": the routed experts and the residual MLP use f<F>, shared
 * experts f<Fs> (one pair of kernels when Fs == F). ROUTER_TOKENS, the GEMM tiles and the
 * GEMM warps come from the variant (gen/variant.h), which the runtime reads from the
 * generated result (moegen_generated.variant), never re-derives.
 *
 * Which kernels a module has is decided once, by the templates: the runtime looks every
 * kernel up by name and treats CUDA_ERROR_NOT_FOUND as "absent" for the optional ones
 * (P_dispatch_rank), as an error for the others.
 *
 * Every threads-per-block count below is the single home of that number: the kernels'
 * __launch_bounds__ and loops use it, and the runtime launches with it. No kernel uses
 * dynamic shared memory (every __shared__ array is static and sized at compile time,
 * within the 48 KiB static limit moegen_variant_check enforces for the GEMM tiles), so
 * every launch passes MOEGEN_CUDA_DYNAMIC_SHARED_BYTES.
 *
 * Every launch has a grid of at least one block; CTAs beyond the work the dispatch
 * wrote (an expert with fewer rows than the bound) return at once. The capacity C is
 * computed on the host from S (moegen_spec_capacity) and passed in; no kernel needs a
 * host round trip, so the whole forward can be captured in a CUDA graph.
 *
 * Note: when the launch constants were moved here (one home for runtime and kernels),
 * there was no GPU at hand: the kernels were compiled with NVRTC (test_nvrtc) and the
 * launch sequence checked against a fake driver (test_cuda_backend), not run.
 */
#ifndef MOEGEN_CUDA_ABI_H
#define MOEGEN_CUDA_ABI_H

#include "moegen_kernel_abi.h"

#define MOEGEN_CUDA_ABI_VERSION 1

/* Threads per block of each kernel (see the table above). */
#define MOEGEN_CUDA_WARP_THREADS 32
#define MOEGEN_CUDA_ROUTER_THREADS 256   /* P_router: 8 warps, one token per warp at a time */
#define MOEGEN_CUDA_DISPATCH_THREADS 512 /* P_dispatch_count and P_dispatch_place */
#define MOEGEN_CUDA_RANK_THREADS 256     /* P_dispatch_rank: one thread per route */
#define MOEGEN_CUDA_COMBINE_THREADS 128  /* P_combine: one block per token */
#define MOEGEN_CUDA_LOSS_THREADS 256     /* P_losses: a power of two (fixed reduction tree) */
#define MOEGEN_CUDA_EP_PACK_THREADS 128  /* P_ep_pack: one block per row */
#define MOEGEN_CUDA_BWD_TOKEN_THREADS 128 /* P_bwd_combine, P_bwd_tokens: one block per token,
                                              a power of two (fixed reduction tree) */
#define MOEGEN_CUDA_BWD_GEMM_THREADS 256  /* the backward's GEMM kernels: 16 x 16 threads */
#define MOEGEN_CUDA_BWD_TILE 64           /* rows and columns of C per backward GEMM block */
/* P_<shape>_gemm1 / _gemm2: one warp per warp tile of the variant (warps_m x warps_n). */
#define MOEGEN_CUDA_GEMM_THREADS(warps_m, warps_n) (MOEGEN_CUDA_WARP_THREADS * (warps_m) * (warps_n))

/* Dynamic shared memory of every launch, in bytes (all shared memory is static). */
#define MOEGEN_CUDA_DYNAMIC_SHARED_BYTES 0

#define MOEGEN_CUDA_CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
/* Blocks of BWD_TILE x BWD_TILE covering an m x n matrix. */
#define MOEGEN_CUDA_BWD_TILES(m, n) (MOEGEN_CUDA_CEIL_DIV(m, MOEGEN_CUDA_BWD_TILE) * MOEGEN_CUDA_CEIL_DIV(n, MOEGEN_CUDA_BWD_TILE))
/* P_<shape>_bwd_weights blocks per problem: dW1 [F1][H] tiles, dW2 [H][F] tiles, then one
 * thread per bias column (F1 + H). */
#define MOEGEN_CUDA_BWD_WEIGHT_BLOCKS(h, f, f1)                                              \
    (MOEGEN_CUDA_BWD_TILES(f1, h) + MOEGEN_CUDA_BWD_TILES(h, f) +                           \
     MOEGEN_CUDA_CEIL_DIV((f1) + (h), MOEGEN_CUDA_BWD_GEMM_THREADS))
/* P_bwd_dense_weights blocks for a tensor of m rows: tiles of [m][H], then its bias columns. */
#define MOEGEN_CUDA_BWD_DENSE_BLOCKS(h, m) (MOEGEN_CUDA_BWD_TILES(m, h) + MOEGEN_CUDA_CEIL_DIV(m, MOEGEN_CUDA_BWD_GEMM_THREADS))
/* P_bwd_dense_weights `which` */
#define MOEGEN_CUDA_DENSE_ROUTER 0
#define MOEGEN_CUDA_DENSE_COEF 1
#define MOEGEN_CUDA_DENSE_GATE 2

/* Problem groups of the grouped GEMM launches. */
#define MOEGEN_GROUP_ROUTED 0
#define MOEGEN_GROUP_SHARED 1
#define MOEGEN_GROUP_RESIDUAL 2

/* One expert applied to a run of rows. Written by P_dispatch_place. */
typedef struct moegen_cuda_problem {
    long long row_start;   /* first row in the group's hidden / out buffers */
    long long n_rows;
    int tile_start;        /* first m tile of this problem within its group's launch */
    int weight_index;      /* expert e, shared expert i, or 0 for the residual MLP */
} moegen_cuda_problem;

typedef struct moegen_cuda_args {
    long long n_tokens;
    long long capacity;            /* -1 when dropless */
    long long max_rows;            /* rows the routed group may use (S*k, or E*C when padded) */
    unsigned long long rng_offset;

    const void *x;                 /* [S][H] */
    moegen_kernel_weights w;       /* device pointers, layouts as in moegen_kernel_abi.h */

    /* Outputs (device; NULL = not wanted, except y). */
    void *y;
    int *topk_ids;
    float *topk_weights;
    float *router_weights;
    long long *counts_before;
    long long *counts_after;
    long long *stat_dropped;       /* [1] routes dropped */
    double *stat_aux_loss;         /* [1] */
    double *stat_z_loss;           /* [1] */

    /* Workspace (device). */
    float *logits;                 /* [S][E] sanitized logits */
    float *aux_probs;              /* [S][E] aux-loss probabilities (aux loss only) */
    int *aux_counts;               /* [E] aux-loss route counts (zeroed before P_router) */
    double *lse_squared;           /* [S] */
    int *route_expert;             /* [S][k] */
    float *route_weight;           /* [S][k] router weights */
    unsigned char *route_valid;    /* [S][k] */
    unsigned char *route_kept;     /* [S][k] */
    int *route_bucket;             /* [S][k] routes ordered by expert, token-major inside */
    long long *expert_count;       /* [E] valid routes per expert */
    long long *expert_kept;        /* [E] kept routes per expert */
    long long *bucket_offset;      /* [E + 1] exclusive prefix of expert_count */
    long long *expert_offset;      /* [E + 1] first row of each expert */
    int *row_token;                /* [max_rows] token of each row, -1 = padding */
    float *row_scale;              /* [max_rows] input scale (weight_on_input) */
    int *route_row;                /* [S][k] row of each route, -1 = dropped / invalid */
    float *route_final;            /* [S][k] combine weights */
    moegen_cuda_problem *problems; /* [E + SHARED + 1]: routed, shared, residual */
    int *group_tiles;              /* [3] m tiles each group uses */
    void *hidden;                  /* [max_rows][F] layer dtype */
    float *expert_out;             /* [max_rows][H] */
    void *shared_hidden;           /* [Ns][S][Fs] */
    float *shared_out;             /* [Ns][S][H] */
    void *residual_hidden;         /* [S][F] */
    float *residual_out;           /* [S][H] */
} moegen_cuda_args;

/* The training backward's arguments: the training forward's (its workspace holds the
 * routing, the rows, the activations and the expert outputs) and the backward's own device
 * buffers (fp32), carved by moegen_cuda_backward_layout_for. */
typedef struct moegen_cuda_backward_args {
    moegen_cuda_args f;
    const void *dy;                /* [S][H] layer dtype */
    void *dx;                      /* [S][H] layer dtype, or NULL */
    double aux_coeff;              /* the loss is sum(dy . y) + aux_coeff aux_loss + z_coeff z_loss */
    float z_coeff;
    int accumulate;                /* weight gradients: 1 adds into grads, 0 overwrites */
    moegen_kernel_grads grads;     /* device, fp32; NULL = not wanted */
    float *dw_final;               /* [S][k] d loss / d combine weight */
    float *dz;                     /* [S][E] d loss / d logit */
    float *coef_dq;                /* [S][2] residual coefficient logits */
    float *gate_dnu;               /* [S] shared gate logit */
    float *row_do, *row_pre, *row_du;                /* [max_rows][H], [max_rows][F1], [max_rows][H] */
    float *shared_do, *shared_pre, *shared_du;       /* [Ns][S][H], [Ns][S][Fs1], [Ns][S][H] */
    float *residual_do, *residual_pre, *residual_du; /* [S][H], [S][F1], [S][H] */
} moegen_cuda_backward_args;

#endif
