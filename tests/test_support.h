/* test_support.h — small pieces several cmocka tests share. Include after <cmocka.h>.
 *
 * - format_text: snprintf into a fixed buffer that must fit (a test failure otherwise).
 * - The feature matrix: every activation x dtype, with the routing, capacity,
 *   shared-expert, residual and train-mode features spread over them. test_emit compiles
 *   its CPU modules with -Werror and test_nvrtc its CUDA modules for sm_80 and sm_90a, so
 *   both backends are held to the same set of specs.
 */
#ifndef MOEGEN_TEST_SUPPORT_H
#define MOEGEN_TEST_SUPPORT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

static inline void format_text(char *out, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline void format_text(char *out, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int written = vsnprintf(out, size, fmt, ap);
    va_end(ap);
    if (written < 0 || (size_t)written >= size)
        fail_msg("text does not fit in %zu bytes: %s", size, out);
}

static const char *const FEATURE_MATRIX_ACTIVATIONS[] = {"relu", "gelu", "gelu_tanh",
                                                         "silu", "swiglu", "geglu"};
static const char *const FEATURE_MATRIX_DTYPES[] = {"fp32", "fp16", "bf16"};
static const char *const FEATURE_MATRIX_EXTRAS[] = {
    "",
    "router:\n  score_function: sigmoid\n  score_bias: true\n  n_group: 2\n  topk_group: 1\n",
    "capacity:\n  mode: factor\n  priority: random\n  pad_to_capacity: true\n",
    "semantics: deepspeed\nuse_residual: true\nexpert_bias: true\nmode: train\nrouter:\n"
    "  input_jitter: 0.01\n  noise: rsample\n",
    "shared_experts:\n  count: 2\n  intermediate_size: 48\n  gate: true\n",
    "capacity:\n  mode: factor\n  priority: position_choice_major\n  renormalize: true\n",
    "router:\n  order: softmax_then_topk\n  n_group: 4\n  topk_group: 2\n  group_score: max\n"
    "  group_mask: zero\n",
};
#define FEATURE_MATRIX_SIZE 18 /* activations x dtypes; the extras cycle over them */

/* The YAML of matrix case `index` (< FEATURE_MATRIX_SIZE): 8 experts, top-2, hidden 64,
 * the given expert width. `label` (may be NULL) gets "activation/dtype/extraN". */
static inline void feature_matrix_case(size_t index, const char *name, int intermediate,
                                       char *yaml, size_t yaml_size, char *label,
                                       size_t label_size) {
    const size_t a = index / 3, d = index % 3;
    const size_t e = index % (sizeof FEATURE_MATRIX_EXTRAS / sizeof FEATURE_MATRIX_EXTRAS[0]);
    format_text(yaml, yaml_size,
                "name: %s\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                "moe_intermediate_size: %d\nactivation: %s\ndtype: %s\n%s",
                name, intermediate, FEATURE_MATRIX_ACTIVATIONS[a], FEATURE_MATRIX_DTYPES[d],
                FEATURE_MATRIX_EXTRAS[e]);
    if (label)
        format_text(label, label_size, "%s/%s/extra%zu", FEATURE_MATRIX_ACTIVATIONS[a],
                    FEATURE_MATRIX_DTYPES[d], e);
}

#endif
