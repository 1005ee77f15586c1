/* test_cuda_api.c — tests of the run-time loaded NVRTC and CUDA driver tables
 * (runtime/cuda_api.c).
 *
 * Place in the pipeline: spec -> gen -> [compile (NVRTC) -> load -> launch (driver)].
 * NVRTC: it opens and reports its version; CUDA C++ with an in-memory header,
 * bf16 mma.sync/ldmatrix inline PTX and plain FMA code compiles warning-free to
 * CUBINs for sm_80 and sm_90a whose ptxas -v reports parse per kernel; a syntax
 * error is a compile error carrying its line; register pressure shows up as spills;
 * bad arguments and options are refused; "sm_XX" names are read by the one parser
 * (moegen_cuda_arch_parse, gen/variant.h), accepted and refused forms alike. The driver: a missing library, the
 * toolkit's stub library and fake drivers built here at run time (no device, zero
 * devices, a missing symbol, a fallback symbol, a fake Hopper) give the documented
 * statuses and messages. With a real driver and GPU (a GPU machine), device 0 is
 * described and the compiled kernels are loaded, launched and checked; without
 * one those parts are skipped with a message.
 *
 * Invariants: every test restores the environment variables it changes; the
 * fake drivers live in one mkdtemp directory, removed at the end; NVRTC is opened
 * once for the whole group (it is read-only after opening). Libraries stay mapped
 * (RTLD_NODELETE), and the toolkit's stub has the soname libcuda.so.1, so the test
 * of the real driver runs before the stub is ever opened.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cache.h"
#include "test_support.h"
#include "cuda_api.h"
#include "variant.h"

extern char **environ;

#define MAX_RECORDS 16
#define ELF_MACHINE_CUDA 190 /* EM_CUDA */
#define FAKE_SOURCE_BYTES 16384

/* Shared by every test: NVRTC (open or not) and a scratch directory. */
typedef struct group_state {
    moegen_nvrtc nvrtc;
    int nvrtc_open;
    char nvrtc_problem[MOEGEN_ERROR_MESSAGE_BYTES];
    char dir[PATH_MAX];
} group_state;

/* An environment variable's value saved for restoring. */
typedef struct saved_variable {
    const char *name;
    int was_set;
    char value[PATH_MAX];
} saved_variable;

/* ---- sanitizer settings for this test -------------------------------------------------- */

/* Read by AddressSanitizer / LeakSanitizer at start-up when the test is built with
 * them (ignored otherwise). The CUDA driver maps memory where ASan's shadow gap is
 * protected, so cuInit fails under ASan unless the gap is left unprotected; and
 * libcuda keeps an allocation from cuInit for the life of the process (NVRTC itself
 * calls cuInit when a driver is present), which is not ours to free. $ASAN_OPTIONS
 * still overrides these. */
const char *__asan_default_options(void);
const char *__lsan_default_suppressions(void);

__attribute__((used)) const char *__asan_default_options(void) {
    return "protect_shadow_gap=0";
}

__attribute__((used)) const char *__lsan_default_suppressions(void) {
    return "leak:libcuda.so\n";
}

/* ---- sources ------------------------------------------------------------------------ */

static const char tile_header_name[] = "moegen_test_tile.h";
static const char tile_header_text[] =
    "#pragma once\n"
    "#define TILE_M 16\n"
    "#define TILE_N 8\n"
    "#define TILE_K 16\n"
    "__device__ __forceinline__ float fma_chain(float a, float b, float c) {\n"
    "    return fmaf(a, b, fmaf(a, c, b));\n"
    "}\n";

/* mma_bf16_tile: C[16x8] = A[16x16] (row-major bf16) x B[16x8], with B given
 * transposed (Bt[8][16], i.e. column-major B), through ldmatrix + mma.sync.
 * fma_rows: y[i] = fma_chain(x[i], SCALE, y[i]). */
static const char kernel_source[] =
    "#include \"moegen_test_tile.h\"\n"
    "extern \"C\" __global__ void __launch_bounds__(32)\n"
    "mma_bf16_tile(const unsigned short *a, const unsigned short *b_transposed, float *c) {\n"
    "    __shared__ __align__(16) unsigned short a_tile[TILE_M * TILE_K];\n"
    "    __shared__ __align__(16) unsigned short b_tile[TILE_N * TILE_K];\n"
    "    const unsigned lane = threadIdx.x;\n"
    "    for (unsigned i = lane; i < TILE_M * TILE_K; i += 32) a_tile[i] = a[i];\n"
    "    for (unsigned i = lane; i < TILE_N * TILE_K; i += 32) b_tile[i] = b_transposed[i];\n"
    "    __syncthreads();\n"
    "    unsigned a_regs[4], b_regs[2];\n"
    "    float d[4] = {0.f, 0.f, 0.f, 0.f};\n"
    "    const unsigned a_address = (unsigned)__cvta_generic_to_shared(\n"
    "        &a_tile[(lane % 16) * TILE_K + (lane / 16) * 8]);\n"
    "    const unsigned b_address = (unsigned)__cvta_generic_to_shared(\n"
    "        &b_tile[(lane % 8) * TILE_K + ((lane / 8) % 2) * 8]);\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n\"\n"
    "                 : \"=r\"(a_regs[0]), \"=r\"(a_regs[1]), \"=r\"(a_regs[2]), "
    "\"=r\"(a_regs[3])\n"
    "                 : \"r\"(a_address));\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\\n\"\n"
    "                 : \"=r\"(b_regs[0]), \"=r\"(b_regs[1]) : \"r\"(b_address));\n"
    "    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \"\n"
    "                 \"{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\\n\"\n"
    "                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n"
    "                 : \"r\"(a_regs[0]), \"r\"(a_regs[1]), \"r\"(a_regs[2]), \"r\"(a_regs[3]),\n"
    "                   \"r\"(b_regs[0]), \"r\"(b_regs[1]));\n"
    "    const unsigned row = lane / 4, column = (lane % 4) * 2;\n"
    "    c[row * TILE_N + column] = d[0];\n"
    "    c[row * TILE_N + column + 1] = d[1];\n"
    "    c[(row + 8) * TILE_N + column] = d[2];\n"
    "    c[(row + 8) * TILE_N + column + 1] = d[3];\n"
    "}\n"
    "extern \"C\" __global__ void fma_rows(const float *x, float *y, int n) {\n"
    "    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "    if (i < n) y[i] = fma_chain(x[i], SCALE, y[i]);\n"
    "}\n";

/* Line 3 lacks an expression. */
static const char broken_source[] = "extern \"C\" __global__ void broken(float *y) {\n"
                                    "    y[0] = 1.0f;\n"
                                    "    int z = ;\n"
                                    "}\n";

/* 96 live accumulators under a 32-register budget (1024 threads, 2 blocks per SM)
 * must spill; `helper` is a non-inlined device function with a local array. */
