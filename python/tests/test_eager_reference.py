"""Checks of the eager reference itself (eager_moe.py), without the moegen package:
the numbers docs/numerics.md gives, hand-computed cases, finite differences (gradcheck)
and, when a moegen CLI with ``run --backward`` is around, the generated kernels' own outputs."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from eager_moe import (capacity_for, eager_moe, resolve_spec, rng_u, weight_shapes,
                       _mix)
from moe_testutil import assert_close_ref, weight_scale

torch.set_default_dtype(torch.float32)


def base(**kw):
    d = dict(name="t", num_experts=4, num_experts_per_tok=2, hidden_size=16,
             moe_intermediate_size=16, dtype="fp32")
    d.update(kw)
    return d


def random_params(spec, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in weight_shapes(spec).items():
        t = torch.randn(shape, generator=g, dtype=torch.float64) * weight_scale(key, shape)
        if requires_grad and key != "score_bias":
            t.requires_grad_()
        out[key] = t
    return out


# ------------------------------------------------------------------------------------------
# spec defaults
# ------------------------------------------------------------------------------------------


def test_resolve_presets():
    m = resolve_spec(base())
    assert m["router"]["order"] == "topk_then_softmax"
    assert m["router"]["aux_loss"] == "megatron"
    assert m["capacity"] == {"mode": "dropless", "renormalize": False}
    assert m["activation"] == "swiglu" and m["mode"] == "eval"
    d1 = resolve_spec(base(semantics="deepspeed", num_experts_per_tok=1))
    c = d1["capacity"]
    assert d1["router"]["order"] == "softmax_then_topk"
    assert c["mode"] == "factor" and c["formula"] == "deepspeed" and c["min_capacity"] == 4
    assert c["priority"] == "position" and c["renormalize"] is False
    assert c["capacity_factor"] == 1.0 and c["eval_capacity_factor"] == 1.0
    d2 = resolve_spec(base(semantics="deepspeed"))
    assert d2["capacity"]["priority"] == "position_choice_major" and d2["capacity"]["renormalize"]
    d3 = resolve_spec(base(semantics="deepspeed", num_experts_per_tok=3))
    assert d3["capacity"]["priority"] == "probs"
    f = resolve_spec(base(capacity={"expert_capacity": 3}))
    assert f["capacity"]["mode"] == "fixed" and f["capacity"]["priority"] == "probs"
    g = resolve_spec(base(num_experts=8, num_experts_per_tok=4,
                          router={"score_function": "sigmoid", "n_group": 4, "topk_group": 2}))
    assert g["router"]["group_topm"] == 2 and g["router"]["group_mask"] == "neg_inf"
    assert "order" not in g["router"]
    e = resolve_spec(base(capacity={"capacity_factor": 2.0}))
    assert e["capacity"]["mode"] == "factor" and e["capacity"]["formula"] == "megatron"
    assert e["capacity"]["eval_capacity_factor"] == 2.0


# ------------------------------------------------------------------------------------------
# numbers from the docs and by hand
# ------------------------------------------------------------------------------------------


def test_deepspeed_capacity_example():
    # numerics.md §2.1: k = 3, E = 8, cf = 0.55, S = 480 gives 99
    s = resolve_spec(base(semantics="deepspeed", num_experts=8, num_experts_per_tok=3,
                          capacity={"capacity_factor": 0.55}))
    assert capacity_for(s, 480) == 99
    # ... where rounding cf to fp32 first and multiplying by k in fp32 gives 100
    wrong = np.float32(np.float32(480 / 8) * (np.float32(3) * np.float32(0.55)))
    assert math.ceil(float(wrong)) == 100
    assert capacity_for(s, 8) == 4  # min_capacity
    s0 = resolve_spec(base(semantics="deepspeed", num_experts=8, num_experts_per_tok=3,
                           capacity={"capacity_factor": 0.55, "min_capacity": 0}))
    assert capacity_for(s0, 8) == 2  # ceil(1 * 1.65)


def test_megatron_and_fixed_capacity():
    s = resolve_spec(base(num_experts=8, capacity={"capacity_factor": 0.75,
                                                   "eval_capacity_factor": 1.25}))
    assert capacity_for(s, 64, "train") == 12  # ceil(64*2/8*0.75)
    assert capacity_for(s, 64, "eval") == 20
    assert capacity_for(s, 5, "eval") == 2  # ceil(1.25 * 1.25) = ceil(1.5625)
    assert capacity_for(resolve_spec(base(capacity={"expert_capacity": 7})), 100) == 7
    assert capacity_for(resolve_spec(base()), 100) == -1


def test_rng_u():
    vals = [rng_u(42, 7, s, i) for s in (1, 2, 3) for i in range(200)]
    for v in vals:
        assert 0 < v < 1
        m = v * 2 ** 24
        assert m == int(m) and int(m) % 2 == 1
    assert len(set(vals)) > 590
    assert rng_u(1, 2, 3, 4) == rng_u(1, 2, 3, 4) != rng_u(1, 3, 3, 4)
    # mix is a bijection step of splitmix64: mix(0) is splitmix64's first output for seed 0
    assert _mix(0) == 0xE220A8397B1DCDAF


def _manual_params(E, H, F, router_w):
    p = {"router_w": torch.tensor(router_w, dtype=torch.float64)}
    p["w1"] = torch.zeros(E, 2 * F, H, dtype=torch.float64)
    p["w2"] = torch.zeros(E, H, F, dtype=torch.float64)
    return p


def test_hand_routing_softmax_orders_and_aux():
    # x = e0 (one-hot) so the logits are router_w[:, 0]
    E, H, F = 4, 16, 16
    z = [2.0, 1.0, 0.5, -1.0]
    rw = [[v] + [0.0] * (H - 1) for v in z]
    x = torch.zeros(1, H, dtype=torch.float64)
    x[0, 0] = 1.0
    sp = torch.softmax(torch.tensor(z, dtype=torch.float64), 0)
    s1 = resolve_spec(base(router={"order": "softmax_then_topk"}))
    r = eager_moe(s1, _manual_params(E, H, F, rw), x)
    assert r.topk_ids.tolist() == [[0, 1]]
    assert torch.allclose(r.router_weights[0], sp[:2])
    s2 = resolve_spec(base())  # topk_then_softmax
    r2 = eager_moe(s2, _manual_params(E, H, F, rw), x)
    assert torch.allclose(r2.router_weights[0], torch.softmax(torch.tensor(z[:2], dtype=torch.float64), 0))
    # megatron aux: E * sum_e P_e c_e / (k S) with S = 1: P = sp, c = [1, 1, 0, 0]
    assert abs(float(r2.aux_loss) - 4 * float(sp[0] + sp[1]) / 2) < 1e-12
    # z loss = lse^2
    assert abs(float(r2.z_loss) - float(torch.logsumexp(torch.tensor(z, dtype=torch.float64), 0)) ** 2) < 1e-12
    # deepspeed aux, k = 2: E * sum_e P_e c1_e / S with the first-choice counts only
    s3 = resolve_spec(base(semantics="deepspeed", capacity={"mode": "dropless"}))
    r3 = eager_moe(s3, _manual_params(E, H, F, rw), x)
    assert abs(float(r3.aux_loss) - 4 * float(sp[0])) < 1e-12
    # norm_topk_prob + routed scaling
    s4 = resolve_spec(base(router={"order": "softmax_then_topk", "norm_topk_prob": True,
                                   "routed_scaling_factor": 2.5}))
    r4 = eager_moe(s4, _manual_params(E, H, F, rw), x)
    assert torch.allclose(r4.router_weights[0], 2.5 * sp[:2] / sp[:2].sum())


def test_hand_sigmoid_score_bias_and_groups():
    E, H, F = 8, 16, 16
    z = [0.0, 0.1, 3.0, 2.9, -1.0, 1.0, 0.5, 0.4]
    rw = [[v] + [0.0] * (H - 1) for v in z]
    x = torch.zeros(1, H, dtype=torch.float64)
    x[0, 0] = 1.0
    spec = resolve_spec(base(num_experts=8, num_experts_per_tok=2,
                             router={"score_function": "sigmoid", "score_bias": True,
                                     "n_group": 4, "topk_group": 2, "group_topm": 1}))
    p = _manual_params(E, H, F, rw)
    p["score_bias"] = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 0], dtype=torch.float64)
    r = eager_moe(spec, p, x)
    # groups {0,1} {2,3} {4,5} {6,7}; sel = sigmoid(z) + bias: group scores (top-1):
    # g1 = s(3.0), g3 = s(0.5) + 5: kept groups 3 and 1; experts 6 then 2
    assert r.topk_ids.tolist() == [[6, 2]]
    s = torch.sigmoid(torch.tensor(z, dtype=torch.float64))
    assert torch.allclose(r.router_weights[0], torch.stack([s[6], s[2]]))  # bias not in weights
    # group_mask zero: experts of dropped groups compete with sel 0 (all sel > 0 here, so
    # the same choice); neg_inf vs zero differ when a kept group has fewer good experts
    spec_z = resolve_spec(base(num_experts=8, num_experts_per_tok=2,
                               router={"score_function": "sigmoid", "score_bias": True,
                                       "n_group": 4, "topk_group": 1, "group_topm": 1,
                                       "group_mask": "zero"}))
    p["score_bias"] = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, -5.0], dtype=torch.float64)
    rz = eager_moe(spec_z, p, x)
    # kept group 3 = {6, 7}: sel 6 = s(0.5)+5, sel 7 = s(0.4)-5 < 0: the second pick is the
    # lowest-index expert of a dropped group with sel 0 (expert 0)
    assert rz.topk_ids.tolist() == [[6, 0]]
    spec_n = resolve_spec(base(num_experts=8, num_experts_per_tok=2,
                               router={"score_function": "sigmoid", "score_bias": True,
                                       "n_group": 4, "topk_group": 1, "group_topm": 1}))
    rn = eager_moe(spec_n, p, x)
    assert rn.topk_ids.tolist() == [[6, 7]]


def test_hand_capacity_priorities_and_used_token():
    # 6 tokens, E = 2, k = 1, fixed capacity 2; logits make the router weights distinct
    E, H, F = 2, 16, 16
    rw = [[1.0] + [0.0] * (H - 1), [-1.0] + [0.0] * (H - 1)]
    x = torch.zeros(6, H, dtype=torch.float64)
    x[:, 0] = torch.tensor([0.1, 0.5, 0.3, 0.9, -0.2, 0.7], dtype=torch.float64)
    # tokens 0,1,2,3,5 go to expert 0 (x > 0), token 4 to expert 1
    for prio, kept0 in (("position", [0, 1]), ("probs", [3, 5])):
        spec = resolve_spec(base(num_experts=2, num_experts_per_tok=1, semantics="deepspeed",
                                 capacity={"expert_capacity": 2, "priority": prio}))
        r = eager_moe(spec, _manual_params(E, H, F, rw), x)
        assert r.topk_ids.flatten().tolist() == [0, 0, 0, 0, 1, 0]
        assert r.counts_before.tolist() == [5, 1] and r.counts_after.tolist() == [2, 1]
        assert torch.nonzero(r.kept[:, 0] & (r.topk_ids[:, 0] == 0)).flatten().tolist() == kept0
        assert r.n_dropped == 3
        # masked tokens take no slot: with tokens 0 and 1 masked, position keeps 2 and 3
        r2 = eager_moe(spec, _manual_params(E, H, F, rw), x,
                       used_token=torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool))
        assert r2.counts_before.tolist() == [3, 1]
        want = [2, 3] if prio == "position" else [3, 5]
        assert torch.nonzero(r2.kept[:, 0] & (r2.topk_ids[:, 0] == 0)).flatten().tolist() == want
        assert float(r2.combine_weights[:2].abs().sum()) == 0.0
    # position_choice_major, k = 2: slot 0 of every token first
    rw3 = [[1.0, 0.0] + [0.0] * (H - 2), [0.0, 1.0] + [0.0] * (H - 2), [-1.0, -1.0] + [0.0] * (H - 2)]
    x3 = torch.zeros(3, H, dtype=torch.float64)
    x3[:, 0] = torch.tensor([1.0, 0.0, 0.2])
    x3[:, 1] = torch.tensor([0.0, 1.0, 0.1])
    # token 0: [0, 1], token 1: [1, 0], token 2: [0, 1]
    spec = resolve_spec(base(num_experts=3, semantics="deepspeed", capacity={"expert_capacity": 2}))
    p3 = {"router_w": torch.tensor(rw3, dtype=torch.float64),
          "w1": torch.zeros(3, 32, H, dtype=torch.float64), "w2": torch.zeros(3, H, 16, dtype=torch.float64)}
    r3 = eager_moe(spec, p3, x3)
    assert r3.topk_ids.tolist() == [[0, 1], [1, 0], [0, 1]]
    # expert 0: slot-0 routes of tokens 0, 2 then slot-1 route of token 1 (dropped)
    assert r3.kept.tolist() == [[True, True], [True, False], [True, False]]
    # renormalize (deepspeed k = 2 default): a token with one kept route gets weight 1
    assert abs(float(r3.combine_weights[1, 0]) - 1.0) < 1e-12
    assert float(r3.combine_weights[1, 1]) == 0.0


def test_hand_combine_and_shared_and_residual():
    torch.manual_seed(0)
    spec = resolve_spec(base(num_experts=4, num_experts_per_tok=2, activation="relu",
                             expert_bias=True, use_residual=True,
                             shared_experts={"count": 2, "intermediate_size": 16, "gate": True}))
    p = random_params(spec, 3, requires_grad=False)
    x = torch.randn(5, 16, dtype=torch.float64)
    r = eager_moe(spec, p, x)
    relu = torch.relu
    ffn = lambda u, w1, b1, w2, b2: relu(u @ w1.t() + b1) @ w2.t() + b2
    y = torch.zeros(5, 16, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            e = int(r.topk_ids[t, j])
            y[t] += r.combine_weights[t, j] * ffn(x[t], p["w1"][e], p["b1"][e], p["w2"][e], p["b2"][e])
    c = torch.softmax(x @ p["residual_coef_w"].t() + p["residual_coef_b"], -1)
    y = y * c[:, :1] + ffn(x, p["residual_w1"], p["residual_b1"], p["residual_w2"], p["residual_b2"]) * c[:, 1:]
    g = torch.sigmoid(x @ p["shared_gate"].reshape(-1))[:, None]
    y = y + g * sum(ffn(x, p["shared_w1"][i], p["shared_b1"][i], p["shared_w2"][i], p["shared_b2"][i])
                    for i in range(2))
    assert torch.allclose(r.y, y, atol=1e-12)


def test_invalid_logits():
    # a NaN token row has no valid logit: routed nowhere, counted nowhere; +inf is clamped
    spec = resolve_spec(base(num_experts=4, router={"order": "softmax_then_topk"}))
    p = random_params(spec, 1, requires_grad=False)
    x = torch.randn(3, 16, dtype=torch.float64)
    x[1] = float("nan")
    r = eager_moe(spec, p, x)
    assert r.valid_routes[1].tolist() == [False, False]
    assert r.topk_ids[1].tolist() == [0, 1]
    assert int(r.counts_before.sum()) == 4
    assert torch.isfinite(r.z_loss)


def test_weight_on_input():
    spec = resolve_spec(base(num_experts=4, num_experts_per_tok=1, weight_on_input=True,
                             activation="silu", router={"score_function": "sigmoid"}))
    p = random_params(spec, 5, requires_grad=False)
    x = torch.randn(4, 16, dtype=torch.float64)
    r = eager_moe(spec, p, x)
    for t in range(4):
        e = int(r.topk_ids[t, 0])
        w = r.combine_weights[t, 0]
        o = torch.nn.functional.silu((w * x[t]) @ p["w1"][e].t()) @ p["w2"][e].t()
        assert torch.allclose(r.y[t], o, atol=1e-12)


# ------------------------------------------------------------------------------------------
# finite differences
# ------------------------------------------------------------------------------------------

GRADCHECK_SPECS = {
    "dropless": base(num_experts=4, num_experts_per_tok=2, hidden_size=6, moe_intermediate_size=3,
                     router={"order": "softmax_then_topk", "norm_topk_prob": True,
                             "routed_scaling_factor": 1.5, "router_bias": True}),
    "topk_then_softmax": base(num_experts=4, num_experts_per_tok=2, hidden_size=6,
                              moe_intermediate_size=3, activation="gelu", expert_bias=True),
    "capacity": base(semantics="deepspeed", num_experts=4, num_experts_per_tok=2, hidden_size=6,
                     moe_intermediate_size=3, activation="geglu",
                     capacity={"capacity_factor": 0.6, "min_capacity": 1}),
    "capacity_probs": base(num_experts=4, num_experts_per_tok=2, hidden_size=6, moe_intermediate_size=3,
                           router={"order": "softmax_then_topk"},
                           capacity={"capacity_factor": 0.7, "priority": "probs", "renormalize": True}),
    "deepseek": base(num_experts=8, num_experts_per_tok=2, hidden_size=6, moe_intermediate_size=3,
                     router={"score_function": "sigmoid", "score_bias": True, "norm_topk_prob": True,
                             "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2},
                     shared_experts={"count": 1, "intermediate_size": 4, "gate": True}),
    "sqrtsoftplus": base(num_experts=4, num_experts_per_tok=3, hidden_size=6, moe_intermediate_size=3,
                         activation="gelu_tanh", router={"score_function": "sqrtsoftplus"}),
    "residual_top1": base(semantics="deepspeed", num_experts=4, num_experts_per_tok=1, hidden_size=6,
                          moe_intermediate_size=3, activation="silu", use_residual=True,
                          expert_bias=True, capacity={"capacity_factor": 1.0, "min_capacity": 1}),
    "weight_on_input": base(num_experts=4, num_experts_per_tok=1, hidden_size=6, moe_intermediate_size=3,
                            weight_on_input=True, router={"score_function": "sigmoid"},
                            capacity={"expert_capacity": 2}),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_SPECS))
@pytest.mark.parametrize("masked", [False, True], ids=["all", "used_token"])
def test_gradcheck(name, masked):
    spec = resolve_spec(GRADCHECK_SPECS[name])
    S, H = 7, int(spec["hidden_size"])
    used = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool) if masked else None
    for seed in range(50):  # data whose decisions sit well away from ties
        p = random_params(spec, seed)
        x = torch.randn(S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed),
                        requires_grad=True)
        r = eager_moe(spec, p, x, used)
        if float(r.decision_gap.min()) > 1e-3:
            break
    else:
        pytest.fail("no data without near ties")
    if spec["capacity"]["mode"] != "dropless" and not masked:
        assert r.n_dropped > 0 or name == "weight_on_input", "want drops in a capacity case"
    keys = [k for k in p if k != "score_bias"]
    dy = torch.randn(S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def f(x, *ws):
        q = dict(p)
        q.update(zip(keys, ws))
        res = eager_moe(spec, q, x, used)
        # the routing must not move under the perturbations
        assert torch.equal(res.topk_ids, r.topk_ids) and torch.equal(res.kept, r.kept)
        return (res.y * dy).sum() + 0.1 * res.aux_loss + 0.01 * res.z_loss, res.y

    assert torch.autograd.gradcheck(f, (x, *[p[k] for k in keys]), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_no_grad_through_selection_only_bias():
    spec = resolve_spec(GRADCHECK_SPECS["deepseek"])
    p = random_params(spec, 0)
    p["score_bias"].requires_grad_()
    x = torch.randn(5, 6, dtype=torch.float64)
    r = eager_moe(spec, p, x)
    (r.y.sum() + r.aux_loss + r.z_loss).backward()
    assert p["score_bias"].grad is None or float(p["score_bias"].grad.abs().sum()) == 0.0


def test_masked_tokens_grads():
    # §9: masked tokens get no gradient through the experts or their combine weights; the
    # score means of the aux loss and the z loss still reach them
    spec = resolve_spec(GRADCHECK_SPECS["dropless"])
    p = random_params(spec, 0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    used = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    r = eager_moe(spec, p, x, used)
    assert float(r.y[1].abs().max()) == 0.0
    r.y.sum().backward()
    assert float(x.grad[1].abs().max()) == 0.0
    x.grad = None
    r = eager_moe(spec, p, x, used)
    (r.aux_loss + r.z_loss).backward()
    assert float(x.grad[1].abs().max()) > 0.0


# ------------------------------------------------------------------------------------------
# against the generated kernels, through the CLI (`moegen run --backward --save`)
# ------------------------------------------------------------------------------------------


def _find_cli():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    cands = [os.environ.get("MOEGEN_BIN", "")] + [os.path.join(root, d, "moegen")
                                                  for d in ("build", "build-dev", "build-ref")]
    cands.append(shutil.which("moegen") or "")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            try:
                h = subprocess.run([c, "run", "--help"], capture_output=True, text=True, timeout=30)
            except Exception:
                continue
            if "--backward" in (h.stdout + h.stderr):
                return c
    return None


CLI = _find_cli()

CLI_SPECS = {
    # DeepSpeed top-2 in train mode: jitter, second-expert noise, residual, gated shared
    "ds_top2_train": (dict(name="c1", semantics="deepspeed", mode="train", num_experts=8,
                           num_experts_per_tok=2, hidden_size=32, moe_intermediate_size=16,
                           activation="geglu", dtype="fp32", expert_bias=True, use_residual=True,
                           router={"input_jitter": 0.01, "noise": "rsample", "seed": 42},
                           shared_experts={"count": 1, "intermediate_size": 16, "gate": True}), 3),
    # DeepSpeed top-1 train with noise, fixed capacity by position, relu
    "ds_top1_fixed": (dict(name="c2", semantics="deepspeed", mode="train", num_experts=4,
                           num_experts_per_tok=1, hidden_size=32, moe_intermediate_size=16,
                           activation="relu", dtype="fp32",
                           router={"noise": "rsample", "seed": 7},
                           capacity={"expert_capacity": 9, "priority": "position"}), 0),
    # DeepSeek-style groups, megatron capacity by probs, renormalize, padding
    "groups_capacity": (dict(name="c3", num_experts=16, num_experts_per_tok=4, hidden_size=32,
                             moe_intermediate_size=16, dtype="fp32",
                             router={"score_function": "sigmoid", "score_bias": True,
                                     "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                                     "n_group": 4, "topk_group": 2},
                             capacity={"capacity_factor": 0.75, "priority": "probs",
                                       "renormalize": True, "pad_to_capacity": True}), 0),
    # weight on input, deepspeed formula with random priority
    "woi_random": (dict(name="c4", num_experts=8, num_experts_per_tok=1, hidden_size=32,
                        moe_intermediate_size=16, activation="silu", dtype="fp32",
                        weight_on_input=True, router={"score_function": "sigmoid", "seed": 5},
                        capacity={"formula": "deepspeed", "capacity_factor": 1.0,
                                  "priority": "random"}), 11),
    # sqrtsoftplus, max group score, zero group mask, router bias, gelu_tanh
    "sqrtsoftplus_zero": (dict(name="c5", num_experts=12, num_experts_per_tok=3, hidden_size=32,
                               moe_intermediate_size=16, activation="gelu_tanh", dtype="fp32",
                               router={"score_function": "sqrtsoftplus", "n_group": 3,
                                       "topk_group": 1, "group_score": "max",
                                       "group_mask": "zero", "router_bias": True,
                                       "score_bias": True}), 0),
    # Megatron formula, position_choice_major, topk_then_softmax, bf16
    "megatron_bf16": (dict(name="c6", num_experts=8, num_experts_per_tok=2, hidden_size=32,
                           moe_intermediate_size=16, dtype="bf16",
                           capacity={"capacity_factor": 1.0, "priority": "position_choice_major"}), 0),
    # shared experts without gate, k = 4, deepspeed aux (k > 2: megatron formula), fp16
    "shared_fp16": (dict(name="c7", num_experts=16, num_experts_per_tok=4, hidden_size=32,
                         moe_intermediate_size=16, dtype="fp16",
                         router={"order": "softmax_then_topk", "norm_topk_prob": True,
                                 "aux_loss": "deepspeed"},
                         shared_experts={"count": 2, "intermediate_size": 16}), 0),
    # sigmoid with the deepspeed aux (p = softmax of the logits), scaled weights
    "sigmoid_dsaux": (dict(name="c8", num_experts=8, num_experts_per_tok=2, hidden_size=32,
                           moe_intermediate_size=16, dtype="fp32", activation="gelu",
                           router={"score_function": "sigmoid", "routed_scaling_factor": 1.5,
                                   "aux_loss": "deepspeed"}), 0),
}


@pytest.mark.cli
@pytest.mark.skipif(CLI is None, reason="no moegen CLI with `run --backward`")
@pytest.mark.parametrize("name", sorted(CLI_SPECS))
def test_eager_matches_cli_kernels(name, tmp_path):
    spec_d, offset = CLI_SPECS[name]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_d, sort_keys=False))
    out = tmp_path / "out"
    env = dict(os.environ)
    cmd = [CLI, "run", str(path), "--device", "cpu", "--tokens", "48", "--repeat", "1",
           "--threads", "2", "--backward", "--aux-coeff", "0.01", "--z-coeff", "0.001",
           "--rng-offset", str(offset), "--seed", "3", "--save", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    spec = resolve_spec(spec_d)
    dt = spec["dtype"]
    def L(n):
        a = np.load(out / f"{n}.npy")
        if a.dtype == np.uint16:  # bf16 tensors are saved as their raw bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    params = {}
    for key in weight_shapes(spec):
        t = L(key).to(torch.float64).reshape(weight_shapes(spec)[key])
        if key != "score_bias":
            t.requires_grad_()
        params[key] = t
    x = L("x").to(torch.float64).requires_grad_()
    r = eager_moe(spec, params, x, rng_offset=offset)
    ids = L("topk_ids").to(torch.int64)
    near = r.decision_gap < 1e-5
    assert torch.equal(r.topk_ids[~near], ids[~near]), "routing differs"
    if bool(near.any()) or not torch.equal(r.topk_ids, ids):
        r = eager_moe(spec, params, x, rng_offset=offset, force_topk_ids=ids)
    assert r.capacity == int(L("capacity"))
    assert r.counts_before.tolist() == L("counts_before").tolist()
    assert r.counts_after.tolist() == L("counts_after").tolist()
    assert r.n_dropped == int(L("n_dropped"))
    assert_close_ref(L("topk_weights"), r.combine_weights, "fp32", "combine weights")
    assert_close_ref(L("router_weights"), r.router_weights, "fp32", "router weights")
    assert_close_ref(L("y"), r.y, dt, "y")
    assert_close_ref(L("aux_loss"), r.aux_loss, "fp32", "aux_loss")
    assert_close_ref(L("z_loss"), r.z_loss, "fp32", "z_loss")
    loss = (r.y * L("dy").to(torch.float64)).sum() + 0.01 * r.aux_loss + 0.001 * r.z_loss
    loss.backward()
    assert_close_ref(L("dx"), x.grad, dt, "dx")
    for key, t in params.items():
        if key == "score_bias":
            continue
        assert_close_ref(L("grad_" + key).reshape(t.shape), t.grad, dt, "grad " + key)
