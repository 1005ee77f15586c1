/* comm_nccl.c — the NCCL transport of the expert-parallel communicator (see comm.h), and
 * the run-time loaded NCCL table it calls through (see nccl_api.h).
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. moegen_comm_create_nccl
 * joins this rank to an NCCL communicator on one CUDA device and hands comm.c four
 * callbacks (memory MOEGEN_COMM_DEVICE): alltoall and alltoallv as grouped
 * ncclSend/ncclRecv of bytes, allreduce_max as ncclAllReduce(int64, max) and allgather as
 * ncclAllGather. comm.c adds the broken flag, the byte counters and the messages.
 *
 * STATUS: this file has only been compiled and run against fake libraries (a fake
 * libnccl and a fake libcuda built by tests/test_comm_nccl.c) and against the real
 * libnccl.so.2 without a GPU (unique ids only). Nothing here has run on a GPU yet.
 *
 * Invariants:
 *  - No global mutable state. The NCCL table, the CUDA driver table, the retained primary
 *    context, the stream, the event, the staging buffers and the ncclComm_t all belong to
 *    one nccl_state, the `user` of the communicator's callbacks, freed by its destroy.
 *  - Never wait without a deadline. The communicator is non-blocking (config.blocking =
 *    0): creation polls ncclCommGetAsyncError until ncclSuccess, and every collective
 *    polls (a) ncclCommGetAsyncError until NCCL has enqueued its work, then (b) an event
 *    recorded after that work together with ncclCommGetAsyncError, each against the
 *    collective's deadline. A timeout or an asynchronous error aborts the NCCL
 *    communicator (ncclCommAbort ends NCCL's kernels that wait for a peer), after which
 *    every callback fails at once and destroy only frees.
 *  - Any failed callback leaves the NCCL communicator aborted: comm.c marks the
 *    communicator broken on the first failure anyway, and a rank that gives up must not
 *    leave kernels waiting on the GPU.
 *  - Every entry point makes the device's primary context current on the calling thread
 *    (cuCtxPushCurrent) for the NCCL and driver calls, and pops it before returning, so
 *    the caller's own current context is untouched.
 *  - Streams: alltoall and alltoallv run on the stream they are given (a CUstream of the
 *    device's primary context), or on the communicator's own stream when it is NULL (as
 *    comm.c passes today). The own stream is created with CU_STREAM_DEFAULT flags, so it
 *    is ordered after work on the legacy default stream. allreduce_max and allgather
 *    take host buffers (the callback signatures in moegen.h) and run on the own stream,
 *    staged through a pinned host buffer and a device buffer, both kept and grown.
 *  - Host memory is only touched after the event says the device is done with it: the
 *    staging copies are asynchronous from pinned memory, never the synchronous
 *    pageable kind that would block the host without a deadline.
 *  - No single ncclSend/ncclRecv moves more than 1 GiB: larger transfers are split into
 *    chunks, and both sides split the same byte count the same way, so they match.
 *  - One collective at a time per communicator (every rank calls them in the same order;
 *    comm.h); NCCL group state is per thread, and every ncclGroupStart is closed by an
 *    ncclGroupEnd even when a call inside the group failed.
 *  - Callbacks return 0, or on failure the ncclResult_t NCCL failed with, the CUresult the
 *    driver failed with, or -1 (a timeout, bad arguments, an aborted communicator), with a
 *    one-line reason in `why`.
 */
#define _GNU_SOURCE
#include "comm.h"
#include "cuda_api.h"
#include "nccl_api.h"

#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

_Static_assert(sizeof(void *) == sizeof(void (*)(void)),
               "function pointers must have the size of data pointers (POSIX dlsym)");
_Static_assert(sizeof(moegen_nccl_unique_id) == MOEGEN_NCCL_UNIQUE_ID_BYTES, "ncclUniqueId is 128 bytes");
_Static_assert(sizeof(moegen_nccl_config) == 80, "ncclConfig_t of NCCL 2.28 is 80 bytes on LP64");

#define OPEN_FLAGS (RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE)
#define NCCL_ENVIRONMENT "MOEGEN_NCCL_LIB"
#define CANDIDATE_BYTES 512
#define TEXT_BYTES 400
#define CHUNK_BYTES ((size_t)1 << 30) /* the most one ncclSend/ncclRecv moves */
#define STAGING_MIN_BYTES 4096
#define SPIN_POLLS 100      /* polls with only a yield in between, then short sleeps */
#define SHORT_SLEEP_POLLS 1000
#define SHORT_SLEEP_NS 50000L
#define LONG_SLEEP_NS 1000000L

/* ---- the NCCL table ---------------------------------------------------------------------- */

/* One function pointer to bind. */
typedef struct symbol_entry {
    const char *name;
    size_t offset; /* of the field in moegen_nccl */
} symbol_entry;

#define NCCL_SYMBOL(field) {#field, offsetof(moegen_nccl, field)}

static const symbol_entry required_symbols[] = {
    NCCL_SYMBOL(ncclGetErrorString),    NCCL_SYMBOL(ncclGetVersion),   NCCL_SYMBOL(ncclGetUniqueId),
    NCCL_SYMBOL(ncclCommInitRankConfig), NCCL_SYMBOL(ncclCommGetAsyncError), NCCL_SYMBOL(ncclCommFinalize),
    NCCL_SYMBOL(ncclCommDestroy),       NCCL_SYMBOL(ncclCommAbort),    NCCL_SYMBOL(ncclGroupStart),
    NCCL_SYMBOL(ncclGroupEnd),          NCCL_SYMBOL(ncclSend),         NCCL_SYMBOL(ncclRecv),
    NCCL_SYMBOL(ncclAllReduce),         NCCL_SYMBOL(ncclAllGather),
};

