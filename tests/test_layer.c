/* test_layer.c — the public layer API (runtime/layer.c): errors with clear messages,
 * call order, workspace reuse across token counts, the cache as the runtime uses it,
 * and two layers used from two threads at once. */
#include <locale.h>
#include <pthread.h>
#include <stdatomic.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "moegen.h"
#include "sha256.h"
#include "tensors.h"
#include "verify.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

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

static void open_of_an_expert_parallel_spec_needs_a_communicator(void **state) {
    (void)state;
    moegen_layer *layer = NULL;
    moegen_error err;
    const char *ep = "name: ep\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                     "moe_intermediate_size: 16\nep_size: 2\n";
    assert_int_equal(moegen_layer_open_string(ep, strlen(ep), NULL, NULL, &layer, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "ep_size 2 needs a communicator of 2 ranks"));
    assert_null(layer);
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


/* ---- Arguments out of range ------------------------------------------------------------------ */

static void every_public_function_survives_null_arguments(void **state) {
    (void)state;
    moegen_open_options_init(NULL);
    moegen_layer_close(NULL);
    moegen_layer_desc desc;
    moegen_error err;
    moegen_layer *layer = (moegen_layer *)0x1;
    assert_int_equal(moegen_layer_describe(NULL, &desc), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_open_file(NULL, NULL, &layer, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_open_file("x.yaml", NULL, NULL, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_open_string(NULL, 0, NULL, NULL, &layer, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_open_string(SMALL, strlen(SMALL), NULL, NULL, NULL, NULL),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_bind(NULL, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_forward(NULL, NULL, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_layer *real = open_or_fail(SMALL, NULL);
    assert_int_equal(moegen_layer_describe(real, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_bind(real, NULL, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_forward(real, NULL, NULL, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_layer_close(real);
}

static void misaligned_tensors_are_refused_by_name(void **state) {
    (void)state;
    moegen_layer *layer = open_or_fail(SMALL, NULL); /* bf16: 2-byte elements */
    static float router[4 * 32 + 1];
    static uint16_t w1[4 * 32 * 32 + 1], w2[4 * 32 * 16 + 1];
    moegen_weights w = {.router_w = (const float *)((const char *)router + 2), .w1 = w1, .w2 = w2};
    moegen_error err;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "router_w"));
    assert_non_null(strstr(err.message, "not aligned"));
    w.router_w = router;
    w.w1 = (const char *)w1 + 1;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "w1"));
    w.w1 = w1;
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_OK);
    static uint16_t x[2 * 32 + 1], y[2 * 32 + 1];
    static int64_t counts[5];
    moegen_forward_io io = {.n_tokens = 2, .x = (const char *)x + 1, .y = y};
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "x at"));
    io.x = x;
    io.counts_after = (int64_t *)((char *)counts + 4);
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "counts_after"));
    io.counts_after = counts;
    assert_int_equal(moegen_layer_forward(layer, &io, NULL, &err), MOEGEN_OK);
    moegen_layer_close(layer);
}

static void open_rejects_negative_thread_counts_and_devices(void **state) {
    (void)state;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.n_threads = -3;
    moegen_layer *layer = NULL;
    moegen_error err;
    assert_int_equal(moegen_layer_open_string(SMALL, strlen(SMALL), NULL, &o, &layer, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "n_threads is -3"));
    assert_null(layer);
    o.n_threads = 0;
    o.cuda_device = -1;
    assert_int_equal(moegen_layer_open_string(SMALL, strlen(SMALL), NULL, &o, &layer, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "cuda_device"));
}

static void open_takes_variant_overrides_and_refuses_bad_ones(void **state) {
    (void)state;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.variant = "tile_rows=3,block_rows=9,tile_cols=2";
    moegen_layer *layer = open_or_fail(SMALL, &o);
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    assert_non_null(strstr(desc.variant, "r3c2b9x"));
    assert_true(desc.kernel_path[0] != '\0');
    moegen_layer_close(layer);
    moegen_error err;
    static const char *BAD[] = {"tile_rows=9", "tile_rows=3", "unknown=1", "tile_cols=2,block_cols=3"};
    static const char *EXPECT[] = {"tile_rows must be in 1..8", "block_rows", "not name=value", "block_cols"};
    for (int i = 0; i < 4; i++) {
        o.variant = BAD[i];
        layer = NULL;
        assert_int_equal(moegen_layer_open_string(SMALL, strlen(SMALL), NULL, &o, &layer, &err),
                         MOEGEN_ERR_INVALID_ARGUMENT);
        if (!strstr(err.message, EXPECT[i])) fail_msg("%s: %s", BAD[i], err.message);
        assert_null(layer);
    }
}

static void absurd_thread_counts_are_capped_with_a_notice(void **state) {
    (void)state;
    const int notices_before = notices_seen;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.n_threads = 1000000;
    o.log = record_notice;
    moegen_layer *layer = open_or_fail(SMALL, &o);
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    assert_true(desc.n_threads >= 1 && desc.n_threads <= 4 * cpus && desc.n_threads <= MOEGEN_THREAD_LIMIT);
    assert_true(notices_seen > notices_before);
    assert_non_null(strstr(last_notice, "1000000 threads requested"));
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    assert_true(run_and_verify(layer, &spec, 33, 5));
    moegen_layer_close(layer);
    /* $MOEGEN_MAX_THREADS lowers the cap; $OMP_NUM_THREADS is the default count */
    setenv("MOEGEN_MAX_THREADS", "2", 1);
    setenv("OMP_NUM_THREADS", "64", 1);
    o.n_threads = 0;
    layer = open_or_fail(SMALL, &o);
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    assert_int_equal(desc.n_threads, 2);
    assert_true(run_and_verify(layer, &spec, 17, 6));
    moegen_layer_close(layer);
    unsetenv("MOEGEN_MAX_THREADS");
    unsetenv("OMP_NUM_THREADS");
    moegen_spec_free(&spec);
}

/* ---- Two threads on one layer -------------------------------------------------------------------- */

typedef struct busy_job {
    moegen_layer *layer;
    const moegen_forward_io *io;
    int wanted, done, refused, other_errors;
    atomic_int finished;
} busy_job;

/* Run `wanted` forwards to completion, retrying those refused because the other thread
 * held the layer. */
static void *busy_main(void *arg) {
    busy_job *job = arg;
    while (job->done < job->wanted) {
        moegen_error err;
        moegen_status st = moegen_layer_forward(job->layer, job->io, NULL, &err);
        if (st == MOEGEN_OK) job->done++;
        else if (st == MOEGEN_ERR_STATE && strstr(err.message, "another call is running")) job->refused++;
        else job->other_errors++;
    }
    atomic_store(&job->finished, 1);
    return NULL;
}

static void two_threads_forwarding_one_layer_get_a_state_error_not_a_race(void **state) {
    (void)state;
    const char *yaml = "name: busy\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 256\n"
                       "moe_intermediate_size: 256\ndtype: fp32\n";
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), "busy", &spec, &err), MOEGEN_OK);
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.n_threads = 1;
    moegen_layer *layer = open_or_fail(yaml, &o);
    const int64_t big = 1500, small = 7;
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, big, &ts), 0);
    moe_tensors_fill(&ts, 77);
    bind_tensors(layer, &ts);
    float *y_big = calloc((size_t)big * 256, sizeof(float)), *y_small = calloc((size_t)small * 256, sizeof(float));
    moegen_forward_io io_big = {.n_tokens = big, .x = ts.t[MOE_T_X].data, .y = y_big};
    moegen_forward_io io_small = {.n_tokens = small, .x = ts.t[MOE_T_X].data, .y = y_small};
    busy_job job = {.layer = layer, .io = &io_big, .wanted = 4};
    atomic_init(&job.finished, 0);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, busy_main, &job), 0);
    int refused = 0, ran = 0, bind_refused = 0;
    while (!atomic_load(&job.finished)) { /* short calls, and binds, against the long ones */
        moegen_status st = moegen_layer_forward(layer, &io_small, NULL, &err);
        if (st == MOEGEN_ERR_STATE) {
            refused++;
            assert_non_null(strstr(err.message, "another call is running"));
        } else {
            assert_int_equal(st, MOEGEN_OK);
            ran++;
        }
        moegen_weights none = {0};
        bind_refused += moegen_layer_bind(layer, &none, &err) == MOEGEN_ERR_STATE;
    }
    pthread_join(thread, NULL);
    print_message("  long calls: %d done, %d refused; short calls: %d ran, %d refused; %d binds refused\n",
                  job.done, job.refused, ran, refused, bind_refused);
    assert_int_equal(job.other_errors, 0);
    assert_true(refused + job.refused > 0); /* the two threads did meet */
    assert_true(refused > 0 || bind_refused > 0);
    /* the layer is intact: both token counts still verify */
    assert_true(run_and_verify(layer, &spec, big, 78));
    assert_true(run_and_verify(layer, &spec, small, 79));
    free(y_big);
    free(y_small);
    moe_tensors_free(&ts);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

