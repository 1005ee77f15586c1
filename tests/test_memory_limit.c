/* test_memory_limit.c — tests of the memory budget (runtime/memory_limit.c).
 *
 * Place in the pipeline: the pre-flight check before a layer allocates its tensors.
 * Most tests build a fake /proc and /sys tree in their own mkdtemp directory and point
 * moegen_memory_budget_read_probe() at it: cgroup v2 (a parent's memory.max binds,
 * "max", usage above the limit), cgroup v1 (the LONG_MAX sentinel, a real limit,
 * use_hierarchy 0), mountinfo naming the mounts (elsewhere than /sys/fs/cgroup, escaped
 * spaces, a container whose cgroup is not visible under the mount), missing files,
 * garbage in every file, and RLIMIT_AS / RLIMIT_DATA. Then the real machine: RLIMIT_AS
 * set in a forked child, and (where /sys/fs/cgroup/memory is writable) a cgroup v1
 * child with a 512 MiB limit; both skip with a printed reason where impossible.
 *
 * Invariants: each fake-tree test works in its own mkdtemp directory, removed
 * afterwards; a cgroup a test creates is removed before its assertions run; forked
 * children never use cmocka assertions and leave with _exit().
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h" /* moegen_remove_tree */
#include "memory_limit.h"
#include "test_support.h"

#define MIB ((uint64_t)1 << 20)
#define GIB ((uint64_t)1 << 30)
#define PAGE 4096u
#define V1_UNLIMITED_4K "9223372036854771712\n"  /* LONG_MAX rounded down to 4 KiB */
#define V1_UNLIMITED_64K "9223372036854710272\n" /* ... to 64 KiB */
#define MEMINFO_16G                                                                        \
    "MemTotal:       32768000 kB\nMemFree:         1000000 kB\n"                           \
    "MemAvailable:   16777216 kB\nBuffers:           12345 kB\n"
#define MOUNTINFO_V2                                                                       \
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"                              \
    "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 "      \
    "cgroup2 rw,nsdelegate\n"
#define MOUNTINFO_V1                                                                       \
    "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"                                       \
    "31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"                  \
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n" \
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"           \
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
#define REAL_CGROUP_LIMIT (512 * MIB)
#define REAL_RLIMIT_HEADROOM (256 * MIB)

typedef struct fixture {
    char dir[PATH_MAX]; /* the fake root */
} fixture;

/* What a forked child reports back through a pipe. */
typedef struct child_report {
    int stage;  /* 0: read the budget; else the step that failed */
    int error;  /* errno of that step */
    int status; /* moegen_status of the read */
    moegen_memory_budget budget;
} child_report;

/* ---- helpers ------------------------------------------------------------------ */

static int setup_fixture(void **state) {
    const char *base = getenv("TMPDIR");
    fixture *f = calloc(1, sizeof *f);
    if (!base || base[0] != '/')
        base = "/tmp";
    if (!f)
        return -1;
    format_text(f->dir, sizeof f->dir, "%s/moegen-test-memlimit-XXXXXX", base);
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown_fixture(void **state) {
    fixture *f = *state;
    (void)moegen_remove_tree(f->dir);
    free(f);
    return 0;
}

/* mkdir -p for the directories above `path`. */
static void make_parents(const char *path) {
    char copy[PATH_MAX];
    format_text(copy, sizeof copy, "%s", path);
    for (char *slash = strchr(copy + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(copy, 0755) != 0 && errno != EEXIST)
            fail_msg("mkdir %s: %s", copy, strerror(errno));
        *slash = '/';
    }
}

/* Write `length` bytes of `text` to <fake root>/<rel>, creating directories. */
static void put_bytes(const fixture *f, const char *rel, const char *text, size_t length) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s%s", f->dir, rel);
    make_parents(path);
    FILE *file = fopen(path, "wb");
    if (!file)
        fail_msg("cannot write %s: %s", path, strerror(errno));
    assert_int_equal(fwrite(text, 1, length, file), length);
    assert_int_equal(fclose(file), 0);
}

static void put(const fixture *f, const char *rel, const char *text) {
    put_bytes(f, rel, text, strlen(text));
}

/* A directory in the fake tree (a cgroup without any files). */
static void put_dir(const fixture *f, const char *rel) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s%s/", f->dir, rel);
    make_parents(path);
}

/* One cgroup v2 directory's memory.max and memory.current. */
static void put_v2(const fixture *f, const char *cgroup, const char *max, const char *current) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "/sys/fs/cgroup%s/memory.max", cgroup);
    put(f, path, max);
    format_text(path, sizeof path, "/sys/fs/cgroup%s/memory.current", cgroup);
    put(f, path, current);
}

/* One cgroup v1 directory under `mount`. */
static void put_v1(const fixture *f, const char *mount, const char *cgroup, const char *limit,
                   const char *usage) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s%s/memory.limit_in_bytes", mount, cgroup);
    put(f, path, limit);
    format_text(path, sizeof path, "%s%s/memory.usage_in_bytes", mount, cgroup);
    put(f, path, usage);
}

