/* variant.h — kernel variants: the tunable choices a template is rendered with.
 *
 * Place in the pipeline: spec -> [gen: variant + templates] -> compile -> load -> launch.
 * A variant holds every tile / blocking choice of one backend. The spec fixes what
 * is computed; the variant fixes how. moegen_variant_default() is the one heuristic
 * that picks a variant for a spec and target; an autotuner enumerates others, checks
 * them with moegen_variant_check() and renders each. A variant's name is its
 * identity: it appears in generated code, symbol names, logs and cache keys.
 */
#ifndef MOEGEN_GEN_VARIANT_H
#define MOEGEN_GEN_VARIANT_H

#include <stddef.h>

#include "spec.h"

typedef enum moegen_backend { MOEGEN_BACKEND_CPU = 0, MOEGEN_BACKEND_CUDA = 1 } moegen_backend;

/* How the CPU expert GEMMs multiply (docs/numerics.md §6). */
typedef enum moegen_cpu_gemm {
    MOEGEN_CPU_GEMM_FMA = 0,      /* every dtype widened to fp32, fp32 FMA */
    MOEGEN_CPU_GEMM_BF16_DOT = 1, /* bf16 layers: AVX-512 BF16 vdpbf16ps (needs vector_floats 16) */
    MOEGEN_CPU_GEMM_AMX = 2,      /* bf16 layers: AMX tiles (tdpbf16ps) for the expert GEMMs; needs
                                     vector_floats 16 and H, F multiples of 32; falls back to
                                     widen + FMA where the OS does not grant AMX */
    MOEGEN_CPU_GEMM_OUTER = 3,    /* fp32 layers: outer products over packed token panels (a weight
                                     value broadcast against a vector of tokens); tile_rows counts
                                     token vectors of vector_floats rows */
} moegen_cpu_gemm;

/* The name of a moegen_cpu_gemm as templates and variant names spell it ("fma",
 * "bfdot", "amx", "outer"), NULL for a value that is not one. */
const char *moegen_cpu_gemm_name(moegen_cpu_gemm gemm);

typedef struct moegen_cpu_variant {
    moegen_cpu_gemm gemm;
    int vector_floats; /* floats per SIMD vector in the micro-kernel: 4, 8 or 16 */
    int tile_rows;     /* token rows per micro-kernel tile: 1..8 (gemm outer: token vectors) */
    int tile_cols;     /* weight rows per micro-kernel tile: 1, 2, 4 or 8 (gemm outer: 1..16);
                          even when gated */
    int block_rows;    /* token rows per parallel task: a multiple of tile_rows (gemm outer: of
                          tile_rows x vector_floats) */
    int block_cols;    /* weight rows per parallel task: a multiple of tile_cols */
    int router_block;  /* tokens per router task (also the loss-reduction block) */
} moegen_cpu_variant;

/* CUDA grouped-GEMM tiles. bf16 / fp16 use tensor cores (mma.sync m16n8k16, fp32
 * accumulate); fp32 uses FMA on CUDA cores (exact fp32, no TF32 rounding). */
typedef struct moegen_cuda_variant {
    int sm;            /* target compute capability x10 (80, 90, ...); part of the name */
    int tile_m;        /* rows (tokens) per CTA tile: 32, 64 or 128 */
    int tile_n;        /* output columns per CTA tile: 32, 64 or 128 */
    int tile_k;        /* k per pipeline stage: 32 or 64 */
    int stages;        /* cp.async pipeline depth: 2..4 */
    int warps_m;       /* warps along M; tile_m / warps_m must be a multiple of 16 */
    int warps_n;       /* warps along N; tile_n / warps_n must be a multiple of 8 (16 for fp32) */
    int router_tokens; /* tokens per router block (logit GEMM tile) */
} moegen_cuda_variant;

typedef struct moegen_variant {
    moegen_backend backend;
    moegen_cpu_variant cpu;
    moegen_cuda_variant cuda;
} moegen_variant;

