% -- ffn.c.tpl — stage 3: the expert FFNs as grouped GEMMs. A "problem" is one expert
% -- (routed, shared or the residual MLP) over its rows; problems of one FFN shape run in
% -- one parallel sweep of (problem, row block, column block) tasks: GEMM1 with the
% -- activation fused into its epilogue, then GEMM2 with the bias in its epilogue. Every
% -- output element is computed by one task in a fixed order, so results do not depend
% -- on the thread count.
% local moe = import("templates/lib/moe.lua")
% local elem = moe.elem_type(spec.dtype)
% local gated = spec.gated
% local hcols = gated and "(TILE_COLS / 2)" or "TILE_COLS"
% local gemm = variant.cpu.gemm
% local pack_arg = moe.packs_rows(variant) and ", st->pack_scratch" or ""
/* ---- Stage 3: expert FFNs ------------------------------------------------------------ */

/* One expert applied to n_rows rows. Row r reads row row_token[r] of x (a zero row
 * when -1), or row r when row_token is NULL. */
typedef struct ffn_problem {
    const elem_t *x;        /* [.][HIDDEN] the rows' inputs: the tokens, or the caller's rows */
    const elem_t *w1, *b1;  /* [ffn_rows][HIDDEN], [ffn_rows] (b1 may be NULL) */
    const elem_t *w2, *b2;  /* [HIDDEN][ffn], [HIDDEN] (b2 may be NULL) */
    const int32_t *row_token;
    const float *row_scale; /* per-row input scale (weight_on_input) or NULL */
    int64_t n_rows;
    elem_t *hidden;         /* [n_rows][ffn] */
    float *out;             /* [n_rows][HIDDEN] */
    float *pre;             /* [n_rows][ffn_rows] the pre-activations, kept for the backward; or NULL */
% if gemm == "amx" then
    uint32_t *xpack, *hpack; /* the rows' inputs and activations as AMX tiles (amx.c.tpl) */
% elseif gemm == "outer" then
    float *xpack, *hpack;    /* the rows' inputs and activations as token panels (outer.c.tpl) */
% end
} ffn_problem;

/* The input of padding rows (row_token -1, and the rows AMX tiles round up to). */
static const elem_t zero_row[HIDDEN];

/* Columns of the activation one micro-kernel tile produces (gated tiles read the gate
 * and the up row of each column). */
#define TILE_HIDDEN_COLS ${hcols}

/* GEMM1's epilogue runs on chunks of its dot products: EPILOGUE_COLS activation columns (one
 * AVX-512 vector per row) of up to EPILOGUE_ROWS rows (whole row tiles: tiles fall where they
 * did without chunks). */
#define EPILOGUE_COLS 16
#define EPILOGUE_ROWS (TILE_ROWS * 16)

/* Which problem a flat task index falls in: the last p with task_start[p] <= task. */
static int problem_of_task(const int64_t *task_start, int n_problems, int64_t task) {
    int low = 0, high = n_problems - 1;
    while (low < high) {
        int mid = (low + high + 1) / 2;
        if (task_start[mid] <= task) low = mid;
        else high = mid - 1;
    }
    return low;
}
% if gemm == "amx" then

% include("templates/cpu/amx.c.tpl")
% elseif gemm == "outer" then

% include("templates/cpu/outer.c.tpl")
% end
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local n = shape.name
%   local F = shape.ffn
%   local dot1 = moe.dot_name(elem, elem, spec.hidden_size)
%   local dot2 = moe.dot_name(elem, elem, F)

/* ---- FFN shape ${n}: ${spec.hidden_size} -> ${shape.ffn_rows} (${spec.activation}) -> ${F} -> ${spec.hidden_size} ---- */

/* The GEMM1 epilogue of rows [r0, r1) (at most EPILOGUE_ROWS) x activation columns [f, f + n)
 * (n <= EPILOGUE_COLS), from their dot products gate[r - r0][j] (gated: and up[r - r0][j]):
 * row scale, bias, the pre-activations kept for the backward (training), the activation, the
 * value rounded into p->hidden. */
