/* moegen_status.h — status codes and the error struct shared by every moegen module.
 *
 * Every fallible function in gen/ and runtime/ returns a moegen_status and, when
 * given a non-NULL moegen_error, fills it with the code, the underlying library's
 * code (CUDA, NVRTC, NCCL, errno, ...) and a one-line message that says where:
 * "specs/x.yaml:12:7: ...", "templates/y.c.tpl:40: ...", a cache entry path.
 * There is no process-wide "last error".
 *
 * This header is part of the public API (moegen.h includes it).
 */
#ifndef MOEGEN_STATUS_H
#define MOEGEN_STATUS_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moegen_status {
    MOEGEN_OK = 0,
    MOEGEN_ERR_INVALID_ARGUMENT = -1, /* API misuse: NULL pointer, wrong size, unbound weights */
    MOEGEN_ERR_SPEC = -2,             /* the spec failed validation */
    MOEGEN_ERR_TEMPLATE = -3,         /* a template failed to render (a generator bug or a bad template) */
    MOEGEN_ERR_COMPILE = -4,          /* the host compiler or NVRTC rejected generated code */
    MOEGEN_ERR_CACHE = -5,            /* the compile cache failed in a way that could not be worked around */
    MOEGEN_ERR_LOAD = -6,             /* dlopen / module load failed */
    MOEGEN_ERR_IO = -7,               /* a file could not be read or written */
    MOEGEN_ERR_NO_MEMORY = -8,
    MOEGEN_ERR_UNSUPPORTED = -9,      /* valid request this build or machine cannot do */
    MOEGEN_ERR_DEVICE = -10,          /* CUDA driver / device failure */
    MOEGEN_ERR_STATE = -11,           /* call out of order (e.g. forward before bind) */
    MOEGEN_ERR_NUMERIC = -12,         /* a check on results failed (verification) */
    MOEGEN_ERR_COMM = -13             /* a collective across expert-parallel ranks failed or timed out */
} moegen_status;

#define MOEGEN_ERROR_MESSAGE_BYTES 1024

typedef struct moegen_error {
    moegen_status code;
    int native_code; /* errno, CUresult, nvrtcResult, ncclResult_t, ... or 0 */
    char message[MOEGEN_ERROR_MESSAGE_BYTES];
} moegen_error;

/* Short name of a status code, e.g. "MOEGEN_ERR_SPEC". Never NULL. */
const char *moegen_status_name(moegen_status status);

/* Fill `err` (if non-NULL) and return `code`. The message is printf-formatted
 * and truncated to fit. */
moegen_status moegen_error_set(moegen_error *err, moegen_status code, int native_code,
                               const char *fmt, ...) __attribute__((format(printf, 4, 5)));
moegen_status moegen_error_setv(moegen_error *err, moegen_status code, int native_code,
                                const char *fmt, va_list ap);

/* Clear `err` (if non-NULL) to MOEGEN_OK and an empty message. */
void moegen_error_clear(moegen_error *err);

#ifdef __cplusplus
}
#endif
#endif
