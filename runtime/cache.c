/* cache.c — the on-disk compile cache shared by the host-C and NVRTC backends.
 *
 * Place in the pipeline: spec -> gen -> compile -> [cache] -> load -> launch.
 * The backend computes a key over everything that determines an artifact and
 * asks moegen_cache_get() for it; on a miss the backend's builder compiles into
 * a private work directory which this file then publishes.
 *
 * On-disk layout (see cache.h):
 *   <root>/tmp/                          work directories, evicted entries, probes
 *   <root>/<kind>/<key[0:2]>/<key>/      one entry: <artifact>, manifest, build leftovers
 *   <root>/failed/<key>.log              the log of a failed build (at most 16)
 *
 * Manifest (text, exactly these five lines):
 *   moegen-cache-manifest 1
 *   key <64 hex>
 *   artifact <file name>
 *   size <decimal bytes>
 *   sha256 <64 hex>
 *
 * Invariants:
 *  - Publishing is build in <root>/tmp/<key>.<pid>.<random>/, write the manifest,
 *    fsync artifact, manifest and directory, then rename() the directory into
 *    place. Readers therefore see either no entry or a complete one. When the
 *    rename finds an entry already there, that entry is validated and used (ours
 *    is discarded); a bad one is evicted and the rename tried once more.
 *  - No entry is returned before every directory on its way is checked: <kind>,
 *    <key[0:2]> and the entry directory must each be a real directory (lstat: not
 *    a symlink) owned by this user and not writable by group or others (the root
 *    was checked when opened). Then its manifest is parsed and the artifact's size
 *    and SHA-256 compared with it. A bad entry is evicted by renaming it under
 *    <root>/tmp/ first and only then removing it, so nobody sees a half-removed
 *    entry under the real name; it is rebuilt and reported with one warning. A bad
 *    <kind> or <key[0:2]> directory (or <root>/failed) is not ours to delete: it is
 *    left alone, nothing is loaded from it, and the build falls back to a
 *    temporary directory as below. moegen_cache_evict() evicts an entry that
 *    passed these checks but failed to load, the same way, with one warning.
 *  - Every file the cache opens is opened with O_NONBLOCK | O_NOFOLLOW and then
 *    fstat()ed; anything but a regular file (a FIFO, a device, a symlink to one)
 *    makes the entry bad. Nothing here can block on open.
 *  - The root must be a directory owned by this user, not writable by group or
 *    others, and really writable (a probe file is created and removed). Otherwise
 *    the cache is unusable: every build goes to a fresh mkdtemp() directory under
 *    $TMPDIR or /tmp that the caller removes with moegen_cache_result_release().
 *    A failed write while publishing (disk full, read-only file system) is handled
 *    the same way. Such trouble is warned about once per moegen_cache.
 *  - Full disk or quota: when the builder fails inside the cache's work directory
 *    and its error's native_code is ENOSPC or EDQUOT, or statvfs() shows less than
 *    FULL_DISK_MIN_FREE_BYTES (64 MiB) available there, the work directory is
 *    removed, the cache-trouble warning given ("cache directory X is full ...;
 *    compiling in a temporary directory") and the build retried once uncached.
 *  - Build logs: the builder gets a log path up front. In the cache it is
 *    <root>/failed/<key>.log, created fresh and empty (0600, O_EXCL | O_NOFOLLOW)
 *    in <root>/failed (0700); uncached it is a mkstemp() file
 *    moegen-failed-<key[0:16]>-XXXXXX.log under $TMPDIR or /tmp. The log is
 *    removed when the build succeeds (or is retried for a full disk) and kept when
 *    it fails, so the builder's message names a file that exists. After keeping a
 *    log in <root>/failed, only the MAX_FAILED_LOGS (16) newest (by mtime) stay.
 *  - Entry directories are created 0700, artifacts are left 0600 (0700 when the
 *    builder made them executable), manifests 0600.
 *  - No global mutable state; everything lives in moegen_cache, the result and
 *    the stack. Work directories older than an hour (left by crashed processes)
 *    are removed on a miss.
 */
#define _GNU_SOURCE
#include "cache.h"
#include "fs_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

#define MANIFEST_NAME "manifest"
#define MANIFEST_FIRST_LINE "moegen-cache-manifest 1"
#define MANIFEST_MAX_BYTES 4096
#define KEY_HEX_CHARS 64
#define KIND_MAX_CHARS 32
#define ARTIFACT_NAME_MAX_CHARS 128
#define STALE_WORK_SECONDS 3600
#define REMOVE_TREE_MAX_DEPTH 64
#define PUBLISH_ATTEMPTS 2
#define REASON_BYTES 512
#define LOG_MESSAGE_BYTES (PATH_MAX + 1024)
#define HASH_CHUNK_BYTES 16384
#define FAILED_DIR_NAME "failed"
#define FAILED_LOG_SUFFIX ".log"
#define MAX_FAILED_LOGS 16
#define TEMP_LOG_KEY_PREFIX_CHARS 16
#define FULL_DISK_MIN_FREE_BYTES (64ull * 1024 * 1024)
/* Every open of an existing file in the cache: never block (a FIFO would), never
 * follow a symlink; the caller then fstat()s and accepts only a regular file. */
#define CACHE_OPEN_READ (O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)
#define CACHE_OPEN_CREATE (O_WRONLY | O_CREAT | O_EXCL | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)

typedef enum entry_state { ENTRY_VALID, ENTRY_MISSING, ENTRY_BAD } entry_state;

typedef struct manifest_fields {
    char key[KEY_HEX_CHARS + 1];
    char artifact[ARTIFACT_NAME_MAX_CHARS + 1];
    unsigned long long size;
    char sha256[KEY_HEX_CHARS + 1];
} manifest_fields;

/* ---- small helpers ------------------------------------------------------------ */

