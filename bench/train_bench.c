/* train_bench.c — the C worker of bench/train.sh: moegen's inference forward, training forward
 * (moegen_layer_forward_train) and backward (moegen_layer_backward: dx and every weight gradient)
 * on one layer, driven line by line by bench/train_bench.py.
 *
 *   moegen_train_bench SPEC --dtype fp32|bf16|spec --max-tokens N [--mode train|eval|spec] [--seed S]
 *                      [--activations recompute|keep] [--aux-coeff A] [--z-coeff Z] [--max-gib G]
 *
 * At start it loads SPEC, overrides its dtype (`spec` keeps the spec's own) and its mode (default
 * train: what a training step runs, e.g. the router's input jitter), opens its layers with
 * opts.activations as --activations says (recompute, the default: the backward runs GEMM1 again;
 * keep: the training forward keeps the pre-activations), and places in one
 * memfd every tensor of the layer (tests/reference/tensors.h, random, seeded), an fp32 gradient
 * buffer for every weight (moegen_grads, in the weights' layouts), dy (seeded, in [-1, 1)), dx, y
 * and the routing. The driver maps that memfd (the path in the "ready" line), so the PyTorch
 * anchor runs on the very same weights, x and dy, dispatches moegen's routing and checks its dx
 * and gradients against moegen's. Then, on stdin:
 *
 *   prepare S T   open (or reuse) the layer with T threads; on the first S tokens run the
 *                 inference forward once, then forward_train (y, topk_ids, topk_weights into the
 *                 memfd) and the backward (dx and every gradient into the memfd)
 *   time N [split]  N repetitions of: forward, forward_train, backward (accumulate = 0),
 *                 saved_free; with `split` also, after each backward, moegen_layer_backward_weights
 *                 with accumulate = 0 and again with accumulate = 1 (the weights phase alone, with
 *                 and without clearing the gradient buffers). The times in ms.
 *   quit
 *
 * Every reply is one JSON line on stdout ("event": ready | skip | prepared | times | error).
 * Only the calls themselves are timed.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "backward_io.h"
#include "capacity.h"
#include "forward_io.h"
#include "memory_limit.h"
#include "moegen.h"
#include "tensors.h"

#define MAX_THREAD_LAYERS 8

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void reply_error(const char *event, const char *message) {
    printf("{\"event\": \"%s\", \"message\": ", event);
    json_string(stdout, message);
    printf("}\n");
    fflush(stdout);
}

typedef struct worker {
    moegen_spec spec;
    char *canonical;
    char display[512];
    int64_t max_S;
    double aux_coeff, z_coeff;
    int activations; /* opts.activations */
    moe_tensors ts; /* data pointers into the memfd */
    unsigned char *shm;
    size_t shm_bytes;
    int shm_fd;
    float *grad[MOE_T_COUNT]; /* fp32 gradient of tensor i, in the memfd (NULL: none) */
    void *dy, *dx, *y;        /* [max_S][H] layer dtype, in the memfd */
    int32_t *ids;             /* [max_S][k] */
    float *topk_weights;      /* [max_S][k] */
    int64_t *counts_after;
    moegen_weights weights;
    moegen_grads grads;
    struct {
        int n_threads;
        moegen_layer *layer;
    } layers[MAX_THREAD_LAYERS];
    int n_layers;
    moegen_layer *layer;
    int64_t S;
} worker;

/* What the PyTorch anchor cannot express: the spec is skipped with the reason. */
static const char *unsupported(const moegen_spec *s) {
    if (s->ep_size > 1) return "ep_size > 1 (the training backward runs with ep_size 1 only)";
    if (s->expert_bias) return "expert_bias (the PyTorch anchor has no expert biases)";
    if (s->use_residual) return "use_residual (the PyTorch anchor has no residual MLP)";
    if (s->weight_on_input) return "weight_on_input (the PyTorch anchor weights the expert output)";
    if (s->router.router_bias) return "router_bias (the PyTorch anchor's router has no bias)";
    if (s->router.noise != MOEGEN_NOISE_NONE && s->mode == MOEGEN_MODE_TRAIN)
        return "router noise (the PyTorch anchor has no Gumbel noise)";
    return NULL;
}

