/* spec.c — the spec loader: YAML text in, a validated, fully resolved moegen_spec out.
 *
 * Place in the pipeline: spec -> gen -> compile -> load -> launch. This is the first
 * stage; everything downstream trusts what it produces (see spec.h).
 *
 * A spec is read in four passes. The first two stop at the first problem (nothing after
 * a bad byte or a YAML syntax error can be trusted; a duplicate key is the exception);
 * the last two report every problem:
 *  1. Byte pre-scan: size limit, UTF-8 validity, no NUL bytes, no control characters
 *     other than tab, LF and CR. libyaml never sees bytes that fail here.
 *  2. Events to tree: libyaml's event API (never its document loader) feeds a small
 *     node tree under our own limits on depth, node count and scalar size. Anchors,
 *     aliases and tags are refused at the first one; duplicate keys are refused at the
 *     second occurrence, at every level, before the schema is consulted (that key is
 *     reported and left out, and the tree goes on being built).
 *  3. Schema walk: one table of field descriptors (field_table) says for every key its
 *     section, kind, storage, range and enum names. A single general mechanism parses
 *     a scalar by its kind under a strict grammar and stores it through the offset.
 *     A key that is unknown or whose value is bad is reported and the walk goes on; a
 *     bad value marks its field "unknown".
 *  4. Resolution: static defaults from the table, preset and derived defaults, then
 *     applicability (a field set explicitly where it has no effect is an error) and
 *     the cross-field rules. A field whose value is unknown gets a safe placeholder, a
 *     default derived from an unknown field is unknown too, and a check that reads an
 *     unknown field (or needs a rule that failed, such as n_group dividing E before
 *     E / n_group is used) is skipped, so one mistake gives one error.
 * A spec that passes all four is then checked for warnings (check_warnings): valid
 * layers that are probably not what was meant. They never fail a parse.
 *
 * Errors: the first one found is kept exactly as the loader has always reported it
 * (first_error); the later ones are sorted into file order and appended as further
 * lines, bounded by moegen_error's message size (join_diagnostics).
 *
 * The canonical form is written from the same table, in table order, listing only the
 * fields that apply (field_applies() decides both the error and the omission), so
 * key order, comments, whitespace, quoting style and irrelevant fields cannot change
 * the canonical text or its hash.
 *
 * Invariants owned here:
 *  - On failure the caller's spec is all zero and owns nothing; the error message is
 *    "<display_path>:<line>:<col>: <message>" with 1-based line and column, one line per
 *    error, with a last line "<N> errors" when there is more than one.
 *  - On success every field is in range, every cross-field rule holds, every default
 *    is resolved, and every field that does not apply holds the value that resolution
 *    gives it when it is not written (so parse(canonical(s)) equals s field by field).
 *  - Text from the spec reaches error messages only through quote_for_message(), which
 *    escapes everything but printable ASCII and truncates.
 *
 * Floats are read with strtod and written with printf; the public entry points switch
 * this thread to the C locale for the call (gen/c_locale.h), so a host program's
 * setlocale() cannot change what a spec means or its hash.
 */
#include "spec.h"
#include "c_locale.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "sha256.h"

#define COUNT_OF(array) (sizeof(array) / sizeof((array)[0]))

/* Bytes of user text quoted in one error message. */
#define QUOTE_VISIBLE_BYTES 48
/* Unknown keys and enum values longer than this get no did-you-mean suggestion. */
#define SUGGEST_MAX_BYTES 64
/* The canonical form is about 1 KiB; this leaves ample room. */
#define CANONICAL_MAX_BYTES 4096

/* Enums are stored through an int (memcpy), so they must be int-sized. */
_Static_assert(sizeof(moegen_dtype) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_activation) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_semantics) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_mode) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_score_fn) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_order) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_group_score) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_group_mask) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_noise) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_aux_loss) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_capacity_mode) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_capacity_formula) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(moegen_priority) == sizeof(int), "enums are stored as int");

/* ---- enum vocabularies (YAML spelling, indexed by enum value) ------------------------ */

