#!/usr/bin/env python3
"""anchors.py — the anchors moegen's GPU numbers are compared with, measured in the same run.

For one spec (read from its YAML) and a list of token counts, time on the GPU with CUDA
events (median of --repeat after warm-up):
  eager      the MoE forward as a per-expert loop in eager PyTorch (softmax/sigmoid router,
             top-k, per-expert GEMMs, index_add combine; shared expert when the spec has one);
  grouped    the same forward with torch._grouped_mm for the expert GEMMs (tokens sorted
             by expert, groups padded to 16 rows);
  dense      one cuBLAS GEMM (torch.mm) with the FLOPs of the routed experts:
             [S*k, H] x [H, F1] then [S*k, F] x [F, H].
Prints one JSON line per (anchor, tokens). Weights are random; only time is measured.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
import yaml


def median_ms(fn, repeat):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = yaml.safe_load(f)
    E, k = spec["num_experts"], spec["num_experts_per_tok"]
    H, Fs = spec["hidden_size"], spec["moe_intermediate_size"]
    gated = spec.get("activation", "swiglu") in ("swiglu", "geglu")
    F1 = 2 * Fs if gated else Fs
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(spec.get("dtype", "bf16"), torch.bfloat16)
    router = spec.get("router", {}) or {}
    sigmoid = router.get("score_function", "softmax") == "sigmoid"
    shared = (spec.get("shared_experts", {}) or {}).get("count", 0)
    shared_f = (spec.get("shared_experts", {}) or {}).get("intermediate_size", 0)
    dev = "cuda"
    torch.manual_seed(0)
    w_router = torch.randn(E, H, device=dev) / H ** 0.5
    w1 = (torch.randn(E, F1, H, device=dev) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, Fs, device=dev) / Fs ** 0.5).to(dtype)
    if shared:
        sw1 = (torch.randn(F1 // Fs * shared_f, H, device=dev) / H ** 0.5).to(dtype)
        sw2 = (torch.randn(H, shared_f, device=dev) / shared_f ** 0.5).to(dtype)

    def act(h):
        if gated:
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        return F.relu(h)

    def route(x):
        logits = x.float() @ w_router.t()
        scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
        weight, idx = scores.topk(k, dim=-1)
        return weight / weight.sum(-1, keepdim=True), idx

    def shared_out(x):
        return (act(x @ sw1.t()) @ sw2.t()).float() if shared else 0.0

    def eager(x):
        weight, idx = route(x)
        y = torch.zeros(x.shape, device=dev, dtype=torch.float32)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            o = act(x[tok] @ w1[e].t()) @ w2[e].t()
            y.index_add_(0, tok, o.float() * weight[tok, slot, None])
        return (y + shared_out(x)).to(dtype)

    w1_t, w2_t = w1.transpose(-2, -1), w2.transpose(-2, -1)  # [E, H, F1], [E, F, H] column-major views

    def grouped(x):
        weight, idx = route(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        padded = (counts + 15) // 16 * 16
        ends = padded.cumsum(0)
        starts = ends - padded
        rank = torch.arange(flat.numel(), device=dev) - (counts.cumsum(0) - counts)[flat[order]]
        rows = starts[flat[order]] + rank
        xs = torch.zeros(int(ends[-1].item()) if E else 0, H, device=dev, dtype=dtype)
        xs[rows] = x[order // k]
        offs = ends.to(torch.int32)
        h = act(torch._grouped_mm(xs, w1_t, offs=offs))
        o = torch._grouped_mm(h, w2_t, offs=offs)
        y = torch.zeros(x.shape, device=dev, dtype=torch.float32)
        y.index_add_(0, order // k, o[rows].float() * weight.flatten()[order, None])
        return (y + shared_out(x)).to(dtype)

    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(tokens, H, device=dev).to(dtype)
        a = torch.randn(tokens * k, H, device=dev).to(dtype)
        b1 = torch.randn(H, F1, device=dev).to(dtype)
        hmid = torch.randn(tokens * k, Fs, device=dev).to(dtype)
        b2 = torch.randn(Fs, H, device=dev).to(dtype)
        runs = {"eager": lambda: eager(x), "grouped": lambda: grouped(x),
                "dense": lambda: (torch.mm(a, b1), torch.mm(hmid, b2))}
        flops = 2.0 * tokens * k * H * (F1 + Fs)
        for name, fn in runs.items():
            if name == "grouped" and dtype != torch.bfloat16:
                continue
            try:
                ms = median_ms(fn, args.repeat)
                print(json.dumps({"spec": spec["name"], "anchor": name, "tokens": tokens, "median_ms": ms,
                                  "expert_flops": flops, "tflops": flops / ms / 1e9}), flush=True)
            except Exception as error:  # an anchor that fails is reported, not fatal
                print(json.dumps({"spec": spec["name"], "anchor": name, "tokens": tokens,
                                  "error": str(error)[:200]}), flush=True)
        del x, a, b1, hmid, b2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