/* Elements of every weight tensor (everything but x), and of those always stored in fp32, from
 * the tensors' byte counts in fp32 and in bf16 (nothing is allocated: deepseek-v3 would not fit). */
static double weight_elems(const moegen_spec *s, double *fp32_elems) {
    moegen_spec as32 = *s, as16 = *s;
    as32.dtype = MOEGEN_DTYPE_FP32;
    as16.dtype = MOEGEN_DTYPE_BF16;
    const double b32 = (double)moe_tensors_bytes(&as32, 0), b16 = (double)moe_tensors_bytes(&as16, 0);
    const double n = b32 / 4, n_dtype = (b32 - b16) / 2;
    *fp32_elems = n - n_dtype;
    return n;
}

/* Bytes the benchmark holds at once for max_S tokens, both processes: the memfd (tensors, fp32
 * gradients, dy / dx / y, routing), one saved forward after its backward and the forward's
 * workspace (docs/training.md's table), and PyTorch's side: gradients in the parameters' dtype
 * and its autograd activations. */
static double bytes_needed(const moegen_spec *s, int64_t S) {
    const double H = (double)s->hidden_size, F = (double)s->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(s), k = s->top_k, E = s->num_experts;
    const double b = (double)moegen_dtype_size(s->dtype);
    const double Ns = s->shared.count, Fs = (double)s->shared.intermediate_size;
    const double F1s = moegen_activation_is_gated(s->activation) ? 2 * Fs : Fs;
    double n32 = 0;
    const double n = weight_elems(s, &n32);
    const double R = (double)moegen_spec_max_rows(s, S);
    double need = (double)moe_tensors_bytes(s, S) + n * 4 + 3 * S * H * b + S * k * 8;
    const double fwd_state = S * H * b + S * H * 4 + R * (H * 4 + F * b) + S * k * 24 + S * E * 4 +
                             Ns * (S * H * 4 + S * Fs * b);
    const double bwd_state = R * (2 * H * 4 + F1 * 4 + F * b) + Ns * S * (2 * H * 4 + F1s * 4 + Fs * b) +
                             S * (k + E + 3) * 4;
    need += 2 * fwd_state + bwd_state;
    need += (n - n32) * b + n32 * 4;                                   /* torch's gradients */
    need += 4.0 * (R * (H * 3 + F1 * 3) + Ns * S * (H * 3 + F1s * 3)) * b + S * E * 16.0 + S * H * 16.0;
    return need;
}

