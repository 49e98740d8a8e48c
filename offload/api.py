"""`offload_experts(model, ...)`: the library call. Checks every input first (one line each), then converts.

    from offload import offload_experts
    handle = offload_experts(model, cache_experts=15, policy="prefetch:router-reuse")
    out = model.generate(**inputs, max_new_tokens=64)
    print(handle.stats())
"""
from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from torch import nn

from collection.errors import UserError
from collection.families import family_of, moe_layers
from offload.cache import cache_slots
from offload.engine import IMPLEMENTATIONS_WITH_SENTINELS, OffloadedExperts, OffloadEngine
from offload.routing import load_forced_routing, trace_frequencies
from offload.store import DTYPE_FORMATS, make_layout
from validation.cache_sim import BELADY, NO_PREFETCH, ORACLE, PREDICTED, STATIC, parse_policy


def offload_experts(model: nn.Module, *, device: str | torch.device | None = None,
                    cache_experts: int | None = None, cache_gib: float | None = None,
                    policy: str = "on-demand", lookahead: int = 1, fetch_budget: int = 4,
                    expert_format: str | None = None, routing_from: str | Path | None = None,
                    static_from: str | Path | None = None, static_experts: np.ndarray | None = None,
                    locality: float = 0.0, routing_tokens: int | None = None, seed: int = 0,
                    staging_experts: int | None = None, timing: bool = True, record: bool = False,
                    cuda_graphs: bool = True, verify_traces: bool = True, delayed_copies: bool = False,
                    nf4_on_cpu: bool = False) -> "OffloadHandle":
    """Move `model`'s routed experts to (pinned) host memory behind a GPU cache; returns the handle.

    device          where the model runs (default: where its weights are). A model loaded on the host moves
                    there without its experts, so a GPU smaller than the model serves it
    cache_experts / cache_gib  C slots per layer (0..E), or a GPU budget for all layers' slots (exactly one;
                               neither for all-resident)
    policy          a name of the simulator's registry (validation/cache_sim.py POLICY_HELP): on-demand, lfu,
                    static-popular, oracle, belady, all-resident, prefetch:<checkpoint.pth | baseline>
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
    delayed_copies  CPU tests only: copies run when waited for (offload/copies.py DelayedCopies)
    nf4_on_cpu      CPU tests only: NF4 through bitsandbytes' CPU kernels
    """
    fam = family_of(model)  # an unsupported family: one line naming the supported ones
    layers = moe_layers(model)
    if any(isinstance(getattr(m.block, fam.experts), OffloadedExperts) for m in layers):
        raise UserError("this model's experts are already offloaded")
    pol = parse_policy(policy)
    cfg = model.config
    L, E, K = len(layers), int(getattr(cfg, fam.num_experts)), int(cfg.num_experts_per_tok)
    device = torch.device(device) if device is not None else next(p.device for p in model.parameters())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    impl = getattr(cfg, "_experts_implementation", None) or "eager"
    if fam.model_type == "gpt_oss" and impl not in IMPLEMENTATIONS_WITH_SENTINELS:
        raise UserError(f"gpt_oss with experts implementation {impl!r}: its eager experts cannot skip absent experts; "
                        f"use one of {', '.join(IMPLEMENTATIONS_WITH_SENTINELS)}")
    fmt = expert_format or DTYPE_FORMATS.get(getattr(layers[0].experts, fam.fused[0]).dtype, "fp32")
    if fmt not in ("fp16", "bf16", "fp32", "nf4"):
        raise UserError(f"--expert-format {fmt!r}: choose fp16, bf16 or nf4")
    if fmt == "nf4" and device.type != "cuda" and not nf4_on_cpu:
        raise UserError(f"--expert-format nf4 needs a CUDA GPU (bitsandbytes' NF4 kernels); the model is on {device}")
    if fmt == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--expert-format nf4 needs bitsandbytes: pip install bitsandbytes") from None
    layout = make_layout(layers[0].experts, fam.fused, fmt)
    slot_bytes = layout.stride if fmt == "nf4" else layout.nbytes
    if pol.all_resident:
        C = E
    else:
        C = cache_slots(L, E, slot_bytes, cache_experts, cache_gib)
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
    bank = staging_experts or K
    if bank < 1:
        raise UserError(f"--staging-experts {bank}: at least 1")
    dtype = layout.dtype
    forced = None
    if routing_from is not None:
        forced = load_forced_routing(routing_from, pol, (L, E, K), lookahead, fetch_budget, device, dtype, seed,
                                     locality, routing_tokens, verify=verify_traces)
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
    engine = OffloadEngine(model, C, pol, lookahead, fetch_budget, fmt, bank, forced, resident, popularity,
                           delayed_copies, timing, record, cuda_graphs, seed, device)
    from offload.stats import OffloadHandle

    return OffloadHandle(engine)


def expert_format_dtype(fmt: str) -> torch.dtype:
    """The dtype a model is loaded in for an expert format (nf4 computes in bf16)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "nf4": torch.bfloat16, "fp32": torch.float32}[fmt]
