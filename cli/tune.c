/* tune.c — `moegen tune`: sweep generated kernel variants of a spec, verify and time each,
 * and write the winners per token-count bucket into a tuning database (runtime/tuning_db.h,
 * docs/tuning.md) that layers then use at open.
 *
 *   spec -> candidates (gen/variant_space.c: coarse, then fine around each bucket's best)
 *        -> in rounds of --jobs candidates, in sweep order, until the budget is spent:
 *        -> compile the round at once, each in a child process (the on-disk cache keeps the
 *           modules)
 *        -> one child per candidate, one at a time: open (cache hit), bind the weights the
 *           parent made before forking, verify against the double-precision reference,
 *           time every bucket's token count (a warm-up, repeats, median; a candidate 3x
 *           slower than the best so far at a count stops being timed there)
 *        -> per token count, a race: the finalists (the candidates within RACE_MARGIN of the
 *           count's best, the default heuristic's variant, the incumbents') are timed again in
 *           one child, alternated forward by forward, and the race's medians decide
 *        -> table, database.
 *
 * Isolation: a candidate that fails to compile, crashes, hangs past its time limit or
 * gives a wrong answer costs that candidate only: its child is killed or reports, and the
 * candidate is FAIL with the reason. The default heuristic's variants (the default and the
 * one of each of its token ranges, moegen_variant_default_ranges) are always candidates, timed
 * whatever the budget and never pruned, so the tuned layer is never slower than the untuned
 * layer in the measured run: a database replaces the heuristic for its shape. The same holds for
 * the incumbents, the variants of the database the run replaces (and of --incumbent files): a
 * re-tune never drops a variant without timing it against the new pick side by side.
 *
 * Fault injection for the tests: $MOEGEN_TUNE_INJECT="compile:I,crash:J,hang:K,wrong:L" makes
 * candidate I fail to compile (its child runs a compiler that does not exist), J crash, K
 * hang and L report a perturbed output to the verifier (candidate indices in sweep order);
 * "slow:K" makes the race of the K-th token count run the untuned variant three times per timed
 * forward, as a machine that slowed down would (the drift warning's test).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "forward_io.h"
#include "host_cc.h"
#include "moegen.h"
#include "npy.h"
#include "spec.h"
#include "tensors.h"
#include "tuning_db.h"
#include "variant.h"
#include "verify.h"

static const char usage_tune[] =
    "usage: moegen tune SPEC [options]\n"
    "\n"
    "Sweep generated kernel variants of SPEC: every candidate is compiled (in parallel),\n"
    "verified against the double-precision reference and timed at every token count, each\n"
    "in a child process under a time limit; the best verified variant of each token-count\n"
    "bucket goes into a tuning database that layers of this shape then use on this CPU\n"
    "(docs/tuning.md). The default variant is always a candidate.\n"
    "\n"
    "options:\n"
    "  --tokens LIST       token counts to time, one bucket each (default 1,16,128,1024)\n"
    "  --device D          cpu (the CUDA backend is not tuned yet)\n"
    "  --budget SECONDS    stop starting candidates after this long (default 600)\n"
    "  --routing R         skewed (default: zipf:1.2), uniform, zipf:S (expert popularity\n"
    "                      falls as 1/rank^S), or from:DIR (replay DIR/topk_ids.npy, e.g.\n"
    "                      from `moegen run --save DIR` or a model's saved routing; needs\n"
    "                      hidden_size >= num_experts)\n"
    "  --jobs N            compiles at once (default: the CPUs this process may use)\n"
    "  --threads N         CPU threads of the timed forwards (default: as a layer would)\n"
    "  --repeat N          timed forwards per token count and candidate (default 7)\n"
    "  --evict-mb N        write N MiB before every timed forward, so that the weights come\n"
    "                      from memory as they do in a model, whose other layers run between\n"
    "                      two calls of this one (default: twice the last-level cache; 0: warm\n"
    "                      caches)\n"
    "  --out DIR           database directory (default $MOEGEN_TUNING_DIR, else\n"
    "                      $XDG_CACHE_HOME/moegen/tuning or ~/.cache/moegen/tuning)\n"
    "  --no-write          print the table only\n"
    "  --cache-dir DIR     compile cache\n"
    "  --seed S            seed of the random tensors (default 1)\n"
    "  --timeout SECONDS   limit of one candidate's verify + timing child (default: 30 s plus\n"
    "                      20x the default variant's time)\n"
    "  --race-rounds N     alternated rounds of each token count's final race (default 9;\n"
    "                      0: no race, the sweep's medians decide)\n"
    "  --incumbent FILE    also race the variants of the tuning database FILE (repeatable);\n"
    "                      the database at the output path always races, if there is one\n"
    "  --no-incumbent      do not race the database at the output path\n"
    "  --keep-margin PCT   a race must beat the variant of the database at the output path by\n"
    "                      more than PCT % to replace it (default 3; 0: the fastest wins)\n";

#define MAX_COUNTS 16
#define MAX_CANDIDATES 256
#define PRUNE_FACTOR 3.0 /* a candidate this many times slower than the best stops being timed */
#define RACE_MARGIN 0.08 /* candidates within 8 % of a count's best sweep median race for it */
#define RACE_TOP 4       /* at most this many of them (fastest first) */
#define MAX_INCUMBENT_FILES 4
#define DRIFT_LIMIT 1.25 /* the untuned variant's race / sweep median beyond this: the machine's speed drifted */
/* The finalists of one count: RACE_TOP, the heuristic's variant, one per incumbent file. */
#define RACE_MAX (RACE_TOP + 1 + MAX_INCUMBENT_FILES + 1)

typedef enum { CAND_PENDING, CAND_PASS, CAND_FAIL, CAND_SKIPPED } cand_state;

typedef struct candidate {
    moegen_variant variant;
    char overrides[200], name[200];
    cand_state state;
    char why[300];
    double median_ms[MAX_COUNTS];
    int baseline;           /* one of the default heuristic's variants: no budget cut, no pruning */
    unsigned incumbent_at;  /* bit k: an incumbent database runs this variant at counts[k] (no budget cut) */
    unsigned replaced_at;   /* bit k: so does the database at the output path, the one this run replaces */
} candidate;

typedef struct tune_options {
    const char *spec_path, *cache_dir, *out_dir, *routing, *replay_dir;
    long long counts[MAX_COUNTS];
    int n_counts;
    long long budget_s, jobs, threads, repeat, seed, timeout_s;
    long long evict_mb; /* -1: twice the last-level cache (default_evict_mb) */
    int write;
    double zipf;
    long long race_rounds;
    long long keep_margin; /* percent: a race must beat the replaced database's variant by more than this */
    const char *incumbents[MAX_INCUMBENT_FILES]; /* --incumbent FILEs */
    int n_incumbents, no_incumbent;
} tune_options;

