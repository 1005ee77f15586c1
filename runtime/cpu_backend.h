/* cpu_backend.h — the CPU backend of a layer: generate, compile with the host C compiler
 * (through the cache), load the module, own its workspace, and run it whole (forward) or
 * in its three stages (route, experts, combine: what the expert-parallel layer drives).
 *
 * Place in the pipeline: spec -> gen -> [compile (host cc) -> cache -> load -> launch].
 * runtime/layer.c owns the public API and calls this module (or cuda_backend.c) for a
 * layer; runtime/ep.c calls the stages for a layer with ep_size > 1.
 *
 * Invariants owned here:
 *  - The module's cache key covers the generator version, the compiler's identity, the
 *    flags and every generated file; never a path.
 *  - A cache entry that passes its manifest but does not load is evicted and rebuilt once.
 *  - The workspace grows only when a token count needs it, and never beyond what the
 *    process may allocate (runtime/memory_limit.c): such a call fails with both sizes.
 *  - Route and combine of one forward use the same workspace and token count; nothing
 *    else may run on the backend between them.
 */
#ifndef MOEGEN_RUNTIME_CPU_BACKEND_H
#define MOEGEN_RUNTIME_CPU_BACKEND_H

#include "moegen.h"
#include "moegen_kernel_abi.h"
#include "spec.h"
#include "template.h"

typedef struct moegen_cpu_backend moegen_cpu_backend;

/* Generate, compile or fetch from the cache, and load the module of `spec`. Uses
 * options->cache_dir, compile_timeout_s, log. `desc` gets variant and cache_hit.
 * Returns MOEGEN_OK, or the statuses of the generator, the compiler, the cache and the
 * loader (MOEGEN_ERR_COMPILE, MOEGEN_ERR_LOAD, ...). */
moegen_status moegen_cpu_backend_open(const moegen_spec *spec, const moegen_open_options *options,
                                      const moegen_template_set *templates, moegen_cpu_backend **out,
                                      moegen_layer_desc *desc, moegen_error *err);

/* The whole forward on `n_threads` threads. */
moegen_status moegen_cpu_backend_forward(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                         const moegen_forward_io *io, moegen_forward_stats *stats,
                                         moegen_error *err);

/* Stage 1 + 2 of io->n_tokens tokens: every output of `io` but y, the statistics, and the
 * plan (pointers into the backend's workspace, valid until the next call). */
moegen_status moegen_cpu_backend_route(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                       const moegen_forward_io *io, moegen_kernel_plan *plan,
                                       moegen_forward_stats *stats, moegen_error *err);

/* Routed experts over caller-given rows (moegen_kernel_expert_args). */
moegen_status moegen_cpu_backend_experts(moegen_cpu_backend *b, const moegen_kernel_expert_args *args,
                                         moegen_error *err);

/* Dense experts and the combine into io->y, after route (same io, same workspace) and after
 * the caller filled plan->expert_out. */
moegen_status moegen_cpu_backend_combine(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                         const moegen_forward_io *io, moegen_error *err);

/* Training (docs/numerics.md §8): a forward whose state is kept in *saved (its own workspace
 * and a copy of x), and the two phases of its backward; grads == NULL in backward computes
 * dx only, and backward_weights then makes the weight gradients. */
typedef struct moegen_cpu_saved moegen_cpu_saved;
moegen_status moegen_cpu_backend_forward_train(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                               const moegen_forward_io *io, moegen_cpu_saved **saved,
                                               moegen_forward_stats *stats, moegen_error *err);
moegen_status moegen_cpu_backend_backward(moegen_cpu_backend *b, moegen_cpu_saved *saved, int n_threads,
                                          const moegen_backward_io *bio, const moegen_grads *grads,
                                          moegen_error *err);
moegen_status moegen_cpu_backend_backward_weights(moegen_cpu_backend *b, moegen_cpu_saved *saved, int n_threads,
                                                  const moegen_grads *grads, moegen_error *err);
size_t moegen_cpu_saved_bytes(const moegen_cpu_saved *saved);
int64_t moegen_cpu_saved_tokens(const moegen_cpu_saved *saved);
void moegen_cpu_saved_free(moegen_cpu_saved *saved);

void moegen_cpu_backend_close(moegen_cpu_backend *b);

/* The stages the expert-parallel layer drives (runtime/ep.h); host buffers are heap memory
 * (host_alloc / host_free NULL). */
struct moegen_ep_backend;
void moegen_cpu_backend_ep(moegen_cpu_backend *b, struct moegen_ep_backend *ops);

#endif
