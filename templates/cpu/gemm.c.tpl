% -- gemm.c.tpl — dot-product micro-kernels: a ROWS x TILE_COLS tile of
% -- C[i][j] = sum_k A_i[k] * B_j[k], where A rows are activations and B rows are weight
% -- rows ([out][in] layout, so both are contiguous along k and nothing is packed). One
% -- kernel per (A storage, B storage, K) the layer needs and per row count ROWS in
% -- 1..TILE_ROWS: a tile with fewer rows left (an expert with one token) runs a kernel for
% -- exactly that many rows instead of repeating one. The accumulators are named variables
% -- (written out here, one per tile element) and the kernels are not inlined, so that the
% -- accumulators stay in registers. Every output
% -- element is summed in the same order whatever ROWS is, so the results do not depend on
% -- how rows fall into tiles, nor on the thread count.
% local moe = import("templates/lib/moe.lua")
% local cols = variant.cpu.tile_cols
/* ---- Dot-product micro-kernels ----------------------------------------------------- */

/* Weight elements prefetched ahead of the loads, into L1 (rows shorter than this: one row
 * ahead). A row's last DOT_PREFETCH elements prefetch the start of the same row of the next
 * tile, which the caller names (`next`; the tile itself where none follows). Alternated on
 * mixtral-8x7b bf16 at S = 1, 1 thread (memory-bound, 704 MB of weights per token): 60-73 ms
 * against 70-96 ms without; qwen3-30b-a3b S = 1 6.6-8.0 against 8.0-9.1 ms; demo unchanged.
 * 1024 ahead with prefetchnta: 1.3-1.5x slower. */
#define DOT_PREFETCH 512
% for _, kernel in ipairs(moe.dot_kernels(spec)) do
%   local pairs_of_bf16 = kernel.a == "uint16_t" and kernel.b == "uint16_t" and spec.dtype == "bf16" and kernel.k % (2 * variant.cpu.vector_floats) == 0
%   local operand, load_a, load_b, step, k_step
%   if pairs_of_bf16 then
%     operand, load_a, load_b, step, k_step = "bf16_operand", "load_bf16_operand", "load_bf16_operand", "dot_step_bf16", "2 * VEC_FLOATS"
%   else
%     operand, load_a, load_b, step, k_step = "vfloat", moe.load_name(kernel.a, spec.dtype), moe.load_name(kernel.b, spec.dtype), "dot_step", "VEC_FLOATS"
%   end
%   for rows = 1, variant.cpu.tile_rows do

/* ${kernel.name}_r${rows}: ${rows} x TILE_COLS, A ${kernel.a}, B ${kernel.b}, K = ${kernel.k}.
 * Not inlined: on its own it has the whole register file for its accumulators. */
static __attribute__((noinline)) void ${kernel.name}_r${rows}(const ${kernel.a} *const a[TILE_ROWS], const ${kernel.b} *const b[TILE_COLS],
        const ${kernel.b} *const next[TILE_COLS], float out[TILE_ROWS][TILE_COLS]) {
    const int64_t ahead = ${kernel.k} < DOT_PREFETCH ? ${kernel.k} : DOT_PREFETCH;
%     for i = 0, rows - 1 do
    const ${kernel.a} *const a${i} = a[${i}];
%     end
%     for j = 0, cols - 1 do
    const ${kernel.b} *const b${j} = b[${j}];
    const ${kernel.b} *ahead${j} = b${j} + ahead;
%     end
%     for i = 0, rows - 1 do
%       local names = {}
%       for j = 0, cols - 1 do names[#names + 1] = "c" .. i .. j .. " = {0}" end
    vfloat ${table.concat(names, ", ")};
%     end
    for (int64_t k = 0; k < ${kernel.k}; k += ${k_step}) {
        if (k == ${kernel.k} - ahead) { /* the rest of the rows is on its way: the next tile's */
%     for j = 0, cols - 1 do
            ahead${j} = next[${j}];
%     end
        }
%     for j = 0, cols - 1 do
        __builtin_prefetch(ahead${j}, 0, 3);
        ahead${j} += ${k_step};
%     end
%     for j = 0, cols - 1 do
        const ${operand} w${j} = ${load_b}(b${j} + k);
%     end
%     for i = 0, rows - 1 do
        {
            const ${operand} x = ${load_a}(a${i} + k);
%       for j = 0, cols - 1 do
            c${i}${j} = ${step}(c${i}${j}, x, w${j});
%       end
        }
%     end
    }
%     for i = 0, rows - 1 do
%       for j = 0, cols - 1 do
    out[${i}][${j}] = vector_sum(c${i}${j});
%       end
%     end
}
%   end

/* ${kernel.name}: 1 <= rows <= TILE_ROWS rows of A. */
static void ${kernel.name}(int rows, const ${kernel.a} *const a[TILE_ROWS], const ${kernel.b} *const b[TILE_COLS],
                           const ${kernel.b} *const next[TILE_COLS], float out[TILE_ROWS][TILE_COLS]) {
    switch (rows) {
%   for rows = 1, variant.cpu.tile_rows - 1 do
    case ${rows}: ${kernel.name}_r${rows}(a, b, next, out); break;
%   end
    default: ${kernel.name}_r${variant.cpu.tile_rows}(a, b, next, out); break;
    }
}
% end

