"""What one step of an offloaded decode costs: bytes per expert, link speed, compute per layer.

The simulator (validation/prefetch/simulator.py) turns cache hits and misses into time with these numbers;
docs/PREFETCH.md gives every formula. Units: bytes, bytes per second, milliseconds.

The model's shape comes from a preset (models/moe_configs.py) read through its family's entry in
collection/families.py (`ModelShape`): which config field holds a routed expert's width, whether the experts
carry biases, how wide the shared expert(s) are, how many experts and which top-k. One routed expert is three
matrices, gate and up (I x H) and down (H x I), plus biases where the family has them (GPT-OSS: 2I + H):

    params(expert) = 3 * H * I (+ 2I + H)      (Qwen1.5-MoE-A2.7B: 3 * 2048 * 1408 = 8,650,752)
    bytes fp16/bf16 = 2 * params               (17,301,504 = 17.3 MB)
    bytes nf4       = params / 2               4-bit codes
                    + params / 64              one uint8 absmax per block of 64 (double quantization)
                    + 4 * ceil(params / 16384) one fp32 absmax per 256 first-level blocks
                    + 4                        the fp32 offset of the second level
                    (4,462,660 = 4.46 MB: bitsandbytes quantize_4bit, blocksize 64,
                     compress_statistics=True, as collection/quantize.py stores experts; `nf4_layout`)
    bytes int2      = params / 4 + 4 * ceil(params / 64)   2-bit codes, an fp16 scale and zero per 64
                    (2,703,360 = 2.70 MB; HQQ/HOBBIT-style low-bit stand-ins)

    copy_ms = bytes / link_bytes_per_s * 1e3   (pinned host memory, one copy engine)

A layer of a batch-1 decode step is split where a fetch can start or end:

    pre_ms      norms, attention with its KV cache, router, and the host reading the router's choice:
                the layer's experts are known after it
    predictor   the prefetch predictor's own inference, on the same stream (per policy)
    shared_ms   shared expert and its sigmoid gate: runs while a demand fetch is in flight
    expert_ms   one routed expert for one token (top_k of them per layer)
    token_ms    per token outside the layers (lm_head, sampling, the host sync of a decode step)

and, for the policies that use them:

    cpu_expert_ms     one routed expert on the host CPU for one token (cpu-compute); each further token
                      routed to it adds cpu_token_ms (= cpu_expert_ms unless measured)
    activation_bytes  one token's hidden state crossing the link each way for the CPU (H x 2 bytes)
    prefill_token_ms  each prompt token beyond the first adds this to a prefill layer's compute:
                      2 x active parameters per layer / the GPU's effective FLOP/s (`--prefill-tflops`)

Defaults were measured on one NVIDIA H200 on 2026-11-28 (Hugging Face eager decode of full-size Qwen1.5-MoE-A2.7B
with random weights, batch 1, the batched_mm experts implementation: 1.2 ms per layer; the whole MoE block for
one token 0.77 ms; one
expert for one token 0.06 ms): pre = 1.2 - 0.77 = 0.43, shared = 0.77 - 4 * 0.06 = 0.53, expert = 0.06.
`--measure` replaces them with the offload engine's own times on the GPU in use (offload/costs.py).

The KV cache a GPU budget must also hold (`ModelShape.kv_bytes`): per token of context and per attention
layer 2 x kv_heads x head_dim x 2 bytes (fp16/bf16), sliding-window layers capped at their window; MLA
presets (DeepSeek-V2/V3) cache one latent of kv_lora_rank + qk_rope_head_dim values per layer, as
MLA-aware engines (vLLM, SGLang) store it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from collection.families import family_of
from collection.quantize import NF4_BLOCKSIZE
from common.errors import UserError
from models.moe_configs import PRESETS, make_config

# pinned host-to-GPU bytes/s, x16, one copy engine; nvlink-c2c: Grace Hopper's chip-to-chip link (one direction)
LINKS: dict[str, float] = {"pcie4": 25e9, "pcie5": 55e9, "nvlink-c2c": 350e9}
FORMATS = ("fp16", "bf16", "nf4", "int2")
FORMAT_BITS = {"fp16": 16, "bf16": 16, "nf4": 4, "int2": 2}
NF4_BLOCK2 = 256  # second-level block size of bitsandbytes' double quantization (first level: NF4_BLOCKSIZE)
INT2_GROUP = 64   # int2: one fp16 scale and one fp16 zero per group of 64 weights
KV_DTYPE_BYTES = 2  # fp16/bf16 KV cache

# measured on one NVIDIA H200, 2026-11-28: HF eager, batched_mm experts, H200, full-size Qwen1.5-MoE-A2.7B, batch 1
DEFAULT_PRE_MS = 0.43      # 1.2 ms per layer - 0.77 ms MoE block
DEFAULT_SHARED_MS = 0.53   # 0.77 ms MoE block - 4 x 0.06 ms routed experts
DEFAULT_EXPERT_MS = 0.06   # one routed expert, one token
# A prefetch predictor's inference at batch 1 is a handful of kernel launches, not FLOPs (docs/RESULTS.md:
# ~4.7 MFLOPs per row at Qwen size). Assumed, not measured, until --measure times the real module:
DEFAULT_PREDICTOR_MS = {"learned": 0.05, "router-reuse": 0.01}  # 0 for table look-ups (popularity, ...)
# Effective dense bf16 FLOP/s of a prefill: assumed (an H100's peak is ~990 TFLOP/s; eager prefill reaches a
# fraction of it), only used for the prefill's compute per prompt token
DEFAULT_PREFILL_TFLOPS = 200.0


def lowbit_below(expert_format: str) -> str | None:
    """lowbit-on-miss's copy format when none is given: the widest format narrower than the experts' (nf4 below
    fp16 / bf16, int2 below nf4); None below int2."""
    narrower = [f for f in FORMATS if FORMAT_BITS[f] < FORMAT_BITS[expert_format]]
    return max(narrower, key=FORMAT_BITS.__getitem__) if narrower else None


def default_policies_for(policies: str, expert_format: str) -> str:
    """A default policy list (comma-separated) as it applies to `expert_format`: without lowbit-on-miss where no
    format is narrower (a list the user names is kept as given, and refused with a reason if it cannot run)."""
    if lowbit_below(expert_format) is not None:
        return policies
    return ",".join(p for p in policies.split(",") if p != "lowbit-on-miss")


def nf4_layout(params: int) -> tuple[int, int, int, int]:
    """Byte offsets of an NF4 expert blob (bitsandbytes quantize_4bit, double quantization), in the order
    collection/quantize.py's quantization produces its parts: (end of the 4-bit codes, end of the uint8
    absmax per block, end of the fp32 second-level absmax, total with the fp32 offset)."""
    blocks = math.ceil(params / NF4_BLOCKSIZE)
    codes = math.ceil(params / 2)
    absmax = codes + blocks
    absmax2 = absmax + 4 * math.ceil(blocks / NF4_BLOCK2)
    return codes, absmax, absmax2, absmax2 + 4


def expert_bytes(params: int, fmt: str) -> int:
    """Bytes one expert moves over the link in storage format `fmt` (module docstring)."""
    if fmt in ("fp16", "bf16"):
        return 2 * params
    if fmt == "nf4":
        return nf4_layout(params)[3]
    if fmt == "int2":
        return math.ceil(params / 4) + 4 * math.ceil(params / INT2_GROUP)
    raise ValueError(f"unknown expert format {fmt!r}; choose from {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model preset, read through its family's entry (collection/families.py)."""
    preset: str
    model_type: str
    hidden: int
    expert_width: int          # I
    expert_bias: bool
    shared_width: int          # total width of the shared expert(s); 0 = none
    num_experts: int
    top_k: int
    num_layers: int            # decoder layers
    moe_layers: int
    heads: int
    attention_params: int      # per decoder layer (q, k, v, o; MLA: its projections)
    kv_per_layer: tuple[int, ...] = field(default=())   # KV bytes per token of context, per attention layer
    kv_window: tuple[int, ...] = field(default=())      # that layer's window (0 = the whole context)
    kv_rule: str = ""

    @property
    def expert_params(self) -> int:
        H, I = self.hidden, self.expert_width
        return 3 * H * I + ((2 * I + H) if self.expert_bias else 0)

    def expert_bytes(self, fmt: str) -> int:
        return expert_bytes(self.expert_params, fmt)

    def kv_bytes(self, context: int) -> int:
        """KV cache bytes of one sequence of `context` tokens (module docstring)."""
        return sum(b * (min(context, w) if w else context) for b, w in zip(self.kv_per_layer, self.kv_window))

    def active_params_per_layer(self) -> int:
        """Parameters one token reads in one MoE layer: attention, shared expert(s), its top-k experts."""
        return self.attention_params + 3 * self.hidden * self.shared_width + self.top_k * self.expert_params

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "expert_params": self.expert_params}