static const char *const semantics_names[] = {"megatron", "deepspeed"};
static const char *const activation_names[] = {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"};
static const char *const dtype_names[] = {"fp32", "fp16", "bf16"};
static const char *const mode_names[] = {"train", "eval"};
static const char *const score_fn_names[] = {"softmax", "sigmoid", "sqrtsoftplus"};
static const char *const order_names[] = {"softmax_then_topk", "topk_then_softmax"};
static const char *const group_score_names[] = {"topm_sum", "max"};
static const char *const group_mask_names[] = {"neg_inf", "zero"};
static const char *const noise_names[] = {"none", "rsample"};
static const char *const aux_loss_names[] = {"none", "deepspeed", "megatron"};
static const char *const capacity_mode_names[] = {"dropless", "factor", "fixed"};
static const char *const capacity_formula_names[] = {"deepspeed", "megatron"};
static const char *const priority_names[] = {"probs", "position", "position_choice_major", "random"};

static const char *enum_name(const char *const *names, size_t count, int value) {
    if (value < 0 || (size_t)value >= count)
        return "unknown";
    return names[value];
}

/* ---- the schema ------------------------------------------------------------------- */

typedef enum spec_section {
    SECTION_TOP = 0,
    SECTION_ROUTER,
    SECTION_CAPACITY,
    SECTION_SHARED,
    SECTION_COUNT
} spec_section;

/* One id per entry of field_table, in canonical order. */
typedef enum field_id {
    FIELD_NAME = 0,
    FIELD_SOURCE,
    FIELD_DESCRIPTION,
    FIELD_SEMANTICS,
    FIELD_NUM_EXPERTS,
    FIELD_TOP_K,
    FIELD_HIDDEN_SIZE,
    FIELD_MOE_INTERMEDIATE_SIZE,
    FIELD_ACTIVATION,
    FIELD_DTYPE,
    FIELD_EP_SIZE,
    FIELD_MODE,
    FIELD_EXPERT_BIAS,
    FIELD_WEIGHT_ON_INPUT,
    FIELD_USE_RESIDUAL,
    FIELD_ROUTER,
    FIELD_CAPACITY,
    FIELD_SHARED_EXPERTS,
    FIELD_SCORE_FUNCTION,
    FIELD_ORDER,
    FIELD_NORM_TOPK_PROB,
    FIELD_ROUTED_SCALING_FACTOR,
    FIELD_N_GROUP,
    FIELD_TOPK_GROUP,
    FIELD_GROUP_TOPM,
    FIELD_GROUP_SCORE,
    FIELD_GROUP_MASK,
    FIELD_SCORE_BIAS,
    FIELD_ROUTER_BIAS,
    FIELD_INPUT_JITTER,
    FIELD_NOISE,
    FIELD_SEED,
    FIELD_AUX_LOSS,
    FIELD_CAPACITY_MODE,
    FIELD_CAPACITY_FACTOR,
    FIELD_EVAL_CAPACITY_FACTOR,
    FIELD_EXPERT_CAPACITY,
    FIELD_CAPACITY_FORMULA,
    FIELD_MIN_CAPACITY,
    FIELD_PRIORITY,
    FIELD_RENORMALIZE,
    FIELD_PAD_TO_CAPACITY,
    FIELD_SHARED_COUNT,
    FIELD_SHARED_INTERMEDIATE_SIZE,
    FIELD_SHARED_GATE,
    FIELD_COUNT
} field_id;

typedef enum field_kind {
    KIND_INTEGER,
    KIND_FLOAT,
    KIND_BOOLEAN,
    KIND_ENUM,
    KIND_NAME, /* the `name` grammar */
    KIND_TEXT, /* free text, display only */
    KIND_SECTION
} field_kind;

typedef enum field_storage {
    STORE_NONE = 0,
    STORE_INT,    /* int: counts, booleans, enums */
    STORE_INT64,  /* int64_t */
    STORE_UINT64, /* uint64_t */
    STORE_DOUBLE,
    STORE_NAME, /* char[MOEGEN_SPEC_MAX_NAME + 1] */
    STORE_TEXT  /* char *, malloc'd */
} field_storage;

enum field_flags {
    FLAG_REQUIRED = 1u << 0,        /* no default: the spec must give it */
    FLAG_DERIVED_DEFAULT = 1u << 1, /* default depends on the preset or other fields */
    FLAG_ALIGNED = 1u << 2,         /* integer must be a multiple of MOEGEN_SIZE_ALIGN */
    FLAG_MIN_EXCLUSIVE = 1u << 3,   /* float must be > float_min (else >=) */
    FLAG_MAX_EXCLUSIVE = 1u << 4,   /* float must be < float_max (else <=) */
    FLAG_SOFT = 1u << 5,            /* may be written where it does not apply; then reset */
    FLAG_DISPLAY_ONLY = 1u << 6     /* never part of the canonical form */
};

typedef struct field_descriptor {
    spec_section section;  /* the mapping the key lives in */
    const char *key;       /* YAML key inside its section */
    const char *qualified; /* "router.n_group": used in messages */
    field_kind kind;
    field_storage storage;
    size_t offset; /* into moegen_spec */
    const char *const *enum_names;
    size_t enum_count;
    int64_t int_min, int_max;
    double float_min, float_max;
    const char *range_text; /* floats: how the range reads in a message */
    int64_t default_int;    /* integers, booleans, enums */
    double default_float;
    unsigned flags;
    spec_section opens; /* KIND_SECTION: the section it opens */
} field_descriptor;

#define AT(section_id, key_text, qualified_text, member)                                       \
    .section = section_id, .key = key_text, .qualified = qualified_text,                      \
    .offset = offsetof(moegen_spec, member)
#define INTEGER(store, low, high) .kind = KIND_INTEGER, .storage = store, .int_min = low, .int_max = high
#define NUMBER(low, high, text) \
    .kind = KIND_FLOAT, .storage = STORE_DOUBLE, .float_min = low, .float_max = high, .range_text = text
#define BOOLEAN .kind = KIND_BOOLEAN, .storage = STORE_INT
#define ENUM(names) .kind = KIND_ENUM, .storage = STORE_INT, .enum_names = names, .enum_count = COUNT_OF(names)
#define SECTION(key_text, section_id)                                                          \
    .section = SECTION_TOP, .key = key_text, .qualified = key_text, .kind = KIND_SECTION,     \
    .opens = section_id

static const field_descriptor field_table[FIELD_COUNT] = {
    [FIELD_NAME] = {AT(SECTION_TOP, "name", "name", name), .kind = KIND_NAME, .storage = STORE_NAME,
                    .flags = FLAG_REQUIRED},
    [FIELD_SOURCE] = {AT(SECTION_TOP, "source", "source", source), .kind = KIND_TEXT,
                      .storage = STORE_TEXT, .flags = FLAG_DISPLAY_ONLY},
    [FIELD_DESCRIPTION] = {AT(SECTION_TOP, "description", "description", description),
                           .kind = KIND_TEXT, .storage = STORE_TEXT, .flags = FLAG_DISPLAY_ONLY},
    [FIELD_SEMANTICS] = {AT(SECTION_TOP, "semantics", "semantics", semantics), ENUM(semantics_names),
                         .default_int = MOEGEN_SEMANTICS_MEGATRON},
    [FIELD_NUM_EXPERTS] = {AT(SECTION_TOP, "num_experts", "num_experts", num_experts),
                           INTEGER(STORE_INT, 1, MOEGEN_MAX_EXPERTS), .flags = FLAG_REQUIRED},
    [FIELD_TOP_K] = {AT(SECTION_TOP, "num_experts_per_tok", "num_experts_per_tok", top_k),
                     INTEGER(STORE_INT, 1, MOEGEN_MAX_TOP_K), .flags = FLAG_REQUIRED},
    [FIELD_HIDDEN_SIZE] = {AT(SECTION_TOP, "hidden_size", "hidden_size", hidden_size),
                           INTEGER(STORE_INT64, MOEGEN_SIZE_ALIGN, MOEGEN_MAX_HIDDEN),
                           .flags = FLAG_REQUIRED | FLAG_ALIGNED},
    [FIELD_MOE_INTERMEDIATE_SIZE] = {AT(SECTION_TOP, "moe_intermediate_size", "moe_intermediate_size",
                                        moe_intermediate_size),
                                     INTEGER(STORE_INT64, MOEGEN_SIZE_ALIGN, MOEGEN_MAX_FFN),
                                     .flags = FLAG_REQUIRED | FLAG_ALIGNED},
    [FIELD_ACTIVATION] = {AT(SECTION_TOP, "activation", "activation", activation), ENUM(activation_names),
                          .default_int = MOEGEN_ACT_SWIGLU},
    [FIELD_DTYPE] = {AT(SECTION_TOP, "dtype", "dtype", dtype), ENUM(dtype_names),
                     .default_int = MOEGEN_DTYPE_BF16},
    [FIELD_EP_SIZE] = {AT(SECTION_TOP, "ep_size", "ep_size", ep_size),
                       INTEGER(STORE_INT, 1, MOEGEN_MAX_EXPERTS), .default_int = 1},
    [FIELD_MODE] = {AT(SECTION_TOP, "mode", "mode", mode), ENUM(mode_names), .default_int = MOEGEN_MODE_EVAL},
    [FIELD_EXPERT_BIAS] = {AT(SECTION_TOP, "expert_bias", "expert_bias", expert_bias), BOOLEAN},
    [FIELD_WEIGHT_ON_INPUT] = {AT(SECTION_TOP, "weight_on_input", "weight_on_input", weight_on_input),
                               BOOLEAN},
    [FIELD_USE_RESIDUAL] = {AT(SECTION_TOP, "use_residual", "use_residual", use_residual), BOOLEAN},
    [FIELD_ROUTER] = {SECTION("router", SECTION_ROUTER)},
    [FIELD_CAPACITY] = {SECTION("capacity", SECTION_CAPACITY)},
    [FIELD_SHARED_EXPERTS] = {SECTION("shared_experts", SECTION_SHARED)},

    [FIELD_SCORE_FUNCTION] = {AT(SECTION_ROUTER, "score_function", "router.score_function",
                                 router.score_function),
                              ENUM(score_fn_names), .default_int = MOEGEN_SCORE_SOFTMAX},
    [FIELD_ORDER] = {AT(SECTION_ROUTER, "order", "router.order", router.order), ENUM(order_names),
                     .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_NORM_TOPK_PROB] = {AT(SECTION_ROUTER, "norm_topk_prob", "router.norm_topk_prob",
                                 router.norm_topk_prob),
                              BOOLEAN},
    [FIELD_ROUTED_SCALING_FACTOR] = {AT(SECTION_ROUTER, "routed_scaling_factor",
                                        "router.routed_scaling_factor", router.routed_scaling_factor),
                                     NUMBER(0.0, 1e6, "> 0 and <= 1e6"), .default_float = 1.0,
                                     .flags = FLAG_MIN_EXCLUSIVE},
    [FIELD_N_GROUP] = {AT(SECTION_ROUTER, "n_group", "router.n_group", router.n_group),
                       INTEGER(STORE_INT, 1, MOEGEN_MAX_EXPERTS), .default_int = 1},
    [FIELD_TOPK_GROUP] = {AT(SECTION_ROUTER, "topk_group", "router.topk_group", router.topk_group),
                          INTEGER(STORE_INT, 1, MOEGEN_MAX_EXPERTS), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_GROUP_TOPM] = {AT(SECTION_ROUTER, "group_topm", "router.group_topm", router.group_topm),
                          INTEGER(STORE_INT, 1, MOEGEN_MAX_EXPERTS), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_GROUP_SCORE] = {AT(SECTION_ROUTER, "group_score", "router.group_score", router.group_score),
                           ENUM(group_score_names), .default_int = MOEGEN_GROUP_SCORE_TOPM_SUM},
    [FIELD_GROUP_MASK] = {AT(SECTION_ROUTER, "group_mask", "router.group_mask", router.group_mask),
                          ENUM(group_mask_names), .default_int = MOEGEN_GROUP_MASK_NEG_INF},
    [FIELD_SCORE_BIAS] = {AT(SECTION_ROUTER, "score_bias", "router.score_bias", router.score_bias),
                          BOOLEAN},
    [FIELD_ROUTER_BIAS] = {AT(SECTION_ROUTER, "router_bias", "router.router_bias", router.router_bias),
                           BOOLEAN},
    [FIELD_INPUT_JITTER] = {AT(SECTION_ROUTER, "input_jitter", "router.input_jitter", router.input_jitter),
                            NUMBER(0.0, 1.0, ">= 0 and < 1"), .flags = FLAG_MAX_EXCLUSIVE},
    [FIELD_NOISE] = {AT(SECTION_ROUTER, "noise", "router.noise", router.noise), ENUM(noise_names),
                     .default_int = MOEGEN_NOISE_NONE},
    [FIELD_SEED] = {AT(SECTION_ROUTER, "seed", "router.seed", router.seed),
                    INTEGER(STORE_UINT64, 0, INT64_MAX), .flags = FLAG_SOFT},
    [FIELD_AUX_LOSS] = {AT(SECTION_ROUTER, "aux_loss", "router.aux_loss", router.aux_loss),
                        ENUM(aux_loss_names), .flags = FLAG_DERIVED_DEFAULT},

    [FIELD_CAPACITY_MODE] = {AT(SECTION_CAPACITY, "mode", "capacity.mode", capacity.mode),
                             ENUM(capacity_mode_names), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_CAPACITY_FACTOR] = {AT(SECTION_CAPACITY, "capacity_factor", "capacity.capacity_factor",
                                  capacity.capacity_factor),
                               NUMBER(0.0, 1e6, "> 0 and <= 1e6"), .default_float = 1.0,
                               .flags = FLAG_MIN_EXCLUSIVE},
    [FIELD_EVAL_CAPACITY_FACTOR] = {AT(SECTION_CAPACITY, "eval_capacity_factor",
                                       "capacity.eval_capacity_factor", capacity.eval_capacity_factor),
                                    NUMBER(0.0, 1e6, "> 0 and <= 1e6"),
                                    .flags = FLAG_MIN_EXCLUSIVE | FLAG_DERIVED_DEFAULT},
    [FIELD_EXPERT_CAPACITY] = {AT(SECTION_CAPACITY, "expert_capacity", "capacity.expert_capacity",
                                  capacity.expert_capacity),
                               INTEGER(STORE_INT64, 1, INT32_MAX)},
    [FIELD_CAPACITY_FORMULA] = {AT(SECTION_CAPACITY, "formula", "capacity.formula", capacity.formula),
                                ENUM(capacity_formula_names), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_MIN_CAPACITY] = {AT(SECTION_CAPACITY, "min_capacity", "capacity.min_capacity",
                               capacity.min_capacity),
                            INTEGER(STORE_INT64, 0, INT32_MAX), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_PRIORITY] = {AT(SECTION_CAPACITY, "priority", "capacity.priority", capacity.priority),
                        ENUM(priority_names), .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_RENORMALIZE] = {AT(SECTION_CAPACITY, "renormalize", "capacity.renormalize",
                              capacity.renormalize),
                           BOOLEAN, .flags = FLAG_DERIVED_DEFAULT},
    [FIELD_PAD_TO_CAPACITY] = {AT(SECTION_CAPACITY, "pad_to_capacity", "capacity.pad_to_capacity",
                                  capacity.pad_to_capacity),
                               BOOLEAN},

    [FIELD_SHARED_COUNT] = {AT(SECTION_SHARED, "count", "shared_experts.count", shared.count),
                            INTEGER(STORE_INT, 0, MOEGEN_MAX_SHARED_EXPERTS)},
    [FIELD_SHARED_INTERMEDIATE_SIZE] = {AT(SECTION_SHARED, "intermediate_size",
                                           "shared_experts.intermediate_size", shared.intermediate_size),
                                        INTEGER(STORE_INT64, MOEGEN_SIZE_ALIGN, MOEGEN_MAX_FFN),
                                        .flags = FLAG_ALIGNED},
    [FIELD_SHARED_GATE] = {AT(SECTION_SHARED, "gate", "shared_experts.gate", shared.gate), BOOLEAN},
};

#undef AT
#undef INTEGER
#undef NUMBER
#undef BOOLEAN
#undef ENUM
#undef SECTION

/* Names other systems use for our keys: an exact match gets this hint instead of a
 * did-you-mean. */
typedef struct key_alias {
    const char *alias;
    const char *origin;
    field_id target;
} key_alias;

static const key_alias key_aliases[] = {
    {"num_local_experts", "the Hugging Face name", FIELD_NUM_EXPERTS},
    {"n_routed_experts", "the Hugging Face name", FIELD_NUM_EXPERTS},
    {"intermediate_size", "the Hugging Face name", FIELD_MOE_INTERMEDIATE_SIZE},
    {"scoring_func", "the Hugging Face name", FIELD_SCORE_FUNCTION},
    {"n_shared_experts", "the Hugging Face name", FIELD_SHARED_COUNT},
    {"shared_expert_intermediate_size", "the Hugging Face name", FIELD_SHARED_INTERMEDIATE_SIZE},
    {"hidden_act", "the Hugging Face name", FIELD_ACTIVATION},
    {"e_score_correction_bias", "the Hugging Face name", FIELD_SCORE_BIAS},
    {"torch_dtype", "the Hugging Face name", FIELD_DTYPE},
    {"top_k", "a common name", FIELD_TOP_K},
    {"k", "the DeepSpeed name", FIELD_TOP_K},
    {"num_moe_experts", "the Megatron name", FIELD_NUM_EXPERTS},
    {"moe_router_topk", "the Megatron name", FIELD_TOP_K},
    {"moe_ffn_hidden_size", "the Megatron name", FIELD_MOE_INTERMEDIATE_SIZE},
};

/* Enum spellings other systems use: an exact match becomes the did-you-mean. */
typedef struct value_alias {
    field_id field;
    const char *alias;
    const char *value;
} value_alias;

static const value_alias value_aliases[] = {
    {FIELD_DTYPE, "float32", "fp32"},         {FIELD_DTYPE, "float", "fp32"},
    {FIELD_DTYPE, "float16", "fp16"},         {FIELD_DTYPE, "half", "fp16"},
    {FIELD_DTYPE, "bfloat16", "bf16"},        {FIELD_ACTIVATION, "swish", "silu"},
    {FIELD_ACTIVATION, "gelu_new", "gelu_tanh"}, {FIELD_ACTIVATION, "gelu_pytorch_tanh", "gelu_tanh"},
};

/* ---- the node tree ------------------------------------------------------------------ */

typedef enum node_kind { NODE_SCALAR, NODE_SEQUENCE, NODE_MAPPING } node_kind;

typedef struct spec_node {
    node_kind kind;
    int line, column; /* 1-based */
    int quoted;       /* scalar: any style but plain */
    int block;        /* scalar: literal (|) or folded (>) style */
    int ignored;      /* a mapping key already reported (duplicate, not a string): the walk skips it */
    char *text;       /* scalar: NUL-terminated copy */
    size_t text_bytes;
    int first_child, last_child, next_sibling; /* indices; -1 = none */
    int child_count;                           /* mappings: keys and values alternate */
} spec_node;

typedef struct spec_tree {
    spec_node *nodes;
    int count, capacity;
    int root; /* -1 until the first node */
} spec_tree;

/* Where a field was written (positions of its key and value), if it was. */
typedef struct field_given {
    int is_set;
    int key_line, key_column;
    int value_line, value_column;
} field_given;

/* One error or warning, as it will be printed: "<path>:<line>:<col>: <message>". */
typedef struct spec_diagnostic {
    int line, column;
    int sequence; /* order of detection: breaks ties between equal positions */
    char *text;   /* malloc'd */
} spec_diagnostic;

/* A growing list of diagnostics. Storing one never fails the parse: an entry that
 * cannot be stored for want of memory is only counted (`lost`). */
typedef struct diagnostic_list {
    spec_diagnostic *items;
    int count, capacity;
    int lost;
} diagnostic_list;

typedef struct spec_reader {
    const char *path;
    const char *text;
    size_t bytes;
    moegen_error *err;
    spec_tree tree;
    field_given given[FIELD_COUNT];
    /* The field's value is not known: written with a bad value, required and missing, in
     * a section that is not a mapping, or derived from such a field. Checks that read it
     * are skipped. */
    unsigned char unknown[FIELD_COUNT];
    /* An unknown key was reported with this field as its "did you mean". */
    unsigned char meant[FIELD_COUNT];
    moegen_spec spec;
    int error_count;                               /* every error found */
    char first_error[MOEGEN_ERROR_MESSAGE_BYTES];  /* the first, exactly as reported alone */
    diagnostic_list later_errors;                  /* the others */
    diagnostic_list warnings;
} spec_reader;

static const char *node_kind_noun(node_kind kind) {
    switch (kind) {
    case NODE_SCALAR: return "a scalar";
    case NODE_SEQUENCE: return "a sequence";
    case NODE_MAPPING: return "a mapping";
    }
    return "a node";
}

/* ---- messages ---------------------------------------------------------------------- */

static void diagnostics_add(diagnostic_list *list, int line, int column, int sequence, const char *text) {
    size_t bytes = strlen(text) + 1;
    char *copy;
    if (list->count == list->capacity) {
        int capacity = list->capacity ? list->capacity * 2 : 16;
        spec_diagnostic *grown = realloc(list->items, (size_t)capacity * sizeof *grown);
        if (!grown) {
            list->lost++;
            return;
        }
        list->items = grown;
        list->capacity = capacity;
    }
    copy = malloc(bytes);
    if (!copy) {
        list->lost++;
        return;
    }
    memcpy(copy, text, bytes);
    list->items[list->count].line = line;
    list->items[list->count].column = column;
    list->items[list->count].sequence = sequence;
    list->items[list->count].text = copy;
    list->count++;
}

static void diagnostics_free(diagnostic_list *list) {
    int index;
    for (index = 0; index < list->count; index++)
        free(list->items[index].text);
    free(list->items);
    memset(list, 0, sizeof *list);
}

static int compare_diagnostics(const void *left_pointer, const void *right_pointer) {
    const spec_diagnostic *left = left_pointer, *right = right_pointer;
    if (left->line != right->line)
        return left->line < right->line ? -1 : 1;
    if (left->column != right->column)
        return left->column < right->column ? -1 : 1;
    return (left->sequence > right->sequence) - (left->sequence < right->sequence);
}

/* "<path>:<line>:<col>: <message>", cut to fit moegen_error's message as a lone error
 * always was. */
static void format_diagnostic(const spec_reader *reader, int line, int column, const char *format, va_list args,
                              char out[MOEGEN_ERROR_MESSAGE_BYTES]) {
    char message[MOEGEN_ERROR_MESSAGE_BYTES];
    vsnprintf(message, sizeof message, format, args);
    /* cut like the message itself: a long path or message loses its end */
    if (snprintf(out, MOEGEN_ERROR_MESSAGE_BYTES, "%s:%d:%d: %s", reader->path, line, column, message) < 0)
        out[0] = '\0';
}

/* Record an error at line:column and return MOEGEN_ERR_SPEC. The caller decides whether
 * to go on: the byte pre-scan and the tree builder stop, the schema walk and the rules
 * go on. */
static moegen_status reader_fail(spec_reader *reader, int line, int column, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

static moegen_status reader_fail(spec_reader *reader, int line, int column, const char *format, ...) {
    char entry[MOEGEN_ERROR_MESSAGE_BYTES];
    va_list args;
    va_start(args, format);
    format_diagnostic(reader, line, column, format, args, entry);
    va_end(args);
    if (reader->error_count == 0)
        memcpy(reader->first_error, entry, sizeof entry);
    else
        diagnostics_add(&reader->later_errors, line, column, reader->error_count, entry);
    reader->error_count++;
    return MOEGEN_ERR_SPEC;
}

/* Record a warning at line:column (the spec is valid but probably not what was meant). */
static void reader_warn(spec_reader *reader, int line, int column, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

static void reader_warn(spec_reader *reader, int line, int column, const char *format, ...) {
    char entry[MOEGEN_ERROR_MESSAGE_BYTES];
    va_list args;
    va_start(args, format);
    format_diagnostic(reader, line, column, format, args, entry);
    va_end(args);
    diagnostics_add(&reader->warnings, line, column, reader->warnings.count + reader->warnings.lost, entry);
}

/* Append `text` as a line of out[size] if the whole line fits with `reserve` bytes to
 * spare; returns 1 if it was appended. */
static int append_line(char *out, size_t size, size_t *used, const char *text, size_t reserve) {
    size_t bytes = strlen(text), separator = *used > 0 ? 1 : 0;
    if (*used + separator + bytes + reserve >= size)
        return 0;
    if (separator)
        out[(*used)++] = '\n';
    memcpy(out + *used, text, bytes + 1);
    *used += bytes;
    return 1;
}

/* Bytes the line "... and <hidden> more" takes with its line break (0 when none hidden). */
static size_t more_line_bytes(int hidden) {
    return hidden > 0 ? (size_t)snprintf(NULL, 0, "\n... and %d more", hidden) : 0;
}

/* Join diagnostics into out[size] (at most size - 1 bytes and a NUL), one a line:
 * `first` (if not NULL) exactly as it is, then the list in file order while whole lines
 * fit, then "... and N more" for those that did not (or were lost), then, with
 * `count_noun`, "<total> <count_noun>" when there is more than one. Room for the closing
 * lines is kept while the list is written. */
static void join_diagnostics(const char *first, diagnostic_list *list, int total, const char *count_noun,
                             char *out, size_t size) {
    char count_line[64] = "", more_line[64];
    size_t used = 0, count_reserve = 0;
    int shown = 0, index;
    out[0] = '\0';
    if (count_noun && total > 1) {
        snprintf(count_line, sizeof count_line, "%d %s", total, count_noun);
        count_reserve = strlen(count_line) + 1;
    }
    if (first) {
        snprintf(out, size, "%s", first);
        used = strlen(out);
        shown = 1;
    }
    if (list->count > 1)
        qsort(list->items, (size_t)list->count, sizeof list->items[0], compare_diagnostics);
    for (index = 0; index < list->count; index++) {
        if (!append_line(out, size, &used, list->items[index].text,
                         count_reserve + more_line_bytes(total - shown - 1)))
            break;
        shown++;
    }
    if (total > shown) {
        snprintf(more_line, sizeof more_line, "... and %d more", total - shown);
        append_line(out, size, &used, more_line, count_reserve);
    }
    if (count_line[0])
        append_line(out, size, &used, count_line, 0);
}

/* Out of memory stops the parse at once; the message replaces any errors found so far. */
static moegen_status reader_out_of_memory(spec_reader *reader) {
    return moegen_error_set(reader->err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory reading the spec",
                            reader->path);
}

/* Copy user text for a message: printable ASCII as is, everything else as \xNN,
 * cut after QUOTE_VISIBLE_BYTES input bytes with "...". */
static void quote_for_message(const char *text, size_t bytes, char *out, size_t out_size) {
    size_t used = 0;
    size_t index;
    for (index = 0; index < bytes && index < QUOTE_VISIBLE_BYTES; index++) {
        unsigned char byte = (unsigned char)text[index];
        if (used + 5 >= out_size)
            break;
        if (byte >= 0x20 && byte < 0x7f) {
            out[used++] = (char)byte;
        } else {
            snprintf(out + used, out_size - used, "\\x%02x", byte);
            used += 4;
        }
    }
    if (index < bytes && used + 4 < out_size) {
        memcpy(out + used, "...", 3);
        used += 3;
    }
    out[used] = '\0';
}

/* ---- byte pre-scan ------------------------------------------------------------------ */

/* Decode one UTF-8 sequence; returns its length, or 0 if it is invalid (overlong,
 * surrogate, above U+10FFFF, truncated). */
static size_t decode_utf8(const unsigned char *bytes, size_t available, uint32_t *code_point) {
    unsigned char lead = bytes[0];
    size_t length, index;
    uint32_t value, smallest;
    if (lead >= 0xc2 && lead <= 0xdf) {
        length = 2, value = lead & 0x1fu, smallest = 0x80;
    } else if (lead >= 0xe0 && lead <= 0xef) {
        length = 3, value = lead & 0x0fu, smallest = 0x800;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
        length = 4, value = lead & 0x07u, smallest = 0x10000;
    } else {
        return 0;
    }
    if (available < length)
        return 0;
    for (index = 1; index < length; index++) {
        if ((bytes[index] & 0xc0) != 0x80)
            return 0;
        value = (value << 6) | (bytes[index] & 0x3fu);
    }
    if (value < smallest || value > 0x10ffff || (value >= 0xd800 && value <= 0xdfff))
        return 0;
    *code_point = value;
    return length;
}

static int is_byte_order_mark(const unsigned char *bytes, size_t available) {
    return available >= 3 && bytes[0] == 0xef && bytes[1] == 0xbb && bytes[2] == 0xbf;
}

/* Reject bytes libyaml should never see, reporting line:col (columns count code points,
 * as libyaml's do). Line breaks are LF, CR LF and lone CR. */
static moegen_status prescan_bytes(spec_reader *reader) {
    const unsigned char *text = (const unsigned char *)reader->text;
    size_t offset = 0;
    int line = 1, column = 1;
    if (is_byte_order_mark(text, reader->bytes))
        offset = 3; /* libyaml skips it and does not count it */
    while (offset < reader->bytes) {
        unsigned char byte = text[offset];
        uint32_t code_point;
        size_t length;
        if (byte == '\n' || byte == '\r') {
            if (byte == '\r' && offset + 1 < reader->bytes && text[offset + 1] == '\n')
                offset++;
            offset++, line++, column = 1;
            continue;
        }
        if (byte == 0)
            return reader_fail(reader, line, column, "NUL byte (0x00) in the spec; a spec is UTF-8 text");
        if (byte < 0x80) {
            if ((byte < 0x20 && byte != '\t') || byte == 0x7f)
                return reader_fail(reader, line, column,
                                   "control character 0x%02X in the spec (only tab, LF and CR are allowed)",
                                   byte);
            offset++, column++;
            continue;
        }
        length = decode_utf8(text + offset, reader->bytes - offset, &code_point);
        if (length == 0)
            return reader_fail(reader, line, column, "invalid UTF-8 (byte 0x%02X); a spec is UTF-8 text", byte);
        if (code_point <= 0x9f)
            return reader_fail(reader, line, column,
                               "control character U+%04X in the spec (only tab, LF and CR are allowed)",
                               (unsigned)code_point);
        if (code_point == 0xfffe || code_point == 0xffff)
            return reader_fail(reader, line, column, "U+%04X is not a character", (unsigned)code_point);
        offset += length, column++;
    }
    return MOEGEN_OK;
}

/* Byte offset of a 1-based line and column (code points), or the end of the text. */
static size_t offset_of_position(const spec_reader *reader, int line, int column) {
    const unsigned char *text = (const unsigned char *)reader->text;
    size_t offset = is_byte_order_mark(text, reader->bytes) ? 3 : 0;
    int current_line = 1, current_column = 1;
    while (offset < reader->bytes && current_line < line) {
        unsigned char byte = text[offset++];
        if (byte == '\r' && offset < reader->bytes && text[offset] == '\n')
            offset++;
        if (byte == '\n' || byte == '\r')
            current_line++;
    }
    while (offset < reader->bytes && current_column < column && text[offset] != '\n' && text[offset] != '\r') {
        offset++;
        while (offset < reader->bytes && (text[offset] & 0xc0) == 0x80)
            offset++;
        current_column++;
    }
    return offset;
}

/* 1-based line and column of a byte offset. */
static void position_of_offset(const spec_reader *reader, size_t target, int *line, int *column) {
    const unsigned char *text = (const unsigned char *)reader->text;
    size_t offset = is_byte_order_mark(text, reader->bytes) ? 3 : 0;
    *line = 1, *column = 1;
    while (offset < target && offset < reader->bytes) {
        unsigned char byte = text[offset++];
        if (byte == '\r' && offset < reader->bytes && text[offset] == '\n' && offset < target)
            offset++;
        if (byte == '\n' || byte == '\r')
            (*line)++, *column = 1;
        else if ((byte & 0xc0) != 0x80)
            (*column)++;
    }
}

/* ---- events to tree ----------------------------------------------------------------- */

/* `skipped`: bytes before the text libyaml was given (a byte order mark). */
static moegen_status report_yaml_error(spec_reader *reader, const yaml_parser_t *parser, size_t skipped) {
    int line, column;
    const char *problem = parser->problem ? parser->problem : "unknown problem";
    switch (parser->error) {
    case YAML_MEMORY_ERROR:
        return reader_out_of_memory(reader);
    case YAML_READER_ERROR:
        position_of_offset(reader, parser->problem_offset + skipped, &line, &column);
        return reader_fail(reader, line, column, "unreadable input: %s", problem);
    case YAML_SCANNER_ERROR:
    case YAML_PARSER_ERROR:
        line = (int)parser->problem_mark.line + 1;
        column = (int)parser->problem_mark.column + 1;
        if (parser->context)
            return reader_fail(reader, line, column, "YAML syntax error: %s (%s at line %d, column %d)", problem,
                               parser->context, (int)parser->context_mark.line + 1,
                               (int)parser->context_mark.column + 1);
        return reader_fail(reader, line, column, "YAML syntax error: %s", problem);
    default:
        return reader_fail(reader, (int)parser->problem_mark.line + 1, (int)parser->problem_mark.column + 1,
                           "YAML error: %s", problem);
    }
}

/* An anchor or a tag on a node: name the one written first, as written. */
static moegen_status report_node_property(spec_reader *reader, const yaml_mark_t *mark, const yaml_char_t *anchor,
                                          const yaml_char_t *tag) {
    int line = (int)mark->line + 1, column = (int)mark->column + 1;
    size_t start = offset_of_position(reader, line, column), end = start;
    char quoted[QUOTE_VISIBLE_BYTES * 4 + 8];
    const char *what;
    while (end < reader->bytes && !strchr(" \t\r\n,[]{}", reader->text[end]))
        end++;
    if (start < reader->bytes && (reader->text[start] == '&' || reader->text[start] == '!')) {
        what = reader->text[start] == '&' ? "anchor" : "tag";
        quote_for_message(reader->text + start, end - start, quoted, sizeof quoted);
    } else if (anchor) {
        what = "anchor";
        quoted[0] = '&';
        quote_for_message((const char *)anchor, strlen((const char *)anchor), quoted + 1, sizeof quoted - 1);
    } else {
        what = "tag";
        quote_for_message((const char *)tag, strlen((const char *)tag), quoted, sizeof quoted);
    }
    return reader_fail(reader, line, column, "%s '%s' not supported (a spec uses no anchors, aliases or tags)",
                       what, quoted);
}

/* Append a node and set *index to it. */
static moegen_status tree_add_node(spec_reader *reader, node_kind kind, const yaml_mark_t *mark, int *index) {
    spec_tree *tree = &reader->tree;
    spec_node *node;
    if (tree->count >= MOEGEN_SPEC_MAX_NODES)
        return reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                           "more than %d YAML nodes (the limit for a spec)", MOEGEN_SPEC_MAX_NODES);
    if (tree->count == tree->capacity) {
        int capacity = tree->capacity ? tree->capacity * 2 : 64;
        spec_node *grown = realloc(tree->nodes, (size_t)capacity * sizeof *grown);
        if (!grown)
            return reader_out_of_memory(reader);
        tree->nodes = grown;
        tree->capacity = capacity;
    }
    node = &tree->nodes[tree->count];
    memset(node, 0, sizeof *node);
    node->kind = kind;
    node->line = (int)mark->line + 1;
    node->column = (int)mark->column + 1;
    node->first_child = node->last_child = node->next_sibling = -1;
    *index = tree->count++;
    return MOEGEN_OK;
}

static void tree_free(spec_tree *tree) {
    int index;
    for (index = 0; index < tree->count; index++)
        free(tree->nodes[index].text);
    free(tree->nodes);
    memset(tree, 0, sizeof *tree);
}

/* Link `child` under `parent` (-1: it is the root). A key of a mapping must be a
 * scalar that no earlier key of the same mapping spells; one that is not is reported,
 * linked all the same (with its value, so keys and values keep alternating) and marked
 * `ignored`, and the tree goes on being built. */
static moegen_status tree_attach(spec_reader *reader, int parent, int child) {
    spec_node *nodes = reader->tree.nodes;
    spec_node *container, *node = &nodes[child];
    if (parent < 0) {
        reader->tree.root = child;
        return MOEGEN_OK;
    }
    container = &nodes[parent];
    if (container->kind == NODE_MAPPING && container->child_count % 2 == 0) {
        int key;
        if (node->kind != NODE_SCALAR) {
            reader_fail(reader, node->line, node->column, "a key must be a plain string, not %s",
                        node_kind_noun(node->kind));
            node->ignored = 1;
        }
        for (key = container->first_child; key >= 0 && !node->ignored;
             key = nodes[nodes[key].next_sibling].next_sibling) {
            if (!nodes[key].ignored && nodes[key].text_bytes == node->text_bytes &&
                memcmp(nodes[key].text, node->text, node->text_bytes) == 0) {
                char quoted[QUOTE_VISIBLE_BYTES * 4 + 8];
                quote_for_message(node->text, node->text_bytes, quoted, sizeof quoted);
                reader_fail(reader, node->line, node->column, "duplicate key '%s' (first defined at line %d)", quoted,
                            nodes[key].line);
                node->ignored = 1;
            }
        }
    }
    if (container->last_child >= 0)
        nodes[container->last_child].next_sibling = child;
    else
        container->first_child = child;
    container->last_child = child;
    container->child_count++;
    return MOEGEN_OK;
}

static moegen_status tree_add_scalar(spec_reader *reader, const yaml_event_t *event, int parent) {
    const yaml_mark_t *mark = &event->start_mark;
    size_t length = event->data.scalar.length;
    spec_node *node;
    moegen_status status;
    int index = -1;
    if (length > MOEGEN_SPEC_MAX_SCALAR)
        return reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                           "a value of %zu bytes (the limit is %d bytes)", length, MOEGEN_SPEC_MAX_SCALAR);
    status = tree_add_node(reader, NODE_SCALAR, mark, &index);
    if (status != MOEGEN_OK)
        return status;
    node = &reader->tree.nodes[index];
    node->quoted = event->data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
    node->block = event->data.scalar.style == YAML_LITERAL_SCALAR_STYLE ||
                  event->data.scalar.style == YAML_FOLDED_SCALAR_STYLE;
    node->text = malloc(length + 1);
    if (!node->text)
        return reader_out_of_memory(reader);
    memcpy(node->text, event->data.scalar.value, length);
    node->text[length] = '\0';
    node->text_bytes = length;
    return tree_attach(reader, parent, index);
}

/* Run libyaml's event parser over the text and build the tree. */
static moegen_status read_tree(spec_reader *reader) {
    yaml_parser_t parser;
    yaml_event_t event;
    int stack[MOEGEN_SPEC_MAX_DEPTH];
    int depth = 0, documents = 0, finished = 0;
    size_t skipped;
    moegen_status status = MOEGEN_OK;

    if (!yaml_parser_initialize(&parser))
        return reader_out_of_memory(reader);
    /* With the encoding set, libyaml does not look for a byte order mark: skip it here.
     * Lines and columns are unaffected (a mark is never counted). */
    skipped = is_byte_order_mark((const unsigned char *)reader->text, reader->bytes) ? 3 : 0;
    yaml_parser_set_input_string(&parser, (const unsigned char *)reader->text + skipped, reader->bytes - skipped);
    yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);

    while (status == MOEGEN_OK && !finished) {
        const yaml_mark_t *mark;
        int parent = depth > 0 ? stack[depth - 1] : -1;
        if (!yaml_parser_parse(&parser, &event)) {
            status = report_yaml_error(reader, &parser, skipped);
            break;
        }
        mark = &event.start_mark;
        switch (event.type) {
        case YAML_STREAM_END_EVENT:
            finished = 1;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (documents > 0)
                status = reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                                     "a second YAML document; a spec is exactly one document");
            else if (event.data.document_start.tag_directives.start != event.data.document_start.tag_directives.end)
                status = reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                                     "%%TAG directive not supported (a spec uses no tags)");
            documents++;
            break;
        case YAML_ALIAS_EVENT: {
            char quoted[QUOTE_VISIBLE_BYTES * 4 + 8];
            const char *anchor = (const char *)event.data.alias.anchor;
            quote_for_message(anchor, strlen(anchor), quoted, sizeof quoted);
            status = reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                                 "alias '*%s' not supported (a spec uses no anchors, aliases or tags)", quoted);
            break;
        }
        case YAML_SCALAR_EVENT:
            if (event.data.scalar.anchor || event.data.scalar.tag)
                status = report_node_property(reader, mark, event.data.scalar.anchor, event.data.scalar.tag);
            else
                status = tree_add_scalar(reader, &event, parent);
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT: {
            int is_mapping = event.type == YAML_MAPPING_START_EVENT;
            const yaml_char_t *anchor =
                is_mapping ? event.data.mapping_start.anchor : event.data.sequence_start.anchor;
            const yaml_char_t *tag = is_mapping ? event.data.mapping_start.tag : event.data.sequence_start.tag;
            int index = -1;
            if (anchor || tag) {
                status = report_node_property(reader, mark, anchor, tag);
                break;
            }
            if (depth >= MOEGEN_SPEC_MAX_DEPTH) {
                status = reader_fail(reader, (int)mark->line + 1, (int)mark->column + 1,
                                     "nesting deeper than %d levels (the limit for a spec)", MOEGEN_SPEC_MAX_DEPTH);
                break;
            }
            status = tree_add_node(reader, is_mapping ? NODE_MAPPING : NODE_SEQUENCE, mark, &index);
            if (status != MOEGEN_OK)
                break;
            status = tree_attach(reader, parent, index);
            stack[depth++] = index;
            break;
        }
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            depth--;
            break;
        default: /* stream start, document end, no event */
            break;
        }
        yaml_event_delete(&event);
    }
    yaml_parser_delete(&parser);
    if (status == MOEGEN_OK && documents == 0)
        status = reader_fail(reader, 1, 1, "empty spec (no YAML content, only blank lines or comments)");
    return status;
}

