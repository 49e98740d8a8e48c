"""One page on a trace set's routing: is a static hot set, an LRU cache or a predictor worth building?

Only the routing is read (any trace set, collected or imported): its sequences in stored order are one decode
stream, as the prefetch simulator replays them (validation/prefetch/simulator.py). Descriptive statistics (popularity,
locality, working sets) cover the whole stream. What is fitted (popularity, the cross-layer tables, the static hot
set) is fitted on the first half of the stream (whole sequences: the cut falls on the sequence start nearest the
middle; a single sequence is cut at its middle token) and measured on the second half, as a server that has
served the first half would see the second. Every predictor is history-only: it knows the experts of earlier
tokens and, at lookahead d, this token's experts up to layer l = j - d of target layer j; none reads the
routing weights, so a set with weights and an import without them give the same numbers.

Sections (plain numbers; `render_markdown` and `draw_figure` only present them):
    skew       share of activations taken by the top 10/25/50% of experts, experts covering 50% and 90%
    locality   previous-token recall@K, reuse distance (tokens since the expert's last use at that layer),
               distinct experts per window of 16/64/256 tokens (the working set)
    predictors recall@K of previous token, popularity, cross-layer (layer l's experts -> layer j through
               co-occurrence counts) and cross-layer + previous token (weighted by the fitted reuse rate), at
               d = 0..3; router reuse where the set has the routers
    caches     hit rate vs experts cached per layer: static hot set, LRU, LRU + previous-token prefetch, Belady,
               oracle prefetch (the simulator's kernel, `run_policy`)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit
from tqdm import tqdm

from collection.traces.format import TraceSet
from common.errors import UserError
from validation.coverage.metrics import found_at_k, previous_token_recall, recall_at_k
from validation.prefetch.cost_model import CostModel, expert_bytes, expert_params
from validation.prefetch.simulator import POLICIES, Stream, build_stream, parse_policy, run_policy, summarize

TOP_SHARES = (10, 25, 50)            # % of experts whose share of activations is reported
COVER = (50, 90)                     # % of activations: how many experts cover it
WINDOWS = (16, 64, 256)              # tokens per working-set window
REUSE_BINS = (1, 2, 4, 8, 16, 64, 256)  # reuse distance histogram edges (tokens): 1, 2, 3-4, ..., >256, never
LOOKAHEADS = (0, 1, 2, 3)
WORTH = 0.02                         # a policy is worth building if it beats the simpler one by 2 points of hit rate
CACHE_POLICIES = {"static hot set": "static-popular", "LRU": "on-demand",
                  "LRU + previous-token prefetch": "prefetch:previous-token", "Belady": "belady",
                  "oracle prefetch": "oracle"}


@dataclass
class Routing:
    ids: np.ndarray    # (T, L, K) int64 experts of each token at each MoE layer, in stream order
    first: np.ndarray  # (T,) bool: the token starts a sequence (it has no previous token)
    num_experts: int
    cut: int           # tokens [0, cut) fit, [cut, T) are measured

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ids.shape


def split_point(first: np.ndarray) -> int:
    """The sequence start nearest the middle of the stream (a single sequence: its middle token)."""
    T = len(first)
    starts = np.flatnonzero(first[1:]) + 1
    return int(starts[np.argmin(np.abs(starts - T / 2))]) if len(starts) else T // 2


def load_routing(ts: TraceSet, progress: bool = True) -> Routing:
    """Every sequence's routing, in stored order (the simulator's decode stream)."""
    stream = build_stream(ts, ts.sequence_table()["seq_id"], {}, lookahead=1, budget=1, progress=progress)
    if stream.tokens < 2:
        raise UserError(f"{ts.dir}: {stream.tokens} token: too few to split into a fitted and a measured half")
    return Routing(stream.ids, stream.first, ts.manifest.num_experts, split_point(stream.first))


def make_routing(ids: np.ndarray, seq_lengths: list[int], num_experts: int) -> Routing:
    """A Routing from (T, L, K) ids and sequence lengths (tests, hand-made cases)."""
    first = np.zeros(len(ids), dtype=bool)
    first[np.cumsum([0, *seq_lengths[:-1]])] = True
    return Routing(np.asarray(ids, dtype=np.int64), first, num_experts, split_point(first))


# ----------------------------------------------------------------------------------------------
# descriptive: popularity, locality, working sets (whole stream)


def expert_counts(ids: np.ndarray, E: int) -> np.ndarray:
    """(L, E) activations of each expert at each layer."""
    L = ids.shape[1]
    return np.bincount((np.arange(L)[None, :, None] * E + ids).ravel(), minlength=L * E).reshape(L, E)


def popularity_skew(counts: np.ndarray) -> dict[str, Any]:
    """Per layer: share of activations taken by the top p% of experts, experts covering c% of them, the hottest
    expert's share over the uniform 1/E; `slots_active`: the share of (layer, expert) slots used at all."""
    L, E = counts.shape
    share = np.sort(counts, axis=1)[:, ::-1] / np.maximum(counts.sum(1, keepdims=True), 1)
    cum = np.cumsum(share, axis=1)
    out: dict[str, Any] = {f"top{p}": cum[:, int(np.ceil(p / 100 * E)) - 1] for p in TOP_SHARES}
    for c in COVER:  # smallest n with cumulative share >= c% (a float tolerance keeps exact halves exact)
        out[f"cover{c}"] = (cum < c / 100 - 1e-9).sum(1) + 1
    out["hottest_x_uniform"] = share[:, 0] * E
    out["slots_active"] = float((counts > 0).mean())
    return out


