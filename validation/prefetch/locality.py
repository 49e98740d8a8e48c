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

REAL_MODELS = "real Qwen MoEs: previous-token recall@4 0.35-0.43 (docs/anchors)"


@njit(cache=True)
def _recall_and_distances(ids: np.ndarray, first: np.ndarray, E: int) -> tuple[float, int, np.ndarray, int]:
    T, L, K = ids.shape
    last = np.full((L, E), -1, dtype=np.int64)
    dist = np.empty(T * L * K, dtype=np.int64)
    n = 0
    shared = 0.0
    pairs = 0
    for t in range(T):
        for l in range(L):
            if not first[t]:
                same = 0
                for k in range(K):
                    for j in range(K):
                        same += ids[t, l, k] == ids[t - 1, l, j]
                shared += same / K
                pairs += 1
            for k in range(K):
                e = ids[t, l, k]
                if last[l, e] >= 0:
                    dist[n] = t - last[l, e]
                    n += 1
                last[l, e] = t
    return shared, pairs, dist, n


def locality_summary(ids: np.ndarray, first: np.ndarray, num_experts: int) -> dict[str, float]:
    """The module docstring's three numbers for (T, L, K) routing (one token per step, distinct experts)."""
    shared, pairs, dist, n = _recall_and_distances(np.ascontiguousarray(ids, dtype=np.int64), first, num_experts)
    L = ids.shape[1]
    counts = np.stack([np.bincount(ids[:, l].ravel(), minlength=num_experts) for l in range(L)])
    top = np.sort(counts, axis=1)[:, ::-1][:, :math.ceil(num_experts / 4)].sum(1)
    return {"previous_token_recall": shared / pairs if pairs else float("nan"),
            "median_reuse_distance": float(np.median(dist[:n])) if n else float("nan"),
            "top25_share": float(np.mean(top / np.maximum(counts.sum(1), 1))),
            "top_k": int(ids.shape[2])}


def locality_line(loc: dict[str, float]) -> str:
    """One line for a table's header."""
    return (f"routing locality: previous-token recall@{loc['top_k']} {loc['previous_token_recall']:.2f}, median "
            f"reuse distance {loc['median_reuse_distance']:.0f} tokens, top-25% experts take "
            f"{loc['top25_share']:.0%} of activations ({REAL_MODELS})")
