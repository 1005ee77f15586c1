/* cpu_backend.c — the CPU backend of a layer (see cpu_backend.h): host-compiled module
 * through the cache, its workspace, and calls into it whole or by stage. */
#define _GNU_SOURCE
#include "cpu_backend.h"

#include "kernel_grads.h"

#include "ep.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "cpu_module.h"
#include "data_dir.h"
#include "emit.h"
#include "host_cc.h"
#include "memory_limit.h"
#include "sha256.h"
#include "tuning_db.h"
#include "variant.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

/* The most variants one layer holds (one per tuned token range). */
#define MAX_VARIANTS MOEGEN_TUNING_MAX_BUCKETS

struct moegen_cpu_backend {
    /* modules[i] runs calls of up to max_tokens[i] tokens (the last one, every larger call) */
    moegen_cpu_module modules[MAX_VARIANTS];
    int64_t max_tokens[MAX_VARIANTS];
    int n_modules;
    const moegen_spec *spec;
    void *workspace;
    size_t workspace_capacity;
    /* expert parallelism: the plan of the last route, and the experts' scratch */
    moegen_kernel_plan plan;
    void *hidden;
    size_t hidden_capacity; /* bytes */
    int keep_activations;   /* training: the forward keeps the pre-activations */
    struct moegen_cpu_saved *training; /* an expert-parallel training forward in progress: its
                                          route and combine stages run in this saved state */
};

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

/* Generate, compile (or fetch from the cache) and load the module of the default variant
 * with `overrides` applied into *module; desc gets its variant, kernel path and cache hit. */
static moegen_status load_module(const moegen_host_compiler *cc, const moegen_spec *spec,
                                 const moegen_open_options *o, const moegen_template_set *templates,
                                 const char *overrides, moegen_cpu_module *module,
                                 moegen_layer_desc *desc, moegen_error *caller_err) {
    moegen_error local;
    moegen_error *err = caller_err ? caller_err : &local; /* its message is reused below */
    moegen_status st;
    moegen_host_compiler compiler = *cc;
    moegen_generated generated;
    moegen_cache cache;
    moegen_cache_result result;
    memset(&result, 0, sizeof result);
    memset(&generated, 0, sizeof generated);

    moegen_target target = moegen_host_compiler_target(&compiler);
    moegen_variant variant;
    moegen_variant_default(spec, MOEGEN_BACKEND_CPU, &target, &variant);
    st = moegen_variant_apply_overrides(&variant, overrides, err);
    if (st == MOEGEN_OK) st = moegen_variant_check(spec, &variant, err);
    if (st == MOEGEN_OK) st = moegen_generate(spec, &variant, templates, &generated, err);
    if (st != MOEGEN_OK) return st;
    snprintf(desc->variant, sizeof desc->variant, "%s", generated.variant_name);

    char key[65];
    module_cache_key(&generated, &compiler, key);
    st = moegen_cache_open(&cache, o->cache_dir, o->log, o->log_user, err);
    build_context build = {&generated, &compiler};
    if (st == MOEGEN_OK) st = moegen_cache_get(&cache, "cpu", key, "module.so", build_module, &build, &result, err);
    const moegen_cpu_module_expect expect = {generated.symbol_prefix, generated.spec_hash, spec->num_experts,
                                             spec->top_k, spec->hidden_size};
    if (st == MOEGEN_OK) {
        desc->cache_hit = result.hit;
        st = moegen_cpu_module_load(result.path, &expect, module, err);
    }
    if (st == MOEGEN_ERR_LOAD && result.hit) {
        /* An entry that passed its manifest but does not load (damaged in a way the hash
         * cannot see, e.g. written by a broken toolchain, or missing symbols): evict it
         * with a warning and build it once more; a second failure is the error. */
        moegen_cache_result_release(&result);
        if (moegen_cache_evict(&cache, "cpu", key, err->message, NULL) == MOEGEN_OK)
            st = moegen_cache_get(&cache, "cpu", key, "module.so", build_module, &build, &result, err);
        if (st == MOEGEN_OK) {
            desc->cache_hit = 0;
            st = moegen_cpu_module_load(result.path, &expect, module, err);
        }
    }
    if (st == MOEGEN_OK) snprintf(desc->kernel_path, sizeof desc->kernel_path, "%s", module->info()->kernel_path);
    moegen_cache_result_release(&result);
    moegen_generated_free(&generated);
    return st;
}

