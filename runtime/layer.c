/* layer.c — the public layer API (moegen.h): open, bind, forward, close, and the
 * dispatch to a backend.
 *
 * Place in the pipeline: the front of it. Opening a layer parses and validates the spec
 * (gen/spec.c), applies the open options, picks the backend and opens it:
 *   CPU:  runtime/cpu_backend.c (generate, host compiler through the cache, dlopen);
 *   CUDA: runtime/cuda_backend.c (generate, NVRTC through the cache, module load);
 * and, for ep_size > 1, the expert-parallel layer above the backend (runtime/ep.c).
 * Forward checks its arguments and calls the backend (or the expert-parallel layer).
 *
 * Invariants owned here: a layer that failed to open is never returned; forward never
 * runs before bind; one call at a time per layer (an atomic busy flag: a second call
 * gets MOEGEN_ERR_STATE); the thread count is resolved and capped once, at open.
 */
#define _GNU_SOURCE
#include "moegen.h"

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "cpu_backend.h"
#include "cuda_backend.h"
#include "data_dir.h"
#include "ep.h"
#include "fs_util.h"
#include "moegen_kernel_abi.h"
#include "spec.h"

struct moegen_layer {
    moegen_spec spec;
    moegen_open_options options;
    moegen_layer_desc desc;
    moegen_cpu_backend *cpu;       /* CPU layers */
    moegen_ep *ep;                 /* ep_size > 1: this rank's share, above the CPU backend */
    moegen_cuda_backend *cuda;     /* CUDA layers */
    moegen_template_set *templates; /* from opts.template_dir / $MOEGEN_TEMPLATE_DIR; NULL: built-in */
    moegen_kernel_weights weights;
    int bound;
    int n_threads;                 /* CPU threads per forward, after the cap */
    atomic_int busy;               /* a bind or forward is running (one call at a time) */
};

void moegen_open_options_init(moegen_open_options *opts) {
    if (!opts) return;
    memset(opts, 0, sizeof *opts);
    opts->device = MOEGEN_DEVICE_AUTO;
    opts->mode = -1;
}

/* ---- Threads ------------------------------------------------------------------------------ */

/* A positive decimal integer (the first of a comma-separated list), else 0. */
static long positive_integer(const char *text) {
    if (!text || *text < '1' || *text > '9') return 0;
    long value = 0;
    for (; *text >= '0' && *text <= '9'; text++) {
        if (value > 1000000) return 1000000; /* absurd: the cap below applies */
        value = value * 10 + (*text - '0');
    }
    return *text == '\0' || *text == ',' ? value : 0;
}

/* CPUs this process may run on (its affinity mask), at least 1. */
static long available_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? online : 1;
}

/* The threads a forward uses: the open option, else $OMP_NUM_THREADS, else the CPUs
 * this process may use; capped at $MOEGEN_MAX_THREADS, else 4 x those CPUs, and never
 * above MOEGEN_THREAD_LIMIT (docs/limits.md). */
