% -- dispatch.c.tpl — stage 2: capacity, drop priority, the expert-contiguous row order
% -- and the maps to undo it, and the final combine weights (docs/numerics.md §2).
% -- Sequential: O(S k) plus a sort per over-full expert for the probs / random priorities.
% local moe = import("templates/lib/moe.lua")
% local cap = spec.capacity
% local dropless = cap.mode == "dropless"
% local pad = cap.pad_to_capacity and not dropless
/* ---- Stage 2: capacity and permutation ---------------------------------------------- */

% include("templates/common/capacity.c.tpl")
% if not dropless and (cap.priority == "probs" or cap.priority == "random") then

static int compare_priority(const void *pa, const void *pb) {
    const struct priority_entry *a = pa, *b = pb;
    if (a->key != b->key) return a->key > b->key ? -1 : 1; /* higher priority first */
    return (a->token > b->token) - (a->token < b->token);  /* then lower token index */
}
% end

enum { ROUTE_DROPPED = -1, ROUTE_KEPT = -2 }; /* route_row before rows are assigned */

/* Decide which routes survive capacity, lay the kept routes out expert by expert
 * (tokens ascending within an expert), and compute the combine weights. */
static void run_dispatch(forward_state *st) {
    const int64_t n_tokens = st->n_tokens;
    const int64_t n_routes = n_tokens * TOP_K;
    int64_t *before = st->counts_before, *after = st->counts_after;
    for (int e = 0; e < NUM_EXPERTS; e++) before[e] = after[e] = 0;
    for (int64_t r = 0; r < n_routes; r++) {
        st->route_row[r] = ROUTE_DROPPED; /* until kept */
        if (st->route_valid[r]) before[st->route_expert[r]]++;
    }
    st->capacity = capacity_for(n_tokens);
% if dropless then

    /* Dropless: every valid route is kept. */
    for (int64_t r = 0; r < n_routes; r++)
        if (st->route_valid[r]) st->route_row[r] = ROUTE_KEPT;
% elseif cap.priority == "position" then

    /* position, token-major: the first C routes of each expert in token order. */
    for (int64_t r = 0; r < n_routes; r++) {
        if (!st->route_valid[r]) continue;
        int e = st->route_expert[r];
        if (after[e] < st->capacity) {
            after[e]++;
            st->route_row[r] = ROUTE_KEPT;
        }
    }
% elseif cap.priority == "position_choice_major" then

    /* position, choice-major: every first choice (in token order), then every second, ... */
    for (int j = 0; j < TOP_K; j++)
        for (int64_t t = 0; t < n_tokens; t++) {
            int64_t r = t * TOP_K + j;
            if (!st->route_valid[r]) continue;
            int e = st->route_expert[r];
            if (after[e] < st->capacity) {
                after[e]++;
                st->route_row[r] = ROUTE_KEPT;
            }
        }
% else

    /* ${cap.priority} priority: per expert, the C routes with the highest key
     * (${cap.priority == "probs" and "router weight" or "seeded uniform"}), ties to the lower token. */
    int64_t bucket_start[NUM_EXPERTS + 1];
    bucket_start[0] = 0;
    for (int e = 0; e < NUM_EXPERTS; e++) bucket_start[e + 1] = bucket_start[e] + before[e];
    int64_t fill[NUM_EXPERTS];
    for (int e = 0; e < NUM_EXPERTS; e++) fill[e] = bucket_start[e];
    for (int64_t r = 0; r < n_routes; r++) {
        if (!st->route_valid[r]) continue;
        struct priority_entry *entry = &st->scratch[fill[st->route_expert[r]]++];
%   if cap.priority == "probs" then
        entry->key = st->route_weight[r];
%   else
        entry->key = rng_uniform(st->rng_offset, RNG_STREAM_PRIORITY, (uint64_t)r);
%   end
        entry->token = (int32_t)(r / TOP_K);
        entry->route = (int32_t)r;
    }
    for (int e = 0; e < NUM_EXPERTS; e++) {
        struct priority_entry *bucket = st->scratch + bucket_start[e];
        int64_t n = before[e];
        if (n > st->capacity) {
            qsort(bucket, (size_t)n, sizeof *bucket, compare_priority);
            n = st->capacity;
        }
        for (int64_t i = 0; i < n; i++) st->route_row[bucket[i].route] = ROUTE_KEPT;
    }
% end

    /* Row order: expert-contiguous, tokens ascending within an expert. */
    for (int e = 0; e < NUM_EXPERTS; e++) after[e] = 0;
    for (int64_t r = 0; r < n_routes; r++)
        if (st->route_row[r] == ROUTE_KEPT) after[st->route_expert[r]]++;
    st->expert_offset[0] = 0;
    for (int e = 0; e < NUM_EXPERTS; e++)
% if pad then
        st->expert_offset[e + 1] = st->expert_offset[e] + st->capacity; /* pad to capacity */
% else
        st->expert_offset[e + 1] = st->expert_offset[e] + after[e];
% end
    st->n_rows = st->expert_offset[NUM_EXPERTS];
    int64_t next_row[NUM_EXPERTS];
    for (int e = 0; e < NUM_EXPERTS; e++) next_row[e] = st->expert_offset[e];
    for (int64_t r = 0; r < n_routes; r++) {
        if (st->route_row[r] != ROUTE_KEPT) continue;
        int64_t row = next_row[st->route_expert[r]]++;
        st->route_row[r] = (int32_t)row;
        st->row_token[row] = (int32_t)(r / TOP_K);
    }
% if pad then
    for (int e = 0; e < NUM_EXPERTS; e++)
        for (int64_t row = next_row[e]; row < st->expert_offset[e + 1]; row++)
            st->row_token[row] = -1; /* padding: zero input, never combined */
% end

    int64_t n_dropped = 0;
    for (int e = 0; e < NUM_EXPERTS; e++) n_dropped += before[e] - after[e];
    st->n_dropped = n_dropped;

    /* Combine weights of kept routes${cap.renormalize and ", renormalized per token" or ""}.
     * Every load below is unconditional and a dropped route is a select, never a
     * conditional load: GCC 12.2 (Debian 12's default) vectorizes this loop over tokens
     * with masked loads grouped by TOP_K and, when TOP_K is not a power of two, applies
     * the first group's mask to every load (wrong weights; GCC PR 114375, fixed in
     * 2024). tests/compiler/masked_group_load.c reproduces it. */
    for (int64_t t = 0; t < n_tokens; t++) {
        const float *weight = st->route_weight + t * TOP_K;
        const int32_t *row = st->route_row + t * TOP_K;
        float *final = st->route_final + t * TOP_K;
% if cap.renormalize then
        float kept_sum = 0.0f;
        for (int j = 0; j < TOP_K; j++) {
            const float w = weight[j];
            kept_sum += row[j] >= 0 ? w : 0.0f;
        }
        kept_sum = kept_sum > WEIGHT_SUM_EPS ? kept_sum : WEIGHT_SUM_EPS;
        for (int j = 0; j < TOP_K; j++) {
%   if spec.router.routed_scaling_factor ~= 1 then
            const float w = weight[j] / kept_sum * ROUTED_SCALING_FACTOR;
%   else
            const float w = weight[j] / kept_sum;
%   end
            final[j] = row[j] >= 0 ? w : 0.0f;
        }
% else
        for (int j = 0; j < TOP_K; j++) {
            const float w = weight[j];
            final[j] = row[j] >= 0 ? w : 0.0f;
        }
% end
% if spec.weight_on_input then
        for (int j = 0; j < TOP_K; j++) /* the expert sees w * x */
            if (row[j] >= 0) st->row_scale[row[j]] = final[j];
% end
    }
}

