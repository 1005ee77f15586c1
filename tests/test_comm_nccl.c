/* test_comm_nccl.c — tests of the NCCL transport of the expert-parallel communicator
 * (runtime/comm_nccl.c, runtime/nccl_api.h).
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. What is checked:
 *  - loading: a missing library, libraries lacking a symbol and an NCCL older than 2.14
 *    are MOEGEN_ERR_UNSUPPORTED with messages naming the library, the symbol or the
 *    version; the config is NCCL 2.28's ncclConfig_t with NCCL_CONFIG_INITIALIZER's values;
 *  - creation and every collective against a fake libnccl and a fake libcuda, both built
 *    here at run time with the host C compiler (no GPU needed): the non-blocking config,
 *    a communicator that never comes up (timeout, ncclCommAbort, MOEGEN_ERR_COMM), a
 *    collective whose peer never answers or that NCCL reports an error for (abort, the
 *    reason in the message), transfers above 1 GiB split into chunks, the local rows of
 *    alltoallv, allreduce_max and allgather staged through device memory, and a clean
 *    destroy (finalize, destroy, every context push popped, every buffer freed);
 *  - the real libnccl without a GPU: a unique id, or a clear message;
 *  - argument checks;
 *  - on a machine with a GPU, NCCL and a driver: a one-rank communicator on device 0 runs
 *    every collective on device memory (skipped, saying why, elsewhere).
 *
 * Invariants: every test restores the environment variables it changes (per-test setup
 * and teardown); the fakes live in one mkdtemp directory, removed at the end; the fakes'
 * counters are reset before each test (the libraries stay mapped: RTLD_NODELETE). The
 * fakes read their behaviour from FAKE_* environment variables at call time.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "comm.h"
#include "cuda_api.h"
#include "moegen.h"
#include "nccl_api.h"
#include "test_support.h"

extern char **environ;

#define SOURCE_BYTES 32768
#define GIB ((size_t)1 << 30)
#define MIB ((size_t)1 << 20)

/* ---- sanitizer settings for this test -------------------------------------------------- */

/* As in test_cuda_api.c: the real CUDA driver (GPU machines only) needs ASan's shadow gap
 * unprotected, and libcuda / libnccl keep allocations for the life of the process that
 * are not ours to free. $ASAN_OPTIONS still overrides these. */
const char *__asan_default_options(void);
const char *__lsan_default_suppressions(void);

__attribute__((used)) const char *__asan_default_options(void) { return "protect_shadow_gap=0"; }

__attribute__((used)) const char *__lsan_default_suppressions(void) {
    return "leak:libcuda.so\nleak:libnccl.so\n";
}

/* ---- group state -------------------------------------------------------------------------- */

static const char *const touched_variables[] = {
    "MOEGEN_NCCL_LIB", "MOEGEN_CUDA_DRIVER_LIB", "MOEGEN_COMM_TIMEOUT", "FAKE_NCCL_VERSION",
    "FAKE_NCCL_ASYNC", "FAKE_NCCL_INIT",         "FAKE_CUDA_NEVER_READY"};
#define TOUCHED_COUNT ((int)(sizeof touched_variables / sizeof touched_variables[0]))

typedef struct saved_variable {
    int was_set;
    char value[PATH_MAX];
} saved_variable;

typedef struct group_state {
    char dir[PATH_MAX];
    int fakes_built;                 /* 1 when every fake below was built */
    char fake_nccl[PATH_MAX];        /* every symbol, behaviour from FAKE_NCCL_* */
    char fake_nccl_no_async[PATH_MAX]; /* all but ncclCommGetAsyncError */
    char fake_nccl_few[PATH_MAX];    /* only ncclGetErrorString and ncclGetVersion */
    char fake_cuda[PATH_MAX];        /* a driver with one device, behaviour from FAKE_CUDA_* */
    saved_variable saved[TOUCHED_COUNT];
} group_state;

/* ---- the fakes ------------------------------------------------------------------------------ */

typedef struct fake_function {
    const char *name;
    const char *body;
} fake_function;

static const char fake_nccl_prelude[] =
    "#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n"
    "typedef struct { char internal[128]; } fake_id;\n"
    "typedef struct { size_t size; unsigned magic, version; int blocking; } fake_config_head;\n"
    "struct fake_comm { int rank, nranks; };\n"
    "static struct fake_comm the_comm;\n"
    "int fake_init_calls, fake_abort_calls, fake_destroy_calls, fake_finalize_calls;\n"
    "int fake_init_rank, fake_init_nranks, fake_config_blocking;\n"
    "size_t fake_config_size; unsigned fake_config_magic, fake_config_version;\n"
    "int fake_group_depth, fake_enqueues, fake_async_polls;\n"
    "int fake_log_n, fake_log_kind[256], fake_log_peer[256], fake_log_type[256];\n"
    "size_t fake_log_count[256];\n"
    "static int env_is(const char *name, const char *value) {\n"
    "    const char *v = getenv(name); return v && strcmp(v, value) == 0; }\n"
    "static void log_op(int kind, int peer, size_t count, int type) {\n"
    "    if (fake_log_n < 256) { fake_log_kind[fake_log_n] = kind; fake_log_peer[fake_log_n] = peer;\n"
    "        fake_log_count[fake_log_n] = count; fake_log_type[fake_log_n] = type; }\n"
    "    fake_log_n++; }\n";

