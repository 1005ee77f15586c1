/* spec.h — the MoE layer spec: YAML text in, a validated, normalized spec out.
 *
 * Place in the pipeline: spec -> gen (templates) -> compile -> load -> launch.
 * This is the first stage. Everything downstream (templates, runtime, reference)
 * reads a `moegen_spec` that has passed moegen_spec_parse(), so every field here is
 * in range, every cross-field rule holds and every preset default is resolved.
 *
 * Invariants owned here:
 *  - A spec that fails validation never leaves this module: the caller gets a status
 *    and `file:line:col: message` lines in the error struct (every independent error,
 *    see moegen_spec_parse), never a partial spec.
 *  - A spec that passes may carry warnings (`warnings`): it is valid, but probably not
 *    what was meant. Warnings never change the spec, its canonical form or its hash.
 *  - `name` holds only [A-Za-z][A-Za-z0-9_.-]{0,63}; `ident` is its C-identifier
 *    form. Free text (`source`, `description`) is kept for display only and is
 *    never part of the canonical form or of generated code.
 *  - The canonical form lists every resolved field in one fixed order, so a spec
 *    reordered or re-commented has the same canonical text and the same hash.
 */
#ifndef MOEGEN_GEN_SPEC_H
#define MOEGEN_GEN_SPEC_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

/* Limits on spec input (documented in specs/README.md). */
#define MOEGEN_SPEC_MAX_BYTES (1u << 20) /* 1 MiB of YAML */
#define MOEGEN_SPEC_MAX_DEPTH 32         /* nesting of mappings/sequences */
#define MOEGEN_SPEC_MAX_NODES 4096       /* scalars + collections */
#define MOEGEN_SPEC_MAX_SCALAR 4096      /* bytes in one scalar */
#define MOEGEN_SPEC_MAX_NAME 64          /* bytes in `name` */
#define MOEGEN_SPEC_WARNINGS_BYTES MOEGEN_ERROR_MESSAGE_BYTES /* `warnings`, NUL included */

/* Limits on values. */
#define MOEGEN_MAX_EXPERTS 1024
#define MOEGEN_MAX_TOP_K 64
#define MOEGEN_MAX_HIDDEN 65536
#define MOEGEN_MAX_FFN 262144
#define MOEGEN_MAX_SHARED_EXPERTS 16
#define MOEGEN_SIZE_ALIGN 16 /* hidden and ffn sizes are multiples of this */
/* A fixed capacity with pad_to_capacity makes every call process E x C rows: E x C must
 * fit the kernels' 32-bit row indices, and those rows' expert buffers (at least 4 H +
 * elem F1 + 8 bytes each) must stay under MOEGEN_MAX_PADDED_BYTES. */
#define MOEGEN_MAX_PADDED_ROWS 2147483647LL
#define MOEGEN_MAX_PADDED_BYTES (1ULL << 40) /* 1 TiB */

typedef enum { MOEGEN_DTYPE_FP32 = 0, MOEGEN_DTYPE_FP16, MOEGEN_DTYPE_BF16 } moegen_dtype;

typedef enum {
    MOEGEN_ACT_RELU = 0,
    MOEGEN_ACT_GELU,      /* exact erf form */
    MOEGEN_ACT_GELU_TANH, /* tanh approximation */
    MOEGEN_ACT_SILU,
    MOEGEN_ACT_SWIGLU, /* gated: silu(gate) * up */
    MOEGEN_ACT_GEGLU   /* gated: gelu(gate) * up */
} moegen_activation;

typedef enum { MOEGEN_SEMANTICS_MEGATRON = 0, MOEGEN_SEMANTICS_DEEPSPEED } moegen_semantics;
typedef enum { MOEGEN_MODE_TRAIN = 0, MOEGEN_MODE_EVAL } moegen_mode;

