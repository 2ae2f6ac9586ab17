"""Offline evaluation: sequences from the event log, leave-last-out, baselines, reports."""

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from batch.als import AlsConfig
from batch.evaluation import (
    MIN_SEQUENCES,
    PAD,
    AlsBaseline,
    HistoryOnly,
    ItemKNN,
    MostPopular,
    SequenceRecommender,
    Sequences,
    Split,
    chance_level,
    describe,
    evaluate,
    evaluate_all,
    leave_last_out,
    load_sequences,
    protocol,
    run_evaluation,
    session_start,
    write_report,
)
from batch.generate import GeneratorConfig, write_synthetic
from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import conform, validate
from tests.conftest import temp_settings

pytestmark = pytest.mark.spark

T0 = datetime(2026, 3, 1, 9, tzinfo=UTC)
GENERATOR = GeneratorConfig(users=150, items=300, sessions=800, days=5, seed=3)
ALS = AlsConfig(rank=16, max_iter=8)


def write_log(root, rows):
    """rows: (user or None, session, item or None, event_type, minute[, event_id])."""
    records = []
    for n, row in enumerate(rows):
        user, session, item, kind, minute = row[:5]
        records.append(
            {"event_id": row[5] if len(row) > 5 else f"e{n:05d}", "user_id": user,
             "session_id": session, "item_id": item, "event_type": kind,
             "timestamp": T0 + timedelta(minutes=minute)}
        )  # fmt: skip
    result = validate(conform(pa.Table.from_pylist(records)))
    assert not result.rejected
    EventLog(root).append(result.valid)
    return root


def filler(n=MIN_SEQUENCES, length=3, anonymous=False):
    """n plain sequences u<i>: z<i>-0, z<i>-1, ... (one session each)."""
    return [
        (None if anonymous else f"u{i}", f"fill{i}", f"z{i}-{j}", "click", j)
        for i in range(n)
        for j in range(length)
    ]


def decode(seqs: Sequences, key: str) -> list[str]:
    return [seqs.item_ids[i] for i in seqs.seqs[seqs.keys.index(key)]]


# --- sequences and split -------------------------------------------------------------------------


def test_sequences_are_time_ordered_interactions_with_repeats_collapsed(tmp_path):
    rows = [
        ("alice", "s1", "b", "click", 5),
        ("alice", "s1", None, "page_view", 0),
        ("alice", "s1", "a", "click", 1),
        ("alice", "s1", "a", "add_to_cart", 2),  # consecutive repeat: collapsed
        ("alice", "s1", "x", "item_view", 3),  # an impression, not an interaction
        ("alice", "s1", "a", "purchase", 4),  # still the same run of a
        ("alice", "s2", "a", "click", 60),  # a again after b: kept
        ("alice", "s2", "c", "click", 61, "tie-2"),
        ("alice", "s2", "d", "click", 61, "tie-1"),  # same time: event_id decides
        *filler(),
    ]
    seqs = load_sequences(write_log(tmp_path / "events", rows))
    assert seqs.by == "user"
    assert decode(seqs, "alice") == ["a", "b", "a", "d", "c"]
    assert seqs.item_ids[0] == PAD
    assert seqs.item_ids[1:] == sorted(seqs.item_ids[1:])
    assert "x" not in seqs.item_ids
    assert seqs.n_items == len(seqs.item_ids) - 1 == 4 + 3 * MIN_SEQUENCES
    assert all(s.dtype == np.int64 and s.min() >= 1 for s in seqs.seqs)
    assert seqs.stats["repeats_collapsed"] == 2
    # a, b in s1, then a, d, c in s2: each position keeps its session.
    sessions = seqs.sessions[seqs.keys.index("alice")]
    assert (sessions[1:] == sessions[:-1]).tolist() == [True, False, True, True]
    # ... and its time: a at minute 1 (its run's first), b at 5, a at 60, d and c at 61.
    start = int(T0.timestamp())
    times = seqs.times[seqs.keys.index("alice")]
    assert (times - start).tolist() == [60, 300, 3600, 3660, 3660] and times.dtype == np.int64
    split = leave_last_out(seqs)
    row = seqs.keys.index("alice")
    assert (split.train.times[row] - start).tolist() == [60, 300, 3600]
    assert (split.valid_times[row] - start).tolist() == [60, 300, 3600]
    assert (split.test_times[row] - start).tolist() == [60, 300, 3600, 3660]

    class Timed(Spy):
        reads_times = True

        def score(self, histories, flags=None, times=None):
            self.times.extend(times)
            return super().score(histories, flags)

    timed = Timed(split.n_items)
    timed.times = []
    evaluate(timed, split, sampled_negatives=5)  # the validation part, then the test part
    expected = [*split.valid_times, *split.test_times]
    assert [t.tolist() for t in timed.times] == [t.tolist() for t in expected]


