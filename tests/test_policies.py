"""The simulator's policies beyond LRU, each on a tiny stream timed by hand, and budgets, prefill, batch, locality.

Every number asserted here is worked out in the comment above it (units: ms; copy 5 ms per expert, unless said).

    pytest -q tests/test_policies.py
"""
import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from tests.conftest import run_script
from validation.prefetch.budget import lru_hit_curves, slot_pool, split_slots
from validation.prefetch.cost_model import CostModel, ModelShape
from validation.prefetch.locality import locality_summary
from validation.prefetch.simulator import (
    ACCESSES,
    CPU_EXPERTS,
    DEMAND,
    END_MS,
    HITS,
    LATE,
    LOWBIT_COMPUTE,
    LOWBIT_FETCH,
    NO_PREFETCH,
    PLACED,
    POLICIES,
    PREFILL_COPIES,
    PREFILL_MS,
    SCORE,
    SPEC,
    SPEC_USED,
    STALL_MS,
    TOKENS,
    UPGRADE,
    Knobs,
    Policy,
    Stream,
    parse_policy,
    run_policy,
    summarize,
)
from validation.prefetch.workload import as_batch, with_prompts


def stream_of(ids, first=None, predictions=None) -> Stream:
    ids = np.asarray(ids, dtype=np.int64)
    T = ids.shape[0]
    f = np.zeros(T, dtype=bool) if first is None else np.asarray(first, dtype=bool)
    f[0] = True
    starts = np.flatnonzero(f)
    position = np.arange(T) - starts[np.cumsum(f) - 1]
    return Stream(ids=ids, weights=np.ones(ids.shape, np.float32), first=f, position=position,
                  predictions={k: np.asarray(v, dtype=np.int64) for k, v in (predictions or {}).items()})


def one_expert(seq) -> Stream:
    return stream_of(np.array(seq).reshape(-1, 1, 1))


def cost(copy=5.0, pre=1.0, shared=0.0, expert=1.0, **kw) -> CostModel:
    """copy_ms = 1000 bytes / link * 1e3 = `copy`; an activation of `act_bytes` takes act_bytes / 200 ms at copy 5."""
    return CostModel(expert_bytes=1000, link_bytes_per_s=1000 / copy * 1e3, pre_ms=pre, shared_ms=shared,
                     expert_ms=expert, **kw)


def hits(stats) -> list[int]:
    return stats[:, HITS].astype(int).tolist()


# ----------------------------------------------------------------------------------------------
# CPU compute of misses


def test_cpu_compute_overlaps_the_gpu_hits_and_the_layer_waits_for_both():
    # one layer, experts 0 (placed on the GPU) and 1 (a miss, computed on the host); pre 1, shared 1, expert 1,
    # CPU 3 ms, activations 0.5 ms each way (100 bytes at 200 bytes/ms)
    # router at 1; GPU: ready 2, the hit runs 2..3. CPU: hidden state down 1..1.5, expert 1.5..4.5, result up 5.0
    # the layer ends at max(3, 5) = 5; stall = 5 - (2 + 1) = 2
    s = stream_of([[[0, 1]]])
    c = cost(pre=1, shared=1, expert=1, cpu_expert_ms=3, cpu_token_ms=3, activation_bytes=100)
    resident = np.array([[True, False]])
    stats, _ = run_policy(POLICIES["cpu-compute"], 1, s, c, 1, 2, 2, resident=resident)
    assert stats[0, END_MS] == pytest.approx(5.0) and stats[0, STALL_MS] == pytest.approx(2.0)
    assert (stats[0, HITS], stats[0, CPU_EXPERTS], stats[0, DEMAND]) == (1, 1, 0)
    # a fast host (0.5 ms): the CPU is done at 2.5, before the GPU's 3: no stall
    fast, _ = run_policy(POLICIES["cpu-compute"], 1, s, cost(pre=1, shared=1, expert=1, cpu_expert_ms=0.5,
                                                            activation_bytes=100), 1, 2, 2, resident=resident)
    assert fast[0, END_MS] == pytest.approx(3.0) and fast[0, STALL_MS] == 0
    # only the activations crossed the link: 2 x 100 bytes, no expert
    r = summarize(stats, 1, 2, 1000, activation_bytes=100)
    assert r["bytes_moved_per_token"] == 200 and r["cpu_share"] == 0.5


