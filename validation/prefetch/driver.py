"""The simulator's driver: from parsed flags to checked inputs, a cost model, and one row per (cache size, policy).

scripts/simulate_prefetch.py reads top to bottom as the story of a simulation and calls these: `resolve` checks
every input before anything is computed or written, `workload` builds the replayed steps (locality, prompts,
lanes), `cost_from_args` gives the cost model (or, with --measure, the script has the offload engine measure it:
offload/costs.py), `cache_sizes` the slots per layer (`--cache-experts`, or `--gpu-gib` split over the layers:
validation/prefetch/budget.py), `simulate` replays
every policy at every cache size (validation/prefetch/simulator.py), `print_table` shows it.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from collection.traces.format import TraceSet
from common.errors import UserError, number_flag
from validation.coverage.scorers import expert_popularity
from validation.prefetch.budget import SPLITS, lru_hit_curves, slot_pool, split_slots
from validation.prefetch.cost_model import (
    DEFAULT_SHARED_MS,
    LINKS,
    CostModel,
    ModelShape,
    model_shape,
    prefill_token_ms,
)
from validation.prefetch.locality import locality_line, locality_summary
from validation.prefetch.simulator import (
    BASELINE_POLICY,
    PREDICTED,
    SCORE,
    Knobs,
    Policy,
    Predictor,
    Stream,
    build_stream,
    check_caches,
    check_costs,
    eviction_scores,
    prepare,
    run_policy,
    summarize,
    top_popular,
)
from validation.prefetch.workload import as_batch, with_prompts


@dataclass
class Resolved:
    """Every checked input of a simulation."""
    ts: TraceSet
    policies: list[Policy]
    split: dict[str, np.ndarray]
    predictors: dict[str, Predictor]
    labels: dict[str, str]
    shape: ModelShape
    expert_bytes: int
    knobs: Knobs
    extra: dict[str, Any] = field(default_factory=dict)


def knobs_from_args(args: argparse.Namespace) -> Knobs:
    k = Knobs(args.lfru_decay, args.stale_alpha, args.static_window, args.hot_uses, args.evict_window)
    if not 0 < k.lfru_decay <= 1:
        raise UserError(f"--lfru-decay {k.lfru_decay}: within (0, 1]")
    if not 0 < k.stale_alpha <= 1:
        raise UserError(f"--stale-alpha {k.stale_alpha}: within (0, 1]")
    for flag, v in (("--static-window", k.static_window), ("--hot-uses", k.hot_uses),
                    ("--evict-window", k.evict_window)):
        if v < 1:
            raise UserError(f"{flag} {v}: at least 1")
    return k


MAX_MS = 1e6        # one phase of one layer: 1000 s is beyond any machine (the cost model sums them per token)
MAX_GBPS = 1e5      # a host-to-GPU link: 100 TB/s
MAX_GIB = 1 << 20   # a GPU budget
MAX_STEPS = 1 << 40
# the smallest positive costs taken: below them a token's time rounds to nothing and its rate to infinity
MIN_MS = 1e-6       # a nanosecond
MIN_GBPS = 1e-3     # 1 MB/s
MIN_TFLOPS = 1e-3


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
    number_flag("layer-ms", args.layer_ms, MIN_MS, MAX_MS)
    number_flag("cpu-expert-ms", args.cpu_expert_ms, MIN_MS, MAX_MS)
    number_flag("link-gbps", args.link_gbps, MIN_GBPS, MAX_GBPS)
    number_flag("gpu-gib", args.gpu_gib, 0, MAX_GIB, above_low=True)
    number_flag("prefill-tflops", args.prefill_tflops, MIN_TFLOPS, 1e6)
    number_flag("lfru-decay", args.lfru_decay, 0, 1)
    number_flag("stale-alpha", args.stale_alpha, 0, 1)
    for name in ("context", "prompt_tokens", "batch", "static_window", "hot_uses", "evict_window"):
        number_flag(name.replace("_", "-"), getattr(args, name), 0, MAX_STEPS)


def resolve(args: argparse.Namespace) -> Resolved:
    """Every check of the input, before anything is computed or written (one line, exit 2, on failure)."""
    check_flags(args)
    setup = prepare(args.traces, args.policies, args.lookahead, args.fetch_budget, args.seed, args.locality,
                    args.max_tokens, verify=not args.no_verify)
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
    if args.cpu_expert_ms is not None and not args.cpu_expert_ms > 0:
        raise UserError(f"--cpu-expert-ms {args.cpu_expert_ms}: a CPU expert takes some time; give a value > 0")
    if args.prompt_tokens < 0 or args.batch < 1 or args.context < 0 or not args.prefill_tflops > 0:
        raise UserError("--prompt-tokens and --context must be >= 0, --batch >= 1, --prefill-tflops > 0")
    if args.split not in SPLITS:
        raise UserError(f"--split {args.split!r}: choose from {', '.join(SPLITS)}")
    shape = model_shape(args.model_config)
    nbytes = shape.expert_bytes(args.expert_format)
    provisional = CostModel(nbytes, 1.0, lowbit_bytes=shape.expert_bytes(args.lowbit_format),
                            cpu_expert_ms=args.cpu_expert_ms or (1.0 if args.measure_cpu else 0.0))
    for pol in setup.policies:  # a CPU time, a smaller low-bit copy: before the stream is built
        check_costs(pol, provisional)
    if args.measure:
        import torch

        if args.expert_format not in ("fp16", "bf16", "nf4"):
            raise UserError(f"--measure runs the engine with fp16, bf16 or nf4 experts, not {args.expert_format}")
        if not torch.cuda.is_available():
            raise UserError("--measure needs a CUDA GPU (this machine has none); drop it to use the cost model's "
                            "defaults or set --pre-ms/--shared-ms/--expert-ms/--link-gbps")
    r = Resolved(setup.ts, setup.policies, setup.split, setup.predictors, setup.labels, shape, nbytes,
                 knobs_from_args(args))
    if args.gpu_gib is None:  # checked here so that a bad list fails before the stream is built
        check_caches(cache_list(args.cache_experts), setup.ts.manifest.num_experts)
    else:
        slot_pool(args.gpu_gib, args.context, shape, r.expert_bytes, setup.ts.manifest.num_layers,
                  setup.ts.manifest.num_experts)
    return r


def cache_list(text: str) -> list[int]:
    try:
        return sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--cache-experts {text!r}: a comma list of integers") from None


def workload(r: Resolved, args: argparse.Namespace, locality: float | None = None) -> tuple[Stream, dict[str, float]]:
    """The replayed steps: the test split at `locality` (default --locality), its locality summary (before
    prompts and lanes), then the prompts cut off (--prompt-tokens) and the lanes dealt (--batch)."""
    p = args.locality if locality is None else locality
    stream = build_stream(r.ts, r.split["test"], r.predictors, args.lookahead, args.fetch_budget, p, args.seed,
                          args.max_tokens, progress=not getattr(args, "quiet", False))
    E = r.ts.manifest.num_experts
    loc = {**locality_summary(stream.ids, stream.first, E), "locality_p": p}
    return as_batch(with_prompts(stream, args.prompt_tokens, E), args.batch), loc


def cost_from_args(args: argparse.Namespace, shape: ModelShape, top_k: int, cpu: dict[str, float] | None = None
                   ) -> CostModel:
    link = args.link_gbps * 1e9 if args.link_gbps is not None else LINKS[args.link]
    # the default phases are Qwen1.5-MoE's (docs/anchors); a preset without a shared expert has no shared phase
    shared_ms = args.shared_ms if args.shared_ms is not None else (DEFAULT_SHARED_MS if shape.shared_width else 0.0)
    phases = (args.pre_ms, shared_ms, args.expert_ms)
    if args.layer_ms is not None:  # keep the phases' proportions, change their sum
        total = args.pre_ms + shared_ms + top_k * args.expert_ms
        if total <= 0:
            raise UserError("--layer-ms scales --pre-ms/--shared-ms/--expert-ms, which are all 0")
        scale = args.layer_ms / total
        phases = tuple(x * scale for x in phases)
    cost = CostModel(shape.expert_bytes(args.expert_format), link, *phases, args.token_ms,
                     source=f"flags ({'--link-gbps' if args.link_gbps else args.link})")
    return with_policy_costs(cost, args, shape, cpu)


def with_policy_costs(cost: CostModel, args: argparse.Namespace, shape: ModelShape,
                      cpu: dict[str, float] | None = None) -> CostModel:
    """The terms only some policies use: the low-bit copy, the CPU expert, activations, prefill per token."""
    cpu_ms = cpu["cpu_expert_ms"] if cpu else (args.cpu_expert_ms or 0.0)
    return replace(cost, lowbit_bytes=shape.expert_bytes(args.lowbit_format), cpu_expert_ms=cpu_ms,
                   cpu_token_ms=cpu["cpu_token_ms"] if cpu else cpu_ms, activation_bytes=2 * shape.hidden,
                   prefill_token_ms=prefill_token_ms(shape, args.prefill_tflops))


def measure_cache(args: argparse.Namespace, num_experts: int) -> int:
    """The cache size `--measure` runs the engine at: the smallest --cache-experts above 0 (its phases barely
    depend on it), or a quarter of the experts under --gpu-gib."""
    sizes = [c for c in cache_list(args.cache_experts) if 0 < c < num_experts] if args.gpu_gib is None else []
    return sizes[0] if sizes else max(1, num_experts // 4)


def cache_sizes(r: Resolved, args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The cache sizes to replay: --cache-experts (slots per layer), or --gpu-gib's pool split by --split."""
    m = r.ts.manifest
    if args.gpu_gib is None:
        return cache_list(args.cache_experts), {}
    pool, info = slot_pool(args.gpu_gib, args.context, r.shape, r.expert_bytes, m.num_layers, m.num_experts)
    caps = split_for(r, args, pool, args.split)
    return [caps], {**info, "slot_pool": pool, "split": args.split, "slots_per_layer": caps.tolist()}


