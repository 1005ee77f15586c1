/* run.c — `moegen run`: open a layer from a spec, run it on random or loaded tensors,
 * verify against the independent reference and report speed and expert load.
 *
 * Place in the pipeline: the whole of it, from the outside: spec -> gen -> compile ->
 * cache -> load -> launch, then tests/reference for the check.
 * Files of --save / --load are documented in README.md ("moegen run files").
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "train.h"
#include "bench_ep.h"
#include "capacity.h"
#include "forward_io.h"
#include "memory_limit.h"
#include "moegen.h"
#include "npy.h"
#include "plot_svg.h"
#include "ranks.h"
#include "run_cuda.h"
#include "spec.h"
#include "tensors.h"
#include "verify.h"

static const char usage_run[] =
    "usage: moegen run SPEC [options]\n"
    "\n"
    "Compile SPEC (or take it from the cache), run the forward on random inputs and\n"
    "weights (or tensors loaded with --load), verify the result against the\n"
    "independent double-precision reference, and print time, tokens/s, GFLOP/s and\n"
    "the load of every expert (on the GPU also TFLOP/s, TB/s and the % of the floor of\n"
    "docs/performance.md). Exits 1 if verification fails.\n"
    "\n"
    "options:\n"
    "  --tokens N          tokens per forward (default 256; ignored with --load)\n"
    "  --seed S            seed of the random tensors (default 1)\n"
    "  --save DIR          write inputs, weights and outputs as .npy files into DIR\n"
    "  --load DIR          read x and the weights from .npy files in DIR\n"
    "  --device D          cpu, cuda or auto (default auto: CUDA when a GPU is usable)\n"
    "  --arch sm_XX        cuda: compile for this architecture (default: the device's)\n"
    "  --json              also print one JSON line with the measurements, last on stdout\n"
    "                      (floor_ms only on the GPU)\n"
    "  --plot FILE         write an SVG bar chart of the routes of every expert before and\n"
    "                      after capacity, with the capacity line unless dropless\n"
    "  --no-verify         skip the comparison with the reference (benchmarks)\n"
    "  --threads N         CPU threads (default: all)\n"
    "  --mode M            train or eval (default: the spec's)\n"
    "  --repeat N          timed forwards after one warm-up (default 5; median reported)\n"
    "  --verify-tokens N   tokens whose output is checked against the reference\n"
    "                      (default: all, or a spread-out sample when the reference\n"
    "                      would take more than a few seconds)\n"
    "  --rng-offset N      offset mixed into jitter, noise and random priority (default 0)\n"
    "  --cache-dir DIR     compile cache (default $MOEGEN_CACHE_DIR or ~/.cache/moegen)\n"
    "  --variant LIST      kernel variant overrides, e.g. tile_rows=6,gemm=bfdot (README:\n"
    "                      \"Kernel variants\")\n"
    "  --no-tuning         the default variant even where a tuning database exists\n"
    "                      (docs/tuning.md)\n"
    "  --backward          also run training steps (ep_size 1; CPU or CUDA): the forward that keeps\n"
    "                      its state and the backward (docs/numerics.md §8), timed against\n"
    "                      the forward, the gradients verified against the reference backward\n"
    "                      (dy random from --seed, or DIR/dy.npy with --load); with --save,\n"
    "                      dy.npy, dx.npy and grad_<tensor>.npy (fp32) go into DIR too\n"
    "  --aux-coeff X       with --backward: the loss is sum(dy . y) + X * aux_loss + Y * z_loss\n"
    "  --z-coeff Y         (default 0 and 0)\n";

int moegen_cli_parse_int(const char *text, const char *option, long long min, long long max,
                         long long *out) {
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || !end || *end || end == text || value < min || value > max) {
        moegen_cli_error("%s: expected an integer in [%lld, %lld], got '%s'", option, min, max, text);
        return -1;
    }
    *out = value;
    return 0;
}

const char *moegen_cli_json_text(const char *text, char *buffer, int size) {
    int n = 0;
    buffer[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)(text ? text : ""); *p; p++) {
        char item[8];
        if (*p == '"' || *p == '\\') snprintf(item, sizeof item, "\\%c", *p);
        else if (*p < 0x20) snprintf(item, sizeof item, "\\u%04x", *p);
        else snprintf(item, sizeof item, "%c", *p);
        const int length = (int)strlen(item);
        if (n + length + 2 > size) { /* room for the closing quote and the NUL; no half character */
            while (n > 1 && ((unsigned char)buffer[n - 1] & 0xC0) == 0x80) n--;
            if (n > 1 && (unsigned char)buffer[n - 1] >= 0xC0) n--;
            break;
        }
        memcpy(buffer + n, item, (size_t)length);
        n += length;
    }
    buffer[n++] = '"';
    buffer[n] = '\0';
    return buffer;
}

int moegen_cli_parse_int_list(const char *text, const char *option, long long min, long long max, long long *out,
                              int capacity) {
    int n = 0;
    for (const char *p = text; *p;) {
        char item[32];
        const size_t len = strcspn(p, ",");
        snprintf(item, sizeof item, "%.*s", (int)(len < 31 ? len : 31), p);
        if (n == capacity) {
            moegen_cli_error("%s: at most %d values", option, capacity);
            return -1;
        }
        if (moegen_cli_parse_int(item, option, min, max, &out[n]) != 0) return -1;
        n++;
        p += len + (p[len] == ',');
    }
    if (n == 0) {
        moegen_cli_error("%s: the list is empty", option);
        return -1;
    }
    return n;
}

typedef struct run_options {
    const char *spec_path, *save_dir, *load_dir, *cache_dir, *arch, *variant, *plot_path;
    int no_tuning;
    long long tokens, seed, threads, repeat, verify_tokens, rng_offset;
    int device, mode, json, no_verify, backward;
    double aux_coeff, z_coeff;
} run_options;

/* A finite decimal option value; prints an error and returns -1 on failure. */
static int parse_double(const char *text, const char *option, double *out) {
    char *end = NULL;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || !end || *end || end == text || !isfinite(value)) {
        moegen_cli_error("%s: expected a finite number, got '%s'", option, text);
        return -1;
    }
    *out = value;
    return 0;
}

