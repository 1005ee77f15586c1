/* comm_mpi.c — the MPI transport of the expert-parallel layer (libmoegen_mpi; see
 * moegen_mpi.h and runtime/comm.h).
 *
 * Place in the pipeline: ... -> [launch across ranks], host buffers (CPU layers).
 *
 * Invariants:
 *  - moegen talks on its own duplicate of the caller's communicator, with
 *    MPI_ERRORS_RETURN: an MPI error becomes a moegen error, never an abort.
 *  - Every collective is non-blocking (MPI_I*) and polled with MPI_Test until it
 *    completes or its deadline passes; nothing waits on a peer for longer. MPI cannot
 *    cancel a collective, so after a timeout the request stays with MPI (the
 *    communicator is broken; runtime/ep.c keeps the buffers alive for it).
 *  - Rows travel as a contiguous datatype of one row, so a count is a number of rows
 *    (an int), never of bytes: 2^31 rows of any width fit.
 */
#define _GNU_SOURCE
#include "moegen_mpi.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm.h"

typedef struct mpi_state {
    MPI_Comm comm;
    int ranks;
    int *counts, *displs, *recv_counts, *recv_displs; /* [ranks] scratch for alltoallv */
} mpi_state;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void mpi_reason(int code, const char *what, char *why, size_t why_size) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", code);
    snprintf(why, why_size, "%s: %.200s", what, text);
}

/* Poll `request` until it completes or `timeout_s` passes. */
static int wait_for(MPI_Request *request, double timeout_s, const char *what, char *why, size_t why_size) {
    const double deadline = now_s() + timeout_s;
    long pause_ns = 10000;
    for (;;) {
        int done = 0;
        int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            mpi_reason(rc, what, why, why_size);
            return 1;
        }
        if (done) return 0;
        if (now_s() > deadline) {
            snprintf(why, why_size, "%s: a peer did not answer within %.3g s", what, timeout_s);
            return 2;
        }
        /* MPI moves data only while some call into it runs: pause 10 us, doubling up to
         * 200 us, between tests (spinning hot starves peers that share the CPU: measured
         * slower on 2 oversubscribed ranks). */
        struct timespec pause = {0, pause_ns};
        nanosleep(&pause, NULL);
        if (pause_ns < 200000) pause_ns *= 2;
    }
}

static int start_failed(int rc, const char *what, char *why, size_t why_size) {
    mpi_reason(rc, what, why, why_size);
    return 1;
}

static int mpi_alltoall(void *user, const void *send, void *recv, size_t bytes, void *stream, double timeout_s,
                        char *why, size_t why_size) {
    (void)stream;
    mpi_state *s = user;
    if (bytes > INT_MAX) {
        snprintf(why, why_size, "alltoall of %zu bytes per rank is beyond MPI's int count", bytes);
        return 3;
    }
    MPI_Request request;
    int rc = MPI_Ialltoall(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, s->comm, &request);
    if (rc != MPI_SUCCESS) return start_failed(rc, "MPI_Ialltoall", why, why_size);
    return wait_for(&request, timeout_s, "MPI_Ialltoall", why, why_size);
}

