/* cpu_bench.c — the C worker of bench/cpu.sh: moegen's CPU forward and two anchors (the per-expert
 * OpenBLAS loop, ggml's MUL_MAT_ID graph) on one layer, driven line by line by bench/cpu_bench.py.
 *
 *   moegen_cpu_bench SPEC --dtype fp32|bf16 --max-tokens N [--seed S]
 *
 * At start it loads SPEC, overrides its dtype (the spec's canonical form with `dtype` replaced is
 * what moegen opens), and places every tensor of the layer (tests/reference/tensors.h, random,
 * seeded) plus moegen's outputs in one memfd. The driver maps that memfd too (the path in the
 * "ready" line), so PyTorch runs on the very same weights without a copy. Then, on stdin:
 *
 *   prepare S T   open (or reuse) the moegen layer with T threads, run it on the first S tokens
 *                 (y, topk_ids and topk_weights into the memfd), build the anchors for S and T,
 *                 run each and check its y against moegen's (relative L2 error); the OpenBLAS
 *                 loop's two schedules are both tried on T > 1 threads, the faster one kept
 *   time IMPL N   N timed calls of IMPL (moegen, openblas or ggml); the times in ms
 *   check         the relative error of each anchor's latest y against moegen's latest y
 *   quit
 *
 * Every reply is one JSON line on stdout ("event": ready | skip | prepared | times | error).
 * Only the call itself is timed: moegen_layer_forward, blas_loop_run, ggml_graph_compute.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "capacity.h"
#include "cpu_bench.h"
#include "forward_io.h"
#include "memory_limit.h"
#include "moegen.h"
#include "tensors.h"

#define MAX_THREAD_LAYERS 8

/* ---- small helpers ------------------------------------------------------------------------------ */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* A JSON string literal of s. */
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

float bench_act(moegen_activation act, float g, float up) {
    switch (act) {
    case MOEGEN_ACT_RELU: return g < 0.0f ? 0.0f : g;
    case MOEGEN_ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.70710678f));
    case MOEGEN_ACT_GELU_TANH: return 0.5f * g * (1.0f + tanhf(0.79788456f * (g + 0.044715f * g * g * g)));
    case MOEGEN_ACT_SILU: return g / (1.0f + expf(-g));
    case MOEGEN_ACT_SWIGLU: return g / (1.0f + expf(-g)) * up;
    case MOEGEN_ACT_GEGLU: return 0.5f * g * (1.0f + erff(g * 0.70710678f)) * up;
    }
    return g;
}

/* ||a - ref|| / ||ref|| over n values (fp32, or bf16 bits when *_bf16). NaN when either has one. */
static double rel_err(const void *a, int a_bf16, const void *ref, int ref_bf16, size_t n) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double va = a_bf16 ? bench_bf16_to_float(((const uint16_t *)a)[i]) : ((const float *)a)[i];
        const double vr = ref_bf16 ? bench_bf16_to_float(((const uint16_t *)ref)[i]) : ((const float *)ref)[i];
        diff += (va - vr) * (va - vr);
        norm += vr * vr;
    }
    return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

/* ---- the worker's state ------------------------------------------------------------------------- */

typedef struct worker {
    moegen_spec spec;
    char *canonical;          /* the spec with the dtype asked for */
    char display[512];
    int64_t max_S;
    const char *variant;      /* kernel variant overrides for moegen (--variant), or NULL */
    moe_tensors ts;           /* data pointers into the memfd */
    unsigned char *shm;
    size_t shm_bytes;
    int shm_fd;
    int32_t *ids;             /* [max_S][k] moegen's outputs, in the memfd */
    float *topk_weights;
    void *y_moegen;           /* [max_S][H] layer dtype, in the memfd */
    void *y_anchor;           /* [max_S][H] layer dtype, private */
    int64_t *counts_after;
    moegen_weights weights;
    struct {
        int n_threads;
        moegen_layer *layer;
    } layers[MAX_THREAD_LAYERS];
    int n_layers;
    moegen_layer *layer;      /* of the current shape */
    bench_moe m;              /* the current shape */
    blas_loop *blas;
    int blas_schedule;        /* the faster on the current shape */
    const char *blas_mode;
    char blas_why[256];
    ggml_moe *ggml;
    char ggml_why[256];
    unsigned char *evict;     /* --evict-mb: written before every timed call (evict_caches) */
    size_t evict_bytes;
} worker;

