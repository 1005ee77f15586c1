/* test_template.c — unit tests for the template engine (gen/template.c).
 *
 * Place in the pipeline: spec -> [gen: templates] -> compile -> load -> launch. These
 * tests drive the engine with small in-memory template sets (never the real templates/
 * directory) and check what it owns: the template syntax and its line-preserving
 * compilation, "templates/<file>:<line>:" error locations, the sandbox (allow list,
 * read-only parameters, unknown names), the limits (instructions, memory, output,
 * recursion, nesting), the helpers (f32, f64, cident, include, import, sorted pairs,
 * stable sort) and determinism across processes.
 */
#include <alloca.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "template.h"

#define TEMPLATE_FILE(path, text)                                                                  \
    { path, text, sizeof(text) - 1 }
#define COUNT_OF(array) (sizeof(array) / sizeof((array)[0]))

typedef struct render_result {
    moegen_status status;
    char *text;
    size_t length;
    moegen_error error;
} render_result;

static render_result render_set(const moegen_template_file *files, size_t count, const char *entry,
                                const moegen_params *params, const moegen_render_limits *limits) {
    moegen_template_set set = {files, count};
    render_result result;
    memset(&result, 0, sizeof result);
    result.status = moegen_template_render(&set, entry, params, limits, &result.text,
                                           &result.length, &result.error);
    if (result.status == MOEGEN_OK) {
        assert_non_null(result.text);
        assert_int_equal(strlen(result.text), result.length);
    } else {
        assert_null(result.text);
        assert_int_equal(result.error.code, result.status);
    }
    return result;
}

/* Render `text` as the only template, "templates/t.tpl". */
static render_result render_text(const char *text, const moegen_params *params,
                                 const moegen_render_limits *limits) {
    moegen_template_file file = {"templates/t.tpl", text, strlen(text)};
    return render_set(&file, 1, "templates/t.tpl", params, limits);
}

static void expect_output_with(const char *text, const moegen_params *params,
                               const char *expected) {
    render_result result = render_text(text, params, NULL);
    if (result.status != MOEGEN_OK) fail_msg("render failed: %s", result.error.message);
    assert_string_equal(result.text, expected);
    free(result.text);
}

static void expect_output(const char *text, const char *expected) {
    expect_output_with(text, NULL, expected);
}

/* The render fails with MOEGEN_ERR_TEMPLATE, a message starting with `start` and
 * containing `part` (if not NULL). */
static void expect_result_error(render_result result, const char *start, const char *part) {
    if (result.status != MOEGEN_ERR_TEMPLATE)
        fail_msg("expected MOEGEN_ERR_TEMPLATE, got %s: %s (output: %s)",
                 moegen_status_name(result.status), result.error.message,
                 result.text ? result.text : "");
    if (strncmp(result.error.message, start, strlen(start)) != 0)
        fail_msg("message does not start with \"%s\": %s", start, result.error.message);
    if (part && !strstr(result.error.message, part))
        fail_msg("message does not contain \"%s\": %s", part, result.error.message);
    free(result.text);
}

static void expect_error_with(const char *text, const moegen_params *params,
                              const moegen_render_limits *limits, const char *start,
                              const char *part) {
    expect_result_error(render_text(text, params, limits), start, part);
}

static void expect_error(const char *text, const char *start, const char *part) {
    expect_error_with(text, NULL, NULL, start, part);
}

static size_t count_newlines(const char *text, size_t length) {
    size_t count = 0;
    for (size_t i = 0; i < length; i++) count += text[i] == '\n';
    return count;
}

/* ---- Syntax -------------------------------------------------------------------------- */

static void render_emits_text_lines_and_runs_code_lines(void **state) {
    (void)state;
    expect_output("// header\n"
                  "% for i = 1, 3 do\n"
                  "int a${i} = ${i * 2};\n"
                  "% end\n"
                  "   % local indented = 'code'\n"
                  "${indented}\n"
                  "no newline at the end",
                  "// header\nint a1 = 2;\nint a2 = 4;\nint a3 = 6;\ncode\nno newline at the end");
    expect_output("", "");
    expect_output("\n\n", "\n\n");
}

static void render_substitutes_integers_and_strings(void **state) {
    (void)state;
    expect_output("${-5} ${math.maxinteger} ${'str'} ${ ({a = {b = 7}}).a.b } ${'}'} ${7 // 2}\n",
                  "-5 9223372036854775807 str 7 } 3\n");
    expect_output("${('ab'):rep(3)}|${string.format('%05d', 42)}|${#'four'}\n", "ababab|00042|4\n");
}

static void render_rejects_nil_boolean_table_function_and_float_values(void **state) {
    (void)state;
    expect_error("ok\nx = ${nil};\n", "templates/t.tpl:2: ${nil} is nil", NULL);
    expect_error("ok\nx = ${1 == 1};\n", "templates/t.tpl:2: ${1 == 1} is a boolean (true)", NULL);
    expect_error("ok\nx = ${{}};\n", "templates/t.tpl:2: ${{}} is a table", NULL);
    expect_error("ok\nx = ${pcall};\n", "templates/t.tpl:2:", "is a function");
    expect_error("ok\nx = ${8 / 2};\n", "templates/t.tpl:2: ${8 / 2} is a float (4.0)", "//");
    expect_error("ok\nx = ${0.5};\n", "templates/t.tpl:2: ${0.5} is a float (0.5)", "f32()");
}

static void render_emits_literal_dollar_brace_for_double_dollar(void **state) {
    (void)state;
    expect_output("a $${x} b $ c $$ d }\n", "a ${x} b $ c $$ d }\n");
}

