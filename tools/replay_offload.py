r"""Measured offloaded decode on a CUDA GPU: the simulator's schedule executed for real, next to its prediction.

Full-size Qwen1.5-MoE-A2.7B experts (3 x 2048 x 1408, random weights) sit in pinned host memory in fp16 and
NF4; each replayed layer keeps C of them in GPU slots. For every policy, the simulator
(validation/prefetch/simulator.py) decides hits, evictions and copies on the trace's routing; this script executes
exactly that schedule: copies on their own CUDA stream ordered with events, each token's routed experts
computed from their slots, and the non-expert work of every layer at full size (attention over a KV cache,
router, shared expert). It measures decode tokens/s and prints it beside the simulator's prediction made
with costs measured on this GPU (docs/PREFETCH.md, validation/prefetch/replay.py).

Layer mapping: trace layer l is replayed layer l. The embedded default's 8 layers become 8 full-size layers
(tokens/s are for an 8-layer model; Qwen1.5-MoE has 24, so divide by 3 for its scale).

The measured tables of docs/PREFETCH.md (one H100/H200; a learned predictor trained first; 3 interleaved rounds
of 256 tokens per run: about the time one round of 512 took, ~3-4 minutes, not yet timed on a GPU):
    python tools/replay_offload.py --traces routing_data/traces/qwen2moe-mini \
        --policies on-demand,lfu,static-popular,prefetch:router-reuse,prefetch:models/hybrid-d1/best_checkpoint.pth,oracle,belady,all-resident \
        --cache-experts 15,30 --formats fp16,nf4 --max-tokens 256 --repeats 3 --json results/replay/replay.json
Correctness only, seconds (small model dimensions; on a CPU the script stops with one line):
    python tools/replay_offload.py --traces runs/demo/traces --model-config qwen2moe-tiny --dry-check
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from collection.traces.format import DEFAULT_TRACES
from common.atomic import atomic_write_json, finite_or_none
from common.errors import UserError, one_line_errors
from models.moe_configs import PRESETS
from validation.prefetch.cost_model import CostModel
from validation.prefetch.locality import locality_line, locality_summary
from validation.prefetch.replay import (
    ModelDims,
    ReplayEngine,
    check_engine,
    host_schedule,
    measure_costs,
    predictor_work,
)
from validation.prefetch.simulator import (
    BASELINE_POLICY,
    CEILING_POLICY,
    DEFAULT_POLICIES,
    POLICIES,
    POLICY_HELP,
    PREDICTED,
    build_stream,
    check_caches,
    parse_policy,
    prepare,
    run_policy,
    static_experts,
    summarize,
)

# the simulator's defaults that a replay can execute (copies on a miss or ahead, slots never re-planned)
REPLAY_POLICIES = ",".join(n for n in DEFAULT_POLICIES.split(",") if parse_policy(n).replayable)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=DEFAULT_TRACES, help=f"trace directory (default {DEFAULT_TRACES})")
    p.add_argument("--policies", default=REPLAY_POLICIES, help=f"comma list of {POLICY_HELP}, those that copy "
                   f"experts (default {REPLAY_POLICIES})")
    p.add_argument("--cache-experts", default="15,30", help="expert slots per layer, comma list (15,30)")
    p.add_argument("--formats", default="fp16,nf4", help="expert storage formats, comma list of fp16, nf4 (fp16,nf4)")
    p.add_argument("--lookahead", type=int, default=1, help="prefetch layer l+d while layer l runs (1)")
    p.add_argument("--fetch-budget", type=int, default=4, help="experts fetched ahead per layer (4)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens decoded per policy and round (512)")
    p.add_argument("--model-config", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS),
                   help="dimensions of the replayed layers and experts (qwen1.5-moe-a2.7b)")
    p.add_argument("--locality", type=float, default=0.0, help="reuse each previous-token expert with probability p "
                   "(as simulate_prefetch.py)")
    p.add_argument("--seed", type=int, default=0, help="split seed (0); also seeds weights and --locality")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all runs, alternating direction; "
                   "each run's speed is the median of its rounds (3)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop when measuring the cost model (200)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same path synchronously, for "
                   "tests only: its copies are not timed and its numbers mean nothing")
    p.add_argument("--dry-check", action="store_true", help="only check correctness (expert from a slot equals the "
                   "host weights; replayed schedules compute what all-resident computes), then stop")
    p.add_argument("--json", default="results/replay/replay.json", help="results (results/replay/replay.json)")
    p.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: at least 1")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device!r}: cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("needs a CUDA GPU (this machine has none): it measures real copies and kernels; "
                        "scripts/simulate_prefetch.py predicts the same numbers on a CPU")
    formats = list(dict.fromkeys(f.strip() for f in args.formats.split(",") if f.strip()))
    if not formats or any(f not in ("fp16", "nf4") for f in formats):
        raise UserError(f"--formats {args.formats!r}: a comma list of fp16, nf4")
    if args.calls <= 0:
        raise UserError("--calls must be positive")
    setup = prepare(args.traces, args.policies, args.lookahead, args.fetch_budget, args.seed, args.locality,
                    args.max_tokens, verify=not args.no_verify)
    ts, policies = setup.ts, setup.policies
    for pol in policies:
        if not pol.replayable:
            raise UserError(f"policy {pol.name}: the replay executes copies only (no CPU compute, low-bit copies or "
                            "re-planned placements); simulate it with scripts/simulate_prefetch.py")
    m = ts.manifest
    L, E, K = m.num_layers, m.num_experts, m.top_k
    try:
        caches = sorted({int(c) for c in args.cache_experts.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--cache-experts {args.cache_experts!r}: a comma list of integers") from None
    check_caches(caches, E)
    d = args.lookahead
    json_path = Path(args.json)

    # --- the stream (first --max-tokens tokens of the test split) and each predictor's top-m
    stream = build_stream(ts, setup.split["test"], setup.predictors, d, args.fetch_budget, args.locality, args.seed,
                          args.max_tokens)
    T = stream.tokens
    loc = locality_summary(stream.ids, stream.first, E)
    dims = ModelDims.from_preset(args.model_config, E, K, max_len=max(512, int(stream.position.max()) + 1))
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (synchronous: timings mean nothing)"
    mapping = (f"trace layer l -> replayed layer l: {L} full-size layers of {args.model_config} (hidden {dims.hidden}, "
               f"{dims.heads} heads, experts 3 x {dims.hidden} x {dims.intermediate}, shared expert "
               f"{dims.shared_intermediate}); all layers copy their experts from one set of {E} pinned host blobs")
    print(f"device: {gpu}; {T} tokens of the test split of {args.traces} ({m.model['name_or_path']}, {L} layers x "
          f"{E} experts, top-{K}); lookahead d = {d}, fetch budget m = {args.fetch_budget}")
    print(mapping)
    print(locality_line(loc))
    engine = ReplayEngine(dims, L, dev, formats, args.seed)
    for f in formats:
        print(f"experts {f}: {engine.stores[f].nbytes:,} bytes each, {E} in pinned host memory "
              f"({engine.stores[f].host.numel() / 2**30:.2f} GiB)")

    # --- 1. correctness before any timing
    check = check_engine(engine, stream, formats, d)
    print("check: " + "; ".join(f"{k} {v:.2e}" for k, v in check.items()) + " -> ok")
    if args.dry_check:
        return

    # --- 2. the cost model measured here (pre phase calibrated on the all-resident replay)
    _, cal = run_policy(POLICIES[CEILING_POLICY], E, stream, CostModel(1, 1.0), d, args.fetch_budget, E, record=True)
    pred_specs = {n: (p.kind, p.config) for n, p in setup.predictors.items()}
    measured = measure_costs(engine, formats, pred_specs, d, calls=args.calls,
                             calibration=host_schedule(cal, stream.weights, stream.position, min(T, 128)))
    raw = measured["raw"]
    print("measured: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in raw.items()
                                   if k != "predictor_ms") + f"; predictor ms {measured['predictor_ms']}")

    # --- 3. every policy: the simulator's prediction with the measured costs, then the real replay
    rows: list[dict[str, Any]] = []
    result = {"device": gpu, "torch": torch.__version__, "traces": str(args.traces), "model": m.model.get("name_or_path"),
              "split": "test", "tokens": T, "num_layers": L, "num_experts": E, "top_k": K, "lookahead": d,
              "fetch_budget": args.fetch_budget, "locality": args.locality, "routing_locality": loc,
              "layer_mapping": mapping,
              "check": check, "measured": raw, "predictor_ms": measured["predictor_ms"],
              "cost_models": {f: c.to_json() for f, c in measured["costs"].items()}, "args": vars(args), "rows": rows}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    runs = [(f, c, p) for f in formats for c in caches for p in policies if not (p.all_resident and c != caches[0])]
    # every run's simulated schedule first, then the timed replays: --repeats rounds over all runs, each round in
    # the other direction (A B C, C B A, ...), so a drift of the machine's speed spreads over every policy; a run's
    # speed is the median of its rounds (one round per run measured 50 and 99 tokens/s for two policies of the same
    # hit rate back to back on an H200: docs/PREFETCH.md)
    plans = []
    works: dict[str, Any] = {}  # a learned predictor's graphs are built once, for every run that uses it
    for fmt, c, pol in runs:
        cost = measured["costs"][fmt]
        p_ms = measured["predictor_ms"].get(pol.prefetch_key, 0.0) if pol.prefetch == PREDICTED else 0.0
        resident = static_experts(ts, setup.split["train"], c) if pol.placement == "popular" else None
        stats, sched = run_policy(pol, c, stream, cost, d, args.fetch_budget, E, p_ms, resident, record=True)
        if pol.prefetch == PREDICTED and pol.prefetch_key not in works:
            works[pol.prefetch_key] = predictor_work(setup.predictors[pol.prefetch_key].kind, engine, d,
                                                     setup.predictors[pol.prefetch_key].config)
        preload = ({l: [(e, e) for e in range(E)] for l in range(L)} if pol.all_resident else
                   # the kernel fills a static cache in expert order, slot by slot
                   {l: list(zip(np.flatnonzero(resident[l])[:c].tolist(), range(c))) for l in range(L)}
                   if resident is not None else None)
        sim = summarize(stats, L, K, cost.expert_bytes)
        rows.append({"format": fmt, "cache_experts": sched.slots if not pol.all_resident else E, "policy": pol.name,
                     "label": setup.labels.get(pol.name, pol.name),
                     "predicted_tokens_per_s": sim["tokens_per_s"], "measured_seconds": [],
                     **{f"sim/{k}": v for k, v in sim.items()}})
        plans.append((fmt, pol, host_schedule(sched, stream.weights, stream.position, T), preload,
                      works.get(pol.prefetch_key), rows[-1]))
    bar = tqdm(total=len(plans) * args.repeats, desc="replay", unit="run", dynamic_ncols=True)
    for rnd in range(args.repeats):
        for fmt, pol, hs, preload, work, row in (plans if rnd % 2 == 0 else plans[::-1]):
            if preload is not None:
                engine.preload(fmt, preload)
            if rnd == 0:  # untimed warm-up on the run's own schedule: one-time costs stay out of the timed runs
                engine.run(fmt, replace(hs, position=hs.position[:32]), d, pol.prefetch != 0, work)
                if preload is not None:
                    engine.preload(fmt, preload)
            seconds, _ = engine.run(fmt, hs, d, pol.prefetch != 0, work)
            row["measured_seconds"].append(seconds)
            row["measured_tokens_per_s"] = T / float(np.median(row["measured_seconds"]))
            row["measured_over_predicted"] = row["measured_tokens_per_s"] / row["predicted_tokens_per_s"]
            row["measured_spread"] = max(row["measured_seconds"]) / min(row["measured_seconds"])
            bar.update()
        tqdm.write(f"round {rnd + 1} of {args.repeats}: " + ", ".join(
            f"{r['label']} {T / r['measured_seconds'][-1]:.1f}" for r in rows[:len(policies)]) + " tokens/s"
            + (" (first format and cache size)" if len(rows) > len(policies) else ""))
        atomic_write_json(json_path, finite_or_none(result))  # after every round: a cut-off run keeps what it measured
    bar.close()
    for r in rows:  # measured speedup over on-demand at the same format and cache size
        base = [b for b in rows if (b["format"], b["cache_experts"], b["policy"]) == (r["format"], r["cache_experts"],
                                                                                   BASELINE_POLICY)]
        r["measured_speedup_vs_on_demand"] = (r["measured_tokens_per_s"] / base[0]["measured_tokens_per_s"]
                                              if base else None)
    print_table(rows)
    atomic_write_json(json_path, finite_or_none(result))
    worst = max(abs(r["measured_over_predicted"] - 1) for r in rows)
    spread = max(r["measured_spread"] for r in rows)
    print(f"largest spread of one run over its {args.repeats} rounds (slowest / fastest): {spread:.2f}")
    print(f"largest |measured / predicted - 1| = {worst:.1%} (target: within 15%); wrote {json_path}")


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'fmt':<5} {'C':>3} {'policy':<34} {'hit rate':>8} {'MB/tok':>7} {'predicted':>10} {'measured':>10} "
            f"{'ratio':>6}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['format']:<5} {r['cache_experts']:>3} {r['label'][:34]:<34} {r['sim/hit_rate']:>8.4f} "
              f"{r['sim/bytes_moved_per_token'] / 1e6:>7.1f} {r['predicted_tokens_per_s']:>10.2f} "
              f"{r['measured_tokens_per_s']:>10.2f} {r['measured_over_predicted']:>6.3f}")


if __name__ == "__main__":
    with one_line_errors("replay_offload"):
        main()
