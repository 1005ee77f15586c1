#!/usr/bin/env python3
"""report.py — join moegen's and the anchors' JSON lines into one markdown table.

usage: report.py RESULT_DIR   (reads *.moegen.jsonl and *.anchors.jsonl, writes results.md)
"""
import glob
import json
import os
import sys


def load(pattern):
    rows = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    return rows


def main():
    out = sys.argv[1]
    moegen = load(os.path.join(out, "*.moegen.jsonl"))
    anchors = {(r["spec"], r["anchor"], r["tokens"]): r for r in load(os.path.join(out, "*.anchors.jsonl"))}
    lines = ["| spec | tokens | moegen | TFLOP/s | TB/s | % of floor | eager loop | torch._grouped_mm | dense cuBLAS | vs grouped_mm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in moegen:
        ms = r["median_ms"]

        def anchor(name):
            a = anchors.get((r["spec"], name, r["tokens"]))
            if not a:
                return "—", None
            if "error" in a:
                return "error", None
            return "%.3f ms" % a["median_ms"], a["median_ms"]

        eager, _ = anchor("eager")
        grouped, grouped_ms = anchor("grouped")
        dense, _ = anchor("dense")
        ratio = "%.2fx" % (grouped_ms / ms) if grouped_ms else "—"
        floor = 100.0 * r["floor_ms"] / ms if r.get("floor_ms") else 0.0
        lines.append("| %s | %d | %.3f ms | %.1f | %.2f | %.1f%% | %s | %s | %s | %s |" % (
            r["spec"], r["tokens"], ms, r["flops"] / ms / 1e9, r["bytes"] / ms / 1e9, floor, eager, grouped,
            dense, ratio))
    compile_lines = ["", "| spec | cold compile (NVRTC, empty cache) | warm load (cache hit) |", "|---|---:|---:|"]
    times = {}
    for r in moegen + load(os.path.join(out, "*.cold.jsonl")):
        times.setdefault(r["spec"], {})["warm" if r["cache_hit"] else "cold"] = r["compile_ms"]
    for spec, t in times.items():
        compile_lines.append("| %s | %s | %s |" % (spec, "%.0f ms" % t["cold"] if "cold" in t else "—",
                                                 "%.1f ms" % t["warm"] if "warm" in t else "—"))
    text = "\n".join(lines + compile_lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
