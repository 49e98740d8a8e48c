"""Expert-prediction metrics, vectorized over rows.

Each metric is defined once, by the per-row function below that bears its name (its docstring gives the
formula and the random baseline). Every report computes them through `CoverageAccumulator`, which gets
the same sums from rank histograms so that any number of ks and layer/source breakdowns cost one pass;
tests/test_metrics.py holds the accumulator equal to the per-row definitions.

A *row* is one (token, target layer). A predictor scores all E experts; T is the set of the K
experts the router really chose (K = top_k, 4 for Qwen1.5-MoE). Everything derives from the rank
of each true expert in the predicted order (rank 0 = best score; ties ranked against the
predictor), so a whole batch is one comparison pass, and every k comes from the same ranks.

Names follow the prefetching literature (docs/metrics.md maps them to the seed's names):
    recall@k      |top_k_pred & T| / K        the seed's "individual accuracy"; slot recall at k = K
    coverage@k    1[T inside top_k_pred]      the seed's "coverage probability"
    any_hit@k     1[top_k_pred & T nonempty]  the seed's "Top-k accuracy" (inflated: never a headline)
    avg_found@k   |top_k_pred & T|            the seed's "average coverage"
    exact_match   coverage@K                  predicted top-K set equals the true set

Window metrics (a predictor trained with a lookahead in tokens, W): a row (token t, layer l) has as its target
the set S of experts layer l uses in tokens t+1 .. t+W, of any size m = |S| (1..E), and the scores should order
"used soon" above "not used soon" (an eviction keeps the best-scored experts). Ties again count against the
predictor (AUC: half, its standard definition, so constant scores read the random 0.5):
    window_recall@k  |top_k_pred & S| / m      share of the soon-used experts a cache of the top k would hold
    window_ap        average precision         mean over e in S of the precision of the experts scored >= e
    window_auc       ROC AUC                   P(a used expert outscores an unused one)
"""
from __future__ import annotations

from math import comb

import numpy as np
import torch

SEED_KS = (1, 3, 5, 8, 10, 12, 15, 20, 25, 30)


