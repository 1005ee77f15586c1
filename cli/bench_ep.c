/* bench_ep.c — `moegen bench` for a spec with ep_size > 1, under mpirun: every rank times
 * the layer on its own tokens; rank 0 prints, per token count and rank, the median time,
 * the bytes sent and received, the time in route / dispatch / experts / combine, and two
 * ratios measured in the same run:
 *   - exchange / compute: (dispatch) / (route + experts + combine), the cost of expert
 *     parallelism next to the layer's own work;
 *   - exchange / bare:    (dispatch) / a bare all-to-all-v moving the same bytes between
 *     the same ranks (the rows out in the layer dtype and back in fp32, split evenly
 *     over the other ranks), so the layer's own overhead around the transport shows.
 * "dispatch" is the counts exchange plus both row exchanges (ep.h, steps 2, 3 and 5).
 * Output as `moegen bench` (moegen_cli_bench_output, cli.h): the table on stdout, or with
 * --json one JSON object per token count and rank on stdout and the table on stderr; the
 * notices on stderr; --plot: time per call and tokens/s of every rank against the tokens
 * per rank.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_ep.h"
#include "cli.h"
#include "comm.h"
#include "forward_io.h"
#include "plot_svg.h"
#include "ranks.h"
#include "tensors.h"


typedef struct ep_row {
    long long tokens;
    double median_ms, route_ms, dispatch_ms, experts_ms, combine_ms, bare_ms;
    unsigned long long sent, received;
} ep_row;

/* A bare exchange like the layer's: `out_bytes` out and `back_bytes` back from this rank,
 * split evenly over the other ranks (whose amounts it learns first), `repeat` times: the
 * median in ms, or -1 when it failed. */
static double bare_exchange_ms(moegen_comm *comm, uint64_t out_bytes, uint64_t back_bytes, long long repeat,
                               double *times) {
    const int P = comm->size;
    int64_t *plan = calloc((size_t)P * 8, sizeof *plan); /* send, recv, send_at, recv_at for both ways */
    if (!plan) return -1.0;
    int64_t *send[2], *recv[2], *send_at[2], *recv_at[2];
    for (int d = 0; d < 2; d++) {
        send[d] = plan + (size_t)P * (4 * d);
        recv[d] = send[d] + P;
        send_at[d] = recv[d] + P;
        recv_at[d] = send_at[d] + P;
    }
    char *buffers[2][2] = {{NULL, NULL}, {NULL, NULL}};
    double result = -1.0;
    for (int d = 0; d < 2; d++) {
        const int64_t share = (int64_t)((d == 0 ? out_bytes : back_bytes) / (uint64_t)(P - 1));
        for (int q = 0; q < P; q++) send[d][q] = q == comm->rank ? 0 : share;
        if (moegen_comm_alltoall(comm, send[d], recv[d], sizeof(int64_t), NULL) != MOEGEN_OK) goto done;
        int64_t sent = 0, received = 0;
        for (int q = 0; q < P; q++) {
            send_at[d][q] = sent;
            recv_at[d][q] = received;
            sent += send[d][q];
            received += recv[d][q];
        }
        buffers[d][0] = calloc((size_t)sent + 1, 1);
        buffers[d][1] = calloc((size_t)received + 1, 1);
    }
    if (buffers[0][0] && buffers[0][1] && buffers[1][0] && buffers[1][1]) {
        for (long long i = -1; i < repeat; i++) {
            double start = moegen_cli_now_ms();
            for (int d = 0; d < 2; d++)
                if (moegen_comm_alltoallv(comm, buffers[d][0], send[d], send_at[d], buffers[d][1], recv[d], recv_at[d],
                                          1, NULL) != MOEGEN_OK)
                    goto done;
            if (i >= 0) times[i] = moegen_cli_now_ms() - start;
        }
        result = moegen_cli_median(times, repeat);
    }
done:
    for (int d = 0; d < 2; d++) {
        free(buffers[d][0]);
        free(buffers[d][1]);
    }
    free(plan);
    return result;
}

