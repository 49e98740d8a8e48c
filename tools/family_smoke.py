"""Collect -> train -> validate on a tiny random model of every supported MoE family, one line each.

This shows the pipeline runs on each family's routing shape (top-k, E, dense first layers, router bias,
grouped routing). The models have RANDOM weights: every recall printed here is meaningless as a result.

All ten families, about 10-20 s each on 2 CPU cores:
    python tools/family_smoke.py --families all
Two families, keeping the files:
    python tools/family_smoke.py --families mixtral,deepseek_v3 --workdir /tmp/families
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from collection.families import FAMILIES
from collection.traces.format import TraceSet
from common.errors import UserError, one_line_errors

BANNER = ("RANDOM WEIGHTS: the recall values below say nothing about any real model; they only show that "
          "collect -> train -> validate ran on each family")


def run_family(model_type: str, work: Path, args: argparse.Namespace) -> dict:
    from scripts.collect_traces import main as collect
    from scripts.train_simple_predictor import main as train
    from scripts.validate_coverage_analysis import main as validate
    from tools.make_random_checkpoint import main as make_checkpoint

    model, traces, ckpt = work / "model", work / "traces", work / "simple"
    cpu = ["--device", "cpu"]
    make_checkpoint(["--preset", f"tiny-{model_type}", "--dtype", "float32", "--output", str(model), "--overwrite"])
    collect(["--model", str(model), "--datasets", "bundled", "--target_traces", str(args.sequences),
             "--shard_size", str(args.sequences // 2), "--batch_size", "8", "--max_length", str(args.max_length),
             "--dtype", "float32", "--output", str(traces), "--overwrite", *cpu])
    train(["--traces", str(traces), "--epochs", str(args.epochs), "--batch-rows", "2048", "--lr", "1e-3",
           "--output", str(ckpt), "--overwrite", *cpu])
    validate(["--checkpoint", str(ckpt / "best_checkpoint.pth"), "--model-type", "simple", "--quiet",
              "--json", str(work / "simple.json"), "--plot", str(work / "simple.png"), *cpu])
    validate(["--traces", str(traces), "--model-type", "router", "--lookahead", "0", "--quiet",
              "--json", str(work / "router.json"), "--plot", str(work / "router.png"), *cpu])
    m = TraceSet(traces).manifest
    simple, router = (json.loads((work / f"{n}.json").read_text()) for n in ("simple", "router"))
    return {"E": m.num_experts, "k": m.top_k, "layers": m.moe_layer_indices, "tokens": int(m.plan["tokens"]),
            "simple": simple[f"recall@{m.top_k}"], "router": router[f"recall@{m.top_k}"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="all", help=f"all, or a comma list of: {', '.join(FAMILIES)}")
    p.add_argument("--sequences", type=int, default=48, help="sequences collected per family (48: 8 per domain)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence at most (64)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the simple predictor (2)")
    p.add_argument("--workdir", default=None, help="keep every family's model, traces and results here "
                   "(default: a temporary directory, removed afterwards)")
    args = p.parse_args(argv)
    names = list(FAMILIES) if args.families == "all" else [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise UserError(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose all or from {', '.join(FAMILIES)}")
    if args.sequences < 12 or args.epochs < 1 or args.max_length < 8:
        raise UserError("--sequences must be >= 12 (2 per bundled domain), --epochs >= 1, --max-length >= 8")

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="family-smoke-"))
    print(f"!!! {BANNER} !!!")
    print(f"{'family':<12} {'E':>3} {'k':>2} {'MoE decoder layers':<20} {'tokens':>6} {'seconds':>7}  "
          f"recall@k: simple predictor (test split), router control (lookahead 0)")
    failed = []
    try:
        for name in names:
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:  # each stage's own output goes to the family's log; one line here
                with open(work / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    r = run_family(name, work, args)
            except (UserError, RuntimeError, ValueError) as e:
                failed.append(name)
                print(f"{name:<12} FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__} (log: {work / 'log.txt'})")
                continue
            if r["router"] < 1.0:  # the control: the family's own rule on its own router must reproduce its choice
                failed.append(name)
            layers = ",".join(map(str, r["layers"]))
            print(f"{name:<12} {r['E']:>3} {r['k']:>2} {layers:<20} {r['tokens']:>6} {time.perf_counter() - t0:>7.1f}  "
                  f"simple {r['simple']:.3f}, router {r['router']:.3f}   (random weights: meaningless)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"!!! {BANNER} !!!")
    print("router control: the stored router matrices applied with each family's selection rule (router bias, "
          "sigmoid + correction bias, grouped top-k; docs/FAMILIES.md) must read 1.000 in every family")
    if failed:
        raise UserError(f"{len(failed)} famil{'y' if len(failed) == 1 else 'ies'} failed: {', '.join(failed)}")


if __name__ == "__main__":
    with one_line_errors("family_smoke"):
        main()
