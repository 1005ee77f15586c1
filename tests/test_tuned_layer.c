/* test_tuned_layer.c — a layer opened on a tuning database (runtime/tuning_db.h) holds one
 * module per token range and picks by the call's token count: its outputs at every count
 * are bitwise those of a layer opened on that range's variant alone, and they verify
 * against the reference. Also: a database whose variant this build refuses is a warning
 * and the default variant, never a failed open; and without a database, the default
 * heuristic's own token ranges work the same way. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "forward_io.h"
#include "host_cc.h"
#include "moegen.h"
#include "tensors.h"
#include "tuning_db.h"
#include "variant.h"
#include "verify.h"

static const char *YAML = "name: tuned_layer\nnum_experts: 8\nnum_experts_per_tok: 3\nhidden_size: 64\n"
                          "moe_intermediate_size: 96\ndtype: bf16\nactivation: swiglu\n";

/* Three ranges with three different variants, written whole as `moegen tune` writes them
 * (an override list applies to the machine's default variant). The AMX one runs its FMA
 * fallback where the CPU has no AMX, alone and tuned alike. */
static const struct {
    int64_t lo, hi;
    const char *variant;
} RANGES[] = {
    {1, 4, "gemm=fma,tile_rows=1,tile_cols=2,block_rows=8,block_cols=16"},
    {5, 40, "gemm=amx,tile_rows=4,tile_cols=4,block_rows=32,block_cols=32,router_block=7"},
    {41, INT64_MAX, "gemm=fma,vector_floats=4,tile_rows=5,tile_cols=8,block_rows=40,block_cols=64"},
};
#define N_RANGES (sizeof RANGES / sizeof RANGES[0])

static char db_dir[] = "/tmp/moegen-tuned-layer-XXXXXX";
static int warnings;

static void count_warning(void *user, moegen_log_level level, const char *message) {
    (void)user;
    if (level == MOEGEN_LOG_WARNING) warnings++;
    print_message("  log: %s\n", message);
}