static void render_keeps_quotes_backslashes_and_control_bytes_in_text(void **state) {
    (void)state;
    const char text[] = "say \"hi\" \\ back\tslash \x01\x7f ]] [[ --[[ \x1b\r\n";
    expect_output(text, text);
    /* The output is a C string: a NUL byte in it is an error at its line. */
    static const char nul_in_text[] = "ok\nbad \0 byte\n";
    moegen_template_file file = {"templates/t.tpl", nul_in_text, sizeof nul_in_text - 1};
    expect_result_error(render_set(&file, 1, "templates/t.tpl", NULL, NULL),
                        "templates/t.tpl:2: NUL byte in the output", NULL);
    expect_error("${'a\\0b'}\n", "templates/t.tpl:1: NUL byte in the output", NULL);
}

static void render_reports_unbalanced_substitution_as_syntax_error_at_its_line(void **state) {
    (void)state;
    expect_error("ok\nok\nx = ${a + {1}\n", "templates/t.tpl:3: unbalanced '${'", NULL);
    expect_error("ok\nx = ${ }\n", "templates/t.tpl:2: empty '${}'", NULL);
    expect_error("x = ${'}\n", "templates/t.tpl:1: unbalanced", NULL);
}

static void render_reports_syntax_error_with_template_line(void **state) {
    (void)state;
    expect_error("a\n% local x = = 1\nb\n", "templates/t.tpl:2:", "unexpected symbol");
    expect_error("a\nb\n${1 +}\n", "templates/t.tpl:3:", NULL);
}

static void render_reports_runtime_error_with_template_line(void **state) {
    (void)state;
    expect_error("a\nb\nc\n% error('boom')\n", "templates/t.tpl:4: boom", NULL);
    expect_error("% local t = nil\n\n% local x = t.field\n",
                 "templates/t.tpl:3:", "attempt to index");
    expect_error("% error('plain', 0)\n", "templates/t.tpl:1: plain", NULL);
    expect_error("\n% error({})\n", "templates/t.tpl:2: (error object is a table value)", NULL);
    expect_error("% assert(false, 'asserted')\n", "templates/t.tpl:1: asserted", NULL);
}

static void render_reports_error_on_line_seven_after_multiline_lua_code(void **state) {
    (void)state;
    const char *prefix = "first text line\n"
                         "% local function twice(x)\n"
                         "%   return x * 2\n"
                         "% end\n"
                         "% local t = {\n"
                         "%   a = twice(1) }\n";
    char text[512];
    snprintf(text, sizeof text, "%s%s", prefix, "value ${t.b}\nafter\n");
    expect_error(text, "templates/t.tpl:7: ${t.b} is nil", NULL);
    snprintf(text, sizeof text, "%s%s", prefix, "% error('line seven')\nafter\n");
    expect_error(text, "templates/t.tpl:7: line seven", NULL);
    snprintf(text, sizeof text, "%s%s", prefix, "${twice('x')}\n");
    expect_error(text, "templates/t.tpl:3:", "(called from templates/t.tpl:7)");
}

static void render_reports_error_inside_included_file_with_its_own_line(void **state) {
    (void)state;
    const moegen_template_file files[] = {
        TEMPLATE_FILE("templates/t.tpl", "x\ny\n% include('templates/inc.tpl')\n"),
        TEMPLATE_FILE("templates/inc.tpl", "fine\n% error('deep')\n"),
        TEMPLATE_FILE("templates/syntax.tpl", "fine\nfine\n% if then\n"),
        TEMPLATE_FILE("templates/s.tpl", "x\n% include('templates/syntax.tpl')\n"),
    };
    expect_result_error(render_set(files, COUNT_OF(files), "templates/t.tpl", NULL, NULL),
                        "templates/inc.tpl:2: deep (included from templates/t.tpl:3)", NULL);
    expect_result_error(render_set(files, COUNT_OF(files), "templates/s.tpl", NULL, NULL),
                        "templates/syntax.tpl:3:", "included from templates/s.tpl:2");
}

/* ---- Sandbox ------------------------------------------------------------------------- */

static void render_refuses_names_outside_the_allow_list(void **state) {
    (void)state;
    static const char *const forbidden[] = {
        "io",           "os",     "package",    "debug",          "require",   "load",
        "loadfile",     "dofile", "loadstring", "collectgarbage", "coroutine", "getmetatable",
        "setmetatable", "rawset", "rawget",     "rawequal",       "rawlen",    "next",
        "print",        "_G",     "xpcall",     "_VERSION",       "module"};
    for (size_t i = 0; i < COUNT_OF(forbidden); i++) {
        char text[128], start[128];
        snprintf(text, sizeof text, "%% local x = %s\n", forbidden[i]);
        snprintf(start, sizeof start, "templates/t.tpl:1: unknown name '%s'", forbidden[i]);
        expect_error(text, start, NULL);
    }
}

static void render_refuses_string_dump_random_and_library_writes(void **state) {
    (void)state;
    expect_error("% local f = string.dump\n", "templates/t.tpl:1: string has no field 'dump'",
                 NULL);
    expect_error("% local f = (''):dump()\n", "templates/t.tpl:1: string has no field 'dump'",
                 NULL);
    expect_error("% local f = ('x').dump\n", "templates/t.tpl:1: string has no field 'dump'", NULL);
    expect_error("% local r = math.random(6)\n", "templates/t.tpl:1: math has no field 'random'",
                 NULL);
    expect_error("% local r = math.randomseed\n", "templates/t.tpl:1:", "randomseed");
    expect_error("% string.dump = 1\n", "templates/t.tpl:1: string is read-only", NULL);
    expect_error("% table.sort = nil\n", "templates/t.tpl:1: table is read-only", NULL);
    expect_error("% math.pi = 3\n", "templates/t.tpl:1: math is read-only", NULL);
    expect_output("${#(string.rep('ab', 3))} ${math.type(1)} ${utf8.char(72)} "
                  "${table.concat({1, 2}, ',')}\n",
                  "6 integer H 1,2\n");
}

