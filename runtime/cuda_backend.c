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

#include "ep.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capacity.h"
#include "kernel_grads.h"
#include "moegen_cuda_abi.h"
#include "moegen_cuda_launch.h"
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
    moegen_cu_function router, dispatch_count, dispatch_rank, dispatch_place, combine, losses, ep_pack;
    moegen_cu_function bwd_combine, bwd_tokens, bwd_dense; /* the training backward */
    struct {
        int64_t ffn;
        moegen_cu_function gemm1, gemm2;
        moegen_cu_function bwd[4]; /* bwd_pre, bwd_dh, bwd_du, bwd_weights */
    } shapes[MAX_SHAPES]; /* the kernels of each ffn size a problem group uses */
    int n_shapes;
    int group_shape[3];   /* index in shapes of each problem group's pair (-1: no problems) */
    moegen_cuda_variant variant; /* from moegen_generated.variant: what the module was rendered with */
    moegen_cuda_layer layer;     /* the layout and launch steps' view of the layer (moegen_cuda_launch.h) */
    moegen_cu_device_pointer workspace;
    size_t workspace_bytes;
    /* expert parallelism (host-staged): the arguments of the call in progress between its
     * route and combine stages, the permutation's counts on the host, device scratch */
    moegen_cuda_args ep_args;
    moegen_cu_stream ep_stream;
    int64_t *ep_counts, *ep_offsets; /* [E], [E + 1] */
    int32_t *ep_list;                /* host: rows to pack / identity rows */
    size_t ep_list_capacity;         /* int32 items */
    moegen_cu_device_pointer ep_scratch;
    size_t ep_scratch_bytes;
};

/* ---- Generation and compilation ---------------------------------------------------------- */

moegen_status moegen_cuda_generate(const moegen_spec *spec, const char *arch, const char *overrides,
                                   const moegen_template_set *templates, moegen_generated *out,
                                   moegen_error *err) {
    memset(out, 0, sizeof *out); /* nothing to free on failure */
    moegen_cuda_arch parsed;
    moegen_status st = moegen_cuda_arch_parse(arch, &parsed, err);
    if (st != MOEGEN_OK) return st;
    moegen_target target = {.cuda_sm = parsed.sm};
    moegen_variant variant;
    moegen_variant_default(spec, MOEGEN_BACKEND_CUDA, &target, &variant);
    st = moegen_variant_apply_overrides(&variant, overrides, err);
    if (st == MOEGEN_OK && variant.cuda.sm != parsed.sm)
        st = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                              "variant override sm=%d: the architecture is %s (set it with the arch option)",
                              variant.cuda.sm, arch);
    return st == MOEGEN_OK ? moegen_generate(spec, &variant, templates, out, err) : st;
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

/* The layer as moegen_cuda_launch.h sees it: the spec's sizes, the variant's tiles, and
 * whether the module has P_dispatch_rank (found by name). */
static moegen_cuda_layer launch_layer(const moegen_spec *spec, const moegen_cuda_variant *v, int has_rank) {
    moegen_cuda_layer l;
    memset(&l, 0, sizeof l);
    l.num_experts = spec->num_experts;
    l.top_k = spec->top_k;
    l.hidden = spec->hidden_size;
    l.ffn = spec->moe_intermediate_size;
    l.shared_count = spec->shared.count;
    l.shared_ffn = spec->shared.count > 0 ? spec->shared.intermediate_size : 0;
    l.residual = spec->use_residual;
    l.aux_loss = spec->router.aux_loss != MOEGEN_AUX_NONE;
    l.elem_bytes = (int)moegen_dtype_size(spec->dtype);
    l.tile_m = v->tile_m;
    l.tile_n = v->tile_n;
    l.warps_m = v->warps_m;
    l.warps_n = v->warps_n;
    l.router_tokens = v->router_tokens;
    l.has_rank = has_rank;
    l.ffn_rows = moegen_spec_ffn_rows(spec);
    l.shared_ffn_rows = spec->shared.count > 0 ? (moegen_activation_is_gated(spec->activation) ? 2 : 1) *
                                                     spec->shared.intermediate_size
                                               : 0;
    l.shared_gate = spec->shared.count > 0 && spec->shared.gate;
    return l;
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
    static const char *const backward[4] = {"bwd_pre", "bwd_dh", "bwd_du", "bwd_weights"};
    for (int k = 0; k < 4 && *st == MOEGEN_OK; k++) {
        snprintf(suffix, sizeof suffix, "f%lld_%s", (long long)ffn, backward[k]);
        *st = get_function(b, prefix, suffix, KERNEL_REQUIRED, &b->shapes[i].bwd[k], err);
    }
    if (*st != MOEGEN_OK) return -1;
    b->shapes[i].ffn = ffn;
    b->n_shapes++;
    return i;
}