static void cache_log(const moegen_cache *c, moegen_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void cache_log(const moegen_cache *c, moegen_log_level level, const char *fmt, ...) {
    char message[LOG_MESSAGE_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (c->log)
        c->log(c->log_user, level, message);
    else
        fprintf(stderr, "moegen: %s: %s\n", level == MOEGEN_LOG_WARNING ? "warning" : "notice",
                message);
}

/* The one "cache trouble" warning of a moegen_cache: unusable root or failed write. */
static void warn_cache_trouble_once(moegen_cache *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void warn_cache_trouble_once(moegen_cache *c, const char *fmt, ...) {
    char detail[REASON_BYTES + PATH_MAX];
    va_list ap;
    if (!c->warned) {
        c->warned = 1;
        va_start(ap, fmt);
        vsnprintf(detail, sizeof detail, fmt, ap);
        va_end(ap);
        cache_log(c, MOEGEN_LOG_WARNING, "%s; compiling in a temporary directory", detail);
    }
}

static void copy_text(char *out, size_t size, const char *text) {
    moegen_text_format(out, size, "%s", text);
}

static int is_lower_hex(const char *text, size_t length) {
    int ok = strlen(text) == length;
    for (size_t i = 0; ok && i < length; i++)
        ok = (text[i] >= '0' && text[i] <= '9') || (text[i] >= 'a' && text[i] <= 'f');
    return ok;
}

static int is_valid_kind(const char *kind) {
    size_t length = kind ? strlen(kind) : 0;
    int ok = length > 0 && length <= KIND_MAX_CHARS && strcmp(kind, "tmp") != 0 &&
             strcmp(kind, FAILED_DIR_NAME) != 0;
    for (size_t i = 0; ok && i < length; i++)
        ok = (kind[i] >= 'a' && kind[i] <= 'z') || (kind[i] >= '0' && kind[i] <= '9') ||
             kind[i] == '_' || kind[i] == '-';
    return ok;
}

static int is_valid_artifact_name(const char *name) {
    size_t length = name ? strlen(name) : 0;
    int ok = length > 0 && length <= ARTIFACT_NAME_MAX_CHARS && name[0] != '.' &&
             strcmp(name, MANIFEST_NAME) != 0;
    for (size_t i = 0; ok && i < length; i++)
        ok = (name[i] >= 'a' && name[i] <= 'z') || (name[i] >= 'A' && name[i] <= 'Z') ||
             (name[i] >= '0' && name[i] <= '9') || name[i] == '.' || name[i] == '_' ||
             name[i] == '-';
    return ok;
}

/* write() all of `data`, retrying on EINTR and short writes. */
static int write_all(int fd, const void *data, size_t size) {
    const char *bytes = data;
    int result = 0;
    while (size > 0 && result == 0) {
        ssize_t written = write(fd, bytes, size);
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0) {
            if (written == 0)
                errno = EIO;
            result = -1;
        } else {
            bytes += written;
            size -= (size_t)written;
        }
    }
    return result;
}

/* fsync a directory so that entries created or renamed in it are durable. */
/* mkdir a single private directory; an existing directory (not a symlink) is fine. */
static int make_private_directory(const char *path) {
    int result = 0;
    struct stat st;
    if (mkdir(path, 0700) == 0) {
        (void)chmod(path, 0700); /* an odd umask may have removed owner bits */
    } else if (errno != EEXIST) {
        result = -1;
    } else if (lstat(path, &st) != 0) {
        result = -1;
    } else if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        result = -1;
    }
    return result;
}

/* Creates and removes a one-byte file in `dir`: the only honest writability test
 * (permission bits say nothing about root, read-only mounts or a full disk). */
static int probe_writable(const char *dir) {
    char probe[PATH_MAX];
    int result = -1;
    if (moegen_path_format(probe, sizeof probe, "%s/.moegen-probe.XXXXXX", dir) == 0) {
        int fd = mkostemp(probe, O_CLOEXEC);
        if (fd >= 0) {
            result = write_all(fd, "p", 1);
            int saved = errno;
            close(fd);
            unlink(probe);
            errno = saved;
        }
    }
    return result;
}

/* Why a directory we are about to trust is not private, or NULL when it is. */
static const char *private_directory_problem(const struct stat *st, char *why, size_t size) {
    const char *problem = NULL;
    if (S_ISLNK(st->st_mode)) {
        moegen_text_format(why, size, "a symbolic link, not a directory");
        problem = why;
    } else if (!S_ISDIR(st->st_mode)) {
        moegen_text_format(why, size, "not a directory");
        problem = why;
    } else if (st->st_uid != geteuid()) {
        moegen_text_format(why, size, "owned by uid %u, not by this user (uid %u)", (unsigned)st->st_uid,
                    (unsigned)geteuid());
        problem = why;
    } else if (st->st_mode & S_IWOTH) {
        moegen_text_format(why, size, "world-writable (mode %04o)", (unsigned)(st->st_mode & 07777));
        problem = why;
    } else if (st->st_mode & S_IWGRP) {
        moegen_text_format(why, size, "group-writable (mode %04o)", (unsigned)(st->st_mode & 07777));
        problem = why;
    }
    return problem;
}

/* ---- root resolution ------------------------------------------------------------ */

/* Whoever can write into a parent of the root without the sticky bit can rename
 * the root away and put their own in its place. Parents must therefore belong to
 * this user or to root, and be writable by others only when sticky (like /tmp).
 * `path` is canonical. Returns 0, or -1 with `why` filled. */
static int check_ancestors(const char *path, char *why, size_t why_size) {
    char prefix[PATH_MAX];
    int result = 0;
    copy_text(prefix, sizeof prefix, path);
    for (char *slash = strrchr(prefix, '/'); result == 0 && slash; slash = strrchr(prefix, '/')) {
        struct stat st;
        if (slash == prefix)
            slash[1] = '\0'; /* "/" itself, then stop */
        else
            *slash = '\0';
        if (stat(prefix, &st) != 0) {
            moegen_text_format(why, why_size, "cannot stat its parent %s: %s", prefix, strerror(errno));
            result = -1;
        } else if (st.st_uid != geteuid() && st.st_uid != 0) {
            moegen_text_format(why, why_size, "its parent %s is owned by uid %u", prefix,
                        (unsigned)st.st_uid);
            result = -1;
        } else if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX)) {
            moegen_text_format(why, why_size, "its parent %s is writable by others (mode %04o)", prefix,
                        (unsigned)(st.st_mode & 07777));
            result = -1;
        }
        if (slash == prefix)
            break;
    }
    return result;
}

/* Pick the root path from `dir` or the environment (no file system access). */
static int resolve_root_path(const char *dir, char *out, size_t size, char *why, size_t why_size) {
    int result = 0;
    const char *from_env = getenv("MOEGEN_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (dir) {
        if (dir[0] == '\0') {
            moegen_text_format(why, why_size, "the cache directory given is an empty string");
            result = -1;
        } else {
            result = moegen_path_format(out, size, "%s", dir);
        }
    } else if (from_env && from_env[0]) {
        result = moegen_path_format(out, size, "%s", from_env);
    } else if (xdg && xdg[0] == '/') { /* XDG: relative values are to be ignored */
        result = moegen_path_format(out, size, "%s/moegen", xdg);
    } else if (home && home[0]) {
        result = moegen_path_format(out, size, "%s/.cache/moegen", home);
    } else {
        moegen_text_format(why, why_size, "none of MOEGEN_CACHE_DIR, XDG_CACHE_HOME and HOME is set");
        result = -1;
    }
    if (result != 0 && why[0] == '\0')
        moegen_text_format(why, why_size, "its path is too long");
    return result;
}

