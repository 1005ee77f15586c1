/* activation_lanes.c — a generated module's vector activation (activation16, the AVX-512
 * epilogue of the AMX kernels) against its scalar one (activation, which the backward uses for
 * kept activations): the same bits on every 997th fp32 bit pattern and on the edges (zeros,
 * infinities, NaN, the exp clamp points, subnormals); and exp_fp32 within 2 ulp of e^x in
 * double on [-87, 88]. Compiled by test_activation_lanes.sh with MODULE naming the generated
 * source and the module's own compiler flags. Exit 0: all good; 1: a mismatch (printed). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include MODULE

static unsigned mismatches;

static void check(float z) {
    float lanes[16], vector[16];
    for (int i = 0; i < 16; i++) lanes[i] = z;
    _mm512_storeu_ps(vector, activation16(_mm512_loadu_ps(lanes)));
    const float scalar = activation(z);
    uint32_t a, b;
    memcpy(&a, &scalar, sizeof a);
    memcpy(&b, &vector[0], sizeof b);
    if (a != b && !(isnan(scalar) && isnan(vector[0])) && mismatches++ < 5)
        printf("mismatch: z = %a: scalar %a, vector %a\n", z, scalar, vector[0]);
}

int main(void) {
    const float edges[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, EXP_OVER, nextafterf(EXP_OVER, INFINITY),
                           EXP_UNDER, nextafterf(EXP_UNDER, -INFINITY), -EXP_OVER, -EXP_UNDER, 1e-40f,
                           -1e-40f, 0x1p-149f, 1e30f, -1e30f, 0.5f, -0.5f};
    for (size_t i = 0; i < sizeof edges / sizeof *edges; i++) {
        check(edges[i]);
        check(-edges[i]);
    }
    for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 997) {
        const uint32_t b = (uint32_t)bits;
        float z;
        memcpy(&z, &b, sizeof z);
        check(z);
    }
    double worst = 0.0;
    for (int i = -870000; i < 880000; i++) {
        const float x = (float)i * 1e-4f;
        const double want = exp((double)x), got = exp_fp32(x);
        const double ulps = fabs(got - want) / ldexp(1.0, ilogb(want) - 23);
        if (ulps > worst) worst = ulps;
    }
    printf("%u mismatches between activation16 and activation; exp_fp32 within %.2f ulp\n", mismatches, worst);
    return mismatches == 0 && worst <= 2.0 ? 0 : 1;
}
