/* patterns.c — special input data over seeded random tensors (see patterns.h). */
#include "patterns.h"

#include <math.h>
#include <string.h>

const char *moe_data_pattern_name(moe_data_pattern pattern) {
    static const char *const NAMES[] = {"random", "ties", "nonfinite", "hot-expert", "identity"};
    return pattern >= 0 && pattern < MOE_DATA_PATTERN_COUNT ? NAMES[pattern] : "unknown";
}

void moe_tensors_apply_pattern(const moegen_spec *spec, moe_tensors *ts, moe_data_pattern pattern) {
    const int64_t E = spec->num_experts, H = spec->hidden_size, S = ts->n_tokens;
    float *router_w = ts->t[MOE_T_ROUTER_W].data;
    switch (pattern) {
    case MOE_DATA_RANDOM:
        break;
    case MOE_DATA_TIES: /* experts 2k and 2k+1 get identical router rows */
        for (int64_t e = 1; e < E; e += 2) memcpy(router_w + e * H, router_w + (e - 1) * H, H * sizeof(float));
        break;
    case MOE_DATA_NONFINITE: {
        float *bias = ts->t[MOE_T_ROUTER_B].data;
        const float values[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, INFINITY};
        for (int64_t e = 0; bias && e < E && e < 6; e++) bias[e] = values[e];
        for (int64_t t = 3; t < S; t += 7) /* whole NaN logit rows */
            for (int64_t h = 0; h < H; h++) moe_tensor_set(ts, MOE_T_X, (size_t)(t * H + h), NAN);
        break;
    }
    case MOE_DATA_HOT_EXPERT:
        if (ts->t[MOE_T_ROUTER_B].data) {
            ((float *)ts->t[MOE_T_ROUTER_B].data)[E / 2] = 8.0f;
        } else { /* no router bias: make expert E/2's row align with every input */
            for (int64_t h = 0; h < H; h++) router_w[(E / 2) * H + h] = 0.0f;
            router_w[(E / 2) * H] = 0.0f;
            for (int64_t t = 0; t < S; t++) moe_tensor_set(ts, MOE_T_X, (size_t)(t * H), 1.0);
            router_w[(E / 2) * H] = 8.0f;
        }
        break;
    case MOE_DATA_IDENTITY: { /* F = 2H: relu(x) - relu(-x) = x */
        const int64_t F = spec->moe_intermediate_size;
        for (int i = MOE_T_W1; i <= MOE_T_W2; i += MOE_T_W2 - MOE_T_W1) memset(ts->t[i].data, 0, ts->t[i].n_elems * 4);
        for (int64_t e = 0; e < E; e++)
            for (int64_t h = 0; h < H; h++) {
                moe_tensor_set(ts, MOE_T_W1, (size_t)((e * F + h) * H + h), 1.0);
                moe_tensor_set(ts, MOE_T_W1, (size_t)((e * F + H + h) * H + h), -1.0);
                moe_tensor_set(ts, MOE_T_W2, (size_t)((e * H + h) * F + h), 1.0);
                moe_tensor_set(ts, MOE_T_W2, (size_t)((e * H + h) * F + H + h), -1.0);
            }
        break;
    }
    case MOE_DATA_PATTERN_COUNT:
        break;
    }
}

