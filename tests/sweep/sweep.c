/* sweep.c — the differential sweep: random valid specs, each compiled through the real
 * pipeline (templates -> host C compiler -> dlopen), run on random tokens and compared
 * with the independent double-precision reference (tests/reference).
 *
 *   moegen_sweep [--seed S] [--first I] [--count N] [--compiler PROG] [--failures DIR]
 *                [--record DIR] [--backward] [--specs FILE...] [--quiet]
 *
 * Cases I .. I+N-1 of seed S are run. Case i of seed S draws its spec (tests/sweep/spec_sampler.c), its token counts, data
 * pattern (random, exact ties, non-finite logits, a hot expert), thread count and RNG
 * offset from splitmix(S, i), so `--seed S` names the same cases on every machine. With
 * --specs the given files are run instead (the regression specs in tests/regressions/),
 * with data drawn the same way unless the file has a "# plan:" line (which a saved failure
 * has), then with exactly that data. --compiler sets $MOEGEN_CC (the default is the user's
 * default compiler). A failing case prints its seed, index, spec and the first
 * mismatch, and, with --failures, leaves the spec there as a ready-made regression file
 * (--record DIR saves every case that way).
 * Every third case also reruns with another thread count and requires the same bits.
 * With --backward every case also runs a training step (forward that keeps its state, then
 * the backward with aux_coeff 0.3 and z_coeff 0.1; the activations kept in half the cases,
 * recomputed in the others) and checks the gradients against the
 * reference backward on the kernel's routing (tests/reference/verify_backward.h), and the
 * rerun's gradients bit for bit.
 *
 * Exit status: 0 when every case passed, 1 when any failed, 2 on a usage error.
 * CTest runs a short fixed-seed sweep (label `sweep`); scripts/sweep.sh runs long ones.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "moegen.h"
#include "patterns.h"
#include "spec.h"
#include "spec_sampler.h"
#include "backward_io.h"
#include "forward_io.h"
#include "tensors.h"
#include "verify.h"
#include "verify_backward.h"

/* Reference work allowed per forward (double FLOPs): keeps a case to about a second. */
#define REFERENCE_FLOP_BUDGET 3e8
#define MAX_SPEC_BYTES 4096

typedef struct sweep_options {
    uint64_t seed;
    long first, count;
    const char *compiler, *failures, *record;
    char **specs;
    int n_specs, quiet, backward;
} sweep_options;

/* Loss coefficients of the backward cases. */
#define SWEEP_AUX_COEFF 0.3
#define SWEEP_Z_COEFF 0.1

typedef struct case_plan {
    int64_t tokens[2];
    moe_data_pattern pattern;
    int threads, recheck_threads;
    uint64_t data_seed, rng_offset;
    char variant[192]; /* kernel variant overrides (moegen_open_options.variant); "" for the default */
} case_plan;

typedef struct case_outcome {
    int ok;
    double max_scaled_error;
    int64_t near_ties; /* tokens routed differently on a near-tie (allowed) */
    char message[MOEGEN_ERROR_MESSAGE_BYTES + 256];
} case_outcome;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t case_seed(uint64_t seed, long index) { return mix(seed ^ mix((uint64_t)index)); }

/* Expert work of one token in the reference, to keep each case within the budget. */
static double flops_per_token(const moegen_spec *spec) {
    const double H = (double)spec->hidden_size, F = (double)spec->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(spec);
    double flops = spec->top_k * (2.0 * H * F1 + 2.0 * F * H) + 2.0 * H * spec->num_experts;
    if (spec->shared.count > 0) flops += spec->shared.count * 6.0 * H * (double)spec->shared.intermediate_size;
    if (spec->use_residual) flops += 2.0 * H * F1 + 2.0 * F * H;
    return flops;
}

