/* cuda_api.h — NVRTC and the CUDA driver API, opened at run time with dlopen.
 *
 * Place in the pipeline: spec -> gen -> [compile (NVRTC) -> cache -> load -> launch
 * (driver)]. The CUDA backend compiles generated CUDA C++ to a CUBIN with NVRTC
 * (moegen_nvrtc_compile), caches it, loads it with cuModuleLoadData and launches it
 * with cuLaunchKernel through a moegen_cuda table.
 *
 * Why dlopen: one build of moegen runs everywhere. Without a driver or a GPU the
 * library still works (CPU backend); with NVRTC alone (a CI machine without a GPU)
 * kernels can still be compiled and checked. No CUDA header is needed to build
 * moegen: the few types, constants and signatures used are declared here, with
 * the values and symbol names of CUDA 13's cuda.h and nvrtc.h (the same in 12.x).
 *
 * Invariants:
 *  - No global state. A loaded table (moegen_nvrtc, moegen_cuda) is an object the
 *    caller owns; it is filled by *_open, read-only afterwards (so it may be shared
 *    between threads), and released by *_close.
 *  - The two loaders are independent: NVRTC never needs the driver, and the driver
 *    table never needs NVRTC.
 *  - Every function pointer in a successfully opened table is non-NULL, unless its
 *    comment says "optional". Each is typed exactly as in cuda.h / nvrtc.h and is
 *    bound to the versioned symbol cuda.h maps the name to (cuMemAlloc ->
 *    cuMemAlloc_v2, ...); fields are named after the unversioned API name.
 *  - Libraries are opened RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE: a failed symbol
 *    shows up at open, and the driver (which starts threads) is never unmapped.
 *  - Driver calls here use the legacy default stream names (no _ptsz/_ptds).
 */
#ifndef MOEGEN_RUNTIME_CUDA_API_H
#define MOEGEN_RUNTIME_CUDA_API_H

#include <stddef.h>

#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- driver API types (cuda.h) ------------------------------------------------------ */

typedef int moegen_cu_result;                       /* CUresult */
typedef int moegen_cu_device;                       /* CUdevice */
typedef unsigned long long moegen_cu_device_pointer; /* CUdeviceptr (64-bit) */
typedef struct moegen_cu_context_handle *moegen_cu_context;   /* CUcontext */
typedef struct moegen_cu_module_handle *moegen_cu_module;     /* CUmodule */
typedef struct moegen_cu_function_handle *moegen_cu_function; /* CUfunction */
typedef struct moegen_cu_stream_handle *moegen_cu_stream;     /* CUstream (NULL: default stream) */
typedef struct moegen_cu_event_handle *moegen_cu_event;       /* CUevent */

/* CUresult values moegen looks at (cuda.h, enum cudaError_enum). */
enum {
    MOEGEN_CUDA_SUCCESS = 0,
    MOEGEN_CUDA_ERROR_INVALID_VALUE = 1,
    MOEGEN_CUDA_ERROR_OUT_OF_MEMORY = 2,
    MOEGEN_CUDA_ERROR_NOT_INITIALIZED = 3,
    MOEGEN_CUDA_ERROR_DEINITIALIZED = 4,
    MOEGEN_CUDA_ERROR_STUB_LIBRARY = 34,
    MOEGEN_CUDA_ERROR_INSUFFICIENT_DRIVER = 35,
    MOEGEN_CUDA_ERROR_NO_DEVICE = 100,
    MOEGEN_CUDA_ERROR_INVALID_DEVICE = 101,
    MOEGEN_CUDA_ERROR_INVALID_IMAGE = 200,
    MOEGEN_CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    MOEGEN_CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    MOEGEN_CUDA_ERROR_NOT_FOUND = 500,
    MOEGEN_CUDA_ERROR_NOT_READY = 600,
    MOEGEN_CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    MOEGEN_CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    MOEGEN_CUDA_ERROR_LAUNCH_FAILED = 719,
    MOEGEN_CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803,
    MOEGEN_CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE = 804,
    MOEGEN_CUDA_ERROR_UNKNOWN = 999
};

/* CUdevice_attribute values (cuda.h). */
enum {
    MOEGEN_CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    MOEGEN_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    MOEGEN_CU_DEVICE_ATTRIBUTE_WARP_SIZE = 10,
    MOEGEN_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    MOEGEN_CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38,
    MOEGEN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    MOEGEN_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    MOEGEN_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81,
    MOEGEN_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
};