typedef enum { MOEGEN_SCORE_SOFTMAX = 0, MOEGEN_SCORE_SIGMOID, MOEGEN_SCORE_SQRTSOFTPLUS } moegen_score_fn;
typedef enum { MOEGEN_ORDER_SOFTMAX_THEN_TOPK = 0, MOEGEN_ORDER_TOPK_THEN_SOFTMAX } moegen_order;
typedef enum { MOEGEN_GROUP_SCORE_TOPM_SUM = 0, MOEGEN_GROUP_SCORE_MAX } moegen_group_score;
typedef enum { MOEGEN_GROUP_MASK_NEG_INF = 0, MOEGEN_GROUP_MASK_ZERO } moegen_group_mask;
typedef enum { MOEGEN_NOISE_NONE = 0, MOEGEN_NOISE_RSAMPLE } moegen_noise;
typedef enum { MOEGEN_AUX_NONE = 0, MOEGEN_AUX_DEEPSPEED, MOEGEN_AUX_MEGATRON } moegen_aux_loss;

typedef enum { MOEGEN_CAP_DROPLESS = 0, MOEGEN_CAP_FACTOR, MOEGEN_CAP_FIXED } moegen_capacity_mode;
typedef enum { MOEGEN_CAP_FORMULA_DEEPSPEED = 0, MOEGEN_CAP_FORMULA_MEGATRON } moegen_capacity_formula;
typedef enum {
    MOEGEN_PRIORITY_PROBS = 0,
    MOEGEN_PRIORITY_POSITION,              /* token-major: first C routes in token order */
    MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR, /* all first choices, then all second, ... */
    MOEGEN_PRIORITY_RANDOM                 /* seeded uniform priority per route (RTS) */
} moegen_priority;

typedef struct moegen_router_spec {
    moegen_score_fn score_function;
    moegen_order order;            /* softmax only */
    int norm_topk_prob;            /* divide the k weights by their sum */
    double routed_scaling_factor;  /* multiply the weights after normalization */
    int n_group;                   /* 1 = no group limit */
    int topk_group;                /* groups kept */
    int group_topm;                /* group score = sum of its top-m scores */
    moegen_group_score group_score;
    moegen_group_mask group_mask;  /* how experts of dropped groups are masked */
    int score_bias;                /* per-expert selection bias (weights: score_bias[E]) */
    int router_bias;               /* z = x.Wg + b (weights: router_b[E]) */
    double input_jitter;           /* eps; 0 = off; train mode only */
    moegen_noise noise;            /* train mode only */
    uint64_t seed;                 /* RNG seed for jitter, noise, random priority */
    moegen_aux_loss aux_loss;
} moegen_router_spec;

typedef struct moegen_capacity_spec {
    moegen_capacity_mode mode;
    double capacity_factor;        /* train */
    double eval_capacity_factor;   /* eval */
    int64_t expert_capacity;       /* fixed mode */
    int64_t min_capacity;          /* deepspeed formula */
    moegen_capacity_formula formula;
    moegen_priority priority;
    int renormalize;               /* renormalize surviving weights per token after dropping */
    int pad_to_capacity;           /* every expert processes exactly C rows */
} moegen_capacity_spec;

typedef struct moegen_shared_spec {
    int count;                     /* 0 = none */
    int64_t intermediate_size;     /* per shared expert */
    int gate;                      /* scale by sigmoid(x . w_gate) */
} moegen_shared_spec;