/* Place every tensor, gradient and output in one memfd, then fill the tensors and dy. */
static int map_tensors(worker *w, uint64_t seed, char *why, size_t why_size) {
    const moegen_spec *s = &w->spec;
    const size_t align = 4096, elem = moegen_dtype_size(s->dtype);
    if (moe_tensors_alloc(s, w->max_S, &w->ts) != 0) {
        snprintf(why, why_size, "out of memory describing the tensors");
        return -1;
    }
    size_t off_t_[MOE_T_COUNT], off_g[MOE_T_COUNT], total = 0;
#define PLACE(var, bytes)                                 \
    do {                                                  \
        var = total;                                      \
        total += ((bytes) + align - 1) / align * align;   \
    } while (0)
    for (int i = 0; i < MOE_T_COUNT; i++) PLACE(off_t_[i], w->ts.t[i].n_elems * moe_tensor_elem_bytes(&w->ts, i));
    for (int i = 0; i < MOE_T_COUNT; i++) {
        off_g[i] = 0;
        if (w->ts.t[i].n_elems && moe_grads_field(&w->grads, i)) PLACE(off_g[i], w->ts.t[i].n_elems * sizeof(float));
    }
    const size_t act = (size_t)w->max_S * (size_t)s->hidden_size * elem;
    const size_t routes = (size_t)w->max_S * (size_t)s->top_k;
    size_t off_dy, off_dx, off_y, off_ids, off_tw;
    PLACE(off_dy, act);
    PLACE(off_dx, act);
    PLACE(off_y, act);
    PLACE(off_ids, routes * 4);
    PLACE(off_tw, routes * 4);
#undef PLACE
    w->shm_fd = memfd_create("moegen-train-bench", 0);
    if (w->shm_fd < 0 || ftruncate(w->shm_fd, (off_t)total) != 0) {
        snprintf(why, why_size, "memfd of %zu bytes: cannot create", total);
        return -1;
    }
    w->shm = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, w->shm_fd, 0);
    if (w->shm == MAP_FAILED) {
        w->shm = NULL;
        snprintf(why, why_size, "memfd of %zu bytes: cannot map", total);
        return -1;
    }
    w->shm_bytes = total;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        free(w->ts.t[i].data); /* calloc'd and never touched: given back at once */
        w->ts.t[i].data = w->ts.t[i].n_elems ? w->shm + off_t_[i] : NULL;
        float **field = moe_grads_field(&w->grads, i);
        if (w->ts.t[i].n_elems && field) *field = w->grad[i] = (float *)(w->shm + off_g[i]);
    }
    w->dy = w->shm + off_dy;
    w->dx = w->shm + off_dx;
    w->y = w->shm + off_y;
    w->ids = (int32_t *)(w->shm + off_ids);
    w->topk_weights = (float *)(w->shm + off_tw);
    moe_tensors_fill(&w->ts, seed);
    moe_tensors_bind_weights(s, &w->ts, 0, &w->weights);
    /* dy: k / 32 with k in [-32, 32), exact in every dtype */
    uint64_t state = seed ^ 0x7472u;
    const size_t n = (size_t)w->max_S * (size_t)s->hidden_size;
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const float v = (float)((int)(z >> 58) - 32) / 32.0f;
        if (s->dtype == MOEGEN_DTYPE_FP32) ((float *)w->dy)[i] = v;
        else if (s->dtype == MOEGEN_DTYPE_FP16) ((uint16_t *)w->dy)[i] = moe_float_to_half(v);
        else ((uint16_t *)w->dy)[i] = moe_float_to_bf16(v);
    }
    return 0;
}

static void print_region(const char *name, const worker *w, const void *p, const char *dtype, long long d0,
                         long long d1, long long d2, int ndim) {
    printf("\"%s\": {\"offset\": %zu, \"dtype\": \"%s\", \"shape\": [%lld", name,
           (size_t)((const unsigned char *)p - w->shm), dtype, d0);
    if (ndim > 1) printf(", %lld", d1);
    if (ndim > 2) printf(", %lld", d2);
    printf("]}");
}

