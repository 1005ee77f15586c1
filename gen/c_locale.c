/* c_locale.c — the C locale for the length of one call (see c_locale.h). */
#define _GNU_SOURCE
#include "c_locale.h"

void moegen_c_locale_enter(moegen_c_locale_scope *scope) {
    scope->previous = (locale_t)0;
    scope->c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    if (scope->c_locale) scope->previous = uselocale(scope->c_locale);
}

void moegen_c_locale_leave(moegen_c_locale_scope *scope) {
    if (!scope->c_locale) return;
    uselocale(scope->previous);
    freelocale(scope->c_locale);
    scope->c_locale = (locale_t)0;
}