/* ---- Tuning databases (runtime/tuning_db.h) ------------------------------------------------ */

static void warn_tuning(void *ctx, const char *message) {
    const moegen_open_options *o = ctx;
    if (o->log) o->log(o->log_user, MOEGEN_LOG_WARNING, message);
    else fprintf(stderr, "moegen: warning: %s\n", message);
}

/* Append db's buckets to desc->tuning from offset `at`: `open`, then "lo-hi label" for each,
 * separated by "; ", then `close` where it fits. A bucket's label is its variant's name, else
 * its overrides ("default" for none). */
static void describe_buckets(const moegen_tuning_db *db, moegen_layer_desc *desc, int at, const char *open,
                             const char *close) {
    for (int i = 0; i < db->n_buckets && at > 0 && (size_t)at < sizeof desc->tuning; i++) {
        const moegen_tuning_bucket *bk = &db->buckets[i];
        char upper[24];
        if (bk->max_tokens == INT64_MAX) snprintf(upper, sizeof upper, "inf");
        else snprintf(upper, sizeof upper, "%lld", (long long)bk->max_tokens);
        const char *label = bk->variant_name[0] ? bk->variant_name : bk->variant[0] ? bk->variant : "default";
        at += snprintf(desc->tuning + at, sizeof desc->tuning - (size_t)at, "%s%lld-%s %s", i ? "; " : open,
                       (long long)bk->min_tokens, upper, label);
    }
    if (at > 0 && (size_t)at + strlen(close) < sizeof desc->tuning) strcat(desc->tuning, close);
}

/* No database: the default heuristic, which may itself split the token counts into ranges
 * with a variant each (moegen_variant_default_ranges). Returns 1 with *db holding them as
 * buckets when there is more than one, else 0; desc->tuning says so either way. */
static int default_ranges(const moegen_spec *spec, const moegen_host_compiler *cc, const char *family,
                          moegen_tuning_db *db, moegen_layer_desc *desc) {
    const moegen_target target = moegen_host_compiler_target(cc);
    moegen_variant_range ranges[MOEGEN_TUNING_MAX_BUCKETS];
    const int n = moegen_variant_default_ranges(spec, &target, ranges, MOEGEN_TUNING_MAX_BUCKETS);
    const int at = snprintf(desc->tuning, sizeof desc->tuning,
                            "default heuristic (no tuning database for this shape on %s)", family);
    if (n < 2) return 0;
    memset(db, 0, sizeof *db); /* no variant names: the buckets are labelled by their overrides */
    db->n_buckets = n;
    for (int i = 0; i < n; i++) {
        moegen_tuning_bucket *bk = &db->buckets[i];
        bk->min_tokens = ranges[i].min_tokens;
        bk->max_tokens = i + 1 < n ? ranges[i + 1].min_tokens - 1 : INT64_MAX;
        snprintf(bk->variant, sizeof bk->variant, "%s", ranges[i].overrides);
    }
    describe_buckets(db, desc, at, " by token count: ", "");
    return 1;
}

/* The database for this spec on this CPU, if there is one and the layer may use it;
 * desc->tuning says which rung of the ladder was used. Returns 1 with *db filled, else 0. */
static int find_tuning(const moegen_spec *spec, const moegen_open_options *o, const moegen_host_compiler *cc,
                       moegen_tuning_db *db, moegen_layer_desc *desc) {
    if (o->variant && o->variant[0]) {
        snprintf(desc->tuning, sizeof desc->tuning, "explicit variant (open option)");
        return 0;
    }
    if (o->tuning == MOEGEN_TUNING_OFF) {
        snprintf(desc->tuning, sizeof desc->tuning, "default heuristic (tuning off)");
        return 0;
    }
    if (spec->ep_size > 1) {
        snprintf(desc->tuning, sizeof desc->tuning, "default heuristic (expert-parallel layers are not tuned)");
        return 0;
    }
    char shape[256], device[160], family[64], storage[4096], source[1024] = "";
    const char *dirs[8];
    moegen_variant_shape_key(spec, MOEGEN_BACKEND_CPU, shape, sizeof shape);
    moegen_host_compiler_device(cc, device, sizeof device, family, sizeof family);
    char shipped[1024]; /* the databases shipped with moegen (runtime/data_dir.h) */
    const int n_dirs = moegen_tuning_default_dirs(moegen_data_path("tuning", shipped, sizeof shipped) == 0 ? shipped : NULL,
                                                  dirs, 8, storage, sizeof storage);
    moegen_tuning_rung rung = MOEGEN_TUNING_NONE;
    if (moegen_tuning_db_lookup(dirs, n_dirs, shape, device, family, db, &rung, source, sizeof source, warn_tuning,
                                (void *)o) != MOEGEN_OK ||
        rung == MOEGEN_TUNING_NONE || db->n_buckets < 1)
        return default_ranges(spec, cc, family, db, desc);
    const int at = snprintf(desc->tuning, sizeof desc->tuning, "%s: %.300s",
                            rung == MOEGEN_TUNING_EXACT ? "exact" : "family", source);
    describe_buckets(db, desc, at, " (", ")");
    return 1;
}

