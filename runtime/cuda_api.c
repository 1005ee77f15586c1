/* cuda_api.c — NVRTC and the CUDA driver API, opened at run time (see cuda_api.h).
 *
 * Place in the pipeline: spec -> gen -> [compile (NVRTC) -> cache -> load -> launch
 * (driver)]. This file only loads the two libraries, compiles a source to a CUBIN,
 * reads ptxas -v reports, describes devices and words errors; the CUDA backend
 * built on top owns contexts, modules, memory and launches.
 *
 * Invariants:
 *  - No global mutable state: the symbol tables below are const, and every loaded
 *    library lives in a caller-owned moegen_nvrtc / moegen_cuda.
 *  - A table is either fully open (library handle set, every required function
 *    pointer non-NULL, versions read) or fully closed (all zero): each open
 *    function closes what it opened before returning a failure.
 *  - Symbols are bound by name through a table of {versioned name, fallback name,
 *    field offset}; the address from dlsym is copied into the typed function
 *    pointer field, which POSIX guarantees has the representation of a void *.
 *  - Libraries are opened with RTLD_NODELETE, so a dlclose never unmaps the driver
 *    while its threads run, and never unmaps NVRTC under memory it handed out.
 *  - Nothing here writes to stdout/stderr; all failures go into moegen_error.
 *  - A compile's outputs (CUBIN and log) depend only on its inputs: NVRTC's own
 *    cache in the driver's compute cache is turned off ("--no-cache", NVRTC 12.9+),
 *    because moegen caches CUBINs itself (cache.c) and a cache hit there would drop
 *    the ptxas -v report from the log.
 */
#define _GNU_SOURCE
#include "cuda_api.h"

#include <dlfcn.h>
#include <link.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "variant.h" /* moegen_cuda_arch_parse: the one parser of "sm_XX" */

_Static_assert(sizeof(void *) == sizeof(void (*)(void)),
               "function pointers must have the size of data pointers (POSIX dlsym)");

#define OPEN_FLAGS (RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE)
#define NVRTC_ENVIRONMENT "MOEGEN_NVRTC_LIB"
#define DRIVER_ENVIRONMENT "MOEGEN_CUDA_DRIVER_LIB"
#define DRIVER_DEFAULT_NAME "libcuda.so.1"
#define CANDIDATE_BYTES 512
#define MAX_CANDIDATES 12
#define TRIED_BYTES 600
#define LOG_EXCERPT_BYTES 700
#define LOG_EXCERPT_LINES 10
#define ARCH_OPTION_BYTES 64
#define NAME_TEXT_BYTES 160
#define NO_CACHE_OPTION "--no-cache"

/* ---- symbol tables --------------------------------------------------------------------- */

/* One function pointer to bind: look up `name`, else `fallback` (may be NULL). */
typedef struct symbol_entry {
    const char *name;
    const char *fallback;
    size_t offset; /* of the field in the table struct */
} symbol_entry;

#define NVRTC_SYMBOL(field) {#field, NULL, offsetof(moegen_nvrtc, field)}
#define DRIVER_SYMBOL(field) {#field, NULL, offsetof(moegen_cuda, field)}
#define DRIVER_VERSIONED(field, symbol) {symbol, NULL, offsetof(moegen_cuda, field)}
#define DRIVER_VERSIONED_OR(field, symbol, fallback)                                               \
    {symbol, fallback, offsetof(moegen_cuda, field)}

static const symbol_entry nvrtc_required_symbols[] = {
    NVRTC_SYMBOL(nvrtcGetErrorString),    NVRTC_SYMBOL(nvrtcVersion),
    NVRTC_SYMBOL(nvrtcCreateProgram),     NVRTC_SYMBOL(nvrtcDestroyProgram),
    NVRTC_SYMBOL(nvrtcCompileProgram),    NVRTC_SYMBOL(nvrtcGetCUBINSize),
    NVRTC_SYMBOL(nvrtcGetCUBIN),          NVRTC_SYMBOL(nvrtcGetPTXSize),
    NVRTC_SYMBOL(nvrtcGetPTX),            NVRTC_SYMBOL(nvrtcGetProgramLogSize),
    NVRTC_SYMBOL(nvrtcGetProgramLog),
};

static const symbol_entry nvrtc_optional_symbols[] = {
    NVRTC_SYMBOL(nvrtcGetNumSupportedArchs),
    NVRTC_SYMBOL(nvrtcGetSupportedArchs),
};

/* Names as cuda.h (CUDA 13) maps them; all present in every 12.x and 13.x driver
 * except cuEventElapsedTime_v2 (12.8+), hence its fallback. */