static const fake_function fake_nccl_functions[] = {
    {"ncclGetErrorString",
     "const char *ncclGetErrorString(int r) {\n"
     "    return r == 6 ? \"remote process exited or there was a network error (fake)\" : \"fake NCCL error\"; }\n"},
    {"ncclGetVersion",
     "int ncclGetVersion(int *v) { const char *e = getenv(\"FAKE_NCCL_VERSION\");\n"
     "    *v = e ? atoi(e) : 22809; return 0; }\n"},
    {"ncclGetUniqueId",
     "int ncclGetUniqueId(fake_id *id) {\n"
     "    for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 7 + 1); return 0; }\n"},
    {"ncclCommInitRankConfig",
     "int ncclCommInitRankConfig(void **comm, int nranks, fake_id id, int rank, fake_config_head *config) {\n"
     "    (void)id; fake_init_calls++; fake_init_rank = rank; fake_init_nranks = nranks;\n"
     "    fake_config_size = config->size; fake_config_magic = config->magic;\n"
     "    fake_config_version = config->version; fake_config_blocking = config->blocking;\n"
     "    if (env_is(\"FAKE_NCCL_INIT\", \"fail\")) { *comm = NULL; return 2; }\n"
     "    the_comm.rank = rank; the_comm.nranks = nranks; *comm = &the_comm;\n"
     "    return env_is(\"FAKE_NCCL_INIT\", \"progress\") ? 7 : 0; }\n"},
    {"ncclCommGetAsyncError",
     "int ncclCommGetAsyncError(void *comm, int *async) {\n"
     "    (void)comm; fake_async_polls++;\n"
     "    if (env_is(\"FAKE_NCCL_ASYNC\", \"progress\")) *async = 7;\n"
     "    else if (env_is(\"FAKE_NCCL_ASYNC\", \"remote\") && fake_enqueues > 0) *async = 6;\n"
     "    else *async = 0;\n"
     "    return 0; }\n"},
    {"ncclCommFinalize", "int ncclCommFinalize(void *comm) { (void)comm; fake_finalize_calls++; return 7; }\n"},
    {"ncclCommDestroy", "int ncclCommDestroy(void *comm) { (void)comm; fake_destroy_calls++; return 0; }\n"},
    {"ncclCommAbort", "int ncclCommAbort(void *comm) { (void)comm; fake_abort_calls++; return 0; }\n"},
    {"ncclGroupStart", "int ncclGroupStart(void) { fake_group_depth++; return 0; }\n"},
    {"ncclGroupEnd", "int ncclGroupEnd(void) { fake_group_depth--; fake_enqueues++; return 7; }\n"},
    {"ncclSend",
     "int ncclSend(const void *b, size_t count, int type, int peer, void *comm, void *stream) {\n"
     "    (void)b; (void)comm; (void)stream; log_op(1, peer, count, type); return 0; }\n"},
    {"ncclRecv",
     "int ncclRecv(void *b, size_t count, int type, int peer, void *comm, void *stream) {\n"
     "    (void)b; (void)comm; (void)stream; log_op(2, peer, count, type); return 0; }\n"},
    {"ncclAllReduce",
     "int ncclAllReduce(const void *s, void *r, size_t count, int type, int op, void *comm, void *stream) {\n"
     "    (void)comm; (void)stream; fake_enqueues++; log_op(3, -1, count, type);\n"
     "    if (type != 4 || op != 2) return 4;\n"
     "    for (size_t i = 0; i < count; i++) { int64_t v = ((const int64_t *)s)[i];\n"
     "        int64_t peer = 10 * (int64_t)i; ((int64_t *)r)[i] = v > peer ? v : peer; }\n"
     "    return 7; }\n"},
    {"ncclAllGather",
     "int ncclAllGather(const void *s, void *r, size_t count, int type, void *comm, void *stream) {\n"
     "    struct fake_comm *c = comm; (void)stream; fake_enqueues++; log_op(4, -1, count, type);\n"
     "    for (int q = 0; q < c->nranks; q++)\n"
     "        if (q == c->rank) memmove((char *)r + (size_t)q * count, s, count);\n"
     "        else memset((char *)r + (size_t)q * count, 'A' + q, count);\n"
     "    return 0; }\n"},
    {"ncclGetLastError", "const char *ncclGetLastError(void *comm) { (void)comm; return \"fake last error\\n\"; }\n"},
};

static const char fake_cuda_prelude[] =
    "#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n"
    "int fake_ctx_depth, fake_retains, fake_releases, fake_live_allocs, fake_live_streams;\n"
    "int fake_live_events, fake_event_queries;\n"
    "int cuInit(unsigned f) { (void)f; return 0; }\n"
    "int cuDriverGetVersion(int *v) { *v = 13000; return 0; }\n"
    "int cuDeviceGetCount(int *c) { *c = 1; return 0; }\n"
    "int cuDeviceGet(int *d, int o) { *d = o; return 0; }\n"
    "int cuDevicePrimaryCtxRetain(void **c, int d) { (void)d; fake_retains++; *c = &fake_retains; return 0; }\n"
    "int cuDevicePrimaryCtxRelease_v2(int d) { (void)d; fake_releases++; return 0; }\n"
    "int cuCtxPushCurrent_v2(void *c) { (void)c; fake_ctx_depth++; return 0; }\n"
    "int cuCtxPopCurrent_v2(void **c) { if (fake_ctx_depth <= 0) return 201;\n"
    "    fake_ctx_depth--; if (c) *c = &fake_retains; return 0; }\n"
    "int cuStreamCreate(void **s, unsigned f) { (void)f; fake_live_streams++; *s = &fake_live_streams; return 0; }\n"
    "int cuStreamDestroy_v2(void *s) { (void)s; fake_live_streams--; return 0; }\n"
    "int cuEventCreate(void **e, unsigned f) { (void)f; fake_live_events++; *e = &fake_live_events; return 0; }\n"
    "int cuEventDestroy_v2(void *e) { (void)e; fake_live_events--; return 0; }\n"
    "int cuEventRecord(void *e, void *s) { (void)e; (void)s; return 0; }\n"
    "int cuEventQuery(void *e) { const char *v = getenv(\"FAKE_CUDA_NEVER_READY\"); (void)e;\n"
    "    fake_event_queries++; return v && v[0] == '1' ? 600 : 0; }\n"
    "int cuMemAlloc_v2(unsigned long long *p, size_t n) { void *m = malloc(n); if (!m) return 2;\n"
    "    fake_live_allocs++; *p = (unsigned long long)(uintptr_t)m; return 0; }\n"
    "int cuMemFree_v2(unsigned long long p) { free((void *)(uintptr_t)p); fake_live_allocs--; return 0; }\n"
    "int cuMemAllocHost_v2(void **p, size_t n) { *p = malloc(n); if (!*p) return 2;\n"
    "    fake_live_allocs++; return 0; }\n"
    "int cuMemFreeHost(void *p) { free(p); fake_live_allocs--; return 0; }\n"
    "int cuMemcpyHtoDAsync_v2(unsigned long long d, const void *s, size_t n, void *st) { (void)st;\n"
    "    memcpy((void *)(uintptr_t)d, s, n); return 0; }\n"
    "int cuMemcpyDtoHAsync_v2(void *d, unsigned long long s, size_t n, void *st) { (void)st;\n"
    "    memcpy(d, (const void *)(uintptr_t)s, n); return 0; }\n"
    "int cuMemcpyDtoDAsync_v2(unsigned long long d, unsigned long long s, size_t n, void *st) { (void)st;\n"
    "    memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)s, n); return 0; }\n"
    "int cuGetErrorName(int r, const char **n) { (void)r; (void)n; return 1; }\n"
    "int cuGetErrorString(int r, const char **t) { (void)r; (void)t; return 1; }\n";

