/* masked_group_load.c — a minimal reproducer of the compiler bug behind moegen's
 * "wrong combine weights for top-k 3, 5, 6, 7 with capacity" (GCC PR 114375).
 *
 * Debian 12's gcc 12.2.0 at -O3 with AVX2 or AVX-512 vectorizes the loop below over
 * tokens, turns `row[j] >= 0 ? weight[j] : 0` into masked loads grouped by K, and for a
 * K that is not a power of two uses the mask of the first vector of `row` for every
 * masked load of the group: weights of kept routes come out as 0 (or as another route's
 * value). clang and later GCC releases compile it correctly. There is no undefined
 * behaviour here: the three arrays are distinct and every index is in bounds.
 *
 * templates/cpu/dispatch.c.tpl therefore writes the loop in the second form: the load
 * is unconditional and the drop is a select. tests/test_compiler.c compiles this file
 * with the host compiler and the runtime's flags, checks that the second form is always
 * right, and reports whether the compiler miscompiles the first.
 */
#include <stdint.h>

#define DEFINE_PATTERNS(K)                                                                         \
    void conditional_load_k##K(const float *weights, const int32_t *rows, float *out,          \
                               int64_t n_tokens) {                                              \
        for (int64_t t = 0; t < n_tokens; t++) {                                                \
            const float *weight = weights + t * K;                                              \
            const int32_t *row = rows + t * K;                                                  \
            float *final = out + t * K;                                                         \
            for (int j = 0; j < K; j++) final[j] = row[j] >= 0 ? weight[j] : 0.0f;              \
        }                                                                                       \
    }                                                                                           \
    void unconditional_load_k##K(const float *weights, const int32_t *rows, float *out,        \
                                 int64_t n_tokens) {                                            \
        for (int64_t t = 0; t < n_tokens; t++) {                                                \
            const float *weight = weights + t * K;                                              \
            const int32_t *row = rows + t * K;                                                  \
            float *final = out + t * K;                                                         \
            for (int j = 0; j < K; j++) {                                                       \
                const float w = weight[j];                                                      \
                final[j] = row[j] >= 0 ? w : 0.0f;                                              \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_PATTERNS(2)
DEFINE_PATTERNS(3)
DEFINE_PATTERNS(4)
DEFINE_PATTERNS(5)
DEFINE_PATTERNS(6)
DEFINE_PATTERNS(7)
DEFINE_PATTERNS(12)
