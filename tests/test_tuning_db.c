/* test_tuning_db.c — tests of the tuning database (runtime/tuning_db.c, docs/tuning.md).
 *
 * Place in the pipeline: `moegen tune` writes these files, a layer looks its file up at open.
 * Covers: write -> read round trips field by field (and byte-identical rewrites, also in a
 * comma-decimal locale where one is installed); the atomic write (parents created, no
 * temporary file left, an existing file replaced whole, a failed rename leaving nothing
 * behind); what the writer refuses; corrupt files failing with the right path:line:col;
 * stale files (another moegen version, another format) told apart from corrupt and
 * missing ones; the documented example; pick() at the bucket edges; file names; the lookup
 * ladder across two directories with its warnings; the default search order.
 *
 * Invariants: each test works in its own mkdtemp directory, removed afterwards; environment
 * variables and the locale a test changes are restored.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "cache.h"
#include "sha256.h"
#include "test_support.h"
#include "tuning_db.h"

#define SHAPE                                                                                      \
    "backend=cpu E=8 k=2 H=256 F=512 act=swiglu dtype=bf16 ep=1 shared=0x0 residual=0 bias=0"
#define DEVICE "cpu Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz; avx512-amx"
#define FAMILY "cpu-x86_64-avx512-amx"
/* Another shape with the same slug as SHAPE. */
#define SHAPE_TWIN                                                                                 \
    "backend:cpu E=8 k=2 H=256 F=512 act=swiglu dtype=bf16 ep=1 shared=0x0 residual=0 bias=0"
#define MAX_WARNINGS 16
#define TEXT_BYTES 65536

typedef struct warnings {
    int count;
    char message[MAX_WARNINGS][2048];
} warnings;

typedef struct fixture {
    char dir[PATH_MAX];
    warnings warned;
    char *saved_locale;  /* non-NULL: the teardown restores LC_ALL ... */
    char *saved_locpath; /* ... and LOCPATH (NULL: unset), also after a failed assertion */
} fixture;

/* ---- helpers ------------------------------------------------------------------------------ */

static int setup_fixture(void **state) {
    int result = -1;
    const char *base = getenv("TMPDIR");
    fixture *f = calloc(1, sizeof *f);
    if (!base || base[0] != '/') base = "/tmp";
    if (f) {
        snprintf(f->dir, sizeof f->dir, "%s/moegen-test-tuning-XXXXXX", base);
        if (mkdtemp(f->dir)) result = 0;
    }
    if (result != 0)
        free(f);
    else
        *state = f;
    return result;
}

static int teardown_fixture(void **state) {
    fixture *f = *state;
    if (f->saved_locale) {
        setlocale(LC_ALL, f->saved_locale);
        if (f->saved_locpath)
            setenv("LOCPATH", f->saved_locpath, 1);
        else
            unsetenv("LOCPATH");
        free(f->saved_locale);
        free(f->saved_locpath);
    }
    (void)moegen_remove_tree(f->dir);
    free(f);
    return 0;
}

static void record_warning(void *ctx, const char *message) {
    warnings *w = ctx;
    if (w->count < MAX_WARNINGS)
        snprintf(w->message[w->count], sizeof w->message[0], "%s", message);
    w->count++;
}

static void write_text_file(const char *path, const char *text) {
    FILE *file = fopen(path, "w");
    assert_non_null(file);
    assert_true(fputs(text, file) >= 0);
    assert_int_equal(fclose(file), 0);
}

static long read_text_file(const char *path, char *out, size_t size) {
    long length = -1;
    FILE *file = fopen(path, "rb");
    if (file) {
        length = (long)fread(out, 1, size - 1, file);
        out[length] = '\0';
        fclose(file);
    }
    return length;
}

static int count_entries(const char *path) {
    char command[PATH_MAX + 64];
    int count = 0;
    char line[PATH_MAX];
    format_text(command, sizeof command, "ls -A '%s'", path);
    FILE *listing = popen(command, "r");
    assert_non_null(listing);
    while (fgets(line, sizeof line, listing))
        count++;
    pclose(listing);
    return count;
}

static void make_directory(const char *path) {
    char command[PATH_MAX + 64];
    format_text(command, sizeof command, "mkdir -p '%s'", path);
    assert_int_equal(system(command), 0);
}

static void set_bucket(moegen_tuning_bucket *b, int64_t min, int64_t max, int64_t timed,
                       double median, double fallback, const char *variant, const char *name) {
    b->min_tokens = min;
    b->max_tokens = max;
    b->timed_tokens = timed;
    b->median_ms = median;
    b->default_ms = fallback;
    format_text(b->variant, sizeof b->variant, "%s", variant);
    format_text(b->variant_name, sizeof b->variant_name, "%s", name);
}

/* The database of the docs/tuning.md example, for any shape, device and family. */
static void sample_db(moegen_tuning_db *db, const char *shape, const char *device,
                      const char *family) {
    moegen_tuning_db_init(db);
    format_text(db->date, sizeof db->date, "2026-11-30T09:12:00Z");
    format_text(db->device, sizeof db->device, "%s", device);
    format_text(db->family, sizeof db->family, "%s", family);
    format_text(db->shape, sizeof db->shape, "%s", shape);
    format_text(db->routing, sizeof db->routing, "skewed");
    db->threads = 2;
    db->n_buckets = 3;
    set_bucket(&db->buckets[0], 1, 8, 1, 0.0861, 0.0879, "",
               "cpu_bf16_e8k2_h256f512_v16r6c4b64x64q64amx_fc8b6e2a");
    set_bucket(&db->buckets[1], 9, 64, 16, 0.5997, 0.9252,
               "gemm=amx,tile_rows=6,tile_cols=4,block_rows=96,block_cols=64",
               "cpu_bf16_e8k2_h256f512_v16r6c4b96x64q64amx_fc8b6e2a");
    set_bucket(&db->buckets[2], 65, INT64_MAX, 128, 2.1038, 5.9744,
               "gemm=amx,tile_rows=6,tile_cols=4,block_rows=96,block_cols=64,router_block=64,"
               "vector_floats=16",
               "cpu_bf16_e8k2_h256f512_v16r6c4b96x64q64amx_fc8b6e2a");
}

