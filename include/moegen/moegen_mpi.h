/* moegen_mpi.h — an MPI communicator for expert-parallel layers (libmoegen_mpi).
 *
 * Part of the public API for programs that use MPI: it needs <mpi.h>, so it lives in its
 * own header and library (libmoegen_mpi, built when CMake finds MPI); libmoegen itself
 * never depends on MPI.
 *
 *   MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
 *   moegen_comm *comm;
 *   moegen_comm_create_mpi(MPI_COMM_WORLD, &comm, &err);    // collective
 *   opts.comm = comm;                                       // then open the layer on every rank
 *   ...
 *   moegen_comm_destroy(comm);                              // after every layer using it closed
 *
 * The layer makes its MPI calls from the thread that calls moegen_layer_open / forward;
 * if several threads drive layers, initialize MPI with MPI_THREAD_MULTIPLE.
 */
#ifndef MOEGEN_MPI_H
#define MOEGEN_MPI_H

#include <mpi.h>

#include "moegen.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A communicator over a duplicate of `comm` (MPI_Comm_dup: a collective, so every rank
 * of `comm` must call it), with MPI_ERRORS_RETURN, so moegen's traffic never mixes with
 * the caller's and an MPI error returns instead of aborting. Every collective is
 * non-blocking and polled against the deadline (moegen_comm_set_timeout). Returns
 * MOEGEN_OK, MOEGEN_ERR_STATE when MPI is not initialized, MOEGEN_ERR_COMM when MPI fails. */
moegen_status moegen_comm_create_mpi(MPI_Comm comm, moegen_comm **out, moegen_error *err);

#ifdef __cplusplus
}
#endif
#endif