/* ---- scalar grammars ---------------------------------------------------------------- */

static int scalar_is_null(const spec_node *node) {
    static const char *const null_words[] = {"", "~", "null", "Null", "NULL"};
    size_t index;
    if (node->kind != NODE_SCALAR || node->quoted)
        return 0;
    for (index = 0; index < COUNT_OF(null_words); index++)
        if (strcmp(node->text, null_words[index]) == 0)
            return 1;
    return 0;
}

/* -?(0|[1-9][0-9]*) */
static int matches_integer(const char *text) {
    if (*text == '-')
        text++;
    if (*text == '0')
        return text[1] == '\0';
    if (*text < '1' || *text > '9')
        return 0;
    while (*text >= '0' && *text <= '9')
        text++;
    return *text == '\0';
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? */
static int matches_float(const char *text) {
    if (*text == '-')
        text++;
    if (*text == '0') {
        text++;
    } else if (*text >= '1' && *text <= '9') {
        while (*text >= '0' && *text <= '9')
            text++;
    } else {
        return 0;
    }
    if (*text == '.') {
        text++;
        if (*text < '0' || *text > '9')
            return 0;
        while (*text >= '0' && *text <= '9')
            text++;
    }
    if (*text == 'e' || *text == 'E') {
        text++;
        if (*text == '-' || *text == '+')
            text++;
        if (*text < '0' || *text > '9')
            return 0;
        while (*text >= '0' && *text <= '9')
            text++;
    }
    return *text == '\0';
}

/* Text already matches the integer grammar; 0 on int64 overflow. */
static int parse_int64(const char *text, int64_t *value) {
    int negative = *text == '-';
    uint64_t magnitude = 0, limit = negative ? (uint64_t)INT64_MAX + 1u : (uint64_t)INT64_MAX;
    if (negative)
        text++;
    for (; *text; text++) {
        unsigned digit = (unsigned)(*text - '0');
        if (magnitude > (limit - digit) / 10u)
            return 0;
        magnitude = magnitude * 10u + digit;
    }
    if (negative)
        *value = magnitude == (uint64_t)INT64_MAX + 1u ? INT64_MIN : -(int64_t)magnitude;
    else
        *value = (int64_t)magnitude;
    return 1;
}

/* [A-Za-z][A-Za-z0-9_.-]{0,63} */
static int matches_name(const char *text, size_t bytes) {
    size_t index;
    if (bytes == 0 || bytes > MOEGEN_SPEC_MAX_NAME || strlen(text) != bytes)
        return 0;
    if (!((text[0] >= 'A' && text[0] <= 'Z') || (text[0] >= 'a' && text[0] <= 'z')))
        return 0;
    for (index = 1; index < bytes; index++) {
        char c = text[index];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
              c == '-'))
            return 0;
    }
    return 1;
}