/* What the anchors cannot express: the spec is skipped with the reason. */
static const char *unsupported(const moegen_spec *s) {
    if (s->ep_size > 1) return "ep_size > 1 (expert parallelism has its own bench: moegen bench --ep)";
    if (s->expert_bias) return "expert_bias (the anchors have no expert biases)";
    if (s->use_residual) return "use_residual (the anchors have no residual MLP)";
    if (s->weight_on_input) return "weight_on_input (the anchors weight the expert output)";
    if (s->router.router_bias) return "router_bias (the anchors' router has no bias)";
    return NULL;
}

/* Bytes the worker will hold at once for max_S tokens: tensors and outputs in the memfd, the
 * OpenBLAS loop's buffers and fp32 weight copies, ggml's intermediates and two moegen
 * workspaces (the same estimate as `moegen run`). */
static double bytes_needed(const moegen_spec *s, int64_t S, int fp32_copies) {
    const double H = (double)s->hidden_size, F = (double)s->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(s), k = s->top_k, E = s->num_experts;
    const double elem = (double)moegen_dtype_size(s->dtype);
    const double Ns = s->shared.count, Fs = (double)s->shared.intermediate_size;
    const double F1s = moegen_activation_is_gated(s->activation) ? 2 * Fs : Fs;
    double need = (double)moe_tensors_bytes(s, S) + S * k * 8.0 + S * H * elem * 2;
    need += S * (H * 4 * 4 + (F1 > F1s ? F1 : F1s) * 4 + (F > Fs ? F : Fs) * 4 + E * 4);
    if (fp32_copies) need += (E * (F1 * H + H * F) + Ns * (F1s * H + H * Fs)) * 4;
    need += 4.0 * S * k * (F1 + F + 2 * H) + 4.0 * S * (H * 2 + F1s);
    const double rows = (double)moegen_spec_max_rows(s, S);
    need += 2 * (rows * (H * 4.0 + F1 * 2.0 + 8.0) + S * H * 8.0);
    return need;
}

/* Place every tensor and moegen's outputs in one memfd, then fill the tensors. */
static int map_tensors(worker *w, uint64_t seed, char *why, size_t why_size) {
    const moegen_spec *s = &w->spec;
    const size_t align = 4096, elem = moegen_dtype_size(s->dtype);
    if (moe_tensors_alloc(s, w->max_S, &w->ts) != 0) {
        snprintf(why, why_size, "out of memory describing the tensors");
        return -1;
    }
    size_t offsets[MOE_T_COUNT + 3], total = 0;
    for (int i = 0; i < MOE_T_COUNT; i++) {
        offsets[i] = total;
        total += (w->ts.t[i].n_elems * moe_tensor_elem_bytes(&w->ts, i) + align - 1) / align * align;
    }
    const size_t routes = (size_t)w->max_S * (size_t)s->top_k;
    const size_t outputs[3] = {routes * 4, routes * 4, (size_t)w->max_S * (size_t)s->hidden_size * elem};
    for (int i = 0; i < 3; i++) {
        offsets[MOE_T_COUNT + i] = total;
        total += (outputs[i] + align - 1) / align * align;
    }
    w->shm_fd = memfd_create("moegen-cpu-bench", 0);
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
        w->ts.t[i].data = w->ts.t[i].n_elems ? w->shm + offsets[i] : NULL;
    }
    w->ids = (int32_t *)(w->shm + offsets[MOE_T_COUNT]);
    w->topk_weights = (float *)(w->shm + offsets[MOE_T_COUNT + 1]);
    w->y_moegen = w->shm + offsets[MOE_T_COUNT + 2];
    moe_tensors_fill(&w->ts, seed);
    moe_tensors_bind_weights(s, &w->ts, 0, &w->weights);
    return 0;
}

