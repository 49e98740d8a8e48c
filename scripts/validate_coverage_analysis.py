r"""Stage 3: top-k coverage analysis of a predictor checkpoint or a baseline on held-out sequences.

The seed's command:
    python scripts/validate_coverage_analysis.py --checkpoint models/simple_checkpoints/best_checkpoint.pth \
        --model-type simple --batch-size 16
Baselines need no checkpoint (the split is recomputed from --seed, as training made it):
    python scripts/validate_coverage_analysis.py --model-type router --lookahead 0   # control: reads 1.0
    python scripts/validate_coverage_analysis.py --model-type router-reuse --lookahead 1
    python scripts/validate_coverage_analysis.py --model-type random

Prints a table for k in {1,3,5,8,10,12,15,20,25,30} (and k = top_k): recall@k (the seed's
"individual accuracy"), coverage@k (all true experts inside the top-k), any_hit@k (the seed's
"Top-k accuracy"), avg_found@k; the smallest k reaching 90% / 95% coverage; per-layer and
per-source breakdowns. Writes flat JSON and a 4-panel PNG.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collection.atomic import atomic_write_json
from collection.device import device_name, pick_device
from collection.errors import UserError, one_line_errors
from collection.format import DEFAULT_TRACES, TraceSet
from collection.paths import check_writable
from collection.rows import input_layers, mean_tokens_per_sequence, split_sequences
from models.checkpoint import check_fits_traces, checkpoint_split, load_checkpoint
from models.predictors import PREDICTORS
from validation.evaluate import evaluate
from validation.metrics import SEED_KS, random_expectation
from validation.scorers import BASELINES, SCORERS, RouterScorer, baseline_scorer, predictor_scorer
from validation.plots import coverage_figure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="predictor checkpoint (.pth) for simple/layer-aware/hybrid")
    p.add_argument("--model-type", "--model_type", default="simple", choices=[*PREDICTORS, *BASELINES],
                   help="a trained predictor (needs --checkpoint) or a baseline (default simple)")
    p.add_argument("--traces", default=None, help=f"trace directory (default: the checkpoint's, else {DEFAULT_TRACES})")
    p.add_argument("--lookahead", type=int, default=None, help="baselines: predict layer l+d (default 0); "
                   "checkpoints: must match the one trained (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="sequences evaluated (test)")
    p.add_argument("--seed", type=int, default=0, help="baselines: split seed, as in training (default 0)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16,
                   help="sequences per evaluation batch (seed: 16); only speed depends on it")
    p.add_argument("--ks", default=None, help=f"comma list of k, each at most the model's expert count "
                   f"(default: the seed's {','.join(map(str, SEED_KS))}, those up to the expert count)")
    p.add_argument("--json", default=None, help="write metrics here (default <output-dir>/coverage_metrics.json)")
    p.add_argument("--plot", default=None, help="write the figure here (default <output-dir>/coverage_analysis.png)")
    p.add_argument("--output-dir", default=None, help="default: the checkpoint's directory, else results/<type>-d<d>")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--gpu", type=int, default=None, help="CUDA GPU index")
    p.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="evaluate on the finished shards of a collection that has not completed")
    p.add_argument("--quiet", action="store_true", help="only the main table")
    args = p.parse_args(argv)
    if args.ks is not None:
        try:
            args.ks = tuple(sorted({int(k) for k in args.ks.split(",")}))
        except ValueError:
            p.error(f"--ks {args.ks!r}: use a comma list of integers")
        if min(args.ks) <= 0:
            p.error("every k of --ks must be positive")
    if args.batch_size <= 0:
        p.error("--batch-size must be positive")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.lookahead is not None and args.lookahead < 0:
        p.error("--lookahead must be >= 0")
    # every destination, before anything is read or computed
    args.json_path, args.plot_path = destinations(args)
    if args.json is None or args.plot is None or args.output_dir is not None:
        check_writable("--output-dir", args.output_dir if args.output_dir is not None else output_dir(args), "dir")
    check_writable("--json", args.json, "file")
    check_writable("--plot", args.plot, "file")
    return args


def output_dir(args: argparse.Namespace) -> Path:
    """--output-dir, or by default the checkpoint's directory (a predictor), else results/<type>-d<d> (a baseline)."""
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.model_type in PREDICTORS and args.checkpoint is not None:
        return Path(args.checkpoint).parent
    return Path(f"results/{args.model_type}-d{args.lookahead or 0}")