static void plan_case(moe_choices *c, const moegen_spec *spec, int backward, case_plan *plan) {
    static const int64_t TOKENS[] = {0, 1, 2, 3, 5, 17, 33, 64, 100, 257, 400, 1000};
    /* the reference backward costs about three forwards */
    const int64_t cap = (int64_t)(REFERENCE_FLOP_BUDGET / (backward ? 4.0 : 1.0) / flops_per_token(spec));
    for (int i = 0; i < 2; i++) {
        int64_t s = TOKENS[moe_choose(c, sizeof TOKENS / sizeof TOKENS[0])];
        if (s > cap) s = cap > 1 ? cap : 1;
        plan->tokens[i] = s;
    }
    if (plan->tokens[0] == 0 && plan->tokens[1] == 0) plan->tokens[1] = 1;
    const uint32_t p = moe_choose(c, 10);
    plan->pattern = p < 6 ? MOE_DATA_RANDOM : p < 8 ? MOE_DATA_HOT_EXPERT : p < 9 ? MOE_DATA_TIES : MOE_DATA_NONFINITE;
    plan->threads = 1 + (int)moe_choose(c, 3);
    plan->recheck_threads = moe_choose(c, 3) == 0 ? 1 + plan->threads % 3 : 0;
    plan->data_seed = moe_choose(c, 1u << 30);
    plan->rng_offset = moe_choose(c, 4) ? moe_choose(c, 1000) : 0;
    /* Half the cases run a random valid kernel variant instead of the default one: every
     * row tile (and so every short-tile kernel), column tile, blocking, vector width, and
     * for bf16 vdpbf16ps or AMX tiles (where the CPU lacks them the module falls back to
     * widen + FMA), and for fp32 outer products. */
    plan->variant[0] = '\0';
    if (moe_choose(c, 2)) {
        static const int COLS[] = {1, 2, 4, 8}, WIDTHS[] = {4, 8, 16};
        int rows = 1 + (int)moe_choose(c, 8);
        int cols = COLS[moe_choose(c, 4)];
        if (cols == 1 && moegen_activation_is_gated(spec->activation)) cols = 2;
        const int width = WIDTHS[moe_choose(c, 3)];
        int block_rows = rows * (1 + (int)moe_choose(c, 16)), block_cols = cols * (1 + (int)moe_choose(c, 16));
        const int router_block = 1 + (int)moe_choose(c, 128);
        const char *gemm = "fma";
        if (spec->dtype == MOEGEN_DTYPE_BF16 && width == 16 && moe_choose(c, 2)) {
            gemm = "bfdot";
            /* AMX tiles where every k is a multiple of 32, with blocks of 16 rows and columns */
            const int64_t shared_f = spec->shared.count > 0 ? spec->shared.intermediate_size : 32;
            if (spec->hidden_size % 32 == 0 && spec->moe_intermediate_size % 32 == 0 && shared_f % 32 == 0 &&
                moe_choose(c, 2)) {
                gemm = "amx";
                block_rows = 16 * rows * (1 + (int)moe_choose(c, 4)); /* a multiple of tile_rows too */
                block_cols = 16 * (1 + (int)moe_choose(c, 8));
            }
        }
        if (spec->dtype == MOEGEN_DTYPE_FP32 && moe_choose(c, 2)) {
            /* outer products: any tile that fits the register file, rows in whole token vectors */
            gemm = "outer";
            const int registers = width == 16 ? 32 : 16;
            do {
                cols = 1 + (int)moe_choose(c, 16);
                if (moegen_activation_is_gated(spec->activation) && cols % 2) cols = cols == 16 ? 16 : cols + 1;
            } while (cols + 2 > registers);
            int vectors = 1 + (int)moe_choose(c, 8);
            while (cols * vectors + vectors + 1 > registers) vectors--;
            rows = vectors;
            block_rows = vectors * width * (1 + (int)moe_choose(c, 4));
            block_cols = cols * (1 + (int)moe_choose(c, 16));
        }
        snprintf(plan->variant, sizeof plan->variant,
                 "tile_rows=%d,tile_cols=%d,block_rows=%d,block_cols=%d,router_block=%d,vector_floats=%d,gemm=%s", rows,
                 cols, block_rows, block_cols, router_block, width, gemm);
    }
}

