"""moegen.torch — a moegen layer as a PyTorch module, with autograd and torch.compile support.

    from moegen.torch import MoE
    moe = MoE("specs/mixtral-8x7b.yaml")           # a path, YAML text or a dict
    out, l_aux, exp_counts = moe(hidden_states)    # DeepSpeed's MoE.forward contract
    loss = criterion(out) + 0.01 * l_aux + 0.001 * moe.z_loss
    loss.backward()                                # the generated backward (CPU)

Parameters use the layouts Hugging Face checkpoints use (transformers' fused experts):
`gate.weight` [E, H] (fp32 router), `experts.gate_up_proj` [E, 2F, H] (gate rows first),
`experts.down_proj` [E, H, F], and what the spec adds (biases, shared experts, DeepSpeed's residual
MLP; the selection bias `score_bias` is a buffer). MoE.from_hf(config) builds the module from a
Hugging Face config (`moegen import-hf`), load_hf_state_dict() reads a Hugging Face MoE block's
weights.

The forward and backward are the custom ops moegen::moe and moegen::moe_backward (torch.library)
with fake implementations, so torch.compile traces through them without a graph break. Training
(gradients) runs on CPU layers, and on CUDA layers on the current stream (not yet run on a GPU).
"""
import itertools
import json
import math
import os
import re
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import Layer
from .layer import check_tensor

# moegen_weights field -> parameter name in the module (Hugging Face naming).
PARAMETER_NAMES = {
    "router_w": "gate.weight",
    "router_b": "gate.bias",
    "score_bias": "score_bias",
    "w1": "experts.gate_up_proj",
    "b1": "experts.gate_up_proj_bias",
    "w2": "experts.down_proj",
    "b2": "experts.down_proj_bias",
    "shared_w1": "shared_experts.gate_up_proj",
    "shared_b1": "shared_experts.gate_up_proj_bias",
    "shared_w2": "shared_experts.down_proj",
    "shared_b2": "shared_experts.down_proj_bias",
    "shared_gate": "shared_expert_gate.weight",
    "residual_w1": "residual_mlp.gate_up_proj",
    "residual_b1": "residual_mlp.gate_up_proj_bias",
    "residual_w2": "residual_mlp.down_proj",
    "residual_b2": "residual_mlp.down_proj_bias",
    "residual_coef_w": "coefficient.weight",
    "residual_coef_b": "coefficient.bias",
}
_NO_GRAD = ("score_bias",)  # selection only: no gradient (docs/numerics.md §8.1)

_LAYERS = {}  # layer id -> (Layer, [field names in the ops' weight order])
_FUSED = set()  # layer ids whose weight gradients go into the parameters' .main_grad (Megatron style)
_SAVED = {}   # saved id -> moegen.layer.Saved, until its handle tensor is collected
_layer_ids = itertools.count(1)
_saved_ids = itertools.count(1)


def _registered(layer_id):
    try:
        return _LAYERS[layer_id]
    except KeyError:
        raise RuntimeError(f"moegen: no layer {layer_id} in this process (was its module deleted?)") from None


def _bind(layer, fields, weights):
    layer.bind(**{name: (t.view(-1) if name == "shared_gate" else t) for name, t in zip(fields, weights)})


# ---- the custom ops ---------------------------------------------------------------------------

