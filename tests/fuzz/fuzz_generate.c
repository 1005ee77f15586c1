/* fuzz_generate.c — libFuzzer target for the generator: the bytes choose a small valid
 * spec through the sweep's sampler (tests/sweep/spec_sampler.c, which reaches every field
 * and value) and a CPU vector width; the spec must render through the real templates for
 * both backends without error. fuzz_forward goes further and compiles and runs it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emit.h"
#include "spec.h"
#include "spec_sampler.h"
#include "variant.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_choices choices;
    moe_choices_from_bytes(&choices, data, size);
    moe_sample_limits limits = {256, 64, 256};
    char yaml[4096];
    if (moe_sample_spec(&choices, &limits, "fuzz", yaml, sizeof yaml) != 0) return 0;
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), "fuzz", &spec, &err) != MOEGEN_OK) {
        fprintf(stderr, "the sampler wrote a spec the loader rejects: %s\n%s", err.message, yaml);
        abort();
    }
    for (int backend = 0; backend < 2; backend++) {
        moegen_target target = {.cpu_vector_floats = 4 << moe_choose(&choices, 3), .cuda_sm = backend ? 90 : 80};
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
