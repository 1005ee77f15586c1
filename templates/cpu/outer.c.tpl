% -- outer.c.tpl — the fp32 expert GEMMs as outer products (variant gemm=outer): each
% -- problem's token rows are packed once per call into panels of VEC_FLOATS rows
% -- ([k][lane]: one vector holds one k of VEC_FLOATS tokens); a micro-kernel broadcasts one
% -- weight value at a time against TILE_ROWS such vectors and keeps a TILE_COLS x TILE_ROWS
% -- block of accumulators. The weights are read in place ([out][in], each weight row a
% -- sequential stream), so nothing is packed at bind time; k runs in chunks that keep a row
% -- tile's panels in L1 while several weight tiles pass. GEMM1 writes its activations
% -- straight into GEMM2's panel layout. Each output element is one k-ascending fp32 chain
% -- in one vector lane, so results do not depend on the tiling, the thread count or how
% -- many rows an expert has. A row block of a few rows runs the same chains with lanes across
% -- weight rows instead (AVX-512: the few-row tiles below). Included by ffn.c.tpl inside its
% -- FFN shape loop's scope.
% local moe = import("templates/lib/moe.lua")
% local mr = variant.cpu.tile_cols
% local gated = spec.gated
% local few = 8 -- OUTER_FEW_ROWS
% local splat = "{" .. string.rep("s, ", variant.cpu.vector_floats - 1) .. "s}"
/* ---- Outer-product micro-kernels ----------------------------------------------------- */

/* The loop over k runs in chunks of OUTER_KC: a chunk of one row tile's panels (OUTER_KC x
 * TILE_ROWS vectors: 32 KiB for 4 vectors of 16 floats) stays in L1 while up to OUTER_WTILES
 * weight tiles pass over it, their accumulators kept in memory between chunks (the same
 * chain per lane). Measured here on qwen3-30b-a3b fp32, S = 1024, 1 and 2 threads (noisy VM,
 * four alternating rounds): 128 x 1 x 8 took 0.75-1.0 of the layer time of 256-k chunks over
 * one weight tile and 8 row tiles, and as long as or less than 64 x 2 x 8 and 64 x 2 x 16. */
#define OUTER_KC 128     /* k per chunk */
#define OUTER_GROUP 1    /* row tiles that share a pass over the weight tiles */
#define OUTER_WTILES 8   /* weight tiles that share a pass over a row tile's panel chunk */
#define OUTER_PREFETCH 64 /* weights prefetched this many k ahead (4 cache lines per weight row) */
_Static_assert(BLOCK_ROWS % (TILE_ROWS * VEC_FLOATS) == 0, "a row block must hold whole token-vector tiles");
_Static_assert(VEC_FLOATS <= 16, "panels of VEC_FLOATS rows fit the 16-row rounding of the pack scratch");
_Static_assert(OUTER_KC % 16 == 0 && HIDDEN % 16 == 0 && FFN % 16 == 0, "k runs in steps of 16");
% for nv = 1, variant.cpu.tile_rows do

/* outer_v${nv}: acc[i][v] += sum over k < n_k (a multiple of 16) of w[i][k] * x[v][k], for
 * TILE_COLS weight rows and ${nv} token vector(s) (x[v]: a panel, VEC_FLOATS lanes per k).
 * Not inlined: it has the whole register file for its accumulators. */