static const char pressure_source[] =
    "__device__ __noinline__ float helper(const float *p, int k) {\n"
    "    float a[64];\n"
    "    for (int i = 0; i < 64; ++i) a[i] = p[i * k];\n"
    "    return a[k & 63];\n"
    "}\n"
    "extern \"C\" __global__ void __launch_bounds__(1024, 2)\n"
    "pressure(const float *x, float *y, int n) {\n"
    "    float acc[96];\n"
    "#pragma unroll\n"
    "    for (int j = 0; j < 96; ++j) acc[j] = x[j * n + threadIdx.x];\n"
    "    for (int it = 0; it < n; ++it) {\n"
    "#pragma unroll\n"
    "        for (int j = 0; j < 96; ++j) acc[j] = fmaf(acc[j], acc[(j + 1) % 96], x[it + j]);\n"
    "    }\n"
    "    float s = helper(x, n);\n"
    "#pragma unroll\n"
    "    for (int j = 0; j < 96; ++j) s += acc[j] * (float)j;\n"
    "    y[threadIdx.x] = s;\n"
    "}\n";

static const char *const kernel_options[] = {"-default-device", "--std=c++17", "-lineinfo",
                                             "--ptxas-options=-v", "-DSCALE=2.0f"};
#define KERNEL_OPTION_COUNT ((int)(sizeof kernel_options / sizeof kernel_options[0]))

/* ---- helpers ------------------------------------------------------------------------ */

static void save_variable(saved_variable *saved, const char *name) {
    const char *value = getenv(name);
    saved->name = name;
    saved->was_set = value != NULL;
    format_text(saved->value, sizeof saved->value, "%s", value ? value : "");
}

static void restore_variable(const saved_variable *saved) {
    if (saved->was_set)
        setenv(saved->name, saved->value, 1);
    else
        unsetenv(saved->name);
}

static const moegen_nvrtc *require_nvrtc(void **state) {
    group_state *group = *state;
    if (!group->nvrtc_open) {
        print_message("NVRTC is not available here, skipping: %s\n", group->nvrtc_problem);
        skip();
    }
    return &group->nvrtc;
}

/* The record named `name` in `records`, or a test failure. */
static const moegen_kernel_resources *find_record(const moegen_kernel_resources *records,
                                                  int count, const char *name) {
    const moegen_kernel_resources *found = NULL;
    for (int index = 0; index < count && !found; index++)
        if (strcmp(records[index].name, name) == 0)
            found = &records[index];
    if (!found)
        fail_msg("no ptxas record for %s", name);
    return found;
}

static void write_text(const char *path, const char *text) {
    FILE *file = fopen(path, "w");
    assert_non_null(file);
    assert_int_equal(fputs(text, file) >= 0, 1);
    assert_int_equal(fclose(file), 0);
}

/* Run `cc -shared -fPIC -o output source`; 0 on success. */
static int build_shared_object(const char *source, const char *output) {
    char *argv[] = {"cc", "-shared", "-fPIC", "-O0", "-o", (char *)output, (char *)source, NULL};
    pid_t pid;
    int wait_status = 0;
    int result = -1;
    if (posix_spawnp(&pid, "cc", NULL, NULL, argv, environ) == 0 &&
        waitpid(pid, &wait_status, 0) == pid && WIFEXITED(wait_status) &&
        WEXITSTATUS(wait_status) == 0)
        result = 0;
    return result;
}

/* What a fake libcuda does. */
typedef struct fake_driver {
    const char *file_name;    /* in the group directory, unique per fake */
    int init_result;          /* what cuInit returns */
    int device_count;         /* what cuDeviceGetCount reports */
    const char *omit;         /* a symbol from the list not to export (or NULL) */
    int export_original_elapsed_time; /* also export cuEventElapsedTime */
} fake_driver;

static int is_implemented_by_fake(const char *name) {
    static const char *const implemented[] = {
        "cuInit",          "cuDriverGetVersion",   "cuDeviceGetCount",    "cuDeviceGet",
        "cuDeviceGetName", "cuDeviceGetAttribute", "cuDeviceTotalMem_v2", "cuGetErrorName",
        "cuGetErrorString"};
    int found = 0;
    for (size_t index = 0; index < sizeof implemented / sizeof implemented[0]; index++)
        found |= strcmp(name, implemented[index]) == 0;
    return found;
}

static void append_text(char *source, size_t size, const char *text) {
    size_t used = strlen(source);
    if (used + strlen(text) >= size)
        fail_msg("fake driver source too long");
    memcpy(source + used, text, strlen(text) + 1);
}

/* Write and build a fake libcuda as described; its path goes to `path`. Skips the
 * test when no C compiler can build it. */
static void build_fake_driver(const group_state *group, const fake_driver *fake, char *path,
                              size_t size) {
    char source_path[PATH_MAX];
    char line[512];
    char *source = calloc(1, FAKE_SOURCE_BYTES);
    assert_non_null(source);
    format_text(path, size, "%s/%s.so", group->dir, fake->file_name);
    format_text(source_path, sizeof source_path, "%s/%s.c", group->dir, fake->file_name);
    format_text(line, sizeof line,
                "#include <stddef.h>\n#include <string.h>\n"
                "int cuInit(unsigned int flags) { (void)flags; return %d; }\n"
                "int cuDeviceGetCount(int *count) { *count = %d; return 0; }\n",
                fake->init_result, fake->device_count);
    append_text(source, FAKE_SOURCE_BYTES, line);
    append_text(
        source, FAKE_SOURCE_BYTES,
        "int cuDriverGetVersion(int *version) { *version = 13000; return 0; }\n"
        "int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }\n"
        "int cuDeviceGetName(char *name, int length, int device) {\n"
        "    (void)device; strncpy(name, \"Fake Hopper\", (size_t)length); return 0; }\n"
        "int cuDeviceGetAttribute(int *value, int attribute, int device) {\n"
        "    (void)device;\n"
        "    switch (attribute) {\n"
        "    case 75: *value = 9; break;\n"
        "    case 76: *value = 0; break;\n"
        "    case 16: *value = 132; break;\n"
        "    case 97: *value = 232448; break;\n"
        "    default: *value = 1; break;\n"
        "    }\n"
        "    return 0;\n"
        "}\n"
        "int cuDeviceTotalMem_v2(size_t *bytes, int device) {\n"
        "    (void)device; *bytes = (size_t)80 << 30; return 0; }\n"
        "int cuGetErrorName(int result, const char **name) {\n"
        "    if (result != 100) return 1;\n"
        "    *name = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n"
        "int cuGetErrorString(int result, const char **text) {\n"
        "    if (result != 100) return 1;\n"
        "    *text = \"no CUDA-capable device is detected (fake)\"; return 0; }\n");
    for (int index = 0; index < moegen_cuda_symbol_count(); index++) {
        const char *name = moegen_cuda_symbol_name(index);
        if (is_implemented_by_fake(name) || (fake->omit && strcmp(name, fake->omit) == 0))
            continue;
        format_text(line, sizeof line, "int %s(void) { return 999; }\n", name);
        append_text(source, FAKE_SOURCE_BYTES, line);
    }
    if (fake->export_original_elapsed_time)
        append_text(source, FAKE_SOURCE_BYTES, "int cuEventElapsedTime(void) { return 999; }\n");
    write_text(source_path, source);
    free(source);
    if (build_shared_object(source_path, path) != 0) {
        print_message("cc cannot build a fake driver here, skipping\n");
        skip();
    }
}

