/* test_ep.c — expert parallelism with the ranks as threads of one process, over the
 * caller-callback transport (tests/ep/thread_comm.c): every case of tests/ep/ep_check.c at
 * P = 2 and 4, each rank bit-identical to an ep_size = 1 layer on its own tokens and
 * checked against the reference; and the faults: a rank that never calls forward, ranks
 * that open different specs, an ep_size that is not the communicator's size, a missing
 * communicator. tests/test_ep_mpi.c runs the same cases as MPI processes. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ep_check.h"
#include "moegen.h"
#include "thread_comm.h"

#define MAX_RANKS 4

typedef struct rank_job {
    moegen_comm *comm;
    int rank;
    const ep_case *c;
    int failed;
    char why[1024];
} rank_job;

static void *run_rank(void *arg) {
    rank_job *job = arg;
    job->failed = ep_check_case(job->c, job->comm, job->why, sizeof job->why) != 0;
    return NULL;
}

/* Run `body` on P threads, one per rank, each with its own communicator of one world. */
static void on_ranks(int ranks, void *(*body)(void *), rank_job *jobs, double timeout_s) {
    thread_world *world = thread_world_create(ranks);
    assert_non_null(world);
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < ranks; r++) {
        jobs[r].comm = thread_world_comm(world, r);
        jobs[r].rank = r;
        assert_non_null(jobs[r].comm);
        assert_int_equal(moegen_comm_set_timeout(jobs[r].comm, timeout_s, NULL), MOEGEN_OK);
        assert_int_equal(pthread_create(&threads[r], NULL, body, &jobs[r]), 0);
    }
    for (int r = 0; r < ranks; r++) pthread_join(threads[r], NULL);
    for (int r = 0; r < ranks; r++) moegen_comm_destroy(jobs[r].comm);
    thread_world_destroy(world);
}

static void every_case_is_bit_identical_to_ep1(int ranks) {
    for (int i = 0; i < EP_CASE_COUNT; i++) {
        rank_job jobs[MAX_RANKS];
        memset(jobs, 0, sizeof jobs);
        for (int r = 0; r < ranks; r++) jobs[r].c = &EP_CASES[i];
        on_ranks(ranks, run_rank, jobs, 120.0);
        for (int r = 0; r < ranks; r++) {
            if (jobs[r].failed) fail_msg("%s, P = %d: %s", EP_CASES[i].name, ranks, jobs[r].why);
            print_message("  %-32s %s\n", EP_CASES[i].name, jobs[r].why);
        }
    }
}

static void two_ranks_are_bit_identical_to_one(void **state) {
    (void)state;
    every_case_is_bit_identical_to_ep1(2);
}

static void four_ranks_are_bit_identical_to_one(void **state) {
    (void)state;
    every_case_is_bit_identical_to_ep1(4);
}

/* ---- faults ------------------------------------------------------------------------------ */

static const char *FAULT_SPEC = "name: ep_fault\nep_size: 3\nnum_experts: 6\nnum_experts_per_tok: 2\n"
                                "hidden_size: 32\nmoe_intermediate_size: 16\ndtype: fp32\n";

typedef struct fault_job {
    moegen_comm *comm;
    int rank;
    const char *yaml;
    int skip_forward;        /* this rank opens and binds, then never calls forward */
    double forward_timeout_s; /* > 0: the deadline forward runs under (open keeps the world's) */
    moegen_status open_status, forward_status;
    double forward_seconds;
    char message[1024];
} fault_job;

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run_fault(void *arg) {
    fault_job *job = arg;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    o.comm = job->comm;
    moegen_layer *layer = NULL;
    moegen_error err;
    job->open_status = moegen_layer_open_string(job->yaml, strlen(job->yaml), "fault", &o, &layer, &err);
    if (job->open_status != MOEGEN_OK) {
        snprintf(job->message, sizeof job->message, "%s", err.message);
        return NULL;
    }
    static float router[6 * 32], w1[6 * 16 * 32], w2[6 * 32 * 16], x[4 * 32], y[4 * 32];
    moegen_weights w = {.router_w = router, .w1 = w1, .w2 = w2};
    moegen_forward_io io = {.n_tokens = 4, .x = x, .y = y};
    if (moegen_layer_bind(layer, &w, &err) == MOEGEN_OK && !job->skip_forward) {
        if (job->forward_timeout_s > 0.0) moegen_comm_set_timeout(job->comm, job->forward_timeout_s, NULL);
        double start = seconds_now();
        job->forward_status = moegen_layer_forward(layer, &io, NULL, &err);
        job->forward_seconds = seconds_now() - start;
        if (job->forward_status != MOEGEN_OK) snprintf(job->message, sizeof job->message, "%s", err.message);
    }
    moegen_layer_close(layer);
    return NULL;
}