def destinations(args: argparse.Namespace) -> tuple[Path, Path]:
    """(metrics JSON, figure) paths."""
    out_dir = output_dir(args)
    return (Path(args.json) if args.json else out_dir / "coverage_metrics.json",
            Path(args.plot) if args.plot else out_dir / "coverage_analysis.png")


def check_ks(ks: tuple[int, ...] | None, num_experts: int) -> tuple[int, ...]:
    """The ks to report: the user's, each of which must exist for this model, or the seed's that do."""
    if ks is None:
        return tuple(k for k in SEED_KS if k <= num_experts)
    if max(ks) > num_experts:
        raise UserError(f"--ks {','.join(map(str, ks))}: k must be at most the model's {num_experts} experts")
    return ks


def print_table(res: dict[str, Any], ks: list[int], E: int, K: int) -> None:
    print(f"\n{'k':>4} | {'recall@k':>9} {'coverage@k':>11} {'any_hit@k':>10} {'avg_found@k':>12} | "
          f"{'random recall':>13} {'random cover':>12}")
    print("-" * 84)
    for k in ks:
        print(f"{k:>4} | {res[f'recall@{k}']:>9.4f} {res[f'coverage@{k}']:>11.4f} {res[f'any_hit@{k}']:>10.4f} "
              f"{res[f'avg_found@{k}']:>12.3f} | {random_expectation('recall', k, E, K):>13.4f} "
              f"{random_expectation('coverage', k, E, K):>12.4f}")
    for target in (90, 95):
        k = res[f"k_for_coverage_{target}"]
        print(f"smallest k with coverage >= {target}%: {k if k is not None else f'none up to {ks[-1]}'}")


