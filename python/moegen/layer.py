"""layer.py — moegen.Layer: the C API (include/moegen/moegen.h) on torch tensors, without copies.

A Layer opens a spec (a path, YAML text or a dict), binds weight tensors by pointer (it keeps
references to them, as the C layer keeps the pointers) and runs the forward and the training
forward/backward on tensors it checks first: dtype, device, shape and contiguity, each failure a
TypeError or ValueError naming the tensor. CPU tensors go to a CPU layer; CUDA tensors to a CUDA
layer, on the current stream.
"""
import os
from pathlib import Path

from . import _C

_DEVICES = {"auto": 0, "cpu": 1, "cuda": 2}  # moegen_device_kind
_ACTIVATIONS = {"recompute": 0, "keep": 1}    # MOEGEN_ACTIVATIONS_*
_FP32 = ("router_w", "router_b", "score_bias", "shared_gate", "residual_coef_w", "residual_coef_b")


def _yaml_scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml_lines(mapping, indent):
    lines = []
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"spec: key {key!r} is not a string")
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.extend(_yaml_lines(value, indent + 2))
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            raise TypeError(f"spec: {key}: lists are not part of the spec language")
        else:
            lines.append(" " * indent + f"{key}: {_yaml_scalar(value)}")
    return lines


def spec_text(spec):
    """(YAML text, display name) of a spec given as a path, YAML text or a dict."""
    if isinstance(spec, dict):
        return "\n".join(_yaml_lines(spec, 0)) + "\n", "<dict>"
    if isinstance(spec, Path) or (isinstance(spec, str) and (os.path.exists(spec) or
                                                             ("\n" not in spec and ":" not in spec))):
        path = Path(spec)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise FileNotFoundError(f"spec file {path}: {e.strerror}") from None
    if isinstance(spec, str):
        return spec, "<string>"
    raise TypeError(f"spec must be a path, YAML text or a dict, not {type(spec).__name__}")


def _torch():
    import torch
    return torch


