/* template.c — the template engine: compiles templates to Lua and renders them in a sandbox.
 *
 * Place in the pipeline: spec -> [gen: templates] -> compile -> load -> launch. emit.c
 * builds a parameter tree (the builder API below) and asks for one entry template of a
 * template set to be rendered to text; that text goes on to the compile stage.
 *
 * Invariants this file owns:
 *   - Line preservation. Template line N compiles to Lua line N: a text line becomes one
 *     `_emit(...)` statement on the same line, a '%' line is copied, and the only extra
 *     text (CHUNK_PROLOGUE) sits at the start of line 1. Chunks are named "@<path>", so
 *     Lua's messages and ours both read "templates/<file>:<N>: message".
 *   - Isolation. Every render gets a fresh lua_State whose allocator enforces the memory
 *     budget. Template code sees only the allow-listed globals built by build_sandbox():
 *     never the real global table, the registry, a metatable, a loader or a binary chunk.
 *     Library tables and parameters are read-only proxies; globals cannot be assigned.
 *   - Boundedness. Instructions (count hook, plus one per 64 bytes allocated), memory
 *     (allocator), output bytes and include/import nesting are limited. The instruction,
 *     memory and output limits are sticky: once hit, the render fails with that limit's
 *     message even if the template caught the error with pcall (the hook then fails every
 *     instruction, the allocator every growth, _emit every piece).
 *   - Determinism. Nothing a template can observe depends on addresses, hash order, time
 *     or randomness: pairs() walks keys in sorted order, `next` is absent, table.sort is a
 *     stable merge sort, and tostring()/string.format() refuse values whose text would be
 *     an address.
 *   - Lua errors never cross this module's boundary: each entry into Lua is a lua_pcall,
 *     and host functions hold no malloc'd memory across calls that can raise.
 *
 * Known limit: Lua's pattern matcher (string.find/match/gsub) runs in C, so a pathological
 * pattern on a long subject is bounded by the memory budget but not by the instruction
 * budget. Templates are project code; the budget guards against bugs, not adversaries.
 */
#include "template.h"
#include "c_locale.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>

/* ---- Limits and constants ---------------------------------------------------------- */

#define DEFAULT_MAX_MEMORY_BYTES ((size_t)64 << 20)
#define DEFAULT_MAX_INSTRUCTIONS UINT64_C(200000000)
#define DEFAULT_MAX_OUTPUT_BYTES ((size_t)16 << 20)
#define HOOK_INTERVAL_INSTRUCTIONS 1000
/* Allocation is charged to the instruction budget (one instruction per this many bytes),
 * so a loop whose work happens inside C library calls (string.rep, table.concat, ..)
 * cannot run for free between hook calls. */
#define ALLOCATION_BYTES_PER_INSTRUCTION 64
#define MAX_NESTING_DEPTH 16 /* include + import frames active at once */
#define MAX_PARAMS_DEPTH 32  /* nesting of parameter tables */
#define CIDENT_MAX_LENGTH 64
#define LOCATION_BYTES 256
#define MAX_ERROR_CHAIN 4         /* "(included from ...)" notes appended to an error */
#define MAX_ERROR_WALK_LEVELS 256 /* stack levels the message handler inspects */

/* Prepended to line 1 of every compiled template: the host passes the two output
 * helpers as the chunk's varargs, so they are locals and not globals. */
#define CHUNK_PROLOGUE "local _emit, _value = ...; "

/* Registry keys (their addresses are the keys). */
static const char registry_env_key = 'e';
static const char registry_emit_key = 'o';
static const char registry_value_key = 'v';
static const char registry_chunks_key = 'c';
static const char registry_modules_key = 'm';
static const char registry_guard_key = 'g';

/* Names of the sandbox globals: the allow list, and the names a parameter may not take. */
static const char *const sandbox_global_names[] = {
    "assert",   "error",  "ipairs", "pcall",  "select", "tonumber", "type",
    "tostring", "pairs",  "unpack", "string", "math",   "table",    "utf8",
    "include",  "import", "f32",    "f64",    "cident", NULL};

static const char *const lua_keywords[] = {
    "and",      "break",  "do",   "else", "elseif", "end",   "false", "for",
    "function", "goto",   "if",   "in",   "local",  "nil",   "not",   "or",
    "repeat",   "return", "then", "true", "until",  "while", NULL};

/* Words cident() refuses: C11/C23, C++ and CUDA keywords, and CUDA built-in variables.
 * Identifiers reserved by C/C++ (leading '_' + capital, or any "__") are refused by rule. */
static const char *const c_keywords[] = {
    /* C */
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
    "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict",
    "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union",
    "unsigned", "void", "volatile", "while",
    /* C23 */
    "alignas", "alignof", "bool", "constexpr", "false", "nullptr", "static_assert", "thread_local",
    "true", "typeof", "typeof_unqual",
    /* C++ */
    "and", "and_eq", "asm", "bitand", "bitor", "catch", "char8_t", "char16_t", "char32_t", "class",
    "compl", "concept", "consteval", "constinit", "const_cast", "co_await", "co_return", "co_yield",
    "decltype", "delete", "dynamic_cast", "explicit", "export", "friend", "mutable", "namespace",
    "new", "noexcept", "not", "not_eq", "operator", "or", "or_eq", "private", "protected", "public",
    "reinterpret_cast", "requires", "static_cast", "template", "this", "throw", "try", "typeid",
    "typename", "using", "virtual", "wchar_t", "xor", "xor_eq",
    /* CUDA built-in variables */
    "threadIdx", "blockIdx", "blockDim", "gridDim", "warpSize", NULL};

/* ---- Small string helpers ----------------------------------------------------------- */

static bool has_suffix(const char *text, const char *suffix) {
    size_t text_length = strlen(text), suffix_length = strlen(suffix);
    return text_length >= suffix_length &&
           memcmp(text + text_length - suffix_length, suffix, suffix_length) == 0;
}

static bool in_word_list(const char *word, const char *const *list) {
    for (size_t i = 0; list[i]; i++)
        if (strcmp(word, list[i]) == 0) return true;
    return false;
}