static void print_ready(const worker *w, double fill_ms) {
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
        printf("%s\"%s\": {\"offset\": %zu, \"dtype\": \"%s\", \"shape\": [", first ? "" : ", ", t->name,
               (size_t)((unsigned char *)t->data - w->shm), t->fp32 ? "fp32" : dt);
        for (int d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
        printf("]}");
        first = 0;
    }
    const long long S = (long long)w->max_S, k = s->top_k, H = (long long)s->hidden_size;
    printf(", \"topk_ids\": {\"offset\": %zu, \"dtype\": \"int32\", \"shape\": [%lld, %lld]}",
           (size_t)((unsigned char *)w->ids - w->shm), S, k);
    printf(", \"topk_weights\": {\"offset\": %zu, \"dtype\": \"fp32\", \"shape\": [%lld, %lld]}",
           (size_t)((unsigned char *)w->topk_weights - w->shm), S, k);
    printf(", \"y\": {\"offset\": %zu, \"dtype\": \"%s\", \"shape\": [%lld, %lld]}}",
           (size_t)((unsigned char *)w->y_moegen - w->shm), dt, S, H);
    printf(", \"E\": %d, \"k\": %d, \"H\": %lld, \"F\": %lld, \"F1\": %lld, \"activation\": \"%s\"", s->num_experts,
           s->top_k, H, (long long)s->moe_intermediate_size, (long long)moegen_spec_ffn_rows(s),
           moegen_activation_name(s->activation));
    printf(", \"n_shared\": %d, \"Fs\": %lld, \"shared_gate\": %d, \"norm_topk_prob\": %d", s->shared.count,
           (long long)s->shared.intermediate_size, s->shared.count > 0 && s->shared.gate, s->router.norm_topk_prob);
    printf(", \"capacity\": \"%s\", \"openblas\": ", moegen_capacity_mode_name(s->capacity.mode));
    json_string(stdout, w->blas ? w->blas_mode : w->blas_why);
    printf(", \"ggml\": ");
    json_string(stdout, ggml_moe_version());
    printf(", \"fill_ms\": %.1f}\n", fill_ms);
    fflush(stdout);
}

/* Cold-cache timing (--evict-mb): before every timed call, every implementation alike, the
 * worker writes and reads a buffer larger than the last-level cache, as the other layers of a
 * model do between two calls of one layer; without it, decode timings of layers whose touched
 * weights fit in the cache measure the cache, not memory. */
static void evict_caches(worker *w) {
    if (!w->evict_bytes) return;
    volatile unsigned char *p = w->evict;
    for (size_t i = 0; i < w->evict_bytes; i += 64) p[i] = (unsigned char)(p[i] + 1);
}

static void cmd_evict(worker *w, long long megabytes) {
    free(w->evict);
    w->evict = NULL;
    w->evict_bytes = 0;
    if (megabytes > 0) {
        w->evict_bytes = (size_t)megabytes << 20;
        w->evict = calloc(1, w->evict_bytes);
        if (!w->evict) w->evict_bytes = 0;
    }
    printf("{\"event\": \"evict\", \"bytes\": %zu}\n", w->evict_bytes);
    fflush(stdout);
}

/* The layer with n threads (opened and bound on first use). */
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
    opts.variant = w->variant;
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

