/* test_cuda_backward_emulated.c — the CUDA training backward's kernels, run on the host
 * emulator (tests/cuda_emulator.h) and checked against the double-precision reference
 * backward (tests/reference), on a machine without a GPU.
 *
 * Place in the pipeline: spec -> gen (the real CUDA module source, exactly what NVRTC
 * compiles) -> host C++ compiler with the emulator in front -> the backward's launch steps
 * of moegen_cuda_launch.h, walked as runtime/cuda_backend.c walks them -> moe_verify_backward.
 *
 * The forward the backward reads is not the CUDA forward (its warp intrinsics and PTX do not
 * run here): this file lays out the forward's workspace itself, in plain loops, from the
 * reference forward's routing decisions (ids, router weights, valid and kept routes, the
 * loss counts) — the logits, the permutation's rows and problem table (as
 * moegen_cuda_abi.h documents them), the activations and the expert outputs. So what is
 * checked is the backward's kernels and its launch steps, for every spec of the backward
 * matrix (tests/backward_matrix.h), fp32 (the emulator has no fp16/bf16 conversions), at
 * odd token counts, including the accumulating weight phase.
 *
 * Needs a C++ compiler ($CXX, else c++); without one the test skips and says so.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backward_io.h"
#include "backward_matrix.h"
#include "capacity.h"
#include "cuda_backend.h"
#include "emit.h"
#include "kernel_grads.h"
#include "moegen_cuda_launch.h"
#include "reference.h"
#include "reference_internal.h"
#include "spec.h"
#include "template.h"
#include "tensors.h"
#include "variant.h"
#include "verify_backward.h"

#ifndef MOEGEN_TESTS_DIR
#error "MOEGEN_TESTS_DIR (where cuda_emulator.h is) must be defined by the build"
#endif

typedef void (*kernel_fn)(void);
typedef int (*launch_args_fn)(kernel_fn, unsigned, unsigned, unsigned, const moegen_cuda_backward_args *);
typedef int (*launch_which_fn)(kernel_fn, unsigned, unsigned, unsigned, const moegen_cuda_backward_args *, int);
typedef int (*launch_group_fn)(kernel_fn, unsigned, unsigned, unsigned, const moegen_cuda_backward_args *, int, int,
                               int);

/* A module compiled for the emulator. */
typedef struct emulated_module {
    void *handle;
    char prefix[128];
    int tile_m;
    launch_args_fn launch_args;
    launch_which_fn launch_which;
    launch_group_fn launch_group;
} emulated_module;

static const char *cxx(void) { return getenv("CXX") && *getenv("CXX") ? getenv("CXX") : "c++"; }

/* Render `spec` as a CUDA module (sm_90a) and compile it for the emulator into dir. */
static int build_module(const moegen_spec *spec, const char *dir, emulated_module *m) {
    static int n_built; /* each module its own file: a library with thread-locals is never unloaded */
    n_built++;
    moegen_generated gen;
    moegen_error err;
    if (moegen_cuda_generate(spec, "sm_90a", NULL, moegen_builtin_templates(), &gen, &err) != MOEGEN_OK)
        fail_msg("generate: %s", err.message);
    int written;
    if (moegen_generated_write(&gen, dir, &written, &err) != MOEGEN_OK) fail_msg("write: %s", err.message);
    snprintf(m->prefix, sizeof m->prefix, "%s", gen.symbol_prefix);
    m->tile_m = gen.variant.cuda.tile_m;
    char path[PATH_MAX], command[4 * PATH_MAX];
    snprintf(path, sizeof path, "%s/emulated.cpp", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "#include \"cuda_emulator.h\"\n#include \"%s\"\n#include \"cuda_emulator_launch.h\"\n",
            gen.files[gen.main_file].name);
    fclose(f);
    moegen_generated_free(&gen);
    snprintf(command, sizeof command,
             "%s -std=c++17 -O1 -Wall -Wextra -Werror -Wno-unused-function -Wno-unused-parameter -Wno-unknown-pragmas -shared -fPIC "
             "-pthread -I'%s' -I'%s' -o '%s/emulated%d.so' '%s' 2>'%s/compile.log'",
             cxx(), dir, MOEGEN_TESTS_DIR, dir, n_built, path, dir);
    if (system(command) != 0) {
        char log_path[PATH_MAX], log[4096] = "";
        snprintf(log_path, sizeof log_path, "%s/compile.log", dir);
        FILE *lf = fopen(log_path, "r");
        if (lf) {
            size_t n = fread(log, 1, sizeof log - 1, lf);
            log[n] = 0;
            fclose(lf);
        }
        fail_msg("%s: the module does not compile for the emulator:\n%s", spec->name, log);
    }
    snprintf(path, sizeof path, "%s/emulated%d.so", dir, n_built);
    m->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!m->handle) fail_msg("dlopen: %s", dlerror());
    *(void **)&m->launch_args = dlsym(m->handle, "emu_launch_args");
    *(void **)&m->launch_which = dlsym(m->handle, "emu_launch_which");
    *(void **)&m->launch_group = dlsym(m->handle, "emu_launch_group");
    assert_true(m->launch_args && m->launch_which && m->launch_group);
    return 0;
}

