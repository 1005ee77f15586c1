/* cpu_module.c — load and unload a compiled CPU module (see cpu_module.h).
 *
 * Invariants:
 *  - A module is loaded RTLD_LOCAL: two modules never see each other's symbols, and the
 *    same symbol prefix in two modules (two versions of a layer) cannot collide.
 *  - Every OpenMP runtime present after a module loads is pinned with RTLD_NODELETE
 *    before the module can be unloaded (see cpu_module.h for why). Pinning is idempotent
 *    and takes the dynamic loader's own lock, so it needs no state of ours.
 *  - A failed load leaves nothing loaded.
 */
#define _GNU_SOURCE
#include "cpu_module.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

/* OpenMP runtimes a host compiler's -fopenmp links against. */
static const char *const OPENMP_RUNTIMES[] = {"libgomp.so.1", "libomp.so.5", "libomp.so", "libiomp5.so"};

/* Keep every loaded OpenMP runtime mapped for the life of the process. RTLD_NOLOAD
 * makes this a no-op for runtimes that are not loaded; RTLD_NODELETE marks the loaded
 * one as never to be unmapped. The extra reference is deliberately never dropped. */
static void pin_openmp_runtimes(void) {
    for (size_t i = 0; i < sizeof OPENMP_RUNTIMES / sizeof OPENMP_RUNTIMES[0]; i++)
        (void)dlopen(OPENMP_RUNTIMES[i], RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE | RTLD_GLOBAL);
}

static void *symbol(void *handle, const char *prefix, const char *suffix) {
    char name[192];
    snprintf(name, sizeof name, "%s_%s", prefix, suffix);
    return dlsym(handle, name);
}

moegen_status moegen_cpu_module_load(const char *path, const moegen_cpu_module_expect *expect,
                                     moegen_cpu_module *module, moegen_error *err) {
    if (!path || !expect || !expect->symbol_prefix || !expect->spec_hash || !module)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_cpu_module_load: NULL argument");
    memset(module, 0, sizeof *module);
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char *why = dlerror();
        return moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "%s: dlopen failed: %s", path, why ? why : "unknown error");
    }
    pin_openmp_runtimes();
    module->handle = handle;
    *(void **)&module->info = symbol(handle, expect->symbol_prefix, "info");
    *(void **)&module->workspace_bytes = symbol(handle, expect->symbol_prefix, "workspace_bytes");
    *(void **)&module->forward = symbol(handle, expect->symbol_prefix, "forward");
    *(void **)&module->route = symbol(handle, expect->symbol_prefix, "route");
    *(void **)&module->experts = symbol(handle, expect->symbol_prefix, "experts");
    *(void **)&module->combine = symbol(handle, expect->symbol_prefix, "combine");
    *(void **)&module->backward_workspace_bytes = symbol(handle, expect->symbol_prefix, "backward_workspace_bytes");
    *(void **)&module->backward_data = symbol(handle, expect->symbol_prefix, "backward_data");
    *(void **)&module->backward_weights = symbol(handle, expect->symbol_prefix, "backward_weights");
    *(void **)&module->backward_combine = symbol(handle, expect->symbol_prefix, "backward_combine");
    *(void **)&module->backward_experts = symbol(handle, expect->symbol_prefix, "backward_experts");
    *(void **)&module->backward_experts_weights = symbol(handle, expect->symbol_prefix, "backward_experts_weights");
    *(void **)&module->backward_route = symbol(handle, expect->symbol_prefix, "backward_route");
    moegen_status st = MOEGEN_OK;
    if (!module->info || !module->workspace_bytes || !module->forward || !module->route || !module->experts ||
        !module->combine || !module->backward_workspace_bytes || !module->backward_data || !module->backward_weights ||
        !module->backward_combine || !module->backward_experts || !module->backward_experts_weights ||
        !module->backward_route) {
        st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0,
                              "%s: missing symbols %s_info / _workspace_bytes / _forward / _route / _experts / _combine "
                              "/ _backward_workspace_bytes / _backward_data / _backward_weights / _backward_combine / "
                              "_backward_experts / _backward_experts_weights / _backward_route",
                              path, expect->symbol_prefix);
    } else {
        const moegen_kernel_info *info = module->info();
        if (!info || info->abi_version != MOEGEN_KERNEL_ABI_VERSION || strcmp(info->spec_hash, expect->spec_hash) != 0 ||
            info->num_experts != expect->num_experts || info->top_k != expect->top_k ||
            info->hidden_size != expect->hidden_size || !info->kernel_path)
            st = moegen_error_set(err, MOEGEN_ERR_LOAD, 0, "%s: module was generated for another spec or ABI", path);
    }
    if (st != MOEGEN_OK) moegen_cpu_module_unload(module);
    return st;
}

void moegen_cpu_module_unload(moegen_cpu_module *module) {
    if (!module || !module->handle) return;
    dlclose(module->handle);
    memset(module, 0, sizeof *module);
}