static const char *const fake_cuda_implemented[] = {
    "cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2", "cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2", "cuStreamCreate",
    "cuStreamDestroy_v2", "cuEventCreate", "cuEventDestroy_v2", "cuEventRecord", "cuEventQuery", "cuMemAlloc_v2",
    "cuMemFree_v2", "cuMemAllocHost_v2", "cuMemFreeHost", "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2", "cuGetErrorName", "cuGetErrorString"};

static void append_text(char *source, size_t size, const char *text) {
    size_t used = strlen(source);
    if (used + strlen(text) >= size)
        fail_msg("fake library source too long");
    memcpy(source + used, text, strlen(text) + 1);
}

static void write_text(const char *path, const char *text) {
    FILE *file = fopen(path, "w");
    assert_non_null(file);
    assert_true(fputs(text, file) >= 0);
    assert_int_equal(fclose(file), 0);
}

/* Run `cc -shared -fPIC -O0 -o output source`; 0 on success. */
static int build_shared_object(const char *source, const char *output) {
    char *argv[] = {"cc", "-shared", "-fPIC", "-O0", "-o", (char *)output, (char *)source, NULL};
    pid_t pid;
    int wait_status = 0;
    if (posix_spawnp(&pid, "cc", NULL, NULL, argv, environ) != 0)
        return -1;
    if (waitpid(pid, &wait_status, 0) != pid || !WIFEXITED(wait_status) || WEXITSTATUS(wait_status) != 0)
        return -1;
    return 0;
}

static const char *fake_nccl_body(const char *name) {
    for (size_t index = 0; index < sizeof fake_nccl_functions / sizeof fake_nccl_functions[0]; index++)
        if (strcmp(fake_nccl_functions[index].name, name) == 0)
            return fake_nccl_functions[index].body;
    return NULL;
}

/* A fake libnccl at `path` exporting the functions `keep` accepts. Returns 0 when built. */
static int build_fake_nccl(const char *dir, const char *path, int (*keep)(const char *name)) {
    char source_path[PATH_MAX];
    char *source = calloc(1, SOURCE_BYTES);
    int result;
    if (!source)
        return -1;
    snprintf(source_path, sizeof source_path, "%s.c", path);
    append_text(source, SOURCE_BYTES, fake_nccl_prelude);
    for (size_t index = 0; index < sizeof fake_nccl_functions / sizeof fake_nccl_functions[0]; index++)
        if (keep(fake_nccl_functions[index].name))
            append_text(source, SOURCE_BYTES, fake_nccl_functions[index].body);
    write_text(source_path, source);
    free(source);
    (void)dir;
    result = build_shared_object(source_path, path);
    return result;
}

static int keep_all(const char *name) { (void)name; return 1; }
static int keep_all_but_async_error(const char *name) { return strcmp(name, "ncclCommGetAsyncError") != 0; }
static int keep_few(const char *name) {
    return strcmp(name, "ncclGetErrorString") == 0 || strcmp(name, "ncclGetVersion") == 0;
}

static int is_implemented_by_fake_cuda(const char *name) {
    for (size_t index = 0; index < sizeof fake_cuda_implemented / sizeof fake_cuda_implemented[0]; index++)
        if (strcmp(fake_cuda_implemented[index], name) == 0)
            return 1;
    return 0;
}

/* A fake libcuda with every symbol moegen_cuda_open needs. Returns 0 when built. */
static int build_fake_cuda(const char *path) {
    char source_path[PATH_MAX];
    char line[256];
    char *source = calloc(1, SOURCE_BYTES);
    if (!source)
        return -1;
    snprintf(source_path, sizeof source_path, "%s.c", path);
    append_text(source, SOURCE_BYTES, fake_cuda_prelude);
    for (int index = 0; index < moegen_cuda_symbol_count(); index++) {
        const char *name = moegen_cuda_symbol_name(index);
        if (is_implemented_by_fake_cuda(name))
            continue;
        snprintf(line, sizeof line, "int %s(void) { return 999; }\n", name);
        append_text(source, SOURCE_BYTES, line);
    }
    write_text(source_path, source);
    free(source);
    return build_shared_object(source_path, path);
}

/* The address of `name` in the loaded fake at `path` (a test failure when absent). */
static void *fake_symbol(const char *path, const char *name) {
    void *library = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    void *address;
    if (!library)
        library = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!library)
        fail_msg("cannot open the fake %s: %s", path, dlerror());
    address = dlsym(library, name);
    if (!address)
        fail_msg("the fake %s has no %s", path, name);
    dlclose(library);
    return address;
}

static int *nccl_counter(const group_state *group, const char *name) {
    return fake_symbol(group->fake_nccl, name);
}

static int *cuda_counter(const group_state *group, const char *name) {
    return fake_symbol(group->fake_cuda, name);
}

static void reset_fakes(const group_state *group) {
    static const char *const nccl_ints[] = {"fake_init_calls",    "fake_abort_calls",    "fake_destroy_calls",
                                            "fake_finalize_calls", "fake_init_rank",      "fake_init_nranks",
                                            "fake_config_blocking", "fake_group_depth",    "fake_enqueues",
                                            "fake_async_polls",   "fake_log_n"};
    static const char *const cuda_ints[] = {"fake_ctx_depth",   "fake_retains",      "fake_releases",
                                            "fake_live_allocs", "fake_live_streams", "fake_live_events",
                                            "fake_event_queries"};
    for (size_t index = 0; index < sizeof nccl_ints / sizeof nccl_ints[0]; index++)
        *nccl_counter(group, nccl_ints[index]) = 0;
    for (size_t index = 0; index < sizeof cuda_ints / sizeof cuda_ints[0]; index++)
        *cuda_counter(group, cuda_ints[index]) = 0;
    *(size_t *)fake_symbol(group->fake_nccl, "fake_config_size") = 0;
    *(unsigned *)fake_symbol(group->fake_nccl, "fake_config_magic") = 0;
    *(unsigned *)fake_symbol(group->fake_nccl, "fake_config_version") = 0;
}

