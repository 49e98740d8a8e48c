"""Figures for coverage analyses and predictor comparisons (matplotlib, written atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.atomic import atomic_path


def _figure_module():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")


def _legend_below(a: Any, ncol: int) -> None:
    """The legend under the panel's x label: inside the axes it would cover bars or curves
    (a control's bars reach 1.0, and every expert's frequency bar is about equally high)."""
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=9, frameon=False)


def coverage_figure(result: dict[str, Any], ks: list[int], per_layer: list[float | None], pred_freq: np.ndarray,
                    true_freq: np.ndarray, rank_hist: np.ndarray, title: str, path: Path) -> None:
    """Four panels: metrics vs k, per-layer recall@K, predicted vs true expert share, true-expert ranks."""
    plt = _figure_module()
    fig = draw_coverage(result, ks, per_layer, pred_freq, true_freq, rank_hist, title)
    save_figure(fig, path)
    plt.close(fig)


def draw_coverage(result: dict[str, Any], ks: list[int], per_layer: list[float | None], pred_freq: np.ndarray,
                  true_freq: np.ndarray, rank_hist: np.ndarray, title: str) -> Any:
    """The figure of `coverage_figure`, not yet saved (tests measure where its parts landed)."""
    plt = _figure_module()
    K = int(result["top_k"])
    # constrained layout keeps each x label and legend clear of the title of the panel below
    fig, ax = plt.subplots(2, 2, figsize=(13, 10), layout="constrained")
    a = ax[0, 0]
    for metric, style in (("coverage", "o-"), ("recall", "s-"), ("any_hit", "^--")):
        a.plot(ks, [result[f"{metric}@{k}"] for k in ks], style, label=f"{metric}@k")
    a.plot(ks, [result[f"random/recall@{k}"] for k in ks], ":", color="gray", label="random recall@k")
    # the targets behind "smallest k with coverage >= 90% / 95%" in the printed table
    a.axhline(0.9, color="gray", lw=0.8, ls="--", label="coverage targets 90% / 95%")
    a.axhline(0.95, color="gray", lw=0.8, ls="--")
    a.set(xlabel="k (experts predicted)", ylabel="fraction of rows", ylim=(0, 1.02), title="metrics vs k")
    _legend_below(a, ncol=3)
    a.grid(alpha=0.3)
    a = ax[0, 1]
    vals = [np.nan if v is None else v for v in per_layer]
    a.bar(range(len(vals)), vals, color="tab:blue", label=f"recall@{K}")
    a.axhline(K / len(true_freq), color="gray", ls=":", label=f"random ({K}/{len(true_freq)})")
    a.set(xlabel="target layer", ylabel=f"recall@{K}", ylim=(0, 1.02), title=f"per-layer recall@{K}")
    _legend_below(a, ncol=2)
    a = ax[1, 0]
    E = len(true_freq)
    w = 0.4
    a.bar(np.arange(E) - w / 2, true_freq, w, label="true (router)")
    a.bar(np.arange(E) + w / 2, pred_freq, w, label=f"predicted top-{K}")
    a.set(xlabel="expert id", ylabel="share of assignments", title="expert frequency: predicted vs true")
    _legend_below(a, ncol=2)
    a = ax[1, 1]
    top = min(20, E)
    a.bar(np.arange(1, top + 1), rank_hist[:top])
    a.set_xticks(np.arange(1, top + 1, 2 if top > 10 else 1))
    a.set(xlabel="position of a true expert in the predicted order", ylabel="share of true experts",
          title=f"where true experts rank (first {top} positions: {rank_hist[:top].sum():.1%})")
    fig.suptitle(title)
    return fig


def comparison_figure(curves: dict[str, dict[int, list[float | None]]], metric: str, path: Path, title: str) -> None:
    """One panel per lookahead d: per-target-layer `metric` of every predictor and baseline.
    Each name keeps one colour in every panel; the legend lists every name."""
    plt = _figure_module()
    ds = sorted({d for c in curves.values() for d in c})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(curves)}
    # constrained layout: the figure title clears the panel titles, the legend gets its own row below
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4.6), squeeze=False, sharey=True, layout="constrained")
    for a, d in zip(axes[0], ds):
        for name, by_d in curves.items():
            if d in by_d:
                ys = [np.nan if v is None else v for v in by_d[d]]
                a.plot(range(len(ys)), ys, marker=".", color=colours[name], label=name)
        a.set(title=f"lookahead d = {d}", xlabel="target layer", ylim=(0, 1.02))
        a.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # layers are whole numbers
        a.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    handles = [plt.Line2D([], [], color=colours[n], marker=".", label=n) for n in curves]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def prefetch_figure(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Two panels over cache size (experts per layer): decode tokens/s and hit rate, one line per policy."""
    plt = _figure_module()
    names = list(dict.fromkeys(r["policy"] for r in rows))
    labels = {r["policy"]: r.get("label", r["policy"]) for r in rows}
    ceiling = {r["policy"] for r in rows if r.get("ceiling")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        pts = sorted((r["cache_experts"], r["tokens_per_s"], r["hit_rate"]) for r in rows if r["policy"] == name)
        c, tps, hit = (np.array(v) for v in zip(*pts))
        style = dict(color=plt.cm.tab10(i % 10), marker="o", label=labels[name], ls="--" if name in ceiling else "-")
        axes[0].plot(c, tps, **style)
        axes[1].plot(c, hit, **style)
    axes[0].set(xlabel="cache: experts per layer", ylabel="decode tokens/s (batch 1)", title="predicted decode speed")
    axes[1].set(xlabel="cache: experts per layer", ylabel="hit rate", title="expert cache hit rate", ylim=(0, 1.02))
    for a in axes:
        a.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def policy_map_figure(cells: list[dict[str, Any]], axes: dict[str, list[Any]], localities: dict[str, dict[str, float]],
                      path: Path, short_name: Callable[[str], str] = str) -> None:
    """The map as a heatmap: one panel per locality; rows compute x link, columns batch x GPU budget; colour the
    best realizable policy's speedup over on-demand LRU, text its short name (`short_name`: the simulator's
    abbreviation; simulated)."""
    plt = _figure_module()
    rows = [(c, k) for c in axes["compute"] for k in axes["link"]]
    cols = [(b, f) for b in axes["batch"] for f in axes["budget"]]
    by = {(c["locality"], c["compute"], c["link"], c["batch"], c["budget"]): c for c in cells}
    top = max(c["speedup_vs_lru"] for c in cells)
    n = len(axes["locality"])
    fig, panels = plt.subplots(n, 1, figsize=(1.15 * len(cols) + 2.5, (0.62 * len(rows) + 1.1) * n), squeeze=False,
                               layout="constrained")
    for a, p in zip(panels[:, 0], axes["locality"]):
        grid = np.array([[by[(p, c, k, b, f)]["speedup_vs_lru"] for b, f in cols] for c, k in rows])
        im = a.imshow(grid, cmap="viridis", vmin=1.0, vmax=max(top, 1.01), aspect="auto")
        for i, (c, k) in enumerate(rows):
            for j, (b, f) in enumerate(cols):
                cell = by[(p, c, k, b, f)]
                a.text(j, i, f"{short_name(cell['best'])}\n{cell['speedup_vs_lru']:.2f}x", ha="center", va="center",
                       fontsize=7, color="white" if cell["speedup_vs_lru"] < 1 + 0.6 * (top - 1) else "black")
        a.set_xticks(range(len(cols)), [f"batch {b}\n{f:.0%}" for b, f in cols], fontsize=7)
        a.set_yticks(range(len(rows)), [f"{c}\n{k}" for c, k in rows], fontsize=7)
        loc = localities[str(p)]
        a.set_title(f"locality p = {p}: previous-token recall@{loc['top_k']} {loc['previous_token_recall']:.2f}, "
                    f"median reuse distance {loc['median_reuse_distance']:.0f}, top-25% experts "
                    f"{loc['top25_share']:.0%} of activations", fontsize=8)
    fig.colorbar(im, ax=panels[:, 0].tolist(), label="best exact policy / on-demand LRU (simulated tokens/s)")
    fig.suptitle("Which policy wins where (simulated decode; columns: batch, GPU budget as a share of each layer's "
                 "experts)", fontsize=9)
    save_figure(fig, path)
    plt.close(fig)