/* --plot FILE: the median time and tokens/s of every rank (all_rows: [n_counts][P]). */
static int write_ep_plot(const char *path, const moegen_spec *spec, const moegen_layer_desc *desc, int P,
                         long long repeat, const ep_row *all_rows, int n_counts) {
    const size_t points = (size_t)n_counts * P;
    double *values = calloc(points * 3 + 1, sizeof *values); /* tokens, ms, tokens/s by rank */
    cli_plot_series *series = calloc((size_t)P * 2, sizeof *series);
    char *labels = calloc((size_t)P, 16);
    int rc = 0;
    if (!values || !series || !labels) {
        rc = moegen_cli_error("bench: --plot: out of memory");
        goto done;
    }
    for (int r = 0; r < P; r++) {
        double *x = values + (size_t)r * n_counts, *ms = x + points, *rate = ms + points;
        for (int c = 0; c < n_counts; c++) {
            const ep_row *row = &all_rows[(size_t)c * P + r];
            x[c] = (double)row->tokens;
            ms[c] = row->median_ms;
            rate[c] = row->tokens / (row->median_ms / 1e3);
        }
        snprintf(labels + 16 * r, 16, "rank %d", r);
        series[r] = (cli_plot_series){labels + 16 * r, x, ms, n_counts, 0};
        series[P + r] = (cli_plot_series){labels + 16 * r, x, rate, n_counts, 0};
    }
    const cli_plot_panel panels[2] = {{"time per call (ms)", 1, series, P}, {"throughput (tokens/s)", 1, series + P, P}};
    char title[512], subtitle[512];
    snprintf(title, sizeof title, "moegen bench: %s (%s) on %d CPU ranks", spec->name, moegen_dtype_name(spec->dtype),
             P);
    snprintf(subtitle, sizeof subtitle, "median of %lld calls after a warm-up; threads per rank: %d; no floor on the CPU",
             repeat, desc->n_threads);
    const cli_plot_line_chart chart = {.title = title, .subtitle = subtitle, .x_label = "tokens per rank per call",
                                       .log_x = 1, .panels = panels, .n_panels = 2};
    char *svg = cli_plot_line_svg(&chart), why[512];
    if (!svg) rc = moegen_cli_error("bench: --plot: out of memory");
    else if (cli_plot_write(path, svg, why, sizeof why) != 0) rc = moegen_cli_error("bench: --plot: %s", why);
    else fprintf(stderr, "plot written to %s\n", path);
    free(svg);
done:
    free(values);
    free(series);
    free(labels);
    return rc;
}

