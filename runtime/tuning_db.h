/* tuning_db.h — the tuning database: which kernel variant to run for each token count.
 *
 * Place in the pipeline: `moegen tune` times generated kernel variants per token-count
 * bucket and stores the winners here; a layer looks its file up at open and runs the
 * variant of the bucket its token count falls in. This module only stores and finds
 * files; it never times anything and never interprets a variant (gen/variant.c does).
 *
 * One file per (device, layer shape), at <dir>/<shape-slug>/<device-slug>.tune, in a
 * line-based, human-readable format documented for users in docs/tuning.md:
 *
 *   # moegen tuning database: which kernel variant to run for each token count (docs/tuning.md)
 *   format: 1
 *   moegen: 0.1.0
 *   date: 2026-11-30T09:12:00Z
 *   device: cpu Intel(R) Xeon(R) Platinum 8481C; avx512 amx-bf16; 2 threads
 *   family: cpu-x86_64-avx512-amx
 *   shape: backend=cpu E=8 k=2 H=256 F=512 act=swiglu dtype=bf16 ep=1 shared=0 residual=0 bias=0
 *   routing: skewed
 *   threads: 2
 *   buckets: 3
 *   #      tokens   timed   median_ms  default_ms  variant                name
 *   bucket 1-8          1      0.0861      0.0879  default                cpu_bf16_..._fc8b6e2a
 *   bucket 9-64        16      0.5997      0.9252  gemm=amx,tile_rows=6   cpu_bf16_..._fc8b6e2a
 *   bucket 65-inf     128      2.1038      5.9744  gemm=amx,tile_rows=4   cpu_bf16_..._fc8b6e2a
 *
 * Invariants owned here:
 *  - A file is written whole or not at all: to a temporary file in the same directory,
 *    fsynced, then rename()d over the old one. Readers never see a partial file.
 *  - Only a valid database is written (moegen_tuning_db_validate) and a file is only
 *    read into a valid one: buckets sorted, non-overlapping, 1 <= min <= max, the timed
 *    count inside the bucket, times finite and >= 0, strings without control characters.
 *  - Numbers are read and written in the C locale whatever the host program's locale.
 *  - Looking files up never fails because of a file: a missing directory or file is
 *    passed over, a corrupt, stale or misnamed one is skipped with a warning.
 */
#ifndef MOEGEN_RUNTIME_TUNING_DB_H
#define MOEGEN_RUNTIME_TUNING_DB_H

#include <stddef.h>
#include <stdint.h>

#include "moegen.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The file format this build reads and writes; a file of another format is "stale". */
#define MOEGEN_TUNING_FORMAT 1
#define MOEGEN_TUNING_MAX_BUCKETS 64
/* Enough for any name moegen_tuning_db_file_name makes (two slugs of at most 129 bytes). */
#define MOEGEN_TUNING_FILE_NAME_BYTES 272
/* Enough storage for moegen_tuning_default_dirs (two paths of up to 4096 bytes). */
#define MOEGEN_TUNING_DIRS_STORAGE_BYTES 8192

/* One token-count range and the variant that won it. */
typedef struct moegen_tuning_bucket {
    int64_t min_tokens;           /* the inclusive range [min_tokens, max_tokens] */
    int64_t max_tokens;           /* INT64_MAX: no upper end, written "inf" */
    char variant[200];            /* variant override list, e.g. "gemm=amx,tile_rows=6,tile_cols=4,
                                     block_rows=96,block_cols=64,router_block=64,vector_floats=16";
                                     "" (the default variant) is written "default" */
    char variant_name[200];       /* the variant's full name, for people, e.g.
                                     cpu_bf16_e8k2_h256f512_v16r6c4b96x64q64amx_fc8b6e2a */
    double median_ms, default_ms; /* measured median of the winner and of the default variant at
                                     timed_tokens; stored to 6 significant digits */
    int64_t timed_tokens;         /* the token count that was timed for this bucket (in range) */
} moegen_tuning_bucket;

/* The contents of one file. Strings are NUL-terminated, on one line, without leading or
 * trailing blanks; variant and variant_name also without blanks (they are columns). */
