/* host_cc.h — the host C compiler as the CPU backend's compiler.
 *
 * Place in the pipeline: spec -> gen -> [compile] -> cache -> load -> launch.
 * Generated C is compiled into a shared object with the host compiler ($MOEGEN_CC,
 * else "cc"), run through posix_spawn with its output captured in a log file.
 */
#ifndef MOEGEN_RUNTIME_HOST_CC_H
#define MOEGEN_RUNTIME_HOST_CC_H

#include "moegen.h"

typedef struct moegen_host_compiler {
    char command[256];   /* program to run ("cc" or $MOEGEN_CC) */
    char identity[512];  /* "<first line of --version> / <-dumpmachine>": part of the cache key */
    char flags[256];     /* optimization and ISA flags, space separated: part of the cache key */
    int vector_floats;   /* widest float vector the flags enable: 4 (SSE), 8 (AVX2), 16 (AVX-512) */
} moegen_host_compiler;

/* Find the compiler, read its identity and choose flags for this CPU
 * ("-O3 -fPIC -fopenmp ..." plus -mavx2 -mfma when the CPU has them).
 * Returns MOEGEN_OK or MOEGEN_ERR_COMPILE ("host C compiler 'cc' not found ..."). */
moegen_status moegen_host_compiler_probe(moegen_host_compiler *hc, moegen_error *err);

/* Compile `source_path` (its directory is on the include path) into the shared
 * object `output_path`, writing the compiler's output to `log_path`.
 * Returns MOEGEN_OK or MOEGEN_ERR_COMPILE with the log's first lines in the message. */
moegen_status moegen_host_compile(const moegen_host_compiler *hc, const char *source_path,
                                  const char *output_path, const char *log_path,
                                  moegen_error *err);

#endif