static void render_refuses_values_whose_text_is_an_address(void **state) {
    (void)state;
    expect_error("% local s = tostring({})\n", "templates/t.tpl:1:", "address");
    expect_error("% local s = tostring(pairs)\n", "templates/t.tpl:1:", "address");
    expect_error("% local s = string.format('%p', 'x')\n", "templates/t.tpl:1:", "%p");
    expect_error("% local s = string.format('%s', {})\n", "templates/t.tpl:1:", "address");
    expect_output("${tostring(1.5)} ${tostring(nil)} ${string.format('%5.2f|%%|%s', 1, true)}\n",
                  "1.5 nil  1.00|%|true\n");
}

static void render_refuses_binary_chunks(void **state) {
    (void)state;
    static const char binary[] = "\x1bLua\x54\x00\x19\x93\r\n\x1a\n";
    const moegen_template_file files[] = {
        TEMPLATE_FILE("templates/t.tpl", "a\n% local m = import('templates/lib/bin.lua')\n"),
        {"templates/lib/bin.lua", binary, sizeof binary - 1},
    };
    expect_result_error(render_set(files, COUNT_OF(files), "templates/t.tpl", NULL, NULL),
                        "templates/t.tpl:2: templates/lib/bin.lua:", "binary chunk");
}

static void render_refuses_unknown_global_reads_and_global_assignments(void **state) {
    (void)state;
    expect_error("a\n% local y = undefined_thing\n",
                 "templates/t.tpl:2: unknown name 'undefined_thing'", NULL);
    expect_error("${undefined_thing}\n", "templates/t.tpl:1: unknown name 'undefined_thing'", NULL);
    expect_error("a\nb\n% x = 1\n", "templates/t.tpl:3: assignment to global 'x'", NULL);
    expect_error("% pairs = nil\n", "templates/t.tpl:1: assignment to global 'pairs'", NULL);
    expect_error("% local function f() g = 2 end\n% f()\n",
                 "templates/t.tpl:1: assignment to global 'g'", NULL);
}

static moegen_params *make_config_params(void) {
    moegen_params *root = moegen_params_new();
    assert_non_null(root);
    moegen_params *config = moegen_params_table(root, "cfg");
    assert_non_null(config);
    assert_int_equal(moegen_params_int(config, "n", 3), 0);
    assert_int_equal(moegen_params_str(config, "name", "gate_up"), 0);
    assert_int_equal(moegen_params_num(config, "eps", 0.1), 0);
    assert_int_equal(moegen_params_bool(config, "flag", 1), 0);
    moegen_params *sub = moegen_params_table(config, "sub");
    assert_non_null(sub);
    assert_int_equal(moegen_params_int(sub, "m", 4), 0);
    assert_int_equal(moegen_params_int(root, "top_scalar", 11), 0);
    return root;
}

static void render_makes_params_read_only_at_top_level_and_nested(void **state) {
    (void)state;
    moegen_params *params = make_config_params();
    expect_output_with("${cfg.n} ${cfg.name} ${f32(cfg.eps)} ${cfg.flag and 1 or 0} "
                       "${cfg.sub.m} ${top_scalar}\n",
                       params, "3 gate_up 0.1f 1 4 11\n");
    expect_error_with("a\n% cfg.n = 5\n", params, NULL,
                      "templates/t.tpl:2: cfg is read-only (cannot set field 'n')", NULL);
    expect_error_with("% cfg.new_field = 5\n", params, NULL, "templates/t.tpl:1: cfg is read-only",
                      NULL);
    expect_error_with("% cfg.sub.m = 1\n", params, NULL,
                      "templates/t.tpl:1: cfg.sub is read-only (cannot set field 'm')", NULL);
    expect_error_with("% table.insert(cfg.sub, 1)\n", params, NULL,
                      "templates/t.tpl:1:", "read-only");
    expect_error_with("% table.sort(cfg)\n% cfg[1] = 2\n", params, NULL,
                      "templates/t.tpl:2: cfg is read-only", NULL);
    expect_error_with("% cfg = {}\n", params, NULL, "templates/t.tpl:1: assignment to global 'cfg'",
                      NULL);
    expect_error_with("% local x = cfg.missing\n", params, NULL,
                      "templates/t.tpl:1: cfg has no field 'missing'", NULL);
    expect_error_with("% local x = cfg.sub.missing\n", params, NULL,
                      "templates/t.tpl:1: cfg.sub has no field 'missing'", NULL);
    expect_error_with("${cfg.eps}\n", params, NULL,
                      "templates/t.tpl:1: ${cfg.eps} is a float (0.1)", NULL);
    moegen_params_free(params);
}

static void params_builder_replaces_values_and_checks_arguments(void **state) {
    (void)state;
    moegen_params *root = moegen_params_new();
    assert_non_null(root);
    moegen_params *config = moegen_params_table(root, "cfg");
    assert_ptr_equal(moegen_params_table(root, "cfg"), config);
    assert_int_equal(moegen_params_str(config, "v", "first"), 0);
    assert_int_equal(moegen_params_str(config, "v", "second"), 0);
    assert_int_equal(moegen_params_int(config, "w", 1), 0);
    assert_non_null(moegen_params_table(config, "w")); /* a scalar replaced by a table */
    assert_int_equal(moegen_params_int(moegen_params_table(config, "w"), "inner", 9), 0);
    assert_non_null(moegen_params_table(config, "x"));
    assert_int_equal(moegen_params_bool(config, "x", 0), 0); /* a table replaced by a scalar */
    assert_int_equal(moegen_params_int(NULL, "k", 1), -1);
    assert_int_equal(moegen_params_str(config, "k", NULL), -1);
    assert_null(moegen_params_table(config, NULL));
    expect_output_with("${cfg.v} ${cfg.w.inner} ${cfg.x and 1 or 0}\n", root, "second 9 0\n");
    moegen_params_free(root);
    moegen_params_free(NULL);
}