static kernel_fn kernel(const emulated_module *m, const char *suffix) {
    char name[256];
    snprintf(name, sizeof name, "%s_%s", m->prefix, suffix);
    kernel_fn k;
    *(void **)&k = dlsym(m->handle, name);
    if (!k) fail_msg("the module has no kernel %s", name);
    return k;
}

/* ---- the forward's workspace, laid out from the reference's decisions --------------------- */

static double activation(const moegen_spec *spec, double z) {
    switch (spec->activation) {
    case MOEGEN_ACT_RELU: return z > 0.0 ? z : 0.0;
    case MOEGEN_ACT_GELU:
    case MOEGEN_ACT_GEGLU: return 0.5 * z * (1.0 + erf(z / sqrt(2.0)));
    case MOEGEN_ACT_GELU_TANH: return 0.5 * z * (1.0 + tanh(sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z)));
    default: return z / (1.0 + exp(-z)); /* silu, swiglu */
    }
}

/* One FFN over `rows` rows: row r reads x[token[r]] (token NULL: row r; < 0: a zero row)
 * scaled by scale[r]; h = act(pre) (gated: act(gate) * up) and out = h w2^T + b2. */
static void ffn_rows(const moegen_spec *spec, const float *x, const int *token, const float *scale, int64_t rows,
                     int64_t F, const float *w1, const float *b1, const float *w2, const float *b2, float *h,
                     float *out) {
    const int64_t H = spec->hidden_size, gated = moegen_activation_is_gated(spec->activation);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = token ? token[r] : r;
        const double s = scale ? scale[r] : 1.0;
        for (int64_t f = 0; f < F; f++) {
            double pre[2] = {0.0, 0.0};
            for (int64_t part = 0; part <= gated; part++) {
                const float *w = w1 + (part * F + f) * H;
                double sum = 0.0;
                for (int64_t k = 0; t >= 0 && k < H; k++) sum += (double)x[t * H + k] * w[k];
                pre[part] = s * sum + (b1 ? b1[part * F + f] : 0.0);
            }
            h[r * F + f] = (float)(gated ? activation(spec, pre[0]) * pre[1] : activation(spec, pre[0]));
        }
        for (int64_t c = 0; c < H; c++) {
            double sum = b2 ? b2[c] : 0.0;
            for (int64_t f = 0; f < F; f++) sum += (double)h[r * F + f] * w2[c * F + f];
            out[r * H + c] = (float)sum;
        }
    }
}

/* Everything the training forward leaves in its workspace, for S tokens. */
typedef struct forward_state {
    moegen_cuda_layer layer;
    moegen_cuda_layout layout;
    void *workspace;
    moegen_cuda_args a;
    float *ids_weights[2]; /* the router and combine weights handed to the verification */
} forward_state;