static const symbol_entry optional_symbols[] = {
    NCCL_SYMBOL(ncclGetLastError),
};

#define COUNT_OF(array) ((int)(sizeof(array) / sizeof((array)[0])))

int moegen_nccl_symbol_count(void) { return COUNT_OF(required_symbols); }

const char *moegen_nccl_symbol_name(int index) {
    return index >= 0 && index < COUNT_OF(required_symbols) ? required_symbols[index].name : NULL;
}

void moegen_nccl_config_init(moegen_nccl_config *config) {
    if (config) {
        memset(config, 0, sizeof *config);
        config->size = sizeof *config;
        config->magic = MOEGEN_NCCL_CONFIG_MAGIC;
        config->version = MOEGEN_NCCL_CONFIG_VERSION;
        config->blocking = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->cgaClusterSize = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->minCTAs = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->maxCTAs = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->netName = NULL;
        config->splitShare = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->trafficClass = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->commName = NULL;
        config->collnetEnable = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->CTAPolicy = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->shrinkShare = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->nvlsCTAs = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->nChannelsPerNetPeer = MOEGEN_NCCL_CONFIG_UNDEF_INT;
        config->nvlinkCentricSched = MOEGEN_NCCL_CONFIG_UNDEF_INT;
    }
}

/* Look `entry` up and store it into `table`; 0 when absent (the field stays NULL and
 * `why` gets dlerror's text). */
static int bind_symbol(void *library, const symbol_entry *entry, moegen_nccl *table, char *why, size_t why_size) {
    void *address;
    const char *text;
    dlerror();
    address = dlsym(library, entry->name);
    if (!address) {
        text = dlerror();
        snprintf(why, why_size, "%s", text ? text : "dlsym found nothing");
    }
    memcpy((char *)table + entry->offset, &address, sizeof address);
    return address != NULL;
}

/* The file a handle was opened from (falls back to the name passed to dlopen). */
static void record_library_path(void *library, const char *opened_as, char *path, size_t size) {
    struct link_map *map = NULL;
    if (dlinfo(library, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0])
        snprintf(path, size, "%s", map->l_name);
    else
        snprintf(path, size, "%s", opened_as);
}

/* "2.28.9" for a version code. */
static void version_text(int code, char *text, size_t size) {
    if (code >= 10000)
        snprintf(text, size, "%d.%d.%d", code / 10000, code / 100 % 100, code % 100);
    else
        snprintf(text, size, "%d.%d.%d", code / 1000, code / 100 % 10, code % 100);
}

moegen_status moegen_nccl_open(moegen_nccl *nccl, moegen_error *err) {
    static const char *const names[] = {"libnccl.so.2", "libnccl.so"};
    moegen_status status = MOEGEN_OK;
    char last_error[CANDIDATE_BYTES] = "";
    char version[32];
    const char *override = getenv(NCCL_ENVIRONMENT);
    const char *opened_as = NULL;
    moegen_nccl_result result;
    if (!nccl) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_nccl_open: the table is NULL");
        goto done;
    }
    memset(nccl, 0, sizeof *nccl);
    moegen_error_clear(err);
    if (override && override[0]) {
        opened_as = override;
        nccl->library = dlopen(override, OPEN_FLAGS);
        if (!nccl->library) {
            const char *text = dlerror();
            status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0, "NCCL not found: $%s=%s cannot be opened: %s",
                                      NCCL_ENVIRONMENT, override, text ? text : "unknown dlopen error");
            goto done;
        }
    } else {
        for (int index = 0; index < COUNT_OF(names) && !nccl->library; index++) {
            opened_as = names[index];
            nccl->library = dlopen(names[index], OPEN_FLAGS);
            if (!nccl->library) {
                const char *text = dlerror();
                snprintf(last_error, sizeof last_error, "%s", text ? text : "unknown dlopen error");
            }
        }
        if (!nccl->library) {
            status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                      "NCCL not found (tried libnccl.so.2 and libnccl.so on the library path; "
                                      "set $%s to its path): %s",
                                      NCCL_ENVIRONMENT, last_error);
            goto done;
        }
    }
    record_library_path(nccl->library, opened_as, nccl->library_path, sizeof nccl->library_path);
    for (int index = 0; index < COUNT_OF(required_symbols); index++) {
        if (!bind_symbol(nccl->library, &required_symbols[index], nccl, last_error, sizeof last_error)) {
            status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                      "NCCL library %s has no %s (%s); NCCL 2.14 or newer is needed",
                                      nccl->library_path, required_symbols[index].name, last_error);
            goto done;
        }
    }
    for (int index = 0; index < COUNT_OF(optional_symbols); index++)
        (void)bind_symbol(nccl->library, &optional_symbols[index], nccl, last_error, sizeof last_error);
    result = nccl->ncclGetVersion(&nccl->version);
    if (result != MOEGEN_NCCL_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, result, "NCCL library %s: ncclGetVersion failed (%d)",
                                  nccl->library_path, result);
        goto done;
    }
    if (nccl->version < MOEGEN_NCCL_MIN_VERSION) {
        version_text(nccl->version, version, sizeof version);
        status = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                  "NCCL library %s is version %s; 2.14 or newer is needed (non-blocking "
                                  "communicators)",
                                  nccl->library_path, version);
        goto done;
    }
