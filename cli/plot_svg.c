/* plot_svg.c — plain SVG charts (see plot_svg.h): the text is built in memory, every
 * coordinate printed with a fixed number of decimals and every string escaped, so the
 * same numbers always give the same bytes and the result parses as XML.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "plot_svg.h"
#include "text.h"

/* ---- Text ---------------------------------------------------------------------------------- */

typedef moegen_cli_text svg_text; /* cli/text.h */

/* Length of the well-formed UTF-8 sequence (of a character XML allows) at s, or 0. */
static int utf8_length(const unsigned char *s) {
    const unsigned char c = s[0];
    int n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F) || (c == 0xF0 && s[1] < 0x90) ||
        (c == 0xF4 && s[1] > 0x8F))
        return 0;                                                           /* overlong, surrogate, > U+10FFFF */
    if (c == 0xEF && s[1] == 0xBF && (s[2] == 0xBE || s[2] == 0xBF)) return 0; /* U+FFFE, U+FFFF */
    return n;
}

/* `text` as XML character data or attribute value: markup characters escaped; control
 * characters and bytes that are not well-formed UTF-8 become '?'. */
static void put_escaped(svg_text *t, const char *text) {
    const unsigned char *s = (const unsigned char *)(text ? text : "");
    while (*s) {
        const unsigned char c = *s;
        if (c == '&') moegen_cli_text_add(t, "&amp;");
        else if (c == '<') moegen_cli_text_add(t, "&lt;");
        else if (c == '>') moegen_cli_text_add(t, "&gt;");
        else if (c == '"') moegen_cli_text_add(t, "&quot;");
        else if (c == '\'') moegen_cli_text_add(t, "&#39;");
        else if (c < 0x20 || c == 0x7F) moegen_cli_text_add(t, "?");
        else if (c < 0x80) moegen_cli_text_add(t, "%c", c);
        else {
            const int n = utf8_length(s);
            if (n == 0) {
                moegen_cli_text_add(t, "?");
            } else {
                moegen_cli_text_add(t, "%.*s", n, (const char *)s);
                s += n - 1;
            }
        }
        s++;
    }
}

/* A number for a tick label or a tooltip: 4 significant digits, k / M / G for large ones. */
static void format_number(double v, char *out, size_t size) {
    const double a = fabs(v);
    if (a == 0) snprintf(out, size, "0");
    else if (a >= 1e13 || a < 1e-4) snprintf(out, size, "%.3g", v);
    else if (a >= 1e9) snprintf(out, size, "%.4gG", v / 1e9);
    else if (a >= 1e6) snprintf(out, size, "%.4gM", v / 1e6);
    else if (a >= 1e4) snprintf(out, size, "%.4gk", v / 1e3);
    else snprintf(out, size, "%.4g", v);
}

static const char *const palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                      "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
#define PALETTE_SIZE ((int)(sizeof palette / sizeof palette[0]))

/* ---- Axes ---------------------------------------------------------------------------------- */

#define MAX_TICKS 48

typedef struct plot_axis {
    int log;
    double lo, hi; /* the range drawn, in data units */
    double p0, p1; /* the pixels of lo and hi */
    double ticks[MAX_TICKS];
    int n_ticks;
} plot_axis;

static int placeable(double v, int log) { return isfinite(v) && (!log || v > 0); }

static double axis_pixel(const plot_axis *a, double v) {
    const double t = a->log ? (log10(v) - log10(a->lo)) / (log10(a->hi) - log10(a->lo)) : (v - a->lo) / (a->hi - a->lo);
    return a->p0 + t * (a->p1 - a->p0);
}

/* 1, 2 or 5 times a power of ten, the smallest not below x (> 0). */
static double nice_step(double x) {
    const double power = pow(10.0, floor(log10(x)));
    const double f = x / power;
    return (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 5.0 ? 5.0 : 10.0) * power;
}

