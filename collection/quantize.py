"""4-bit loading in which the routed experts really are 4-bit.

With transformers 5.x, `BitsAndBytesConfig(load_in_4bit=True)` quantizes nn.Linear modules only.
MoE experts are fused 3-D parameters (`experts.gate_up_proj (E, 2I, H)`, `experts.down_proj
(E, H, I)`), so they stay in 16 bits: ~25 GB for Qwen1.5-MoE-A2.7B, which does not fit the seed's
24 GB card (docs/platform.md). Here the checkpoint is read by `from_pretrained` onto the CPU, then
moved to the GPU one module at a time, quantized on the way with bitsandbytes:

  * every nn.Linear except the routers and lm_head -> `bnb.nn.Linear4bit` (NF4, double quant.),
    what `load_in_4bit` does for dense layers;
  * each layer's fused experts -> NF4 (double quant.) as whole tensors; a forward pre-hook
    dequantizes them into the model's own experts implementation for that layer's forward only,
    so one layer's 16-bit experts (1 GB at full size) exist at a time;
  * everything else (embeddings, norms, routers) in the compute dtype, untouched, so routing is
    computed from 16-bit router weights as in the seed's 4-bit model.

Peak GPU memory is the quantized model plus one layer in 16 bits; the report of each parameter
group's bytes comes from `quantized_bytes`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from collection.families import family_of, moe_layers
from common.errors import UserError

NF4_BLOCKSIZE = 64  # weights per first-level NF4 block (one uint8 absmax each, double quantization)


def _quantize(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(t.to(device=device, dtype=dtype).contiguous(), blocksize=NF4_BLOCKSIZE,
                              compress_statistics=True, quant_type="nf4")


class QuantizedExperts:
    """Holds one experts module's fused weights in NF4 and lends them out, dequantized, per forward."""

    def __init__(self, experts: nn.Module, names: tuple[str, ...], device: torch.device, dtype: torch.dtype):
        self.NAMES = names
        self.states = {}
        for name in self.NAMES:
            weight = getattr(experts, name)
            packed, state = _quantize(weight.data, device, dtype)
            del experts._parameters[name]  # the 16-bit tensor goes; a plain attribute takes its place per forward
            experts.register_buffer(f"{name}_nf4", packed, persistent=False)
            self.states[name] = state
        experts.register_forward_pre_hook(self.dequantize)
        experts.register_forward_hook(self.release)
        experts._quantized_experts = self

    def dequantize(self, module: nn.Module, args: Any) -> None:
        import bitsandbytes.functional as bnbf

        for name in self.NAMES:
            setattr(module, name, bnbf.dequantize_4bit(getattr(module, f"{name}_nf4"), self.states[name]))

    def release(self, module: nn.Module, args: Any, output: Any) -> None:
        for name in self.NAMES:
            delattr(module, name)

    def nbytes(self) -> int:
        def state_bytes(s: Any) -> int:
            total = s.absmax.numel() * s.absmax.element_size() + s.code.numel() * s.code.element_size()
            if getattr(s, "state2", None) is not None:
                total += state_bytes(s.state2)
            return total
        return sum(state_bytes(s) for s in self.states.values())


def _to_linear4bit(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
                          compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", blocksize=NF4_BLOCKSIZE)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return q.to(device)  # Params4bit quantizes when it moves to the GPU


def fused_expert_names(model: nn.Module) -> tuple[str, ...]:
    """The family's fused expert tensors, checked to be 3-D (E, ., .) parameters in every MoE layer;
    anything else cannot be quantized whole here, and says so in one line."""
    fam = family_of(model)
    for m in moe_layers(model):
        for name in fam.fused:
            t = m.experts._parameters.get(name)
            if t is None or t.dim() != 3:
                found = "missing" if t is None else f"of shape {tuple(t.shape)}"
                raise UserError(f"--quantization 4bit: {fam.model_type} layer {m.decoder_index}: routed experts are not "
                                f"fused 3-D tensors ({type(m.experts).__name__}.{name} {found}); this NF4 path "
                                f"quantizes fused experts only (docs/FAMILIES.md)")
    return fam.fused


def quantize_model_4bit(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a CPU model to `device` in 4 bits, one module at a time (see the module docstring)."""
    names = fused_expert_names(model)
    dense_names = set(family_of(model).dense_modules)
    routers = {id(m.router) for m in moe_layers(model)}  # some are nn.Linear (PhiMoE): they stay 16-bit
    experts = {id(m.experts): m.experts for m in moe_layers(model)}
    keep_dense = routers | {id(model.get_output_embeddings())}

    def convert(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) in experts:
                QuantizedExperts(child, names, device, dtype)
                child.to(device)
            elif isinstance(child, nn.Linear) and id(child) not in keep_dense and name not in dense_names:
                setattr(parent, name, _to_linear4bit(child, device, dtype))
            else:
                convert(child)
            torch.cuda.empty_cache()

    convert(model)
    model.to(device)  # what is left: embeddings, norms, routers, lm_head (compute dtype)
    model.is_loaded_in_4bit = True
    return model


def load_4bit_with_quantized_experts(path: str, kwargs: dict[str, Any], device: torch.device) -> nn.Module:
    """from_pretrained onto the CPU in the compute dtype, then `quantize_model_4bit` onto `device`."""
    from transformers import AutoModelForCausalLM

    dtype = kwargs["quantization_config"].bnb_4bit_compute_dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cpu"}, low_cpu_mem_usage=True)
    return quantize_model_4bit(model, device, dtype)


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """GPU bytes by parameter group: routed experts, other 4-bit Linear weights, everything else."""
    groups = {"routed_experts_nf4": 0, "linear_nf4": 0, "dense_16bit": 0}
    seen: set[int] = set()
    for module in model.modules():
        q = getattr(module, "_quantized_experts", None)
        if q is not None:
            groups["routed_experts_nf4"] += q.nbytes() + sum(
                b.numel() * b.element_size() for b in module.buffers(recurse=False))
            seen.update(id(b) for b in module.buffers(recurse=False))
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            nbytes += state.absmax.numel() * state.absmax.element_size()
            groups["linear_nf4"] += nbytes
        else:
            groups["dense_16bit"] += nbytes
    return groups