typedef struct injection {
    int compile, crash, hang, wrong; /* candidate indices, -1: none */
    int slow;                        /* a token-count index whose race runs the untuned variant 3x per timing */
} injection;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int compare_doubles(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int parse_tokens(const char *list, tune_options *o) {
    o->n_counts = moegen_cli_parse_int_list(list, "tune: --tokens", 1, INT32_MAX, o->counts, MAX_COUNTS);
    if (o->n_counts < 0) return 1;
    for (int i = 1; i < o->n_counts; i++)
        if (o->counts[i - 1] >= o->counts[i])
            return moegen_cli_error("tune: --tokens must increase (%lld after %lld)", o->counts[i], o->counts[i - 1]);
    return 0;
}

static int parse_options(int argc, char **argv, tune_options *o) {
    *o = (tune_options){
        .budget_s = 600, .repeat = 7, .seed = 1, .evict_mb = -1, .write = 1, .routing = "skewed", .zipf = 1.2,
        .race_rounds = 9, .keep_margin = 3};
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->jobs = cpus > 0 ? cpus : 1;
    if (parse_tokens("1,16,128,1024", o)) return 1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (o->spec_path) return moegen_cli_error("tune: unexpected argument %s", a);
            o->spec_path = a;
            continue;
        }
        if (!strcmp(a, "--no-write")) {
            o->write = 0;
            continue;
        }
        if (!strcmp(a, "--no-incumbent")) {
            o->no_incumbent = 1;
            continue;
        }
        if (!value) return moegen_cli_error("tune: option %s needs a value", a);
        i++;
        if (!strcmp(a, "--tokens")) {
            if (parse_tokens(value, o)) return 1;
        } else if (!strcmp(a, "--device")) {
            if (strcmp(value, "cpu") != 0)
                return moegen_cli_error("tune: --device %s: only the CPU backend is tuned in this version (the "
                                        "CUDA variant space needs a GPU to time)",
                                        value);
        } else if (!strcmp(a, "--budget")) {
            if (moegen_cli_parse_int(value, a, 1, 7 * 24 * 3600, &o->budget_s)) return 1;
        } else if (!strcmp(a, "--jobs")) {
            if (moegen_cli_parse_int(value, a, 1, 256, &o->jobs)) return 1;
        } else if (!strcmp(a, "--threads")) {
            if (moegen_cli_parse_int(value, a, 1, MOEGEN_THREAD_LIMIT, &o->threads)) return 1;
        } else if (!strcmp(a, "--repeat")) {
            if (moegen_cli_parse_int(value, a, 1, 10000, &o->repeat)) return 1;
        } else if (!strcmp(a, "--evict-mb")) {
            if (moegen_cli_parse_int(value, a, 0, 1 << 20, &o->evict_mb)) return 1;
        } else if (!strcmp(a, "--seed")) {
            if (moegen_cli_parse_int(value, a, 0, LLONG_MAX, &o->seed)) return 1;
        } else if (!strcmp(a, "--timeout")) {
            if (moegen_cli_parse_int(value, a, 1, 24 * 3600, &o->timeout_s)) return 1;
        } else if (!strcmp(a, "--race-rounds")) {
            if (moegen_cli_parse_int(value, a, 0, 1000, &o->race_rounds)) return 1;
        } else if (!strcmp(a, "--keep-margin")) {
            if (moegen_cli_parse_int(value, a, 0, 100, &o->keep_margin)) return 1;
        } else if (!strcmp(a, "--incumbent")) {
            if (o->n_incumbents == MAX_INCUMBENT_FILES)
                return moegen_cli_error("tune: at most %d --incumbent files", MAX_INCUMBENT_FILES);
            o->incumbents[o->n_incumbents++] = value;
        } else if (!strcmp(a, "--out")) {
            o->out_dir = value;
        } else if (!strcmp(a, "--cache-dir")) {
            o->cache_dir = value;
        } else if (!strcmp(a, "--routing")) {
            o->routing = value;
            if (!strcmp(value, "skewed")) {
                o->zipf = 1.2;
            } else if (!strcmp(value, "uniform")) {
                o->zipf = 0.0;
            } else if (!strncmp(value, "zipf:", 5)) {
                char *end;
                errno = 0;
                o->zipf = strtod(value + 5, &end);
                if (errno || end == value + 5 || *end || !(o->zipf >= 0.0 && o->zipf <= 8.0))
                    return moegen_cli_error("tune: --routing %s: S of zipf:S must be a number in [0, 8]", value);
            } else if (!strncmp(value, "from:", 5) && value[5]) {
                o->replay_dir = value + 5;
                o->zipf = 0.0;
            } else {
                return moegen_cli_error("tune: --routing must be skewed, uniform, zipf:S or from:DIR (got '%s')",
                                        value);
            }
        } else {
            return moegen_cli_error("tune: unknown option %s (see moegen tune --help)", a);
        }
    }
    if (!o->spec_path) return moegen_cli_error("tune: usage: moegen tune SPEC [options] (see --help)");
    return 0;
}

static void read_injection(injection *inj) {
    *inj = (injection){-1, -1, -1, -1, -1};
    const char *text = getenv("MOEGEN_TUNE_INJECT");
    if (!text) return;
    static const char *KINDS[] = {"compile:", "crash:", "hang:", "wrong:", "slow:"};
    int *slots[] = {&inj->compile, &inj->crash, &inj->hang, &inj->wrong, &inj->slow};
    for (int k = 0; k < 5; k++) {
        const char *at = strstr(text, KINDS[k]);
        if (at) *slots[k] = atoi(at + strlen(KINDS[k]));
    }
}

/* ---- Routing ------------------------------------------------------------------------------
 * Skew by construction, for any spec: every token's input gets a 1 in column 0 and expert
 * e's router row gets -S * ln(rank_e + 1) there (rank_e: e's place in a seeded random order),
 * so the logits of popular experts are lifted over the tokens' own random logits (about
 * 1/3 of a unit) and expert popularity falls roughly as 1 / rank^S. */
static void apply_routing(const moegen_spec *spec, moe_tensors *ts, double zipf, uint64_t seed) {
    if (zipf <= 0.0) return;
    const int E = spec->num_experts;
    int *order = malloc((size_t)E * sizeof *order);
    if (!order) return;
    for (int e = 0; e < E; e++) order[e] = e;
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int e = E - 1; e > 0; e--) { /* Fisher-Yates with a xorshift */
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        const int j = (int)(state % (uint64_t)(e + 1));
        const int t = order[e];
        order[e] = order[j];
        order[j] = t;
    }
    for (int rank = 0; rank < E; rank++)
        moe_tensor_set(ts, MOE_T_ROUTER_W, (size_t)order[rank] * (size_t)spec->hidden_size,
                       -zipf * log((double)rank + 1.0));
    for (int64_t t = 0; t < ts->n_tokens; t++) moe_tensor_set(ts, MOE_T_X, (size_t)t * (size_t)spec->hidden_size, 1.0);
    free(order);
}

/* Replay saved routing: DIR/topk_ids.npy ([S0][k] int32 or int64) becomes tokens whose
 * router logits pick those experts in that order. The router becomes the identity on the
 * first E input columns (biases zero) and token t's input holds 2 (k - j) + 4 in column
 * ids[t % S0][j], so its logits are exactly those values; counts above S0 cycle through
 * the saved tokens. Group limits (a token's experts in more groups than topk_group) and
 * train-mode noise can still pick other experts: the number of tokens whose saved experts
 * break the group limit is printed. Returns 0, or 1 after printing an error. */