/* 0 if a value holds NUL or a control character other than tab and LF (an escape in
 * a double-quoted scalar can produce them; the pre-scan saw only the escape). */
static int scalar_is_clean(const spec_node *node) {
    size_t index;
    for (index = 0; index < node->text_bytes; index++) {
        unsigned char byte = (unsigned char)node->text[index];
        if ((byte < 0x20 && byte != '\t' && byte != '\n') || byte == 0x7f)
            return 0;
        if (byte == 0xc2 && index + 1 < node->text_bytes && (unsigned char)node->text[index + 1] <= 0x9f)
            return 0; /* U+0080..U+009F */
    }
    return 1;
}

/* "'8.0'", "the quoted string '8'" or "the block text '...'": how a scalar reads in a
 * message. */
static void describe_scalar(const spec_node *node, char *out, size_t out_size) {
    char quoted[QUOTE_VISIBLE_BYTES * 4 + 8];
    const char *format = node->block ? "the block text '%s'" : node->quoted ? "the quoted string '%s'" : "'%s'";
    quote_for_message(node->text, node->text_bytes, quoted, sizeof quoted);
    snprintf(out, out_size, format, quoted);
}

static size_t minimum_of(size_t a, size_t b) { return a < b ? a : b; }

static char lower_ascii(char c) { return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c; }

/* Edit distance (insert, delete, substitute; ASCII case ignored, so "SwiGLU" is close
 * to "swiglu"), or SIZE_MAX for long inputs. Used only for suggestions. */
static size_t edit_distance(const char *left, const char *right) {
    size_t row[SUGGEST_MAX_BYTES + 1];
    size_t left_bytes = strlen(left), right_bytes = strlen(right), i, j;
    if (left_bytes > SUGGEST_MAX_BYTES || right_bytes > SUGGEST_MAX_BYTES)
        return SIZE_MAX;
    for (j = 0; j <= right_bytes; j++)
        row[j] = j;
    for (i = 1; i <= left_bytes; i++) {
        size_t diagonal = row[0];
        row[0] = i;
        for (j = 1; j <= right_bytes; j++) {
            size_t above = row[j];
            size_t substitute = diagonal + (lower_ascii(left[i - 1]) != lower_ascii(right[j - 1]));
            row[j] = minimum_of(minimum_of(above + 1, row[j - 1] + 1), substitute);
            diagonal = above;
        }
    }
    return row[right_bytes];
}

/* Close enough to suggest: at most 2 edits, or a third of the word. */
static int close_enough(size_t distance, const char *word) {
    size_t allowed = strlen(word) / 3;
    return distance <= (allowed > 2 ? allowed : 2);
}

/* ---- storing values through the table ------------------------------------------------ */

static void field_store_integer(moegen_spec *spec, field_id id, int64_t value) {
    const field_descriptor *field = &field_table[id];
    char *target = (char *)spec + field->offset;
    switch (field->storage) {
    case STORE_INT: {
        int narrow = (int)value;
        memcpy(target, &narrow, sizeof narrow);
        break;
    }
    case STORE_INT64:
        memcpy(target, &value, sizeof value);
        break;
    case STORE_UINT64: {
        uint64_t wide = (uint64_t)value;
        memcpy(target, &wide, sizeof wide);
        break;
    }
    default:
        break;
    }
}

static int64_t field_load_integer(const moegen_spec *spec, field_id id) {
    const field_descriptor *field = &field_table[id];
    const char *source = (const char *)spec + field->offset;
    switch (field->storage) {
    case STORE_INT: {
        int narrow;
        memcpy(&narrow, source, sizeof narrow);
        return narrow;
    }
    case STORE_INT64: {
        int64_t wide;
        memcpy(&wide, source, sizeof wide);
        return wide;
    }
    case STORE_UINT64: {
        uint64_t wide;
        memcpy(&wide, source, sizeof wide);
        return (int64_t)wide;
    }
    default:
        return 0;
    }
}

static void field_store_float(moegen_spec *spec, field_id id, double value) {
    memcpy((char *)spec + field_table[id].offset, &value, sizeof value);
}

static double field_load_float(const moegen_spec *spec, field_id id) {
    double value;
    memcpy(&value, (const char *)spec + field_table[id].offset, sizeof value);
    return value;
}

/* The table default of a field (its value when not written, before derived defaults). */
static void field_store_default(moegen_spec *spec, field_id id) {
    const field_descriptor *field = &field_table[id];
    if (field->storage == STORE_DOUBLE)
        field_store_float(spec, id, field->default_float);
    else if (field->storage == STORE_INT || field->storage == STORE_INT64 || field->storage == STORE_UINT64)
        field_store_integer(spec, id, field->default_int);
}

/* ---- reading one value -------------------------------------------------------------- */