static int mpi_alltoallv(void *user, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                         void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, size_t unit_bytes,
                         void *stream, double timeout_s, char *why, size_t why_size) {
    (void)stream;
    mpi_state *s = user;
    if (unit_bytes == 0 || unit_bytes > INT_MAX) {
        snprintf(why, why_size, "alltoallv rows of %zu bytes are beyond MPI's int count", unit_bytes);
        return 3;
    }
    for (int q = 0; q < s->ranks; q++) {
        const int64_t values[4] = {send_counts[q], send_offsets[q], recv_counts[q], recv_offsets[q]};
        for (int i = 0; i < 4; i++)
            if (values[i] < 0 || values[i] > INT_MAX) {
                snprintf(why, why_size, "alltoallv: %lld rows for rank %d are beyond MPI's int count",
                         (long long)values[i], q);
                return 3;
            }
        s->counts[q] = (int)send_counts[q];
        s->displs[q] = (int)send_offsets[q];
        s->recv_counts[q] = (int)recv_counts[q];
        s->recv_displs[q] = (int)recv_offsets[q];
    }
    MPI_Datatype row;
    int rc = MPI_Type_contiguous((int)unit_bytes, MPI_BYTE, &row);
    if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&row);
    if (rc != MPI_SUCCESS) return start_failed(rc, "MPI_Type_contiguous", why, why_size);
    MPI_Request request;
    rc = MPI_Ialltoallv(send, s->counts, s->displs, row, recv, s->recv_counts, s->recv_displs, row, s->comm,
                        &request);
    int failed = rc != MPI_SUCCESS ? start_failed(rc, "MPI_Ialltoallv", why, why_size)
                                   : wait_for(&request, timeout_s, "MPI_Ialltoallv", why, why_size);
    MPI_Type_free(&row); /* a pending operation keeps its own reference */
    return failed;
}

static int mpi_allreduce_max(void *user, int64_t *values, int n, double timeout_s, char *why, size_t why_size) {
    mpi_state *s = user;
    MPI_Request request;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, values, n, MPI_INT64_T, MPI_MAX, s->comm, &request);
    if (rc != MPI_SUCCESS) return start_failed(rc, "MPI_Iallreduce", why, why_size);
    return wait_for(&request, timeout_s, "MPI_Iallreduce", why, why_size);
}

static int mpi_allgather(void *user, const void *send, void *recv, size_t bytes, double timeout_s, char *why,
                         size_t why_size) {
    mpi_state *s = user;
    if (bytes > INT_MAX) {
        snprintf(why, why_size, "allgather of %zu bytes is beyond MPI's int count", bytes);
        return 3;
    }
    MPI_Request request;
    int rc = MPI_Iallgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, s->comm, &request);
    if (rc != MPI_SUCCESS) return start_failed(rc, "MPI_Iallgather", why, why_size);
    return wait_for(&request, timeout_s, "MPI_Iallgather", why, why_size);
}

static void mpi_destroy(void *user) {
    mpi_state *s = user;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&s->comm); /* local; pending operations keep it alive in MPI */
    free(s->counts);
    free(s->displs);
    free(s->recv_counts);
    free(s->recv_displs);
    free(s);
}

moegen_status moegen_comm_create_mpi(MPI_Comm comm, moegen_comm **out, moegen_error *err) {
    if (!out) return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_comm_create_mpi: out is NULL");
    *out = NULL;
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "moegen_comm_create_mpi: MPI is %s (call MPI_Init_thread first)",
                                finalized ? "finalized" : "not initialized");
    mpi_state *s = calloc(1, sizeof *s);
    if (!s) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    int rank = 0, rc = MPI_Comm_dup(comm, &s->comm);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(s->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(s->comm, &rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(s->comm, &s->ranks);
    if (rc != MPI_SUCCESS) {
        char why[256];
        mpi_reason(rc, "MPI_Comm_dup", why, sizeof why);
        free(s);
        return moegen_error_set(err, MOEGEN_ERR_COMM, rc, "moegen_comm_create_mpi: %s", why);
    }
    const size_t n = (size_t)s->ranks;
    s->counts = calloc(n, sizeof(int));
    s->displs = calloc(n, sizeof(int));
    s->recv_counts = calloc(n, sizeof(int));
    s->recv_displs = calloc(n, sizeof(int));
    if (!s->counts || !s->displs || !s->recv_counts || !s->recv_displs) {
        mpi_destroy(s);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    const moegen_comm_callbacks ops = {mpi_alltoall, mpi_alltoallv, mpi_allreduce_max, mpi_allgather, mpi_destroy};
    moegen_status st = moegen_comm_wrap(rank, s->ranks, MOEGEN_COMM_HOST, "mpi", &ops, s, out, err);
    if (st != MOEGEN_OK) mpi_destroy(s);
    return st;
}