/* CUfunction_attribute values (cuda.h). */
enum {
    MOEGEN_CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    MOEGEN_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    MOEGEN_CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES = 2,
    MOEGEN_CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    MOEGEN_CU_FUNC_ATTRIBUTE_NUM_REGS = 4,
    MOEGEN_CU_FUNC_ATTRIBUTE_PTX_VERSION = 5,
    MOEGEN_CU_FUNC_ATTRIBUTE_BINARY_VERSION = 6,
    MOEGEN_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    MOEGEN_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9
};

/* Stream and event creation flags (cuda.h, CUstream_flags / CUevent_flags). */
enum {
    MOEGEN_CU_STREAM_DEFAULT = 0,
    MOEGEN_CU_STREAM_NON_BLOCKING = 1,
    MOEGEN_CU_EVENT_DEFAULT = 0,
    MOEGEN_CU_EVENT_BLOCKING_SYNC = 1,
    MOEGEN_CU_EVENT_DISABLE_TIMING = 2
};

/* ---- NVRTC types (nvrtc.h) ------------------------------------------------------------ */

typedef int moegen_nvrtc_result;                                  /* nvrtcResult */
typedef struct moegen_nvrtc_program_handle *moegen_nvrtc_program; /* nvrtcProgram */

enum {
    MOEGEN_NVRTC_SUCCESS = 0,
    MOEGEN_NVRTC_ERROR_OUT_OF_MEMORY = 1,
    MOEGEN_NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    MOEGEN_NVRTC_ERROR_INVALID_INPUT = 3,
    MOEGEN_NVRTC_ERROR_INVALID_PROGRAM = 4,
    MOEGEN_NVRTC_ERROR_INVALID_OPTION = 5,
    MOEGEN_NVRTC_ERROR_COMPILATION = 6
};

#define MOEGEN_LIBRARY_PATH_BYTES 512
#define MOEGEN_NVRTC_MAX_ARCHS 64

/* A loaded NVRTC. Filled by moegen_nvrtc_open, read-only afterwards. */
typedef struct moegen_nvrtc {
    void *library;                         /* dlopen handle; NULL when closed */
    char library_path[MOEGEN_LIBRARY_PATH_BYTES]; /* the name or path that opened */
    int version_major, version_minor;      /* nvrtcVersion, e.g. 13, 0 */
    int arch_count;                        /* entries in archs; 0 when unknown */
    int archs[MOEGEN_NVRTC_MAX_ARCHS];     /* nvrtcGetSupportedArchs: 75, 80, ..., 121 */

    const char *(*nvrtcGetErrorString)(moegen_nvrtc_result result);
    moegen_nvrtc_result (*nvrtcVersion)(int *major, int *minor);
    moegen_nvrtc_result (*nvrtcCreateProgram)(moegen_nvrtc_program *program, const char *source,
                                              const char *name, int header_count,
                                              const char *const *headers,
                                              const char *const *include_names);
    moegen_nvrtc_result (*nvrtcDestroyProgram)(moegen_nvrtc_program *program);
    moegen_nvrtc_result (*nvrtcCompileProgram)(moegen_nvrtc_program program, int option_count,
                                               const char *const *options);
    moegen_nvrtc_result (*nvrtcGetCUBINSize)(moegen_nvrtc_program program, size_t *size);
    moegen_nvrtc_result (*nvrtcGetCUBIN)(moegen_nvrtc_program program, char *cubin);
    moegen_nvrtc_result (*nvrtcGetPTXSize)(moegen_nvrtc_program program, size_t *size);
    moegen_nvrtc_result (*nvrtcGetPTX)(moegen_nvrtc_program program, char *ptx);
    moegen_nvrtc_result (*nvrtcGetProgramLogSize)(moegen_nvrtc_program program, size_t *size);
    moegen_nvrtc_result (*nvrtcGetProgramLog)(moegen_nvrtc_program program, char *log);
    /* optional (NVRTC >= 11.2): */
    moegen_nvrtc_result (*nvrtcGetNumSupportedArchs)(int *count);
    moegen_nvrtc_result (*nvrtcGetSupportedArchs)(int *archs);
} moegen_nvrtc;