static moegen_status read_integer(spec_reader *reader, field_id id, const spec_node *value) {
    const field_descriptor *field = &field_table[id];
    char found[QUOTE_VISIBLE_BYTES * 4 + 32];
    int64_t number;
    describe_scalar(value, found, sizeof found);
    if (value->quoted)
        return reader_fail(reader, value->line, value->column,
                           "%s: expected an integer, found %s (write numbers without quotes)", field->qualified,
                           found);
    if (!matches_integer(value->text))
        return reader_fail(reader, value->line, value->column,
                           "%s: expected an integer in plain decimal digits (an optional '-'; no '+', leading "
                           "zeros, '_', '.', exponent or hex), found %s",
                           field->qualified, found);
    if (!parse_int64(value->text, &number))
        return reader_fail(reader, value->line, value->column, "%s: %s does not fit in a 64-bit integer",
                           field->qualified, found);
    if (number < field->int_min || number > field->int_max)
        return reader_fail(reader, value->line, value->column, "%s: %lld is out of range (%lld..%lld)",
                           field->qualified, (long long)number, (long long)field->int_min,
                           (long long)field->int_max);
    if ((field->flags & FLAG_ALIGNED) && number % MOEGEN_SIZE_ALIGN != 0)
        return reader_fail(reader, value->line, value->column,
                           "%s: %lld is not a multiple of %d (the GPU kernels step through it in %d-element "
                           "vectors)",
                           field->qualified, (long long)number, MOEGEN_SIZE_ALIGN, MOEGEN_SIZE_ALIGN);
    field_store_integer(&reader->spec, id, number);
    return MOEGEN_OK;
}

static moegen_status read_float(spec_reader *reader, field_id id, const spec_node *value) {
    const field_descriptor *field = &field_table[id];
    char found[QUOTE_VISIBLE_BYTES * 4 + 32];
    double number;
    int below, above;
    describe_scalar(value, found, sizeof found);
    if (value->quoted)
        return reader_fail(reader, value->line, value->column,
                           "%s: expected a number, found %s (write numbers without quotes)", field->qualified, found);
    if (!matches_float(value->text))
        return reader_fail(reader, value->line, value->column,
                           "%s: expected a number like 1.0, 0.25 or 1e-3 (no '.inf', '.nan', '1.', '.5' or '+'), "
                           "found %s",
                           field->qualified, found);
    errno = 0;
    number = strtod(value->text, NULL);
    if (errno == ERANGE || !isfinite(number))
        return reader_fail(reader, value->line, value->column, "%s: %s is outside the range of a double",
                           field->qualified, found);
    if (number == 0.0)
        number = 0.0; /* -0 reads as 0, so it cannot change the canonical form */
    below = (field->flags & FLAG_MIN_EXCLUSIVE) ? number <= field->float_min : number < field->float_min;
    above = (field->flags & FLAG_MAX_EXCLUSIVE) ? number >= field->float_max : number > field->float_max;
    if (below || above)
        return reader_fail(reader, value->line, value->column, "%s: %s is out of range (must be %s)",
                           field->qualified, found, field->range_text);
    field_store_float(&reader->spec, id, number);
    return MOEGEN_OK;
}

static moegen_status read_boolean(spec_reader *reader, field_id id, const spec_node *value) {
    char found[QUOTE_VISIBLE_BYTES * 4 + 32];
    if (!value->quoted && strcmp(value->text, "true") == 0) {
        field_store_integer(&reader->spec, id, 1);
        return MOEGEN_OK;
    }
    if (!value->quoted && strcmp(value->text, "false") == 0) {
        field_store_integer(&reader->spec, id, 0);
        return MOEGEN_OK;
    }
    describe_scalar(value, found, sizeof found);
    return reader_fail(reader, value->line, value->column, "%s: expected true or false, found %s",
                       field_table[id].qualified, found);
}

/* "fp32, fp16, bf16": the values of an enum field, for messages. */
static void list_enum_names(const field_descriptor *field, char *out, size_t out_size) {
    size_t index, used = 0;
    out[0] = '\0';
    for (index = 0; index < field->enum_count && used < out_size; index++)
        used += (size_t)snprintf(out + used, out_size - used, "%s%s", index ? ", " : "", field->enum_names[index]);
}

static moegen_status read_enum(spec_reader *reader, field_id id, const spec_node *value) {
    const field_descriptor *field = &field_table[id];
    char found[QUOTE_VISIBLE_BYTES * 4 + 32], valid[256], hint[96] = "";
    const char *suggestion = NULL, *best = NULL;
    size_t index, best_distance = SIZE_MAX;
    for (index = 0; index < field->enum_count; index++) {
        if (strcmp(value->text, field->enum_names[index]) == 0) {
            field_store_integer(&reader->spec, id, (int64_t)index);
            return MOEGEN_OK;
        }
    }
    for (index = 0; index < COUNT_OF(value_aliases); index++)
        if (value_aliases[index].field == id && strcmp(value->text, value_aliases[index].alias) == 0)
            suggestion = value_aliases[index].value;
    for (index = 0; index < field->enum_count; index++) {
        size_t distance = edit_distance(value->text, field->enum_names[index]);
        if (distance < best_distance && close_enough(distance, field->enum_names[index])) {
            best_distance = distance;
            best = field->enum_names[index];
        }
    }
    if (!suggestion)
        suggestion = best;
    list_enum_names(field, valid, sizeof valid);
    if (suggestion)
        snprintf(hint, sizeof hint, "did you mean '%s'? ", suggestion);
    describe_scalar(value, found, sizeof found);
    return reader_fail(reader, value->line, value->column, "%s: unknown value %s (%svalid values: %s)",
                       field->qualified, found, hint, valid);
}

static moegen_status read_name(spec_reader *reader, const spec_node *value) {
    moegen_spec *spec = &reader->spec;
    char found[QUOTE_VISIBLE_BYTES * 4 + 32];
    size_t index;
    if (!matches_name(value->text, value->text_bytes)) {
        describe_scalar(value, found, sizeof found);
        return reader_fail(reader, value->line, value->column,
                           "name: %s is not a valid name (1 to %d characters from A-Z a-z 0-9 _ . -, starting "
                           "with a letter)",
                           found, MOEGEN_SPEC_MAX_NAME);
    }
    memcpy(spec->name, value->text, value->text_bytes + 1);
    for (index = 0; index <= value->text_bytes; index++)
        spec->ident[index] = (spec->name[index] == '-' || spec->name[index] == '.') ? '_' : spec->name[index];
    return MOEGEN_OK;
}

static moegen_status read_text(spec_reader *reader, field_id id, const spec_node *value) {
    char *copy = malloc(value->text_bytes + 1);
    if (!copy)
        return reader_out_of_memory(reader);
    memcpy(copy, value->text, value->text_bytes + 1);
    memcpy((char *)&reader->spec + field_table[id].offset, &copy, sizeof copy);
    return MOEGEN_OK;
}

/* What a field expects, for "expected ..., found a mapping" ("one of fp32, fp16, bf16"). */
static void describe_expected(const field_descriptor *field, char *out, size_t out_size) {
    char names[256];
    switch (field->kind) {
    case KIND_INTEGER: snprintf(out, out_size, "an integer"); return;
    case KIND_FLOAT: snprintf(out, out_size, "a number"); return;
    case KIND_BOOLEAN: snprintf(out, out_size, "true or false"); return;
    case KIND_ENUM:
        list_enum_names(field, names, sizeof names);
        snprintf(out, out_size, "one of %s", names);
        return;
    case KIND_NAME: snprintf(out, out_size, "a name"); return;
    case KIND_TEXT: snprintf(out, out_size, "text"); return;
    case KIND_SECTION: snprintf(out, out_size, "a mapping"); return;
    }
    snprintf(out, out_size, "a value");
}

/* Parse one value node for field `id` by its kind and store it. */
static moegen_status read_value(spec_reader *reader, field_id id, const spec_node *key, const spec_node *value) {
    const field_descriptor *field = &field_table[id];
    char expected[300];
    if (scalar_is_null(value))
        return reader_fail(reader, key->line, key->column, "%s: missing value", field->qualified);
    if (value->kind != NODE_SCALAR) {
        describe_expected(field, expected, sizeof expected);
        return reader_fail(reader, value->line, value->column, "%s: expected %s, found %s", field->qualified,
                           expected, node_kind_noun(value->kind));
    }
    if (!scalar_is_clean(value))
        return reader_fail(reader, value->line, value->column,
                           "%s: the value contains a NUL or control character", field->qualified);
    switch (field->kind) {
    case KIND_INTEGER: return read_integer(reader, id, value);
    case KIND_FLOAT: return read_float(reader, id, value);
    case KIND_BOOLEAN: return read_boolean(reader, id, value);
    case KIND_ENUM: return read_enum(reader, id, value);
    case KIND_NAME: return read_name(reader, value);
    case KIND_TEXT: return read_text(reader, id, value);
    case KIND_SECTION: break;
    }
    return reader_fail(reader, value->line, value->column, "%s: internal error: unexpected field kind",
                       field->qualified);
}

/* ---- the schema walk ------------------------------------------------------------------ */

static int find_field(spec_section section, const char *key) {
    int id;
    for (id = 0; id < FIELD_COUNT; id++)
        if (field_table[id].section == section && strcmp(field_table[id].key, key) == 0)
            return id;
    return -1;
}

static const char *section_key(spec_section section) {
    int id;
    for (id = 0; id < FIELD_COUNT; id++)
        if (field_table[id].kind == KIND_SECTION && field_table[id].opens == section)
            return field_table[id].key;
    return "";
}

/* Unknown key: a hint for another system's name, else the closest known key of any
 * section (qualified when it lives elsewhere). The key the hint names is marked as meant:
 * if it is not written elsewhere, its value is unknown rather than missing. */
static moegen_status report_unknown_key(spec_reader *reader, const spec_node *key, spec_section section) {
    char quoted[QUOTE_VISIBLE_BYTES * 4 + 8], where[64] = "", hint[160] = "";
    size_t index, best_distance = SIZE_MAX;
    int id, best = -1;
    quote_for_message(key->text, key->text_bytes, quoted, sizeof quoted);
    if (section != SECTION_TOP)
        snprintf(where, sizeof where, " in %s", section_key(section));
    for (index = 0; index < COUNT_OF(key_aliases); index++) {
        if (strcmp(key->text, key_aliases[index].alias) == 0) {
            reader->meant[key_aliases[index].target] = 1;
            return reader_fail(reader, key->line, key->column, "unknown key '%s'%s (%s; moegen calls it '%s')",
                               quoted, where, key_aliases[index].origin,
                               field_table[key_aliases[index].target].qualified);
        }
    }
    for (id = 0; id < FIELD_COUNT; id++) {
        const field_descriptor *field = &field_table[id];
        size_t distance = minimum_of(edit_distance(key->text, field->key), edit_distance(key->text, field->qualified));
        int better = distance < best_distance ||
                     (distance == best_distance && best >= 0 && field->section == section &&
                      field_table[best].section != section);
        if (better && close_enough(distance, field->key)) {
            best = id;
            best_distance = distance;
        }
    }
    if (best >= 0) {
        const field_descriptor *field = &field_table[best];
        reader->meant[best] = 1;
        if (field->section != SECTION_TOP && strcmp(key->text, field->qualified) == 0)
            snprintf(hint, sizeof hint, " (write it as '%s' under '%s:')", field->key, section_key(field->section));
        else if (field->section == section)
            snprintf(hint, sizeof hint, " (did you mean '%s'?)", field->key);
        else if (field->section == SECTION_TOP)
            snprintf(hint, sizeof hint, " (did you mean the top-level key '%s'?)", field->key);
        else
            snprintf(hint, sizeof hint, " (did you mean '%s'? it belongs under '%s:')", field->qualified,
                     section_key(field->section));
    } else {
        snprintf(hint, sizeof hint, " (specs/README.md lists the keys)");
    }
    return reader_fail(reader, key->line, key->column, "unknown key '%s'%s%s", quoted, where, hint);
}

/* A section that is not a mapping: every field in it is unknown. */
static void mark_section_unknown(spec_reader *reader, spec_section section) {
    int id;
    for (id = 0; id < FIELD_COUNT; id++)
        if (field_table[id].section == section && field_table[id].kind != KIND_SECTION)
            reader->unknown[id] = 1;
}

/* Walk one mapping. A key or a value that is wrong is reported (its field becomes
 * unknown) and the walk goes on with the next key. Returns MOEGEN_OK, or the status that
 * stops everything (out of memory); the errors themselves are in the reader. */
static moegen_status read_section(spec_reader *reader, int mapping, spec_section section) {
    const spec_node *nodes = reader->tree.nodes;
    int key_index;
    for (key_index = nodes[mapping].first_child; key_index >= 0;
         key_index = nodes[nodes[key_index].next_sibling].next_sibling) {
        const spec_node *key = &nodes[key_index];
        const spec_node *value = &nodes[key->next_sibling];
        moegen_status status;
        field_given *given;
        int id;
        if (key->ignored)
            continue; /* reported while the tree was built */
        id = find_field(section, key->text);
        if (id < 0 || strlen(key->text) != key->text_bytes) {
            status = report_unknown_key(reader, key, section);
        } else {
            given = &reader->given[id];
            given->is_set = 1;
            given->key_line = key->line, given->key_column = key->column;
            given->value_line = value->line, given->value_column = value->column;
            if (field_table[id].kind != KIND_SECTION) {
                status = read_value(reader, (field_id)id, key, value);
                if (status == MOEGEN_ERR_SPEC)
                    reader->unknown[id] = 1;
            } else if (scalar_is_null(value)) {
                status = reader_fail(reader, key->line, key->column, "%s: missing value (expected a mapping)",
                                     field_table[id].qualified);
                mark_section_unknown(reader, field_table[id].opens);
            } else if (value->kind != NODE_MAPPING) {
                status = reader_fail(reader, value->line, value->column,
                                     "%s: expected a mapping of %s settings, found %s", field_table[id].qualified,
                                     field_table[id].key, node_kind_noun(value->kind));
                mark_section_unknown(reader, field_table[id].opens);
            } else {
                status = read_section(reader, key->next_sibling, field_table[id].opens);
            }
        }
        if (status != MOEGEN_OK && status != MOEGEN_ERR_SPEC)
            return status;
    }
    return MOEGEN_OK;
}

