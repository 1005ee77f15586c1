/* plot_svg.h — plain SVG charts for `moegen bench --plot` and `moegen run --plot`.
 *
 * Two kinds of chart, written as hand-made SVG text (no dependency): a line chart of one
 * or more panels stacked over a shared x axis (log or linear axes), and a chart of bars
 * grouped by category with an optional horizontal reference line. Every chart has a title,
 * axis labels, ticks and a legend. The text depends only on the numbers and strings given
 * (same input, same bytes) and is well-formed XML: every string is escaped.
 * Elements a script can count: measured points are <circle class="point">, the points of
 * a bound (a dashed series) <circle class="bound">, bars <rect class="bar">.
 */
#ifndef MOEGEN_CLI_PLOT_SVG_H
#define MOEGEN_CLI_PLOT_SVG_H

#include <stddef.h>

/* One line: n points (x[i], y[i]). Points that cannot be placed (not finite, or <= 0 on a
 * log axis) are left out. */
typedef struct cli_plot_series {
    const char *label; /* legend text */
    const double *x, *y;
    int n;
    int dashed; /* a bound (e.g. a floor): drawn dashed, its points of class "bound" */
} cli_plot_series;

typedef struct cli_plot_panel {
    const char *y_label;
    int log_y;
    const cli_plot_series *series;
    int n_series;
} cli_plot_panel;

typedef struct cli_plot_line_chart {
    const char *title, *subtitle; /* subtitle may be NULL */
    const char *x_label;
    int log_x;
    const cli_plot_panel *panels; /* stacked top to bottom, all on the same x range */
    int n_panels;
} cli_plot_line_chart;

/* One value per category, drawn side by side with the other series' in each category. The
 * values are counts: the y axis starts at 0 and its ticks are whole numbers. */
typedef struct cli_plot_bars {
    const char *label;
    const double *values; /* [n_categories] */
} cli_plot_bars;

typedef struct cli_plot_bar_chart {
    const char *title, *subtitle; /* subtitle may be NULL */
    const char *x_label, *y_label;
    const char *category_name; /* in each bar's tooltip: "<category_name> <index>" */
    int n_categories;          /* categories 0 .. n - 1, labelled by their index */
    const cli_plot_bars *series;
    int n_series;
    const char *line_label; /* non-NULL: a dashed horizontal line at line_value (in the legend) */
    double line_value;
} cli_plot_bar_chart;

/* The SVG text of a chart (malloc'd, NUL-terminated; the caller frees it), or NULL when
 * out of memory. */
char *cli_plot_line_svg(const cli_plot_line_chart *chart);
char *cli_plot_bar_svg(const cli_plot_bar_chart *chart);

/* Whether a file can be written at `path` without creating anything: it is a writable
 * regular file, or it does not exist and its folder does and is writable. Returns 0, or
 * -1 with the reason in `message`. Call it before long work, then cli_plot_write. */
int cli_plot_check_path(const char *path, char *message, size_t size);

/* Write `text` to `path` through a temporary file in the same folder renamed over it (so
 * a reader never sees half a chart). Returns 0, or -1 with the reason in `message`. */
int cli_plot_write(const char *path, const char *text, char *message, size_t size);

#endif
