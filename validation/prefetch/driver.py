"""The simulator's driver: from parsed flags to checked inputs, a cost model, and one row per (cache size, policy).

scripts/simulate_prefetch.py reads top to bottom as the story of a simulation and calls these: `resolve` checks
every input before anything is computed or written, `cost_from_args` (or `measure_on_gpu`) gives the cost model,
`simulate` replays every policy at every cache size (validation/prefetch/simulator.py), `print_table` shows it.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from common.errors import UserError
from validation.prefetch.cost_model import DEFAULT_SHARED_MS, LINKS, CostModel, model_shape
from validation.prefetch.simulator import POLICIES, Policy, Stream, check_caches, prepare, run_policy, summarize

DEFAULT_POLICIES = "on-demand,lfu,static-popular,prefetch:router-reuse,oracle,belady,all-resident"


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Every check of the input, before anything is computed or written (one line, exit 2, on failure)."""
    setup = prepare(args.traces, args.policies, args.lookahead, args.fetch_budget, args.seed, args.locality,
                    args.max_tokens, verify=not args.no_verify)
    m = setup.ts.manifest
    if args.warmup_tokens < 0 or (args.max_tokens is not None and args.warmup_tokens >= args.max_tokens):
        raise UserError("--warmup-tokens must be >= 0 and below --max-tokens")
    for name in ("pre_ms", "shared_ms", "expert_ms", "token_ms"):
        if (getattr(args, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.layer_ms is not None and not args.layer_ms > 0:
        raise UserError("--layer-ms must be positive")
    if args.predictor_ms is not None and args.predictor_ms < 0:
        raise UserError("--predictor-ms must be >= 0")
    if args.link_gbps is not None and args.link_gbps <= 0:
        raise UserError("--link-gbps must be positive")
    nbytes = model_shape(args.model_config).expert_bytes(args.expert_format)
    if args.cache_gib is not None:
        if args.cache_gib < 0:
            raise UserError("--cache-gib must be >= 0")
        caches = [int(args.cache_gib * 2**30 // (m.num_layers * nbytes))]
        if caches[0] > m.num_experts:
            raise UserError(f"--cache-gib {args.cache_gib} gives {caches[0]} experts per layer; each layer has "
                            f"{m.num_experts}")
    else:
        try:
            caches = sorted({int(c) for c in args.cache_experts.split(",") if c.strip()})
        except ValueError:
            raise UserError(f"--cache-experts {args.cache_experts!r}: a comma list of integers") from None
    check_caches(caches, m.num_experts)
    if args.measure:
        import torch

        if args.expert_format not in ("fp16", "bf16", "nf4"):
            raise UserError(f"--measure replays fp16, bf16 or nf4 experts, not {args.expert_format}")

        if not torch.cuda.is_available():
            raise UserError("--measure needs a CUDA GPU (this machine has none); drop it to use the cost model's "
                            "defaults or set --pre-ms/--shared-ms/--expert-ms/--link-gbps")
    return {"ts": setup.ts, "policies": setup.policies, "caches": caches, "split": setup.split,
            "predictors": setup.predictors, "expert_bytes": nbytes}


def cost_from_args(args: argparse.Namespace, nbytes: int, top_k: int) -> CostModel:
    link = args.link_gbps * 1e9 if args.link_gbps is not None else LINKS[args.link]
    # the default phases are Qwen1.5-MoE's (docs/anchors); a preset without a shared expert has no shared phase
    shared_ms = args.shared_ms if args.shared_ms is not None else (
        DEFAULT_SHARED_MS if model_shape(args.model_config).shared_width else 0.0)
    phases = (args.pre_ms, shared_ms, args.expert_ms)
    if args.layer_ms is not None:  # keep the phases' proportions, change their sum
        total = args.pre_ms + shared_ms + top_k * args.expert_ms
        if total <= 0:
            raise UserError("--layer-ms scales --pre-ms/--shared-ms/--expert-ms, which are all 0")
        scale = args.layer_ms / total
        phases = tuple(x * scale for x in phases)
    return CostModel(nbytes, link, *phases, args.token_ms,
                     source=f"flags ({'--link-gbps' if args.link_gbps else args.link})")


def measure_on_gpu(args: argparse.Namespace, stream: Any, predictors: dict[str, Any], L: int, E: int, K: int
                   ) -> tuple[CostModel, dict[str, float]]:
    """Pinned copy time per expert and per-layer compute of the replay's full-size layer (validation/prefetch/replay.py),
    with its pre phase calibrated on a 128-token all-resident replay, on this machine's GPU."""
    import torch

    from validation.prefetch.replay import ModelDims, ReplayEngine, host_schedule, measure_costs

    dims = ModelDims.from_preset(args.model_config, E, K, max_len=max(512, int(stream.position.max()) + 1))
    engine = ReplayEngine(dims, L, torch.device("cuda", torch.cuda.current_device()), [args.expert_format], args.seed)
    _, cal = run_policy(POLICIES["all-resident"], E, stream, CostModel(1, 1.0), args.lookahead, args.fetch_budget, E,
                        record=True)
    measured = measure_costs(engine, [args.expert_format], {n: (p.kind, p.config) for n, p in predictors.items()},
                             args.lookahead, calibration=host_schedule(cal, stream.weights, stream.position,
                                                                       min(stream.tokens, 128)))
    print(f"measured: {measured['raw']}")
    return measured["costs"][args.expert_format], measured["predictor_ms"]


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'C':>3} {'policy':<34} {'hit rate':>8} {'miss/tok':>8} {'MB/tok':>8} {'used':>8} {'wasted':>8} "
            f"{'stall ms':>8} {'tok/s':>8} {'vs LRU':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['speedup_vs_on_demand']:.2f}x" if r.get("speedup_vs_on_demand") is not None else "-"
        print(f"{r['cache_experts']:>3} {r['label'][:34]:<34} {r['hit_rate']:>8.4f} {r['demand_misses_per_token']:>8.2f} "
              f"{r['bytes_moved_per_token'] / 1e6:>8.1f} {r['bytes_used_per_token'] / 1e6:>8.1f} "
              f"{r['bytes_wasted_per_token'] / 1e6:>8.1f} {r['stall_ms_per_token']:>8.2f} {r['tokens_per_s']:>8.2f} "
              f"{speed:>7}")


def simulate(policies: list[Policy], caches: list[int], stream: Any, cost: CostModel, lookahead: int, budget: int,
             num_experts: int, predictor_ms: dict[str, float], resident: dict[int, np.ndarray], warmup: int,
             labels: dict[str, str], progress: bool = True) -> list[dict[str, Any]]:
    """One row per (cache size, policy), with the speedup over on-demand LRU at the same cache size."""
    from tqdm import tqdm

    L, K = stream.ids.shape[1:]
    rows = []
    for pol in policies:  # compile (or load) the kernels first, so the rates below are the replay's own
        run_policy(pol, min(caches), Stream(stream.ids[:2], stream.weights[:2], stream.first[:2], stream.position[:2],
                                            {k: v[:2] for k, v in stream.predictions.items()}),
                   cost, lookahead, budget, num_experts, 0.0, resident.get(min(caches)) if pol.name == "static-popular"
                   else None)
    bar = tqdm(total=len(caches) * len(policies), desc="simulate", unit="run", disable=not progress, dynamic_ncols=True)
    for c in caches:
        base = None
        for pol in policies:
            t0 = time.process_time()
            stats, _ = run_policy(pol, c, stream, cost, lookahead, budget, num_experts, predictor_ms.get(pol.name, 0.0),
                                  resident.get(c) if pol.name == "static-popular" else None)
            cpu_s = time.process_time() - t0
            row = {"policy": pol.name, "label": labels.get(pol.name, pol.name), "cache_experts": c,
                   **summarize(stats, L, K, cost.expert_bytes, warmup), "predictor_ms": predictor_ms.get(pol.name, 0.0),
                   "sim_steps_per_cpu_s": stream.tokens * L / max(cpu_s, 1e-9)}
            if pol.name == "on-demand":
                base = row["tokens_per_s"]
            rows.append(row)
            bar.update(1)
        for row in rows[-len(policies):]:
            row["speedup_vs_on_demand"] = row["tokens_per_s"] / base if base else None
    bar.close()
    return rows