moegen_status moegen_cuda_backend_open(const moegen_spec *spec, int ordinal, const char *arch,
                                       const char *variant, const moegen_template_set *templates,
                                       moegen_cache *cache, moegen_cuda_backend **out, moegen_layer_desc *desc,
                                       moegen_error *err) {
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
    if (st == MOEGEN_OK) st = moegen_cuda_generate(spec, arch, variant, templates, &generated, err);

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
    if (st == MOEGEN_OK) st = get_function(b, prefix, "ep_pack", KERNEL_REQUIRED, &b->ep_pack, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "bwd_combine", KERNEL_REQUIRED, &b->bwd_combine, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "bwd_tokens", KERNEL_REQUIRED, &b->bwd_tokens, err);
    if (st == MOEGEN_OK) st = get_function(b, prefix, "bwd_dense_weights", KERNEL_REQUIRED, &b->bwd_dense, err);
    if (st == MOEGEN_OK) {
        b->variant = generated.variant.cuda;
        b->layer = launch_layer(spec, &b->variant, b->dispatch_rank != NULL);
        moegen_cuda_group groups[3];
        moegen_cuda_groups(&b->layer, groups);
        for (int g = 0; g < 3 && st == MOEGEN_OK; g++)
            b->group_shape[g] = groups[g].count > 0 ? find_shape(b, prefix, groups[g].ffn, &st, err) : -1;
    }
    if (st == MOEGEN_OK) {
        snprintf(desc->variant, sizeof desc->variant, "%s", generated.variant_name);
        snprintf(desc->kernel_path, sizeof desc->kernel_path, "cuda sm_%d, %s", b->variant.sm,
                 spec->dtype == MOEGEN_DTYPE_FP32 ? "fp32 FMA" : "mma.sync m16n8k16 tensor cores");
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
        if (b->ep_scratch) b->cu.cuMemFree(b->ep_scratch);
        if (b->module && module_release(b->module)) b->cu.cuModuleUnload(b->module);
        if (b->context) b->cu.cuDevicePrimaryCtxRelease(b->device);
        moegen_cuda_close(&b->cu);
    }
    free(b->ep_counts);
    free(b->ep_offsets);
    free(b->ep_list);
    free(b);
}

/* ---- Workspace ---------------------------------------------------------------------------- */

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


/* Route and row indices are int32 in the kernels. */
static moegen_status check_tokens(const moegen_cuda_backend *b, int64_t S, moegen_error *err) {
    if (S > INT32_MAX / b->spec->top_k || moegen_spec_max_rows(b->spec, S) > INT32_MAX)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "forward: %lld tokens exceed the int32 row indices of this layer", (long long)S);
    return MOEGEN_OK;
}

static moegen_cuda_layout forward_layout(const moegen_cuda_backend *b, int64_t S) {
    return moegen_cuda_layout_for(&b->layer, S, moegen_spec_max_rows(b->spec, S));
}

/* The arguments of one call over the workspace at `base` (forward_layout(S).total bytes):
 * capacity, the workspace carved for S tokens, device pointers. S = 0 is handled by the
 * callers (nothing is launched). */
static void fill_args(const moegen_cuda_backend *b, const moegen_kernel_weights *w, const moegen_forward_io *io,
                      char *base, moegen_cuda_args *a) {
    const int64_t S = io->n_tokens;
    const moegen_cuda_layout L = forward_layout(b, S);
    memset(a, 0, sizeof *a);
    a->n_tokens = S;
    a->capacity = moegen_spec_capacity(b->spec, S);
    a->max_rows = moegen_spec_max_rows(b->spec, S);
    a->rng_offset = io->rng_offset;
    a->x = io->x;
    a->w = *w;
    a->y = io->y;
    a->topk_ids = io->topk_ids;
    a->topk_weights = io->topk_weights;
    a->router_weights = io->router_weights;
    a->counts_before = (long long *)io->counts_before;
    a->counts_after = (long long *)io->counts_after;
    moegen_cuda_carve(&L, base, a);
}

static moegen_status prepare_args(moegen_cuda_backend *b, const moegen_kernel_weights *w,
                                  const moegen_forward_io *io, moegen_cuda_args *a, moegen_error *err) {
    moegen_status st = check_tokens(b, io->n_tokens, err);
    if (st == MOEGEN_OK) st = ensure_workspace(b, forward_layout(b, io->n_tokens).total, err);
    if (st == MOEGEN_OK) fill_args(b, w, io, (char *)(uintptr_t)b->workspace, a);
    return st;
}

/* The steps of `stages` (moegen_cuda_launch.h: the one home of the order and the grids; GEMM
 * steps only for the groups in groups_mask, bit g for routed, shared, residual), on `stream`. */
