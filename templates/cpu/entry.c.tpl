% -- entry.c.tpl — the module's exported functions: info, workspace size, forward.
% -- forward checks its arguments, carves the workspace and runs the four stages.
% local moe = import("templates/lib/moe.lua")
% local dtype_code = ({ fp32 = 0, fp16 = 1, bf16 = 2 })[spec.dtype]
% local P = gen.prefix
/* ---- Workspace ------------------------------------------------------------------------ */

/* Largest token count one call accepts: route and row indices are int32. */
#define MAX_TOKENS (INT32_MAX / TOP_K)

/* Byte offsets of every workspace buffer for one token count; each 64-byte aligned. */
typedef struct workspace_layout {
    size_t router_input, logits, route_expert, route_weight, route_valid;
    size_t block_prob_sums, block_counts, block_z_sums;
    size_t counts_before, counts_after, expert_offset, row_token, row_scale, route_row;
    size_t route_final, scratch, hidden, expert_out, pack_scratch;
    size_t shared_hidden, shared_out, residual_hidden, residual_out;
    size_t summary;
    size_t total;
} workspace_layout;

static workspace_layout layout_for(int64_t n_tokens) {
    workspace_layout layout;
    memset(&layout, 0, sizeof layout);
    const size_t tokens = (size_t)n_tokens;
    const size_t routes = tokens * TOP_K;
    const size_t rows = (size_t)max_rows_for(n_tokens);
    const size_t blocks = (tokens + ROUTER_BLOCK - 1) / ROUTER_BLOCK;
    size_t offset = 0;
#define CARVE(field, bytes) (layout.field = offset, offset += ((size_t)(bytes) + 63) & ~(size_t)63)
    CARVE(router_input, tokens * HIDDEN * sizeof(float));
    CARVE(logits, tokens * NUM_EXPERTS * sizeof(float));
    CARVE(route_expert, routes * sizeof(int32_t));
    CARVE(route_weight, routes * sizeof(float));
    CARVE(route_valid, routes * sizeof(uint8_t));
    CARVE(block_prob_sums, blocks * NUM_EXPERTS * sizeof(double));
    CARVE(block_counts, blocks * NUM_EXPERTS * sizeof(int64_t));
    CARVE(block_z_sums, blocks * sizeof(double));
    CARVE(counts_before, NUM_EXPERTS * sizeof(int64_t));
    CARVE(counts_after, NUM_EXPERTS * sizeof(int64_t));
    CARVE(expert_offset, (NUM_EXPERTS + 1) * sizeof(int64_t));
    CARVE(row_token, rows * sizeof(int32_t));
    CARVE(row_scale, rows * sizeof(float));
    CARVE(route_row, routes * sizeof(int32_t));
    CARVE(route_final, routes * sizeof(float));
    CARVE(scratch, routes * sizeof(struct priority_entry));
    CARVE(hidden, rows * FFN * sizeof(elem_t));
    CARVE(expert_out, rows * HIDDEN * sizeof(float));
% if moe.packs_rows(variant) then
    { /* the x packs and h packs of the largest FFN shape, each problem's rows rounded up to
       * 16 (AMX tiles: amx.c.tpl; token panels of VEC_FLOATS <= 16 rows: outer.c.tpl) */
        size_t most = 0, elems;
%   for _, shape in ipairs(moe.ffn_shapes(spec)) do
        elems = (0
%     if shape.ffn == spec.ffn_size then
                 + rows + 16 * (size_t)NUM_EXPERTS
%       if spec.use_residual then
                 + tokens + 16
%       end
%     end
%     if spec.shared.count > 0 and shape.ffn == spec.shared.ffn_size then
                 + (size_t)SHARED_EXPERTS * (tokens + 16)
%     end
                 ) * (size_t)(HIDDEN + ${shape.ffn});
        if (elems > most) most = elems;
%   end
        CARVE(pack_scratch, most * sizeof(elem_t));
    }
% end
% if spec.shared.count > 0 then
    CARVE(shared_hidden, (size_t)SHARED_EXPERTS * tokens * SHARED_FFN * sizeof(elem_t));
    CARVE(shared_out, (size_t)SHARED_EXPERTS * tokens * HIDDEN * sizeof(float));
% end
% if spec.use_residual then
    CARVE(residual_hidden, tokens * FFN * sizeof(elem_t));
    CARVE(residual_out, tokens * HIDDEN * sizeof(float));
% end
    CARVE(summary, sizeof(route_summary));
#undef CARVE
    layout.total = offset;
    return layout;
}

