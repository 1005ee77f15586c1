/* cpu_bench_ggml.c — ggml's MUL_MAT_ID path, an anchor of bench/cpu.sh: the MoE FFN graph as
 * llama.cpp builds it, computed by ggml's CPU backend (the engine under llama.cpp).
 *
 * The graph, for S tokens of hidden size H (ggml's shapes list the innermost dimension first):
 *   router   logits = mul_mat(Wr, x) [E, S]; soft_max; argsort_top_k; get_rows of the weights
 *            (and their renormalization when the spec has it): computed and timed, not used;
 *   experts  gate_up = mul_mat_id(W1 [H, F1, E], x, ids) [F1, k, S], the merged gate/up form;
 *            its two halves viewed and joined by swiglu_split (geglu_erf_split for geglu; a
 *            plain activation otherwise); down = mul_mat_id(W2 [F, H, E], h, ids) [H, k, S];
 *            times the combine weights [1, k, S], then the k slices added;
 *   shared   mul_mat, the same activation, mul_mat; times sigmoid(mul_mat(gate, x)) when gated.
 * ids and the combine weights are moegen's (inputs of the graph), so the output can be checked
 * against moegen's y. llama.cpp has no capacity: a route moegen dropped (weight 0) is still
 * computed here, with weight 0.
 *
 * Weights are wrapped in place (ggml_backend_cpu_buffer_from_ptr, no copy), in ggml's own
 * type for the layer (GGML_TYPE_F32 or GGML_TYPE_BF16). Activations are fp32, as in llama.cpp.
 * Intermediate tensors are placed by ggml-alloc; only ggml_graph_compute is timed, with the
 * worker's thread count. Built only when bench/cpu.sh has built ggml (MOEGEN_HAVE_GGML).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bench.h"

#ifdef MOEGEN_HAVE_GGML

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#define MAX_WEIGHT_BUFFERS 8

struct ggml_moe {
    struct ggml_context *ctx;
    struct ggml_cgraph *graph;
    ggml_gallocr_t galloc;
    ggml_backend_buffer_t weights[MAX_WEIGHT_BUFFERS];
    int n_weights;
    struct ggml_cplan plan;
    uint8_t *work;
    struct ggml_tensor *y;
};

const char *ggml_moe_version(void) {
    static char text[64];
    if (strcmp(ggml_commit(), "unknown")) snprintf(text, sizeof text, "ggml %s (%s)", ggml_version(), ggml_commit());
    else snprintf(text, sizeof text, "ggml %s", ggml_version());
    return text;
}

/* A weight tensor over memory the worker owns (no copy). */
static struct ggml_tensor *wrap(ggml_moe *g, enum ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2,
                                const void *data) {
    struct ggml_tensor *t = ggml_new_tensor_3d(g->ctx, type, ne0, ne1, ne2);
    if (!t || g->n_weights == MAX_WEIGHT_BUFFERS) return NULL;
    ggml_backend_buffer_t buffer = ggml_backend_cpu_buffer_from_ptr((void *)data, ggml_nbytes(t));
    if (!buffer) return NULL;
    g->weights[g->n_weights++] = buffer;
    if (ggml_backend_tensor_alloc(buffer, t, (void *)data) != GGML_STATUS_SUCCESS) return NULL;
    return t;
}

/* The activation of the layer on `a` ([F1, ...]; gated: gate rows first, then up rows). */
static struct ggml_tensor *activation(struct ggml_context *ctx, const bench_moe *m, struct ggml_tensor *a, int64_t F) {
    if (m->act == MOEGEN_ACT_SWIGLU || m->act == MOEGEN_ACT_GEGLU) {
        struct ggml_tensor *gate = ggml_view_3d(ctx, a, F, a->ne[1], a->ne[2], a->nb[1], a->nb[2], 0);
        struct ggml_tensor *up = ggml_view_3d(ctx, a, F, a->ne[1], a->ne[2], a->nb[1], a->nb[2], F * a->nb[0]);
        return m->act == MOEGEN_ACT_SWIGLU ? ggml_swiglu_split(ctx, gate, up) : ggml_geglu_erf_split(ctx, gate, up);
    }
    switch (m->act) {
    case MOEGEN_ACT_RELU: return ggml_relu(ctx, a);
    case MOEGEN_ACT_GELU: return ggml_gelu_erf(ctx, a);
    case MOEGEN_ACT_GELU_TANH: return ggml_gelu(ctx, a);
    default: return ggml_silu(ctx, a);
    }
}