static moegen_memory_probe fake_probe(const fixture *f) {
    moegen_memory_probe probe = {f->dir, MOEGEN_MEMORY_UNLIMITED, MOEGEN_MEMORY_UNLIMITED, PAGE};
    return probe;
}

static moegen_memory_budget read_probe(const moegen_memory_probe *probe) {
    moegen_memory_budget budget;
    moegen_error err;
    memset(&budget, 0x5a, sizeof budget);
    moegen_status status = moegen_memory_budget_read_probe(probe, &budget, &err);
    if (status != MOEGEN_OK)
        fail_msg("moegen_memory_budget_read_probe: %s: %s", moegen_status_name(status),
                 err.message);
    assert_non_null(memchr(budget.limited_by, '\0', sizeof budget.limited_by));
    return budget;
}

static moegen_memory_budget read_fake(const fixture *f) {
    moegen_memory_probe probe = fake_probe(f);
    return read_probe(&probe);
}

static void assert_budget(const moegen_memory_budget *budget, uint64_t bytes,
                          const char *limited_by) {
    if (budget->available_bytes != bytes || strcmp(budget->limited_by, limited_by) != 0)
        fail_msg("budget %llu bytes, limited by \"%s\"; expected %llu bytes, \"%s\"",
                 (unsigned long long)budget->available_bytes, budget->limited_by,
                 (unsigned long long)bytes, limited_by);
}

static void assert_mem_available_binds(const fixture *f) {
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 16 * GIB, "MemAvailable");
}

/* The first line of `path` holding `needle`, copied into out; -1 when none. */
static int find_line(const char *path, const char *needle, char *out, size_t size) {
    int found = -1;
    FILE *file = fopen(path, "re");
    if (!file)
        return -1;
    while (found != 0 && fgets(out, (int)size, file))
        if (strstr(out, needle)) {
            out[strcspn(out, "\n")] = '\0';
            found = 0;
        }
    fclose(file);
    return found;
}

/* Write the whole report and leave (in a forked child). */
static _Noreturn void report_and_exit(int fd, const child_report *report) {
    const char *p = (const char *)report;
    size_t left = sizeof *report;
    while (left > 0) {
        ssize_t wrote = write(fd, p, left);
        if (wrote < 0 && errno == EINTR)
            continue;
        if (wrote <= 0)
            _exit(2);
        p += wrote;
        left -= (size_t)wrote;
    }
    _exit(0);
}

/* Read a child's report and reap it; fails the test when the child died. */
static child_report collect_child(pid_t pid, int fd) {
    child_report report;
    char *p = (char *)&report;
    size_t got = 0;
    int status = 0;
    memset(&report, 0, sizeof report);
    while (got < sizeof report) {
        ssize_t n = read(fd, p + got, sizeof report - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (got != sizeof report || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("child %d sent %zu of %zu bytes and ended with status 0x%x", (int)pid, got,
                 sizeof report, status);
    return report;
}

/* ---- no sources, MemAvailable ------------------------------------------------- */

static void a_tree_without_any_source_gives_an_unlimited_budget_from_an_unknown_source(
    void **state) {
    fixture *f = *state;
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, MOEGEN_MEMORY_UNLIMITED, "unknown");
}

static void mem_available_alone_binds_when_there_is_no_other_limit(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    assert_mem_available_binds(f);
    put(f, "/proc/meminfo", "MemTotal: 100 kB\nMemAvailable:\t2048 kB"); /* no final newline */
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 2 * MIB, "MemAvailable");
}

/* ---- cgroup v2 ----------------------------------------------------------------- */

static void a_cgroup_v2_limit_in_a_parent_binds_the_child_cgroup(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/user.slice/x/y\n");
    put_v2(f, "/user.slice/x/y", "max\n", "104857600\n");
    put_v2(f, "/user.slice/x", "2147483648\n", "1288490189\n"); /* 2 GiB, 1.2 GiB in use */
    put_v2(f, "/user.slice", "8589934592\n", "1288490189\n");
    put(f, "/sys/fs/cgroup/memory.current", "9999999999\n"); /* the root: no memory.max */
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 2147483648u - 1288490189u,
                  "cgroup v2 memory.max of /user.slice/x (2.0 GiB, 1.2 GiB in use)");

    /* A tighter limit on the leaf itself binds instead. */
    put_v2(f, "/user.slice/x/y", "209715200\n", "104857600\n");
    budget = read_fake(f);
    assert_budget(&budget, 100 * MIB,
                  "cgroup v2 memory.max of /user.slice/x/y (200.0 MiB, 100.0 MiB in use)");
}

static void cgroup_v2_max_everywhere_is_no_limit_and_mem_available_binds(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/a/b\n");
    put_v2(f, "/a/b", "max\n", "1048576\n");
    put_v2(f, "/a", "max", "1048576"); /* without newlines */
    assert_mem_available_binds(f);
}

