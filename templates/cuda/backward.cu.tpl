% -- backward.cu.tpl — the training backward on the GPU (docs/numerics.md §8), from the
% -- workspace a training forward left (moegen_cuda_backward_args in moegen_cuda_abi.h). The
% -- same phases as the CPU backward (templates/cpu/backward.c.tpl), and the same per-token
% -- rules, included from templates/common/:
% --   P_bwd_combine        token pass A: d loss / d expert outputs (row_do), combine weights,
% --                        residual coefficients, shared gate;
% --   P_<shape>_bwd_pre    GEMM1 again: the pre-activations (fp32);
% --   P_<shape>_bwd_dh     dh = do W2, the activation's derivative in its epilogue -> da;
% --   P_<shape>_bwd_du     du = da W1;
% --   P_bwd_tokens         token pass B: the router's backward (one thread) and dx;
% --   P_<shape>_bwd_weights, P_bwd_dense_weights   the weight gradients.
% -- Every output element is one sum in a fixed order (k ascending, rows in row order, the
% -- block reductions a fixed tree), so gradients are reproducible run to run. The GEMMs are
% -- plain shared-memory-tiled FMA: correct first; tensor cores are later work.
% local moe = import("templates/lib/moe.lua")
% local P = gen.prefix
% local gated = spec.gated
/* ---- Training: the backward pass -------------------------------------------------------- */

#define BWD_TOKEN_THREADS MOEGEN_CUDA_BWD_TOKEN_THREADS /* moegen_cuda_abi.h: one block per token */
#define BWD_GEMM_THREADS MOEGEN_CUDA_BWD_GEMM_THREADS   /* 16 x 16 threads, 4 x 4 outputs each */
#define BWD_TILE MOEGEN_CUDA_BWD_TILE                   /* rows and columns of C per block */
#define BWD_K 16                                        /* k per shared-memory step */
static_assert(BWD_GEMM_THREADS == 256 && BWD_TILE == 64, "the tile loops assume 16 x 16 threads of 4 x 4");

% include("templates/common/router_scores.c.tpl")
% include("templates/common/router_backward.c.tpl")
% include("templates/common/activation_grad.c.tpl")

