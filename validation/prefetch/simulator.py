"""The expert-cache and prefetch simulator: policies, the decode stream they replay, the replay kernel.

Story of a replay (docs/PREFETCH.md has every formula). The test split's sequences, concatenated, are one
decode stream: a server answering requests one after another at batch 1, its cache kept across them.
Token t runs layers 0..L-1; each layer keeps a cache of C expert slots. For each (token, layer):

1. `pre_ms` of attention and router; then the layer's K experts are known. Each one is a hit if it is
   cached or on its way (a prefetch), else a demand fetch joins the one copy engine's FIFO queue behind
   every copy already queued (that is how speculative bytes can hurt). A demand-fetched expert takes a
   slot, evicting by the policy's rule, never an expert of the current access; when no slot can be
   freed (C < K, or a static cache) it goes to a staging buffer and is dropped after use.
2. A prefetch policy runs its predictor (`predictor_ms`), then queues the top-m predicted experts of
   layer l+d (l+d < L) that are not cached; they take slots by LRU (m <= C, so never one another).
3. The shared expert (`shared_ms`) runs while copies are in flight; the routed experts start when it is
   done and every needed expert has arrived. The wait is the stall: a late prefetch stalls only for the
   time it still needs.

Byte accounting: moved = demand + speculative; speculative = used (hit before eviction) + wasted
(evicted unused, or never used by the end of the stream); used bytes = demand + used speculative.

The kernel is numba-compiled over int arrays (over 1M (token, layer) steps per second per policy on one
CPU core; docs/BENCHMARKS.md); predictions come from the project's scorers (validation/coverage/evaluate.py), run
once per predictor over the whole stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit
from tqdm import tqdm

from collection.traces.format import TraceSet
from collection.traces.rows import SplitBlocks, TokenBlock, row_batches, split_sequences
from common.errors import UserError
from models.checkpoint import check_fits_traces, load_checkpoint
from validation.coverage.scorers import BASELINES, SCORERS, Scorer, baseline_scorer, expert_popularity, predictor_scorer
from validation.prefetch.cost_model import DEFAULT_PREDICTOR_MS, CostModel

# eviction rules and prefetch sources of the kernel
LRU, LFU, BELADY, STATIC = 0, 1, 2, 3
NO_PREFETCH, PREDICTED, ORACLE = 0, 1, 2

# per-token statistics columns of the kernel's output
HITS, DEMAND, STAGED, SPEC, SPEC_USED, SPEC_WASTED, LATE, STALL_MS, END_MS = range(9)
N_STATS = 9


# ----------------------------------------------------------------------------------------------
# the policy registry


@dataclass(frozen=True)
class Policy:
    name: str
    eviction: int
    prefetch: int
    needs: tuple[str, ...] = ()   # from the traces: "hidden" (MoE inputs), "router_weights", "train_split"
    source: str | None = None     # prefetch: a baseline name or a checkpoint path
    summary: str = ""

    @property
    def all_resident(self) -> bool:
        return self.name == "all-resident"


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("on-demand", LRU, NO_PREFETCH, summary="LRU eviction, fetch on a miss"),
    Policy("lfu", LFU, NO_PREFETCH, summary="evict the expert least used since the start (ties: LRU)"),
    Policy("static-popular", STATIC, NO_PREFETCH, ("train_split",),
           "pin each layer's C most used experts of the training split; a miss is staged and dropped"),
    Policy("oracle", LRU, ORACLE, summary="prefetch the true experts of layer l+d (LRU eviction)"),
    Policy("belady", BELADY, NO_PREFETCH, summary="evict the expert used furthest in the future; fetch on a miss"),
    Policy("all-resident", STATIC, NO_PREFETCH, summary="every expert on the GPU: the ceiling, no transfers"),
)}


def _baseline_needs(name: str) -> tuple[str, ...]:
    """What a baseline reads from the traces, from the one scorer registry (validation/coverage/scorers.py)."""
    info = SCORERS[name]
    return ((("hidden",) if info.needs_hidden else ()) + (("router_weights",) if info.needs_router else ())
            + (("train_split",) if info.needs_training_split else ()))


# the baselines that can prefetch: all but the same-layer control, which answers layer l only when it runs
PREFETCH_BASELINES: dict[str, tuple[str, ...]] = {b: _baseline_needs(b) for b in BASELINES
                                                  if not SCORERS[b].same_layer_only}
POLICY_HELP = (", ".join(POLICIES) + ", prefetch:<checkpoint.pth | " + " | ".join(PREFETCH_BASELINES) + ">")


def parse_policy(name: str) -> Policy:
    if name in POLICIES:
        return POLICIES[name]
    if name.startswith("prefetch:"):
        src = name[len("prefetch:"):]
        if src in PREFETCH_BASELINES:
            return Policy(name, LRU, PREDICTED, PREFETCH_BASELINES[src], src, f"prefetch the {src} baseline's top-m")
        if src in BASELINES:  # "router": layer l's own router answers layer l only, too late to prefetch
            raise UserError(f"policy {name}: {src} is the same-layer control (d = 0), not a prefetcher; "
                            f"use prefetch:router-reuse")
        if src.endswith((".pth", ".pt")) or Path(src).is_file():
            return Policy(name, LRU, PREDICTED, ("hidden",), src, "prefetch a trained predictor's top-m")
        raise UserError(f"policy {name}: {src!r} is neither a checkpoint file nor a baseline "
                        f"({', '.join(PREFETCH_BASELINES)})")
    raise UserError(f"unknown policy {name!r}; choose from {POLICY_HELP}")


def check_needs(policy: Policy, ts: TraceSet, lookahead: int) -> None:
    """One line naming what the traces lack for this policy (before anything is computed or written)."""
    L = ts.manifest.num_layers
    if "hidden" in policy.needs and policy.prefetch == PREDICTED:
        missing = sorted(set(range(L - lookahead)) - set(ts.manifest.hidden_layers))
        if missing:
            raise UserError(f"policy {policy.name} needs the stored MoE input (hidden state) of layers "
                            f"0..{L - lookahead - 1}; {ts.dir} lacks layers {missing} (collect with --hidden-layers all)")
    if "router_weights" in policy.needs:
        ts.router_weights()  # raises a one-line TraceFormatError naming the missing file


def check_caches(caches: list[int], num_experts: int) -> None:
    if not caches:
        raise UserError("no cache size given")
    for c in caches:
        if not 0 <= c <= num_experts:
            raise UserError(f"cache {c}: each layer has {num_experts} experts, so the cache holds 0..{num_experts} of them")


@dataclass
class Predictor:
    """A prefetch policy's scorer, how long it runs per layer, and what it needs."""
    scorer: Scorer
    predictor_ms: float
    kind: str                 # "learned", or the baseline's name
    needs_hidden: bool
    label: str                # short name for tables
    config: dict[str, Any] = field(default_factory=dict)  # a checkpoint's predictor config


