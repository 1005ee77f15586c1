/* emit.h — from a validated spec and a variant to generated source files.
 *
 * Place in the pipeline: spec -> [gen: emit] -> compile -> load -> launch.
 * moegen_generate() builds the parameter tree the templates read (spec fields,
 * the variant, generator facts), renders the backend's entry templates and
 * returns the files in memory; moegen_generated_write() writes them to a
 * directory, touching only files whose content changed.
 *
 * Invariants owned here:
 *  - Spec values reach templates only as validated numbers, enum names and the
 *    sanitized identifier `spec.ident`; free text (source, description) and the raw
 *    name never do.
 *  - Output depends only on (canonical spec, variant, templates, generator version):
 *    no paths, times, environment or host facts.
 */
#ifndef MOEGEN_GEN_EMIT_H
#define MOEGEN_GEN_EMIT_H

#include <stddef.h>

#include "spec.h"
#include "template.h"
#include "variant.h"

#define MOEGEN_MAX_GENERATED_FILES 6
#define MOEGEN_BUILD_ID_CHARS 16

typedef struct moegen_generated_file {
    char name[160]; /* file name, no directory: "moe_mixtral_8x7b.c" (.cu for CUDA) */
    char *text;
    size_t len;
    moegen_line_origin *origins; /* origins[i]: template line of output line i + 1 (rendered files) */
    size_t n_origins;
} moegen_generated_file;

typedef struct moegen_generated {
    moegen_generated_file files[MOEGEN_MAX_GENERATED_FILES];
    int n_files;
    int main_file;          /* index of the translation unit to compile */
    char symbol_prefix[96]; /* "moe_<ident>": the file names' stem and every exported symbol's
                               prefix, stable across spec edits (generate-and-link) */
    char build_id[MOEGEN_BUILD_ID_CHARS + 1]; /* hex digest of (spec, variant, generator version,
                               templates): the header's build pin refers to the symbol
                               <prefix>_build_<build_id>, which only the matching source
                               defines, so mixing generations is a link error */
    char variant_name[128];
    char spec_hash[65];
    moegen_variant variant; /* the variant the files were rendered with (a copy): a backend
                               launches with these tiles and never recomputes them */
} moegen_generated;

/* Render every file of `variant->backend` for `spec` using `templates`
 * (NULL: the built-in set). Returns MOEGEN_OK, MOEGEN_ERR_INVALID_ARGUMENT (variant
 * does not fit the spec), MOEGEN_ERR_TEMPLATE or MOEGEN_ERR_NO_MEMORY. On failure
 * `out` holds nothing to free. */
moegen_status moegen_generate(const moegen_spec *spec, const moegen_variant *variant,
                              const moegen_template_set *templates, moegen_generated *out,
                              moegen_error *err);

void moegen_generated_free(moegen_generated *gen);

/* If err->message names a line of the main generated file ("x.cu(123)" as NVRTC writes
 * it, "x.c:123:" as cc does), append the template line it came from. */
void moegen_generated_annotate(const moegen_generated *gen, moegen_error *err);

/* "templates/cuda/router.cu.tpl:123" for line `line` (1-based) of generated file `file`,
 * or NULL when unknown. */
const char *moegen_generated_origin(const moegen_generated_file *file, long line, char *buf, size_t size);

/* Write the files into `dir` (created with its missing parents), each only if its content
 * differs from what is there (atomically: temp file + rename). *n_written (may be
 * NULL) receives the number of files actually written.
 * Returns MOEGEN_OK or MOEGEN_ERR_IO. */
moegen_status moegen_generated_write(const moegen_generated *gen, const char *dir, int *n_written,
                                     moegen_error *err);

#endif
