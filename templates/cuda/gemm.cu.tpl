% -- gemm.cu.tpl — stage 3 on the GPU: grouped expert GEMMs. One launch per (FFN shape,
% -- problem group); blockIdx.x is an m tile counted across the group's problems (the
% -- problem is found by binary search in the table P_dispatch_place wrote), blockIdx.y
% -- an n tile. CTAs beyond the group's tiles return at once, so grids are sized by an
% -- upper bound and never need the counts on the host.
% --   GEMM1: rows of x (gathered through row_token, never copied) x w1^T -> activation
% --          (gate and up tiles side by side for gated layers) -> hidden, layer dtype.
% --   GEMM2: hidden x w2^T + b2 -> expert_out, fp32 (weighted in the combine).
% -- bf16 / fp16: tensor cores (mma.sync m16n8k16, fp32 accumulate), ldmatrix from an
% -- XOR-swizzled shared tile fed by a cp.async pipeline of STAGES stages.
% -- fp32: FMA on CUDA cores with the same pipeline (exact fp32; no TF32 rounding).
% -- The shapes (moe.ffn_shapes) decide which P_f<ffn>_gemm1/2 kernels exist; the runtime
% -- looks up the pair for each problem group's ffn size by name (moegen_cuda_abi.h).
% local moe = import("templates/lib/moe.lua")
% local P = gen.prefix
% local fp32 = spec.dtype == "fp32"
% local mma_type = spec.dtype == "bf16" and "bf16" or "f16"
% local gated = spec.gated
/* ---- Stage 3: grouped expert GEMMs -------------------------------------------------- */

#define CHUNK_ELEMS (16 / (int)sizeof(elem_t))     /* elements per 16-byte copy */
#define CHUNKS_PER_ROW (TILE_K / CHUNK_ELEMS)
% if fp32 then
#define SMEM_ROW (TILE_K + 4)                      /* fp32 rows padded by 16 bytes */
% else
#define SMEM_ROW TILE_K                            /* 16-bit rows, XOR-swizzled chunks */
% end
#define B_ROWS (${gated and 2 or 1} * TILE_N)       /* ${gated and "gate rows, then up rows" or "weight rows"} */