done:
    if (status != MOEGEN_OK && nccl)
        moegen_nccl_close(nccl);
    return status;
}

void moegen_nccl_close(moegen_nccl *nccl) {
    if (nccl) {
        if (nccl->library)
            dlclose(nccl->library);
        memset(nccl, 0, sizeof *nccl);
    }
}

const char *moegen_nccl_error_text(const moegen_nccl *nccl, moegen_nccl_result result, moegen_nccl_comm comm,
                                   char *buffer, size_t size) {
    static const char *const names[] = {"ncclSuccess",        "ncclUnhandledCudaError", "ncclSystemError",
                                        "ncclInternalError",  "ncclInvalidArgument",    "ncclInvalidUsage",
                                        "ncclRemoteError",    "ncclInProgress"};
    static const char *const descriptions[] = {
        "no error", "unhandled cuda error", "unhandled system error", "internal error",
        "invalid argument", "invalid usage", "remote process exited or there was a network error",
        "NCCL operation in progress"};
    const char *description = NULL;
    const char *last = NULL;
    int used;
    if (!buffer || size == 0)
        return "";
    if (nccl && nccl->library && nccl->ncclGetErrorString)
        description = nccl->ncclGetErrorString(result);
    if (!description && result >= 0 && result < COUNT_OF(descriptions))
        description = descriptions[result];
    if (result >= 0 && result < COUNT_OF(names))
        used = snprintf(buffer, size, "%s: %s", names[result], description ? description : "?");
    else
        used = snprintf(buffer, size, "NCCL error %d%s%s", result, description ? ": " : "",
                        description ? description : "");
    if (nccl && nccl->library && nccl->ncclGetLastError)
        last = nccl->ncclGetLastError(comm); /* NCCL ignores `comm` and allows NULL */
    if (last && last[0] && used >= 0 && (size_t)used + 1 < size)
        snprintf(buffer + used, size - (size_t)used, "; NCCL: %s", last);
    /* NCCL's last error often ends in a newline */
    for (size_t length = strlen(buffer); length > 0 && (buffer[length - 1] == '\n' || buffer[length - 1] == '\r');)
        buffer[--length] = '\0';
    return buffer;
}

/* ---- the communicator's state ------------------------------------------------------------ */

typedef struct nccl_state {
    moegen_nccl nccl;
    moegen_cuda cuda;
    int rank, size, ordinal;
    moegen_cu_device device;
    moegen_cu_context context;   /* the device's primary context, when retained */
    int context_retained;
    moegen_cu_stream stream;     /* our own stream (CU_STREAM_DEFAULT flags) */
    int stream_created;
    moegen_cu_event done;        /* recorded after the work of each collective */
    int event_created;
    moegen_nccl_comm comm;       /* NULL before init and after abort or destroy */
    int aborted;                 /* a collective failed: every callback fails at once */
    char aborted_why[TEXT_BYTES];
    moegen_cu_device_pointer staging; /* device side of allreduce_max / allgather */
    void *pinned;                /* host side (cuMemAllocHost) */
    size_t staging_bytes;        /* of each */
    double timeout_s;            /* the deadline of the last collective: destroy's bound */
} nccl_state;

static double now_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Between two polls: a yield at first, then short sleeps, then 1 ms ones. */
static void pause_between_polls(long polls) {
    struct timespec pause = {0, polls < SHORT_SLEEP_POLLS ? SHORT_SLEEP_NS : LONG_SLEEP_NS};
    if (polls < SPIN_POLLS)
        sched_yield();
    else
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
        }
}

/* Make the primary context current on this thread; 0 or the CUresult. */
static int enter_context(nccl_state *state) {
    return state->cuda.cuCtxPushCurrent(state->context);
}

static void leave_context(nccl_state *state) {
    moegen_cu_context popped = NULL;
    (void)state->cuda.cuCtxPopCurrent(&popped);
}

/* Abort the NCCL communicator, once (the context must be current). */
static void abort_comm(nccl_state *state) {
    if (state->comm) {
        (void)state->nccl.ncclCommAbort(state->comm);
        state->comm = NULL;
    }
    state->aborted = 1;
}

/* Wait until NCCL's asynchronous state is ncclSuccess (`ready`), or until it reports an
 * error or the deadline passes. Returns 0, or the failure code with `why` filled; the
 * caller aborts. `waiting_for` says what was awaited, for the timeout message. */
static int wait_until_ready(nccl_state *state, double deadline, double timeout_s, const char *waiting_for,
                            char *why, size_t why_size) {
    char text[TEXT_BYTES];
    long polls = 0;
    for (;;) {
        moegen_nccl_result async = MOEGEN_NCCL_IN_PROGRESS;
        moegen_nccl_result result = state->nccl.ncclCommGetAsyncError(state->comm, &async);
        if (result != MOEGEN_NCCL_SUCCESS) {
            snprintf(why, why_size, "ncclCommGetAsyncError failed: %s",
                     moegen_nccl_error_text(&state->nccl, result, state->comm, text, sizeof text));
            return result;
        }
        if (async == MOEGEN_NCCL_SUCCESS)
            return 0;
        if (async != MOEGEN_NCCL_IN_PROGRESS) {
            snprintf(why, why_size, "NCCL reported an error while %s: %s", waiting_for,
                     moegen_nccl_error_text(&state->nccl, async, state->comm, text, sizeof text));
            return async;
        }
        if (now_seconds() >= deadline) {
            snprintf(why, why_size, "peer did not answer within %.3g s (NCCL was still %s)", timeout_s, waiting_for);
            return -1;
        }
        pause_between_polls(polls++);
    }
}

