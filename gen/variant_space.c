/* variant_space.c — what a tuner needs from the variant rules (variant.h): the variant as
 * re-appliable overrides, the shape key a tuning database is filed under, and the CPU
 * search space in two stages (coarse: GEMM kind x micro-kernel tile; fine: blocking). */
#include <stdio.h>
#include <string.h>

#include "variant.h"

void moegen_variant_overrides(const moegen_variant *v, char *buf, size_t size) {
    int count;
    const moegen_variant_field *fields = moegen_variant_fields(&count);
    size_t at = 0;
    if (size) buf[0] = '\0';
    for (int i = 0; i < count; i++) {
        if (fields[i].backend != v->backend) continue;
        const int value = moegen_variant_get(v, &fields[i]);
        char item[64];
        if (fields[i].is_gemm) {
            const char *name = moegen_cpu_gemm_name((moegen_cpu_gemm)value);
            snprintf(item, sizeof item, "%s=%s", fields[i].name, name ? name : "?");
        } else {
            snprintf(item, sizeof item, "%s=%d", fields[i].name, value);
        }
        if (at < size) at += (size_t)snprintf(buf + at, size - at, "%s%s", at ? "," : "", item);
    }
}

void moegen_variant_shape_key(const moegen_spec *spec, moegen_backend backend, char *buf, size_t size) {
    snprintf(buf, size, "backend=%s E=%d k=%d H=%lld F=%lld act=%s dtype=%s ep=%d shared=%dx%lld residual=%d bias=%d",
             backend == MOEGEN_BACKEND_CUDA ? "cuda" : "cpu", spec->num_experts, spec->top_k,
             (long long)spec->hidden_size, (long long)spec->moe_intermediate_size,
             moegen_activation_name(spec->activation), moegen_dtype_name(spec->dtype), spec->ep_size,
             spec->shared.count, spec->shared.count ? (long long)spec->shared.intermediate_size : 0LL,
             spec->use_residual ? 1 : 0, spec->expert_bias ? 1 : 0);
}

/* Append `v` to out[] unless it is invalid (counted) or already there. */
static void add(const moegen_spec *spec, const moegen_variant *v, moegen_variant *out, int max, int *n,
                int *n_invalid) {
    moegen_error err;
    if (moegen_variant_check(spec, v, &err) != MOEGEN_OK) {
        if (n_invalid) (*n_invalid)++;
        return;
    }
    for (int i = 0; i < *n; i++)
        if (!memcmp(&out[i].cpu, &v->cpu, sizeof v->cpu)) return;
    if (*n < max) out[(*n)++] = *v;
}

int moegen_variant_space(const moegen_spec *spec, const moegen_target *target, const moegen_variant *around,
                         moegen_variant *out, int max, int *n_invalid) {
    int n = 0;
    if (n_invalid) *n_invalid = 0;
    moegen_variant base;
    moegen_variant_default(spec, MOEGEN_BACKEND_CPU, target, &base);
    if (!around) {
        /* Coarse: the default first, then each GEMM kind the target can run with micro-kernel
         * tiles from one row (decode) to eight (prefill), narrow and wide. AMX ignores the
         * micro-kernel tile (it is the fallback's), so it gets its blockings instead. */
        static const int TILES[][2] = {{1, 4}, {2, 4}, {3, 4}, {4, 4}, {6, 4}, {8, 2}, {2, 8}, {4, 2}, {8, 4}};
        /* outer: weight rows x token vectors; the register file decides which fit */
        static const int OUTER_TILES[][2] = {{6, 4}, {4, 6}, {8, 3}, {12, 2}, {4, 2}, {2, 4}};
        static const int AMX_BLOCKS[][2] = {{16, 32}, {32, 64}, {64, 64}, {128, 64}, {64, 128}, {128, 128}};
        add(spec, &base, out, max, &n, n_invalid);
        for (int gemm = 0; moegen_cpu_gemm_name((moegen_cpu_gemm)gemm); gemm++) {
            if (gemm == MOEGEN_CPU_GEMM_BF16_DOT && !(target && target->cpu_bf16_dot)) continue;
            if (gemm == MOEGEN_CPU_GEMM_AMX && !(target && target->cpu_amx)) continue;
            moegen_variant v = base;
            v.cpu.gemm = (moegen_cpu_gemm)gemm;
            if (gemm == MOEGEN_CPU_GEMM_AMX) {
                v.cpu.tile_rows = 4; /* the fallback's tile; divides every AMX block */
                v.cpu.tile_cols = 4;
                for (size_t i = 0; i < sizeof AMX_BLOCKS / sizeof AMX_BLOCKS[0]; i++) {
                    v.cpu.block_rows = AMX_BLOCKS[i][0];
                    v.cpu.block_cols = AMX_BLOCKS[i][1];
                    add(spec, &v, out, max, &n, n_invalid);
                }
                continue;
            }
            if (gemm == MOEGEN_CPU_GEMM_OUTER) { /* fp32 only (the check refuses other layers) */
                for (size_t i = 0; i < sizeof OUTER_TILES / sizeof OUTER_TILES[0]; i++) {
                    v.cpu.tile_cols = OUTER_TILES[i][0];
                    v.cpu.tile_rows = OUTER_TILES[i][1];
                    v.cpu.block_rows = v.cpu.tile_rows * v.cpu.vector_floats * 2;
                    v.cpu.block_cols = v.cpu.tile_cols * 8;
                    add(spec, &v, out, max, &n, n_invalid);
                }
                continue;
            }
            for (size_t i = 0; i < sizeof TILES / sizeof TILES[0]; i++) {
                v.cpu.tile_rows = TILES[i][0];
                v.cpu.tile_cols = TILES[i][1];
                v.cpu.block_rows = v.cpu.tile_rows * 16;
                v.cpu.block_cols = 64;
                add(spec, &v, out, max, &n, n_invalid);
            }
        }
        return n;
    }
    /* Fine: the task blocking and the router block around `around` (outer: 1 to 8 token-vector
     * tiles per block, and whole weight tiles). */
    static const int ROW_TILES[] = {4, 8, 16, 32}, COLS[] = {16, 32, 64, 128, 256}, ROUTER[] = {16, 64, 256};
    add(spec, around, out, max, &n, n_invalid);
    for (size_t r = 0; r < sizeof ROW_TILES / sizeof ROW_TILES[0]; r++)
        for (size_t c = 0; c < sizeof COLS / sizeof COLS[0]; c++) {
            moegen_variant v = *around;
            if (v.cpu.gemm == MOEGEN_CPU_GEMM_OUTER) {
                v.cpu.block_rows = ROW_TILES[r] / 4 * v.cpu.tile_rows * v.cpu.vector_floats;
                v.cpu.block_cols = (COLS[c] + v.cpu.tile_cols - 1) / v.cpu.tile_cols * v.cpu.tile_cols;
            } else {
                v.cpu.block_rows = ROW_TILES[r] * v.cpu.tile_rows;
                v.cpu.block_cols = COLS[c];
            }
            add(spec, &v, out, max, &n, n_invalid);
        }
    for (size_t q = 0; q < sizeof ROUTER / sizeof ROUTER[0]; q++) {
        moegen_variant v = *around;
        v.cpu.router_block = ROUTER[q];
        add(spec, &v, out, max, &n, n_invalid);
    }
    return n;
}