static void print_ready(const worker *w, double fill_ms, double need) {
    const moegen_spec *s = &w->spec;
    const char *dt = moegen_dtype_name(s->dtype);
    printf("{\"event\": \"ready\", \"spec\": ");
    json_string(stdout, s->name);
    printf(", \"dtype\": \"%s\", \"shm\": \"/proc/%d/fd/%d\", \"shm_bytes\": %zu, \"tensors\": {", dt, (int)getpid(),
           w->shm_fd, w->shm_bytes);
    int first = 1;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const moe_tensor *t = &w->ts.t[i];
        if (!t->data) continue;
        if (!first) printf(", ");
        print_region(t->name, w, t->data, t->fp32 ? "fp32" : dt, t->shape[0], t->shape[1], t->shape[2], t->ndim);
        first = 0;
    }
    printf("}, \"grads\": {");
    first = 1;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const moe_tensor *t = &w->ts.t[i];
        if (!w->grad[i]) continue;
        if (!first) printf(", ");
        print_region(t->name, w, w->grad[i], "fp32", t->shape[0], t->shape[1], t->shape[2], t->ndim);
        first = 0;
    }
    const long long S = (long long)w->max_S, k = s->top_k, H = (long long)s->hidden_size;
    printf("}, ");
    print_region("dy", w, w->dy, dt, S, H, 0, 2);
    printf(", ");
    print_region("dx", w, w->dx, dt, S, H, 0, 2);
    printf(", ");
    print_region("y", w, w->y, dt, S, H, 0, 2);
    printf(", ");
    print_region("topk_ids", w, w->ids, "int32", S, k, 0, 2);
    printf(", ");
    print_region("topk_weights", w, w->topk_weights, "fp32", S, k, 0, 2);
    printf(", \"E\": %d, \"k\": %d, \"H\": %lld, \"F\": %lld, \"F1\": %lld, \"activation\": \"%s\"", s->num_experts,
           s->top_k, H, (long long)s->moe_intermediate_size, (long long)moegen_spec_ffn_rows(s),
           moegen_activation_name(s->activation));
    printf(", \"n_shared\": %d, \"Fs\": %lld, \"shared_gate\": %d", s->shared.count,
           (long long)s->shared.intermediate_size, s->shared.count > 0 && s->shared.gate);
    printf(", \"mode\": \"%s\", \"semantics\": \"%s\", \"score_function\": \"%s\", \"order\": \"%s\"",
           moegen_mode_name(s->mode), moegen_semantics_name(s->semantics), moegen_score_fn_name(s->router.score_function),
           moegen_order_name(s->router.order));
    printf(", \"norm_topk_prob\": %d, \"routed_scaling_factor\": %.17g, \"n_group\": %d, \"score_bias\": %d",
           s->router.norm_topk_prob, s->router.routed_scaling_factor, s->router.n_group, s->router.score_bias);
    printf(", \"input_jitter\": %.17g, \"seed\": \"%llu\", \"aux_loss\": \"%s\"", s->router.input_jitter,
           (unsigned long long)s->router.seed, moegen_aux_loss_name(s->router.aux_loss));
    printf(", \"capacity\": \"%s\", \"renormalize\": %d, \"pad_to_capacity\": %d",
           moegen_capacity_mode_name(s->capacity.mode), s->capacity.renormalize, s->capacity.pad_to_capacity);
    printf(", \"activations\": \"%s\", \"aux_coeff\": %.17g, \"z_coeff\": %.17g, \"need_bytes\": %.0f"
           ", \"fill_ms\": %.1f}\n", w->activations == MOEGEN_ACTIVATIONS_KEEP ? "keep" : "recompute", w->aux_coeff,
           w->z_coeff, need, fill_ms);
    fflush(stdout);
}

static moegen_layer *layer_for(worker *w, int n_threads, char *why, size_t why_size) {
    for (int i = 0; i < w->n_layers; i++)
        if (w->layers[i].n_threads == n_threads) return w->layers[i].layer;
    if (w->n_layers == MAX_THREAD_LAYERS) {
        snprintf(why, why_size, "more than %d thread counts", MAX_THREAD_LAYERS);
        return NULL;
    }
    moegen_open_options opts;
    moegen_open_options_init(&opts);
    opts.device = MOEGEN_DEVICE_CPU;
    opts.n_threads = n_threads;
    opts.activations = w->activations;
    moegen_error err;
    moegen_layer *layer = NULL;
    if (moegen_layer_open_string(w->canonical, strlen(w->canonical), w->display, &opts, &layer, &err) != MOEGEN_OK ||
        moegen_layer_bind(layer, &w->weights, &err) != MOEGEN_OK) {
        snprintf(why, why_size, "%.400s", err.message);
        moegen_layer_close(layer);
        return NULL;
    }
    w->layers[w->n_layers].n_threads = n_threads;
    w->layers[w->n_layers++].layer = layer;
    return layer;
}

/* One training step's calls; each time in ms into t[] (forward, forward_train, backward,
 * weights phase accumulate 0, weights phase accumulate 1: the last two only with split).
 * *saved_bytes gets the saved state's size after the backward. 0, or -1 (error replied). */
