"""Loading an MoE causal LM the way its users do, and reading its routing shape.

`from_pretrained` by hub id or local directory, optional bitsandbytes 4-/8-bit. Where each family keeps
its MoE blocks, routers and experts is said once, in collection/families.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from collection.families import family_of, moe_layers, num_experts, router_spec
from collection.sources import REPO_ROOT, require_hub
from common.errors import UserError

EMBEDDED_MODEL_NAME = "models/embedded/qwen2moe-mini"  # relative to the repository root
EMBEDDED_MODEL = REPO_ROOT / EMBEDDED_MODEL_NAME
QUANTIZATIONS = ("none", "4bit", "8bit")


@dataclass
class RoutingShape:
    architecture: str
    num_layers: int            # MoE layers (the trace format's layer axis)
    num_experts: int
    top_k: int
    hidden_size: int
    norm_topk_prob: bool       # do the stored top-k weights sum to 1 (before routed_scaling_factor)?
    moe_layer_indices: list[int]  # decoder-layer index of each MoE layer
    family: str = ""           # config.model_type, a key of collection.families.FAMILIES
    router: dict[str, Any] = field(default_factory=dict)  # families.router_spec: how ids/weights were chosen

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, MoE block) for every decoder layer whose MLP is a routed MoE."""
    return [(m.decoder_index, m.block) for m in moe_layers(model)]


def routing_shape(model: nn.Module) -> RoutingShape:
    cfg, fam = model.config, family_of(model)
    layers = moe_layers(model)
    return RoutingShape(architecture=type(model).__name__, num_layers=len(layers), num_experts=num_experts(cfg),
                        top_k=int(cfg.num_experts_per_tok), hidden_size=int(cfg.hidden_size),
                        norm_topk_prob=fam.normalized(cfg), moe_layer_indices=[m.decoder_index for m in layers],
                        family=fam.model_type, router=router_spec(model))


def router_weights(model: nn.Module) -> torch.Tensor:
    """(L, E, H) router matrices: what router-reuse baselines apply to stored hidden states
    (families.router_extras holds the biases some families add)."""
    return torch.stack([m.router.weight.detach().float().cpu() for m in moe_layers(model)])


def resolve_model_path(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it local). A hub id is checked for reachability first."""
    p = Path(name_or_path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).is_dir():
        p = REPO_ROOT / p  # repository-relative paths (the embedded default) work from any directory
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"--model {name_or_path}: directory has no config.json (not a saved model)")
        return str(p), True
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"--model {name_or_path}: " + ("a file, not a model directory" if p.exists() else
                                                      "no such model directory"))
    require_hub(f"--model {name_or_path}",
                f"Pass a local directory saved with save_pretrained (the embedded default is {EMBEDDED_MODEL}).")
    return name_or_path, False


def quantization_config(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> Any:
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if device.type != "cuda":
        raise UserError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes); "
                        f"this run is on {device}. Use --quantization none on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"--quantization {quantization} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # the seed's recipe: NF4 with double quantization, fp16 compute
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype,
               quantization: str = "none", placement: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """Model (eval mode, on `device`) and tokenizer, exactly as a user of transformers loads them.

    `placement` (collection/placement.py: `device_map` and `max_memory`) spreads the layers over several GPUs
    through accelerate instead; `device` then only picks the quantization and dtype checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, local = resolve_model_path(name_or_path)
    qconfig = quantization_config(quantization, device, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if placement is not None:
        if quantization == "4bit":
            raise UserError("--device-map with --quantization 4bit: the 4-bit path quantizes the experts onto one GPU "
                            "(a full-size Qwen1.5-MoE takes 8 GB); use one GPU, or --quantization 8bit or none")
        kwargs.update(placement)
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # weights go straight to the GPU, not through host RAM
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if quantization == "4bit":
            from collection.quantize import load_4bit_with_quantized_experts

            model = load_4bit_with_quantized_experts(path, kwargs, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {name_or_path}: cannot load ({first})") from None
    if qconfig is None and device.type != "cuda" and placement is None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer
