% -- amx.c.tpl — the expert GEMMs on AMX tiles (variant gemm = amx; bf16 layers).
% --
% -- TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 bf16 tile B (stored as 16 rows
% -- of 16 pairs) into a 16 x 16 fp32 tile C. Here A is always a block of weight rows, read
% -- straight from the caller's [out][in] tensors (16 rows, 64 bytes each, the row stride
% -- apart): weights are never copied or packed. B holds 16 rows of the expert (tokens) in
% -- the pair layout: the rows' inputs are packed once per call ("x packs"), and GEMM1
% -- writes its activations straight into that layout ("h packs"), which GEMM2 reads as its
% -- B. So C is [weight row][token]: GEMM1's epilogue works on 16 tokens per vector, and
% -- GEMM2's output tile is transposed into the [row][H] output.
% --
% -- Every element of C is the same chain of tile products whatever the other 15 rows of
% -- its block hold, so results do not depend on how rows fall into blocks or on threads,
% -- and a row's result is the same in any batch (expert parallelism relies on this).
% -- Linux grants AMX per process (arch_prctl); where it is refused, the layer runs the
% -- widen + FMA kernels instead and says so in its kernel path.
% local moe = import("templates/lib/moe.lua")
% local gated = spec.gated
/* ---- Expert GEMMs on AMX tiles --------------------------------------------------------- */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#define AMX_COMPILED 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX_COMPILED 0
#endif

/* 1 when this process may use AMX tiles: asked once (the answer does not change). */
static int amx_usable(void) {
#if AMX_COMPILED
    static int state; /* 0: not asked yet, 1: granted, -1: refused */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s == 0) {
        /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; fails where the CPU or kernel lacks AMX. */
        s = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s > 0;
#else
    return 0;
#endif
}

#if AMX_COMPILED
/* Rows of one tile block: tokens per B tile, weight rows per A tile. */
#define AMX_BLOCK 16

/* Weight tiles are 16 rows a row stride apart: 16 (or 32) streams at once, more than the
 * hardware prefetchers follow. Each k step asks for the 64 bytes AMX_PREFETCH steps ahead
 * of every row. Near a tensor's end that address is past it: a prefetch never faults, and
 * the address is formed as an integer, not by pointer arithmetic beyond the array. */
#define AMX_PREFETCH 8
static inline void amx_prefetch_rows(const elem_t *tile, int64_t k_ahead, int64_t stride) {
    const uintptr_t first = (uintptr_t)tile + (uintptr_t)k_ahead * sizeof(elem_t);
    for (int r = 0; r < AMX_BLOCK; r++)
        _mm_prefetch((const char *)(first + (uintptr_t)(r * stride) * sizeof(elem_t)), _MM_HINT_T0);
}

/* The activation epilogue of one h pack pair row: rows (weight rows) i and i + 1 of C for the
 * block's 16 tokens, as 16 lanes: value = act(scale * c + b1[0..1]) (gated: times the up rows',
 * with b1_up[0..1]; the biases NULL where the layer has none), rounded to bf16, the two rows' values paired into `pair` ([token] 32-bit pairs); lanes from
 * `valid` on (padding rows) are 0. With `pre` (training), the pre-activations of the valid
 * tokens go to pre[t * pre_row + pre_col + s] (gated: the up row's at + F). */
static inline void amx_epilogue_pair(const float *c0, const float *c1, const float *u0, const float *u1,
                                     __m512 scale, const elem_t *b1, const elem_t *b1_up, int valid, float *pre,
                                     int64_t pre_row, int64_t pre_col, int64_t up_col, uint32_t *pair) {
    const float *c[2] = {c0, c1}, *u[2] = {u0, u1};
    __m512i half[2];
    for (int s = 0; s < 2; s++) {
        __m512 g = _mm512_loadu_ps(c[s]), up = u[s] ? _mm512_loadu_ps(u[s]) : _mm512_setzero_ps();
        const __m512 value =
            activate16(scale, &g, u[s] ? &up : NULL, b1 != NULL, _mm512_set1_ps(b1 ? elem_to_float(b1[s]) : 0.0f),
                       _mm512_set1_ps(b1_up ? elem_to_float(b1_up[s]) : 0.0f));
        if (pre) {
            store_lanes16(g, valid, pre + pre_col + s, pre_row);
            if (u[s]) store_lanes16(up, valid, pre + up_col + s, pre_row);
        }
        half[s] = round_bf16_16(value);
    }
    const __m512i packed = _mm512_or_si512(half[0], _mm512_slli_epi32(half[1], 16));
    _mm512_storeu_si512(pair, _mm512_maskz_mov_epi32((__mmask16)((1u << valid) - 1u), packed));
}

