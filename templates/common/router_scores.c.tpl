% -- router_scores.c.tpl — a token's router scores from its sanitized logits, and the softmax
% -- the load-balancing loss of a non-softmax router takes (docs/numerics.md §1.2, §4). One home
% -- for both backends: the CPU router and the CPU and CUDA backwards include it. The includer
% -- defines TOKEN_FN (`static` in C, `__device__` in CUDA C++) and provides sigmoid().
% local moe = import("templates/lib/moe.lua")
% local r = spec.router
% local softmax = r.score_function == "softmax"
% local aux = moe.aux_kind(spec)
/* Scores of one token from its sanitized logits (${r.score_function}). */
TOKEN_FN void router_scores(const float *z, float score[NUM_EXPERTS]) {
% if softmax then
    float max = -INFINITY;
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (z[e] > max) max = z[e];
    if (max == -INFINITY) {
        for (int e = 0; e < NUM_EXPERTS; e++) score[e] = 0.0f;
        return;
    }
    float sum = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) {
        score[e] = expf(z[e] - max);
        sum += score[e];
    }
    for (int e = 0; e < NUM_EXPERTS; e++) score[e] /= sum;
% elseif r.score_function == "sigmoid" then
    for (int e = 0; e < NUM_EXPERTS; e++) score[e] = sigmoid(z[e]);
% else
    for (int e = 0; e < NUM_EXPERTS; e++) { /* sqrt(softplus(z)), stable for large |z| */
        float softplus = z[e] > 20.0f ? z[e] + log1pf(expf(-z[e])) : log1pf(expf(z[e]));
        score[e] = sqrtf(softplus);
    }
% end
}
% if aux ~= "none" and not softmax then

/* Softmax over all experts of one token's sanitized logits (aux loss of a non-softmax router). */
TOKEN_FN void router_softmax(const float *z, float prob[NUM_EXPERTS]) {
    float max = -INFINITY;
    for (int e = 0; e < NUM_EXPERTS; e++)
        if (z[e] > max) max = z[e];
    float sum = 0.0f;
    for (int e = 0; e < NUM_EXPERTS; e++) {
        prob[e] = max == -INFINITY ? 0.0f : expf(z[e] - max);
        sum += prob[e];
    }
    for (int e = 0; e < NUM_EXPERTS; e++) prob[e] = sum > 0.0f ? prob[e] / sum : 0.0f;
}
% end
