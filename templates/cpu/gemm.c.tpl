% -- gemm.c.tpl — dot-product micro-kernels: a TILE_ROWS x TILE_COLS tile of
% -- C[i][j] = sum_k A_i[k] * B_j[k], where A rows are activations and B rows are weight
% -- rows ([out][in] layout, so both are contiguous along k). One kernel per (A storage,
% -- B storage, K) the layer needs; K is a constant, so the k loop has a fixed trip count.
% local moe = import("templates/lib/moe.lua")
/* ---- Dot-product micro-kernels ----------------------------------------------------- */
% for _, kernel in ipairs(moe.dot_kernels(spec)) do

/* ${kernel.name}: A ${kernel.a}, B ${kernel.b}, K = ${kernel.k}. Accumulates in fp32 vectors,
 * lane sums in a fixed order. */
static inline void ${kernel.name}(const ${kernel.a} *const a[TILE_ROWS],
                                   const ${kernel.b} *const b[TILE_COLS],
                                   float out[TILE_ROWS][TILE_COLS]) {
    vfloat acc[TILE_ROWS][TILE_COLS];
    memset(acc, 0, sizeof acc);
%   if kernel.a == "uint16_t" and kernel.b == "uint16_t" and spec.dtype == "bf16" and kernel.k % (2 * variant.cpu.vector_floats) == 0 then
    /* bf16 x bf16: read 2 * VEC_FLOATS values as 32-bit pairs; the even elements widen with
     * a shift, the odd ones with a mask, and a dot product may pair them in any order. */
    for (int64_t k = 0; k < ${kernel.k}; k += 2 * VEC_FLOATS) {
        vfloat a_even[TILE_ROWS], a_odd[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; i++) {
            vu32 raw;
            memcpy(&raw, a[i] + k, sizeof raw);
            a_even[i] = (vfloat)(raw << 16);
            a_odd[i] = (vfloat)(raw & 0xffff0000u);
        }
        for (int j = 0; j < TILE_COLS; j++) {
            vu32 raw;
            memcpy(&raw, b[j] + k, sizeof raw);
            const vfloat b_even = (vfloat)(raw << 16), b_odd = (vfloat)(raw & 0xffff0000u);
            for (int i = 0; i < TILE_ROWS; i++) acc[i][j] += a_even[i] * b_even + a_odd[i] * b_odd;
        }
    }
%   else
    for (int64_t k = 0; k < ${kernel.k}; k += VEC_FLOATS) {
        vfloat av[TILE_ROWS], bv[TILE_COLS];
        for (int i = 0; i < TILE_ROWS; i++) av[i] = ${moe.load_name(kernel.a, spec.dtype)}(a[i] + k);
        for (int j = 0; j < TILE_COLS; j++) bv[j] = ${moe.load_name(kernel.b, spec.dtype)}(b[j] + k);
        for (int i = 0; i < TILE_ROWS; i++)
            for (int j = 0; j < TILE_COLS; j++) acc[i][j] += av[i] * bv[j];
    }
%   end
    for (int i = 0; i < TILE_ROWS; i++)
        for (int j = 0; j < TILE_COLS; j++) out[i][j] = vector_sum(acc[i][j]);
}
% end

