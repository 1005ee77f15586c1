% -- amx_backward.c.tpl — the backward's expert GEMMs on AMX tiles (variant gemm = amx; bf16
% -- layers), for backward.c.tpl: the data GEMMs dh = do W2 and du = da W1 (C = G W, G the
% -- rows' fp32 gradients, W a weight tensor read as [k][n]: its [out][in] storage, k = out),
% -- and the weight gradients dW2 = do^T h and dW1 = da^T x (C = P^T Q, k over the rows).
% --
% -- TDPBF16PS takes the fp32 operand (G or P^T) as A (16 rows x 32 k, bf16) and the bf16 one
% -- (W, h or x) as B (16 pairs of k x 16 n). The fp32 operand is rounded to bf16 (numerics
% -- §8.4: the gradients of the rows enter the products in the layer dtype, as the forward's
% -- h enters GEMM2), packed per task; B's rows k and k + 1 are interleaved into pairs. C is
% -- [m][n], row-major: the store callbacks of backward.c.tpl receive whole rows of it, as
% -- from the FMA kernels.
% --
% -- Each element of C is the same chain of tile products (k chunks ascending) whatever the
% -- other rows of its tile hold, so results do not depend on the task grid or the threads.
/* ---- The backward's expert GEMMs on AMX tiles ------------------------------------------ */

#if AMX_COMPILED && defined(__AVX512BW__)
#define AMX_BACKWARD 1
#define AMX_BWD_KC 128 /* k per packed chunk of W (4 tiles of 32) */
#define AMX_BWD_AHEAD 64 /* rows of B prefetched ahead of the packing */
_Static_assert(AMX_BWD_ROWS % 16 == 0, "a task's rows: whole A tiles");
_Static_assert(BWD_TASK_COLS % 32 == 0, "a task's columns: whole pairs of B tiles");

static const elem_t amx_bwd_zero_cols[BWD_TASK_COLS]; /* B's rows past n_k */

/* B's rows k0 + 2p and k0 + 2p + 1 (row k of B: row b_index[k], or k, of b; 0 from n_k on),
 * columns [c0, c0 + n) (n a multiple of 32), for p < kc / 2: pairs, into n / 16 B tiles
 * ([tile][AMX_BWD_KC / 2][16] 32-bit pairs, rows p). */
static void amx_bwd_pack_b(const elem_t *b, int64_t ldb, const int32_t *b_index, int64_t n_k, int64_t k0,
                           int64_t kc, int64_t c0, int64_t n, uint32_t *panel) {
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);   /* columns 0-15 */
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4); /* columns 16-31 */
#define AMX_BWD_ROW(k) ((k) < n_k ? b + (b_index ? (int64_t)b_index[k] : (k)) * ldb + c0 : amx_bwd_zero_cols)
    for (int64_t p = 0; p < kc / 2; p++) {
        const int64_t k = k0 + 2 * p;
        const elem_t *r0 = AMX_BWD_ROW(k), *r1 = AMX_BWD_ROW(k + 1);
        if (k + AMX_BWD_AHEAD + 1 < n_k) { /* rows AMX_BWD_AHEAD ahead: far apart, past the prefetchers */
            const elem_t *ahead0 = AMX_BWD_ROW(k + AMX_BWD_AHEAD), *ahead1 = AMX_BWD_ROW(k + AMX_BWD_AHEAD + 1);
            for (int64_t c = 0; c < n; c += 32) {
                _mm_prefetch((const char *)(ahead0 + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(ahead1 + c), _MM_HINT_T0);
            }
        }
        for (int64_t c = 0; c < n; c += 32) {
            const __m512i x = _mm512_loadu_si512(r0 + c), y = _mm512_loadu_si512(r1 + c);
            /* per 128-bit lane L: lo holds columns 8L .. 8L + 3 as (k, k + 1) pairs, hi 8L + 4 .. */
            const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
            uint32_t *tile = panel + (c / 16) * (AMX_BWD_KC / 2) * 16 + p * 16;
            _mm512_storeu_si512(tile, _mm512_permutex2var_epi64(lo, first, hi));
            _mm512_storeu_si512(tile + (AMX_BWD_KC / 2) * 16, _mm512_permutex2var_epi64(lo, second, hi));
        }
    }
#undef AMX_BWD_ROW
}

/* A's rows [m0, m0 + 16 * row_tiles) x k in [k0, k0 + kc) (kc a multiple of 32), A[m][k] =
 * a[m * a_row + k * a_step] (times a_scale[k] when given; 0 from n_k on), rounded to bf16,
 * into apanel ([row][AMX_BWD_KC] bf16, A tiles with a stride of AMX_BWD_KC values). Rows past
 * m0 + rows are 0. */