static bool is_identifier_start(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static bool is_identifier_char(unsigned char c) {
    return is_identifier_start(c) || (c >= '0' && c <= '9');
}

static bool is_identifier(const char *text, size_t length) {
    if (length == 0 || !is_identifier_start((unsigned char)text[0])) return false;
    for (size_t i = 1; i < length; i++)
        if (!is_identifier_char((unsigned char)text[i])) return false;
    return true;
}

/* True if `message` already starts with "<file>:<line>:". */
static bool has_location_prefix(const char *message) {
    const char *colon = strchr(message, ':');
    if (!colon || colon == message) return false;
    for (const char *p = message; p < colon; p++)
        if (*p == ' ' || *p == '\t' || *p == '\n') return false;
    const char *p = colon + 1;
    if (*p < '0' || *p > '9') return false;
    while (*p >= '0' && *p <= '9') p++;
    return *p == ':';
}

/* ---- Growable byte buffer (malloc'd; used outside Lua) ------------------------------ */

typedef struct text_buffer {
    char *data; /* NUL-terminated once anything was appended */
    size_t length;
    size_t capacity;
    bool out_of_memory;
} text_buffer;

static void text_buffer_append(text_buffer *buffer, const char *bytes, size_t count) {
    if (buffer->out_of_memory) return;
    if (buffer->capacity - buffer->length <= count) {
        size_t needed = buffer->length + count + 1;
        if (needed <= buffer->length) {
            buffer->out_of_memory = true;
            return;
        }
        size_t capacity = buffer->capacity ? buffer->capacity : 256;
        while (capacity < needed) capacity = capacity > SIZE_MAX / 2 ? needed : capacity * 2;
        char *grown = realloc(buffer->data, capacity);
        if (!grown) {
            buffer->out_of_memory = true;
            return;
        }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    if (count) memcpy(buffer->data + buffer->length, bytes, count);
    buffer->length += count;
    buffer->data[buffer->length] = '\0';
}

static void text_buffer_append_string(text_buffer *buffer, const char *text) {
    text_buffer_append(buffer, text, strlen(text));
}

/* Append `bytes` escaped for the inside of a double-quoted Lua string. Control bytes use
 * three-digit decimal escapes so a following digit can never extend them. */
static void text_buffer_append_escaped(text_buffer *buffer, const char *bytes, size_t count) {
    size_t run_start = 0;
    for (size_t i = 0; i < count; i++) {
        unsigned char c = (unsigned char)bytes[i];
        const char *escape = NULL;
        char numeric[8];
        if (c == '"')
            escape = "\\\"";
        else if (c == '\\')
            escape = "\\\\";
        else if (c == '\n')
            escape = "\\n";
        else if (c == '\r')
            escape = "\\r";
        else if (c == '\t')
            escape = "\\t";
        else if (c < 0x20 || c == 0x7f) {
            snprintf(numeric, sizeof numeric, "\\%03u", (unsigned)c);
            escape = numeric;
        }
        if (escape) {
            text_buffer_append(buffer, bytes + run_start, i - run_start);
            text_buffer_append_string(buffer, escape);
            run_start = i + 1;
        }
    }
    text_buffer_append(buffer, bytes + run_start, count - run_start);
}

/* ---- Template -> Lua compiler ------------------------------------------------------- */

typedef enum compile_result {
    COMPILE_OK,
    COMPILE_SYNTAX_ERROR,
    COMPILE_OUT_OF_MEMORY
} compile_result;

typedef struct syntax_error {
    size_t line;
    const char *message;
} syntax_error;

/* Find the '}' closing a "${" whose expression starts at `start`. Braces nest; quoted
 * strings (with backslash escapes) are skipped. False if the line ends first. */
static bool find_expression_end(const char *line, size_t length, size_t start, size_t *end) {
    int depth = 1;
    size_t i = start;
    while (i < length) {
        char c = line[i];
        if (c == '"' || c == '\'') {
            i++;
            while (i < length && line[i] != c) i += line[i] == '\\' ? 2 : 1;
            if (i >= length) return false;
        } else if (c == '{') {
            depth++;
        } else if (c == '}' && --depth == 0) {
            *end = i;
            return true;
        }
        i++;
    }
    return false;
}

static void open_literal(text_buffer *lua, bool *literal_open, size_t *pieces) {
    if (*literal_open) return;
    if ((*pieces)++) text_buffer_append_string(lua, ", ");
    text_buffer_append_string(lua, "\"");
    *literal_open = true;
}

static void close_literal(text_buffer *lua, bool *literal_open) {
    if (!*literal_open) return;
    text_buffer_append_string(lua, "\"");
    *literal_open = false;
}

/* Compile one text line (without its newline) to `_emit(...);`. Returns false with
 * *problem set on a template syntax error. */
static bool compile_text_line(text_buffer *lua, const char *line, size_t length, bool has_newline,
                              const char **problem) {
    bool literal_open = false;
    size_t pieces = 0;
    size_t position = 0;
    text_buffer_append_string(lua, "_emit(");
    while (position < length) {
        if (line[position] == '$' && position + 2 < length && line[position + 1] == '$' &&
            line[position + 2] == '{') {
            open_literal(lua, &literal_open, &pieces);
            text_buffer_append_string(lua, "${");
            position += 3;
        } else if (line[position] == '$' && position + 1 < length && line[position + 1] == '{') {
            size_t start = position + 2, end;
            if (!find_expression_end(line, length, start, &end)) {
                *problem = "unbalanced '${' (no matching '}' on this line)";
                return false;
            }
            bool blank = true;
            for (size_t i = start; i < end; i++)
                if (line[i] != ' ' && line[i] != '\t') blank = false;
            if (blank) {
                *problem = "empty '${}'";
                return false;
            }
            close_literal(lua, &literal_open);
            if (pieces++) text_buffer_append_string(lua, ", ");
            text_buffer_append_string(lua, "_value((");
            text_buffer_append(lua, line + start, end - start);
            text_buffer_append_string(lua, "), \"");
            text_buffer_append_escaped(lua, line + start, end - start);
            text_buffer_append_string(lua, "\")");
            position = end + 1;
        } else {
            size_t run_end = position + 1;
            while (run_end < length && line[run_end] != '$') run_end++;
            open_literal(lua, &literal_open, &pieces);
            text_buffer_append_escaped(lua, line + position, run_end - position);
            position = run_end;
        }
    }
    if (has_newline) {
        open_literal(lua, &literal_open, &pieces);
        text_buffer_append_string(lua, "\\n");
    }
    close_literal(lua, &literal_open);
    text_buffer_append_string(lua, ");");
    return true;
}

/* Compile a whole template into `lua` (which must start empty). */
static compile_result compile_template(const char *text, size_t length, text_buffer *lua,
                                       syntax_error *error) {
    text_buffer_append_string(lua, CHUNK_PROLOGUE);
    size_t position = 0, line_number = 1;
    while (position < length) {
        const char *line = text + position;
        const char *newline = memchr(line, '\n', length - position);
        size_t line_length = newline ? (size_t)(newline - line) : length - position;
        size_t first = 0;
        while (first < line_length && (line[first] == ' ' || line[first] == '\t')) first++;
        if (first < line_length && line[first] == '%') {
            /* Lua code. A lone '\r' would count as a line break for Lua's lexer, so it
             * becomes a space to keep line numbers exact. */
            for (size_t i = first + 1; i < line_length; i++)
                text_buffer_append(lua, line[i] == '\r' ? " " : line + i, 1);
        } else {
            const char *problem = NULL;
            if (!compile_text_line(lua, line, line_length, newline != NULL, &problem)) {
                error->line = line_number;
                error->message = problem;
                return COMPILE_SYNTAX_ERROR;
            }
        }
        if (newline) text_buffer_append_string(lua, "\n");
        position += line_length + (newline ? 1 : 0);
        line_number++;
    }
    return lua->out_of_memory ? COMPILE_OUT_OF_MEMORY : COMPILE_OK;
}

char *moegen_template_compile_to_lua(const char *text, size_t len, size_t *out_len) {
    if (out_len) *out_len = 0;
    if (!text && len) return NULL;
    text_buffer lua = {0};
    syntax_error error;
    if (compile_template(text, len, &lua, &error) != COMPILE_OK) {
        free(lua.data);
        return NULL;
    }
    if (out_len) *out_len = lua.length;
    return lua.data;
}

/* ---- Template sets ------------------------------------------------------------------ */

const moegen_template_file *moegen_template_set_find(const moegen_template_set *set,
                                                     const char *path) {
    if (!set || !path) return NULL;
    for (size_t i = 0; i < set->count; i++)
        if (set->files[i].path && strcmp(set->files[i].path, path) == 0) return &set->files[i];
    return NULL;
}

/* ---- Template sets read from a directory ------------------------------------------------ */

#define SET_MAX_FILES 512
#define SET_MAX_FILE_BYTES (4u << 20)
#define SET_MAX_DEPTH 8

typedef struct set_builder {
    moegen_template_file *files;
    size_t count;
    moegen_error *err;
} set_builder;

/* Read one file into the builder as "templates/<relative>". */
static moegen_status set_add_file(set_builder *b, const char *path, const char *relative) {
    if (b->count == SET_MAX_FILES)
        return moegen_error_set(b->err, MOEGEN_ERR_TEMPLATE, 0, "%s: more than %d template files", path,
                                SET_MAX_FILES);
    FILE *f = fopen(path, "rb");
    if (!f) return moegen_error_set(b->err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
    char *text = malloc(SET_MAX_FILE_BYTES + 1);
    const size_t n = text ? fread(text, 1, SET_MAX_FILE_BYTES + 1, f) : 0;
    const int failed = text && ferror(f);
    fclose(f);
    if (!text) return moegen_error_set(b->err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    if (failed || n > SET_MAX_FILE_BYTES) {
        free(text);
        return moegen_error_set(b->err, failed ? MOEGEN_ERR_IO : MOEGEN_ERR_TEMPLATE, 0,
                                failed ? "%s: read error" : "%s: larger than 4 MiB", path);
    }
    text[n] = '\0';
    const size_t path_len = strlen("templates/") + strlen(relative) + 1;
    char *name = malloc(path_len);
    if (!name) {
        free(text);
        return moegen_error_set(b->err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    snprintf(name, path_len, "templates/%s", relative);
    b->files[b->count++] = (moegen_template_file){name, text, n};
    return MOEGEN_OK;
}

/* Walk `dir` (relative path `relative` under the set's root), adding every .tpl, .lua, .h. */
static moegen_status set_add_dir(set_builder *b, const char *dir, const char *relative, int depth) {
    if (depth > SET_MAX_DEPTH)
        return moegen_error_set(b->err, MOEGEN_ERR_TEMPLATE, 0, "%s: directories nested deeper than %d", dir,
                                SET_MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d) return moegen_error_set(b->err, MOEGEN_ERR_IO, errno, "template directory %s: %s", dir, strerror(errno));
    moegen_status st = MOEGEN_OK;
    struct dirent *entry;
    while (st == MOEGEN_OK && (entry = readdir(d)) != NULL) {
        const char *name = entry->d_name;
        if (name[0] == '.') continue; /* ., .., hidden files */
        char path[4096], child[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path ||
            snprintf(child, sizeof child, "%s%s%s", relative, relative[0] ? "/" : "", name) >= (int)sizeof child) {
            st = moegen_error_set(b->err, MOEGEN_ERR_TEMPLATE, 0, "%s/%s: path too long", dir, name);
            break;
        }
        struct stat info;
        if (stat(path, &info) != 0) {
            st = moegen_error_set(b->err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
        } else if (S_ISDIR(info.st_mode)) {
            st = set_add_dir(b, path, child, depth + 1);
        } else if (S_ISREG(info.st_mode) &&
                   (has_suffix(name, ".tpl") || has_suffix(name, ".lua") || has_suffix(name, ".h"))) {
            st = set_add_file(b, path, child);
        }
    }
    closedir(d);
    return st;
}

static int compare_files(const void *a, const void *b) {
    return strcmp(((const moegen_template_file *)a)->path, ((const moegen_template_file *)b)->path);
}

moegen_status moegen_template_set_load(const char *dir, moegen_template_set **out, moegen_error *err) {
    if (!dir || !dir[0] || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "template set: a directory is required");
    *out = NULL;
    moegen_template_set *set = calloc(1, sizeof *set);
    set_builder b = {calloc(SET_MAX_FILES, sizeof(moegen_template_file)), 0, err};
    if (!set || !b.files) {
        free(set);
        free(b.files);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    set->files = b.files;
    moegen_status st = set_add_dir(&b, dir, "", 0);
    set->count = b.count;
    if (st == MOEGEN_OK && b.count == 0)
        st = moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0,
                              "template directory %s holds no .tpl, .lua or .h files (it should look like the "
                              "source tree's templates/: cpu/, cuda/, common/, lib/)",
                              dir);
    if (st != MOEGEN_OK) {
        moegen_template_set_free(set);
        return st;
    }
    qsort(b.files, b.count, sizeof *b.files, compare_files); /* a fixed order: the build id hashes it */
    *out = set;
    return MOEGEN_OK;
}

void moegen_template_set_free(moegen_template_set *set) {
    if (!set) return;
    for (size_t i = 0; i < set->count; i++) {
        free((char *)set->files[i].path);
        free((char *)set->files[i].text);
    }
    free((moegen_template_file *)set->files);
    free(set);
}

/* ---- Parameter tree ----------------------------------------------------------------- */

typedef enum param_kind { PARAM_INT, PARAM_NUM, PARAM_STR, PARAM_BOOL, PARAM_TABLE } param_kind;

typedef struct param_entry {
    char *key;
    param_kind kind;
    union {
        int64_t integer;
        double number;
        char *string;
        int boolean;
        moegen_params *table;
    } value;
} param_entry;

struct moegen_params {
    param_entry *entries;
    size_t count;
    size_t capacity;
};

static char *duplicate_string(const char *text) {
    size_t length = strlen(text) + 1;
    char *copy = malloc(length);
    if (copy) memcpy(copy, text, length);
    return copy;
}

static void param_value_release(param_entry *entry) {
    if (entry->kind == PARAM_STR)
        free(entry->value.string);
    else if (entry->kind == PARAM_TABLE)
        moegen_params_free(entry->value.table);
    entry->kind = PARAM_INT;
    entry->value.integer = 0;
}

static param_entry *params_find(const moegen_params *table, const char *key) {
    for (size_t i = 0; i < table->count; i++)
        if (strcmp(table->entries[i].key, key) == 0) return &table->entries[i];
    return NULL;
}

/* The entry for `key`, appended (holding integer 0) if absent. NULL on OOM. */
static param_entry *params_slot(moegen_params *table, const char *key) {
    param_entry *entry = params_find(table, key);
    if (entry) return entry;
    if (table->count == table->capacity) {
        size_t capacity = table->capacity ? table->capacity * 2 : 8;
        param_entry *grown = realloc(table->entries, capacity * sizeof *grown);
        if (!grown) return NULL;
        table->entries = grown;
        table->capacity = capacity;
    }
    char *key_copy = duplicate_string(key);
    if (!key_copy) return NULL;
    entry = &table->entries[table->count++];
    entry->key = key_copy;
    entry->kind = PARAM_INT;
    entry->value.integer = 0;
    return entry;
}

moegen_params *moegen_params_new(void) { return calloc(1, sizeof(moegen_params)); }

moegen_params *moegen_params_table(moegen_params *table, const char *key) {
    if (!table || !key) return NULL;
    param_entry *existing = params_find(table, key);
    if (existing && existing->kind == PARAM_TABLE) return existing->value.table;
    moegen_params *child = moegen_params_new();
    if (!child) return NULL;
    param_entry *entry = params_slot(table, key);
    if (!entry) {
        free(child);
        return NULL;
    }
    param_value_release(entry);
    entry->kind = PARAM_TABLE;
    entry->value.table = child;
    return child;
}

int moegen_params_int(moegen_params *table, const char *key, int64_t value) {
    param_entry *entry = table && key ? params_slot(table, key) : NULL;
    if (!entry) return -1;
    param_value_release(entry);
    entry->kind = PARAM_INT;
    entry->value.integer = value;
    return 0;
}

int moegen_params_num(moegen_params *table, const char *key, double value) {
    param_entry *entry = table && key ? params_slot(table, key) : NULL;
    if (!entry) return -1;
    param_value_release(entry);
    entry->kind = PARAM_NUM;
    entry->value.number = value;
    return 0;
}

int moegen_params_str(moegen_params *table, const char *key, const char *value) {
    if (!table || !key || !value) return -1;
    char *copy = duplicate_string(value);
    if (!copy) return -1;
    param_entry *entry = params_slot(table, key);
    if (!entry) {
        free(copy);
        return -1;
    }
    param_value_release(entry);
    entry->kind = PARAM_STR;
    entry->value.string = copy;
    return 0;
}

int moegen_params_bool(moegen_params *table, const char *key, int value) {
    param_entry *entry = table && key ? params_slot(table, key) : NULL;
    if (!entry) return -1;
    param_value_release(entry);
    entry->kind = PARAM_BOOL;
    entry->value.boolean = value != 0;
    return 0;
}

void moegen_params_free(moegen_params *root) {
    if (!root) return;
    for (size_t i = 0; i < root->count; i++) {
        param_value_release(&root->entries[i]);
        free(root->entries[i].key);
    }
    free(root->entries);
    free(root);
}

static size_t params_depth(const moegen_params *table, size_t limit) {
    size_t deepest = 0;
    if (limit == 0) return 1;
    for (size_t i = 0; i < table->count; i++) {
        if (table->entries[i].kind != PARAM_TABLE) continue;
        size_t depth = params_depth(table->entries[i].value.table, limit - 1);
        if (depth > deepest) deepest = depth;
    }
    return deepest + 1;
}

/* ---- Render context ----------------------------------------------------------------- */

typedef enum limit_kind { LIMIT_NONE, LIMIT_INSTRUCTIONS, LIMIT_MEMORY, LIMIT_OUTPUT } limit_kind;

/* Everything one render owns. It is the allocator's user data, so host functions reach
 * it through lua_getallocf(). */
typedef struct render_context {
    const moegen_template_set *set;
    size_t max_memory_bytes;
    uint64_t max_instructions;
    size_t max_output_bytes;

    lua_State *lua; /* set once the sandbox is built; the allocator may then inspect it */
    size_t memory_used_bytes;
    uint64_t instructions_used;
    int hook_interval;

    char *output; /* malloc'd, outside the Lua budget */
    size_t output_length;
    size_t output_capacity;

    bool want_origins;             /* record which template line produced each output line */
    moegen_line_origin *origins;   /* malloc'd, one per completed output line */
    size_t origin_count;
    size_t origin_capacity;

    const char *active_files[MAX_NESTING_DEPTH]; /* include/import stack (set-owned paths) */
    int nesting_depth;

    /* Sticky limit state: once set, every further instruction / growth / emit fails. */
    bool instructions_exhausted;
    bool memory_exhausted;
    bool output_exhausted;
    limit_kind first_limit;              /* the limit reported */
    char limit_location[LOCATION_BYTES]; /* where it was hit, "templates/x.tpl:12" */
    bool host_out_of_memory;             /* malloc itself failed (not the budget) */
} render_context;

static render_context *context_of(lua_State *L) {
    void *user_data = NULL;
    lua_getallocf(L, &user_data);
    return user_data;
}

/* Find, from stack `level` outwards, the innermost frame running template or module code
 * (chunk names start with '@'). Does not allocate, so the allocator may call it. */
static bool find_template_frame(lua_State *L, int level, lua_Debug *frame, int *found_level) {
    for (;; level++) {
        if (!lua_getstack(L, level, frame)) return false;
        if (!lua_getinfo(L, "Sl", frame)) continue;
        if (frame->source && frame->source[0] == '@' && frame->currentline > 0) {
            if (found_level) *found_level = level;
            return true;
        }
    }
}

/* "templates/x.tpl:12" for the innermost template frame, or "" if there is none. */
static void describe_location(lua_State *L, char *location, size_t size) {
    lua_Debug frame;
    location[0] = '\0';
    if (find_template_frame(L, 0, &frame, NULL))
        snprintf(location, size, "%s:%d", frame.source + 1, frame.currentline);
}

static void record_limit(render_context *context, limit_kind limit) {
    if (context->first_limit != LIMIT_NONE) return;
    context->first_limit = limit;
    if (context->lua)
        describe_location(context->lua, context->limit_location, sizeof context->limit_location);
}

/* Raise a Lua error "<template location>: <message>". The location is that of the
 * innermost template frame, so it is right both for host functions and inside hooks. */
static int raise_error(lua_State *L, const char *format, ...) {
    char location[LOCATION_BYTES];
    describe_location(L, location, sizeof location);
    if (location[0])
        lua_pushfstring(L, "%s: ", location);
    else
        lua_pushliteral(L, "");
    va_list arguments;
    va_start(arguments, format);
    lua_pushvfstring(L, format, arguments);
    va_end(arguments);
    lua_concat(L, 2);
    return lua_error(L);
}

/* Printable, bounded copy of untrusted text for messages. */
static void display_text(const char *text, size_t length, char *out, size_t size) {
    size_t n = 0;
    for (size_t i = 0; i < length && n + 4 < size; i++) {
        unsigned char c = (unsigned char)text[i];
        out[n++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    if (length > 0 && n < length && n + 4 <= size) {
        memcpy(out + n, "...", 3);
        n += 3;
    }
    out[n] = '\0';
}

static uint64_t saturating_add(uint64_t a, uint64_t b) {
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* ---- The allocator: the memory budget ------------------------------------------------ */

static void *budget_allocate(void *user_data, void *block, size_t old_size, size_t new_size) {
    render_context *context = user_data;
    size_t old_bytes = block ? old_size : 0;
    if (new_size == 0) {
        free(block);
        context->memory_used_bytes -= old_bytes;
        return NULL;
    }
    if (new_size > old_bytes) {
        size_t growth = new_size - old_bytes;
        if (context->memory_exhausted ||
            growth > context->max_memory_bytes - context->memory_used_bytes) {
            context->memory_exhausted = true;
            record_limit(context, LIMIT_MEMORY);
            return NULL;
        }
    }
    if (new_size > old_bytes)
        context->instructions_used = saturating_add(
            context->instructions_used, (new_size - old_bytes) / ALLOCATION_BYTES_PER_INSTRUCTION);
    void *resized = realloc(block, new_size);
    if (!resized) {
        if (new_size < old_bytes)
            resized = block; /* a failed shrink keeps the block */
        else {
            context->host_out_of_memory = true;
            return NULL;
        }
    }
    context->memory_used_bytes = context->memory_used_bytes - old_bytes + new_size;
    return resized;
}

/* ---- The instruction budget ------------------------------------------------------------ */

static void count_hook(lua_State *L, lua_Debug *event) {
    render_context *context = context_of(L);
    (void)event;
    if (!context->instructions_exhausted) {
        context->instructions_used =
            saturating_add(context->instructions_used, (uint64_t)context->hook_interval);
        if (context->instructions_used <= context->max_instructions) return;
        context->instructions_exhausted = true;
        record_limit(context, LIMIT_INSTRUCTIONS);
        /* From now on every instruction fails, so pcall cannot swallow the limit. */
        lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
    }
    raise_error(L, "instruction limit exceeded");
}

/* ---- Output ---------------------------------------------------------------------------- */

static void output_append(lua_State *L, render_context *context, const char *bytes, size_t count) {
    if (context->output_exhausted || count > context->max_output_bytes - context->output_length) {
        context->output_exhausted = true;
        record_limit(context, LIMIT_OUTPUT);
        raise_error(L, "output limit exceeded");
    }
    if (context->output_capacity - context->output_length <= count) {
        size_t needed = context->output_length + count + 1;
        size_t capacity = context->output_capacity ? context->output_capacity : 4096;
        while (capacity < needed) capacity = capacity > SIZE_MAX / 2 ? needed : capacity * 2;
        char *grown = realloc(context->output, capacity);
        if (!grown) {
            context->host_out_of_memory = true;
            raise_error(L, "out of memory");
        }
        context->output = grown;
        context->output_capacity = capacity;
    }
    memcpy(context->output + context->output_length, bytes, count);
    context->output_length += count;
}

/* Record the calling template line as the origin of `lines` completed output lines. */
static void record_origins(lua_State *L, render_context *context, size_t lines) {
    lua_Debug frame;
    const char *path = NULL;
    int line = 0;
    if (lua_getstack(L, 1, &frame) && lua_getinfo(L, "Sl", &frame) && frame.source[0] == '@') {
        const moegen_template_file *file = moegen_template_set_find(context->set, frame.source + 1);
        if (file) {
            path = file->path; /* owned by the set, which outlives the map */
            line = frame.currentline;
        }
    }
    if (context->origin_capacity - context->origin_count < lines) {
        size_t capacity = context->origin_capacity ? context->origin_capacity * 2 : 1024;
        while (capacity - context->origin_count < lines) capacity *= 2;
        moegen_line_origin *grown = realloc(context->origins, capacity * sizeof *grown);
        if (!grown) {
            context->host_out_of_memory = true;
            raise_error(L, "out of memory");
        }
        context->origins = grown;
        context->origin_capacity = capacity;
    }
    for (size_t i = 0; i < lines; i++) {
        context->origins[context->origin_count].path = path;
        context->origins[context->origin_count].line = line;
        context->origin_count++;
    }
}

/* _emit(piece, ...): append string pieces to the output. The output is handed on as a
 * C string, so a NUL byte in it is an error. */
static int host_emit(lua_State *L) {
    render_context *context = context_of(L);
    int count = lua_gettop(L);
    for (int i = 1; i <= count; i++) {
        size_t length;
        if (lua_type(L, i) != LUA_TSTRING) return raise_error(L, "_emit: piece is not a string");
        const char *piece = lua_tolstring(L, i, &length);
        if (memchr(piece, '\0', length)) return raise_error(L, "NUL byte in the output");
        output_append(L, context, piece, length);
        if (context->want_origins) {
            size_t newlines = 0;
            for (const char *p = piece; (p = memchr(p, '\n', length - (size_t)(p - piece))); p++) newlines++;
            if (newlines) record_origins(L, context, newlines);
        }
    }
    return 0;
}

/* _value(value, expression_text): the text of ${expression}. */
static int host_value(lua_State *L) {
    const char *expression = lua_tostring(L, 2);
    if (!expression) expression = "?";
    switch (lua_type(L, 1)) {
    case LUA_TSTRING: lua_settop(L, 1); return 1;
    case LUA_TNUMBER:
        if (lua_isinteger(L, 1)) {
            lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, 1));
            return 1;
        }
        return raise_error(L,
                           "${%s} is a float (%s); use // for integer division, or f32()/f64() "
                           "for a C floating-point literal",
                           expression, luaL_tolstring(L, 1, NULL));
    case LUA_TNIL:
        return raise_error(L, "${%s} is nil; only integers and strings can be emitted", expression);
    case LUA_TBOOLEAN:
        return raise_error(L, "${%s} is a boolean (%s); only integers and strings can be emitted",
                           expression, lua_toboolean(L, 1) ? "true" : "false");
    default:
        return raise_error(L, "${%s} is a %s; only integers and strings can be emitted", expression,
                           luaL_typename(L, 1));
    }
}

/* ---- Number and identifier helpers: f32, f64, cident ----------------------------------- */

/* The shortest decimal that reads back (strtof/strtod) as `value`, always with '.' or 'e'.
 * `value` is finite; for `single` it is exactly a float. `out` holds at least 64 bytes. */
static void format_shortest(double value, bool single, char *out, size_t size) {
    char scientific[48];
    int max_digits = single ? 9 : 17;
    for (int digits = 1; digits <= max_digits; digits++) {
        snprintf(scientific, sizeof scientific, "%.*e", digits - 1, value);
        bool round_trips =
            single ? strtof(scientific, NULL) == (float)value : strtod(scientific, NULL) == value;
        if (round_trips) break;
    }
    if (value == 0) {
        snprintf(out, size, "%s0.0", signbit(value) ? "-" : "");
        return;
    }
    /* scientific is "[-]d[.ddd]e[+-]xx" */
    const char *p = scientific;
    bool negative = *p == '-';
    if (negative) p++;
    char mantissa[24];
    size_t count = 0;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && count + 1 < sizeof mantissa) mantissa[count++] = *p;
    int exponent = *p == 'e' ? atoi(p + 1) : 0;
    while (count > 1 && mantissa[count - 1] == '0') count--;

    size_t n = 0;
    if (negative) out[n++] = '-';
    if (exponent >= -5 && exponent < 16) {
        if (exponent >= 0) {
            for (size_t i = 0; i <= (size_t)exponent; i++) out[n++] = i < count ? mantissa[i] : '0';
            out[n++] = '.';
            if ((size_t)exponent + 1 < count)
                for (size_t i = (size_t)exponent + 1; i < count; i++) out[n++] = mantissa[i];
            else
                out[n++] = '0';
        } else {
            out[n++] = '0';
            out[n++] = '.';
            for (int i = 0; i < -exponent - 1; i++) out[n++] = '0';
            for (size_t i = 0; i < count; i++) out[n++] = mantissa[i];
        }
        out[n] = '\0';
    } else {
        out[n++] = mantissa[0];
        if (count > 1) {
            out[n++] = '.';
            for (size_t i = 1; i < count; i++) out[n++] = mantissa[i];
        }
        snprintf(out + n, size - n, "e%d", exponent);
    }
}

static int host_float_literal(lua_State *L, bool single) {
    const char *name = single ? "f32" : "f64";
    if (lua_type(L, 1) != LUA_TNUMBER)
        return raise_error(L, "%s() needs a number, got %s", name, luaL_typename(L, 1));
    double value;
    if (lua_isinteger(L, 1)) {
        lua_Integer integer = lua_tointeger(L, 1);
        value = (double)integer;
        bool exact = value >= -0x1p63 && value < 0x1p63 && (lua_Integer)value == integer;
        if (exact && single) exact = (double)(float)value == value;
        if (!exact)
            return raise_error(L, "%s(): integer %I is not exactly representable", name,
                               (LUAI_UACINT)integer);
    } else {
        value = lua_tonumber(L, 1);
    }
    if (!isfinite(value))
        return raise_error(L, "%s(): %s has no C literal (NaN and infinities are refused)", name,
                           luaL_tolstring(L, 1, NULL));
    if (single) {
        if (fabs(value) > FLT_MAX)
            return raise_error(L, "f32(): %s is out of range for float",
                               luaL_tolstring(L, 1, NULL));
        float narrowed = (float)value;
        if (narrowed == 0 && value != 0)
            return raise_error(L, "f32(): %s underflows to zero as a float",
                               luaL_tolstring(L, 1, NULL));
        value = narrowed;
    }
    char literal[64];
    format_shortest(value, single, literal, sizeof literal);
    if (single)
        lua_pushfstring(L, "%sf", literal);
    else
        lua_pushstring(L, literal);
    return 1;
}

static int host_f32(lua_State *L) { return host_float_literal(L, true); }
static int host_f64(lua_State *L) { return host_float_literal(L, false); }

/* cident(s): s if it is a C identifier of at most 64 characters that is neither a keyword
 * nor reserved; otherwise an error. The one way a name reaches generated code. */
static int host_cident(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return raise_error(L, "cident() needs a string, got %s", luaL_typename(L, 1));
    size_t length;
    const char *name = lua_tolstring(L, 1, &length);
    char shown[48];
    display_text(name, length, shown, sizeof shown);
    if (length == 0) return raise_error(L, "cident(): empty identifier");
    if (length > CIDENT_MAX_LENGTH)
        return raise_error(L, "cident(): '%s' is longer than %d characters", shown,
                           CIDENT_MAX_LENGTH);
    if (!is_identifier(name, length))
        return raise_error(L, "cident(): '%s' is not a C identifier", shown);
    if (strstr(name, "__") || (name[0] == '_' && name[1] >= 'A' && name[1] <= 'Z'))
        return raise_error(L, "cident(): '%s' is reserved in C/C++", shown);
    if (in_word_list(name, c_keywords))
        return raise_error(L, "cident(): '%s' is a C/C++/CUDA keyword", shown);
    lua_settop(L, 1);
    return 1;
}

/* ---- Deterministic replacements: pairs, table.sort, tostring, string.format ---------- */

typedef struct sort_key {
    bool is_string;
    bool is_integer;
    lua_Integer integer;
    lua_Number number;
    const char *string;
    size_t length;
    lua_Integer slot; /* index of the key in the holder table */
} sort_key;

/* Compare an integer with a float exactly. */
static int compare_integer_float(lua_Integer integer, lua_Number number) {
    if (number >= 0x1p63) return -1;
    if (number < -0x1p63) return 1;
    lua_Number floor_number = floor(number);
    lua_Integer whole = (lua_Integer)floor_number;
    if (integer != whole) return integer < whole ? -1 : 1;
    return number > floor_number ? -1 : 0;
}

static int compare_sort_keys(const void *left_pointer, const void *right_pointer) {
    const sort_key *left = left_pointer, *right = right_pointer;
    if (left->is_string != right->is_string) return left->is_string ? 1 : -1;
    if (left->is_string) {
        size_t common = left->length < right->length ? left->length : right->length;
        int order = memcmp(left->string, right->string, common);
        if (order) return order;
        return left->length < right->length ? -1 : left->length > right->length;
    }
    if (left->is_integer && right->is_integer)
        return left->integer < right->integer ? -1 : left->integer > right->integer;
    if (left->is_integer) return compare_integer_float(left->integer, right->number);
    if (right->is_integer) return -compare_integer_float(right->integer, left->number);
    return left->number < right->number ? -1 : left->number > right->number;
}

/* Iterator closure: upvalues are (sorted keys, table, position). */
static int sorted_next(lua_State *L) {
    lua_Integer position = lua_tointeger(L, lua_upvalueindex(3));
    for (;;) {
        position++;
        lua_pushinteger(L, position);
        lua_replace(L, lua_upvalueindex(3));
        if (lua_rawgeti(L, lua_upvalueindex(1), position) == LUA_TNIL) return 1;
        lua_pushvalue(L, -1);
        if (lua_rawget(L, lua_upvalueindex(2)) != LUA_TNIL) return 2;
        lua_pop(L, 2); /* key removed during the walk: skip it */
    }
}

/* Push an iterator over the table at `index` in sorted key order: numbers ascending, then
 * strings byte-wise. Other key types are an error. */
static int push_sorted_iterator(lua_State *L, int index) {
    index = lua_absindex(L, index);
    luaL_checkstack(L, 8, NULL);
    lua_newtable(L); /* holder: slot -> key, keeps key strings alive while sorting */
    int holder = lua_gettop(L);
    lua_Integer count = 0;
    lua_pushnil(L);
    while (lua_next(L, index)) {
        lua_pop(L, 1);
        int type = lua_type(L, -1);
        if (type != LUA_TNUMBER && type != LUA_TSTRING)
            return raise_error(L, "pairs(): cannot order a key of type %s", lua_typename(L, type));
        lua_pushvalue(L, -1);
        lua_rawseti(L, holder, ++count);
    }
    if (count > INT_MAX / 2) return raise_error(L, "pairs(): table too large");
    sort_key *keys = lua_newuserdatauv(L, (size_t)(count ? count : 1) * sizeof *keys, 0);
    for (lua_Integer slot = 1; slot <= count; slot++) {
        sort_key *key = &keys[slot - 1];
        memset(key, 0, sizeof *key);
        key->slot = slot;
        lua_rawgeti(L, holder, slot);
        if (lua_type(L, -1) == LUA_TSTRING) {
            key->is_string = true;
            key->string = lua_tolstring(L, -1, &key->length); /* anchored by holder */
        } else if (lua_isinteger(L, -1)) {
            key->is_integer = true;
            key->integer = lua_tointeger(L, -1);
        } else {
            key->number = lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
    }
    qsort(keys, (size_t)count, sizeof *keys, compare_sort_keys);
    lua_createtable(L, (int)count, 0);
    for (lua_Integer i = 0; i < count; i++) {
        lua_rawgeti(L, holder, keys[i].slot);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushvalue(L, index);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, sorted_next, 3);
    return 1;
}

/* pairs(t): sorted-order iteration; honours __pairs (the read-only proxies). */
static int sandbox_pairs(lua_State *L) {
    if (lua_type(L, 1) != LUA_TTABLE)
        return raise_error(L, "pairs() needs a table, got %s", luaL_typename(L, 1));
    if (luaL_getmetafield(L, 1, "__pairs") != LUA_TNIL) {
        lua_pushvalue(L, 1);
        lua_call(L, 1, 3);
        return 3;
    }
    return push_sorted_iterator(L, 1);
}

static bool sort_less(lua_State *L, bool has_comparator, int left, int right) {
    if (!has_comparator) return lua_compare(L, left, right, LUA_OPLT);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, left);
    lua_pushvalue(L, right);
    lua_call(L, 2, 1);
    bool less = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return less;
}

/* table.sort(t [, less]): a stable bottom-up merge sort, so equal elements keep their
 * order and the result never depends on pivot choice. */
static int sandbox_sort(lua_State *L) {
    if (lua_type(L, 1) != LUA_TTABLE)
        return raise_error(L, "table.sort() needs a table, got %s", luaL_typename(L, 1));
    bool has_comparator = !lua_isnoneornil(L, 2);
    if (has_comparator && lua_type(L, 2) != LUA_TFUNCTION)
        return raise_error(L, "table.sort(): the comparator is a %s, not a function",
                           luaL_typename(L, 2));
    lua_settop(L, 2);
    lua_Integer count = luaL_len(L, 1);
    if (count < 2) return 0;
    if (count > INT_MAX / 4) return raise_error(L, "table.sort(): table too large");
    luaL_checkstack(L, 8, NULL);
    lua_createtable(L, (int)count, 0);
    lua_createtable(L, (int)count, 0);
    int source = 3, target = 4;
    for (lua_Integer i = 1; i <= count; i++) {
        lua_geti(L, 1, i);
        lua_rawseti(L, source, i);
    }
    for (lua_Integer width = 1; width < count; width *= 2) {
        for (lua_Integer low = 1; low <= count; low += 2 * width) {
            lua_Integer middle = low + width - 1 < count ? low + width - 1 : count;
            lua_Integer high = low + 2 * width - 1 < count ? low + 2 * width - 1 : count;
            lua_Integer left = low, right = middle + 1, out = low;
            while (left <= middle && right <= high) {
                lua_rawgeti(L, source, left);
                lua_rawgeti(L, source, right);
                int top = lua_gettop(L);
                if (sort_less(L, has_comparator, top, top - 1)) { /* right < left */
                    lua_rawseti(L, target, out++);
                    lua_pop(L, 1);
                    right++;
                } else {
                    lua_pop(L, 1);
                    lua_rawseti(L, target, out++);
                    left++;
                }
            }
            while (left <= middle) {
                lua_rawgeti(L, source, left++);
                lua_rawseti(L, target, out++);
            }
            while (right <= high) {
                lua_rawgeti(L, source, right++);
                lua_rawseti(L, target, out++);
            }
        }
        int swap = source;
        source = target;
        target = swap;
    }
    for (lua_Integer i = 1; i <= count; i++) {
        lua_rawgeti(L, source, i);
        lua_seti(L, 1, i);
    }
    return 0;
}

static bool has_deterministic_text(int type) {
    return type == LUA_TNIL || type == LUA_TBOOLEAN || type == LUA_TNUMBER || type == LUA_TSTRING;
}

/* tostring(v): as Lua's, but a table or function (whose text is an address) is an error. */
static int sandbox_tostring(lua_State *L) {
    luaL_checkany(L, 1);
    if (!has_deterministic_text(lua_type(L, 1)))
        return raise_error(L, "tostring() of a %s would print an address", luaL_typename(L, 1));
    luaL_tolstring(L, 1, NULL);
    return 1;
}

/* string.format(fmt, ...): as Lua's (upvalue 1), minus %p and address-valued arguments. */
static int sandbox_format(lua_State *L) {
    size_t length;
    const char *format = luaL_checklstring(L, 1, &length);
    for (size_t i = 0; i < length; i++) {
        if (format[i] != '%') continue;
        i++;
        if (i < length && format[i] == '%') continue;
        while (i < length && strchr("-+ #0123456789.", format[i])) i++;
        if (i < length && format[i] == 'p')
            return raise_error(L, "string.format(): %%p would print an address");
    }
    int count = lua_gettop(L);
    for (int i = 2; i <= count; i++)
        if (!has_deterministic_text(lua_type(L, i)))
            return raise_error(L, "string.format(): argument %d is a %s, whose text is an address",
                               i, luaL_typename(L, i));
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, count, 1);
    return 1;
}

/* ---- Read-only proxies and strict tables ------------------------------------------------ */

/* __index of a strict table (upvalue 1: its name): a missing string key is an error. */
static int strict_missing_field(lua_State *L) {
    if (lua_type(L, 2) == LUA_TSTRING)
        return raise_error(L, "%s has no field '%s'", lua_tostring(L, lua_upvalueindex(1)),
                           lua_tostring(L, 2));
    return 0;
}

/* __newindex of a proxy (upvalue 1: its name). */
static int readonly_assign(lua_State *L) {
    const char *name = lua_tostring(L, lua_upvalueindex(1));
    if (lua_type(L, 2) == LUA_TSTRING)
        return raise_error(L, "%s is read-only (cannot set field '%s')", name, lua_tostring(L, 2));
    return raise_error(L, "%s is read-only", name);
}

static void push_proxy_target(lua_State *L, int proxy) {
    lua_getmetatable(L, proxy);
    lua_getfield(L, -1, "__index");
    lua_remove(L, -2);
}

static int proxy_length(lua_State *L) {
    push_proxy_target(L, 1);
    lua_pushinteger(L, (lua_Integer)lua_rawlen(L, -1));
    return 1;
}

static int proxy_pairs(lua_State *L) {
    push_proxy_target(L, 1);
    return push_sorted_iterator(L, -1);
}

/* Replace the table at `index` by a read-only proxy of it, named `name` in messages.
 * The table itself becomes strict: reading a missing string key is an error. */
static void make_readonly_proxy(lua_State *L, int index, const char *name) {
    index = lua_absindex(L, index);
    luaL_checkstack(L, 6, NULL);
    lua_createtable(L, 0, 1);
    lua_pushstring(L, name);
    lua_pushcclosure(L, strict_missing_field, 1);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, index);

    lua_newtable(L); /* the proxy: always empty */
    lua_createtable(L, 0, 5);
    lua_pushvalue(L, index);
    lua_setfield(L, -2, "__index");
    lua_pushstring(L, name);
    lua_pushcclosure(L, readonly_assign, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, proxy_length);
    lua_setfield(L, -2, "__len");
    lua_pushcfunction(L, proxy_pairs);
    lua_setfield(L, -2, "__pairs");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    lua_replace(L, index);
}

/* Push a read-only proxy of the parameter table, named `name` ("spec.router"). */
static void push_params_table(lua_State *L, const moegen_params *table, const char *name) {
    luaL_checkstack(L, 8, NULL);
    lua_createtable(L, 0, table->count > INT_MAX ? INT_MAX : (int)table->count);
    int real = lua_gettop(L);
    for (size_t i = 0; i < table->count; i++) {
        const param_entry *entry = &table->entries[i];
        lua_pushstring(L, entry->key);
        switch (entry->kind) {
        case PARAM_INT: lua_pushinteger(L, (lua_Integer)entry->value.integer); break;
        case PARAM_NUM: lua_pushnumber(L, entry->value.number); break;
        case PARAM_STR: lua_pushstring(L, entry->value.string); break;
        case PARAM_BOOL: lua_pushboolean(L, entry->value.boolean); break;
        case PARAM_TABLE: {
            const char *child_name = lua_pushfstring(L, "%s.%s", name, entry->key);
            push_params_table(L, entry->value.table, child_name);
            lua_remove(L, -2);
            break;
        }
        }
        lua_rawset(L, real);
    }
    make_readonly_proxy(L, real, name);
}

/* ---- Globals: unknown names and assignments are errors -------------------------------- */

static int unknown_global(lua_State *L) {
    if (lua_type(L, 2) == LUA_TSTRING)
        return raise_error(L, "unknown name '%s'", lua_tostring(L, 2));
    return raise_error(L, "unknown name (a %s key)", luaL_typename(L, 2));
}

static int assign_global(lua_State *L) {
    if (lua_type(L, 2) == LUA_TSTRING)
        return raise_error(L, "assignment to global '%s' (globals are read-only; use local)",
                           lua_tostring(L, 2));
    return raise_error(L, "assignment to a global (globals are read-only; use local)");
}

/* ---- include / import ------------------------------------------------------------------ */

/* __close of the guard that enter_file() leaves on the stack: pops the nesting stack on
 * return and on error unwinding alike. */
static int leave_file(lua_State *L) {
    render_context *context = context_of(L);
    if (context->nesting_depth > 0) context->nesting_depth--;
    return 0;
}

/* Push `file` onto the include/import stack (refusing cycles and depth over the limit)
 * and leave a to-be-closed guard on the Lua stack that pops it again. */
static void enter_file(lua_State *L, const moegen_template_file *file) {
    render_context *context = context_of(L);
    for (int i = 0; i < context->nesting_depth; i++) {
        if (strcmp(context->active_files[i], file->path) != 0) continue;
        luaL_Buffer chain;
        luaL_buffinit(L, &chain);
        for (int j = i; j < context->nesting_depth; j++) {
            luaL_addstring(&chain, context->active_files[j]);
            luaL_addstring(&chain, " -> ");
        }
        luaL_addstring(&chain, file->path);
        luaL_pushresult(&chain);
        raise_error(L, "include cycle: %s", lua_tostring(L, -1));
    }
    if (context->nesting_depth >= MAX_NESTING_DEPTH)
        raise_error(L, "include/import nesting deeper than %d", MAX_NESTING_DEPTH);
    lua_newuserdatauv(L, 0, 0);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_guard_key);
    lua_setmetatable(L, -2);
    lua_toclose(L, -1);
    context->active_files[context->nesting_depth++] = file->path;
}

/* Push the compiled function of `file` (a template or a module), loading it on first use
 * in this render. Load errors are raised with the file's own location. */
static void push_chunk(lua_State *L, const moegen_template_file *file, bool is_template) {
    render_context *context = context_of(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_chunks_key);
    if (lua_getfield(L, -1, file->path) == LUA_TFUNCTION) {
        lua_remove(L, -2);
        return;
    }
    lua_pop(L, 1);
    const char *chunk_name = lua_pushfstring(L, "@%s", file->path);
    int status = LUA_OK;
    if (is_template) {
        text_buffer lua = {0};
        syntax_error error = {0, NULL};
        compile_result result = compile_template(file->text, file->len, &lua, &error);
        if (result == COMPILE_OK)
            status = luaL_loadbufferx(L, lua.data, lua.length, chunk_name, "t");
        free(lua.data); /* nothing above raised: loadbufferx reports errors by status */
        if (result == COMPILE_OUT_OF_MEMORY) {
            context->host_out_of_memory = true;
            raise_error(L, "out of memory compiling %s", file->path);
        }
        if (result == COMPILE_SYNTAX_ERROR) {
            lua_pushfstring(L, "%s:%I: %s", file->path, (LUAI_UACINT)error.line, error.message);
            status = LUA_ERRSYNTAX;
        }
    } else {
        status = luaL_loadbufferx(L, file->text, file->len, chunk_name, "t");
    }
    if (status != LUA_OK) {
        /* The file is not running yet, so the message handler would not see it on the
         * stack: note here where it was included or imported from. A message without a
         * location (a refused binary chunk) is located at that call instead. */
        char location[LOCATION_BYTES];
        describe_location(L, location, sizeof location);
        const char *message = lua_tostring(L, -1);
        if (location[0] && has_location_prefix(message))
            lua_pushfstring(L, "%s (%s %s)", message,
                            is_template ? "included from" : "imported from", location);
        else if (!has_location_prefix(message))
            lua_pushfstring(L, "%s%s%s: %s", location, location[0] ? ": " : "", file->path,
                            message);
        lua_error(L);
    }
    lua_remove(L, -2); /* chunk name */
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_env_key);
    lua_setupvalue(L, -2, 1); /* _ENV of a main chunk is its first upvalue */
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, file->path);
    lua_remove(L, -2); /* chunk cache */
}

static const moegen_template_file *find_file(lua_State *L, const char *path) {
    return moegen_template_set_find(context_of(L)->set, path);
}

/* Render `file` into the output: the body of include() and of the entry. */
static void render_file(lua_State *L, const moegen_template_file *file) {
    enter_file(L, file);
    push_chunk(L, file, true);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_emit_key);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_value_key);
    lua_call(L, 2, 0);
}

