% -- numerics.c.tpl — storage conversions, SIMD vector loads, activations and moegen's
% -- counter-based RNG (docs/numerics.md §5). Everything here is static inline.
% local moe = import("templates/lib/moe.lua")
% local elem = moe.elem_type(spec.dtype)
/* ---- Numerics -------------------------------------------------------------------- */

/* The qualifier of the per-token functions both backends share (templates/common/). */
#define TOKEN_FN static

/* Storage type of layer-dtype tensors (${spec.dtype}). */
typedef ${elem} elem_t;

typedef float vfloat __attribute__((vector_size(VEC_FLOATS * 4)));
typedef uint16_t vu16 __attribute__((vector_size(VEC_FLOATS * 2)));
typedef uint32_t vu32 __attribute__((vector_size(VEC_FLOATS * 4)));

static inline float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline vfloat load_f32(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

% if spec.dtype == "bf16" then
/* bf16 is the top half of an fp32: widening is a shift. */
static inline float elem_to_float(elem_t v) { return bits_to_float((uint32_t)v << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline elem_t float_to_elem(float f) {
    uint32_t bits = float_to_bits(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (elem_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (elem_t)(bits >> 16);
}

static inline vfloat load_bf16(const uint16_t *p) {
    vu16 raw;
    memcpy(&raw, p, sizeof raw);
    vu32 wide = __builtin_convertvector(raw, vu32) << 16;
    return (vfloat)wide;
}
% elseif spec.dtype == "fp16" then
/* IEEE binary16 <-> binary32, bit-exact, round to nearest even, with subnormals. */
static inline float elem_to_float(elem_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f; /* zero or subnormal, exact */
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline elem_t float_to_elem(float f) {
    uint32_t bits = float_to_bits(f);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (elem_t)(sign | 0x7e00u);  /* NaN */
    if (magnitude >= 0x477ff000u) return (elem_t)(sign | 0x7c00u); /* >= 65520: Inf */
    uint32_t exponent = magnitude >> 23;
    if (exponent < 113) {                                          /* below 2^-14: subnormal */
        if (exponent < 102) return (elem_t)sign;                   /* below 2^-25: zero */
        uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - exponent;
        uint32_t quotient = significand >> shift;
        uint32_t remainder = significand & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1);
        if (remainder > halfway || (remainder == halfway && (quotient & 1u))) quotient++;
        return (elem_t)(sign | quotient);
    }
    uint32_t mantissa = magnitude & 0x7fffffu;
    uint32_t result = ((exponent - 112u) << 10) | (mantissa >> 13);
    uint32_t remainder = mantissa & 0x1fffu;
    if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) result++;
    return (elem_t)(sign | result);
}

static inline vfloat load_fp16(const uint16_t *p) {
#if defined(__FLT16_MAX__) && defined(__F16C__)
    typedef _Float16 vhalf __attribute__((vector_size(VEC_FLOATS * 2)));
    vhalf raw;
    memcpy(&raw, p, sizeof raw);
    return __builtin_convertvector(raw, vfloat);
#else
    vfloat v;
    for (int i = 0; i < VEC_FLOATS; i++) v[i] = elem_to_float(p[i]);
    return v;
#endif
}
% else
static inline float elem_to_float(elem_t v) { return v; }
static inline elem_t float_to_elem(float f) { return f; }
% end

/* Horizontal sum in a fixed order (results do not depend on scheduling): the upper half
 * of the lanes added to the lower half until four are left, then (0 + 2) + (1 + 3).
 * Written with lane subscripts, not memcpy through an array: with the array, GCC 12 keeps
 * every accumulator of a micro-kernel in memory (16 loads and stores per k step). */
typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));
static inline float vector_sum(vfloat v) {
#if VEC_FLOATS >= 16
    const vfloat8 v8 = (vfloat8){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]} +
                       (vfloat8){v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
#elif VEC_FLOATS == 8
    const vfloat8 v8 = v;
#endif
#if VEC_FLOATS >= 8
    const vfloat4 v4 = (vfloat4){v8[0], v8[1], v8[2], v8[3]} + (vfloat4){v8[4], v8[5], v8[6], v8[7]};
#else
    const vfloat4 v4 = v;
#endif
    return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

/* One step of a dot product in every lane: c + a * b (contracted to an FMA). */
static inline vfloat dot_step(vfloat c, vfloat a, vfloat b) { return c + a * b; }

% if spec.dtype == "bf16" then
/* bf16 x bf16 dot products take 2 * VEC_FLOATS values per step, as pairs of neighbours. */
#if DOT_BF16_INSTRUCTION
/* vdpbf16ps: each lane adds the products of its pair (odd element first, then even), each
 * addition rounded to fp32; subnormal inputs and results count as zero (numerics.md §6). */
typedef __m512bh bf16_operand;
static inline bf16_operand load_bf16_operand(const uint16_t *p) {
    bf16_operand v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vfloat dot_step_bf16(vfloat c, bf16_operand a, bf16_operand b) {
    return (vfloat)_mm512_dpbf16_ps((__m512)c, a, b);
}
#else
/* Without it: the even elements widen with a shift, the odd ones with a mask. */
typedef struct bf16_operand {
    vfloat even, odd;
} bf16_operand;
static inline bf16_operand load_bf16_operand(const uint16_t *p) {
    vu32 raw;
    memcpy(&raw, p, sizeof raw);
    return (bf16_operand){(vfloat)(raw << 16), (vfloat)(raw & 0xffff0000u)};
}
static inline vfloat dot_step_bf16(vfloat c, bf16_operand a, bf16_operand b) {
    return c + a.even * b.even + a.odd * b.odd;
}
#endif

% end
/* e^x for the activations (docs/numerics.md §3), without libm: n = rint(x log2 e), r = x - n ln 2
 * (two-part ln 2), e^r by a degree-7 polynomial, times 2^n as two powers of two (n up to 128).
 * Within 2 ulp of e^x; 0 below -87.33 (where e^x is subnormal), Inf above 88.72, NaN stays NaN.
 * exp16 below does the same operations on 16 lanes (every multiply-add an explicit fused one,
 * and the result a fused product, so no compiler contracts differently), so a kernel's vector
 * epilogue and scalar code that makes the same activation (the backward's kept activations)
 * agree to the bit. */
#define EXP_OVER 88.72283935546875f
#define EXP_UNDER -87.33654022216797f
static inline float exp_fp32(float x) {
    if (x != x) return x;
    if (x > EXP_OVER) return INFINITY;
    if (x < EXP_UNDER) return 0.0f;
    const float n = nearbyintf(x * 1.44269502162933349609f);
    float r = fmaf(-n, 0.693145751953125f, x);
    r = fmaf(-n, 1.42860682030941723212e-6f, r);
    float q = 1.9875691500e-4f;
    q = fmaf(q, r, 1.3981999507e-3f);
    q = fmaf(q, r, 8.3334519073e-3f);
    q = fmaf(q, r, 4.1665795894e-2f);
    q = fmaf(q, r, 1.6666665459e-1f);
    q = fmaf(q, r, 5.0000001201e-1f);
    q = fmaf(q, r * r, r) + 1.0f;
    const int k = (int)n, k1 = k >> 1, k2 = k - k1; /* arithmetic shift: floor(k / 2) */
    /* the last product as a fused one with 0: a caller's `1 + e^x` cannot be contracted into it */
    return fmaf(q * bits_to_float((uint32_t)(k1 + 127) << 23), bits_to_float((uint32_t)(k2 + 127) << 23), 0.0f);
}

/* Activations (docs/numerics.md §3). */
% if spec.activation == "relu" then
static inline float activation(float z) { return z < 0.0f ? 0.0f : z; } /* NaN stays NaN */
% elseif spec.activation == "gelu" or spec.activation == "geglu" then
static inline float activation(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }
% elseif spec.activation == "gelu_tanh" then
/* 0.5 z (1 + tanh(y)) = z / (1 + e^(-2y)), y = sqrt(2/pi) (z + 0.044715 z^3) */
static inline float activation(float z) {
    const float y2 = 1.59576912160573072f * fmaf(0.044715f * z * z, z, z);
    return z / (1.0f + exp_fp32(-y2));
}
% else
static inline float activation(float z) { return z / (1.0f + exp_fp32(-z)); } /* silu */
% end

#if defined(__AVX512F__)
#include <immintrin.h>
/* exp_fp32 and activation on 16 lanes: the same operations, the same bits. */
static inline __m512 exp16(__m512 x) {
    const __mmask16 over = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_OVER), _CMP_GT_OQ);
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_UNDER), _CMP_LT_OQ);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512 xc = _mm512_mask_blend_ps(over | under | nan, x, _mm512_setzero_ps());
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269502162933349609f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i k = _mm512_cvtps_epi32(n), k1 = _mm512_srai_epi32(k, 1), k2 = _mm512_sub_epi32(k, k1);
    const __m512i bias = _mm512_set1_epi32(127);
    const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, bias), 23));
    const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k2, bias), 23));
    __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(q, s1), s2, _mm512_setzero_ps());
    e = _mm512_mask_blend_ps(over, e, _mm512_set1_ps(INFINITY));
    e = _mm512_mask_blend_ps(under, e, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(nan, e, x);
}