/* ---- Exported functions ------------------------------------------------------------------ */

/* The build pin's definition (${gen.header_name}). */
const char ${P}_build_${gen.build_id}[] = "${gen.build_id}";

const char *${P}_describe(void) {
    return "${P}: spec sha256:${spec.hash}, variant ${variant.name}, moegen ${gen.version}, build ${gen.build_id}, "
% if variant.cpu.gemm == "amx" then
           "kernels " KERNEL_PATH_AMX " when the OS grants AMX, else " KERNEL_PATH;
% else
           "kernels " KERNEL_PATH;
% end
}

const moegen_kernel_info *${P}_info(void) {
    static const moegen_kernel_info info = {
        MOEGEN_KERNEL_ABI_VERSION, "${spec.hash}", "${variant.name}",
        NUM_EXPERTS, TOP_K, HIDDEN, FFN, FFN_ROWS, ${dtype_code} /* ${spec.dtype} */, KERNEL_PATH};
% if variant.cpu.gemm == "amx" then
    static const moegen_kernel_info amx_info = {
        MOEGEN_KERNEL_ABI_VERSION, "${spec.hash}", "${variant.name}",
        NUM_EXPERTS, TOP_K, HIDDEN, FFN, FFN_ROWS, ${dtype_code} /* ${spec.dtype} */, KERNEL_PATH_AMX};
    if (amx_usable()) return &amx_info; /* else: AMX not compiled in or not granted */
% end
    return &info;
}

size_t ${P}_workspace_bytes(int64_t n_tokens) {
    if (n_tokens < 0 || n_tokens > MAX_TOKENS) return 0;
    return layout_for(n_tokens).total;
}

% include("templates/common/weights.c.tpl")

static void carve_state(const moegen_kernel_args *args, forward_state *st);

/* The checks every staged call shares, then the per-call state carved from the
 * workspace. Returns MOEGEN_KERNEL_OK, or a negative code; *empty is 1 for 0 tokens
 * (nothing to route: the outputs are filled here and the caller returns). */
static int begin_call(const moegen_kernel_args *args, forward_state *st, int *empty) {
    *empty = 0;
    if (!args) return MOEGEN_KERNEL_EARG;
    if (args->abi_version != MOEGEN_KERNEL_ABI_VERSION) return MOEGEN_KERNEL_EABI;
    const int64_t n_tokens = args->n_tokens;
    moegen_kernel_outputs *out = args->out;
    if (!out || n_tokens < 0 || n_tokens > MAX_TOKENS) return MOEGEN_KERNEL_EARG;
    if (n_tokens > 0 && (!args->x || !out->y)) return MOEGEN_KERNEL_EARG;
    if (!weights_present(&args->w)) return MOEGEN_KERNEL_EARG;
    if (max_rows_for(n_tokens) > INT32_MAX) return MOEGEN_KERNEL_EARG;

    out->n_dropped = 0;
    out->capacity = capacity_for(n_tokens);
    out->aux_loss = 0.0;
    out->z_loss = 0.0;
    if (n_tokens == 0) { /* nothing to route: empty counts, zero losses */
        for (int e = 0; e < NUM_EXPERTS; e++) {
            if (out->counts_before) out->counts_before[e] = 0;
            if (out->counts_after) out->counts_after[e] = 0;
        }
        *empty = 1;
        return MOEGEN_KERNEL_OK;
    }
    if (!args->workspace || args->workspace_bytes < layout_for(n_tokens).total) return MOEGEN_KERNEL_EWORKSPACE;
    carve_state(args, st);
    return MOEGEN_KERNEL_OK;
}

