/* main.c — a consumer of moegen (tests/test_consumer.sh): calls the layer generated at build
 * time and linked in (moe_consumer.h), and the same spec through libmoegen's JIT, and checks
 * both against a plain double-precision loop written here from docs/numerics.md (softmax over
 * all experts, top-k, SwiGLU experts with w1's gate rows first, no renormalization).
 *
 *   consumer SPEC    prints "linked: <describe>" and one line per check; exit 0 when all pass
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moegen/moegen.h>

#include "moe_consumer.h"

enum { S = 37 };

static float uniform(uint64_t *state) { /* xorshift64*, in [-1, 1) */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((double)((*state * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void fill(float *p, size_t n, float scale, uint64_t *state) {
    for (size_t i = 0; i < n; i++) p[i] = scale * uniform(state);
}

/* y[t] for the spec's routing (softmax over all E, top-k by probability, weights = the
 * probabilities) and SwiGLU experts. */
static void reference(int E, int K, int H, int F, const float *x, const float *wr, const float *w1, const float *w2,
                      double *y) {
    double *p = malloc(sizeof(double) * (size_t)E), *h = malloc(sizeof(double) * (size_t)F);
    int *taken = malloc(sizeof(int) * (size_t)E);
    for (int t = 0; t < S; t++) {
        const float *xt = x + (size_t)t * H;
        double max = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            double z = 0;
            for (int i = 0; i < H; i++) z += (double)wr[(size_t)e * H + i] * xt[i];
            p[e] = z;
            if (z > max) max = z;
        }
        for (int e = 0; e < E; e++) sum += (p[e] = exp(p[e] - max));
        for (int e = 0; e < E; e++) p[e] /= sum;
        memset(taken, 0, sizeof(int) * (size_t)E);
        for (int i = 0; i < H; i++) y[(size_t)t * H + i] = 0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
            taken[best] = 1;
            const float *g = w1 + (size_t)best * 2 * F * H, *u = g + (size_t)F * H, *d = w2 + (size_t)best * H * F;
            for (int f = 0; f < F; f++) {
                double a = 0, b = 0;
                for (int i = 0; i < H; i++) {
                    a += (double)g[(size_t)f * H + i] * xt[i];
                    b += (double)u[(size_t)f * H + i] * xt[i];
                }
                h[f] = a / (1 + exp(-a)) * b;
            }
            for (int i = 0; i < H; i++) {
                double o = 0;
                for (int f = 0; f < F; f++) o += (double)d[(size_t)i * F + f] * h[f];
                y[(size_t)t * H + i] += p[best] * o;
            }
        }
    }
    free(p);
    free(h);
    free(taken);
}

static int check(const char *what, const float *got, const double *want, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double err = fabs((double)got[i] - want[i]) / (1e-3 + fabs(want[i]));
        if (!(err <= worst)) worst = err; /* NaN counts as the worst */
    }
    const int ok = worst <= 1e-3;
    printf("%s: %s (max relative error %.3g over %zu values)\n", what, ok ? "ok" : "FAIL", worst, n);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: consumer SPEC\n");
        return 2;
    }
    const moegen_kernel_info *info = moe_consumer_info();
    printf("linked: %s\n", moe_consumer_describe());
    printf("linked spec: %s\n", MOE_CONSUMER_SPEC_SHA256);
    const int E = info->num_experts, K = info->top_k, H = (int)info->hidden_size, F = (int)info->ffn_size;
    printf("shape: E=%d k=%d H=%d F=%d\n", E, K, H, F);
    if (info->dtype != 0 || info->ffn_rows != 2 * F) {
        fprintf(stderr, "consumer: the spec must be fp32 SwiGLU\n");
        return 2;
    }
    float *x = malloc(sizeof(float) * S * H), *wr = malloc(sizeof(float) * (size_t)E * H);
    float *w1 = malloc(sizeof(float) * (size_t)E * 2 * F * H), *w2 = malloc(sizeof(float) * (size_t)E * H * F);
    float *y = malloc(sizeof(float) * S * H), *y_jit = malloc(sizeof(float) * S * H);
    double *want = malloc(sizeof(double) * S * H);
    uint64_t state = 0x9e3779b97f4a7c15ull;
    fill(x, (size_t)S * H, 1.0f, &state);
    fill(wr, (size_t)E * H, 0.5f, &state);
    fill(w1, (size_t)E * 2 * F * H, 0.2f, &state);
    fill(w2, (size_t)E * H * F, 0.2f, &state);
    reference(E, K, H, F, x, wr, w1, w2, want);

    /* generate-and-link: the generated forward, called directly */
    const size_t bytes = moe_consumer_workspace_bytes(S);
    void *workspace = aligned_alloc(64, (bytes + 63) / 64 * 64);
    moegen_kernel_outputs out;
    memset(&out, 0, sizeof out);
    out.y = y;
    moegen_kernel_args args;
    memset(&args, 0, sizeof args);
    args.abi_version = MOEGEN_KERNEL_ABI_VERSION;
    args.n_tokens = S;
    args.x = x;
    args.w.router_w = wr;
    args.w.w1 = w1;
    args.w.w2 = w2;
    args.out = &out;
    args.workspace = workspace;
    args.workspace_bytes = bytes;
    int failures = 0;
    const int rc = moe_consumer_forward(&args);
    if (rc != MOEGEN_KERNEL_OK) {
        printf("linked forward: FAIL (returned %d)\n", rc);
        failures++;
    } else {
        failures += check("linked forward against the reference", y, want, (size_t)S * H);
    }

    /* JIT: the same spec through libmoegen */
    moegen_layer *layer = NULL;
    moegen_error err;
    moegen_open_options opts;
    moegen_open_options_init(&opts);
    opts.device = MOEGEN_DEVICE_CPU;
    moegen_weights w;
    memset(&w, 0, sizeof w);
    w.router_w = wr;
    w.w1 = w1;
    w.w2 = w2;
    moegen_forward_io io;
    memset(&io, 0, sizeof io);
    io.n_tokens = S;
    io.x = x;
    io.y = y_jit;
    if (moegen_layer_open_file(argv[1], &opts, &layer, &err) != MOEGEN_OK ||
        moegen_layer_bind(layer, &w, &err) != MOEGEN_OK || moegen_layer_forward(layer, &io, NULL, &err) != MOEGEN_OK) {
        printf("jit forward: FAIL (%s)\n", err.message);
        failures++;
    } else {
        moegen_layer_desc desc;
        if (moegen_layer_describe(layer, &desc) == MOEGEN_OK) printf("jit spec: %s\n", desc.spec_hash);
        failures += check("jit forward against the reference", y_jit, want, (size_t)S * H);
    }
    moegen_layer_close(layer);
    free(x);
    free(wr);
    free(w1);
    free(w2);
    free(y);
    free(y_jit);
    free(want);
    free(workspace);
    printf("%s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