static int moegen_call(worker *w, int with_routing) {
    moegen_forward_io io = {.n_tokens = w->m.S, .x = w->m.x, .y = w->y_moegen};
    if (with_routing) {
        io.topk_ids = w->ids;
        io.topk_weights = w->topk_weights;
        io.counts_after = w->counts_after;
    }
    moegen_error err;
    if (moegen_layer_forward(w->layer, &io, NULL, &err) != MOEGEN_OK) {
        reply_error("error", err.message);
        return -1;
    }
    return 0;
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
    w->m.S = S;
    w->m.n_threads = T;
    double t0 = now_ms();
    if (moegen_call(w, 1) != 0) return;
    const double moegen_ms = now_ms() - t0;

    const moegen_spec *s = &w->spec;
    const double H = (double)s->hidden_size, F = (double)s->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(s), elem = (double)moegen_dtype_size(s->dtype);
    const double Fs = (double)s->shared.intermediate_size;
    const double F1s = moegen_activation_is_gated(s->activation) ? 2 * Fs : Fs;
    long long kept = 0, touched = 0;
    for (int e = 0; e < s->num_experts; e++) {
        kept += w->counts_after[e];
        touched += w->counts_after[e] > 0;
    }
    /* expert GEMM FLOPs (routed kept rows + shared on every token) and the expert weight bytes
     * one forward must read at least (every touched expert once, the shared experts) */
    const double flops = kept * (2 * H * F1 + 2 * F * H) + s->shared.count * (double)S * (2 * H * F1s + 2 * Fs * H);
    const double bytes = (touched * (F1 * H + H * F) + s->shared.count * (F1s * H + H * Fs)) * elem;

    const size_t n = (size_t)S * (size_t)s->hidden_size;
    const int bf16 = s->dtype == MOEGEN_DTYPE_BF16;
    double blas_ms = INFINITY, blas_err = NAN, ggml_ms = -1, ggml_err = NAN, schedule_ms[2] = {-1, -1};
    if (w->blas) { /* the faster schedule on this shape: both are tried on more than one thread */
        for (int sched = 0; sched < (T > 1 ? 2 : 1) && w->blas; sched++) {
            if (T > 1) usleep(200000); /* the previous call's spinning threads (OpenBLAS's: ~0.1 s) go idle */
            schedule_ms[sched] = INFINITY;
            for (int rep = 0; rep < 2; rep++) { /* a second call when the first was short */
                t0 = now_ms();
                if (blas_loop_run(w->blas, &w->m, w->y_anchor, sched) != 0) {
                    snprintf(w->blas_why, sizeof w->blas_why, "out of memory for %d threads' buffers", T);
                    blas_loop_free(w->blas);
                    w->blas = NULL;
                    break;
                }
                const double ms = now_ms() - t0;
                schedule_ms[sched] = ms < schedule_ms[sched] ? ms : schedule_ms[sched];
                if (ms > 1000) break;
            }
            if (!w->blas) break;
            const double err_now = rel_err(w->y_anchor, bf16, w->y_moegen, bf16, n); /* the worse one counts */
            blas_err = isnan(blas_err) || err_now > blas_err || isnan(err_now) ? err_now : blas_err;
            if (schedule_ms[sched] < blas_ms) {
                blas_ms = schedule_ms[sched];
                w->blas_schedule = sched;
            }
        }
    }
    ggml_moe_free(w->ggml);
    if ((w->ggml = ggml_moe_create(&w->m, w->ggml_why, sizeof w->ggml_why))) {
        t0 = now_ms();
        if (ggml_moe_run(w->ggml) == 0) {
            ggml_ms = now_ms() - t0;
            ggml_err = rel_err(ggml_moe_output(w->ggml), 0, w->y_moegen, bf16, n);
        } else {
            snprintf(w->ggml_why, sizeof w->ggml_why, "ggml_graph_compute failed");
            ggml_moe_free(w->ggml);
            w->ggml = NULL;
        }
    }
    printf("{\"event\": \"prepared\", \"tokens\": %lld, \"threads\": %d, \"moegen_threads\": %d, \"variant\": ", S, T,
           desc.n_threads);
    json_string(stdout, desc.variant);
    printf(", \"n_variants\": %d, \"tuning\": ", desc.n_variants); /* several: one per token range */
    json_string(stdout, desc.tuning);
    printf(", \"cache_hit\": %d, \"compile_ms\": %.1f, \"kept_routes\": %lld, \"touched_experts\": %lld",
           desc.cache_hit, desc.compile_ms, kept, touched);
    printf(", \"expert_flops\": %.6g, \"expert_bytes\": %.6g, \"first_ms\": {\"moegen\": %.4f", flops, bytes,
           moegen_ms);
    if (w->blas) printf(", \"openblas\": %.4f", blas_ms);
    if (w->ggml) printf(", \"ggml\": %.4f", ggml_ms);
    printf("}");
    if (w->blas) {
        printf(", \"openblas_schedule\": \"%s\", \"openblas_schedule_ms\": {\"%s\": %.4f",
               blas_schedule_name(w->blas_schedule), blas_schedule_name(BLAS_GEMM_THREADS), schedule_ms[0]);
        if (T > 1) printf(", \"%s\": %.4f", blas_schedule_name(BLAS_EXPERTS_PARALLEL), schedule_ms[1]);
        printf("}");
    }
    printf(", \"relerr\": {");
    if (w->blas) printf("\"openblas\": %.6g%s", isnan(blas_err) ? 1e300 : blas_err, w->ggml ? ", " : "");
    if (w->ggml) printf("\"ggml\": %.6g", isnan(ggml_err) ? 1e300 : ggml_err);
    printf("}, \"unavailable\": {");
    if (!w->blas) {
        printf("\"openblas\": ");
        json_string(stdout, w->blas_why);
    }
    if (!w->ggml) {
        printf("%s\"ggml\": ", w->blas ? "" : ", ");
        json_string(stdout, w->ggml_why);
    }
    printf("}}\n");
    fflush(stdout);
}