static void ${n}_activate(const ffn_problem *p, int64_t r0, int64_t r1, int64_t f, int n,
                          float gate[EPILOGUE_ROWS][EPILOGUE_COLS], float up[EPILOGUE_ROWS][EPILOGUE_COLS]) {
%   if not gated then
    (void)up;
%   end
#if VEC_AVX512 && EPILOGUE_COLS == 16
    const __mmask16 lanes = (__mmask16)((1u << n) - 1u);
    float bias[2][EPILOGUE_COLS] = {{0.0f}};
    for (int j = 0; p->b1 && j < n; j++) {
        bias[0][j] = elem_to_float(p->b1[f + j]);
%   if gated then
        bias[1][j] = elem_to_float(p->b1[${F} + f + j]);
%   end
    }
    const __m512 bias_gate = _mm512_loadu_ps(bias[0]), bias_up = _mm512_loadu_ps(bias[1]);
    for (int64_t r = r0; r < r1; r++) {
        const __m512 scale = _mm512_set1_ps(p->row_scale ? p->row_scale[r] : 1.0f);
        __m512 g = _mm512_maskz_loadu_ps(lanes, gate[r - r0]);
%   if gated then
        __m512 u = _mm512_maskz_loadu_ps(lanes, up[r - r0]);
        const __m512 value = activate16(scale, &g, &u, p->b1 != NULL, bias_gate, bias_up);
%   else
        const __m512 value = activate16(scale, &g, NULL, p->b1 != NULL, bias_gate, bias_up);
%   end
        if (p->pre) { /* training: the backward's input (backward.c.tpl) */
            _mm512_mask_storeu_ps(p->pre + r * ${shape.ffn_rows} + f, lanes, g);
%   if gated then
            _mm512_mask_storeu_ps(p->pre + r * ${shape.ffn_rows} + ${F} + f, lanes, u);
%   end
        }
        store_elems16(p->hidden + r * ${F} + f, lanes, value);
    }
#else
    for (int64_t r = r0; r < r1; r++) {
        const float scale = p->row_scale ? p->row_scale[r] : 1.0f;
        for (int j = 0; j < n; j++) {
            float g = scale * gate[r - r0][j];
%   if gated then
            float u = scale * up[r - r0][j];
%   end
            if (p->b1) {
                g += elem_to_float(p->b1[f + j]);
%   if gated then
                u += elem_to_float(p->b1[${F} + f + j]);
%   end
            }
            if (p->pre) { /* training: the backward's input (backward.c.tpl) */
                p->pre[r * ${shape.ffn_rows} + f + j] = g;
%   if gated then
                p->pre[r * ${shape.ffn_rows} + ${F} + f + j] = u;
%   end
            }
%   if gated then
            p->hidden[r * ${F} + f + j] = float_to_elem(activation(g) * u);
%   else
            p->hidden[r * ${F} + f + j] = float_to_elem(activation(g));
%   end
        }
    }
#endif
}

/* The weight rows of GEMM1's tile at activation column f, of a task whose columns end at `end`
 * (gated: the gate rows, then the up rows). A tile wider than what is left (gemm=outer's tiles
 * need not divide F; this GEMM1 recomputes its activations for the backward) repeats its last
 * row. */
static void ${n}_w1_tile(const ffn_problem *p, int64_t f, int64_t end, const elem_t *b[TILE_COLS]) {
    for (int64_t j = 0; j < TILE_HIDDEN_COLS; j++) {
        b[j] = p->w1 + tile_row(f, j, end) * HIDDEN;
%   if gated then
        b[TILE_HIDDEN_COLS + j] = p->w1 + (${F} + tile_row(f, j, end)) * HIDDEN;
%   end
    }
}

/* GEMM1 + activation for rows [row0, row0 + BLOCK_ROWS) and activation columns
 * [col0, col0 + BLOCK_COLS) of one problem: in chunks of EPILOGUE_ROWS rows x EPILOGUE_COLS
 * columns, the dot products first (each weight tile stays in L1 while the chunk's rows stream
 * past it), then the chunk's epilogue. */
