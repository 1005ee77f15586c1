/* backward_matrix.h — the spec matrix the training backward is tested on, one home for the
 * CPU backward's tests (test_backward) and the CUDA backward's emulated run
 * (test_cuda_backward_emulated): every score function and order, groups, capacity modes with
 * drops and padding, shared experts (gated or not), the residual MLP, biases, jitter, noise,
 * weight_on_input, and every activation. Sizes are multiples of 16, as CUDA layers need; the
 * shared experts' 96 is also a multiple of 32, as AMX tiles need (test_backward runs the
 * matrix on them). */
#ifndef MOEGEN_TESTS_BACKWARD_MATRIX_H
#define MOEGEN_TESTS_BACKWARD_MATRIX_H

/* The layer shapes every matrix spec shares, then its own lines. */
static const char *const BASE = "num_experts: 8\nhidden_size: 32\nmoe_intermediate_size: 16\n";

typedef struct matrix_spec {
    const char *name;
    const char *yaml; /* after BASE; k and everything else */
} matrix_spec;

static const matrix_spec MATRIX[] __attribute__((unused)) = {
    {"softmax-topk-swiglu", "num_experts_per_tok: 2\nactivation: swiglu\nrouter:\n  aux_loss: megatron\n"},
    {"softmax-first-relu",
     "semantics: deepspeed\nnum_experts_per_tok: 2\nactivation: relu\ncapacity:\n  mode: dropless\n"},
    {"sigmoid-groups-capacity",
     "num_experts_per_tok: 3\nactivation: gelu\nrouter:\n  score_function: sigmoid\n  score_bias: true\n"
     "  router_bias: true\n  norm_topk_prob: true\n  routed_scaling_factor: 2.5\n  n_group: 4\n  topk_group: 2\n"
     "  aux_loss: megatron\ncapacity:\n  capacity_factor: 0.75\n  priority: probs\n  renormalize: true\n"
     "  pad_to_capacity: true\n"},
    {"sqrtsoftplus-gelu-tanh",
     "num_experts_per_tok: 3\nactivation: gelu_tanh\nrouter:\n  score_function: sqrtsoftplus\n"
     "  norm_topk_prob: true\n  aux_loss: megatron\n"},
    {"top1-weight-on-input",
     "semantics: deepspeed\nmode: train\nnum_experts_per_tok: 1\nactivation: silu\nweight_on_input: true\n"
     "router:\n  input_jitter: 0.05\n  seed: 7\ncapacity:\n  capacity_factor: 1.0\n  priority: random\n"},
    {"shared-residual-bias",
     "semantics: deepspeed\nmode: train\nnum_experts_per_tok: 2\nactivation: geglu\nexpert_bias: true\n"
     "use_residual: true\nrouter:\n  noise: rsample\n  seed: 3\nshared_experts:\n  count: 2\n"
     "  intermediate_size: 96\n  gate: true\n"},
    {"groups-zero-max",
     "num_experts_per_tok: 2\nactivation: silu\nrouter:\n  score_function: sigmoid\n  n_group: 4\n"
     "  topk_group: 2\n  group_score: max\n  group_mask: zero\n  aux_loss: deepspeed\n"},
    {"deepspeed-top4",
     "semantics: deepspeed\nnum_experts_per_tok: 4\nactivation: relu\nrouter:\n  router_bias: true\n"
     "capacity:\n  mode: fixed\n  expert_capacity: 3\n  priority: position_choice_major\n"},
    {"shared-ungated",
     "num_experts_per_tok: 2\nactivation: gelu\nexpert_bias: true\nshared_experts:\n  count: 1\n"
     "  intermediate_size: 32\ncapacity:\n  capacity_factor: 1.25\n  priority: position\n"},
};
#define N_MATRIX (sizeof MATRIX / sizeof MATRIX[0])

#endif
