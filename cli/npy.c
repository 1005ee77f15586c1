/* npy.c — reading and writing NumPy .npy files (see npy.h for the format, what is
 * accepted and what is rejected).
 *
 * Reading is split in three steps that both entry points (a file, a memory image)
 * share: the fixed prefix (magic, version, header length), the header dict, and
 * the data size check against the bytes that are really there. Every length read
 * from the input is checked against the input's size before it is used.
 */
#define _POSIX_C_SOURCE 200809L

#include "npy.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "cli/npy.c reads and writes little-endian data in place: it needs a little-endian host"
#endif

#define MAGIC_BYTES 6
#define ARRAY_ALIGN 64            /* np.save aligns the data to this */
#define GROWTH_AXIS_MAX_DIGITS 21 /* np.save leaves room for the first dim to grow */
#define MAX_HEADER_BYTES (1u << 20)
#define MAX_DESCR_BYTES 64

static const unsigned char npy_magic[MAGIC_BYTES] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

/* ---- dtypes --------------------------------------------------------------------- */

typedef struct {
    const char *type_code; /* descr without its byte-order character */
    size_t size;
} dtype_info;

static const dtype_info dtype_table[] = {
    [MOEGEN_NPY_F4] = {"f4", 4}, [MOEGEN_NPY_F8] = {"f8", 8}, [MOEGEN_NPY_F2] = {"f2", 2},
    [MOEGEN_NPY_U2] = {"u2", 2}, [MOEGEN_NPY_I4] = {"i4", 4}, [MOEGEN_NPY_I8] = {"i8", 8},
};
#define DTYPE_COUNT ((int)(sizeof dtype_table / sizeof dtype_table[0]))

static bool dtype_is_valid(moegen_npy_dtype dtype) {
    return (int)dtype >= 0 && (int)dtype < DTYPE_COUNT;
}

const char *moegen_npy_dtype_descr(moegen_npy_dtype dtype) {
    static const char *const descrs[] = {
        [MOEGEN_NPY_F4] = "<f4", [MOEGEN_NPY_F8] = "<f8", [MOEGEN_NPY_F2] = "<f2",
        [MOEGEN_NPY_U2] = "<u2", [MOEGEN_NPY_I4] = "<i4", [MOEGEN_NPY_I8] = "<i8",
    };
    return dtype_is_valid(dtype) ? descrs[dtype] : "invalid";
}

size_t moegen_npy_dtype_size(moegen_npy_dtype dtype) {
    return dtype_is_valid(dtype) ? dtype_table[dtype].size : 0;
}

/* The dtype whose type code (e.g. "f4") is `code`, or -1. */
static int dtype_from_type_code(const char *code) {
    for (int i = 0; i < DTYPE_COUNT; i++)
        if (strcmp(code, dtype_table[i].type_code) == 0) return i;
    return -1;
}

char *moegen_npy_shape_string(int ndim, const int64_t *shape, char *buffer, size_t buffer_size) {
    if (!buffer || buffer_size == 0) return buffer;
    size_t used = 0;
    buffer[0] = '\0';
#define SHAPE_APPEND(...)                                                                          \
    do {                                                                                           \
        if (used < buffer_size) {                                                                  \
            int written_ = snprintf(buffer + used, buffer_size - used, __VA_ARGS__);               \
            used = written_ < 0 ? buffer_size : used + (size_t)written_;                           \
        }                                                                                          \
    } while (0)
    SHAPE_APPEND("(");
    if (ndim > MOEGEN_NPY_MAX_DIMS) ndim = MOEGEN_NPY_MAX_DIMS;
    for (int i = 0; i < ndim && shape; i++)
        SHAPE_APPEND(i ? ", %" PRId64 : "%" PRId64, shape[i]);
    SHAPE_APPEND(ndim == 1 ? ",)" : ")");
#undef SHAPE_APPEND
    return buffer;
}

/* Product of the dims times the element size, or false if it does not fit a
 * size_t. An array with a zero dim is empty whatever its other dims are. */