static moegen_status run_steps(moegen_cuda_backend *b, moegen_cuda_args *a, moegen_cu_stream stream, unsigned stages,
                               unsigned groups_mask, moegen_error *err) {
    moegen_cuda_step steps[MOEGEN_CUDA_MAX_STEPS];
    const int n = moegen_cuda_forward_steps(&b->layer, a->n_tokens, a->max_rows, stages, groups_mask, steps);
    moegen_status st = MOEGEN_OK;
    for (int i = 0; i < n && st == MOEGEN_OK; i++) {
        moegen_cuda_step *step = &steps[i];
        void *args_only[] = {a};
        void *gemm_args[] = {a, &step->group.group, &step->group.first, &step->group.count};
        const int shape = b->group_shape[step->group.group];
        switch (step->kind) {
        case MOEGEN_CUDA_ZERO_AUX_COUNTS:
            CHECK(b->cu.cuMemsetD32Async((moegen_cu_device_pointer)(uintptr_t)a->aux_counts, 0,
                                         (size_t)b->layer.num_experts, stream),
                  "cuMemsetD32Async");
            break;
        case MOEGEN_CUDA_ROUTER:
            st = launch(b, b->router, "router", step->grid_x, step->grid_y, step->threads, stream, args_only, err);
            break;
        case MOEGEN_CUDA_DISPATCH_COUNT:
            st = launch(b, b->dispatch_count, "dispatch_count", step->grid_x, step->grid_y, step->threads, stream,
                        args_only, err);
            break;
        case MOEGEN_CUDA_DISPATCH_RANK:
            st = launch(b, b->dispatch_rank, "dispatch_rank", step->grid_x, step->grid_y, step->threads, stream,
                        args_only, err);
            break;
        case MOEGEN_CUDA_DISPATCH_PLACE:
            st = launch(b, b->dispatch_place, "dispatch_place", step->grid_x, step->grid_y, step->threads, stream,
                        args_only, err);
            break;
        case MOEGEN_CUDA_GEMM1:
            st = launch(b, b->shapes[shape].gemm1, "gemm1", step->grid_x, step->grid_y, step->threads, stream,
                        gemm_args, err);
            break;
        case MOEGEN_CUDA_GEMM2:
            st = launch(b, b->shapes[shape].gemm2, "gemm2", step->grid_x, step->grid_y, step->threads, stream,
                        gemm_args, err);
            break;
        case MOEGEN_CUDA_COMBINE:
            st = launch(b, b->combine, "combine", step->grid_x, step->grid_y, step->threads, stream, args_only, err);
            break;
        case MOEGEN_CUDA_LOSSES:
            st = launch(b, b->losses, "losses", step->grid_x, step->grid_y, step->threads, stream, args_only, err);
            break;
        default:
            st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "unknown CUDA launch step %d", step->kind);
        }
    }
    return st;
}

