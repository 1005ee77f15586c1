/* verify_backward.c — the kernel's gradients against the reference backward (see the
 * header for the rules). */
#include "verify_backward.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"
#include "verify.h"

static void fail(moe_backward_report *r, const char *fmt, ...) {
    if (!r->ok) return; /* keep the first failure */
    r->ok = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->message, sizeof r->message, fmt, ap);
    va_end(ap);
}

static double stored_value(moegen_dtype dtype, const void *data, size_t i) {
    switch (dtype) {
    case MOEGEN_DTYPE_FP16: return moe_ref_half_to_double(((const uint16_t *)data)[i]);
    case MOEGEN_DTYPE_BF16: return moe_ref_bf16_to_double(((const uint16_t *)data)[i]);
    default: return ((const float *)data)[i];
    }
}

/* One tensor: n values of the kernel (fp32, or the layer dtype when `stored`) against ref.
 * scale (or NULL): per element, the reference's sum over |terms| where the gradient is a
 * difference of dot products; the absolute tolerance is at least atol_rel times it there. */
static void compare_scaled(moe_backward_report *r, const char *name, const moegen_spec *spec, const void *got,
                           int stored, const double *want, const double *scale, size_t n) {
    if (!got || !want || n == 0) return;
    double rtol, atol_rel;
    moe_verify_tolerance(spec->dtype, &rtol, &atol_rel);
    double max_ref = 0.0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(want[i]) && fabs(want[i]) > max_ref) max_ref = fabs(want[i]);
    double atol = atol_rel * max_ref;
    /* never below one step of what the kernel stores near zero */
    const double quantum = stored && spec->dtype == MOEGEN_DTYPE_FP16 ? 0x1p-24
                           : stored && spec->dtype == MOEGEN_DTYPE_BF16 ? 0x1p-126
                                                                        : 0x1p-126;
    if (atol < quantum) atol = quantum;
    /* half a step above the stored type's largest value: rounding overflows to Inf there */
    const double overflow = stored && spec->dtype == MOEGEN_DTYPE_FP16   ? 65520.0
                            : stored && spec->dtype == MOEGEN_DTYPE_BF16 ? 0x1.ffp127
                                                                         : 0x1.ffffffp127;
    r->n_tensors++;
    for (size_t i = 0; i < n; i++) {
        const double g = stored ? stored_value(spec->dtype, got, i) : ((const float *)got)[i];
        const double w = want[i];
        if (!isfinite(w)) {
            if (!(isnan(w) ? isnan(g) : g == w))
                fail(r, "%s[%zu]: kernel %.9g, reference %.9g (not finite: must match)", name, i, g, w);
            continue;
        }
        if (isinf(g) && (g > 0) == (w > 0) && fabs(w) * (1.0 + rtol) >= overflow)
            continue; /* at or past the largest value of the stored type: it rounds to Inf */
        const double atol_i = scale && atol_rel * scale[i] > atol ? atol_rel * scale[i] : atol;
        const double scaled = fabs(g - w) / (atol_i + rtol * fabs(w));
        if (!(scaled <= 1.0)) {
            fail(r, "%s[%zu]: kernel %.9g, reference %.9g (tolerance %.3g + %.3g*|ref|, max |ref| %.3g)", name, i, g,
                 w, atol_i, rtol, max_ref);
            if (!isfinite(scaled)) continue;
        }
        if (scaled > r->max_scaled_error) {
            r->max_scaled_error = scaled;
            snprintf(r->worst, sizeof r->worst, "%s", name);
        }
    }
}

static void compare(moe_backward_report *r, const char *name, const moegen_spec *spec, const void *got, int stored,
                    const double *want, size_t n) {
    compare_scaled(r, name, spec, got, stored, want, NULL, n);
}

