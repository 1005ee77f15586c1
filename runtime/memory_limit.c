/* memory_limit.c — how many more bytes this process may allocate (see memory_limit.h).
 *
 * Place in the pipeline: a pre-flight check beside spec -> gen -> compile -> cache ->
 * load -> launch; the caller compares a layer's needs with the budget before it
 * allocates anything.
 *
 * Sources, each read under the probe's root prefix (ROOT is "" for "/"):
 *  - ROOT/proc/meminfo             "MemAvailable: <n> kB"
 *  - ROOT/proc/self/cgroup         "0::<path>" (v2) and "<n>:<...,memory,...>:<path>" (v1)
 *  - ROOT/proc/self/mountinfo      the cgroup2 mount, and the cgroup mount whose super
 *                                  options name "memory"; field 4 (the mount's root in
 *                                  the hierarchy) and field 5 (where it is mounted)
 *  - <mount>/<path>/memory.max, memory.current                   (v2, and each ancestor)
 *  - <mount>/<path>/memory.limit_in_bytes, memory.usage_in_bytes (v1, and each ancestor
 *    whose chain of memory.use_hierarchy is not 0)
 *  - ROOT/proc/self/statm          field 1 (virtual size) x page size, for RLIMIT_AS
 *  - ROOT/proc/self/status         "VmData: <n> kB" (else statm field 6 x page size),
 *                                  for RLIMIT_DATA
 * The cgroup directory is <mount point> + (<path> less the mount's root). When <path>
 * is not under the mount's root, has a ".." component, or that directory does not exist
 * (a container whose runtime mounted its own cgroup as the root of the mount), the
 * mount point's own files are used and the cgroup is named by the mount's root.
 *
 * Invariants:
 *  - Nothing read here is ever an error: a missing file, a short read, a line too long,
 *    a number with trailing garbage or one that overflows 64 bits makes that one value
 *    unknown and it is skipped. A limit whose usage cannot be read still bounds the
 *    budget (as if nothing were in use).
 *  - Usage above a limit gives 0, never a wrapped-around count.
 *  - The budget is the minimum over the known sources, checked in the order cgroup v2,
 *    cgroup v1, RLIMIT_AS, RLIMIT_DATA, MemAvailable; on a tie the earlier one is named.
 *  - Integers are parsed by hand (no strtod, no locale), messages use integer
 *    arithmetic only, and there is no global mutable state.
 */
#define _GNU_SOURCE
#include "memory_limit.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

#define LINE_BYTES (2 * PATH_MAX + 512) /* a mountinfo line with two long paths */
#define VALUE_FILE_BYTES 64             /* memory.max and friends: one number */
#define STATM_BYTES 256
#define KIB 1024u
#define MOUNTINFO_FIXED_FIELDS 6
/* cgroup v1 reports "no limit" as LONG_MAX rounded down to the page size; anything
 * within 1 GiB of 2^63 is taken as that (covers every page size up to 1 GiB). */
#define V1_UNLIMITED_FLOOR ((uint64_t)INT64_MAX - ((uint64_t)1 << 30))
#define ELLIPSIS "/..."

typedef enum cgroup_version { CGROUP_V1 = 1, CGROUP_V2 = 2 } cgroup_version;

/* The running minimum and what it came from. */
typedef struct budget_builder {
    moegen_memory_budget *out;
    int known;
} budget_builder;

/* One cgroup hierarchy as this process sees it. */
typedef struct cgroup_mount {
    char mount_root[PATH_MAX];  /* field 4 of mountinfo: the mount's root in the hierarchy */
    char mount_point[PATH_MAX]; /* field 5: where it is mounted */
} cgroup_mount;

/* ---- small text helpers ------------------------------------------------------------ */

static void offer(budget_builder *b, uint64_t available, const char *text) {
    if (!b->known || available < b->out->available_bytes) {
        b->known = 1;
        b->out->available_bytes = available;
        snprintf(b->out->limited_by, sizeof b->out->limited_by, "%s", text);
    }
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Parse decimal digits at *p into *value, advancing *p. At least one digit; no sign;
 * -1 on overflow or no digits. */
static int parse_u64(const char **p, uint64_t *value) {
    const char *s = *p;
    uint64_t v = 0;
    if (*s < '0' || *s > '9')
        return -1;
    while (*s >= '0' && *s <= '9') {
        unsigned digit = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - digit) / 10)
            return -1;
        v = v * 10 + digit;
        s++;
    }
    *p = s;
    *value = v;
    return 0;
}

