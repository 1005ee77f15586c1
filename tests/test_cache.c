/* test_cache.c — tests of the compile cache (runtime/cache.c) and the host C
 * compiler driver (runtime/host_cc.c).
 *
 * Place in the pipeline: spec -> gen -> [compile -> cache] -> load -> launch.
 * Covers README.md "Compile cache": miss then hit, key separation, every
 * kind of bad entry evicted + rebuilt + warned once, a cold start raced by eight
 * processes, unusable roots (read-only, under a file, a file, group/world-
 * writable, foreign-owned) and failed writes falling back to a temporary build,
 * builder errors passed on, and symlink-safe removal. Then the faults: FIFOs and
 * symlinks to devices in an entry (rebuilt, never blocking), untrusted <kind> and
 * <key[0:2]> directories (never loaded from), logs of failed builds kept where the
 * error says (at most 16 in <root>/failed), a full cache file system (tmpfs of
 * 256 KiB, when mount works) falling back to a temporary build, and eviction of an
 * entry that failed to load. Then the host compiler: probe, a shared object that
 * loads and runs, compile errors, a missing compiler.
 *
 * Invariants: each test works in its own mkdtemp directory, removed afterwards;
 * environment variables a test changes are restored; forked children never use
 * cmocka assertions and leave with _exit().
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "test_support.h"
#include "host_cc.h"
#include "sha256.h"

#define NOBODY_UID 65534
#define COLD_START_PROCESSES 8
#define SKIPPED_EXIT_CODE 77
#define DEADLINE_SECONDS 5
#define FAILED_LOGS_KEPT 16
#define BIG_ARTIFACT_BYTES (4u * 1024 * 1024)

typedef struct log_capture {
    int warnings;
    int notices;
    char last_warning[2048];
} log_capture;

typedef struct fixture {
    char dir[PATH_MAX];     /* this test's own directory */
    char root[PATH_MAX];    /* <dir>/cache, the cache root most tests use */
    char mounted[PATH_MAX]; /* a file system this test mounted ("" when none) */
    log_capture log;
} fixture;

typedef struct text_builder {
    int calls;
    const char *text;
    int sleep_ms;
    moegen_status fail_with; /* MOEGEN_OK: succeed */
    const char *log_text;    /* written to the log path when non-NULL */
    size_t artifact_bytes;   /* > 0: pad the artifact with zeros to this size */
    int hide_errno;          /* report a failed write with native_code 0 */
} text_builder;

/* ---- helpers ------------------------------------------------------------------ */

static void capture_log(void *user, moegen_log_level level, const char *message) {
    log_capture *log = user;
    if (level == MOEGEN_LOG_WARNING) {
        log->warnings++;
        snprintf(log->last_warning, sizeof log->last_warning, "%s", message);
    } else {
        log->notices++;
    }
}

static int setup_fixture(void **state) {
    int result = -1;
    const char *base = getenv("TMPDIR");
    fixture *f = calloc(1, sizeof *f);
    if (!base || base[0] != '/')
        base = "/tmp";
    if (f) {
        format_text(f->dir, sizeof f->dir, "%s/moegen-test-cache-XXXXXX", base);
        if (mkdtemp(f->dir)) {
            format_text(f->root, sizeof f->root, "%s/cache", f->dir);
            result = 0;
        }
    }
    if (result != 0)
        free(f);
    else
        *state = f;
    return result;
}

static int teardown_fixture(void **state) {
    fixture *f = *state;
    if (f->mounted[0])
        (void)umount2(f->mounted, MNT_DETACH);
    (void)chmod(f->root, 0700);
    (void)moegen_remove_tree(f->dir);
    free(f);
    return 0;
}

static void make_key(const char *seed, char key[65]) { moegen_sha256_hex(seed, strlen(seed), key); }

static int write_text_file(const char *path, const char *text) {
    int result = -1;
    FILE *file = fopen(path, "w");
    if (file) {
        result = fputs(text, file) < 0 ? -1 : 0;
        if (fclose(file) != 0)
            result = -1;
    }
    return result;
}

/* Read a whole small file into `out` (NUL-terminated); -1 when unreadable. */
static long read_text_file(const char *path, char *out, size_t size) {
    long length = -1;
    FILE *file = fopen(path, "rb");
    if (file) {
        length = (long)fread(out, 1, size - 1, file);
        out[length] = '\0';
        fclose(file);
    }
    return length;
}

/* Entries in a directory besides . and ..; -1 when it cannot be opened. */
static int count_entries(const char *path) {
    int count = -1;
    DIR *listing = opendir(path);
    if (listing) {
        struct dirent *item;
        count = 0;
        while ((item = readdir(listing)) != NULL)
            if (strcmp(item->d_name, ".") != 0 && strcmp(item->d_name, "..") != 0)
                count++;
        closedir(listing);
    }
    return count;
}

static int path_exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Write `text` then zeros up to `size` bytes (size 0: just the text), with write(2)
 * so that errno is the file system's (ENOSPC). Returns 0 or -1 with errno. */
static int write_sized_file(const char *path, const char *text, size_t size) {
    static const char zeros[65536];
    size_t length = strlen(text);
    int result = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (write(fd, text, length) != (ssize_t)length)
        result = -1;
    for (size_t done = length; result == 0 && done < size;) {
        size_t chunk = size - done < sizeof zeros ? size - done : sizeof zeros;
        ssize_t written = write(fd, zeros, chunk);
        if (written <= 0)
            result = -1;
        else
            done += (size_t)written;
    }
    if (result != 0 && errno == 0)
        errno = EIO;
    int saved = errno;
    if (close(fd) != 0 && result == 0)
        result = -1;
    else
        errno = saved;
    return result;
}

static moegen_status build_text(void *ctx, const char *work_dir, const char *artifact_path,
                                const char *log_path, moegen_error *err) {
    text_builder *b = ctx;
    moegen_status status = MOEGEN_OK;
    b->calls++;
    if (b->sleep_ms > 0) {
        struct timespec pause = {0, (long)b->sleep_ms * 1000000L};
        nanosleep(&pause, NULL);
    }
    if (b->log_text && write_text_file(log_path, b->log_text) != 0)
        status = moegen_error_set(err, MOEGEN_ERR_IO, errno, "test builder cannot write %s",
                                  log_path);
    else if (write_sized_file(artifact_path, b->text, b->artifact_bytes) != 0)
        status = moegen_error_set(err, MOEGEN_ERR_IO, b->hide_errno ? 0 : errno,
                                  "test builder cannot write %s", artifact_path);
    else if (b->fail_with != MOEGEN_OK)
        status = moegen_error_set(err, b->fail_with, 42,
                                  "builder failed on purpose in %s (full log: %s)", work_dir,
                                  log_path);
    return status;
}

static void open_cache(fixture *f, moegen_cache *c) {
    moegen_error err;
    assert_int_equal(moegen_cache_open(c, f->root, capture_log, &f->log, &err), MOEGEN_OK);
}

/* The entry directory of a result (its path without the artifact name). */
static void entry_of(const moegen_cache_result *res, char *out, size_t size) {
    format_text(out, size, "%s", res->path);
    char *slash = strrchr(out, '/');
    if (slash)
        *slash = '\0';
}

/* ---- miss, hit, separation ------------------------------------------------------ */

