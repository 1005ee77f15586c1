% -- layer.cu.tpl — entry template of the CUDA backend: one CUDA C++ source holding every
% -- kernel of the MoE forward for one spec, compiled by NVRTC at load time. The stages
% -- mirror the CPU backend's (docs/numerics.md is the contract for both):
% --   numerics (storage conversion, activations, RNG, warp reductions)
% --   -> router (fp32 logit GEMM, scores, group-limited top-k, loss terms)
% --   -> dispatch (capacity, drop priority, expert-contiguous rows, GEMM problem table)
% --   -> gemm (grouped expert GEMMs: tensor cores for fp16/bf16, FMA for fp32)
% --   -> combine (weighted sum in slot order, residual, shared) -> losses;
% --   and the training backward (backward: the same phases as the CPU backward's).
% -- The launch order, the threads per block of every kernel and the argument struct are
% -- in templates/common/moegen_cuda_abi.h (shared with the runtime, which launches them).
% local moe = import("templates/lib/moe.lua")
% include("templates/common/header.tpl")
#include "moegen_cuda_abi.h"

/* ---- Layer constants (every size is a compile-time constant; only the token count
 *      varies between calls) -------------------------------------------------------- */
#define NUM_EXPERTS ${spec.num_experts}
#define TOP_K ${spec.top_k}
#define HIDDEN ${spec.hidden_size}
#define FFN ${spec.ffn_size}
#define FFN_ROWS ${spec.ffn_rows} /* rows of w1: ${spec.gated and "gate and up halves" or "no gate"} */
#define SHARED_EXPERTS ${spec.shared.count}
% if spec.shared.count > 0 then
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
#define RNG_SEED ((unsigned long long)${spec.router.seed_hi} << 32 | (unsigned long long)${spec.router.seed_lo}u)
% end
#define ROUTED_SCALING_FACTOR ${f32(spec.router.routed_scaling_factor)}
% if moe.uses_jitter(spec) then
#define INPUT_JITTER ${f32(spec.router.input_jitter)}
% end
#define WEIGHT_SUM_EPS 1e-20f /* clamp of weight sums before dividing */
#define PAD_TO_CAPACITY ${spec.capacity.pad_to_capacity and spec.capacity.mode ~= "dropless" and 1 or 0}

/* Tiles (variant ${variant.name}). */
#define TILE_M ${variant.cuda.tile_m}
#define TILE_N ${variant.cuda.tile_n}
#define TILE_K ${variant.cuda.tile_k}
#define STAGES ${variant.cuda.stages}
#define WARPS_M ${variant.cuda.warps_m}
#define WARPS_N ${variant.cuda.warps_n}
#define GEMM_THREADS MOEGEN_CUDA_GEMM_THREADS(WARPS_M, WARPS_N) /* moegen_cuda_abi.h */
#define ROUTER_TOKENS ${variant.cuda.router_tokens}

static_assert(HIDDEN % 16 == 0 && FFN % 16 == 0, "sizes are multiples of 16 (validated by the spec loader)");
static_assert(TILE_M % (16 * WARPS_M) == 0 && TILE_N % (16 * WARPS_N) == 0, "warp tiles are multiples of 16");

% include("templates/cuda/numerics.cu.tpl")
% include("templates/cuda/problems.cu.tpl")
#if !defined(MOEGEN_CUDA_BACKWARD_ONLY) /* defined only by tests/cuda_emulator.h, which runs the
                                           backward's kernels on the host (no warp intrinsics or
                                           PTX there) */
% include("templates/cuda/router.cu.tpl")
% include("templates/cuda/dispatch.cu.tpl")
% include("templates/cuda/gemm.cu.tpl")
% include("templates/cuda/combine.cu.tpl")
% include("templates/cuda/ep.cu.tpl")
% include("templates/cuda/host.cu.tpl")
#endif
% include("templates/cuda/backward.cu.tpl")
