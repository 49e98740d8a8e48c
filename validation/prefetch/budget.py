"""A GPU-memory budget as users set it: one total for the expert slots and the KV cache, split over the layers.

    KV bytes      = the preset's KV cache at --context T tokens (validation/prefetch/cost_model.py)
    slot pool     = floor((G GiB - KV bytes) x L / (MoE layers of the preset x expert bytes))
                    the replayed L layers stand for the preset's MoE layers, each holding its share of the pool
    at least one slot per replayed layer: a smaller budget is refused in one line

The pool is split over the replayed layers (`split_slots`):

    uniform       pool / L per layer (the first pool mod L layers one more)
    popularity    each layer first gets its most used expert; the rest of the pool goes to the most used
                  (layer, expert) pairs of the training split (activation shares), so a layer gets as many
                  slots as it has experts among the pool's most popular pairs
    optimised     greedy by marginal hit rate per byte: each layer starts with one slot; then, while slots
                  are left, the layer whose LRU hit count gains most per byte from its next j slots (the best
                  j, so a flat stretch of a curve that rises again later is crossed: the greedy runs on each
                  curve's concave hull) gets those j slots. The curves are LRU hits per layer and cache size
                  measured on the training split (`lru_hit_curves`, by stack distance); ties go to the lower
                  layer and the shorter run
"""
from __future__ import annotations

import numpy as np
from numba import njit

from common.errors import UserError
from validation.prefetch.cost_model import ModelShape

SPLITS = ("uniform", "popularity", "optimised")


def slot_pool(gib: float, context: int, shape: ModelShape, expert_bytes: int, num_layers: int,
              num_experts: int) -> tuple[int, dict[str, float]]:
    """(slots over the L replayed layers, what went where) for a GPU budget of `gib` at `context` tokens."""
    total = gib * 2**30
    kv = shape.kv_bytes(context)
    per_layer = (total - kv) / (shape.moe_layers * expert_bytes)
    pool = int(np.floor(max(per_layer, 0.0) * num_layers))
    info = {"gpu_gib": gib, "context": context, "kv_bytes": kv, "kv_rule": shape.kv_rule,
            "expert_bytes": expert_bytes, "slots_per_layer_mean": per_layer}
    if pool < num_layers:
        need = kv + shape.moe_layers * expert_bytes
        raise UserError(f"--gpu-gib {gib}: {kv / 2**30:.2f} GiB of KV cache at --context {context} leave "
                        f"{max(total - kv, 0) / 2**30:.2f} GiB, less than one {expert_bytes / 2**20:.1f} MiB expert "
                        f"slot per MoE layer ({shape.moe_layers} layers of {shape.preset}); at least "
                        f"{need / 2**30:.2f} GiB")
    return min(pool, num_layers * num_experts), info


def split_slots(pool: int, mode: str, num_layers: int, num_experts: int, popularity: np.ndarray | None = None,
                hit_curves: np.ndarray | None = None, expert_bytes: int = 1) -> np.ndarray:
    """(L,) slots per layer summing to `pool` (module docstring), each within 1..E."""
    L, E = num_layers, num_experts
    if not L <= pool <= L * E:
        raise ValueError(f"pool {pool} outside {L}..{L * E}")
    if mode == "uniform":
        caps = np.full(L, pool // L, dtype=np.int64)
        caps[:pool % L] += 1
        return caps
    if mode == "popularity":
        share = np.asarray(popularity, dtype=np.float64)
        order = np.argsort(-share, axis=1, kind="stable")
        rest = share.copy()
        rest[np.arange(L), order[:, 0]] = -np.inf               # each layer's most used expert is already in
        flat = np.argsort(-rest.ravel(), kind="stable")[:pool - L]  # the most used (layer, expert) pairs after them
        return 1 + np.bincount(flat // E, minlength=L).astype(np.int64)
    if mode == "optimised":
        hits = np.asarray(hit_curves, dtype=np.float64)  # (L, E + 1)
        caps = np.ones(L, dtype=np.int64)
        left = pool - L
        while left > 0:
            best, best_rate, best_j = -1, -np.inf, 0
            for l in range(L):  # the best rate of hits per byte over any run of j more slots (the concave hull)
                j = np.arange(1, min(E - caps[l], left) + 1)
                if len(j) == 0:
                    continue
                rate = (hits[l, caps[l] + j] - hits[l, caps[l]]) / (j * expert_bytes)
                k = int(np.argmax(rate))  # the shortest run on a tie
                if rate[k] > best_rate:   # the lower layer on a tie
                    best, best_rate, best_j = l, rate[k], int(j[k])
            caps[best] += best_j
            left -= best_j
        return caps
    raise UserError(f"--split {mode!r}: choose from {', '.join(SPLITS)}")


@njit(cache=True)
def lru_hit_curves(ids: np.ndarray, E: int) -> np.ndarray:
    """(L, E + 1) accesses an LRU cache of c slots hits at each layer, c = 0..E: an access hits iff fewer than
    c distinct experts of its layer were used since its own last use (its stack distance is below c)."""
    T, L, K = ids.shape
    hits_at = np.zeros((L, E + 1), dtype=np.int64)  # accesses of stack distance d (a hit for c > d)
    last = np.full((L, E), -1, dtype=np.int64)
    clock = 0
    for t in range(T):
        for l in range(L):
            for k in range(K):
                e = ids[t, l, k]
                if e < 0:
                    continue
                if last[l, e] >= 0:
                    dist = 0
                    for o in range(E):
                        dist += last[l, o] > last[l, e]
                    hits_at[l, dist] += 1
                clock += 1
                last[l, e] = clock
    out = np.zeros((L, E + 1), dtype=np.int64)
    for l in range(L):
        for c in range(1, E + 1):
            out[l, c] = out[l, c - 1] + hits_at[l, c - 1]
    return out
