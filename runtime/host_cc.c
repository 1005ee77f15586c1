/* host_cc.c — the host C compiler as the CPU backend's compiler (see host_cc.h).
 *
 * Place in the pipeline: spec -> gen -> [compile] -> cache -> load -> launch.
 * moegen_host_compiler_probe() finds the compiler ($MOEGEN_CC, else "cc"), reads
 * its identity (first line of `--version` and `-dumpmachine`) and picks flags for
 * this CPU; both go into the cache key. moegen_host_compile() then turns one
 * generated C file into a shared object.
 *
 * Invariants:
 *  - The compiler is run with posix_spawnp() and an argument vector: never a
 *    shell, never system(), so no path or flag is ever re-parsed. $MOEGEN_CC must
 *    therefore name a single program (no arguments).
 *  - Its stdin is /dev/null; its output goes to a pipe (probe) or to the log file
 *    the caller names (compile), and a failed compile reports the log's first
 *    lines and the log's path.
 *  - Nothing waits forever on the compiler. Every run (the two probes and the
 *    compile) has a time limit: the compile hc->timeout_ms ($MOEGEN_CC_TIMEOUT
 *    seconds, a positive whole number, default 300 s), each probe
 *    min(30 s, that). Each run is the leader of its own process group; on expiry
 *    the whole group (driver, cc1, as, ld, whatever a wrapper script started) is
 *    killed with SIGKILL and the direct child is reaped, so no zombie is left and
 *    no grandchild keeps running. The group is killed while its leader is still
 *    unreaped, so its id cannot have been reused by an unrelated group.
 *    (A process that leaves the group itself, with setsid() or setpgid(), escapes.)
 *  - The probe's pipe is read with poll() bounded by the remaining time, and
 *    reading stops once the direct child has exited and the pipe has nothing
 *    more to give: a grandchild holding the write end open cannot stall it.
 *    After a run that ends by itself nothing is killed (a compiler cache's
 *    server may legitimately outlive one compile).
 *  - The time limit is not part of the cache key (identity, flags): it changes
 *    whether a compile finishes, never what it produces.
 *  - The flags are a pure function of the CPU this process runs on.
 *  - No global mutable state.
 */
#define _GNU_SOURCE
#include "host_cc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

extern char **environ;

#define COMPILE_FLAGS "-std=gnu11 -O3 -fPIC -fopenmp -fno-math-errno"
/* A module's own calls bind inside it (-Bsymbolic): a program that also links a generated
 * layer of the same name (generate-and-link, stable names) cannot capture them. */
#define MODULE_LINK_FLAGS "-shared -Wl,-Bsymbolic"
#define AVX2_FLAGS "-mavx2 -mfma -mf16c"
#define AVX512_FLAGS "-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c"
#define AVX512_BF16_FLAGS "-mavx512bf16" /* vdpbf16ps: bf16 dot products (templates/cpu/gemm.c.tpl) */
#define AMX_FLAGS "-mamx-tile -mamx-bf16"     /* AMX tiles (templates/cpu/amx.c.tpl) */
#define MAX_FLAG_WORDS 32
#define CAPTURE_BYTES 1024
#define VERSION_LINE_MAX_CHARS 400 /* identity = version + " / " + machine fits */
#define MACHINE_LINE_MAX_CHARS 100
#define LOG_EXCERPT_BYTES 700
#define LOG_EXCERPT_LINES 10
#define TIMEOUT_VARIABLE "MOEGEN_CC_TIMEOUT"
#define DEFAULT_COMPILE_TIMEOUT_S 300
#define MAX_TIMEOUT_S (INT_MAX / 1000) /* timeout_ms must fit in an int */
#define PROBE_TIMEOUT_MS 30000         /* a probe waits min(this, the compile limit) */
#define MAX_POLL_SLICE_MS 50           /* how often a running child is checked at most */

