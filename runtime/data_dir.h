/* data_dir.h — where moegen's read-only data lives: the tuning databases shipped with it
 * (docs/tuning.md), the copy of the templates an installation carries, and which template
 * directory overrides the built-in templates.
 *
 * Place in the pipeline: a helper of the runtime (the CPU backend asks it where the shipped
 * tuning databases are). One rule, in this order:
 *   1. $MOEGEN_DATA_DIR, when set and non-empty;
 *   2. <dir of the binary holding libmoegen>/../share/moegen, when that directory exists: an
 *      installed libmoegen.so finds <prefix>/share/moegen, and a program linked with
 *      libmoegen.a (the installed `moegen` command) finds it beside its bin/;
 *   3. the source tree libmoegen was built from (a build tree used in place).
 */
#ifndef MOEGEN_RUNTIME_DATA_DIR_H
#define MOEGEN_RUNTIME_DATA_DIR_H

#include <stddef.h>

#include "moegen_status.h"

/* The directory of `what` ("tuning" or "templates") under the data directory, written into
 * `out`. Returns 0, or -1 when no rung gives an existing directory or the path does not fit
 * (out is then ""). */
int moegen_data_path(const char *what, char *out, size_t size);

/* The template directory a layer or `moegen gen` generates from: `explicit_dir` when given,
 * else $MOEGEN_TEMPLATE_DIR when set and non-empty, else none (out = "": the templates built
 * into the library). Returns MOEGEN_OK, or MOEGEN_ERR_INVALID_ARGUMENT when the path does
 * not fit or is not a directory (the message names it and where it came from). */
moegen_status moegen_template_dir(const char *explicit_dir, char *out, size_t size, moegen_error *err);

#endif