static void cmd_time(worker *w, const char *impl, int n) {
    if (!w->layer) {
        reply_error("error", "time before prepare");
        return;
    }
    if ((!strcmp(impl, "openblas") && !w->blas) || (!strcmp(impl, "ggml") && !w->ggml)) {
        reply_error("error", "that implementation is not available for this shape");
        return;
    }
    if (strcmp(impl, "moegen") && strcmp(impl, "openblas") && strcmp(impl, "ggml")) {
        reply_error("error", "time: IMPL is moegen, openblas or ggml");
        return;
    }
    double *ms = calloc((size_t)n, sizeof *ms);
    if (!ms) {
        reply_error("error", "out of memory");
        return;
    }
    for (int i = 0; i < n; i++) {
        evict_caches(w);
        const double t0 = now_ms();
        if (impl[0] == 'm') {
            if (moegen_call(w, 0) != 0) {
                free(ms);
                return;
            }
        } else if (impl[0] == 'o') {
            if (blas_loop_run(w->blas, &w->m, w->y_anchor, w->blas_schedule) != 0) {
                reply_error("error", "the OpenBLAS loop is out of memory");
                free(ms);
                return;
            }
        } else if (ggml_moe_run(w->ggml) != 0) {
            reply_error("error", "ggml_graph_compute failed");
            free(ms);
            return;
        }
        ms[i] = now_ms() - t0;
    }
    printf("{\"event\": \"times\", \"impl\": \"%s\", \"ms\": [", impl);
    for (int i = 0; i < n; i++) printf("%s%.4f", i ? ", " : "", ms[i]);
    printf("]}\n");
    fflush(stdout);
    free(ms);
}

/* The anchors' outputs of their latest calls against moegen's latest y: a timed run that went
 * wrong after the checked first one (reused or clobbered memory) cannot pass unnoticed. */
static void cmd_check(worker *w) {
    const size_t n = (size_t)w->m.S * (size_t)w->spec.hidden_size;
    const int bf16 = w->spec.dtype == MOEGEN_DTYPE_BF16;
    printf("{\"event\": \"checked\", \"relerr\": {");
    if (w->blas) printf("\"openblas\": %.6g%s", rel_err(w->y_anchor, bf16, w->y_moegen, bf16, n), w->ggml ? ", " : "");
    if (w->ggml) printf("\"ggml\": %.6g", rel_err(ggml_moe_output(w->ggml), 0, w->y_moegen, bf16, n));
    printf("}}\n");
    fflush(stdout);
}

static const char usage[] = "usage: moegen_cpu_bench SPEC --dtype fp32|bf16 --max-tokens N [--seed S] [--variant LIST]\n"
                            "  (driven by bench/cpu_bench.py; see bench/cpu.sh)\n";