/* Create the root and its tmp/ and check both; on success c->root is canonical. */
static int prepare_root(moegen_cache *c, char *why, size_t why_size) {
    char resolved[PATH_MAX];
    char work_root[PATH_MAX];
    struct stat st;
    int result = -1;
    if (moegen_make_directories(c->root, 0700) != 0) {
        moegen_text_format(why, why_size, "cannot create it: %s", strerror(errno));
    } else if (!realpath(c->root, resolved)) {
        moegen_text_format(why, why_size, "cannot resolve it: %s", strerror(errno));
    } else if (stat(resolved, &st) != 0) {
        moegen_text_format(why, why_size, "cannot stat it: %s", strerror(errno));
    } else if (private_directory_problem(&st, why, why_size)) {
        /* why already says it */
    } else if (check_ancestors(resolved, why, why_size) != 0) {
        /* why already says it */
    } else if (probe_writable(resolved) != 0) {
        moegen_text_format(why, why_size, "not writable: %s", strerror(errno));
    } else if (moegen_path_format(work_root, sizeof work_root, "%s/tmp", resolved) != 0) {
        moegen_text_format(why, why_size, "its path is too long");
    } else if (make_private_directory(work_root) != 0) {
        moegen_text_format(why, why_size, "cannot create %s: %s", work_root, strerror(errno));
    } else if (lstat(work_root, &st) != 0) {
        moegen_text_format(why, why_size, "cannot stat %s: %s", work_root, strerror(errno));
    } else if (private_directory_problem(&st, why, why_size)) {
        char inner[REASON_BYTES];
        copy_text(inner, sizeof inner, why);
        moegen_text_format(why, why_size, "%s is %s", work_root, inner);
    } else if (probe_writable(work_root) != 0) {
        moegen_text_format(why, why_size, "%s is not writable: %s", work_root, strerror(errno));
    } else {
        copy_text(c->root, sizeof c->root, resolved);
        result = 0;
    }
    return result;
}

/* Resolve, create and check the cache root (cache.h). Precondition: none beyond a
 * non-NULL `c`; `dir`, `log`, `err` may be NULL. An unusable root is not an error:
 * c->usable = 0 and one warning. Returns MOEGEN_OK, or MOEGEN_ERR_INVALID_ARGUMENT
 * when `c` is NULL. */
moegen_status moegen_cache_open(moegen_cache *c, const char *dir, moegen_log_fn log, void *log_user,
                                moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char why[REASON_BYTES] = "";
    if (!c) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_cache_open: the cache pointer is NULL");
        goto done;
    }
    moegen_error_clear(err);
    memset(c, 0, sizeof *c);
    c->log = log;
    c->log_user = log_user;
    if (resolve_root_path(dir, c->root, sizeof c->root, why, sizeof why) != 0) {
        c->root[0] = '\0';
        warn_cache_trouble_once(c, "no usable cache directory (%s)", why);
    } else if (prepare_root(c, why, sizeof why) != 0) {
        warn_cache_trouble_once(c, "cache directory %s is unusable (%s)", c->root, why);
    } else {
        c->usable = 1;
    }
done:
    return status;
}

/* ---- removal ------------------------------------------------------------------- */

/* Remove everything inside the open directory `dir_fd` (which is consumed).
 * Never follows symlinks: entries are examined with AT_SYMLINK_NOFOLLOW and
 * subdirectories opened with O_NOFOLLOW relative to their parent's descriptor. */
static int remove_directory_contents(int dir_fd, int depth) {
    int result = -1;
    DIR *listing = NULL;
    struct dirent *item;
    if (depth > REMOVE_TREE_MAX_DEPTH) {
        errno = ELOOP;
        goto done;
    }
    listing = fdopendir(dir_fd);
    if (!listing)
        goto done;
    result = 0;
    while ((item = readdir(listing)) != NULL) {
        struct stat st;
        const char *name = item->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno != ENOENT)
                result = -1;
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            int child = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (child < 0) {
                result = -1;
                continue;
            }
            if (st.st_uid == geteuid())
                (void)fchmod(child, S_IRWXU); /* a read-only subdirectory we own */
            if (remove_directory_contents(child, depth + 1) != 0)
                result = -1;
            if (unlinkat(dir_fd, name, AT_REMOVEDIR) != 0 && errno != ENOENT)
                result = -1;
        } else if (unlinkat(dir_fd, name, 0) != 0 && errno != ENOENT) {
            result = -1;
        }
    }
done:
    if (listing)
        closedir(listing); /* also closes dir_fd */
    else
        close(dir_fd);
    return result;
}

/* Remove a file, a symlink (never its target) or a directory tree whose symlinks
 * are removed, not followed. Subdirectories we own are made writable first.
 * Returns 0 (also when `path` does not exist) or -1 with errno from the first
 * failure (EINVAL for a NULL or empty path); removal continues past failures. */
int moegen_remove_tree(const char *path) {
    int result = 0;
    struct stat st;
    if (!path || !path[0]) {
        errno = EINVAL;
        result = -1;
    } else if (lstat(path, &st) != 0) {
        result = errno == ENOENT ? 0 : -1; /* already gone counts as removed */
    } else if (!S_ISDIR(st.st_mode)) {
        result = unlink(path); /* a file or a symlink itself, never its target */
    } else {
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            result = -1;
        } else {
            if (st.st_uid == geteuid())
                (void)fchmod(fd, S_IRWXU);
            result = remove_directory_contents(fd, 0);
            if (rmdir(path) != 0)
                result = -1;
        }
    }
    return result;
}

/* Remove res->temp_dir if set and clear it; res->path is then stale. NULL is a no-op. */
void moegen_cache_result_release(moegen_cache_result *res) {
    if (res && res->temp_dir[0]) {
        (void)moegen_remove_tree(res->temp_dir);
        res->temp_dir[0] = '\0';
    }
}

