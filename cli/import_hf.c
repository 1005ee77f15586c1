/* import_hf.c — `moegen import-hf CONFIG [-o SPEC]`: a spec for one MoE layer from a Hugging
 * Face config.json.
 *
 *   config.json -> cli/json.c (strict JSON, line:col errors)
 *               -> the family of its model_type: the keys it reads, its routing as the
 *                  transformers modeling code computes it, and its checkpoint's tensor names
 *               -> YAML text (comments: routing, differences, the tensor mapping)
 *               -> gen/spec.c validates that text before it is written (round trip)
 *
 * Failures: an unknown model_type, missing keys (all of them named in one message), values
 * of the wrong JSON type (each with its line:col), and features the spec language cannot
 * express. The last are refused unless --approximate is given; then the closest spec is
 * written, each difference is printed as a warning and kept as a comment in the YAML.
 * What each family maps to: docs/import-hf.md.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "c_locale.h"
#include "cli.h"
#include "json.h"
#include "spec.h"
#include "text.h"

static const char usage_import_hf[] =
    "usage: moegen import-hf CONFIG [-o SPEC] [-n NAME] [--dtype D] [--approximate]\n"
    "\n"
    "Write a spec for one MoE layer of a Hugging Face model from its config.json. The\n"
    "routing follows the transformers modeling code of the config's model_type; comments\n"
    "in the YAML map the checkpoint's tensor names and layouts to moegen's weights.\n"
    "Families: mixtral, minimax, qwen2_moe, qwen3_moe, qwen3_next, olmoe, deepseek_v2,\n"
    "deepseek_v3, glm4_moe, gpt_oss, llama4, llama4_text, granitemoe, granitemoeshared,\n"
    "granitemoehybrid, phimoe, dbrx, jamba, ernie4_5_moe (docs/import-hf.md).\n"
    "\n"
    "options:\n"
    "  -o, --output SPEC   write the spec to SPEC (default: standard output)\n"
    "  -n, --name NAME     the spec's name (default: from _name_or_path, else model_type)\n"
    "  --dtype D           fp32, fp16 or bf16 instead of the config's torch_dtype / dtype\n"
    "  --approximate       for a feature the spec language cannot express (gpt-oss's clamped\n"
    "                      SwiGLU, PhiMoE's sparsemixer, ...), write the closest spec and say\n"
    "                      what differs (warnings and YAML comments) instead of refusing\n";

/* ---- growable text ------------------------------------------------------------------------ */

typedef moegen_cli_text text; /* cli/text.h */

