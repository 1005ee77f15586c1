/* thread_comm.h — a transport for tests: P ranks as P threads of one process, behind the
 * caller-callback interface (moegen_comm_create). Every collective posts this rank's
 * buffers, waits for all ranks (a barrier with the collective's deadline), copies from
 * the peers' buffers, and waits again before returning (so no rank reuses a buffer a
 * peer still reads). A missed deadline breaks the whole world: every rank's later
 * collectives fail at once, as a real transport's would after a peer is lost.
 */
#ifndef MOEGEN_TESTS_THREAD_COMM_H
#define MOEGEN_TESTS_THREAD_COMM_H

#include "moegen.h"

typedef struct thread_world thread_world;

thread_world *thread_world_create(int ranks);
void thread_world_destroy(thread_world *world);

/* Rank `rank`'s communicator (destroy it before the world). */
moegen_comm *thread_world_comm(thread_world *world, int rank);

#endif
