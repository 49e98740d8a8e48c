"""`offload_experts(model, ...)`: the library call. Checks every input first (one line each), then converts.

    from offload import offload_experts
    handle = offload_experts(model, cache_experts=15, policy="prefetch:router-reuse")
    out = model.generate(**inputs, max_new_tokens=64)
    print(handle.stats())
    handle.reconfigure(cache_experts=30, policy="on-demand")   # same model and host store, another cache
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from collection.families import family_of, moe_layers
from common.errors import UserError
from offload.cache import cache_slots
from offload.engine import OffloadedExperts, OffloadEngine
from offload.routing import ForcedRouting, load_forced_routing, trace_frequencies
from offload.stats import OffloadHandle
from offload.store import DTYPE_FORMATS, make_layout
from validation.prefetch.simulator import (
    BELADY,
    EVICT_SCORES,
    FETCH,
    LFU,
    LRU,
    NO_PREFETCH,
    ORACLE,
    PREDICTED,
    PREFETCH_BASELINES,
    SCORE,
    STATIC,
    Policy,
    parse_policy,
)

# what the engine runs of the simulator's registry: a miss is fetched (no host compute, no low-bit copy), slots are
# evicted by LRU, LFU, Belady or a next-tokens predictor (evict:<checkpoint>, alone) or pinned (static,
# all-resident), and a prefetch predictor runs live on the GPU; the rest (LFRU, least-stale, frequency windows, the
# oracles' eviction scores, CPU compute, low-bit copies) is simulated only
ENGINE_EVICTIONS = (LRU, LFU, BELADY, STATIC, SCORE)
LIVE_SOURCES = ("router-reuse", "previous-token", "popularity", "random")  # and a checkpoint.pth
ENGINE_POLICY_HELP = ("on-demand (LRU), lfu, static-popular, all-resident, oracle, belady, prefetch:<checkpoint.pth | "
                      + " | ".join(LIVE_SOURCES) + ">, evict:<next-tokens checkpoint.pth> (alone), and an eviction "
                      "joined to a prefetch by '+' (e.g. lfu+prefetch:router-reuse); oracle and belady with routing "
                      "from traces")


def engine_policy(name: str) -> Policy:
    """The registry's policy `name`, if the engine runs it; else one line naming what the engine runs."""
    try:
        pol = parse_policy(name)
    except UserError as e:  # the simulator's list names policies the engine does not run: name the engine's
        if str(e).startswith("unknown policy"):
            raise UserError(f"unknown policy {name!r}; the engine runs {ENGINE_POLICY_HELP}") from None
        raise
    check_engine_policy(pol)
    return pol


def check_engine_policy(pol: Policy) -> None:
    """One line unless the engine runs `pol` (ENGINE_EVICTIONS, LIVE_SOURCES): never another policy's numbers
    under its name."""
    why = None
    if pol.miss != FETCH:
        why = "computes a miss on the host CPU or from a low-bit copy"
    elif pol.eviction not in ENGINE_EVICTIONS:
        why = "evicts by a rule the engine does not have"
    elif pol.eviction == SCORE and pol.evict_source in EVICT_SCORES:
        why = f"evicts by the {pol.evict_source} score, which the engine does not compute"
    elif pol.eviction == SCORE and pol.prefetch != NO_PREFETCH:
        why = "joins a learned eviction to a prefetch, which the engine does not run (evict:<checkpoint> alone)"
    elif pol.prefetch == PREDICTED and pol.source in PREFETCH_BASELINES and pol.source not in LIVE_SOURCES:
        why = f"prefetches with {pol.source}, which does not run live"
    if why:
        raise UserError(f"policy {pol.name} {why}: the simulator has it (scripts/simulate_prefetch.py), the "
                        f"engine runs {ENGINE_POLICY_HELP}")