static void cache_builds_on_a_miss_and_hits_without_building_again(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result first, second;
    moegen_error err;
    text_builder b = {.text = "artifact one\n"};
    char key[65], text[256], entry[PATH_MAX], manifest[PATH_MAX];
    struct stat st;
    make_key("miss-then-hit", key);
    open_cache(f, &c);
    assert_true(c.usable);
    assert_int_equal(f->log.warnings, 0);

    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &first, &err),
                     MOEGEN_OK);
    assert_int_equal(b.calls, 1);
    assert_false(first.hit);
    assert_false(first.rebuilt_corrupt);
    assert_string_equal(first.temp_dir, "");
    assert_true(read_text_file(first.path, text, sizeof text) > 0);
    assert_string_equal(text, b.text);
    assert_non_null(strstr(first.path, key));

    entry_of(&first, entry, sizeof entry);
    assert_int_equal(stat(entry, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0700);
    assert_int_equal(stat(first.path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    format_text(manifest, sizeof manifest, "%s/manifest", entry);
    assert_int_equal(stat(manifest, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);

    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &second, &err),
                     MOEGEN_OK);
    assert_int_equal(b.calls, 1);
    assert_true(second.hit);
    assert_string_equal(second.path, first.path);
    assert_int_equal(f->log.warnings, 0);
    moegen_cache_result_release(&first);
    moegen_cache_result_release(&second);
}

static void cache_separates_entries_by_kind_and_by_key(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result cpu_a, cuda_a, cpu_b, again;
    moegen_error err;
    text_builder one = {.text = "cpu a\n"}, two = {.text = "cuda a\n"}, three = {.text = "cpu b\n"};
    char key_a[65], key_b[65], text[64];
    make_key("key a", key_a);
    make_key("key b", key_b);
    open_cache(f, &c);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key_a, "module.so", build_text, &one, &cpu_a, &err), MOEGEN_OK);
    assert_int_equal(
        moegen_cache_get(&c, "cuda", key_a, "module.so", build_text, &two, &cuda_a, &err),
        MOEGEN_OK);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key_b, "module.so", build_text, &three, &cpu_b, &err),
        MOEGEN_OK);
    assert_int_equal(one.calls + two.calls + three.calls, 3);
    assert_string_not_equal(cpu_a.path, cuda_a.path);
    assert_string_not_equal(cpu_a.path, cpu_b.path);
    read_text_file(cpu_a.path, text, sizeof text);
    assert_string_equal(text, "cpu a\n");
    read_text_file(cuda_a.path, text, sizeof text);
    assert_string_equal(text, "cuda a\n");
    read_text_file(cpu_b.path, text, sizeof text);
    assert_string_equal(text, "cpu b\n");
    assert_int_equal(
        moegen_cache_get(&c, "cuda", key_a, "module.so", build_text, &two, &again, &err),
        MOEGEN_OK);
    assert_true(again.hit);
    assert_string_equal(again.path, cuda_a.path);
    assert_int_equal(two.calls, 1);
    assert_int_equal(f->log.warnings, 0);
}

/* ---- bad entries ------------------------------------------------------------------ */

typedef void (*corrupt_fn)(const char *entry, const char *artifact);

static void truncate_artifact(const char *entry, const char *artifact) {
    struct stat st;
    assert_int_equal(stat(artifact, &st), 0);
    assert_int_equal(truncate(artifact, st.st_size / 2), 0);
}

static void overwrite_artifact_with_random_bytes(const char *entry, const char *artifact) {
    struct stat st;
    uint64_t state = 0x9e3779b97f4a7c15ull;
    assert_int_equal(stat(artifact, &st), 0);
    FILE *file = fopen(artifact, "r+b");
    assert_non_null(file);
    for (off_t i = 0; i < st.st_size; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        fputc((int)(state & 0xff), file);
    }
    assert_int_equal(fclose(file), 0);
}

static void change_manifest_hash(const char *entry, const char *artifact) {
    char path[PATH_MAX], text[1024];
    format_text(path, sizeof path, "%s/manifest", entry);
    assert_true(read_text_file(path, text, sizeof text) > 0);
    char *hash = strstr(text, "sha256 ");
    assert_non_null(hash);
    hash += strlen("sha256 ");
    *hash = *hash == '0' ? '1' : '0';
    assert_int_equal(write_text_file(path, text), 0);
}

static void remove_manifest(const char *entry, const char *artifact) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/manifest", entry);
    assert_int_equal(unlink(path), 0);
}

static void replace_manifest_with_garbage(const char *entry, const char *artifact) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/manifest", entry);
    assert_int_equal(write_text_file(path, "this is not a manifest\n\x01\x02\x03 size 12\n"), 0);
}

/* Build, damage the entry, and check the next get evicts, rebuilds, warns once
 * and that the get after that is a clean hit. */
static void check_bad_entry_is_rebuilt(fixture *f, corrupt_fn corrupt, const char *why_part) {
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "a healthy artifact with enough bytes to cut in half\n"};
    char key[65], entry[PATH_MAX], text[256], tmp[PATH_MAX];
    make_key(why_part, key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    entry_of(&res, entry, sizeof entry);
    corrupt(entry, res.path);

    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    assert_int_equal(b.calls, 2);
    assert_false(res.hit);
    assert_true(res.rebuilt_corrupt);
    assert_string_equal(res.temp_dir, "");
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "was corrupt"));
    assert_non_null(strstr(f->log.last_warning, entry));
    assert_non_null(strstr(f->log.last_warning, "rebuilt"));
    if (!strstr(f->log.last_warning, why_part))
        fail_msg("warning '%s' does not say '%s'", f->log.last_warning, why_part);
    assert_true(read_text_file(res.path, text, sizeof text) > 0);
    assert_string_equal(text, b.text);
    format_text(tmp, sizeof tmp, "%s/tmp", c.root);
    assert_int_equal(count_entries(tmp), 0);

    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    assert_true(res.hit);
    assert_int_equal(b.calls, 2);
    assert_int_equal(f->log.warnings, 1);
}

static void cache_rebuilds_a_truncated_entry_and_warns_once(void **state) {
    check_bad_entry_is_rebuilt(*state, truncate_artifact, "bytes, manifest says");
}

static void cache_rebuilds_an_entry_of_random_bytes_and_warns_once(void **state) {
    check_bad_entry_is_rebuilt(*state, overwrite_artifact_with_random_bytes, "SHA-256");
}

static void cache_rebuilds_an_entry_whose_manifest_hash_is_wrong_and_warns_once(void **state) {
    check_bad_entry_is_rebuilt(*state, change_manifest_hash, "does not match the manifest");
}

static void cache_rebuilds_an_entry_without_a_manifest_and_warns_once(void **state) {
    check_bad_entry_is_rebuilt(*state, remove_manifest, "manifest missing");
}

static void cache_rebuilds_an_entry_with_a_garbage_manifest_and_warns_once(void **state) {
    check_bad_entry_is_rebuilt(*state, replace_manifest_with_garbage, "manifest malformed");
}

static void cache_rebuilds_an_entry_filed_under_the_wrong_key(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result a, b_res;
    moegen_error err;
    text_builder a_builder = {.text = "artifact a\n"}, b_builder = {.text = "artifact b\n"};
    char key_a[65], key_b[65], entry_a[PATH_MAX], entry_b[PATH_MAX], text[64];
    make_key("wrong key a", key_a);
    make_key("wrong key b", key_b);
    open_cache(f, &c);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key_a, "module.so", build_text, &a_builder, &a, &err),
        MOEGEN_OK);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key_b, "module.so", build_text, &b_builder, &b_res, &err),
        MOEGEN_OK);
    entry_of(&a, entry_a, sizeof entry_a);
    entry_of(&b_res, entry_b, sizeof entry_b);
    /* a complete, self-consistent entry for key a under key b's name */
    assert_int_equal(moegen_remove_tree(entry_b), 0);
    assert_int_equal(rename(entry_a, entry_b), 0);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key_b, "module.so", build_text, &b_builder, &b_res, &err),
        MOEGEN_OK);
    assert_true(b_res.rebuilt_corrupt);
    assert_int_equal(b_builder.calls, 2);
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "manifest is for key"));
    read_text_file(b_res.path, text, sizeof text);
    assert_string_equal(text, "artifact b\n");
}

static void cache_rebuilds_an_entry_that_is_a_symlink(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "real\n"};
    char key[65], entry[PATH_MAX], elsewhere[PATH_MAX], planted[PATH_MAX], text[64];
    make_key("symlink entry", key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    entry_of(&res, entry, sizeof entry);
    /* move the (valid) entry elsewhere and link to it: never trusted */
    format_text(elsewhere, sizeof elsewhere, "%s/elsewhere", f->dir);
    assert_int_equal(rename(entry, elsewhere), 0);
    assert_int_equal(symlink(elsewhere, entry), 0);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    assert_true(res.rebuilt_corrupt);
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "not a directory"));
    read_text_file(res.path, text, sizeof text);
    assert_string_equal(text, "real\n");
    format_text(planted, sizeof planted, "%s/module.so", elsewhere);
    assert_true(path_exists(planted)); /* eviction removed the link, not its target */
}

/* ---- concurrency ---------------------------------------------------------------- */

/* One racer of the cold start. Waits on `start_fd` so all begin together.
 * Returns 0 on success, else a code that says what went wrong. */
static int race_for_one_key(const char *root, const char *key, int start_fd) {
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    log_capture log = {0};
    text_builder b = {.text = "the shared artifact\n", .sleep_ms = 30};
    char go, text[64];
    int code = 0;
    if (read(start_fd, &go, 1) < 0)
        code = 1;
    else if (moegen_cache_open(&c, root, capture_log, &log, &err) != MOEGEN_OK || !c.usable)
        code = 2;
    else if (moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err) != MOEGEN_OK)
        code = 3;
    else if (read_text_file(res.path, text, sizeof text) < 0 || strcmp(text, b.text) != 0)
        code = 4;
    else if (res.temp_dir[0] != '\0')
        code = 5;
    else if (log.warnings != 0)
        code = 6;
    if (code != 0)
        fprintf(stderr, "cold-start racer %d failed with code %d (%s) %s\n", (int)getpid(), code,
                err.message, log.last_warning);
    return code;
}

