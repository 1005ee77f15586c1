/* test_host_cc.c — tests of the host C compiler driver's time limits (runtime/host_cc.c).
 *
 * Place in the pipeline: spec -> gen -> [compile] -> cache -> load -> launch.
 * Nothing in moegen may wait forever on a program outside the process: a compiler
 * (or a wrapper script named by $MOEGEN_CC) that hangs on `--version`, that hangs
 * while compiling, that leaves a grandchild holding the probe's pipe open, or that
 * starts a grandchild and then hangs must all come back with a clear error (or, for
 * the pipe, an answer) in about the time limit, with the whole process group killed
 * and no zombie left. Also: MOEGEN_CC_TIMEOUT accepts only a positive whole number
 * of seconds, empty means the default (300 s), and a caller can change the limit
 * after probing.
 *
 * The compilers here are small /bin/sh scripts written into each test's own mkdtemp
 * directory; the real compiler is never needed.
 *
 * Invariants: each test works in its own mkdtemp directory, removed afterwards;
 * MOEGEN_CC and MOEGEN_CC_TIMEOUT are restored after each test; a test that starts
 * a long-lived process it may leave behind kills it itself.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "host_cc.h"
#include "test_support.h"

/* A time limit of 1 s must come back well within this (the old code never came back). */
#define LATE_SECONDS 10.0
/* How long a killed process may take to disappear (or become a zombie). */
#define GONE_WAIT_SECONDS 5.0

/* Probe answers shared by the fake compilers that pass the probe. */
#define FAKE_PROBE_ANSWERS                                                                         \
    "case \"$1\" in\n"                                                                             \
    "--version) echo 'fakecc 1.0 (moegen test)'; exit 0 ;;\n"                                      \
    "-dumpmachine) echo 'x86_64-fake-linux-gnu'; exit 0 ;;\n"                                      \
    "esac\n"

typedef struct fixture {
    char dir[PATH_MAX]; /* this test's own directory */
    char *saved_cc;     /* MOEGEN_CC before the test (NULL: unset) */
    char *saved_timeout;
} fixture;

static char *saved_env(const char *name) {
    const char *value = getenv(name);
    return value ? strdup(value) : NULL;
}

/* Set or unset an environment variable (value NULL: unset). */
static void set_env(const char *name, const char *value) {
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
}

static int setup_fixture(void **state) {
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/moegen-test-host-cc-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    f->saved_cc = saved_env("MOEGEN_CC");
    f->saved_timeout = saved_env("MOEGEN_CC_TIMEOUT");
    *state = f;
    return 0;
}

static int teardown_fixture(void **state) {
    fixture *f = *state;
    set_env("MOEGEN_CC", f->saved_cc);
    set_env("MOEGEN_CC_TIMEOUT", f->saved_timeout);
    free(f->saved_cc);
    free(f->saved_timeout);
    int removed = moegen_remove_tree(f->dir);
    free(f);
    return removed == 0 ? 0 : -1;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Write the shell script `body` as the executable <dir>/<name>, name it in MOEGEN_CC. */
static void use_fake_compiler(const fixture *f, const char *name, const char *body) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/%s", f->dir, name);
    FILE *file = fopen(path, "w");
    assert_non_null(file);
    assert_true(fputs("#!/bin/sh\n", file) >= 0);
    assert_true(fputs(body, file) >= 0);
    assert_int_equal(fclose(file), 0);
    assert_int_equal(chmod(path, 0700), 0);
    set_env("MOEGEN_CC", path);
}

/* Write a trivial C source into the test directory (the fake compilers never read it). */
static void write_source(const fixture *f, char *source, char *output, char *log_path,
                         size_t size) {
    format_text(source, size, "%s/module.c", f->dir);
    format_text(output, size, "%s/module.so", f->dir);
    format_text(log_path, size, "%s/compile.log", f->dir);
    FILE *file = fopen(source, "w");
    assert_non_null(file);
    assert_true(fputs("int moegen_test_nothing(void) { return 0; }\n", file) >= 0);
    assert_int_equal(fclose(file), 0);
}

