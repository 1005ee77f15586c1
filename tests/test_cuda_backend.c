/* test_cuda_backend.c — the CUDA backend's open and launch sequence (runtime/cuda_backend.c)
 * against the contract in templates/common/moegen_cuda_abi.h, with no GPU.
 *
 * Place in the pipeline: spec -> gen -> [compile (real NVRTC) -> cache -> load -> launch
 * (a fake driver, tests/fake_cuda_driver.c)]. The fake finds kernels in the real CUBIN's
 * symbol table and records every launch; nothing is computed (test_forward_gpu checks
 * results on a GPU). Checked here:
 *  - every launch uses the threads per block of moegen_cuda_abi.h, which is also the
 *    kernel's __launch_bounds__ in the CUBIN, and no dynamic shared memory; grids follow the variant the module was rendered with (sm_100a, the form
 *    `--arch` once refused, and the device's own sm_120a);
 *  - the kernels come from the module: P_dispatch_rank is launched exactly when the
 *    module has it (probs priority yes, position priority no, and not when the driver
 *    hides it); a missing required kernel fails open with MOEGEN_ERR_LOAD naming it;
 *    shared experts of another width get their own GEMM pair, the residual MLP reuses
 *    the routed experts' pair;
 *  - a training step: the forward's launches, then the backward's (token passes, the three
 *    GEMMs of each problem group, the weight gradients per group and dense tensor), the
 *    weight phase alone, no launches for no tokens, used_token refused;
 *  - an architecture the one parser refuses fails open with its message.
 *
 * Invariants: the fake is chosen with $MOEGEN_CUDA_DRIVER_LIB for the whole run and
 * steered with $FAKE_CUDA_CC / $FAKE_CUDA_HIDE, each restored by the test that sets it;
 * the module cache lives in one mkdtemp directory, removed at the end. Without NVRTC every test
 * skips with a message.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "capacity.h"
#include "cuda_api.h"
#include "moegen.h"
#include "moegen_cuda_abi.h"
#include "spec.h"
#include "variant.h"

#ifndef FAKE_CUDA_DRIVER
#error "FAKE_CUDA_DRIVER (the path of the fake libcuda) must be defined by the build"
#endif

#define MAX_LAUNCHES 64

/* What the fake records per launch (tests/fake_cuda_driver.c). */
typedef struct fake_cuda_launch_record {
    char name[256];
    unsigned grid[3], block[3];
    unsigned shared_bytes;
    unsigned max_threads;
    int gemm_group, gemm_first, gemm_count;
} fake_cuda_launch_record;

typedef struct group_state {
    char cache_dir[PATH_MAX];
    int nvrtc_ok;
    char nvrtc_problem[MOEGEN_ERROR_MESSAGE_BYTES];
    int (*launch_count)(void);
    const fake_cuda_launch_record *(*launch)(int index);
    void (*reset)(void);
} group_state;

/* An environment variable set for one test and restored after. */
typedef struct saved_variable {
    const char *name;
    char *value; /* NULL: was unset */
} saved_variable;

static saved_variable set_variable(const char *name, const char *value) {
    saved_variable saved = {name, getenv(name) ? strdup(getenv(name)) : NULL};
    if (value) setenv(name, value, 1);
    else unsetenv(name);
    return saved;
}

static void restore_variable(saved_variable *saved) {
    if (saved->value) setenv(saved->name, saved->value, 1);
    else unsetenv(saved->name);
    free(saved->value);
    saved->value = NULL;
}

/* ---- specs: 8 experts, top-2, H 64, F 48, bf16 ------------------------------------------- */

static const char SPEC_POSITION[] =
    "name: contract_position\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
    "moe_intermediate_size: 48\nactivation: swiglu\ndtype: bf16\n"
    "capacity:\n  mode: factor\n  capacity_factor: 1.0\n  priority: position\n";
static const char SPEC_PROBS_SHARED[] =
    "name: contract_probs\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
    "moe_intermediate_size: 48\nactivation: silu\ndtype: bf16\n"
    "capacity:\n  mode: factor\n  priority: probs\n"
    "shared_experts:\n  count: 2\n  intermediate_size: 32\n";
