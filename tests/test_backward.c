/* test_backward.c — the training backward (docs/numerics.md §8, §9) of the CPU backend:
 * the generated gradients against the independent double reference backward over a matrix
 * of specs (every score function and order, groups, capacity modes with drops, shared
 * experts, the residual MLP, biases, every activation and dtype, token counts 0/1/odd/
 * large), bitwise determinism across thread counts, the split backward, accumulation,
 * used_token, and the API's errors. The random-spec sweep of the backward is
 * `moegen_sweep --backward` (label sweep). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backward_io.h"
#include "forward_io.h"
#include "moegen.h"
#include "tensors.h"
#include "verify.h"
#include "verify_backward.h"

#include "backward_matrix.h"

static char *spec_text_on(const matrix_spec *m, const char *dtype, const char *base) {
    static char text[2048];
    snprintf(text, sizeof text, "name: %s\ndtype: %s\n%s%s", m->name, dtype, base, m->yaml);
    return text;
}

static char *spec_text(const matrix_spec *m, const char *dtype) {
    return spec_text_on(m, dtype, BASE);
}

static int keep_activations;     /* the next open_cpu's opts.activations */
static const char *open_variant; /* the next open_cpu's opts.variant (NULL: the default); reset by it */

static moegen_layer *open_cpu(const char *yaml, int threads, moegen_spec *spec) {
    moegen_error err;
    if (spec && moegen_spec_parse(yaml, strlen(yaml), "matrix.yaml", spec, &err) != MOEGEN_OK)
        fail_msg("spec: %s\n%s", err.message, yaml);
    moegen_open_options opts;
    moegen_open_options_init(&opts);
    opts.device = MOEGEN_DEVICE_CPU;
    opts.n_threads = threads;
    opts.tuning = MOEGEN_TUNING_OFF;
    opts.activations = keep_activations ? MOEGEN_ACTIVATIONS_KEEP : MOEGEN_ACTIVATIONS_RECOMPUTE;
    opts.variant = open_variant;
    open_variant = NULL;
    moegen_layer *layer = NULL;
    if (moegen_layer_open_string(yaml, strlen(yaml), "matrix.yaml", &opts, &layer, &err) != MOEGEN_OK)
        fail_msg("open: %s\n%s", err.message, yaml);
    return layer;
}

/* One training step's worth of calls on `layer`: forward_train, backward (fused or split).
 * Fills o (forward outputs) and b (gradients). */
static void train_step(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts, const uint8_t *used,
                       moe_outputs *o, moe_backward_buffers *b, double aux_coeff, double z_coeff, int split) {
    moegen_error err;
    moegen_weights w;
    moe_tensors_bind_weights(spec, ts, 0, &w);
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) fail_msg("bind: %s", err.message);
    moegen_forward_io io = moe_outputs_io(o, ts, 11);
    io.used_token = used;
    moegen_saved *saved = NULL;
    if (moegen_layer_forward_train(layer, &io, &saved, &o->stats, &err) != MOEGEN_OK)
        fail_msg("forward_train: %s", err.message);
    moegen_backward_io bio = {.dy = b->dy, .dx = b->dx, .aux_coeff = aux_coeff, .z_coeff = z_coeff};
    if (split) {
        if (moegen_layer_backward(layer, saved, &bio, NULL, &err) != MOEGEN_OK) fail_msg("backward: %s", err.message);
        if (moegen_layer_backward_weights(layer, saved, &b->grads, &err) != MOEGEN_OK)
            fail_msg("backward_weights: %s", err.message);
    } else if (moegen_layer_backward(layer, saved, &bio, &b->grads, &err) != MOEGEN_OK) {
        fail_msg("backward: %s", err.message);
    }
    moegen_saved_free(saved);
}