/* ---- resolution ---------------------------------------------------------------------- */

static int is_given(const spec_reader *reader, field_id id) { return reader->given[id].is_set; }

/* Where to point for a rule about `id`: its value (or key) if written, else its
 * section's key if that was written, else the root. */
static void rule_position(const spec_reader *reader, field_id id, int at_key, int *line, int *column) {
    const field_given *given = &reader->given[id];
    const spec_node *root = &reader->tree.nodes[reader->tree.root];
    if (given->is_set) {
        *line = at_key ? given->key_line : given->value_line;
        *column = at_key ? given->key_column : given->value_column;
        return;
    }
    if (field_table[id].section != SECTION_TOP) {
        int section;
        for (section = 0; section < FIELD_COUNT; section++) {
            if (field_table[section].kind == KIND_SECTION && field_table[section].opens == field_table[id].section &&
                reader->given[section].is_set) {
                *line = reader->given[section].key_line;
                *column = reader->given[section].key_column;
                return;
            }
        }
    }
    *line = root->line;
    *column = root->column;
}

/* Whether field `id` has any effect on the layer `spec` describes. If not and `why` is
 * given, it receives the condition under which it would ("router.n_group > 1 (it is 1)").
 * The canonical form lists exactly the fields for which this returns 1. */
static int field_applies(const moegen_spec *spec, field_id id, char *why, size_t why_size) {
    char scratch[160];
    const char *mode = moegen_capacity_mode_name(spec->capacity.mode);
    if (!why) {
        why = scratch;
        why_size = sizeof scratch;
    }
    switch (id) {
    case FIELD_ORDER:
        if (spec->router.score_function == MOEGEN_SCORE_SOFTMAX)
            return 1;
        snprintf(why, why_size, "router.score_function is softmax (it is %s)",
                 moegen_score_fn_name(spec->router.score_function));
        return 0;
    case FIELD_TOPK_GROUP:
    case FIELD_GROUP_TOPM:
    case FIELD_GROUP_SCORE:
    case FIELD_GROUP_MASK:
        if (spec->router.n_group > 1)
            return 1;
        snprintf(why, why_size, "router.n_group > 1 (it is %d)", spec->router.n_group);
        return 0;
    case FIELD_SCORE_BIAS:
        if (spec->router.score_function != MOEGEN_SCORE_SOFTMAX)
            return 1;
        snprintf(why, why_size, "router.score_function is sigmoid or sqrtsoftplus (it is softmax)");
        return 0;
    case FIELD_SEED:
        if (spec->router.input_jitter > 0.0 || spec->router.noise != MOEGEN_NOISE_NONE ||
            (spec->capacity.priority == MOEGEN_PRIORITY_RANDOM && field_applies(spec, FIELD_PRIORITY, NULL, 0)))
            return 1;
        snprintf(why, why_size, "router.input_jitter > 0, router.noise is not none or capacity.priority is random");
        return 0;
    case FIELD_CAPACITY_FACTOR:
    case FIELD_EVAL_CAPACITY_FACTOR:
    case FIELD_CAPACITY_FORMULA:
        if (spec->capacity.mode == MOEGEN_CAP_FACTOR)
            return 1;
        snprintf(why, why_size, "capacity.mode is factor (it is %s)", mode);
        return 0;
    case FIELD_MIN_CAPACITY:
        if (spec->capacity.mode != MOEGEN_CAP_FACTOR) {
            snprintf(why, why_size, "capacity.mode is factor (it is %s)", mode);
            return 0;
        }
        if (spec->capacity.formula != MOEGEN_CAP_FORMULA_DEEPSPEED) {
            snprintf(why, why_size, "capacity.formula is deepspeed (it is %s)",
                     moegen_capacity_formula_name(spec->capacity.formula));
            return 0;
        }
        return 1;
    case FIELD_EXPERT_CAPACITY:
        if (spec->capacity.mode == MOEGEN_CAP_FIXED)
            return 1;
        snprintf(why, why_size, "capacity.mode is fixed (it is %s)", mode);
        return 0;
    case FIELD_PRIORITY:
    case FIELD_PAD_TO_CAPACITY:
        if (spec->capacity.mode != MOEGEN_CAP_DROPLESS)
            return 1;
        snprintf(why, why_size, "capacity.mode is factor or fixed (it is dropless)");
        return 0;
    case FIELD_SHARED_INTERMEDIATE_SIZE:
    case FIELD_SHARED_GATE:
        if (spec->shared.count > 0)
            return 1;
        snprintf(why, why_size, "shared_experts.count > 0 (it is 0)");
        return 0;
    default:
        return 1;
    }
}

/* The field's value may be used by a check: it is neither unknown nor missing. */
static int is_known(const spec_reader *reader, field_id id) { return !reader->unknown[id]; }

/* Written with a value that was read: a written field that failed its own check is not
 * used as a value (its default or placeholder stands in for it). */
static int has_written_value(const spec_reader *reader, field_id id) {
    return is_given(reader, id) && !reader->unknown[id];
}

/* A derived field that was not written (or was written wrong) takes its value from
 * others; when one of them is unknown, so is the derived value. */
static void derive_known(spec_reader *reader, field_id id, field_id from, field_id also_from) {
    if (!has_written_value(reader, id) && (reader->unknown[from] || reader->unknown[also_from]))
        reader->unknown[id] = 1;
}

/* Presets and defaults that depend on other fields; only for fields not written (or
 * written with a bad value: the default then stands in, and the field stays unknown). */
static void resolve_derived_defaults(spec_reader *reader) {
    moegen_spec *spec = &reader->spec;
    int deepspeed = spec->semantics == MOEGEN_SEMANTICS_DEEPSPEED;
    int top_k = spec->top_k;
    if (!has_written_value(reader, FIELD_ORDER))
        spec->router.order = deepspeed ? MOEGEN_ORDER_SOFTMAX_THEN_TOPK : MOEGEN_ORDER_TOPK_THEN_SOFTMAX;
    derive_known(reader, FIELD_ORDER, FIELD_SEMANTICS, FIELD_SEMANTICS);
    if (!has_written_value(reader, FIELD_TOPK_GROUP))
        spec->router.topk_group = spec->router.n_group;
    derive_known(reader, FIELD_TOPK_GROUP, FIELD_N_GROUP, FIELD_N_GROUP);
    if (!has_written_value(reader, FIELD_GROUP_TOPM))
        spec->router.group_topm = top_k / spec->router.topk_group > 1 ? top_k / spec->router.topk_group : 1;
    derive_known(reader, FIELD_GROUP_TOPM, FIELD_TOP_K, FIELD_TOPK_GROUP);
    if (!has_written_value(reader, FIELD_AUX_LOSS))
        spec->router.aux_loss = deepspeed ? MOEGEN_AUX_DEEPSPEED : MOEGEN_AUX_MEGATRON;
    derive_known(reader, FIELD_AUX_LOSS, FIELD_SEMANTICS, FIELD_SEMANTICS);
    if (!has_written_value(reader, FIELD_CAPACITY_MODE)) {
        /* What was written decides, even when its value is bad: it says which mode was
         * meant. A field that is unknown without being written (misspelt, or in a capacity
         * section that is not a mapping) might have decided it too. */
        if (is_given(reader, FIELD_EXPERT_CAPACITY)) {
            spec->capacity.mode = MOEGEN_CAP_FIXED;
        } else if (is_given(reader, FIELD_CAPACITY_FACTOR) || is_given(reader, FIELD_EVAL_CAPACITY_FACTOR)) {
            spec->capacity.mode = MOEGEN_CAP_FACTOR;
            derive_known(reader, FIELD_CAPACITY_MODE, FIELD_EXPERT_CAPACITY, FIELD_EXPERT_CAPACITY);
        } else {
            spec->capacity.mode = deepspeed ? MOEGEN_CAP_FACTOR : MOEGEN_CAP_DROPLESS;
            derive_known(reader, FIELD_CAPACITY_MODE, FIELD_SEMANTICS, FIELD_EXPERT_CAPACITY);
            derive_known(reader, FIELD_CAPACITY_MODE, FIELD_CAPACITY_FACTOR, FIELD_EVAL_CAPACITY_FACTOR);
        }
    }
    if (!has_written_value(reader, FIELD_EVAL_CAPACITY_FACTOR))
        spec->capacity.eval_capacity_factor = spec->capacity.capacity_factor;
    derive_known(reader, FIELD_EVAL_CAPACITY_FACTOR, FIELD_CAPACITY_FACTOR, FIELD_CAPACITY_FACTOR);
    if (!has_written_value(reader, FIELD_CAPACITY_FORMULA))
        spec->capacity.formula = deepspeed ? MOEGEN_CAP_FORMULA_DEEPSPEED : MOEGEN_CAP_FORMULA_MEGATRON;
    derive_known(reader, FIELD_CAPACITY_FORMULA, FIELD_SEMANTICS, FIELD_SEMANTICS);
    if (!has_written_value(reader, FIELD_MIN_CAPACITY))
        spec->capacity.min_capacity = deepspeed ? 4 : 0;
    derive_known(reader, FIELD_MIN_CAPACITY, FIELD_SEMANTICS, FIELD_SEMANTICS);
    if (!has_written_value(reader, FIELD_PRIORITY)) {
        if (!deepspeed || top_k > 2)
            spec->capacity.priority = MOEGEN_PRIORITY_PROBS;
        else
            spec->capacity.priority = top_k == 1 ? MOEGEN_PRIORITY_POSITION : MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR;
    }
    derive_known(reader, FIELD_PRIORITY, FIELD_SEMANTICS, FIELD_TOP_K);
    if (!has_written_value(reader, FIELD_RENORMALIZE))
        spec->capacity.renormalize = deepspeed && top_k >= 2;
    derive_known(reader, FIELD_RENORMALIZE, FIELD_SEMANTICS, FIELD_TOP_K);
}

/* Whether the fields field_applies() reads for `id` are known, so that its answer means
 * something. */
static int applicability_known(const spec_reader *reader, const moegen_spec *spec, field_id id) {
    switch (id) {
    case FIELD_ORDER:
    case FIELD_SCORE_BIAS:
        return is_known(reader, FIELD_SCORE_FUNCTION);
    case FIELD_TOPK_GROUP:
    case FIELD_GROUP_TOPM:
    case FIELD_GROUP_SCORE:
    case FIELD_GROUP_MASK:
        return is_known(reader, FIELD_N_GROUP);
    case FIELD_SEED:
        return is_known(reader, FIELD_INPUT_JITTER) && is_known(reader, FIELD_NOISE) &&
               is_known(reader, FIELD_PRIORITY) && is_known(reader, FIELD_CAPACITY_MODE);
    case FIELD_CAPACITY_FACTOR:
    case FIELD_EVAL_CAPACITY_FACTOR:
    case FIELD_CAPACITY_FORMULA:
    case FIELD_EXPERT_CAPACITY:
    case FIELD_PRIORITY:
    case FIELD_PAD_TO_CAPACITY:
        return is_known(reader, FIELD_CAPACITY_MODE);
    case FIELD_MIN_CAPACITY: /* the mode decides first; the formula only in factor mode */
        return is_known(reader, FIELD_CAPACITY_MODE) &&
               (spec->capacity.mode != MOEGEN_CAP_FACTOR || is_known(reader, FIELD_CAPACITY_FORMULA));
    case FIELD_SHARED_INTERMEDIATE_SIZE:
    case FIELD_SHARED_GATE:
        return is_known(reader, FIELD_SHARED_COUNT);
    default:
        return 1;
    }
}

/* Rules between fields, in a fixed order. Every broken rule is reported, except one that
 * reads an unknown field or needs an earlier rule to hold (E / n_group means nothing
 * when n_group does not divide E): that would only repeat an error in other words. */