static const char *skip_blanks(const char *s) {
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

/* "<spaces><digits><spaces>kB<spaces>" after a "Name:" prefix -> bytes. */
static int parse_kib_field(const char *s, uint64_t *bytes) {
    uint64_t kib;
    s = skip_blanks(s);
    if (parse_u64(&s, &kib) != 0)
        return -1;
    s = skip_blanks(s);
    if (strncmp(s, "kB", 2) != 0)
        return -1;
    for (s += 2; *s; s++)
        if (!is_space(*s))
            return -1;
    if (kib > UINT64_MAX / KIB)
        return -1;
    *bytes = kib * KIB;
    return 0;
}

/* Copy root + parts into out; -1 when it does not fit. A root of "/" adds nothing. */
static int join_path(char *out, size_t size, const char *root, const char *a, const char *b) {
    const char *prefix = strcmp(root, "/") == 0 ? "" : root;
    int n = snprintf(out, size, "%s%s%s", prefix, a, b ? b : "");
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* Read a whole small file into buf (NUL-terminated). -1 when it cannot be opened or
 * read, or does not fit (so a file with a number followed by junk is never cut into a
 * plausible number). */
static int read_small_file(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    size_t used = 0;
    int result = -1;
    if (fd < 0)
        return -1;
    for (;;) {
        ssize_t got = read(fd, buf + used, size - 1 - used);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            break;
        if (got == 0) {
            result = 0;
            break;
        }
        used += (size_t)got;
        if (used == size - 1) {
            char extra;
            ssize_t more;
            do {
                more = read(fd, &extra, 1);
            } while (more < 0 && errno == EINTR);
            result = more == 0 ? 0 : -1;
            break;
        }
    }
    close(fd);
    buf[used] = '\0';
    return result;
}

/* Next line of `file` into buf without its newline: 1, or 0 at the end. A line that
 * does not fit or holds a NUL is read past and skipped. */
static int next_line(FILE *file, char *buf, size_t size) {
    for (;;) {
        size_t length = 0;
        int bad = 0;
        int c;
        while ((c = getc(file)) != EOF && c != '\n') {
            if (c == '\0' || length + 1 >= size)
                bad = 1;
            else
                buf[length++] = (char)c;
        }
        buf[length] = '\0';
        if (!bad && (c != EOF || length > 0))
            return 1;
        if (c == EOF)
            return 0;
    }
}

/* Open root + path for reading as a stream (never blocking on a FIFO in a fake tree). */
static FILE *open_under_root(const char *root, const char *path) {
    char full[PATH_MAX];
    FILE *file = NULL;
    if (join_path(full, sizeof full, root, path, NULL) != 0)
        return NULL;
    int fd = open(full, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd >= 0 && (file = fdopen(fd, "r")) == NULL)
        close(fd);
    return file;
}

/* A cgroup value file: a number, or "max" (only when allow_max). Returns 1 for a
 * number in *value, 2 for "max", 0 when missing or not understood. */
static int read_value_file(const char *dir, const char *name, int allow_max, uint64_t *value) {
    char path[PATH_MAX];
    char text[VALUE_FILE_BYTES];
    const char *s = text;
    if (join_path(path, sizeof path, dir, "/", name) != 0)
        return 0;
    if (read_small_file(path, text, sizeof text) != 0)
        return 0;
    size_t length = strlen(text);
    while (length > 0 && is_space(text[length - 1]))
        text[--length] = '\0';
    if (allow_max && strcmp(text, "max") == 0)
        return 2;
    if (parse_u64(&s, value) != 0 || *s != '\0')
        return 0;
    return 1;
}

/* ---- messages ---------------------------------------------------------------------- */

const char *moegen_format_bytes(uint64_t bytes, char *out, size_t size) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    const unsigned last = (unsigned)(sizeof units / sizeof units[0]) - 1;
    if (!out || size == 0)
        return out;
    if (bytes < KIB) {
        snprintf(out, size, "%llu B", (unsigned long long)bytes);
        return out;
    }
    unsigned u = 1;
    while (u < last && bytes >> (10 * (u + 1)) != 0)
        u++;
    for (;;) {
        uint64_t unit = (uint64_t)1 << (10 * u);
        uint64_t whole = bytes / unit;
        uint64_t tenths = ((bytes % unit) * 10 + unit / 2) / unit; /* no overflow: unit <= 2^60 */
        if (tenths == 10) {
            whole++;
            tenths = 0;
        }
        if (whole >= KIB && u < last) { /* 1023.96 KiB reads better as 1.0 MiB */
            u++;
            continue;
        }
        snprintf(out, size, "%llu.%llu %s", (unsigned long long)whole,
                 (unsigned long long)tenths, units[u]);
        return out;
    }
}

/* Append as much of `text` as fits to out (NUL-terminated, `*used` bytes so far). */
static void append_text(char *out, size_t size, size_t *used, const char *text) {
    size_t length = strlen(text);
    if (*used + 1 >= size)
        return;
    if (length > size - 1 - *used)
        length = size - 1 - *used;
    memcpy(out + *used, text, length);
    *used += length;
    out[*used] = '\0';
}

/* "<what>[ of <name>] (<limit>, <used> in use)" into out. A name too long to fit keeps
 * its end from a '/' on: "/.../leaf". */
static void describe_limit(char *out, size_t size, const char *what, const char *name,
                           uint64_t limit, int have_used, uint64_t used) {
    char limit_text[MOEGEN_BYTES_TEXT_BYTES], used_text[MOEGEN_BYTES_TEXT_BYTES];
    char tail[2 * MOEGEN_BYTES_TEXT_BYTES + 32];
    moegen_format_bytes(limit, limit_text, sizeof limit_text);
    if (have_used)
        snprintf(tail, sizeof tail, "(%s, %s in use)", limit_text,
                 moegen_format_bytes(used, used_text, sizeof used_text));
    else
        snprintf(tail, sizeof tail, "(%s, usage unknown)", limit_text);
    if (!name) {
        snprintf(out, size, "%s %s", what, tail);
        return;
    }
    size_t fixed = strlen(what) + strlen(" of ") + 1 + strlen(tail);
    size_t room = size > fixed + 1 ? size - 1 - fixed : 0;
    size_t length = strlen(name);
    const char *ellipsis = "";
    if (length > room && room > strlen(ELLIPSIS) + 1) {
        const char *end = name + length - (room - strlen(ELLIPSIS));
        const char *slash = strchr(end, '/');
        ellipsis = ELLIPSIS;
        name = slash ? slash : end;
    }
    const char *const parts[] = {what, " of ", ellipsis, name, " ", tail};
    size_t used_bytes = 0;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        append_text(out, size, &used_bytes, parts[i]);
}

/* ---- /proc/meminfo ----------------------------------------------------------------- */

static void check_mem_available(const moegen_memory_probe *probe, budget_builder *b) {
    char line[LINE_BYTES];
    FILE *file = open_under_root(probe->root, "/proc/meminfo");
    if (!file)
        return;
    while (next_line(file, line, sizeof line)) {
        static const char key[] = "MemAvailable:";
        uint64_t bytes;
        if (strncmp(line, key, sizeof key - 1) == 0) {
            if (parse_kib_field(line + sizeof key - 1, &bytes) == 0)
                offer(b, bytes, "MemAvailable");
            break;
        }
    }
    fclose(file);
}

/* ---- rlimits ----------------------------------------------------------------------- */

/* Fields 1 (size) and 6 (data + stack) of /proc/self/statm, in pages. */
static int read_statm(const moegen_memory_probe *probe, uint64_t fields[6]) {
    char path[PATH_MAX];
    char text[STATM_BYTES];
    const char *s = text;
    if (join_path(path, sizeof path, probe->root, "/proc/self/statm", NULL) != 0 ||
        read_small_file(path, text, sizeof text) != 0)
        return -1;
    for (int i = 0; i < 6; i++) {
        if (i > 0) {
            if (*s != ' ')
                return -1;
            s++;
        }
        if (parse_u64(&s, &fields[i]) != 0)
            return -1;
    }
    return 0;
}

static int pages_to_bytes(uint64_t pages, uint64_t page_size, uint64_t *bytes) {
    if (page_size != 0 && pages > UINT64_MAX / page_size)
        return -1;
    *bytes = pages * page_size;
    return 0;
}

static int read_vm_data(const moegen_memory_probe *probe, uint64_t *bytes) {
    char line[LINE_BYTES];
    int result = -1;
    FILE *file = open_under_root(probe->root, "/proc/self/status");
    if (!file)
        return -1;
    while (next_line(file, line, sizeof line)) {
        static const char key[] = "VmData:";
        if (strncmp(line, key, sizeof key - 1) == 0) {
            result = parse_kib_field(line + sizeof key - 1, bytes);
            break;
        }
    }
    fclose(file);
    return result;
}

static void offer_rlimit(budget_builder *b, const char *name, uint64_t limit, int have_used,
                         uint64_t used) {
    char text[MOEGEN_MEMORY_LIMITED_BY_BYTES];
    uint64_t available = !have_used ? limit : used < limit ? limit - used : 0;
    describe_limit(text, sizeof text, name, NULL, limit, have_used, used);
    offer(b, available, text);
}

static void check_rlimits(const moegen_memory_probe *probe, budget_builder *b) {
    uint64_t statm[6];
    int have_statm = read_statm(probe, statm) == 0;
    if (probe->rlimit_as != MOEGEN_MEMORY_UNLIMITED) {
        uint64_t size = 0;
        int have = have_statm && pages_to_bytes(statm[0], probe->page_size, &size) == 0;
        offer_rlimit(b, "RLIMIT_AS", probe->rlimit_as, have, size);
    }
    if (probe->rlimit_data != MOEGEN_MEMORY_UNLIMITED) {
        uint64_t data = 0;
        int have = read_vm_data(probe, &data) == 0 ||
                   (have_statm && pages_to_bytes(statm[5], probe->page_size, &data) == 0);
        offer_rlimit(b, "RLIMIT_DATA", probe->rlimit_data, have, data);
    }
}

/* ---- cgroups ----------------------------------------------------------------------- */

/* Does the comma-separated list contain `word`? */
static int list_has(const char *list, size_t length, const char *word) {
    size_t word_length = strlen(word);
    size_t i = 0;
    while (i <= length) {
        size_t end = i;
        while (end < length && list[end] != ',')
            end++;
        if (end - i == word_length && strncmp(list + i, word, word_length) == 0)
            return 1;
        i = end + 1;
    }
    return 0;
}

/* This process's cgroup path for the version from /proc/self/cgroup into path. */
static int find_cgroup_path(const moegen_memory_probe *probe, cgroup_version version,
                            char *path, size_t size) {
    char line[LINE_BYTES];
    int found = -1;
    FILE *file = open_under_root(probe->root, "/proc/self/cgroup");
    if (!file)
        return -1;
    while (found != 0 && next_line(file, line, sizeof line)) {
        const char *s = line;
        uint64_t id;
        if (parse_u64(&s, &id) != 0 || *s != ':')
            continue;
        const char *controllers = s + 1;
        const char *colon = strchr(controllers, ':');
        if (!colon || colon[1] != '/')
            continue;
        size_t list_length = (size_t)(colon - controllers);
        int match = version == CGROUP_V2 ? id == 0 && list_length == 0
                                         : id != 0 && list_has(controllers, list_length, "memory");
        if (match && (size_t)snprintf(path, size, "%s", colon + 1) < size)
            found = 0;
    }
    fclose(file);
    return found;
}

/* Undo mountinfo's octal escapes (\040 space, \011 tab, \012 newline, \134 backslash). */
static void unescape_mount_field(char *s) {
    char *out = s;
    while (*s) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
            s += 4;
        } else {
            *out++ = *s++;
        }
    }
    *out = '\0';
}