static __attribute__((noinline)) void outer_v${nv}(const float *const w[TILE_COLS], const float *const x[TILE_ROWS],
        int64_t n_k, vfloat acc[TILE_COLS][TILE_ROWS]) {
%   for i = 0, mr - 1 do
    const float *const w${i} = w[${i}];
%   end
%   for v = 0, nv - 1 do
    const float *const x${v} = x[${v}];
%   end
%   for i = 0, mr - 1 do
%     local names = {}
%     for v = 0, nv - 1 do names[#names + 1] = "c" .. i .. "_" .. v .. " = acc[" .. i .. "][" .. v .. "]" end
    vfloat ${table.concat(names, ", ")};
%   end
    for (int64_t k0 = 0; k0 < n_k; k0 += 16) {
%   for i = 0, mr - 1 do
        __builtin_prefetch(w${i} + k0 + OUTER_PREFETCH, 0, 3);
%   end
        for (int64_t k = k0; k < k0 + 16; k++) {
%   for v = 0, nv - 1 do
            const vfloat t${v} = load_f32(x${v} + k * VEC_FLOATS);
%   end
%   for i = 0, mr - 1 do
            {
                const float s = w${i}[k];
                const vfloat b = ${splat};
%     for v = 0, nv - 1 do
                c${i}_${v} += b * t${v};
%     end
            }
%   end
        }
    }
%   for i = 0, mr - 1 do
%     for v = 0, nv - 1 do
    acc[${i}][${v}] = c${i}_${v};
%     end
%   end
}
% end

/* outer_tile: 1 <= nv <= TILE_ROWS token vectors. */
static void outer_tile(int nv, const float *const w[TILE_COLS], const float *const x[TILE_ROWS], int64_t n_k,
                       vfloat acc[TILE_COLS][TILE_ROWS]) {
    switch (nv) {
% for nv = 1, variant.cpu.tile_rows - 1 do
    case ${nv}: outer_v${nv}(w, x, n_k, acc); break;
% end
    default: outer_v${variant.cpu.tile_rows}(w, x, n_k, acc); break;
    }
}

/* Token vectors in the row tile at `r` (a multiple of VEC_FLOATS) that hold rows < row_end. */
static inline int outer_vectors(int64_t r, int64_t row_end) {
    return (int)((min_i64(r + TILE_ROWS * VEC_FLOATS, row_end) - r + VEC_FLOATS - 1) / VEC_FLOATS);
}

/* The accumulators of n_w (<= OUTER_WTILES) weight tiles w[i] against the n_tiles
 * (<= OUTER_GROUP) row tiles from row r0 (a multiple of TILE_ROWS * VEC_FLOATS; rows <
 * row_end), over k < n_k, in chunks of OUTER_KC: each chunk of the rows' panels is reused by
 * every weight tile, and each weight tile's chunk by every row tile. `panels`: the problem's
 * packed rows, [block][n_k][VEC_FLOATS]. */
static void outer_group(const float *const w[OUTER_WTILES][TILE_COLS], int n_w, const float *panels, int64_t n_k,
                        int64_t r0, int64_t row_end, int n_tiles,
                        vfloat acc[OUTER_WTILES][OUTER_GROUP][TILE_COLS][TILE_ROWS]) {
    for (int i = 0; i < n_w; i++) memset(acc[i], 0, (size_t)n_tiles * sizeof acc[i][0]);
    for (int64_t k0 = 0; k0 < n_k; k0 += OUTER_KC) {
        const int64_t kn = min_i64(OUTER_KC, n_k - k0);
        for (int t = 0; t < n_tiles; t++) {
            const int64_t r = r0 + (int64_t)t * TILE_ROWS * VEC_FLOATS;
            const int nv = outer_vectors(r, row_end);
            const float *x[TILE_ROWS];
            for (int v = 0; v < TILE_ROWS; v++)
                x[v] = panels + ((r / VEC_FLOATS + (v < nv ? v : 0)) * n_k + k0) * VEC_FLOATS;
            for (int i = 0; i < n_w; i++) {
                const float *wk[TILE_COLS];
                for (int j = 0; j < TILE_COLS; j++) wk[j] = w[i][j] + k0;
                outer_tile(nv, wk, x, kn, acc[i][t]);
            }
        }
    }
}

/* Row tiles in the group from r (at most OUTER_GROUP) that hold rows < row_end. */
static inline int outer_group_tiles(int64_t r, int64_t row_end) {
    const int64_t rows = min_i64(r + OUTER_GROUP * TILE_ROWS * VEC_FLOATS, row_end) - r;
    return (int)((rows + TILE_ROWS * VEC_FLOATS - 1) / (TILE_ROWS * VEC_FLOATS));
}

/* Pack block b of a problem's inputs: rows [b * VEC_FLOATS, (b + 1) * VEC_FLOATS) into
 * xpack + b * HIDDEN * VEC_FLOATS as [k][lane]; lanes past the last row are zeros. */
static void outer_pack_rows(const ffn_problem *p, int64_t b) {
    float *dst = p->xpack + b * HIDDEN * VEC_FLOATS;
    for (int lane = 0; lane < VEC_FLOATS; lane++) {
        const int64_t r = b * VEC_FLOATS + lane;
        const float *src = zero_row;
        if (r < p->n_rows) {
            const int64_t token = p->row_token ? p->row_token[r] : r;
            if (token >= 0) src = p->x + token * HIDDEN;
        }
        for (int64_t k = 0; k < HIDDEN; k++) dst[k * VEC_FLOATS + lane] = src[k];
    }
}
#if VEC_AVX512
/* ---- Few-row tiles: one vector per 16 weight rows ------------------------------------ */

/* The rows of a row block's last token vector, when they are at most OUTER_FEW_ROWS (an expert
 * with a few tokens, or the tail of a bigger one: outer_few_start), would fill a vector mostly
 * with padding and spend one FMA on every weight for a few rows. They run here instead, lanes
 * across weight rows: 16 weight rows x 16 k are loaded and transposed in registers, and each
 * row's value at k is broadcast against the 16 weights of that k. Each output element is still
 * one k-ascending fp32 chain of `acc += w * x`, the panels' chain, so the results are the same
 * bits as on panels, and the choice may follow the row count (an expert-parallel rank and
 * ep_size 1 agree; test_forward checks a token's bits alone and inside a batch). Measured on
 * switch-base-8 fp32: docs/performance.md. */
#define OUTER_FEW_ROWS ${few}
#define FEW_LANES 16 /* floats in an __m512: the weight rows of a group, the k of one transposed block */
_Static_assert(FEW_LANES == VEC_FLOATS, "a few-row tile's accumulators are the panels' vectors");
#define OUTER_FEW_PREFETCH 64 /* into L1: weights this many k ahead in each of the 16 rows */
/* Into L2: the next group's 16 rows (contiguous, n_k lines), 16 lines per step of 16 k, so the
 * whole group arrives while this one runs (streaming 151 MB alone, 1 thread: 7 -> 10.4 GB/s). */
#define FLOATS_PER_LINE 16 /* a 64-byte cache line */

/* t[k] lane j = r[j] lane k: a 16 x 16 transpose in four rounds of 16 shuffles. */
static inline void transpose16(__m512 r[16], __m512 t[16]) {
    __m512 a[16], b[16];
    for (int i = 0; i < 16; i += 2) { /* per 128-bit lane: rows i, i+1 interleaved */
        a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) { /* b[g + m], 128-bit lane l: rows g..g+3 at k = 4l + m */
        b[g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[g]), _mm512_castps_pd(a[g + 2])));
        b[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[g]), _mm512_castps_pd(a[g + 2])));
        b[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[g + 1]), _mm512_castps_pd(a[g + 3])));
        b[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[g + 1]), _mm512_castps_pd(a[g + 3])));
    }
    for (int m = 0; m < 4; m++) { /* a 4 x 4 transpose of 128-bit lanes across b[m], b[4 + m], b[8 + m], b[12 + m] */
        const __m512 c0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x44), c1 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xee);
        const __m512 c2 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x44), c3 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xee);
        t[m] = _mm512_shuffle_f32x4(c0, c2, 0x88);
        t[4 + m] = _mm512_shuffle_f32x4(c0, c2, 0xdd);
        t[8 + m] = _mm512_shuffle_f32x4(c1, c3, 0x88);
        t[12 + m] = _mm512_shuffle_f32x4(c1, c3, 0xdd);
    }
}
% for nr = 1, few do