def build_predictor(policy: Policy, ts: TraceSet, lookahead: int, train_ids: np.ndarray, test_ids: np.ndarray,
                    seed: int = 0) -> Predictor:
    """The scorer of a `prefetch:` policy: a baseline of validation/coverage/evaluate.py or a checkpoint's predictor,
    checked against the traces (E, L, hidden size, lookahead, held-out split)."""
    m = ts.manifest
    cpu = torch.device("cpu")
    if policy.source in PREFETCH_BASELINES:
        scorer = baseline_scorer(policy.source, ts, lookahead, train_ids, cpu, seed)
        return Predictor(scorer, DEFAULT_PREDICTOR_MS.get(policy.source, 0.0), policy.source,
                         "hidden" in policy.needs, policy.name)
    model, cfg, ckpt = load_checkpoint(Path(policy.source), cpu)
    # routing shape, the hidden layers its features read (past layers, window, context), its token table
    check_fits_traces(cfg, ts, f"policy {policy.name}")
    if cfg.lookahead != lookahead:
        raise UserError(f"policy {policy.name}: the checkpoint predicts {cfg.lookahead} layer(s) ahead, "
                        f"--lookahead is {lookahead}")
    split = ckpt.get("split", {})
    if "test" in split and not np.array_equal(np.sort(split["test"].numpy()), np.sort(test_ids)):
        raise UserError(f"policy {policy.name}: the checkpoint's held-out test split differs from the replayed one "
                        f"(other traces or --seed); replaying its training sequences would flatter it")
    scorer = predictor_scorer(model, lookahead, m.num_experts)
    label = f"prefetch:{cfg.kind}-d{cfg.lookahead} ({Path(policy.source).parent.name})"
    return Predictor(scorer, DEFAULT_PREDICTOR_MS["learned"], "learned", True, label, cfg.to_json())


