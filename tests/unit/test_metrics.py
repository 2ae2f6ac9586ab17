"""Ranking metrics of the offline evaluation: hand-computed cases, ties, exclusions, sampling."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.evaluation import (
    candidate_mask,
    expected_metrics,
    full_ranking,
    sample_negatives,
    sampled_ranking,
)
from inkling.models.sasrec import history_candidates, revisit_share

N_ITEMS = 30


def hist(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.int64)


def scores_with(order: dict[int, float], rows: int = 1, n_items: int = N_ITEMS) -> np.ndarray:
    s = np.zeros((rows, n_items + 1), dtype=np.float32)
    for item, value in order.items():
        s[:, item] = value
    return s


def test_perfect_scorer_gets_full_credit_on_both_protocols():
    histories = [hist(1, 2), hist(3), hist(4, 5, 6)]
    targets = np.array([7, 8, 9])
    scores = np.zeros((3, N_ITEMS + 1), dtype=np.float32)
    scores[np.arange(3), targets] = 1.0
    full = full_ranking(scores, histories, targets, k=10)
    assert {name: v.tolist() for name, v in full.items()} == {
        "recall@10": [1.0] * 3,
        "ndcg@10": [1.0] * 3,
        "mrr": [1.0] * 3,
    }
    negatives = sample_negatives(histories, targets, N_ITEMS, count=20, seed=1)
    sampled = sampled_ranking(scores, targets, negatives, k=10)
    assert sampled["hr@10"].tolist() == [1.0] * 3
    assert sampled["ndcg@10"].tolist() == [1.0] * 3


def test_a_constant_scorer_gets_chance_not_credit_from_ties():
    histories = [hist(1, 2, 3), hist(4)]
    targets = np.array([5, 6])
    scores = np.ones((2, N_ITEMS + 1), dtype=np.float32)
    full = full_ranking(scores, histories, targets, k=10)
    candidates = np.array([N_ITEMS - 3, N_ITEMS - 1])
    np.testing.assert_allclose(full["recall@10"], 10 / candidates)
    np.testing.assert_allclose(
        full["mrr"], [sum(1 / p for p in range(1, c + 1)) / c for c in candidates]
    )
    assert (full["ndcg@10"] < 0.2).all()
    negatives = sample_negatives(histories, targets, N_ITEMS, count=20, seed=0)
    np.testing.assert_allclose(sampled_ranking(scores, targets, negatives)["hr@10"], 10 / 21)


def test_hand_computed_rank_three():
    # Two candidates above the target, none tied: rank 3.
    scores = scores_with({9: 3.0, 8: 2.0, 7: 1.0})
    m = full_ranking(scores, [hist(1)], np.array([7]), k=10)
    assert m["recall@10"][0] == 1.0
    assert m["ndcg@10"][0] == pytest.approx(1 / math.log2(4))
    assert m["mrr"][0] == pytest.approx(1 / 3)
    assert full_ranking(scores, [hist(1)], np.array([7]), k=2)["recall@2"][0] == 0.0
    assert full_ranking(scores, [hist(1)], np.array([7]), k=2)["ndcg@2"][0] == 0.0


def test_one_tie_is_the_average_of_both_orders():
    scores = scores_with({7: 1.0, 8: 1.0})
    m = full_ranking(scores, [hist(1)], np.array([7]), k=1)
    assert m["recall@1"][0] == pytest.approx(0.5)
    assert m["ndcg@1"][0] == pytest.approx(0.5)
    assert m["mrr"][0] == pytest.approx((1 + 1 / 2) / 2)
    m10 = full_ranking(scores, [hist(1)], np.array([7]), k=10)
    assert m10["ndcg@10"][0] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_history_items_are_excluded_and_a_target_among_them_is_a_miss():
    scores = scores_with({9: 3.0, 8: 2.0, 7: 1.0})
    # 9 and 8 outrank the target but are in the history: the target ranks first.
    m = full_ranking(scores, [hist(9, 8, 2)], np.array([7]))
    assert m["mrr"][0] == 1.0
    # The target in the history (a repeat) is excluded with it: were it kept, the
    # candidates would say which history item is the answer.
    m = full_ranking(scores, [hist(7, 9)], np.array([7]))
    assert m["recall@10"][0] == m["ndcg@10"][0] == m["mrr"][0] == 0.0
    mask = candidate_mask([hist(7, 9, 2)], N_ITEMS)[0]
    assert not mask[7] and not mask[9] and not mask[2] and not mask[0]
    assert mask.sum() == N_ITEMS - 3


def test_with_history_candidates_a_repeat_competes_with_the_other_history_items():
    scores = scores_with({9: 3.0, 8: 2.0, 7: 1.0})
    m = full_ranking(scores, [hist(7, 9)], np.array([7]), keep_history=True)
    assert m["mrr"][0] == pytest.approx(1 / 3)  # 9 (seen) and 8 above it
    m = full_ranking(scores, [hist(9, 8, 2)], np.array([7]), keep_history=True)
    assert m["mrr"][0] == pytest.approx(1 / 3)
    assert candidate_mask([hist(7, 9, 2)], N_ITEMS, keep_history=True)[0].sum() == N_ITEMS


def test_the_history_is_candidate_where_the_training_sequences_revisit_items():
    assert revisit_share([hist(1, 2, 1, 3), hist(4, 5)]) == pytest.approx(1 / 4)
    assert revisit_share([hist(1), hist()]) == 0.0
    assert history_candidates([hist(1, 2, 1, 3)])
    assert not history_candidates([hist(*range(1, 200))] * 3)
    # 1 revisit in 101 positions is just under the 1 % threshold.
    assert not history_candidates([hist(*range(1, 102), 1)])
    assert history_candidates([hist(*range(1, 101), 1)])  # 1 in 100: the threshold


def test_padding_and_excluded_items_at_minus_infinity_do_not_tie_with_the_target():
    scores = np.full((1, N_ITEMS + 1), -np.inf, dtype=np.float32)
    scores[0, 5:] = 0.0  # items 1..4 and the target 3 at -inf; 1, 2, 4 are history
    m = full_ranking(scores, [hist(1, 2, 4)], np.array([3]))
    # Only the other candidates count: all of them score higher.
    assert m["mrr"][0] == pytest.approx(1 / (N_ITEMS - 3))


def test_padding_column_never_counts():
    scores = scores_with({0: 99.0, 7: 1.0})
    assert full_ranking(scores, [hist(1)], np.array([7]))["mrr"][0] == 1.0
    negatives = sample_negatives([hist(1)], np.array([7]), N_ITEMS, count=N_ITEMS, seed=0)
    assert sampled_ranking(scores, np.array([7]), negatives)["hr@10"][0] == 1.0


def test_sampled_negatives_are_unseen_distinct_seeded_and_batch_independent():
    rng = np.random.default_rng(3)
    histories = [rng.choice(np.arange(1, 201), size=n, replace=False) for n in range(1, 60)]
    targets = np.array([int(h[0]) if i % 3 == 0 else 200 - i for i, h in enumerate(histories)])
    neg = sample_negatives(histories, targets, 200, count=100, seed=5, batch_size=7)
    assert neg.shape == (len(histories), 100)
    for h, t, row in zip(histories, targets, neg, strict=True):
        assert (row >= 1).all() and len(set(row.tolist())) == 100
        assert not set(row.tolist()) & (set(h.tolist()) | {int(t)})
    assert (
        sample_negatives(histories, targets, 200, count=100, seed=5, batch_size=512) == neg
    ).all()
    assert (sample_negatives(histories, targets, 200, count=100, seed=6) != neg).any()


def test_sampled_negatives_are_uniform_over_unseen_items():
    histories = [hist(1, 2, 3)] * 4000
    targets = np.full(4000, 4)
    neg = sample_negatives(histories, targets, 20, count=4, seed=0)
    counts = np.bincount(neg.ravel(), minlength=21)
    assert counts[:5].sum() == 0
    share = counts[5:] / counts.sum()
    np.testing.assert_allclose(share, 1 / 16, atol=0.01)


def test_fewer_unseen_items_than_negatives_pads_and_counts_only_real_ones():
    neg = sample_negatives([hist(1, 2, 3, 4, 5, 6, 7)], np.array([8]), 10, count=5, seed=0)
    assert sorted(neg[0][neg[0] >= 0].tolist()) == [9, 10]
    assert (neg[0] == -1).sum() == 3
    scores = scores_with({9: 5.0, 10: 4.0, 8: 3.0}, n_items=10)
    assert sampled_ranking(scores, np.array([8]), neg, k=2)["hr@2"][0] == 0.0
    assert sampled_ranking(scores, np.array([8]), neg, k=3)["hr@3"][0] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    greater=st.integers(0, 15),
    ties=st.integers(0, 8),
    k=st.integers(1, 12),
)
def test_expected_metrics_equal_the_mean_over_every_order_of_the_ties(greater, ties, k):
    m = expected_metrics(np.array([greater]), np.array([ties]), k)
    positions = [greater + 1 + j for j in range(ties + 1)]
    assert m["hit"][0] == pytest.approx(np.mean([p <= k for p in positions]))
    assert m["ndcg"][0] == pytest.approx(
        np.mean([1 / math.log2(p + 1) if p <= k else 0.0 for p in positions])
    )
    assert m["rr"][0] == pytest.approx(np.mean([1 / p for p in positions]))


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    target=st.integers(1, 6),
    history=st.sets(st.integers(1, 6), max_size=3),
    keep=st.booleans(),
)
def test_full_ranking_matches_brute_force_over_tie_orders(values, target, history, keep):
    scores = np.array([[0.0, *values]], dtype=np.float32)
    h = np.array(sorted(history), dtype=np.int64)
    m = full_ranking(scores, [h], np.array([target]), k=2, keep_history=keep)
    candidates = [i for i in range(1, 7) if keep or i not in history]
    if target not in candidates:
        assert m["recall@2"][0] == m["ndcg@2"][0] == m["mrr"][0] == 0.0
        return
    ranks = []
    for order in itertools.permutations(candidates):
        ranked = sorted(order, key=lambda i: -values[i - 1])  # stable: ties keep `order`
        ranks.append(ranked.index(target) + 1)
    assert m["recall@2"][0] == pytest.approx(np.mean([r <= 2 for r in ranks]))
    assert m["mrr"][0] == pytest.approx(np.mean([1 / r for r in ranks]))
