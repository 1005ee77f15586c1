#!/usr/bin/env python3
"""train_bench.py — the driver of bench/train.sh: moegen's CPU training backward against its forward and
against PyTorch CPU autograd of the equivalent eager MoE block, in one run.

For every spec (default: specs/*.yaml but the test-* ones), dtype, thread count and token count it times,
alternating in the same run:
  moegen   through the C worker moegen_train_bench: the inference forward (moegen_layer_forward), the
           training forward (moegen_layer_forward_train) and the backward (moegen_layer_backward: dx and
           every weight gradient, fp32, accumulate = 0), one training step after the other; with the split
           timing (default on) also the weights phase alone (moegen_layer_backward_weights), once
           overwriting the gradients (accumulate = 0) and once adding to them (accumulate = 1), which
           tells the data phase (dx, per-row gradients) from the weight gradients and from the clearing
           of the gradient buffers;
  pytorch  a Hugging Face Mixtral / Qwen2-MoE style eager block in this process: router linear in fp32,
           softmax (or sigmoid), top-k, renormalization as the spec says, a loop over the experts hit with
           torch.where / indexing / three nn.Linear-style matmuls per expert (gate, up, down as separate
           per-expert parameters, as Hugging Face's expert modules hold them) / activation / routing
           weight / index_add_, shared experts (with their sigmoid gate) when the spec has them, and the
           spec's load-balancing loss; timed: the forward with autograd recording (plus the loss
           (y * dy).sum() + aux_coeff * aux_loss), then loss.backward(). Gradients are set to None between
           steps (optimizer.zero_grad()'s default), outside the timing.
PyTorch runs on the worker's own memory (a memfd this process maps: same weights, x and dy, no copy) and
dispatches moegen's routing of the same forward (the experts moegen chose, routes moegen's capacity
dropped masked out) with its own differentiable router weights gathered at those experts, so both do the
same expert work; its own top-k is computed (timed) for the aux loss counts. Before any time is shown,
PyTorch's dx and weight gradients are checked against moegen's (relative L2 error per tensor, over the
experts hit).

Reported per shape: medians of all timed steps; backward / forward = moegen backward / moegen inference
forward; bwd speed-up = PyTorch backward / moegen backward; step speed-up = (PyTorch forward + backward) /
(moegen forward_train + backward) (> 1: moegen faster).
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
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}  # relative L2 error of PyTorch's gradients against moegen's


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_values, q):
    """Linear interpolation between closest ranks; sorted_values is sorted and non-empty."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values):
    return percentile(sorted(values), 0.5)


def parse_list(text, cast=str):
    return [cast(item) for item in text.split(",") if item.strip()]


def fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


# ---- other load on the machine -------------------------------------------------------------------


class LoadMeter:
    """CPU time the rest of the machine used while we measured, in cores: (all busy jiffies in
    /proc/stat - this process's and the worker's) / wall time. A timing of T threads on a 2-core machine
    whose other core is busy is not a timing of T threads (OpenMP barriers wait for a descheduled
    thread), so each batch of timed steps waits for a quiet machine first and records this."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, pids):
        self.pids = pids

    def _busy(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq

    def _ours(self):
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def start(self):
        self.t0, self.b0, self.o0 = time.time(), self._busy(), self._ours()

    def stop(self, min_s=0.0):
        """Other load in cores since start(); None when under min_s passed (jiffies are 10 ms)."""
        dt = max(time.time() - self.t0, 1e-3)
        if dt < min_s:
            return None
        return max(0.0, ((self._busy() - self.b0) - (self._ours() - self.o0)) / self.HZ / dt)

    def wait_quiet(self, max_s, threshold=0.25, window=0.5):
        """Wait until one window shows under `threshold` cores of other load (at most max_s); seconds waited."""
        t_begin = time.time()
        while True:
            self.start()
            time.sleep(window)
            if self.stop() < threshold or time.time() - t_begin >= max_s:
                return time.time() - t_begin


# ---- the C worker ------------------------------------------------------------------------------


class Worker:
    """moegen_train_bench for one spec and dtype, spoken to one JSON line at a time."""

    def __init__(self, cmd, stderr, transcript):
        self.cmd = cmd
        self.transcript = transcript
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     bufsize=1)

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (status {self.proc.wait()}); see its log")
        if self.transcript:
            self.transcript.write(line)
            self.transcript.flush()
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
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the PyTorch anchor ------------------------------------------------------------------------


class SharedMemory:
    """The worker's tensors, gradients and outputs as torch tensors over the mapped memfd (no copy)."""

    def __init__(self, torch, ready):
        self.file = open(ready["shm"], "r+b")
        self.map = mmap.mmap(self.file.fileno(), ready["shm_bytes"])
        types = {"fp32": torch.float32, "bf16": torch.bfloat16, "int32": torch.int32}

        def view(d):
            count = 1
            for n in d["shape"]:
                count *= n
            return torch.frombuffer(self.map, dtype=types[d["dtype"]], count=count, offset=d["offset"]).view(
                *d["shape"])

        self.t = {name: view(d) for name, d in ready["tensors"].items()}
        self.g = {name: view(d) for name, d in ready["grads"].items()}
        for name in ("dy", "dx", "y", "topk_ids", "topk_weights"):
            self.t[name] = view(ready[name])

    def close(self):
        self.t.clear()
        self.g.clear()
        gc.collect()
        self.map.close()
        self.file.close()


