% -- backward.c.tpl — the training backward (docs/numerics.md §8): the exact gradients of
% -- sum(dy . y) + aux_coeff * aux_loss + z_coeff * z_loss with respect to x and every weight,
% -- from the workspace a P_forward call left. Two exported phases, as Megatron splits them:
% --   P_backward_data:    per-token and per-row gradients and dx (token pass A, then per FFN
% --                       shape: GEMM1 recomputed with its pre-activations kept, dh = do W2
% --                       with the activation's derivative in its epilogue, du = da W1; then
% --                       token pass B: the router's backward and dx);
% --   P_backward_weights: the weight gradients as sums over rows, from what the first left.
% -- Every output element is one sequential sum in a fixed order (rows in row order, tokens in
% -- token order), so gradients do not depend on the thread count.
% local moe = import("templates/lib/moe.lua")
% local r = spec.router
% local softmax = r.score_function == "softmax"
% local aux = moe.aux_kind(spec)
% local gated = spec.gated
% local elem = moe.elem_type(spec.dtype)
% local load_elem = moe.load_name(elem, spec.dtype)
% local mr = variant.cpu.vector_floats == 16 and 8 or 4
% local splat = "{" .. string.rep("s, ", variant.cpu.vector_floats - 1) .. "s}" -- a broadcast
% local P = gen.prefix
/* ---- Training: the backward pass ------------------------------------------------------ */

/* Outer-product micro-kernels: a BWD_MR x (NV * VEC_FLOATS) tile of
 * C[i][n] += sum_k a_i[k * a_step] * B_k[n], B_k = row (b_index ? b_index[k] : k) of B (the
 * layer dtype, or fp32: a packed panel), times b_scale[k] when given, into the accumulators
 * `out` holds. a_step 1 reads A rows (C = A B); a_step = lda reads A columns
 * (C = A^T B, the weight gradients). One sum per element, k ascending (a sum split over
 * calls continues the same chain). */
#define BWD_MR ${mr}
#define BWD_TASK_ROWS (4 * BWD_MR)           /* rows of C per parallel task */
#define AMX_BWD_ROWS 64                      /* ... on AMX tiles (amx_backward.c.tpl) */
#define BWD_TASK_COLS (16 * VEC_FLOATS)      /* columns of C per parallel task */
#define BWD_KC 128                           /* k per packed B panel */
% for _, bt in ipairs({{ tag = "f", ctype = "float", load = "load_f32" }}) do
%   for _, nv in ipairs({2, 1}) do

static __attribute__((noinline, unused)) void outer_${bt.tag}_v${nv}(const float *const a[BWD_MR], int64_t a_step,
        int64_t n_k, const ${bt.ctype} *b, int64_t ldb, const int32_t *b_index, const float *b_scale,
        vfloat out[BWD_MR][${nv}]) {
%     for i = 0, mr - 1 do
%       local names = {}
%       for v = 0, nv - 1 do names[#names + 1] = "c" .. i .. v .. " = out[" .. i .. "][" .. v .. "]" end
    vfloat ${table.concat(names, ", ")};
%     end
    for (int64_t k = 0; k < n_k; k++) {
        const ${bt.ctype} *row = b + (b_index ? (int64_t)b_index[k] : k) * ldb;
%     for v = 0, nv - 1 do
        vfloat w${v} = ${bt.load}(row + ${v} * VEC_FLOATS);
%     end
        if (b_scale) {
%     for v = 0, nv - 1 do
            w${v} = w${v} * b_scale[k];
%     end
        }
%     for i = 0, mr - 1 do
        {
            const float s = a[${i}][k * a_step];
            const vfloat x = ${splat};
%       for v = 0, nv - 1 do
            c${i}${v} += x * w${v};
%       end
        }
%     end
    }
%     for i = 0, mr - 1 do
%       for v = 0, nv - 1 do
    out[${i}][${v}] = c${i}${v};
%       end
%     end
}
%   end
% end

/* What receives a finished row of a tile of C: `n` values of row m from column c. */
typedef void (*tile_store_fn)(void *ctx, int64_t m, int64_t c, const float *values, int n);

static void store_plain(void *ctx, int64_t m, int64_t c, const float *values, int n);

% for _, bt in ipairs({{ tag = "e", ctype = "elem_t", load = load_elem }, { tag = "f", ctype = "float", load = "load_f32" }}) do
/* outer_block for at most BWD_MR rows of C: k outermost, B's row k read once, contiguously,
 * across every column, the rows' accumulators (at most BWD_MR x BWD_TASK_COLS) in L1. The
 * sum per element is the same k-ascending chain as the tiles'. */
static __attribute__((unused)) void outer_rows_${bt.tag}(const float *a, int64_t a_row, int64_t a_step, int64_t m0,
        int rows, int64_t c0, int64_t c1, int64_t n_k, const ${bt.ctype} *b, int64_t ldb,
        const int32_t *b_index, const float *b_scale, tile_store_fn store, void *ctx) {
    vfloat acc[BWD_MR][BWD_TASK_COLS / VEC_FLOATS];
    const int n_vectors = (int)((c1 - c0) / VEC_FLOATS);
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < n_k; k++) {
        const ${bt.ctype} *row = b + (b_index ? (int64_t)b_index[k] : k) * ldb + c0;
        float scale[BWD_MR];
        for (int i = 0; i < rows; i++) scale[i] = a[(m0 + i) * a_row + k * a_step];
        for (int v = 0; v < n_vectors; v++) {
            vfloat w = ${bt.load}(row + v * VEC_FLOATS);
            if (b_scale) w = w * b_scale[k];
            for (int i = 0; i < rows; i++) {
                const float s = scale[i];
                const vfloat x = ${splat};
                acc[i][v] += x * w;
            }
        }
    }
    for (int i = 0; i < rows; i++) {
        float values[BWD_TASK_COLS];
        memcpy(values, acc[i], (size_t)n_vectors * sizeof(vfloat));
        for (int v = 0; v < n_vectors; v += 2) /* in the tiles' column groups */
            store(ctx, m0 + i, c0 + v * VEC_FLOATS, values + v * VEC_FLOATS,
                  (v + 1 < n_vectors ? 2 : 1) * VEC_FLOATS);
    }
}

/* C = sum over k of A's k-th values times B's row k, for rows [m0, m0 + rows) of C (at most
 * BWD_TASK_ROWS) and columns [c0, c1) (multiples of VEC_FLOATS); row i of C reads A at
 * a + (m0 + i) * a_row + k * a_step (C = A B: a_row = lda, a_step = 1; C = A^T B, the weight
 * gradients: a_row = 1, a_step = lda). B's row k is row b_index[k] (or k) of b, times
 * b_scale[k] when given. B's rows k0 .. k0 + BWD_KC are packed, each read front to back across
 * [c0, c1), into fp32 panels of two vectors' columns (one L1-sized panel per column tile,
 * widened once); every row tile then streams each panel, and the accumulators carry over
 * from chunk to chunk. (Packing one column tile at a time read 128 bytes of each of 256 rows
 * far apart, and waited on memory.) `store` receives each finished row. */
static __attribute__((unused)) void outer_block_${bt.tag}(const float *a, int64_t a_row, int64_t a_step,
        int64_t m0, int64_t rows, int64_t c0, int64_t c1, int64_t n_k, const ${bt.ctype} *b, int64_t ldb,
        const int32_t *b_index, const float *b_scale, tile_store_fn store, void *ctx) {
    if (rows <= BWD_MR) { /* one row tile reads B once: stream B's rows, nothing to pack */
        outer_rows_${bt.tag}(a, a_row, a_step, m0, (int)rows, c0, c1, n_k, b, ldb, b_index, b_scale, store, ctx);
        return;
    }
    enum { MAX_COL_TILES = BWD_TASK_COLS / (2 * VEC_FLOATS) };
    /* column tile j: the two vectors of columns from c0 + 2 * VEC_FLOATS * j (one vector for an
     * odd last); its panel [kc][its width] */
    float panel[MAX_COL_TILES][BWD_KC * 2 * VEC_FLOATS] __attribute__((aligned(64)));
    vfloat tile[MAX_COL_TILES][BWD_TASK_ROWS / BWD_MR][BWD_MR][2];
    const int n_vectors = (int)((c1 - c0) / VEC_FLOATS);
    const int n_col_tiles = (n_vectors + 1) / 2;
    const int n_tiles = (int)((rows + BWD_MR - 1) / BWD_MR);
    for (int64_t k0 = 0; k0 == 0 || k0 < n_k; k0 += BWD_KC) { /* once when n_k is 0: C = 0 */
        const int64_t kc = min_i64(BWD_KC, n_k - k0);
        const int last = k0 + kc == n_k;
        for (int64_t k = 0; k < kc; k++) {
            const ${bt.ctype} *row = b + (b_index ? (int64_t)b_index[k0 + k] : k0 + k) * ldb + c0;
            for (int v = 0; v < n_vectors; v++) {
                vfloat w = ${bt.load}(row + v * VEC_FLOATS);
                if (b_scale) w = w * b_scale[k0 + k];
                const int width = (v | 1) < n_vectors ? 2 * VEC_FLOATS : VEC_FLOATS; /* its tile's */
                memcpy(panel[v / 2] + k * width + (v % 2) * VEC_FLOATS, &w, sizeof w);
            }
        }
        /* a column tile's accumulators are zeroed at the first chunk and stored after the
         * last, so with one chunk only one column tile's are live at a time */
        for (int j = 0; j < n_col_tiles; j++) {
            const int nv = 2 * j + 1 < n_vectors ? 2 : 1, width = nv * VEC_FLOATS;
            if (k0 == 0) memset(tile[j], 0, sizeof tile[j]);
            for (int t = 0; t < n_tiles; t++) {
                const int64_t m = m0 + (int64_t)t * BWD_MR;
                const int valid = (int)min_i64(BWD_MR, m0 + rows - m);
                const float *ap[BWD_MR];
                for (int i = 0; i < BWD_MR; i++) ap[i] = a + tile_row(m, i, m0 + rows) * a_row + k0 * a_step;
                if (nv == 2)
                    outer_f_v2(ap, a_step, kc, panel[j], width, NULL, NULL, tile[j][t]);
                else
                    outer_f_v1(ap, a_step, kc, panel[j], width, NULL, NULL, (vfloat(*)[1])tile[j][t]);
                if (!last) continue;
                for (int i = 0; i < valid; i++) {
                    float values[2 * VEC_FLOATS];
                    if (nv == 2) {
                        memcpy(values, &tile[j][t][i][0], sizeof(vfloat));
                        memcpy(values + VEC_FLOATS, &tile[j][t][i][1], sizeof(vfloat));
                    } else {
                        memcpy(values, (char *)tile[j][t] + (size_t)i * sizeof(vfloat), sizeof(vfloat));
                    }
                    store(ctx, m + i, c0 + 2 * VEC_FLOATS * j, values, width);
                }
            }
        }
    }
}

% end

/* ---- Backward state --------------------------------------------------------------------- */

/* What P_backward_data leaves for P_backward_weights. */
typedef struct backward_summary {
    uint64_t magic; /* BACKWARD_DATA_DONE once P_backward_data has run */
    int64_t n_tokens, n_rows;
} backward_summary;
#define BACKWARD_DATA_DONE 0x6d6f6567656e6277ull

typedef struct backward_layout {
    size_t dw_final, dz, coef_dq, gate_dnu;
    size_t row_do, row_h, row_pre, row_du;
    size_t shared_do, shared_h, shared_pre, shared_du;
    size_t residual_do, residual_h, residual_pre, residual_du;
    size_t summary, total;
} backward_layout;

static backward_layout backward_layout_for(int64_t n_tokens) {
    backward_layout layout;
    memset(&layout, 0, sizeof layout);
    const size_t tokens = (size_t)n_tokens;
    const size_t rows = (size_t)max_rows_for(n_tokens);
    size_t offset = 0;
#define CARVE(field, bytes) (layout.field = offset, offset += ((size_t)(bytes) + 63) & ~(size_t)63)
    CARVE(dw_final, tokens * TOP_K * sizeof(float));
    CARVE(dz, tokens * NUM_EXPERTS * sizeof(float));
    CARVE(coef_dq, tokens * 2 * sizeof(float));
    CARVE(gate_dnu, tokens * sizeof(float));
    CARVE(row_do, rows * HIDDEN * sizeof(float));
    CARVE(row_h, rows * FFN * sizeof(elem_t));
    CARVE(row_pre, rows * FFN_ROWS * sizeof(float));
    CARVE(row_du, rows * HIDDEN * sizeof(float));
% if spec.shared.count > 0 then
    CARVE(shared_do, (size_t)SHARED_EXPERTS * tokens * HIDDEN * sizeof(float));
    CARVE(shared_h, (size_t)SHARED_EXPERTS * tokens * SHARED_FFN * sizeof(elem_t));
    CARVE(shared_pre, (size_t)SHARED_EXPERTS * tokens * SHARED_FFN_ROWS * sizeof(float));
    CARVE(shared_du, (size_t)SHARED_EXPERTS * tokens * HIDDEN * sizeof(float));
% end
% if spec.use_residual then
    CARVE(residual_do, tokens * HIDDEN * sizeof(float));
    CARVE(residual_h, tokens * FFN * sizeof(elem_t));
    CARVE(residual_pre, tokens * FFN_ROWS * sizeof(float));
    CARVE(residual_du, tokens * HIDDEN * sizeof(float));
% end
    CARVE(summary, sizeof(backward_summary));
#undef CARVE
    layout.total = offset;
    return layout;
}

static void keep_pointers(const moegen_kernel_args *args, forward_state *st) {
    st->keep_routed = st->keep_shared = st->keep_residual = NULL;
    if (!args->train_keep) return;
    const backward_layout layout = backward_layout_for(args->n_tokens);
    char *base = args->train_keep;
    st->keep_routed = (float *)(base + layout.row_pre);
% if spec.shared.count > 0 then
    st->keep_shared = (float *)(base + layout.shared_pre);
% end
% if spec.use_residual then
    st->keep_residual = (float *)(base + layout.residual_pre);
% end
}

typedef struct backward_state {
    forward_state f;          /* the forward's state, from its workspace */
    const elem_t *dy;         /* [S][HIDDEN] */
    elem_t *dx;               /* [S][HIDDEN] or NULL */
    float aux_coeff, z_coeff;
    float *dw_final;          /* [S][TOP_K] d loss / d combine weight */
    float *dz;                /* [S][NUM_EXPERTS] d loss / d logit */
    float *coef_dq;           /* [S][2] d loss / d residual coefficient logit */
    float *gate_dnu;          /* [S] d loss / d shared-gate logit */
    float *row_do, *row_pre, *row_du; /* [rows][HIDDEN], [rows][FFN_ROWS], [rows][HIDDEN] */
    elem_t *row_h;                    /* [rows][FFN] */
% if spec.shared.count > 0 then
    float *shared_do, *shared_pre, *shared_du; /* [SHARED_EXPERTS][S][...] */
    elem_t *shared_h;
% end
% if spec.use_residual then
    float *residual_do, *residual_pre, *residual_du; /* [S][...] */
    elem_t *residual_h;
% end
    backward_summary *summary;
} backward_state;

/* One FFN of the backward (a routed expert over its real rows, a shared expert or the
 * residual MLP over every token): its inputs, the gradients flowing through it, and
 * where its weight gradients go. */
typedef struct bwd_problem {
    const elem_t *x;          /* [.][HIDDEN] */
    const int32_t *row_token; /* row r reads x row row_token[r] (NULL: row r) */
    const float *row_scale;   /* weight_on_input: the input scale of row r, or NULL */
    int64_t n_rows;
    const elem_t *w1, *b1, *w2;
    float *d_out;             /* [n_rows][HIDDEN] d loss / d output */
    elem_t *h;                /* [n_rows][ffn] the activations, rounded as the forward's */
    float *pre;               /* [n_rows][ffn_rows] pre-activations, then their gradients */
    float *du;                /* [n_rows][HIDDEN] d loss / d input */
    float *g_w1, *g_b1, *g_w2, *g_b2; /* fp32 weight gradients, or NULL */
} bwd_problem;

% include("templates/common/activation_grad.c.tpl")

/* ---- Stores of the tiles --------------------------------------------------------------- */

typedef struct store_ctx {
    float *c;        /* C, row-major */
    int64_t ldc;
    int accumulate;  /* add to C (the caller's gradient buffer) instead of writing it */
    int stream;      /* writing C: past the caches (STREAM_GRADIENTS) */
    const float *pre; /* dh -> da: the pre-activations ([.][ldp]), overwritten by their gradients */
    int64_t ldp, ffn;
} store_ctx;

/* Overwritten weight gradients are written past the caches (non-temporal stores) when the
 * routed experts' fp32 gradients exceed STREAM_GRADIENT_BYTES: each element is written once,
 * and an ordinary store would first read its line (twice the memory traffic, on the
 * largest buffers of the step), which the caches could not keep anyway. Below it, they stay
 * cached for whatever reads them next (the optimizer). */
#define STREAM_GRADIENT_BYTES ((int64_t)64 << 20)
#define STREAM_GRADIENTS ((int64_t)NUM_EXPERTS * (FFN_ROWS + FFN) * HIDDEN * 4 > STREAM_GRADIENT_BYTES)
#if defined(__AVX512F__)
#define STREAM_FLOATS 16
#define stream_floats(dst, src) _mm512_stream_ps((dst), _mm512_loadu_ps(src))
#elif defined(__AVX__)
#define STREAM_FLOATS 8
#define stream_floats(dst, src) _mm256_stream_ps((dst), _mm256_loadu_ps(src))
#elif defined(__SSE2__)
#define STREAM_FLOATS 4
#define stream_floats(dst, src) _mm_stream_ps((dst), _mm_loadu_ps(src))
#else
#define STREAM_FLOATS 0
#endif
#if STREAM_FLOATS
#include <immintrin.h>
/* Orders this thread's non-temporal stores before what it does next (a barrier). */
#define stream_fence() _mm_sfence()
#else
#define stream_fence() ((void)0)
#endif

/* n floats to dst: non-temporal where dst is aligned to whole vectors, else stored. */
static inline void store_streaming(float *dst, const float *values, int n) {
    int i = 0;
#if STREAM_FLOATS
    if ((uintptr_t)dst % (STREAM_FLOATS * sizeof(float)) == 0)
        for (; i + STREAM_FLOATS <= n; i += STREAM_FLOATS) stream_floats(dst + i, values + i);
#endif
    memcpy(dst + i, values + i, (size_t)(n - i) * sizeof(float));
}

static void store_plain(void *ctx, int64_t m, int64_t c, const float *values, int n) {
    const store_ctx *s = ctx;
    float *dst = s->c + m * s->ldc + c;
    if (s->accumulate)
        for (int i = 0; i < n; i++) dst[i] += values[i];
    else if (s->stream)
        store_streaming(dst, values, n);
    else
        memcpy(dst, values, (size_t)n * sizeof(float));
}

/* dh -> the gradient of the pre-activations, in place of them (row m, columns c..c+n). */
static void store_activation_grad(void *ctx, int64_t m, int64_t c, const float *dh, int n) {
    const store_ctx *s = ctx;
    float *pre = s->c + m * s->ldp;
    for (int i = 0; i < n; i++) {
% if gated then
        const float gate = pre[c + i], up = pre[s->ffn + c + i];
        pre[c + i] = dh[i] * up * activation_grad(gate);
        pre[s->ffn + c + i] = dh[i] * activation(gate);
% else
        pre[c + i] = dh[i] * activation_grad(pre[c + i]);
% end
    }
}

/* Column sums of A ([n_k][lda], columns [m0, m0 + rows)) into g (bias gradients). */
static void column_sums(const float *a, int64_t lda, int64_t n_k, int64_t m0, int64_t rows, float *g,
                        int accumulate) {
    for (int64_t m = m0; m < m0 + rows; m++) {
        float sum = 0.0f;
        for (int64_t k = 0; k < n_k; k++) sum += a[k * lda + m];
        g[m] = accumulate ? g[m] + sum : sum;
    }
}

% if variant.cpu.gemm == "amx" then
% include("templates/cpu/amx_backward.c.tpl")

% end
#ifndef AMX_BACKWARD
#define AMX_BACKWARD 0 /* variant gemm ${variant.cpu.gemm}: no AMX kernels in the backward */
#endif

/* 1 when this call's expert GEMMs run on AMX tiles: compiled in and granted, as the forward's. */
static int backward_on_amx(void) {
#if AMX_BACKWARD
    return amx_usable();
#else
    return 0;
#endif
}

/* Work split of a list of problems into tasks of task_rows x BWD_TASK_COLS of C. */
static int64_t task_grid(const int64_t *rows_of, int n, int64_t cols, int64_t task_rows, int64_t *start) {
    const int64_t col_blocks = (cols + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
    start[0] = 0;
    for (int p = 0; p < n; p++) {
        int64_t row_blocks = (rows_of[p] + task_rows - 1) / task_rows;
        start[p + 1] = start[p] + row_blocks * col_blocks;
    }
    return start[n];
}
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn
%   local F1 = shape.ffn_rows

/* ---- Backward of FFN shape ${n}: ${spec.hidden_size} -> ${F1} -> ${F} -> ${spec.hidden_size} ---- */

/* P_backward_data for the problems of this shape: GEMM1 again with its pre-activations kept
 * (or, when the forward kept them, the activations from them), then da = (do W2) * act'(pre),
 * then du = da W1.
%   if moe.packs_rows(variant) then
 * GEMM1 runs again on the forward's own kernels (`pack`: room for their packed rows, as the
 * forward's), so the pre-activations are the forward's bits, and h is made from them as the
 * forward's epilogue made it.
%   end
 */
static void ${n}_backward_data(const bwd_problem *problems, int n_problems, int n_threads, int kept, void *pack) {
    if (n_problems == 0) return;
    ffn_problem fwd[n_problems];
    int64_t rows_of[n_problems], start1[n_problems + 1], start_dh[n_problems + 1], start_du[n_problems + 1];
    const int64_t col_blocks1 = (${F} + BLOCK_COLS - 1) / BLOCK_COLS;
    start1[0] = 0;
    for (int p = 0; p < n_problems; p++) {
        const bwd_problem *b = &problems[p];
        fwd[p] = (ffn_problem){.x = b->x, .w1 = b->w1, .b1 = b->b1, .row_token = b->row_token,
                               .row_scale = b->row_scale, .n_rows = b->n_rows, .hidden = b->h,
                               .pre = b->pre};
        rows_of[p] = b->n_rows;
        start1[p + 1] = start1[p] + (b->n_rows + BLOCK_ROWS - 1) / BLOCK_ROWS * col_blocks1;
    }
%   if moe.packs_rows(variant) then
    if (!kept) ${n}_run(fwd, n_problems, n_threads, 0, pack);
    const int64_t n_tasks1 = 0;
    const int h_from_pre = 1;
%   else
    (void)pack;
    const int64_t n_tasks1 = kept ? 0 : start1[n_problems];
    const int h_from_pre = kept;
%   end
    int64_t start_h[n_problems + 1];
    start_h[0] = 0;
    for (int p = 0; p < n_problems; p++) start_h[p + 1] = start_h[p] + (h_from_pre ? problems[p].n_rows : 0);
    const int64_t n_rows_h = start_h[n_problems];
    const int amx = backward_on_amx();
    const int64_t task_rows = amx ? AMX_BWD_ROWS : BWD_TASK_ROWS;
    const int64_t n_dh = task_grid(rows_of, n_problems, ${F}, task_rows, start_dh);
    const int64_t n_du = task_grid(rows_of, n_problems, HIDDEN, task_rows, start_du);
    const int64_t dh_col_blocks = (${F} + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
    const int64_t du_col_blocks = (HIDDEN + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
#pragma omp parallel num_threads(n_threads)
    {
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
        if (amx) amx_configure();
#endif
%   end
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_tasks1; task++) { /* GEMM1 as the forward's FMA path */
            int p = problem_of_task(start1, n_problems, task);
            int64_t local = task - start1[p];
            ${n}_gemm1_task(&fwd[p], (local / col_blocks1) * BLOCK_ROWS, (local % col_blocks1) * BLOCK_COLS);
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n_rows_h; row++) { /* h from the forward's pre-activations */
            int p = problem_of_task(start_h, n_problems, row);
            const int64_t r = row - start_h[p];
            const float *pre = problems[p].pre + r * ${F1};
            elem_t *h = problems[p].h + r * ${F};
            for (int64_t f = 0; f < ${F}; f++)
%   if gated then
                h[f] = float_to_elem(activation(pre[f]) * pre[${F} + f]);
%   else
                h[f] = float_to_elem(activation(pre[f]));
%   end
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_dh; task++) { /* dh = do W2, then da in place of pre */
            int p = problem_of_task(start_dh, n_problems, task);
            int64_t local = task - start_dh[p];
            const bwd_problem *b = &problems[p];
            const int64_t m0 = (local / dh_col_blocks) * task_rows, c0 = (local % dh_col_blocks) * BWD_TASK_COLS;
            store_ctx ctx = {.c = b->pre, .ldp = ${F1}, .ffn = ${F}};
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
            if (amx) {
                amx_bwd_product(b->d_out, HIDDEN, 1, NULL, m0, min_i64(AMX_BWD_ROWS, b->n_rows - m0), c0,
                                min_i64(c0 + BWD_TASK_COLS, ${F}), HIDDEN, b->w2, ${F}, NULL, store_activation_grad, &ctx);
                continue;
            }
#endif
%   end
            outer_block_e(b->d_out, HIDDEN, 1, m0, min_i64(BWD_TASK_ROWS, b->n_rows - m0), c0,
                          min_i64(c0 + BWD_TASK_COLS, ${F}), HIDDEN, b->w2, ${F}, NULL, NULL,
                          store_activation_grad, &ctx);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_du; task++) { /* du = da W1 */
            int p = problem_of_task(start_du, n_problems, task);
            int64_t local = task - start_du[p];
            const bwd_problem *b = &problems[p];
            const int64_t m0 = (local / du_col_blocks) * task_rows, c0 = (local % du_col_blocks) * BWD_TASK_COLS;
            store_ctx ctx = {.c = b->du, .ldc = HIDDEN};
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
            if (amx) {
                amx_bwd_product(b->pre, ${F1}, 1, NULL, m0, min_i64(AMX_BWD_ROWS, b->n_rows - m0), c0,
                                min_i64(c0 + BWD_TASK_COLS, HIDDEN), ${F1}, b->w1, HIDDEN, NULL, store_plain, &ctx);
                continue;
            }
#endif
%   end
            outer_block_e(b->pre, ${F1}, 1, m0, min_i64(BWD_TASK_ROWS, b->n_rows - m0), c0,
                          min_i64(c0 + BWD_TASK_COLS, HIDDEN), ${F1}, b->w1, HIDDEN, NULL, NULL, store_plain, &ctx);
        }
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
        if (amx) _tile_release();
#endif
%   end
    }
}

/* P_backward_weights for the problems of this shape: dW2 = do^T h, db2 = sum do,
 * dW1 = da^T u, db1 = sum da, each a sum over the problem's rows in row order. */
static void ${n}_backward_weights(const bwd_problem *problems, int n_problems, int n_threads, int accumulate) {
    if (n_problems == 0) return;
    int64_t m_w2[n_problems], m_w1[n_problems], start_w2[n_problems + 1], start_w1[n_problems + 1];
    for (int p = 0; p < n_problems; p++) {
        const bwd_problem *b = &problems[p];
        const int has_rows = b->n_rows > 0; /* an expert no row reached: its gradients are 0 */
        m_w2[p] = has_rows && (b->g_w2 || b->g_b2) ? HIDDEN : 0;
        m_w1[p] = has_rows && (b->g_w1 || b->g_b1) ? ${F1} : 0;
        if (!has_rows && !accumulate) {
            if (b->g_w2) memset(b->g_w2, 0, (size_t)HIDDEN * ${F} * sizeof(float));
            if (b->g_b2) memset(b->g_b2, 0, (size_t)HIDDEN * sizeof(float));
            if (b->g_w1) memset(b->g_w1, 0, (size_t)${F1} * HIDDEN * sizeof(float));
            if (b->g_b1) memset(b->g_b1, 0, (size_t)${F1} * sizeof(float));
        }
    }
    const int amx = backward_on_amx();
    const int64_t task_rows = amx ? AMX_BWD_ROWS : BWD_TASK_ROWS;
    const int64_t n_w2 = task_grid(m_w2, n_problems, ${F}, task_rows, start_w2);
    const int64_t n_w1 = task_grid(m_w1, n_problems, HIDDEN, task_rows, start_w1);
    const int64_t w2_col_blocks = (${F} + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
    const int64_t w1_col_blocks = (HIDDEN + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
#pragma omp parallel num_threads(n_threads)
    {
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
        if (amx) amx_configure();
#endif
%   end
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t task = 0; task < n_w2; task++) {
            int p = problem_of_task(start_w2, n_problems, task);
            int64_t local = task - start_w2[p];
            const bwd_problem *b = &problems[p];
            const int64_t m0 = (local / w2_col_blocks) * task_rows, c0 = (local % w2_col_blocks) * BWD_TASK_COLS;
            const int64_t rows = min_i64(task_rows, HIDDEN - m0);
            if (b->g_w2) {
                store_ctx ctx = {.c = b->g_w2, .ldc = ${F}, .accumulate = accumulate, .stream = STREAM_GRADIENTS};
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
                if (amx)
                    amx_bwd_product(b->d_out, 1, HIDDEN, NULL, m0, rows, c0, min_i64(c0 + BWD_TASK_COLS, ${F}), b->n_rows,
                                    b->h, ${F}, NULL, store_plain, &ctx);
                else
#endif
%   end
                outer_block_e(b->d_out, 1, HIDDEN, m0, rows, c0, min_i64(c0 + BWD_TASK_COLS, ${F}), b->n_rows,
                              b->h, ${F}, NULL, NULL, store_plain, &ctx);
            }
            if (b->g_b2 && c0 == 0) column_sums(b->d_out, HIDDEN, b->n_rows, m0, rows, b->g_b2, accumulate);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_w1; task++) {
            int p = problem_of_task(start_w1, n_problems, task);
            int64_t local = task - start_w1[p];
            const bwd_problem *b = &problems[p];
            const int64_t m0 = (local / w1_col_blocks) * task_rows, c0 = (local % w1_col_blocks) * BWD_TASK_COLS;
            const int64_t rows = min_i64(task_rows, ${F1} - m0);
            if (b->g_w1) {
                store_ctx ctx = {.c = b->g_w1, .ldc = HIDDEN, .accumulate = accumulate, .stream = STREAM_GRADIENTS};
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
                if (amx)
                    amx_bwd_product(b->pre, 1, ${F1}, b->row_scale, m0, rows, c0, min_i64(c0 + BWD_TASK_COLS, HIDDEN),
                                    b->n_rows, b->x, HIDDEN, b->row_token, store_plain, &ctx);
                else
#endif
%   end
                outer_block_e(b->pre, 1, ${F1}, m0, rows, c0, min_i64(c0 + BWD_TASK_COLS, HIDDEN), b->n_rows,
                              b->x, HIDDEN, b->row_token, b->row_scale, store_plain, &ctx);
            }
            if (b->g_b1 && c0 == 0) column_sums(b->pre, ${F1}, b->n_rows, m0, rows, b->g_b1, accumulate);
        }
        stream_fence();
%   if variant.cpu.gemm == "amx" then
#if AMX_BACKWARD
        if (amx) _tile_release();
#endif
%   end
    }
}
% end

/* The problems of every FFN shape; `g` may be NULL (the data phase). */
static int backward_problems(const backward_state *bs, const moegen_kernel_grads *g, int64_t ffn, int routed,
                             int dense, bwd_problem *list) {
    const forward_state *st = &bs->f;
    const moegen_kernel_weights *w = st->w;
    int n = 0;
% if not spec.use_residual and spec.shared.count == 0 then
    (void)dense; /* no dense FFNs in this layer */
% end
    if (ffn == FFN) {
        for (int e = 0; routed && e < NUM_EXPERTS; e++) {
            const int64_t first = st->expert_offset[e];
            bwd_problem *p = &list[n++];
            *p = (bwd_problem){.x = st->x, .row_token = st->row_token + first, .n_rows = st->counts_after[e],
                               .w1 = (const elem_t *)w->w1 + (int64_t)e * FFN_ROWS * HIDDEN,
                               .w2 = (const elem_t *)w->w2 + (int64_t)e * HIDDEN * FFN,
                               .d_out = bs->row_do + first * HIDDEN, .h = bs->row_h + first * FFN,
                               .pre = bs->row_pre + first * FFN_ROWS, .du = bs->row_du + first * HIDDEN};
% if spec.weight_on_input then
            p->row_scale = st->row_scale + first;
% end
            if (w->b1) p->b1 = (const elem_t *)w->b1 + (int64_t)e * FFN_ROWS;
            if (g) {
                if (g->w1) p->g_w1 = g->w1 + (int64_t)e * FFN_ROWS * HIDDEN;
                if (g->w2) p->g_w2 = g->w2 + (int64_t)e * HIDDEN * FFN;
% if spec.expert_bias then
                if (g->b1) p->g_b1 = g->b1 + (int64_t)e * FFN_ROWS;
                if (g->b2) p->g_b2 = g->b2 + (int64_t)e * HIDDEN;
% end
            }
        }
% if spec.use_residual then
        if (!dense) return n;
        bwd_problem *p = &list[n++]; /* the residual MLP over every token */
        *p = (bwd_problem){.x = st->x, .n_rows = st->n_tokens, .w1 = (const elem_t *)w->residual_w1,
                           .b1 = (const elem_t *)w->residual_b1, .w2 = (const elem_t *)w->residual_w2,
                           .d_out = bs->residual_do, .h = bs->residual_h, .pre = bs->residual_pre,
                           .du = bs->residual_du};
        if (g) {
            p->g_w1 = g->residual_w1;
            p->g_w2 = g->residual_w2;
%   if spec.expert_bias then
            p->g_b1 = g->residual_b1;
            p->g_b2 = g->residual_b2;
%   end
        }
% end
    }
% if spec.shared.count > 0 then
    if (ffn == SHARED_FFN) {
        for (int i = 0; dense && i < SHARED_EXPERTS; i++) {
            const int64_t first = (int64_t)i * st->n_tokens;
            bwd_problem *p = &list[n++];
            *p = (bwd_problem){.x = st->x, .n_rows = st->n_tokens,
                               .w1 = (const elem_t *)w->shared_w1 + (int64_t)i * SHARED_FFN_ROWS * HIDDEN,
                               .w2 = (const elem_t *)w->shared_w2 + (int64_t)i * HIDDEN * SHARED_FFN,
                               .d_out = bs->shared_do + first * HIDDEN, .h = bs->shared_h + first * SHARED_FFN,
                               .pre = bs->shared_pre + first * SHARED_FFN_ROWS, .du = bs->shared_du + first * HIDDEN};
            if (w->shared_b1) p->b1 = (const elem_t *)w->shared_b1 + (int64_t)i * SHARED_FFN_ROWS;
            if (g) {
                if (g->shared_w1) p->g_w1 = g->shared_w1 + (int64_t)i * SHARED_FFN_ROWS * HIDDEN;
                if (g->shared_w2) p->g_w2 = g->shared_w2 + (int64_t)i * HIDDEN * SHARED_FFN;
%   if spec.expert_bias then
                if (g->shared_b1) p->g_b1 = g->shared_b1 + (int64_t)i * SHARED_FFN_ROWS;
                if (g->shared_b2) p->g_b2 = g->shared_b2 + (int64_t)i * HIDDEN;
%   end
            }
        }
    }
% end
    return n;
}

/* ---- Token pass A: the gradients of the combine ---------------------------------------- */

/* dot product of two fp32 vectors of HIDDEN values, in order */
static inline float dot_hidden(const float *a, const float *b) {
    float sum = 0.0f;
    for (int64_t h = 0; h < HIDDEN; h++) sum += a[h] * b[h];
    return sum;
}

/* Token t: the upstream of every expert row (do), d loss / d combine weight, the residual
 * coefficient and shared gate logits' gradients (numerics §8.2 steps 1-3). */
static void token_pass_a(const backward_state *bs, int64_t t, float *g, float *y_moe) {
    const forward_state *st = &bs->f;
    for (int64_t h = 0; h < HIDDEN; h++) g[h] = elem_to_float(bs->dy[t * HIDDEN + h]);
    const int32_t *row = st->route_row + t * TOP_K;
    const float *weight = st->route_final + t * TOP_K;
% if spec.use_residual then
    /* y = y_moe c0 + mlp c1: recompute y_moe (slot order) and the coefficients. */
    for (int64_t h = 0; h < HIDDEN; h++) y_moe[h] = 0.0f;
    for (int j = 0; j < TOP_K; j++) {
        if (row[j] < 0) continue;
        const float *o = st->expert_out + (int64_t)row[j] * HIDDEN;
%   if spec.weight_on_input then
        for (int64_t h = 0; h < HIDDEN; h++) y_moe[h] += o[h];
%   else
        for (int64_t h = 0; h < HIDDEN; h++) y_moe[h] += weight[j] * o[h];
%   end
    }
    const elem_t *x = st->x + t * HIDDEN;
    float q0 = dot_x_fp32(x, st->w->residual_coef_w) + st->w->residual_coef_b[0];
    float q1 = dot_x_fp32(x, st->w->residual_coef_w + HIDDEN) + st->w->residual_coef_b[1];
    float q_max = q0 > q1 ? q0 : q1;
    float e0 = expf(q0 - q_max), e1 = expf(q1 - q_max);
    const float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
    const float *mlp = st->residual_out + t * HIDDEN;
    const float dc0 = dot_hidden(g, y_moe), dc1 = dot_hidden(g, mlp);
    const float mean = c0 * dc0 + c1 * dc1;
    bs->coef_dq[t * 2] = c0 * (dc0 - mean);
    bs->coef_dq[t * 2 + 1] = c1 * (dc1 - mean);
    for (int64_t h = 0; h < HIDDEN; h++) bs->residual_do[t * HIDDEN + h] = c1 * g[h];
    float *upstream = y_moe; /* from here on: the upstream of y_moe, c0 g */
    for (int64_t h = 0; h < HIDDEN; h++) upstream[h] = c0 * g[h];
% else
    (void)y_moe;
    const float *upstream = g; /* the upstream of y_moe */
% end
% if spec.shared.count > 0 then
%   if spec.shared.gate then
    const float gamma = sigmoid(dot_x_fp32(st->x + t * HIDDEN, st->w->shared_gate));
    float d_gamma = 0.0f;
    for (int64_t h = 0; h < HIDDEN; h++) {
        float shared = 0.0f;
        for (int i = 0; i < SHARED_EXPERTS; i++) shared += st->shared_out[((int64_t)i * st->n_tokens + t) * HIDDEN + h];
        d_gamma += g[h] * shared;
    }
    bs->gate_dnu[t] = d_gamma * gamma * (1.0f - gamma);
%   else
    const float gamma = 1.0f;
%   end
    for (int i = 0; i < SHARED_EXPERTS; i++) {
        float *d_out = bs->shared_do + ((int64_t)i * st->n_tokens + t) * HIDDEN;
        for (int64_t h = 0; h < HIDDEN; h++) d_out[h] = gamma * g[h];
    }
% end
    float *dw = bs->dw_final + t * TOP_K;
    for (int j = 0; j < TOP_K; j++) {
        dw[j] = 0.0f;
        if (row[j] < 0) continue; /* dropped, invalid or a padding token: no gradient */
        float *d_out = bs->row_do + (int64_t)row[j] * HIDDEN;
% if spec.weight_on_input then
        for (int64_t h = 0; h < HIDDEN; h++) d_out[h] = upstream[h]; /* output weight 1; dw in pass B */
% else
        const float *o = st->expert_out + (int64_t)row[j] * HIDDEN;
        dw[j] = dot_hidden(upstream, o);
        for (int64_t h = 0; h < HIDDEN; h++) d_out[h] = weight[j] * upstream[h];
% end
    }
}

/* ---- Token pass B: the router's backward and dx ---------------------------------------- */

% include("templates/common/router_backward.c.tpl")

/* Token t: d loss / d logits, from d loss / d combine weights (router_backward.c.tpl). */
static void router_backward(const backward_state *bs, int64_t t, const float *aux_grad, float *dz) {
    const forward_state *st = &bs->f;
    router_backward_token(st->logits + t * NUM_EXPERTS, st->route_expert + t * TOP_K, st->route_valid + t * TOP_K,
                          st->route_row + t * TOP_K, st->route_weight + t * TOP_K, bs->dw_final + t * TOP_K,
                          aux_grad, bs->z_coeff, st->n_tokens, dz);
}

/* Token t: the router's backward, then dx[t] as the sum of its routed rows' du (slot
 * order), the shared experts', the residual MLP's, the residual coefficient's, the shared
 * gate's and the router's terms, rounded once to the layer dtype. */
static void token_pass_b(const backward_state *bs, int64_t t, const float *aux_grad) {
    const forward_state *st = &bs->f;
    const int32_t *row = st->route_row + t * TOP_K;
% if spec.weight_on_input then
    /* the input was w x: d loss / d w = x . du */
    for (int j = 0; j < TOP_K; j++)
        if (row[j] >= 0) bs->dw_final[t * TOP_K + j] = dot_x_fp32(st->x + t * HIDDEN, bs->row_du + (int64_t)row[j] * HIDDEN);
% end
    float *dz = bs->dz + t * NUM_EXPERTS;
    router_backward(bs, t, aux_grad, dz);
    if (!bs->dx) return;
% if spec.weight_on_input then
    const float *weight = st->route_final + t * TOP_K;
% end
% if spec.use_residual then
    const float dq0 = bs->coef_dq[t * 2], dq1 = bs->coef_dq[t * 2 + 1];
% end
    for (int64_t h0 = 0; h0 < HIDDEN; h0 += COMBINE_CHUNK) {
        float acc[COMBINE_CHUNK];
        for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] = 0.0f;
        for (int j = 0; j < TOP_K; j++) {
            if (row[j] < 0) continue;
            const float *du = bs->row_du + (int64_t)row[j] * HIDDEN + h0;
% if spec.weight_on_input then
            for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += weight[j] * du[h];
% else
            for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += du[h];
% end
        }
% if spec.shared.count > 0 then
        for (int i = 0; i < SHARED_EXPERTS; i++) {
            const float *du = bs->shared_du + ((int64_t)i * st->n_tokens + t) * HIDDEN + h0;
            for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += du[h];
        }
%   if spec.shared.gate then
        for (int h = 0; h < COMBINE_CHUNK; h++) acc[h] += bs->gate_dnu[t] * st->w->shared_gate[h0 + h];
%   end
% end
% if spec.use_residual then
        {
            const float *du = bs->residual_du + t * HIDDEN + h0;
            const float *wc = st->w->residual_coef_w;
            for (int h = 0; h < COMBINE_CHUNK; h++)
                acc[h] += du[h] + (dq0 * wc[h0 + h] + dq1 * wc[HIDDEN + h0 + h]);
        }
% end
        for (int h = 0; h < COMBINE_CHUNK; h++) {
            float router = 0.0f;
            for (int e = 0; e < NUM_EXPERTS; e++) router += dz[e] * st->w->router_w[(int64_t)e * HIDDEN + h0 + h];
% if moe.uses_jitter(spec) then
            const float u = rng_uniform(st->rng_offset, RNG_STREAM_JITTER, (uint64_t)t * HIDDEN + h0 + h);
            router *= (1.0f - INPUT_JITTER) + u * (2.0f * INPUT_JITTER); /* the router saw x * m */
% end
            acc[h] += router;
        }
        elem_t *dst = bs->dx + t * HIDDEN + h0;
        for (int h = 0; h < COMBINE_CHUNK; h++) dst[h] = float_to_elem(acc[h]);
    }
}

/* ---- Entry points ------------------------------------------------------------------------ */

size_t ${P}_backward_workspace_bytes(int64_t n_tokens) {
    if (n_tokens < 0 || n_tokens > MAX_TOKENS) return 0;
    return backward_layout_for(n_tokens).total;
}

/* The checks both phases share; the forward's state from its workspace and the backward's
 * buffers. *empty is 1 for 0 tokens. */
static int begin_backward(const moegen_kernel_backward_args *args, backward_state *bs, int *empty) {
    *empty = 0;
    if (!args) return MOEGEN_KERNEL_EARG;
    if (args->abi_version != MOEGEN_KERNEL_ABI_VERSION) return MOEGEN_KERNEL_EABI;
    const moegen_kernel_args *fw = args->forward;
    if (!fw) return MOEGEN_KERNEL_EARG;
    if (fw->abi_version != MOEGEN_KERNEL_ABI_VERSION) return MOEGEN_KERNEL_EABI;
    const int64_t n_tokens = fw->n_tokens;
    if (n_tokens < 0 || n_tokens > MAX_TOKENS) return MOEGEN_KERNEL_EARG;
    if (n_tokens == 0) {
        *empty = 1;
        return MOEGEN_KERNEL_OK;
    }
    if (!fw->x || !weights_present(&fw->w)) return MOEGEN_KERNEL_EARG;
    if (!fw->workspace || fw->workspace_bytes < layout_for(n_tokens).total) return MOEGEN_KERNEL_EWORKSPACE;
    const backward_layout layout = backward_layout_for(n_tokens);
    if (!args->workspace || args->workspace_bytes < layout.total) return MOEGEN_KERNEL_EWORKSPACE;
    memset(bs, 0, sizeof *bs);
    carve_state(fw, &bs->f);
    const route_summary summary = *bs->f.summary; /* what the forward left */
    bs->f.capacity = summary.capacity;
    bs->f.n_rows = summary.n_rows;
    bs->f.n_dropped = summary.n_dropped;
    bs->dy = args->dy;
    bs->dx = args->dx;
    bs->aux_coeff = (float)args->aux_coeff;
    bs->z_coeff = (float)args->z_coeff;
    char *base = args->workspace;
    bs->dw_final = (float *)(base + layout.dw_final);
    bs->dz = (float *)(base + layout.dz);
    bs->coef_dq = (float *)(base + layout.coef_dq);
    bs->gate_dnu = (float *)(base + layout.gate_dnu);
    bs->row_do = (float *)(base + layout.row_do);
    bs->row_h = (elem_t *)(base + layout.row_h);
    bs->row_pre = (float *)(base + layout.row_pre);
    bs->row_du = (float *)(base + layout.row_du);
% if spec.shared.count > 0 then
    bs->shared_do = (float *)(base + layout.shared_do);
    bs->shared_h = (elem_t *)(base + layout.shared_h);
    bs->shared_pre = (float *)(base + layout.shared_pre);
    bs->shared_du = (float *)(base + layout.shared_du);
% end
% if spec.use_residual then
    bs->residual_do = (float *)(base + layout.residual_do);
    bs->residual_h = (elem_t *)(base + layout.residual_h);
    bs->residual_pre = (float *)(base + layout.residual_pre);
    bs->residual_du = (float *)(base + layout.residual_du);
% end
    bs->summary = (backward_summary *)(base + layout.summary);
    return MOEGEN_KERNEL_OK;
}

/* aux_coeff * d aux / d p[t][e] (the same for every token); the counts are the forward's,
 * summed in block order. */
static void aux_gradient(const forward_state *st, double aux_coeff, float aux_grad[NUM_EXPERTS]) {
    for (int e = 0; e < NUM_EXPERTS; e++) {
        int64_t count = 0;
% if aux ~= "none" then
        for (int64_t block = 0; block < st->n_router_blocks; block++) count += st->block_counts[block * NUM_EXPERTS + e];
% end
        aux_grad[e] = aux_gradient_of(aux_coeff, count, st->n_tokens);
    }
}

/* Token pass A over every token, in parallel; MOEGEN_KERNEL_ENOMEM if a thread's scratch
 * could not be allocated. */
static int run_pass_a(const backward_state *bs, int n_threads) {
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *scratch = malloc(2 * HIDDEN * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < bs->f.n_tokens; t++)
            if (scratch) token_pass_a(bs, t, scratch, scratch + HIDDEN);
        free(scratch);
    }
    return failed ? MOEGEN_KERNEL_ENOMEM : MOEGEN_KERNEL_OK;
}

/* The FFNs' data phase: the routed experts over the permutation's rows (`routed`) and the
 * shared experts and the residual MLP (`dense`). */
static void run_ffn_data(const backward_state *bs, int routed, int dense, int kept, int n_threads) {
    bwd_problem problems[NUM_EXPERTS + 1${spec.shared.count > 0 and " + SHARED_EXPERTS" or ""}];
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
    ${shape.name}_backward_data(problems, backward_problems(bs, NULL, ${shape.ffn}, routed, dense, problems), n_threads, kept,
                                ${moe.packs_rows(variant) and "bs->f.pack_scratch" or "NULL"});
% end
}

/* Token pass B over every token, then the mark P_backward_weights checks. */
static void run_pass_b(const backward_state *bs, double aux_coeff, int n_threads) {
    float aux_grad[NUM_EXPERTS];
    aux_gradient(&bs->f, aux_coeff, aux_grad);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t t = 0; t < bs->f.n_tokens; t++) token_pass_b(bs, t, aux_grad);
    *bs->summary = (backward_summary){BACKWARD_DATA_DONE, bs->f.n_tokens, bs->f.n_rows};
}

static int backward_threads(const moegen_kernel_backward_args *args) {
    return args->n_threads > 0 ? args->n_threads : threads_for(args->forward);
}

int ${P}_backward_data(const moegen_kernel_backward_args *args) {
    backward_state bs;
    int empty;
    int rc = begin_backward(args, &bs, &empty);
    if (rc != MOEGEN_KERNEL_OK || empty) return rc;
    if (!args->dy) return MOEGEN_KERNEL_EARG;
    const int n_threads = backward_threads(args);
    bs.summary->magic = 0;
    if ((rc = run_pass_a(&bs, n_threads)) != MOEGEN_KERNEL_OK) return rc;
    /* the forward kept its pre-activations in this workspace: no GEMM1 again */
    const int kept = args->forward->train_keep == args->workspace;
    run_ffn_data(&bs, 1, 1, kept, n_threads);
    run_pass_b(&bs, args->aux_coeff, n_threads);
    return MOEGEN_KERNEL_OK;
}

/* ---- The staged backward (expert parallelism, runtime/ep.c) ------------------------------ */

int ${P}_backward_combine(const moegen_kernel_backward_args *args, moegen_kernel_backward_plan *plan) {
    static const int64_t no_rows[NUM_EXPERTS + 1];
    if (!plan) return MOEGEN_KERNEL_EARG;
    memset(plan, 0, sizeof *plan);
    backward_state bs;
    int empty;
    int rc = begin_backward(args, &bs, &empty);
    if (rc != MOEGEN_KERNEL_OK) return rc;
    if (empty) {
        plan->expert_offset = plan->counts_after = no_rows;
        return MOEGEN_KERNEL_OK;
    }
    if (!args->dy) return MOEGEN_KERNEL_EARG;
    const int n_threads = backward_threads(args);
    bs.summary->magic = 0;
    if ((rc = run_pass_a(&bs, n_threads)) != MOEGEN_KERNEL_OK) return rc;
    run_ffn_data(&bs, 0, 1, 0, n_threads); /* the dense FFNs; the routed rows go to their ranks */
    plan->n_rows = bs.f.n_rows;
    plan->expert_offset = bs.f.expert_offset;
    plan->counts_after = bs.f.counts_after;
    plan->row_do = bs.row_do;
    plan->row_du = bs.row_du;
    return MOEGEN_KERNEL_OK;
}

int ${P}_backward_route(const moegen_kernel_backward_args *args) {
    backward_state bs;
    int empty;
    int rc = begin_backward(args, &bs, &empty);
    if (rc != MOEGEN_KERNEL_OK || empty) return rc;
    if (!args->dy) return MOEGEN_KERNEL_EARG;
    run_pass_b(&bs, args->aux_coeff, backward_threads(args));
    return MOEGEN_KERNEL_OK;
}

/* The routed experts [first, first + n) over the caller's rows, as bwd_problems. */
static int expert_rows_problems(const moegen_kernel_expert_backward_args *a, bwd_problem *list) {
    if (!a || a->abi_version != MOEGEN_KERNEL_ABI_VERSION) return -1;
    if (a->first_expert < 0 || a->n_experts < 0 || a->first_expert > NUM_EXPERTS - a->n_experts) return -1;
    if (a->n_experts == 0) return 0;
    if (!a->expert_offset || a->expert_offset[0] != 0) return -1;
    const int64_t rows = a->expert_offset[a->n_experts];
    if (rows < 0) return -1;
    if (rows > 0 && (!a->x || !a->w1 || !a->w2 || !a->d_out || !a->du || !a->pre || !a->h)) return -1;
% if spec.expert_bias then
    if (rows > 0 && !a->b1) return -1;
% end
% if spec.weight_on_input then
    if (rows > 0 && !a->row_scale) return -1;
% end
    for (int l = 0; l < a->n_experts; l++) {
        const int64_t first = a->expert_offset[l];
        if (first < 0 || a->expert_offset[l + 1] < first || a->expert_offset[l + 1] > rows) return -1;
        bwd_problem *p = &list[l];
        *p = (bwd_problem){.x = (const elem_t *)a->x + first * HIDDEN,
                           .row_scale = a->row_scale ? a->row_scale + first : NULL,
                           .n_rows = a->expert_offset[l + 1] - first,
                           .w1 = (const elem_t *)a->w1 + (int64_t)l * FFN_ROWS * HIDDEN,
                           .b1 = a->b1 ? (const elem_t *)a->b1 + (int64_t)l * FFN_ROWS : NULL,
                           .w2 = (const elem_t *)a->w2 + (int64_t)l * HIDDEN * FFN,
                           .d_out = (float *)a->d_out + first * HIDDEN, .h = (elem_t *)a->h + first * FFN,
                           .pre = a->pre + first * FFN_ROWS, .du = a->du + first * HIDDEN};
        if (a->g_w1) p->g_w1 = a->g_w1 + (int64_t)l * FFN_ROWS * HIDDEN;
        if (a->g_w2) p->g_w2 = a->g_w2 + (int64_t)l * HIDDEN * FFN;
% if spec.expert_bias then
        if (a->g_b1) p->g_b1 = a->g_b1 + (int64_t)l * FFN_ROWS;
        if (a->g_b2) p->g_b2 = a->g_b2 + (int64_t)l * HIDDEN;
% end
    }
    return a->n_experts;
}

int ${P}_backward_experts(const moegen_kernel_expert_backward_args *args) {
    bwd_problem problems[NUM_EXPERTS];
    const int n = expert_rows_problems(args, problems);
    if (n < 0) return args && args->abi_version != MOEGEN_KERNEL_ABI_VERSION ? MOEGEN_KERNEL_EABI : MOEGEN_KERNEL_EARG;
% if moe.packs_rows(variant) then
    /* room for the forward kernels' packed rows, as P_experts has in its scratch */
    void *pack = NULL;
    if (n > 0) {
        pack = malloc(MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS(args->expert_offset[n], n, HIDDEN, FFN) * sizeof(elem_t));
        if (!pack) return MOEGEN_KERNEL_ENOMEM;
    }
% else
    void *pack = NULL;
% end
    ${moe.shape_name(spec.ffn_size)}_backward_data(problems, n, args->n_threads > 0 ? args->n_threads : 1, 0, pack);
    free(pack);
    return MOEGEN_KERNEL_OK;
}

int ${P}_backward_experts_weights(const moegen_kernel_expert_backward_args *args) {
    bwd_problem problems[NUM_EXPERTS];
    const int n = expert_rows_problems(args, problems);
    if (n < 0) return args && args->abi_version != MOEGEN_KERNEL_ABI_VERSION ? MOEGEN_KERNEL_EABI : MOEGEN_KERNEL_EARG;
    ${moe.shape_name(spec.ffn_size)}_backward_weights(problems, n, args->n_threads > 0 ? args->n_threads : 1,
                                                      args->accumulate);
    return MOEGEN_KERNEL_OK;
}

/* Gradient buffer g of n floats: zero, unless accumulating. */
static void clear_grad(float *g, size_t n, int accumulate) {
    if (g && !accumulate) memset(g, 0, n * sizeof(float));
}

/* dG[m][n] (+)= sum_k A[k][m] B[k][n] for a dense tensor, and its bias column sums. */
static void dense_weight_grad(const float *a, int64_t m_count, int64_t n_k, const void *b, int b_is_float,
                              float *g, float *g_bias, int accumulate, int n_threads) {
    const int64_t col_blocks = (HIDDEN + BWD_TASK_COLS - 1) / BWD_TASK_COLS;
    const int64_t n_tasks = (m_count + BWD_TASK_ROWS - 1) / BWD_TASK_ROWS * col_blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t task = 0; task < n_tasks; task++) {
        const int64_t m0 = task / col_blocks * BWD_TASK_ROWS, c0 = task % col_blocks * BWD_TASK_COLS;
        const int64_t rows = min_i64(BWD_TASK_ROWS, m_count - m0), c1 = min_i64(c0 + BWD_TASK_COLS, HIDDEN);
        if (g) {
            store_ctx ctx = {.c = g, .ldc = HIDDEN, .accumulate = accumulate};
            if (b_is_float)
                outer_block_f(a, 1, m_count, m0, rows, c0, c1, n_k, b, HIDDEN, NULL, NULL, store_plain, &ctx);
            else
                outer_block_e(a, 1, m_count, m0, rows, c0, c1, n_k, b, HIDDEN, NULL, NULL, store_plain, &ctx);
        }
        if (g_bias && c0 == 0) column_sums(a, m_count, n_k, m0, rows, g_bias, accumulate);
    }
}

