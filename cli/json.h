/* json.h — a small strict JSON reader (RFC 8259) for `moegen import-hf`, which reads
 * Hugging Face config.json files.
 *
 * What it accepts: one JSON value (objects, arrays, strings, numbers, true, false, null)
 * surrounded by optional whitespace (space, tab, LF, CR), in UTF-8, with an optional
 * leading byte order mark. Strings may hold every escape JSON has (\" \\ \/ \b \f \n \r \t
 * and \uXXXX, surrogate pairs included); they are decoded to UTF-8.
 *
 * What it refuses, each with MOEGEN_ERR_SPEC and a message "<path>:<line>:<col>: <what>"
 * (1-based line and column; the column counts characters, not bytes): invalid UTF-8, a
 * control character inside a string, an unknown escape, a lone or reversed surrogate,
 * \u0000 (C strings cannot hold it), a number outside JSON's grammar (leading zeros, a
 * '+' sign, '.5', '1.', hex, NaN, Infinity: Python's json module writes the last two for
 * non-finite floats, but they are not JSON), a number that overflows a double, comments,
 * trailing commas, single quotes, unquoted keys, a duplicate key in one object (the
 * message names the line of the first), anything after the value, nesting deeper than
 * MOEGEN_JSON_MAX_DEPTH and input larger than MOEGEN_JSON_MAX_BYTES.
 *
 * Every value keeps the line and column where it starts, and every object member the
 * line and column of its key, so that callers can point at the offending value.
 * Numbers are read in the C locale whatever the host program set.
 */
#ifndef MOEGEN_CLI_JSON_H
#define MOEGEN_CLI_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOEGEN_JSON_MAX_BYTES (16u << 20) /* 16 MiB: config.json files are a few KiB */
#define MOEGEN_JSON_MAX_DEPTH 64          /* nested arrays and objects, the top level included */

typedef enum {
    MOEGEN_JSON_NULL = 0,
    MOEGEN_JSON_BOOL,
    MOEGEN_JSON_NUMBER,
    MOEGEN_JSON_STRING,
    MOEGEN_JSON_ARRAY,
    MOEGEN_JSON_OBJECT
} moegen_json_type;

typedef struct moegen_json moegen_json;

/* One member of an object: its key (decoded, NUL-terminated) and where the key starts. */
typedef struct moegen_json_member {
    char *key;
    int line, col;
    moegen_json *value;
} moegen_json_member;

struct moegen_json {
    moegen_json_type type;
    int line, col;        /* where the value starts */
    int boolean;          /* BOOL: 0 or 1 */
    double number;        /* NUMBER: the value, read with strtod */
    int is_integer;       /* NUMBER: written without fraction or exponent and fits int64 */
    int64_t integer;      /* NUMBER: the value when is_integer */
    char *text;           /* NUMBER: the literal as written; STRING: the decoded string */
    size_t length;        /* STRING: bytes in text (no NUL inside: \u0000 is refused) */
    size_t count;         /* ARRAY: items; OBJECT: members */
    moegen_json **items;  /* ARRAY */
    moegen_json_member *members; /* OBJECT, in the order written */
};

/* Parse `len` bytes of `text` (need not be NUL-terminated). `display_path` names the input
 * in messages. On success *out is the root value (free with moegen_json_free). */
moegen_status moegen_json_parse(const char *text, size_t len, const char *display_path, moegen_json **out,
                                moegen_error *err);

/* Read a regular file (at most MOEGEN_JSON_MAX_BYTES) and parse it. A missing file, a
 * directory, a FIFO or a device gives MOEGEN_ERR_IO with "<path>: <reason>". */
moegen_status moegen_json_load_file(const char *path, moegen_json **out, moegen_error *err);

void moegen_json_free(moegen_json *value);

/* The value of `key` in an object, or NULL when `object` is not an object or has no such key. */
const moegen_json *moegen_json_get(const moegen_json *object, const char *key);

/* "null", "a boolean", "a number", "a string", "an array", "an object". */
const char *moegen_json_type_name(moegen_json_type type);

#ifdef __cplusplus
}
#endif
#endif