static int step(worker *w, int with_routing, int split, double t[5], size_t *saved_fwd, size_t *saved_bytes,
                moegen_forward_stats *stats) {
    moegen_error err;
    moegen_forward_io io = {.n_tokens = w->S, .x = w->ts.t[MOE_T_X].data, .y = w->y};
    double t0 = now_ms();
    if (moegen_layer_forward(w->layer, &io, NULL, &err) != MOEGEN_OK) goto fail;
    t[0] = now_ms() - t0;
    if (with_routing) {
        io.topk_ids = w->ids;
        io.topk_weights = w->topk_weights;
        io.counts_after = w->counts_after;
    }
    moegen_saved *saved = NULL;
    t0 = now_ms();
    if (moegen_layer_forward_train(w->layer, &io, &saved, stats, &err) != MOEGEN_OK) goto fail;
    t[1] = now_ms() - t0;
    if (saved_fwd) *saved_fwd = moegen_saved_bytes(saved);
    moegen_backward_io bio = {.dy = w->dy, .dx = w->dx, .aux_coeff = w->aux_coeff, .z_coeff = w->z_coeff};
    w->grads.accumulate = 0;
    t0 = now_ms();
    if (moegen_layer_backward(w->layer, saved, &bio, &w->grads, &err) != MOEGEN_OK) goto fail_saved;
    t[2] = now_ms() - t0;
    if (saved_bytes) *saved_bytes = moegen_saved_bytes(saved);
    if (split) {
        for (int acc = 0; acc < 2; acc++) {
            w->grads.accumulate = acc;
            t0 = now_ms();
            if (moegen_layer_backward_weights(w->layer, saved, &w->grads, &err) != MOEGEN_OK) goto fail_saved;
            t[3 + acc] = now_ms() - t0;
        }
        w->grads.accumulate = 0;
    }
    moegen_saved_free(saved);
    return 0;
fail_saved:
    moegen_saved_free(saved);
fail:
    reply_error("error", err.message);
    return -1;
}

static void cmd_prepare(worker *w, long long S, int T) {
    char why[512];
    if (S < 1 || S > w->max_S || T < 1) {
        snprintf(why, sizeof why, "prepare: tokens must be 1..%lld and threads >= 1", (long long)w->max_S);
        reply_error("error", why);
        return;
    }
    if (!(w->layer = layer_for(w, T, why, sizeof why))) {
        reply_error("error", why);
        return;
    }
    moegen_layer_desc desc;
    moegen_layer_describe(w->layer, &desc);
    w->S = S;
    double t[5] = {0};
    size_t saved_fwd = 0, saved_bytes = 0;
    moegen_forward_stats stats;
    if (step(w, 1, 0, t, &saved_fwd, &saved_bytes, &stats) != 0) return;
    const moegen_spec *s = &w->spec;
    const double H = (double)s->hidden_size, F = (double)s->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(s);
    const double Fs = (double)s->shared.intermediate_size;
    const double F1s = moegen_activation_is_gated(s->activation) ? 2 * Fs : Fs;
    long long kept = 0, touched = 0;
    for (int e = 0; e < s->num_experts; e++) {
        kept += w->counts_after[e];
        touched += w->counts_after[e] > 0;
    }
    /* the forward's expert GEMM FLOPs: routed rows kept and the shared experts on every token */
    const double flops = kept * (2 * H * F1 + 2 * F * H) + s->shared.count * (double)S * (2 * H * F1s + 2 * Fs * H);
    printf("{\"event\": \"prepared\", \"tokens\": %lld, \"threads\": %d, \"moegen_threads\": %d, \"variant\": ", S, T,
           desc.n_threads);
    json_string(stdout, desc.variant);
    printf(", \"kernel_path\": ");
    json_string(stdout, desc.kernel_path);
    printf(", \"cache_hit\": %d, \"compile_ms\": %.1f, \"kept_routes\": %lld, \"touched_experts\": %lld",
           desc.cache_hit, desc.compile_ms, kept, touched);
    printf(", \"n_dropped\": %lld, \"capacity_used\": %lld, \"aux_loss\": %.9g, \"z_loss\": %.9g",
           (long long)stats.n_dropped, (long long)stats.capacity, stats.aux_loss, stats.z_loss);
    printf(", \"expert_flops\": %.6g, \"saved_bytes_forward\": %zu, \"saved_bytes\": %zu", flops, saved_fwd,
           saved_bytes);
    printf(", \"first_ms\": {\"forward\": %.4f, \"forward_train\": %.4f, \"backward\": %.4f}}\n", t[0], t[1], t[2]);
    fflush(stdout);
}

