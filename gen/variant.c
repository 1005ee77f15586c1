/* variant.c — the default-variant heuristic, variant checks and names, and the parser of
 * CUDA architecture names (see variant.h).
 *
 * Invariants owned here: every tile and blocking choice moegen makes by itself is made
 * in moegen_variant_default(); templates only read the variant. Every "sm_XX" moegen
 * reads is parsed by moegen_cuda_arch_parse().
 */
#include "variant.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen_cuda_abi.h"

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)
#define CUDA_ARCH_FORMS                                                                   \
    "sm_<" STRINGIFY(MOEGEN_CUDA_SM_MIN) ".." STRINGIFY(MOEGEN_CUDA_SM_MAX) ">[a|f], e.g. sm_80, " \
    "sm_90a, sm_100a, sm_120f"

moegen_status moegen_cuda_arch_parse(const char *text, moegen_cuda_arch *out, moegen_error *err) {
    if (!text || !text[0])
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "no CUDA architecture given (expected " CUDA_ARCH_FORMS ")");
    /* "sm_", then 2 or 3 digits without a leading zero, then at most one suffix letter. */
    const char *p = text;
    int sm = 0, digits = 0;
    if (p[0] == 's' && p[1] == 'm' && p[2] == '_') {
        p += 3;
        if (*p != '0')
            for (; *p >= '0' && *p <= '9' && digits < 4; p++, digits++) sm = sm * 10 + (*p - '0');
    }
    char suffix = 0;
    if (digits >= 2 && (*p == 'a' || *p == 'f')) suffix = *p++;
    if (digits < 2 || digits > 3 || *p != '\0')
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "CUDA architecture '%.32s' is not of the form " CUDA_ARCH_FORMS, text);
    if (sm < MOEGEN_CUDA_SM_MIN || sm > MOEGEN_CUDA_SM_MAX)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "CUDA architecture '%s': moegen knows sm_%d to sm_%d (got compute "
                                "capability %d.%d)",
                                text, MOEGEN_CUDA_SM_MIN, MOEGEN_CUDA_SM_MAX, sm / 10, sm % 10);
    if (suffix == 'a' && sm < MOEGEN_CUDA_SM_SUFFIX_A_MIN)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "CUDA architecture '%s': the 'a' (architecture-specific) targets start "
                                "at sm_%da; use sm_%d",
                                text, MOEGEN_CUDA_SM_SUFFIX_A_MIN, sm);
    if (suffix == 'f' && sm < MOEGEN_CUDA_SM_SUFFIX_F_MIN)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "CUDA architecture '%s': the 'f' (family) targets start at sm_%df; use "
                                "sm_%d%s",
                                text, MOEGEN_CUDA_SM_SUFFIX_F_MIN, sm,
                                sm >= MOEGEN_CUDA_SM_SUFFIX_A_MIN ? " or its 'a' target" : "");
    if (out) {
        out->sm = sm;
        out->suffix = suffix;
    }
    return MOEGEN_OK;
}

/* "fma, bfdot, ...": every moegen_cpu_gemm name. */
static const char *gemm_names(void) {
    static char names[128];
    names[0] = '\0';
    for (int g = 0; moegen_cpu_gemm_name((moegen_cpu_gemm)g); g++)
        snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", g ? ", " : "one of ",
                 moegen_cpu_gemm_name((moegen_cpu_gemm)g));
    return names;
}

#define CPU_FIELD(name) {#name, MOEGEN_BACKEND_CPU, 0, offsetof(moegen_variant, cpu.name)}
#define CUDA_FIELD(name) {#name, MOEGEN_BACKEND_CUDA, 0, offsetof(moegen_variant, cuda.name)}
static const moegen_variant_field FIELDS[] = {
    {"gemm", MOEGEN_BACKEND_CPU, 1, offsetof(moegen_variant, cpu.gemm)},
    CPU_FIELD(vector_floats), CPU_FIELD(tile_rows), CPU_FIELD(tile_cols), CPU_FIELD(block_rows),
    CPU_FIELD(block_cols), CPU_FIELD(router_block),
    CUDA_FIELD(sm), CUDA_FIELD(tile_m), CUDA_FIELD(tile_n), CUDA_FIELD(tile_k), CUDA_FIELD(stages),
    CUDA_FIELD(warps_m), CUDA_FIELD(warps_n), CUDA_FIELD(router_tokens),
};
#undef CPU_FIELD
#undef CUDA_FIELD
_Static_assert(sizeof(moegen_cpu_gemm) == sizeof(int), "moegen_cpu_gemm is stored as an int");

