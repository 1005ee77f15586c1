% -- outer.c.tpl — the fp32 expert GEMMs as outer products (variant gemm=outer): each
% -- problem's token rows are packed once per call into panels of VEC_FLOATS rows
% -- ([k][lane]: one vector holds one k of VEC_FLOATS tokens); a micro-kernel broadcasts one
% -- weight value at a time against TILE_ROWS such vectors and keeps a TILE_COLS x TILE_ROWS
% -- block of accumulators. The weights are read in place ([out][in], each weight row a
% -- sequential stream), so nothing is packed at bind time; k runs in chunks that keep a row
% -- tile's panels in L1 while several weight tiles pass. GEMM1 writes its activations
% -- straight into GEMM2's panel layout. Each output element is one k-ascending fp32 chain
% -- in one vector lane, so results do not depend on the tiling, the thread count or how
% -- many rows an expert has. Included by ffn.c.tpl inside its FFN shape loop's scope.
% local moe = import("templates/lib/moe.lua")
% local mr = variant.cpu.tile_cols
% local gated = spec.gated
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
/* Every expert runs on panels, however few its rows: moving experts under one token vector to the
 * dot products (tried: switch-base-8 fp32 S = 16, 1 thread, 15.9 -> 10.0 ms) makes an expert's
 * results depend on its row count, which an expert-parallel layer does not share with ep_size 1
 * (test_ep's bit-identity failed). A variant field chosen per layer could do it. */
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
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn

/* GEMM1 + activation on outer products, rows [row0, row0 + BLOCK_ROWS) and activation
 * columns [col0, col0 + BLOCK_COLS): the activations go to the h panels (and the
 * pre-activations, in training, to p->pre). */
static void ${n}_outer_gemm1_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t row_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, ${F});
    for (int64_t f0 = col0; f0 < col_end; f0 += OUTER_WTILES * TILE_HIDDEN_COLS) {
        const float *w[OUTER_WTILES][TILE_COLS];
        int n_w = 0;
        for (int64_t f = f0; f < col_end && n_w < OUTER_WTILES; f += TILE_HIDDEN_COLS, n_w++) {
            const int cols = (int)min_i64(TILE_HIDDEN_COLS, col_end - f); /* the last tile may be short */
            for (int j = 0; j < TILE_HIDDEN_COLS; j++) {
                const int64_t col = f + (j < cols ? j : cols - 1); /* a short tile repeats its last row */
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
}

/* GEMM2 on outer products, rows [row0, row0 + BLOCK_ROWS) and output columns
 * [col0, col0 + BLOCK_COLS), from the h panels. */
static void ${n}_outer_gemm2_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t row_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, HIDDEN);
    for (int64_t c0 = col0; c0 < col_end; c0 += OUTER_WTILES * TILE_COLS) {
        const float *w[OUTER_WTILES][TILE_COLS];
        int n_w = 0;
        for (int64_t c = c0; c < col_end && n_w < OUTER_WTILES; c += TILE_COLS, n_w++) {
            const int cols = (int)min_i64(TILE_COLS, col_end - c);
            for (int j = 0; j < TILE_COLS; j++) w[n_w][j] = p->w2 + (c + (j < cols ? j : cols - 1)) * ${F};
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
