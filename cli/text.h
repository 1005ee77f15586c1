/* text.h — a growable text buffer for the command's outputs that are built before they are
 * written (the YAML of `moegen import-hf`, the SVG charts of `--plot`). */
#ifndef MOEGEN_CLI_TEXT_H
#define MOEGEN_CLI_TEXT_H

#include <stdarg.h>
#include <stddef.h>

typedef struct moegen_cli_text {
    char *data;
    size_t length, capacity;
    int failed; /* an allocation or a format failed: the text is incomplete, later appends are ignored */
} moegen_cli_text;

/* Append printf-style text. */
void moegen_cli_text_addv(moegen_cli_text *t, const char *fmt, va_list ap);
void moegen_cli_text_add(moegen_cli_text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The text so far ("" when empty). */
const char *moegen_cli_text_str(const moegen_cli_text *t);

/* Free the buffer; the text is empty again. */
void moegen_cli_text_free(moegen_cli_text *t);

#endif