/* few_r${nr}: acc[r] lane j += sum over k < n_k (a multiple of 16) of w[j][k] * x[r][k * VEC_FLOATS],
 * k ascending, for ${nr} row(s) (x[r]: a row's lane in a panel). */
static __attribute__((noinline)) void few_r${nr}(const float *const w[FEW_LANES], const float *next,
                                                 const float *const x[OUTER_FEW_ROWS], int64_t n_k,
                                                 vfloat acc[OUTER_FEW_ROWS]) {
%   for r = 0, nr - 1 do
    const float *const x${r} = x[${r}];
    vfloat c${r} = acc[${r}];
%   end
    for (int64_t k0 = 0; k0 < n_k; k0 += FEW_LANES) {
        __m512 rows[FEW_LANES], t[FEW_LANES];
        for (int j = 0; j < FEW_LANES; j++) {
            _mm_prefetch((const char *)(next + (k0 + j) * FLOATS_PER_LINE), _MM_HINT_T1);
            _mm_prefetch((const char *)(w[j] + k0 + OUTER_FEW_PREFETCH), _MM_HINT_T0);
            rows[j] = _mm512_loadu_ps(w[j] + k0);
        }
        transpose16(rows, t);
#pragma GCC unroll 16 /* t[k] stays in registers (GCC keeps the loop from 4 rows up) */
        for (int k = 0; k < FEW_LANES; k++) {
            vfloat tk;
            memcpy(&tk, &t[k], sizeof tk);
%   for r = 0, nr - 1 do
            {
                const float s = x${r}[(k0 + k) * VEC_FLOATS];
                const vfloat b = ${splat};
                c${r} += tk * b;
            }
%   end
        }
    }
%   for r = 0, nr - 1 do
    acc[${r}] = c${r};
%   end
}
% end