/* Append one item of a list: `separator` before every item but the first. */
static void text_item(text *t, const char *separator, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void text_item(text *t, const char *separator, const char *fmt, ...) {
    va_list ap;
    if (t->length) moegen_cli_text_add(t, "%s", separator);
    va_start(ap, fmt);
    moegen_cli_text_addv(t, fmt, ap);
    va_end(ap);
}

/* `in` made safe for a YAML comment or a double-quoted scalar: valid UTF-8 kept, control
 * characters and invalid bytes replaced by '?', at most `max_chars` characters (then "..."). */
static void clean_text(const char *in, text *out, size_t max_chars) {
    const unsigned char *s = (const unsigned char *)in;
    size_t chars = 0;
    while (*s) {
        if (chars == max_chars) {
            moegen_cli_text_add(out, "...");
            return;
        }
        size_t n = 1;
        unsigned long cp = *s;
        if (*s >= 0x80) {
            n = (*s >= 0xc2 && *s <= 0xdf) ? 2 : (*s >= 0xe0 && *s <= 0xef) ? 3 : (*s >= 0xf0 && *s <= 0xf4) ? 4 : 0;
            cp = n == 2 ? (*s & 0x1fu) : n == 3 ? (*s & 0x0fu) : (*s & 0x07u);
            for (size_t i = 1; i < n; i++) {
                if ((s[i] & 0xc0) != 0x80) {
                    n = 0;
                    break;
                }
                cp = (cp << 6) | (s[i] & 0x3fu);
            }
            if (n && ((n == 2 && cp < 0x80) || (n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                      (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0x80 && cp < 0xa0)))
                n = 0;
        } else if (cp < 0x20 || cp == 0x7f) {
            n = 0;
        }
        if (n == 0) {
            moegen_cli_text_add(out, "?");
            s++;
        } else {
            moegen_cli_text_add(out, "%.*s", (int)n, (const char *)s);
            s += n;
        }
        chars++;
    }
}

/* A YAML double-quoted scalar of `in` (cleaned first). */
static void add_yaml_quoted(text *out, const char *in, size_t max_chars) {
    text clean = {0};
    clean_text(in, &clean, max_chars);
    moegen_cli_text_add(out, "\"");
    for (const char *s = moegen_cli_text_str(&clean); *s; s++) {
        if (*s == '"' || *s == '\\') moegen_cli_text_add(out, "\\%c", *s);
        else moegen_cli_text_add(out, "%c", *s);
    }
    moegen_cli_text_add(out, "\"");
    if (clean.failed) out->failed = 1;
    moegen_cli_text_free(&clean);
}

/* A paragraph as "# "-comment lines of at most 96 columns: `first` starts the first line,
 * `next` the others (hanging indent). Breaks at spaces outside [...] and [...); a word longer
 * than a line stays whole. */
static void add_comment(text *out, const char *first, const char *next, const char *paragraph) {
    const size_t width = 96;
    const char *prefix = first;
    const char *s = paragraph;
    while (*s) {
        size_t room = width - 2 - strlen(prefix), end = 0, last_space = 0;
        int in_brackets = 0; /* "[E, 2F, H]" and "[0, F)" stay on one line */
        while (s[end] && end <= room) {
            if (s[end] == '[') in_brackets = 1;
            else if (s[end] == ']' || s[end] == ')') in_brackets = 0;
            else if (s[end] == ' ' && !in_brackets) last_space = end;
            end++;
        }
        size_t take = s[end] == '\0' ? end : (last_space ? last_space : end);
        if (take == 0) take = end;
        if (s[take] != '\0' && !last_space) /* a long word: to the next space */
            while (s[take] && s[take] != ' ') take++;
        moegen_cli_text_add(out, "# %s%.*s\n", prefix, (int)take, s);
        s += take;
        while (*s == ' ') s++;
        prefix = next;
    }
}

/* ---- reading keys ------------------------------------------------------------------------------- */

#define NAMES(...) ((const char *const[]){__VA_ARGS__, NULL})
#define MAX_SIZE_VALUE 2147483647LL /* sizes and counts: larger ones are refused before any product */

typedef struct reader {
    const char *path;
    const moegen_json *root;    /* the whole config */
    const moegen_json *section; /* where the MoE keys are: the root or text_config */
    const char *prefix;         /* "" or "text_config." for messages */
    text missing;               /* keys that are absent or null, ", "-separated */
    text problems;              /* values of the wrong type, "; "-separated, with line:col */
    text keys;                  /* "name value" of every key read, for the description */
} reader;

/* The value at a dotted path ("ffn_config.moe_top_k") under `base`, or NULL. */
static const moegen_json *find_path(const moegen_json *base, const char *dotted) {
    char part[128];
    const char *s = dotted;
    while (base) {
        const char *dot = strchr(s, '.');
        size_t n = dot ? (size_t)(dot - s) : strlen(s);
        if (n >= sizeof part) return NULL;
        memcpy(part, s, n);
        part[n] = '\0';
        base = moegen_json_get(base, part);
        if (!dot) return base;
        s = dot + 1;
    }
    return NULL;
}

/* The first of `names` that is present and not null under the section. *name gets the name
 * it was found under (or names[0]); *null_seen is set when one was present as null. */
static const moegen_json *lookup(const reader *r, const char *const *names, const char **name, int *null_seen) {
    *name = names[0];
    *null_seen = 0;
    for (int i = 0; names[i]; i++) {
        const moegen_json *value = find_path(r->section, names[i]);
        if (value && value->type == MOEGEN_JSON_NULL) {
            *null_seen = 1;
            continue;
        }
        if (value) {
            *name = names[i];
            return value;
        }
    }
    return NULL;
}

static void add_missing(reader *r, const char *const *names, int null_seen) {
    text alternatives = {0};
    for (int i = 1; names[i]; i++) text_item(&alternatives, ", ", "%s%s", r->prefix, names[i]);
    text_item(&r->missing, ", ", "%s%s%s%s%s%s", r->prefix, names[0], alternatives.length ? " (or " : "",
              moegen_cli_text_str(&alternatives), alternatives.length ? ")" : "", null_seen ? " (null)" : "");
    moegen_cli_text_free(&alternatives);
}

static void add_problem(reader *r, const moegen_json *value, const char *name, const char *what) {
    text_item(&r->problems, "; ", "%s:%d:%d: %s%s: %s", r->path, value->line, value->col, r->prefix, name, what);
}

/* Record "name value" for the description. */
static void add_key(reader *r, const char *name, const moegen_json *value) {
    text shown = {0};
    if (value->type == MOEGEN_JSON_STRING) clean_text(value->text, &shown, 48);
    else if (value->type == MOEGEN_JSON_NUMBER) clean_text(value->text, &shown, 32);
    else if (value->type == MOEGEN_JSON_BOOL) moegen_cli_text_add(&shown, "%s", value->boolean ? "true" : "false");
    else moegen_cli_text_add(&shown, "%s", moegen_json_type_name(value->type));
    text_item(&r->keys, ", ", "%s%s %s", r->prefix, name, moegen_cli_text_str(&shown));
    moegen_cli_text_free(&shown);
}

static void add_default_key(reader *r, const char *name, const char *shown) {
    text_item(&r->keys, ", ", "%s%s %s (default)", r->prefix, name, shown);
}

static int check_type(reader *r, const moegen_json *value, const char *name, moegen_json_type type,
                      const char *expected) {
    if (value->type == type) return 1;
    char what[96];
    snprintf(what, sizeof what, "expected %s, found %s", expected, moegen_json_type_name(value->type));
    add_problem(r, value, name, what);
    return 0;
}

/* An integer in [0, MAX_SIZE_VALUE]. Returns 1 when *out was set from the config. */
static int read_int(reader *r, const char *const *names, int required, int64_t fallback, int64_t *out) {
    const char *name;
    int null_seen;
    const moegen_json *value = lookup(r, names, &name, &null_seen);
    *out = fallback;
    if (!value) {
        if (required) {
            add_missing(r, names, null_seen);
        } else {
            char shown[32];
            snprintf(shown, sizeof shown, "%lld", (long long)fallback);
            add_default_key(r, names[0], shown);
        }
        return 0;
    }
    if (!check_type(r, value, name, MOEGEN_JSON_NUMBER, "an integer")) return 0;
    if (!value->is_integer) {
        add_problem(r, value, name, "expected an integer, found a number with a fraction or exponent");
        return 0;
    }
    if (value->integer < 0 || value->integer > MAX_SIZE_VALUE) {
        char what[96];
        snprintf(what, sizeof what, "%lld is out of range (0..%lld)", (long long)value->integer, MAX_SIZE_VALUE);
        add_problem(r, value, name, what);
        return 0;
    }
    *out = value->integer;
    add_key(r, name, value);
    return 1;
}

static int read_float(reader *r, const char *const *names, double fallback, double *out) {
    const char *name;
    int null_seen;
    const moegen_json *value = lookup(r, names, &name, &null_seen);
    *out = fallback;
    if (!value) {
        char shown[32];
        snprintf(shown, sizeof shown, "%g", fallback);
        add_default_key(r, names[0], shown);
        return 0;
    }
    if (!check_type(r, value, name, MOEGEN_JSON_NUMBER, "a number")) return 0;
    *out = value->number;
    add_key(r, name, value);
    return 1;
}

static int read_bool(reader *r, const char *const *names, int fallback, int *out) {
    const char *name;
    int null_seen;
    const moegen_json *value = lookup(r, names, &name, &null_seen);
    *out = fallback;
    if (!value) {
        add_default_key(r, names[0], fallback ? "true" : "false");
        return 0;
    }
    if (!check_type(r, value, name, MOEGEN_JSON_BOOL, "true or false")) return 0;
    *out = value->boolean;
    add_key(r, name, value);
    return 1;
}

/* A string; *out points into the JSON tree (or is `fallback`, which may be NULL). */
static int read_string(reader *r, const char *const *names, const char *fallback, const char **out) {
    const char *name;
    int null_seen;
    const moegen_json *value = lookup(r, names, &name, &null_seen);
    *out = fallback;
    if (!value) {
        if (fallback) add_default_key(r, names[0], fallback);
        return 0;
    }
    if (!check_type(r, value, name, MOEGEN_JSON_STRING, "a string")) return 0;
    *out = value->text;
    add_key(r, name, value);
    return 1;
}

/* ---- the layer ------------------------------------------------------------------------------------ */

typedef struct layer {
    const char *family;   /* "Mixtral" */
    const char *hf_block; /* transformers class that computes the layer */
    int64_t E, k, H, F;
    const char *activation;
    const char *dtype;
    const char *score, *order; /* order: softmax only */
    int norm;
    double rsf;
    int64_t n_group, topk_group, group_topm; /* n_group 1: no group limit */
    const char *group_score, *group_mask;
    int score_bias, router_bias, expert_bias, weight_on_input;
    int64_t shared_count, shared_F;
    int shared_gate;
    text routing;     /* what transformers computes, one paragraph */
    text notes;       /* paragraphs, '\n'-separated */
    text features;    /* what the spec cannot express, "; "-separated (the refusal) */
    text differences; /* what the approximate spec does instead, '\n'-separated */
    text unsupported; /* what cannot even be approximated, "; "-separated */
    text weights;     /* tensor mapping paragraphs, '\n'-separated */
} layer;

static void layer_free(layer *L) {
    moegen_cli_text_free(&L->routing);
    moegen_cli_text_free(&L->notes);
    moegen_cli_text_free(&L->features);
    moegen_cli_text_free(&L->differences);
    moegen_cli_text_free(&L->unsupported);
    moegen_cli_text_free(&L->weights);
}

static void inexact(layer *L, const char *feature, const char *difference) {
    text_item(&L->features, "; ", "%s", feature);
    text_item(&L->differences, "\n", "%s", difference);
}

static void set_softmax(layer *L, const char *order, int norm) {
    L->score = "softmax";
    L->order = order;
    L->norm = norm;
}

/* hidden_act of gated (gate and up projection) experts -> swiglu or geglu. */
static void gated_activation(reader *r, layer *L, const char *const *names) {
    const char *act;
    read_string(r, names, "silu", &act);
    if (!act) return;
    L->activation = "swiglu";
    if (!strcmp(act, "silu") || !strcmp(act, "swish")) return;
    if (!strcmp(act, "gelu") || !strcmp(act, "gelu_python")) {
        L->activation = "geglu";
        return;
    }
    text clean = {0};
    clean_text(act, &clean, 48);
    if (!strcmp(act, "gelu_pytorch_tanh") || !strcmp(act, "gelu_new") || !strcmp(act, "gelu_fast") ||
        !strcmp(act, "gelu_accurate")) {
        char feature[160], difference[240];
        snprintf(feature, sizeof feature,
                 "hidden_act %s (tanh-approximated GELU) on gated experts: moegen's geglu uses the exact erf GELU",
                 moegen_cli_text_str(&clean));
        snprintf(difference, sizeof difference,
                 "activation geglu uses the exact erf GELU; the checkpoint's experts use %s, its tanh approximation "
                 "(they differ by up to about 1e-3 of the value)",
                 moegen_cli_text_str(&clean));
        L->activation = "geglu";
        inexact(L, feature, difference);
    } else {
        text_item(&L->unsupported, "; ",
                  "hidden_act %s on gated experts: moegen's gated activations are swiglu (silu) and geglu (gelu), "
                  "and no other is close enough to stand in for it",
                  moegen_cli_text_str(&clean));
    }
    moegen_cli_text_free(&clean);
}

static void shared_from(layer *L, int64_t count_in_config, int64_t size_each) {
    if (count_in_config <= 0 || size_each <= 0) return;
    L->shared_count = 1; /* the checkpoint holds one MLP of count x size */
    L->shared_F = count_in_config * size_each;
}

/* The tensor-mapping paragraphs every family starts with. */
static void weights_legend(layer *L) {
    text_item(&L->weights, "\n",
              "Weights: moegen tensor (moegen_weights in include/moegen/moegen.h; the file names of `moegen run "
              "--load`) <- the checkpoint's tensors. {L} is a MoE layer, {e} an expert (0..E-1); E=%lld, "
              "H=%lld, F=%lld%s. Layouts are [out, in] (nn.Linear's weight) in the layer dtype unless marked "
              "fp32; moegen's w1 holds the gate projection in rows [0, F) and the up projection in rows [F, 2F) "
              "(templates/common/moegen_kernel_abi.h).",
              (long long)L->E, (long long)L->H, (long long)L->F, L->shared_count ? ", Fs = the shared size below" : "");
}

/* Per-expert gate/up/down tensors under `prefix` (e.g. model.layers.{L}.mlp). */
static void weights_separate(layer *L, const char *prefix, const char *router, const char *gate, const char *up,
                             const char *down) {
    weights_legend(L);
    text_item(&L->weights, "\n", "router_w [E, H] fp32 <- %s.%s [E, H] (cast to fp32)", prefix, router);
    text_item(&L->weights, "\n",
              "w1 [E, 2F, H]: w1[e] rows [0, F) <- %s.experts.{e}.%s [F, H] (gate); rows [F, 2F) <- "
              "%s.experts.{e}.%s [F, H] (up)",
              prefix, gate, prefix, up);
    text_item(&L->weights, "\n", "w2 [E, H, F]: w2[e] <- %s.experts.{e}.%s [H, F]", prefix, down);
}

static void weights_shared(layer *L, const char *module, const char *gate, const char *up, const char *down) {
    text_item(&L->weights, "\n",
              "shared_w1 [1, 2Fs, H], Fs = %lld: rows [0, Fs) <- %s.%s [Fs, H] (gate); rows [Fs, 2Fs) <- %s.%s "
              "[Fs, H] (up)",
              (long long)L->shared_F, module, gate, module, up);
    text_item(&L->weights, "\n", "shared_w2 [1, H, Fs] <- %s.%s [H, Fs]", module, down);
}

static void weights_fused_v5(layer *L, const char *prefix) {
    text_item(&L->weights, "\n",
              "transformers 5 loads these experts fused: %s.experts.gate_up_proj [E, 2F, H] is w1 as it is (gate "
              "first) and %s.experts.down_proj [E, H, F] is w2.",
              prefix, prefix);
}

/* ---- families ------------------------------------------------------------------------------------- */

static void read_sizes(reader *r, layer *L, const char *const *experts, const char *const *top_k,
                       const char *const *hidden, const char *const *ffn) {
    read_int(r, experts, 1, 0, &L->E);
    read_int(r, top_k, 1, 0, &L->k);
    read_int(r, hidden, 1, 0, &L->H);
    read_int(r, ffn, 1, 0, &L->F);
}

static void train_jitter_note(reader *r, layer *L, const char *key) {
    double jitter;
    if (read_float(r, NAMES(key), 0.0, &jitter) && jitter > 0)
        text_item(&L->notes, "\n",
                  "%s %g is a training-time input jitter; it is not imported (this spec is for inference, "
                  "mode eval).",
                  key, jitter);
}

static void qwen_moe_layers_note(reader *r, layer *L) {
    int64_t step;
    read_int(r, NAMES("decoder_sparse_step"), 0, 1, &step);
    text_item(&L->notes, "\n",
              "MoE layers: every layer L with (L + 1) %% decoder_sparse_step (%lld) == 0 and L not in "
              "mlp_only_layers; the others are dense MLPs.",
              (long long)step);
}

static void family_mixtral(reader *r, layer *L) {
    L->hf_block = "MixtralSparseMoeBlock";
    read_sizes(r, L, NAMES("num_local_experts", "num_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    set_softmax(L, "softmax_then_topk", 1);
    moegen_cli_text_add(&L->routing, "softmax over all experts in fp32, the top k, divided by their sum (always).");
    train_jitter_note(r, L, "router_jitter_noise");
    weights_separate(L, "model.layers.{L}.block_sparse_moe", "gate.weight", "w1.weight", "w3.weight", "w2.weight");
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

static void family_minimax(reader *r, layer *L) {
    family_mixtral(r, L);
    L->hf_block = "MiniMaxSparseMoeBlock";
    text_item(&L->notes, "\n",
              "The decoder layer adds residual x mlp_alpha_factor to the block's output x mlp_beta_factor outside "
              "this layer.");
}

static void family_qwen_like(reader *r, layer *L, const char *block, const char *const *experts, int shared,
                             int norm_default) {
    L->hf_block = block;
    read_sizes(r, L, experts, NAMES("num_experts_per_tok"), NAMES("hidden_size"), NAMES("moe_intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    int norm;
    read_bool(r, NAMES("norm_topk_prob"), norm_default, &norm);
    set_softmax(L, "softmax_then_topk", norm);
    moegen_cli_text_add(&L->routing, "softmax over all experts in fp32, the top k%s.",
             norm ? ", divided by their sum (norm_topk_prob)" : ", not renormalized (norm_topk_prob false)");
    if (shared) {
        int64_t shared_F;
        if (read_int(r, NAMES("shared_expert_intermediate_size"), 1, 0, &shared_F) && shared_F > 0) {
            L->shared_count = 1;
            L->shared_F = shared_F;
            L->shared_gate = 1;
            moegen_cli_text_add(&L->routing, " One shared expert on every token, scaled by sigmoid(x . shared_expert_gate).");
        }
    }
    qwen_moe_layers_note(r, L);
    weights_separate(L, "model.layers.{L}.mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight");
    if (L->shared_count) {
        weights_shared(L, "model.layers.{L}.mlp.shared_expert", "gate_proj.weight", "up_proj.weight",
                       "down_proj.weight");
        text_item(&L->weights, "\n", "shared_gate [H] fp32 <- model.layers.{L}.mlp.shared_expert_gate.weight [1, H]");
    }
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

static void family_qwen2_moe(reader *r, layer *L) {
    family_qwen_like(r, L, "Qwen2MoeSparseMoeBlock", NAMES("num_experts", "num_local_experts"), 1, 0);
}

static void family_qwen3_moe(reader *r, layer *L) {
    family_qwen_like(r, L, "Qwen3MoeSparseMoeBlock", NAMES("num_experts", "num_local_experts"), 0, 0);
}

static void family_qwen3_next(reader *r, layer *L) {
    family_qwen_like(r, L, "Qwen3NextSparseMoeBlock", NAMES("num_experts", "num_local_experts"), 1, 1);
}

static void family_olmoe(reader *r, layer *L) {
    L->hf_block = "OlmoeSparseMoeBlock";
    read_sizes(r, L, NAMES("num_experts", "num_local_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    int norm;
    read_bool(r, NAMES("norm_topk_prob"), 0, &norm);
    set_softmax(L, "softmax_then_topk", norm);
    moegen_cli_text_add(&L->routing, "softmax over all experts in fp32, the top k%s.",
             norm ? ", divided by their sum (norm_topk_prob)" : ", not renormalized (norm_topk_prob false)");
    text_item(&L->notes, "\n", "MoE layers: every layer.");
    weights_separate(L, "model.layers.{L}.mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight");
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

static void quantization_note(reader *r, layer *L) {
    const moegen_json *quant = moegen_json_get(r->root, "quantization_config");
    const moegen_json *method = moegen_json_get(quant, "quant_method");
    if (!method || method->type != MOEGEN_JSON_STRING) return;
    text clean = {0};
    clean_text(method->text, &clean, 32);
    if (!strcmp(method->text, "fp8"))
        text_item(&L->notes, "\n",
                  "The checkpoint's weights are fp8 (quantization_config.quant_method fp8) with a "
                  "<name>_scale_inv tensor per weight (one scale per 128 x 128 block): dequantize (weight x scale "
                  "of its block) to the layer dtype before binding them.");
    else if (!strcmp(method->text, "mxfp4"))
        text_item(&L->notes, "\n",
                  "The checkpoint's expert weights are MXFP4 (quantization_config.quant_method mxfp4): "
                  "<name>_blocks and <name>_scales; dequantize them (transformers' "
                  "integrations/mxfp4.py does) before binding them.");
    else
        text_item(&L->notes, "\n",
                  "The checkpoint is quantized (quantization_config.quant_method %s): dequantize its weights to "
                  "the layer dtype before binding them.",
                  moegen_cli_text_str(&clean));
    moegen_cli_text_free(&clean);
}

static void deepseek_tensors(layer *L, int score_bias) {
    weights_separate(L, "model.layers.{L}.mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight");
    if (score_bias)
        text_item(&L->weights, "\n", "score_bias [E] fp32 <- model.layers.{L}.mlp.gate.e_score_correction_bias [E]");
    if (L->shared_count)
        weights_shared(L, "model.layers.{L}.mlp.shared_experts", "gate_proj.weight", "up_proj.weight",
                       "down_proj.weight");
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

static void shared_sentence(layer *L, const char *key, int64_t count) {
    if (L->shared_count && count == 1)
        moegen_cli_text_add(&L->routing, " %s 1: one shared MLP of moe_intermediate_size on every token.", key);
    else if (L->shared_count)
        moegen_cli_text_add(&L->routing,
                 " %s %lld: one shared MLP of %lld x moe_intermediate_size = %lld on every token (as the checkpoint "
                 "stores it; the same as %lld experts of moe_intermediate_size summed).",
                 key, (long long)count, (long long)count, (long long)L->shared_F, (long long)count);
}

static void family_deepseek_v2(reader *r, layer *L) {
    L->hf_block = "DeepseekV2Moe";
    read_sizes(r, L, NAMES("n_routed_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("moe_intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    int64_t n_shared, first_dense, freq;
    read_int(r, NAMES("n_shared_experts"), 1, 0, &n_shared);
    shared_from(L, n_shared, L->F);
    const char *method, *scoring = NULL;
    read_string(r, NAMES("topk_method"), "greedy", &method);
    read_float(r, NAMES("routed_scaling_factor"), 1.0, &L->rsf);
    int norm = 0;
    int norm_written = read_bool(r, NAMES("norm_topk_prob"), 0, &norm);
    read_string(r, NAMES("scoring_func"), NULL, &scoring);
    set_softmax(L, "softmax_then_topk", 0);
    moegen_cli_text_add(&L->routing, "softmax over all experts in fp32, ");
    if (method && !strcmp(method, "group_limited_greedy")) {
        read_int(r, NAMES("n_group"), 1, 1, &L->n_group);
        read_int(r, NAMES("topk_group"), 1, 1, &L->topk_group);
        if (L->n_group > 1) {
            L->group_score = "max";
            L->group_mask = "neg_inf";
            moegen_cli_text_add(&L->routing,
                     "topk_method group_limited_greedy: the topk_group (%lld) groups of n_group (%lld) with the best "
                     "single score kept and the other groups' experts left out (transformers sets their scores to "
                     "0, below every softmax score), then ",
                     (long long)L->topk_group, (long long)L->n_group);
        }
    } else if (method && strcmp(method, "greedy")) {
        text clean = {0};
        clean_text(method, &clean, 48);
        text_item(&L->unsupported, "; ",
                  "topk_method %s: transformers' DeepseekV2 implements greedy and group_limited_greedy only",
                  moegen_cli_text_str(&clean));
        moegen_cli_text_free(&clean);
    }
    moegen_cli_text_add(&L->routing, "the top k, times routed_scaling_factor (%g); never renormalized.", L->rsf);
    shared_sentence(L, "n_shared_experts", n_shared);
    if (norm_written && norm)
        text_item(&L->notes, "\n",
                  "norm_topk_prob true is ignored by transformers' DeepseekV2 (this spec follows it); DeepSeek's "
                  "own modeling_deepseek.py instead divides the top-k weights by their sum and does not scale "
                  "them.");
    if (scoring && strcmp(scoring, "softmax"))
        text_item(&L->notes, "\n", "scoring_func is ignored by transformers' DeepseekV2, which always uses softmax.");
    read_int(r, NAMES("first_k_dense_replace"), 0, 0, &first_dense);
    read_int(r, NAMES("moe_layer_freq"), 0, 1, &freq);
    text_item(&L->notes, "\n",
              "MoE layers: L >= first_k_dense_replace (%lld) with L %% moe_layer_freq (%lld) == 0; the others "
              "are dense MLPs.",
              (long long)first_dense, (long long)freq);
    quantization_note(r, L);
    deepseek_tensors(L, 0);
}

/* DeepSeek-V3 and GLM-4-MoE: transformers computes both the same way. */
static void family_noaux(reader *r, layer *L, const char *block, int64_t shared_default, int64_t groups_default,
                         int64_t topk_group_default, double rsf_default, int64_t dense_default) {
    L->hf_block = block;
    read_sizes(r, L, NAMES("n_routed_experts", "num_local_experts"), NAMES("num_experts_per_tok"),
               NAMES("hidden_size"), NAMES("moe_intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    int64_t n_shared, first_dense;
    read_int(r, NAMES("n_shared_experts"), 0, shared_default, &n_shared);
    shared_from(L, n_shared, L->F);
    read_int(r, NAMES("n_group"), 0, groups_default, &L->n_group);
    read_int(r, NAMES("topk_group"), 0, topk_group_default, &L->topk_group);
    read_bool(r, NAMES("norm_topk_prob"), 1, &L->norm);
    read_float(r, NAMES("routed_scaling_factor"), rsf_default, &L->rsf);
    const char *method = NULL, *scoring = NULL;
    read_string(r, NAMES("topk_method"), NULL, &method);
    read_string(r, NAMES("scoring_func"), NULL, &scoring);
    L->score = "sigmoid";
    L->score_bias = 1;
    moegen_cli_text_add(&L->routing, "sigmoid scores in fp32; selection on score + e_score_correction_bias (topk_method "
                          "noaux_tc), ");
    if (L->n_group > 1) {
        L->group_topm = 2;
        L->group_score = "topm_sum";
        L->group_mask = "neg_inf";
        moegen_cli_text_add(&L->routing,
                 "first the topk_group (%lld) best of n_group (%lld) groups by the sum of their two best biased "
                 "scores, the other groups masked with -inf, then ",
                 (long long)L->topk_group, (long long)L->n_group);
    }
    moegen_cli_text_add(&L->routing, "the top k; weights are the unbiased scores%s, times routed_scaling_factor (%g).",
             L->norm ? " divided by their sum (norm_topk_prob)" : "", L->rsf);
    shared_sentence(L, "n_shared_experts", n_shared);
    if ((method && strcmp(method, "noaux_tc")) || (scoring && strcmp(scoring, "sigmoid")))
        text_item(&L->notes, "\n",
                  "topk_method and scoring_func are ignored by transformers' %s, which always routes as above "
                  "(this spec follows it).",
                  block);
    read_int(r, NAMES("first_k_dense_replace"), 0, dense_default, &first_dense);
    text_item(&L->notes, "\n", "MoE layers: L >= first_k_dense_replace (%lld); the first ones are dense MLPs.",
              (long long)first_dense);
    quantization_note(r, L);
    deepseek_tensors(L, 1);
}

static void family_deepseek_v3(reader *r, layer *L) {
    family_noaux(r, L, "DeepseekV3MoE", 1, 8, 4, 2.5, 3);
}

static void family_glm4_moe(reader *r, layer *L) {
    family_noaux(r, L, "Glm4MoeMoE", 1, 1, 1, 1.0, 1);
}

static void family_gpt_oss(reader *r, layer *L) {
    L->hf_block = "GptOssMLP";
    read_sizes(r, L, NAMES("num_local_experts", "num_experts"), NAMES("num_experts_per_tok", "experts_per_token"),
               NAMES("hidden_size"), NAMES("intermediate_size"));
    double alpha, limit;
    read_float(r, NAMES("swiglu_alpha"), 1.702, &alpha);
    read_float(r, NAMES("swiglu_limit"), 7.0, &limit);
    L->activation = "swiglu";
    L->expert_bias = 1;
    L->router_bias = 1;
    set_softmax(L, "topk_then_softmax", 0);
    moegen_cli_text_add(&L->routing,
             "logits with a bias (router.bias), the top k logits, softmax over those k. Experts: gate_up = "
             "x W + b (gate and up interleaved), gate clamped to <= swiglu_limit, up to [-swiglu_limit, "
             "swiglu_limit], out = (up + 1) * gate * sigmoid(swiglu_alpha * gate), then the down projection plus "
             "its bias.");
    char feature[256], difference[640];
    snprintf(feature, sizeof feature,
             "the experts' clamped SwiGLU (swiglu_limit %g: gate clamped to <= %g, up to [-%g, %g]; "
             "(up + 1) * gate * sigmoid(%g * gate))",
             limit, limit, limit, limit, alpha);
    snprintf(difference, sizeof difference,
             "activation swiglu has no clamps: where the gate exceeds %g or |up| exceeds %g the layer differs. "
             "The rest is exact once swiglu_alpha and the +1 are folded into the weights: multiply the gate rows of "
             "w1 and b1 by swiglu_alpha (%g), the up rows of w1 by 1 / swiglu_alpha, and set the up rows of b1 to "
             "(bias + 1) / swiglu_alpha (exact in real arithmetic; bf16 and fp16 weights round once more).",
             limit, limit, alpha);
    inexact(L, feature, difference);
    text_item(&L->notes, "\n", "MoE layers: every layer.");
    quantization_note(r, L);
    weights_legend(L);
    text_item(&L->weights, "\n", "router_w [E, H] fp32 <- model.layers.{L}.mlp.router.weight [E, H]");
    text_item(&L->weights, "\n", "router_b [E] fp32 <- model.layers.{L}.mlp.router.bias [E]");
    text_item(&L->weights, "\n",
              "w1 [E, 2F, H] <- model.layers.{L}.mlp.experts.gate_up_proj, dequantized from gate_up_proj_blocks "
              "and _scales as [E, 2F, H] with gate and up interleaved: w1[e][f] = row 2f (gate), w1[e][F + f] = "
              "row 2f + 1 (up). (transformers holds it transposed, [E, H, 2F]: columns 2f and 2f + 1.)");
    text_item(&L->weights, "\n",
              "b1 [E, 2F] <- model.layers.{L}.mlp.experts.gate_up_proj_bias [E, 2F], interleaved the same way: "
              "b1[e][f] = bias[e][2f], b1[e][F + f] = bias[e][2f + 1]");
    text_item(&L->weights, "\n",
              "w2 [E, H, F] <- model.layers.{L}.mlp.experts.down_proj, dequantized from down_proj_blocks and "
              "_scales as [E, H, F] (transformers holds it as [E, F, H]: transpose)");
    text_item(&L->weights, "\n", "b2 [E, H] <- model.layers.{L}.mlp.experts.down_proj_bias [E, H]");
}

static void family_llama4(reader *r, layer *L) {
    L->hf_block = "Llama4TextMoe";
    read_sizes(r, L, NAMES("num_local_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    L->score = "sigmoid";
    L->weight_on_input = 1;
    L->shared_count = L->F > 0 ? 1 : 0;
    L->shared_F = L->F;
    moegen_cli_text_add(&L->routing,
             "the top k logits, weights w = sigmoid(logit); the expert sees w * x and its output is added "
             "unweighted (weight_on_input); one shared expert of intermediate_size on every token.");
    if (L->k > 1) {
        L->weight_on_input = 0;
        inexact(L, "the routing weight on the input of each of k > 1 experts (moegen's weight_on_input needs k = 1)",
                "the routing weight scales each expert's output instead of its input (weight_on_input needs k = 1)");
    }
    const moegen_json *moe_layers = find_path(r->section, "moe_layers");
    int64_t step;
    read_int(r, NAMES("interleave_moe_layer_step"), 0, 1, &step);
    if (moe_layers && moe_layers->type == MOEGEN_JSON_ARRAY)
        text_item(&L->notes, "\n", "MoE layers: those listed in %smoe_layers; the others are dense MLPs of "
                                   "intermediate_size_mlp.", r->prefix);
    else
        text_item(&L->notes, "\n",
                  "MoE layers: L %% interleave_moe_layer_step (%lld) == %lld; the others are dense MLPs of "
                  "intermediate_size_mlp.",
                  (long long)step, (long long)(step > 0 ? step - 1 : 0));
    const char *prefix = r->section != r->root ? "language_model.model.layers.{L}.feed_forward"
                                               : "model.layers.{L}.feed_forward";
    weights_legend(L);
    text_item(&L->weights, "\n", "router_w [E, H] fp32 <- %s.router.weight [E, H]", prefix);
    text_item(&L->weights, "\n",
              "w1 [E, 2F, H] <- %s.experts.gate_up_proj [E, H, 2F], stored [in, out] with the gate in columns [0, "
              "F): w1[e] = gate_up_proj[e] transposed",
              prefix);
    text_item(&L->weights, "\n", "w2 [E, H, F] <- %s.experts.down_proj [E, F, H]: w2[e] = down_proj[e] transposed",
              prefix);
    char shared_module[96];
    snprintf(shared_module, sizeof shared_module, "%s.shared_expert", prefix);
    weights_shared(L, shared_module, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
}

static void family_granite(reader *r, layer *L, const char *block, int shared, int64_t shared_default) {
    L->hf_block = block;
    read_sizes(r, L, NAMES("num_local_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    set_softmax(L, "topk_then_softmax", 0);
    moegen_cli_text_add(&L->routing, "the top k logits, softmax over those k.");
    if (shared) {
        int64_t shared_F;
        read_int(r, NAMES("shared_intermediate_size"), 0, shared_default, &shared_F);
        if (shared_F > 0) {
            L->shared_count = 1;
            L->shared_F = shared_F;
            moegen_cli_text_add(&L->routing, " One shared MLP of shared_intermediate_size on every token.");
        }
    }
    text_item(&L->notes, "\n",
              "MoE layers: every layer. The decoder layer scales the block's output by residual_multiplier "
              "outside this layer.");
    weights_legend(L);
    text_item(&L->weights, "\n",
              "router_w [E, H] fp32 <- model.layers.{L}.block_sparse_moe.router.layer.weight [E, H] (cast to fp32)");
    text_item(&L->weights, "\n",
              "w1 [E, 2F, H] <- model.layers.{L}.block_sparse_moe.input_linear.weight [E, 2F, H] as it is (gate "
              "rows first)");
    text_item(&L->weights, "\n", "w2 [E, H, F] <- model.layers.{L}.block_sparse_moe.output_linear.weight [E, H, F]");
    if (L->shared_count) {
        text_item(&L->weights, "\n",
                  "shared_w1 [1, 2Fs, H], Fs = %lld <- model.layers.{L}.shared_mlp.input_linear.weight [2Fs, H] "
                  "(gate rows first)",
                  (long long)L->shared_F);
        text_item(&L->weights, "\n", "shared_w2 [1, H, Fs] <- model.layers.{L}.shared_mlp.output_linear.weight [H, Fs]");
    }
    text_item(&L->weights, "\n",
              "(transformers 5 names them block_sparse_moe.router.weight, block_sparse_moe.experts.gate_up_proj and "
              "block_sparse_moe.experts.down_proj.)");
}

static void family_granitemoe(reader *r, layer *L) {
    family_granite(r, L, "GraniteMoeMoE", 0, 0);
}

static void family_granitemoeshared(reader *r, layer *L) {
    family_granite(r, L, "GraniteMoeSharedMoE", 1, 0);
}

static void family_granitemoehybrid(reader *r, layer *L) {
    family_granite(r, L, "GraniteMoeHybridMoE", 1, 1024);
    const moegen_json *experts = find_path(r->section, "num_local_experts");
    if (experts && experts->type == MOEGEN_JSON_NUMBER && experts->number == 0)
        text_item(&L->unsupported, "; ", "num_local_experts 0: this GraniteMoeHybrid model is dense (no MoE layer)");
}

static void family_phimoe(reader *r, layer *L) {
    L->hf_block = "PhimoeSparseMoeBlock";
    read_sizes(r, L, NAMES("num_local_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    double jitter;
    read_float(r, NAMES("router_jitter_noise"), 0.01, &jitter);
    set_softmax(L, "topk_then_softmax", 0);
    moegen_cli_text_add(&L->routing,
             "sparsemixer: the two best logits in turn; each chosen expert's weight is the softmax over the logits "
             "within a relative 2 x router_jitter_noise of it (the first choice excluded for the second).");
    char feature[200], difference[400];
    snprintf(feature, sizeof feature,
             "PhiMoE's sparsemixer weights (each the softmax over the logits within a relative %g of the chosen "
             "one)",
             2 * jitter);
    snprintf(difference, sizeof difference,
             "the same two experts are chosen, but their weights are the softmax over the two chosen logits (they "
             "sum to 1) instead of sparsemixer's, each a softmax over the logits within a relative %g of the chosen "
             "one (often close to 1 each)",
             2 * jitter);
    inexact(L, feature, difference);
    if (L->k != 2 && L->k)
        text_item(&L->notes, "\n", "num_experts_per_tok is %lld, but transformers' sparsemixer always picks 2.",
                  (long long)L->k);
    text_item(&L->notes, "\n", "MoE layers: every layer.");
    weights_separate(L, "model.layers.{L}.block_sparse_moe", "gate.weight", "w1.weight", "w3.weight", "w2.weight");
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

static void family_dbrx(reader *r, layer *L) {
    L->hf_block = "DbrxFFN";
    read_sizes(r, L, NAMES("ffn_config.moe_num_experts"), NAMES("ffn_config.moe_top_k"), NAMES("d_model"),
               NAMES("ffn_config.ffn_hidden_size"));
    gated_activation(r, L, NAMES("ffn_config.ffn_act_fn.name"));
    const char *name;
    int null_seen;
    const moegen_json *p = lookup(r, NAMES("ffn_config.moe_normalize_expert_weights"), &name, &null_seen);
    double norm_p = 1.0;
    if (p && check_type(r, p, name, MOEGEN_JSON_NUMBER, "a number")) {
        norm_p = p->number;
        add_key(r, name, p);
    } else if (!p && null_seen) {
        norm_p = 0; /* None: no normalization */
        text_item(&r->keys, ", ", "ffn_config.moe_normalize_expert_weights null");
    } else if (!p) {
        add_default_key(r, "ffn_config.moe_normalize_expert_weights", "1.0");
    }
    set_softmax(L, "softmax_then_topk", norm_p != 0);
    moegen_cli_text_add(&L->routing, "softmax over all experts (in the model dtype), the top k");
    if (norm_p == 1.0) {
        moegen_cli_text_add(&L->routing, ", divided by their sum (moe_normalize_expert_weights 1: the L1 norm).");
    } else if (norm_p == 0) {
        moegen_cli_text_add(&L->routing, ", not renormalized (moe_normalize_expert_weights null).");
    } else {
        moegen_cli_text_add(&L->routing, ", divided by their L%g norm (moe_normalize_expert_weights).", norm_p);
        char feature[128], difference[200];
        snprintf(feature, sizeof feature, "top-k weights divided by their L%g norm (moe_normalize_expert_weights %g)",
                 norm_p, norm_p);
        snprintf(difference, sizeof difference,
                 "the top-k weights are divided by their sum (the L1 norm), not by their L%g norm", norm_p);
        inexact(L, feature, difference);
    }
    text_item(&L->notes, "\n",
              "transformers computes DBRX's router softmax in the model dtype; moegen's router is fp32. MoE "
              "layers: every block.");
    weights_legend(L);
    text_item(&L->weights, "\n", "router_w [E, H] fp32 <- transformer.blocks.{L}.ffn.router.layer.weight [E, H]");
    text_item(&L->weights, "\n",
              "w1 [E, 2F, H]: w1[e] rows [0, F) <- transformer.blocks.{L}.ffn.experts.mlp.w1 [E x F, H] rows [e F, "
              "(e + 1) F) (gate); rows [F, 2F) <- ffn.experts.mlp.v1, the same rows (up)");
    text_item(&L->weights, "\n",
              "w2 [E, H, F]: w2[e] <- transformer.blocks.{L}.ffn.experts.mlp.w2 [E x F, H] rows [e F, (e + 1) F), "
              "which are [in, out]: transpose");
}

static void family_jamba(reader *r, layer *L) {
    L->hf_block = "JambaSparseMoeBlock";
    read_sizes(r, L, NAMES("num_experts", "num_local_experts"), NAMES("num_experts_per_tok"), NAMES("hidden_size"),
               NAMES("intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    set_softmax(L, "softmax_then_topk", 0);
    moegen_cli_text_add(&L->routing, "softmax over all experts in fp32, the top k, not renormalized.");
    int64_t period, offset;
    read_int(r, NAMES("expert_layer_period"), 0, 2, &period);
    read_int(r, NAMES("expert_layer_offset"), 0, 1, &offset);
    text_item(&L->notes, "\n",
              "MoE layers: L %% expert_layer_period (%lld) == expert_layer_offset (%lld); the others are dense "
              "MLPs.",
              (long long)period, (long long)offset);
    weights_separate(L, "model.layers.{L}.feed_forward", "router.weight", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight");
    weights_fused_v5(L, "model.layers.{L}.feed_forward");
}

static void family_ernie(reader *r, layer *L) {
    L->hf_block = "Ernie4_5_MoeSparseMoeBlock";
    read_sizes(r, L, NAMES("moe_num_experts", "num_experts"), NAMES("moe_k", "num_experts_per_tok"),
               NAMES("hidden_size"), NAMES("moe_intermediate_size"));
    gated_activation(r, L, NAMES("hidden_act"));
    int64_t n_shared, start, end, interval;
    read_int(r, NAMES("moe_num_shared_experts"), 0, 0, &n_shared);
    shared_from(L, n_shared, L->F);
    int use_bias;
    read_bool(r, NAMES("use_bias"), 0, &use_bias);
    set_softmax(L, "softmax_then_topk", 1);
    moegen_cli_text_add(&L->routing,
             "softmax over all experts in fp32; selection on softmax + moe_statics.e_score_correction_bias; "
             "weights are the unbiased softmax scores divided by their sum.");
    shared_sentence(L, "moe_num_shared_experts", n_shared);
    inexact(L,
            "a selection-only bias (moe_statics.e_score_correction_bias) added to softmax scores: moegen's "
            "router.score_bias needs sigmoid or sqrtsoftplus scores",
            "experts are selected on the softmax scores alone, without moe_statics.e_score_correction_bias (exact "
            "only where that bias is zero or does not change the top k)");
    if (use_bias && L->shared_count)
        inexact(L, "biases on the shared experts only (use_bias true)",
                "the shared experts' biases (use_bias) are left out: moegen's expert_bias would put biases on the "
                "routed experts too");
    read_int(r, NAMES("moe_layer_start_index"), 0, 1, &start);
    read_int(r, NAMES("moe_layer_end_index"), 0, 0, &end);
    read_int(r, NAMES("moe_layer_interval"), 0, 1, &interval);
    text_item(&L->notes, "\n",
              "MoE layers: moe_layer_start_index (%lld) <= L <= moe_layer_end_index (%lld) with (L + 1) %% "
              "moe_layer_interval (%lld) == 0.",
              (long long)start, (long long)end, (long long)interval);
    weights_separate(L, "model.layers.{L}.mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight");
    text_item(&L->weights, "\n",
              "model.layers.{L}.mlp.moe_statics.e_score_correction_bias [1, E]: no moegen tensor (see above)");
    if (L->shared_count)
        weights_shared(L, "model.layers.{L}.mlp.shared_experts", "gate_proj.weight", "up_proj.weight",
                       "down_proj.weight");
    weights_fused_v5(L, "model.layers.{L}.mlp");
}

typedef struct family {
    const char *model_type;
    const char *title;
    void (*read)(reader *r, layer *L);
} family;

static const family families[] = {
    {"mixtral", "Mixtral", family_mixtral},
    {"minimax", "MiniMax", family_minimax},
    {"qwen2_moe", "Qwen2-MoE", family_qwen2_moe},
    {"qwen3_moe", "Qwen3-MoE", family_qwen3_moe},
    {"qwen3_next", "Qwen3-Next", family_qwen3_next},
    {"olmoe", "OLMoE", family_olmoe},
    {"deepseek_v2", "DeepSeek-V2", family_deepseek_v2},
    {"deepseek_v3", "DeepSeek-V3", family_deepseek_v3},
    {"glm4_moe", "GLM-4-MoE", family_glm4_moe},
    {"gpt_oss", "gpt-oss", family_gpt_oss},
    {"llama4", "Llama-4", family_llama4},
    {"llama4_text", "Llama-4", family_llama4},
    {"granitemoe", "Granite-MoE", family_granitemoe},
    {"granitemoeshared", "Granite-MoE (shared)", family_granitemoeshared},
    {"granitemoehybrid", "Granite-MoE-Hybrid", family_granitemoehybrid},
    {"phimoe", "PhiMoE", family_phimoe},
    {"dbrx", "DBRX", family_dbrx},
    {"jamba", "Jamba", family_jamba},
    {"ernie4_5_moe", "Ernie-4.5-MoE", family_ernie},
};
#define FAMILY_COUNT (sizeof families / sizeof families[0])

static void known_families(text *out) {
    for (size_t i = 0; i < FAMILY_COUNT; i++) text_item(out, ", ", "%s", families[i].model_type);
}

/* ---- names --------------------------------------------------------------------------------------- */

static int name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
           c == '-';
}

static int valid_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > MOEGEN_SPEC_MAX_NAME || !((name[0] >= 'a' && name[0] <= 'z') || (name[0] >= 'A' && name[0] <= 'Z')))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!name_char(name[i])) return 0;
    return 1;
}

/* `source` (a repository id or a path) as a spec name: its last path component, lowercased,
 * other characters as '-', runs of '-' squeezed, a letter first, at most 64 characters.
 * Empty when nothing usable is left. */
static void sanitize_name(const char *source, char out[MOEGEN_SPEC_MAX_NAME + 1]) {
    size_t n = strlen(source);
    while (n > 0 && source[n - 1] == '/') n--;
    size_t start = n;
    while (start > 0 && source[start - 1] != '/') start--;
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = start; i < n && used < MOEGEN_SPEC_MAX_NAME; i++) {
        char c = source[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (!name_char(c)) c = '-';
        if (c == '-' && (used == 0 || out[used - 1] == '-')) continue;
        if (used == 0 && !(c >= 'a' && c <= 'z')) { /* a name starts with a letter */
            if (used + 3 > MOEGEN_SPEC_MAX_NAME) break;
            memcpy(out, "hf-", 3);
            used = 3;
        }
        out[used++] = c;
    }
    while (used > 0 && (out[used - 1] == '-' || out[used - 1] == '.')) used--;
    out[used] = '\0';
}

/* ---- the spec text ------------------------------------------------------------------------------- */

/* Shortest decimal that reads back as `value`, with ".0" when it has no '.' or exponent. */
static void format_float(double value, char *out, size_t out_size) {
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(out, out_size, "%.*g", precision, value);
        if (strtod(out, NULL) == value) break;
    }
    if (!strpbrk(out, ".en")) strncat(out, ".0", out_size - strlen(out) - 1);
}

static void emit_paragraphs(text *out, const char *paragraphs, const char *first, const char *next) {
    const char *s = paragraphs;
    while (*s) {
        const char *end = strchr(s, '\n');
        size_t n = end ? (size_t)(end - s) : strlen(s);
        char *line = strndup(s, n);
        if (!line) {
            out->failed = 1;
            return;
        }
        add_comment(out, first, next, line);
        free(line);
        s += n;
        if (*s == '\n') s++;
    }
}

static void emit_spec(text *out, const layer *L, const family *fam, const reader *r, const char *name,
                      int approximate, const char *model_type) {
    text head = {0};
    moegen_cli_text_add(&head, "%s layer imported by `moegen import-hf` from ", fam->title);
    clean_text(r->path, &head, 200);
    moegen_cli_text_add(&head, " (model_type ");
    clean_text(model_type, &head, 48);
    moegen_cli_text_add(&head, "): one MoE layer of the model. Routing as transformers' %s computes it: %s", L->hf_block,
             moegen_cli_text_str(&L->routing));
    add_comment(out, "", "", moegen_cli_text_str(&head));
    moegen_cli_text_free(&head);
    emit_paragraphs(out, moegen_cli_text_str(&L->notes), "", "");
    if (approximate && L->differences.length) {
        moegen_cli_text_add(out, "#\n");
        add_comment(out, "", "",
                    "APPROXIMATE (written with --approximate): this spec is not exactly the checkpoint's layer. "
                    "What differs:");
        emit_paragraphs(out, moegen_cli_text_str(&L->differences), "  - ", "    ");
    }
    moegen_cli_text_add(out, "#\n");
    emit_paragraphs(out, moegen_cli_text_str(&L->weights), "", "  ");

    moegen_cli_text_add(out, "name: %s\n", name);
    moegen_cli_text_add(out, "source: ");
    add_yaml_quoted(out, r->path, 1000);
    moegen_cli_text_add(out, "\ndescription: ");
    text desc = {0};
    moegen_cli_text_add(&desc, "Imported from a Hugging Face config.json (model_type %s%s). Keys used: %s.", model_type,
             approximate && L->differences.length ? "; approximate, see the comments" : "", moegen_cli_text_str(&r->keys));
    add_yaml_quoted(out, moegen_cli_text_str(&desc), 3000);
    if (desc.failed) out->failed = 1;
    moegen_cli_text_free(&desc);
    moegen_cli_text_add(out, "\nsemantics: megatron\n");
    moegen_cli_text_add(out, "num_experts: %lld\n", (long long)L->E);
    moegen_cli_text_add(out, "num_experts_per_tok: %lld\n", (long long)L->k);
    moegen_cli_text_add(out, "hidden_size: %lld\n", (long long)L->H);
    moegen_cli_text_add(out, "moe_intermediate_size: %lld\n", (long long)L->F);
    moegen_cli_text_add(out, "activation: %s\n", L->activation);
    moegen_cli_text_add(out, "dtype: %s\n", L->dtype);
    if (L->expert_bias) moegen_cli_text_add(out, "expert_bias: true\n");
    if (L->weight_on_input) moegen_cli_text_add(out, "weight_on_input: true\n");
    moegen_cli_text_add(out, "router:\n  score_function: %s\n", L->score);
    if (L->order) moegen_cli_text_add(out, "  order: %s\n", L->order);
    moegen_cli_text_add(out, "  norm_topk_prob: %s\n", L->norm ? "true" : "false");
    if (L->rsf != 1.0) {
        char number[40];
        format_float(L->rsf, number, sizeof number);
        moegen_cli_text_add(out, "  routed_scaling_factor: %s\n", number);
    }
    if (L->n_group > 1) {
        moegen_cli_text_add(out, "  n_group: %lld\n  topk_group: %lld\n", (long long)L->n_group, (long long)L->topk_group);
        if (L->group_topm) moegen_cli_text_add(out, "  group_topm: %lld\n", (long long)L->group_topm);
        moegen_cli_text_add(out, "  group_score: %s\n  group_mask: %s\n", L->group_score, L->group_mask);
    }
    if (L->score_bias) moegen_cli_text_add(out, "  score_bias: true\n");
    if (L->router_bias) moegen_cli_text_add(out, "  router_bias: true\n");
    moegen_cli_text_add(out, "capacity:\n  mode: dropless\n");
    if (L->shared_count)
        moegen_cli_text_add(out, "shared_experts:\n  count: %lld\n  intermediate_size: %lld\n  gate: %s\n",
                 (long long)L->shared_count, (long long)L->shared_F, L->shared_gate ? "true" : "false");
}

/* The message of a spec error without its "<path>:<line>:<col>: " prefix. */
static const char *without_location(const char *message) {
    const char *s = message;
    for (int colons = 0; colons < 3; colons++) {
        s = strchr(s, ':');
        if (!s) return message;
        s++;
    }
    while (*s == ' ') s++;
    return s;
}

/* Write `content` to `path` through a temporary file in the same folder and a rename. */
static int write_file(const char *path, const char *content, size_t length) {
    size_t n = strlen(path) + 32;
    char *temporary = malloc(n);
    if (!temporary) return moegen_cli_error("import-hf: out of memory");
    snprintf(temporary, n, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int failure = fd < 0 ? errno : 0;
    size_t done = 0;
    while (!failure && done < length) {
        ssize_t wrote = write(fd, content + done, length - done);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote < 0) failure = errno;
        else done += (size_t)wrote;
    }
    if (!failure && fsync(fd) != 0) failure = errno;
    if (fd >= 0 && close(fd) != 0 && !failure) failure = errno;
    if (!failure && rename(temporary, path) != 0) failure = errno;
    if (failure) {
        if (fd >= 0) unlink(temporary);
        free(temporary);
        return moegen_cli_error("import-hf: %s: cannot write: %s", path, strerror(failure));
    }
    free(temporary);
    return 0;
}

/* ---- the command ---------------------------------------------------------------------------------- */

int moegen_cli_import_hf(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_import_hf, stdout);
        return 0;
    }
    const char *config_path = NULL, *output = NULL, *name_option = NULL, *dtype_option = NULL;
    int approximate = 0, dtype_defaulted = 0;
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-o") || !strcmp(argv[i], "--output")) && i + 1 < argc) {
            output = argv[++i];
        } else if ((!strcmp(argv[i], "-n") || !strcmp(argv[i], "--name")) && i + 1 < argc) {
            name_option = argv[++i];
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            dtype_option = argv[++i];
            if (strcmp(dtype_option, "fp32") && strcmp(dtype_option, "fp16") && strcmp(dtype_option, "bf16"))
                return moegen_cli_error("import-hf: --dtype must be fp32, fp16 or bf16 (got '%s')", dtype_option);
        } else if (!strcmp(argv[i], "--approximate")) {
            approximate = 1;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            return moegen_cli_error("import-hf: unknown option %s (see moegen import-hf --help)", argv[i]);
        } else if (!config_path) {
            config_path = argv[i];
        } else {
            return moegen_cli_error("import-hf: unexpected argument %s", argv[i]);
        }
    }
    if (!config_path) return moegen_cli_error("import-hf: usage: moegen import-hf CONFIG [-o SPEC] (see --help)");
    if (name_option && !valid_name(name_option))
        return moegen_cli_error("import-hf: --name '%s' is not a spec name ([A-Za-z][A-Za-z0-9_.-]{0,63})",
                                name_option);

    moegen_error err;
    moegen_json *root = NULL;
    if (moegen_json_load_file(config_path, &root, &err) != MOEGEN_OK)
        return moegen_cli_error("import-hf: %s", err.message);

    int rc = 1;
    reader r = {.path = config_path, .root = root, .section = root, .prefix = ""};
    layer L = {.activation = "swiglu", .score = "softmax", .rsf = 1.0, .n_group = 1};
    text family_list = {0}, spec_text = {0};
    known_families(&family_list);
    const family *fam = NULL;
    const moegen_json *model_type = moegen_json_get(root, "model_type");
    moegen_c_locale_scope locale;
    moegen_c_locale_enter(&locale); /* %g and strtod below */

    if (root->type != MOEGEN_JSON_OBJECT) {
        moegen_cli_error("import-hf: %s:%d:%d: the top level is %s, not an object: not a config.json", config_path,
                         root->line, root->col, moegen_json_type_name(root->type));
        goto done;
    }
    if (!model_type || model_type->type != MOEGEN_JSON_STRING) {
        if (model_type)
            moegen_cli_error("import-hf: %s:%d:%d: model_type: expected a string, found %s", config_path,
                             model_type->line, model_type->col, moegen_json_type_name(model_type->type));
        else
            moegen_cli_error("import-hf: %s: no model_type key: not a Hugging Face config.json? (known families: %s)",
                             config_path, moegen_cli_text_str(&family_list));
        goto done;
    }
    for (size_t i = 0; i < FAMILY_COUNT; i++)
        if (!strcmp(model_type->text, families[i].model_type)) fam = &families[i];
    if (!fam) {
        text clean = {0};
        clean_text(model_type->text, &clean, 64);
        moegen_cli_error("import-hf: %s: unknown model_type '%s': not a Mixture-of-Experts family this import knows "
                         "(known: %s)",
                         config_path, moegen_cli_text_str(&clean), moegen_cli_text_str(&family_list));
        moegen_cli_text_free(&clean);
        goto done;
    }
    L.family = fam->title;
    moegen_cli_text_add(&r.keys, "model_type %s", fam->model_type);
    const moegen_json *text_config = moegen_json_get(root, "text_config");
    if (fam->read == family_llama4 && text_config && text_config->type == MOEGEN_JSON_OBJECT) {
        r.section = text_config;
        r.prefix = "text_config.";
    }
    fam->read(&r, &L);

    /* dtype: the section's, else the top level's */
    const char *dtype_key = NULL;
    const moegen_json *dtype_value = NULL;
    static const char *const dtype_keys[] = {"torch_dtype", "dtype"};
    for (int pass = 0; pass < 2 && !dtype_value; pass++) {
        const moegen_json *where = pass == 0 ? r.section : root;
        if (pass == 1 && where == r.section) break;
        for (int i = 0; i < 2 && !dtype_value; i++) {
            const moegen_json *value = moegen_json_get(where, dtype_keys[i]);
            if (value && value->type != MOEGEN_JSON_NULL) {
                dtype_value = value;
                dtype_key = dtype_keys[i];
            }
        }
    }
    if (dtype_option) {
        L.dtype = dtype_option;
    } else if (dtype_value && dtype_value->type != MOEGEN_JSON_STRING) {
        text_item(&r.problems, "; ", "%s:%d:%d: %s: expected a string, found %s", config_path, dtype_value->line,
                  dtype_value->col, dtype_key, moegen_json_type_name(dtype_value->type));
    } else if (dtype_value) {
        const char *t = dtype_value->text;
        L.dtype = !strcmp(t, "bfloat16") ? "bf16" : !strcmp(t, "float16") ? "fp16" : !strcmp(t, "float32") ? "fp32" : NULL;
        if (!L.dtype) {
            text clean = {0};
            clean_text(t, &clean, 48);
            text_item(&r.problems, "; ",
                      "%s:%d:%d: %s '%s' has no moegen dtype (bfloat16, float16, float32); choose one with --dtype",
                      config_path, dtype_value->line, dtype_value->col, dtype_key, moegen_cli_text_str(&clean));
            moegen_cli_text_free(&clean);
        } else {
            text_item(&r.keys, ", ", "%s %s", dtype_key, t);
        }
    } else {
        L.dtype = "bf16";
        dtype_defaulted = 1;
        text_item(&r.keys, ", ", "no torch_dtype (bf16 assumed)");
    }

    if (r.missing.length || r.problems.length) { /* every missing key and bad value, in one line */
        text message = {0};
        if (r.missing.length)
            moegen_cli_text_add(&message, "%s: missing keys for %s: %s", config_path, fam->model_type, moegen_cli_text_str(&r.missing));
        else if (strstr(moegen_cli_text_str(&r.problems), "; "))
            moegen_cli_text_add(&message, "%s: bad values", config_path);
        if (r.problems.length) text_item(&message, "; ", "%s", moegen_cli_text_str(&r.problems));
        moegen_cli_error("import-hf: %s", moegen_cli_text_str(&message));
        moegen_cli_text_free(&message);
        goto done;
    }
    if (L.unsupported.length) {
        moegen_cli_error("import-hf: %s: %s (model_type %s): the spec language cannot express %s", config_path,
                         fam->title, fam->model_type, moegen_cli_text_str(&L.unsupported));
        goto done;
    }
    if (L.features.length && !approximate) {
        moegen_cli_error("import-hf: %s: %s (model_type %s): the spec language cannot express %s; --approximate "
                         "writes the closest spec and says what differs",
                         config_path, fam->title, fam->model_type, moegen_cli_text_str(&L.features));
        goto done;
    }

    char name[MOEGEN_SPEC_MAX_NAME + 1] = "";
    if (name_option) {
        snprintf(name, sizeof name, "%s", name_option);
    } else {
        const moegen_json *name_or_path = moegen_json_get(root, "_name_or_path");
        if (name_or_path && name_or_path->type == MOEGEN_JSON_STRING) sanitize_name(name_or_path->text, name);
        if (!name[0]) sanitize_name(fam->model_type, name);
        if (!name[0]) snprintf(name, sizeof name, "hf-moe");
    }

    emit_spec(&spec_text, &L, fam, &r, name, approximate, fam->model_type);
    if (spec_text.failed || r.keys.failed || L.weights.failed || L.notes.failed || L.routing.failed) {
        moegen_cli_error("import-hf: out of memory");
        goto done;
    }

    /* The round trip: the text must be a valid spec before anyone sees it. */
    moegen_spec spec;
    if (moegen_spec_parse(spec_text.data, spec_text.length, "<imported spec>", &spec, &err) != MOEGEN_OK) {
        moegen_cli_error("import-hf: %s: the layer this config describes is not one moegen can build: %s", config_path,
                         without_location(err.message));
        goto done;
    }
    moegen_spec_free(&spec);

    if (dtype_defaulted)
        fprintf(stderr, "moegen: import-hf: warning: %s: no torch_dtype or dtype in the config: dtype bf16 (choose "
                        "with --dtype)\n", config_path);
    if (approximate && L.differences.length) {
        const char *s = moegen_cli_text_str(&L.differences);
        while (*s) {
            const char *end = strchr(s, '\n');
            int n = end ? (int)(end - s) : (int)strlen(s);
            fprintf(stderr, "moegen: import-hf: warning: %s: approximate spec: %.*s\n", config_path, n, s);
            s += n;
            if (*s == '\n') s++;
        }
    }
    if (output) {
        rc = write_file(output, spec_text.data, spec_text.length);
    } else {
        rc = fwrite(spec_text.data, 1, spec_text.length, stdout) == spec_text.length && fflush(stdout) == 0
                 ? 0
                 : moegen_cli_error("import-hf: cannot write the spec to standard output: %s", strerror(errno));
    }

done:
    moegen_c_locale_leave(&locale);
    moegen_cli_text_free(&spec_text);
    moegen_cli_text_free(&family_list);
    moegen_cli_text_free(&r.missing);
    moegen_cli_text_free(&r.problems);
    moegen_cli_text_free(&r.keys);
    layer_free(&L);
    moegen_json_free(root);
    return rc;
}