/* How a child process ended. */
typedef struct run_outcome {
    int spawn_error; /* errno when the program could not be started or waited for */
    int exited;      /* 1: exited normally with exit_code */
    int exit_code;
    int signal_number; /* when killed by a signal */
    int timed_out;     /* 1: still running at its time limit; its process group was killed */
} run_outcome;

static int outcome_succeeded(const run_outcome *o) {
    return o->spawn_error == 0 && o->exited && o->exit_code == 0;
}

static void describe_outcome(const run_outcome *o, char *out, size_t size) {
    if (o->spawn_error)
        snprintf(out, size, "could not run: %s", strerror(o->spawn_error));
    else if (o->timed_out)
        snprintf(out, size, "did not finish within its time limit; killed");
    else if (o->exited)
        snprintf(out, size, "exit status %d", o->exit_code);
    else
        snprintf(out, size, "killed by signal %d (%s)", o->signal_number,
                 strsignal(o->signal_number));
}

/* A time limit for a message: "300 s", or "1500 ms" when not whole seconds. */
static void describe_limit(int limit_ms, char *out, size_t size) {
    if (limit_ms % 1000 == 0)
        snprintf(out, size, "%d s", limit_ms / 1000);
    else
        snprintf(out, size, "%d ms", limit_ms);
}

static int64_t monotonic_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* The compile time limit from $MOEGEN_CC_TIMEOUT: a positive whole number of
 * seconds (decimal digits only, at most MAX_TIMEOUT_S); unset or empty means
 * DEFAULT_COMPILE_TIMEOUT_S. Returns MOEGEN_OK or MOEGEN_ERR_COMPILE naming the
 * variable and the bad value. */
static moegen_status read_timeout_setting(int *timeout_ms, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    const char *text = getenv(TIMEOUT_VARIABLE);
    long seconds = 0;
    *timeout_ms = DEFAULT_COMPILE_TIMEOUT_S * 1000;
    if (!text || !text[0])
        goto done;
    for (const char *c = text; *c && seconds <= MAX_TIMEOUT_S; c++) {
        if (*c < '0' || *c > '9') {
            seconds = 0;
            break;
        }
        seconds = seconds * 10 + (*c - '0');
    }
    if (seconds < 1 || seconds > MAX_TIMEOUT_S) {
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, 0,
                                  TIMEOUT_VARIABLE "='%.64s' is not a time limit: give a whole "
                                  "number of seconds from 1 to %d (unset or empty: %d)",
                                  text, MAX_TIMEOUT_S, DEFAULT_COMPILE_TIMEOUT_S);
        goto done;
    }
    *timeout_ms = (int)seconds * 1000;
done:
    return status;
}

/* Start argv[0] (searched in $PATH) as the leader of a new process group, with
 * stdin from /dev/null, stdout to `out_fd` and stderr to `err_fd` (-1: /dev/null).
 * Returns the pid (which is also the group's id), or -1 with
 * outcome->spawn_error set. */
static pid_t start_program(char *const argv[], int out_fd, int err_fd, run_outcome *outcome) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    int have_actions = 0, have_attributes = 0;
    pid_t pid = -1;
    int error;
    memset(outcome, 0, sizeof *outcome);
    error = posix_spawn_file_actions_init(&actions);
    if (error != 0)
        goto done;
    have_actions = 1;
    error = posix_spawnattr_init(&attributes);
    if (error != 0)
        goto done;
    have_attributes = 1;
    error = posix_spawnattr_setpgroup(&attributes, 0); /* its own group, id = its pid */
    if (error == 0)
        error = posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP);
    if (error == 0)
        error = posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    if (error == 0)
        error = posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
    if (error == 0)
        error = err_fd >= 0
                    ? posix_spawn_file_actions_adddup2(&actions, err_fd, 2)
                    : posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    if (error == 0)
        error = posix_spawnp(&pid, argv[0], &actions, &attributes, argv, environ);
done:
    if (have_attributes)
        posix_spawnattr_destroy(&attributes);
    if (have_actions)
        posix_spawn_file_actions_destroy(&actions);
    if (error != 0) {
        outcome->spawn_error = error;
        pid = -1;
    }
    return pid;
}