static int resolve_threads(const moegen_open_options *o, char *notice, size_t notice_size) {
    const long cpus = available_cpus();
    long wanted = o->n_threads > 0 ? o->n_threads : positive_integer(getenv("OMP_NUM_THREADS"));
    if (wanted <= 0) wanted = cpus;
    long cap = positive_integer(getenv("MOEGEN_MAX_THREADS"));
    if (cap <= 0) cap = 4 * cpus;
    if (cap > MOEGEN_THREAD_LIMIT) cap = MOEGEN_THREAD_LIMIT;
    notice[0] = '\0';
    if (wanted > cap) {
        snprintf(notice, notice_size,
                 "%ld threads requested; using %ld (the cap: MOEGEN_MAX_THREADS, else 4 x the %ld CPUs "
                 "this process may use, at most %d)",
                 wanted, cap, cpus, MOEGEN_THREAD_LIMIT);
        wanted = cap;
    }
    return (int)wanted;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- Open / close ------------------------------------------------------------------------ */

static void describe_weights(const moegen_spec *spec, char *out, size_t size);

static moegen_status open_parsed(moegen_layer *layer, moegen_error *err) {
    double start = now_ms();
    moegen_spec *spec = &layer->spec;
    if (layer->options.mode == 0 || layer->options.mode == 1)
        spec->mode = layer->options.mode == 0 ? MOEGEN_MODE_TRAIN : MOEGEN_MODE_EVAL;
    else if (layer->options.mode != -1)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "open options: mode must be -1 (from the spec), 0 (train) or 1 (eval)");
    if (layer->options.n_threads < 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "open options: n_threads is %d; give 0 (the default) or a positive count",
                                layer->options.n_threads);
    if (layer->options.compile_timeout_s < 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "open options: compile_timeout_s is %d; give 0 (the default) or a positive count",
                                layer->options.compile_timeout_s);
    if (layer->options.cuda_device < 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "open options: cuda_device is %d (negative)",
                                layer->options.cuda_device);
    const int parallel = spec->ep_size > 1;
    if (parallel && !layer->options.comm)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "%s: ep_size %d needs a communicator of %d ranks in the open options "
                                "(moegen_comm_create, moegen_comm_create_mpi, moegen_comm_create_nccl; or run "
                                "`mpirun -np %d moegen run ...`)",
                                spec->name, spec->ep_size, spec->ep_size, spec->ep_size);
    if (!parallel && layer->options.comm && layer->options.comm->size > 1)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "%s: a communicator of %d ranks was given, but the spec's ep_size is 1",
                                spec->name, layer->options.comm->size);
    if (parallel && layer->options.comm->memory != MOEGEN_COMM_HOST)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "%s: expert parallelism moves rows through host memory (MPI or your callbacks); "
                                "a device-memory communicator (%s) has no expert-parallel path yet",
                                spec->name, layer->options.comm->transport);
    char template_dir[1024];
    moegen_status st = moegen_template_dir(layer->options.template_dir, template_dir, sizeof template_dir, err);
    if (st != MOEGEN_OK) return st;
    if (template_dir[0]) {
        st = moegen_template_set_load(template_dir, &layer->templates, err);
        if (st != MOEGEN_OK) return st;
    }
    moegen_text_format(layer->desc.templates, sizeof layer->desc.templates, "%s",
                       template_dir[0] ? template_dir : "built-in");
    switch (layer->options.device) {
    case MOEGEN_DEVICE_AUTO: {
        moegen_error why;
        if (parallel) { /* the CUDA expert-parallel path has not run on a GPU yet: ask for it by name */
            layer->desc.device = MOEGEN_DEVICE_CPU;
        } else if (moegen_cuda_backend_available(&why) == MOEGEN_OK) {
            layer->desc.device = MOEGEN_DEVICE_CUDA;
        } else {
            layer->desc.device = MOEGEN_DEVICE_CPU;
            char notice[MOEGEN_ERROR_MESSAGE_BYTES + 64];
            snprintf(notice, sizeof notice, "device auto: %s; using the CPU backend", why.message);
            if (layer->options.log) layer->options.log(layer->options.log_user, MOEGEN_LOG_NOTICE, notice);
            else fprintf(stderr, "moegen: notice: %s\n", notice);
        }
        break;
    }
    case MOEGEN_DEVICE_CPU:
        layer->desc.device = MOEGEN_DEVICE_CPU;
        break;
    case MOEGEN_DEVICE_CUDA:
        layer->desc.device = MOEGEN_DEVICE_CUDA;
        break;
    default:
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "open options: unknown device %d",
                                (int)layer->options.device);
    }

    if (layer->desc.device == MOEGEN_DEVICE_CUDA) {
        moegen_cache cache;
        st = moegen_cache_open(&cache, layer->options.cache_dir, layer->options.log, layer->options.log_user, err);
        if (st == MOEGEN_OK)
            st = moegen_cuda_backend_open(spec, layer->options.cuda_device, layer->options.arch,
                                          layer->options.variant, layer->templates, &cache,
                                          &layer->cuda, &layer->desc, err);
    } else {
        st = moegen_cpu_backend_open(spec, &layer->options, layer->templates, &layer->cpu, &layer->desc, err);
    }
    if (st != MOEGEN_OK) return st;

    char notice[256];
    layer->n_threads = resolve_threads(&layer->options, notice, sizeof notice);
    if (notice[0] && layer->desc.device == MOEGEN_DEVICE_CPU) {
        if (layer->options.log) layer->options.log(layer->options.log_user, MOEGEN_LOG_NOTICE, notice);
        else fprintf(stderr, "moegen: notice: %s\n", notice);
    }
    moegen_layer_desc *d = &layer->desc;
    d->n_threads = layer->desc.device == MOEGEN_DEVICE_CPU ? layer->n_threads : 0;
    d->num_experts = spec->num_experts;
    d->top_k = spec->top_k;
    d->hidden_size = spec->hidden_size;
    d->ffn_size = spec->moe_intermediate_size;
    d->ffn_rows = moegen_spec_ffn_rows(spec);
    d->dtype = (int)spec->dtype;
    d->n_shared = spec->shared.count;
    d->shared_ffn_size = spec->shared.count ? spec->shared.intermediate_size : 0;
    d->shared_ffn_rows = spec->shared.count
                             ? (moegen_activation_is_gated(spec->activation) ? 2 : 1) * d->shared_ffn_size
                             : 0;
    moegen_spec_hash(spec, d->spec_hash);
    describe_weights(spec, d->weights, sizeof d->weights);
    d->rank = 0;
    d->ep_size = 1;
    d->first_expert = 0;
    d->n_local_experts = spec->num_experts;
    if (parallel) {
        moegen_ep_backend stages;
        if (layer->cuda) moegen_cuda_backend_ep(layer->cuda, &stages); /* staged through pinned host memory */
        else moegen_cpu_backend_ep(layer->cpu, &stages);
        st = moegen_ep_open(spec, d->spec_hash, layer->options.comm, &stages, &layer->ep, d, err);
        if (st != MOEGEN_OK) return st;
    }
    d->compile_ms = now_ms() - start;
    return MOEGEN_OK;
}