static void assert_db_equal(const moegen_tuning_db *a, const moegen_tuning_db *b) {
    assert_int_equal(a->format, b->format);
    assert_string_equal(a->moegen_version, b->moegen_version);
    assert_string_equal(a->date, b->date);
    assert_string_equal(a->device, b->device);
    assert_string_equal(a->family, b->family);
    assert_string_equal(a->shape, b->shape);
    assert_string_equal(a->routing, b->routing);
    assert_int_equal(a->threads, b->threads);
    assert_int_equal(a->n_buckets, b->n_buckets);
    for (int i = 0; i < a->n_buckets; i++) {
        const moegen_tuning_bucket *x = &a->buckets[i], *y = &b->buckets[i];
        assert_true(x->min_tokens == y->min_tokens);
        assert_true(x->max_tokens == y->max_tokens);
        assert_true(x->timed_tokens == y->timed_tokens);
        assert_true(x->median_ms == y->median_ms); /* 6 significant digits: exact here */
        assert_true(x->default_ms == y->default_ms);
        assert_string_equal(x->variant, y->variant);
        assert_string_equal(x->variant_name, y->variant_name);
    }
}

static void write_db(const char *path, const moegen_tuning_db *db) {
    moegen_error err;
    moegen_status status = moegen_tuning_db_write(path, db, &err);
    if (status != MOEGEN_OK) fail_msg("write %s: %s", path, err.message);
}

/* Write the database of (shape, device, family) where a lookup in `dir` expects it. */
static void place_db(const char *dir, const char *shape, const char *device, const char *family,
                     char *path, size_t path_size) {
    moegen_tuning_db db;
    char name[MOEGEN_TUNING_FILE_NAME_BYTES];
    sample_db(&db, shape, device, family);
    moegen_tuning_db_file_name(shape, device, name, sizeof name);
    format_text(path, path_size, "%s/%s", dir, name);
    write_db(path, &db);
}

static int is_zeroed(const moegen_tuning_db *db) {
    static const moegen_tuning_db zero;
    return memcmp(db, &zero, sizeof zero) == 0;
}

/* ---- write and read ------------------------------------------------------------------------ */

static void test_round_trip(void **state) {
    fixture *f = *state;
    moegen_tuning_db db, back;
    moegen_error err;
    char path[PATH_MAX], again[PATH_MAX];
    char text[TEXT_BYTES], text_again[TEXT_BYTES];
    sample_db(&db, SHAPE, DEVICE, FAMILY);
    format_text(path, sizeof path, "%s/deep/er/x.tune", f->dir); /* parents do not exist */
    write_db(path, &db);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_OK);
    assert_int_equal(err.code, MOEGEN_OK);
    assert_db_equal(&db, &back);
    assert_true(moegen_tuning_db_is_current(&back));
    /* The empty override list is written as "default" and comes back empty. */
    assert_string_equal(back.buckets[0].variant, "");
    assert_true(back.buckets[2].max_tokens == INT64_MAX);
    /* What was read writes back byte for byte. */
    format_text(again, sizeof again, "%s/again.tune", f->dir);
    write_db(again, &back);
    assert_true(read_text_file(path, text, sizeof text) > 0);
    assert_true(read_text_file(again, text_again, sizeof text_again) > 0);
    assert_string_equal(text, text_again);
    /* People read it: the documented lines are there. */
    assert_non_null(strstr(text, "\nformat: 1\n"));
    assert_non_null(strstr(text, "\ndevice: " DEVICE "\n"));
    assert_non_null(strstr(text, "\nbuckets: 3\n"));
    assert_non_null(strstr(text, "\nbucket 1-8 "));
    assert_non_null(strstr(text, "\nbucket 65-inf "));
    const char *first_bucket = strstr(text, "\nbucket 1-8 ");
    assert_non_null(first_bucket);
    assert_non_null(strstr(first_bucket, "  default "));
    assert_true(strstr(first_bucket, "  default ") <
                strstr(first_bucket, "  cpu_bf16_e8k2_h256f512_v16r6c4b64x64q64amx_fc8b6e2a\n"));
    assert_non_null(strstr(text, " 0.0861 "));
    /* A time with more digits keeps 6 significant ones. */
    db.buckets[1].median_ms = 1.23456789;
    db.buckets[1].default_ms = 1234567.0;
    write_db(path, &db);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_OK);
    assert_true(back.buckets[1].median_ms == 1.23457);
    assert_true(back.buckets[1].default_ms == 1.23457e6);
}

/* A comma-decimal locale must change nothing. One is built with localedef when none is
 * installed (a second or two); without localedef the test is skipped. */
static void test_round_trip_in_comma_locale(void **state) {
    fixture *f = *state;
    static const char *const LOCALES[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8"};
    const char *old_locpath = getenv("LOCPATH");
    const char *used = NULL;
    moegen_tuning_db db, back;
    moegen_error err;
    char path[PATH_MAX], text[TEXT_BYTES], locales[PATH_MAX], command[2 * PATH_MAX];
    char probe[16];
    f->saved_locale = strdup(setlocale(LC_ALL, NULL));
    assert_non_null(f->saved_locale);
    f->saved_locpath = old_locpath ? strdup(old_locpath) : NULL;
    for (size_t i = 0; !used && i < sizeof LOCALES / sizeof LOCALES[0]; i++)
        if (setlocale(LC_ALL, LOCALES[i])) used = LOCALES[i];
    if (!used) {
        format_text(locales, sizeof locales, "%s/locales", f->dir);
        format_text(command, sizeof command,
                    "localedef -i de_DE -f UTF-8 '%s/de_DE.UTF-8' > /dev/null 2>&1", locales);
        make_directory(locales);
        if (system(command) == 0) {
            assert_int_equal(setenv("LOCPATH", locales, 1), 0);
            if (setlocale(LC_ALL, "de_DE.UTF-8")) used = "de_DE.UTF-8";
        }
    }
    if (!used) {
        print_message("no comma-decimal locale (none installed, localedef failed); skipped\n");
        skip();
    }
    snprintf(probe, sizeof probe, "%g", 1.5);
    assert_string_equal(probe, "1,5"); /* the test really runs in a comma locale */
    sample_db(&db, SHAPE, DEVICE, FAMILY);
    format_text(path, sizeof path, "%s/x.tune", f->dir);
    write_db(path, &db);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_OK);
    assert_true(read_text_file(path, text, sizeof text) > 0);
    snprintf(probe, sizeof probe, "%g", 1.5);
    assert_string_equal(probe, "1,5"); /* and the caller's locale is left as it was */
    assert_non_null(strstr(text, " 0.0861 "));
    assert_db_equal(&db, &back);
}