/* include(path): render another template of the set here, with the same globals. */
static int host_include(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return raise_error(L, "include() needs a path string, got %s", luaL_typename(L, 1));
    const char *path = lua_tostring(L, 1);
    if (!has_suffix(path, ".tpl"))
        return raise_error(L, "include(): '%s' is not a template (.tpl)", path);
    const moegen_template_file *file = find_file(L, path);
    if (!file) return raise_error(L, "include(): no template '%s' in the template set", path);
    render_file(L, file);
    return 0;
}

/* import(path): run a Lua module of the set once per render and return its value
 * (true if it returns nothing). */
static int host_import(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return raise_error(L, "import() needs a path string, got %s", luaL_typename(L, 1));
    const char *path = lua_tostring(L, 1);
    if (!has_suffix(path, ".lua"))
        return raise_error(L, "import(): '%s' is not a Lua module (.lua)", path);
    lua_settop(L, 1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &registry_modules_key); /* 2 */
    if (lua_getfield(L, 2, path) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    const moegen_template_file *file = find_file(L, path);
    if (!file) return raise_error(L, "import(): no module '%s' in the template set", path);
    enter_file(L, file); /* 3: guard */
    push_chunk(L, file, false);
    lua_call(L, 0, 1);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, 2, path);
    return 1;
}