/* moegen_cuda_open with $MOEGEN_CUDA_DRIVER_LIB set to `library` (restored after). */
static moegen_status open_driver_at(const char *library, moegen_cuda *cu, moegen_error *err) {
    saved_variable saved;
    moegen_status status;
    save_variable(&saved, "MOEGEN_CUDA_DRIVER_LIB");
    setenv("MOEGEN_CUDA_DRIVER_LIB", library, 1);
    status = moegen_cuda_open(cu, err);
    restore_variable(&saved);
    return status;
}

static int table_is_zero(const void *table, size_t size) {
    const unsigned char *bytes = table;
    int zero = 1;
    for (size_t index = 0; index < size; index++)
        zero &= bytes[index] == 0;
    return zero;
}

/* ---- NVRTC ---------------------------------------------------------------------------- */

static void nvrtc_opens_and_reports_its_version(void **state) {
    const moegen_nvrtc *nv = require_nvrtc(state);
    assert_non_null(nv->library);
    assert_true(nv->version_major >= 12);
    assert_true(nv->version_minor >= 0);
    assert_true(nv->library_path[0] != '\0');
    print_message("NVRTC %d.%d from %s, %d architectures\n", nv->version_major,
                  nv->version_minor, nv->library_path, nv->arch_count);
    assert_true(moegen_nvrtc_supports_arch(nv, "sm_80"));
    assert_true(moegen_nvrtc_supports_arch(nv, "sm_90a"));
    assert_false(moegen_nvrtc_supports_arch(nv, "compute_80"));
    assert_false(moegen_nvrtc_supports_arch(nv, "sm_8"));
    assert_false(moegen_nvrtc_supports_arch(nv, "sm_90b"));
    assert_false(moegen_nvrtc_supports_arch(nv, NULL));
}

static void nvrtc_named_by_an_absent_path_is_unsupported_and_leaves_the_table_closed(
    void **state) {
    saved_variable saved;
    moegen_nvrtc nv;
    moegen_error err;
    moegen_status status;
    (void)state;
    memset(&nv, 0xab, sizeof nv);
    save_variable(&saved, "MOEGEN_NVRTC_LIB");
    setenv("MOEGEN_NVRTC_LIB", "/nonexistent/libnvrtc.so.13", 1);
    status = moegen_nvrtc_open(&nv, &err);
    restore_variable(&saved);
    assert_int_equal(status, MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.code, MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "NVRTC not found"));
    assert_non_null(strstr(err.message, "/nonexistent/libnvrtc.so.13"));
    assert_true(table_is_zero(&nv, sizeof nv));
    moegen_nvrtc_close(&nv);
    moegen_nvrtc_close(NULL);
}

/* Compile the test kernels for `arch` and check the CUBIN and the report. */
static void check_clean_compile(const moegen_nvrtc *nv, const char *arch) {
    const moegen_nvrtc_header header = {tile_header_name, tile_header_text};
    moegen_nvrtc_output out;
    moegen_kernel_resources records[MAX_RECORDS];
    moegen_error err;
    const unsigned char *elf;
    const moegen_kernel_resources *mma;
    const moegen_kernel_resources *fma;
    int count;
    moegen_status status = moegen_nvrtc_compile(nv, "test_kernels.cu", kernel_source, &header, 1,
                                                arch, kernel_options, KERNEL_OPTION_COUNT, &out,
                                                &err);
    if (status != MOEGEN_OK)
        fail_msg("compiling for %s: %s", arch, err.message);
    assert_non_null(out.log);
    if (strstr(out.log, "warning") || strstr(out.log, "error"))
        fail_msg("the log for %s has a warning:\n%s", arch, out.log);
    assert_non_null(out.cubin);
    assert_true(out.cubin_size > 64);
    elf = out.cubin;
    assert_memory_equal(elf, "\x7f" "ELF", 4);
    assert_int_equal(elf[4], 2); /* ELFCLASS64 */
    assert_int_equal(elf[18] | (elf[19] << 8), ELF_MACHINE_CUDA);
    count = moegen_nvrtc_parse_resources(out.log, records, MAX_RECORDS);
    if (count != 2)
        fail_msg("expected 2 kernels in the report for %s, found %d:\n%s", arch, count, out.log);
    mma = find_record(records, count, "mma_bf16_tile");
    fma = find_record(records, count, "fma_rows");
    for (const moegen_kernel_resources *record = mma; record;
         record = record == mma ? fma : NULL) {
        assert_int_equal(record->is_entry, 1);
        assert_string_equal(record->arch, arch);
        assert_true(record->registers > 0);
        assert_true(record->registers <= 255);
        assert_int_equal(record->spill_store_bytes, 0);
        assert_int_equal(record->spill_load_bytes, 0);
        assert_int_equal(record->stack_frame_bytes, 0);
    }
    assert_int_equal(mma->shared_bytes, 16 * 16 * 2 + 8 * 16 * 2);
    assert_int_equal(mma->barriers, 1);
    assert_int_equal(fma->shared_bytes, 0);
    assert_int_equal(fma->barriers, 0);
    print_message("%s: %zu-byte CUBIN; mma_bf16_tile %d registers, fma_rows %d registers\n",
                  arch, out.cubin_size, mma->registers, fma->registers);
    moegen_nvrtc_output_free(&out);
    assert_null(out.cubin);
    assert_null(out.log);
}

static void kernels_with_an_in_memory_header_compile_to_clean_cubins_for_sm_80_and_sm_90a(
    void **state) {
    const moegen_nvrtc *nv = require_nvrtc(state);
    check_clean_compile(nv, "sm_80");
    check_clean_compile(nv, "sm_90a");
}

static void a_syntax_error_is_a_compile_error_with_its_line_in_the_message(void **state) {
    const moegen_nvrtc *nv = require_nvrtc(state);
    moegen_nvrtc_output out;
    moegen_error err;
    moegen_status status = moegen_nvrtc_compile(nv, "broken.cu", broken_source, NULL, 0, "sm_80",
                                                NULL, 0, &out, &err);
    assert_int_equal(status, MOEGEN_ERR_COMPILE);
    assert_int_equal(err.code, MOEGEN_ERR_COMPILE);
    assert_int_equal(err.native_code, MOEGEN_NVRTC_ERROR_COMPILATION);
    assert_non_null(strstr(err.message, "broken.cu"));
    assert_non_null(strstr(err.message, "sm_80"));
    assert_non_null(strstr(err.message, "broken.cu(3): error"));
    assert_null(out.cubin);
    assert_int_equal(out.cubin_size, 0);
    assert_non_null(out.log);
    assert_non_null(strstr(out.log, "broken.cu(3): error"));
    assert_non_null(strstr(out.log, "error detected in the compilation of"));
    assert_int_equal(moegen_nvrtc_parse_resources(out.log, NULL, 0), 0);
    moegen_nvrtc_output_free(&out);
}

