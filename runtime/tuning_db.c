/* tuning_db.c — the tuning database: one file per (device, layer shape) saying which kernel
 * variant to run for each token-count bucket (tuning_db.h; the format is in docs/tuning.md).
 *
 * Place in the pipeline: `moegen tune` writes these files; a layer looks its file up at
 * open (moegen_tuning_db_lookup) and picks the bucket of each forward's token count.
 *
 * Invariants:
 *  - Writing is validate, write a temporary file ".<name>.XXXXXX" in the target's
 *    directory, fsync it, rename() it over the target and fsync the directory: a reader
 *    sees the old file or the new one, never a mix, and a failed write leaves the old one
 *    and no temporary file. The lookup ignores names starting with '.'.
 *  - The reader is strict: every header key exactly once and before the buckets, no
 *    unknown key, every number whole and in range, the file ending in a newline and
 *    holding as many buckets as its `buckets:` line says (so a file cut anywhere fails).
 *    The same checks as moegen_tuning_db_validate run on what was read, so a file that
 *    reads is one that could have been written. Each failure names path:line:col.
 *  - `format:` is the first key of every format, so a reader can tell a file of another
 *    format before parsing the rest (whose syntax it may not know).
 *  - Files are opened with O_NONBLOCK and must be regular files (a FIFO never blocks the
 *    lookup) of at most FILE_MAX_BYTES.
 *  - Numbers are parsed and printed in the C locale (gen/c_locale.h).
 *  - No global mutable state.
 */
#define _GNU_SOURCE
#include "tuning_db.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "c_locale.h"
#include "fs_util.h"
#include "sha256.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

#define FILE_MAX_BYTES (1024 * 1024) /* 64 buckets take about 40 KiB */
#define FILE_SUFFIX ".tune"
#define SLUG_MAX_CHARS 120
#define SLUG_HASH_HEX_CHARS 8
#define SLUG_BYTES (SLUG_MAX_CHARS + 1 + SLUG_HASH_HEX_CHARS + 1)
#define INFINITE_TEXT "inf"
#define DEFAULT_VARIANT_TEXT "default" /* how the empty override list is written */
#define NUMBER_TEXT_BYTES 64
#define REASON_BYTES 512
#define WARNING_BYTES (MOEGEN_ERROR_MESSAGE_BYTES + 2 * PATH_MAX)
#define BUCKET_FIELDS                                                                              \
    6 /* after the word "bucket": tokens timed median_ms default_ms variant name */
#define HEADER_COMMENT                                                                             \
    "# moegen tuning database: which kernel variant to run for each token count (docs/tuning.md)"

/* The header keys in the order they are written; `format` must come first. */
typedef enum header_key {
    KEY_FORMAT,
    KEY_MOEGEN,
    KEY_DATE,
    KEY_DEVICE,
    KEY_FAMILY,
    KEY_SHAPE,
    KEY_ROUTING,
    KEY_THREADS,
    KEY_BUCKETS,
    KEY_COUNT
} header_key;

static const char *const HEADER_KEYS[KEY_COUNT] = {
    "format", "moegen", "date", "device", "family", "shape", "routing", "threads", "buckets"};

/* The fields of a bucket that a check can blame (the parser maps them to columns). */
typedef enum bucket_field {
    FIELD_MIN,
    FIELD_MAX,
    FIELD_TIMED,
    FIELD_MEDIAN,
    FIELD_DEFAULT,
    FIELD_VARIANT,
    FIELD_NAME
} bucket_field;

static const char *const BUCKET_FIELD_NAMES[] = {"min_tokens",  "max_tokens", "timed_tokens",
                                                 "median_ms",   "default_ms", "variant",
                                                 "variant_name"};

/* ---- small helpers ------------------------------------------------------------------------ */

static int is_blank(char c) {
    return c == ' ' || c == '\t';
}

static int is_slug_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
}

/* "1-8" or "65-inf". */
static void format_range(char *out, size_t size, const moegen_tuning_bucket *b) {
    if (b->max_tokens == INT64_MAX)
        moegen_text_format(out, size, "%" PRId64 "-" INFINITE_TEXT, b->min_tokens);
    else
        moegen_text_format(out, size, "%" PRId64 "-%" PRId64, b->min_tokens, b->max_tokens);
}

/* fsync a directory so that a rename in it is durable. */
/* ---- validation (shared by the writer and the reader) --------------------------------------- */

/* Why a string field cannot be stored, or NULL. `capacity` is its array size. */
static const char *text_problem(const char *text, size_t capacity, int may_be_empty,
                                int may_have_blanks) {
    const char *problem = NULL;
    size_t length = strnlen(text, capacity);
    if (length == capacity)
        problem = "is not NUL-terminated within its array";
    else if (length == 0 && !may_be_empty)
        problem = "is empty";
    else if (length > 0 && (is_blank(text[0]) || is_blank(text[length - 1])))
        problem = "has leading or trailing blanks";
    for (size_t i = 0; !problem && i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\n' || c == '\r')
            problem = "contains a line break";
        else if (c < 0x20 || c == 0x7f)
            problem = "contains a control character (a tab, ...)";
        else if (!may_have_blanks && c == ' ')
            problem = "contains a blank (it is one column of a bucket line)";
    }
    return problem;
}

/* YYYY-MM-DDTHH:MM:SSZ (digits where the pattern has them; the values are not checked). */
static int is_iso_date(const char *text) {
    static const char pattern[] = "dddd-dd-ddTdd:dd:ddZ";
    int ok = strnlen(text, sizeof pattern) == sizeof pattern - 1;
    for (size_t i = 0; ok && i < sizeof pattern - 1; i++)
        ok = pattern[i] == 'd' ? (text[i] >= '0' && text[i] <= '9') : text[i] == pattern[i];
    return ok;
}