@dataclass
class Setup:
    ts: TraceSet
    policies: list[Policy]
    split: dict[str, np.ndarray]
    predictors: dict[str, Predictor]  # prefetch policies' scorers, by policy name


def prepare(traces: str | Path, policy_names: str, lookahead: int, budget: int, seed: int = 0, locality: float = 0.0,
            max_tokens: int | None = None, verify: bool = True) -> Setup:
    """Every check of a replay's input, before anything is computed or written: policies known, traces holding
    what each needs, 1 <= d < L, 1 <= m <= E, checkpoints of these traces. Bad input: one UserError line."""
    names = list(dict.fromkeys(n.strip() for n in policy_names.split(",") if n.strip()))
    if not names:
        raise UserError("--policies is empty")
    policies = [parse_policy(n) for n in names]
    ts = TraceSet(Path(traces), verify=verify)
    L, E = ts.manifest.num_layers, ts.manifest.num_experts
    if not 1 <= lookahead < L:
        raise UserError(f"--lookahead {lookahead}: the traces have {L} MoE layers, so 1 <= d <= {L - 1} "
                        "(d = 0 would fetch a layer's experts when they are already needed)")
    if not 1 <= budget <= E:
        raise UserError(f"--fetch-budget {budget}: must be within 1..{E} (experts per layer)")
    if not 0.0 <= locality <= 1.0:
        raise UserError(f"--locality {locality}: a probability, within 0..1")
    if max_tokens is not None and max_tokens <= 0:
        raise UserError("--max-tokens must be positive")
    for pol in policies:
        check_needs(pol, ts, lookahead)
    split = split_sequences(ts.sequence_table(), seed)
    if len(split["test"]) == 0 or len(split["train"]) == 0:
        raise UserError(f"{traces}: too few sequences for a training and a test split")
    predictors = {pol.name: build_predictor(pol, ts, lookahead, split["train"], split["test"], seed)
                  for pol in policies if pol.prefetch == PREDICTED}
    return Setup(ts, policies, split, predictors)


# ----------------------------------------------------------------------------------------------
# the decode stream


@dataclass
class Stream:
    """The replayed tokens in decode order, and each predictor's top-m per (token, target layer)."""
    ids: np.ndarray        # (T, L, K) int64 true experts (after --locality)
    weights: np.ndarray    # (T, L, K) float32 their routing weights
    first: np.ndarray      # (T,) bool: the token starts a sequence (a new request)
    position: np.ndarray   # (T,) position of the token in its sequence
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (T, L, m) int64, -1: none

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]


@njit(cache=True)
def _add_locality(ids: np.ndarray, first: np.ndarray, u: np.ndarray, p: float) -> np.ndarray:
    """Each of the previous token's experts at a layer is kept with probability p (coin u < p), then the
    token's own experts fill the other slots in their order: K distinct experts, reused ones first."""
    T, L, K = ids.shape
    out = ids.copy()
    for t in range(T):
        if first[t]:
            continue
        for l in range(L):
            n = 0
            for k in range(K):
                if u[t, l, k] < p:
                    out[t, l, n] = out[t - 1, l, k]
                    n += 1
            for k in range(K):
                if n == K:
                    break
                e = ids[t, l, k]
                dup = False
                for j in range(n):
                    dup = dup or out[t, l, j] == e
                if not dup:
                    out[t, l, n] = e
                    n += 1
    return out