/* Sum v over a block of BWD_TOKEN_THREADS in a fixed tree; every thread gets the total. */
__device__ float bwd_block_sum(float v, float *scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned stride = BWD_TOKEN_THREADS / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

/* ---- Operand views of the GEMMs: value (row, column) of a matrix, as fp32 ------------------ */

struct view_f32 { /* row-major fp32 */
    const float *p;
    long long ld;
    __device__ float operator()(long long r, long long c) const { return p[r * ld + c]; }
};
struct view_f32_t { /* the transpose of a row-major fp32 matrix */
    const float *p;
    long long ld;
    __device__ float operator()(long long r, long long c) const { return p[c * ld + r]; }
};
struct view_elem { /* row-major, layer dtype */
    const elem_t *p;
    long long ld;
    __device__ float operator()(long long r, long long c) const { return elem_to_float(p[r * ld + c]); }
};
struct view_elem_t { /* the transpose of a row-major layer-dtype matrix */
    const elem_t *p;
    long long ld;
    __device__ float operator()(long long r, long long c) const { return elem_to_float(p[c * ld + r]); }
};
struct view_rows { /* the FFN inputs: row r is x[token[r]] (token r without a list) times scale[r] */
    const elem_t *x;
    const int *token;
    const float *scale;
    __device__ float operator()(long long r, long long c) const {
        const long long t = token ? token[r] : r;
        if (t < 0) return 0.0f; /* a padding row */
        const float v = elem_to_float(x[t * HIDDEN + c]);
        return scale ? scale[r] * v : v;
    }
};
struct view_router_input { /* the router's input: x, times the jitter in train mode */
    const elem_t *x;
    unsigned long long rng_offset;
    __device__ float operator()(long long t, long long c) const {
        float v = elem_to_float(x[t * HIDDEN + c]);
% if moe.uses_jitter(spec) then
        const float u = rng_uniform(rng_offset, RNG_STREAM_JITTER, (unsigned long long)t * HIDDEN + c);
        v *= (1.0f - INPUT_JITTER) + u * (2.0f * INPUT_JITTER);
% end
        return v;
    }
};

/* C[m][n] for m in [m0, m_end), n in [n0, n_end): sum over k in [0, K) of A(m, k) B(k, n),
 * k ascending, each element by one thread; store(m, n, value) writes it. A block-uniform
 * call (it synchronizes the block). */
template <class A, class B, class Store>
__device__ __forceinline__ void bwd_tile(const A a, const B b, long long m0, long long m_end, long long n0,
                                         long long n_end, long long K, const Store store) {
    __shared__ float a_tile[BWD_K][BWD_TILE + 1];
    __shared__ float b_tile[BWD_K][BWD_TILE + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (long long k0 = 0; k0 < K; k0 += BWD_K) {
        for (int i = threadIdx.x; i < BWD_K * BWD_TILE; i += BWD_GEMM_THREADS) {
            const int kk = i / BWD_TILE, mm = i % BWD_TILE;
            const long long k = k0 + kk;
            a_tile[kk][mm] = (k < K && m0 + mm < m_end) ? a(m0 + mm, k) : 0.0f;
            b_tile[kk][mm] = (k < K && n0 + mm < n_end) ? b(k, n0 + mm) : 0.0f;
        }
        __syncthreads();
        const int k_count = K - k0 < BWD_K ? (int)(K - k0) : BWD_K; /* a sum has exactly K terms */
        for (int kk = 0; kk < k_count; kk++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = b_tile[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const long long m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < m_end && n < n_end) store(m, n, acc[i][j]);
        }
}

struct store_plain { /* C[m][n] = v, or += v when accumulating into the caller's gradient */
    float *c;
    long long ld;
    int accumulate;
    __device__ void operator()(long long m, long long n, float v) const {
        float *dst = c + m * ld + n;
        *dst = accumulate ? *dst + v : v;
    }
};

/* Column c of A ([n_k][lda]) summed over its rows in order, into g[c] (bias gradients). */
__device__ __forceinline__ void column_sum(const float *a, long long lda, long long n_k, long long c, float *g,
                                           int accumulate) {
    float sum = 0.0f;
    for (long long k = 0; k < n_k; k++) sum += a[k * lda + c];
    g[c] = accumulate ? g[c] + sum : sum;
}

/* ---- Token pass A: the gradients of the combine (numerics §8.2 steps 1-3) ---------------- */

extern "C" __global__ void __launch_bounds__(BWD_TOKEN_THREADS) ${P}_bwd_combine(const moegen_cuda_backward_args b) {
    __shared__ float scratch[BWD_TOKEN_THREADS];
    (void)scratch; /* unused when no sum over the block is needed (weight_on_input alone) */
    const moegen_cuda_args &a = b.f;
    const long long t = blockIdx.x;
    const elem_t *dy = (const elem_t *)b.dy + t * HIDDEN;
    const int *row = a.route_row + t * TOP_K;
    const float *weight = a.route_final + t * TOP_K;
% if spec.use_residual then
    /* y = y_moe c0 + mlp c1: the coefficients again, and d loss / d c from y_moe (slot order). */
    const elem_t *x = (const elem_t *)a.x + t * HIDDEN;
    float q0 = 0.0f, q1 = 0.0f, dc0 = 0.0f, dc1 = 0.0f;
    for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS) {
        const float g = elem_to_float(dy[h]), xv = elem_to_float(x[h]);
        q0 += xv * a.w.residual_coef_w[h];
        q1 += xv * a.w.residual_coef_w[HIDDEN + h];
        float y_moe = 0.0f;
        for (int j = 0; j < TOP_K; j++) {
            if (row[j] < 0) continue;
            const float o = a.expert_out[(long long)row[j] * HIDDEN + h];
%   if spec.weight_on_input then
            y_moe += o;
%   else
            y_moe += weight[j] * o;
%   end
        }
        dc0 += g * y_moe;
        dc1 += g * a.residual_out[t * HIDDEN + h];
    }
    q0 = bwd_block_sum(q0, scratch) + a.w.residual_coef_b[0];
    q1 = bwd_block_sum(q1, scratch) + a.w.residual_coef_b[1];
    dc0 = bwd_block_sum(dc0, scratch);
    dc1 = bwd_block_sum(dc1, scratch);
    const float q_max = q0 > q1 ? q0 : q1;
    const float e0 = expf(q0 - q_max), e1 = expf(q1 - q_max);
    const float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
    const float mean = c0 * dc0 + c1 * dc1;
    if (threadIdx.x == 0) {
        b.coef_dq[t * 2] = c0 * (dc0 - mean);
        b.coef_dq[t * 2 + 1] = c1 * (dc1 - mean);
    }
    for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS)
        b.residual_do[t * HIDDEN + h] = c1 * elem_to_float(dy[h]);
    const float upstream_scale = c0; /* the upstream of y_moe is c0 dy */
% else
    const float upstream_scale = 1.0f; /* the upstream of y_moe is dy */
% end
% if spec.shared.count > 0 then
%   if spec.shared.gate then
    float gate_z = 0.0f, d_gamma = 0.0f;
    for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS) {
        gate_z += elem_to_float(((const elem_t *)a.x)[t * HIDDEN + h]) * a.w.shared_gate[h];
        float shared = 0.0f;
        for (int i = 0; i < SHARED_EXPERTS; i++) shared += a.shared_out[((long long)i * a.n_tokens + t) * HIDDEN + h];
        d_gamma += elem_to_float(dy[h]) * shared;
    }
    const float gamma = sigmoid(bwd_block_sum(gate_z, scratch));
    d_gamma = bwd_block_sum(d_gamma, scratch);
    if (threadIdx.x == 0) b.gate_dnu[t] = d_gamma * gamma * (1.0f - gamma);
%   else
    const float gamma = 1.0f;
%   end
    for (int i = 0; i < SHARED_EXPERTS; i++)
        for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS)
            b.shared_do[((long long)i * a.n_tokens + t) * HIDDEN + h] = gamma * elem_to_float(dy[h]);
