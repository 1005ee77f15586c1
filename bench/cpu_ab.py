#!/usr/bin/env python3
"""Alternate moegen's forward from two builds of bench/moegen_cpu_bench (before / after a change)
on one shape: both workers stay up, rounds alternate between them, each round's value is the
median of its calls, caches are evicted before every call as in bench/cpu.sh.

  bench/cpu_ab.py --before OLD/moegen_cpu_bench --after NEW/moegen_cpu_bench \
      --spec specs/qwen3-30b-a3b.yaml --dtype bf16 --tokens 1 --threads 1 [--rounds 5 --calls 15]

Build the "before" tree with `git worktree add /tmp/before COMMIT` and the same cmake command
bench/cpu.sh prints in commands.txt (target moegen_cpu_bench)."""
import argparse
import json
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--evict-mb", type=int, default=600)
    ap.add_argument("--variant", help="the same --variant for both builds")
    ap.add_argument("--before-variant", help="--variant for the before worker only (two variants of one build)")
    ap.add_argument("--after-variant", help="--variant for the after worker only")
    args = ap.parse_args()

    workers = {}
    for name in ("before", "after"):
        cmd = [getattr(args, name), args.spec, "--dtype", args.dtype, "--max-tokens", str(args.tokens)]
        variant = getattr(args, f"{name}_variant") or args.variant
        if variant:
            cmd += ["--variant", variant]
        workers[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(proc):
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("a worker exited")
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "error":
                    raise SystemExit(f"worker error: {event}")
                return event

    def ask(proc, command):
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        return reply(proc)

    for proc in workers.values():
        reply(proc)  # "ready"
    for proc in workers.values():
        ask(proc, f"evict {args.evict_mb}")
        ask(proc, f"prepare {args.tokens} {args.threads}")
    medians = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, proc in workers.items():
            ms = ask(proc, f"time moegen {args.calls + 1}")["ms"][1:]  # the first call warms up
            medians[name].append(statistics.median(ms))
    print(f"{args.spec} {args.dtype} S={args.tokens} threads={args.threads}: "
          f"ms per call, median of {args.calls} calls per round")
    for name, values in medians.items():
        print(f"  {name:6s} {' '.join(f'{v:.3f}' for v in values)}   median {statistics.median(values):.3f}")
    for proc in workers.values():
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait()


if __name__ == "__main__":
    main()