/* What the variant is for: the machine's capabilities. */
typedef struct moegen_target {
    int cpu_vector_floats; /* widest float vector the host compiler flags enable (4, 8, 16) */
    int cpu_bf16_dot;      /* the flags enable AVX-512 BF16 (vdpbf16ps) */
    int cpu_amx;           /* the CPU has AMX-BF16 (a hint for the heuristic) */
    int cuda_sm;           /* compute capability x10 of the CUDA target (0: 80); from
                              moegen_cuda_arch_parse */
} moegen_target;

/* ---- CUDA architecture names -----------------------------------------------------------
 * The one parser of "sm_XX" in moegen: the `moegen gen --arch` option, the CUDA backend
 * (moegen_open_options.arch, or the device's own name) and the NVRTC layer all call it,
 * and the variant's `sm` comes from it. Accepted: "sm_" + a compute capability x10 from
 * MOEGEN_CUDA_SM_MIN to MOEGEN_CUDA_SM_MAX written without leading zeros, plus an optional
 * suffix: "a" (architecture-specific features: wgmma, TMA, tcgen05; sm_90 on) or "f"
 * (family-portable features; sm_100 on). E.g. sm_70, sm_80, sm_86, sm_90a, sm_100a,
 * sm_100f, sm_120, sm_120f. Whether a given NVRTC can compile for it is a separate
 * question (moegen_nvrtc_supports_arch); whether the CUDA backend supports it is
 * moegen_variant_check's (sm_80 or newer). */
#define MOEGEN_CUDA_SM_MIN 70
#define MOEGEN_CUDA_SM_MAX 121 /* sm_121: GB10 (compute capability 12.1), known to NVRTC 13 */
#define MOEGEN_CUDA_SM_SUFFIX_A_MIN 90  /* first architecture with an "a" target */
#define MOEGEN_CUDA_SM_SUFFIX_F_MIN 100 /* first architecture with an "f" target */

typedef struct moegen_cuda_arch {
    int sm;      /* compute capability x10: 70..120 */
    char suffix; /* '\0', 'a' or 'f' */
} moegen_cuda_arch;

/* Parse `text` (e.g. "sm_90a"). Returns MOEGEN_OK and fills `out` (may be NULL to only
 * check), or MOEGEN_ERR_INVALID_ARGUMENT with a message that quotes `text`, says what is
 * wrong and what is accepted (out untouched). `text` NULL is refused the same way. */
moegen_status moegen_cuda_arch_parse(const char *text, moegen_cuda_arch *out, moegen_error *err);

/* ---- The fields of a variant ---------------------------------------------------------
 * One table (variant.c) lists every tunable field with its backend and name; the
 * overrides parser, the template parameters (gen/emit.c: variant.cpu.<name>,
 * variant.cuda.<name>) and the autotuner all go through it. */
typedef struct moegen_variant_field {
    const char *name;       /* as written in overrides and read by templates, e.g. "tile_rows" */
    moegen_backend backend; /* which sub-struct it lives in */
    int is_gemm;            /* moegen_cpu_gemm, written by name ("fma", "bfdot"); else an int */
    size_t offset;          /* of the int (or enum) in moegen_variant */
} moegen_variant_field;

/* The fields, `*count` of them. */
const moegen_variant_field *moegen_variant_fields(int *count);

/* The value of `field` in `v` (a moegen_cpu_gemm as its int value). */
int moegen_variant_get(const moegen_variant *v, const moegen_variant_field *field);

/* Apply overrides to `v`: `text` is a list of name=value separated by commas or spaces,
 * names from moegen_variant_fields() of v's backend, e.g. "tile_rows=6,gemm=bfdot".
 * NULL or "" changes nothing. Returns MOEGEN_OK, or MOEGEN_ERR_INVALID_ARGUMENT naming
 * the item and what is accepted (v unchanged). It does not check that the result fits
 * the spec: call moegen_variant_check() after it. */