/* Skip unless the fakes were built; point moegen at them. */
static group_state *use_fakes(void **state) {
    group_state *group = *state;
    if (!group->fakes_built) {
        print_message("cc cannot build the fake libraries here, skipping\n");
        skip();
    }
    setenv("MOEGEN_NCCL_LIB", group->fake_nccl, 1);
    setenv("MOEGEN_CUDA_DRIVER_LIB", group->fake_cuda, 1);
    reset_fakes(group);
    return group;
}

/* Nothing of the fake driver left behind: contexts popped and released, memory freed. */
static void assert_cuda_fake_clean(const group_state *group) {
    assert_int_equal(*cuda_counter(group, "fake_ctx_depth"), 0);
    assert_int_equal(*cuda_counter(group, "fake_retains"), *cuda_counter(group, "fake_releases"));
    assert_int_equal(*cuda_counter(group, "fake_live_allocs"), 0);
    assert_int_equal(*cuda_counter(group, "fake_live_streams"), 0);
    assert_int_equal(*cuda_counter(group, "fake_live_events"), 0);
}

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static const unsigned char some_id[128] = {1, 2, 3};

/* A communicator over the fakes (a test failure otherwise). */
static moegen_comm *create_over_fakes(int rank, int size) {
    moegen_comm *comm = NULL;
    moegen_error err;
    moegen_status status = moegen_comm_create_nccl(some_id, rank, size, 0, &comm, &err);
    if (status != MOEGEN_OK)
        fail_msg("creating a communicator over the fakes: %s", err.message);
    assert_non_null(comm);
    return comm;
}

/* ---- loading ------------------------------------------------------------------------------- */

static void nccl_named_by_an_absent_path_is_unsupported_and_the_message_names_it(void **state) {
    moegen_error err;
    unsigned char id[128];
    moegen_comm *comm = (moegen_comm *)&err;
    moegen_nccl nccl;
    (void)state;
    setenv("MOEGEN_NCCL_LIB", "/nonexistent/libnccl.so.2", 1);
    assert_int_equal(moegen_comm_nccl_unique_id(id, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.code, MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "NCCL not found"));
    assert_non_null(strstr(err.message, "/nonexistent/libnccl.so.2"));
    assert_non_null(strstr(err.message, "No such file")); /* dlerror's text */
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 1, 0, &comm, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_null(comm);
    assert_non_null(strstr(err.message, "/nonexistent/libnccl.so.2"));
    memset(&nccl, 0xab, sizeof nccl);
    assert_int_equal(moegen_nccl_open(&nccl, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_null(nccl.library);
    assert_null(nccl.ncclSend);
    moegen_nccl_close(&nccl);
    moegen_nccl_close(NULL);
    assert_int_equal(moegen_nccl_open(NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
}

static void a_library_lacking_an_nccl_symbol_is_unsupported_naming_the_symbol(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    unsigned char id[128];
    moegen_comm *comm = NULL;
    /* the fake implements every symbol the table needs, so the tests below mean something */
    for (int index = 0; index < moegen_nccl_symbol_count(); index++)
        if (!fake_nccl_body(moegen_nccl_symbol_name(index)))
            fail_msg("the fake NCCL lacks %s", moegen_nccl_symbol_name(index));
    assert_null(moegen_nccl_symbol_name(-1));
    assert_null(moegen_nccl_symbol_name(moegen_nccl_symbol_count()));

    setenv("MOEGEN_NCCL_LIB", group->fake_nccl_no_async, 1);
    assert_int_equal(moegen_comm_nccl_unique_id(id, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, group->fake_nccl_no_async));
    assert_non_null(strstr(err.message, "has no ncclCommGetAsyncError"));
    assert_non_null(strstr(err.message, "undefined symbol")); /* dlerror's text */
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 2, 0, &comm, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_null(comm);
    assert_non_null(strstr(err.message, "has no ncclCommGetAsyncError"));

    setenv("MOEGEN_NCCL_LIB", group->fake_nccl_few, 1);
    assert_int_equal(moegen_comm_nccl_unique_id(id, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, group->fake_nccl_few));
    assert_non_null(strstr(err.message, "has no ncclGetUniqueId"));
}

static void an_nccl_older_than_2_14_is_unsupported_naming_its_version(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    unsigned char id[128];
    moegen_comm *comm = NULL;
    setenv("FAKE_NCCL_VERSION", "21304", 1);
    assert_int_equal(moegen_comm_nccl_unique_id(id, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "version 2.13.4"));
    assert_non_null(strstr(err.message, "2.14 or newer"));
    assert_non_null(strstr(err.message, group->fake_nccl));
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 2, 0, &comm, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_null(comm);
    setenv("FAKE_NCCL_VERSION", "2708", 1); /* the old encoding: 2.7.8 */
    assert_int_equal(moegen_comm_nccl_unique_id(id, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "version 2.7.8"));
    assert_int_equal(*nccl_counter(group, "fake_init_calls"), 0);
}

static void the_config_is_nccl_2_28s_layout_with_its_initializer_values(void **state) {
    moegen_nccl_config config;
    (void)state;
    moegen_nccl_config_init(&config);
    moegen_nccl_config_init(NULL);
    assert_int_equal(sizeof config, 80);
    assert_int_equal(offsetof(moegen_nccl_config, blocking), 16);
    assert_int_equal(offsetof(moegen_nccl_config, netName), 32);
    assert_int_equal(offsetof(moegen_nccl_config, commName), 48);
    assert_int_equal(offsetof(moegen_nccl_config, nvlinkCentricSched), 76);
    assert_int_equal(config.size, 80);
    assert_int_equal(config.magic, 0xcafebeefu);
    assert_int_equal(config.version, 22809);
    assert_int_equal(config.blocking, INT_MIN);
    assert_int_equal(config.nvlinkCentricSched, INT_MIN);
    assert_null(config.netName);
    assert_null(config.commName);
    assert_int_equal(MOEGEN_NCCL_VERSION(2, 14, 0), 21400);
    assert_int_equal(MOEGEN_NCCL_VERSION(2, 8, 4), 2804);
}

static void nccl_error_texts_name_the_result_without_a_library(void **state) {
    char text[256];
    (void)state;
    moegen_nccl_error_text(NULL, MOEGEN_NCCL_REMOTE_ERROR, NULL, text, sizeof text);
    assert_string_equal(text, "ncclRemoteError: remote process exited or there was a network error");
    moegen_nccl_error_text(NULL, 42, NULL, text, sizeof text);
    assert_string_equal(text, "NCCL error 42");
    assert_string_equal(moegen_nccl_error_text(NULL, 0, NULL, NULL, 0), "");
}

/* ---- creation over the fakes ------------------------------------------------------------------ */

static void a_communicator_that_never_comes_up_fails_within_the_timeout_and_is_aborted(void **state) {
    group_state *group = use_fakes(state);
    moegen_comm *comm = (moegen_comm *)&comm;
    moegen_error err;
    double start, elapsed;
    setenv("MOEGEN_COMM_TIMEOUT", "1", 1);
    setenv("FAKE_NCCL_ASYNC", "progress", 1);
    start = seconds_now();
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 2, 0, &comm, &err), MOEGEN_ERR_COMM);
    elapsed = seconds_now() - start;
    print_message("gave up after %.2f s: %s\n", elapsed, err.message);
    assert_null(comm);
    assert_int_equal(err.code, MOEGEN_ERR_COMM);
    assert_non_null(strstr(err.message, "rank 0 of 2"));
    assert_non_null(strstr(err.message, "within 1 s"));
    assert_non_null(strstr(err.message, "initializing the communicator"));
    assert_true(elapsed >= 0.9);
    assert_true(elapsed < 10.0);
    assert_int_equal(*nccl_counter(group, "fake_init_calls"), 1);
    assert_true(*nccl_counter(group, "fake_async_polls") > 1);
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 1);
    assert_int_equal(*nccl_counter(group, "fake_destroy_calls"), 0);
    assert_cuda_fake_clean(group);
}

static void a_failed_nccl_init_is_a_comm_error_naming_ncclcomminitrankconfig(void **state) {
    group_state *group = use_fakes(state);
    moegen_comm *comm = NULL;
    moegen_error err;
    setenv("FAKE_NCCL_INIT", "fail", 1);
    assert_int_equal(moegen_comm_create_nccl(some_id, 1, 3, 0, &comm, &err), MOEGEN_ERR_COMM);
    assert_null(comm);
    assert_int_equal(err.native_code, MOEGEN_NCCL_SYSTEM_ERROR);
    assert_non_null(strstr(err.message, "rank 1 of 3"));
    assert_non_null(strstr(err.message, "ncclCommInitRankConfig"));
    assert_non_null(strstr(err.message, "ncclSystemError"));
    assert_cuda_fake_clean(group);
}

static void a_communicator_over_the_fakes_is_non_blocking_and_destroys_cleanly(void **state) {
    group_state *group = use_fakes(state);
    moegen_comm *comm;
    setenv("FAKE_NCCL_INIT", "progress", 1); /* what a real non-blocking init returns */
    comm = create_over_fakes(2, 4);
    assert_int_equal(moegen_comm_rank(comm), 2);
    assert_int_equal(moegen_comm_size(comm), 4);
    assert_int_equal(comm->memory, MOEGEN_COMM_DEVICE);
    assert_string_equal(comm->transport, "nccl");
    assert_int_equal(*nccl_counter(group, "fake_init_rank"), 2);
    assert_int_equal(*nccl_counter(group, "fake_init_nranks"), 4);
    assert_int_equal(*nccl_counter(group, "fake_config_blocking"), 0);
    assert_int_equal(*(size_t *)fake_symbol(group->fake_nccl, "fake_config_size"), 80);
    assert_int_equal(*(unsigned *)fake_symbol(group->fake_nccl, "fake_config_magic"), 0xcafebeefu);
    assert_int_equal(*(unsigned *)fake_symbol(group->fake_nccl, "fake_config_version"), 22809);
    assert_int_equal(*cuda_counter(group, "fake_ctx_depth"), 0); /* popped after creation */
    assert_int_equal(*cuda_counter(group, "fake_retains"), 1);
    moegen_comm_destroy(comm);
    assert_int_equal(*nccl_counter(group, "fake_finalize_calls"), 1);
    assert_int_equal(*nccl_counter(group, "fake_destroy_calls"), 1);
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 0);
    assert_cuda_fake_clean(group);
}

