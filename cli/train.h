/* train.h — `moegen run --backward`: a training step (forward that keeps its state, then the
 * backward) on the tensors `moegen run` made or loaded, timed against the forward, verified
 * against the reference backward, and its gradients saved as .npy (cli/train.c). */
#ifndef MOEGEN_CLI_TRAIN_H
#define MOEGEN_CLI_TRAIN_H

#include <stdint.h>

#include "moegen.h"
#include "run_cuda.h"
#include "spec.h"
#include "tensors.h"

typedef struct cli_train_options {
    uint64_t seed;            /* dy is drawn from it unless load_dir has dy.npy */
    uint64_t rng_offset;
    long long repeat;         /* timed steps (median) */
    double aux_coeff, z_coeff;
    double forward_ms;        /* the inference forward's median, for the ratio */
    const char *load_dir;     /* dy.npy from here when present */
    const char *save_dir;     /* dy, dx and grad_<tensor>.npy go here */
    int verify;               /* 0: --no-verify */
    cuda_run *gpu;            /* a CUDA layer: its tensors on the device (NULL: a CPU layer) */
} cli_train_options;

/* Run, time, verify and save one training step of S tokens on `layer` (bound to ts's
 * weights). Prints its lines; returns 0 when everything ran and verified, else 1. */
int cli_train_step(moegen_layer *layer, const moegen_spec *spec, const moe_tensors *ts,
                   const cli_train_options *o);

#endif
