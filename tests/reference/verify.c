/* verify.c — kernel outputs against the independent reference (see verify.h). */
#include "verify.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moe_verify_tolerance(moegen_dtype dtype, double *rtol, double *atol_rel) {
    switch (dtype) {
    case MOEGEN_DTYPE_FP32: *rtol = 1e-4; *atol_rel = 1e-5; break;
    case MOEGEN_DTYPE_FP16: *rtol = 1e-2; *atol_rel = 2e-3; break;
    default: *rtol = 4e-2; *atol_rel = 1e-2; break;
    }
}

static double stored_to_double(moegen_dtype dtype, const void *base, int64_t i) {
    if (dtype == MOEGEN_DTYPE_FP32) return ((const float *)base)[i];
    uint16_t bits = ((const uint16_t *)base)[i];
    return dtype == MOEGEN_DTYPE_FP16 ? moe_ref_half_to_double(bits) : moe_ref_bf16_to_double(bits);
}

static int fail(moe_verify_report *rep, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(moe_verify_report *rep, const char *fmt, ...) {
    if (rep->ok) { /* keep the first failure */
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(rep->message, sizeof rep->message, fmt, ap);
        va_end(ap);
    }
    rep->ok = 0;
    return 0;
}

static int close_enough(double got, double want, double rtol, double atol) {
    if (isnan(got) || isnan(want)) return 0;
    return fabs(got - want) <= atol + rtol * fabs(want);
}

/* Routing: returns the number of ambiguous tokens that differ, or -1 after a failure. */
static int64_t compare_routing(const moegen_spec *spec, int64_t S, const moe_ref_result *ref,
                               const moe_kernel_result *k, moe_verify_report *rep) {
    const int K = spec->top_k;
    int64_t ambiguous = 0;
    for (int64_t t = 0; t < S; t++) {
        int differs = 0;
        for (int j = 0; j < K; j++) differs |= k->ids[t * K + j] != ref->ids[t * K + j];
        if (!differs) continue;
        double margin = ref->margin[t];
        if (margin > 0.0 && margin < MOE_VERIFY_AMBIGUOUS_MARGIN) {
            ambiguous++;
            continue;
        }
        /* The token's smallest gap may be an exact tie that both broke alike while the picks
         * that differ were a near-tie: then every differing slot must hold an expert whose key
         * is within the margin of the reference's pick, and not equal to it (an exact tie
         * has one answer, the lower index). */
        const double *key = ref->selection + t * spec->num_experts;
        int near_tie = 1;
        for (int j = 0; j < K && near_tie; j++) {
            const int32_t got_id = k->ids[t * K + j], want_id = ref->ids[t * K + j];
            if (got_id == want_id) continue;
            const double gap = got_id >= 0 && got_id < spec->num_experts ? fabs(key[want_id] - key[got_id]) : INFINITY;
            near_tie = isfinite(key[want_id]) && gap > 0.0 && gap < MOE_VERIFY_AMBIGUOUS_MARGIN;
        }
        if (near_tie) {
            ambiguous++;
            continue;
        }
        int first = 0; /* the first slot that differs, and up to 8 slots from there */
        while (k->ids[t * K + first] == ref->ids[t * K + first]) first++;
        char got[128] = "", want[128] = "";
        for (int j = first; j < K && j < first + 8; j++) {
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%d", j > first ? "," : "", k->ids[t * K + j]);
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%d", j > first ? "," : "",
                     ref->ids[t * K + j]);
        }
        fail(rep, "routing differs at token %lld from slot %d: kernel chose [%s%s], reference [%s%s] (margin %.3g)",
             (long long)t, first, got, first + 8 < K ? ",..." : "", want, first + 8 < K ? ",..." : "", margin);
        return -1;
    }
    return ambiguous;
}