def test_cpu_work_grows_with_the_tokens_routed_to_the_missed_expert():
    # two lanes at one step: lane 0 routed to 0 and 1, lane 1 to 1 and 2; 0 and 2 placed, 1 a miss for 2 tokens
    # CPU 3 ms for the first token + 2 ms for the second; activations 0.5 ms per token each way: 1 ms down, 1 ms up
    # router at 1; CPU 2..7, results up at 8; GPU ready 2, two hits 2..4; end 8, stall 8 - 4 = 4
    s = Stream(ids=np.array([[[0, 1, 1, 2]]]), weights=np.ones((1, 1, 4), np.float32), first=np.array([True]),
               position=np.zeros(1, np.int64), lanes=2)
    c = cost(pre=1, shared=1, expert=1, cpu_expert_ms=3, cpu_token_ms=2, activation_bytes=100)
    resident = np.array([[True, False, True]])
    stats, _ = run_policy(POLICIES["cpu-compute"], 2, s, c, 1, 2, 3, resident=resident)
    assert stats[0, END_MS] == pytest.approx(8.0) and stats[0, STALL_MS] == pytest.approx(4.0)
    assert (stats[0, ACCESSES], stats[0, HITS], stats[0, CPU_EXPERTS], stats[0, TOKENS]) == (3, 2, 1, 2)


