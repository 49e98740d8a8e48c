"""The cost model's shapes, read through each family's entry: every --model-config preset, hand-computed.

    pytest -q tests/test_cost_model.py
"""
import pytest
import torch

from models.moe_configs import PRESETS
from validation.prefetch.cost_model import (
    ModelShape,
    expert_bytes,
    model_shape,
    nf4_layout,
)

# preset: (expert params, shared width, E, top-k, KV bytes per token of context), worked from the config.json fields
FULL_SIZE = {
    "qwen1.5-moe-a2.7b": (3 * 2048 * 1408, 5632, 60, 4, 24 * 2 * 16 * 128 * 2),
    "qwen3-30b-a3b": (3 * 2048 * 768, 0, 128, 8, 48 * 2 * 4 * 128 * 2),
    "mixtral-8x7b": (3 * 4096 * 14336, 0, 8, 2, 32 * 2 * 8 * 128 * 2),
    "olmoe-1b-7b": (3 * 2048 * 1024, 0, 64, 8, 16 * 2 * 16 * 128 * 2),
    # MLA: the latent of kv_lora_rank 512 + qk_rope_head_dim 64 per layer; two shared experts of width 1408
    "deepseek-v2-lite": (3 * 2048 * 1408, 2 * 1408, 64, 6, 27 * (512 + 64) * 2),
}


@pytest.mark.parametrize("preset", sorted(FULL_SIZE))
def test_full_size_presets_read_through_their_family(preset):
    s = model_shape(preset)
    params, shared, E, K, kv = FULL_SIZE[preset]
    assert (s.expert_params, s.shared_width, s.num_experts, s.top_k) == (params, shared, E, K)
    assert s.kv_bytes(1) == kv and s.kv_bytes(1000) == 1000 * kv
    assert s.expert_bytes("fp16") == 2 * params


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("tiny-")))
def test_every_family_preset_has_a_shape(preset):
    """One test model per family: the widths come from the family's own config fields."""
    from models.moe_configs import make_config

    s = model_shape(preset)
    cfg = make_config(preset)
    wide = preset.endswith(("mixtral", "olmoe", "phimoe", "granitemoe", "jamba", "gpt_oss"))  # intermediate_size
    assert s.hidden == 32 and s.expert_width == (64 if wide else 16)  # else moe_intermediate_size
    assert s.expert_params == 3 * 32 * s.expert_width + ((2 * s.expert_width + 32) if preset == "tiny-gpt_oss" else 0)
    assert s.shared_width == {"tiny-qwen2_moe": 32, "tiny-deepseek_v2": 16, "tiny-deepseek_v3": 16}.get(preset, 0)
    assert s.top_k == cfg.num_experts_per_tok and s.kv_bytes(4) > 0 and s.moe_layers >= 1


def test_sliding_window_layers_cap_their_kv():
    s = ModelShape("x", "x", 8, 4, False, 0, 4, 2, 2, 2, 2, 0, kv_per_layer=(10, 10), kv_window=(0, 3))
    assert s.kv_bytes(2) == 40 and s.kv_bytes(100) == 1000 + 30


def test_nf4_and_int2_bytes_of_qwen15_expert():
    n = 3 * 2048 * 1408
    assert nf4_layout(n) == (4_325_376, 4_325_376 + 135_168, 4_325_376 + 135_168 + 528 * 4, 4_462_660)
    assert expert_bytes(n, "nf4") == 4_462_660
    assert expert_bytes(n, "int2") == n // 4 + 4 * (n // 64) == 2_703_360


def test_simulator_runs_a_preset_without_moe_intermediate_size(tiny_traces, tmp_path):
    """Mixtral names its expert width intermediate_size and has no shared expert."""
    import json

    from scripts.simulate_prefetch import main

    js = tmp_path / "s.json"
    main(["--traces", str(tiny_traces), "--policies", "on-demand,all-resident", "--cache-experts", "8",
          "--model-config", "mixtral-8x7b", "--json", str(js), "--plot", str(tmp_path / "s.png")])
    res = json.loads(js.read_text())
    assert res["cost_model"]["expert_bytes"] == 2 * 3 * 4096 * 14336
    assert res["cost_model"]["shared_ms"] == 0  # no shared expert: no shared phase


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-gpt_oss", "tiny-deepseek_v2", "tiny-qwen3_moe"])
def test_the_cost_models_expert_is_the_offload_engines(preset):
    """A family without a shared expert (Mixtral, Qwen3), with expert biases (GPT-OSS), with two shared experts
    (DeepSeek): the bytes the cost model charges per expert are the bytes the engine copies per expert."""
    from models.random_model import random_model
    from offload import offload_experts

    h = offload_experts(random_model(preset, torch.device("cpu"), torch.float32, 0), cache_experts=1)
    assert h.engine.layout.nbytes == 4 * model_shape(preset).expert_params  # float32: 4 bytes per parameter