static const symbol_entry driver_symbols[] = {
    DRIVER_SYMBOL(cuGetErrorName),
    DRIVER_SYMBOL(cuGetErrorString),
    DRIVER_SYMBOL(cuInit),
    DRIVER_SYMBOL(cuDriverGetVersion),
    DRIVER_SYMBOL(cuDeviceGetCount),
    DRIVER_SYMBOL(cuDeviceGet),
    DRIVER_SYMBOL(cuDeviceGetName),
    DRIVER_SYMBOL(cuDeviceGetAttribute),
    DRIVER_VERSIONED(cuDeviceTotalMem, "cuDeviceTotalMem_v2"),
    DRIVER_SYMBOL(cuDevicePrimaryCtxRetain),
    DRIVER_VERSIONED(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"),
    DRIVER_SYMBOL(cuCtxSetCurrent),
    DRIVER_SYMBOL(cuCtxGetCurrent),
    DRIVER_VERSIONED(cuCtxPushCurrent, "cuCtxPushCurrent_v2"),
    DRIVER_VERSIONED(cuCtxPopCurrent, "cuCtxPopCurrent_v2"),
    DRIVER_SYMBOL(cuCtxSynchronize),
    DRIVER_SYMBOL(cuModuleLoadData),
    DRIVER_SYMBOL(cuModuleUnload),
    DRIVER_SYMBOL(cuModuleGetFunction),
    DRIVER_VERSIONED(cuModuleGetGlobal, "cuModuleGetGlobal_v2"),
    DRIVER_SYMBOL(cuFuncGetAttribute),
    DRIVER_SYMBOL(cuFuncSetAttribute),
    DRIVER_SYMBOL(cuLaunchKernel),
    DRIVER_VERSIONED(cuMemGetInfo, "cuMemGetInfo_v2"),
    DRIVER_VERSIONED(cuMemAlloc, "cuMemAlloc_v2"),
    DRIVER_VERSIONED(cuMemFree, "cuMemFree_v2"),
    DRIVER_VERSIONED(cuMemAllocHost, "cuMemAllocHost_v2"),
    DRIVER_SYMBOL(cuMemFreeHost),
    DRIVER_VERSIONED(cuMemcpyHtoD, "cuMemcpyHtoD_v2"),
    DRIVER_VERSIONED(cuMemcpyDtoH, "cuMemcpyDtoH_v2"),
    DRIVER_VERSIONED(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"),
    DRIVER_VERSIONED(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"),
    DRIVER_VERSIONED(cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2"),
    DRIVER_VERSIONED(cuMemsetD8, "cuMemsetD8_v2"),
    DRIVER_SYMBOL(cuMemsetD8Async),
    DRIVER_SYMBOL(cuMemsetD32Async),
    DRIVER_SYMBOL(cuStreamCreate),
    DRIVER_VERSIONED(cuStreamDestroy, "cuStreamDestroy_v2"),
    DRIVER_SYMBOL(cuStreamSynchronize),
    DRIVER_SYMBOL(cuStreamQuery),
    DRIVER_SYMBOL(cuStreamWaitEvent),
    DRIVER_SYMBOL(cuEventCreate),
    DRIVER_VERSIONED(cuEventDestroy, "cuEventDestroy_v2"),
    DRIVER_SYMBOL(cuEventRecord),
    DRIVER_SYMBOL(cuEventQuery),
    DRIVER_SYMBOL(cuEventSynchronize),
    DRIVER_VERSIONED_OR(cuEventElapsedTime, "cuEventElapsedTime_v2", "cuEventElapsedTime"),
};

#define COUNT_OF(array) ((int)(sizeof(array) / sizeof((array)[0])))

/* Look `entry` up in `library` and store it into `table`; 0 when neither name is
 * there (the field is left NULL). */
static int bind_symbol(void *library, const symbol_entry *entry, void *table) {
    void *address;
    dlerror();
    address = dlsym(library, entry->name);
    if (!address && entry->fallback)
        address = dlsym(library, entry->fallback);
    memcpy((char *)table + entry->offset, &address, sizeof address);
    return address != NULL;
}

/* Bind every entry; on a missing one, return its index (else -1). */
static int bind_symbols(void *library, const symbol_entry *entries, int count, void *table) {
    int missing = -1;
    for (int index = 0; index < count && missing < 0; index++)
        if (!bind_symbol(library, &entries[index], table))
            missing = index;
    return missing;
}

/* Copy text into a fixed buffer, truncating. */
static void copy_text(char *dst, size_t size, const char *src) {
    size_t n = strnlen(src, size - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* The file a handle was opened from (falls back to the name we passed). */
static void record_library_path(void *library, const char *opened_as, char *path, size_t size) {
    struct link_map *map = NULL;
    if (dlinfo(library, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0])
        copy_text(path, size, map->l_name);
    else
        copy_text(path, size, opened_as);
}

/* Try each candidate in order. Returns the handle (and its index in *which), or
 * NULL with the last dlerror() text in `last_error`. */
static void *open_first(char candidates[][CANDIDATE_BYTES], int count, int *which,
                        char *last_error, size_t error_size) {
    void *library = NULL;
    last_error[0] = '\0';
    for (int index = 0; index < count && !library; index++) {
        library = dlopen(candidates[index], OPEN_FLAGS);
        if (library) {
            *which = index;
        } else {
            const char *text = dlerror();
            snprintf(last_error, error_size, "%s", text ? text : "unknown dlopen error");
        }
    }
    return library;
}

/* ---- NVRTC ----------------------------------------------------------------------------- */

/* Fill `candidates` with the NVRTC names to try; returns how many. */
static int nvrtc_candidates(char candidates[][CANDIDATE_BYTES]) {
    static const char *const names[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
    const char *override = getenv(NVRTC_ENVIRONMENT);
    const char *cuda_home = getenv("CUDA_HOME");
    int count = 0;
    if (override && override[0]) {
        snprintf(candidates[count++], CANDIDATE_BYTES, "%s", override);
    } else {
        for (int index = 0; index < COUNT_OF(names); index++)
            snprintf(candidates[count++], CANDIDATE_BYTES, "%s", names[index]);
        if (cuda_home && cuda_home[0])
            for (int index = 0; index < COUNT_OF(names); index++)
                snprintf(candidates[count++], CANDIDATE_BYTES, "%.400s/lib64/%s", cuda_home,
                         names[index]);
        for (int index = 0; index < COUNT_OF(names); index++)
            snprintf(candidates[count++], CANDIDATE_BYTES, "/usr/local/cuda/lib64/%s",
                     names[index]);
    }
    return count;
}

/* Read the architecture list, if this NVRTC can give it. */
static void read_supported_archs(moegen_nvrtc *nv) {
    int count = 0;
    nv->arch_count = 0;
    if (nv->nvrtcGetNumSupportedArchs && nv->nvrtcGetSupportedArchs &&
        nv->nvrtcGetNumSupportedArchs(&count) == MOEGEN_NVRTC_SUCCESS && count > 0 &&
        count <= MOEGEN_NVRTC_MAX_ARCHS &&
        nv->nvrtcGetSupportedArchs(nv->archs) == MOEGEN_NVRTC_SUCCESS)
        nv->arch_count = count;
}

moegen_status moegen_nvrtc_open(moegen_nvrtc *nv, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char candidates[MAX_CANDIDATES][CANDIDATE_BYTES];
    char last_error[CANDIDATE_BYTES];
    int count;
    int which = 0;
    int missing;
    moegen_nvrtc_result result;
    if (!nv) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_nvrtc_open: the table is NULL");
        goto done;
    }
    memset(nv, 0, sizeof *nv);
    moegen_error_clear(err);
    count = nvrtc_candidates(candidates);
    nv->library = open_first(candidates, count, &which, last_error, sizeof last_error);
    if (!nv->library) {
        if (count == 1)
            status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                      "NVRTC not found: $%s=%s cannot be opened: %s",
                                      NVRTC_ENVIRONMENT, candidates[0], last_error);
        else
            status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                      "NVRTC not found (tried libnvrtc.so.13, libnvrtc.so.12, "
                                      "libnvrtc.so on the library path, $CUDA_HOME/lib64 and "
                                      "/usr/local/cuda/lib64; set $%s to its path): %s",
                                      NVRTC_ENVIRONMENT, last_error);
        goto done;
    }
    record_library_path(nv->library, candidates[which], nv->library_path,
                        sizeof nv->library_path);
    missing = bind_symbols(nv->library, nvrtc_required_symbols,
                           COUNT_OF(nvrtc_required_symbols), nv);
    if (missing >= 0) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "NVRTC library %s has no %s (NVRTC 11.2 or newer is needed)",
                                  nv->library_path, nvrtc_required_symbols[missing].name);
        goto done;
    }
    bind_symbols(nv->library, nvrtc_optional_symbols, COUNT_OF(nvrtc_optional_symbols), nv);
    result = nv->nvrtcVersion(&nv->version_major, &nv->version_minor);
    if (result != MOEGEN_NVRTC_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, result,
                                  "NVRTC library %s: nvrtcVersion failed (%d)", nv->library_path,
                                  result);
        goto done;
    }
    if (nv->version_major < 11 || (nv->version_major == 11 && nv->version_minor < 2)) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "NVRTC library %s is version %d.%d; 11.2 or newer is needed",
                                  nv->library_path, nv->version_major, nv->version_minor);
        goto done;
    }
    read_supported_archs(nv);
