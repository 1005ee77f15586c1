/* text.c — a growable text buffer (cli/text.h). */
#include "text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moegen_cli_text_addv(moegen_cli_text *t, const char *fmt, va_list ap) {
    if (t->failed) return;
    va_list copy;
    va_copy(copy, ap);
    const int needed = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (needed < 0) {
        t->failed = 1;
        return;
    }
    if (t->length + (size_t)needed + 1 > t->capacity) {
        size_t capacity = t->capacity ? t->capacity : 256;
        while (t->length + (size_t)needed + 1 > capacity) capacity *= 2;
        char *grown = realloc(t->data, capacity);
        if (!grown) {
            t->failed = 1;
            return;
        }
        t->data = grown;
        t->capacity = capacity;
    }
    vsnprintf(t->data + t->length, t->capacity - t->length, fmt, ap);
    t->length += (size_t)needed;
}

void moegen_cli_text_add(moegen_cli_text *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    moegen_cli_text_addv(t, fmt, ap);
    va_end(ap);
}

const char *moegen_cli_text_str(const moegen_cli_text *t) { return t->data ? t->data : ""; }

void moegen_cli_text_free(moegen_cli_text *t) {
    free(t->data);
    memset(t, 0, sizeof *t);
}