/* ---- The host program's locale -------------------------------------------------------------------- */

static void a_host_programs_locale_changes_neither_the_spec_nor_its_hash(void **state) {
    (void)state;
    /* A German locale (decimal comma) built with localedef into a private directory. */
    char dir[] = "/tmp/moegen-locale-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char command[256];
    snprintf(command, sizeof command, "localedef -i de_DE -f UTF-8 %s/de_DE.UTF-8 > /dev/null 2>&1", dir);
    const char *yaml = "name: locale\nnum_experts: 8\nnum_experts_per_tok: 3\nhidden_size: 32\n"
                       "moe_intermediate_size: 16\ndtype: fp32\nrouter:\n  routed_scaling_factor: 2.5\n"
                       "capacity:\n  mode: factor\n  capacity_factor: 1.25\n  eval_capacity_factor: 0.75\n";
    moegen_layer *plain = open_or_fail(yaml, NULL);
    moegen_layer_desc in_c;
    assert_int_equal(moegen_layer_describe(plain, &in_c), MOEGEN_OK);
    if (system(command) != 0) {
        moegen_layer_close(plain);
        print_message("skipped: localedef cannot build de_DE.UTF-8 here (install the `locales` package)\n");
        skip();
    }
    setenv("LOCPATH", dir, 1);
    assert_non_null(setlocale(LC_ALL, "de_DE.UTF-8"));
    char printed[16];
    snprintf(printed, sizeof printed, "%.2f", 1.25);
    assert_string_equal(printed, "1,25"); /* the locale is really in force */
    moegen_layer *german = open_or_fail(yaml, NULL);
    moegen_layer_desc in_de;
    assert_int_equal(moegen_layer_describe(german, &in_de), MOEGEN_OK);
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), "locale", &spec, &err), MOEGEN_OK);
    assert_true(spec.capacity.eval_capacity_factor == 0.75 && spec.router.routed_scaling_factor == 2.5);
    assert_int_equal(run_and_verify(german, &spec, 200, 3), 1); /* capacity and scaling as written */
    setlocale(LC_ALL, "C");
    unsetenv("LOCPATH");
    assert_string_equal(in_c.spec_hash, in_de.spec_hash);
    assert_string_equal(in_c.variant, in_de.variant);
    assert_int_equal(in_de.cache_hit, 1); /* the same generated code: the same cache entry */
    moegen_spec_free(&spec);
    moegen_layer_close(german);
    moegen_layer_close(plain);
    snprintf(command, sizeof command, "rm -rf %s", dir);
    assert_int_equal(system(command), 0);
}

