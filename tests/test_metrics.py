"""Metric definitions against hand-computed cases (validation/coverage/metrics.py)."""
import math

import pytest
import torch

from validation.coverage.metrics import (
    CoverageAccumulator,
    any_hit_at_k,
    avg_found_at_k,
    coverage_at_k,
    exact_match,
    previous_token_recall,
    previous_token_recall_per_layer,
    random_expectation,
    recall_at_k,
    true_expert_ranks,
)


def test_ranks_follow_scores_and_ties_count_against_the_prediction():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5]])
    ranks = true_expert_ranks(scores, torch.tensor([[1, 3, 2, 0]]))
    assert ranks.tolist() == [[0, 2, 2, 3]]  # experts 2 and 3 tie: each is ranked after the other
    constant = true_expert_ranks(torch.zeros(1, 6), torch.tensor([[0, 1]]))
    assert recall_at_k(constant, 2) == 0.0  # a predictor that predicts nothing finds nothing


def test_hand_computed_rows():
    # E = 6, K = 2. Row 0: predicted order 0,1,2,3,4,5 and true {0, 3}. Row 1: order 5,4,3,2,1,0 and true {5, 4}.
    scores = torch.tensor([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=torch.float)
    true = torch.tensor([[0, 3], [5, 4]])
    r = true_expert_ranks(scores, true)  # row 0: ranks 0, 3; row 1: ranks 0, 1
    assert recall_at_k(r, 1) == pytest.approx((0.5 + 0.5) / 2)
    assert recall_at_k(r, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert coverage_at_k(r, 2) == pytest.approx(0.5)
    assert coverage_at_k(r, 4) == pytest.approx(1.0)
    assert any_hit_at_k(r, 1) == pytest.approx(1.0)
    assert avg_found_at_k(r, 3) == pytest.approx((1 + 2) / 2)
    assert exact_match(r) == pytest.approx(0.5)


def test_previous_token_recall_hand_computed():
    # Two sequences back to back (A: 3 tokens, B: 2), L = 2 layers, K = 2. Rows: tokens; inner lists: layers.
    ids = torch.tensor([[[0, 1], [0, 1]],    # A0
                        [[1, 2], [0, 1]],    # A1: shares {1} with A0 at layer 0, {0, 1} at layer 1
                        [[2, 1], [3, 4]],    # A2: shares {1, 2} at layer 0 (order within a row is irrelevant), none at 1
                        [[1, 2], [3, 4]],    # B0: starts a sequence; its overlap with A2 (2 and 2) must not count
                        [[3, 4], [0, 2]]])   # B1: shares nothing with B0 at either layer
    first = torch.tensor([True, False, False, True, False])
    overall, per_layer = previous_token_recall(ids, first)
    assert per_layer == pytest.approx([(1 + 2 + 0) / 6, (2 + 0 + 0) / 6])
    assert overall == pytest.approx((3 + 2) / 12)
    only_starts, _ = previous_token_recall(ids[:1], first[:1])
    assert math.isnan(only_starts)  # no token has a previous token: undefined, not 0


def test_previous_token_recall_reads_long_streams_in_chunks_without_a_seam():
    """Past 65,536 tokens the stream is read in chunks: the same numbers as one pass over every row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (140_000, 2, 1), generator=g)
    first = torch.rand(140_000, generator=g) < 0.01
    first[0] = True
    _, per_layer = previous_token_recall(ids, first)
    assert per_layer == pytest.approx(previous_token_recall_per_layer(ids, first).tolist(), rel=1e-12, abs=0)


def test_random_expectations_match_closed_forms_and_simulation():
    E, K = 60, 4
    assert random_expectation("recall", 4, E, K) == pytest.approx(4 / 60)
    assert random_expectation("any_hit", 1, E, K) == pytest.approx(4 / 60)
    assert random_expectation("coverage", 4, E, K) == pytest.approx(1 / math.comb(60, 4))
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20000, E, generator=g)
    true = torch.rand(20000, E, generator=g).argsort(1)[:, :K]
    r = true_expert_ranks(scores, true)
    assert recall_at_k(r, 10) == pytest.approx(10 / 60, abs=0.01)
    assert any_hit_at_k(r, 5) == pytest.approx(random_expectation("any_hit", 5, E, K), abs=0.01)


def test_accumulator_matches_direct_metrics_and_splits_by_layer_and_source():
    g = torch.Generator().manual_seed(1)
    E, K, R = 12, 3, 500
    scores = torch.randn(R, E, generator=g)
    true = torch.rand(R, E, generator=g).argsort(1)[:, :K]
    layer = torch.randint(0, 4, (R,), generator=g)
    source = torch.randint(0, 2, (R,), generator=g)
    r = true_expert_ranks(scores, true)
    acc = CoverageAccumulator(4, 2, E, K, ks=(1, 5))
    acc.update(r[:200], layer[:200], source[:200], true[:200], scores[:200].topk(K).indices)
    acc.update(r[200:], layer[200:], source[200:], true[200:], scores[200:].topk(K).indices)
    s = acc.summary()
    assert s["tokens"] == R
    assert s["recall@3"] == pytest.approx(recall_at_k(r, 3))  # k = K is always evaluated
    assert s["coverage@5"] == pytest.approx(coverage_at_k(r, 5))
    assert s["exact_match"] == pytest.approx(exact_match(r))
    m = layer == 2
    assert acc.summary(layers=[2])["any_hit@1"] == pytest.approx(any_hit_at_k(r[m], 1))
    m = source == 1
    assert acc.summary(sources=[1])["avg_found@5"] == pytest.approx(avg_found_at_k(r[m], 5))


def test_accumulator_hand_computed_at_every_k():
    """The accumulator's sums against numbers worked out by hand, at k below, at and above K (not only k = K)."""
    # E = 6, K = 2. Row 0 (target layer 0): true {0, 3} at ranks 0 and 3. Row 1 (layer 1): true {5, 4} at ranks 0, 1.
    scores = torch.tensor([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=torch.float)
    true = torch.tensor([[0, 3], [5, 4]])
    acc = CoverageAccumulator(2, 1, 6, 2, ks=(1, 3))
    acc.update(true_expert_ranks(scores, true), torch.tensor([0, 1]), torch.tensor([0, 0]), true, scores.topk(2).indices)
    s = acc.summary()
    assert acc.ks == (1, 2, 3, 4)                      # K and 2K join the ks asked for
    assert s["recall@1"] == pytest.approx(2 / 4)       # one true expert found in each row, of K = 2
    assert s["recall@2"] == pytest.approx(3 / 4)
    assert s["recall@3"] == pytest.approx(3 / 4)
    assert s["recall@4"] == pytest.approx(4 / 4)
    assert s["coverage@2"] == s["coverage@3"] == pytest.approx(1 / 2) and s["coverage@4"] == pytest.approx(1.0)
    assert s["any_hit@1"] == pytest.approx(1.0)
    assert s["avg_found@3"] == pytest.approx(3 / 2)
    assert s["exact_match"] == pytest.approx(1 / 2)
    assert acc.per_layer("recall@2") == pytest.approx([1 / 2, 1.0])
