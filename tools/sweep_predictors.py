r"""Sweep the predictor ideas one at a time: the "What mattered" table of docs/RESULTS.md.

Each config (CONFIGS below, or --extra) is a set of training flags. Every (config, lookahead) is trained as
its own job (a subprocess of scripts/train_anchored_predictor.py; --jobs of them side by side on one GPU),
then scored on the held-out test split next to router reuse. A job that fails is recorded with the tail of
its log and the others go on; the tables are printed and written at the end. With --lodo, one config is
also trained leaving each source out in turn (train and validate on five domains, test on the sixth).

Writes to --output: sweep.md (what mattered, per layer, leave-one-domain-out), sweep.json (every number),
and checkpoints/ and logs/ per job (kept out of the way with --work-dir).

The table in docs/RESULTS.md (GPU, the embedded default's full traces; see RESULTS.md for the timing):
    python tools/sweep_predictors.py --traces routing_data/traces/qwen2moe-mini --jobs 8 --lodo \
        --output results/sweep
Seconds on a CPU (tiny and noisy):
    python tools/sweep_predictors.py --traces routing_data/traces/quick --configs anchor,+kl --lookaheads 0,1 \
        --epochs 1 --hidden-dim 32 --output results/sweep-quick
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collection.traces.format import TraceSet
from collection.traces.rows import split_sequences
from common.atomic import atomic_write_bytes, atomic_write_json
from common.device import device_name, pick_device
from common.errors import UserError, one_line_errors
from models.checkpoint import checkpoint_for_traces
from models.predictors import count_parameters, flops_per_row, reads_hidden
from validation.coverage.evaluate import evaluate
from validation.coverage.metrics import headline_columns
from validation.coverage.scorers import baseline_scorer, predictor_scorer

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "scripts" / "train_anchored_predictor.py"



def recipe(*, ce: float = 1, kl: float = 1, past: int = 2, own: int = 2, window: int = 2, token: bool = True,
           separate: bool = True, fallback: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
    """Train flags of one config with every idea's flag written out, so a change of the anchored kind's
    defaults (training.trainer.KIND_DEFAULTS) never changes what a row means. No arguments: the full recipe."""
    return ["--loss-ce", str(ce), "--loss-kl", str(kl), "--past-layers", str(past), "--own-layers", str(own),
            "--window", str(window), "--token-emb" if token else "--no-token-emb",
            "--separate-layers" if separate else "--no-separate-layers",
            "--layer-fallback" if fallback else "--no-layer-fallback", *extra]


TARGETS = {0: 0.99, 1: 0.88, 2: 0.85, 3: 0.83}  # recall@4 targets on the embedded default's test split (docs/RESULTS.md)
FULL_CONFIG = "+fallback"  # the last rung of the ladder: every idea, = the anchored kind's default recipe
# name -> (the idea it adds or removes, reference row, flags). The ladder adds one idea per row, up to
# FULL_CONFIG; each row after it changes one thing of the full recipe.
CONFIGS: dict[str, tuple[str, str | None, list[str]]] = {
    "layer-aware": ("layer-aware MLP (the comparison's kind), h_l only", None, ["--model-type", "layer-aware"]),
    "anchor": ("router-anchored head on h_l (CE loss)", "layer-aware",
               recipe(kl=0, past=0, own=0, window=0, token=False, separate=False, fallback=False)),
    "+kl": ("+ KL to the target router's softmax", "anchor",
            recipe(past=0, own=0, window=0, token=False, separate=False, fallback=False)),
    "+past": ("+ this token's MoE inputs at l-1, l-2", "+kl",
              recipe(own=0, window=0, token=False, separate=False, fallback=False)),
    "+own": ("+ this token's routing at its last 2 finished layers", "+past",
             recipe(window=0, token=False, separate=False, fallback=False)),
    "+window": ("+ previous 2 tokens' MoE input and routing at l+d", "+own",
                recipe(token=False, separate=False, fallback=False)),
    "+token": ("+ token-id embedding", "+window", recipe(separate=False, fallback=False)),
    "+separate": ("+ one trunk per target layer (was one shared trunk, per-layer heads)", "+token",
                  recipe(fallback=False)),
    "+fallback": ("+ per-layer fallback to router reuse where it validates better (= full)", "+separate", recipe()),
    "full -anchor": ("full without the router anchor (plain per-layer head)", FULL_CONFIG,
                     recipe(extra=("--no-anchor",))),
    "full -ce": ("full, KL only (no cross-entropy on the top-k)", FULL_CONFIG, recipe(ce=0)),
    "full +mse": ("full + MSE of the predicted h_{l+d}", FULL_CONFIG, recipe(extra=("--loss-mse", "1"))),
    "full +router-ft": ("full, router fine-tuned at lr x 0.1", FULL_CONFIG, recipe(extra=("--router-lr", "0.1"))),
    "full depth 1": ("full, 1 residual block instead of 2 (cheaper at batch 1)", FULL_CONFIG,
                     recipe(extra=("--depth", "1"))),
    "full depth 4": ("full, 4 residual blocks instead of 2", FULL_CONFIG, recipe(extra=("--depth", "4"))),
    "full width x2": ("full, twice the width (--hidden-dim x 2)", FULL_CONFIG, recipe(extra=("--width-x2",))),
    "full window 4": ("full, window of 4 previous tokens", FULL_CONFIG, recipe(window=4)),
    "full +context": ("full + mean MoE input at l+d over the previous 16 tokens", FULL_CONFIG,
                      recipe(extra=("--context", "16"))),
    "full -regularisation": ("full without dropout and weight decay", FULL_CONFIG,
                             recipe(extra=("--dropout", "0", "--weight-decay", "0"))),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to sweep")
    g.add_argument("--traces", default="routing_data/traces/qwen2moe-mini", help="trace directory")
    g.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of configs ({', '.join(CONFIGS)})")
    g.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help="another config: a name and its train flags, e.g. 'wide=--hidden-dim 1024 --loss-kl 1'")
    g.add_argument("--lookaheads", default="0,1,2,3", help="comma list of d (0,1,2,3)")
    g.add_argument("--variant-lookaheads", default=None, help="comma list of d for the configs after the ladder "
                   f"(after {FULL_CONFIG!r}) and --extra ones (default: --lookaheads)")
    g.add_argument("--ladder-lookaheads", default=None, help="comma list of d for the ladder's rungs before "
                   f"{FULL_CONFIG!r}, which itself runs at every --lookaheads (default: --lookaheads)")
    g = p.add_argument_group("recipe of every config (a config's own flags override these)")
    g.add_argument("--hidden-dim", type=int, default=512, help="predictor width (512)")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (2e-3)")
    g.add_argument("--epochs", type=int, default=20, help="epochs (20)")
    g.add_argument("--batch-rows", type=int, default=32768, help="rows per step (32768)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout (0.1)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    g.add_argument("--schedule", choices=["epoch", "step"], default="step",
                   help="step: warm-up then cosine per step (default); epoch: the seed's per-epoch cosine")
    g.add_argument("--seed", type=int, default=0, help="split and training seed (0)")
    g = p.add_argument_group("leave one domain out")
    g.add_argument("--lodo", action="store_true", help="also train --lodo-config leaving each source out in turn")
    g.add_argument("--lodo-config", default=None, help="config for --lodo (default: the full recipe, +token)")
    g.add_argument("--lodo-lookaheads", default="1", help="lookaheads of the leave-one-domain-out runs (1)")
    g = p.add_argument_group("run")
    g.add_argument("--jobs", type=int, default=1, help="trainings side by side (8 suits one H100 at the default size)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda:N")
    g.add_argument("--output", default="results/sweep", help="sweep.md and sweep.json go here")
    g.add_argument("--work-dir", default=None, help="checkpoints and logs (default: --output)")
    g.add_argument("--retrain", action="store_true", help="retrain even where a finished checkpoint exists")
    g.add_argument("--best-dir", default=None, help="copy each lookahead's best checkpoint (by validation recall) to "
                   "BEST_DIR/best_d<d>/ (best_checkpoint.pth and its .json), for the prefetch simulator")
    g.add_argument("--deadline", type=float, default=None, help="seconds: jobs not started by then are skipped, "
                   "jobs still training are stopped and scored from their best epoch so far (default: none)")
    args = p.parse_args(argv)
    for name in ("hidden_dim", "epochs", "batch_rows", "jobs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    return args


def config_table(args: argparse.Namespace) -> dict[str, tuple[str, str | None, list[str]]]:
    """The selected configs, in ladder order, plus --extra ones."""
    chosen = [c for c in args.configs.split(",") if c]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        raise UserError(f"--configs: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(CONFIGS)})")
    table = {c: CONFIGS[c] for c in CONFIGS if c in chosen}
    for spec in args.extra:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--extra {spec!r}: expected NAME=FLAGS")
        table[name.strip()] = (f"extra: {flags.strip()}", None, shlex.split(flags))
    if not table:
        raise UserError("--configs: nothing to sweep")
    return table


def train_cmd(args: argparse.Namespace, flags: list[str], d: int, out: Path, exclude: str = "") -> list[str]:
    """The training command; a config's own flags come last, so they override the sweep's recipe."""
    flags = [x for f in flags for x in (["--hidden-dim", str(2 * args.hidden_dim)] if f == "--width-x2" else [f])]
    return [sys.executable, str(TRAIN_SCRIPT), "--traces", args.traces, "--lookahead", str(d),
            "--seed", str(args.seed), "--hidden-dim", str(args.hidden_dim), "--lr", str(args.lr),
            "--epochs", str(args.epochs), "--batch-rows", str(args.batch_rows), "--dropout", str(args.dropout),
            "--weight-decay", str(args.weight_decay), "--schedule", str(args.schedule), "--device", args.device,
            "--no-verify", "--output", str(out), "--overwrite",
            *(["--exclude-sources", exclude] if exclude else []), *flags]


def run_job(args: argparse.Namespace, name: str, flags: list[str], d: int, work: Path, ts: TraceSet,
            test_ids: np.ndarray, dev: torch.device, deadline: float, exclude: str = "") -> dict[str, Any]:
    """Train one config at one lookahead in a subprocess, then score its best checkpoint on `test_ids`.

    Never raises: a failure is returned as {"error": ...} with the tail of the log. A job not started before
    `deadline` (time.monotonic()) is skipped; one still training at the deadline is stopped and scored from
    the best checkpoint of the epochs it finished ("truncated")."""
    tag = f"{name}{'-without-' + exclude if exclude else ''}-d{d}".replace(" ", "_").replace("+", "plus-")
    out = work / "checkpoints" / tag
    log = work / "logs" / f"{tag}.log"
    row: dict[str, Any] = {"config": name, "lookahead": d, "exclude": exclude, "log": str(log)}
    t0 = time.perf_counter()
    try:
        if args.retrain or not (out / "results.json").is_file():
            if time.monotonic() >= deadline:
                return {**row, "error": "skipped: --deadline reached before it started"}
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ}
            if dev.type == "cpu" and args.jobs > 1:
                env.setdefault("OMP_NUM_THREADS", "1")  # side-by-side CPU jobs: one thread each
            with open(log, "w") as fh:
                try:
                    proc = subprocess.run(train_cmd(args, flags, d, out, exclude), stdout=fh,
                                          stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                          timeout=max(1.0, deadline - time.monotonic()))
                    returncode = proc.returncode
                except subprocess.TimeoutExpired:
                    returncode = None  # stopped at the deadline: its best epoch so far is scored
                    row["truncated"] = True
            if returncode not in (0, None):
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                return {**row, "error": f"training exited {returncode}: {' | '.join(tail)[-400:]}"}
            if not (out / "best_checkpoint.pth").is_file():
                return {**row, "error": "stopped at --deadline before its first epoch ended"}
        model, cfg, ckpt = checkpoint_for_traces(out / "best_checkpoint.pth", ts, dev, str(out),
                                                 test_ids=None if exclude else test_ids)  # a held-out source: its own rows
        row["checkpoint"] = str(out / "best_checkpoint.pth")
        acc = evaluate(predictor_scorer(model, d, ts.manifest.num_experts), ts, test_ids, d, dev,
                       need_hidden=reads_hidden(cfg), progress=False)
        summary = acc.summary()
        recall = f"recall@{ts.manifest.top_k}"
        history = ckpt["metrics"]["history"]
        row.update({**{c: summary[c] for c in headline_columns(ts.manifest.top_k)}, "per_layer": acc.per_layer(recall),
                    "per_source": acc.per_source(recall), "val_best": ckpt["metrics"]["best"],
                    "epochs_done": len(history), "fallback_layers": ckpt["metrics"].get("fallback_layers", []),
                    "parameters": count_parameters(model),
                    "flops_per_row": flops_per_row(model), "train_seconds": sum(h["epoch_s"] for h in history),
                    "train_rows_per_s": history[-1]["rows_per_s"]})
    except Exception as e:  # noqa: BLE001 - one config's failure is recorded, never fatal to the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    row["wall_seconds"] = time.perf_counter() - t0
    recall = f"recall@{ts.manifest.top_k}"
    status = (f"{row[recall]:.4f}{' (truncated)' if row.get('truncated') else ''}" if "error" not in row
              else "FAILED " + row["error"][:120])
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: {status} ({row['wall_seconds']:.0f} s)", flush=True)
    return row


def error_cut(recall: float, reuse: float) -> float:
    """Share of router reuse's misses (1 - recall) that the predictor removes."""
    return 1 - (1 - recall) / max(1 - reuse, 1e-12)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = config_table(args)
    ds = sorted({int(x) for x in args.lookaheads.split(",") if x})
    lodo_ds = sorted({int(x) for x in args.lodo_lookaheads.split(",") if x}) if args.lodo else []
    out = Path(args.output)
    work = Path(args.work_dir or args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(args.device)
    ts = TraceSet(Path(args.traces))
    m = ts.manifest
    recall = f"recall@{m.top_k}"
    table = ts.sequence_table()
    split = split_sequences(table, args.seed)
    for flag in ("variant_lookaheads", "ladder_lookaheads"):
        if any(int(x) not in ds for x in (getattr(args, flag) or "").split(",") if x):
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: every d must be in --lookaheads")
    for d in ds + lodo_ds:
        if not 0 <= d < m.num_layers:
            raise UserError(f"--lookaheads {d}: the model has {m.num_layers} MoE layers")
    print(f"sweep: {len(configs)} configs x d = {ds} on {args.traces} ({m.model['name_or_path']}), "
          f"{args.jobs} jobs side by side on {device_name(dev)}", flush=True)

    # --- router reuse (the router itself at d = 0) on the same test rows: the reference of every row
    reuse: dict[int, dict[str, Any]] = {}
    for d in sorted(set(ds + lodo_ds)):
        acc = evaluate(baseline_scorer("router" if d == 0 else "router-reuse", ts, d, split["train"], dev), ts,
                       split["test"], d, dev, progress=False)
        reuse[d] = {recall: acc.summary()[recall], "per_layer": acc.per_layer(recall),
                    "per_source": acc.per_source(recall)}
        print(f"router{' (control)' if d == 0 else ' reuse'} d={d}: {recall} {reuse[d][recall]:.4f}", flush=True)

    # --- every config at every lookahead, and with --lodo one config leaving each source out, side by side.
    # Order: the full recipe at every d, the ladder at d = 1, leave-one-domain-out, the ladder at the other
    # lookaheads (farthest first, d = 0 last), then the variants: what a --deadline cuts is the least needed. The report is rewritten after
    # every job, so even a sweep killed from outside leaves its tables.
    lodo_config = (args.lodo_config or FULL_CONFIG) if args.lodo else None
    if lodo_config is not None and lodo_config not in configs:
        raise UserError(f"--lodo-config {lodo_config!r}: not a config of this sweep ({', '.join(configs)})")
    by_id = dict(zip(table["seq_id"].tolist(), table["source"].tolist()))
    test_src = np.array([by_id[s] for s in split["test"]])
    first_d = 1 if 1 in ds else ds[0]
    ladder = list(CONFIGS)[:list(CONFIGS).index(FULL_CONFIG) + 1]
    vds = sorted({int(x) for x in args.variant_lookaheads.split(",") if x}) if args.variant_lookaheads else ds
    lds = sorted({int(x) for x in args.ladder_lookaheads.split(",") if x}) if args.ladder_lookaheads else ds

    def runs_at(c: str, d: int) -> bool:  # the ladder at --ladder-lookaheads; variants at --variant-lookaheads
        return d in (lds if c in ladder else vds)
    later = sorted((d for d in ds if d != first_d), key=lambda d: (d == 0, -d))  # d = 0 (the control) last
    jobs = [(FULL_CONFIG, d, "") for d in ds if FULL_CONFIG in configs]
    jobs += [(c, first_d, "") for c in configs if c != FULL_CONFIG and c in ladder and runs_at(c, first_d)]
    jobs += [(lodo_config, d, src) for d in lodo_ds for src in m.source_names] if lodo_config else []
    jobs += [(lodo_config, d, "") for d in lodo_ds if lodo_config and d not in ds]  # its in-domain reference
    jobs += [(c, d, "") for d in later for c in configs if c != FULL_CONFIG and c in ladder and runs_at(c, d)]
    jobs += [(c, d, "") for d in [first_d, *later] for c in configs if c not in ladder and runs_at(c, d)]
    t0 = time.perf_counter()
    deadline = time.monotonic() + (args.deadline if args.deadline else float("inf"))
    rows: list[dict[str, Any]] = []
    lodo_rows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def finished(row: dict[str, Any]) -> None:
        with lock:
            (lodo_rows if row["exclude"] else rows).append(row)
            write_report(args, configs, ds, rows, reuse, lodo_rows, lodo_config, recall, m, dev,
                         time.perf_counter() - t0, out)
            if args.best_dir:
                copy_best(rows, ds, recall, Path(args.best_dir))

    def job(name: str, d: int, src: str) -> None:
        ids = split["test"][test_src == m.source_names.index(src)] if src else split["test"]
        finished(run_job(args, name, configs[name][2], d, work, ts, ids, dev, deadline, src))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(job, *j) for j in jobs]:
            f.result()  # job() never raises for a config's failure; anything else is a bug worth stopping on
    sweep_seconds = time.perf_counter() - t0

    report = write_report(args, configs, ds, rows, reuse, lodo_rows, lodo_config, recall, m, dev, sweep_seconds, out)
    print("\n" + report)
    failed = [r for r in rows + lodo_rows if "error" in r]
    print(f"wrote {out / 'sweep.md'} and sweep.json in {sweep_seconds:.0f} s; "
          f"{len(rows) + len(lodo_rows) - len(failed)} jobs scored, {len(failed)} failed or skipped" +
          "".join(f"\n  FAILED {r['config']} d={r['lookahead']}{' without ' + r['exclude'] if r['exclude'] else ''}: "
                  f"{r['error']}" for r in failed))