done:
    if (status != MOEGEN_OK && nv)
        moegen_nvrtc_close(nv);
    return status;
}

void moegen_nvrtc_close(moegen_nvrtc *nv) {
    if (nv) {
        if (nv->library)
            dlclose(nv->library);
        memset(nv, 0, sizeof *nv);
    }
}

/* The compute capability x10 of `arch` ("sm_90a": 90), or -1 when moegen_cuda_arch_parse
 * refuses it (its message then goes to `err`, which may be NULL). */
static int arch_number(const char *arch, moegen_error *err) {
    moegen_cuda_arch parsed;
    return moegen_cuda_arch_parse(arch, &parsed, err) == MOEGEN_OK ? parsed.sm : -1;
}

int moegen_nvrtc_supports_arch(const moegen_nvrtc *nv, const char *arch) {
    int number = arch_number(arch, NULL);
    int supported = 0;
    if (number >= 0 && nv) {
        supported = nv->arch_count == 0;
        for (int index = 0; index < nv->arch_count && !supported; index++)
            supported = nv->archs[index] == number;
    }
    return supported;
}

/* "sm_75 sm_80 ... sm_121" for a message. */
static void describe_archs(const moegen_nvrtc *nv, char *text, size_t size) {
    size_t used = 0;
    text[0] = '\0';
    for (int index = 0; index < nv->arch_count && used + 1 < size; index++) {
        int wrote = snprintf(text + used, size - used, "%ssm_%d", index ? " " : "",
                             nv->archs[index]);
        if (wrote < 0)
            break;
        used += (size_t)wrote;
    }
}

/* The first lines of `log`, for an error message (never ends in a newline). */
static void log_excerpt(const char *log, char *out, size_t size) {
    size_t length = 0;
    int lines = 0;
    out[0] = '\0';
    while (log && log[length] && length + 1 < size) {
        out[length] = log[length];
        if (log[length] == '\n' && ++lines == LOG_EXCERPT_LINES)
            break;
        length++;
    }
    out[length] = '\0';
    while (length > 0 && (out[length - 1] == '\n' || out[length - 1] == '\r'))
        out[--length] = '\0';
}

