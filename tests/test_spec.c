/* test_spec.c — tests for the spec loader (gen/spec.c).
 *
 * Place in the pipeline: spec -> gen -> compile -> load -> launch; these tests cover the
 * first stage only and need no GPU, no compiler and no files outside a temp directory.
 *
 * What is covered:
 *  - a corpus of bad specs (bad_spec_tests): every rule of docs/limits.md "Spec files"
 *    and every cross-field rule of specs/README.md, each asserting the status, the exact
 *    "bad.yaml:<line>:<col>: " prefix and a message substring, and that nothing leaks out;
 *  - limits that need generated input (size, depth, node count, scalar size, name length),
 *    with the depth case timed;
 *  - presets (deepspeed top-1 / top-2 / top-k, megatron) and field-by-field overrides;
 *  - canonical form: exact text, float spelling, stability under reordering, comments,
 *    whitespace, quoting and irrelevant fields, hash = SHA-256 of the text, round trip;
 *  - file loading, argument checks and the small derived helpers;
 *  - every error at once: independent errors all reported (the first as before, the
 *    others in file order, then a count), errors that follow from another skipped, the
 *    list bounded with "... and N more";
 *  - warnings: each fires on a minimal spec and not on its correction, they come in file
 *    order and bounded, and no spec shipped in specs/ has one.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"
#include "spec.h"

/* A valid spec on lines 1-5; corpus cases append from line 6. */
#define BASE                                                                                                 \
    "name: tiny\n"                                                                                           \
    "num_experts: 8\n"                                                                                       \
    "num_experts_per_tok: 2\n"                                                                               \
    "hidden_size: 64\n"                                                                                      \
    "moe_intermediate_size: 128\n"

/* The same without `name` (lines 1-4), for cases about the name or a missing key. */
#define BASE_WITHOUT_NAME                                                                                    \
    "num_experts: 8\n"                                                                                       \
    "num_experts_per_tok: 2\n"                                                                               \
    "hidden_size: 64\n"                                                                                      \
    "moe_intermediate_size: 128\n"

/* ---- helpers ------------------------------------------------------------------------ */

static int spec_is_all_zero(const moegen_spec *spec) {
    const unsigned char *bytes = (const unsigned char *)spec;
    size_t index;
    for (index = 0; index < sizeof *spec; index++)
        if (bytes[index] != 0)
            return 0;
    return 1;
}

static void parse_ok(const char *yaml, moegen_spec *spec) {
    moegen_error err;
    moegen_status status = moegen_spec_parse(yaml, strlen(yaml), "good.yaml", spec, &err);
    if (status != MOEGEN_OK)
        fail_msg("expected the spec to parse, got %s: %s", moegen_status_name(status), err.message);
}

/* Parse bytes that must fail with MOEGEN_ERR_SPEC at line:column with `needle` in the
 * message; the output spec must come back all zero. */
static void expect_spec_error(const char *yaml, size_t bytes, int line, int column, const char *needle) {
    moegen_spec spec;
    moegen_error err;
    char prefix[64];
    moegen_status status;
    memset(&spec, 0x5a, sizeof spec);
    status = moegen_spec_parse(yaml, bytes, "bad.yaml", &spec, &err);
    if (status != MOEGEN_ERR_SPEC)
        fail_msg("expected MOEGEN_ERR_SPEC, got %s (%s)", moegen_status_name(status),
                 status == MOEGEN_OK ? "parsed" : err.message);
    assert_int_equal(err.code, MOEGEN_ERR_SPEC);
    snprintf(prefix, sizeof prefix, "bad.yaml:%d:%d: ", line, column);
    if (strncmp(err.message, prefix, strlen(prefix)) != 0)
        fail_msg("expected the message to start with '%s', got '%s'", prefix, err.message);
    if (!strstr(err.message, needle))
        fail_msg("expected the message to contain '%s', got '%s'", needle, err.message);
    assert_true(spec_is_all_zero(&spec));
}

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static void assert_specs_equal(const moegen_spec *a, const moegen_spec *b) {
    assert_string_equal(a->name, b->name);
    assert_string_equal(a->ident, b->ident);
    assert_int_equal(a->semantics, b->semantics);
    assert_int_equal(a->num_experts, b->num_experts);
    assert_int_equal(a->top_k, b->top_k);
    assert_int_equal(a->hidden_size, b->hidden_size);
    assert_int_equal(a->moe_intermediate_size, b->moe_intermediate_size);
    assert_int_equal(a->activation, b->activation);
    assert_int_equal(a->dtype, b->dtype);
    assert_int_equal(a->ep_size, b->ep_size);
    assert_int_equal(a->mode, b->mode);
    assert_int_equal(a->expert_bias, b->expert_bias);
    assert_int_equal(a->weight_on_input, b->weight_on_input);
    assert_int_equal(a->use_residual, b->use_residual);
    assert_int_equal(a->router.score_function, b->router.score_function);
    assert_int_equal(a->router.order, b->router.order);
    assert_int_equal(a->router.norm_topk_prob, b->router.norm_topk_prob);
    assert_true(a->router.routed_scaling_factor == b->router.routed_scaling_factor);
    assert_int_equal(a->router.n_group, b->router.n_group);
    assert_int_equal(a->router.topk_group, b->router.topk_group);
    assert_int_equal(a->router.group_topm, b->router.group_topm);
    assert_int_equal(a->router.group_score, b->router.group_score);
    assert_int_equal(a->router.group_mask, b->router.group_mask);
    assert_int_equal(a->router.score_bias, b->router.score_bias);
    assert_int_equal(a->router.router_bias, b->router.router_bias);
    assert_true(a->router.input_jitter == b->router.input_jitter);
    assert_int_equal(a->router.noise, b->router.noise);
    assert_true(a->router.seed == b->router.seed);
    assert_int_equal(a->router.aux_loss, b->router.aux_loss);
    assert_int_equal(a->capacity.mode, b->capacity.mode);
    assert_true(a->capacity.capacity_factor == b->capacity.capacity_factor);
    assert_true(a->capacity.eval_capacity_factor == b->capacity.eval_capacity_factor);
    assert_int_equal(a->capacity.expert_capacity, b->capacity.expert_capacity);
    assert_int_equal(a->capacity.min_capacity, b->capacity.min_capacity);
    assert_int_equal(a->capacity.formula, b->capacity.formula);
    assert_int_equal(a->capacity.priority, b->capacity.priority);
    assert_int_equal(a->capacity.renormalize, b->capacity.renormalize);
    assert_int_equal(a->capacity.pad_to_capacity, b->capacity.pad_to_capacity);
    assert_int_equal(a->shared.count, b->shared.count);
    assert_int_equal(a->shared.intermediate_size, b->shared.intermediate_size);
    assert_int_equal(a->shared.gate, b->shared.gate);
}

/* ---- the bad-spec corpus ------------------------------------------------------------- */

struct bad_case {
    const char *yaml;
    size_t bytes;
    int line, column;
    const char *needle;
};

static void run_bad_case(void **state) {
    const struct bad_case *bad = *state;
    expect_spec_error(bad->yaml, bad->bytes, bad->line, bad->column, bad->needle);
}

/* One named cmocka test per case; `yaml` must be a string literal (its size gives the
 * byte count, so cases can hold NUL bytes). */
#define BAD(test_name, yaml_text, line_number, column_number, message_part)                                   \
    {#test_name, run_bad_case, NULL, NULL,                                                                   \
     &(struct bad_case){yaml_text, sizeof(yaml_text) - 1, line_number, column_number, message_part}}