static void cache_cold_start_in_eight_processes_leaves_one_entry_and_no_temporaries(void **state) {
    fixture *f = *state;
    pid_t children[COLD_START_PROCESSES];
    int start[2];
    char key[65], parent[PATH_MAX], tmp[PATH_MAX], entry[PATH_MAX];
    make_key("cold start", key);
    assert_int_equal(pipe(start), 0);
    for (int i = 0; i < COLD_START_PROCESSES; i++) {
        children[i] = fork();
        assert_true(children[i] >= 0);
        if (children[i] == 0) {
            close(start[1]);
            _exit(race_for_one_key(f->root, key, start[0]));
        }
    }
    close(start[0]);
    close(start[1]); /* every racer's read returns now */
    for (int i = 0; i < COLD_START_PROCESSES; i++) {
        int status = 0;
        assert_int_equal(waitpid(children[i], &status, 0), children[i]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    format_text(parent, sizeof parent, "%s/cpu/%.2s", f->root, key);
    format_text(entry, sizeof entry, "%s/%s", parent, key);
    format_text(tmp, sizeof tmp, "%s/tmp", f->root);
    assert_int_equal(count_entries(parent), 1);
    assert_true(path_exists(entry));
    assert_int_equal(count_entries(tmp), 0);
}

/* ---- unusable roots and failed writes -------------------------------------------- */

/* Open `root`, expect it unusable with one warning containing `why_part`, and
 * check two gets still succeed through removable temporary directories.
 * No cmocka assertions (also runs in a forked child): returns 0 or a failure code. */
static int unusable_cache_still_builds(const char *root, const char *why_part) {
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    log_capture log = {0};
    text_builder b = {.text = "uncached\n"};
    char key[65], text[64];
    int code = 0;
    make_key("unusable", key);
    if (moegen_cache_open(&c, root, capture_log, &log, &err) != MOEGEN_OK)
        code = 1;
    else if (c.usable)
        code = 2;
    else if (log.warnings != 1 || !strstr(log.last_warning, why_part) ||
             !strstr(log.last_warning, "temporary directory"))
        code = 3;
    for (int round = 0; code == 0 && round < 2; round++) {
        size_t dir_length;
        if (moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err) != MOEGEN_OK)
            code = 4;
        else if (res.temp_dir[0] == '\0' || res.hit)
            code = 5;
        else if ((dir_length = strlen(res.temp_dir)) == 0 ||
                 strncmp(res.path, res.temp_dir, dir_length) != 0 || res.path[dir_length] != '/')
            code = 6;
        else if (strncmp(res.temp_dir, root, strlen(root)) == 0)
            code = 7;
        else if (read_text_file(res.path, text, sizeof text) < 0 || strcmp(text, b.text) != 0)
            code = 8;
        if (code == 0) {
            char removed[PATH_MAX];
            snprintf(removed, sizeof removed, "%s", res.temp_dir);
            moegen_cache_result_release(&res);
            if (path_exists(removed) || res.temp_dir[0] != '\0')
                code = 9;
        }
    }
    if (code == 0 && (log.warnings != 1 || b.calls != 2))
        code = 10;
    if (code != 0)
        fprintf(stderr, "unusable cache check failed with code %d; warning: '%s'; error: '%s'\n",
                code, log.last_warning, err.message);
    return code;
}

static void cache_in_a_read_only_root_builds_in_a_temporary_directory(void **state) {
    fixture *f = *state;
    assert_int_equal(mkdir(f->root, 0700), 0);
    if (geteuid() != 0) {
        assert_int_equal(chmod(f->root, 0500), 0);
        assert_int_equal(unusable_cache_still_builds(f->root, "not writable"), 0);
    } else {
        /* Root ignores permission bits, so the check runs in a child that gives
         * up root and sees a 0500 root it owns. */
        int status = 0;
        assert_int_equal(chown(f->root, NOBODY_UID, NOBODY_UID), 0);
        assert_int_equal(chmod(f->root, 0500), 0);
        assert_int_equal(chmod(f->dir, 0711), 0);
        pid_t child = fork();
        assert_true(child >= 0);
        if (child == 0) {
            if (setgroups(0, NULL) != 0 || setgid(NOBODY_UID) != 0 || setuid(NOBODY_UID) != 0)
                _exit(SKIPPED_EXIT_CODE);
            _exit(unusable_cache_still_builds(f->root, "not writable"));
        }
        assert_int_equal(waitpid(child, &status, 0), child);
        assert_true(WIFEXITED(status));
        if (WEXITSTATUS(status) == SKIPPED_EXIT_CODE) {
            print_message("running as root and cannot drop to uid %d: read-only root "
                          "not testable here\n",
                          NOBODY_UID);
            skip();
        }
        assert_int_equal(WEXITSTATUS(status), 0);
    }
}

static void cache_under_a_regular_file_is_unusable_but_still_builds(void **state) {
    fixture *f = *state;
    char file[PATH_MAX], root[PATH_MAX];
    format_text(file, sizeof file, "%s/plain-file", f->dir);
    format_text(root, sizeof root, "%s/cache", file);
    assert_int_equal(write_text_file(file, "x"), 0);
    assert_int_equal(unusable_cache_still_builds(root, "cannot create it"), 0);
}

static void cache_root_that_is_a_regular_file_is_unusable_but_still_builds(void **state) {
    fixture *f = *state;
    assert_int_equal(write_text_file(f->root, "x"), 0);
    assert_int_equal(unusable_cache_still_builds(f->root, "not a directory"), 0);
}

static void
cache_group_writable_root_is_unusable_and_the_temporary_build_is_released(void **state) {
    fixture *f = *state;
    assert_int_equal(mkdir(f->root, 0700), 0);
    assert_int_equal(chmod(f->root, 0770), 0);
    assert_int_equal(unusable_cache_still_builds(f->root, "group-writable"), 0);
}

static void
cache_world_writable_root_is_unusable_and_the_temporary_build_is_released(void **state) {
    fixture *f = *state;
    assert_int_equal(mkdir(f->root, 0700), 0);
    assert_int_equal(chmod(f->root, 0777), 0);
    assert_int_equal(unusable_cache_still_builds(f->root, "world-writable"), 0);
}

static void cache_foreign_owned_root_is_unusable_but_still_builds(void **state) {
    fixture *f = *state;
    if (geteuid() != 0) {
        print_message("not root: cannot give the cache root to another user\n");
        skip();
    }
    assert_int_equal(mkdir(f->root, 0700), 0);
    assert_int_equal(chown(f->root, NOBODY_UID, NOBODY_UID), 0);
    assert_int_equal(unusable_cache_still_builds(f->root, "owned by uid 65534"), 0);
}

static void cache_under_a_parent_others_can_write_is_unusable_unless_it_is_sticky(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_error err;
    log_capture log = {0};
    char shared[PATH_MAX], root[PATH_MAX];
    format_text(shared, sizeof shared, "%s/shared", f->dir);
    format_text(root, sizeof root, "%s/cache", shared);
    assert_int_equal(mkdir(shared, 0700), 0);
    assert_int_equal(chmod(shared, 0777), 0);
    assert_int_equal(unusable_cache_still_builds(root, "is writable by others"), 0);
    assert_int_equal(chmod(shared, 01777), 0); /* like /tmp: nobody can move our root */
    assert_int_equal(moegen_cache_open(&c, root, capture_log, &log, &err), MOEGEN_OK);
    assert_true(c.usable);
    assert_int_equal(log.warnings, 0);
}

static void cache_falls_back_to_a_temporary_directory_when_a_write_fails(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "written elsewhere\n"};
    char key[65], blocker[PATH_MAX], text[64], kept[PATH_MAX];
    make_key("write fails", key);
    open_cache(f, &c);
    assert_true(c.usable);
    /* after open, make <root>/cpu impossible to create */
    format_text(blocker, sizeof blocker, "%s/cpu", c.root);
    assert_int_equal(write_text_file(blocker, "in the way"), 0);
    for (int round = 0; round < 2; round++) {
        assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                         MOEGEN_OK);
        assert_string_not_equal(res.temp_dir, "");
        read_text_file(res.path, text, sizeof text);
        assert_string_equal(text, b.text);
        format_text(kept, sizeof kept, "%s", res.temp_dir);
        moegen_cache_result_release(&res);
        assert_false(path_exists(kept));
    }
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "could not write"));
}