/* Whether `pid` has ended, without reaping it: its pid, and so its process
 * group's id, stays reserved until wait_program(). Returns 1, 0, or -1 with errno. */
static int program_ended(pid_t pid) {
    siginfo_t info;
    memset(&info, 0, sizeof info); /* si_pid stays 0 while the child runs */
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0)
        return errno == EINTR ? 0 : -1;
    return info.si_pid != 0;
}

/* Wait (reaping it) for `pid` and record how it ended. */
static void wait_program(pid_t pid, run_outcome *outcome) {
    int status = 0;
    pid_t waited;
    do {
        waited = waitpid(pid, &status, 0);
    } while (waited < 0 && errno == EINTR);
    if (waited < 0) {
        outcome->spawn_error = errno;
    } else if (WIFEXITED(status)) {
        outcome->exited = 1;
        outcome->exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        outcome->signal_number = WTERMSIG(status);
    }
}

/* Keep the start of what `fd` (non-blocking) has to give now in out[*kept..size-1),
 * dropping the rest so the writer never blocks on a full pipe.
 * Returns 1 when more may come, 0 at end of file or on an error. */
static int read_available(int fd, char *out, size_t size, size_t *kept) {
    char chunk[512];
    ssize_t got = read(fd, chunk, sizeof chunk);
    if (got < 0)
        return errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK;
    if (got == 0)
        return 0;
    size_t take = (size_t)got;
    if (take > size - 1 - *kept)
        take = size - 1 - *kept;
    memcpy(out + *kept, chunk, take);
    *kept += take;
    return 1;
}

/* Wait for `pid` (a process group leader from start_program) for at most
 * `limit_ms`, meanwhile reading `capture_fd` (-1: none; else non-blocking) into
 * `out` as read_available() does. Reading stops at end of file, or once `pid` has
 * ended and the pipe has nothing ready (a grandchild may hold its write end).
 * When the limit expires first, the whole process group is killed with SIGKILL
 * and outcome->timed_out is set. Either way `pid` is reaped and its end recorded. */
static void supervise_program(pid_t pid, int limit_ms, int capture_fd, char *out, size_t size,
                              size_t *kept, run_outcome *outcome) {
    const int64_t deadline = monotonic_ms() + limit_ms;
    int reading = capture_fd >= 0;
    int slice_ms = 1;
    int timed_out = 0;
    for (;;) {
        int64_t left = deadline - monotonic_ms();
        int ended = program_ended(pid);
        if (ended < 0) { /* not our child any more (SIGCHLD ignored?): nothing to wait for */
            outcome->spawn_error = errno;
            goto done;
        }
        if (ended && !reading)
            break;
        if (left <= 0) {
            if (!ended) {
                kill(-pid, SIGKILL); /* the group: the driver and everything it started */
                kill(pid, SIGKILL);  /* the leader, should it have left its group */
                timed_out = 1;
            }
            break;
        }
        if (reading) {
            struct pollfd ready = {.fd = capture_fd, .events = POLLIN};
            int wait_ms = ended ? 0 : (int)(left < MAX_POLL_SLICE_MS ? left : MAX_POLL_SLICE_MS);
            int count = poll(&ready, 1, wait_ms);
            if (count > 0)
                reading = read_available(capture_fd, out, size, kept);
            else if (count == 0 && ended)
                reading = 0; /* drained: what the child wrote before it exited is in */
            else if (count < 0 && errno != EINTR)
                reading = 0;
            continue;
        }
        if (slice_ms > left)
            slice_ms = (int)left;
        poll(NULL, 0, slice_ms); /* sleep; checks come quickly at first, then every 50 ms */
        slice_ms = slice_ms * 2 < MAX_POLL_SLICE_MS ? slice_ms * 2 : MAX_POLL_SLICE_MS;
    }
    wait_program(pid, outcome);
    outcome->timed_out = timed_out;
done:
    return;
}

