% -- layer.c.tpl — entry template of the CPU backend: one C translation unit holding the
% -- whole MoE forward for one spec. Stages, in data-flow order, each in its own partial:
% --   numerics (storage conversion, activations, RNG) -> gemm (dot-product micro-kernels)
% --   -> router (logits, scores, top-k, losses) -> dispatch (capacity, permutation)
% --   -> ffn (grouped expert GEMMs) -> combine -> entry (workspace, forward, info)
% --   -> backward (the training backward, from the forward's workspace).
% local moe = import("templates/lib/moe.lua")
% include("templates/common/header.tpl")
#include "${gen.header_name}"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- Layer constants (every size is a compile-time constant; only the token count
 *      varies between calls) -------------------------------------------------------- */
#define NUM_EXPERTS ${spec.num_experts}
#define TOP_K ${spec.top_k}
#define HIDDEN ${spec.hidden_size}
#define FFN ${spec.ffn_size}
#define FFN_ROWS ${spec.ffn_rows} /* rows of w1: ${spec.gated and "gate and up halves" or "no gate"} */
% if spec.shared.count > 0 then
#define SHARED_EXPERTS ${spec.shared.count}
#define SHARED_FFN ${spec.shared.ffn_size}
#define SHARED_FFN_ROWS ${spec.shared.ffn_rows}
% end
% if spec.router.n_group > 1 then
#define N_GROUP ${spec.router.n_group}
#define TOPK_GROUP ${spec.router.topk_group}
#define GROUP_TOPM ${spec.router.group_topm}
#define EXPERTS_PER_GROUP ${moe.experts_per_group(spec)}
% end
% if moe.uses_rng(spec) then
#define RNG_SEED ((uint64_t)${spec.router.seed_hi} << 32 | (uint64_t)${spec.router.seed_lo}u)
% end
static const float ROUTED_SCALING_FACTOR = ${f32(spec.router.routed_scaling_factor)};
% if moe.uses_jitter(spec) then
static const float INPUT_JITTER = ${f32(spec.router.input_jitter)};
% end
static const float WEIGHT_SUM_EPS = 1e-20f; /* clamp of weight sums before dividing */

/* Micro-kernel tile and parallel blocking (variant ${variant.name}). */
#define VEC_FLOATS ${variant.cpu.vector_floats}
#define TILE_ROWS ${variant.cpu.tile_rows}
#define TILE_COLS ${variant.cpu.tile_cols}
#define BLOCK_ROWS ${variant.cpu.block_rows}
#define BLOCK_COLS ${variant.cpu.block_cols}
#define ROUTER_BLOCK ${variant.cpu.router_block}

/* 1 where a vfloat is one AVX-512 register (the epilogues' intrinsic forms, numerics.c.tpl). */
#if VEC_FLOATS == 16 && defined(__AVX512F__)
#define VEC_AVX512 1
#else
#define VEC_AVX512 0
#endif

% if variant.cpu.gemm == "bfdot" then
/* bf16 dot products with the AVX-512 BF16 instruction (vdpbf16ps) when the compiler targets
 * it (the host compiler's flags follow this CPU: runtime/host_cc.c); else widen + FMA. */
#if VEC_FLOATS == 16 && defined(__AVX512BF16__)
#include <immintrin.h>
#define DOT_BF16_INSTRUCTION 1
#else
#define DOT_BF16_INSTRUCTION 0
#endif
% else
#define DOT_BF16_INSTRUCTION 0 /* variant gemm ${variant.cpu.gemm}: widen to fp32 + FMA */
% end
% if variant.cpu.gemm == "amx" then
/* The expert GEMMs on AMX tiles (amx.c.tpl) when the compiler targets them and the OS
 * grants them; the router, and everything where AMX is not granted, on widen + FMA. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif
#define KERNEL_PATH_AMX "avx512 + amx-bf16 (tdpbf16ps)"
% end

/* Which instructions the micro-kernels compiled to: moegen_layer_desc.kernel_path. */
#if DOT_BF16_INSTRUCTION
#define KERNEL_PATH "avx512 + avx512bf16 (vdpbf16ps)"
#elif VEC_AVX512
#define KERNEL_PATH "avx512"
#elif VEC_FLOATS == 8 && defined(__AVX2__)
#define KERNEL_PATH "avx2"
#else
#define KERNEL_PATH "generic C vectors"
#endif

_Static_assert(HIDDEN % VEC_FLOATS == 0, "the hidden size must be a multiple of the vector width");
_Static_assert(FFN % VEC_FLOATS == 0, "the ffn size must be a multiple of the vector width");
_Static_assert(BLOCK_ROWS % TILE_ROWS == 0, "a row block must hold whole row tiles");
_Static_assert(BLOCK_COLS % TILE_COLS == 0, "a column block must hold whole column tiles");

% include("templates/cpu/numerics.c.tpl")
% include("templates/cpu/gemm.c.tpl")
% include("templates/cpu/state.c.tpl")
% include("templates/cpu/router.c.tpl")
% include("templates/cpu/dispatch.c.tpl")
% include("templates/cpu/ffn.c.tpl")
% include("templates/cpu/combine.c.tpl")
% include("templates/cpu/entry.c.tpl")
% include("templates/cpu/backward.c.tpl")
