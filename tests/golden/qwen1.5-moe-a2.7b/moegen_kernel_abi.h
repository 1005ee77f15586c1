/* moegen_kernel_abi.h — the contract between generated layer code and its caller.
 *
 * Place in the pipeline: gen emits code against this header; the runtime (or a
 * user's program, in generate-and-link use) calls that code through it. It is
 * copied verbatim beside every generated source (moegen gen -o DIR writes it too),
 * so generated code never needs the moegen source tree to compile.
 *
 * A generated CPU module with symbol prefix P (e.g. "moe_mixtral_8x7b": "moe_" and the layer's ident) exports:
 *   const moegen_kernel_info *P_info(void);
 *   size_t P_workspace_bytes(int64_t n_tokens);
 *   int P_forward(const moegen_kernel_args *args);   0 = ok, <0 = MOEGEN_KERNEL_E*
 * and the three stages P_forward runs, for a caller that moves rows between them (the
 * runtime's expert-parallel layer, runtime/ep.c):
 *   int P_route(const moegen_kernel_args *args, moegen_kernel_plan *plan);
 *       router, capacity and the expert-contiguous permutation of the S tokens over all E
 *       experts; fills every output but y, and `plan` (pointers into the workspace);
 *   int P_experts(const moegen_kernel_expert_args *args);
 *       routed experts [first, first + n) over rows the caller gives (any rows, any
 *       number: a row's result does not depend on the other rows);
 *   int P_combine(const moegen_kernel_args *args);
 *       shared experts, the residual MLP and the combine into y, reading the experts'
 *       outputs from plan->expert_out. Same args (and workspace) as the P_route call.
 *   Bitwise, P_route + P_experts over plan's rows + P_combine == P_forward.
 * and the training backward (docs/numerics.md §8), which reads the workspace a P_forward
 * call left (so the caller keeps that workspace, and the forward's x, until it is done):
 *   size_t P_backward_workspace_bytes(int64_t n_tokens);
 *   int P_backward_data(const moegen_kernel_backward_args *args);
 *       dx, and the per-row gradients the weight gradients need, into args->workspace;
 *   int P_backward_weights(const moegen_kernel_backward_args *args);
 *       the weight gradients, from what P_backward_data left in args->workspace.
 *   The two may run apart (Megatron's split backward: input gradient now, weights later).
 * and the data phase's stages, for a caller that moves the routed rows between them (the
 * expert-parallel layer); bitwise, they equal P_backward_data:
 *   int P_backward_combine(const moegen_kernel_backward_args *args, moegen_kernel_backward_plan *plan);
 *       d loss / d expert output of every kept row (plan->row_do), the dense FFNs' data phase;
 *   int P_backward_experts(const moegen_kernel_expert_backward_args *args);
 *       routed experts over caller-given rows: du from do (any rows; a row's du does not
 *       depend on the other rows), keeping pre-activations and activations in the caller's
 *       scratch for P_backward_experts_weights (their weight gradients over those rows);
 *   int P_backward_route(const moegen_kernel_backward_args *args);
 *       the router's backward and dx, after the caller filled plan->row_du. P_backward_weights
 *       then gives the router's and the dense FFNs' gradients (pass NULL for w1, b1, w2, b2).
 *
 * Tensor layouts (row-major, C order; E experts, k top-k, H hidden, F expert ffn
 * size, F1 = 2F for gated activations (rows [0,F) gate, [F,2F) up) else F;
 * Ns shared experts of size Fs, F1s likewise; "dtype" is the layer dtype, fp32
 * tensors are always float):
 *   x               [S][H]        dtype    input tokens
 *   router_w        [E][H]        fp32     router weight (nn.Linear(H, E).weight)
 *   router_b        [E]           fp32     router bias (router.router_bias)
 *   score_bias      [E]           fp32     selection-only bias (router.score_bias)
 *   w1              [E][F1][H]    dtype    expert up (+gate) projection, [out][in]
 *   b1              [E][F1]       dtype    (expert_bias)
 *   w2              [E][H][F]     dtype    expert down projection, [out][in]
 *   b2              [E][H]        dtype    (expert_bias)
 *   shared_w1       [Ns][F1s][H]  dtype
 *   shared_b1       [Ns][F1s]     dtype    (expert_bias)
 *   shared_w2       [Ns][H][Fs]   dtype
 *   shared_b2       [Ns][H]       dtype    (expert_bias)
 *   shared_gate     [H]           fp32     shared-expert gate (shared_experts.gate)
 *   residual_w1     [F1][H]       dtype    DeepSpeed residual MLP (use_residual)
 *   residual_b1     [F1]          dtype    (expert_bias)
 *   residual_w2     [H][F]        dtype
 *   residual_b2     [H]           dtype    (expert_bias)
 *   residual_coef_w [2][H]        fp32     residual coefficient (nn.Linear(H, 2))
 *   residual_coef_b [2]           fp32
 *   y               [S][H]        dtype    output
 *   topk_ids        [S][k]        int32    chosen experts, in selection order
 *   topk_weights    [S][k]        fp32     combine weight of each route (0 if dropped)
 *   router_weights  [S][k]        fp32     router weight of each route, before capacity
 *   counts_before   [E]           int64    routes per expert before capacity
 *   counts_after    [E]           int64    routes per expert after capacity
 */
