/* moegen_cuda_launch.h — the host side of a generated CUDA forward: how the device workspace
 * is carved for S tokens and which kernels run, in which order, with which grids.
 *
 * Place in the pipeline: one home for two callers that launch the same kernels. The runtime
 * (runtime/cuda_backend.c: kernels compiled by NVRTC, launched through the driver API) and the
 * host-side forward inside every generated .cu (templates/cuda/host.cu.tpl: compiled by nvcc
 * for generate-and-link, launched with <<<>>> on the caller's stream) both compile this file
 * and walk the steps moegen_cuda_forward_steps gives. Plain C99 that is also valid C++; never
 * seen by NVRTC. `moegen gen --backend cuda` copies it beside the generated source.
 *
 * The launch contract (threads per block, problem groups, the argument struct) is in
 * moegen_cuda_abi.h; the tiles come from the variant the module was generated with.
 */
#ifndef MOEGEN_CUDA_LAUNCH_H
#define MOEGEN_CUDA_LAUNCH_H

#include <stddef.h>
#include <string.h>

#include "moegen_cuda_abi.h"

/* What the host side needs to know of a layer and its module. */
typedef struct moegen_cuda_layer {
    int num_experts, top_k;
    long long hidden, ffn;          /* H, F */
    int shared_count;               /* Ns */
    long long shared_ffn;           /* Fs (0 without shared experts) */
    int residual;                   /* DeepSpeed's residual MLP (use_residual) */
    int aux_loss;                   /* the spec reports a load-balancing loss (aux_probs is [S][E]) */
    int elem_bytes;                 /* bytes of one element of the layer dtype: 4, 2 */
    int tile_m, tile_n, warps_m, warps_n, router_tokens; /* the variant */
    int has_rank;                   /* the module has P_dispatch_rank (a ranking drop priority) */
    long long ffn_rows, shared_ffn_rows; /* F1, Fs1: rows of w1 (2F when gated) */
    int shared_gate;                /* the shared experts have a sigmoid gate */
} moegen_cuda_layer;

/* Byte offsets of every workspace buffer for one token count, each 256-byte aligned. */
typedef struct moegen_cuda_layout {
    size_t logits, aux_probs, aux_counts, lse_squared, route_expert, route_weight, route_valid;
    size_t route_kept, route_bucket, expert_count, expert_kept, bucket_offset, expert_offset;
    size_t row_token, row_scale, route_row, route_final, problems, group_tiles;
    size_t hidden, expert_out, shared_hidden, shared_out, residual_hidden, residual_out, stats;
    size_t total;
} moegen_cuda_layout;

/* The layout for S tokens and max_rows expert rows (S k, or E C when padded to capacity). */
static inline moegen_cuda_layout moegen_cuda_layout_for(const moegen_cuda_layer *l, long long S,
                                                        long long max_rows) {
    moegen_cuda_layout L;
    memset(&L, 0, sizeof L);
    const size_t E = (size_t)l->num_experts, routes = (size_t)S * (size_t)l->top_k;
    const size_t elem = (size_t)l->elem_bytes, H = (size_t)l->hidden, F = (size_t)l->ffn;
    const size_t Ns = (size_t)l->shared_count, Fs = (size_t)l->shared_ffn;
    const size_t rows = (size_t)max_rows, tokens = (size_t)S, residual = l->residual ? 1 : 0;
    size_t offset = 0;
#define MOEGEN_CARVE(field, bytes) (L.field = offset, offset += ((size_t)(bytes) + 255) & ~(size_t)255)
    MOEGEN_CARVE(logits, tokens * E * 4);
    MOEGEN_CARVE(aux_probs, l->aux_loss ? tokens * E * 4 : 4);
    MOEGEN_CARVE(aux_counts, E * 4);
    MOEGEN_CARVE(lse_squared, tokens * 8);
    MOEGEN_CARVE(route_expert, routes * 4);
    MOEGEN_CARVE(route_weight, routes * 4);
    MOEGEN_CARVE(route_valid, routes);
    MOEGEN_CARVE(route_kept, routes);
    MOEGEN_CARVE(route_bucket, routes * 4);
    MOEGEN_CARVE(expert_count, E * 8);
    MOEGEN_CARVE(expert_kept, E * 8);
    MOEGEN_CARVE(bucket_offset, (E + 1) * 8);
    MOEGEN_CARVE(expert_offset, (E + 1) * 8);
    MOEGEN_CARVE(row_token, rows * 4);
    MOEGEN_CARVE(row_scale, rows * 4);
    MOEGEN_CARVE(route_row, routes * 4);
    MOEGEN_CARVE(route_final, routes * 4);
    MOEGEN_CARVE(problems, (E + Ns + 1) * sizeof(moegen_cuda_problem));
    MOEGEN_CARVE(group_tiles, 3 * 4);
    MOEGEN_CARVE(hidden, rows * F * elem);
    MOEGEN_CARVE(expert_out, rows * H * 4);
    MOEGEN_CARVE(shared_hidden, Ns * tokens * Fs * elem);
    MOEGEN_CARVE(shared_out, Ns * tokens * H * 4);
    MOEGEN_CARVE(residual_hidden, residual * tokens * F * elem);
    MOEGEN_CARVE(residual_out, residual * tokens * H * 4);
    MOEGEN_CARVE(stats, 3 * 8); /* dropped routes, aux loss, z loss */
#undef MOEGEN_CARVE
    L.total = offset;
    return L;
}

