"""MoE model configurations the project builds models from (no hub needed), any supported family.

A preset is a config.json as a dict (its "model_type" picks transformers' config class). Full-size presets
copy a public model's config.json field for field (source in the comment above each; tests/test_families.py
checks each one's parameter count against the published total); `tiny-<model_type>` presets are seconds-fast
random test models of every family in collection/families.py.
"""
from __future__ import annotations

from typing import Any

from collection.families import FAMILIES, TINY_BASE
from collection.traces.format import bytes_per_token
from collection.traces.hidden_format import FORMATS
from common.errors import UserError

# Qwen/Qwen1.5-MoE-A2.7B's config.json, field for field (14,315,784,192 parameters)
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu", "max_position_embeddings": 8192,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
    "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
    "attention_dropout": 0.0, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
    "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    "qkv_bias": True, "mlp_only_layers": [], "bos_token_id": 151643, "eos_token_id": 151643,
}

# The embedded default: Qwen1.5-MoE's routing shape (60 experts, top-4, shared expert with its
# sigmoid gate, norm_topk_prob False) at a size that trains in minutes and ships in < 30 MB.
QWEN2MOE_MINI: dict[str, Any] = {
    **QWEN15_MOE_A27B,
    "vocab_size": 8192, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "moe_intermediate_size": 48, "shared_expert_intermediate_size": 192, "sliding_window": 512,
    "max_window_layers": 8, "router_aux_loss_coef": 0.01, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}

# For tests: same routing shape, a few layers, seconds to build and run.
QWEN2MOE_TINY: dict[str, Any] = {
    **QWEN2MOE_MINI,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
    "num_key_value_heads": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "max_window_layers": 3,
}

# Qwen/Qwen3-30B-A3B's config.json, field for field (30.5B parameters, 3.3B active). Source: the full
# config.json as vendored in github.com/citsjtu2020/LLM-Prof, sglang/Model_Config.md ("Qwen3-30B-A3B").
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

# mistralai/Mixtral-8x7B-v0.1's config.json, field for field (46.7B parameters, 12.9B active). Source:
# github.com/NVIDIA/TensorRT-LLM, tests/unittest/_torch/modeling/test_modeling_mixtral.py (MIXTRAL_8X7B_CONFIG).
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
    "vocab_size": 32000,
}

# allenai/OLMoE-1B-7B-0924's config.json, field for field (6.9B parameters, 1.3B active). Source: the
# same fields in an OLMoE parameter-counting script found in public code (its `base_config`, converted
# checkpoint "step23842-hf"); not located in a named repository, see docs/FAMILIES.md.
OLMOE_1B_7B: dict[str, Any] = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
    "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "eos_token_id": 50279,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 1024,
    "max_position_embeddings": 4096, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16, "output_router_logits": False,
    "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 50304,
}

# deepseek-ai/DeepSeek-V2-Lite's config.json (15.7B parameters, 2.4B active). The architecture fields
# match DEEPSEEK_V2_LITE ("deepseek-ai/DeepSeek-V2-Lite-Chat (config.json, fields the planner reads)") found
# in public code; the routing fields (greedy top-6 of 64, no groups, routed_scaling_factor 1.0,
# norm_topk_prob false) and rope_scaling are from the model card's config.json as the project knows it,
# not re-checked against a vendored copy (docs/FAMILIES.md).
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 102400,
}

FULL_SIZE: dict[str, dict[str, Any]] = {
    "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B, "qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B,
    "olmoe-1b-7b": OLMOE_1B_7B, "deepseek-v2-lite": DEEPSEEK_V2_LITE,
}
# published total parameters (model cards / papers), checked within 1% by tests/test_families.py
PUBLISHED_PARAMETERS: dict[str, float] = {
    "qwen1.5-moe-a2.7b": 14.3e9, "qwen3-30b-a3b": 30.5e9, "mixtral-8x7b": 46.7e9, "olmoe-1b-7b": 6.9e9,
    "deepseek-v2-lite": 15.7e9,
}

TINY: dict[str, dict[str, Any]] = {f"tiny-{ft}": {"model_type": ft, **TINY_BASE, **fam.tiny} for ft, fam in FAMILIES.items()}

PRESETS = {**FULL_SIZE, "qwen2moe-mini": QWEN2MOE_MINI, "qwen2moe-tiny": QWEN2MOE_TINY, **TINY}


def make_config(preset: str, **overrides: Any) -> Any:
    """The transformers config object of a preset (its family's own config class), fields overridden."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    cfg = {**PRESETS[preset], **overrides}
    cfg.pop("architectures", None)
    model_type = cfg.pop("model_type", "qwen2_moe")
    return AutoConfig.for_model(model_type, **cfg)


SEED_RECIPE_TOKENS = 5000 * 256  # the seed's recipe: 5,000 sequences of up to 256 tokens


def seed_recipe_table() -> list[dict[str, float | str]]:
    """Stored bytes of the seed's full recipe (5,000 x 256 tokens, every layer's hidden state and the router
    logits, Qwen1.5-MoE-A2.7B's dimensions, captured in bf16) in every hidden format."""
    c = QWEN15_MOE_A27B
    dims = {"num_layers": c["num_hidden_layers"], "top_k": c["num_experts_per_tok"], "num_experts": c["num_experts"],
            "hidden_size": c["hidden_size"], "hidden_layers": c["num_hidden_layers"], "hidden_dtype": "bfloat16",
            "store_logits": True}
    rest = bytes_per_token(**{**dims, "hidden_layers": 0})
    ref = bytes_per_token(**dims)
    rows = []
    for name in FORMATS:
        record = bytes_per_token(**dims, hidden_format=name)
        rows.append({"format": name, "hidden_bytes_per_token": record - rest, "record_bytes_per_token": record,
                     "hidden_vs_bf16": (ref - rest) / (record - rest), "record_vs_bf16": ref / record,
                     "seed_recipe_gb": record * SEED_RECIPE_TOKENS / 1e9})
    return rows
