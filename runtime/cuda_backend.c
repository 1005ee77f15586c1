/* cuda_backend.c — the CUDA backend (see cuda_backend.h).
 *
 * The kernel contract lives in templates/common/moegen_cuda_abi.h: the launch order,
 * every kernel's threads per block and the dynamic shared memory come from there; the
 * tiles from the variant stored in the generated result; which kernels exist from the
 * loaded module (looked up by name). Nothing here re-derives a template's decision.
 * The launch path was last changed on a machine without a GPU: it is compiled and
 * checked against a fake driver (tests/test_cuda_backend.c), and NVRTC compiles the
 * kernels (test_nvrtc), but it was not run there; test_forward_gpu runs it on a GPU.
 */
#include "cuda_backend.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capacity.h"
#include "moegen_cuda_abi.h"
#include "sha256.h"
#include "variant.h"

const char *const moegen_cuda_compile_options[] = {"--std=c++17", "-lineinfo", NULL};

#define MAX_SHAPES 2 /* GEMM kernel pairs a module may have: f<F> and f<Fs> */

/* ---- In-process module cache -------------------------------------------------------------
 * Layers of one spec and architecture in one process (e.g. every MoE layer of a model)
 * share one loaded CUmodule. Entries are keyed by (context, CUBIN cache key), counted
 * by reference, and unloaded with their last layer. The table is process-wide by
 * nature (a module belongs to a context, which is per process); it holds only immutable
 * modules and is guarded by a mutex. */
typedef struct loaded_module {
    struct loaded_module *next;
    moegen_cu_context context;
    char key[65];
    moegen_cu_module module;
    int references;
} loaded_module;

static pthread_mutex_t loaded_modules_lock = PTHREAD_MUTEX_INITIALIZER;
static loaded_module *loaded_modules;

/* A module already loaded for (context, key), with one more reference; NULL if none. */
static moegen_cu_module module_acquire(moegen_cu_context context, const char *key) {
    moegen_cu_module module = NULL;
    pthread_mutex_lock(&loaded_modules_lock);
    for (loaded_module *m = loaded_modules; m; m = m->next)
        if (m->context == context && !strcmp(m->key, key)) {
            m->references++;
            module = m->module;
            break;
        }
    pthread_mutex_unlock(&loaded_modules_lock);
    return module;
}

/* Register a freshly loaded module. If another thread registered the same key first,
 * returns theirs (with a reference) and *duplicate is set so the caller unloads its own. */
static moegen_cu_module module_register(moegen_cu_context context, const char *key, moegen_cu_module module,
                                        int *duplicate) {
    *duplicate = 0;
    pthread_mutex_lock(&loaded_modules_lock);
    for (loaded_module *m = loaded_modules; m; m = m->next)
        if (m->context == context && !strcmp(m->key, key)) {
            m->references++;
            *duplicate = 1;
            module = m->module;
            pthread_mutex_unlock(&loaded_modules_lock);
            return module;
        }
    loaded_module *entry = calloc(1, sizeof *entry);
    if (entry) { /* without an entry the module is simply not shared */
        entry->context = context;
        snprintf(entry->key, sizeof entry->key, "%s", key);
        entry->module = module;
        entry->references = 1;
        entry->next = loaded_modules;
        loaded_modules = entry;
    }
    pthread_mutex_unlock(&loaded_modules_lock);
    return module;
}

/* Drop a reference; returns 1 when the caller must unload the module (last reference,
 * or a module that was never registered). */
static int module_release(moegen_cu_module module) {
    int unload = 1;
    pthread_mutex_lock(&loaded_modules_lock);
    for (loaded_module **link = &loaded_modules; *link; link = &(*link)->next)
        if ((*link)->module == module) {
            loaded_module *m = *link;
            unload = --m->references == 0;
            if (unload) {
                *link = m->next;
                free(m);
            }
            break;
        }
    pthread_mutex_unlock(&loaded_modules_lock);
    return unload;
}

struct moegen_cuda_backend {
    const moegen_spec *spec;
    moegen_cuda cu;
    moegen_cu_device device;
    moegen_cu_context context;
    moegen_cuda_device info;
    moegen_cu_module module;
    moegen_cu_function router, dispatch_count, dispatch_rank, dispatch_place, combine, losses;
    struct {
        int64_t ffn;
        moegen_cu_function gemm1, gemm2;
    } shapes[MAX_SHAPES]; /* the GEMM pair of each ffn size a problem group uses */
    int n_shapes;
    int group_shape[3];   /* index in shapes of each problem group's pair (-1: no problems) */
    moegen_cuda_variant variant; /* from moegen_generated.variant: what the module was rendered with */
    moegen_cu_device_pointer workspace;
    size_t workspace_bytes;
};

