/* run_cuda.c — the device side of `moegen run --device cuda`: copy the tensors to the
 * GPU, time forwards with CUDA events, copy the outputs back for verification.
 *
 * Place in the pipeline: the `moegen` command on top of the runtime; it reaches the
 * driver through runtime/cuda_api.h (dlopen'd), in the device's primary context, which
 * is the one the layer uses.
 */
#include "run_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static int check(cuda_run *r, moegen_cu_result result, const char *what) {
    if (result == 0) return 0;
    char text[256];
    moegen_cli_error("%s: %s", what, moegen_cuda_error_text(&r->cu, result, text, sizeof text));
    return 1;
}

static int device_alloc(cuda_run *r, size_t bytes, moegen_cu_device_pointer *out) {
    *out = 0;
    if (bytes == 0) return 0;
    return check(r, r->cu.cuMemAlloc(out, bytes), "cuMemAlloc");
}

int cuda_run_open(cuda_run *r, int ordinal) {
    memset(r, 0, sizeof *r);
    moegen_error err;
    if (moegen_cuda_open(&r->cu, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    if (moegen_cuda_device_info(&r->cu, ordinal, &r->info, &err) != MOEGEN_OK)
        return moegen_cli_error("%s", err.message);
    if (check(r, r->cu.cuDeviceGet(&r->device, ordinal), "cuDeviceGet") ||
        check(r, r->cu.cuDevicePrimaryCtxRetain(&r->context, r->device), "cuDevicePrimaryCtxRetain") ||
        check(r, r->cu.cuCtxSetCurrent(r->context), "cuCtxSetCurrent"))
        return 1;
    return 0;
}

int cuda_run_upload(cuda_run *r, const moe_tensors *ts, const moegen_spec *spec) {
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const moe_tensor *t = &ts->t[i];
        if (!t->data) continue;
        size_t bytes = t->n_elems * moe_tensor_elem_bytes(ts, i);
        if (device_alloc(r, bytes, &r->tensors[i]) ||
            check(r, r->cu.cuMemcpyHtoD(r->tensors[i], t->data, bytes), "cuMemcpyHtoD"))
            return 1;
    }
    const size_t S = (size_t)ts->n_tokens, K = (size_t)spec->top_k, E = (size_t)spec->num_experts;
    if (device_alloc(r, S * spec->hidden_size * moegen_dtype_size(spec->dtype), &r->y) ||
        device_alloc(r, S * K * 4, &r->ids) || device_alloc(r, S * K * 4, &r->topk_weights) ||
        device_alloc(r, S * K * 4, &r->router_weights) || device_alloc(r, E * 8, &r->counts_before) ||
        device_alloc(r, E * 8, &r->counts_after))
        return 1;
    return 0;
}

#define DEVICE_POINTER(p) ((void *)(uintptr_t)(p))

void cuda_run_weights(const cuda_run *r, moegen_weights *w) {
    memset(w, 0, sizeof *w);
    w->router_w = DEVICE_POINTER(r->tensors[MOE_T_ROUTER_W]);
    w->router_b = DEVICE_POINTER(r->tensors[MOE_T_ROUTER_B]);
    w->score_bias = DEVICE_POINTER(r->tensors[MOE_T_SCORE_BIAS]);
    w->w1 = DEVICE_POINTER(r->tensors[MOE_T_W1]);
    w->b1 = DEVICE_POINTER(r->tensors[MOE_T_B1]);
    w->w2 = DEVICE_POINTER(r->tensors[MOE_T_W2]);
    w->b2 = DEVICE_POINTER(r->tensors[MOE_T_B2]);
    w->shared_w1 = DEVICE_POINTER(r->tensors[MOE_T_SHARED_W1]);
    w->shared_b1 = DEVICE_POINTER(r->tensors[MOE_T_SHARED_B1]);
    w->shared_w2 = DEVICE_POINTER(r->tensors[MOE_T_SHARED_W2]);
    w->shared_b2 = DEVICE_POINTER(r->tensors[MOE_T_SHARED_B2]);
    w->shared_gate = DEVICE_POINTER(r->tensors[MOE_T_SHARED_GATE]);
    w->residual_w1 = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_W1]);
    w->residual_b1 = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_B1]);
    w->residual_w2 = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_W2]);
    w->residual_b2 = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_B2]);
    w->residual_coef_w = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_COEF_W]);
    w->residual_coef_b = DEVICE_POINTER(r->tensors[MOE_T_RESIDUAL_COEF_B]);
}

void cuda_run_io(const cuda_run *r, int64_t n_tokens, uint64_t rng_offset, moegen_forward_io *io) {
    memset(io, 0, sizeof *io);
    io->n_tokens = n_tokens;
    io->x = DEVICE_POINTER(r->tensors[MOE_T_X]);
    io->y = DEVICE_POINTER(r->y);
    io->topk_ids = DEVICE_POINTER(r->ids);
    io->topk_weights = DEVICE_POINTER(r->topk_weights);
    io->router_weights = DEVICE_POINTER(r->router_weights);
    io->counts_before = DEVICE_POINTER(r->counts_before);
    io->counts_after = DEVICE_POINTER(r->counts_after);
    io->rng_offset = rng_offset;
    io->stream = NULL;
}