static void cache_without_a_log_callback_warns_on_stderr(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_error err;
    char captured[PATH_MAX], text[2048];
    int saved_stderr, capture_fd;
    assert_int_equal(mkdir(f->root, 0700), 0);
    assert_int_equal(chmod(f->root, 0777), 0);
    format_text(captured, sizeof captured, "%s/stderr.txt", f->dir);
    fflush(stderr);
    saved_stderr = dup(2);
    capture_fd = open(captured, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(saved_stderr >= 0 && capture_fd >= 0);
    dup2(capture_fd, 2);
    moegen_status status = moegen_cache_open(&c, f->root, NULL, NULL, &err);
    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    close(capture_fd);
    assert_int_equal(status, MOEGEN_OK);
    assert_true(read_text_file(captured, text, sizeof text) > 0);
    assert_true(strncmp(text, "moegen: warning: cache directory ", 33) == 0);
    assert_non_null(strstr(text, "world-writable"));
    assert_non_null(strstr(text, "temporary directory"));
    assert_ptr_equal(strchr(text, '\n'), text + strlen(text) - 1); /* exactly one line */
}

/* ---- builder errors, arguments, housekeeping --------------------------------------- */

static void cache_passes_a_builder_error_on_unchanged_and_publishes_nothing(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "half-made\n", .fail_with = MOEGEN_ERR_COMPILE};
    char key[65], parent[PATH_MAX], tmp[PATH_MAX];
    make_key("builder fails", key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_ERR_COMPILE);
    assert_int_equal(err.code, MOEGEN_ERR_COMPILE);
    assert_int_equal(err.native_code, 42);
    assert_non_null(strstr(err.message, "builder failed on purpose"));
    assert_string_equal(res.path, "");
    assert_string_equal(res.temp_dir, "");
    format_text(parent, sizeof parent, "%s/cpu/%.2s", c.root, key);
    format_text(tmp, sizeof tmp, "%s/tmp", c.root);
    assert_true(count_entries(parent) <= 0);
    assert_int_equal(count_entries(tmp), 0);
    assert_int_equal(f->log.warnings, 0);
}

static void cache_rejects_malformed_kinds_keys_and_artifact_names(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "never\n"};
    char key[65], upper[65];
    make_key("arguments", key);
    format_text(upper, sizeof upper, "%s", key);
    for (char *p = upper; *p; p++)
        if (*p >= 'a' && *p <= 'f')
            *p = (char)(*p - 'a' + 'A');
    open_cache(f, &c);
    const char *kinds[] = {"", "a/b", "tmp", "..", "CPU"};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        assert_int_equal(
            moegen_cache_get(&c, kinds[i], key, "module.so", build_text, &b, &res, &err),
            MOEGEN_ERR_INVALID_ARGUMENT);
    const char *keys[] = {"", "abc", upper, "../../../../../../../../etc"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        assert_int_equal(
            moegen_cache_get(&c, "cpu", keys[i], "module.so", build_text, &b, &res, &err),
            MOEGEN_ERR_INVALID_ARGUMENT);
    const char *names[] = {"", "../module.so", "a/b.so", "manifest", ".hidden", NULL};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        assert_int_equal(moegen_cache_get(&c, "cpu", key, names[i], build_text, &b, &res, &err),
                         MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", NULL, &b, &res, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, NULL, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_open(NULL, f->root, NULL, NULL, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(b.calls, 0);
}

static void cache_removes_work_directories_left_by_crashed_processes(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "x\n"};
    char key[65], old_dir[PATH_MAX], old_file[PATH_MAX], fresh_dir[PATH_MAX];
    struct timespec two_hours_ago[2];
    make_key("stale", key);
    open_cache(f, &c);
    format_text(old_dir, sizeof old_dir, "%s/tmp/%s.99999.AbCdEf", c.root, key);
    format_text(old_file, sizeof old_file, "%s/module.so", old_dir);
    format_text(fresh_dir, sizeof fresh_dir, "%s/tmp/%s.99998.GhIjKl", c.root, key);
    assert_int_equal(mkdir(old_dir, 0700), 0);
    assert_int_equal(write_text_file(old_file, "partial"), 0);
    assert_int_equal(mkdir(fresh_dir, 0700), 0);
    clock_gettime(CLOCK_REALTIME, &two_hours_ago[0]);
    two_hours_ago[0].tv_sec -= 7200;
    two_hours_ago[1] = two_hours_ago[0];
    assert_int_equal(utimensat(AT_FDCWD, old_dir, two_hours_ago, 0), 0);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    assert_false(path_exists(old_dir));
    assert_true(path_exists(fresh_dir)); /* might be another process's build in progress */
}

/* Set or unset an environment variable (value NULL: unset). */
static void set_env(const char *name, const char *value) {
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
}

static char *saved_env(const char *name) {
    const char *value = getenv(name);
    return value ? strdup(value) : NULL;
}

static void cache_resolves_its_root_from_the_environment(void **state) {
    fixture *f = *state;
    const char *names[] = {"MOEGEN_CACHE_DIR", "XDG_CACHE_HOME", "HOME"};
    char *saved[3];
    char real_dir[PATH_MAX], value[PATH_MAX], expected[PATH_MAX];
    moegen_cache c;
    moegen_error err;
    log_capture log = {0};
    for (int i = 0; i < 3; i++)
        saved[i] = saved_env(names[i]);
    assert_non_null(realpath(f->dir, real_dir));

    format_text(value, sizeof value, "%s/from-env", f->dir);
    set_env("MOEGEN_CACHE_DIR", value);
    assert_int_equal(moegen_cache_open(&c, NULL, capture_log, &log, &err), MOEGEN_OK);
    format_text(expected, sizeof expected, "%s/from-env", real_dir);
    assert_true(c.usable);
    assert_string_equal(c.root, expected);

    set_env("MOEGEN_CACHE_DIR", NULL);
    format_text(value, sizeof value, "%s/xdg", f->dir);
    set_env("XDG_CACHE_HOME", value);
    assert_int_equal(moegen_cache_open(&c, NULL, capture_log, &log, &err), MOEGEN_OK);
    format_text(expected, sizeof expected, "%s/xdg/moegen", real_dir);
    assert_string_equal(c.root, expected);

    set_env("XDG_CACHE_HOME", "relative/ignored");
    format_text(value, sizeof value, "%s/home", f->dir);
    set_env("HOME", value);
    assert_int_equal(moegen_cache_open(&c, NULL, capture_log, &log, &err), MOEGEN_OK);
    format_text(expected, sizeof expected, "%s/home/.cache/moegen", real_dir);
    assert_true(c.usable);
    assert_string_equal(c.root, expected);
    assert_int_equal(log.warnings, 0);

    set_env("XDG_CACHE_HOME", NULL);
    set_env("HOME", NULL);
    assert_int_equal(moegen_cache_open(&c, NULL, capture_log, &log, &err), MOEGEN_OK);
    assert_false(c.usable);
    assert_int_equal(log.warnings, 1);
    assert_non_null(strstr(log.last_warning, "HOME"));

    for (int i = 0; i < 3; i++) {
        set_env(names[i], saved[i]);
        free(saved[i]);
    }
}

static void remove_tree_does_not_follow_a_symlink_to_outside(void **state) {
    fixture *f = *state;
    char outside[PATH_MAX], keep[PATH_MAX], tree[PATH_MAX], sub[PATH_MAX], link_path[PATH_MAX],
        lone_link[PATH_MAX];
    format_text(outside, sizeof outside, "%s/outside", f->dir);
    format_text(keep, sizeof keep, "%s/keep.txt", outside);
    format_text(tree, sizeof tree, "%s/tree", f->dir);
    format_text(sub, sizeof sub, "%s/sub", tree);
    assert_int_equal(mkdir(outside, 0700), 0);
    assert_int_equal(write_text_file(keep, "keep me"), 0);
    assert_int_equal(mkdir(tree, 0700), 0);
    assert_int_equal(mkdir(sub, 0500), 0); /* read-only subdirectory, still removable */
    format_text(link_path, sizeof link_path, "%s/to-outside-dir", tree);
    assert_int_equal(symlink(outside, link_path), 0);
    format_text(link_path, sizeof link_path, "%s/to-outside-file", tree);
    assert_int_equal(symlink(keep, link_path), 0);
    format_text(link_path, sizeof link_path, "%s/dangling", tree);
    assert_int_equal(symlink("/nonexistent/moegen", link_path), 0);
    assert_int_equal(chmod(sub, 0700), 0);
    format_text(link_path, sizeof link_path, "%s/file.txt", sub);
    assert_int_equal(write_text_file(link_path, "inner"), 0);
    assert_int_equal(chmod(sub, 0500), 0);

    assert_int_equal(moegen_remove_tree(tree), 0);
    assert_false(path_exists(tree));
    assert_true(path_exists(keep));

    /* a symlink given as the tree itself: the link goes, its target stays */
    format_text(lone_link, sizeof lone_link, "%s/lone-link", f->dir);
    assert_int_equal(symlink(outside, lone_link), 0);
    assert_int_equal(moegen_remove_tree(lone_link), 0);
    assert_false(path_exists(lone_link));
    assert_true(path_exists(keep));
    assert_int_equal(moegen_remove_tree(tree), 0); /* already gone */
}