#ifndef MOEGEN_KERNEL_ABI_H
#define MOEGEN_KERNEL_ABI_H

#ifdef __CUDACC_RTC__
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
typedef unsigned long size_t;
#else
#include <stddef.h>
#include <stdint.h>
#endif

#define MOEGEN_KERNEL_ABI_VERSION 4

/* Status codes a generated forward returns. */
#define MOEGEN_KERNEL_OK 0
#define MOEGEN_KERNEL_EARG (-1)       /* a required pointer is NULL or a size is negative */
#define MOEGEN_KERNEL_EWORKSPACE (-2) /* workspace smaller than P_workspace_bytes(n_tokens) */
#define MOEGEN_KERNEL_EABI (-3)       /* args->abi_version differs from MOEGEN_KERNEL_ABI_VERSION */
#define MOEGEN_KERNEL_ENOMEM (-4)     /* a per-thread scratch buffer could not be allocated */
#define MOEGEN_KERNEL_ECUDA (-5)      /* CUDA host forward: a CUDA runtime call or launch failed
                                         (cudaGetLastError says which) */

typedef struct moegen_kernel_weights {
    const float *router_w;
    const float *router_b;
    const float *score_bias;
    const void *w1;
    const void *b1;
    const void *w2;
    const void *b2;
    const void *shared_w1;
    const void *shared_b1;
    const void *shared_w2;
    const void *shared_b2;
    const float *shared_gate;
    const void *residual_w1;
    const void *residual_b1;
    const void *residual_w2;
    const void *residual_b2;
    const float *residual_coef_w;
    const float *residual_coef_b;
} moegen_kernel_weights;

typedef struct moegen_kernel_outputs {
    void *y;                 /* required */
    int32_t *topk_ids;       /* optional (NULL = not wanted) */
    float *topk_weights;     /* optional: final combine weights (0 = dropped) */
    float *router_weights;   /* optional: [S][k] weights as the router produced them,
                                before capacity and renormalization */
    int64_t *counts_before;  /* optional */
    int64_t *counts_after;   /* optional */
    int64_t n_dropped;       /* routes dropped by capacity */
    int64_t capacity;        /* C used this call; -1 when dropless */
    double aux_loss;         /* load-balancing loss of the spec's aux_loss kind, unscaled */
    double z_loss;           /* mean over tokens of logsumexp(z)^2 */
} moegen_kernel_outputs;

typedef struct moegen_kernel_args {
    int abi_version;         /* MOEGEN_KERNEL_ABI_VERSION */
    int n_threads;           /* CPU threads; <= 0 = the OpenMP default */
    int64_t n_tokens;        /* S >= 0; any value, no recompile */
    uint64_t rng_offset;     /* mixed into the RNG (e.g. the training step) */
    const void *x;
    const uint8_t *used_token; /* optional [S]: 0 = a padding token, routed but never dispatched
                                  (docs/numerics.md §9); NULL = every token is used */
    moegen_kernel_weights w;
    moegen_kernel_outputs *out;
    void *workspace;         /* 64-byte aligned, P_workspace_bytes(n_tokens) bytes */
    size_t workspace_bytes;
    void *train_keep;        /* training with kept activations: the P_backward_data workspace
                                (P_backward_workspace_bytes(n_tokens)) this forward's backward
                                will use; GEMM1 writes its pre-activations there, and the
                                backward does not recompute them. NULL otherwise. */
} moegen_kernel_args;

/* Weight gradients (docs/numerics.md §8): fp32 whatever the layer dtype, in the layout of the
 * weight each belongs to; NULL = not wanted (or not in this spec). score_bias has none. */
typedef struct moegen_kernel_grads {
    float *router_w, *router_b;
    float *w1, *b1, *w2, *b2;
    float *shared_w1, *shared_b1, *shared_w2, *shared_b2, *shared_gate;
    float *residual_w1, *residual_b1, *residual_w2, *residual_b2;
    float *residual_coef_w, *residual_coef_b;
} moegen_kernel_grads;

typedef struct moegen_kernel_backward_args {
    int abi_version;
    int n_threads;
    const moegen_kernel_args *forward; /* the P_forward call: n_tokens, x, weights, workspace */
    const void *dy;          /* [S][H] dtype: the gradient of the loss with respect to y */
    void *dx;                /* [S][H] dtype, or NULL (P_backward_data) */
    double aux_coeff;        /* the loss is sum(dy . y) + aux_coeff * aux_loss + z_coeff * z_loss */
    double z_coeff;
    void *workspace;         /* 64-byte aligned, P_backward_workspace_bytes(n_tokens) bytes; the
                                same one for P_backward_data and the P_backward_weights after it */
    size_t workspace_bytes;
    moegen_kernel_grads grads; /* P_backward_weights */
    int accumulate;          /* 1: add into grads (fp32 main-grad style); 0: overwrite */
} moegen_kernel_backward_args;