static void test_write_is_atomic(void **state) {
    fixture *f = *state;
    moegen_tuning_db big, small, back;
    moegen_error err;
    char dir[PATH_MAX], path[PATH_MAX], reference[PATH_MAX];
    char text[TEXT_BYTES], reference_text[TEXT_BYTES];
    struct stat st;
    sample_db(&big, SHAPE, DEVICE, FAMILY);
    big.n_buckets = MOEGEN_TUNING_MAX_BUCKETS;
    for (int i = 0; i < MOEGEN_TUNING_MAX_BUCKETS; i++)
        set_bucket(&big.buckets[i], 10 * i + 1,
                   i + 1 == MOEGEN_TUNING_MAX_BUCKETS ? INT64_MAX : 10 * i + 10, 10 * i + 1, 1.5,
                   2.5, "tile_rows=6", "cpu_long_variant_name_to_make_the_file_big");
    sample_db(&small, SHAPE, DEVICE, FAMILY);
    small.n_buckets = 1;
    small.buckets[0].max_tokens = INT64_MAX;
    format_text(dir, sizeof dir, "%s/db", f->dir);
    format_text(path, sizeof path, "%s/x.tune", dir);
    write_db(path, &big);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_OK);
    assert_int_equal(back.n_buckets, MOEGEN_TUNING_MAX_BUCKETS);
    /* The smaller file replaces the bigger one whole: nothing of the old tail is left. */
    write_db(path, &small);
    format_text(reference, sizeof reference, "%s/reference.tune", f->dir);
    write_db(reference, &small);
    assert_true(read_text_file(path, text, sizeof text) > 0);
    assert_true(read_text_file(reference, reference_text, sizeof reference_text) > 0);
    assert_string_equal(text, reference_text);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_OK);
    assert_int_equal(back.n_buckets, 1);
    /* No temporary file is left, and the file is readable by others (it is for sharing). */
    assert_int_equal(count_entries(dir), 1);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);
    /* A failed rename (the target is a directory) reports the error and leaves nothing. */
    char blocked[PATH_MAX], inside[PATH_MAX];
    format_text(blocked, sizeof blocked, "%s/blocked.tune", dir);
    format_text(inside, sizeof inside, "%s/keep", blocked);
    make_directory(inside);
    assert_int_equal(moegen_tuning_db_write(blocked, &small, &err), MOEGEN_ERR_IO);
    assert_int_not_equal(err.native_code, 0);
    assert_non_null(strstr(err.message, blocked));
    assert_int_equal(count_entries(dir), 2); /* x.tune and blocked.tune/ */
    /* A path under a regular file cannot have its directory made. */
    char under_file[PATH_MAX];
    format_text(under_file, sizeof under_file, "%s/x.tune/y.tune", dir);
    assert_int_equal(moegen_tuning_db_write(under_file, &small, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOTDIR);
    assert_int_equal(moegen_tuning_db_write(NULL, &small, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_tuning_db_write(path, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
}

typedef void (*db_mutation)(moegen_tuning_db *db);

static void overlap(moegen_tuning_db *db) {
    db->buckets[1].min_tokens = 8;
}
static void unsorted(moegen_tuning_db *db) {
    moegen_tuning_bucket first = db->buckets[0];
    db->buckets[0] = db->buckets[1];
    db->buckets[1] = first;
}
static void min_zero(moegen_tuning_db *db) {
    db->buckets[0].min_tokens = 0;
}
static void max_below_min(moegen_tuning_db *db) {
    db->buckets[1].max_tokens = 8;
}
static void timed_outside(moegen_tuning_db *db) {
    db->buckets[1].timed_tokens = 65;
}
static void empty_name(moegen_tuning_db *db) {
    db->buckets[2].variant_name[0] = '\0';
}
static void newline_in_device(moegen_tuning_db *db) {
    strcpy(db->device, "cpu\nx");
}
static void newline_in_variant(moegen_tuning_db *db) {
    strcpy(db->buckets[1].variant, "a=1\nb=2");
}
static void blank_in_variant(moegen_tuning_db *db) {
    strcpy(db->buckets[1].variant, "a=1, b=2");
}
static void literal_default(moegen_tuning_db *db) {
    strcpy(db->buckets[1].variant, "default");
}
static void no_buckets(moegen_tuning_db *db) {
    db->n_buckets = 0;
}
static void too_many_buckets(moegen_tuning_db *db) {
    db->n_buckets = MOEGEN_TUNING_MAX_BUCKETS + 1;
}
static void other_format(moegen_tuning_db *db) {
    db->format = 2;
}
static void bad_date(moegen_tuning_db *db) {
    strcpy(db->date, "30.11.2026");
}
static void nan_time(moegen_tuning_db *db) {
    db->buckets[0].median_ms = NAN;
}
static void negative_time(moegen_tuning_db *db) {
    db->buckets[0].default_ms = -1.0;
}
static void negative_threads(moegen_tuning_db *db) {
    db->threads = -1;
}
static void empty_family(moegen_tuning_db *db) {
    db->family[0] = '\0';
}
static void trailing_blank(moegen_tuning_db *db) {
    strcpy(db->shape, "E=8 ");
}
static void blank_version(moegen_tuning_db *db) {
    strcpy(db->moegen_version, "0.1 beta");
}

static void test_write_refuses_invalid(void **state) {
    fixture *f = *state;
    static const struct {
        db_mutation mutate;
        const char *field; /* what the message must name */
    } CASES[] = {
        {overlap, "buckets[1].min_tokens"},
        {unsorted, "buckets[1].min_tokens"},
        {min_zero, "buckets[0].min_tokens"},
        {max_below_min, "buckets[1].max_tokens"},
        {timed_outside, "buckets[1].timed_tokens"},
        {empty_name, "buckets[2].variant_name"},
        {newline_in_device, "device"},
        {newline_in_variant, "buckets[1].variant"},
        {blank_in_variant, "buckets[1].variant"},
        {literal_default, "buckets[1].variant"},
        {no_buckets, "n_buckets"},
        {too_many_buckets, "n_buckets"},
        {other_format, "format"},
        {bad_date, "date"},
        {nan_time, "buckets[0].median_ms"},
        {negative_time, "buckets[0].default_ms"},
        {negative_threads, "threads"},
        {empty_family, "family"},
        {trailing_blank, "shape"},
        {blank_version, "moegen_version"},
    };
    char path[PATH_MAX], before[TEXT_BYTES], after[TEXT_BYTES];
    moegen_tuning_db good;
    sample_db(&good, SHAPE, DEVICE, FAMILY);
    format_text(path, sizeof path, "%s/x.tune", f->dir);
    write_db(path, &good);
    assert_true(read_text_file(path, before, sizeof before) > 0);
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        moegen_tuning_db db = good;
        moegen_error err;
        char expected[128];
        CASES[i].mutate(&db);
        assert_int_equal(moegen_tuning_db_validate(&db, &err), MOEGEN_ERR_INVALID_ARGUMENT);
        assert_int_equal(moegen_tuning_db_write(path, &db, &err), MOEGEN_ERR_INVALID_ARGUMENT);
        format_text(expected, sizeof expected, "moegen_tuning_db_write: %s", CASES[i].field);
        if (strncmp(err.message, expected, strlen(expected)) != 0)
            fail_msg("case %zu: expected \"%s...\", got \"%s\"", i, expected, err.message);
    }
    /* The file that was there is untouched and nothing else appeared. */
    assert_true(read_text_file(path, after, sizeof after) > 0);
    assert_string_equal(before, after);
    assert_int_equal(count_entries(f->dir), 1);
    assert_int_equal(moegen_tuning_db_validate(&good, NULL), MOEGEN_OK);
}

/* The lines of a valid file, numbered as in the comments. */
#define L1 "# a comment\n"
#define L2 "format: 1\n"
#define L3 "moegen: " MOEGEN_VERSION "\n"
#define L4 "date: 2026-11-30T09:12:00Z\n"
#define L5 "device: cpu test\n"
#define L6 "family: cpu-test\n"
#define L7 "shape: backend=cpu E=8\n"
#define L8 "routing: skewed\n"
#define L9 "threads: 2\n"
#define L10 "buckets: 2\n"
#define L11 "bucket 1-8 1 0.0861 0.0879 default cpu_a\n"
#define L12 "bucket 9-64 16 0.5997 0.9252 gemm=amx,tile_rows=6 cpu_b\n"
#define HEADER L1 L2 L3 L4 L5 L6 L7 L8 L9 L10

static void test_read_valid_variations(void **state) {
    fixture *f = *state;
    char path[PATH_MAX];
    moegen_tuning_db db;
    moegen_error err;
    format_text(path, sizeof path, "%s/x.tune", f->dir);
    /* Comments and blank lines anywhere, blanks around values and between columns, keys in
     * any order after format, a finite last bucket, a gap between buckets. */
    write_text_file(path, "\n# top\n  format:   1  \n\n" L7 "# between\n" L5 L3 L4 L6 L8 L9 L10
                          "\n   # indented comment\n"
                          "bucket\t1-8   1 0.0861 0.0879\tdefault cpu_a   \n"
                          "# gap follows\n"
                          "bucket 20-64 20 5e-1 1E0 gemm=amx cpu_b\n\n");
    assert_int_equal(moegen_tuning_db_read(path, &db, &err), MOEGEN_OK);
    assert_int_equal(db.format, 1);
    assert_string_equal(db.shape, "backend=cpu E=8");
    assert_string_equal(db.device, "cpu test");
    assert_int_equal(db.n_buckets, 2);
    assert_true(db.buckets[1].min_tokens == 20 && db.buckets[1].max_tokens == 64);
    assert_true(db.buckets[1].median_ms == 0.5 && db.buckets[1].default_ms == 1.0);
    assert_string_equal(db.buckets[1].variant, "gemm=amx");
    assert_string_equal(db.buckets[0].variant_name, "cpu_a");
}

static void test_read_rejects_corrupt(void **state) {
    fixture *f = *state;
    static const struct {
        const char *name;
        const char *text;
        int line;
        const char *at; /* the error points at this text in the line; NULL: col */
        int col;
        const char *says;
    } CASES[] = {
        {"cut inside a line", HEADER L11 "bucket 9-64 16 0.59", 12, NULL, 20,
         "does not end with a newline"},
        {"cut after a line", HEADER L11, 12, NULL, 1, "ends after 1 of the 2 buckets"},
        {"cut in the header", L1 L2 L3 L4 L5, 6, NULL, 1, "missing header key \"family\""},
        {"empty", "", 1, NULL, 1, "missing header key \"format\""},
        {"bad number", HEADER L11 "bucket 9-64 16 0.5x97 0.9252 v=1 cpu_b\n", 12, "0.5x97", 0,
         "median_ms: expected a decimal number"},
        {"nan", HEADER L11 "bucket 9-64 16 nan 0.9252 v=1 cpu_b\n", 12, "nan", 0, "median_ms"},
        {"hex float", HEADER L11 "bucket 9-64 16 0.5 0x1p3 v=1 cpu_b\n", 12, "0x1p3", 0,
         "default_ms"},
        {"negative time", HEADER L11 "bucket 9-64 16 -0.5 1 v=1 cpu_b\n", 12, "-0.5", 0,
         "median_ms is not a finite number >= 0"},
        {"bad header number", L1 L2 L3 L4 L5 L6 L7 L8 "threads: two\n" L10 L11 L12, 9, "two", 0,
         "threads: expected a whole number"},
        {"signed count", L1 L2 L3 L4 L5 L6 L7 L8 "threads: +2\n" L10 L11 L12, 9, "+2", 0,
         "threads"},
        {"huge count", HEADER L11 "bucket 9-64 99999999999999999999 1 1 v=1 cpu_b\n", 12, "99999",
         0, "timed_tokens"},
        {"bad range", HEADER L11 "bucket 9..64 16 1 1 v=1 cpu_b\n", 12, "9..64", 0,
         "expected a token range"},
        {"bad range end", HEADER L11 "bucket 9-infinity 16 1 1 v=1 cpu_b\n", 12, "infinity", 0,
         "or \"inf\""},
        {"unknown key", L1 L2 L3 L4 L5 "colour: blue\n" L6 L7 L8 L9 L10 L11 L12, 6, NULL, 1,
         "unknown key \"colour\""},
        {"duplicate key", L1 L2 L3 L4 L5 L6 "device: other\n" L7 L8 L9 L10 L11 L12, 7, NULL, 1,
         "duplicate key \"device\" (first on line 5)"},
        {"key after the buckets", HEADER L11 L12 "threads: 3\n", 13, NULL, 1,
         "duplicate key \"threads\" (first on line 9)"},
        {"overlapping buckets", HEADER L11 "bucket 8-64 16 0.5997 0.9252 v=1 cpu_b\n", 12, "8-64",
         0, "overlaps or comes before the previous bucket 1-8"},
        {"unsorted buckets", HEADER "bucket 9-64 16 1 1 v=1 cpu_b\n" L11, 12, "1-8", 0,
         "overlaps or comes before the previous bucket 9-64"},
        {"max below min", HEADER L11 "bucket 64-9 16 1 1 v=1 cpu_b\n", 12, "9 16", 0,
         "max_tokens 9 is below min_tokens 64"},
        {"min zero", HEADER "bucket 0-8 1 1 1 v=1 cpu_a\n" L12, 11, "0-8", 0,
         "token counts start at 1"},
        {"timed outside", HEADER L11 "bucket 9-64 65 1 1 v=1 cpu_b\n", 12, "65", 0,
         "timed_tokens 65 is outside the bucket 9-64"},
        {"missing header key", L1 L2 L3 L4 L5 L6 L7 L9 L10 L11 L12, 10, NULL, 1,
         "missing header key \"routing\" before the first bucket"},
        {"format not first", L1 L3 L2 L4 L5 L6 L7 L8 L9 L10 L11 L12, 2, NULL, 1,
         "the first key must be \"format\""},
        {"more buckets than announced", HEADER L11 L12 "bucket 65-inf 128 1 1 v=1 cpu_c\n", 13,
         NULL, 1, "more bucket lines than the 2 of \"buckets:\" on line 10"},
        {"no buckets announced", L1 L2 L3 L4 L5 L6 L7 L8 L9 "buckets: 0\n", 10, "0", 0,
         "buckets is 0"},
        {"too few fields", HEADER L11 "bucket 9-64 16 1 1 v=1\n", 12, NULL, 23,
         "has 5 of its 6 fields"},
        {"too many fields", HEADER L11 "bucket 9-64 16 1 1 v=1 cpu_b extra\n", 12, "extra", 0,
         "unexpected text after the variant name"},
        {"empty value", L1 L2 L3 L4 "device:\n" L6 L7 L8 L9 L10 L11 L12, 5, NULL, 8,
         "device is empty"},
        {"bad date", L1 L2 L3 "date: yesterday\n" L5 L6 L7 L8 L9 L10 L11 L12, 4, "yesterday", 0,
         "date is not an ISO 8601 UTC time"},
        {"carriage return", L1 L2 L3 L4 L5 L6 L7 L8 "threads: 2\r\n" L10 L11 L12, 9, "\r", 0,
         "control character 0x0d"},
        {"no colon", L1 L2 L3 L4 "device cpu test\n" L6 L7 L8 L9 L10 L11 L12, 5, NULL, 1,
         "expected \"key: value\" or a bucket line"},
    };
    char path[PATH_MAX];
    format_text(path, sizeof path, "%s/bad.tune", f->dir);
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        moegen_tuning_db db;
        moegen_error err;
        char expected[PATH_MAX + 64];
        int col = CASES[i].col;
        write_text_file(path, CASES[i].text);
        if (CASES[i].at) { /* the column of `at` in the offending line */
            const char *line = CASES[i].text;
            for (int n = 1; n < CASES[i].line; n++)
                line = strchr(line, '\n') + 1;
            const char *found = strstr(line, CASES[i].at);
            assert_non_null(found);
            col = (int)(found - line) + 1;
        }
        moegen_status status = moegen_tuning_db_read(path, &db, &err);
        format_text(expected, sizeof expected, "%s:%d:%d: ", path, CASES[i].line, col);
        if (status != MOEGEN_ERR_IO || err.native_code != 0 ||
            strncmp(err.message, expected, strlen(expected)) != 0 ||
            !strstr(err.message, CASES[i].says))
            fail_msg("%s: expected MOEGEN_ERR_IO \"%s...%s...\", got %s \"%s\"", CASES[i].name,
                     expected, CASES[i].says, moegen_status_name(status), err.message);
        assert_true(is_zeroed(&db));
    }
    /* A value longer than its field. */
    char text[TEXT_BYTES], long_device[300];
    memset(long_device, 'x', sizeof long_device - 1);
    long_device[sizeof long_device - 1] = '\0';
    format_text(text, sizeof text, L1 L2 L3 L4 "device: %s\n" L6 L7 L8 L9 L10 L11 L12, long_device);
    write_text_file(path, text);
    moegen_error err;
    moegen_tuning_db db;
    assert_int_equal(moegen_tuning_db_read(path, &db, &err), MOEGEN_ERR_IO);
    format_text(text, sizeof text, "%s:5:9: device: the value is longer than 159", path);
    assert_memory_equal(err.message, text, strlen(text));
}

static void test_read_stale_and_missing(void **state) {
    fixture *f = *state;
    moegen_tuning_db db, back;
    moegen_error err;
    char path[PATH_MAX];
    sample_db(&db, SHAPE, DEVICE, FAMILY);
    format_text(db.moegen_version, sizeof db.moegen_version, "0.0.9");
    format_text(path, sizeof path, "%s/old.tune", f->dir);
    write_db(path, &db);
    /* Another moegen version: read whole, reported stale (not corrupt). */
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_int_equal(err.code, MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, path));
    assert_non_null(strstr(err.message, "written by moegen 0.0.9 (tuning format 1)"));
    assert_non_null(strstr(err.message, "this is moegen " MOEGEN_VERSION));
    assert_db_equal(&db, &back);
    assert_false(moegen_tuning_db_is_current(&back));
    /* Another format: only the format and the writer are known; the rest is not parsed. */
    format_text(path, sizeof path, "%s/future.tune", f->dir);
    write_text_file(path, "# a future format\nformat: 2\nmoegen: 0.3.0\nbuckets {\n  whatever\n");
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "written by moegen 0.3.0 (tuning format 2)"));
    assert_int_equal(back.format, 2);
    assert_string_equal(back.moegen_version, "0.3.0");
    assert_int_equal(back.n_buckets, 0);
    assert_string_equal(back.device, "");
    /* A corrupt file of this version is not stale. */
    write_text_file(path, "format: 1\nmoegen: " MOEGEN_VERSION "\nbuckets {\n");
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, 0);
    /* Missing, a directory, a FIFO (which must not block): errors with errno. */
    format_text(path, sizeof path, "%s/missing.tune", f->dir);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOENT);
    assert_int_equal(moegen_tuning_db_read(f->dir, &back, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, EISDIR);
    format_text(path, sizeof path, "%s/fifo.tune", f->dir);
    assert_int_equal(mkfifo(path, 0600), 0);
    assert_int_equal(moegen_tuning_db_read(path, &back, &err), MOEGEN_ERR_IO);
    assert_int_not_equal(err.native_code, 0);
    assert_int_equal(moegen_tuning_db_read(NULL, &back, &err), MOEGEN_ERR_INVALID_ARGUMENT);
}