static int replay_routing(const moegen_spec *spec, moe_tensors *ts, const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/topk_ids.npy", dir);
    moegen_npy ids;
    moegen_error err;
    const moegen_npy_dtype allowed[] = {MOEGEN_NPY_I4, MOEGEN_NPY_I8};
    const int64_t k = spec->top_k, E = spec->num_experts, H = spec->hidden_size;
    if (moegen_npy_read(path, &ids, &err) != MOEGEN_OK) return moegen_cli_error("tune: --routing from:%s: %s", dir, err.message);
    int rc = 0;
    int ok_dtype = 0;
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++) ok_dtype |= ids.dtype == allowed[i];
    if (!ok_dtype || ids.ndim != 2 || ids.shape[1] != k || ids.shape[0] < 1) {
        rc = moegen_cli_error("tune: %s: expected int32 or int64 of shape (S, %lld) with S >= 1 (the spec's top-k)", path,
                              (long long)k);
        goto done;
    }
    if (H < E) {
        rc = moegen_cli_error("tune: --routing from:DIR needs hidden_size >= num_experts to replay routing "
                              "(hidden_size %lld, num_experts %lld)",
                              (long long)H, (long long)E);
        goto done;
    }
    const int64_t saved = ids.shape[0];
    int64_t *id = malloc((size_t)(saved * k) * sizeof *id);
    if (!id) {
        rc = moegen_cli_error("tune: out of memory");
        goto done;
    }
    for (int64_t i = 0; i < saved * k; i++) {
        id[i] = ids.dtype == MOEGEN_NPY_I4 ? ((const int32_t *)ids.data)[i] : ((const int64_t *)ids.data)[i];
        if (id[i] < 0 || id[i] >= E) {
            rc = moegen_cli_error("tune: %s: token %lld, slot %lld: expert %lld is not in [0, %lld)", path,
                                  (long long)(i / k), (long long)(i % k), (long long)id[i], (long long)E);
            free(id);
            goto done;
        }
        for (int64_t j = i - i % k; j < i; j++)
            if (id[j] == id[i]) {
                rc = moegen_cli_error("tune: %s: token %lld names expert %lld twice", path, (long long)(i / k),
                                      (long long)id[i]);
                free(id);
                goto done;
            }
    }
    for (size_t i = 0; i < ts->t[MOE_T_ROUTER_W].n_elems; i++) moe_tensor_set(ts, MOE_T_ROUTER_W, i, 0.0);
    for (int64_t e = 0; e < E; e++) moe_tensor_set(ts, MOE_T_ROUTER_W, (size_t)(e * H + e), 1.0);
    if (ts->t[MOE_T_ROUTER_B].data)
        for (size_t i = 0; i < ts->t[MOE_T_ROUTER_B].n_elems; i++) moe_tensor_set(ts, MOE_T_ROUTER_B, i, 0.0);
    if (ts->t[MOE_T_SCORE_BIAS].data)
        for (size_t i = 0; i < ts->t[MOE_T_SCORE_BIAS].n_elems; i++) moe_tensor_set(ts, MOE_T_SCORE_BIAS, i, 0.0);
    int64_t broken = 0;
    for (int64_t t = 0; t < ts->n_tokens; t++) {
        const int64_t *row = id + (t % saved) * k;
        for (int64_t c = 0; c < H; c++) moe_tensor_set(ts, MOE_T_X, (size_t)(t * H + c), 0.0);
        for (int64_t j = 0; j < k; j++) moe_tensor_set(ts, MOE_T_X, (size_t)(t * H + row[j]), 2.0 * (double)(k - j) + 4.0);
    }
    if (spec->router.n_group > 1 && spec->router.topk_group < spec->router.n_group)
        for (int64_t t = 0; t < saved; t++) {
            int groups = 0;
            uint64_t seen = 0;
            for (int64_t j = 0; j < k; j++) {
                const int g = (int)(id[t * k + j] / (E / spec->router.n_group));
                if (!(seen >> (g % 64) & 1)) groups++;
                seen |= 1ull << (g % 64);
            }
            broken += groups > spec->router.topk_group;
        }
    fprintf(stderr, "moegen tune: replaying the routing of %lld saved tokens from %s%s", (long long)saved, path,
            ts->n_tokens > saved ? " (cycled)" : "");
    if (broken) fprintf(stderr, "; %lld of them name experts in more than %d groups, which the group limit changes",
                        (long long)broken, spec->router.topk_group);
    fputc('\n', stderr);
    free(id);
done:
    moegen_npy_free(&ids);
    return rc;
}

/* ---- Children ------------------------------------------------------------------------------- */

typedef struct child {
    pid_t pid;
    int fd;        /* read end of its report pipe */
    int index;     /* candidate */
    double start;
    char report[1024];
    size_t report_len;
} child;

/* Fork a child that runs body(index, write_fd) and exits; -1 on failure. */
static int spawn(child *c, int index, int (*body)(int index, int fd, void *ctx), void *ctx) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(NULL);
    const pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        setpgid(0, 0); /* its own group: a kill reaches the compiler it runs too */
        _exit(body(index, fds[1], ctx));
    }
    setpgid(pid, pid);
    close(fds[1]);
    *c = (child){.pid = pid, .fd = fds[0], .index = index, .start = now_s()};
    return 0;
}

/* Read what is there of the child's report; 1 at end of file. */
static int drain(child *c) {
    for (;;) {
        char buffer[512];
        const ssize_t n = read(c->fd, buffer, sizeof buffer);
        if (n > 0) {
            const size_t room = sizeof c->report - 1 - c->report_len;
            const size_t take = (size_t)n < room ? (size_t)n : room;
            memcpy(c->report + c->report_len, buffer, take);
            c->report_len += take;
            c->report[c->report_len] = '\0';
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        return n == 0 || (n < 0 && errno != EAGAIN);
    }
}

/* Reap the child; the reason it failed, or "" when it exited 0. */
static void reap(child *c, int killed_for_time, double limit_s, char *why, size_t size) {
    int status = 0;
    while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
    }
    close(c->fd);
    why[0] = '\0';
    if (killed_for_time) snprintf(why, size, "timeout: no result within %.0f s (killed)", limit_s);
    else if (WIFSIGNALED(status)) snprintf(why, size, "crashed: signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status) && WEXITSTATUS(status) != 0 && c->report_len)
        snprintf(why, size, "%.*s", (int)size - 1, c->report); /* cut to fit */
    else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) /* e.g. a crash a sanitizer's handler caught */
        snprintf(why, size, "exited with status %d without a report (its stderr says why)", WEXITSTATUS(status));
}

/* Run body for every index in `indices` with at most `parallel` children at once, each
 * under limit_s; results[i] gets the child's report ("" on failure) and whys[i] the reason. */
typedef void (*progress_fn)(void *ctx, int index, const char *report, const char *why);
static void run_children(const int *indices, int n, int parallel, double limit_s,
                         int (*body)(int index, int fd, void *ctx), void *ctx, progress_fn done_fn,
                         void *done_ctx) {
    child running[256];
    int n_running = 0, next = 0;
    if (parallel > 256) parallel = 256;
    while (next < n || n_running > 0) {
        while (next < n && n_running < parallel) {
            if (spawn(&running[n_running], indices[next], body, ctx) != 0) {
                done_fn(done_ctx, indices[next], "", "cannot start a child process");
                next++;
                continue;
            }
            n_running++;
            next++;
        }
        struct pollfd fds[256];
        for (int i = 0; i < n_running; i++) fds[i] = (struct pollfd){.fd = running[i].fd, .events = POLLIN};
        (void)poll(fds, (nfds_t)n_running, 200);
        for (int i = 0; i < n_running; i++) {
            child *c = &running[i];
            int finished = (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) && drain(c);
            int timed_out = 0;
            if (!finished && now_s() - c->start > limit_s) {
                kill(-c->pid, SIGKILL);
                kill(c->pid, SIGKILL);
                finished = timed_out = 1;
            }
            if (!finished) continue;
            char why[600];
            reap(c, timed_out, limit_s, why, sizeof why);
            done_fn(done_ctx, c->index, why[0] ? "" : c->report, why);
            running[i] = running[--n_running];
            fds[i] = fds[n_running];
            i--;
        }
    }
}