/* Run `program argument` for at most `limit_ms` and keep the start of its stdout
 * in `out` (NUL-terminated); the rest is read and dropped so the child never
 * blocks on a full pipe. On expiry outcome->timed_out is set (supervise_program). */
static void capture_output(const char *program, const char *argument, int limit_ms, char *out,
                           size_t size, run_outcome *outcome) {
    char *argv[3] = {(char *)program, (char *)argument, NULL};
    int pipe_fds[2] = {-1, -1};
    size_t kept = 0;
    pid_t pid = -1;
    memset(outcome, 0, sizeof *outcome);
    if (pipe2(pipe_fds, O_CLOEXEC) != 0 || fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK) != 0) {
        outcome->spawn_error = errno;
        goto done;
    }
    pid = start_program(argv, pipe_fds[1], -1, outcome);
    close(pipe_fds[1]); /* the child holds its own copy; EOF comes when all copies close */
    pipe_fds[1] = -1;
    if (pid < 0)
        goto done;
    supervise_program(pid, limit_ms, pipe_fds[0], out, size, &kept, outcome);
done:
    out[kept] = '\0';
    for (int i = 0; i < 2; i++)
        if (pipe_fds[i] >= 0)
            close(pipe_fds[i]);
}

/* Keep only the first line of `text`, without trailing blanks. */
static void keep_first_line(char *text, size_t max_chars) {
    size_t length = strcspn(text, "\r\n");
    if (length > max_chars)
        length = max_chars;
    while (length > 0 && (text[length - 1] == ' ' || text[length - 1] == '\t'))
        length--;
    text[length] = '\0';
}

/* 1 if the CPU has AMX tiles with bf16 (CPUID leaf 7: EDX bits 22 and 24). */
static int cpu_has_amx_bf16(void) {
#if defined(__x86_64__)
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    return (edx >> 22 & 1u) && (edx >> 24 & 1u);
#else
    return 0;
#endif
}

/* The CPU targets by name, widest last: the one home of these names (`gen --target`, the
 * tuning databases' family, moegen_host_compiler_device). */
static const struct {
    const char *name;
    moegen_target target;
} CPU_TARGETS[] = {
    {"base", {.cpu_vector_floats = 4}},
    {"avx2", {.cpu_vector_floats = 8}},
    {"avx512", {.cpu_vector_floats = 16}},
    {"avx512-bf16", {.cpu_vector_floats = 16, .cpu_bf16_dot = 1}},
    {"avx512-amx", {.cpu_vector_floats = 16, .cpu_bf16_dot = 1, .cpu_amx = 1}},
};
#define N_CPU_TARGETS (sizeof CPU_TARGETS / sizeof CPU_TARGETS[0])

const char *moegen_host_target_name(const moegen_target *t) {
    for (int i = (int)N_CPU_TARGETS - 1; i >= 0; i--)
        if (t->cpu_vector_floats >= CPU_TARGETS[i].target.cpu_vector_floats &&
            t->cpu_bf16_dot >= CPU_TARGETS[i].target.cpu_bf16_dot && t->cpu_amx >= CPU_TARGETS[i].target.cpu_amx)
            return CPU_TARGETS[i].name;
    return CPU_TARGETS[0].name;
}

int moegen_host_target_parse(const char *name, moegen_target *target) {
    for (size_t i = 0; name && i < N_CPU_TARGETS; i++)
        if (!strcmp(name, CPU_TARGETS[i].name)) {
            *target = CPU_TARGETS[i].target;
            return 0;
        }
    return -1;
}

void moegen_host_cpu_target(moegen_target *target) {
    memset(target, 0, sizeof *target);
    target->cpu_vector_floats = 4;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        target->cpu_vector_floats = 16;
        target->cpu_bf16_dot = __builtin_cpu_supports("avx512bf16");
        target->cpu_amx = cpu_has_amx_bf16();
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        target->cpu_vector_floats = 8;
    }
#endif
}