/* Stage 4 and the losses; with `stats`, wait for them and read them back. */
static moegen_status launch_finish(moegen_cuda_backend *b, moegen_cuda_args *a, moegen_cu_stream stream,
                                   moegen_forward_stats *stats, moegen_error *err) {
    moegen_status st = run_steps(b, a, stream, MOEGEN_CUDA_STAGE_FINISH, 0u, err);
    if (st == MOEGEN_OK && stats) {
        long long dropped = 0;
        CHECK(b->cu.cuMemcpyDtoHAsync(&dropped, (moegen_cu_device_pointer)(uintptr_t)a->stat_dropped, 8, stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuMemcpyDtoHAsync(&stats->aux_loss, (moegen_cu_device_pointer)(uintptr_t)a->stat_aux_loss, 8,
                                      stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuMemcpyDtoHAsync(&stats->z_loss, (moegen_cu_device_pointer)(uintptr_t)a->stat_z_loss, 8, stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuStreamSynchronize(stream), "cuStreamSynchronize");
        if (st == MOEGEN_OK) {
            stats->n_dropped = dropped;
            stats->capacity = a->capacity;
        }
    }
    return st;
}

/* S = 0: nothing to launch; empty counts, zero statistics. */
static moegen_status empty_call(moegen_cuda_backend *b, const moegen_forward_io *io, moegen_cu_stream stream,
                                moegen_forward_stats *stats, moegen_error *err) {
    moegen_status st = MOEGEN_OK;
    const size_t E = (size_t)b->spec->num_experts;
    if (io->counts_before)
        CHECK(b->cu.cuMemsetD8Async((moegen_cu_device_pointer)(uintptr_t)io->counts_before, 0, E * 8, stream),
              "cuMemsetD8Async");
    if (io->counts_after)
        CHECK(b->cu.cuMemsetD8Async((moegen_cu_device_pointer)(uintptr_t)io->counts_after, 0, E * 8, stream),
              "cuMemsetD8Async");
    if (stats) {
        stats->n_dropped = 0;
        stats->capacity = moegen_spec_capacity(b->spec, 0);
        stats->aux_loss = stats->z_loss = 0.0;
    }
    return st;
}

moegen_status moegen_cuda_backend_forward(moegen_cuda_backend *b, const moegen_kernel_weights *w,
                                          const moegen_forward_io *io, moegen_forward_stats *stats,
                                          moegen_error *err) {
    moegen_status st = MOEGEN_OK;
    moegen_cu_stream stream = (moegen_cu_stream)io->stream;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st != MOEGEN_OK) return st;
    if (io->n_tokens == 0) return empty_call(b, io, stream, stats, err);
    moegen_cuda_args a;
    st = prepare_args(b, w, io, &a, err);
    if (st == MOEGEN_OK) /* router, dispatch, the GEMMs of every group (routed, shared, residual) */
        st = run_steps(b, &a, stream, MOEGEN_CUDA_STAGE_ROUTE | MOEGEN_CUDA_STAGE_GEMMS, 7u, err);
    if (st == MOEGEN_OK) st = launch_finish(b, &a, stream, stats, err);
    return st;
}

#define DEVICE(p) ((moegen_cu_device_pointer)(uintptr_t)(p))

/* ---- Training -------------------------------------------------------------------------------
 * Compiled by NVRTC and checked against a fake driver (test_cuda_backend); not yet run on a GPU. */

struct moegen_cuda_saved {
    int64_t n_tokens;
    moegen_cu_stream stream;         /* the training forward's; the backward runs on it */
    moegen_cu_device_pointer memory; /* the forward's workspace | a copy of x | the backward's buffers */
    size_t bytes;
    moegen_cuda_backward_args b;     /* b.f: the forward's arguments, x pointing at the copy */
    int data_done;                   /* the data phase has run */
};

static size_t round256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

moegen_status moegen_cuda_backend_forward_train(moegen_cuda_backend *b, const moegen_kernel_weights *w,
                                                const moegen_forward_io *io, moegen_cuda_saved **out,
                                                moegen_forward_stats *stats, moegen_error *err) {
    *out = NULL;
    moegen_status st = MOEGEN_OK;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st == MOEGEN_OK) st = check_tokens(b, io->n_tokens, err);
    if (st != MOEGEN_OK) return st;
    moegen_cuda_saved *s = calloc(1, sizeof *s);
    if (!s) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "forward_train: out of memory");
    const int64_t S = io->n_tokens;
    s->n_tokens = S;
    s->stream = (moegen_cu_stream)io->stream;
    if (S == 0) {
        st = empty_call(b, io, s->stream, stats, err);
    } else {
        const int64_t max_rows = moegen_spec_max_rows(b->spec, S);
        const size_t forward_bytes = round256(forward_layout(b, S).total);
        const size_t x_bytes = round256((size_t)S * (size_t)b->spec->hidden_size * moegen_dtype_size(b->spec->dtype));
        const moegen_cuda_backward_layout BL = moegen_cuda_backward_layout_for(&b->layer, S, max_rows);
        s->bytes = forward_bytes + x_bytes + BL.total;
        moegen_cu_result r = b->cu.cuMemAlloc(&s->memory, s->bytes);
        if (r != 0) {
            char text[256];
            s->memory = 0;
            st = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, r,
                                  "forward_train: cannot allocate %zu bytes of device memory for the saved forward: %s",
                                  s->bytes, moegen_cuda_error_text(&b->cu, r, text, sizeof text));
        }
        if (st == MOEGEN_OK) {
            char *base = (char *)(uintptr_t)s->memory;
            moegen_forward_io copy = *io; /* the backward reads x after the caller may have reused it */
            copy.x = base + forward_bytes;
            CHECK(b->cu.cuMemcpyDtoDAsync(DEVICE(copy.x), DEVICE(io->x), x_bytes, s->stream), "cuMemcpyDtoDAsync");
            fill_args(b, w, &copy, base, &s->b.f);
            moegen_cuda_backward_carve(&BL, base + forward_bytes + x_bytes, &s->b);
        }
        if (st == MOEGEN_OK)
            st = run_steps(b, &s->b.f, s->stream, MOEGEN_CUDA_STAGE_ROUTE | MOEGEN_CUDA_STAGE_GEMMS, 7u, err);
        if (st == MOEGEN_OK) st = launch_finish(b, &s->b.f, s->stream, stats, err);
    }
    if (st != MOEGEN_OK) {
        moegen_cuda_saved_free(b, s);
        return st;
    }
    *out = s;
    return MOEGEN_OK;
}