def copy_best(rows: list[dict[str, Any]], ds: list[int], recall: str, best_dir: Path) -> None:
    """Each lookahead's best checkpoint so far (by validation recall) into best_dir/best_d<d>/, with its JSON
    sidecar (config, args, metrics) and best.json naming the config; rewritten when a better one finishes."""
    for d in ds:
        name = best_config(rows, d, recall)
        row = next((r for r in rows if r["config"] == name and r["lookahead"] == d and not r["exclude"]), None)
        if row is None or "checkpoint" not in row:
            continue
        dst = best_dir / f"best_d{d}"
        marker = dst / "best.json"
        if marker.is_file() and json.loads(marker.read_text()).get("checkpoint") == row["checkpoint"]:
            continue  # already there
        src = Path(row["checkpoint"])
        try:
            dst.mkdir(parents=True, exist_ok=True)
            for f in (src, src.with_suffix(".json")):
                atomic_write_bytes(dst / f.name, f.read_bytes())
            atomic_write_json(marker, {"lookahead": d, "config": name, "checkpoint": row["checkpoint"],
                                       "test": {recall: row[recall]}, "val_best": row["val_best"]})
        except OSError as e:  # a full disk loses the copy, never the sweep: the checkpoint stays in --work-dir
            print(f"warning: could not copy {src} to {dst}: {e}", flush=True)