/* Shared tail of the two open functions: `layer` holds a parsed spec. */
static moegen_status finish_open(moegen_layer *layer, const moegen_open_options *opts,
                                 moegen_layer **out, moegen_error *err) {
    if (opts) layer->options = *opts;
    else moegen_open_options_init(&layer->options);
    /* A valid spec that is probably not what was meant (gen/spec.h): each warning to the log. */
    for (const char *line = layer->spec.warnings; *line;) {
        const size_t length = strcspn(line, "\n");
        char message[MOEGEN_SPEC_WARNINGS_BYTES];
        snprintf(message, sizeof message, "%.*s", (int)length, line);
        if (layer->options.log) layer->options.log(layer->options.log_user, MOEGEN_LOG_WARNING, message);
        else fprintf(stderr, "moegen: warning: %s\n", message);
        line += length + (line[length] == '\n');
    }
    moegen_status st = open_parsed(layer, err);
    if (st != MOEGEN_OK) {
        moegen_layer_close(layer);
        return st;
    }
    *out = layer;
    return MOEGEN_OK;
}

moegen_status moegen_layer_open_file(const char *path, const moegen_open_options *opts,
                                     moegen_layer **out, moegen_error *err) {
    if (!path || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "open: path and out are required");
    *out = NULL;
    moegen_layer *layer = calloc(1, sizeof *layer);
    if (!layer) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    moegen_status st = moegen_spec_load_file(path, &layer->spec, err);
    if (st != MOEGEN_OK) {
        free(layer);
        return st;
    }
    return finish_open(layer, opts, out, err);
}

moegen_status moegen_layer_open_string(const char *yaml, size_t len, const char *display_name,
                                       const moegen_open_options *opts, moegen_layer **out,
                                       moegen_error *err) {
    if (!yaml || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "open: yaml and out are required");
    *out = NULL;
    moegen_layer *layer = calloc(1, sizeof *layer);
    if (!layer) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    moegen_status st = moegen_spec_parse(yaml, len, display_name ? display_name : "<string>",
                                         &layer->spec, err);
    if (st != MOEGEN_OK) {
        free(layer);
        return st;
    }
    return finish_open(layer, opts, out, err);
}

