/* moegen.h — the public C API of the moegen runtime.
 *
 * Place in the pipeline: spec -> gen -> [runtime: compile -> cache -> load -> launch].
 * A layer is opened from a spec (file or string); opening validates the spec,
 * renders the templates for the chosen backend, compiles the result (host C
 * compiler into a shared object, or NVRTC), caches it on disk and loads it.
 * The caller then binds weights once and runs forward as often as it likes, with
 * any token count, without recompiling.
 *
 *   moegen_open_options opts;
 *   moegen_open_options_init(&opts);
 *   moegen_layer *layer;
 *   moegen_error err;
 *   if (moegen_layer_open_file("specs/mixtral-8x7b.yaml", &opts, &layer, &err) != MOEGEN_OK)
 *       fprintf(stderr, "%s\n", err.message);
 *   moegen_weights w = {.router_w = ..., .w1 = ..., .w2 = ...};
 *   moegen_layer_bind(layer, &w, &err);
 *   moegen_forward_io io = {.n_tokens = S, .x = x, .y = y};
 *   moegen_forward_stats stats;
 *   moegen_layer_forward(layer, &io, &stats, &err);
 *   moegen_layer_close(layer);
 *
 * Tensor shapes and layouts: moegen_weights and moegen_forward_io below, and the table at
 * the top of moegen_kernel_abi.h (installed beside this header).
 *
 * Threads: different layers may be used from different threads at once. One layer
 * runs one call at a time: a bind or forward that starts while another is running on
 * the same layer returns MOEGEN_ERR_STATE (nothing is raced or corrupted); closing a
 * layer while another thread uses it is the caller's bug. Process-wide state: the CUDA
 * backend keeps a table of loaded modules shared by layers of one spec, and the OpenMP
 * runtime a CPU module loads stays loaded (runtime/cpu_module.h). The on-disk cache is
 * safe across threads and processes. Numbers are parsed and printed in the C locale
 * whatever the host program's locale.
 *
 * Errors: every function returns a moegen_status; when `err` is non-NULL it gets the
 * code and a one-line message.
 */
#ifndef MOEGEN_H
#define MOEGEN_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOEGEN_VERSION "0.1.0"

typedef struct moegen_layer moegen_layer;

typedef enum moegen_device_kind {
    MOEGEN_DEVICE_AUTO = 0, /* CUDA when a driver and a GPU are present, else CPU (with a notice) */
    MOEGEN_DEVICE_CPU = 1,
    MOEGEN_DEVICE_CUDA = 2  /* an error when no usable GPU is present */
} moegen_device_kind;

typedef enum moegen_log_level { MOEGEN_LOG_NOTICE = 0, MOEGEN_LOG_WARNING = 1 } moegen_log_level;

/* Receives notices and warnings (cache trouble, device fallback). */
typedef void (*moegen_log_fn)(void *user, moegen_log_level level, const char *message);

/* ---- Expert parallelism: the communicator a layer with ep_size > 1 uses ----------------- */

typedef struct moegen_comm moegen_comm;

typedef enum moegen_comm_memory {
    MOEGEN_COMM_HOST = 0,  /* the collectives take host buffers (CPU layers; MPI) */
    MOEGEN_COMM_DEVICE = 1 /* device buffers on the layer's stream (CUDA layers; NCCL) */
} moegen_comm_memory;

/* A transport as callbacks (a framework's process group, for instance). Every rank calls
 * every collective in the same order. Each returns 0 on success; on failure it returns
 * non-zero and may write a one-line reason into why[why_size]. Each must return within
 * timeout_s seconds, failing when a peer does not answer by then: moegen never waits
 * longer than a callback does. `stream` is the layer's CUDA stream for device buffers,
 * NULL for host buffers.
 *   alltoall:      send[q*bytes ...] goes to rank q; recv[q*bytes ...] comes from rank q.
 *   alltoallv:     rows of unit_bytes bytes: send_counts[q] rows at send + send_offsets[q]
 *                  rows go to rank q; recv_counts[q] rows from q land at recv +
 *                  recv_offsets[q] rows. Counts and offsets are in rows, int64.
 *   allreduce_max: values[i] = the largest values[i] of any rank, i < n.
 *   allgather:     recv[q*bytes ...] = rank q's send. */