/* ---- Generation and compilation ---------------------------------------------------------- */

moegen_status moegen_cuda_generate(const moegen_spec *spec, const char *arch, moegen_generated *out,
                                   moegen_error *err) {
    memset(out, 0, sizeof *out); /* nothing to free on failure */
    moegen_cuda_arch parsed;
    moegen_status st = moegen_cuda_arch_parse(arch, &parsed, err);
    if (st != MOEGEN_OK) return st;
    moegen_target target = {.cuda_sm = parsed.sm};
    moegen_variant variant;
    moegen_variant_default(spec, MOEGEN_BACKEND_CUDA, &target, &variant);
    return moegen_generate(spec, &variant, NULL, out, err);
}

moegen_status moegen_cuda_compile_generated(const moegen_nvrtc *nv, const moegen_generated *gen,
                                            const char *arch, moegen_nvrtc_output *out,
                                            moegen_error *err) {
    moegen_nvrtc_header headers[MOEGEN_MAX_GENERATED_FILES];
    int n_headers = 0;
    for (int i = 0; i < gen->n_files; i++)
        if (i != gen->main_file) {
            headers[n_headers].name = gen->files[i].name;
            headers[n_headers].text = gen->files[i].text;
            n_headers++;
        }
    int n_options = 0;
    while (moegen_cuda_compile_options[n_options]) n_options++;
    return moegen_nvrtc_compile(nv, gen->files[gen->main_file].name, gen->files[gen->main_file].text,
                                headers, n_headers, arch, moegen_cuda_compile_options, n_options, out, err);
}

typedef struct cubin_build {
    const moegen_generated *generated;
    const char *arch;
} cubin_build;

/* Cache builder: compile with NVRTC and write the CUBIN. NVRTC's log goes to log_path
 * (the cache keeps it if the build fails) and a failed compile's message names it. */
static moegen_status build_cubin(void *ctx, const char *work_dir, const char *artifact_path,
                                 const char *log_path, moegen_error *err) {
    (void)work_dir;
    const cubin_build *build = ctx;
    moegen_nvrtc nv;
    moegen_status st = moegen_nvrtc_open(&nv, err);
    if (st != MOEGEN_OK) return st;
    moegen_nvrtc_output out;
    memset(&out, 0, sizeof out);
    st = moegen_cuda_compile_generated(&nv, build->generated, build->arch, &out, err);
    if (st == MOEGEN_ERR_COMPILE) moegen_generated_annotate(build->generated, err); /* a generator bug */
    FILE *log_file = out.log ? fopen(log_path, "wb") : NULL;
    int log_written = log_file && fputs(out.log, log_file) >= 0;
    if (log_file && fclose(log_file) != 0) log_written = 0;
    if (st != MOEGEN_OK && log_written && err) {
        char note[PATH_MAX + 32];
        size_t used = strlen(err->message);
        size_t length = (size_t)snprintf(note, sizeof note, " (full log: %s)", log_path);
        if (length < sizeof err->message) { /* the path must show, even if the excerpt is cut */
            if (used > sizeof err->message - 1 - length) used = sizeof err->message - 1 - length;
            memcpy(err->message + used, note, length + 1);
        }
    }
    if (st == MOEGEN_OK) {
        FILE *f = fopen(artifact_path, "wb");
        if (!f || fwrite(out.cubin, 1, out.cubin_size, f) != out.cubin_size)
            st = moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: cannot write the CUBIN", artifact_path);
        if (f && fclose(f) != 0 && st == MOEGEN_OK)
            st = moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: cannot write the CUBIN", artifact_path);
    }
    moegen_nvrtc_output_free(&out);
    moegen_nvrtc_close(&nv);
    return st;
}

