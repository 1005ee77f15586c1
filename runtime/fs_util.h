/* fs_util.h — the few file-system steps the runtime's on-disk stores share (the compile
 * cache, runtime/cache.c; the tuning databases, runtime/tuning_db.c): bounded path
 * formatting (and the truncating kind, for their messages), mkdir -p, and fsync of a directory
 * after a rename into it. */
#ifndef MOEGEN_RUNTIME_FS_UTIL_H
#define MOEGEN_RUNTIME_FS_UTIL_H

#include <stddef.h>
#include <sys/types.h>

/* snprintf that may truncate (messages, and paths whose length was checked). */
void moegen_text_format(char *out, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* snprintf into a path buffer; -1 (errno ENAMETOOLONG) when it does not fit. */
int moegen_path_format(char *out, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* mkdir -p: every missing directory of `path` is created with `mode` (less the umask;
 * a private mode, 0700, is also forced onto the last one, whatever the umask). Existing
 * directories, and symlinks to directories, are left alone. 0, or -1 with errno. */
int moegen_make_directories(const char *path, mode_t mode);

/* fsync a directory, so that a rename into it survives a crash. `follow_links` 0 refuses a
 * symlink (O_NOFOLLOW). File systems that cannot fsync directories count as success.
 * 0, or -1 with errno. */
int moegen_fsync_directory(const char *path, int follow_links);

#endif
