/* cuda_emulator_launch.h — the launch entry points of a module compiled for the host
 * emulator (tests/cuda_emulator.h), included after the generated source: C callers hand
 * them a kernel (found with dlsym by its name) and its grid, block and arguments, as
 * cuLaunchKernel would take them for the training backward's three kernel signatures.
 * Each returns 0, or -1 when the emulator could not start a block's threads. */
#ifndef MOEGEN_TESTS_CUDA_EMULATOR_LAUNCH_H
#define MOEGEN_TESTS_CUDA_EMULATOR_LAUNCH_H

extern "C" int emu_launch_args(void (*kernel)(moegen_cuda_backward_args), unsigned grid_x, unsigned grid_y,
                               unsigned threads, const moegen_cuda_backward_args *b) {
    return emu_run_grid(grid_x, grid_y, threads, [&] { kernel(*b); });
}

extern "C" int emu_launch_which(void (*kernel)(moegen_cuda_backward_args, int), unsigned grid_x, unsigned grid_y,
                                unsigned threads, const moegen_cuda_backward_args *b, int which) {
    return emu_run_grid(grid_x, grid_y, threads, [&] { kernel(*b, which); });
}

extern "C" int emu_launch_group(void (*kernel)(moegen_cuda_backward_args, int, int, int), unsigned grid_x,
                                unsigned grid_y, unsigned threads, const moegen_cuda_backward_args *b, int group,
                                int first, int count) {
    return emu_run_grid(grid_x, grid_y, threads, [&] { kernel(*b, group, first, count); });
}

#endif