static void cmd_time(worker *w, int n, int split) {
    if (!w->layer) {
        reply_error("error", "time before prepare");
        return;
    }
    double *ms = calloc((size_t)n * 5, sizeof *ms);
    if (!ms) {
        reply_error("error", "out of memory");
        return;
    }
    size_t saved_bytes = 0;
    for (int i = 0; i < n; i++) {
        if (step(w, 0, split, ms + (size_t)i * 5, NULL, &saved_bytes, NULL) != 0) {
            free(ms);
            return;
        }
    }
    static const char *const names[5] = {"forward", "forward_train", "backward", "weights_acc0", "weights_acc1"};
    printf("{\"event\": \"times\", \"saved_bytes\": %zu, \"ms\": {", saved_bytes);
    for (int j = 0; j < (split ? 5 : 3); j++) {
        printf("%s\"%s\": [", j ? ", " : "", names[j]);
        for (int i = 0; i < n; i++) printf("%s%.4f", i ? ", " : "", ms[(size_t)i * 5 + j]);
        printf("]");
    }
    printf("}}\n");
    fflush(stdout);
    free(ms);
}

static const char usage[] =
    "usage: moegen_train_bench SPEC --dtype fp32|bf16|spec --max-tokens N [--mode train|eval|spec]\n"
    "                          [--seed S] [--activations recompute|keep] [--aux-coeff A] [--z-coeff Z]\n"
    "                          [--max-gib G]\n"
    "  (driven by bench/train_bench.py; see bench/train.sh)\n";

