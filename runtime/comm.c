/* comm.c — the communicator the expert-parallel layer talks through (see comm.h): the
 * transport-independent part — creation over callbacks, the deadline, the broken flag,
 * byte counters and the messages. The transports are in comm_mpi.c and comm_nccl.c. */
#include "comm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

double moegen_comm_default_timeout(void) {
    const char *text = getenv("MOEGEN_COMM_TIMEOUT");
    if (text && *text) {
        char *end = NULL;
        double seconds = strtod(text, &end);
        if (end && *end == '\0' && isfinite(seconds) && seconds > 0.0) return seconds;
    }
    return MOEGEN_COMM_DEFAULT_TIMEOUT_S;
}

moegen_status moegen_comm_wrap(int rank, int size, moegen_comm_memory memory, const char *transport,
                               const moegen_comm_callbacks *ops, void *user, moegen_comm **out,
                               moegen_error *err) {
    if (!out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "communicator: `out` is NULL");
    *out = NULL;
    if (!ops || !ops->alltoall || !ops->alltoallv || !ops->allreduce_max || !ops->allgather)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "communicator: the callbacks alltoall, alltoallv, allreduce_max and allgather "
                                "are all required");
    if (size < 1 || rank < 0 || rank >= size)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "communicator: rank %d of size %d (need 0 <= rank < size)", rank, size);
    if (memory != MOEGEN_COMM_HOST && memory != MOEGEN_COMM_DEVICE)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "communicator: unknown memory kind %d",
                                (int)memory);
    moegen_comm *comm = calloc(1, sizeof *comm);
    if (!comm) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "communicator: out of memory");
    comm->rank = rank;
    comm->size = size;
    comm->memory = memory;
    comm->ops = *ops;
    comm->user = user;
    comm->timeout_s = moegen_comm_default_timeout();
    snprintf(comm->transport, sizeof comm->transport, "%s", transport ? transport : "user");
    *out = comm;
    return MOEGEN_OK;
}

moegen_status moegen_comm_create(int rank, int size, const moegen_comm_callbacks *callbacks, void *user,
                                 moegen_comm **out, moegen_error *err) {
    return moegen_comm_wrap(rank, size, MOEGEN_COMM_HOST, "user", callbacks, user, out, err);
}

moegen_status moegen_comm_set_timeout(moegen_comm *comm, double seconds, moegen_error *err) {
    if (!comm || !isfinite(seconds) || seconds <= 0.0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "communicator timeout: need a communicator and a positive number of seconds");
    comm->timeout_s = seconds;
    return MOEGEN_OK;
}

int moegen_comm_rank(const moegen_comm *comm) { return comm ? comm->rank : -1; }
int moegen_comm_size(const moegen_comm *comm) { return comm ? comm->size : -1; }
double moegen_comm_timeout(const moegen_comm *comm) { return comm ? comm->timeout_s : moegen_comm_default_timeout(); }
int moegen_comm_broken(const moegen_comm *comm) { return comm ? comm->broken : 0; }

void moegen_comm_adopt(moegen_comm *comm, void *buffer) {
    if (!comm || !buffer) return;
    void **grown = realloc(comm->adopted, (size_t)(comm->n_adopted + 1) * sizeof *grown);
    if (!grown) return;
    comm->adopted = grown;
    comm->adopted[comm->n_adopted++] = buffer;
}

void moegen_comm_destroy(moegen_comm *comm) {
    if (!comm) return;
    if (comm->ops.destroy) comm->ops.destroy(comm->user);
    for (int i = 0; i < comm->n_adopted; i++) free(comm->adopted[i]);
    free(comm->adopted);
    free(comm);
}

/* Fail at once on a broken communicator. */
static moegen_status check_usable(const moegen_comm *comm, const char *what, moegen_error *err) {
    if (!comm) return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: no communicator", what);
    if (comm->broken)
        return moegen_error_set(err, MOEGEN_ERR_COMM, 0, "rank %d: %s: the %s communicator is broken by an earlier "
                                "failure (%s)", comm->rank, what, comm->transport, comm->broken_why);
    return MOEGEN_OK;
}

/* Record a failed collective: the communicator is broken from now on. */
static moegen_status fail(moegen_comm *comm, const char *what, int code, const char *why, moegen_error *err) {
    comm->broken = 1;
    snprintf(comm->broken_why, sizeof comm->broken_why, "%s failed: %s", what,
             why && why[0] ? why : "the transport gave no reason");
    return moegen_error_set(err, MOEGEN_ERR_COMM, code, "rank %d of %d: %s over %s failed (deadline %.3g s): %s",
                            comm->rank, comm->size, what, comm->transport, comm->timeout_s,
                            why && why[0] ? why : "the transport gave no reason");
}

moegen_status moegen_comm_alltoall(moegen_comm *comm, const void *send, void *recv, size_t bytes,
                                   moegen_error *err) {
    moegen_status st = check_usable(comm, "alltoall", err);
    if (st != MOEGEN_OK) return st;
    char why[512] = "";
    int rc = comm->ops.alltoall(comm->user, send, recv, bytes, NULL, comm->timeout_s, why, sizeof why);
    if (rc != 0) return fail(comm, "alltoall", rc, why, err);
    comm->bytes_sent += (uint64_t)bytes * (uint64_t)(comm->size - 1);
    comm->bytes_received += (uint64_t)bytes * (uint64_t)(comm->size - 1);
    return MOEGEN_OK;
}

moegen_status moegen_comm_alltoallv(moegen_comm *comm, const void *send, const int64_t *send_counts,
                                    const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                    const int64_t *recv_offsets, size_t unit_bytes, moegen_error *err) {
    moegen_status st = check_usable(comm, "alltoallv", err);
    if (st != MOEGEN_OK) return st;
    char why[512] = "";
    int rc = comm->ops.alltoallv(comm->user, send, send_counts, send_offsets, recv, recv_counts, recv_offsets,
                                 unit_bytes, NULL, comm->timeout_s, why, sizeof why);
    if (rc != 0) return fail(comm, "alltoallv", rc, why, err);
    for (int q = 0; q < comm->size; q++)
        if (q != comm->rank) {
            comm->bytes_sent += (uint64_t)send_counts[q] * unit_bytes;
            comm->bytes_received += (uint64_t)recv_counts[q] * unit_bytes;
        }
    return MOEGEN_OK;
}

moegen_status moegen_comm_allreduce_max(moegen_comm *comm, int64_t *values, int n, moegen_error *err) {
    moegen_status st = check_usable(comm, "allreduce", err);
    if (st != MOEGEN_OK) return st;
    char why[512] = "";
    int rc = comm->ops.allreduce_max(comm->user, values, n, comm->timeout_s, why, sizeof why);
    return rc != 0 ? fail(comm, "allreduce", rc, why, err) : MOEGEN_OK;
}

moegen_status moegen_comm_allgather(moegen_comm *comm, const void *send, void *recv, size_t bytes,
                                    moegen_error *err) {
    moegen_status st = check_usable(comm, "allgather", err);
    if (st != MOEGEN_OK) return st;
    char why[512] = "";
    int rc = comm->ops.allgather(comm->user, send, recv, bytes, comm->timeout_s, why, sizeof why);
    return rc != 0 ? fail(comm, "allgather", rc, why, err) : MOEGEN_OK;
}