/* Remove work directories under <root>/tmp left by processes that died mid-build. */
static void remove_stale_work_directories(const moegen_cache *c) {
    char work_root[PATH_MAX];
    DIR *listing = NULL;
    struct dirent *item;
    time_t now = time(NULL);
    if (moegen_path_format(work_root, sizeof work_root, "%s/tmp", c->root) == 0) {
        int fd = open(work_root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0 && !(listing = fdopendir(fd)))
            close(fd);
    }
    while (listing && (item = readdir(listing)) != NULL) {
        struct stat st;
        char stale[PATH_MAX];
        if (strcmp(item->d_name, ".") == 0 || strcmp(item->d_name, "..") == 0)
            continue;
        if (fstatat(dirfd(listing), item->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        if (now - st.st_mtime <= STALE_WORK_SECONDS)
            continue;
        if (moegen_path_format(stale, sizeof stale, "%s/%s", work_root, item->d_name) == 0)
            (void)moegen_remove_tree(stale);
    }
    if (listing)
        closedir(listing);
}

/* ---- validation ------------------------------------------------------------------ */

/* Hash an open file from its current offset; also returns its length. */
static int hash_file(int fd, unsigned long long *size, char hex[KEY_HEX_CHARS + 1]) {
    unsigned char chunk[HASH_CHUNK_BYTES];
    moegen_sha256 hash;
    int result = 0;
    *size = 0;
    moegen_sha256_init(&hash);
    for (;;) {
        ssize_t got = read(fd, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            result = -1;
            break;
        }
        if (got == 0)
            break;
        moegen_sha256_update(&hash, chunk, (size_t)got);
        *size += (unsigned long long)got;
    }
    moegen_sha256_final_hex(&hash, hex);
    return result;
}

/* Copies the rest of the line after `prefix` into `value`; advances *cursor.
 * Returns 0, or -1 if the line does not start with `prefix`, has no newline or
 * is too long. */
static int take_manifest_line(const char **cursor, const char *prefix, char *value, size_t size) {
    int result = -1;
    size_t prefix_length = strlen(prefix);
    const char *line = *cursor;
    const char *end = strchr(line, '\n');
    if (end && strncmp(line, prefix, prefix_length) == 0) {
        size_t length = (size_t)(end - line) - prefix_length;
        if (length < size) {
            memcpy(value, line + prefix_length, length);
            value[length] = '\0';
            *cursor = end + 1;
            result = 0;
        }
    }
    return result;
}

static int parse_manifest(const char *text, manifest_fields *m) {
    const char *cursor = text;
    char nothing[1];
    char size_text[24];
    int ok = take_manifest_line(&cursor, MANIFEST_FIRST_LINE, nothing, sizeof nothing) == 0 &&
             take_manifest_line(&cursor, "key ", m->key, sizeof m->key) == 0 &&
             take_manifest_line(&cursor, "artifact ", m->artifact, sizeof m->artifact) == 0 &&
             take_manifest_line(&cursor, "size ", size_text, sizeof size_text) == 0 &&
             take_manifest_line(&cursor, "sha256 ", m->sha256, sizeof m->sha256) == 0 &&
             *cursor == '\0' && is_lower_hex(m->key, KEY_HEX_CHARS) &&
             is_lower_hex(m->sha256, KEY_HEX_CHARS) && is_valid_artifact_name(m->artifact) &&
             size_text[0] != '\0' && strlen(size_text) <= 19;
    for (size_t i = 0; ok && size_text[i]; i++)
        ok = size_text[i] >= '0' && size_text[i] <= '9';
    if (ok)
        m->size = strtoull(size_text, NULL, 10);
    return ok ? 0 : -1;
}

/* Read and parse <entry>/manifest. Returns 0, or -1 with `why` filled. */
static int read_manifest(const char *entry, manifest_fields *m, char *why, size_t why_size) {
    char path[PATH_MAX];
    char text[MANIFEST_MAX_BYTES + 1];
    size_t length = 0;
    struct stat st;
    int result = -1;
    int fd = -1;
    if (moegen_path_format(path, sizeof path, "%s/%s", entry, MANIFEST_NAME) != 0) {
        moegen_text_format(why, why_size, "manifest path too long");
        goto done;
    }
    fd = open(path, CACHE_OPEN_READ);
    if (fd < 0) {
        if (errno == ENOENT)
            moegen_text_format(why, why_size, "manifest missing");
        else if (errno == ELOOP)
            moegen_text_format(why, why_size, "manifest is a symbolic link");
        else
            moegen_text_format(why, why_size, "manifest unreadable: %s", strerror(errno));
        goto done;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > MANIFEST_MAX_BYTES) {
        moegen_text_format(why, why_size, "manifest is not a small regular file");
        goto done;
    }
    for (;;) {
        ssize_t got = read(fd, text + length, MANIFEST_MAX_BYTES - length);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            moegen_text_format(why, why_size, "manifest unreadable: %s", strerror(errno));
            goto done;
        }
        if (got == 0 || length + (size_t)got == MANIFEST_MAX_BYTES) {
            length += (size_t)got;
            break;
        }
        length += (size_t)got;
    }
    text[length] = '\0';
    if (memchr(text, '\0', length) != NULL || parse_manifest(text, m) != 0) {
        moegen_text_format(why, why_size, "manifest malformed");
        goto done;
    }
    result = 0;
done:
    if (fd >= 0)
        close(fd);
    return result;
}

/* Check the artifact against the manifest. Returns 0, or -1 with `why` filled. */
static int check_artifact(const char *entry, const manifest_fields *m, char *why, size_t why_size) {
    char path[PATH_MAX];
    char hex[KEY_HEX_CHARS + 1];
    unsigned long long size = 0;
    struct stat st;
    int result = -1;
    int fd = -1;
    if (moegen_path_format(path, sizeof path, "%s/%s", entry, m->artifact) != 0) {
        moegen_text_format(why, why_size, "artifact path too long");
        goto done;
    }
    fd = open(path, CACHE_OPEN_READ);
    if (fd < 0) {
        if (errno == ENOENT)
            moegen_text_format(why, why_size, "artifact %s missing", m->artifact);
        else if (errno == ELOOP)
            moegen_text_format(why, why_size, "artifact %s is a symbolic link", m->artifact);
        else
            moegen_text_format(why, why_size, "artifact %s unreadable: %s", m->artifact, strerror(errno));
        goto done;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        moegen_text_format(why, why_size, "artifact %s is not a regular file", m->artifact);
        goto done;
    }
    if (st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH))) {
        moegen_text_format(why, why_size, "artifact %s is writable by another user", m->artifact);
        goto done;
    }
    if ((unsigned long long)st.st_size != m->size) {
        moegen_text_format(why, why_size, "artifact is %llu bytes, manifest says %llu",
                    (unsigned long long)st.st_size, m->size);
        goto done;
    }
    if (hash_file(fd, &size, hex) != 0) {
        moegen_text_format(why, why_size, "artifact %s unreadable: %s", m->artifact, strerror(errno));
        goto done;
    }
    if (size != m->size) {
        moegen_text_format(why, why_size, "artifact changed size while being read");
        goto done;
    }
    if (strcmp(hex, m->sha256) != 0) {
        moegen_text_format(why, why_size,
                    "artifact SHA-256 %.12s... does not match the manifest's %.12s...", hex,
                    m->sha256);
        goto done;
    }
    result = 0;
done:
    if (fd >= 0)
        close(fd);
    return result;
}

/* Decide whether <entry> is a complete, trustworthy entry for (key, name).
 * `seen` receives the entry directory's lstat (zeroed if there was none). */
static entry_state validate_entry(const char *entry, const char *key, const char *name,
                                  struct stat *seen, char *why, size_t why_size) {
    entry_state state = ENTRY_BAD;
    manifest_fields m;
    char problem[REASON_BYTES];
    memset(seen, 0, sizeof *seen);
    memset(&m, 0, sizeof m);
    if (lstat(entry, seen) != 0) {
        if (errno == ENOENT || errno == ENOTDIR) { /* ENOTDIR: a parent is a file */
            state = ENTRY_MISSING;
        } else {
            moegen_text_format(why, why_size, "cannot stat it: %s", strerror(errno));
            memset(seen, 0, sizeof *seen);
        }
    } else if (private_directory_problem(seen, problem, sizeof problem)) {
        moegen_text_format(why, why_size, "entry is %s", problem);
    } else if (read_manifest(entry, &m, why, why_size) != 0) {
        /* why filled */
    } else if (strcmp(m.key, key) != 0) {
        moegen_text_format(why, why_size, "manifest is for key %.16s..., not this key", m.key);
    } else if (strcmp(m.artifact, name) != 0) {
        moegen_text_format(why, why_size, "manifest names artifact '%s', expected '%s'", m.artifact, name);
    } else if (check_artifact(entry, &m, why, why_size) == 0) {
        state = ENTRY_VALID;
    }
    return state;
}