/* ---- What the children do ------------------------------------------------------------------ */

typedef struct tune_state {
    const tune_options *o;
    const moegen_spec *spec;
    candidate *cands;
    int n_cands;
    injection inj;
    moe_tensors *ts; /* made once, before the children fork */
    int64_t verify_tokens;
    uint8_t *verify_mask;
    double best_ms[MAX_COUNTS]; /* best median so far per token count (INFINITY: none yet) */
    /* progress */
    int done, total;
    double started;
    int tty;
} tune_state;

static void open_options(const tune_state *t, const candidate *c, moegen_open_options *opts) {
    moegen_open_options_init(opts);
    opts->device = MOEGEN_DEVICE_CPU;
    opts->cache_dir = t->o->cache_dir;
    opts->variant = c->overrides;
    opts->n_threads = (int)t->o->threads;
    opts->tuning = MOEGEN_TUNING_OFF;
}

static void report_line(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report_line(int fd, const char *fmt, ...) {
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n > 0) {
        ssize_t w = write(fd, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
        (void)w;
    }
}

/* Compile child: open the layer (it compiles into the cache) and close it. */
static int compile_body(int index, int fd, void *ctx) {
    tune_state *t = ctx;
    if (index == t->inj.compile) setenv("MOEGEN_CC", "/nonexistent/moegen-injected-cc", 1);
    moegen_open_options opts;
    open_options(t, &t->cands[index], &opts);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (moegen_layer_open_file(t->o->spec_path, &opts, &layer, &err) != MOEGEN_OK) {
        report_line(fd, "compile: %.900s", err.message);
        return 1;
    }
    moegen_layer_close(layer);
    report_line(fd, "ok");
    return 0;
}

/* In a child: candidate c's layer, opened (a compile-cache hit) with the shared weights bound;
 * NULL with the reason on the report pipe. */
static moegen_layer *open_bound(const tune_state *t, const candidate *c, int fd) {
    moegen_open_options opts;
    open_options(t, c, &opts);
    moegen_layer *layer = NULL;
    moegen_error err;
    if (moegen_layer_open_file(t->o->spec_path, &opts, &layer, &err) != MOEGEN_OK) {
        report_line(fd, "open %s: %.800s", c->name, err.message);
        return NULL;
    }
    moegen_weights weights;
    moe_tensors_bind_weights(t->spec, t->ts, 0, &weights);
    if (moegen_layer_bind(layer, &weights, &err) != MOEGEN_OK) {
        report_line(fd, "bind %s: %.800s", c->name, err.message);
        return NULL;
    }
    return layer;
}

/* In a child: the --evict-mb buffer (NULL for 0 MiB, or with the reason reported). */
static volatile unsigned char *evict_buffer(const tune_state *t, int fd, size_t *bytes) {
    *bytes = (size_t)t->o->evict_mb << 20;
    if (!*bytes) return NULL;
    volatile unsigned char *evict = calloc(1, *bytes);
    if (!evict) report_line(fd, "out of memory for the --evict-mb buffer (%lld MiB)", t->o->evict_mb);
    return evict;
}

/* Cold caches: write the buffer before a timed forward. */
static void evict_caches(volatile unsigned char *evict, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 64) evict[i] = (unsigned char)(evict[i] + 1);
}

/* Measure child: verify, then time each token count; reports "ok <median ms>...". */
static int measure_body(int index, int fd, void *ctx) {
    tune_state *t = ctx;
    const moegen_spec *spec = t->spec;
    if (index == t->inj.crash) { /* as an uninstrumented process dies (a sanitizer would catch it) */
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
    }
    if (index == t->inj.hang)
        for (;;) pause();
    moegen_layer *layer = open_bound(t, &t->cands[index], fd);
    if (!layer) return 1;
    moegen_error err;
    /* Verify on the first verify_tokens tokens. */
    moe_outputs out;
    const int64_t most = t->o->counts[t->o->n_counts - 1];
    if (moe_outputs_alloc(&out, spec, most > t->verify_tokens ? most : t->verify_tokens) != 0) {
        report_line(fd, "out of memory");
        return 1;
    }
    moegen_forward_io io = moe_outputs_io(&out, t->ts, 0);
    io.n_tokens = t->verify_tokens;
    if (moegen_layer_forward(layer, &io, &out.stats, &err) != MOEGEN_OK) {
        report_line(fd, "forward: %.900s", err.message);
        return 1;
    }
    if (index == t->inj.wrong) { /* the injected wrong answer: one element of y off by a lot */
        if (spec->dtype == MOEGEN_DTYPE_FP32) ((float *)out.y)[0] += 1000.0f;
        else ((uint16_t *)out.y)[0] ^= 0x4000;
    }
    moegen_kernel_weights kw;
    moe_tensors_weights(t->ts, &kw);
    const moe_kernel_result result = moe_outputs_result(&out);
    moe_verify_report report;
    memset(&report, 0, sizeof report);
    if (moe_verify(spec, t->verify_tokens, t->ts->t[MOE_T_X].data, &kw, 0, t->verify_mask, &result, &report) != 0 ||
        !report.ok) {
        report_line(fd, "wrong output: %.900s", report.message);
        return 1;
    }
    /* Time. */
    char line[1024];
    int at = snprintf(line, sizeof line, "ok");
    double *times = calloc((size_t)t->o->repeat, sizeof *times);
    size_t evict_bytes;
    volatile unsigned char *evict = evict_buffer(t, fd, &evict_bytes);
    if (evict_bytes && !evict) return 1;
    if (!times) return 1;
    for (int c = 0; c < t->o->n_counts; c++) {
        io.n_tokens = t->o->counts[c];
        int pruned = 0;
        for (long long r = -1; r < t->o->repeat && !pruned; r++) {
            evict_caches(evict, evict_bytes);
            const double start = now_s();
            if (moegen_layer_forward(layer, &io, NULL, &err) != MOEGEN_OK) {
                report_line(fd, "forward at %lld tokens: %.900s", (long long)io.n_tokens, err.message);
                return 1;
            }
            const double ms = (now_s() - start) * 1e3;
            if (r >= 0) times[r] = ms;
            /* Pruned: the first timed run already over PRUNE_FACTOR x the best median so far
             * (known when this child forked) cannot win this count; it is not timed further.
             * Never the heuristic's variants nor an incumbent at its counts: they race. */
            pruned = r == 0 && !t->cands[index].baseline && !(t->cands[index].incumbent_at >> c & 1u) &&
                     ms > PRUNE_FACTOR * t->best_ms[c];
        }
        if (pruned) {
            at += snprintf(line + at, sizeof line - (size_t)at, " inf");
            continue;
        }
        qsort(times, (size_t)t->o->repeat, sizeof *times, compare_doubles);
        at += snprintf(line + at, sizeof line - (size_t)at, " %.6g", times[t->o->repeat / 2]);
    }
    report_line(fd, "%s", line);
    return 0; /* the process exits: no need to free */
}