def _dtype(name):
    torch = _torch()
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_tensor(name, t, dtype, shape, device):
    """Raise TypeError / ValueError naming `name` unless t is a contiguous tensor of that dtype,
    shape (None entries: any) and device type."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device:
        raise ValueError(f"{name}: on {t.device}, but this layer runs on {device}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if len(t.shape) != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: shape {list(t.shape)}, expected {want}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: not contiguous (strides {t.stride()}); pass .contiguous()")
    return t


class Saved:
    """What a training forward kept for its backward (freed when collected, or by free())."""

    def __init__(self, capsule, n_tokens):
        self._capsule = capsule
        self.n_tokens = n_tokens

    def bytes(self):
        return _C.saved_bytes(self._capsule)

    def free(self):
        _C.saved_free(self._capsule)


class Layer:
    """One MoE layer of the C runtime. See the module docstring. With a spec whose ep_size > 1,
    `comm` is a moegen.distributed.Communicator of that many ranks, and this rank binds only its
    experts (describe()["first_expert"], ["n_local_experts"])."""

    def __init__(self, spec, *, device="cpu", threads=0, mode=None, variant=None, template_dir=None,
                 cache_dir=None, activations="recompute", tuning=True, comm=None):
        text, display = spec_text(spec)
        if device not in _DEVICES:
            raise ValueError(f"device must be one of {sorted(_DEVICES)}, not {device!r}")
        if mode not in (None, "train", "eval"):
            raise ValueError(f"mode must be None, 'train' or 'eval', not {mode!r}")
        if activations not in _ACTIVATIONS:
            raise ValueError(f"activations must be 'recompute' or 'keep', not {activations!r}")
        mode_code = -1 if mode is None else (0 if mode == "train" else 1)
        self._handle = _C.open(text, display, _DEVICES[device], int(threads), mode_code, variant,
                               None if template_dir is None else os.fspath(template_dir),
                               None if cache_dir is None else os.fspath(cache_dir), _ACTIVATIONS[activations],
                               0 if tuning else 1, None if comm is None else comm._capsule)
        self.spec_yaml = text
        self._desc = _C.describe(self._handle)
        self._bound = {}
        self._bound_pointers = None
        self._shapes = None

    # ---- what the layer is --------------------------------------------------------------------
    def describe(self):
        """Sizes, dtype, device, variant, kernels, tuning, the weights it reads (a dict)."""
        return dict(self._desc)

    @property
    def device(self):
        return self._desc["device"]

    @property
    def dtype(self):
        return _dtype(self._desc["dtype"])

    @property
    def weight_names(self):
        """The moegen_weights fields this layer reads, in the order bind checks them."""
        return self._desc["weights"].split()

    def weight_shapes(self):
        """{field: (shape, dtype)} of every weight the layer reads (layouts: moegen_kernel_abi.h)."""
        if self._shapes is None:
            self._shapes = self._weight_shapes()
        return dict(self._shapes)

    def _weight_shapes(self):
        d = self._desc
        E, H, F, F1 = d["num_experts"], d["hidden_size"], d["ffn_size"], d["ffn_rows"]
        El = d["n_local_experts"]  # expert parallelism: this rank's experts only
        Ns, Fs, F1s = d["n_shared"], d["shared_ffn_size"], d["shared_ffn_rows"]
        torch = _torch()
        shapes = {
            "router_w": [E, H], "router_b": [E], "score_bias": [E], "w1": [El, F1, H], "b1": [El, F1],
            "w2": [El, H, F], "b2": [El, H], "shared_w1": [Ns, F1s, H], "shared_b1": [Ns, F1s],
            "shared_w2": [Ns, H, Fs], "shared_b2": [Ns, H], "shared_gate": [H], "residual_w1": [F1, H],
            "residual_b1": [F1], "residual_w2": [H, F], "residual_b2": [H], "residual_coef_w": [2, H],
            "residual_coef_b": [2],
        }
        return {name: (shapes[name], torch.float32 if name in _FP32 else self.dtype) for name in self.weight_names}

    # ---- weights ------------------------------------------------------------------------------
    def bind(self, **weights):
        """Bind weight tensors by field name (router_w, w1, w2, ...); the layer keeps references
        to them. Every field the layer reads is required; others are refused."""
        pointers = tuple((name, t.data_ptr()) for name, t in weights.items())
        if pointers == self._bound_pointers and all(self._bound[n] is t for n, t in weights.items()):
            return  # the same tensors: nothing to check or pass down again
        shapes = self.weight_shapes()
        unknown = sorted(set(weights) - set(shapes))
        if unknown:
            raise ValueError(f"bind: this layer does not read {', '.join(unknown)} (it reads {', '.join(shapes)})")
        missing = [name for name in shapes if weights.get(name) is None]
        if missing:
            raise ValueError(f"bind: missing weight tensor(s) {', '.join(missing)}")
        for name, (shape, dtype) in shapes.items():
            check_tensor(name, weights[name], dtype, shape, self.device)
        _C.bind(self._handle, dict(pointers))
        self._bound = dict(weights)
        self._bound_pointers = pointers

    # ---- forward ------------------------------------------------------------------------------
    def _io(self, x, used_token, rng_offset):
        torch = _torch()
        d = self._desc
        H, E, k = d["hidden_size"], d["num_experts"], d["top_k"]
        check_tensor("hidden_states", x, self.dtype, [None, H], self.device)
        S = x.shape[0]
        if used_token is not None:
            if used_token.dtype == torch.bool:
                used_token = used_token.to(torch.uint8)
            check_tensor("used_token", used_token, torch.uint8, [S], self.device)
        dev = x.device
        out = {
            "y": torch.empty_like(x),
            "topk_ids": torch.empty((S, k), dtype=torch.int32, device=dev),
            "topk_weights": torch.empty((S, k), dtype=torch.float32, device=dev),
            "router_weights": torch.empty((S, k), dtype=torch.float32, device=dev),
            "counts_before": torch.empty((E,), dtype=torch.int64, device=dev),
            "counts_after": torch.empty((E,), dtype=torch.int64, device=dev),
        }
        io = {name: t.data_ptr() for name, t in out.items()}
        io.update(n_tokens=S, x=x.data_ptr(), rng_offset=int(rng_offset),
                  used_token=None if used_token is None else used_token.data_ptr())
        if dev.type == "cuda":
            io["stream"] = torch.cuda.current_stream(dev).cuda_stream
        return io, out, used_token

    def forward(self, x, used_token=None, rng_offset=0):
        """y and the outputs of one forward over x [S, H]: a dict with y, topk_ids, topk_weights,
        router_weights, counts_before, counts_after (tensors) and n_dropped, capacity, aux_loss,
        z_loss (numbers). used_token: optional [S] bool/uint8 mask (DeepSpeed's; CPU layers)."""
        if not self._bound:
            raise RuntimeError("forward before bind")
        io, out, _ = self._io(x, used_token, rng_offset)
        out.update(_C.forward(self._handle, io))
        return out

    def forward_train(self, x, used_token=None, rng_offset=0):
        """forward() that also returns a Saved for backward()."""
        if not self._bound:
            raise RuntimeError("forward_train before bind")
        io, out, kept_mask = self._io(x, used_token, rng_offset)
        capsule, stats = _C.forward_train(self._handle, io)
        out.update(stats)
        return out, Saved(capsule, x.shape[0])

    def backward(self, saved, dy, *, aux_coeff=0.0, z_coeff=0.0, want_dx=True, grads=True, accumulate=False):
        """The backward of a saved forward: (dx or None, {field: fp32 gradient}). `grads`: True (new
        fp32 tensors for every weight but score_bias), a dict {field: fp32 tensor} to write (or add,
        with accumulate=True) into, or None/False for the input gradient only (then
        backward_weights later: Megatron's split backward)."""
        torch = _torch()
        H = self._desc["hidden_size"]
        check_tensor("dy", dy, self.dtype, [saved.n_tokens, H], self.device)
        dx = torch.empty_like(dy) if want_dx else None
        grad_dict = self._grad_buffers(grads)
        _C.backward(saved._capsule, dy.data_ptr(), None if dx is None else dx.data_ptr(), float(aux_coeff),
                    float(z_coeff), None if grad_dict is None else {n: t.data_ptr() for n, t in grad_dict.items()},
                    bool(accumulate))
        return dx, grad_dict

    def backward_weights(self, saved, grads=True, accumulate=False):
        """The weight gradients of a saved forward whose backward has run."""
        grad_dict = self._grad_buffers(grads if grads else True)
        _C.backward_weights(saved._capsule, {n: t.data_ptr() for n, t in grad_dict.items()}, bool(accumulate))
        return grad_dict

    def _grad_buffers(self, grads):
        torch = _torch()
        if grads is None or grads is False:
            return None
        shapes = {n: s for n, (s, _) in self.weight_shapes().items() if n != "score_bias"}
        if grads is True:
            dev = self.device
            return {n: torch.empty(s, dtype=torch.float32, device=dev) for n, s in shapes.items()}
        unknown = sorted(set(grads) - set(shapes))
        if unknown:
            raise ValueError(f"grads: this layer has no gradient for {', '.join(unknown)}")
        for name, t in grads.items():
            check_tensor(f"grads[{name!r}]", t, torch.float32, shapes[name], self.device)
        return dict(grads)