const moegen_variant_field *moegen_variant_fields(int *count) {
    *count = (int)(sizeof FIELDS / sizeof FIELDS[0]);
    return FIELDS;
}

int moegen_variant_get(const moegen_variant *v, const moegen_variant_field *field) {
    int value;
    memcpy(&value, (const char *)v + field->offset, sizeof value);
    return value;
}

moegen_status moegen_variant_apply_overrides(moegen_variant *v, const char *text, moegen_error *err) {
    if (!text) return MOEGEN_OK;
    moegen_variant out = *v;
    const char *p = text;
    for (;;) {
        while (*p == ',' || *p == ' ') p++;
        if (!*p) break;
        const size_t len = strcspn(p, ", ");
        const char *eq = memchr(p, '=', len);
        const moegen_variant_field *field = NULL;
        for (size_t i = 0; eq && i < sizeof FIELDS / sizeof FIELDS[0]; i++)
            if (FIELDS[i].backend == v->backend && strlen(FIELDS[i].name) == (size_t)(eq - p) &&
                !strncmp(FIELDS[i].name, p, (size_t)(eq - p)))
                field = &FIELDS[i];
        if (!field) {
            char names[512] = "";
            for (size_t i = 0; i < sizeof FIELDS / sizeof FIELDS[0]; i++)
                if (FIELDS[i].backend == v->backend)
                    snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", names[0] ? ", " : "",
                             FIELDS[i].name);
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "variant override '%.*s' is not name=value with a %s field (%s)",
                                    (int)(len > 64 ? 64 : len), p, v->backend == MOEGEN_BACKEND_CPU ? "cpu" : "cuda",
                                    names);
        }
        const char *value = eq + 1;
        const int value_len = (int)(p + len - value);
        int parsed = -1;
        if (field->is_gemm) {
            for (int g = 0; moegen_cpu_gemm_name((moegen_cpu_gemm)g); g++)
                if ((int)strlen(moegen_cpu_gemm_name((moegen_cpu_gemm)g)) == value_len &&
                    !strncmp(moegen_cpu_gemm_name((moegen_cpu_gemm)g), value, (size_t)value_len))
                    parsed = g;
        } else {
            char *end;
            long number = value_len > 0 && value_len < 12 ? strtol(value, &end, 10) : -1;
            if (value_len > 0 && value_len < 12 && end == value + value_len && number >= 0 && number <= 1 << 20)
                parsed = (int)number;
        }
        if (parsed < 0)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "variant override %s='%.*s': expected %s", field->name,
                                    value_len > 64 ? 64 : value_len, value,
                                    field->is_gemm ? gemm_names() : "an integer from 0 to 1048576");
        memcpy((char *)&out + field->offset, &parsed, sizeof parsed);
        p += len;
    }
    *v = out;
    return MOEGEN_OK;
}

const char *moegen_cpu_gemm_name(moegen_cpu_gemm gemm) {
    switch (gemm) {
    case MOEGEN_CPU_GEMM_FMA: return "fma";
    case MOEGEN_CPU_GEMM_BF16_DOT: return "bfdot";
    case MOEGEN_CPU_GEMM_AMX: return "amx";
    case MOEGEN_CPU_GEMM_OUTER: return "outer";
    }
    return NULL;
}

/* AMX tiles take 32 values of k at a time: every GEMM's k (H, F, the shared F) must be a
 * multiple of 32. */
static int amx_shapes_fit(const moegen_spec *spec) {
    return spec->hidden_size % 32 == 0 && spec->moe_intermediate_size % 32 == 0 &&
           (spec->shared.count == 0 || spec->shared.intermediate_size % 32 == 0);
}

