r"""The demo's last word: one line for the sanity controls, one for the predictor against its baselines.

Reads the coverage_metrics.json files `make demo` wrote under DEMO_DIR (router-d0/, random-d0/,
router-reuse-d1/ and the predictor's checkpoint folder) and exits 1 if a control is off: the layer's own
router must read recall@K = 1.0 exactly, uniform random K/E within sampling noise (K, E from the JSON).

After `make demo`:
    python tools/demo_summary.py runs/demo
Any predictor folder holding a coverage_metrics.json (from validate_coverage_analysis.py --checkpoint):
    python tools/demo_summary.py runs/demo --predictor runs/demo/layer-aware-d1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError, one_line_errors

RANDOM_SIGMAS = 5  # random recall@K may stray this many standard errors from K/E before the control fails


def read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `make demo` (or the validate commands it runs) first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a metrics JSON ({e})") from None


def controls(router: dict[str, Any], random: dict[str, Any]) -> tuple[str, bool]:
    """The control line and whether both controls hold."""
    K, E = int(router["top_k"]), int(router["num_experts"])
    expect = K / E
    # standard error of the mean slot recall of uniform random top-K picks over `tokens` rows (a row's hits
    # are hypergeometric: variance K p (1-p) (E-K)/(E-1) with p = K/E, divided by K^2 for recall)
    sd = math.sqrt(expect * (1 - expect) * (E - K) / (E - 1) / K / max(int(random["tokens"]), 1))
    tol = RANDOM_SIGMAS * sd
    r, q = router[f"recall@{K}"], random[f"recall@{K}"]
    ok = r == 1.0 and abs(q - expect) <= tol
    line = (f"controls: router recall@{K} {r:.3f} (expect 1.0), random {q:.3f} (expect {expect:.3f} +- {tol:.3f}) "
            f"{'OK' if ok else 'FAILED'}")
    return line, ok


def predictor_line(pred: dict[str, Any], reuse: dict[str, Any], random: dict[str, Any]) -> str:
    K, d = int(pred["top_k"]), pred["lookahead"]
    if (reuse["lookahead"], reuse["split"], reuse["tokens"]) != (d, pred["split"], pred["tokens"]):
        raise UserError("the predictor and router-reuse metrics are not of the same lookahead, split and rows")
    p, b = pred[f"recall@{K}"], reuse[f"recall@{K}"]
    verdict = f"beats router reuse {b:.3f} by {p - b:+.3f}" if p > b else f"does NOT beat router reuse {b:.3f}"
    return (f"predictor: {pred['model_type']} at lookahead {d} (layer l+{d}'s experts from layer l), "
            f"{pred['split']} split ({pred['sequences']} sequences, {pred['tokens']:,} rows): recall@{K} {p:.3f}; "
            f"{verdict}; random {random[f'recall@{K}']:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo_dir", type=Path, help="what `make demo` wrote (runs/demo)")
    p.add_argument("--predictor", type=Path, default=None,
                   help="folder of the predictor's coverage_metrics.json (default DEMO_DIR/layer-aware-d1)")
    args = p.parse_args(argv)
    d = args.demo_dir
    router, random = read(d / "router-d0" / "coverage_metrics.json"), read(d / "random-d0" / "coverage_metrics.json")
    pred = read((args.predictor or d / "layer-aware-d1") / "coverage_metrics.json")
    reuse = read(d / f"router-reuse-d{pred['lookahead']}" / "coverage_metrics.json")
    print(f"demo outputs: {d}/ (traces/, the checkpoint in {args.predictor or d / 'layer-aware-d1'}/, "
          "coverage_metrics.json and coverage_analysis.png in each folder)")
    line, ok = controls(router, random)
    print(line)
    print(predictor_line(pred, reuse, random))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    with one_line_errors("demo_summary"):
        main()