/* 1 if `option` would choose the target itself (our `arch` argument does that). */
static int option_sets_arch(const char *option) {
    return strncmp(option, "-arch", 5) == 0 || strncmp(option, "--gpu-architecture", 18) == 0 ||
           strncmp(option, "-gpu-architecture", 17) == 0;
}

/* NVRTC 12.9 and newer keep compiled programs in the driver's compute cache
 * (~/.nv/ComputeCache) when a driver is present; a hit returns the CUBIN without
 * running ptxas, so the log loses the ptxas -v report. */
static int nvrtc_has_driver_cache(const moegen_nvrtc *nv) {
    return nv->version_major > 12 || (nv->version_major == 12 && nv->version_minor >= 9);
}

static int has_option(const char *const *options, int count, const char *option) {
    int found = 0;
    for (int index = 0; index < count && !found; index++)
        found = strcmp(options[index], option) == 0;
    return found;
}

/* The NVRTC error's name, robust to a missing or odd nvrtcGetErrorString. */
static const char *nvrtc_result_name(const moegen_nvrtc *nv, moegen_nvrtc_result result) {
    const char *name = nv->nvrtcGetErrorString ? nv->nvrtcGetErrorString(result) : NULL;
    return name ? name : "NVRTC error";
}

/* Check the arguments of moegen_nvrtc_compile; MOEGEN_OK when usable. */
static moegen_status check_compile_arguments(const moegen_nvrtc *nv, const char *name,
                                             const char *source,
                                             const moegen_nvrtc_header *headers, int n_headers,
                                             const char *arch, const char *const *options,
                                             int n_options, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char supported[TRIED_BYTES];
    moegen_error why;
    if (!nv || !nv->library || !name || !source) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_nvrtc_compile: needs an open NVRTC, a name, a source "
                                  "and an output");
        goto done;
    }
    if (n_headers < 0 || (n_headers > 0 && !headers) || n_options < 0 ||
        (n_options > 0 && !options)) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_nvrtc_compile(%s): bad header or option array", name);
        goto done;
    }
    for (int index = 0; index < n_headers; index++) {
        if (!headers[index].name || !headers[index].name[0] || !headers[index].text) {
            status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                      "moegen_nvrtc_compile(%s): header %d has no name or text",
                                      name, index);
            goto done;
        }
    }
    for (int index = 0; index < n_options; index++) {
        if (!options[index] || option_sets_arch(options[index])) {
            status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                      "moegen_nvrtc_compile(%s): option %d is %s%s", name, index,
                                      options[index] ? options[index] : "NULL",
                                      options[index] ? " (pass the target as `arch`)" : "");
            goto done;
        }
    }
    if (arch_number(arch, &why) < 0) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_nvrtc_compile(%s): %s (a real GPU architecture, for a CUBIN)",
                                  name, why.message);
        goto done;
    }
    if (!moegen_nvrtc_supports_arch(nv, arch)) {
        describe_archs(nv, supported, sizeof supported);
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "NVRTC %d.%d cannot compile for %s (it supports %s)",
                                  nv->version_major, nv->version_minor, arch, supported);
        goto done;
    }
done:
    return status;
}

/* Copy the program's log into out->log. */
static moegen_status fetch_log(const moegen_nvrtc *nv, moegen_nvrtc_program program,
                               const char *name, moegen_nvrtc_output *out, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    size_t size = 0;
    moegen_nvrtc_result result = nv->nvrtcGetProgramLogSize(program, &size);
    if (result != MOEGEN_NVRTC_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_DEVICE, result,
                                  "%s: nvrtcGetProgramLogSize failed: %s", name,
                                  nvrtc_result_name(nv, result));
        goto done;
    }
    out->log = malloc(size + 1);
    if (!out->log) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "%s: no memory for a %zu-byte log",
                                  name, size);
        goto done;
    }
    out->log[0] = '\0';
    if (size > 0) {
        result = nv->nvrtcGetProgramLog(program, out->log);
        if (result != MOEGEN_NVRTC_SUCCESS) {
            status = moegen_error_set(err, MOEGEN_ERR_DEVICE, result,
                                      "%s: nvrtcGetProgramLog failed: %s", name,
                                      nvrtc_result_name(nv, result));
            goto done;
        }
    }
    out->log[size] = '\0';
done:
    return status;
}

/* Copy the program's CUBIN into out->cubin. */
static moegen_status fetch_cubin(const moegen_nvrtc *nv, moegen_nvrtc_program program,
                                 const char *name, const char *arch, moegen_nvrtc_output *out,
                                 moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    size_t size = 0;
    moegen_nvrtc_result result = nv->nvrtcGetCUBINSize(program, &size);
    if (result != MOEGEN_NVRTC_SUCCESS || size == 0) {
        status = moegen_error_set(err, MOEGEN_ERR_COMPILE, result,
                                  "NVRTC compiled %s for %s but produced no CUBIN (%s); does an "
                                  "option ask for PTX or LTO IR?",
                                  name, arch, nvrtc_result_name(nv, result));
        goto done;
    }
    out->cubin = malloc(size);
    if (!out->cubin) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                  "%s: no memory for a %zu-byte CUBIN", name, size);
        goto done;
    }
    result = nv->nvrtcGetCUBIN(program, out->cubin);
    if (result != MOEGEN_NVRTC_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_DEVICE, result, "%s: nvrtcGetCUBIN failed: %s",
                                  name, nvrtc_result_name(nv, result));
        goto done;
    }
    out->cubin_size = size;