/* Every tile 16 rows of 64 bytes: C tiles 0-3, B tiles 4-5, A tiles 6-7. Tile state is per
 * thread: each thread of a parallel region configures it and releases it. */
static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* out[c][r] = in[r][c] for a 16 x 16 block of 32-bit values (bit patterns are kept). */
static inline void amx_transpose16(const void *const in[16], void *const out[16]) {
    __m512 r[16], u[16], v[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(in[i]);
    for (int j = 0; j < 8; j++) {
        u[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        u[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) { /* v[4j + m], lane L: column 4L + m of rows 4j .. 4j + 3 */
        const __m512d a = _mm512_castps_pd(u[4 * j]), b = _mm512_castps_pd(u[4 * j + 1]);
        const __m512d c = _mm512_castps_pd(u[4 * j + 2]), d = _mm512_castps_pd(u[4 * j + 3]);
        v[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        v[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        v[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        v[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int m = 0; m < 4; m++) {
        const __m512 w0 = _mm512_shuffle_f32x4(v[m], v[4 + m], 0x44), w1 = _mm512_shuffle_f32x4(v[m], v[4 + m], 0xee);
        const __m512 w2 = _mm512_shuffle_f32x4(v[8 + m], v[12 + m], 0x44);
        const __m512 w3 = _mm512_shuffle_f32x4(v[8 + m], v[12 + m], 0xee);
        _mm512_storeu_ps(out[m], _mm512_shuffle_f32x4(w0, w2, 0x88));
        _mm512_storeu_ps(out[4 + m], _mm512_shuffle_f32x4(w0, w2, 0xdd));
        _mm512_storeu_ps(out[8 + m], _mm512_shuffle_f32x4(w1, w3, 0x88));
        _mm512_storeu_ps(out[12 + m], _mm512_shuffle_f32x4(w1, w3, 0xdd));
    }
}

/* Block b of a problem's x pack: for each pair of columns kp of its 16 rows, the 16 rows'
 * pairs ([HIDDEN / 2][16] 32-bit pairs). Rows past the problem, and padding rows, are 0. */
static void amx_pack_rows(const ffn_problem *p, int64_t b) {
    const elem_t *row[AMX_BLOCK];
    for (int i = 0; i < AMX_BLOCK; i++) {
        const int64_t r = b * AMX_BLOCK + i;
        const int64_t token = r >= p->n_rows ? -1 : p->row_token ? p->row_token[r] : r;
        row[i] = token >= 0 ? p->x + token * HIDDEN : zero_row;
    }
    uint32_t *pack = p->xpack + b * (HIDDEN / 2) * AMX_BLOCK;
    for (int64_t kb = 0; kb < HIDDEN / 32; kb++) { /* 32 columns: 16 pairs x 16 rows */
        const void *in[AMX_BLOCK];
        void *out[AMX_BLOCK];
        for (int i = 0; i < AMX_BLOCK; i++) {
            in[i] = row[i] + kb * 32;
            out[i] = pack + (kb * 16 + i) * AMX_BLOCK;
        }
        amx_transpose16(in, out);
    }
}
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn

/* ---- FFN shape ${n} on AMX tiles ---- */

/* GEMM1 + activation for rows [row0, row0 + BLOCK_ROWS) and activation columns
 * [col0, col0 + BLOCK_COLS) of one problem, into its h pack. */
static void ${n}_amx_gemm1_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t b_first = row0 / AMX_BLOCK;
    const int64_t b_end = (min_i64(row0 + BLOCK_ROWS, p->n_rows) + AMX_BLOCK - 1) / AMX_BLOCK;
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, ${F});
%   if gated then
    for (int64_t f = col0; f < col_end; f += AMX_BLOCK) { /* gate rows f.., up rows ${F} + f.. */
        const elem_t *a0 = p->w1 + f * HIDDEN, *a1 = p->w1 + (${F} + f) * HIDDEN;
        const int second = 1;
%   else
    for (int64_t f = col0; f < col_end; f += 2 * AMX_BLOCK) { /* rows f.. and f + 16.. */
        const elem_t *a0 = p->w1 + f * HIDDEN, *a1 = p->w1 + (f + AMX_BLOCK) * HIDDEN;
        const int second = f + AMX_BLOCK < col_end;
%   end
        for (int64_t b = b_first; b < b_end; b += 2) {
            const int two = b + 1 < b_end; /* two blocks of rows share each weight tile */
            const uint32_t *x0 = p->xpack + b * (HIDDEN / 2) * AMX_BLOCK, *x1 = x0 + (HIDDEN / 2) * AMX_BLOCK;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = 0; kb < HIDDEN / 32; kb++) {
                amx_prefetch_rows(a0, (kb + AMX_PREFETCH) * 32, HIDDEN);
                if (second) amx_prefetch_rows(a1, (kb + AMX_PREFETCH) * 32, HIDDEN);
                _tile_loadd(4, x0 + kb * 16 * AMX_BLOCK, 64);
                _tile_loadd(6, a0 + kb * 32, HIDDEN * 2);
                _tile_dpbf16ps(0, 6, 4);
                if (second) {
                    _tile_loadd(7, a1 + kb * 32, HIDDEN * 2);
                    _tile_dpbf16ps(1, 7, 4);
                }
                if (two) {
                    _tile_loadd(5, x1 + kb * 16 * AMX_BLOCK, 64);
                    _tile_dpbf16ps(2, 6, 5);
                    if (second) _tile_dpbf16ps(3, 7, 5);
                }
            }
            float c[4][AMX_BLOCK][AMX_BLOCK]; /* [tile][weight row][token] */
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            for (int half = 0; half < 1 + two; half++) {
                const int64_t block = b + half;
                /* the activation for the block's real rows only; its padding rows get 0 */
                const int valid = (int)min_i64(AMX_BLOCK, p->n_rows - block * AMX_BLOCK);
                float scale_lanes[AMX_BLOCK];
                for (int t = 0; t < AMX_BLOCK; t++)
                    scale_lanes[t] = t >= valid ? 0.0f : p->row_scale ? p->row_scale[block * AMX_BLOCK + t] : 1.0f;
                const __m512 scale = _mm512_loadu_ps(scale_lanes);
                uint32_t *h = p->hpack + block * (${F} / 2) * AMX_BLOCK;
%   if gated then
                float *pre = p->pre ? p->pre + block * AMX_BLOCK * (2 * ${F}) : NULL;
                const float (*gate)[AMX_BLOCK] = c[2 * half], (*up)[AMX_BLOCK] = c[2 * half + 1];
                for (int i = 0; i < AMX_BLOCK; i += 2)
                    amx_epilogue_pair(gate[i], gate[i + 1], up[i], up[i + 1], scale, p->b1 ? p->b1 + f + i : NULL,
                                      p->b1 ? p->b1 + ${F} + f + i : NULL, valid, pre, 2 * ${F}, f + i, ${F} + f + i,
                                      h + ((f + i) / 2) * AMX_BLOCK);
%   else
                float *pre = p->pre ? p->pre + block * AMX_BLOCK * ${F} : NULL;
                for (int tile = 0; tile < 1 + second; tile++) {
                    const float (*acc)[AMX_BLOCK] = c[2 * half + tile];
                    const int64_t f0 = f + tile * AMX_BLOCK;
                    for (int i = 0; i < AMX_BLOCK; i += 2)
                        amx_epilogue_pair(acc[i], acc[i + 1], NULL, NULL, scale, p->b1 ? p->b1 + f0 + i : NULL, NULL,
                                          valid, pre, ${F}, f0 + i, 0, h + ((f0 + i) / 2) * AMX_BLOCK);
                }
%   end
            }
        }
    }
}

/* GEMM2 for rows [row0, row0 + BLOCK_ROWS) and output columns [col0, col0 + BLOCK_COLS). */
static void ${n}_amx_gemm2_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t b_first = row0 / AMX_BLOCK;
    const int64_t b_end = (min_i64(row0 + BLOCK_ROWS, p->n_rows) + AMX_BLOCK - 1) / AMX_BLOCK;
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, HIDDEN);
    for (int64_t o = col0; o < col_end; o += 2 * AMX_BLOCK) { /* output rows o.. and o + 16.. */
        const elem_t *a0 = p->w2 + o * ${F}, *a1 = p->w2 + (o + AMX_BLOCK) * ${F};
        const int second = o + AMX_BLOCK < col_end;
        for (int64_t b = b_first; b < b_end; b += 2) {
            const int two = b + 1 < b_end;
            const uint32_t *h0 = p->hpack + b * (${F} / 2) * AMX_BLOCK, *h1 = h0 + (${F} / 2) * AMX_BLOCK;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = 0; kb < ${F} / 32; kb++) {
                amx_prefetch_rows(a0, (kb + AMX_PREFETCH) * 32, ${F});
                if (second) amx_prefetch_rows(a1, (kb + AMX_PREFETCH) * 32, ${F});
                _tile_loadd(4, h0 + kb * 16 * AMX_BLOCK, 64);
                _tile_loadd(6, a0 + kb * 32, ${F} * 2);
                _tile_dpbf16ps(0, 6, 4);
                if (second) {
                    _tile_loadd(7, a1 + kb * 32, ${F} * 2);
                    _tile_dpbf16ps(1, 7, 4);
                }
                if (two) {
                    _tile_loadd(5, h1 + kb * 16 * AMX_BLOCK, 64);
                    _tile_dpbf16ps(2, 6, 5);
                    if (second) _tile_dpbf16ps(3, 7, 5);
                }
            }
            float c[4][AMX_BLOCK][AMX_BLOCK], ct[AMX_BLOCK][AMX_BLOCK]; /* [output][row], [row][output] */
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            for (int half = 0; half < 1 + two; half++)
                for (int tile = 0; tile < 1 + second; tile++) {
                    const void *in[AMX_BLOCK];
                    void *out[AMX_BLOCK];
                    for (int i = 0; i < AMX_BLOCK; i++) {
                        in[i] = c[2 * half + tile][i];
                        out[i] = ct[i];
                    }
                    amx_transpose16(in, out);
                    const int64_t first_row = (b + half) * AMX_BLOCK, o0 = o + tile * AMX_BLOCK;
                    for (int t = 0; t < AMX_BLOCK && first_row + t < p->n_rows; t++) {
                        float *dst = p->out + (first_row + t) * HIDDEN + o0;
                        for (int i = 0; i < AMX_BLOCK; i++)
                            dst[i] = ct[t][i] + (p->b2 ? elem_to_float(p->b2[o0 + i]) : 0.0f);
                    }
                }
        }
    }
}

/* Every problem of shape ${n} on AMX tiles: the x packs, all GEMM1 tasks, all GEMM2 tasks
 * (none when `gemm2` is 0).
 * `scratch` holds each problem's x pack and h pack (rows rounded up to blocks of 16). */
static void ${n}_run_amx(const ffn_problem *given, int n_problems, int n_threads, int gemm2,
                         uint32_t *scratch) {
    ffn_problem problems[n_problems];
    int64_t start0[n_problems + 1], start1[n_problems + 1], start2[n_problems + 1];
    const int64_t col_blocks1 = (${F} + BLOCK_COLS - 1) / BLOCK_COLS;
    const int64_t col_blocks2 = (HIDDEN + BLOCK_COLS - 1) / BLOCK_COLS;
    start0[0] = start1[0] = start2[0] = 0;
    for (int i = 0; i < n_problems; i++) {
        problems[i] = given[i];
        const int64_t blocks = (problems[i].n_rows + AMX_BLOCK - 1) / AMX_BLOCK;
        problems[i].xpack = scratch;
        scratch += blocks * AMX_BLOCK * (HIDDEN / 2);
        problems[i].hpack = scratch;
        scratch += blocks * AMX_BLOCK * (${F} / 2);
        const int64_t row_blocks = (problems[i].n_rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
        start0[i + 1] = start0[i] + blocks;
        start1[i + 1] = start1[i] + row_blocks * col_blocks1;
        start2[i + 1] = start2[i] + (gemm2 ? row_blocks * col_blocks2 : 0);
    }
#pragma omp parallel num_threads(n_threads)
    {
        amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start0[n_problems]; task++) {
            const int p = problem_of_task(start0, n_problems, task);
            amx_pack_rows(&problems[p], task - start0[p]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start1[n_problems]; task++) {
            const int p = problem_of_task(start1, n_problems, task);
            const int64_t local = task - start1[p];
            ${n}_amx_gemm1_task(&problems[p], (local / col_blocks1) * BLOCK_ROWS, (local % col_blocks1) * BLOCK_COLS);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < start2[n_problems]; task++) {
            const int p = problem_of_task(start2, n_problems, task);
            const int64_t local = task - start2[p];
            ${n}_amx_gemm2_task(&problems[p], (local / col_blocks2) * BLOCK_ROWS, (local % col_blocks2) * BLOCK_COLS);
        }
        _tile_release();
    }
}
% end
#endif /* AMX_COMPILED */