int cuda_run_time(cuda_run *r, moegen_layer *layer, const moegen_forward_io *io, int repeat,
                  double *times_ms) {
    moegen_cu_event start, stop;
    if (check(r, r->cu.cuEventCreate(&start, 0), "cuEventCreate") ||
        check(r, r->cu.cuEventCreate(&stop, 0), "cuEventCreate"))
        return 1;
    int rc = 0;
    moegen_error err;
    for (int i = -1; i < repeat && rc == 0; i++) { /* one warm-up */
        rc = check(r, r->cu.cuEventRecord(start, NULL), "cuEventRecord");
        if (rc == 0 && moegen_layer_forward(layer, io, NULL, &err) != MOEGEN_OK) rc = moegen_cli_error("%s", err.message);
        if (rc == 0) rc = check(r, r->cu.cuEventRecord(stop, NULL), "cuEventRecord");
        if (rc == 0) rc = check(r, r->cu.cuEventSynchronize(stop), "cuEventSynchronize (a kernel failed?)");
        float ms = 0.0f;
        if (rc == 0) rc = check(r, r->cu.cuEventElapsedTime(&ms, start, stop), "cuEventElapsedTime");
        if (rc == 0 && i >= 0) times_ms[i] = ms;
    }
    r->cu.cuEventDestroy(start);
    r->cu.cuEventDestroy(stop);
    return rc;
}

int cuda_run_download(cuda_run *r, const moegen_spec *spec, int64_t n_tokens, void *y, int32_t *ids,
                      float *topk_weights, float *router_weights, int64_t *counts_before,
                      int64_t *counts_after) {
    const size_t S = (size_t)n_tokens, K = (size_t)spec->top_k, E = (size_t)spec->num_experts;
    if (check(r, r->cu.cuCtxSynchronize(), "cuCtxSynchronize")) return 1;
    if (S > 0 && (check(r, r->cu.cuMemcpyDtoH(y, r->y, S * spec->hidden_size * moegen_dtype_size(spec->dtype)), "cuMemcpyDtoH") ||
                  check(r, r->cu.cuMemcpyDtoH(ids, r->ids, S * K * 4), "cuMemcpyDtoH") ||
                  check(r, r->cu.cuMemcpyDtoH(topk_weights, r->topk_weights, S * K * 4), "cuMemcpyDtoH") ||
                  check(r, r->cu.cuMemcpyDtoH(router_weights, r->router_weights, S * K * 4), "cuMemcpyDtoH")))
        return 1;
    return (counts_before && check(r, r->cu.cuMemcpyDtoH(counts_before, r->counts_before, E * 8), "cuMemcpyDtoH")) ||
           (counts_after && check(r, r->cu.cuMemcpyDtoH(counts_after, r->counts_after, E * 8), "cuMemcpyDtoH"));
}

int cuda_run_train_alloc(cuda_run *r, const moegen_spec *spec, const moe_backward_buffers *b, cuda_train_buffers *d, moegen_backward_io *bio,
                         moegen_grads *g) {
    memset(d, 0, sizeof *d);
    const size_t x_bytes = b->n[MOE_T_X] * moegen_dtype_size(spec->dtype);
    if (device_alloc(r, x_bytes, &d->dy) || device_alloc(r, x_bytes, &d->dx) ||
        (x_bytes > 0 && check(r, r->cu.cuMemcpyHtoD(d->dy, b->dy, x_bytes), "cuMemcpyHtoD")))
        return 1;
    bio->dy = DEVICE_POINTER(d->dy);
    bio->dx = DEVICE_POINTER(d->dx);
    for (int i = 0; i < MOE_T_COUNT; i++) {
        float **field = moe_grads_field(g, i);
        if (!field || !*field) continue;
        if (device_alloc(r, b->n[i] * sizeof(float), &d->grads[i])) return 1;
        *field = DEVICE_POINTER(d->grads[i]);
    }
    return 0;
}

int cuda_run_train_download(cuda_run *r, const moegen_spec *spec, const cuda_train_buffers *d, moe_backward_buffers *b) {
    if (cuda_run_sync(r)) return 1;
    const size_t x_bytes = b->n[MOE_T_X] * moegen_dtype_size(spec->dtype);
    if (x_bytes > 0 && check(r, r->cu.cuMemcpyDtoH(b->dx, d->dx, x_bytes), "cuMemcpyDtoH")) return 1;
    for (int i = 0; i < MOE_T_COUNT; i++)
        if (d->grads[i] && check(r, r->cu.cuMemcpyDtoH(moe_backward_grad(b, i), d->grads[i], b->n[i] * sizeof(float)),
                                 "cuMemcpyDtoH"))
            return 1;
    return 0;
}

void cuda_run_train_free(cuda_run *r, cuda_train_buffers *d) {
    if (!r->cu.library) return;
    if (d->dy) r->cu.cuMemFree(d->dy);
    if (d->dx) r->cu.cuMemFree(d->dx);
    for (int i = 0; i < MOE_T_COUNT; i++)
        if (d->grads[i]) r->cu.cuMemFree(d->grads[i]);
    memset(d, 0, sizeof *d);
}

int cuda_run_sync(cuda_run *r) { return check(r, r->cu.cuCtxSynchronize(), "cuCtxSynchronize (a kernel failed?)"); }

void cuda_run_close(cuda_run *r) {
    if (!r->cu.library) return;
    moegen_cu_device_pointer *all[] = {&r->y, &r->ids, &r->topk_weights, &r->router_weights,
                                       &r->counts_before, &r->counts_after};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (*all[i]) r->cu.cuMemFree(*all[i]);
    for (int i = 0; i < MOE_T_COUNT; i++)
        if (r->tensors[i]) r->cu.cuMemFree(r->tensors[i]);
    if (r->context) r->cu.cuDevicePrimaryCtxRelease(r->device);
    moegen_cuda_close(&r->cu);
    memset(r, 0, sizeof *r);
}

double cuda_run_bandwidth(const cuda_run *r) {
    /* Device-to-device copy rate measured on this project's machines
     * (docs/performance.md): H100 ~3.0 TB/s, H200 ~4.3 TB/s. */
    return strstr(r->info.name, "H200") ? 4.3e12 : 3.0e12;
}