/* One line describing the spec's main choices. */
static void describe_spec(const moegen_spec *s, char *out, size_t size) {
    const char *capacity = moegen_capacity_mode_name(s->capacity.mode);
    snprintf(out, size, "E=%d k=%d H=%lld F=%lld %s %s %s%s G=%d cap=%s%s%s%s%s%s%s", s->num_experts, s->top_k,
             (long long)s->hidden_size, (long long)s->moe_intermediate_size, moegen_activation_name(s->activation),
             moegen_dtype_name(s->dtype), moegen_score_fn_name(s->router.score_function),
             s->mode == MOEGEN_MODE_TRAIN ? " train" : "", s->router.n_group, capacity,
             s->capacity.mode != MOEGEN_CAP_DROPLESS ? "/" : "",
             s->capacity.mode != MOEGEN_CAP_DROPLESS ? moegen_priority_name(s->capacity.priority) : "",
             s->capacity.renormalize ? " renorm" : "",
             s->capacity.mode != MOEGEN_CAP_DROPLESS && s->capacity.pad_to_capacity ? " pad" : "",
             s->shared.count ? " shared" : "", s->use_residual ? " residual" : "");
}

static moegen_status open_layer(const char *yaml, const char *name, int threads, const char *variant,
                                int keep_activations, moegen_layer **layer, moegen_error *err) {
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.n_threads = threads;
    options.variant = variant;
    options.activations = keep_activations ? MOEGEN_ACTIVATIONS_KEEP : MOEGEN_ACTIVATIONS_RECOMPUTE;
    return moegen_layer_open_string(yaml, strlen(yaml), name, &options, layer, err);
}

static moegen_status forward(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts,
                             uint64_t rng_offset, moe_outputs *o, moegen_error *err) {
    moegen_weights w;
    moe_tensors_bind_weights(spec, ts, 0, &w);
    moegen_status st = moegen_layer_bind(layer, &w, err);
    if (st != MOEGEN_OK) return st;
    moegen_forward_io io = moe_outputs_io(o, ts, rng_offset);
    return moegen_layer_forward(layer, &io, &o->stats, err);
}

/* 1 if two runs gave the same bits. */
static int same_bits(const moegen_spec *spec, int64_t S, const moe_outputs *a, const moe_outputs *b) {
    const size_t routes = (size_t)S * spec->top_k;
    return memcmp(a->y, b->y, (size_t)S * spec->hidden_size * moegen_dtype_size(spec->dtype)) == 0 &&
           memcmp(a->ids, b->ids, routes * sizeof *a->ids) == 0 &&
           memcmp(a->topk_weights, b->topk_weights, routes * sizeof *a->topk_weights) == 0 &&
           memcmp(a->counts_after, b->counts_after, (size_t)spec->num_experts * sizeof *a->counts_after) == 0 &&
           memcmp(&a->stats.aux_loss, &b->stats.aux_loss, sizeof a->stats.aux_loss) == 0 &&
           memcmp(&a->stats.z_loss, &b->stats.z_loss, sizeof a->stats.z_loss) == 0;
}

/* A training step of S tokens on `layer` into b (o gets the forward's outputs). */
static moegen_status train_step(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts,
                                uint64_t rng_offset, moe_outputs *o, moe_backward_buffers *b, moegen_error *err) {
    moegen_weights w;
    moe_tensors_bind_weights(spec, ts, 0, &w);
    moegen_status st = moegen_layer_bind(layer, &w, err);
    if (st != MOEGEN_OK) return st;
    moegen_forward_io io = moe_outputs_io(o, ts, rng_offset);
    moegen_saved *saved = NULL;
    st = moegen_layer_forward_train(layer, &io, &saved, &o->stats, err);
    if (st != MOEGEN_OK) return st;
    moegen_backward_io bio = {.dy = b->dy, .dx = b->dx, .aux_coeff = SWEEP_AUX_COEFF, .z_coeff = SWEEP_Z_COEFF};
    st = moegen_layer_backward(layer, saved, &bio, &b->grads, err);
    moegen_saved_free(saved);
    return st;
}