moegen_status moegen_variant_apply_overrides(moegen_variant *v, const char *text, moegen_error *err);

/* The default variant for (spec, backend, target): the single place where tile and
 * blocking heuristics live. `target` may be NULL (portable defaults). */
void moegen_variant_default(const moegen_spec *spec, moegen_backend backend,
                            const moegen_target *target, moegen_variant *out);

/* The default heuristic by token count: where no one variant suits every token count, the
 * default is a list of ranges, each a first token count (the first is 1) and the overrides
 * to apply to moegen_variant_default() from there on ("" for none). Today: fp32 layers
 * with 16-float vectors run the FMA dot products while the experts get few rows and outer
 * products (gemm=outer) from one token vector (16 rows) per expert on average. Expert-parallel
 * layers get one range: bit-identity with ep_size 1 needs one variant for every count.
 * Writes at most `max` ranges; returns how many there are (1 or more). */
typedef struct moegen_variant_range {
    int64_t min_tokens;
    char overrides[128];
} moegen_variant_range;
int moegen_variant_default_ranges(const moegen_spec *spec, const moegen_target *target, moegen_variant_range *out,
                                  int max);
#define MOEGEN_VARIANT_MAX_RANGES 8 /* more than moegen_variant_default_ranges returns */

/* The default heuristic's CPU variant for n_tokens: moegen_variant_default() with the
 * overrides of the last range starting at or below n_tokens (the first range below its
 * start). The one home of that choice (moegen tune times it as each count's baseline; a
 * layer without a database holds all ranges as buckets, tuning_db.c's pick over them is
 * the same rule for ranges without gaps). */
moegen_status moegen_variant_default_for_tokens(const moegen_spec *spec, const moegen_target *target,
                                                int64_t n_tokens, moegen_variant *out, moegen_error *err);

/* Check a variant against a spec (sweeps produce candidates that may not fit).
 * Returns MOEGEN_OK or MOEGEN_ERR_INVALID_ARGUMENT naming the offending field. */
moegen_status moegen_variant_check(const moegen_spec *spec, const moegen_variant *variant,
                                   moegen_error *err);

/* The variant's name, "<backend>_<dtype>_e<E>k<K>_h<H>f<F>_<tiles>_<spechash8>", e.g.
 * "cpu_bf16_e8k2_h4096f14336_v8r3c4b48x64q64fma_1a2b3c4d". */
void moegen_variant_name(const moegen_spec *spec, const moegen_variant *variant, char *buf,
                         size_t size);

/* ---- For tuners (gen/variant_space.c) ----------------------------------------------- */

/* Every field of v's backend as an override list ("gemm=amx,vector_floats=16,..."): applied to
 * any default variant of the same spec and backend it gives back v. */
void moegen_variant_overrides(const moegen_variant *v, char *buf, size_t size);

/* The fields of a spec that matter for choosing kernels, as "key=value" words: backend, E,
 * k, H, F, activation, dtype, ep_size, shared experts, residual MLP, expert bias. Not the
 * name, free text, router details or seeds: two specs with one key tune alike. */
void moegen_variant_shape_key(const moegen_spec *spec, moegen_backend backend, char *buf, size_t size);

/* Candidates for tuning the CPU backend, written to out[0..max): with `around` NULL the
 * coarse stage (every GEMM kind the target has, each with a set of micro-kernel tiles, the
 * default blocking); with `around` a variant, the fine stage (its GEMM kind and tile with a
 * set of task blockings and router blocks). Each candidate passes moegen_variant_check;
 * `*n_invalid` counts the combinations that did not (may be NULL). Duplicates are removed.
 * Returns the number written. */
int moegen_variant_space(const moegen_spec *spec, const moegen_target *target, const moegen_variant *around,
                         moegen_variant *out, int max, int *n_invalid);

#endif
