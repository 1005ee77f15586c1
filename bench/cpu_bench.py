#!/usr/bin/env python3
"""cpu_bench.py — the driver of bench/cpu.sh: moegen's CPU forward beside its anchors, in one run.

For every spec (default: specs/*.yaml but the test-* ones), dtype (fp32, bf16), thread count and
token count it times, round-robin in the same run:
  moegen    the public API's forward (moegen_layer_forward) through the C worker moegen_cpu_bench;
  openblas  the per-expert OpenBLAS loop (bench/cpu_bench_blas.c), in the same worker, in the faster
            of its two schedules on the shape (threaded GEMMs, or experts spread over threads);
  ggml      ggml's MUL_MAT_ID graph as llama.cpp builds it (bench/cpu_bench_ggml.c), same worker;
  pytorch   a Hugging Face Mixtral-style sparse MoE block (router linear, softmax, top-k, a loop
            over the experts hit, index_add_) in this process, torch.set_num_threads matching.
PyTorch runs here, on the worker's own tensors: the worker puts every tensor in a memfd that this
process maps, so both see the same weights and no copy is made. Each round runs every
implementation once (a warm-up call, then enough timed calls to fill --target-ms), in an order
that rotates from round to round, with a pause between implementations so that one's spinning
threads (OpenBLAS's for about 0.1 s) do not slow the next. Reported: the median and the IQR of
all timed calls, and ratio = anchor median / moegen median (> 1: moegen is faster).

Every anchor computes its router (logits, softmax, top-k) as part of the timed forward, and then
dispatches the experts by moegen's routing (topk_ids, topk_weights of the same forward), so its
y is checked against moegen's (relative L2 error) before any ratio is shown.

The limits (bench/cpu_limits.c: fp32 FMA, bf16 dot product, AMX, read bandwidth) are measured at
the start and at the end of the run; the best of the two is the limit. Each row's "% of limit" is
floor / median, floor = max(expert weight bytes read / read bandwidth, expert GEMM FLOPs / peak
of the dtype's vector unit) at the row's thread count.
"""
import argparse
import gc
import glob
import json
import mmap
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPLS = ("moegen", "openblas", "ggml", "pytorch")
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}  # relative L2 error of y against moegen's


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_values, q):
    """Linear interpolation between closest ranks; sorted_values is sorted and non-empty."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def parse_list(text, cast=str):
    return [cast(item) for item in text.split(",") if item.strip()]


# ---- the C worker ------------------------------------------------------------------------------


class Worker:
    """moegen_cpu_bench for one spec and dtype, spoken to one JSON line at a time."""

    def __init__(self, exe, spec_path, dtype, max_tokens, stderr, transcript, variant=None):
        self.cmd = [exe, spec_path, "--dtype", dtype, "--max-tokens", str(max_tokens)]
        if variant:
            self.cmd += ["--variant", variant]
        self.transcript = transcript
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, bufsize=1)

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (status {self.proc.wait()}); see its log")
        if self.transcript:
            self.transcript.write(line)
        return json.loads(line)

    def ask(self, command):
        if self.transcript:
            self.transcript.write(json.dumps({"command": command}) + "\n")
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self.read()
        if reply.get("event") == "error":
            raise RuntimeError(reply.get("message"))
        return reply

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the PyTorch anchor ------------------------------------------------------------------------


class TorchTensors:
    """The worker's tensors as torch tensors over the mapped memfd (no copy)."""

    def __init__(self, torch, ready):
        self.torch = torch
        self.file = open(ready["shm"], "r+b")
        self.map = mmap.mmap(self.file.fileno(), ready["shm_bytes"])
        types = {"fp32": torch.float32, "bf16": torch.bfloat16, "int32": torch.int32}
        self.t = {}
        for name, d in ready["tensors"].items():
            count = 1
            for n in d["shape"]:
                count *= n
            flat = torch.frombuffer(self.map, dtype=types[d["dtype"]], count=count, offset=d["offset"])
            self.t[name] = flat.view(*d["shape"])

    def close(self):
        self.t.clear()
        gc.collect()
        self.map.close()
        self.file.close()


