/* train.c — `moegen run --backward` (see train.h). */
#include "train.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "backward_io.h"
#include "cli.h"
#include "npy.h"
#include "verify_backward.h"

/* The reference backward's double FLOPs `moegen run` spends at most before it says it
 * skipped the check (the weight gradients need every token, so it cannot sample). */
#define VERIFY_FLOP_BUDGET 2e10


static moegen_npy_dtype layer_npy_dtype(moegen_dtype dtype) {
    return dtype == MOEGEN_DTYPE_FP32 ? MOEGEN_NPY_F4 : dtype == MOEGEN_DTYPE_FP16 ? MOEGEN_NPY_F2 : MOEGEN_NPY_U2;
}

/* dy from DIR/dy.npy (layer dtype, or fp32 converted), when the file exists. 1: loaded,
 * 0: no file, -1: an error (printed). */
static int load_dy(const char *dir, const moegen_spec *spec, int64_t S, void *dy) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%.4000s/dy.npy", dir);
    struct stat st;
    if (stat(path, &st) != 0) return 0;
    const int64_t shape[2] = {S, spec->hidden_size};
    moegen_npy_dtype allowed[2] = {layer_npy_dtype(spec->dtype), MOEGEN_NPY_F4};
    moegen_npy array;
    moegen_error err;
    if (moegen_npy_read_expect(path, 2, shape, allowed, 2, &array, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        return -1;
    }
    const size_t n = (size_t)S * (size_t)spec->hidden_size;
    if (array.dtype == allowed[0]) {
        memcpy(dy, array.data, n * moegen_dtype_size(spec->dtype));
    } else {
        const float *src = array.data;
        for (size_t i = 0; i < n; i++) {
            if (spec->dtype == MOEGEN_DTYPE_FP16) ((uint16_t *)dy)[i] = moe_float_to_half(src[i]);
            else ((uint16_t *)dy)[i] = moe_float_to_bf16(src[i]);
        }
    }
    moegen_npy_free(&array);
    return 1;
}

/* dy, dx and every gradient as DIR/<name>.npy (gradients fp32, in their weights' shapes). */
static int save_gradients(const char *dir, const moegen_spec *spec, const moe_tensors *ts,
                          const moe_backward_buffers *b) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return moegen_cli_error("%s: %s", dir, strerror(errno));
    moegen_error err;
    char path[PATH_MAX];
    const moe_tensor *x = &ts->t[MOE_T_X];
    const char *stems[2] = {"dy", "dx"};
    const void *data[2] = {b->dy, b->dx};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%.4000s/%s.npy", dir, stems[i]);
        if (moegen_npy_write(path, layer_npy_dtype(spec->dtype), 2, x->shape, data[i], &err) != MOEGEN_OK)
            return moegen_cli_error("%s", err.message);
    }
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const float *g = i == MOE_T_X ? NULL : moe_backward_grad(b, i);
        if (!g) continue;
        snprintf(path, sizeof path, "%.4000s/grad_%s.npy", dir, ts->t[i].name);
        if (moegen_npy_write(path, MOEGEN_NPY_F4, ts->t[i].ndim, ts->t[i].shape, g, &err) != MOEGEN_OK)
            return moegen_cli_error("%s", err.message);
    }
    return 0;
}