typedef struct moegen_comm_callbacks {
    int (*alltoall)(void *user, const void *send, void *recv, size_t bytes, void *stream, double timeout_s,
                    char *why, size_t why_size);
    int (*alltoallv)(void *user, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                     void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, size_t unit_bytes,
                     void *stream, double timeout_s, char *why, size_t why_size);
    int (*allreduce_max)(void *user, int64_t *values, int n, double timeout_s, char *why, size_t why_size);
    int (*allgather)(void *user, const void *send, void *recv, size_t bytes, double timeout_s, char *why,
                     size_t why_size);
    void (*destroy)(void *user); /* optional: called once by moegen_comm_destroy */
} moegen_comm_callbacks;

/* A communicator of `size` ranks over the caller's callbacks (all four required), for
 * host buffers. This rank is `rank`. The callbacks are copied; `user` is passed back. */
moegen_status moegen_comm_create(int rank, int size, const moegen_comm_callbacks *callbacks, void *user,
                                 moegen_comm **out, moegen_error *err);

/* An NCCL communicator (device buffers) from the 128-byte ncclUniqueId that rank 0
 * made with moegen_comm_nccl_unique_id and the caller broadcast to every rank.
 * libnccl.so.2 is opened with dlopen ($MOEGEN_NCCL_LIB overrides the name); without it
 * this is MOEGEN_ERR_UNSUPPORTED naming the library. */
moegen_status moegen_comm_nccl_unique_id(unsigned char id[128], moegen_error *err);
moegen_status moegen_comm_create_nccl(const unsigned char id[128], int rank, int size, int cuda_device,
                                      moegen_comm **out, moegen_error *err);

/* The deadline of each collective, in seconds (> 0). Default: $MOEGEN_COMM_TIMEOUT, else
 * 300. A collective that misses it fails on this rank with MOEGEN_ERR_COMM, and the
 * communicator is then broken (every later call fails at once). */
moegen_status moegen_comm_set_timeout(moegen_comm *comm, double seconds, moegen_error *err);

/* Rank and size (NULL-safe: -1); the deadline in seconds (NULL-safe: the default);
 * whether a collective failed (then the communicator can only be destroyed, and a
 * program should not wait on its peers any more: e.g. skip MPI_Finalize). */
int moegen_comm_rank(const moegen_comm *comm);
int moegen_comm_size(const moegen_comm *comm);
double moegen_comm_timeout(const moegen_comm *comm);
int moegen_comm_broken(const moegen_comm *comm);

/* Destroy a communicator no layer uses any more (NULL is a no-op). */
void moegen_comm_destroy(moegen_comm *comm);

typedef struct moegen_open_options {
    moegen_device_kind device;
    const char *cache_dir; /* NULL: $MOEGEN_CACHE_DIR, else $XDG_CACHE_HOME/moegen,
                              else $HOME/.cache/moegen */
    int mode;              /* -1: as the spec says; 0: train; 1: eval */
    int n_threads;         /* CPU threads; 0: $OMP_NUM_THREADS, else the CPUs this process may
                              use. Capped (docs/limits.md); negative is an error. */
    const char *arch;      /* CUDA: "sm_80", "sm_90a", ...; NULL: from the device */
    int cuda_device;       /* CUDA device ordinal */
    int compile_timeout_s; /* CPU: time limit of one host compile, after which the compiler
                              is killed and open fails; 0: $MOEGEN_CC_TIMEOUT, else 300 s */
    const char *variant;   /* overrides of the default kernel variant, "name=value" items separated
                              by commas, e.g. "tile_rows=6,gemm=bfdot" (README: "Kernel
                              variants"); an unknown name, a bad value or a variant that does
                              not fit the spec fails open. NULL or "": the default. */
    int tuning;            /* MOEGEN_TUNING_AUTO (0): a CPU layer with ep_size 1 and no `variant`
                              runs the variants a tuning database names for each token count
                              (docs/tuning.md: $MOEGEN_TUNING_DIR, the user's cache, the
                              repository's tuning/); MOEGEN_TUNING_OFF: the default variant */
    int activations;       /* training (moegen_layer_forward_train): MOEGEN_ACTIVATIONS_RECOMPUTE
                              (0): the backward runs the expert GEMM1 again for the
                              pre-activations; MOEGEN_ACTIVATIONS_KEEP: the forward keeps them
                              (more memory per saved forward, one GEMM1 less per step;
                              docs/training.md "Memory"). CPU layers; CUDA layers always
                              recompute (KEEP has no effect there) */
    moegen_comm *comm;     /* expert parallelism: required when the spec's ep_size > 1, and its
                              size must equal ep_size; borrowed, not owned (NULL otherwise) */
    const char *template_dir; /* templates to generate from instead of the ones built into the
                              library: a directory laid out like the source tree's templates/
                              (an installation's copy is <prefix>/share/moegen/templates).
                              NULL: $MOEGEN_TEMPLATE_DIR when set, else the built-in ones. The
                              compile cache keys on the generated code, so edits take effect. */
    moegen_log_fn log;     /* NULL: print to stderr as "moegen: warning: ..." */
    void *log_user;
} moegen_open_options;

