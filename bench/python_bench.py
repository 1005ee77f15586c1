#!/usr/bin/env python3
"""python_bench.py — the Python package's cost and speed, measured in one run (on demand, not a test).

    python3 bench/python_bench.py [--spec specs/demo.yaml] [--tokens 1,16,256] [--threads 1] [--repeat 50]

Needs the package installed (pip install ./python). For each token count it times, as medians:
  C API      `moegen bench` (the package's own moegen binary: the C API in a loop, no Python)
  Layer      moegen.Layer.forward (the extension: checks, output allocation, the C call)
  MoE        moegen.torch.MoE under torch.no_grad (the custom op on top of Layer)
  MoE train  forward + backward of MoE (the training forward, then the generated backward)
  eager      a Hugging Face-style eager block (router, top-k, a loop over the experts hit,
             index_add_) with the same weights, forward under no_grad, and forward + backward
and prints the per-call overhead of the Python path (Layer and MoE minus C API) and the speed of
the module against the eager block (eager / MoE).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moegen
from moegen.torch import MoE


def median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class EagerBlock(torch.nn.Module):
    """The Hugging Face sparse-MoE block's computation (softmax router, top-k, optional
    renormalization, a loop over the experts hit with gated experts), on the module's weights."""

    def __init__(self, moe, norm_topk_prob):
        super().__init__()
        self.moe, self.norm = moe, norm_topk_prob

    def forward(self, x):
        m = self.moe
        w1, w2 = m.experts.gate_up_proj, m.experts.down_proj
        f = w2.shape[-1]
        probs = F.softmax(F.linear(x.float(), m.gate.weight), dim=-1)
        weights, ids = torch.topk(probs, m.top_k, dim=-1)
        if self.norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=m.num_experts).permute(2, 1, 0)
        for e in mask.sum(dim=(-1, -2)).nonzero()[:, 0].tolist():
            slot, token = torch.where(mask[e])
            cur = x[token]
            h = F.silu(F.linear(cur, w1[e, :f])) * F.linear(cur, w1[e, f:])
            out = out.index_add(0, token, F.linear(h, w2[e]) * weights[token, slot, None])
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="specs/demo.yaml")
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    exe = Path(moegen.__file__).parent / "bin" / "moegen"
    run = subprocess.run([str(exe), "bench", args.spec, "--tokens", args.tokens, "--repeat", str(args.repeat),
                          "--threads", str(args.threads), "--json"], capture_output=True, text=True, check=True)
    c_api = {j["tokens"]: j["median_ms"] for j in map(json.loads, run.stdout.splitlines())}

    torch.manual_seed(0)
    moe = MoE(args.spec, threads=args.threads)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_((torch.randn(p.shape) * 0.05).to(p.dtype))
    layer = moe.layer
    layer.bind(**{f: (w.view(layer.weight_shapes()[f][0])) for f, w in zip(moe._fields, moe._weights())})
    eager = EagerBlock(moe, norm_topk_prob="norm_topk_prob: true" in layer.spec_yaml)
    rows = []
    for S in tokens:
        x = (torch.randn(S, moe.hidden_size) * 0.5).to(layer.dtype)
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            t_layer = median_ms(lambda: layer.forward(x), args.repeat)
            t_moe = median_ms(lambda: moe(x), args.repeat)
            t_eager = median_ms(lambda: eager(x), args.repeat)

        def moe_step():
            y, aux, _ = moe(xg)
            (y.float().sum() + 0.01 * aux).backward()

        def eager_step():
            eager(xg).float().sum().backward()

        t_moe_train = median_ms(moe_step, max(5, args.repeat // 5))
        t_eager_train = median_ms(eager_step, max(5, args.repeat // 5))
        rows.append((S, c_api.get(S), t_layer, t_moe, t_moe_train, t_eager, t_eager_train))

    d = layer.describe()
    print(f"# moegen Python package: {args.spec} ({d['dtype']}, E={d['num_experts']}, k={d['top_k']}, "
          f"H={d['hidden_size']}, F={d['ffn_size']}), {args.threads} thread(s), medians of {args.repeat}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, variant {d['variant']}")
    print("| tokens | C API ms | Layer ms | MoE ms | Python overhead (MoE - C API) | eager ms | eager / MoE |"
          " MoE fwd+bwd ms | eager fwd+bwd ms | eager / MoE (train) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for S, c, tl, tm, tmt, te, tet in rows:
        over = f"{(tm - c) * 1e3:.0f} us" if c is not None else "n/a"
        print(f"| {S} | {c if c is None else f'{c:.3f}'} | {tl:.3f} | {tm:.3f} | {over} | {te:.3f} | {te / tm:.2f}x "
              f"| {tmt:.3f} | {tet:.3f} | {tet / tmt:.2f}x |")


if __name__ == "__main__":
    main()