/* The backward of one forward: against the reference, and bitwise on the rerun layer. */
static int check_backward(moegen_layer *layer, moegen_layer *recheck, const moegen_spec *spec,
                          const moe_tensors *ts, const case_plan *plan, case_outcome *result) {
    const int64_t S = ts->n_tokens;
    moe_outputs o, o2;
    moe_backward_buffers b, b2;
    memset(&o2, 0, sizeof o2);
    memset(&b2, 0, sizeof b2);
    if (moe_outputs_alloc(&o, spec, S) != 0) {
        snprintf(result->message, sizeof result->message, "backward: out of memory");
        return 0;
    }
    if (moe_backward_alloc(&b, spec, S, plan->data_seed ^ 0xbacc) != 0) {
        moe_outputs_free(&o);
        snprintf(result->message, sizeof result->message, "backward: out of memory");
        return 0;
    }
    int ok = 1;
    moegen_error err;
    if (train_step(layer, spec, ts, plan->rng_offset, &o, &b, &err) != MOEGEN_OK) {
        snprintf(result->message, sizeof result->message, "S=%lld: training step: %s", (long long)S, err.message);
        ok = 0;
    }
    if (ok) {
        moegen_kernel_weights w;
        moe_tensors_weights(ts, &w);
        moe_backward_case c = {.n_tokens = S, .x = ts->t[MOE_T_X].data, .w = &w, .rng_offset = plan->rng_offset,
                               .ids = o.ids, .router_weights = o.router_weights, .topk_weights = o.topk_weights,
                               .dy = b.dy, .aux_coeff = SWEEP_AUX_COEFF, .z_coeff = SWEEP_Z_COEFF};
        moe_backward_report report;
        if (moe_verify_backward(spec, &c, b.dx, &b.grads, &report) != 0 || !report.ok) {
            snprintf(result->message, sizeof result->message, "S=%lld: backward: %s", (long long)S, report.message);
            ok = 0;
        } else if (report.max_scaled_error > result->max_scaled_error) {
            result->max_scaled_error = report.max_scaled_error;
        }
    }
    if (ok && recheck) {
        if (moe_outputs_alloc(&o2, spec, S) != 0 || moe_backward_alloc(&b2, spec, S, plan->data_seed ^ 0xbacc) != 0 ||
            train_step(recheck, spec, ts, plan->rng_offset, &o2, &b2, &err) != MOEGEN_OK) {
            snprintf(result->message, sizeof result->message, "S=%lld: backward rerun: %s", (long long)S, err.message);
            ok = 0;
        } else if (!moe_backward_same_bits(spec, &b, &b2)) {
            snprintf(result->message, sizeof result->message, "S=%lld: %d and %d threads gave different gradients",
                     (long long)S, plan->threads, plan->recheck_threads);
            ok = 0;
        }
    }
    moe_backward_free(&b2);
    moe_backward_free(&b);
    moe_outputs_free(&o2);
    moe_outputs_free(&o);
    return ok;
}