% end
    for (int j = 0; j < TOP_K; j++) {
        if (row[j] < 0) { /* dropped, invalid or a padding token: no gradient */
            if (threadIdx.x == 0) b.dw_final[t * TOP_K + j] = 0.0f;
            continue;
        }
        float *d_out = b.row_do + (long long)row[j] * HIDDEN;
% if spec.weight_on_input then
        for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS)
            d_out[h] = upstream_scale * elem_to_float(dy[h]); /* output weight 1; dw in pass B */
        if (threadIdx.x == 0) b.dw_final[t * TOP_K + j] = 0.0f;
        (void)weight;
% else
        const float *o = a.expert_out + (long long)row[j] * HIDDEN;
        float dw = 0.0f;
        for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS) {
            const float up = upstream_scale * elem_to_float(dy[h]);
            dw += up * o[h];
            d_out[h] = weight[j] * up;
        }
        dw = bwd_block_sum(dw, scratch);
        if (threadIdx.x == 0) b.dw_final[t * TOP_K + j] = dw;
% end
    }
}

/* ---- Token pass B: the router's backward and dx (numerics §8.2 steps 4-10) --------------- */

extern "C" __global__ void __launch_bounds__(BWD_TOKEN_THREADS) ${P}_bwd_tokens(const moegen_cuda_backward_args b) {
    __shared__ float aux_grad[NUM_EXPERTS];
    const moegen_cuda_args &a = b.f;
    const long long t = blockIdx.x;
    const int *row = a.route_row + t * TOP_K;
    for (int e = threadIdx.x; e < NUM_EXPERTS; e += BWD_TOKEN_THREADS)
% if moe.aux_kind(spec) ~= "none" then
        aux_grad[e] = aux_gradient_of(b.aux_coeff, a.aux_counts[e], a.n_tokens);
% else
        aux_grad[e] = aux_gradient_of(b.aux_coeff, 0, a.n_tokens);
% end
% if spec.weight_on_input then
    /* the input was w x: d loss / d w = x . du */
    __shared__ float scratch[BWD_TOKEN_THREADS];
    const elem_t *x = (const elem_t *)a.x + t * HIDDEN;
    for (int j = 0; j < TOP_K; j++) {
        if (row[j] < 0) continue;
        const float *du = b.row_du + (long long)row[j] * HIDDEN;
        float dw = 0.0f;
        for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS) dw += elem_to_float(x[h]) * du[h];
        dw = bwd_block_sum(dw, scratch);
        if (threadIdx.x == 0) b.dw_final[t * TOP_K + j] = dw;
    }