static void cgroup_v2_usage_above_the_limit_gives_zero_bytes(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/job\n");
    put_v2(f, "/job", "1073741824\n", "1073745920\n");
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 0, "cgroup v2 memory.max of /job (1.0 GiB, 1.0 GiB in use)");
}

static void cgroup_v2_limit_without_a_readable_usage_still_bounds_the_budget(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/job\n");
    put(f, "/sys/fs/cgroup/job/memory.max", "3221225472\n");
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 3 * GIB, "cgroup v2 memory.max of /job (3.0 GiB, usage unknown)");
}

/* ---- cgroup v1 ----------------------------------------------------------------- */

static void cgroup_v1_unlimited_sentinel_is_no_limit_for_4k_and_64k_pages(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V1);
    put(f, "/proc/self/cgroup", "10:cpu,cpuacct:/\n4:memory:/batch/job\n0::/\n");
    put_v1(f, "/sys/fs/cgroup/memory", "/batch/job", V1_UNLIMITED_4K, "5368709120\n");
    put_v1(f, "/sys/fs/cgroup/memory", "/batch", V1_UNLIMITED_64K, "5368709120\n");
    put_v1(f, "/sys/fs/cgroup/memory", "", V1_UNLIMITED_4K, "25368709120\n");
    assert_mem_available_binds(f);
}

static void a_cgroup_v1_limit_binds_and_names_the_cgroup(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V1);
    put(f, "/proc/self/cgroup", "10:cpu,cpuacct:/\n4:memory:/batch/job\n0::/\n");
    put_v1(f, "/sys/fs/cgroup/memory", "/batch/job", "536870912\n", "104857600\n");
    put_v1(f, "/sys/fs/cgroup/memory", "/batch", V1_UNLIMITED_4K, "104857600\n");
    put_v1(f, "/sys/fs/cgroup/memory", "", V1_UNLIMITED_4K, "25368709120\n");
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 412 * MIB,
                  "cgroup v1 memory.limit_in_bytes of /batch/job (512.0 MiB, 100.0 MiB in use)");

    /* A parent's tighter limit binds too... */
    put_v1(f, "/sys/fs/cgroup/memory", "/batch", "314572800\n", "104857600\n");
    budget = read_fake(f);
    assert_budget(&budget, 200 * MIB,
                  "cgroup v1 memory.limit_in_bytes of /batch (300.0 MiB, 100.0 MiB in use)");

    /* ...unless it does not account its children's usage (use_hierarchy 0). */
    put(f, "/sys/fs/cgroup/memory/batch/memory.use_hierarchy", "0\n");
    budget = read_fake(f);
    assert_budget(&budget, 412 * MIB,
                  "cgroup v1 memory.limit_in_bytes of /batch/job (512.0 MiB, 100.0 MiB in use)");
}

/* ---- mountinfo ------------------------------------------------------------------ */

static void a_cgroup_mounted_elsewhere_is_found_through_mountinfo(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    /* The memory controller shares a hierarchy with cpu, at a path with a space and an
     * optional field; /sys/fs/cgroup/memory exists too but is not mounted. */
    put(f, "/proc/self/mountinfo",
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "50 22 0:40 / /mnt/cg\\040roups/cpu,mem rw,relatime shared:9 master:2 - cgroup "
        "none rw,cpu,memory\n");
    put(f, "/proc/self/cgroup", "3:cpu,memory:/svc\n");
    put_v1(f, "/mnt/cg roups/cpu,mem", "/svc", "1073741824\n", "0\n");
    put_v1(f, "/sys/fs/cgroup/memory", "/svc", "1048576\n", "0\n");
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, GIB, "cgroup v1 memory.limit_in_bytes of /svc (1.0 GiB, 0 B in use)");

    /* The same for cgroup v2 mounted under /run. */
    put(f, "/proc/self/mountinfo",
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "60 22 0:41 / /run/cgroup2 rw - cgroup2 cgroup2 rw\n");
    put(f, "/proc/self/cgroup", "0::/svc\n");
    put(f, "/run/cgroup2/svc/memory.max", "2147483648\n");
    put(f, "/run/cgroup2/svc/memory.current", "1073741824\n");
    budget = read_fake(f);
    assert_budget(&budget, GIB, "cgroup v2 memory.max of /svc (2.0 GiB, 1.0 GiB in use)");
}

static void a_container_cgroup_not_visible_under_the_mount_uses_the_mount_roots_files(
    void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    /* v2 without a cgroup namespace: the host path is named, the container's own cgroup
     * is what is mounted at /sys/fs/cgroup. */
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/system.slice/docker-abc.scope\n");
    put_v2(f, "", "2147483648\n", "536870912\n");
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, 1536 * MIB, "cgroup v2 memory.max of / (2.0 GiB, 512.0 MiB in use)");

    /* v1 where mountinfo says the mount's root is the container's cgroup. */
    moegen_remove_tree(f->dir);
    assert_int_equal(mkdir(f->dir, 0700), 0);
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo",
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n");
    put(f, "/proc/self/cgroup", "4:memory:/docker/abc\n");
    put_v1(f, "/sys/fs/cgroup/memory", "", "1073741824\n", "268435456\n");
    budget = read_fake(f);
    assert_budget(&budget, 768 * MIB,
                  "cgroup v1 memory.limit_in_bytes of /docker/abc (1.0 GiB, 256.0 MiB in use)");

    /* A path with ".." never leaves the mount. */
    put(f, "/proc/self/cgroup", "4:memory:/docker/abc/..\n");
    put_v1(f, "/sys/fs/cgroup", "", "1048576\n", "0\n");
    budget = read_fake(f);
    assert_budget(&budget, 768 * MIB,
                  "cgroup v1 memory.limit_in_bytes of /docker/abc (1.0 GiB, 256.0 MiB in use)");
}