__device__ __forceinline__ unsigned shared_address(const void *p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

/* 16-byte asynchronous copy global -> shared; src_bytes 0 writes zeros. */
__device__ __forceinline__ void copy_async_16(unsigned dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Element offset of (row, chunk) in a shared tile. 16-bit tiles swizzle the 16-byte chunks
 * so that ldmatrix's eight row reads hit eight different bank groups. */
__device__ __forceinline__ int tile_offset(int row, int chunk) {
% if fp32 then
    return row * SMEM_ROW + chunk * CHUNK_ELEMS;
% else
#if TILE_K == 64
    return row * SMEM_ROW + ((chunk ^ (row & 7)) * CHUNK_ELEMS);
#else
    return row * SMEM_ROW + ((chunk ^ ((row >> 1) & 3)) * CHUNK_ELEMS);
#endif
% end
}
% if not fp32 then

__device__ __forceinline__ void load_matrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

/* c += a (16 x 16, row major) * b (16 x 8, column major); ${spec.dtype} in, fp32 accumulate. */
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.${mma_type}.${mma_type}.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two layer-dtype values packed for one 32-bit store (low half first in memory). */
__device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
    return (unsigned)float_to_elem(lo) | ((unsigned)float_to_elem(hi) << 16);
}
% end


/* Where one problem's operands live. */
struct gemm_problem {
    const elem_t *a;         /* GEMM1: x (rows via token); GEMM2: hidden rows */
    const int *row_token;    /* GEMM1 routed rows; nullptr: row r is token r */
    const float *row_scale;  /* weight_on_input scale per row, or nullptr */
    const elem_t *w, *bias;  /* weights [n][k] and bias [n] (bias may be nullptr) */
    elem_t *hidden;          /* GEMM1 output rows */
    float *out;              /* GEMM2 output rows */
    long long n_rows, tile_row0;
};

/* Locate this CTA's problem; false when the CTA has no work. */
__device__ __forceinline__ bool locate(const moegen_cuda_args &a, int group, int first, int count,
                                       int &problem, long long &tile_row0, long long &n_rows) {
    const int tile = blockIdx.x;
    if (count == 0 || tile >= a.group_tiles[group]) return false;
    problem = find_problem(a.problems, first, count, tile);
    const moegen_cuda_problem &p = a.problems[problem];
    tile_row0 = (long long)(tile - p.tile_start) * TILE_M;
    n_rows = p.n_rows;
    return tile_row0 < n_rows;
}
/* Issue the copies of one pipeline stage: TILE_M activation rows (a_row[m], nullptr for a
 * zero row) and the weight rows of columns [n0, n0 + TILE_N) (gate rows, then the up rows
 * UP_OFFSET further when GATED), k in [k0, k0 + TILE_K). Out-of-range chunks are zero-filled. */
template <int K, int N_LIMIT, bool GATED, int UP_OFFSET, typename Shared>
__device__ __forceinline__ void load_tile_stage(Shared *a_stage, Shared *b_stage, const elem_t *const *a_row,
                                                const elem_t *w, long long n0, int k0) {
    constexpr int B_TOTAL = (GATED ? 2 : 1) * TILE_N;
    for (int i = threadIdx.x; i < TILE_M * CHUNKS_PER_ROW; i += GEMM_THREADS) {
        const int row = i / CHUNKS_PER_ROW, chunk = i % CHUNKS_PER_ROW;
        const int k = k0 + chunk * CHUNK_ELEMS;
        const elem_t *src = a_row[row];
        const bool ok = src != nullptr && k < K;
        copy_async_16(shared_address(&a_stage[tile_offset(row, chunk)]), ok ? src + k : w, ok ? 16 : 0);
    }
    for (int i = threadIdx.x; i < B_TOTAL * CHUNKS_PER_ROW; i += GEMM_THREADS) {
        const int row = i / CHUNKS_PER_ROW, chunk = i % CHUNKS_PER_ROW;
        const int k = k0 + chunk * CHUNK_ELEMS;
        const long long n = n0 + (row % TILE_N);
        const long long w_row = (GATED && row >= TILE_N) ? UP_OFFSET + n : n;
        const bool ok = n < N_LIMIT && k < K;
        copy_async_16(shared_address(&b_stage[tile_offset(row, chunk)]), ok ? w + w_row * K + k : w, ok ? 16 : 0);
    }
}
% if not fp32 then

/* One CTA tile of C[TILE_M x TILE_N] (+ the up tile when GATED) = A[rows x K] * W[n x K]^T on
 * tensor cores. A rows come from `a_row[m]` (nullptr: zero row); W rows from w_row(n). */
template <int K, int N_LIMIT, bool GATED, int UP_OFFSET>
__device__ __forceinline__ void mma_tile(const elem_t *const *a_row, const elem_t *w, long long n0,
                                         float (&acc)[TILE_M / WARPS_M / 16][TILE_N / WARPS_N / 8][4],
                                         float (&acc_up)[TILE_M / WARPS_M / 16][TILE_N / WARPS_N / 8][4]) {
    constexpr int WARP_M = TILE_M / WARPS_M, WARP_N = TILE_N / WARPS_N;
    constexpr int M_TILES = WARP_M / 16, N_TILES = WARP_N / 8;
    constexpr int B_TOTAL = (GATED ? 2 : 1) * TILE_N;
    constexpr int K_TILES = (K + TILE_K - 1) / TILE_K;
    __shared__ __align__(128) elem_t a_tile[STAGES][TILE_M * SMEM_ROW];
    __shared__ __align__(128) elem_t b_tile[STAGES][B_TOTAL * SMEM_ROW];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

    auto load_stage = [&](int stage, int k_tile) {
        load_tile_stage<K, N_LIMIT, GATED, UP_OFFSET>(a_tile[stage], b_tile[stage], a_row, w, n0, k_tile * TILE_K);
    };

#pragma unroll
    for (int i = 0; i < M_TILES; i++)
#pragma unroll
        for (int j = 0; j < N_TILES; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = acc_up[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < K_TILES) load_stage(s, s);
        copy_async_commit();
    }
    for (int k_tile = 0; k_tile < K_TILES; k_tile++) {
        copy_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = k_tile + STAGES - 1;
        if (next < K_TILES) load_stage(next % STAGES, next);
        copy_async_commit();
        const elem_t *a_stage = a_tile[k_tile % STAGES];
        const elem_t *b_stage = b_tile[k_tile % STAGES];
#pragma unroll
        for (int kk = 0; kk < TILE_K / 16; kk++) {
            unsigned a_frag[M_TILES][4];
#pragma unroll
            for (int i = 0; i < M_TILES; i++) {
                const int row = warp_m * WARP_M + i * 16 + (lane % 16);
                load_matrix_x4(a_frag[i], shared_address(a_stage + tile_offset(row, kk * 2 + lane / 16)));
            }
#pragma unroll
            for (int j = 0; j < N_TILES; j += 2) {
                const int n_row = warp_n * WARP_N + j * 8 + (lane % 8) + (lane / 16) * 8;
                const int chunk = kk * 2 + (lane / 8) % 2;
                unsigned b_frag[4];
                load_matrix_x4(b_frag, shared_address(b_stage + tile_offset(n_row, chunk)));
#pragma unroll
                for (int i = 0; i < M_TILES; i++) {
                    mma_16x8x16(acc[i][j], a_frag[i], b_frag[0], b_frag[1]);
                    mma_16x8x16(acc[i][j + 1], a_frag[i], b_frag[2], b_frag[3]);
                }
                if (GATED) {
                    unsigned up_frag[4];
                    load_matrix_x4(up_frag, shared_address(b_stage + tile_offset(TILE_N + n_row, chunk)));
#pragma unroll
                    for (int i = 0; i < M_TILES; i++) {
                        mma_16x8x16(acc_up[i][j], a_frag[i], up_frag[0], up_frag[1]);
                        mma_16x8x16(acc_up[i][j + 1], a_frag[i], up_frag[2], up_frag[3]);
                    }
                }
            }
        }
    }
    copy_async_wait<0>();
}
% else

/* One CTA tile on CUDA cores (fp32): thread (ty, tx) of a (GEMM_THREADS / 8) x 8 grid owns
 * rows ty + i * (GEMM_THREADS / 8) and columns tx + 8 * j; every sum runs k in order. */
#define FMA_ROW_THREADS (GEMM_THREADS / 8)
#define FMA_ROWS (TILE_M / FMA_ROW_THREADS)
#define FMA_COLS (TILE_N / 8)
template <int K, int N_LIMIT, bool GATED, int UP_OFFSET>
__device__ __forceinline__ void fma_tile(const elem_t *const *a_row, const elem_t *w, long long n0,
                                         float (&acc)[FMA_ROWS][FMA_COLS], float (&acc_up)[FMA_ROWS][FMA_COLS]) {
    constexpr int B_TOTAL = (GATED ? 2 : 1) * TILE_N;
    constexpr int K_TILES = (K + TILE_K - 1) / TILE_K;
    __shared__ __align__(16) float a_tile[STAGES][TILE_M * SMEM_ROW];
    __shared__ __align__(16) float b_tile[STAGES][B_TOTAL * SMEM_ROW];
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;

    auto load_stage = [&](int stage, int k_tile) {
        load_tile_stage<K, N_LIMIT, GATED, UP_OFFSET>(a_tile[stage], b_tile[stage], a_row, w, n0, k_tile * TILE_K);
    };

#pragma unroll
    for (int i = 0; i < FMA_ROWS; i++)
#pragma unroll
        for (int j = 0; j < FMA_COLS; j++) acc[i][j] = acc_up[i][j] = 0.0f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < K_TILES) load_stage(s, s);
        copy_async_commit();
    }
    for (int k_tile = 0; k_tile < K_TILES; k_tile++) {
        copy_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = k_tile + STAGES - 1;
        if (next < K_TILES) load_stage(next % STAGES, next);
        copy_async_commit();
        const float *a_stage = a_tile[k_tile % STAGES];
        const float *b_stage = b_tile[k_tile % STAGES];
#pragma unroll 4
        for (int k = 0; k < TILE_K; k++) {
            float a_value[FMA_ROWS], b_value[FMA_COLS];
#pragma unroll
            for (int i = 0; i < FMA_ROWS; i++) a_value[i] = a_stage[(ty + i * FMA_ROW_THREADS) * SMEM_ROW + k];
#pragma unroll
            for (int j = 0; j < FMA_COLS; j++) b_value[j] = b_stage[(tx + 8 * j) * SMEM_ROW + k];
#pragma unroll
            for (int i = 0; i < FMA_ROWS; i++)
#pragma unroll
                for (int j = 0; j < FMA_COLS; j++) acc[i][j] = fmaf(a_value[i], b_value[j], acc[i][j]);
            if (GATED) {
#pragma unroll
                for (int j = 0; j < FMA_COLS; j++) b_value[j] = b_stage[(TILE_N + tx + 8 * j) * SMEM_ROW + k];
#pragma unroll
                for (int i = 0; i < FMA_ROWS; i++)
#pragma unroll
                    for (int j = 0; j < FMA_COLS; j++) acc_up[i][j] = fmaf(a_value[i], b_value[j], acc_up[i][j]);
            }
        }
    }
    copy_async_wait<0>();
}
% end

