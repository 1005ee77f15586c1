"""moegen.torch.MoE against the eager float64 reference (eager_moe.py): forward, routing,
counts, losses and every gradient over a matrix of specs; training steps; torch.compile;
bad input."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from eager_moe import (EagerMoE, eager_moe, eager_params_from_module, resolve_spec,
                       torch_dtype)
from moe_testutil import assert_close_ref, leaf_copies, randomize_module

moegen = pytest.importorskip("moegen")
moegen_torch = pytest.importorskip("moegen.torch")
MoE = moegen_torch.MoE

AUX_COEF, Z_COEF = 0.01, 0.001
TOKENS = 48
MARGIN = 1e-4  # decisions closer than this (selection-score units) are avoided in the data


def S(name, **kw):
    d = dict(name=name, num_experts=8, num_experts_per_tok=2, hidden_size=32,
             moe_intermediate_size=16, dtype="fp32")
    d.update(kw)
    return d


SPECS = {
    # Megatron defaults: dropless, top-k then softmax, megatron aux loss
    "top2_dropless": S("top2-dropless"),
    # k = 4 of 16, softmax then top-k with renormalized weights, geglu
    "top4_e16_norm": S("top4-e16", num_experts=16, num_experts_per_tok=4, activation="geglu",
                       router={"order": "softmax_then_topk", "norm_topk_prob": True}),
    # DeepSpeed top-1, capacity factor 1.0 (C = 8 for 48 tokens... min 4): drops by position
    "ds_top1_cf1": S("ds-top1", semantics="deepspeed", num_experts_per_tok=1, activation="relu",
                     expert_bias=True, capacity={"capacity_factor": 1.0}),
    # DeepSpeed top-2, capacity factor 1.0 on 4 experts: position_choice_major, renormalize
    "ds_top2_cf1": S("ds-top2", semantics="deepspeed", num_experts=4, activation="gelu",
                     capacity={"capacity_factor": 1.0}),
    # Megatron formula with probs priority and renormalization, plain silu experts; the
    # train-mode factor differs from the eval one (set_mode test)
    "megatron_cap": S("megatron-cap", activation="silu", router={"router_bias": True},
                      capacity={"capacity_factor": 0.75, "eval_capacity_factor": 1.0,
                                "priority": "probs", "renormalize": True}),
    # Qwen-style: shared expert behind a sigmoid gate
    "shared_gate": S("shared-gate", num_experts=16, num_experts_per_tok=4,
                     router={"order": "softmax_then_topk"},
                     shared_experts={"count": 1, "intermediate_size": 32, "gate": True}),
    # DeepSeek-V3-style: sigmoid, groups, selection bias, scaling, shared expert
    "deepseek": S("deepseek-small", num_experts=16, num_experts_per_tok=4,
                  router={"score_function": "sigmoid", "score_bias": True, "norm_topk_prob": True,
                          "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2},
                  shared_experts={"count": 1, "intermediate_size": 16}),
    # DeepSpeed residual MoE, top-1, with expert biases
    "residual": S("residual", semantics="deepspeed", num_experts=4, num_experts_per_tok=1,
                  activation="geglu", expert_bias=True, use_residual=True,
                  capacity={"capacity_factor": 1.0}),
    # Llama-4 style: weight on input, fixed capacity
    "woi_fixed": S("woi-fixed", num_experts_per_tok=1, activation="silu", weight_on_input=True,
                   router={"score_function": "sigmoid"},
                   capacity={"expert_capacity": 6, "priority": "position"}),
    # bf16 layers
    "top2_dropless_bf16": S("top2-bf16", dtype="bf16"),
    "deepseek_bf16": S("deepseek-bf16", dtype="bf16", num_experts=16, num_experts_per_tok=4,
                       router={"score_function": "sigmoid", "score_bias": True,
                               "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                               "n_group": 4, "topk_group": 2, "group_mask": "zero"},
                       shared_experts={"count": 1, "intermediate_size": 16, "gate": True},
                       capacity={"capacity_factor": 1.0, "priority": "probs"}),
}


def random_specs(count, seed):
    """`count` random valid specs across the spec space (odd expert counts, sizes that are not
    powers of two, every activation and dtype, both score functions and orders, groups, every
    capacity mode and priority, shared experts, biases), each accepted by `moegen check` (the
    loader is the judge of validity; rejected draws are drawn again)."""
    rng = random.Random(seed)
    exe = Path(moegen.__file__).parent / "bin" / "moegen"
    specs = {}
    while len(specs) < count:
        E = rng.choice([2, 3, 5, 6, 8, 12, 16])
        k = rng.randint(1, min(E, 4))
        d = S(f"random-{seed}-{len(specs)}", num_experts=E, num_experts_per_tok=k,
              hidden_size=16 * rng.randint(1, 5), moe_intermediate_size=16 * rng.randint(1, 3),
              activation=rng.choice(["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]),
              dtype=rng.choice(["fp32", "fp32", "bf16", "fp16"]),
              semantics=rng.choice(["megatron", "deepspeed"]), expert_bias=rng.random() < 0.3)
        router = {}
        if rng.random() < 0.3:
            router.update(score_function="sigmoid", score_bias=rng.random() < 0.5)
            if E % 4 == 0 and k <= E // 2 and rng.random() < 0.5:
                router.update(n_group=4, topk_group=2)
        else:
            router["order"] = rng.choice(["softmax_then_topk", "topk_then_softmax"])
        router["norm_topk_prob"] = rng.random() < 0.5
        d["router"] = router
        mode = rng.choice(["dropless", "factor", "fixed"])
        if mode == "factor":
            d["capacity"] = {"capacity_factor": rng.choice([0.75, 1.0, 1.5]),
                             "eval_capacity_factor": rng.choice([0.75, 1.0, 1.5]),
                             "priority": rng.choice(["position", "probs", "position_choice_major"])}
        elif mode == "fixed":
            d["capacity"] = {"expert_capacity": rng.randint(2, 16), "priority": rng.choice(["position", "probs"])}
        else:
            d["capacity"] = {"mode": "dropless"}
        if rng.random() < 0.3:
            d["shared_experts"] = {"count": 1, "intermediate_size": 16 * rng.randint(1, 2),
                                   "gate": rng.random() < 0.5}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(moegen.spec_text(d)[0])
            f.flush()
            if subprocess.run([str(exe), "check", f.name], capture_output=True).returncode != 0:
                continue
        specs[f"random_{len(specs)}"] = d
    return specs


# A fixed-seed slice of random specs runs in the suite; MOEGEN_PY_RANDOM_SPECS=N (and
# MOEGEN_PY_RANDOM_SEED) runs more on demand.
RANDOM = random_specs(int(os.environ.get("MOEGEN_PY_RANDOM_SPECS", "6")),
                      int(os.environ.get("MOEGEN_PY_RANDOM_SEED", "20261130")))
SPECS.update(RANDOM)
MASKED = {"ds_top1_cf1", "top2_dropless", "residual", "deepseek_bf16", "megatron_cap"}
MASKED |= {name for name in ("random_0", "random_1") if name in SPECS}
RUNS = [(n, False) for n in sorted(SPECS)] + [(n, True) for n in sorted(MASKED)]
RUN_IDS = [n + ("-used_token" if m else "") for n, m in RUNS]


class Case:
    def __init__(self, name):
        self.name = name
        self.spec_d = SPECS[name]
        self.spec = resolve_spec(self.spec_d)
        self.dtype = torch_dtype(self.spec)
        self.dt = self.spec["dtype"]
        self.moe = MoE(copy.deepcopy(self.spec_d), threads=0)
        self.params = randomize_module(self.moe, seed=sum(map(ord, name)))
        self.runs = {}


_CASES = {}


def get_case(name):
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.fixture(scope="module", autouse=True)
def _drop_cases():
    yield
    _CASES.clear()


def pick_input(case, S, want_mask, seed0=0):
    """x [S, H] in the layer dtype (and a used_token mask) whose routing decisions are at
    least MARGIN from a tie, judged by the eager reference on the module's weights."""
    H = int(case.spec["hidden_size"])
    w = {k: v.detach() for k, v in case.params.items()}
    for seed in range(seed0, seed0 + 200):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(S, H, generator=g, dtype=torch.float64).to(case.dtype)
        mask = (torch.rand(S, generator=g) > 0.25) if want_mask else None
        ok = True
        for m in ([None, mask] if want_mask else [None]):
            r = eager_moe(case.spec, w, x, m)
            if float(r.decision_gap.min()) <= MARGIN:
                ok = False
        if ok:
            return x, mask
    raise AssertionError("no input without near ties")