/* The backward's steps of `phases` (moegen_cuda_launch.h) on the saved forward's stream. */
static moegen_status run_backward_steps(moegen_cuda_backend *b, moegen_cuda_saved *s, unsigned phases,
                                        moegen_error *err) {
    moegen_cuda_step steps[MOEGEN_CUDA_MAX_BACKWARD_STEPS];
    const int n = moegen_cuda_backward_steps(&b->layer, s->n_tokens, s->b.f.max_rows, phases, steps);
    static const char *const names[4] = {"bwd_pre", "bwd_dh", "bwd_du", "bwd_weights"};
    moegen_status st = MOEGEN_OK;
    for (int i = 0; i < n && st == MOEGEN_OK; i++) {
        moegen_cuda_step *step = &steps[i];
        void *args_only[] = {&s->b};
        void *group_args[] = {&s->b, &step->group.group, &step->group.first, &step->group.count};
        void *dense_args[] = {&s->b, &step->group.group};
        moegen_cu_function f = NULL;
        const char *name = NULL;
        void **params = group_args;
        switch (step->kind) {
        case MOEGEN_CUDA_BWD_COMBINE: f = b->bwd_combine, name = "bwd_combine", params = args_only; break;
        case MOEGEN_CUDA_BWD_TOKENS: f = b->bwd_tokens, name = "bwd_tokens", params = args_only; break;
        case MOEGEN_CUDA_BWD_DENSE: f = b->bwd_dense, name = "bwd_dense_weights", params = dense_args; break;
        case MOEGEN_CUDA_BWD_PRE:
        case MOEGEN_CUDA_BWD_DH:
        case MOEGEN_CUDA_BWD_DU:
        case MOEGEN_CUDA_BWD_WEIGHTS: {
            const int k = step->kind - MOEGEN_CUDA_BWD_PRE; /* the order of bwd[] and names[] */
            f = b->shapes[b->group_shape[step->group.group]].bwd[k];
            name = names[k];
            break;
        }
        default:
            return moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "unknown CUDA backward step %d", step->kind);
        }
        st = launch(b, f, name, step->grid_x, step->grid_y, step->threads, s->stream, params, err);
    }
    return st;
}

/* No tokens: every weight gradient is 0 (nothing to add when accumulating). */
static moegen_status zero_grads(moegen_cuda_backend *b, moegen_cuda_saved *s, const moegen_grads *g,
                                moegen_error *err) {
    if (g->accumulate) return MOEGEN_OK;
    const moegen_spec *spec = b->spec;
    const size_t E = (size_t)spec->num_experts, H = (size_t)spec->hidden_size, F = (size_t)b->layer.ffn;
    const size_t F1 = (size_t)b->layer.ffn_rows, Ns = (size_t)b->layer.shared_count;
    const size_t Fs = (size_t)b->layer.shared_ffn, Fs1 = (size_t)b->layer.shared_ffn_rows;
    const struct {
        float *p;
        size_t n;
    } all[] = {{g->router_w, E * H},       {g->router_b, E},          {g->w1, E * F1 * H},
               {g->b1, E * F1},            {g->w2, E * H * F},        {g->b2, E * H},
               {g->shared_w1, Ns * Fs1 * H}, {g->shared_b1, Ns * Fs1}, {g->shared_w2, Ns * H * Fs},
               {g->shared_b2, Ns * H},     {g->shared_gate, H},       {g->residual_w1, F1 * H},
               {g->residual_b1, F1},       {g->residual_w2, H * F},   {g->residual_b2, H},
               {g->residual_coef_w, 2 * H}, {g->residual_coef_b, 2}};
    moegen_status st = MOEGEN_OK;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i].p && all[i].n > 0) CHECK(b->cu.cuMemsetD32Async(DEVICE(all[i].p), 0, all[i].n, s->stream), "cuMemsetD32Async");
    return st;
}

moegen_status moegen_cuda_backend_backward_weights(moegen_cuda_backend *b, moegen_cuda_saved *s,
                                                   const moegen_grads *grads, moegen_error *err) {
    moegen_status st = MOEGEN_OK;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st != MOEGEN_OK) return st;
    if (!s->data_done)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "backward_weights: moegen_layer_backward has not run on this saved forward");
    if (s->n_tokens == 0) return zero_grads(b, s, grads, err);
    s->b.grads = moegen_kernel_grads_of(grads);
    s->b.accumulate = grads->accumulate;
    return run_backward_steps(b, s, MOEGEN_CUDA_PHASE_WEIGHTS, err);
}

moegen_status moegen_cuda_backend_backward(moegen_cuda_backend *b, moegen_cuda_saved *s, const moegen_backward_io *bio,
                                           const moegen_grads *grads, moegen_error *err) {
    moegen_status st = MOEGEN_OK;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st != MOEGEN_OK) return st;
    if (s->n_tokens > 0) {
        s->b.dy = bio->dy;
        s->b.dx = bio->dx;
        s->b.aux_coeff = bio->aux_coeff;
        s->b.z_coeff = (float)bio->z_coeff;
        st = run_backward_steps(b, s, MOEGEN_CUDA_PHASE_DATA, err);
    }
    if (st != MOEGEN_OK) return st;
    s->data_done = 1;
    return grads ? moegen_cuda_backend_backward_weights(b, s, grads, err) : MOEGEN_OK;
}

int64_t moegen_cuda_saved_tokens(const moegen_cuda_saved *s) { return s ? s->n_tokens : 0; }

size_t moegen_cuda_saved_bytes(const moegen_cuda_saved *s) { return s ? sizeof *s + s->bytes : 0; }

void moegen_cuda_saved_free(moegen_cuda_backend *b, moegen_cuda_saved *s) {
    if (!s) return;
    if (s->memory) {
        b->cu.cuCtxSetCurrent(b->context);
        b->cu.cuStreamSynchronize(s->stream); /* its kernels may still read the memory */
        b->cu.cuMemFree(s->memory);
    }
    free(s);
}