moegen_status moegen_cpu_backend_open(const moegen_spec *spec, const moegen_open_options *options,
                                      const moegen_template_set *templates, moegen_cpu_backend **out,
                                      moegen_layer_desc *desc, moegen_error *err) {
    *out = NULL;
    moegen_cpu_backend *b = calloc(1, sizeof *b);
    moegen_tuning_db *db = calloc(1, sizeof *db);
    if (!b || !db) {
        free(b);
        free(db);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    b->spec = spec;
    moegen_host_compiler compiler;
    moegen_status st = moegen_host_compiler_probe(&compiler, err);
    if (st == MOEGEN_OK && options->compile_timeout_s > 0)
        compiler.timeout_ms =
            options->compile_timeout_s > INT32_MAX / 1000 ? INT32_MAX : options->compile_timeout_s * 1000;
    if (st == MOEGEN_OK && find_tuning(spec, options, &compiler, db, desc)) {
        /* One module per token range. A variant this moegen refuses (a database from a
         * machine with other instructions, edited by hand) is a warning and the default. */
        for (int i = 0; i < db->n_buckets && st == MOEGEN_OK; i++) {
            moegen_layer_desc one = *desc;
            moegen_error why;
            st = load_module(&compiler, spec, options, templates, db->buckets[i].variant, &b->modules[i], &one,
                             &why);
            if (st == MOEGEN_ERR_INVALID_ARGUMENT) {
                char message[1400];
                snprintf(message, sizeof message, "tuning database variant '%s' for %lld+ tokens is not usable (%s); "
                         "the layer runs the default variant",
                         db->buckets[i].variant, (long long)db->buckets[i].min_tokens, why.message);
                warn_tuning((void *)options, message);
                for (int j = 0; j < i; j++) moegen_cpu_module_unload(&b->modules[j]);
                b->n_modules = 0;
                snprintf(desc->tuning, sizeof desc->tuning, "default heuristic (the tuning database's variants "
                         "are not usable here)");
                st = MOEGEN_OK;
                break;
            }
            if (st != MOEGEN_OK) {
                if (err) *err = why;
                break;
            }
            b->max_tokens[i] = db->buckets[i].max_tokens;
            b->n_modules = i + 1;
            if (i == 0) {
                *desc = one;
            } else {
                desc->cache_hit &= one.cache_hit;
                if (!strstr(desc->kernel_path, one.kernel_path)) { /* the distinct paths, in range order */
                    const size_t used = strlen(desc->kernel_path);
                    snprintf(desc->kernel_path + used, sizeof desc->kernel_path - used, " | %s", one.kernel_path);
                }
            }
        }
        if (b->n_modules > 0) b->max_tokens[b->n_modules - 1] = INT64_MAX;
    }
    b->keep_activations = options->activations == MOEGEN_ACTIVATIONS_KEEP;
    if (st == MOEGEN_OK && b->n_modules == 0) {
        st = load_module(&compiler, spec, options, templates, options->variant, &b->modules[0], desc, err);
        if (st == MOEGEN_OK) {
            b->max_tokens[0] = INT64_MAX;
            b->n_modules = 1;
        }
    }
    free(db);
    desc->n_variants = b->n_modules;
    if (st != MOEGEN_OK) {
        moegen_cpu_backend_close(b);
        return st;
    }
    *out = b;
    return MOEGEN_OK;
}

void moegen_cpu_backend_close(moegen_cpu_backend *b) {
    if (!b) return;
    for (int i = 0; i < b->n_modules; i++) moegen_cpu_module_unload(&b->modules[i]);
    free(b->workspace);
    free(b->hidden);
    free(b);
}

/* The module for a call of n_tokens tokens. */
static const moegen_cpu_module *module_for(const moegen_cpu_backend *b, int64_t n_tokens) {
    int i = 0;
    while (i + 1 < b->n_modules && n_tokens > b->max_tokens[i]) i++;
    return &b->modules[i];
}

/* ---- Calls ----------------------------------------------------------------------------- */

/* Make the workspace hold what n_tokens need (64-byte aligned). A workspace larger than
 * what this process may still allocate (runtime/memory_limit.c) is refused with both
 * sizes, instead of being left to the OOM killer when its pages are touched. */
static moegen_status alloc_within_budget(const char *what, int64_t n_tokens, size_t bytes, void **out,
                                         size_t *rounded_out, moegen_error *err) {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded == 0) rounded = 64;
    moegen_memory_budget budget;
    if (moegen_memory_budget_read(&budget, NULL) == MOEGEN_OK && (uint64_t)rounded > budget.available_bytes) {
        char need[MOEGEN_BYTES_TEXT_BYTES], have[MOEGEN_BYTES_TEXT_BYTES];
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                "%s: %lld tokens need %s; this process can allocate %s more (limited by %s)", what,
                                (long long)n_tokens, moegen_format_bytes(rounded, need, sizeof need),
                                moegen_format_bytes(budget.available_bytes, have, sizeof have), budget.limited_by);
    }
    *out = aligned_alloc(64, rounded);
    if (!*out) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "%s: cannot allocate %zu bytes", what, rounded);
    if (rounded_out) *rounded_out = rounded;
    return MOEGEN_OK;
}