@njit(cache=True)
def _reuse_bins(ids: np.ndarray, E: int, edges: np.ndarray) -> np.ndarray:
    """(L, len(edges) + 2) activations by tokens since the expert's last use at that layer (bin i: edges[i-1] < d
    <= edges[i]; then > edges[-1]; then never used before)."""
    T, L, K = ids.shape
    last = np.full((L, E), -1, dtype=np.int64)
    hist = np.zeros((L, len(edges) + 2), dtype=np.int64)
    for t in range(T):
        for l in range(L):
            for k in range(K):
                e = ids[t, l, k]
                b = len(edges) + 1 if last[l, e] < 0 else np.searchsorted(edges, t - last[l, e])
                hist[l, b] += 1
                last[l, e] = t
    return hist


def reuse_histogram(ids: np.ndarray, E: int) -> np.ndarray:
    """(L, len(REUSE_BINS) + 2) share of each layer's activations by tokens since that expert's last use at that
    layer: 1, 2, 3-4, 5-8, 9-16, 17-64, 65-256, more, never used before."""
    T, L, K = ids.shape
    return _reuse_bins(ids, E, np.array(REUSE_BINS, dtype=np.int64)) / max(T * K, 1)


@njit(cache=True)
def _window_experts(ids: np.ndarray, E: int, w: int) -> np.ndarray:
    """(n, L) distinct experts per layer in each whole window of w consecutive tokens."""
    T, L, K = ids.shape
    n = T // w
    seen = np.full((L, E), -1, dtype=np.int64)
    out = np.zeros((n, L), dtype=np.int64)
    for t in range(n * w):
        win = t // w
        for l in range(L):
            for k in range(K):
                e = ids[t, l, k]
                if seen[l, e] != win:
                    seen[l, e] = win
                    out[win, l] += 1
    return out


def working_sets(ids: np.ndarray, E: int) -> np.ndarray:
    """(len(WINDOWS), L) mean distinct experts per layer over consecutive windows of w tokens (whole windows only;
    nan when the stream is shorter than a window)."""
    out = np.full((len(WINDOWS), ids.shape[1]), np.nan)
    for i, w in enumerate(WINDOWS):
        if len(ids) >= w:
            out[i] = _window_experts(ids, E, w).mean(0)
    return out