/* ---- Error messages ------------------------------------------------------------------------ */

/* Message handler: "<file>:<line>: message", then where the failing code was called,
 * included or imported from, read off the intact stack: each template or module main
 * chunk further out is noted. lua_getstack() costs O(level), so the walk is bounded
 * (a stack overflow leaves hundreds of thousands of frames). */
static int format_error(lua_State *L) {
    lua_settop(L, 1);
    if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
        lua_tostring(L, 1);
    } else {
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        lua_replace(L, 1);
    }
    lua_Debug frame;
    int level;
    if (!find_template_frame(L, 1, &frame, &level)) return 1;
    if (!has_location_prefix(lua_tostring(L, 1))) {
        lua_pushfstring(L, "%s:%d: ", frame.source + 1, frame.currentline);
        lua_insert(L, 1);
        lua_concat(L, 2);
    }
    const char *previous_source = frame.source; /* interned; alive while on the stack */
    bool previous_is_main = strcmp(frame.what, "main") == 0;
    int notes = 0;
    for (int walked = 0; notes < MAX_ERROR_CHAIN && walked < MAX_ERROR_WALK_LEVELS &&
                         lua_getstack(L, ++level, &frame);
         walked++) {
        if (!lua_getinfo(L, "Sl", &frame) || !frame.source || frame.source[0] != '@' ||
            frame.currentline <= 0 || strcmp(frame.what, "main") != 0)
            continue;
        const char *how = !previous_is_main                     ? "called from"
                          : has_suffix(previous_source, ".tpl") ? "included from"
                                                                : "imported from";
        lua_pushfstring(L, " (%s %s:%d)", how, frame.source + 1, frame.currentline);
        lua_concat(L, 2);
        notes++;
        previous_source = frame.source;
        previous_is_main = true;
    }
    return 1;
}