/* One token count's race: its finalists, timed in one child, alternated forward by forward. */
typedef struct race {
    const tune_state *t;
    int k;              /* the count: t->o->counts[k] */
    int n, cands[RACE_MAX];
    double ms[RACE_MAX]; /* the race's medians; NAN: not raced (or the race failed) */
    char why[600];       /* why the race failed, "" if it did not */
} race;

/* Every finalist's layer open at once; then --race-rounds rounds, each a forward of every
 * finalist (caches evicted before each, the first finalist of a round rotating), after a
 * warm-up round; the median of each finalist's rounds. */
static int race_body(int index, int fd, void *ctx) {
    race *r = ctx;
    const tune_state *t = r->t;
    (void)index;
    moegen_layer *layers[RACE_MAX];
    for (int i = 0; i < r->n; i++)
        if (!(layers[i] = open_bound(t, &t->cands[r->cands[i]], fd))) return 1;
    const int64_t n_tokens = t->o->counts[r->k];
    const int rounds = (int)t->o->race_rounds;
    moe_outputs out;
    double *times = calloc((size_t)rounds * RACE_MAX, sizeof *times);
    size_t evict_bytes;
    volatile unsigned char *evict = evict_buffer(t, fd, &evict_bytes);
    if (!times || (evict_bytes && !evict) || moe_outputs_alloc(&out, t->spec, n_tokens) != 0) {
        report_line(fd, "out of memory");
        return 1;
    }
    moegen_forward_io io = moe_outputs_io(&out, t->ts, 0);
    io.n_tokens = n_tokens;
    moegen_error err;
    for (int round = -1; round < rounds; round++) {
        for (int j = 0; j < r->n; j++) {
            const int i = (j + round + 1) % r->n;
            evict_caches(evict, evict_bytes);
            const double start = now_s();
            for (int times_over = i == 0 && r->k == t->inj.slow ? 3 : 1; times_over > 0; times_over--)
                if (moegen_layer_forward(layers[i], &io, NULL, &err) != MOEGEN_OK) {
                    report_line(fd, "forward of %s: %.800s", t->cands[r->cands[i]].name, err.message);
                    return 1;
                }
            if (round >= 0) times[i * rounds + round] = (now_s() - start) * 1e3;
        }
    }
    char line[1024];
    int at = snprintf(line, sizeof line, "ok");
    for (int i = 0; i < r->n; i++) {
        qsort(times + i * rounds, (size_t)rounds, sizeof *times, compare_doubles);
        at += snprintf(line + at, sizeof line - (size_t)at, " %.6g", times[i * rounds + rounds / 2]);
    }
    report_line(fd, "%s", line);
    return 0; /* the process exits: no need to free */
}

static void raced(void *ctx, int index, const char *report, const char *why) {
    race *r = ctx;
    (void)index;
    snprintf(r->why, sizeof r->why, "%s", why[0] ? why : strncmp(report, "ok", 2) ? report : "");
    const char *p = report + 2;
    for (int i = 0; i < r->n && !r->why[0]; i++) {
        char *end;
        r->ms[i] = strtod(p, &end);
        if (end == p) snprintf(r->why, sizeof r->why, "unreadable report '%.200s'", report);
        p = end;
    }
    if (r->why[0])
        for (int i = 0; i < r->n; i++) r->ms[i] = NAN;
}

/* ---- Progress ---------------------------------------------------------------------------------- */

static void print_progress(tune_state *t, int index) {
    const candidate *c = &t->cands[index];
    const double elapsed = now_s() - t->started;
    if (!t->tty) { /* JSON lines for logs and scripts */
        fprintf(stderr, "{\"candidate\": %d, \"variant\": \"%s\", \"state\": \"%s\"", index, c->name,
                c->state == CAND_PASS ? "PASS" : "FAIL");
        if (c->state == CAND_PASS) {
            fprintf(stderr, ", \"median_ms\": {");
            for (int k = 0; k < t->o->n_counts; k++) {
                fprintf(stderr, "%s\"%lld\": ", k ? ", " : "", t->o->counts[k]);
                fprintf(stderr, isinf(c->median_ms[k]) ? "null" : "%.6g", c->median_ms[k]); /* null: pruned */
            }
            fprintf(stderr, "}");
        } else {
            fprintf(stderr, ", \"why\": \"");
            for (const char *p = c->why; *p; p++)
                fprintf(stderr, *p == '"' || *p == '\\' ? "\\%c" : (unsigned char)*p < 32 ? " " : "%c", *p);
            fprintf(stderr, "\"");
        }
        fprintf(stderr, ", \"done\": %d, \"total\": %d, \"elapsed_s\": %.1f}\n", t->done, t->total, elapsed);
        return;
    }
    char best[256] = "";
    int at = 0;
    for (int k = 0; k < t->o->n_counts && at < (int)sizeof best - 40; k++) {
        double b = INFINITY;
        for (int i = 0; i < t->n_cands; i++)
            if (t->cands[i].state == CAND_PASS && t->cands[i].median_ms[k] < b) b = t->cands[i].median_ms[k];
        at += snprintf(best + at, sizeof best - (size_t)at, " %lld:%s%.3gms", t->o->counts[k], isinf(b) ? "-" : "",
                       isinf(b) ? 0.0 : b);
    }
    const double eta = t->done ? elapsed / t->done * (t->total - t->done) : 0.0;
    fprintf(stderr, "\r\033[K[%d/%d] best%s | %.0f s, ETA %.0f s", t->done, t->total, best, elapsed, eta);
    fflush(stderr);
}

static void compiled(void *ctx, int index, const char *report, const char *why) {
    tune_state *t = ctx;
    (void)report;
    if (why[0]) {
        t->cands[index].state = CAND_FAIL;
        snprintf(t->cands[index].why, sizeof t->cands[index].why, "%s", why);
        t->done++;
        print_progress(t, index);
    }
}

static void measured(void *ctx, int index, const char *report, const char *why) {
    tune_state *t = ctx;
    candidate *c = &t->cands[index];
    t->done++;
    if (why[0] || strncmp(report, "ok", 2) != 0) {
        c->state = CAND_FAIL;
        snprintf(c->why, sizeof c->why, "%s", why[0] ? why : report);
    } else {
        c->state = CAND_PASS;
        const char *p = report + 2;
        for (int k = 0; k < t->o->n_counts; k++) {
            char *end;
            c->median_ms[k] = strtod(p, &end);
            if (end == p) {
                c->state = CAND_FAIL;
                snprintf(c->why, sizeof c->why, "unreadable report '%.200s'", report);
                break;
            }
            if (c->median_ms[k] < t->best_ms[k]) t->best_ms[k] = c->median_ms[k];
            p = end;
        }
    }
    print_progress(t, index);
}

/* True (and the candidate marked SKIPPED) when the budget is spent; the default heuristic's
 * variants and the incumbents always run. */
static int budget_spent(tune_state *t, int index) {
    if (t->cands[index].baseline || t->cands[index].incumbent_at || now_s() - t->started <= (double)t->o->budget_s) return 0;
    t->cands[index].state = CAND_SKIPPED;
    snprintf(t->cands[index].why, sizeof t->cands[index].why, "budget of %lld s spent", t->o->budget_s);
    return 1;
}

/* Compile then measure candidates [first, last) that are still pending, within the budget: in
   rounds of --jobs candidates (compiled at once, then timed one at a time, since timings must not
   share the CPUs with compiles or with each other), in candidate order, so that a budget cut drops
   the last candidates, never compiled ones waiting to be timed. */