static moegen_status ensure_workspace(moegen_cpu_backend *b, const moegen_cpu_module *module, int64_t n_tokens,
                                     moegen_error *err) {
    size_t bytes = module->workspace_bytes(n_tokens);
    if (n_tokens > 0 && bytes == 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "forward: n_tokens %lld is above this layer's limit", (long long)n_tokens);
    if (bytes <= b->workspace_capacity) return MOEGEN_OK;
    void *fresh;
    size_t rounded;
    moegen_status st = alloc_within_budget("forward workspace", n_tokens, bytes, &fresh, &rounded, err);
    if (st != MOEGEN_OK) return st;
    free(b->workspace);
    b->workspace = fresh;
    b->workspace_capacity = rounded;
    return MOEGEN_OK;
}

static void *saved_workspace(const struct moegen_cpu_saved *s);
static size_t saved_workspace_bytes(const struct moegen_cpu_saved *s);

/* The module's arguments for `io`; `out` receives the outputs. */
static moegen_kernel_args kernel_args(const moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                      const moegen_forward_io *io, moegen_kernel_outputs *out) {
    *out = (moegen_kernel_outputs){
        .y = io->y,
        .topk_ids = io->topk_ids,
        .topk_weights = io->topk_weights,
        .router_weights = io->router_weights,
        .counts_before = io->counts_before,
        .counts_after = io->counts_after,
    };
    return (moegen_kernel_args){
        .abi_version = MOEGEN_KERNEL_ABI_VERSION,
        .n_threads = n_threads,
        .n_tokens = io->n_tokens,
        .rng_offset = io->rng_offset,
        .x = io->x,
        .used_token = io->used_token,
        .w = *w,
        .out = out,
        .workspace = b->training ? saved_workspace(b->training) : b->workspace,
        .workspace_bytes = b->training ? saved_workspace_bytes(b->training) : b->workspace_capacity,
    };
}

static moegen_status kernel_status(int rc, const char *what, moegen_error *err) {
    if (rc == MOEGEN_KERNEL_OK) return MOEGEN_OK;
    return moegen_error_set(err, rc == MOEGEN_KERNEL_EWORKSPACE ? MOEGEN_ERR_NO_MEMORY : MOEGEN_ERR_INVALID_ARGUMENT,
                            rc, "%s: generated module rejected the call (code %d)", what, rc);
}