/* ---- Building the sandbox ---------------------------------------------------------------- */

/* Push a copy of the library table at `index` without the fields named in `excluded`. */
static void copy_library(lua_State *L, int index, const char *const *excluded) {
    index = lua_absindex(L, index);
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, index)) {
        if (lua_type(L, -2) == LUA_TSTRING && in_word_list(lua_tostring(L, -2), excluded)) {
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -4);
    }
}

/* Edits a library copy before it is frozen (original and copy are stack indices). */
typedef void library_adjust(lua_State *L, int original, int copy, int globals);

static void adjust_string(lua_State *L, int original, int copy, int globals) {
    (void)globals;
    lua_getfield(L, original, "format");
    lua_pushcclosure(L, sandbox_format, 1);
    lua_setfield(L, copy, "format");
}

static void adjust_table(lua_State *L, int original, int copy, int globals) {
    lua_pushcfunction(L, sandbox_sort);
    lua_setfield(L, copy, "sort");
    lua_getfield(L, original, "unpack");
    lua_setfield(L, globals, "unpack");
}

/* Open library `name` and set globals[name] to a read-only copy of it without the
 * `excluded` fields, after `adjust` (may be NULL) has edited the copy. */
static void install_library(lua_State *L, int globals, const char *name, lua_CFunction open,
                            const char *const *excluded, library_adjust *adjust) {
    luaL_requiref(L, name, open, 0);
    int original = lua_gettop(L);
    copy_library(L, original, excluded);
    int copy = lua_gettop(L);
    if (adjust) adjust(L, original, copy, globals);
    make_readonly_proxy(L, copy, name);
    lua_setfield(L, globals, name);
    lua_settop(L, original - 1);
}