/* Why header field `key` of `db` is invalid, or NULL. */
static const char *header_problem(const moegen_tuning_db *db, header_key key, char *why,
                                  size_t size) {
    const char *problem = NULL;
    switch (key) {
    case KEY_FORMAT:
        if (db->format != MOEGEN_TUNING_FORMAT) {
            moegen_text_format(why, size, "is %d; this build writes format %d", db->format,
                        MOEGEN_TUNING_FORMAT);
            problem = why;
        }
        break;
    case KEY_MOEGEN:
        problem = text_problem(db->moegen_version, sizeof db->moegen_version, 0, 0);
        break;
    case KEY_DATE:
        if (!is_iso_date(db->date))
            problem = "is not an ISO 8601 UTC time like 2026-11-30T09:12:00Z";
        break;
    case KEY_DEVICE: problem = text_problem(db->device, sizeof db->device, 0, 1); break;
    case KEY_FAMILY: problem = text_problem(db->family, sizeof db->family, 0, 1); break;
    case KEY_SHAPE: problem = text_problem(db->shape, sizeof db->shape, 0, 1); break;
    case KEY_ROUTING: problem = text_problem(db->routing, sizeof db->routing, 0, 1); break;
    case KEY_THREADS:
        if (db->threads < 0) problem = "is negative";
        break;
    case KEY_BUCKETS:
        if (db->n_buckets < 1 || db->n_buckets > MOEGEN_TUNING_MAX_BUCKETS) {
            moegen_text_format(why, size, "is %d; a file holds 1 to %d buckets", db->n_buckets,
                        MOEGEN_TUNING_MAX_BUCKETS);
            problem = why;
        }
        break;
    case KEY_COUNT: break;
    }
    return problem;
}

static int is_time(double ms) {
    return isfinite(ms) && ms >= 0.0;
}

/* Why bucket `b` is invalid after `previous` (NULL for the first), or NULL; `*field` gets the
 * field to blame. The message names the field itself. */
static const char *bucket_problem(const moegen_tuning_bucket *b,
                                  const moegen_tuning_bucket *previous, bucket_field *field,
                                  char *why, size_t size) {
    const char *problem = why;
    const char *text = NULL;
    char range[64];
    char previous_range[64];
    format_range(range, sizeof range, b);
    if (b->min_tokens < 1) {
        *field = FIELD_MIN;
        moegen_text_format(why, size, "min_tokens is %" PRId64 "; token counts start at 1", b->min_tokens);
    } else if (b->max_tokens < b->min_tokens) {
        *field = FIELD_MAX;
        moegen_text_format(why, size, "max_tokens %" PRId64 " is below min_tokens %" PRId64, b->max_tokens,
                    b->min_tokens);
    } else if (previous && b->min_tokens <= previous->max_tokens) {
        *field = FIELD_MIN;
        format_range(previous_range, sizeof previous_range, previous);
        moegen_text_format(why, size,
                    "bucket %s overlaps or comes before the previous bucket %s (buckets are "
                    "sorted and do not overlap)",
                    range, previous_range);
    } else if (b->timed_tokens < b->min_tokens || b->timed_tokens > b->max_tokens) {
        *field = FIELD_TIMED;
        moegen_text_format(why, size, "timed_tokens %" PRId64 " is outside the bucket %s", b->timed_tokens,
                    range);
    } else if (!is_time(b->median_ms)) {
        *field = FIELD_MEDIAN;
        moegen_text_format(why, size, "median_ms is not a finite number >= 0");
    } else if (!is_time(b->default_ms)) {
        *field = FIELD_DEFAULT;
        moegen_text_format(why, size, "default_ms is not a finite number >= 0");
    } else if ((text = text_problem(b->variant, sizeof b->variant, 1, 0)) != NULL) {
        *field = FIELD_VARIANT;
        moegen_text_format(why, size, "variant %s", text);
    } else if (strcmp(b->variant, DEFAULT_VARIANT_TEXT) == 0) {
        *field = FIELD_VARIANT;
        moegen_text_format(why, size,
                    "variant \"" DEFAULT_VARIANT_TEXT "\" is how the empty override "
                    "list is written; give \"\"");
    } else if ((text = text_problem(b->variant_name, sizeof b->variant_name, 0, 0)) != NULL) {
        *field = FIELD_NAME;
        moegen_text_format(why, size, "variant_name %s", text);
    } else {
        problem = NULL;
    }
    return problem;
}

static moegen_status validate(const moegen_tuning_db *db, const char *who, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    char why[REASON_BYTES];
    const char *problem = NULL;
    for (int key = 0; key < KEY_COUNT && status == MOEGEN_OK; key++) {
        problem = header_problem(db, (header_key)key, why, sizeof why);
        if (problem) {
            static const char *const FIELD_OF_KEY[KEY_COUNT] = {
                "format", "moegen_version", "date",    "device",   "family",
                "shape",  "routing",        "threads", "n_buckets"};
            status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: %s %s", who,
                                      FIELD_OF_KEY[key], problem);
        }
    }
    for (int i = 0; i < db->n_buckets && status == MOEGEN_OK; i++) {
        bucket_field field;
        problem = bucket_problem(&db->buckets[i], i > 0 ? &db->buckets[i - 1] : NULL, &field, why,
                                 sizeof why);
        if (problem)
            status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0, "%s: buckets[%d].%s: %s",
                                      who, i, BUCKET_FIELD_NAMES[field], problem);
    }
    return status;
}

const char *moegen_tuning_rung_name(moegen_tuning_rung rung) {
    switch (rung) {
    case MOEGEN_TUNING_NONE: return "none";
    case MOEGEN_TUNING_EXACT: return "exact";
    case MOEGEN_TUNING_FAMILY: return "family";
    }
    return "none";
}

void moegen_tuning_db_init(moegen_tuning_db *db) {
    if (!db) return;
    memset(db, 0, sizeof *db);
    db->format = MOEGEN_TUNING_FORMAT;
    moegen_text_format(db->moegen_version, sizeof db->moegen_version, "%s", MOEGEN_VERSION);
}

int moegen_tuning_db_is_current(const moegen_tuning_db *db) {
    return db && db->format == MOEGEN_TUNING_FORMAT &&
           strncmp(db->moegen_version, MOEGEN_VERSION, sizeof db->moegen_version) == 0;
}