/* Operands of problem `problem` of `group` for an FFN of size F (F1 weight rows). */
template <int F, int F1>
__device__ __forceinline__ gemm_problem problem_operands(const moegen_cuda_args &a, int group, int problem) {
    gemm_problem g;
    const moegen_cuda_problem &p = a.problems[problem];
    const long long index = p.weight_index;
    g.n_rows = p.n_rows;
    g.row_scale = nullptr;
    g.row_token = nullptr;
    if (group == MOEGEN_GROUP_ROUTED) {
        g.row_token = a.row_token + p.row_start;
% if spec.weight_on_input then
        g.row_scale = a.row_scale + p.row_start;
% end
        g.w = (const elem_t *)a.w.w1 + index * F1 * HIDDEN;
        g.bias = a.w.b1 ? (const elem_t *)a.w.b1 + index * F1 : nullptr;
        g.hidden = (elem_t *)a.hidden + p.row_start * F;
        g.out = a.expert_out + p.row_start * HIDDEN;
    } else if (group == MOEGEN_GROUP_SHARED) {
        g.w = (const elem_t *)a.w.shared_w1 + index * F1 * HIDDEN;
        g.bias = a.w.shared_b1 ? (const elem_t *)a.w.shared_b1 + index * F1 : nullptr;
        g.hidden = (elem_t *)a.shared_hidden + p.row_start * F;
        g.out = a.shared_out + p.row_start * HIDDEN;
    } else {
        g.w = (const elem_t *)a.w.residual_w1;
        g.bias = (const elem_t *)a.w.residual_b1;
        g.hidden = (elem_t *)a.residual_hidden;
        g.out = a.residual_out;
    }
    g.a = (const elem_t *)a.x;
    return g;
}

