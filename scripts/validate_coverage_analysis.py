r"""Stage 3: top-k coverage analysis of a predictor checkpoint or a baseline on held-out sequences.

The seed's command (the predictor's kind is read from the checkpoint; --model-type, if given, must agree):
    python scripts/validate_coverage_analysis.py --checkpoint models/simple_checkpoints/best_checkpoint.pth \
        --model-type simple --batch-size 16
Seconds on a CPU (the checkpoint of the train scripts' quick commands):
    python scripts/validate_coverage_analysis.py --checkpoint models/simple_checkpoints/quick/best_checkpoint.pth
Baselines need no checkpoint (the split is recomputed from --seed, as training made it):
    python scripts/validate_coverage_analysis.py --model-type router --lookahead 0   # control: reads 1.0
    python scripts/validate_coverage_analysis.py --model-type router-reuse --lookahead 1
    python scripts/validate_coverage_analysis.py --model-type random
A predictor trained with --lookahead-tokens W (which experts layer l uses in tokens t+1..t+W) is scored
against that set, and so are the recency and frequency baselines when given --lookahead-tokens:
    python scripts/validate_coverage_analysis.py --checkpoint models/simple_checkpoints/best_checkpoint.pth \
        --model-type layer-aware
    python scripts/validate_coverage_analysis.py --model-type recency --lookahead-tokens 16 --history 16

Prints a table for k in {1,3,5,8,10,12,15,20,25,30} (and k = top_k): recall@k (the seed's
"individual accuracy"), coverage@k (all true experts inside the top-k), any_hit@k (the seed's
"Top-k accuracy"), avg_found@k; the smallest k reaching 90% / 95% coverage; per-layer and
per-source breakdowns. Writes flat JSON and a 4-panel PNG. The window target prints and writes (JSON only)
window_recall@k, window_ap and window_auc (docs/metrics.md) beside their random values, and per-layer AP.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from collection.traces.format import DEFAULT_TRACES, TraceSet
from collection.traces.rows import input_layers, mean_tokens_per_sequence, split_sequences
from common.atomic import atomic_write_json
from common.device import device_name, pick_device
from common.errors import UserError, one_line_errors
from common.paths import check_writable
from models.checkpoint import check_checkpoint_fits, checkpoint_split, load_checkpoint
from models.predictors import PREDICTORS, reads_hidden
from validation.coverage.evaluate import evaluate, evaluate_window
from validation.coverage.metrics import SEED_KS
from validation.coverage.report import check_ks, coverage_result, print_coverage, report_window, why_control_differs
from validation.coverage.scorers import (
    BASELINES,
    DEFAULT_HISTORY,
    SCORERS,
    RouterScorer,
    baseline_scorer,
    predictor_scorer,
)
from validation.plots import coverage_figure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="predictor checkpoint (.pth) of any train_*_predictor.py")
    p.add_argument("--model-type", "--model_type", default=None, choices=[*PREDICTORS, *BASELINES],
                   help="a baseline, or with --checkpoint the predictor's kind (default: the checkpoint's; "
                        "given, it must agree)")
    p.add_argument("--traces", default=None, help=f"trace directory (default: the checkpoint's, else {DEFAULT_TRACES})")
    p.add_argument("--lookahead", type=int, default=None, help="baselines: predict layer l+d (default 0); "
                   "checkpoints: must match the one trained (default: the checkpoint's)")
    p.add_argument("--lookahead-tokens", type=int, default=None,
                   help="score against the experts layer l uses in tokens t+1..t+W (checkpoints: must match the one "
                        "trained, default the checkpoint's; baselines: default 0, the per-token target of --lookahead)")
    p.add_argument("--history", type=int, default=None,
                   help=f"tokens the recency and frequency baselines look back (default: --lookahead-tokens W when "
                        f"given, else {DEFAULT_HISTORY})")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="sequences evaluated (test)")
    p.add_argument("--seed", type=int, default=0, help="baselines: split seed, as in training (default 0)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16,
                   help="sequences per evaluation batch (seed: 16); only speed depends on it")
    p.add_argument("--ks", default=None, help=f"comma list of k, each at most the model's expert count "
                   f"(default: the seed's {','.join(map(str, SEED_KS))}, those up to the expert count)")
    p.add_argument("--json", default=None, help="write metrics here (default <output-dir>/coverage_metrics.json)")
    p.add_argument("--plot", default=None, help="write the figure here (default <output-dir>/coverage_analysis.png; "
                   "none for the window target)")
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
    if args.lookahead_tokens is not None and args.lookahead_tokens < 0:
        p.error("--lookahead-tokens must be >= 0")
    if args.lookahead_tokens and args.lookahead:
        p.error("--lookahead (layers ahead) and --lookahead-tokens (tokens ahead at the same layer) are exclusive")
    if args.history is not None and args.history < 1:
        p.error("--history must be at least 1")
    # every destination, before anything is read or computed (a file where a folder goes, or the reverse, included)
    args.json_path, args.plot_path = destinations(args)
    if args.json is None or args.plot is None or args.output_dir is not None:
        check_writable("--output-dir", args.output_dir if args.output_dir is not None else output_dir(args), "dir")
    check_writable("--json", args.json, "file")
    check_writable("--plot", args.plot, "file")
    return args


def output_dir(args: argparse.Namespace) -> Path:
    """--output-dir, or by default the checkpoint's directory (a predictor), else results/<type>-d<d> (a baseline;
    results/<type>-w<W> for a baseline of the experts used in the next W tokens)."""
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.checkpoint is not None and args.model_type not in BASELINES:  # its kind may be read from it later
        return Path(args.checkpoint).parent
    if args.lookahead_tokens:
        return Path(f"results/{args.model_type}-w{args.lookahead_tokens}")
    return Path(f"results/{args.model_type}-d{args.lookahead or 0}")


def destinations(args: argparse.Namespace) -> tuple[Path, Path]:
    """(metrics JSON, figure) paths."""
    out_dir = output_dir(args)
    return (Path(args.json) if args.json else out_dir / "coverage_metrics.json",
            Path(args.plot) if args.plot else out_dir / "coverage_analysis.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device, args.gpu)

    # --- what is scored: a checkpoint's predictor (its kind read from the checkpoint), or a baseline
    if args.checkpoint is None and args.model_type is None:
        raise UserError(f"give --checkpoint (a trained predictor) or --model-type BASELINE ({', '.join(BASELINES)})")
    if args.checkpoint is not None and args.model_type not in BASELINES:
        model, cfg, ckpt = load_checkpoint(Path(args.checkpoint), device)
        if args.model_type is not None and cfg.kind != args.model_type:
            raise UserError(f"--checkpoint {args.checkpoint} holds a {cfg.kind} predictor, not {args.model_type}; "
                            "drop --model-type (the checkpoint says its kind)")
        args.model_type = cfg.kind
        if args.lookahead is not None and args.lookahead != cfg.lookahead:
            raise UserError(f"--lookahead {args.lookahead}: the checkpoint predicts {cfg.lookahead} layer(s) ahead")
        lookahead, window = cfg.lookahead, cfg.lookahead_tokens
        if args.lookahead_tokens is not None and args.lookahead_tokens != window:
            raise UserError(f"--lookahead-tokens {args.lookahead_tokens}: the checkpoint predicts "
                            + (f"{window} tokens ahead" if window else f"{lookahead} layer(s) ahead, not tokens"))
        traces = args.traces or ckpt["traces"]["dir"]
        ts = TraceSet(Path(traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
        m = ts.manifest
        ks_asked = check_ks(args.ks, m.num_experts)
        check_checkpoint_fits(cfg, ckpt, ts, f"--traces {traces}", test_ids=None)  # any --split may be scored
        seq_ids = checkpoint_split(ckpt, args.split, args.checkpoint)
        missing = np.setdiff1d(seq_ids, ts.sequence_table()["seq_id"])
        if len(missing):
            raise UserError(f"--traces {traces} lacks {len(missing)} of the {len(seq_ids)} sequences of the checkpoint's "
                            f"{args.split} split (it was trained on {ckpt['traces'].get('dir')}); evaluate on that trace set")
        scorer = predictor_scorer(model, lookahead, m.num_experts)
        need_hidden = reads_hidden(cfg)  # the routing-only hybrid: every layer's rows, from routing alone
        label = f"{cfg.kind} predictor ({args.checkpoint})"
    else:
        if args.model_type in PREDICTORS:
            raise UserError(f"--model-type {args.model_type} needs --checkpoint (baselines: {', '.join(BASELINES)})")
        if args.checkpoint is not None:
            raise UserError(f"--model-type {args.model_type} is a baseline and takes no --checkpoint")
        lookahead, window = args.lookahead or 0, args.lookahead_tokens or 0
        traces = args.traces or DEFAULT_TRACES
        ts = TraceSet(Path(traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
        m = ts.manifest
        ks_asked = check_ks(args.ks, m.num_experts)
        split = split_sequences(ts.sequence_table(), args.seed)
        seq_ids = split[args.split]
        scorer = baseline_scorer(args.model_type, ts, lookahead, split["train"], device, args.seed,
                                 history=args.history or window or DEFAULT_HISTORY)
        need_hidden = SCORERS[args.model_type].needs_hidden
        label = f"{args.model_type} baseline"
    if len(seq_ids) == 0:
        raise UserError(f"the {args.split} split is empty")

    # --- evaluate every (token, layer) row of the split
    table = ts.sequence_table()
    layers = input_layers(ts, lookahead, need_hidden)
    batch_rows = max(1024, round(args.batch_size * mean_tokens_per_sequence(table, seq_ids) * len(layers)))
    t0 = time.perf_counter()
    meta = {"model_type": args.model_type, "split": args.split, "traces": str(traces), "checkpoint": args.checkpoint,
            "device": device_name(device), "sequences": int(len(seq_ids))}
    if window:
        wacc = evaluate_window(scorer, ts, seq_ids, window, device, batch_rows=batch_rows, need_hidden=need_hidden,
                               ks=ks_asked)
        meta["lookahead_tokens"] = window
        if SCORERS.get(args.model_type) is not None and SCORERS[args.model_type].looks_back:
            meta["history"] = args.history or window
        report_window(wacc, meta, m, label, time.perf_counter() - t0, args.quiet, args.json_path)
        return
    acc = evaluate(scorer, ts, seq_ids, lookahead, device, batch_rows=batch_rows, need_hidden=need_hidden, ks=ks_asked)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    meta["lookahead"] = lookahead
    res = coverage_result(acc, meta, m, time.perf_counter() - t0)

    # --- report
    print_coverage(res, list(acc.ks), label, args.quiet)
    if isinstance(scorer, RouterScorer) and lookahead == 0:
        res["control_ties"] = {"rows": scorer.rows, "tied_rows": scorer.tied_rows,
                               "tied_missed_rows": scorer.tied_missed_rows}
        if res[f"recall@{m.top_k}"] < 1:
            print(why_control_differs(res, scorer))
    json_path, plot_path = args.json_path, args.plot_path
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, res)
    pred_f, true_f, rank_h = acc.frequencies()
    coverage_figure(res, list(acc.ks), res["per_layer"][f"recall@{m.top_k}"], pred_f, true_f, rank_h,
                    f"{label}, d={lookahead}, {m.model['name_or_path']}, {args.split} split", plot_path)
    print(f"\nwrote {json_path} and {plot_path}")


if __name__ == "__main__":
    with one_line_errors("validate_coverage_analysis"):
        main()
