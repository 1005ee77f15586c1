/* cpu_module.h — a compiled CPU module loaded into the process, and unloaded again.
 *
 * Place in the pipeline: spec -> gen -> compile -> cache -> [load] -> launch.
 * A module is the shared object the host compiler made from one generated source. It
 * exports <prefix>_info, <prefix>_workspace_bytes, <prefix>_forward, the three stages
 * <prefix>_route, <prefix>_experts, <prefix>_combine, and the training backward
 * <prefix>_backward_workspace_bytes, _backward_data, _backward_weights and its stages
 * _backward_combine, _backward_experts, _backward_experts_weights, _backward_route
 * (templates/common/moegen_kernel_abi.h).
 *
 * Unloading: a closed layer's module is unmapped (dlclose), so a process that opens
 * thousands of layers (a tuning sweep) keeps its memory bounded. The one thing that must
 * outlive a module is the OpenMP runtime it pulled in: its worker threads stay parked
 * inside that library between parallel regions, so unloading it under them would crash
 * the process. Loading a module therefore pins every OpenMP runtime that is loaded
 * (libgomp for GCC, libomp for clang, libiomp5 for Intel) with RTLD_NODELETE, once; the
 * module itself, whose code no thread runs outside a forward call, is free to go.
 */
#ifndef MOEGEN_RUNTIME_CPU_MODULE_H
#define MOEGEN_RUNTIME_CPU_MODULE_H

#include <stddef.h>
#include <stdint.h>

#include "moegen.h"
#include "moegen_kernel_abi.h"

typedef struct moegen_cpu_module {
    void *handle; /* dlopen handle; NULL when not loaded */
    const moegen_kernel_info *(*info)(void);
    size_t (*workspace_bytes)(int64_t n_tokens);
    int (*forward)(const moegen_kernel_args *args);
    int (*route)(const moegen_kernel_args *args, moegen_kernel_plan *plan);
    int (*experts)(const moegen_kernel_expert_args *args);
    int (*combine)(const moegen_kernel_args *args);
    size_t (*backward_workspace_bytes)(int64_t n_tokens);
    int (*backward_data)(const moegen_kernel_backward_args *args);
    int (*backward_weights)(const moegen_kernel_backward_args *args);
    int (*backward_combine)(const moegen_kernel_backward_args *args, moegen_kernel_backward_plan *plan);
    int (*backward_experts)(const moegen_kernel_expert_backward_args *args);
    int (*backward_experts_weights)(const moegen_kernel_expert_backward_args *args);
    int (*backward_route)(const moegen_kernel_backward_args *args);
} moegen_cpu_module;

/* What a module must have been generated for. */
typedef struct moegen_cpu_module_expect {
    const char *symbol_prefix; /* e.g. "moe_demo_fc8b6e2a" */
    const char *spec_hash;     /* 64 hex */
    int num_experts, top_k;
    int64_t hidden_size;
} moegen_cpu_module_expect;

/* dlopen `path` (RTLD_NOW | RTLD_LOCAL), resolve the three entry points and check the
 * module's info against `expect`. Returns MOEGEN_OK, or MOEGEN_ERR_LOAD naming the path
 * and what failed (dlopen's message, the missing symbol, or the mismatch); on failure
 * nothing stays loaded. */
moegen_status moegen_cpu_module_load(const char *path, const moegen_cpu_module_expect *expect,
                                     moegen_cpu_module *module, moegen_error *err);

/* dlclose the module (a zeroed or unloaded module is a no-op). */
void moegen_cpu_module_unload(moegen_cpu_module *module);

#endif