/* Log ticks m * 10^k in [lo, hi] for the mantissas in `m`; returns the count. */
static int log_ticks(plot_axis *a, const int *m, int n_m) {
    a->n_ticks = 0;
    for (int k = (int)floor(log10(a->lo)); k <= (int)ceil(log10(a->hi)); k++)
        for (int i = 0; i < n_m; i++) {
            const double v = m[i] * pow(10.0, k);
            if (v >= a->lo * (1 - 1e-9) && v <= a->hi * (1 + 1e-9) && a->n_ticks < MAX_TICKS)
                a->ticks[a->n_ticks++] = v;
        }
    return a->n_ticks;
}

/* The range and ticks of an axis holding the values [min, max] (min > max: no values).
 * Linear axes start at 0 when every value is >= 0; `whole`: their ticks are whole numbers. */
static void axis_fit(plot_axis *a, int log, int whole, double min, double max) {
    a->log = log;
    if (log) {
        double lmin = min <= max ? log10(min) : 0.0, lmax = min <= max ? log10(max) : 1.0;
        if (lmax - lmin < 1.0) { /* at least a decade */
            const double mid = (lmin + lmax) / 2;
            lmin = mid - 0.5;
            lmax = mid + 0.5;
        }
        const double pad = 0.04 * (lmax - lmin);
        a->lo = pow(10.0, lmin - pad);
        a->hi = pow(10.0, lmax + pad);
        /* the coarsest of 10^k, {1, 2, 5} 10^k and {1 .. 9} 10^k that gives 3 ticks, else the
         * one that gives the most (at least 2), else the two ends */
        static const int mantissas[3][9] = {{1}, {1, 2, 5}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
        static const int n_mantissas[3] = {1, 3, 9};
        int best = -1, best_count = 1;
        for (int m = 0; m < 3; m++) {
            const int count = log_ticks(a, mantissas[m], n_mantissas[m]);
            if (count > 12) { /* many decades: every stride-th of them */
                const int stride = (count + 7) / 8;
                a->n_ticks = 0;
                for (int i = 0; i < count; i += stride) a->ticks[a->n_ticks++] = a->ticks[i];
            }
            if (count >= 3) return;
            if (count > best_count) best = m, best_count = count;
        }
        if (best >= 0) {
            log_ticks(a, mantissas[best], n_mantissas[best]);
        } else {
            a->n_ticks = 2;
            a->ticks[0] = a->lo;
            a->ticks[1] = a->hi;
        }
        return;
    }
    if (min > max) min = 0, max = 1;
    if (min > 0) min = 0;
    if (max <= min) max = min + 1;
    const double step = whole ? fmax(1.0, nice_step((max - min) / 5)) : nice_step((max - min) / 5);
    const double k0 = floor(min / step), k1 = ceil(max / step);
    a->lo = k0 * step;
    a->hi = k1 * step;
    a->n_ticks = 0;
    for (double k = k0; k <= k1 && a->n_ticks < MAX_TICKS; k++) a->ticks[a->n_ticks++] = k * step;
}

/* Grid lines, the frame, tick marks and labels of a plot area. */
static void put_frame(svg_text *t, const plot_axis *x, const plot_axis *y, int x_labels) {
    const double left = x->p0, right = x->p1, bottom = y->p0, top = y->p1;
    moegen_cli_text_add(t, "<g class=\"grid\" stroke=\"#e6e6e6\" stroke-width=\"1\">\n");
    for (int i = 0; i < y->n_ticks; i++) {
        const double py = axis_pixel(y, y->ticks[i]);
        moegen_cli_text_add(t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", left, py, right, py);
    }
    for (int i = 0; x_labels && i < x->n_ticks; i++) {
        const double px = axis_pixel(x, x->ticks[i]);
        moegen_cli_text_add(t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", px, top, px, bottom);
    }
    moegen_cli_text_add(t, "</g>\n");
    moegen_cli_text_add(t, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n", left, top,
        right - left, bottom - top);
    char label[32];
    moegen_cli_text_add(t, "<g class=\"y-ticks\" text-anchor=\"end\">\n");
    for (int i = 0; i < y->n_ticks; i++) {
        const double py = axis_pixel(y, y->ticks[i]);
        format_number(y->ticks[i], label, sizeof label);
        moegen_cli_text_add(t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>", left - 5, py, left, py);
        moegen_cli_text_add(t, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", left - 8, py + 4, label);
    }
    moegen_cli_text_add(t, "</g>\n");
    if (!x_labels) return;
    moegen_cli_text_add(t, "<g class=\"x-ticks\" text-anchor=\"middle\">\n");
    for (int i = 0; i < x->n_ticks; i++) {
        const double px = axis_pixel(x, x->ticks[i]);
        format_number(x->ticks[i], label, sizeof label);
        moegen_cli_text_add(t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>", px, bottom, px, bottom + 5);
        moegen_cli_text_add(t, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", px, bottom + 19, label);
    }
    moegen_cli_text_add(t, "</g>\n");
}

static void put_axis_labels(svg_text *t, const plot_axis *x, const plot_axis *y, const char *x_label,
                            const char *y_label) {
    const double cx = (x->p0 + x->p1) / 2, cy = (y->p0 + y->p1) / 2, lx = x->p0 - 62;
    moegen_cli_text_add(t, "<text class=\"x-label\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">", cx, y->p0 + 40);
    put_escaped(t, x_label);
    moegen_cli_text_add(t, "</text>\n<text class=\"y-label\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
           "transform=\"rotate(-90 %.1f %.1f)\">", lx, cy, lx, cy);
    put_escaped(t, y_label);
    moegen_cli_text_add(t, "</text>\n");
}

static void put_head(svg_text *t, double width, double height, const char *title, const char *subtitle) {
    moegen_cli_text_add(t, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
           "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
           "font-family=\"sans-serif\" font-size=\"12\">\n",
        width, height, width, height);
    moegen_cli_text_add(t, "<title>");
    put_escaped(t, title);
    moegen_cli_text_add(t, "</title>\n<rect width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", width, height);
    moegen_cli_text_add(t, "<text class=\"title\" x=\"20\" y=\"28\" font-size=\"16\" font-weight=\"bold\">");
    put_escaped(t, title);
    moegen_cli_text_add(t, "</text>\n");
    if (subtitle) {
        moegen_cli_text_add(t, "<text class=\"subtitle\" x=\"20\" y=\"48\" fill=\"#444\">");
        put_escaped(t, subtitle);
        moegen_cli_text_add(t, "</text>\n");
    }
}

static char *finish(svg_text *t) {
    moegen_cli_text_add(t, "</svg>\n");
    if (t->failed) {
        free(t->data);
        return NULL;
    }
    return t->data;
}

/* ---- Line chart ---------------------------------------------------------------------------- */

enum { LEFT = 90, LEGEND = 250, TOP = 72, PANEL_HEIGHT = 250, PANEL_GAP = 72, LINE_PLOT_WIDTH = 520 };

static void put_legend_line(svg_text *t, double x, double y, const char *color, int dashed, const char *label) {
    moegen_cli_text_add(t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"%s/>", x, y, x + 24,
        y, color, dashed ? " stroke-dasharray=\"6 4\"" : "");
    moegen_cli_text_add(t, "<text x=\"%.1f\" y=\"%.1f\">", x + 30, y + 4);
    put_escaped(t, label);
    moegen_cli_text_add(t, "</text>\n");
}

char *cli_plot_line_svg(const cli_plot_line_chart *chart) {
    svg_text t = {0};
    const double width = LEFT + LINE_PLOT_WIDTH + LEGEND;
    const double height = TOP + chart->n_panels * (PANEL_HEIGHT + PANEL_GAP) + 8;
    put_head(&t, width, height, chart->title, chart->subtitle);

    double x_min = INFINITY, x_max = -INFINITY;
    for (int p = 0; p < chart->n_panels; p++)
        for (int s = 0; s < chart->panels[p].n_series; s++) {
            const cli_plot_series *series = &chart->panels[p].series[s];
            for (int i = 0; i < series->n; i++)
                if (placeable(series->x[i], chart->log_x) && placeable(series->y[i], chart->panels[p].log_y)) {
                    x_min = fmin(x_min, series->x[i]);
                    x_max = fmax(x_max, series->x[i]);
                }
        }
    plot_axis x;
    axis_fit(&x, chart->log_x, 0, x_min, x_max);
    x.p0 = LEFT;
    x.p1 = LEFT + LINE_PLOT_WIDTH;

    for (int p = 0; p < chart->n_panels; p++) {
        const cli_plot_panel *panel = &chart->panels[p];
        double y_min = INFINITY, y_max = -INFINITY;
        for (int s = 0; s < panel->n_series; s++)
            for (int i = 0; i < panel->series[s].n; i++) {
                const double xv = panel->series[s].x[i], yv = panel->series[s].y[i];
                if (!placeable(xv, chart->log_x) || !placeable(yv, panel->log_y)) continue;
                y_min = fmin(y_min, yv);
                y_max = fmax(y_max, yv);
            }
        plot_axis y;
        axis_fit(&y, panel->log_y, 0, y_min, y_max);
        y.p1 = TOP + p * (PANEL_HEIGHT + PANEL_GAP);
        y.p0 = y.p1 + PANEL_HEIGHT;
        moegen_cli_text_add(&t, "<g class=\"panel\">\n");
        put_frame(&t, &x, &y, 1);
        put_axis_labels(&t, &x, &y, chart->x_label, panel->y_label);
        for (int s = 0; s < panel->n_series; s++) {
            const cli_plot_series *series = &panel->series[s];
            const char *color = palette[s % PALETTE_SIZE];
            /* the points in x order (insertion sort of their indices: few, and stable) */
            int *order = malloc(sizeof *order * (size_t)(series->n > 0 ? series->n : 1));
            if (!order) {
                t.failed = 1;
                break;
            }
            int n = 0;
            for (int i = 0; i < series->n; i++) {
                if (!placeable(series->x[i], chart->log_x) || !placeable(series->y[i], panel->log_y)) continue;
                int j = n++;
                for (; j > 0 && series->x[order[j - 1]] > series->x[i]; j--) order[j] = order[j - 1];
                order[j] = i;
            }
            moegen_cli_text_add(&t, "<g class=\"series\">\n<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s points=\"", color,
                series->dashed ? " stroke-dasharray=\"6 4\"" : "");
            for (int j = 0; j < n; j++)
                moegen_cli_text_add(&t, "%s%.1f,%.1f", j ? " " : "", axis_pixel(&x, series->x[order[j]]),
                    axis_pixel(&y, series->y[order[j]]));
            moegen_cli_text_add(&t, "\"/>\n");
            for (int j = 0; j < n; j++) {
                char xv[32], yv[32];
                snprintf(xv, sizeof xv, "%.6g", series->x[order[j]]);
                snprintf(yv, sizeof yv, "%.6g", series->y[order[j]]);
                moegen_cli_text_add(&t, "<circle class=\"%s\" cx=\"%.1f\" cy=\"%.1f\" r=\"%s\" fill=\"%s\"><title>",
                    series->dashed ? "bound" : "point", axis_pixel(&x, series->x[order[j]]),
                    axis_pixel(&y, series->y[order[j]]), series->dashed ? "2.5" : "3.5", color);
                put_escaped(&t, series->label);
                moegen_cli_text_add(&t, ": ");
                put_escaped(&t, chart->x_label);
                moegen_cli_text_add(&t, " = %s, ", xv);
                put_escaped(&t, panel->y_label);
                moegen_cli_text_add(&t, " = %s</title></circle>\n", yv);
            }
            moegen_cli_text_add(&t, "</g>\n");
            free(order);
        }
        moegen_cli_text_add(&t, "<g class=\"legend\">\n");
        for (int s = 0; s < panel->n_series; s++)
            put_legend_line(&t, x.p1 + 20, y.p1 + 14 + 20 * s, palette[s % PALETTE_SIZE], panel->series[s].dashed,
                            panel->series[s].label);
        moegen_cli_text_add(&t, "</g>\n</g>\n");
    }
    return finish(&t);
}

/* ---- Bar chart ----------------------------------------------------------------------------- */

enum { BAR_PLOT_HEIGHT = 300, BAR_MIN_WIDTH = 480, BAR_MAX_WIDTH = 1600 };

char *cli_plot_bar_svg(const cli_plot_bar_chart *chart) {
    svg_text t = {0};
    const int n_cat = chart->n_categories > 0 ? chart->n_categories : 0, n_series = chart->n_series;
    double plot_width = (double)n_cat * (n_series * 10 + 8);
    plot_width = plot_width < BAR_MIN_WIDTH ? BAR_MIN_WIDTH : plot_width > BAR_MAX_WIDTH ? BAR_MAX_WIDTH : plot_width;
    const double width = LEFT + plot_width + LEGEND, height = TOP + BAR_PLOT_HEIGHT + PANEL_GAP + 8;
    put_head(&t, width, height, chart->title, chart->subtitle);

    double y_max = -INFINITY;
    for (int s = 0; s < n_series; s++)
        for (int c = 0; c < n_cat; c++)
            if (isfinite(chart->series[s].values[c])) y_max = fmax(y_max, chart->series[s].values[c]);
    if (chart->line_label && isfinite(chart->line_value)) y_max = fmax(y_max, chart->line_value);
    plot_axis y, x;
    axis_fit(&y, 0, 1, y_max > -INFINITY ? 0.0 : 1.0, y_max > -INFINITY ? y_max : 0.0);
    y.p1 = TOP;
    y.p0 = TOP + BAR_PLOT_HEIGHT;
    /* x: category c spans [c, c + 1); labelled at its middle, every `step`-th category */
    memset(&x, 0, sizeof x);
    x.lo = 0;
    x.hi = n_cat > 0 ? n_cat : 1;
    x.p0 = LEFT;
    x.p1 = LEFT + plot_width;
    const double step = nice_step(fmax(1.0, ceil(n_cat / (plot_width / 32.0))));
    moegen_cli_text_add(&t, "<g class=\"panel\">\n");
    put_frame(&t, &x, &y, 0);
    moegen_cli_text_add(&t, "<g class=\"x-ticks\" text-anchor=\"middle\">\n");
    for (double c = 0; c < n_cat; c += step) {
        const double px = axis_pixel(&x, c + 0.5);
        moegen_cli_text_add(&t, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>", px, y.p0, px, y.p0 + 5);
        moegen_cli_text_add(&t, "<text x=\"%.1f\" y=\"%.1f\">%.0f</text>\n", px, y.p0 + 19, c);
    }
    moegen_cli_text_add(&t, "</g>\n");
    put_axis_labels(&t, &x, &y, chart->x_label, chart->y_label);
    const double group = (x.p1 - x.p0) / (n_cat > 0 ? n_cat : 1), bar = group * 0.8 / (n_series > 0 ? n_series : 1);
    for (int s = 0; s < n_series; s++) {
        moegen_cli_text_add(&t, "<g class=\"series\" fill=\"%s\">\n", palette[s % PALETTE_SIZE]);
        for (int c = 0; c < n_cat; c++) {
            const double v = chart->series[s].values[c], shown = isfinite(v) && v > 0 ? v : 0.0;
            const double top = axis_pixel(&y, shown), px = x.p0 + group * (c + 0.1) + bar * s;
            char value[32];
            snprintf(value, sizeof value, "%.6g", v);
            moegen_cli_text_add(&t, "<rect class=\"bar\" x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\"><title>", px, top, bar,
                y.p0 - top);
            put_escaped(&t, chart->category_name);
            moegen_cli_text_add(&t, " %d, ", c);
            put_escaped(&t, chart->series[s].label);
            moegen_cli_text_add(&t, ": %s</title></rect>\n", value);
        }
        moegen_cli_text_add(&t, "</g>\n");
    }
    if (chart->line_label && isfinite(chart->line_value)) {
        const double py = axis_pixel(&y, chart->line_value);
        char value[32];
        snprintf(value, sizeof value, "%.6g", chart->line_value);
        moegen_cli_text_add(&t, "<line class=\"reference\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                "stroke-width=\"2\" stroke-dasharray=\"6 4\"><title>", x.p0, py, x.p1, py, palette[3]);
        put_escaped(&t, chart->line_label);
        moegen_cli_text_add(&t, ": %s</title></line>\n", value);
    }
    moegen_cli_text_add(&t, "<g class=\"legend\">\n");
    for (int s = 0; s < n_series; s++) {
        const double lx = x.p1 + 20, ly = y.p1 + 14 + 20 * s;
        moegen_cli_text_add(&t, "<rect class=\"swatch\" x=\"%.1f\" y=\"%.1f\" width=\"24\" height=\"10\" fill=\"%s\"/>", lx, ly - 5,
            palette[s % PALETTE_SIZE]);
        moegen_cli_text_add(&t, "<text x=\"%.1f\" y=\"%.1f\">", lx + 30, ly + 4);
        put_escaped(&t, chart->series[s].label);
        moegen_cli_text_add(&t, "</text>\n");
    }
    if (chart->line_label && isfinite(chart->line_value))
        put_legend_line(&t, x.p1 + 20, y.p1 + 14 + 20 * n_series, palette[3], 1, chart->line_label);
    moegen_cli_text_add(&t, "</g>\n</g>\n");
    return finish(&t);
}

/* ---- Files --------------------------------------------------------------------------------- */

int cli_plot_check_path(const char *path, char *message, size_t size) {
    struct stat st;
    if (!path[0]) {
        snprintf(message, size, "the path is empty");
        return -1;
    }
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) snprintf(message, size, "%s is a folder", path);
        else if (!S_ISREG(st.st_mode)) snprintf(message, size, "%s is not a regular file", path);
        else if (access(path, W_OK) != 0) snprintf(message, size, "%s: %s", path, strerror(errno));
        else return 0;
        return -1;
    }
    if (errno != ENOENT) {
        snprintf(message, size, "%s: %s", path, strerror(errno));
        return -1;
    }
    char folder[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(folder, sizeof folder, ".");
    else if (slash == path) snprintf(folder, sizeof folder, "/");
    else snprintf(folder, sizeof folder, "%.*s", (int)(slash - path < 4095 ? slash - path : 4095), path);
    if (stat(folder, &st) != 0) {
        snprintf(message, size, "cannot write %s: folder %s: %s", path, folder, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(message, size, "cannot write %s: %s is not a folder", path, folder);
        return -1;
    }
    if (access(folder, W_OK | X_OK) != 0) {
        snprintf(message, size, "cannot write %s: folder %s: %s", path, folder, strerror(errno));
        return -1;
    }
    return 0;
}

int cli_plot_write(const char *path, const char *text, char *message, size_t size) {
    if (cli_plot_check_path(path, message, size) != 0) return -1;
    char temporary[4200];
    snprintf(temporary, sizeof temporary, "%.4096s.tmp%ld", path, (long)getpid());
    const int fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(message, size, "%s: %s", temporary, strerror(errno));
        return -1;
    }
    const size_t length = strlen(text);
    size_t done = 0;
    int failure = 0;
    while (done < length && !failure) {
        const ssize_t n = write(fd, text + done, length - done);
        if (n > 0) done += (size_t)n;
        else if (n == 0) failure = EIO;
        else if (errno != EINTR) failure = errno;
    }
    if (close(fd) != 0 && !failure) failure = errno;
    if (!failure && rename(temporary, path) != 0) failure = errno;
    if (failure) {
        snprintf(message, size, "%s: %s", path, strerror(failure));
        unlink(temporary);
        return -1;
    }
    return 0;
}