def why_control_differs(res: dict[str, Any], scorer: RouterScorer) -> str:
    """One line: how many rows the router control misses, and how many of them a tie explains."""
    K, dtype = res["top_k"], str(scorer.weights.dtype).removeprefix("torch.")
    missed = round((1 - res[f"coverage@{K}"]) * scorer.rows)  # rows whose top-K set is not the stored one
    untied = missed - scorer.tied_missed_rows
    line = (f"why it differs: {missed:,} of {scorer.rows:,} rows miss the stored top-{K}. {scorer.tied_rows:,} rows "
            f"had a chosen expert tied in {dtype} with an unchosen one; torch.topk on this device broke "
            f"{scorer.tied_missed_rows:,} of those ties otherwise than the model did (its order among ties is not "
            f"documented and differs between devices)")
    if untied:
        line += f"; {untied:,} rows have no tie: their recomputed router logits differ from the model's"
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device, args.gpu)

    # --- what is scored: a checkpoint's predictor, or a baseline
    if args.model_type in PREDICTORS:
        if args.checkpoint is None:
            raise UserError(f"--model-type {args.model_type} needs --checkpoint (baselines: {', '.join(BASELINES)})")
        model, cfg, ckpt = load_checkpoint(Path(args.checkpoint), device)
        if cfg.kind != args.model_type:
            raise UserError(f"--checkpoint {args.checkpoint} holds a {cfg.kind} predictor, not {args.model_type}")
        if args.lookahead is not None and args.lookahead != cfg.lookahead:
            raise UserError(f"--lookahead {args.lookahead}: the checkpoint predicts {cfg.lookahead} layer(s) ahead")
        lookahead = cfg.lookahead
        traces = args.traces or ckpt["traces"]["dir"]
        ts = TraceSet(Path(traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
        m = ts.manifest
        ks_asked = check_ks(args.ks, m.num_experts)
        check_fits_traces(cfg, ts, f"--traces {traces}")
        if ckpt["traces"].get("tokens_sha256") != m.plan.get("tokens_sha256"):
            print("warning: these traces are not the ones the checkpoint was trained on; its stored split may not apply")
        seq_ids = checkpoint_split(ckpt, args.split, args.checkpoint)
        missing = np.setdiff1d(seq_ids, ts.sequence_table()["seq_id"])
        if len(missing):
            raise UserError(f"--traces {traces} lacks {len(missing)} of the {len(seq_ids)} sequences of the checkpoint's "
                            f"{args.split} split (it was trained on {ckpt['traces'].get('dir')}); evaluate on that trace set")
        scorer = predictor_scorer(model, lookahead, m.num_experts)
        need_hidden = True
        label = f"{cfg.kind} predictor ({args.checkpoint})"
    else:
        if args.checkpoint is not None:
            raise UserError(f"--model-type {args.model_type} is a baseline and takes no --checkpoint")
        lookahead = args.lookahead or 0
        traces = args.traces or DEFAULT_TRACES
        ts = TraceSet(Path(traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
        m = ts.manifest
        ks_asked = check_ks(args.ks, m.num_experts)
        split = split_sequences(ts.sequence_table(), args.seed)
        seq_ids = split[args.split]
        scorer = baseline_scorer(args.model_type, ts, lookahead, split["train"], device, args.seed)
        need_hidden = SCORERS[args.model_type].needs_hidden
        label = f"{args.model_type} baseline"
    if len(seq_ids) == 0:
        raise UserError(f"the {args.split} split is empty")

    # --- evaluate every (token, layer) row of the split
    table = ts.sequence_table()
    layers = input_layers(ts, lookahead, need_hidden)
    batch_rows = max(1024, round(args.batch_size * mean_tokens_per_sequence(table, seq_ids) * len(layers)))
    t0 = time.perf_counter()
    acc = evaluate(scorer, ts, seq_ids, lookahead, device, batch_rows=batch_rows, need_hidden=need_hidden, ks=ks_asked)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    E, K = m.num_experts, m.top_k
    ks = list(acc.ks)
    res: dict[str, Any] = {"model_type": args.model_type, "lookahead": lookahead, "split": args.split,
                           "model": m.model["name_or_path"], "traces": str(traces), "top_k": K, "num_experts": E,
                           "checkpoint": args.checkpoint, "device": device_name(device)}
    res.update(acc.summary())
    res["tokens"] = int(res["tokens"])
    res["sequences"] = int(len(seq_ids))
    res["rows_per_s"] = res["tokens"] / max(elapsed, 1e-9)
    for target in (90, 95):
        res[f"k_for_coverage_{target}"] = acc.smallest_k_for_coverage(target / 100)
    for k in ks:
        res[f"random/recall@{k}"] = random_expectation("recall", k, E, K)
        res[f"random/coverage@{k}"] = random_expectation("coverage", k, E, K)
    per_layer = acc.per_layer(f"recall@{K}")
    res["per_layer"] = {f"recall@{K}": per_layer, f"coverage@{max(k for k in ks if k <= 2 * K)}":
                        acc.per_layer(f"coverage@{max(k for k in ks if k <= 2 * K)}")}
    res["per_source"] = {name: acc.summary(sources=[i]) for i, name in enumerate(m.source_names)}

    # --- report
    print(f"\ncoverage analysis: {label}; lookahead d={lookahead} (target layer l+{lookahead} from layer l); "
          f"model {m.model['name_or_path']}; {args.split} split: {res['sequences']} sequences, {res['tokens']:,} "
          f"(token, layer) rows; {res['rows_per_s']:,.0f} rows/s on {res['device']}")
    print_table(res, ks, E, K)
    if isinstance(scorer, RouterScorer) and lookahead == 0:
        res["control_ties"] = {"rows": scorer.rows, "tied_rows": scorer.tied_rows,
                               "tied_missed_rows": scorer.tied_missed_rows}
        if res[f"recall@{K}"] < 1:
            print(why_control_differs(res, scorer))
    if not args.quiet:
        print(f"\nper target layer: recall@{K}")
        print("  " + " ".join(f"L{l}:{'-' if v is None else f'{v:.3f}'}" for l, v in enumerate(per_layer)))
        print(f"per source: recall@{K} / coverage@{K} / any_hit@1")
        for name, s in res["per_source"].items():
            if s.get("tokens"):
                print(f"  {name:<18} {s[f'recall@{K}']:.4f} / {s[f'coverage@{K}']:.4f} / {s['any_hit@1']:.4f}"
                      f"  ({int(s['tokens']):,} rows)")
    json_path, plot_path = args.json_path, args.plot_path
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, res)
    pred_f, true_f, rank_h = acc.frequencies()
    coverage_figure(res, ks, per_layer, pred_f, true_f, rank_h,
                    f"{label}, d={lookahead}, {m.model['name_or_path']}, {args.split} split", plot_path)
    print(f"\nwrote {json_path} and {plot_path}")


if __name__ == "__main__":
    with one_line_errors("validate_coverage_analysis"):
        main()
