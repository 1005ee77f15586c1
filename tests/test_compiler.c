/* test_compiler.c — host compilers against tests/compiler/masked_group_load.c, the
 * minimal reproducer of the GCC wrong-code bug (PR 114375) that gave wrong combine
 * weights for top-k 3, 5, 6, 7 with capacity.
 *
 * Each compiler a user may have here (the default `cc`, and `gcc` and `clang` when
 * installed) compiles the reproducer with the runtime's own flags (runtime/host_cc.c).
 * The test asserts that the form the templates use (unconditional load, then a select)
 * is right for every K, and reports whether the compiler miscompiles the other form.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache.h"
#include "host_cc.h"

typedef void (*pattern_fn)(const float *, const int32_t *, float *, int64_t);

static const int KS[] = {2, 3, 4, 5, 6, 7, 12};
#define N_TOKENS 101 /* odd: the vector loop and its scalar tail both run */

/* 1 if `program` is found in $PATH. */
static int on_path(const char *program) {
    const char *path = getenv("PATH");
    char copy[4096], candidate[4352];
    snprintf(copy, sizeof copy, "%s", path ? path : "/usr/bin:/bin");
    char *save = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
        snprintf(candidate, sizeof candidate, "%s/%s", dir, program);
        if (access(candidate, X_OK) == 0) return 1;
    }
    return 0;
}

/* Count wrong outputs of one pattern against the plain definition. */
static int count_wrong(pattern_fn fn, int k) {
    const size_t n = (size_t)N_TOKENS * k;
    float *weights = malloc(n * sizeof *weights), *out = malloc(n * sizeof *out);
    int32_t *rows = malloc(n * sizeof *rows);
    assert_non_null(weights);
    assert_non_null(out);
    assert_non_null(rows);
    uint32_t state = 12345;
    for (size_t i = 0; i < n; i++) {
        state = state * 1664525u + 1013904223u;
        weights[i] = 0.25f + (float)(i % 97) / 128.0f;
        rows[i] = (state >> 28) < 5 ? -1 : (int32_t)i; /* about 1 route in 3 dropped */
        out[i] = -1.0f;
    }
    fn(weights, rows, out, N_TOKENS);
    int wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += out[i] != (rows[i] >= 0 ? weights[i] : 0.0f);
    free(weights);
    free(out);
    free(rows);
    return wrong;
}

static void check_compiler(const char *program) {
    char dir[] = "/tmp/moegen-compiler-XXXXXX";
    assert_non_null(mkdtemp(dir));
    const char *source_dir = getenv("MOEGEN_SOURCE_DIR");
    assert_non_null(source_dir);
    char source[4096], object[4200], log[4200];
    snprintf(source, sizeof source, "%s/tests/compiler/masked_group_load.c", source_dir);
    snprintf(object, sizeof object, "%s/reproducer.so", dir);
    snprintf(log, sizeof log, "%s/compile.log", dir);

    if (program) setenv("MOEGEN_CC", program, 1);
    else unsetenv("MOEGEN_CC");
    moegen_host_compiler cc;
    moegen_error err;
    if (moegen_host_compiler_probe(&cc, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    if (moegen_host_compile(&cc, source, object, log, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    void *module = dlopen(object, RTLD_NOW | RTLD_LOCAL);
    assert_non_null(module);
    char miscompiled[128] = "";
    for (size_t i = 0; i < sizeof KS / sizeof KS[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "unconditional_load_k%d", KS[i]);
        pattern_fn safe = (pattern_fn)dlsym(module, name);
        snprintf(name, sizeof name, "conditional_load_k%d", KS[i]);
        pattern_fn risky = (pattern_fn)dlsym(module, name);
        assert_non_null(safe);
        assert_non_null(risky);
        int wrong = count_wrong(safe, KS[i]);
        if (wrong) fail_msg("%s (%s): the template's form gives %d wrong values for K=%d", cc.identity,
                            cc.flags, wrong, KS[i]);
        if (count_wrong(risky, KS[i]))
            snprintf(miscompiled + strlen(miscompiled), sizeof miscompiled - strlen(miscompiled), " %d", KS[i]);
    }
    print_message("%s [%s]: conditional-load form %s%s\n", cc.identity, cc.flags,
                  miscompiled[0] ? "MISCOMPILED for K =" : "correct for every K", miscompiled);
    dlclose(module);
    assert_int_equal(moegen_remove_tree(dir), 0);
    unsetenv("MOEGEN_CC");
}

static void the_default_compiler_keeps_the_templates_form_right(void **state) {
    (void)state;
    check_compiler(NULL);
}

static void gcc_keeps_the_templates_form_right(void **state) {
    (void)state;
    if (!on_path("gcc")) skip();
    check_compiler("gcc");
}

static void clang_keeps_the_templates_form_right(void **state) {
    (void)state;
    if (!on_path("clang")) skip();
    check_compiler("clang");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_default_compiler_keeps_the_templates_form_right),
        cmocka_unit_test(gcc_keeps_the_templates_form_right),
        cmocka_unit_test(clang_keeps_the_templates_form_right),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
