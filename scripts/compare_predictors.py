r"""Compare every predictor and baseline at lookaheads d = 0..3 on the held-out test split.

For each d: the seed's simple MLP (layer-agnostic), the layer-aware MLP, the hybrid (hidden state
plus observed routing, causal) and the router-anchored predictor (its default recipe) are trained, then
scored with the same evaluation as every baseline (router reuse, previous token, popularity, random;
the router control at d = 0). Writes a markdown table, JSON, and per-layer curves (PNG); prints how far
each best learned predictor cuts router reuse's error (1 - recall@4).

The table in docs/RESULTS.md (embedded default, traces of the whole bundled trace split):
    python scripts/collect_traces.py --output routing_data/traces/qwen2moe-mini --overwrite
    python scripts/compare_predictors.py --traces routing_data/traces/qwen2moe-mini --output results/compare --jobs 4
Seconds on a CPU (tiny and noisy):
    python scripts/compare_predictors.py --traces routing_data/traces/quick --lookaheads 0,1 --epochs 1 \
        --output results/compare-quick

A set of imported routing (no hidden states) compares the hybrid's history part (--routing-only) with the
routing-only baselines:
    python scripts/compare_predictors.py --traces routing_data/traces/qwen3-vllm --routing-only --predictors hybrid \
        --baselines previous-token,popularity,random,recency,frequency --lookaheads 1,2 --output results/compare-vllm
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from collection.traces.format import TraceSet
from collection.traces.rows import split_sequences
from common.device import device_name, pick_device
from common.errors import UserError, choices_list, one_line_errors
from common.paths import check_writable
from models.checkpoint import checkpoint_for_traces
from models.predictors import CONFIG_LIMITS, PREDICTORS, count_parameters, flops_per_row, reads_hidden
from training.checks import missing_inputs
from training.trainer import add_training_args, resolve_defaults
from validation.coverage.evaluate import evaluate
from validation.coverage.metrics import headline_columns
from validation.coverage.report import write_comparison
from validation.coverage.scorers import BASELINES, SCORERS, baseline_scorer, predictor_scorer

REPO = Path(__file__).resolve().parent.parent


def job_dir(args: argparse.Namespace, kind: str, d: int, seed_recipe: bool) -> Path:
    name = f"{kind}-seed-recipe" if seed_recipe else trained_name(args, kind)
    return Path(args.output) / "checkpoints" / f"{name}-d{d}"


def trained_name(args: argparse.Namespace, kind: str) -> str:
    """A trained kind's name in the table (and its checkpoint folder's): the hybrid of --routing-only says so."""
    return f"{kind}-routing-only" if args.routing_only and kind == "hybrid" else kind


def trainer_flags(args: argparse.Namespace, kind: str, d: int, seed_recipe: bool) -> list[str]:
    """The flags of scripts/train_simple_predictor.py that train one (predictor, d) of the comparison."""
    recipe = (["--lr", "5e-5", "--epochs", "20", "--batch-size", "8", "--shards-per-group", "4"] if seed_recipe else
              ["--lr", str(args.lr), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--shards-per-group", str(args.shards_per_group), "--hidden-dim", str(args.hidden_dim),
               *(["--batch-rows", str(args.batch_rows)] if args.batch_rows else [])])
    return ["--traces", args.traces, "--model-type", kind, "--lookahead", str(d), "--seed", str(args.seed),
            "--output", str(job_dir(args, kind, d, seed_recipe)), "--overwrite", "--device", args.device, *recipe,
            *(["--no-verify"] if args.no_verify else []), *(["--allow-incomplete"] if args.allow_incomplete else []),
            *(["--routing-only"] if args.routing_only and kind == "hybrid" else [])]


def check_jobs(args: argparse.Namespace, jobs: list[tuple[str, int, bool]], kinds: list[str], ts: TraceSet) -> None:
    """Every training's needs (router logits, router matrices, hidden layers) checked against the traces before
    any is started: one line naming the first predictor the traces cannot serve, and what to do."""
    for kind, d, seed_recipe in jobs:
        p = argparse.ArgumentParser(prog="train_simple_predictor")
        add_training_args(p, kind="simple", shards_per_group=4, batch_size=8, lr=5e-5, epochs=20, lookahead=0,
                          output="")
        targs = p.parse_args(trainer_flags(args, kind, d, seed_recipe))
        resolve_defaults(targs)
        for need in missing_inputs(targs, ts):
            rest = ",".join(k for k in kinds if k != kind)
            raise UserError(f"--predictors {kind} (d = {d}): {need.what}: {need.collect}"
                            + (f", or compare without it: --predictors {rest}" if rest else ""))


def train_job(args: argparse.Namespace, kind: str, d: int, seed_recipe: bool) -> Path:
    """Train one predictor in a subprocess (jobs run side by side); returns its checkpoint directory."""
    out = job_dir(args, kind, d, seed_recipe)
    name = out.name
    if (out / "best_checkpoint.pth").exists() and not args.retrain:
        return out
    cmd = [sys.executable, str(REPO / "scripts" / "train_simple_predictor.py"),
           *trainer_flags(args, kind, d, seed_recipe)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        lines = (out / "train.log").read_text(errors="replace").strip().splitlines()
        why = f" ({lines[-1].strip()[:300]})" if lines and ": error: " in lines[-1] else ""
        raise UserError(f"training {name} failed{why}; see {out / 'train.log'}")
    print(f"trained {name}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default="routing_data/traces/qwen2moe-mini", help="trace directory")
    p.add_argument("--lookaheads", default="0,1,2,3", help="comma list of d (0,1,2,3)")
    p.add_argument("--predictors", default=",".join(PREDICTORS), help="learned predictors to train and compare")
    p.add_argument("--baselines", default=",".join(BASELINES), help="training-free baselines to compare")
    p.add_argument("--routing-only", action="store_true", help="train the hybrid's history part alone, without "
                   "hidden states (train_hybrid_predictor.py --routing-only): what a set of imported routing can "
                   "compare, with --predictors hybrid and baselines that read routing only")
    p.add_argument("--seed-recipe", action="store_true", help="also train the simple MLP at d=0 with the seed's exact "
                   "recipe (lr 5e-5, 20 epochs, batch 8 sequences)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the comparison recipe (1e-3)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the comparison recipe (20)")
    p.add_argument("--hidden-dim", type=int, default=512, help="predictor width of the comparison recipe (512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per step (overrides --batch-size; not the "
                   "seed recipe's)")
    p.add_argument("--shards-per-group", type=int, default=4, help="shards per group (4)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (0)")
    p.add_argument("--jobs", type=int, default=1, help="trainings run side by side (1; 4 suits one GPU)")
    p.add_argument("--retrain", action="store_true", help="retrain even where a checkpoint exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N")
    p.add_argument("--output", default="results/compare", help="checkpoints, table, JSON and PNG go here")
    p.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="compare on the finished shards of a collection that has not completed")
    p.add_argument("--from-json", default=None, help="only redraw the table and figure of a comparison.json")
    args = p.parse_args(argv)
    check_writable("--output", args.output, "dir")  # before anything is read or trained
    if args.from_json:
        import json

        try:
            saved = json.loads(Path(args.from_json).read_text())
            top_k = saved.get("top_k") or int(next(c for c in saved["rows"][0] if c.startswith("recall@")).split("@")[1])
            rows, traces, model, device, saved_args = (saved[k] for k in ("rows", "traces", "model", "device", "args"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, IndexError, TypeError,
                AttributeError, StopIteration) as e:
            raise UserError(f"--from-json {args.from_json}: not a comparison this script wrote "
                            f"({type(e).__name__}: {str(e)[:100]})") from None
        write_comparison(rows, traces, model, top_k, device, saved_args, Path(args.output))
        return
    try:
        ds = sorted({int(x) for x in args.lookaheads.split(",")})
    except ValueError:
        raise UserError(f"--lookaheads {args.lookaheads!r}: use a comma list of integers, e.g. 0,1,2,3") from None
    kinds = choices_list("predictors", args.predictors, PREDICTORS)
    bases = choices_list("baselines", args.baselines, BASELINES)
    for name in ("epochs", "hidden_dim", "batch_size", "shards_per_group", "jobs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.seed < 0:
        raise UserError("--lr must be a positive number and --seed >= 0")
    if args.hidden_dim > CONFIG_LIMITS["hidden_dim"]:
        raise UserError(f"--hidden-dim {args.hidden_dim}: at most {CONFIG_LIMITS['hidden_dim']}")
    out = Path(args.output)
    ts = TraceSet(Path(args.traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
    m = ts.manifest
    if ds[0] < 0 or ds[-1] >= m.num_layers:
        raise UserError(f"--lookaheads {args.lookaheads}: the model has {m.num_layers} MoE layers, "
                        f"so each d must be in 0..{m.num_layers - 1}")
    dev = pick_device(args.device)
    split = split_sequences(ts.sequence_table(), args.seed)
    cols = headline_columns(m.top_k)
    recall = cols[0]
    jobs = [(k, d, False) for d in ds for k in kinds] + ([("simple", 0, True)] if args.seed_recipe and 0 in ds else [])
    check_jobs(args, jobs, kinds, ts)  # the traces serve every training, before any starts
    out.mkdir(parents=True, exist_ok=True)

    # --- train every (predictor, d), side by side
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        ckpts = dict(zip(jobs, pool.map(lambda j: train_job(args, *j), jobs)))
    print(f"training done in {time.perf_counter() - t0:.0f} s")

    # --- score everything on the same test rows
    rows: list[dict[str, Any]] = []
    for d in ds:
        entries: list[tuple[str, Any, bool, dict[str, Any]]] = []
        for (kind, dd, seed_recipe), ck in ckpts.items():
            if dd != d:
                continue
            model, cfg, ckpt = checkpoint_for_traces(ck / "best_checkpoint.pth", ts, dev, str(ck), test_ids=split["test"])
            name = f"{kind} (seed recipe)" if seed_recipe else trained_name(args, kind)
            info = {"parameters": count_parameters(model), "flops_per_row": flops_per_row(model),
                    "epochs": ckpt["args"]["epochs"], "lr": ckpt["args"]["lr"], "hidden_dim": cfg.hidden_dim}
            entries.append((name, predictor_scorer(model, d, m.num_experts), reads_hidden(cfg), info))
        for b in bases:
            if SCORERS[b].same_layer_only != (d == 0) and SCORERS[b].needs_router:
                continue  # at d = 0 router reuse is the router itself: the control row stands for both
            entries.append((b, baseline_scorer(b, ts, d, split["train"], dev, args.seed), SCORERS[b].needs_hidden, {}))
        for label, scorer, need_hidden, info in entries:
            acc = evaluate(scorer, ts, split["test"], d, dev, need_hidden=need_hidden, progress=False)
            s = acc.summary()
            rows.append({"lookahead": d, "predictor": label, **{c: s[c] for c in cols}, "rows": int(s["tokens"]),
                         f"per_layer_{recall}": acc.per_layer(recall), **info})
            print(f"d={d} {label:<22} " + " ".join(f"{c} {s[c]:.4f}" for c in cols), flush=True)

    write_comparison(rows, args.traces, m.model, m.top_k, device_name(dev),
                 {**vars(args), "test_sequences": len(split["test"])}, out)


if __name__ == "__main__":
    with one_line_errors("compare_predictors"):
        main()