static const struct CMUnitTest bad_spec_tests[] = {
    /* --- empty, root, documents --- */
    BAD(spec_rejects_an_empty_file, "", 1, 1, "empty spec"),
    BAD(spec_rejects_a_file_of_only_comments, "# nothing here\n\n   # still nothing\n", 1, 1, "empty spec"),
    BAD(spec_rejects_a_document_marker_with_no_content, "---\n", 2, 1, "empty spec"),
    BAD(spec_rejects_a_null_document, "--- ~\n", 1, 5, "empty spec"),
    BAD(spec_rejects_a_sequence_at_the_top_level, "- name: tiny\n- num_experts: 8\n", 1, 1,
        "must be a mapping of keys to values, found a sequence"),
    BAD(spec_rejects_a_scalar_at_the_top_level, "just some words\n", 1, 1, "must be a mapping of keys to values, found a scalar"),
    BAD(spec_rejects_two_documents, BASE "---\nname: other\n", 6, 1, "a second YAML document"),
    BAD(spec_rejects_a_document_after_an_end_marker, "name: a\n...\n---\nname: b\n", 3, 1, "a second YAML document"),
    BAD(spec_rejects_a_bare_document_after_an_end_marker, "name: a\n...\nname: b\n", 3, 1, "YAML syntax error"),

    /* --- bytes --- */
    BAD(spec_rejects_invalid_utf8, BASE "description: caf\xe9 au lait\n", 6, 17, "invalid UTF-8 (byte 0xE9)"),
    BAD(spec_rejects_overlong_utf8, BASE "source: \xc0\xaf\n", 6, 9, "invalid UTF-8"),
    BAD(spec_rejects_utf8_surrogates, BASE "source: \xed\xa0\x80\n", 6, 9, "invalid UTF-8"),
    BAD(spec_rejects_truncated_utf8_at_the_end, BASE "source: \xe2\x82", 6, 9, "invalid UTF-8"),
    BAD(spec_rejects_a_nul_byte, "name: ti\0ny\n", 1, 9, "NUL byte"),
    BAD(spec_rejects_a_bell_character, BASE "source: a\ab\n", 6, 10, "control character 0x07"),
    BAD(spec_rejects_an_escape_character, BASE "source: \x1b[31mred\n", 6, 9, "control character 0x1B"),
    BAD(spec_rejects_a_delete_character, BASE "source: a\x7f\n", 6, 10, "control character 0x7F"),
    BAD(spec_rejects_c1_control_characters, BASE "source: x\xc2\x85y\n", 6, 10, "control character U+0085"),
    BAD(spec_counts_columns_in_characters_not_bytes, BASE "source: \xc3\xa9\xc3\xa9\x01\n", 6, 11,
        "control character 0x01"),
    BAD(spec_counts_crlf_as_one_line_break, "name: tiny\r\nsource: \x02\r\n", 2, 9, "control character 0x02"),
    BAD(spec_rejects_control_characters_written_as_escapes, BASE "description: \"bell\\a\"\n", 6, 14,
        "control character"),
    BAD(spec_rejects_nul_written_as_an_escape, BASE_WITHOUT_NAME "name: \"ab\\0c\"\n", 5, 7, "NUL or control"),

    /* --- YAML syntax --- */
    BAD(spec_reports_yaml_syntax_errors_with_libyamls_position, BASE "router:\n  n_group: 2\n bad: 1\n", 8, 2,
        "YAML syntax error"),
    BAD(spec_reports_an_unclosed_flow_sequence, BASE "router: {n_group: 2\n", 7, 1, "YAML syntax error"),

    /* --- anchors, aliases, tags --- */
    BAD(spec_rejects_anchors, BASE "router: &shared\n  norm_topk_prob: true\n", 6, 9, "anchor '&shared' not supported"),
    BAD(spec_rejects_aliases, BASE "description: *text\n", 6, 14, "alias '*text' not supported"),
    BAD(spec_rejects_billion_laughs_at_the_first_anchor, "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n", 1,
        4, "anchor '&a' not supported"),
    BAD(spec_rejects_a_self_referencing_alias, "a: &a [*a]\n", 1, 4, "anchor '&a' not supported"),
    BAD(spec_rejects_python_object_tags, BASE "description: !!python/object:os.system x\n", 6, 14,
        "tag '!!python/object:os.system' not supported"),
    BAD(spec_rejects_local_tags, BASE "dtype: !foo bf16\n", 6, 8, "tag '!foo' not supported"),
    BAD(spec_rejects_str_tags, BASE "ep_size: !!str 2\n", 6, 10, "tag '!!str' not supported"),
    BAD(spec_rejects_tags_on_mappings, BASE "router: !!map\n  n_group: 2\n", 6, 9, "tag '!!map' not supported"),
    BAD(spec_rejects_a_tag_written_after_an_anchor_at_the_anchor, BASE "dtype: &d !foo bf16\n", 6, 8,
        "anchor '&d' not supported"),
    BAD(spec_rejects_tag_directives, "%TAG !e! tag:example.com,2000:\n---\n" BASE, 1, 1, "%TAG directive not supported"),

    /* --- duplicate keys --- */
    BAD(spec_rejects_a_duplicate_top_level_key, BASE "num_experts: 16\n", 6, 1,
        "duplicate key 'num_experts' (first defined at line 2)"),
    BAD(spec_rejects_a_duplicate_key_inside_a_section,
        BASE "router:\n  n_group: 2\n  norm_topk_prob: true\n  n_group: 4\n", 9, 3,
        "duplicate key 'n_group' (first defined at line 7)"),
    BAD(spec_rejects_a_duplicate_key_before_looking_it_up,
        BASE "router:\n  top_k: 2\n  norm_topk_prob: true\n  score_function: softmax\n  top_k: 3\n", 10, 3,
        "duplicate key 'top_k' (first defined at line 7)"),
    BAD(spec_rejects_a_duplicate_key_in_a_flow_mapping, BASE "router: {seed: 1, seed: 2}\n", 6, 19,
        "duplicate key 'seed' (first defined at line 6)"),
    BAD(spec_treats_quoted_and_plain_keys_as_the_same_key, BASE "\"name\": other\n", 6, 1,
        "duplicate key 'name' (first defined at line 1)"),
    BAD(spec_rejects_a_duplicate_key_at_any_depth, BASE "extra:\n  deeper:\n    k: 1\n    k: 2\n", 9, 5,
        "duplicate key 'k' (first defined at line 8)"),
    BAD(spec_rejects_a_mapping_used_as_a_key, BASE "? [a, b]\n: 1\n", 6, 3, "a key must be a plain string, not a sequence"),

    /* --- unknown keys --- */
    BAD(spec_suggests_the_closest_key_for_a_typo, BASE "activaton: relu\n", 6, 1,
        "unknown key 'activaton' (did you mean 'activation'?)"),
    BAD(spec_suggests_a_key_from_another_section, BASE "capacity_factor: 1.25\n", 6, 1,
        "unknown key 'capacity_factor' (did you mean 'capacity.capacity_factor'? it belongs under 'capacity:')"),
    BAD(spec_suggests_a_top_level_key_written_inside_a_section, BASE "router:\n  dtype: fp16\n", 7, 3,
        "unknown key 'dtype' in router (did you mean the top-level key 'dtype'?)"),
    BAD(spec_suggests_the_nested_form_of_a_dotted_key, BASE "router.n_group: 2\n", 6, 1,
        "unknown key 'router.n_group' (write it as 'n_group' under 'router:')"),
    BAD(spec_suggests_a_key_within_the_same_section, BASE "capacity:\n  capacity_facter: 2.0\n", 7, 3,
        "unknown key 'capacity_facter' in capacity (did you mean 'capacity_factor'?)"),
    BAD(spec_points_to_the_reference_when_nothing_is_close, BASE "zzqqxxyy: 1\n", 6, 1,
        "unknown key 'zzqqxxyy' (specs/README.md lists the keys)"),
    BAD(spec_names_num_experts_for_num_local_experts, BASE "num_local_experts: 8\n", 6, 1,
        "the Hugging Face name; moegen calls it 'num_experts'"),
    BAD(spec_names_num_experts_for_n_routed_experts, BASE "n_routed_experts: 8\n", 6, 1,
        "the Hugging Face name; moegen calls it 'num_experts'"),
    BAD(spec_names_moe_intermediate_size_for_intermediate_size, BASE "intermediate_size: 128\n", 6, 1,
        "moegen calls it 'moe_intermediate_size'"),
    BAD(spec_names_score_function_for_scoring_func, BASE "scoring_func: sigmoid\n", 6, 1,
        "moegen calls it 'router.score_function'"),
    BAD(spec_names_shared_count_for_n_shared_experts, BASE "n_shared_experts: 1\n", 6, 1,
        "moegen calls it 'shared_experts.count'"),
    BAD(spec_names_shared_size_for_shared_expert_intermediate_size, BASE "shared_expert_intermediate_size: 64\n", 6, 1,
        "moegen calls it 'shared_experts.intermediate_size'"),
    BAD(spec_names_activation_for_hidden_act, BASE "hidden_act: silu\n", 6, 1, "moegen calls it 'activation'"),
    BAD(spec_names_score_bias_for_e_score_correction_bias, BASE "e_score_correction_bias: true\n", 6, 1,
        "moegen calls it 'router.score_bias'"),
    BAD(spec_names_dtype_for_torch_dtype, BASE "torch_dtype: bfloat16\n", 6, 1, "moegen calls it 'dtype'"),
    BAD(spec_names_num_experts_per_tok_for_top_k, BASE "router:\n  top_k: 2\n", 7, 3,
        "unknown key 'top_k' in router (a common name; moegen calls it 'num_experts_per_tok')"),

    /* --- missing values and required keys --- */
    BAD(spec_rejects_a_missing_name, BASE_WITHOUT_NAME, 1, 1, "missing required key 'name'"),
    BAD(spec_rejects_a_missing_hidden_size, "name: tiny\nnum_experts: 8\nnum_experts_per_tok: 2\nmoe_intermediate_size: 128\n",
        1, 1, "missing required key 'hidden_size'"),
    BAD(spec_rejects_an_empty_value, BASE "dtype:\n", 6, 1, "dtype: missing value"),
    BAD(spec_rejects_a_tilde_value, BASE "ep_size: ~\n", 6, 1, "ep_size: missing value"),
    BAD(spec_rejects_a_null_value, BASE "router:\n  seed: null\n", 7, 3, "router.seed: missing value"),
    BAD(spec_rejects_an_empty_section, BASE "router:\n", 6, 1, "router: missing value (expected a mapping)"),
    BAD(spec_rejects_a_section_that_is_not_a_mapping, BASE "router: softmax\n", 6, 9,
        "router: expected a mapping of router settings, found a scalar"),
    BAD(spec_rejects_a_sequence_where_a_value_belongs, BASE "dtype: [fp16]\n", 6, 8,
        "dtype: expected one of fp32, fp16, bf16, found a sequence"),

    /* --- integer grammar --- */
    BAD(spec_rejects_a_quoted_integer, BASE "ep_size: \"2\"\n", 6, 10,
        "ep_size: expected an integer, found the quoted string '2' (write numbers without quotes)"),
    BAD(spec_rejects_a_float_for_an_integer, BASE "ep_size: 2.0\n", 6, 10, "ep_size: expected an integer"),
    BAD(spec_rejects_hexadecimal_integers, BASE "ep_size: 0x10\n", 6, 10, "expected an integer in plain decimal digits"),
    BAD(spec_rejects_octal_looking_integers, BASE "ep_size: 010\n", 6, 10, "found '010'"),
    BAD(spec_rejects_underscores_in_integers, BASE "ep_size: 1_000\n", 6, 10, "found '1_000'"),
    BAD(spec_rejects_a_plus_sign_on_integers, BASE "ep_size: +2\n", 6, 10, "found '+2'"),
    BAD(spec_rejects_an_exponent_on_integers, BASE "ep_size: 1e3\n", 6, 10, "found '1e3'"),
    BAD(spec_rejects_a_negative_count, BASE "shared_experts:\n  count: -1\n", 7, 10,
        "shared_experts.count: -1 is out of range (0..16)"),
    BAD(spec_rejects_two_to_the_63, BASE "router:\n  seed: 9223372036854775808\n", 7, 9,
        "'9223372036854775808' does not fit in a 64-bit integer"),
    BAD(spec_rejects_a_huge_integer, BASE "ep_size: 99999999999999999999999\n", 6, 10, "does not fit in a 64-bit integer"),
    BAD(spec_rejects_a_negative_seed, BASE "router:\n  seed: -1\n", 7, 9, "router.seed: -1 is out of range"),

    /* --- float grammar --- */
    BAD(spec_rejects_infinity, BASE "router:\n  routed_scaling_factor: .inf\n", 7, 26, "expected a number like 1.0"),
    BAD(spec_rejects_nan, BASE "capacity:\n  capacity_factor: .nan\n", 7, 20, "found '.nan'"),
    BAD(spec_rejects_a_trailing_dot, BASE "capacity:\n  capacity_factor: 1.\n", 7, 20, "found '1.'"),
    BAD(spec_rejects_a_leading_dot, BASE "capacity:\n  capacity_factor: .5\n", 7, 20, "found '.5'"),
    BAD(spec_rejects_a_plus_sign_on_floats, BASE "capacity:\n  capacity_factor: +1.5\n", 7, 20, "found '+1.5'"),
    BAD(spec_rejects_a_quoted_float, BASE "capacity:\n  capacity_factor: \"1.5\"\n", 7, 20,
        "expected a number, found the quoted string '1.5'"),
    BAD(spec_rejects_float_overflow, BASE "capacity:\n  capacity_factor: 1e400\n", 7, 20,
        "'1e400' is outside the range of a double"),
    BAD(spec_rejects_float_underflow, BASE "router:\n  input_jitter: 1e-400\n", 7, 17,
        "'1e-400' is outside the range of a double"),
    BAD(spec_rejects_a_zero_capacity_factor, BASE "capacity:\n  capacity_factor: 0.0\n", 7, 20,
        "capacity.capacity_factor: '0.0' is out of range (must be > 0 and <= 1e6)"),
    BAD(spec_rejects_a_negative_capacity_factor, BASE "capacity:\n  capacity_factor: -1.0\n", 7, 20, "is out of range"),
    BAD(spec_rejects_a_capacity_factor_above_a_million, BASE "capacity:\n  capacity_factor: 1e7\n", 7, 20,
        "is out of range"),
    BAD(spec_rejects_a_zero_eval_capacity_factor, BASE "capacity:\n  eval_capacity_factor: 0\n", 7, 25,
        "capacity.eval_capacity_factor: '0' is out of range"),
    BAD(spec_rejects_a_zero_routed_scaling_factor, BASE "router:\n  routed_scaling_factor: 0\n", 7, 26,
        "router.routed_scaling_factor: '0' is out of range (must be > 0 and <= 1e6)"),
    BAD(spec_rejects_an_input_jitter_of_one, BASE "router:\n  input_jitter: 1.0\n", 7, 17,
        "router.input_jitter: '1.0' is out of range (must be >= 0 and < 1)"),
    BAD(spec_rejects_a_negative_input_jitter, BASE "router:\n  input_jitter: -0.01\n", 7, 17, "is out of range"),

    /* --- boolean grammar --- */
    BAD(spec_rejects_yes_as_a_boolean, BASE "expert_bias: yes\n", 6, 14, "expert_bias: expected true or false, found 'yes'"),
    BAD(spec_rejects_no_as_a_boolean, BASE "expert_bias: no\n", 6, 14, "expected true or false, found 'no'"),
    BAD(spec_rejects_on_as_a_boolean, BASE "use_residual: on\n", 6, 15, "expected true or false, found 'on'"),
    BAD(spec_rejects_off_as_a_boolean, BASE "use_residual: off\n", 6, 15, "expected true or false, found 'off'"),
    BAD(spec_rejects_capitalized_true, BASE "expert_bias: True\n", 6, 14, "expected true or false, found 'True'"),
    BAD(spec_rejects_a_quoted_boolean, BASE "expert_bias: \"true\"\n", 6, 14,
        "expected true or false, found the quoted string 'true'"),
    BAD(spec_rejects_one_as_a_boolean, BASE "router:\n  norm_topk_prob: 1\n", 7, 19, "expected true or false, found '1'"),

    /* --- enums --- */
    BAD(spec_rejects_an_unknown_dtype, BASE "dtype: fp8\n", 6, 8, "dtype: unknown value 'fp8'"),
    BAD(spec_suggests_bf16_for_bfloat16, BASE "dtype: bfloat16\n", 6, 8,
        "unknown value 'bfloat16' (did you mean 'bf16'? valid values: fp32, fp16, bf16)"),
    BAD(spec_suggests_the_lowercase_enum_value, BASE "activation: SwiGLU\n", 6, 13, "did you mean 'swiglu'?"),
    BAD(spec_suggests_softmax_for_a_typo, BASE "router:\n  score_function: sofmax\n", 7, 19,
        "router.score_function: unknown value 'sofmax' (did you mean 'softmax'? valid values: softmax, sigmoid, "
        "sqrtsoftplus)"),
    BAD(spec_lists_valid_values_when_nothing_is_close, BASE "mode: inference\n", 6, 7,
        "mode: unknown value 'inference' (valid values: train, eval)"),
    BAD(spec_rejects_an_unknown_semantics, BASE "semantics: fairseq\n", 6, 12, "valid values: megatron, deepspeed"),

    /* --- name --- */
    BAD(spec_rejects_a_name_with_shell_syntax, BASE_WITHOUT_NAME "name: foo; system(\"x\")\n", 5, 7,
        "name: 'foo; system(\"x\")' is not a valid name"),
    BAD(spec_rejects_a_name_that_closes_a_comment, BASE_WITHOUT_NAME "name: \"*/ #include <stdio.h>\"\n", 5, 7,
        "is not a valid name"),
    BAD(spec_rejects_a_non_ascii_name, BASE_WITHOUT_NAME "name: caf\xc3\xa9\n", 5, 7, "'caf\\xc3\\xa9' is not a valid name"),
    BAD(spec_rejects_a_name_starting_with_a_digit, BASE_WITHOUT_NAME "name: 8x7b\n", 5, 7, "is not a valid name"),
    BAD(spec_rejects_a_name_with_a_space, BASE_WITHOUT_NAME "name: \"my model\"\n", 5, 7, "is not a valid name"),
    BAD(spec_rejects_an_empty_quoted_name, BASE_WITHOUT_NAME "name: \"\"\n", 5, 7, "is not a valid name"),
    BAD(spec_rejects_a_name_with_a_newline, BASE_WITHOUT_NAME "name: |\n  tiny\n", 5, 7,
        "name: the block text 'tiny\\x0a' is not a valid name"),

    /* --- ranges and sizes --- */
    BAD(spec_rejects_zero_experts, "name: tiny\nnum_experts: 0\n", 2, 14, "num_experts: 0 is out of range (1..1024)"),
    BAD(spec_rejects_too_many_experts, "name: tiny\nnum_experts: 1025\n", 2, 14, "out of range (1..1024)"),
    BAD(spec_rejects_a_top_k_of_zero, "name: tiny\nnum_experts_per_tok: 0\n", 2, 22, "num_experts_per_tok: 0 is out of range (1..64)"),
    BAD(spec_rejects_a_top_k_above_64, "name: tiny\nnum_experts_per_tok: 65\n", 2, 22, "out of range (1..64)"),
    BAD(spec_rejects_top_k_above_experts, "name: tiny\nnum_experts: 8\nnum_experts_per_tok: 9\nhidden_size: 64\n"
                                          "moe_intermediate_size: 128\n",
        3, 22, "num_experts_per_tok: 9 exceeds num_experts (8)"),
    BAD(spec_rejects_a_zero_hidden_size, "name: tiny\nhidden_size: 0\n", 2, 14, "hidden_size: 0 is out of range (16..65536)"),
    BAD(spec_rejects_an_unaligned_hidden_size, "name: tiny\nhidden_size: 100\n", 2, 14,
        "hidden_size: 100 is not a multiple of 16 (the GPU kernels step through it in 16-element vectors)"),
    BAD(spec_rejects_an_unaligned_intermediate_size, "name: tiny\nmoe_intermediate_size: 24\n", 2, 24,
        "moe_intermediate_size: 24 is not a multiple of 16"),
    BAD(spec_rejects_an_intermediate_size_above_the_limit, "name: tiny\nmoe_intermediate_size: 262160\n", 2, 24,
        "out of range (16..262144)"),
    BAD(spec_rejects_an_ep_size_that_does_not_divide_experts, BASE "ep_size: 3\n", 6, 10,
        "ep_size: 3 does not divide num_experts (8)"),
    BAD(spec_rejects_weight_on_input_with_top_k_above_one, BASE "weight_on_input: true\n", 6, 18,
        "weight_on_input requires num_experts_per_tok 1 (it is 2)"),

    /* --- router rules --- */
    BAD(spec_rejects_order_with_sigmoid, BASE "router:\n  score_function: sigmoid\n  order: topk_then_softmax\n", 8, 3,
        "router.order applies only when router.score_function is softmax (it is sigmoid)"),
    BAD(spec_rejects_score_bias_with_softmax, BASE "router:\n  score_bias: true\n", 7, 3,
        "router.score_bias applies only when router.score_function is sigmoid or sqrtsoftplus (it is softmax)"),
    BAD(spec_rejects_groups_that_do_not_divide_experts, BASE "router:\n  n_group: 3\n", 7, 12,
        "router.n_group: 3 does not divide num_experts (8)"),
    BAD(spec_rejects_topk_group_without_groups, BASE "router:\n  topk_group: 1\n", 7, 3,
        "router.topk_group applies only when router.n_group > 1 (it is 1)"),
    BAD(spec_rejects_group_topm_without_groups, BASE "router:\n  group_topm: 2\n", 7, 3,
        "router.group_topm applies only when router.n_group > 1"),
    BAD(spec_rejects_group_score_without_groups, BASE "router:\n  group_score: max\n", 7, 3,
        "router.group_score applies only when router.n_group > 1"),
    BAD(spec_rejects_group_mask_without_groups, BASE "router:\n  group_mask: zero\n", 7, 3,
        "router.group_mask applies only when router.n_group > 1"),
    BAD(spec_rejects_more_kept_groups_than_groups, BASE "router:\n  n_group: 2\n  topk_group: 3\n", 8, 15,
        "router.topk_group: 3 exceeds router.n_group (2)"),
    BAD(spec_rejects_top_k_above_the_experts_in_kept_groups,
        "name: tiny\nnum_experts: 8\nnum_experts_per_tok: 4\nhidden_size: 64\nmoe_intermediate_size: 128\n"
        "router:\n  n_group: 4\n  topk_group: 1\n",
        8, 15, "num_experts_per_tok (4) exceeds the experts in the kept groups: router.topk_group (1) x num_experts / "
               "router.n_group (2) = 2"),
    BAD(spec_rejects_group_topm_above_the_group_size, BASE "router:\n  n_group: 4\n  group_topm: 3\n", 8, 15,
        "router.group_topm: 3 exceeds the experts in one group (num_experts / router.n_group = 2)"),
    BAD(spec_rejects_rsample_noise_with_sigmoid, BASE "router:\n  score_function: sigmoid\n  noise: rsample\n", 8, 10,
        "router.noise: rsample requires router.score_function softmax (it is sigmoid)"),
    BAD(spec_rejects_rsample_noise_with_top_k_above_two,
        "name: tiny\nnum_experts: 8\nnum_experts_per_tok: 3\nhidden_size: 64\nmoe_intermediate_size: 128\n"
        "router:\n  noise: rsample\n",
        7, 10, "rsample requires num_experts_per_tok <= 2 (it is 3)"),
    BAD(spec_rejects_rsample_noise_with_groups, BASE "router:\n  n_group: 2\n  noise: rsample\n", 8, 10,
        "rsample requires router.n_group 1 (it is 2)"),

    /* --- capacity rules --- */
    BAD(spec_rejects_a_capacity_factor_in_dropless_mode, BASE "capacity:\n  mode: dropless\n  capacity_factor: 1.25\n",
        8, 3, "capacity.capacity_factor applies only when capacity.mode is factor (it is dropless)"),
    BAD(spec_rejects_an_eval_capacity_factor_in_fixed_mode,
        BASE "capacity:\n  expert_capacity: 64\n  eval_capacity_factor: 2.0\n", 8, 3,
        "capacity.eval_capacity_factor applies only when capacity.mode is factor (it is fixed)"),
    BAD(spec_infers_fixed_mode_and_then_rejects_a_capacity_factor,
        BASE "capacity:\n  capacity_factor: 1.5\n  expert_capacity: 64\n", 7, 3,
        "capacity.capacity_factor applies only when capacity.mode is factor (it is fixed)"),
    BAD(spec_rejects_an_expert_capacity_in_factor_mode, BASE "capacity:\n  mode: factor\n  expert_capacity: 64\n", 8, 3,
        "capacity.expert_capacity applies only when capacity.mode is fixed (it is factor)"),
    BAD(spec_rejects_fixed_mode_without_an_expert_capacity, BASE "capacity:\n  mode: fixed\n", 7, 9,
        "capacity.expert_capacity is required when capacity.mode is fixed"),
    BAD(spec_rejects_a_padded_fixed_capacity_whose_rows_overflow_the_row_index,
        BASE "capacity:\n  expert_capacity: 2147483647\n  pad_to_capacity: true\n", 7, 20,
        "capacity.expert_capacity: 2147483647 with pad_to_capacity makes every call process num_experts x "
        "capacity = 17179869176 rows"),
    BAD(spec_rejects_a_padded_fixed_capacity_whose_buffers_exceed_a_tebibyte,
        "name: x\nnum_experts: 1\nnum_experts_per_tok: 1\nhidden_size: 65536\nmoe_intermediate_size: 16\n"
        "capacity:\n  expert_capacity: 5000000\n  pad_to_capacity: true\n", 7, 20,
        "the limit is 2147483647 rows and 1024 GiB"),
    BAD(spec_rejects_an_expert_capacity_of_zero, BASE "capacity:\n  expert_capacity: 0\n", 7, 20,
        "capacity.expert_capacity: 0 is out of range (1..2147483647)"),
    BAD(spec_rejects_a_formula_in_dropless_mode, BASE "capacity:\n  formula: deepspeed\n", 7, 3,
        "capacity.formula applies only when capacity.mode is factor (it is dropless)"),
    BAD(spec_rejects_min_capacity_with_the_megatron_formula, BASE "capacity:\n  mode: factor\n  min_capacity: 4\n", 8, 3,
        "capacity.min_capacity applies only when capacity.formula is deepspeed (it is megatron)"),
    BAD(spec_rejects_min_capacity_in_fixed_mode,
        "semantics: deepspeed\n" BASE "capacity:\n  expert_capacity: 8\n  min_capacity: 4\n", 9, 3,
        "capacity.min_capacity applies only when capacity.mode is factor (it is fixed)"),
    BAD(spec_rejects_a_negative_min_capacity, BASE "capacity:\n  min_capacity: -1\n", 7, 17,
        "capacity.min_capacity: -1 is out of range"),
    BAD(spec_rejects_a_priority_in_dropless_mode, BASE "capacity:\n  priority: probs\n", 7, 3,
        "capacity.priority applies only when capacity.mode is factor or fixed (it is dropless)"),
    BAD(spec_rejects_pad_to_capacity_in_dropless_mode, BASE "capacity:\n  pad_to_capacity: true\n", 7, 3,
        "capacity.pad_to_capacity applies only when capacity.mode is factor or fixed (it is dropless)"),
    BAD(spec_rejects_an_unknown_capacity_mode, BASE "capacity:\n  mode: none\n", 7, 9,
        "valid values: dropless, factor, fixed"),

    /* --- shared experts --- */
    BAD(spec_rejects_shared_experts_without_a_size, BASE "shared_experts:\n  count: 2\n", 7, 10,
        "shared_experts.intermediate_size is required when shared_experts.count > 0"),
    BAD(spec_rejects_a_shared_size_without_shared_experts, BASE "shared_experts:\n  intermediate_size: 64\n", 7, 3,
        "shared_experts.intermediate_size applies only when shared_experts.count > 0 (it is 0)"),
    BAD(spec_rejects_a_shared_gate_without_shared_experts, BASE "shared_experts:\n  count: 0\n  gate: true\n", 8, 3,
        "shared_experts.gate applies only when shared_experts.count > 0 (it is 0)"),
    BAD(spec_rejects_an_unaligned_shared_size, BASE "shared_experts:\n  count: 1\n  intermediate_size: 100\n", 8, 22,
        "shared_experts.intermediate_size: 100 is not a multiple of 16"),
    BAD(spec_rejects_too_many_shared_experts, BASE "shared_experts:\n  count: 17\n", 7, 10, "out of range (0..16)"),
};

