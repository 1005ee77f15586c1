/* cuda_backend.h — the CUDA backend of a layer: NVRTC compile (cached), module load,
 * device workspace, and the launch sequence of templates/common/moegen_cuda_abi.h.
 *
 * Place in the pipeline: spec -> gen -> [compile (NVRTC) -> cache -> load -> launch].
 * runtime/layer.c owns the public API and calls this module for layers whose device
 * is CUDA. Everything CUDA is reached through runtime/cuda_api.h (dlopen'd), so a
 * build of moegen without a GPU or driver still links and runs.
 *
 * Invariants owned here:
 *  - The CUBIN cache key covers the generator version, NVRTC's version, the target
 *    architecture, the compile options and every source and header byte; never a path.
 *  - A forward never synchronizes with the host unless the caller asks for the
 *    statistics (moegen_forward_stats); launches only read S and the host-computed
 *    capacity, so the forward can be captured in a CUDA graph.
 *  - No launch has a zero-size grid; S = 0 launches nothing.
 */
#ifndef MOEGEN_RUNTIME_CUDA_BACKEND_H
#define MOEGEN_RUNTIME_CUDA_BACKEND_H

#include "cache.h"
#include "cuda_api.h"
#include "emit.h"
#include "moegen.h"
#include "moegen_kernel_abi.h"
#include "spec.h"

typedef struct moegen_cuda_backend moegen_cuda_backend;

/* The NVRTC options moegen compiles generated code with (NULL-terminated list). */
extern const char *const moegen_cuda_compile_options[];

/* Render the CUDA source of `spec` for architecture `arch` ("sm_80", "sm_90a", "sm_100a";
 * read by moegen_cuda_arch_parse, gen/variant.h) with the default variant for it and
 * `overrides` applied (moegen_variant_apply_overrides; NULL for none); the variant is
 * kept in out->variant. Returns moegen_generate's statuses, and
 * MOEGEN_ERR_INVALID_ARGUMENT with the parser's message for an `arch` or override it
 * refuses (then `out` holds nothing to free). */
moegen_status moegen_cuda_generate(const moegen_spec *spec, const char *arch, const char *overrides,
                                   const moegen_template_set *templates, moegen_generated *out,
                                   moegen_error *err);

/* Compile generated CUDA files with NVRTC for `arch` (no driver needed). The main file
 * is the source; the others are offered as in-memory headers. */
moegen_status moegen_cuda_compile_generated(const moegen_nvrtc *nv, const moegen_generated *gen,
                                            const char *arch, moegen_nvrtc_output *out,
                                            moegen_error *err);

/* Open the backend for `spec` on CUDA device `ordinal`: driver, context (the device's
 * primary context), NVRTC compile through the cache (`cache` may be unusable: then a
 * temporary directory), module load. `arch` NULL: from the device.
 * The kernels are looked up by name (moegen_cuda_abi.h): optional ones the module lacks
 * are not launched; the tiles come from the generated result's variant.
 * Returns MOEGEN_OK; MOEGEN_ERR_UNSUPPORTED when there is no driver, no device or no
 * NVRTC (message says which); MOEGEN_ERR_INVALID_ARGUMENT for an `arch` that
 * moegen_cuda_arch_parse refuses; MOEGEN_ERR_COMPILE with the NVRTC log's first lines;
 * MOEGEN_ERR_LOAD when the module lacks a required kernel; MOEGEN_ERR_DEVICE for driver
 * failures. `variant`: overrides of the default variant (moegen_variant_apply_overrides),
 * NULL for none. `desc` gets variant, kernel_path, cache_hit. */
moegen_status moegen_cuda_backend_open(const moegen_spec *spec, int ordinal, const char *arch,
                                       const char *variant, const moegen_template_set *templates,
                                       moegen_cache *cache, moegen_cuda_backend **out,
                                       moegen_layer_desc *desc, moegen_error *err);

/* Probe only: is a driver with at least one device present? (MOEGEN_OK or
 * MOEGEN_ERR_UNSUPPORTED with the reason.) */
moegen_status moegen_cuda_backend_available(moegen_error *err);

/* Run the forward on device pointers (weights in `w`, tensors in `io`) on io->stream.
 * `stats` NULL: no host synchronization. Returns MOEGEN_OK, MOEGEN_ERR_INVALID_ARGUMENT,
 * MOEGEN_ERR_NO_MEMORY (device workspace) or MOEGEN_ERR_DEVICE. */
moegen_status moegen_cuda_backend_forward(moegen_cuda_backend *backend, const moegen_kernel_weights *w,
                                          const moegen_forward_io *io, moegen_forward_stats *stats,
                                          moegen_error *err);

void moegen_cuda_backend_close(moegen_cuda_backend *backend);

/* ---- Training (ep_size 1) ------------------------------------------------------------------
 * A training forward runs into device memory of its own (the forward's workspace, a copy of
 * x and the backward's buffers: moegen_cuda_saved_bytes), on io->stream; the backward and the
 * weight gradients run later on that same stream, and return once their kernels are queued.
 * dy, dx and every gradient buffer are device pointers. Compiled by NVRTC and checked
 * against a fake driver; not yet run on a GPU. */
typedef struct moegen_cuda_saved moegen_cuda_saved;

moegen_status moegen_cuda_backend_forward_train(moegen_cuda_backend *backend, const moegen_kernel_weights *w,
                                                const moegen_forward_io *io, moegen_cuda_saved **saved,
                                                moegen_forward_stats *stats, moegen_error *err);
/* dx and the per-row gradients; with `grads`, the weight gradients after them. */
moegen_status moegen_cuda_backend_backward(moegen_cuda_backend *backend, moegen_cuda_saved *saved,
                                           const moegen_backward_io *bio, const moegen_grads *grads,
                                           moegen_error *err);
/* The weight gradients (again, or for the first time after a backward without grads). */
moegen_status moegen_cuda_backend_backward_weights(moegen_cuda_backend *backend, moegen_cuda_saved *saved,
                                                   const moegen_grads *grads, moegen_error *err);
int64_t moegen_cuda_saved_tokens(const moegen_cuda_saved *saved);
size_t moegen_cuda_saved_bytes(const moegen_cuda_saved *saved);
/* Waits for the saved forward's stream, then frees its device memory. */
void moegen_cuda_saved_free(moegen_cuda_backend *backend, moegen_cuda_saved *saved);

/* The stages the expert-parallel layer drives (runtime/ep.h), staged through page-locked
 * host memory (cuMemAllocHost): route and the permutation's counts to the host, the kept
 * rows gathered on the device (P_ep_pack) and copied out, the received rows copied in and
 * run through the routed-group GEMMs, their outputs copied out, the returned outputs
 * copied into expert_out, then the dense GEMMs, combine and losses. Compiled, not yet run
 * on a GPU. */
struct moegen_ep_backend;
void moegen_cuda_backend_ep(moegen_cuda_backend *backend, struct moegen_ep_backend *ops);

#endif
