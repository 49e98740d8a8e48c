"""Which policy wins where: the simulator swept over link x compute x GPU budget x locality x batch (`--map`).

For each locality (one stream, its predictions and scores computed once) and batch size (lanes dealt once),
every compute profile, link and budget is one cell: every policy of the map is replayed, the best one a real
system can run at full precision (not the oracle, Belady or all-resident; not lowbit-on-miss, which computes
from low-bit copies and is reported beside it) is named, with its speedup over on-demand LRU and its tokens/s
over the oracle's (prefetch of the true experts) and Belady's (evict the furthest next use). All figures are
simulated; the header and the JSON name each locality's measured summary (locality.py).

    compute  hf-eager   docs/anchors: HF eager, H200, batched_mm: pre 0.43 + shared 0.53 + K x 0.06 ms per layer
             engine     an optimised engine, 0.2 ms per layer: pre 0.08 + shared 0.06 + K x 0.015 (a hypothetical
                        split), or the figures of --engine-costs: a JSON object with pre_ms, shared_ms, expert_ms
                        (and optionally token_ms), or one holding them under "cost_models" / "costs" per format
                        (its first format's), or tools/bench_offload.py's JSON: the phases the engine measured on
                        itself in its first on-demand row (ENGINE_ROW)
    budget   a fraction f of each layer's experts: C = max(1, round(f x E)) slots per layer (split by --split)
    locality 0 = the traces as collected; p > 0: `--locality p`
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_json
from common.errors import UserError
from validation.plots import policy_map_figure
from validation.prefetch.cost_model import LINKS, default_policies_for
from validation.prefetch.cpu_cost import measure_cpu_expert
from validation.prefetch.driver import (
    cost_from_args,
    popularity_of,
    resolve,
    run_one,
    split_for,
)
from validation.prefetch.locality import REAL_MODELS, locality_line, locality_summary
from validation.prefetch.simulator import (
    ACCESSES,
    BASELINE_POLICY,
    END_MS,
    LOWBIT_COMPUTE,
    PREFILL_MS,
    TOKENS,
    build_stream,
    parse_policies,
    short_name,
    top_popular,
)
from validation.prefetch.workload import as_batch, with_prompts

# the row of tools/bench_offload.py's JSON whose measured phases stand for the engine: on-demand LRU on the model's
# own routing, the first cache size (no predictor's work in its pre phase)
ENGINE_ROW = "on-demand (own routing)"
COMPUTE = {"hf-eager": (0.43, 0.53, 0.06), "engine": (0.08, 0.06, 0.015)}  # pre, shared, expert ms (docstring)
MAP_POLICIES = ("on-demand,lfu,lfru,least-stale,static-popular,static-frequency,lowbit-on-miss,"
                "evict:frequency-window,prefetch:router-reuse,oracle,belady")
MAP_CPU_POLICIES = "cpu-compute,cpu-compute+prefetch,static-frequency+cpu-compute"
REFERENCES = ("oracle", "belady")


def add_map_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the map (--map): link x compute x GPU budget x locality x batch")
    g.add_argument("--map", action="store_true", help="sweep the axes below and name the best policy of each cell")
    g.add_argument("--map-links", default="pcie4,pcie5,nvlink-c2c", help=f"links, of {', '.join(LINKS)} "
                   "(pcie4,pcie5,nvlink-c2c)")
    g.add_argument("--map-compute", default="hf-eager,engine", help="compute profiles: hf-eager, engine "
                   "(hf-eager,engine)")
    g.add_argument("--engine-costs", default=None, help="JSON with the engine's own pre_ms, shared_ms, expert_ms "
                   "(and token_ms) for the engine profile, or tools/bench_offload.py's JSON (its on-demand row's "
                   "measured phases; default: 0.2 ms per layer, hypothetical)")
    g.add_argument("--map-budgets", default="0.05,0.15,0.3,0.5", help="GPU budgets as fractions of each layer's "
                   "experts (0.05,0.15,0.3,0.5)")
    g.add_argument("--map-localities", default="0,0.4,0.8", help="--locality values; 0 = as collected (0,0.4,0.8)")
    g.add_argument("--map-batches", default="1,8", help="batch sizes (1,8)")


def _axis(flag: str, text: str, kind: type, check: Any) -> list[Any]:
    try:
        values = list(dict.fromkeys(kind(v.strip()) for v in text.split(",") if v.strip()))
    except ValueError:
        raise UserError(f"{flag} {text!r}: a comma list of {kind.__name__} values") from None
    if not values:
        raise UserError(f"{flag} is empty: the map needs at least one value on every axis")
    for v in values:
        check(v)
    return values


def map_axes(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The five axes, each checked (an empty axis or a bad value: one line)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)
    return {
        "link": _axis("--map-links", args.map_links, str,
                      lambda v: need(v in LINKS, f"--map-links: unknown link {v!r}; choose from {', '.join(LINKS)}")),
        "compute": _axis("--map-compute", args.map_compute, str,
                         lambda v: need(v in COMPUTE, f"--map-compute: unknown profile {v!r}; choose from "
                                                      f"{', '.join(COMPUTE)}")),
        "budget": _axis("--map-budgets", args.map_budgets, float,
                        lambda v: need(0 < v <= 1, f"--map-budgets: {v} is not a fraction of the experts in (0, 1]")),
        "locality": _axis("--map-localities", args.map_localities, float,
                          lambda v: need(0 <= v <= 1, f"--map-localities: {v} is not a probability")),
        "batch": _axis("--map-batches", args.map_batches, int,
                       lambda v: need(v >= 1, f"--map-batches: {v}: at least 1")),
    }


def engine_phases(path: str | None) -> tuple[tuple[float, float, float, float], str]:
    """(pre, shared, expert, token ms) of the engine profile, and where they come from."""
    if path is None:
        return (*COMPUTE["engine"], 0.0), "0.2 ms per layer, hypothetical split"
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--engine-costs {path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None
    costs, where = raw, path
    for key in ("cost_models", "costs"):  # phases per expert format: the first format's
        if isinstance(raw, dict) and isinstance(raw.get(key), dict) and raw[key]:
            costs = next(iter(raw[key].values()))
    if isinstance(raw, dict) and isinstance(raw.get("rows"), list):  # tools/bench_offload.py: the engine on itself
        row = next((r for r in raw["rows"] if isinstance(r, dict) and ENGINE_ROW in str(r.get("label"))
                    and isinstance(r.get("calibration"), dict)), None)
        if row is None:
            raise UserError(f"--engine-costs {path}: a benchmark JSON without a calibrated '{ENGINE_ROW}' row")
        costs = row["calibration"].get("cost")
        where = f"{path}: {row['label']}, {raw.get('device', 'device not named')}"
    try:
        phases = tuple(float(costs[k]) for k in ("pre_ms", "shared_ms", "expert_ms")) + (float(costs.get("token_ms", 0)),)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"--engine-costs {path}: needs numbers pre_ms, shared_ms, expert_ms (ms)") from None
    if not all(math.isfinite(v) for v in phases) or min(phases) < 0 or sum(phases[:3]) <= 0:
        raise UserError(f"--engine-costs {path}: the phases must be finite numbers >= 0 and not all 0")
    return phases, f"the engine's measured figures ({where})"


def run_map(args: argparse.Namespace) -> None:
    """The whole map: checks, streams, cells, table, JSON and heatmap (module docstring)."""
    t_start = time.perf_counter()
    axes = map_axes(args)
    engine, engine_source = engine_phases(args.engine_costs)
    cpu_given = args.cpu_expert_ms is not None or args.measure_cpu
    if args.policies is None:
        args.policies = default_policies_for(MAP_POLICIES + ("," + MAP_CPU_POLICIES if cpu_given else ""),
                                             args.expert_format)
    names = [p.strip() for p in args.policies.split(",")]
    for ref in (BASELINE_POLICY, *REFERENCES):  # every cell is measured against these
        if ref not in names:
            args.policies += f",{ref}"
    args.locality, args.gpu_gib, args.batch = axes["locality"][0], None, max(axes["batch"])
    args.cache_experts = "1"
    r = resolve(args)
    m = r.ts.manifest
    L, E, K = m.num_layers, m.num_experts, m.top_k
    policies = parse_policies(args.policies)
    candidates = [p for p in policies if p.realizable and p.exact]
    lossy = [p for p in policies if p.realizable and not p.exact]
    cpu = measure_cpu_expert(r.shape, args.expert_format, args.cpu_threads, max(axes["batch"])) \
        if args.measure_cpu else None
    popularity = popularity_of(r) if any(p.placement == "popular" for p in policies) else None
    pred_ms = {n: (args.predictor_ms if args.predictor_ms is not None else p.predictor_ms)
               for n, p in r.predictors.items()}

    cells: list[dict[str, Any]] = []
    localities: dict[str, dict[str, float]] = {}
    args.quiet = True
    for p_loc in axes["locality"]:
        base = build_stream(r.ts, r.split["test"], r.predictors, args.lookahead, args.fetch_budget, p_loc, args.seed,
                            args.max_tokens, progress=False)
        loc = {**locality_summary(base.ids, base.first, E), "locality_p": p_loc}
        localities[str(p_loc)] = loc
        base = with_prompts(base, args.prompt_tokens, E)
        for batch in axes["batch"]:
            stream = as_batch(base, batch)
            scores: dict[str, np.ndarray] = {}
            caps_of = {f: _caps(r, args, f, L, E, p_loc) for f in axes["budget"]}
            for compute in axes["compute"]:
                pre, shared, expert, token = engine if compute == "engine" else (*COMPUTE[compute], 0.0)
                if not r.shape.shared_width and compute == "hf-eager":
                    shared = 0.0
                for link in axes["link"]:
                    a = argparse.Namespace(**{**vars(args), "link": link, "link_gbps": None, "pre_ms": pre,
                                              "shared_ms": shared, "expert_ms": expert, "token_ms": token,
                                              "layer_ms": None, "batch": batch})
                    cost = cost_from_args(a, r.shape, K, cpu)
                    for f in axes["budget"]:
                        caps = caps_of[f]
                        resident = top_popular(popularity, caps) if popularity is not None else None
                        tps, low_share = {}, {}
                        for pol in policies:
                            stats = run_one(pol, caps, stream, cost, a, E, pred_ms,
                                            resident if pol.placement == "popular" else None, r.knobs, scores)
                            tps[pol.name] = _tokens_per_s(stats)
                            if not pol.exact:
                                low_share[pol.name] = stats[:, LOWBIT_COMPUTE].sum() / stats[:, ACCESSES].sum()
                        best = max(candidates, key=lambda p: tps[p.name]).name
                        lru = tps[BASELINE_POLICY]
                        cell = {"link": link, "compute": compute, "budget": f, "locality": p_loc, "batch": batch,
                                "slots_per_layer": caps.tolist(), "best": best, "best_tokens_per_s": tps[best],
                                "speedup_vs_lru": tps[best] / lru, "best_over_oracle": tps[best] / tps["oracle"],
                                "best_over_belady": tps[best] / tps["belady"], "tokens_per_s": tps}
                        if lossy:  # the best low-precision policy, beside the exact one
                            low = max(lossy, key=lambda p: tps[p.name]).name
                            cell.update({"best_lowbit": low, "lowbit_over_best": tps[low] / tps[best],
                                         "lowbit_share": low_share[low]})
                        cells.append(cell)
    seconds = time.perf_counter() - t_start
    print_map(cells, axes, localities, engine_source, cpu_given)
    print(f"\nthe map: {len(cells)} cells x {len(policies)} policies in {seconds:.0f} s")
    out = Path(args.output_dir)
    json_path = Path(args.json) if args.json else out / "prefetch_map.json"
    plot_path = Path(args.plot) if args.plot else out / "prefetch_map.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, {
        "simulated": True, "traces": str(args.traces), "model": m.model.get("name_or_path"),
        "model_config": args.model_config, "expert_format": args.expert_format, "axes": axes,
        "engine_costs": engine_source, "cpu_expert_ms": cpu["cpu_expert_ms"] if cpu else args.cpu_expert_ms,
        "cpu_measured": cpu, "policies": [p.name for p in policies], "routing_locality": localities,
        "real_models": REAL_MODELS, "seconds": seconds, "args": vars(args), "cells": cells})
    policy_map_figure(cells, axes, localities, plot_path, short_name)
    print(f"wrote {json_path} and {plot_path}")


def _caps(r: Any, args: argparse.Namespace, fraction: float, L: int, E: int, locality: float) -> np.ndarray:
    c = max(1, round(fraction * E))
    return split_for(r, args, c * L, args.split, locality) if args.split != "uniform" else np.full(L, c, np.int64)


def _tokens_per_s(stats: np.ndarray) -> float:
    """Decode tokens/s of one run (its prefill time left out)."""
    ms = stats[-1, END_MS] - stats[:, PREFILL_MS].sum()
    return 1e3 * stats[:, TOKENS].sum() / ms


def print_map(cells: list[dict[str, Any]], axes: dict[str, list[Any]], localities: dict[str, dict[str, float]],
              engine_source: str, cpu_given: bool) -> None:
    """One line per (locality, batch, compute, link), one column per budget: the best exact policy, its speedup
    over LRU, its tokens/s over the oracle's / Belady's; then what the low-bit policy adds, per locality."""
    print("the map (all figures simulated): best realizable full-precision policy, its speedup over on-demand LRU, "
          "and its tokens/s over the oracle's / Belady's")
    print(f"engine profile: {engine_source}" + ("" if cpu_given else "; no CPU cost given: CPU policies left out "
                                                 "(--cpu-expert-ms or --measure-cpu)"))
    by = {(c["locality"], c["batch"], c["compute"], c["link"], c["budget"]): c for c in cells}
    for p_loc in axes["locality"]:
        print("\n" + locality_line(localities[str(p_loc)]) + f" [--locality {p_loc}]")
        head = f"{'batch':>5} {'compute':<9} {'link':<11}" + "".join(f"{f'{b:.0%} of experts':>27}"
                                                                      for b in axes["budget"])
        print(head)
        for batch in axes["batch"]:
            for compute in axes["compute"]:
                for link in axes["link"]:
                    row = f"{batch:>5} {compute:<9} {link:<11}"
                    for b in axes["budget"]:
                        c = by[(p_loc, batch, compute, link, b)]
                        row += (f"{short_name(c['best'])[:10]:>11} {c['speedup_vs_lru']:4.2f}x "
                                f"{c['best_over_oracle']:4.2f}/{c['best_over_belady']:4.2f}")
                    print(row)
        low = [c for c in cells if c["locality"] == p_loc and "best_lowbit" in c]
        if low:
            gain = [c["lowbit_over_best"] for c in low]
            share = [c["lowbit_share"] for c in low]
            print(f"low precision: {low[0]['best_lowbit']} reaches {min(gain):.2f}-{max(gain):.2f}x the best exact "
                  f"policy's tokens/s, computing {min(share):.0%}-{max(share):.0%} of the experts from low-bit copies")
