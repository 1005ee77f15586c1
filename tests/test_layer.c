/* test_layer.c — the public layer API (runtime/layer.c): errors with clear messages,
 * call order, workspace reuse across token counts, the cache as the runtime uses it,
 * and two layers used from two threads at once. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "moegen.h"
#include "tensors.h"
#include "verify.h"

static const char *SMALL = "name: small\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                          "moe_intermediate_size: 16\n";

/* Open on the CPU backend unless `opts` says otherwise (these tests pass host pointers). */
static moegen_layer *open_or_fail(const char *yaml, const moegen_open_options *opts) {
    moegen_layer *layer = NULL;
    moegen_error err;
    moegen_open_options cpu;
    if (!opts) {
        moegen_open_options_init(&cpu);
        cpu.device = MOEGEN_DEVICE_CPU;
        opts = &cpu;
    }
    if (moegen_layer_open_string(yaml, strlen(yaml), "test.yaml", opts, &layer, &err) != MOEGEN_OK)
        fail_msg("open: %s", err.message);
    return layer;
}

static void bind_tensors(moegen_layer *layer, const moe_tensors *ts) {
    moegen_kernel_weights k;
    moe_tensors_weights(ts, &k);
    moegen_weights w = {.router_w = k.router_w, .router_b = k.router_b, .score_bias = k.score_bias,
                        .w1 = k.w1, .b1 = k.b1, .w2 = k.w2, .b2 = k.b2};
    moegen_error err;
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) fail_msg("bind: %s", err.message);
}

/* Run S tokens through `layer` and verify against the reference; returns report.ok. */
static int run_and_verify(moegen_layer *layer, const moegen_spec *spec, int64_t S, uint64_t seed) {
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(spec, S, &ts), 0);
    moe_tensors_fill(&ts, seed);
    bind_tensors(layer, &ts);
    size_t routes = (size_t)S * spec->top_k + 1;
    void *y = calloc((size_t)S * spec->hidden_size + 1, moegen_dtype_size(spec->dtype));
    int32_t *ids = calloc(routes, sizeof *ids);
    float *weights = calloc(routes, sizeof *weights), *router = calloc(routes, sizeof *router);
    int64_t before[64], after[64];
    moegen_forward_io io = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .y = y, .topk_ids = ids,
                            .topk_weights = weights, .router_weights = router,
                            .counts_before = before, .counts_after = after};
    moegen_forward_stats stats;
    moegen_error err;
    if (moegen_layer_forward(layer, &io, &stats, &err) != MOEGEN_OK) fail_msg("forward: %s", err.message);
    moegen_kernel_weights w;
    moe_tensors_weights(&ts, &w);
    moe_kernel_result kernel = {.y = y, .ids = ids, .topk_weights = weights, .router_weights = router,
                                .counts_before = before, .counts_after = after,
                                .n_dropped = stats.n_dropped, .capacity = stats.capacity,
                                .aux_loss = stats.aux_loss, .z_loss = stats.z_loss};
    moe_verify_report report;
    assert_int_equal(moe_verify(spec, S, ts.t[MOE_T_X].data, &w, 0, NULL, &kernel, &report), 0);
    if (!report.ok) print_error("%s\n", report.message);
    free(y);
    free(ids);
    free(weights);
    free(router);
    moe_tensors_free(&ts);
    return report.ok;
}

static void open_reports_spec_errors_with_location(void **state) {
    (void)state;
    const char *yaml = "name: bad\nnum_experts: 4\nnum_experts_per_tok: 9\nhidden_size: 32\n"
                       "moe_intermediate_size: 16\n";
    moegen_layer *layer = (moegen_layer *)0x1;
    moegen_error err;
    assert_int_equal(moegen_layer_open_string(yaml, strlen(yaml), "bad.yaml", NULL, &layer, &err), MOEGEN_ERR_SPEC);
    assert_null(layer);
    assert_non_null(strstr(err.message, "bad.yaml:3:"));
}

static int notices_seen;
static char last_notice[512];
static void record_notice(void *user, moegen_log_level level, const char *message) {
    (void)user;
    if (level == MOEGEN_LOG_NOTICE) {
        notices_seen++;
        snprintf(last_notice, sizeof last_notice, "%s", message);
    }
}