/* few_rows: 1 <= n_rows <= OUTER_FEW_ROWS rows against 16 weight rows, from zero; `next`: the
 * first of the 16 contiguous rows (of length n_k) the caller runs next, prefetched. */
static void few_rows(int n_rows, const float *const w[FEW_LANES], const float *next, const float *const x[OUTER_FEW_ROWS],
                     int64_t n_k, vfloat acc[OUTER_FEW_ROWS]) {
    memset(acc, 0, OUTER_FEW_ROWS * sizeof acc[0]);
    switch (n_rows) {
% for nr = 1, few - 1 do
    case ${nr}: few_r${nr}(w, next, x, n_k, acc); break;
% end
    default: few_r${few}(w, next, x, n_k, acc); break;
    }
}

/* The 16 weight rows from row `first` of w (row length n_k), the real ones before row `end`. */
static inline void few_weight_rows(const float *w, int64_t first, int64_t end, int64_t n_k, const float *rows[FEW_LANES]) {
    for (int j = 0; j < FEW_LANES; j++) rows[j] = w + tile_row(first, j, end) * n_k;
}

/* The group of 16 rows of w (row length n_k, n_rows_w rows) from row `first`, kept inside w:
 * what few_rows prefetches as the next group. */
static inline const float *few_next_group(const float *w, int64_t first, int64_t n_rows_w, int64_t n_k) {
    return w + min_i64(first, n_rows_w - FEW_LANES) * n_k;
}

/* Where row r's values sit in a panel of rows of length n_k (its lane of its block), as an
 * offset from the panels' start. */
static inline int64_t few_panel_offset(int64_t r, int64_t n_k) {
    return (r / VEC_FLOATS) * n_k * VEC_FLOATS + r % VEC_FLOATS;
}

/* 16 biases from b[first] (`cols` of them real; zeros past them), or zeros when b is NULL. */
static inline __m512 few_bias(const elem_t *b, int64_t first, int cols) {
    float values[FEW_LANES] = {0};
    if (b)
        for (int j = 0; j < cols; j++) values[j] = elem_to_float(b[first + j]);
    return _mm512_loadu_ps(values);
}

/* Offsets j * VEC_FLOATS: column j of a row in a panel. */
static inline __m512i few_column_offsets(void) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32(VEC_FLOATS));
}
#endif