def test_cpu_compute_with_prefetch_computes_the_residual_misses_on_the_host():
    # two layers, one expert each; nothing placed: only the prefetch fills the cache (1 slot per layer)
    # pre 1, shared 0, expert 1, copy 5, CPU 2 ms, no activation time, predictor 0.5 ms
    # layer 0: router 1; expert 0 misses: host 1..3; predictor to 1.5, prefetch of layer 1's expert 1: 1.5..6.5;
    #          no GPU expert: the layer ends with the host at 3 (stall 3 - 1.5)
    # layer 1: router 4, expert 1 in flight until 6.5: late hit, stall 2.5, ends 7.5
    s = stream_of([[[0], [1]]], predictions={"prefetch:router-reuse": [[[-1], [1]]]})
    c = cost(cpu_expert_ms=2, cpu_token_ms=2)
    stats, _ = run_policy(parse_policy("cpu-compute+prefetch"), 1, s, c, 1, 1, 2, predictor_ms=0.5)
    assert stats[0, END_MS] == pytest.approx(7.5) and stats[0, STALL_MS] == pytest.approx(1.5 + 2.5)
    assert (stats[0, CPU_EXPERTS], stats[0, SPEC], stats[0, SPEC_USED], stats[0, LATE], stats[0, HITS]) == (1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# eviction rules


@pytest.mark.parametrize("decay,expected", [
    # A A A B C A B, two slots. At t4 C must evict A or B:
    #   decay 0.9: A's count at t2 is (1 x 0.9 + 1) x 0.9 + 1 = 2.71, worth 2.71 x 0.81 = 2.20 at t4; B's 1 x 0.9
    #   = 0.9: B goes (as LFU would), A hits at t5; at t6 B evicts C (0.81 against A's 2.98 x 0.9)
    (0.9, [0, 1, 1, 0, 0, 1, 0]),
    #   decay 0.5: A's 1.75 x 0.25 = 0.44 against B's 0.5: A goes (as LRU would); at t5 A evicts B (0.25 < C's 0.5)
    (0.5, [0, 1, 1, 0, 0, 0, 0]),
])
def test_lfru_weighs_uses_by_their_age(decay, expected):
    stats, _ = run_policy(POLICIES["lfru"], 2, one_expert([0, 0, 0, 1, 2, 0, 1]), cost(), 1, 1, 3,
                          knobs=Knobs(lfru_decay=decay))
    assert hits(stats) == expected


def test_least_stale_evicts_the_expert_most_overdue_for_its_reuse():
    # 0 0 1 0 2 0, two slots, E = 3, top-1: an expert never reused has the prior gap E / K = 3; alpha 0.25
    # t1: 0's first gap 1. t3: its gap 0.75 x 1 + 0.25 x 2 = 1.25. t4: 2 misses; 0 is (4 - 3) / 1.25 = 0.8 of its
    # gap past its last use, 1 is (4 - 2) / 3 = 0.67: 0 is the stalest and goes (LRU and LFU evict 1); t5: 0 misses
    stats, _ = run_policy(POLICIES["least-stale"], 2, one_expert([0, 0, 1, 0, 2, 0]), cost(), 1, 1, 3)
    assert hits(stats) == [0, 1, 0, 1, 0, 0]
    lru, _ = run_policy(POLICIES["on-demand"], 2, one_expert([0, 0, 1, 0, 2, 0]), cost(), 1, 1, 3)
    assert hits(lru) == [0, 1, 0, 1, 0, 1]


def test_evict_by_score_keeps_what_the_scorer_expects_soon():
    # 0 1 2 1, two slots: at t2, 2 evicts the cached expert with the lower score at (t1, layer 0): the previous
    # token's, since t2's own are computed after t2's router (off the critical path); t2's say the opposite
    scorer = Policy("evict:scores.pth", SCORE, NO_PREFETCH, evict_source="scores.pth")
    s = one_expert([0, 1, 2, 1])
    for keep, want in ((1, [0, 0, 0, 1]), (0, [0, 0, 0, 0])):
        scores = np.zeros((4, 1, 3), np.float32)
        scores[1, 0, keep] = 1.0
        scores[2, 0, 1 - keep] = 1.0
        s.scores = {"evict:scores.pth": scores}
        stats, _ = run_policy(scorer, 2, s, cost(), 1, 1, 3)
        assert hits(stats) == want, keep


def test_the_eviction_scorer_runs_beside_the_copies_not_before_them():
    # one layer, one slot, experts 0 0 1: pre 1, scorer 2, expert 1, copy 5. The scorer runs after the router:
    # t0: router at 1, the copy of 0 lands at 6 while the scorer runs 1..3: the expert at 6..7 (stall 3).
    # t1: a hit; router at 8, scorer 8..10, expert 10..11 (its time is paid when no copy hides it).
    # t2: router at 12, copy of 1 12..17 (scorer 12..14 beside it): expert 17..18.
    # Had the scorer sat before the router, the copies would start 2 ms later (t0 ends at 9, t2 at 22).
    pol = Policy("evict:scores.pth", SCORE, NO_PREFETCH, evict_source="scores.pth")
    s = one_expert([0, 0, 1])
    s.scores = {"evict:scores.pth": np.zeros((3, 1, 2), np.float32)}
    stats, _ = run_policy(pol, 1, s, cost(), 1, 1, 2, evict_ms=2.0)
    assert stats[:, END_MS].tolist() == [7.0, 11.0, 18.0]
    assert stats[:, STALL_MS].tolist() == [3.0, 0.0, 3.0]


def test_a_sequence_start_evicts_by_no_score_of_the_last_sequence():
    # 0 1 2 1, two slots, a new sequence at t2: t1's scores (keep 0) belong to the last sequence, whose last token
    # the engine never scores for the next one's first step: none there, LRU evicts 0 and 1 hits at t3. Without
    # the sequence start, t1's scores evict 1, which misses at t3.
    pol = Policy("evict:scores.pth", SCORE, NO_PREFETCH, evict_source="scores.pth")
    scores = np.zeros((4, 1, 3), np.float32)
    scores[1, 0, 0] = 1.0
    for first, want in (([1, 0, 1, 0], [0, 0, 0, 1]), ([1, 0, 0, 0], [0, 0, 0, 0])):
        s = stream_of(np.array([0, 1, 2, 1]).reshape(-1, 1, 1), first=first)
        s.scores = {"evict:scores.pth": scores}
        stats, _ = run_policy(pol, 2, s, cost(), 1, 1, 3)
        assert hits(stats) == want, first
    assert scores[1, 0, 0] == 1.0  # the caller's scores are left as they were


def test_a_prefetch_evicts_by_the_newest_score_that_exists_when_it_is_issued():
    # two layers, top-1, two slots each; layer 0 uses 0 throughout, layer 1 uses 0 1 2 0; at t2 layer 0 prefetches
    # layer 1's expert 2 into a full cache {0, 1}. The score of layer 1 from row (t2, 1) needs t2's input at layer 1,
    # which does not exist yet: the victim is chosen by t1's scores (keep 0: 1 goes, 0 hits at t3), not by t2's
    # (keep 1: 0 would go and miss at t3), nor by recency (0, the least recently used, would go)
    pol = parse_policy("evict:scores.pth+prefetch:router-reuse")
    s = stream_of([[[0], [0]], [[0], [1]], [[0], [2]], [[0], [0]]],
                  predictions={pol.prefetch_key: [[[-1], [-1]], [[-1], [-1]], [[-1], [2]], [[-1], [-1]]]})
    scores = np.zeros((4, 2, 3), np.float32)
    scores[1, 1, 0] = 1.0  # t1: expert 0 of layer 1 used soon
    scores[2, 1, 1] = 1.0  # t2: expert 1
    s.scores = {pol.evict_key: scores}
    stats, _ = run_policy(pol, 2, s, cost(), 1, 1, 3)
    assert hits(stats) == [0, 1, 2, 2] and stats[2, SPEC] == 1
    lru, _ = run_policy(parse_policy("on-demand+prefetch:router-reuse"), 2, s, cost(), 1, 1, 3)
    assert hits(lru) == [0, 1, 2, 1]


def test_the_oracle_next_use_score_is_belady():
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((200, 2, 8)), axis=2)[:, :, :2]
    s = stream_of(ids)
    for C in (2, 3, 5):
        a, _ = run_policy(POLICIES["evict:oracle-next-use"], C, s, cost(), 1, 1, 8)
        b, _ = run_policy(POLICIES["belady"], C, s, cost(), 1, 1, 8)
        assert np.array_equal(a, b)