def add_locality(ids: np.ndarray, first: np.ndarray, p: float, seed: int) -> np.ndarray:
    """(T, L, K) routing with more temporal locality (docs/PREFETCH.md): within a sequence, each expert of
    the previous token is reused with probability p. p = 0 returns the routing unchanged."""
    if p == 0:
        return ids
    u = np.random.default_rng(seed).random(ids.shape)
    return _add_locality(np.ascontiguousarray(ids, dtype=np.int64), first, u, float(p))


@torch.no_grad()
def top_predictions(scorer: Scorer, block: TokenBlock, lookahead: int, budget: int, batch_rows: int = 1 << 16) -> torch.Tensor:
    """(N, L, budget) the scorer's top-`budget` experts of target layer l+d, predicted at layer l; -1 where
    no layer l exists (target layers below d). Batched over all (token, layer) rows."""
    L, N = block.topk_ids.shape[0], block.tokens
    out = torch.full((N, L, budget), -1, dtype=torch.int64)
    for tok, layer in row_batches(block, list(range(L - lookahead)), batch_rows):
        out[tok, layer + lookahead] = scorer(block, tok, layer).topk(budget, dim=1).indices.cpu()
    return out


def build_stream(ts: TraceSet, seq_ids: np.ndarray, predictors: dict[str, Predictor], lookahead: int, budget: int,
                 locality: float = 0.0, seed: int = 0, max_tokens: int | None = None, progress: bool = True) -> Stream:
    """The sequences `seq_ids` in decode order (shard by shard, as stored), with --locality applied to their
    routing before any predictor sees it, and every predictor's top-`budget` in one pass over the blocks."""
    with_hidden = any(p.needs_hidden for p in predictors.values())
    blocks = SplitBlocks(ts, seq_ids, torch.device("cpu"), shards_per_group=4, with_hidden=with_hidden, keep=False)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "weights", "first", *predictors)}
    total = 0
    bar = tqdm(desc="stream", unit="tok", disable=not progress, dynamic_ncols=True)
    for i, block in enumerate(blocks):
        first = (block.prev < 0).numpy()
        ids = add_locality(block.topk_ids.permute(1, 0, 2).numpy(), first, locality, seed + i)
        block.topk_ids = torch.from_numpy(np.ascontiguousarray(ids.transpose(1, 0, 2)))  # predictors see it too
        parts["ids"].append(ids)
        parts["weights"].append(block.topk_weights.permute(1, 0, 2).numpy())
        parts["first"].append(first)
        for name, pred in predictors.items():
            parts[name].append(top_predictions(pred.scorer, block, lookahead, budget).numpy())
        total += block.tokens
        bar.update(block.tokens)
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    if total == 0:
        raise UserError(f"{ts.dir}: the replayed split holds no token")
    cut = slice(0, min(total, max_tokens or total))
    cat = {k: np.concatenate(v)[cut] for k, v in parts.items()}
    first = cat["first"]
    starts = np.flatnonzero(first)
    position = np.arange(len(first)) - starts[np.cumsum(first) - 1]
    return Stream(ids=np.ascontiguousarray(cat["ids"], dtype=np.int64),
                  weights=np.ascontiguousarray(cat["weights"], dtype=np.float32), first=first, position=position,
                  predictions={k: np.ascontiguousarray(cat[k], dtype=np.int64) for k in predictors})