static void report(const moegen_kernel_outputs *out, moegen_forward_stats *stats) {
    if (!stats) return;
    stats->n_dropped = out->n_dropped;
    stats->capacity = out->capacity;
    stats->aux_loss = out->aux_loss;
    stats->z_loss = out->z_loss;
}

moegen_status moegen_cpu_backend_forward(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                         const moegen_forward_io *io, moegen_forward_stats *stats,
                                         moegen_error *err) {
    const moegen_cpu_module *module = module_for(b, io->n_tokens);
    moegen_status st = ensure_workspace(b, module, io->n_tokens, err);
    if (st != MOEGEN_OK) return st;
    moegen_kernel_outputs out;
    moegen_kernel_args args = kernel_args(b, w, n_threads, io, &out);
    st = kernel_status(module->forward(&args), "forward", err);
    if (st == MOEGEN_OK) report(&out, stats);
    return st;
}

moegen_status moegen_cpu_backend_route(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                       const moegen_forward_io *io, moegen_kernel_plan *plan,
                                       moegen_forward_stats *stats, moegen_error *err) {
    /* EP layers hold one module; a training forward brings its own workspace */
    moegen_status st = b->training ? MOEGEN_OK : ensure_workspace(b, &b->modules[0], io->n_tokens, err);
    if (st != MOEGEN_OK) return st;
    moegen_kernel_outputs out;
    moegen_kernel_args args = kernel_args(b, w, n_threads, io, &out);
    st = kernel_status(b->modules[0].route(&args, plan), "route", err);
    if (st == MOEGEN_OK) report(&out, stats);
    return st;
}

moegen_status moegen_cpu_backend_experts(moegen_cpu_backend *b, const moegen_kernel_expert_args *args,
                                         moegen_error *err) {
    return kernel_status(b->modules[0].experts(args), "experts", err);
}

moegen_status moegen_cpu_backend_combine(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                         const moegen_forward_io *io, moegen_error *err) {
    moegen_kernel_outputs out;
    moegen_kernel_args args = kernel_args(b, w, n_threads, io, &out);
    return kernel_status(b->modules[0].combine(&args), "combine", err);
}

/* ---- Training ---------------------------------------------------------------------------- */

struct moegen_cpu_saved {
    const moegen_cpu_module *module; /* the module that ran the forward runs its backward */
    moegen_kernel_args args;         /* the forward's call: x and used_token point at the copies */
    moegen_kernel_outputs out;       /* (its outputs went to the caller; y is not kept) */
    void *x, *used_token;            /* copies */
    void *workspace;                 /* the forward's workspace: routing, permutation, outputs */
    size_t workspace_bytes;
    void *backward;                  /* the backward's workspace, from the first backward call */
    size_t backward_bytes;
    int data_done;                   /* backward_data ran */
    int kept;                        /* the forward kept its pre-activations in `backward` */
};

static void *saved_workspace(const moegen_cpu_saved *s) { return s->workspace; }
static size_t saved_workspace_bytes(const moegen_cpu_saved *s) { return s->workspace_bytes; }

/* The saved state of a training forward of io on `module`: its workspace, the copies of x and
 * used_token and, when the activations are kept, the backward's workspace; s->args are the
 * forward's arguments (still pointing at io's tensors: saved_seal points them at the copies). */
static moegen_status saved_create(moegen_cpu_backend *b, const moegen_cpu_module *module, const moegen_kernel_weights *w,
                                  int n_threads, const moegen_forward_io *io, int keep, moegen_cpu_saved **out,
                                  moegen_error *err) {
    *out = NULL;
    const int64_t n = io->n_tokens;
    size_t ws = module->workspace_bytes(n);
    if (n > 0 && ws == 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "forward: n_tokens %lld is above this layer's limit", (long long)n);
    moegen_cpu_saved *s = calloc(1, sizeof *s);
    if (!s) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "forward: cannot allocate the saved state");
    s->module = module;
    const size_t x_bytes = (size_t)n * (size_t)b->spec->hidden_size * moegen_dtype_size(b->spec->dtype);
    moegen_status st = alloc_within_budget("training forward: saved state", n, ws, &s->workspace, &s->workspace_bytes,
                                           err);
    if (st == MOEGEN_OK && n > 0) st = alloc_within_budget("training forward: copy of x", n, x_bytes, &s->x, NULL, err);
    if (st == MOEGEN_OK && n > 0 && io->used_token)
        st = alloc_within_budget("training forward: copy of used_token", n, (size_t)n, &s->used_token, NULL, err);
    if (st == MOEGEN_OK && n > 0 && keep) { /* the backward's workspace, now */
        st = alloc_within_budget("training forward: kept activations", n, module->backward_workspace_bytes(n),
                                 &s->backward, &s->backward_bytes, err);
        s->kept = st == MOEGEN_OK;
    }
    if (st != MOEGEN_OK) {
        moegen_cpu_saved_free(s);
        return st;
    }
    if (n > 0) memcpy(s->x, io->x, x_bytes);
    if (s->used_token) memcpy(s->used_token, io->used_token, (size_t)n);
    s->args = kernel_args(b, w, n_threads, io, &s->out);
    s->args.workspace = s->workspace;
    s->args.workspace_bytes = s->workspace_bytes;
    s->args.train_keep = s->kept ? s->backward : NULL;
    *out = s;
    return MOEGEN_OK;
}