% end
    __syncthreads();
    float *dz = b.dz + t * NUM_EXPERTS;
    if (threadIdx.x == 0)
        router_backward_token(a.logits + t * NUM_EXPERTS, a.route_expert + t * TOP_K, a.route_valid + t * TOP_K, row,
                              a.route_weight + t * TOP_K, b.dw_final + t * TOP_K, aux_grad, b.z_coeff, a.n_tokens, dz);
    __syncthreads(); /* dz, written by thread 0, is read by every thread */
    if (!b.dx) return;
% if spec.weight_on_input then
    const float *weight = a.route_final + t * TOP_K;
% end
    for (long long h = threadIdx.x; h < HIDDEN; h += BWD_TOKEN_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < TOP_K; j++) {
            if (row[j] < 0) continue;
            const float du = b.row_du[(long long)row[j] * HIDDEN + h];
% if spec.weight_on_input then
            acc += weight[j] * du;
% else
            acc += du;
% end
        }
% if spec.shared.count > 0 then
        for (int i = 0; i < SHARED_EXPERTS; i++) acc += b.shared_du[((long long)i * a.n_tokens + t) * HIDDEN + h];
%   if spec.shared.gate then
        acc += b.gate_dnu[t] * a.w.shared_gate[h];
%   end
% end
% if spec.use_residual then
        acc += b.residual_du[t * HIDDEN + h] +
               (b.coef_dq[t * 2] * a.w.residual_coef_w[h] + b.coef_dq[t * 2 + 1] * a.w.residual_coef_w[HIDDEN + h]);
% end
        float router = 0.0f;
        for (int e = 0; e < NUM_EXPERTS; e++) router += dz[e] * a.w.router_w[(long long)e * HIDDEN + h];
% if moe.uses_jitter(spec) then
        const float u = rng_uniform(a.rng_offset, RNG_STREAM_JITTER, (unsigned long long)t * HIDDEN + h);
        router *= (1.0f - INPUT_JITTER) + u * (2.0f * INPUT_JITTER); /* the router saw x * m */
% end
        ((elem_t *)b.dx)[t * HIDDEN + h] = float_to_elem(acc + router);
    }
}

/* ---- The FFNs' problems --------------------------------------------------------------------- */

/* One FFN of the backward (a routed expert over its real rows, a shared expert or the
 * residual MLP over every token): where its operands, gradients and weight gradients are. */
struct bwd_problem {
    long long n_rows;          /* real rows (an expert's padding rows carry no gradient) */
    const int *row_token;      /* routed rows: the token of each row; nullptr: row r is token r */
    const float *row_scale;    /* weight_on_input: the input scale of each row, or nullptr */
    const elem_t *w1, *b1, *w2;
    const elem_t *h;           /* [rows][F] the forward's activations */
    float *d_out, *pre, *du;   /* [rows][H], [rows][F1], [rows][H] */
    float *g_w1, *g_b1, *g_w2, *g_b2; /* fp32 weight gradients, or nullptr */
};