static void ${n}_gemm1_task(const ffn_problem *p, int64_t row0, int64_t col0) {
    const int64_t row_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, ${F});
    for (int64_t r0 = row0; r0 < row_end; r0 += EPILOGUE_ROWS) {
        const int64_t r1 = min_i64(r0 + EPILOGUE_ROWS, row_end);
        for (int64_t g0 = col0; g0 < col_end; g0 += EPILOGUE_COLS) {
            const int64_t g1 = min_i64(g0 + EPILOGUE_COLS, col_end);
            float gate[EPILOGUE_ROWS][EPILOGUE_COLS];
%   if gated then
            float up[EPILOGUE_ROWS][EPILOGUE_COLS];
%   else
            float (*up)[EPILOGUE_COLS] = NULL;
%   end
            for (int64_t f = g0; f < g1; f += TILE_HIDDEN_COLS) {
                const int cols = (int)min_i64(TILE_HIDDEN_COLS, g1 - f);
                const elem_t *b[TILE_COLS], *next[TILE_COLS];
                ${n}_w1_tile(p, f, g1, b);
                const int64_t f_next = min_i64(f + TILE_HIDDEN_COLS, g1); /* where the next tile starts */
                ${n}_w1_tile(p, f_next < col_end ? f_next : f, col_end, next);
                for (int64_t r = r0; r < r1; r += TILE_ROWS) {
                    const int rows = (int)min_i64(TILE_ROWS, r1 - r); /* the last tile may be short */
                    const elem_t *a[TILE_ROWS];
                    for (int i = 0; i < TILE_ROWS; i++) {
                        int64_t row = tile_row(r, i, r1);
                        int64_t token = p->row_token ? p->row_token[row] : row;
                        a[i] = token >= 0 ? p->x + token * HIDDEN : zero_row;
                    }
                    float acc[TILE_ROWS][TILE_COLS];
                    ${dot1}(rows, a, b, next, acc);
                    for (int i = 0; i < rows; i++)
                        for (int j = 0; j < cols; j++) {
                            gate[r - r0 + i][f - g0 + j] = acc[i][j];
%   if gated then
                            up[r - r0 + i][f - g0 + j] = acc[i][TILE_HIDDEN_COLS + j];
%   end
                        }
                }
            }
            ${n}_activate(p, r0, r1, g0, (int)(g1 - g0), gate, up);
        }
    }
}

%   if gemm == "outer" then
/* GEMM2 for rows [row0, row0 + BLOCK_ROWS) and output columns [col0, col0 + BLOCK_COLS).
 * Unused with gemm=outer (its GEMM2 is ${n}_outer_gemm2_task); GEMM1 stays for the backward. */
static __attribute__((unused)) void ${n}_gemm2_task(const ffn_problem *p, int64_t row0, int64_t col0) {
%   else
/* GEMM2 for rows [row0, row0 + BLOCK_ROWS) and output columns [col0, col0 + BLOCK_COLS). */
static void ${n}_gemm2_task(const ffn_problem *p, int64_t row0, int64_t col0) {
%   end
    const int64_t row_end = min_i64(row0 + BLOCK_ROWS, p->n_rows);
    const int64_t col_end = min_i64(col0 + BLOCK_COLS, HIDDEN);
    for (int64_t c = col0; c < col_end; c += TILE_COLS) {
        const int cols = (int)min_i64(TILE_COLS, col_end - c); /* as in GEMM1 */
        const int64_t c_next = c + TILE_COLS < col_end ? c + TILE_COLS : c; /* the next tile's */
        const elem_t *b[TILE_COLS], *next[TILE_COLS];
        for (int j = 0; j < TILE_COLS; j++) {
            b[j] = p->w2 + tile_row(c, j, col_end) * ${F};
            next[j] = p->w2 + tile_row(c_next, j, col_end) * ${F};
        }
        for (int64_t r = row0; r < row_end; r += TILE_ROWS) {
            const int rows = (int)min_i64(TILE_ROWS, row_end - r);
            const elem_t *a[TILE_ROWS];
            for (int i = 0; i < TILE_ROWS; i++) a[i] = p->hidden + tile_row(r, i, row_end) * ${F};
            float acc[TILE_ROWS][TILE_COLS];
            ${dot2}(rows, a, b, next, acc);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++)
                    p->out[(r + i) * HIDDEN + c + j] = acc[i][j] + (p->b2 ? elem_to_float(p->b2[c + j]) : 0.0f);
        }
    }
}

%   if gemm == "outer" then
/* Run every problem of shape ${n} on outer products (`scratch` holds their token panels);
 * GEMM1 and its epilogue only when `gemm2` is 0 (the backward's recompute). */
