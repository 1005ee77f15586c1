/* fs_util.c — see fs_util.h. */
#define _GNU_SOURCE
#include "fs_util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

void moegen_text_format(char *out, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, size, fmt, ap);
    va_end(ap);
}

int moegen_path_format(char *out, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const int written = vsnprintf(out, size, fmt, ap);
    va_end(ap);
    if (written < 0 || (size_t)written >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

int moegen_make_directories(const char *path, mode_t mode) {
    char partial[PATH_MAX];
    if (moegen_path_format(partial, sizeof partial, "%s", path) != 0) return -1;
    for (char *p = partial + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        const int failed = mkdir(partial, mode) != 0 && errno != EEXIST;
        *p = '/';
        if (failed) return -1;
    }
    if (mkdir(partial, mode) == 0) {
        if ((mode & 077) == 0) (void)chmod(partial, mode); /* an odd umask may have removed owner bits */
    } else if (errno != EEXIST) {
        return -1;
    }
    return 0;
}

int moegen_fsync_directory(const char *path, int follow_links) {
    const int fd = open(path, O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC | (follow_links ? 0 : O_NOFOLLOW));
    if (fd < 0) return -1;
    int result = fsync(fd);
    if (result != 0 && (errno == EINVAL || errno == ENOTSUP)) result = 0;
    const int saved = errno;
    close(fd);
    errno = saved;
    return result;
}