static void check_cross_field_rules(spec_reader *reader) {
    const moegen_spec *spec = &reader->spec;
    const moegen_router_spec *router = &spec->router;
    const int experts = is_known(reader, FIELD_NUM_EXPERTS), top_k = is_known(reader, FIELD_TOP_K);
    const int n_group = is_known(reader, FIELD_N_GROUP);
    int top_k_fits = 0, groups_divide = 0, kept_groups_fit = 0, kept_groups_hold_k = 0;
    int line, column;
    if (experts && top_k) {
        if (spec->top_k > spec->num_experts) {
            rule_position(reader, FIELD_TOP_K, 0, &line, &column);
            reader_fail(reader, line, column, "num_experts_per_tok: %d exceeds num_experts (%d)", spec->top_k,
                        spec->num_experts);
        } else {
            top_k_fits = 1;
        }
    }
    if (experts && is_known(reader, FIELD_EP_SIZE) && spec->num_experts % spec->ep_size != 0) {
        rule_position(reader, FIELD_EP_SIZE, 0, &line, &column);
        reader_fail(reader, line, column,
                    "ep_size: %d does not divide num_experts (%d); every rank owns the same number of experts",
                    spec->ep_size, spec->num_experts);
    }
    if (top_k && is_known(reader, FIELD_WEIGHT_ON_INPUT) && spec->weight_on_input && spec->top_k != 1) {
        rule_position(reader, FIELD_WEIGHT_ON_INPUT, 0, &line, &column);
        reader_fail(reader, line, column, "weight_on_input requires num_experts_per_tok 1 (it is %d)", spec->top_k);
    }
    if (experts && n_group) {
        if (spec->num_experts % router->n_group != 0) {
            rule_position(reader, FIELD_N_GROUP, 0, &line, &column);
            reader_fail(reader, line, column, "router.n_group: %d does not divide num_experts (%d)", router->n_group,
                        spec->num_experts);
        } else {
            groups_divide = 1;
        }
    }
    if (n_group && is_known(reader, FIELD_TOPK_GROUP)) {
        if (router->topk_group > router->n_group) {
            rule_position(reader, FIELD_TOPK_GROUP, 0, &line, &column);
            reader_fail(reader, line, column, "router.topk_group: %d exceeds router.n_group (%d)", router->topk_group,
                        router->n_group);
        } else {
            kept_groups_fit = 1;
        }
    }
    if (top_k_fits && groups_divide && kept_groups_fit) {
        if ((int64_t)spec->top_k > (int64_t)router->topk_group * (spec->num_experts / router->n_group)) {
            rule_position(reader, is_given(reader, FIELD_TOPK_GROUP) ? FIELD_TOPK_GROUP : FIELD_N_GROUP, 0, &line,
                          &column);
            reader_fail(reader, line, column,
                        "num_experts_per_tok (%d) exceeds the experts in the kept groups: router.topk_group (%d) "
                        "x num_experts / router.n_group (%d) = %d",
                        spec->top_k, router->topk_group, spec->num_experts / router->n_group,
                        router->topk_group * (spec->num_experts / router->n_group));
        } else {
            kept_groups_hold_k = 1;
        }
    }
    /* A group_topm derived from k / topk_group fits whenever the rule above holds. */
    if (groups_divide && is_known(reader, FIELD_GROUP_TOPM) &&
        (has_written_value(reader, FIELD_GROUP_TOPM) || kept_groups_hold_k) &&
        router->group_topm > spec->num_experts / router->n_group) {
        rule_position(reader, FIELD_GROUP_TOPM, 0, &line, &column);
        reader_fail(reader, line, column,
                    "router.group_topm: %d exceeds the experts in one group (num_experts / router.n_group = %d)",
                    router->group_topm, spec->num_experts / router->n_group);
    }
    if (is_known(reader, FIELD_NOISE) && router->noise == MOEGEN_NOISE_RSAMPLE) {
        const char *problem = NULL;
        char detail[96];
        if (is_known(reader, FIELD_SCORE_FUNCTION) && router->score_function != MOEGEN_SCORE_SOFTMAX) {
            snprintf(detail, sizeof detail, "router.score_function softmax (it is %s)",
                     moegen_score_fn_name(router->score_function));
            problem = detail;
        } else if (top_k && spec->top_k > 2) {
            snprintf(detail, sizeof detail, "num_experts_per_tok <= 2 (it is %d)", spec->top_k);
            problem = detail;
        } else if (n_group && router->n_group != 1) {
            snprintf(detail, sizeof detail, "router.n_group 1 (it is %d)", router->n_group);
            problem = detail;
        }
        if (problem) {
            rule_position(reader, FIELD_NOISE, 0, &line, &column);
            reader_fail(reader, line, column, "router.noise: rsample requires %s", problem);
        }
    }
    /* "required" means neither written nor meant by a misspelt key (which makes it unknown) */
    if (is_known(reader, FIELD_CAPACITY_MODE) && spec->capacity.mode == MOEGEN_CAP_FIXED &&
        !is_given(reader, FIELD_EXPERT_CAPACITY) && is_known(reader, FIELD_EXPERT_CAPACITY)) {
        rule_position(reader, FIELD_CAPACITY_MODE, 0, &line, &column);
        reader_fail(reader, line, column, "capacity.expert_capacity is required when capacity.mode is fixed");
    }
    if (is_known(reader, FIELD_CAPACITY_MODE) && spec->capacity.mode == MOEGEN_CAP_FIXED &&
        is_known(reader, FIELD_PAD_TO_CAPACITY) && spec->capacity.pad_to_capacity && experts &&
        is_given(reader, FIELD_EXPERT_CAPACITY) && is_known(reader, FIELD_EXPERT_CAPACITY) &&
        is_known(reader, FIELD_HIDDEN_SIZE) && is_known(reader, FIELD_MOE_INTERMEDIATE_SIZE) &&
        is_known(reader, FIELD_DTYPE) && is_known(reader, FIELD_ACTIVATION)) {
        const long double rows = (long double)spec->num_experts * (long double)spec->capacity.expert_capacity;
        const long double row_bytes = 4.0L * (long double)spec->hidden_size +
                                      (long double)moegen_dtype_size(spec->dtype) * moegen_spec_ffn_rows(spec) + 8.0L;
        if (rows > (long double)MOEGEN_MAX_PADDED_ROWS || rows * row_bytes > (long double)MOEGEN_MAX_PADDED_BYTES) {
            rule_position(reader, FIELD_EXPERT_CAPACITY, 0, &line, &column);
            reader_fail(reader, line, column,
                        "capacity.expert_capacity: %lld with pad_to_capacity makes every call process "
                        "num_experts x capacity = %.0Lf rows (%.3Lg GiB of expert buffers); the limit is "
                        "%lld rows and %llu GiB",
                        (long long)spec->capacity.expert_capacity, rows, rows * row_bytes / 1073741824.0L,
                        (long long)MOEGEN_MAX_PADDED_ROWS, (unsigned long long)(MOEGEN_MAX_PADDED_BYTES >> 30));
        }
    }
    if (is_known(reader, FIELD_SHARED_COUNT) && spec->shared.count > 0 &&
        !is_given(reader, FIELD_SHARED_INTERMEDIATE_SIZE) && is_known(reader, FIELD_SHARED_INTERMEDIATE_SIZE)) {
        rule_position(reader, FIELD_SHARED_COUNT, 0, &line, &column);
        reader_fail(reader, line, column, "shared_experts.intermediate_size is required when shared_experts.count > 0");
    }
}

/* Resolve defaults and check the rules, reporting every error into the reader. */
static void resolve_spec(spec_reader *reader) {
    int id;
    /* A field an unknown key was probably meant to be: its value is unknown, not missing
     * (so a misspelt required key is one error, not two). */
    for (id = 0; id < FIELD_COUNT; id++) {
        if (!reader->meant[id] || is_given(reader, (field_id)id))
            continue;
        if (field_table[id].kind == KIND_SECTION)
            mark_section_unknown(reader, field_table[id].opens);
        else
            reader->unknown[id] = 1;
    }
    for (id = 0; id < FIELD_COUNT; id++) {
        if ((field_table[id].flags & FLAG_REQUIRED) && !is_given(reader, (field_id)id) && !reader->unknown[id]) {
            const spec_node *root = &reader->tree.nodes[reader->tree.root];
            reader_fail(reader, root->line, root->column, "missing required key '%s'", field_table[id].qualified);
            reader->unknown[id] = 1;
        }
    }
    /* Static defaults; a required integer that is unknown gets the bottom of its range as
     * a placeholder, so that no default derived from it divides by zero. */
    for (id = 0; id < FIELD_COUNT; id++) {
        const field_descriptor *field = &field_table[id];
        if (has_written_value(reader, (field_id)id))
            continue;
        if ((field->flags & FLAG_REQUIRED) && field->kind == KIND_INTEGER)
            field_store_integer(&reader->spec, (field_id)id, field->int_min);
        else if (!(field->flags & (FLAG_REQUIRED | FLAG_DERIVED_DEFAULT)))
            field_store_default(&reader->spec, (field_id)id);
    }
    resolve_derived_defaults(reader);
    for (id = 0; id < FIELD_COUNT; id++) {
        char why[160];
        if (!is_given(reader, (field_id)id) || !applicability_known(reader, &reader->spec, (field_id)id) ||
            field_applies(&reader->spec, (field_id)id, why, sizeof why))
            continue;
        if (field_table[id].flags & FLAG_SOFT) {
            field_store_default(&reader->spec, (field_id)id);
            continue;
        }
        reader_fail(reader, reader->given[id].key_line, reader->given[id].key_column, "%s applies only when %s",
                    field_table[id].qualified, why);
    }
    check_cross_field_rules(reader);
}

/* ---- warnings ------------------------------------------------------------------------- */

/* Model families whose MoE experts are gated (silu(gate) * up). Hugging Face configs of
 * all of them say `hidden_act: silu`, which is easy to copy as `activation: silu`. */
static const char *const gated_families[] = {"mixtral", "mistral", "qwen",    "deepseek", "olmoe",
                                             "llama",   "glm",     "gpt-oss", "gpt_oss"};

static int is_ascii_alnum(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* Whether `text` holds the lowercase `word` (ASCII case ignored) at the start of a word:
 * "Qwen/Qwen3-30B" mentions qwen, "ollama" does not mention llama. */
static int mentions_word(const char *text, const char *word) {
    size_t word_bytes = strlen(word);
    const char *at;
    for (at = text; *at; at++) {
        size_t index = 0;
        if (at > text && is_ascii_alnum(at[-1]))
            continue;
        while (index < word_bytes && at[index] && lower_ascii(at[index]) == word[index])
            index++;
        if (index == word_bytes)
            return 1;
    }
    return 0;
}

/* Valid specs that are probably not what was meant. Every check is a few comparisons
 * (and one scan of the free text), and none fires on the shipped specs (test_spec loads
 * them all). Called only on a spec that passed every rule. */
static void check_warnings(spec_reader *reader) {
    const moegen_spec *spec = &reader->spec;
    const moegen_router_spec *router = &spec->router;
    const char *const scaled = router->routed_scaling_factor != 1.0 ? " (times router.routed_scaling_factor)" : "";
    int line, column;

    /* A non-gated activation in a layer of a gated family. */
    if (!moegen_activation_is_gated(spec->activation)) {
        const char *const texts[] = {spec->name, spec->source, spec->description};
        const char *const places[] = {"the name", "the source", "the description"};
        const char *family = NULL, *place = NULL;
        size_t text, word;
        for (text = 0; text < COUNT_OF(texts) && !family; text++)
            for (word = 0; word < COUNT_OF(gated_families) && !family; word++)
                if (texts[text] && mentions_word(texts[text], gated_families[word]))
                    family = gated_families[word], place = places[text];
        if (family) {
            rule_position(reader, FIELD_ACTIVATION, 0, &line, &column);
            reader_warn(reader, line, column,
                        "activation: %s is not gated, but %s mentions '%s', a model family whose experts are "
                        "gated: if the checkpoint has gate and up projections, write activation: swiglu (a silu "
                        "gate; Hugging Face's hidden_act: silu) or geglu (a gelu gate)",
                        moegen_activation_name(spec->activation), place, family);
        }
    }

    /* DeepSeek-V3-style routing (group-limited sigmoid or sqrt-softplus scores, or scaled
     * sigmoid weights) without the selection bias it is trained with. */
    if (router->score_function != MOEGEN_SCORE_SOFTMAX && !router->score_bias &&
        (router->n_group > 1 ||
         (router->score_function == MOEGEN_SCORE_SIGMOID && router->routed_scaling_factor != 1.0))) {
        char cause[64];
        if (router->n_group > 1)
            snprintf(cause, sizeof cause, "router.n_group %d", router->n_group);
        else
            snprintf(cause, sizeof cause, "router.routed_scaling_factor %g", router->routed_scaling_factor);
        rule_position(reader, FIELD_SCORE_FUNCTION, 0, &line, &column);
        reader_warn(reader, line, column,
                    "router.score_function: %s with %s is DeepSeek-V3-style routing, which chooses experts by "
                    "score plus a per-expert bias (e_score_correction_bias), but router.score_bias is false; "
                    "write router.score_bias: true if the checkpoint has that bias",
                    moegen_score_fn_name(router->score_function), cause);
    }

    /* Top-1 routing whose one weight is always 1: the scores only choose the expert. */
    if (spec->top_k == 1 && router->norm_topk_prob) {
        rule_position(reader, FIELD_NORM_TOPK_PROB, 0, &line, &column);
        reader_warn(reader, line, column,
                    "router.norm_topk_prob: true with num_experts_per_tok 1 divides the one routing weight by "
                    "itself, so every weight is 1%s and the scores only choose the expert; without it the "
                    "expert is weighted by its score, as in Switch and Llama 4",
                    scaled);
    } else if (spec->top_k == 1 && router->score_function == MOEGEN_SCORE_SOFTMAX &&
               router->order == MOEGEN_ORDER_TOPK_THEN_SOFTMAX) {
        int written = is_given(reader, FIELD_ORDER);
        rule_position(reader, written ? FIELD_ORDER : FIELD_TOP_K, 0, &line, &column);
        reader_warn(reader, line, column,
                    "router.order: topk_then_softmax%s with num_experts_per_tok 1 is a softmax over one logit, so "
                    "every routing weight is 1%s and the scores only choose the expert; softmax_then_topk "
                    "weights the expert by its probability, as Switch does",
                    written ? "" : " (the megatron preset's default)", scaled);
    }

    /* The routing weight on the expert input comes from Llama 4, whose scores are sigmoids. */
    if (spec->weight_on_input && router->score_function == MOEGEN_SCORE_SOFTMAX) {
        rule_position(reader, FIELD_WEIGHT_ON_INPUT, 0, &line, &column);
        reader_warn(reader, line, column,
                    "weight_on_input: true with router.score_function softmax; Llama 4, the model that multiplies "
                    "the expert's input by its routing weight, scores experts with a sigmoid (router.score_function: "
                    "sigmoid)");
    }
}

/* ---- public: parsing ------------------------------------------------------------------ */

/* See spec.h. Returns MOEGEN_OK, MOEGEN_ERR_SPEC, MOEGEN_ERR_NO_MEMORY, or
 * MOEGEN_ERR_INVALID_ARGUMENT when `out` is NULL or `text` is NULL with len > 0. */
static moegen_status spec_parse(const char *text, size_t len, const char *display_path, moegen_spec *out,
                                moegen_error *err) {
    spec_reader reader;
    moegen_status status;
    const spec_node *root;

    if (!out || (!text && len > 0))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "moegen_spec_parse: NULL %s", out ? "text" : "output spec");
    memset(out, 0, sizeof *out);
    memset(&reader, 0, sizeof reader);
    reader.path = display_path ? display_path : "<string>";
    reader.text = text ? text : "";
    reader.bytes = len;
    reader.err = err;
    reader.tree.root = -1;

    if (len > MOEGEN_SPEC_MAX_BYTES) {
        status = reader_fail(&reader, 1, 1, "the spec is %zu bytes; the limit is %u bytes", len,
                             (unsigned)MOEGEN_SPEC_MAX_BYTES);
        goto cleanup;
    }
    status = prescan_bytes(&reader);
    if (status != MOEGEN_OK)
        goto cleanup;
    status = read_tree(&reader);
    if (status != MOEGEN_OK)
        goto cleanup;
    root = &reader.tree.nodes[reader.tree.root];
    if (scalar_is_null(root)) {
        status = reader_fail(&reader, root->line, root->column, "empty spec (the document has no content)");
        goto cleanup;
    }
    if (root->kind != NODE_MAPPING) {
        status = reader_fail(&reader, root->line, root->column,
                             "the top level of a spec must be a mapping of keys to values, found %s",
                             node_kind_noun(root->kind));
        goto cleanup;
    }
    status = read_section(&reader, reader.tree.root, SECTION_TOP);
    if (status != MOEGEN_OK)
        goto cleanup;
    resolve_spec(&reader);
    if (reader.error_count > 0) {
        status = MOEGEN_ERR_SPEC;
        goto cleanup;
    }
    check_warnings(&reader);
    reader.spec.warning_count = reader.warnings.count + reader.warnings.lost;
    join_diagnostics(NULL, &reader.warnings, reader.spec.warning_count, NULL, reader.spec.warnings,
                     sizeof reader.spec.warnings);
    *out = reader.spec;
    memset(&reader.spec, 0, sizeof reader.spec); /* ownership of the strings moved */
    moegen_error_clear(err);

cleanup:
    if (status == MOEGEN_ERR_SPEC && reader.error_count > 0) {
        char joined[MOEGEN_ERROR_MESSAGE_BYTES];
        join_diagnostics(reader.first_error, &reader.later_errors, reader.error_count, "errors", joined,
                         sizeof joined);
        moegen_error_set(err, MOEGEN_ERR_SPEC, 0, "%s", joined);
    }
    moegen_spec_free(&reader.spec);
    tree_free(&reader.tree);
    diagnostics_free(&reader.later_errors);
    diagnostics_free(&reader.warnings);
    return status;
}