/* Forward + backward of S tokens, both verified against the reference. */
static void check_case(moegen_layer *layer, const moegen_spec *spec, int64_t S, uint64_t seed, int with_mask) {
    moe_tensors ts;
    moe_outputs o;
    moe_backward_buffers b;
    assert_int_equal(moe_tensors_alloc(spec, S, &ts), 0);
    moe_tensors_fill(&ts, seed);
    assert_int_equal(moe_outputs_alloc(&o, spec, S), 0);
    assert_int_equal(moe_backward_alloc(&b, spec, S, seed + 1), 0);
    uint8_t *used = NULL;
    if (with_mask) {
        used = malloc(S > 0 ? (size_t)S : 1);
        for (int64_t t = 0; t < S; t++) used[t] = (t % 3) != 1; /* every third token is padding */
    }
    train_step(layer, spec, &ts, used, &o, &b, 0.5, 0.25, 0);

    moegen_kernel_weights kw;
    moe_tensors_weights(&ts, &kw);
    if (!with_mask) { /* the training forward is the forward */
        moe_kernel_result kernel = moe_outputs_result(&o);
        moe_verify_report fr;
        assert_int_equal(moe_verify(spec, S, ts.t[MOE_T_X].data, &kw, 11, NULL, &kernel, &fr), 0);
        if (!fr.ok) fail_msg("%s S=%lld forward: %s", spec->name, (long long)S, fr.message);
    } else { /* padding tokens: never dispatched or counted, combine weight 0 */
        int64_t counted = 0;
        for (int e = 0; e < spec->num_experts; e++) counted += o.counts_before[e];
        int64_t used_routes = 0;
        for (int64_t t = 0; t < S; t++) {
            if (used[t]) {
                used_routes += spec->top_k;
                continue;
            }
            for (int j = 0; j < spec->top_k; j++) assert_true(o.topk_weights[t * spec->top_k + j] == 0.0f);
        }
        assert_true(counted <= used_routes);
    }
    moe_backward_case c = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .w = &kw, .rng_offset = 11, .used_token = used,
                           .ids = o.ids, .router_weights = o.router_weights, .topk_weights = o.topk_weights,
                           .dy = b.dy, .aux_coeff = 0.5, .z_coeff = 0.25};
    moe_backward_report report;
    assert_int_equal(moe_verify_backward(spec, &c, b.dx, &b.grads, &report), 0);
    if (!report.ok)
        fail_msg("%s (%s) S=%lld%s: %s", spec->name, moegen_dtype_name(spec->dtype), (long long)S,
                 with_mask ? " used_token" : "", report.message);
    free(used);
    moe_backward_free(&b);
    moe_outputs_free(&o);
    moe_tensors_free(&ts);
}

/* Every matrix spec in one dtype on the shapes `base` gives, at 0, 1, 7 and `most` tokens,
 * and once with a token mask; `variant` as opts.variant (NULL: the default). */
static void run_matrix_on(const char *dtype, const char *base, const char *variant, int64_t most) {
    for (size_t i = 0; i < N_MATRIX; i++) {
        moegen_spec spec;
        const char *yaml = spec_text_on(&MATRIX[i], dtype, base);
        open_variant = variant;
        moegen_layer *layer = open_cpu(yaml, 2, &spec);
        const int64_t tokens[] = {0, 1, 7, most};
        for (size_t s = 0; s < sizeof tokens / sizeof tokens[0]; s++) check_case(layer, &spec, tokens[s], 100 + i, 0);
        check_case(layer, &spec, 9, 200 + i, 1);
        moegen_layer_close(layer);
        moegen_spec_free(&spec);
    }
}

static void run_matrix(const char *dtype) {
    run_matrix_on(dtype, BASE, NULL, 64);
}

static void test_matrix_fp32(void **state) {
    (void)state;
    run_matrix("fp32");
}

static void test_matrix_bf16(void **state) {
    (void)state;
    run_matrix("bf16");
}

static void test_matrix_fp16(void **state) {
    (void)state;
    run_matrix("fp16");
}

/* bf16 on AMX tiles, where this CPU has them (else the variant runs the FMA kernels: the
 * layer's kernel path says which): shapes AMX takes (every k a multiple of 32), k over more
 * than one packed chunk of the backward's weights (128) with a partial last one (hidden 160,
 * gated 2 x 96), and more rows per expert than one task of the backward holds (64 on AMX,
 * 32 on the FMA kernels). */
static void test_matrix_bf16_amx(void **state) {
    (void)state;
    run_matrix_on("bf16", "num_experts: 8\nhidden_size: 160\nmoe_intermediate_size: 96\n", "gemm=amx", 320);
}