enum { MOEGEN_TUNING_AUTO = 0, MOEGEN_TUNING_OFF = 1 };
enum { MOEGEN_ACTIVATIONS_RECOMPUTE = 0, MOEGEN_ACTIVATIONS_KEEP = 1 };

/* Defaults: device AUTO, cache from the environment, mode from the spec. NULL is a no-op. */
void moegen_open_options_init(moegen_open_options *opts);

/* The most CPU threads a layer ever uses, whatever is asked (docs/limits.md). */
#define MOEGEN_THREAD_LIMIT 1024

/* Open a layer from a spec file. `opts` may be NULL (defaults).
 * Returns MOEGEN_OK, MOEGEN_ERR_IO, MOEGEN_ERR_SPEC (message "file:line:col: ..."),
 * MOEGEN_ERR_TEMPLATE, MOEGEN_ERR_COMPILE, MOEGEN_ERR_LOAD, MOEGEN_ERR_UNSUPPORTED,
 * MOEGEN_ERR_DEVICE or MOEGEN_ERR_NO_MEMORY. */
moegen_status moegen_layer_open_file(const char *path, const moegen_open_options *opts,
                                     moegen_layer **out, moegen_error *err);

/* Open a layer from spec text (`len` bytes). `display_name` is used in error
 * locations (NULL: "<string>"). Same returns as moegen_layer_open_file. */
moegen_status moegen_layer_open_string(const char *yaml, size_t len, const char *display_name,
                                       const moegen_open_options *opts, moegen_layer **out,
                                       moegen_error *err);

typedef struct moegen_layer_desc {
    int num_experts, top_k;
    int64_t hidden_size, ffn_size, ffn_rows; /* ffn_rows = 2 * ffn_size when gated */
    int dtype;                               /* 0 fp32, 1 fp16, 2 bf16 */
    int n_shared;
    int64_t shared_ffn_size, shared_ffn_rows;
    moegen_device_kind device;               /* the backend actually used */
    char spec_hash[65];
    char variant[128];                       /* the variant (the first one's, with several) */
    char kernel_path[96];                    /* the instructions the kernels run on, e.g. "avx512";
                                                with several variants the distinct ones, in
                                                token-range order, separated by " | " */
    int n_variants;                          /* modules held: 1, or one per tuned token range */
    char tuning[512];                        /* where the variants came from: "default heuristic
                                                (...)", or "exact: FILE", "family: FILE" and the
                                                token ranges with their variants (docs/tuning.md) */
    char templates[256];                     /* "built-in", or the template directory used */
    char weights[256];                       /* the moegen_weights fields this layer reads (bind
                                                needs them), space-separated, in the order
                                                bind checks them:
                                                "router_w w1 w2" and what the spec adds */
    int cache_hit;                           /* the module came from the on-disk cache */
    int n_threads;                           /* CPU threads forward uses (0 on CUDA) */
    int rank, ep_size;                       /* expert parallelism: this rank of ep_size (0 of 1) */
    int first_expert, n_local_experts;       /* the experts this rank owns and binds */
    double compile_ms;                       /* time to render + compile + load */
} moegen_layer_desc;

