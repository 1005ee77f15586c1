/* ep.h — the expert-parallel layer: one rank's share of a layer with ep_size = P > 1.
 *
 * Place in the pipeline: ... -> load -> [launch across ranks]. It sits above a backend
 * (moegen_ep_backend: the CPU one, or the CUDA one staged through host memory) and a
 * communicator (runtime/comm.h), and never below either:
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
#include "moegen.h"
#include "moegen_kernel_abi.h"
#include "spec.h"

typedef struct moegen_ep moegen_ep;

/* What the expert-parallel layer needs from a backend: its stages, with everything that
 * crosses ranks in host memory (a CUDA backend stages it through pinned host buffers).
 * Every count and offset is on the host. */
typedef struct moegen_ep_backend {
    void *self;
    /* Router, capacity and permutation of io's tokens over all E experts: every output of
     * io but y, the statistics it knows, and the kept rows of each expert and the
     * permutation's expert offsets ([E] and [E + 1]). */
    moegen_status (*route)(void *self, const moegen_kernel_weights *w, int n_threads, const moegen_forward_io *io,
                           int64_t *counts_after, int64_t *expert_offset, moegen_forward_stats *stats,
                           moegen_error *err);
    /* The kept rows' inputs (layer dtype) in expert order — expert e's first counts_after[e]
     * rows of the permutation — and, with weight_on_input, their scales (`scales` is NULL
     * otherwise), into host buffers. */
    moegen_status (*pack)(void *self, const moegen_forward_io *io, void *rows, float *scales, moegen_error *err);
    /* The local experts [first, first + n) (`w` holds their slices) over host rows laid out
     * expert by expert (local_offset[n + 1]); fp32 outputs into host `out`. */
    moegen_status (*experts)(void *self, const moegen_kernel_weights *w, int n_threads, int first, int n,
                             const int64_t *local_offset, const void *rows, const float *scales, float *out,
                             moegen_error *err);
    /* The outputs of the kept rows (fp32, in the order pack wrote them) into the rows of the
     * permutation they belong to. */
    moegen_status (*unpack)(void *self, const float *returned, moegen_error *err);
    /* Shared experts, residual, combine into io->y; the statistics it computes. */
    moegen_status (*combine)(void *self, const moegen_kernel_weights *w, int n_threads, const moegen_forward_io *io,
                             moegen_forward_stats *stats, moegen_error *err);
    /* Host buffers for the exchange (page-locked where the backend copies to a device);
     * both NULL: malloc and free. */
    void *(*host_alloc)(void *self, size_t bytes);
    void (*host_free)(void *self, void *buffer);

    /* Training (NULL where the backend has none: the CUDA backend). Between train_begin and
     * train_end the stages above run one training forward, whose state goes into a saved
     * object of the backend's (freed with saved_free). */
    moegen_status (*train_begin)(void *self, const moegen_kernel_weights *w, int n_threads,
                                 const moegen_forward_io *io, void **saved, moegen_error *err);
    void (*train_end)(void *self, void *saved);
    /* Backward stages (moegen_kernel_abi.h): the combine's backward (the kept rows' d loss /
     * d output in plan->row_do, and where their d loss / d input goes, plan->row_du); the local
     * experts' backward over host rows (weights: 0 = du, 1 = their weight gradients); the
     * router's backward and dx; the router's and dense FFNs' weight gradients. */
    moegen_status (*backward_combine)(void *self, void *saved, int n_threads, const moegen_backward_io *bio,
                                      moegen_kernel_backward_plan *plan, moegen_error *err);
    moegen_status (*backward_experts)(void *self, const moegen_kernel_expert_backward_args *args, int weights,
                                      moegen_error *err);
    moegen_status (*backward_route)(void *self, void *saved, int n_threads, const moegen_backward_io *bio,
                                    moegen_error *err);
    moegen_status (*backward_weights)(void *self, void *saved, int n_threads, const moegen_grads *grads,
                                      moegen_error *err);
    size_t (*saved_bytes)(const void *saved);
    void (*saved_free)(void *saved);
} moegen_ep_backend;

/* Check the ranks agree (a collective: every rank must call it) and set up rank r's
 * share over `backend` (copied). `desc` gets rank, ep_size and the local expert range. */
moegen_status moegen_ep_open(const moegen_spec *spec, const char *spec_hash, moegen_comm *comm,
                             const moegen_ep_backend *backend, moegen_ep **out, moegen_layer_desc *desc,
                             moegen_error *err);

/* One forward of this rank's io->n_tokens tokens (a collective). `w` holds the router,
 * shared and residual weights whole and the expert tensors of the local experts only. */
moegen_status moegen_ep_forward(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                const moegen_forward_io *io, moegen_forward_stats *stats, moegen_error *err);

/* Training (a collective, like forward): a forward of io's tokens whose state is kept in
 * *saved, then its backward: `grads` NULL computes dx only and moegen_ep_backward_weights the
 * weight gradients later. Every rank gets the gradients of its local experts (w1, b1, w2, b2
 * of `grads` point at their slices, as the weights do), summed over the rows every rank sent
 * them in a fixed order (source rank, then the source's row order), and, for the replicated
 * router, shared experts and residual MLP, its own tokens' contribution (to be all-reduced by
 * the caller, as data-parallel gradients are). MOEGEN_ERR_UNSUPPORTED where the backend has
 * no training stages. */
typedef struct moegen_ep_saved moegen_ep_saved;
moegen_status moegen_ep_forward_train(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                      const moegen_forward_io *io, moegen_ep_saved **saved,
                                      moegen_forward_stats *stats, moegen_error *err);
moegen_status moegen_ep_backward(moegen_ep *ep, moegen_ep_saved *saved, int n_threads, const moegen_backward_io *bio,
                                 const moegen_grads *grads, moegen_error *err);
moegen_status moegen_ep_backward_weights(moegen_ep *ep, moegen_ep_saved *saved, int n_threads, const moegen_grads *grads,
                                         moegen_error *err);
int64_t moegen_ep_saved_tokens(const moegen_ep_saved *saved);
size_t moegen_ep_saved_bytes(const moegen_ep_saved *saved);
void moegen_ep_saved_free(moegen_ep_saved *saved);

void moegen_ep_close(moegen_ep *ep);

#endif
