/* variant.c — the default-variant heuristic, variant checks and names (see variant.h).
 *
 * Invariant owned here: every tile and blocking choice moegen makes by itself is made
 * in moegen_variant_default(); templates only read the variant.
 */
#include "variant.h"

#include <stdio.h>

void moegen_variant_default(const moegen_spec *spec, moegen_backend backend,
                            const moegen_target *target, moegen_variant *out) {
    out->backend = backend;
    moegen_cpu_variant *cpu = &out->cpu;
    int vector_floats = target && target->cpu_vector_floats ? target->cpu_vector_floats : 4;
    cpu->vector_floats = vector_floats;
    /* Micro-kernel: tile_rows x tile_cols accumulator vectors plus one vector per
     * row and column loaded each step must fit the register file (16 vector
     * registers below AVX-512, 32 with it). */
    if (vector_floats >= 16) {
        cpu->tile_rows = 4;
        cpu->tile_cols = 4;
    } else {
        cpu->tile_rows = 3;
        cpu->tile_cols = 4;
    }
    (void)spec;
    /* Parallel task: ~block_rows x H activations and block_cols x H weights should
     * sit in L2 while the task sweeps them. */
    cpu->block_rows = cpu->tile_rows * 16;
    cpu->block_cols = 64;
    cpu->router_block = 64;
}

moegen_status moegen_variant_check(const moegen_spec *spec, const moegen_variant *variant,
                                   moegen_error *err) {
    const moegen_cpu_variant *cpu = &variant->cpu;
    if (variant->backend != MOEGEN_BACKEND_CPU)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "variant: only the cpu backend is available in this build");
    if (cpu->vector_floats != 4 && cpu->vector_floats != 8 && cpu->vector_floats != 16)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.vector_floats must be 4, 8 or 16 (got %d)",
                                cpu->vector_floats);
    if (cpu->tile_rows < 1 || cpu->tile_rows > 8)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_rows must be in 1..8 (got %d)", cpu->tile_rows);
    if (cpu->tile_cols != 1 && cpu->tile_cols != 2 && cpu->tile_cols != 4 && cpu->tile_cols != 8)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_cols must be 1, 2, 4 or 8 (got %d)",
                                cpu->tile_cols);
    if (moegen_activation_is_gated(spec->activation) && cpu->tile_cols % 2 != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_cols must be even for the gated activation %s",
                                moegen_activation_name(spec->activation));
    if (cpu->block_rows < cpu->tile_rows || cpu->block_rows % cpu->tile_rows != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.block_rows (%d) must be a positive multiple of "
                                "cpu.tile_rows (%d)",
                                cpu->block_rows, cpu->tile_rows);
    if (cpu->block_cols < cpu->tile_cols || cpu->block_cols % cpu->tile_cols != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.block_cols (%d) must be a positive multiple of "
                                "cpu.tile_cols (%d)",
                                cpu->block_cols, cpu->tile_cols);
    if (cpu->router_block < 1 || cpu->router_block > 4096)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.router_block must be in 1..4096 (got %d)",
                                cpu->router_block);
    return MOEGEN_OK;
}

void moegen_variant_name(const moegen_spec *spec, const moegen_variant *variant, char *buf,
                         size_t size) {
    char hash[65];
    moegen_spec_hash(spec, hash);
    const moegen_cpu_variant *cpu = &variant->cpu;
    snprintf(buf, size, "cpu_%s_e%dk%d_h%lldf%lld_v%dr%dc%db%dx%dq%d_%.8s",
             moegen_dtype_name(spec->dtype), spec->num_experts, spec->top_k,
             (long long)spec->hidden_size, (long long)spec->moe_intermediate_size,
             cpu->vector_floats, cpu->tile_rows, cpu->tile_cols, cpu->block_rows,
             cpu->block_cols, cpu->router_block, hash);
}