def split_for(r: Resolved, args: argparse.Namespace, pool: int, mode: str, locality: float | None = None
              ) -> np.ndarray:
    """`pool` slots over the layers by `mode`, measured on the training split (at the replay's locality)."""
    m = r.ts.manifest
    popularity = curves = None
    if mode == "popularity":
        popularity = popularity_of(r)
    elif mode == "optimised":
        curves = training_hit_curves(r, args, args.locality if locality is None else locality)
    return split_slots(pool, mode, m.num_layers, m.num_experts, popularity, curves, r.expert_bytes)


def popularity_of(r: Resolved) -> np.ndarray:
    if "popularity" not in r.extra:
        r.extra["popularity"] = expert_popularity(r.ts, r.split["train"]).numpy()
    return r.extra["popularity"]


def training_hit_curves(r: Resolved, args: argparse.Namespace, locality: float) -> np.ndarray:
    key = f"curves@{locality}"
    if key not in r.extra:
        train = build_stream(r.ts, r.split["train"], {}, args.lookahead, args.fetch_budget, locality, args.seed,
                             progress=False)
        r.extra[key] = lru_hit_curves(train.ids, r.ts.manifest.num_experts)
    return r.extra[key]


def print_table(rows: list[dict[str, Any]], header: list[str] = ()) -> None:
    for line in header:
        print(line)
    head = (f"{'C':>5} {'policy':<34} {'hit rate':>8} {'miss/tok':>8} {'MB/tok':>8} {'used':>8} {'wasted':>8} "
            f"{'stall ms':>8} {'tok/s':>8} {'vs LRU':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['speedup_vs_on_demand']:.2f}x" if r.get("speedup_vs_on_demand") is not None else "-"
        extra = "".join(f"  {k} {r[k]:.0%}" for k in ("cpu_share", "lowbit_share") if r.get(k))
        if "prefill_tokens_per_s" in r:
            extra += f"  prefill {r['prefill_tokens_per_s']:.0f} tok/s"
        print(f"{r['cache_experts']:>5} {r['label'][:34]:<34} {r['hit_rate']:>8.4f} {r['demand_misses_per_token']:>8.2f} "
              f"{r['bytes_moved_per_token'] / 1e6:>8.1f} {r['bytes_used_per_token'] / 1e6:>8.1f} "
              f"{r['bytes_wasted_per_token'] / 1e6:>8.1f} {r['stall_ms_per_token']:>8.2f} {r['tokens_per_s']:>8.2f} "
              f"{speed:>7}{extra}")


def header_lines(loc: dict[str, float], stream: Stream, what: str) -> list[str]:
    return [f"{what}; locality p = {loc['locality_p']}", locality_line(loc),
            f"decode: {stream.tokens:,} steps x batch {stream.lanes}"
            + (f"; prefill of {len(stream.prompt_len)} prompts" if stream.prompt_len is not None else "")]


def run_one(pol: Policy, cache: Any, stream: Stream, cost: CostModel, args: argparse.Namespace, num_experts: int,
            predictor_ms: dict[str, float], resident: np.ndarray | None, knobs: Knobs,
            scores: dict[str, np.ndarray]) -> np.ndarray:
    """One policy at one cache size, with its predictor's and its eviction scorer's time per layer."""
    p_ms = predictor_ms.get(pol.prefetch_key, 0.0) if pol.prefetch == PREDICTED else 0.0
    e_ms = 0.0
    if pol.eviction == SCORE:
        e_ms = predictor_ms.get(pol.evict_key, 0.0)
        if pol.evict_key not in scores:
            scores[pol.evict_key] = eviction_scores(pol, stream, num_experts, knobs)
    stats, _ = run_policy(pol, cache, stream, cost, args.lookahead, args.fetch_budget, num_experts, p_ms, resident,
                          knobs=knobs, scores=scores.get(pol.evict_key), evict_ms=e_ms)
    return stats


def simulate(policies: list[Policy], caches: list[Any], stream: Stream, cost: CostModel, args: argparse.Namespace,
             num_experts: int, predictor_ms: dict[str, float], popularity: np.ndarray | None, labels: dict[str, str],
             knobs: Knobs, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (cache size, policy), with the speedup over on-demand LRU at the same cache size. A cache
    size is slots per layer: one number, or (L,) from a split budget."""
    from tqdm import tqdm

    for pol in policies:
        check_costs(pol, cost)
    L, S = stream.ids.shape[1:]
    K = S // stream.lanes
    scores: dict[str, np.ndarray] = {}
    head = stream.head(2)
    for pol in policies:  # compile (or load) the kernels first, so the rates below are the replay's own
        run_one(pol, caches[0], head, cost, args, num_experts, predictor_ms,
                top_popular(popularity, caches[0]) if pol.placement == "popular" else None, knobs, {})
    bar = tqdm(total=len(caches) * len(policies), desc="simulate", unit="run", disable=not progress, dynamic_ncols=True)
    rows = []
    for c in caches:
        base = None
        resident = top_popular(popularity, c) if popularity is not None else None
        for pol in policies:
            t0 = time.process_time()
            stats = run_one(pol, c, stream, cost, args, num_experts, predictor_ms,
                            resident if pol.placement == "popular" else None, knobs, scores)
            cpu_s = time.process_time() - t0
            per_layer = np.broadcast_to(np.asarray(c), (L,))
            row = {"policy": pol.name, "label": labels.get(pol.name, pol.name),
                   "cache_experts": int(c) if np.ndim(c) == 0 else round(float(per_layer.mean()), 2),
                   **summarize(stats, L, K, cost.expert_bytes, args.warmup_tokens, cost.lowbit_bytes,
                               cost.activation_bytes),
                   "predictor_ms": predictor_ms.get(pol.prefetch_key, 0.0) if pol.prefetch == PREDICTED else 0.0,
                   "realizable": pol.realizable, "ceiling": pol.all_resident, "sim_steps_per_cpu_s": stream.tokens * L / max(cpu_s, 1e-9)}
            if np.ndim(c):
                row["cache_per_layer"] = per_layer.tolist()
            if pol.name == BASELINE_POLICY:
                base = row["tokens_per_s"]
            rows.append(row)
            bar.update(1)
        for row in rows[-len(policies):]:
            row["speedup_vs_on_demand"] = row["tokens_per_s"] / base if base else None
    bar.close()
    return rows


def needs_popularity(policies: list[Policy], args: argparse.Namespace) -> bool:
    return any(p.placement == "popular" for p in policies) or (args.gpu_gib is not None and args.split == "popularity")

