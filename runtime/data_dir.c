/* data_dir.c — where moegen's read-only data lives (runtime/data_dir.h). */
#define _GNU_SOURCE
#include "data_dir.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fs_util.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* "<dir of the object holding this function>/../share/moegen/<what>", or -1. */
static int beside_binary(const char *what, char *out, size_t size) {
    Dl_info info;
    if (!dladdr((void *)&moegen_data_path, &info) || !info.dli_fname || !info.dli_fname[0]) return -1;
    char resolved[PATH_MAX];
    if (!realpath(info.dli_fname, resolved)) return -1;
    char *slash = strrchr(resolved, '/');
    if (!slash) return -1;
    *slash = '\0';
    if (moegen_path_format(out, size, "%s/../share/moegen/%s", resolved, what) != 0) return -1;
    return is_directory(out) ? 0 : -1;
}

int moegen_data_path(const char *what, char *out, size_t size) {
    if (!out || size == 0) return -1;
    out[0] = '\0';
    if (!what || !what[0]) return -1;
    const char *from_env = getenv("MOEGEN_DATA_DIR");
    if (from_env && from_env[0]) {
        if (moegen_path_format(out, size, "%s/%s", from_env, what) == 0 && is_directory(out)) return 0;
        out[0] = '\0';
        return -1; /* an explicit setting is never second-guessed */
    }
    if (beside_binary(what, out, size) == 0) return 0;
#ifdef MOEGEN_SOURCE_DIR
    if (moegen_path_format(out, size, "%s/%s", MOEGEN_SOURCE_DIR, what) == 0 && is_directory(out)) return 0;
#endif
    out[0] = '\0';
    return -1;
}

moegen_status moegen_template_dir(const char *explicit_dir, char *out, size_t size, moegen_error *err) {
    out[0] = '\0';
    const char *from_env = getenv("MOEGEN_TEMPLATE_DIR");
    const char *dir = explicit_dir && explicit_dir[0] ? explicit_dir : from_env && from_env[0] ? from_env : NULL;
    if (!dir) return MOEGEN_OK;
    const char *source = dir == explicit_dir ? "the template_dir option" : "$MOEGEN_TEMPLATE_DIR";
    if (moegen_path_format(out, size, "%s", dir) != 0) {
        out[0] = '\0';
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: the path is too long", source);
    }
    if (!is_directory(out)) {
        out[0] = '\0';
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s names %s, which is not a directory", source,
                                dir);
    }
    return MOEGEN_OK;
}
