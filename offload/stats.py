"""What a run of the engine reports (`OffloadHandle.stats()`), and the handle itself.

    prefill_tokens_per_s   prompt tokens / time in prompt forwards (a forward whose cache was empty)
    decode_tokens_per_s    generated tokens / time from the start of the first decode forward to the end of the
                           last one of each generation (sampling and generate()'s own work between steps included)
    hit_rate               decode accesses found cached (a prefetch still in flight counts as a hit, as in the
                           simulator) / all decode accesses (one per expert a layer needs per step)
    stall_ms_per_token     compute-stream time spent waiting for copies (CUDA events around every wait) / token
    mb_moved_per_token     decode copies (demand + speculative) x bytes per expert / token
    mb_wasted_per_token    speculative copies evicted unused, or unused so far, x bytes per expert / token
    host_ms_per_layer      the engine's own host time per decode cache step (its Python, bookkeeping, launches;
                           not the model's kernels, not the wait for the router)
    predictor_us_per_layer the prefetch predictor's (or eviction scorer's) GPU time per call (CUDA events), and its
                           host time
    memory                 peak GPU memory and its split: non-expert weights, cache slots, staging (+ nf4 work
                           rows), KV cache; `bound` = 1.05 x (weights + slots + KV cache)

Counts (hits, demand, staged, speculative, used, wasted) are the simulator's columns (validation/prefetch/simulator.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from offload.cache import CacheState
from validation.prefetch.simulator import DEMAND, HITS, SPEC, SPEC_USED, SPEC_WASTED, STAGED, STATIC

MEMORY_SLACK = 1.05


class OffloadHandle:
    """What `offload_experts` returns: statistics, memory, the recorded decode stream, and `reset`."""

    def __init__(self, engine: Any, options: dict[str, Any] | None = None, replan: Any = None):
        self.engine = engine
        self.options = options or {}
        self.replan = replan  # offload.api.plan, which imports this module: passed in, not imported back

    def reconfigure(self, **options: Any) -> None:
        """Another cache, policy, format or routing for the same model (offload_experts' keywords; the host stores
        built so far are kept). Statistics start again."""
        e = self.engine
        if e.device.type == "cuda":
            torch.cuda.synchronize(e.device)
        e.slots = e.local = e.glob = None  # the old slots go before the new ones are allocated
        options.setdefault("seed", self.options.get("seed", 0))
        self.replan(e.model, e.device, layout0=e.layout0, **options).apply(e)
        self.options = options
        self.reset()

    def describe(self) -> str:
        return self.engine.describe()

    def reset(self) -> None:
        """Statistics, the cache's tables (static and all-resident caches keep their experts), the forced
        routing's position and the peak memory counter start again; the slots' contents stay."""
        from offload.engine import Counters

        e = self.engine
        if e.device.type == "cuda":
            torch.cuda.synchronize(e.device)
            torch.cuda.reset_peak_memory_stats(e.device)
        e.counters = Counters()
        static = e.cache.eviction == STATIC
        resident = (e.cache.slot_of >= 0) if static else None
        e.cache = CacheState(e.L, e.E, e.C, e.policy.eviction, e.policy.prefetch, e.cache.T)
        if resident is not None:
            e.cache.preload(resident)
        e.row_seq[:] = 0
        e.copies.waited = e.copies.seq  # the slots' contents are complete: nothing older needs a wait
        if e.forced is not None:
            e.forced.position = 0
        e.log = {"ids": [], "pred": [], "stats": [], "score": []}
        e.clock.reset()
        e.predictor_events = []
        e.kv_bytes = 0
        if hasattr(e.copies, "_stall_ms"):
            e.copies.stall_ms()
            e.copies._stall_ms = 0.0

    def recorded(self) -> dict[str, np.ndarray]:
        """The decode steps run with record=True: ids (T, L, K) each layer's access (batch 1: the router's top-k),
        pred (T, L, m) the predictions used for each target layer (-1: none), stats (T, N_STATS) cumulative,
        score (T, L, E) the eviction scores used (evict:<checkpoint>: live, each expert's rank)."""
        log = self.engine.log
        return {k: np.stack(v) if v else np.zeros((0,)) for k, v in log.items()}

    def memory(self) -> dict[str, Any]:
        e = self.engine
        weights = sum(t.numel() * t.element_size() for t in list(e.model.parameters()) + list(e.model.buffers())
                      if t.device.type == e.device.type)
        slots = e.slots.nbytes
        out = {"weights": weights, "expert_slots": slots["cache"], "staging": slots["staging"] + slots["work"],
               "kv_cache": e.kv_bytes, "host_store": e.store.total_bytes, "pinned": e.store.pinned}
        out["bound"] = MEMORY_SLACK * (weights + slots["cache"] + e.kv_bytes)
        if e.device.type == "cuda":
            out["peak"] = torch.cuda.max_memory_allocated(e.device)
            out["within_bound"] = out["peak"] <= out["bound"]
        return out

    def stats(self) -> dict[str, Any]:
        e = self.engine
        c, st = e.counters, e.cache.stats
        nb = e.layout.nbytes
        (prefill_rate, decode_rate), tok = e.clock.rates(), e.clock.tokens
        tokens = max(tok["decode"], 1)
        accesses = st[HITS] + st[DEMAND]
        wasted = st[SPEC_WASTED] + e.cache.pending_count()
        out = {
            "policy": e.policy.name, "cache_experts": e.C, "num_layers": e.L, "num_experts": e.E, "top_k": e.K,
            "expert_format": e.layout.fmt, "expert_bytes": nb, "lookahead": e.d, "fetch_budget": e.m,
            "prefill_tokens": tok["prefill"], "decode_tokens": tok["decode"],
            "prefill_tokens_per_s": prefill_rate, "decode_tokens_per_s": decode_rate,
            "hit_rate": st[HITS] / accesses if accesses else None,
            "hits": int(st[HITS]), "demand": int(st[DEMAND]), "staged": int(st[STAGED]), "speculative": int(st[SPEC]),
            "speculative_used": int(st[SPEC_USED]), "speculative_wasted": int(wasted),
            "prefill_hits": c.prefill_hits, "prefill_copies": c.prefill_copies,
            "mb_moved_per_token": (st[DEMAND] + st[SPEC]) * nb / tokens / 1e6,
            "mb_wasted_per_token": wasted * nb / tokens / 1e6,
            "stall_ms_per_token": e.copies.stall_ms() / tokens if e.timing else None,
            "host_ms_per_layer": c.host_ns / c.steps / 1e6 if c.steps else None,
            "predictor_host_us_per_layer": c.predictor_host_ns / c.predictor_calls / 1e3 if c.predictor_calls else None,
            "predictor_us_per_layer": self._predictor_us(),
            "timed_by": "cuda events" if e.timing else "host clock",
            "memory": self.memory(),
        }
        if e.forced is not None:
            out["routing_from"] = e.forced.mapping
        return out

    def _predictor_us(self) -> float | None:
        ev = self.engine.predictor_events
        if not ev:
            return None
        ev[-1][1].synchronize()
        return 1e3 * float(np.mean([a.elapsed_time(b) for a, b in ev]))


def format_table(s: dict[str, Any]) -> str:
    """The statistics as the script prints them."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    mem = s["memory"]
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    rows = [
        ("prefill tokens/s", num(s["prefill_tokens_per_s"], ".1f") + f"  ({s['prefill_tokens']} tokens)"),
        ("decode tokens/s", num(s["decode_tokens_per_s"], ".2f") + f"  ({s['decode_tokens']} tokens)"),
        ("hit rate", num(s["hit_rate"], ".4f")),
        ("stall ms/token", num(s["stall_ms_per_token"], ".3f")),
        ("MB moved/token", f"{s['mb_moved_per_token']:.2f}"),
        ("MB wasted/token", f"{s['mb_wasted_per_token']:.2f}"),
        ("engine host ms/layer", num(s["host_ms_per_layer"], ".4f")),
        ("predictor us/layer", num(s["predictor_us_per_layer"], ".1f") + " GPU, "
         + num(s["predictor_host_us_per_layer"], ".1f") + " host"),
        ("peak GPU memory", gib(mem["peak"]) if "peak" in mem else "- (no GPU)"),
        ("  non-expert weights", gib(mem["weights"])),
        ("  expert slots", gib(mem["expert_slots"])),
        ("  staging", gib(mem["staging"])),
        ("  KV cache", gib(mem["kv_cache"])),
        ("  bound 1.05 x (weights + slots + KV)", gib(mem["bound"])
         + ("" if "within_bound" not in mem else ("  ok" if mem["within_bound"] else "  EXCEEDED"))),
        ("host store", gib(mem["host_store"]) + (" pinned" if mem["pinned"] else " (not pinned: no CUDA)")),
    ]
    width = max(len(k) for k, _ in rows)
    head = (f"policy {s['policy']}, C = {s['cache_experts']} of {s['num_experts']} per layer, {s['expert_format']} "
            f"({s['expert_bytes']:,} bytes/expert), timed by {s['timed_by']}")
    return "\n".join([head] + [f"{k:<{width}}  {v}" for k, v in rows])