/* ---- limits that need generated input ------------------------------------------------- */

static char *repeat_text(const char *prefix, char fill, size_t fill_bytes, const char *suffix, size_t *bytes) {
    size_t prefix_bytes = strlen(prefix), suffix_bytes = strlen(suffix);
    char *text = malloc(prefix_bytes + fill_bytes + suffix_bytes + 1);
    assert_non_null(text);
    memcpy(text, prefix, prefix_bytes);
    memset(text + prefix_bytes, fill, fill_bytes);
    memcpy(text + prefix_bytes + fill_bytes, suffix, suffix_bytes + 1);
    *bytes = prefix_bytes + fill_bytes + suffix_bytes;
    return text;
}

static void spec_rejects_400_kilobytes_of_nested_brackets_quickly(void **state) {
    size_t bytes;
    char *text = repeat_text("", '[', 400 * 1024, "", &bytes);
    double start = seconds_now(), elapsed;
    (void)state;
    /* the root sequence is level 1, so the 33rd bracket is one level too deep */
    expect_spec_error(text, bytes, 1, 33, "nesting deeper than 32 levels");
    elapsed = seconds_now() - start;
    free(text);
    if (elapsed > 0.25)
        fail_msg("rejecting deep nesting took %.3f s", elapsed);
}

static void spec_rejects_nested_mappings_past_the_depth_limit(void **state) {
    char text[512];
    size_t used = (size_t)snprintf(text, sizeof text, "%s", BASE "extra: "), level;
    (void)state;
    for (level = 0; level < 40; level++)
        used += (size_t)snprintf(text + used, sizeof text - used, "{a: ");
    /* the root mapping is level 1, so the 32nd brace (column 8 + 4 * 31) is level 33 */
    expect_spec_error(text, used, 6, 8 + 4 * 31, "nesting deeper than 32 levels");
}