/* Run one spec under one plan. */
static void run_case(const char *yaml, const char *name, const moegen_spec *spec, const case_plan *plan,
                     int backward, case_outcome *result) {
    moegen_error err;
    moegen_layer *layer = NULL, *recheck = NULL;
    result->ok = 0;
    result->max_scaled_error = 0.0;
    result->near_ties = 0;
    /* backward cases keep the activations in half the cases (by the data seed), else recompute */
    const int keep = backward && (plan->data_seed & 1);
    if (open_layer(yaml, name, plan->threads, plan->variant, keep, &layer, &err) != MOEGEN_OK) {
        snprintf(result->message, sizeof result->message, "open: %s", err.message);
        return;
    }
    if (plan->recheck_threads &&
        open_layer(yaml, name, plan->recheck_threads, plan->variant, keep, &recheck, &err) != MOEGEN_OK) {
        snprintf(result->message, sizeof result->message, "open (second layer): %s", err.message);
        moegen_layer_close(layer);
        return;
    }
    int ok = 1;
    for (int i = 0; i < 2 && ok; i++) {
        const int64_t S = plan->tokens[i];
        moe_tensors ts;
        moe_outputs o, again;
        memset(&o, 0, sizeof o);
        memset(&again, 0, sizeof again);
        memset(&ts, 0, sizeof ts);
        if (moe_tensors_alloc(spec, S, &ts) != 0 || moe_outputs_alloc(&o, spec, S) != 0) {
            snprintf(result->message, sizeof result->message, "out of memory for %lld tokens", (long long)S);
            moe_outputs_free(&o);
            moe_tensors_free(&ts);
            ok = 0;
            break;
        }
        moe_tensors_fill(&ts, plan->data_seed + (uint64_t)i);
        moe_tensors_apply_pattern(spec, &ts, plan->pattern);
        if (forward(layer, spec, &ts, plan->rng_offset, &o, &err) != MOEGEN_OK) {
            snprintf(result->message, sizeof result->message, "S=%lld: forward: %s", (long long)S, err.message);
            ok = 0;
        }
        if (ok) {
            moegen_kernel_weights w;
            moe_tensors_weights(&ts, &w);
            moe_kernel_result kernel = moe_outputs_result(&o);
            moe_verify_report report;
            if (moe_verify(spec, S, ts.t[MOE_T_X].data, &w, plan->rng_offset, NULL, &kernel, &report) != 0 ||
                !report.ok) {
                snprintf(result->message, sizeof result->message, "S=%lld: %s", (long long)S, report.message);
                ok = 0;
            } else { /* exact ties never count as near-ties (verify.c): they must match */
                if (report.max_scaled_error > result->max_scaled_error)
                    result->max_scaled_error = report.max_scaled_error;
                result->near_ties += report.ambiguous_tokens + report.ambiguous_capacity;
            }
        }
        if (ok && recheck) {
            if (moe_outputs_alloc(&again, spec, S) != 0 ||
                forward(recheck, spec, &ts, plan->rng_offset, &again, &err) != MOEGEN_OK) {
                snprintf(result->message, sizeof result->message, "S=%lld: rerun with %d threads: %s", (long long)S,
                         plan->recheck_threads, err.message);
                ok = 0;
            } else if (!same_bits(spec, S, &o, &again)) {
                snprintf(result->message, sizeof result->message,
                         "S=%lld: %d and %d threads gave different bits", (long long)S, plan->threads,
                         plan->recheck_threads);
                ok = 0;
            }
        }
        if (ok && backward) ok = check_backward(layer, recheck, spec, &ts, plan, result);
        moe_outputs_free(&again);
        moe_outputs_free(&o);
        moe_tensors_free(&ts);
    }
    moegen_layer_close(recheck);
    moegen_layer_close(layer);
    result->ok = ok;
    if (ok)
        snprintf(result->message, sizeof result->message, "max error %.2f of tolerance%s", result->max_scaled_error,
                 result->near_ties ? ", near-tie routing allowed on some tokens" : "");
}

/* The "# plan:" line of a saved case: a regression file replays exactly the failing data. */
static void format_plan(const case_plan *p, char *out, size_t size) {
    snprintf(out, size, "# plan: tokens %lld %lld pattern %d threads %d recheck %d data_seed %llu rng_offset %llu%s%s\n",
             (long long)p->tokens[0], (long long)p->tokens[1], (int)p->pattern, p->threads, p->recheck_threads,
             (unsigned long long)p->data_seed, (unsigned long long)p->rng_offset, p->variant[0] ? " variant " : "",
             p->variant);
}