/* Protected: build the sandbox environment (argument 1: the params, light userdata). */
static int build_sandbox(lua_State *L) {
    const moegen_params *params = lua_touserdata(L, 1);
    lua_settop(L, 0);
    luaL_checkstack(L, 16, NULL);

    luaL_requiref(L, LUA_GNAME, luaopen_base, 0); /* 1: the real global table */
    lua_newtable(L);                              /* 2: the sandbox globals */
    const int real_globals = 1, globals = 2;
    static const char *const base_names[] = {"assert", "error",    "ipairs", "pcall",
                                             "select", "tonumber", "type",   NULL};
    for (size_t i = 0; base_names[i]; i++) {
        lua_getfield(L, real_globals, base_names[i]);
        lua_setfield(L, globals, base_names[i]);
    }
    lua_pushcfunction(L, sandbox_tostring);
    lua_setfield(L, globals, "tostring");
    lua_pushcfunction(L, sandbox_pairs);
    lua_setfield(L, globals, "pairs");

    static const char *const string_excluded[] = {"dump", NULL};
    static const char *const math_excluded[] = {"random", "randomseed", NULL};
    static const char *const nothing_excluded[] = {NULL};
    install_library(L, globals, LUA_STRLIBNAME, luaopen_string, string_excluded, adjust_string);
    install_library(L, globals, LUA_MATHLIBNAME, luaopen_math, math_excluded, NULL);
    install_library(L, globals, LUA_TABLIBNAME, luaopen_table, nothing_excluded, adjust_table);
    install_library(L, globals, LUA_UTF8LIBNAME, luaopen_utf8, nothing_excluded, NULL);
    /* Methods on strings ("x"):rep(2) go through the string metatable: point it at the
     * sandbox copy so that ("").dump is as absent as string.dump. */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_getfield(L, globals, LUA_STRLIBNAME);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 2);

    static const luaL_Reg host_functions[] = {{"include", host_include}, {"import", host_import},
                                              {"f32", host_f32},         {"f64", host_f64},
                                              {"cident", host_cident},   {NULL, NULL}};
    for (size_t i = 0; host_functions[i].name; i++) {
        lua_pushcfunction(L, host_functions[i].func);
        lua_setfield(L, globals, host_functions[i].name);
    }

    for (size_t i = 0; params && i < params->count; i++) {
        const param_entry *entry = &params->entries[i];
        switch (entry->kind) {
        case PARAM_INT: lua_pushinteger(L, (lua_Integer)entry->value.integer); break;
        case PARAM_NUM: lua_pushnumber(L, entry->value.number); break;
        case PARAM_STR: lua_pushstring(L, entry->value.string); break;
        case PARAM_BOOL: lua_pushboolean(L, entry->value.boolean); break;
        case PARAM_TABLE: push_params_table(L, entry->value.table, entry->key); break;
        }
        lua_setfield(L, globals, entry->key);
    }

    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, unknown_global);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, globals);

    lua_newtable(L); /* _ENV of every chunk: empty, reads fall through to the globals */
    lua_createtable(L, 0, 3);
    lua_pushvalue(L, globals);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, assign_global);
    lua_setfield(L, -2, "__newindex");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_env_key);

    lua_pushcfunction(L, host_emit);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_emit_key);
    lua_pushcfunction(L, host_value);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_value_key);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_chunks_key);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_modules_key);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, leave_file);
    lua_setfield(L, -2, "__close");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &registry_guard_key);

    /* Defence in depth: empty the real global table, which nothing in the sandbox can
     * reach anyway (every chunk's _ENV is replaced before it runs). */
    lua_pushnil(L);
    while (lua_next(L, real_globals)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, real_globals);
    }
    return 0;
}