/* ---- Unloading -------------------------------------------------------------------------------------- */

/* Mappings of files under the test cache whose name is module.so. */
static int mapped_modules(void) {
    FILE *maps = fopen("/proc/self/maps", "r");
    assert_non_null(maps);
    char line[4096];
    int count = 0;
    while (fgets(line, sizeof line, maps))
        count += strstr(line, "/module.so") != NULL || strstr(line, "/moegen-cpu-") != NULL;
    fclose(maps);
    return count;
}

static long resident_kib(void) {
    FILE *status = fopen("/proc/self/status", "r");
    assert_non_null(status);
    char line[256];
    long kib = -1;
    while (fgets(line, sizeof line, status))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1) break;
    fclose(status);
    return kib;
}

static void closed_layers_unmap_their_modules_and_memory_stays_bounded(void **state) {
    (void)state;
    enum { DISTINCT = 12, CYCLES = 120 };
    const int before = mapped_modules();
    long rss_after_first_round = 0;
    for (int cycle = 0; cycle < CYCLES; cycle++) {
        char yaml[256];
        snprintf(yaml, sizeof yaml,
                 "name: unload%d\nnum_experts: %d\nnum_experts_per_tok: 1\nhidden_size: 16\n"
                 "moe_intermediate_size: 16\ndtype: fp32\n",
                 cycle % DISTINCT, 1 + cycle % DISTINCT);
        moegen_layer *layer = open_or_fail(yaml, NULL);
        moegen_spec spec;
        moegen_error err;
        assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), "unload", &spec, &err), MOEGEN_OK);
        assert_true(run_and_verify(layer, &spec, 9, (uint64_t)cycle)); /* OpenMP threads ran its code */
        moegen_spec_free(&spec);
        moegen_layer_close(layer);
        assert_int_equal(mapped_modules(), before); /* nothing of the closed module stays mapped */
        if (cycle == DISTINCT - 1) rss_after_first_round = resident_kib();
    }
    const long growth = resident_kib() - rss_after_first_round;
    print_message("  %d open/close cycles over %d modules: resident memory grew %ld KiB after the first round\n",
                  CYCLES - DISTINCT, DISTINCT, growth);