static void spec_accepts_nesting_up_to_the_depth_limit_before_the_schema(void **state) {
    /* 31 brackets under the root mapping reach exactly level 32: the tree is built and
     * the schema then names the unknown key */
    size_t bytes;
    char *text = repeat_text(BASE "extra: ", '[', 31, "", &bytes);
    char *closed = malloc(bytes + 32);
    (void)state;
    assert_non_null(closed);
    memcpy(closed, text, bytes);
    memset(closed + bytes, ']', 31);
    closed[bytes + 31] = '\n';
    expect_spec_error(closed, bytes + 32, 6, 1, "unknown key 'extra'");
    free(closed);
    free(text);
}

static void spec_rejects_input_over_the_size_limit(void **state) {
    size_t bytes;
    char *text = repeat_text(BASE "# ", 'x', MOEGEN_SPEC_MAX_BYTES, "\n", &bytes);
    double start = seconds_now();
    (void)state;
    expect_spec_error(text, bytes, 1, 1, "the limit is 1048576 bytes");
    assert_true(seconds_now() - start < 0.25);
    free(text);
}

static void spec_accepts_input_just_under_the_size_limit(void **state) {
    size_t bytes;
    const char *head = BASE "# ";
    char *text = repeat_text(head, 'x', MOEGEN_SPEC_MAX_BYTES - strlen(head) - 1, "\n", &bytes);
    moegen_spec spec;
    (void)state;
    assert_int_equal(bytes, MOEGEN_SPEC_MAX_BYTES);
    parse_ok(text, &spec);
    moegen_spec_free(&spec);
    free(text);
}

static void spec_rejects_more_nodes_than_the_limit(void **state) {
    /* a flow sequence of 5000 one-letter scalars: root mapping, key, sequence, then the
     * items; node 4097 is item 4094 at column 7 + 2 * 4093 */
    size_t used = 0, index;
    char *text = malloc(16 + 5000 * 2 + 4);
    (void)state;
    assert_non_null(text);
    used += (size_t)sprintf(text, "extra: [");
    for (index = 0; index < 5000; index++)
        used += (size_t)sprintf(text + used, index ? ",a" : "a");
    used += (size_t)sprintf(text + used, "]\n");
    expect_spec_error(text, used, 1, 9 + 2 * 4093, "more than 4096 YAML nodes");
    free(text);
}

static void spec_rejects_a_scalar_over_the_size_limit(void **state) {
    size_t bytes;
    char *text = repeat_text(BASE "description: ", 'd', MOEGEN_SPEC_MAX_SCALAR + 1, "\n", &bytes);
    (void)state;
    expect_spec_error(text, bytes, 6, 14, "a value of 4097 bytes (the limit is 4096 bytes)");
    free(text);
}

static void spec_accepts_a_scalar_at_the_size_limit(void **state) {
    size_t bytes;
    char *text = repeat_text(BASE "description: ", 'd', MOEGEN_SPEC_MAX_SCALAR, "\n", &bytes);
    moegen_spec spec;
    (void)state;
    parse_ok(text, &spec);
    assert_int_equal(strlen(spec.description), MOEGEN_SPEC_MAX_SCALAR);
    moegen_spec_free(&spec);
    free(text);
}

static void spec_rejects_a_300_character_name(void **state) {
    size_t bytes;
    char *text = repeat_text(BASE_WITHOUT_NAME "name: ", 'n', 300, "\n", &bytes);
    (void)state;
    expect_spec_error(text, bytes, 5, 7, "is not a valid name (1 to 64 characters");
    free(text);
}

static void spec_accepts_a_64_character_name(void **state) {
    size_t bytes;
    char *text = repeat_text(BASE_WITHOUT_NAME "name: a", 'b', 63, "\n", &bytes);
    moegen_spec spec;
    (void)state;
    parse_ok(text, &spec);
    assert_int_equal(strlen(spec.name), 64);
    free(text);
}

/* ---- accepted specs, presets and overrides --------------------------------------------- */

static void spec_resolves_megatron_defaults(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE, &spec);
    assert_string_equal(spec.name, "tiny");
    assert_string_equal(spec.ident, "tiny");
    assert_null(spec.source);
    assert_null(spec.description);
    assert_int_equal(spec.semantics, MOEGEN_SEMANTICS_MEGATRON);
    assert_int_equal(spec.num_experts, 8);
    assert_int_equal(spec.top_k, 2);
    assert_int_equal(spec.hidden_size, 64);
    assert_int_equal(spec.moe_intermediate_size, 128);
    assert_int_equal(spec.activation, MOEGEN_ACT_SWIGLU);
    assert_int_equal(spec.dtype, MOEGEN_DTYPE_BF16);
    assert_int_equal(spec.ep_size, 1);
    assert_int_equal(spec.mode, MOEGEN_MODE_EVAL);
    assert_false(spec.expert_bias);
    assert_false(spec.weight_on_input);
    assert_false(spec.use_residual);
    assert_int_equal(spec.router.score_function, MOEGEN_SCORE_SOFTMAX);
    assert_int_equal(spec.router.order, MOEGEN_ORDER_TOPK_THEN_SOFTMAX);
    assert_false(spec.router.norm_topk_prob);
    assert_true(spec.router.routed_scaling_factor == 1.0);
    assert_int_equal(spec.router.n_group, 1);
    assert_int_equal(spec.router.topk_group, 1);
    assert_int_equal(spec.router.group_topm, 2);
    assert_int_equal(spec.router.group_score, MOEGEN_GROUP_SCORE_TOPM_SUM);
    assert_int_equal(spec.router.group_mask, MOEGEN_GROUP_MASK_NEG_INF);
    assert_false(spec.router.score_bias);
    assert_false(spec.router.router_bias);
    assert_true(spec.router.input_jitter == 0.0);
    assert_int_equal(spec.router.noise, MOEGEN_NOISE_NONE);
    assert_true(spec.router.seed == 0);
    assert_int_equal(spec.router.aux_loss, MOEGEN_AUX_MEGATRON);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_DROPLESS);
    assert_true(spec.capacity.capacity_factor == 1.0);
    assert_true(spec.capacity.eval_capacity_factor == 1.0);
    assert_int_equal(spec.capacity.min_capacity, 0);
    assert_int_equal(spec.capacity.formula, MOEGEN_CAP_FORMULA_MEGATRON);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_PROBS);
    assert_false(spec.capacity.renormalize);
    assert_false(spec.capacity.pad_to_capacity);
    assert_int_equal(spec.shared.count, 0);
    assert_false(spec.shared.gate);
    moegen_spec_free(&spec);
}

static void spec_megatron_with_a_capacity_factor_uses_factor_mode_and_its_formula(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE "capacity:\n  capacity_factor: 1.25\n", &spec);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FACTOR);
    assert_int_equal(spec.capacity.formula, MOEGEN_CAP_FORMULA_MEGATRON);
    assert_true(spec.capacity.capacity_factor == 1.25);
    assert_true(spec.capacity.eval_capacity_factor == 1.25);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_PROBS);
    assert_false(spec.capacity.renormalize);
}

static void spec_deepspeed_top_1_uses_position_priority_without_renormalizing(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("semantics: deepspeed\nname: ds\nnum_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
             "moe_intermediate_size: 128\n",
             &spec);
    assert_int_equal(spec.router.order, MOEGEN_ORDER_SOFTMAX_THEN_TOPK);
    assert_int_equal(spec.router.aux_loss, MOEGEN_AUX_DEEPSPEED);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FACTOR);
    assert_int_equal(spec.capacity.formula, MOEGEN_CAP_FORMULA_DEEPSPEED);
    assert_int_equal(spec.capacity.min_capacity, 4);
    assert_true(spec.capacity.capacity_factor == 1.0);
    assert_true(spec.capacity.eval_capacity_factor == 1.0);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_POSITION);
    assert_false(spec.capacity.renormalize);
    assert_false(spec.capacity.pad_to_capacity);
}

static void spec_deepspeed_top_2_uses_choice_major_priority_and_renormalizes(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("semantics: deepspeed\n" BASE, &spec);
    assert_int_equal(spec.router.order, MOEGEN_ORDER_SOFTMAX_THEN_TOPK);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FACTOR);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR);
    assert_true(spec.capacity.renormalize);
    assert_int_equal(spec.capacity.min_capacity, 4);
}

static void spec_deepspeed_top_k_uses_probs_priority_and_renormalizes(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("semantics: deepspeed\nname: ds\nnum_experts: 16\nnum_experts_per_tok: 4\nhidden_size: 64\n"
             "moe_intermediate_size: 128\n",
             &spec);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_PROBS);
    assert_true(spec.capacity.renormalize);
    assert_int_equal(spec.router.aux_loss, MOEGEN_AUX_DEEPSPEED);
}

