/* cli.h — shared pieces of the `moegen` command (cli/main.c, cli/run.c). */
#ifndef MOEGEN_CLI_H
#define MOEGEN_CLI_H

#include <stdarg.h>

/* Print "moegen: <message>" on stderr, one such line per line of the message (a spec's
 * several errors); returns 1 (the exit status). */
int moegen_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print a valid spec's warnings on stderr, "moegen: warning: file:line:col: ..." each. */
struct moegen_spec;
void moegen_cli_warnings(const struct moegen_spec *spec);

/* 1 if --help or -h is among the arguments. */
int moegen_cli_wants_help(int argc, char **argv);

/* Parse a decimal integer option value in [min, max]; prints an error and returns -1
 * on failure. */
int moegen_cli_parse_int(const char *text, const char *option, long long min, long long max,
                         long long *out);

/* A comma-separated list of integers in [min, max] (at most `capacity` of them) into out;
 * prints an error naming `option` and returns -1 on failure (an empty list, a bad item, too
 * many). Returns the count. */
int moegen_cli_parse_int_list(const char *text, const char *option, long long min, long long max, long long *out,
                              int capacity);

/* A monotonic clock in milliseconds, and the median of n timings (sorted in place). */
double moegen_cli_now_ms(void);
double moegen_cli_median(double *values, long long n);

/* `moegen run` and `moegen bench` (cli/run.c). */
int moegen_cli_run(int argc, char **argv);
int moegen_cli_bench(int argc, char **argv);

/* `text` as a JSON string, quotes included, in buffer (cut short, still valid, when it does
 * not fit); returns buffer (cli/run.c). */
const char *moegen_cli_json_text(const char *text, char *buffer, int size);

/* Where `moegen bench` writes its results. json = 0: the table on stdout; json = 1: stdout
 * holds JSON lines only (one object per measurement) and the table goes to stderr. Notices
 * go to stderr either way. plot_path, when not NULL: an SVG chart of the results. */
typedef struct moegen_cli_bench_output {
    int json;
    const char *plot_path;
} moegen_cli_bench_output;

/* `moegen tune` (cli/tune.c). */
int moegen_cli_tune(int argc, char **argv);

/* `moegen import-hf` (cli/import_hf.c). */
int moegen_cli_import_hf(int argc, char **argv);

#endif