/* Record the event on `stream` and wait until the GPU has passed it, watching NCCL's
 * asynchronous errors and the deadline. Returns 0 or the failure code with `why`. */
static int wait_for_stream(nccl_state *state, moegen_cu_stream stream, double deadline, double timeout_s,
                           const char *what, char *why, size_t why_size) {
    char text[TEXT_BYTES];
    long polls = 0;
    moegen_cu_result cu_result = state->cuda.cuEventRecord(state->done, stream);
    if (cu_result != MOEGEN_CUDA_SUCCESS) {
        snprintf(why, why_size, "cuEventRecord after the %s: %s", what,
                 moegen_cuda_error_text(&state->cuda, cu_result, text, sizeof text));
        return cu_result;
    }
    for (;;) {
        moegen_nccl_result async = MOEGEN_NCCL_SUCCESS;
        moegen_nccl_result result;
        cu_result = state->cuda.cuEventQuery(state->done);
        if (cu_result == MOEGEN_CUDA_SUCCESS)
            return 0;
        if (cu_result != MOEGEN_CUDA_ERROR_NOT_READY) {
            snprintf(why, why_size, "the %s failed on the GPU: %s", what,
                     moegen_cuda_error_text(&state->cuda, cu_result, text, sizeof text));
            return cu_result;
        }
        result = state->nccl.ncclCommGetAsyncError(state->comm, &async);
        if (result != MOEGEN_NCCL_SUCCESS) {
            snprintf(why, why_size, "ncclCommGetAsyncError failed: %s",
                     moegen_nccl_error_text(&state->nccl, result, state->comm, text, sizeof text));
            return result;
        }
        if (async != MOEGEN_NCCL_SUCCESS && async != MOEGEN_NCCL_IN_PROGRESS) {
            snprintf(why, why_size, "NCCL reported an error during the %s: %s", what,
                     moegen_nccl_error_text(&state->nccl, async, state->comm, text, sizeof text));
            return async;
        }
        if (now_seconds() >= deadline) {
            snprintf(why, why_size, "peer did not answer within %.3g s (the %s had not completed on the GPU)",
                     timeout_s, what);
            return -1;
        }
        pause_between_polls(polls++);
    }
}

/* ---- one collective ------------------------------------------------------------------------ */

/* What a callback is doing: the first failure is kept; `finish` aborts after one. */
typedef struct call {
    nccl_state *state;
    const char *what;
    double timeout_s, deadline;
    char *why;
    size_t why_size;
    int entered;  /* the context was pushed */
    int code;     /* 0, or the first failure's code */
} call;