static void run_fault_world(fault_job *jobs, int ranks, double timeout_s) {
    thread_world *world = thread_world_create(ranks);
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < ranks; r++) {
        jobs[r].comm = thread_world_comm(world, r);
        jobs[r].rank = r;
        moegen_comm_set_timeout(jobs[r].comm, timeout_s, NULL);
        assert_int_equal(pthread_create(&threads[r], NULL, run_fault, &jobs[r]), 0);
    }
    for (int r = 0; r < ranks; r++) pthread_join(threads[r], NULL);
    for (int r = 0; r < ranks; r++) moegen_comm_destroy(jobs[r].comm);
    thread_world_destroy(world);
}

static void a_rank_that_never_calls_forward_makes_every_survivor_fail_within_the_deadline(void **state) {
    (void)state;
    fault_job jobs[3];
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < 3; r++) {
        jobs[r].yaml = FAULT_SPEC;
        jobs[r].forward_timeout_s = 2.0;
    }
    jobs[2].skip_forward = 1;
    /* Open's exchange has all three ranks, but on a loaded machine one rank's compile can
     * finish long after another's: open waits up to 60 s, only forward runs under 2 s. */
    run_fault_world(jobs, 3, 60.0);
    for (int r = 0; r < 2; r++) {
        assert_int_equal(jobs[r].open_status, MOEGEN_OK);
        assert_int_equal(jobs[r].forward_status, MOEGEN_ERR_COMM);
        assert_non_null(strstr(jobs[r].message, "alltoall over user failed (deadline"));
        assert_true(jobs[r].forward_seconds < 10.0);
        print_message("  rank %d after %.1f s: %s\n", r, jobs[r].forward_seconds, jobs[r].message);
    }
}

static void ranks_with_different_specs_all_fail_at_open_naming_the_odd_rank(void **state) {
    (void)state;
    const char *other = "name: ep_fault\nep_size: 3\nnum_experts: 6\nnum_experts_per_tok: 2\n"
                        "hidden_size: 64\nmoe_intermediate_size: 16\ndtype: fp32\n";
    fault_job jobs[3];
    memset(jobs, 0, sizeof jobs);
    jobs[0].yaml = jobs[2].yaml = FAULT_SPEC;
    jobs[1].yaml = other;
    run_fault_world(jobs, 3, 30.0);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(jobs[r].open_status, MOEGEN_ERR_INVALID_ARGUMENT);
        assert_non_null(strstr(jobs[r].message, "rank 1 has spec sha256:"));
        assert_null(strstr(jobs[r].message, "rank 0 has"));
    }
    print_message("  %s\n", jobs[0].message);
}

static void an_ep_size_other_than_the_communicator_size_fails_on_every_rank(void **state) {
    (void)state;
    const char *two = "name: ep_two\nep_size: 2\nnum_experts: 6\nnum_experts_per_tok: 2\nhidden_size: 32\n"
                      "moe_intermediate_size: 16\n";
    fault_job jobs[3];
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < 3; r++) jobs[r].yaml = two;
    run_fault_world(jobs, 3, 30.0);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(jobs[r].open_status, MOEGEN_ERR_INVALID_ARGUMENT);
        assert_non_null(strstr(jobs[r].message, "ep_size 2 on a communicator of 3 ranks"));
    }
}

static void an_expert_parallel_spec_without_a_communicator_is_a_clear_error(void **state) {
    (void)state;
    moegen_layer *layer = NULL;
    moegen_error err;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = MOEGEN_DEVICE_CPU;
    assert_int_equal(moegen_layer_open_string(FAULT_SPEC, strlen(FAULT_SPEC), NULL, &o, &layer, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "ep_size 3 needs a communicator of 3 ranks"));
    assert_null(layer);
    /* and a communicator with too few callbacks is refused where it is made */
    moegen_comm_callbacks none = {0};
    moegen_comm *comm = NULL;
    assert_int_equal(moegen_comm_create(0, 2, &none, NULL, &comm, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_null(comm);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(two_ranks_are_bit_identical_to_one),
        cmocka_unit_test(four_ranks_are_bit_identical_to_one),
        cmocka_unit_test(a_rank_that_never_calls_forward_makes_every_survivor_fail_within_the_deadline),
        cmocka_unit_test(ranks_with_different_specs_all_fail_at_open_naming_the_odd_rank),
        cmocka_unit_test(an_ep_size_other_than_the_communicator_size_fails_on_every_rank),
        cmocka_unit_test(an_expert_parallel_spec_without_a_communicator_is_a_clear_error),
    };
    return cmocka_run_group_tests_name("expert parallelism (ranks as threads)", tests, NULL, NULL);
}
