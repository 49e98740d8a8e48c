r"""What each hidden format costs in prediction quality: the same predictors trained and tested on each.

Story: collect the embedded default's traces once, losslessly (fp32); rewrite them in every format with the
collection encoder (transcode_traces.py), the reference being bf16, what a GPU collection stores by default;
then, per format, train the same predictors at d = 0..3 with the same split, seed and recipe and score them on
the same test rows, beside the router control (d = 0) and router reuse (d >= 1) computed from the decoded
hidden states (compare_predictors.py). Prints and writes the table: bytes per token (this trace set, and the
seed's full recipe at Qwen1.5-MoE dimensions), recall@4 per d, and the loss against bf16.

GPU (the whole bundled trace split, the comparison recipe; a few minutes on one H100):
    python tools/compare_hidden_formats.py --output results/formats --jobs 4
CPU (what docs/BENCHMARKS.md reports from a 2-core machine; hours):
    python tools/compare_hidden_formats.py --target_traces 600 --max_length 128 --predictors layer-aware \
        --epochs 4 --hidden-dim 256 --formats pca-3.5bit,hadamard-3.5bit,hadamard-4bit,hadamard-3bit \
        --output results/formats-cpu
Seconds (tiny, noisy; checks the plumbing):
    python tools/compare_hidden_formats.py --target_traces 60 --max_length 32 --lookaheads 0,1 --epochs 1 \
        --predictors simple --formats pca-3.5bit --output /tmp/formats-quick
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from collection.traces.format import MANIFEST, TraceSet, read_manifest
from collection.traces.hidden_format import FORMATS, LOSSLESS
from common.atomic import atomic_write_bytes, atomic_write_json
from common.device import pick_device
from common.errors import UserError, one_line_errors
from models.moe_configs import seed_recipe_table

REFERENCE = "bf16"  # lossless in bfloat16: what a GPU collection stores without --hidden-format


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(n for n in FORMATS if n != LOSSLESS),
                   help=f"compact formats to compare with {REFERENCE} (default: all)")
    p.add_argument("--target_traces", "--target-traces", type=int, default=None,
                   help="sequences to collect (default: the whole bundled trace split, 2,400)")
    p.add_argument("--max_length", "--max-length", type=int, default=256, help="tokens per sequence at most (256)")
    p.add_argument("--lookaheads", default="0,1,2,3", help="comma list of d (0,1,2,3)")
    p.add_argument("--predictors", default="layer-aware,hybrid", help="learned predictors (layer-aware,hybrid)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the comparison recipe (20)")
    p.add_argument("--hidden-dim", type=int, default=512, help="predictor width (512)")
    p.add_argument("--seeds", default="0",
                   help="comma list of split-and-training seeds (0); with several, each format's loss is the mean of "
                        "its paired losses against bf16 trained with the same seed, and the table gives their range")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side (1; 4 suits one GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N")
    p.add_argument("--output", default="results/formats", help="traces, checkpoints and the table go here")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give a comma list of integers, e.g. 0,1,2") from None
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds: give distinct integers >= 0, e.g. 0,1,2")
    for f in args.formats:
        if f not in FORMATS or f == LOSSLESS:
            raise UserError(f"--formats: {f!r} is not a compact format ({', '.join(n for n in FORMATS if n != LOSSLESS)})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from scripts.collect_traces import main as collect
    from scripts.compare_predictors import main as compare
    from scripts.transcode_traces import main as transcode

    out = Path(args.output)
    dev = pick_device(args.device)

    # --- one lossless collection, rewritten in every format by the collection encoder
    source = out / "traces" / "fp32"
    if not (source / MANIFEST).exists() or not read_manifest(source).complete:
        collect(["--dtype", "float32", "--device", str(dev), "--max_length", str(args.max_length), "--output",
                 str(source), "--overwrite", *(["--target_traces", str(args.target_traces)] if args.target_traces else [])])
    names = [REFERENCE, *args.formats]
    for name in names:
        dst = out / "traces" / name
        if not (dst / MANIFEST).exists():
            transcode(["--traces", str(source), "--output", str(dst), "--device", str(dev), "--overwrite",
                       *(["--hidden-format", LOSSLESS, "--hidden-dtype", "bfloat16"] if name == REFERENCE else
                         ["--hidden-format", name])])

    # --- the same predictors, split, seed and recipe on each; the same test rows
    for seed in args.seeds:
        for name in names:
            compare(["--traces", str(out / "traces" / name), "--lookaheads", args.lookaheads, "--predictors",
                     args.predictors, "--baselines", "router,router-reuse", "--epochs", str(args.epochs),
                     "--hidden-dim", str(args.hidden_dim), "--seed", str(seed), "--jobs", str(args.jobs),
                     "--device", str(dev), "--output", str(result_dir(out, name, seed))])
    report(out, names, args)


def result_dir(out: Path, name: str, seed: int) -> Path:
    """Where compare_predictors.py writes one format's comparison with one seed (seed 0: the format's name)."""
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def report(out: Path, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """formats.json / formats.md: bytes per token and recall@K per (format, d, predictor), loss against bf16."""
    recipe = {r["format"]: r for r in seed_recipe_table()}
    results: dict[str, Any] = {"formats": {}, "reference": REFERENCE, "args": vars(args)}
    seeds = getattr(args, "seeds", [0])
    per_seed: dict[str, list[dict[str, float]]] = {}
    for name in names:
        per_seed[name] = []
        for seed in seeds:
            cmp = json.loads((result_dir(out, name, seed) / "comparison.json").read_text())
            k = cmp["top_k"]
            per_seed[name].append({f"{r['predictor']}@d{r['lookahead']}": r[f"recall@{k}"] for r in cmp["rows"]})
        ts = TraceSet(out / "traces" / name, verify=False)
        m = ts.manifest
        tokens = sum(s.tokens for s in m.shards)
        results["formats"][name] = {
            "hidden_format": m.hidden_format, "bytes_per_token": sum(s.bytes for s in m.shards) / tokens,
            "seed_recipe": recipe[LOSSLESS if name == REFERENCE else name],
            f"recall@{k}": {key: float(np.mean([r[key] for r in per_seed[name]])) for key in per_seed[name][0]},
            f"recall@{k}_per_seed": per_seed[name], "seeds": seeds,
            "test_rows": {f"d{r['lookahead']}": r["rows"] for r in cmp["rows"]}, "device": cmp["device"]}
    ref = per_seed[REFERENCE]
    for name in names:
        r = results["formats"][name]
        # paired: each seed's format run against the bf16 run with the same split and initialization
        losses = [{key: ref[i][key] - v for key, v in run.items() if key in ref[i]} for i, run in enumerate(per_seed[name])]
        r["loss_vs_bf16_per_seed"] = losses
        r["loss_vs_bf16"] = {key: float(np.mean([x[key] for x in losses])) for key in losses[0]}
    keys = list(ref[0])
    lines = [f"recall@{k} on the held-out test split of `{ts.manifest.model['name_or_path']}` traces "
             f"({tokens:,} tokens collected; device {results['formats'][REFERENCE]['device']}); loss = bf16 - format"
             + (f"; mean over seeds {', '.join(map(str, seeds))} (split and training), loss paired by seed"
                if len(seeds) > 1 else ""),
             "", "| format | B/token here | seed recipe B/token | seed recipe GB | " + " | ".join(keys) + " | worst loss |",
             "|---|---|---|---|" + "---|" * (len(keys) + 1)]
    for name in names:
        r = results["formats"][name]
        loss = r["loss_vs_bf16"]
        cells = [f"{r[f'recall@{k}'][key]:.4f}" + ("" if name == REFERENCE else f" ({-loss[key]:+.4f})") for key in keys]
        worst = max((loss[key] for key in keys if not key.startswith("router")), default=0.0)
        lines.append(f"| {name} | {r['bytes_per_token']:,.0f} | {r['seed_recipe']['record_bytes_per_token']:,} | "
                     f"{r['seed_recipe']['seed_recipe_gb']:.1f} | " + " | ".join(cells) +
                     f" | {'-' if name == REFERENCE else f'{worst:+.4f}'} |")
    if len(seeds) > 1:
        lines.append("")
        for name in names[1:]:
            spread = "; ".join(f"{key} {min(x[key] for x in results['formats'][name]['loss_vs_bf16_per_seed']):+.4f} to "
                               f"{max(x[key] for x in results['formats'][name]['loss_vs_bf16_per_seed']):+.4f}"
                               for key in keys if not key.startswith("router"))
            lines.append(f"- {name}: loss per seed, lowest to highest: {spread}")
    table = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "formats.md", table.encode())
    atomic_write_json(out / "formats.json", results)
    print("\n" + table + f"\nwrote {out / 'formats.md'} and formats.json")
    return results


if __name__ == "__main__":
    with one_line_errors("compare_hidden_formats"):
        main()