static void spec_lets_explicit_fields_override_the_preset(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("semantics: deepspeed\n" BASE "router:\n  order: topk_then_softmax\n  aux_loss: none\n"
             "capacity:\n  mode: factor\n  eval_capacity_factor: 2.0\n  min_capacity: 0\n  priority: probs\n"
             "  renormalize: false\n  pad_to_capacity: true\n",
             &spec);
    assert_int_equal(spec.router.order, MOEGEN_ORDER_TOPK_THEN_SOFTMAX);
    assert_int_equal(spec.router.aux_loss, MOEGEN_AUX_NONE);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FACTOR);
    assert_true(spec.capacity.capacity_factor == 1.0);
    assert_true(spec.capacity.eval_capacity_factor == 2.0);
    assert_int_equal(spec.capacity.min_capacity, 0);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_PROBS);
    assert_false(spec.capacity.renormalize);
    assert_true(spec.capacity.pad_to_capacity);

    parse_ok(BASE "router:\n  order: softmax_then_topk\ncapacity:\n  mode: factor\n  formula: deepspeed\n"
                  "  renormalize: true\n",
             &spec);
    assert_int_equal(spec.router.order, MOEGEN_ORDER_SOFTMAX_THEN_TOPK);
    assert_int_equal(spec.capacity.formula, MOEGEN_CAP_FORMULA_DEEPSPEED);
    assert_int_equal(spec.capacity.min_capacity, 0); /* megatron preset */
    assert_true(spec.capacity.renormalize);

    parse_ok("semantics: deepspeed\n" BASE "capacity:\n  mode: dropless\n", &spec);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_DROPLESS);
    assert_true(spec.capacity.renormalize);
}

static void spec_infers_fixed_mode_from_an_expert_capacity(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE "capacity:\n  expert_capacity: 64\n  priority: random\n", &spec);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FIXED);
    assert_int_equal(spec.capacity.expert_capacity, 64);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_RANDOM);
}

static void spec_derives_group_defaults(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("name: dsv3\nnum_experts: 256\nnum_experts_per_tok: 8\nhidden_size: 7168\nmoe_intermediate_size: 2048\n"
             "router:\n  score_function: sigmoid\n  score_bias: true\n  norm_topk_prob: true\n"
             "  routed_scaling_factor: 2.5\n  n_group: 8\n  topk_group: 4\n",
             &spec);
    assert_int_equal(spec.router.n_group, 8);
    assert_int_equal(spec.router.topk_group, 4);
    assert_int_equal(spec.router.group_topm, 2);
    assert_true(spec.router.score_bias);
    assert_true(spec.router.routed_scaling_factor == 2.5);

    parse_ok(BASE "router:\n  n_group: 4\n", &spec);
    assert_int_equal(spec.router.topk_group, 4);
    assert_int_equal(spec.router.group_topm, 1);
}

static void spec_accepts_every_field_written_out(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("name: my-model.v2\n"
             "source: \"https://example.org/config.json\"\n"
             "description: |\n  A long\n  description.\n"
             "semantics: megatron\nnum_experts: 64\nnum_experts_per_tok: 6\nhidden_size: 2048\n"
             "moe_intermediate_size: 1408\nactivation: geglu\ndtype: fp16\nep_size: 4\nmode: train\n"
             "expert_bias: true\nweight_on_input: false\nuse_residual: true\n"
             "router:\n  score_function: sqrtsoftplus\n  norm_topk_prob: true\n  routed_scaling_factor: 16\n"
             "  n_group: 8\n  topk_group: 3\n  group_topm: 2\n  group_score: max\n  group_mask: zero\n"
             "  score_bias: true\n  router_bias: true\n  input_jitter: 0.01\n  noise: none\n  seed: 1234\n"
             "  aux_loss: megatron\n"
             "capacity:\n  mode: fixed\n  expert_capacity: 96\n  priority: position\n  renormalize: true\n"
             "  pad_to_capacity: true\n"
             "shared_experts:\n  count: 2\n  intermediate_size: 2816\n  gate: true\n",
             &spec);
    assert_string_equal(spec.name, "my-model.v2");
    assert_string_equal(spec.ident, "my_model_v2");
    assert_string_equal(spec.source, "https://example.org/config.json");
    assert_string_equal(spec.description, "A long\ndescription.\n");
    assert_int_equal(spec.activation, MOEGEN_ACT_GEGLU);
    assert_int_equal(spec.dtype, MOEGEN_DTYPE_FP16);
    assert_int_equal(spec.ep_size, 4);
    assert_int_equal(spec.mode, MOEGEN_MODE_TRAIN);
    assert_true(spec.expert_bias);
    assert_true(spec.use_residual);
    assert_int_equal(spec.router.score_function, MOEGEN_SCORE_SQRTSOFTPLUS);
    assert_true(spec.router.routed_scaling_factor == 16.0);
    assert_int_equal(spec.router.group_score, MOEGEN_GROUP_SCORE_MAX);
    assert_int_equal(spec.router.group_mask, MOEGEN_GROUP_MASK_ZERO);
    assert_true(spec.router.input_jitter == 0.01);
    assert_true(spec.router.seed == 1234);
    assert_int_equal(spec.capacity.mode, MOEGEN_CAP_FIXED);
    assert_int_equal(spec.capacity.expert_capacity, 96);
    assert_int_equal(spec.capacity.priority, MOEGEN_PRIORITY_POSITION);
    assert_int_equal(spec.shared.count, 2);
    assert_int_equal(spec.shared.intermediate_size, 2816);
    assert_true(spec.shared.gate);
    moegen_spec_free(&spec);
    moegen_spec_free(&spec); /* a second free is harmless */
}

static void spec_accepts_the_largest_integer_seed(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE "router:\n  input_jitter: 0.5\n  seed: 9223372036854775807\n", &spec);
    assert_true(spec.router.seed == (uint64_t)INT64_MAX);
}

static void spec_resets_a_seed_that_nothing_uses(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE "router:\n  seed: 42\n", &spec);
    assert_true(spec.router.seed == 0);
    parse_ok(BASE "router:\n  noise: rsample\n  seed: 42\n", &spec);
    assert_true(spec.router.seed == 42);
}

static void spec_accepts_quoted_enum_values_and_a_byte_order_mark(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok("\xef\xbb\xbf" BASE "dtype: 'fp32'\nactivation: \"relu\"\n", &spec);
    assert_int_equal(spec.dtype, MOEGEN_DTYPE_FP32);
    assert_int_equal(spec.activation, MOEGEN_ACT_RELU);
}

static void spec_keeps_non_ascii_free_text(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE "description: \"Caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80\\ttabs ok\"\n", &spec);
    assert_string_equal(spec.description, "Caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80\ttabs ok");
    moegen_spec_free(&spec);
}

/* ---- canonical form and hash ------------------------------------------------------------- */

static void spec_canonical_form_lists_every_relevant_field_in_order(void **state) {
    moegen_spec spec;
    char *canonical;
    char hash[65], expected_hash[65];
    (void)state;
    parse_ok(BASE "source: somewhere\ndescription: anything\n", &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(canonical);
    assert_string_equal(canonical, "name: \"tiny\"\n"
                                   "semantics: megatron\n"
                                   "num_experts: 8\n"
                                   "num_experts_per_tok: 2\n"
                                   "hidden_size: 64\n"
                                   "moe_intermediate_size: 128\n"
                                   "activation: swiglu\n"
                                   "dtype: bf16\n"
                                   "ep_size: 1\n"
                                   "mode: eval\n"
                                   "expert_bias: false\n"
                                   "weight_on_input: false\n"
                                   "use_residual: false\n"
                                   "router:\n"
                                   "  score_function: softmax\n"
                                   "  order: topk_then_softmax\n"
                                   "  norm_topk_prob: false\n"
                                   "  routed_scaling_factor: 1.0\n"
                                   "  n_group: 1\n"
                                   "  router_bias: false\n"
                                   "  input_jitter: 0.0\n"
                                   "  noise: none\n"
                                   "  aux_loss: megatron\n"
                                   "capacity:\n"
                                   "  mode: dropless\n"
                                   "  renormalize: false\n"
                                   "shared_experts:\n"
                                   "  count: 0\n");
    moegen_spec_hash(&spec, hash);
    moegen_sha256_hex(canonical, strlen(canonical), expected_hash);
    assert_string_equal(hash, expected_hash);
    assert_int_equal(strlen(hash), 64);
    free(canonical);
    moegen_spec_free(&spec);
}

static void spec_canonical_form_lists_the_fields_of_the_capacity_mode(void **state) {
    moegen_spec spec;
    char *canonical;
    (void)state;
    parse_ok("semantics: deepspeed\n" BASE "capacity:\n  capacity_factor: 1.25\n", &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "capacity:\n"
                                      "  mode: factor\n"
                                      "  capacity_factor: 1.25\n"
                                      "  eval_capacity_factor: 1.25\n"
                                      "  formula: deepspeed\n"
                                      "  min_capacity: 4\n"
                                      "  priority: position_choice_major\n"
                                      "  renormalize: true\n"
                                      "  pad_to_capacity: false\n"
                                      "shared_experts:\n"));
    assert_null(strstr(canonical, "expert_capacity"));
    free(canonical);

    parse_ok(BASE "capacity:\n  capacity_factor: 2\n", &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "  formula: megatron\n  priority: probs\n"));
    assert_null(strstr(canonical, "min_capacity"));
    free(canonical);

    parse_ok(BASE "capacity:\n  expert_capacity: 64\n  priority: random\n", &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "capacity:\n"
                                      "  mode: fixed\n"
                                      "  expert_capacity: 64\n"
                                      "  priority: random\n"
                                      "  renormalize: false\n"
                                      "  pad_to_capacity: false\n"
                                      "shared_experts:\n"));
    assert_non_null(strstr(canonical, "  noise: none\n  seed: 0\n  aux_loss: megatron\n"));
    free(canonical);
}

static void spec_canonical_form_lists_group_bias_and_shared_fields_only_when_they_apply(void **state) {
    moegen_spec spec;
    char *canonical;
    (void)state;
    parse_ok(BASE "router:\n  score_function: sigmoid\n  n_group: 4\n  topk_group: 2\n"
                  "shared_experts:\n  count: 1\n  intermediate_size: 256\n",
             &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "router:\n"
                                      "  score_function: sigmoid\n"
                                      "  norm_topk_prob: false\n"
                                      "  routed_scaling_factor: 1.0\n"
                                      "  n_group: 4\n"
                                      "  topk_group: 2\n"
                                      "  group_topm: 1\n"
                                      "  group_score: topm_sum\n"
                                      "  group_mask: neg_inf\n"
                                      "  score_bias: false\n"
                                      "  router_bias: false\n"));
    assert_non_null(strstr(canonical, "shared_experts:\n  count: 1\n  intermediate_size: 256\n  gate: false\n"));
    assert_null(strstr(canonical, "order:"));
    free(canonical);
}

static void spec_canonical_form_writes_the_shortest_round_trip_floats(void **state) {
    moegen_spec spec, again;
    char *canonical;
    (void)state;
    parse_ok(BASE "router:\n  routed_scaling_factor: 2.50\n  input_jitter: 1e-5\n"
                  "capacity:\n  capacity_factor: 1E6\n  eval_capacity_factor: 0.30000000000000004\n",
             &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "  routed_scaling_factor: 2.5\n"));
    assert_non_null(strstr(canonical, "  input_jitter: 1.0e-05\n"));
    assert_non_null(strstr(canonical, "  capacity_factor: 1000000.0\n"));
    assert_non_null(strstr(canonical, "  eval_capacity_factor: 0.30000000000000004\n"));
    parse_ok(canonical, &again);
    assert_specs_equal(&spec, &again);
    free(canonical);

    parse_ok(BASE "router:\n  input_jitter: -0.0\n  routed_scaling_factor: 0.1\n", &spec);
    canonical = moegen_spec_canonical(&spec);
    assert_non_null(strstr(canonical, "  routed_scaling_factor: 0.1\n"));
    assert_non_null(strstr(canonical, "  input_jitter: 0.0\n"));
    free(canonical);
}