static void ${n}_run(const ffn_problem *problems, int n_problems, int n_threads, int gemm2, float *scratch) {
    if (n_problems == 0) return;
    ${n}_run_outer(problems, n_problems, n_threads, gemm2, scratch);
}
%   else
%   if gemm == "amx" then
/* Run every problem of shape ${n}: on AMX tiles where the process may use them (`scratch`
 * holds their packs), else all GEMM1 tasks, a barrier, all GEMM2 tasks. GEMM1 and its
 * epilogue only when `gemm2` is 0 (the backward's recompute). */
static void ${n}_run(const ffn_problem *problems, int n_problems, int n_threads, int gemm2, uint32_t *scratch) {
    if (n_problems == 0) return;
#if AMX_COMPILED
    if (amx_usable()) {
        ${n}_run_amx(problems, n_problems, n_threads, gemm2, scratch);
        return;
    }
#else
    (void)scratch;
#endif
%   else
/* Run every problem of shape ${n}: all GEMM1 tasks, a barrier, all GEMM2 tasks (none when
 * `gemm2` is 0: the backward's recompute). */
static void ${n}_run(const ffn_problem *problems, int n_problems, int n_threads, int gemm2) {
    if (n_problems == 0) return;
%   end
    const int64_t col_blocks1 = (${F} + BLOCK_COLS - 1) / BLOCK_COLS;
    const int64_t col_blocks2 = (HIDDEN + BLOCK_COLS - 1) / BLOCK_COLS;
    int64_t start1[n_problems + 1], start2[n_problems + 1];
    start1[0] = start2[0] = 0;
    for (int p = 0; p < n_problems; p++) {
        int64_t row_blocks = (problems[p].n_rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
        start1[p + 1] = start1[p] + row_blocks * col_blocks1;
        start2[p + 1] = start2[p] + row_blocks * col_blocks2;
    }
    const int64_t n_tasks1 = start1[n_problems], n_tasks2 = gemm2 ? start2[n_problems] : 0;
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_tasks1; task++) {
            int p = problem_of_task(start1, n_problems, task);
            int64_t local = task - start1[p];
            ${n}_gemm1_task(&problems[p], (local / col_blocks1) * BLOCK_ROWS,
                         (local % col_blocks1) * BLOCK_COLS);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_tasks2; task++) {
            int p = problem_of_task(start2, n_problems, task);
            int64_t local = task - start2[p];
            ${n}_gemm2_task(&problems[p], (local / col_blocks2) * BLOCK_ROWS,
                         (local % col_blocks2) * BLOCK_COLS);
        }
    }
}
%   end
% end

/* Stage 3 entry: build the problem lists and run each FFN shape. `routed`: the routed
 * experts over the rows of the permutation; `dense`: the shared experts and the residual
 * MLP over every token. P_forward runs both in one sweep per shape; the staged entry
 * points run the routed experts in P_experts and the dense ones in P_combine (the same
 * tasks, so the same bits). */