static bool data_size(int ndim, const int64_t *shape, size_t item_size, size_t *n_bytes) {
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) {
            *n_bytes = 0;
            return true;
        }
    uint64_t total = item_size;
    for (int i = 0; i < ndim; i++) {
        uint64_t dim = (uint64_t)shape[i];
        if (shape[i] < 0 || total > UINT64_MAX / dim) return false;
        total *= dim;
    }
    if (total > SIZE_MAX || total > (uint64_t)INT64_MAX) return false;
    *n_bytes = (size_t)total;
    return true;
}

/* ---- writing -------------------------------------------------------------------- */

/* Build the prefix, dict and padding exactly as np.save (format version 1.0) does.
 * Returns the header length in bytes (a multiple of ARRAY_ALIGN), or 0 if it does
 * not fit `capacity`. */
static size_t build_header(moegen_npy_dtype dtype, int ndim, const int64_t *shape, char *buffer,
                           size_t capacity) {
    char shape_text[512];
    moegen_npy_shape_string(ndim, shape, shape_text, sizeof shape_text);
    const size_t prefix = MAGIC_BYTES + 2 + 2;
    int count = snprintf(buffer + prefix, capacity - prefix,
                         "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                         moegen_npy_dtype_descr(dtype), shape_text);
    if (count < 0 || (size_t)count >= capacity - prefix) return 0;
    size_t dict_len = (size_t)count;
    if (prefix + dict_len + GROWTH_AXIS_MAX_DIGITS + ARRAY_ALIGN > capacity) return 0;
    if (ndim > 0) {
        char first[32];
        int digits = snprintf(first, sizeof first, "%" PRId64, shape[0]);
        for (int i = digits; i < GROWTH_AXIS_MAX_DIGITS; i++)
            buffer[prefix + dict_len++] = ' ';
    }
    size_t with_newline = dict_len + 1;
    size_t pad = ARRAY_ALIGN - (prefix + with_newline) % ARRAY_ALIGN; /* 1..64, like NumPy */
    size_t header_len = with_newline + pad;
    if (prefix + header_len > capacity || header_len > 0xFFFF) return 0;
    memset(buffer + prefix + dict_len, ' ', pad);
    buffer[prefix + header_len - 1] = '\n';
    memcpy(buffer, npy_magic, MAGIC_BYTES);
    buffer[6] = 1;
    buffer[7] = 0;
    buffer[8] = (char)(header_len & 0xFF);
    buffer[9] = (char)(header_len >> 8);
    return prefix + header_len;
}

static bool write_all(int fd, const void *data, size_t count) {
    const char *cursor = data;
    while (count > 0) {
        size_t chunk = count > ((size_t)1 << 30) ? ((size_t)1 << 30) : count;
        ssize_t written = write(fd, cursor, chunk);
        if (written < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        if (written == 0) {
            errno = EIO;
            return false;
        }
        cursor += written;
        count -= (size_t)written;
    }
    return true;
}

/* fsync the directory holding `path`, so the rename is durable. Best effort. */
static void sync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *directory;
    if (!slash)
        directory = strdup(".");
    else if (slash == path)
        directory = strdup("/");
    else
        directory = strndup(path, (size_t)(slash - path));
    if (!directory) return;
    int fd = open(directory, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(directory);
}

moegen_status moegen_npy_write(const char *path, moegen_npy_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, moegen_error *err) {
    if (!path)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "npy write: path is NULL");
    if (!dtype_is_valid(dtype))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: invalid dtype %d", path,
                                (int)dtype);
    if (ndim < 0 || ndim > MOEGEN_NPY_MAX_DIMS)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: ndim %d is outside 0..%d",
                                path, ndim, MOEGEN_NPY_MAX_DIMS);
    if (ndim > 0 && !shape)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: shape is NULL", path);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0)
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "%s: dimension %d is negative (%" PRId64 ")", path, i,
                                    shape[i]);
    size_t n_bytes;
    if (!data_size(ndim, shape, dtype_table[dtype].size, &n_bytes))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: array size overflows",
                                path);
    if (n_bytes > 0 && !data)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: data is NULL", path);

    char header[1024];
    size_t header_len = build_header(dtype, ndim, shape, header, sizeof header);
    if (header_len == 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: header does not fit",
                                path);

    size_t temporary_capacity = strlen(path) + 32;
    char *temporary_path = malloc(temporary_capacity);
    if (!temporary_path)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory", path);
    snprintf(temporary_path, temporary_capacity, "%s.tmp.%ld", path, (long)getpid());

    moegen_status status = MOEGEN_OK;
    int fd = open(temporary_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        int error_number = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot create %s: %s",
                                  path, temporary_path, strerror(error_number));
        free(temporary_path);
        return status;
    }
    if (!write_all(fd, header, header_len) || (n_bytes > 0 && !write_all(fd, data, n_bytes))) {
        int error_number = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot write: %s", path,
                                  strerror(error_number));
    } else if (fsync(fd) != 0) {
        int error_number = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot fsync: %s", path,
                                  strerror(error_number));
    }
    if (close(fd) != 0 && status == MOEGEN_OK) {
        int error_number = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot close: %s", path,
                                  strerror(error_number));
    }
    if (status == MOEGEN_OK && rename(temporary_path, path) != 0) {
        int error_number = errno;
        status =
            moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot rename %s over it: %s",
                             path, temporary_path, strerror(error_number));
    }
    if (status != MOEGEN_OK)
        unlink(temporary_path);
    else
        sync_parent_dir(path);
    free(temporary_path);
    return status;
}