static void call_fail(call *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void call_fail(call *c, int code, const char *fmt, ...) {
    if (c->code == 0) {
        va_list ap;
        c->code = code != 0 ? code : -1;
        if (c->why && c->why_size > 0) {
            va_start(ap, fmt);
            vsnprintf(c->why, c->why_size, fmt, ap);
            va_end(ap);
        }
    }
}

/* A driver call's result: 0 when it worked, else the call fails. */
static int call_check_cuda(call *c, moegen_cu_result result, const char *operation) {
    char text[TEXT_BYTES];
    if (result != MOEGEN_CUDA_SUCCESS && c->code == 0)
        call_fail(c, result, "%s: %s", operation,
                  moegen_cuda_error_text(&c->state->cuda, result, text, sizeof text));
    return result != MOEGEN_CUDA_SUCCESS;
}

/* An NCCL enqueue's result: ncclSuccess and ncclInProgress (a non-blocking communicator
 * still working on it) are fine. */
static int call_check_nccl(call *c, moegen_nccl_result result, const char *operation) {
    char text[TEXT_BYTES];
    int failed = result != MOEGEN_NCCL_SUCCESS && result != MOEGEN_NCCL_IN_PROGRESS;
    if (failed && c->code == 0)
        call_fail(c, result, "%s: %s", operation,
                  moegen_nccl_error_text(&c->state->nccl, result, c->state->comm, text, sizeof text));
    return failed;
}

/* Start a callback: refuse on an aborted communicator, set the deadline, push the
 * context. Returns 0 when the callback may go on. */
static int call_begin(call *c, nccl_state *state, const char *what, double timeout_s, char *why,
                      size_t why_size) {
    memset(c, 0, sizeof *c);
    c->state = state;
    c->what = what;
    c->why = why;
    c->why_size = why_size;
    if (why && why_size > 0)
        why[0] = '\0';
    if (!state) {
        call_fail(c, -1, "no NCCL communicator state");
        return c->code;
    }
    c->timeout_s = timeout_s > 0.0 ? timeout_s : moegen_comm_default_timeout();
    c->deadline = now_seconds() + c->timeout_s;
    state->timeout_s = c->timeout_s;
    if (state->aborted || !state->comm) {
        call_fail(c, -1, "the NCCL communicator was aborted after an earlier failure (%s)",
                  state->aborted_why[0] ? state->aborted_why : "no reason recorded");
        return c->code;
    }
    if (!call_check_cuda(c, (moegen_cu_result)enter_context(state), "cuCtxPushCurrent(primary context)"))
        c->entered = 1;
    return c->code;
}

/* Wait for what the callback enqueued: NCCL's enqueue first, then the GPU. */
static void call_wait(call *c, moegen_cu_stream stream) {
    char stage[64];
    nccl_state *state = c->state;
    int code;
    if (c->code != 0)
        return;
    snprintf(stage, sizeof stage, "enqueueing the %s", c->what);
    code = wait_until_ready(state, c->deadline, c->timeout_s, stage, c->why, c->why_size);
    if (code == 0)
        code = wait_for_stream(state, stream, c->deadline, c->timeout_s, c->what, c->why, c->why_size);
    if (code != 0)
        c->code = code;
}

/* End a callback: after a failure abort the NCCL communicator; pop the context. */
static int call_finish(call *c) {
    nccl_state *state = c->state;
    if (state && c->code != 0 && !state->aborted) {
        if (c->entered || enter_context(state) == MOEGEN_CUDA_SUCCESS) {
            abort_comm(state);
            if (!c->entered)
                leave_context(state);
        } else {
            abort_comm(state); /* NCCL switches to the communicator's device itself */
        }
        snprintf(state->aborted_why, sizeof state->aborted_why, "%s: %s", c->what,
                 c->why && c->why[0] ? c->why : "no reason given");
    }
    if (state && c->entered)
        leave_context(state);
    c->entered = 0;
    return c->code;
}

/* bytes = count * unit, refusing negative counts and overflow; 0 when it fits. */
static int checked_bytes(int64_t count, size_t unit, size_t *bytes) {
    if (count < 0 || (unit != 0 && (uint64_t)count > SIZE_MAX / unit))
        return -1;
    *bytes = (size_t)count * unit;
    return 0;
}

/* Enqueue `bytes` bytes from `send` to `peer` (when `send` is given) or from `peer` into
 * `recv`, as chunks of at most CHUNK_BYTES. */
static void enqueue_chunked(call *c, const char *send, char *recv, size_t bytes, int peer, moegen_cu_stream stream) {
    nccl_state *state = c->state;
    char operation[64];
    for (size_t offset = 0; offset < bytes && c->code == 0; offset += CHUNK_BYTES) {
        size_t chunk = bytes - offset < CHUNK_BYTES ? bytes - offset : CHUNK_BYTES;
        moegen_nccl_result result;
        if (send)
            result = state->nccl.ncclSend(send + offset, chunk, MOEGEN_NCCL_UINT8, peer, state->comm, stream);
        else
            result = state->nccl.ncclRecv(recv + offset, chunk, MOEGEN_NCCL_UINT8, peer, state->comm, stream);
        snprintf(operation, sizeof operation, "%s(%zu bytes, peer %d)", send ? "ncclSend" : "ncclRecv", chunk,
                 peer);
        call_check_nccl(c, result, operation);
    }
}

/* The stream a device collective runs on. */
static moegen_cu_stream pick_stream(const nccl_state *state, void *stream) {
    return stream ? (moegen_cu_stream)stream : state->stream;
}

/* Grow the staging buffers to at least `bytes` (the context is current). */
static void ensure_staging(call *c, size_t bytes) {
    nccl_state *state = c->state;
    size_t want = bytes < STAGING_MIN_BYTES ? STAGING_MIN_BYTES : bytes;
    char operation[64];
    if (c->code != 0 || state->staging_bytes >= want)
        return;
    if (state->staging)
        (void)state->cuda.cuMemFree(state->staging);
    if (state->pinned)
        (void)state->cuda.cuMemFreeHost(state->pinned);
    state->staging = 0;
    state->pinned = NULL;
    state->staging_bytes = 0;
    snprintf(operation, sizeof operation, "cuMemAlloc(%zu bytes)", want);
    if (call_check_cuda(c, state->cuda.cuMemAlloc(&state->staging, want), operation))
        return;
    snprintf(operation, sizeof operation, "cuMemAllocHost(%zu bytes)", want);
    if (call_check_cuda(c, state->cuda.cuMemAllocHost(&state->pinned, want), operation)) {
        (void)state->cuda.cuMemFree(state->staging);
        state->staging = 0;
        return;
    }
    state->staging_bytes = want;
}

static moegen_cu_device_pointer device_address(const void *pointer) {
    return (moegen_cu_device_pointer)(uintptr_t)pointer;
}

/* ---- the callbacks ------------------------------------------------------------------------ */

static int nccl_alltoall(void *user, const void *send, void *recv, size_t bytes, void *stream, double timeout_s,
                         char *why, size_t why_size) {
    call c;
    nccl_state *state = user;
    moegen_cu_stream on;
    if (call_begin(&c, state, "alltoall", timeout_s, why, why_size) != 0)
        return call_finish(&c);
    on = pick_stream(state, stream);
    if (bytes > 0 && (!send || !recv))
        call_fail(&c, -1, "alltoall of %zu bytes per rank with a NULL buffer", bytes);
    else if (bytes > SIZE_MAX / (size_t)state->size)
        call_fail(&c, -1, "alltoall of %zu bytes per rank overflows the address space", bytes);
    if (c.code == 0 && bytes > 0) {
        const char *from = send;
        char *to = recv;
        size_t self = (size_t)state->rank * bytes;
        call_check_cuda(&c, state->cuda.cuMemcpyDtoDAsync(device_address(to + self), device_address(from + self),
                                                          bytes, on),
                        "cuMemcpyDtoDAsync(this rank's part of the alltoall)");
        if (c.code == 0 && state->size > 1) {
            call_check_nccl(&c, state->nccl.ncclGroupStart(), "ncclGroupStart");
            if (c.code == 0) {
                for (int peer = 0; peer < state->size; peer++) {
                    if (peer == state->rank)
                        continue;
                    enqueue_chunked(&c, from + (size_t)peer * bytes, NULL, bytes, peer, on);
                    enqueue_chunked(&c, NULL, to + (size_t)peer * bytes, bytes, peer, on);
                }
                call_check_nccl(&c, state->nccl.ncclGroupEnd(), "ncclGroupEnd");
            }
        }
        call_wait(&c, on);
    }
    return call_finish(&c);
}

/* Check one side of an alltoallv: counts and offsets non-negative and in range. */
static void check_rows(call *c, const char *side, const int64_t *counts, const int64_t *offsets, size_t unit_bytes,
                       const void *buffer) {
    size_t bytes, start;
    for (int q = 0; q < c->state->size && c->code == 0; q++) {
        if (checked_bytes(counts[q], unit_bytes, &bytes) != 0 || checked_bytes(offsets[q], unit_bytes, &start) != 0 ||
            start > SIZE_MAX - bytes)
            call_fail(c, -1, "alltoallv: %s count %lld / offset %lld rows of %zu bytes for rank %d are negative or "
                      "overflow", side, (long long)counts[q], (long long)offsets[q], unit_bytes, q);
        else if (bytes > 0 && !buffer)
            call_fail(c, -1, "alltoallv: %s buffer is NULL but rank %d has %lld rows", side, q,
                      (long long)counts[q]);
    }
}

static int nccl_alltoallv(void *user, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                          void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, size_t unit_bytes,
                          void *stream, double timeout_s, char *why, size_t why_size) {
    call c;
    nccl_state *state = user;
    moegen_cu_stream on;
    if (call_begin(&c, state, "alltoallv", timeout_s, why, why_size) != 0)
        return call_finish(&c);
    on = pick_stream(state, stream);
    if (!send_counts || !send_offsets || !recv_counts || !recv_offsets)
        call_fail(&c, -1, "alltoallv: a count or offset array is NULL");
    else if (unit_bytes == 0)
        call_fail(&c, -1, "alltoallv: rows of 0 bytes");
    if (c.code == 0) {
        check_rows(&c, "send", send_counts, send_offsets, unit_bytes, send);
        check_rows(&c, "receive", recv_counts, recv_offsets, unit_bytes, recv);
    }
    if (c.code == 0 && send_counts[state->rank] != recv_counts[state->rank])
        call_fail(&c, -1, "alltoallv: rank %d sends itself %lld rows but expects %lld", state->rank,
                  (long long)send_counts[state->rank], (long long)recv_counts[state->rank]);
    if (c.code == 0) {
        const char *from = send;
        char *to = recv;
        int any_peer = 0;
        size_t self = (size_t)send_counts[state->rank] * unit_bytes;
        if (self > 0)
            call_check_cuda(&c,
                            state->cuda.cuMemcpyDtoDAsync(
                                device_address(to + (size_t)recv_offsets[state->rank] * unit_bytes),
                                device_address(from + (size_t)send_offsets[state->rank] * unit_bytes), self, on),
                            "cuMemcpyDtoDAsync(this rank's rows of the alltoallv)");
        for (int q = 0; q < state->size; q++)
            any_peer |= q != state->rank && (send_counts[q] > 0 || recv_counts[q] > 0);
        if (c.code == 0 && any_peer) {
            call_check_nccl(&c, state->nccl.ncclGroupStart(), "ncclGroupStart");
            if (c.code == 0) {
                for (int q = 0; q < state->size; q++) {
                    if (q == state->rank)
                        continue;
                    /* zero counts are skipped on both sides alike: q's recv_counts[rank] is
                     * our send_counts[q] */
                    if (send_counts[q] > 0)
                        enqueue_chunked(&c, from + (size_t)send_offsets[q] * unit_bytes, NULL,
                                        (size_t)send_counts[q] * unit_bytes, q, on);
                    if (recv_counts[q] > 0)
                        enqueue_chunked(&c, NULL, to + (size_t)recv_offsets[q] * unit_bytes,
                                        (size_t)recv_counts[q] * unit_bytes, q, on);
                }
                call_check_nccl(&c, state->nccl.ncclGroupEnd(), "ncclGroupEnd");
            }
        }
        call_wait(&c, on);
    }
    return call_finish(&c);
}

static int nccl_allreduce_max(void *user, int64_t *values, int n, double timeout_s, char *why, size_t why_size) {
    call c;
    nccl_state *state = user;
    size_t bytes = (size_t)(n > 0 ? n : 0) * sizeof(int64_t);
    if (call_begin(&c, state, "allreduce", timeout_s, why, why_size) != 0)
        return call_finish(&c);
    if (n < 0 || (n > 0 && !values))
        call_fail(&c, -1, "allreduce of %d values%s", n, values ? "" : " from a NULL array");
    if (c.code == 0 && n > 0) {
        ensure_staging(&c, bytes);
        if (c.code == 0) {
            void *device = (void *)(uintptr_t)state->staging;
            memcpy(state->pinned, values, bytes);
            call_check_cuda(&c, state->cuda.cuMemcpyHtoDAsync(state->staging, state->pinned, bytes, state->stream),
                            "cuMemcpyHtoDAsync(allreduce values)");
            if (c.code == 0)
                call_check_nccl(&c,
                                state->nccl.ncclAllReduce(device, device, (size_t)n, MOEGEN_NCCL_INT64,
                                                          MOEGEN_NCCL_MAX, state->comm, state->stream),
                                "ncclAllReduce(int64, max)");
            if (c.code == 0) {
                char stage[64];
                snprintf(stage, sizeof stage, "enqueueing the %s", c.what);
                c.code = wait_until_ready(state, c.deadline, c.timeout_s, stage, c.why, c.why_size);
            }
            if (c.code == 0)
                call_check_cuda(&c,
                                state->cuda.cuMemcpyDtoHAsync(state->pinned, state->staging, bytes, state->stream),
                                "cuMemcpyDtoHAsync(allreduce values)");
            if (c.code == 0)
                c.code = wait_for_stream(state, state->stream, c.deadline, c.timeout_s, c.what, c.why, c.why_size);
            if (c.code == 0)
                memcpy(values, state->pinned, bytes);
        }
    }
    return call_finish(&c);
}

static int nccl_allgather(void *user, const void *send, void *recv, size_t bytes, double timeout_s, char *why,
                          size_t why_size) {
    call c;
    nccl_state *state = user;
    size_t total = 0;
    if (call_begin(&c, state, "allgather", timeout_s, why, why_size) != 0)
        return call_finish(&c);
    if (bytes > 0 && (!send || !recv))
        call_fail(&c, -1, "allgather of %zu bytes with a NULL buffer", bytes);
    else if (bytes > SIZE_MAX / (size_t)state->size)
        call_fail(&c, -1, "allgather of %zu bytes per rank overflows the address space", bytes);
    else
        total = bytes * (size_t)state->size;
    if (c.code == 0 && bytes > 0) {
        ensure_staging(&c, total);
        if (c.code == 0) {
            size_t mine = (size_t)state->rank * bytes;
            char *device = (char *)(uintptr_t)state->staging;
            memcpy((char *)state->pinned + mine, send, bytes);
            call_check_cuda(&c,
                            state->cuda.cuMemcpyHtoDAsync(state->staging + mine, (char *)state->pinned + mine, bytes,
                                                          state->stream),
                            "cuMemcpyHtoDAsync(allgather part)");
            /* in place: this rank's part already sits at its slot */
            if (c.code == 0)
                call_check_nccl(&c,
                                state->nccl.ncclAllGather(device + mine, device, bytes, MOEGEN_NCCL_UINT8, state->comm,
                                                          state->stream),
                                "ncclAllGather");
            if (c.code == 0) {
                char stage[64];
                snprintf(stage, sizeof stage, "enqueueing the %s", c.what);
                c.code = wait_until_ready(state, c.deadline, c.timeout_s, stage, c.why, c.why_size);
            }
            if (c.code == 0)
                call_check_cuda(&c,
                                state->cuda.cuMemcpyDtoHAsync(state->pinned, state->staging, total, state->stream),
                                "cuMemcpyDtoHAsync(allgather result)");
            if (c.code == 0)
                c.code = wait_for_stream(state, state->stream, c.deadline, c.timeout_s, c.what, c.why, c.why_size);
            if (c.code == 0)
                memcpy(recv, state->pinned, total);
        }
    }
    return call_finish(&c);
}

/* Free everything the state holds, in reverse order of creation. A healthy NCCL
 * communicator is finalized (bounded by the last collective's deadline) and destroyed;
 * one that is broken or does not finalize in time is aborted. */
static void destroy_state(nccl_state *state) {
    int entered;
    if (!state)
        return;
    entered = state->context_retained && enter_context(state) == MOEGEN_CUDA_SUCCESS;
    if (state->comm) {
        int clean = 0;
        if (!state->aborted) {
            moegen_nccl_result result = state->nccl.ncclCommFinalize(state->comm);
            if (result == MOEGEN_NCCL_SUCCESS || result == MOEGEN_NCCL_IN_PROGRESS) {
                char why[TEXT_BYTES];
                double timeout_s = state->timeout_s > 0.0 ? state->timeout_s : moegen_comm_default_timeout();
                clean = wait_until_ready(state, now_seconds() + timeout_s, timeout_s, "finalizing the communicator",
                                         why, sizeof why) == 0;
            }
        }
        if (clean) {
            (void)state->nccl.ncclCommDestroy(state->comm);
            state->comm = NULL;
        } else {
            abort_comm(state);
        }
    }
    if (state->staging)
        (void)state->cuda.cuMemFree(state->staging);
    if (state->pinned)
        (void)state->cuda.cuMemFreeHost(state->pinned);
    if (state->event_created)
        (void)state->cuda.cuEventDestroy(state->done);
    if (state->stream_created)
        (void)state->cuda.cuStreamDestroy(state->stream);
    if (entered)
        leave_context(state);
    if (state->context_retained)
        (void)state->cuda.cuDevicePrimaryCtxRelease(state->device);
    moegen_cuda_close(&state->cuda);
    moegen_nccl_close(&state->nccl);
    free(state);
}

static void nccl_destroy(void *user) { destroy_state(user); }

/* ---- the public functions -------------------------------------------------------------------- */

moegen_status moegen_comm_nccl_unique_id(unsigned char id[128], moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_nccl nccl;
    moegen_nccl_unique_id unique;
    moegen_nccl_result result;
    char text[TEXT_BYTES];
    memset(&nccl, 0, sizeof nccl);
    if (!id) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "NCCL unique id: the output buffer is NULL");
        goto done;
    }
    status = moegen_nccl_open(&nccl, err);
    if (status != MOEGEN_OK)
        goto done;
    memset(&unique, 0, sizeof unique);
    result = nccl.ncclGetUniqueId(&unique);
    if (result != MOEGEN_NCCL_SUCCESS) {
        status = moegen_error_set(err, MOEGEN_ERR_COMM, result, "NCCL (%s) could not make a unique id: %s",
                                  nccl.library_path, moegen_nccl_error_text(&nccl, result, NULL, text, sizeof text));
        goto done;
    }
    memcpy(id, unique.internal, sizeof unique.internal);