%   if spec.activation == "relu" then
static inline __m512 activation16(__m512 z) { /* z < 0 ? 0 : z; NaN stays NaN */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), z, _mm512_setzero_ps());
}
%   elseif spec.activation == "gelu" or spec.activation == "geglu" then
static inline __m512 activation16(__m512 z) { /* erff has no vector form here: lane by lane */
    float lanes[16];
    _mm512_storeu_ps(lanes, z);
    for (int i = 0; i < 16; i++) lanes[i] = activation(lanes[i]);
    return _mm512_loadu_ps(lanes);
}
%   elseif spec.activation == "gelu_tanh" then
static inline __m512 activation16(__m512 z) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), z), z);
    const __m512 y2 = _mm512_mul_ps(_mm512_set1_ps(1.59576912160573072f), _mm512_fmadd_ps(cube, z, z));
    const __m512 minus = _mm512_sub_ps(_mm512_setzero_ps(), y2);
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(minus)));
}
%   else
static inline __m512 activation16(__m512 z) { /* silu */
    const __m512 minus = _mm512_sub_ps(_mm512_setzero_ps(), z);
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(minus)));
}
%   end

/* The activation epilogue of 16 lanes: *gate = scale * *gate (+ b_gate where `biased`), the
 * same for *up when gated (up non-NULL), and the value act(*gate) (* *up). *gate and *up come
 * back as the pre-activations (the backward's input). The scalar epilogues do the same
 * operations on one lane, in the same order. */