/* The pid a fake compiler wrote into <dir>/<name> (waits up to a second for it). */
static pid_t read_pid_file(const fixture *f, const char *name) {
    char path[PATH_MAX];
    long pid = 0;
    format_text(path, sizeof path, "%s/%s", f->dir, name);
    for (int attempt = 0; attempt < 100 && pid <= 0; attempt++) {
        FILE *file = fopen(path, "r");
        if (file) {
            if (fscanf(file, "%ld", &pid) != 1)
                pid = 0;
            fclose(file);
        }
        if (pid <= 0)
            usleep(10000);
    }
    if (pid <= 0)
        fail_msg("the fake compiler did not write %s", path);
    return (pid_t)pid;
}

/* Whether `pid` is gone or a zombie (killed, waiting for its new parent to reap it). */
static int process_is_gone(pid_t pid) {
    char path[64], stat_text[512];
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 1;
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *file = fopen(path, "r");
    if (!file)
        return 0; /* alive as far as kill() can tell */
    size_t got = fread(stat_text, 1, sizeof stat_text - 1, file);
    fclose(file);
    stat_text[got] = '\0';
    const char *state = strrchr(stat_text, ')'); /* "pid (comm) S ..." */
    return state && state[1] == ' ' && (state[2] == 'Z' || state[2] == 'X');
}

static int wait_until_gone(pid_t pid) {
    double until = now_seconds() + GONE_WAIT_SECONDS;
    while (!process_is_gone(pid)) {
        if (now_seconds() > until)
            return 0;
        usleep(10000);
    }
    return 1;
}

/* This process must have no child left to reap (no zombie from the compiler). */
static void assert_no_child_left(void) {
    errno = 0;
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
    assert_int_equal(errno, ECHILD);
}

/* ---- tests ------------------------------------------------------------------------- */

static void compiler_that_hangs_on_version_is_killed_after_the_probe_time_limit(void **state) {
    fixture *f = *state;
    const char *hanging_argument[] = {"--version", "-dumpmachine"};
    for (int i = 0; i < 2; i++) {
        char body[512], expected[128];
        moegen_host_compiler hc;
        moegen_error err;
        format_text(body, sizeof body,
                    "if [ \"$1\" = '%s' ]; then echo $$ > '%s/hung.pid'; exec sleep 1000; fi\n"
                    FAKE_PROBE_ANSWERS "exit 1\n",
                    hanging_argument[i], f->dir);
        use_fake_compiler(f, i == 0 ? "hangs-on-version" : "hangs-on-dumpmachine", body);
        set_env("MOEGEN_CC_TIMEOUT", "1");
        double start = now_seconds();
        moegen_status status = moegen_host_compiler_probe(&hc, &err);
        double elapsed = now_seconds() - start;
        assert_int_equal(status, MOEGEN_ERR_COMPILE);
        assert_int_equal(err.code, MOEGEN_ERR_COMPILE);
        format_text(expected, sizeof expected, "'%s' did not answer within 1 s",
                    hanging_argument[i]);
        if (!strstr(err.message, expected))
            fail_msg("expected \"%s\" in: %s", expected, err.message);
        assert_non_null(strstr(err.message, "killed"));
        assert_true(elapsed >= 0.9);
        assert_true(elapsed < LATE_SECONDS);
        assert_true(wait_until_gone(read_pid_file(f, "hung.pid")));
        assert_no_child_left();
        char pid_path[PATH_MAX];
        format_text(pid_path, sizeof pid_path, "%s/hung.pid", f->dir);
        assert_int_equal(unlink(pid_path), 0);
    }
}

