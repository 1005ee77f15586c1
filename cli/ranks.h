/* ranks.h — the ranks a `moegen run` / `moegen bench` process belongs to.
 *
 * Under an MPI launcher (mpirun sets OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK) the
 * command initializes MPI and gives expert-parallel layers a communicator over
 * MPI_COMM_WORLD; otherwise it is one rank. A spec with ep_size > 1 needs exactly
 * ep_size ranks: anything else is an error that says how to launch it.
 */
#ifndef MOEGEN_CLI_RANKS_H
#define MOEGEN_CLI_RANKS_H

#include <stddef.h>
#include <stdint.h>

#include "moegen.h"

typedef struct cli_ranks {
    moegen_comm *comm; /* NULL for one rank */
    int rank, size;
    int mpi_started;   /* this process initialized MPI (and finalizes it) */
    int stalled;       /* a collective of the command's own timed out: never finalize */
} cli_ranks;

/* Join the ranks (MPI when launched by mpirun). Returns 0, or 1 after printing an error. */
int cli_ranks_start(cli_ranks *r, int ep_size);

/* 1 on every rank when every rank's `ok` is 1 (0 on every rank otherwise). Like every
 * collective of the command it has the communicator's deadline: a rank that left early
 * makes the others give up, not hang. */
int cli_ranks_all_ok(cli_ranks *r, int ok);

/* Gather `bytes` bytes from every rank into `all` on rank 0 (`all` may be NULL elsewhere).
 * Returns 0, or -1 when the deadline passed. */
int cli_ranks_gather(cli_ranks *r, const void *mine, void *all, size_t bytes);

/* Leave: destroy the communicator, finalize MPI if this process started it. */
void cli_ranks_stop(cli_ranks *r);

#endif