/* Open NVRTC. Tries $MOEGEN_NVRTC_LIB alone when it is set (non-empty); otherwise
 * libnvrtc.so.13, libnvrtc.so.12, libnvrtc.so (through the loader's search path),
 * then the same names under $CUDA_HOME/lib64 (when set) and /usr/local/cuda/lib64.
 * Resolves the symbols, reads the version and the supported architectures.
 * Precondition: `nv` non-NULL (its previous contents are ignored and overwritten).
 * Returns MOEGEN_OK; MOEGEN_ERR_UNSUPPORTED when no NVRTC can be opened ("NVRTC not
 * found: tried ...; last error: <dlerror>"), when the library lacks a required
 * symbol (the message names it) or is older than 11.2; MOEGEN_ERR_INVALID_ARGUMENT
 * when `nv` is NULL. On failure `nv` is left closed (safe to pass to
 * moegen_nvrtc_close). */
moegen_status moegen_nvrtc_open(moegen_nvrtc *nv, moegen_error *err);

/* Release what moegen_nvrtc_open loaded and zero `nv`. NULL, a closed or a zeroed
 * table is fine. Outputs of earlier compiles stay valid. */
void moegen_nvrtc_close(moegen_nvrtc *nv);

/* 1 if the loaded NVRTC lists `arch` ("sm_90a": the number 90) among the
 * architectures it can compile for, or cannot tell (no list); 0 otherwise or when
 * moegen_cuda_arch_parse (gen/variant.h) refuses `arch`. */
int moegen_nvrtc_supports_arch(const moegen_nvrtc *nv, const char *arch);

/* An in-memory header: `#include "<name>"` in the source resolves to `text`. */
typedef struct moegen_nvrtc_header {
    const char *name;
    const char *text;
} moegen_nvrtc_header;

/* What a compile produced. All-zero before the first use; free with
 * moegen_nvrtc_output_free. */
typedef struct moegen_nvrtc_output {
    void *cubin;        /* the CUBIN (an ELF image), malloc'd; NULL unless MOEGEN_OK */
    size_t cubin_size;
    char *log;          /* NVRTC's log (errors, warnings, ptxas -v output), malloc'd,
                           NUL-terminated, possibly ""; NULL if the program could not be
                           created */
} moegen_nvrtc_output;

/* Compile `source` (called `name` in messages, e.g. "moe_layer.cu") for `arch`
 * ("sm_80", "sm_90a", "sm_100a": a real architecture, so the result is a CUBIN)
 * with `headers` available to #include and `options` passed to NVRTC after
 * "--gpu-architecture=<arch>" (e.g. "-default-device", "--std=c++17", "-lineinfo",
 * "--ptxas-options=-v", "-DFOO=1"). With NVRTC 12.9 or newer "--no-cache" is added
 * too (unless given): otherwise, where a driver is present, NVRTC may answer from the
 * driver's compute cache and the log then lacks the ptxas -v report; moegen keeps
 * its own cache of CUBINs. `out` is overwritten (zeroed first; it must not
 * hold anything that still needs freeing) and is always safe to free afterwards.
 * Thread-safe: one table may compile on several threads at once.
 * Returns:
 *  - MOEGEN_OK: out->cubin/cubin_size hold the CUBIN and out->log the log.
 *  - MOEGEN_ERR_COMPILE: the source did not compile (NVRTC_ERROR_COMPILATION) or no
 *    CUBIN came out (e.g. an option asked for LTO IR); the message gives `name`,
 *    `arch` and the first lines of the log; the full log is in out->log; native_code
 *    is the nvrtcResult.
 *  - MOEGEN_ERR_UNSUPPORTED: this NVRTC cannot compile for `arch`.
 *  - MOEGEN_ERR_INVALID_ARGUMENT: a NULL table/name/source/out, a closed table,
 *    n_headers/n_options negative or with NULL arrays or entries, an arch that
 *    moegen_cuda_arch_parse refuses (its message), an option that sets the architecture itself
 *    ("-arch", "--gpu-architecture"), or an option NVRTC rejects
 *    (NVRTC_ERROR_INVALID_OPTION; the log says which).
 *  - MOEGEN_ERR_NO_MEMORY: an allocation failed (ours or NVRTC's).
 *  - MOEGEN_ERR_DEVICE: any other NVRTC failure (native_code = the nvrtcResult). */
moegen_status moegen_nvrtc_compile(const moegen_nvrtc *nv, const char *name, const char *source,
                                   const moegen_nvrtc_header *headers, int n_headers,
                                   const char *arch, const char *const *options, int n_options,
                                   moegen_nvrtc_output *out, moegen_error *err);

/* Free what a compile left in `out` and zero it. NULL is fine. */
void moegen_nvrtc_output_free(moegen_nvrtc_output *out);