/* The down projection's weights and bias for a problem. */
template <int F>
__device__ __forceinline__ void down_weights(const moegen_cuda_args &a, int group, int problem,
                                             const elem_t *&w, const elem_t *&bias) {
    const long long index = a.problems[problem].weight_index;
    if (group == MOEGEN_GROUP_ROUTED) {
        w = (const elem_t *)a.w.w2 + index * HIDDEN * F;
        bias = a.w.b2 ? (const elem_t *)a.w.b2 + index * HIDDEN : nullptr;
    } else if (group == MOEGEN_GROUP_SHARED) {
        w = (const elem_t *)a.w.shared_w2 + index * HIDDEN * F;
        bias = a.w.shared_b2 ? (const elem_t *)a.w.shared_b2 + index * HIDDEN : nullptr;
    } else {
        w = (const elem_t *)a.w.residual_w2;
        bias = (const elem_t *)a.w.residual_b2;
    }
}
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn
%   local F1 = shape.ffn_rows

/* ---- FFN shape ${n}: ${spec.hidden_size} -> ${F1} (${spec.activation}) -> ${F} -> ${spec.hidden_size} ---- */

/* GEMM1 + activation: hidden[rows][${F}] = act(x[rows] . w1^T (+ b1)). */
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) ${P}_${n}_gemm1(const moegen_cuda_args a, int group,
                                                                          int first, int count) {
    int problem;
    long long tile_row0, n_rows;
    if (!locate(a, group, first, count, problem, tile_row0, n_rows)) return;
    const gemm_problem g = problem_operands<${F}, ${F1}>(a, group, problem);
    __shared__ const elem_t *a_row[TILE_M];
    __shared__ float row_scale[TILE_M];
    for (int m = threadIdx.x; m < TILE_M; m += GEMM_THREADS) {
        const long long row = tile_row0 + m;
        const long long token = row >= n_rows ? -1 : (g.row_token ? g.row_token[row] : row);
        a_row[m] = token >= 0 ? g.a + token * HIDDEN : nullptr; /* nullptr: zero row */
        row_scale[m] = (g.row_scale && row < n_rows) ? g.row_scale[row] : 1.0f;
    }
    __syncthreads();
    const long long n0 = (long long)blockIdx.y * TILE_N; /* activation columns [n0, n0 + TILE_N) */
% if not fp32 then
    constexpr int WARP_M = TILE_M / WARPS_M, WARP_N = TILE_N / WARPS_N;
    float acc[WARP_M / 16][WARP_N / 8][4], acc_up[WARP_M / 16][WARP_N / 8][4];
    mma_tile<HIDDEN, ${F}, ${gated and "true" or "false"}, ${F}>(a_row, g.w, n0, acc, acc_up);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < WARP_M / 16; i++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int m = warp_m * WARP_M + i * 16 + lane / 4 + half * 8;
            const long long row = tile_row0 + m;
            if (row >= n_rows) continue;
            const float scale = row_scale[m];
#pragma unroll
            for (int j = 0; j < WARP_N / 8; j++) {
                const long long f = n0 + warp_n * WARP_N + j * 8 + (lane % 4) * 2;
                if (f >= ${F}) continue;
                float h[2];
#pragma unroll
                for (int q = 0; q < 2; q++) {
                    float gate = scale * acc[i][j][half * 2 + q];
%   if gated then
                    float up = scale * acc_up[i][j][half * 2 + q];
                    if (g.bias) {
                        gate += elem_to_float(g.bias[f + q]);
                        up += elem_to_float(g.bias[${F} + f + q]);
                    }
                    h[q] = activation(gate) * up;
%   else
                    if (g.bias) gate += elem_to_float(g.bias[f + q]);
                    h[q] = activation(gate);
%   end
                }
                *(unsigned *)(g.hidden + row * ${F} + f) = pack_pair(h[0], h[1]);
            }
        }
