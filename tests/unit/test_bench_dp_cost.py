"""`python -m bench.dp_cost`: the popularity source over per-unit counts, and its flags."""

from __future__ import annotations

import numpy as np
import pytest

from batch.evaluation import PAD, MostPopular, Sequences, evaluate, leave_last_out
from bench.dp_cost import UnitPopularity, main
from inkling.privacy.noisy_counts import count_mechanism


def split_of(seqs: list[list[int]]):
    n_items = max(max(s) for s in seqs)
    return leave_last_out(
        Sequences(
            item_ids=[PAD, *(f"i{i}" for i in range(1, n_items + 1))],
            keys=[f"u{n}" for n in range(len(seqs))],
            seqs=[np.array(s, dtype=np.int64) for s in seqs],
            by="user",
        )
    )


# Training parts (leave-last-out keeps all but the last two): a heavy unit with items 1..8
# twice over, and eleven light units with 9, 10, 9.
SEQS = [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] + [[9, 10, 9, 2, 3]] * 11


def test_unbounded_unit_counts_count_people_not_events() -> None:
    split = split_of(SEQS)
    exact, people = MostPopular(), UnitPopularity("distinct", max_items=100)
    exact.fit(split.without_test())
    people.fit(split.without_test())
    assert exact.popularity is not None and people.popularity is not None
    assert exact.popularity[1] == 2 and people.popularity[1] == 1  # the heavy unit's repeats
    assert people.popularity[9] == 11 and people.popularity[10] == 11


def test_the_bound_and_a_noiseless_mechanism_keep_k_items_per_unit() -> None:
    split = split_of(SEQS)
    bounded = UnitPopularity("bounded", max_items=2, seed=0)
    noiseless = UnitPopularity("laplace", 2, count_mechanism(1e4, 0.0, 2), seed=0)
    for model in (bounded, noiseless):
        model.fit(split.without_test())
        assert model.popularity is not None
        assert model.popularity.sum() == 2 + 11 * 2  # heavy: 2 of its 8; light: both of 2
    assert np.array_equal(bounded.popularity, noiseless.popularity)
    result = evaluate(noiseless, split, k=100)
    assert result["test"]["full"]["recall@100"] == 1.0  # 10 items: every target is in the top 100


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets", "movielens"], "--datasets takes ml-100k, diginetica; got 'movielens'"),
        (["--draws", "1"], "--draws must be at least 2, got 1"),
        (["--epsilons", "1,0"], "--epsilons takes positive numbers, got '1,0'"),
        (["--bounds", "ten"], "--bounds takes comma separated numbers, got 'ten'"),
    ],
)
def test_bad_flags_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
