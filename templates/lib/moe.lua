-- moe.lua — shared helpers for every backend's templates: naming, C types, derived
-- sizes and index arithmetic. Templates choose and loop; arithmetic lives here.
-- Loaded with import("templates/lib/moe.lua") inside the template sandbox.

local M = {}

-- Storage type of one element of a layer-dtype tensor.
function M.elem_type(dtype)
  if dtype == "fp32" then return "float" end
  return "uint16_t" -- fp16 and bf16 are stored as their bit patterns
end

-- Short dtype tag used in function names.
function M.dtype_tag(dtype)
  return dtype
end

-- The FFN shapes a layer needs. Each shape is one grouped GEMM pair:
--   GEMM1: [rows][hidden] x [ffn_rows][hidden]^T -> activation -> [rows][ffn]
--   GEMM2: [rows][ffn] x [hidden][ffn]^T -> [rows][hidden]
-- Routed experts and the residual MLP share the expert shape; shared experts may
-- have their own ffn size. Returned sorted by name, deduplicated.
function M.ffn_shapes(spec)
  local shapes = {}
  local seen = {}
  local function add(name, ffn)
    if seen[ffn] then return end
    seen[ffn] = true
    shapes[#shapes + 1] = {
      name = name,
      ffn = ffn,
      ffn_rows = spec.gated and 2 * ffn or ffn,
    }
  end
  add("f" .. spec.ffn_size, spec.ffn_size)
  if spec.shared.count > 0 then
    add("f" .. spec.shared.ffn_size, spec.shared.ffn_size)
  end
  table.sort(shapes, function(a, b) return a.ffn < b.ffn end)
  return shapes
end

-- Name of the FFN shape for an ffn size.
function M.shape_name(ffn)
  return "f" .. ffn
end

-- The distinct dot-product kernels (A storage, B storage, K) a layer needs,
-- deduplicated and sorted so the output is deterministic.
-- Whether the variant's expert GEMMs pack each problem's token rows into a scratch buffer
-- (rows rounded up to 16: MOEGEN_KERNEL_EXPERT_SCRATCH_ELEMS): AMX tiles and outer products.
function M.packs_rows(variant)
  return variant.cpu.gemm == "amx" or variant.cpu.gemm == "outer"
end

function M.dot_kernels(spec)
  local elem = M.elem_type(spec.dtype)
  local list, seen = {}, {}
  local function add(a, b, k)
    local key = a .. "|" .. b .. "|" .. k
    if seen[key] then return end
    seen[key] = true
    list[#list + 1] = { a = a, b = b, k = k, name = M.dot_name(a, b, k) }
  end
  add("float", "float", spec.hidden_size) -- router: fp32 x fp32
  add(elem, elem, spec.hidden_size)       -- GEMM1
  add(elem, elem, spec.ffn_size)          -- GEMM2 (experts, residual)
  if spec.shared.count > 0 then
    add(elem, elem, spec.shared.ffn_size) -- GEMM2 (shared experts)
  end
  table.sort(list, function(x, y) return x.name < y.name end)
  return list
end

local type_tags = { float = "f32", uint16_t = "u16" }

function M.dot_name(a, b, k)
  return "dot_tile_" .. type_tags[a] .. "_" .. type_tags[b] .. "_k" .. k
end

-- Name of the vector-load function for a storage type.
function M.load_name(storage, dtype)
  if storage == "float" then return "load_f32" end
  return "load_" .. dtype
end

-- Ceiling division for integers.
function M.ceil_div(a, b)
  return (a + b - 1) // b
end

-- Experts per group for group-limited routing.
function M.experts_per_group(spec)
  return spec.num_experts // spec.router.n_group
end

-- True when the layer draws random numbers in this mode.
function M.uses_jitter(spec)
  return spec.mode == "train" and spec.router.input_jitter > 0
end

function M.uses_noise(spec)
  return spec.mode == "train" and spec.router.noise == "rsample"
end

-- True when the layer draws from the RNG at all in this mode.
function M.uses_rng(spec)
  return M.uses_jitter(spec) or M.uses_noise(spec)
    or (spec.capacity.mode ~= "dropless" and spec.capacity.priority == "random")
end

-- Which aux-loss formula applies: "ds_first_choice" (deepspeed k <= 2),
-- "balanced_topk" (megatron, deepspeed k > 2) or "none".
function M.aux_kind(spec)
  local kind = spec.router.aux_loss
  if kind == "none" then return "none" end
  if kind == "deepspeed" and spec.top_k <= 2 then return "ds_first_choice" end
  return "balanced_topk"
end

return M