#define MOEGEN_KERNEL_NAME_BYTES 256

/* One function in a ptxas -v report (compile with "--ptxas-options=-v"). A field
 * ptxas did not print is -1. */
typedef struct moegen_kernel_resources {
    char name[MOEGEN_KERNEL_NAME_BYTES]; /* as ptxas prints it (extern "C" name or mangled);
                                            truncated if longer */
    char arch[16];              /* "sm_90a"; "" for a non-entry function */
    int is_entry;               /* 1: a __global__ kernel; 0: a non-inlined device function */
    int registers;              /* "Used N registers" */
    int barriers;               /* "used N barriers" */
    int stack_frame_bytes;      /* "N bytes stack frame" */
    int spill_store_bytes;      /* "N bytes spill stores" */
    int spill_load_bytes;       /* "N bytes spill loads" */
    int shared_bytes;           /* "N bytes smem" (static shared memory; 0 when absent on an
                                   entry with a "Used" line) */
    int cumulative_stack_bytes; /* "N bytes cumulative stack size" */
    int constant_bytes;         /* "N bytes cmem[0]" (kernel parameters and constants) */
    int local_bytes;            /* "N bytes lmem" (older ptxas) */
} moegen_kernel_resources;

/* Parse the ptxas -v lines of an NVRTC log. Every "Compiling entry function 'K' for
 * 'ARCH'" starts an entry record that the following "Function properties for K" and
 * "Used ..." lines fill; a "Function properties for F" line for another name (a
 * non-inlined device function) starts a non-entry record. Records are in log order;
 * the first `max_out` are written to `out` (which may be NULL when max_out is 0).
 * Unknown lines are ignored. Returns the number of records in the log (may exceed
 * max_out); 0 for a NULL log. */
int moegen_nvrtc_parse_resources(const char *log, moegen_kernel_resources *out, int max_out);

/* ---- the driver ---------------------------------------------------------------------- */

/* A loaded CUDA driver. Filled by moegen_cuda_open, read-only afterwards. Call the
 * function pointers directly, e.g. cu->cuMemAlloc(&pointer, bytes). */