def _field(cfg: Any, name: str, preset: str) -> Any:
    value = getattr(cfg, name, None)
    if value is None:
        raise UserError(f"--model-config {preset}: the preset has no {name!r}, which the cost model reads "
                        f"for its {cfg.model_type} family (models/moe_configs.py)")
    return value


@functools.cache
def model_shape(preset: str) -> ModelShape:
    """The preset's shape for the cost model (transformers' config class fills the family's defaults)."""
    if preset not in PRESETS:
        raise UserError(f"--model-config {preset!r}: unknown preset; choose from {', '.join(sorted(PRESETS))}")
    try:
        cfg = make_config(preset)
    except Exception as e:  # noqa: BLE001 - transformers' strict config classes raise their own types for a bad field
        raise UserError(f"--model-config {preset}: its fields do not make a {PRESETS[preset].get('model_type')} config "
                        f"({' '.join(str(e).split())[:160]})") from None
    fam = family_of(cfg)
    H = int(_field(cfg, "hidden_size", preset))
    heads = int(_field(cfg, "num_attention_heads", preset))
    layers = int(_field(cfg, "num_hidden_layers", preset))
    moe = sum(fam.is_moe_layer(cfg, i) for i in range(layers))
    if getattr(cfg, "kv_lora_rank", None):  # MLA: one compressed latent plus the rotary key per layer
        rope, nope, v = (int(_field(cfg, n, preset)) for n in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
        lora = int(cfg.kv_lora_rank)
        q_in = int(cfg.q_lora_rank) if getattr(cfg, "q_lora_rank", None) else H
        attention = (q_in * heads * (nope + rope) + (H * cfg.q_lora_rank if getattr(cfg, "q_lora_rank", None) else 0)
                     + H * (lora + rope) + lora * heads * (nope + v) + heads * v * H)
        per_layer, rule = (lora + rope) * KV_DTYPE_BYTES, f"MLA latent: (kv_lora_rank {lora} + qk_rope_head_dim {rope})"
        kv_layers = list(range(layers))
    else:
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or H // heads)
        attention = 2 * H * heads * hd + 2 * H * kv_heads * hd
        per_layer, rule = 2 * kv_heads * hd * KV_DTYPE_BYTES, f"2 x kv_heads {kv_heads} x head_dim {hd}"
        block_types = getattr(cfg, "layers_block_type", None)  # Jamba: attention only in some layers
        kv_layers = [i for i in range(layers) if block_types is None or block_types[i] == "attention"]
    types = getattr(cfg, "layer_types", None) or []
    window = int(getattr(cfg, "sliding_window", None) or 0)
    windows = tuple(window if i < len(types) and types[i] == "sliding_attention" else 0 for i in kv_layers)
    return ModelShape(
        preset=preset, model_type=cfg.model_type, hidden=H, expert_width=int(_field(cfg, fam.expert_width, preset)),
        expert_bias=fam.expert_bias, shared_width=int(fam.shared_width(cfg)),
        num_experts=int(_field(cfg, fam.num_experts, preset)), top_k=int(_field(cfg, "num_experts_per_tok", preset)),
        num_layers=layers, moe_layers=moe, heads=heads, attention_params=int(attention),
        kv_per_layer=(per_layer,) * len(kv_layers), kv_window=windows,
        kv_rule=f"{len(kv_layers)} attention layers x {rule} x {KV_DTYPE_BYTES} bytes per token"
                + (f"; sliding-window layers hold at most {window} tokens" if any(windows) else ""))


def expert_params(preset: str) -> int:
    """Parameters of one routed expert of a model preset (models/moe_configs.py)."""
    return model_shape(preset).expert_params


@dataclass
class CostModel:
    expert_bytes: int
    link_bytes_per_s: float
    pre_ms: float = DEFAULT_PRE_MS
    shared_ms: float = DEFAULT_SHARED_MS
    expert_ms: float = DEFAULT_EXPERT_MS
    token_ms: float = 0.0
    source: str = "defaults (HF eager, H200)"  # where the numbers come from
    lowbit_bytes: int = 0          # the low-precision copy lowbit-on-miss fetches on a miss
    cpu_expert_ms: float = 0.0     # one expert on the host CPU, one token (cpu-compute)
    cpu_token_ms: float = 0.0      # each further token routed to that expert
    activation_bytes: int = 0      # one token's hidden state, each way, for the CPU
    prefill_token_ms: float = 0.0  # per prefill layer, each prompt token beyond the first

    @property
    def copy_ms(self) -> float:
        """One expert's host-to-GPU copy."""
        return self.expert_bytes / self.link_bytes_per_s * 1e3

    @property
    def lowbit_copy_ms(self) -> float:
        return self.lowbit_bytes / self.link_bytes_per_s * 1e3

    @property
    def activation_ms(self) -> float:
        """One token's hidden state over the link, one way."""
        return self.activation_bytes / self.link_bytes_per_s * 1e3

    def cpu_ms(self, tokens: int) -> float:
        """One expert on the host for `tokens` tokens routed to it."""
        return self.cpu_expert_ms + (tokens - 1) * self.cpu_token_ms if tokens > 0 else 0.0

    def layer_ms(self, top_k: int, predictor_ms: float = 0.0) -> float:
        """Compute of one layer for one token, nothing waited for."""
        return self.pre_ms + predictor_ms + self.shared_ms + top_k * self.expert_ms

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "copy_ms": self.copy_ms, "lowbit_copy_ms": self.lowbit_copy_ms,
                "activation_ms": self.activation_ms}


def prefill_token_ms(shape: ModelShape, tflops: float = DEFAULT_PREFILL_TFLOPS) -> float:
    """Compute per prompt token per layer at `tflops` effective TFLOP/s: 2 FLOPs per active parameter."""
    return 2 * shape.active_params_per_layer() / (tflops * 1e12) * 1e3