/* Key over everything that decides the CUBIN. */
static void cubin_cache_key(const moegen_generated *gen, const char *arch, int nvrtc_major,
                            int nvrtc_minor, char key[65]) {
    moegen_sha256 h;
    moegen_sha256_init(&h);
    char facts[256];
    snprintf(facts, sizeof facts, "moegen-cuda-module\n%s\nnvrtc %d.%d\n%s\n", MOEGEN_VERSION,
             nvrtc_major, nvrtc_minor, arch);
    moegen_sha256_update(&h, facts, strlen(facts));
    for (int i = 0; moegen_cuda_compile_options[i]; i++)
        moegen_sha256_update(&h, moegen_cuda_compile_options[i], strlen(moegen_cuda_compile_options[i]) + 1);
    for (int i = 0; i < gen->n_files; i++) {
        moegen_sha256_update(&h, gen->files[i].name, strlen(gen->files[i].name) + 1);
        moegen_sha256_update(&h, gen->files[i].text, gen->files[i].len);
    }
    moegen_sha256_final_hex(&h, key);
}

static moegen_status read_whole_file(const char *path, void **data, size_t *size, moegen_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: cannot open", path);
    fseek(f, 0, SEEK_END);
    long length = ftell(f);
    fseek(f, 0, SEEK_SET);
    *data = length > 0 ? malloc((size_t)length) : NULL;
    size_t got = *data ? fread(*data, 1, (size_t)length, f) : 0;
    fclose(f);
    if (!*data || got != (size_t)length) {
        free(*data);
        *data = NULL;
        return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: cannot read", path);
    }
    *size = (size_t)length;
    return MOEGEN_OK;
}

/* ---- Open / close ------------------------------------------------------------------------ */

moegen_status moegen_cuda_backend_available(moegen_error *err) {
    moegen_cuda cu;
    moegen_status st = moegen_cuda_open(&cu, err);
    if (st == MOEGEN_OK) moegen_cuda_close(&cu);
    return st;
}

#define CHECK(call, what)                                                   \
    do {                                                                    \
        if (st == MOEGEN_OK) st = moegen_cuda_check(&b->cu, (call), what, err); \
    } while (0)

/* Which kernels a module has is the templates' decision alone: every kernel is looked up by
 * name. A required kernel the module lacks is MOEGEN_ERR_LOAD; an optional one
 * (moegen_cuda_abi.h: P_dispatch_rank) that cuModuleGetFunction does not find leaves *out
 * NULL, and the forward does not launch it. */
enum { KERNEL_REQUIRED = 0, KERNEL_OPTIONAL = 1 };

static moegen_status get_function(moegen_cuda_backend *b, const char *prefix, const char *suffix, int optional,
                                  moegen_cu_function *out, moegen_error *err) {
    char name[192];
    snprintf(name, sizeof name, "%s_%s", prefix, suffix);
    moegen_cu_result r = b->cu.cuModuleGetFunction(out, b->module, name);
    if (r != MOEGEN_CUDA_SUCCESS) *out = NULL;
    if (r == MOEGEN_CUDA_ERROR_NOT_FOUND && optional) return MOEGEN_OK;
    if (r == MOEGEN_CUDA_ERROR_NOT_FOUND)
        return moegen_error_set(err, MOEGEN_ERR_LOAD, r,
                                "the CUDA module has no kernel %s, which moegen_cuda_abi.h requires (a "
                                "generator bug)",
                                name);
    return moegen_cuda_check(&b->cu, r, name, err);
}

/* The problem groups of the grouped GEMM launches, in the layout of the problem table
 * (moegen_cuda_abi.h: routed [0, E), shared [E, E + Ns), residual E + Ns). A group with
 * count 0 is not launched. */
typedef struct problem_group {
    int group, first, count;
    int64_t ffn; /* its GEMM kernels are P_f<ffn>_gemm1 / _gemm2 */
} problem_group;

static void problem_groups(const moegen_spec *spec, problem_group groups[3]) {
    const int E = spec->num_experts, Ns = spec->shared.count;
    groups[0] = (problem_group){MOEGEN_GROUP_ROUTED, 0, E, spec->moe_intermediate_size};
    groups[1] = (problem_group){MOEGEN_GROUP_SHARED, E, Ns, Ns > 0 ? spec->shared.intermediate_size : 0};
    groups[2] = (problem_group){MOEGEN_GROUP_RESIDUAL, E + Ns, spec->use_residual ? 1 : 0,
                                spec->moe_intermediate_size};
}

/* Index in b->shapes of the GEMM pair for `ffn`, looking it up in the module the first
 * time; -1 with `err` set when the module lacks it. */