void moegen_variant_default(const moegen_spec *spec, moegen_backend backend,
                            const moegen_target *target, moegen_variant *out) {
    out->backend = backend;
    moegen_cpu_variant *cpu = &out->cpu;
    int vector_floats = target && target->cpu_vector_floats ? target->cpu_vector_floats : 4;
    cpu->vector_floats = vector_floats;
    /* bf16: AMX tiles where the CPU has them and the shapes fit; else vdpbf16ps where the
     * CPU has it, except on CPUs with AMX (Sapphire Rapids and later), where vdpbf16ps runs
     * at about 0.75x the widen + FMA path (measured here: a 4 x 4 tile from L1, 75-81
     * against 105 GFLOP/s per core). */
    const int bf16_avx512 = spec->dtype == MOEGEN_DTYPE_BF16 && vector_floats == 16 && target;
    if (bf16_avx512 && target->cpu_amx && amx_shapes_fit(spec))
        cpu->gemm = MOEGEN_CPU_GEMM_AMX;
    else if (bf16_avx512 && target->cpu_bf16_dot && !target->cpu_amx)
        cpu->gemm = MOEGEN_CPU_GEMM_BF16_DOT;
    else
        cpu->gemm = MOEGEN_CPU_GEMM_FMA;
    /* Micro-kernel: tile_rows x tile_cols accumulator vectors, tile_cols weight operands
     * and one row operand must fit the register file (16 vector registers below AVX-512,
     * 32 with it); widened bf16 operands take two registers each. With AVX-512, 6 x 4
     * (29 registers) ran fp32 prefill 1.15-1.3x faster than 4 x 4 here (qwen3-30b-a3b
     * in fp32, S = 1024, 1 thread, 4 alternating pairs). */
    if (vector_floats >= 16) {
        const int two_register_operands = spec->dtype == MOEGEN_DTYPE_BF16 && cpu->gemm == MOEGEN_CPU_GEMM_FMA;
        cpu->tile_rows = two_register_operands ? 4 : 6;
        cpu->tile_cols = 4;
    } else {
        cpu->tile_rows = 3;
        cpu->tile_cols = 4;
    }
    /* Parallel task: ~block_rows x H activations and block_cols x H weights should
     * sit in L2 while the task sweeps them. */
    cpu->block_rows = cpu->tile_rows * 16;
    cpu->block_cols = 64;
    cpu->router_block = 64;

    /* CUDA: 64 x 64 tiles with 4 warps (2 x 2, 32 x 32 per warp) and a 3-stage cp.async
     * pipeline fit every spec (shared memory stays under the 48 KiB static limit even for
     * gated layers, which stage both the gate and the up rows). */
    moegen_cuda_variant *cuda = &out->cuda;
    cuda->sm = target && target->cuda_sm ? target->cuda_sm : 80;
    const int fp32 = spec->dtype == MOEGEN_DTYPE_FP32; /* FMA path: twice the bytes per value */
    cuda->tile_m = 64;
    cuda->tile_n = fp32 ? 32 : 64;
    cuda->tile_k = 32;
    cuda->stages = fp32 ? 2 : 3;
    cuda->warps_m = 2;
    cuda->warps_n = 2;
    cuda->router_tokens = 32;
}

int moegen_variant_default_ranges(const moegen_spec *spec, const moegen_target *target, moegen_variant_range *out,
                                  int max) {
    const int outer = spec->dtype == MOEGEN_DTYPE_FP32 && target && target->cpu_vector_floats == 16 &&
                      spec->ep_size == 1;
    if (max >= 1) out[0] = (moegen_variant_range){.min_tokens = 1, .overrides = ""};
    if (!outer) return 1;
    /* From S k / E >= 16 rows per expert on average (one token vector), outer products of
     * 6 weight rows x 4 token vectors (29 of the 32 registers). Measured here on
     * qwen3-30b-a3b in fp32, 1 thread (medians of 5, two alternating runs): outer / dot
     * product time 1.4-1.9 at S = 64 (4 rows per expert), 1.3-1.5 at 128, 0.83-0.89 at 256,
     * 0.66-0.73 at 512, 0.6-0.8 at 1024; 1.2-1.8 at S = 1 and 16. */
    const int64_t rows_per_expert = 16;
    int64_t first = (rows_per_expert * spec->num_experts + spec->top_k - 1) / spec->top_k;
    if (first < 2) first = 2;
    if (max >= 2) {
        out[1].min_tokens = first;
        snprintf(out[1].overrides, sizeof out[1].overrides,
                 "gemm=outer,tile_cols=6,tile_rows=4,block_rows=128,block_cols=96");
    }
    return 2;
}

