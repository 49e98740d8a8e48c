"""The routing report's numbers, against hand computations on a routing small enough to do on paper, and the same
numbers from a collected set and from its routing imported through an engine's layout.

    pytest -q tests/test_routing_report.py
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from collection.traces.format import TraceSet
from validation import routing_report as rr
from validation.coverage.metrics import true_expert_ranks

# E = 4 experts, top-2, two identical MoE layers, two sequences of 4 tokens (layer 0 below; layer 1 the same).
#   t:      0      1      2      3   |   4      5      6      7
#   ids:  (0,1)  (0,2)  (0,1)  (3,2) | (0,1)  (1,2)  (1,0)  (3,0)
# The cut is the second sequence's start: tokens 0-3 fit, 4-7 are measured.
LAYER0 = [(0, 1), (0, 2), (0, 1), (3, 2), (0, 1), (1, 2), (1, 0), (3, 0)]
IDS = np.repeat(np.array(LAYER0)[:, None, :], 2, axis=1)


@pytest.fixture(scope="module")
def hand() -> dict:
    r = rr.make_routing(IDS, [4, 4], 4)
    assert r.cut == 4
    return rr.analyze(r, [2, 4])


def test_popularity_shares_by_hand(hand):
    """Activations: expert 0: 6, 1: 5, 2: 3, 3: 2 of 16."""
    o = hand["skew"]["overall"]
    assert o["top10"] == o["top25"] == pytest.approx(6 / 16)    # ceil(10% of 4) = ceil(25% of 4) = 1 expert
    assert o["top50"] == pytest.approx(11 / 16)
    assert (o["cover50"], o["cover90"]) == (2, 4)               # cumulative 6/16, 11/16, 14/16, 16/16
    assert o["hottest_x_uniform"] == pytest.approx(1.5) and o["slots_active"] == 1.0


def test_previous_token_recall_by_hand(hand):
    """Rows with a previous token in the same sequence (t = 1, 2, 3, 5, 6, 7) share 1, 1, 0, 1, 1, 1 experts: 5 of
    6 x 2 (the second sequence's first token has no previous token, though token 3 precedes it in the stream)."""
    loc = hand["locality"]
    assert loc["previous_token_recall"] == pytest.approx(5 / 12)
    assert loc["previous_token_recall_per_layer"] == pytest.approx([5 / 12, 5 / 12])


def test_reuse_distances_by_hand(hand):
    """Tokens since the expert's last use (across sequences: the cache outlives a request): never 4 (0, 1 at t0;
    2 at t1; 3 at t3), 1 token 5, 2 tokens 6, 3-4 tokens 1 (expert 3: t3 -> t7)."""
    share = dict(zip(hand["locality"]["reuse_bins"], hand["locality"]["reuse_share"]))
    assert share == pytest.approx({"1": 5 / 16, "2": 6 / 16, "3-4": 1 / 16, "5-8": 0, "9-16": 0, "17-64": 0,
                                   "65-256": 0, ">256": 0, "never before": 4 / 16})


def test_working_sets_by_hand(monkeypatch):
    """Windows of 2 tokens: {0,1,2}, {0,1,2,3}, {0,1,2}, {0,1,3} -> 3.25 experts; of 4 tokens: 4 and 4; a window
    longer than the stream: none."""
    monkeypatch.setattr(rr, "WINDOWS", (2, 4, 16))
    ws = rr.working_sets(IDS, 4)
    assert ws[0].tolist() == [3.25, 3.25] and ws[1].tolist() == [4, 4] and np.isnan(ws[2]).all()


def test_cache_hit_rates_by_hand(hand):
    """Measured half (t4..t7) from an empty cache, 2 slots per layer:
    LRU: t4 misses 0, 1; t5 hits 1, 2 evicts 0; t6 hits 1, 0 evicts 2; t7 hits 0, 3 evicts 1: 3 of 8 per layer.
    Static hot set: the fitted half's top 2 of layer l, {0 (3 uses), 1 (2, ties with 2: the lower id)}: 6 of 8.
    Oracle prefetch (d = 1): layer 0 as LRU (3), layer 1 always prefetched (8): 11 of 16.
    LRU + previous-token prefetch: layer 1 gets token t-1's experts (t4: the fitted top 2, {0, 1}): t4 hits 2,
    then 1, 1, 1: 5 of 8, with layer 0's 3: 8 of 16. Belady: 3 of 8. With all 4 experts cached: LRU and Belady miss
    each expert once (4 of 8 hit), the static hot set holds them all from the start (8 of 8)."""
    c = hand["caches"]
    assert c["sizes"] == [2, 4]
    assert c["LRU"] == pytest.approx([3 / 8, 4 / 8])
    assert c["Belady"] == pytest.approx([3 / 8, 4 / 8])
    assert c["static hot set"] == pytest.approx([6 / 8, 1.0])
    assert c["oracle prefetch"][0] == pytest.approx(11 / 16)
    assert c["LRU + previous-token prefetch"][0] == pytest.approx(8 / 16)


def test_history_predictors_by_hand(hand):
    """recall@2 over the measured half. Fitted popularity (t0..t3): 0: 3, 1: 2, 2: 2, 3: 1, so (ties against the
    prediction) 0 ranks 0, experts 1 and 2 both rank 2: popularity finds only expert 0: t4 1, t5 0, t6 1, t7 1 = 3/8.
    Previous token: t4 (a sequence start) as popularity 1; t5..t7 find their one shared expert: 4/8.
    Two layers: no target layer exists at d >= 2. Cross-layer at d = 1 (layer 1 = layer 0): P(b | a) fitted: a=0: [1, 2/3, 1/3, 0], a=1: [1, 1, 0, 0],
    a=2: [1/2, 0, 1, 1/2], a=3: [0, 0, 1, 1]; t4 and t6 find both, t5 none (1 and 2 tie behind 0), t7 expert 0: 5/8."""
    p = hand["predictors"]
    nan = float("nan")
    assert p["previous token"]["recall@2"] == pytest.approx([0.5, 0.5, nan, nan], nan_ok=True)
    assert p["popularity"]["recall@2"] == pytest.approx([3 / 8, 3 / 8, nan, nan], nan_ok=True)
    assert math.isnan(p["cross-layer"]["recall@2"][0]) and p["cross-layer"]["recall@2"][1] == pytest.approx(5 / 8)
    assert p["cross-layer"]["recall@4"][1] == 1.0 and all(math.isnan(x) for x in p["cross-layer"]["recall@2"][2:])
    assert p["router reuse d=1"] is None


def test_kernel_ranks_are_the_metric_ranks():
    """The numba rankings of the history predictors equal metrics.true_expert_ranks on the scores they describe."""
    rng = np.random.default_rng(0)
    T, L, K, E = 40, 3, 3, 9
    ids = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K]
    r = rr.make_routing(ids, [7, 13, 20], E)
    counts = rr.expert_counts(ids[:r.cut], E)
    pop = (counts / counts.sum(1, keepdims=True)).astype(np.float32)
    hist = rr._history_ranks(r.ids, r.first, r.cut, rr.popularity_ranks(pop))
    P = rr.cooccurrence(ids[:r.cut], 1, E)
    reuse = np.full(L, 0.3, dtype=np.float32)
    cross = rr._cross_ranks(r.ids, r.first, r.cut, 1, pop, P, reuse)
    row = 0
    for t in range(r.cut, T):
        for j in range(L):
            true = torch.from_numpy(ids[t, j])[None]
            p = torch.from_numpy(pop[j]).double()
            prev = torch.zeros(E, dtype=torch.float64)
            if not r.first[t]:
                prev[ids[t - 1, j]] = 1
            assert hist[1, row].tolist() == true_expert_ranks(p[None], true)[0].tolist()
            assert hist[0, row].tolist() == true_expert_ranks((prev + 1e-3 * p)[None], true)[0].tolist()
            if j >= 1:
                c = (1e-3 * pop[j] + P[j - 1][ids[t, j - 1]].sum(0) / K).astype(np.float32)
                k = (j - 1) + (t - r.cut) * (L - 1)
                assert cross[0, k].tolist() == true_expert_ranks(torch.from_numpy(c)[None], true)[0].tolist()
            row += 1