/* Move a bad entry out of the way (under <root>/tmp/, so the real name flips from
 * complete-but-bad to absent in one step) and delete it there. If what we moved
 * is not the directory we judged (another process replaced it meanwhile), it is
 * put back. Returns 0 when the name is free of the bad entry, else -1 with errno. */
static int evict_entry(const moegen_cache *c, const char *entry, const struct stat *judged) {
    char grave[PATH_MAX];
    char moved[PATH_MAX];
    struct stat now;
    int result = -1;
    int grave_made = 0;
    if (moegen_path_format(grave, sizeof grave, "%s/tmp/evicted.XXXXXX", c->root) != 0 || !mkdtemp(grave))
        goto done;
    grave_made = 1;
    if (moegen_path_format(moved, sizeof moved, "%s/entry", grave) != 0)
        goto done;
    if (rename(entry, moved) != 0) {
        result = errno == ENOENT ? 0 : -1;
        goto done;
    }
    if (judged->st_ino != 0 && lstat(moved, &now) == 0 &&
        (now.st_ino != judged->st_ino || now.st_dev != judged->st_dev)) {
        (void)rename(moved, entry); /* not the one we judged: give it back */
    }
    result = 0;
done:
    if (grave_made) {
        int saved = errno;
        (void)moegen_remove_tree(grave);
        errno = saved;
    }
    return result;
}

/* ---- directories on the way to an entry --------------------------------------------- */

/* Is `path` an existing real directory (lstat: not a symlink) owned by this user and
 * not writable by group or others? Entries are only loaded from under such. */
static int is_trusted_directory(const char *path) {
    struct stat st;
    char problem[REASON_BYTES];
    return lstat(path, &st) == 0 && private_directory_problem(&st, problem, sizeof problem) == NULL;
}

/* Create `path` (0700) unless it exists, then require it to be trusted as above.
 * An existing untrusted directory is left alone (it may not be ours to change).
 * Returns 0, or -1 with `why` filled. */
static int ensure_trusted_directory(const char *path, char *why, size_t why_size) {
    struct stat st;
    char problem[REASON_BYTES];
    int result = -1;
    if (mkdir(path, 0700) == 0) {
        (void)chmod(path, 0700); /* an odd umask may have removed owner bits */
    } else if (errno != EEXIST) {
        moegen_text_format(why, why_size, "mkdir %s: %s", path, strerror(errno));
        goto done;
    }
    if (lstat(path, &st) != 0)
        moegen_text_format(why, why_size, "cannot stat %s: %s", path, strerror(errno));
    else if (private_directory_problem(&st, problem, sizeof problem))
        moegen_text_format(why, why_size, "%s is %s", path, problem);
    else
        result = 0;
done:
    return result;
}

/* ---- building ---------------------------------------------------------------------- */

/* Where temporary directories and logs go: index 0 is $TMPDIR when it is a sane
 * directory, index 1 is /tmp. NULL when that one is not usable. */
static const char *temporary_base(int index) {
    const char *base = index == 0 ? getenv("TMPDIR") : "/tmp";
    struct stat st;
    if (!base || base[0] != '/' || stat(base, &st) != 0 || !S_ISDIR(st.st_mode))
        return NULL;
    /* a directory others can write into without the sticky bit lets them rename
     * our private directory away and plant another */
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX) && index == 0)
        return NULL;
    return base;
}

/* A fresh private directory under $TMPDIR or /tmp. */
static int make_temporary_directory(const char *kind, char *out, size_t size) {
    int result = -1;
    for (int i = 0; i < 2 && result != 0; i++) {
        const char *base = temporary_base(i);
        if (base && moegen_path_format(out, size, "%s/moegen-%s-XXXXXX", base, kind) == 0 && mkdtemp(out))
            result = 0;
    }
    return result;
}

/* A fresh empty log file (0600, mkstemp) for an uncached build, kept if it fails:
 * $TMPDIR-or-/tmp/moegen-failed-<key[0:16]>-XXXXXX.log. Returns 0 or -1 (errno). */
static int make_temporary_log(const char *key, char *out, size_t size) {
    int result = -1;
    for (int i = 0; i < 2 && result != 0; i++) {
        const char *base = temporary_base(i);
        int fd = -1;
        if (base && moegen_path_format(out, size, "%s/moegen-failed-%.*s-XXXXXX%s", base,
                                TEMP_LOG_KEY_PREFIX_CHARS, key, FAILED_LOG_SUFFIX) == 0)
            fd = mkostemps(out, (int)strlen(FAILED_LOG_SUFFIX), O_CLOEXEC);
        if (fd >= 0) {
            (void)fchmod(fd, 0600); /* an odd umask may have removed owner bits */
            close(fd);
            result = 0;
        }
    }
    return result;
}

/* The log of a build in the cache: <root>/failed/<key>.log and the identity of the
 * file we created there (so that we never remove another process's log). */
typedef struct cache_log_file {
    char path[PATH_MAX];
    char name[KEY_HEX_CHARS + sizeof FAILED_LOG_SUFFIX];
    dev_t dev;
    ino_t ino;
} cache_log_file;

/* Make <failed_dir>/<key>.log a fresh empty file (0600) for the builder, replacing
 * an older log of this key. A log another process building the same key has just
 * created is shared. Returns 0, or -1 with `why` filled. */
static int prepare_cache_log(const char *failed_dir, const char *key, cache_log_file *log,
                             char *why, size_t why_size) {
    struct stat st;
    int result = -1;
    int stat_result = -1;
    int fd = -1;
    moegen_text_format(log->name, sizeof log->name, "%s%s", key, FAILED_LOG_SUFFIX);
    if (moegen_path_format(log->path, sizeof log->path, "%s/%s", failed_dir, log->name) != 0) {
        moegen_text_format(why, why_size, "the build log path in %s is too long", failed_dir);
        goto done;
    }
    if (unlink(log->path) != 0 && errno != ENOENT) {
        moegen_text_format(why, why_size, "cannot replace %s: %s", log->path, strerror(errno));
        goto done;
    }
    fd = open(log->path, CACHE_OPEN_CREATE, 0600);
    if (fd >= 0) {
        stat_result = fstat(fd, &st);
        (void)fchmod(fd, 0600); /* an odd umask may have removed owner bits */
    } else if (errno == EEXIST) { /* made just now by another build of this key */
        stat_result = lstat(log->path, &st);
    }
    if (stat_result != 0) {
        moegen_text_format(why, why_size, "cannot create %s: %s", log->path, strerror(errno));
        goto done;
    }
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
        moegen_text_format(why, why_size, "%s is not a regular file of this user", log->path);
        goto done;
    }
    log->dev = st.st_dev;
    log->ino = st.st_ino;
    result = 0;
done:
    if (fd >= 0)
        close(fd);
    return result;
}

/* Remove the log of a build that did not fail, if it is still the file we made. */
static void remove_cache_log(const cache_log_file *log) {
    struct stat st;
    if (lstat(log->path, &st) == 0 && st.st_dev == log->dev && st.st_ino == log->ino)
        (void)unlink(log->path);
}

typedef struct failed_log {
    char name[KEY_HEX_CHARS + sizeof FAILED_LOG_SUFFIX];
    struct timespec mtime;
    int kept; /* the log just kept: never removed */
} failed_log;

