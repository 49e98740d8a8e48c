"""Offloaded generation: a Hugging Face MoE with its routed experts in host memory and a GPU expert cache
(docs/OFFLOAD.md). `offload_experts(model, ...)` converts a loaded model; `model.generate()` then runs as usual."""
from offload.api import offload_experts
from offload.engine import OffloadedExperts
from offload.stats import OffloadHandle, format_table

__all__ = ["offload_experts", "OffloadedExperts", "OffloadHandle", "format_table"]
