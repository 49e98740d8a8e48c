"""The per-layer expert cache's bookkeeping: which expert sits in which slot, and what one step copies.

`cache_step` is the simulator's replay kernel (validation/prefetch/simulator.py `replay_kernel`) for one (token, layer)
step with the clock of time taken out: the same slot tables, the same eviction keys (`_key`: LRU, LFU with
LRU ties, Belady; `_victim`: a score with LRU ties), the same pinning of the current access, the same prefetch
rule and the same byte accounting, statement for statement, so the engine's hits, demand copies, staged experts
and speculative copies equal the simulator's for the same routing, predictions and scores (tests/test_engine.py
checks it).

One step at layer l:
  1. the access: the experts layer l needs now (batch 1: the router's top-k in its order; a batch: the union,
     in order of first appearance). Cached ones are pinned first, then each is a hit, or a demand copy into a
     free slot, else into the slot of the smallest key that is not pinned; when none can be freed (C smaller
     than the access, or a static cache) it is staged (a staging slot, dropped after use).
  2. a prefetch: the top-m predicted experts of layer l+d that are not cached take slots of layer l+d by the
     same keys, each pinned for the step so that they never take one another's slot, and become pending until
     used.
`need[i]` is the slot of access i (>= 0) or -1 - j for staging slot j.

Sizing: `cache_slots` turns `cache_experts` or a `cache_gib` budget into C slots per layer.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from common.errors import UserError, number_flag
from validation.prefetch.simulator import (
    BELADY,
    DEMAND,
    HITS,
    LFU,
    N_STATS,
    NO_PREFETCH,
    SCORE,
    SPEC,
    SPEC_USED,
    SPEC_WASTED,
    STAGED,
    STATIC,
)


@njit(cache=True)
def _key(eviction, last, freq, nxt, T):
    """Eviction priority of a cached expert, the kernel's order for the rules the engine runs: the smallest key
    goes first. LRU: last touch; LFU: fewest accesses, then LRU; BELADY: furthest next use, then LRU (the clock
    stays below 2^40); SCORE: last touch, the tie-break under the step's scores (`_victim`)."""
    if eviction == LFU:
        return (freq << 40) | last
    if eviction == BELADY:
        return ((T - nxt) << 40) | last
    return last


@njit(cache=True)
def _victim(l, C, slot_key, slot_pin, stamp, eviction, slot_expert, score):
    """The slot to free in layer l's full cache, never one pinned with `stamp`; -1 if all are. SCORE: the expert
    of the lowest score (the step's, by expert), least recently touched among equals (the simulator's `_victim`)."""
    keys, pins = slot_key[l], slot_pin[l]
    best, best_key, best_score = -1, np.iinfo(np.int64).max, np.inf
    for s in range(C):
        if pins[s] == stamp:
            continue
        if eviction == SCORE:
            sc = score[slot_expert[l, s]]
            if sc < best_score or (sc == best_score and keys[s] < best_key):
                best, best_key, best_score = s, keys[s], sc
        elif keys[s] < best_key:
            best, best_key = s, keys[s]
    return best


NO_SCORE = np.zeros(0, dtype=np.float64)  # the score of a step under a rule that reads none

# the simulator's statistics columns the engine counts (LATE, STALL_MS and END_MS are times: measured instead)
COUNTED = (HITS, DEMAND, STAGED, SPEC, SPEC_USED, SPEC_WASTED)