typedef struct moegen_cuda {
    void *library;                                /* dlopen handle; NULL when closed */
    char library_path[MOEGEN_LIBRARY_PATH_BYTES]; /* the name or path that opened */
    int driver_version;                           /* cuDriverGetVersion: 13000 = 13.0 */
    int device_count;                             /* > 0 after a successful open */

    moegen_cu_result (*cuGetErrorName)(moegen_cu_result result, const char **name);
    moegen_cu_result (*cuGetErrorString)(moegen_cu_result result, const char **text);
    moegen_cu_result (*cuInit)(unsigned int flags);
    moegen_cu_result (*cuDriverGetVersion)(int *version);
    moegen_cu_result (*cuDeviceGetCount)(int *count);
    moegen_cu_result (*cuDeviceGet)(moegen_cu_device *device, int ordinal);
    moegen_cu_result (*cuDeviceGetName)(char *name, int length, moegen_cu_device device);
    moegen_cu_result (*cuDeviceGetAttribute)(int *value, int attribute, moegen_cu_device device);
    moegen_cu_result (*cuDeviceTotalMem)(size_t *bytes, moegen_cu_device device); /* _v2 */
    moegen_cu_result (*cuDevicePrimaryCtxRetain)(moegen_cu_context *context,
                                                 moegen_cu_device device);
    moegen_cu_result (*cuDevicePrimaryCtxRelease)(moegen_cu_device device); /* _v2 */
    moegen_cu_result (*cuCtxSetCurrent)(moegen_cu_context context);
    moegen_cu_result (*cuCtxGetCurrent)(moegen_cu_context *context);
    moegen_cu_result (*cuCtxPushCurrent)(moegen_cu_context context);  /* _v2 */
    moegen_cu_result (*cuCtxPopCurrent)(moegen_cu_context *context);  /* _v2 */
    moegen_cu_result (*cuCtxSynchronize)(void);
    moegen_cu_result (*cuModuleLoadData)(moegen_cu_module *module, const void *image);
    moegen_cu_result (*cuModuleUnload)(moegen_cu_module module);
    moegen_cu_result (*cuModuleGetFunction)(moegen_cu_function *function, moegen_cu_module module,
                                            const char *name);
    moegen_cu_result (*cuModuleGetGlobal)(moegen_cu_device_pointer *pointer, size_t *bytes,
                                          moegen_cu_module module, const char *name); /* _v2 */
    moegen_cu_result (*cuFuncGetAttribute)(int *value, int attribute, moegen_cu_function function);
    moegen_cu_result (*cuFuncSetAttribute)(moegen_cu_function function, int attribute, int value);
    moegen_cu_result (*cuLaunchKernel)(moegen_cu_function function, unsigned int grid_x,
                                       unsigned int grid_y, unsigned int grid_z,
                                       unsigned int block_x, unsigned int block_y,
                                       unsigned int block_z, unsigned int shared_bytes,
                                       moegen_cu_stream stream, void **parameters, void **extra);
    moegen_cu_result (*cuMemGetInfo)(size_t *free_bytes, size_t *total_bytes); /* _v2 */
    moegen_cu_result (*cuMemAlloc)(moegen_cu_device_pointer *pointer, size_t bytes); /* _v2 */
    moegen_cu_result (*cuMemFree)(moegen_cu_device_pointer pointer);                /* _v2 */
    moegen_cu_result (*cuMemAllocHost)(void **pointer, size_t bytes);               /* _v2 */
    moegen_cu_result (*cuMemFreeHost)(void *pointer);
    moegen_cu_result (*cuMemcpyHtoD)(moegen_cu_device_pointer destination, const void *source,
                                     size_t bytes); /* _v2 */
    moegen_cu_result (*cuMemcpyDtoH)(void *destination, moegen_cu_device_pointer source,
                                     size_t bytes); /* _v2 */
    moegen_cu_result (*cuMemcpyHtoDAsync)(moegen_cu_device_pointer destination,
                                          const void *source, size_t bytes,
                                          moegen_cu_stream stream); /* _v2 */
    moegen_cu_result (*cuMemcpyDtoHAsync)(void *destination, moegen_cu_device_pointer source,
                                          size_t bytes, moegen_cu_stream stream); /* _v2 */
    moegen_cu_result (*cuMemcpyDtoDAsync)(moegen_cu_device_pointer destination,
                                          moegen_cu_device_pointer source, size_t bytes,
                                          moegen_cu_stream stream); /* _v2 */
    moegen_cu_result (*cuMemsetD8)(moegen_cu_device_pointer destination, unsigned char value,
                                   size_t count); /* _v2 */
    moegen_cu_result (*cuMemsetD8Async)(moegen_cu_device_pointer destination, unsigned char value,
                                        size_t count, moegen_cu_stream stream);
    moegen_cu_result (*cuMemsetD32Async)(moegen_cu_device_pointer destination, unsigned int value,
                                         size_t count, moegen_cu_stream stream);
    moegen_cu_result (*cuStreamCreate)(moegen_cu_stream *stream, unsigned int flags);
    moegen_cu_result (*cuStreamDestroy)(moegen_cu_stream stream); /* _v2 */
    moegen_cu_result (*cuStreamSynchronize)(moegen_cu_stream stream);
    moegen_cu_result (*cuStreamQuery)(moegen_cu_stream stream);
    moegen_cu_result (*cuStreamWaitEvent)(moegen_cu_stream stream, moegen_cu_event event,
                                          unsigned int flags);
    moegen_cu_result (*cuEventCreate)(moegen_cu_event *event, unsigned int flags);
    moegen_cu_result (*cuEventDestroy)(moegen_cu_event event); /* _v2 */
    moegen_cu_result (*cuEventRecord)(moegen_cu_event event, moegen_cu_stream stream);
    moegen_cu_result (*cuEventQuery)(moegen_cu_event event);
    moegen_cu_result (*cuEventSynchronize)(moegen_cu_event event);
    moegen_cu_result (*cuEventElapsedTime)(float *milliseconds, moegen_cu_event start,
                                           moegen_cu_event end); /* _v2, else the original */
} moegen_cuda;

/* Open the CUDA driver: dlopen $MOEGEN_CUDA_DRIVER_LIB when set (non-empty), else
 * libcuda.so.1; resolve every symbol; cuInit(0); read the driver version and count
 * the devices. Precondition: `cu` non-NULL (previous contents ignored).
 * Returns:
 *  - MOEGEN_OK: device_count > 0.
 *  - MOEGEN_ERR_UNSUPPORTED, native_code 0: "no CUDA driver (libcuda.so.1 not
 *    found: <dlerror>)", or the library lacks a symbol ("... has no cuX").
 *  - MOEGEN_ERR_UNSUPPORTED, native_code = the CUresult: "no CUDA device" (cuInit
 *    says CUDA_ERROR_NO_DEVICE, or the count is 0, native_code 100 then), or cuInit
 *    failed otherwise ("CUDA driver unusable: cuInit: CUDA_ERROR_X: ..."; the stub
 *    library, a driver too old for this toolkit, ...).
 *  - MOEGEN_ERR_DEVICE: cuDriverGetVersion or cuDeviceGetCount failed after cuInit.
 *  - MOEGEN_ERR_INVALID_ARGUMENT: `cu` is NULL.
 * On failure `cu` is left closed (safe to pass to moegen_cuda_close). */
