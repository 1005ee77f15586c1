#!/usr/bin/env python3
"""ep_cost_model.py — the all-to-all traffic of moegen's expert parallelism, per rank and per
forward, and what it predicts on NVLink and InfiniBand for the shipped real specs.

Model (docs/expert-parallel.md): with S tokens per rank, top-k routing spread evenly over
the E experts (dropless), a rank keeps (P-1)/P of its S*k routes for other ranks. It sends
each such row once in the layer dtype (H*elem bytes) and gets its expert output back in
fp32 (H*4 bytes); it receives and returns as many for its own experts. Counts cost
8*(E/P)*(P-1) bytes each way. Time = bytes out / per-GPU bandwidth + 4 collectives x latency.

  bench/ep_cost_model.py                 the table of the docs (S = 1, 128, 4096 tokens per rank)
  bench/ep_cost_model.py --tokens 2048   another token count
"""
import argparse
import os
import re

# Per-GPU all-to-all bandwidth one direction (bytes/s) and per-collective latency (s).
# NVLink: H100/H200 SXM NVLink 4 gives 450 GB/s per direction per GPU; all-to-all inside an
# 8-GPU node reaches roughly 75% of it. InfiniBand NDR: 400 Gb/s = 50 GB/s per GPU with one
# NIC per GPU; inter-node all-to-all reaches roughly 80% of it.
LINKS = {
    "NVLink (8 GPUs, one node)": (0.75 * 450e9, 10e-6),
    "InfiniBand NDR (1 NIC/GPU)": (0.80 * 50e9, 20e-6),
}
ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}


def read_spec(path):
    """The few integer and enum fields the model needs, from a shipped spec (flat YAML keys)."""
    fields = {}
    for line in open(path):
        m = re.match(r"^([a-z_]+):\s*([A-Za-z0-9_.-]+)\s*(#.*)?$", line)
        if m:
            fields[m.group(1)] = m.group(2)
    return {
        "name": fields["name"],
        "E": int(fields["num_experts"]),
        "k": int(fields["num_experts_per_tok"]),
        "H": int(fields["hidden_size"]),
        "dtype": fields.get("dtype", "bf16"),
    }


def traffic(spec, P, S):
    """Bytes one rank sends (= receives, balanced) per forward."""
    E, k, H = spec["E"], spec["k"], spec["H"]
    rows = S * k * (P - 1) / P
    counts = 8 * (E // P) * (P - 1)
    return counts + rows * H * ELEM[spec["dtype"]] + rows * H * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 128, 4096])
    args = parser.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "specs")
    names = ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "deepseek-v3", "switch-base-8"]
    print("| spec (E, k, H, dtype) | P | tokens/rank | sent per rank | NVLink | InfiniBand |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        spec = read_spec(os.path.join(root, name + ".yaml"))
        for P in (8, 64, 256):
            if spec["E"] % P:
                print(f"| {name} ({spec['E']}, {spec['k']}, {spec['H']}, {spec['dtype']}) | {P} | | "
                      f"E is not a multiple of P | | |")
                continue
            for S in args.tokens:
                b = traffic(spec, P, S)
                times = []
                for bandwidth, latency in LINKS.values():
                    times.append(b / bandwidth + 4 * latency)
                link = "n/a (P > 8)" if P > 8 else f"{times[0] * 1e3:.3f} ms"
                print(f"| {name} ({spec['E']}, {spec['k']}, {spec['H']}, {spec['dtype']}) | {P} | {S} | "
                      f"{b / 1e6:.3f} MB | {link} | {times[1] * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
