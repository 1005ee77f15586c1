/* spec_sampler.h — random valid specs across the whole spec space, for the differential
 * sweep (tests/sweep/sweep.c) and the fuzz targets (tests/fuzz/).
 *
 * A sample is YAML text, written field by field from choices drawn from a source:
 * a seeded generator (the sweep: the same seed gives the same spec on every machine)
 * or the bytes of a fuzz input (libFuzzer steers the choices). Every field of
 * specs/README.md can be drawn, each only where it applies, and every cross-field rule
 * of gen/spec.c is respected by construction, so a sample the loader rejects is a bug
 * in one of the two (test_sweep_sampler checks that none is rejected and that every
 * value of every field is drawn).
 *
 * Sizes are kept small (the sweep compiles and runs hundreds of layers on a laptop);
 * the limits below set how small.
 */
#ifndef MOEGEN_TESTS_SPEC_SAMPLER_H
#define MOEGEN_TESTS_SPEC_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

/* Where choices come from. */
typedef struct moe_choices {
    uint64_t state;        /* seeded: splitmix64 state */
    const uint8_t *bytes;  /* bytes: the fuzz input (NULL for seeded) */
    size_t n_bytes, at;
} moe_choices;

void moe_choices_seeded(moe_choices *c, uint64_t seed);
void moe_choices_from_bytes(moe_choices *c, const uint8_t *data, size_t size);

/* A uniform choice in [0, n) (n >= 1). Bytes run out as zeros. */
uint32_t moe_choose(moe_choices *c, uint32_t n);

typedef struct moe_sample_limits {
    int max_experts;   /* E is drawn up to this (>= 1) */
    int max_top_k;     /* k up to min(this, E, 64) */
    int max_width;     /* hidden and expert sizes up to this, multiples of 16 (>= 16) */
} moe_sample_limits;

/* The sweep's limits: E up to 160, k up to 64, widths up to 256. */
#define MOE_SAMPLE_SWEEP_LIMITS ((moe_sample_limits){160, 64, 256})
/* Small shapes for fuzzing: E up to 16, k up to 16, widths up to 64. */
#define MOE_SAMPLE_SMALL_LIMITS ((moe_sample_limits){16, 16, 64})

/* Write a spec named `name` into yaml (NUL-terminated). Returns 0, or -1 if `size` is too
 * small (2 KiB always suffices). */
int moe_sample_spec(moe_choices *c, const moe_sample_limits *limits, const char *name, char *yaml,
                    size_t size);

#endif