/* Point a's workspace buffers and statistics into the device workspace at `base`. */
static inline void moegen_cuda_carve(const moegen_cuda_layout *L, char *base, moegen_cuda_args *a) {
    a->stat_dropped = (long long *)(base + L->stats);
    a->stat_aux_loss = (double *)(base + L->stats + 8);
    a->stat_z_loss = (double *)(base + L->stats + 16);
    a->logits = (float *)(base + L->logits);
    a->aux_probs = (float *)(base + L->aux_probs);
    a->aux_counts = (int *)(base + L->aux_counts);
    a->lse_squared = (double *)(base + L->lse_squared);
    a->route_expert = (int *)(base + L->route_expert);
    a->route_weight = (float *)(base + L->route_weight);
    a->route_valid = (unsigned char *)(base + L->route_valid);
    a->route_kept = (unsigned char *)(base + L->route_kept);
    a->route_bucket = (int *)(base + L->route_bucket);
    a->expert_count = (long long *)(base + L->expert_count);
    a->expert_kept = (long long *)(base + L->expert_kept);
    a->bucket_offset = (long long *)(base + L->bucket_offset);
    a->expert_offset = (long long *)(base + L->expert_offset);
    a->row_token = (int *)(base + L->row_token);
    a->row_scale = (float *)(base + L->row_scale);
    a->route_row = (int *)(base + L->route_row);
    a->route_final = (float *)(base + L->route_final);
    a->problems = (moegen_cuda_problem *)(base + L->problems);
    a->group_tiles = (int *)(base + L->group_tiles);
    a->hidden = base + L->hidden;
    a->expert_out = (float *)(base + L->expert_out);
    a->shared_hidden = base + L->shared_hidden;
    a->shared_out = (float *)(base + L->shared_out);
    a->residual_hidden = base + L->residual_hidden;
    a->residual_out = (float *)(base + L->residual_out);
}

/* The three problem groups of the grouped GEMM launches (routed experts, shared experts, the
 * residual MLP): problems [first, first + count) of the table, GEMM pair P_f<ffn>_gemm1/2. */
typedef struct moegen_cuda_group {
    int group, first, count;
    long long ffn;
} moegen_cuda_group;

static inline void moegen_cuda_groups(const moegen_cuda_layer *l, moegen_cuda_group groups[3]) {
    const int E = l->num_experts, Ns = l->shared_count;
    groups[0].group = MOEGEN_GROUP_ROUTED, groups[0].first = 0, groups[0].count = E, groups[0].ffn = l->ffn;
    groups[1].group = MOEGEN_GROUP_SHARED, groups[1].first = E, groups[1].count = Ns;
    groups[1].ffn = Ns > 0 ? l->shared_ffn : 0;
    groups[2].group = MOEGEN_GROUP_RESIDUAL, groups[2].first = E + Ns, groups[2].count = l->residual ? 1 : 0;
    groups[2].ffn = l->ffn;
}