done:
    moegen_nccl_close(&nccl);
    return status;
}

moegen_status moegen_comm_create_nccl(const unsigned char id[128], int rank, int size, int cuda_device,
                                      moegen_comm **out, moegen_error *err) {
    static const moegen_comm_callbacks callbacks = {
        .alltoall = nccl_alltoall,
        .alltoallv = nccl_alltoallv,
        .allreduce_max = nccl_allreduce_max,
        .allgather = nccl_allgather,
        .destroy = nccl_destroy,
    };
    moegen_status status = MOEGEN_OK;
    nccl_state *state = NULL;
    moegen_error inner;
    moegen_nccl_config config;
    moegen_nccl_unique_id unique;
    moegen_nccl_result result;
    char text[TEXT_BYTES];
    char why[TEXT_BYTES];
    int entered = 0;
    double timeout_s;
    if (!out) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "NCCL communicator: `out` is NULL");
        goto done;
    }
    *out = NULL;
    if (!id) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "NCCL communicator: the unique id is NULL");
        goto done;
    }
    if (size < 1 || rank < 0 || rank >= size) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "NCCL communicator: rank %d of size %d (need 0 <= rank < size)", rank, size);
        goto done;
    }
    if (cuda_device < 0) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "NCCL communicator: CUDA device %d",
                                  cuda_device);
        goto done;
    }
    state = calloc(1, sizeof *state);
    if (!state) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "NCCL communicator: out of memory");
        goto done;
    }
    state->rank = rank;
    state->size = size;
    state->ordinal = cuda_device;
    timeout_s = moegen_comm_default_timeout();
    state->timeout_s = timeout_s;
    status = moegen_nccl_open(&state->nccl, err);
    if (status != MOEGEN_OK)
        goto done;
    status = moegen_cuda_open(&state->cuda, &inner);
    if (status != MOEGEN_OK) {
        status = moegen_error_set(err, status, inner.native_code, "NCCL communicator: needs a CUDA device: %s",
                                  inner.message);
        goto done;
    }
    if (cuda_device >= state->cuda.device_count) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "NCCL communicator: CUDA device %d does not exist (%d device%s)", cuda_device,
                                  state->cuda.device_count, state->cuda.device_count == 1 ? "" : "s");
        goto done;
    }
    snprintf(text, sizeof text, "NCCL communicator: cuDeviceGet(%d)", cuda_device);
    status = moegen_cuda_check(&state->cuda, state->cuda.cuDeviceGet(&state->device, cuda_device), text, err);
    if (status != MOEGEN_OK)
        goto done;
    snprintf(text, sizeof text, "NCCL communicator: cuDevicePrimaryCtxRetain(device %d)", cuda_device);
    status = moegen_cuda_check(&state->cuda, state->cuda.cuDevicePrimaryCtxRetain(&state->context, state->device),
                               text, err);
    if (status != MOEGEN_OK)
        goto done;
    state->context_retained = 1;
    status = moegen_cuda_check(&state->cuda, (moegen_cu_result)enter_context(state),
                               "NCCL communicator: cuCtxPushCurrent(primary context)", err);
    if (status != MOEGEN_OK)
        goto done;
    entered = 1;
    status = moegen_cuda_check(&state->cuda, state->cuda.cuStreamCreate(&state->stream, MOEGEN_CU_STREAM_DEFAULT),
                               "NCCL communicator: cuStreamCreate", err);
    if (status != MOEGEN_OK)
        goto done;
    state->stream_created = 1;
    status = moegen_cuda_check(&state->cuda, state->cuda.cuEventCreate(&state->done, MOEGEN_CU_EVENT_DISABLE_TIMING),
                               "NCCL communicator: cuEventCreate", err);
    if (status != MOEGEN_OK)
        goto done;
    state->event_created = 1;

    moegen_nccl_config_init(&config);
    config.blocking = 0;
    memcpy(unique.internal, id, sizeof unique.internal);
    result = state->nccl.ncclCommInitRankConfig(&state->comm, size, unique, rank, &config);
    if (result != MOEGEN_NCCL_SUCCESS && result != MOEGEN_NCCL_IN_PROGRESS) {
        status = moegen_error_set(err, MOEGEN_ERR_COMM, result,
                                  "rank %d of %d: ncclCommInitRankConfig on CUDA device %d failed: %s", rank, size,
                                  cuda_device,
                                  moegen_nccl_error_text(&state->nccl, result, state->comm, text, sizeof text));
        abort_comm(state);
        goto done;
    }
    if (!state->comm) {
        status = moegen_error_set(err, MOEGEN_ERR_COMM, 0,
                                  "rank %d of %d: ncclCommInitRankConfig on CUDA device %d returned no communicator",
                                  rank, size, cuda_device);
        goto done;
    }
    if (wait_until_ready(state, now_seconds() + timeout_s, timeout_s, "initializing the communicator", why,
                         sizeof why) != 0) {
        status = moegen_error_set(err, MOEGEN_ERR_COMM, 0,
                                  "rank %d of %d: the NCCL communicator on CUDA device %d did not come up: %s (does "
                                  "every rank create it with the same id, and is rank 0's host reachable?)",
                                  rank, size, cuda_device, why);
        abort_comm(state);
        goto done;
    }
    leave_context(state);
    entered = 0;
    status = moegen_comm_wrap(rank, size, MOEGEN_COMM_DEVICE, "nccl", &callbacks, state, out, err);
done:
    if (entered)
        leave_context(state);
    if (status != MOEGEN_OK)
        destroy_state(state);
    return status;
}