/* With no CUDA driver (forced with MOEGEN_CUDA_DRIVER_LIB, so this also runs on GPU
 * machines): device cuda is a clear error; device auto falls back to the CPU backend
 * with one notice and works. */
static void without_a_driver_cuda_fails_clearly_and_auto_falls_back_to_cpu(void **state) {
    (void)state;
    setenv("MOEGEN_CUDA_DRIVER_LIB", "/nonexistent/libcuda.so.1", 1);
    moegen_open_options opts;
    moegen_open_options_init(&opts);
    opts.device = MOEGEN_DEVICE_CUDA;
    opts.log = record_notice;
    moegen_layer *layer = NULL;
    moegen_error err;
    assert_int_equal(moegen_layer_open_string(SMALL, strlen(SMALL), NULL, &opts, &layer, &err),
                     MOEGEN_ERR_UNSUPPORTED);
    assert_null(layer);
    assert_non_null(strstr(err.message, "no CUDA driver"));
    opts.device = MOEGEN_DEVICE_AUTO;
    notices_seen = 0;
    layer = open_or_fail(SMALL, &opts);
    unsetenv("MOEGEN_CUDA_DRIVER_LIB");
    assert_int_equal(notices_seen, 1);
    assert_non_null(strstr(last_notice, "using the CPU backend"));
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    assert_int_equal(desc.device, MOEGEN_DEVICE_CPU);
    moegen_spec spec;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    assert_true(run_and_verify(layer, &spec, 9, 4));
    moegen_spec_free(&spec);
    moegen_layer_close(layer);
}

static void open_rejects_ep_size_above_one(void **state) {
    (void)state;
    moegen_layer *layer = NULL;
    moegen_error err;
    const char *ep = "name: ep\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                     "moe_intermediate_size: 16\nep_size: 2\n";
    assert_int_equal(moegen_layer_open_string(ep, strlen(ep), NULL, NULL, &layer, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "ep_size 2"));
}

static void forward_before_bind_is_a_state_error(void **state) {
    (void)state;
    moegen_layer *layer = open_or_fail(SMALL, NULL);
    moegen_forward_io io = {.n_tokens = 0};
    moegen_error err;
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_ERR_STATE);
    assert_non_null(strstr(err.message, "bind"));
    moegen_layer_close(layer);
}

static void bind_names_the_missing_tensor(void **state) {
    (void)state;
    const char *yaml = "name: needs_bias\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                       "moe_intermediate_size: 16\nexpert_bias: true\n";
    moegen_layer *layer = open_or_fail(yaml, NULL);
    float router[4 * 32] = {0};
    uint16_t w1[4 * 32 * 32] = {0}, w2[4 * 32 * 16] = {0};
    moegen_weights w = {.router_w = router, .w1 = w1, .w2 = w2};
    moegen_error err;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "b1"));
    w.w2 = NULL;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "w2"));
    moegen_layer_close(layer);
}

static void forward_rejects_negative_tokens_and_missing_buffers(void **state) {
    (void)state;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    moegen_layer *layer = open_or_fail(SMALL, NULL);
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, 4, &ts), 0);
    moe_tensors_fill(&ts, 1);
    bind_tensors(layer, &ts);
    moegen_forward_io io = {.n_tokens = -1};
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    io.n_tokens = 4; /* x and y missing */
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    io.n_tokens = 0; /* zero tokens needs no buffers */
    int64_t counts[4] = {9, 9, 9, 9};
    io.counts_before = counts;
    moegen_forward_stats stats;
    assert_int_equal(moegen_layer_forward(layer, &io, &stats, &err), MOEGEN_OK);
    for (int e = 0; e < 4; e++) assert_int_equal(counts[e], 0);
    assert_true(stats.aux_loss == 0.0 && stats.z_loss == 0.0);
    moe_tensors_free(&ts);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