static int parse_run_options(int argc, char **argv, run_options *o) {
    memset(o, 0, sizeof *o);
    o->tokens = 256;
    o->seed = 1;
    o->repeat = 5;
    o->verify_tokens = -1;
    o->mode = -1;
    o->device = MOEGEN_DEVICE_AUTO;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        long long *number = NULL;
        long long min = 0, max = LLONG_MAX;
        if (a[0] != '-') {
            if (o->spec_path) return moegen_cli_error("run: unexpected argument %s", a);
            o->spec_path = a;
            continue;
        }
        if (!strcmp(a, "--json") || !strcmp(a, "--no-verify")) {
            *(a[2] == 'j' ? &o->json : &o->no_verify) = 1;
            continue;
        }
        if (!strcmp(a, "--no-tuning")) {
            o->no_tuning = 1;
            continue;
        }
        if (!strcmp(a, "--backward")) {
            o->backward = 1;
            continue;
        }
        if (!value) return moegen_cli_error("run: option %s needs a value (see moegen run --help)", a);
        i++;
        if (!strcmp(a, "--aux-coeff") || !strcmp(a, "--z-coeff")) {
            if (parse_double(value, a, a[2] == 'a' ? &o->aux_coeff : &o->z_coeff) != 0) return 1;
            continue;
        }
        if (!strcmp(a, "--tokens")) number = &o->tokens, max = INT32_MAX;
        else if (!strcmp(a, "--seed")) number = &o->seed;
        else if (!strcmp(a, "--threads")) number = &o->threads, min = 1, max = 4096;
        else if (!strcmp(a, "--repeat")) number = &o->repeat, min = 1, max = 100000;
        else if (!strcmp(a, "--verify-tokens")) number = &o->verify_tokens, max = INT32_MAX;
        else if (!strcmp(a, "--rng-offset")) number = &o->rng_offset;
        else if (!strcmp(a, "--save")) o->save_dir = value;
        else if (!strcmp(a, "--load")) o->load_dir = value;
        else if (!strcmp(a, "--cache-dir")) o->cache_dir = value;
        else if (!strcmp(a, "--arch")) o->arch = value;
        else if (!strcmp(a, "--variant")) o->variant = value;
        else if (!strcmp(a, "--plot")) o->plot_path = value;
        else if (!strcmp(a, "--device")) {
            if (!strcmp(value, "cpu")) o->device = MOEGEN_DEVICE_CPU;
            else if (!strcmp(value, "cuda")) o->device = MOEGEN_DEVICE_CUDA;
            else if (!strcmp(value, "auto")) o->device = MOEGEN_DEVICE_AUTO;
            else return moegen_cli_error("run: --device must be cpu, cuda or auto (got '%s')", value);
        } else if (!strcmp(a, "--mode")) {
            if (!strcmp(value, "train")) o->mode = 0;
            else if (!strcmp(value, "eval")) o->mode = 1;
            else return moegen_cli_error("run: --mode must be train or eval (got '%s')", value);
        } else {
            return moegen_cli_error("run: unknown option %s (see moegen run --help)", a);
        }
        if (number && moegen_cli_parse_int(value, a, min, max, number) != 0) return 1;
    }
    if (!o->spec_path) return moegen_cli_error("run: usage: moegen run SPEC [options] (see --help)");
    if ((o->aux_coeff != 0.0 || o->z_coeff != 0.0) && !o->backward)
        return moegen_cli_error("run: --aux-coeff and --z-coeff only mean something with --backward");
    char why[512];
    if (o->plot_path && cli_plot_check_path(o->plot_path, why, sizeof why) != 0) /* before the long work */
        return moegen_cli_error("run: --plot: %s", why);
    return 0;
}

double moegen_cli_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double moegen_cli_median(double *values, long long n) {
    qsort(values, (size_t)n, sizeof *values, compare_doubles);
    return values[n / 2];
}

/* Refuse, with the sizes, a run whose tensors, outputs and workspace cannot fit in what
 * this process may still allocate (cgroup limits, RLIMIT_AS, MemAvailable:
 * runtime/memory_limit.c). Decided before anything big is allocated or read. */
static int check_fits(const char *command, const moegen_spec *spec, int64_t S) {
    const double rows = (double)moegen_spec_max_rows(spec, S);
    const double need = (double)moe_tensors_bytes(spec, S) +
                        rows * (spec->hidden_size * 4.0 + moegen_spec_ffn_rows(spec) * 2.0 + 8.0) +
                        (double)S * spec->hidden_size * 8.0;
    moegen_memory_budget budget;
    if (moegen_memory_budget_read(&budget, NULL) != MOEGEN_OK || budget.available_bytes == MOEGEN_MEMORY_UNLIMITED)
        return 0;
    if (need <= 0.9 * (double)budget.available_bytes) return 0;
    char need_text[MOEGEN_BYTES_TEXT_BYTES], have_text[MOEGEN_BYTES_TEXT_BYTES];
    moegen_format_bytes(need > 1.8e19 ? UINT64_MAX : (uint64_t)need, need_text, sizeof need_text);
    moegen_format_bytes(budget.available_bytes, have_text, sizeof have_text);
    return moegen_cli_error("%s: %s needs about %s for %lld tokens; this process can allocate %s more "
                            "(limited by %s); try fewer tokens, or a machine with more memory",
                            command, spec->name, need_text, (long long)S, have_text, budget.limited_by);
}

/* ---- Ranks (expert parallelism) ----------------------------------------------------------- */

/* This rank's share of the expert tensors: experts [first, first + n) of w1/b1/w2/b2. */
/* Every rank has the same weights (from --seed) and tokens of its own: rank r > 0 draws x
 * from a seed of its own. */
static int own_tokens(const moegen_spec *spec, moe_tensors *ts, uint64_t seed, int rank) {
    if (rank == 0) return 0;
    moe_tensors mine;
    if (moe_tensors_alloc(spec, ts->n_tokens, &mine) != 0) return -1;
    moe_tensors_fill(&mine, seed + 7919u * (uint64_t)rank);
    if (ts->n_tokens > 0)
        memcpy(ts->t[MOE_T_X].data, mine.t[MOE_T_X].data, ts->t[MOE_T_X].n_elems * moe_tensor_elem_bytes(ts, MOE_T_X));
    moe_tensors_free(&mine);
    return 0;
}

/* One rank's result line, gathered on rank 0 and printed in rank order. */
typedef struct rank_line {
    int ok;
    long long tokens, dropped;
    unsigned long long sent, received;
    double route_ms, dispatch_ms, experts_ms, combine_ms;
    char verify[240];
} rank_line;

static void print_rank_lines(cli_ranks *ranks, const rank_line *mine) {
    rank_line *all = ranks->rank == 0 ? calloc((size_t)ranks->size, sizeof *all) : NULL;
    if (cli_ranks_gather(ranks, mine, all, sizeof *mine) != 0) {
        if (ranks->rank == 0) moegen_cli_error("run: a rank did not report within the deadline");
        free(all);
        return;
    }
    if (!all) return;
    printf("  ranks (each verified on its own tokens; ep_size %d):\n", ranks->size);
    for (int r = 0; r < ranks->size; r++)
        printf("    rank %d: %lld tokens, %lld dropped; sent %llu B, received %llu B; route %.3f, dispatch %.3f, "
               "experts %.3f, combine %.3f ms; verify %s%s\n",
               r, all[r].tokens, all[r].dropped, all[r].sent, all[r].received, all[r].route_ms, all[r].dispatch_ms,
               all[r].experts_ms, all[r].combine_ms, all[r].ok ? "" : "FAILED: ", all[r].verify);
    free(all);
}