static void run_stage(tune_state *t, int first, int last) {
    const int jobs = t->o->jobs > 0 ? (int)t->o->jobs : 1;
    int next = first;
    while (next < last) {
        int round[MAX_CANDIDATES], n = 0;
        for (; next < last && n < jobs; next++)
            if (t->cands[next].state == CAND_PENDING && !budget_spent(t, next)) round[n++] = next;
        t->total += n;
        /* The compiler's own time limit applies inside; this one only catches a child stuck elsewhere. */
        run_children(round, n, jobs, 900.0, compile_body, t, compiled, t);
        for (int i = 0; i < n; i++) {
            const int c = round[i];
            if (t->cands[c].state != CAND_PENDING) continue; /* failed to compile */
            if (budget_spent(t, c)) {
                t->total--;
                continue;
            }
            double limit = t->o->timeout_s > 0 ? (double)t->o->timeout_s : 30.0;
            if (t->o->timeout_s == 0 && t->cands[0].state == CAND_PASS) {
                double total_ms = 0;
                for (int k = 0; k < t->o->n_counts; k++)
                    total_ms += t->cands[0].median_ms[k] * (double)(t->o->repeat + 2);
                limit += 20.0 * total_ms / 1e3;
            } else if (t->o->timeout_s == 0) {
                limit = 600.0; /* the default variant itself: no reference time yet */
            }
            run_children(&round[i], 1, 1, limit, measure_body, t, measured, t);
        }
    }
}

/* ---- The command ------------------------------------------------------------------------------- */

/* The index of the candidate that is variant `v`, or -1. */
static int find_candidate(const tune_state *t, const moegen_variant *v) {
    for (int i = 0; i < t->n_cands; i++)
        if (!memcmp(&t->cands[i].variant.cpu, &v->cpu, sizeof v->cpu)) return i;
    return -1;
}

static int add_candidate(tune_state *t, const moegen_variant *v) {
    if (find_candidate(t, v) >= 0 || t->n_cands == MAX_CANDIDATES) return 0;
    candidate *c = &t->cands[t->n_cands++];
    memset(c, 0, sizeof *c);
    c->variant = *v;
    moegen_variant_overrides(v, c->overrides, sizeof c->overrides);
    moegen_variant_name(t->spec, v, c->name, sizeof c->name);
    c->state = CAND_PENDING;
    return 1;
}

/* Bucket k covers the token counts nearer (geometrically) to counts[k] than to its neighbours. */
static void bucket_range(const tune_options *o, int k, int64_t *lo, int64_t *hi) {
    *lo = k == 0 ? 1 : (int64_t)floor(sqrt((double)o->counts[k - 1] * (double)o->counts[k])) + 1;
    *hi = k + 1 == o->n_counts ? INT64_MAX : (int64_t)floor(sqrt((double)o->counts[k] * (double)o->counts[k + 1]));
    if (*lo > o->counts[k]) *lo = o->counts[k];
    if (*hi < o->counts[k]) *hi = o->counts[k];
}

static int best_for(const tune_state *t, int k) {
    int best = -1;
    for (int i = 0; i < t->n_cands; i++)
        if (t->cands[i].state == CAND_PASS && (best < 0 || t->cands[i].median_ms[k] < t->cands[best].median_ms[k]))
            best = i;
    return best;
}

/* The variants of the tuning database at `path` join the candidates as incumbents: for each
 * count, the variant the database runs there (moegen_tuning_db_pick) is timed whatever the
 * budget and races for the count. A database of another moegen version is used too (its
 * variants are only candidates: each is checked, verified and timed like any other). `replaced`:
 * the file is the one this run's database replaces (--keep-margin applies to it); `shape`: this
 * spec's shape key (a file of another shape is raced, with a note). Returns 0,
 * or 1 after an error when `must_read` (an --incumbent file) and the file cannot be read; a
 * missing or unreadable file at the output path is skipped with a note. */
static int add_incumbents(tune_state *t, const moegen_target *target, const char *shape, const char *path,
                          int must_read, int replaced) {
    moegen_tuning_db *db = calloc(1, sizeof *db);
    if (!db) return moegen_cli_error("tune: out of memory");
    moegen_error err;
    const moegen_status st = moegen_tuning_db_read(path, db, &err);
    int rc = 0;
    if (st != MOEGEN_OK && !(st == MOEGEN_ERR_UNSUPPORTED && db->n_buckets > 0)) {
        if (must_read) rc = moegen_cli_error("tune: --incumbent %s", err.message);
        else if (!(st == MOEGEN_ERR_IO && err.native_code == ENOENT))
            fprintf(stderr, "moegen tune: not racing the database at the output path: %s\n", err.message);
        free(db);
        return rc;
    }
    int n_variants = 0;
    for (int k = 0; k < t->o->n_counts; k++) {
        const moegen_tuning_bucket *bk = moegen_tuning_db_pick(db, t->o->counts[k]);
        moegen_variant v;
        moegen_variant_default(t->spec, MOEGEN_BACKEND_CPU, target, &v);
        if (moegen_variant_apply_overrides(&v, bk->variant, &err) != MOEGEN_OK ||
            moegen_variant_check(t->spec, &v, &err) != MOEGEN_OK) {
            fprintf(stderr, "moegen tune: %s: not racing its variant for %lld tokens: %s\n", path, t->o->counts[k],
                    err.message);
            continue;
        }
        add_candidate(t, &v);
        const int c = find_candidate(t, &v);
        if (c < 0) {
            rc = moegen_cli_error("tune: more than %d candidates", MAX_CANDIDATES);
            break;
        }
        n_variants += !t->cands[c].incumbent_at;
        t->cands[c].incumbent_at |= 1u << k;
        if (replaced) t->cands[c].replaced_at |= 1u << k;
    }
    const int other_shape = strcmp(db->shape, shape) != 0;
    if (!rc)
        fprintf(stderr, "moegen tune: racing the variants of %s (tuned %s, %s%s%s): %d\n", path, db->date, db->device,
                other_shape ? "; for another shape: " : "", other_shape ? db->shape : "",
                n_variants);
    free(db);
    return rc;
}

/* The finalists of count k: the default heuristic's variant there, the incumbents' variants
 * there, and up to RACE_TOP more within RACE_MARGIN of the count's best sweep median, fastest
 * first. Candidates that failed or were pruned at k are not finalists. */
static void choose_finalists(const tune_state *t, int k, int heuristic, race *r) {
    memset(r, 0, sizeof *r);
    r->t = t;
    r->k = k;
    r->cands[r->n++] = heuristic;
    for (int i = 0; i < t->n_cands && r->n < RACE_MAX; i++)
        if (i != heuristic && (t->cands[i].incumbent_at >> k & 1u) && t->cands[i].state == CAND_PASS &&
            isfinite(t->cands[i].median_ms[k]))
            r->cands[r->n++] = i;
    const int best = best_for(t, k);
    for (int top = 0; top < RACE_TOP && r->n < RACE_MAX; top++) {
        int next = -1; /* the fastest candidate within the margin that is not a finalist yet */
        for (int i = 0; i < t->n_cands; i++) {
            int chosen = 0;
            for (int j = 0; j < r->n; j++) chosen |= r->cands[j] == i;
            if (!chosen && t->cands[i].state == CAND_PASS &&
                t->cands[i].median_ms[k] <= (1.0 + RACE_MARGIN) * t->cands[best].median_ms[k] &&
                (next < 0 || t->cands[i].median_ms[k] < t->cands[next].median_ms[k]))
                next = i;
        }
        if (next < 0) break;
        r->cands[r->n++] = next;
    }
    for (int i = 0; i < RACE_MAX; i++) r->ms[i] = NAN;
}

