"""Qwen2-MoE configurations the project builds models from (no hub needed)."""
from __future__ import annotations

from typing import Any

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

PRESETS = {"qwen1.5-moe-a2.7b": QWEN15_MOE_A27B, "qwen2moe-mini": QWEN2MOE_MINI, "qwen2moe-tiny": QWEN2MOE_TINY}


def make_config(preset: str, **overrides: Any) -> Any:
    from transformers import Qwen2MoeConfig

    cfg = {**PRESETS[preset], **overrides}
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    return Qwen2MoeConfig(**cfg)
