"""A preset's architecture with random weights, built where it runs: what the offload benchmark and the
simulator's `--measure` time when the real weights are out of reach (no hub access).

The routers are drawn N(0, 0.02) so that random hidden states spread over the experts (a zero router sends every
token to the same experts); the experts run with grouped_mm, HF's fastest experts implementation.
"""
from __future__ import annotations

import torch
from torch import nn

from collection.families import moe_layers
from models.moe_configs import make_config


def sixteen_bit(dev: torch.device) -> torch.dtype:
    """fp16 where grouped_mm runs it on this GPU, else bf16 (same bytes per expert); float32 on a CPU."""
    if dev.type != "cuda":
        return torch.float32
    try:
        a = torch.randn(8, 64, device=dev, dtype=torch.float16)
        torch.nn.functional.grouped_mm(a, torch.randn(2, 64, 32, device=dev, dtype=torch.float16),
                                       offs=torch.tensor([4, 8], device=dev, dtype=torch.int32))
        return torch.float16
    except (RuntimeError, AttributeError, TypeError):
        return torch.bfloat16


def random_model(preset: str, dev: torch.device, dtype: torch.dtype, seed: int, layers: int | None = None
                 ) -> nn.Module:
    """The preset with random weights on `dev`, in eval mode. `layers`: the same layers, `layers` of them (the
    model a trace set's routing of that many MoE layers is forced into)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    over = {} if layers is None else {"num_hidden_layers": layers, "max_window_layers": layers,
                                      "layer_types": ["full_attention"] * layers}
    cfg = make_config(preset, **over)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    with torch.no_grad():
        for m in moe_layers(model):
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=gen, device=dev) * 0.02)
    model.config._experts_implementation = "grouped_mm"
    return model.eval().requires_grad_(False)