/* ---- missing and garbage ---------------------------------------------------------- */

static void missing_files_are_skipped_without_an_error(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    /* /proc/self/cgroup names cgroups but there is no mountinfo. */
    put(f, "/proc/self/cgroup", "4:memory:/a\n0::/a\n");
    put_v2(f, "/a", "1048576\n", "0\n");
    assert_mem_available_binds(f);
    /* mountinfo but no /proc/self/cgroup. */
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/proc/self/cgroup", f->dir);
    assert_int_equal(unlink(path), 0);
    assert_mem_available_binds(f);
    /* Both, but the cgroup directories are empty. */
    put(f, "/proc/self/cgroup", "0::/b/c\n");
    put_dir(f, "/sys/fs/cgroup/b/c");
    assert_mem_available_binds(f);
    /* RLIMIT_AS with no statm: the limit alone bounds the budget. */
    moegen_memory_probe probe = fake_probe(f);
    probe.rlimit_as = GIB;
    moegen_memory_budget budget = read_probe(&probe);
    assert_budget(&budget, GIB, "RLIMIT_AS (1.0 GiB, usage unknown)");
    /* No meminfo either. */
    format_text(path, sizeof path, "%s/proc/meminfo", f->dir);
    assert_int_equal(unlink(path), 0);
    budget = read_fake(f);
    assert_budget(&budget, MOEGEN_MEMORY_UNLIMITED, "unknown");
}

static void garbage_in_any_file_is_skipped_without_an_error(void **state) {
    fixture *f = *state;
    static const char *const bad_numbers[] = {
        "",     "\n",   "-5\n",     "12abc\n",   "0x100\n", " max\n", "maximum\n",
        "1 2\n", "+7\n", "18446744073709551616\n", "99999999999999999999999999\n"};
    char long_line[20000];
    memset(long_line, '7', sizeof long_line);
    long_line[sizeof long_line - 1] = '\0';

    /* meminfo */
    static const char *const bad_meminfo[] = {
        "MemAvailable: lots kB\n", "MemAvailable: 12 MB\n", "MemAvailable: 12\n",
        "MemAvailable: 18014398509481984 kB\n", /* 2^54 kB overflows 64 bits */
        "MemAvailable: 99999999999999999999999 kB\n", "MemAvailable: -1 kB\n",
        "MemAvailable: 12 kB trailing\n", "memavailable: 12 kB\n"};
    for (size_t i = 0; i < sizeof bad_meminfo / sizeof bad_meminfo[0]; i++) {
        put(f, "/proc/meminfo", bad_meminfo[i]);
        moegen_memory_budget budget = read_fake(f);
        assert_budget(&budget, MOEGEN_MEMORY_UNLIMITED, "unknown");
    }
    put_bytes(f, "/proc/meminfo", "\0\xff\xfe garbage\n\n\n", 15);
    moegen_memory_budget budget = read_fake(f);
    assert_budget(&budget, MOEGEN_MEMORY_UNLIMITED, "unknown");
    put(f, "/proc/meminfo", long_line);
    budget = read_fake(f);
    assert_budget(&budget, MOEGEN_MEMORY_UNLIMITED, "unknown");
    /* A line too long is skipped, the next one still read. */
    char with_long_line[sizeof long_line + 256];
    format_text(with_long_line, sizeof with_long_line, "%s\n%s", long_line, MEMINFO_16G);
    put(f, "/proc/meminfo", with_long_line);
    assert_mem_available_binds(f);

    /* cgroup value files */
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/g\n");
    for (size_t i = 0; i < sizeof bad_numbers / sizeof bad_numbers[0]; i++) {
        put_v2(f, "/g", bad_numbers[i], "0\n");
        assert_mem_available_binds(f);
    }
    put_v2(f, "/g", long_line, "0\n");
    assert_mem_available_binds(f);
    for (size_t i = 0; i < sizeof bad_numbers / sizeof bad_numbers[0]; i++) {
        put_v2(f, "/g", "1048576\n", bad_numbers[i]); /* bad usage: the limit alone */
        budget = read_fake(f);
        assert_budget(&budget, MIB, "cgroup v2 memory.max of /g (1.0 MiB, usage unknown)");
    }

    /* /proc/self/cgroup and mountinfo */
    put_v2(f, "/g", "1048576\n", "0\n");
    static const char *const bad_cgroup[] = {"0:/g\n", "x::/g\n", "0::g\n", "::/g\n",
                                             "0:memory:/g\n", "\n\n", ""};
    for (size_t i = 0; i < sizeof bad_cgroup / sizeof bad_cgroup[0]; i++) {
        put(f, "/proc/self/cgroup", bad_cgroup[i]);
        assert_mem_available_binds(f);
    }
    put(f, "/proc/self/cgroup", "0::/g\n");
    static const char *const bad_mountinfo[] = {
        "30 22 0:26 / /sys/fs/cgroup rw cgroup2 cgroup2 rw\n",  /* no "-" */
        "30 22 0:26 / /sys/fs/cgroup rw - cgroup2\n",          /* too few after "-" */
        "30 22 0:26 /\n",                                      /* too few fields */
        "30 22 0:26 / sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", /* relative mount point */
        "30 22 0:26 / /sys/fs/cgroup rw - cgroup2x cgroup2 rw\n",
        "30 22 0:26 / /sys/fs/cgroup rw - cgroup cgroup rw,memoryx\n"};
    for (size_t i = 0; i < sizeof bad_mountinfo / sizeof bad_mountinfo[0]; i++) {
        put(f, "/proc/self/mountinfo", bad_mountinfo[i]);
        assert_mem_available_binds(f);
    }
    put(f, "/proc/self/mountinfo", long_line);
    assert_mem_available_binds(f);

    /* statm and status with RLIMIT_AS / RLIMIT_DATA: the limits alone. */
    moegen_memory_probe probe = fake_probe(f);
    probe.rlimit_as = 4 * GIB;
    probe.rlimit_data = 8 * GIB;
    static const char *const bad_statm[] = {"", "12\n", "1 2 3 4 5\n", "a b c d e f g\n",
                                            "99999999999999999999 1 1 1 1 1 0\n",
                                            "4503599627370496 1 1 1 1 1 0\n"}; /* x4096 overflows */
    for (size_t i = 0; i < sizeof bad_statm / sizeof bad_statm[0]; i++) {
        put(f, "/proc/self/statm", bad_statm[i]);
        budget = read_probe(&probe);
        assert_budget(&budget, 4 * GIB, "RLIMIT_AS (4.0 GiB, usage unknown)");
    }
}