def jitter_multipliers(torch, S, H, eps, seed, offset=0):
    """numerics.md §1.1 and §5: m = (1 - eps) + u(seed, offset, 1, t*H + h) * 2 eps, fp32, [S][H]."""
    import numpy as np

    def mix(z):
        z = z + np.uint64(0x9e3779b97f4a7c15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xbf58476d1ce4e5b9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94d049bb133111eb)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        index = np.arange(S * H, dtype=np.uint64)
        r = mix(np.uint64(seed) ^ mix(np.uint64(offset) ^ mix(np.uint64(1) ^ mix(index))))
        u = ((r >> np.uint64(41)) * np.uint64(2) + np.uint64(1)).astype(np.float32) * np.float32(2.0 ** -24)
    m = np.float32(1.0 - eps) + u * np.float32(2.0 * eps)
    return torch.from_numpy(m.astype(np.float32).reshape(S, H))


class EagerMoE:
    """The eager MoE block (see the module docstring), its parameters as leaves over the memfd."""

    def __init__(self, torch, info, shm, S):
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        t = shm.t
        self.S, self.E, self.k, self.Fsz, self.H = S, info["E"], info["k"], info["F"], info["H"]
        self.info = info
        self.gated = info["activation"] in ("swiglu", "geglu")
        act = {"swiglu": F.silu, "silu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
               "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
        self.act = act[info["activation"]]

        def leaf(v):
            return v.detach().requires_grad_(True)

        self.x = leaf(t["x"][:S])
        self.dy = t["dy"][:S]
        self.router_w = leaf(t["router_w"])
        self.score_bias = t.get("score_bias")
        f = self.Fsz
        self.experts = []  # per expert: (gate, up, down) or (fc1, None, fc2), as HF's expert modules
        for e in range(self.E):
            w1, w2 = t["w1"][e], t["w2"][e]
            if self.gated:
                self.experts.append((leaf(w1[:f]), leaf(w1[f:]), leaf(w2)))
            else:
                self.experts.append((leaf(w1), None, leaf(w2)))
        self.shared = []
        for i in range(info["n_shared"]):
            w1, w2, fs = t["shared_w1"][i], t["shared_w2"][i], info["Fs"]
            if self.gated:
                self.shared.append((leaf(w1[:fs]), leaf(w1[fs:]), leaf(w2)))
            else:
                self.shared.append((leaf(w1), None, leaf(w2)))
        self.shared_gate = leaf(t["shared_gate"]) if "shared_gate" in t else None
        # moegen's routing of the same forward: the experts chosen; a route its capacity dropped
        # (weight 0) goes to the extra class E, which no expert takes
        ids = t["topk_ids"][:S].to(torch.int64)
        kept = t["topk_weights"][:S] != 0
        self.ids = ids
        self.kept = kept.to(torch.float32)
        self.ids_kept = torch.where(kept, ids, torch.full_like(ids, self.E))
        self.any_dropped = bool((~kept).any())
        self.jitter = None
        if info["mode"] == "train" and info["input_jitter"] > 0:
            self.jitter = jitter_multipliers(torch, S, self.H, info["input_jitter"], int(info["seed"]))

    def params(self):
        out = [self.x, self.router_w]
        for group in (self.experts, self.shared):
            for trio in group:
                out += [p for p in trio if p is not None]
        if self.shared_gate is not None:
            out.append(self.shared_gate)
        return out

    def zero_grad(self):
        for p in self.params():
            p.grad = None

    def ffn(self, cur, trio):
        F = self.F
        a, b, c = trio
        if b is not None:
            h = self.act(F.linear(cur, a)) * F.linear(cur, b)
        else:
            h = self.act(F.linear(cur, a))
        return F.linear(h, c)

    def forward(self):
        """y and the loss (y * dy).sum() + aux_coeff * aux_loss."""
        torch, F, info = self.torch, self.F, self.info
        x, E, k, S = self.x, self.E, self.k, self.S
        xr = x.float()
        if self.jitter is not None:  # HF Switch: the router's input times uniform(1 - eps, 1 + eps)
            xr = xr * self.jitter
        logits = F.linear(xr, self.router_w)
        if info["score_function"] == "softmax":
            scores = F.softmax(logits, dim=-1)
            sel = logits if info["order"] == "topk_then_softmax" else scores
        elif info["score_function"] == "sigmoid":
            scores = torch.sigmoid(logits)
            sel = scores + self.score_bias if self.score_bias is not None else scores
        else:
            scores = torch.sqrt(F.softplus(logits))
            sel = scores + self.score_bias if self.score_bias is not None else scores
        own_w, own_ids = torch.topk(sel, k, dim=-1)  # the router's own top-k: the aux loss counts
        # the router weights at moegen's experts (differentiable)
        if info["score_function"] == "softmax" and info["order"] == "topk_then_softmax":
            w = F.softmax(logits.gather(1, self.ids), dim=-1)
        else:
            w = scores.gather(1, self.ids)
        if info["norm_topk_prob"]:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        rsf = info["routed_scaling_factor"]
        if rsf != 1.0:
            w = w * rsf
        if self.any_dropped:
            w = w * self.kept
            if info["renormalize"]:
                w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20) * rsf
        routing_weights = w.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(self.ids_kept, num_classes=E + 1).permute(2, 1, 0)  # [E + 1, k, S]
        hit = torch.greater(mask[:E].sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            idx, top_x = torch.where(mask[e])
            o = self.ffn(x[top_x], self.experts[e]) * routing_weights[top_x, idx, None]
            out.index_add_(0, top_x, o.to(x.dtype))
        if self.shared:
            so = None
            for trio in self.shared:
                v = self.ffn(x, trio)
                so = v if so is None else so + v
            if self.shared_gate is not None:  # the gate's product in fp32, as moegen's combine (HF: in the
                # layer dtype, whose bf16 rounding of d gate = sum(dy * so) misses by ~10 % at S = 1)
                so = (torch.sigmoid(F.linear(x.float(), self.shared_gate[None, :])) * so.float()).to(x.dtype)
            out = out + so
        loss = (out * self.dy).sum()
        aux_kind, coeff = info["aux_loss"], info["aux_coeff"]
        if aux_kind != "none" and coeff != 0 and S > 0:
            if info["score_function"] == "softmax":
                p = scores if info["order"] != "topk_then_softmax" else F.softmax(logits, dim=-1)
            else:
                p = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if aux_kind == "deepspeed" and k <= 2:  # DeepSpeed top-1 / top-2: first-choice counts
                c = torch.bincount(own_ids[:, 0], minlength=E).to(torch.float32)
                aux = E * (p.mean(dim=0) * c).sum() / S
            else:  # Megatron: the plain top-k counts of p (a softmax router's own top-k is that already)
                top = own_ids if info["score_function"] == "softmax" else torch.topk(p, k, dim=-1)[1]
                c = torch.bincount(top.flatten(), minlength=E).to(torch.float32)
                aux = E * (p.mean(dim=0) * c).sum() / (k * S)
            loss = loss + coeff * aux
        return out, loss


def rel_err_pair(a, ref, chunk=1 << 22):
    """(sum of squared differences, sum of squared reference values), in float64, a chunk at a time."""
    a, ref = a.reshape(-1), ref.reshape(-1)
    d = n = 0.0
    for i in range(0, a.numel(), chunk):
        a64, r64 = a[i:i + chunk].double(), ref[i:i + chunk].double()
        d += float(((a64 - r64) ** 2).sum())
        n += float((r64 ** 2).sum())
    return d, n


def check_gradients(torch, block, shm, info):
    """PyTorch's dx and weight gradients against moegen's (relative L2 per tensor; experts hit only)."""
    S, f = block.S, block.Fsz
    out = {}

    def add(name, a, ref):
        d, n = rel_err_pair(a, ref)
        sd, sn = out.get(name, (0.0, 0.0))
        out[name] = (sd + d, sn + n)

    with torch.no_grad():
        add("dx", block.x.grad, shm.t["dx"][:S])
        add("router_w", block.router_w.grad, shm.g["router_w"])
        for e, (a, b, c) in enumerate(block.experts):
            if a.grad is None:  # an expert no route reached: moegen's gradient must be 0
                add("w1_untouched", torch.zeros(1), shm.g["w1"][e].abs().max().reshape(1))
                continue
            add("w1", a.grad, shm.g["w1"][e][:f] if b is not None else shm.g["w1"][e])
            if b is not None:
                add("w1", b.grad, shm.g["w1"][e][f:])
            add("w2", c.grad, shm.g["w2"][e])
        for i, (a, b, c) in enumerate(block.shared):
            fs = info["Fs"]
            add("shared_w1", a.grad, shm.g["shared_w1"][i][:fs] if b is not None else shm.g["shared_w1"][i])
            if b is not None:
                add("shared_w1", b.grad, shm.g["shared_w1"][i][fs:])
            add("shared_w2", c.grad, shm.g["shared_w2"][i])
        if block.shared_gate is not None:
            add("shared_gate", block.shared_gate.grad, shm.g["shared_gate"])
    res = {}
    for name, (d, n) in out.items():
        if name == "w1_untouched":
            res[name] = d ** 0.5 if n == 0 else float("inf")  # moegen's max |grad| must be 0
            continue
        res[name] = (d / n) ** 0.5 if n > 0 else d ** 0.5
    return res


def torch_step(block, times):
    torch = block.torch
    block.zero_grad()
    t0 = time.perf_counter()
    y, loss = block.forward()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    times["forward"].append((t1 - t0) * 1e3)
    times["backward"].append((t2 - t1) * 1e3)
    del y, loss
    return torch


# ---- the run -----------------------------------------------------------------------------------


def run_shape(args, worker, info, shm, torch, S, T, raw):
    t_shape = time.time()
    prep = worker.ask(f"prepare {S} {T}")
    first = prep["first_ms"]
    moegen_step_ms = first["forward"] + first["forward_train"] + first["backward"] * (2 if args.split else 1)
    row = {"tokens": S, "threads": T, "variant": prep["variant"], "kernel_path": prep["kernel_path"],
           "kept_routes": prep["kept_routes"], "touched_experts": prep["touched_experts"],
           "n_dropped": prep["n_dropped"], "expert_flops": prep["expert_flops"],
           "saved_bytes": prep["saved_bytes"], "saved_bytes_forward": prep["saved_bytes_forward"],
           "compile_ms": prep["compile_ms"], "cache_hit": prep["cache_hit"], "first_ms": dict(first)}
    block = None
    if torch is not None:
        try:
            torch.set_num_threads(T)
            block = EagerMoE(torch, info, shm, S)
            times = {"forward": [], "backward": []}
            torch_step(block, times)  # first call: also the check
            row["first_ms"]["torch_forward"] = times["forward"][0]
            row["first_ms"]["torch_backward"] = times["backward"][0]
            errs = check_gradients(torch, block, shm, info)
            row["grad_relerr"] = errs
            tol = TOLERANCE[info["dtype"]]
            bad = {k: v for k, v in errs.items() if not v <= tol}
            if bad:
                row["wrong"] = True
                log(f"   S={S} thr={T}: PyTorch's gradients differ from moegen's beyond {tol:g}: " +
                    ", ".join(f"{k} {v:.2e}" for k, v in bad.items()))
            block.zero_grad()
            torch_step_ms = times["forward"][0] + times["backward"][0]
        except Exception as exc:  # a broken anchor is reported, not fatal
            row["torch_unavailable"] = f"failed: {type(exc).__name__}: {exc}"
            log(f"   S={S} thr={T}: PyTorch anchor failed: {exc}")
            block = None
    elif args.torch_why:
        row["torch_unavailable"] = args.torch_why

    def reps_for(step_ms):
        if args.repeat:
            return args.repeat
        return max(1, min(args.max_reps, int(args.target_ms / max(step_ms, 1e-3))))

    m_reps = reps_for(moegen_step_ms)
    t_reps = reps_for(torch_step_ms) if block is not None else 0
    slow = max(moegen_step_ms, torch_step_ms if block is not None else 0.0)
    rounds = args.rounds if slow < 10000 else min(args.rounds, 2)
    m_samples = {}
    t_samples = {"forward": [], "backward": []}
    impls = ["moegen"] + (["pytorch"] if block is not None else [])
    meter = LoadMeter([os.getpid(), worker.proc.pid])
    other = {impl: [] for impl in impls}
    waited = 0.0
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            if args.quiet_wait > 0:
                waited += meter.wait_quiet(args.quiet_wait)
            meter.start()
            if impl == "moegen":
                warm = 1 if moegen_step_ms < 3000 else 0
                reply = worker.ask(f"time {warm + m_reps}" + (" split" if args.split else ""))
                for key, v in reply["ms"].items():
                    m_samples.setdefault(key, []).extend(v[warm:])
                row["saved_bytes"] = reply["saved_bytes"]
            else:
                warm = 1 if torch_step_ms < 3000 else 0
                scratch = {"forward": [], "backward": []}
                for i in range(warm + t_reps):
                    torch_step(block, scratch if i < warm else t_samples)
                block.zero_grad()
                gc.collect()
            load = meter.stop(min_s=0.3)  # shorter batches: too few clock ticks to tell
            if load is not None:
                other[impl].append(load)
            time.sleep(args.settle_ms / 1e3)
    row["other_load_cores"] = {impl: max(v) for impl, v in other.items() if v}
    row["quiet_wait_s"] = waited
    if raw:
        raw.write(json.dumps({"tokens": S, "threads": T, "moegen_ms": m_samples, "torch_ms": t_samples}) + "\n")
    for key, v in m_samples.items():
        row[key + "_ms"] = median(v)
        row[key + "_iqr_ms"] = [percentile(sorted(v), 0.25), percentile(sorted(v), 0.75)]
    row["n_moegen"] = len(m_samples.get("backward", []))
    row["rounds"] = rounds
    if block is not None and t_samples["forward"]:
        row["torch_forward_ms"] = median(t_samples["forward"])
        row["torch_backward_ms"] = median(t_samples["backward"])
        row["torch_forward_iqr_ms"] = [percentile(sorted(t_samples["forward"]), q) for q in (0.25, 0.75)]
        row["torch_backward_iqr_ms"] = [percentile(sorted(t_samples["backward"]), q) for q in (0.25, 0.75)]
        row["n_torch"] = len(t_samples["forward"])
    # the ratios
    row["backward_over_forward"] = row["backward_ms"] / row["forward_ms"]
    row["backward_over_forward_train"] = row["backward_ms"] / row["forward_train_ms"]
    if "weights_acc0" in m_samples:  # per step, then the median (the same step's calls)
        row["data_phase_ms"] = median([b - w for b, w in zip(m_samples["backward"], m_samples["weights_acc0"])])
        row["clear_ms"] = median([a - b for a, b in zip(m_samples["weights_acc0"], m_samples["weights_acc1"])])
    if "torch_backward_ms" in row:
        row["bwd_speedup"] = row["torch_backward_ms"] / row["backward_ms"]
        row["step_speedup"] = ((row["torch_forward_ms"] + row["torch_backward_ms"]) /
                               (row["forward_train_ms"] + row["backward_ms"]))
    if block is not None:
        block.zero_grad()
        del block
        gc.collect()
    row["shape_s"] = time.time() - t_shape
    return row


def expert_flops_per_token(info):
    """The forward's expert GEMM FLOPs per token without drops (routed and shared)."""
    H, F, F1, k = info["H"], info["F"], info["F1"], info["k"]
    Fs = info["Fs"]
    F1s = 2 * Fs if info["activation"] in ("swiglu", "geglu") else Fs
    return k * (2 * H * F1 + 2 * F * H) + info["n_shared"] * (2 * H * F1s + 2 * Fs * H)


def spec_list(args):
    if args.specs:
        out = []
        for name in parse_list(args.specs):
            path = name if os.path.exists(name) else os.path.join(ROOT, "specs", name + ".yaml")
            if not os.path.exists(path):
                sys.exit(f"train_bench: no spec {name} (looked for {path})")
            out.append(path)
        return out
    paths = sorted(glob.glob(os.path.join(ROOT, "specs", "*.yaml")))
    return [p for p in paths if not os.path.basename(p).startswith("test-")]


def table(rows):
    lines = ["| spec | dtype | S | thr | fwd ms | fwd_train ms | bwd ms | bwd / fwd | torch fwd ms | torch bwd ms | "
             "bwd speed-up | step speed-up | grad check | other load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        head = f"| {r['spec']} | {r['dtype']} | {r['tokens']} | {r['threads']} |"
        if "backward_ms" not in r:
            lines.append(head + f" *{r.get('skipped', 'not run')}* |" + " |" * 9)
            continue
        cells = [fmt_ms(r["forward_ms"]), fmt_ms(r["forward_train_ms"]), fmt_ms(r["backward_ms"]),
                 f"{r['backward_over_forward']:.2f}"]
        if "torch_backward_ms" in r:
            cells += [fmt_ms(r["torch_forward_ms"]), fmt_ms(r["torch_backward_ms"])]
            mark = " †" if r.get("wrong") else ""
            cells += [f"{r['bwd_speedup']:.2f}{mark}", f"{r['step_speedup']:.2f}{mark}"]
            worst = max(r["grad_relerr"].items(), key=lambda kv: kv[1])
            cells.append(f"max {worst[1]:.1e} ({worst[0]})" + (" **over tolerance** †" if r.get("wrong") else ""))
        else:
            cells += ["—", "—", "—", "—", r.get("torch_unavailable", "—")]
        busy = {k: v for k, v in r.get("other_load_cores", {}).items() if v > 0.25}
        cells.append(", ".join(f"**{k} {v:.2f}**" for k, v in busy.items()) if busy else "")
        lines.append(head + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_table(rows):
    lines = ["| spec | dtype | S | thr | routes kept | experts hit | bwd ms | data phase ms | weights phase ms | "
             "acc 0 − acc 1 ms | fwd GFLOP/s | bwd GFLOP/s | saved MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "backward_ms" not in r:
            continue
        split = ("weights_acc0_ms" in r)
        fwd_gf = r["expert_flops"] / (r["forward_ms"] * 1e-3) / 1e9
        bwd_gf = 2 * r["expert_flops"] / (r["backward_ms"] * 1e-3) / 1e9
        lines.append(f"| {r['spec']} | {r['dtype']} | {r['tokens']} | {r['threads']} | {r['kept_routes']} | "
                     f"{r['touched_experts']} | {fmt_ms(r['backward_ms'])} | "
                     f"{fmt_ms(r['data_phase_ms']) if split else '—'} | "
                     f"{fmt_ms(r['weights_acc1_ms']) if split else '—'} | "
                     f"{fmt_ms(max(r['clear_ms'], 0.0)) if split else '—'} | {fwd_gf:.1f} | {bwd_gf:.1f} | "
                     f"{r['saved_bytes'] / 2 ** 20:.1f} |")
    return "\n".join(lines)


def render(all_rows, notes, args, when, torch):
    """The markdown report: the main table, where the backward's time goes, the notes."""
    report = ["## moegen CPU training backward vs its forward and PyTorch autograd", "",
              f"{when}, mode {args.mode}, activations {args.activations}, loss = "
              f"sum(y * dy) + {args.aux_coeff:g} * aux_loss. Medians of all timed steps over the rounds. fwd = "
              "moegen_layer_forward (inference); fwd_train = moegen_layer_forward_train; bwd = moegen_layer_backward "
              "(dx and every weight gradient in fp32, overwriting the buffers); bwd / fwd = bwd / fwd (about 2 for a "
              "well-made backward: 2 in FLOPs; 2.67 for gated experts and 2.5 for plain ones when GEMM1 is recomputed, "
              "moegen's default, activations recompute); torch = the eager block under autograd (forward with the loss; loss.backward()); "
              "bwd speed-up = torch bwd / moegen bwd; step speed-up = (torch fwd + bwd) / (moegen fwd_train + bwd); "
              "> 1: moegen faster. grad check: the worst relative L2 error of PyTorch's dx and weight gradients "
              "against moegen's (tolerance fp32 1e-3, bf16 3e-2; PyTorch's bf16 parameters get bf16 gradients). "
              "†: a gradient over the tolerance (the row's timings are still shown; see the notes). "
              "other load: the cores the rest of the machine used during an implementation's timed steps (worst "
              "round; measured on batches of at least 0.3 s), shown when over 0.25: those timings are not clean.",
              "", table(all_rows), ""]
    if args.split:
        report += ["Where moegen's backward time goes (moegen_layer_backward_weights timed alone after each backward): "
                   "data phase = bwd - weights phase with accumulate 0, step by step, median (dx; GEMM1 again unless the "
                   "activations were kept; dh, du, the router); "
                   "weights phase = moegen_layer_backward_weights with accumulate 1 (dW1, dW2 and the rest, no "
                   "clearing); acc 0 − acc 1 = the same call with accumulate 0 minus with accumulate 1: what overwriting "
                   "costs over adding (clamped at 0): overwriting zeroes the gradients of experts no row reached, which "
                   "adding leaves alone, and writes the others without reading them (non-temporal stores on "
                   "layers whose expert gradients exceed 64 MiB), where adding reads them. GFLOP/s count the expert GEMMs "
                   "(routed rows kept and shared experts): forward F, backward 2F (recomputation not counted).", "",
                   split_table(all_rows), ""]
    report += ["Notes:", ""] + [f"- {n}" for n in notes]
    report += ["- PyTorch: " + (f"{torch.__version__}, {torch.get_num_threads()} threads at the end; " if torch else "")
               + "eager mode, parameters are leaves over the worker's memory (per-expert gate / up / down like "
               "Hugging Face's expert modules); gradients set to None before each step, outside the timing; its "
               "gradients have the parameters' dtype (bf16 for bf16 layers), moegen's are fp32.",
               "- moegen and PyTorch alternate inside each shape (rotating order), each in its own process, one at "
               "a time; a pause of --settle-ms after each."]
    return "\n".join(report) + "\n"


def machine_info(torch):
    lines = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", f"host: {platform.node()}",
             f"kernel: {platform.release()}", f"python: {platform.python_version()}"]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.split(":")[0].strip() in ("Model name", "CPU family", "Model", "Stepping", "CPU(s)",
                                              "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache",
                                              "Hypervisor vendor", "NUMA node(s)", "BogoMIPS"):
                lines.append("lscpu " + " ".join(line.split()))
            if line.startswith("Flags:"):
                flags = set(line.split()[1:])
                want = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                        "amx_tile", "amx_bf16", "amx_int8"]
                lines.append("flags present: " + " ".join(f for f in want if f in flags))
                lines.append("flags absent: " + " ".join(f for f in want if f not in flags))
    except OSError:
        lines.append("lscpu: not available")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(("MemTotal", "MemAvailable")):
                    lines.append("memory: " + " ".join(line.split()))
    except OSError:
        pass
    for label, cmd in (("cc", ["cc", "--version"]), ("git", ["git", "-C", ROOT, "rev-parse", "HEAD"]),
                       ("git status", ["git", "-C", ROOT, "status", "--short", "--untracked-files=no"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
            if label == "git status":
                lines.append(f"git: {len(out)} tracked files modified (uncommitted work in the tree)")
            elif out:
                lines.append(f"{label}: {out[0]}")
        except OSError:
            pass
    try:  # the templates the worker embedded at its build (bench/train.sh builds it just before the run)
        import hashlib
        h = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(ROOT, "templates", "**", "*"), recursive=True)):
            if os.path.isfile(path):
                h.update(os.path.relpath(path, ROOT).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
        lines.append(f"templates sha256 (at the start of the run): {h.hexdigest()}")
        diff = subprocess.run(["git", "-C", ROOT, "diff", "--stat", "HEAD", "--", "templates", "runtime", "gen"],
                              capture_output=True, text=True).stdout.strip().splitlines()
        lines.append("uncommitted changes in templates/ runtime/ gen/: " + (diff[-1].strip() if diff else "none"))
    except OSError:
        pass
    if torch is not None:
        lines.append(f"torch: {torch.__version__}")
        lines += ["torch config: " + line for line in torch.__config__.show().splitlines()[:10]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--specs", help="comma-separated spec names (specs/NAME.yaml) or paths; default: all but test-*")
    ap.add_argument("--dtypes", default="bf16,fp32",
                    help="layer dtypes: fp32, bf16, or spec (the spec's own); the spec's dtype is overridden")
    ap.add_argument("--tokens", default="1,64,512", help="token counts S")
    ap.add_argument("--threads", default="1,2", help="thread counts (moegen and PyTorch get the same)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating moegen and PyTorch (at most 2 for "
                                                          "steps over 10 s)")
    ap.add_argument("--max-gflop", type=float, default=150.0,
                    help="skip shapes whose forward expert GEMMs exceed this many GFLOP (0: no limit): moegen's "
                         "backward runs at tens of GFLOP/s on 2 cores")
    ap.add_argument("--repeat", type=int, default=0,
                    help="timed steps per implementation and round (0: about --target-ms of work, at most "
                         "--max-reps); one untimed step first when the first step took under 3 s")
    ap.add_argument("--target-ms", type=float, default=1000.0, help="timed work per implementation and round")
    ap.add_argument("--max-reps", type=int, default=10, help="most timed steps per implementation and round")
    ap.add_argument("--settle-ms", type=float, default=50.0, help="pause after each implementation's steps")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each batch of timed steps, wait up to this many seconds for a window in which the "
                         "rest of the machine uses under 0.25 cores (0: do not wait); the load seen during the "
                         "timed steps is recorded either way, and shown in the table when over 0.25 cores")
    ap.add_argument("--mode", default="train", choices=("train", "eval", "spec"),
                    help="the layer's mode (train: what a training step runs, e.g. router jitter)")
    ap.add_argument("--activations", default="recompute", choices=("recompute", "keep"),
                    help="opts.activations of moegen's layers: recompute (the default: the backward runs the expert "
                         "GEMM1 again) or keep (the training forward keeps the pre-activations)")
    ap.add_argument("--aux-coeff", type=float, default=0.01, help="the aux loss coefficient of the loss")
    ap.add_argument("--max-gib", type=float, default=18.0,
                    help="skip a spec and dtype whose benchmark would hold more memory than this")
    ap.add_argument("--no-split", dest="split", action="store_false",
                    help="do not time the weights phase alone (moegen_layer_backward_weights)")
    ap.add_argument("--quick", action="store_true",
                    help="demo + qwen3-30b-a3b, S in {16, 256}, bf16 and fp32, 1 and 2 threads: a few minutes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchor")
    ap.add_argument("--out", help="folder for results.md, rows.jsonl, raw logs and machine info")
    ap.add_argument("--json", help="the JSON lines file (OUT/rows.jsonl with --out, else build-bench/train-bench.jsonl)")
    ap.add_argument("--worker", default=os.path.join(ROOT, "build-bench", "moegen", "moegen_train_bench"),
                    help="the C worker (bench/train.sh builds it)")
    ap.add_argument("--from-json", help="comma-separated rows.jsonl files: print the report of their rows (a row of a "
                                        "later file replaces the same spec, dtype, S and threads of an earlier one) "
                                        "and run nothing")
    args = ap.parse_args()
    if args.from_json:
        rows, order = {}, []
        for path in parse_list(args.from_json):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    key = (r["spec"], r["dtype"], r["tokens"], r["threads"])
                    if key not in rows:
                        order.append(key)
                    rows[key] = r
        print(render([rows[k] for k in order], [f"rows from {args.from_json}"], args, "re-rendered", None))
        return
    if args.quick:
        args.specs = args.specs or "demo,qwen3-30b-a3b"
        args.tokens = "16,256"
        args.rounds = min(args.rounds, 3)
    tokens = parse_list(args.tokens, int)
    threads = parse_list(args.threads, int)
    dtypes = parse_list(args.dtypes)
    specs = spec_list(args)

    out = args.out
    if out:
        os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    json_path = args.json or (os.path.join(out, "rows.jsonl") if out else
                              os.path.join(ROOT, "build-bench", "train-bench.jsonl"))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    json_file = open(json_path, "w")

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
            log("train_bench: " + args.torch_why + "; the PyTorch columns stay empty")
    if out:
        with open(os.path.join(out, "machine.txt"), "w") as f:
            f.write(machine_info(torch))

    t_start = time.time()
    all_rows = []
    notes = []
    for spec_path in specs:
        spec_name = os.path.splitext(os.path.basename(spec_path))[0]
        for dtype in dtypes:
            tag = f"{spec_name}-{dtype}"
            cmd = [args.worker, spec_path, "--dtype", dtype, "--max-tokens", str(max(tokens)), "--mode", args.mode,
                   "--activations", args.activations,
                   "--aux-coeff", repr(args.aux_coeff), "--max-gib", repr(args.max_gib)]
            err_log = open(os.path.join(out, "raw", tag + ".worker.log") if out else os.devnull, "w")
            transcript = open(os.path.join(out, "raw", tag + ".jsonl"), "w") if out else None
            log(f"== {spec_name} {dtype}: " + " ".join(shlex.quote(c) for c in cmd))
            worker = Worker(cmd, err_log, transcript)
            shm = None
            try:
                ready = worker.read()
                if ready["event"] != "ready":
                    notes.append(f"{spec_name} {dtype}: skipped: {ready.get('message')}")
                    log("   " + notes[-1])
                    row = {"spec": spec_name, "dtype": dtype, "tokens": "all", "threads": "all",
                           "skipped": f"skipped: {ready.get('message')}"}
                    all_rows.append(row)
                    json_file.write(json.dumps(row) + "\n")
                    continue
                info = ready
                real_dtype = ready["dtype"]
                notes.append(f"{spec_name} {real_dtype}: E={ready['E']} k={ready['k']} H={ready['H']} F={ready['F']} "
                             f"{ready['activation']}, {ready['n_shared']} shared"
                             f"{' (gated)' if ready['shared_gate'] else ''}, router {ready['score_function']} "
                             f"{ready['order']}, capacity {ready['capacity']}, aux {ready['aux_loss']}, mode "
                             f"{ready['mode']}{', input jitter %g' % ready['input_jitter'] if ready['input_jitter'] else ''}; "
                             f"memory estimate {ready['need_bytes'] / 2 ** 30:.1f} GiB; fill {ready['fill_ms'] / 1e3:.1f} s")
                if torch is not None:
                    shm = SharedMemory(torch, ready)
                variants = set()
                per_token = expert_flops_per_token(ready)
                for T in threads:
                    for S in tokens:
                        if args.max_gflop > 0 and S * per_token > args.max_gflop * 1e9:
                            why = (f"skipped: about {S * per_token / 1e9:.0f} GFLOP per forward > --max-gflop "
                                   f"{args.max_gflop:g}")
                            notes.append(f"{spec_name} {real_dtype} S={S} thr={T}: {why}")
                            log("   " + notes[-1])
                            row = {"spec": spec_name, "dtype": real_dtype, "tokens": S, "threads": T, "skipped": why}
                            all_rows.append(row)
                            json_file.write(json.dumps(row) + "\n")
                            continue
                        row = run_shape(args, worker, info, shm, torch, S, T, transcript)
                        row.update({"spec": spec_name, "dtype": real_dtype, "aux_coeff": args.aux_coeff,
                                    "mode": ready["mode"], "activations": ready.get("activations", "recompute")})
                        variants.add(row["variant"])
                        all_rows.append(row)
                        json_file.write(json.dumps(row) + "\n")
                        json_file.flush()
                        msg = (f"   S={S} thr={T}: fwd {fmt_ms(row['forward_ms'])} train {fmt_ms(row['forward_train_ms'])}"
                               f" bwd {fmt_ms(row['backward_ms'])} ms (x{row['backward_over_forward']:.2f} fwd)")
                        if "torch_backward_ms" in row:
                            msg += (f"; torch fwd {fmt_ms(row['torch_forward_ms'])} bwd "
                                    f"{fmt_ms(row['torch_backward_ms'])} ms (bwd speed-up {row['bwd_speedup']:.2f}, "
                                    f"step {row['step_speedup']:.2f}; grad err max "
                                    f"{max(row['grad_relerr'].values()):.1e})")
                        load = ", ".join(f"{k} {v:.2f}" for k, v in row.get("other_load_cores", {}).items()) or "n/a"
                        log(msg + f"  [{row['shape_s']:.0f} s; other load {load} cores; waited "
                                  f"{row.get('quiet_wait_s', 0):.0f} s]")
                notes.append(f"{spec_name} {real_dtype}: moegen variant " + ", ".join(sorted(variants)))
            except (RuntimeError, ValueError, KeyError) as exc:
                notes.append(f"{spec_name} {dtype}: stopped: {exc}")
                log("   " + notes[-1])
            finally:
                if shm is not None:
                    shm.close()
                worker.close()
                err_log.close()
                if transcript:
                    transcript.close()
    json_file.close()

    minutes = (time.time() - t_start) / 60
    text = render(all_rows, notes, args, f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min", torch)
    print(text)
    if out:
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(text)
    log(f"train_bench: {len(all_rows)} rows in {json_path}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