def run_both(case, masked):
    """Forward + backward of the module and of the eager reference on the same data."""
    key = masked
    if key in case.runs:
        return case.runs[key]
    moe = case.moe
    x, mask = pick_input(case, TOKENS, masked)
    g = torch.Generator().manual_seed(1234)
    R = torch.randn(TOKENS, int(case.spec["hidden_size"]), generator=g).to(case.dtype)

    moe.zero_grad(set_to_none=True)
    xm = x.clone().requires_grad_()
    out, l_aux, counts = moe(xm, used_token=mask)
    z = moe.z_loss
    got = dict(out=out.detach().clone(), l_aux=l_aux.detach().clone(), z=z.detach().clone(),
               counts=counts.clone(), counts_after=moe.last_counts_after.clone(),
               topk_ids=moe.last_topk_ids.clone(), l_aux_t=l_aux, z_t=z)
    loss = (out.float() * R.float()).sum() + AUX_COEF * l_aux + Z_COEF * z
    loss.backward()
    got["dx"] = xm.grad.clone() if xm.grad is not None else None
    got["grads"] = {k: (None if t.grad is None else t.grad.clone()) for k, t in case.params.items()
                    if isinstance(t, nn.Parameter)}
    got["param_dtypes"] = {k: t.dtype for k, t in case.params.items()}

    leaves = leaf_copies(case.params)
    x64 = x.to(torch.float64).requires_grad_()
    ref = eager_moe(case.spec, leaves, x64, mask)
    lref = (ref.y * R.to(torch.float64)).sum() + AUX_COEF * ref.aux_loss + Z_COEF * ref.z_loss
    lref.backward()
    want = dict(ref=ref, dx=x64.grad,
                grads={k: t.grad for k, t in leaves.items() if k != "score_bias"})
    case.runs[key] = (x, mask, got, want)
    return case.runs[key]


