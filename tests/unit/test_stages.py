"""Serving stages over the item table: merge, filters, popularity, co-visitation, diversity."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inkling.experiments import bucket
from inkling.serving.stages import (
    ANN,
    COVISITATION,
    POPULARITY,
    CandidateSet,
    ItemTable,
    apply_filters,
    merge,
    popular,
    request_filters,
)
from ranking_server.core import diversify
from retrieval_server.core import covisited

IDS = [f"i{i}" for i in range(10)]


def table() -> ItemTable:
    return ItemTable.build(
        IDS,
        ["a", "a", "b", "b", "c", "c", None, "a", "b", "c"],
        popularity=np.array([5, 9, 1, 7, 3, 8, 2, 6, 0, 4], dtype=float),
        in_stock=np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=bool),
        blocked=np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0], dtype=bool),
        covisit={"i0": [("i2", 5), ("i3", 1), ("gone", 9)], "i1": [("i2", 2), ("i4", 4)]},
    )


def test_popularity_skips_unavailable_items_and_applies_filters():
    t = table()
    # i5 is out of stock and i7 blocked: never served, however popular.
    assert t.ids[t.popular_rows].tolist() == ["i1", "i3", "i0", "i9", "i4", "i6", "i2", "i8"]
    filters = request_filters(t, exclude_item_ids=["i1"], purchased_item_ids=["i3"],
                              exclude_categories=["c"])  # fmt: skip
    got = popular(t, filters, 3)
    assert t.ids[got.rows].tolist() == ["i0", "i6", "i2"]
    assert set(got.sources.tolist()) == {POPULARITY}


def test_filters_report_what_each_removed():
    t = table()
    candidates = CandidateSet.of(t.rows_of(IDS), np.ones(10), ANN)
    kept, removed = apply_filters(
        candidates,
        request_filters(
            t,
            exclude_item_ids=["i0", "i9"],
            purchased_item_ids=["i1"],
            include_categories=["a", "b"],
        ),
    )
    assert removed == {
        "already_purchased": 1,
        "excluded_by_caller": 2,
        "unavailable": 2,
        "category": 2,
    }
    assert t.ids[kept.rows].tolist() == ["i2", "i3", "i8"]


def test_unknown_include_category_means_nothing_qualifies():
    t = table()
    kept, _ = apply_filters(
        CandidateSet.of(t.rows_of(IDS), np.ones(10), ANN),
        request_filters(t, include_categories=["no-such-category"]),
    )
    assert len(kept) == 0


def test_covisitation_scores_neighbours_of_recent_items_and_skips_the_session_itself():
    t = table()
    got = covisited(t, t.rows_of(["i1", "i0"]), limit=10)
    scores = dict(zip(t.ids[got.rows].tolist(), got.scores.tolist(), strict=True))
    # i2: 2 (from i1, newest) + 5 * 0.7 (from i0)
    assert scores == pytest.approx({"i2": 2 + 5 * 0.7, "i4": 4.0, "i3": 0.7})
    assert list(scores) == ["i2", "i4", "i3"]
    assert set(got.sources.tolist()) == {COVISITATION}


@given(st.lists(st.lists(st.integers(0, 30), max_size=20), min_size=1, max_size=4))
def test_merge_keeps_each_row_once_with_its_first_source(parts):
    sets = [CandidateSet.of(np.array(p, dtype=np.int64), np.zeros(len(p)), s)
            for s, p in enumerate(parts, start=1)]  # fmt: skip
    merged, also = merge(sets)
    flat = [(r, s) for s, p in enumerate(parts, start=1) for r in p]
    first: dict[int, int] = {}
    for r, s in flat:
        first.setdefault(r, s)
    assert merged.rows.tolist() == list(first)
    assert merged.sources.tolist() == list(first.values())
    for r, sources in also.items():
        assert sources[0] == first[r] and len(sources) >= 2


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(1, 4), st.integers(1, 30))
def test_diversify_is_a_permutation_that_caps_each_category_in_the_window(cats, k, window):
    order = diversify(np.array(cats, dtype=np.int64), k, window)
    assert sorted(order.tolist()) == list(range(len(cats)))
    seen: Counter[int] = Counter()
    for pos, i in enumerate(order[:window].tolist()):
        if seen[cats[i]] >= k:
            # Over the cap only once every item left is of a capped category.
            assert all(seen[cats[j]] >= k for j in order[pos:].tolist())
        seen[cats[i]] += 1


def test_experiment_buckets_are_stable_and_split_traffic_by_share():
    keys = [f"u{i}" for i in range(20_000)]
    positions = np.array([bucket(k) for k in keys])
    assert ((positions >= 0) & (positions < 1)).all()
    assert [bucket(k) for k in keys[:50]] == positions[:50].tolist()
    share = float((positions < 0.2).mean())
    assert abs(share - 0.2) < 0.015