moegen_status moegen_variant_default_for_tokens(const moegen_spec *spec, const moegen_target *target,
                                                int64_t n_tokens, moegen_variant *out, moegen_error *err) {
    moegen_variant_range ranges[MOEGEN_VARIANT_MAX_RANGES];
    int n = moegen_variant_default_ranges(spec, target, ranges, MOEGEN_VARIANT_MAX_RANGES);
    if (n > MOEGEN_VARIANT_MAX_RANGES) n = MOEGEN_VARIANT_MAX_RANGES; /* it returns how many there are */
    int r = 0;
    while (r + 1 < n && ranges[r + 1].min_tokens <= n_tokens) r++;
    moegen_variant_default(spec, MOEGEN_BACKEND_CPU, target, out);
    return moegen_variant_apply_overrides(out, ranges[r].overrides, err);
}

/* Static shared memory of one GEMM1 CTA (the larger of the two GEMMs): tensor-core
 * tiles are swizzled without padding; fp32 tiles pad each row by 4 floats. */
static long cuda_gemm_shared_bytes(const moegen_spec *spec, const moegen_cuda_variant *v) {
    int fp32 = spec->dtype == MOEGEN_DTYPE_FP32;
    long row_bytes = fp32 ? (v->tile_k + 4) * 4L : v->tile_k * 2L;
    long b_rows = (moegen_activation_is_gated(spec->activation) ? 2 : 1) * (long)v->tile_n;
    return (long)v->stages * ((long)v->tile_m + b_rows) * row_bytes;
}

static moegen_status check_cuda(const moegen_spec *spec, const moegen_cuda_variant *v, moegen_error *err) {
    if (v->sm < 80 || v->sm > MOEGEN_CUDA_SM_MAX)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.sm %d: the CUDA backend needs sm_80 to sm_%d", v->sm,
                                MOEGEN_CUDA_SM_MAX);
    if (v->tile_m != 32 && v->tile_m != 64 && v->tile_m != 128)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.tile_m must be 32, 64 or 128 (got %d)", v->tile_m);
    if (v->tile_n != 32 && v->tile_n != 64 && v->tile_n != 128)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.tile_n must be 32, 64 or 128 (got %d)", v->tile_n);
    if (v->tile_k != 32 && v->tile_k != 64)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.tile_k must be 32 or 64 (got %d)", v->tile_k);
    if (v->stages < 2 || v->stages > 4)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.stages must be in 2..4 (got %d)", v->stages);
    int warps = v->warps_m * v->warps_n;
    if (v->warps_m < 1 || v->warps_n < 1 || warps > 8 || v->tile_m % (16 * v->warps_m) != 0 ||
        v->tile_n % (16 * v->warps_n) != 0 || v->tile_m % (4 * warps) != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.warps_m x warps_n (%d x %d) must split the %d x %d tile "
                                "into warp tiles of multiples of 16, with at most 8 warps",
                                v->warps_m, v->warps_n, v->tile_m, v->tile_n);
    long shared = cuda_gemm_shared_bytes(spec, v);
    if (shared > 48 * 1024)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda tiles need %ld bytes of shared memory per CTA; the limit "
                                "is 49152", shared);
    if (v->router_tokens < 1 || v->router_tokens > 64 || MOEGEN_CUDA_ROUTER_THREADS % v->router_tokens != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cuda.router_tokens must divide %d (the router's threads) and be at "
                                "most 64 (got %d)",
                                MOEGEN_CUDA_ROUTER_THREADS, v->router_tokens);
    return MOEGEN_OK;
}

