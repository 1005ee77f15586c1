/* ep_check.h — one rank's check of the expert-parallel contract, shared by the tests
 * that run ranks as threads (tests/test_ep.c, over moegen_comm_create callbacks) and as
 * MPI processes (tests/test_ep_mpi.c, under mpirun).
 *
 * The contract (docs/numerics.md §7): rank r's outputs — y, topk ids and weights, router
 * weights, counts before and after capacity, dropped routes, capacity, aux and z losses —
 * equal, bit for bit, those of an ep_size = 1 layer of the same spec run on rank r's
 * tokens with all the weights. The check also compares rank r's outputs with the
 * independent reference.
 */
#ifndef MOEGEN_TESTS_EP_CHECK_H
#define MOEGEN_TESTS_EP_CHECK_H

#include <stdint.h>

#include "moegen.h"
#include "patterns.h"

typedef struct ep_case {
    const char *name;
    const char *yaml;             /* the spec body, without name and ep_size lines */
    int64_t tokens[4];            /* per rank (ranks beyond 4 reuse tokens[r % 4]) */
    moe_data_pattern pattern;
    const char *variant;          /* kernel variant overrides for both sides, or NULL */
} ep_case;

/* Run `c` on this rank (rank and size from `comm`): open the ep_size = size layer with
 * `comm`, bind this rank's experts, forward this rank's tokens; open the ep_size = 1 layer,
 * bind everything, forward the same tokens; compare. Returns 0 when every check passed,
 * else -1 with the first failure in why[why_size]. Every rank must call it for the same
 * case (it makes collectives). */
int ep_check_case(const ep_case *c, moegen_comm *comm, char *why, size_t why_size);

/* The cases every transport runs (EP_CASE_COUNT of them). */
extern const ep_case EP_CASES[];
extern const int EP_CASE_COUNT;

#endif
