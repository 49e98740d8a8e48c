"""The coverage analysis's report: the result dict of an evaluation, its printed tables and its JSON, for the
per-token target (recall@k, coverage@k, any_hit@k, avg_found@k beside random) and the window target
(window_recall@k, AP, AUC beside random). scripts/validate_coverage_analysis.py tells the story; these print it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes, atomic_write_json
from common.errors import UserError
from models.predictors import PREDICTORS
from validation.coverage.metrics import (
    SEED_KS,
    CoverageAccumulator,
    WindowAccumulator,
    headline_columns,
    random_expectation,
)
from validation.coverage.scorers import RouterScorer
from validation.plots import comparison_figure


def check_ks(ks: tuple[int, ...] | None, num_experts: int) -> tuple[int, ...]:
    """The ks to report: the user's, each of which must exist for this model, or the seed's that do."""
    if ks is None:
        return tuple(k for k in SEED_KS if k <= num_experts)
    if max(ks) > num_experts:
        raise UserError(f"--ks {','.join(map(str, ks))}: k must be at most the model's {num_experts} experts")
    return ks


def coverage_result(acc: CoverageAccumulator, meta: dict[str, Any], m: Any, elapsed: float) -> dict[str, Any]:
    """The flat result of a per-token evaluation: meta (model_type, lookahead, split, traces, checkpoint, device,
    sequences) and the manifest's model, the summary, the smallest k reaching 90% / 95% coverage, each k's random
    expectation, per target layer and per source."""
    E, K, ks = m.num_experts, m.top_k, list(acc.ks)
    res: dict[str, Any] = {**meta, "model": m.model["name_or_path"], "top_k": K, "num_experts": E, **acc.summary()}
    res["tokens"] = int(res["tokens"])
    res["rows_per_s"] = res["tokens"] / max(elapsed, 1e-9)
    for target in (90, 95):
        res[f"k_for_coverage_{target}"] = acc.smallest_k_for_coverage(target / 100)
    for k in ks:
        res[f"random/recall@{k}"] = random_expectation("recall", k, E, K)
        res[f"random/coverage@{k}"] = random_expectation("coverage", k, E, K)
    wide = max(k for k in ks if k <= 2 * K)
    res["per_layer"] = {f"recall@{K}": acc.per_layer(f"recall@{K}"),
                        f"coverage@{wide}": acc.per_layer(f"coverage@{wide}")}
    res["per_source"] = {name: acc.summary(sources=[i]) for i, name in enumerate(m.source_names)}
    return res


def print_coverage(res: dict[str, Any], ks: list[int], label: str, quiet: bool) -> None:
    """The header, the table over k, and unless quiet the per-target-layer and per-source lines."""
    K = res["top_k"]
    print(f"\ncoverage analysis: {label}; lookahead d={res['lookahead']} (target layer l+{res['lookahead']} from layer "
          f"l); model {res['model']}; {res['split']} split: {res['sequences']} sequences, {res['tokens']:,} "
          f"(token, layer) rows; {res['rows_per_s']:,.0f} rows/s on {res['device']}")
    print_table(res, ks, res["num_experts"], K)
    if quiet:
        return
    print(f"\nper target layer: recall@{K}")
    per_layer = res["per_layer"][f"recall@{K}"]
    print("  " + " ".join(f"L{l}:{'-' if v is None else f'{v:.3f}'}" for l, v in enumerate(per_layer)))
    print(f"per source: recall@{K} / coverage@{K} / any_hit@1")
    for name, s in res["per_source"].items():
        if s.get("tokens"):
            print(f"  {name:<18} {s[f'recall@{K}']:.4f} / {s[f'coverage@{K}']:.4f} / {s['any_hit@1']:.4f}"
                  f"  ({int(s['tokens']):,} rows)")


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


def report_window(acc: WindowAccumulator, meta: dict[str, Any], m: Any, label: str, elapsed: float, quiet: bool,
                  json_path: Path) -> None:
    """Print and write the window metrics: recall@k against the set, AP and AUC, each beside its random value.
    meta: what was scored (model_type, lookahead_tokens, split, traces, checkpoint, device, sequences, and
    history for a baseline that looks back); m: the trace set's manifest."""
    E = m.num_experts
    res: dict[str, Any] = {**meta, "model": m.model["name_or_path"], "top_k": m.top_k, "num_experts": E,
                           **acc.summary()}
    window = res["lookahead_tokens"]
    if not res["window_rows"]:
        raise UserError(f"the {res['split']} split has no token with a later token in its sequence")
    res["rows_per_s"] = res["window_rows"] / max(elapsed, 1e-9)
    res["random/window_auc"] = 0.5
    for k in acc.ks:
        res[f"random/window_recall@{k}"] = k / E
    res["per_layer"] = {"window_ap": acc.per_layer("window_ap")}
    print(f"\nwindow analysis: {label}; target: the experts layer l uses in tokens t+1..t+{window}"
          + (f"; looking back {res['history']} tokens" if "history" in res else "")
          + f"; model {m.model['name_or_path']}; {res['split']} split: {res['sequences']} sequences, "
          f"{int(res['window_rows']):,} (token, layer) rows with a later token; mean |set| "
          f"{res.get('window_size', float('nan')):.1f} of {E} experts; {res['rows_per_s']:,.0f} rows/s")
    print(f"\n{'k':>4} | {'window_recall@k':>15} | {'random':>7}")
    print("-" * 33)
    for k in acc.ks:
        print(f"{k:>4} | {res[f'window_recall@{k}']:>15.4f} | {k / E:>7.4f}")
    print(f"average precision {res['window_ap']:.4f} (random {res['random/window_ap']:.4f}); "
          f"AUC {res['window_auc']:.4f} (random 0.5, over {int(res['window_auc_rows']):,} rows)")
    if not quiet:
        print("per layer: average precision")
        print("  " + " ".join(f"L{l}:{'-' if v is None else f'{v:.3f}'}" for l, v in
                              enumerate(res["per_layer"]["window_ap"])))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, res)
    print(f"\nwrote {json_path}")


