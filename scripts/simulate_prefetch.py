r"""What prediction buys: replay a trace set's test split through a GPU expert cache and a cost model.

The test split's sequences, one after another, are decoded (token t, layers 0..L-1; --batch B: B sequences
at once); each layer keeps C expert slots on the GPU, the rest of the experts sit in pinned host memory
behind one copy engine. For every policy and cache size: hit rate, demand misses, bytes moved per token
(used and wasted speculative bytes), stall ms per token, predicted decode tokens/s (and prefill tokens/s with
--prompt-tokens) and the speedup over on-demand LRU, under a header naming the routing's locality.
--map sweeps link x compute x GPU budget x locality x batch and names the best policy of each cell.
Formulas and measured tables: docs/PREFETCH.md. Writes a table, flat JSON and a PNG (all simulated).

The tables of docs/PREFETCH.md (embedded default; a learned predictor trained with --lookahead 1):
    python scripts/simulate_prefetch.py --traces routing_data/traces/qwen2moe-mini \
        --policies on-demand,lfu,static-popular,prefetch:router-reuse,prefetch:models/hybrid-d1/best_checkpoint.pth,oracle,belady,all-resident \
        --cache-experts 4,8,15,30,45,60 --lookahead 1 --fetch-budget 4 --link pcie5 --expert-format fp16
A GPU budget shared with the KV cache, split by marginal hit rate, CPU compute of misses, prefill and batch:
    python scripts/simulate_prefetch.py --gpu-gib 8 --context 4096 --split optimised --cpu-expert-ms 0.25 \
        --policies on-demand,cpu-compute,cpu-compute+prefetch,lfru,least-stale --prompt-tokens 32 --batch 8
The map (docs/PREFETCH.md "Which policy wins where"; minutes on 2 CPU cores):
    python scripts/simulate_prefetch.py --traces runs/demo/traces --map --cpu-expert-ms 0.25 \
        --output-dir results/prefetch-map
Costs measured on this machine's GPU by the offload engine instead of the defaults (its copies, its phases, its
predictors' time; the preset with random weights and the traces' routing forced into it):
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

import torch

from collection.traces.format import DEFAULT_TRACES
from common.atomic import atomic_write_json
from common.errors import UserError, one_line_errors
from common.paths import check_writable
from models.moe_configs import PRESETS
from offload.costs import measure_on_engine
from validation.plots import prefetch_figure
from validation.prefetch.budget import SPLITS
from validation.prefetch.cost_model import (
    DEFAULT_EXPERT_MS,
    DEFAULT_PRE_MS,
    DEFAULT_PREFILL_TFLOPS,
    DEFAULT_SHARED_MS,
    FORMATS,
    LINKS,
    default_policies_for,
    lowbit_below,
)
from validation.prefetch.cpu_cost import measure_cpu_expert
from validation.prefetch.driver import (
    cache_sizes,
    cost_from_args,
    header_lines,
    measure_cache,
    needs_popularity,
    popularity_of,
    print_table,
    resolve,
    simulate,
    with_policy_costs,
    workload,
)
from validation.prefetch.policy_map import add_map_args, run_map
from validation.prefetch.simulator import DEFAULT_POLICIES, POLICY_HELP, Knobs

DEFAULT_CACHES = "4,8,15,30,45,60"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what is replayed")
    g.add_argument("--traces", default=DEFAULT_TRACES, help=f"trace directory (default {DEFAULT_TRACES})")
    g.add_argument("--policies", default=None, help=f"comma list of {POLICY_HELP} (default {DEFAULT_POLICIES}; "
                   "--map: its own list)")
    g.add_argument("--seed", type=int, default=0, help="split seed, as in training (0); also seeds --locality")
    g.add_argument("--max-tokens", type=int, default=None, help="replay only the first N tokens of the stream")
    g.add_argument("--warmup-tokens", type=int, default=0, help="leave the first N steps out of the statistics (0: "
                   "a cold cache counts)")
    g.add_argument("--locality", type=float, default=0.0, help="with probability p each expert of the previous token "
                   "is reused at the same layer (0 = the traces as collected; docs/PREFETCH.md)")
    g.add_argument("--prompt-tokens", type=int, default=0, help="each request's first P tokens are its prompt, "
                   "prefilled at once and reported apart (0: decode only)")
    g.add_argument("--batch", type=int, default=1, help="decode B requests at once; a layer needs their union (1)")
    g = p.add_argument_group("cache and prefetch")
    g.add_argument("--cache-experts", default=None, help="expert slots per layer, a comma list to sweep "
                   f"({DEFAULT_CACHES})")
    g.add_argument("--gpu-gib", type=float, default=None, help="GPU memory for expert slots and the KV cache together "
                   "(GiB, for --model-config's whole model); instead of --cache-experts")
    g.add_argument("--context", type=int, default=2048, help="tokens of KV cache --gpu-gib holds (2048)")
    g.add_argument("--split", default="uniform", choices=SPLITS, help="--gpu-gib's slots over the layers: uniform, "
                   "popularity (training split) or optimised (marginal LRU hit rate per byte) (uniform)")
    g.add_argument("--lookahead", type=int, default=1, help="prefetch layer l+d while layer l runs (d, default 1)")
    g.add_argument("--fetch-budget", type=int, default=4, help="experts fetched ahead per layer and lane (m, 4)")
    k = Knobs()
    g = p.add_argument_group("policies' parameters (docs/PREFETCH.md)")
    g.add_argument("--lfru-decay", type=float, default=k.lfru_decay, help=f"lfru: weight kept per step of age "
                   f"({k.lfru_decay})")
    g.add_argument("--stale-alpha", type=float, default=k.stale_alpha, help="least-stale: weight of the newest "
                   f"reuse gap in its running mean ({k.stale_alpha})")
    g.add_argument("--static-window", type=int, default=k.static_window, help="static-frequency: steps between "
                   f"recomputations of the resident set ({k.static_window})")
    g.add_argument("--hot-uses", type=int, default=k.hot_uses, help="lowbit-on-miss: uses of the low-bit copy "
                   f"after which the full copy is fetched ({k.hot_uses})")
    g.add_argument("--lowbit-format", default=None, choices=FORMATS, help="lowbit-on-miss: format of the copy "
                   "fetched on a miss (default: the widest below --expert-format: nf4 below fp16 / bf16, int2 below "
                   "nf4; below int2 there is none, and the default policy list leaves lowbit-on-miss out)")
    g.add_argument("--evict-window", type=int, default=k.evict_window, help="evict:frequency-window: steps of "
                   f"history; evict:oracle-window: steps ahead ({k.evict_window})")
    g = p.add_argument_group("cost model (validation/prefetch/cost_model.py)")
    g.add_argument("--model-config", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS),
                   help="model whose expert size is moved (default qwen1.5-moe-a2.7b: 3 x 2048 x 1408)")
    g.add_argument("--expert-format", default="fp16", choices=FORMATS, help="storage format of the experts (fp16)")
    g.add_argument("--link", default="pcie5", choices=sorted(LINKS), help="host-to-GPU link preset (pcie5 = 55 GB/s, "
                   "pcie4 = 25 GB/s, nvlink-c2c = 350 GB/s)")
    g.add_argument("--link-gbps", type=float, default=None, help="link bandwidth in GB/s (overrides --link)")
    g.add_argument("--pre-ms", type=float, default=DEFAULT_PRE_MS, help=f"attention + router per layer "
                   f"({DEFAULT_PRE_MS} ms)")
    g.add_argument("--shared-ms", type=float, default=None, help=f"shared expert per layer ({DEFAULT_SHARED_MS} ms; "
                   "0 for a --model-config without a shared expert)")
    g.add_argument("--expert-ms", type=float, default=DEFAULT_EXPERT_MS, help=f"one routed expert, one token "
                   f"({DEFAULT_EXPERT_MS} ms; with the defaults a layer takes 1.2 ms)")
    g.add_argument("--layer-ms", type=float, default=None, help="per-layer compute in total: scales the three phases "
                   "above to this sum (their defaults sum to 1.2 ms: HF eager decode measured on an H200)")
    g.add_argument("--token-ms", type=float, default=0.0, help="per token outside the layers (0 ms)")
    g.add_argument("--predictor-ms", type=float, default=None, help="every predictor's time per layer (default: "
                   "0.05 ms learned, 0.01 router-reuse, 0 table look-ups)")
    g.add_argument("--prefill-tflops", type=float, default=DEFAULT_PREFILL_TFLOPS, help="effective GPU TFLOP/s of a "
                   f"prefill: its compute per prompt token ({DEFAULT_PREFILL_TFLOPS}, assumed)")
    g.add_argument("--measure", action="store_true", help="take copy, per-layer and predictor times from the "
                   "offload engine on this machine's CUDA GPU (--model-config with random weights, the traces' "
                   "routing forced into it) instead of the flags")
    g.add_argument("--cpu-expert-ms", type=float, default=None, help="cpu-compute: one expert on the host CPU for "
                   "one token (ms; each further token of a batch adds as much)")
    g.add_argument("--measure-cpu", action="store_true", help="cpu-compute: time one expert of --model-config in "
                   "--expert-format on this machine's CPU instead")
    g.add_argument("--cpu-threads", type=int, default=2, help="threads of --measure-cpu (2)")
    add_map_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="results/prefetch", help="JSON and PNG go here (results/prefetch)")
    g.add_argument("--json", default=None, help="JSON path (default <output-dir>/prefetch.json)")
    g.add_argument("--plot", default=None, help="PNG path (default <output-dir>/prefetch.png)")
    g.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    args = p.parse_args(argv)
    if args.gpu_gib is not None and args.cache_experts is not None:
        raise UserError(f"--cache-experts {args.cache_experts} and --gpu-gib {args.gpu_gib}: give one (--gpu-gib "
                        "sets the slots of every layer)")
    args.cache_experts = args.cache_experts or DEFAULT_CACHES
    args.lowbit_format = args.lowbit_format or lowbit_below(args.expert_format) or args.expert_format
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.json is None or args.plot is None:  # every destination, before the traces are read
        check_writable("--output-dir", args.output_dir, "dir")
    check_writable("--json", args.json, "file")
    check_writable("--plot", args.plot, "file")
    if args.map:  # the sweep of docs/PREFETCH.md's map: validation/prefetch/policy_map.py
        return run_map(args)
    args.policies = args.policies or default_policies_for(DEFAULT_POLICIES, args.expert_format)
    r = resolve(args)
    m = r.ts.manifest
    L, E, K = m.num_layers, m.num_experts, m.top_k

    # --- the replayed steps (locality, prompts, lanes), each predictor's top-m and scores, the routing's locality
    stream, loc = workload(r, args)
    cpu = measure_cpu_expert(r.shape, args.expert_format, args.cpu_threads, args.batch) if args.measure_cpu else None
    if args.warmup_tokens >= stream.tokens:  # no token would be counted: every statistic would be 0 / 0
        raise UserError(f"--warmup-tokens {args.warmup_tokens}: the replayed stream has only {stream.tokens} "
                        "steps; lower it")

    # --- costs: the flags' (defaults: HF eager decode measured on an H200), or measured on this GPU by the engine
    pred_ms = {n: p.predictor_ms for n, p in r.predictors.items()}
    if args.measure:
        measured = measure_on_engine(args.model_config, args.traces, args.expert_format, measure_cache(args, E),
                                     [n for n in r.predictors if n.startswith("prefetch:")],
                                     torch.device("cuda", torch.cuda.current_device()), args.seed)
        print(f"measured on the engine: {measured['raw']}")
        cost, pred_ms = with_policy_costs(measured["cost"], args, r.shape, cpu), {**pred_ms, **measured["predictor_ms"]}
    else:
        cost = cost_from_args(args, r.shape, K, cpu)
    if args.predictor_ms is not None:
        pred_ms = {n: args.predictor_ms for n in r.predictors}
    caches, budget = cache_sizes(r, args)
    popularity = popularity_of(r) if needs_popularity(r.policies, args) else None
    header = header_lines(loc, stream, f"stream: {stream.tokens:,} steps of {len(r.split['test'])} test sequences "
                          f"({m.model['name_or_path']}, {L} layers x {E} experts, top-{K}); lookahead d = "
                          f"{args.lookahead}, fetch budget m = {args.fetch_budget}")
    header.append(f"cost model ({cost.source}): expert {cost.expert_bytes / 1e6:.2f} MB ({args.model_config}, "
                  f"{args.expert_format}), link {cost.link_bytes_per_s / 1e9:.1f} GB/s -> {cost.copy_ms:.3f} ms per "
                  f"expert; layer {cost.pre_ms:.3f} pre + {cost.shared_ms:.3f} shared + {K} x {cost.expert_ms:.3f} "
                  f"experts = {cost.layer_ms(K):.3f} ms; token overhead {cost.token_ms:.3f} ms"
                  + (f"; CPU expert {cost.cpu_expert_ms:.3f} ms" if cost.cpu_expert_ms else ""))
    if (r.shape.num_experts, r.shape.top_k) != (E, K):
        header.append(f"note: experts costed at {args.model_config}'s size ({r.shape.num_experts} experts, top-"
                      f"{r.shape.top_k}), routed as the traces route ({E} experts, top-{K})")
    if budget:
        header.append(f"GPU budget {args.gpu_gib} GiB at {args.context} tokens: KV {budget['kv_bytes'] / 2**30:.2f} "
                      f"GiB ({budget['kv_rule']}); {budget['slot_pool']} slots over {L} layers, {args.split} split "
                      f"{budget['slots_per_layer']}")

    # --- every policy at every cache size
    rows = simulate(r.policies, caches, stream, cost, args, E, pred_ms, popularity, r.labels, r.knobs)
    print()
    print_table(rows, header + ["all figures simulated"])
    rate = min(row["sim_steps_per_cpu_s"] for row in rows if not row["ceiling"])
    print(f"\nsimulator: {stream.tokens * L:,} (step, layer) steps per policy; slowest policy "
          f"{rate / 1e6:.1f}M steps per CPU-second")

    # --- outputs
    out = Path(args.output_dir)
    json_path = Path(args.json) if args.json else out / "prefetch.json"
    plot_path = Path(args.plot) if args.plot else out / "prefetch.png"
    result = {"simulated": True, "traces": str(args.traces), "model": m.model.get("name_or_path"), "split": "test",
              "tokens": int(sum(row["tokens"] for row in rows[:1])), "steps": stream.tokens, "num_layers": L,
              "num_experts": E, "top_k": K, "lookahead": args.lookahead, "fetch_budget": args.fetch_budget,
              "locality": args.locality, "routing_locality": loc, "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "expert_format": args.expert_format,
              "model_config": args.model_config, "model_shape": r.shape.to_json(), "cost_model": cost.to_json(),
              "cpu_measured": cpu, "gpu_budget": budget, "predictor_ms": pred_ms, "args": vars(args), "rows": rows}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, result)
    prefetch_figure(rows, f"simulated: {m.model.get('name_or_path')} test split, d={args.lookahead}, "
                    f"m={args.fetch_budget}, {args.expert_format}, {cost.link_bytes_per_s / 1e9:.0f} GB/s, "
                    f"recall@{K} {loc['previous_token_recall']:.2f}", plot_path)
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    with one_line_errors("simulate_prefetch"):
        main()