/* The example of docs/tuning.md, kept here so that the documented file stays readable. */
static void test_documented_example(void **state) {
    fixture *f = *state;
    static const char EXAMPLE[] =
        "# moegen tuning database: which kernel variant to run for each token count (docs"
        "/tuning.md)\n"
        "format: 1\n"
        "moegen: " MOEGEN_VERSION "\n"
        "date: 2026-11-30T09:12:00Z\n"
        "device: cpu Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz; avx512-amx\n"
        "family: cpu-x86_64-avx512-amx\n"
        "shape: backend=cpu E=8 k=2 H=256 F=512 act=swiglu dtype=bf16 ep=1 shared=0x0 res"
        "idual=0 bias=0\n"
        "routing: skewed\n"
        "threads: 2\n"
        "buckets: 3\n"
        "#      tokens   timed   median_ms  default_ms  variant                          "
        "                                                              name\n"
        "bucket 1-8          1      0.0861      0.0879  default                          "
        "                                                              cpu_bf16_e8k2_h256"
        "f512_v16r6c4b64x64q64amx_fc8b6e2a\n"
        "bucket 9-64        16      0.5997      0.9252  gemm=amx,tile_rows=6,tile_cols=4,"
        "block_rows=96,block_cols=64                                   cpu_bf16_e8k2_h256"
        "f512_v16r6c4b96x64q64amx_fc8b6e2a\n"
        "bucket 65-inf     128      2.1038      5.9744  gemm=amx,tile_rows=6,tile_cols=4,"
        "block_rows=96,block_cols=64,router_block=64,vector_floats=16  cpu_bf16_e8k2_h256"
        "f512_v16r6c4b96x64q64amx_fc8b6e2a\n";
    moegen_tuning_db db, expected;
    moegen_error err;
    char path[PATH_MAX], written[TEXT_BYTES];
    format_text(path, sizeof path, "%s/example.tune", f->dir);
    write_text_file(path, EXAMPLE);
    if (moegen_tuning_db_read(path, &db, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    sample_db(&expected, SHAPE, DEVICE, FAMILY);
    assert_db_equal(&expected, &db);
    /* It is exactly what the writer makes of that database. */
    write_db(path, &expected);
    assert_true(read_text_file(path, written, sizeof written) > 0);
    assert_string_equal(written, EXAMPLE);
}

/* ---- pick ------------------------------------------------------------------------------------ */

static void test_pick(void **state) {
    (void)state;
    moegen_tuning_db db;
    sample_db(&db, SHAPE, DEVICE, FAMILY); /* 1-8, 9-64, 65-inf */
    assert_ptr_equal(moegen_tuning_db_pick(&db, 0), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, -5), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 1), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 8), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 9), &db.buckets[1]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 64), &db.buckets[1]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 65), &db.buckets[2]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, INT64_MAX), &db.buckets[2]);
    /* A finite last bucket: beyond it, the last one. */
    db.n_buckets = 2;
    assert_ptr_equal(moegen_tuning_db_pick(&db, 65), &db.buckets[1]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 1000000), &db.buckets[1]);
    /* A first bucket above 1: below it, the first; in a gap, the one below. */
    db.buckets[0].min_tokens = 4;
    db.buckets[1].min_tokens = 20;
    assert_ptr_equal(moegen_tuning_db_pick(&db, 2), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 12), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 20), &db.buckets[1]);
    db.n_buckets = 1;
    assert_ptr_equal(moegen_tuning_db_pick(&db, 0), &db.buckets[0]);
    assert_ptr_equal(moegen_tuning_db_pick(&db, 100), &db.buckets[0]);
    db.n_buckets = 0;
    assert_null(moegen_tuning_db_pick(&db, 5));
    assert_null(moegen_tuning_db_pick(NULL, 5));
}