def test_frequency_window_score_counts_the_last_steps():
    from validation.prefetch.simulator import window_count_scores

    ids = np.array([0, 0, 1, 1, 1, 0]).reshape(-1, 1, 1)
    sc = window_count_scores(ids, 2, 2)[:, 0]  # (T, E) uses among the last 2 steps
    assert sc.tolist() == [[1, 0], [2, 0], [1, 1], [0, 2], [0, 2], [1, 1]]


def test_oracle_window_score_counts_the_next_steps_once_per_step():
    from validation.prefetch.simulator import oracle_window_scores

    ids = np.array([0, 0, 1, 1, 1, 0]).reshape(-1, 1, 1)
    sc = oracle_window_scores(ids, 2, 2)[:, 0]  # (T, E) uses among the next 2 steps (t+1, t+2)
    assert sc.tolist() == [[1, 1], [0, 2], [0, 2], [1, 1], [1, 0], [0, 0]]
    two = np.array([[1, -1], [0, 0], [0, 1]]).reshape(3, 1, 2)  # two lanes on one expert: one step
    assert oracle_window_scores(two, 2, 1)[:, 0].tolist() == [[1, 0], [1, 1], [0, 0]]


def test_oracle_window_evicts_by_the_next_window_and_its_horizon_matters():
    from validation.prefetch.simulator import Knobs

    # C = 2, experts 0 1 2 0 1: at step 2 expert 2 misses with {0, 1} cached, and evicts by step 1's scores (the
    # previous token's, as a learned scorer's). Window 1 from step 1 sees only step 2 (expert 2): 0 and 1 tie, LRU
    # evicts 0, which misses at step 3 and evicts 1 (step 2's window sees 0 alone): nothing hits. Window 2 from
    # step 1 sees steps 2 and 3: 0 scores 1, 1 scores 0, 1 goes, and 0 hits at step 3. LRU evicts 0, then 1.
    s = one_expert([0, 1, 2, 0, 1])
    pol = POLICIES["evict:oracle-window"]
    assert hits(run_policy(pol, 2, s, cost(), 1, 1, 3, knobs=Knobs(evict_window=1))[0]) == [0, 0, 0, 0, 0]
    assert hits(run_policy(pol, 2, s, cost(), 1, 1, 3, knobs=Knobs(evict_window=2))[0]) == [0, 0, 0, 1, 0]
    assert hits(run_policy(POLICIES["on-demand"], 2, s, cost(), 1, 1, 3)[0]) == [0, 0, 0, 0, 0]
    assert not pol.realizable and not parse_policy("evict:oracle-window+prefetch").realizable


# ----------------------------------------------------------------------------------------------
# placements


def test_static_frequency_recomputes_its_resident_set_every_window_and_copies_the_change():
    # one slot, expert 0 placed; window 2; 1 1 0 0 0; pre 1, shared 0, expert 1, copy 5
    # t0: 1 staged 1..6, ends 7. t1: staged 8..13, ends 14. t2: the window (1, 1) places 1: copy 14..19;
    #     0 misses: staged behind it 19..24, ends 25. t3: staged 26..31, ends 32.
    # t4: the window (0, 0) places 0 back: copy 32..37; 0 hits late, ends 38
    s = one_expert([1, 1, 0, 0, 0])
    stats, _ = run_policy(POLICIES["static-frequency"], 1, s, cost(), 1, 1, 2, resident=np.array([[True, False]]),
                          knobs=Knobs(static_window=2))
    assert stats[:, END_MS].tolist() == pytest.approx([7, 14, 25, 32, 38])
    assert stats[:, PLACED].tolist() == [0, 0, 1, 0, 1] and hits(stats) == [0, 0, 0, 0, 1]
    assert stats[:, DEMAND].tolist() == [1, 1, 1, 1, 0]
    assert summarize(stats, 1, 1, 1000)["bytes_moved_per_token"] == (4 + 2) * 1000 / 5  # demand + placements


def test_lowbit_copy_first_full_copy_once_hot():
    # one slot; 0 0 0 0; full copy 4 ms, low-bit copy 1 ms (250 of 1000 bytes); hot after 1 use of the low copy
    # t0: router 1, low-bit copy 1..2, computed low, ends 3. t1: router 4, low hit (low), hot: the full copy 4..8;
    # t2: router 6, the full copy still in flight: low again, ends 7. t3: router 8: the full copy is in: full
    c = cost(copy=4, lowbit_bytes=250)
    stats, _ = run_policy(POLICIES["lowbit-on-miss"], 1, one_expert([0, 0, 0, 0]), c, 1, 1, 1,
                          knobs=Knobs(hot_uses=1))
    assert stats[:, END_MS].tolist() == pytest.approx([3, 5, 7, 9])
    assert stats[:, LOWBIT_COMPUTE].tolist() == [1, 1, 1, 0] and stats[:, UPGRADE].tolist() == [0, 1, 0, 0]
    assert stats[:, LOWBIT_FETCH].tolist() == [1, 0, 0, 0]
    r = summarize(stats, 1, 1, 1000, lowbit_bytes=250)
    assert r["bytes_moved_per_token"] == (250 + 1000) / 4 and r["lowbit_share"] == 0.75