/* ---- reading: the prefix -------------------------------------------------------- */

/* Bytes of prefix a reader should have before calling parse_prefix: enough for
 * every version. */
#define PREFIX_MAX_BYTES 12

/* Check magic and version and find the header. `prefix_bytes` holds the first `have`
 * bytes of a file of `file_size` bytes (have = min(file_size, PREFIX_MAX_BYTES)).
 * On success *header_offset is where the dict starts and *header_len its length;
 * both are checked to lie within the file. */
static moegen_status parse_prefix(const char *name, const unsigned char *prefix_bytes, size_t have,
                                  uint64_t file_size, size_t *header_offset, size_t *header_len,
                                  moegen_error *err) {
    if (have < MAGIC_BYTES || memcmp(prefix_bytes, npy_magic, MAGIC_BYTES) != 0) {
        if (file_size == 0)
            return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: file is empty, not a .npy file",
                                    name);
        if (have >= MAGIC_BYTES || memcmp(prefix_bytes, npy_magic, have) != 0)
            return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                    "%s: not a .npy file (it does not start with \\x93NUMPY)",
                                    name);
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: file is truncated: %zu bytes, too short for a .npy header",
                                name, have);
    }
    if (have < MAGIC_BYTES + 2)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: file is truncated: %zu bytes, too short for a .npy header",
                                name, have);
    unsigned major = prefix_bytes[6], minor = prefix_bytes[7];
    if ((major != 1 && major != 2 && major != 3) || minor != 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: unsupported .npy format version %u.%u (1.0, 2.0 and 3.0 "
                                "are supported)",
                                name, major, minor);
    size_t length_bytes = major == 1 ? 2 : 4;
    size_t offset = MAGIC_BYTES + 2 + length_bytes;
    if (have < offset)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: file is truncated: %zu bytes, too short for a .npy header",
                                name, have);
    uint64_t length = 0;
    for (size_t i = 0; i < length_bytes; i++)
        length |= (uint64_t)prefix_bytes[8 + i] << (8 * i);
    if (length > file_size - offset)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: header length %" PRIu64 " runs past the end of the file "
                                "(%" PRIu64 " bytes)",
                                name, length, file_size);
    if (length == 0) return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: header is empty", name);
    if (length > MAX_HEADER_BYTES)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: header length %" PRIu64 " is implausibly large (at most %u)",
                                name, length, MAX_HEADER_BYTES);
    *header_offset = offset;
    *header_len = (size_t)length;
    return MOEGEN_OK;
}

/* ---- reading: the header dict --------------------------------------------------- */

typedef struct {
    const char *name;  /* for messages */
    const char *start; /* header text */
    const char *cursor;
    const char *end;
    size_t base; /* file offset of `start`, for messages */
    moegen_error *err;
} dict_parser;