done:
    if (status != MOEGEN_OK) {
        free(out->cubin);
        out->cubin = NULL;
        out->cubin_size = 0;
    }
    return status;
}

/* The status for a failed nvrtcCompileProgram / nvrtcCreateProgram. */
static moegen_status compile_failure(const moegen_nvrtc *nv, moegen_nvrtc_result result,
                                     const char *step, const char *name, const char *arch,
                                     const char *log, moegen_error *err) {
    char excerpt[LOG_EXCERPT_BYTES];
    moegen_status code = MOEGEN_ERR_DEVICE;
    log_excerpt(log, excerpt, sizeof excerpt);
    if (result == MOEGEN_NVRTC_ERROR_COMPILATION)
        code = MOEGEN_ERR_COMPILE;
    else if (result == MOEGEN_NVRTC_ERROR_INVALID_OPTION)
        code = MOEGEN_ERR_INVALID_ARGUMENT;
    else if (result == MOEGEN_NVRTC_ERROR_OUT_OF_MEMORY)
        code = MOEGEN_ERR_NO_MEMORY;
    return moegen_error_set(err, code, result, "NVRTC %d.%d %s %s for %s (%s)%s%s",
                            nv->version_major, nv->version_minor, step, name, arch,
                            nvrtc_result_name(nv, result), excerpt[0] ? ":\n" : "", excerpt);
}

moegen_status moegen_nvrtc_compile(const moegen_nvrtc *nv, const char *name, const char *source,
                                   const moegen_nvrtc_header *headers, int n_headers,
                                   const char *arch, const char *const *options, int n_options,
                                   moegen_nvrtc_output *out, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_nvrtc_program program = NULL;
    const char **header_names = NULL;
    const char **header_texts = NULL;
    const char **all_options = NULL;
    char arch_option[ARCH_OPTION_BYTES];
    int option_count = 0;
    moegen_nvrtc_result result;
    if (!out) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_nvrtc_compile: the output is NULL");
        goto done;
    }
    memset(out, 0, sizeof *out);
    status = check_compile_arguments(nv, name, source, headers, n_headers, arch, options,
                                     n_options, err);
    if (status != MOEGEN_OK)
        goto done;
    moegen_error_clear(err);
    header_names = calloc((size_t)n_headers + 1, sizeof *header_names);
    header_texts = calloc((size_t)n_headers + 1, sizeof *header_texts);
    all_options = calloc((size_t)n_options + 2, sizeof *all_options);
    if (!header_names || !header_texts || !all_options) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                  "%s: no memory for the NVRTC arguments", name);
        goto done;
    }
    for (int index = 0; index < n_headers; index++) {
        header_names[index] = headers[index].name;
        header_texts[index] = headers[index].text;
    }
    snprintf(arch_option, sizeof arch_option, "--gpu-architecture=%s", arch);
    all_options[option_count++] = arch_option;
    if (nvrtc_has_driver_cache(nv) && !has_option(options, n_options, NO_CACHE_OPTION))
        all_options[option_count++] = NO_CACHE_OPTION;
    for (int index = 0; index < n_options; index++)
        all_options[option_count++] = options[index];
    result = nv->nvrtcCreateProgram(&program, source, name, n_headers,
                                    n_headers ? header_texts : NULL,
                                    n_headers ? header_names : NULL);
    if (result != MOEGEN_NVRTC_SUCCESS) {
        program = NULL;
        status = compile_failure(nv, result, "could not create a program from", name, arch, NULL,
                                 err);
        goto done;
    }
    result = nv->nvrtcCompileProgram(program, option_count, all_options);
    status = fetch_log(nv, program, name, out, err);
    if (status != MOEGEN_OK)
        goto done;
    if (result != MOEGEN_NVRTC_SUCCESS) {
        status = compile_failure(nv, result, "failed to compile", name, arch, out->log, err);
        goto done;
    }
    status = fetch_cubin(nv, program, name, arch, out, err);
done:
    if (program)
        nv->nvrtcDestroyProgram(&program);
    free(header_names);
    free(header_texts);
    free(all_options);
    return status;
}

void moegen_nvrtc_output_free(moegen_nvrtc_output *out) {
    if (out) {
        free(out->cubin);
        free(out->log);
        memset(out, 0, sizeof *out);
    }
}

/* ---- ptxas -v reports ------------------------------------------------------------------ */

/* A record with every number unknown. */
static void reset_resources(moegen_kernel_resources *record) {
    memset(record, 0, sizeof *record);
    record->registers = -1;
    record->barriers = -1;
    record->stack_frame_bytes = -1;
    record->spill_store_bytes = -1;
    record->spill_load_bytes = -1;
    record->shared_bytes = -1;
    record->cumulative_stack_bytes = -1;
    record->constant_bytes = -1;
    record->local_bytes = -1;
}

/* Copy the text in [begin, end) into a fixed buffer, truncating. */
static void copy_span(char *target, size_t size, const char *begin, const char *end) {
    size_t length = (size_t)(end - begin);
    if (length >= size)
        length = size - 1;
    memcpy(target, begin, length);
    target[length] = '\0';
}

/* Read a non-negative decimal at *cursor (after spaces), advance past it; -1 if none. */
static long read_number(const char **cursor) {
    const char *at = *cursor;
    long value = 0;
    int digits = 0;
    while (*at == ' ' || *at == '\t')
        at++;
    while (*at >= '0' && *at <= '9' && digits < 10) {
        value = value * 10 + (*at - '0');
        at++;
        digits++;
    }
    if (digits > 0)
        *cursor = at;
    return digits > 0 ? value : -1;
}

