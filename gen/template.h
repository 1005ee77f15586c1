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
 *     string as is; nil, booleans, tables and non-integer numbers are errors (format
 *     floats with f32()/f64()). Braces inside expr must balance; "$${" emits "${".
 *
 * The sandbox (one fresh lua_State per render; nothing survives between renders):
 *   - Globals come from an allow list: assert error ipairs next pcall select tonumber
 *     tostring type unpack, string (without dump), math (without random, randomseed),
 *     table, utf8. `pairs` iterates in sorted key order. No io, os, package, debug,
 *     require, load, loadfile, dofile, loadstring, collectgarbage, coroutine,
 *     getmetatable/setmetatable, raw* functions. Text chunks only (no bytecode).
 *   - Reading an unknown global is an error ("unknown name 'x'"); so is assigning one
 *     (use `local`).
 *   - The parameter tree arrives as read-only tables (one global per top-level key);
 *     writing to them is an error.
 *   - Helpers provided by the host:
 *       include(path)   render another template of the set here (same globals)
 *       import(path)    run a Lua module of the set (e.g. "templates/lib/moe.lua") once
 *                       per render and return its value
 *       f32(x), f64(x)  exact C literals for a number ("2.5f", "0x1.99999ap-4f" style:
 *                       shortest decimal that round-trips, with an f suffix for f32)
 *       cident(s)       the one identifier sanitizer: s if it is a C identifier that is
 *                       not a keyword, else an error
 *   - Limits: an instruction budget (count hook; once exceeded every further
 *     instruction fails, so pcall cannot swallow it), a memory budget (allocator),
 *     an output size cap, Lua's own C-stack limit for deep recursion.
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

/* Look up a file by path; NULL if absent. */
const moegen_template_file *moegen_template_set_find(const moegen_template_set *set,
                                                     const char *path);

/* ---- Parameter tree: what a template may read ---------------------------------- */

typedef struct moegen_params moegen_params; /* a table with string keys */

/* A new empty root table; NULL on out of memory. */
moegen_params *moegen_params_new(void);
/* Sub-table under `key` (created, or the existing one). NULL on out of memory. */
moegen_params *moegen_params_table(moegen_params *table, const char *key);
/* Set scalar values. Setting a key twice replaces the value. Return 0, or -1 on OOM. */
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
 * On success *out is a malloc'd NUL-terminated string of *out_len bytes.
 * Returns MOEGEN_OK, MOEGEN_ERR_TEMPLATE ("templates/x.tpl:12: message" for syntax,
 * runtime, limit errors; "template not found: path" for a missing entry),
 * MOEGEN_ERR_NO_MEMORY, or MOEGEN_ERR_INVALID_ARGUMENT. `limits` may be NULL. */
moegen_status moegen_template_render(const moegen_template_set *set, const char *entry_path,
                                     const moegen_params *params,
                                     const moegen_render_limits *limits, char **out,
                                     size_t *out_len, moegen_error *err);

/* The Lua chunk a template compiles to (for tests and debugging); malloc'd. */
char *moegen_template_compile_to_lua(const char *text, size_t len, size_t *out_len);

#endif