typedef struct {
    moegen_npy_dtype dtype;
    int ndim;
    int64_t shape[MOEGEN_NPY_MAX_DIMS];
} header_info;

static moegen_status syntax_error(dict_parser *parser, const char *what) {
    size_t at = parser->base + (size_t)(parser->cursor - parser->start);
    if (parser->cursor >= parser->end)
        return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                "%s: malformed .npy header: %s, found the end of the header",
                                parser->name, what);
    unsigned char character = (unsigned char)*parser->cursor;
    if (character >= 0x20 && character < 0x7F)
        return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                "%s: malformed .npy header at byte %zu: %s, found '%c'",
                                parser->name, at, what, character);
    return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                            "%s: malformed .npy header at byte %zu: %s, found byte 0x%02x",
                            parser->name, at, what, character);
}

static void skip_space(dict_parser *parser) {
    while (parser->cursor < parser->end && (*parser->cursor == ' ' || *parser->cursor == '\t' ||
                                            *parser->cursor == '\n' || *parser->cursor == '\r'))
        parser->cursor++;
}

/* Consume `c` after optional whitespace. */
static bool accept_char(dict_parser *parser, char character) {
    skip_space(parser);
    if (parser->cursor < parser->end && *parser->cursor == character) {
        parser->cursor++;
        return true;
    }
    return false;
}

/* A quoted string of printable ASCII without escapes, copied into out (cap bytes
 * with the NUL). */
static moegen_status parse_string(dict_parser *parser, char *out, size_t capacity) {
    skip_space(parser);
    if (parser->cursor >= parser->end || (*parser->cursor != '\'' && *parser->cursor != '"'))
        return syntax_error(parser, "expected a quoted string");
    char quote = *parser->cursor++;
    size_t count = 0;
    for (;;) {
        if (parser->cursor >= parser->end) return syntax_error(parser, "unterminated string");
        unsigned char character = (unsigned char)*parser->cursor;
        if (character == (unsigned char)quote) break;
        if (character == '\n') return syntax_error(parser, "unterminated string");
        if (character == '\\') return syntax_error(parser, "escapes in strings are not supported");
        if (character < 0x20 || character >= 0x7F)
            return syntax_error(parser, "expected printable ASCII in a string");
        if (count + 1 >= capacity) return syntax_error(parser, "string too long");
        out[count++] = (char)character;
        parser->cursor++;
    }
    parser->cursor++;
    out[count] = '\0';
    return MOEGEN_OK;
}

static bool is_ident_char(char character) {
    return (character >= 'a' && character <= 'z') || (character >= 'A' && character <= 'Z') ||
           (character >= '0' && character <= '9') || character == '_';
}

static moegen_status parse_bool(dict_parser *parser, bool *out) {
    skip_space(parser);
    const char *word = parser->cursor;
    while (parser->cursor < parser->end && is_ident_char(*parser->cursor))
        parser->cursor++;
    size_t count = (size_t)(parser->cursor - word);
    if (count == 4 && memcmp(word, "True", 4) == 0) {
        *out = true;
        return MOEGEN_OK;
    }
    if (count == 5 && memcmp(word, "False", 5) == 0) {
        *out = false;
        return MOEGEN_OK;
    }
    parser->cursor = word;
    return syntax_error(parser, "fortran_order must be True or False");
}

/* One dimension: [+-]digits[L]. Saturates instead of overflowing. */
static moegen_status parse_dim(dict_parser *parser, bool *negative, uint64_t *value,
                               bool *too_big) {
    skip_space(parser);
    *negative = false;
    if (parser->cursor < parser->end && (*parser->cursor == '-' || *parser->cursor == '+')) {
        *negative = *parser->cursor == '-';
        parser->cursor++;
        skip_space(parser);
    }
    if (parser->cursor >= parser->end || *parser->cursor < '0' || *parser->cursor > '9')
        return syntax_error(parser, "expected an integer");
    uint64_t parsed = 0;
    *too_big = false;
    while (parser->cursor < parser->end && *parser->cursor >= '0' && *parser->cursor <= '9') {
        unsigned digit = (unsigned)(*parser->cursor - '0');
        if (parsed > ((uint64_t)INT64_MAX - digit) / 10)
            *too_big = true;
        else
            parsed = parsed * 10 + digit;
        parser->cursor++;
    }
    if (parser->cursor < parser->end && (*parser->cursor == 'L' || *parser->cursor == 'l'))
        parser->cursor++; /* Python 2's long */
    if (parser->cursor < parser->end && (is_ident_char(*parser->cursor) || *parser->cursor == '.'))
        return syntax_error(parser, "expected a decimal integer");
    *value = parsed;
    return MOEGEN_OK;
}

