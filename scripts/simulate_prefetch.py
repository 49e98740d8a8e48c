r"""What prediction buys: replay a trace set's test split through a GPU expert cache and a cost model.

The test split's sequences, one after another, are decoded at batch 1 (token t, layers 0..L-1); each layer
keeps C expert slots on the GPU, the rest of the experts sit in pinned host memory behind one copy engine.
For every policy and cache size: hit rate, demand misses, bytes moved per token (used and wasted
speculative bytes), stall ms per token, predicted decode tokens/s and the speedup over on-demand LRU.
Formulas and measured tables: docs/PREFETCH.md. Writes a table, flat JSON and a PNG.

The tables of docs/PREFETCH.md (embedded default; a learned predictor trained with --lookahead 1):
    python scripts/simulate_prefetch.py --traces routing_data/traces/qwen2moe-mini \
        --policies on-demand,lfu,static-popular,prefetch:router-reuse,prefetch:models/hybrid-d1/best_checkpoint.pth,oracle,belady,all-resident \
        --cache-experts 4,8,15,30,45,60 --lookahead 1 --fetch-budget 4 --link pcie5 --expert-format fp16
Costs measured on this machine's GPU instead of the defaults (pinned copy bandwidth, per-layer compute):
    python scripts/simulate_prefetch.py --measure --expert-format nf4
Seconds on a CPU (traces from `make demo`):
    python scripts/simulate_prefetch.py --traces runs/demo/traces --cache-experts 8,15 \
        --policies on-demand,prefetch:popularity,oracle,belady --output-dir results/prefetch-quick
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from collection.errors import UserError, number_flag, one_line_errors
from collection.paths import check_writable
from collection.atomic import atomic_write_json
from collection.format import DEFAULT_TRACES
from models.moe_configs import PRESETS
from validation.cache_sim import (POLICIES, POLICY_HELP, Policy, Stream, build_stream, check_caches, prepare, run_policy, static_experts,
                                  summarize)
from validation.cost_model import (DEFAULT_EXPERT_MS, DEFAULT_PRE_MS, DEFAULT_SHARED_MS, FORMATS, LINKS, CostModel,
                                   expert_bytes, expert_params)
from validation.plots import prefetch_figure

DEFAULT_POLICIES = "on-demand,lfu,static-popular,prefetch:router-reuse,oracle,belady,all-resident"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what is replayed")
    g.add_argument("--traces", default=DEFAULT_TRACES, help=f"trace directory (default {DEFAULT_TRACES})")
    g.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma list of {POLICY_HELP} (default {DEFAULT_POLICIES})")
    g.add_argument("--seed", type=int, default=0, help="split seed, as in training (0); also seeds --locality")
    g.add_argument("--max-tokens", type=int, default=None, help="replay only the first N tokens of the stream")
    g.add_argument("--warmup-tokens", type=int, default=0, help="leave the first N tokens out of the statistics (0: "
                   "a cold cache counts)")
    g.add_argument("--locality", type=float, default=0.0, help="with probability p each expert of the previous token "
                   "is reused at the same layer (0 = the traces as collected; docs/PREFETCH.md)")
    g = p.add_argument_group("cache and prefetch")
    g.add_argument("--cache-experts", default="4,8,15,30,45,60", help="expert slots per layer, a comma list to sweep")
    g.add_argument("--cache-gib", type=float, default=None, help="total GPU cache over all layers instead (GiB)")
    g.add_argument("--lookahead", type=int, default=1, help="prefetch layer l+d while layer l runs (d, default 1)")
    g.add_argument("--fetch-budget", type=int, default=4, help="experts fetched ahead per layer (m, default 4)")
    g = p.add_argument_group("cost model (validation/cost_model.py)")
    g.add_argument("--model-config", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS),
                   help="model whose expert size is moved (default qwen1.5-moe-a2.7b: 3 x 2048 x 1408)")
    g.add_argument("--expert-format", default="fp16", choices=FORMATS, help="storage format of the experts (fp16)")
    g.add_argument("--link", default="pcie5", choices=sorted(LINKS), help="host-to-GPU link preset (pcie5 = 55 GB/s, "
                   "pcie4 = 25 GB/s)")
    g.add_argument("--link-gbps", type=float, default=None, help="link bandwidth in GB/s (overrides --link)")
    g.add_argument("--pre-ms", type=float, default=DEFAULT_PRE_MS, help=f"attention + router per layer "
                   f"({DEFAULT_PRE_MS} ms)")
    g.add_argument("--shared-ms", type=float, default=DEFAULT_SHARED_MS, help=f"shared expert per layer "
                   f"({DEFAULT_SHARED_MS} ms)")
    g.add_argument("--expert-ms", type=float, default=DEFAULT_EXPERT_MS, help=f"one routed expert, one token "
                   f"({DEFAULT_EXPERT_MS} ms; with the defaults a layer takes 1.2 ms)")
    g.add_argument("--layer-ms", type=float, default=None, help="per-layer compute in total: scales the three phases "
                   "above to this sum (their defaults sum to 1.2 ms: HF eager, docs/anchors)")
    g.add_argument("--token-ms", type=float, default=0.0, help="per token outside the layers (0 ms)")
    g.add_argument("--predictor-ms", type=float, default=None, help="every predictor's time per layer (default: "
                   "0.05 ms learned, 0.01 router-reuse, 0 table look-ups)")
    g.add_argument("--measure", action="store_true", help="measure pinned copy bandwidth and per-layer compute "
                   "(full-size layer of --model-config) on this machine's CUDA GPU, and use them")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="results/prefetch", help="JSON and PNG go here (results/prefetch)")
    g.add_argument("--json", default=None, help="JSON path (default <output-dir>/prefetch.json)")
    g.add_argument("--plot", default=None, help="PNG path (default <output-dir>/prefetch.png)")
    g.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    return p.parse_args(argv)


MAX_MS = 1e6        # one phase of one layer: 1000 s is beyond any machine (the cost model sums them per token)
MAX_GBPS = 1e5      # a host-to-GPU link: 100 TB/s
MAX_CACHE_GIB = 1 << 20


def check_flags(args: argparse.Namespace) -> None:
    """The flags that need no traces, each a finite number in its range: NaN or an infinity would turn every
    cost into NaN (and prefetch.json into text no JSON reader accepts); a huge one overflows the cache count."""
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be in 0..{2**63 - 1}")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UserError(f"--max-tokens {args.max_tokens}: must be positive")
    if args.warmup_tokens < 0 or (args.max_tokens is not None and args.warmup_tokens >= args.max_tokens):
        raise UserError("--warmup-tokens must be >= 0 and below --max-tokens")
    number_flag("locality", args.locality, 0, 1)
    for name in ("pre_ms", "shared_ms", "expert_ms", "token_ms", "predictor_ms"):
        number_flag(name.replace("_", "-"), getattr(args, name), 0, MAX_MS)
    number_flag("layer-ms", args.layer_ms, 0, MAX_MS, above_low=True)
    number_flag("link-gbps", args.link_gbps, 0, MAX_GBPS, above_low=True)
    number_flag("cache-gib", args.cache_gib, 0, MAX_CACHE_GIB)
    # every destination, before the traces are read
    if args.json is None or args.plot is None:
        check_writable("--output-dir", args.output_dir, "dir")
    check_writable("--json", args.json, "file")
    check_writable("--plot", args.plot, "file")


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Every check of the input, before anything is computed or written (one line, exit 2, on failure)."""
    check_flags(args)
    setup = prepare(args.traces, args.policies, args.lookahead, args.fetch_budget, args.seed, args.locality,
                    args.max_tokens, verify=not args.no_verify)
    m = setup.ts.manifest
    nbytes = expert_bytes(expert_params(args.model_config), args.expert_format)
    if args.cache_gib is not None:
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

        if not torch.cuda.is_available():
            raise UserError("--measure needs a CUDA GPU (this machine has none); drop it to use the cost model's "
                            "defaults or set --pre-ms/--shared-ms/--expert-ms/--link-gbps")
    return {"ts": setup.ts, "policies": setup.policies, "caches": caches, "split": setup.split,
            "predictors": setup.predictors, "expert_bytes": nbytes}