@njit(cache=True)
def _cooccurrence_counts(ids: np.ndarray, d: int, E: int) -> np.ndarray:
    T, L, K = ids.shape
    m = np.zeros((L - d, E, E), dtype=np.float32)
    for t in range(T):
        for l in range(L - d):
            for i in range(K):
                for j in range(K):
                    m[l, ids[t, l, i], ids[t, l + d, j]] += 1
    return m


def cooccurrence(ids: np.ndarray, d: int, E: int) -> np.ndarray:
    """(L - d, E, E) float32 P(expert b at layer l + d | expert a at layer l), counted over the tokens of `ids`
    (a row of an expert never seen at layer l is zeros)."""
    m = _cooccurrence_counts(ids, d, E)
    return m / np.maximum(m.sum(2, keepdims=True) / ids.shape[2], 1)


PREDICTORS = ("previous token", "popularity", "cross-layer", "previous token + cross-layer")


def popularity_ranks(pop: np.ndarray) -> np.ndarray:
    """(L, E) each expert's rank in its layer's popularity order, ties counted against it (metrics.true_expert_ranks
    on the popularity scores)."""
    p = torch.from_numpy(pop.astype(np.float32))
    return (p[:, None, :] >= p[:, :, None]).sum(2).numpy() - 1


@njit(cache=True)
def _history_ranks(ids: np.ndarray, first: np.ndarray, cut: int, pop_rank: np.ndarray) -> np.ndarray:
    """(2, R, K) ranks of the true experts of every row (token t >= cut, layer j), rows token-major: under
    "previous token" (token t-1's experts at j, then the rest by popularity) and "popularity". Scores 1 + 1e-3 pop
    for the previous token's experts and 1e-3 pop for the others rank exactly so; ties count against (as
    metrics.true_expert_ranks)."""
    T, L, K = ids.shape
    out = np.empty((2, (T - cut) * L, K), dtype=np.int32)
    r = 0
    for t in range(cut, T):
        hp = not first[t]
        for j in range(L):
            for k in range(K):
                e = ids[t, j, k]
                out[1, r, k] = pop_rank[j, e]
                if not hp:
                    out[0, r, k] = pop_rank[j, e]
                    continue
                inprev, above = False, 0   # previous experts with popularity >= e's
                for i in range(K):
                    p = ids[t - 1, j, i]
                    inprev = inprev or p == e
                    if pop_rank[j, p] <= pop_rank[j, e]:
                        above += 1
                # in the previous set: the previous experts at least as popular; else all K of them, then the others
                out[0, r, k] = above - 1 if inprev else K + pop_rank[j, e] - above
            r += 1
    return out


@njit(cache=True)
def _cross_ranks(ids: np.ndarray, first: np.ndarray, cut: int, d: int, pop: np.ndarray, P: np.ndarray,
                 reuse: np.ndarray) -> np.ndarray:
    """(2, R, K) ranks of the true experts of rows (token t >= cut, layer j >= d), token-major, under "cross-layer"
    (scores: sum over token t's experts a at l = j - d of P[l, a, :] / K, + 1e-3 pop: each expert's estimated chance
    of being chosen) and "previous token + cross-layer" (those + reuse[j], the fitted chance that an expert of token
    t-1 at layer j is chosen again, for token t-1's experts). Ties count against (as metrics.true_expert_ranks)."""
    T, L, K = ids.shape
    E = pop.shape[1]
    out = np.empty((2, (T - cut) * (L - d), K), dtype=np.int32)
    s = np.empty(E, dtype=np.float32)
    r = 0
    for t in range(cut, T):
        hp = not first[t]
        for j in range(d, L):
            for e in range(E):
                s[e] = np.float32(1e-3) * pop[j, e]
            for i in range(K):
                a = ids[t, j - d, i]
                for e in range(E):
                    s[e] += P[j - d, a, e] / np.float32(K)
            for v in range(2):
                if v == 1 and hp:  # the combination: + the previous token's reuse rate for its experts
                    for i in range(K):
                        s[ids[t - 1, j, i]] += reuse[j]
                for k in range(K):
                    x = s[ids[t, j, k]]
                    c = 0
                    for e in range(E):
                        if s[e] >= x:
                            c += 1
                    out[v, r, k] = c - 1
            r += 1
    return out


