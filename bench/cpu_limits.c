/* cpu_limits.c — the limits of this CPU that bench/cpu.sh divides by, measured in the same run:
 *
 *   fp32 FMA peak         16 independent chains of vfmadd on zmm registers per thread;
 *   bf16 dot-product peak 16 independent chains of vdpbf16ps (when the CPU has avx512_bf16);
 *   AMX bf16 peak         4 independent tdpbf16ps accumulators (when the CPU has amx_bf16 and
 *                         the kernel grants the tile data permission; skipped with the reason
 *                         otherwise);
 *   read bandwidth        a sum over a buffer several times the size of L3.
 *
 *   moegen_cpu_limits [--threads 1,2] [--seconds S] [--buffer-mib N]
 *
 * Each figure is measured on every thread count asked for (threads run the same kernel at
 * once, each on its own data), TRIALS times; the best trial is the limit. Prints one JSON
 * line on stdout. Nothing here uses moegen: it is the ruler, not the thing measured.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TRIALS 3
#define MAX_THREADS 64
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- what the CPU has (CPUID leaf 7) ------------------------------------------------------- */

typedef struct cpu_features {
    int avx512f, avx512_bf16, amx_tile, amx_bf16;
} cpu_features;

static cpu_features cpu_features_read(void) {
    cpu_features f = {0};
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx512f = (b >> 16) & 1;
        f.amx_bf16 = (d >> 22) & 1;
        f.amx_tile = (d >> 24) & 1;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1;
    return f;
}

/* ---- the kernels: each runs `iters` steps and returns a value that depends on all of them ---- */

__attribute__((target("avx512f"))) static float fma_kernel(uint64_t iters, float seed) {
    const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    __m512 r[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_set1_ps(seed + (float)j);
    for (uint64_t i = 0; i < iters; i++) {
        for (int j = 0; j < 16; j++) r[j] = _mm512_fmadd_ps(r[j], b, c);
    }
    __m512 s = r[0];
    for (int j = 1; j < 16; j++) s = _mm512_add_ps(s, r[j]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) static float dpbf16_kernel(uint64_t iters, float seed) {
    const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(seed));
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
    __m512 r[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_set1_ps((float)j);
    for (uint64_t i = 0; i < iters; i++) {
        for (int j = 0; j < 16; j++) r[j] = _mm512_dpbf16_ps(r[j], a, b);
    }
    __m512 s = r[0];
    for (int j = 1; j < 16; j++) s = _mm512_add_ps(s, r[j]);
    return _mm512_reduce_add_ps(s);
}

/* The AMX tile configuration (palette 1): tiles 0-3 accumulate 16x16 fp32, tiles 4-7 hold
 * 16 rows of 32 bf16 each. */
typedef struct __attribute__((packed, aligned(64))) amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

__attribute__((target("amx-tile,amx-bf16"))) static float amx_kernel(uint64_t iters, float seed) {
    static __thread uint16_t ab[4][16 * 32] __attribute__((aligned(64)));
    static __thread float out[16 * 16] __attribute__((aligned(64)));
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    for (int i = 0; i < 4 * 16 * 32; i++) ab[i / 512][i % 512] = (uint16_t)(0x3a00 + (int)seed); /* small bf16s */
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ab[0], 64);
    _tile_loadd(5, ab[1], 64);
    _tile_loadd(6, ab[2], 64);
    _tile_loadd(7, ab[3], 64);
    for (uint64_t i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}

/* ---- running a kernel on N threads at once ---------------------------------------------------- */

typedef enum kernel_kind { K_FMA, K_DPBF16, K_AMX, K_READ } kernel_kind;

typedef struct bench_ctx {
    kernel_kind kind;
    uint64_t iters;
    int n_threads;
    const float *buffer; /* K_READ: the buffer, split evenly between threads */
    size_t n_floats;
    pthread_barrier_t start;
} bench_ctx;

typedef struct worker_arg {
    bench_ctx *ctx;
    int index;
    volatile float result; /* keeps the kernel's work observable */
} worker_arg;

__attribute__((target("avx512f"))) static float read_kernel(const float *p, size_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
        s4 = _mm512_add_ps(s4, _mm512_load_ps(p + i + 64));
        s5 = _mm512_add_ps(s5, _mm512_load_ps(p + i + 80));
        s6 = _mm512_add_ps(s6, _mm512_load_ps(p + i + 96));
        s7 = _mm512_add_ps(s7, _mm512_load_ps(p + i + 112));
    }
    s0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)),
                       _mm512_add_ps(_mm512_add_ps(s4, s5), _mm512_add_ps(s6, s7)));
    return _mm512_reduce_add_ps(s0);
}

static void *worker(void *p) {
    worker_arg *w = p;
    bench_ctx *ctx = w->ctx;
    pthread_barrier_wait(&ctx->start);
    float r = 0.0f;
    switch (ctx->kind) {
    case K_FMA: r = fma_kernel(ctx->iters, (float)w->index); break;
    case K_DPBF16: r = dpbf16_kernel(ctx->iters, (float)w->index); break;
    case K_AMX: r = amx_kernel(ctx->iters, (float)w->index); break;
    case K_READ: {
        size_t per = ctx->n_floats / (size_t)ctx->n_threads / 128 * 128;
        r = read_kernel(ctx->buffer + (size_t)w->index * per, per);
        break;
    }
    }
    w->result = r;
    return NULL;
}