def cost_from_args(args: argparse.Namespace, nbytes: int, top_k: int) -> CostModel:
    link = args.link_gbps * 1e9 if args.link_gbps is not None else LINKS[args.link]
    phases = (args.pre_ms, args.shared_ms, args.expert_ms)
    if args.layer_ms is not None:  # keep the phases' proportions, change their sum
        total = args.pre_ms + args.shared_ms + top_k * args.expert_ms
        if total <= 0:
            raise UserError("--layer-ms scales --pre-ms/--shared-ms/--expert-ms, which are all 0")
        scale = args.layer_ms / total
        phases = tuple(x * scale for x in phases)
    return CostModel(nbytes, link, *phases, args.token_ms,
                     source=f"flags ({'--link-gbps' if args.link_gbps else args.link})")


def measure_on_gpu(args: argparse.Namespace, stream: Any, predictors: dict[str, Any], L: int, E: int, K: int
                   ) -> tuple[CostModel, dict[str, float]]:
    """Pinned copy time per expert and per-layer compute of the replay's full-size layer (validation/offload.py),
    with its pre phase calibrated on a 128-token all-resident replay, on this machine's GPU."""
    import torch

    from validation.offload import ModelDims, ReplayEngine, host_schedule, measure_costs

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = resolve(args)
    ts, policies, caches = r["ts"], r["policies"], r["caches"]
    m = ts.manifest
    L, E, K = m.num_layers, m.num_experts, m.top_k

    # --- the stream, each predictor's top-m, and the static cache contents (training split counts)
    stream = build_stream(ts, r["split"]["test"], r["predictors"], args.lookahead, args.fetch_budget, args.locality,
                          args.seed, args.max_tokens)
    if args.warmup_tokens >= stream.tokens:  # no token would be counted: every statistic would be 0 / 0
        raise UserError(f"--warmup-tokens {args.warmup_tokens}: the test split's stream has only {stream.tokens} "
                        "tokens; lower it")
    resident = ({c: static_experts(ts, r["split"]["train"], c) for c in caches}
                if any(p.name == "static-popular" for p in policies) else {})

    # --- costs: the flags' (defaults from docs/anchors), or measured on this GPU with the replay's own code
    if args.measure:
        cost, pred_ms = measure_on_gpu(args, stream, r["predictors"], L, E, K)
    else:
        cost = cost_from_args(args, r["expert_bytes"], K)
        pred_ms = {n: p.predictor_ms for n, p in r["predictors"].items()}
    if args.predictor_ms is not None:
        pred_ms = {n: args.predictor_ms for n in r["predictors"]}
    print(f"stream: {stream.tokens:,} tokens of {len(r['split']['test'])} test sequences ({m.model['name_or_path']}, "
          f"{L} layers x {E} experts, top-{K}); locality p = {args.locality}; lookahead d = {args.lookahead}, "
          f"fetch budget m = {args.fetch_budget}")
    print(f"cost model ({cost.source}): expert {cost.expert_bytes / 1e6:.2f} MB ({args.model_config}, "
          f"{args.expert_format}), link {cost.link_bytes_per_s / 1e9:.1f} GB/s -> {cost.copy_ms:.3f} ms per expert; "
          f"layer {cost.pre_ms:.3f} pre + {cost.shared_ms:.3f} shared + {K} x {cost.expert_ms:.3f} experts = "
          f"{cost.layer_ms(K):.3f} ms; token overhead {cost.token_ms:.3f} ms")

    # --- every policy at every cache size
    labels = {n: p.label for n, p in r["predictors"].items()}
    rows = simulate(policies, caches, stream, cost, args.lookahead, args.fetch_budget, E, pred_ms, resident,
                    args.warmup_tokens, labels)
    print()
    print_table(rows)
    rate = min(row["sim_steps_per_cpu_s"] for row in rows if row["policy"] != "all-resident")
    print(f"\nsimulator: {stream.tokens * L:,} (token, layer) steps per policy; slowest policy "
          f"{rate / 1e6:.1f}M steps per CPU-second")

    # --- outputs
    out = Path(args.output_dir)
    json_path = Path(args.json) if args.json else out / "prefetch.json"
    plot_path = Path(args.plot) if args.plot else out / "prefetch.png"
    result = {"traces": str(args.traces), "model": m.model.get("name_or_path"), "split": "test",
              "tokens": stream.tokens, "num_layers": L, "num_experts": E, "top_k": K, "lookahead": args.lookahead,
              "fetch_budget": args.fetch_budget, "locality": args.locality, "expert_format": args.expert_format,
              "model_config": args.model_config, "cost_model": cost.to_json(), "predictor_ms": pred_ms,
              "args": vars(args), "rows": rows}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, result)
    prefetch_figure(rows, f"{m.model.get('name_or_path')} test split, d={args.lookahead}, m={args.fetch_budget}, "
                    f"{args.expert_format}, {cost.link_bytes_per_s / 1e9:.0f} GB/s, locality {args.locality}", plot_path)
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    with one_line_errors("simulate_prefetch"):
        main()