def test_auto_groups_by_session_when_most_interactions_are_anonymous(tmp_path):
    rows = [*filler(MIN_SEQUENCES, anonymous=True), ("u", "s9", "a", "click", 0)]
    seqs = load_sequences(write_log(tmp_path / "events", rows))
    assert seqs.by == "session"
    assert sorted(seqs.keys) == sorted(f"fill{i}" for i in range(MIN_SEQUENCES))
    with pytest.raises(InvalidInputError, match="0 user sequences"):
        load_sequences(tmp_path / "events", by="user")


def test_per_user_leaves_anonymous_interactions_out(tmp_path):
    rows = [*filler(), ("u0", "anon", "q", "click", 10), (None, "anon", "r", "click", 11)]
    seqs = load_sequences(write_log(tmp_path / "events", rows), by="user")
    assert decode(seqs, "u0") == ["z0-0", "z0-1", "z0-2", "q"]
    assert "r" not in seqs.item_ids and seqs.stats["anonymous_dropped"] == 1


def test_short_sequences_are_dropped_and_too_few_refused(tmp_path):
    rows = [*filler(), ("short", "s", "a", "click", 0), ("short", "s", "b", "click", 1)]
    seqs = load_sequences(write_log(tmp_path / "events", rows))
    assert "short" not in seqs.keys and seqs.stats["short_sequences_dropped"] == 1
    # Items only the dropped sequence had are not in the catalogue.
    assert "a" not in seqs.item_ids
    with pytest.raises(InvalidInputError, match=f"needs at least {MIN_SEQUENCES}"):
        load_sequences(tmp_path / "events", min_length=4)


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_sequences(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no interactions"):
        load_sequences(tmp_path / "empty")
    views = write_log(tmp_path / "views", [("u", "s", "a", "item_view", 0)])
    with pytest.raises(InvalidInputError, match="no interactions"):
        load_sequences(views)
    with pytest.raises(InvalidInputError, match="by must be"):
        load_sequences(views, by="device")


def hand_sequences() -> Sequences:
    items = [PAD, *(f"i{n}" for n in range(1, 13))]
    seqs = [np.array(s, dtype=np.int64) for s in ([1, 2, 3, 4, 10], [2, 3, 11], [4, 1, 5, 6, 12])]
    return Sequences(item_ids=items, keys=["a", "b", "c"], seqs=seqs, by="user")


def test_leave_last_out_holds_out_the_last_two():
    split = leave_last_out(hand_sequences())
    assert [s.tolist() for s in split.train.seqs] == [[1, 2, 3], [2], [4, 1, 5]]
    assert [s.tolist() for s in split.valid_history] == [[1, 2, 3], [2], [4, 1, 5]]
    assert split.valid_target.tolist() == [4, 3, 6]
    assert [s.tolist() for s in split.test_history] == [[1, 2, 3, 4], [2, 3], [4, 1, 5, 6]]
    assert split.test_target.tolist() == [10, 11, 12]
    assert split.n_items == 12 and split.train.keys == ["a", "b", "c"]
    short = Sequences(item_ids=[PAD, "a", "b"], keys=["k"], seqs=[np.array([1, 2])], by="user")
    with pytest.raises(InvalidInputError, match="at least 3 items"):
        leave_last_out(short)


def test_session_flags_and_the_session_part():
    seqs = hand_sequences()
    # a: sessions 0 0 1 1 1 (a new session at position 2); b: one session; c: 0 1 1 2 2.
    codes = ([0, 0, 1, 1, 1], [5, 5, 5], [0, 1, 1, 2, 2])
    split = leave_last_out(
        Sequences(seqs.item_ids, seqs.keys, seqs.seqs, "user", {}, [np.array(c) for c in codes])
    )
    assert [f.tolist() for f in split.test_flags] == [[1, 0, 1, 1], [1, 1], [0, 1, 0, 1]]
    assert [f.tolist() for f in split.valid_flags] == [[1, 0, 1], [1], [0, 1, 0]]
    assert [s.tolist() for s in split.train.sessions] == [[0, 0, 1], [5], [0, 1, 1]]
    # The target's session starts at 2 for a, 0 for b (all one session), 3 for c.
    assert [session_start(f) for f in split.test_flags] == [2, 0, 3]
    # c's validation target opens a new session: nothing of its session is in the history.
    assert session_start(split.valid_flags[2]) == 3 == len(split.valid_history[2])
    assert session_start(np.zeros(0, dtype=np.int64)) == 0
    assert describe(split)["test_with_session_part"] == pytest.approx(1.0)

    spy = Spy(split.n_items)
    cut = HistoryOnly(spy)
    assert cut.name == "spy_history_only"
    seen: list[list[int]] = []
    spy.score = lambda histories, flags=None: (  # type: ignore[method-assign]
        seen.extend(h.tolist() for h in histories)
        or np.zeros((len(histories), split.n_items + 1), dtype=np.float32)
    )
    cut.score(split.test_history, split.test_flags)
    assert seen == [[1, 2], [], [4, 1, 5]]
    with pytest.raises(InvalidInputError, match="session flags"):
        cut.score(split.test_history)
    # Evaluation passes the flags along, and masks with the full history either way.
    [result] = evaluate_all([Spy(split.n_items)], split, sampled_negatives=5)
    assert result["test"]["sequences"] == 3


class Spy:
    """Records what `fit` was given; scores by a fixed preference."""

    name = "spy"

    def __init__(self, n_items: int) -> None:
        self.seen: list[int] = []
        self.n_items = n_items

    def fit(self, split: Split, progress=None) -> None:
        parts = [*split.train.seqs, *split.valid_history, split.valid_target, *split.test_history]
        self.seen = sorted({int(i) for part in parts for i in np.ravel(part)})
        self.test_rows = len(split.test_target)

    def score(self, histories: list[np.ndarray], flags=None) -> np.ndarray:
        self.flags = flags
        return np.tile(np.arange(self.n_items + 1, dtype=np.float32), (len(histories), 1))


def test_test_targets_never_reach_fit():
    split = leave_last_out(hand_sequences())
    spy = Spy(split.n_items)
    assert isinstance(spy, SequenceRecommender)
    [result] = evaluate_all([spy], split, sampled_negatives=5)
    # Test targets 10, 11, 12 occur nowhere else; fit saw everything but them.
    assert spy.seen == [1, 2, 3, 4, 5, 6] and spy.test_rows == 0
    # The spy ranks higher indices first: test targets are the top candidates.
    assert result["test"]["full"]["mrr"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert result["valid"]["sequences"] == result["test"]["sequences"] == 3


def test_evaluate_refuses_scores_of_the_wrong_shape_or_nan():
    split = leave_last_out(hand_sequences())

    class Bad(Spy):
        def __init__(self, n_items, scores):
            super().__init__(n_items)
            self.scores = scores

        def score(self, histories, flags=None):
            return self.scores(len(histories))

    narrow = Bad(split.n_items, lambda b: np.zeros((b, split.n_items), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="expected \\(3, 13\\)"):
        evaluate(narrow, split)
    nan = Bad(split.n_items, lambda b: np.full((b, split.n_items + 1), np.nan, dtype=np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        evaluate(nan, split)


def test_most_popular_counts_training_interactions_only():
    split = leave_last_out(hand_sequences())
    model = MostPopular()
    model.fit(split.without_test())
    scores = model.score(split.test_history)
    assert scores.dtype == np.float32 and scores.shape == (3, 13)
    assert scores[0].tolist() == [0, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_item_knn_scores_neighbours_of_the_recent_items_then_popularity():
    split = leave_last_out(hand_sequences())
    model = ItemKNN(window=3, shrink=5.0)
    model.fit(split.without_test())
    scores = model.score([np.array([4]), np.zeros(0, dtype=np.int64)])
    # 4 co-occurred with 5 (count 1) and 1 (count 2): cosine 1/(1+5) > 1/(sqrt(2)+5).
    assert (np.argsort(-scores[0][1:], kind="stable")[:3] + 1).tolist() == [5, 1, 2]
    # No history: popularity order, below any similarity.
    assert scores[1][1] == scores[1][2] > scores[1][3] > scores[1][6] == 0.0
    assert scores[1].max() < scores[0][5]


def test_report_files_hold_the_table_and_the_protocol(tmp_path):
    split = leave_last_out(hand_sequences())
    results = evaluate_all([MostPopular(), Spy(split.n_items)], split, sampled_negatives=5)
    meta = {"dataset": "hand-made", "counts": describe(split), "protocol": "leave-last-out ..."}
    paths = write_report(results, tmp_path / "report", "Hand", meta)
    assert [p.name for p in paths] == ["evaluation.json", "evaluation.md"]
    doc = json.loads(paths[0].read_text())
    assert [r["model"] for r in doc["results"]] == ["most_popular", "spy"]
    assert doc["meta"]["counts"]["sequences"] == 3
    md = paths[1].read_text()
    assert "| model | Recall@10 | NDCG@10 | MRR | HR@10 (sampled) | NDCG@10 (sampled) |" in md
    assert "| most_popular |" in md and "| spy |" in md
    assert "hand-made" in md and "3 user sequences, 12 items" in md


# --- on synthetic data, with Spark's ALS ---------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    settings = temp_settings(tmp_path_factory.mktemp("evaluation"))
    write_synthetic(GENERATOR, settings)
    return settings, leave_last_out(load_sequences(settings.events_dir))


@pytest.fixture(scope="module")
def evaluated(synthetic, spark):
    _, split = synthetic
    als = AlsBaseline(spark, ALS)
    results = evaluate_all([MostPopular(), ItemKNN(), als], split)
    return split, als, {r["model"]: r for r in results}


def test_synthetic_sequences_per_user(synthetic):
    settings, split = synthetic
    counts = describe(split)
    assert counts["by"] == "user" and counts["sequences"] > 100
    assert counts["mean_length"] > 5
    assert 0 < counts["items"] <= GENERATOR.items
    # Users have several sessions; most test targets continue a session already begun.
    assert 0.5 < counts["test_with_session_part"] < 1.0
    seqs = load_sequences(settings.events_dir, catalog=settings.catalog_dir / "items.parquet")
    attributes = seqs.attributes
    assert attributes is not None and len(attributes.categories) == seqs.n_items + 1
    assert attributes.n_categories == GENERATOR.categories + 1  # + unknown
    assert (attributes.categories[1:] > 0).all() and (attributes.price_buckets[1:] > 0).all()
    assert (
        load_sequences(settings.events_dir, catalog=settings.catalog_dir / "none").attributes
        is None
    )


def test_baselines_beat_chance_and_als_by_a_wide_margin(evaluated):
    split, _, results = evaluated
    chance = chance_level(split)
    for name in ("most_popular", "item_knn", "als"):
        for part in ("valid", "test"):
            full, sampled = results[name][part]["full"], results[name][part]["sampled"]
            assert all(0.0 <= v <= 1.0 for v in (*full.values(), sampled["hr@10"]))
            assert full["recall@10"] >= full["ndcg@10"] >= 0.0
            assert sampled["hr@10"] >= full["recall@10"]  # sampled is the easier task
            assert sampled["hr@10"] > 2 * chance["hr@10"]
    assert results["most_popular"]["test"]["full"]["recall@10"] > 3 * chance["recall@10"]
    assert results["als"]["test"]["full"]["recall@10"] > 5 * chance["recall@10"]
    assert results["als"]["test"]["full"]["ndcg@10"] > 0.15
    assert results["item_knn"]["test"]["full"]["recall@10"] > 5 * chance["recall@10"]


def test_als_folds_a_history_in_as_spark_computes_its_user_factor(evaluated):
    split, als, _ = evaluated
    assert als.user_factors is not None
    folded = np.stack([als.history_vector(h) for h in split.train.seqs])
    np.testing.assert_allclose(folded, als.user_factors, atol=1e-4)


def test_als_without_a_known_history_scores_like_most_popular(evaluated):
    split, als, _ = evaluated
    popular = MostPopular()
    popular.fit(split)
    scores = als.score([np.zeros(0, dtype=np.int64)])
    np.testing.assert_array_equal(scores[0], popular.score([np.zeros(0, dtype=np.int64)])[0])
    assert als.known is not None
    if not als.known[1:].all():  # items only ever held out have no factors: ranked last
        row = als.score([split.train.seqs[0]])[0]
        assert np.isneginf(row[1:][~als.known[1:]]).all()


def test_run_evaluation_writes_the_report(synthetic, tmp_path):
    settings, _ = synthetic
    results, paths = run_evaluation(
        settings.events_dir, tmp_path / "out", [MostPopular()], dataset="synthetic (small)"
    )
    assert results[0]["model"] == "most_popular"
    md = paths[1].read_text()
    assert "synthetic (small)" in md and "Leave-last-out per user" in md
    assert json.loads(paths[0].read_text())["meta"]["counts"]["by"] == "user"


class IndexScorer:
    """Scores item j with j: a fixed, hand-checkable order."""

    name = "index"

    def fit(self, split: Split, progress=None) -> None:
        return None

    def score(self, histories, flags=None):
        return np.tile(np.arange(7, dtype=np.float32), (len(histories), 1))


def test_where_training_sequences_revisit_items_history_items_stay_candidates():
    items = [PAD, *(f"i{n}" for n in range(1, 7))]
    # Training parts [1, 2, 1, 2] and [4, 5, 4] revisit items; both test targets repeat.
    seqs = [np.array(s, dtype=np.int64) for s in ([1, 2, 1, 2, 3, 1], [4, 5, 4, 6, 5])]
    split = leave_last_out(Sequences(item_ids=items, keys=["a", "b"], seqs=seqs, by="session"))
    assert split.keep_history and describe(split)["history_candidates"]
    assert describe(split)["train_revisit_share"] == pytest.approx(3 / 5)
    test = evaluate(IndexScorer(), split)["test"]["full"]
    # a: target 1 below every other item (6 candidates) → 1/6; b: target 5 below 6 → 1/2.
    assert test["mrr"] == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert "the history's own included" in protocol(split)
    # Without revisits the history is excluded, and so is a target that repeats it.
    plain = leave_last_out(hand_sequences())
    assert not plain.keep_history and "counts as a miss" in protocol(plain)
    repeat = leave_last_out(
        Sequences(item_ids=items, keys=["a"], seqs=[np.array([1, 2, 3, 4, 2])], by="user")
    )
    assert not repeat.keep_history
    assert evaluate(IndexScorer(), repeat)["test"]["full"]["mrr"] == 0.0