template <int F, int F1>
__device__ __forceinline__ bwd_problem bwd_operands(const moegen_cuda_backward_args &b, int group, int problem) {
    const moegen_cuda_args &a = b.f;
    const moegen_cuda_problem &p = a.problems[problem];
    const long long index = p.weight_index, first = p.row_start;
    bwd_problem q;
    q.n_rows = p.n_rows;
    q.row_token = nullptr;
    q.row_scale = nullptr;
    q.d_out = q.pre = q.du = nullptr;
    q.g_w1 = q.g_b1 = q.g_w2 = q.g_b2 = nullptr;
    const moegen_kernel_grads &g = b.grads;
    if (group == MOEGEN_GROUP_ROUTED) {
        q.n_rows = a.expert_kept[index];
        q.row_token = a.row_token + first;
% if spec.weight_on_input then
        q.row_scale = a.row_scale + first;
% end
        q.w1 = (const elem_t *)a.w.w1 + index * F1 * HIDDEN;
        q.b1 = a.w.b1 ? (const elem_t *)a.w.b1 + index * F1 : nullptr;
        q.w2 = (const elem_t *)a.w.w2 + index * HIDDEN * F;
        q.h = (const elem_t *)a.hidden + first * F;
        q.d_out = b.row_do + first * HIDDEN;
        q.pre = b.row_pre + first * F1;
        q.du = b.row_du + first * HIDDEN;
        if (g.w1) q.g_w1 = g.w1 + index * F1 * HIDDEN;
        if (g.w2) q.g_w2 = g.w2 + index * HIDDEN * F;
        if (g.b1) q.g_b1 = g.b1 + index * F1;
        if (g.b2) q.g_b2 = g.b2 + index * HIDDEN;
    }
% if spec.shared.count > 0 then
    if (group == MOEGEN_GROUP_SHARED) {
        q.w1 = (const elem_t *)a.w.shared_w1 + index * F1 * HIDDEN;
        q.b1 = a.w.shared_b1 ? (const elem_t *)a.w.shared_b1 + index * F1 : nullptr;
        q.w2 = (const elem_t *)a.w.shared_w2 + index * HIDDEN * F;
        q.h = (const elem_t *)a.shared_hidden + first * F;
        q.d_out = b.shared_do + first * HIDDEN;
        q.pre = b.shared_pre + first * F1;
        q.du = b.shared_du + first * HIDDEN;
        if (g.shared_w1) q.g_w1 = g.shared_w1 + index * F1 * HIDDEN;
        if (g.shared_w2) q.g_w2 = g.shared_w2 + index * HIDDEN * F;
        if (g.shared_b1) q.g_b1 = g.shared_b1 + index * F1;
        if (g.shared_b2) q.g_b2 = g.shared_b2 + index * HIDDEN;
    }
% end
% if spec.use_residual then
    if (group == MOEGEN_GROUP_RESIDUAL) {
        q.w1 = (const elem_t *)a.w.residual_w1;
        q.b1 = (const elem_t *)a.w.residual_b1;
        q.w2 = (const elem_t *)a.w.residual_w2;
        q.h = (const elem_t *)a.residual_hidden;
        q.d_out = b.residual_do;
        q.pre = b.residual_pre;
        q.du = b.residual_du;
        q.g_w1 = g.residual_w1;
        q.g_w2 = g.residual_w2;
        q.g_b1 = g.residual_b1;
        q.g_b2 = g.residual_b2;
    }
% end
    return q;
}

/* The rows of the forward's m tile blockIdx.x (TILE_M of them, as the forward's GEMM launch
 * grids): false when the CTA has no work; else [row0, row_end) of problem `problem`. */
__device__ __forceinline__ bool bwd_locate(const moegen_cuda_args &a, int group, int first, int count, int &problem,
                                           long long &row0) {
    const int tile = blockIdx.x;
    if (count == 0 || tile >= a.group_tiles[group]) return false;
    problem = find_problem(a.problems, first, count, tile);
    row0 = (long long)(tile - a.problems[problem].tile_start) * TILE_M;
    return true;
}

struct store_pre { /* GEMM1 again: pre = scale * acc + b1, as the forward's epilogue forms it */
    float *pre;
    long long ld;
    const float *scale;
    const elem_t *bias;
    __device__ void operator()(long long m, long long n, float v) const {
        const float s = scale ? scale[m] : 1.0f;
        pre[m * ld + n] = s * v + (bias ? elem_to_float(bias[n]) : 0.0f);
    }
};

struct store_activation_grad { /* dh -> d loss / d pre-activations, in place of them */
    float *pre;
    long long ld, ffn;
    __device__ void operator()(long long m, long long n, float dh) const {
        float *p = pre + m * ld;
% if gated then
        const float gate = p[n], up = p[ffn + n];
        p[n] = dh * up * activation_grad(gate);
        p[ffn + n] = dh * activation(gate);
% else
        p[n] = dh * activation_grad(p[n]);
% end
    }
};
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn
%   local F1 = shape.ffn_rows

/* ---- Backward of FFN shape ${n}: ${spec.hidden_size} -> ${F1} -> ${F} -> ${spec.hidden_size} ---- */

