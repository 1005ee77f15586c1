/* layer.c — the public layer API (moegen.h): open, bind, forward, close.
 *
 * Place in the pipeline: spec -> gen -> compile -> cache -> [load -> launch].
 * Opening a layer walks the whole pipeline once:
 *   parse + validate the spec (gen/spec.c)
 *   -> pick the default variant for this machine (gen/variant.c)
 *   -> render the templates (gen/emit.c)
 *   -> look the module up in the on-disk cache, compiling it with the host C
 *      compiler on a miss (runtime/cache.c, runtime/host_cc.c)
 *   -> dlopen it and check that it was generated for this spec.
 * Forward then only grows the workspace when the token count needs it and calls the
 * generated function.
 *
 * CUDA layers go through runtime/cuda_backend.c instead of the host compiler and dlopen:
 * NVRTC compiles the generated CUDA, the CUBIN is cached beside the CPU modules, and
 * forward launches the kernels on the caller's stream with device pointers.
 *
 * Invariants owned here: a layer holds no global state; a layer that failed to open
 * is never returned; forward never runs before bind.
 */
#include "moegen.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache.h"
#include "cuda_backend.h"
#include "emit.h"
#include "host_cc.h"
#include "moegen_kernel_abi.h"
#include "sha256.h"
#include "spec.h"
#include "variant.h"

typedef const moegen_kernel_info *(*info_fn)(void);
typedef size_t (*workspace_fn)(int64_t);
typedef int (*forward_fn)(const moegen_kernel_args *);

struct moegen_layer {
    moegen_spec spec;
    moegen_open_options options;
    moegen_layer_desc desc;
    void *module;                  /* dlopen handle */
    info_fn info;
    workspace_fn workspace_bytes;
    forward_fn forward;
    moegen_cuda_backend *cuda;     /* CUDA layers */
    moegen_kernel_weights weights;
    int bound;
    void *workspace;
    size_t workspace_capacity;
};