#ifndef UNDER_ASAN /* ASan keeps freed memory in its quarantine (256 MiB by default) */
    assert_true(growth < 8 * 1024);
#endif
}


/* ---- Limits: the compiler's time, the workspace's memory ----------------------------------------- */

static void a_hung_compiler_is_killed_after_the_open_options_time_limit(void **state) {
    (void)state;
    char dir[] = "/tmp/moegen-hung-cc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char script[256];
    snprintf(script, sizeof script, "%s/cc", dir);
    FILE *f = fopen(script, "w");
    assert_non_null(f);
    fprintf(f, "#!/bin/sh\ncase \"$1\" in\n  --version) echo 'hung-cc 1.0'; exit 0;;\n"
               "  -dumpmachine) echo 'x86_64-linux-gnu'; exit 0;;\nesac\nexec sleep 1000\n");
    fclose(f);
    assert_int_equal(chmod(script, 0755), 0);
    setenv("MOEGEN_CC", script, 1);
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.compile_timeout_s = 1;
    const char *yaml = "name: never_compiles\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                       "moe_intermediate_size: 16\n";
    moegen_layer *layer = NULL;
    moegen_error err;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    assert_int_equal(moegen_layer_open_string(yaml, strlen(yaml), NULL, &o, &layer, &err), MOEGEN_ERR_COMPILE);
    clock_gettime(CLOCK_MONOTONIC, &end);
    unsetenv("MOEGEN_CC");
    const double seconds = (double)(end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    assert_null(layer);
    assert_non_null(strstr(err.message, "did not finish within 1 s"));
    assert_true(seconds < 15.0);
    o.compile_timeout_s = -1;
    assert_int_equal(moegen_layer_open_string(yaml, strlen(yaml), NULL, &o, &layer, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    assert_int_equal(system(command), 0);
}


static void a_workspace_beyond_the_process_limit_is_refused_with_both_sizes(void **state) {
    (void)state;
#ifdef UNDER_ASAN
    print_message("skipped: AddressSanitizer reserves terabytes of address space, so RLIMIT_AS cannot be set\n");
    skip();
#else
    moegen_layer *layer = open_or_fail(SMALL, NULL); /* compiled before the limit */
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        FILE *statm = fopen("/proc/self/statm", "r");
        unsigned long pages = 0;
        if (!statm || fscanf(statm, "%lu", &pages) != 1) _exit(10);
        fclose(statm);
        struct rlimit limit;
        limit.rlim_cur = limit.rlim_max = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + (256u << 20);
        if (setrlimit(RLIMIT_AS, &limit) != 0) _exit(11);
        float router[4 * 32] = {0};
        uint16_t w1[4 * 32 * 32] = {0}, w2[4 * 32 * 16] = {0};
        moegen_weights w = {.router_w = router, .w1 = w1, .w2 = w2};
        moegen_error err;
        if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) _exit(12);
        static uint16_t token[32];
        moegen_forward_io io = {.n_tokens = 20000000, .x = token, .y = token}; /* ~6 GiB of workspace */
        moegen_status st = moegen_layer_forward(layer, &io, NULL, &err);
        if (st != MOEGEN_ERR_NO_MEMORY) _exit(13);
        if (!strstr(err.message, "limited by RLIMIT_AS") || !strstr(err.message, "20000000 tokens need")) _exit(14);
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(child, &status, 0), child);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    moegen_layer_close(layer);
#endif
}


/* ---- A cache entry that passes its manifest but does not load --------------------------------- */

/* Replace the module.so of every entry under `cache/cpu` whose directory name starts with
 * nothing in particular by `bytes`, and rewrite its manifest to match (size and SHA-256):
 * the entry is then valid to the cache but not loadable. Returns the entries changed. */
static int plant_in_every_entry(const char *cache, const void *bytes, size_t size) {
    char command[1024], list[] = "/tmp/moegen-entries-XXXXXX";
    int fd = mkstemp(list);
    assert_true(fd >= 0);
    close(fd);
    snprintf(command, sizeof command, "find %s/cpu -name manifest > %s", cache, list);
    assert_int_equal(system(command), 0);
    FILE *manifests = fopen(list, "r");
    assert_non_null(manifests);
    char path[1024];
    int changed = 0;
    while (fgets(path, sizeof path, manifests)) {
        path[strcspn(path, "\n")] = '\0';
        char dir[1024], module[1100], key[65] = "";
        snprintf(dir, sizeof dir, "%.*s", (int)(strrchr(path, '/') - path), path);
        snprintf(module, sizeof module, "%s/module.so", dir);
        FILE *m = fopen(path, "r");
        assert_non_null(m);
        char line[256];
        while (fgets(line, sizeof line, m))
            if (sscanf(line, "key %64s", key) == 1) break;
        fclose(m);
        FILE *out = fopen(module, "wb");
        assert_non_null(out);
        assert_int_equal(fwrite(bytes, 1, size, out), size);
        fclose(out);
        char hex[65];
        moegen_sha256_hex(bytes, size, hex);
        m = fopen(path, "w");
        assert_non_null(m);
        fprintf(m, "moegen-cache-manifest 1\nkey %s\nartifact module.so\nsize %zu\nsha256 %s\n", key, size, hex);
        fclose(m);
        changed++;
    }
    fclose(manifests);
    unlink(list);
    return changed;
}

static char last_warning[1024];
static void record_warning(void *user, moegen_log_level level, const char *message) {
    (void)user;
    if (level == MOEGEN_LOG_WARNING) {
        warnings_seen++;
        snprintf(last_warning, sizeof last_warning, "%s", message);
    }
}

static void an_entry_that_passes_its_manifest_but_fails_to_load_is_evicted_and_rebuilt_once(void **state) {
    (void)state;
    char cache[] = "/tmp/moegen-unloadable-XXXXXX";
    assert_non_null(mkdtemp(cache));
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.cache_dir = cache;
    o.log = record_warning;
    moegen_spec spec;
    moegen_error err;
    assert_int_equal(moegen_spec_parse(SMALL, strlen(SMALL), "small", &spec, &err), MOEGEN_OK);
    moegen_layer_close(open_or_fail(SMALL, &o)); /* builds the entry */
    const char not_elf[] = "this is not a shared object";
    const void *damage[2] = {not_elf, NULL};
    size_t sizes[2] = {sizeof not_elf, 0};
    /* the second damage: a real shared object of another layer (wrong symbols) */
    const char *other = "name: other\nnum_experts: 2\nnum_experts_per_tok: 1\nhidden_size: 16\n"
                        "moe_intermediate_size: 16\n";
    char other_cache[] = "/tmp/moegen-other-XXXXXX";
    assert_non_null(mkdtemp(other_cache));
    moegen_open_options o2 = o;
    o2.cache_dir = other_cache;
    moegen_layer_close(open_or_fail(other, &o2));
    char command[512], so_path[600] = "";
    snprintf(command, sizeof command, "find %s/cpu -name module.so | head -n 1", other_cache);
    FILE *found = popen(command, "r");
    assert_non_null(found);
    assert_non_null(fgets(so_path, sizeof so_path, found));
    pclose(found);
    so_path[strcspn(so_path, "\n")] = '\0';
    FILE *so = fopen(so_path, "rb");
    assert_non_null(so);
    static char elf[4 << 20];
    sizes[1] = fread(elf, 1, sizeof elf, so);
    fclose(so);
    damage[1] = elf;
    for (int d = 0; d < 2; d++) {
        assert_int_equal(plant_in_every_entry(cache, damage[d], sizes[d]), 1);
        const int before = warnings_seen;
        moegen_layer *layer = open_or_fail(SMALL, &o); /* evicted, rebuilt, loaded */
        moegen_layer_desc desc;
        assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
        assert_int_equal(desc.cache_hit, 0);
        assert_int_equal(warnings_seen, before + 1);
        assert_non_null(strstr(last_warning, d == 0 ? "dlopen failed" : "missing symbols"));
        assert_true(run_and_verify(layer, &spec, 21, (uint64_t)d));
        moegen_layer_close(layer);
        layer = open_or_fail(SMALL, &o); /* and the rebuilt entry is a plain hit */
        assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
        assert_int_equal(desc.cache_hit, 1);
        assert_int_equal(warnings_seen, before + 1);
        moegen_layer_close(layer);
    }
    moegen_spec_free(&spec);
    snprintf(command, sizeof command, "rm -rf %s %s", cache, other_cache);
    assert_int_equal(system(command), 0);
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
        cmocka_unit_test(open_of_an_expert_parallel_spec_needs_a_communicator),
        cmocka_unit_test(forward_before_bind_is_a_state_error),
        cmocka_unit_test(bind_names_the_missing_tensor),
        cmocka_unit_test(forward_rejects_negative_tokens_and_missing_buffers),
        cmocka_unit_test(workspace_grows_and_shrinking_token_counts_stay_correct),
        cmocka_unit_test(second_open_of_a_spec_is_a_cache_hit),
        cmocka_unit_test(unusable_cache_directory_warns_and_still_opens),
        cmocka_unit_test(two_layers_run_from_two_threads_at_once),
        cmocka_unit_test(every_public_function_survives_null_arguments),
        cmocka_unit_test(open_rejects_negative_thread_counts_and_devices),
        cmocka_unit_test(misaligned_tensors_are_refused_by_name),
        cmocka_unit_test(absurd_thread_counts_are_capped_with_a_notice),
        cmocka_unit_test(open_takes_variant_overrides_and_refuses_bad_ones),
        cmocka_unit_test(two_threads_forwarding_one_layer_get_a_state_error_not_a_race),
        cmocka_unit_test(a_host_programs_locale_changes_neither_the_spec_nor_its_hash),
        cmocka_unit_test(closed_layers_unmap_their_modules_and_memory_stays_bounded),
        cmocka_unit_test(a_hung_compiler_is_killed_after_the_open_options_time_limit),
        cmocka_unit_test(a_workspace_beyond_the_process_limit_is_refused_with_both_sizes),
        cmocka_unit_test(an_entry_that_passes_its_manifest_but_fails_to_load_is_evicted_and_rebuilt_once),
    };
    return cmocka_run_group_tests_name("layer API", tests, NULL, NULL);
}