/* ---- file names ------------------------------------------------------------------------------ */

static void test_file_name(void **state) {
    (void)state;
    char name[MOEGEN_TUNING_FILE_NAME_BYTES], other[MOEGEN_TUNING_FILE_NAME_BYTES];
    char expected[MOEGEN_TUNING_FILE_NAME_BYTES], hex[65];
    char long_shape[301], near_shape[301];
    moegen_tuning_db_file_name(SHAPE, DEVICE, name, sizeof name);
    assert_string_equal(name, "backend-cpu-E-8-k-2-H-256-F-512-act-swiglu-dtype-bf16-ep-1-"
                              "shared-0x0-residual-0-bias-0/"
                              "cpu-Intel-R-Xeon-R-Platinum-8481C-CPU-2.70GHz-avx512-amx.tune");
    /* No hidden names, no "." or "..", no other '/'. */
    moegen_tuning_db_file_name("..", "../../etc/passwd", name, sizeof name);
    assert_string_equal(name, "_./_.-..-etc-passwd.tune");
    moegen_tuning_db_file_name(".hidden", "x", name, sizeof name);
    assert_string_equal(name, "_hidden/x.tune");
    moegen_tuning_db_file_name("", NULL, name, sizeof name);
    assert_string_equal(name, "_/_.tune");
    moegen_tuning_db_file_name("a  b\t\n(c)", "ok_1.2-3", name, sizeof name);
    assert_string_equal(name, "a-b-c-/ok_1.2-3.tune");
    /* 120 characters are kept as they are; longer ones are cut and get a hash of the whole. */
    memset(long_shape, 'a', 120);
    long_shape[120] = '\0';
    moegen_tuning_db_file_name(long_shape, "d", name, sizeof name);
    format_text(expected, sizeof expected, "%s/d.tune", long_shape);
    assert_string_equal(name, expected);
    memset(long_shape, 'a', 300);
    long_shape[300] = '\0';
    moegen_sha256_hex(long_shape, 300, hex);
    moegen_tuning_db_file_name(long_shape, "d", name, sizeof name);
    format_text(expected, sizeof expected, "%.120s-%.8s/d.tune", long_shape, hex);
    assert_string_equal(name, expected);
    memcpy(near_shape, long_shape, sizeof near_shape);
    near_shape[299] = 'b'; /* differs after the cut: another name all the same */
    moegen_tuning_db_file_name(near_shape, "d", other, sizeof other);
    assert_string_not_equal(name, other);
    assert_int_equal(strlen(other), 120 + 1 + 8 + strlen("/d.tune"));
    /* The longest name fits the documented size; a smaller buffer gets "". */
    moegen_tuning_db_file_name(long_shape, long_shape, name, sizeof name);
    assert_int_equal(strlen(name), 2 * (120 + 1 + 8) + 1 + strlen(".tune"));
    moegen_tuning_db_file_name(SHAPE, DEVICE, name, 20);
    assert_string_equal(name, "");
}

