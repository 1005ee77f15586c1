/* open_close_memory.c — memory of a process that opens and closes many distinct layers
 * (what a tuning sweep does): resident and virtual size and the number of mapped
 * module files, every 100 cycles.
 *
 *   moegen_open_close_memory [CYCLES] [DISTINCT]     (default 1000 cycles, 1000 distinct)
 *
 * Cycle i opens layer i % DISTINCT (a tiny spec of its own name, so its own module),
 * runs one forward on 4 threads (so the OpenMP runtime's workers exist and ran the
 * module's code), and closes it. Distinct layers are compiled on first use: run it twice
 * to time the loads alone. bench/results/ has the committed measurements.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moegen.h"

static void memory(long *rss_kib, long *virtual_kib, int *modules) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[512];
    *rss_kib = *virtual_kib = -1;
    while (f && fgets(line, sizeof line, f)) {
        sscanf(line, "VmRSS: %ld kB", rss_kib);
        sscanf(line, "VmSize: %ld kB", virtual_kib);
    }
    if (f) fclose(f);
    *modules = 0;
    f = fopen("/proc/self/maps", "r");
    while (f && fgets(line, sizeof line, f)) *modules += strstr(line, "/module.so") != NULL;
    if (f) fclose(f);
}

int main(int argc, char **argv) {
    const long cycles = argc > 1 ? atol(argv[1]) : 1000, distinct = argc > 2 ? atol(argv[2]) : 1000;
    if (cycles < 1 || distinct < 1) return 2;
    float router[1 * 16] = {0}, w1[16 * 16] = {0}, w2[16 * 16] = {0}, x[4 * 16] = {0}, y[4 * 16];
    moegen_weights weights = {.router_w = router, .w1 = w1, .w2 = w2};
    moegen_forward_io io = {.n_tokens = 4, .x = x, .y = y};
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    printf("| cycles | VmRSS (MiB) | VmSize (MiB) | mapped module.so segments | seconds |\n|---:|---:|---:|---:|---:|\n");
    for (long i = 1; i <= cycles; i++) {
        char yaml[256];
        snprintf(yaml, sizeof yaml,
                 "name: open_close_%ld\nnum_experts: 1\nnum_experts_per_tok: 1\nhidden_size: 16\n"
                 "moe_intermediate_size: 16\nactivation: relu\ndtype: fp32\n",
                 (i - 1) % distinct);
        moegen_open_options o;
        moegen_open_options_init(&o);
        o.device = MOEGEN_DEVICE_CPU;
        o.n_threads = 4;
        moegen_layer *layer;
        moegen_error err;
        if (moegen_layer_open_string(yaml, strlen(yaml), NULL, &o, &layer, &err) != MOEGEN_OK ||
            moegen_layer_bind(layer, &weights, &err) != MOEGEN_OK ||
            moegen_layer_forward(layer, &io, NULL, &err) != MOEGEN_OK) {
            fprintf(stderr, "cycle %ld: %s\n", i, err.message);
            return 1;
        }
        moegen_layer_close(layer);
        if (i == 1 || i % 100 == 0 || i == cycles) {
            long rss, size;
            int modules;
            memory(&rss, &size, &modules);
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            printf("| %ld | %.1f | %.1f | %d | %.0f |\n", i, rss / 1024.0, size / 1024.0, modules,
                   (double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9);
            fflush(stdout);
        }
    }
    return 0;
}