moegen_status moegen_tuning_db_validate(const moegen_tuning_db *db, moegen_error *err) {
    moegen_status status;
    if (!db)
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_tuning_db_validate: the database is NULL");
    else
        status = validate(db, "moegen_tuning_db_validate", err);
    if (status == MOEGEN_OK) moegen_error_clear(err);
    return status;
}

/* ---- writing -------------------------------------------------------------------------------- */

/* The whole file, aligned in columns for people (the reader does not care). Runs in the C
 * locale. Returns 0, or -1 (errno set) when the stream failed. */
static int print_db(FILE *file, const moegen_tuning_db *db) {
    char range[64];
    int range_width = (int)strlen("tokens");
    int variant_width = (int)strlen("variant");
    for (int i = 0; i < db->n_buckets; i++) {
        const moegen_tuning_bucket *b = &db->buckets[i];
        int variant_length =
            b->variant[0] ? (int)strlen(b->variant) : (int)strlen(DEFAULT_VARIANT_TEXT);
        format_range(range, sizeof range, b);
        if ((int)strlen(range) > range_width) range_width = (int)strlen(range);
        if (variant_length > variant_width) variant_width = variant_length;
    }
    fprintf(file, "%s\n", HEADER_COMMENT);
    fprintf(file, "format: %d\nmoegen: %s\ndate: %s\ndevice: %s\nfamily: %s\nshape: %s\n",
            db->format, db->moegen_version, db->date, db->device, db->family, db->shape);
    fprintf(file, "routing: %s\nthreads: %d\nbuckets: %d\n", db->routing, db->threads,
            db->n_buckets);
    /* "#      " is as wide as "bucket ", so the column titles sit above their columns. */
    fprintf(file, "#      %-*s %7s %11s %11s  %-*s  %s\n", range_width, "tokens", "timed",
            "median_ms", "default_ms", variant_width, "variant", "name");
    for (int i = 0; i < db->n_buckets; i++) {
        const moegen_tuning_bucket *b = &db->buckets[i];
        format_range(range, sizeof range, b);
        fprintf(file, "bucket %-*s %7" PRId64 " %11.6g %11.6g  %-*s  %s\n", range_width, range,
                b->timed_tokens, b->median_ms, b->default_ms, variant_width,
                b->variant[0] ? b->variant : DEFAULT_VARIANT_TEXT, b->variant_name);
    }
    return ferror(file) ? -1 : 0;
}

/* Write the contents to the temporary file `fd` (consumed) and fsync it. */
static int write_temp_file(int fd, const moegen_tuning_db *db) {
    int result = -1;
    int saved = 0;
    FILE *file = NULL;
    if (fchmod(fd, 0644) == 0 && (file = fdopen(fd, "w")) != NULL) {
        fd = -1; /* the stream owns it now */
        if (print_db(file, db) == 0 && fflush(file) == 0 && fsync(fileno(file)) == 0) result = 0;
    }
    saved = errno;
    if (file && fclose(file) != 0 && result == 0) {
        saved = errno;
        result = -1;
    }
    if (fd >= 0) close(fd);
    errno = saved;
    return result;
}

moegen_status moegen_tuning_db_write(const char *path, const moegen_tuning_db *db,
                                     moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_c_locale_scope locale;
    char directory[PATH_MAX];
    char temp[PATH_MAX];
    const char *base = NULL;
    char *slash = NULL;
    int temp_created = 0;
    int fd = -1;
    if (!path || !db || !path[0]) {
        status =
            moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                             "moegen_tuning_db_write: the path and the database must be given");
        return status;
    }
    status = validate(db, "moegen_tuning_db_write", err);
    if (status != MOEGEN_OK) return status;
    moegen_error_clear(err);
    moegen_c_locale_enter(&locale);
    if (moegen_path_format(directory, sizeof directory, "%s", path) != 0) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, ENAMETOOLONG, "%s: path too long", path);
        goto done;
    }
    slash = strrchr(directory, '/');
    base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path; /* not in `directory`, cut below */
    if (!slash)
        moegen_text_format(directory, sizeof directory, ".");
    else if (slash == directory)
        slash[1] = '\0'; /* a file in "/" */
    else
        *slash = '\0';
    if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        status = moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                  "moegen_tuning_db_write: %s does not name a file", path);
        goto done;
    }
    /* Tuning files are meant to be shared (a team's directory, the repository's), so their
     * directories get 0777 less the umask, unlike the private compile cache. */
    if (moegen_make_directories(directory, 0777) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot create directory %s: %s",
                                  path, directory, strerror(saved));
        goto done;
    }
    /* Next to the target, so that rename() stays in one file system and is atomic; the dot
     * keeps a temporary file that a crash left behind out of every lookup. */
    if (moegen_path_format(temp, sizeof temp, "%s/.%s.XXXXXX", directory, base) != 0 ||
        (fd = mkostemp(temp, O_CLOEXEC)) < 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved,
                                  "%s: cannot create a temporary file in %s: %s", path, directory,
                                  strerror(saved));
        goto done;
    }
    temp_created = 1;
    if (write_temp_file(fd, db) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot write %s: %s", path, temp,
                                  strerror(saved));
        goto done;
    }
    if (rename(temp, path) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot rename %s over it: %s",
                                  path, temp, strerror(saved));
        goto done;
    }
    temp_created = 0;
    if (moegen_fsync_directory(directory, 1) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot fsync directory %s: %s",
                                  path, directory, strerror(saved));
    }
done:
    if (temp_created) (void)unlink(temp);
    moegen_c_locale_leave(&locale);
    return status;
}

/* ---- reading -------------------------------------------------------------------------------- */

typedef struct parser {
    const char *path;
    moegen_error *err;
    moegen_tuning_db *db;
    int line;               /* the current line, 1-based */
    const char *line_start; /* its first byte */
    int key_line[KEY_COUNT];
    int buckets_seen; /* bucket lines read so far */
} parser;