/* The per-call state of args (n_tokens > 0): its tensors and the workspace buffers. */
static void carve_state(const moegen_kernel_args *args, forward_state *st) {
    const int64_t n_tokens = args->n_tokens;
    const workspace_layout layout = layout_for(n_tokens);
    char *base = args->workspace;
    memset(st, 0, sizeof *st);
    st->n_tokens = n_tokens;
    st->n_router_blocks = (n_tokens + ROUTER_BLOCK - 1) / ROUTER_BLOCK;
    st->rng_offset = args->rng_offset;
    st->x = args->x;
    st->used_token = args->used_token;
    st->w = &args->w;
    st->router_input = (float *)(base + layout.router_input);
    st->logits = (float *)(base + layout.logits);
    st->route_expert = (int32_t *)(base + layout.route_expert);
    st->route_weight = (float *)(base + layout.route_weight);
    st->route_valid = (uint8_t *)(base + layout.route_valid);
    st->block_prob_sums = (double *)(base + layout.block_prob_sums);
    st->block_counts = (int64_t *)(base + layout.block_counts);
    st->block_z_sums = (double *)(base + layout.block_z_sums);
    st->counts_before = (int64_t *)(base + layout.counts_before);
    st->counts_after = (int64_t *)(base + layout.counts_after);
    st->expert_offset = (int64_t *)(base + layout.expert_offset);
    st->row_token = (int32_t *)(base + layout.row_token);
    st->row_scale = (float *)(base + layout.row_scale);
    st->route_row = (int32_t *)(base + layout.route_row);
    st->route_final = (float *)(base + layout.route_final);
    st->scratch = (struct priority_entry *)(base + layout.scratch);
    st->hidden = (elem_t *)(base + layout.hidden);
    st->expert_out = (float *)(base + layout.expert_out);
% if moe.packs_rows(variant) then
    st->pack_scratch = base + layout.pack_scratch;
% end
% if spec.shared.count > 0 then
    st->shared_hidden = (elem_t *)(base + layout.shared_hidden);
    st->shared_out = (float *)(base + layout.shared_out);
% end
% if spec.use_residual then
    st->residual_hidden = (elem_t *)(base + layout.residual_hidden);
    st->residual_out = (float *)(base + layout.residual_out);
% end
    st->summary = (route_summary *)(base + layout.summary);
    keep_pointers(args, st);
}

static int threads_for(const moegen_kernel_args *args) {
#ifdef _OPENMP
    return args->n_threads > 0 ? args->n_threads : omp_get_max_threads();
#else
    (void)args;
    return 1;
#endif
}

/* Stages 1 and 2, then every output but y; the summary stays in the workspace. */
static void route_and_report(forward_state *st, moegen_kernel_outputs *out, int n_threads) {
    run_router(st, n_threads);             /* stage 1 */
    run_dispatch(st);                      /* stage 2 */
    *st->summary = (route_summary){st->capacity, st->n_rows, st->n_dropped, st->aux_loss, st->z_loss};
    const size_t route_bytes = (size_t)st->n_tokens * TOP_K;
    if (out->topk_ids) memcpy(out->topk_ids, st->route_expert, route_bytes * sizeof(int32_t));
    if (out->topk_weights) memcpy(out->topk_weights, st->route_final, route_bytes * sizeof(float));
    if (out->router_weights) memcpy(out->router_weights, st->route_weight, route_bytes * sizeof(float));
    if (out->counts_before) memcpy(out->counts_before, st->counts_before, NUM_EXPERTS * sizeof(int64_t));
    if (out->counts_after) memcpy(out->counts_after, st->counts_after, NUM_EXPERTS * sizeof(int64_t));
    out->n_dropped = st->n_dropped;
    out->aux_loss = st->aux_loss;
    out->z_loss = st->z_loss;
}

