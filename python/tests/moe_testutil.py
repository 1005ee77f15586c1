"""Helpers shared by the tests: tolerances of docs/numerics.md §6 and random weights."""

from __future__ import annotations

import torch

from eager_moe import FP32_WEIGHTS, PARAM_NAMES, eager_params_from_module

# dtype -> (rtol, atol relative to the reference's max abs, smallest atol)
TOL = {
    "fp32": (1e-4, 1e-5, 2.0 ** -149),
    "fp16": (1e-2, 2e-3, 2.0 ** -24),
    "bf16": (4e-2, 1e-2, 2.0 ** -126),
}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def close_report(actual, ref, dtype_name="fp32", rtol=None, atol_rel=None):
    """(ok, message) for |a - r| <= atol + rtol |r| with numerics.md §6's tolerances
    (atol relative to max |ref|). Non-finite reference entries must match exactly."""
    a = torch.as_tensor(actual).detach().to(torch.float64).reshape(-1)
    r = torch.as_tensor(ref).detach().to(torch.float64).reshape(-1)
    if a.shape != r.shape:
        return False, f"shape {tuple(a.shape)} != {tuple(r.shape)}"
    rt, at, floor = TOL[dtype_name]
    rt = rt if rtol is None else rtol
    at = at if atol_rel is None else atol_rel
    fin = torch.isfinite(r)
    if not bool(torch.equal(torch.isfinite(a), fin)) or not bool(
            (a[~fin].nan_to_num(0, 1, -1) == r[~fin].nan_to_num(0, 1, -1)).all()):
        return False, "non-finite entries differ"
    if a.numel() == 0 or not bool(fin.any()):
        return True, "ok"
    scale = float(r[fin].abs().max())
    atol = max(at * scale, floor)
    err = (a[fin] - r[fin]).abs()
    bound = atol + rt * r[fin].abs()
    worst = int(torch.argmax(err / bound))
    ratio = float(err[worst] / bound[worst])
    msg = (f"max err/tolerance {ratio:.3g} at {worst}: got {float(a[fin][worst]):.8g}, "
           f"ref {float(r[fin][worst]):.8g} (max|ref| {scale:.4g}, rtol {rt}, atol {atol:.3g})")
    return ratio <= 1.0, msg


def assert_close_ref(actual, ref, dtype_name="fp32", what="", **kw):
    ok, msg = close_report(actual, ref, dtype_name, **kw)
    assert ok, f"{what}: {msg}"


def weight_scale(key: str, shape) -> float:
    """A std for random weights: nn.Linear-like 1/sqrt(fan_in), larger for the router so
    that routing decisions have margins; small biases."""
    if key == "router_w":
        return 2.0 / shape[-1] ** 0.5
    if key in ("router_b", "score_bias"):
        return 0.1
    if key.endswith(("b1", "b2", "coef_b")):
        return 0.05
    return 1.0 / shape[-1] ** 0.5


@torch.no_grad()
def randomize_module(moe, seed: int):
    """Fill every weight of ``moe`` (parameters and the score_bias buffer) with seeded random
    values in its own dtype. Returns the dict of eager_params_from_module."""
    g = torch.Generator().manual_seed(seed)
    params = eager_params_from_module(moe)
    for key in PARAM_NAMES:
        if key not in params:
            continue
        t = params[key]
        v = torch.randn(t.shape, generator=g, dtype=torch.float64) * weight_scale(key, t.shape)
        t.copy_(v.to(t.dtype))
    return params


def leaf_copies(params):
    """float64 leaf copies of the module's weights (requires_grad except the score bias)."""
    out = {}
    for key, t in params.items():
        c = t.detach().to(torch.float64).clone()
        if key != "score_bias":
            c.requires_grad_()
        out[key] = c
    return out


def param_name(key):
    return PARAM_NAMES[key]


__all__ = ["TOL", "DTYPE_NAME", "close_report", "assert_close_ref", "weight_scale",
           "randomize_module", "leaf_copies", "param_name", "FP32_WEIGHTS"]
