/* ep.h — the expert-parallel layer: one rank's share of a layer with ep_size = P > 1.
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. It sits above a backend
 * (today the CPU one) and a communicator (runtime/comm.h), and never below either:
 * the backend runs the stages, the communicator moves bytes, and this file decides
 * what moves where.
 *
 * What a rank computes (docs/numerics.md §7): rank r owns experts
 * [r·E/P, (r+1)·E/P) and has bound only their weights; it routes its own tokens over
 * all E experts (router replicated, capacity and drops per rank), then
 *   1. route:    the backend's route stage; kept routes per expert;
 *   2. counts:   all-to-all of the kept-row counts of each destination's experts;
 *   3. dispatch: the kept rows packed in expert order (hence destination order) and
 *                sent with one all-to-all-v (plus the weight_on_input scales);
 *   4. experts:  the received rows laid out expert by expert (source rank, then the
 *                source's order) and run through the local experts;
 *   5. return:   the fp32 outputs sent back with the mirror all-to-all-v, into the
 *                rows of the route stage's permutation;
 *   6. combine:  the backend's combine stage (shared experts, residual, weighted sum).
 * Rows of a row never depend on other rows, so every rank's outputs equal, bit for
 * bit, an ep_size = 1 layer run on that rank's tokens with all the weights.
 *
 * Invariants:
 *  - Every rank makes the same collectives in the same order, whatever its token count
 *    (zero included).
 *  - Open checks, on every rank, that all ranks opened the same canonical spec with
 *    ep_size equal to the communicator's size; a mismatch fails on every rank and names
 *    the odd rank(s).
 *  - A failed collective leaves the communicator broken (comm.h): later calls fail at
 *    once on this rank, and its peers time out instead of hanging.
 */
#ifndef MOEGEN_RUNTIME_EP_H
#define MOEGEN_RUNTIME_EP_H

#include "comm.h"
#include "cpu_backend.h"
#include "moegen.h"
#include "spec.h"

typedef struct moegen_ep moegen_ep;

/* Check the ranks agree (a collective: every rank must call it) and set up rank r's
 * share. `desc` gets rank, ep_size and the local expert range. */
moegen_status moegen_ep_open(const moegen_spec *spec, const char *spec_hash, moegen_comm *comm,
                             moegen_cpu_backend *backend, moegen_ep **out, moegen_layer_desc *desc,
                             moegen_error *err);

/* One forward of this rank's io->n_tokens tokens (a collective). `w` holds the router,
 * shared and residual weights whole and the expert tensors of the local experts only. */
moegen_status moegen_ep_forward(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                const moegen_forward_io *io, moegen_forward_stats *stats, moegen_error *err);

void moegen_ep_close(moegen_ep *ep);

#endif