static moegen_status parse_shape(dict_parser *parser, header_info *info) {
    if (!accept_char(parser, '(')) {
        skip_space(parser);
        if (parser->cursor < parser->end && *parser->cursor == '[')
            return syntax_error(parser, "shape must be a tuple like (3, 4), not a list");
        return syntax_error(parser, "expected '(' starting the shape tuple");
    }
    info->ndim = 0;
    if (accept_char(parser, ')')) return MOEGEN_OK;
    bool trailing_comma = false;
    for (;;) {
        bool negative = false, too_big = false;
        uint64_t parsed = 0;
        moegen_status status = parse_dim(parser, &negative, &parsed, &too_big);
        if (status != MOEGEN_OK) return status;
        if (info->ndim == MOEGEN_NPY_MAX_DIMS)
            return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                    "%s: shape has more than %d dimensions", parser->name,
                                    MOEGEN_NPY_MAX_DIMS);
        if (negative && (parsed != 0 || too_big))
            return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                    "%s: shape has a negative dimension (-%" PRIu64 "%s)",
                                    parser->name, parsed, too_big ? "..." : "");
        if (too_big)
            return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                    "%s: shape dimension %d is too large (over %" PRId64 ")",
                                    parser->name, info->ndim, INT64_MAX);
        info->shape[info->ndim++] = (int64_t)parsed;
        trailing_comma = accept_char(parser, ',');
        if (accept_char(parser, ')')) break;
        if (!trailing_comma) return syntax_error(parser, "expected ',' or ')' in the shape tuple");
    }
    if (info->ndim == 1 && !trailing_comma)
        return moegen_error_set(parser->err, MOEGEN_ERR_IO, 0,
                                "%s: shape (%" PRId64 ") is not a tuple; a 1-d shape is written "
                                "(%" PRId64 ",)",
                                parser->name, info->shape[0], info->shape[0]);
    return MOEGEN_OK;
}

/* Map a descr string to a supported dtype or explain why it is not one. */
static moegen_status resolve_descr(const char *name, const char *descr, moegen_npy_dtype *out,
                                   moegen_error *err) {
    char order = descr[0];
    const char *code = order ? descr + 1 : descr;
    int dtype = dtype_from_type_code(code);
    if ((order == '<' || order == '=') && dtype >= 0) {
        *out = (moegen_npy_dtype)dtype; /* '=' is native, i.e. little-endian on this host */
        return MOEGEN_OK;
    }
    if ((order == '>' || order == '!') && dtype >= 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: dtype '%s' is big-endian; save with '<%s'", name, descr, code);
    if (order == '|' && dtype >= 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: dtype '%s': byte order '|' (not applicable) is not valid for "
                                "a %zu-byte type; save with '<%s'",
                                name, descr, dtype_table[dtype].size, code);
    if (order && code[0] == 'O')
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: dtype '%s' is an object array, which is not supported; save "
                                "a numeric array",
                                name, descr);
    if (order && code[0] == 'V')
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: dtype '%s' (raw bytes) is not supported; for bfloat16 save "
                                "tensor.view(torch.uint16) as '<u2'",
                                name, descr);
    return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                            "%s: dtype '%s' is not supported; use one of '<f4' '<f8' '<f2' '<u2' "
                            "'<i4' '<i8'",
                            name, descr);
}

enum { KEY_DESCR = 1, KEY_FORTRAN = 2, KEY_SHAPE = 4 };