@dataclass
class Plan:
    """One checked configuration of the engine (what OffloadEngine.configure takes)."""
    cache: int
    policy: Policy
    lookahead: int
    fetch_budget: int
    expert_format: str
    bank: int
    forced: ForcedRouting | None
    resident: np.ndarray | None
    popularity: np.ndarray | None
    record: bool

    def apply(self, engine: OffloadEngine) -> None:
        engine.configure(self.cache, self.policy, self.lookahead, self.fetch_budget, self.expert_format, self.bank,
                         self.forced, self.resident, self.popularity, self.record)


_FORCED: dict[tuple, ForcedRouting] = {}  # forced streams by their arguments: a reconfiguration reuses its stream


def plan(model: nn.Module, device: torch.device, *, cache_experts: int | None = None, cache_gib: float | None = None,
         policy: str = "on-demand", lookahead: int = 1, fetch_budget: int = 4, expert_format: str | None = None,
         routing_from: str | Path | None = None, static_from: str | Path | None = None,
         static_experts: np.ndarray | None = None, locality: float = 0.0, routing_tokens: int | None = None,
         seed: int = 0, staging_experts: int | None = None, record: bool = False, verify_traces: bool = True,
         nf4_on_cpu: bool = False, layout0: Any = None) -> Plan:
    """Every check of `offload_experts`'s arguments, and what they load (forced routing, frequencies)."""
    fam = family_of(model)
    layers = moe_layers(model)
    cfg = model.config
    L, E, K = len(layers), int(getattr(cfg, fam.num_experts)), int(cfg.num_experts_per_tok)
    pol = engine_policy(policy)
    own = layout0 or make_layout(layers[0].experts, fam.fused, DTYPE_FORMATS.get(
        getattr(layers[0].experts, fam.fused[0]).dtype, "fp32"))
    fmt = expert_format or own.fmt
    if fmt not in ("fp16", "bf16", "fp32", "nf4"):
        raise UserError(f"--expert-format {fmt!r}: choose fp16, bf16 or nf4")
    if fmt != "nf4" and fmt != own.fmt:
        raise UserError(f"--expert-format {fmt}: the model's experts are {own.fmt}; load the model in {fmt} "
                        f"(the engine computes with the resident model's own weights) or pick --expert-format {own.fmt}")
    if fmt == "nf4" and device.type != "cuda" and not nf4_on_cpu:
        raise UserError(f"--expert-format nf4 needs a CUDA GPU (bitsandbytes' NF4 kernels); the model is on {device}")
    if fmt == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--expert-format nf4 needs bitsandbytes: pip install bitsandbytes") from None
    from offload.store import ExpertLayout

    layout = own if fmt != "nf4" else ExpertLayout(own.names, own.shapes, tuple(n in fam.fused for n in own.names),
                                                   own.dtype, "nf4")
    slot_bytes = layout.stride if fmt == "nf4" else layout.nbytes
    C = E if pol.all_resident else cache_slots(L, E, slot_bytes, cache_experts, cache_gib)
    if pol.prefetch != NO_PREFETCH:
        if not 1 <= lookahead < L:
            raise UserError(f"--lookahead {lookahead}: the model has {L} MoE layers, so 1 <= d <= {L - 1}")
        if not 1 <= fetch_budget <= E:
            raise UserError(f"--fetch-budget {fetch_budget}: must be within 1..{E} (experts per layer)")
    if (pol.prefetch == ORACLE or pol.eviction == BELADY) and routing_from is None:
        raise UserError(f"policy {pol.name} knows the future routing: it runs with --routing-from TRACES only")
    if not 0.0 <= locality <= 1.0:
        raise UserError(f"--locality {locality}: a probability, within 0..1")
    if locality and routing_from is None:
        raise UserError("--locality changes forced routing: give --routing-from")
    if staging_experts is not None and not 1 <= staging_experts <= E:
        raise UserError(f"--staging-experts {staging_experts}: experts per staging bank, within 1..{E}")
    bank = staging_experts or K
    forced = None
    if routing_from is not None:
        # the model's shape is part of the key: a stream loaded for one model is never handed, unchecked, to another
        key = (str(routing_from), (L, E, K), pol.name, lookahead, fetch_budget, str(device), layout.dtype, seed,
               locality, routing_tokens)
        if key not in _FORCED:
            _FORCED[key] = load_forced_routing(routing_from, pol, (L, E, K), lookahead, fetch_budget, device,
                                               layout.dtype, seed, locality, routing_tokens, verify=verify_traces)
        forced = _FORCED[key]
        forced.position = 0
    resident, popularity = static_experts, None
    freq_from = static_from or routing_from
    needs_freq = pol.eviction == STATIC and not pol.all_resident and resident is None
    needs_pop = pol.prefetch == PREDICTED and pol.source in ("popularity", "previous-token")
    if needs_freq or needs_pop:
        if freq_from is None:
            raise UserError(f"policy {pol.name} needs expert frequencies: give --static-from TRACES (a trace set of "
                            "this model) or --routing-from")
        pinned, popularity = trace_frequencies(freq_from, (L, E, K), C, seed, verify_traces)
        resident = pinned if resident is None else resident
    if resident is not None and tuple(np.shape(resident)) != (L, E):
        raise UserError(f"static_experts of shape {np.shape(resident)}; this model needs ({L}, {E})")
    return Plan(C, pol, lookahead, fetch_budget, fmt, bank, forced, resident, popularity, record)