static void spec_hash_ignores_order_comments_whitespace_and_quoting(void **state) {
    static const char *const variants[] = {
        "name: mix\nsemantics: deepspeed\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 4096\n"
        "moe_intermediate_size: 14336\nrouter:\n  norm_topk_prob: true\ncapacity:\n  capacity_factor: 1.25\n",

        "# reordered, commented, flow style, quoted enums, CRLF\r\n"
        "capacity: {capacity_factor: 1.250}   # trailing comment\r\n"
        "router: {norm_topk_prob: true}\r\n"
        "\r\n"
        "moe_intermediate_size: 14336\r\n"
        "hidden_size:     4096\r\n"
        "num_experts_per_tok: 2\r\n"
        "num_experts: 8\r\n"
        "semantics: 'deepspeed'\r\n"
        "\"name\": \"mix\"\r\n",

        "---\n"
        "name: mix\n"
        "source: a different source\n"
        "description: >\n  different description\n"
        "semantics: deepspeed\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 4096\n"
        "moe_intermediate_size: 14336\n"
        "router:\n    seed: 77   # unused without randomness\n    norm_topk_prob: true\n"
        "capacity:\n    mode: factor\n    capacity_factor: 125e-2\n    formula: deepspeed\n"
        "...\n",
    };
    char first_hash[65], hash[65];
    char *first_canonical = NULL;
    size_t index;
    (void)state;
    for (index = 0; index < sizeof variants / sizeof variants[0]; index++) {
        moegen_spec spec;
        char *canonical;
        parse_ok(variants[index], &spec);
        canonical = moegen_spec_canonical(&spec);
        assert_non_null(canonical);
        moegen_spec_hash(&spec, hash);
        if (index == 0) {
            first_canonical = canonical;
            memcpy(first_hash, hash, sizeof hash);
        } else {
            assert_string_equal(canonical, first_canonical);
            assert_string_equal(hash, first_hash);
            free(canonical);
        }
        moegen_spec_free(&spec);
    }
    free(first_canonical);
}

static void spec_hash_changes_with_every_relevant_field(void **state) {
    static const char *const changes[] = {
        "dtype: fp16\n",
        "activation: silu\n",
        "mode: train\n",
        "semantics: deepspeed\n",
        "router:\n  norm_topk_prob: true\n",
        "router:\n  input_jitter: 0.01\n",
        "router:\n  input_jitter: 0.01\n  seed: 7\n",
        "capacity:\n  renormalize: true\n",
        "shared_experts:\n  count: 1\n  intermediate_size: 64\n",
    };
    char base_hash[65], hash[65], previous[65] = "";
    moegen_spec spec;
    size_t index;
    (void)state;
    parse_ok(BASE, &spec);
    moegen_spec_hash(&spec, base_hash);
    for (index = 0; index < sizeof changes / sizeof changes[0]; index++) {
        char text[512];
        snprintf(text, sizeof text, "%s%s", BASE, changes[index]);
        parse_ok(text, &spec);
        moegen_spec_hash(&spec, hash);
        if (strcmp(hash, base_hash) == 0 || strcmp(hash, previous) == 0)
            fail_msg("changing '%s' did not change the hash", changes[index]);
        memcpy(previous, hash, sizeof hash);
    }
}

static void spec_canonical_form_parses_back_to_an_equal_spec(void **state) {
    static const char *const specs[] = {
        BASE,
        "semantics: deepspeed\n" BASE "capacity:\n  capacity_factor: 1.25\n  eval_capacity_factor: 2\n",
        "semantics: deepspeed\nname: top1\nnum_experts: 16\nnum_experts_per_tok: 1\nhidden_size: 1024\n"
        "moe_intermediate_size: 4096\nactivation: gelu\nweight_on_input: true\nmode: train\n"
        "router:\n  noise: rsample\n  seed: 99\n  input_jitter: 0.01\n",
        "name: dsv3\nnum_experts: 256\nnum_experts_per_tok: 8\nhidden_size: 7168\nmoe_intermediate_size: 2048\n"
        "router:\n  score_function: sigmoid\n  score_bias: true\n  norm_topk_prob: true\n"
        "  routed_scaling_factor: 2.5\n  n_group: 8\n  topk_group: 4\n  group_mask: zero\n"
        "shared_experts:\n  count: 1\n  intermediate_size: 2048\n",
        "name: null-ish\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 64\n"
        "dtype: fp32\nactivation: relu\nexpert_bias: true\nuse_residual: true\nep_size: 2\n"
        "capacity:\n  expert_capacity: 5\n  priority: random\n  pad_to_capacity: true\n"
        "shared_experts:\n  count: 3\n  intermediate_size: 32\n  gate: true\n",
        "name: \"null\"\nnum_experts: 4\nnum_experts_per_tok: 4\nhidden_size: 16\nmoe_intermediate_size: 16\n",
    };
    size_t index;
    (void)state;
    for (index = 0; index < sizeof specs / sizeof specs[0]; index++) {
        moegen_spec spec, again;
        char *canonical, *canonical_again;
        parse_ok(specs[index], &spec);
        canonical = moegen_spec_canonical(&spec);
        assert_non_null(canonical);
        parse_ok(canonical, &again);
        assert_specs_equal(&spec, &again);
        canonical_again = moegen_spec_canonical(&again);
        assert_string_equal(canonical, canonical_again);
        free(canonical);
        free(canonical_again);
        moegen_spec_free(&spec);
        moegen_spec_free(&again);
    }
}

/* ---- every error at once -------------------------------------------------------------------- */

/* Parse `yaml` that must fail; returns the message (a static copy). */
static const char *spec_errors(const char *yaml) {
    static moegen_error err;
    moegen_spec spec;
    memset(&spec, 0x5a, sizeof spec);
    if (moegen_spec_parse(yaml, strlen(yaml), "bad.yaml", &spec, &err) != MOEGEN_ERR_SPEC)
        fail_msg("expected MOEGEN_ERR_SPEC for:\n%s", yaml);
    assert_int_equal(err.code, MOEGEN_ERR_SPEC);
    assert_true(spec_is_all_zero(&spec));
    return err.message;
}

static int count_lines(const char *text) {
    int lines = *text ? 1 : 0;
    for (; *text; text++)
        lines += *text == '\n';
    return lines;
}

static void spec_reports_every_independent_error_in_file_order(void **state) {
    (void)state;
    /* a value error, an unknown key and a cross-field rule: three independent errors */
    assert_string_equal(spec_errors("name: tiny\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 100\n"
                                    "moe_intermediate_size: 128\nactivaton: relu\nep_size: 3\n"),
                        "bad.yaml:4:14: hidden_size: 100 is not a multiple of 16 (the GPU kernels step through it "
                        "in 16-element vectors)\n"
                        "bad.yaml:6:1: unknown key 'activaton' (did you mean 'activation'?)\n"
                        "bad.yaml:7:10: ep_size: 3 does not divide num_experts (8); every rank owns the same number "
                        "of experts\n"
                        "3 errors");
    /* errors inside sections, a field that does not apply and a missing required key */
    assert_string_equal(spec_errors("name: tiny\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                                    "router:\n  score_function: sofmax\n  seed: -1\n"
                                    "capacity:\n  mode: dropless\n  capacity_factor: 1.5\n"),
                        "bad.yaml:6:19: router.score_function: unknown value 'sofmax' (did you mean 'softmax'? "
                        "valid values: softmax, sigmoid, sqrtsoftplus)\n"
                        "bad.yaml:1:1: missing required key 'moe_intermediate_size'\n"
                        "bad.yaml:7:9: router.seed: -1 is out of range (0..9223372036854775807)\n"
                        "bad.yaml:10:3: capacity.capacity_factor applies only when capacity.mode is factor (it is "
                        "dropless)\n"
                        "4 errors");
}

static void spec_keeps_the_first_error_first_and_sorts_the_others(void **state) {
    (void)state;
    /* values are checked before the rules between them: the bad dtype on line 7 is found
     * first (and was the only error reported before), the rule on line 6 follows */
    assert_string_equal(spec_errors(BASE "ep_size: 3\ndtype: fp64\n"),
                        "bad.yaml:7:8: dtype: unknown value 'fp64' (did you mean 'fp32'? valid values: fp32, fp16, "
                        "bf16)\n"
                        "bad.yaml:6:10: ep_size: 3 does not divide num_experts (8); every rank owns the same number "
                        "of experts\n"
                        "2 errors");
    /* duplicate keys are found while the tree is built and do not stop it */
    assert_string_equal(spec_errors(BASE "dtype: fp16\ndtype: fp32\nzzqqxxyy: 1\n"),
                        "bad.yaml:7:1: duplicate key 'dtype' (first defined at line 6)\n"
                        "bad.yaml:8:1: unknown key 'zzqqxxyy' (specs/README.md lists the keys)\n"
                        "2 errors");
}

static void spec_skips_errors_that_follow_from_another(void **state) {
    static const struct {
        const char *yaml, *message;
    } cases[] = {
        /* a bad num_experts: no rule that reads it (k <= E, ep_size and n_group divide E) */
        {"name: tiny\nnum_experts: 0\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 128\n"
         "ep_size: 3\nrouter:\n  n_group: 3\n",
         "bad.yaml:2:14: num_experts: 0 is out of range (1..1024)"},
        /* n_group does not divide E: nothing about E / n_group */
        {BASE "router:\n  n_group: 3\n  group_topm: 3\n  topk_group: 1\n",
         "bad.yaml:7:12: router.n_group: 3 does not divide num_experts (8)"},
        /* k > E: not again as "k exceeds the experts in the kept groups" */
        {"name: tiny\nnum_experts: 8\nnum_experts_per_tok: 9\nhidden_size: 64\nmoe_intermediate_size: 128\n"
         "router:\n  n_group: 2\n  topk_group: 1\n",
         "bad.yaml:3:22: num_experts_per_tok: 9 exceeds num_experts (8)"},
        /* an unknown score function: score_bias may or may not apply */
        {BASE "router:\n  score_function: sofmax\n  score_bias: true\n",
         "bad.yaml:7:19: router.score_function: unknown value 'sofmax' (did you mean 'softmax'? valid values: "
         "softmax, sigmoid, sqrtsoftplus)"},
        /* an unknown preset: the capacity mode it would give is unknown */
        {"semantics: fairseq\n" BASE "capacity:\n  min_capacity: 4\n",
         "bad.yaml:1:12: semantics: unknown value 'fairseq' (valid values: megatron, deepspeed)"},
        /* a misspelt required key is one error, not also "missing required key" */
        {"name: tiny\nnum_expert: 8\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 128\n",
         "bad.yaml:2:1: unknown key 'num_expert' (did you mean 'num_experts'?)"},
        {"name: tiny\nnum_local_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 128\n",
         "bad.yaml:2:1: unknown key 'num_local_experts' (the Hugging Face name; moegen calls it 'num_experts')"},
        /* a misspelt count: the shared fields may apply */
        {BASE "shared_experts:\n  cuont: 1\n  intermediate_size: 64\n  gate: true\n",
         "bad.yaml:7:3: unknown key 'cuont' in shared_experts (did you mean 'count'?)"},
        /* a misspelt expert_capacity: not also "required", nor a mode guessed without it */
        {BASE "capacity:\n  mode: fixed\n  expert_capacty: 64\n",
         "bad.yaml:8:3: unknown key 'expert_capacty' in capacity (did you mean 'expert_capacity'?)"},
        {BASE "capacity:\n  expert_capacty: 64\n  priority: random\n",
         "bad.yaml:7:3: unknown key 'expert_capacty' in capacity (did you mean 'expert_capacity'?)"},
        {BASE "shared_experts:\n  count: 1\n  intermediate_sise: 64\n",
         "bad.yaml:8:3: unknown key 'intermediate_sise' in shared_experts (did you mean 'intermediate_size'?)"},
        /* a section that is not a mapping: nothing about what it would hold */
        {BASE "shared_experts: 2\n",
         "bad.yaml:6:17: shared_experts: expected a mapping of shared_experts settings, found a scalar"},
        /* a YAML syntax error stops everything: the bad dtype before it is not reported */
        {BASE "dtype: fp64\nrouter: {n_group: 2\n", "bad.yaml:8:1: YAML syntax error"},
    };
    size_t index;
    (void)state;
    for (index = 0; index < sizeof cases / sizeof cases[0]; index++) {
        const char *message = spec_errors(cases[index].yaml);
        if (strncmp(message, cases[index].message, strlen(cases[index].message)) != 0 || strchr(message, '\n'))
            fail_msg("case %zu: expected the one error '%s', got:\n%s", index, cases[index].message, message);
    }
}