static void lay_out_forward(const moegen_spec *spec, const emulated_module *m, const moe_tensors *ts,
                            const moegen_kernel_weights *w, const moe_ref_result *res, const moe_ref_decisions *dec,
                            forward_state *fs) {
    const int64_t S = ts->n_tokens, E = spec->num_experts, K = spec->top_k, H = spec->hidden_size;
    const int64_t F = spec->moe_intermediate_size, Ns = spec->shared.count;
    const int64_t Fs = Ns > 0 ? spec->shared.intermediate_size : 0;
    moegen_cuda_layer *l = &fs->layer;
    memset(l, 0, sizeof *l);
    l->num_experts = (int)E, l->top_k = (int)K, l->hidden = H, l->ffn = F;
    l->shared_count = (int)Ns, l->shared_ffn = Fs, l->residual = spec->use_residual;
    l->aux_loss = spec->router.aux_loss != MOEGEN_AUX_NONE, l->elem_bytes = 4, l->tile_m = m->tile_m;
    l->ffn_rows = moegen_spec_ffn_rows(spec);
    l->shared_ffn_rows = Ns > 0 ? (moegen_activation_is_gated(spec->activation) ? 2 : 1) * Fs : 0;
    l->shared_gate = Ns > 0 && spec->shared.gate;
    const int64_t capacity = moegen_spec_capacity(spec, S), max_rows = moegen_spec_max_rows(spec, S);
    fs->layout = moegen_cuda_layout_for(l, S, max_rows);
    fs->workspace = calloc(1, fs->layout.total);
    assert_non_null(fs->workspace);
    moegen_cuda_args *a = &fs->a;
    memset(a, 0, sizeof *a);
    moegen_cuda_carve(&fs->layout, fs->workspace, a);
    a->n_tokens = S, a->capacity = capacity, a->max_rows = max_rows, a->rng_offset = 0;
    a->x = ts->t[MOE_T_X].data;
    a->w = *w;
    const float *x = a->x;

    /* logits: the router input (jittered in train mode) . router_w (+ b), sanitized */
    const int jitter = spec->mode == MOEGEN_MODE_TRAIN && spec->router.input_jitter > 0.0;
    for (int64_t t = 0; t < S; t++)
        for (int64_t e = 0; e < E; e++) {
            double sum = 0.0;
            for (int64_t h = 0; h < H; h++) {
                double m_h = 1.0;
                if (jitter)
                    m_h = (1.0 - spec->router.input_jitter) +
                          moe_ref_uniform(spec->router.seed, 0, 1, (uint64_t)(t * H + h)) * 2.0 * spec->router.input_jitter;
                sum += (double)(float)(x[t * H + h] * m_h) * w->router_w[e * H + h];
            }
            if (spec->router.router_bias) sum += w->router_b[e];
            a->logits[t * E + e] = (float)moe_ref_sanitize_logit(sum);
        }
    for (int64_t e = 0; e < E; e++) a->aux_counts[e] = dec->balance_counts ? (int)dec->balance_counts[e] : 0;

    /* routes, then the permutation: expert-contiguous rows in route order */
    fs->ids_weights[0] = malloc((size_t)(S * K + 1) * sizeof(float));
    fs->ids_weights[1] = malloc((size_t)(S * K + 1) * sizeof(float));
    int64_t kept[E], offset = 0;
    memset(kept, 0, sizeof kept);
    for (int64_t r = 0; r < S * K; r++) {
        a->route_expert[r] = res->ids[r];
        a->route_weight[r] = fs->ids_weights[0][r] = (float)res->router_weights[r];
        a->route_final[r] = fs->ids_weights[1][r] = (float)res->weights[r];
        a->route_valid[r] = dec->route_valid[r];
        a->route_kept[r] = dec->route_kept[r];
        if (dec->route_kept[r]) kept[res->ids[r]]++;
    }
    const int pad = spec->capacity.pad_to_capacity && spec->capacity.mode != MOEGEN_CAP_DROPLESS;
    int tiles = 0, next[E];
    for (int64_t e = 0; e < E; e++) {
        const int64_t rows = pad ? capacity : kept[e];
        a->expert_offset[e] = offset;
        a->expert_kept[e] = kept[e];
        a->problems[e] = (moegen_cuda_problem){offset, rows, tiles, (int)e};
        tiles += (int)((rows + m->tile_m - 1) / m->tile_m);
        next[e] = (int)offset;
        offset += rows;
    }
    a->expert_offset[E] = offset;
    assert_true(offset <= max_rows);
    a->group_tiles[MOEGEN_GROUP_ROUTED] = tiles;
    const int token_tiles = (int)((S + m->tile_m - 1) / m->tile_m);
    for (int64_t i = 0; i < Ns; i++) a->problems[E + i] = (moegen_cuda_problem){i * S, S, (int)i * token_tiles, (int)i};
    a->group_tiles[MOEGEN_GROUP_SHARED] = (int)Ns * token_tiles;
    a->problems[E + Ns] = (moegen_cuda_problem){0, S, 0, 0};
    a->group_tiles[MOEGEN_GROUP_RESIDUAL] = token_tiles;
    for (int64_t row = 0; row < max_rows; row++) a->row_token[row] = -1;
    for (int64_t r = 0; r < S * K; r++) {
        a->route_row[r] = -1;
        if (!dec->route_kept[r]) continue;
        const int row = next[res->ids[r]]++;
        a->route_row[r] = row;
        a->row_token[row] = (int)(r / K);
        a->row_scale[row] = (float)res->weights[r];
    }

    /* the FFNs: routed experts over their rows, shared experts and the residual MLP over tokens */
    const int64_t F1 = l->ffn_rows, Fs1 = l->shared_ffn_rows;
    for (int64_t e = 0; e < E; e++) {
        const int64_t first = a->expert_offset[e];
        ffn_rows(spec, x, a->row_token + first, spec->weight_on_input ? a->row_scale + first : NULL, kept[e], F,
                 (const float *)w->w1 + e * F1 * H, w->b1 ? (const float *)w->b1 + e * F1 : NULL,
                 (const float *)w->w2 + e * H * F, w->b2 ? (const float *)w->b2 + e * H : NULL,
                 (float *)a->hidden + first * F, a->expert_out + first * H);
    }
    for (int64_t i = 0; i < Ns; i++)
        ffn_rows(spec, x, NULL, NULL, S, Fs, (const float *)w->shared_w1 + i * Fs1 * H,
                 w->shared_b1 ? (const float *)w->shared_b1 + i * Fs1 : NULL, (const float *)w->shared_w2 + i * H * Fs,
                 w->shared_b2 ? (const float *)w->shared_b2 + i * H : NULL, (float *)a->shared_hidden + i * S * Fs,
                 a->shared_out + i * S * H);
    if (spec->use_residual)
        ffn_rows(spec, x, NULL, NULL, S, F, w->residual_w1, w->residual_b1, w->residual_w2, w->residual_b2,
                 a->residual_hidden, a->residual_out);
}