static inline __m512 activate16(__m512 scale, __m512 *gate, __m512 *up, int biased, __m512 b_gate, __m512 b_up) {
    *gate = _mm512_mul_ps(scale, *gate);
    if (biased) *gate = _mm512_add_ps(*gate, b_gate);
    if (!up) return activation16(*gate);
    *up = _mm512_mul_ps(scale, *up);
    if (biased) *up = _mm512_add_ps(*up, b_up);
    return _mm512_mul_ps(activation16(*gate), *up);
}

% if spec.dtype == "bf16" then
/* float_to_elem of 16 values, in the low half of each 32-bit lane. */
static inline __m512i round_bf16_16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_and_si512(_mm512_mask_blend_epi32(nan, rounded, quiet), _mm512_set1_epi32(0xffff));
}
% end

/* The `lanes` of v (a mask) to dst[0..16) as elem_t, each as float_to_elem rounds it. */
static inline void store_elems16(elem_t *dst, __mmask16 lanes, __m512 v) {
% if spec.dtype == "fp32" then
    _mm512_mask_storeu_ps(dst, lanes, v);
% elseif spec.dtype == "bf16" then
    _mm512_mask_cvtepi32_storeu_epi16(dst, lanes, round_bf16_16(v));
% else
    float values[16];
    _mm512_storeu_ps(values, v);
    for (int i = 0; i < 16; i++)
        if (lanes >> i & 1) dst[i] = float_to_elem(values[i]);
% end
}

/* Lanes [0, valid) of v to dst[0], dst[stride], ... (the pre-activations of a column). */
static inline void store_lanes16(__m512 v, int valid, float *dst, int64_t stride) {
    float lanes[16];
    _mm512_storeu_ps(lanes, v);
    for (int t = 0; t < valid; t++) dst[t * stride] = lanes[t];
}
#endif

static inline float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

% if moe.uses_rng(spec) then
/* moegen's counter-based RNG: a uniform in (0, 1), an odd multiple of 2^-24. */
static inline uint64_t rng_mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline float rng_uniform(uint64_t offset, uint64_t stream, uint64_t index) {
    uint64_t r = rng_mix(RNG_SEED ^ rng_mix(offset ^ rng_mix(stream ^ rng_mix(index))));
    return (float)((r >> 41) * 2 + 1) * 0x1p-24f;
}

enum { RNG_STREAM_JITTER = 1, RNG_STREAM_GUMBEL = 2, RNG_STREAM_PRIORITY = 3 };

% end
