% -- numerics.cu.tpl — device helpers: storage conversions (bit-exact, round to nearest
% -- even), activations, moegen's counter-based RNG (docs/numerics.md §5) and warp
% -- reductions in a fixed shuffle order (results never depend on timing).
% local moe = import("templates/lib/moe.lua")
/* ---- Numerics -------------------------------------------------------------------- */

#define FULL_MASK 0xffffffffu
#define INF __int_as_float(0x7f800000)
#define FLOAT_MAX 3.402823466e38f
#ifndef INFINITY /* the names templates/common/ uses (NVRTC has no math.h or float.h) */
#define INFINITY INF
#endif
#ifndef FLT_MAX
#define FLT_MAX FLOAT_MAX
#endif

/* The qualifier of the per-token functions both backends share (templates/common/). */
#define TOKEN_FN __device__

% if spec.dtype == "fp32" then
typedef float elem_t;
__device__ __forceinline__ float elem_to_float(elem_t v) { return v; }
__device__ __forceinline__ elem_t float_to_elem(float f) { return f; }
% elseif spec.dtype == "bf16" then
typedef unsigned short elem_t; /* bf16 bits */
__device__ __forceinline__ float elem_to_float(elem_t v) { return __uint_as_float((unsigned)v << 16); }
__device__ __forceinline__ elem_t float_to_elem(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
% else
typedef unsigned short elem_t; /* fp16 bits */
__device__ __forceinline__ float elem_to_float(elem_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ elem_t float_to_elem(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
% end

/* Activations (docs/numerics.md §3). */
% if spec.activation == "relu" then
__device__ __forceinline__ float activation(float z) { return z < 0.0f ? 0.0f : z; } /* NaN stays NaN */
% elseif spec.activation == "gelu" or spec.activation == "geglu" then
__device__ __forceinline__ float activation(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }
% elseif spec.activation == "gelu_tanh" then
__device__ __forceinline__ float activation(float z) {
    return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
}
% else
__device__ __forceinline__ float activation(float z) { return z / (1.0f + expf(-z)); } /* silu */
% end

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

% if moe.uses_rng(spec) then
/* moegen's counter-based RNG: a uniform in (0, 1), an odd multiple of 2^-24. */
__device__ __forceinline__ unsigned long long rng_mix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float rng_uniform(unsigned long long offset, unsigned long long stream,
                                             unsigned long long index) {
    unsigned long long r = rng_mix(RNG_SEED ^ rng_mix(offset ^ rng_mix(stream ^ rng_mix(index))));
    return (float)((r >> 41) * 2 + 1) * 5.9604644775390625e-8f; /* 2^-24 */
}

#define RNG_STREAM_JITTER 1ull
#define RNG_STREAM_GUMBEL 2ull
#define RNG_STREAM_PRIORITY 3ull

% end
/* Warp reductions: a fixed xor-shuffle tree, so every lane gets the same bits every run. */
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

/* Best (value, index) of the warp: larger value wins, then the lower index. Candidates
 * with value -inf (or NaN) lose to every valid one; index INT_MAX marks "none". */
__device__ __forceinline__ void warp_argmax(float &value, int &index) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        float other_value = __shfl_xor_sync(FULL_MASK, value, offset);
        int other_index = __shfl_xor_sync(FULL_MASK, index, offset);
        if (other_value > value || (other_value == value && other_index < index)) {
            value = other_value;
            index = other_index;
        }
    }
}

__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

