/* cuda_emulator.h — runs generated CUDA kernels on the host, for machines without a GPU.
 *
 * Place in the pipeline: a test renders a CUDA module with the real generator, then
 * compiles its source as host C++ with this header in front and MOEGEN_CUDA_BACKWARD_ONLY
 * defined (templates/cuda/layer.cu.tpl then leaves out the forward's kernels, which use
 * warp intrinsics and PTX this header does not emulate), and launches the kernels through
 * the emu_launch_* functions at the end of the translation unit (cuda_emulator_launch.h).
 *
 * Model: the blocks of a grid run one after another on a pool of OS threads, one per thread
 * of a block (threadIdx and blockIdx are thread-local), so every thread has its own
 * registers and stack, and a __shared__ array (a static local here) is shared by the block.
 * __syncthreads() is a barrier over the threads still running: a thread that returned no
 * longer counts, as on a GPU. What is emulated: the CUDA C++ the backward kernels use
 * (qualifiers, thread and block indices, __syncthreads, the bit casts, the math library).
 * Warp shuffles and inline PTX are not: calling __shfl_xor_sync aborts with a message.
 * Only fp32 modules compile (the fp16 and bf16 conversions are PTX).
 *
 * Not a performance model: it checks what the kernels compute, not how fast.
 */
#ifndef MOEGEN_TESTS_CUDA_EMULATOR_H
#define MOEGEN_TESTS_CUDA_EMULATOR_H

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <pthread.h>

#define MOEGEN_CUDA_BACKWARD_ONLY 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct emu_dim3 {
    unsigned x, y, z;
};
static thread_local emu_dim3 threadIdx, blockIdx;

static inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float __uint_as_float(unsigned bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
template <typename T> static inline T __shfl_xor_sync(unsigned, T, int) {
    std::fprintf(stderr, "cuda_emulator: warp shuffles are not emulated\n");
    std::abort();
}
using std::isnan;
using std::max;
using std::min;

/* ---- the block barrier: counts the threads that have not returned ----------------------- */

struct emu_block {
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
    unsigned running = 0, arrived = 0, generation = 0;

    void release_if_complete() { /* with lock held */
        if (arrived > 0 && arrived == running) {
            arrived = 0;
            generation++;
            pthread_cond_broadcast(&changed);
        }
    }
    void sync() {
        pthread_mutex_lock(&lock);
        const unsigned mine = generation;
        arrived++;
        release_if_complete();
        while (generation == mine) pthread_cond_wait(&changed, &lock);
        pthread_mutex_unlock(&lock);
    }
    void leave() {
        pthread_mutex_lock(&lock);
        running--;
        release_if_complete();
        pthread_mutex_unlock(&lock);
    }
};
static emu_block *emu_current_block;

static inline void __syncthreads() { emu_current_block->sync(); }

/* ---- launches ------------------------------------------------------------------------------ */

struct emu_grid {
    const std::function<void()> *body;
    unsigned grid_x, grid_y, threads;
    emu_block block;
    pthread_barrier_t between; /* every thread of the pool, between two blocks */
};

struct emu_thread_args {
    emu_grid *grid;
    unsigned thread;
};

/* One thread of the pool: thread `thread` of every block, one block after another. */
static void *emu_thread_main(void *p) {
    emu_thread_args *a = (emu_thread_args *)p;
    emu_grid *g = a->grid;
    threadIdx = {a->thread, 0, 0};
    for (unsigned by = 0; by < g->grid_y; by++)
        for (unsigned bx = 0; bx < g->grid_x; bx++) {
            blockIdx = {bx, by, 0};
            (*g->body)();
            g->block.leave();
            pthread_barrier_wait(&g->between); /* the block is done */
            if (a->thread == 0) g->block.running = g->threads;
            pthread_barrier_wait(&g->between); /* the next one may start */
        }
    return nullptr;
}

/* Run body as a grid of grid_x x grid_y blocks of `threads` threads; 0, or -1 when the
 * pool's threads could not be started. */
static int emu_run_grid(unsigned grid_x, unsigned grid_y, unsigned threads, const std::function<void()> &body) {
    emu_grid grid;
    grid.body = &body;
    grid.grid_x = grid_x, grid.grid_y = grid_y, grid.threads = threads;
    grid.block.running = threads;
    emu_current_block = &grid.block;
    pthread_t *ids = new pthread_t[threads];
    emu_thread_args *args = new emu_thread_args[threads];
    int status = pthread_barrier_init(&grid.between, nullptr, threads) == 0 ? 0 : -1;
    unsigned started = 0;
    for (unsigned t = 0; t < threads && status == 0; t++) {
        args[t] = {&grid, t};
        if (pthread_create(&ids[t], nullptr, emu_thread_main, &args[t]) != 0) status = -1;
        else started++;
    }
    if (status != 0 && started > 0) {
        std::fprintf(stderr, "cuda_emulator: only %u of %u threads started\n", started, threads);
        std::abort(); /* the started ones would wait forever at the barrier */
    }
    for (unsigned t = 0; t < started; t++) pthread_join(ids[t], nullptr);
    if (started == threads) pthread_barrier_destroy(&grid.between);
    delete[] ids;
    delete[] args;
    return status;
}

#endif