typedef struct moegen_tuning_db {
    int format;              /* MOEGEN_TUNING_FORMAT */
    char moegen_version[32]; /* MOEGEN_VERSION of the writer */
    char date[32];           /* when it was tuned, ISO 8601 UTC: 2026-11-30T09:12:00Z */
    char device[160];        /* exact device, e.g. "cpu Intel(R) Xeon(R) Platinum 8481C; avx512
                                amx-bf16; 2 threads" */
    char family[64];         /* device family, e.g. "cpu-x86_64-avx512-amx" */
    char shape[256];         /* the layer-shape key: opaque here (the caller's key=value words) */
    char routing[64];        /* the routing it was timed with: "skewed", "uniform", "zipf:1.2",
                                "from:DIR" */
    int threads;             /* CPU threads it was timed with (0: not applicable) */
    int n_buckets;           /* 1..MOEGEN_TUNING_MAX_BUCKETS in a file; sorted by min_tokens,
                                non-overlapping, the first normally starting at 1 */
    moegen_tuning_bucket buckets[MOEGEN_TUNING_MAX_BUCKETS];
} moegen_tuning_db;

/* Which rung of the lookup ladder found the file. */
typedef enum moegen_tuning_rung {
    MOEGEN_TUNING_NONE = 0,  /* no usable file: run the default heuristic */
    MOEGEN_TUNING_EXACT = 1, /* same shape and same device */
    MOEGEN_TUNING_FAMILY = 2 /* same shape, another device of the same family */
} moegen_tuning_rung;

/* Receives one line per file the lookup skipped (the file and the reason). */
typedef void (*moegen_tuning_warning_fn)(void *ctx, const char *message);

/* "none", "exact" or "family" (never NULL). */
const char *moegen_tuning_rung_name(moegen_tuning_rung rung);

/* Empty database of this build: format MOEGEN_TUNING_FORMAT, moegen_version MOEGEN_VERSION,
 * everything else zero. NULL is a no-op. */
void moegen_tuning_db_init(moegen_tuning_db *db);

/* Whether `db` is of this build (format and moegen version): a file that is not is stale. */
int moegen_tuning_db_is_current(const moegen_tuning_db *db);

/* Check everything moegen_tuning_db_write would refuse: format MOEGEN_TUNING_FORMAT; every
 * string non-empty (variant may be ""), on one line, without leading or trailing blanks;
 * moegen_version, variant and variant_name without blanks; date as YYYY-MM-DDTHH:MM:SSZ;
 * threads >= 0; 1..MOEGEN_TUNING_MAX_BUCKETS buckets, each 1 <= min <= max, min <=
 * timed_tokens <= max, times finite and >= 0, sorted and non-overlapping.
 * Returns MOEGEN_OK or MOEGEN_ERR_INVALID_ARGUMENT naming the field ("buckets[2].max_tokens:
 * ..."). */
moegen_status moegen_tuning_db_validate(const moegen_tuning_db *db, moegen_error *err);

/* Write `db` to `path` (docs/tuning.md): creates missing parent directories, writes a
 * temporary file next to `path`, fsyncs it and renames it over `path` (mode 0644), so the
 * old file is replaced whole or not at all and no temporary file is left behind.
 * Returns MOEGEN_OK, MOEGEN_ERR_INVALID_ARGUMENT (NULL argument or an invalid db, see
 * moegen_tuning_db_validate; nothing is written) or MOEGEN_ERR_IO (native_code: errno). */
moegen_status moegen_tuning_db_write(const char *path, const moegen_tuning_db *db,
                                     moegen_error *err);

/* Read the file at `path` into `db` with a strict parser (docs/tuning.md).
 * Returns:
 *  - MOEGEN_OK: a valid file of this build's format and moegen version.
 *  - MOEGEN_ERR_UNSUPPORTED: a stale file, "path: written by moegen X (tuning format N);
 *    this is moegen Y (tuning format M)". Of another moegen version: the whole file was
 *    read and is valid, `db` holds it. Of another format: only `format` (and
 *    `moegen_version` when a `moegen:` line was found) are set, the rest is zero, since the
 *    rest may use a syntax this build does not know.
 *  - MOEGEN_ERR_IO: the file could not be opened or read (native_code: errno, e.g. ENOENT
 *    when it is missing), or it is malformed (native_code 0, "path:line:col: what is
 *    wrong"). `db` is zeroed.
 *  - MOEGEN_ERR_INVALID_ARGUMENT: `path` or `db` is NULL. */