/* One step of the forward: zero the aux-loss counts, or launch a kernel. */
enum moegen_cuda_step_kind {
    MOEGEN_CUDA_ZERO_AUX_COUNTS, /* aux_counts[E] = 0 (a memset on the stream) */
    MOEGEN_CUDA_ROUTER,
    MOEGEN_CUDA_DISPATCH_COUNT,
    MOEGEN_CUDA_DISPATCH_RANK,
    MOEGEN_CUDA_DISPATCH_PLACE,
    MOEGEN_CUDA_GEMM1, /* P_f<ffn>_gemm1(a, group, first, count) */
    MOEGEN_CUDA_GEMM2,
    MOEGEN_CUDA_COMBINE,
    MOEGEN_CUDA_LOSSES
};

typedef struct moegen_cuda_step {
    int kind;                      /* enum moegen_cuda_step_kind */
    unsigned grid_x, grid_y, threads;
    moegen_cuda_group group;       /* GEMM steps: the problem group (its index is group.group) */
} moegen_cuda_step;

/* Stages a caller runs (expert parallelism runs them apart, with row exchanges between). */
#define MOEGEN_CUDA_STAGE_ROUTE 1u   /* router and dispatch */
#define MOEGEN_CUDA_STAGE_GEMMS 2u   /* the grouped GEMMs of the groups in groups_mask */
#define MOEGEN_CUDA_STAGE_FINISH 4u  /* combine and losses */
#define MOEGEN_CUDA_STAGE_ALL 7u
#define MOEGEN_CUDA_MAX_STEPS 12

static inline unsigned moegen_cuda_ceil_div(long long a, long long b) { return (unsigned)((a + b - 1) / b); }

/* The m-tile bound of each problem group's GEMM launches (the grids' x), in TILE_M rows: a
 * group never uses more (routed: the sum of ceil(rows_e / TILE_M) is at most
 * rows / TILE_M + E); CTAs beyond the work dispatch wrote return at once. */
static inline void moegen_cuda_group_m_tiles(const moegen_cuda_layer *l, long long S, long long max_rows,
                                             unsigned m_tiles[3]) {
    m_tiles[0] = moegen_cuda_ceil_div(max_rows, l->tile_m) + (unsigned)l->num_experts;
    m_tiles[1] = (unsigned)l->shared_count * moegen_cuda_ceil_div(S, l->tile_m);
    m_tiles[2] = l->residual ? moegen_cuda_ceil_div(S, l->tile_m) : 0u;
}

/* The steps of the forward over S > 0 tokens, in launch order, into steps[MOEGEN_CUDA_MAX_STEPS];
 * returns their count. Groups without problems and grids of zero blocks are left out. */