static void register_pressure_shows_up_as_spills_in_the_report(void **state) {
    const moegen_nvrtc *nv = require_nvrtc(state);
    const char *const options[] = {"--ptxas-options=-v"};
    moegen_nvrtc_output out;
    moegen_kernel_resources records[MAX_RECORDS];
    moegen_error err;
    const moegen_kernel_resources *kernel;
    const moegen_kernel_resources *helper;
    int count;
    moegen_status status = moegen_nvrtc_compile(nv, "pressure.cu", pressure_source, NULL, 0,
                                                "sm_90a", options, 1, &out, &err);
    if (status != MOEGEN_OK)
        fail_msg("%s", err.message);
    count = moegen_nvrtc_parse_resources(out.log, records, MAX_RECORDS);
    assert_true(count >= 1);
    kernel = find_record(records, count, "pressure");
    assert_int_equal(kernel->is_entry, 1);
    assert_true(kernel->registers > 0 && kernel->registers <= 32);
    if (kernel->spill_store_bytes <= 0 || kernel->spill_load_bytes <= 0)
        fail_msg("no spills seen in:\n%s", out.log);
    assert_true(kernel->stack_frame_bytes > 0);
    helper = find_record(records, count, "_Z6helperPKfi");
    assert_int_equal(helper->is_entry, 0);
    assert_true(helper->stack_frame_bytes >= 0);
    print_message("pressure: %d registers, %d bytes spill stores, %d bytes spill loads\n",
                  kernel->registers, kernel->spill_store_bytes, kernel->spill_load_bytes);
    moegen_nvrtc_output_free(&out);
}

static void bad_compile_arguments_are_refused_with_the_output_left_empty(void **state) {
    const moegen_nvrtc *nv = require_nvrtc(state);
    const char *const arch_option[] = {"-arch=sm_80"};
    const char *const null_option[] = {NULL};
    const char *const unknown_option[] = {"--no-such-option-at-all"};
    const moegen_nvrtc_header nameless = {NULL, "int x;"};
    moegen_nvrtc closed;
    moegen_nvrtc_output out;
    moegen_error err;
    memset(&closed, 0, sizeof closed);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", kernel_source, NULL, 0, "compute_80", NULL,
                                          0, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "compute_80"));
    assert_null(out.log);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, "sm_80",
                                          arch_option, 1, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "-arch=sm_80"));
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, "sm_80",
                                          null_option, 1, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, &nameless, 1, "sm_80", NULL,
                                          0, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", NULL, NULL, 0, "sm_80", NULL, 0, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, -1, "sm_80", NULL, 0,
                                          &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_nvrtc_compile(&closed, "k.cu", broken_source, NULL, 0, "sm_80", NULL,
                                          0, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, "sm_80", NULL, 0,
                                          NULL, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    /* a name the one parser (moegen_cuda_arch_parse) refuses never reaches NVRTC */
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, "sm_10", NULL, 0,
                                          &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "'sm_10'"));
    assert_null(out.log);
    if (nv->arch_count > 0) {
        /* a well-formed name this NVRTC does not list (sm_70 for NVRTC 13, else another) */
        char missing[16] = "";
        for (int sm = MOEGEN_CUDA_SM_MIN; sm <= MOEGEN_CUDA_SM_MAX && !missing[0]; sm++) {
            format_text(missing, sizeof missing, "sm_%d", sm);
            if (moegen_nvrtc_supports_arch(nv, missing)) missing[0] = '\0';
        }
        if (missing[0]) {
            char expected[64];
            format_text(expected, sizeof expected, "cannot compile for %s", missing);
            assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, missing,
                                                  NULL, 0, &out, &err),
                             MOEGEN_ERR_UNSUPPORTED);
            assert_non_null(strstr(err.message, expected));
            assert_non_null(strstr(err.message, "sm_80"));
        }
    }
    assert_int_equal(moegen_nvrtc_compile(nv, "k.cu", broken_source, NULL, 0, "sm_80",
                                          unknown_option, 1, &out, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(err.native_code, MOEGEN_NVRTC_ERROR_INVALID_OPTION);
    assert_non_null(out.log);
    assert_null(out.cubin);
    moegen_nvrtc_output_free(&out);
    moegen_nvrtc_output_free(NULL);
}

/* ---- the report parser ------------------------------------------------------------------ */

static const char recorded_report[] =
    "ptxas warning : For profile sm_80 adjusting per thread register count of 16 to lower "
    "bound of 24\n"
    "ptxas info    : 0 bytes gmem\n"
    "ptxas info    : Compiling entry function 'spill' for 'sm_80'\n"
    "ptxas info    : Function properties for spill\n"
    "ptxas         .     1024 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
    "ptxas info    : Used 24 registers, used 0 barriers, 1024 bytes cumulative stack size, "
    "364 bytes cmem[0]\n"
    "ptxas info    : Compile time = 20.018 ms\n"
    "ptxas info    : Function properties for _Z6helperPKfi\n"
    "ptxas         .     0 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads\n"
    "ptxas info    : Compiling entry function 'smem_kernel' for 'sm_80'\n"
    "ptxas info    : Function properties for smem_kernel\n"
    "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    "ptxas info    : Used 9 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0], "
    "8 bytes cmem[2]\n"
    "note: Used 99 registers in a line not from ptxas is ignored\n"
    "ptxas info    : Compiling entry function '_Z3oldPf' for 'sm_75'\n"
    "ptxas info    : Used 16 registers, 4 bytes lmem, 352 bytes cmem[0]\n";

