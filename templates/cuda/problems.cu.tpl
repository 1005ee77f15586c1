% -- problems.cu.tpl — the GEMM problem table's lookup, shared by the forward's grouped GEMMs
% -- (gemm.cu.tpl) and the backward's (backward.cu.tpl): both launch one CTA per m tile of a
% -- problem group, as P_dispatch_place numbered them.
/* The problem of m tile `tile` among problems[first, first + count). */
__device__ __forceinline__ int find_problem(const moegen_cuda_problem *problems, int first, int count, int tile) {
    int low = 0, high = count - 1;
    while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (problems[first + mid].tile_start <= tile) low = mid;
        else high = mid - 1;
    }
    return first + low;
}