static moegen_status parse_fail(parser *p, const char *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Fail at `at` (a byte of the current line; NULL: its start): "path:line:col: message". */
static moegen_status parse_fail(parser *p, const char *at, const char *fmt, ...) {
    char message[MOEGEN_ERROR_MESSAGE_BYTES];
    va_list ap;
    int column = at ? (int)(at - p->line_start) + 1 : 1;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return moegen_error_set(p->err, MOEGEN_ERR_IO, 0, "%s:%d:%d: %s", p->path, p->line, column,
                            message);
}

/* A whole decimal number of [0, max]: digits only, no sign, no blanks. -1 when it is not. */
static int parse_whole(const char *text, size_t length, int64_t max, int64_t *out) {
    int64_t value = 0;
    int result = length > 0 ? 0 : -1;
    for (size_t i = 0; result == 0 && i < length; i++) {
        int digit = text[i] - '0';
        if (digit < 0 || digit > 9 || value > (max - digit) / 10)
            result = -1;
        else
            value = value * 10 + digit;
    }
    if (result == 0) *out = value;
    return result;
}

/* A finite decimal number in the C locale (the caller's scope): [0-9.eE+-] only, so that
 * strtod's "nan", "inf" and hex forms are refused. -1 when it is not one. */
static int parse_decimal(const char *text, size_t length, double *out) {
    char buffer[NUMBER_TEXT_BYTES];
    char *end = NULL;
    int result = length > 0 && length < sizeof buffer ? 0 : -1;
    for (size_t i = 0; result == 0 && i < length; i++)
        if (!((text[i] >= '0' && text[i] <= '9') || text[i] == '.' || text[i] == 'e' ||
              text[i] == 'E' || text[i] == '+' || text[i] == '-'))
            result = -1;
    if (result == 0) {
        memcpy(buffer, text, length);
        buffer[length] = '\0';
        errno = 0;
        *out = strtod(buffer, &end);
        if (end != buffer + length || errno == ERANGE || !isfinite(*out)) result = -1;
    }
    return result;
}

/* Copy a value of `length` bytes into a field of `capacity` bytes; -1 when too long. */
static int copy_value(char *field, size_t capacity, const char *value, size_t length) {
    int result = -1;
    if (length < capacity) {
        memcpy(field, value, length);
        field[length] = '\0';
        result = 0;
    }
    return result;
}

static int find_key(const char *name, size_t length) {
    int found = -1;
    for (int key = 0; key < KEY_COUNT && found < 0; key++)
        if (strlen(HEADER_KEYS[key]) == length && memcmp(HEADER_KEYS[key], name, length) == 0)
            found = key;
    return found;
}

/* `key: value` on the current line; `text` is its first non-blank byte and `end` is past its
 * last non-blank byte. */
static moegen_status parse_header_line(parser *p, const char *text, const char *end) {
    moegen_status status = MOEGEN_OK;
    moegen_tuning_db *db = p->db;
    const char *name_end = text;
    const char *value = NULL;
    size_t length = 0;
    int64_t number = 0;
    int key = -1;
    char why[REASON_BYTES];
    const char *problem = NULL;
    while (name_end < end && ((*name_end >= 'a' && *name_end <= 'z') || *name_end == '_'))
        name_end++;
    if (name_end == text || name_end == end || *name_end != ':')
        return parse_fail(p, text, "expected \"key: value\" or a bucket line");
    key = find_key(text, (size_t)(name_end - text));
    if (key < 0)
        return parse_fail(p, text,
                          "unknown key \"%.*s\" (the keys are format, moegen, date, device, "
                          "family, shape, routing, threads and buckets)",
                          (int)(name_end - text), text);
    if (p->key_line[key])
        return parse_fail(p, text, "duplicate key \"%s\" (first on line %d)", HEADER_KEYS[key],
                          p->key_line[key]);
    if (key != KEY_FORMAT && !p->key_line[KEY_FORMAT])
        return parse_fail(p, text, "the first key must be \"format\", not \"%s\"",
                          HEADER_KEYS[key]);
    p->key_line[key] = p->line;
    for (value = name_end + 1; value < end && is_blank(*value); value++)
        ;
    length = (size_t)(end - value);
    switch ((header_key)key) {
    case KEY_FORMAT:
    case KEY_THREADS:
    case KEY_BUCKETS:
        if (parse_whole(value, length, INT_MAX, &number) != 0)
            return parse_fail(p, value, "%s: expected a whole number, got \"%.*s\"",
                              HEADER_KEYS[key], (int)length, value);
        if (key == KEY_FORMAT)
            db->format = (int)number;
        else if (key == KEY_THREADS)
            db->threads = (int)number;
        else
            db->n_buckets = (int)number;
        break;
    case KEY_MOEGEN:
    case KEY_DATE:
    case KEY_DEVICE:
    case KEY_FAMILY:
    case KEY_SHAPE:
    case KEY_ROUTING: {
        char *const fields[] = {NULL,       db->moegen_version, db->date,   db->device,
                                db->family, db->shape,          db->routing};
        const size_t sizes[] = {0,
                                sizeof db->moegen_version,
                                sizeof db->date,
                                sizeof db->device,
                                sizeof db->family,
                                sizeof db->shape,
                                sizeof db->routing};
        if (copy_value(fields[key], sizes[key], value, length) != 0)
            return parse_fail(p, value, "%s: the value is longer than %zu characters",
                              HEADER_KEYS[key], sizes[key] - 1);
        break;
    }
    case KEY_COUNT: break;
    }
    /* A format this build does not write is not an error here: the caller reports it stale. */
    if (key != KEY_FORMAT && (problem = header_problem(db, (header_key)key, why, sizeof why)))
        status = parse_fail(p, value, "%s %s", HEADER_KEYS[key], problem);
    return status;
}

/* The first header key this parser has not seen, or -1. */
static int first_missing_key(const parser *p) {
    int missing = -1;
    for (int key = 0; key < KEY_COUNT && missing < 0; key++)
        if (!p->key_line[key]) missing = key;
    return missing;
}

/* `bucket <min>-<max|inf> <timed> <median_ms> <default_ms> <variant> <name>`. */
static moegen_status parse_bucket_line(parser *p, const char *text, const char *end) {
    moegen_tuning_db *db = p->db;
    moegen_tuning_bucket *b = NULL;
    const char *token[BUCKET_FIELDS + 1];
    size_t token_length[BUCKET_FIELDS + 1];
    const char *cursor = text + strlen("bucket");
    const char *dash = NULL;
    const char *max_text = NULL;
    char why[REASON_BYTES];
    bucket_field field;
    int missing = first_missing_key(p);
    int n = 0;
    if (missing >= 0)
        return parse_fail(p, text, "missing header key \"%s\" before the first bucket",
                          HEADER_KEYS[missing]);
    if (p->buckets_seen >= db->n_buckets)
        return parse_fail(p, text, "more bucket lines than the %d of \"buckets:\" on line %d",
                          db->n_buckets, p->key_line[KEY_BUCKETS]);
    while (cursor < end) {
        const char *start;
        while (cursor < end && is_blank(*cursor))
            cursor++;
        if (cursor == end) break;
        start = cursor;
        while (cursor < end && !is_blank(*cursor))
            cursor++;
        if (n == BUCKET_FIELDS)
            return parse_fail(p, start, "unexpected text after the variant name");
        token[n] = start;
        token_length[n] = (size_t)(cursor - start);
        n++;
    }
    if (n < BUCKET_FIELDS)
        return parse_fail(p, end,
                          "the bucket line has %d of its %d fields (tokens timed median_ms "
                          "default_ms variant name)",
                          n, BUCKET_FIELDS);
    b = &db->buckets[p->buckets_seen];
    dash = memchr(token[0], '-', token_length[0]);
    if (!dash || parse_whole(token[0], (size_t)(dash - token[0]), INT64_MAX, &b->min_tokens) != 0)
        return parse_fail(p, token[0], "expected a token range MIN-MAX or MIN-inf, got \"%.*s\"",
                          (int)token_length[0], token[0]);
    max_text = dash + 1;
    size_t max_length = (size_t)(token[0] + token_length[0] - max_text);
    if (max_length == strlen(INFINITE_TEXT) && memcmp(max_text, INFINITE_TEXT, max_length) == 0)
        b->max_tokens = INT64_MAX;
    else if (parse_whole(max_text, max_length, INT64_MAX - 1, &b->max_tokens) != 0)
        return parse_fail(p, max_text,
                          "expected the last token count of the range or \"inf\", "
                          "got \"%.*s\"",
                          (int)max_length, max_text);
    if (parse_whole(token[1], token_length[1], INT64_MAX - 1, &b->timed_tokens) != 0)
        return parse_fail(p, token[1], "timed_tokens: expected a whole number, got \"%.*s\"",
                          (int)token_length[1], token[1]);
    if (parse_decimal(token[2], token_length[2], &b->median_ms) != 0)
        return parse_fail(p, token[2], "median_ms: expected a decimal number, got \"%.*s\"",
                          (int)token_length[2], token[2]);
    if (parse_decimal(token[3], token_length[3], &b->default_ms) != 0)
        return parse_fail(p, token[3], "default_ms: expected a decimal number, got \"%.*s\"",
                          (int)token_length[3], token[3]);
    if (token_length[4] == strlen(DEFAULT_VARIANT_TEXT) &&
        memcmp(token[4], DEFAULT_VARIANT_TEXT, token_length[4]) == 0)
        b->variant[0] = '\0';
    else if (copy_value(b->variant, sizeof b->variant, token[4], token_length[4]) != 0)
        return parse_fail(p, token[4], "the variant is longer than %zu characters",
                          sizeof b->variant - 1);
    if (copy_value(b->variant_name, sizeof b->variant_name, token[5], token_length[5]) != 0)
        return parse_fail(p, token[5], "the variant name is longer than %zu characters",
                          sizeof b->variant_name - 1);
    if (bucket_problem(b, p->buckets_seen > 0 ? b - 1 : NULL, &field, why, sizeof why)) {
        static const int TOKEN_OF_FIELD[] = {0, 0, 1, 2, 3, 4, 5};
        return parse_fail(p, field == FIELD_MAX ? max_text : token[TOKEN_OF_FIELD[field]], "%s",
                          why);
    }
    p->buckets_seen++;
    return MOEGEN_OK;
}

/* A file of another format: only its `moegen:` line is looked for, leniently, to say which
 * moegen wrote it. */
static void find_writer_version(const char *text, size_t bytes, moegen_tuning_db *db) {
    const char *cursor = text;
    const char *stop = text + bytes;
    while (cursor < stop && !db->moegen_version[0]) {
        const char *eol = memchr(cursor, '\n', (size_t)(stop - cursor));
        const char *end = eol ? eol : stop;
        if ((size_t)(end - cursor) > strlen("moegen:") &&
            memcmp(cursor, "moegen:", strlen("moegen:")) == 0) {
            const char *value = cursor + strlen("moegen:");
            while (value < end && is_blank(*value))
                value++;
            while (end > value && (is_blank(end[-1]) || end[-1] == '\r'))
                end--;
            size_t length = (size_t)(end - value);
            if (length >= sizeof db->moegen_version) length = sizeof db->moegen_version - 1;
            memcpy(db->moegen_version, value, length);
            db->moegen_version[length] = '\0';
        }
        cursor = eol ? eol + 1 : stop;
    }
}

/* Parse the whole text. Returns MOEGEN_OK, MOEGEN_ERR_IO (malformed) or, for a file of
 * another format, MOEGEN_ERR_UNSUPPORTED with db->format set (the caller says the rest). */
static moegen_status parse_text(parser *p, const char *text, size_t bytes) {
    moegen_status status = MOEGEN_OK;
    const char *cursor = text;
    const char *stop = text + bytes;
    p->line = 0;
    while (status == MOEGEN_OK && cursor < stop) {
        const char *eol = memchr(cursor, '\n', (size_t)(stop - cursor));
        const char *end = eol ? eol : stop;
        const char *first = cursor;
        p->line++;
        p->line_start = cursor;
        for (const char *c = cursor; status == MOEGEN_OK && c < end; c++)
            if (((unsigned char)*c < 0x20 && *c != '\t') || *c == 0x7f)
                status = parse_fail(p, c, "control character 0x%02x (lines end with \\n alone)",
                                    (unsigned)(unsigned char)*c);
        if (status != MOEGEN_OK) break;
        if (!eol) {
            status = parse_fail(p, end, "the last line does not end with a newline (a cut file?)");
            break;
        }
        cursor = eol + 1;
        while (first < end && is_blank(*first))
            first++;
        while (end > first && is_blank(end[-1]))
            end--;
        if (first == end || *first == '#') continue;
        if ((size_t)(end - first) >= strlen("bucket") && memcmp(first, "bucket", 6) == 0 &&
            (end - first == 6 || is_blank(first[6])))
            status = parse_bucket_line(p, first, end);
        else
            status = parse_header_line(p, first, end);
        if (status == MOEGEN_OK && p->key_line[KEY_FORMAT] == p->line &&
            p->db->format != MOEGEN_TUNING_FORMAT) {
            find_writer_version(cursor, (size_t)(stop - cursor), p->db);
            return MOEGEN_ERR_UNSUPPORTED;
        }
    }
    if (status == MOEGEN_OK) {
        int missing = first_missing_key(p);
        /* Problems found at the end are reported after the last line. */
        p->line++;
        p->line_start = stop;
        if (missing >= 0)
            status = parse_fail(p, NULL, "missing header key \"%s\"", HEADER_KEYS[missing]);
        else if (p->buckets_seen != p->db->n_buckets)
            status = parse_fail(p, NULL,
                                "the file ends after %d of the %d buckets of \"buckets:\" on "
                                "line %d (a cut file?)",
                                p->buckets_seen, p->db->n_buckets, p->key_line[KEY_BUCKETS]);
    }
    return status;
}

/* Read a regular file of at most FILE_MAX_BYTES into a malloc'd buffer. */
static moegen_status read_whole_file(const char *path, char **text, size_t *bytes,
                                     moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    struct stat st;
    char *buffer = NULL;
    size_t used = 0;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot open: %s", path,
                                  strerror(saved));
        goto done;
    }
    if (fstat(fd, &st) != 0) {
        int saved = errno;
        status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot stat: %s", path,
                                  strerror(saved));
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, S_ISDIR(st.st_mode) ? EISDIR : EINVAL,
                                  "%s: not a regular file", path);
        goto done;
    }
    buffer = malloc(FILE_MAX_BYTES + 1);
    if (!buffer) {
        status = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, ENOMEM, "%s: out of memory", path);
        goto done;
    }
    /* Up to one byte past the limit, so that a file that grew since fstat is caught too. */
    while (used <= FILE_MAX_BYTES) {
        ssize_t got = read(fd, buffer + used, FILE_MAX_BYTES + 1 - used);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            int saved = errno;
            status = moegen_error_set(err, MOEGEN_ERR_IO, saved, "%s: cannot read: %s", path,
                                      strerror(saved));
            goto done;
        }
        if (got == 0) break;
        used += (size_t)got;
    }
    if (used > FILE_MAX_BYTES) {
        status = moegen_error_set(err, MOEGEN_ERR_IO, EFBIG,
                                  "%s: larger than any tuning file (at most %d bytes)", path,
                                  FILE_MAX_BYTES);
        goto done;
    }
    buffer[used] = '\0';
    *text = buffer;
    *bytes = used;
    buffer = NULL;