/* ---- special files in an entry: rebuilt, never blocking ------------------------------ */

typedef int (*child_check_fn)(void *arg);

/* Run `check` in a forked child that SIGALRM kills after DEADLINE_SECONDS, so that a
 * call blocking forever (an open of a FIFO) fails this test instead of hanging it.
 * Returns the child's exit code. */
static int run_in_child_with_deadline(child_check_fn check, void *arg) {
    int status = 0;
    fflush(NULL);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        alarm(DEADLINE_SECONDS);
        _exit(check(arg));
    }
    assert_int_equal(waitpid(child, &status, 0), child);
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        fail_msg("the cache call blocked for %d s (an open that waits on a FIFO?)",
                 DEADLINE_SECONDS);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

typedef struct rebuild_expectation {
    const char *root, *key, *text, *why_part;
} rebuild_expectation;

/* Open the cache and expect the next get to evict, rebuild and warn once (naming
 * why_part), and the one after to hit. No cmocka assertions (runs in a child):
 * returns 0 or a failure code. */
static int get_rebuilds_once_with_one_warning(void *arg) {
    const rebuild_expectation *x = arg;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    log_capture log = {0};
    text_builder b = {.text = x->text};
    char text[256];
    int code = 0;
    memset(&err, 0, sizeof err);
    if (moegen_cache_open(&c, x->root, capture_log, &log, &err) != MOEGEN_OK || !c.usable)
        code = 1;
    else if (moegen_cache_get(&c, "cpu", x->key, "module.so", build_text, &b, &res, &err) !=
             MOEGEN_OK)
        code = 2;
    else if (!res.rebuilt_corrupt || res.hit || res.temp_dir[0] != '\0')
        code = 3;
    else if (b.calls != 1 || log.warnings != 1 || !strstr(log.last_warning, "was corrupt") ||
             !strstr(log.last_warning, x->why_part))
        code = 4;
    else if (read_text_file(res.path, text, sizeof text) < 0 || strcmp(text, x->text) != 0)
        code = 5;
    else if (moegen_cache_get(&c, "cpu", x->key, "module.so", build_text, &b, &res, &err) !=
                 MOEGEN_OK ||
             !res.hit || b.calls != 1 || log.warnings != 1)
        code = 6;
    if (code != 0)
        fprintf(stderr, "rebuild check failed with code %d; warning: '%s'; error: '%s'\n", code,
                log.last_warning, err.message);
    return code;
}

static void manifest_becomes_a_fifo(const char *entry, const char *artifact) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/manifest", entry);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(mkfifo(path, 0600), 0);
}

static void artifact_becomes_a_fifo(const char *entry, const char *artifact) {
    assert_int_equal(unlink(artifact), 0);
    assert_int_equal(mkfifo(artifact, 0600), 0);
}

static void artifact_becomes_a_symlink_to_dev_zero(const char *entry, const char *artifact) {
    assert_int_equal(unlink(artifact), 0);
    assert_int_equal(symlink("/dev/zero", artifact), 0);
}

static void manifest_becomes_a_symlink_to_dev_null(const char *entry, const char *artifact) {
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/manifest", entry);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(symlink("/dev/null", path), 0);
}

/* Publish an entry, replace one of its files with `plant`, and check (in a child
 * with a deadline) that the next get rebuilds it with one warning, not blocking. */
static void check_special_file_is_rebuilt_without_blocking(fixture *f, corrupt_fn plant,
                                                           const char *why_part) {
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "a regular artifact\n"};
    char key[65], entry[PATH_MAX], text[64];
    struct stat st;
    make_key(why_part, key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    entry_of(&res, entry, sizeof entry);
    plant(entry, res.path);
    rebuild_expectation x = {c.root, key, b.text, why_part};
    assert_int_equal(run_in_child_with_deadline(get_rebuilds_once_with_one_warning, &x), 0);
    assert_int_equal(lstat(res.path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_true(read_text_file(res.path, text, sizeof text) > 0);
    assert_string_equal(text, b.text);
}

static void cache_rebuilds_an_entry_whose_manifest_is_a_fifo_without_blocking(void **state) {
    check_special_file_is_rebuilt_without_blocking(*state, manifest_becomes_a_fifo,
                                                   "manifest is not a small regular file");
}

static void cache_rebuilds_an_entry_whose_artifact_is_a_fifo_without_blocking(void **state) {
    check_special_file_is_rebuilt_without_blocking(*state, artifact_becomes_a_fifo,
                                                   "artifact module.so is not a regular file");
}

static void cache_rebuilds_an_entry_whose_artifact_is_a_symlink_to_dev_zero(void **state) {
    check_special_file_is_rebuilt_without_blocking(*state, artifact_becomes_a_symlink_to_dev_zero,
                                                   "artifact module.so is a symbolic link");
}

static void cache_rebuilds_an_entry_whose_manifest_is_a_symlink_to_dev_null(void **state) {
    check_special_file_is_rebuilt_without_blocking(*state, manifest_becomes_a_symlink_to_dev_null,
                                                   "manifest is a symbolic link");
}

/* ---- untrusted directories on the way to an entry ------------------------------------ */

/* Publish a valid entry with `text` in a second cache at <dir>/other and return the
 * path of its <kind>/<key[0:2]> directory in `prefix_dir`. */
static void publish_elsewhere(fixture *f, const char *key, const char *text, char *prefix_dir,
                              size_t size) {
    moegen_cache other;
    moegen_cache_result res;
    moegen_error err;
    log_capture log = {0};
    text_builder b = {.text = text};
    char other_root[PATH_MAX];
    format_text(other_root, sizeof other_root, "%s/other", f->dir);
    assert_int_equal(moegen_cache_open(&other, other_root, capture_log, &log, &err), MOEGEN_OK);
    assert_true(other.usable);
    assert_int_equal(
        moegen_cache_get(&other, "cpu", key, "module.so", build_text, &b, &res, &err), MOEGEN_OK);
    format_text(prefix_dir, size, "%s/cpu/%.2s", other.root, key);
}

/* Two gets through `c` must build uncached (never returning anything under
 * `planted`), with one warning naming `why_part`. */
static void check_nothing_is_loaded_from(fixture *f, moegen_cache *c, const char *key,
                                         const char *planted, const char *why_part) {
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "built here\n"};
    char text[64], kept[PATH_MAX];
    for (int round = 0; round < 2; round++) {
        assert_int_equal(moegen_cache_get(c, "cpu", key, "module.so", build_text, &b, &res, &err),
                         MOEGEN_OK);
        assert_false(res.hit);
        assert_string_not_equal(res.temp_dir, "");
        assert_true(strncmp(res.path, planted, strlen(planted)) != 0);
        assert_true(read_text_file(res.path, text, sizeof text) > 0);
        assert_string_equal(text, b.text);
        format_text(kept, sizeof kept, "%s", res.temp_dir);
        moegen_cache_result_release(&res);
        assert_false(path_exists(kept));
    }
    assert_int_equal(b.calls, 2);
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "temporary directory"));
    if (!strstr(f->log.last_warning, why_part))
        fail_msg("warning '%s' does not say '%s'", f->log.last_warning, why_part);
}

static void
cache_never_loads_from_a_kind_directory_that_is_a_symlink_to_a_world_writable_one(void **state) {
    fixture *f = *state;
    moegen_cache c;
    char key[65], planted[PATH_MAX], prefix_dir[PATH_MAX], moved[PATH_MAX], kind_link[PATH_MAX],
        planted_artifact[PATH_MAX];
    struct stat st;
    make_key("planted under a symlinked kind", key);
    format_text(planted, sizeof planted, "%s/planted-XXXXXX", f->dir);
    assert_non_null(mkdtemp(planted));
    /* a complete, self-consistent entry, as anyone could write into a 0777 directory */
    publish_elsewhere(f, key, "planted\n", prefix_dir, sizeof prefix_dir);
    format_text(moved, sizeof moved, "%s/%.2s", planted, key);
    assert_int_equal(rename(prefix_dir, moved), 0);
    assert_int_equal(chmod(planted, 0777), 0);
    format_text(planted_artifact, sizeof planted_artifact, "%s/%s/module.so", moved, key);
    assert_true(path_exists(planted_artifact));

    open_cache(f, &c);
    format_text(kind_link, sizeof kind_link, "%s/cpu", c.root);
    assert_int_equal(symlink(planted, kind_link), 0);
    check_nothing_is_loaded_from(f, &c, key, planted, "symbolic link");
    assert_int_equal(lstat(kind_link, &st), 0); /* not ours to delete */
    assert_true(S_ISLNK(st.st_mode));
    assert_true(path_exists(planted_artifact));
}

