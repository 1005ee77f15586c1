/* template.h — the template engine: Lua 5.4 templates rendered in a sandbox.
 *
 * Place in the pipeline: spec -> [gen: templates] -> compile -> load -> launch.
 * emit.c builds a parameter tree from a validated spec and a variant, then asks this
 * module to render one entry template of a template set to text.
 *
 * Template syntax (line-preserving: template line N is Lua line N, so every error
 * reads "templates/<file>:<N>: message"):
 *   - A line whose first non-blank character is '%' is Lua code (the rest of the line).
 *   - Any other line is text, emitted with its newline. Inside text, ${expr} is
 *     replaced by the value of the Lua expression: an integer prints in decimal, a
 *     string as is; nil, booleans, tables, functions and floats (even integral ones
 *     such as 8 / 2) are errors (use // for integers, f32()/f64() for floats). Braces
 *     inside expr must balance (quoted strings are skipped); "$${" emits "${". An
 *     unbalanced or empty ${ } is a template syntax error at its line. A NUL byte in
 *     the output is an error.
 *
 * The sandbox (one fresh lua_State per render; nothing survives between renders):
 *   - Globals come from an allow list: assert error ipairs pcall select tonumber
 *     tostring type unpack (= table.unpack), string (without dump, also as methods on
 *     strings), math (without random, randomseed), table, utf8. No next (its order is
 *     unspecified), io, os, package, debug, require, load, loadfile, dofile, loadstring,
 *     collectgarbage, coroutine, print, xpcall, getmetatable/setmetatable, raw*
 *     functions, _G. Text chunks only (no bytecode).
 *   - Deterministic: `pairs` iterates in sorted key order (numbers ascending, then
 *     strings byte-wise; other key types are an error); table.sort is a stable merge
 *     sort; tostring() and string.format() refuse tables/functions and %p (addresses).
 *   - Reading an unknown global is an error ("unknown name 'x'"); so is assigning any
 *     global (use `local`).
 *   - The parameter tree arrives as read-only tables (one global per top-level key);
 *     writing to them, at any depth, is an error, and so is reading a string key that
 *     is absent ("cfg has no field 'x'"). The library tables are read-only and strict
 *     the same way.
 *   - Helpers provided by the host:
 *       include(path)   render another template of the set here (same globals)
 *       import(path)    run a Lua module of the set (e.g. "templates/lib/moe.lua") once
 *                       per render and return its value (true if it returns nothing)
 *       f32(x), f64(x)  exact C literals for a number: the shortest decimal that
 *                       round-trips (strtof/strtod), always with '.' or 'e', with an f
 *                       suffix for f32 ("2.5f", "0.1f", "1e-20f", "-3.0f"); NaN, Inf,
 *                       float overflow/underflow and inexact integers are errors
 *       cident(s)       the one identifier sanitizer: s if it is a C identifier of at
 *                       most 64 characters that is not a C/C++/CUDA keyword or reserved
 *                       name (leading _ + capital, or any "__"), else an error
 *     include/import paths are full set paths; cycles and nesting deeper than 16 are
 *     errors.
 *   - Limits: an instruction budget (count hook; allocation is also charged, one
 *     instruction per 64 bytes; once exceeded every further instruction fails, so
 *     pcall cannot swallow it), a memory budget (allocator), an output size cap, Lua's
 *     own stack limits for deep recursion. A limit that was hit is reported even if the
 *     template caught the error.
 */
#ifndef MOEGEN_GEN_TEMPLATE_H
#define MOEGEN_GEN_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

/* One template or Lua module, addressed by its path relative to the project
 * root, e.g. "templates/cpu/layer.c.tpl". Templates end in ".tpl", modules in ".lua". */
typedef struct moegen_template_file {
    const char *path;
    const char *text;
    size_t len;
} moegen_template_file;

typedef struct moegen_template_set {
    const moegen_template_file *files;
    size_t count;
} moegen_template_set;

/* The templates built into this binary (generated from templates/ at build time). */
const moegen_template_set *moegen_builtin_templates(void);