/* Where the few-row tail of the row block [row0, row_end) starts (row0: a multiple of VEC_FLOATS):
 * at the rows of its last token vector when they are at most OUTER_FEW_ROWS (the whole block
 * when it is that small), else at row_end (none). GEMM1 and GEMM2 split a block alike, so the
 * h panels' lanes the few-row tiles leave unwritten are never read. */
static inline int64_t outer_few_start(int64_t row0, int64_t row_end) {
#if VEC_AVX512
    const int64_t tail = (row_end - row0) % VEC_FLOATS;
    return tail != 0 && tail <= OUTER_FEW_ROWS ? row_end - tail : row_end;
#else
    (void)row0;
    return row_end;
#endif
}
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn
#if VEC_AVX512

/* GEMM1 + activation of the few rows [row0, row_end) (at most OUTER_FEW_ROWS), activation
 * columns [col0, col_end), lanes across columns: the same values outer_gemm1_task writes. */
static void ${n}_few_gemm1(const ffn_problem *p, int64_t row0, int64_t row_end, int64_t col0, int64_t col_end) {
    const int n_rows = (int)(row_end - row0);
    const float *x[OUTER_FEW_ROWS];
    for (int r = 0; r < n_rows; r++) x[r] = p->xpack + few_panel_offset(row0 + r, HIDDEN);
    for (int64_t f = col0; f < col_end; f += FEW_LANES) {
        const int cols = (int)min_i64(FEW_LANES, col_end - f);
        const __mmask16 lanes = (__mmask16)((1u << cols) - 1u);
        const float *w[FEW_LANES];
        vfloat gate[OUTER_FEW_ROWS];
        few_weight_rows(p->w1, f, col_end, HIDDEN, w);
%   if gated then
        few_rows(n_rows, w, few_next_group(p->w1, ${F} + f, ${2 * F}, HIDDEN), x, HIDDEN, gate); /* next: the up rows */
%   else
        few_rows(n_rows, w, few_next_group(p->w1, f + FEW_LANES, ${F}, HIDDEN), x, HIDDEN, gate);
%   end
        const __m512 b_gate = few_bias(p->b1, f, cols);
%   if gated then
        vfloat up[OUTER_FEW_ROWS];
        few_weight_rows(p->w1, ${F} + f, ${F} + col_end, HIDDEN, w);
        few_rows(n_rows, w, few_next_group(p->w1, f + FEW_LANES, ${F}, HIDDEN), x, HIDDEN, up);
        const __m512 b_up = few_bias(p->b1, ${F} + f, cols);
%   end
        for (int r = 0; r < n_rows; r++) {
            const int64_t row = row0 + r;
            const __m512 scale = _mm512_set1_ps(p->row_scale ? p->row_scale[row] : 1.0f);
            __m512 g;
            memcpy(&g, &gate[r], sizeof g);
%   if gated then
            __m512 u;
            memcpy(&u, &up[r], sizeof u);
            const __m512 value = activate16(scale, &g, &u, p->b1 != NULL, b_gate, b_up);
%   else
            const __m512 value = activate16(scale, &g, NULL, p->b1 != NULL, b_gate, _mm512_setzero_ps());
%   end
            if (p->pre) { /* training: the backward's input (backward.c.tpl) */
                _mm512_mask_storeu_ps(p->pre + row * ${shape.ffn_rows} + f, lanes, g);
%   if gated then
                _mm512_mask_storeu_ps(p->pre + row * ${shape.ffn_rows} + ${F} + f, lanes, u);
%   end
            }
            float *h = p->hpack + few_panel_offset(row, ${F}); /* the row's lane; column f + j at (f + j) * VEC_FLOATS */
            _mm512_mask_i32scatter_ps(h + f * VEC_FLOATS, lanes, few_column_offsets(), value, 4);
        }
    }
}

