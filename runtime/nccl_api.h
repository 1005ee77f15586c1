/* nccl_api.h — NCCL, opened at run time with dlopen: the few types, constants and
 * functions the NCCL transport of the expert-parallel communicator uses.
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. runtime/comm_nccl.c fills a
 * moegen_comm (comm.h) with callbacks that move device buffers between ranks through an
 * NCCL communicator; this header is the table those callbacks call through.
 *
 * Why dlopen: as for the CUDA driver and NVRTC (cuda_api.h), one build of moegen runs
 * everywhere; a machine without NCCL only loses the NCCL transport. No nccl.h is needed
 * to build: the declarations below carry the values and layouts of NCCL 2.28's nccl.h
 * (ncclResult_t, ncclDataType_t and ncclRedOp_t are unchanged since 2.x began; ncclConfig_t
 * only ever grows at its end, and NCCL reads no more of it than its `size` field says).
 *
 * Invariants:
 *  - No global state. A loaded table (moegen_nccl) is an object its owner keeps (the NCCL
 *    communicator's state); it is filled by moegen_nccl_open, read-only afterwards and
 *    released by moegen_nccl_close.
 *  - Every function pointer in an opened table is non-NULL unless its comment says
 *    "optional". Each is bound to the symbol of the same name.
 *  - The library is opened RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE: a missing symbol shows up
 *    at open, and NCCL (which starts threads) is never unmapped.
 *  - NCCL 2.14 or newer is required (ncclCommInitRankConfig, non-blocking communicators,
 *    ncclCommFinalize).
 */
#ifndef MOEGEN_RUNTIME_NCCL_API_H
#define MOEGEN_RUNTIME_NCCL_API_H

#include <limits.h>
#include <stddef.h>

#include "cuda_api.h"
#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- types (nccl.h) ------------------------------------------------------------------- */

typedef int moegen_nccl_result;                                /* ncclResult_t */
typedef struct moegen_nccl_comm_handle *moegen_nccl_comm;      /* ncclComm_t */

#define MOEGEN_NCCL_UNIQUE_ID_BYTES 128
typedef struct moegen_nccl_unique_id {                         /* ncclUniqueId */
    char internal[MOEGEN_NCCL_UNIQUE_ID_BYTES];
} moegen_nccl_unique_id;

/* ncclResult_t */
enum {
    MOEGEN_NCCL_SUCCESS = 0,
    MOEGEN_NCCL_UNHANDLED_CUDA_ERROR = 1,
    MOEGEN_NCCL_SYSTEM_ERROR = 2,
    MOEGEN_NCCL_INTERNAL_ERROR = 3,
    MOEGEN_NCCL_INVALID_ARGUMENT = 4,
    MOEGEN_NCCL_INVALID_USAGE = 5,
    MOEGEN_NCCL_REMOTE_ERROR = 6,
    MOEGEN_NCCL_IN_PROGRESS = 7
};

/* ncclDataType_t */
enum {
    MOEGEN_NCCL_INT8 = 0,
    MOEGEN_NCCL_UINT8 = 1,
    MOEGEN_NCCL_INT32 = 2,
    MOEGEN_NCCL_UINT32 = 3,
    MOEGEN_NCCL_INT64 = 4,
    MOEGEN_NCCL_UINT64 = 5,
    MOEGEN_NCCL_FLOAT16 = 6,
    MOEGEN_NCCL_FLOAT32 = 7,
    MOEGEN_NCCL_FLOAT64 = 8,
    MOEGEN_NCCL_BFLOAT16 = 9
};

/* ncclRedOp_t */
enum { MOEGEN_NCCL_SUM = 0, MOEGEN_NCCL_PROD = 1, MOEGEN_NCCL_MAX = 2, MOEGEN_NCCL_MIN = 3, MOEGEN_NCCL_AVG = 4 };

/* NCCL_VERSION(X,Y,Z) of nccl.h: the code ncclGetVersion returns (22809 for 2.28.9; codes of
 * versions up to 2.8 use X*1000 + Y*100 + Z). */
#define MOEGEN_NCCL_VERSION(x, y, z)                                                               \
    (((x) <= 2 && (y) <= 8) ? (x) * 1000 + (y) * 100 + (z) : (x) * 10000 + (y) * 100 + (z))
#define MOEGEN_NCCL_MIN_VERSION MOEGEN_NCCL_VERSION(2, 14, 0)

/* ncclConfig_t as nccl.h 2.28.9 lays it out (ncclConfig_v22800), and the values of its
 * NCCL_CONFIG_INITIALIZER. Fill with moegen_nccl_config_init, then set what differs. */