static void write_db(const moegen_spec *spec, const char *bad_variant) {
    moegen_host_compiler cc;
    moegen_error err;
    assert_int_equal(moegen_host_compiler_probe(&cc, &err), MOEGEN_OK);
    moegen_tuning_db db;
    moegen_tuning_db_init(&db);
    char shape[256];
    moegen_variant_shape_key(spec, MOEGEN_BACKEND_CPU, shape, sizeof shape);
    moegen_host_compiler_device(&cc, db.device, sizeof db.device, db.family, sizeof db.family);
    snprintf(db.shape, sizeof db.shape, "%s", shape);
    snprintf(db.date, sizeof db.date, "2026-11-30T00:00:00Z");
    snprintf(db.routing, sizeof db.routing, "skewed");
    db.threads = 1;
    db.n_buckets = (int)N_RANGES;
    for (size_t i = 0; i < N_RANGES; i++) {
        moegen_tuning_bucket *b = &db.buckets[i];
        b->min_tokens = RANGES[i].lo;
        b->max_tokens = RANGES[i].hi;
        b->timed_tokens = RANGES[i].lo;
        b->median_ms = b->default_ms = 1.0;
        snprintf(b->variant, sizeof b->variant, "%s", i == 1 && bad_variant ? bad_variant : RANGES[i].variant);
        snprintf(b->variant_name, sizeof b->variant_name, "range%zu", i);
    }
    char name[MOEGEN_TUNING_FILE_NAME_BYTES], path[1024];
    moegen_tuning_db_file_name(shape, db.device, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", db_dir, name);
    if (moegen_tuning_db_write(path, &db, &err) != MOEGEN_OK) fail_msg("%s", err.message);
}

static moegen_layer *open_yaml(const char *yaml, const char *variant, int tuning,
                               moegen_layer_desc *desc) {
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.variant = variant;
    o.tuning = tuning;
    o.n_threads = 2;
    o.log = count_warning;
    moegen_layer *layer = NULL;
    moegen_error err;
    if (moegen_layer_open_string(yaml, strlen(yaml), "tuned_layer", &o, &layer, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    moegen_layer_describe(layer, desc);
    return layer;
}

static moegen_layer *open_layer(const char *variant, moegen_layer_desc *desc) {
    return open_yaml(YAML, variant, MOEGEN_TUNING_AUTO, desc);
}

static void run(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts, int64_t S, moe_outputs *out) {
    moegen_weights w;
    moe_tensors_bind_weights(spec, ts, 0, &w);
    moegen_error err;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_OK);
    assert_int_equal(moe_outputs_alloc(out, spec, S), 0);
    moegen_forward_io io = moe_outputs_io(out, ts, 0);
    io.n_tokens = S;
    if (moegen_layer_forward(layer, &io, &out->stats, &err) != MOEGEN_OK) fail_msg("%s", err.message);
}

/* S tokens through `layer` and through `alone` (one variant): bitwise the same outputs, and
 * they verify against the reference; `report` gets the verifier's message. */
static void check_same_bits_and_verify(moegen_layer *layer, moegen_layer *alone, const moegen_spec *spec,
                                       const moe_tensors *ts, int64_t S, moe_verify_report *report) {
    moe_outputs a, b;
    run(layer, spec, ts, S, &a);
    run(alone, spec, ts, S, &b);
    const size_t routes = (size_t)S * (size_t)spec->top_k;
    assert_memory_equal(a.y, b.y, (size_t)S * (size_t)spec->hidden_size * moegen_dtype_size(spec->dtype));
    assert_memory_equal(a.ids, b.ids, routes * sizeof(int32_t));
    assert_memory_equal(a.topk_weights, b.topk_weights, routes * sizeof(float));
    moegen_kernel_weights kw;
    moe_tensors_weights(ts, &kw);
    const moe_kernel_result result = moe_outputs_result(&a);
    assert_int_equal(moe_verify(spec, S, ts->t[MOE_T_X].data, &kw, 0, NULL, &result, report), 0);
    if (!report->ok) fail_msg("S = %lld: %s", (long long)S, report->message);
    moe_outputs_free(&a);
    moe_outputs_free(&b);
}

static void each_token_count_runs_its_ranges_variant_bit_for_bit(void **state) {
    (void)state;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(YAML, strlen(YAML), "tuned_layer", &spec, &err), MOEGEN_OK);
    write_db(&spec, NULL);
    moegen_layer_desc desc;
    moegen_layer *tuned = open_layer(NULL, &desc);
    assert_int_equal(desc.n_variants, (int)N_RANGES);
    assert_non_null(strstr(desc.tuning, "exact: "));
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, 100, &ts), 0);
    moe_tensors_fill(&ts, 7);
    static const int64_t COUNTS[] = {1, 4, 5, 17, 40, 41, 100};
    for (size_t c = 0; c < sizeof COUNTS / sizeof COUNTS[0]; c++) {
        const int64_t S = COUNTS[c];
        size_t r = 0;
        while (!(S >= RANGES[r].lo && S <= RANGES[r].hi)) r++;
        moegen_layer_desc alone_desc;
        moegen_layer *alone = open_layer(RANGES[r].variant, &alone_desc);
        assert_int_equal(alone_desc.n_variants, 1);
        moe_verify_report report;
        check_same_bits_and_verify(tuned, alone, &spec, &ts, S, &report);
        print_message("  S = %3lld: range %zu (%s), bitwise equal to that variant alone; %s\n", (long long)S, r,
                      RANGES[r].variant, report.message);
        moegen_layer_close(alone);
    }
    moe_tensors_free(&ts);
    moegen_layer_close(tuned);
    moegen_spec_free(&spec);
}

static void a_variant_this_build_refuses_is_a_warning_and_the_default(void **state) {
    (void)state;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(YAML, strlen(YAML), "tuned_layer", &spec, &err), MOEGEN_OK);
    write_db(&spec, "gemm=fma,tile_rows=3,block_rows=10"); /* block_rows not a multiple of tile_rows */
    warnings = 0;
    moegen_layer_desc desc;
    moegen_layer *layer = open_layer(NULL, &desc);
    assert_int_equal(desc.n_variants, 1);
    assert_true(warnings >= 1);
    assert_non_null(strstr(desc.tuning, "default heuristic"));
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