@torch.library.custom_op("moegen::moe", mutates_args=())
def moe_op(layer_id: int, x: Tensor, used_token: Optional[Tensor], weights: List[Tensor], rng_offset: Tensor,
           train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, aux_loss, z_loss, counts_before, counts_after, topk_ids, saved handle) of one forward
    over x [S, H]; with train, the forward keeps what moegen::moe_backward needs."""
    layer, fields = _registered(layer_id)
    _bind(layer, fields, weights)
    offset = int(rng_offset.item())
    handle = torch.zeros((1,), dtype=torch.int64)
    if train:
        out, saved = layer.forward_train(x, used_token, offset)
        key = next(_saved_ids)
        _SAVED[key] = saved
        handle[0] = key
        weakref.finalize(handle, _SAVED.pop, key, None)  # freed with the autograd graph
    else:
        out = layer.forward(x, used_token, offset)
    f32 = dict(dtype=torch.float32, device=x.device)
    return (out["y"], torch.tensor(out["aux_loss"], **f32), torch.tensor(out["z_loss"], **f32),
            out["counts_before"], out["counts_after"], out["topk_ids"], handle)


@moe_op.register_fake
def _moe_fake(layer_id, x, used_token, weights, rng_offset, train):
    layer, _ = _registered(layer_id)
    d = layer.describe()
    E, k = d["num_experts"], d["top_k"]
    S = x.shape[0]
    scalar = x.new_empty((), dtype=torch.float32)
    return (torch.empty_like(x), scalar, scalar.clone(), x.new_empty((E,), dtype=torch.int64),
            x.new_empty((E,), dtype=torch.int64), x.new_empty((S, k), dtype=torch.int32),
            torch.empty((1,), dtype=torch.int64))


def _saved_of(handle):
    saved = _SAVED.get(int(handle.item()))
    if saved is None:
        raise RuntimeError("moegen: backward of a forward whose saved state is gone (backward run twice after "
                           "the graph was freed, or a forward without gradients)")
    return saved


def _as_layer_grad(name, t):
    return t.view(-1) if name == "shared_gate" else t  # the module's [1, H] is the layer's [H]


@torch.library.custom_op("moegen::moe_backward", mutates_args=())
def moe_backward_op(layer_id: int, handle: Tensor, dy: Tensor, aux_coeff: Tensor, z_coeff: Tensor,
                    weights: List[Tensor]) -> List[Tensor]:
    """[dx, then the fp32 gradient of every weight but score_bias, in the ops' weight order]."""
    layer, fields = _registered(layer_id)
    saved = _saved_of(handle)
    _bind(layer, fields, weights)
    dx, grads = layer.backward(saved, dy.contiguous(), aux_coeff=float(aux_coeff.item()),
                               z_coeff=float(z_coeff.item()))
    return [dx] + [grads[name] for name in fields if name not in _NO_GRAD]


@moe_backward_op.register_fake
def _moe_backward_fake(layer_id, handle, dy, aux_coeff, z_coeff, weights):
    _, fields = _registered(layer_id)
    return [torch.empty_like(dy)] + [torch.empty(w.shape, dtype=torch.float32, device=w.device)
                                     for name, w in zip(fields, weights) if name not in _NO_GRAD]


@torch.library.custom_op("moegen::moe_backward_main_grad", mutates_args=("main_grads",))
def moe_backward_main_grad_op(layer_id: int, handle: Tensor, dy: Tensor, aux_coeff: Tensor, z_coeff: Tensor,
                              weights: List[Tensor], main_grads: List[Tensor], fused: List[int]) -> List[Tensor]:
    """moegen::moe_backward with gradient accumulation fusion: the gradients of weights[i] for i in
    `fused` are added to main_grads (fp32, in that order) by the weight phase itself (no gradient
    tensor, no separate add). [dx, then the fp32 gradient of every other weight but score_bias,
    in the ops' weight order]."""
    layer, fields = _registered(layer_id)
    saved = _saved_of(handle)
    _bind(layer, fields, weights)
    dx, _ = layer.backward(saved, dy.contiguous(), aux_coeff=float(aux_coeff.item()),
                           z_coeff=float(z_coeff.item()), grads=None)  # dx; the weight phase follows
    names = [fields[i] for i in fused]
    layer.backward_weights(saved, {n: _as_layer_grad(n, g) for n, g in zip(names, main_grads)}, accumulate=True)
    rest = [n for n in fields if n not in _NO_GRAD and n not in names]
    grads = {}
    if rest:
        shapes = layer.weight_shapes()
        grads = {n: torch.empty(shapes[n][0], dtype=torch.float32, device=dy.device) for n in rest}
        layer.backward_weights(saved, grads, accumulate=False)
    return [dx] + [grads[n] for n in rest]


@moe_backward_main_grad_op.register_fake
def _moe_backward_main_grad_fake(layer_id, handle, dy, aux_coeff, z_coeff, weights, main_grads, fused):
    _, fields = _registered(layer_id)
    return [torch.empty_like(dy)] + [torch.empty(w.shape, dtype=torch.float32, device=w.device)
                                     for i, (name, w) in enumerate(zip(fields, weights))
                                     if name not in _NO_GRAD and i not in fused]


def _main_grads(fields, weights):
    """[(index, main_grad)] of the trainable weights that carry a .main_grad, each checked."""
    found = []
    for i, (name, w) in enumerate(zip(fields, weights)):
        main = getattr(w, "main_grad", None)
        if name in _NO_GRAD or main is None:
            continue
        where = f"moegen: {PARAMETER_NAMES[name]}.main_grad"
        if not isinstance(main, Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(main).__name__}")
        if main.dtype != torch.float32 or tuple(main.shape) != tuple(w.shape) or main.device != w.device:
            raise ValueError(f"{where}: expected float32 {list(w.shape)} on {w.device}, got {main.dtype} "
                             f"{list(main.shape)} on {main.device}")
        if not main.is_contiguous():
            raise ValueError(f"{where}: must be contiguous")
        found.append((i, main))
    return found


def _main_grad_placeholder(w):
    """What autograd gets for a weight whose gradient went into its main_grad: as Megatron's fused
    layers do, a placeholder when the parameter has grad_added_to_main_grad (set to True, so
    Megatron's DDP does not add it again; zeros when zero_out_wgrad), else None."""
    if not hasattr(w, "grad_added_to_main_grad"):
        return None
    w.grad_added_to_main_grad = True
    make = torch.zeros if getattr(w, "zero_out_wgrad", False) else torch.empty
    return make(w.shape, dtype=w.dtype, device=w.device)


def _setup_context(ctx, inputs, output):
    layer_id, x, used_token, weights, rng_offset, train = inputs
    ctx.layer_id = layer_id
    ctx.train = train
    ctx.y_shape, ctx.y_dtype = output[0].shape, output[0].dtype
    ctx.n_weights = len(weights)
    ctx.save_for_backward(output[6], *weights)


def _moe_backward(ctx, grad_y, grad_aux, grad_z, *unused):
    if not ctx.train:
        raise RuntimeError("moegen: this forward ran without gradients (torch.no_grad or no tensor requiring "
                           "grad), so it kept nothing for a backward")
    handle, *weights = ctx.saved_tensors
    _, fields = _registered(ctx.layer_id)
    zero = torch.zeros((), dtype=torch.float32)
    aux = zero if grad_aux is None else grad_aux.detach().to(torch.float32).cpu()
    z = zero if grad_z is None else grad_z.detach().to(torch.float32).cpu()
    if grad_y is None:  # only the losses were used
        grad_y = torch.zeros(ctx.y_shape, dtype=ctx.y_dtype)
    fused = []
    if ctx.layer_id in _FUSED and not torch.compiler.is_compiling():
        fused = _main_grads(fields, weights)
    if fused:
        outs = moe_backward_main_grad_op(ctx.layer_id, handle, grad_y, aux, z, list(weights),
                                         [main for _, main in fused], [i for i, _ in fused])
    else:
        outs = moe_backward_op(ctx.layer_id, handle, grad_y, aux, z, list(weights))
    dx, rest = outs[0], iter(outs[1:])
    fused_ids = {i for i, _ in fused}
    weight_grads = []
    for i, (name, w) in enumerate(zip(fields, weights)):
        if name in _NO_GRAD:
            weight_grads.append(None)
        elif i in fused_ids:
            weight_grads.append(_main_grad_placeholder(w))
        else:
            weight_grads.append(next(rest).to(w.dtype).view(w.shape))
    return None, dx, None, weight_grads, None, None


moe_op.register_autograd(_moe_backward, setup_context=_setup_context)


# ---- the module -------------------------------------------------------------------------------

class _Group(nn.Module):
    """A named group of parameters (gate, experts, shared_experts, ...)."""


class AuxLossScaler(torch.autograd.Function):
    """Megatron's way of adding the router losses to the training loss without returning them:
    the output passes through unchanged, and the backward gives `loss` the gradient 1 (the
    losses arrive already multiplied by their coefficients)."""

    @staticmethod
    def forward(ctx, output, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype)


def _init_uniform(t, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound).to(t.dtype))