void moegen_open_options_init(moegen_open_options *opts) {
    memset(opts, 0, sizeof *opts);
    opts->device = MOEGEN_DEVICE_AUTO;
    opts->mode = -1;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- Building the module (the cache's builder callback) ------------------------------ */

typedef struct build_context {
    const moegen_generated *generated;
    const moegen_host_compiler *compiler;
} build_context;

static moegen_status write_file(const char *dir, const char *name, const char *text, size_t len,
                                char *path_out, size_t path_size, moegen_error *err) {
    snprintf(path_out, path_size, "%s/%s", dir, name);
    FILE *f = fopen(path_out, "wb");
    if (!f) return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: cannot create", path_out);
    size_t written = fwrite(text, 1, len, f);
    int closed = fclose(f);
    if (written != len || closed != 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: write failed", path_out);
    return MOEGEN_OK;
}

/* Write the generated files into work_dir and compile the main one into artifact_path;
 * the compiler's output goes to log_path (the cache keeps it if the build fails). */
static moegen_status build_module(void *ctx, const char *work_dir, const char *artifact_path,
                                  const char *log_path, moegen_error *err) {
    const build_context *build = ctx;
    const moegen_generated *gen = build->generated;
    char source_path[PATH_MAX] = "";
    for (int i = 0; i < gen->n_files; i++) {
        char path[PATH_MAX];
        moegen_status st = write_file(work_dir, gen->files[i].name, gen->files[i].text,
                                      gen->files[i].len, path, sizeof path, err);
        if (st != MOEGEN_OK) return st;
        if (i == gen->main_file) snprintf(source_path, sizeof source_path, "%s", path);
    }
    moegen_status st = moegen_host_compile(build->compiler, source_path, artifact_path, log_path, err);
    if (st == MOEGEN_ERR_COMPILE) moegen_generated_annotate(gen, err); /* point at the template */
    return st;
}

/* Cache key: everything that determines the shared object, and nothing else (no
 * paths): generator version, compiler identity, flags and every generated file. */
static void module_cache_key(const moegen_generated *gen, const moegen_host_compiler *cc,
                             char key[65]) {
    moegen_sha256 h;
    moegen_sha256_init(&h);
    const char *parts[] = {"moegen-cpu-module\n", MOEGEN_VERSION, "\n", cc->identity, "\n",
                           cc->flags, "\n"};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        moegen_sha256_update(&h, parts[i], strlen(parts[i]));
    for (int i = 0; i < gen->n_files; i++) {
        moegen_sha256_update(&h, gen->files[i].name, strlen(gen->files[i].name) + 1);
        moegen_sha256_update(&h, gen->files[i].text, gen->files[i].len);
    }
    moegen_sha256_final_hex(&h, key);
}

/* Resolve `prefix_suffix` in the module. */
static void *module_symbol(void *module, const char *prefix, const char *suffix) {
    char name[160];
    snprintf(name, sizeof name, "%s_%s", prefix, suffix);
    return dlsym(module, name);
}

/* Generate, compile (or fetch from the cache) and load the CPU module. */
static moegen_status load_cpu_module(moegen_layer *layer, moegen_error *err) {
    moegen_status st;
    moegen_host_compiler compiler;
    moegen_generated generated;
    moegen_cache cache;
    moegen_cache_result result;
    memset(&result, 0, sizeof result);
    memset(&generated, 0, sizeof generated);

    st = moegen_host_compiler_probe(&compiler, err);
    if (st != MOEGEN_OK) return st;

    moegen_target target = {.cpu_vector_floats = compiler.vector_floats};
    moegen_variant variant;
    moegen_variant_default(&layer->spec, MOEGEN_BACKEND_CPU, &target, &variant);
    st = moegen_generate(&layer->spec, &variant, NULL, &generated, err);
    if (st != MOEGEN_OK) return st;
    snprintf(layer->desc.variant, sizeof layer->desc.variant, "%s", generated.variant_name);

    char key[65];
    module_cache_key(&generated, &compiler, key);
    st = moegen_cache_open(&cache, layer->options.cache_dir, layer->options.log,
                           layer->options.log_user, err);
    if (st == MOEGEN_OK) {
        build_context build = {&generated, &compiler};
        st = moegen_cache_get(&cache, "cpu", key, "module.so", build_module, &build, &result, err);
    }
    if (st == MOEGEN_OK) {
        layer->desc.cache_hit = result.hit;
        /* RTLD_NODELETE: a module stays mapped after its last layer closes. Its OpenMP
         * runtime keeps idle worker threads alive between parallel regions, and
         * unmapping the library under them would crash the process. */
        layer->module = dlopen(result.path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
        if (!layer->module) {
            const char *why = dlerror();
            st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "%s: dlopen failed: %s", result.path,
                                  why ? why : "unknown error");
        }
    }
    if (st == MOEGEN_OK) {
        layer->info = (info_fn)module_symbol(layer->module, generated.symbol_prefix, "info");
        layer->workspace_bytes =
            (workspace_fn)module_symbol(layer->module, generated.symbol_prefix, "workspace_bytes");
        layer->forward = (forward_fn)module_symbol(layer->module, generated.symbol_prefix, "forward");
        if (!layer->info || !layer->workspace_bytes || !layer->forward)
            st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "%s: missing symbols %s_*", result.path,
                                  generated.symbol_prefix);
    }
    if (st == MOEGEN_OK) {
        const moegen_kernel_info *info = layer->info();
        if (info->abi_version != MOEGEN_KERNEL_ABI_VERSION ||
            strcmp(info->spec_hash, generated.spec_hash) != 0 ||
            info->num_experts != layer->spec.num_experts || info->top_k != layer->spec.top_k ||
            info->hidden_size != layer->spec.hidden_size)
            st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0,
                                  "%s: module was generated for another spec or ABI", result.path);
    }
    moegen_cache_result_release(&result);
    moegen_generated_free(&generated);
    return st;
}

/* ---- Open / close ------------------------------------------------------------------------ */

static moegen_status open_parsed(moegen_layer *layer, moegen_error *err) {
    double start = now_ms();
    moegen_spec *spec = &layer->spec;
    if (layer->options.mode == 0 || layer->options.mode == 1)
        spec->mode = layer->options.mode == 0 ? MOEGEN_MODE_TRAIN : MOEGEN_MODE_EVAL;
    else if (layer->options.mode != -1)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "open options: mode must be -1 (from the spec), 0 (train) or 1 (eval)");
    if (spec->ep_size > 1)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "%s: ep_size %d: expert-parallel execution is not implemented yet "
                                "(the spec is valid: moegen check and moegen gen accept it)",
                                spec->name, spec->ep_size);
    moegen_status st;
    switch (layer->options.device) {
    case MOEGEN_DEVICE_AUTO: {
        moegen_error why;
        if (moegen_cuda_backend_available(&why) == MOEGEN_OK) {
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
            st = moegen_cuda_backend_open(spec, layer->options.cuda_device, layer->options.arch, &cache,
                                          &layer->cuda, &layer->desc, err);
    } else {
        st = load_cpu_module(layer, err);
    }
    if (st != MOEGEN_OK) return st;

    moegen_layer_desc *d = &layer->desc;
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
    d->compile_ms = now_ms() - start;
    return MOEGEN_OK;
}

/* Shared tail of the two open functions: `layer` holds a parsed spec. */
static moegen_status finish_open(moegen_layer *layer, const moegen_open_options *opts,
                                 moegen_layer **out, moegen_error *err) {
    if (opts) layer->options = *opts;
    else moegen_open_options_init(&layer->options);
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
    moegen_cuda_backend_close(layer->cuda);
    if (layer->module) dlclose(layer->module);
    free(layer->workspace);
    moegen_spec_free(&layer->spec);
    free(layer);
}

moegen_status moegen_layer_describe(const moegen_layer *layer, moegen_layer_desc *desc) {
    if (!layer || !desc) return MOEGEN_ERR_INVALID_ARGUMENT;
    *desc = layer->desc;
    return MOEGEN_OK;
}

/* ---- Bind / forward ------------------------------------------------------------------------ */

moegen_status moegen_layer_bind(moegen_layer *layer, const moegen_weights *w, moegen_error *err) {
    if (!layer || !w)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "bind: layer and weights are required");
    const moegen_spec *spec = &layer->spec;
    struct {
        const void *pointer;
        int needed;
        const char *name;
    } tensors[] = {
        {w->router_w, 1, "router_w"},
        {w->router_b, spec->router.router_bias, "router_b (router.router_bias)"},
        {w->score_bias, spec->router.score_bias, "score_bias (router.score_bias)"},
        {w->w1, 1, "w1"},
        {w->w2, 1, "w2"},
        {w->b1, spec->expert_bias, "b1 (expert_bias)"},
        {w->b2, spec->expert_bias, "b2 (expert_bias)"},
        {w->shared_w1, spec->shared.count > 0, "shared_w1 (shared_experts)"},
        {w->shared_w2, spec->shared.count > 0, "shared_w2 (shared_experts)"},
        {w->shared_b1, spec->shared.count > 0 && spec->expert_bias, "shared_b1 (expert_bias)"},
        {w->shared_b2, spec->shared.count > 0 && spec->expert_bias, "shared_b2 (expert_bias)"},
        {w->shared_gate, spec->shared.count > 0 && spec->shared.gate, "shared_gate (shared_experts.gate)"},
        {w->residual_w1, spec->use_residual, "residual_w1 (use_residual)"},
        {w->residual_w2, spec->use_residual, "residual_w2 (use_residual)"},
        {w->residual_b1, spec->use_residual && spec->expert_bias, "residual_b1 (expert_bias)"},
        {w->residual_b2, spec->use_residual && spec->expert_bias, "residual_b2 (expert_bias)"},
        {w->residual_coef_w, spec->use_residual, "residual_coef_w (use_residual)"},
        {w->residual_coef_b, spec->use_residual, "residual_coef_b (use_residual)"},
    };
    for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++)
        if (tensors[i].needed && !tensors[i].pointer)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "bind: layer %s needs weight tensor %s", spec->name, tensors[i].name);
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

