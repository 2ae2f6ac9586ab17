"""The sampled losses against their definitions: logQ softmax vs full, gBCE vs the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inkling.errors import InvalidInputError
from inkling.models.losses import (
    MixedNegatives,
    gbce_beta,
    gbce_loss,
    history_scores,
    sampled_softmax,
)


def _case(n_items: int = 30, positions: int = 12, hidden: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items + 1, hidden, generator=g)
    h = torch.randn(positions, hidden, generator=g)
    targets = torch.randint(1, n_items + 1, (positions,), generator=g)
    return table, h, targets


def test_logq_softmax_over_every_item_is_the_full_softmax() -> None:
    table, h, y = _case()
    full = F.cross_entropy(h @ table[1:].t(), y - 1)
    every = torch.arange(1, len(table))
    # Every item is in the set for sure: π = 1, log π = 0.
    got = sampled_softmax(h, table, y - 1, every, torch.zeros(len(every)))
    torch.testing.assert_close(got, full)
    # A correction equal for every candidate (uniform sampling) cancels as well.
    shifted = sampled_softmax(h, table, y - 1, every, torch.full((len(every),), math.log(0.3)))
    torch.testing.assert_close(shifted, full)


def test_mixed_negatives_that_cover_the_catalogue_give_the_full_softmax() -> None:
    table, h, y = _case(n_items=20, positions=16)
    counts = np.r_[0.0, np.ones(20)]
    # 4,000 uniform draws over 20 items: every item is drawn, and π = 1 − e^−200 = 1.
    mixed = MixedNegatives(counts, 4000, 0.0, torch.Generator().manual_seed(1))
    candidates, labels, log_pi = mixed.draw(y)
    assert candidates.tolist() == list(range(1, 21))
    assert torch.equal(candidates[labels], y)
    assert float(log_pi.abs().max()) < 1e-12
    full = F.cross_entropy(h @ table[1:].t(), y - 1)
    torch.testing.assert_close(sampled_softmax(h, table, labels, candidates, log_pi), full)


def test_mixed_negatives_correct_popular_items_less_than_rare_ones() -> None:
    counts = np.r_[0.0, 1000.0, 100.0, 10.0, 1.0, np.zeros(96)]
    mixed = MixedNegatives(counts, 50, 1.0, torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 1, 2, 3])
    candidates, labels, log_pi = mixed.draw(targets)
    assert torch.equal(candidates[labels], targets)
    by_item = dict(zip(candidates.tolist(), log_pi.tolist(), strict=True))
    # E_j = P·p_j + K·q_j; π_j = 1 − exp(−E_j).
    p1 = 1000 / 1111
    expected_1 = 4 * p1 + 50 * float(mixed.q[1])
    assert by_item[1] == pytest.approx(math.log(1 - math.exp(-expected_1)), rel=1e-5)
    assert by_item[1] > by_item[2] > by_item[3]
    # An item never seen in training still has a chance to be drawn.
    assert float(mixed.q[50]) > 0 and float(mixed.q[0]) == 0
    with pytest.raises(InvalidInputError, match="no item"):
        MixedNegatives(np.zeros(5), 10, 1.0, torch.Generator())


def test_gbce_matches_the_published_formula_on_a_hand_made_case() -> None:
    # 11 items, 2 negatives: α = 2/10 = 0.2; t = 0.5: β = 0.2·(0.5·(1 − 5) + 5) = 0.6.
    assert gbce_beta(2, 11, 0.5) == pytest.approx(0.6)
    assert gbce_beta(2, 11, 0.0) == pytest.approx(1.0)  # plain BCE
    assert gbce_beta(2, 11, 1.0) == pytest.approx(0.2)  # β = α
    # s⁺ = 0: −0.6·log σ(0) = 0.6·ln 2; s⁻ = (0, ln 3): −log(1 − ½) − log(1 − ¾) = ln 2 + ln 4.
    loss = gbce_loss(torch.tensor([0.0]), torch.tensor([[0.0, math.log(3.0)]]), 0.6)
    assert float(loss) == pytest.approx(0.6 * math.log(2) + math.log(2) + math.log(4), rel=1e-6)
    # A sampled "negative" that is the row's own target is left out of the sum.
    masked = gbce_loss(
        torch.tensor([0.0]),
        torch.tensor([[0.0, math.log(3.0)]]),
        0.6,
        torch.tensor([[False, True]]),
    )
    assert float(masked) == pytest.approx(0.6 * math.log(2) + math.log(2), rel=1e-6)
    with pytest.raises(InvalidInputError, match="gbce_t"):
        gbce_beta(2, 11, 1.5)


def test_history_scores_sum_a_rows_weights_where_its_history_holds_the_candidate() -> None:
    weights = torch.tensor([[0.0, 2.0, 0.5, 1.0], [0.0, 0.0, 3.0, 0.0]])
    items = torch.tensor([[0, 4, 7, 4], [0, 0, 2, 9]])
    candidates = torch.tensor([4, 2, 9, 4, 5])  # 4 twice: each copy scored alike
    scores = history_scores(weights, items, candidates)
    expected = torch.tensor([[3.0, 0.0, 0.0, 3.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]])
    assert torch.equal(scores, expected)
    none = history_scores(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long), candidates)
    assert none.shape == (0, 5)
