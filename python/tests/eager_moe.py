"""An eager PyTorch reference of one moegen MoE layer, written from docs/numerics.md.

Everything here is plain torch arithmetic in float64, so autograd differentiates it; the
selection steps (top-k, groups, capacity, the loss counts, Gumbel noise) are computed on
detached values and act as constants of the backward, as numerics.md §8.1 says.

Entry points:

- ``resolve_spec(d)``: the spec dict (``yaml.safe_load`` of a spec) with every default of
  specs/README.md filled in (presets included) for the features supported here.
- ``eager_moe(spec, params, x, used_token=None, ...)``: the layer's forward on float64
  copies of ``x`` and the weights; returns an ``EagerResult``.
- ``capacity_for(spec, S, mode)``: the capacity C of numerics.md §2.1 (-1 when dropless).
- ``eager_params_from_module(moe)``: the weights of a ``moegen.torch.MoE`` (or an
  ``EagerMoE``) by parameter / buffer name, keyed by this file's weight names.
- ``EagerMoE``: an ``nn.Module`` with the parameter names of ``moegen.torch.MoE`` that runs
  ``eager_moe`` (float64 inside) and returns ``(out, l_aux, exp_counts)`` like it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as Fn

FLT_MAX = 3.4028234663852886e38
GATED = ("swiglu", "geglu")

# -----------------------------------------------------------------------------------------
# Spec defaults (specs/README.md)
# -----------------------------------------------------------------------------------------


def resolve_spec(d) -> dict:
    """Return a copy of spec dict ``d`` with every default of specs/README.md filled in.

    ``d`` may also be a path or YAML text. Fields that do not apply (e.g. ``capacity_factor``
    in dropless mode) are left out; no validation beyond what the computation needs.
    """
    if isinstance(d, str):
        import yaml

        if "\n" not in d and d.endswith((".yaml", ".yml")):
            with open(d) as f:
                d = yaml.safe_load(f)
        else:
            d = yaml.safe_load(d)
    s = copy.deepcopy(dict(d))
    preset = s.setdefault("semantics", "megatron")
    if preset not in ("megatron", "deepspeed"):
        raise ValueError(f"semantics: {preset!r}")
    E = int(s["num_experts"])
    k = int(s["num_experts_per_tok"])
    s.setdefault("activation", "swiglu")
    s.setdefault("dtype", "bf16")
    s.setdefault("ep_size", 1)
    s.setdefault("mode", "eval")
    s.setdefault("expert_bias", False)
    s.setdefault("weight_on_input", False)
    s.setdefault("use_residual", False)

    r = dict(s.get("router") or {})
    r.setdefault("score_function", "softmax")
    if r["score_function"] == "softmax":
        r.setdefault("order", "softmax_then_topk" if preset == "deepspeed" else "topk_then_softmax")
    else:
        r.pop("order", None)
    r.setdefault("norm_topk_prob", False)
    r.setdefault("routed_scaling_factor", 1.0)
    r.setdefault("n_group", 1)
    G = int(r["n_group"])
    if G > 1:
        r.setdefault("topk_group", G)
        r.setdefault("group_topm", max(1, k // int(r["topk_group"])))
        r.setdefault("group_score", "topm_sum")
        r.setdefault("group_mask", "neg_inf")
    r.setdefault("score_bias", False)
    r.setdefault("router_bias", False)
    r.setdefault("input_jitter", 0.0)
    r.setdefault("noise", "none")
    r.setdefault("seed", 0)
    r.setdefault("aux_loss", preset)
    s["router"] = r

    c = dict(s.get("capacity") or {})
    if "mode" not in c:
        if "expert_capacity" in c:
            c["mode"] = "fixed"
        elif "capacity_factor" in c or "eval_capacity_factor" in c:
            c["mode"] = "factor"
        else:
            c["mode"] = "factor" if preset == "deepspeed" else "dropless"
    if c["mode"] == "factor":
        c.setdefault("capacity_factor", 1.0)
        c.setdefault("eval_capacity_factor", c["capacity_factor"])
        c.setdefault("formula", preset)
        if c["formula"] == "deepspeed":
            c.setdefault("min_capacity", 4 if preset == "deepspeed" else 0)
    if c["mode"] == "fixed" and "expert_capacity" not in c:
        raise ValueError("capacity.expert_capacity is required in fixed mode")
    if c["mode"] in ("factor", "fixed"):
        if preset == "deepspeed":
            c.setdefault("priority", "position" if k == 1 else ("position_choice_major" if k == 2 else "probs"))
        else:
            c.setdefault("priority", "probs")
        c.setdefault("pad_to_capacity", False)
    c.setdefault("renormalize", (k >= 2) if preset == "deepspeed" else False)
    s["capacity"] = c

    sh = dict(s.get("shared_experts") or {})
    sh.setdefault("count", 0)
    if int(sh["count"]) > 0:
        if "intermediate_size" not in sh:
            raise ValueError("shared_experts.intermediate_size is required when count > 0")
        sh.setdefault("gate", False)
    s["shared_experts"] = sh

    if s["weight_on_input"] and k != 1:
        raise ValueError("weight_on_input requires k = 1")
    if G > 1 and E % G:
        raise ValueError("n_group must divide num_experts")
    return s


def dims(spec) -> dict:
    """Shapes of the weights of a resolved spec."""
    E = int(spec["num_experts"])
    H = int(spec["hidden_size"])
    F = int(spec["moe_intermediate_size"])
    gated = spec["activation"] in GATED
    sh = spec["shared_experts"]
    Ns = int(sh["count"])
    Fs = int(sh.get("intermediate_size", 0) or 0)
    return dict(E=E, k=int(spec["num_experts_per_tok"]), H=H, F=F, F1=2 * F if gated else F,
                Ns=Ns, Fs=Fs, F1s=2 * Fs if gated else Fs, gated=gated)


# weight name here -> (parameter/buffer name in moegen.torch.MoE, shape fn, router-side fp32?)
PARAM_NAMES = {
    "router_w": "gate.weight",
    "router_b": "gate.bias",
    "score_bias": "score_bias",
    "w1": "experts.gate_up_proj",
    "b1": "experts.gate_up_proj_bias",
    "w2": "experts.down_proj",
    "b2": "experts.down_proj_bias",
    "shared_w1": "shared_experts.gate_up_proj",
    "shared_b1": "shared_experts.gate_up_proj_bias",
    "shared_w2": "shared_experts.down_proj",
    "shared_b2": "shared_experts.down_proj_bias",
    "shared_gate": "shared_expert_gate.weight",
    "residual_w1": "residual_mlp.gate_up_proj",
    "residual_b1": "residual_mlp.gate_up_proj_bias",
    "residual_w2": "residual_mlp.down_proj",
    "residual_b2": "residual_mlp.down_proj_bias",
    "residual_coef_w": "coefficient.weight",
    "residual_coef_b": "coefficient.bias",
}
FP32_WEIGHTS = ("router_w", "router_b", "score_bias", "shared_gate")


def weight_shapes(spec) -> Dict[str, tuple]:
    """The weights a resolved spec has, with their shapes as the torch module exposes them."""
    d = dims(spec)
    E, H, F, F1 = d["E"], d["H"], d["F"], d["F1"]
    r = spec["router"]
    out = {"router_w": (E, H), "w1": (E, F1, H), "w2": (E, H, F)}
    if r["router_bias"]:
        out["router_b"] = (E,)
    if r["score_bias"]:
        out["score_bias"] = (E,)
    if spec["expert_bias"]:
        out["b1"] = (E, F1)
        out["b2"] = (E, H)
    if d["Ns"] > 0:
        out["shared_w1"] = (d["Ns"], d["F1s"], H)
        out["shared_w2"] = (d["Ns"], H, d["Fs"])
        if spec["expert_bias"]:
            out["shared_b1"] = (d["Ns"], d["F1s"])
            out["shared_b2"] = (d["Ns"], H)
        if spec["shared_experts"]["gate"]:
            out["shared_gate"] = (1, H)
    if spec["use_residual"]:
        out["residual_w1"] = (F1, H)
        out["residual_w2"] = (H, F)
        if spec["expert_bias"]:
            out["residual_b1"] = (F1,)
            out["residual_b2"] = (H,)
        out["residual_coef_w"] = (2, H)
        out["residual_coef_b"] = (2,)
    return out


def torch_dtype(spec):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]


def _lookup(named: dict, name: str):
    if name in named:
        return named[name]
    hits = [v for n, v in named.items() if n.endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    return None


def eager_params_from_module(moe) -> Dict[str, torch.Tensor]:
    """The weights of ``moe`` (a ``moegen.torch.MoE`` or an ``EagerMoE``) by name.

    Returns {weight name of this file: the module's tensor itself} for every name of
    ``PARAM_NAMES`` the module has (parameters first, then buffers). The tensors are not
    copied: detach/clone/convert them as the caller needs.
    """
    named = dict(moe.named_parameters())
    named.update({n: b for n, b in moe.named_buffers() if n not in named})
    out = {}
    for key, name in PARAM_NAMES.items():
        t = _lookup(named, name)
        if t is not None:
            out[key] = t
    return out


# -----------------------------------------------------------------------------------------
# Randomness (numerics.md §5)
# -----------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def rng_u(seed: int, offset: int, stream: int, index: int) -> float:
    """u(seed, offset, stream, index) of numerics.md §5: an odd multiple of 2^-24 in (0, 1)."""
    r = _mix((seed & _M64) ^ _mix((offset & _M64) ^ _mix((stream & _M64) ^ _mix(index & _M64))))
    return float(((r >> 41) * 2 + 1) * 2.0 ** -24)


def rng_u_array(seed, offset, stream, n) -> torch.Tensor:
    return torch.tensor([rng_u(seed, offset, stream, i) for i in range(n)], dtype=torch.float64)


# -----------------------------------------------------------------------------------------
# Pieces
# -----------------------------------------------------------------------------------------


def capacity_for(spec, S: int, mode: Optional[str] = None) -> int:
    """Capacity C per expert for S tokens (numerics.md §2.1); -1 for dropless."""
    c = spec["capacity"]
    mode = mode or spec["mode"]
    E = int(spec["num_experts"])
    k = int(spec["num_experts_per_tok"])
    if c["mode"] == "dropless":
        return -1
    if c["mode"] == "fixed":
        return int(c["expert_capacity"])
    cf = float(c["capacity_factor"] if mode == "train" else c["eval_capacity_factor"])
    if c["formula"] == "deepspeed":
        q = np.float32(S / E)  # double quotient rounded to fp32
        kc = np.float32(k * cf)  # product of two doubles, rounded once to fp32
        prod = np.float32(q * kc)  # fp32 product
        C = int(math.ceil(float(prod)))
        return max(C, int(c["min_capacity"]))
    return int(math.ceil(S * k / E * cf))


def _activation(name: str, a: torch.Tensor, F: int) -> torch.Tensor:
    if name == "swiglu":
        return Fn.silu(a[..., :F]) * a[..., F:]
    if name == "geglu":
        return Fn.gelu(a[..., :F]) * a[..., F:]
    if name == "silu":
        return Fn.silu(a)
    if name == "gelu":
        return Fn.gelu(a)
    if name == "gelu_tanh":
        return Fn.gelu(a, approximate="tanh")
    if name == "relu":
        return torch.relu(a)
    raise ValueError(f"activation {name!r}")


def _ffn(act: str, u, w1, b1, w2, b2, F: int):
    a = u @ w1.transpose(-1, -2)
    if b1 is not None:
        a = a + b1
    h = _activation(act, a, F)
    o = h @ w2.transpose(-1, -2)
    if b2 is not None:
        o = o + b2
    return o


def _masked_softmax(z, valid):
    """Softmax over the valid entries of each row (max subtraction); invalid -> 0, a row with
    no valid entry -> all 0. Gradient only through valid entries."""
    zs = torch.where(valid, z, torch.zeros((), dtype=z.dtype))
    m = torch.where(valid, zs, torch.full((), -math.inf, dtype=z.dtype)).amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=z.dtype)).detach()
    ex = torch.where(valid, torch.exp(zs - m), torch.zeros((), dtype=z.dtype))
    den = ex.sum(dim=-1, keepdim=True)
    den = torch.where(den > 0, den, torch.ones((), dtype=z.dtype))
    return ex / den


def _stable_topk(sel: torch.Tensor, k: int):
    """Indices of the k largest values of each row, descending, ties to the lower index."""
    order = torch.sort(sel, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def _softplus_stable(z):
    zp = torch.clamp(z, min=0.0)
    zn = torch.clamp(z, max=0.0)
    return torch.where(z > 0, zp + torch.log1p(torch.exp(-zp)), torch.log1p(torch.exp(zn)))


@dataclass
class EagerResult:
    y: torch.Tensor  # [S, H] float64 (differentiable)
    aux_loss: torch.Tensor  # scalar float64
    z_loss: torch.Tensor  # scalar float64
    counts_before: torch.Tensor  # [E] int64
    counts_after: torch.Tensor  # [E] int64
    topk_ids: torch.Tensor  # [S, k] int64
    valid_routes: torch.Tensor  # [S, k] bool (route validity, §1.8)
    kept: torch.Tensor  # [S, k] bool (valid, used and within capacity)
    router_weights: torch.Tensor  # [S, k] float64 (§1.9, differentiable)
    combine_weights: torch.Tensor  # [S, k] float64 (after capacity / renormalize, differentiable)
    capacity: int
    n_dropped: int
    logits: torch.Tensor  # [S, E] sanitized logits (differentiable)
    scores: torch.Tensor  # [S, E]
    sel: torch.Tensor  # [S, E] selection scores (detached, after the group step)
    decision_gap: torch.Tensor  # [S] smallest positive decision gap of each token (inf: none)
    extras: dict = field(default_factory=dict)


def _f64(t):
    return None if t is None else t.to(torch.float64)


def eager_moe(spec, params: Dict[str, torch.Tensor], x: torch.Tensor, used_token=None,
              mode: Optional[str] = None, rng_offset: int = 0, force_topk_ids=None,
              force_kept=None) -> EagerResult:
    """The forward of one MoE layer (numerics.md §1-§4, §9), in float64, differentiable.

    spec: a resolved spec (``resolve_spec``); params: weight name -> tensor (any float dtype,
    upcast to float64 here; pass leaves with requires_grad to get gradients); x: [S, H];
    used_token: [S] (nonzero = used) or None; mode: 'train'/'eval' (default the spec's);
    rng_offset: the offset of jitter, noise and the random priority.
    force_topk_ids: [S, k] to replace the selection (reference on the kernel's own routing);
    force_kept: [S, k] bool to replace the capacity decisions.
    """
    mode = mode or spec["mode"]
    train = mode == "train"
    r = spec["router"]
    cap = spec["capacity"]
    d = dims(spec)
    E, k, H, F = d["E"], d["k"], d["H"], d["F"]
    act = spec["activation"]
    sf = r["score_function"]
    rsf = float(r["routed_scaling_factor"])
    seed = int(r["seed"])
    f64 = torch.float64
    P = {n: _f64(t) for n, t in params.items() if t is not None}

    x = x.to(f64)
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"x must be [S, {H}], got {tuple(x.shape)}")
    S = x.shape[0]
    if used_token is None:
        used = torch.ones(S, dtype=torch.bool)
    else:
        used = torch.as_tensor(used_token).reshape(-1).to(torch.bool)
        if used.numel() != S:
            raise ValueError("used_token must have one entry per token")
    zero = torch.zeros((), dtype=f64)
    ninf = torch.full((), -math.inf, dtype=f64)

    # ---- §1 router ---------------------------------------------------------------------
    eps = float(r["input_jitter"])
    if train and eps > 0:
        u = rng_u_array(seed, rng_offset, 1, S * H).reshape(S, H)
        jit = (1.0 - eps) + u * (2.0 * eps)
        xr = x * jit
    else:
        jit = None
        xr = x
    z_raw = xr @ P["router_w"].reshape(E, H).t()
    if r["router_bias"]:
        z_raw = z_raw + P["router_b"].reshape(E)
    zd = z_raw.detach()
    nan = torch.isnan(zd)
    pinf = zd == math.inf
    z = torch.where(nan, ninf, z_raw)
    z = torch.where(pinf, torch.full((), FLT_MAX, dtype=f64), z)
    z = torch.where(nan | pinf, z.detach(), z)  # non-finite logits pass no gradient
    valid = z.detach() != -math.inf
    z_safe = torch.where(valid, z, zero)

    if sf == "softmax":
        s = _masked_softmax(z, valid)
    elif sf == "sigmoid":
        s = torch.where(valid, torch.sigmoid(z_safe), zero)
    elif sf == "sqrtsoftplus":
        s = torch.where(valid, torch.sqrt(_softplus_stable(z_safe)), zero)
    else:
        raise ValueError(f"score_function {sf!r}")

    sd = s.detach()
    if sf == "softmax":
        sel = sd.clone() if r["order"] == "softmax_then_topk" else z.detach().clone()
    else:
        sel = sd.clone()
        if r["score_bias"]:
            sel = sel + P["score_bias"].detach().reshape(E)
    sel = torch.where(valid, sel, ninf)

    gap = torch.full((S,), math.inf, dtype=f64)

    def note_gaps(vals_sorted, upto, boundary_only=False):
        # positive gaps between consecutive sorted values at positions [0, upto] (the order
        # of the first upto and which ones they are), or only between positions upto - 1
        # and upto (which ones they are: a set)
        nonlocal gap
        n = vals_sorted.shape[-1]
        if n < 2 or vals_sorted.shape[0] == 0 or (boundary_only and upto >= n):
            return
        upto = min(upto, n - 1)
        lo = upto - 1 if boundary_only else 0
        a = vals_sorted[..., lo:upto]
        b = vals_sorted[..., lo + 1:upto + 1]
        g = a - b
        ok = torch.isfinite(a) & torch.isfinite(b) & (g > 0)
        g = torch.where(ok, g, torch.full_like(g, math.inf))
        gap = torch.minimum(gap, g.reshape(g.shape[0], -1).amin(dim=-1))

    # group-limited routing (§1.7)
    G = int(r["n_group"])
    if G > 1:
        Eg = E // G
        sg = sel.reshape(S, G, Eg)
        srt = torch.sort(sg, dim=-1, descending=True, stable=True).values
        anyv = torch.isfinite(srt[..., 0])
        if r["group_score"] == "topm_sum":
            m = int(r["group_topm"])
            top = srt[..., :m]
            gs = torch.where(torch.isfinite(top), top, zero).sum(-1)
        else:
            gs = srt[..., 0]
        # (a group score is continuous in sel: only the ranking of the groups decides)
        gs = torch.where(anyv, gs, ninf)
        tg = int(r["topk_group"])
        gsrt = torch.sort(gs, dim=-1, descending=True, stable=True)
        note_gaps(gsrt.values, tg, boundary_only=True)
        keep_g = torch.zeros(S, G, dtype=torch.bool)
        keep_g.scatter_(1, gsrt.indices[:, :tg], True)
        keep_e = keep_g.repeat_interleave(Eg, dim=1)
        if r["group_mask"] == "neg_inf":
            sel = torch.where(keep_e, sel, ninf)
        else:
            sel = torch.where(keep_e | ~valid, sel, torch.where(valid, zero, ninf))
    cand = sel != -math.inf

    # top-k (§1.8), with noise (§1.6)
    noise = train and r["noise"] == "rsample" and sf == "softmax"
    if noise:
        gum = -torch.log(-torch.log(rng_u_array(seed, rng_offset, 2, S * E).reshape(S, E)))
        noisy = torch.where(cand, z.detach() + gum, ninf)
        if k == 1:
            ids = _stable_topk(noisy, 1)
            note_gaps(torch.sort(noisy, -1, descending=True).values, 1)
        else:  # k == 2
            first = _stable_topk(sel, 1)
            note_gaps(torch.sort(sel, -1, descending=True).values, 1)
            noisy2 = noisy.scatter(1, first, -math.inf)
            second = _stable_topk(noisy2, 1)
            note_gaps(torch.sort(noisy2, -1, descending=True).values, 1)
            ids = torch.cat([first, second], dim=1)
            # if fewer than k candidates, the stable order already fills with lowest ids
    else:
        ids = _stable_topk(sel, k)
        note_gaps(torch.sort(sel, -1, descending=True).values, k)
    if force_topk_ids is not None:
        ids = torch.as_tensor(force_topk_ids).to(torch.int64).reshape(S, k).clone()
    route_valid = torch.gather(cand, 1, ids)
    # slots without a candidate: lowest expert ids not yet chosen (§1.8)
    if not bool(route_valid.all()):
        for t in torch.nonzero(~route_valid.all(dim=1)).flatten().tolist():
            chosen = [int(e) for e, v in zip(ids[t].tolist(), route_valid[t].tolist()) if v]
            free = [e for e in range(E) if e not in chosen]
            for j in range(k):
                if not route_valid[t, j]:
                    ids[t, j] = free.pop(0)

    # router weights (§1.9)
    if sf == "softmax" and r["order"] == "topk_then_softmax":
        zc = torch.gather(z_safe, 1, ids)
        w = _masked_softmax(zc, route_valid)
    else:
        w = torch.where(route_valid, torch.gather(s, 1, ids), zero)
    if r["norm_topk_prob"]:
        w = w / torch.clamp_min(w.sum(dim=1, keepdim=True), 1e-20)
    w = w * rsf
    router_weights = w

    # ---- §2 capacity (§9: masked tokens are treated as dropped) -------------------------
    C = capacity_for(spec, S, mode)
    active = route_valid & used[:, None]
    counts_before = torch.zeros(E, dtype=torch.int64)
    counts_before.index_add_(0, ids[active], torch.ones(int(active.sum()), dtype=torch.int64))
    kept = active.clone()
    wd = w.detach()
    if C >= 0 and force_kept is None:
        prio = cap.get("priority", "probs")
        rand = None
        if prio == "random":
            rand = rng_u_array(seed, rng_offset, 3, S * k).reshape(S, k)
        for e in range(E):
            ts, js = torch.nonzero(active & (ids == e), as_tuple=True)
            routes = list(zip(ts.tolist(), js.tolist()))
            if len(routes) <= C:
                continue
            if prio == "probs":
                routes.sort(key=lambda tj: (-float(wd[tj[0], tj[1]]), tj[0]))
                keyf = lambda tj: float(wd[tj[0], tj[1]])
            elif prio == "position":
                routes.sort(key=lambda tj: tj[0])
                keyf = None
            elif prio == "position_choice_major":
                routes.sort(key=lambda tj: (tj[1], tj[0]))
                keyf = None
            elif prio == "random":
                routes.sort(key=lambda tj: (-float(rand[tj[0], tj[1]]), tj[0]))
                keyf = None
            else:
                raise ValueError(f"priority {prio!r}")
            for t, j in routes[C:]:
                kept[t, j] = False
            if keyf is not None and C > 0:
                # relative gap between the last kept and the first dropped
                a, b = keyf(routes[C - 1]), keyf(routes[C])
                g = (a - b) / max(abs(a), 1e-30)
                if g > 0:
                    for t, _ in (routes[C - 1], routes[C]):
                        gap[t] = min(float(gap[t]), g)
    if force_kept is not None:
        kept = torch.as_tensor(force_kept).to(torch.bool).reshape(S, k) & active
    counts_after = torch.zeros(E, dtype=torch.int64)
    counts_after.index_add_(0, ids[kept], torch.ones(int(kept.sum()), dtype=torch.int64))
    n_dropped = int((counts_before - counts_after).sum())

    wk = torch.where(kept, w, zero)
    if cap["renormalize"]:
        wc = wk / torch.clamp_min(wk.sum(dim=1, keepdim=True), 1e-20) * rsf
    else:
        wc = wk

    # ---- §3 experts and combine --------------------------------------------------------
    w1, w2 = P["w1"], P["w2"]
    b1, b2 = P.get("b1"), P.get("b2")
    y_moe = torch.zeros(S, H, dtype=f64)
    for e in range(E):
        ts, js = torch.nonzero(kept & (ids == e), as_tuple=True)
        if ts.numel() == 0:
            continue
        we = wc[ts, js][:, None]
        u = x[ts]
        if spec["weight_on_input"]:
            o = _ffn(act, we * u, w1[e], None if b1 is None else b1[e], w2[e],
                     None if b2 is None else b2[e], F)
        else:
            o = we * _ffn(act, u, w1[e], None if b1 is None else b1[e], w2[e],
                          None if b2 is None else b2[e], F)
        y_moe = y_moe.index_add(0, ts, o)

    y = y_moe
    extras = {}
    if spec["use_residual"]:
        q = x @ P["residual_coef_w"].reshape(2, H).t() + P["residual_coef_b"].reshape(2)
        coef = torch.softmax(q, dim=-1)
        mlp = _ffn(act, x, P["residual_w1"], P.get("residual_b1"), P["residual_w2"],
                   P.get("residual_b2"), F)
        y = y_moe * coef[:, :1] + mlp * coef[:, 1:]
        extras["residual_coef"] = coef
    sh = spec["shared_experts"]
    Ns = int(sh["count"])
    if Ns > 0:
        Fs = int(sh["intermediate_size"])
        tot = torch.zeros(S, H, dtype=f64)
        for i in range(Ns):
            sb1 = P["shared_b1"][i] if "shared_b1" in P else None
            sb2 = P["shared_b2"][i] if "shared_b2" in P else None
            tot = tot + _ffn(act, x, P["shared_w1"][i], sb1, P["shared_w2"][i], sb2, Fs)
        if sh["gate"]:
            g = torch.sigmoid(x @ P["shared_gate"].reshape(H))[:, None]
            tot = tot * g
            extras["shared_gate"] = g
        y = y + tot

    # ---- §4 auxiliary losses -----------------------------------------------------------
    kind = r["aux_loss"]
    if S == 0 or kind == "none":
        aux = zero.clone()
    else:
        if kind == "deepspeed" and k <= 2:
            p = s if sf == "softmax" else _masked_softmax(z, valid)
            c1 = torch.zeros(E, dtype=f64)
            first_ok = route_valid[:, 0] & used
            c1.index_add_(0, ids[first_ok, 0], torch.ones(int(first_ok.sum()), dtype=f64))
            aux = E * (p.mean(dim=0) * c1).sum() / S
            extras["aux_counts"] = c1
        else:
            if sf == "softmax":
                p = s
            else:
                p = s / torch.clamp_min(s.sum(dim=1, keepdim=True), 1e-20)
            pd = torch.where(valid, p.detach(), ninf)
            srt = torch.sort(pd, dim=-1, descending=True, stable=True)
            note_gaps(srt.values, k, boundary_only=True)
            top = srt.indices[:, :k]
            ok = torch.gather(valid, 1, top) & used[:, None]
            c = torch.zeros(E, dtype=f64)
            c.index_add_(0, top[ok], torch.ones(int(ok.sum()), dtype=f64))
            aux = E * (p.mean(dim=0) * c).sum() / (k * S)
            extras["aux_counts"] = c
    if S == 0:
        zl = zero.clone()
    else:
        has = valid.any(dim=1)
        zz = torch.where(valid, z_safe, ninf)
        zz = torch.where(has[:, None], zz, zero)
        lse = torch.where(has, torch.logsumexp(zz, dim=1), zero)
        zl = (lse * lse).mean()

    if jit is not None:
        extras["jitter"] = jit
    return EagerResult(y=y, aux_loss=aux, z_loss=zl, counts_before=counts_before,
                       counts_after=counts_after, topk_ids=ids, valid_routes=route_valid,
                       kept=kept, router_weights=router_weights, combine_weights=wc,
                       capacity=C, n_dropped=n_dropped, logits=z, scores=s, sel=sel,
                       decision_gap=gap, extras=extras)


# -----------------------------------------------------------------------------------------
# nn.Module wrapper with moegen.torch.MoE's parameter names
# -----------------------------------------------------------------------------------------


class _Holder(nn.Module):
    pass


class EagerMoE(nn.Module):
    """An nn.Module with the parameter names of ``moegen.torch.MoE`` that runs ``eager_moe``.

    Parameters are stored in the layer dtype (fp32 for the router and the shared gate);
    the forward computes in float64 and returns ``(out [..., H] in x's dtype, l_aux fp32,
    exp_counts int64)``; ``z_loss`` (fp32), ``last_counts_after``, ``last_topk_ids`` and
    ``last_result`` hold the last call's extra outputs.
    """

    def __init__(self, spec, dtype=None):
        super().__init__()
        self.spec = resolve_spec(spec)
        self.mode = self.spec["mode"]
        dt = dtype or torch_dtype(self.spec)
        self.rng_offset = 0
        for key, shape in weight_shapes(self.spec).items():
            name = PARAM_NAMES[key]
            pdt = torch.float32 if key in FP32_WEIGHTS else dt
            t = torch.zeros(shape, dtype=pdt)
            owner = self
            parts = name.split(".")
            for p in parts[:-1]:
                if not hasattr(owner, p):
                    owner.add_module(p, _Holder())
                owner = getattr(owner, p)
            if key == "score_bias":
                owner.register_buffer(parts[-1], t)
            else:
                owner.register_parameter(parts[-1], nn.Parameter(t))
        self.z_loss = None
        self.last_counts_after = None
        self.last_topk_ids = None
        self.last_result = None

    def set_mode(self, mode):
        assert mode in ("train", "eval")
        self.mode = mode

    @torch.no_grad()
    def copy_from(self, other):
        """Copy every weight of ``other`` (moegen.torch.MoE or EagerMoE) by name."""
        src = eager_params_from_module(other)
        for key, t in eager_params_from_module(self).items():
            t.copy_(src[key].reshape(t.shape).to(t.dtype))
        return self

    def forward(self, hidden_states, used_token=None):
        H = int(self.spec["hidden_size"])
        lead = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, H)
        ut = None if used_token is None else used_token.reshape(-1)
        res = eager_moe(self.spec, eager_params_from_module(self), x, ut, mode=self.mode,
                        rng_offset=self.rng_offset)
        self.last_result = res
        self.z_loss = res.z_loss.to(torch.float32)
        self.last_counts_after = res.counts_after
        self.last_topk_ids = res.topk_ids.to(torch.int32)
        out = res.y.to(hidden_states.dtype).reshape(*lead, H)
        return out, res.aux_loss.to(torch.float32), res.counts_before
