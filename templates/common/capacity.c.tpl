% -- capacity.c.tpl — the capacity rule of docs/numerics.md §2 as generated C: its constants,
% -- capacity_for(S) and max_rows_for(S). One home for both backends' generated code: the CPU
% -- module's dispatch stage and the CUDA module's host-side forward include it.
% local cap = spec.capacity
% local dropless = cap.mode == "dropless"
% local pad = cap.pad_to_capacity and not dropless
% if cap.mode == "fixed" then
#define EXPERT_CAPACITY ${cap.expert_capacity}
% elseif cap.mode == "factor" and cap.formula == "deepspeed" then
#define MIN_CAPACITY ${cap.min_capacity}
/* f32(k * cf), the product formed in double and rounded once, as DeepSpeed's
 * torch.tensor(capacity_factor * k) (cf = ${f64(cap.factor)}, ${spec.mode} mode). */
static const float CAPACITY_SCALE = ${f32(cap.deepspeed_scale)};
% elseif cap.mode == "factor" then
static const double CAPACITY_FACTOR = ${f64(cap.factor)}; /* ${spec.mode} mode */
% end

/* Capacity per expert for n_tokens tokens (${cap.mode}${cap.mode == "factor" and (", " .. cap.formula .. " formula") or ""}). */
static int64_t capacity_for(int64_t n_tokens) {
% if dropless then
    (void)n_tokens;
    return -1; /* dropless: no capacity */
% elseif cap.mode == "fixed" then
    (void)n_tokens;
    return EXPERT_CAPACITY;
% elseif cap.formula == "deepspeed" then
    /* DeepSpeed: ceil in fp32 of S / E (formed in double, rounded to fp32) times the
     * fp32 scale f32(k * cf). */
    float tokens_per_expert = (float)((double)n_tokens / (double)${spec.num_experts});
    int64_t capacity = (int64_t)ceilf(tokens_per_expert * CAPACITY_SCALE);
    return capacity > MIN_CAPACITY ? capacity : MIN_CAPACITY;
% else
    /* Megatron: ceil(S * k / E * cf) in double, no minimum. */
    return (int64_t)ceil((double)(n_tokens * ${spec.top_k}) / ${spec.num_experts} * CAPACITY_FACTOR);
% end
}

/* Rows the expert stage processes at most for n_tokens tokens. */
static int64_t max_rows_for(int64_t n_tokens) {
% if pad then
    return ${spec.num_experts} * capacity_for(n_tokens); /* every expert has exactly C rows */
% else
    return n_tokens * ${spec.top_k};
% end
}
