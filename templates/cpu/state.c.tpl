% -- state.c.tpl — the per-call state every stage reads and writes: pointers into the
% -- caller's tensors and into the workspace (carved by workspace_layout in entry.c.tpl).
% local moe = import("templates/lib/moe.lua")
/* ---- Per-call state ------------------------------------------------------------------- */

/* A route is (token t, slot j), stored at index t * TOP_K + j. A row is one route's
 * place in the expert-contiguous order: expert e owns rows
 * [expert_offset[e], expert_offset[e + 1]). */
typedef struct forward_state {
    int64_t n_tokens;
    int64_t n_router_blocks;
    uint64_t rng_offset;
    const elem_t *x;                  /* [S][HIDDEN] */
    const uint8_t *used_token;        /* [S] or NULL: 0 = a padding token (numerics §9) */
    const moegen_kernel_weights *w;

    /* Stage 1, router */
    float *router_input;              /* [S][HIDDEN] fp32 router input */
    float *logits;                    /* [S][NUM_EXPERTS] sanitized logits */
    int32_t *route_expert;            /* [S][TOP_K] */
    float *route_weight;              /* [S][TOP_K] router weights */
    uint8_t *route_valid;             /* [S][TOP_K] 0 = filled slot (no valid expert left), or
                                         a padding token's route: never counted or dispatched */
    double *block_prob_sums;          /* [blocks][NUM_EXPERTS] aux-loss partial sums */
    int64_t *block_counts;            /* [blocks][NUM_EXPERTS] aux-loss partial counts */
    double *block_z_sums;             /* [blocks] z-loss partial sums */

    /* Stage 2, dispatch */
    int64_t *counts_before;           /* [NUM_EXPERTS] */
    int64_t *counts_after;            /* [NUM_EXPERTS] */
    int64_t *expert_offset;           /* [NUM_EXPERTS + 1] */
    int32_t *row_token;               /* [rows] token of each row; -1 = padding */
    float *row_scale;                 /* [rows] input scale (weight_on_input) */
    int32_t *route_row;               /* [S][TOP_K] row of each route; -1 = dropped / invalid */
    float *route_final;               /* [S][TOP_K] combine weight; 0 = dropped / invalid */
    struct priority_entry *scratch;   /* [S * TOP_K] */
    int64_t capacity;                 /* -1 = dropless */
    int64_t n_rows;
    int64_t n_dropped;

    /* Stage 3, experts */
    elem_t *hidden;                   /* [rows][FFN] activations, rounded to the layer dtype */
    float *expert_out;                /* [rows][HIDDEN] */
% if moe.packs_rows(variant) then
    void *pack_scratch;               /* the packed token rows (amx.c.tpl, outer.c.tpl) */
% end
% if spec.shared.count > 0 then
    elem_t *shared_hidden;            /* [SHARED_EXPERTS][S][SHARED_FFN] */
    float *shared_out;                /* [SHARED_EXPERTS][S][HIDDEN] */
% end
% if spec.use_residual then
    elem_t *residual_hidden;          /* [S][FFN] */
    float *residual_out;              /* [S][HIDDEN] */
% end

    double aux_loss;
    double z_loss;
    struct route_summary *summary;    /* in the workspace: what P_route leaves for P_combine */

    /* Training with kept activations (args->train_keep): where GEMM1 writes the
     * pre-activations, in the backward's workspace (backward.c.tpl); NULL otherwise. */
    float *keep_routed;               /* [rows][FFN_ROWS] */
    float *keep_shared;               /* [SHARED_EXPERTS][S][SHARED_FFN_ROWS] */
    float *keep_residual;             /* [S][FFN_ROWS] */
} forward_state;

/* The keep_* pointers of st from args->train_keep (backward.c.tpl owns that layout). */
static void keep_pointers(const moegen_kernel_args *args, forward_state *st);

/* The scalars of a routing, kept in the workspace between P_route and P_combine. */
typedef struct route_summary {
    int64_t capacity, n_rows, n_dropped;
    double aux_loss, z_loss;
} route_summary;

/* Capacity priority sort record: key descending, then token ascending. */
struct priority_entry {
    float key;
    int32_t token;
    int32_t route;
};

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Row `first + j` of a tile whose rows must stay below `end`. The micro-kernels always read
 * whole tiles: a tile that overhangs `end` repeats its last real row there, so every pointer
 * stays inside the matrix, and the caller stores only the real rows' results. Every tile's
 * row pointers (weights, tokens, activations; forward and backward) are taken through it. */
static inline int64_t tile_row(int64_t first, int64_t j, int64_t end) { return min_i64(first + j, end - 1); }

