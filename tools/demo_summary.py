r"""The demo's last word: one line for the sanity controls, one for the predictor against its baselines, then what
prefetching with it would buy, simulated, one line per cache size.

Reads the coverage_metrics.json files `make demo` wrote under DEMO_DIR (router-d0/, random-d0/,
router-reuse-d1/, previous-token-d0/ and the predictor's checkpoint folder) and exits 1 if a control is off: the
layer's own router must read recall@K = 1.0 exactly, uniform random K/E within sampling noise (K, E from the JSON).
The prefetch lines come from the simulator's prefetch-d1/prefetch.json (scripts/simulate_prefetch.py on the demo's
traces and predictor): decode tokens/s of prefetching with the predictor and with router reuse over on-demand LRU,
predicted by a cost model (not measured), with the traces' temporal locality beside that of real MoEs.

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
# previous-token recall@4 reported for large Qwen MoEs (docs/PREFETCH.md): the temporal locality LRU lives on
REAL_LOCALITY = "0.35-0.43"


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


def prefetch_lines(sim: dict[str, Any], locality: dict[str, Any], predictor: str) -> list[str]:
    """A header naming the cost model and the traces' locality, then per cache size what prefetching with the
    predictor (`predictor`: its label) and with router reuse buys over on-demand LRU; every line says "simulated"."""
    K, E, d = int(sim["top_k"]), int(sim["num_experts"]), sim["lookahead"]
    cost = sim["cost_model"]
    q = locality[f"recall@{K}"]
    lines = [f"simulated prefetch (a cost model, not a measurement): the test split's {sim['tokens']:,} tokens decoded "
             f"at batch 1, {sim['model_config']} {sim['expert_format']} experts over a "
             f"{cost['link_bytes_per_s'] / 1e9:.0f} GB/s link, layer l+{d}'s top-{sim['fetch_budget']} fetched while layer l runs; these traces' locality "
             f"(previous-token recall@{K}) is {q:.3f}, against {REAL_LOCALITY} for real Qwen MoEs, so LRU does worse "
             "here than it would there"]
    by_cache: dict[int, dict[str, dict[str, Any]]] = {}
    for row in sim["rows"]:
        by_cache.setdefault(int(row["cache_experts"]), {})[row["policy"]] = row
    for c, rows in sorted(by_cache.items()):
        lru, reuse = rows.get("on-demand"), rows.get("prefetch:router-reuse")
        mine = next((r for p, r in rows.items() if p.startswith("prefetch:") and p.endswith(".pth")), None)
        if lru is None or reuse is None or mine is None:
            raise UserError(f"the simulator's rows at C = {c} lack on-demand, prefetch:router-reuse or the predictor")
        lines.append(f"simulated, C = {c} of {E} experts cached per layer: prefetch with {predictor} "
                     f"{mine['speedup_vs_on_demand']:.2f}x the tokens/s of on-demand LRU, with router reuse "
                     f"{reuse['speedup_vs_on_demand']:.2f}x (hit rate {mine['hit_rate']:.2f} / "
                     f"{reuse['hit_rate']:.2f} / LRU {lru['hit_rate']:.2f})")
    return lines


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
    sim = read(d / f"prefetch-d{pred['lookahead']}" / "prefetch.json")
    locality = read(d / "previous-token-d0" / "coverage_metrics.json")
    line, ok = controls(router, random)
    print(line)
    print(predictor_line(pred, reuse, random))
    for line in prefetch_lines(sim, locality, f"{pred['model_type']} d={pred['lookahead']}"):
        print(line)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    with one_line_errors("demo_summary"):
        main()