/* After the forward: the saved call reads only the copies and the workspace from here on. */
static void saved_seal(moegen_cpu_saved *s) {
    s->args.x = s->x;
    s->args.used_token = s->used_token;
    s->out = (moegen_kernel_outputs){.y = s->workspace}; /* never written again */
    s->args.out = &s->out;
}

moegen_status moegen_cpu_backend_forward_train(moegen_cpu_backend *b, const moegen_kernel_weights *w, int n_threads,
                                               const moegen_forward_io *io, moegen_cpu_saved **saved,
                                               moegen_forward_stats *stats, moegen_error *err) {
    *saved = NULL;
    const moegen_cpu_module *module = module_for(b, io->n_tokens);
    moegen_cpu_saved *s;
    moegen_status st = saved_create(b, module, w, n_threads, io, b->keep_activations, &s, err);
    if (st != MOEGEN_OK) return st;
    st = kernel_status(module->forward(&s->args), "forward", err);
    if (st != MOEGEN_OK) {
        moegen_cpu_saved_free(s);
        return st;
    }
    report(&s->out, stats);
    saved_seal(s);
    *saved = s;
    return MOEGEN_OK;
}

static moegen_kernel_backward_args backward_args(moegen_cpu_saved *s, int n_threads, const moegen_backward_io *bio) {
    s->args.n_threads = n_threads;
    return (moegen_kernel_backward_args){
        .abi_version = MOEGEN_KERNEL_ABI_VERSION,
        .n_threads = n_threads,
        .forward = &s->args,
        .dy = bio ? bio->dy : NULL,
        .dx = bio ? bio->dx : NULL,
        .aux_coeff = bio ? bio->aux_coeff : 0.0,
        .z_coeff = bio ? bio->z_coeff : 0.0,
        .workspace = s->backward,
        .workspace_bytes = s->backward_bytes,
    };
}

moegen_status moegen_cpu_backend_backward(moegen_cpu_backend *b, moegen_cpu_saved *s, int n_threads,
                                          const moegen_backward_io *bio, const moegen_grads *grads,
                                          moegen_error *err) {
    (void)b;
    const int64_t n = s->args.n_tokens;
    if (s->kept && s->data_done)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "backward: this saved forward's kept activations were used by its first backward "
                                "(run moegen_layer_backward_weights for more weight gradients, or open the layer "
                                "with activations recomputed to run the backward again)");
    if (!s->backward) {
        size_t bytes = s->module->backward_workspace_bytes(n);
        moegen_status st = alloc_within_budget("backward workspace", n, bytes, &s->backward, &s->backward_bytes, err);
        if (st != MOEGEN_OK) return st;
    }
    moegen_kernel_backward_args args = backward_args(s, n_threads, bio);
    if (!s->kept) s->data_done = 0;
    int rc = s->module->backward_data(&args);
    if (rc == MOEGEN_KERNEL_ENOMEM)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, rc, "backward: a thread's scratch could not be allocated");
    moegen_status st = kernel_status(rc, "backward", err);
    if (st != MOEGEN_OK) return st;
    s->data_done = 1;
    return grads ? moegen_cpu_backend_backward_weights(b, s, n_threads, grads, err) : MOEGEN_OK;
}