@pytest.fixture(scope="module", params=RUNS, ids=RUN_IDS)
def run(request):
    name, masked = request.param
    case = get_case(name)
    return case, run_both(case, masked)


def test_routing_and_counts(run):
    case, (x, mask, got, want) = run
    ref = want["ref"]
    ids = got["topk_ids"]
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (TOKENS, case.spec["num_experts_per_tok"])
    assert torch.equal(ids.long(), ref.topk_ids), "topk_ids differ from the reference"
    c = got["counts"]
    assert c.dtype == torch.int64 and c.device.type == "cpu"
    assert c.tolist() == ref.counts_before.tolist(), "exp_counts (counts before capacity)"
    assert got["counts_after"].tolist() == ref.counts_after.tolist(), "counts after capacity"
    if (case.spec["capacity"]["mode"] != "dropless" and mask is None and case.name != "woi_fixed"
            and case.name not in RANDOM):
        # the hand-picked capacity specs are meant to drop routes (random ones may not)
        assert ref.n_dropped > 0


def test_forward_output(run):
    case, (x, mask, got, want) = run
    out = got["out"]
    assert out.dtype == case.dtype and out.shape == x.shape
    assert_close_ref(out, want["ref"].y, case.dt, "out")
    if mask is not None:
        # masked tokens route nowhere: only shared / residual paths reach them
        if case.spec["shared_experts"]["count"] == 0 and not case.spec["use_residual"]:
            assert float(out[~mask].float().abs().max()) == 0.0


def test_losses(run):
    case, (x, mask, got, want) = run
    ref = want["ref"]
    for name, t, r in (("l_aux", got["l_aux"], ref.aux_loss), ("z_loss", got["z"], ref.z_loss)):
        assert t.dim() == 0 and t.dtype == torch.float32, name
        # the router is fp32 on the same inputs in every layer dtype
        assert_close_ref(t, r, "fp32", name, atol_rel=1e-6)
    assert got["l_aux_t"].requires_grad and got["z_t"].requires_grad


def test_gradients(run):
    case, (x, mask, got, want) = run
    assert got["dx"] is not None, "no gradient for hidden_states"
    assert got["dx"].dtype == case.dtype
    assert_close_ref(got["dx"], want["dx"], case.dt, "d hidden_states")
    for key, g in got["grads"].items():
        assert g is not None, f"no gradient for {key}"
        assert g.dtype == got["param_dtypes"][key], f"grad dtype of {key}"
        assert_close_ref(g, want["grads"][key].reshape(g.shape), case.dt, f"grad {key}")
    missing = set(want["grads"]) - set(got["grads"])
    assert not missing, f"parameters missing from the module: {missing}"