done:
    free(buffer);
    if (fd >= 0) close(fd);
    return status;
}

moegen_status moegen_tuning_db_read(const char *path, moegen_tuning_db *db, moegen_error *err) {
    moegen_status status = MOEGEN_OK;
    moegen_c_locale_scope locale;
    parser p;
    char *text = NULL;
    size_t bytes = 0;
    if (!path || !db)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "moegen_tuning_db_read: the path and the database must be given");
    moegen_error_clear(err);
    memset(db, 0, sizeof *db);
    status = read_whole_file(path, &text, &bytes, err);
    if (status != MOEGEN_OK) goto done;
    memset(&p, 0, sizeof p);
    p.path = path;
    p.err = err;
    p.db = db;
    moegen_c_locale_enter(&locale);
    status = parse_text(&p, text, bytes);
    moegen_c_locale_leave(&locale);
    if (status == MOEGEN_ERR_UNSUPPORTED) {
        int format = db->format;
        char version[sizeof db->moegen_version];
        memcpy(version, db->moegen_version, sizeof version);
        memset(db, 0, sizeof *db);
        db->format = format;
        memcpy(db->moegen_version, version, sizeof version);
    }
    if (status == MOEGEN_OK && !moegen_tuning_db_is_current(db)) status = MOEGEN_ERR_UNSUPPORTED;
    if (status == MOEGEN_ERR_UNSUPPORTED)
        moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                         "%s: written by moegen %s (tuning format %d); this is moegen %s (tuning "
                         "format %d)",
                         path, db->moegen_version[0] ? db->moegen_version : "(unknown)", db->format,
                         MOEGEN_VERSION, MOEGEN_TUNING_FORMAT);