# ----------------------------------------------------------------------------------------------
# the registry


def test_combinations_and_their_refusals():
    p = parse_policy("evict:frequency-window+prefetch:router-reuse")
    assert (p.eviction, p.prefetch, p.prefetch_key) == (SCORE, 1, "prefetch:router-reuse")
    assert parse_policy("static-frequency+cpu-compute").placement == "popular"
    assert parse_policy("cpu-compute+prefetch").source == "router-reuse"
    assert not parse_policy("evict:oracle-next-use+prefetch").realizable and parse_policy("lfru+prefetch").realizable
    assert parse_policy("lowbit-on-miss").replayable is False and parse_policy("belady").replayable
    for bad, msg in (("lfru+lfu", "two eviction parts"), ("cpu-compute+lowbit-on-miss", "two miss parts"),
                     ("lfu+cpu-compute", "only a placement"), ("static-popular+prefetch", "static cache takes no"),
                     ("evict:nothing", "neither a checkpoint"), ("lru+x", "unknown part")):
        with pytest.raises(UserError, match=msg):
            parse_policy(bad)


# ----------------------------------------------------------------------------------------------
# budgets


def test_gpu_budget_pays_the_kv_cache_first():
    # 2 attention layers x 1024 bytes per token; 4 MoE layers of 1 MiB experts; 8 replayed layers of 8 experts
    shape = ModelShape("p", "x", 8, 4, False, 0, 8, 2, 2, 4, 2, 0, kv_per_layer=(1024, 1024), kv_window=(0, 0))
    pool, info = slot_pool(0.5, 8192, shape, 2**20, 8, 8)  # KV: 8192 tokens x 2 KiB = 16 MiB
    # (512 MiB - 16 MiB) / (4 layers x 1 MiB) = 124 slots per MoE layer, x 8 layers, capped at 8 x 8
    assert info["kv_bytes"] == 16 * 2**20 and pool == 64
    pool, _ = slot_pool(0.03, 8192, shape, 2**20, 8, 8)  # 30.72 MiB - 16: 3.68 per layer x 8
    assert pool == 29
    with pytest.raises(UserError, match="less than one .* expert slot per MoE layer"):
        slot_pool(0.018, 8192, shape, 2**20, 8, 8)  # 2.43 MiB: 0.61 per layer x 8 < 8


def test_budget_splits():
    assert split_slots(7, "uniform", 3, 4).tolist() == [3, 2, 2]
    share = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]])
    # each layer's best expert first; then the most used pairs: (1, 1) 0.35, (0, 1) 0.3, (1, 2) 0.25
    assert split_slots(4, "popularity", 2, 3, popularity=share).tolist() == [2, 2]
    assert split_slots(5, "popularity", 2, 3, popularity=share).tolist() == [2, 3]
    curves = np.array([[0, 10, 12, 13], [0, 5, 11, 12]])
    # from (1, 1): the third slot to layer 1 (gains 6 > 2); the fourth to layer 0 (2 > 1); the fifth: 1 = 1, the
    # lower layer
    assert split_slots(3, "optimised", 2, 3, hit_curves=curves).tolist() == [1, 2]
    assert split_slots(4, "optimised", 2, 3, hit_curves=curves).tolist() == [2, 2]
    assert split_slots(5, "optimised", 2, 3, hit_curves=curves).tolist() == [3, 2]
    # a flat stretch before a rise: layer 0's next 3 slots gain 20, 6.7 per slot, more than layer 1's best 3 per
    # slot, so they go together (one slot at a time would starve layer 0: [1, 4], 21 hits instead of 35)
    assert split_slots(5, "optimised", 2, 4, hit_curves=np.array([[0, 10, 10, 10, 30], [0, 5, 8, 10, 11]])).tolist() \
        == [4, 1]


def test_lru_hit_curves_are_stack_distances():
    # A B A C B: A again after 1 other expert (a hit from 2 slots), B after 2 others (from 3 slots)
    ids = np.array([0, 1, 0, 2, 1]).reshape(-1, 1, 1)
    assert lru_hit_curves(ids, 3).tolist() == [[0, 0, 1, 2]]
    # the curves agree with the kernel's LRU at every size (one expert per step: no pinning difference)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, (300, 2, 1))
    curves = lru_hit_curves(ids, 6)
    for c in range(7):
        stats, _ = run_policy(POLICIES["on-demand"], c, stream_of(ids), cost(), 1, 1, 6)
        assert stats[:, HITS].sum() == curves[:, c].sum()


# ----------------------------------------------------------------------------------------------
# prefill and batch