def test_only_losses_gradients():
    """The gradients of the aux and z losses alone (dy = 0)."""
    case = get_case("deepseek")
    x, mask = pick_input(case, TOKENS, False)
    case.moe.zero_grad(set_to_none=True)
    xm = x.clone().requires_grad_()
    out, l_aux, _ = case.moe(xm)
    (l_aux + 0.5 * case.moe.z_loss).backward()
    leaves = leaf_copies(case.params)
    x64 = x.to(torch.float64).requires_grad_()
    ref = eager_moe(case.spec, leaves, x64)
    (ref.aux_loss + 0.5 * ref.z_loss).backward()
    assert_close_ref(xm.grad, x64.grad, "fp32", "dx")
    gw = case.params["router_w"].grad
    assert_close_ref(gw, leaves["router_w"].grad, "fp32", "grad router_w")
    for key in ("w1", "w2", "shared_w1"):
        g = case.params[key].grad
        assert g is None or float(g.abs().max()) == 0.0, key


def test_gradient_accumulation_fusion():
    """Megatron's gradient accumulation fusion: the backward adds each parameter's fp32 gradient
    straight into its main_grad (twice over two steps: exactly twice the plain gradient), hands
    autograd a placeholder where the parameter has grad_added_to_main_grad (and sets it), nothing
    where it has not, and the ordinary gradient to a parameter without main_grad."""
    case = get_case("shared_gate")  # fp32; the shared gate's [1, H] weight is the layer's [H]
    x, _ = pick_input(case, TOKENS, False)
    R = torch.randn(TOKENS, int(case.spec["hidden_size"]), generator=torch.Generator().manual_seed(7))

    def step(moe):
        xm = x.clone().requires_grad_()
        out, l_aux, _ = moe(xm)
        ((out * R).sum() + AUX_COEF * l_aux + Z_COEF * moe.z_loss).backward()
        return xm.grad

    case.moe.zero_grad(set_to_none=True)
    dx_plain = step(case.moe)
    plain = {n: p.grad.clone() for n, p in case.moe.named_parameters()}
    fused = MoE(copy.deepcopy(case.spec_d), gradient_accumulation_fusion=True)
    fused.load_state_dict(case.moe.state_dict())
    assert fused.gradient_accumulation_fusion
    params = dict(fused.named_parameters())
    assert {"gate.weight", "experts.down_proj", "shared_expert_gate.weight"} <= set(params)
    for n, p in params.items():
        if n != "gate.weight":  # the router keeps its ordinary gradient
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
    params["experts.down_proj"].grad_added_to_main_grad = False
    params["shared_expert_gate.weight"].grad_added_to_main_grad = False
    params["shared_expert_gate.weight"].zero_out_wgrad = True
    assert torch.equal(step(fused), dx_plain)
    step(fused)
    for n, p in params.items():
        if n == "gate.weight":
            assert not hasattr(p, "main_grad")
            assert torch.equal(p.grad, 2 * plain[n]), n
            continue
        assert torch.equal(p.main_grad, 2 * plain[n]), n
        if hasattr(p, "grad_added_to_main_grad"):
            assert p.grad_added_to_main_grad is True and p.grad is not None and p.grad.shape == p.shape, n
        else:
            assert p.grad is None, n
    assert float(params["shared_expert_gate.weight"].grad.abs().max()) == 0.0  # zero_out_wgrad

    # a main_grad moegen cannot add into is refused with the parameter's name, before any change
    before = params["experts.gate_up_proj"].main_grad.clone()
    params["experts.down_proj"].main_grad = torch.zeros(params["experts.down_proj"].shape, dtype=torch.bfloat16)
    with pytest.raises((ValueError, RuntimeError), match=r"experts\.down_proj\.main_grad: expected float32"):
        step(fused)
    assert torch.equal(params["experts.gate_up_proj"].main_grad, before)
    fused.gradient_accumulation_fusion = False  # the plain backward again: every .grad is a gradient
    fused.zero_grad(set_to_none=True)
    step(fused)
    for n, p in params.items():
        assert torch.equal(p.grad, plain[n]), n