def write_comparison(rows: list[dict[str, Any]], traces: str, model: dict[str, Any], top_k: int, device: str,
                 args: dict[str, Any], out: Path) -> None:
    """compare_predictors.py's report: comparison.md / .json / _per_layer.png, and how much of router reuse's error
    each best learned predictor removes at each lookahead. rows: one per (lookahead, predictor) with the headline
    columns, per_layer_<recall@K>, and for learned predictors their parameters and FLOPs per row."""
    out.mkdir(parents=True, exist_ok=True)
    cols = headline_columns(top_k)
    recall = cols[0]
    ds = sorted({r["lookahead"] for r in rows})
    summary = {}
    for d in ds:
        reuse = next((r for r in rows if r["lookahead"] == d and r["predictor"] == "router-reuse"), None)  # d >= 1
        mine = [r for r in rows if r["lookahead"] == d and r["predictor"] in PREDICTORS]
        if reuse and mine:
            best = max(mine, key=lambda r: r[recall])
            cut = 1 - (1 - best[recall]) / max(1 - reuse[recall], 1e-12)
            summary[d] = {"best": best["predictor"], f"best_{recall}": best[recall],
                          f"router_reuse_{recall}": reuse[recall], "error_reduction_vs_router_reuse": cut}
    n_test = args.get("test_sequences")
    lines = [f"Model `{model['name_or_path']}`, traces `{traces}`, held-out test split"
             f"{f': {n_test} sequences' if n_test else ''} "
             f"(split seed {args['seed']}); rows = (token, layer l) with target layer l+d; device {device}.", "",
             "| d | predictor | " + " | ".join(cols) + " | params | FLOPs/row |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        lines.append(f"| {r['lookahead']} | {r['predictor']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) +
                     f" | {r.get('parameters', '-')} | {r.get('flops_per_row', '-')} |")
    lines += ["", f"| d | best learned | its {recall} | router reuse {recall} | error cut vs router reuse |",
              "|---|---|---|---|---|"]
    for d, s in summary.items():
        lines.append(f"| {d} | {s['best']} | {s[f'best_{recall}']:.4f} | {s[f'router_reuse_{recall}']:.4f} | "
                     f"{s['error_reduction_vs_router_reuse'] * 100:.1f}% |")
    table = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "comparison.md", table.encode())
    atomic_write_json(out / "comparison.json", {"rows": rows, "summary": summary, "traces": traces, "model": model,
                                                 "top_k": top_k, "device": device, "args": args})
    curves: dict[str, dict[int, list[float | None]]] = {}
    for r in rows:
        curves.setdefault(r["predictor"], {})[r["lookahead"]] = r[f"per_layer_{recall}"]
    comparison_figure(curves, recall, out / "comparison_per_layer.png",
                      f"per-layer {recall} by lookahead, {model['name_or_path']}, test split")
    print("\n" + table + f"\nwrote {out / 'comparison.md'}, comparison.json, comparison_per_layer.png")
