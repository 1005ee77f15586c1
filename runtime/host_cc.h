/* host_cc.h — the host C compiler as the CPU backend's compiler.
 *
 * Place in the pipeline: spec -> gen -> [compile] -> cache -> load -> launch.
 * Generated C is compiled into a shared object with the host compiler ($MOEGEN_CC,
 * else "cc"), run through posix_spawn with its output captured in a log file.
 *
 * Nothing here waits forever: every run of the compiler has a time limit, and on
 * expiry its whole process group (driver, cc1, as, ld, anything a wrapper script
 * started) is killed with SIGKILL and reaped.
 *   MOEGEN_CC_TIMEOUT  the compile's limit in seconds: a positive whole number
 *                      (decimal digits only, at most 2147483); unset or empty: 300.
 *                      Anything else makes moegen_host_compiler_probe fail.
 *   The probes (`--version`, `-dumpmachine`) each wait min(30 s, that limit).
 */
#ifndef MOEGEN_RUNTIME_HOST_CC_H
#define MOEGEN_RUNTIME_HOST_CC_H

#include "moegen.h"
#include "variant.h"

typedef struct moegen_host_compiler {
    char command[256];   /* program to run ("cc" or $MOEGEN_CC) */
    char identity[512];  /* "<first line of --version> / <-dumpmachine>": part of the cache key */
    char flags[256];     /* optimization and ISA flags, space separated: part of the cache key */
    int vector_floats;   /* widest float vector the flags enable: 4 (SSE), 8 (AVX2), 16 (AVX-512) */
    int bf16_dot;        /* the flags enable AVX-512 BF16 (vdpbf16ps) */
    int amx;             /* the CPU has AMX with bf16 (tiles; the OS must still permit them) */
    int timeout_ms;      /* time limit of one compile, > 0: $MOEGEN_CC_TIMEOUT s, else 300 s.
                          * Set by the probe; a caller may change it afterwards. Not part of
                          * the cache key (it never changes what a compile produces). */
} moegen_host_compiler;

/* Find the compiler, read its time limit ($MOEGEN_CC_TIMEOUT) and identity, and
 * choose flags for this CPU ("-O3 -fPIC -fopenmp ..." plus -mavx2 -mfma when the
 * CPU has them). Returns MOEGEN_OK or MOEGEN_ERR_COMPILE ("host C compiler 'cc'
 * not found ...", "MOEGEN_CC_TIMEOUT='abc' is not a time limit ...", "host C
 * compiler 'cc': '--version' did not answer within 30 s (killed; ...)"). */
moegen_status moegen_host_compiler_probe(moegen_host_compiler *hc, moegen_error *err);

/* What this CPU runs: its widest float vector, AVX-512 BF16, AMX-BF16 (gen/variant.h). */
void moegen_host_cpu_target(moegen_target *target);

/* The compile flags (no link flags) of generated C for `target`: "-std=gnu11 -O3 -fPIC
 * -fopenmp -fno-math-errno" and the instruction-set flags. The one home of these flags: the
 * runtime's modules add only "-shared -Wl,-Bsymbolic" to them, and `moegen gen` writes them
 * beside the generated source (generate-and-link). 0, or -1 when `size` is too small. */
int moegen_host_target_compile_flags(const moegen_target *target, char *out, size_t size);

/* A CPU target's name ("base", "avx2", "avx512", "avx512-bf16", "avx512-amx": the widest one
 * `target` has), and the target of a name (0, or -1 for an unknown name). */
const char *moegen_host_target_name(const moegen_target *target);
int moegen_host_target_parse(const char *name, moegen_target *target);

/* The variant target these flags give (gen/variant.h). */
moegen_target moegen_host_compiler_target(const moegen_host_compiler *hc);

/* What tuning databases are filed under (docs/tuning.md): `device`, this CPU exactly
 * ("cpu <model name>; <instruction sets>"), and `family`, CPUs that run the same kernels
 * ("cpu-<arch>-<instruction sets>", e.g. "cpu-x86_64-avx512-amx"). */
void moegen_host_compiler_device(const moegen_host_compiler *hc, char *device, size_t device_size, char *family,
                                 size_t family_size);

/* Compile `source_path` (its directory is on the include path) into the shared
 * object `output_path`, writing the compiler's output to `log_path`, for at most
 * hc->timeout_ms. Returns MOEGEN_OK; MOEGEN_ERR_COMPILE with the log's first lines
 * in the message, also when the limit expired ("... did not finish within 300 s
 * compiling <source> (killed; raise MOEGEN_CC_TIMEOUT to allow more; full log:
 * <log>)"); MOEGEN_ERR_INVALID_ARGUMENT for bad arguments or timeout_ms <= 0. */
moegen_status moegen_host_compile(const moegen_host_compiler *hc, const char *source_path,
                                  const char *output_path, const char *log_path,
                                  moegen_error *err);

#endif