/* The public entry point runs in the C locale (gen/c_locale.h). */
moegen_status moegen_spec_parse(const char *text, size_t len, const char *display_path, moegen_spec *out,
                                moegen_error *err) {
    moegen_c_locale_scope scope;
    moegen_c_locale_enter(&scope);
    moegen_status result = spec_parse(text, len, display_path, out, err);
    moegen_c_locale_leave(&scope);
    return result;
}

/* See spec.h. Reads at most MOEGEN_SPEC_MAX_BYTES + 1 bytes (one more than the limit,
 * so that moegen_spec_parse reports an oversized file). Returns MOEGEN_ERR_IO when the
 * file cannot be opened or read (message "path: strerror"), MOEGEN_ERR_INVALID_ARGUMENT
 * for NULL arguments, MOEGEN_ERR_NO_MEMORY, otherwise what moegen_spec_parse returns. */
moegen_status moegen_spec_load_file(const char *path, moegen_spec *out, moegen_error *err) {
    const size_t capacity = (size_t)MOEGEN_SPEC_MAX_BYTES + 1;
    size_t used = 0;
    char *buffer = NULL;
    moegen_status status = MOEGEN_OK;
    int descriptor = -1;
    struct stat info;

    if (!path || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_spec_load_file: NULL %s",
                                path ? "output spec" : "path");
    memset(out, 0, sizeof *out);
    descriptor = open(path, O_RDONLY | O_CLOEXEC);
    if (descriptor < 0 || fstat(descriptor, &info) != 0) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    if (S_ISDIR(info.st_mode)) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, EISDIR, "%s: %s", path, strerror(EISDIR));
        goto cleanup;
    }
    buffer = malloc(capacity);
    if (!buffer) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory reading the spec", path);
        goto cleanup;
    }
    while (used < capacity) {
        ssize_t got = read(descriptor, buffer + used, capacity - used);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            status = moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
            goto cleanup;
        }
        if (got == 0)
            break;
        used += (size_t)got;
    }
    status = moegen_spec_parse(buffer, used, path, out, err);

cleanup:
    if (descriptor >= 0)
        close(descriptor);
    free(buffer);
    return status;
}

/* See spec.h. Frees the free-text strings and zeroes them; safe on NULL and on a
 * zeroed spec. */
void moegen_spec_free(moegen_spec *spec) {
    if (!spec)
        return;
    free(spec->source);
    free(spec->description);
    spec->source = NULL;
    spec->description = NULL;
}

/* ---- public: canonical form and hash ---------------------------------------------------- */

/* Shortest decimal that reads back as the same double, always with a '.' before any
 * exponent ("1.0", "0.25", "1000000.0", "1.0e-05"). Expects a finite value. */
static void format_float(double value, char *out, size_t out_size) {
    char digits[40];
    int precision, exponent = 0;
    char *exponent_mark, *dot;
    if (value == 0.0)
        value = 0.0;
    for (precision = 1; precision <= 17; precision++) {
        snprintf(digits, sizeof digits, "%.*g", precision, value);
        if (strtod(digits, NULL) == value)
            break;
    }
    exponent_mark = strchr(digits, 'e');
    if (exponent_mark)
        exponent = atoi(exponent_mark + 1);
    if (exponent_mark && exponent >= 0 && exponent < 16) {
        /* print integers and large values in positional form */
        snprintf(digits, sizeof digits, "%.*g", exponent + 1 > precision ? exponent + 1 : precision, value);
        exponent_mark = strchr(digits, 'e');
    }
    dot = strchr(digits, '.');
    if (dot)
        snprintf(out, out_size, "%s", digits);
    else if (exponent_mark)
        snprintf(out, out_size, "%.*s.0%s", (int)(exponent_mark - digits), digits, exponent_mark);
    else
        snprintf(out, out_size, "%s.0", digits);
}

typedef struct text_builder {
    char *buffer;
    size_t capacity, used;
    int overflow;
} text_builder;

static void builder_append(text_builder *builder, const char *format, ...) __attribute__((format(printf, 2, 3)));

static void builder_append(text_builder *builder, const char *format, ...) {
    va_list args;
    int wrote;
    if (builder->overflow)
        return;
    va_start(args, format);
    wrote = vsnprintf(builder->buffer + builder->used, builder->capacity - builder->used, format, args);
    va_end(args);
    if (wrote < 0 || (size_t)wrote >= builder->capacity - builder->used)
        builder->overflow = 1;
    else
        builder->used += (size_t)wrote;
}

static void append_field(text_builder *builder, const moegen_spec *spec, field_id id) {
    const field_descriptor *field = &field_table[id];
    const char *indent = field->section == SECTION_TOP ? "" : "  ";
    char number[48];
    switch (field->kind) {
    case KIND_INTEGER:
        builder_append(builder, "%s%s: %lld\n", indent, field->key, (long long)field_load_integer(spec, id));
        break;
    case KIND_FLOAT:
        format_float(field_load_float(spec, id), number, sizeof number);
        builder_append(builder, "%s%s: %s\n", indent, field->key, number);
        break;
    case KIND_BOOLEAN:
        builder_append(builder, "%s%s: %s\n", indent, field->key, field_load_integer(spec, id) ? "true" : "false");
        break;
    case KIND_ENUM:
        builder_append(builder, "%s%s: %s\n", indent, field->key,
                       enum_name(field->enum_names, field->enum_count, (int)field_load_integer(spec, id)));
        break;
    case KIND_NAME: /* quoted: a name such as "null" or "true" must stay a string */
        builder_append(builder, "%s%s: \"%s\"\n", indent, field->key, spec->name);
        break;
    case KIND_TEXT:
    case KIND_SECTION:
        break;
    }
}

/* Write the canonical form into `buffer`; returns its length, or 0 if it did not fit. */
static size_t write_canonical_here(const moegen_spec *spec, char *buffer, size_t capacity) {
    text_builder builder = {buffer, capacity, 0, 0};
    int section, id;
    buffer[0] = '\0';
    for (section = SECTION_TOP; section < SECTION_COUNT; section++) {
        if (section != SECTION_TOP)
            builder_append(&builder, "%s:\n", section_key((spec_section)section));
        for (id = 0; id < FIELD_COUNT; id++) {
            const field_descriptor *field = &field_table[id];
            if ((int)field->section != section || field->kind == KIND_SECTION || (field->flags & FLAG_DISPLAY_ONLY))
                continue;
            if (field_applies(spec, (field_id)id, NULL, 0))
                append_field(&builder, spec, (field_id)id);
        }
    }
    return builder.overflow ? 0 : builder.used;
}

/* Canonical text is written in the C locale (gen/c_locale.h). */
static size_t write_canonical(const moegen_spec *spec, char *buffer, size_t capacity) {
    moegen_c_locale_scope scope;
    moegen_c_locale_enter(&scope);
    size_t result = write_canonical_here(spec, buffer, capacity);
    moegen_c_locale_leave(&scope);
    return result;
}

/* See spec.h. Precondition: `spec` came from moegen_spec_parse. Returns NULL when out of
 * memory (or, never for a validated spec, when the form exceeds its fixed bound). */
char *moegen_spec_canonical(const moegen_spec *spec) {
    char buffer[CANONICAL_MAX_BYTES];
    size_t length;
    char *copy;
    if (!spec)
        return NULL;
    length = write_canonical(spec, buffer, sizeof buffer);
    if (length == 0)
        return NULL;
    copy = malloc(length + 1);
    if (copy)
        memcpy(copy, buffer, length + 1);
    return copy;
}

/* See spec.h. Precondition: `spec` came from moegen_spec_parse. Needs no heap memory. */
void moegen_spec_hash(const moegen_spec *spec, char hex[65]) {
    char buffer[CANONICAL_MAX_BYTES];
    size_t length = spec ? write_canonical(spec, buffer, sizeof buffer) : 0;
    moegen_sha256_hex(buffer, length, hex);
}

/* ---- public: derived sizes and names ------------------------------------------------------ */

/* See spec.h: 1 for swiglu and geglu (the first GEMM produces gate and up halves). */
int moegen_activation_is_gated(moegen_activation act) {
    return act == MOEGEN_ACT_SWIGLU || act == MOEGEN_ACT_GEGLU;
}

/* See spec.h: rows of W1 per expert, F or 2F when gated. */
int64_t moegen_spec_ffn_rows(const moegen_spec *spec) {
    return moegen_activation_is_gated(spec->activation) ? 2 * spec->moe_intermediate_size
                                                        : spec->moe_intermediate_size;
}

/* See spec.h: bytes per element, 4 for fp32, 2 for fp16 and bf16 (0 if unknown). */
size_t moegen_dtype_size(moegen_dtype dt) {
    switch (dt) {
    case MOEGEN_DTYPE_FP32: return 4;
    case MOEGEN_DTYPE_FP16:
    case MOEGEN_DTYPE_BF16: return 2;
    }
    return 0;
}

/* The name functions return the YAML spelling, or "unknown" for a value out of range. */
const char *moegen_dtype_name(moegen_dtype dt) { return enum_name(dtype_names, COUNT_OF(dtype_names), (int)dt); }
const char *moegen_activation_name(moegen_activation act) {
    return enum_name(activation_names, COUNT_OF(activation_names), (int)act);
}
const char *moegen_score_fn_name(moegen_score_fn v) {
    return enum_name(score_fn_names, COUNT_OF(score_fn_names), (int)v);
}
const char *moegen_order_name(moegen_order v) { return enum_name(order_names, COUNT_OF(order_names), (int)v); }
const char *moegen_group_score_name(moegen_group_score v) {
    return enum_name(group_score_names, COUNT_OF(group_score_names), (int)v);
}
const char *moegen_group_mask_name(moegen_group_mask v) {
    return enum_name(group_mask_names, COUNT_OF(group_mask_names), (int)v);
}
const char *moegen_noise_name(moegen_noise v) { return enum_name(noise_names, COUNT_OF(noise_names), (int)v); }
const char *moegen_aux_loss_name(moegen_aux_loss v) {
    return enum_name(aux_loss_names, COUNT_OF(aux_loss_names), (int)v);
}
const char *moegen_capacity_mode_name(moegen_capacity_mode v) {
    return enum_name(capacity_mode_names, COUNT_OF(capacity_mode_names), (int)v);
}
const char *moegen_capacity_formula_name(moegen_capacity_formula v) {
    return enum_name(capacity_formula_names, COUNT_OF(capacity_formula_names), (int)v);
}
const char *moegen_priority_name(moegen_priority v) {
    return enum_name(priority_names, COUNT_OF(priority_names), (int)v);
}
const char *moegen_semantics_name(moegen_semantics v) {
    return enum_name(semantics_names, COUNT_OF(semantics_names), (int)v);
}
const char *moegen_mode_name(moegen_mode v) { return enum_name(mode_names, COUNT_OF(mode_names), (int)v); }