/* Parse the header dict `text` (`length` bytes, starting at file offset `base`). */
static moegen_status parse_header(const char *name, const char *text, size_t length, size_t base,
                                  header_info *info, moegen_error *err) {
    dict_parser parser = {.name = name,
                          .start = text,
                          .cursor = text,
                          .end = text + length,
                          .base = base,
                          .err = err};
    char descr[MAX_DESCR_BYTES] = "";
    bool fortran = false;
    unsigned seen = 0;
    moegen_status status;

    if (!accept_char(&parser, '{'))
        return syntax_error(&parser, "expected '{' starting the header dict");
    while (!accept_char(&parser, '}')) {
        char key[32];
        const char *key_at = (skip_space(&parser), parser.cursor);
        if ((status = parse_string(&parser, key, sizeof key)) != MOEGEN_OK) {
            if (parser.cursor == key_at)
                return syntax_error(&parser, "expected a quoted key or '}'");
            return status;
        }
        unsigned key_bit = strcmp(key, "descr") == 0           ? KEY_DESCR
                           : strcmp(key, "fortran_order") == 0 ? KEY_FORTRAN
                           : strcmp(key, "shape") == 0         ? KEY_SHAPE
                                                               : 0;
        if (key_bit == 0)
            return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                    "%s: unexpected key '%s' in the .npy header (expected "
                                    "'descr', 'fortran_order' and 'shape')",
                                    name, key);
        if (seen & key_bit)
            return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                    "%s: key '%s' appears twice in the .npy header", name, key);
        seen |= key_bit;
        if (!accept_char(&parser, ':')) return syntax_error(&parser, "expected ':' after a key");
        if (key_bit == KEY_DESCR) {
            skip_space(&parser);
            if (parser.cursor < parser.end && *parser.cursor == '[')
                return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                        "%s: structured dtypes (a list descr) are not supported",
                                        name);
            status = parse_string(&parser, descr, sizeof descr);
        } else if (key_bit == KEY_FORTRAN) {
            status = parse_bool(&parser, &fortran);
        } else {
            status = parse_shape(&parser, info);
        }
        if (status != MOEGEN_OK) return status;
        if (accept_char(&parser, ',')) continue;
        if (accept_char(&parser, '}')) break;
        return syntax_error(&parser, "expected ',' or '}' after a value");
    }
    skip_space(&parser);
    if (parser.cursor < parser.end)
        return syntax_error(&parser, "expected only padding after the header dict");
    if (seen != (KEY_DESCR | KEY_FORTRAN | KEY_SHAPE)) {
        const char *missing = !(seen & KEY_DESCR)     ? "descr"
                              : !(seen & KEY_FORTRAN) ? "fortran_order"
                                                      : "shape";
        return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: the .npy header has no '%s' key", name,
                                missing);
    }
    if ((status = resolve_descr(name, descr, &info->dtype, err)) != MOEGEN_OK) return status;
    if (fortran)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: fortran_order is True (column-major data) and is not "
                                "supported; save a C-contiguous array (np.ascontiguousarray)",
                                name);
    return MOEGEN_OK;
}

/* ---- reading: the data ---------------------------------------------------------- */

/* Check the data that follows the header at `data_offset` matches the header
 * exactly, and fill out's metadata (not its data). */
static moegen_status check_data(const char *name, const header_info *info, uint64_t data_offset,
                                uint64_t file_size, moegen_npy *out, moegen_error *err) {
    size_t n_bytes;
    char shape_text[256];
    if (!data_size(info->ndim, info->shape, dtype_table[info->dtype].size, &n_bytes))
        return moegen_error_set(
            err, MOEGEN_ERR_IO, 0,
            "%s: array of shape %s and dtype '%s' is too large (its size overflows)", name,
            moegen_npy_shape_string(info->ndim, info->shape, shape_text, sizeof shape_text),
            moegen_npy_dtype_descr(info->dtype));
    uint64_t have = file_size - data_offset;
    if (have < n_bytes)
        return moegen_error_set(
            err, MOEGEN_ERR_IO, 0,
            "%s: data is truncated: shape %s of '%s' needs %zu bytes, the file has %" PRIu64, name,
            moegen_npy_shape_string(info->ndim, info->shape, shape_text, sizeof shape_text),
            moegen_npy_dtype_descr(info->dtype), n_bytes, have);
    if (have > n_bytes)
        return moegen_error_set(
            err, MOEGEN_ERR_IO, 0,
            "%s: %" PRIu64 " unexpected bytes after the data (shape %s of '%s' needs %zu bytes)",
            name, have - n_bytes,
            moegen_npy_shape_string(info->ndim, info->shape, shape_text, sizeof shape_text),
            moegen_npy_dtype_descr(info->dtype), n_bytes);
    out->dtype = info->dtype;
    out->ndim = info->ndim;
    for (int i = 0; i < MOEGEN_NPY_MAX_DIMS; i++)
        out->shape[i] = i < info->ndim ? info->shape[i] : 0;
    out->n_bytes = n_bytes;
    out->data = NULL;
    return MOEGEN_OK;
}

