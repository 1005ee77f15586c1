/* memory_limit.h — how many more bytes this process may allocate, and which limit binds.
 *
 * Place in the pipeline: a pre-flight check beside spec -> gen -> compile -> cache ->
 * load -> launch. Before a layer allocates its weights and activations the caller
 * compares what it needs with moegen_memory_budget_read() and reports a clear error
 * ("needs 3.1 GiB; 1.2 GiB is available (cgroup v2 memory.max of /user.slice/x ...)")
 * instead of being killed by the OOM killer or failing in the middle of a run.
 *
 * The budget is the minimum over every source that is known:
 *  - MemAvailable in /proc/meminfo;
 *  - cgroup v2: memory.max - memory.current of the process's cgroup and of every
 *    ancestor up to the root of the mount ("max" is no limit);
 *  - cgroup v1: memory.limit_in_bytes - memory.usage_in_bytes of the memory
 *    controller's cgroup and its ancestors (an ancestor with memory.use_hierarchy 0
 *    does not bind; a limit near 2^63 is no limit);
 *  - RLIMIT_AS - the virtual size (/proc/self/statm) and RLIMIT_DATA - the data size
 *    (VmData in /proc/self/status), when those limits are set.
 * Cgroup directories are found through /proc/self/cgroup and /proc/self/mountinfo;
 * when the process's cgroup is not visible under the mount (a container), the mount
 * root's own files are used.
 *
 * Invariants: a source that is missing, unreadable or holds something unexpected is
 * skipped, never an error; when no source is known the budget is UINT64_MAX and
 * limited_by is "unknown". Parsing is locale-independent; there is no global state.
 */
#ifndef MOEGEN_RUNTIME_MEMORY_LIMIT_H
#define MOEGEN_RUNTIME_MEMORY_LIMIT_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOEGEN_MEMORY_LIMITED_BY_BYTES 160
#define MOEGEN_MEMORY_UNLIMITED UINT64_MAX
#define MOEGEN_BYTES_TEXT_BYTES 32 /* fits any moegen_format_bytes() result */

typedef struct moegen_memory_budget {
    uint64_t available_bytes; /* UINT64_MAX when nothing is known */
    /* The binding source, e.g. "MemAvailable", "RLIMIT_AS (4.0 GiB, 3.1 GiB in use)",
     * "cgroup v2 memory.max of /user.slice/x (2.0 GiB, 1.2 GiB in use)", "unknown".
     * A long cgroup path is shortened from the left ("/.../leaf"). */
    char limited_by[MOEGEN_MEMORY_LIMITED_BY_BYTES];
} moegen_memory_budget;

/* Read the budget of this process from the real system ("/", getrlimit()).
 * Returns MOEGEN_OK, or MOEGEN_ERR_INVALID_ARGUMENT for a NULL `out`. */
moegen_status moegen_memory_budget_read(moegen_memory_budget *out, moegen_error *err);

/* ---- the same with every input injectable (for tests) ---------------------------- */

typedef struct moegen_memory_probe {
    const char *root;     /* prefix of every path read: "/" for the real system, or a
                           * directory holding a fake proc/ and sys/ tree */
    uint64_t rlimit_as;   /* bytes; MOEGEN_MEMORY_UNLIMITED: not set */
    uint64_t rlimit_data; /* bytes; MOEGEN_MEMORY_UNLIMITED: not set */
    uint64_t page_size;   /* bytes per page in /proc/self/statm */
} moegen_memory_probe;

/* Fill `probe` from this process: root "/", getrlimit(RLIMIT_AS / RLIMIT_DATA) soft
 * limits, sysconf(_SC_PAGESIZE). */
void moegen_memory_probe_init_system(moegen_memory_probe *probe);

/* Read the budget with the inputs in `probe`. Returns MOEGEN_OK, or
 * MOEGEN_ERR_INVALID_ARGUMENT for a NULL argument, a root that is empty or too long,
 * or a zero page size. */
moegen_status moegen_memory_budget_read_probe(const moegen_memory_probe *probe,
                                              moegen_memory_budget *out, moegen_error *err);

/* ---- messages -------------------------------------------------------------------- */

/* Format a byte count for people: "512 B", "1.5 GiB", "16.0 EiB" (binary units, one
 * decimal, rounded to nearest, '.' whatever the locale). Writes into `out` (truncated
 * to `size`; MOEGEN_BYTES_TEXT_BYTES always suffices) and returns `out`. */
const char *moegen_format_bytes(uint64_t bytes, char *out, size_t size);

#ifdef __cplusplus
}
#endif
#endif