moegen_status moegen_layer_describe(const moegen_layer *layer, moegen_layer_desc *desc);

/* Weights, by pointer: the layer keeps the pointers, not copies, so the memory must
 * stay valid until the next bind or close. CPU layers take host pointers; CUDA
 * layers take device pointers. Pointers a spec does not use must be NULL or are
 * ignored; pointers it needs must be non-NULL. Layouts: moegen_kernel_abi.h. */
typedef struct moegen_weights {
    const float *router_w;        /* [E][H] fp32 */
    const float *router_b;        /* [E] fp32          (router.router_bias) */
    const float *score_bias;      /* [E] fp32          (router.score_bias) */
    const void *w1, *b1;          /* [E][F1][H], [E][F1] */
    const void *w2, *b2;          /* [E][H][F],  [E][H] */
    const void *shared_w1, *shared_b1; /* [Ns][F1s][H], [Ns][F1s] */
    const void *shared_w2, *shared_b2; /* [Ns][H][Fs],  [Ns][H] */
    const float *shared_gate;     /* [H] fp32          (shared_experts.gate) */
    const void *residual_w1, *residual_b1; /* [F1][H], [F1] (use_residual) */
    const void *residual_w2, *residual_b2; /* [H][F], [H] */
    const float *residual_coef_w; /* [2][H] fp32 */
    const float *residual_coef_b; /* [2] fp32 */
} moegen_weights;

/* Bind weights. Returns MOEGEN_ERR_INVALID_ARGUMENT naming the first missing
 * tensor the spec needs. */
moegen_status moegen_layer_bind(moegen_layer *layer, const moegen_weights *weights,
                                moegen_error *err);

typedef struct moegen_forward_io {
    int64_t n_tokens;        /* S >= 0 */
    const void *x;           /* [S][H] dtype (may be NULL when S == 0) */
    void *y;                 /* [S][H] dtype (may be NULL when S == 0) */
    int32_t *topk_ids;       /* optional [S][k] */
    float *topk_weights;     /* optional [S][k] final combine weights, 0 for dropped routes */
    float *router_weights;   /* optional [S][k] router weights before capacity */
    int64_t *counts_before;  /* optional [E] */
    int64_t *counts_after;   /* optional [E] */
    uint64_t rng_offset;     /* mixed into jitter / noise / random priority (e.g. step) */
    void *stream;            /* CUDA: a CUstream (NULL = default stream); CPU: ignored */
    const uint8_t *used_token; /* optional [S]: DeepSpeed's used_token padding mask; 0 = the token
                                  is routed but never dispatched or counted (docs/numerics.md
                                  §9). NULL = every token is used. CPU layers only. */
} moegen_forward_io;

typedef struct moegen_forward_stats {
    int64_t n_dropped;       /* routes dropped by capacity */
    int64_t capacity;        /* C used (-1 = dropless) */
    double aux_loss;         /* unscaled load-balancing loss (the spec's aux_loss kind) */
    double z_loss;           /* mean_t logsumexp(z_t)^2 */
    /* ep_size > 1 only (0 otherwise): this rank's traffic and time in each stage */
    uint64_t bytes_sent, bytes_received; /* to / from other ranks, this call */
    int64_t rows_sent, rows_received;   /* token rows dispatched to / from other ranks */
    double route_ms, dispatch_ms, experts_ms, combine_ms; /* dispatch: counts + rows out and back */
} moegen_forward_stats;

/* Run the forward. CUDA layers take device pointers in `io` and run on io->stream
 * without synchronizing with the host, unless `stats` is non-NULL (reading the
 * statistics waits for the stream). `stats` may be NULL. Returns MOEGEN_ERR_STATE before bind
 * or while another call runs on the layer,
 * MOEGEN_ERR_INVALID_ARGUMENT for a negative token count or missing x / y,
 * MOEGEN_ERR_NO_MEMORY if the workspace cannot grow. */