/* Is `text` at `at` (ignoring leading spaces)? Advance past it if so. */
static int skip_word(const char **cursor, const char *text) {
    const char *at = *cursor;
    size_t length = strlen(text);
    while (*at == ' ' || *at == '\t')
        at++;
    int found = strncmp(at, text, length) == 0;
    if (found)
        *cursor = at + length;
    return found;
}

/* Fill the counters named in one comma-separated list of a line spanning
 * [begin, end): "N registers", "used N barriers", "N bytes smem", "N bytes stack
 * frame", ... Unrecognized items are skipped. */
static void read_counters(const char *begin, const char *end, moegen_kernel_resources *record) {
    const char *item = begin;
    while (item < end) {
        const char *comma = memchr(item, ',', (size_t)(end - item));
        const char *item_end = comma ? comma : end;
        const char *cursor = item;
        long value;
        char unit[48];
        skip_word(&cursor, "Used");
        skip_word(&cursor, "used");
        value = read_number(&cursor);
        if (value >= 0 && value <= INT32_MAX) {
            while (cursor < item_end && (*cursor == ' ' || *cursor == '\t'))
                cursor++;
            copy_span(unit, sizeof unit, cursor, item_end);
            for (size_t length = strlen(unit); length > 0 && unit[length - 1] == ' ';)
                unit[--length] = '\0';
            if (strcmp(unit, "registers") == 0)
                record->registers = (int)value;
            else if (strcmp(unit, "barriers") == 0)
                record->barriers = (int)value;
            else if (strcmp(unit, "bytes smem") == 0)
                record->shared_bytes = (int)value;
            else if (strcmp(unit, "bytes stack frame") == 0)
                record->stack_frame_bytes = (int)value;
            else if (strcmp(unit, "bytes spill stores") == 0)
                record->spill_store_bytes = (int)value;
            else if (strcmp(unit, "bytes spill loads") == 0)
                record->spill_load_bytes = (int)value;
            else if (strcmp(unit, "bytes cumulative stack size") == 0)
                record->cumulative_stack_bytes = (int)value;
            else if (strcmp(unit, "bytes cmem[0]") == 0)
                record->constant_bytes = (int)value;
            else if (strcmp(unit, "bytes lmem") == 0)
                record->local_bytes = (int)value;
        }
        item = comma ? comma + 1 : end;
    }
}

/* Parser state: the record being filled lives in `out` while it fits, else in
 * `overflow` (so counting goes on past max_out). */
typedef struct report_parser {
    moegen_kernel_resources *out;
    int max_out;
    int count;                        /* records started */
    moegen_kernel_resources overflow;
    moegen_kernel_resources *current; /* NULL before the first record */
} report_parser;

static moegen_kernel_resources *start_record(report_parser *parser) {
    moegen_kernel_resources *record =
        parser->count < parser->max_out ? &parser->out[parser->count] : &parser->overflow;
    reset_resources(record);
    parser->count++;
    parser->current = record;
    return record;
}

/* One log line [begin, end). */
static void parse_report_line(report_parser *parser, const char *begin, const char *end) {
    static const char entry_marker[] = "Compiling entry function '";
    static const char properties_marker[] = "Function properties for ";
    char line[NAME_TEXT_BYTES + MOEGEN_KERNEL_NAME_BYTES];
    const char *found;
    copy_span(line, sizeof line, begin, end);
    if ((found = strstr(line, entry_marker)) != NULL) {
        const char *name = found + sizeof entry_marker - 1;
        const char *name_end = strchr(name, '\'');
        if (name_end) {
            moegen_kernel_resources *record = start_record(parser);
            record->is_entry = 1;
            copy_span(record->name, sizeof record->name, name, name_end);
            found = strstr(name_end + 1, "for '");
            if (found) {
                const char *arch = found + 5;
                const char *arch_end = strchr(arch, '\'');
                if (arch_end)
                    copy_span(record->arch, sizeof record->arch, arch, arch_end);
            }
        }
    } else if ((found = strstr(line, properties_marker)) != NULL) {
        const char *name = found + sizeof properties_marker - 1;
        size_t length = strcspn(name, " \t\r");
        char function_name[MOEGEN_KERNEL_NAME_BYTES];
        copy_span(function_name, sizeof function_name, name, name + length);
        if (!parser->current || !parser->current->is_entry ||
            strcmp(parser->current->name, function_name) != 0 ||
            parser->current->stack_frame_bytes >= 0) {
            moegen_kernel_resources *record = start_record(parser);
            snprintf(record->name, sizeof record->name, "%s", function_name);
        }
    } else if (parser->current) {
        const char *used = strstr(line, "Used ");
        if (used) {
            if (parser->current->is_entry && parser->current->shared_bytes < 0)
                parser->current->shared_bytes = 0; /* ptxas leaves out "0 bytes smem" */
            read_counters(used, line + strlen(line), parser->current);
        } else if (strstr(line, "bytes stack frame")) {
            const char *counters = line;
            while (*counters && !(*counters >= '0' && *counters <= '9'))
                counters++;
            read_counters(counters, line + strlen(line), parser->current);
        }
    }
}