int cli_train_step(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts,
                   const cli_train_options *o) {
    const int64_t S = ts->n_tokens;
    moe_backward_buffers b;
    if (moe_backward_alloc(&b, spec, S, o->seed) != 0)
        return moegen_cli_error("run --backward: out of memory for the gradients of %lld tokens", (long long)S);
    int rc = 1;
    double *forward_times = calloc((size_t)o->repeat, sizeof(double));
    double *backward_times = calloc((size_t)o->repeat, sizeof(double));
    const size_t routes = (size_t)S * (size_t)spec->top_k;
    void *y = calloc((size_t)S * (size_t)spec->hidden_size + 1, moegen_dtype_size(spec->dtype));
    int32_t *ids = calloc(routes + 1, sizeof *ids);
    float *topk = calloc(routes + 1, sizeof *topk), *router = calloc(routes + 1, sizeof *router);
    moegen_saved *saved = NULL;
    cuda_train_buffers device;
    memset(&device, 0, sizeof device);
    const char *dy_from = "random (--seed)";
    if (!forward_times || !backward_times || !y || !ids || !topk || !router) {
        moegen_cli_error("run --backward: out of memory");
        goto done;
    }
    if (o->load_dir) {
        const int loaded = load_dy(o->load_dir, spec, S, b.dy);
        if (loaded < 0) goto done;
        if (loaded) dy_from = "dy.npy";
    }
    moegen_forward_io io = {.n_tokens = S, .x = ts->t[MOE_T_X].data, .y = y, .topk_ids = ids,
                            .topk_weights = topk, .router_weights = router, .rng_offset = o->rng_offset};
    moegen_backward_io bio = {.dy = b.dy, .dx = b.dx, .aux_coeff = o->aux_coeff, .z_coeff = o->z_coeff};
    moegen_grads grads = b.grads; /* on a GPU: device buffers, copied back after the steps */
    if (o->gpu) {
        cuda_run_io(o->gpu, S, o->rng_offset, &io);
        if (cuda_run_train_alloc(o->gpu, spec, &b, &device, &bio, &grads)) goto done;
    }
    moegen_error err;
    size_t saved_bytes = 0;
    for (long long i = -1; i < o->repeat; i++) { /* a warm-up, then the timed steps */
        double start = moegen_cli_now_ms();
        if (moegen_layer_forward_train(layer, &io, &saved, NULL, &err) != MOEGEN_OK) {
            moegen_cli_error("%s", err.message);
            goto done;
        }
        if (o->gpu && cuda_run_sync(o->gpu)) goto done; /* the calls return once queued */
        double mid = moegen_cli_now_ms();
        if (moegen_layer_backward(layer, saved, &bio, &grads, &err) != MOEGEN_OK) {
            moegen_cli_error("%s", err.message);
            goto done;
        }
        if (o->gpu && cuda_run_sync(o->gpu)) goto done;
        double end = moegen_cli_now_ms();
        saved_bytes = moegen_saved_bytes(saved);
        if (i >= 0) {
            forward_times[i] = mid - start;
            backward_times[i] = end - mid;
        }
        if (i + 1 < o->repeat) {
            moegen_saved_free(saved);
            saved = NULL;
        }
    }
    if (o->gpu && (cuda_run_train_download(o->gpu, spec, &device, &b) ||
                   cuda_run_download(o->gpu, spec, S, y, ids, topk, router, NULL, NULL)))
        goto done;
    const double fwd = moegen_cli_median(forward_times, o->repeat), bwd = moegen_cli_median(backward_times, o->repeat);
    printf("  training step (--backward; dy %s, aux_coeff %g, z_coeff %g):\n", dy_from, o->aux_coeff, o->z_coeff);
    printf("    forward_train median %.3f ms, backward median %.3f ms over %lld runs: backward = %.2fx the forward "
           "(%.3f ms); saved state %.2f MiB\n",
           fwd, bwd, o->repeat, o->forward_ms > 0 ? bwd / o->forward_ms : 0.0, o->forward_ms,
           (double)saved_bytes / (1 << 20));

    int ok = 1;
    if (!o->verify) {
        printf("    verify: skipped (--no-verify)\n");
    } else {
        const double H = (double)spec->hidden_size, F1 = (double)moegen_spec_ffn_rows(spec);
        double per_token = spec->top_k * 6.0 * H * (F1 + (double)spec->moe_intermediate_size);
        if (spec->shared.count > 0) per_token += spec->shared.count * 9.0 * H * (double)spec->shared.intermediate_size;
        if (spec->use_residual) per_token *= 2.0;
        if (per_token * (double)S > VERIFY_FLOP_BUDGET) {
            printf("    verify: skipped: the reference backward needs every token (%.3g double FLOPs here, over the "
                   "%.0e budget); run fewer --tokens to verify\n",
                   per_token * (double)S, VERIFY_FLOP_BUDGET);
        } else {
            moegen_kernel_weights kw;
            moe_tensors_weights(ts, &kw);
            moe_backward_case c = {.n_tokens = S, .x = ts->t[MOE_T_X].data, .w = &kw, .rng_offset = o->rng_offset,
                                   .ids = ids, .router_weights = router, .topk_weights = topk, .dy = b.dy,
                                   .aux_coeff = o->aux_coeff, .z_coeff = o->z_coeff};
            moe_backward_report report;
            double start = moegen_cli_now_ms();
            if (moe_verify_backward(spec, &c, b.dx, &b.grads, &report) != 0) report.ok = 0;
            printf("    verify gradients against the double-precision reference backward (%.0f ms): %s%s\n",
                   moegen_cli_now_ms() - start, report.ok ? "" : "FAILED: ", report.message);
            ok = report.ok;
        }
    }
    if (o->save_dir && save_gradients(o->save_dir, spec, ts, &b)) goto done;
    rc = ok ? 0 : 1;
done:
    moegen_saved_free(saved);
    if (o->gpu) cuda_run_train_free(o->gpu, &device);
    free(forward_times);
    free(backward_times);
    free(y);
    free(ids);
    free(topk);
    free(router);
    moe_backward_free(&b);
    return rc;
}