static void compiler_that_hangs_while_compiling_is_killed_after_moegen_cc_timeout(void **state) {
    fixture *f = *state;
    char source[PATH_MAX], output[PATH_MAX], log_path[PATH_MAX], expected[PATH_MAX + 128];
    moegen_host_compiler hc;
    moegen_error err;
    use_fake_compiler(f, "hangs-compiling",
                      FAKE_PROBE_ANSWERS "echo 'fakecc: compiling slowly' >&2\nexec sleep 1000\n");
    write_source(f, source, output, log_path, sizeof source);
    set_env("MOEGEN_CC_TIMEOUT", "1");
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    assert_string_equal(hc.identity, "fakecc 1.0 (moegen test) / x86_64-fake-linux-gnu");
    double start = now_seconds();
    moegen_status status = moegen_host_compile(&hc, source, output, log_path, &err);
    double elapsed = now_seconds() - start;
    assert_int_equal(status, MOEGEN_ERR_COMPILE);
    format_text(expected, sizeof expected, "did not finish within 1 s compiling %s", source);
    if (!strstr(err.message, expected))
        fail_msg("expected \"%s\" in: %s", expected, err.message);
    assert_non_null(strstr(err.message, "raise MOEGEN_CC_TIMEOUT"));
    format_text(expected, sizeof expected, "full log: %s", log_path);
    assert_non_null(strstr(err.message, expected));
    assert_non_null(strstr(err.message, "fakecc: compiling slowly")); /* the log's start */
    assert_true(elapsed >= 0.9);
    assert_true(elapsed < LATE_SECONDS);
    assert_no_child_left();
}

static void probe_returns_when_a_grandchild_keeps_the_output_pipe_open(void **state) {
    fixture *f = *state;
    char body[1024];
    moegen_host_compiler hc;
    moegen_error err;
    /* The background sleep inherits stdout, the probe's pipe, and outlives the script. */
    format_text(body, sizeof body,
                "if [ \"$1\" = '--version' ]; then\n"
                "  sleep 1000 &\n"
                "  echo $! > '%s/holder.pid'\n"
                "fi\n" FAKE_PROBE_ANSWERS "exit 1\n",
                f->dir);
    use_fake_compiler(f, "leaves-pipe-open", body);
    set_env("MOEGEN_CC_TIMEOUT", "1");
    double start = now_seconds();
    moegen_status status = moegen_host_compiler_probe(&hc, &err);
    double elapsed = now_seconds() - start;
    pid_t holder = read_pid_file(f, "holder.pid");
    kill(holder, SIGKILL); /* a process of this test's own making: leave nothing behind */
    if (status != MOEGEN_OK)
        fail_msg("probe failed: %s", err.message);
    assert_string_equal(hc.identity, "fakecc 1.0 (moegen test) / x86_64-fake-linux-gnu");
    assert_true(elapsed < LATE_SECONDS);
    assert_no_child_left();
}

static void time_limit_kills_the_compilers_whole_process_group(void **state) {
    fixture *f = *state;
    char body[1024], source[PATH_MAX], output[PATH_MAX], log_path[PATH_MAX];
    moegen_host_compiler hc;
    moegen_error err;
    /* Like a driver waiting on cc1: a grandchild that would outlive a kill of the script. */
    format_text(body, sizeof body,
                FAKE_PROBE_ANSWERS "sleep 1000 &\n"
                                   "echo $! > '%s/grandchild.pid'\n"
                                   "echo $$ > '%s/driver.pid'\n"
                                   "sleep 1000\n",
                f->dir, f->dir);
    use_fake_compiler(f, "spawns-and-hangs", body);
    write_source(f, source, output, log_path, sizeof source);
    set_env("MOEGEN_CC_TIMEOUT", "1");
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    double start = now_seconds();
    moegen_status status = moegen_host_compile(&hc, source, output, log_path, &err);
    double elapsed = now_seconds() - start;
    pid_t grandchild = read_pid_file(f, "grandchild.pid");
    pid_t driver = read_pid_file(f, "driver.pid");
    int grandchild_gone = wait_until_gone(grandchild);
    if (!grandchild_gone)
        kill(grandchild, SIGKILL); /* do not leave it running when the test fails */
    assert_int_equal(status, MOEGEN_ERR_COMPILE);
    assert_non_null(strstr(err.message, "did not finish within 1 s"));
    assert_true(elapsed < LATE_SECONDS);
    assert_true(grandchild_gone);
    errno = 0;
    assert_int_equal(kill(driver, 0), -1); /* the direct child was reaped, not left a zombie */
    assert_int_equal(errno, ESRCH);
    assert_no_child_left();
}