/* Protected: render the entry template (argument 1: its file, light userdata). */
static int run_entry(lua_State *L) {
    const moegen_template_file *file = lua_touserdata(L, 1);
    render_file(L, file);
    return 0;
}

/* ---- Rendering ------------------------------------------------------------------------------ */

static moegen_status check_params(const moegen_params *params, moegen_error *err) {
    if (!params) return MOEGEN_OK;
    for (size_t i = 0; i < params->count; i++) {
        const char *key = params->entries[i].key;
        if (!is_identifier(key, strlen(key)) || in_word_list(key, lua_keywords))
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "template parameter '%s' is not a Lua name", key);
        if (in_word_list(key, sandbox_global_names))
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "template parameter '%s' collides with a built-in name", key);
    }
    if (params_depth(params, MAX_PARAMS_DEPTH + 1) > MAX_PARAMS_DEPTH)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "template parameters nest deeper than %d tables", MAX_PARAMS_DEPTH);
    return MOEGEN_OK;
}

/* Turn the outcome of a render into a status. A limit that was hit wins over whatever
 * the template did afterwards (it may have caught the error). */
static moegen_status render_outcome(const render_context *context, const char *entry_path,
                                    int lua_status, const char *message, moegen_error *err) {
    if (context->host_out_of_memory)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "%s: out of memory while rendering",
                                entry_path);
    const char *where = context->limit_location[0] ? context->limit_location : entry_path;
    switch (context->first_limit) {
    case LIMIT_INSTRUCTIONS:
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0,
                                "%s: instruction limit exceeded (%" PRIu64 " instructions)", where,
                                context->max_instructions);
    case LIMIT_MEMORY:
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0,
                                "%s: memory limit exceeded (%zu bytes)", where,
                                context->max_memory_bytes);
    case LIMIT_OUTPUT:
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0,
                                "%s: output limit exceeded (%zu bytes)", where,
                                context->max_output_bytes);
    case LIMIT_NONE: break;
    }
    if (lua_status == LUA_OK) return MOEGEN_OK;
    if (!message) message = "unknown error";
    if (has_location_prefix(message))
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0, "%s", message);
    return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0, "%s: %s", entry_path, message);
}