static const char SPEC_RESIDUAL[] =
    "name: contract_residual\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
    "moe_intermediate_size: 48\nactivation: gelu\ndtype: fp32\nsemantics: deepspeed\n"
    "use_residual: true\n";

/* ---- helpers ------------------------------------------------------------------------------ */

static const group_state *require_nvrtc(void **state) {
    const group_state *group = *state;
    if (!group->nvrtc_ok) {
        print_message("no NVRTC here (%s); skipping\n", group->nvrtc_problem);
        skip();
    }
    return group;
}

static void parse_spec(const char *yaml, moegen_spec *spec) {
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), "spec", spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
}

/* Open `yaml` as a CUDA layer on the fake device for `arch` (NULL: the device's). */
static moegen_status open_layer(const group_state *group, const char *yaml, const char *arch,
                                moegen_layer **layer, moegen_error *err) {
    moegen_open_options options;
    moegen_open_options_init(&options);
    options.device = MOEGEN_DEVICE_CUDA;
    options.cache_dir = group->cache_dir;
    options.arch = arch;
    return moegen_layer_open_string(yaml, strlen(yaml), "spec", &options, layer, err);
}

#define FAKE_POINTER(n) ((void *)(uintptr_t)(0x7f0000000000ull + (n) * 0x1000000ull))

/* Bind fake device pointers (never dereferenced on the host) and run one forward of S
 * tokens; the fake's launch record is cleared first. */
static void bind_and_forward(const group_state *group, moegen_layer *layer, int64_t S) {
    moegen_weights w = {
        .router_w = FAKE_POINTER(1),     .router_b = FAKE_POINTER(2),     .score_bias = FAKE_POINTER(3),
        .w1 = FAKE_POINTER(4),           .b1 = FAKE_POINTER(5),           .w2 = FAKE_POINTER(6),
        .b2 = FAKE_POINTER(7),           .shared_w1 = FAKE_POINTER(8),    .shared_b1 = FAKE_POINTER(9),
        .shared_w2 = FAKE_POINTER(10),   .shared_b2 = FAKE_POINTER(11),   .shared_gate = FAKE_POINTER(12),
        .residual_w1 = FAKE_POINTER(13), .residual_b1 = FAKE_POINTER(14), .residual_w2 = FAKE_POINTER(15),
        .residual_b2 = FAKE_POINTER(16), .residual_coef_w = FAKE_POINTER(17),
        .residual_coef_b = FAKE_POINTER(18),
    };
    moegen_forward_io io = {
        .n_tokens = S,
        .x = FAKE_POINTER(20),
        .y = FAKE_POINTER(21),
        .topk_ids = FAKE_POINTER(22),
        .counts_before = FAKE_POINTER(23),
        .counts_after = FAKE_POINTER(24),
    };
    moegen_forward_stats stats;
    moegen_error err;
    if (moegen_layer_bind(layer, &w, &err) != MOEGEN_OK) fail_msg("bind: %s", err.message);
    group->reset();
    if (moegen_layer_forward(layer, &io, &stats, &err) != MOEGEN_OK) fail_msg("forward: %s", err.message);
}

static int ends_with(const char *text, const char *suffix) {
    size_t length = strlen(text), suffix_length = strlen(suffix);
    return suffix_length <= length && strcmp(text + length - suffix_length, suffix) == 0;
}