static void the_report_parser_reads_every_field_of_a_recorded_log(void **state) {
    moegen_kernel_resources records[MAX_RECORDS];
    const moegen_kernel_resources *spill;
    const moegen_kernel_resources *helper;
    const moegen_kernel_resources *smem;
    const moegen_kernel_resources *old;
    (void)state;
    assert_int_equal(moegen_nvrtc_parse_resources(recorded_report, records, MAX_RECORDS), 4);
    spill = &records[0];
    helper = &records[1];
    smem = &records[2];
    old = &records[3];
    assert_string_equal(spill->name, "spill");
    assert_string_equal(spill->arch, "sm_80");
    assert_int_equal(spill->is_entry, 1);
    assert_int_equal(spill->registers, 24);
    assert_int_equal(spill->barriers, 0);
    assert_int_equal(spill->stack_frame_bytes, 1024);
    assert_int_equal(spill->spill_store_bytes, 8);
    assert_int_equal(spill->spill_load_bytes, 12);
    assert_int_equal(spill->cumulative_stack_bytes, 1024);
    assert_int_equal(spill->constant_bytes, 364);
    assert_int_equal(spill->shared_bytes, 0);
    assert_int_equal(spill->local_bytes, -1);
    assert_string_equal(helper->name, "_Z6helperPKfi");
    assert_int_equal(helper->is_entry, 0);
    assert_string_equal(helper->arch, "");
    assert_int_equal(helper->registers, -1);
    assert_int_equal(helper->spill_store_bytes, 44);
    assert_int_equal(helper->spill_load_bytes, 40);
    assert_string_equal(smem->name, "smem_kernel");
    assert_int_equal(smem->registers, 9);
    assert_int_equal(smem->barriers, 1);
    assert_int_equal(smem->shared_bytes, 1024);
    assert_int_equal(smem->constant_bytes, 360);
    assert_string_equal(old->name, "_Z3oldPf");
    assert_string_equal(old->arch, "sm_75");
    assert_int_equal(old->registers, 16);
    assert_int_equal(old->local_bytes, 4);
    assert_int_equal(old->barriers, -1);
    assert_int_equal(old->stack_frame_bytes, -1);
    /* counting past max_out, and nothing to parse */
    memset(records, 0x5a, sizeof records);
    assert_int_equal(moegen_nvrtc_parse_resources(recorded_report, records, 1), 4);
    assert_string_equal(records[0].name, "spill");
    assert_int_equal(records[0].spill_load_bytes, 12);
    assert_int_equal(records[1].registers, 0x5a5a5a5a);
    assert_int_equal(moegen_nvrtc_parse_resources(recorded_report, NULL, 0), 4);
    assert_int_equal(moegen_nvrtc_parse_resources(NULL, records, MAX_RECORDS), 0);
    assert_int_equal(moegen_nvrtc_parse_resources("", records, MAX_RECORDS), 0);
}

/* ---- the driver ------------------------------------------------------------------------- */

static void the_driver_named_by_an_absent_path_is_reported_missing(void **state) {
    moegen_cuda cu;
    moegen_error err;
    (void)state;
    memset(&cu, 0xab, sizeof cu);
    assert_int_equal(open_driver_at("/nonexistent/libcuda.so.1", &cu, &err),
                     MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.native_code, 0);
    assert_non_null(strstr(err.message, "no CUDA driver"));
    assert_non_null(strstr(err.message, "/nonexistent/libcuda.so.1"));
    assert_true(table_is_zero(&cu, sizeof cu));
    moegen_cuda_close(&cu);
    moegen_cuda_close(NULL);
}

