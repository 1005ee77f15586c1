% -- ep.cu.tpl — expert parallelism on the GPU, staged through host memory (runtime/ep.c):
% -- the kept rows a rank sends, gathered from x in the order of the route stage's
% -- permutation. The rows a rank receives run through the routed-group GEMMs with an
% -- identity row list, and the outputs that come back land in expert_out by copies.
% local P = gen.prefix
/* ---- Expert parallelism: the rows to send ------------------------------------------- */

/* out[i] = x[row_token[rows[i]]] (HIDDEN values) and scales[i] = its weight_on_input scale
 * (1 without weight_on_input); `rows` are rows of the permutation P_dispatch_place wrote.
 * One block per row; grid n >= 1. */
extern "C" __global__ void __launch_bounds__(MOEGEN_CUDA_EP_PACK_THREADS)
${P}_ep_pack(const moegen_cuda_args a, const int *rows, long long n, elem_t *out, float *scales) {
    const long long i = blockIdx.x;
    if (i >= n) return;
    const int row = rows[i];
    const int token = a.row_token[row];
    const elem_t *src = (const elem_t *)a.x + (long long)token * HIDDEN;
    elem_t *dst = out + i * HIDDEN;
    for (int h = threadIdx.x; h < HIDDEN; h += blockDim.x) dst[h] = src[h];
    if (threadIdx.x == 0 && scales) scales[i] = a.row_scale ? a.row_scale[row] : 1.0f;
}