/* malloc at least one byte, so an empty array still has non-NULL data. */
static moegen_status alloc_data(const char *name, moegen_npy *out, moegen_error *err) {
    out->data = malloc(out->n_bytes ? out->n_bytes : 1);
    if (!out->data)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM,
                                "%s: out of memory allocating %zu bytes", name, out->n_bytes);
    return MOEGEN_OK;
}

void moegen_npy_free(moegen_npy *array) {
    if (!array) return;
    free(array->data);
    memset(array, 0, sizeof *array);
}

moegen_status moegen_npy_read_buffer(const char *name, const void *bytes, size_t size,
                                     moegen_npy *out, moegen_error *err) {
    if (out) memset(out, 0, sizeof *out);
    if (!name || !out || (!bytes && size > 0))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "npy read: NULL name, output or bytes");
    const unsigned char *image = bytes;
    size_t header_offset, header_len;
    header_info info;
    moegen_status status =
        parse_prefix(name, image, size < PREFIX_MAX_BYTES ? size : PREFIX_MAX_BYTES, size,
                     &header_offset, &header_len, err);
    if (status == MOEGEN_OK)
        status = parse_header(name, (const char *)image + header_offset, header_len, header_offset,
                              &info, err);
    if (status == MOEGEN_OK)
        status = check_data(name, &info, header_offset + header_len, size, out, err);
    if (status == MOEGEN_OK) status = alloc_data(name, out, err);
    if (status != MOEGEN_OK) {
        moegen_npy_free(out);
        return status;
    }
    if (out->n_bytes) memcpy(out->data, image + header_offset + header_len, out->n_bytes);
    return MOEGEN_OK;
}

/* Read exactly `count` bytes; false with errno set on failure, or errno 0 at an
 * early end of file. */
static bool read_all(int fd, void *buffer, size_t count) {
    char *cursor = buffer;
    while (count > 0) {
        size_t chunk = count > ((size_t)1 << 30) ? ((size_t)1 << 30) : count;
        ssize_t got_bytes = read(fd, cursor, chunk);
        if (got_bytes < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        if (got_bytes == 0) {
            errno = 0;
            return false;
        }
        cursor += got_bytes;
        count -= (size_t)got_bytes;
    }
    return true;
}

static moegen_status read_failed(const char *name, const char *what, moegen_error *err) {
    int error_number = errno;
    if (error_number == 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: file ended while reading the %s "
                                "(was it changed while being read?)",
                                name, what);
    return moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot read the %s: %s", name,
                            what, strerror(error_number));
}