/* ---- rlimits --------------------------------------------------------------------- */

static void rlimit_as_binds_against_the_virtual_size_in_statm(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    put(f, "/proc/self/cgroup", "0::/job\n");
    put_v2(f, "/job", "8589934592\n", "1073741824\n"); /* 7 GiB left */
    put(f, "/proc/self/statm", "262144 1000 500 10 0 2000 0\n"); /* 1 GiB mapped */
    moegen_memory_probe probe = fake_probe(f);
    probe.rlimit_as = 1536 * MIB;
    moegen_memory_budget budget = read_probe(&probe);
    assert_budget(&budget, 512 * MIB, "RLIMIT_AS (1.5 GiB, 1.0 GiB in use)");

    /* Below the current size: nothing left. */
    probe.rlimit_as = 512 * MIB;
    budget = read_probe(&probe);
    assert_budget(&budget, 0, "RLIMIT_AS (512.0 MiB, 1.0 GiB in use)");

    /* The page size comes from the probe. */
    probe.rlimit_as = 32 * GIB;
    probe.page_size = 65536; /* 262144 pages = 16 GiB */
    budget = read_probe(&probe);
    assert_budget(&budget, 7 * GIB,
                  "cgroup v2 memory.max of /job (8.0 GiB, 1.0 GiB in use)");
    probe.rlimit_as = 20 * GIB;
    budget = read_probe(&probe);
    assert_budget(&budget, 4 * GIB, "RLIMIT_AS (20.0 GiB, 16.0 GiB in use)");
}

static void rlimit_data_binds_against_vmdata_and_falls_back_to_statm(void **state) {
    fixture *f = *state;
    put(f, "/proc/meminfo", MEMINFO_16G);
    put(f, "/proc/self/statm", "262144 1000 500 10 0 51200 0\n"); /* data 200 MiB */
    put(f, "/proc/self/status",
        "Name:\ttest\nVmPeak:\t 1048576 kB\nVmSize:\t 1048576 kB\nVmData:\t  102400 kB\n");
    moegen_memory_probe probe = fake_probe(f);
    probe.rlimit_data = 1 * GIB;
    moegen_memory_budget budget = read_probe(&probe);
    assert_budget(&budget, 924 * MIB, "RLIMIT_DATA (1.0 GiB, 100.0 MiB in use)");

    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/proc/self/status", f->dir);
    assert_int_equal(unlink(path), 0);
    budget = read_probe(&probe);
    assert_budget(&budget, 824 * MIB, "RLIMIT_DATA (1.0 GiB, 200.0 MiB in use)");

    /* With both limits set the tighter one is named. */
    probe.rlimit_as = 1 * GIB + 100 * MIB; /* 100 MiB above the 1 GiB virtual size */
    budget = read_probe(&probe);
    assert_budget(&budget, 100 * MIB, "RLIMIT_AS (1.1 GiB, 1.0 GiB in use)");
}