ggml_moe *ggml_moe_create(const bench_moe *m, char *why, size_t why_size) {
    ggml_moe *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(why, why_size, "out of memory");
        return NULL;
    }
    const int64_t S = m->S, H = m->H, E = m->E, k = m->k;
    const enum ggml_type wt = m->bf16 ? GGML_TYPE_BF16 : GGML_TYPE_F32;
    const size_t n_tensors = 64 + 4 * (size_t)k + 16 * (size_t)m->n_shared;
    struct ggml_init_params params = {
        .mem_size = ggml_tensor_overhead() * n_tensors + ggml_graph_overhead(), .mem_buffer = NULL, .no_alloc = true};
    if (!(g->ctx = ggml_init(params))) goto fail;
    struct ggml_context *ctx = g->ctx;

    struct ggml_tensor *wr = wrap(g, GGML_TYPE_F32, H, E, 1, m->router_w);
    struct ggml_tensor *w1 = wrap(g, wt, H, m->F1, E, m->w1), *w2 = wrap(g, wt, m->F, H, E, m->w2);
    if (!wr || !w1 || !w2) goto fail;
    wr = ggml_reshape_2d(ctx, wr, H, E);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, H, S);
    struct ggml_tensor *ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, S);
    struct ggml_tensor *cw = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, k, S);
    /* Inputs are written once and the graph computed many times: flagged as outputs too, so that
     * ggml-alloc never hands their memory to a later node (it frees an input after its last use,
     * as llama.cpp sets its inputs before every compute). */
    struct ggml_tensor *inputs[3] = {x, ids, cw};
    for (int i = 0; i < 3; i++) {
        ggml_set_input(inputs[i]);
        ggml_set_output(inputs[i]);
    }
    g->graph = ggml_new_graph(ctx);

    /* router: computed like llama.cpp's, its choice left unused */
    struct ggml_tensor *probs = ggml_soft_max(ctx, ggml_mul_mat(ctx, wr, x));
    struct ggml_tensor *top = ggml_argsort_top_k(ctx, probs, (int)k);
    struct ggml_tensor *rw = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, E, S), top);
    if (m->norm_topk_prob) {
        rw = ggml_reshape_2d(ctx, rw, k, S);
        rw = ggml_div(ctx, rw, ggml_sum_rows(ctx, rw));
    }
    ggml_build_forward_expand(g->graph, rw);

    /* routed experts */
    struct ggml_tensor *xr = ggml_reshape_3d(ctx, x, H, 1, S);
    struct ggml_tensor *h = activation(ctx, m, ggml_mul_mat_id(ctx, w1, xr, ids), m->F);
    struct ggml_tensor *down = ggml_mul(ctx, ggml_mul_mat_id(ctx, w2, h, ids), cw); /* [H, k, S] */
    struct ggml_tensor *y = NULL;
    for (int64_t j = 0; j < k; j++) {
        struct ggml_tensor *slot = ggml_view_2d(ctx, down, H, S, down->nb[2], (size_t)j * down->nb[1]);
        y = y ? ggml_add(ctx, y, slot) : slot;
    }
    if (k == 1) y = ggml_cont(ctx, y);

    /* shared experts */
    const size_t es = m->bf16 ? 2 : 4;
    for (int i = 0; i < m->n_shared; i++) {
        struct ggml_tensor *s1 = wrap(g, wt, H, m->F1s, 1, (const char *)m->shared_w1 + (size_t)i * m->F1s * H * es);
        struct ggml_tensor *s2 = wrap(g, wt, m->Fs, H, 1, (const char *)m->shared_w2 + (size_t)i * H * m->Fs * es);
        if (!s1 || !s2) goto fail;
        struct ggml_tensor *sh = activation(ctx, m, ggml_mul_mat(ctx, ggml_reshape_2d(ctx, s1, H, m->F1s), x), m->Fs);
        struct ggml_tensor *so = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, s2, m->Fs, H), sh);
        if (m->shared_gate) {
            struct ggml_tensor *gw = wrap(g, GGML_TYPE_F32, H, 1, 1, m->shared_gate);
            if (!gw) goto fail;
            so = ggml_mul(ctx, so, ggml_sigmoid(ctx, ggml_mul_mat(ctx, ggml_reshape_2d(ctx, gw, H, 1), x)));
        }
        y = ggml_add(ctx, y, so);
    }
    ggml_set_output(y);
    ggml_build_forward_expand(g->graph, y);
    g->y = y;

    g->galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
    if (!g->galloc || !ggml_gallocr_alloc_graph(g->galloc, g->graph)) {
        snprintf(why, why_size, "ggml-alloc could not place the graph's tensors (out of memory?)");
        ggml_moe_free(g);
        return NULL;
    }
    /* inputs: x in fp32, moegen's routing */
    float *xd = x->data;
    if (m->bf16)
        for (int64_t i = 0; i < S * H; i++) xd[i] = bench_bf16_to_float(((const uint16_t *)m->x)[i]);
    else memcpy(xd, m->x, (size_t)(S * H) * sizeof(float));
    memcpy(ids->data, m->ids, (size_t)(S * k) * sizeof(int32_t));
    memcpy(cw->data, m->weights, (size_t)(S * k) * sizeof(float));

    g->plan = ggml_graph_plan(g->graph, m->n_threads, NULL);
    if (g->plan.work_size) {
        if (!(g->work = malloc(g->plan.work_size))) goto fail;
        g->plan.work_data = g->work;
    }
    return g;
fail:
    snprintf(why, why_size, "could not build the ggml graph (out of memory?)");
    ggml_moe_free(g);
    return NULL;
}

int ggml_moe_run(ggml_moe *g) { return ggml_graph_compute(g->graph, &g->plan) == GGML_STATUS_SUCCESS ? 0 : -1; }

const float *ggml_moe_output(const ggml_moe *g) { return g->y->data; }

void ggml_moe_free(ggml_moe *g) {
    if (!g) return;
    if (g->galloc) ggml_gallocr_free(g->galloc);
    for (int i = 0; i < g->n_weights; i++) ggml_backend_buffer_free(g->weights[i]);
    if (g->ctx) ggml_free(g->ctx);
    free(g->work);
    free(g);
}

#else /* ggml was not built: the anchor reports why */

const char *ggml_moe_version(void) { return "not built (bench/cpu.sh builds ggml and configures with it)"; }

ggml_moe *ggml_moe_create(const bench_moe *m, char *why, size_t why_size) {
    (void)m;
    snprintf(why, why_size, "ggml not built into this worker (bench/cpu.sh builds it)");
    return NULL;
}

int ggml_moe_run(ggml_moe *g) {
    (void)g;
    return -1;
}

const float *ggml_moe_output(const ggml_moe *g) {
    (void)g;
    return NULL;
}

void ggml_moe_free(ggml_moe *g) { (void)g; }

#endif
