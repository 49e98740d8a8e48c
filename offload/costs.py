"""The engine's costs in the simulator's terms (validation/cost_model.CostModel), measured on the engine itself.

`measure_costs(handle, prompt)` runs a short greedy decode of the handle's model, as configured (policy, cache,
format), after an untimed one of WARM_TOKENS tokens in the same configuration, with a timestamp at five points
of every MoE layer of every decode step (a timed CUDA event on the compute stream; the host clock on a CPU, where
the numbers mean nothing):

    start    the decoder layer begins               pre_ms    = routed - start   (attention, norms, router, the
    routed   the router's (and predictor's) choice             prefetch predictor, the host read queued)
             is queued for the host
    ready    the copies are queued, before the wait  shared_ms = ready - routed   (shared expert, bookkeeping,
                                                                             a learned eviction's scorer)
    waited   after the wait for the copies           (stall: waited - ready, predicted by the simulator instead)
    done     the routed experts are computed         expert_ms = (done - waited) / top-k

    token_ms  = (decode time - sum of the MoE layers' start..done) / tokens: embedding, dense layers, lm_head,
                sampling and generate()'s own work
    copy_ms   = back-to-back copies of real host blobs into staging slots on the copy stream (timed events)
    link      = one large pinned copy (a layer's whole host store): the link's bytes/s; the engine's own copy
                groups during the decode are timed too (engine_copy_bytes_per_s: how near the link they run)

The host's bookkeeping between the router read and the copies (`latency`) is moved from shared_ms into pre_ms:
the engine queues its demand copies then, where the simulator queues them at the end of pre. The prefetch
predictor's time is inside pre_ms (the engine reads its choice together with the router's), so the simulator runs
with predictor_ms = 0 and queues prefetches with the demand copies, as the engine does. A learned eviction's
scorer runs after the router's read, so its time falls in shared_ms, where the simulator's evict_ms would put it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from offload.stats import OffloadHandle
from validation.prefetch.cost_model import CostModel

WARM_TOKENS = 8  # an untimed decode of this configuration before its measured one


def _elapsed_ms(a: Any, b: Any) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def measure_link(handle: OffloadHandle) -> float:
    """Pinned host-to-GPU bytes/s of one large copy (a whole layer's host store into a scratch GPU buffer)."""
    e = handle.engine
    src = e.store.host[0]
    if e.device.type != "cuda":
        dst = torch.empty_like(src)
        t0 = time.perf_counter()
        dst.copy_(src)
        return src.numel() / (time.perf_counter() - t0)
    dst = torch.empty(src.shape, dtype=src.dtype, device=e.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src, non_blocking=True)  # warm
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    del dst
    return src.numel() / (start.elapsed_time(end) / 1e3)


def measure_copy_ms(handle: OffloadHandle, n: int = 40) -> float:
    """ms per expert of back-to-back host-to-GPU copies of real blobs (layer 0's experts) into staging rows."""
    e = handle.engine
    slots, E = e.slots, e.E
    rows = [slots.staging_row(j) for j in range(2 * e.G)]
    pairs = [list(zip(slots.dst(rows[i % len(rows)]), slots.src(0, i % E))) for i in range(n + 5)]
    if e.device.type != "cuda":
        t0 = time.perf_counter()
        for p in pairs[5:]:
            for dst, src in p:
                dst.copy_(src)
        return (time.perf_counter() - t0) * 1e3 / n
    stream = e.copies.stream
    stream.wait_stream(torch.cuda.current_stream(e.device))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        for i, p in enumerate(pairs):
            if i == 5:
                start.record(stream)
            for dst, src in p:
                dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / n


@torch.no_grad()
def measure_predictor_us(handle: OffloadHandle, n: int = 200) -> float | None:
    """us per call of the prefetch predictor (or learned eviction's scorer) at batch 1 on the GPU's own clock: its
    CUDA graph (the one the decode replays) replayed n times back to back between two events, so the GPU does not
    wait for the host between calls (an upper bound of its kernels' time where the host launches slower than they
    run); without a graph, the whole call, timed the same way. The timed events around each call in the decode
    (`predictor_us_per_layer`) also count the host's launch gaps of a host-bound decode. None without either; host
    clock on a CPU."""
    e = handle.engine
    pred, live = (e.predictor, e.learned) if e.predictor is not None else (e.evictor, e.evict_learned)
    if pred is None or (pred is e.predictor and e.d >= e.L):
        return None
    x = torch.zeros(1, e.H, device=e.device, dtype=next(e.model.parameters()).dtype)
    if live is not None:
        live.features(1)
    for _ in range(3):  # captures the graph if the decode has not
        pred(0, x)
    graph = pred.graphs.get((0, 1)) if pred.use_graphs else None
    run = graph[0].replay if graph is not None else (lambda: pred(0, x))
    if e.device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - t0) * 1e6 / n
    torch.cuda.synchronize(e.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


@torch.no_grad()
def measure_costs(handle: OffloadHandle, prompt: torch.Tensor, tokens: int = 32, copies: int = 40) -> dict[str, Any]:
    """{"cost": CostModel, "raw": the measured numbers} (module docstring). Resets the handle's statistics."""
    e = handle.engine
    model = e.model
    copy_ms = measure_copy_ms(handle, copies)
    link = measure_link(handle)
    # the same warm state as the runs it predicts: an engine's first decode (numba's compilation of the cache step
    # on a fresh machine, first kernel launches, first allocations) ran 2.6x slower per token than the timed rounds
    handle.reset()
    model.generate(prompt.to(e.device), max_new_tokens=WARM_TOKENS, min_new_tokens=WARM_TOKENS, do_sample=False,
                   pad_token_id=0)
    handle.reset()
    e.profile, e.latency_ns, e.latency_n = [], 0, 0
    cuda = e.device.type == "cuda"
    if cuda:
        e.copies.profile = []
    try:
        model.generate(prompt.to(e.device), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=0)
        stats = handle.stats()
        profile, groups = e.profile, e.copies.profile if cuda else None
    finally:
        e.profile = None
        if cuda:
            e.copies.profile = None
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    phases: dict[str, list[float]] = {"pre": [], "shared": [], "stall": [], "expert": [], "layer": []}
    open_: dict[int, dict[str, Any]] = {}
    for l, tag, stamp in profile:
        cur = open_.setdefault(l, {})
        cur[tag] = stamp
        if tag == "done" and {"start", "routed", "ready", "waited"} <= cur.keys():
            phases["pre"].append(_elapsed_ms(cur["start"], cur["routed"]))
            phases["shared"].append(_elapsed_ms(cur["routed"], cur["ready"]))
            phases["stall"].append(_elapsed_ms(cur["ready"], cur["waited"]))
            phases["expert"].append(_elapsed_ms(cur["waited"], cur["done"]) / e.K)
            phases["layer"].append(_elapsed_ms(cur["start"], cur["done"]))
            open_[l] = {}
    decode_tokens = max(stats["decode_tokens"], 1)
    decode_ms = 1e3 * decode_tokens / stats["decode_tokens_per_s"] if stats["decode_tokens_per_s"] else 0.0
    latency_ms = e.latency_ns / e.latency_n / 1e6 if e.latency_n else 0.0
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in phases.items()}
    token_ms = max(decode_ms - float(np.sum(phases["layer"])), 0.0) / decode_tokens
    shared = max(mean["shared"] - latency_ms, 0.0)
    pre = mean["pre"] + (mean["shared"] - shared)
    device = torch.cuda.get_device_name(e.device) if e.device.type == "cuda" else "CPU (host clock: meaningless)"
    cost = CostModel(e.layout.nbytes, e.layout.nbytes / (copy_ms / 1e3), pre, shared, mean["expert"], token_ms,
                     source=f"measured by offload/costs.py on {device}: {e.describe()}")
    group_bytes = sum(b for _, _, b in groups) if groups else 0
    group_ms = sum(a.elapsed_time(b) for a, b, _ in groups) if groups else 0.0
    raw = {"device": device, "copy_ms": copy_ms, "link_bytes_per_s": link, "latency_ms": latency_ms,
           "engine_copy_bytes_per_s": group_bytes / (group_ms / 1e3) if group_ms > 0 else None,
           "recorded": handle.recorded() if e.record_on else None, "decode_ms_per_token": decode_ms / decode_tokens,
           "layer_steps": len(phases["layer"]), **{f"{k}_ms": v for k, v in mean.items()},
           "predictor_graph_us": measure_predictor_us(handle)}
    handle.reset()
    return {"cost": cost, "raw": raw}


