/* fuzz_generate.c — libFuzzer target for the generator: the bytes choose a structured,
 * mostly valid spec (sizes, routing, capacity, features); every spec that validates
 * must render through the real templates for both backends without error. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emit.h"
#include "spec.h"
#include "variant.h"

static unsigned take(const uint8_t *data, size_t size, size_t *at, unsigned choices) {
    unsigned value = *at < size ? data[*at] : 0;
    (*at)++;
    return value % choices;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *acts[] = {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"};
    static const char *dtypes[] = {"fp32", "fp16", "bf16"};
    static const char *scores[] = {"softmax", "sigmoid", "sqrtsoftplus"};
    static const char *modes[] = {"dropless", "factor", "fixed"};
    static const char *priorities[] = {"probs", "position", "position_choice_major", "random"};
    size_t at = 0;
    const unsigned experts = 1u << take(data, size, &at, 9); /* 1..256 */
    const unsigned k = 1 + take(data, size, &at, experts < 8 ? experts : 8);
    const unsigned groups = experts >= 4 && take(data, size, &at, 2) ? 2 + 2 * take(data, size, &at, 2) : 1;
    const char *score = scores[take(data, size, &at, 3)];
    const char *mode = modes[take(data, size, &at, 3)];
    char yaml[2048];
    int n = snprintf(yaml, sizeof yaml,
                     "name: fuzz\nsemantics: %s\nnum_experts: %u\nnum_experts_per_tok: %u\nhidden_size: %u\n"
                     "moe_intermediate_size: %u\nactivation: %s\ndtype: %s\nmode: %s\nexpert_bias: %s\n"
                     "use_residual: %s\nrouter:\n  score_function: %s\n  norm_topk_prob: %s\n",
                     take(data, size, &at, 2) ? "deepspeed" : "megatron", experts, k, 16 * (1 + take(data, size, &at, 8)),
                     16 * (1 + take(data, size, &at, 8)), acts[take(data, size, &at, 6)], dtypes[take(data, size, &at, 3)],
                     take(data, size, &at, 2) ? "train" : "eval", take(data, size, &at, 2) ? "true" : "false",
                     take(data, size, &at, 2) ? "true" : "false", score, take(data, size, &at, 2) ? "true" : "false");
    if (groups > 1 && experts % groups == 0)
        n += snprintf(yaml + n, sizeof yaml - n, "  n_group: %u\n  topk_group: %u\n", groups, 1 + take(data, size, &at, groups));
    n += snprintf(yaml + n, sizeof yaml - n, "capacity:\n  mode: %s\n", mode);
    if (mode[0] == 'f' && mode[1] == 'a')
        n += snprintf(yaml + n, sizeof yaml - n, "  capacity_factor: %u.25\n  priority: %s\n  pad_to_capacity: %s\n",
                      take(data, size, &at, 3), priorities[take(data, size, &at, 4)], take(data, size, &at, 2) ? "true" : "false");
    else if (mode[0] == 'f')
        n += snprintf(yaml + n, sizeof yaml - n, "  expert_capacity: %u\n", 1 + take(data, size, &at, 100));
    if (take(data, size, &at, 2))
        snprintf(yaml + n, sizeof yaml - n, "shared_experts:\n  count: %u\n  intermediate_size: %u\n  gate: %s\n",
                 1 + take(data, size, &at, 2), 16 * (1 + take(data, size, &at, 4)), take(data, size, &at, 2) ? "true" : "false");
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), "fuzz", &spec, &err) != MOEGEN_OK) return 0; /* invalid combination */
    for (int backend = 0; backend < 2; backend++) {
        moegen_target target = {.cpu_vector_floats = 4 << take(data, size, &at, 3), .cuda_sm = backend ? 90 : 80};
        moegen_variant variant;
        moegen_variant_default(&spec, backend ? MOEGEN_BACKEND_CUDA : MOEGEN_BACKEND_CPU, &target, &variant);
        moegen_generated gen;
        if (moegen_generate(&spec, &variant, NULL, &gen, &err) != MOEGEN_OK) {
            fprintf(stderr, "generator failed on a valid spec: %s\n%s", err.message, yaml);
            abort();
        }
        moegen_generated_free(&gen);
    }
    moegen_spec_free(&spec);
    return 0;
}