int moegen_host_target_compile_flags(const moegen_target *target, char *out, size_t size) {
    const char *isa = "";
    if (target->cpu_vector_floats >= 16)
        isa = target->cpu_amx         ? " " AVX512_FLAGS " " AVX512_BF16_FLAGS " " AMX_FLAGS
              : target->cpu_bf16_dot ? " " AVX512_FLAGS " " AVX512_BF16_FLAGS
                                     : " " AVX512_FLAGS;
    else if (target->cpu_vector_floats >= 8)
        isa = " " AVX2_FLAGS;
    const int n = snprintf(out, size, "%s%s", COMPILE_FLAGS, isa);
    return n >= 0 && (size_t)n < size ? 0 : -1;
}

static void choose_flags(moegen_host_compiler *hc) {
    moegen_target target;
    moegen_host_cpu_target(&target);
    hc->vector_floats = target.cpu_vector_floats;
    hc->bf16_dot = target.cpu_bf16_dot;
    hc->amx = target.cpu_amx;
    char compile[sizeof hc->flags - sizeof MODULE_LINK_FLAGS - 1];
    moegen_host_target_compile_flags(&target, compile, sizeof compile);
    snprintf(hc->flags, sizeof hc->flags, "%s %s", compile, MODULE_LINK_FLAGS);
}

/* An error for a compiler that could not be run at all. */
static moegen_status compiler_not_runnable(const char *command, const run_outcome *o,
                                           moegen_error *err) {
    moegen_status status;
    if (o->spawn_error == ENOENT)
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, ENOENT,
                                  "host C compiler '%s' not found (install a C compiler or set "
                                  "MOEGEN_CC to one)",
                                  command);
    else
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, o->spawn_error,
                                  "cannot run host C compiler '%s': %s", command,
                                  strerror(o->spawn_error));
    return status;
}

/* An error for a probe (`<cc> <argument>`) that did not answer within `limit_ms`. */
static moegen_status probe_timed_out(const char *command, const char *argument, int limit_ms,
                                     moegen_error *err) {
    char limit[32];
    describe_limit(limit_ms, limit, sizeof limit);
    return moegen_error_set(err, MOEGEN_ERR_COMPILE, ETIMEDOUT,
                            "host C compiler '%s': '%s' did not answer within %s (killed; a "
                            "probe waits min(30 s, " TIMEOUT_VARIABLE "))",
                            command, argument, limit);
}

/* Find the compiler ($MOEGEN_CC, a single program, else "cc"), read its time limit
 * ($MOEGEN_CC_TIMEOUT) and identity, and choose flags for this CPU (host_cc.h).
 * Each probe run is limited to min(30 s, the compile limit). Returns MOEGEN_OK;
 * MOEGEN_ERR_COMPILE when $MOEGEN_CC is too long or has arguments,
 * $MOEGEN_CC_TIMEOUT is not a positive whole number of seconds, the compiler
 * cannot be found or run, or `--version` / `-dumpmachine` fail or time out;
 * MOEGEN_ERR_INVALID_ARGUMENT when `hc` is NULL. */