def best_config(rows: list[dict[str, Any]], d: int, recall: str) -> str | None:
    """The config with the best validation recall at lookahead d (the test split never picks)."""
    ok = [r for r in rows if r["lookahead"] == d and "error" not in r and not r["exclude"]]
    return max(ok, key=lambda r: r["val_best"].get(recall, -1))["config"] if ok else None


def write_report(args: argparse.Namespace, configs: dict[str, tuple[str, str | None, list[str]]], ds: list[int],
                 rows: list[dict[str, Any]], reuse: dict[int, dict[str, Any]], lodo_rows: list[dict[str, Any]],
                 lodo_config: str | None, recall: str, m: Any, dev: torch.device, sweep_seconds: float,
                 out: Path) -> str:
    """sweep.md (three tables) and sweep.json; returns the markdown."""
    get = {(r["config"], r["lookahead"]): r for r in rows if not r["exclude"]}

    def cell(name: str | None, d: int) -> float | None:
        r = get.get((name, d)) if name else None
        return r[recall] if r and "error" not in r else None

    def fmt(x: float | None, spec: str = ".4f") -> str:
        return "-" if x is None else format(x, spec)

    cond = (f"`{m.model['name_or_path']}`, traces `{args.traces}`, held-out test split (split seed {args.seed}), "
            f"{recall}; width {args.hidden_dim}, lr {args.lr:g}, {args.epochs} epochs, {args.batch_rows} rows per "
            f"step, schedule {args.schedule}; device {device_name(dev)}; sweep {sweep_seconds:.0f} s with "
            f"{args.jobs} jobs.")
    lines = ["## What mattered", "", cond, "",
             "Each row adds or removes one idea; Δ = change of recall against the reference row (d = 1..3 mean); "
             "error cut = share of router reuse's misses removed.", "",
             "| config | idea | vs | " + " | ".join(f"d={d}" for d in ds) + " | " +
             " | ".join(f"cut d={d}" for d in ds if d > 0) + " | Δ mean d≥1 |",
             "|---|---|---|" + "---|" * (len(ds) + sum(d > 0 for d in ds) + 1)]
    lines.append("| router reuse | training-free (the router itself at d = 0) | | " +
                 " | ".join(fmt(reuse[d][recall]) for d in ds) + " | " +
                 " | ".join("0%" for d in ds if d > 0) + " | |")
    for name, (idea, ref, _) in configs.items():
        vals = [cell(name, d) for d in ds]
        cuts = [fmt(None if v is None else 100 * error_cut(v, reuse[d][recall]), ".1f") + "%"
                if v is not None else "-" for v, d in zip(vals, ds) if d > 0]
        pos = [d for d in ds if d > 0]
        deltas = [cell(name, d) - cell(ref, d) for d in pos if cell(name, d) is not None and cell(ref, d) is not None]
        delta = f"{np.mean(deltas):+.4f}" if deltas else "-"
        lines.append(f"| {name} | {idea} | {ref or ''} | " + " | ".join(fmt(v) for v in vals) + " | " +
                     " | ".join(cuts) + f" | {delta} |")

    # the best config of each d (picked on validation), its test recall next to router reuse and the targets
    lines += ["", "## Best per lookahead (picked by validation recall) against router reuse", "",
              f"Test {recall}; target = the recall@4 target of docs/RESULTS.md.", "",
              "| d | best config | its test recall | router reuse | error cut vs reuse | target | met |",
              "|---|---|---|---|---|---|---|"]
    for d in ds:
        best = best_config(rows, d, recall)
        v, rr = cell(best, d), reuse[d][recall]
        target = TARGETS.get(d)
        lines.append(f"| {d} | {best or '-'} | {fmt(v)} | {fmt(rr)}{' (router control)' if d == 0 else ''} | "
                     f"{'-' if v is None or d == 0 else format(100 * error_cut(v, rr), '.1f') + '%'} | "
                     f"{fmt(target, '.2f')} | {'-' if v is None or target is None else ('yes' if v >= target else 'no')} |")

    # per layer: the best config of each d (by validation recall) against router reuse
    lines += ["", "## Per layer: the best config (by validation recall) against router reuse", "",
              f"{recall} of target layer l+d on the test split.", "",
              "| d | config | " + " | ".join(f"L{l}" for l in range(m.num_layers)) +
              " | layers below reuse | reset to reuse (validation) |",
              "|---|---|" + "---|" * (m.num_layers + 2)]
    per_layer: dict[int, Any] = {}
    for d in ds:
        best = best_config(rows, d, recall)
        if best is None:
            continue
        mine = get[(best, d)]["per_layer"]
        theirs = reuse[d]["per_layer"]
        below = [l for l in range(m.num_layers) if mine[l] is not None and theirs[l] is not None
                 and mine[l] < theirs[l]]
        reset = get[(best, d)].get("fallback_layers", [])
        per_layer[d] = {"config": best, "learned": mine, "router_reuse": theirs, "below": below, "reset": reset}
        lines.append(f"| {d} | {best} | " + " | ".join(fmt(x) for x in mine) +
                     f" | {below or 'none'} | {reset or 'none'} |")
        lines.append(f"| {d} | router {'(control)' if d == 0 else 'reuse'} | " +
                     " | ".join(fmt(x) for x in theirs) + " | | |")

    if lodo_rows:
        lines += ["", f"## Leave one domain out: `{lodo_config}` trained on five domains, tested on the sixth", "",
                  f"{recall} on the held-out domain's test sequences; in-domain = the same config trained on every "
                  "domain, scored on the same sequences.", "",
                  "| d | held-out domain | in-domain | left out | drop | router reuse | error cut left out |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(lodo_rows, key=lambda r: (r["lookahead"], m.source_names.index(r["exclude"]))):
            d, src = r["lookahead"], r["exclude"]
            idx = m.source_names.index(src)
            ind = get.get((lodo_config, d))
            ind_v = ind["per_source"][idx] if ind and "error" not in ind else None
            rr = reuse[d]["per_source"][idx]
            v = r.get(recall)
            lines.append(f"| {d} | {src} | {fmt(ind_v)} | {fmt(v)} | "
                         f"{fmt(None if v is None or ind_v is None else ind_v - v, '+.4f')} | {fmt(rr)} | "
                         f"{'-' if v is None or d == 0 else format(100 * error_cut(v, rr), '.1f') + '%'} |")
    failed = [r for r in rows + lodo_rows if "error" in r]
    if failed:
        lines += ["", "Failed jobs:", ""] + [f"- {r['config']} d={r['lookahead']}"
                                             f"{' without ' + r['exclude'] if r['exclude'] else ''}: {r['error']}"
                                             for r in failed]
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "sweep.md", md.encode())
    atomic_write_json(out / "sweep.json", {"args": vars(args), "configs": {k: list(v) for k, v in configs.items()},
                                           "router_reuse": reuse, "rows": rows, "per_layer": per_layer,
                                           "lodo": lodo_rows, "lodo_config": lodo_config, "device": device_name(dev),
                                           "sweep_seconds": sweep_seconds})
    return md


if __name__ == "__main__":
    with one_line_errors("sweep_predictors"):
        main()