/* Newest first: the log just kept, then by mtime, then by name (deterministic). */
static int compare_failed_logs(const void *a, const void *b) {
    const failed_log *x = a, *y = b;
    int order;
    if (x->kept != y->kept)
        order = x->kept ? -1 : 1;
    else if (x->mtime.tv_sec != y->mtime.tv_sec)
        order = x->mtime.tv_sec > y->mtime.tv_sec ? -1 : 1;
    else if (x->mtime.tv_nsec != y->mtime.tv_nsec)
        order = x->mtime.tv_nsec > y->mtime.tv_nsec ? -1 : 1;
    else
        order = strcmp(x->name, y->name);
    return order;
}

/* Is `name` "<64 lowercase hex>.log"? */
static int is_failed_log_name(const char *name) {
    char key[KEY_HEX_CHARS + 1];
    int ok = strlen(name) == KEY_HEX_CHARS + strlen(FAILED_LOG_SUFFIX) &&
             strcmp(name + KEY_HEX_CHARS, FAILED_LOG_SUFFIX) == 0;
    if (ok) {
        memcpy(key, name, KEY_HEX_CHARS);
        key[KEY_HEX_CHARS] = '\0';
        ok = is_lower_hex(key, KEY_HEX_CHARS);
    }
    return ok;
}

/* Keep the MAX_FAILED_LOGS newest (by mtime) failed-build logs in `failed_dir` and
 * remove the rest; `kept` (the file name of the log just kept) always stays. Only
 * regular files named <key>.log are counted or removed. Best effort. */
static void prune_failed_logs(const char *failed_dir, const char *kept) {
    failed_log *logs = NULL;
    size_t count = 0;
    size_t capacity = 0;
    DIR *listing = NULL;
    struct dirent *item;
    int fd = open(failed_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        goto done;
    listing = fdopendir(fd);
    if (!listing) {
        close(fd);
        goto done;
    }
    while ((item = readdir(listing)) != NULL) {
        struct stat st;
        if (!is_failed_log_name(item->d_name) ||
            fstatat(dirfd(listing), item->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
            !S_ISREG(st.st_mode))
            continue;
        if (count == capacity) {
            size_t grown = capacity ? capacity * 2 : 2 * MAX_FAILED_LOGS;
            failed_log *more = realloc(logs, grown * sizeof *logs);
            if (!more)
                goto done;
            logs = more;
            capacity = grown;
        }
        copy_text(logs[count].name, sizeof logs[count].name, item->d_name);
        logs[count].mtime = st.st_mtim;
        logs[count].kept = strcmp(item->d_name, kept) == 0;
        count++;
    }
    if (count > MAX_FAILED_LOGS) {
        qsort(logs, count, sizeof *logs, compare_failed_logs);
        for (size_t i = MAX_FAILED_LOGS; i < count; i++)
            (void)unlinkat(dirfd(listing), logs[i].name, 0);
    }
done:
    free(logs);
    if (listing)
        closedir(listing); /* also closes fd */
}

/* Did a build in `work` fail because its file system is full? Yes when the error's
 * native_code is ENOSPC or EDQUOT, or when fewer than FULL_DISK_MIN_FREE_BYTES are
 * available there (a compiler reports a full disk only in its log). Fills `why`. */
static int build_failed_for_space(const char *work, const moegen_error *e, char *why,
                                  size_t why_size) {
    struct statvfs fs;
    int full = 0;
    if (e->native_code == ENOSPC || e->native_code == EDQUOT) {
        moegen_text_format(why, why_size, "the build failed: %s", strerror(e->native_code));
        full = 1;
    } else if (statvfs(work, &fs) == 0) {
        unsigned long long available = (unsigned long long)fs.f_bavail * fs.f_frsize;
        if (available < FULL_DISK_MIN_FREE_BYTES) {
            moegen_text_format(why, why_size,
                        "the build failed with %llu KiB available there, less than %llu MiB",
                        available / 1024, FULL_DISK_MIN_FREE_BYTES / (1024 * 1024));
            full = 1;
        }
    }
    return full;
}

/* Is `path` a regular file (not a symlink)? */
static int is_regular_file(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Build into a fresh temporary directory that the caller removes after loading; the
 * build log is a temporary file, kept (and named by the builder's error) on failure. */
static moegen_status build_uncached(const char *kind, const char *key, const char *name,
                                    moegen_cache_build_fn build, void *ctx,
                                    moegen_cache_result *res, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char dir[PATH_MAX];
    char artifact[PATH_MAX];
    char log_path[PATH_MAX];
    int dir_made = 0;
    int log_made = 0;
    if (make_temporary_directory(kind, dir, sizeof dir) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved,
                                  "cannot create a temporary directory for an uncached build "
                                  "under $TMPDIR or /tmp: %s",
                                  strerror(saved));
        goto done;
    }
    dir_made = 1;
    if (make_temporary_log(key, log_path, sizeof log_path) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved,
                                  "cannot create a build log for an uncached build under "
                                  "$TMPDIR or /tmp: %s",
                                  strerror(saved));
        goto done;
    }
    log_made = 1;
    if (moegen_path_format(artifact, sizeof artifact, "%s/%s", dir, name) != 0) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, ENAMETOOLONG,
                                  "temporary artifact path too long in %s", dir);
        goto done;
    }
    status = build(ctx, dir, artifact, log_path, err);
    if (status != MOEGEN_OK) {
        log_made = 0; /* kept for the user: the builder's message names it */
        goto done;
    }
    if (!is_regular_file(artifact)) {
        status =
            moegen_error_set(err, MOEGEN_ERR_IO, 0,
                             "the builder reported success but wrote no artifact %s", artifact);
        goto done;
    }
    copy_text(res->path, sizeof res->path, artifact);
    copy_text(res->temp_dir, sizeof res->temp_dir, dir);
    dir_made = 0; /* now the caller's, through moegen_cache_result_release() */
done:
    if (dir_made)
        (void)moegen_remove_tree(dir);
    if (log_made)
        (void)unlink(log_path);
    return status;
}

/* Fix the artifact's mode, fsync it and return its size and hash. */
static int seal_artifact(const char *path, unsigned long long *size, char hex[KEY_HEX_CHARS + 1]) {
    struct stat st;
    int result = -1;
    int fd = open(path, CACHE_OPEN_READ);
    if (fd < 0)
        goto done;
    if (fstat(fd, &st) != 0)
        goto done;
    if (!S_ISREG(st.st_mode)) {
        errno = EINVAL;
        goto done;
    }
    if (fchmod(fd, (st.st_mode & S_IXUSR) ? 0700 : 0600) != 0 || hash_file(fd, size, hex) != 0 ||
        fsync(fd) != 0)
        goto done;
    result = 0;
done:
    if (fd >= 0) {
        int saved = errno;
        close(fd);
        errno = saved;
    }
    return result;
}

