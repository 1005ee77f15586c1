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

typedef struct moegen_cpu_variant {
    int vector_floats; /* floats per SIMD vector in the micro-kernel: 4, 8 or 16 */
    int tile_rows;     /* token rows per micro-kernel tile: 1..8 */
    int tile_cols;     /* weight rows per micro-kernel tile: 1, 2, 4 or 8 (even when gated) */
    int block_rows;    /* token rows per parallel task: a multiple of tile_rows */
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
    int cuda_sm;           /* compute capability x10 of the CUDA target (0: 80) */
} moegen_target;

/* The default variant for (spec, backend, target): the single place where tile and
 * blocking heuristics live. `target` may be NULL (portable defaults). */
void moegen_variant_default(const moegen_spec *spec, moegen_backend backend,
                            const moegen_target *target, moegen_variant *out);

/* Check a variant against a spec (sweeps produce candidates that may not fit).
 * Returns MOEGEN_OK or MOEGEN_ERR_INVALID_ARGUMENT naming the offending field. */
moegen_status moegen_variant_check(const moegen_spec *spec, const moegen_variant *variant,
                                   moegen_error *err);

/* The variant's name, "<backend>_<dtype>_e<E>k<K>_h<H>f<F>_<tiles>_<spechash8>", e.g.
 * "cpu_bf16_e8k2_h4096f14336_v8r3c4b48x64_1a2b3c4d". */
void moegen_variant_name(const moegen_spec *spec, const moegen_variant *variant, char *buf,
                         size_t size);

#endif