int moegen_nvrtc_parse_resources(const char *log, moegen_kernel_resources *out, int max_out) {
    report_parser parser;
    const char *line = log;
    memset(&parser, 0, sizeof parser);
    parser.out = out;
    parser.max_out = out ? (max_out > 0 ? max_out : 0) : 0;
    while (line && *line) {
        const char *line_end = strchr(line, '\n');
        if (!line_end)
            line_end = line + strlen(line);
        if (strncmp(line, "ptxas", 5) == 0)
            parse_report_line(&parser, line, line_end);
        line = *line_end ? line_end + 1 : line_end;
    }
    return parser.count;
}

/* ---- the driver ------------------------------------------------------------------------ */

int moegen_cuda_symbol_count(void) {
    return COUNT_OF(driver_symbols);
}

const char *moegen_cuda_symbol_name(int index) {
    return index >= 0 && index < COUNT_OF(driver_symbols) ? driver_symbols[index].name : NULL;
}

/* Built-in names for the codes a caller is most likely to meet before (or
 * without) a working cuGetErrorName. */
typedef struct result_text {
    moegen_cu_result result;
    const char *name;
    const char *description;
} result_text;

static const result_text known_results[] = {
    {MOEGEN_CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {MOEGEN_CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {MOEGEN_CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {MOEGEN_CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {MOEGEN_CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {MOEGEN_CUDA_ERROR_STUB_LIBRARY, "CUDA_ERROR_STUB_LIBRARY",
     "CUDA driver is a stub library"},
    {MOEGEN_CUDA_ERROR_INSUFFICIENT_DRIVER, "CUDA_ERROR_INSUFFICIENT_DRIVER",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {MOEGEN_CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {MOEGEN_CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {MOEGEN_CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {MOEGEN_CUDA_ERROR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU",
     "no kernel image is available for execution on the device"},
    {MOEGEN_CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
     "the provided PTX was compiled with an unsupported toolchain"},
    {MOEGEN_CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {MOEGEN_CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {MOEGEN_CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {MOEGEN_CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
     "too many resources requested for launch"},
    {MOEGEN_CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED",
     "unspecified launch failure"},
    {MOEGEN_CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
     "system has unsupported display driver / cuda driver combination"},
    {MOEGEN_CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
     "forward compatibility was attempted on non supported HW"},
    {MOEGEN_CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const char *moegen_cuda_error_text(const moegen_cuda *cu, moegen_cu_result result, char *buffer,
                                   size_t size) {
    const char *name = NULL;
    const char *description = NULL;
    const char *text = "";
    if (buffer && size > 0) {
        if (cu && cu->library && cu->cuGetErrorName && cu->cuGetErrorString &&
            cu->cuGetErrorName(result, &name) == MOEGEN_CUDA_SUCCESS && name) {
            if (cu->cuGetErrorString(result, &description) != MOEGEN_CUDA_SUCCESS)
                description = NULL;
        } else {
            name = NULL;
            for (int index = 0; index < COUNT_OF(known_results) && !name; index++) {
                if (known_results[index].result == result) {
                    name = known_results[index].name;
                    description = known_results[index].description;
                }
            }
        }
        if (name && description)
            snprintf(buffer, size, "%s: %s", name, description);
        else if (name)
            snprintf(buffer, size, "%s", name);
        else
            snprintf(buffer, size, "CUDA error %d", result);
        text = buffer;
    }
    return text;
}

moegen_status moegen_cuda_check(const moegen_cuda *cu, moegen_cu_result result, const char *what,
                                moegen_error *err) {
    char text[NAME_TEXT_BYTES * 2];
    moegen_status status = MOEGEN_OK;
    if (result != MOEGEN_CUDA_SUCCESS) {
        moegen_cuda_error_text(cu, result, text, sizeof text);
        status = moegen_error_set(err, MOEGEN_ERR_DEVICE, result, "%s: %s",
                                  what ? what : "CUDA driver call", text);
    }
    return status;
}

moegen_status moegen_cuda_open(moegen_cuda *cu, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char candidate[1][CANDIDATE_BYTES];
    char last_error[CANDIDATE_BYTES];
    char text[NAME_TEXT_BYTES * 2];
    const char *override = getenv(DRIVER_ENVIRONMENT);
    int which = 0;
    int missing;
    moegen_cu_result result;
    if (!cu) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_cuda_open: the table is NULL");
        goto done;
    }
    memset(cu, 0, sizeof *cu);
    moegen_error_clear(err);
    snprintf(candidate[0], CANDIDATE_BYTES, "%s",
             override && override[0] ? override : DRIVER_DEFAULT_NAME);
    cu->library = open_first(candidate, 1, &which, last_error, sizeof last_error);
    if (!cu->library) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "no CUDA driver (%s not found: %s)", candidate[0], last_error);
        goto done;
    }
    record_library_path(cu->library, candidate[0], cu->library_path, sizeof cu->library_path);
    missing = bind_symbols(cu->library, driver_symbols, COUNT_OF(driver_symbols), cu);
    if (missing >= 0) {
        const symbol_entry *entry = &driver_symbols[missing];
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "CUDA driver %s has no %s%s%s (driver too old or not a CUDA "
                                  "driver)",
                                  cu->library_path, entry->name, entry->fallback ? " nor " : "",
                                  entry->fallback ? entry->fallback : "");
        goto done;
    }
    result = cu->cuInit(0);
    if (result == MOEGEN_CUDA_ERROR_NO_DEVICE) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, result,
                                  "no CUDA device (driver %s: cuInit: %s)", cu->library_path,
                                  moegen_cuda_error_text(cu, result, text, sizeof text));
        goto done;
    }
    if (result != MOEGEN_CUDA_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, result,
                                  "CUDA driver unusable (%s): cuInit: %s", cu->library_path,
                                  moegen_cuda_error_text(cu, result, text, sizeof text));
        goto done;
    }
    result = cu->cuDriverGetVersion(&cu->driver_version);
    if (result != MOEGEN_CUDA_SUCCESS) {
        status = moegen_cuda_check(cu, result, "cuDriverGetVersion", err);
        goto done;
    }
    result = cu->cuDeviceGetCount(&cu->device_count);
    if (result != MOEGEN_CUDA_SUCCESS) {
        status = moegen_cuda_check(cu, result, "cuDeviceGetCount", err);
        goto done;
    }
    if (cu->device_count <= 0) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, MOEGEN_CUDA_ERROR_NO_DEVICE,
                                  "no CUDA device (driver %s, version %d.%d, counts 0 devices)",
                                  cu->library_path, cu->driver_version / 1000,
                                  cu->driver_version % 1000 / 10);
        goto done;
    }
done:
    if (status != MOEGEN_OK && cu)
        moegen_cuda_close(cu);
    return status;
}

void moegen_cuda_close(moegen_cuda *cu) {
    if (cu) {
        if (cu->library)
            dlclose(cu->library);
        memset(cu, 0, sizeof *cu);
    }
}

const char *moegen_cuda_arch_name(int major, int minor, char *buffer, size_t size) {
    const char *text = "";
    if (buffer && size > 0) {
        buffer[0] = '\0';
        if (major >= 1 && major < 100 && minor >= 0 && minor <= 9)
            snprintf(buffer, size, "sm_%d%d%s", major, minor, major >= 9 ? "a" : "");
        text = buffer;
    }
    return text;
}

/* One device attribute to read into a moegen_cuda_device field. */
typedef struct attribute_query {
    int attribute;
    const char *name;
    size_t offset; /* of an int field in moegen_cuda_device */
} attribute_query;

#define DEVICE_ATTRIBUTE(attribute, field)                                                         \
    {MOEGEN_CU_DEVICE_ATTRIBUTE_##attribute, #attribute, offsetof(moegen_cuda_device, field)}

static const attribute_query device_attributes[] = {
    DEVICE_ATTRIBUTE(COMPUTE_CAPABILITY_MAJOR, major),
    DEVICE_ATTRIBUTE(COMPUTE_CAPABILITY_MINOR, minor),
    DEVICE_ATTRIBUTE(MULTIPROCESSOR_COUNT, sm_count),
    DEVICE_ATTRIBUTE(MAX_SHARED_MEMORY_PER_BLOCK, max_shared_per_block),
    DEVICE_ATTRIBUTE(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, max_shared_optin),
    DEVICE_ATTRIBUTE(MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, max_shared_per_sm),
    DEVICE_ATTRIBUTE(MAX_THREADS_PER_BLOCK, max_threads_per_block),
    DEVICE_ATTRIBUTE(L2_CACHE_SIZE, l2_bytes),
};

moegen_status moegen_cuda_device_info(const moegen_cuda *cu, int ordinal, moegen_cuda_device *out,
                                      moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_cu_device device = 0;
    moegen_cu_result result;
    char what[NAME_TEXT_BYTES];
    if (!cu || !cu->library || !out) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_cuda_device_info: needs an open driver and an output");
        goto done;
    }
    if (ordinal < 0 || ordinal >= cu->device_count) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "CUDA device %d does not exist (%d device%s)", ordinal,
                                  cu->device_count, cu->device_count == 1 ? "" : "s");
        goto done;
    }
    memset(out, 0, sizeof *out);
    moegen_error_clear(err);
    out->ordinal = ordinal;
    snprintf(what, sizeof what, "cuDeviceGet(%d)", ordinal);
    status = moegen_cuda_check(cu, cu->cuDeviceGet(&device, ordinal), what, err);
    if (status != MOEGEN_OK)
        goto done;
    snprintf(what, sizeof what, "cuDeviceGetName(device %d)", ordinal);
    status = moegen_cuda_check(
        cu, cu->cuDeviceGetName(out->name, (int)sizeof out->name - 1, device), what, err);
    if (status != MOEGEN_OK)
        goto done;
    out->name[sizeof out->name - 1] = '\0';
    for (int index = 0; index < COUNT_OF(device_attributes) && status == MOEGEN_OK; index++) {
        int value = 0;
        const attribute_query *query = &device_attributes[index];
        snprintf(what, sizeof what, "cuDeviceGetAttribute(%s, device %d)", query->name, ordinal);
        result = cu->cuDeviceGetAttribute(&value, query->attribute, device);
        status = moegen_cuda_check(cu, result, what, err);
        if (status == MOEGEN_OK)
            memcpy((char *)out + query->offset, &value, sizeof value);
    }
    if (status != MOEGEN_OK)
        goto done;
    snprintf(what, sizeof what, "cuDeviceTotalMem(device %d)", ordinal);
    status = moegen_cuda_check(cu, cu->cuDeviceTotalMem(&out->total_memory, device), what, err);
    if (status != MOEGEN_OK)
        goto done;
    moegen_cuda_arch_name(out->major, out->minor, out->arch, sizeof out->arch);
done:
    return status;
}