/* ---- the backward, step by step ----------------------------------------------------------- */

static void run_backward(const emulated_module *m, const forward_state *fs, moegen_cuda_backward_args *b,
                         unsigned phases) {
    moegen_cuda_step steps[MOEGEN_CUDA_MAX_BACKWARD_STEPS];
    const int n = moegen_cuda_backward_steps(&fs->layer, fs->a.n_tokens, fs->a.max_rows, phases, steps);
    static const char *const shape_kernels[4] = {"bwd_pre", "bwd_dh", "bwd_du", "bwd_weights"};
    for (int i = 0; i < n; i++) {
        const moegen_cuda_step *s = &steps[i];
        int rc;
        char suffix[64];
        if (s->kind == MOEGEN_CUDA_BWD_COMBINE || s->kind == MOEGEN_CUDA_BWD_TOKENS) {
            rc = m->launch_args(kernel(m, s->kind == MOEGEN_CUDA_BWD_COMBINE ? "bwd_combine" : "bwd_tokens"), s->grid_x,
                                s->grid_y, s->threads, b);
        } else if (s->kind == MOEGEN_CUDA_BWD_DENSE) {
            rc = m->launch_which(kernel(m, "bwd_dense_weights"), s->grid_x, s->grid_y, s->threads, b, s->group.group);
        } else {
            assert_true(s->kind >= MOEGEN_CUDA_BWD_PRE && s->kind <= MOEGEN_CUDA_BWD_WEIGHTS);
            snprintf(suffix, sizeof suffix, "f%lld_%s", s->group.ffn, shape_kernels[s->kind - MOEGEN_CUDA_BWD_PRE]);
            rc = m->launch_group(kernel(m, suffix), s->grid_x, s->grid_y, s->threads, b, s->group.group,
                                 s->group.first, s->group.count);
        }
        assert_int_equal(rc, 0);
    }
}

/* One spec at S tokens: the data phase with dx, the weight phase, then the weight phase
 * again accumulating (every gradient must double). */