/* Is `root` (a mount's root in the hierarchy) `path` or an ancestor of it? Then *rel is
 * the rest of path: "" or "/a/b". */
static int path_is_under(const char *root, const char *path, const char **rel) {
    size_t length = strlen(root);
    if (strcmp(root, "/") == 0) {
        *rel = strcmp(path, "/") == 0 ? "" : path;
        return 1;
    }
    while (length > 1 && root[length - 1] == '/')
        length--;
    if (strncmp(root, path, length) != 0 || (path[length] != '\0' && path[length] != '/'))
        return 0;
    *rel = path + length;
    return 1;
}

/* Split one mountinfo line in place; fields[0..5] are the fixed ones, then fstype and
 * super options. Returns 0, or -1 when malformed. */
static int split_mountinfo(char *line, char **fields, char **fstype, char **super_options) {
    char *save = NULL;
    char *token = strtok_r(line, " ", &save);
    int n = 0;
    while (token && n < MOUNTINFO_FIXED_FIELDS) {
        fields[n++] = token;
        token = strtok_r(NULL, " ", &save);
    }
    if (n < MOUNTINFO_FIXED_FIELDS)
        return -1;
    while (token && strcmp(token, "-") != 0) /* optional fields */
        token = strtok_r(NULL, " ", &save);
    if (!token)
        return -1;
    *fstype = strtok_r(NULL, " ", &save);
    char *source = *fstype ? strtok_r(NULL, " ", &save) : NULL;
    *super_options = source ? strtok_r(NULL, " ", &save) : NULL;
    return *super_options ? 0 : -1;
}