/* Read a "# plan:" line from a spec file's text; returns 1 when one was found. */
static int parse_plan(const char *yaml, case_plan *p) {
    const char *line = strstr(yaml, "# plan: ");
    long long t0, t1;
    int pattern, threads, recheck;
    unsigned long long data_seed, rng_offset;
    int used = 0;
    if (!line ||
        sscanf(line, "# plan: tokens %lld %lld pattern %d threads %d recheck %d data_seed %llu rng_offset %llu%n", &t0,
               &t1, &pattern, &threads, &recheck, &data_seed, &rng_offset, &used) != 7)
        return 0;
    if (t0 < 0 || t1 < 0 || pattern < 0 || pattern >= MOE_DATA_PATTERN_COUNT || threads < 1 || recheck < 0) return 0;
    *p = (case_plan){{t0, t1}, (moe_data_pattern)pattern, threads, recheck, data_seed, rng_offset, ""};
    const char *rest = line + used;
    if (!strncmp(rest, " variant ", 9)) { /* older plans have none: the default variant */
        rest += 9;
        const size_t len = strcspn(rest, " \r\n");
        if (len < sizeof p->variant) memcpy(p->variant, rest, len), p->variant[len] = '\0';
    }
    return 1;
}

static void save_case(const char *dir, const char *name, const char *yaml, const char *how, const case_plan *plan,
                      const case_outcome *result) {
    if (!dir) return;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.yaml", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) return;
    char plan_line[512] = "";
    if (plan) format_plan(plan, plan_line, sizeof plan_line);
    fprintf(f, "# %s by the differential sweep: %s\n# compiler: %s\n# %s\n%s%s",
            result->ok ? "Passed" : "Found", how, getenv("MOEGEN_CC") ? getenv("MOEGEN_CC") : "cc (default)",
            result->message, plan_line, yaml);
    fclose(f);
}

static char *read_spec_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char *text = calloc(MAX_SPEC_BYTES + 1, 1);
    size_t n = text ? fread(text, 1, MAX_SPEC_BYTES, f) : 0;
    fclose(f);
    if (text) text[n] = '\0';
    return text;
}

static int usage(void) {
    fprintf(stderr, "usage: moegen_sweep [--seed S] [--first I] [--count N] [--compiler PROG] [--failures DIR] "
                    "[--record DIR] [--backward] [--specs FILE...] [--quiet]\n");
    return 2;
}