void moegen_layer_close(moegen_layer *layer) {
    if (!layer) return;
    moegen_ep_close(layer->ep);
    moegen_cuda_backend_close(layer->cuda);
    moegen_cpu_backend_close(layer->cpu);
    moegen_template_set_free(layer->templates);
    moegen_spec_free(&layer->spec);
    free(layer);
}

moegen_status moegen_layer_describe(const moegen_layer *layer, moegen_layer_desc *desc) {
    if (!layer || !desc) return MOEGEN_ERR_INVALID_ARGUMENT;
    *desc = layer->desc;
    return MOEGEN_OK;
}

/* ---- Bind / forward ------------------------------------------------------------------------ */

/* Claim the layer for one call; MOEGEN_ERR_STATE when another call holds it. */
static moegen_status claim(moegen_layer *layer, const char *what, moegen_error *err) {
    if (atomic_exchange(&layer->busy, 1))
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "%s: another call is running on this layer (a layer runs one call at a time; "
                                "open one layer per thread)",
                                what);
    return MOEGEN_OK;
}

static void release(moegen_layer *layer) { atomic_store(&layer->busy, 0); }

static moegen_status bind_weights(moegen_layer *layer, const moegen_weights *w, moegen_error *err);

moegen_status moegen_layer_bind(moegen_layer *layer, const moegen_weights *w, moegen_error *err) {
    if (!layer || !w)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "bind: layer and weights are required");
    moegen_status st = claim(layer, "bind", err);
    if (st != MOEGEN_OK) return st;
    st = bind_weights(layer, w, err);
    release(layer);
    return st;
}

/* The weight tensors of moegen_weights in the order bind checks them: whether the spec reads each, its
 * pointer in `w` and its element size. The one home of "which tensors a layer needs": bind
 * checks against it and desc.weights lists it. */
typedef struct weight_entry {
    const void *pointer;
    int needed;
    const char *field, *because; /* the moegen_weights field; the spec key that asks for it */
    size_t align;                /* bytes of one element: the pointer must be a multiple */
} weight_entry;
#define WEIGHT_FIELDS 18

static void weight_table(const moegen_spec *spec, const moegen_weights *w, weight_entry out[WEIGHT_FIELDS]) {
    const size_t elem = moegen_dtype_size(spec->dtype), f32 = sizeof(float);
    const int shared = spec->shared.count > 0, bias = spec->expert_bias, residual = spec->use_residual;
    const weight_entry table[WEIGHT_FIELDS] = {
        {w->router_w, 1, "router_w", "", f32},
        {w->router_b, spec->router.router_bias, "router_b", "router.router_bias", f32},
        {w->score_bias, spec->router.score_bias, "score_bias", "router.score_bias", f32},
        {w->w1, 1, "w1", "", elem},
        {w->w2, 1, "w2", "", elem},
        {w->b1, bias, "b1", "expert_bias", elem},
        {w->b2, bias, "b2", "expert_bias", elem},
        {w->shared_w1, shared, "shared_w1", "shared_experts", elem},
        {w->shared_w2, shared, "shared_w2", "shared_experts", elem},
        {w->shared_b1, shared && bias, "shared_b1", "expert_bias", elem},
        {w->shared_b2, shared && bias, "shared_b2", "expert_bias", elem},
        {w->shared_gate, shared && spec->shared.gate, "shared_gate", "shared_experts.gate", f32},
        {w->residual_w1, residual, "residual_w1", "use_residual", elem},
        {w->residual_w2, residual, "residual_w2", "use_residual", elem},
        {w->residual_b1, residual && bias, "residual_b1", "expert_bias", elem},
        {w->residual_b2, residual && bias, "residual_b2", "expert_bias", elem},
        {w->residual_coef_w, residual, "residual_coef_w", "use_residual", f32},
        {w->residual_coef_b, residual, "residual_coef_b", "use_residual", f32},
    };
    memcpy(out, table, sizeof table);
}