/* Everything after routing: weights, counts, capacity, losses, y. */
static void compare_outputs(const moegen_spec *spec, int64_t S, const moe_ref_result *ref,
                            const moe_kernel_result *k, const uint8_t *mask, int compare_losses,
                            moe_verify_report *rep) {
    const int K = spec->top_k, E = spec->num_experts;
    const int64_t H = spec->hidden_size;
    for (int64_t i = 0; i < S * K; i++) {
        if (!close_enough(k->router_weights[i], ref->router_weights[i], 1e-4, 1e-6))
            fail(rep, "router weight of token %lld slot %d: kernel %.9g, reference %.9g",
                 (long long)(i / K), (int)(i % K), k->router_weights[i], ref->router_weights[i]);
        if (!close_enough(k->topk_weights[i], ref->weights[i], 1e-4, 1e-6))
            fail(rep, "combine weight of token %lld slot %d: kernel %.9g, reference %.9g",
                 (long long)(i / K), (int)(i % K), k->topk_weights[i], ref->weights[i]);
    }
    for (int e = 0; e < E; e++) {
        if (k->counts_before[e] != ref->counts_before[e])
            fail(rep, "expert %d count before capacity: kernel %lld, reference %lld", e,
                 (long long)k->counts_before[e], (long long)ref->counts_before[e]);
        if (k->counts_after[e] != ref->counts_after[e])
            fail(rep, "expert %d count after capacity: kernel %lld, reference %lld", e,
                 (long long)k->counts_after[e], (long long)ref->counts_after[e]);
    }
    if (k->n_dropped != ref->n_dropped)
        fail(rep, "dropped routes: kernel %lld, reference %lld", (long long)k->n_dropped,
             (long long)ref->n_dropped);
    if (k->capacity != ref->capacity)
        fail(rep, "capacity: kernel %lld, reference %lld", (long long)k->capacity,
             (long long)ref->capacity);
    if (compare_losses) {
        if (!close_enough(k->aux_loss, ref->aux_loss, 1e-4, 1e-6))
            fail(rep, "aux loss: kernel %.9g, reference %.9g", k->aux_loss, ref->aux_loss);
        if (!close_enough(k->z_loss, ref->z_loss, 1e-4, 1e-6))
            fail(rep, "z loss: kernel %.9g, reference %.9g", k->z_loss, ref->z_loss);
    }

    double rtol, atol_rel;
    moe_verify_tolerance(spec->dtype, &rtol, &atol_rel);
    double max_ref = 0.0;
    for (int64_t t = 0; t < S; t++) {
        if (mask && !mask[t]) continue;
        for (int64_t h = 0; h < H; h++) {
            double r = fabs(ref->y[t * H + h]);
            if (r > max_ref) max_ref = r;
        }
    }
    double atol = atol_rel * (max_ref > 0.0 ? max_ref : 1.0);
    /* y is stored in the layer dtype: below its smallest subnormal no kernel can do better
     * than one step of it (an fp16 layer scaled by 1e-3 has outputs of a few such steps);
     * bf16 kernels may flush subnormal fp32 results (vdpbf16ps), so for bf16 the step is
     * the smallest normal float (docs/numerics.md §6). */
    const double quantum = spec->dtype == MOEGEN_DTYPE_FP16 ? ldexp(1.0, -24)
                         : spec->dtype == MOEGEN_DTYPE_BF16 ? ldexp(1.0, -126) : ldexp(1.0, -149);
    if (atol < quantum) atol = quantum;
    rep->rtol = rtol;
    rep->atol = atol;
    /* where rounding to the layer dtype overflows to Inf: half a step above its largest value */
    const double overflow = spec->dtype == MOEGEN_DTYPE_FP16   ? 65520.0
                            : spec->dtype == MOEGEN_DTYPE_BF16 ? 0x1.ffp127
                                                               : 0x1.ffffffp127;
    for (int64_t t = 0; t < S; t++) {
        if (mask && !mask[t]) continue;
        rep->tokens_compared++;
        for (int64_t h = 0; h < H; h++) {
            double got = stored_to_double(spec->dtype, k->y, t * H + h);
            double want = ref->y[t * H + h];
            if (!isfinite(want)) { /* a NaN input row through a dense path: the same NaN / Inf */
                if (isnan(want) ? !isnan(got) : got != want)
                    fail(rep, "y[%lld][%lld]: kernel %.9g, reference %.9g (a non-finite reference must be "
                              "matched exactly)", (long long)t, (long long)h, got, want);
                continue;
            }
            if (isinf(got) && (got > 0) == (want > 0) && fabs(want) * (1.0 + rtol) >= overflow)
                continue; /* the reference is at or past the dtype's largest value: y rounds to Inf */
            double error = fabs(got - want);
            double scaled = error / (atol + rtol * fabs(want));
            if (isnan(got) || isnan(scaled)) scaled = INFINITY;
            if (error > rep->max_abs_error || isnan(error)) rep->max_abs_error = error;
            if (scaled > rep->max_scaled_error) rep->max_scaled_error = scaled;
            if (scaled > 1.0)
                fail(rep, "y[%lld][%lld]: kernel %.9g, reference %.9g (tolerance %.3g + %.3g*|ref|)",
                     (long long)t, (long long)h, got, want, atol, rtol);
        }
    }
}