/* pre[rows][${F1}] = scale (x[rows] . w1^T) + b1, grid (the forward's m tiles, ceil(${F1} / BWD_TILE)). */
extern "C" __global__ void __launch_bounds__(BWD_GEMM_THREADS, 1)
    ${P}_${n}_bwd_pre(const moegen_cuda_backward_args b, int group, int first, int count) {
    int problem;
    long long row0;
    if (!bwd_locate(b.f, group, first, count, problem, row0)) return;
    const bwd_problem q = bwd_operands<${F}, ${F1}>(b, group, problem);
    const long long row_end = min_ll(row0 + TILE_M, q.n_rows), n0 = (long long)blockIdx.y * BWD_TILE;
    const view_rows x = {(const elem_t *)b.f.x, q.row_token, nullptr};
    const view_elem_t w1 = {q.w1, HIDDEN};
    const store_pre store = {q.pre, ${F1}, q.row_scale, q.b1};
    for (long long m0 = row0; m0 < row_end; m0 += BWD_TILE)
        bwd_tile(x, w1, m0, row_end, n0, min_ll(n0 + BWD_TILE, ${F1}), HIDDEN, store);
}

/* dh = do . w2 over columns [0, ${F}), then da in place of pre. */
extern "C" __global__ void __launch_bounds__(BWD_GEMM_THREADS, 1)
    ${P}_${n}_bwd_dh(const moegen_cuda_backward_args b, int group, int first, int count) {
    int problem;
    long long row0;
    if (!bwd_locate(b.f, group, first, count, problem, row0)) return;
    const bwd_problem q = bwd_operands<${F}, ${F1}>(b, group, problem);
    const long long row_end = min_ll(row0 + TILE_M, q.n_rows), n0 = (long long)blockIdx.y * BWD_TILE;
    const view_f32 d_out = {q.d_out, HIDDEN};
    const view_elem w2 = {q.w2, ${F}};
    const store_activation_grad store = {q.pre, ${F1}, ${F}};
    for (long long m0 = row0; m0 < row_end; m0 += BWD_TILE)
        bwd_tile(d_out, w2, m0, row_end, n0, min_ll(n0 + BWD_TILE, ${F}), HIDDEN, store);
}

/* du = da . w1 (d loss / d the FFN's input, scale included). */
extern "C" __global__ void __launch_bounds__(BWD_GEMM_THREADS, 1)
    ${P}_${n}_bwd_du(const moegen_cuda_backward_args b, int group, int first, int count) {
    int problem;
    long long row0;
    if (!bwd_locate(b.f, group, first, count, problem, row0)) return;
    const bwd_problem q = bwd_operands<${F}, ${F1}>(b, group, problem);
    const long long row_end = min_ll(row0 + TILE_M, q.n_rows), n0 = (long long)blockIdx.y * BWD_TILE;
    const view_f32 da = {q.pre, ${F1}};
    const view_elem w1 = {q.w1, HIDDEN};
    const store_plain store = {q.du, HIDDEN, 0};
    for (long long m0 = row0; m0 < row_end; m0 += BWD_TILE)
        bwd_tile(da, w1, m0, row_end, n0, min_ll(n0 + BWD_TILE, HIDDEN), ${F1}, store);
}

/* The weight gradients of problems [first, first + count): grid (BWD_WEIGHT_BLOCKS(${F}, ${F1}),
 * count). Blocks [0, W1) tile dW1 = da^T (scale x), then dW2 = do^T h, then the bias sums
 * (one column per thread); each a sum over the problem's rows in row order. An expert no
 * row reached gets zeros (or nothing added). */