static void cache_never_loads_from_a_key_prefix_directory_others_can_write(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "published\n"};
    char key[65], prefix_dir[PATH_MAX], entry[PATH_MAX];
    make_key("group-writable key prefix", key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    entry_of(&res, entry, sizeof entry);
    format_text(prefix_dir, sizeof prefix_dir, "%s/cpu/%.2s", c.root, key);
    assert_int_equal(chmod(prefix_dir, 0770), 0);
    check_nothing_is_loaded_from(f, &c, key, prefix_dir, "group-writable");
    assert_true(path_exists(entry)); /* left alone, not deleted */
}

/* ---- logs of failed builds ---------------------------------------------------------- */

/* The path after "full log: " in an error message, up to ')'. */
static void log_path_of(const char *message, char *out, size_t size) {
    const char *start = strstr(message, "full log: ");
    if (!start)
        fail_msg("error message names no log: %s", message);
    start += strlen("full log: ");
    const char *end = strchr(start, ')');
    if (!end)
        fail_msg("error message's log path is not closed: %s", message);
    format_text(out, size, "%.*s", (int)(end - start), start);
}

static void check_private_file(const char *path, const char *text) {
    struct stat st;
    char content[512];
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_uid, geteuid());
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_true(read_text_file(path, content, sizeof content) >= 0);
    assert_string_equal(content, text);
}

static void cache_keeps_the_log_of_a_failed_build_where_the_error_message_says(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "half-made\n",
                      .fail_with = MOEGEN_ERR_COMPILE,
                      .log_text = "error: the widget does not fit\n"};
    char key[65], named[PATH_MAX], expected[PATH_MAX], failed[PATH_MAX], tmp[PATH_MAX];
    struct stat st;
    make_key("failed build log", key);
    open_cache(f, &c);
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_ERR_COMPILE);
    log_path_of(err.message, named, sizeof named);
    format_text(failed, sizeof failed, "%s/failed", c.root);
    format_text(expected, sizeof expected, "%s/%s.log", failed, key);
    assert_string_equal(named, expected);
    check_private_file(named, b.log_text);
    assert_int_equal(lstat(failed, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0700);
    format_text(tmp, sizeof tmp, "%s/tmp", c.root);
    assert_int_equal(count_entries(tmp), 0);
    assert_int_equal(f->log.warnings, 0);

    /* the next build of the key succeeds: its log is not kept as a failure */
    b.fail_with = MOEGEN_OK;
    b.log_text = "note: all fine\n";
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err),
                     MOEGEN_OK);
    assert_string_equal(res.temp_dir, "");
    assert_int_equal(count_entries(failed), 0);
}

static void cache_keeps_at_most_sixteen_failed_build_logs(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "x\n", .fail_with = MOEGEN_ERR_COMPILE, .log_text = "failed\n"};
    char keys[20][65], seed[32], path[PATH_MAX], failed[PATH_MAX];
    struct timespec now;
    open_cache(f, &c);
    clock_gettime(CLOCK_REALTIME, &now);
    for (int i = 0; i < 20; i++) {
        struct timespec times[2] = {{now.tv_sec - 1000 + i, 0}, {now.tv_sec - 1000 + i, 0}};
        format_text(seed, sizeof seed, "failure %d", i);
        make_key(seed, keys[i]);
        assert_int_equal(
            moegen_cache_get(&c, "cpu", keys[i], "module.so", build_text, &b, &res, &err),
            MOEGEN_ERR_COMPILE);
        /* distinct mtimes, oldest first, so "the oldest" is well defined */
        format_text(path, sizeof path, "%s/failed/%s.log", c.root, keys[i]);
        assert_int_equal(utimensat(AT_FDCWD, path, times, AT_SYMLINK_NOFOLLOW), 0);
    }
    format_text(failed, sizeof failed, "%s/failed", c.root);
    assert_int_equal(count_entries(failed), FAILED_LOGS_KEPT);
    for (int i = 0; i < 20; i++) {
        format_text(path, sizeof path, "%s/%s.log", failed, keys[i]);
        if (path_exists(path) != (i >= 20 - FAILED_LOGS_KEPT))
            fail_msg("log %d of 20 %s", i, path_exists(path) ? "kept" : "removed");
    }
    assert_int_equal(f->log.warnings, 0);
}

/* Files in `dir` whose names start with `prefix`. */
static int count_named(const char *dir, const char *prefix) {
    int count = 0;
    DIR *listing = opendir(dir);
    struct dirent *item;
    while (listing && (item = readdir(listing)) != NULL)
        if (strncmp(item->d_name, prefix, strlen(prefix)) == 0)
            count++;
    if (listing)
        closedir(listing);
    return count;
}

static void cache_keeps_the_log_of_a_failed_uncached_build_in_a_temporary_file(void **state) {
    fixture *f = *state;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder b = {.text = "x\n",
                      .fail_with = MOEGEN_ERR_COMPILE,
                      .log_text = "error: uncached and broken\n"};
    char *saved_tmpdir = saved_env("TMPDIR");
    char key[65], named[PATH_MAX], prefix[64], tmpdir[PATH_MAX], expected[PATH_MAX];
    moegen_status failed, succeeded;
    make_key("failed uncached build log", key);
    assert_int_equal(mkdir(f->root, 0700), 0);
    assert_int_equal(chmod(f->root, 0777), 0);
    open_cache(f, &c);
    assert_false(c.usable);
    /* a private $TMPDIR, so that only this test's files are counted */
    format_text(tmpdir, sizeof tmpdir, "%s/tmpdir", f->dir);
    assert_int_equal(mkdir(tmpdir, 0700), 0);
    set_env("TMPDIR", tmpdir);
    failed = moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err);
    log_path_of(err.message, named, sizeof named);
    b.fail_with = MOEGEN_OK;
    succeeded = moegen_cache_get(&c, "cpu", key, "module.so", build_text, &b, &res, &err);
    moegen_cache_result_release(&res);
    set_env("TMPDIR", saved_tmpdir);
    free(saved_tmpdir);

    assert_int_equal(failed, MOEGEN_ERR_COMPILE);
    check_private_file(named, b.log_text);
    format_text(prefix, sizeof prefix, "moegen-failed-%.16s-", key);
    format_text(expected, sizeof expected, "%s/%s", tmpdir, prefix);
    assert_true(strncmp(named, expected, strlen(expected)) == 0);
    assert_int_equal(strlen(named), strlen(expected) + strlen("XXXXXX.log"));
    assert_string_equal(named + strlen(named) - 4, ".log");
    /* the successful build left no log behind: only the failed one is there */
    assert_int_equal(succeeded, MOEGEN_OK);
    assert_int_equal(count_named(tmpdir, prefix), 1);
    assert_int_equal(count_entries(tmpdir), 1);
}

/* ---- a full cache file system -------------------------------------------------------- */

