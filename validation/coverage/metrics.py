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


def previous_token_recall(ids: torch.Tensor, first: torch.Tensor) -> tuple[float, list[float]]:
    """Temporal locality of routing: the share of token t's K experts at layer l that token t-1 of the same
    sequence also used at layer l, |T_t,l & T_t-1,l| / K, averaged over every token that has a previous
    token (overall, and per layer). It is recall@K of the "previous-token" predictor (scorers.py) at d = 0.
    Random routing: K / E (0.067 for 60/4); real Qwen MoEs read 0.35-0.43.

    ids: (N, L, K) int, the experts of N tokens in sequence order, sequences back to back; first: (N,) bool,
    True where a sequence starts (that token has no previous token). Experts within a row are distinct.
    NaN when no token has a previous token.
    """
    per_layer = previous_token_recall_per_layer(torch.as_tensor(ids), torch.as_tensor(first, dtype=torch.bool))
    return float(per_layer.mean()), per_layer.tolist()  # every layer has the same tokens: overall = mean of layers


def previous_token_recall_per_layer(ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(L,) float64 previous_token_recall of each layer, left on ids' device (no host sync: training reads it
    every step)."""
    has_prev = ~first[1:].to(ids.device)                                           # (N-1,)
    shared = (ids[1:, :, :, None] == ids[:-1, :, None, :]).sum((2, 3))            # (N-1, L) experts in common
    return shared[has_prev].double().mean(0) / ids.shape[2]


class CoverageAccumulator:
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
        self.device = torch.device(device)
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=self.device)  # noqa: E731
        self.hist_all = z(num_layers, num_sources, num_experts)   # ranks of every true expert
        self.hist_max = z(num_layers, num_sources, num_experts)   # worst rank per row (coverage)
        self.hist_min = z(num_layers, num_sources, num_experts)   # best rank per row (any hit)
        self.pred_freq = z(num_experts)                           # how often each expert is predicted in top-K
        self.true_freq = z(num_experts)                           # how often each expert is truly chosen
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_rows = 0

    def add_loss(self, loss_sum: torch.Tensor, rows: int) -> None:
        self.loss_sum += loss_sum.detach().to(self.device, torch.float64)
        self.loss_rows += rows

    def mean_loss(self) -> float:
        return (self.loss_sum / max(self.loss_rows, 1)).item()

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