int moe_verify(const moegen_spec *spec, int64_t n_tokens, const void *x,
               const moegen_kernel_weights *w, uint64_t rng_offset, const uint8_t *token_mask,
               const moe_kernel_result *kernel, moe_verify_report *report) {
    memset(report, 0, sizeof *report);
    report->ok = 1;
    char why[256] = "";
    moe_ref_options options = {.token_mask = token_mask, .rng_offset = rng_offset};
    moe_ref_result ref;
    if (moe_ref_forward(spec, n_tokens, x, w, &options, &ref, why) != 0) {
        snprintf(report->message, sizeof report->message, "reference failed: %s", why);
        report->ok = 0;
        return -1;
    }
    int64_t ambiguous = compare_routing(spec, n_tokens, &ref, kernel, report);
    if (ambiguous < 0) {
        moe_ref_result_free(&ref);
        return 0;
    }
    report->ambiguous_tokens = ambiguous;
    /* A capacity decision between two weights closer than fp32 can tell apart: the kept
     * set may differ; check what follows on the kernel's own routing and weights. */
    report->ambiguous_capacity = ref.capacity_margin > 0.0 && ref.capacity_margin < MOE_VERIFY_AMBIGUOUS_MARGIN;
    if (ambiguous == 0 && !report->ambiguous_capacity) {
        compare_outputs(spec, n_tokens, &ref, kernel, token_mask, 1, report);
    } else {
        /* Losses come from the reference's own logits either way: compare them here. */
        if (!close_enough(kernel->aux_loss, ref.aux_loss, 1e-3, 1e-6))
            fail(report, "aux loss: kernel %.9g, reference %.9g", kernel->aux_loss, ref.aux_loss);
        if (!close_enough(kernel->z_loss, ref.z_loss, 1e-4, 1e-6))
            fail(report, "z loss: kernel %.9g, reference %.9g", kernel->z_loss, ref.z_loss);
        /* Router weights of the tokens routed alike come from the reference's own run. */
        const int K = spec->top_k;
        for (int64_t t = 0; t < n_tokens; t++) {
            int same = 1;
            for (int j = 0; j < K; j++) same &= kernel->ids[t * K + j] == ref.ids[t * K + j];
            for (int j = 0; same && j < K; j++)
                if (!close_enough(kernel->router_weights[t * K + j], ref.router_weights[t * K + j], 1e-4, 1e-6))
                    fail(report, "router weight of token %lld slot %d: kernel %.9g, reference %.9g",
                         (long long)t, j, kernel->router_weights[t * K + j], ref.router_weights[t * K + j]);
        }
        moe_ref_result forced;
        moe_ref_options forced_options = options;
        forced_options.forced_ids = kernel->ids;
        forced_options.forced_router_weights = kernel->router_weights;
        report->used_forced_routing = 1;
        if (moe_ref_forward(spec, n_tokens, x, w, &forced_options, &forced, why) != 0) {
            snprintf(report->message, sizeof report->message, "reference (forced routing) failed: %s", why);
            report->ok = 0;
            moe_ref_result_free(&ref);
            return -1;
        }
        compare_outputs(spec, n_tokens, &forced, kernel, token_mask, 0, report);
        moe_ref_result_free(&forced);
    }
    moe_ref_result_free(&ref);
    if (report->ok)
        snprintf(report->message, sizeof report->message,
                 "ok: %lld tokens compared, max |err| %.3g (%.2f of tolerance), %lld near-tie tokens%s",
                 (long long)report->tokens_compared, report->max_abs_error, report->max_scaled_error,
                 (long long)report->ambiguous_tokens,
                 report->ambiguous_capacity ? ", a capacity near-tie (checked on the kernel's weights)" : "");
    return 0;
}