def measure_on_engine(preset: str, traces: str, expert_format: str, cache_experts: int, prefetch: list[str],
                      device: torch.device, seed: int = 0, tokens: int = 32) -> dict[str, Any]:
    """The simulator's costs measured on the engine users run (`simulate_prefetch.py --measure`).

    `preset`'s architecture with random weights (models/random_model.py), one decoder layer per MoE layer of
    `traces`, its experts offloaded in `expert_format` behind `cache_experts` slots per layer, on-demand LRU, the
    traces' test routing forced on every layer (so the layers copy and compute what the simulated stream asks):
    `measure_costs` of a greedy decode of `tokens` tokens. Then each `prefetch` policy is measured the same way
    (under forced routing a checkpoint's predictor runs at this model's size with random weights: its work, for
    its time; the answers come from the traces, offload/routing.py); the engine runs its predictor inside the pre
    phase, so a predictor's time is that pre phase less on-demand's.

    Returns {"cost": CostModel, "raw": on-demand's measured numbers, "predictor_ms": {policy: ms}}.
    """
    from collection.families import num_experts
    from collection.traces.format import read_manifest
    from models.moe_configs import make_config
    from models.random_model import random_model, sixteen_bit
    from offload.api import expert_format_dtype, offload_experts

    m = read_manifest(Path(traces))
    cfg = make_config(preset)
    arch = (num_experts(cfg), int(cfg.num_experts_per_tok))
    if arch != (m.num_experts, m.top_k):
        raise UserError(f"--measure runs {preset} with the traces' routing forced into it: it needs the traces' "
                        f"experts and top-k ({preset}: {arch[0]} and top-{arch[1]}; traces: {m.num_experts} and "
                        f"top-{m.top_k}); choose a --model-config of that shape")
    dtype = sixteen_bit(device) if expert_format == "fp16" else expert_format_dtype(expert_format)
    if expert_format in ("fp16", "bf16") and device.type != "cuda":
        dtype, expert_format = torch.float32, "fp32"  # a CPU (tests): the code path, not its numbers
    elif expert_format == "fp16" and dtype != torch.float16:
        expert_format = "bf16"  # grouped_mm has no fp16 on this GPU: the same bytes per expert in bf16
    model = random_model(preset, device, dtype, seed, layers=m.num_layers)
    prompt = torch.randint(1, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(seed)).to(device)
    handle = offload_experts(model, cache_experts=cache_experts, policy="on-demand", expert_format=expert_format,
                             routing_from=traces, seed=seed, nf4_on_cpu=device.type != "cuda")
    base = measure_costs(handle, prompt, tokens=tokens)
    predictor_ms: dict[str, float] = {}
    for pol in prefetch:
        handle.reconfigure(cache_experts=cache_experts, policy=pol, expert_format=expert_format, routing_from=traces)
        res = measure_costs(handle, prompt, tokens=tokens)
        predictor_ms[pol] = max(res["cost"].pre_ms - base["cost"].pre_ms, 0.0)
    return {"cost": base["cost"], "raw": {k: v for k, v in base["raw"].items() if k != "recorded"},
            "predictor_ms": predictor_ms}