moegen_status moegen_host_compiler_probe(moegen_host_compiler *hc, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    const char *command = getenv("MOEGEN_CC");
    char version[CAPTURE_BYTES];
    char machine[CAPTURE_BYTES];
    char how[128];
    int probe_limit_ms;
    run_outcome outcome;
    if (!hc) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_host_compiler_probe: the compiler pointer is NULL");
        goto done;
    }
    moegen_error_clear(err);
    memset(hc, 0, sizeof *hc);
    if (!command || !command[0])
        command = "cc";
    if (strlen(command) >= sizeof hc->command) {
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, 0,
                                  "MOEGEN_CC is too long (at most %zu characters)",
                                  sizeof hc->command - 1);
        goto done;
    }
    if (strpbrk(command, " \t\r\n")) {
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, 0,
                                  "MOEGEN_CC='%s' must name a single program, without arguments",
                                  command);
        goto done;
    }
    status = read_timeout_setting(&hc->timeout_ms, err);
    if (status != MOEGEN_OK)
        goto done;
    probe_limit_ms = hc->timeout_ms < PROBE_TIMEOUT_MS ? hc->timeout_ms : PROBE_TIMEOUT_MS;
    snprintf(hc->command, sizeof hc->command, "%s", command);
    capture_output(hc->command, "--version", probe_limit_ms, version, sizeof version, &outcome);
    if (outcome.spawn_error) {
        status = compiler_not_runnable(hc->command, &outcome, err);
        goto done;
    }
    if (outcome.timed_out) {
        status = probe_timed_out(hc->command, "--version", probe_limit_ms, err);
        goto done;
    }
    keep_first_line(version, VERSION_LINE_MAX_CHARS);
    if (!outcome_succeeded(&outcome) || !version[0]) {
        describe_outcome(&outcome, how, sizeof how);
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, 0,
                                  "host C compiler '%s' did not report a version "
                                  "('%s --version': %s)",
                                  hc->command, hc->command, how);
        goto done;
    }
    capture_output(hc->command, "-dumpmachine", probe_limit_ms, machine, sizeof machine,
                   &outcome);
    if (outcome.timed_out) {
        status = probe_timed_out(hc->command, "-dumpmachine", probe_limit_ms, err);
        goto done;
    }
    keep_first_line(machine, MACHINE_LINE_MAX_CHARS);
    if (!outcome_succeeded(&outcome) || !machine[0]) {
        describe_outcome(&outcome, how, sizeof how);
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, outcome.spawn_error,
                                  "host C compiler '%s' did not report its target "
                                  "('%s -dumpmachine': %s)",
                                  hc->command, hc->command, how);
        goto done;
    }
    snprintf(hc->identity, sizeof hc->identity, "%.400s / %.100s", version, machine);
    choose_flags(hc);
done:
    return status;
}

/* The first lines of a compile log, for an error message. */
static void read_log_excerpt(const char *log_path, char *out, size_t size) {
    size_t length = 0;
    int lines = 0;
    int fd = open(log_path, O_RDONLY | O_CLOEXEC);
    out[0] = '\0';
    if (fd >= 0) {
        ssize_t got;
        do {
            got = read(fd, out + length, size - 1 - length);
        } while (got < 0 && errno == EINTR);
        length = got > 0 ? (size_t)got : 0;
        out[length] = '\0';
        close(fd);
    }
    for (size_t i = 0; i < length; i++) {
        if (out[i] == '\0')
            out[i] = ' ';
        if (out[i] == '\n' && ++lines == LOG_EXCERPT_LINES) {
            out[i] = '\0';
            length = i;
        }
    }
    while (length > 0 && out[length - 1] == '\n')
        out[--length] = '\0';
}

/* Compile `source_path` into the shared object `output_path` with
 * `<cc> <flags> -I<source dir> -o <output> <source> -lm`, stdout and stderr to
 * `log_path` (created 0600, truncated), for at most hc->timeout_ms.
 * Precondition: `hc` filled by moegen_host_compiler_probe (timeout_ms possibly
 * changed since). Returns MOEGEN_OK; MOEGEN_ERR_COMPILE when the log cannot be
 * created, the compiler cannot be run, exits non-zero, dies by a signal or is
 * killed at the time limit (message: how it ended, the log path, then the log's
 * first 10 lines); MOEGEN_ERR_INVALID_ARGUMENT for NULL/empty arguments, paths
 * starting with '-' or a timeout_ms that is not positive. */