static void amx_bwd_pack_a(const float *a, int64_t a_row, int64_t a_step, const float *a_scale, int64_t n_k,
                           int64_t m0, int rows, int row_tiles, int64_t k0, int64_t kc,
                           elem_t (*apanel)[AMX_BWD_KC]) {
    if (a_step == 1 && !a_scale) { /* rows of A: contiguous in k */
        for (int i = 0; i < rows; i++) {
            const float *src = a + (m0 + i) * a_row;
            for (int64_t k = 0; k < kc; k++) apanel[i][k] = k0 + k < n_k ? float_to_elem(src[k0 + k]) : 0;
        }
    } else { /* a_row == 1: columns of A, a_step apart (C = A^T B: the weight gradients) */
        for (int t = 0; t < row_tiles; t++) {
            for (int64_t kb = 0; kb < kc; kb += 32) {
                uint32_t pairs[16][16] __attribute__((aligned(64))); /* [k pair][m] */
                for (int q = 0; q < 16; q++) {
                    __m512i half[2];
                    for (int s = 0; s < 2; s++) {
                        const int64_t k = k0 + kb + 2 * q + s;
                        if (k >= n_k) {
                            half[s] = _mm512_setzero_si512();
                            continue;
                        }
                        __m512 v = _mm512_loadu_ps(a + k * a_step + m0 + 16 * t);
                        if (a_scale) v = _mm512_mul_ps(v, _mm512_set1_ps(a_scale[k]));
                        half[s] = round_bf16_16(v);
                    }
                    _mm512_store_si512(pairs[q], _mm512_or_si512(half[0], _mm512_slli_epi32(half[1], 16)));
                }
                const void *in[16];
                void *out[16];
                for (int i = 0; i < 16; i++) {
                    in[i] = pairs[i];
                    out[i] = &apanel[16 * t + i][kb];
                }
                amx_transpose16(in, out);
            }
        }
    }
    for (int i = rows; i < row_tiles * 16; i++) memset(apanel[i], 0, sizeof apanel[i]);
}

/* C = A B for rows [m0, m0 + rows) of C (at most AMX_BWD_ROWS) and columns [c0, c1)
 * (multiples of 32), summed over k < n_k in chunks of AMX_BWD_KC:
 * A[m][k] = a[m * a_row + k * a_step] (times a_scale[k] when given), rounded to bf16;
 * B's row k = row b_index[k] (or k) of b ([.][ldb], the layer dtype). C = G W (the data
 * GEMMs): a_row = ldg, a_step = 1. C = P^T Q (the weight gradients, k over the rows):
 * a_row = 1, a_step = ldp, and m0 + 16 * ceil(rows / 16) within P's columns. `store` receives each finished row
 * of C. The caller's thread has configured the tiles (amx_configure). */
static void amx_bwd_product(const float *a, int64_t a_row, int64_t a_step, const float *a_scale, int64_t m0,
                            int64_t rows, int64_t c0, int64_t c1, int64_t n_k, const elem_t *b, int64_t ldb,
                            const int32_t *b_index, tile_store_fn store, void *ctx) {
    enum { RB = AMX_BWD_ROWS, CB = BWD_TASK_COLS, KC = AMX_BWD_KC };
    float acc[RB][CB] __attribute__((aligned(64)));
    uint32_t bpanel[CB / 16][KC / 2][16] __attribute__((aligned(64)));
    elem_t apanel[RB][KC] __attribute__((aligned(64)));
    const int64_t n = c1 - c0;
    const int row_tiles = (int)((rows + 15) / 16);
    for (int64_t k0 = 0; k0 == 0 || k0 < n_k; k0 += KC) { /* once when n_k is 0: C = 0 */
        const int64_t kc = (min_i64(KC, n_k - k0) + 31) / 32 * 32; /* k past n_k: zeros */
        amx_bwd_pack_b(b, ldb, b_index, n_k, k0, kc, c0, n, &bpanel[0][0][0]);
        amx_bwd_pack_a(a, a_row, a_step, a_scale, n_k, m0, (int)rows, row_tiles, k0, kc, apanel);
        for (int t = 0; t < row_tiles; t += 2) {
            const int two = t + 1 < row_tiles; /* two row tiles share each B tile */
            for (int64_t c = 0; c < n; c += 32) {
                if (k0 == 0) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                } else {
                    _tile_loadd(0, &acc[16 * t][c], CB * 4);
                    _tile_loadd(1, &acc[16 * t][c + 16], CB * 4);
                    if (two) {
                        _tile_loadd(2, &acc[16 * t + 16][c], CB * 4);
                        _tile_loadd(3, &acc[16 * t + 16][c + 16], CB * 4);
                    }
                }
                for (int64_t kb = 0; kb < kc / 32; kb++) {
                    _tile_loadd(4, &bpanel[c / 16][kb * 16][0], 64);
                    _tile_loadd(5, &bpanel[c / 16 + 1][kb * 16][0], 64);
                    _tile_loadd(6, &apanel[16 * t][kb * 32], KC * 2);
                    _tile_dpbf16ps(0, 6, 4);
                    _tile_dpbf16ps(1, 6, 5);
                    if (two) {
                        _tile_loadd(7, &apanel[16 * t + 16][kb * 32], KC * 2);
                        _tile_dpbf16ps(2, 7, 4);
                        _tile_dpbf16ps(3, 7, 5);
                    }
                }
                _tile_stored(0, &acc[16 * t][c], CB * 4);
                _tile_stored(1, &acc[16 * t][c + 16], CB * 4);
                if (two) {
                    _tile_stored(2, &acc[16 * t + 16][c], CB * 4);
                    _tile_stored(3, &acc[16 * t + 16][c + 16], CB * 4);
                }
            }
        }
    }
    for (int64_t i = 0; i < rows; i++) store(ctx, m0 + i, c0, acc[i], (int)n);
}
#else
#define AMX_BACKWARD 0
#endif