static void moegen_cc_timeout_must_be_a_positive_whole_number_of_seconds(void **state) {
    fixture *f = *state;
    const char *bad_values[] = {"0", "-5", "abc", "1e3", "1.5", " 5", "5s", "+5", "99999999999"};
    use_fake_compiler(f, "answers", FAKE_PROBE_ANSWERS "exit 0\n");
    for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; i++) {
        char expected[128];
        moegen_host_compiler hc;
        moegen_error err;
        set_env("MOEGEN_CC_TIMEOUT", bad_values[i]);
        moegen_status status = moegen_host_compiler_probe(&hc, &err);
        if (status != MOEGEN_ERR_COMPILE)
            fail_msg("MOEGEN_CC_TIMEOUT='%s' was accepted", bad_values[i]);
        assert_int_equal(err.code, MOEGEN_ERR_COMPILE);
        format_text(expected, sizeof expected, "MOEGEN_CC_TIMEOUT='%s'", bad_values[i]);
        if (!strstr(err.message, expected))
            fail_msg("expected \"%s\" in: %s", expected, err.message);
        assert_non_null(strstr(err.message, "whole number of seconds"));
    }
}

static void probe_stores_the_time_limit_and_a_caller_can_change_it(void **state) {
    fixture *f = *state;
    char source[PATH_MAX], output[PATH_MAX], log_path[PATH_MAX];
    char identity[sizeof ((moegen_host_compiler *)0)->identity];
    char flags[sizeof ((moegen_host_compiler *)0)->flags];
    moegen_host_compiler hc;
    moegen_error err;
    use_fake_compiler(f, "hangs-compiling", FAKE_PROBE_ANSWERS "exec sleep 1000\n");
    write_source(f, source, output, log_path, sizeof source);

    set_env("MOEGEN_CC_TIMEOUT", NULL); /* unset: the default */
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    assert_int_equal(hc.timeout_ms, 300000);
    format_text(identity, sizeof identity, "%s", hc.identity);
    format_text(flags, sizeof flags, "%s", hc.flags);

    set_env("MOEGEN_CC_TIMEOUT", ""); /* empty: the default, like an empty MOEGEN_CC */
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    assert_int_equal(hc.timeout_ms, 300000);

    set_env("MOEGEN_CC_TIMEOUT", "7");
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    assert_int_equal(hc.timeout_ms, 7000);
    /* the limit is not part of the cache key */
    assert_string_equal(hc.identity, identity);
    assert_string_equal(hc.flags, flags);

    /* A caller lowers the limit after probing (the environment says 7 s). */
    hc.timeout_ms = 300;
    double start = now_seconds();
    assert_int_equal(moegen_host_compile(&hc, source, output, log_path, &err),
                     MOEGEN_ERR_COMPILE);
    double elapsed = now_seconds() - start;
    assert_non_null(strstr(err.message, "did not finish within 300 ms"));
    assert_true(elapsed < 5.0);
    assert_no_child_left();

    /* No limit at all is not allowed. */
    hc.timeout_ms = 0;
    assert_int_equal(moegen_host_compile(&hc, source, output, log_path, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "timeout_ms"));
    assert_no_child_left();
}

#define FIXTURE_TEST(name) cmocka_unit_test_setup_teardown(name, setup_fixture, teardown_fixture)

int main(void) {
    const struct CMUnitTest tests[] = {
        FIXTURE_TEST(compiler_that_hangs_on_version_is_killed_after_the_probe_time_limit),
        FIXTURE_TEST(compiler_that_hangs_while_compiling_is_killed_after_moegen_cc_timeout),
        FIXTURE_TEST(probe_returns_when_a_grandchild_keeps_the_output_pipe_open),
        FIXTURE_TEST(time_limit_kills_the_compilers_whole_process_group),
        FIXTURE_TEST(moegen_cc_timeout_must_be_a_positive_whole_number_of_seconds),
        FIXTURE_TEST(probe_stores_the_time_limit_and_a_caller_can_change_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
