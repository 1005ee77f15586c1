/* cache.h — the on-disk compile cache shared by the host-C and NVRTC backends.
 *
 * Place in the pipeline: spec -> gen -> [compile -> cache] -> load -> launch.
 *
 * Layout: <root>/<kind>/<key[0:2]>/<key>/{<artifact>, manifest}, where kind is a
 * backend tag ("cpu", "cuda"), key is a 64-hex SHA-256 computed by the caller over
 * everything that determines the artifact (generator version, generated source,
 * headers, compiler identity and version, architecture, flags; never absolute
 * paths, $HOME or the cwd), and manifest records the key, artifact name, size and
 * SHA-256 of the artifact. <root>/tmp holds work directories; <root>/failed holds
 * the logs of failed builds, <key>.log, at most 16 (the oldest by mtime go first).
 *
 * Invariants owned here:
 *  - An entry is built in a private temporary directory under <root>/tmp, fsynced,
 *    and renamed into place; a reader never sees a partial entry. If another
 *    process publishes the same key first, ours is discarded and theirs used.
 *  - Before an entry is used its manifest is parsed and the artifact's size and
 *    hash are checked. A bad entry (truncated, random bytes, wrong hash, wrong key,
 *    a FIFO, device or symlink where a file should be) is evicted, rebuilt and
 *    reported with one warning. Files in the cache are opened with O_NONBLOCK and
 *    O_NOFOLLOW and anything but a regular file is refused, so nothing blocks.
 *  - The root must be a directory owned by this user and not writable by group or
 *    others. If it is missing and cannot be created, read-only, full, foreign-owned
 *    or group/world-writable, the cache is "unusable": builds go to a fresh
 *    temporary directory (mkdtemp under $TMPDIR or /tmp), a warning is given once
 *    per moegen_cache, and the call still succeeds.
 *  - <root>/<kind>, <root>/<kind>/<key[0:2]>, <root>/failed and each entry
 *    directory must be real directories (not symlinks) owned by this user and not
 *    writable by group or others. A bad entry directory is evicted and rebuilt; a
 *    bad one of the others is never loaded from, written to or deleted: the build
 *    goes to a temporary directory with the one warning, and the call succeeds.
 *  - A build that fails keeps its log: <root>/failed/<key>.log (directory 0700,
 *    file 0600), or with an unusable cache a mkstemp file
 *    $TMPDIR-or-/tmp/moegen-failed-<key[0:16]>-XXXXXX.log. The builder is told this
 *    path up front, so its error message names a file that still exists.
 *  - A build that fails in the cache's work directory because the cache's file
 *    system is full (the error's native_code is ENOSPC or EDQUOT, or fewer than
 *    64 MiB are free there) is retried once in a temporary directory, with the one
 *    warning. Failed writes while publishing fall back the same way.
 */
#ifndef MOEGEN_RUNTIME_CACHE_H
#define MOEGEN_RUNTIME_CACHE_H

#include <limits.h>

#include "moegen.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

typedef struct moegen_cache {
    char root[PATH_MAX]; /* resolved root ("" when none could be resolved) */
    int usable;          /* 0: every build goes to a temporary directory */
    int warned;          /* the unusable-cache warning was given */
    moegen_log_fn log;   /* NULL: stderr */
    void *log_user;
} moegen_cache;

/* Resolve the root: `dir` if non-NULL, else $MOEGEN_CACHE_DIR, else
 * $XDG_CACHE_HOME/moegen, else $HOME/.cache/moegen. Creates it (mode 0700) if
 * missing and checks ownership and permissions. Never fails because the directory
 * is unusable: sets c->usable = 0 and logs one warning saying why.
 * Returns MOEGEN_OK (or MOEGEN_ERR_INVALID_ARGUMENT for a NULL `c`). */
moegen_status moegen_cache_open(moegen_cache *c, const char *dir, moegen_log_fn log,
                                void *log_user, moegen_error *err);

/* Builds an artifact: write the file `artifact_path` (inside `work_dir`, a private
 * empty directory the builder may also use for sources). Write the build's log
 * (compiler output) to `log_path`, an existing empty file of this user outside
 * `work_dir` that the cache keeps when the build fails (and removes when it
 * succeeds); an error message should name it. Return MOEGEN_OK or an error (which
 * moegen_cache_get passes on unchanged, unless the cache's disk was full and an
 * uncached retry succeeded). */
typedef moegen_status (*moegen_cache_build_fn)(void *ctx, const char *work_dir,
                                               const char *artifact_path,
                                               const char *log_path, moegen_error *err);

typedef struct moegen_cache_result {
    char path[PATH_MAX];     /* the artifact to load */
    int hit;                 /* 1: a valid entry was already there */
    int rebuilt_corrupt;     /* 1: a bad entry was evicted and rebuilt */
    char temp_dir[PATH_MAX]; /* non-empty: a temporary directory to remove after loading */
} moegen_cache_result;

/* Return the path of a valid artifact for (kind, key), building and publishing it
 * with `build` on a miss. `artifact_name` is a plain file name ("module.so").
 * On an unusable cache the artifact is built in a temporary directory that the
 * caller removes with moegen_cache_result_release() once loaded.
 * Returns MOEGEN_OK, the builder's error, or MOEGEN_ERR_IO / MOEGEN_ERR_NO_MEMORY
 * when not even a temporary directory can be made. */
moegen_status moegen_cache_get(moegen_cache *c, const char *kind, const char *key_hex,
                               const char *artifact_name, moegen_cache_build_fn build,
                               void *ctx, moegen_cache_result *res, moegen_error *err);

/* Evict the entry (kind, key_hex) because it passed its checks but could not be
 * used (dlopen failed, symbols missing): it is removed the same safe way as a
 * corrupt entry and one warning names the entry and `why` (may be NULL). The next
 * moegen_cache_get rebuilds it. Nothing happens for an unusable cache, a missing
 * entry, or an entry under a directory the cache does not trust (it never loads
 * from there). Returns MOEGEN_OK, MOEGEN_ERR_IO when the entry could not be moved
 * away, or MOEGEN_ERR_INVALID_ARGUMENT for a NULL `c` or a malformed kind or key. */
moegen_status moegen_cache_evict(moegen_cache *c, const char *kind, const char *key_hex,
                                 const char *why, moegen_error *err);

/* Remove the temporary directory of an uncached result, if any. */
void moegen_cache_result_release(moegen_cache_result *res);

/* Remove a directory tree (files and subdirectories; no symlink following).
 * Returns 0 or -1. Shared helper for temporary directories. */
int moegen_remove_tree(const char *path);

#endif