static inline int moegen_cuda_forward_steps(const moegen_cuda_layer *l, long long S, long long max_rows,
                                            unsigned stages, unsigned groups_mask, moegen_cuda_step *steps) {
    int n = 0;
    moegen_cuda_step *s;
#define MOEGEN_STEP(k, gx, gy, t)                                                                        \
    (s = &steps[n], memset(s, 0, sizeof *s), s->kind = (k), s->grid_x = (gx), s->grid_y = (gy), s->threads = (t), \
     n += (s->grid_x > 0 && s->grid_y > 0) ? 1 : 0)
    if (stages & MOEGEN_CUDA_STAGE_ROUTE) {
        MOEGEN_STEP(MOEGEN_CUDA_ZERO_AUX_COUNTS, 1, 1, 0);
        MOEGEN_STEP(MOEGEN_CUDA_ROUTER, moegen_cuda_ceil_div(S, l->router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS);
        MOEGEN_STEP(MOEGEN_CUDA_DISPATCH_COUNT, 1, 1, MOEGEN_CUDA_DISPATCH_THREADS);
        if (l->has_rank)
            MOEGEN_STEP(MOEGEN_CUDA_DISPATCH_RANK, moegen_cuda_ceil_div(S * l->top_k, MOEGEN_CUDA_RANK_THREADS), 1,
                        MOEGEN_CUDA_RANK_THREADS);
        MOEGEN_STEP(MOEGEN_CUDA_DISPATCH_PLACE, 1, 1, MOEGEN_CUDA_DISPATCH_THREADS);
    }
    if (stages & MOEGEN_CUDA_STAGE_GEMMS) {
        moegen_cuda_group groups[3];
        moegen_cuda_groups(l, groups);
        unsigned m_tiles[3];
        moegen_cuda_group_m_tiles(l, S, max_rows, m_tiles);
        const unsigned threads = MOEGEN_CUDA_GEMM_THREADS((unsigned)l->warps_m, (unsigned)l->warps_n);
        for (int g = 0; g < 3; g++) {
            if (groups[g].count == 0 || !(groups_mask & (1u << g))) continue;
            MOEGEN_STEP(MOEGEN_CUDA_GEMM1, m_tiles[g], moegen_cuda_ceil_div(groups[g].ffn, l->tile_n), threads);
            s->group = groups[g];
            MOEGEN_STEP(MOEGEN_CUDA_GEMM2, m_tiles[g], moegen_cuda_ceil_div(l->hidden, l->tile_n), threads);
            s->group = groups[g];
        }
    }
    if (stages & MOEGEN_CUDA_STAGE_FINISH) {
        MOEGEN_STEP(MOEGEN_CUDA_COMBINE, (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS);
        MOEGEN_STEP(MOEGEN_CUDA_LOSSES, 1, 1, MOEGEN_CUDA_LOSS_THREADS);
    }
#undef MOEGEN_STEP
    return n;
}

/* ---- The training backward ------------------------------------------------------------------ */

/* Byte offsets of the backward's own device buffers (fp32) for S tokens, each 256-byte
 * aligned; the forward's workspace stays as the training forward left it. */
typedef struct moegen_cuda_backward_layout {
    size_t dw_final, dz, coef_dq, gate_dnu, row_do, row_pre, row_du;
    size_t shared_do, shared_pre, shared_du, residual_do, residual_pre, residual_du;
    size_t total;
} moegen_cuda_backward_layout;

static inline moegen_cuda_backward_layout moegen_cuda_backward_layout_for(const moegen_cuda_layer *l, long long S,
                                                                          long long max_rows) {
    moegen_cuda_backward_layout L;
    memset(&L, 0, sizeof L);
    const size_t E = (size_t)l->num_experts, tokens = (size_t)S, rows = (size_t)max_rows;
    const size_t H = (size_t)l->hidden, F1 = (size_t)l->ffn_rows, Ns = (size_t)l->shared_count;
    const size_t Fs1 = (size_t)l->shared_ffn_rows, residual = l->residual ? 1 : 0;
    size_t offset = 0;
#define MOEGEN_CARVE(field, bytes) (L.field = offset, offset += ((size_t)(bytes) + 255) & ~(size_t)255)
    MOEGEN_CARVE(dw_final, tokens * (size_t)l->top_k * 4);
    MOEGEN_CARVE(dz, tokens * E * 4);
    MOEGEN_CARVE(coef_dq, tokens * 2 * 4);
    MOEGEN_CARVE(gate_dnu, tokens * 4);
    MOEGEN_CARVE(row_do, rows * H * 4);
    MOEGEN_CARVE(row_pre, rows * F1 * 4);
    MOEGEN_CARVE(row_du, rows * H * 4);
    MOEGEN_CARVE(shared_do, Ns * tokens * H * 4);
    MOEGEN_CARVE(shared_pre, Ns * tokens * Fs1 * 4);
    MOEGEN_CARVE(shared_du, Ns * tokens * H * 4);
    MOEGEN_CARVE(residual_do, residual * tokens * H * 4);
    MOEGEN_CARVE(residual_pre, residual * tokens * F1 * 4);
    MOEGEN_CARVE(residual_du, residual * tokens * H * 4);
#undef MOEGEN_CARVE
    L.total = offset;
    return L;
}

/* Point b's buffers into the backward's device memory at `base`. */
static inline void moegen_cuda_backward_carve(const moegen_cuda_backward_layout *L, char *base,
                                              moegen_cuda_backward_args *b) {
    b->dw_final = (float *)(base + L->dw_final);
    b->dz = (float *)(base + L->dz);
    b->coef_dq = (float *)(base + L->coef_dq);
    b->gate_dnu = (float *)(base + L->gate_dnu);
    b->row_do = (float *)(base + L->row_do);
    b->row_pre = (float *)(base + L->row_pre);
    b->row_du = (float *)(base + L->row_du);
    b->shared_do = (float *)(base + L->shared_do);
    b->shared_pre = (float *)(base + L->shared_pre);
    b->shared_du = (float *)(base + L->shared_du);
    b->residual_do = (float *)(base + L->residual_do);
    b->residual_pre = (float *)(base + L->residual_pre);
    b->residual_du = (float *)(base + L->residual_du);
}

/* Steps of the backward (after the forward's, in the same enum). */
enum moegen_cuda_backward_step_kind {
    MOEGEN_CUDA_BWD_COMBINE = 100,
    MOEGEN_CUDA_BWD_PRE,     /* the four per-shape kernels, in this order: P_f<ffn>_bwd_pre, */
    MOEGEN_CUDA_BWD_DH,      /* _bwd_dh, _bwd_du and _bwd_weights (b, group, first, count) */
    MOEGEN_CUDA_BWD_DU,
    MOEGEN_CUDA_BWD_WEIGHTS,
    MOEGEN_CUDA_BWD_TOKENS,
    MOEGEN_CUDA_BWD_DENSE    /* P_bwd_dense_weights(b, which): which in group.group */
};

#define MOEGEN_CUDA_PHASE_DATA 1u    /* dx and the per-row gradients (moegen_layer_backward) */
#define MOEGEN_CUDA_PHASE_WEIGHTS 2u /* the weight gradients, from what the data phase left */
#define MOEGEN_CUDA_MAX_BACKWARD_STEPS 20

/* The steps of the backward phases over S > 0 tokens, in launch order; returns their count. */
static inline int moegen_cuda_backward_steps(const moegen_cuda_layer *l, long long S, long long max_rows,
                                             unsigned phases, moegen_cuda_step *steps) {
    int n = 0;
    moegen_cuda_step *s;
    moegen_cuda_group groups[3];
    moegen_cuda_groups(l, groups);
    unsigned m_tiles[3];
    moegen_cuda_group_m_tiles(l, S, max_rows, m_tiles);
#define MOEGEN_STEP(k, gx, gy, t)                                                                        \
    (s = &steps[n], memset(s, 0, sizeof *s), s->kind = (k), s->grid_x = (gx), s->grid_y = (gy), s->threads = (t), \
     n += (s->grid_x > 0 && s->grid_y > 0) ? 1 : 0)
    if (phases & MOEGEN_CUDA_PHASE_DATA) {
        MOEGEN_STEP(MOEGEN_CUDA_BWD_COMBINE, (unsigned)S, 1, MOEGEN_CUDA_BWD_TOKEN_THREADS);
        for (int g = 0; g < 3; g++) {
            if (groups[g].count == 0) continue;
            const long long f = groups[g].ffn, f1 = g == MOEGEN_GROUP_SHARED ? l->shared_ffn_rows : l->ffn_rows;
            const long long widths[3] = {f1, f, l->hidden};
            for (int i = 0; i < 3; i++) {
                MOEGEN_STEP(MOEGEN_CUDA_BWD_PRE + i, m_tiles[g], (unsigned)MOEGEN_CUDA_CEIL_DIV(widths[i], MOEGEN_CUDA_BWD_TILE),
                            MOEGEN_CUDA_BWD_GEMM_THREADS);
                s->group = groups[g];
            }
        }
        MOEGEN_STEP(MOEGEN_CUDA_BWD_TOKENS, (unsigned)S, 1, MOEGEN_CUDA_BWD_TOKEN_THREADS);
    }
    if (phases & MOEGEN_CUDA_PHASE_WEIGHTS) {
        for (int g = 0; g < 3; g++) {
            if (groups[g].count == 0) continue;
            const long long f = groups[g].ffn, f1 = g == MOEGEN_GROUP_SHARED ? l->shared_ffn_rows : l->ffn_rows;
            MOEGEN_STEP(MOEGEN_CUDA_BWD_WEIGHTS, (unsigned)MOEGEN_CUDA_BWD_WEIGHT_BLOCKS(l->hidden, f, f1),
                        (unsigned)groups[g].count, MOEGEN_CUDA_BWD_GEMM_THREADS);
            s->group = groups[g];
        }
        const int dense[3] = {MOEGEN_CUDA_DENSE_ROUTER, MOEGEN_CUDA_DENSE_COEF, MOEGEN_CUDA_DENSE_GATE};
        const long long rows[3] = {l->num_experts, l->residual ? 2 : 0, l->shared_count > 0 && l->shared_gate ? 1 : 0};
        for (int i = 0; i < 3; i++) {
            if (rows[i] == 0) continue;
            MOEGEN_STEP(MOEGEN_CUDA_BWD_DENSE, (unsigned)MOEGEN_CUDA_BWD_DENSE_BLOCKS(l->hidden, rows[i]), 1,
                        MOEGEN_CUDA_BWD_GEMM_THREADS);
            s->group.group = dense[i];
        }
    }
#undef MOEGEN_STEP
    return n;
}

#endif