static int parse_options(int argc, char **argv, sweep_options *o) {
    memset(o, 0, sizeof *o);
    o->seed = 1;
    o->count = 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--backward")) {
            o->backward = 1;
        } else if (!strcmp(a, "--quiet")) {
            o->quiet = 1;
        } else if (!strcmp(a, "--specs")) {
            o->specs = argv + i + 1;
            o->n_specs = argc - i - 1;
            break;
        } else if (i + 1 < argc && !strcmp(a, "--seed")) {
            o->seed = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(a, "--first")) {
            o->first = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(a, "--count")) {
            o->count = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(a, "--compiler")) {
            o->compiler = argv[++i];
        } else if (i + 1 < argc && !strcmp(a, "--record")) {
            o->record = argv[++i];
        } else if (i + 1 < argc && !strcmp(a, "--failures")) {
            o->failures = argv[++i];
        } else {
            return -1;
        }
    }
    return o->count < 0 || o->first < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
    sweep_options o;
    if (parse_options(argc, argv, &o) != 0) return usage();
    if (o.compiler) setenv("MOEGEN_CC", o.compiler, 1);
    const char *compiler = getenv("MOEGEN_CC") ? getenv("MOEGEN_CC") : "cc";
    const long total = o.n_specs > 0 ? o.n_specs : o.count;
    long failed = 0;
    double start = now_s();
    printf("moegen_sweep: %ld %s, seed %llu, compiler %s\n", total, o.n_specs > 0 ? "spec files" : "random specs",
           (unsigned long long)o.seed, compiler);
    for (long n = 0; n < total; n++) {
        const long i = o.n_specs > 0 ? n : o.first + n;
        char name[64], yaml[MAX_SPEC_BYTES], how[512], summary[256];
        moe_choices choices;
        moe_choices_seeded(&choices, case_seed(o.seed, i));
        if (o.n_specs > 0) {
            char *text = read_spec_file(o.specs[i]);
            if (!text) {
                printf("[ FAIL ] %s: cannot read\n", o.specs[i]);
                failed++;
                continue;
            }
            snprintf(yaml, sizeof yaml, "%s", text);
            free(text);
            snprintf(name, sizeof name, "%s", strrchr(o.specs[i], '/') ? strrchr(o.specs[i], '/') + 1 : o.specs[i]);
            snprintf(how, sizeof how, "moegen_sweep --seed %llu --specs %s", (unsigned long long)o.seed, o.specs[i]);
        } else {
            snprintf(name, sizeof name, "sweep-%llu-%ld", (unsigned long long)o.seed, i);
            moe_sample_limits limits = MOE_SAMPLE_SWEEP_LIMITS;
            if (moe_sample_spec(&choices, &limits, name, yaml, sizeof yaml) != 0) {
                printf("[ FAIL ] %s: the sampler overflowed its buffer\n", name);
                failed++;
                continue;
            }
            snprintf(how, sizeof how, "moegen_sweep --seed %llu (case %ld)", (unsigned long long)o.seed, i);
        }
        moegen_spec spec;
        moegen_error err;
        case_outcome result;
        if (moegen_spec_parse(yaml, strlen(yaml), name, &spec, &err) != MOEGEN_OK) {
            snprintf(result.message, sizeof result.message, "the spec was rejected: %s", err.message);
            printf("[ FAIL ] %s: %s\n%s", name, result.message, yaml);
            result.ok = 0;
            save_case(o.failures, name, yaml, how, NULL, &result);
            failed++;
            continue;
        }
        case_plan plan;
        plan_case(&choices, &spec, o.backward, &plan);
        if (o.n_specs > 0) parse_plan(yaml, &plan); /* a regression file replays its own data */
        describe_spec(&spec, summary, sizeof summary);
        run_case(yaml, name, &spec, &plan, o.backward, &result);
        if (!result.ok) {
            failed++;
            printf("[ FAIL ] %s (%s): %s | S=%lld,%lld %s threads=%d variant %s\n  %s\n%s", name, how, summary,
                   (long long)plan.tokens[0], (long long)plan.tokens[1], moe_data_pattern_name(plan.pattern),
                   plan.threads, plan.variant[0] ? plan.variant : "default", result.message, yaml);
            save_case(o.failures, name, yaml, how, &plan, &result);
        } else if (!o.quiet) {
            printf("[  ok  ] %s: %s | S=%lld,%lld %s threads=%d%s variant %s: %s\n", name, summary,
                   (long long)plan.tokens[0], (long long)plan.tokens[1], moe_data_pattern_name(plan.pattern),
                   plan.threads, plan.recheck_threads ? " (+bitwise rerun)" : "",
                   plan.variant[0] ? plan.variant : "default", result.message);
        }
        if (o.n_specs == 0) save_case(o.record, name, yaml, how, &plan, &result);
        fflush(stdout);
        moegen_spec_free(&spec);
    }
    printf("moegen_sweep: %ld passed, %ld failed of %ld (compiler %s, seed %llu) in %.0f s\n", total - failed, failed,
           total, compiler, (unsigned long long)o.seed, now_s() - start);
    return failed ? 1 : 0;
}