/* No database: the default heuristic's own token ranges (moegen_variant_default_ranges).
 * An fp32 layer on a CPU with 16-float vectors holds the dot-product default for few rows
 * per expert and outer products from 16 rows per expert on; each count's outputs are
 * bitwise its range's variant alone, and verify. Elsewhere it is one range. */
static void the_default_splits_fp32_layers_by_rows_per_expert(void **state) {
    (void)state;
    static const char *FP32 = "name: tuned_layer\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                              "moe_intermediate_size: 96\ndtype: fp32\nactivation: swiglu\n";
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(FP32, strlen(FP32), "tuned_layer", &spec, &err), MOEGEN_OK);
    moegen_host_compiler cc;
    assert_int_equal(moegen_host_compiler_probe(&cc, &err), MOEGEN_OK);
    const moegen_target target = moegen_host_compiler_target(&cc);
    moegen_variant_range ranges[4];
    const int n = moegen_variant_default_ranges(&spec, &target, ranges, 4);
    assert_int_equal(n, target.cpu_vector_floats == 16 ? 2 : 1);
    moegen_layer_desc desc;
    moegen_layer *layer = open_yaml(FP32, NULL, MOEGEN_TUNING_AUTO, &desc);
    assert_int_equal(desc.n_variants, n);
    assert_non_null(strstr(desc.tuning, "default heuristic"));
    if (n == 2) {
        assert_int_equal(ranges[1].min_tokens, 64); /* 16 rows x 8 experts / top-2 */
        assert_non_null(strstr(desc.tuning, "64-inf gemm=outer"));
    }
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, 150, &ts), 0);
    moe_tensors_fill(&ts, 11);
    static const int64_t COUNTS[] = {1, 63, 64, 150};
    for (size_t c = 0; c < sizeof COUNTS / sizeof COUNTS[0]; c++) {
        const int64_t S = COUNTS[c];
        const int r = n == 2 && S >= ranges[1].min_tokens;
        moegen_layer_desc alone_desc;
        moegen_layer *alone = open_yaml(FP32, ranges[r].overrides[0] ? ranges[r].overrides : NULL, MOEGEN_TUNING_OFF,
                                        &alone_desc);
        assert_int_equal(alone_desc.n_variants, 1);
        moe_verify_report report;
        check_same_bits_and_verify(layer, alone, &spec, &ts, S, &report);
        moegen_variant picked; /* what moegen tune times as this count's baseline */
        assert_int_equal(moegen_variant_default_for_tokens(&spec, &target, S, &picked, &err), MOEGEN_OK);
        assert_int_equal(picked.cpu.gemm, r ? MOEGEN_CPU_GEMM_OUTER : MOEGEN_CPU_GEMM_FMA);
        print_message("  S = %3lld: %s (%s); %s\n", (long long)S, alone_desc.variant,
                      ranges[r].overrides[0] ? ranges[r].overrides : "default", report.message);
        moegen_layer_close(alone);
    }
    moe_tensors_free(&ts);
    moegen_layer_close(layer);
    /* expert-parallel layers keep one variant for every count */
    spec.ep_size = 2;
    assert_int_equal(moegen_variant_default_ranges(&spec, &target, ranges, 4), 1);
    moegen_spec_free(&spec);
}

int main(void) {
    if (!mkdtemp(db_dir)) return 1;
    setenv("MOEGEN_TUNING_DIR", db_dir, 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(each_token_count_runs_its_ranges_variant_bit_for_bit),
        cmocka_unit_test(a_variant_this_build_refuses_is_a_warning_and_the_default),
        cmocka_unit_test(the_default_splits_fp32_layers_by_rows_per_expert),
    };
    const int failed = cmocka_run_group_tests(tests, NULL, NULL);
    char cleanup[256];
    snprintf(cleanup, sizeof cleanup, "rm -rf %s", db_dir);
    if (system(cleanup) != 0) return 1;
    return failed;
}