moegen_status moegen_cpu_backend_backward_weights(moegen_cpu_backend *b, moegen_cpu_saved *s, int n_threads,
                                                  const moegen_grads *grads, moegen_error *err) {
    (void)b;
    if (!s->data_done)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "backward_weights: moegen_layer_backward has not run on this saved forward");
    moegen_kernel_backward_args args = backward_args(s, n_threads, NULL);
    args.grads = moegen_kernel_grads_of(grads);
    args.accumulate = grads->accumulate != 0;
    return kernel_status(s->module->backward_weights(&args), "backward_weights", err);
}

size_t moegen_cpu_saved_bytes(const moegen_cpu_saved *s) {
    if (!s) return 0;
    const size_t x_bytes = s->x ? (size_t)s->args.n_tokens * (size_t)s->module->info()->hidden_size *
                                      (s->module->info()->dtype == 0 ? 4u : 2u)
                                : 0;
    return sizeof *s + s->workspace_bytes + x_bytes + (s->used_token ? (size_t)s->args.n_tokens : 0) +
           s->backward_bytes;
}

int64_t moegen_cpu_saved_tokens(const moegen_cpu_saved *s) { return s ? s->args.n_tokens : 0; }

void moegen_cpu_saved_free(moegen_cpu_saved *s) {
    if (!s) return;
    free(s->x);
    free(s->used_token);
    free(s->workspace);
    free(s->backward);
    free(s);
}

/* ---- Expert parallelism: the stages behind runtime/ep.h's moegen_ep_backend ------------------ */

static moegen_status ep_route(void *self, const moegen_kernel_weights *w, int n_threads, const moegen_forward_io *io,
                              int64_t *counts_after, int64_t *expert_offset, moegen_forward_stats *stats,
                              moegen_error *err) {
    moegen_cpu_backend *b = self;
    moegen_status st = moegen_cpu_backend_route(b, w, n_threads, io, &b->plan, stats, err);
    if (st != MOEGEN_OK) return st;
    const int E = b->spec->num_experts;
    memcpy(counts_after, b->plan.counts_after, (size_t)E * sizeof(int64_t));
    memcpy(expert_offset, b->plan.expert_offset, (size_t)(E + 1) * sizeof(int64_t));
    return MOEGEN_OK;
}

static moegen_status ep_pack(void *self, const moegen_forward_io *io, void *rows, float *scales, moegen_error *err) {
    (void)err;
    moegen_cpu_backend *b = self;
    const moegen_kernel_plan *plan = &b->plan;
    const size_t row_bytes = (size_t)b->spec->hidden_size * moegen_dtype_size(b->spec->dtype);
    int64_t at = 0;
    for (int e = 0; e < b->spec->num_experts; e++)
        for (int64_t i = 0; i < plan->counts_after[e]; i++, at++) {
            const int64_t row = plan->expert_offset[e] + i;
            memcpy((char *)rows + at * row_bytes, (const char *)io->x + (int64_t)plan->row_token[row] * row_bytes,
                   row_bytes);
            if (scales) scales[at] = plan->row_scale[row];
        }
    return MOEGEN_OK;
}

static moegen_status ep_experts(void *self, const moegen_kernel_weights *w, int n_threads, int first, int n,
                                const int64_t *local_offset, const void *rows, const float *scales, float *out,
                                moegen_error *err) {
    moegen_cpu_backend *b = self;
    const size_t bytes = MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS(local_offset[n], n, b->spec->hidden_size,
                                                            b->spec->moe_intermediate_size) *
                         moegen_dtype_size(b->spec->dtype);
    if (bytes > b->hidden_capacity) {
        void *fresh = realloc(b->hidden, bytes);
        if (!fresh)
            return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "experts: cannot allocate %zu bytes of scratch",
                                    bytes);
        b->hidden = fresh;
        b->hidden_capacity = bytes;
    }
    moegen_kernel_expert_args args = {
        .abi_version = MOEGEN_KERNEL_ABI_VERSION,
        .n_threads = n_threads,
        .first_expert = first,
        .n_experts = n,
        .expert_offset = local_offset,
        .x = rows,
        .row_scale = scales,
        .w1 = w->w1,
        .b1 = w->b1,
        .w2 = w->w2,
        .b2 = w->b2,
        .hidden = b->hidden,
        .out = out,
    };
    return moegen_cpu_backend_experts(b, &args, err);
}