static int find_shape(moegen_cuda_backend *b, const char *prefix, int64_t ffn, moegen_status *st,
                      moegen_error *err) {
    for (int i = 0; i < b->n_shapes; i++)
        if (b->shapes[i].ffn == ffn) return i;
    if (b->n_shapes == MAX_SHAPES) {
        *st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "more than %d GEMM shapes in one layer", MAX_SHAPES);
        return -1;
    }
    const int i = b->n_shapes;
    char suffix[64];
    snprintf(suffix, sizeof suffix, "f%lld_gemm1", (long long)ffn);
    *st = get_function(b, prefix, suffix, KERNEL_REQUIRED, &b->shapes[i].gemm1, err);
    snprintf(suffix, sizeof suffix, "f%lld_gemm2", (long long)ffn);
    if (*st == MOEGEN_OK) *st = get_function(b, prefix, suffix, KERNEL_REQUIRED, &b->shapes[i].gemm2, err);
    if (*st != MOEGEN_OK) return -1;
    b->shapes[i].ffn = ffn;
    b->n_shapes++;
    return i;
}

moegen_status moegen_cuda_backend_open(const moegen_spec *spec, int ordinal, const char *arch,
                                       moegen_cache *cache, moegen_cuda_backend **out,
                                       moegen_layer_desc *desc, moegen_error *err) {
    *out = NULL;
    moegen_cuda_backend *b = calloc(1, sizeof *b);
    if (!b) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    b->spec = spec;
    moegen_generated generated;
    memset(&generated, 0, sizeof generated);
    moegen_cache_result cached;
    memset(&cached, 0, sizeof cached);
    void *cubin = NULL;
    size_t cubin_size = 0;

    moegen_status st = moegen_cuda_open(&b->cu, err);
    if (st == MOEGEN_OK) st = moegen_cuda_device_info(&b->cu, ordinal, &b->info, err);
    CHECK(b->cu.cuDeviceGet(&b->device, ordinal), "cuDeviceGet");
    CHECK(b->cu.cuDevicePrimaryCtxRetain(&b->context, b->device), "cuDevicePrimaryCtxRetain");
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st == MOEGEN_OK && !arch) arch = b->info.arch;
    if (st == MOEGEN_OK && (b->info.major < 8))
        st = moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                              "%s is compute capability %d.%d; the CUDA backend needs 8.0 or newer",
                              b->info.name, b->info.major, b->info.minor);
    if (st == MOEGEN_OK) st = moegen_cuda_generate(spec, arch, &generated, err);

    moegen_nvrtc nv;
    memset(&nv, 0, sizeof nv);
    char key[65] = "";
    int shared_module = 0;
    if (st == MOEGEN_OK) st = moegen_nvrtc_open(&nv, err);
    if (st == MOEGEN_OK) {
        cubin_cache_key(&generated, arch, nv.version_major, nv.version_minor, key);
        b->module = module_acquire(b->context, key); /* loaded by another layer already? */
        shared_module = b->module != NULL;
    }
    if (st == MOEGEN_OK && !shared_module) {
        cubin_build build = {&generated, arch};
        st = moegen_cache_get(cache, "cuda", key, "module.cubin", build_cubin, &build, &cached, err);
    }
    moegen_nvrtc_close(&nv);
    if (st == MOEGEN_OK && !shared_module) {
        st = read_whole_file(cached.path, &cubin, &cubin_size, err);
        CHECK(b->cu.cuModuleLoadData(&b->module, cubin), "cuModuleLoadData");
        if (st == MOEGEN_OK) {
            int duplicate;
            moegen_cu_module mine = b->module;
            b->module = module_register(b->context, key, mine, &duplicate);
            if (duplicate) b->cu.cuModuleUnload(mine);
        }
    }
    const char *prefix = generated.symbol_prefix;
    if (st == MOEGEN_OK) st = get_function(b, prefix, "router", KERNEL_REQUIRED, &b->router, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "dispatch_count", KERNEL_REQUIRED, &b->dispatch_count, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "dispatch_rank", KERNEL_OPTIONAL, &b->dispatch_rank, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "dispatch_place", KERNEL_REQUIRED, &b->dispatch_place, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "combine", KERNEL_REQUIRED, &b->combine, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "losses", KERNEL_REQUIRED, &b->losses, err);
    if (st == MOEGEN_OK) {
        problem_group groups[3];
        problem_groups(spec, groups);
        for (int g = 0; g < 3 && st == MOEGEN_OK; g++)
            b->group_shape[g] = groups[g].count > 0 ? find_shape(b, prefix, groups[g].ffn, &st, err) : -1;
    }
    if (st == MOEGEN_OK) {
        b->variant = generated.variant.cuda;
        snprintf(desc->variant, sizeof desc->variant, "%s", generated.variant_name);
        desc->cache_hit = shared_module || cached.hit;
    }
    free(cubin);
    moegen_cache_result_release(&cached);
    moegen_generated_free(&generated);
    if (st != MOEGEN_OK) {
        moegen_cuda_backend_close(b);
        return st;
    }
    *out = b;
    return MOEGEN_OK;
}

