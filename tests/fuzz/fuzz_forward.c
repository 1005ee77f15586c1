/* fuzz_forward.c — libFuzzer target that runs generated code: the bytes choose a small
 * valid spec (tests/sweep/spec_sampler.c, E <= 16, k <= 16, widths <= 64), a token count,
 * a data pattern and the data seed; the layer is generated, compiled with the host C
 * compiler, loaded, run, and compared with the double-precision reference. A mismatch
 * aborts with the spec, so libFuzzer keeps the input (build-fuzz/findings/forward/).
 *
 * Each new spec costs a compile (about a second); the compile cache makes repeated specs
 * cheap. Set MOEGEN_CACHE_DIR to keep the cache between runs (scripts/fuzz.sh does).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen.h"
#include "forward_io.h"
#include "patterns.h"
#include "spec.h"
#include "spec_sampler.h"
#include "tensors.h"
#include "verify.h"

static void check(int ok, const char *what, const char *detail, const char *yaml) {
    if (ok) return;
    fprintf(stderr, "fuzz_forward: %s: %s\n%s", what, detail, yaml);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_choices choices;
    moe_choices_from_bytes(&choices, data, size);
    moe_sample_limits limits = MOE_SAMPLE_SMALL_LIMITS;
    char yaml[4096];
    if (moe_sample_spec(&choices, &limits, "fuzz_forward", yaml, sizeof yaml) != 0) return 0;
    moegen_spec spec;
    moegen_error err;
    check(moegen_spec_parse(yaml, strlen(yaml), "fuzz_forward", &spec, &err) == MOEGEN_OK, "spec rejected",
          err.message, yaml);
    const int64_t S = moe_choose(&choices, 41);
    const moe_data_pattern pattern = (moe_data_pattern)moe_choose(&choices, MOE_DATA_IDENTITY); /* not identity */
    const uint64_t seed = moe_choose(&choices, 1u << 20), rng_offset = moe_choose(&choices, 100);

    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.n_threads = 1 + (int)moe_choose(&choices, 2);
    moegen_layer *layer = NULL;
    check(moegen_layer_open_string(yaml, strlen(yaml), "fuzz_forward", &options, &layer, &err) == MOEGEN_OK,
          "open failed on a valid spec", err.message, yaml);
    moe_tensors ts;
    check(moe_tensors_alloc(&spec, S, &ts) == 0, "out of memory", "tensors", yaml);
    moe_tensors_fill(&ts, seed);
    moe_tensors_apply_pattern(&spec, &ts, pattern);
    moegen_kernel_weights k;
    moe_tensors_weights(&ts, &k);
    moegen_weights w;
    moe_tensors_bind_weights(&spec, &ts, 0, &w);
    check(moegen_layer_bind(layer, &w, &err) == MOEGEN_OK, "bind failed", err.message, yaml);
    moe_outputs o;
    check(moe_outputs_alloc(&o, &spec, S) == 0, "out of memory", "outputs", yaml);
    moegen_forward_io io = moe_outputs_io(&o, &ts, rng_offset);
    check(moegen_layer_forward(layer, &io, &o.stats, &err) == MOEGEN_OK, "forward failed", err.message, yaml);
    moe_kernel_result kernel = moe_outputs_result(&o);
    moe_verify_report report;
    check(moe_verify(&spec, S, ts.t[MOE_T_X].data, &k, rng_offset, NULL, &kernel, &report) == 0 && report.ok,
          "kernel and reference differ", report.message, yaml);
    moe_outputs_free(&o);
    moe_tensors_free(&ts);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
    return 0;
}