moegen_status moegen_template_render(const moegen_template_set *set, const char *entry_path,
                                     const moegen_params *params,
                                     const moegen_render_limits *limits, char **out,
                                     size_t *out_len, moegen_error *err) {
    return moegen_template_render_mapped(set, entry_path, params, limits, out, out_len, NULL, NULL, err);
}

static moegen_status render_mapped(const moegen_template_set *set, const char *entry_path,
                                            const moegen_params *params,
                                            const moegen_render_limits *limits, char **out,
                                            size_t *out_len, moegen_line_origin **origins,
                                            size_t *origin_count, moegen_error *err) {
    moegen_error_clear(err);
    if (out) *out = NULL;
    if (out_len) *out_len = 0;
    if (origins) *origins = NULL;
    if (origin_count) *origin_count = 0;
    if (!set || !entry_path || !out || !out_len || (set->count && !set->files))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "moegen_template_render: NULL argument");
    const moegen_template_file *entry = moegen_template_set_find(set, entry_path);
    if (!entry || !has_suffix(entry_path, ".tpl"))
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0, "template not found: %s", entry_path);
    moegen_status status = check_params(params, err);
    if (status != MOEGEN_OK) return status;

    render_context context;
    memset(&context, 0, sizeof context);
    context.set = set;
    context.want_origins = origins != NULL && origin_count != NULL;
    context.max_memory_bytes =
        limits && limits->max_memory_bytes ? limits->max_memory_bytes : DEFAULT_MAX_MEMORY_BYTES;
    context.max_instructions =
        limits && limits->max_instructions ? limits->max_instructions : DEFAULT_MAX_INSTRUCTIONS;
    context.max_output_bytes =
        limits && limits->max_output_bytes ? limits->max_output_bytes : DEFAULT_MAX_OUTPUT_BYTES;
    context.hook_interval = context.max_instructions < HOOK_INTERVAL_INSTRUCTIONS
                                ? (int)context.max_instructions
                                : HOOK_INTERVAL_INSTRUCTIONS;

    lua_State *L = lua_newstate(budget_allocate, &context);
    if (!L) {
        if (context.memory_exhausted)
            return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0,
                                    "%s: memory limit exceeded (%zu bytes) creating the Lua state",
                                    entry_path, context.max_memory_bytes);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                "%s: out of memory creating the Lua state", entry_path);
    }
    lua_pushcfunction(L, build_sandbox);
    lua_pushlightuserdata(L, (void *)params);
    int lua_status = lua_pcall(L, 1, 0, 0);
    if (lua_status == LUA_OK) {
        context.lua = L;
        lua_sethook(L, count_hook, LUA_MASKCOUNT, context.hook_interval);
        lua_pushcfunction(L, format_error);
        lua_pushcfunction(L, run_entry);
        lua_pushlightuserdata(L, (void *)entry);
        lua_status = lua_pcall(L, 1, 0, 1);
    }
    /* Only read a string error value: converting anything else could allocate outside
     * protected mode. */
    const char *message =
        lua_status != LUA_OK && lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    status = render_outcome(&context, entry_path, lua_status, message, err);
    context.lua = NULL;
    lua_close(L);
    if (status == MOEGEN_OK && !context.output) {
        context.output = malloc(1);
        if (!context.output)
            status =
                moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "%s: out of memory", entry_path);
    }
    if (status != MOEGEN_OK) {
        free(context.output);
        free(context.origins);
        return status;
    }
    context.output[context.output_length] = '\0'; /* capacity always exceeds length */
    *out = context.output;
    *out_len = context.output_length;
    if (context.want_origins) {
        *origins = context.origins;
        *origin_count = context.origin_count;
    } else {
        free(context.origins);
    }
    return MOEGEN_OK;
}

/* The public entry point runs in the C locale (gen/c_locale.h). */
moegen_status moegen_template_render_mapped(const moegen_template_set *set, const char *entry_path,
                                            const moegen_params *params,
                                            const moegen_render_limits *limits, char **out,
                                            size_t *out_len, moegen_line_origin **origins,
                                            size_t *origin_count, moegen_error *err) {
    moegen_c_locale_scope scope;
    moegen_c_locale_enter(&scope);
    moegen_status result = render_mapped(set, entry_path, params, limits, out, out_len, origins, origin_count, err);
    moegen_c_locale_leave(&scope);
    return result;
}