static void spec_bounds_the_error_list_and_says_how_many_more(void **state) {
    char yaml[8192], expected_first[128], line[128];
    const char *message, *more;
    size_t used;
    int index, shown = 0, hidden = -1, lines;
    (void)state;
    used = (size_t)snprintf(yaml, sizeof yaml, "%s", BASE);
    for (index = 0; index < 60; index++)
        used += (size_t)snprintf(yaml + used, sizeof yaml - used, "unrelated_setting_number_%02d: 1\n", index);
    message = spec_errors(yaml);
    assert_true(strlen(message) < MOEGEN_ERROR_MESSAGE_BYTES);
    snprintf(expected_first, sizeof expected_first,
             "bad.yaml:6:1: unknown key 'unrelated_setting_number_00' (specs/README.md lists the keys)\n");
    assert_true(strncmp(message, expected_first, strlen(expected_first)) == 0);
    /* whole lines in file order, then "... and N more", then the count */
    lines = count_lines(message);
    for (index = 0; index < lines - 2; index++) {
        snprintf(line, sizeof line,
                 "bad.yaml:%d:1: unknown key 'unrelated_setting_number_%02d' (specs/README.md lists the keys)\n",
                 6 + index, index);
        assert_non_null(strstr(message, line));
        shown++;
    }
    more = strstr(message, "\n... and ");
    assert_non_null(more);
    assert_int_equal(sscanf(more, "\n... and %d more\n", &hidden), 1);
    assert_int_equal(shown + hidden, 60);
    assert_true(shown > 5);
    assert_non_null(strstr(message, " more\n60 errors"));
    assert_string_equal(message + strlen(message) - strlen("\n60 errors"), "\n60 errors");
}

static void spec_keeps_a_long_first_error_whole(void **state) {
    char path[900], yaml[256], alone[MOEGEN_ERROR_MESSAGE_BYTES];
    moegen_spec spec;
    moegen_error err;
    (void)state;
    memset(path, 'p', sizeof path - 1);
    path[sizeof path - 1] = '\0';
    /* the error alone */
    snprintf(yaml, sizeof yaml, "%s", BASE "dtype: fp64\n");
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), path, &spec, &err), MOEGEN_ERR_SPEC);
    snprintf(alone, sizeof alone, "%s", err.message);
    /* with two more: the first line is the same, the others do not fit */
    snprintf(yaml, sizeof yaml, "%s", BASE "dtype: fp64\nep_size: 3\nmode: eval2\n");
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), path, &spec, &err), MOEGEN_ERR_SPEC);
    assert_true(strncmp(err.message, alone, strlen(alone)) == 0);
    assert_string_equal(err.message + strlen(alone), "\n... and 2 more\n3 errors");
}

/* ---- warnings ------------------------------------------------------------------------------- */

/* Parse a valid spec and return its warnings (a static copy); *count gets warning_count. */
static const char *spec_warnings(const char *yaml, int *count) {
    static char warnings[MOEGEN_SPEC_WARNINGS_BYTES];
    moegen_spec spec;
    parse_ok(yaml, &spec);
    memcpy(warnings, spec.warnings, sizeof warnings);
    *count = spec.warning_count;
    moegen_spec_free(&spec);
    return warnings;
}

static void expect_one_warning(const char *yaml, const char *prefix, const char *needle) {
    int count;
    const char *warnings = spec_warnings(yaml, &count);
    if (count != 1 || strncmp(warnings, prefix, strlen(prefix)) != 0 || !strstr(warnings, needle) ||
        strchr(warnings, '\n'))
        fail_msg("expected one warning '%s...%s...', got %d:\n%s\nfor:\n%s", prefix, needle, count, warnings, yaml);
}

static void expect_no_warning(const char *yaml) {
    int count;
    const char *warnings = spec_warnings(yaml, &count);
    if (count != 0 || warnings[0] != '\0')
        fail_msg("expected no warning, got %d:\n%s\nfor:\n%s", count, warnings, yaml);
}

#define TOP1                                                                                                 \
    "name: top1\n"                                                                                           \
    "num_experts: 8\n"                                                                                       \
    "num_experts_per_tok: 1\n"                                                                               \
    "hidden_size: 64\n"                                                                                      \
    "moe_intermediate_size: 128\n"

static void spec_warns_about_a_plain_activation_in_a_gated_family(void **state) {
    (void)state;
    expect_one_warning(BASE "activation: silu\nsource: https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json\n",
                       "good.yaml:6:13: activation: silu is not gated, but the source mentions 'qwen', a model "
                       "family whose experts are gated",
                       "write activation: swiglu");
    expect_one_warning("name: mixtral-copy\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                       "moe_intermediate_size: 128\nactivation: gelu\n",
                       "good.yaml:6:13: activation: gelu is not gated, but the name mentions 'mixtral'", "geglu");
    expect_one_warning(BASE "description: >\n  a DeepSeek-style layer\nactivation: relu\n",
                       "good.yaml:8:13: activation: relu is not gated, but the description mentions 'deepseek'", "");
    /* gated: fine; no family named; a family only inside another word */
    expect_no_warning(BASE "activation: swiglu\nsource: https://huggingface.co/Qwen/Qwen3-30B-A3B\n");
    expect_no_warning(BASE "activation: silu\nsource: a dense FFN from somewhere\n");
    expect_no_warning(BASE "activation: silu\ndescription: served with ollama\n");
}

static void spec_warns_about_deepseek_routing_without_a_score_bias(void **state) {
    (void)state;
    expect_one_warning(BASE "router:\n  score_function: sigmoid\n  n_group: 2\n",
                       "good.yaml:7:19: router.score_function: sigmoid with router.n_group 2 is DeepSeek-V3-style "
                       "routing",
                       "router.score_bias is false");
    expect_one_warning(BASE "router:\n  score_function: sqrtsoftplus\n  n_group: 4\n  topk_group: 2\n",
                       "good.yaml:7:19: router.score_function: sqrtsoftplus with router.n_group 4", "score_bias");
    expect_one_warning(BASE "router:\n  score_function: sigmoid\n  routed_scaling_factor: 2.5\n",
                       "good.yaml:7:19: router.score_function: sigmoid with router.routed_scaling_factor 2.5", "");
    expect_no_warning(BASE "router:\n  score_function: sigmoid\n  n_group: 2\n  score_bias: true\n");
    expect_no_warning(BASE "router:\n  score_function: sigmoid\n  routed_scaling_factor: 2.5\n  score_bias: true\n");
    expect_no_warning(BASE "router:\n  score_function: sigmoid\n");
    expect_no_warning(BASE "router:\n  n_group: 2\n  routed_scaling_factor: 16.0\n"); /* DeepSeek-V2: softmax */
}

static void spec_warns_about_top_1_weights_that_are_always_one(void **state) {
    (void)state;
    expect_one_warning(TOP1 "router:\n  score_function: sigmoid\n  norm_topk_prob: true\n",
                       "good.yaml:8:19: router.norm_topk_prob: true with num_experts_per_tok 1 divides the one "
                       "routing weight by itself, so every weight is 1 and",
                       "");
    expect_one_warning(TOP1 "router:\n  order: softmax_then_topk\n  norm_topk_prob: true\n  routed_scaling_factor: 2.0\n",
                       "good.yaml:8:19: router.norm_topk_prob: true",
                       "every weight is 1 (times router.routed_scaling_factor)");
    /* top-k then softmax over one logit: written, or the megatron preset's default */
    expect_one_warning(TOP1 "router:\n  order: topk_then_softmax\n",
                       "good.yaml:7:10: router.order: topk_then_softmax with num_experts_per_tok 1 is a softmax over "
                       "one logit",
                       "softmax_then_topk weights the expert by its probability");
    expect_one_warning(TOP1, "good.yaml:3:22: router.order: topk_then_softmax (the megatron preset's default) with",
                       "");
    expect_no_warning(TOP1 "router:\n  order: softmax_then_topk\n");
    expect_no_warning("semantics: deepspeed\n" TOP1);
    expect_no_warning(TOP1 "router:\n  score_function: sigmoid\n");
    expect_no_warning(BASE "router:\n  order: topk_then_softmax\n  norm_topk_prob: true\n");
}

static void spec_warns_about_weight_on_input_with_softmax(void **state) {
    (void)state;
    expect_one_warning(TOP1 "weight_on_input: true\nrouter:\n  order: softmax_then_topk\n",
                       "good.yaml:6:18: weight_on_input: true with router.score_function softmax", "sigmoid");
    expect_no_warning(TOP1 "weight_on_input: true\nrouter:\n  score_function: sigmoid\n");
}

static void spec_lists_warnings_in_file_order_and_bounds_them(void **state) {
    char path[600], yaml[512];
    moegen_spec spec;
    moegen_error err;
    int count;
    const char *warnings;
    (void)state;
    snprintf(yaml, sizeof yaml, "%s",
             "name: llama-top1\nweight_on_input: true\nnum_experts: 8\nnum_experts_per_tok: 1\nhidden_size: 64\n"
             "moe_intermediate_size: 128\nactivation: silu\nrouter:\n  norm_topk_prob: true\n");
    warnings = spec_warnings(yaml, &count);
    assert_int_equal(count, 3);
    assert_int_equal(count_lines(warnings), 3);
    assert_true(strncmp(warnings, "good.yaml:2:18: weight_on_input", strlen("good.yaml:2:18: weight_on_input")) == 0);
    assert_non_null(strstr(warnings, "\ngood.yaml:7:13: activation: silu is not gated, but the name mentions 'llama'"));
    assert_non_null(strstr(warnings, "\ngood.yaml:9:19: router.norm_topk_prob: true"));
    assert_true(strstr(warnings, "good.yaml:7:13") < strstr(warnings, "good.yaml:9:19"));
    /* a long path: the first warning fits, the other two are counted */
    memset(path, 'w', sizeof path - 1);
    path[sizeof path - 1] = '\0';
    assert_int_equal(moegen_spec_parse(yaml, strlen(yaml), path, &spec, &err), MOEGEN_OK);
    assert_int_equal(spec.warning_count, 3);
    assert_true(strlen(spec.warnings) < MOEGEN_SPEC_WARNINGS_BYTES);
    assert_int_equal(count_lines(spec.warnings), 2);
    assert_non_null(strstr(spec.warnings, ":2:18: weight_on_input"));
    assert_string_equal(spec.warnings + strlen(spec.warnings) - strlen("\n... and 2 more"), "\n... and 2 more");
    moegen_spec_free(&spec);
}

/* The repository root: $MOEGEN_SOURCE_DIR (CTest sets it), else the directory above
 * this file's (CMake compiles it by its absolute path). */
static void source_directory(char *out, size_t size) {
    const char *from_environment = getenv("MOEGEN_SOURCE_DIR");
    char *cut;
    if (from_environment && *from_environment) {
        snprintf(out, size, "%s", from_environment);
        return;
    }
    snprintf(out, size, "%s", __FILE__);
    cut = strstr(out, "/tests/test_spec.c");
    if (cut)
        *cut = '\0';
    else
        snprintf(out, size, ".");
}