static void the_toolkit_stub_driver_is_reported_unusable(void **state) {
    static const char stub[] = "/usr/local/cuda/lib64/stubs/libcuda.so";
    moegen_cuda cu;
    moegen_error err;
    struct stat info;
    (void)state;
    if (stat(stub, &info) != 0) {
        print_message("no %s here, skipping\n", stub);
        skip();
    }
    assert_int_equal(open_driver_at(stub, &cu, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.native_code, MOEGEN_CUDA_ERROR_STUB_LIBRARY);
    assert_non_null(strstr(err.message, "CUDA driver unusable"));
    assert_non_null(strstr(err.message, "CUDA_ERROR_STUB_LIBRARY"));
    assert_null(cu.library);
}

static void a_driver_whose_init_finds_no_device_reports_no_cuda_device(void **state) {
    const fake_driver fake = {"fake_no_device", MOEGEN_CUDA_ERROR_NO_DEVICE, 0, NULL, 0};
    char path[PATH_MAX];
    moegen_cuda cu;
    moegen_error err;
    build_fake_driver(*state, &fake, path, sizeof path);
    assert_int_equal(open_driver_at(path, &cu, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.native_code, MOEGEN_CUDA_ERROR_NO_DEVICE);
    assert_non_null(strstr(err.message, "no CUDA device"));
    assert_non_null(strstr(err.message, "CUDA_ERROR_NO_DEVICE"));
    assert_null(strstr(err.message, "no CUDA driver"));
    assert_true(table_is_zero(&cu, sizeof cu));
}

static void a_driver_counting_zero_devices_reports_no_cuda_device(void **state) {
    const fake_driver fake = {"fake_zero_devices", MOEGEN_CUDA_SUCCESS, 0, NULL, 0};
    char path[PATH_MAX];
    moegen_cuda cu;
    moegen_error err;
    build_fake_driver(*state, &fake, path, sizeof path);
    assert_int_equal(open_driver_at(path, &cu, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.native_code, MOEGEN_CUDA_ERROR_NO_DEVICE);
    assert_non_null(strstr(err.message, "no CUDA device"));
    assert_non_null(strstr(err.message, "13.0"));
}

static void a_driver_missing_a_symbol_is_refused_naming_the_symbol(void **state) {
    const fake_driver no_load = {"fake_no_module_load", MOEGEN_CUDA_SUCCESS, 1,
                                 "cuModuleLoadData", 0};
    const fake_driver no_timer = {"fake_no_elapsed_time", MOEGEN_CUDA_SUCCESS, 1,
                                  "cuEventElapsedTime_v2", 0};
    char path[PATH_MAX];
    moegen_cuda cu;
    moegen_error err;
    build_fake_driver(*state, &no_load, path, sizeof path);
    assert_int_equal(open_driver_at(path, &cu, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.native_code, 0);
    assert_non_null(strstr(err.message, "has no cuModuleLoadData"));
    assert_non_null(strstr(err.message, "fake_no_module_load.so"));
    assert_true(table_is_zero(&cu, sizeof cu));
    build_fake_driver(*state, &no_timer, path, sizeof path);
    assert_int_equal(open_driver_at(path, &cu, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "has no cuEventElapsedTime_v2 nor cuEventElapsedTime"));
}

static void a_driver_with_only_the_original_elapsed_time_symbol_opens(void **state) {
    const fake_driver fake = {"fake_old_timer", MOEGEN_CUDA_SUCCESS, 1, "cuEventElapsedTime_v2",
                              1};
    char path[PATH_MAX];
    moegen_cuda cu;
    moegen_error err;
    build_fake_driver(*state, &fake, path, sizeof path);
    if (open_driver_at(path, &cu, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_non_null(cu.cuEventElapsedTime);
    assert_int_equal(cu.device_count, 1);
    moegen_cuda_close(&cu);
    assert_null(cu.library);
}

static void a_fake_hopper_is_described_as_sm_90a(void **state) {
    const fake_driver fake = {"fake_hopper", MOEGEN_CUDA_SUCCESS, 2, NULL, 0};
    char path[PATH_MAX];
    moegen_cuda cu;
    moegen_cuda_device device;
    moegen_error err;
    build_fake_driver(*state, &fake, path, sizeof path);
    if (open_driver_at(path, &cu, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(cu.driver_version, 13000);
    assert_int_equal(cu.device_count, 2);
    assert_non_null(strstr(cu.library_path, "fake_hopper.so"));
    if (moegen_cuda_device_info(&cu, 1, &device, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(device.ordinal, 1);
    assert_string_equal(device.name, "Fake Hopper");
    assert_int_equal(device.major, 9);
    assert_int_equal(device.minor, 0);
    assert_int_equal(device.sm_count, 132);
    assert_int_equal(device.max_shared_optin, 232448);
    assert_int_equal(device.total_memory, (size_t)80 << 30);
    assert_string_equal(device.arch, "sm_90a");
    assert_int_equal(moegen_cuda_device_info(&cu, 2, &device, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "2 devices"));
    assert_int_equal(moegen_cuda_device_info(&cu, -1, &device, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    /* an unknown code falls back to the built-in table, then to the number */
    assert_int_equal(moegen_cuda_check(&cu, MOEGEN_CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc", &err),
                     MOEGEN_ERR_DEVICE);
    assert_string_equal(err.message, "cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY: out of memory");
    moegen_cuda_close(&cu);
    assert_int_equal(moegen_cuda_device_info(&cu, 0, &device, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
}

static void arch_names_follow_the_compute_capability(void **state) {
    char buffer[MOEGEN_CUDA_ARCH_BYTES];
    (void)state;
    assert_string_equal(moegen_cuda_arch_name(7, 5, buffer, sizeof buffer), "sm_75");
    assert_string_equal(moegen_cuda_arch_name(8, 0, buffer, sizeof buffer), "sm_80");
    assert_string_equal(moegen_cuda_arch_name(8, 6, buffer, sizeof buffer), "sm_86");
    assert_string_equal(moegen_cuda_arch_name(8, 9, buffer, sizeof buffer), "sm_89");
    assert_string_equal(moegen_cuda_arch_name(9, 0, buffer, sizeof buffer), "sm_90a");
    assert_string_equal(moegen_cuda_arch_name(10, 0, buffer, sizeof buffer), "sm_100a");
    assert_string_equal(moegen_cuda_arch_name(12, 0, buffer, sizeof buffer), "sm_120a");
    assert_string_equal(moegen_cuda_arch_name(0, 0, buffer, sizeof buffer), "");
    assert_string_equal(moegen_cuda_arch_name(8, 10, buffer, sizeof buffer), "");
    assert_string_equal(moegen_cuda_arch_name(9, 0, NULL, 0), "");
    assert_string_equal(moegen_cuda_arch_name(9, 0, buffer, 4), "sm_");
}

/* The one parser of "sm_XX" (gen/variant.h): used by `moegen gen --arch`, the CUDA backend
 * and the NVRTC layer. */
static void cuda_arch_names_are_read_by_one_parser(void **state) {
    static const struct {
        const char *text;
        int sm;
        char suffix;
    } accepted[] = {
        {"sm_70", 70, 0},    {"sm_75", 75, 0},     {"sm_80", 80, 0},     {"sm_86", 86, 0},
        {"sm_89", 89, 0},    {"sm_90", 90, 0},     {"sm_90a", 90, 'a'},  {"sm_100", 100, 0},
        {"sm_100a", 100, 'a'}, {"sm_100f", 100, 'f'}, {"sm_103a", 103, 'a'}, {"sm_110f", 110, 'f'},
        {"sm_120", 120, 0},  {"sm_120a", 120, 'a'}, {"sm_120f", 120, 'f'},
    };
    static const struct {
        const char *text;
        const char *message; /* a piece of the message */
    } rejected[] = {
        {NULL, "no CUDA architecture given"},
        {"", "no CUDA architecture given"},
        {"sm_", "is not of the form sm_<70..121>[a|f]"},
        {"sm_8", "'sm_8' is not of the form"},
        {"sm_9a", "is not of the form"},
        {"sm_1000", "is not of the form"},
        {"sm_080", "is not of the form"},
        {"sm_+80", "is not of the form"},
        {"sm_80 ", "is not of the form"},
        {" sm_80", "is not of the form"},
        {"sm_80\n", "is not of the form"},
        {"SM_80", "is not of the form"},
        {"sm-80", "is not of the form"},
        {"sm80", "is not of the form"},
        {"sm_90A", "is not of the form"},
        {"sm_90b", "is not of the form"},
        {"sm_90af", "is not of the form"},
        {"sm_100aa", "is not of the form"},
        {"compute_90", "is not of the form"},
        {"lto_90", "is not of the form"},
        {"sm_10", "moegen knows sm_70 to sm_121"},
        {"sm_60", "moegen knows sm_70 to sm_121"},
        {"sm_69", "moegen knows sm_70 to sm_121"},
        {"sm_122", "moegen knows sm_70 to sm_121"},
        {"sm_130a", "moegen knows sm_70 to sm_121"},
        {"sm_999", "moegen knows sm_70 to sm_121"},
        {"sm_80a", "the 'a' (architecture-specific) targets start at sm_90a; use sm_80"},
        {"sm_89a", "start at sm_90a"},
        {"sm_80f", "the 'f' (family) targets start at sm_100f; use sm_80"},
        {"sm_90f", "use sm_90 or its 'a' target"},
    };
    (void)state;
    for (size_t index = 0; index < sizeof accepted / sizeof accepted[0]; index++) {
        moegen_cuda_arch arch = {-1, 'x'};
        moegen_error err;
        if (moegen_cuda_arch_parse(accepted[index].text, &arch, &err) != MOEGEN_OK)
            fail_msg("%s was refused: %s", accepted[index].text, err.message);
        assert_int_equal(arch.sm, accepted[index].sm);
        assert_int_equal(arch.suffix, accepted[index].suffix);
        assert_int_equal(moegen_cuda_arch_parse(accepted[index].text, NULL, NULL), MOEGEN_OK);
    }
    for (size_t index = 0; index < sizeof rejected / sizeof rejected[0]; index++) {
        moegen_cuda_arch arch = {-1, 'x'};
        moegen_error err;
        const char *text = rejected[index].text;
        assert_int_equal(moegen_cuda_arch_parse(text, &arch, &err), MOEGEN_ERR_INVALID_ARGUMENT);
        if (!strstr(err.message, rejected[index].message))
            fail_msg("'%s': message \"%s\" lacks \"%s\"", text ? text : "NULL", err.message,
                     rejected[index].message);
        if (text && text[0] && !strchr(text, '\n') && !strstr(err.message, text))
            fail_msg("'%s': the message does not quote it: %s", text, err.message);
        assert_int_equal(arch.sm, -1); /* untouched */
        assert_int_equal(moegen_cuda_arch_parse(text, NULL, NULL), MOEGEN_ERR_INVALID_ARGUMENT);
    }
    /* what the backend asks for on its own, the device's name (moegen_cuda_arch_name), parses
     * back for compute capabilities 7.0 to 12.0 and is refused above */
    for (int major = 7; major <= 12; major++)
        for (int minor = 0; minor <= 9; minor++) {
            char buffer[MOEGEN_CUDA_ARCH_BYTES];
            moegen_cuda_arch arch;
            const int sm = major * 10 + minor;
            moegen_cuda_arch_name(major, minor, buffer, sizeof buffer);
            moegen_status status = moegen_cuda_arch_parse(buffer, &arch, NULL);
            if (sm > MOEGEN_CUDA_SM_MAX) {
                assert_int_equal(status, MOEGEN_ERR_INVALID_ARGUMENT);
                continue;
            }
            if (status != MOEGEN_OK)
                fail_msg("%s (compute capability %d.%d) is refused", buffer, major, minor);
            assert_int_equal(arch.sm, sm);
            assert_int_equal(arch.suffix, major >= 9 ? 'a' : 0);
        }
}

static void error_texts_name_cuda_errors_without_a_driver(void **state) {
    char buffer[256];
    moegen_error err;
    (void)state;
    assert_string_equal(moegen_cuda_error_text(NULL, 100, buffer, sizeof buffer),
                        "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected");
    assert_string_equal(moegen_cuda_error_text(NULL, 12345, buffer, sizeof buffer),
                        "CUDA error 12345");
    assert_string_equal(moegen_cuda_error_text(NULL, 100, NULL, 0), "");
    assert_string_equal(moegen_cuda_error_text(NULL, 100, buffer, 5), "CUDA");
    assert_int_equal(moegen_cuda_check(NULL, MOEGEN_CUDA_SUCCESS, "cuInit", &err), MOEGEN_OK);
    assert_int_equal(moegen_cuda_check(NULL, MOEGEN_CUDA_ERROR_ILLEGAL_ADDRESS, NULL, &err),
                     MOEGEN_ERR_DEVICE);
    assert_int_equal(err.native_code, MOEGEN_CUDA_ERROR_ILLEGAL_ADDRESS);
    assert_non_null(strstr(err.message, "CUDA driver call: CUDA_ERROR_ILLEGAL_ADDRESS"));
}

/* ---- a real GPU, when there is one ------------------------------------------------------ */

/* float -> bf16 by truncation (exact for the small integers used here). */
static unsigned short to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (unsigned short)(bits >> 16);
}

/* Run fma_rows and mma_bf16_tile from `cubin` on the current context and check
 * that the driver counts the registers ptxas reported (`report_registers`). */
static void run_kernels_on_the_device(const moegen_cuda *cu, const void *cubin,
                                      int report_registers) {
    enum { ROWS = 1000, A_COUNT = 16 * 16, B_COUNT = 8 * 16, C_COUNT = 16 * 8 };
    moegen_cu_module module = NULL;
    moegen_cu_function fma_rows = NULL;
    moegen_cu_function mma_tile = NULL;
    moegen_cu_device_pointer x = 0, y = 0, a = 0, b = 0, c = 0;
    moegen_error err;
    static float host_x[ROWS], host_y[ROWS], host_c[C_COUNT];
    static unsigned short host_a[A_COUNT], host_b[B_COUNT];
    float a_values[A_COUNT], b_values[B_COUNT];
    int n = ROWS;
    int registers = 0;
#define DRIVER(call) assert_int_equal(moegen_cuda_check(cu, (call), #call, &err), MOEGEN_OK)
    DRIVER(cu->cuModuleLoadData(&module, cubin));
    DRIVER(cu->cuModuleGetFunction(&fma_rows, module, "fma_rows"));
    DRIVER(cu->cuModuleGetFunction(&mma_tile, module, "mma_bf16_tile"));
    DRIVER(cu->cuFuncGetAttribute(&registers, MOEGEN_CU_FUNC_ATTRIBUTE_NUM_REGS, mma_tile));
    assert_int_equal(registers, report_registers);
    for (int index = 0; index < ROWS; index++) {
        host_x[index] = (float)(index % 17);
        host_y[index] = (float)(index % 5);
    }
    DRIVER(cu->cuMemAlloc(&x, sizeof host_x));
    DRIVER(cu->cuMemAlloc(&y, sizeof host_y));
    DRIVER(cu->cuMemcpyHtoD(x, host_x, sizeof host_x));
    DRIVER(cu->cuMemcpyHtoD(y, host_y, sizeof host_y));
    {
        void *parameters[] = {&x, &y, &n};
        DRIVER(cu->cuLaunchKernel(fma_rows, (ROWS + 127) / 128, 1, 1, 128, 1, 1, 0, NULL,
                                  parameters, NULL));
    }
    DRIVER(cu->cuCtxSynchronize());
    DRIVER(cu->cuMemcpyDtoH(host_y, y, sizeof host_y));
    for (int index = 0; index < ROWS; index++) {
        float xv = (float)(index % 17), yv = (float)(index % 5);
        /* fma_chain(x, 2, y) = x * 2 + (x * y + 2), exact for these small integers */
        if (host_y[index] != xv * 2.0f + (xv * yv + 2.0f))
            fail_msg("fma_rows y[%d] = %g, expected %g", index, (double)host_y[index],
                     (double)(xv * 2.0f + (xv * yv + 2.0f)));
    }
    for (int index = 0; index < A_COUNT; index++) {
        a_values[index] = (float)((index * 7) % 5 - 2);
        host_a[index] = to_bf16(a_values[index]);
    }
    for (int index = 0; index < B_COUNT; index++) {
        b_values[index] = (float)((index * 3) % 7 - 3);
        host_b[index] = to_bf16(b_values[index]);
    }
    DRIVER(cu->cuMemAlloc(&a, sizeof host_a));
    DRIVER(cu->cuMemAlloc(&b, sizeof host_b));
    DRIVER(cu->cuMemAlloc(&c, sizeof host_c));
    DRIVER(cu->cuMemcpyHtoD(a, host_a, sizeof host_a));
    DRIVER(cu->cuMemcpyHtoD(b, host_b, sizeof host_b));
    DRIVER(cu->cuMemsetD8(c, 0, sizeof host_c));
    {
        void *parameters[] = {&a, &b, &c};
        DRIVER(cu->cuLaunchKernel(mma_tile, 1, 1, 1, 32, 1, 1, 0, NULL, parameters, NULL));
    }
    DRIVER(cu->cuCtxSynchronize());
    DRIVER(cu->cuMemcpyDtoH(host_c, c, sizeof host_c));
    for (int row = 0; row < 16; row++) {
        for (int column = 0; column < 8; column++) {
            float expected = 0.0f;
            for (int k = 0; k < 16; k++)
                expected += a_values[row * 16 + k] * b_values[column * 16 + k];
            if (host_c[row * 8 + column] != expected)
                fail_msg("mma tile C[%d][%d] = %g, expected %g", row, column,
                         (double)host_c[row * 8 + column], (double)expected);
        }
    }
    DRIVER(cu->cuMemFree(x));
    DRIVER(cu->cuMemFree(y));
    DRIVER(cu->cuMemFree(a));
    DRIVER(cu->cuMemFree(b));
    DRIVER(cu->cuMemFree(c));
    DRIVER(cu->cuModuleUnload(module));
#undef DRIVER
}

static void the_driver_describes_device_zero_and_runs_compiled_kernels_when_present(
    void **state) {
    group_state *group = *state;
    const moegen_nvrtc_header header = {tile_header_name, tile_header_text};
    moegen_cuda cu;
    moegen_cuda_device device;
    moegen_nvrtc_output out;
    moegen_cu_context context = NULL;
    moegen_kernel_resources records[MAX_RECORDS];
    int count;
    moegen_error err;
    saved_variable saved;
    moegen_status status;
    save_variable(&saved, "MOEGEN_CUDA_DRIVER_LIB");
    unsetenv("MOEGEN_CUDA_DRIVER_LIB");
    status = moegen_cuda_open(&cu, &err);
    restore_variable(&saved);
    if (status != MOEGEN_OK) {
        assert_int_equal(status, MOEGEN_ERR_UNSUPPORTED);
        assert_true(strstr(err.message, "no CUDA driver") ||
                    strstr(err.message, "no CUDA device") ||
                    strstr(err.message, "CUDA driver unusable"));
        assert_true(table_is_zero(&cu, sizeof cu));
        print_message("no usable CUDA driver here (%s); skipping the GPU checks\n", err.message);
        skip();
    }
    if (moegen_cuda_device_info(&cu, 0, &device, &err) != MOEGEN_OK)
        fail_msg("%s", err.message);
    print_message("device 0: %s, compute %d.%d, %s, %d SMs, %d bytes shared opt-in, %zu MiB; "
                  "driver %d\n",
                  device.name, device.major, device.minor, device.arch, device.sm_count,
                  device.max_shared_optin, device.total_memory >> 20, cu.driver_version);
    assert_true(device.major >= 7);
    assert_true(device.sm_count > 0);
    assert_true(device.max_shared_optin >= 48 * 1024);
    assert_true(device.total_memory > 0);
    assert_int_equal(strncmp(device.arch, "sm_", 3), 0);
    assert_true(cu.driver_version >= 12000);
    if (!group->nvrtc_open || !moegen_nvrtc_supports_arch(&group->nvrtc, device.arch)) {
        print_message("NVRTC cannot compile for %s here; not launching\n", device.arch);
    } else {
        status = moegen_nvrtc_compile(&group->nvrtc, "test_kernels.cu", kernel_source, &header,
                                      1, device.arch, kernel_options, KERNEL_OPTION_COUNT, &out,
                                      &err);
        if (status != MOEGEN_OK)
            fail_msg("%s", err.message);
        /* a second compile of the same source still carries the report (no NVRTC cache) */
        count = moegen_nvrtc_parse_resources(out.log, records, MAX_RECORDS);
        if (count != 2)
            fail_msg("expected 2 kernels in the report, found %d:\n%s", count, out.log);
        assert_int_equal(moegen_cuda_check(&cu, cu.cuDevicePrimaryCtxRetain(&context, 0),
                                           "cuDevicePrimaryCtxRetain", &err),
                         MOEGEN_OK);
        assert_int_equal(moegen_cuda_check(&cu, cu.cuCtxSetCurrent(context), "cuCtxSetCurrent",
                                           &err),
                         MOEGEN_OK);
        run_kernels_on_the_device(&cu, out.cubin,
                                  find_record(records, count, "mma_bf16_tile")->registers);
        assert_int_equal(cu.cuCtxSetCurrent(NULL), MOEGEN_CUDA_SUCCESS);
        assert_int_equal(cu.cuDevicePrimaryCtxRelease(0), MOEGEN_CUDA_SUCCESS);
        moegen_nvrtc_output_free(&out);
    }
    moegen_cuda_close(&cu);
}

/* ---- the group ------------------------------------------------------------------------ */

static int group_setup(void **state) {
    int result = -1;
    const char *base = getenv("TMPDIR");
    group_state *group = calloc(1, sizeof *group);
    moegen_error err;
    if (!base || base[0] != '/')
        base = "/tmp";
    if (group) {
        snprintf(group->dir, sizeof group->dir, "%s/moegen-test-cuda-api-XXXXXX", base);
        if (mkdtemp(group->dir))
            result = 0;
    }
    if (result == 0) {
        group->nvrtc_open = moegen_nvrtc_open(&group->nvrtc, &err) == MOEGEN_OK;
        if (!group->nvrtc_open)
            snprintf(group->nvrtc_problem, sizeof group->nvrtc_problem, "%s", err.message);
        *state = group;
    } else {
        free(group);
    }
    return result;
}

static int group_teardown(void **state) {
    group_state *group = *state;
    moegen_nvrtc_close(&group->nvrtc);
    (void)moegen_remove_tree(group->dir);
    free(group);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(nvrtc_opens_and_reports_its_version),
        cmocka_unit_test(
            nvrtc_named_by_an_absent_path_is_unsupported_and_leaves_the_table_closed),
        cmocka_unit_test(
            kernels_with_an_in_memory_header_compile_to_clean_cubins_for_sm_80_and_sm_90a),
        cmocka_unit_test(a_syntax_error_is_a_compile_error_with_its_line_in_the_message),
        cmocka_unit_test(register_pressure_shows_up_as_spills_in_the_report),
        cmocka_unit_test(bad_compile_arguments_are_refused_with_the_output_left_empty),
        cmocka_unit_test(the_report_parser_reads_every_field_of_a_recorded_log),
        /* first: the real driver must be opened before the stub (same soname) is mapped */
        cmocka_unit_test(the_driver_describes_device_zero_and_runs_compiled_kernels_when_present),
        cmocka_unit_test(the_driver_named_by_an_absent_path_is_reported_missing),
        cmocka_unit_test(the_toolkit_stub_driver_is_reported_unusable),
        cmocka_unit_test(a_driver_whose_init_finds_no_device_reports_no_cuda_device),
        cmocka_unit_test(a_driver_counting_zero_devices_reports_no_cuda_device),
        cmocka_unit_test(a_driver_missing_a_symbol_is_refused_naming_the_symbol),
        cmocka_unit_test(a_driver_with_only_the_original_elapsed_time_symbol_opens),
        cmocka_unit_test(a_fake_hopper_is_described_as_sm_90a),
        cmocka_unit_test(arch_names_follow_the_compute_capability),
        cmocka_unit_test(cuda_arch_names_are_read_by_one_parser),
        cmocka_unit_test(error_texts_name_cuda_errors_without_a_driver),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