int ${P}_forward(const moegen_kernel_args *args) {
    forward_state st;
    int empty;
    int rc = begin_call(args, &st, &empty);
    if (rc != MOEGEN_KERNEL_OK || empty) return rc;
    const int n_threads = threads_for(args);
    route_and_report(&st, args->out, n_threads); /* stages 1 and 2 */
    run_experts(&st, n_threads, 1, 1);           /* stage 3: routed and dense in one sweep */
    run_combine(&st, args->out->y, n_threads);   /* stage 4 */
    return MOEGEN_KERNEL_OK;
}

int ${P}_route(const moegen_kernel_args *args, moegen_kernel_plan *plan) {
    static const int64_t no_rows[NUM_EXPERTS + 1]; /* the plan of 0 tokens */
    if (!plan) return MOEGEN_KERNEL_EARG;
    memset(plan, 0, sizeof *plan);
    forward_state st;
    int empty;
    int rc = begin_call(args, &st, &empty);
    if (rc != MOEGEN_KERNEL_OK) return rc;
    if (empty) {
        plan->expert_offset = no_rows;
        plan->counts_after = no_rows;
        return MOEGEN_KERNEL_OK;
    }
    route_and_report(&st, args->out, threads_for(args));
    plan->n_rows = st.n_rows;
    plan->expert_offset = st.expert_offset;
    plan->counts_after = st.counts_after;
    plan->row_token = st.row_token;
% if spec.weight_on_input then
    plan->row_scale = st.row_scale;
% end
    plan->expert_out = st.expert_out;
    return MOEGEN_KERNEL_OK;
}

int ${P}_experts(const moegen_kernel_expert_args *args) {
    if (!args) return MOEGEN_KERNEL_EARG;
    if (args->abi_version != MOEGEN_KERNEL_ABI_VERSION) return MOEGEN_KERNEL_EABI;
    if (args->first_expert < 0 || args->n_experts < 0 || args->first_expert > NUM_EXPERTS - args->n_experts)
        return MOEGEN_KERNEL_EARG;
    if (args->n_experts == 0) return MOEGEN_KERNEL_OK;
    if (!args->expert_offset || args->expert_offset[0] != 0 || args->expert_offset[args->n_experts] < 0)
        return MOEGEN_KERNEL_EARG;
    if (args->expert_offset[args->n_experts] == 0) return MOEGEN_KERNEL_OK;
    if (!args->x || !args->w1 || !args->w2 || !args->hidden || !args->out) return MOEGEN_KERNEL_EARG;
% if spec.expert_bias then
    if (!args->b1 || !args->b2) return MOEGEN_KERNEL_EARG;
% end
% if spec.weight_on_input then
    if (!args->row_scale) return MOEGEN_KERNEL_EARG;
% end
    return run_routed_rows(args);
}

int ${P}_combine(const moegen_kernel_args *args) {
    forward_state st;
    int empty;
    int rc = begin_call(args, &st, &empty);
    if (rc != MOEGEN_KERNEL_OK || empty) return rc;
    const route_summary summary = *st.summary; /* what P_route left */
    st.capacity = summary.capacity;
    st.n_rows = summary.n_rows;
    st.n_dropped = summary.n_dropped;
    const int n_threads = threads_for(args);
    run_experts(&st, n_threads, 0, 1); /* stage 3: the dense experts */
    run_combine(&st, args->out->y, n_threads);   /* stage 4 */
    args->out->n_dropped = summary.n_dropped;
    args->out->aux_loss = summary.aux_loss;
    args->out->z_loss = summary.z_loss;
    return MOEGEN_KERNEL_OK;
}