static unsigned ceil_div(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

/* One expected launch: the kernel's name suffix, grid and threads per block. */
typedef struct expected_launch {
    const char *suffix;
    unsigned grid_x, grid_y, threads;
    int gemm_group, gemm_first, gemm_count; /* -1 for the other kernels */
} expected_launch;

static void check_launches(const group_state *group, const expected_launch *expected, int n_expected) {
    const int n = group->launch_count();
    for (int index = 0; index < n && index < n_expected; index++) {
        const fake_cuda_launch_record *got = group->launch(index);
        const expected_launch *want = &expected[index];
        if (!ends_with(got->name, want->suffix))
            fail_msg("launch %d is %s, expected ..._%s", index, got->name, want->suffix);
        if (got->grid[0] != want->grid_x || got->grid[1] != want->grid_y || got->grid[2] != 1)
            fail_msg("%s: grid %u x %u x %u, expected %u x %u x 1", got->name, got->grid[0], got->grid[1],
                     got->grid[2], want->grid_x, want->grid_y);
        if (got->block[0] != want->threads || got->block[1] != 1 || got->block[2] != 1)
            fail_msg("%s: block %u x %u x %u, expected %u x 1 x 1 (moegen_cuda_abi.h)", got->name, got->block[0],
                     got->block[1], got->block[2], want->threads);
        /* the kernel's __launch_bounds__ in the CUBIN: the same number, from the same macro */
        if (got->max_threads != got->block[0])
            fail_msg("%s: launched with %u threads, its __launch_bounds__ says %u", got->name, got->block[0],
                     got->max_threads);
        assert_int_equal(got->shared_bytes, MOEGEN_CUDA_DYNAMIC_SHARED_BYTES);
        assert_int_equal(got->gemm_group, want->gemm_group);
        assert_int_equal(got->gemm_first, want->gemm_first);
        assert_int_equal(got->gemm_count, want->gemm_count);
    }
    if (n != n_expected) {
        for (int index = 0; index < n; index++) print_message("  launch %d: %s\n", index, group->launch(index)->name);
        fail_msg("%d launches, expected %d", n, n_expected);
    }
}

/* The default variant the backend renders for `spec` on compute capability sm (x10). */
static moegen_cuda_variant variant_for(const moegen_spec *spec, int sm) {
    moegen_target target = {.cuda_sm = sm};
    moegen_variant variant;
    moegen_variant_default(spec, MOEGEN_BACKEND_CUDA, &target, &variant);
    return variant.cuda;
}

#define NO_GEMM -1, -1, -1

/* ---- tests -------------------------------------------------------------------------------- */

static void sm_100a_position_priority_launches_the_abi_sequence_without_a_rank_kernel(void **state) {
    const group_state *group = require_nvrtc(state);
    saved_variable cc = set_variable("FAKE_CUDA_CC", "10.0");
    moegen_spec spec;
    parse_spec(SPEC_POSITION, &spec);
    const moegen_cuda_variant v = variant_for(&spec, 100);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (open_layer(group, SPEC_POSITION, "sm_100a", &layer, &err) != MOEGEN_OK) fail_msg("open: %s", err.message);
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    assert_int_equal(desc.device, MOEGEN_DEVICE_CUDA);
    assert_true(strncmp(desc.variant, "cuda_sm100_", 11) == 0);

    const int64_t S = 100, E = spec.num_experts;
    bind_and_forward(group, layer, S);
    const unsigned gemm_threads = MOEGEN_CUDA_GEMM_THREADS(v.warps_m, v.warps_n);
    const unsigned m_tiles = ceil_div(moegen_spec_max_rows(&spec, S), v.tile_m) + (unsigned)E;
    const expected_launch expected[] = {
        {"_router", ceil_div(S, v.router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS, NO_GEMM},
        {"_dispatch_count", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_dispatch_place", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_f48_gemm1", m_tiles, ceil_div(48, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_gemm2", m_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_combine", (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS, NO_GEMM},
        {"_losses", 1, 1, MOEGEN_CUDA_LOSS_THREADS, NO_GEMM},
    };
    check_launches(group, expected, (int)(sizeof expected / sizeof expected[0]));

    /* S = 0 launches nothing */
    bind_and_forward(group, layer, 0);
    assert_int_equal(group->launch_count(), 0);
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
    restore_variable(&cc);
}

static void a_module_with_a_rank_kernel_gets_it_launched_and_shared_experts_their_own_gemms(void **state) {
    const group_state *group = require_nvrtc(state);
    saved_variable cc = set_variable("FAKE_CUDA_CC", "10.0");
    moegen_spec spec;
    parse_spec(SPEC_PROBS_SHARED, &spec);
    const moegen_cuda_variant v = variant_for(&spec, 100);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (open_layer(group, SPEC_PROBS_SHARED, "sm_100a", &layer, &err) != MOEGEN_OK) fail_msg("open: %s", err.message);

    const int64_t S = 300, E = spec.num_experts, K = spec.top_k, Ns = spec.shared.count;
    bind_and_forward(group, layer, S);
    const unsigned gemm_threads = MOEGEN_CUDA_GEMM_THREADS(v.warps_m, v.warps_n);
    const unsigned routed_tiles = ceil_div(moegen_spec_max_rows(&spec, S), v.tile_m) + (unsigned)E;
    const unsigned shared_tiles = (unsigned)Ns * ceil_div(S, v.tile_m);
    const expected_launch expected[] = {
        {"_router", ceil_div(S, v.router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS, NO_GEMM},
        {"_dispatch_count", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_dispatch_rank", ceil_div(S * K, MOEGEN_CUDA_RANK_THREADS), 1, MOEGEN_CUDA_RANK_THREADS, NO_GEMM},
        {"_dispatch_place", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_f48_gemm1", routed_tiles, ceil_div(48, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_gemm2", routed_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f32_gemm1", shared_tiles, ceil_div(32, v.tile_n), gemm_threads, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_f32_gemm2", shared_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_combine", (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS, NO_GEMM},
        {"_losses", 1, 1, MOEGEN_CUDA_LOSS_THREADS, NO_GEMM},
    };
    check_launches(group, expected, (int)(sizeof expected / sizeof expected[0]));
    moegen_layer_close(layer);

    /* The runtime follows the module, not the spec: a module without the rank kernel (the
     * driver hides it) is run without it. */
    saved_variable hide = set_variable("FAKE_CUDA_HIDE", "_dispatch_rank");
    if (open_layer(group, SPEC_PROBS_SHARED, "sm_100a", &layer, &err) != MOEGEN_OK) fail_msg("open: %s", err.message);
    bind_and_forward(group, layer, S);
    for (int index = 0; index < group->launch_count(); index++)
        assert_false(ends_with(group->launch(index)->name, "_dispatch_rank"));
    assert_int_equal(group->launch_count(), (int)(sizeof expected / sizeof expected[0]) - 1);
    moegen_layer_close(layer);
    restore_variable(&hide);
    moegen_spec_free(&spec);
    restore_variable(&cc);
}

static void the_devices_own_architecture_is_used_and_the_residual_mlp_reuses_the_expert_gemms(void **state) {
    const group_state *group = require_nvrtc(state);
    saved_variable cc = set_variable("FAKE_CUDA_CC", "12.0"); /* -> sm_120a */
    moegen_spec spec;
    parse_spec(SPEC_RESIDUAL, &spec);
    const moegen_cuda_variant v = variant_for(&spec, 120);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (open_layer(group, SPEC_RESIDUAL, NULL, &layer, &err) != MOEGEN_OK) fail_msg("open: %s", err.message);
    moegen_layer_desc desc;
    assert_int_equal(moegen_layer_describe(layer, &desc), MOEGEN_OK);
    assert_true(strncmp(desc.variant, "cuda_sm120_fp32_", 16) == 0);

    const int64_t S = 33, E = spec.num_experts;
    bind_and_forward(group, layer, S);
    const unsigned gemm_threads = MOEGEN_CUDA_GEMM_THREADS(v.warps_m, v.warps_n);
    const unsigned routed_tiles = ceil_div(moegen_spec_max_rows(&spec, S), v.tile_m) + (unsigned)E;
    const unsigned residual_tiles = ceil_div(S, v.tile_m);
    const expected_launch expected[] = {
        {"_router", ceil_div(S, v.router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS, NO_GEMM},
        {"_dispatch_count", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_dispatch_place", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_f48_gemm1", routed_tiles, ceil_div(48, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_gemm2", routed_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_gemm1", residual_tiles, ceil_div(48, v.tile_n), gemm_threads, MOEGEN_GROUP_RESIDUAL, (int)E, 1},
        {"_f48_gemm2", residual_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_RESIDUAL, (int)E, 1},
        {"_combine", (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS, NO_GEMM},
        {"_losses", 1, 1, MOEGEN_CUDA_LOSS_THREADS, NO_GEMM},
    };
    check_launches(group, expected, (int)(sizeof expected / sizeof expected[0]));
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
    restore_variable(&cc);
}

/* The training forward, then the backward with weight gradients, then the weight gradients
 * again: the forward's steps, then the backward's (moegen_cuda_launch.h), per problem group
 * and dense tensor, with the ABI's threads and grids. */
static void a_training_step_launches_the_forward_then_the_backward_kernels_of_every_group(void **state) {
    const group_state *group = require_nvrtc(state);
    saved_variable cc = set_variable("FAKE_CUDA_CC", "12.0");
    static const char yaml[] =
        "name: contract_train\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
        "moe_intermediate_size: 48\nactivation: swiglu\ndtype: bf16\n"
        "shared_experts:\n  count: 2\n  intermediate_size: 32\n  gate: true\n";
    moegen_spec spec;
    parse_spec(yaml, &spec);
    const moegen_cuda_variant v = variant_for(&spec, 120);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (open_layer(group, yaml, NULL, &layer, &err) != MOEGEN_OK) fail_msg("open: %s", err.message);
    const int64_t S = 70, E = spec.num_experts, Ns = spec.shared.count, H = 64;
    bind_and_forward(group, layer, S); /* binds the weights */
    moegen_forward_io io = {.n_tokens = S, .x = FAKE_POINTER(20), .y = FAKE_POINTER(21)};
    moegen_saved *saved = NULL;
    group->reset();
    if (moegen_layer_forward_train(layer, &io, &saved, NULL, &err) != MOEGEN_OK) fail_msg("forward_train: %s", err.message);
    assert_true(moegen_saved_bytes(saved) > (size_t)(S * H * 2)); /* device memory of its own, x's copy included */
    const unsigned gemm_threads = MOEGEN_CUDA_GEMM_THREADS(v.warps_m, v.warps_n);
    const unsigned routed_tiles = ceil_div(moegen_spec_max_rows(&spec, S), v.tile_m) + (unsigned)E;
    const unsigned shared_tiles = (unsigned)Ns * ceil_div(S, v.tile_m);
    const unsigned T = MOEGEN_CUDA_BWD_TILE, G = MOEGEN_CUDA_BWD_GEMM_THREADS, TT = MOEGEN_CUDA_BWD_TOKEN_THREADS;
    const expected_launch forward[] = {
        {"_router", ceil_div(S, v.router_tokens), 1, MOEGEN_CUDA_ROUTER_THREADS, NO_GEMM},
        {"_dispatch_count", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_dispatch_place", 1, 1, MOEGEN_CUDA_DISPATCH_THREADS, NO_GEMM},
        {"_f48_gemm1", routed_tiles, ceil_div(48, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_gemm2", routed_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f32_gemm1", shared_tiles, ceil_div(32, v.tile_n), gemm_threads, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_f32_gemm2", shared_tiles, ceil_div(64, v.tile_n), gemm_threads, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_combine", (unsigned)S, 1, MOEGEN_CUDA_COMBINE_THREADS, NO_GEMM},
        {"_losses", 1, 1, MOEGEN_CUDA_LOSS_THREADS, NO_GEMM},
    };
    check_launches(group, forward, (int)(sizeof forward / sizeof forward[0]));

    /* weight gradients before any backward: refused */
    moegen_grads grads = {.router_w = FAKE_POINTER(30), .w1 = FAKE_POINTER(31), .w2 = FAKE_POINTER(32),
                          .shared_w1 = FAKE_POINTER(33), .shared_w2 = FAKE_POINTER(34),
                          .shared_gate = FAKE_POINTER(35)};
    assert_int_equal(moegen_layer_backward_weights(layer, saved, &grads, &err), MOEGEN_ERR_STATE);

    moegen_backward_io bio = {.dy = FAKE_POINTER(40), .dx = FAKE_POINTER(41), .aux_coeff = 0.01};
    group->reset();
    if (moegen_layer_backward(layer, saved, &bio, &grads, &err) != MOEGEN_OK) fail_msg("backward: %s", err.message);
    const unsigned w_routed = MOEGEN_CUDA_BWD_WEIGHT_BLOCKS(64, 48, 96), w_shared = MOEGEN_CUDA_BWD_WEIGHT_BLOCKS(64, 32, 64);
    const expected_launch backward[] = {
        {"_bwd_combine", (unsigned)S, 1, TT, NO_GEMM},
        {"_f48_bwd_pre", routed_tiles, ceil_div(96, T), G, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_bwd_dh", routed_tiles, ceil_div(48, T), G, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f48_bwd_du", routed_tiles, ceil_div(64, T), G, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f32_bwd_pre", shared_tiles, ceil_div(64, T), G, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_f32_bwd_dh", shared_tiles, ceil_div(32, T), G, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_f32_bwd_du", shared_tiles, ceil_div(64, T), G, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_bwd_tokens", (unsigned)S, 1, TT, NO_GEMM},
        {"_f48_bwd_weights", w_routed, (unsigned)E, G, MOEGEN_GROUP_ROUTED, 0, (int)E},
        {"_f32_bwd_weights", w_shared, (unsigned)Ns, G, MOEGEN_GROUP_SHARED, (int)E, (int)Ns},
        {"_bwd_dense_weights", MOEGEN_CUDA_BWD_DENSE_BLOCKS(64, 8), 1, G, MOEGEN_CUDA_DENSE_ROUTER, -1, -1},
        {"_bwd_dense_weights", MOEGEN_CUDA_BWD_DENSE_BLOCKS(64, 1), 1, G, MOEGEN_CUDA_DENSE_GATE, -1, -1},
    };
    check_launches(group, backward, (int)(sizeof backward / sizeof backward[0]));

    /* the weight phase again (accumulating): its launches only */
    grads.accumulate = 1;
    group->reset();
    if (moegen_layer_backward_weights(layer, saved, &grads, &err) != MOEGEN_OK) fail_msg("weights: %s", err.message);
    check_launches(group, backward + 8, 4);
    moegen_saved_free(saved);

    /* no tokens: nothing launched, the gradients zeroed on the stream */
    io.n_tokens = 0;
    group->reset();
    if (moegen_layer_forward_train(layer, &io, &saved, NULL, &err) != MOEGEN_OK) fail_msg("forward_train: %s", err.message);
    grads.accumulate = 0;
    bio.dy = bio.dx = NULL;
    if (moegen_layer_backward(layer, saved, &bio, &grads, &err) != MOEGEN_OK) fail_msg("backward: %s", err.message);
    assert_int_equal(group->launch_count(), 0);
    moegen_saved_free(saved);

    /* used_token is refused on the GPU, with a message that says so */
    uint8_t used[4] = {1, 1, 1, 1};
    io.n_tokens = 4;
    io.used_token = used;
    assert_int_equal(moegen_layer_forward_train(layer, &io, &saved, NULL, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "used_token"));
    moegen_layer_close(layer);
    moegen_spec_free(&spec);
    restore_variable(&cc);
}

static void a_module_missing_a_required_kernel_fails_open_naming_it(void **state) {
    const group_state *group = require_nvrtc(state);
    saved_variable cc = set_variable("FAKE_CUDA_CC", "10.0");
    static const char *const required[] = {"_router",     "_dispatch_count", "_dispatch_place", "_f48_gemm1",
                                           "_f48_gemm2",  "_combine",        "_losses",         "_bwd_combine",
                                           "_bwd_tokens", "_f48_bwd_dh",     "_f48_bwd_weights"};
    for (size_t index = 0; index < sizeof required / sizeof required[0]; index++) {
        saved_variable hide = set_variable("FAKE_CUDA_HIDE", required[index]);
        moegen_layer *layer = NULL;
        moegen_error err;
        assert_int_equal(open_layer(group, SPEC_POSITION, "sm_100a", &layer, &err), MOEGEN_ERR_LOAD);
        assert_null(layer);
        if (!strstr(err.message, "has no kernel moe_contract_position_") || !strstr(err.message, required[index]))
            fail_msg("hiding %s: %s", required[index], err.message);
        restore_variable(&hide);
    }
    restore_variable(&cc);
}

static void an_architecture_the_parser_refuses_fails_open_with_its_message(void **state) {
    const group_state *group = require_nvrtc(state);
    static const struct {
        const char *arch, *message;
    } cases[] = {
        {"sm_100x", "CUDA architecture 'sm_100x' is not of the form sm_<70..121>[a|f]"},
        {"sm_80a", "the 'a' (architecture-specific) targets start at sm_90a"},
        {"sm_122a", "moegen knows sm_70 to sm_121"},
        {"", "no CUDA architecture given"},
    };
    saved_variable cc = set_variable("FAKE_CUDA_CC", "9.0");
    for (size_t index = 0; index < sizeof cases / sizeof cases[0]; index++) {
        moegen_layer *layer = NULL;
        moegen_error err;
        assert_int_equal(open_layer(group, SPEC_POSITION, cases[index].arch, &layer, &err),
                         MOEGEN_ERR_INVALID_ARGUMENT);
        assert_null(layer);
        if (!strstr(err.message, cases[index].message))
            fail_msg("arch '%s': \"%s\" lacks \"%s\"", cases[index].arch, err.message, cases[index].message);
    }
    restore_variable(&cc);
}

/* ---- the group ---------------------------------------------------------------------------- */

static int group_setup(void **state) {
    group_state *group = calloc(1, sizeof *group);
    const char *base = getenv("TMPDIR") && getenv("TMPDIR")[0] == '/' ? getenv("TMPDIR") : "/tmp";
    if (!group) return -1;
    snprintf(group->cache_dir, sizeof group->cache_dir, "%s/moegen-test-cuda-backend-XXXXXX", base);
    if (!mkdtemp(group->cache_dir)) {
        free(group);
        return -1;
    }
    moegen_nvrtc nv;
    moegen_error err;
    group->nvrtc_ok = moegen_nvrtc_open(&nv, &err) == MOEGEN_OK;
    if (group->nvrtc_ok) moegen_nvrtc_close(&nv);
    else snprintf(group->nvrtc_problem, sizeof group->nvrtc_problem, "%s", err.message);
    /* The fake stays loaded for the whole run (the runtime opens it RTLD_NODELETE as well),
     * so the record read here is the one the runtime's launches write. */
    void *fake = dlopen(FAKE_CUDA_DRIVER, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!fake) {
        fprintf(stderr, "cannot open the fake driver %s: %s\n", FAKE_CUDA_DRIVER, dlerror());
        free(group);
        return -1;
    }
    *(void **)&group->launch_count = dlsym(fake, "fake_cuda_launch_count");
    *(void **)&group->launch = dlsym(fake, "fake_cuda_launch");
    *(void **)&group->reset = dlsym(fake, "fake_cuda_reset");
    if (!group->launch_count || !group->launch || !group->reset) {
        free(group);
        return -1;
    }
    setenv("MOEGEN_CUDA_DRIVER_LIB", FAKE_CUDA_DRIVER, 1);
    *state = group;
    return 0;
}

static int group_teardown(void **state) {
    group_state *group = *state;
    unsetenv("MOEGEN_CUDA_DRIVER_LIB");
    (void)moegen_remove_tree(group->cache_dir);
    free(group);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sm_100a_position_priority_launches_the_abi_sequence_without_a_rank_kernel),
        cmocka_unit_test(a_module_with_a_rank_kernel_gets_it_launched_and_shared_experts_their_own_gemms),
        cmocka_unit_test(the_devices_own_architecture_is_used_and_the_residual_mlp_reuses_the_expert_gemms),
        cmocka_unit_test(a_training_step_launches_the_forward_then_the_backward_kernels_of_every_group),
        cmocka_unit_test(a_module_missing_a_required_kernel_fails_open_naming_it),
        cmocka_unit_test(an_architecture_the_parser_refuses_fails_open_with_its_message),
    };
    return cmocka_run_group_tests_name("CUDA backend against a fake driver", tests, group_setup, group_teardown);
}
