/* status.c — status names and error filling (see moegen_status.h). */
#include "moegen_status.h"

#include <stdio.h>
#include <string.h>

const char *moegen_status_name(moegen_status status) {
    switch (status) {
    case MOEGEN_OK: return "MOEGEN_OK";
    case MOEGEN_ERR_INVALID_ARGUMENT: return "MOEGEN_ERR_INVALID_ARGUMENT";
    case MOEGEN_ERR_SPEC: return "MOEGEN_ERR_SPEC";
    case MOEGEN_ERR_TEMPLATE: return "MOEGEN_ERR_TEMPLATE";
    case MOEGEN_ERR_COMPILE: return "MOEGEN_ERR_COMPILE";
    case MOEGEN_ERR_CACHE: return "MOEGEN_ERR_CACHE";
    case MOEGEN_ERR_LOAD: return "MOEGEN_ERR_LOAD";
    case MOEGEN_ERR_IO: return "MOEGEN_ERR_IO";
    case MOEGEN_ERR_NO_MEMORY: return "MOEGEN_ERR_NO_MEMORY";
    case MOEGEN_ERR_UNSUPPORTED: return "MOEGEN_ERR_UNSUPPORTED";
    case MOEGEN_ERR_DEVICE: return "MOEGEN_ERR_DEVICE";
    case MOEGEN_ERR_STATE: return "MOEGEN_ERR_STATE";
    case MOEGEN_ERR_NUMERIC: return "MOEGEN_ERR_NUMERIC";
    case MOEGEN_ERR_COMM: return "MOEGEN_ERR_COMM";
    }
    return "MOEGEN_ERR_UNKNOWN";
}

moegen_status moegen_error_setv(moegen_error *err, moegen_status code, int native_code,
                                const char *fmt, va_list ap) {
    if (err) {
        err->code = code;
        err->native_code = native_code;
        vsnprintf(err->message, sizeof err->message, fmt, ap);
    }
    return code;
}

moegen_status moegen_error_set(moegen_error *err, moegen_status code, int native_code,
                               const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    moegen_error_setv(err, code, native_code, fmt, ap);
    va_end(ap);
    return code;
}

void moegen_error_clear(moegen_error *err) {
    if (err) {
        err->code = MOEGEN_OK;
        err->native_code = 0;
        err->message[0] = '\0';
    }
}