def test_prefill_streams_each_layer_through_two_buffers():
    # three layers, experts 0..5; one request: a prompt of 2 tokens, then 1 decoded token; static-popular with
    # expert 5 placed at layers 0 and 2, expert 1 at layer 1; pre 1, shared 0, expert 1, copy 5, prefill 0 per token
    # prompt: layer 0 needs {0, 3} (2 copies), layer 1 {1} (placed), layer 2 {2, 0} (2 copies)
    # layer 0: copies 0..5..10, compute 1 + 2 = 3: ends 13. layer 1: nothing to copy, ends 15.
    # layer 2: its buffer is free when layer 0 ends (13): copies 13..18..23, ends 26 (without the two-buffer
    #          limit they would run 10..20 and it would end at 23)
    # decode: 5, 1, 5 all placed: three layers of 2 ms each, 26..32
    ids = [[[0], [1], [2]], [[3], [1], [0]], [[5], [1], [5]]]
    s = with_prompts(stream_of(ids), 2, 6)
    assert s.tokens == 1 and s.prompt_len.tolist() == [2] and s.prompt_at.tolist() == [[0]]
    resident = np.zeros((3, 6), bool)
    resident[[0, 1, 2], [5, 1, 5]] = True
    stats, _ = run_policy(POLICIES["static-popular"], 1, s, cost(), 1, 1, 6, resident=resident)
    assert stats[0, PREFILL_MS] == pytest.approx(26) and stats[0, PREFILL_COPIES] == 4
    assert stats[0, END_MS] == pytest.approx(32) and hits(stats) == [3]
    r = summarize(stats, 3, 1, 1000)
    assert r["tokens_per_s"] == pytest.approx(1e3 / 6) and r["prefill_tokens_per_s"] == pytest.approx(2e3 / 26)
    assert r["prefill_bytes"] == 4000


def test_batch_lanes_need_the_union_of_their_experts():
    # two requests dealt to two lanes; one layer; lane 0: 0 1, lane 1: 0 2 -> step 0 needs {0} (2 tokens),
    # step 1 {1, 2}; two slots, pre 1, shared 0, expert 1 per distinct expert, copy 5
    # step 0: router 1, copy 1..6, one expert 6..7. step 1: router 8, copies 8..13..18, two experts: 20
    s = as_batch(stream_of(np.array([0, 1, 0, 2]).reshape(-1, 1, 1), first=[1, 0, 1, 0]), 2)
    assert s.ids[:, 0].tolist() == [[0, 0], [1, 2]] and s.lanes == 2
    stats, _ = run_policy(POLICIES["on-demand"], 2, s, cost(), 1, 1, 3)
    assert stats[:, END_MS].tolist() == pytest.approx([7, 20])
    assert stats[:, ACCESSES].tolist() == [1, 2] and stats[:, TOKENS].tolist() == [2, 2]
    assert summarize(stats, 1, 1, 1000)["tokens_per_s"] == pytest.approx(4 / 20 * 1e3)


# ----------------------------------------------------------------------------------------------
# locality


def test_locality_summary_by_hand():
    # two sequences (t0..t2, t3); top-2 of 4 experts, one layer
    # previous-token recall: t1 keeps 1 of {0, 1} (0.5), t2 keeps both (1.0): 0.75; t3 starts a sequence
    # reuse distances: 1 at t1, 1 and 1 at t2, 3 for expert 0 at t3: median 1
    # counts 0:2 1:3 2:2 3:1, the top quarter (1 expert) takes 3 of 8
    ids = np.array([[0, 1], [1, 2], [1, 2], [3, 0]]).reshape(4, 1, 2)
    loc = locality_summary(ids, np.array([True, False, False, True]), 4)
    assert loc["previous_token_recall"] == 0.75 and loc["median_reuse_distance"] == 1
    assert loc["top25_share"] == 3 / 8


# ----------------------------------------------------------------------------------------------
# the script: budgets, CPU, prefill, batch, bad input, the map


def test_script_reports_budget_prefill_batch_and_locality(tiny_traces, tmp_path):
    from scripts.simulate_prefetch import main

    js = tmp_path / "s.json"
    main(["--traces", str(tiny_traces), "--policies", "on-demand,cpu-compute,lfru,least-stale,lowbit-on-miss",
          "--gpu-gib", "3.5", "--context", "256", "--split", "optimised", "--cpu-expert-ms", "0.25",
          "--prompt-tokens", "8", "--batch", "2", "--json", str(js), "--plot", str(tmp_path / "s.png")])
    res = json.loads(js.read_text())
    assert res["simulated"] and 0 < res["routing_locality"]["previous_token_recall"] < 1
    caps = res["gpu_budget"]["slots_per_layer"]
    assert sum(caps) == res["gpu_budget"]["slot_pool"] and len(caps) == 8
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["cpu-compute"]["cpu_share"] > 0 and rows["lowbit-on-miss"]["lowbit_share"] > 0
    assert all(r["prefill_tokens_per_s"] > 0 and r["cache_per_layer"] == caps for r in res["rows"])