moegen_status moegen_host_compile(const moegen_host_compiler *hc, const char *source_path,
                                  const char *output_path, const char *log_path,
                                  moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char flags[sizeof hc->flags];
    char include[PATH_MAX + 2];
    char excerpt[LOG_EXCERPT_BYTES];
    char how[128];
    char limit[32];
    char *argv[MAX_FLAG_WORDS + 8];
    const char *slash;
    char *word_end = NULL;
    int count = 0;
    int log_fd = -1;
    pid_t pid;
    run_outcome outcome;
    if (!hc || !hc->command[0] || !source_path || !source_path[0] || !output_path ||
        !output_path[0] || !log_path || !log_path[0] || source_path[0] == '-' ||
        output_path[0] == '-') {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_host_compile: needs a probed compiler and non-empty "
                                  "source, output and log paths not starting with '-'");
        goto done;
    }
    if (hc->timeout_ms <= 0) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_host_compile: the compiler's timeout_ms is %d; it "
                                  "must be positive (moegen_host_compiler_probe sets it)",
                                  hc->timeout_ms);
        goto done;
    }
    moegen_error_clear(err);
    slash = strrchr(source_path, '/');
    if (!slash)
        snprintf(include, sizeof include, "-I.");
    else if (slash == source_path)
        snprintf(include, sizeof include, "-I/");
    else
        snprintf(include, sizeof include, "-I%.*s", (int)(slash - source_path), source_path);
    argv[count++] = (char *)hc->command;
    snprintf(flags, sizeof flags, "%s", hc->flags);
    for (char *word = strtok_r(flags, " ", &word_end); word && count < MAX_FLAG_WORDS + 1;
         word = strtok_r(NULL, " ", &word_end))
        argv[count++] = word;
    argv[count++] = include;
    argv[count++] = "-o";
    argv[count++] = (char *)output_path;
    argv[count++] = (char *)source_path;
    argv[count++] = "-lm";
    argv[count] = NULL;
    log_fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log_fd < 0) {
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, errno,
                                  "cannot create compile log %s: %s", log_path, strerror(errno));
        goto done;
    }
    pid = start_program(argv, log_fd, log_fd, &outcome);
    if (pid < 0) {
        status = compiler_not_runnable(hc->command, &outcome, err);
        goto done;
    }
    supervise_program(pid, hc->timeout_ms, -1, NULL, 0, NULL, &outcome);
    if (outcome.timed_out) {
        describe_limit(hc->timeout_ms, limit, sizeof limit);
        read_log_excerpt(log_path, excerpt, sizeof excerpt);
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, ETIMEDOUT,
                                  "host C compiler '%s' did not finish within %s compiling %s "
                                  "(killed; raise " TIMEOUT_VARIABLE " or the open option "
                                  "compile_timeout_s to allow more; full log: %s)%s%s",
                                  hc->command, limit, source_path, log_path,
                                  excerpt[0] ? ":\n" : "", excerpt);
        goto done;
    }
    if (!outcome_succeeded(&outcome)) {
        describe_outcome(&outcome, how, sizeof how);
        read_log_excerpt(log_path, excerpt, sizeof excerpt);
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, outcome.exit_code,
                                  "host C compiler '%s' failed on %s (%s; full log: %s):\n%s",
                                  hc->command, source_path, how, log_path, excerpt);
        goto done;
    }
done:
    if (log_fd >= 0)
        close(log_fd);
    return status;
}

moegen_target moegen_host_compiler_target(const moegen_host_compiler *hc) {
    return (moegen_target){.cpu_vector_floats = hc->vector_floats, .cpu_bf16_dot = hc->bf16_dot, .cpu_amx = hc->amx};
}

void moegen_host_compiler_device(const moegen_host_compiler *hc, char *device, size_t device_size, char *family,
                                 size_t family_size) {
    const moegen_target target = moegen_host_compiler_target(hc);
    const char *isa = moegen_host_target_name(&target);
#if defined(__x86_64__)
    const char *arch = "x86_64";
#elif defined(__aarch64__)
    const char *arch = "aarch64";
#else
    const char *arch = "other";
#endif
    char model[128] = "unknown model";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "model name", 10) != 0) continue;
            const char *colon = strchr(line, ':');
            if (!colon) break;
            colon++;
            while (*colon == ' ' || *colon == '\t') colon++;
            snprintf(model, sizeof model, "%.*s", (int)strcspn(colon, "\n"), colon);
            break;
        }
        fclose(f);
    }
    snprintf(device, device_size, "cpu %s; %s", model, isa);
    snprintf(family, family_size, "cpu-%s-%s", arch, isa);
}
