/* data_dir.h — where moegen's read-only data lives: the tuning databases shipped with it
 * (docs/tuning.md) and the copy of the templates an installation carries.
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

/* The directory of `what` ("tuning" or "templates") under the data directory, written into
 * `out`. Returns 0, or -1 when no rung gives an existing directory or the path does not fit
 * (out is then ""). */
int moegen_data_path(const char *what, char *out, size_t size);

#endif