/* Where P_backward_combine left the per-row gradients (pointers into its workspace); rows as
 * in moegen_kernel_plan (expert e's real rows are the first counts_after[e] of its range). */
typedef struct moegen_kernel_backward_plan {
    int64_t n_rows;
    const int64_t *expert_offset; /* [E + 1] */
    const int64_t *counts_after;  /* [E] */
    const float *row_do;          /* [n_rows][H] fp32: d loss / d expert output */
    float *row_du;                /* [n_rows][H] fp32: d loss / d expert input, for the caller to fill */
} moegen_kernel_backward_plan;

/* The backward of routed experts [first, first + n) over caller-given rows, laid out as in
 * moegen_kernel_expert_args; pre and h are the caller's scratch, kept between
 * P_backward_experts and P_backward_experts_weights. */
typedef struct moegen_kernel_expert_backward_args {
    int abi_version;
    int n_threads;
    int first_expert, n_experts;
    const int64_t *expert_offset; /* [n_experts + 1] */
    const void *x;                /* [rows][H] dtype: the rows' inputs */
    const float *row_scale;       /* [rows] (weight_on_input) or NULL */
    const void *w1, *b1, *w2;     /* the n experts' slices; b1 NULL without expert_bias */
    const float *d_out;           /* [rows][H] fp32: d loss / d output */
    float *du;                    /* [rows][H] fp32: d loss / d input (P_backward_experts) */
    float *pre;                   /* [rows][ffn_rows] fp32 scratch */
    void *h;                      /* [rows][ffn] dtype scratch */
    float *g_w1, *g_b1, *g_w2, *g_b2; /* the n experts' gradient slices (P_backward_experts_weights) */
    int accumulate;
} moegen_kernel_expert_backward_args;

/* Where P_route left the permutation; every pointer is into the workspace. Rows are in
 * expert-contiguous order: expert e owns rows [expert_offset[e], expert_offset[e + 1]),
 * of which the first counts_after[e] are real routes (in token order) and the rest, with
 * pad_to_capacity only, padding (row_token -1, never combined). */
typedef struct moegen_kernel_plan {
    int64_t n_rows;
    const int64_t *expert_offset; /* [E + 1] */
    const int64_t *counts_after;  /* [E] real rows of each expert */
    const int32_t *row_token;     /* [n_rows] the token a row reads; -1 = padding */
    const float *row_scale;       /* [n_rows] weight_on_input: the scale of a row's GEMM1; else NULL */
    float *expert_out;            /* [n_rows][H] fp32: what P_combine reads */
} moegen_kernel_plan;

/* Routed experts over caller-given rows: expert first + l (l < n_experts) owns rows
 * [expert_offset[l], expert_offset[l + 1]) of x; its weights are the l-th of w1/b1/w2/b2,
 * which point at expert `first_expert` (a rank's slice of the [E][...] tensors). */
typedef struct moegen_kernel_expert_args {
    int abi_version;
    int n_threads;
    int first_expert, n_experts;
    const int64_t *expert_offset; /* [n_experts + 1] */
    const void *x;                /* [rows][H] dtype */
    const float *row_scale;       /* [rows] (weight_on_input) or NULL */
    const void *w1, *b1, *w2, *b2; /* b1 / b2 NULL without expert_bias */
    void *hidden;                 /* scratch of MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS(rows, n_experts, H, F)
                                     elements of the layer dtype */
    float *out;                   /* [rows][H] fp32 */
} moegen_kernel_expert_args;

/* Elements of scratch P_experts needs for `rows` rows over `n_experts` experts: each
 * expert's rows rounded up to a block of 16 (AMX tiles; the token panels of gemm=outer, at
 * most 16 rows each), and room for the rows' inputs and activations in that layout. */
#define MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS(rows, n_experts, hidden_size, ffn_size) \
    (((size_t)(rows) + 16u * (size_t)(n_experts)) * ((size_t)(hidden_size) + (size_t)(ffn_size)))

/* What a module was generated for; the runtime checks it against the spec it asked for. */
typedef struct moegen_kernel_info {
    int abi_version;
    const char *spec_hash;   /* sha256 hex of the canonical spec */
    const char *variant;     /* variant name */
    int num_experts, top_k;
    int64_t hidden_size, ffn_size, ffn_rows;
    int dtype;               /* 0 fp32, 1 fp16, 2 bf16 */
    const char *kernel_path; /* the instructions the kernels compiled to, e.g. "avx512" */
} moegen_kernel_info;

#endif