/* desc.weights: the fields the layer reads, space-separated, in the order bind checks them. */
static void describe_weights(const moegen_spec *spec, char *out, size_t size) {
    const moegen_weights none = {0};
    weight_entry table[WEIGHT_FIELDS];
    weight_table(spec, &none, table);
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < WEIGHT_FIELDS; i++) {
        if (!table[i].needed) continue;
        const int n = snprintf(out + used, size - used, "%s%s", used ? " " : "", table[i].field);
        if (n < 0 || (size_t)n >= size - used) break;
        used += (size_t)n;
    }
}

static moegen_status bind_weights(moegen_layer *layer, const moegen_weights *w, moegen_error *err) {
    const moegen_spec *spec = &layer->spec;
    weight_entry tensors[WEIGHT_FIELDS];
    weight_table(spec, w, tensors);
    for (int i = 0; i < WEIGHT_FIELDS; i++) {
        if (!tensors[i].needed) continue;
        char name[64];
        snprintf(name, sizeof name, "%s%s%s%s", tensors[i].field, tensors[i].because[0] ? " (" : "",
                 tensors[i].because, tensors[i].because[0] ? ")" : "");
        if (!tensors[i].pointer)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "bind: layer %s needs weight tensor %s",
                                    spec->name, name);
        if ((uintptr_t)tensors[i].pointer % tensors[i].align != 0)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "bind: weight tensor %s at %p is not aligned to its %zu-byte elements", name,
                                    tensors[i].pointer, tensors[i].align);
    }
    /* Keep only what the spec uses, so a stray pointer can never be read. */
    moegen_kernel_weights *k = &layer->weights;
    memset(k, 0, sizeof *k);
    k->router_w = w->router_w;
    k->w1 = w->w1;
    k->w2 = w->w2;
    if (spec->router.router_bias) k->router_b = w->router_b;
    if (spec->router.score_bias) k->score_bias = w->score_bias;
    if (spec->expert_bias) {
        k->b1 = w->b1;
        k->b2 = w->b2;
    }
    if (spec->shared.count > 0) {
        k->shared_w1 = w->shared_w1;
        k->shared_w2 = w->shared_w2;
        if (spec->expert_bias) {
            k->shared_b1 = w->shared_b1;
            k->shared_b2 = w->shared_b2;
        }
        if (spec->shared.gate) k->shared_gate = w->shared_gate;
    }
    if (spec->use_residual) {
        k->residual_w1 = w->residual_w1;
        k->residual_w2 = w->residual_w2;
        k->residual_coef_w = w->residual_coef_w;
        k->residual_coef_b = w->residual_coef_b;
        if (spec->expert_bias) {
            k->residual_b1 = w->residual_b1;
            k->residual_b2 = w->residual_b2;
        }
    }
    layer->bound = 1;
    return MOEGEN_OK;
}

static moegen_status run_forward(moegen_layer *layer, const moegen_forward_io *io, moegen_forward_stats *stats,
                                 moegen_error *err);

moegen_status moegen_layer_forward(moegen_layer *layer, const moegen_forward_io *io,
                                   moegen_forward_stats *stats, moegen_error *err) {
    if (!layer || !io)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: layer and io are required");
    moegen_status st = claim(layer, "forward", err);
    if (st != MOEGEN_OK) return st;
    st = run_forward(layer, io, stats, err);
    release(layer);
    return st;
}