def test_the_low_bit_copy_defaults_below_the_experts_format_and_int2_has_none(tiny_traces, tmp_path):
    """Without --lowbit-format, lowbit-on-miss fetches the widest format narrower than the experts' (an NF4 run's
    default policy list used to stop on its own lowbit-on-miss); int2 experts have none, and the default list
    leaves the policy out."""
    from scripts.simulate_prefetch import main
    from validation.prefetch.cost_model import lowbit_below

    assert [lowbit_below(f) for f in ("fp16", "bf16", "nf4", "int2")] == ["nf4", "nf4", "int2", None]
    out = {}
    for fmt in ("nf4", "int2"):
        js = tmp_path / f"{fmt}.json"
        main(["--traces", str(tiny_traces), "--expert-format", fmt, "--cache-experts", "4", "--max-tokens", "40",
              "--json", str(js), "--plot", str(tmp_path / f"{fmt}.png")])
        out[fmt] = json.loads(js.read_text())
    assert out["nf4"]["args"]["lowbit_format"] == "int2"
    assert out["nf4"]["cost_model"]["lowbit_bytes"] == out["int2"]["cost_model"]["expert_bytes"]
    assert "lowbit-on-miss" in {r["policy"] for r in out["nf4"]["rows"]}
    assert "lowbit-on-miss" not in {r["policy"] for r in out["int2"]["rows"]}
    assert "on-demand" in {r["policy"] for r in out["int2"]["rows"]}


BAD = [
    (["--gpu-gib", "0.01"], "--gpu-gib 0.01: "),
    (["--gpu-gib", "8", "--cache-experts", "8"], "--cache-experts 8 and --gpu-gib 8.0: give one"),
    (["--policies", "cpu-compute", "--cpu-expert-ms", "0"], "--cpu-expert-ms 0.0: "),
    (["--policies", "cpu-compute"], "give --cpu-expert-ms"),
    (["--policies", "lowbit-on-miss", "--expert-format", "int2"], "must be smaller than the expert"),
    (["--policies", "lowbit-on-miss", "--expert-format", "nf4", "--lowbit-format", "nf4"], "must be smaller than"),
    (["--map", "--map-budgets", ""], "--map-budgets is empty"),
    (["--map", "--map-links", "pcie4,serial"], "unknown link 'serial'"),
    (["--map", "--engine-costs", "ENGINE"], "needs numbers pre_ms, shared_ms, expert_ms"),
    (["--model-config", "broken-preset"], "--model-config broken-preset: its fields do not make a qwen2_moe config"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line(argv, message, tiny_traces, tmp_path, monkeypatch):
    from models import moe_configs
    from scripts.simulate_prefetch import main

    monkeypatch.setitem(moe_configs.PRESETS, "broken-preset",
                        {**moe_configs.QWEN15_MOE_A27B, "moe_intermediate_size": None})
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"pre_ms": 0.1, "shared_ms": 0.05}))  # expert_ms missing
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        main([*[a.replace("ENGINE", str(engine)) for a in argv], "--traces", str(tiny_traces), "--output-dir", str(out)])
    assert not out.exists()


def test_the_maps_engine_profile_reads_the_engines_benchmark(tmp_path):
    """--engine-costs with tools/bench_offload.py's JSON: the phases its on-demand row measured on the engine itself
    (the committed H100 run: 0.858 + 0.155 + 4 x 0.084 ms per layer, 4.92 ms per token outside the layers)."""
    from validation.prefetch.policy_map import engine_phases

    bench = Path(__file__).resolve().parent.parent / "docs/results/offload/bench_quick_h100_2026-12-07.json"
    phases, source = engine_phases(str(bench))
    assert phases == pytest.approx((0.8584, 0.1554, 0.0836, 4.9225), abs=1e-4)
    assert "fp16 C=15 on-demand (own routing)" in source and "H100" in source
    rows = json.loads(bench.read_text())
    rows["rows"] = [r for r in rows["rows"] if "on-demand (own routing)" not in r["label"]]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="without a calibrated 'on-demand \\(own routing\\)' row"):
        engine_phases(str(tmp_path / "b.json"))
    for bad in ("NaN", "Infinity"):  # Python's json reads both: refused here, not after the map has run
        (tmp_path / "n.json").write_text(f'{{"pre_ms": {bad}, "shared_ms": 0.1, "expert_ms": 0.01}}')
        with pytest.raises(UserError, match="finite numbers >= 0"):
            engine_phases(str(tmp_path / "n.json"))