/* ---- lookup ---------------------------------------------------------------------------------- */

typedef struct ladder {
    char d1[PATH_MAX], d2[PATH_MAX];
    const char *dirs[3];
    moegen_tuning_db db;
    moegen_tuning_rung rung;
    char source[PATH_MAX];
} ladder;

static void run_lookup(fixture *f, ladder *l, const char *family) {
    f->warned.count = 0;
    assert_int_equal(moegen_tuning_db_lookup(l->dirs, 3, SHAPE, DEVICE, family, &l->db, &l->rung,
                                             l->source, sizeof l->source, record_warning,
                                             &f->warned),
                     MOEGEN_OK);
}

static void test_lookup_ladder(void **state) {
    fixture *f = *state;
    ladder l;
    char exact2[PATH_MAX], family1[PATH_MAX], path[PATH_MAX], missing[PATH_MAX];
    char shape_dir1[PATH_MAX], shape_dir2[PATH_MAX];
    char exact_name[MOEGEN_TUNING_FILE_NAME_BYTES];
    memset(&l, 0, sizeof l);
    format_text(l.d1, sizeof l.d1, "%s/first", f->dir);
    format_text(l.d2, sizeof l.d2, "%s/second", f->dir);
    format_text(missing, sizeof missing, "%s/missing", f->dir);
    l.dirs[0] = l.d1;
    l.dirs[1] = l.d2;
    l.dirs[2] = missing; /* missing directories are fine */
    moegen_tuning_db_file_name(SHAPE, DEVICE, exact_name, sizeof exact_name);
    *strchr(exact_name, '/') = '\0';
    format_text(shape_dir1, sizeof shape_dir1, "%s/%s", l.d1, exact_name);
    format_text(shape_dir2, sizeof shape_dir2, "%s/%s", l.d2, exact_name);
    moegen_tuning_db_file_name(SHAPE, DEVICE, exact_name, sizeof exact_name);

    /* Nothing anywhere: NONE, the database zeroed, no warnings. */
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_NONE);
    assert_true(is_zeroed(&l.db));
    assert_string_equal(l.source, "");
    assert_int_equal(f->warned.count, 0);

    /* The exact file in the second directory beats a family file in the first. */
    place_db(l.d1, SHAPE, "cpu Another Xeon; avx512-amx", FAMILY, family1, sizeof family1);
    place_db(l.d2, SHAPE, DEVICE, FAMILY, exact2, sizeof exact2);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_EXACT);
    assert_string_equal(l.source, exact2);
    assert_string_equal(l.db.device, DEVICE);
    assert_int_equal(l.db.n_buckets, 3);
    assert_int_equal(f->warned.count, 0);
    assert_string_equal(moegen_tuning_rung_name(l.rung), "exact");

    /* Without the exact file: the family file. */
    assert_int_equal(unlink(exact2), 0);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.source, family1);
    assert_string_equal(l.db.device, "cpu Another Xeon; avx512-amx");
    assert_int_equal(f->warned.count, 0);
    assert_string_equal(moegen_tuning_rung_name(l.rung), "family");
    /* ... unless the family rung is off. */
    run_lookup(f, &l, NULL);
    assert_int_equal(l.rung, MOEGEN_TUNING_NONE);

    /* A corrupt exact file in the first directory: one warning naming it, and the ladder goes
     * on (to the exact file of the second directory when there is one, else the family). */
    format_text(path, sizeof path, "%s/%s", l.d1, exact_name);
    write_text_file(path, "format: 1\nmoegen: " MOEGEN_VERSION "\ngarbage\n");
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.source, family1);
    assert_int_equal(f->warned.count, 1);
    assert_non_null(strstr(f->warned.message[0], path));
    assert_non_null(strstr(f->warned.message[0], "corrupt"));
    place_db(l.d2, SHAPE, DEVICE, FAMILY, exact2, sizeof exact2);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_EXACT);
    assert_string_equal(l.source, exact2);
    assert_int_equal(f->warned.count, 1);
    assert_int_equal(unlink(path), 0);

    /* A stale exact file: skipped with a warning that says stale. */
    moegen_tuning_db stale;
    sample_db(&stale, SHAPE, DEVICE, FAMILY);
    format_text(stale.moegen_version, sizeof stale.moegen_version, "0.0.9");
    write_db(path, &stale);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_EXACT);
    assert_string_equal(l.source, exact2);
    assert_int_equal(f->warned.count, 1);
    assert_non_null(strstr(f->warned.message[0], "stale"));
    assert_non_null(strstr(f->warned.message[0], path));
    assert_int_equal(unlink(path), 0);

    /* A file whose fields do not give back its name (another device's file, copied): skipped
     * with a warning. */
    char copied[PATH_MAX], command[3 * PATH_MAX];
    format_text(copied, sizeof copied, "%s/%s", l.d1, exact_name);
    format_text(command, sizeof command, "cp '%s' '%s'", family1, copied);
    assert_int_equal(system(command), 0);
    assert_int_equal(unlink(exact2), 0);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.source, family1);
    assert_int_equal(f->warned.count, 1);
    assert_non_null(strstr(f->warned.message[0], copied));
    assert_non_null(strstr(f->warned.message[0], "belong in"));
    assert_int_equal(unlink(copied), 0);

    /* Family files: the first directory first, then by name; other families and other
     * shapes with the same slug are passed over silently; dot files, other suffixes and
     * corrupt files are not used (a corrupt one is warned about). */
    assert_int_equal(unlink(family1), 0);
    place_db(l.d1, SHAPE, "cpu zzz", FAMILY, family1, sizeof family1);
    place_db(l.d1, SHAPE, "cpu aaa", "cpu-other-family", path, sizeof path);
    place_db(l.d1, SHAPE_TWIN, "cpu bbb", FAMILY, path, sizeof path);
    place_db(l.d2, SHAPE, "cpu 000", FAMILY, path, sizeof path);
    format_text(path, sizeof path, "%s/.cpu-0.tune.XXXXXX", shape_dir1);
    write_text_file(path, "not a tuning file\n");
    format_text(path, sizeof path, "%s/README", shape_dir1);
    write_text_file(path, "not a tuning file\n");
    format_text(path, sizeof path, "%s/cpu-corrupt.tune", shape_dir1);
    write_text_file(path, "format: 1\n");
    format_text(path, sizeof path, "%s/cpu-fifo.tune", shape_dir1);
    assert_int_equal(mkfifo(path, 0600), 0);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.source, family1);
    assert_string_equal(l.db.device, "cpu zzz");
    assert_int_equal(f->warned.count, 2); /* cpu-corrupt.tune, then the FIFO */
    assert_non_null(strstr(f->warned.message[0], "cpu-corrupt.tune"));
    assert_non_null(strstr(f->warned.message[1], "cpu-fifo.tune"));
    assert_int_equal(unlink(family1), 0);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.db.device, "cpu 000");
    assert_non_null(strstr(l.source, l.d2));

    /* Only other families (and other shapes): NONE, no warning. */
    assert_int_equal(moegen_remove_tree(shape_dir2), 0);
    format_text(path, sizeof path, "%s/cpu-corrupt.tune", shape_dir1);
    assert_int_equal(unlink(path), 0);
    format_text(path, sizeof path, "%s/cpu-fifo.tune", shape_dir1);
    assert_int_equal(unlink(path), 0);
    run_lookup(f, &l, FAMILY);
    assert_int_equal(l.rung, MOEGEN_TUNING_NONE);
    assert_true(is_zeroed(&l.db));
    assert_string_equal(l.source, "");
    assert_int_equal(f->warned.count, 0);
    run_lookup(f, &l, "cpu-other-family");
    assert_int_equal(l.rung, MOEGEN_TUNING_FAMILY);
    assert_string_equal(l.db.device, "cpu aaa");

    /* Programming errors. */
    assert_int_equal(moegen_tuning_db_lookup(NULL, 1, SHAPE, DEVICE, FAMILY, &l.db, &l.rung, NULL,
                                             0, NULL, NULL),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_tuning_db_lookup(l.dirs, 3, NULL, DEVICE, FAMILY, &l.db, &l.rung, NULL,
                                             0, NULL, NULL),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_tuning_db_lookup(NULL, 0, SHAPE, DEVICE, FAMILY, &l.db, &l.rung, NULL,
                                             0, NULL, NULL),
                     MOEGEN_OK);
    assert_int_equal(l.rung, MOEGEN_TUNING_NONE);
}