#define MOEGEN_NCCL_CONFIG_MAGIC 0xcafebeefu
#define MOEGEN_NCCL_CONFIG_VERSION MOEGEN_NCCL_VERSION(2, 28, 9)
#define MOEGEN_NCCL_CONFIG_UNDEF_INT INT_MIN
typedef struct moegen_nccl_config {
    size_t size;           /* sizeof(moegen_nccl_config) */
    unsigned int magic;    /* MOEGEN_NCCL_CONFIG_MAGIC */
    unsigned int version;  /* MOEGEN_NCCL_CONFIG_VERSION: the layout below */
    int blocking;          /* 0: a non-blocking communicator */
    int cgaClusterSize;
    int minCTAs;
    int maxCTAs;
    const char *netName;
    int splitShare;
    int trafficClass;
    const char *commName;
    int collnetEnable;
    int CTAPolicy;
    int shrinkShare;
    int nvlsCTAs;
    int nChannelsPerNetPeer;
    int nvlinkCentricSched;
} moegen_nccl_config;

/* Every field "undefined" (NCCL's defaults), as NCCL_CONFIG_INITIALIZER. NULL is a no-op. */
void moegen_nccl_config_init(moegen_nccl_config *config);

/* ---- the table ------------------------------------------------------------------------ */

/* A loaded NCCL. Filled by moegen_nccl_open, read-only afterwards. */
typedef struct moegen_nccl {
    void *library;                                /* dlopen handle; NULL when closed */
    char library_path[MOEGEN_LIBRARY_PATH_BYTES]; /* the file that opened */
    int version;                                  /* ncclGetVersion: 22809 = 2.28.9 */

    const char *(*ncclGetErrorString)(moegen_nccl_result result);
    moegen_nccl_result (*ncclGetVersion)(int *version);
    moegen_nccl_result (*ncclGetUniqueId)(moegen_nccl_unique_id *id);
    moegen_nccl_result (*ncclCommInitRankConfig)(moegen_nccl_comm *comm, int nranks, moegen_nccl_unique_id id,
                                                 int rank, moegen_nccl_config *config);
    moegen_nccl_result (*ncclCommGetAsyncError)(moegen_nccl_comm comm, moegen_nccl_result *async_error);
    moegen_nccl_result (*ncclCommFinalize)(moegen_nccl_comm comm);
    moegen_nccl_result (*ncclCommDestroy)(moegen_nccl_comm comm);
    moegen_nccl_result (*ncclCommAbort)(moegen_nccl_comm comm);
    moegen_nccl_result (*ncclGroupStart)(void);
    moegen_nccl_result (*ncclGroupEnd)(void);
    moegen_nccl_result (*ncclSend)(const void *send, size_t count, int datatype, int peer, moegen_nccl_comm comm,
                                   moegen_cu_stream stream);
    moegen_nccl_result (*ncclRecv)(void *recv, size_t count, int datatype, int peer, moegen_nccl_comm comm,
                                   moegen_cu_stream stream);
    moegen_nccl_result (*ncclAllReduce)(const void *send, void *recv, size_t count, int datatype, int op,
                                        moegen_nccl_comm comm, moegen_cu_stream stream);
    moegen_nccl_result (*ncclAllGather)(const void *send, void *recv, size_t send_count, int datatype,
                                        moegen_nccl_comm comm, moegen_cu_stream stream);
    /* optional (NCCL 2.13+): */
    const char *(*ncclGetLastError)(moegen_nccl_comm comm);
} moegen_nccl;

/* Open NCCL: dlopen $MOEGEN_NCCL_LIB alone when it is set (non-empty), else libnccl.so.2,
 * then libnccl.so (through the loader's search path); resolve every symbol; read the
 * version. Precondition: `nccl` non-NULL (previous contents ignored and overwritten).
 * Returns MOEGEN_OK; MOEGEN_ERR_UNSUPPORTED when no library opens ("NCCL not found ...:
 * <dlerror>"), when it lacks a required symbol ("NCCL library <path> has no <symbol>
 * (<dlerror>) ...") or is older than 2.14 (the message gives its version);
 * MOEGEN_ERR_INVALID_ARGUMENT when `nccl` is NULL. On failure `nccl` is left closed. */
moegen_status moegen_nccl_open(moegen_nccl *nccl, moegen_error *err);

/* Release what moegen_nccl_open loaded and zero `nccl`. NULL, a closed or a zeroed table
 * is fine. */
void moegen_nccl_close(moegen_nccl *nccl);

/* The symbols moegen_nccl_open requires, by index (0 <= index < moegen_nccl_symbol_count()),
 * in the order they are looked up; NULL out of range. (Tests build fake libraries from it.) */
int moegen_nccl_symbol_count(void);
const char *moegen_nccl_symbol_name(int index);

/* "ncclRemoteError: <NCCL's description>" for a result, from the table when open, else
 * from a built-in list; then, when the library has ncclGetLastError with something to
 * say, "; NCCL: <its last error>" (`comm` may be NULL; NCCL's last error is per process
 * and may be older than this result). Writes at most `size` bytes and returns `buffer`
 * ("" for a NULL or zero-size buffer). */
const char *moegen_nccl_error_text(const moegen_nccl *nccl, moegen_nccl_result result, moegen_nccl_comm comm,
                                   char *buffer, size_t size);

#ifdef __cplusplus
}
#endif
#endif