moegen_status moegen_variant_check(const moegen_spec *spec, const moegen_variant *variant,
                                   moegen_error *err) {
    if (variant->backend == MOEGEN_BACKEND_CUDA) return check_cuda(spec, &variant->cuda, err);
    const moegen_cpu_variant *cpu = &variant->cpu;
    if (!moegen_cpu_gemm_name(cpu->gemm))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "variant: cpu.gemm %d is not a GEMM kind",
                                (int)cpu->gemm);
    const int outer = cpu->gemm == MOEGEN_CPU_GEMM_OUTER;
    if (outer && spec->dtype != MOEGEN_DTYPE_FP32)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm outer needs an fp32 layer (got %s)", moegen_dtype_name(spec->dtype));
    if (cpu->gemm != MOEGEN_CPU_GEMM_FMA && !outer && (spec->dtype != MOEGEN_DTYPE_BF16 || cpu->vector_floats != 16))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm %s needs a bf16 layer and cpu.vector_floats 16 (got %s, %d)",
                                moegen_cpu_gemm_name(cpu->gemm), moegen_dtype_name(spec->dtype), cpu->vector_floats);
    if (cpu->gemm == MOEGEN_CPU_GEMM_AMX && !amx_shapes_fit(spec))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm amx needs hidden_size and the intermediate sizes to be multiples "
                                "of 32 (got %lld, %lld%s)",
                                (long long)spec->hidden_size, (long long)spec->moe_intermediate_size,
                                spec->shared.count ? " and the shared experts'" : "");
    if (cpu->gemm == MOEGEN_CPU_GEMM_AMX && (cpu->block_rows % 16 != 0 || cpu->block_cols % 16 != 0))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm amx needs cpu.block_rows and cpu.block_cols to be multiples of "
                                "16 (got %d, %d)",
                                cpu->block_rows, cpu->block_cols);
    if (cpu->vector_floats != 4 && cpu->vector_floats != 8 && cpu->vector_floats != 16)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.vector_floats must be 4, 8 or 16 (got %d)",
                                cpu->vector_floats);
    if (cpu->tile_rows < 1 || cpu->tile_rows > 8)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_rows must be in 1..8 (got %d)", cpu->tile_rows);
    if (!outer && cpu->tile_cols != 1 && cpu->tile_cols != 2 && cpu->tile_cols != 4 && cpu->tile_cols != 8)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_cols must be 1, 2, 4 or 8 (got %d)",
                                cpu->tile_cols);
    if (outer && (cpu->tile_cols < 1 || cpu->tile_cols > 16))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.tile_cols must be in 1..16 with cpu.gemm outer (got %d)",
                                cpu->tile_cols);
    /* outer: tile_cols x tile_rows accumulators, tile_rows token vectors and one broadcast
     * weight must fit the register file, or the micro-kernel spills */
    const int registers = cpu->vector_floats == 16 ? 32 : 16;
    if (outer && cpu->tile_cols * cpu->tile_rows + cpu->tile_rows + 1 > registers)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm outer: a %d x %d tile needs %d vector registers; "
                                "vector_floats %d has %d",
                                cpu->tile_cols, cpu->tile_rows, cpu->tile_cols * cpu->tile_rows + cpu->tile_rows + 1,
                                cpu->vector_floats, registers);
    if (outer && cpu->block_rows % (cpu->tile_rows * cpu->vector_floats) != 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "variant: cpu.gemm outer needs cpu.block_rows (%d) to be a multiple of "
                                "tile_rows x vector_floats (%d)",
                                cpu->block_rows, cpu->tile_rows * cpu->vector_floats);
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
    if (variant->backend == MOEGEN_BACKEND_CUDA) {
        const moegen_cuda_variant *cuda = &variant->cuda;
        snprintf(buf, size, "cuda_sm%d_%s_e%dk%d_h%lldf%lld_m%dn%dk%ds%dw%dx%dr%d_%.8s", cuda->sm,
                 moegen_dtype_name(spec->dtype), spec->num_experts, spec->top_k,
                 (long long)spec->hidden_size, (long long)spec->moe_intermediate_size, cuda->tile_m,
                 cuda->tile_n, cuda->tile_k, cuda->stages, cuda->warps_m, cuda->warps_n,
                 cuda->router_tokens, hash);
        return;
    }
    const moegen_cpu_variant *cpu = &variant->cpu;
    const char *gemm = moegen_cpu_gemm_name(cpu->gemm);
    snprintf(buf, size, "cpu_%s_e%dk%d_h%lldf%lld_v%dr%dc%db%dx%dq%d%s_%.8s",
             moegen_dtype_name(spec->dtype), spec->num_experts, spec->top_k,
             (long long)spec->hidden_size, (long long)spec->moe_intermediate_size,
             cpu->vector_floats, cpu->tile_rows, cpu->tile_cols, cpu->block_rows,
             cpu->block_cols, cpu->router_block, gemm ? gemm : "unknown", hash);
}