/* The winner of count k (a candidate index) and the medians the table and database report for
 * it and for the heuristic's variant: the race's where it ran, else the sweep's. The replaced
 * database's variant stays unless the race's best beats it by more than --keep-margin (*kept: 1
 * when that rule decided), so that noise alone does not change a database; but never when it
 * was slower than the untuned variant (finalist 0) in the race: the tuned layer stays at least as
 * fast as the untuned one in the measured run. */
static int winner_of(const tune_state *t, int k, const race *r, double *median_ms, double *default_ms, int *kept) {
    *kept = 0;
    if (isnan(r->ms[0])) {
        const int b = best_for(t, k);
        *median_ms = t->cands[b].median_ms[k];
        *default_ms = t->cands[r->cands[0]].median_ms[k];
        return b;
    }
    int w = 0;
    for (int i = 1; i < r->n; i++)
        if (r->ms[i] < r->ms[w]) w = i;
    for (int i = 0; i < r->n; i++)
        if (i != w && (t->cands[r->cands[i]].replaced_at >> k & 1u) && r->ms[i] <= r->ms[0] &&
            r->ms[w] > (1.0 - (double)t->o->keep_margin / 100.0) * r->ms[i]) {
            w = i;
            *kept = 1;
        }
    *median_ms = r->ms[w];
    *default_ms = r->ms[0];
    return r->cands[w];
}

/* --evict-mb's default: twice the last-level cache this process's CPU reports (512 MiB where
 * it reports none), so that the weights of a decode step come from memory. */
static long long default_evict_mb(void) {
    long bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (bytes <= 0) bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (bytes <= 0) return 512;
    return 2 * (((long long)bytes + (1 << 20) - 1) >> 20);
}

