"""How much temporal locality a replayed routing has: the three numbers every payoff table is labelled with.

    previous-token recall@K   |experts(t, l) & experts(t-1, l)| / K, over (token, layer) pairs whose token
                              is not the first of its sequence
    median reuse distance     tokens since the same expert was last used at the same layer, over every
                              access that has such a use earlier in the stream (the cache is kept across
                              requests, so the distance may cross them)
    top-25% share             share of a layer's activations taken by its ceil(E / 4) most used experts,
                              averaged over layers (0.25 if balanced, 1.0 if they take everything)

Real models, for comparison (docs/anchors): previous-token recall@4 of 0.35-0.43 reported for real Qwen MoEs.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from validation.coverage.metrics import previous_token_recall

REAL_MODELS = "real Qwen MoEs: previous-token recall@4 0.35-0.43 (docs/anchors)"


@njit(cache=True)
def _reuse_distances(ids: np.ndarray, E: int) -> tuple[np.ndarray, int]:
    """Tokens since each activated expert's last use at its layer (first uses left out): dist[:n]."""
    T, L, K = ids.shape
    last = np.full((L, E), -1, dtype=np.int64)
    dist = np.empty(T * L * K, dtype=np.int64)
    n = 0
    for t in range(T):
        for l in range(L):
            for k in range(K):
                e = ids[t, l, k]
                if last[l, e] >= 0:
                    dist[n] = t - last[l, e]
                    n += 1
                last[l, e] = t
    return dist, n


def locality_summary(ids: np.ndarray, first: np.ndarray, num_experts: int) -> dict[str, float]:
    """The module docstring's three numbers for (T, L, K) routing (one token per step, distinct experts)."""
    dist, n = _reuse_distances(np.ascontiguousarray(ids, dtype=np.int64), num_experts)
    L = ids.shape[1]
    counts = np.stack([np.bincount(ids[:, l].ravel(), minlength=num_experts) for l in range(L)])
    top = np.sort(counts, axis=1)[:, ::-1][:, :math.ceil(num_experts / 4)].sum(1)
    return {"previous_token_recall": previous_token_recall(ids, first)[0],
            "median_reuse_distance": float(np.median(dist[:n])) if n else float("nan"),
            "top25_share": float(np.mean(top / np.maximum(counts.sum(1), 1))),
            "top_k": int(ids.shape[2])}


def locality_line(loc: dict[str, float]) -> str:
    """One line for a table's header."""
    return (f"routing locality: previous-token recall@{loc['top_k']} {loc['previous_token_recall']:.2f}, median "
            f"reuse distance {loc['median_reuse_distance']:.0f} tokens, top-25% experts take "
            f"{loc['top25_share']:.0%} of activations ({REAL_MODELS})")