def offload_experts(model: nn.Module, *, device: str | torch.device | None = None, timing: bool = True,
                    cuda_graphs: bool = True, delayed_copies: bool = False, seed: int = 0,
                    **options: Any) -> "OffloadHandle":
    """Move `model`'s routed experts to (pinned) host memory behind a GPU cache; returns the handle.

    device          where the model runs (default: where its weights are). A model loaded on the host moves
                    there without its experts, so a GPU smaller than the model serves it
    cache_experts / cache_gib  C slots per layer (0..E), or a GPU budget for all layers' slots (exactly one;
                    neither for all-resident)
    policy          a name of the simulator's registry that the engine runs (ENGINE_POLICY_HELP): on-demand, lfu,
                    static-popular, oracle, belady, all-resident, prefetch:<checkpoint.pth | live baseline>,
                    evict:<next-tokens checkpoint.pth>
    lookahead, fetch_budget    d and m of a prefetch policy (layer l predicts layer l+d, fetches its top m)
    expert_format   fp16 | bf16 | nf4 (default: the model's dtype; 16-bit formats must equal it)
    routing_from    a trace set whose test split's routing is forced on every layer (offload/routing.py)
    static_from     a trace set whose training split counts expert frequencies (static-popular, popularity,
                    previous-token); default routing_from. Or `static_experts` (L, E) bool: the pinned set
    locality        the simulator's --locality on the forced routing
    routing_tokens  keep only the forced stream's first tokens (the simulator's --max-tokens)
    staging_experts G, the experts per staging bank (two banks; default top-k)
    timing          CUDA events around copy waits, predictor calls and forwards (statistics)
    record          keep each decode step's access and predictions (tests, the simulator's comparison)
    cuda_graphs     run a learned predictor as captured CUDA graphs (CUDA only)
    delayed_copies  CPU tests only: copies run when waited for (offload/copies.py DelayedCopies)
    nf4_on_cpu      CPU tests only: NF4 through bitsandbytes' CPU kernels
    """
    fam = family_of(model)  # an unsupported family: one line naming the supported ones
    layers = moe_layers(model)
    if any(isinstance(getattr(m.block, fam.experts), OffloadedExperts) for m in layers):
        raise UserError("this model's experts are already offloaded")
    dev = torch.device(device) if device is not None else next(p.device for p in model.parameters())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    first = plan(model, dev, seed=seed, **options)
    engine = OffloadEngine(model, dev, delayed_copies, timing, cuda_graphs, seed)
    first.apply(engine)
    return OffloadHandle(engine, dict(options, seed=seed), replan=plan)


def expert_format_dtype(fmt: str) -> torch.dtype:
    """The dtype a model is loaded in for an expert format (nf4 computes in bf16)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "nf4": torch.bfloat16, "fp32": torch.float32}[fmt]