/* The mount of the hierarchy, preferring one whose root holds `cgroup_path`. */
static int find_cgroup_mount(const moegen_memory_probe *probe, cgroup_version version,
                             const char *cgroup_path, cgroup_mount *mount) {
    char line[LINE_BYTES];
    int found = 0; /* 0: none, 1: a mount, 2: a mount holding cgroup_path */
    FILE *file = open_under_root(probe->root, "/proc/self/mountinfo");
    if (!file)
        return -1;
    while (found < 2 && next_line(file, line, sizeof line)) {
        char *fields[MOUNTINFO_FIXED_FIELDS];
        char *fstype, *super_options;
        const char *rel;
        if (split_mountinfo(line, fields, &fstype, &super_options) != 0)
            continue;
        int match = version == CGROUP_V2
                        ? strcmp(fstype, "cgroup2") == 0
                        : strcmp(fstype, "cgroup") == 0 &&
                              list_has(super_options, strlen(super_options), "memory");
        if (!match)
            continue;
        unescape_mount_field(fields[3]);
        unescape_mount_field(fields[4]);
        if (fields[3][0] != '/' || fields[4][0] != '/')
            continue;
        if (strlen(fields[3]) >= sizeof mount->mount_root ||
            strlen(fields[4]) >= sizeof mount->mount_point)
            continue;
        int holds = path_is_under(fields[3], cgroup_path, &rel);
        if (found == 0 || holds) {
            memcpy(mount->mount_root, fields[3], strlen(fields[3]) + 1);
            memcpy(mount->mount_point, fields[4], strlen(fields[4]) + 1);
            found = holds ? 2 : 1;
        }
    }
    fclose(file);
    return found ? 0 : -1;
}