static void workspace_grows_and_shrinking_token_counts_stay_correct(void **state) {
    (void)state;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    moegen_layer *layer = open_or_fail(SMALL, NULL);
    const int64_t counts[] = {1, 500, 3, 0, 64, 65};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        assert_true(run_and_verify(layer, &spec, counts[i], 10 + i));
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

static void second_open_of_a_spec_is_a_cache_hit(void **state) {
    (void)state;
    const char *yaml = "name: cache_hit\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 16\n"
                       "moe_intermediate_size: 16\n# the comment does not change the cache key\n";
    moegen_layer *a = open_or_fail(yaml, NULL), *b = open_or_fail(yaml, NULL);
    moegen_layer_desc da, db;
    assert_int_equal(moegen_layer_describe(a, &da), MOEGEN_OK);
    assert_int_equal(moegen_layer_describe(b, &db), MOEGEN_OK);
    assert_int_equal(db.cache_hit, 1);
    assert_string_equal(da.spec_hash, db.spec_hash);
    assert_int_equal(db.num_experts, 4);
    assert_int_equal(db.ffn_rows, 32); /* swiglu: gate and up */
    assert_int_equal(db.device, MOEGEN_DEVICE_CPU);
    moegen_layer_close(a);
    moegen_layer_close(b);
}

static int warnings_seen;
static void count_warning(void *user, moegen_log_level level, const char *message) {
    (void)user;
    (void)message;
    if (level == MOEGEN_LOG_WARNING) warnings_seen++;
}

static void unusable_cache_directory_warns_and_still_opens(void **state) {
    (void)state;
    char dir[] = "/tmp/moegen-layer-cache-XXXXXX";
    assert_non_null(mkdtemp(dir));
    chmod(dir, 0777); /* world-writable: never load binaries from it */
    moegen_open_options opts;
    moegen_open_options_init(&opts);
    opts.device = MOEGEN_DEVICE_CPU;
    opts.cache_dir = dir;
    opts.log = count_warning;
    warnings_seen = 0;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    moegen_layer *layer = open_or_fail(SMALL, &opts);
    assert_int_equal(warnings_seen, 1);
    assert_true(run_and_verify(layer, &spec, 17, 3));
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
    rmdir(dir);
}

typedef struct thread_job {
    const char *yaml;
    int ok;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *job = arg;
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(job->yaml, strlen(job->yaml), "thread", &spec, &err) != MOEGEN_OK) return NULL;
    moegen_layer *layer = NULL;
    moegen_open_options cpu;
    moegen_open_options_init(&cpu);
    cpu.device = MOEGEN_DEVICE_CPU;
    if (moegen_layer_open_string(job->yaml, strlen(job->yaml), NULL, &cpu, &layer, &err) == MOEGEN_OK) {
        job->ok = 1;
        for (int i = 0; i < 5 && job->ok; i++) job->ok = run_and_verify(layer, &spec, 40 + i, (uint64_t)i);
        moegen_layer_close(layer);
    }
    moegen_spec_free(&spec);
    return NULL;
}

static void two_layers_run_from_two_threads_at_once(void **state) {
    (void)state;
    thread_job jobs[2] = {
        {"name: thread_a\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 32\nmoe_intermediate_size: 32\n", 0},
        {"name: thread_b\nnum_experts: 6\nnum_experts_per_tok: 3\nhidden_size: 48\nmoe_intermediate_size: 16\n"
         "dtype: fp32\n", 0},
    };
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&threads[i], NULL, thread_main, &jobs[i]), 0);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    assert_true(jobs[0].ok);
    assert_true(jobs[1].ok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(open_reports_spec_errors_with_location),
        cmocka_unit_test(without_a_driver_cuda_fails_clearly_and_auto_falls_back_to_cpu),
        cmocka_unit_test(open_rejects_ep_size_above_one),
        cmocka_unit_test(forward_before_bind_is_a_state_error),
        cmocka_unit_test(bind_names_the_missing_tensor),
        cmocka_unit_test(forward_rejects_negative_tokens_and_missing_buffers),
        cmocka_unit_test(workspace_grows_and_shrinking_token_counts_stay_correct),
        cmocka_unit_test(second_open_of_a_spec_is_a_cache_hit),
        cmocka_unit_test(unusable_cache_directory_warns_and_still_opens),
        cmocka_unit_test(two_layers_run_from_two_threads_at_once),
    };
    return cmocka_run_group_tests_name("layer API", tests, NULL, NULL);
}
