r"""Offloaded decode on one GPU, measured: the engine beside the resident model and accelerate's offload.

The full-size Qwen1.5-MoE-A2.7B architecture with random weights is built three times: resident on the GPU (the
fastest experts implementation, grouped_mm), moved to the host and dispatched by accelerate (device_map with a
max_memory cap equal to the engine's footprint at C = 15: the layers beyond the cap keep their weights in host
memory and are copied in at every forward), and converted by offload_experts. After a warm-up to steady clocks, every row
runs once untimed (its calibration: the engine's costs measured in the simulator's terms, offload/costs.py, and
its decode stream recorded), then --repeats rounds time every row, each round in the other order. A row reports the
median decode tokens/s and its spread ((max - min) / median; > 10%: unstable), the engine's statistics, its peak
GPU memory (as if alone on the GPU: the row's own persistent bytes plus what it allocated above them), and the
simulator's prediction (validation/prefetch/simulator.py run_policy on the row's recorded stream with its measured costs).

Rows: resident, accelerate; per expert format and cache size: on-demand LRU and prediction-driven prefetch on the
model's own routing and on routing forced from the embedded default's traces (oracle as the bound there), the
same forced rows at --locality; C = 0 streaming and all-resident per format; with --evict-checkpoint, learned
eviction and Belady on the forced routing of the first format and cache. Targets of docs/OFFLOAD.md are
checked at the end. JSON is rewritten after every round (a cut-off run keeps what it measured).

Full (~8 min of one H100 / H200):
    python tools/bench_offload.py --json results/bench_offload/full.json
Quick (~2 min):
    python tools/bench_offload.py --quick --json results/bench_offload/quick.json
Seconds on a CPU, after `make demo` (its traces; a random model of the embedded default's shape; the code path, not
its numbers):
    python tools/bench_offload.py --device cpu --preset qwen2moe-mini --quick --repeats 2 --tokens 4 \
        --traces runs/demo/traces --json /tmp/bench.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# run as a file (`python tools/bench_offload.py`): this repository's packages first, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collection.traces.format import DEFAULT_TRACES  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402
from common.device import pick_device  # noqa: E402
from common.errors import UserError, number_flag, one_line_errors  # noqa: E402
from models.moe_configs import PRESETS, make_config  # noqa: E402
from models.random_model import random_model, sixteen_bit  # noqa: E402
from offload import offload_experts  # noqa: E402
from offload.clock import ForwardClock  # noqa: E402
from offload.costs import measure_costs  # noqa: E402
from validation.prefetch.simulator import (  # noqa: E402
    PREDICTED,
    SCORE,
    STATIC,
    Stream,
    parse_policy,
    run_policy,
    summarize,
)

UNSTABLE = 0.10  # a row whose spread exceeds this is marked unstable (counts as not met)
MAX_TOKENS = 4096  # decode or prompt tokens of one run: beyond any preset's positions this benchmark needs
ACCELERATE_ROW = "accelerate offload (device_map, cap = engine at C=15)"


@dataclass
class Row:
    label: str
    kind: str                        # resident | accelerate | engine
    options: dict[str, Any] = field(default_factory=dict)  # offload_experts / reconfigure keywords
    tokens: int = 32
    runs: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    predicted: float | None = None

    def summary(self) -> dict[str, Any]:
        rates = [r["decode_tokens_per_s"] for r in self.runs if r.get("decode_tokens_per_s")]
        out: dict[str, Any] = {"label": self.label, "kind": self.kind, "options": _plain(self.options),
                               "tokens": self.tokens, "runs": self.runs}
        if rates:
            med = float(np.median(rates))
            out.update(median_tokens_per_s=med, spread=(max(rates) - min(rates)) / med,
                       unstable=(max(rates) - min(rates)) / med > UNSTABLE)
            for k in ("hit_rate", "stall_ms_per_token", "mb_moved_per_token", "mb_wasted_per_token",
                      "host_ms_per_layer", "predictor_us_per_layer", "peak_gib", "bound_gib"):
                vals = [r[k] for r in self.runs if r.get(k) is not None]
                if vals:
                    out[k] = float(np.median(vals))
        if self.predicted is not None:
            out["predicted_tokens_per_s"] = self.predicted
            if rates:
                out["measured_over_predicted"] = out["median_tokens_per_s"] / self.predicted
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS),
                   help="architecture built with random weights (qwen1.5-moe-a2.7b)")
    p.add_argument("--device", default="auto", help="auto (the GPU with most free memory), cuda:N, cpu (smoke only)")
    p.add_argument("--quick", action="store_true", help="~2 minutes: one format (fp16), C = 15, fewer tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, order alternating (5; fewer is not a report)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per run (full 24, quick 16)")
    p.add_argument("--prompt-tokens", type=int, default=4, help="prompt length of every run (4: a prompt streams "
                   "every expert it needs, which decode tokens/s leaves out but the run's time does not)")
    p.add_argument("--formats", default=None, help="expert formats, comma list of fp16, nf4 (full fp16,nf4; quick fp16)")
    p.add_argument("--caches", default=None, help="cache slots per layer, comma list (full 15,30; quick 15)")
    p.add_argument("--policies", default="on-demand,prefetch:router-reuse",
                   help="engine policies of every (format, cache, routing) group (on-demand,prefetch:router-reuse); "
                   "oracle is added on forced routing")
    p.add_argument("--checkpoint", default=None, help="a learned predictor of the traces' model: adds "
                   "prefetch:<checkpoint> to the forced-routing rows (its work runs at this model's size)")
    p.add_argument("--evict-checkpoint", default=None, help="a next-tokens predictor of the traces' model (trained with "
                   "--lookahead-tokens on these traces): adds evict:<checkpoint> and belady to the forced-routing rows "
                   "of the first format and cache")
    p.add_argument("--traces", default=DEFAULT_TRACES, help=f"the embedded default's traces for --routing-from rows "
                   f"(default {DEFAULT_TRACES}; when that is missing, a small set is collected into "
                   "results/bench_offload/traces; a path given must hold a trace set; none: no forced-routing rows)")
    p.add_argument("--locality", type=float, default=None, help="the forced rows of the first format and cache again "
                   "at this --locality (full 0.4; quick 0: skipped)")
    p.add_argument("--accelerate-tokens", type=int, default=3, help="tokens generated per accelerate run (3: two decode "
                   "forwards; it copies its offloaded layers, ~19 GB at full size, from pageable host memory at every "
                   "forward, so it decodes at ~0.5 tokens/s)")
    p.add_argument("--warmup-s", type=float, default=None, help="seconds of resident decode before anything (full 15, quick 6)")
    p.add_argument("--seed", type=int, default=0, help="weights and trace split seed (0)")
    p.add_argument("--json", default="results/bench_offload/bench.json", help="results (results/bench_offload/bench.json)")
    args = p.parse_args(argv)
    # a value out of range is refused, never replaced by a default: 0 tokens is not "the default number"
    if args.tokens is not None and not 2 <= args.tokens <= MAX_TOKENS:
        raise UserError(f"--tokens {args.tokens}: within 2..{MAX_TOKENS}")
    if not 2 <= args.accelerate_tokens <= MAX_TOKENS:
        raise UserError(f"--accelerate-tokens {args.accelerate_tokens}: within 2..{MAX_TOKENS} (one prompt forward, "
                        "then decode steps)")
    number_flag("warmup-s", args.warmup_s, 0, 3600)
    args.tokens = args.tokens or (16 if args.quick else 24)
    args.formats = [f for f in (args.formats or ("fp16" if args.quick else "fp16,nf4")).split(",") if f]
    args.caches = [int(c) for c in (args.caches or ("15" if args.quick else "15,30")).split(",") if c]
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (6.0 if args.quick else 15.0)
    args.locality = args.locality if args.locality is not None else (0.0 if args.quick else 0.4)
    if not (1 <= args.repeats <= 1000 and 1 <= args.prompt_tokens <= MAX_TOKENS):
        raise UserError(f"--repeats within 1..1000 and --prompt-tokens within 1..{MAX_TOKENS}")
    if args.traces not in (DEFAULT_TRACES, "none") and not (Path(args.traces) / "manifest.json").is_file():
        raise UserError(f"--traces {args.traces}: no trace set there (only the default, {DEFAULT_TRACES}, is collected "
                        "when missing; none: no forced-routing rows)")
    if args.evict_checkpoint and not Path(args.evict_checkpoint).is_file():
        raise UserError(f"--evict-checkpoint {args.evict_checkpoint}: no such file")
    if args.evict_checkpoint and args.traces == "none":
        raise UserError("--evict-checkpoint runs on forced routing: give --traces (not none)")
    if any(f not in ("fp16", "nf4") for f in args.formats):
        raise UserError(f"--formats {','.join(args.formats)}: a comma list of fp16, nf4")
    return args


# ----------------------------------------------------------------------------------------------
# models


def accelerate_model(preset: str, dev: torch.device, dtype: torch.dtype, seed: int, cap: int) -> tuple[Any, int]:
    """The same model dispatched by accelerate with max_memory = {gpu: cap}: what HF users do today (a model loaded
    on the host, then `infer_auto_device_map` + `dispatch_model`). Built on the GPU (fast) and moved to the host
    first: accelerate's weights map holds the offloaded modules' tensors where the model held them, so a model
    dispatched from the GPU would keep its "offloaded" weights in GPU memory and copy them GPU to GPU. Returns the
    model and its GPU-resident bytes."""
    from accelerate import infer_auto_device_map

    model = random_model(preset, dev, dtype, seed).to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    gpu = dev.index or 0
    device_map = infer_auto_device_map(model, max_memory={gpu: cap, "cpu": 1 << 40},
                                       no_split_module_classes=model._no_split_modules)
    return dispatch_offloaded(model, {k: dev if v == gpu else v for k, v in device_map.items()}, dev)


def dispatch_offloaded(model: torch.nn.Module, device_map: dict[str, Any], dev: torch.device) -> tuple[Any, int]:
    """accelerate's `dispatch_model` of a model held on the host: modules mapped to `dev` move there, the others
    ("cpu") keep their weights in host memory and are copied to `dev` at every forward. Checks that every offloaded
    weight is a host tensor (RuntimeError otherwise). Returns the model and the bytes the dispatch put on `dev`
    (CUDA: memory allocated by the dispatch; elsewhere the parameters and buffers of the modules mapped there)."""
    from accelerate import dispatch_model

    cuda = dev.type == "cuda"
    before = torch.cuda.memory_allocated(dev) if cuda else 0
    model = dispatch_model(model, device_map=device_map, main_device=dev)
    away = [t.device for t in offloaded_weights(model) if t.device.type != "cpu"]
    if away:
        raise RuntimeError(f"accelerate offload: {len(away)} offloaded weights are on {away[0]}, not in host memory "
                           "(the model was not on the host when dispatched)")
    if cuda:
        return model, torch.cuda.memory_allocated(dev) - before
    mods = [model.get_submodule(k) for k, v in device_map.items() if v == dev]
    return model, sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))


def offloaded_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors accelerate copies in at every forward: the weights maps of the modules it offloaded."""
    out: dict[int, torch.Tensor] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False) and hook.weights_map is not None:
            loader, prefix = hook.weights_map.dataset, hook.weights_map.prefix  # a PrefixedDataset of one loader
            for key in loader:
                if key.startswith(prefix):
                    t = loader[key]
                    out[id(t)] = t
    return list(out.values())