/* Read the header of `path` and, when `with_data`, its data (see moegen_npy_read). */
static moegen_status read_file(const char *path, int with_data, moegen_npy *out, moegen_error *err) {
    if (out) memset(out, 0, sizeof *out);
    if (!path || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "npy read: NULL path or output");
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block */
    if (fd < 0) {
        int error_number = errno;
        return moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot open: %s", path,
                                strerror(error_number));
    }
    struct stat file_info;
    moegen_status status = MOEGEN_OK;
    char *header = NULL;
    if (fstat(fd, &file_info) != 0) {
        int error_number = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, error_number, "%s: cannot stat: %s", path,
                                  strerror(error_number));
        goto done;
    }
    if (!S_ISREG(file_info.st_mode)) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: not a regular file", path);
        goto done;
    }
    uint64_t file_size = file_info.st_size < 0 ? 0 : (uint64_t)file_info.st_size;
    unsigned char prefix_bytes[PREFIX_MAX_BYTES];
    size_t have = file_size < PREFIX_MAX_BYTES ? (size_t)file_size : PREFIX_MAX_BYTES;
    size_t header_offset, header_len;
    header_info info;
    if (!read_all(fd, prefix_bytes, have)) {
        status = read_failed(path, "header", err);
        goto done;
    }
    if ((status = parse_prefix(path, prefix_bytes, have, file_size, &header_offset, &header_len,
                               err)) != MOEGEN_OK)
        goto done;
    header = malloc(header_len);
    if (!header) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory", path);
        goto done;
    }
    if (lseek(fd, (off_t)header_offset, SEEK_SET) < 0 || !read_all(fd, header, header_len)) {
        status = read_failed(path, "header", err);
        goto done;
    }
    if ((status = parse_header(path, header, header_len, header_offset, &info, err)) != MOEGEN_OK)
        goto done;
    if ((status = check_data(path, &info, header_offset + header_len, file_size, out, err)) !=
        MOEGEN_OK)
        goto done;
    if (!with_data) goto done; /* the header told everything the caller needs */
    if ((status = alloc_data(path, out, err)) != MOEGEN_OK) goto done;
    if (lseek(fd, (off_t)(header_offset + header_len), SEEK_SET) < 0 ||
        !read_all(fd, out->data, out->n_bytes)) {
        status = read_failed(path, "data", err);
        goto done;
    }
done:
    free(header);
    close(fd);
    if (status != MOEGEN_OK) moegen_npy_free(out);
    return status;
}

moegen_status moegen_npy_read(const char *path, moegen_npy *out, moegen_error *err) {
    return read_file(path, 1, out, err);
}

moegen_status moegen_npy_read_header(const char *path, moegen_npy *out, moegen_error *err) {
    return read_file(path, 0, out, err);
}

moegen_status moegen_npy_read_expect(const char *path, int ndim, const int64_t *shape,
                                     const moegen_npy_dtype *allowed, int n_allowed,
                                     moegen_npy *out, moegen_error *err) {
    if (out) memset(out, 0, sizeof *out);
    if (!path || !out || ndim < 0 || ndim > MOEGEN_NPY_MAX_DIMS || (ndim > 0 && !shape) ||
        n_allowed < 0 || (n_allowed > 0 && !allowed))
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "npy read: invalid arguments for %s", path ? path : "(null)");
    for (int i = 0; i < n_allowed; i++)
        if (!dtype_is_valid(allowed[i]))
            return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                    "%s: invalid dtype %d in the allowed list", path,
                                    (int)allowed[i]);
    moegen_status status = moegen_npy_read(path, out, err);
    if (status != MOEGEN_OK) return status;

    bool same = out->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = out->shape[i] == shape[i];
    if (!same) {
        char want[256], got[256];
        moegen_npy_shape_string(ndim, shape, want, sizeof want);
        moegen_npy_shape_string(out->ndim, out->shape, got, sizeof got);
        moegen_npy_free(out);
        return moegen_error_set(err, MOEGEN_ERR_IO, 0, "%s: expected shape %s, file has %s", path,
                                want, got);
    }
    bool ok = n_allowed == 0;
    for (int i = 0; !ok && i < n_allowed; i++)
        ok = allowed[i] == out->dtype;
    if (!ok) {
        char list[128] = "";
        size_t used = 0;
        for (int i = 0; i < n_allowed && used < sizeof list; i++) {
            const char *separator = i == 0 ? "" : i == n_allowed - 1 ? " or " : ", ";
            int count = snprintf(list + used, sizeof list - used, "%s'%s'", separator,
                                 moegen_npy_dtype_descr(allowed[i]));
            used = count < 0 ? sizeof list : used + (size_t)count;
        }
        moegen_npy_dtype got = out->dtype;
        moegen_npy_free(out);
        return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                "%s: dtype '%s' is not accepted here; expected %s", path,
                                moegen_npy_dtype_descr(got), list);
    }
    return MOEGEN_OK;
}