extern "C" __global__ void __launch_bounds__(BWD_GEMM_THREADS, 1)
    ${P}_${n}_bwd_weights(const moegen_cuda_backward_args b, int group, int first, int count) {
    if ((int)blockIdx.y >= count) return;
    const bwd_problem q = bwd_operands<${F}, ${F1}>(b, group, first + (int)blockIdx.y);
    const long long w1_cols = MOEGEN_CUDA_CEIL_DIV(HIDDEN, BWD_TILE), w1_blocks = MOEGEN_CUDA_BWD_TILES(${F1}, HIDDEN);
    const long long w2_cols = MOEGEN_CUDA_CEIL_DIV(${F}, BWD_TILE), w2_blocks = MOEGEN_CUDA_BWD_TILES(HIDDEN, ${F});
    long long block = blockIdx.x;
    if (block < w1_blocks) {
        if (!q.g_w1) return;
        const long long m0 = block / w1_cols * BWD_TILE, n0 = block % w1_cols * BWD_TILE;
        const view_f32_t da = {q.pre, ${F1}};
        const view_rows x = {(const elem_t *)b.f.x, q.row_token, q.row_scale};
        bwd_tile(da, x, m0, min_ll(m0 + BWD_TILE, ${F1}), n0, min_ll(n0 + BWD_TILE, HIDDEN), q.n_rows,
                 store_plain{q.g_w1, HIDDEN, b.accumulate});
        return;
    }
    block -= w1_blocks;
    if (block < w2_blocks) {
        if (!q.g_w2) return;
        const long long m0 = block / w2_cols * BWD_TILE, n0 = block % w2_cols * BWD_TILE;
        const view_f32_t d_out = {q.d_out, HIDDEN};
        const view_elem h = {q.h, ${F}};
        bwd_tile(d_out, h, m0, min_ll(m0 + BWD_TILE, HIDDEN), n0, min_ll(n0 + BWD_TILE, ${F}), q.n_rows,
                 store_plain{q.g_w2, ${F}, b.accumulate});
        return;
    }
    block -= w2_blocks;
    const long long c = block * BWD_GEMM_THREADS + threadIdx.x; /* [0, F1): db1, then [F1, F1 + H): db2 */
    if (c < ${F1}) {
        if (q.g_b1) column_sum(q.pre, ${F1}, q.n_rows, c, q.g_b1, b.accumulate);
    } else if (c < ${F1} + HIDDEN) {
        if (q.g_b2) column_sum(q.d_out, HIDDEN, q.n_rows, c - ${F1}, q.g_b2, b.accumulate);
    }
}
% end

/* ---- The router's, residual coefficient's and shared gate's weight gradients ----------------- */

/* dG[m][n] (+)= sum over tokens of A[t][m] B[t][n], grid (BWD_DENSE_BLOCKS(M), 1): tiles of dG,
 * then the bias column sums of A. `which`: MOEGEN_CUDA_DENSE_ROUTER (dz, the router input),
 * _COEF (the residual coefficient logits' gradients, x), _GATE (the shared gate's, x). */
extern "C" __global__ void __launch_bounds__(BWD_GEMM_THREADS, 1)
    ${P}_bwd_dense_weights(const moegen_cuda_backward_args b, int which) {
    const moegen_cuda_args &a = b.f;
    const elem_t *x = (const elem_t *)a.x;
    const float *coeffs = b.dz;
    float *g = b.grads.router_w, *g_bias = b.grads.router_b;
    long long m_count = NUM_EXPERTS;
    if (which == MOEGEN_CUDA_DENSE_COEF) {
        coeffs = b.coef_dq;
        g = b.grads.residual_coef_w;
        g_bias = b.grads.residual_coef_b;
        m_count = 2;
    } else if (which == MOEGEN_CUDA_DENSE_GATE) {
        coeffs = b.gate_dnu;
        g = b.grads.shared_gate;
        g_bias = nullptr;
        m_count = 1;
    }
    const long long cols = MOEGEN_CUDA_CEIL_DIV(HIDDEN, BWD_TILE), tiles = MOEGEN_CUDA_BWD_TILES(m_count, HIDDEN);
    const long long block = blockIdx.x;
    if (block < tiles) {
        if (!g) return;
        const long long m0 = block / cols * BWD_TILE, n0 = block % cols * BWD_TILE;
        const view_f32_t c = {coeffs, m_count};
        const store_plain store = {g, HIDDEN, b.accumulate};
        if (which == MOEGEN_CUDA_DENSE_ROUTER)
            bwd_tile(c, view_router_input{x, a.rng_offset}, m0, min_ll(m0 + BWD_TILE, m_count), n0,
                     min_ll(n0 + BWD_TILE, HIDDEN), a.n_tokens, store);
        else
            bwd_tile(c, view_elem{x, HIDDEN}, m0, min_ll(m0 + BWD_TILE, m_count), n0, min_ll(n0 + BWD_TILE, HIDDEN),
                     a.n_tokens, store);
        return;
    }
    const long long m = (block - tiles) * BWD_GEMM_THREADS + threadIdx.x;
    if (g_bias && m < m_count) column_sum(coeffs, m_count, a.n_tokens, m, g_bias, b.accumulate);
}