def predictor_recalls(r: Routing, pop: np.ndarray, conditional: dict[int, np.ndarray]) -> dict[str, Any]:
    """recall@K and recall@2K of each history predictor at each lookahead d (rows: token t of the measured half,
    target layer j >= d; metrics.recall_at_k of the ranks), and recall@K per target layer at d = 1."""
    T, L, K = r.shape
    hist = _history_ranks(r.ids, r.first, r.cut, popularity_ranks(pop))           # (2, (T-cut)*L, K)
    reuse = np.nan_to_num(np.array(previous_token_recall(r.ids[:r.cut], r.first[:r.cut])[1]),
                          nan=0.0).astype(np.float32)                              # fitted, per layer
    layer = np.tile(np.arange(L), T - r.cut)
    out: dict[str, Any] = {name: {f"recall@{m}": [] for m in (K, 2 * K)} for name in PREDICTORS}
    per_layer: dict[str, list[float]] = {}
    for d in LOOKAHEADS:
        ranks = {PREDICTORS[0]: hist[0][layer >= d], PREDICTORS[1]: hist[1][layer >= d]}
        if d in conditional:
            cross = _cross_ranks(r.ids, r.first, r.cut, d, pop.astype(np.float32), conditional[d], reuse)
            ranks[PREDICTORS[2]], ranks[PREDICTORS[3]] = cross[0], cross[1]
        for name in PREDICTORS:
            for m in (K, 2 * K):
                x = ranks.get(name)
                out[name][f"recall@{m}"].append(recall_at_k(torch.from_numpy(x), m) if x is not None and len(x)
                                                else float("nan"))
        if d == 1 and d in conditional:  # per target layer: found@K (metrics.found_at_k) summed by layer
            j = np.tile(np.arange(1, L), T - r.cut)
            rows = np.bincount(j, minlength=L) * K
            with np.errstate(invalid="ignore", divide="ignore"):
                per_layer = {name: (np.bincount(j, found_at_k(torch.from_numpy(ranks[name]), K).numpy(), minlength=L)
                                    / rows).tolist() for name in PREDICTORS}
    out["per layer at d=1"] = per_layer
    return out