int ${P}_backward_weights(const moegen_kernel_backward_args *args) {
    backward_state bs;
    int empty;
    int rc = begin_backward(args, &bs, &empty);
    if (rc != MOEGEN_KERNEL_OK) return rc;
    const moegen_kernel_grads *g = &args->grads;
    const int accumulate = args->accumulate;
    if (empty) { /* no tokens: every gradient is 0 */
        clear_grad(g->router_w, (size_t)NUM_EXPERTS * HIDDEN, accumulate);
% if r.router_bias then
        clear_grad(g->router_b, NUM_EXPERTS, accumulate);
% end
        clear_grad(g->w1, (size_t)NUM_EXPERTS * FFN_ROWS * HIDDEN, accumulate);
        clear_grad(g->w2, (size_t)NUM_EXPERTS * HIDDEN * FFN, accumulate);
% if spec.expert_bias then
        clear_grad(g->b1, (size_t)NUM_EXPERTS * FFN_ROWS, accumulate);
        clear_grad(g->b2, (size_t)NUM_EXPERTS * HIDDEN, accumulate);
% end
% if spec.shared.count > 0 then
        clear_grad(g->shared_w1, (size_t)SHARED_EXPERTS * SHARED_FFN_ROWS * HIDDEN, accumulate);
        clear_grad(g->shared_w2, (size_t)SHARED_EXPERTS * HIDDEN * SHARED_FFN, accumulate);
%   if spec.expert_bias then
        clear_grad(g->shared_b1, (size_t)SHARED_EXPERTS * SHARED_FFN_ROWS, accumulate);
        clear_grad(g->shared_b2, (size_t)SHARED_EXPERTS * HIDDEN, accumulate);
%   end
%   if spec.shared.gate then
        clear_grad(g->shared_gate, HIDDEN, accumulate);
%   end
% end
% if spec.use_residual then
        clear_grad(g->residual_w1, (size_t)FFN_ROWS * HIDDEN, accumulate);
        clear_grad(g->residual_w2, (size_t)HIDDEN * FFN, accumulate);
%   if spec.expert_bias then
        clear_grad(g->residual_b1, FFN_ROWS, accumulate);
        clear_grad(g->residual_b2, HIDDEN, accumulate);
%   end
        clear_grad(g->residual_coef_w, 2 * HIDDEN, accumulate);
        clear_grad(g->residual_coef_b, 2, accumulate);
% end
        return MOEGEN_KERNEL_OK;
    }
    if (bs.summary->magic != BACKWARD_DATA_DONE || bs.summary->n_tokens != bs.f.n_tokens)
        return MOEGEN_KERNEL_EARG; /* P_backward_data has not run on this workspace */
    const int n_threads = backward_threads(args);
    const int64_t n_tokens = bs.f.n_tokens;

    /* the routed experts' gradients here unless the caller made them with
     * P_backward_experts_weights (the staged backward passes NULL for them) */
    const int routed = g->w1 || g->b1 || g->w2 || g->b2;
    bwd_problem problems[NUM_EXPERTS + 1${spec.shared.count > 0 and " + SHARED_EXPERTS" or ""}];
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
    ${shape.name}_backward_weights(problems, backward_problems(&bs, g, ${shape.ffn}, routed, 1, problems), n_threads, accumulate);
% end

    /* The router: dWr = dz^T xr (the router's own input, jitter included), dbr = sum dz. */
% if r.router_bias then
    dense_weight_grad(bs.dz, NUM_EXPERTS, n_tokens, bs.f.router_input, 1, g->router_w, g->router_b, accumulate, n_threads);
% else
    dense_weight_grad(bs.dz, NUM_EXPERTS, n_tokens, bs.f.router_input, 1, g->router_w, NULL, accumulate, n_threads);
% end
% if spec.use_residual then
    dense_weight_grad(bs.coef_dq, 2, n_tokens, bs.f.x, 0, g->residual_coef_w, g->residual_coef_b, accumulate, n_threads);
% end
% if spec.shared.count > 0 and spec.shared.gate then
    dense_weight_grad(bs.gate_dnu, 1, n_tokens, bs.f.x, 0, g->shared_gate, NULL, accumulate, n_threads);
% end
    return MOEGEN_KERNEL_OK;
}