/* fp32 on outer products at the machine's vector width (16 lanes with AVX-512: the intrinsic
 * epilogue, which keeps the pre-activations in training): tiles that do not divide the
 * intermediate size (80 by 6) and more rows per expert than one row block (32). */
static void test_matrix_fp32_outer(void **state) {
    (void)state;
    run_matrix_on("fp32", "num_experts: 8\nhidden_size: 48\nmoe_intermediate_size: 80\n",
                  "gemm=outer,tile_cols=6,tile_rows=2,block_rows=32,block_cols=12", 200);
}

/* A larger call: more rows per expert than one task of the kernels holds. */
static void test_many_tokens(void **state) {
    (void)state;
    moegen_spec spec;
    const char *yaml = "name: many\ndtype: bf16\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                       "moe_intermediate_size: 48\nactivation: swiglu\nshared_experts:\n  count: 1\n"
                       "  intermediate_size: 32\n";
    moegen_layer *layer = open_cpu(yaml, 2, &spec);
    check_case(layer, &spec, 301, 5, 0);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

/* The same gradients, bit for bit, on 1 and 3 threads, fused or split; accumulate adds. */
static void test_determinism_split_accumulate(void **state) {
    (void)state;
    moegen_spec spec;
    const char *yaml = spec_text(&MATRIX[5], "bf16"); /* shared, residual, biases, noise */
    moegen_layer *one = open_cpu(yaml, 1, &spec), *three = open_cpu(yaml, 3, NULL);
    const int64_t S = 37;
    moe_tensors ts;
    assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
    moe_tensors_fill(&ts, 9);
    moe_outputs o1, o3, o4;
    moe_backward_buffers b1, b3, b4;
    assert_int_equal(moe_outputs_alloc(&o1, &spec, S), 0);
    assert_int_equal(moe_outputs_alloc(&o3, &spec, S), 0);
    assert_int_equal(moe_outputs_alloc(&o4, &spec, S), 0);
    assert_int_equal(moe_backward_alloc(&b1, &spec, S, 4), 0);
    assert_int_equal(moe_backward_alloc(&b3, &spec, S, 4), 0);
    assert_int_equal(moe_backward_alloc(&b4, &spec, S, 4), 0);
    train_step(one, &spec, &ts, NULL, &o1, &b1, 0.1, 0.01, 0);
    train_step(three, &spec, &ts, NULL, &o3, &b3, 0.1, 0.01, 1);
    assert_true(moe_backward_same_bits(&spec, &b1, &b3));

    /* accumulate: b4 starts as b1's gradients; after one more step it holds g + g */
    for (int i = 0; i < MOE_T_COUNT; i++) {
        float *src = moe_backward_grad(&b1, i), *dst = moe_backward_grad(&b4, i);
        if (i != MOE_T_X && src) memcpy(dst, src, b1.n[i] * sizeof(float));
    }
    b4.grads.accumulate = 1;
    train_step(three, &spec, &ts, NULL, &o4, &b4, 0.1, 0.01, 0);
    for (int i = 0; i < MOE_T_COUNT; i++) {
        if (i == MOE_T_X || !moe_backward_grad(&b1, i)) continue;
        const float *g = moe_backward_grad(&b1, i), *sum = moe_backward_grad(&b4, i);
        for (size_t j = 0; j < b1.n[i]; j++)
            if (sum[j] != g[j] + g[j]) fail_msg("accumulate: tensor %d [%zu]: %g, want %g", i, j, sum[j], g[j] + g[j]);
    }
    moe_backward_free(&b1);
    moe_backward_free(&b3);
    moe_backward_free(&b4);
    moe_outputs_free(&o1);
    moe_outputs_free(&o3);
    moe_outputs_free(&o4);
    moe_tensors_free(&ts);
    moegen_layer_close(one);
    moegen_layer_close(three);
    moegen_spec_free(&spec);
}

/* Out-of-order and mismatched calls fail with a message; nothing crashes. */
static void test_errors(void **state) {
    (void)state;
    moegen_spec spec;
    const char *yaml = spec_text(&MATRIX[0], "fp32");
    moegen_layer *layer = open_cpu(yaml, 1, &spec), *other = open_cpu(yaml, 1, NULL);
    const int64_t S = 5;
    moe_tensors ts;
    moe_outputs o;
    moe_backward_buffers b;
    assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
    moe_tensors_fill(&ts, 1);
    assert_int_equal(moe_outputs_alloc(&o, &spec, S), 0);
    assert_int_equal(moe_backward_alloc(&b, &spec, S, 2), 0);
    moegen_error err;
    moegen_forward_io io = moe_outputs_io(&o, &ts, 0);
    moegen_saved *saved = NULL;
    /* before bind */
    assert_int_equal(moegen_layer_forward_train(layer, &io, &saved, NULL, &err), MOEGEN_ERR_STATE);
    assert_null(saved);
    moegen_weights w;
    moe_tensors_bind_weights(&spec, &ts, 0, &w);
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_OK);
    assert_int_equal(moegen_layer_forward_train(layer, &io, NULL, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_layer_forward_train(layer, &io, &saved, NULL, &err), MOEGEN_OK);
    assert_true(moegen_saved_bytes(saved) > 0);
    /* weights before the data phase */
    assert_int_equal(moegen_layer_backward_weights(layer, saved, &b.grads, &err), MOEGEN_ERR_STATE);
    assert_non_null(strstr(err.message, "backward"));
    /* another layer's saved forward */
    moegen_backward_io bio = {.dy = b.dy, .dx = b.dx};
    assert_int_equal(moegen_layer_backward(other, saved, &bio, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "another layer"));
    /* no dy */
    moegen_backward_io no_dy = {.dx = b.dx};
    assert_int_equal(moegen_layer_backward(layer, saved, &no_dy, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    /* a non-finite coefficient */
    moegen_backward_io nan_coeff = {.dy = b.dy, .aux_coeff = 0.0 / 0.0};
    assert_int_equal(moegen_layer_backward(layer, saved, &nan_coeff, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    /* misaligned gradient buffer */
    moegen_grads bad = b.grads;
    bad.w1 = (float *)((char *)bad.w1 + 1);
    assert_int_equal(moegen_layer_backward(layer, saved, &bio, &bad, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    /* and then the right calls still work; the weights phase may run twice */
    assert_int_equal(moegen_layer_backward(layer, saved, &bio, NULL, &err), MOEGEN_OK);
    assert_int_equal(moegen_layer_backward_weights(layer, saved, &b.grads, &err), MOEGEN_OK);
    assert_int_equal(moegen_layer_backward_weights(layer, saved, &b.grads, &err), MOEGEN_OK);
    moegen_saved_free(saved);
    moegen_saved_free(NULL);
    assert_int_equal(moegen_saved_bytes(NULL), 0);
    moe_backward_free(&b);
    moe_outputs_free(&o);
    moe_tensors_free(&ts);
    moegen_layer_close(layer);
    moegen_layer_close(other);
    moegen_spec_free(&spec);
}

/* Two saved forwards outstanding at once (micro-batches), backward in the other order. */
static void test_two_saved_forwards(void **state) {
    (void)state;
    moegen_spec spec;
    const char *yaml = spec_text(&MATRIX[2], "fp32");
    moegen_layer *layer = open_cpu(yaml, 2, &spec);
    moe_tensors ta, tb;
    moe_outputs oa, ob;
    moe_backward_buffers ga, gb, ref;
    assert_int_equal(moe_tensors_alloc(&spec, 13, &ta), 0);
    assert_int_equal(moe_tensors_alloc(&spec, 13, &tb), 0);
    moe_tensors_fill(&ta, 21);
    moe_tensors_fill(&tb, 21);
    moe_tensor *x = &tb.t[MOE_T_X]; /* same weights, other tokens */
    for (size_t i = 0; i < x->n_elems; i++) ((float *)x->data)[i] = -((float *)x->data)[i];
    assert_int_equal(moe_outputs_alloc(&oa, &spec, 13), 0);
    assert_int_equal(moe_outputs_alloc(&ob, &spec, 13), 0);
    assert_int_equal(moe_backward_alloc(&ga, &spec, 13, 1), 0);
    assert_int_equal(moe_backward_alloc(&gb, &spec, 13, 1), 0);
    assert_int_equal(moe_backward_alloc(&ref, &spec, 13, 1), 0);
    moegen_error err;
    moegen_weights w;
    moe_tensors_bind_weights(&spec, &ta, 0, &w);
    assert_int_equal(moegen_layer_bind(layer, &w, &err), MOEGEN_OK);
    moegen_forward_io ia = moe_outputs_io(&oa, &ta, 0), ib = moe_outputs_io(&ob, &tb, 0);
    moegen_saved *sa, *sb;
    assert_int_equal(moegen_layer_forward_train(layer, &ia, &sa, NULL, &err), MOEGEN_OK);
    assert_int_equal(moegen_layer_forward_train(layer, &ib, &sb, NULL, &err), MOEGEN_OK);
    moegen_backward_io bb = {.dy = gb.dy, .dx = gb.dx}, ba = {.dy = ga.dy, .dx = ga.dx};
    assert_int_equal(moegen_layer_backward(layer, sb, &bb, &gb.grads, &err), MOEGEN_OK);
    assert_int_equal(moegen_layer_backward(layer, sa, &ba, &ga.grads, &err), MOEGEN_OK);
    moegen_saved_free(sa);
    moegen_saved_free(sb);
    /* a's gradients equal those of a step that ran alone */
    moe_outputs alone;
    assert_int_equal(moe_outputs_alloc(&alone, &spec, 13), 0);
    train_step(layer, &spec, &ta, NULL, &alone, &ref, 0.0, 0.0, 0);
    assert_true(moe_backward_same_bits(&spec, &ga, &ref));
    moe_outputs_free(&alone);
    moe_backward_free(&ga);
    moe_backward_free(&gb);
    moe_backward_free(&ref);
    moe_outputs_free(&oa);
    moe_outputs_free(&ob);
    moe_tensors_free(&ta);
    moe_tensors_free(&tb);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
}

/* Tensor i refilled with full-mantissa values in [-scale, scale): moe_tensors_fill's values
 * (multiples of scale / 64) make short sums exact in any order, which would hide a GEMM that
 * sums in another order than the forward's. */
static void fill_full_mantissa(moe_tensors *ts, int i, uint64_t seed, double scale) {
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t n = 0; n < ts->t[i].n_elems; n++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        moe_tensor_set(ts, i, n, ((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0) * scale);
    }
}

/* Kept activations give the same gradients, bit for bit, as recomputed ones: the backward
 * recomputes GEMM1 on the forward's own kernels, whichever they are (FMA or vdpbf16ps dot
 * products, AMX tiles where the CPU has them, outer products), so h and the pre-activations
 * are the forward's either way. Both verify; a second backward of a kept forward is refused. */
static void test_kept_activations(void **state) {
    (void)state;
    /* AMX tiles need H and every intermediate size a multiple of 32 */
    static const char *const AMX_SPEC =
        "name: amx-shared-residual\ndtype: bf16\nnum_experts: 8\nhidden_size: 64\nmoe_intermediate_size: 32\n"
        "semantics: deepspeed\nmode: train\nnum_experts_per_tok: 2\nactivation: geglu\nexpert_bias: true\n"
        "use_residual: true\nshared_experts:\n  count: 2\n  intermediate_size: 64\n  gate: true\n";
    static const struct {
        const char *dtype, *variant;
        int matrix; /* 5: shared + residual; 0: plain swiglu; -1: AMX_SPEC */
    } CASES[] = {
        {"fp32", NULL, 5},
        {"fp32", "gemm=outer,vector_floats=8,tile_cols=4,tile_rows=2,block_rows=16,block_cols=8", 5},
        {"fp32", "gemm=outer,tile_cols=4,tile_rows=2,block_rows=32,block_cols=8", 5}, /* AVX-512 epilogue */
        {"bf16", NULL, 0},
        {"bf16", "gemm=amx,tile_rows=4,block_rows=32,block_cols=32", -1},
        {"fp16", NULL, 0},
    };
    for (size_t d = 0; d < sizeof CASES / sizeof CASES[0]; d++) {
        moegen_spec spec;
        const char *yaml = CASES[d].matrix < 0 ? AMX_SPEC : spec_text(&MATRIX[CASES[d].matrix], CASES[d].dtype);
        open_variant = CASES[d].variant;
        moegen_layer *recompute = open_cpu(yaml, 2, &spec);
        keep_activations = 1;
        open_variant = CASES[d].variant;
        moegen_layer *keep = open_cpu(yaml, 2, NULL);
        keep_activations = 0;
        const int64_t S = 45;
        moe_tensors ts;
        moe_outputs o1, o2;
        moe_backward_buffers b1, b2;
        assert_int_equal(moe_tensors_alloc(&spec, S, &ts), 0);
        moe_tensors_fill(&ts, 31);
        const int GEMM1_INPUTS[] = {MOE_T_X, MOE_T_W1, MOE_T_SHARED_W1, MOE_T_RESIDUAL_W1};
        for (int i = 0; i < 4; i++)
            fill_full_mantissa(&ts, GEMM1_INPUTS[i], 5 + (uint64_t)i, i == 0 ? 1.0 : 1.0 / sqrt((double)spec.hidden_size));
        assert_int_equal(moe_outputs_alloc(&o1, &spec, S), 0);
        assert_int_equal(moe_outputs_alloc(&o2, &spec, S), 0);
        assert_int_equal(moe_backward_alloc(&b1, &spec, S, 8), 0);
        assert_int_equal(moe_backward_alloc(&b2, &spec, S, 8), 0);
        train_step(recompute, &spec, &ts, NULL, &o1, &b1, 0.2, 0.1, 0);
        train_step(keep, &spec, &ts, NULL, &o2, &b2, 0.2, 0.1, 1);
        if (!moe_backward_same_bits(&spec, &b1, &b2))
            fail_msg("%s, variant %s: kept and recomputed activations give different gradients", CASES[d].dtype,
                     CASES[d].variant ? CASES[d].variant : "default");
        moegen_kernel_weights kw;
        moe_tensors_weights(&ts, &kw);
        moe_backward_case c = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .w = &kw, .rng_offset = 11, .ids = o2.ids,
                               .router_weights = o2.router_weights, .topk_weights = o2.topk_weights, .dy = b2.dy,
                               .aux_coeff = 0.2, .z_coeff = 0.1};
        moe_backward_report report;
        assert_int_equal(moe_verify_backward(&spec, &c, b2.dx, &b2.grads, &report), 0);
        if (!report.ok) fail_msg("kept activations (%s): %s", CASES[d].dtype, report.message);

        /* the kept pre-activations become their gradients: one backward per saved forward */
        moegen_error err;
        moegen_forward_io io = moe_outputs_io(&o2, &ts, 11);
        moegen_saved *saved = NULL;
        assert_int_equal(moegen_layer_forward_train(keep, &io, &saved, NULL, &err), MOEGEN_OK);
        moegen_backward_io bio = {.dy = b2.dy, .dx = b2.dx};
        assert_int_equal(moegen_layer_backward(keep, saved, &bio, NULL, &err), MOEGEN_OK);
        assert_int_equal(moegen_layer_backward(keep, saved, &bio, NULL, &err), MOEGEN_ERR_STATE);
        assert_non_null(strstr(err.message, "kept activations"));
        assert_int_equal(moegen_layer_backward_weights(keep, saved, &b2.grads, &err), MOEGEN_OK);
        moegen_saved_free(saved);

        moe_backward_free(&b1);
        moe_backward_free(&b2);
        moe_outputs_free(&o1);
        moe_outputs_free(&o2);
        moe_tensors_free(&ts);
        moegen_layer_close(recompute);
        moegen_layer_close(keep);
        moegen_spec_free(&spec);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_two_saved_forwards),
        cmocka_unit_test(test_determinism_split_accumulate),
        cmocka_unit_test(test_kept_activations),
        cmocka_unit_test(test_many_tokens),
        cmocka_unit_test(test_matrix_fp32),
        cmocka_unit_test(test_matrix_bf16),
        cmocka_unit_test(test_matrix_bf16_amx),
        cmocka_unit_test(test_matrix_fp32_outer),
        cmocka_unit_test(test_matrix_fp16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