static void spec_shipped_specs_load_without_warnings(void **state) {
    char root[2048], directory[2100], path[4200];
    struct dirent *entry;
    DIR *listing;
    int loaded = 0;
    (void)state;
    source_directory(root, sizeof root);
    snprintf(directory, sizeof directory, "%s/specs", root);
    listing = opendir(directory);
    if (!listing)
        fail_msg("cannot open %s (set MOEGEN_SOURCE_DIR to the repository)", directory);
    while ((entry = readdir(listing)) != NULL) {
        size_t length = strlen(entry->d_name);
        moegen_spec spec;
        moegen_error err;
        if (length < 6 || strcmp(entry->d_name + length - 5, ".yaml") != 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", directory, entry->d_name);
        if (moegen_spec_load_file(path, &spec, &err) != MOEGEN_OK)
            fail_msg("%s", err.message);
        if (spec.warning_count != 0 || spec.warnings[0] != '\0')
            fail_msg("%s warns:\n%s", path, spec.warnings);
        moegen_spec_free(&spec);
        loaded++;
    }
    closedir(listing);
    assert_true(loaded >= 10);
}

/* ---- files, arguments, helpers ---------------------------------------------------------------- */

static void spec_load_reports_a_missing_file_as_an_io_error(void **state) {
    moegen_spec spec;
    moegen_error err;
    (void)state;
    assert_int_equal(moegen_spec_load_file("/nonexistent/moegen/spec.yaml", &spec, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.code, MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOENT);
    assert_string_equal(err.message, "/nonexistent/moegen/spec.yaml: No such file or directory");
    assert_true(spec_is_all_zero(&spec));
    assert_int_equal(moegen_spec_load_file("/", &spec, &err), MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, "/: Is a directory"));
}

static char *write_temp_file(const char *contents, size_t bytes) {
    const char *directory = getenv("TMPDIR");
    char *path = malloc(4096);
    int descriptor;
    assert_non_null(path);
    snprintf(path, 4096, "%s/test_spec_XXXXXX.yaml", directory && *directory ? directory : "/tmp");
    descriptor = mkstemps(path, 5);
    assert_true(descriptor >= 0);
    assert_int_equal(write(descriptor, contents, bytes), (ssize_t)bytes);
    assert_int_equal(close(descriptor), 0);
    return path;
}

static void spec_load_reads_a_file_and_names_it_in_errors(void **state) {
    moegen_spec spec;
    moegen_error err;
    char expected[4200];
    char *path;
    size_t bytes;
    char *big;
    (void)state;
    path = write_temp_file(BASE "description: from a file\n", strlen(BASE "description: from a file\n"));
    assert_int_equal(moegen_spec_load_file(path, &spec, &err), MOEGEN_OK);
    assert_string_equal(spec.name, "tiny");
    assert_string_equal(spec.description, "from a file");
    moegen_spec_free(&spec);
    unlink(path);
    free(path);

    path = write_temp_file(BASE "dtype: fp64\n", strlen(BASE "dtype: fp64\n"));
    assert_int_equal(moegen_spec_load_file(path, &spec, &err), MOEGEN_ERR_SPEC);
    snprintf(expected, sizeof expected, "%s:6:8: dtype: unknown value 'fp64'", path);
    assert_non_null(strstr(err.message, expected));
    unlink(path);
    free(path);

    big = repeat_text(BASE "#", 'x', MOEGEN_SPEC_MAX_BYTES, "\n", &bytes);
    path = write_temp_file(big, bytes);
    assert_int_equal(moegen_spec_load_file(path, &spec, &err), MOEGEN_ERR_SPEC);
    assert_non_null(strstr(err.message, ":1:1: the spec is 1048577 bytes; the limit is 1048576 bytes"));
    unlink(path);
    free(path);
    free(big);
}

static void spec_rejects_null_arguments(void **state) {
    moegen_spec spec;
    moegen_error err;
    (void)state;
    assert_int_equal(moegen_spec_parse(BASE, strlen(BASE), "x", NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_spec_parse(NULL, 5, "x", &spec, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_spec_load_file(NULL, &spec, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_spec_parse(NULL, 0, NULL, &spec, &err), MOEGEN_ERR_SPEC);
    assert_string_equal(err.message, "<string>:1:1: empty spec (no YAML content, only blank lines or comments)");
    /* no error struct: the status alone */
    assert_int_equal(moegen_spec_parse("x: 1\n", 5, NULL, &spec, NULL), MOEGEN_ERR_SPEC);
    assert_int_equal(moegen_spec_parse(BASE, strlen(BASE), NULL, &spec, NULL), MOEGEN_OK);
    moegen_spec_free(NULL);
}

static void spec_parses_text_that_is_not_nul_terminated(void **state) {
    moegen_spec spec;
    moegen_error err;
    char *copy = malloc(strlen(BASE));
    (void)state;
    assert_non_null(copy);
    memcpy(copy, BASE, strlen(BASE)); /* no terminator: ASan catches any overread */
    assert_int_equal(moegen_spec_parse(copy, strlen(BASE), "heap.yaml", &spec, &err), MOEGEN_OK);
    assert_int_equal(moegen_spec_parse(copy, strlen(BASE) - 1, "heap.yaml", &spec, &err), MOEGEN_OK);
    assert_int_equal(moegen_spec_parse(copy, strlen(BASE) - 2, "heap.yaml", &spec, &err), MOEGEN_ERR_SPEC);
    assert_non_null(strstr(err.message, "heap.yaml:5:24: moe_intermediate_size: 12 is out of range"));
    free(copy);
}

static void spec_helpers_report_sizes_and_names(void **state) {
    moegen_spec spec;
    (void)state;
    parse_ok(BASE, &spec);
    assert_int_equal(moegen_spec_ffn_rows(&spec), 256);
    spec.activation = MOEGEN_ACT_GELU_TANH;
    assert_int_equal(moegen_spec_ffn_rows(&spec), 128);
    assert_true(moegen_activation_is_gated(MOEGEN_ACT_SWIGLU));
    assert_true(moegen_activation_is_gated(MOEGEN_ACT_GEGLU));
    assert_false(moegen_activation_is_gated(MOEGEN_ACT_SILU));
    assert_int_equal(moegen_dtype_size(MOEGEN_DTYPE_FP32), 4);
    assert_int_equal(moegen_dtype_size(MOEGEN_DTYPE_FP16), 2);
    assert_int_equal(moegen_dtype_size(MOEGEN_DTYPE_BF16), 2);
    assert_string_equal(moegen_dtype_name(MOEGEN_DTYPE_BF16), "bf16");
    assert_string_equal(moegen_activation_name(MOEGEN_ACT_GELU_TANH), "gelu_tanh");
    assert_string_equal(moegen_score_fn_name(MOEGEN_SCORE_SQRTSOFTPLUS), "sqrtsoftplus");
    assert_string_equal(moegen_order_name(MOEGEN_ORDER_SOFTMAX_THEN_TOPK), "softmax_then_topk");
    assert_string_equal(moegen_group_score_name(MOEGEN_GROUP_SCORE_MAX), "max");
    assert_string_equal(moegen_group_mask_name(MOEGEN_GROUP_MASK_ZERO), "zero");
    assert_string_equal(moegen_noise_name(MOEGEN_NOISE_RSAMPLE), "rsample");
    assert_string_equal(moegen_aux_loss_name(MOEGEN_AUX_DEEPSPEED), "deepspeed");
    assert_string_equal(moegen_capacity_mode_name(MOEGEN_CAP_FIXED), "fixed");
    assert_string_equal(moegen_capacity_formula_name(MOEGEN_CAP_FORMULA_MEGATRON), "megatron");
    assert_string_equal(moegen_priority_name(MOEGEN_PRIORITY_POSITION_CHOICE_MAJOR), "position_choice_major");
    assert_string_equal(moegen_semantics_name(MOEGEN_SEMANTICS_DEEPSPEED), "deepspeed");
    assert_string_equal(moegen_mode_name(MOEGEN_MODE_TRAIN), "train");
    assert_string_equal(moegen_dtype_name((moegen_dtype)7), "unknown");
    assert_string_equal(moegen_priority_name((moegen_priority)-1), "unknown");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(spec_rejects_400_kilobytes_of_nested_brackets_quickly),
        cmocka_unit_test(spec_rejects_nested_mappings_past_the_depth_limit),
        cmocka_unit_test(spec_accepts_nesting_up_to_the_depth_limit_before_the_schema),
        cmocka_unit_test(spec_rejects_input_over_the_size_limit),
        cmocka_unit_test(spec_accepts_input_just_under_the_size_limit),
        cmocka_unit_test(spec_rejects_more_nodes_than_the_limit),
        cmocka_unit_test(spec_rejects_a_scalar_over_the_size_limit),
        cmocka_unit_test(spec_accepts_a_scalar_at_the_size_limit),
        cmocka_unit_test(spec_rejects_a_300_character_name),
        cmocka_unit_test(spec_accepts_a_64_character_name),
        cmocka_unit_test(spec_resolves_megatron_defaults),
        cmocka_unit_test(spec_megatron_with_a_capacity_factor_uses_factor_mode_and_its_formula),
        cmocka_unit_test(spec_deepspeed_top_1_uses_position_priority_without_renormalizing),
        cmocka_unit_test(spec_deepspeed_top_2_uses_choice_major_priority_and_renormalizes),
        cmocka_unit_test(spec_deepspeed_top_k_uses_probs_priority_and_renormalizes),
        cmocka_unit_test(spec_lets_explicit_fields_override_the_preset),
        cmocka_unit_test(spec_infers_fixed_mode_from_an_expert_capacity),
        cmocka_unit_test(spec_derives_group_defaults),
        cmocka_unit_test(spec_accepts_every_field_written_out),
        cmocka_unit_test(spec_accepts_the_largest_integer_seed),
        cmocka_unit_test(spec_resets_a_seed_that_nothing_uses),
        cmocka_unit_test(spec_accepts_quoted_enum_values_and_a_byte_order_mark),
        cmocka_unit_test(spec_keeps_non_ascii_free_text),
        cmocka_unit_test(spec_canonical_form_lists_every_relevant_field_in_order),
        cmocka_unit_test(spec_canonical_form_lists_the_fields_of_the_capacity_mode),
        cmocka_unit_test(spec_canonical_form_lists_group_bias_and_shared_fields_only_when_they_apply),
        cmocka_unit_test(spec_canonical_form_writes_the_shortest_round_trip_floats),
        cmocka_unit_test(spec_hash_ignores_order_comments_whitespace_and_quoting),
        cmocka_unit_test(spec_hash_changes_with_every_relevant_field),
        cmocka_unit_test(spec_canonical_form_parses_back_to_an_equal_spec),
        cmocka_unit_test(spec_load_reports_a_missing_file_as_an_io_error),
        cmocka_unit_test(spec_load_reads_a_file_and_names_it_in_errors),
        cmocka_unit_test(spec_rejects_null_arguments),
        cmocka_unit_test(spec_parses_text_that_is_not_nul_terminated),
        cmocka_unit_test(spec_helpers_report_sizes_and_names),
        cmocka_unit_test(spec_reports_every_independent_error_in_file_order),
        cmocka_unit_test(spec_keeps_the_first_error_first_and_sorts_the_others),
        cmocka_unit_test(spec_skips_errors_that_follow_from_another),
        cmocka_unit_test(spec_bounds_the_error_list_and_says_how_many_more),
        cmocka_unit_test(spec_keeps_a_long_first_error_whole),
        cmocka_unit_test(spec_warns_about_a_plain_activation_in_a_gated_family),
        cmocka_unit_test(spec_warns_about_deepseek_routing_without_a_score_bias),
        cmocka_unit_test(spec_warns_about_top_1_weights_that_are_always_one),
        cmocka_unit_test(spec_warns_about_weight_on_input_with_softmax),
        cmocka_unit_test(spec_lists_warnings_in_file_order_and_bounds_them),
        cmocka_unit_test(spec_shipped_specs_load_without_warnings),
    };
    int failures = cmocka_run_group_tests_name("spec_bad_inputs", bad_spec_tests, NULL, NULL);
    failures += cmocka_run_group_tests_name("spec", tests, NULL, NULL);
    return failures;
}
