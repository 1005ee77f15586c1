/* bench_ep.h — `moegen bench` for expert-parallel specs (see bench_ep.c). */
#ifndef MOEGEN_CLI_BENCH_EP_H
#define MOEGEN_CLI_BENCH_EP_H

#include "cli.h"
#include "spec.h"

/* Time `spec` (ep_size > 1) on the ranks of this MPI job at each token count per rank;
 * rank 0 writes the results as `output` says (a table, or JSON lines; an SVG chart).
 * Returns the exit status. */
int moegen_cli_bench_ep(const moegen_spec *spec, const char *spec_path, const long long *counts, int n_counts,
                        long long repeat, long long seed, int threads, const char *cache_dir, const char *variant,
                        const moegen_cli_bench_output *output);

#endif