class MixtralStyleBlock:
    """The Hugging Face sparse MoE block's forward (Mixtral / Qwen2-MoE style), on S tokens.

    Timed as a whole: router linear (fp32, as moegen's router), softmax, top-k, renormalization;
    then, like the Hugging Face loop, a one-hot mask of the routes, the experts hit, and per expert
    torch.where, the gathered rows, gate/up/down linears, the routing weight and index_add_. The
    routes it dispatches are moegen's (the router's own top-k is computed but not used), so y can
    be checked against moegen's; a route moegen dropped (weight 0) is masked out, as moegen skips
    it. Shared experts as Qwen2-MoE: sigmoid(gate(x)) * shared(x) added to the output."""

    def __init__(self, torch, info, tensors, S):
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        t = tensors.t
        self.E, self.k, self.Fsz = info["E"], info["k"], info["F"]
        self.norm = bool(info["norm_topk_prob"])
        self.gated = info["activation"] in ("swiglu", "geglu")
        act = {"swiglu": F.silu, "silu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
               "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
        self.act = act[info["activation"]]
        self.x = t["x"][:S]
        self.router_w = t["router_w"]
        self.w1, self.w2 = t["w1"], t["w2"]
        ids = t["topk_ids"][:S].to(torch.int64)
        weights = t["topk_weights"][:S].clone()
        self.ids = torch.where(weights != 0, ids, torch.full_like(ids, self.E))  # dropped: class E
        self.weights = weights
        self.shared = []
        if info["n_shared"]:
            for i in range(info["n_shared"]):
                self.shared.append((t["shared_w1"][i], t["shared_w2"][i], info["Fs"]))
        self.shared_gate = t.get("shared_gate")

    def ffn(self, cur, w1, w2, f):
        F = self.F
        if self.gated:
            h = self.act(F.linear(cur, w1[:f])) * F.linear(cur, w1[f:])
        else:
            h = self.act(F.linear(cur, w1))
        return F.linear(h, w2)

    def __call__(self):
        torch, F = self.torch, self.F
        x = self.x
        logits = F.linear(x.float(), self.router_w)
        probs = F.softmax(logits, dim=-1)
        own_w, own_ids = torch.topk(probs, self.k, dim=-1)
        if self.norm:
            own_w = own_w / own_w.sum(dim=-1, keepdim=True)
        routing_weights = self.weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(self.ids, num_classes=self.E + 1).permute(2, 1, 0)  # [E + 1, k, S]
        hit = torch.greater(mask[:self.E].sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            idx, top_x = torch.where(mask[e])
            cur = x[top_x]
            o = self.ffn(cur, self.w1[e], self.w2[e], self.Fsz) * routing_weights[top_x, idx, None]
            out.index_add_(0, top_x, o.to(x.dtype))
        for w1, w2, f in self.shared:
            so = self.ffn(x, w1, w2, f)
            if self.shared_gate is not None:
                so = torch.sigmoid(F.linear(x.float(), self.shared_gate[None, :])).to(x.dtype) * so
            out = out + so
        return out


def torch_rel_err(torch, y, ref):
    diff = (y.double() - ref.double()).norm()
    norm = ref.double().norm()
    return float(diff / norm) if norm > 0 else float(diff)


# ---- the run -----------------------------------------------------------------------------------


def measure_limits(exe, threads, raw):
    cmd = [exe, "--threads", ",".join(map(str, threads))]
    log("limits: " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if raw:
        raw.write(res.stdout)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log(f"limits: failed ({res.stderr.strip()})")
        return {}


def best_limits(a, b):
    """The larger of two measurements, key by key and thread count by thread count."""
    out = {}
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) or isinstance(vb, dict):
            va, vb = va or {}, vb or {}
            out[key] = {t: max(va.get(t, 0.0), vb.get(t, 0.0)) for t in set(va) | set(vb)}
        else:
            out[key] = va if va is not None else vb
    return out


def expert_flops_per_token(info):
    H, F, F1, k = info["H"], info["F"], info["F1"], info["k"]
    Fs = info["Fs"]
    F1s = 2 * Fs if info["activation"] in ("swiglu", "geglu") else Fs
    return k * (2 * H * F1 + 2 * F * H) + info["n_shared"] * (2 * H * F1s + 2 * Fs * H)


def floor_of(row, limits, dtype, threads):
    """(floor ms, which bound) from the expert bytes and FLOPs, or (None, why)."""
    t = str(threads)
    bw = (limits.get("read_gbs") or {}).get(t)
    peak_key = "bf16_dp_gflops" if dtype == "bf16" and limits.get("bf16_dp_gflops") else "fp32_fma_gflops"
    peak = (limits.get(peak_key) or {}).get(t)
    if not bw or not peak:
        return None, f"no limits measured at {threads} threads"
    mem_ms = row["expert_bytes"] / (bw * 1e9) * 1e3
    cmp_ms = row["expert_flops"] / (peak * 1e9) * 1e3
    if mem_ms >= cmp_ms:
        return mem_ms, "mem"
    return cmp_ms, "bf16 dp" if peak_key == "bf16_dp_gflops" else "fp32 FMA"


def time_round(impl, worker, block, reps, warm):
    """Timed calls of one implementation (ms), after `warm` untimed ones."""
    if impl == "pytorch":
        torch = block.torch
        out = []
        with torch.inference_mode():
            for i in range(warm + reps):
                if block.evict is not None:  # --evict-mb, as the worker does for the others
                    block.evict += 1
                t0 = time.perf_counter()
                block.last = block()
                dt = (time.perf_counter() - t0) * 1e3
                if i >= warm:
                    out.append(dt)
        return out
    reply = worker.ask(f"time {impl} {warm + reps}")
    return reply["ms"][warm:]


def run_shape(args, worker, info, tensors, torch, S, T, raw):
    """All implementations on one shape, round-robin; the rows of the table."""
    prep = worker.ask(f"prepare {S} {T}")
    first = dict(prep["first_ms"])
    relerr = dict(prep["relerr"])
    unavailable = dict(prep.get("unavailable", {}))
    block = None
    if torch is not None:
        try:
            torch.set_num_threads(T)
            block = MixtralStyleBlock(torch, info, tensors, S)
            block.evict = (torch.zeros(args.evict_mb << 18, dtype=torch.float32) if args.evict_mb else None)
            with torch.inference_mode():
                t0 = time.perf_counter()
                y = block()
                first["pytorch"] = (time.perf_counter() - t0) * 1e3
                ref = tensors.t["y"][:S]
                relerr["pytorch"] = torch_rel_err(torch, y, ref)
            del y
        except Exception as exc:  # a broken anchor is reported, not fatal
            unavailable["pytorch"] = f"failed: {exc}"
            block = None
    elif args.torch_why:
        unavailable["pytorch"] = args.torch_why
    impls = [i for i in IMPLS if i in first]
    # a reasonable number of calls per round: about target_ms of work, at least one
    reps = {i: max(1, min(args.max_reps, int(args.target_ms / max(first[i], 1e-3)))) for i in impls}
    slowest = max(first[i] for i in impls)
    rounds = args.rounds if slowest < 2000 else min(args.rounds, 3)
    samples = {i: [] for i in impls}
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            warm = 1 if first[impl] < 1000 else 0
            samples[impl] += time_round(impl, worker, block, reps[impl], warm)
            time.sleep(args.settle_ms / 1e3 * (4 if impl == "openblas" else 1))
    # the outputs of the last timed calls, checked again (a later call may differ from the first)
    relerr_last = dict(worker.ask("check")["relerr"])
    if block is not None:
        relerr_last["pytorch"] = torch_rel_err(torch, block.last, tensors.t["y"][:S])
        block.last = None
    if raw:
        raw.write(json.dumps({"tokens": S, "threads": T, "first_ms": first, "samples_ms": samples,
                              "relerr_last": relerr_last}) + "\n")
    rows = []
    moegen_median = None
    for impl in impls:
        v = sorted(samples[impl])
        med = percentile(v, 0.5)
        if impl == "moegen":
            moegen_median = med
        rows.append({"impl": impl, "median_ms": med, "p25_ms": percentile(v, 0.25), "p75_ms": percentile(v, 0.75),
                     "min_ms": v[0], "max_ms": v[-1], "n": len(v), "rounds": rounds,
                     "relerr": relerr.get(impl), "relerr_last": relerr_last.get(impl)})
    for impl, why in unavailable.items():
        rows.append({"impl": impl, "unavailable": why})
    for row in rows:
        if row["impl"] == "openblas":
            row["openblas_schedule"] = prep.get("openblas_schedule")
            row["openblas_schedule_ms"] = prep.get("openblas_schedule_ms")
        row.update({"tokens": S, "threads": T, "expert_flops": prep["expert_flops"],
                    "expert_bytes": prep["expert_bytes"], "kept_routes": prep["kept_routes"],
                    "touched_experts": prep["touched_experts"],
                    # a layer with several variants (tuning ranges) names them all in `tuning`
                    "variant": prep["variant"] if prep.get("n_variants", 1) == 1 else prep["tuning"]})
        if "median_ms" in row and moegen_median:
            row["ratio"] = row["median_ms"] / moegen_median
    return rows


def spec_list(args):
    if args.specs:
        out = []
        for name in parse_list(args.specs):
            path = name if os.path.exists(name) else os.path.join(ROOT, "specs", name + ".yaml")
            if not os.path.exists(path):
                sys.exit(f"cpu_bench: no spec {name} (looked for {path})")
            out.append(path)
        return out
    paths = sorted(glob.glob(os.path.join(ROOT, "specs", "*.yaml")))
    return [p for p in paths if not os.path.basename(p).startswith("test-")]


def fmt_ms(v):
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def table(rows, limits):
    lines = ["| spec | dtype | S | thr | impl | median ms | IQR ms | anchor / moegen | rel err | GFLOP/s | "
             "% of limit |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['spec']} | {r['dtype']} | {r['tokens']} | {r['threads']} | {r.get('label', r['impl'])} |"
        if "median_ms" not in r:
            lines.append(head + f" — | — | — | — | — | — |  *{r['unavailable']}*")
            continue
        ratio = "—" if r["impl"] == "moegen" else f"{r['ratio']:.2f}"
        err = "" if r.get("relerr") is None else f"{max(r['relerr'], r.get('relerr_last') or 0.0):.1e}"
        if r.get("wrong"):
            ratio = "(wrong y)"
            err += " **WRONG**"
        gflops = r["expert_flops"] / (r["median_ms"] * 1e-3) / 1e9
        pct = "—" if r.get("floor_ms") is None else f"{100 * r['floor_ms'] / r['median_ms']:.0f}% {r['bound']}"
        lines.append(head + f" {fmt_ms(r['median_ms'])} | {fmt_ms(r['p25_ms'])}–{fmt_ms(r['p75_ms'])} | {ratio} | "
                     f"{err} | {gflops:.1f} | {pct} |")
    return "\n".join(lines)


def limits_table(start, end, threads):
    keys = [("fp32_fma_gflops", "fp32 FMA GFLOP/s"), ("bf16_dp_gflops", "bf16 vdpbf16ps GFLOP/s"),
            ("amx_bf16_gflops", "AMX bf16 GFLOP/s"), ("read_gbs", "read GB/s")]
    lines = ["| limit | " + " | ".join(f"{t} thr (start / end)" for t in threads) + " |",
             "|---|" + "---:|" * len(threads)]
    for key, label in keys:
        a, b = start.get(key) or {}, end.get(key) or {}
        if not a and not b:
            why = start.get("amx_skipped") if key == "amx_bf16_gflops" else start.get("bf16_dp_skipped")
            lines.append(f"| {label} | skipped: {why or 'not measured'} |")
            continue
        cells = [f"{a.get(str(t), 0):.1f} / {b.get(str(t), 0):.1f}" for t in threads]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(torch):
    lines = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", f"host: {platform.node()}",
             f"kernel: {platform.release()}", f"python: {platform.python_version()}"]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.split(":")[0].strip() in ("Model name", "CPU family", "Model", "Stepping", "CPU(s)",
                                              "Thread(s) per core", "L2 cache", "L3 cache", "Hypervisor vendor",
                                              "NUMA node(s)", "BogoMIPS"):
                lines.append("lscpu " + " ".join(line.split()))
            if line.startswith("Flags:"):
                flags = set(line.split()[1:])
                want = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                        "amx_tile", "amx_bf16", "amx_int8"]
                lines.append("flags present: " + " ".join(f for f in want if f in flags))
                lines.append("flags absent: " + " ".join(f for f in want if f not in flags))
                lines.append("all flags: " + " ".join(sorted(flags)))
    except OSError:
        lines.append("lscpu: not available")
    try:
        with open("/proc/meminfo") as f:
            lines.append("memory: " + " ".join(f.readline().split()[1:]))
    except OSError:
        pass
    for label, cmd in (("cc", ["cc", "--version"]), ("git", ["git", "-C", ROOT, "rev-parse", "HEAD"]),
                       ("openblas", ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "libopenblas0-pthread"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
            lines += [f"{label}: {out[0]}"] if out else []
        except OSError:
            pass
    lines.append("ggml source: " + os.environ.get("MOEGEN_GGML_SOURCE", "unknown (cpu_bench.py run without cpu.sh)"))
    if torch is not None:
        lines.append(f"torch: {torch.__version__}")
        lines += ["torch config: " + line for line in torch.__config__.show().splitlines()[:8]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--specs", help="comma-separated spec names (specs/NAME.yaml) or paths; default: all but test-*")
    ap.add_argument("--dtypes", default="fp32,bf16", help="layer dtypes (the spec's dtype is overridden)")
    ap.add_argument("--variant", action="append", default=[], metavar="DTYPE:LIST",
                    help="moegen's kernel variant overrides for the layers of one dtype, e.g. "
                         "fp32:gemm=outer,tile_cols=6,tile_rows=4,block_rows=128,block_cols=96 (repeatable; "
                         "default: the layer's own choice, tuning databases included)")
    ap.add_argument("--tokens", default="1,16,128,1024,4096", help="token counts S")
    ap.add_argument("--threads", default="1,2", help="thread counts (every implementation gets the same)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every implementation (3 for calls over 2 s)")
    ap.add_argument("--target-ms", type=float, default=300.0, help="timed work per implementation and round")
    ap.add_argument("--max-reps", type=int, default=20, help="most timed calls per implementation and round")
    ap.add_argument("--settle-ms", type=float, default=50.0,
                    help="pause after each implementation's calls (4x after OpenBLAS, whose threads spin)")
    ap.add_argument("--max-gflop", type=float, default=1000.0,
                    help="skip shapes whose expert GEMMs exceed this many GFLOP per call (0: no limit)")
    ap.add_argument("--quick", action="store_true",
                    help="demo + qwen3-30b-a3b, S in {1, 128}, 3 rounds: a sanity run of a few minutes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    ap.add_argument("--evict-mb", type=int, default=0,
                    help="before every timed call, every implementation writes a buffer of this many MiB "
                         "(make it over the last-level cache): cold-cache timings, as in a model whose other "
                         "layers run between two calls of this one; 0: warm (default: %(default)s)")
    ap.add_argument("--out", help="folder for results.md, rows.jsonl, limits, raw logs, commands and machine info")
    ap.add_argument("--json", help="the JSON lines file (OUT/rows.jsonl with --out, else build-bench/cpu-bench.jsonl)")
    ap.add_argument("--worker", default=os.path.join(ROOT, "build-bench", "moegen", "moegen_cpu_bench"),
                    help="the C worker (bench/cpu.sh builds it)")
    ap.add_argument("--limits", default=os.path.join(ROOT, "build-bench", "moegen", "moegen_cpu_limits"),
                    help="the limit probe (bench/cpu.sh builds it)")
    args = ap.parse_args()
    if args.quick:
        args.specs = args.specs or "demo,qwen3-30b-a3b"
        args.tokens = "1,128"
        args.rounds = min(args.rounds, 3)
        args.target_ms = min(args.target_ms, 150.0)
    tokens = parse_list(args.tokens, int)
    threads = parse_list(args.threads, int)
    dtypes = parse_list(args.dtypes)
    variant_overrides = {}
    for item in args.variant:
        dtype, sep, overrides = item.partition(":")
        if not sep or dtype not in ("fp32", "bf16") or not overrides:
            ap.error(f"--variant {item!r}: expected DTYPE:LIST, e.g. fp32:gemm=outer")
        variant_overrides[dtype] = overrides
    specs = spec_list(args)

    out = args.out
    if out:
        os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    json_path = args.json or (os.path.join(out, "rows.jsonl") if out else os.path.join(ROOT, "build-bench",
                                                                                        "cpu-bench.jsonl"))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    json_file = open(json_path, "w")
    raw_limits = open(os.path.join(out, "raw", "limits.jsonl"), "w") if out else None

    torch = None
    args.torch_why = None
    if args.no_torch:
        args.torch_why = "skipped (--no-torch)"
    else:
        try:
            import torch as torch_module
            torch = torch_module
        except Exception as exc:
            args.torch_why = f"PyTorch not importable ({exc})"
            log("cpu_bench: " + args.torch_why + "; the pytorch rows are skipped")
    if out:
        with open(os.path.join(out, "machine.txt"), "w") as f:
            f.write(machine_info(torch))

    t_start = time.time()
    limits_start = measure_limits(args.limits, threads, raw_limits)
    all_rows = []
    notes = []
    for spec_path in specs:
        spec_name = os.path.splitext(os.path.basename(spec_path))[0]
        for dtype in dtypes:
            tag = f"{spec_name}-{dtype}"
            err_log = open(os.path.join(out, "raw", tag + ".worker.log") if out else os.devnull, "w")
            transcript = open(os.path.join(out, "raw", tag + ".jsonl"), "w") if out else None
            variant = variant_overrides.get(dtype)
            worker = Worker(args.worker, spec_path, dtype, max(tokens), err_log, transcript, variant)
            log(f"== {spec_name} {dtype}: " + " ".join(shlex.quote(c) for c in worker.cmd))
            tensors = None
            try:
                ready = worker.read()
                if ready["event"] != "ready":
                    notes.append(f"{spec_name} {dtype}: skipped: {ready.get('message')}")
                    log("   " + notes[-1])
                    continue
                if args.evict_mb:
                    worker.ask(f"evict {args.evict_mb}")
                notes.append(f"{spec_name} {dtype}: E={ready['E']} k={ready['k']} H={ready['H']} F={ready['F']} "
                             f"{ready['activation']}, {ready['n_shared']} shared, capacity {ready['capacity']}; "
                             f"openblas: {ready['openblas']}; {ready['ggml']}")
                if torch is not None:
                    tensors = TorchTensors(torch, ready)
                per_token = expert_flops_per_token(ready)
                variants = set()
                for T in threads:
                    for S in tokens:
                        if args.max_gflop > 0 and S * per_token > args.max_gflop * 1e9:
                            notes.append(f"{spec_name} {dtype} S={S} thr={T}: skipped, about "
                                         f"{S * per_token / 1e9:.0f} GFLOP per call > --max-gflop "
                                         f"{args.max_gflop:g}")
                            log("   " + notes[-1])
                            continue
                        t0 = time.time()
                        rows = run_shape(args, worker, ready, tensors, torch, S, T, transcript)
                        for row in rows:
                            row.update({"spec": spec_name, "dtype": dtype})
                            if row["impl"] == "openblas" and "median_ms" in row:
                                how = []
                                if "converted" in ready["openblas"]:
                                    how.append("fp32 weights")  # no cblas_sbgemm: fp32 copies
                                if T > 1:
                                    how.append(row["openblas_schedule"])
                                row["label"] = "openblas" + (f" ({', '.join(how)})" if how else "")
                            variants.add(row["variant"])
                        all_rows += rows
                        summary = ", ".join(f"{r['impl']} {fmt_ms(r['median_ms'])} ms" +
                                            (f" (x{r['ratio']:.2f}, err {r['relerr']:.0e})"
                                             if r["impl"] != "moegen" else "")
                                            for r in rows if "median_ms" in r)
                        log(f"   S={S} thr={T}: {summary}  [{time.time() - t0:.0f} s]")
                notes.append(f"{spec_name} {dtype}: moegen variant " + ", ".join(sorted(variants)))
            except (RuntimeError, ValueError, KeyError) as exc:
                notes.append(f"{spec_name} {dtype}: stopped: {exc}")
                log("   " + notes[-1])
            finally:
                if tensors is not None:
                    tensors.close()
                worker.close()
                err_log.close()
                if transcript:
                    transcript.close()

    limits_end = measure_limits(args.limits, threads, raw_limits)
    limits = best_limits(limits_start, limits_end)
    for row in all_rows:  # the floor against the best of both limit measurements; the checks
        if "median_ms" in row:
            row["floor_ms"], row["bound"] = floor_of(row, limits, row["dtype"], row["threads"])
            if row["floor_ms"] is not None:
                row["pct_of_limit"] = 100 * row["floor_ms"] / row["median_ms"]
            amx = (limits.get("amx_bf16_gflops") or {}).get(str(row["threads"]))
            if amx and row["dtype"] == "bf16":
                row["pct_of_amx_peak"] = 100 * row["expert_flops"] / (amx * 1e9) / (row["median_ms"] * 1e-3)
            if row.get("relerr") is not None and row["impl"] != "moegen":
                worst = max(row["relerr"], row.get("relerr_last") or 0.0)
                row["wrong"] = not (worst <= TOLERANCE[row["dtype"]])
        json_file.write(json.dumps(row) + "\n")
    json_file.close()
    if raw_limits:
        raw_limits.close()

    minutes = (time.time() - t_start) / 60
    report = ["## moegen CPU forward vs anchors", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min. Median and IQR of all timed "
              "calls over the rounds; anchor / moegen = anchor median / moegen median (> 1: moegen faster); rel err = "
              "||y - y_moegen|| / ||y_moegen||, the worse of the first and the last call (tolerance fp32 1e-3, bf16 "
              "3e-2; beyond it the ratio is not shown). GFLOP/s and % of limit count the expert GEMMs only (routed "
              "rows moegen kept, and shared experts); % of limit = floor / median, floor = max(expert weight bytes "
              "touched / read bandwidth [mem], expert FLOPs / the dtype's vector peak [fp32 FMA, bf16 dp]) at the "
              "row's threads. Over 100 % means the floor does not bind: weights resident in the 300 MiB L3 (small "
              "layers), or matrix units beyond the vector peak (AMX, used by oneDNN for PyTorch bf16).", "",
              "Machine limits (bench/cpu_limits.c), measured at the start and end of the run; the best is used:", "",
              limits_table(limits_start, limits_end, threads), "", table(all_rows, limits), "", "Notes:", ""]
    report += [f"- {n}" for n in notes]
    report += ["- every anchor's timed call includes its router (logits, softmax, top-k); experts are dispatched by "
               "moegen's routing of the same forward.",
               "- pytorch: Hugging Face Mixtral-style block in eager mode (router in fp32; per-expert loop with "
               "index_add_), in the driver process on the worker's memory (no copy).",
               "- ggml: llama.cpp's MoE FFN graph (merged gate_up mul_mat_id, swiglu_split, down mul_mat_id, weighted "
               "sum over k); fp32 activations; only ggml_graph_compute is timed. It computes routes moegen dropped "
               "(weight 0): llama.cpp has no capacity. Built from "
               + os.environ.get("MOEGEN_GGML_SOURCE", "(unknown: run through bench/cpu.sh)") + ".",
               "- openblas: the per-expert loop (cblas_sgemv for one-row experts). On 2+ threads both schedules are "
               "tried at set-up and the faster kept (named in the row): gemm-threads (OpenBLAS threads each GEMM) or "
               "experts-parallel (OpenMP threads take whole experts, single-threaded OpenBLAS).",
               "- implementations alternate round-robin inside each shape (rotating order); PyTorch in the driver "
               "process, the C implementations in the worker process, one at a time."]
    text = "\n".join(report) + "\n"
    print(text)
    if out:
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(text)
    log(f"cpu_bench: {len(all_rows)} rows in {json_path}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