def static_experts(ts: TraceSet, train_ids: np.ndarray, cache: int) -> np.ndarray:
    """(L, E) bool: each layer's `cache` most used experts on the training split (static-popular)."""
    share = expert_popularity(ts, train_ids).numpy()
    order = np.argsort(-share, axis=1, kind="stable")[:, :cache]
    out = np.zeros(share.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# the kernel


@njit(cache=True)
def next_uses(ids: np.ndarray, E: int) -> np.ndarray:
    """(T, L, K) the next token that uses expert ids[t, l, k] at layer l (T if none): Belady's knowledge."""
    T, L, K = ids.shape
    out = np.empty_like(ids)
    seen = np.full((L, E), T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        for l in range(L):
            for k in range(K):
                out[t, l, k] = seen[l, ids[t, l, k]]
            for k in range(K):
                seen[l, ids[t, l, k]] = t
    return out


@njit(cache=True)
def _key(eviction, last, freq, nxt, T):
    """Eviction priority of a cached expert: the smallest key goes first. LRU: last touch; LFU: fewest
    accesses, then LRU; BELADY: furthest next use, then LRU (the clock stays below 2^40)."""
    if eviction == LFU:
        return (freq << 40) | last
    if eviction == BELADY:
        return ((T - nxt) << 40) | last
    return last


@njit(cache=True)
def _victim(l, C, slot_key, slot_pin, stamp):
    """The slot to free in layer l's full cache, never one pinned with `stamp`; -1 if all are."""
    keys, pins = slot_key[l], slot_pin[l]
    best, best_key = -1, np.iinfo(np.int64).max
    for s in range(C):
        if pins[s] != stamp and keys[s] < best_key:
            best, best_key = s, keys[s]
    return best


@njit(cache=True)
def replay_kernel(ids, pred, n_pred, C, eviction, prefetch, d, resident0, next_use,
                  copy_ms, pre_ms, pred_ms, shared_ms, expert_ms, token_ms,
                  record, log_need, log_demand, log_prefetch):
    """One policy over the stream (module docstring). Returns (T, N_STATS) per-token statistics.

    ids (T, L, K) true experts; pred (T, L, >= n_pred) predicted experts of each target layer (PREDICTED);
    resident0 (L, E) experts cached before the first token (STATIC); next_use (T, L, K) for BELADY.
    With `record`, the schedule is written for a real replay: log_need (T, L, K) the slot each needed
    expert is computed from (-1 - j: staging buffer j); log_demand (T, L, K, 2) and log_prefetch
    (T, L, n_pred, 2) the (expert, slot) copies queued at that step, in queue order, -1 padded.
    """
    T, L, K = ids.shape
    E = resident0.shape[1]
    W = max(C, 1)
    stats = np.zeros((T, N_STATS))
    slot_of = np.full((L, E), -1, dtype=np.int64)      # slot of a cached expert, -1 if not cached
    slot_expert = np.full((L, W), -1, dtype=np.int64)  # expert in a slot
    slot_key = np.zeros((L, W), dtype=np.int64)        # its eviction priority (_key)
    slot_pin = np.zeros((L, W), dtype=np.int64)        # == stamp: protected in this step
    n_used = np.zeros(L, dtype=np.int64)
    freq = np.zeros((L, E), dtype=np.int64)     # accesses since the start (LFU)
    nxt = np.full((L, E), T, dtype=np.int64)    # next use (BELADY)
    arrive = np.zeros((L, E))                   # when the cached copy is (was) complete
    pending = np.zeros((L, E), dtype=np.bool_)  # speculative copy not used yet
    if eviction == STATIC:
        for l in range(L):
            for e in range(E):
                if resident0[l, e] and n_used[l] < C:
                    slot_of[l, e] = n_used[l]
                    slot_expert[l, n_used[l]] = e
                    n_used[l] += 1
    clock = 1        # recency: one tick per touch
    stamp = 0
    link_free = 0.0  # when the copy engine has finished everything queued
    now = 0.0        # when the previous layer's compute ended
    for t in range(T):
        for l in range(L):
            stamp += 1
            r = now + pre_ms  # router done: this layer's experts are known
            runs_predictor = prefetch != NO_PREFETCH and l + d < L
            p = pred_ms if runs_predictor else 0.0
            ready = r + p + shared_ms  # the routed experts could start here
            wait = ready
            for k in range(K):
                e = ids[t, l, k]
                freq[l, e] += 1
                if eviction == BELADY:
                    nxt[l, e] = next_use[t, l, k]
                s = slot_of[l, e]
                if s >= 0:  # pinned before any miss of this step looks for a slot
                    slot_pin[l, s] = stamp
            # 1. hits, and demand fetches of the misses (FIFO behind every queued copy)
            n_staged = 0
            n_dem = 0
            for k in range(K):
                e = ids[t, l, k]
                s = slot_of[l, e]
                if s >= 0:
                    stats[t, HITS] += 1
                    if pending[l, e]:
                        stats[t, SPEC_USED] += 1
                        pending[l, e] = False
                    if arrive[l, e] > ready:
                        stats[t, LATE] += 1
                        wait = max(wait, arrive[l, e])
                else:
                    q = max(r, link_free) + copy_ms
                    link_free = q
                    wait = max(wait, q)
                    stats[t, DEMAND] += 1
                    if eviction != STATIC and C > 0:
                        if n_used[l] < C:
                            s = n_used[l]
                            n_used[l] += 1
                        else:
                            s = _victim(l, C, slot_key, slot_pin, stamp)
                            if s >= 0:
                                old = slot_expert[l, s]
                                slot_of[l, old] = -1
                                if pending[l, old]:
                                    stats[t, SPEC_WASTED] += 1
                                    pending[l, old] = False
                    if s >= 0:
                        slot_of[l, e] = s
                        slot_expert[l, s] = e
                        slot_pin[l, s] = stamp
                        arrive[l, e] = q
                    else:  # no slot can be freed: staging buffer, dropped after this layer
                        stats[t, STAGED] += 1
                        s = -1 - n_staged
                        n_staged += 1
                    if record:
                        log_demand[t, l, n_dem, 0] = e
                        log_demand[t, l, n_dem, 1] = s
                    n_dem += 1
                if s >= 0:  # touched: its priority from this step's clock
                    slot_key[l, s] = _key(eviction, clock, freq[l, e], nxt[l, e], T)
                    clock += 1
                if record:
                    log_need[t, l, k] = s
            # 2. the predictor, then speculative fetches for layer l+d (LRU slots)
            if runs_predictor and C > 0:
                tl = l + d
                issue = r + p
                n_pre = 0
                for j in range(n_pred):
                    e = pred[t, tl, j] if prefetch == PREDICTED else ids[t, tl, j]
                    if e < 0:
                        continue
                    s = slot_of[tl, e]
                    if s < 0:
                        if n_used[tl] < C:
                            s = n_used[tl]
                            n_used[tl] += 1
                        else:  # LRU: this batch's experts are the most recent, so never taken (n_pred <= C)
                            s = _victim(tl, C, slot_key, slot_pin, 0)
                            old = slot_expert[tl, s]
                            slot_of[tl, old] = -1
                            if pending[tl, old]:
                                stats[t, SPEC_WASTED] += 1
                                pending[tl, old] = False
                        q = max(issue, link_free) + copy_ms
                        link_free = q
                        slot_of[tl, e] = s
                        slot_expert[tl, s] = e
                        arrive[tl, e] = q
                        pending[tl, e] = True
                        stats[t, SPEC] += 1
                        if record:
                            log_prefetch[t, l, n_pre, 0] = e
                            log_prefetch[t, l, n_pre, 1] = s
                        n_pre += 1
                    # cached or just queued: the most recent
                    slot_key[tl, s] = _key(eviction, clock, freq[tl, e], nxt[tl, e], T)
                    clock += 1
            # 3. the routed experts, once the shared expert is done and every needed expert is here
            stats[t, STALL_MS] += wait - ready
            now = wait + K * expert_ms
        now += token_ms
        stats[t, END_MS] = now
    for l in range(L):  # speculative copies never used by the end of the stream
        for e in range(E):
            if pending[l, e]:
                stats[T - 1, SPEC_WASTED] += 1
    return stats


# ----------------------------------------------------------------------------------------------
# running a policy and summarising it


@dataclass
class Schedule:
    """What the kernel decided, for a real replay (tools/replay_offload.py)."""
    need: np.ndarray       # (T, L, K) slot each needed expert is computed from; -1 - j: staging j
    demand: np.ndarray     # (T, L, K, 2) (expert, slot) demand copies queued after layer l's router
    prefetch: np.ndarray   # (T, L, m, 2) (expert, slot) speculative copies for layer l+d queued at layer l
    slots: int             # cache slots per layer the schedule uses


def run_policy(policy: Policy, cache: int, stream: Stream, cost: CostModel, lookahead: int, budget: int,
               num_experts: int, predictor_ms: float = 0.0, resident: np.ndarray | None = None,
               record: bool = False) -> tuple[np.ndarray, Schedule | None]:
    """Per-token statistics (T, N_STATS) of `policy` with `cache` slots per layer (and its schedule).
    `resident`: (L, E) experts pinned before the first token (static-popular)."""
    ids = stream.ids
    T, L, K = ids.shape
    E = num_experts
    if policy.all_resident:
        cache, resident = E, np.ones((L, E), dtype=bool)
    if resident is None:
        resident = np.zeros((L, E), dtype=bool)
    if policy.prefetch == PREDICTED:
        pred, n_pred = stream.predictions[policy.name], min(budget, cache)
    else:
        pred, n_pred = np.zeros((1, 1, 1), dtype=np.int64), min(K, cache) if policy.prefetch == ORACLE else 0
    nu = next_uses(ids, E) if policy.eviction == BELADY else np.zeros((1, 1, 1), dtype=np.int64)
    if record:
        logs = (np.full((T, L, K), -1, np.int64), np.full((T, L, K, 2), -1, np.int64),
                np.full((T, L, max(n_pred, 1), 2), -1, np.int64))
    else:
        logs = (np.zeros((1, 1, 1), np.int64), np.zeros((1, 1, 1, 2), np.int64), np.zeros((1, 1, 1, 2), np.int64))
    stats = replay_kernel(ids, pred, n_pred, cache, policy.eviction, policy.prefetch, lookahead, resident, nu,
                          cost.copy_ms, cost.pre_ms, predictor_ms, cost.shared_ms, cost.expert_ms, cost.token_ms,
                          record, *logs)
    return stats, (Schedule(*logs, slots=cache) if record else None)


def summarize(stats: np.ndarray, num_layers: int, top_k: int, expert_bytes: int, warmup: int = 0) -> dict[str, float]:
    """Hit rate, demand misses, bytes (used / wasted) and stall per token, and decode tokens/s, over the
    tokens after `warmup` (wasted speculative bytes are counted when their expert is evicted)."""
    s = stats[warmup:]
    n = s.shape[0]
    start = stats[warmup - 1, END_MS] if warmup else 0.0
    elapsed_ms = stats[-1, END_MS] - start
    tot = s.sum(0)
    accesses = n * num_layers * top_k
    moved = tot[DEMAND] + tot[SPEC]
    return {
        "tokens": int(n), "hit_rate": tot[HITS] / accesses, "demand_misses_per_token": tot[DEMAND] / n,
        "staged_per_token": tot[STAGED] / n, "late_prefetch_hits_per_token": tot[LATE] / n,
        "experts_moved_per_token": moved / n, "speculative_per_token": tot[SPEC] / n,
        "bytes_moved_per_token": moved * expert_bytes / n,
        "bytes_used_per_token": (tot[DEMAND] + tot[SPEC_USED]) * expert_bytes / n,
        "bytes_wasted_per_token": tot[SPEC_WASTED] * expert_bytes / n,
        "stall_ms_per_token": tot[STALL_MS] / n, "ms_per_token": elapsed_ms / n,
        "tokens_per_s": 1e3 * n / elapsed_ms if elapsed_ms > 0 else float("inf"),
    }