/* Mount a 256 KiB tmpfs at <dir>/small (unmounted in teardown) or skip the test. */
static void mount_small_file_system(fixture *f, char *out, size_t size) {
    format_text(out, size, "%s/small", f->dir);
    assert_int_equal(mkdir(out, 0700), 0);
    if (mount("tmpfs", out, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,mode=0700") != 0) {
        print_message("cannot mount a 256 KiB tmpfs at %s (%s; needs root): skipped\n", out,
                      strerror(errno));
        skip();
    }
    format_text(f->mounted, sizeof f->mounted, "%s", out);
}

/* One get of a big artifact in a cache on the small file system: it must succeed
 * uncached, with one warning saying the cache is full. */
static void check_full_cache_builds_uncached(const char *root, text_builder *b, const char *seed) {
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    log_capture log = {0};
    char key[65], text[64], dir[PATH_MAX], kept[PATH_MAX];
    struct stat st;
    make_key(seed, key);
    assert_int_equal(moegen_cache_open(&c, root, capture_log, &log, &err), MOEGEN_OK);
    assert_true(c.usable);
    if (moegen_cache_get(&c, "cpu", key, "module.so", build_text, b, &res, &err) != MOEGEN_OK)
        fail_msg("get on a full cache failed: %s", err.message);
    assert_int_equal(b->calls, 2); /* in the cache, then once more uncached */
    assert_false(res.hit);
    assert_string_not_equal(res.temp_dir, "");
    assert_true(strncmp(res.path, root, strlen(root)) != 0);
    assert_int_equal(stat(res.path, &st), 0);
    assert_int_equal((size_t)st.st_size, b->artifact_bytes);
    assert_true(read_text_file(res.path, text, strlen(b->text) + 1) > 0);
    assert_string_equal(text, b->text);
    assert_int_equal(log.warnings, 1);
    assert_non_null(strstr(log.last_warning, "is full"));
    assert_non_null(strstr(log.last_warning, "compiling in a temporary directory"));
    format_text(dir, sizeof dir, "%s/tmp", c.root);
    assert_int_equal(count_entries(dir), 0);
    format_text(dir, sizeof dir, "%s/failed", c.root);
    assert_true(count_entries(dir) <= 0);
    format_text(kept, sizeof kept, "%s", res.temp_dir);
    moegen_cache_result_release(&res);
    assert_false(path_exists(kept));
}

static void cache_on_a_full_file_system_compiles_in_a_temporary_directory_and_warns_once(
    void **state) {
    fixture *f = *state;
    char small[PATH_MAX], root[PATH_MAX];
    text_builder says_enospc = {.text = "big\n", .artifact_bytes = BIG_ARTIFACT_BYTES};
    text_builder says_nothing = {.text = "big\n", .artifact_bytes = BIG_ARTIFACT_BYTES,
                                 .hide_errno = 1};
    mount_small_file_system(f, small, sizeof small);
    format_text(root, sizeof root, "%s/cache", small);
    /* the builder's native_code says ENOSPC */
    check_full_cache_builds_uncached(root, &says_enospc, "full disk, ENOSPC");
    /* native_code 0: statvfs() shows the file system is (nearly) full */
    check_full_cache_builds_uncached(root, &says_nothing, "full disk, no errno");
}

/* ---- host compiler ------------------------------------------------------------------ */

static void host_compiler_probe_reports_an_identity_and_flags(void **state) {
    moegen_host_compiler hc;
    moegen_error err;
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    assert_true(hc.command[0] != '\0');
    assert_true(strlen(hc.identity) > 3);
    assert_non_null(strstr(hc.identity, " / "));
    assert_non_null(strstr(hc.flags, "-O3"));
    assert_non_null(strstr(hc.flags, "-fPIC"));
    assert_non_null(strstr(hc.flags, "-shared"));
    assert_true(hc.vector_floats == 4 || hc.vector_floats == 8 || hc.vector_floats == 16);
    if (strstr(hc.flags, "-mavx512f"))
        assert_int_equal(hc.vector_floats, 16);
    else if (strstr(hc.flags, "-mavx2"))
        assert_int_equal(hc.vector_floats, 8);
    else
        assert_int_equal(hc.vector_floats, 4);
}

/* Write <dir>/answer_config.h (found only through -I) and <dir>/answer.c. */
static void write_answer_source(const char *dir, char *source, size_t size) {
    char header[PATH_MAX];
    format_text(header, sizeof header, "%s/answer_config.h", dir);
    format_text(source, size, "%s/answer.c", dir);
    assert_int_equal(write_text_file(header, "#define ANSWER_FACTOR 6\n"), 0);
    assert_int_equal(write_text_file(source, "#include <answer_config.h>\n"
                                             "#include <math.h>\n"
                                             "int moegen_test_answer(int x) {\n"
                                             "    return x * ANSWER_FACTOR + (int)floor(0.5);\n"
                                             "}\n"),
                     0);
}

static void check_answer_library(const char *path) {
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!library)
        fail_msg("dlopen(%s): %s", path, dlerror());
    int (*answer)(int) = (int (*)(int))dlsym(library, "moegen_test_answer");
    assert_non_null(answer);
    assert_int_equal(answer(7), 42);
    dlclose(library);
}

static void host_compiler_builds_a_shared_object_that_loads_and_runs(void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_error err;
    char source[PATH_MAX], output[PATH_MAX], log_path[PATH_MAX];
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    write_answer_source(f->dir, source, sizeof source);
    format_text(output, sizeof output, "%s/answer.so", f->dir);
    format_text(log_path, sizeof log_path, "%s/compile.log", f->dir);
    if (moegen_host_compile(&hc, source, output, log_path, &err) != MOEGEN_OK)
        fail_msg("compile failed: %s", err.message);
    check_answer_library(output);
}

static void host_compiler_reports_a_compile_error_with_the_compilers_message(void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_error err;
    char source[PATH_MAX], output[PATH_MAX], log_path[PATH_MAX];
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    format_text(source, sizeof source, "%s/broken.c", f->dir);
    format_text(output, sizeof output, "%s/broken.so", f->dir);
    format_text(log_path, sizeof log_path, "%s/broken.log", f->dir);
    assert_int_equal(
        write_text_file(source, "int broken(void) { return undeclared_identifier_xyz; }\n"), 0);
    assert_int_equal(moegen_host_compile(&hc, source, output, log_path, &err), MOEGEN_ERR_COMPILE);
    assert_int_equal(err.code, MOEGEN_ERR_COMPILE);
    assert_non_null(strstr(err.message, "undeclared_identifier_xyz"));
    assert_non_null(strstr(err.message, log_path));
    assert_false(path_exists(output));
}

static void host_compiler_named_by_moegen_cc_that_does_not_exist_is_a_clear_error(void **state) {
    moegen_host_compiler hc;
    moegen_error err;
    char *saved = saved_env("MOEGEN_CC");
    set_env("MOEGEN_CC", "/nonexistent/moegen-cc");
    moegen_status missing = moegen_host_compiler_probe(&hc, &err);
    char missing_message[sizeof err.message];
    format_text(missing_message, sizeof missing_message, "%s", err.message);
    set_env("MOEGEN_CC", "cc -O2");
    moegen_status with_arguments = moegen_host_compiler_probe(&hc, &err);
    set_env("MOEGEN_CC", saved);
    free(saved);
    assert_int_equal(missing, MOEGEN_ERR_COMPILE);
    assert_non_null(strstr(missing_message, "'/nonexistent/moegen-cc' not found"));
    assert_non_null(strstr(missing_message, "MOEGEN_CC"));
    assert_int_equal(with_arguments, MOEGEN_ERR_COMPILE);
    assert_non_null(strstr(err.message, "single program"));
}

typedef struct compile_builder {
    const moegen_host_compiler *hc;
    const char *source_dir;
    int calls;
    const char *extra_source; /* appended to answer.c when non-NULL */
} compile_builder;

static moegen_status build_answer_library(void *ctx, const char *work_dir,
                                          const char *artifact_path, const char *log_path,
                                          moegen_error *err) {
    compile_builder *b = ctx;
    char source[PATH_MAX];
    b->calls++;
    write_answer_source(work_dir, source, sizeof source);
    if (b->extra_source) {
        FILE *file = fopen(source, "a");
        if (!file || fputs(b->extra_source, file) < 0 || fclose(file) != 0)
            return moegen_error_set(err, MOEGEN_ERR_IO, errno, "cannot extend %s", source);
    }
    return moegen_host_compile(b->hc, source, artifact_path, log_path, err);
}

static void host_compiled_library_is_cached_and_loads_from_the_cache(void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    moegen_sha256 hash;
    char key[65];
    struct stat st;
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    compile_builder b = {.hc = &hc};
    moegen_sha256_init(&hash);
    moegen_sha256_update(&hash, hc.identity, strlen(hc.identity));
    moegen_sha256_update(&hash, hc.flags, strlen(hc.flags));
    moegen_sha256_final_hex(&hash, key);
    open_cache(f, &c);
    for (int round = 0; round < 2; round++) {
        if (moegen_cache_get(&c, "cpu", key, "module.so", build_answer_library, &b, &res, &err) !=
            MOEGEN_OK)
            fail_msg("cache get failed: %s", err.message);
        assert_int_equal(res.hit, round == 1);
        check_answer_library(res.path);
        moegen_cache_result_release(&res);
    }
    assert_int_equal(b.calls, 1);
    assert_int_equal(stat(res.path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0700); /* executable artifact kept executable */
    assert_int_equal(f->log.warnings, 0);
}

/* A key over the compiler and a test's own seed. */
static void compiler_key(const moegen_host_compiler *hc, const char *seed, char key[65]) {
    moegen_sha256 hash;
    moegen_sha256_init(&hash);
    moegen_sha256_update(&hash, hc->identity, strlen(hc->identity));
    moegen_sha256_update(&hash, hc->flags, strlen(hc->flags));
    moegen_sha256_update(&hash, seed, strlen(seed));
    moegen_sha256_final_hex(&hash, key);
}

static void host_compile_error_in_the_cache_names_a_log_that_still_exists(void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    char key[65], named[PATH_MAX], expected[PATH_MAX], text[8192];
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    compile_builder b = {
        .hc = &hc, .extra_source = "int broken(void) { return undeclared_identifier_xyz; }\n"};
    compiler_key(&hc, "broken source", key);
    open_cache(f, &c);
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key, "module.so", build_answer_library, &b, &res, &err),
        MOEGEN_ERR_COMPILE);
    log_path_of(err.message, named, sizeof named);
    format_text(expected, sizeof expected, "%s/failed/%s.log", c.root, key);
    assert_string_equal(named, expected);
    assert_true(read_text_file(named, text, sizeof text) > 0);
    assert_non_null(strstr(text, "undeclared_identifier_xyz"));
    assert_int_equal(f->log.warnings, 0);
}