class MoE(nn.Module):
    """A moegen MoE layer as an nn.Module. See the module docstring.

    spec: a path, YAML text or a dict. threads: CPU threads (0: the library's default).
    activations: "recompute" (the backward runs GEMM1 again) or "keep" (the forward keeps the
    pre-activations). gradient_accumulation_fusion: weight gradients added into each parameter's
    fp32 `main_grad` by the backward itself (Megatron's fusion; the property of that name). Other
    keywords go to moegen.Layer (device, mode, variant, cache_dir, ...).
    """

    def __init__(self, spec, *, threads=0, activations="recompute", gradient_accumulation_fusion=False,
                 **layer_options):
        super().__init__()
        self._open = dict(spec=spec, threads=threads, activations=activations, **layer_options)
        self.layer = Layer(spec, threads=threads, activations=activations, **layer_options)
        d = self.layer.describe()
        self.hidden_size = d["hidden_size"]
        self.num_experts = d["num_experts"]
        self.top_k = d["top_k"]
        self._fields = self.layer.weight_names
        shapes = self.layer.weight_shapes()
        device = "cuda" if self.layer.device == "cuda" else "cpu"
        for field in self._fields:
            shape, dtype = shapes[field]
            name = PARAMETER_NAMES[field]
            if field == "shared_gate":
                shape = [1] + list(shape)  # nn.Linear(H, 1).weight
            tensor = torch.empty(shape, dtype=dtype, device=device)
            if field in ("score_bias", "router_b", "b1", "b2", "shared_b1", "shared_b2", "residual_b1",
                         "residual_b2"):
                with torch.no_grad():
                    tensor.zero_()
            else:
                _init_uniform(tensor, shape[-1])
            group, _, leaf = name.rpartition(".")
            owner = self
            if group:
                if not hasattr(self, group):
                    self.add_module(group, _Group())
                owner = getattr(self, group)
            if field in _NO_GRAD:
                owner.register_buffer(leaf, tensor)
            else:
                owner.register_parameter(leaf, nn.Parameter(tensor))
        self.register_buffer("rng_step", torch.zeros((), dtype=torch.int64), persistent=False)
        self._layer_id = next(_layer_ids)
        _LAYERS[self._layer_id] = (self.layer, list(self._fields))
        weakref.finalize(self, _LAYERS.pop, self._layer_id, None)
        weakref.finalize(self, _FUSED.discard, self._layer_id)
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.z_loss = None
        self.last_counts_after = None
        self.last_topk_ids = None

    @property
    def gradient_accumulation_fusion(self):
        """Megatron's gradient accumulation fusion: when True, the backward adds the fp32 gradient
        of every parameter that has a `main_grad` (an fp32 tensor of the parameter's shape, as
        Megatron's DDP gives each parameter) straight into it, inside the weight phase, instead of
        returning it (see _main_grad_placeholder for what .grad gets). Parameters without one get
        their gradient as usual. Eager mode: under torch.compile the plain backward runs."""
        return self._layer_id in _FUSED

    @gradient_accumulation_fusion.setter
    def gradient_accumulation_fusion(self, value):
        if value:
            _FUSED.add(self._layer_id)
        else:
            _FUSED.discard(self._layer_id)

    def _weights(self):
        return [self.get_parameter(PARAMETER_NAMES[f]) if f not in _NO_GRAD else self.get_buffer(PARAMETER_NAMES[f])
                for f in self._fields]

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
        """(output, l_aux, exp_counts) as DeepSpeed's MoE.forward: output in the shape of
        hidden_states [..., H]; l_aux the unscaled load-balancing loss (0-dim fp32, differentiable);
        exp_counts [E] int64, the routes each expert got before capacity. moe.z_loss holds the
        z-loss (differentiable), moe.last_counts_after and moe.last_topk_ids the rest."""
        layer = self.layer
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: shape {list(hidden_states.shape)}, expected [..., {self.hidden_size}]")
        check_tensor("hidden_states", hidden_states, layer.dtype, list(hidden_states.shape), layer.device)
        x = hidden_states.reshape(-1, self.hidden_size)
        if used_token is not None:
            if not isinstance(used_token, Tensor):
                raise TypeError(f"used_token: expected a torch.Tensor, got {type(used_token).__name__}")
            used_token = used_token.reshape(-1)
            if used_token.dtype == torch.bool:
                used_token = used_token.to(torch.uint8)
            check_tensor("used_token", used_token, torch.uint8, [x.shape[0]], layer.device)
        weights = self._weights()
        train = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
        with torch.no_grad():
            self.rng_step += 1
        y, aux, z, counts_before, counts_after, topk_ids, _ = moe_op(self._layer_id, x, used_token, weights,
                                                                    self.rng_step, train)
        self.z_loss = z
        self.last_counts_after = counts_after
        self.last_topk_ids = topk_ids
        return y.view(hidden_states.shape), aux, counts_before

    def set_mode(self, mode):
        """Reopen the layer in "train" or "eval" mode (the capacity factor of that mode; jitter and
        noise only in train), keeping the parameters. Not tied to nn.Module.train()/eval(), which
        would reopen on every call: a mode's first open compiles (later ones hit the cache)."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
        options = dict(self._open, mode=mode)
        spec = options.pop("spec")
        layer = Layer(spec, **options)
        if layer.weight_names != self._fields:
            raise RuntimeError("set_mode: the layer reopened with other weights")
        self._open["mode"] = mode
        self.layer = layer
        _LAYERS[self._layer_id] = (layer, list(self._fields))

    def megatron_forward(self, hidden_states: Tensor, aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0):
        """(output, mlp_bias) as Megatron-Core's MoELayer.forward (mlp_bias is None): the losses,
        times moe_aux_loss_coeff and moe_z_loss_coeff, reach the backward through the output
        (AuxLossScaler) instead of being returned."""
        output, aux, _ = self.forward(hidden_states)
        loss = aux * aux_loss_coeff + self.z_loss * z_loss_coeff
        if torch.is_grad_enabled() and loss.requires_grad:
            output = AuxLossScaler.apply(output, loss)
        return output, None

    def extra_repr(self):
        d = self.layer.describe()
        return (f"experts={d['num_experts']}, top_k={d['top_k']}, hidden={d['hidden_size']}, ffn={d['ffn_size']}, "
                f"dtype={d['dtype']}, variant={d['variant']}")

    # ---- Hugging Face ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config, *, name=None, dtype=None, approximate=False, **options):
        """A module for one MoE layer of a Hugging Face model: `config` is a config.json path, a
        dict, or a transformers PretrainedConfig. The spec comes from `moegen import-hf`."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(config, dict):
                path = Path(tmp) / "config.json"
                path.write_text(json.dumps(config))
            else:
                path = Path(config)
            command = [str(Path(__file__).parent / "bin" / "moegen"), "import-hf", str(path)]
            if name:
                command += ["--name", name]
            if dtype:
                command += ["--dtype", dtype]
            if approximate:
                command.append("--approximate")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise ValueError(done.stderr.strip() or f"moegen import-hf failed (exit {done.returncode})")
            return cls(done.stdout, **options)

    def load_hf_state_dict(self, state_dict, prefix=""):
        """Copy a Hugging Face MoE block's weights in: `state_dict` holds the block's tensors under
        `prefix` (e.g. "model.layers.3.mlp." or "model.layers.3.block_sparse_moe."). Per-expert
        linears (gate_proj / up_proj / down_proj or w1 / w3 / w2) and transformers' fused experts
        (gate_up_proj [E, 2F, H], down_proj [E, H, F]) are both read; the router is gate.weight
        (or router.weight), DeepSeek's e_score_correction_bias the selection bias, shared_expert(s)
        and shared_expert_gate the shared experts. Returns the names that were used."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        used = set()

        def take(*names):
            for n in names:
                if n in sd:
                    used.add(n)
                    return sd[n]
            return None

        def per_expert(kind_names, count, pattern="experts.{e}.{kind}.weight"):
            rows = []
            for e in range(count):
                t = take(*[pattern.format(e=e, kind=k) for k in kind_names])
                if t is None:
                    return None
                rows.append(t)
            return torch.stack(rows)

        E = self.num_experts
        values = {}
        values["router_w"] = take("gate.weight", "router.weight", "gate.wg.weight")
        values["router_b"] = take("gate.bias", "router.bias")
        values["score_bias"] = take("gate.e_score_correction_bias", "e_score_correction_bias")
        fused = take("experts.gate_up_proj")
        if fused is not None:
            values["w1"] = fused
            values["w2"] = take("experts.down_proj")
            values["b1"] = take("experts.gate_up_proj_bias")
            values["b2"] = take("experts.down_proj_bias")
        else:
            gate = per_expert(("gate_proj", "w1"), E)
            up = per_expert(("up_proj", "w3"), E)
            if gate is not None and up is not None:
                values["w1"] = torch.cat([gate, up], dim=1)  # gate rows first, then up
            elif gate is not None and self.get_parameter("experts.gate_up_proj").shape[1] == gate.shape[1]:
                values["w1"] = gate  # a non-gated expert: its one up projection
            values["w2"] = per_expert(("down_proj", "w2"), E)
        for shared in ("shared_expert", "shared_experts"):
            g = take(f"{shared}.gate_proj.weight")
            u = take(f"{shared}.up_proj.weight")
            d = take(f"{shared}.down_proj.weight")
            if g is not None and u is not None and d is not None:
                values["shared_w1"] = torch.cat([g, u], dim=0).unsqueeze(0)
                values["shared_w2"] = d.unsqueeze(0)
        values["shared_gate"] = take("shared_expert_gate.weight")
        missing = []
        with torch.no_grad():
            for field in self._fields:
                v = values.get(field)
                if v is None:
                    missing.append(field)
                    continue
                target = self.get_buffer(PARAMETER_NAMES[field]) if field in _NO_GRAD else \
                    self.get_parameter(PARAMETER_NAMES[field])
                if v.numel() != target.numel():
                    raise ValueError(f"load_hf_state_dict: {field} ({PARAMETER_NAMES[field]}): {list(v.shape)} "
                                     f"does not fit {list(target.shape)}")
                target.copy_(v.reshape(target.shape).to(target.dtype))
        if missing:
            raise KeyError(f"load_hf_state_dict: no tensor under '{prefix}' for {', '.join(missing)} "
                           f"(found: {', '.join(sorted(sd)[:12])}{' ...' if len(sd) > 12 else ''})")
        return sorted(used)