def cache_slots(num_layers: int, num_experts: int, slot_bytes: int, cache_experts: int | None,
                cache_gib: float | None) -> int:
    """C, the cache slots per layer, from exactly one of `cache_experts` (0..E) or `cache_gib` (GPU GiB for
    all layers' slots: floor(budget / (L x slot bytes)), at least one slot per layer and at most E)."""
    if (cache_experts is None) == (cache_gib is None):
        raise UserError("give exactly one of --cache-experts and --cache-gib")
    E, L = num_experts, num_layers
    if cache_experts is not None:
        if not 0 <= cache_experts <= E:
            raise UserError(f"--cache-experts {cache_experts}: each layer has {E} experts, so the cache holds "
                            f"0..{E} of them per layer")
        return int(cache_experts)
    number_flag("cache-gib", cache_gib, 0, 1 << 20, above_low=True)  # NaN, an infinity or 1 PiB: no slot count
    one_per_layer = L * slot_bytes / 2**30
    if cache_gib < one_per_layer:
        raise UserError(f"--cache-gib {cache_gib:g}: cannot hold one slot per layer ({L} layers x "
                        f"{slot_bytes:,} bytes = {one_per_layer:.3f} GiB at least)")
    c = int(cache_gib * 2**30 // (L * slot_bytes))
    if c > E:
        raise UserError(f"--cache-gib {cache_gib:g}: holds {c} slots per layer, more than the {E} experts; "
                        f"{E * one_per_layer:.3f} GiB holds them all (--policy all-resident)")
    return c


class CacheState:
    """The slot tables of every layer (host arrays, as in the kernel), and the step counters."""

    def __init__(self, num_layers: int, num_experts: int, cache: int, eviction: int, prefetch: int,
                 stream_tokens: int = 0):
        L, E, C = num_layers, num_experts, cache
        if eviction == SCORE and prefetch != NO_PREFETCH:  # a prefetch's victim would need layer l+d's scores
            raise ValueError("a score eviction joined to a prefetch is not implemented in the engine's cache")
        W = max(C, 1)
        self.L, self.E, self.C, self.eviction, self.prefetch = L, E, C, eviction, prefetch
        self.slot_of = np.full((L, E), -1, dtype=np.int64)
        self.slot_expert = np.full((L, W), -1, dtype=np.int64)
        self.slot_key = np.zeros((L, W), dtype=np.int64)
        self.slot_pin = np.zeros((L, W), dtype=np.int64)
        self.n_used = np.zeros(L, dtype=np.int64)
        self.freq = np.zeros((L, E), dtype=np.int64)
        self.nxt = np.full((L, E), stream_tokens, dtype=np.int64)
        self.pending = np.zeros((L, E), dtype=np.bool_)
        self.counters = np.array([1, 0], dtype=np.int64)  # clock, stamp
        self.T = stream_tokens  # Belady's horizon: the forced stream's length (as next_uses counts it)
        # per-step outputs, preallocated (the access is at most E experts)
        self.need = np.zeros(E, dtype=np.int64)
        self.demand = np.zeros((E, 2), dtype=np.int64)
        self.fetch = np.zeros((E, 2), dtype=np.int64)
        self.stats = np.zeros(N_STATS, dtype=np.float64)

    def preload(self, resident: np.ndarray) -> None:
        """A static cache: layer l holds the experts of resident[l] (L, E) bool in expert order, slot by slot
        (as the kernel fills it)."""
        for l in range(self.L):
            for e in np.flatnonzero(resident[l]):
                if self.n_used[l] < self.C:
                    self.slot_of[l, e] = self.n_used[l]
                    self.slot_expert[l, self.n_used[l]] = e
                    self.n_used[l] += 1

    def step(self, layer: int, access: np.ndarray, pred: np.ndarray, n_pred: int, lookahead: int,
             next_use: np.ndarray, score: np.ndarray = NO_SCORE) -> tuple[int, int, int]:
        """One step (module docstring). `score` (E,) float64: this step's eviction score of every expert of the
        layer (SCORE; higher = used sooner). Returns (n_demand, n_fetch, n_staged); the rows are in self.need[:A],
        self.demand[:n_demand], self.fetch[:n_fetch]; counts are added to self.stats."""
        return _step(layer, access, pred, n_pred, lookahead, next_use, score, self.C, self.eviction, self.prefetch,
                     self.T,
                     self.slot_of, self.slot_expert, self.slot_key, self.slot_pin, self.n_used, self.freq, self.nxt,
                     self.pending, self.counters, self.need, self.demand, self.fetch, self.stats)

    def pending_count(self) -> int:
        """Speculative copies never used so far (wasted if the stream ended here)."""
        return int(self.pending.sum())


@njit(cache=True)
def _step(l, access, pred, n_pred, d, next_use, score, C, eviction, prefetch, T, slot_of, slot_expert, slot_key,
          slot_pin, n_used, freq, nxt, pending, counters, need, log_demand, log_fetch, stats):
    """replay_kernel's loop body for (token t, layer l), without its clock (see the module docstring)."""
    L = slot_of.shape[0]
    A = access.shape[0]
    clock = counters[0]
    stamp = counters[1] + 1
    for k in range(A):
        e = access[k]
        freq[l, e] += 1
        if eviction == BELADY:
            nxt[l, e] = next_use[k]
        s = slot_of[l, e]
        if s >= 0:  # pinned before any miss of this step looks for a slot
            slot_pin[l, s] = stamp
    # 1. hits, and demand copies of the misses
    n_staged = 0
    n_dem = 0
    for k in range(A):
        e = access[k]
        s = slot_of[l, e]
        if s >= 0:
            stats[HITS] += 1
            if pending[l, e]:
                stats[SPEC_USED] += 1
                pending[l, e] = False
        else:
            stats[DEMAND] += 1
            if eviction != STATIC and C > 0:
                if n_used[l] < C:
                    s = n_used[l]
                    n_used[l] += 1
                else:
                    s = _victim(l, C, slot_key, slot_pin, stamp, eviction, slot_expert, score)
                    if s >= 0:
                        old = slot_expert[l, s]
                        slot_of[l, old] = -1
                        if pending[l, old]:
                            stats[SPEC_WASTED] += 1
                            pending[l, old] = False
            if s >= 0:
                slot_of[l, e] = s
                slot_expert[l, s] = e
                slot_pin[l, s] = stamp
            else:  # no slot can be freed: staging, dropped after this layer
                stats[STAGED] += 1
                s = -1 - n_staged
                n_staged += 1
            log_demand[n_dem, 0] = e
            log_demand[n_dem, 1] = s
            n_dem += 1
        if s >= 0:  # touched: its priority from this step's clock
            slot_key[l, s] = _key(eviction, clock, freq[l, e], nxt[l, e], T)
            clock += 1
        need[k] = s
    # 2. speculative copies for layer l+d, pinned so they never take one another's slot
    n_pre = 0
    if prefetch != NO_PREFETCH and l + d < L and C > 0:
        tl = l + d
        n_pin = 0
        for j in range(n_pred):
            if n_pin == C:
                break
            e = pred[j]
            if e < 0:
                continue
            s = slot_of[tl, e]
            if s >= 0 and slot_pin[tl, s] == stamp:  # named twice
                continue
            if s < 0:
                if n_used[tl] < C:
                    s = n_used[tl]
                    n_used[tl] += 1
                else:
                    s = _victim(tl, C, slot_key, slot_pin, stamp, eviction, slot_expert, score)
                    old = slot_expert[tl, s]
                    slot_of[tl, old] = -1
                    if pending[tl, old]:
                        stats[SPEC_WASTED] += 1
                        pending[tl, old] = False
                slot_of[tl, e] = s
                slot_expert[tl, s] = e
                pending[tl, e] = True
                stats[SPEC] += 1
                log_fetch[n_pre, 0] = e
                log_fetch[n_pre, 1] = s
                n_pre += 1
            slot_pin[tl, s] = stamp
            n_pin += 1
            slot_key[tl, s] = _key(eviction, clock, freq[tl, e], nxt[tl, e], T)
            clock += 1
    counters[0] = clock
    counters[1] = stamp
    return n_dem, n_pre, n_staged