/* The checks of a forward's arguments (shared by forward and forward_train). */
static moegen_status check_forward_io(const moegen_layer *layer, const moegen_forward_io *io, moegen_error *err) {
    if (!layer->bound)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0, "forward: no weights bound (call moegen_layer_bind)");
    if (io->n_tokens < 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: n_tokens is negative (%lld)",
                                (long long)io->n_tokens);
    if (io->n_tokens > 0 && (!io->x || !io->y))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: x and y are required");
    const size_t elem = moegen_dtype_size(layer->spec.dtype);
    const struct {
        const void *pointer;
        const char *name;
        size_t align;
    } buffers[] = {{io->x, "x", elem},
                   {io->y, "y", elem},
                   {io->topk_ids, "topk_ids", sizeof(int32_t)},
                   {io->topk_weights, "topk_weights", sizeof(float)},
                   {io->router_weights, "router_weights", sizeof(float)},
                   {io->counts_before, "counts_before", sizeof(int64_t)},
                   {io->counts_after, "counts_after", sizeof(int64_t)}};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
        if ((uintptr_t)buffers[i].pointer % buffers[i].align != 0)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "forward: %s at %p is not aligned to its %zu-byte elements", buffers[i].name,
                                    buffers[i].pointer, buffers[i].align);
    return MOEGEN_OK;
}

static moegen_status run_forward(moegen_layer *layer, const moegen_forward_io *io, moegen_forward_stats *stats,
                                 moegen_error *err) {
    moegen_status st = check_forward_io(layer, io, err);
    if (st != MOEGEN_OK) return st;
    if (stats) memset(stats, 0, sizeof *stats);
    if (layer->cuda && io->used_token)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "forward: used_token is not implemented on the CUDA backend yet (CPU layers only)");
    if (layer->ep) return moegen_ep_forward(layer->ep, &layer->weights, layer->n_threads, io, stats, err);
    if (layer->cuda) return moegen_cuda_backend_forward(layer->cuda, &layer->weights, io, stats, err);
    return moegen_cpu_backend_forward(layer->cpu, &layer->weights, layer->n_threads, io, stats, err);
}

/* ---- Training ---------------------------------------------------------------------------- */

struct moegen_saved {
    const moegen_layer *layer; /* the layer whose forward this is */
    moegen_cpu_saved *cpu;     /* ep_size 1 */
    moegen_ep_saved *ep;       /* ep_size > 1 */
    moegen_cuda_saved *cuda;   /* CUDA, ep_size 1 */
};

moegen_status moegen_layer_forward_train(moegen_layer *layer, const moegen_forward_io *io, moegen_saved **saved,
                                         moegen_forward_stats *stats, moegen_error *err) {
    if (!layer || !io || !saved)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward_train: layer, io and saved are required");
    *saved = NULL;
    if (layer->cuda && layer->ep)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "forward_train: the training backward of expert-parallel CUDA layers is not "
                                "implemented yet (CPU layers, or a CUDA layer with ep_size 1)");
    if (layer->cuda && io->used_token)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "forward_train: used_token is not implemented on the CUDA backend yet (CPU layers "
                                "only)");
    moegen_saved *s = calloc(1, sizeof *s);
    if (!s) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "forward_train: out of memory");
    s->layer = layer;
    moegen_status st = claim(layer, "forward_train", err);
    if (st == MOEGEN_OK) {
        st = check_forward_io(layer, io, err);
        if (st == MOEGEN_OK) {
            if (stats) memset(stats, 0, sizeof *stats);
            if (layer->ep)
                st = moegen_ep_forward_train(layer->ep, &layer->weights, layer->n_threads, io, &s->ep, stats, err);
            else if (layer->cuda)
                st = moegen_cuda_backend_forward_train(layer->cuda, &layer->weights, io, &s->cuda, stats, err);
            else
                st = moegen_cpu_backend_forward_train(layer->cpu, &layer->weights, layer->n_threads, io, &s->cpu,
                                                      stats, err);
        }
        release(layer);
    }
    if (st != MOEGEN_OK) {
        free(s);
        return st;
    }
    *saved = s;
    return MOEGEN_OK;
}

static moegen_status check_saved(const moegen_layer *layer, const moegen_saved *saved, const char *what,
                                 moegen_error *err) {
    if (!layer || !saved)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: layer and saved are required", what);
    if (saved->layer != layer)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "%s: the saved forward belongs to another layer", what);
    return MOEGEN_OK;
}