% else
    float acc[FMA_ROWS][FMA_COLS], acc_up[FMA_ROWS][FMA_COLS];
    fma_tile<HIDDEN, ${F}, ${gated and "true" or "false"}, ${F}>(a_row, g.w, n0, acc, acc_up);
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < FMA_ROWS; i++) {
        const int m = ty + i * FMA_ROW_THREADS;
        const long long row = tile_row0 + m;
        if (row >= n_rows) continue;
        const float scale = row_scale[m];
#pragma unroll
        for (int j = 0; j < FMA_COLS; j++) {
            const long long f = n0 + tx + 8 * j;
            if (f >= ${F}) continue;
            float gate = scale * acc[i][j];
%   if gated then
            float up = scale * acc_up[i][j];
            if (g.bias) {
                gate += g.bias[f];
                up += g.bias[${F} + f];
            }
            g.hidden[row * ${F} + f] = activation(gate) * up;
%   else
            if (g.bias) gate += g.bias[f];
            g.hidden[row * ${F} + f] = activation(gate);
%   end
        }
    }
% end
}

/* GEMM2: out[rows][HIDDEN] = hidden[rows] . w2^T (+ b2), fp32. */
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) ${P}_${n}_gemm2(const moegen_cuda_args a, int group,
                                                                          int first, int count) {
    int problem;
    long long tile_row0, n_rows;
    if (!locate(a, group, first, count, problem, tile_row0, n_rows)) return;
    const gemm_problem g = problem_operands<${F}, ${F1}>(a, group, problem);
    const elem_t *w;
    const elem_t *bias;
    down_weights<${F}>(a, group, problem, w, bias);
    __shared__ const elem_t *a_row[TILE_M];
    for (int m = threadIdx.x; m < TILE_M; m += GEMM_THREADS) {
        const long long row = tile_row0 + m;
        a_row[m] = row < n_rows ? g.hidden + row * ${F} : nullptr;
    }
    __syncthreads();
    const long long n0 = (long long)blockIdx.y * TILE_N; /* output columns [n0, n0 + TILE_N) */
% if not fp32 then
    constexpr int WARP_M = TILE_M / WARPS_M, WARP_N = TILE_N / WARPS_N;
    float acc[WARP_M / 16][WARP_N / 8][4], unused[WARP_M / 16][WARP_N / 8][4];
    mma_tile<${F}, HIDDEN, false, 0>(a_row, w, n0, acc, unused);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < WARP_M / 16; i++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const long long row = tile_row0 + warp_m * WARP_M + i * 16 + lane / 4 + half * 8;
            if (row >= n_rows) continue;
#pragma unroll
            for (int j = 0; j < WARP_N / 8; j++) {
                const long long c = n0 + warp_n * WARP_N + j * 8 + (lane % 4) * 2;
                if (c >= HIDDEN) continue;
                float2 v = make_float2(acc[i][j][half * 2], acc[i][j][half * 2 + 1]);
                if (bias) {
                    v.x += elem_to_float(bias[c]);
                    v.y += elem_to_float(bias[c + 1]);
                }
                *(float2 *)(g.out + row * HIDDEN + c) = v;
            }
        }
% else
    float acc[FMA_ROWS][FMA_COLS], unused[FMA_ROWS][FMA_COLS];
    fma_tile<${F}, HIDDEN, false, 0>(a_row, w, n0, acc, unused);
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < FMA_ROWS; i++) {
        const long long row = tile_row0 + ty + i * FMA_ROW_THREADS;
        if (row >= n_rows) continue;
#pragma unroll
        for (int j = 0; j < FMA_COLS; j++) {
            const long long c = n0 + tx + 8 * j;
            if (c < HIDDEN) g.out[row * HIDDEN + c] = acc[i][j] + (bias ? bias[c] : 0.0f);
        }
    }
% end
}
% end

