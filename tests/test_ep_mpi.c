/* test_ep_mpi.c — expert parallelism with the ranks as MPI processes (run by
 * tests/test_ep_mpi.sh under mpirun), over moegen_comm_create_mpi.
 *
 *   test_ep_mpi cases          every case of tests/ep/ep_check.c: each rank bitwise equal
 *                              to an ep_size = 1 layer on its own tokens, and verified
 *   test_ep_mpi never-forward  the last rank opens the layer and never calls forward
 *   test_ep_mpi kill           the last rank is killed (SIGKILL) after open
 *   test_ep_mpi mismatch       rank 1 opens another spec
 *
 * Every line a rank prints starts with "[rank r/P]"; the script checks them. In the fault
 * modes a surviving rank prints "survived: <status> after <s> s: <message>" when its call
 * returned the expected error within the deadline: open runs under MOEGEN_COMM_TIMEOUT
 * (a rank's compile may finish long after another's on a loaded machine), forward under
 * FAULT_DEADLINE_S.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ep_check.h"
#include "moegen_mpi.h"

static int rank, ranks;

#define FAULT_DEADLINE_S 3.0

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int run_cases(moegen_comm *comm) {
    int failures = 0;
    for (int i = 0; i < EP_CASE_COUNT; i++) {
        char why[1024];
        int rc = ep_check_case(&EP_CASES[i], comm, why, sizeof why);
        printf("[rank %d/%d] %s %s: %s\n", rank, ranks, rc == 0 ? "ok" : "FAIL", EP_CASES[i].name, why);
        fflush(stdout);
        failures += rc != 0;
        if (moegen_comm_broken(comm)) break; /* nothing more can run */
    }
    /* each rank reports for itself: no collective that could wait on a rank that died */
    printf("[rank %d/%d] %s: %d failures on this rank\n", rank, ranks, failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}

static const char *FAULT = "name: ep_mpi_fault\nnum_experts: 6\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                           "moe_intermediate_size: 16\ndtype: fp32\n";

static int run_fault(moegen_comm *comm, const char *mode) {
    char yaml[512];
    const int odd = !strcmp(mode, "mismatch") && rank == 1;
    snprintf(yaml, sizeof yaml, "ep_size: %d\n%s%s", ranks, FAULT, odd ? "expert_bias: true\n" : "");
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.comm = comm;
    moegen_layer *layer = NULL;
    moegen_error err;
    double start = now_s();
    moegen_status st = moegen_layer_open_string(yaml, strlen(yaml), "fault", &o, &layer, &err);
    if (!strcmp(mode, "mismatch")) {
        if (st != MOEGEN_OK)
            printf("[rank %d/%d] survived: %s after %.1f s: %s\n", rank, ranks, moegen_status_name(st),
                   now_s() - start, err.message);
        else
            printf("[rank %d/%d] FAIL: open succeeded with a mismatched rank\n", rank, ranks);
        moegen_layer_close(layer);
        return 0;
    }
    if (st != MOEGEN_OK) {
        printf("[rank %d/%d] FAIL: open: %s\n", rank, ranks, err.message);
        return 1;
    }
    static float router[6 * 32], w1[6 * 16 * 32], w2[6 * 32 * 16], x[8 * 32], y[8 * 32];
    moegen_weights w = {.router_w = router, .w1 = w1, .w2 = w2};
    moegen_layer_bind(layer, &w, &err);
    fflush(stdout);
    if (rank == ranks - 1) {
        if (!strcmp(mode, "kill")) raise(SIGKILL);
        sleep(8); /* never forward: outlive the others' deadline, then leave */
        moegen_layer_close(layer);
        return 0;
    }
    moegen_forward_io io = {.n_tokens = 8, .x = x, .y = y};
    moegen_comm_set_timeout(comm, FAULT_DEADLINE_S, NULL);
    start = now_s();
    st = moegen_layer_forward(layer, &io, NULL, &err);
    if (st == MOEGEN_ERR_COMM)
        printf("[rank %d/%d] survived: %s after %.1f s: %s\n", rank, ranks, moegen_status_name(st), now_s() - start,
               err.message);
    else
        printf("[rank %d/%d] FAIL: forward returned %s\n", rank, ranks, moegen_status_name(st));
    fflush(stdout);
    moegen_layer_close(layer);
    return 0;
}

int main(int argc, char **argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    const char *mode = argc > 1 ? argv[1] : "cases";
    moegen_comm *comm = NULL;
    moegen_error err;
    if (moegen_comm_create_mpi(MPI_COMM_WORLD, &comm, &err) != MOEGEN_OK) {
        printf("[rank %d/%d] FAIL: %s\n", rank, ranks, err.message);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int rc = !strcmp(mode, "cases") ? run_cases(comm) : run_fault(comm, mode);
    fflush(stdout);
    const int broken = moegen_comm_broken(comm);
    moegen_comm_destroy(comm);
    /* After a fault a peer is gone or stuck: MPI_Finalize could wait for it forever. */
    if (broken || !strcmp(mode, "never-forward") || !strcmp(mode, "kill")) _exit(rc);
    MPI_Finalize();
    return rc;
}