/* GEMM2 of the few rows [row0, row_end), output columns [col0, col_end), from the h panels. */
static void ${n}_few_gemm2(const ffn_problem *p, int64_t row0, int64_t row_end, int64_t col0, int64_t col_end) {
    const int n_rows = (int)(row_end - row0);
    const float *h[OUTER_FEW_ROWS];
    for (int r = 0; r < n_rows; r++) h[r] = p->hpack + few_panel_offset(row0 + r, ${F});
    for (int64_t c = col0; c < col_end; c += FEW_LANES) {
        const int cols = (int)min_i64(FEW_LANES, col_end - c);
        const float *w[FEW_LANES];
        vfloat acc[OUTER_FEW_ROWS];
        few_weight_rows(p->w2, c, col_end, ${F}, w);
        few_rows(n_rows, w, few_next_group(p->w2, c + FEW_LANES, HIDDEN, ${F}), h, ${F}, acc);
        const __m512 bias = few_bias(p->b2, c, cols);
        const __mmask16 lanes = (__mmask16)((1u << cols) - 1u);
        for (int r = 0; r < n_rows; r++) {
            __m512 value;
            memcpy(&value, &acc[r], sizeof value);
            _mm512_mask_storeu_ps(p->out + (row0 + r) * HIDDEN + c, lanes, _mm512_add_ps(value, bias));
        }
    }
}
#endif

/* GEMM1 + activation on outer products, rows [row0, row0 + BLOCK_ROWS) and activation
 * columns [col0, col0 + BLOCK_COLS): the activations go to the h panels (and the
 * pre-activations, in training, to p->pre). */