/* Wall time of one run of `kind` on n threads (the main thread is one of them). */
static double run_once(bench_ctx *ctx) {
    pthread_t threads[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    pthread_barrier_init(&ctx->start, NULL, (unsigned)ctx->n_threads + 1);
    for (int i = 0; i < ctx->n_threads; i++) {
        args[i] = (worker_arg){ctx, i, 0.0f};
        pthread_create(&threads[i], NULL, worker, &args[i]);
    }
    pthread_barrier_wait(&ctx->start);
    const double t0 = now_s();
    for (int i = 0; i < ctx->n_threads; i++) pthread_join(threads[i], NULL);
    const double t = now_s() - t0;
    pthread_barrier_destroy(&ctx->start);
    return t;
}

/* Best-of-TRIALS rate on n threads: flops (or bytes) per second over all threads. */
static double best_rate(kernel_kind kind, int n_threads, double seconds, double work_per_iter,
                        const float *buffer, size_t n_floats) {
    bench_ctx ctx = {.kind = kind, .n_threads = n_threads, .buffer = buffer, .n_floats = n_floats};
    if (kind == K_READ) {
        ctx.iters = 1;
        const size_t per = n_floats / (size_t)n_threads / 128 * 128;
        work_per_iter = (double)per * sizeof(float) * n_threads;
        run_once(&ctx); /* warm-up: page tables, frequency */
    } else {
        ctx.iters = 1000;
        double t = run_once(&ctx);
        while (t < 0.02) { /* calibrate to about `seconds` per trial */
            ctx.iters *= 4;
            t = run_once(&ctx);
        }
        ctx.iters = (uint64_t)((double)ctx.iters * seconds / t) + 1;
        work_per_iter *= n_threads;
    }
    double best = 0.0;
    for (int trial = 0; trial < TRIALS; trial++) {
        const double t = run_once(&ctx);
        const double rate = work_per_iter * (double)ctx.iters / t;
        if (rate > best) best = rate;
    }
    return best;
}

static int amx_permission(char *why, size_t n) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        snprintf(why, n, "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused (kernel without AMX support?)");
        return -1;
    }
    return 0;
}

static void print_rates(const char *key, const double *rates, const int *threads, int n_threads, double scale) {
    printf("\"%s\": {", key);
    for (int i = 0; i < n_threads; i++) printf("%s\"%d\": %.3f", i ? ", " : "", threads[i], rates[i] / scale);
    printf("}");
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, n_threads = 2;
    double seconds = 0.2;
    long buffer_mib = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = 0;
            for (char *p = argv[++i]; *p && n_threads < 8;) {
                threads[n_threads] = (int)strtol(p, &p, 10);
                if (threads[n_threads] < 1 || threads[n_threads] > MAX_THREADS) {
                    fprintf(stderr, "moegen_cpu_limits: threads must be 1..%d\n", MAX_THREADS);
                    return 2;
                }
                n_threads++;
                if (*p == ',') p++;
            }
        } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--buffer-mib") && i + 1 < argc) {
            buffer_mib = atol(argv[++i]);
        } else {
            fprintf(stderr, "usage: moegen_cpu_limits [--threads 1,2] [--seconds S] [--buffer-mib N]\n");
            return 2;
        }
    }
    const cpu_features f = cpu_features_read();
    if (!f.avx512f) {
        printf("{\"error\": \"this CPU has no AVX-512; the limits are measured with zmm kernels only\"}\n");
        return 1;
    }
    /* The read buffer: at least 6 times L3 and 1 GiB, unless --buffer-mib says otherwise. */
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    size_t bytes = (size_t)(buffer_mib > 0 ? buffer_mib : 1024) << 20;
    if (buffer_mib <= 0 && l3 > 0 && (size_t)l3 * 6 > bytes) bytes = (size_t)l3 * 6;
    float *buffer = aligned_alloc(4096, bytes);
    if (!buffer) {
        printf("{\"error\": \"cannot allocate the %zu-byte read buffer\"}\n", bytes);
        return 1;
    }
    const size_t n_floats = bytes / sizeof(float);
    for (size_t i = 0; i < n_floats; i++) buffer[i] = (float)(i & 1023) * 1e-3f;

    double fma[8], dp[8], amx[8], rd[8];
    char amx_why[160] = "";
    int have_amx = f.amx_tile && f.amx_bf16;
    if (!have_amx) snprintf(amx_why, sizeof amx_why, "the CPU has no amx_bf16");
    else if (amx_permission(amx_why, sizeof amx_why) != 0) have_amx = 0;
    for (int i = 0; i < n_threads; i++) {
        fma[i] = best_rate(K_FMA, threads[i], seconds, 16.0 * 16 * 2, NULL, 0);
        dp[i] = f.avx512_bf16 ? best_rate(K_DPBF16, threads[i], seconds, 16.0 * 32 * 2, NULL, 0) : 0.0;
        amx[i] = have_amx ? best_rate(K_AMX, threads[i], seconds, 4.0 * 16 * 16 * 32 * 2, NULL, 0) : 0.0;
        rd[i] = best_rate(K_READ, threads[i], seconds, 0.0, buffer, n_floats);
    }
    printf("{");
    print_rates("fp32_fma_gflops", fma, threads, n_threads, 1e9);
    if (f.avx512_bf16) {
        printf(", ");
        print_rates("bf16_dp_gflops", dp, threads, n_threads, 1e9);
    } else {
        printf(", \"bf16_dp_gflops\": null, \"bf16_dp_skipped\": \"the CPU has no avx512_bf16\"");
    }
    if (have_amx) {
        printf(", ");
        print_rates("amx_bf16_gflops", amx, threads, n_threads, 1e9);
    } else {
        printf(", \"amx_bf16_gflops\": null, \"amx_skipped\": \"%s\"", amx_why);
    }
    printf(", ");
    print_rates("read_gbs", rd, threads, n_threads, 1e9);
    printf(", \"read_buffer_bytes\": %zu, \"l3_bytes\": %ld, \"trials\": %d}\n", bytes, l3, TRIALS);
    free(buffer);
    return 0;
}
