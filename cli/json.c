/* json.c — the strict JSON reader behind `moegen import-hf` (see json.h for what it
 * accepts and refuses).
 *
 * A recursive-descent parser over a byte range. The cursor keeps the line and column of
 * the next byte (columns count UTF-8 characters), and every error is reported where it
 * was found as "<path>:<line>:<col>: <message>". Nothing is read past `end`; recursion is
 * bounded by MOEGEN_JSON_MAX_DEPTH. Each value is a heap node; a node is attached to its
 * parent only once it is complete, so that freeing the root after an error frees
 * everything that was built.
 */
#define _POSIX_C_SOURCE 200809L

#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "c_locale.h"

typedef struct parser {
    const unsigned char *cursor, *end;
    int line, col;
    const char *path;
    moegen_error *err;
    moegen_status status; /* MOEGEN_OK until the first error */
} parser;

/* ---- errors ------------------------------------------------------------------------ */

static void fail_at(parser *ps, int line, int col, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void fail_at(parser *ps, int line, int col, const char *fmt, ...) {
    char message[MOEGEN_ERROR_MESSAGE_BYTES];
    va_list ap;
    if (ps->status != MOEGEN_OK) return; /* keep the first error */
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    ps->status = moegen_error_set(ps->err, MOEGEN_ERR_SPEC, 0, "%s:%d:%d: %s", ps->path, line, col, message);
}

static void fail_no_memory(parser *ps) {
    if (ps->status != MOEGEN_OK) return;
    ps->status = moegen_error_set(ps->err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory reading JSON", ps->path);
}

/* A short description of the byte at the cursor for "unexpected ..." messages. */
static void describe_next(const parser *ps, char *out, size_t out_size) {
    if (ps->cursor >= ps->end) {
        snprintf(out, out_size, "end of input");
        return;
    }
    unsigned char c = *ps->cursor;
    if (c >= 0x21 && c < 0x7f)
        snprintf(out, out_size, "'%c'", c);
    else if (c == ' ')
        snprintf(out, out_size, "a space");
    else
        snprintf(out, out_size, "byte 0x%02x", c);
}

static void fail_unexpected(parser *ps, const char *wanted) {
    char what[32];
    describe_next(ps, what, sizeof what);
    fail_at(ps, ps->line, ps->col, "unexpected %s: expected %s", what, wanted);
}

/* ---- cursor --------------------------------------------------------------------------- */

/* Consume one byte, keeping line and column: LF (or a CR not followed by LF) ends a
 * line, and UTF-8 continuation bytes do not start a new column. */
static void advance(parser *ps) {
    unsigned char c = *ps->cursor++;
    if (c == '\n' || (c == '\r' && (ps->cursor >= ps->end || *ps->cursor != '\n'))) {
        ps->line++;
        ps->col = 1;
    } else if ((c & 0xc0) != 0x80) {
        ps->col++;
    }
}

static void skip_whitespace(parser *ps) {
    while (ps->cursor < ps->end &&
           (*ps->cursor == ' ' || *ps->cursor == '\t' || *ps->cursor == '\n' || *ps->cursor == '\r'))
        advance(ps);
}

static int at(const parser *ps, char c) {
    return ps->cursor < ps->end && *ps->cursor == (unsigned char)c;
}

/* ---- nodes ------------------------------------------------------------------------------ */

void moegen_json_free(moegen_json *value) {
    if (!value) return;
    if (value->type == MOEGEN_JSON_ARRAY)
        for (size_t i = 0; i < value->count; i++) moegen_json_free(value->items[i]);
    if (value->type == MOEGEN_JSON_OBJECT)
        for (size_t i = 0; i < value->count; i++) {
            free(value->members[i].key);
            moegen_json_free(value->members[i].value);
        }
    free(value->items);
    free(value->members);
    free(value->text);
    free(value);
}

static moegen_json *new_node(parser *ps, moegen_json_type type, int line, int col) {
    moegen_json *node = calloc(1, sizeof *node);
    if (!node) {
        fail_no_memory(ps);
        return NULL;
    }
    node->type = type;
    node->line = line;
    node->col = col;
    return node;
}

/* ---- strings ------------------------------------------------------------------------------ */

typedef struct byte_buffer {
    char *data;
    size_t length, capacity;
} byte_buffer;

static int buffer_push(parser *ps, byte_buffer *buffer, const char *bytes, size_t n) {
    if (buffer->length + n + 1 > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 32;
        while (buffer->length + n + 1 > capacity) capacity *= 2;
        char *grown = realloc(buffer->data, capacity);
        if (!grown) {
            fail_no_memory(ps);
            return -1;
        }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->length, bytes, n);
    buffer->length += n;
    buffer->data[buffer->length] = '\0';
    return 0;
}

static int push_code_point(parser *ps, byte_buffer *buffer, unsigned long cp) {
    char bytes[4];
    size_t n;
    if (cp < 0x80) {
        bytes[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        bytes[0] = (char)(0xc0 | (cp >> 6));
        bytes[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        bytes[0] = (char)(0xe0 | (cp >> 12));
        bytes[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        bytes[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        bytes[0] = (char)(0xf0 | (cp >> 18));
        bytes[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        bytes[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        bytes[3] = (char)(0x80 | (cp & 0x3f));
        n = 4;
    }
    return buffer_push(ps, buffer, bytes, n);
}

/* Four hex digits after "\u"; -1 (error set) if they are not there. */
static long read_hex4(parser *ps) {
    long value = 0;
    for (int i = 0; i < 4; i++) {
        if (ps->cursor >= ps->end || !strchr("0123456789abcdefABCDEF", *ps->cursor) || *ps->cursor == '\0') {
            char what[32];
            describe_next(ps, what, sizeof what);
            fail_at(ps, ps->line, ps->col, "bad \\u escape: %s where a hex digit belongs (\\u takes four)", what);
            return -1;
        }
        unsigned char c = *ps->cursor;
        value = value * 16 + (c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
        advance(ps);
    }
    return value;
}

/* One escape sequence; the cursor is on the backslash. */
static int read_escape(parser *ps, byte_buffer *buffer) {
    int line = ps->line, col = ps->col;
    advance(ps); /* the backslash */
    if (ps->cursor >= ps->end) {
        fail_at(ps, line, col, "unterminated string (the input ends inside an escape)");
        return -1;
    }
    unsigned char c = *ps->cursor;
    const char *simple = "\"\"\\\\//b\bf\fn\nr\rt\t";
    for (const char *s = simple; *s; s += 2)
        if (c == (unsigned char)s[0]) {
            advance(ps);
            return buffer_push(ps, buffer, s + 1, 1);
        }
    if (c != 'u') {
        if (c >= 0x21 && c < 0x7f)
            fail_at(ps, line, col, "unknown escape '\\%c' (JSON has \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)", c);
        else
            fail_at(ps, line, col, "unknown escape: a backslash before byte 0x%02x", c);
        return -1;
    }
    advance(ps);
    long high = read_hex4(ps);
    if (high < 0) return -1;
    unsigned long cp = (unsigned long)high;
    if (high == 0) {
        fail_at(ps, line, col, "\\u0000 in a string is not supported");
        return -1;
    }
    if (high >= 0xdc00 && high <= 0xdfff) {
        fail_at(ps, line, col, "lone low surrogate \\u%04lX (a low surrogate must follow a high one)",
                (unsigned long)high);
        return -1;
    }
    if (high >= 0xd800 && high <= 0xdbff) {
        if (ps->end - ps->cursor < 2 || ps->cursor[0] != '\\' || ps->cursor[1] != 'u') {
            fail_at(ps, line, col, "lone high surrogate \\u%04lX (a \\uDC00-\\uDFFF escape must follow it)",
                    (unsigned long)high);
            return -1;
        }
        advance(ps);
        advance(ps);
        long low = read_hex4(ps);
        if (low < 0) return -1;
        if (low < 0xdc00 || low > 0xdfff) {
            fail_at(ps, line, col, "high surrogate \\u%04lX followed by \\u%04lX, which is not a low surrogate",
                    (unsigned long)high, (unsigned long)low);
            return -1;
        }
        cp = 0x10000 + (((unsigned long)high - 0xd800) << 10) + ((unsigned long)low - 0xdc00);
    }
    return push_code_point(ps, buffer, cp);
}

/* One raw UTF-8 character inside a string (the cursor is on its first byte, >= 0x80). */
static int read_utf8(parser *ps, byte_buffer *buffer) {
    const unsigned char *s = ps->cursor;
    size_t available = (size_t)(ps->end - s);
    size_t n;
    unsigned long cp, min;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        n = 2;
        cp = s[0] & 0x1f;
        min = 0x80;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        n = 3;
        cp = s[0] & 0x0f;
        min = 0x800;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        n = 4;
        cp = s[0] & 0x07;
        min = 0x10000;
    } else {
        fail_at(ps, ps->line, ps->col, "invalid UTF-8 (byte 0x%02x cannot start a character)", s[0]);
        return -1;
    }
    if (available < n) {
        fail_at(ps, ps->line, ps->col, "invalid UTF-8 (the input ends inside a character)");
        return -1;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            fail_at(ps, ps->line, ps->col, "invalid UTF-8 (byte 0x%02x is not a continuation byte)", s[i]);
            return -1;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
        fail_at(ps, ps->line, ps->col, "invalid UTF-8 (an overlong form, a surrogate or a code point past U+10FFFF)");
        return -1;
    }
    if (buffer_push(ps, buffer, (const char *)s, n) != 0) return -1;
    for (size_t i = 0; i < n; i++) advance(ps);
    return 0;
}

/* A string; the cursor is on the opening quote. Returns the decoded, NUL-terminated text
 * (malloc'd) and its length, or NULL on error. */
static char *read_string(parser *ps, size_t *length) {
    int line = ps->line, col = ps->col;
    byte_buffer buffer = {0};
    advance(ps); /* the opening quote */
    if (buffer_push(ps, &buffer, "", 0) != 0) return NULL;
    for (;;) {
        if (ps->cursor >= ps->end) {
            fail_at(ps, line, col, "unterminated string (no closing '\"' before the end of the input)");
            break;
        }
        unsigned char c = *ps->cursor;
        if (c == '"') {
            advance(ps);
            *length = buffer.length;
            return buffer.data;
        }
        if (c == '\\') {
            if (read_escape(ps, &buffer) != 0) break;
        } else if (c < 0x20) {
            fail_at(ps, ps->line, ps->col,
                    c == '\n' ? "unterminated string (a raw line break inside a string: write \\n)"
                              : "control character 0x%02x inside a string (write it as an escape)",
                    c);
            break;
        } else if (c >= 0x80) {
            if (read_utf8(ps, &buffer) != 0) break;
        } else {
            if (buffer_push(ps, &buffer, (const char *)&c, 1) != 0) break;
            advance(ps);
        }
    }
    free(buffer.data);
    return NULL;
}

/* ---- numbers ------------------------------------------------------------------------------ */

static int is_digit(const parser *ps) {
    return ps->cursor < ps->end && *ps->cursor >= '0' && *ps->cursor <= '9';
}

static moegen_json *read_number(parser *ps) {
    int line = ps->line, col = ps->col;
    const unsigned char *start = ps->cursor;
    int integral = 1;
    if (at(ps, '-')) advance(ps);
    if (!is_digit(ps)) {
        if (ps->cursor < ps->end && (*ps->cursor == 'I' || *ps->cursor == 'N'))
            fail_at(ps, line, col, "-Infinity is not JSON (Python's json module writes it for float('-inf'))");
        else
            fail_unexpected(ps, "a digit after '-'");
        return NULL;
    }
    if (at(ps, '0')) {
        advance(ps);
        if (is_digit(ps)) {
            fail_at(ps, line, col, "a number with a leading zero is not JSON");
            return NULL;
        }
    } else {
        while (is_digit(ps)) advance(ps);
    }
    if (at(ps, '.')) {
        integral = 0;
        advance(ps);
        if (!is_digit(ps)) {
            fail_unexpected(ps, "a digit after the decimal point");
            return NULL;
        }
        while (is_digit(ps)) advance(ps);
    }
    if (at(ps, 'e') || at(ps, 'E')) {
        integral = 0;
        advance(ps);
        if (at(ps, '+') || at(ps, '-')) advance(ps);
        if (!is_digit(ps)) {
            fail_unexpected(ps, "a digit in the exponent");
            return NULL;
        }
        while (is_digit(ps)) advance(ps);
    }
    size_t n = (size_t)(ps->cursor - start);
    moegen_json *node = new_node(ps, MOEGEN_JSON_NUMBER, line, col);
    if (!node) return NULL;
    node->text = malloc(n + 1);
    if (!node->text) {
        fail_no_memory(ps);
        moegen_json_free(node);
        return NULL;
    }
    memcpy(node->text, start, n);
    node->text[n] = '\0';
    node->number = strtod(node->text, NULL);
    if (isinf(node->number)) {
        fail_at(ps, line, col, "number %.40s%s is too large for a double", node->text, n > 40 ? "..." : "");
        moegen_json_free(node);
        return NULL;
    }
    if (integral) { /* exact int64 when it fits */
        const char *digits = node->text + (node->text[0] == '-');
        int negative = node->text[0] == '-';
        uint64_t magnitude = 0, limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        int fits = 1;
        for (const char *d = digits; *d; d++) {
            uint64_t digit = (uint64_t)(*d - '0');
            if (magnitude > (limit - digit) / 10) {
                fits = 0;
                break;
            }
            magnitude = magnitude * 10 + digit;
        }
        if (fits) {
            node->is_integer = 1;
            node->integer = negative ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
        }
    }
    return node;
}

/* ---- values ------------------------------------------------------------------------------- */

static moegen_json *read_value(parser *ps, int depth);

/* The word at the cursor matches `word` entirely (and is not the start of a longer word). */
static int match_word(const parser *ps, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->cursor) < n || memcmp(ps->cursor, word, n) != 0) return 0;
    if ((size_t)(ps->end - ps->cursor) > n) {
        unsigned char next = ps->cursor[n];
        if ((next >= 'a' && next <= 'z') || (next >= 'A' && next <= 'Z') || (next >= '0' && next <= '9') ||
            next == '_')
            return 0;
    }
    return 1;
}

static moegen_json *read_literal(parser *ps) {
    static const struct {
        const char *word;
        moegen_json_type type;
        int boolean;
    } literals[] = {{"true", MOEGEN_JSON_BOOL, 1}, {"false", MOEGEN_JSON_BOOL, 0}, {"null", MOEGEN_JSON_NULL, 0}};
    int line = ps->line, col = ps->col;
    for (size_t i = 0; i < sizeof literals / sizeof literals[0]; i++)
        if (match_word(ps, literals[i].word)) {
            moegen_json *node = new_node(ps, literals[i].type, line, col);
            if (!node) return NULL;
            node->boolean = literals[i].boolean;
            for (size_t j = 0; literals[i].word[j]; j++) advance(ps);
            return node;
        }
    if (match_word(ps, "NaN") || match_word(ps, "Infinity"))
        fail_at(ps, line, col, "%s is not JSON (Python's json module writes it for a non-finite float)",
                *ps->cursor == 'N' ? "NaN" : "Infinity");
    else if (match_word(ps, "True") || match_word(ps, "False") || match_word(ps, "None"))
        fail_at(ps, line, col, "%s is Python, not JSON (JSON writes true, false and null)",
                *ps->cursor == 'T' ? "True" : *ps->cursor == 'F' ? "False" : "None");
    else
        fail_unexpected(ps, "a value (an object, array, string, number, true, false or null)");
    return NULL;
}

static int array_push(parser *ps, moegen_json *array, moegen_json *item, size_t *capacity) {
    if (array->count == *capacity) {
        size_t grown_capacity = *capacity ? *capacity * 2 : 8;
        moegen_json **grown = realloc(array->items, grown_capacity * sizeof *grown);
        if (!grown) {
            fail_no_memory(ps);
            return -1;
        }
        array->items = grown;
        *capacity = grown_capacity;
    }
    array->items[array->count++] = item;
    return 0;
}

static moegen_json *read_array(parser *ps, int depth) {
    moegen_json *node = new_node(ps, MOEGEN_JSON_ARRAY, ps->line, ps->col);
    size_t capacity = 0;
    if (!node) return NULL;
    advance(ps); /* '[' */
    skip_whitespace(ps);
    if (at(ps, ']')) {
        advance(ps);
        return node;
    }
    for (;;) {
        moegen_json *item = read_value(ps, depth);
        if (!item) break;
        if (array_push(ps, node, item, &capacity) != 0) {
            moegen_json_free(item);
            break;
        }
        skip_whitespace(ps);
        if (at(ps, ']')) {
            advance(ps);
            return node;
        }
        if (!at(ps, ',')) {
            fail_unexpected(ps, "',' or ']' after an array item");
            break;
        }
        advance(ps);
        skip_whitespace(ps);
        if (at(ps, ']')) {
            fail_at(ps, ps->line, ps->col, "trailing comma before ']' is not JSON");
            break;
        }
    }
    moegen_json_free(node);
    return NULL;
}

/* Sorting members by key (then by position) finds duplicate keys in n log n. */
static int compare_members(const void *a, const void *b) {
    const moegen_json_member *const *x = a, *const *y = b;
    int order = strcmp((*x)->key, (*y)->key);
    if (order) return order;
    return (*x < *y) ? -1 : (*x > *y);
}

/* 0 when every key of `object` is distinct; else reports the earliest repeated key. */
static int check_duplicate_keys(parser *ps, moegen_json *object) {
    if (object->count < 2) return 0;
    const moegen_json_member **sorted = malloc(object->count * sizeof *sorted);
    if (!sorted) {
        fail_no_memory(ps);
        return -1;
    }
    for (size_t i = 0; i < object->count; i++) sorted[i] = &object->members[i];
    qsort(sorted, object->count, sizeof *sorted, compare_members);
    const moegen_json_member *repeat = NULL, *first = NULL;
    for (size_t i = 1; i < object->count; i++)
        if (!strcmp(sorted[i]->key, sorted[i - 1]->key) && (i < 2 || strcmp(sorted[i]->key, sorted[i - 2]->key)) &&
            (!repeat || sorted[i] < repeat)) {
            repeat = sorted[i]; /* the second occurrence of this key */
            first = sorted[i - 1];
        }
    free(sorted);
    if (!repeat) return 0;
    fail_at(ps, repeat->line, repeat->col, "duplicate key \"%.200s\" (first defined at line %d)", repeat->key,
            first->line);
    return -1;
}

static moegen_json *read_object(parser *ps, int depth) {
    moegen_json *node = new_node(ps, MOEGEN_JSON_OBJECT, ps->line, ps->col);
    size_t capacity = 0;
    if (!node) return NULL;
    advance(ps); /* '{' */
    skip_whitespace(ps);
    if (at(ps, '}')) {
        advance(ps);
        return node;
    }
    for (;;) {
        if (!at(ps, '"')) {
            if (at(ps, '\''))
                fail_at(ps, ps->line, ps->col, "single-quoted key: JSON keys are in double quotes");
            else if (at(ps, '/'))
                fail_at(ps, ps->line, ps->col, "comments are not JSON");
            else
                fail_unexpected(ps, "a key in double quotes");
            break;
        }
        int key_line = ps->line, key_col = ps->col;
        size_t key_length;
        char *key = read_string(ps, &key_length);
        if (!key) break;
        skip_whitespace(ps);
        if (!at(ps, ':')) {
            free(key);
            fail_unexpected(ps, "':' after the key");
            break;
        }
        advance(ps);
        moegen_json *value = read_value(ps, depth);
        if (!value) {
            free(key);
            break;
        }
        if (node->count == capacity) {
            size_t grown_capacity = capacity ? capacity * 2 : 8;
            moegen_json_member *grown = realloc(node->members, grown_capacity * sizeof *grown);
            if (!grown) {
                free(key);
                moegen_json_free(value);
                fail_no_memory(ps);
                break;
            }
            node->members = grown;
            capacity = grown_capacity;
        }
        node->members[node->count++] = (moegen_json_member){key, key_line, key_col, value};
        skip_whitespace(ps);
        if (at(ps, '}')) {
            advance(ps);
            if (check_duplicate_keys(ps, node) != 0) break;
            return node;
        }
        if (!at(ps, ',')) {
            fail_unexpected(ps, "',' or '}' after an object member");
            break;
        }
        advance(ps);
        skip_whitespace(ps);
        if (at(ps, '}')) {
            fail_at(ps, ps->line, ps->col, "trailing comma before '}' is not JSON");
            break;
        }
    }
    moegen_json_free(node);
    return NULL;
}

static moegen_json *read_value(parser *ps, int depth) {
    skip_whitespace(ps);
    if (ps->cursor >= ps->end) {
        fail_unexpected(ps, "a value");
        return NULL;
    }
    unsigned char c = *ps->cursor;
    if (c == '{' || c == '[') {
        if (depth + 1 > MOEGEN_JSON_MAX_DEPTH) {
            fail_at(ps, ps->line, ps->col, "nesting deeper than %d arrays and objects", MOEGEN_JSON_MAX_DEPTH);
            return NULL;
        }
        return c == '{' ? read_object(ps, depth + 1) : read_array(ps, depth + 1);
    }
    if (c == '"') {
        int line = ps->line, col = ps->col;
        size_t length;
        char *text = read_string(ps, &length);
        if (!text) return NULL;
        moegen_json *node = new_node(ps, MOEGEN_JSON_STRING, line, col);
        if (!node) {
            free(text);
            return NULL;
        }
        node->text = text;
        node->length = length;
        return node;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return read_number(ps);
    if (c == '\'') {
        fail_at(ps, ps->line, ps->col, "single-quoted string: JSON strings are in double quotes");
        return NULL;
    }
    if (c == '+' || c == '.') {
        fail_at(ps, ps->line, ps->col, "a number starting with '%c' is not JSON", c);
        return NULL;
    }
    if (c == '/') {
        fail_at(ps, ps->line, ps->col, "comments are not JSON");
        return NULL;
    }
    return read_literal(ps);
}

/* ---- public ----------------------------------------------------------------------------------- */

moegen_status moegen_json_parse(const char *text, size_t len, const char *display_path, moegen_json **out,
                                moegen_error *err) {
    if (!out || (!text && len))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_json_parse: NULL %s",
                                out ? "text" : "output");
    *out = NULL;
    if (!display_path) display_path = "<string>";
    if (len > MOEGEN_JSON_MAX_BYTES)
        return moegen_error_set(err, MOEGEN_ERR_SPEC, 0, "%s: %zu bytes is over the %u-byte limit for a JSON file",
                                display_path, len, MOEGEN_JSON_MAX_BYTES);
    parser ps = {.cursor = (const unsigned char *)text, .end = (const unsigned char *)text + len, .line = 1,
                 .col = 1, .path = display_path, .err = err, .status = MOEGEN_OK};
    if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) ps.cursor += 3; /* a byte order mark */
    skip_whitespace(&ps);
    if (ps.cursor >= ps.end)
        return moegen_error_set(err, MOEGEN_ERR_SPEC, 0, "%s:%d:%d: empty input: expected a JSON value",
                                display_path, ps.line, ps.col);
    moegen_c_locale_scope locale;
    moegen_c_locale_enter(&locale); /* strtod reads '.' whatever the host program's locale */
    moegen_json *root = read_value(&ps, 0);
    moegen_c_locale_leave(&locale);
    if (root) {
        skip_whitespace(&ps);
        if (ps.cursor < ps.end) {
            fail_unexpected(&ps, "the end of the input after the JSON value");
            moegen_json_free(root);
            root = NULL;
        }
    }
    if (!root) return ps.status;
    *out = root;
    moegen_error_clear(err);
    return MOEGEN_OK;
}

moegen_status moegen_json_load_file(const char *path, moegen_json **out, moegen_error *err) {
    if (!path || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "moegen_json_load_file: NULL %s",
                                path ? "output" : "path");
    *out = NULL;
    /* Non-blocking so that a FIFO is refused below instead of waiting for a writer. */
    int descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat info;
    if (descriptor < 0 || fstat(descriptor, &info) != 0) {
        moegen_status status = moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
        if (descriptor >= 0) close(descriptor);
        return status;
    }
    if (!S_ISREG(info.st_mode)) {
        close(descriptor);
        return moegen_error_set(err, MOEGEN_ERR_IO, S_ISDIR(info.st_mode) ? EISDIR : EINVAL, "%s: %s", path,
                                S_ISDIR(info.st_mode) ? strerror(EISDIR) : "not a regular file");
    }
    if ((uintmax_t)info.st_size > MOEGEN_JSON_MAX_BYTES) {
        close(descriptor);
        return moegen_error_set(err, MOEGEN_ERR_IO, EFBIG, "%s: %jd bytes is over the %u-byte limit for a JSON file",
                                path, (intmax_t)info.st_size, MOEGEN_JSON_MAX_BYTES);
    }
    size_t capacity = (size_t)MOEGEN_JSON_MAX_BYTES + 1, used = 0;
    size_t allocated = (size_t)info.st_size + 1 < capacity ? (size_t)info.st_size + 1 : capacity;
    char *buffer = malloc(allocated);
    if (!buffer) {
        close(descriptor);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory reading JSON", path);
    }
    for (;;) { /* the file may grow while it is read: read up to the limit */
        if (used == allocated) {
            if (allocated == capacity) break;
            size_t grown_size = allocated * 2 < capacity ? allocated * 2 : capacity;
            char *grown = realloc(buffer, grown_size);
            if (!grown) {
                free(buffer);
                close(descriptor);
                return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory reading JSON", path);
            }
            buffer = grown;
            allocated = grown_size;
        }
        ssize_t got = read(descriptor, buffer + used, allocated - used);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            moegen_status status = moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", path, strerror(errno));
            free(buffer);
            close(descriptor);
            return status;
        }
        if (got == 0) break;
        used += (size_t)got;
    }
    close(descriptor);
    moegen_status status = moegen_json_parse(buffer, used, path, out, err);
    free(buffer);
    return status;
}

const moegen_json *moegen_json_get(const moegen_json *object, const char *key) {
    if (!object || object->type != MOEGEN_JSON_OBJECT || !key) return NULL;
    for (size_t i = 0; i < object->count; i++)
        if (!strcmp(object->members[i].key, key)) return object->members[i].value;
    return NULL;
}

const char *moegen_json_type_name(moegen_json_type type) {
    switch (type) {
    case MOEGEN_JSON_NULL: return "null";
    case MOEGEN_JSON_BOOL: return "a boolean";
    case MOEGEN_JSON_NUMBER: return "a number";
    case MOEGEN_JSON_STRING: return "a string";
    case MOEGEN_JSON_ARRAY: return "an array";
    case MOEGEN_JSON_OBJECT: return "an object";
    }
    return "an unknown type";
}