/* ---- the default search order ---------------------------------------------------------------- */

typedef struct saved_env {
    const char *name;
    char *value; /* NULL: unset */
} saved_env;

static void set_env(const char *name, const char *value) {
    if (value)
        assert_int_equal(setenv(name, value, 1), 0);
    else
        assert_int_equal(unsetenv(name), 0);
}

static void test_default_dirs(void **state) {
    (void)state;
    saved_env saved[] = {{"MOEGEN_TUNING_DIR", NULL}, {"XDG_CACHE_HOME", NULL}, {"HOME", NULL}};
    const char *dirs[8];
    char storage[MOEGEN_TUNING_DIRS_STORAGE_BYTES];
    int n;
    for (size_t i = 0; i < 3; i++) {
        const char *value = getenv(saved[i].name);
        saved[i].value = value ? strdup(value) : NULL;
    }
    set_env("MOEGEN_TUNING_DIR", "/t/env");
    set_env("XDG_CACHE_HOME", "/t/xdg");
    set_env("HOME", "/t/home");
    n = moegen_tuning_default_dirs("/repo/tuning", dirs, 8, storage, sizeof storage);
    assert_int_equal(n, 3);
    assert_string_equal(dirs[0], "/t/env");
    assert_string_equal(dirs[1], "/t/xdg/moegen/tuning");
    assert_string_equal(dirs[2], "/repo/tuning");
    /* The paths are copies: changing the environment afterwards changes nothing. */
    set_env("MOEGEN_TUNING_DIR", "/t/changed");
    assert_string_equal(dirs[0], "/t/env");
    /* Empty MOEGEN_TUNING_DIR is unset; a relative XDG_CACHE_HOME is ignored for HOME. */
    set_env("MOEGEN_TUNING_DIR", "");
    set_env("XDG_CACHE_HOME", "relative/cache");
    n = moegen_tuning_default_dirs("/repo/tuning", dirs, 8, storage, sizeof storage);
    assert_int_equal(n, 2);
    assert_string_equal(dirs[0], "/t/home/.cache/moegen/tuning");
    assert_string_equal(dirs[1], "/repo/tuning");
    set_env("MOEGEN_TUNING_DIR", NULL);
    set_env("XDG_CACHE_HOME", NULL);
    n = moegen_tuning_default_dirs(NULL, dirs, 8, storage, sizeof storage);
    assert_int_equal(n, 1);
    assert_string_equal(dirs[0], "/t/home/.cache/moegen/tuning");
    set_env("HOME", NULL);
    assert_int_equal(moegen_tuning_default_dirs(NULL, dirs, 8, storage, sizeof storage), 0);
    assert_int_equal(moegen_tuning_default_dirs("", dirs, 8, storage, sizeof storage), 0);
    /* `max` and the storage bound what is filled. */
    set_env("MOEGEN_TUNING_DIR", "/t/env");
    set_env("XDG_CACHE_HOME", "/t/xdg");
    n = moegen_tuning_default_dirs("/repo/tuning", dirs, 1, storage, sizeof storage);
    assert_int_equal(n, 1);
    assert_string_equal(dirs[0], "/t/env");
    n = moegen_tuning_default_dirs("/repo/tuning", dirs, 8, storage, 10); /* "/t/env" only */
    assert_int_equal(n, 2);
    assert_string_equal(dirs[0], "/t/env");
    assert_string_equal(dirs[1], "/repo/tuning");
    n = moegen_tuning_default_dirs("/repo/tuning", dirs, 8, NULL, 0);
    assert_int_equal(n, 1);
    assert_string_equal(dirs[0], "/repo/tuning");
    assert_int_equal(moegen_tuning_default_dirs("/repo", NULL, 8, storage, sizeof storage), 0);
    for (size_t i = 0; i < 3; i++) {
        set_env(saved[i].name, saved[i].value);
        free(saved[i].value);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup_fixture, teardown_fixture),
        cmocka_unit_test_setup_teardown(test_round_trip_in_comma_locale, setup_fixture,
                                        teardown_fixture),
        cmocka_unit_test_setup_teardown(test_write_is_atomic, setup_fixture, teardown_fixture),
        cmocka_unit_test_setup_teardown(test_write_refuses_invalid, setup_fixture,
                                        teardown_fixture),
        cmocka_unit_test_setup_teardown(test_read_valid_variations, setup_fixture,
                                        teardown_fixture),
        cmocka_unit_test_setup_teardown(test_read_rejects_corrupt, setup_fixture, teardown_fixture),
        cmocka_unit_test_setup_teardown(test_read_stale_and_missing, setup_fixture,
                                        teardown_fixture),
        cmocka_unit_test_setup_teardown(test_documented_example, setup_fixture, teardown_fixture),
        cmocka_unit_test(test_pick),
        cmocka_unit_test(test_file_name),
        cmocka_unit_test_setup_teardown(test_lookup_ladder, setup_fixture, teardown_fixture),
        cmocka_unit_test(test_default_dirs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
