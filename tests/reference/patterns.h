/* patterns.h — special input data laid over seeded random tensors, shared by the test
 * matrix (tests/test_forward.c) and the differential sweep (tests/sweep/sweep.c).
 */
#ifndef MOEGEN_TESTS_PATTERNS_H
#define MOEGEN_TESTS_PATTERNS_H

#include "spec.h"
#include "tensors.h"

typedef enum moe_data_pattern {
    MOE_DATA_RANDOM = 0,
    MOE_DATA_TIES,       /* duplicated router rows: exact logit ties */
    MOE_DATA_NONFINITE,  /* router_b (when present) = NaN, +Inf, -Inf, +1e30, -1e30, +Inf;
                            every 7th token's input row is NaN */
    MOE_DATA_HOT_EXPERT, /* expert E/2 wins nearly every token's first choice */
    MOE_DATA_IDENTITY,   /* relu experts with W1 = [I; -I], W2 = [I, -I] (needs F = 2H):
                            y = sum of weights * x */
    MOE_DATA_PATTERN_COUNT
} moe_data_pattern;

/* Short name of a pattern ("random", "ties", ...). */
const char *moe_data_pattern_name(moe_data_pattern pattern);

/* Apply `pattern` to tensors filled by moe_tensors_fill. */
void moe_tensors_apply_pattern(const moegen_spec *spec, moe_tensors *ts, moe_data_pattern pattern);

#endif