moegen_status moegen_layer_forward(moegen_layer *layer, const moegen_forward_io *io,
                                   moegen_forward_stats *stats, moegen_error *err);

/* ---- Training: forward with saved state, backward (docs/numerics.md §8) -------------------- */

/* What a training forward keeps for its backward: a copy of x and of the used_token mask,
 * the routing, the permutation and the expert outputs (the forward's workspace), and,
 * after moegen_layer_backward, the per-row gradients the weight gradients are made from.
 * The experts' pre-activations are recomputed by the backward (one more GEMM1 pass), or kept
 * by the forward with opts.activations = MOEGEN_ACTIVATIONS_KEEP; the memory of each part is
 * in docs/training.md. The weights bound at the forward must stay
 * unchanged until its backward is done. One layer may have several saved forwards
 * outstanding (micro-batches); each is freed with moegen_saved_free. */
typedef struct moegen_saved moegen_saved;

/* Weight gradients: fp32 whatever the layer dtype, in the layout of the weight each belongs
 * to (moegen_weights). NULL = not wanted. score_bias has no gradient (§8.1). */
typedef struct moegen_grads {
    float *router_w, *router_b;
    float *w1, *b1, *w2, *b2;
    float *shared_w1, *shared_b1, *shared_w2, *shared_b2, *shared_gate;
    float *residual_w1, *residual_b1, *residual_w2, *residual_b2;
    float *residual_coef_w, *residual_coef_b;
    int accumulate; /* 1: add into the buffers (fp32 main-grad style); 0: overwrite them */
} moegen_grads;

typedef struct moegen_backward_io {
    const void *dy;   /* [S][H] layer dtype: d loss / d y (may be NULL when S == 0) */
    void *dx;         /* [S][H] layer dtype, or NULL when not wanted */
    double aux_coeff; /* the loss differentiated is sum(dy . y) + aux_coeff * aux_loss */
    double z_coeff;   /*                                        + z_coeff * z_loss  */
} moegen_backward_io;

/* A forward (exactly moegen_layer_forward's outputs) that also returns, in *saved, what
 * the backward needs. CPU layers, expert-parallel ones included (the backward retraces the
 * exchange: docs/training.md), and CUDA layers with ep_size 1: there the saved state is device
 * memory, the forward, backward and weight gradients run on io->stream and return once queued,
 * and dy, dx and the gradients are device pointers (compiled and run on the host emulator, not
 * yet on a GPU: docs/training.md). Expert-parallel CUDA layers and used_token on CUDA return
 * MOEGEN_ERR_UNSUPPORTED. Same errors as moegen_layer_forward, plus MOEGEN_ERR_NO_MEMORY for
 * the saved state. */
moegen_status moegen_layer_forward_train(moegen_layer *layer, const moegen_forward_io *io, moegen_saved **saved,
                                         moegen_forward_stats *stats, moegen_error *err);

/* The backward of a saved forward: dx (bio->dx) and, when `grads` is non-NULL, every weight
 * gradient it names. With grads == NULL only the input gradient is computed, and the weight
 * gradients follow later with moegen_layer_backward_weights (Megatron's split backward).
 * Gradients do not depend on the thread count. */
moegen_status moegen_layer_backward(moegen_layer *layer, moegen_saved *saved, const moegen_backward_io *bio,
                                    const moegen_grads *grads, moegen_error *err);

/* The weight gradients of a saved forward whose moegen_layer_backward has run. May be called
 * more than once (e.g. accumulating into several buffers). */
moegen_status moegen_layer_backward_weights(moegen_layer *layer, moegen_saved *saved, const moegen_grads *grads,
                                            moegen_error *err);

/* Bytes a saved forward holds (its copy of x, the forward state and, after the backward,
 * the per-row gradients). NULL: 0. */
size_t moegen_saved_bytes(const moegen_saved *saved);

/* Free a saved forward (NULL is a no-op), before closing its layer. A CUDA one waits for its
 * stream first. */
void moegen_saved_free(moegen_saved *saved);

/* Close a layer (NULL is a no-op). */
void moegen_layer_close(moegen_layer *layer);

#ifdef __cplusplus
}
#endif
#endif