static void a_device_the_driver_does_not_have_is_an_invalid_argument(void **state) {
    group_state *group = use_fakes(state);
    moegen_comm *comm = NULL;
    moegen_error err;
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 2, 3, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_null(comm);
    assert_non_null(strstr(err.message, "CUDA device 3 does not exist (1 device)"));
    assert_int_equal(*nccl_counter(group, "fake_init_calls"), 0);
    assert_cuda_fake_clean(group);
}

/* ---- collectives over the fakes ---------------------------------------------------------------- */

static void alltoallv_splits_transfers_above_one_gib_and_copies_its_own_rows_locally(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    moegen_comm *comm = create_over_fakes(0, 2);
    int *log_n = nccl_counter(group, "fake_log_n");
    int *log_kind = nccl_counter(group, "fake_log_kind");
    int *log_peer = nccl_counter(group, "fake_log_peer");
    int *log_type = nccl_counter(group, "fake_log_type");
    size_t *log_count = fake_symbol(group->fake_nccl, "fake_log_count");
    /* 2500 rows of 1 MiB to rank 1: 1 GiB + 1 GiB + 452 MiB; 1 row back. The buffers are
     * never touched by the fake, so their addresses only need to be distinct. */
    const int64_t send_counts[2] = {0, 2500}, send_offsets[2] = {0, 0};
    const int64_t recv_counts[2] = {0, 1}, recv_offsets[2] = {0, 0};
    char *far_send = (char *)(uintptr_t)0x100000000ull, *far_recv = (char *)(uintptr_t)0x300000000ull;
    if (moegen_comm_alltoallv(comm, far_send, send_counts, send_offsets, far_recv, recv_counts, recv_offsets, MIB,
                              &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(*log_n, 4);
    for (int index = 0; index < 4; index++) {
        assert_int_equal(log_peer[index], 1);
        assert_int_equal(log_type[index], MOEGEN_NCCL_UINT8);
    }
    assert_int_equal(log_kind[0], 1);
    assert_int_equal(log_count[0], GIB);
    assert_int_equal(log_kind[1], 1);
    assert_int_equal(log_count[1], GIB);
    assert_int_equal(log_kind[2], 1);
    assert_int_equal(log_count[2], 452 * MIB);
    assert_int_equal(log_kind[3], 2);
    assert_int_equal(log_count[3], MIB);
    assert_int_equal(*nccl_counter(group, "fake_group_depth"), 0);
    assert_true(*cuda_counter(group, "fake_event_queries") >= 1);
    assert_int_equal(comm->bytes_sent, 2500 * MIB);
    assert_int_equal(comm->bytes_received, MIB);
    moegen_comm_destroy(comm);

    /* rank 1 of 2: its own 3 rows are copied on the device, 2 rows go to rank 0 and 1 comes back */
    reset_fakes(group);
    comm = create_over_fakes(1, 2);
    {
        int32_t send[8] = {10, 11, 12, 13, 14, 15, 16, 17};
        int32_t recv[8] = {0};
        const int64_t counts_out[2] = {2, 3}, offsets_out[2] = {0, 4};
        const int64_t counts_in[2] = {1, 3}, offsets_in[2] = {0, 5};
        if (moegen_comm_alltoallv(comm, send, counts_out, offsets_out, recv, counts_in, offsets_in, sizeof(int32_t),
                                  &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        assert_int_equal(recv[5], 14);
        assert_int_equal(recv[6], 15);
        assert_int_equal(recv[7], 16);
        assert_int_equal(*log_n, 2);
        assert_int_equal(log_kind[0], 1);
        assert_int_equal(log_peer[0], 0);
        assert_int_equal(log_count[0], 8);
        assert_int_equal(log_kind[1], 2);
        assert_int_equal(log_count[1], 4);
        /* alltoall: rank 1's part copied locally, 4 bytes each way with rank 0 */
        memset(recv, 0, sizeof recv);
        if (moegen_comm_alltoall(comm, send, recv, 4 * sizeof(int32_t), &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        assert_memory_equal(recv + 4, send + 4, 4 * sizeof(int32_t));
        assert_int_equal(*log_n, 4);
        assert_int_equal(log_kind[2], 1);
        assert_int_equal(log_count[2], 16);
        assert_int_equal(log_kind[3], 2);
        assert_int_equal(log_count[3], 16);
    }
    moegen_comm_destroy(comm);
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 0);
    assert_cuda_fake_clean(group);
}

static void allreduce_max_and_allgather_stage_host_buffers_through_device_memory(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    moegen_comm *comm = create_over_fakes(1, 2);
    int64_t values[3] = {3, 50, -4}; /* the fake's other rank holds 0, 10, 20 */
    char gathered[10];
    if (moegen_comm_allreduce_max(comm, values, 3, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(values[0], 3);
    assert_int_equal(values[1], 50);
    assert_int_equal(values[2], 20);
    assert_true(*cuda_counter(group, "fake_live_allocs") == 2); /* device + pinned staging */
    assert_int_equal(moegen_comm_allreduce_max(comm, values, 0, &err), MOEGEN_OK);
    memset(gathered, 0, sizeof gathered);
    if (moegen_comm_allgather(comm, "hello", gathered, 5, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_memory_equal(gathered, "AAAAAhello", 10);
    assert_int_equal(*cuda_counter(group, "fake_ctx_depth"), 0);
    moegen_comm_destroy(comm);
    assert_cuda_fake_clean(group);
}

static void a_collective_whose_peer_never_answers_times_out_and_aborts_nccl(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    moegen_comm *comm = create_over_fakes(0, 2);
    char send[32] = "abcdefghijklmnopqrstuvwxyz01234";
    char recv[32];
    double start, elapsed;
    assert_int_equal(moegen_comm_set_timeout(comm, 0.5, &err), MOEGEN_OK);
    setenv("FAKE_CUDA_NEVER_READY", "1", 1);
    start = seconds_now();
    assert_int_equal(moegen_comm_alltoall(comm, send, recv, 16, &err), MOEGEN_ERR_COMM);
    elapsed = seconds_now() - start;
    print_message("%.2f s: %s\n", elapsed, err.message);
    assert_true(elapsed >= 0.45 && elapsed < 10.0);
    assert_non_null(strstr(err.message, "rank 0 of 2"));
    assert_non_null(strstr(err.message, "alltoall"));
    assert_non_null(strstr(err.message, "peer did not answer within 0.5 s"));
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 1);
    assert_int_equal(*cuda_counter(group, "fake_ctx_depth"), 0);
    /* broken from now on: fails at once, NCCL is not called again */
    *nccl_counter(group, "fake_log_n") = 0;
    assert_int_equal(moegen_comm_allgather(comm, send, recv, 4, &err), MOEGEN_ERR_COMM);
    assert_non_null(strstr(err.message, "broken"));
    assert_int_equal(*nccl_counter(group, "fake_log_n"), 0);
    moegen_comm_destroy(comm);
    assert_int_equal(*nccl_counter(group, "fake_finalize_calls"), 0);
    assert_int_equal(*nccl_counter(group, "fake_destroy_calls"), 0);
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 1);
    assert_cuda_fake_clean(group);
}

static void an_asynchronous_nccl_error_fails_the_collective_with_nccls_reason(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    moegen_comm *comm;
    int64_t values[2] = {1, 2};
    setenv("FAKE_NCCL_ASYNC", "remote", 1); /* fine until something is enqueued */
    comm = create_over_fakes(0, 2);
    assert_int_equal(moegen_comm_allreduce_max(comm, values, 2, &err), MOEGEN_ERR_COMM);
    print_message("%s\n", err.message);
    assert_int_equal(err.native_code, MOEGEN_NCCL_REMOTE_ERROR);
    assert_non_null(strstr(err.message, "allreduce"));
    assert_non_null(strstr(err.message, "remote process exited or there was a network error (fake)"));
    assert_non_null(strstr(err.message, "NCCL: fake last error"));
    assert_null(strchr(err.message, '\n'));
    assert_int_equal(values[0], 1); /* left as it was */
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 1);
    moegen_comm_destroy(comm);
    assert_int_equal(*nccl_counter(group, "fake_destroy_calls"), 0);
    assert_cuda_fake_clean(group);
}

static void bad_collective_arguments_fail_and_break_the_communicator(void **state) {
    group_state *group = use_fakes(state);
    moegen_error err;
    moegen_comm *comm = create_over_fakes(0, 2);
    char buffer[16];
    const int64_t counts[2] = {1, -3}, offsets[2] = {0, 0};
    assert_int_equal(moegen_comm_alltoallv(comm, buffer, counts, offsets, buffer, counts, offsets, 4, &err),
                     MOEGEN_ERR_COMM);
    assert_non_null(strstr(err.message, "negative"));
    assert_int_equal(*nccl_counter(group, "fake_log_n"), 0);
    assert_int_equal(*nccl_counter(group, "fake_abort_calls"), 1);
    moegen_comm_destroy(comm);

    reset_fakes(group);
    comm = create_over_fakes(0, 2);
    {
        const int64_t out[2] = {2, 0}, in[2] = {1, 0};
        assert_int_equal(moegen_comm_alltoallv(comm, buffer, out, offsets, buffer, in, offsets, 4, &err),
                         MOEGEN_ERR_COMM);
        assert_non_null(strstr(err.message, "sends itself 2 rows but expects 1"));
    }
    moegen_comm_destroy(comm);

    reset_fakes(group);
    comm = create_over_fakes(0, 2);
    assert_int_equal(moegen_comm_alltoall(comm, NULL, buffer, 4, &err), MOEGEN_ERR_COMM);
    assert_non_null(strstr(err.message, "NULL"));
    moegen_comm_destroy(comm);
    assert_cuda_fake_clean(group);
}

/* ---- the real NCCL ------------------------------------------------------------------------------ */

static void the_real_nccl_makes_a_unique_id_or_says_why(void **state) {
    unsigned char id[128];
    moegen_error err;
    moegen_status status;
    int nonzero = 0;
    (void)state;
    unsetenv("MOEGEN_NCCL_LIB");
    memset(id, 0, sizeof id);
    memset(&err, 0, sizeof err);
    status = moegen_comm_nccl_unique_id(id, &err);
    if (status == MOEGEN_OK) {
        for (int index = 0; index < 128; index++)
            nonzero |= id[index] != 0;
        print_message("NCCL made a unique id\n");
        assert_true(nonzero);
    } else {
        print_message("no unique id here (%s): %s\n", moegen_status_name(status), err.message);
        assert_int_equal(err.code, status);
        assert_true(strlen(err.message) > 10);
        assert_true(status == MOEGEN_ERR_UNSUPPORTED || status == MOEGEN_ERR_COMM);
    }
}

static void without_a_usable_cuda_driver_creation_is_unsupported_and_says_so(void **state) {
    moegen_cuda cu;
    moegen_error err;
    moegen_comm *comm = NULL;
    moegen_status status;
    (void)state;
    unsetenv("MOEGEN_CUDA_DRIVER_LIB");
    unsetenv("MOEGEN_NCCL_LIB");
    if (moegen_cuda_open(&cu, &err) == MOEGEN_OK) {
        moegen_cuda_close(&cu);
        print_message("a CUDA driver and device are present, so this case does not arise here\n");
        skip();
    }
    status = moegen_comm_create_nccl(some_id, 0, 2, 0, &comm, &err);
    print_message("%s: %s\n", moegen_status_name(status), err.message);
    assert_int_equal(status, MOEGEN_ERR_UNSUPPORTED);
    assert_null(comm);
    /* either NCCL is absent, or the driver is, and the message says which */
    assert_true(strstr(err.message, "NCCL not found") != NULL || strstr(err.message, "needs a CUDA device") != NULL);
}

/* One rank on device 0 over the real NCCL and driver: each collective moves device data. */
static void a_one_rank_communicator_runs_every_collective_on_a_real_gpu_when_present(void **state) {
    moegen_cuda cu;
    moegen_error err;
    moegen_comm *comm = NULL;
    unsigned char id[128];
    moegen_cu_context context = NULL;
    moegen_cu_context popped = NULL;
    moegen_cu_device_pointer send = 0, recv = 0;
    int32_t host[16], back[16];
    moegen_status status;
    (void)state;
    unsetenv("MOEGEN_CUDA_DRIVER_LIB");
    unsetenv("MOEGEN_NCCL_LIB");
    if (moegen_cuda_open(&cu, &err) != MOEGEN_OK) {
        print_message("no usable CUDA driver here (%s); skipping the GPU check\n", err.message);
        skip();
    }
    status = moegen_comm_nccl_unique_id(id, &err);
    if (status == MOEGEN_ERR_UNSUPPORTED) {
        moegen_cuda_close(&cu);
        print_message("no NCCL here (%s); skipping the GPU check\n", err.message);
        skip();
    }
    if (status != MOEGEN_OK)
        fail_msg("%s", err.message);
    setenv("MOEGEN_COMM_TIMEOUT", "120", 1);
    if (moegen_comm_create_nccl(id, 0, 1, 0, &comm, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(cu.cuDevicePrimaryCtxRetain(&context, 0), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuCtxPushCurrent(context), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuMemAlloc(&send, sizeof host), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuMemAlloc(&recv, sizeof host), MOEGEN_CUDA_SUCCESS);
    for (int index = 0; index < 16; index++)
        host[index] = 100 + index;
    assert_int_equal(cu.cuMemcpyHtoD(send, host, sizeof host), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuMemsetD8(recv, 0, sizeof host), MOEGEN_CUDA_SUCCESS);
    if (moegen_comm_alltoall(comm, (void *)(uintptr_t)send, (void *)(uintptr_t)recv, sizeof host, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(cu.cuMemcpyDtoH(back, recv, sizeof back), MOEGEN_CUDA_SUCCESS);
    assert_memory_equal(back, host, sizeof host);
    {
        const int64_t counts[1] = {5}, send_offsets[1] = {2}, recv_offsets[1] = {9};
        assert_int_equal(cu.cuMemsetD8(recv, 0, sizeof host), MOEGEN_CUDA_SUCCESS);
        if (moegen_comm_alltoallv(comm, (void *)(uintptr_t)send, counts, send_offsets, (void *)(uintptr_t)recv,
                                  counts, recv_offsets, sizeof(int32_t), &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        assert_int_equal(cu.cuMemcpyDtoH(back, recv, sizeof back), MOEGEN_CUDA_SUCCESS);
        assert_memory_equal(back + 9, host + 2, 5 * sizeof(int32_t));
    }
    {
        int64_t values[3] = {-5, 7, INT64_MAX};
        char gathered[6] = "";
        if (moegen_comm_allreduce_max(comm, values, 3, &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        assert_int_equal(values[0], -5);
        assert_int_equal(values[1], 7);
        assert_true(values[2] == INT64_MAX);
        if (moegen_comm_allgather(comm, "moegen", gathered, 6, &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        assert_memory_equal(gathered, "moegen", 6);
    }
    assert_int_equal(cu.cuMemFree(send), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuMemFree(recv), MOEGEN_CUDA_SUCCESS);
    assert_int_equal(cu.cuCtxPopCurrent(&popped), MOEGEN_CUDA_SUCCESS);
    moegen_comm_destroy(comm);
    assert_int_equal(cu.cuDevicePrimaryCtxRelease(0), MOEGEN_CUDA_SUCCESS);
    moegen_cuda_close(&cu);
}

/* ---- arguments ------------------------------------------------------------------------------- */

static void null_and_out_of_range_arguments_are_invalid(void **state) {
    moegen_error err;
    moegen_comm *comm = (moegen_comm *)&err;
    (void)state;
    /* checked before any library is opened: the outcome does not depend on this machine */
    setenv("MOEGEN_NCCL_LIB", "/nonexistent/libnccl.so.2", 1);
    assert_int_equal(moegen_comm_nccl_unique_id(NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "NULL"));
    assert_int_equal(moegen_comm_create_nccl(NULL, 0, 1, 0, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_null(comm);
    assert_non_null(strstr(err.message, "unique id is NULL"));
    assert_int_equal(moegen_comm_create_nccl(some_id, 1, 1, 0, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "rank 1 of size 1"));
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 0, 0, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_comm_create_nccl(some_id, -1, 2, 0, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 1, -1, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "CUDA device -1"));
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 1, 0, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_comm_create_nccl(some_id, 0, 1, 0, NULL, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_null(comm);
}

/* ---- setup ----------------------------------------------------------------------------------- */

static int save_environment(void **state) {
    group_state *group = *state;
    for (int index = 0; index < TOUCHED_COUNT; index++) {
        const char *value = getenv(touched_variables[index]);
        group->saved[index].was_set = value != NULL;
        snprintf(group->saved[index].value, sizeof group->saved[index].value, "%s", value ? value : "");
        /* the fakes' switches start off */
        if (strncmp(touched_variables[index], "FAKE_", 5) == 0)
            unsetenv(touched_variables[index]);
    }
    return 0;
}

static int restore_environment(void **state) {
    group_state *group = *state;
    for (int index = 0; index < TOUCHED_COUNT; index++) {
        if (group->saved[index].was_set)
            setenv(touched_variables[index], group->saved[index].value, 1);
        else
            unsetenv(touched_variables[index]);
    }
    return 0;
}

static int group_setup(void **state) {
    const char *base = getenv("TMPDIR");
    group_state *group = calloc(1, sizeof *group);
    if (!group)
        return -1;
    if (!base || base[0] != '/')
        base = "/tmp";
    snprintf(group->dir, sizeof group->dir, "%s/moegen-test-comm-nccl-XXXXXX", base);
    if (!mkdtemp(group->dir)) {
        free(group);
        return -1;
    }
    snprintf(group->fake_nccl, sizeof group->fake_nccl, "%.3900s/fake_nccl.so", group->dir);
    snprintf(group->fake_nccl_no_async, sizeof group->fake_nccl_no_async, "%.3900s/fake_nccl_no_async.so", group->dir);
    snprintf(group->fake_nccl_few, sizeof group->fake_nccl_few, "%.3900s/fake_nccl_few.so", group->dir);
    snprintf(group->fake_cuda, sizeof group->fake_cuda, "%.3900s/fake_cuda.so", group->dir);
    group->fakes_built = build_fake_nccl(group->dir, group->fake_nccl, keep_all) == 0 &&
                         build_fake_nccl(group->dir, group->fake_nccl_no_async, keep_all_but_async_error) == 0 &&
                         build_fake_nccl(group->dir, group->fake_nccl_few, keep_few) == 0 &&
                         build_fake_cuda(group->fake_cuda) == 0;
    *state = group;
    return 0;
}

static int group_teardown(void **state) {
    group_state *group = *state;
    (void)moegen_remove_tree(group->dir);
    free(group);
    return 0;
}

#define TEST(name) cmocka_unit_test_setup_teardown(name, save_environment, restore_environment)

int main(void) {
    const struct CMUnitTest tests[] = {
        /* first: the real driver and NCCL, before any fake is mapped */
        TEST(a_one_rank_communicator_runs_every_collective_on_a_real_gpu_when_present),
        TEST(the_real_nccl_makes_a_unique_id_or_says_why),
        TEST(without_a_usable_cuda_driver_creation_is_unsupported_and_says_so),
        TEST(nccl_named_by_an_absent_path_is_unsupported_and_the_message_names_it),
        TEST(null_and_out_of_range_arguments_are_invalid),
        TEST(the_config_is_nccl_2_28s_layout_with_its_initializer_values),
        TEST(nccl_error_texts_name_the_result_without_a_library),
        TEST(a_library_lacking_an_nccl_symbol_is_unsupported_naming_the_symbol),
        TEST(an_nccl_older_than_2_14_is_unsupported_naming_its_version),
        TEST(a_communicator_that_never_comes_up_fails_within_the_timeout_and_is_aborted),
        TEST(a_failed_nccl_init_is_a_comm_error_naming_ncclcomminitrankconfig),
        TEST(a_communicator_over_the_fakes_is_non_blocking_and_destroys_cleanly),
        TEST(a_device_the_driver_does_not_have_is_an_invalid_argument),
        TEST(alltoallv_splits_transfers_above_one_gib_and_copies_its_own_rows_locally),
        TEST(allreduce_max_and_allgather_stage_host_buffers_through_device_memory),
        TEST(a_collective_whose_peer_never_answers_times_out_and_aborts_nccl),
        TEST(an_asynchronous_nccl_error_fails_the_collective_with_nccls_reason),
        TEST(bad_collective_arguments_fail_and_break_the_communicator),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