def router_reuse_recall(ts: TraceSet, r: Routing) -> float | None:
    """recall@K of router reuse (layer l+1's router on h_l) on the measured half's sequences, where the set stores
    hidden states and router matrices; None otherwise (every imported set)."""
    from validation.coverage.evaluate import evaluate
    from validation.coverage.scorers import baseline_scorer, check_traces

    try:
        check_traces("router-reuse", ts, 1)
    except UserError:
        return None
    table = ts.sequence_table()
    lengths = table["length"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    at_start = r.cut in starts                         # else a single sequence, cut in the middle: all of it
    test = table["seq_id"][starts >= r.cut] if at_start else table["seq_id"]
    train = table["seq_id"][starts < r.cut] if at_start else table["seq_id"]  # router reuse fits nothing
    scorer = baseline_scorer("router-reuse", ts, 1, train, torch.device("cpu"))
    acc = evaluate(scorer, ts, test, 1, torch.device("cpu"), progress=False)
    return acc.summary().get(f"recall@{ts.manifest.top_k}")


# ----------------------------------------------------------------------------------------------
# caches: the simulator's kernel over the measured half


def default_cache_sizes(E: int, K: int) -> list[int]:
    return sorted({c for c in (K, 2 * K, E // 4, E // 2) if 1 <= c <= E})


def cache_hit_rates(r: Routing, counts_fit: np.ndarray, pop: np.ndarray, sizes: list[int]) -> dict[str, list[float]]:
    """Hit rate of each policy of CACHE_POLICIES at each cache size (experts per layer), over the measured half,
    from an empty cache (the static hot set: the fitted half's most used experts, pinned)."""
    T, L, K = r.shape
    E = r.num_experts
    ids, first = r.ids[r.cut:], r.first[r.cut:]
    pred = r.ids[r.cut - 1:T - 1].copy()                        # token t-1's experts at each layer (cut >= 1)
    pred[first] = np.argsort(-pop, axis=1, kind="stable")[:, :K][None]  # a request's first token: the popular ones
    stream = Stream(ids=ids, weights=np.zeros((1, 1, 1), np.float32), first=first,
                    position=np.zeros(len(ids), dtype=np.int64), predictions={"prefetch:previous-token": pred})
    cost = CostModel(expert_bytes=1, link_bytes_per_s=1e9)        # hit rates do not depend on time
    order = np.argsort(-counts_fit, axis=1, kind="stable")
    out: dict[str, list[float]] = {name: [] for name in CACHE_POLICIES}
    for c in sizes:
        resident = np.zeros((L, E), dtype=bool)
        np.put_along_axis(resident, order[:, :c], True, axis=1)
        for name, policy in CACHE_POLICIES.items():
            pol = POLICIES.get(policy) or parse_policy(policy)
            stats, _ = run_policy(pol, c, stream, cost, 1, K, E, resident=resident if policy == "static-popular" else None)
            out[name].append(summarize(stats, L, K, 1)["hit_rate"])
    return out


# ----------------------------------------------------------------------------------------------
# the report


def analyze(r: Routing, cache_sizes: list[int], ts: TraceSet | None = None, progress: bool = False,
            layer_indices: list[int] | None = None) -> dict[str, Any]:
    """Every number of the page, as plain Python values (JSON-ready; nan where a number does not exist)."""
    T, L, K = r.shape
    E = r.num_experts
    bar = tqdm(total=5, desc="analyze", unit="step", disable=not progress, dynamic_ncols=True)
    counts = expert_counts(r.ids, E)
    skew = popularity_skew(counts)
    prev_recall, prev_per_layer = previous_token_recall(r.ids, r.first)
    reuse = reuse_histogram(r.ids, E)
    ws = working_sets(r.ids, E)
    bar.update()
    counts_fit = expert_counts(r.ids[:r.cut], E)
    pop = counts_fit / np.maximum(counts_fit.sum(1, keepdims=True), 1)
    conditional = {d: cooccurrence(r.ids[:r.cut], d, E) for d in LOOKAHEADS if 0 < d < L}
    bar.update()
    preds = predictor_recalls(r, pop, conditional)
    bar.update()
    caches = cache_hit_rates(r, counts_fit, pop, cache_sizes)
    bar.update()
    reuse_recall = router_reuse_recall(ts, r) if ts is not None else None
    bar.update()
    bar.close()
    return {
        "tokens": T, "layers": L, "top_k": K, "num_experts": E, "rows": T * L, "sequences": int(r.first.sum()),
        "layer_indices": list(layer_indices) if layer_indices is not None else list(range(L)),
        "fit_tokens": r.cut, "measured_tokens": T - r.cut,
        "skew": {"per_layer": {k: np.asarray(v).tolist() for k, v in skew.items() if k != "slots_active"},
                 "overall": {k: float(np.mean(v)) for k, v in skew.items()}},
        "locality": {"previous_token_recall": prev_recall, "previous_token_recall_per_layer": prev_per_layer,
                     "reuse_bins": ["1", "2", "3-4", "5-8", "9-16", "17-64", "65-256", ">256", "never before"],
                     "reuse_share": reuse.mean(0).tolist(), "reuse_share_per_layer": reuse.tolist(),
                     "working_set": {str(w): float(ws[i].mean()) for i, w in enumerate(WINDOWS)},
                     "working_set_per_layer": {str(w): ws[i].tolist() for i, w in enumerate(WINDOWS)}},
        "predictors": {"lookaheads": list(LOOKAHEADS), **preds, "router reuse d=1": reuse_recall},
        "caches": {"sizes": list(cache_sizes), **caches},
    }


def budget_cost(preset: str | None, L: int, c: int) -> tuple[float, float] | None:
    """GiB that c cached experts per layer take over L MoE layers, fp16 and NF4 (validation/prefetch/cost_model.py)."""
    if preset is None:
        return None
    p = expert_params(preset)
    return tuple(c * L * expert_bytes(p, fmt) / 2**30 for fmt in ("fp16", "nf4"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def verdict(res: dict[str, Any], preset: str | None) -> list[str]:
    """Plain sentences: whether a static hot set, an LRU cache or a predictor is worth building at each budget,
    by how much (points of hit rate over the simpler option; WORTH is the bar), why, and what the budget costs."""
    E, K, L = res["num_experts"], res["top_k"], res["layers"]
    sk, loc, c = res["skew"]["overall"], res["locality"], res["caches"]
    out = []
    if sk["top10"] >= 0.3:
        out.append(f"Routing is skewed: the top 10% of experts take {_pct(sk['top10'])} of activations (uniform: 10%) "
                   f"and {sk['cover90']:.0f} of {E} experts cover 90%, so there is a hot set to pin.")
    else:
        out.append(f"There is no hot set: the top 10% of experts take only {_pct(sk['top10'])} of activations "
                   f"(uniform: 10%), {sk['cover90']:.0f} of {E} experts are needed to cover 90%, and "
                   f"{_pct(sk['slots_active'])} of the (layer, expert) slots were used at all.")
    ws = loc["working_set"]
    out.append(f"Locality: {_pct(loc['previous_token_recall'])} of a token's experts at a layer were the previous "
               f"token's there (random: {_pct(K / E)}); 16 consecutive tokens use {ws['16']:.1f} of {E} experts per "
               f"layer, 256 tokens {ws['256']:.1f}." if np.isfinite(ws["256"]) else
               f"Locality: {_pct(loc['previous_token_recall'])} of a token's experts at a layer were the previous "
               f"token's there (random: {_pct(K / E)}).")
    pr = res["predictors"]
    if len(pr["lookaheads"]) > 1 and pr["lookaheads"][1] == 1:
        best = max(PREDICTORS, key=lambda n: np.nan_to_num(pr[n][f"recall@{K}"][1], nan=-1))
        rr = pr.get("router reuse d=1")
        out.append(f"Prediction one layer ahead: the best history-only predictor ({best}) finds "
                   f"{_pct(pr[best][f'recall@{K}'][1])} of the next layer's experts in its top {K} (random "
                   f"{_pct(K / E)})" + (f"; router reuse finds {_pct(rr)}." if rr is not None else "."))
    reach = [size for size, h in zip(c["sizes"], c["LRU"]) if h >= 0.9]
    for i, size in enumerate(c["sizes"]):
        h = {name: c[name][i] for name in CACHE_POLICIES}
        s = f"With {size} experts cached per layer ({_pct(size / E)} of them{_gib(preset, L, size, ', ')}): "
        base = max(h["static hot set"], h["LRU"])
        if base < size / E + WORTH:
            s += (f"neither a static hot set ({_pct(h['static hot set'])} hits) nor LRU ({_pct(h['LRU'])}) beats "
                  f"what any {size} experts would catch ({_pct(size / E)}): caching alone buys nothing here; ")
        elif h["static hot set"] >= h["LRU"] - WORTH:
            s += (f"a static hot set ({_pct(h['static hot set'])} hits) does as well as LRU ({_pct(h['LRU'])}), "
                  "so pin the popular experts and skip the cache logic; ")
        else:
            s += (f"LRU ({_pct(h['LRU'])} hits) beats a static hot set ({_pct(h['static hot set'])}) by "
                  f"{100 * (h['LRU'] - h['static hot set']):.1f} points: locality, not popularity, pays, so build "
                  "the cache; ")
        head = h["oracle prefetch"] - base
        gain = h["LRU + previous-token prefetch"] - h["LRU"]
        if head < WORTH:
            adds = (f"would add {100 * head:.1f} points" if head >= 0 else
                    f"would add nothing ({100 * -head:.1f} points below the better of the two)")
            s += (f"no predictor is worth building, since even a perfect one (oracle prefetch, "
                  f"{_pct(h['oracle prefetch'])}) {adds}.")
        else:
            s += (f"a predictor can add up to {100 * head:.1f} points (oracle prefetch {_pct(h['oracle prefetch'])}); "
                  f"prefetching the previous token's experts adds {100 * gain:+.1f} points over LRU, so a learned "
                  f"predictor pays only if it closes much of the remaining "
                  f"{100 * (h['oracle prefetch'] - max(base, h['LRU + previous-token prefetch'])):.1f}.")
        if h["Belady"] - h["LRU"] >= WORTH:
            s += (f" Eviction knowing the future (Belady) would add {100 * (h['Belady'] - h['LRU']):.1f} points over "
                  "LRU: the most a better eviction rule can win.")
        out.append(s)
    if reach:
        out.append(f"LRU reaches 90% hits from {reach[0]} experts per layer{_gib(preset, L, reach[0], ': ')}.")
    else:
        out.append(f"LRU stays below 90% hits at every budget measured (up to {max(c['sizes'])} of {E} experts).")
    if preset is None:
        out.append("Give --model-config to price each budget in GiB.")
    return out


def _gib(preset: str | None, L: int, c: int, lead: str) -> str:
    """`lead` + what c experts per layer over L layers take, fp16 and NF4 ("" without a preset)."""
    gib = budget_cost(preset, L, c)
    return f"{lead}{gib[0]:.3g} GiB in fp16 or {gib[1]:.3g} GiB in NF4 over {L} layers" if gib else ""


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_markdown(res: dict[str, Any], title: str, source: str, preset: str | None, figure: str) -> str:
    """The one page: verdict, then the tables behind it."""
    E, K, L = res["num_experts"], res["top_k"], res["layers"]
    sk, loc, pr, c = res["skew"], res["locality"], res["predictors"], res["caches"]
    lines = [f"# Routing report: {title}", "",
             f"{source}. {res['tokens']:,} tokens in {res['sequences']:,} sequences, {L} MoE layers, top-{K} of {E} "
             f"experts ({res['rows']:,} (token, layer) rows). Fitted on the first {res['fit_tokens']:,} tokens, "
             f"measured on the last {res['measured_tokens']:,}.", "", "## Verdict", ""]
    lines += [f"- {s}" for s in verdict(res, preset)]
    o = sk["overall"]
    lines += ["", "## Popularity skew (whole stream, mean over layers)", "",
              _row(["top 10% of experts", "top 25%", "top 50%", "experts for 50%", "experts for 90%",
                    "hottest / uniform", "(layer, expert) slots used"]), _row(["---"] * 7),
              _row([_pct(o["top10"]), _pct(o["top25"]), _pct(o["top50"]), f"{o['cover50']:.1f} of {E}",
                    f"{o['cover90']:.1f} of {E}", f"{o['hottest_x_uniform']:.2f}x", _pct(o["slots_active"])])]
    ws = loc["working_set"]
    lines += ["", "## Temporal locality (whole stream)", "",
              f"Previous-token recall@{K}: {_pct(loc['previous_token_recall'])} (random {_pct(K / E)}). "
              f"Distinct experts per layer in a window of 16 / 64 / 256 tokens: "
              + " / ".join("n/a" if not np.isfinite(ws[str(w)]) else f"{ws[str(w)]:.1f}" for w in WINDOWS)
              + f" of {E}.", "", "Tokens since the expert's last use at that layer (share of activations):", "",
              _row(loc["reuse_bins"]), _row(["---"] * len(loc["reuse_bins"])),
              _row([_pct(x) for x in loc["reuse_share"]])]
    lines += ["", f"## History-only predictors (measured half; recall@{K}, recall@{2 * K} in brackets)", "",
              _row(["predictor"] + [f"d = {d}" for d in pr["lookaheads"]]), _row(["---"] * (1 + len(pr["lookaheads"])))]
    for name in PREDICTORS:
        lines.append(_row([name] + [f"{_pct(a)} ({_pct(b)})" if np.isfinite(a) else "n/a"
                                    for a, b in zip(pr[name][f"recall@{K}"], pr[name][f"recall@{2 * K}"])]))
    rr = pr.get("router reuse d=1")
    lines += ["", f"Router reuse (layer l+1's router on h_l, d = 1): "
              + (f"recall@{K} {_pct(rr)}." if rr is not None else "n/a: the set has no hidden states or router "
                 "matrices (every imported set).")]
    lines += ["", "## Cache hit rate vs experts cached per layer (measured half, the simulator's kernel)", "",
              _row(["policy"] + [str(s) for s in c["sizes"]]), _row(["---"] * (1 + len(c["sizes"])))]
    lines += [_row([name] + [_pct(h) for h in c[name]]) for name in CACHE_POLICIES]
    if preset:
        lines.append(_row([f"GiB fp16 / NF4 ({preset})"]
                          + [f"{g[0]:.3g} / {g[1]:.3g}" for g in (budget_cost(preset, L, s) for s in c["sizes"])]))
    pl, per = sk["per_layer"], pr.get("per layer at d=1", {})
    lines += ["", "## Per layer", "",
              _row(["layer", "top 10% share", "experts for 90%", f"prev-token recall@{K}", "reused within 4 tokens",
                    "experts / 16 tok", "experts / 256 tok", f"cross-layer d=1 recall@{K}"]), _row(["---"] * 8)]
    for l, idx in enumerate(res.get("layer_indices", range(L))):
        reuse4 = sum(loc["reuse_share_per_layer"][l][:3])
        cross = per.get("cross-layer", [float("nan")] * L)[l]
        lines.append(_row([idx, _pct(pl["top10"][l]), pl["cover90"][l], _pct(loc["previous_token_recall_per_layer"][l]),
                           _pct(reuse4), f"{loc['working_set_per_layer']['16'][l]:.1f}",
                           f"{loc['working_set_per_layer']['256'][l]:.1f}", _pct(cross)]))
    lines += ["", f"![routing report]({figure})", ""]
    return "\n".join(lines)


def draw_figure(res: dict[str, Any], title: str) -> Any:
    """Four panels: expert share by rank, reuse distance, hit rate vs cache size, predictor recall vs lookahead."""
    from validation.plots import _figure_module

    plt = _figure_module()
    E, K = res["num_experts"], res["top_k"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    a = ax[0, 0]
    pl = res["skew"]["per_layer"]
    for p in TOP_SHARES:
        a.plot(range(len(pl[f"top{p}"])), pl[f"top{p}"], "o-", ms=3, label=f"top {p}% of experts")
        a.axhline(p / 100, color="gray", lw=0.7, ls=":")
    a.set(xlabel="MoE layer", ylabel="share of activations", ylim=(0, 1.02),
          title="popularity skew per layer (dotted: uniform)")
    a.legend(fontsize=8)
    a = ax[0, 1]
    loc = res["locality"]
    a.bar(loc["reuse_bins"], loc["reuse_share"], color="tab:blue")
    a.set(xlabel="tokens since the expert's last use at that layer", ylabel="share of activations",
          title="reuse distance")
    a.tick_params(axis="x", labelrotation=30)
    a = ax[1, 0]
    c = res["caches"]
    for name in CACHE_POLICIES:
        a.plot(c["sizes"], c[name], "o-", label=name)
    a.set(xlabel="experts cached per layer", ylabel="hit rate", ylim=(0, 1.02), title="cache hit rate (measured half)")
    a.legend(fontsize=8)
    a = ax[1, 1]
    pr = res["predictors"]
    for name in PREDICTORS:
        a.plot(pr["lookaheads"], pr[name][f"recall@{K}"], "o-", label=name)
    a.axhline(K / E, color="gray", lw=0.8, ls=":", label="random")
    a.set_xticks(pr["lookaheads"])
    a.set(xlabel="lookahead d (layers)", ylabel=f"recall@{K}", ylim=(0, 1.02), title="history-only predictors")
    a.legend(fontsize=8)
    fig.suptitle(title)
    return fig