/* --save / --load DIR: with several ranks, each rank uses DIR/rank<r>. */
static const char *rank_dir(const char *dir, const cli_ranks *ranks, char *buffer, size_t size) {
    if (!dir || ranks->size == 1) return dir;
    snprintf(buffer, size, "%.3900s/rank%d", dir, ranks->rank);
    return buffer;
}

/* ---- --save / --load ------------------------------------------------------------------- */

static moegen_npy_dtype stored_npy_dtype(const moe_tensors *ts, int i) {
    if (ts->t[i].fp32 || ts->dtype == MOEGEN_DTYPE_FP32) return MOEGEN_NPY_F4;
    return ts->dtype == MOEGEN_DTYPE_FP16 ? MOEGEN_NPY_F2 : MOEGEN_NPY_U2; /* bf16: raw bits */
}

static int save_array(const char *dir, const char *stem, moegen_npy_dtype dtype, int ndim,
                      const int64_t *shape, const void *data) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s.npy", dir, stem);
    moegen_error err;
    if (moegen_npy_write(path, dtype, ndim, shape, data, &err) != MOEGEN_OK)
        return moegen_cli_error("%s", err.message);
    return 0;
}

/* Load tensor i from DIR/<name>.npy into its buffer, converting fp32 files to the
 * layer dtype when the tensor is stored in fp16 / bf16. */
static int load_tensor(const char *dir, moe_tensors *ts, int i) {
    moe_tensor *t = &ts->t[i];
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s.npy", dir, t->name);
    moegen_npy_dtype allowed[2] = {stored_npy_dtype(ts, i), MOEGEN_NPY_F4};
    moegen_npy array;
    moegen_error err;
    if (moegen_npy_read_expect(path, t->ndim, t->shape, allowed, 2, &array, &err) != MOEGEN_OK)
        return moegen_cli_error("%s", err.message);
    if (array.dtype == allowed[0]) {
        memcpy(t->data, array.data, t->n_elems * moe_tensor_elem_bytes(ts, i));
    } else {
        const float *src = array.data;
        for (size_t n = 0; n < t->n_elems; n++) moe_tensor_set(ts, i, n, src[n]);
    }
    moegen_npy_free(&array);
    return 0;
}

/* Number of tokens in DIR/x.npy, from its header alone (nothing is read before the
 * run is known to fit in memory). */
static int loaded_token_count(const char *dir, const moegen_spec *spec, long long *tokens) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%.4000s/x.npy", dir);
    moegen_npy array;
    moegen_error err;
    if (moegen_npy_read_header(path, &array, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    int rc = 0;
    if (array.ndim != 2 || array.shape[1] != spec->hidden_size)
        rc = moegen_cli_error("%s: expected shape (tokens, %lld)", path, (long long)spec->hidden_size);
    else *tokens = array.shape[0];
    moegen_npy_free(&array);
    return rc;
}

typedef struct run_outputs {
    void *y;
    int32_t *ids;
    float *topk_weights, *router_weights;
    int64_t *counts_before, *counts_after;
    moegen_forward_stats stats;
} run_outputs;

static int save_all(const char *dir, const moe_tensors *ts, const moegen_spec *spec, const run_outputs *o) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return moegen_cli_error("%s: %s", dir, strerror(errno));
    for (int i = 0; i < MOE_T_COUNT; i++) {
        const moe_tensor *t = &ts->t[i];
        if (!t->data) continue;
        if (save_array(dir, t->name, stored_npy_dtype(ts, i), t->ndim, t->shape, t->data)) return 1;
    }
    const int64_t S = ts->n_tokens, K = spec->top_k, E = spec->num_experts;
    const int64_t y_shape[2] = {S, spec->hidden_size}, route_shape[2] = {S, K}, e_shape[1] = {E};
    int64_t dropped = o->stats.n_dropped, capacity = o->stats.capacity;
    if (save_array(dir, "y", stored_npy_dtype(ts, MOE_T_X), 2, y_shape, o->y) ||
        save_array(dir, "topk_ids", MOEGEN_NPY_I4, 2, route_shape, o->ids) ||
        save_array(dir, "topk_weights", MOEGEN_NPY_F4, 2, route_shape, o->topk_weights) ||
        save_array(dir, "router_weights", MOEGEN_NPY_F4, 2, route_shape, o->router_weights) ||
        save_array(dir, "counts_before", MOEGEN_NPY_I8, 1, e_shape, o->counts_before) ||
        save_array(dir, "counts_after", MOEGEN_NPY_I8, 1, e_shape, o->counts_after) ||
        save_array(dir, "aux_loss", MOEGEN_NPY_F8, 0, NULL, &o->stats.aux_loss) ||
        save_array(dir, "z_loss", MOEGEN_NPY_F8, 0, NULL, &o->stats.z_loss) ||
        save_array(dir, "n_dropped", MOEGEN_NPY_I8, 0, NULL, &dropped) ||
        save_array(dir, "capacity", MOEGEN_NPY_I8, 0, NULL, &capacity))
        return 1;
    printf("  saved inputs, weights and outputs as .npy files in %s\n", dir);
    return 0;
}

/* ---- Report -------------------------------------------------------------------------------- */

/* FLOPs of one forward: router, kept routes through the experts, shared and residual. */
static double forward_flops(const moegen_spec *spec, int64_t S, const int64_t *counts_after) {
    const double H = (double)spec->hidden_size, F = (double)spec->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(spec);
    double kept = 0;
    for (int e = 0; e < spec->num_experts; e++) kept += (double)counts_after[e];
    double flops = 2.0 * H * spec->num_experts * S + kept * (2.0 * H * F1 + 2.0 * F * H);
    if (spec->shared.count > 0) {
        double Fs = (double)spec->shared.intermediate_size;
        double F1s = moegen_activation_is_gated(spec->activation) ? 2 * Fs : Fs;
        flops += spec->shared.count * (double)S * (2.0 * H * F1s + 2.0 * Fs * H);
    }
    if (spec->use_residual) flops += (double)S * (2.0 * H * F1 + 2.0 * F * H);
    return flops;
}

/* Minimum bytes one forward must move: every touched expert's weights once, the
 * router weights, the shared / residual weights, x and y (docs/performance.md). */