def test_the_map_names_a_best_policy_per_cell(tiny_traces, tmp_path):
    engine = tmp_path / "engine.json"  # an engine's measured phases per expert format
    engine.write_text(json.dumps({"cost_models": {"fp16": {"pre_ms": 0.1, "shared_ms": 0.04, "expert_ms": 0.01}}}))
    proc = run_script("simulate_prefetch", "--traces", tiny_traces, "--map", "--map-links", "pcie4,nvlink-c2c",
                      "--map-budgets", "0.1,0.3", "--map-localities", "0,0.6", "--map-batches", "1,2",
                      "--cpu-expert-ms", "0.25", "--engine-costs", engine, "--output-dir", tmp_path)
    res = json.loads((tmp_path / "prefetch_map.json").read_text())
    assert len(res["cells"]) == 2 * 2 * 2 * 2 * 2 and res["simulated"]
    exact = {p for p in res["policies"] if parse_policy(p).realizable and parse_policy(p).exact}
    for c in res["cells"]:  # the best real full-precision policy; the low-bit one beside it
        assert c["best"] in exact and c["tokens_per_s"][c["best"]] == max(c["tokens_per_s"][p] for p in exact)
        assert c["lowbit_over_best"] == pytest.approx(c["tokens_per_s"]["lowbit-on-miss"] / c["best_tokens_per_s"])
        assert c["speedup_vs_lru"] == pytest.approx(c["best_tokens_per_s"] / c["tokens_per_s"]["on-demand"])
    assert set(res["routing_locality"]) == {"0.0", "0.6"} and res["engine_costs"].startswith("the engine's measured")
    assert res["routing_locality"]["0.6"]["previous_token_recall"] > res["routing_locality"]["0.0"]["previous_token_recall"]
    assert "all figures simulated" in proc.stdout and (tmp_path / "prefetch_map.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# learned eviction: a checkpoint predicting the next tokens' experts


def _checkpoint(tiny_traces, path, **extra):
    import torch

    from collection.traces.format import TraceSet
    from collection.traces.rows import split_sequences
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    ts = TraceSet(tiny_traces)
    cfg = PredictorConfig(kind="layer-aware", input_dim=128, num_experts=60, top_k=4, num_layers=8, **extra)
    torch.manual_seed(0)
    save_checkpoint(path, build_predictor(cfg), cfg, split_sequences(ts.sequence_table(), 0), {}, {}, {})
    return path


def test_evict_needs_a_next_tokens_predictor(tiny_traces, tmp_path):
    from scripts.simulate_prefetch import main

    ckpt = _checkpoint(tiny_traces, tmp_path / "d1" / "best_checkpoint.pth", lookahead=1)
    with pytest.raises(UserError, match="not the next tokens'"):
        main(["--traces", str(tiny_traces), "--policies", f"evict:{ckpt}", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_evict_with_a_next_tokens_checkpoint_replays(tiny_traces, tmp_path, monkeypatch):
    """A random model of the next-tokens config (lookahead_tokens > 0): its scores drive the eviction, alone and
    with prefetch. Where this version's PredictorConfig lacks the field, a config class that has it stands in."""
    import dataclasses

    from models import checkpoint, predictors
    from scripts.simulate_prefetch import main

    if "lookahead_tokens" not in predictors.PredictorConfig.__dataclass_fields__:
        @dataclasses.dataclass
        class NextTokens(predictors.PredictorConfig):
            lookahead_tokens: int = 0
        monkeypatch.setattr(predictors, "PredictorConfig", NextTokens)
        monkeypatch.setattr(checkpoint, "PredictorConfig", NextTokens)
    ckpt = _checkpoint(tiny_traces, tmp_path / "next" / "best_checkpoint.pth", lookahead=0, lookahead_tokens=4)
    js = tmp_path / "s.json"
    main(["--traces", str(tiny_traces), "--policies", f"on-demand,evict:{ckpt},evict:{ckpt}+prefetch:router-reuse",
          "--cache-experts", "8", "--json", str(js), "--plot", str(tmp_path / "s.png")])
    rows = {r["policy"]: r for r in json.loads(js.read_text())["rows"]}
    assert 0 < rows[f"evict:{ckpt}"]["hit_rate"] < 1 and rows[f"evict:{ckpt}"]["label"].startswith("evict:layer-aware")


@pytest.mark.parametrize("fmt", ["bf16", "nf4"])
def test_measure_cpu_times_the_presets_expert(fmt):
    """--measure-cpu's timing of one expert (a test model's shape; the numbers are this machine's, not asserted)."""
    from validation.prefetch.cost_model import model_shape
    from validation.prefetch.cpu_cost import measure_cpu_expert

    m = measure_cpu_expert(model_shape("tiny-qwen2_moe"), fmt, 1, tokens=4, repeats=3)
    assert m["cpu_expert_ms"] > 0 and m["cpu_token_ms"] >= 0 and m["cpu_tokens_timed"] == 4
    with pytest.raises(UserError, match="for int2 give --cpu-expert-ms"):
        measure_cpu_expert(model_shape("tiny-qwen2_moe"), "int2", 1)
