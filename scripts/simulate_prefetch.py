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
After `make demo`, its traces and predictor (what its last lines report; seconds on a CPU):
    python scripts/simulate_prefetch.py --traces runs/demo/traces --lookahead 1 --cache-experts 8,15,30 \
        --policies on-demand,prefetch:router-reuse,prefetch:runs/demo/layer-aware-d1/best_checkpoint.pth \
        --output-dir runs/demo/prefetch-d1
Seconds on a CPU (the quick traces of the collect script and the hybrid of the train script's quick command):
    python scripts/simulate_prefetch.py --traces routing_data/traces/quick --lookahead 1 --cache-experts 8,15 \
        --policies on-demand,prefetch:router-reuse,prefetch:models/hybrid_checkpoints/quick/best_checkpoint.pth,oracle \
        --output-dir results/prefetch-quick
"""
from __future__ import annotations

import argparse
from pathlib import Path

from collection.traces.format import DEFAULT_TRACES
from common.atomic import atomic_write_json
from common.errors import one_line_errors
from models.moe_configs import PRESETS
from validation.plots import prefetch_figure
from validation.prefetch.cost_model import DEFAULT_EXPERT_MS, DEFAULT_PRE_MS, DEFAULT_SHARED_MS, FORMATS, LINKS
from validation.prefetch.driver import DEFAULT_POLICIES, cost_from_args, measure_on_gpu, print_table, resolve, simulate
from validation.prefetch.simulator import POLICY_HELP, build_stream, static_experts


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
    g = p.add_argument_group("cost model (validation/prefetch/cost_model.py)")
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
                   "above to this sum (their defaults sum to 1.2 ms: HF eager decode measured on an H200)")
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = resolve(args)
    ts, policies, caches = r["ts"], r["policies"], r["caches"]
    m = ts.manifest
    L, E, K = m.num_layers, m.num_experts, m.top_k

    # --- the stream, each predictor's top-m, and the static cache contents (training split counts)
    stream = build_stream(ts, r["split"]["test"], r["predictors"], args.lookahead, args.fetch_budget, args.locality,
                          args.seed, args.max_tokens)
    resident = ({c: static_experts(ts, r["split"]["train"], c) for c in caches}
                if any(p.name == "static-popular" for p in policies) else {})

    # --- costs: the flags' (defaults: HF eager decode measured on an H200), or measured on this GPU by the replay's code
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