typedef struct moegen_spec {
    char name[MOEGEN_SPEC_MAX_NAME + 1];  /* validated, see above */
    char ident[MOEGEN_SPEC_MAX_NAME + 1]; /* C identifier form of name */
    char *source;                         /* free text or NULL; display only */
    char *description;                    /* free text or NULL; display only */

    moegen_semantics semantics;
    int num_experts;                      /* E */
    int top_k;                            /* k */
    int64_t hidden_size;                  /* H */
    int64_t moe_intermediate_size;        /* F */
    moegen_activation activation;
    moegen_dtype dtype;
    int ep_size;
    moegen_mode mode;
    int expert_bias;                      /* b1[E,F1], b2[E,H] */
    int weight_on_input;                  /* Llama-4: expert sees w*x, output unweighted */
    int use_residual;                     /* DeepSpeed residual MoE */

    moegen_router_spec router;
    moegen_capacity_spec capacity;
    moegen_shared_spec shared;

    /* Warnings: the spec is valid but probably not what was meant (specs/README.md,
     * "Errors and warnings"). One "<display_path>:<line>:<col>: <message>" a line, in file
     * order, no trailing newline; "" when there are none. Bounded like an error message:
     * when they do not all fit, the last line is "... and N more". `warning_count` counts
     * them all. Display only: not part of the canonical form or the hash. */
    int warning_count;
    char warnings[MOEGEN_SPEC_WARNINGS_BYTES];
} moegen_spec;

/* Where a spec came from, for error locations. `display_path` is printed in
 * messages (e.g. "specs/x.yaml" or "<string>"). */

/* Parse and validate YAML text. On success *out is filled (free with
 * moegen_spec_free), out->warnings lists any warnings, and MOEGEN_OK is returned.
 * On failure returns MOEGEN_ERR_SPEC (or MOEGEN_ERR_NO_MEMORY) and err->message holds
 * every independent error, one "<display_path>:<line>:<col>: <message>" a line:
 *  - the first line is the first error found, the one this function has always
 *    reported alone (values are checked before the rules between them);
 *  - the other errors follow in file order, then a last line "<N> errors";
 *  - lines that do not fit in the message become "... and <K> more" (before the count).
 * A bad byte or YAML syntax error (and any error in the YAML structure but duplicate
 * keys and non-string keys) stops the parse: it is the last error. An error that makes
 * a later check meaningless (a bad num_experts, say) skips that check instead of adding
 * a follow-on error. `text` need not be NUL-terminated. */
moegen_status moegen_spec_parse(const char *text, size_t len, const char *display_path,
                                moegen_spec *out, moegen_error *err);

/* Read a file (size-limited) and parse it. I/O failures -> MOEGEN_ERR_IO. */
moegen_status moegen_spec_load_file(const char *path, moegen_spec *out, moegen_error *err);

void moegen_spec_free(moegen_spec *spec);

/* Canonical form: every resolved field, fixed order, YAML text, ends in '\n'.
 * Returns a malloc'd string (NULL on out of memory). */
char *moegen_spec_canonical(const moegen_spec *spec);

/* SHA-256 of the canonical form as 64 lowercase hex chars + NUL. */
void moegen_spec_hash(const moegen_spec *spec, char hex[65]);

/* Derived sizes. */
int64_t moegen_spec_ffn_rows(const moegen_spec *spec);        /* F1 = F or 2F if gated */
int moegen_activation_is_gated(moegen_activation act);
const char *moegen_dtype_name(moegen_dtype dt);                /* "fp32" ... */
size_t moegen_dtype_size(moegen_dtype dt);                     /* 4 or 2 */
const char *moegen_activation_name(moegen_activation act);

/* Names of the enums as they appear in YAML (for canonical form, templates, docs). */
const char *moegen_score_fn_name(moegen_score_fn v);
const char *moegen_order_name(moegen_order v);
const char *moegen_group_score_name(moegen_group_score v);
const char *moegen_group_mask_name(moegen_group_mask v);
const char *moegen_noise_name(moegen_noise v);
const char *moegen_aux_loss_name(moegen_aux_loss v);
const char *moegen_capacity_mode_name(moegen_capacity_mode v);
const char *moegen_capacity_formula_name(moegen_capacity_formula v);
const char *moegen_priority_name(moegen_priority v);
const char *moegen_semantics_name(moegen_semantics v);
const char *moegen_mode_name(moegen_mode v);

#endif