int main(int argc, char **argv) {
    const char *spec_path = NULL, *dtype = NULL;
    const char *variant = NULL;
    long long max_S = 0, seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dtype") && i + 1 < argc) dtype = argv[++i];
        else if (!strcmp(argv[i], "--max-tokens") && i + 1 < argc) max_S = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc) variant = argv[++i];
        else if (argv[i][0] != '-' && !spec_path) spec_path = argv[i];
        else {
            fputs(usage, stderr);
            return 2;
        }
    }
    if (!spec_path || !dtype || max_S < 1 || (strcmp(dtype, "fp32") && strcmp(dtype, "bf16"))) {
        fputs(usage, stderr);
        return 2;
    }
    static worker w;
    w.max_S = max_S;
    w.variant = variant;
    w.shm_fd = -1;
    moegen_error err;
    if (moegen_spec_load_file(spec_path, &w.spec, &err) != MOEGEN_OK) {
        reply_error("error", err.message);
        return 1;
    }
    w.spec.dtype = strcmp(dtype, "bf16") ? MOEGEN_DTYPE_FP32 : MOEGEN_DTYPE_BF16;
    snprintf(w.display, sizeof w.display, "%s (dtype %s)", spec_path, dtype);
    const char *why_not = unsupported(&w.spec);
    if (why_not) {
        reply_error("skip", why_not);
        return 0;
    }
    /* fits in memory? (bf16 without cblas_sbgemm needs fp32 copies of the weights) */
    moegen_memory_budget budget;
    const int copies = w.spec.dtype == MOEGEN_DTYPE_BF16 && !blas_loop_has_sbgemm();
    const double need = bytes_needed(&w.spec, max_S, copies);
    if (moegen_memory_budget_read(&budget, NULL) == MOEGEN_OK && budget.available_bytes != MOEGEN_MEMORY_UNLIMITED &&
        need > 0.85 * (double)budget.available_bytes) {
        char need_text[MOEGEN_BYTES_TEXT_BYTES], have_text[MOEGEN_BYTES_TEXT_BYTES], why[512];
        moegen_format_bytes((uint64_t)need, need_text, sizeof need_text);
        moegen_format_bytes(budget.available_bytes, have_text, sizeof have_text);
        snprintf(why, sizeof why, "needs about %s for %lld tokens in %s; %s is available (%s)", need_text, max_S,
                 dtype, have_text, budget.limited_by);
        reply_error("skip", why);
        return 0;
    }
    if (!(w.canonical = moegen_spec_canonical(&w.spec)) ||
        !(w.counts_after = calloc((size_t)w.spec.num_experts, sizeof *w.counts_after)) ||
        !(w.y_anchor = calloc((size_t)max_S * (size_t)w.spec.hidden_size, moegen_dtype_size(w.spec.dtype)))) {
        reply_error("error", "out of memory");
        return 1;
    }
    char why[512];
    const double t0 = now_ms();
    if (map_tensors(&w, (uint64_t)seed, why, sizeof why) != 0) {
        reply_error("error", why);
        return 1;
    }
    const double fill_ms = now_ms() - t0;
    const moegen_spec *s = &w.spec;
    w.m = (bench_moe){.E = s->num_experts,
                      .k = s->top_k,
                      .H = s->hidden_size,
                      .F = s->moe_intermediate_size,
                      .F1 = moegen_spec_ffn_rows(s),
                      .act = s->activation,
                      .bf16 = s->dtype == MOEGEN_DTYPE_BF16,
                      .norm_topk_prob = s->router.norm_topk_prob,
                      .n_shared = s->shared.count,
                      .Fs = s->shared.count ? s->shared.intermediate_size : 0,
                      .F1s = s->shared.count ? (moegen_activation_is_gated(s->activation) ? 2 : 1) *
                                                   s->shared.intermediate_size
                                             : 0,
                      .router_w = w.ts.t[MOE_T_ROUTER_W].data,
                      .w1 = w.ts.t[MOE_T_W1].data,
                      .w2 = w.ts.t[MOE_T_W2].data,
                      .shared_w1 = w.ts.t[MOE_T_SHARED_W1].data,
                      .shared_w2 = w.ts.t[MOE_T_SHARED_W2].data,
                      .shared_gate = w.ts.t[MOE_T_SHARED_GATE].data,
                      .x = w.ts.t[MOE_T_X].data,
                      .ids = w.ids,
                      .weights = w.topk_weights};
    w.blas = blas_loop_create(&w.m, max_S, &w.blas_mode, w.blas_why, sizeof w.blas_why);
    print_ready(&w, fill_ms);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "", impl[32] = "";
        long long a = 0;
        int b = 0;
        if (sscanf(line, "%31s", cmd) != 1) continue;
        if (!strcmp(cmd, "quit")) break;
        if (!strcmp(cmd, "evict") && sscanf(line, "%*s %lld", &a) == 1 && a >= 0) {
            cmd_evict(&w, a);
            continue;
        }
        if (!strcmp(cmd, "prepare") && sscanf(line, "%*s %lld %d", &a, &b) == 2) cmd_prepare(&w, a, b);
        else if (!strcmp(cmd, "time") && sscanf(line, "%*s %31s %d", impl, &b) == 2 && b > 0) cmd_time(&w, impl, b);
        else if (!strcmp(cmd, "check") && w.layer) cmd_check(&w);
        else reply_error("error", "commands: prepare S T | time IMPL N | check | quit");
    }
    ggml_moe_free(w.ggml);
    blas_loop_free(w.blas);
    for (int i = 0; i < w.n_layers; i++) moegen_layer_close(w.layers[i].layer);
    for (int i = 0; i < MOE_T_COUNT; i++) w.ts.t[i].data = NULL; /* in the memfd */
    moe_tensors_free(&w.ts);
    if (w.shm) munmap(w.shm, w.shm_bytes);
    if (w.shm_fd >= 0) close(w.shm_fd);
    free(w.canonical);
    free(w.evict);
    free(w.counts_after);
    free(w.y_anchor);
    moegen_spec_free(&w.spec);
    return 0;
}