done:
    if (status != MOEGEN_OK && status != MOEGEN_ERR_UNSUPPORTED) memset(db, 0, sizeof *db);
    free(text);
    return status;
}

/* ---- picking a bucket ------------------------------------------------------------------------ */

const moegen_tuning_bucket *moegen_tuning_db_pick(const moegen_tuning_db *db, int64_t n_tokens) {
    const moegen_tuning_bucket *picked = NULL;
    int n = db ? db->n_buckets : 0;
    if (n > MOEGEN_TUNING_MAX_BUCKETS) n = MOEGEN_TUNING_MAX_BUCKETS;
    /* Buckets are sorted: the last one starting at or below n_tokens holds it (or, in a gap,
     * is the one below); below the first, the first. */
    for (int i = 0; i < n; i++)
        if (i == 0 || db->buckets[i].min_tokens <= n_tokens)
            picked = &db->buckets[i];
        else
            break;
    return picked;
}

/* ---- file names ----------------------------------------------------------------------------- */

/* The slug of `text` (tuning_db.h): at most SLUG_BYTES - 1 characters. */
static void make_slug(const char *text, char out[SLUG_BYTES]) {
    size_t length = 0; /* of the whole slug, also past what out keeps */
    int in_run = 0;
    for (const char *c = text; *c; c++) {
        char mapped;
        if (is_slug_char(*c)) {
            mapped = *c;
            in_run = 0;
        } else if (!in_run) {
            mapped = '-';
            in_run = 1;
        } else {
            continue;
        }
        if (length == 0 && mapped == '.') mapped = '_';
        if (length < SLUG_MAX_CHARS) out[length] = mapped;
        length++;
    }
    if (length == 0) out[length++] = '_'; /* never an empty name */
    if (length > SLUG_MAX_CHARS) {
        char hex[65];
        moegen_sha256_hex(text, strlen(text), hex);
        moegen_text_format(out + SLUG_MAX_CHARS, SLUG_BYTES - SLUG_MAX_CHARS, "-%.*s", SLUG_HASH_HEX_CHARS,
                    hex);
    } else {
        out[length] = '\0';
    }
}