moegen_status moegen_cuda_open(moegen_cuda *cu, moegen_error *err);

/* Release what moegen_cuda_open loaded and zero `cu`. NULL, a closed or a zeroed
 * table is fine. Does not touch contexts: release what you retained first. */
void moegen_cuda_close(moegen_cuda *cu);

/* The driver symbols moegen_cuda_open requires, by index (0 <= index <
 * moegen_cuda_symbol_count()): the versioned name looked up first, e.g.
 * "cuMemAlloc_v2". NULL for an index out of range. (Tests build fake drivers from
 * this list.) */
int moegen_cuda_symbol_count(void);
const char *moegen_cuda_symbol_name(int index);

#define MOEGEN_CUDA_DEVICE_NAME_BYTES 256
#define MOEGEN_CUDA_ARCH_BYTES 16

/* What moegen needs to know about one device. */
typedef struct moegen_cuda_device {
    int ordinal;
    char name[MOEGEN_CUDA_DEVICE_NAME_BYTES]; /* "NVIDIA H100 80GB HBM3" */
    int major, minor;                         /* compute capability */
    int sm_count;                             /* multiprocessors */
    int max_shared_per_block;                 /* bytes without opting in (48 KiB) */
    int max_shared_optin;                     /* bytes per block after opting in */
    int max_shared_per_sm;                    /* bytes per multiprocessor */
    int max_threads_per_block;
    int l2_bytes;
    size_t total_memory;                      /* bytes */
    char arch[MOEGEN_CUDA_ARCH_BYTES];        /* NVRTC target, see moegen_cuda_arch_name */
} moegen_cuda_device;

/* Describe device `ordinal` of an opened driver. Creates no context.
 * Returns MOEGEN_OK; MOEGEN_ERR_INVALID_ARGUMENT for a NULL/closed table, NULL
 * `out` or an ordinal outside [0, device_count); MOEGEN_ERR_DEVICE when a driver
 * query fails (message names the call and the CUresult; native_code = it). */
moegen_status moegen_cuda_device_info(const moegen_cuda *cu, int ordinal, moegen_cuda_device *out,
                                      moegen_error *err);

/* The NVRTC target for compute capability major.minor: "sm_<major><minor>", with an
 * "a" appended from 9.0 on (sm_90a, sm_100a, sm_120a) so that the arch-specific
 * instructions (wgmma, TMA, tcgen05) can be used; the CUBIN is then built for
 * exactly this device's architecture, which is what load-time compilation wants.
 * Writes at most `size` bytes (NUL-terminated) and returns `buffer`; "" for
 * major < 1, minor outside 0..9, or a NULL/zero-size buffer (then returns ""). */
const char *moegen_cuda_arch_name(int major, int minor, char *buffer, size_t size);

/* "CUDA_ERROR_X: description" for a CUresult, using the driver's cuGetErrorName /
 * cuGetErrorString when `cu` is open and knows the code, else a built-in table of
 * common codes, else "CUDA error <n>". Writes at most `size` bytes into `buffer`
 * and returns it; never NULL (returns "" for a NULL or zero-size buffer). `cu` may
 * be NULL or closed. */
const char *moegen_cuda_error_text(const moegen_cuda *cu, moegen_cu_result result, char *buffer,
                                   size_t size);

/* Turn a driver call's result into a status: MOEGEN_OK for CUDA_SUCCESS, else
 * MOEGEN_ERR_DEVICE with "<what>: CUDA_ERROR_X: description" in `err` and
 * native_code = result. `what` names the call ("cuMemAlloc(1048576 bytes)"); NULL is
 * read as "CUDA driver call". Usage:
 *   status = moegen_cuda_check(cu, cu->cuMemAlloc(&p, n), "cuMemAlloc", err); */
moegen_status moegen_cuda_check(const moegen_cuda *cu, moegen_cu_result result, const char *what,
                                moegen_error *err);

#ifdef __cplusplus
}
#endif
#endif