void moegen_cuda_backend_close(moegen_cuda_backend *b) {
    if (!b) return;
    if (b->cu.library) {
        if (b->context) b->cu.cuCtxSetCurrent(b->context);
        if (b->workspace) b->cu.cuMemFree(b->workspace);
        if (b->module && module_release(b->module)) b->cu.cuModuleUnload(b->module);
        if (b->context) b->cu.cuDevicePrimaryCtxRelease(b->device);
        moegen_cuda_close(&b->cu);
    }
    free(b);
}

/* ---- Workspace ---------------------------------------------------------------------------- */

typedef struct device_layout {
    size_t logits, aux_probs, aux_counts, lse_squared, route_expert, route_weight, route_valid;
    size_t route_kept, route_bucket, expert_count, expert_kept, bucket_offset, expert_offset;
    size_t row_token, row_scale, route_row, route_final, problems, group_tiles;
    size_t hidden, expert_out, shared_hidden, shared_out, residual_hidden, residual_out, stats;
    size_t total;
} device_layout;

static device_layout layout_for(const moegen_spec *spec, int64_t S, int64_t max_rows) {
    device_layout L;
    memset(&L, 0, sizeof L);
    const size_t E = (size_t)spec->num_experts, routes = (size_t)S * spec->top_k;
    const size_t elem = moegen_dtype_size(spec->dtype);
    const size_t H = (size_t)spec->hidden_size, F = (size_t)spec->moe_intermediate_size;
    const size_t Ns = (size_t)spec->shared.count, Fs = Ns ? (size_t)spec->shared.intermediate_size : 0;
    const size_t rows = (size_t)max_rows, tokens = (size_t)S;
    const size_t residual = spec->use_residual ? 1 : 0;
    size_t offset = 0;
#define CARVE(field, bytes) (L.field = offset, offset += ((size_t)(bytes) + 255) & ~(size_t)255)
    CARVE(logits, tokens * E * 4);
    CARVE(aux_probs, spec->router.aux_loss != MOEGEN_AUX_NONE ? tokens * E * 4 : 4);
    CARVE(aux_counts, E * 4);
    CARVE(lse_squared, tokens * 8);
    CARVE(route_expert, routes * 4);
    CARVE(route_weight, routes * 4);
    CARVE(route_valid, routes);
    CARVE(route_kept, routes);
    CARVE(route_bucket, routes * 4);
    CARVE(expert_count, E * 8);
    CARVE(expert_kept, E * 8);
    CARVE(bucket_offset, (E + 1) * 8);
    CARVE(expert_offset, (E + 1) * 8);
    CARVE(row_token, rows * 4);
    CARVE(row_scale, rows * 4);
    CARVE(route_row, routes * 4);
    CARVE(route_final, routes * 4);
    CARVE(problems, (E + Ns + 1) * sizeof(moegen_cuda_problem));
    CARVE(group_tiles, 3 * 4);
    CARVE(hidden, rows * F * elem);
    CARVE(expert_out, rows * H * 4);
    CARVE(shared_hidden, Ns * tokens * Fs * elem);
    CARVE(shared_out, Ns * tokens * H * 4);
    CARVE(residual_hidden, residual * tokens * F * elem);
    CARVE(residual_out, residual * tokens * H * 4);
    CARVE(stats, 3 * 8);
#undef CARVE
    L.total = offset;
    return L;
}

