/* comm.h — what the expert-parallel layer needs from a transport, and nothing more.
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. An expert-parallel
 * layer (runtime/ep.c) exchanges per-expert counts, rows of tokens and expert outputs
 * between its P ranks. It does so only through a moegen_comm: a rank, a size and four
 * collectives, each bounded by a deadline. Three transports fill one in:
 *   - MPI (runtime/comm_mpi.c, in the optional libmoegen_mpi; host buffers);
 *   - NCCL (runtime/comm_nccl.c, libnccl.so.2 opened with dlopen; device buffers);
 *   - the caller's own callbacks (moegen_comm_create in moegen.h: a framework's process
 *     group, or threads of one process in the tests).
 *
 * Invariants:
 *  - Every collective is called by every rank in the same order; a rank with nothing to
 *    send still calls it (zero counts).
 *  - A collective returns within its timeout or fails. A failed or timed-out collective
 *    marks the communicator broken: every later call fails at once with the first
 *    error, so no rank waits on a peer that has already given up. A broken communicator
 *    can only be destroyed.
 *  - Counts of moegen_comm_alltoallv are in units (rows) of `unit_bytes` bytes, so no
 *    transport needs an element count beyond 2^31 for a row count that fits.
 *  - The communicator belongs to the caller; a layer only borrows it.
 */
#ifndef MOEGEN_RUNTIME_COMM_H
#define MOEGEN_RUNTIME_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "moegen.h"

struct moegen_comm {
    int rank, size;
    moegen_comm_memory memory;     /* where the buffers of the collectives live */
    moegen_comm_callbacks ops;     /* the transport */
    void *user;                    /* its state */
    double timeout_s;              /* the default deadline of one collective */
    char transport[16];            /* "mpi", "nccl", "user" */
    int broken;                    /* a collective failed: everything fails from now on */
    char broken_why[MOEGEN_ERROR_MESSAGE_BYTES];
    uint64_t bytes_sent, bytes_received; /* by alltoallv, since creation */
    void **adopted;                /* buffers a timed-out collective may still use: freed at destroy */
    int n_adopted;
};

/* The collectives, as the layer calls them. Each checks `broken`, runs the transport's
 * callback under the communicator's timeout, and turns a failure into a moegen_status
 * (MOEGEN_ERR_COMM) whose message names this rank, the collective and the transport's
 * reason. */

/* Every rank sends `bytes` bytes to every rank: send[q * bytes ...] goes to rank q, and
 * recv[q * bytes ...] comes from rank q. */
moegen_status moegen_comm_alltoall(moegen_comm *comm, const void *send, void *recv, size_t bytes,
                                   moegen_error *err);

/* Rows of `unit_bytes` bytes: send_counts[q] rows from send + send_offsets[q] rows go to
 * rank q; recv_counts[q] rows from rank q land at recv + recv_offsets[q] rows. */
moegen_status moegen_comm_alltoallv(moegen_comm *comm, const void *send, const int64_t *send_counts,
                                    const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                    const int64_t *recv_offsets, size_t unit_bytes, moegen_error *err);

/* values[i] = max over ranks of values[i], i < n. */
moegen_status moegen_comm_allreduce_max(moegen_comm *comm, int64_t *values, int n, moegen_error *err);

/* recv[q * bytes ...] = rank q's `bytes` bytes of send. */
moegen_status moegen_comm_allgather(moegen_comm *comm, const void *send, void *recv, size_t bytes,
                                    moegen_error *err);

/* After a failure, a layer hands over the buffers it gave the transport (a collective MPI
 * cannot cancel may still write them): they are freed when the communicator is destroyed.
 * NULL is ignored; if the list cannot grow the buffer is left alone (never freed early). */
void moegen_comm_adopt(moegen_comm *comm, void *buffer);

/* A communicator over callbacks the transport fills (used by the MPI and NCCL
 * constructors as well as by moegen_comm_create). */
moegen_status moegen_comm_wrap(int rank, int size, moegen_comm_memory memory, const char *transport,
                               const moegen_comm_callbacks *ops, void *user, moegen_comm **out,
                               moegen_error *err);

/* The deadline of one collective: $MOEGEN_COMM_TIMEOUT seconds when set (a positive
 * number), else MOEGEN_COMM_DEFAULT_TIMEOUT_S. */
double moegen_comm_default_timeout(void);

#define MOEGEN_COMM_DEFAULT_TIMEOUT_S 300.0

#endif