def true_expert_ranks(scores: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """Rank of each true expert in the predicted order: how many other experts score at least as high.

    scores: (R, E) any real scores, higher = more likely; true_ids: (R, K) int. Returns (R, K) int64.
    Ties count against the prediction (an expert tied with others is ranked after all of them), so a
    predictor can never gain from ties: constant scores get recall 0, not luck. A NaN score ranks last
    (compared with NaN every expert would count as beaten, giving rank -1). Counting costs R*K*E
    comparisons, cheaper than sorting every row.
    """
    scores = scores.float()
    scores = torch.where(scores.isnan(), -torch.inf, scores)
    s_true = scores.gather(1, true_ids.long()).unsqueeze(2)                # (R, K, 1)
    return (scores.unsqueeze(1) >= s_true).sum(2, dtype=torch.int16).long() - 1


def found_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(R,) number of true experts inside the top-k."""
    return (ranks < k).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """mean |top-k & T| / K. Random: k / E."""
    return (found_at_k(ranks, k).float() / ranks.shape[1]).mean().item()


def coverage_at_k(ranks: torch.Tensor, k: int) -> float:
    """mean 1[T inside top-k]. Random: C(E-K, k-K) / C(E, k)."""
    return (ranks.max(dim=1).values < k).float().mean().item()


def any_hit_at_k(ranks: torch.Tensor, k: int) -> float:
    """mean 1[top-k & T nonempty]. Random: 1 - C(E-K, k) / C(E, k) (any_hit@1 = K/E = 6.7% for 60/4)."""
    return (ranks.min(dim=1).values < k).float().mean().item()


def avg_found_at_k(ranks: torch.Tensor, k: int) -> float:
    """mean |top-k & T|. Random: k K / E."""
    return found_at_k(ranks, k).float().mean().item()


def exact_match(ranks: torch.Tensor) -> float:
    """mean 1[predicted top-K set == T] (= coverage@K). Random: 1 / C(E, K)."""
    return coverage_at_k(ranks, ranks.shape[1])


def random_expectation(metric: str, k: int, num_experts: int, top_k: int) -> float:
    """Expected value of a metric for uniformly random scores (the sanity floor of every table)."""
    E, K = num_experts, top_k
    k = min(k, E)
    if metric == "recall":
        return k / E
    if metric == "avg_found":
        return k * K / E
    if metric == "coverage":
        return comb(E - K, k - K) / comb(E, k) if k >= K else 0.0
    if metric == "any_hit":
        return 1.0 - comb(E - K, k) / comb(E, k)
    raise ValueError(metric)


def previous_token_recall(ids: torch.Tensor | np.ndarray, first: torch.Tensor | np.ndarray) -> tuple[float, list[float]]:
    """Temporal locality of routing: the share of token t's K experts at layer l that token t-1 of the same
    sequence also used at layer l, |T_t,l & T_t-1,l| / K, averaged over every token that has a previous
    token (overall, and per layer). It is recall@K of the "previous-token" predictor (scorers.py) at d = 0.
    Random routing: K / E (0.067 for 60/4); real Qwen MoEs read 0.35-0.43. The one definition: the routing
    report, the simulator's locality line and the proxy model's trainer all read it.

    ids: (N, L, K) int, the experts of N tokens in sequence order, sequences back to back; first: (N,) bool,
    True where a sequence starts (that token has no previous token). Experts within a row are distinct.
    NaN when no token has a previous token. Read in chunks: an import's millions of tokens fit.
    """
    ids, first = torch.as_tensor(ids), torch.as_tensor(first, dtype=torch.bool)
    N, L, K = ids.shape
    shared, pairs = torch.zeros(L, dtype=torch.float64), 0
    for s in range(1, N, 1 << 16):
        e = min(N, s + (1 << 16))
        got, n = _shared_with_previous(ids[s - 1:e], first[s - 1:e])
        shared, pairs = shared + got.cpu(), pairs + int(n)
    per_layer = shared / (pairs * K) if pairs else torch.full((L,), float("nan"), dtype=torch.float64)
    return float(per_layer.mean()), per_layer.tolist()  # every layer has the same tokens: overall = mean of layers


def previous_token_recall_per_layer(ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(L,) float64 previous_token_recall of each layer, left on ids' device (no host sync: training reads it
    every step). NaN when no token has a previous token."""
    shared, pairs = _shared_with_previous(ids, first)
    return shared / (pairs * ids.shape[2])


def _shared_with_previous(ids: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) float64 experts token t shares with token t-1, summed over rows 1.. whose token has a previous one,
    and the number of such rows (a 0-dim tensor, on ids' device)."""
    has_prev = ~first[1:].to(ids.device)                                           # (N-1,)
    same = (ids[1:, :, :, None] == ids[:-1, :, None, :]).sum((2, 3))              # (N-1, L) experts in common
    return same[has_prev].double().sum(0), has_prev.sum()


class MeanLoss:
    """The mean of a loss over the rows an accumulator saw (validation during training reports it), summed
    on `device` in float64."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_rows = 0

    def add_loss(self, loss_sum: torch.Tensor, rows: int) -> None:
        self.loss_sum += loss_sum.detach().to(self.device, torch.float64)
        self.loss_rows += rows

    def mean_loss(self) -> float:
        return (self.loss_sum / max(self.loss_rows, 1)).item()


class CoverageAccumulator(MeanLoss):
    """Streaming sums of every metric at every k, overall, per target layer and per source.

    Per (layer, source) cell it keeps three histograms over rank values 0..E-1: of every true
    expert's rank, of each row's worst rank and of its best rank. Then sum_rows |top-k & T| is the
    first histogram's mass below k, sum_rows 1[T in top-k] the second's and sum_rows 1[hit] the
    third's: three bincounts per batch, any number of ks for free, nothing kept per row.
    """

    def __init__(self, num_layers: int, num_sources: int, num_experts: int, top_k: int,
                 ks: tuple[int, ...] = SEED_KS, device: torch.device | str = "cpu"):
        # k = K (recall@K, exact match) and k = 2K (coverage@2K: a prefetch of twice the experts needed) are
        # always evaluated, whatever ks the caller asked for, so reports can name them for any model's top_k
        self.ks = tuple(sorted(k for k in set(ks) | {top_k, 2 * top_k} if k <= num_experts))
        self.L, self.S, self.E, self.K = num_layers, num_sources, num_experts, top_k
        super().__init__(device)
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=self.device)  # noqa: E731
        self.hist_all = z(num_layers, num_sources, num_experts)   # ranks of every true expert
        self.hist_max = z(num_layers, num_sources, num_experts)   # worst rank per row (coverage)
        self.hist_min = z(num_layers, num_sources, num_experts)   # best rank per row (any hit)
        self.pred_freq = z(num_experts)                           # how often each expert is predicted in top-K
        self.true_freq = z(num_experts)                           # how often each expert is truly chosen

    @torch.no_grad()
    def update(self, ranks: torch.Tensor, layer: torch.Tensor, source: torch.Tensor,
               true_ids: torch.Tensor, pred_topk: torch.Tensor) -> None:
        """ranks (R, K); layer, source (R,) int; true_ids (R, K); pred_topk (R, K) predicted experts."""
        E = self.E
        ranks = ranks.to(self.device).clamp(max=E - 1)
        cell = (layer.to(self.device).long() * self.S + source.to(self.device).long()) * E   # (R,)
        size = self.L * self.S * E
        self.hist_all.view(-1).add_(torch.bincount((cell.unsqueeze(1) + ranks).reshape(-1), minlength=size))
        self.hist_max.view(-1).add_(torch.bincount(cell + ranks.max(1).values, minlength=size))
        self.hist_min.view(-1).add_(torch.bincount(cell + ranks.min(1).values, minlength=size))
        self.pred_freq += torch.bincount(pred_topk.reshape(-1).to(self.device).long(), minlength=E)
        self.true_freq += torch.bincount(true_ids.reshape(-1).to(self.device).long(), minlength=E)

    def merge(self, other: "CoverageAccumulator") -> None:
        for name in ("hist_all", "hist_max", "hist_min", "pred_freq", "true_freq"):
            getattr(self, name).add_(getattr(other, name).to(self.device))

    def summary(self, layers: list[int] | None = None, sources: list[int] | None = None) -> dict[str, float]:
        """Flat metric dict over the selected layers/sources: recall@k, coverage@k, any_hit@k, avg_found@k."""
        sel_l = slice(None) if layers is None else torch.tensor(layers, device=self.device)
        sel_s = slice(None) if sources is None else torch.tensor(sources, device=self.device)
        pick = lambda h: h[sel_l][:, sel_s].sum((0, 1)).double().cumsum(0)  # noqa: E731  mass below k+1
        below_all, below_max, below_min = pick(self.hist_all), pick(self.hist_max), pick(self.hist_min)
        rows = below_max[-1].item()
        out: dict[str, float] = {"tokens": float(rows)}
        if rows == 0:
            return out
        for k in self.ks:
            found = below_all[k - 1].item()
            out[f"recall@{k}"] = found / (rows * self.K)
            out[f"coverage@{k}"] = below_max[k - 1].item() / rows
            out[f"any_hit@{k}"] = below_min[k - 1].item() / rows
            out[f"avg_found@{k}"] = found / rows
        out["exact_match"] = out[f"coverage@{self.K}"]
        return out

    def smallest_k_for_coverage(self, target: float) -> int | None:
        """Smallest k among the evaluated ks whose coverage@k reaches `target` (None if none does)."""
        s = self.summary()
        for k in self.ks:
            if s.get(f"coverage@{k}", 0.0) >= target:
                return k
        return None

    def per_layer(self, metric: str) -> list[float | None]:
        return [self.summary(layers=[l]).get(metric) for l in range(self.L)]

    def per_source(self, metric: str) -> list[float | None]:
        return [self.summary(sources=[s]).get(metric) for s in range(self.S)]

    def frequencies(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted-in-top-K share, true share, and true-expert rank histogram (all normalised)."""
        def norm(t: torch.Tensor) -> np.ndarray:
            a = t.double().cpu().numpy()
            return a / max(a.sum(), 1.0)
        return norm(self.pred_freq), norm(self.true_freq), norm(self.hist_all.sum((0, 1)))


def headline_columns(top_k: int) -> tuple[str, ...]:
    """The table's metrics for a model routing to top_k experts: recall and exact match at K, coverage of a
    2K-expert prefetch, and the seed's any_hit@1 / any_hit@5 for comparison with its report."""
    return (f"recall@{top_k}", f"coverage@{2 * top_k}", "exact_match", "any_hit@1", "any_hit@5")


# --------------------------------------------------------------------------------------------------
# Window metrics: the target is a set S (R, E bool) of any size, not K experts; per-row values, NaN where undefined


def window_counts(scores: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every row and expert e, float64 (R, E) each: (experts scoring >= s_e, experts of S scoring >= s_e,
    the average 1-based rank of s_e in ascending order, ties sharing their mean rank).

    scores: (R, E) real, higher = more likely used; used: (R, E) bool, the set S. A NaN score ranks last, as in
    `true_expert_ranks`. One sort of the scores and one of S's scores (the others moved below every score), then
    binary searches: R E log E, not the R E^2 of comparing every pair."""
    s = scores.double().nan_to_num(nan=-1e300, posinf=1e300, neginf=-1e300)
    E = s.shape[1]
    m = used.sum(1, keepdim=True)
    ordered = s.sort(1).values
    below = torch.searchsorted(ordered, s)                         # experts scoring < s_e
    at_most = torch.searchsorted(ordered, s, right=True)           # experts scoring <= s_e
    used_sorted = torch.where(used, s, -torch.inf).sort(1).values  # S's scores; the E - m others at -inf, below all
    used_below = torch.searchsorted(used_sorted, s) - (E - m)      # experts of S scoring < s_e
    return (E - below).double(), (m - used_below).double(), (below + at_most + 1).double() / 2


def window_recall_at_k(scores: torch.Tensor, used: torch.Tensor, k: int) -> torch.Tensor:
    """(R,) |top-k & S| / |S|: an expert of S is in the top k if at most k experts score at least as high as it.
    NaN where S is empty. Random: k / E."""
    at_least, _, _ = window_counts(scores, used)
    found = ((at_least <= k) & used).sum(1).double()
    return found / used.sum(1).double()


def average_precision(scores: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(R,) (1 / |S|) sum over e in S of |{f in S: s_f >= s_e}| / |{f: s_f >= s_e}|: the precision of the
    experts kept when the cut falls at each used expert, averaged. 1 when S is ranked first; NaN where S is
    empty. Random: `random_average_precision(|S|, E)` (about |S| / E)."""
    at_least, used_at_least, _ = window_counts(scores, used)
    return torch.where(used, used_at_least / at_least, 0.0).sum(1) / used.sum(1).double()


def window_auc(scores: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(R,) ROC AUC: the share of (used, unused) expert pairs in which the used one scores higher, a tie
    counting one half; (sum of S's ascending ranks - m (m + 1) / 2) / (m (E - m)), m = |S|, ties at their
    mean rank. NaN where S is empty or holds every expert. Random (and constant scores): 0.5."""
    _, _, rank = window_counts(scores, used)
    m, E = used.sum(1).double(), used.shape[1]
    return (torch.where(used, rank, 0.0).sum(1) - m * (m + 1) / 2) / (m * (E - m))


def random_average_precision(m: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expected average precision of a uniformly random order for a set of m of E experts:
    (m - 1) / (E - 1) + H_E (E - m) / (E (E - 1)), H_E = 1 + 1/2 + .. + 1/E. (A used expert at position r has
    1 + (r - 1)(m - 1)/(E - 1) used experts at or above it on average; averaged over r with weight 1 / r.)"""
    E = num_experts
    harmonic = sum(1.0 / r for r in range(1, E + 1))
    m = m.double()
    return (m - 1) / max(E - 1, 1) + harmonic * (E - m) / (E * max(E - 1, 1))


class WindowAccumulator(MeanLoss):
    """Streaming sums of the window metrics per input layer l (the window's layer): recall@k for every k,
    average precision and its random expectation, AUC (over rows where it is defined) and |S|."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, ks: tuple[int, ...] = SEED_KS,
                 device: torch.device | str = "cpu"):
        # k = K and 2K always, as in CoverageAccumulator, so reports can name them for any model
        self.ks = tuple(sorted(k for k in set(ks) | {top_k, 2 * top_k} if k <= num_experts))
        self.L, self.E = num_layers, num_experts
        super().__init__(device)
        names = ("rows", "size", "ap", "random_ap", "auc", "auc_rows", *(f"recall@{k}" for k in self.ks))
        self.sums = {n: torch.zeros(num_layers, dtype=torch.float64, device=self.device) for n in names}

    @torch.no_grad()
    def update(self, scores: torch.Tensor, used: torch.Tensor, layer: torch.Tensor) -> None:
        """scores (R, E); used (R, E) bool, each row's set S (rows with an empty S are not counted); layer (R,)."""
        keep = used.any(1)
        scores, used, layer = scores[keep], used[keep], layer[keep].to(self.device).long()
        size = used.sum(1).double()
        auc = window_auc(scores, used)
        values = {"rows": torch.ones_like(size), "size": size, "ap": average_precision(scores, used),
                  "random_ap": random_average_precision(size, self.E), "auc": auc.nan_to_num(0.0),
                  "auc_rows": (~auc.isnan()).double(),
                  **{f"recall@{k}": window_recall_at_k(scores, used, k) for k in self.ks}}
        for name, v in values.items():
            self.sums[name].index_add_(0, layer, v.to(self.device))

    def summary(self, layers: list[int] | None = None) -> dict[str, float]:
        """Flat dict: window_rows, window_size (mean |S|), window_recall@k, window_ap, random/window_ap,
        window_auc (over window_auc_rows rows: those where S is neither empty nor every expert)."""
        sel = slice(None) if layers is None else torch.tensor(layers, device=self.device)
        total = {n: v[sel].sum().item() for n, v in self.sums.items()}
        rows = total["rows"]
        out: dict[str, float] = {"window_rows": rows, "window_auc_rows": total["auc_rows"]}
        if rows == 0:
            return out
        out["window_size"] = total["size"] / rows
        for k in self.ks:
            out[f"window_recall@{k}"] = total[f"recall@{k}"] / rows
        out["window_ap"], out["random/window_ap"] = total["ap"] / rows, total["random_ap"] / rows
        out["window_auc"] = total["auc"] / total["auc_rows"] if total["auc_rows"] else float("nan")
        return out

    def per_layer(self, metric: str) -> list[float | None]:
        return [self.summary(layers=[l]).get(metric) for l in range(self.L)]