void moegen_tuning_db_file_name(const char *shape, const char *device, char *out, size_t size) {
    char shape_slug[SLUG_BYTES];
    char device_slug[SLUG_BYTES];
    if (!out || size == 0) return;
    make_slug(shape ? shape : "", shape_slug);
    make_slug(device ? device : "", device_slug);
    if (moegen_path_format(out, size, "%s/%s" FILE_SUFFIX, shape_slug, device_slug) != 0) out[0] = '\0';
}

/* ---- lookup -----------------------------------------------------------------------------------
 */

typedef struct lookup {
    const char *shape, *device, *family; /* family: NULL when the family rung is off */
    char shape_slug[SLUG_BYTES];
    char file_name[MOEGEN_TUNING_FILE_NAME_BYTES]; /* "<shape-slug>/<device-slug>.tune" */
    const char *device_file;                       /* "<device-slug>.tune", inside file_name */
    moegen_tuning_db *out;
    moegen_tuning_warning_fn warn;
    void *warn_ctx;
} lookup;

static void lookup_warn(const lookup *l, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void lookup_warn(const lookup *l, const char *fmt, ...) {
    char message[WARNING_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (l->warn)
        l->warn(l->warn_ctx, message);
    else
        fprintf(stderr, "moegen: warning: %s\n", message);
}

/* Whether a file of shape/device/family `db` could have served this lookup. */
static int is_relevant(const lookup *l, const moegen_tuning_db *db) {
    return strcmp(db->shape, l->shape) == 0 && (strcmp(db->device, l->device) == 0 ||
                                                (l->family && strcmp(db->family, l->family) == 0));
}

/* Read the file at `path`, whose name relative to its tuning directory is `name`, into
 * l->out. Returns 1 when it is a valid file of this build whose fields give back `name`;
 * else 0, with one warning unless the file is missing or stale but of no use here. */
static int read_candidate(const lookup *l, const char *path, const char *name) {
    moegen_error e;
    char own_name[MOEGEN_TUNING_FILE_NAME_BYTES];
    int usable = 0;
    moegen_status status = moegen_tuning_db_read(path, l->out, &e);
    if (status == MOEGEN_ERR_IO && (e.native_code == ENOENT || e.native_code == ENOTDIR)) {
        /* not there: the next rung or directory */
    } else if (status == MOEGEN_ERR_UNSUPPORTED) {
        /* Of another moegen version the file was read whole and says whether it mattered;
         * of another format nothing says, so it is reported. */
        if (l->out->n_buckets == 0 || is_relevant(l, l->out))
            lookup_warn(l, "skipping a stale tuning file: %s; run moegen tune again", e.message);
    } else if (status == MOEGEN_ERR_IO && e.native_code == 0) {
        lookup_warn(l, "skipping a corrupt tuning file: %s", e.message);
    } else if (status != MOEGEN_OK) {
        lookup_warn(l, "skipping an unreadable tuning file: %s", e.message);
    } else {
        moegen_tuning_db_file_name(l->out->shape, l->out->device, own_name, sizeof own_name);
        if (strcmp(own_name, name) != 0)
            lookup_warn(l,
                        "skipping tuning file %s: its shape and device fields belong in %s, not "
                        "in %s",
                        path, own_name, name);
        else
            usable = 1;
    }
    return usable;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Whether directory entry `name` is a candidate of the family rung. */
static int is_family_candidate_name(const lookup *l, const char *name) {
    size_t length = strlen(name);
    size_t suffix = strlen(FILE_SUFFIX);
    /* The exact file was judged (and warned about) on the first rung. */
    return name[0] != '.' && length > suffix && strcmp(name + length - suffix, FILE_SUFFIX) == 0 &&
           strcmp(name, l->device_file) != 0;
}

/* The sorted candidate names in `shape_dir` (malloc'd; *count of them). Missing: none. */
static char **list_candidates(const lookup *l, const char *shape_dir, size_t *count) {
    char **names = NULL;
    size_t used = 0, capacity = 0;
    struct dirent *item;
    DIR *listing = opendir(shape_dir);
    *count = 0;
    if (!listing) {
        if (errno != ENOENT && errno != ENOTDIR)
            lookup_warn(l, "cannot list tuning directory %s: %s", shape_dir, strerror(errno));
        return NULL;
    }
    while ((item = readdir(listing)) != NULL) {
        char *copy;
        if (!is_family_candidate_name(l, item->d_name)) continue;
        if (used == capacity) {
            size_t grown = capacity ? 2 * capacity : 16;
            char **bigger = realloc(names, grown * sizeof *names);
            if (!bigger) break;
            names = bigger;
            capacity = grown;
        }
        copy = strdup(item->d_name);
        if (!copy) break;
        names[used++] = copy;
    }
    if (item)
        lookup_warn(l, "out of memory listing tuning directory %s; some files were not looked at",
                    shape_dir);
    closedir(listing);
    if (used > 1)
        qsort(names, used, sizeof *names, compare_names); /* strcmp: the same order everywhere */
    *count = used;
    return names;
}

static moegen_tuning_rung find_exact(const lookup *l, const char *const *dirs, int n_dirs,
                                     char *source_path, size_t source_size) {
    moegen_tuning_rung rung = MOEGEN_TUNING_NONE;
    char path[PATH_MAX];
    for (int i = 0; i < n_dirs && rung == MOEGEN_TUNING_NONE; i++) {
        if (!dirs[i] || !dirs[i][0]) continue;
        if (moegen_path_format(path, sizeof path, "%s/%s", dirs[i], l->file_name) != 0) {
            lookup_warn(l, "tuning directory %s: the path of %s is too long", dirs[i],
                        l->file_name);
            continue;
        }
        /* A file of another shape or device with the same slugs is valid but not ours. */
        if (read_candidate(l, path, l->file_name) && strcmp(l->out->shape, l->shape) == 0 &&
            strcmp(l->out->device, l->device) == 0) {
            rung = MOEGEN_TUNING_EXACT;
            if (source_path) moegen_text_format(source_path, source_size, "%s", path);
        }
    }
    return rung;
}

static moegen_tuning_rung find_family(const lookup *l, const char *const *dirs, int n_dirs,
                                      char *source_path, size_t source_size) {
    moegen_tuning_rung rung = MOEGEN_TUNING_NONE;
    char shape_dir[PATH_MAX];
    char path[PATH_MAX];
    char name[MOEGEN_TUNING_FILE_NAME_BYTES];
    for (int i = 0; i < n_dirs && rung == MOEGEN_TUNING_NONE; i++) {
        size_t count = 0;
        char **names = NULL;
        if (!dirs[i] || !dirs[i][0]) continue;
        if (moegen_path_format(shape_dir, sizeof shape_dir, "%s/%s", dirs[i], l->shape_slug) != 0)
            continue; /* find_exact warned */
        names = list_candidates(l, shape_dir, &count);
        for (size_t j = 0; j < count && rung == MOEGEN_TUNING_NONE; j++) {
            if (moegen_path_format(path, sizeof path, "%s/%s", shape_dir, names[j]) != 0 ||
                moegen_path_format(name, sizeof name, "%s/%s", l->shape_slug, names[j]) != 0)
                continue; /* too long to be a name moegen makes */
            if (read_candidate(l, path, name) && strcmp(l->out->family, l->family) == 0 &&
                strcmp(l->out->shape, l->shape) == 0) {
                rung = MOEGEN_TUNING_FAMILY;
                if (source_path) moegen_text_format(source_path, source_size, "%s", path);
            }
        }
        for (size_t j = 0; j < count; j++)
            free(names[j]);
        free(names);
    }
    return rung;
}

moegen_status moegen_tuning_db_lookup(const char *const *dirs, int n_dirs, const char *shape,
                                      const char *device, const char *family, moegen_tuning_db *out,
                                      moegen_tuning_rung *rung, char *source_path,
                                      size_t source_size, moegen_tuning_warning_fn warn,
                                      void *warn_ctx) {
    lookup l;
    if (!shape || !device || !out || !rung || n_dirs < 0 || (!dirs && n_dirs > 0))
        return MOEGEN_ERR_INVALID_ARGUMENT;
    memset(&l, 0, sizeof l);
    l.shape = shape;
    l.device = device;
    l.family = family && family[0] ? family : NULL;
    l.out = out;
    l.warn = warn;
    l.warn_ctx = warn_ctx;
    make_slug(shape, l.shape_slug);
    moegen_tuning_db_file_name(shape, device, l.file_name, sizeof l.file_name);
    l.device_file = l.file_name + strlen(l.shape_slug) + 1;
    if (source_path && source_size > 0) source_path[0] = '\0';
    *rung = find_exact(&l, dirs, n_dirs, source_path, source_size);
    if (*rung == MOEGEN_TUNING_NONE && l.family)
        *rung = find_family(&l, dirs, n_dirs, source_path, source_size);
    if (*rung == MOEGEN_TUNING_NONE) memset(out, 0, sizeof *out);
    return MOEGEN_OK;
}

/* ---- the default search order ------------------------------------------------------------------
 */

/* Append `dirs[*count] = <text><suffix>` copied into storage; left out when it does not fit. */
static void add_stored_dir(const char **dirs, int max, int *count, char *storage,
                           size_t storage_size, size_t *used, const char *text,
                           const char *suffix) {
    if (*count >= max || *used >= storage_size) return;
    char *slot = storage + *used;
    if (moegen_path_format(slot, storage_size - *used, "%s%s", text, suffix) == 0) {
        dirs[(*count)++] = slot;
        *used += strlen(slot) + 1;
    } else {
        slot[0] = '\0';
    }
}

int moegen_tuning_default_dirs(const char *repo_tuning_dir, const char **dirs, int max,
                               char *storage, size_t storage_size) {
    int count = 0;
    size_t used = 0;
    const char *from_env = getenv("MOEGEN_TUNING_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (!dirs || max <= 0) return 0;
    if (!storage) storage_size = 0;
    if (from_env && from_env[0])
        add_stored_dir(dirs, max, &count, storage, storage_size, &used, from_env, "");
    if (xdg && xdg[0] == '/') /* XDG: relative values are to be ignored */
        add_stored_dir(dirs, max, &count, storage, storage_size, &used, xdg, "/moegen/tuning");
    else if (home && home[0])
        add_stored_dir(dirs, max, &count, storage, storage_size, &used, home,
                       "/.cache/moegen/tuning");
    if (repo_tuning_dir && repo_tuning_dir[0] && count < max) dirs[count++] = repo_tuning_dir;
    return count;
}