static int write_manifest(const char *work, const char *key, const char *name,
                          unsigned long long size, const char *hex) {
    char path[PATH_MAX];
    char text[MANIFEST_MAX_BYTES];
    int result = -1;
    int fd = -1;
    int length = snprintf(text, sizeof text, "%s\nkey %s\nartifact %s\nsize %llu\nsha256 %s\n",
                          MANIFEST_FIRST_LINE, key, name, size, hex);
    if (length < 0 || (size_t)length >= sizeof text) {
        errno = ENAMETOOLONG;
        goto done;
    }
    if (moegen_path_format(path, sizeof path, "%s/%s", work, MANIFEST_NAME) != 0)
        goto done;
    fd = open(path, CACHE_OPEN_CREATE, 0600);
    if (fd < 0 || write_all(fd, text, (size_t)length) != 0 || fsync(fd) != 0)
        goto done;
    result = close(fd);
    fd = -1;
done:
    if (fd >= 0) {
        int saved = errno;
        close(fd);
        errno = saved;
    }
    return result;
}

/* Hand our built work directory to the caller as an uncached result. */
static void keep_work_as_result(const char *work, const char *name, moegen_cache_result *res) {
    moegen_text_format(res->path, sizeof res->path, "%s/%s", work, name);
    copy_text(res->temp_dir, sizeof res->temp_dir, work);
}

typedef struct publish_request {
    const char *kind, *key, *name;
    const char *kind_dir;     /* <root>/<kind> */
    const char *entry_parent; /* <root>/<kind>/<key[0:2]> */
    const char *entry;        /* <root>/<kind>/<key[0:2]>/<key> */
    const char *failed_dir;   /* <root>/failed */
    char *corrupt_why;        /* filled when a bad entry is met (REASON_BYTES) */
} publish_request;

/* rename() the sealed work directory into place, or use a valid entry another
 * process published first. `*work_owned` is cleared when the work directory
 * became the entry or the caller's temporary result. */
static void publish_work(moegen_cache *c, const publish_request *rq, const char *work,
                         int *work_owned, moegen_cache_result *res) {
    int finished = 0;
    for (int attempt = 0; attempt < PUBLISH_ATTEMPTS && !finished; attempt++) {
        char why[REASON_BYTES] = "";
        struct stat seen;
        entry_state state;
        if (rename(work, rq->entry) == 0) {
            (void)moegen_fsync_directory(rq->entry_parent, 0);
            *work_owned = 0;
            moegen_text_format(res->path, sizeof res->path, "%s/%s", rq->entry, rq->name);
            finished = 1;
        } else if (errno != EEXIST && errno != ENOTEMPTY) {
            warn_cache_trouble_once(c, "could not write to cache directory %s (rename: %s)",
                                    c->root, strerror(errno));
            keep_work_as_result(work, rq->name, res);
            *work_owned = 0;
            finished = 1;
        } else {
            state = validate_entry(rq->entry, rq->key, rq->name, &seen, why, sizeof why);
            if (state == ENTRY_VALID) { /* another process won; ours is discarded */
                moegen_text_format(res->path, sizeof res->path, "%s/%s", rq->entry, rq->name);
                finished = 1;
            } else if (state == ENTRY_BAD) {
                copy_text(rq->corrupt_why, REASON_BYTES, why);
                res->rebuilt_corrupt = 1;
                (void)evict_entry(c, rq->entry, &seen);
            }
        }
    }
    if (!finished) {
        warn_cache_trouble_once(c, "could not publish cache entry %s (it kept being replaced)",
                                rq->entry);
        keep_work_as_result(work, rq->name, res);
        *work_owned = 0;
    }
}

/* Build in <root>/tmp and publish; falls back to an uncached build when the cache
 * cannot be written or its file system is full. The build log goes to
 * <root>/failed/<key>.log and stays there only when the build fails. */
static moegen_status build_and_publish(moegen_cache *c, const publish_request *rq,
                                       moegen_cache_build_fn build, void *ctx,
                                       moegen_cache_result *res, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_error local = {MOEGEN_OK, 0, ""};
    moegen_error *e = err ? err : &local; /* the builder's native_code decides a retry */
    char work[PATH_MAX];
    char artifact[PATH_MAX];
    char hex[KEY_HEX_CHARS + 1];
    char why[REASON_BYTES + PATH_MAX] = "";
    cache_log_file log;
    unsigned long long size = 0;
    int work_owned = 0;
    int log_owned = 0;
    if (ensure_trusted_directory(rq->kind_dir, why, sizeof why) != 0 ||
        ensure_trusted_directory(rq->entry_parent, why, sizeof why) != 0 ||
        ensure_trusted_directory(rq->failed_dir, why, sizeof why) != 0 ||
        prepare_cache_log(rq->failed_dir, rq->key, &log, why, sizeof why) != 0) {
        warn_cache_trouble_once(c, "could not write to cache directory %s (%s)", c->root, why);
        status = build_uncached(rq->kind, rq->key, rq->name, build, ctx, res, err);
        goto done;
    }
    log_owned = 1;
    if (moegen_path_format(work, sizeof work, "%s/tmp/%s.%ld.XXXXXX", c->root, rq->key, (long)getpid()) !=
            0 ||
        !mkdtemp(work)) {
        warn_cache_trouble_once(c, "could not write to cache directory %s (mkdtemp: %s)", c->root,
                                strerror(errno));
        status = build_uncached(rq->kind, rq->key, rq->name, build, ctx, res, err);
        goto done;
    }
    work_owned = 1;
    if (moegen_path_format(artifact, sizeof artifact, "%s/%s", work, rq->name) != 0) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, ENAMETOOLONG, "artifact path too long in %s",
                                  work);
        goto done;
    }
    status = build(ctx, work, artifact, log.path, e);
    if (status != MOEGEN_OK && build_failed_for_space(work, e, why, sizeof why)) {
        warn_cache_trouble_once(c, "cache directory %s is full (%s)", c->root, why);
        (void)moegen_remove_tree(work); /* gives the space back before the retry */
        work_owned = 0;
        status = build_uncached(rq->kind, rq->key, rq->name, build, ctx, res, err);
        goto done; /* our log in <root>/failed is removed: the retry has its own */
    }
    if (status != MOEGEN_OK) {
        log_owned = 0; /* kept where the builder's message says */
        prune_failed_logs(rq->failed_dir, log.name);
        goto done; /* the builder's error, unchanged; nothing published */
    }
    if (!is_regular_file(artifact)) {
        status =
            moegen_error_set(err, MOEGEN_ERR_IO, 0,
                             "the builder reported success but wrote no artifact %s", artifact);
        goto done;
    }
    if (seal_artifact(artifact, &size, hex) != 0 ||
        write_manifest(work, rq->key, rq->name, size, hex) != 0 || moegen_fsync_directory(work, 0) != 0) {
        warn_cache_trouble_once(c, "could not write to cache directory %s (%s)", c->root,
                                strerror(errno));
        keep_work_as_result(work, rq->name, res);
        work_owned = 0;
        goto done;
    }
    publish_work(c, rq, work, &work_owned, res);
done:
    if (work_owned)
        (void)moegen_remove_tree(work);
    if (log_owned)
        remove_cache_log(&log);
    return status;
}