int moe_verify_backward(const moegen_spec *spec, const moe_backward_case *c, const void *dx,
                        const moegen_grads *g, moe_backward_report *report) {
    memset(report, 0, sizeof *report);
    report->ok = 1;
    const int64_t S = c->n_tokens;
    const int k = spec->top_k, E = spec->num_experts;
    const size_t routes = (size_t)S * (size_t)k;
    uint8_t *kept = routes ? malloc(routes) : NULL;
    if (routes && !kept) {
        snprintf(report->message, sizeof report->message, "verify_backward: out of memory");
        return -1;
    }
    for (size_t i = 0; i < routes; i++) kept[i] = c->topk_weights[i] != 0.0f;
    moe_ref_options opt = {.forced_ids = S ? c->ids : NULL,
                           .forced_router_weights = S ? c->router_weights : NULL,
                           .used_token = c->used_token,
                           .forced_kept = kept,
                           .rng_offset = c->rng_offset};
    moe_ref_grads ref;
    memset(&ref, 0, sizeof ref);
    char why[256] = "";
    if (moe_ref_backward(spec, S, c->x, c->w, &opt, c->dy, c->aux_coeff, c->z_coeff, &ref, why) != 0) {
        free(kept);
        report->ok = 0;
        snprintf(report->message, sizeof report->message, "reference backward failed: %s", why);
        return -1;
    }
    const size_t H = (size_t)spec->hidden_size, F = (size_t)spec->moe_intermediate_size;
    const size_t F1 = (size_t)moegen_spec_ffn_rows(spec);
    const size_t Ns = (size_t)spec->shared.count, Fs = (size_t)spec->shared.intermediate_size;
    const size_t F1s = moegen_activation_is_gated(spec->activation) ? 2 * Fs : Fs;
    compare(report, "dx", spec, dx, 1, ref.dx, (size_t)S * H);
    compare(report, "router_w", spec, g->router_w, 0, ref.router_w, (size_t)E * H);
    compare(report, "router_b", spec, g->router_b, 0, ref.router_b, (size_t)E);
    compare(report, "w1", spec, g->w1, 0, ref.w1, (size_t)E * F1 * H);
    compare(report, "b1", spec, g->b1, 0, ref.b1, (size_t)E * F1);
    compare(report, "w2", spec, g->w2, 0, ref.w2, (size_t)E * H * F);
    compare(report, "b2", spec, g->b2, 0, ref.b2, (size_t)E * H);
    compare(report, "shared_w1", spec, g->shared_w1, 0, ref.shared_w1, Ns * F1s * H);
    compare(report, "shared_b1", spec, g->shared_b1, 0, ref.shared_b1, Ns * F1s);
    compare(report, "shared_w2", spec, g->shared_w2, 0, ref.shared_w2, Ns * H * Fs);
    compare(report, "shared_b2", spec, g->shared_b2, 0, ref.shared_b2, Ns * H);
    compare_scaled(report, "shared_gate", spec, g->shared_gate, 0, ref.shared_gate, ref.shared_gate_scale, H);
    compare(report, "residual_w1", spec, g->residual_w1, 0, ref.residual_w1, F1 * H);
    compare(report, "residual_b1", spec, g->residual_b1, 0, ref.residual_b1, F1);
    compare(report, "residual_w2", spec, g->residual_w2, 0, ref.residual_w2, H * F);
    compare(report, "residual_b2", spec, g->residual_b2, 0, ref.residual_b2, H);
    compare_scaled(report, "residual_coef_w", spec, g->residual_coef_w, 0, ref.residual_coef_w,
                   ref.residual_coef_w_scale, 2 * H);
    compare_scaled(report, "residual_coef_b", spec, g->residual_coef_b, 0, ref.residual_coef_b,
                   ref.residual_coef_b_scale, 2);
    moe_ref_grads_free(&ref);
    free(kept);
    if (report->ok)
        snprintf(report->message, sizeof report->message, "ok: %d gradient tensors, max %.2f of tolerance (%s)",
                 report->n_tensors, report->max_scaled_error, report->worst[0] ? report->worst : "-");
    return 0;
}