def test_verdict_names_the_better_policy_and_prices_the_budget(hand):
    text = " ".join(rr.verdict(hand, "qwen1.5-moe-a2.7b"))
    assert "a static hot set (75.0% hits) does as well as LRU (37.5%)" in text
    # oracle prefetch (on LRU) hits 68.75%, below the hot set's 75%: it adds nothing, never "-6.2 points"
    assert "(oracle prefetch, 68.8%) would add nothing (6.2 points below the better of the two)" in text
    gib = 2 * 2 * 3 * 2048 * 1408 * 2 / 2**30   # 2 experts x 2 layers x fp16 bytes of a Qwen1.5-MoE expert
    assert f"{gib:.3g} GiB in fp16" in text


def test_collected_and_imported_routing_give_the_same_report(tiny_traces, tmp_path, capsys):
    """The embedded default's traces, exported sequence by sequence in vLLM's layout and imported: every number of
    the report agrees (the routing weights, real in one and 1/k in the other, enter none of them); only router
    reuse, which needs the hidden states, exists for the collected set alone."""
    from tests.test_import_routing import ok

    ts = TraceSet(tiny_traces)
    (tmp_path / "vllm").mkdir()
    i = 0
    for sh in ts.shards():
        off, ids = sh.numpy("seq_offsets"), sh.numpy("topk_ids")
        for a, b in zip(off[:-1], off[1:]):
            np.save(tmp_path / "vllm" / f"request_{i}.npy", ids[:, a:b].transpose(1, 0, 2))
            i += 1
    ok(capsys, "--from", "vllm", tmp_path / "vllm", "--output", tmp_path / "imported", "--num-experts",
       ts.manifest.num_experts)
    imported = TraceSet(tmp_path / "imported")
    sizes = rr.default_cache_sizes(ts.manifest.num_experts, ts.manifest.top_k)
    a = rr.analyze(rr.load_routing(ts, progress=False), sizes, ts)
    b = rr.analyze(rr.load_routing(imported, progress=False), sizes, imported)
    assert a["predictors"].pop("router reuse d=1") > 0.3 and b["predictors"].pop("router reuse d=1") is None
    assert a["tokens"] == 4608 and json.dumps(a) == json.dumps(b)  # NaN (no such number) equal to NaN