def ensure_traces(path: str, dev: torch.device) -> str:
    """The embedded default's traces: `path` if it is a trace set, else a small set collected once (200 sequences
    of 256 tokens of the bundled corpus, every hidden state stored) into results/bench_offload/traces."""
    if (Path(path) / "manifest.json").is_file():
        return path
    out = Path("results/bench_offload/traces")
    if (out / "manifest.json").is_file():
        return str(out)
    print(f"no trace set at {path}: collecting the embedded default's traces into {out}", flush=True)
    from scripts.collect_traces import main as collect

    collect(["--datasets", "bundled", "--target_traces", "200", "--max_length", "256", "--batch_size", "16",
             "--device", str(dev), "--output", str(out)])
    return str(out)


# ----------------------------------------------------------------------------------------------
# runs


def accelerate_cap(models: dict[str, Any], prompt: torch.Tensor, tokens: int) -> int:
    """accelerate's max_memory cap: the engine's footprint, its peak GPU bytes at C = 15 on-demand measured as its
    rows measure it (one untimed run), rounded up to a MiB. (The sum of its persistent parts, weights + slots +
    staging + KV, leaves out the decode's transient buffers: 0.6% below the peak on an H100.)"""
    probe = run_once(Row("cap", "engine", {"cache_experts": 15, "policy": "on-demand"}, tokens), models, prompt,
                     calibrate=False)
    return -(-int(probe["peak_gib"] * 2**30) // 2**20) * 2**20


@contextlib.contextmanager
def no_collector():
    """Python's cyclic collector off for one timed run, and run just before it: a gen-2 pass over the models'
    objects inside a 24-token decode would be charged to whichever row it fell on."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_once(row: Row, models: dict[str, Any], prompt: torch.Tensor, calibrate: bool) -> dict[str, Any]:
    """One run of a row: its decode tokens/s and, for the engine, its statistics and peak memory as if alone."""
    dev = prompt.device
    cuda = dev.type == "cuda"
    if row.kind.startswith("engine"):
        handle = models[row.kind]
        handle.reconfigure(**row.options, record=calibrate)
        if calibrate:  # the calibration run is itself a decode of the row (with timestamps): it is not timed, but
            with no_collector():  # its costs predict the timed runs, so it runs as they do, the collector off
                res = measure_costs(handle, prompt, tokens=row.tokens)
            row.calibration = {"cost": res["cost"].to_json(), "raw": {k: v for k, v in res["raw"].items()
                                                                        if k != "recorded"}}
            row.predicted = predict(handle, row, res)
            return {}
        model = handle.engine.model
    else:
        model = models[row.kind]
    clock = models["clocks"][row.kind]
    if cuda:
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    if row.kind.startswith("engine"):
        handle.reset()
    clock.reset()
    with torch.no_grad(), no_collector():
        model.generate(prompt, max_new_tokens=row.tokens, min_new_tokens=row.tokens, do_sample=False, pad_token_id=0)
    out: dict[str, Any] = {}
    if row.kind.startswith("engine"):
        s = handle.stats()
        mem = s["memory"]
        own = mem["weights"] + mem["expert_slots"] + mem["staging"]
        out = {k: s[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "stall_ms_per_token",
                                 "mb_moved_per_token", "mb_wasted_per_token", "host_ms_per_layer",
                                 "predictor_us_per_layer")}
        out["bound_gib"] = mem["bound"] / 2**30
    else:
        out["prefill_tokens_per_s"], out["decode_tokens_per_s"] = clock.rates()
        own = models["own_bytes"][row.kind]
    if cuda:
        out["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - before + own) / 2**30
    return out


def recorded_stream(e: Any, pol: Any, rec: dict[str, np.ndarray] | None, steps: int) -> Stream:
    """The decode stream an engine recorded (one generation), as the simulator replays it: its accesses, the
    predictions it prefetched by, and the eviction scores it evicted by, as rows of the step that computed them
    (step t evicted by the previous token's, which the simulator reads from row t-1)."""
    ids = rec["ids"] if rec is not None and len(rec["ids"]) else np.zeros((steps, e.L, e.K), dtype=np.int64)
    first = np.zeros(len(ids), dtype=bool)
    first[0] = True
    stream = Stream(ids=ids.astype(np.int64), weights=np.zeros(ids.shape, dtype=np.float32), first=first,
                    position=np.arange(len(ids)))
    if pol.prefetch == PREDICTED and rec is not None:
        stream.predictions[pol.prefetch_key] = rec["pred"][:, :, :e.m]
    if pol.eviction == SCORE and rec is not None:
        used = rec["score"].astype(np.float32)
        stream.scores[pol.evict_key] = np.concatenate([used[1:], np.zeros_like(used[:1])])
    return stream


def predict(handle: Any, row: Row, costs: dict[str, Any]) -> float:
    """The simulator's decode tokens/s for the row's recorded stream, with the row's measured costs."""
    e = handle.engine
    rec = costs["raw"]["recorded"]
    pol = parse_policy(row.options.get("policy", "on-demand"))
    stream = recorded_stream(e, pol, rec, max(len(rec["stats"]), 1) if rec is not None else row.tokens - 1)
    resident = (e.cache.slot_of >= 0) if pol.eviction == STATIC and not pol.all_resident else None
    stats, _ = run_policy(pol, e.C, stream, costs["cost"], e.d, e.m, e.E, predictor_ms=0.0, resident=resident)
    return summarize(stats, e.L, e.K, e.layout.nbytes)["tokens_per_s"]


def plan_rows(args: argparse.Namespace, traces: str | None, cuda: bool) -> list[Row]:
    rows = [Row("resident (grouped_mm)", "resident", tokens=args.tokens)]
    if cuda:
        rows.append(Row(ACCELERATE_ROW, "accelerate",
                        tokens=args.accelerate_tokens))
    policies = [p for p in args.policies.split(",") if p]
    for fmt in args.formats:
        if fmt == "nf4" and not cuda:
            continue
        base = {"expert_format": "nf4"} if fmt == "nf4" else {}
        rows.append(Row(f"{fmt} C=0 streaming", "engine", {**base, "cache_experts": 0}, args.tokens))
        rows.append(Row(f"{fmt} all-resident", "engine", {**base, "policy": "all-resident"}, args.tokens))
        for c in args.caches:
            for pol in policies:
                rows.append(Row(f"{fmt} C={c} {pol} (own routing)", "engine",
                                {**base, "cache_experts": c, "policy": pol}, args.tokens))
            if traces is None:
                continue
            forced = policies + ["oracle"] + ([f"prefetch:{args.checkpoint}"] if args.checkpoint else [])
            first = fmt == args.formats[0] and c == args.caches[0]
            localities = [0.0] + ([args.locality] if args.locality and first else [])
            for loc in localities:
                with_evict = args.evict_checkpoint and first and not loc
                evict = [f"evict:{args.evict_checkpoint}", "belady"] if with_evict else []
                for pol in forced + evict:
                    name = ("prefetch:learned" if pol.startswith("prefetch:") and pol != "prefetch:router-reuse" else
                            "evict:learned" if pol.startswith("evict:") else pol)
                    rows.append(Row(f"{fmt} C={c} {name} (traces{f', locality {loc}' if loc else ''})", "engine-traces",
                                    {**base, "cache_experts": c, "policy": pol, "routing_from": traces,
                                     "locality": loc, "seed": args.seed}, args.tokens))
    return rows


# ----------------------------------------------------------------------------------------------
# report


def targets(rows: list[dict[str, Any]], fmt16: str, cap_gib: float | None = None) -> list[str]:
    """The targets this run can check (docs/OFFLOAD.md "Targets"), one line each. `cap_gib`: accelerate's
    max_memory cap, which the engine's peak at C = 15 must not exceed."""
    by = {r["label"]: r for r in rows}
    med = lambda label: by.get(label, {}).get("median_tokens_per_s")  # noqa: E731
    lines = []
    res, allres = med("resident (grouped_mm)"), med(f"{fmt16} all-resident")
    if res and allres:
        lines.append(f"no engine tax: all-resident / resident = {allres / res:.3f} (target >= 0.95)")
    lru_row = f"{fmt16} C=15 on-demand (own routing)"
    acc, lru = med(ACCELERATE_ROW), med(lru_row)
    if acc and lru:
        peak, acc_peak = by[lru_row].get("peak_gib", float("nan")), by[ACCELERATE_ROW].get("peak_gib", float("nan"))
        cap = f"{cap_gib:.2f} GiB" if cap_gib else "unknown"
        lines.append(f"against accelerate: on-demand C=15 / accelerate = {lru / acc:.1f}x (target >= 20x); peaks "
                     f"{peak:.2f} (engine) vs {acc_peak:.2f} GiB (accelerate), cap {cap}: engine peak "
                     f"{'<=' if cap_gib and peak <= cap_gib else 'ABOVE'} the cap")
    pre, lru_t, orc = (med(f"{fmt16} C=15 prefetch:router-reuse (traces)"), med(f"{fmt16} C=15 on-demand (traces)"),
                       med(f"{fmt16} C=15 oracle (traces)"))
    learned = med(f"{fmt16} C=15 prefetch:learned (traces)")
    best = max([v for v in (pre, learned) if v] or [0.0])
    if best and lru_t and orc:
        lines.append(f"payoff (traces, d=1, C=15): best prefetch / on-demand = {best / lru_t:.2f}x (target >= 1.3x), "
                     f"/ oracle = {best / orc:.2f} (target >= 0.90)")
    evict, belady = med(f"{fmt16} C=15 evict:learned (traces)"), med(f"{fmt16} C=15 belady (traces)")
    if evict and belady and lru_t:
        gap = (f"{(evict - lru_t) / (belady - lru_t):.0%} of the gap to Belady closed" if belady > lru_t else
               "Belady no faster than on-demand here: no gap to close")
        lines.append(f"learned eviction (traces, C=15): {evict / lru_t:.2f}x on-demand, Belady {belady / lru_t:.2f}x: "
                     f"{gap} (measured; the simulated target: >= 50% at 0.2 ms per layer)")
    ratios = [abs(r["measured_over_predicted"] - 1) for r in rows if r.get("measured_over_predicted")]
    if ratios:
        lines.append(f"simulator agreement: largest |measured / predicted - 1| = {max(ratios):.1%} (target <= 15%)")
    link = [r["calibration"]["raw"] for r in rows if r.get("calibration") and r["calibration"]["raw"].get(
        "engine_copy_bytes_per_s")]
    if link:
        frac = min(c["engine_copy_bytes_per_s"] / c["link_bytes_per_s"] for c in link)
        lines.append(f"link speed: the engine's copies run at >= {frac:.0%} of one large pinned copy (target >= 85%)")
    host = by.get(lru_row, {}).get("host_ms_per_layer")
    if host is not None:
        lines.append(f"host overhead: {host:.4f} ms per layer at batch 1 (target <= 0.1)")
    pred = [r["predictor_us_per_layer"] for r in rows if r.get("predictor_us_per_layer")]
    graph = [r["calibration"]["raw"]["predictor_graph_us"] for r in rows
             if r.get("calibration") and r["calibration"]["raw"].get("predictor_graph_us")]
    if graph:
        lines.append(f"predictor: {max(graph):.1f} us per layer at most on the GPU's clock, its graph replayed back to "
                     f"back (target <= 20); {max(pred or [0.0]):.1f} us between the events around it in the decode, "
                     "host gaps included")
    elif pred:
        lines.append(f"predictor: {max(pred):.1f} us per layer at most between the events around it in the decode, "
                     "host gaps included (target <= 20)")
    mem = [(r["peak_gib"], r["bound_gib"]) for r in rows if r.get("peak_gib") and r.get("bound_gib")]
    if mem:
        worst = max(p / b for p, b in mem)
        lines.append(f"memory: peak / (1.05 x (weights + slots + KV)) <= {worst:.3f} over the engine rows (target <= 1)")
    unstable = [r["label"] for r in rows if r.get("unstable")]
    lines.append(f"unstable rows (spread > {UNSTABLE:.0%}): {', '.join(unstable) if unstable else 'none'}")
    return lines


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'row':<52} {'tok/s':>8} {'spread':>7} {'hit':>6} {'stall':>7} {'MB/tok':>7} {'waste':>6} "
            f"{'peak GiB':>8} {'predicted':>9} {'ratio':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    f = lambda v, fmt: f"{'-':>{fmt.split('.')[0]}}" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        print(f"{r['label'][:52]:<52} {f(r.get('median_tokens_per_s'), '8.2f')} {f(r.get('spread'), '7.1%')}"
              f"{'!' if r.get('unstable') else ' '}{f(r.get('hit_rate'), '6.3f')} {f(r.get('stall_ms_per_token'), '7.2f')} "
              f"{f(r.get('mb_moved_per_token'), '7.1f')} {f(r.get('mb_wasted_per_token'), '6.1f')} "
              f"{f(r.get('peak_gib'), '8.2f')} {f(r.get('predicted_tokens_per_s'), '9.2f')} "
              f"{f(r.get('measured_over_predicted'), '6.3f')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    t_start = time.perf_counter()
    dtype = sixteen_bit(dev)
    fmt16 = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    args.formats = [fmt16 if f == "fp16" else f for f in args.formats]
    name = torch.cuda.get_device_name(dev) if cuda else "CPU (numbers mean nothing)"
    print(f"{name}; {args.preset} with random weights in {dtype}; torch {torch.__version__}", flush=True)
    traces = None if args.traces == "none" else ensure_traces(args.traces, dev)
    cfg = make_config(args.preset)
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(
        args.seed)).to(dev)

    # --- the three models (resident, accelerate, engine), same weights
    models: dict[str, Any] = {"clocks": {}, "own_bytes": {}}
    models["resident"] = random_model(args.preset, dev, dtype, args.seed)
    models["clocks"]["resident"] = ForwardClock.attach(models["resident"], dev)
    models["own_bytes"]["resident"] = sum(p.numel() * p.element_size() for p in models["resident"].parameters())
    print(f"resident model built ({models['own_bytes']['resident'] / 2**30:.1f} GiB)", flush=True)
    engine_model = random_model(args.preset, dev, dtype, args.seed)
    handle = offload_experts(engine_model, cache_experts=15, policy="on-demand")
    models["engine"], models["clocks"]["engine"] = handle, handle.engine.clock
    mem = handle.memory()
    print(f"engine: {handle.describe()}; host store {mem['host_store'] / 2**30:.1f} GiB "
          f"({'pinned' if mem['pinned'] else 'not pinned'})", flush=True)
    if traces is not None:  # routing forced from the traces: a model of the traces' MoE layer count, full width
        from collection.traces.format import read_manifest

        layers = read_manifest(Path(traces)).num_layers
        same = layers == cfg.num_hidden_layers
        forced_model = engine_model if same else random_model(args.preset, dev, dtype, args.seed, layers=layers)
        forced = handle if same else offload_experts(forced_model, cache_experts=15, policy="on-demand")
        models["engine-traces"], models["clocks"]["engine-traces"] = forced, forced.engine.clock
        result_mapping = "trace MoE layer i -> MoE layer i of " + (
            "this model" if same else f"a {layers}-layer model of {args.preset} (every layer full size; tokens/s are "
            f"for {layers} layers, not {cfg.num_hidden_layers})")
        print(f"forced routing: {result_mapping}", flush=True)
    cap = None
    if cuda:
        cap = accelerate_cap(models, prompt, args.tokens)
        models["accelerate"], models["own_bytes"]["accelerate"] = accelerate_model(args.preset, dev, dtype, args.seed,
                                                                                   cap)
        models["clocks"]["accelerate"] = ForwardClock.attach(models["accelerate"], dev)
        host = sum(t.numel() * t.element_size() for t in offloaded_weights(models["accelerate"]))
        print(f"accelerate: max_memory cap {cap / 2**30:.2f} GiB (the engine's measured peak at C=15, on-demand), "
              f"{models['own_bytes']['accelerate'] / 2**30:.2f} GiB on the GPU (memory allocated by the dispatch), "
              f"{host / 2**30:.2f} GiB offloaded to host memory and copied in at every forward; "
              f"{args.accelerate_tokens} tokens per run", flush=True)
    rows = plan_rows(args, traces, cuda)
    print(f"{len(rows)} rows x {args.repeats} rounds, {args.tokens} decode tokens per engine run", flush=True)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype),
                              "args": vars(args), "traces": traces, "rows": [],
                              "accelerate_cap_gib": cap / 2**30 if cap else None,
                              "forced_mapping": result_mapping if traces is not None else None}

    # --- warm-up to steady clocks, then the calibration round (untimed), then the timed rounds
    t0 = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < args.warmup_s:
            models["resident"].generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"warm-up {time.perf_counter() - t0:.0f} s; calibration round ...", flush=True)
    for row in rows:
        run_once(row, models, prompt, calibrate=row.kind.startswith("engine"))
        print(f"  {row.label}: calibrated" + (f", predicted {row.predicted:.2f} tok/s" if row.predicted else ""),
              flush=True)
    for rnd in range(args.repeats):
        order = rows if rnd % 2 == 0 else rows[::-1]
        for row in order:
            row.runs.append(run_once(row, models, prompt, calibrate=False))
        result["rows"] = [r.summary() for r in rows]
        atomic_write_json(Path(args.json), result)
        print(f"round {rnd + 1} of {args.repeats} ({time.perf_counter() - t_start:.0f} s): " + ", ".join(
            f"{r.label.split(' (')[0]} {r.runs[-1]['decode_tokens_per_s'] or 0:.1f}" for r in rows[:4]) + " ...",
            flush=True)

    summaries = [r.summary() for r in rows]
    print_table(summaries)
    result["targets"] = targets(summaries, fmt16, result["accelerate_cap_gib"])
    result["seconds"] = time.perf_counter() - t_start
    atomic_write_json(Path(args.json), result)
    print("\n" + "\n".join(result["targets"]))
    print(f"\n{result['seconds']:.0f} s on {name}; wrote {args.json}")


if __name__ == "__main__":
    with one_line_errors("bench_offload"):
        main()