moegen_status moegen_tuning_db_read(const char *path, moegen_tuning_db *db, moegen_error *err);

/* The bucket to use for `n_tokens`: the one whose range holds it; below the first bucket
 * (e.g. 0 tokens), the first; beyond the last, the last; in a gap between two buckets,
 * the lower one. NULL when `db` is NULL or has no buckets. */
const moegen_tuning_bucket *moegen_tuning_db_pick(const moegen_tuning_db *db, int64_t n_tokens);

/* The file's path relative to a tuning directory: "<shape-slug>/<device-slug>.tune". A slug
 * keeps the characters [A-Za-z0-9._-], turns every run of other characters into one '-' and
 * a leading '.' into '_' (no hidden names, no "." or ".."); one longer than 120 characters
 * is cut to 120 and followed by '-' and the first 8 hex digits of the SHA-256 of the whole
 * string. `out` gets "" when `size` is too small (MOEGEN_TUNING_FILE_NAME_BYTES is enough);
 * NULL strings are taken as "". */
void moegen_tuning_db_file_name(const char *shape, const char *device, char *out, size_t size);

/* Find the tuning file for (shape, device) in `dirs` (searched in order; NULL or "" entries
 * and missing directories are passed over), climbing down the ladder:
 *   1. EXACT:  <dir>/<file name of (shape, device)> in each dir in turn, whose `shape` and
 *              `device` equal the ones asked for;
 *   2. FAMILY: in each dir in turn, the files <dir>/<shape-slug>/ *.tune in strcmp order of
 *              their names, the first whose `family` equals `family` and whose `shape`
 *              equals `shape` (skipped when `family` is NULL or "");
 *   3. NONE:   the default heuristic.
 * A file that is unreadable, corrupt, stale (moegen_tuning_db_read says
 * MOEGEN_ERR_UNSUPPORTED) or whose shape/device fields do not give back its own file name
 * is skipped with one warning naming it and why, through `warn` (NULL: printed to stderr as
 * "moegen: warning: ..."); files of another family or shape are passed over silently.
 * On EXACT and FAMILY `*out` holds the file and `source_path` (when non-NULL; truncated to
 * `source_size`) its path; on NONE `*out` is zeroed and `source_path` is "".
 * Returns MOEGEN_OK whatever the files, or MOEGEN_ERR_INVALID_ARGUMENT when shape, device,
 * out or rung is NULL, n_dirs < 0, or dirs is NULL with n_dirs > 0. */
moegen_status moegen_tuning_db_lookup(const char *const *dirs, int n_dirs, const char *shape,
                                      const char *device, const char *family, moegen_tuning_db *out,
                                      moegen_tuning_rung *rung, char *source_path,
                                      size_t source_size, moegen_tuning_warning_fn warn,
                                      void *warn_ctx);

/* The default search order for moegen_tuning_db_lookup, into dirs[0..max):
 *   1. $MOEGEN_TUNING_DIR when set and non-empty;
 *   2. the user's cache: $XDG_CACHE_HOME/moegen/tuning when XDG_CACHE_HOME is an absolute
 *      path, else $HOME/.cache/moegen/tuning when HOME is set and non-empty;
 *   3. `repo_tuning_dir` when non-NULL and non-empty (the tuning files that come with
 *      moegen; the pointer itself is stored).
 * The paths of 1 and 2 are copied into `storage` (MOEGEN_TUNING_DIRS_STORAGE_BYTES is
 * enough), so they stay valid whatever the environment does later; one that does not fit
 * is left out. Returns the number of entries filled (0 for NULL dirs or max <= 0). */
int moegen_tuning_default_dirs(const char *repo_tuning_dir, const char **dirs, int max,
                               char *storage, size_t storage_size);

#ifdef __cplusplus
}
#endif
#endif