/* ---- Expert parallelism, staged through host memory (runtime/ep.h) ---------------------------
 * Compiled here, never run: no GPU was available (see README). Each stage runs on the
 * forward's stream and waits for it before returning, since its results cross to the host. */

/* Device scratch of at least `bytes` (contents need not survive). */
static moegen_status ensure_ep_scratch(moegen_cuda_backend *b, size_t bytes, moegen_error *err) {
    moegen_status st = MOEGEN_OK;
    if (bytes <= b->ep_scratch_bytes) return MOEGEN_OK;
    CHECK(b->cu.cuStreamSynchronize(b->ep_stream), "cuStreamSynchronize");
    if (st != MOEGEN_OK) return st;
    if (b->ep_scratch) b->cu.cuMemFree(b->ep_scratch);
    b->ep_scratch = 0;
    b->ep_scratch_bytes = 0;
    moegen_cu_result r = b->cu.cuMemAlloc(&b->ep_scratch, bytes);
    if (r != 0) {
        char text[256];
        b->ep_scratch = 0;
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, r, "cannot allocate %zu bytes of device scratch: %s", bytes,
                                moegen_cuda_error_text(&b->cu, r, text, sizeof text));
    }
    b->ep_scratch_bytes = bytes;
    return MOEGEN_OK;
}

/* A host list of at least `n` int32 items. */
static int32_t *ep_list(moegen_cuda_backend *b, size_t n) {
    if (n > b->ep_list_capacity || !b->ep_list) {
        int32_t *fresh = realloc(b->ep_list, (n ? n : 1) * sizeof *fresh);
        if (!fresh) return NULL;
        b->ep_list = fresh;
        b->ep_list_capacity = n ? n : 1;
    }
    return b->ep_list;
}