int main(int argc, char **argv) {
    const char *spec_path = NULL, *dtype = NULL, *mode = "train", *activations = "recompute";
    long long max_S = 0, seed = 1;
    double aux_coeff = 0.01, z_coeff = 0.0, max_gib = 18.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dtype") && i + 1 < argc) dtype = argv[++i];
        else if (!strcmp(argv[i], "--max-tokens") && i + 1 < argc) max_S = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--mode") && i + 1 < argc) mode = argv[++i];
        else if (!strcmp(argv[i], "--activations") && i + 1 < argc) activations = argv[++i];
        else if (!strcmp(argv[i], "--aux-coeff") && i + 1 < argc) aux_coeff = atof(argv[++i]);
        else if (!strcmp(argv[i], "--z-coeff") && i + 1 < argc) z_coeff = atof(argv[++i]);
        else if (!strcmp(argv[i], "--max-gib") && i + 1 < argc) max_gib = atof(argv[++i]);
        else if (argv[i][0] != '-' && !spec_path) spec_path = argv[i];
        else {
            fputs(usage, stderr);
            return 2;
        }
    }
    if (!spec_path || !dtype || max_S < 1 ||
        (strcmp(dtype, "fp32") && strcmp(dtype, "bf16") && strcmp(dtype, "spec")) ||
        (strcmp(mode, "train") && strcmp(mode, "eval") && strcmp(mode, "spec")) ||
        (strcmp(activations, "recompute") && strcmp(activations, "keep"))) {
        fputs(usage, stderr);
        return 2;
    }
    static worker w;
    w.max_S = max_S;
    w.shm_fd = -1;
    w.aux_coeff = aux_coeff;
    w.z_coeff = z_coeff;
    w.activations = strcmp(activations, "keep") ? MOEGEN_ACTIVATIONS_RECOMPUTE : MOEGEN_ACTIVATIONS_KEEP;
    moegen_error err;
    if (moegen_spec_load_file(spec_path, &w.spec, &err) != MOEGEN_OK) {
        reply_error("error", err.message);
        return 1;
    }
    if (!strcmp(dtype, "fp32")) w.spec.dtype = MOEGEN_DTYPE_FP32;
    else if (!strcmp(dtype, "bf16")) w.spec.dtype = MOEGEN_DTYPE_BF16;
    if (!strcmp(mode, "train")) w.spec.mode = MOEGEN_MODE_TRAIN;
    else if (!strcmp(mode, "eval")) w.spec.mode = MOEGEN_MODE_EVAL;
    if (w.spec.dtype == MOEGEN_DTYPE_FP16) {
        reply_error("skip", "fp16 (the benchmark runs fp32 and bf16 layers)");
        return 0;
    }
    snprintf(w.display, sizeof w.display, "%s (dtype %s)", spec_path, moegen_dtype_name(w.spec.dtype));
    const char *why_not = unsupported(&w.spec);
    if (why_not) {
        reply_error("skip", why_not);
        return 0;
    }
    /* fits? weights + fp32 gradients + saved state + both processes' working memory, against
     * --max-gib and 85 % of what is available */
    const double need = bytes_needed(&w.spec, max_S);
    double limit = max_gib * 1073741824.0;
    const char *limited_by = "--max-gib";
    moegen_memory_budget budget;
    if (moegen_memory_budget_read(&budget, NULL) == MOEGEN_OK && budget.available_bytes != MOEGEN_MEMORY_UNLIMITED &&
        0.85 * (double)budget.available_bytes < limit) {
        limit = 0.85 * (double)budget.available_bytes;
        limited_by = budget.limited_by;
    }
    if (need > limit) {
        char need_text[MOEGEN_BYTES_TEXT_BYTES], have_text[MOEGEN_BYTES_TEXT_BYTES], why[512];
        moegen_format_bytes((uint64_t)need, need_text, sizeof need_text);
        moegen_format_bytes((uint64_t)limit, have_text, sizeof have_text);
        snprintf(why, sizeof why,
                 "needs about %s (weights, fp32 gradients, saved state, PyTorch's gradients) for %lld tokens in %s; "
                 "the limit is %s (%s)",
                 need_text, max_S, moegen_dtype_name(w.spec.dtype), have_text, limited_by);
        reply_error("skip", why);
        return 0;
    }
    if (!(w.canonical = moegen_spec_canonical(&w.spec)) ||
        !(w.counts_after = calloc((size_t)w.spec.num_experts, sizeof *w.counts_after))) {
        reply_error("error", "out of memory");
        return 1;
    }
    char why[512];
    const double t0 = now_ms();
    if (map_tensors(&w, (uint64_t)seed, why, sizeof why) != 0) {
        reply_error("error", why);
        return 1;
    }
    print_ready(&w, now_ms() - t0, need);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "", opt[32] = "";
        long long a = 0;
        int b = 0;
        if (sscanf(line, "%31s", cmd) != 1) continue;
        if (!strcmp(cmd, "quit")) break;
        if (!strcmp(cmd, "prepare") && sscanf(line, "%*s %lld %d", &a, &b) == 2) cmd_prepare(&w, a, b);
        else if (!strcmp(cmd, "time") && sscanf(line, "%*s %d %31s", &b, opt) >= 1 && b > 0)
            cmd_time(&w, b, !strcmp(opt, "split"));
        else reply_error("error", "commands: prepare S T | time N [split] | quit");
    }
    for (int i = 0; i < w.n_layers; i++) moegen_layer_close(w.layers[i].layer);
    for (int i = 0; i < MOE_T_COUNT; i++) w.ts.t[i].data = NULL; /* in the memfd */
    moe_tensors_free(&w.ts);
    if (w.shm) munmap(w.shm, w.shm_bytes);
    if (w.shm_fd >= 0) close(w.shm_fd);
    free(w.canonical);
    free(w.counts_after);
    moegen_spec_free(&w.spec);
    return 0;
}