/* Make the workspace hold at least `bytes` (64-byte aligned). */
static moegen_status ensure_workspace(moegen_layer *layer, size_t bytes, moegen_error *err) {
    if (bytes <= layer->workspace_capacity) return MOEGEN_OK;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *fresh = aligned_alloc(64, rounded);
    if (!fresh)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                "forward: cannot allocate a %zu-byte workspace", rounded);
    free(layer->workspace);
    layer->workspace = fresh;
    layer->workspace_capacity = rounded;
    return MOEGEN_OK;
}

moegen_status moegen_layer_forward(moegen_layer *layer, const moegen_forward_io *io,
                                   moegen_forward_stats *stats, moegen_error *err) {
    if (!layer || !io)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: layer and io are required");
    if (!layer->bound)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0, "forward: no weights bound (call moegen_layer_bind)");
    if (io->n_tokens < 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: n_tokens is negative (%lld)",
                                (long long)io->n_tokens);
    if (io->n_tokens > 0 && (!io->x || !io->y))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "forward: x and y are required");
    if (layer->cuda) return moegen_cuda_backend_forward(layer->cuda, &layer->weights, io, stats, err);
    size_t bytes = layer->workspace_bytes(io->n_tokens);
    if (io->n_tokens > 0 && bytes == 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "forward: n_tokens %lld is above this layer's limit",
                                (long long)io->n_tokens);
    moegen_status st = ensure_workspace(layer, bytes, err);
    if (st != MOEGEN_OK) return st;

    moegen_kernel_outputs out = {
        .y = io->y,
        .topk_ids = io->topk_ids,
        .topk_weights = io->topk_weights,
        .router_weights = io->router_weights,
        .counts_before = io->counts_before,
        .counts_after = io->counts_after,
    };
    moegen_kernel_args args = {
        .abi_version = MOEGEN_KERNEL_ABI_VERSION,
        .n_threads = layer->options.n_threads,
        .n_tokens = io->n_tokens,
        .rng_offset = io->rng_offset,
        .x = io->x,
        .w = layer->weights,
        .out = &out,
        .workspace = layer->workspace,
        .workspace_bytes = layer->workspace_capacity,
    };
    int rc = layer->forward(&args);
    if (rc != MOEGEN_KERNEL_OK)
        return moegen_error_set(err, rc == MOEGEN_KERNEL_EWORKSPACE ? MOEGEN_ERR_NO_MEMORY
                                                                    : MOEGEN_ERR_INVALID_ARGUMENT,
                                rc, "forward: generated module rejected the call (code %d)", rc);
    if (stats) {
        stats->n_dropped = out.n_dropped;
        stats->capacity = out.capacity;
        stats->aux_loss = out.aux_loss;
        stats->z_loss = out.z_loss;
    }
    return MOEGEN_OK;
}