static moegen_status cuda_ep_route(void *self, const moegen_kernel_weights *w, int n_threads,
                                   const moegen_forward_io *io, int64_t *counts_after, int64_t *expert_offset,
                                   moegen_forward_stats *stats, moegen_error *err) {
    (void)n_threads;
    moegen_cuda_backend *b = self;
    const int E = b->spec->num_experts;
    moegen_status st = MOEGEN_OK;
    b->ep_stream = (moegen_cu_stream)io->stream;
    CHECK(b->cu.cuCtxSetCurrent(b->context), "cuCtxSetCurrent");
    if (st == MOEGEN_OK && (!b->ep_counts || !b->ep_offsets)) {
        b->ep_counts = calloc((size_t)E, sizeof(int64_t));
        b->ep_offsets = calloc((size_t)E + 1, sizeof(int64_t));
        if (!b->ep_counts || !b->ep_offsets) st = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    if (st != MOEGEN_OK) return st;
    memset(&b->ep_args, 0, sizeof b->ep_args);
    if (io->n_tokens == 0) {
        memset(b->ep_counts, 0, (size_t)E * sizeof(int64_t));
        memset(b->ep_offsets, 0, ((size_t)E + 1) * sizeof(int64_t));
        st = empty_call(b, io, b->ep_stream, stats, err);
    } else {
        st = prepare_args(b, w, io, &b->ep_args, err);
        if (st == MOEGEN_OK) st = run_steps(b, &b->ep_args, b->ep_stream, MOEGEN_CUDA_STAGE_ROUTE, 0u, err);
        CHECK(b->cu.cuMemcpyDtoHAsync(b->ep_counts, DEVICE(b->ep_args.expert_kept), (size_t)E * 8, b->ep_stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuMemcpyDtoHAsync(b->ep_offsets, DEVICE(b->ep_args.expert_offset), ((size_t)E + 1) * 8,
                                      b->ep_stream),
              "cuMemcpyDtoHAsync");
        CHECK(b->cu.cuStreamSynchronize(b->ep_stream), "cuStreamSynchronize");
        if (st == MOEGEN_OK && stats) stats->capacity = b->ep_args.capacity;
    }
    if (st == MOEGEN_OK) {
        memcpy(counts_after, b->ep_counts, (size_t)E * sizeof(int64_t));
        memcpy(expert_offset, b->ep_offsets, ((size_t)E + 1) * sizeof(int64_t));
    }
    return st;
}

static moegen_status cuda_ep_pack(void *self, const moegen_forward_io *io, void *rows, float *scales,
                                  moegen_error *err) {
    (void)io;
    moegen_cuda_backend *b = self;
    const int E = b->spec->num_experts;
    const size_t row_bytes = (size_t)b->spec->hidden_size * moegen_dtype_size(b->spec->dtype);
    int64_t n = 0;
    for (int e = 0; e < E; e++) n += b->ep_counts[e];
    if (n == 0) return MOEGEN_OK;
    int32_t *list = ep_list(b, (size_t)n);
    if (!list) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    int64_t at = 0;
    for (int e = 0; e < E; e++) /* the kept rows of each expert come first in its segment */
        for (int64_t i = 0; i < b->ep_counts[e]; i++) list[at++] = (int32_t)(b->ep_offsets[e] + i);
    const size_t list_at = 0, out_at = round256((size_t)n * 4), scales_at = out_at + round256((size_t)n * row_bytes);
    moegen_status st = ensure_ep_scratch(b, scales_at + round256((size_t)n * 4), err);
    if (st != MOEGEN_OK) return st;
    const moegen_cu_device_pointer base = b->ep_scratch;
    CHECK(b->cu.cuMemcpyHtoDAsync(base + list_at, list, (size_t)n * 4, b->ep_stream), "cuMemcpyHtoDAsync");
    int *device_list = (int *)(uintptr_t)(base + list_at);
    void *device_out = (void *)(uintptr_t)(base + out_at);
    float *device_scales = scales ? (float *)(uintptr_t)(base + scales_at) : NULL;
    long long count = n;
    void *params[] = {&b->ep_args, &device_list, &count, &device_out, &device_scales};
    if (st == MOEGEN_OK)
        st = launch(b, b->ep_pack, "ep_pack", (unsigned)n, 1, MOEGEN_CUDA_EP_PACK_THREADS, b->ep_stream, params, err);
    CHECK(b->cu.cuMemcpyDtoHAsync(rows, base + out_at, (size_t)n * row_bytes, b->ep_stream), "cuMemcpyDtoHAsync");
    if (scales)
        CHECK(b->cu.cuMemcpyDtoHAsync(scales, base + scales_at, (size_t)n * 4, b->ep_stream), "cuMemcpyDtoHAsync");
    CHECK(b->cu.cuStreamSynchronize(b->ep_stream), "cuStreamSynchronize");
    return st;
}

static moegen_status cuda_ep_experts(void *self, const moegen_kernel_weights *w, int n_threads, int first, int n,
                                     const int64_t *local_offset, const void *rows, const float *scales, float *out,
                                     moegen_error *err) {
    (void)n_threads;
    (void)first; /* `w` points at the first local expert: problem l uses weight index l */
    moegen_cuda_backend *b = self;
    const moegen_spec *spec = b->spec;
    const moegen_cuda_variant *v = &b->variant;
    const int64_t R = local_offset[n];
    if (R == 0 || n == 0) return MOEGEN_OK;
    if (R > INT32_MAX) return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "experts: %lld rows", (long long)R);
    const size_t H = (size_t)spec->hidden_size, F = (size_t)spec->moe_intermediate_size;
    const size_t elem = moegen_dtype_size(spec->dtype), rows_n = (size_t)R;
    /* the problem table and the identity row list, on the host */
    moegen_cuda_problem *problems = calloc((size_t)n, sizeof *problems);
    int32_t *identity = ep_list(b, rows_n);
    if (!problems || !identity) {
        free(problems);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    int tiles = 0;
    for (int l = 0; l < n; l++) {
        const int64_t rows_l = local_offset[l + 1] - local_offset[l];
        problems[l] = (moegen_cuda_problem){local_offset[l], rows_l, tiles, l};
        tiles += (int)moegen_cuda_ceil_div(rows_l, v->tile_m);
    }
    for (size_t r = 0; r < rows_n; r++) identity[r] = (int32_t)r;
    const int group_tiles[3] = {tiles, 0, 0};
    size_t at = 0;
    const size_t x_at = at; at += round256(rows_n * H * elem);
    const size_t scales_at = at; at += round256(rows_n * 4);
    const size_t identity_at = at; at += round256(rows_n * 4);
    const size_t problems_at = at; at += round256((size_t)n * sizeof *problems);
    const size_t tiles_at = at; at += round256(sizeof group_tiles);
    const size_t hidden_at = at; at += round256(rows_n * F * elem);
    const size_t out_at = at; at += round256(rows_n * H * 4);
    moegen_status st = ensure_ep_scratch(b, at, err);
    const moegen_cu_device_pointer base = b->ep_scratch;
    CHECK(b->cu.cuMemcpyHtoDAsync(base + x_at, rows, rows_n * H * elem, b->ep_stream), "cuMemcpyHtoDAsync");
    if (scales)
        CHECK(b->cu.cuMemcpyHtoDAsync(base + scales_at, scales, rows_n * 4, b->ep_stream), "cuMemcpyHtoDAsync");
    CHECK(b->cu.cuMemcpyHtoDAsync(base + identity_at, identity, rows_n * 4, b->ep_stream), "cuMemcpyHtoDAsync");
    CHECK(b->cu.cuMemcpyHtoDAsync(base + problems_at, problems, (size_t)n * sizeof *problems, b->ep_stream),
          "cuMemcpyHtoDAsync");
    CHECK(b->cu.cuMemcpyHtoDAsync(base + tiles_at, group_tiles, sizeof group_tiles, b->ep_stream), "cuMemcpyHtoDAsync");
    moegen_cuda_args e;
    memset(&e, 0, sizeof e);
    e.x = (const void *)(uintptr_t)(base + x_at);
    e.w = *w; /* the local experts' slices: weight index l is local expert l */
    e.row_token = (int *)(uintptr_t)(base + identity_at);
    e.row_scale = scales ? (float *)(uintptr_t)(base + scales_at) : NULL;
    e.problems = (moegen_cuda_problem *)(uintptr_t)(base + problems_at);
    e.group_tiles = (int *)(uintptr_t)(base + tiles_at);
    e.hidden = (void *)(uintptr_t)(base + hidden_at);
    e.expert_out = (float *)(uintptr_t)(base + out_at);
    const int shape = b->group_shape[0];
    int group = MOEGEN_GROUP_ROUTED, first_problem = 0, count = n;
    void *params[] = {&e, &group, &first_problem, &count};
    const unsigned threads = MOEGEN_CUDA_GEMM_THREADS((unsigned)v->warps_m, (unsigned)v->warps_n);
    if (st == MOEGEN_OK)
        st = launch(b, b->shapes[shape].gemm1, "gemm1", (unsigned)tiles, moegen_cuda_ceil_div((int64_t)F, v->tile_n), threads,
                    b->ep_stream, params, err);
    if (st == MOEGEN_OK)
        st = launch(b, b->shapes[shape].gemm2, "gemm2", (unsigned)tiles, moegen_cuda_ceil_div((int64_t)H, v->tile_n), threads,
                    b->ep_stream, params, err);
    CHECK(b->cu.cuMemcpyDtoHAsync(out, base + out_at, rows_n * H * 4, b->ep_stream), "cuMemcpyDtoHAsync");
    CHECK(b->cu.cuStreamSynchronize(b->ep_stream), "cuStreamSynchronize");
    free(problems);
    return st;
}

static moegen_status cuda_ep_unpack(void *self, const float *returned, moegen_error *err) {
    moegen_cuda_backend *b = self;
    moegen_status st = MOEGEN_OK;
    if (b->ep_args.n_tokens == 0) return MOEGEN_OK;
    const size_t out_row = (size_t)b->spec->hidden_size * 4;
    int64_t at = 0;
    for (int e = 0; e < b->spec->num_experts; e++) { /* expert e's kept rows are contiguous in expert_out */
        const int64_t n = b->ep_counts[e];
        if (n > 0)
            CHECK(b->cu.cuMemcpyHtoDAsync(DEVICE(b->ep_args.expert_out) + (size_t)b->ep_offsets[e] * out_row,
                                          (const char *)returned + (size_t)at * out_row, (size_t)n * out_row,
                                          b->ep_stream),
                  "cuMemcpyHtoDAsync");
        at += n;
    }
    CHECK(b->cu.cuStreamSynchronize(b->ep_stream), "cuStreamSynchronize"); /* `returned` may be reused at once */
    return st;
}

static moegen_status cuda_ep_combine(void *self, const moegen_kernel_weights *w, int n_threads,
                                     const moegen_forward_io *io, moegen_forward_stats *stats, moegen_error *err) {
    (void)w;
    (void)n_threads;
    (void)io;
    moegen_cuda_backend *b = self;
    if (b->ep_args.n_tokens == 0) return MOEGEN_OK; /* route reported the empty call */
    moegen_status st = run_steps(b, &b->ep_args, b->ep_stream, MOEGEN_CUDA_STAGE_GEMMS, 6u, err); /* shared, residual */
    if (st == MOEGEN_OK) {
        moegen_forward_stats mine;
        memset(&mine, 0, sizeof mine);
        st = launch_finish(b, &b->ep_args, b->ep_stream, &mine, err);
        if (st == MOEGEN_OK && stats) {
            stats->n_dropped = mine.n_dropped;
            stats->capacity = mine.capacity;
            stats->aux_loss = mine.aux_loss;
            stats->z_loss = mine.z_loss;
        }
    }
    return st;
}

static void *cuda_ep_host_alloc(void *self, size_t bytes) {
    moegen_cuda_backend *b = self;
    void *p = NULL;
    if (b->cu.cuCtxSetCurrent(b->context) != 0 || b->cu.cuMemAllocHost(&p, bytes) != 0) return NULL;
    return p;
}

static void cuda_ep_host_free(void *self, void *buffer) {
    moegen_cuda_backend *b = self;
    b->cu.cuCtxSetCurrent(b->context);
    b->cu.cuMemFreeHost(buffer);
}

void moegen_cuda_backend_ep(moegen_cuda_backend *b, moegen_ep_backend *ops) {
    *ops = (moegen_ep_backend){.self = b,
                               .route = cuda_ep_route,
                               .pack = cuda_ep_pack,
                               .experts = cuda_ep_experts,
                               .unpack = cuda_ep_unpack,
                               .combine = cuda_ep_combine,
                               .host_alloc = cuda_ep_host_alloc,
                               .host_free = cuda_ep_host_free}; /* no training stages: no CUDA backward yet */
}