static void host_compile_on_a_full_cache_file_system_succeeds_uncached(void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    char small[PATH_MAX], root[PATH_MAX], key[65], failed[PATH_MAX];
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    /* 4 MiB of initialized data: the shared object cannot fit in 256 KiB */
    compile_builder b = {.hc = &hc,
                         .extra_source = "const unsigned char moegen_test_blob[4 << 20] = {1};\n"};
    mount_small_file_system(f, small, sizeof small);
    format_text(root, sizeof root, "%s/cache", small);
    compiler_key(&hc, "big shared object", key);
    assert_int_equal(moegen_cache_open(&c, root, capture_log, &f->log, &err), MOEGEN_OK);
    assert_true(c.usable);
    if (moegen_cache_get(&c, "cpu", key, "module.so", build_answer_library, &b, &res, &err) !=
        MOEGEN_OK)
        fail_msg("get on a full cache failed: %s", err.message);
    assert_int_equal(b.calls, 2);
    assert_string_not_equal(res.temp_dir, "");
    check_answer_library(res.path);
    moegen_cache_result_release(&res);
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, "is full"));
    format_text(failed, sizeof failed, "%s/failed", c.root);
    assert_true(count_entries(failed) <= 0);
}

static void cache_evict_removes_an_entry_that_failed_to_load_so_the_next_get_rebuilds_it(
    void **state) {
    fixture *f = *state;
    moegen_host_compiler hc;
    moegen_cache c;
    moegen_cache_result res;
    moegen_error err;
    text_builder not_elf = {.text = "this is no shared object\n"};
    char key[65], entry[PATH_MAX], why[1024], tmp[PATH_MAX];
    assert_int_equal(moegen_host_compiler_probe(&hc, &err), MOEGEN_OK);
    compile_builder real = {.hc = &hc};
    compiler_key(&hc, "evict after a failed load", key);
    open_cache(f, &c);
    /* an entry whose manifest matches but that dlopen rejects */
    assert_int_equal(
        moegen_cache_get(&c, "cpu", key, "module.so", build_text, &not_elf, &res, &err), MOEGEN_OK);
    entry_of(&res, entry, sizeof entry);
    assert_null(dlopen(res.path, RTLD_NOW | RTLD_LOCAL));
    format_text(why, sizeof why, "dlopen failed: %s", dlerror());
    assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_answer_library, &real,
                                      &res, &err),
                     MOEGEN_OK);
    assert_true(res.hit); /* the manifest check alone cannot tell */

    assert_int_equal(moegen_cache_evict(&c, "cpu", key, why, &err), MOEGEN_OK);
    assert_false(path_exists(entry));
    format_text(tmp, sizeof tmp, "%s/tmp", c.root);
    assert_int_equal(count_entries(tmp), 0);
    assert_int_equal(f->log.warnings, 1);
    assert_non_null(strstr(f->log.last_warning, entry));
    assert_non_null(strstr(f->log.last_warning, why));

    for (int round = 0; round < 2; round++) {
        assert_int_equal(moegen_cache_get(&c, "cpu", key, "module.so", build_answer_library,
                                          &real, &res, &err),
                         MOEGEN_OK);
        assert_int_equal(res.hit, round == 1);
        assert_false(res.rebuilt_corrupt);
        check_answer_library(res.path);
    }
    assert_int_equal(real.calls, 1);

    /* nothing left to evict: no error, no warning; malformed arguments are refused */
    assert_int_equal(moegen_cache_evict(&c, "cuda", key, NULL, &err), MOEGEN_OK);
    assert_int_equal(f->log.warnings, 1);
    assert_int_equal(moegen_cache_evict(NULL, "cpu", key, why, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_evict(&c, "tmp", key, why, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_evict(&c, "failed", key, why, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_cache_evict(&c, "cpu", "abc", why, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(
        moegen_cache_get(&c, "failed", key, "module.so", build_text, &not_elf, &res, &err),
        MOEGEN_ERR_INVALID_ARGUMENT);
}

#define FIXTURE_TEST(name) cmocka_unit_test_setup_teardown(name, setup_fixture, teardown_fixture)

int main(void) {
    const struct CMUnitTest tests[] = {
        FIXTURE_TEST(cache_builds_on_a_miss_and_hits_without_building_again),
        FIXTURE_TEST(cache_separates_entries_by_kind_and_by_key),
        FIXTURE_TEST(cache_rebuilds_a_truncated_entry_and_warns_once),
        FIXTURE_TEST(cache_rebuilds_an_entry_of_random_bytes_and_warns_once),
        FIXTURE_TEST(cache_rebuilds_an_entry_whose_manifest_hash_is_wrong_and_warns_once),
        FIXTURE_TEST(cache_rebuilds_an_entry_without_a_manifest_and_warns_once),
        FIXTURE_TEST(cache_rebuilds_an_entry_with_a_garbage_manifest_and_warns_once),
        FIXTURE_TEST(cache_rebuilds_an_entry_filed_under_the_wrong_key),
        FIXTURE_TEST(cache_rebuilds_an_entry_that_is_a_symlink),
        FIXTURE_TEST(cache_cold_start_in_eight_processes_leaves_one_entry_and_no_temporaries),
        FIXTURE_TEST(cache_in_a_read_only_root_builds_in_a_temporary_directory),
        FIXTURE_TEST(cache_under_a_regular_file_is_unusable_but_still_builds),
        FIXTURE_TEST(cache_root_that_is_a_regular_file_is_unusable_but_still_builds),
        FIXTURE_TEST(cache_group_writable_root_is_unusable_and_the_temporary_build_is_released),
        FIXTURE_TEST(cache_world_writable_root_is_unusable_and_the_temporary_build_is_released),
        FIXTURE_TEST(cache_foreign_owned_root_is_unusable_but_still_builds),
        FIXTURE_TEST(cache_under_a_parent_others_can_write_is_unusable_unless_it_is_sticky),
        FIXTURE_TEST(cache_falls_back_to_a_temporary_directory_when_a_write_fails),
        FIXTURE_TEST(cache_without_a_log_callback_warns_on_stderr),
        FIXTURE_TEST(cache_passes_a_builder_error_on_unchanged_and_publishes_nothing),
        FIXTURE_TEST(cache_rejects_malformed_kinds_keys_and_artifact_names),
        FIXTURE_TEST(cache_removes_work_directories_left_by_crashed_processes),
        FIXTURE_TEST(cache_resolves_its_root_from_the_environment),
        FIXTURE_TEST(remove_tree_does_not_follow_a_symlink_to_outside),
        FIXTURE_TEST(cache_rebuilds_an_entry_whose_manifest_is_a_fifo_without_blocking),
        FIXTURE_TEST(cache_rebuilds_an_entry_whose_artifact_is_a_fifo_without_blocking),
        FIXTURE_TEST(cache_rebuilds_an_entry_whose_artifact_is_a_symlink_to_dev_zero),
        FIXTURE_TEST(cache_rebuilds_an_entry_whose_manifest_is_a_symlink_to_dev_null),
        FIXTURE_TEST(
            cache_never_loads_from_a_kind_directory_that_is_a_symlink_to_a_world_writable_one),
        FIXTURE_TEST(cache_never_loads_from_a_key_prefix_directory_others_can_write),
        FIXTURE_TEST(cache_keeps_the_log_of_a_failed_build_where_the_error_message_says),
        FIXTURE_TEST(cache_keeps_at_most_sixteen_failed_build_logs),
        FIXTURE_TEST(cache_keeps_the_log_of_a_failed_uncached_build_in_a_temporary_file),
        FIXTURE_TEST(
            cache_on_a_full_file_system_compiles_in_a_temporary_directory_and_warns_once),
        cmocka_unit_test(host_compiler_probe_reports_an_identity_and_flags),
        FIXTURE_TEST(host_compiler_builds_a_shared_object_that_loads_and_runs),
        FIXTURE_TEST(host_compiler_reports_a_compile_error_with_the_compilers_message),
        cmocka_unit_test(host_compiler_named_by_moegen_cc_that_does_not_exist_is_a_clear_error),
        FIXTURE_TEST(host_compiled_library_is_cached_and_loads_from_the_cache),
        FIXTURE_TEST(host_compile_error_in_the_cache_names_a_log_that_still_exists),
        FIXTURE_TEST(host_compile_on_a_full_cache_file_system_succeeds_uncached),
        FIXTURE_TEST(cache_evict_removes_an_entry_that_failed_to_load_so_the_next_get_rebuilds_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