int moegen_cli_tune(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_tune, stdout);
        return 0;
    }
    tune_options o;
    if (parse_options(argc, argv, &o)) return 1;
    if (o.evict_mb < 0) o.evict_mb = default_evict_mb();
    moegen_error err;
    moegen_spec spec;
    if (moegen_spec_load_file(o.spec_path, &spec, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    int rc = 1;
    tune_state t;
    memset(&t, 0, sizeof t);
    moe_tensors ts;
    memset(&ts, 0, sizeof ts);
    t.o = &o;
    t.spec = &spec;
    t.tty = isatty(2);
    t.started = now_s();
    read_injection(&t.inj);
    for (int k = 0; k < MAX_COUNTS; k++) t.best_ms[k] = INFINITY;
    t.cands = calloc(MAX_CANDIDATES, sizeof *t.cands);
    moegen_variant *space = calloc(MAX_CANDIDATES, sizeof *space);
    if (!t.cands || !space) {
        moegen_cli_error("tune: out of memory");
        goto done;
    }
    if (spec.ep_size > 1) {
        moegen_cli_error("tune: %s: ep_size %d: expert-parallel layers are not tuned in this version (tune the "
                         "same spec with ep_size 1 on one rank)",
                         o.spec_path, spec.ep_size);
        goto done;
    }
    moegen_host_compiler cc;
    if (moegen_host_compiler_probe(&cc, &err) != MOEGEN_OK) {
        moegen_cli_error("%s", err.message);
        goto done;
    }
    const moegen_target target = moegen_host_compiler_target(&cc);
    /* Where the database goes (--out, else the first directory of the search order). */
    char shape[256], device[160], family[64];
    char dir_storage[MOEGEN_TUNING_DIRS_STORAGE_BYTES], path[4096 + MOEGEN_TUNING_FILE_NAME_BYTES];
    char name[MOEGEN_TUNING_FILE_NAME_BYTES];
    moegen_variant_shape_key(&spec, MOEGEN_BACKEND_CPU, shape, sizeof shape);
    moegen_host_compiler_device(&cc, device, sizeof device, family, sizeof family);
    const char *dirs[4];
    const char *dir = o.out_dir;
    if (!dir) {
        const int n_dirs = moegen_tuning_default_dirs(NULL, dirs, 4, dir_storage, sizeof dir_storage);
        dir = n_dirs > 0 ? dirs[0] : ".";
    }
    moegen_tuning_db_file_name(shape, device, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", dir, name);

    /* The tensors, once, before any child forks (children share them copy-on-write). */
    const int64_t most = o.counts[o.n_counts - 1];
    t.verify_tokens = most < 64 ? most : 64;
    if (moe_tensors_alloc(&spec, most > t.verify_tokens ? most : t.verify_tokens, &ts) != 0) {
        moegen_cli_error("tune: out of memory allocating tensors for %lld tokens", (long long)most);
        goto done;
    }
    moe_tensors_fill(&ts, (uint64_t)o.seed);
    apply_routing(&spec, &ts, o.zipf, (uint64_t)o.seed);
    if (o.replay_dir && replay_routing(&spec, &ts, o.replay_dir)) goto done;
    t.ts = &ts;
    t.verify_mask = malloc((size_t)t.verify_tokens);
    if (!t.verify_mask) goto done;
    /* Verify as many tokens as a reference budget of ~2 GFLOP allows (at least 4). */
    const double per_token = 6.0 * (double)spec.top_k * (double)spec.hidden_size * (double)spec.moe_intermediate_size;
    int64_t verified = (int64_t)(2e9 / (per_token > 1 ? per_token : 1));
    if (verified < 4) verified = 4;
    for (int64_t i = 0; i < t.verify_tokens; i++)
        t.verify_mask[i] = verified >= t.verify_tokens || i % (t.verify_tokens / verified + 1) == 0;

    /* Stage 1: the coarse space (the default first). */
    int n_invalid = 0, invalid_stage = 0;
    const int n_space = moegen_variant_space(&spec, &target, NULL, space, MAX_CANDIDATES, &invalid_stage);
    n_invalid += invalid_stage;
    for (int i = 0; i < n_space; i++) add_candidate(&t, &space[i]);
    /* The default heuristic's variant at each token count (the space has the default first;
     * a range's variant joins at the end of the stage if the space lacks it). */
    int heuristic[MAX_COUNTS];
    for (int k = 0; k < o.n_counts; k++) {
        moegen_variant v;
        if (moegen_variant_default_for_tokens(&spec, &target, o.counts[k], &v, &err) != MOEGEN_OK) {
            moegen_cli_error("tune: the default heuristic's variant for %lld tokens: %s", o.counts[k], err.message);
            goto done;
        }
        add_candidate(&t, &v);
        heuristic[k] = find_candidate(&t, &v);
        if (heuristic[k] < 0) {
            moegen_cli_error("tune: more than %d candidates", MAX_CANDIDATES);
            goto done;
        }
        t.cands[heuristic[k]].baseline = 1;
    }
    fprintf(stderr,
            "moegen tune: %s, %d token counts, routing %s, %lld MiB written before every timed forward, %d coarse "
            "candidates (%d invalid), budget %lld s\n",
            spec.name, o.n_counts, o.routing, o.evict_mb, n_space, invalid_stage, o.budget_s);
    /* The incumbents: the database this run replaces and the --incumbent files. */
    if (!o.no_incumbent && add_incumbents(&t, &target, shape, path, 0, 1)) goto done;
    for (int i = 0; i < o.n_incumbents; i++)
        if (add_incumbents(&t, &target, shape, o.incumbents[i], 1, 0)) goto done;
    run_stage(&t, 0, t.n_cands);
    for (int k = 0; k < o.n_counts; k++) {
        const candidate *c = &t.cands[heuristic[k]];
        if (c->state != CAND_PASS) {
            if (t.tty) fputc('\n', stderr);
            moegen_cli_error("tune: the default heuristic's variant for %lld tokens (%s) failed (%s): nothing to "
                             "compare with",
                             o.counts[k], c->name, c->why);
            goto done;
        }
    }
    /* Stage 2: blockings around each bucket's best. */
    const int stage2 = t.n_cands;
    for (int k = 0; k < o.n_counts; k++) {
        const int b = best_for(&t, k);
        if (b < 0) continue;
        const int n_fine = moegen_variant_space(&spec, &target, &t.cands[b].variant, space, MAX_CANDIDATES,
                                                &invalid_stage);
        n_invalid += invalid_stage;
        for (int i = 0; i < n_fine; i++) add_candidate(&t, &space[i]);
    }
    run_stage(&t, stage2, t.n_cands);
    if (t.tty) fputc('\n', stderr);
    /* Stage 3: each count's race. */
    race races[MAX_COUNTS];
    for (int k = 0; k < o.n_counts; k++) {
        race *r = &races[k];
        choose_finalists(&t, k, heuristic[k], r);
        if (r->n < 2 || o.race_rounds == 0) continue;
        double limit = 60.0, sweep_ms = 0.0;
        for (int i = 0; i < r->n; i++) sweep_ms += t.cands[r->cands[i]].median_ms[k];
        limit += (double)(o.race_rounds + 1) * (20.0 * sweep_ms / 1e3 + (double)r->n * (double)o.evict_mb / 1024.0);
        if (o.timeout_s > 0) limit = (double)o.timeout_s * r->n;
        run_children(&k, 1, 1, limit, race_body, r, raced, r);
        if (r->why[0]) fprintf(stderr, "moegen tune: the race at %lld tokens failed (the sweep's medians decide): %s\n",
                               o.counts[k], r->why);
    }

    /* The table and the database. */
    int n_pass = 0, n_fail = 0, n_skipped = 0;
    for (int i = 0; i < t.n_cands; i++) {
        n_pass += t.cands[i].state == CAND_PASS;
        n_fail += t.cands[i].state == CAND_FAIL;
        n_skipped += t.cands[i].state == CAND_SKIPPED;
    }
    moegen_tuning_db *db = calloc(1, sizeof *db);
    if (!db) goto done;
    moegen_tuning_db_init(db);
    snprintf(db->device, sizeof db->device, "%s", device);
    snprintf(db->family, sizeof db->family, "%s", family);
    snprintf(db->shape, sizeof db->shape, "%s", shape);
    snprintf(db->routing, sizeof db->routing, "%s", o.routing);
    const time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    strftime(db->date, sizeof db->date, "%Y-%m-%dT%H:%M:%SZ", &utc);
    db->threads = (int)o.threads;
    if (db->threads == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        db->threads = cpus > 0 ? (int)cpus : 1;
    }
    db->n_buckets = o.n_counts;
    printf("moegen tune: %s on %s (%s), routing %s, %d threads, %s\n", spec.name, device, family, o.routing,
           db->threads, o.evict_mb ? "cold caches (--evict-mb)" : "warm caches (--evict-mb 0)");
    printf("| tokens | timed | best variant | median | untuned (default heuristic) | speedup |\n|---|---:|---|---:|---:|---:|\n");
    int kept[MAX_COUNTS];
    for (int k = 0; k < o.n_counts; k++) {
        moegen_tuning_bucket *bk = &db->buckets[k];
        const int b = winner_of(&t, k, &races[k], &bk->median_ms, &bk->default_ms, &kept[k]);
        bucket_range(&o, k, &bk->min_tokens, &bk->max_tokens);
        bk->timed_tokens = o.counts[k];
        snprintf(bk->variant, sizeof bk->variant, "%s", b == 0 ? "" : t.cands[b].overrides);
        snprintf(bk->variant_name, sizeof bk->variant_name, "%s", t.cands[b].name);
        char upper[24];
        if (bk->max_tokens == INT64_MAX) snprintf(upper, sizeof upper, "inf");
        else snprintf(upper, sizeof upper, "%lld", (long long)bk->max_tokens);
        printf("| %lld-%s | %lld | %s | %.4f ms | %.4f ms | %.2fx |\n", (long long)bk->min_tokens, upper,
               o.counts[k], t.cands[b].name, bk->median_ms, bk->default_ms, bk->default_ms / bk->median_ms);
    }
    for (int k = 0; k < o.n_counts; k++) {
        const race *r = &races[k];
        if (isnan(r->ms[0])) continue;
        printf("race at %lld tokens, %lld rounds alternated:", o.counts[k], o.race_rounds);
        for (int i = 0; i < r->n; i++) {
            const candidate *c = &t.cands[r->cands[i]];
            printf("%s %.6g ms %s%s%s", i ? "," : "", r->ms[i], c->name, i == 0 ? " (untuned)" : "",
                   c->replaced_at >> k & 1u ? " (replaced database)" : c->incumbent_at >> k & 1u ? " (incumbent)" : "");
        }
        if (kept[k]) printf("; kept the replaced database's variant (the best is not %lld %% faster)", o.keep_margin);
        printf("\n");
    }
    /* The untuned variant ran in the sweep and in every race: a different time says the machine
     * changed speed during the run, and sweep medians taken at different times do not compare. */
    double drift = 1.0;
    int drift_k = -1;
    for (int k = 0; k < o.n_counts; k++) {
        const double ratio = races[k].ms[0] / t.cands[heuristic[k]].median_ms[k];
        if (!isnan(ratio) && fmax(ratio, 1.0 / ratio) > fmax(drift, 1.0 / drift)) {
            drift = ratio;
            drift_k = k;
        }
    }
    if (drift_k >= 0 && fmax(drift, 1.0 / drift) > DRIFT_LIMIT)
        printf("warning: the untuned variant took %.4f ms in the race at %lld tokens and %.4f ms in the sweep "
               "(%.2fx): the machine changed speed during the run, so the sweep's medians (which chose the "
               "finalists) do not compare; re-tune on a quiet machine\n",
               races[drift_k].ms[0], o.counts[drift_k], t.cands[heuristic[drift_k]].median_ms[drift_k], drift);
    printf("candidates: %d PASS, %d FAIL, %d INVALID, %d SKIPPED (budget); %.0f s\n", n_pass, n_fail, n_invalid,
           n_skipped, now_s() - t.started);
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) == 0) /* the modules are loaded in children: this does not grow with them */
        printf("tuner process peak memory: %.1f MiB\n", (double)usage.ru_maxrss / 1024.0);
    for (int i = 0; i < t.n_cands; i++)
        if (t.cands[i].state == CAND_FAIL) printf("  FAIL %s: %.240s\n", t.cands[i].name, t.cands[i].why);
    if (o.write) {
        if (moegen_tuning_db_write(path, db, &err) != MOEGEN_OK) {
            free(db);
            moegen_cli_error("tune: %s", err.message);
            goto done;
        }
        printf("database: %s\n", path);
    }
    free(db);
    rc = 0;
done:
    free(t.cands);
    free(space);
    free(t.verify_mask);
    moe_tensors_free(&ts);
    moegen_spec_free(&spec);
    return rc;
}