static void run_experts(forward_state *st, int n_threads, int routed, int dense) {
    const moegen_kernel_weights *w = st->w;
% if not spec.use_residual and spec.shared.count == 0 then
    (void)dense; /* no dense experts in this layer */
% end
% local n_max = "NUM_EXPERTS + 1" .. (spec.shared.count > 0 and " + SHARED_EXPERTS" or "")
    ffn_problem problems[${n_max}];
    int n_problems;
% for _, shape in ipairs(moe.ffn_shapes(spec)) do
%   local F = shape.ffn
%   local rows = shape.ffn_rows

    /* Shape ${shape.name}. */
    n_problems = 0;
%   if F == spec.ffn_size then
    for (int e = 0; routed && e < NUM_EXPERTS; e++) {
        ffn_problem *p = &problems[n_problems++];
        const int64_t first_row = st->expert_offset[e];
        p->x = st->x;
        p->w1 = (const elem_t *)w->w1 + (int64_t)e * ${rows} * HIDDEN;
        p->b1 = w->b1 ? (const elem_t *)w->b1 + (int64_t)e * ${rows} : NULL;
        p->w2 = (const elem_t *)w->w2 + (int64_t)e * HIDDEN * ${F};
        p->b2 = w->b2 ? (const elem_t *)w->b2 + (int64_t)e * HIDDEN : NULL;
        p->row_token = st->row_token + first_row;
%     if spec.weight_on_input then
        p->row_scale = st->row_scale + first_row;
%     else
        p->row_scale = NULL;
%     end
        p->n_rows = st->expert_offset[e + 1] - first_row;
        p->hidden = st->hidden + first_row * ${F};
        p->out = st->expert_out + first_row * HIDDEN;
        p->pre = st->keep_routed ? st->keep_routed + first_row * ${rows} : NULL;
    }
%     if spec.use_residual then
    if (dense) {
        ffn_problem *p = &problems[n_problems++]; /* residual MLP: every token */
        p->x = st->x;
        p->w1 = (const elem_t *)w->residual_w1;
        p->b1 = (const elem_t *)w->residual_b1;
        p->w2 = (const elem_t *)w->residual_w2;
        p->b2 = (const elem_t *)w->residual_b2;
        p->row_token = NULL;
        p->row_scale = NULL;
        p->n_rows = st->n_tokens;
        p->hidden = st->residual_hidden;
        p->out = st->residual_out;
        p->pre = st->keep_residual;
    }
%     end
%   end
%   if spec.shared.count > 0 and F == spec.shared.ffn_size then
    for (int i = 0; dense && i < SHARED_EXPERTS; i++) {
        ffn_problem *p = &problems[n_problems++]; /* shared expert: every token */
        p->x = st->x;
        p->w1 = (const elem_t *)w->shared_w1 + (int64_t)i * ${rows} * HIDDEN;
        p->b1 = w->shared_b1 ? (const elem_t *)w->shared_b1 + (int64_t)i * ${rows} : NULL;
        p->w2 = (const elem_t *)w->shared_w2 + (int64_t)i * HIDDEN * ${F};
        p->b2 = w->shared_b2 ? (const elem_t *)w->shared_b2 + (int64_t)i * HIDDEN : NULL;
        p->row_token = NULL;
        p->row_scale = NULL;
        p->n_rows = st->n_tokens;
        p->hidden = st->shared_hidden + (int64_t)i * st->n_tokens * ${F};
        p->out = st->shared_out + (int64_t)i * st->n_tokens * HIDDEN;
        p->pre = st->keep_shared ? st->keep_shared + (int64_t)i * st->n_tokens * ${rows} : NULL;
    }
%   end
    ${shape.name}_run(problems, n_problems, n_threads, 1${pack_arg});
% end
}

/* P_experts: the routed experts [first, first + n) over the caller's rows, in one
 * parallel sweep like the routed experts of P_forward. */
static int run_routed_rows(const moegen_kernel_expert_args *a) {
    const int64_t rows = a->expert_offset[a->n_experts];
    ffn_problem problems[NUM_EXPERTS];
    for (int l = 0; l < a->n_experts; l++) {
        ffn_problem *p = &problems[l];
        const int64_t first_row = a->expert_offset[l];
        if (first_row < 0 || a->expert_offset[l + 1] < first_row || a->expert_offset[l + 1] > rows)
            return MOEGEN_KERNEL_EARG;
        p->x = (const elem_t *)a->x + first_row * HIDDEN;
        p->w1 = (const elem_t *)a->w1 + (int64_t)l * FFN_ROWS * HIDDEN;
        p->b1 = a->b1 ? (const elem_t *)a->b1 + (int64_t)l * FFN_ROWS : NULL;
        p->w2 = (const elem_t *)a->w2 + (int64_t)l * HIDDEN * FFN;
        p->b2 = a->b2 ? (const elem_t *)a->b2 + (int64_t)l * HIDDEN : NULL;
        p->row_token = NULL;
        p->row_scale = a->row_scale ? a->row_scale + first_row : NULL;
        p->n_rows = a->expert_offset[l + 1] - first_row;
        p->hidden = (elem_t *)a->hidden + first_row * FFN;
        p->out = a->out + first_row * HIDDEN;
        p->pre = NULL;
    }
% if moe.packs_rows(variant) then
    /* a->hidden: MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS elements, room for the packed rows */
    ${moe.shape_name(spec.ffn_size)}_run(problems, a->n_experts, a->n_threads > 0 ? a->n_threads : 1, 1,
                                       a->hidden);
% else
    ${moe.shape_name(spec.ffn_size)}_run(problems, a->n_experts, a->n_threads > 0 ? a->n_threads : 1, 1);
% end
    return MOEGEN_KERNEL_OK;
}