/* The directories of (kind, key) under the root. Returns 0, or -1 when a path is
 * too long. */
static int format_entry_paths(const moegen_cache *c, const char *kind, const char *key,
                              char kind_dir[PATH_MAX], char entry_parent[PATH_MAX],
                              char entry[PATH_MAX]) {
    int result = -1;
    if (moegen_path_format(kind_dir, PATH_MAX, "%s/%s", c->root, kind) == 0 &&
        moegen_path_format(entry_parent, PATH_MAX, "%s/%.2s", kind_dir, key) == 0 &&
        moegen_path_format(entry, PATH_MAX, "%s/%s", entry_parent, key) == 0)
        result = 0;
    return result;
}

static moegen_status get_cached(moegen_cache *c, const char *kind, const char *key,
                                const char *name, moegen_cache_build_fn build, void *ctx,
                                moegen_cache_result *res, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char kind_dir[PATH_MAX];
    char entry_parent[PATH_MAX];
    char entry[PATH_MAX];
    char artifact[PATH_MAX];
    char failed_dir[PATH_MAX];
    char why[REASON_BYTES] = "";
    char corrupt_why[REASON_BYTES] = "";
    struct stat seen;
    publish_request rq = {kind, key, name, kind_dir, entry_parent, entry, failed_dir, corrupt_why};
    if (format_entry_paths(c, kind, key, kind_dir, entry_parent, entry) != 0 ||
        moegen_path_format(artifact, sizeof artifact, "%s/%s", entry, name) != 0 ||
        moegen_path_format(failed_dir, sizeof failed_dir, "%s/%s", c->root, FAILED_DIR_NAME) != 0) {
        warn_cache_trouble_once(c, "cache directory %s: entry paths are too long", c->root);
        status = build_uncached(kind, key, name, build, ctx, res, err);
        goto done;
    }
    /* Nothing is loaded from under a <kind> or <key[0:2]> directory that is missing,
     * a symlink, foreign or writable by others; build_and_publish() then creates the
     * missing ones and builds in a temporary directory instead of using a bad one. */
    if (is_trusted_directory(kind_dir) && is_trusted_directory(entry_parent)) {
        switch (validate_entry(entry, key, name, &seen, why, sizeof why)) {
        case ENTRY_VALID:
            copy_text(res->path, sizeof res->path, artifact);
            res->hit = 1;
            goto done;
        case ENTRY_BAD:
            copy_text(corrupt_why, sizeof corrupt_why, why);
            res->rebuilt_corrupt = 1;
            (void)evict_entry(c, entry, &seen);
            break;
        case ENTRY_MISSING:
            break;
        }
    }
    remove_stale_work_directories(c);
    status = build_and_publish(c, &rq, build, ctx, res, err);
    if (status == MOEGEN_OK && res->rebuilt_corrupt)
        cache_log(c, MOEGEN_LOG_WARNING, "cache entry %s was corrupt (%s); rebuilt", entry,
                  corrupt_why);
done:
    return status;
}

/* Why (kind, key) cannot name an entry, or NULL when they can. */
static const char *entry_name_problem(const char *kind, const char *key_hex) {
    const char *problem = NULL;
    if (!is_valid_kind(kind))
        problem = "kind must be 1-32 characters of [a-z0-9_-] and not \"tmp\" or \"failed\"";
    else if (!key_hex || !is_lower_hex(key_hex, KEY_HEX_CHARS))
        problem = "key must be 64 lowercase hex characters";
    return problem;
}

/* Return a valid artifact for (kind, key_hex), building it on a miss (cache.h).
 * Preconditions: `c` opened with moegen_cache_open; kind 1-32 of [a-z0-9_-] (not
 * "tmp" or "failed"); key_hex 64 lowercase hex; artifact_name a plain file name of
 * [A-Za-z0-9._-] not starting with '.' and not "manifest"; build and res non-NULL.
 * Returns MOEGEN_OK (res filled; release it after loading), the builder's status
 * unchanged (nothing published; the build log kept, see cache.h), MOEGEN_ERR_IO
 * when no temporary directory or log can be made or the builder claimed success
 * without writing the artifact, or MOEGEN_ERR_INVALID_ARGUMENT for a broken
 * precondition. */
moegen_status moegen_cache_get(moegen_cache *c, const char *kind, const char *key_hex,
                               const char *artifact_name, moegen_cache_build_fn build, void *ctx,
                               moegen_cache_result *res, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    const char *problem = NULL;
    if (!c || !res || !build)
        problem = "the cache, builder and result must not be NULL";
    else if ((problem = entry_name_problem(kind, key_hex)) != NULL)
        ; /* problem says it */
    else if (!is_valid_artifact_name(artifact_name))
        problem = "artifact name must be a plain file name of [A-Za-z0-9._-] not starting "
                  "with '.' and not \"manifest\"";
    if (problem) {
        status =
            moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_cache_get: %s", problem);
        goto done;
    }
    moegen_error_clear(err);
    memset(res, 0, sizeof *res);
    if (c->usable)
        status = get_cached(c, kind, key_hex, artifact_name, build, ctx, res, err);
    else
        status = build_uncached(kind, key_hex, artifact_name, build, ctx, res, err);
done:
    return status;
}

/* Evict (kind, key_hex) after it passed its checks but failed to load (cache.h).
 * Preconditions: `c` opened with moegen_cache_open; kind and key as for
 * moegen_cache_get; `why` a one-line reason or NULL. Returns MOEGEN_OK (also when
 * there was nothing to evict), MOEGEN_ERR_IO when the entry could not be moved
 * away, or MOEGEN_ERR_INVALID_ARGUMENT for a broken precondition. */
moegen_status moegen_cache_evict(moegen_cache *c, const char *kind, const char *key_hex,
                                 const char *why, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    const char *problem = c ? entry_name_problem(kind, key_hex) : "the cache must not be NULL";
    char kind_dir[PATH_MAX];
    char entry_parent[PATH_MAX];
    char entry[PATH_MAX];
    struct stat seen;
    if (problem) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_cache_evict: %s",
                                  problem);
        goto done;
    }
    moegen_error_clear(err);
    /* An unusable cache hands out temporary directories only; too long paths and
     * untrusted directories are never loaded from: nothing of ours to evict. */
    if (!c->usable || format_entry_paths(c, kind, key_hex, kind_dir, entry_parent, entry) != 0 ||
        !is_trusted_directory(kind_dir) || !is_trusted_directory(entry_parent))
        goto done;
    if (lstat(entry, &seen) != 0) {
        int saved = errno;
        if (saved != ENOENT)
            status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "cannot stat cache entry %s: %s",
                                      entry, strerror(saved));
        goto done; /* ENOENT: already evicted, e.g. by another process */
    }
    if (evict_entry(c, entry, &seen) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "cannot evict cache entry %s: %s",
                                  entry, strerror(saved));
        goto done;
    }
    cache_log(c, MOEGEN_LOG_WARNING,
              "cache entry %s could not be used (%s); evicted, it will be rebuilt", entry,
              why && why[0] ? why : "no reason given");
done:
    return status;
}