static void ${n}_outer_gemm1_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, ${F});
    const int64_t rows_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t row_end = outer_few_start(row0, rows_end); /* panels before it, few-row tiles after */
    for (int64_t f0 = col0; f0 < col_end; f0 += OUTER_WTILES * TILE_HIDDEN_COLS) {
        const float *w[OUTER_WTILES][TILE_COLS];
        int n_w = 0;
        for (int64_t f = f0; f < col_end && n_w < OUTER_WTILES; f += TILE_HIDDEN_COLS, n_w++) {
            for (int j = 0; j < TILE_HIDDEN_COLS; j++) {
                const int64_t col = tile_row(f, j, col_end); /* the last tile may be short */
                w[n_w][j] = p->w1 + col * HIDDEN;
%   if gated then
                w[n_w][TILE_HIDDEN_COLS + j] = p->w1 + (${F} + col) * HIDDEN; /* up row */
%   end
            }
        }
        for (int64_t g = row0; g < row_end; g += OUTER_GROUP * TILE_ROWS * VEC_FLOATS) {
            const int n_tiles = outer_group_tiles(g, row_end);
            vfloat acc[OUTER_WTILES][OUTER_GROUP][TILE_COLS][TILE_ROWS];
            outer_group(w, n_w, p->xpack, HIDDEN, g, row_end, n_tiles, acc);
            for (int wtv = 0; wtv < n_w * n_tiles * TILE_ROWS; wtv++) {
                const int i = wtv / (n_tiles * TILE_ROWS), t = wtv / TILE_ROWS % n_tiles, v = wtv % TILE_ROWS;
                const int64_t f = f0 + (int64_t)i * TILE_HIDDEN_COLS;
                const int cols = (int)min_i64(TILE_HIDDEN_COLS, col_end - f);
                const int64_t r = g + (int64_t)t * TILE_ROWS * VEC_FLOATS;
                if (v >= outer_vectors(r, row_end)) continue;
                float *h = p->hpack + (r / VEC_FLOATS + v) * ${F} * VEC_FLOATS;
#if VEC_AVX512
                const int64_t first = r + v * VEC_FLOATS;
                const int valid = (int)min_i64(VEC_FLOATS, p->n_rows - first);
                const __mmask16 rows = (__mmask16)((1u << valid) - 1u); /* padding lanes stay zero */
                const __m512 scale = p->row_scale ? _mm512_maskz_loadu_ps(rows, p->row_scale + first) : _mm512_set1_ps(1.0f);
                for (int j = 0; j < cols; j++) {
                    __m512 gate;
                    memcpy(&gate, &acc[i][t][j][v], sizeof gate);
%   if gated then
                    __m512 up;
                    memcpy(&up, &acc[i][t][TILE_HIDDEN_COLS + j][v], sizeof up);
                    const __m512 value = activate16(scale, &gate, &up, p->b1 != NULL,
                                                    _mm512_set1_ps(p->b1 ? elem_to_float(p->b1[f + j]) : 0.0f),
                                                    _mm512_set1_ps(p->b1 ? elem_to_float(p->b1[${F} + f + j]) : 0.0f));
%   else
                    const __m512 value = activate16(scale, &gate, NULL, p->b1 != NULL,
                                                    _mm512_set1_ps(p->b1 ? elem_to_float(p->b1[f + j]) : 0.0f),
                                                    _mm512_setzero_ps());
%   end
                    if (p->pre) { /* training: the backward's input (backward.c.tpl) */
                        store_lanes16(gate, valid, p->pre + first * ${shape.ffn_rows} + f + j, ${shape.ffn_rows});
%   if gated then
                        store_lanes16(up, valid, p->pre + first * ${shape.ffn_rows} + ${F} + f + j, ${shape.ffn_rows});
%   end
                    }
                    _mm512_storeu_ps(h + (f + j) * VEC_FLOATS, _mm512_maskz_mov_ps(rows, value));
                }
#else
                for (int j = 0; j < cols; j++) {
                    float gates[VEC_FLOATS];
                    memcpy(gates, &acc[i][t][j][v], sizeof gates);
%   if gated then
                    float ups[VEC_FLOATS];
                    memcpy(ups, &acc[i][t][TILE_HIDDEN_COLS + j][v], sizeof ups);
%   end
                    for (int lane = 0; lane < VEC_FLOATS; lane++) {
                        const int64_t row = r + v * VEC_FLOATS + lane;
                        float value = 0.0f; /* padding lanes stay zero (and finite) */
                        if (row < p->n_rows) {
                            const float scale = p->row_scale ? p->row_scale[row] : 1.0f;
                            float gate = scale * gates[lane];
%   if gated then
                            float up = scale * ups[lane];
%   end
                            if (p->b1) {
                                gate += elem_to_float(p->b1[f + j]);
%   if gated then
                                up += elem_to_float(p->b1[${F} + f + j]);
%   end
                            }
                            if (p->pre) { /* training: the backward's input (backward.c.tpl) */
                                p->pre[row * ${shape.ffn_rows} + f + j] = gate;
%   if gated then
                                p->pre[row * ${shape.ffn_rows} + ${F} + f + j] = up;
%   end
                            }
%   if gated then
                            value = activation(gate) * up;
%   else
                            value = activation(gate);
%   end
                        }
                        h[(f + j) * VEC_FLOATS + lane] = value;
                    }
                }
#endif
            }
        }
    }
#if VEC_AVX512
    if (row_end < rows_end) ${n}_few_gemm1(p, row_end, rows_end, col0, col_end);
#endif
}

/* GEMM2 on outer products, rows [row0, row0 + BLOCK_ROWS) and output columns
 * [col0, col0 + BLOCK_COLS), from the h panels. */
