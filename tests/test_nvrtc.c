/* test_nvrtc.c — every generated CUDA module compiles with NVRTC, on a machine without
 * a GPU, for sm_80 and sm_90a: the shipped specs and a matrix of small specs (every
 * activation x dtype, with the routing, capacity, shared-expert, residual and train-mode
 * features spread over them). The NVRTC log must hold no warning, and the ptxas report
 * (--ptxas-options=-v) must show, for every GEMM kernel (the forward's and the training
 * backward's), no spill stores or loads, no
 * stack frame (local memory), at most 255 registers and static shared memory within
 * the 48 KiB a CTA gets without opting in. Other kernels' spills are printed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cuda_api.h"
#include "cuda_backend.h"
#include "spec.h"
#include "test_support.h"

static const char *SHIPPED[] = {"demo", "mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b",
                                "olmoe-1b-7b", "deepseek-v3", "switch-base-8"};
static const char *ARCHS[] = {"sm_80", "sm_90a"};

static moegen_nvrtc nvrtc;
static int nvrtc_ok;

static int open_nvrtc(void **state) {
    (void)state;
    moegen_error err;
    nvrtc_ok = moegen_nvrtc_open(&nvrtc, &err) == MOEGEN_OK;
    if (!nvrtc_ok) print_message("NVRTC tests skipped: %s\n", err.message);
    return 0;
}

static int close_nvrtc(void **state) {
    (void)state;
    if (nvrtc_ok) moegen_nvrtc_close(&nvrtc);
    return 0;
}

/* Compile `spec` for `arch` with the runtime's options plus the ptxas report, and check it. */
static void compile_and_check(const moegen_spec *spec, const char *arch, const char *label) {
    moegen_generated gen;
    moegen_error err;
    if (moegen_cuda_generate(spec, arch, NULL, NULL, &gen, &err) != MOEGEN_OK) fail_msg("%s: %s", label, err.message);
    moegen_nvrtc_header headers[MOEGEN_MAX_GENERATED_FILES];
    int n_headers = 0;
    for (int i = 0; i < gen.n_files; i++)
        if (i != gen.main_file) headers[n_headers++] = (moegen_nvrtc_header){gen.files[i].name, gen.files[i].text};
    const char *options[8];
    int n_options = 0;
    for (int i = 0; moegen_cuda_compile_options[i]; i++) options[n_options++] = moegen_cuda_compile_options[i];
    options[n_options++] = "--ptxas-options=-v";
    moegen_nvrtc_output out;
    memset(&out, 0, sizeof out);
    moegen_status st = moegen_nvrtc_compile(&nvrtc, gen.files[gen.main_file].name, gen.files[gen.main_file].text,
                                            headers, n_headers, arch, options, n_options, &out, &err);
    if (st != MOEGEN_OK) fail_msg("%s %s: %s\n%.3000s", label, arch, err.message, out.log ? out.log : "");
    assert_non_null(out.log);
    for (const char *line = out.log; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char text[512];
        snprintf(text, sizeof text, "%.*s", (int)(len < 511 ? len : 511), line);
        /* "ptxas info" lines are the report; anything saying warning is a generator bug */
        if (strstr(text, "warning") || strstr(text, "Warning")) fail_msg("%s %s: NVRTC warning: %s", label, arch, text);
        line = end ? end + 1 : NULL;
    }
    moegen_kernel_resources resources[64];
    int n = moegen_nvrtc_parse_resources(out.log, resources, 64);
    assert_true(n > 0);
    int gemm_kernels = 0, backward_gemm_kernels = 0;
    for (int i = 0; i < n && i < 64; i++) {
        const moegen_kernel_resources *r = &resources[i];
        if (!r->is_entry) continue;
        const int spills = r->spill_store_bytes > 0 || r->spill_load_bytes > 0 || r->stack_frame_bytes > 0;
        /* the backward's GEMMs: P_<shape>_bwd_{pre,dh,du,weights} and P_bwd_dense_weights */
        const int backward_gemm = strstr(r->name, "_bwd_pre") || strstr(r->name, "_bwd_dh") ||
                                  strstr(r->name, "_bwd_du") || strstr(r->name, "_weights");
        backward_gemm_kernels += backward_gemm;
        if (strstr(r->name, "_gemm") || backward_gemm) {
            gemm_kernels++;
            if (spills)
                fail_msg("%s %s: %s spills (%d bytes stack, %d stores, %d loads)", label, arch, r->name,
                         r->stack_frame_bytes, r->spill_store_bytes, r->spill_load_bytes);
            assert_true(r->registers > 0 && r->registers <= 255);
            assert_true(r->shared_bytes <= 48 * 1024);
        } else if (spills) {
            print_message("  note: %s %s: %s uses %d bytes of stack (%d spill stores)\n", label, arch, r->name,
                          r->stack_frame_bytes, r->spill_store_bytes);
        }
    }
    assert_true(gemm_kernels >= 2 + 5);
    assert_true(backward_gemm_kernels >= 5);
    moegen_nvrtc_output_free(&out);
    moegen_generated_free(&gen);
}

static void every_shipped_spec_compiles_for_sm80_and_sm90a_without_spills(void **state) {
    (void)state;
    if (!nvrtc_ok) skip();
    const char *dir = getenv("MOEGEN_SOURCE_DIR") ? getenv("MOEGEN_SOURCE_DIR") : ".";
    for (size_t i = 0; i < sizeof SHIPPED / sizeof SHIPPED[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/specs/%s.yaml", dir, SHIPPED[i]);
        moegen_spec spec;
        moegen_error err;
        if (moegen_spec_load_file(path, &spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
        for (int a = 0; a < 2; a++) compile_and_check(&spec, ARCHS[a], SHIPPED[i]);
        moegen_spec_free(&spec);
    }
}

static void small_spec_matrix_compiles_for_sm80_and_sm90a_without_spills(void **state) {
    (void)state;
    if (!nvrtc_ok) skip();
    for (size_t i = 0; i < FEATURE_MATRIX_SIZE; i++) {
        char yaml[1024], label[64];
        feature_matrix_case(i, "nvrtc_matrix", 48, yaml, sizeof yaml, label, sizeof label);
        moegen_spec spec;
        moegen_error err;
        if (moegen_spec_parse(yaml, strlen(yaml), "matrix", &spec, &err) != MOEGEN_OK)
            fail_msg("%s\n%s", err.message, yaml);
        for (int arch = 0; arch < 2; arch++) compile_and_check(&spec, ARCHS[arch], label);
        moegen_spec_free(&spec);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_shipped_spec_compiles_for_sm80_and_sm90a_without_spills),
        cmocka_unit_test(small_spec_matrix_compiles_for_sm80_and_sm90a_without_spills),
    };
    return cmocka_run_group_tests_name("NVRTC compile checks", tests, open_nvrtc, close_nvrtc);
}