/* Every gradient buffer is fp32: 4-byte aligned. */
static moegen_status check_grads(const moegen_grads *g, const char *what, moegen_error *err) {
    const float *const all[] = {g->router_w,    g->router_b,        g->w1,         g->b1,        g->w2,
                                g->b2,          g->shared_w1,       g->shared_b1,  g->shared_w2, g->shared_b2,
                                g->shared_gate, g->residual_w1,     g->residual_b1, g->residual_w2, g->residual_b2,
                                g->residual_coef_w, g->residual_coef_b};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if ((uintptr_t)all[i] % sizeof(float) != 0)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "%s: gradient buffer %zu at %p is not aligned to 4 bytes", what, i,
                                    (const void *)all[i]);
    return MOEGEN_OK;
}

moegen_status moegen_layer_backward(moegen_layer *layer, moegen_saved *saved, const moegen_backward_io *bio,
                                    const moegen_grads *grads, moegen_error *err) {
    moegen_status st = check_saved(layer, saved, "backward", err);
    if (st != MOEGEN_OK) return st;
    if (!bio) return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "backward: bio is required");
    const size_t elem = moegen_dtype_size(layer->spec.dtype);
    const int64_t n_tokens = saved->ep     ? moegen_ep_saved_tokens(saved->ep)
                             : saved->cuda ? moegen_cuda_saved_tokens(saved->cuda)
                                           : moegen_cpu_saved_tokens(saved->cpu);
    if (!bio->dy && n_tokens > 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "backward: dy is required");
    if ((uintptr_t)bio->dy % elem != 0 || (uintptr_t)bio->dx % elem != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "backward: dy and dx must be aligned to their %zu-byte elements", elem);
    if (!isfinite(bio->aux_coeff) || !isfinite(bio->z_coeff))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "backward: aux_coeff and z_coeff must be finite (got %g and %g)", bio->aux_coeff,
                                bio->z_coeff);
    if (grads && (st = check_grads(grads, "backward", err)) != MOEGEN_OK) return st;
    if ((st = claim(layer, "backward", err)) != MOEGEN_OK) return st;
    if (saved->ep) st = moegen_ep_backward(layer->ep, saved->ep, layer->n_threads, bio, grads, err);
    else if (saved->cuda) st = moegen_cuda_backend_backward(layer->cuda, saved->cuda, bio, grads, err);
    else st = moegen_cpu_backend_backward(layer->cpu, saved->cpu, layer->n_threads, bio, grads, err);
    release(layer);
    return st;
}

moegen_status moegen_layer_backward_weights(moegen_layer *layer, moegen_saved *saved, const moegen_grads *grads,
                                            moegen_error *err) {
    moegen_status st = check_saved(layer, saved, "backward_weights", err);
    if (st != MOEGEN_OK) return st;
    if (!grads) return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "backward_weights: grads is required");
    if ((st = check_grads(grads, "backward_weights", err)) != MOEGEN_OK) return st;
    if ((st = claim(layer, "backward_weights", err)) != MOEGEN_OK) return st;
    if (saved->ep) st = moegen_ep_backward_weights(layer->ep, saved->ep, layer->n_threads, grads, err);
    else if (saved->cuda) st = moegen_cuda_backend_backward_weights(layer->cuda, saved->cuda, grads, err);
    else st = moegen_cpu_backend_backward_weights(layer->cpu, saved->cpu, layer->n_threads, grads, err);
    release(layer);
    return st;
}

size_t moegen_saved_bytes(const moegen_saved *saved) {
    return saved ? sizeof *saved + moegen_cpu_saved_bytes(saved->cpu) + moegen_ep_saved_bytes(saved->ep) +
                       moegen_cuda_saved_bytes(saved->cuda)
                 : 0;
}

void moegen_saved_free(moegen_saved *saved) {
    if (!saved) return;
    moegen_cpu_saved_free(saved->cpu);
    moegen_ep_saved_free(saved->ep);
    if (saved->cuda) moegen_cuda_saved_free(saved->layer->cuda, saved->cuda);
    free(saved);
}