static void ${n}_outer_gemm2_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, HIDDEN);
    const int64_t rows_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t row_end = outer_few_start(row0, rows_end); /* panels before it, few-row tiles after */
    for (int64_t c0 = col0; c0 < col_end; c0 += OUTER_WTILES * TILE_COLS) {
        const float *w[OUTER_WTILES][TILE_COLS];
        int n_w = 0;
        for (int64_t c = c0; c < col_end && n_w < OUTER_WTILES; c += TILE_COLS, n_w++) {
            for (int j = 0; j < TILE_COLS; j++) w[n_w][j] = p->w2 + tile_row(c, j, col_end) * ${F};
        }
        for (int64_t g = row0; g < row_end; g += OUTER_GROUP * TILE_ROWS * VEC_FLOATS) {
            const int n_tiles = outer_group_tiles(g, row_end);
            vfloat acc[OUTER_WTILES][OUTER_GROUP][TILE_COLS][TILE_ROWS];
            outer_group(w, n_w, p->hpack, ${F}, g, row_end, n_tiles, acc);
            for (int wtv = 0; wtv < n_w * n_tiles * TILE_ROWS; wtv++) {
                const int i = wtv / (n_tiles * TILE_ROWS), t = wtv / TILE_ROWS % n_tiles, v = wtv % TILE_ROWS;
                const int64_t c = c0 + (int64_t)i * TILE_COLS;
                const int cols = (int)min_i64(TILE_COLS, col_end - c);
                const int64_t r = g + (int64_t)t * TILE_ROWS * VEC_FLOATS;
                if (v >= outer_vectors(r, row_end)) continue;
                float bias[TILE_COLS], values[TILE_COLS][VEC_FLOATS];
                for (int j = 0; j < cols; j++) {
                    bias[j] = p->b2 ? elem_to_float(p->b2[c + j]) : 0.0f;
                    memcpy(values[j], &acc[i][t][j][v], sizeof values[j]);
                }
                const int64_t first = r + v * VEC_FLOATS;
                const int lanes = (int)min_i64(VEC_FLOATS, p->n_rows - first);
                for (int lane = 0; lane < lanes; lane++) { /* the row's `cols` outputs are contiguous */
                    float *out = p->out + (first + lane) * HIDDEN + c;
                    for (int j = 0; j < cols; j++) out[j] = values[j][lane] + bias[j];
                }
            }
        }
    }
#if VEC_AVX512
    if (row_end < rows_end) ${n}_few_gemm2(p, row_end, rows_end, col0, col_end);
#endif
}

/* Every problem of shape ${n} on outer products: the x panels, all GEMM1 tasks, all GEMM2
 * tasks (none when `gemm2` is 0). `scratch` holds each problem's x and h panels (rows rounded up to VEC_FLOATS). */
static void ${n}_run_outer(const ffn_problem *given, int n_problems, int n_threads, int gemm2, float *scratch) {
    ffn_problem problems[n_problems];
    int64_t start0[n_problems + 1], start1[n_problems + 1], start2[n_problems + 1];
    const int64_t col_blocks1 = (${F} + BLOCK_COLS - 1) / BLOCK_COLS;
    const int64_t col_blocks2 = (HIDDEN + BLOCK_COLS - 1) / BLOCK_COLS;
    start0[0] = start1[0] = start2[0] = 0;
    for (int i = 0; i < n_problems; i++) {
        problems[i] = given[i];
        const int64_t blocks = (problems[i].n_rows + VEC_FLOATS - 1) / VEC_FLOATS;
        problems[i].xpack = scratch;
        scratch += blocks * VEC_FLOATS * HIDDEN;
        problems[i].hpack = scratch;
        scratch += blocks * VEC_FLOATS * ${F};
        const int64_t row_blocks = (problems[i].n_rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
        start0[i + 1] = start0[i] + blocks;
        start1[i + 1] = start1[i] + row_blocks * col_blocks1;
        start2[i + 1] = start2[i] + (gemm2 ? row_blocks * col_blocks2 : 0);
    }
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start0[n_problems]; task++) {
            const int p = problem_of_task(start0, n_problems, task);
            outer_pack_rows(&problems[p], task - start0[p]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start1[n_problems]; task++) {
            const int p = problem_of_task(start1, n_problems, task);
            const int64_t local = task - start1[p];
            ${n}_outer_gemm1_task(&problems[p], (local / col_blocks1) * BLOCK_ROWS, (local % col_blocks1) * BLOCK_COLS);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start2[n_problems]; task++) {
            const int p = problem_of_task(start2, n_problems, task);
            const int64_t local = task - start2[p];
            ${n}_outer_gemm2_task(&problems[p], (local / col_blocks2) * BLOCK_ROWS, (local % col_blocks2) * BLOCK_COLS);
        }
    }
}
% end