static moegen_status ensure_workspace(moegen_cuda_backend *b, size_t bytes, moegen_error *err) {
    if (bytes <= b->workspace_bytes) return MOEGEN_OK;
    moegen_status st = MOEGEN_OK;
    CHECK(b->cu.cuCtxSynchronize(), "cuCtxSynchronize");
    if (st == MOEGEN_OK && b->workspace) {
        b->cu.cuMemFree(b->workspace);
        b->workspace = 0;
        b->workspace_bytes = 0;
    }
    if (st != MOEGEN_OK) return st;
    moegen_cu_result r = b->cu.cuMemAlloc(&b->workspace, bytes);
    if (r != 0) {
        char text[256];
        b->workspace = 0;
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, r, "cannot allocate a %zu-byte device workspace: %s",
                                bytes, moegen_cuda_error_text(&b->cu, r, text, sizeof text));
    }
    b->workspace_bytes = bytes;
    return MOEGEN_OK;
}

/* ---- Forward --------------------------------------------------------------------------------- */

static moegen_status launch(moegen_cuda_backend *b, moegen_cu_function f, const char *what,
                            unsigned grid_x, unsigned grid_y, unsigned threads, moegen_cu_stream stream,
                            void **params, moegen_error *err) {
    if (grid_x == 0 || grid_y == 0) return MOEGEN_OK; /* never a zero-size grid */
    moegen_cu_result r = b->cu.cuLaunchKernel(f, grid_x, grid_y, 1, threads, 1, 1, MOEGEN_CUDA_DYNAMIC_SHARED_BYTES,
                                              stream, params, NULL);
    return moegen_cuda_check(&b->cu, r, what, err);
}