static double forward_bytes(const moegen_spec *spec, int64_t S, const int64_t *counts_after) {
    const double H = (double)spec->hidden_size, F = (double)spec->moe_intermediate_size;
    const double F1 = (double)moegen_spec_ffn_rows(spec), elem = (double)moegen_dtype_size(spec->dtype);
    double touched = 0;
    for (int e = 0; e < spec->num_experts; e++) touched += counts_after[e] > 0;
    double bytes = touched * (F1 * H + H * F) * elem + 4.0 * spec->num_experts * H + 2.0 * S * H * elem;
    if (spec->shared.count > 0) {
        double Fs = (double)spec->shared.intermediate_size;
        double F1s = moegen_activation_is_gated(spec->activation) ? 2 * Fs : Fs;
        bytes += spec->shared.count * (F1s * H + H * Fs) * elem;
    }
    if (spec->use_residual) bytes += (F1 * H + H * F) * elem;
    return bytes;
}

static void print_load(const moegen_spec *spec, const int64_t *before, const int64_t *after) {
    const int E = spec->num_experts;
    int64_t max = 1, total = 0;
    for (int e = 0; e < E; e++) {
        if (before[e] > max) max = before[e];
        total += before[e];
    }
    if (E <= 64) {
        printf("  expert load (routes before -> after capacity):\n");
        for (int e = 0; e < E; e++) {
            int bar = (int)(40.0 * (double)before[e] / (double)max + 0.5);
            printf("    expert %3d %7lld -> %-7lld |%.*s\n", e, (long long)before[e], (long long)after[e],
                   bar, "########################################");
        }
        return;
    }
    int64_t min = before[0], idle = 0;
    for (int e = 0; e < E; e++) {
        if (before[e] < min) min = before[e];
        idle += before[e] == 0;
    }
    printf("  expert load over %d experts: min %lld, mean %.1f, max %lld routes; %lld experts idle\n", E,
           (long long)min, (double)total / E, (long long)max, (long long)idle);
}

/* --plot FILE of `moegen run`: the routes of every expert before and after capacity, and
 * the capacity line unless the layer is dropless. Returns 0, or 1 after an error. */
static int write_load_plot(const char *path, const moegen_spec *spec, const char *device, int64_t S,
                           const run_outputs *out, int n_ranks) {
    const int E = spec->num_experts;
    double *values = calloc((size_t)E * 2, sizeof *values);
    if (!values) return moegen_cli_error("run: --plot: out of memory");
    for (int e = 0; e < E; e++) {
        values[e] = (double)out->counts_before[e];
        values[E + e] = (double)out->counts_after[e];
    }
    char title[512], subtitle[512], capacity[96], ranks[64] = "";
    snprintf(title, sizeof title, "moegen run: %s (%s) on %s", spec->name, moegen_dtype_name(spec->dtype), device);
    if (n_ranks > 1) snprintf(ranks, sizeof ranks, "; rank 0's tokens of %d ranks", n_ranks);
    if (out->stats.capacity < 0) snprintf(capacity, sizeof capacity, "dropless");
    else snprintf(capacity, sizeof capacity, "capacity %lld per expert", (long long)out->stats.capacity);
    snprintf(subtitle, sizeof subtitle, "%lld tokens, top-%d of %d experts; %s, %lld routes dropped%s", (long long)S,
             spec->top_k, E, capacity, (long long)out->stats.n_dropped, ranks);
    const cli_plot_bars bars[2] = {{"routes before capacity", values}, {"routes after capacity", values + E}};
    char line_label[96];
    snprintf(line_label, sizeof line_label, "capacity (%lld)", (long long)out->stats.capacity);
    const cli_plot_bar_chart chart = {
        .title = title, .subtitle = subtitle, .x_label = "expert", .y_label = "routes",
        .category_name = "expert", .n_categories = E, .series = bars, .n_series = 2,
        .line_label = out->stats.capacity >= 0 ? line_label : NULL, .line_value = (double)out->stats.capacity,
    };
    char *svg = cli_plot_bar_svg(&chart), why[512];
    free(values);
    int rc = 0;
    if (!svg) rc = moegen_cli_error("run: --plot: out of memory");
    else if (cli_plot_write(path, svg, why, sizeof why) != 0) rc = moegen_cli_error("run: --plot: %s", why);
    else printf("  plot of the expert load written to %s\n", path);
    free(svg);
    return rc;
}

/* Spread-out sample of `count` tokens among S (all when count >= S). */
static uint8_t *token_sample(int64_t S, int64_t count) {
    uint8_t *mask = calloc((size_t)(S > 0 ? S : 1), 1);
    if (!mask) return NULL;
    if (count >= S) {
        memset(mask, 1, (size_t)S);
    } else {
        for (int64_t i = 0; i < count; i++) mask[(i * S) / count] = 1;
    }
    return mask;
}