static int has_dot_dot(const char *path) {
    for (const char *s = path; (s = strstr(s, "..")) != NULL; s += 2)
        if ((s == path || s[-1] == '/') && (s[2] == '\0' || s[2] == '/'))
            return 1;
    return 0;
}

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The limit of one cgroup directory, offered to the builder. Returns 1 when walking up
 * should stop (v1: this cgroup does not pass its children's usage on). */
static int check_cgroup_dir(budget_builder *b, cgroup_version version, const char *dir,
                            const char *name, int is_leaf) {
    uint64_t limit = 0, used = 0;
    char text[MOEGEN_MEMORY_LIMITED_BY_BYTES];
    if (version == CGROUP_V1 && !is_leaf) {
        uint64_t hierarchical;
        if (read_value_file(dir, "memory.use_hierarchy", 0, &hierarchical) == 1 &&
            hierarchical == 0)
            return 1;
    }
    const char *limit_file = version == CGROUP_V2 ? "memory.max" : "memory.limit_in_bytes";
    const char *usage_file = version == CGROUP_V2 ? "memory.current" : "memory.usage_in_bytes";
    if (read_value_file(dir, limit_file, version == CGROUP_V2, &limit) != 1)
        return 0; /* missing, garbage or "max" */
    if (version == CGROUP_V1 && limit >= V1_UNLIMITED_FLOOR)
        return 0;
    int have_used = read_value_file(dir, usage_file, 0, &used) == 1;
    uint64_t available = !have_used ? limit : used < limit ? limit - used : 0;
    describe_limit(text, sizeof text,
                   version == CGROUP_V2 ? "cgroup v2 memory.max" : "cgroup v1 memory.limit_in_bytes",
                   name, limit, have_used, used);
    offer(b, available, text);
    return 0;
}

static void check_cgroup(const moegen_memory_probe *probe, cgroup_version version,
                         budget_builder *b) {
    char cgroup_path[PATH_MAX];
    char rel[PATH_MAX];
    char dir[PATH_MAX];
    char name[2 * PATH_MAX];
    const char *rel_in_path = NULL;
    cgroup_mount mount;
    if (find_cgroup_path(probe, version, cgroup_path, sizeof cgroup_path) != 0 ||
        find_cgroup_mount(probe, version, cgroup_path, &mount) != 0)
        return;
    rel[0] = '\0';
    if (path_is_under(mount.mount_root, cgroup_path, &rel_in_path) && !has_dot_dot(rel_in_path)) {
        snprintf(rel, sizeof rel, "%s", rel_in_path); /* fits: a suffix of cgroup_path */
        size_t length = strlen(rel);
        while (length > 0 && rel[length - 1] == '/')
            rel[--length] = '\0';
        if (join_path(dir, sizeof dir, probe->root, mount.mount_point, rel) != 0 ||
            !is_directory(dir))
            rel[0] = '\0'; /* not visible here: use the mount root's own files */
    }
    for (int is_leaf = 1;; is_leaf = 0) {
        const char *base = strcmp(mount.mount_root, "/") == 0 ? "" : mount.mount_root;
        if (join_path(dir, sizeof dir, probe->root, mount.mount_point, rel) != 0)
            return;
        snprintf(name, sizeof name, "%s%s", base, rel);
        if (name[0] == '\0')
            snprintf(name, sizeof name, "/");
        if (check_cgroup_dir(b, version, dir, name, is_leaf))
            return;
        char *slash = strrchr(rel, '/');
        if (!slash)
            return; /* that was the mount root */
        *slash = '\0';
    }
}

/* ---- entry points ------------------------------------------------------------------ */

void moegen_memory_probe_init_system(moegen_memory_probe *probe) {
    struct rlimit limit;
    long page = sysconf(_SC_PAGESIZE);
    if (!probe)
        return;
    probe->root = "/";
    probe->rlimit_as = MOEGEN_MEMORY_UNLIMITED;
    probe->rlimit_data = MOEGEN_MEMORY_UNLIMITED;
    probe->page_size = page > 0 ? (uint64_t)page : 4096;
    if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
        probe->rlimit_as = (uint64_t)limit.rlim_cur;
    if (getrlimit(RLIMIT_DATA, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
        probe->rlimit_data = (uint64_t)limit.rlim_cur;
}

moegen_status moegen_memory_budget_read_probe(const moegen_memory_probe *probe,
                                              moegen_memory_budget *out, moegen_error *err) {
    budget_builder b = {out, 0};
    if (!probe || !out)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "memory budget: NULL %s", probe ? "output" : "probe");
    if (!probe->root || probe->root[0] == '\0' || strlen(probe->root) >= PATH_MAX / 2)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "memory budget: the root prefix must be a non-empty path "
                                "shorter than %d bytes",
                                PATH_MAX / 2);
    if (probe->page_size == 0)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "memory budget: page size 0");
    moegen_error_clear(err);
    out->available_bytes = MOEGEN_MEMORY_UNLIMITED;
    snprintf(out->limited_by, sizeof out->limited_by, "unknown");
    check_cgroup(probe, CGROUP_V2, &b);
    check_cgroup(probe, CGROUP_V1, &b);
    check_rlimits(probe, &b);
    check_mem_available(probe, &b);
    return MOEGEN_OK;
}

moegen_status moegen_memory_budget_read(moegen_memory_budget *out, moegen_error *err) {
    moegen_memory_probe probe;
    moegen_memory_probe_init_system(&probe);
    return moegen_memory_budget_read_probe(&probe, out, err);
}
