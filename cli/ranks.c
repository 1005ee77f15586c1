/* ranks.c — the ranks of a `moegen run` / `bench` process (see ranks.h). */
#include "ranks.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#ifdef MOEGEN_HAVE_MPI
#include "moegen_mpi.h"
#endif

/* Was this process started by an MPI launcher? */
static int launched_by_mpi(void) {
    const char *names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (getenv(names[i])) return 1;
    return 0;
}

int cli_ranks_start(cli_ranks *r, int ep_size) {
    memset(r, 0, sizeof *r);
    r->size = 1;
    if (!launched_by_mpi()) {
        if (ep_size > 1)
            return moegen_cli_error("the spec has ep_size %d: run it on %d ranks, e.g. `mpirun -np %d moegen run ...`"
                                    "%s",
                                    ep_size, ep_size, ep_size,
#ifdef MOEGEN_HAVE_MPI
                                    ""
#else
                                    " (this moegen was built without MPI: install Open MPI and rebuild)"
#endif
            );
        return 0;
    }
#ifdef MOEGEN_HAVE_MPI
    int provided = 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return moegen_cli_error("MPI_Init_thread failed");
    r->mpi_started = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &r->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &r->size);
    if (r->size != ep_size) {
        int rc = r->rank == 0 ? moegen_cli_error("launched on %d ranks, but the spec's ep_size is %d", r->size, ep_size)
                              : 1;
        cli_ranks_stop(r);
        return rc;
    }
    if (r->size > 1) {
        moegen_error err;
        if (moegen_comm_create_mpi(MPI_COMM_WORLD, &r->comm, &err) != MOEGEN_OK) {
            moegen_cli_error("rank %d: %s", r->rank, err.message);
            cli_ranks_stop(r);
            return 1;
        }
    }
    return 0;
#else
    if (ep_size > 1)
        return moegen_cli_error("launched by an MPI launcher, but this moegen was built without MPI "
                                "(install Open MPI and rebuild)");
    return 0;
#endif
}

#ifdef MOEGEN_HAVE_MPI
/* Poll `request` until done or the communicator's deadline (then the command has stalled). */
static int wait_or_give_up(cli_ranks *r, MPI_Request *request) {
    const double deadline = MPI_Wtime() + moegen_comm_timeout(r->comm);
    for (;;) {
        int done = 0;
        if (MPI_Test(request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
        if (done) return 0;
        if (MPI_Wtime() > deadline) break;
        struct timespec pause = {0, 200000};
        nanosleep(&pause, NULL);
    }
    r->stalled = 1;
    return -1;
}
#endif

int cli_ranks_all_ok(cli_ranks *r, int ok) {
#ifdef MOEGEN_HAVE_MPI
    if (r->mpi_started && r->size > 1 && !r->stalled) {
        int all = 0;
        MPI_Request request;
        if (MPI_Iallreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD, &request) != MPI_SUCCESS ||
            wait_or_give_up(r, &request) != 0)
            return 0;
        return all;
    }
#endif
    (void)r;
    return ok;
}

int cli_ranks_gather(cli_ranks *r, const void *mine, void *all, size_t bytes) {
#ifdef MOEGEN_HAVE_MPI
    if (r->mpi_started && r->size > 1) {
        MPI_Request request;
        if (r->stalled ||
            MPI_Igather(mine, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD, &request) !=
                MPI_SUCCESS ||
            wait_or_give_up(r, &request) != 0)
            return -1;
        return 0;
    }
#endif
    (void)r;
    if (all) memcpy(all, mine, bytes);
    return 0;
}

void cli_ranks_stop(cli_ranks *r) {
    /* After a timed-out collective a peer is gone or stuck: MPI_Finalize could wait for it
     * forever, so the process leaves without it (the launcher reports that). */
    const int stuck = r->stalled || moegen_comm_broken(r->comm);
    moegen_comm_destroy(r->comm);
    r->comm = NULL;
#ifdef MOEGEN_HAVE_MPI
    if (r->mpi_started && !stuck) MPI_Finalize();
#endif
    (void)stuck;
    r->mpi_started = 0;
}