static void render_rejects_params_that_collide_or_are_not_names(void **state) {
    (void)state;
    static const char *const bad_names[] = {"string", "include", "end", "a-b", "9lives", ""};
    for (size_t i = 0; i < COUNT_OF(bad_names); i++) {
        moegen_params *root = moegen_params_new();
        assert_int_equal(moegen_params_int(root, bad_names[i], 1), 0);
        render_result result = render_text("x\n", root, NULL);
        assert_int_equal(result.status, MOEGEN_ERR_INVALID_ARGUMENT);
        moegen_params_free(root);
    }
}

static void render_rejects_null_arguments_and_missing_entry(void **state) {
    (void)state;
    moegen_template_file file = TEMPLATE_FILE("templates/t.tpl", "x\n");
    moegen_template_set set = {&file, 1};
    char *out = (char *)"sentinel";
    size_t length = 7;
    moegen_error error;
    assert_int_equal(
        moegen_template_render(NULL, "templates/t.tpl", NULL, NULL, &out, &length, &error),
        MOEGEN_ERR_INVALID_ARGUMENT);
    assert_null(out);
    assert_int_equal(moegen_template_render(&set, NULL, NULL, NULL, &out, &length, &error),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(
        moegen_template_render(&set, "templates/t.tpl", NULL, NULL, NULL, &length, NULL),
        MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(
        moegen_template_render(&set, "templates/none.tpl", NULL, NULL, &out, &length, &error),
        MOEGEN_ERR_TEMPLATE);
    assert_string_equal(error.message, "template not found: templates/none.tpl");
    assert_ptr_equal(moegen_template_set_find(&set, "templates/t.tpl"), &file);
    assert_null(moegen_template_set_find(&set, "templates/x.tpl"));
    assert_null(moegen_template_set_find(NULL, "templates/t.tpl"));
}

/* ---- Limits -------------------------------------------------------------------------- */

static const moegen_render_limits small_instruction_budget = {0, 2000000, 0};

static void render_stops_infinite_loop_with_instruction_limit(void **state) {
    (void)state;
    expect_error_with("a\n% while true do end\n", NULL, &small_instruction_budget,
                      "templates/t.tpl:2: instruction limit exceeded", NULL);
}

static void render_stops_infinite_loop_inside_pcall(void **state) {
    (void)state;
    expect_error_with("% local ok = pcall(function() while true do end end)\nafter ${ok}\n", NULL,
                      &small_instruction_budget, "templates/t.tpl:1: instruction limit exceeded",
                      NULL);
}

static void render_stops_loop_of_pcalls(void **state) {
    (void)state;
    expect_error_with("% while true do pcall(function() while true do end end) end\n", NULL,
                      &small_instruction_budget, "templates/t.tpl:1: instruction limit exceeded",
                      NULL);
    expect_error_with("% for i = 1, 100 do pcall(function() while true do end end) end\n"
                      "after\n",
                      NULL, &small_instruction_budget,
                      "templates/t.tpl:1: instruction limit exceeded", NULL);
    /* Work done inside C calls is charged through allocation. */
    expect_error_with("% local chunk = ('x'):rep(4096)\n"
                      "% while true do local s = chunk:rep(256) end\n",
                      NULL, &small_instruction_budget,
                      "templates/t.tpl:2: instruction limit exceeded", NULL);
    expect_error_with("% local function spin() while true do end end\n"
                      "% while true do pcall(pcall, spin) end\n",
                      NULL, &small_instruction_budget,
                      "templates/t.tpl:", "instruction limit exceeded");
}

static void render_stops_huge_string_with_memory_limit(void **state) {
    (void)state;
    expect_error("a\n% local s = string.rep('x', 1 << 30)\n",
                 "templates/t.tpl:2: memory limit exceeded", NULL);
    expect_error("% local ok = pcall(string.rep, 'x', 1 << 30)\nafter ${ok and 1 or 0}\n",
                 "templates/t.tpl:1: memory limit exceeded", NULL);
    expect_error("% local t = {}\n% for i = 1, 1 << 40 do t[i] = i end\n",
                 "templates/t.tpl:2: memory limit exceeded", NULL);
    const moegen_render_limits tiny = {4096, 0, 0};
    expect_error_with("x\n", NULL, &tiny, "templates/t.tpl", "memory limit exceeded");
}

static void render_reports_deep_recursion(void **state) {
    (void)state;
    expect_error("% local function f(n) return 1 + f(n + 1) end\n% f(1)\n",
                 "templates/t.tpl:1:", "stack overflow");
    expect_error("% local function g() return (string.gsub('a', 'a', g)) end\n% g()\n",
                 "templates/t.tpl:", "stack overflow");
}

static void render_stops_output_over_cap(void **state) {
    (void)state;
    const moegen_render_limits small_output = {0, 0, 100};
    expect_error_with("% for i = 1, 1000 do\nline ${i}\n% end\n", NULL, &small_output,
                      "templates/t.tpl:2: output limit exceeded (100 bytes)", NULL);
    const moegen_template_file files[] = {
        TEMPLATE_FILE("templates/t.tpl", "% pcall(include, 'templates/big.tpl')\nrest\n"),
        TEMPLATE_FILE("templates/big.tpl", "% for i = 1, 1000 do\nline ${i}\n% end\n"),
    };
    expect_result_error(render_set(files, COUNT_OF(files), "templates/t.tpl", NULL, &small_output),
                        "templates/big.tpl:2: output limit exceeded", NULL);
    /* Exactly at the cap is fine. */
    const moegen_render_limits exact_output = {0, 0, 4};
    render_result result = render_text("abc\n", NULL, &exact_output);
    assert_int_equal(result.status, MOEGEN_OK);
    free(result.text);
}

/* ---- Helpers --------------------------------------------------------------------------- */

static void render_formats_exact_float_literals(void **state) {
    (void)state;
    expect_output("${f32(2.5)} ${f32(0.1)} ${f32(1e-20)} ${f32(-3)} ${f32(1/3)} ${f32(16777216)}\n",
                  "2.5f 0.1f 1e-20f -3.0f 0.33333334f 16777216.0f\n");
    expect_output("${f64(0.1)} ${f64(1/3)} ${f64(100)} ${f64(1e300)} ${f64(-0.0)} ${f64(5e-324)} "
                  "${f64(123456.789)} ${f64(0.00001)} ${f64(2^-30)}\n",
                  "0.1 0.3333333333333333 100.0 1e300 -0.0 5e-324 123456.789 0.00001 "
                  "9.313225746154785e-10\n");
    expect_output("${f32(3.4028234663852886e38)} ${f32(1.401298464324817e-45)} ${f32(0)}\n",
                  "3.4028235e38f 1e-45f 0.0f\n");
    expect_error("a\n${f32(0/0)}\n", "templates/t.tpl:2: f32(): ", "NaN");
    expect_error("${f64(math.huge)}\n", "templates/t.tpl:1: f64(): ", "no C literal");
    expect_error("${f32(1e39)}\n", "templates/t.tpl:1: f32(): ", "out of range");
    expect_error("${f32(1e-50)}\n", "templates/t.tpl:1: f32(): ", "underflows");
    expect_error("${f32('1')}\n", "templates/t.tpl:1: f32() needs a number, got string", NULL);
    expect_error("${f64((1 << 53) + 1)}\n", "templates/t.tpl:1: f64(): integer", "not exactly");
    expect_error("${f32(16777217)}\n", "templates/t.tpl:1: f32(): integer", "not exactly");
}

static void render_round_trips_many_float_literals(void **state) {
    (void)state;
    /* f64 of a spread of values must read back exactly with strtod. */
    render_result result = render_text("% local x = 1.0\n"
                                       "% for i = 1, 200 do\n"
                                       "${f64(x)} ${f64(-x / 7)} ${f32(x / 3)}\n"
                                       "% x = x * 1.37 + 0.001\n"
                                       "% end\n",
                                       NULL, NULL);
    assert_int_equal(result.status, MOEGEN_OK);
    double x = 1.0;
    char *cursor = result.text;
    for (int i = 0; i < 200; i++) {
        char *end;
        assert_true(strtod(cursor, &end) == x);
        cursor = end;
        assert_true(strtod(cursor, &end) == -x / 7);
        cursor = end;
        assert_true(strtof(cursor, &end) == (float)(x / 3));
        assert_int_equal(*end, 'f');
        cursor = end + 1;
        x = x * 1.37 + 0.001;
    }
    free(result.text);
}

static void render_accepts_only_safe_identifiers_in_cident(void **state) {
    (void)state;
    expect_output("${cident('expert_gemm')} ${cident('_x9')} ${cident('Router2')}\n",
                  "expert_gemm _x9 Router2\n");
    static const char *const refused[] = {"'int'",         "'class'",
                                          "'__global__'",  "'_Bool'",
                                          "'9abc'",        "'foo; system(\"x\")'",
                                          "'a b'",         "''",
                                          "'threadIdx'",   "'caf\\u{e9}'",
                                          "'*/ #include'", "'template'",
                                          "'a__b'",        "('x'):rep(65)",
                                          "('x'):rep(300)"};
    for (size_t i = 0; i < COUNT_OF(refused); i++) {
        char text[128];
        snprintf(text, sizeof text, "ok\n${cident(%s)}\n", refused[i]);
        expect_error(text, "templates/t.tpl:2: cident()", NULL);
    }
    expect_output("${#cident(('x'):rep(64))}\n", "64\n");
    expect_error("${cident(12)}\n", "templates/t.tpl:1: cident() needs a string", NULL);
}

static void render_iterates_pairs_in_sorted_key_order(void **state) {
    (void)state;
    expect_output("% local t = {b = 1, a = 2, [10] = 'x', [2] = 'y', [1.5] = 'z', [-3] = 'w',"
                  " B = 3, [''] = 'e', ab = 4}\n"
                  "% for k, v in pairs(t) do\n"
                  "${tostring(k)}=${tostring(v)}\n"
                  "% end\n",
                  "-3=w\n1.5=z\n2=y\n10=x\n=e\nB=3\na=2\nab=4\nb=1\n");
    expect_error("% for k in pairs({[true] = 1}) do end\n",
                 "templates/t.tpl:1:", "cannot order a key of type boolean");
    moegen_params *root = moegen_params_new();
    moegen_params *config = moegen_params_table(root, "cfg");
    assert_int_equal(moegen_params_int(config, "zeta", 1), 0);
    assert_int_equal(moegen_params_int(config, "alpha", 2), 0);
    assert_int_equal(moegen_params_int(config, "mid", 3), 0);
    expect_output_with("% for k, v in pairs(cfg) do\n${k}=${v} \n% end\n", root,
                       "alpha=2 \nmid=3 \nzeta=1 \n");
    moegen_params_free(root);
}

static void render_sorts_stably(void **state) {
    (void)state;
    expect_output("% local t = {{k = 2, n = 'a'}, {k = 1, n = 'b'}, {k = 2, n = 'c'},"
                  " {k = 1, n = 'd'}}\n"
                  "% table.sort(t, function(x, y) return x.k < y.k end)\n"
                  "% for _, e in ipairs(t) do\n"
                  "${e.n}\n"
                  "% end\n",
                  "b\nd\na\nc\n");
    expect_output("% local t = {}\n"
                  "% for i = 1, 500 do t[i] = {key = (i * 7919) % 13, index = i} end\n"
                  "% table.sort(t, function(x, y) return x.key < y.key end)\n"
                  "% for i = 2, #t do\n"
                  "%   local a, b = t[i - 1], t[i]\n"
                  "%   assert(a.key < b.key or (a.key == b.key and a.index < b.index))\n"
                  "% end\n"
                  "% local words = {'pear', 'apple', 'fig'}\n"
                  "% table.sort(words)\n"
                  "${table.concat(words, ' ')}\n",
                  "apple fig pear\n");
}

static void render_includes_templates_and_imports_modules_once(void **state) {
    (void)state;
    const moegen_template_file files[] = {
        TEMPLATE_FILE("templates/t.tpl",
                      "% local lib = import('templates/lib/util.lua')\n"
                      "% local again = import('templates/lib/util.lua')\n"
                      "${lib.twice(cfg.n)} ${lib == again and 'same' or 'different'} "
                      "${lib.runs()}\n"
                      "% include('templates/part.tpl')\n"
                      "end\n"),
        TEMPLATE_FILE("templates/part.tpl",
                      "part sees ${cfg.n} and ${import('templates/lib/util.lua').runs()}\n"),
        TEMPLATE_FILE("templates/lib/util.lua", "local M = {}\n"
                                                "local runs = 0\n"
                                                "runs = runs + 1\n"
                                                "function M.twice(x) return 2 * x end\n"
                                                "function M.runs() return runs end\n"
                                                "return M\n"),
    };
    moegen_params *params = make_config_params();
    for (int render = 0; render < 2; render++) { /* each render starts from scratch */
        render_result result = render_set(files, COUNT_OF(files), "templates/t.tpl", params, NULL);
        if (result.status != MOEGEN_OK) fail_msg("%s", result.error.message);
        assert_string_equal(result.text, "6 same 1\npart sees 3 and 1\nend\n");
        free(result.text);
    }
    moegen_params_free(params);
}

static void render_reports_include_and_import_problems(void **state) {
    (void)state;
    const moegen_template_file files[] = {
        TEMPLATE_FILE("templates/a.tpl", "a\n% include('templates/b.tpl')\n"),
        TEMPLATE_FILE("templates/b.tpl", "% include('templates/a.tpl')\n"),
        TEMPLATE_FILE("templates/self.tpl", "% include('templates/self.tpl')\n"),
        TEMPLATE_FILE("templates/missing.tpl", "x\n% include('templates/nope.tpl')\n"),
        TEMPLATE_FILE("templates/wrong.tpl", "% include('templates/lib/bad.lua')\n"),
        TEMPLATE_FILE("templates/bad_import.tpl", "\n% import('templates/lib/bad.lua')\n"),
        TEMPLATE_FILE("templates/lib/bad.lua", "local M = {}\nerror('module broke')\nreturn M\n"),
        TEMPLATE_FILE("templates/no_module.tpl", "% import('templates/lib/none.lua')\n"),
        TEMPLATE_FILE("templates/lib/loop.lua", "return import('templates/lib/loop.lua')\n"),
        TEMPLATE_FILE("templates/loop.tpl", "% import('templates/lib/loop.lua')\n"),
    };
    const size_t count = COUNT_OF(files);
    expect_result_error(
        render_set(files, count, "templates/a.tpl", NULL, NULL),
        "templates/b.tpl:1: include cycle: templates/a.tpl -> templates/b.tpl -> templates/a.tpl",
        "included from templates/a.tpl:2");
    expect_result_error(render_set(files, count, "templates/self.tpl", NULL, NULL),
                        "templates/self.tpl:1: include cycle", NULL);
    expect_result_error(render_set(files, count, "templates/missing.tpl", NULL, NULL),
                        "templates/missing.tpl:2: include(): no template 'templates/nope.tpl'",
                        NULL);
    expect_result_error(render_set(files, count, "templates/wrong.tpl", NULL, NULL),
                        "templates/wrong.tpl:1: include(): 'templates/lib/bad.lua' is not a "
                        "template",
                        NULL);
    expect_result_error(render_set(files, count, "templates/bad_import.tpl", NULL, NULL),
                        "templates/lib/bad.lua:2: module broke (imported from "
                        "templates/bad_import.tpl:2)",
                        NULL);
    expect_result_error(render_set(files, count, "templates/no_module.tpl", NULL, NULL),
                        "templates/no_module.tpl:1: import(): no module", NULL);
    expect_result_error(render_set(files, count, "templates/loop.tpl", NULL, NULL),
                        "templates/lib/loop.lua:1: include cycle", NULL);
}

static void render_limits_include_depth(void **state) {
    (void)state;
    enum { FILES = 20 };
    static char paths[FILES][64], texts[FILES][96];
    moegen_template_file files[FILES];
    for (int i = 0; i < FILES; i++) {
        snprintf(paths[i], sizeof paths[i], "templates/d%d.tpl", i);
        if (i + 1 < FILES)
            snprintf(texts[i], sizeof texts[i], "d%d\n%% include('templates/d%d.tpl')\n", i, i + 1);
        else
            snprintf(texts[i], sizeof texts[i], "leaf\n");
        files[i] = (moegen_template_file){paths[i], texts[i], strlen(texts[i])};
    }
    expect_result_error(render_set(files, FILES, "templates/d0.tpl", NULL, NULL),
                        "templates/d15.tpl:2: include/import nesting deeper than 16", NULL);
    render_result result = render_set(files, FILES, "templates/d5.tpl", NULL, NULL);
    assert_int_equal(result.status, MOEGEN_OK); /* 15 levels are fine */
    free(result.text);
    /* A caught include error leaves the nesting stack balanced. */
    const moegen_template_file caught[] = {
        TEMPLATE_FILE("templates/t.tpl",
                      "% for i = 1, 40 do pcall(include, 'templates/e.tpl') end\n"
                      "% include('templates/ok.tpl')\n"),
        TEMPLATE_FILE("templates/e.tpl", "% error('x')\n"),
        TEMPLATE_FILE("templates/ok.tpl", "fine\n"),
    };
    result = render_set(caught, COUNT_OF(caught), "templates/t.tpl", NULL, NULL);
    if (result.status != MOEGEN_OK) fail_msg("%s", result.error.message);
    assert_string_equal(result.text, "fine\n");
    free(result.text);
}

/* ---- Determinism ----------------------------------------------------------------------- */

static const char determinism_template[] =
    "% local t = {}\n"
    "% for i = 1, 300 do t['key' .. ((i * 7919) % 1000)] = i end\n"
    "% for k, v in pairs(t) do\n"
    "${k}=${v}\n"
    "% end\n"
    "% local rows = {}\n"
    "% for i = 1, 300 do rows[i] = {group = i % 5, id = i} end\n"
    "% table.sort(rows, function(a, b) return a.group < b.group end)\n"
    "% for _, r in ipairs(rows) do\n"
    "${r.group}:${r.id}\n"
    "% end\n"
    "% for k, v in pairs(cfg) do\n"
    "${k}\n"
    "% end\n";

static moegen_params *make_determinism_params(void) {
    moegen_params *root = moegen_params_new();
    moegen_params *config = moegen_params_table(root, "cfg");
    for (int i = 0; i < 100; i++) {
        char key[32];
        snprintf(key, sizeof key, "field_%d", (i * 37) % 100);
        assert_int_equal(moegen_params_int(config, key, i), 0);
    }
    return root;
}

/* Child: perturb the heap and stack (Lua's hash seed mixes in addresses), render, write
 * the bytes to `fd`, and exit without running atexit handlers. */
static void render_in_child(int fd, int child_index) {
    void *padding = malloc(4096 + 977 * (size_t)child_index);
    char *stack_padding = alloca(64 + 128 * (size_t)child_index);
    memset(stack_padding, child_index, 64);
    moegen_params *params = make_determinism_params();
    render_result result = render_text(determinism_template, params, NULL);
    int code = result.status == MOEGEN_OK ? 0 : 1;
    size_t written = 0;
    while (code == 0 && written < result.length) {
        ssize_t n = write(fd, result.text + written, result.length - written);
        if (n <= 0)
            code = 2;
        else
            written += (size_t)n;
    }
    (void)padding;
    _exit(code);
}

static char *read_all(int fd, size_t *length) {
    size_t capacity = 1 << 16, used = 0;
    char *data = malloc(capacity);
    assert_non_null(data);
    for (;;) {
        if (used == capacity) {
            capacity *= 2;
            data = realloc(data, capacity);
            assert_non_null(data);
        }
        ssize_t n = read(fd, data + used, capacity - used);
        assert_true(n >= 0);
        if (n == 0) break;
        used += (size_t)n;
    }
    *length = used;
    return data;
}

static void render_is_byte_identical_across_processes(void **state) {
    (void)state;
    char *outputs[2];
    size_t lengths[2];
    pid_t children[2];
    int pipes[2][2];
    for (int i = 0; i < 2; i++) {
        assert_int_equal(pipe(pipes[i]), 0);
        children[i] = fork();
        assert_true(children[i] >= 0);
        if (children[i] == 0) {
            close(pipes[i][0]);
            render_in_child(pipes[i][1], i + 1);
        }
        close(pipes[i][1]);
    }
    for (int i = 0; i < 2; i++) {
        outputs[i] = read_all(pipes[i][0], &lengths[i]);
        close(pipes[i][0]);
        int status = 0;
        assert_int_equal(waitpid(children[i], &status, 0), children[i]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    assert_true(lengths[0] > 1000);
    assert_int_equal(lengths[0], lengths[1]);
    assert_memory_equal(outputs[0], outputs[1], lengths[0]);

    moegen_params *params = make_determinism_params();
    render_result here = render_text(determinism_template, params, NULL);
    assert_int_equal(here.status, MOEGEN_OK);
    assert_int_equal(here.length, lengths[0]);
    assert_memory_equal(here.text, outputs[0], lengths[0]);
    /* pairs() gave the "key..." lines in sorted order, not hash order. */
    const char *line = here.text, *previous = NULL;
    size_t previous_length = 0;
    while (strncmp(line, "key", 3) == 0) {
        size_t length = strcspn(line, "=");
        if (previous) {
            size_t common = length < previous_length ? length : previous_length;
            int order = memcmp(previous, line, common);
            assert_true(order < 0 || (order == 0 && previous_length < length));
        }
        previous = line;
        previous_length = length;
        line = strchr(line, '\n') + 1;
    }
    assert_true(line - here.text > 1000);
    free(here.text);
    moegen_params_free(params);
    free(outputs[0]);
    free(outputs[1]);
}

/* ---- Robustness: random templates ---------------------------------------------------- */

static uint64_t next_random(uint64_t *state) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* A fuzz smoke test (bytes as a template): templates glued from syntax fragments and
 * random bytes either render or fail with MOEGEN_ERR_TEMPLATE and a located message,
 * and their compiled Lua keeps the line count. Sanitizers catch the rest. */
static void render_survives_random_templates(void **state) {
    (void)state;
    static const char *const fragments[] = {"${",
                                            "$${",
                                            "}",
                                            "%",
                                            "\n",
                                            "\n% ",
                                            "'",
                                            "\"",
                                            "\\",
                                            "[[",
                                            "]]",
                                            "--",
                                            "local x = ",
                                            "for i = 1, 3 do",
                                            "end",
                                            "function f() ",
                                            "return ",
                                            "pcall(",
                                            ")",
                                            "(",
                                            "{",
                                            "cfg.n",
                                            "cfg.s",
                                            "f32(0.5)",
                                            "cident('a')",
                                            "include('templates/p.tpl')",
                                            "import('templates/lib/m.lua')",
                                            "pairs(cfg)",
                                            "while true do end",
                                            "error('e')",
                                            "string.rep('x', 1 << 24)",
                                            "0/0",
                                            "1 // 0",
                                            "#",
                                            "..",
                                            "nil",
                                            "x",
                                            " ",
                                            "\t",
                                            "\r",
                                            "\x01",
                                            "\xff"};
    moegen_params *params = make_config_params();
    const moegen_render_limits limits = {8 << 20, 200000, 1 << 16};
    uint64_t random_state = 0x9e3779b97f4a7c15u;
    char text[512];
    for (int round = 0; round < 400; round++) {
        size_t length = 0;
        size_t pieces = 1 + next_random(&random_state) % 24;
        for (size_t piece = 0; piece < pieces; piece++) {
            uint64_t choice = next_random(&random_state);
            if (choice % 8 == 0) {
                if (length + 1 < sizeof text) text[length++] = (char)(choice >> 8);
                continue;
            }
            const char *fragment = fragments[(choice >> 8) % COUNT_OF(fragments)];
            size_t fragment_length = strlen(fragment);
            if (length + fragment_length >= sizeof text) break;
            memcpy(text + length, fragment, fragment_length);
            length += fragment_length;
        }
        const moegen_template_file files[] = {
            {"templates/t.tpl", text, length},
            {"templates/p.tpl", text, length / 2},
            {"templates/lib/m.lua", "return {}\n", 10},
        };
        render_result result =
            render_set(files, COUNT_OF(files), "templates/t.tpl", params, &limits);
        if (result.status != MOEGEN_OK) {
            assert_int_equal(result.status, MOEGEN_ERR_TEMPLATE);
            assert_true(strncmp(result.error.message, "templates/", 10) == 0);
        }
        free(result.text);
        size_t lua_length;
        char *lua = moegen_template_compile_to_lua(text, length, &lua_length);
        if (lua) assert_int_equal(count_newlines(lua, lua_length), count_newlines(text, length));
        free(lua);
    }
    moegen_params_free(params);
}

/* ---- Compilation ------------------------------------------------------------------------ */

static void compile_to_lua_preserves_line_count(void **state) {
    (void)state;
    static const char text[] = "// text ${a} and $${b}\n"
                               "% for i = 1, 3 do\n"
                               "\n"
                               "  %   local x = i\n"
                               "\"quoted\" \\ ${x}\n"
                               "% end\n"
                               "last line without newline";
    size_t length = 0;
    char *lua = moegen_template_compile_to_lua(text, sizeof text - 1, &length);
    assert_non_null(lua);
    assert_int_equal(strlen(lua), length);
    assert_int_equal(count_newlines(lua, length), count_newlines(text, sizeof text - 1));
    /* Line 2 of the Lua is the code of template line 2. */
    const char *line_two = strchr(lua, '\n') + 1;
    assert_true(strncmp(line_two, " for i = 1, 3 do\n", 17) == 0);
    free(lua);

    static const char trailing[] = "a\nb\n";
    lua = moegen_template_compile_to_lua(trailing, sizeof trailing - 1, &length);
    assert_non_null(lua);
    assert_int_equal(count_newlines(lua, length), 2);
    free(lua);

    assert_null(moegen_template_compile_to_lua("ok\n${unbalanced\n", 16, &length));
    lua = moegen_template_compile_to_lua("", 0, NULL);
    assert_non_null(lua);
    free(lua);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(render_emits_text_lines_and_runs_code_lines),
        cmocka_unit_test(render_substitutes_integers_and_strings),
        cmocka_unit_test(render_rejects_nil_boolean_table_function_and_float_values),
        cmocka_unit_test(render_emits_literal_dollar_brace_for_double_dollar),
        cmocka_unit_test(render_keeps_quotes_backslashes_and_control_bytes_in_text),
        cmocka_unit_test(render_reports_unbalanced_substitution_as_syntax_error_at_its_line),
        cmocka_unit_test(render_reports_syntax_error_with_template_line),
        cmocka_unit_test(render_reports_runtime_error_with_template_line),
        cmocka_unit_test(render_reports_error_on_line_seven_after_multiline_lua_code),
        cmocka_unit_test(render_reports_error_inside_included_file_with_its_own_line),
        cmocka_unit_test(render_refuses_names_outside_the_allow_list),
        cmocka_unit_test(render_refuses_string_dump_random_and_library_writes),
        cmocka_unit_test(render_refuses_values_whose_text_is_an_address),
        cmocka_unit_test(render_refuses_binary_chunks),
        cmocka_unit_test(render_refuses_unknown_global_reads_and_global_assignments),
        cmocka_unit_test(render_makes_params_read_only_at_top_level_and_nested),
        cmocka_unit_test(params_builder_replaces_values_and_checks_arguments),
        cmocka_unit_test(render_rejects_params_that_collide_or_are_not_names),
        cmocka_unit_test(render_rejects_null_arguments_and_missing_entry),
        cmocka_unit_test(render_stops_infinite_loop_with_instruction_limit),
        cmocka_unit_test(render_stops_infinite_loop_inside_pcall),
        cmocka_unit_test(render_stops_loop_of_pcalls),
        cmocka_unit_test(render_stops_huge_string_with_memory_limit),
        cmocka_unit_test(render_reports_deep_recursion),
        cmocka_unit_test(render_stops_output_over_cap),
        cmocka_unit_test(render_formats_exact_float_literals),
        cmocka_unit_test(render_round_trips_many_float_literals),
        cmocka_unit_test(render_accepts_only_safe_identifiers_in_cident),
        cmocka_unit_test(render_iterates_pairs_in_sorted_key_order),
        cmocka_unit_test(render_sorts_stably),
        cmocka_unit_test(render_includes_templates_and_imports_modules_once),
        cmocka_unit_test(render_reports_include_and_import_problems),
        cmocka_unit_test(render_limits_include_depth),
        cmocka_unit_test(render_is_byte_identical_across_processes),
        cmocka_unit_test(render_survives_random_templates),
        cmocka_unit_test(compile_to_lua_preserves_line_count),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