int moegen_cli_run(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_run, stdout);
        return 0;
    }
    run_options o;
    if (parse_run_options(argc, argv, &o)) return 1;

    moegen_error err;
    moegen_spec spec;
    if (moegen_spec_load_file(o.spec_path, &spec, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    if (o.mode >= 0) spec.mode = o.mode == 0 ? MOEGEN_MODE_TRAIN : MOEGEN_MODE_EVAL;
    cli_ranks ranks;
    if (cli_ranks_start(&ranks, spec.ep_size)) {
        moegen_spec_free(&spec);
        return 1;
    }
    char load_buffer[PATH_MAX - 16], save_buffer[PATH_MAX - 16];
    o.load_dir = rank_dir(o.load_dir, &ranks, load_buffer, sizeof load_buffer);
    o.save_dir = rank_dir(o.save_dir, &ranks, save_buffer, sizeof save_buffer);
    const int chatty = ranks.rank == 0; /* the full report comes from rank 0 */
    if (o.load_dir && loaded_token_count(o.load_dir, &spec, &o.tokens)) {
        moegen_spec_free(&spec);
        cli_ranks_stop(&ranks);
        return 1;
    }
    const int64_t S = o.tokens;

    int rc = 1;
    moegen_layer *layer = NULL;
    moe_tensors ts;
    memset(&ts, 0, sizeof ts);
    run_outputs out;
    memset(&out, 0, sizeof out);
    uint8_t *mask = NULL;
    double *times = NULL;
    cuda_run gpu;
    memset(&gpu, 0, sizeof gpu);
    int plot_failed = 0;

    if (check_fits("run", &spec, S)) goto done;

    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = o.device;
    options.mode = o.mode;
    options.n_threads = (int)o.threads;
    options.cache_dir = o.cache_dir;
    options.arch = o.arch;
    options.variant = o.variant;
    options.tuning = o.no_tuning ? MOEGEN_TUNING_OFF : MOEGEN_TUNING_AUTO;
    options.comm = ranks.comm;
    if (moegen_layer_open_file(o.spec_path, &options, &layer, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        goto done;
    }
    moegen_layer_desc desc;
    moegen_layer_describe(layer, &desc);

    if (moe_tensors_alloc(&spec, S, &ts) != 0) {
        moegen_cli_error("run: out of memory allocating tensors for %lld tokens", (long long)S);
        goto done;
    }
    double fill_start = moegen_cli_now_ms();
    if (o.load_dir) {
        for (int i = 0; i < MOE_T_COUNT; i++)
            if (ts.t[i].data && load_tensor(o.load_dir, &ts, i)) goto done;
    } else {
        moe_tensors_fill(&ts, (uint64_t)o.seed);
        if (own_tokens(&spec, &ts, (uint64_t)o.seed, ranks.rank) != 0) {
            moegen_cli_error("run: out of memory");
            goto done;
        }
    }
    double fill_ms = moegen_cli_now_ms() - fill_start;

    moegen_kernel_weights kw;
    moe_tensors_weights(&ts, &kw);
    moegen_weights weights;
    moe_bind_weights(&kw, &weights);
    const int on_gpu = desc.device == MOEGEN_DEVICE_CUDA;
    if (on_gpu) { /* device copies; the layer gets device pointers */
        if (cuda_run_open(&gpu, options.cuda_device) || cuda_run_upload(&gpu, &ts, &spec)) goto done;
        cuda_run_weights(&gpu, &weights);
    }
    if (desc.ep_size > 1) moe_bind_local_experts(&spec, desc.first_expert, &weights); /* bind the local experts only */
    if (moegen_layer_bind(layer, &weights, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        goto done;
    }

    const size_t routes = (size_t)S * spec.top_k;
    out.y = calloc((size_t)S * spec.hidden_size + 1, moegen_dtype_size(spec.dtype));
    out.ids = calloc(routes + 1, sizeof *out.ids);
    out.topk_weights = calloc(routes + 1, sizeof *out.topk_weights);
    out.router_weights = calloc(routes + 1, sizeof *out.router_weights);
    out.counts_before = calloc((size_t)spec.num_experts, sizeof *out.counts_before);
    out.counts_after = calloc((size_t)spec.num_experts, sizeof *out.counts_after);
    times = calloc((size_t)o.repeat, sizeof *times);
    if (!out.y || !out.ids || !out.topk_weights || !out.router_weights || !out.counts_before ||
        !out.counts_after || !times) {
        moegen_cli_error("run: out of memory allocating outputs");
        goto done;
    }
    moegen_forward_io io = {
        .n_tokens = S, .x = ts.t[MOE_T_X].data, .y = out.y, .topk_ids = out.ids,
        .topk_weights = out.topk_weights, .router_weights = out.router_weights,
        .counts_before = out.counts_before, .counts_after = out.counts_after,
        .rng_offset = (uint64_t)o.rng_offset,
    };
    if (on_gpu) {
        moegen_forward_io device_io;
        cuda_run_io(&gpu, S, (uint64_t)o.rng_offset, &device_io);
        if (cuda_run_time(&gpu, layer, &device_io, (int)o.repeat, times)) goto done;
        if (moegen_layer_forward(layer, &device_io, &out.stats, &err) != MOEGEN_OK) {
            moegen_cli_error("%s", err.message);
            goto done;
        }
        if (cuda_run_download(&gpu, &spec, S, out.y, out.ids, out.topk_weights, out.router_weights,
                              out.counts_before, out.counts_after))
            goto done;
    } else {
        for (long long i = -1; i < o.repeat; i++) { /* one warm-up, then the timed runs */
            double start = moegen_cli_now_ms();
            if (moegen_layer_forward(layer, &io, &out.stats, &err) != MOEGEN_OK) {
                moegen_cli_error("%s", err.message);
                goto done;
            }
            if (i >= 0) times[i] = moegen_cli_now_ms() - start;
        }
    }
    const double median_ms = moegen_cli_median(times, o.repeat); /* sorts: times[0] is the min */
    const double flops = forward_flops(&spec, S, out.counts_after);

    const double bytes = forward_bytes(&spec, S, out.counts_after);
    if (!chatty) goto report_done; /* the other ranks report through print_rank_lines */
    printf("moegen run: %s (spec sha256:%.16s)\n", spec.name, desc.spec_hash);
    printf("  variant %s\n  kernels: %s\n  tuning: %s\n",
           desc.n_variants > 1 ? "by token count (the ranges below)" : desc.variant, desc.kernel_path, desc.tuning);
    if (strcmp(desc.templates, "built-in") != 0) printf("  templates: %s\n", desc.templates);
    printf("  device %s; module %s in %.0f ms; tensors %s in %.0f ms\n", on_gpu ? gpu.info.name : "cpu",
           desc.cache_hit ? "loaded from the cache" : "generated and compiled", desc.compile_ms,
           o.load_dir ? "loaded" : "generated", fill_ms);
    printf("  %lld tokens: median %.3f ms over %lld runs (min %.3f ms)%s\n", (long long)S, median_ms,
           o.repeat, times[0], on_gpu ? " (CUDA events)" : "");
    double floor_ms = 0.0;
    if (S > 0)
        printf("  %.0f tokens/s, %.2f GFLOP/s (%.3g GFLOP per forward)\n", S / (median_ms / 1e3),
               flops / (median_ms / 1e3) / 1e9, flops / 1e9);
    if (on_gpu) {
        /* The floor of docs/performance.md: 790 TFLOP/s bf16, the device's copy rate. */
        const double bandwidth = cuda_run_bandwidth(&gpu);
        floor_ms = 1e3 * (flops / 790e12 > bytes / bandwidth ? flops / 790e12 : bytes / bandwidth);
        printf("  %.1f TFLOP/s, %.2f TB/s effective (%.3g GB moved at least); floor %.4f ms -> %.1f%% of the floor\n",
               flops / (median_ms / 1e3) / 1e12, bytes / (median_ms / 1e3) / 1e12, bytes / 1e9, floor_ms,
               100.0 * floor_ms / median_ms);
    }
    if (out.stats.capacity < 0) printf("  capacity: dropless");
    else printf("  capacity: %lld per expert", (long long)out.stats.capacity);
    printf("; %lld routes dropped; aux loss %.6g; z loss %.6g\n", (long long)out.stats.n_dropped,
           out.stats.aux_loss, out.stats.z_loss);
    print_load(&spec, out.counts_before, out.counts_after);
    if (o.plot_path) /* a failure fails the run at the end; the other ranks go on meanwhile */
        plot_failed = write_load_plot(o.plot_path, &spec, on_gpu ? gpu.info.name : "cpu", S, &out, ranks.size);
report_done:;

    /* Verify: the reference's expert work grows with tokens; sample when it is big. */
    const double H = (double)spec.hidden_size, F1 = (double)moegen_spec_ffn_rows(&spec);
    double per_token_flops = spec.top_k * (2.0 * H * F1 + 2.0 * H * spec.moe_intermediate_size);
    if (spec.shared.count > 0) per_token_flops += spec.shared.count * 6.0 * H * spec.shared.intermediate_size;
    if (spec.use_residual) per_token_flops *= 2.0;
    long long verify = o.verify_tokens;
    if (verify < 0) {
        const double budget = 4e9; /* double-precision FLOPs the reference may spend */
        verify = (long long)(budget / (per_token_flops > 1 ? per_token_flops : 1));
        if (verify < 8) verify = 8;
    }
    mask = token_sample(S, verify);
    if (!mask) {
        moegen_cli_error("run: out of memory");
        goto done;
    }
    moe_kernel_result kernel = {
        .y = out.y, .ids = out.ids, .topk_weights = out.topk_weights,
        .router_weights = out.router_weights, .counts_before = out.counts_before,
        .counts_after = out.counts_after, .n_dropped = out.stats.n_dropped,
        .capacity = out.stats.capacity, .aux_loss = out.stats.aux_loss, .z_loss = out.stats.z_loss,
    };
    moe_verify_report report;
    memset(&report, 0, sizeof report);
    report.ok = 1;
    double verify_start = moegen_cli_now_ms();
    int verify_rc = 0;
    if (o.no_verify)
        snprintf(report.message, sizeof report.message, "skipped (--no-verify)");
    else
        verify_rc = moe_verify(&spec, S, ts.t[MOE_T_X].data, &kw, (uint64_t)o.rng_offset, mask, &kernel, &report);
    if (chatty)
        printf("  verify against the double-precision reference (%.0f ms): %s%s\n", moegen_cli_now_ms() - verify_start,
               report.ok ? "" : "FAILED: ", report.message);
    if (ranks.size > 1) {
        rank_line line = {report.ok && verify_rc == 0, (long long)S, (long long)out.stats.n_dropped,
                          (unsigned long long)out.stats.bytes_sent, (unsigned long long)out.stats.bytes_received,
                          out.stats.route_ms, out.stats.dispatch_ms, out.stats.experts_ms, out.stats.combine_ms, ""};
        snprintf(line.verify, sizeof line.verify, "%.230s", report.message);
        print_rank_lines(&ranks, &line);
    }
    if (chatty && !o.no_verify && report.tokens_compared < S)
        printf("    (output checked on %lld of %lld tokens; routing, capacity, counts and losses on all)\n",
               (long long)report.tokens_compared, (long long)S);
    if (o.save_dir && save_all(o.save_dir, &ts, &spec, &out)) goto done;
    rc = (verify_rc == 0 && report.ok) ? 0 : 1;
    if (o.backward) {
        if (desc.ep_size > 1) {
            moegen_cli_error("run --backward: the training backward runs on layers with ep_size 1 so far");
            rc = 1;
            goto done;
        }
        cli_train_options train = {.seed = (uint64_t)o.seed, .rng_offset = (uint64_t)o.rng_offset,
                                   .repeat = o.repeat, .aux_coeff = o.aux_coeff, .z_coeff = o.z_coeff,
                                   .forward_ms = median_ms, .load_dir = o.load_dir, .save_dir = o.save_dir,
                                   .verify = !o.no_verify, .gpu = on_gpu ? &gpu : NULL};
        if (cli_train_step(layer, &spec, &ts, &train) != 0) rc = 1;
    }
    if (o.json && chatty) {
        char name[160], device[320], variant[320], kernels[240], floor_field[48] = "";
        if (on_gpu) snprintf(floor_field, sizeof floor_field, "\"floor_ms\": %.6f, ", floor_ms); /* a GPU floor */
        printf("{\"spec\": %s, \"dtype\": \"%s\", \"device\": %s, \"variant\": %s, \"kernels\": %s, "
               "\"tokens\": %lld, \"median_ms\": %.6f, \"min_ms\": %.6f, \"flops\": %.6g, \"bytes\": %.6g, "
               "%s\"compile_ms\": %.3f, \"cache_hit\": %d, \"verified\": %s, \"max_scaled_error\": %.4g}\n",
               moegen_cli_json_text(spec.name, name, sizeof name), moegen_dtype_name(spec.dtype),
               moegen_cli_json_text(on_gpu ? gpu.info.name : "cpu", device, sizeof device),
               moegen_cli_json_text(desc.variant, variant, sizeof variant),
               moegen_cli_json_text(desc.kernel_path, kernels, sizeof kernels), (long long)S, median_ms, times[0],
               flops, bytes, floor_field, desc.compile_ms, desc.cache_hit,
               o.no_verify ? "null" : (rc == 0 ? "true" : "false"), report.max_scaled_error);
    }
    if (plot_failed) rc = 1;

done:
    if (ranks.size > 1 && !moegen_comm_broken(ranks.comm)) rc = cli_ranks_all_ok(&ranks, rc == 0) ? 0 : 1;
    free(mask);
    free(times);
    free(out.y);
    free(out.ids);
    free(out.topk_weights);
    free(out.router_weights);
    free(out.counts_before);
    free(out.counts_after);
    moegen_layer_close(layer);
    cuda_run_close(&gpu);
    moe_tensors_free(&ts);
    moegen_spec_free(&spec);
    cli_ranks_stop(&ranks);
    return rc;
}

/* ---- moegen bench ---------------------------------------------------------------------------- */

static const char usage_bench[] =
    "usage: moegen bench SPEC --tokens N[,N...] [options]\n"
    "\n"
    "Time the forward of SPEC at several token counts in one process (weights are made\n"
    "once): median and min over --repeat runs after a warm-up (CUDA events on the GPU),\n"
    "tokens/s and GFLOP/s; on the GPU TFLOP/s, effective TB/s and the percentage of the\n"
    "floor of docs/performance.md instead (the floor is a GPU one: not shown on the CPU).\n"
    "It does not verify: use `moegen run` for that.\n"
    "\n"
    "output:\n"
    "  stdout              the table (markdown), one row per token count\n"
    "  stdout with --json  JSON lines only, one object per token count (per token count\n"
    "                      and rank for ep_size > 1); the table goes to stderr\n"
    "  stderr              always: the notices (module, cache, tuning) and errors\n"
    "\n"
    "options:\n"
    "  --tokens LIST       comma-separated token counts (required)\n"
    "  --json              stdout: JSON lines only (see output)\n"
    "  --plot FILE         write an SVG chart: time per call and tokens/s against the\n"
    "                      token count (log scales), with the floor on the GPU\n"
    "  --device D          cpu, cuda or auto (default auto)\n"
    "  --arch sm_XX        cuda: compile for this architecture\n"
    "  --repeat N          timed forwards per token count (default 20)\n"
    "  --seed S            seed of the random tensors (default 1)\n"
    "  --threads N         CPU threads\n"
    "  --cache-dir DIR     compile cache\n"
    "  --variant LIST      kernel variant overrides, e.g. tile_rows=6,gemm=bfdot (README:\n"
    "                      \"Kernel variants\")\n"
    "  --no-tuning         the default variant even where a tuning database exists\n"
    "                      (docs/tuning.md)\n";

/* --plot FILE of `moegen bench`: time per call and tokens/s against the token count, with
 * the floor (and the throughput it allows) when there is one (floor_ms NULL: none). */
static int write_bench_plot(const char *path, const moegen_spec *spec, const char *device, int tuned,
                            long long repeat, const double *tokens, const double *median_ms, const double *floor_ms,
                            int n) {
    double per_s[32], floor_per_s[32];
    for (int i = 0; i < n; i++) {
        per_s[i] = tokens[i] / (median_ms[i] / 1e3);
        floor_per_s[i] = floor_ms ? tokens[i] / (floor_ms[i] / 1e3) : 0.0;
    }
    const cli_plot_series time_series[2] = {{"median", tokens, median_ms, n, 0},
                                            {"floor (docs/performance.md)", tokens, floor_ms, n, 1}};
    const cli_plot_series rate_series[2] = {{"median", tokens, per_s, n, 0},
                                            {"at the floor", tokens, floor_per_s, n, 1}};
    const int n_series = floor_ms ? 2 : 1;
    const cli_plot_panel panels[2] = {{"time per call (ms)", 1, time_series, n_series},
                                      {"throughput (tokens/s)", 1, rate_series, n_series}};
    char title[512], subtitle[512];
    snprintf(title, sizeof title, "moegen bench: %s (%s) on %s", spec->name, moegen_dtype_name(spec->dtype), device);
    snprintf(subtitle, sizeof subtitle, "median of %lld calls after a warm-up; %s%s", repeat,
             tuned ? "the tuned variant of each token count" : "one variant",
             floor_ms ? "; dashed: the floor of docs/performance.md" : "; no floor on the CPU");
    const cli_plot_line_chart chart = {.title = title, .subtitle = subtitle, .x_label = "tokens per call",
                                       .log_x = 1, .panels = panels, .n_panels = 2};
    char *svg = cli_plot_line_svg(&chart), why[512];
    int rc = 0;
    if (!svg) rc = moegen_cli_error("bench: --plot: out of memory");
    else if (cli_plot_write(path, svg, why, sizeof why) != 0) rc = moegen_cli_error("bench: --plot: %s", why);
    else fprintf(stderr, "plot written to %s\n", path);
    free(svg);
    return rc;
}

int moegen_cli_bench(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_bench, stdout);
        return 0;
    }
    const char *spec_path = NULL, *token_list = NULL, *arch = NULL, *cache_dir = NULL, *variant = NULL;
    long long repeat = 20, seed = 1, threads = 0;
    int device = MOEGEN_DEVICE_AUTO, no_tuning = 0;
    moegen_cli_bench_output output = {0, NULL};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (spec_path) return moegen_cli_error("bench: unexpected argument %s", a);
            spec_path = a;
            continue;
        }
        if (!strcmp(a, "--no-tuning") || !strcmp(a, "--json")) {
            *(a[2] == 'j' ? &output.json : &no_tuning) = 1;
            continue;
        }
        if (!value) return moegen_cli_error("bench: option %s needs a value", a);
        i++;
        if (!strcmp(a, "--tokens")) token_list = value;
        else if (!strcmp(a, "--arch")) arch = value;
        else if (!strcmp(a, "--cache-dir")) cache_dir = value;
        else if (!strcmp(a, "--variant")) variant = value;
        else if (!strcmp(a, "--plot")) output.plot_path = value;
        else if (!strcmp(a, "--repeat")) { if (moegen_cli_parse_int(value, a, 1, 100000, &repeat)) return 1; }
        else if (!strcmp(a, "--seed")) { if (moegen_cli_parse_int(value, a, 0, LLONG_MAX, &seed)) return 1; }
        else if (!strcmp(a, "--threads")) { if (moegen_cli_parse_int(value, a, 1, 4096, &threads)) return 1; }
        else if (!strcmp(a, "--device")) {
            if (!strcmp(value, "cpu")) device = MOEGEN_DEVICE_CPU;
            else if (!strcmp(value, "cuda")) device = MOEGEN_DEVICE_CUDA;
            else if (!strcmp(value, "auto")) device = MOEGEN_DEVICE_AUTO;
            else return moegen_cli_error("bench: --device must be cpu, cuda or auto (got '%s')", value);
        } else return moegen_cli_error("bench: unknown option %s (see moegen bench --help)", a);
    }
    if (!spec_path || !token_list) return moegen_cli_error("bench: usage: moegen bench SPEC --tokens N[,N...]");
    long long counts[32];
    int n_counts = 0;
    long long max_tokens = 0;
    n_counts = moegen_cli_parse_int_list(token_list, "--tokens", 1, INT32_MAX, counts, 32);
    if (n_counts < 0) return 1;
    for (int i = 0; i < n_counts; i++)
        if (counts[i] > max_tokens) max_tokens = counts[i];
    char why[512];
    if (output.plot_path && cli_plot_check_path(output.plot_path, why, sizeof why) != 0) /* before the long work */
        return moegen_cli_error("bench: --plot: %s", why);

    moegen_error err;
    moegen_spec spec;
    if (moegen_spec_load_file(spec_path, &spec, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    if (check_fits("bench", &spec, max_tokens)) {
        moegen_spec_free(&spec);
        return 1;
    }
    if (spec.ep_size > 1) { /* every rank of an mpirun job */
        if (device == MOEGEN_DEVICE_CUDA) {
            moegen_spec_free(&spec);
            return moegen_cli_error("bench: ep_size %d: the expert-parallel bench runs on the CPU backend; "
                                    "`mpirun ... moegen run --device cuda` runs the CUDA path",
                                    spec.ep_size);
        }
        int status = moegen_cli_bench_ep(&spec, spec_path, counts, n_counts, repeat, seed, (int)threads,
                                                cache_dir, variant, &output);
        moegen_spec_free(&spec);
        return status;
    }
    FILE *table = output.json ? stderr : stdout; /* stdout: the table, or the JSON lines alone */
    int rc = 1;
    moegen_layer *layer = NULL;
    moe_tensors ts;
    memset(&ts, 0, sizeof ts);
    cuda_run gpu;
    memset(&gpu, 0, sizeof gpu);
    double *times = calloc((size_t)repeat, sizeof *times);
    int64_t *counts_after = calloc((size_t)spec.num_experts, sizeof *counts_after);
    double plot_tokens[32], plot_median[32], plot_floor[32]; /* for --plot */
    void *y = NULL;
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = device;
    options.arch = arch;
    options.cache_dir = cache_dir;
    options.variant = variant;
    options.tuning = no_tuning ? MOEGEN_TUNING_OFF : MOEGEN_TUNING_AUTO;
    options.n_threads = (int)threads;
    if (!times || !counts_after) goto done;
    if (moegen_layer_open_file(spec_path, &options, &layer, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        goto done;
    }
    moegen_layer_desc desc;
    moegen_layer_describe(layer, &desc);
    const int on_gpu = desc.device == MOEGEN_DEVICE_CUDA;
    if (moe_tensors_alloc(&spec, max_tokens, &ts) != 0) {
        moegen_cli_error("bench: out of memory allocating tensors for %lld tokens", max_tokens);
        goto done;
    }
    moe_tensors_fill(&ts, (uint64_t)seed);
    moegen_kernel_weights kw;
    moe_tensors_weights(&ts, &kw);
    moegen_weights weights;
    moe_bind_weights(&kw, &weights);
    if (on_gpu) {
        if (cuda_run_open(&gpu, options.cuda_device) || cuda_run_upload(&gpu, &ts, &spec)) goto done;
        cuda_run_weights(&gpu, &weights);
    } else if (!(y = calloc((size_t)max_tokens * spec.hidden_size, moegen_dtype_size(spec.dtype)))) {
        goto done;
    }
    if (moegen_layer_bind(layer, &weights, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        goto done;
    }
    const char *device_name = on_gpu ? gpu.info.name : "cpu";
    fprintf(stderr, "moegen bench: %s on %s, variant %s, kernels %s (module %s in %.0f ms)\n", spec.name, device_name,
            desc.n_variants > 1 ? "by token count (tuning, below)" : desc.variant, desc.kernel_path,
            desc.cache_hit ? "loaded from the cache" : "compiled", desc.compile_ms);
    fprintf(stderr, "tuning: %s\n", desc.tuning);
    if (on_gpu) { /* the floor of docs/performance.md is a GPU one */
        fprintf(table, "| tokens | median | min | tokens/s | TFLOP/s | TB/s | floor | %% of floor |\n");
        fprintf(table, "|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    } else {
        fprintf(table, "| tokens | median | min | tokens/s | GFLOP/s | GB/s |\n");
        fprintf(table, "|---:|---:|---:|---:|---:|---:|\n");
    }
    char name_json[160], device_json[320], variant_json[320], kernels_json[240];
    moegen_cli_json_text(spec.name, name_json, sizeof name_json);
    moegen_cli_json_text(device_name, device_json, sizeof device_json);
    moegen_cli_json_text(desc.variant, variant_json, sizeof variant_json);
    moegen_cli_json_text(desc.kernel_path, kernels_json, sizeof kernels_json);
    for (int c = 0; c < n_counts; c++) {
        const int64_t S = counts[c];
        moegen_forward_io io;
        moegen_forward_stats stats;
        if (on_gpu) {
            cuda_run_io(&gpu, S, 0, &io);
            if (cuda_run_time(&gpu, layer, &io, (int)repeat, times)) goto done;
            if (moegen_layer_forward(layer, &io, &stats, &err) != MOEGEN_OK ||
                gpu.cu.cuMemcpyDtoH(counts_after, gpu.counts_after, (size_t)spec.num_experts * 8) != 0) {
                moegen_cli_error("bench: %s", err.message);
                goto done;
            }
        } else {
            moegen_forward_io host_io = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .y = y, .counts_after = counts_after};
            io = host_io;
            for (long long i = -1; i < repeat; i++) {
                double start = moegen_cli_now_ms();
                if (moegen_layer_forward(layer, &io, &stats, &err) != MOEGEN_OK) {
                    moegen_cli_error("%s", err.message);
                    goto done;
                }
                if (i >= 0) times[i] = moegen_cli_now_ms() - start;
            }
        }
        const double median = moegen_cli_median(times, repeat), flops = forward_flops(&spec, S, counts_after);
        const double bytes = forward_bytes(&spec, S, counts_after);
        const double bandwidth = on_gpu ? cuda_run_bandwidth(&gpu) : 0.0;
        const double floor_ms = on_gpu ? 1e3 * (flops / 790e12 > bytes / bandwidth ? flops / 790e12 : bytes / bandwidth) : 0.0;
        const double seconds = median / 1e3;
        if (on_gpu)
            fprintf(table, "| %lld | %.4f ms | %.4f ms | %.0f | %.2f | %.3f | %.4f ms | %.1f%% |\n", (long long)S,
                    median, times[0], S / seconds, flops / seconds / 1e12, bytes / seconds / 1e12, floor_ms,
                    100.0 * floor_ms / median);
        else
            fprintf(table, "| %lld | %.4f ms | %.4f ms | %.0f | %.2f | %.2f |\n", (long long)S, median, times[0],
                    S / seconds, flops / seconds / 1e9, bytes / seconds / 1e9);
        fflush(table);
        if (output.json) {
            char floor_field[48] = ""; /* the floor of docs/performance.md: a GPU one */
            if (on_gpu) snprintf(floor_field, sizeof floor_field, ", \"floor_ms\": %.6f", floor_ms);
            printf("{\"spec\": %s, \"dtype\": \"%s\", \"device\": %s, \"variant\": %s, \"kernels\": %s, "
                   "\"tokens\": %lld, \"median_ms\": %.6f, \"min_ms\": %.6f, \"tokens_per_s\": %.6g, "
                   "\"flops\": %.6g, \"bytes\": %.6g%s, \"compile_ms\": %.3f, \"cache_hit\": %d}\n",
                   name_json, moegen_dtype_name(spec.dtype), device_json, variant_json, kernels_json, (long long)S,
                   median, times[0], S / seconds, flops, bytes, floor_field, desc.compile_ms, desc.cache_hit);
            fflush(stdout);
        }
        plot_tokens[c] = (double)S;
        plot_median[c] = median;
        plot_floor[c] = floor_ms;
    }
    if (output.plot_path &&
        write_bench_plot(output.plot_path, &spec, device_name, desc.n_variants > 1, repeat, plot_tokens, plot_median,
                         on_gpu ? plot_floor : NULL, n_counts))
        goto done;
    rc = 0;
done:
    free(times);
    free(counts_after);
    free(y);
    moegen_layer_close(layer);
    cuda_run_close(&gpu);
    moe_tensors_free(&ts);
    moegen_spec_free(&spec);
    return rc;
}