static void check_tokens(const matrix_spec *entry, const moegen_spec *spec_in, const emulated_module *mp, int64_t S) {
    moegen_spec spec = *spec_in;
    emulated_module m = *mp;
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
    moe_tensors_fill(&ts, 1000 + (uint64_t)S);
    moegen_kernel_weights w;
    moe_tensors_weights(&ts, &w);
    moe_backward_buffers bb;
    assert_int_equal(moe_backward_alloc(&bb, &spec, S, 77 + (uint64_t)S), 0);
    moe_ref_options opt;
    memset(&opt, 0, sizeof opt);
    moe_ref_result res;
    moe_ref_decisions dec;
    char why[256];
    if (moe_ref_forward_decisions(&spec, S, ts.t[MOE_T_X].data, &w, &opt, 0, &res, &dec, why) != 0)
        fail_msg("reference forward: %s", why);

    forward_state fs;
    lay_out_forward(&spec, &m, &ts, &w, &res, &dec, &fs);
    const moegen_cuda_backward_layout BL = moegen_cuda_backward_layout_for(&fs.layer, S, fs.a.max_rows);
    void *backward = calloc(1, BL.total);
    assert_non_null(backward);
    moegen_cuda_backward_args b;
    memset(&b, 0, sizeof b);
    b.f = fs.a;
    b.dy = bb.dy;
    b.dx = bb.dx;
    b.aux_coeff = 0.37;
    b.z_coeff = 0.11f;
    moegen_cuda_backward_carve(&BL, backward, &b);
    b.grads = moegen_kernel_grads_of(&bb.grads);
    for (int i = 1; i < MOE_T_COUNT; i++) { /* garbage in every gradient: overwritten, not added to */
        float *g = moe_backward_grad(&bb, i);
        for (size_t j = 0; g && j < bb.n[i]; j++) g[j] = 1e30f;
    }
    run_backward(&m, &fs, &b, MOEGEN_CUDA_PHASE_DATA | MOEGEN_CUDA_PHASE_WEIGHTS);

    moe_backward_case c = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .w = &w, .ids = res.ids,
                           .router_weights = fs.ids_weights[0], .topk_weights = fs.ids_weights[1], .dy = bb.dy,
                           .aux_coeff = b.aux_coeff, .z_coeff = b.z_coeff};
    moe_backward_report report;
    assert_int_equal(moe_verify_backward(&spec, &c, bb.dx, &bb.grads, &report), 0);
    if (!report.ok) fail_msg("%s, S = %lld: %s", entry->name, (long long)S, report.message);
    print_message("  %-26s S = %3lld: %d tensors, worst %.3g of tolerance (%s)\n", entry->name, (long long)S,
                  report.n_tensors, report.max_scaled_error, report.worst);

    /* the weight phase again, accumulating: every gradient doubles (x + x is exact) */
    moe_backward_buffers once;
    assert_int_equal(moe_backward_alloc(&once, &spec, S, 1), 0);
    for (int i = 1; i < MOE_T_COUNT; i++)
        if (moe_backward_grad(&bb, i)) memcpy(moe_backward_grad(&once, i), moe_backward_grad(&bb, i), bb.n[i] * 4);
    b.accumulate = 1;
    run_backward(&m, &fs, &b, MOEGEN_CUDA_PHASE_WEIGHTS);
    for (int i = 1; i < MOE_T_COUNT; i++) {
        const float *twice = moe_backward_grad(&bb, i), *single = moe_backward_grad(&once, i);
        for (size_t j = 0; twice && j < bb.n[i]; j++)
            if (twice[j] != 2.0f * single[j])
                fail_msg("%s: accumulated gradient %d[%zu] is %g, not twice %g", entry->name, i, j, twice[j], single[j]);
    }
    moe_backward_free(&once);
    free(backward);
    free(fs.workspace);
    free(fs.ids_weights[0]);
    free(fs.ids_weights[1]);
    moe_ref_decisions_free(&dec);
    moe_ref_result_free(&res);
    moe_backward_free(&bb);
    moe_tensors_free(&ts);
}

static void check_spec(const matrix_spec *entry, const int64_t *tokens, int n_tokens, const char *dir) {
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "name: emu_%s\ndtype: fp32\n%s%s", entry->name, BASE, entry->yaml);
    for (char *c = yaml; *c; c++)
        if (*c == '-') *c = '_';
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), "matrix.yaml", &spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    emulated_module m;
    memset(&m, 0, sizeof m);
    build_module(&spec, dir, &m);
    for (int i = 0; i < n_tokens; i++) check_tokens(entry, &spec, &m, tokens[i]);
    moegen_spec_free(&spec);
}

static int have_cxx(void) {
    char command[256];
    snprintf(command, sizeof command, "%s --version >/dev/null 2>&1", cxx());
    return system(command) == 0;
}

static void every_matrix_spec_matches_the_reference_backward(void **state) {
    (void)state;
    if (!have_cxx()) {
        print_message("no C++ compiler (%s); skipping\n", cxx());
        skip();
    }
    char dir[] = "/tmp/moegen-cuda-emu-XXXXXX";
    assert_non_null(mkdtemp(dir));
    static const int64_t tokens[] = {1, 37, 130};
    for (size_t i = 0; i < sizeof MATRIX / sizeof MATRIX[0]; i++)
        check_spec(&MATRIX[i], tokens, (int)(sizeof tokens / sizeof tokens[0]), dir);
    char command[PATH_MAX + 16];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    assert_int_equal(system(command), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_matrix_spec_matches_the_reference_backward),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