int moegen_cli_bench_ep(const moegen_spec *spec, const char *spec_path, const long long *counts,
                               int n_counts, long long repeat, long long seed, int threads, const char *cache_dir,
                               const char *variant, const moegen_cli_bench_output *output) {
    FILE *table = output->json ? stderr : stdout; /* stdout: the table, or the JSON lines alone */
    cli_ranks ranks;
    if (cli_ranks_start(&ranks, spec->ep_size)) return 1;
    long long max_tokens = 0;
    for (int c = 0; c < n_counts; c++) max_tokens = counts[c] > max_tokens ? counts[c] : max_tokens;
    int rc = 1;
    moegen_layer *layer = NULL;
    moe_tensors ts, own;
    memset(&ts, 0, sizeof ts);
    memset(&own, 0, sizeof own);
    double *times = calloc((size_t)repeat, sizeof *times);
    double *stage[5] = {NULL};
    for (int i = 0; i < 5; i++) stage[i] = calloc((size_t)repeat, sizeof(double));
    /* rank 0: every rank's row of every token count, [n_counts][P] */
    ep_row *all_rows = ranks.rank == 0 ? calloc((size_t)n_counts * ranks.size, sizeof *all_rows) : NULL;
    void *y = calloc((size_t)max_tokens * spec->hidden_size + 1, moegen_dtype_size(spec->dtype));
    moegen_error err;
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CPU;
    options.cache_dir = cache_dir;
    options.variant = variant;
    options.n_threads = threads;
    options.comm = ranks.comm;
    if (!times || !stage[4] || !y || (ranks.rank == 0 && !all_rows)) goto done;
    if (moegen_layer_open_file(spec_path, &options, &layer, &err) != MOEGEN_OK) {
        moegen_cli_error("rank %d: %s", ranks.rank, err.message);
        goto done;
    }
    moegen_layer_desc desc;
    moegen_layer_describe(layer, &desc);
    if (moe_tensors_alloc(spec, max_tokens, &ts) != 0 || moe_tensors_alloc(spec, max_tokens, &own) != 0) goto done;
    moe_tensors_fill(&ts, (uint64_t)seed);                            /* the same weights everywhere */
    moe_tensors_fill(&own, (uint64_t)seed + 7919u * (uint64_t)ranks.rank); /* tokens of this rank */
    if (max_tokens > 0)
        memcpy(ts.t[MOE_T_X].data, own.t[MOE_T_X].data, ts.t[MOE_T_X].n_elems * moe_tensor_elem_bytes(&ts, MOE_T_X));
    moegen_weights w;
    moe_tensors_bind_weights(spec, &ts, desc.first_expert, &w);
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) {
        moegen_cli_error("rank %d: %s", ranks.rank, err.message);
        goto done;
    }
    char name_json[160], transport_json[160], variant_json[320], kernels_json[240];
    moegen_cli_json_text(spec->name, name_json, sizeof name_json);
    moegen_cli_json_text(ranks.comm->transport, transport_json, sizeof transport_json);
    moegen_cli_json_text(desc.variant, variant_json, sizeof variant_json);
    moegen_cli_json_text(desc.kernel_path, kernels_json, sizeof kernels_json);
    if (ranks.rank == 0) {
        fprintf(stderr, "moegen bench: %s on %d CPU ranks (%s), variant %s, kernels %s, %d threads per rank "
                "(module %s in %.0f ms)\n", spec->name, ranks.size, ranks.comm->transport, desc.variant,
                desc.kernel_path, desc.n_threads, desc.cache_hit ? "loaded from the cache" : "compiled",
                desc.compile_ms);
        fprintf(table, "| tokens/rank | rank | median | route | dispatch | experts | combine | sent | received | "
                "exchange/compute | bare all-to-all-v | exchange/bare |\n");
        fprintf(table, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    }
    for (int c = 0; c < n_counts; c++) {
        const int64_t S = counts[c];
        moegen_forward_io io = {.n_tokens = S, .x = ts.t[MOE_T_X].data, .y = y};
        moegen_forward_stats stats;
        for (long long i = -1; i < repeat; i++) {
            double start = moegen_cli_now_ms();
            if (moegen_layer_forward(layer, &io, &stats, &err) != MOEGEN_OK) {
                moegen_cli_error("rank %d: %s", ranks.rank, err.message);
                goto done;
            }
            if (i < 0) continue;
            times[i] = moegen_cli_now_ms() - start;
            stage[0][i] = stats.route_ms;
            stage[1][i] = stats.dispatch_ms;
            stage[2][i] = stats.experts_ms;
            stage[3][i] = stats.combine_ms;
        }
        const uint64_t row_out = (uint64_t)spec->hidden_size * moegen_dtype_size(spec->dtype),
                       row_back = (uint64_t)spec->hidden_size * sizeof(float);
        ep_row mine = {S, moegen_cli_median(times, repeat), moegen_cli_median(stage[0], repeat), moegen_cli_median(stage[1], repeat),
                       moegen_cli_median(stage[2], repeat), moegen_cli_median(stage[3], repeat), 0.0, stats.bytes_sent,
                       stats.bytes_received};
        /* the same bytes: this rank's rows out in the layer dtype, the rows it received back in fp32 */
        mine.bare_ms = bare_exchange_ms(ranks.comm, (uint64_t)stats.rows_sent * row_out,
                                        (uint64_t)stats.rows_received * row_back, repeat, stage[4]);
        ep_row *rows = all_rows ? all_rows + (size_t)c * ranks.size : NULL;
        if (cli_ranks_gather(&ranks, &mine, rows, sizeof mine) != 0) goto done;
        for (int r = 0; rows && r < ranks.size; r++) {
            const ep_row *x = &rows[r];
            const double compute = x->route_ms + x->experts_ms + x->combine_ms;
            const double per_compute = compute > 0 ? x->dispatch_ms / compute : 0.0;
            const double per_bare = x->bare_ms > 0 ? x->dispatch_ms / x->bare_ms : 0.0;
            fprintf(table, "| %lld | %d | %.3f ms | %.3f | %.3f | %.3f | %.3f | %llu B | %llu B | %.2f | %.3f ms | %.2f |\n",
                    x->tokens, r, x->median_ms, x->route_ms, x->dispatch_ms, x->experts_ms, x->combine_ms, x->sent,
                    x->received, per_compute, x->bare_ms, per_bare);
            if (output->json)
                printf("{\"spec\": %s, \"dtype\": \"%s\", \"device\": \"cpu\", \"ranks\": %d, \"transport\": %s, "
                       "\"variant\": %s, \"kernels\": %s, \"threads\": %d, \"tokens\": %lld, \"rank\": %d, "
                       "\"median_ms\": %.6f, \"tokens_per_s\": %.6g, \"route_ms\": %.6f, \"dispatch_ms\": %.6f, "
                       "\"experts_ms\": %.6f, \"combine_ms\": %.6f, \"bytes_sent\": %llu, \"bytes_received\": %llu, "
                       "\"exchange_per_compute\": %.4f, \"bare_alltoallv_ms\": %.6f, \"exchange_per_bare\": %.4f, "
                       "\"compile_ms\": %.3f, \"cache_hit\": %d}\n",
                       name_json, moegen_dtype_name(spec->dtype), ranks.size, transport_json, variant_json,
                       kernels_json, desc.n_threads, x->tokens, r, x->median_ms, x->tokens / (x->median_ms / 1e3),
                       x->route_ms, x->dispatch_ms, x->experts_ms, x->combine_ms, x->sent, x->received, per_compute,
                       x->bare_ms, per_bare, desc.compile_ms, desc.cache_hit);
        }
        fflush(stdout);
    }
    if (all_rows && output->plot_path &&
        write_ep_plot(output->plot_path, spec, &desc, ranks.size, repeat, all_rows, n_counts))
        goto done;
    rc = 0;
done:
    rc = cli_ranks_all_ok(&ranks, rc == 0) ? rc : 1;
    moegen_layer_close(layer);
    moe_tensors_free(&ts);
    moe_tensors_free(&own);
    free(times);
    for (int i = 0; i < 5; i++) free(stage[i]);
    free(all_rows);
    free(y);
    cli_ranks_stop(&ranks);
    return rc;
}