def test_leading_dims_and_determinism():
    case = get_case("top2_dropless")
    x, _ = pick_input(case, TOKENS, False)
    with torch.no_grad():
        out1, l1, c1 = case.moe(x)
        out2, l2, c2 = case.moe(x)
        out3, l3, c3 = case.moe(x.reshape(4, TOKENS // 4, -1))
    assert torch.equal(out1, out2) and torch.equal(l1, l2) and torch.equal(c1, c2)
    assert out3.shape == (4, TOKENS // 4, x.shape[-1])
    assert torch.equal(out3.reshape(out1.shape), out1) and torch.equal(c3, c1)
    assert not out1.requires_grad


def test_zero_tokens():
    case = get_case("top2_dropless")
    x = torch.zeros(0, int(case.spec["hidden_size"]), dtype=case.dtype)
    out, l_aux, counts = case.moe(x)
    assert out.shape == x.shape
    assert float(l_aux) == 0.0 and float(case.moe.z_loss) == 0.0
    assert counts.tolist() == [0] * int(case.spec["num_experts"])


def test_train_mode_capacity():
    case = get_case("megatron_cap")
    if not hasattr(case.moe, "set_mode"):
        pytest.skip("MoE.set_mode is not provided (optional in the API)")
    x, _ = pick_input(case, TOKENS, False, seed0=500)
    w = {k: v.detach() for k, v in case.params.items()}
    try:
        for mode in ("train", "eval"):
            case.moe.set_mode(mode)
            with torch.no_grad():
                out, l_aux, counts = case.moe(x)
            ref = eager_moe(case.spec, w, x, mode=mode)
            assert torch.equal(case.moe.last_topk_ids.long(), ref.topk_ids)
            assert case.moe.last_counts_after.tolist() == ref.counts_after.tolist(), mode
            assert_close_ref(out, ref.y, case.dt, f"out ({mode})")
        assert int(ref.counts_after.sum()) > 0
    finally:
        case.moe.set_mode(case.spec["mode"])


# ------------------------------------------------------------------------------------------
# training steps: Linear -> MoE -> Linear with moegen and with the eager block
# ------------------------------------------------------------------------------------------

TRAIN_SPEC = "megatron_cap"


class Net(nn.Module):
    def __init__(self, moe, H):
        super().__init__()
        self.lin1 = nn.Linear(H, H)
        self.moe = moe
        self.lin2 = nn.Linear(H, H)

    def forward(self, x):
        out, l_aux, _ = self.moe(self.lin1(x))
        return self.lin2(out), l_aux


def _train(net, x, target, steps, lr):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    losses, gaps = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        y, l_aux = net(x)
        loss = ((y - target) ** 2).mean() + AUX_COEF * l_aux + Z_COEF * net.moe.z_loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if isinstance(net.moe, EagerMoE):
            gaps.append(float(net.moe.last_result.decision_gap.min()))
    return losses, gaps


def _make_nets(seed, with_moegen=True):
    """(net with moegen's MoE or None, net with EagerMoE, x, target), same initial weights."""
    spec_d = SPECS[TRAIN_SPEC]
    H = int(resolve_spec(spec_d)["hidden_size"])
    eager = EagerMoE(spec_d)
    randomize_module(eager, seed)
    net_e = Net(eager, H)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for lin in (net_e.lin1, net_e.lin2):
            lin.weight.copy_(torch.randn(H, H, generator=g) / H ** 0.5)
            lin.bias.copy_(torch.randn(H, generator=g) * 0.05)
    net_m = None
    if with_moegen:
        moe = MoE(copy.deepcopy(spec_d), threads=0)
        with torch.no_grad():
            mine = eager_params_from_module(moe)
            for key, t in eager_params_from_module(eager).items():
                mine[key].copy_(t)
        net_m = Net(moe, H)
        net_m.lin1.load_state_dict(net_e.lin1.state_dict())
        net_m.lin2.load_state_dict(net_e.lin2.state_dict())
    x = torch.randn(TOKENS, H, generator=g)
    target = torch.randn(TOKENS, H, generator=g)
    return net_m, net_e, x, target


def test_sgd_steps_match_eager():
    steps, lr = 5, 0.5
    for seed in range(20):  # a trajectory whose routing stays away from ties (eager alone)
        gaps = []
        for mode in ("train", "eval"):  # the capacity factors differ: good in both modes
            _, net_e, x, target = _make_nets(seed, with_moegen=False)
            net_e.moe.set_mode(mode)
            gaps += _train(net_e, x, target, steps, lr)[1]
        if min(gaps) > MARGIN:
            break
    else:
        pytest.fail("no seed without near ties")
    net_m, net_e, x, target = _make_nets(seed)
    if hasattr(net_m.moe, "set_mode"):
        net_m.moe.set_mode("train")
        net_e.moe.set_mode("train")
    lm, _ = _train(net_m, x, target, steps, lr)
    le, _ = _train(net_e, x, target, steps, lr)
    assert lm[-1] < lm[0], f"loss did not decrease: {lm}"
    for i, (a, b) in enumerate(zip(lm, le)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: moegen {lm} vs eager {le}"
    pm = eager_params_from_module(net_m.moe)
    pe = eager_params_from_module(net_e.moe)
    for key in pe:
        assert_close_ref(pm[key].detach(), pe[key].detach(), "fp32", f"{key} after {steps} steps")
    for n, p in net_e.named_parameters():
        if n.startswith("lin"):
            assert_close_ref(dict(net_m.named_parameters())[n].detach(), p.detach(), "fp32", n)


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------


@pytest.mark.compile
def test_compile_no_graph_break():
    torch._dynamo.reset()
    net_m, _, x, target = _make_nets(3)
    expl = torch._dynamo.explain(net_m)(x)
    assert expl.graph_break_count == 0, expl.break_reasons
    y_e, aux_e = net_m(x)
    compiled = torch.compile(net_m, fullgraph=True)
    y_c, aux_c = compiled(x)
    assert_close_ref(y_c, y_e, "fp32", "compiled out", rtol=1e-5, atol_rel=1e-6)
    assert_close_ref(aux_c, aux_e, "fp32", "compiled l_aux", rtol=1e-5, atol_rel=1e-6)


@pytest.mark.compile
def test_compile_backward_matches_eager():
    torch._dynamo.reset()
    net_m, _, x, target = _make_nets(4)

    def grads(fn):
        net_m.zero_grad(set_to_none=True)
        y, l_aux = fn(x)
        (((y - target) ** 2).mean() + AUX_COEF * l_aux).backward()
        return {n: p.grad.clone() for n, p in net_m.named_parameters() if p.grad is not None}

    g_e = grads(net_m)
    g_c = grads(torch.compile(net_m, fullgraph=True))
    assert set(g_e) == set(g_c)
    for n in g_e:
        assert_close_ref(g_c[n], g_e[n], "fp32", f"compiled grad {n}", rtol=1e-5, atol_rel=1e-6)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

BAD = (moegen.Error, TypeError, ValueError)


@pytest.fixture(scope="module")
def fp32_case():
    return get_case("top2_dropless")


def _expect_bad(moe, x, word, **kw):
    with pytest.raises(BAD) as ei:
        moe(x, **kw)
    assert word in str(ei.value), f"message does not name {word}: {ei.value!r}"


def test_bad_dtype(fp32_case):
    H = int(fp32_case.spec["hidden_size"])
    _expect_bad(fp32_case.moe, torch.randn(8, H, dtype=torch.float64), "hidden_states")
    _expect_bad(fp32_case.moe, torch.randn(8, H).to(torch.bfloat16), "hidden_states")


def test_bad_last_dim(fp32_case):
    H = int(fp32_case.spec["hidden_size"])
    _expect_bad(fp32_case.moe, torch.randn(8, H + 16), "hidden_states")
    _expect_bad(fp32_case.moe, torch.randn(8, H // 2), "hidden_states")


def test_non_contiguous(fp32_case):
    H = int(fp32_case.spec["hidden_size"])
    x = torch.randn(H, 8).t()
    assert not x.is_contiguous() and x.shape == (8, H)
    _expect_bad(fp32_case.moe, x, "hidden_states")


def test_cuda_tensor(fp32_case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    H = int(fp32_case.spec["hidden_size"])
    _expect_bad(fp32_case.moe, torch.randn(8, H, device="cuda"), "hidden_states")


def test_bad_used_token(fp32_case):
    H = int(fp32_case.spec["hidden_size"])
    x = torch.randn(8, H)
    _expect_bad(fp32_case.moe, x, "used_token", used_token=torch.ones(9, dtype=torch.bool))
    _expect_bad(fp32_case.moe, x, "used_token", used_token=torch.ones(7, dtype=torch.bool))


def test_usable_after_errors(fp32_case):
    H = int(fp32_case.spec["hidden_size"])
    for bad in (torch.randn(4, H, dtype=torch.float64), torch.randn(4, H + 16)):
        with pytest.raises(BAD):
            fp32_case.moe(bad)
    x = torch.randn(8, H)
    out, l_aux, counts = fp32_case.moe(x)
    ref = eager_moe(fp32_case.spec, {k: v.detach() for k, v in fp32_case.params.items()}, x)
    assert_close_ref(out, ref.y, "fp32", "out after errors")
