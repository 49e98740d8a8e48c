"""What one step of an offloaded decode costs: bytes per expert, link speed, compute per layer.

The simulator (validation/prefetch/simulator.py) turns cache hits and misses into time with these numbers;
docs/PREFETCH.md gives every formula. Units: bytes, bytes per second, milliseconds.

One routed expert of a Qwen2-MoE is three matrices, gate and up (I x H) and down (H x I):

    params(expert) = 3 * H * I                 (Qwen1.5-MoE-A2.7B: 3 * 2048 * 1408 = 8,650,752)
    bytes fp16/bf16 = 2 * params               (17,301,504 = 17.3 MB)
    bytes nf4       = params / 2               4-bit codes
                    + params / 64              one uint8 absmax per block of 64 (double quantization)
                    + 4 * ceil(params / 16384) one fp32 absmax per 256 first-level blocks
                    + 4                        the fp32 offset of the second level
                    (4,462,660 = 4.46 MB: bitsandbytes quantize_4bit, blocksize 64,
                     compress_statistics=True, as collection/quantize.py stores experts)

    copy_ms = bytes / link_bytes_per_s * 1e3   (pinned host memory, one copy engine)

A layer of a batch-1 decode step is split where a fetch can start or end:

    pre_ms      norms, attention with its KV cache, router, and the host reading the router's choice:
                the layer's experts are known after it
    predictor   the prefetch predictor's own inference, on the same stream (per policy)
    shared_ms   shared expert and its sigmoid gate: runs while a demand fetch is in flight
    expert_ms   one routed expert for one token (top_k of them per layer)
    token_ms    per token outside the layers (lm_head, sampling, the host sync of a decode step)

Defaults were measured on one NVIDIA H200 on 2026-11-28 (Hugging Face eager decode of full-size Qwen1.5-MoE-A2.7B
with random weights, batch 1, the batched_mm experts implementation: 1.2 ms per layer; the whole MoE block for one token 0.77 ms; one
expert for one token 0.06 ms): pre = 1.2 - 0.77 = 0.43, shared = 0.77 - 4 * 0.06 = 0.53, expert = 0.06.
`--measure` (validation/prefetch/replay.py) replaces them with times measured on the GPU in use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from models.moe_configs import PRESETS

LINKS: dict[str, float] = {"pcie4": 25e9, "pcie5": 55e9}  # pinned host-to-GPU bytes/s, x16, one copy engine
FORMATS = ("fp16", "bf16", "nf4")
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # first- and second-level block sizes of bitsandbytes' double quantization

# measured on one NVIDIA H200, 2026-11-28: HF eager, batched_mm experts, H200, full-size Qwen1.5-MoE-A2.7B, batch 1
DEFAULT_PRE_MS = 0.43      # 1.2 ms per layer - 0.77 ms MoE block
DEFAULT_SHARED_MS = 0.53   # 0.77 ms MoE block - 4 x 0.06 ms routed experts
DEFAULT_EXPERT_MS = 0.06   # one routed expert, one token
# A prefetch predictor's inference at batch 1 is a handful of kernel launches, not FLOPs (docs/RESULTS.md:
# ~4.7 MFLOPs per row at Qwen size). Assumed, not measured, until --measure times the real module:
DEFAULT_PREDICTOR_MS = {"learned": 0.05, "router-reuse": 0.01}  # 0 for table look-ups (popularity, ...)


def expert_params(preset: str) -> int:
    """Parameters of one routed expert of a model preset (models/moe_configs.py)."""
    cfg = PRESETS[preset]
    return 3 * int(cfg["hidden_size"]) * int(cfg["moe_intermediate_size"])


def expert_bytes(params: int, fmt: str) -> int:
    """Bytes one expert moves over the link in storage format `fmt` (module docstring)."""
    if fmt in ("fp16", "bf16"):
        return 2 * params
    if fmt == "nf4":
        blocks = math.ceil(params / NF4_BLOCK)
        return math.ceil(params / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4
    raise ValueError(f"unknown expert format {fmt!r}; choose from {', '.join(FORMATS)}")


@dataclass
class CostModel:
    expert_bytes: int
    link_bytes_per_s: float
    pre_ms: float = DEFAULT_PRE_MS
    shared_ms: float = DEFAULT_SHARED_MS
    expert_ms: float = DEFAULT_EXPERT_MS
    token_ms: float = 0.0
    source: str = "defaults (HF eager, H200)"  # where the numbers come from

    @property
    def copy_ms(self) -> float:
        """One expert's host-to-GPU copy."""
        return self.expert_bytes / self.link_bytes_per_s * 1e3

    def layer_ms(self, top_k: int, predictor_ms: float = 0.0) -> float:
        """Compute of one layer for one token, nothing waited for."""
        return self.pre_ms + predictor_ms + self.shared_ms + top_k * self.expert_ms

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "copy_ms": self.copy_ms}