/* ---- messages and arguments -------------------------------------------------------- */

static void a_long_cgroup_path_is_shortened_from_the_left_in_the_message(void **state) {
    fixture *f = *state;
    char cgroup[400] = "";
    char line[512];
    for (int i = 0; i < 12; i++)
        strcat(cgroup, "/a-rather-long-slice-name");
    strcat(cgroup, "/leaf");
    put(f, "/proc/self/mountinfo", MOUNTINFO_V2);
    format_text(line, sizeof line, "0::%s\n", cgroup);
    put(f, "/proc/self/cgroup", line);
    put_v2(f, cgroup, "1073741824\n", "0\n");
    moegen_memory_budget budget = read_fake(f);
    assert_int_equal(budget.available_bytes, GIB);
    print_message("shortened: %s\n", budget.limited_by);
    assert_true(strncmp(budget.limited_by, "cgroup v2 memory.max of /.../", 29) == 0);
    assert_non_null(strstr(budget.limited_by, "/leaf (1.0 GiB, 0 B in use)"));
    assert_int_equal(budget.limited_by[strlen(budget.limited_by) - 1], ')');
}

static void null_arguments_and_an_empty_root_are_invalid_arguments(void **state) {
    (void)state;
    moegen_memory_budget budget;
    moegen_memory_probe probe = {"", MOEGEN_MEMORY_UNLIMITED, MOEGEN_MEMORY_UNLIMITED, PAGE};
    moegen_error err;
    assert_int_equal(moegen_memory_budget_read(NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(err.code, MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_memory_budget_read_probe(NULL, &budget, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_memory_budget_read_probe(&probe, &budget, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    probe.root = NULL;
    assert_int_equal(moegen_memory_budget_read_probe(&probe, &budget, NULL),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    probe.root = "/";
    probe.page_size = 0;
    assert_int_equal(moegen_memory_budget_read_probe(&probe, &budget, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "page size"));
}

static void byte_counts_are_formatted_in_binary_units_with_one_decimal(void **state) {
    (void)state;
    static const struct {
        uint64_t bytes;
        const char *text;
    } cases[] = {
        {0, "0 B"},
        {1023, "1023 B"},
        {1024, "1.0 KiB"},
        {1536, "1.5 KiB"},
        {1126, "1.1 KiB"},            /* 1.0996 */
        {1048575, "1.0 MiB"},         /* 1023.999 KiB rounds up into the next unit */
        {(uint64_t)1 << 30, "1.0 GiB"},
        {((uint64_t)3 << 29), "1.5 GiB"},
        {(uint64_t)1288490189, "1.2 GiB"},
        {(uint64_t)1020 << 30, "1020.0 GiB"},
        {(uint64_t)1 << 40, "1.0 TiB"},
        {UINT64_MAX, "16.0 EiB"},
    };
    char text[MOEGEN_BYTES_TEXT_BYTES];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_ptr_equal(moegen_format_bytes(cases[i].bytes, text, sizeof text), text);
        assert_string_equal(text, cases[i].text);
    }
    char small[4];
    moegen_format_bytes(3 * GIB, small, sizeof small);
    assert_string_equal(small, "3.0");
    assert_null(moegen_format_bytes(1, NULL, 8));
}

static void formatting_and_parsing_ignore_a_comma_decimal_locale(void **state) {
    static const char *const locales[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8",
                                          "fr_FR.utf8", "ru_RU.UTF-8", "nl_NL.UTF-8"};
    fixture *f = *state;
    const char *chosen = NULL;
    for (size_t i = 0; i < sizeof locales / sizeof locales[0] && !chosen; i++)
        if (setlocale(LC_NUMERIC, locales[i]) && localeconv()->decimal_point[0] == ',')
            chosen = locales[i];
    if (!chosen) {
        setlocale(LC_NUMERIC, "C");
        print_message("no locale with a decimal comma is installed: nothing to compare\n");
        skip();
    }
    char text[MOEGEN_BYTES_TEXT_BYTES];
    moegen_format_bytes(3 * GIB / 2, text, sizeof text);
    put(f, "/proc/meminfo", MEMINFO_16G);
    moegen_memory_budget budget = read_fake(f);
    setlocale(LC_NUMERIC, "C");
    assert_string_equal(text, "1.5 GiB");
    assert_budget(&budget, 16 * GIB, "MemAvailable");
}

/* ---- the real machine -------------------------------------------------------------- */

static void the_real_budget_is_read_and_names_a_source(void **state) {
    (void)state;
    moegen_memory_budget budget;
    moegen_error err;
    char text[MOEGEN_BYTES_TEXT_BYTES];
    assert_int_equal(moegen_memory_budget_read(&budget, &err), MOEGEN_OK);
    print_message("this process may allocate %s (limited by %s)\n",
                  moegen_format_bytes(budget.available_bytes, text, sizeof text),
                  budget.limited_by);
    assert_true(budget.limited_by[0] != '\0');
    if (access("/proc/meminfo", R_OK) == 0) {
        assert_true(budget.available_bytes > 0);
        assert_true(budget.available_bytes < MOEGEN_MEMORY_UNLIMITED);
    }
}

/* Virtual size of this process from /proc/self/statm, read without stdio. */
static int read_vm_size(uint64_t *bytes) {
    char text[256];
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = '\0';
    unsigned long long pages = strtoull(text, NULL, 10);
    long page = sysconf(_SC_PAGESIZE);
    if (pages == 0 || page <= 0)
        return -1;
    *bytes = (uint64_t)pages * (uint64_t)page;
    return 0;
}

static void rlimit_as_set_in_a_child_process_binds_its_budget(void **state) {
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        child_report report;
        uint64_t vm_size;
        memset(&report, 0, sizeof report);
        close(fds[0]);
        if (read_vm_size(&vm_size) != 0) {
            report.stage = 1;
            report.error = errno;
            report_and_exit(fds[1], &report);
        }
        struct rlimit limit;
        getrlimit(RLIMIT_AS, &limit);
        limit.rlim_cur = (rlim_t)(vm_size + REAL_RLIMIT_HEADROOM);
        if (limit.rlim_max != RLIM_INFINITY && limit.rlim_max < limit.rlim_cur)
            limit.rlim_cur = limit.rlim_max;
        if (setrlimit(RLIMIT_AS, &limit) != 0) {
            report.stage = 2;
            report.error = errno;
            report_and_exit(fds[1], &report);
        }
        report.status = moegen_memory_budget_read(&report.budget, NULL);
        report_and_exit(fds[1], &report);
    }
    close(fds[1]);
    child_report report = collect_child(pid, fds[0]);
    if (report.stage != 0)
        fail_msg("child failed at step %d (%s)", report.stage, strerror(report.error));
    print_message("child with RLIMIT_AS = its size + 256 MiB: %llu bytes, limited by %s\n",
                  (unsigned long long)report.budget.available_bytes, report.budget.limited_by);
    assert_int_equal(report.status, MOEGEN_OK);
    assert_true(strncmp(report.budget.limited_by, "RLIMIT_AS (", 11) == 0);
    assert_true(report.budget.available_bytes <= REAL_RLIMIT_HEADROOM);
    assert_true(report.budget.available_bytes >= REAL_RLIMIT_HEADROOM / 2);
}

/* This process's cgroup v1 memory directory (<mount point><path>); -1 with a reason. */
static int find_own_v1_memory_cgroup(char *dir, size_t size, char *why, size_t why_size) {
    char line[PATH_MAX * 2];
    char path[PATH_MAX], mount_root[PATH_MAX], mount_point[PATH_MAX];
    if (find_line("/proc/self/cgroup", ":memory:", line, sizeof line) != 0) {
        snprintf(why, why_size, "no cgroup v1 memory controller in /proc/self/cgroup");
        return -1;
    }
    format_text(path, sizeof path, "%s", strstr(line, ":memory:") + strlen(":memory:"));
    /* The memory hierarchy's line: fields 4 and 5, super options naming memory. */
    FILE *file = fopen("/proc/self/mountinfo", "re");
    int found = -1;
    while (file && found != 0 && fgets(line, sizeof line, file)) {
        const char *tail = strstr(line, " - cgroup ");
        if (!tail || !strstr(tail, "memory"))
            continue;
        if (sscanf(line, "%*s %*s %*s %4095s %4095s", mount_root, mount_point) == 2 &&
            strcmp(mount_root, "/") == 0 && !strchr(mount_point, '\\'))
            found = 0;
    }
    if (file)
        fclose(file);
    if (found != 0) {
        snprintf(why, why_size, "no cgroup v1 memory hierarchy mounted at its root");
        return -1;
    }
    format_text(dir, size, "%s%s", mount_point, strcmp(path, "/") == 0 ? "" : path);
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(why, why_size, "this process's memory cgroup %s is not visible", dir);
        return -1;
    }
    return 0;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    int result = -1;
    if (fd >= 0) {
        result = write(fd, text, strlen(text)) == (ssize_t)strlen(text) ? 0 : -1;
        if (close(fd) != 0)
            result = -1;
    }
    return result;
}

static int remove_cgroup(const char *dir) {
    for (int attempt = 0; attempt < 100; attempt++) {
        if (rmdir(dir) == 0 || errno == ENOENT)
            return 0;
        if (errno != EBUSY)
            break;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    return -1;
}

static void a_cgroup_v1_memory_limit_on_a_child_process_binds_its_budget(void **state) {
    (void)state;
    char parent[PATH_MAX], dir[PATH_MAX], file[PATH_MAX], leaf[64], number[32], why[PATH_MAX + 64];
    if (find_own_v1_memory_cgroup(parent, sizeof parent, why, sizeof why) != 0) {
        print_message("cannot test a real cgroup v1 limit: %s\n", why);
        skip();
    }
    /* Under this process's own cgroup, so any limit already on it still applies. */
    format_text(leaf, sizeof leaf, "moegen-test-memlimit-%d", (int)getpid());
    format_text(dir, sizeof dir, "%s/%s", parent, leaf);
    if (mkdir(dir, 0755) != 0) {
        print_message("cannot test a real cgroup v1 limit: mkdir %s: %s\n", dir, strerror(errno));
        skip();
    }
    format_text(file, sizeof file, "%s/memory.limit_in_bytes", dir);
    format_text(number, sizeof number, "%llu", (unsigned long long)REAL_CGROUP_LIMIT);
    if (write_file(file, number) != 0) {
        int error = errno;
        (void)remove_cgroup(dir);
        print_message("cannot test a real cgroup v1 limit: writing %s: %s\n", file,
                      strerror(error));
        skip();
    }
    format_text(file, sizeof file, "%s/cgroup.procs", dir);

    int fds[2];
    pid_t pid = -1;
    if (pipe(fds) == 0 && (pid = fork()) == 0) {
        child_report report;
        char own[32];
        memset(&report, 0, sizeof report);
        close(fds[0]);
        snprintf(own, sizeof own, "%d", (int)getpid());
        if (write_file(file, own) != 0) {
            report.stage = 1;
            report.error = errno;
            report_and_exit(fds[1], &report);
        }
        report.status = moegen_memory_budget_read(&report.budget, NULL);
        report_and_exit(fds[1], &report);
    }
    child_report report;
    memset(&report, 0, sizeof report);
    report.stage = -1;
    if (pid > 0) {
        close(fds[1]);
        report = collect_child(pid, fds[0]); /* fails the test only when the child died */
    }
    int removed = remove_cgroup(dir);
    int remove_error = errno;
    if (pid < 0)
        fail_msg("pipe or fork failed: %s", strerror(errno));
    if (removed != 0)
        fail_msg("could not remove the test cgroup %s: %s", dir, strerror(remove_error));
    if (report.stage != 0)
        fail_msg("the child could not join %s: %s", file, strerror(report.error));
    print_message("child in a cgroup limited to 512 MiB: %llu bytes, limited by %s\n",
                  (unsigned long long)report.budget.available_bytes, report.budget.limited_by);
    assert_int_equal(report.status, MOEGEN_OK);
    assert_true(report.budget.available_bytes <= REAL_CGROUP_LIMIT);
    assert_true(report.budget.available_bytes >= REAL_CGROUP_LIMIT / 2);
    assert_true(strncmp(report.budget.limited_by, "cgroup v1 memory.limit_in_bytes of ", 35) == 0);
    char named[80];
    format_text(named, sizeof named, "/%s (512.0 MiB, ", leaf);
    assert_non_null(strstr(report.budget.limited_by, named));
}

#define FIXTURE_TEST(name) cmocka_unit_test_setup_teardown(name, setup_fixture, teardown_fixture)

int main(void) {
    const struct CMUnitTest tests[] = {
        FIXTURE_TEST(a_tree_without_any_source_gives_an_unlimited_budget_from_an_unknown_source),
        FIXTURE_TEST(mem_available_alone_binds_when_there_is_no_other_limit),
        FIXTURE_TEST(a_cgroup_v2_limit_in_a_parent_binds_the_child_cgroup),
        FIXTURE_TEST(cgroup_v2_max_everywhere_is_no_limit_and_mem_available_binds),
        FIXTURE_TEST(cgroup_v2_usage_above_the_limit_gives_zero_bytes),
        FIXTURE_TEST(cgroup_v2_limit_without_a_readable_usage_still_bounds_the_budget),
        FIXTURE_TEST(cgroup_v1_unlimited_sentinel_is_no_limit_for_4k_and_64k_pages),
        FIXTURE_TEST(a_cgroup_v1_limit_binds_and_names_the_cgroup),
        FIXTURE_TEST(a_cgroup_mounted_elsewhere_is_found_through_mountinfo),
        FIXTURE_TEST(a_container_cgroup_not_visible_under_the_mount_uses_the_mount_roots_files),
        FIXTURE_TEST(missing_files_are_skipped_without_an_error),
        FIXTURE_TEST(garbage_in_any_file_is_skipped_without_an_error),
        FIXTURE_TEST(rlimit_as_binds_against_the_virtual_size_in_statm),
        FIXTURE_TEST(rlimit_data_binds_against_vmdata_and_falls_back_to_statm),
        FIXTURE_TEST(a_long_cgroup_path_is_shortened_from_the_left_in_the_message),
        cmocka_unit_test(null_arguments_and_an_empty_root_are_invalid_arguments),
        cmocka_unit_test(byte_counts_are_formatted_in_binary_units_with_one_decimal),
        FIXTURE_TEST(formatting_and_parsing_ignore_a_comma_decimal_locale),
        cmocka_unit_test(the_real_budget_is_read_and_names_a_source),
        cmocka_unit_test(rlimit_as_set_in_a_child_process_binds_its_budget),
        cmocka_unit_test(a_cgroup_v1_memory_limit_on_a_child_process_binds_its_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
