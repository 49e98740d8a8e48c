"""One routed expert computed on the host CPU, timed: the cost of cpu-compute (`--measure-cpu`).

What is timed: the preset's expert (gate and up I x H, down H x I; validation/prefetch/cost_model.py) on
n tokens' hidden states, down(silu(gate x) * up x), with torch on the CPU with `--cpu-threads` threads:

    fp16 / bf16   the weights in that dtype, torch.matmul (as llama.cpp or a torch host path runs them)
    nf4           bitsandbytes' CPU dequantization of the expert's NF4 blob to bf16, then the same matmuls
                  (a fused NF4 GEMV would be faster; this is what the project's own code can run)
    int2          not measured (no CPU kernel here): give --cpu-expert-ms

The median of `repeats` timed calls after a warm-up, at n = 1 and at n = `tokens` (the batch): the cost
model's cpu_expert_ms is the first, cpu_token_ms the growth per further token between the two.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from common.errors import UserError
from validation.prefetch.cost_model import ModelShape


def _expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gu = x @ gate_up.T
    i = down.shape[1]
    return (F.silu(gu[:, :i]) * gu[:, i:]) @ down.T


def measure_cpu_expert(shape: ModelShape, fmt: str, threads: int, tokens: int = 1, repeats: int = 7
                       ) -> dict[str, float]:
    """{cpu_expert_ms, cpu_token_ms, ...}: the module docstring's timing on this machine."""
    if fmt == "int2":
        raise UserError("--measure-cpu times fp16, bf16 or nf4 experts; for int2 give --cpu-expert-ms")
    if threads <= 0:
        raise UserError(f"--cpu-threads {threads}: at least 1")
    H, I = shape.hidden, shape.expert_width
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        gate_up = (torch.randn(2 * I, H, generator=gen) * 0.02).to(dtype)
        down = (torch.randn(H, I, generator=gen) * 0.02).to(dtype)
        if fmt == "nf4":
            import bitsandbytes.functional as bnbf

            from collection.quantize import NF4_BLOCKSIZE

            packed = [bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4") for w in (gate_up, down)]

            def weights() -> tuple[torch.Tensor, torch.Tensor]:
                return tuple(bnbf.dequantize_4bit(p, s).to(torch.bfloat16) for p, s in packed)  # type: ignore
        else:
            def weights() -> tuple[torch.Tensor, torch.Tensor]:
                return gate_up, down

        def timed(n: int) -> float:
            x = torch.randn(n, H, generator=gen).to(dtype)
            with torch.no_grad():
                _expert(x, *weights())  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _expert(x, *weights())
                    times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        one = timed(1)
        many = timed(tokens) if tokens > 1 else one
    finally:
        torch.set_num_threads(old)
    return {"cpu_expert_ms": one, "cpu_token_ms": max(many - one, 0.0) / (tokens - 1) if tokens > 1 else one,
            "cpu_threads": threads, "cpu_format": fmt, "cpu_tokens_timed": tokens,
            "cpu_ms_at_tokens": many}
