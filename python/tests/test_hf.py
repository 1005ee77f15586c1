"""Hugging Face entry points: MoE.from_hf(config) through `moegen import-hf`, and
load_hf_state_dict() for per-expert (Mixtral, Qwen) and fused (transformers 5) layouts, and the
Megatron return contract (megatron_forward)."""
import pytest
import torch

from moegen.torch import MoE

MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4,
           "num_experts_per_tok": 2, "hidden_act": "silu", "torch_dtype": "float32"}


def randomize(moe, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))


def test_from_hf_builds_the_layer_the_config_describes():
    moe = MoE.from_hf(MIXTRAL, name="mixtral_small", threads=1)
    d = moe.layer.describe()
    assert (d["num_experts"], d["top_k"], d["hidden_size"], d["ffn_size"], d["dtype"]) == (4, 2, 64, 32, "fp32")
    assert dict(moe.named_parameters()).keys() == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}


def test_from_hf_names_missing_keys():
    with pytest.raises(ValueError, match="hidden_size"):
        MoE.from_hf({"model_type": "mixtral", "num_local_experts": 4})


def mixtral_state_dict(moe, prefix):
    """The module's weights as a Mixtral checkpoint names them (per expert w1 gate, w3 up, w2 down)."""
    f = moe.experts.down_proj.shape[-1]
    sd = {prefix + "gate.weight": moe.gate.weight.detach().clone()}
    for e in range(moe.num_experts):
        w1 = moe.experts.gate_up_proj[e].detach()
        sd[f"{prefix}experts.{e}.w1.weight"] = w1[:f].clone()
        sd[f"{prefix}experts.{e}.w3.weight"] = w1[f:].clone()
        sd[f"{prefix}experts.{e}.w2.weight"] = moe.experts.down_proj[e].detach().clone()
    return sd


@pytest.mark.parametrize("layout", ["mixtral", "fused"])
def test_load_hf_state_dict_reads_both_layouts(layout):
    source = MoE.from_hf(MIXTRAL, name="mixtral_small", threads=1)
    randomize(source, 1)
    prefix = "model.layers.3.block_sparse_moe."
    if layout == "mixtral":
        sd = mixtral_state_dict(source, prefix)
    else:
        sd = {prefix + k: v.detach().clone() for k, v in source.state_dict().items()}
    sd["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(2, 2)  # another module's: ignored
    target = MoE.from_hf(MIXTRAL, name="mixtral_small", threads=1)
    used = target.load_hf_state_dict(sd, prefix)
    assert "gate.weight" in used
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])


def test_load_hf_state_dict_names_what_is_missing():
    moe = MoE.from_hf(MIXTRAL, name="mixtral_small", threads=1)
    with pytest.raises(KeyError, match="w2"):
        moe.load_hf_state_dict({"mlp.gate.weight": torch.zeros(4, 64)}, "mlp.")


def test_megatron_forward_adds_the_losses_through_the_output():
    moe = MoE.from_hf(MIXTRAL, name="mixtral_small", threads=1)
    randomize(moe, 2)
    x = torch.randn(12, 64)
    out, bias = moe.megatron_forward(x, aux_loss_coeff=0.5, z_loss_coeff=0.25)
    assert bias is None
    out.sum().backward()
    g_megatron = moe.gate.weight.grad.clone()
    moe.zero_grad()
    out, aux, _ = moe(x)
    (out.sum() + 0.5 * aux + 0.25 * moe.z_loss).backward()
    assert torch.allclose(g_megatron, moe.gate.weight.grad, rtol=1e-6, atol=1e-7)
