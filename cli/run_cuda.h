/* run_cuda.h — the device side of `moegen run --device cuda` (see run_cuda.c). Every
 * function prints its own error ("moegen: ...") and returns non-zero on failure. */
#ifndef MOEGEN_CLI_RUN_CUDA_H
#define MOEGEN_CLI_RUN_CUDA_H

#include "backward_io.h"
#include "cuda_api.h"
#include "moegen.h"
#include "tensors.h"

typedef struct cuda_run {
    moegen_cuda cu;
    moegen_cu_device device;
    moegen_cu_context context;
    moegen_cuda_device info;
    moegen_cu_device_pointer tensors[MOE_T_COUNT];
    moegen_cu_device_pointer y, ids, topk_weights, router_weights, counts_before, counts_after;
} cuda_run;

int cuda_run_open(cuda_run *r, int ordinal);
int cuda_run_upload(cuda_run *r, const moe_tensors *ts, const moegen_spec *spec);
void cuda_run_weights(const cuda_run *r, moegen_weights *w);
void cuda_run_io(const cuda_run *r, int64_t n_tokens, uint64_t rng_offset, moegen_forward_io *io);
/* Time `repeat` forwards (after one warm-up) with CUDA events on the default stream. */
int cuda_run_time(cuda_run *r, moegen_layer *layer, const moegen_forward_io *io, int repeat, double *times_ms);
/* counts_before and counts_after may be NULL (not copied). */
int cuda_run_download(cuda_run *r, const moegen_spec *spec, int64_t n_tokens, void *y, int32_t *ids,
                      float *topk_weights, float *router_weights, int64_t *counts_before,
                      int64_t *counts_after);
/* A training step's device buffers: dy (uploaded from b->dy), dx and every gradient b has. */
typedef struct cuda_train_buffers {
    moegen_cu_device_pointer dy, dx, grads[MOE_T_COUNT];
} cuda_train_buffers;
/* Allocate them and point bio's dy and dx and g's gradients at them (g->accumulate kept). */
int cuda_run_train_alloc(cuda_run *r, const moegen_spec *spec, const moe_backward_buffers *b, cuda_train_buffers *d, moegen_backward_io *bio,
                         moegen_grads *g);
/* Wait for the device, then copy dx and every gradient into b. */
int cuda_run_train_download(cuda_run *r, const moegen_spec *spec, const cuda_train_buffers *d, moe_backward_buffers *b);
void cuda_run_train_free(cuda_run *r, cuda_train_buffers *d);
/* Wait for everything queued on the device (a kernel's failure shows here). */
int cuda_run_sync(cuda_run *r);
void cuda_run_close(cuda_run *r);
/* Memory bandwidth of the floor for this device, bytes/s. */
double cuda_run_bandwidth(const cuda_run *r);

#endif