static moegen_status ep_unpack(void *self, const float *returned, moegen_error *err) {
    (void)err;
    moegen_cpu_backend *b = self;
    const moegen_kernel_plan *plan = &b->plan;
    const size_t out_row = (size_t)b->spec->hidden_size * sizeof(float);
    int64_t at = 0;
    for (int e = 0; e < b->spec->num_experts; e++) {
        const int64_t n = plan->counts_after[e];
        if (n > 0)
            memcpy((char *)plan->expert_out + plan->expert_offset[e] * out_row, (const char *)returned + at * out_row,
                   (size_t)n * out_row);
        at += n;
    }
    return MOEGEN_OK;
}

static moegen_status ep_combine(void *self, const moegen_kernel_weights *w, int n_threads,
                                const moegen_forward_io *io, moegen_forward_stats *stats, moegen_error *err) {
    (void)stats; /* the route stage reported them */
    return moegen_cpu_backend_combine(self, w, n_threads, io, err);
}

/* ---- Expert parallelism, training: the backend's side of runtime/ep.c's backward ----------- */

static moegen_status ep_train_begin(void *self, const moegen_kernel_weights *w, int n_threads,
                                    const moegen_forward_io *io, void **saved, moegen_error *err) {
    moegen_cpu_backend *b = self;
    moegen_cpu_saved *s;
    /* expert parallelism recomputes the activations: the routed experts run on other ranks */
    moegen_status st = saved_create(b, &b->modules[0], w, n_threads, io, 0, &s, err);
    if (st != MOEGEN_OK) return st;
    b->training = s;
    *saved = s;
    return MOEGEN_OK;
}

static void ep_train_end(void *self, void *saved) {
    moegen_cpu_backend *b = self;
    b->training = NULL;
    saved_seal(saved);
}


static moegen_status ep_backward_combine(void *self, void *saved, int n_threads, const moegen_backward_io *bio,
                                         moegen_kernel_backward_plan *plan, moegen_error *err) {
    (void)self;
    moegen_cpu_saved *s = saved;
    const int64_t n = s->args.n_tokens;
    if (!s->backward) {
        moegen_status st = alloc_within_budget("backward workspace", n, s->module->backward_workspace_bytes(n),
                                               &s->backward, &s->backward_bytes, err);
        if (st != MOEGEN_OK) return st;
    }
    s->data_done = 0;
    moegen_kernel_backward_args args = backward_args(s, n_threads, bio);
    return kernel_status(s->module->backward_combine(&args, plan), "backward", err);
}

static moegen_status ep_backward_experts(void *self, const moegen_kernel_expert_backward_args *args, int weights,
                                         moegen_error *err) {
    moegen_cpu_backend *b = self;
    return kernel_status(weights ? b->modules[0].backward_experts_weights(args) : b->modules[0].backward_experts(args),
                         "backward (experts)", err);
}

static moegen_status ep_backward_route(void *self, void *saved, int n_threads, const moegen_backward_io *bio,
                                       moegen_error *err) {
    (void)self;
    moegen_cpu_saved *s = saved;
    moegen_kernel_backward_args args = backward_args(s, n_threads, bio);
    moegen_status st = kernel_status(s->module->backward_route(&args), "backward", err);
    s->data_done = st == MOEGEN_OK;
    return st;
}

static moegen_status ep_backward_weights(void *self, void *saved, int n_threads, const moegen_grads *grads,
                                         moegen_error *err) {
    return moegen_cpu_backend_backward_weights(self, saved, n_threads, grads, err);
}

static void ep_saved_free(void *saved) { moegen_cpu_saved_free(saved); }

static size_t ep_saved_bytes(const void *saved) { return moegen_cpu_saved_bytes(saved); }

void moegen_cpu_backend_ep(moegen_cpu_backend *b, moegen_ep_backend *ops) {
    *ops = (moegen_ep_backend){b,
                               ep_route,
                               ep_pack,
                               ep_experts,
                               ep_unpack,
                               ep_combine,
                               NULL,
                               NULL,
                               ep_train_begin,
                               ep_train_end,
                               ep_backward_combine,
                               ep_backward_experts,
                               ep_backward_route,
                               ep_backward_weights,
                               ep_saved_bytes,
                               ep_saved_free};
}
