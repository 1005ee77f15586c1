#!/usr/bin/env python3
"""make_configs.py — regenerates the Hugging Face config.json files that tests/test_import_hf.sh
feeds to `moegen import-hf`.

Made with transformers 5.24.0 (pip install transformers; torch is not needed: only the
configuration classes are used). Run from anywhere:

    python3 tests/import_hf/make_configs.py

Two kinds of file:

* <model_type>.json: what `save_pretrained` writes for the configuration class's own defaults
  (`XConfig(dtype="bfloat16").to_json_string()`; the defaults leave the dtype unset, and every
  released checkpoint sets it). Where the defaults are not an MoE layer, the keys of a released
  checkpoint are passed on top, and FAMILIES below says which.
* real-<checkpoint>.json: the numbers of a released config.json, written here by hand (their
  key order and values as released), for the tests that compare the import with the shipped spec
  of the same model (specs/*.yaml).

The tests do not need transformers: the generated files are committed.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# file stem -> (configuration class, keyword arguments on top of the defaults, note)
FAMILIES = {
    "mixtral": ("MixtralConfig", {}, "defaults (Mixtral-8x7B's shape)"),
    "minimax": ("MiniMaxConfig", {}, "defaults"),
    "qwen2_moe": ("Qwen2MoeConfig", {}, "defaults (Qwen1.5-MoE-A2.7B's shape)"),
    "qwen3_moe": ("Qwen3MoeConfig", {}, "defaults (Qwen3-30B-A3B's shape, norm_topk_prob false)"),
    "qwen3_next": ("Qwen3NextConfig", {}, "defaults (Qwen3-Next-80B-A3B's MoE)"),
    "olmoe": ("OlmoeConfig", {}, "defaults"),
    # The defaults have num_experts_per_tok None, n_group None and moe_intermediate_size 1407
    # (not an MoE layer moegen or transformers can build): DeepSeek-V2's and DeepSeek-V2-Lite's keys.
    "deepseek_v2": ("DeepseekV2Config", {
        "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 8,
        "topk_group": 3, "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0,
        "first_k_dense_replace": 1, "num_hidden_layers": 60,
    }, "defaults + deepseek-ai/DeepSeek-V2's MoE keys"),
    "deepseek_v2_lite": ("DeepseekV2Config", {
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1,
        "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "num_hidden_layers": 27,
    }, "defaults + deepseek-ai/DeepSeek-V2-Lite's MoE keys"),
    "deepseek_v3": ("DeepseekV3Config", {}, "defaults (DeepSeek-V3's shape)"),
    "glm4_moe": ("Glm4MoeConfig", {}, "defaults"),
    "gpt_oss": ("GptOssConfig", {}, "defaults (gpt-oss-120b's shape)"),
    "llama4": ("Llama4Config", {}, "defaults (multimodal: the MoE keys are in text_config)"),
    "llama4_text": ("Llama4TextConfig", {}, "defaults (Llama-4-Scout's text model)"),
    "granitemoe": ("GraniteMoeConfig", {}, "defaults"),
    "granitemoeshared": ("GraniteMoeSharedConfig", {}, "defaults (shared_intermediate_size 0: no shared expert)"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", {}, "defaults (shared_intermediate_size 1024)"),
    "phimoe": ("PhimoeConfig", {}, "defaults (Phi-3.5-MoE's shape)"),
    "dbrx": ("DbrxConfig", {}, "defaults (4 experts, top-1)"),
    "jamba": ("JambaConfig", {}, "defaults (Jamba-v0.1's shape)"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", {}, "defaults (ERNIE-4.5-21B-A3B's shape)"),
}

# Released config.json files (the MoE-relevant numbers and the keys around them, as released).
REAL = {
    # mistralai/Mixtral-8x7B-v0.1
    "real-mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
    },
    # deepseek-ai/DeepSeek-V3
    "real-deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
        "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
        "v_head_dim": 128, "vocab_size": 129280,
    },
    # Qwen/Qwen3-30B-A3B
    "real-qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # allenai/OLMoE-1B-7B-0924
    "real-olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
        "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True,
        "vocab_size": 50304,
    },
    # Qwen/Qwen1.5-MoE-A2.7B
    "real-qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.39.0.dev0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    # openai/gpt-oss-20b (the layer_types list of its 24 layers shortened to its pattern's first two)
    "real-gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
        "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
        "use_cache": True, "vocab_size": 201088,
    },
}


def main():
    import transformers

    for stem, (class_name, kwargs, note) in FAMILIES.items():
        config_class = getattr(transformers, class_name)
        config = config_class(dtype="bfloat16", **kwargs)
        with open(os.path.join(HERE, stem + ".json"), "w") as f:
            f.write(config.to_json_string())
        print(f"{stem}.json: {class_name}, {note}")
    for stem, config in REAL.items():
        with open(os.path.join(HERE, stem + ".json"), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        print(f"{stem}.json: released config")
    print(f"transformers {transformers.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