static unsigned ceil_div(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

moegen_status moegen_cuda_backend_forward(moegen_cuda_backend *b, const moegen_kernel_weights *w,
                                          const moegen_forward_io *io, moegen_forward_stats *stats,
                                          moegen_error *err) {
    const moegen_spec *spec = b->spec;
    const int64_t S = io->n_tokens, E = spec->num_experts, K = spec->top_k;
    moegen_status st = MOEGEN_OK;
    moegen_cu_stream stream = (moegen_cu_stream)io->stream;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st != MOEGEN_OK) return st;
    const int64_t capacity = moegen_spec_capacity(spec, S);
    const int64_t max_rows = moegen_spec_max_rows(spec, S);
    if (S > INT32_MAX / K || max_rows > INT32_MAX)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "forward: %lld tokens exceed the int32 row indices of this layer", (long long)S);
    if (S == 0) { /* nothing to launch: empty counts, zero statistics */
        if (io->counts_before) CHECK(b->cu.cuMemsetD8Async((moegen_cu_device_pointer)(uintptr_t)io->counts_before, 0, (size_t)E * 8, stream), "cuMemsetD8Async");
        if (io->counts_after) CHECK(b->cu.cuMemsetD8Async((moegen_cu_device_pointer)(uintptr_t)io->counts_after, 0, (size_t)E * 8, stream), "cuMemsetD8Async");
        if (stats) {
            stats->n_dropped = 0;
            stats->capacity = capacity;
            stats->aux_loss = stats->z_loss = 0.0;
        }
        return st;
    }
    const device_layout L = layout_for(spec, S, max_rows);
    st = ensure_workspace(b, L.total, err);
    if (st != MOEGEN_OK) return st;

    char *base = (char *)(uintptr_t)b->workspace;
    moegen_cuda_args a;
    memset(&a, 0, sizeof a);
    a.n_tokens = S;
    a.capacity = capacity;
    a.max_rows = max_rows;
    a.rng_offset = io->rng_offset;
    a.x = io->x;
    a.w = *w;
    a.y = io->y;
    a.topk_ids = io->topk_ids;
    a.topk_weights = io->topk_weights;
    a.router_weights = io->router_weights;
    a.counts_before = (long long *)io->counts_before;
    a.counts_after = (long long *)io->counts_after;
    a.stat_dropped = (long long *)(base + L.stats);
    a.stat_aux_loss = (double *)(base + L.stats + 8);
    a.stat_z_loss = (double *)(base + L.stats + 16);
    a.logits = (float *)(base + L.logits);
    a.aux_probs = (float *)(base + L.aux_probs);
    a.aux_counts = (int *)(base + L.aux_counts);
    a.lse_squared = (double *)(base + L.lse_squared);
    a.route_expert = (int *)(base + L.route_expert);
    a.route_weight = (float *)(base + L.route_weight);
    a.route_valid = (unsigned char *)(base + L.route_valid);
    a.route_kept = (unsigned char *)(base + L.route_kept);
    a.route_bucket = (int *)(base + L.route_bucket);
    a.expert_count = (long long *)(base + L.expert_count);
    a.expert_kept = (long long *)(base + L.expert_kept);
    a.bucket_offset = (long long *)(base + L.bucket_offset);
    a.expert_offset = (long long *)(base + L.expert_offset);
    a.row_token = (int *)(base + L.row_token);
    a.row_scale = (float *)(base + L.row_scale);
    a.route_row = (int *)(base + L.route_row);
    a.route_final = (float *)(base + L.route_final);
    a.problems = (moegen_cuda_problem *)(base + L.problems);
    a.group_tiles = (int *)(base + L.group_tiles);
    a.hidden = base + L.hidden;
    a.expert_out = (float *)(base + L.expert_out);
    a.shared_hidden = base + L.shared_hidden;
    a.shared_out = (float *)(base + L.shared_out);
    a.residual_hidden = base + L.residual_hidden;
    a.residual_out = (float *)(base + L.residual_out);

    void *args_only[] = {&a};
    const moegen_cuda_variant *v = &b->variant;
    CHECK(b->cu.cuMemsetD32Async((moegen_cu_device_pointer)(uintptr_t)a.aux_counts, 0, (size_t)E, stream),
          "cuMemsetD32Async");
    /* Threads per block: moegen_cuda_abi.h, the one home of each number (the kernels'
     * __launch_bounds__ use the same macros); tiles: the variant the module was rendered with. */
    if (st == MOEGEN_OK)
        st = launch(b, b->router, "router", ceil_div(S, v->router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS, stream,
                    args_only, err);
    if (st == MOEGEN_OK)
        st = launch(b, b->dispatch_count, "dispatch_count", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, stream, args_only, err);
    if (st == MOEGEN_OK && b->dispatch_rank) /* only modules whose priority ranks routes have it */
        st = launch(b, b->dispatch_rank, "dispatch_rank", ceil_div(S * K, MOEGEN_CUDA_RANK_THREADS), 1,
                    MOEGEN_CUDA_RANK_THREADS, stream, args_only, err);
    if (st == MOEGEN_OK)
        st = launch(b, b->dispatch_place, "dispatch_place", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, stream, args_only, err);

    /* Grouped GEMMs: routed experts, shared experts, residual MLP. m-tile bounds: a group
     * never uses more than these (routed: sum of ceil(rows_e / TILE_M) <= rows / TILE_M + E). */
    const unsigned threads = MOEGEN_CUDA_GEMM_THREADS((unsigned)v->warps_m, (unsigned)v->warps_n);
    problem_group groups[3];
    problem_groups(spec, groups);
    const unsigned m_tiles[3] = {
        ceil_div(max_rows, v->tile_m) + (unsigned)E,
        (unsigned)spec->shared.count * ceil_div(S, v->tile_m),
        spec->use_residual ? ceil_div(S, v->tile_m) : 0,
    };
    for (int g = 0; g < 3 && st == MOEGEN_OK; g++) {
        if (b->group_shape[g] < 0) continue; /* no problems in this group */
        const int shape = b->group_shape[g];
        void *params[] = {&a, &groups[g].group, &groups[g].first, &groups[g].count};
        st = launch(b, b->shapes[shape].gemm1, "gemm1", m_tiles[g], ceil_div(groups[g].ffn, v->tile_n), threads,
                    stream, params, err);
        if (st == MOEGEN_OK)
            st = launch(b, b->shapes[shape].gemm2, "gemm2", m_tiles[g], ceil_div(spec->hidden_size, v->tile_n),
                        threads, stream, params, err);
    }
    if (st == MOEGEN_OK)
        st = launch(b, b->combine, "combine", (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS, stream, args_only, err);
    if (st == MOEGEN_OK)
        st = launch(b, b->losses, "losses", 1, 1, MOEGEN_CUDA_LOSS_THREADS, stream, args_only, err);
    if (st == MOEGEN_OK && stats) {
        unsigned char host[24];
        CHECK(b->cu.cuMemcpyDtoHAsync(host, (moegen_cu_device_pointer)(uintptr_t)(base + L.stats), sizeof host, stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuStreamSynchronize(stream), "cuStreamSynchronize");
        if (st == MOEGEN_OK) {
            long long dropped;
            memcpy(&dropped, host, 8);
            memcpy(&stats->aux_loss, host + 8, 8);
            memcpy(&stats->z_loss, host + 16, 8);
            stats->n_dropped = dropped;
            stats->capacity = capacity;
        }
    }
    return st;
}