/* Read a template set from a directory laid out like the source tree's templates/ (cpu/,
 * cuda/, common/, lib/): every .tpl, .lua and .h below it, addressed as "templates/<path
 * below dir>", in sorted order. Returns MOEGEN_OK, MOEGEN_ERR_IO (a directory or file that
 * cannot be read, named), MOEGEN_ERR_TEMPLATE (no template files, more than 512, one over
 * 4 MiB) or MOEGEN_ERR_NO_MEMORY. Free with moegen_template_set_free. */
moegen_status moegen_template_set_load(const char *dir, moegen_template_set **out, moegen_error *err);
void moegen_template_set_free(moegen_template_set *set);

/* Look up a file by path; NULL if absent. */
const moegen_template_file *moegen_template_set_find(const moegen_template_set *set,
                                                     const char *path);

/* ---- Parameter tree: what a template may read ---------------------------------- */

typedef struct moegen_params moegen_params; /* a table with string keys */

/* A new empty root table; NULL on out of memory. */
moegen_params *moegen_params_new(void);
/* Sub-table under `key` (created, or the existing one; a scalar there is replaced).
 * NULL on out of memory or a NULL argument. */
moegen_params *moegen_params_table(moegen_params *table, const char *key);
/* Set scalar values. Setting a key twice replaces the value (a sub-table is freed).
 * Return 0, or -1 on OOM or a NULL argument. */
int moegen_params_int(moegen_params *table, const char *key, int64_t value);
int moegen_params_num(moegen_params *table, const char *key, double value);
int moegen_params_str(moegen_params *table, const char *key, const char *value);
int moegen_params_bool(moegen_params *table, const char *key, int value);
/* Free a root table and everything under it. */
void moegen_params_free(moegen_params *root);

/* ---- Rendering -------------------------------------------------------------------- */

typedef struct moegen_render_limits {
    size_t max_memory_bytes;   /* Lua heap budget; 0 = default 64 MiB */
    uint64_t max_instructions; /* VM instruction budget; 0 = default 200 million */
    size_t max_output_bytes;   /* 0 = default 16 MiB */
} moegen_render_limits;

/* Render template `entry_path` of `set` with `params` as read-only globals.
 * On success *out is a malloc'd NUL-terminated string of *out_len bytes; on failure
 * *out is NULL. Returns MOEGEN_OK, MOEGEN_ERR_TEMPLATE ("templates/x.tpl:12: message"
 * for syntax, runtime, limit errors, with "(included from templates/y.tpl:3)" notes;
 * "template not found: path" for a missing entry), MOEGEN_ERR_NO_MEMORY, or
 * MOEGEN_ERR_INVALID_ARGUMENT (NULL arguments; a top-level parameter name that is not
 * a Lua name or collides with a sandbox global; parameters nested deeper than 32).
 * `limits` and `params` may be NULL. */
moegen_status moegen_template_render(const moegen_template_set *set, const char *entry_path,
                                     const moegen_params *params,
                                     const moegen_render_limits *limits, char **out,
                                     size_t *out_len, moegen_error *err);

/* Where one output line came from: the template (a path owned by the template set) and
 * its line. path is NULL for output not emitted by a template line. */
typedef struct moegen_line_origin {
    const char *path;
    int line;
} moegen_line_origin;

/* moegen_template_render, also returning the origin of every output line: origins[i]
 * is the template line that emitted output line i + 1 (malloc'd array, *origin_count
 * entries; free with free()). Used to point compiler errors in generated code back
 * at the template. */
moegen_status moegen_template_render_mapped(const moegen_template_set *set, const char *entry_path,
                                            const moegen_params *params,
                                            const moegen_render_limits *limits, char **out,
                                            size_t *out_len, moegen_line_origin **origins,
                                            size_t *origin_count, moegen_error *err);

/* The Lua chunk a template compiles to (for tests and debugging); malloc'd and
 * NUL-terminated, *out_len (if non-NULL) its length. NULL on a template syntax error
 * (unbalanced or empty ${}) or out of memory. */
char *moegen_template_compile_to_lua(const char *text, size_t len, size_t *out_len);

#endif
