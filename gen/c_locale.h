/* c_locale.h — run a call in the "C" locale on this thread, whatever the host program set.
 *
 * moegen reads and writes numbers with the C library and Lua (strtod, printf, Lua's
 * number <-> string conversions), all of which follow the locale. A host program that
 * calls setlocale(LC_ALL, "de_DE.UTF-8") would otherwise read `capacity_factor: 1.25` as
 * 1 (the parser stops at the '.') and write 1,25 into generated C. Every public entry
 * point of gen/ that parses or prints a number switches this thread to the C locale with
 * uselocale() for the length of the call and restores the caller's afterwards; other
 * threads and the process-wide locale are never touched.
 */
#ifndef MOEGEN_GEN_C_LOCALE_H
#define MOEGEN_GEN_C_LOCALE_H

#include <locale.h>

typedef struct moegen_c_locale_scope {
    locale_t c_locale; /* (locale_t)0 when newlocale failed: the call runs as it is */
    locale_t previous;
} moegen_c_locale_scope;

void moegen_c_locale_enter(moegen_c_locale_scope *scope);
void moegen_c_locale_leave(moegen_c_locale_scope *scope);

#endif
