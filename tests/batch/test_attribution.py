"""Attribution on local Spark: a hand-made serve log and event log, every rule checked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batch.attribution import run_attribution
from inkling.events.eventlog import EventLog
from inkling.events.schema import conform, validate
from inkling.events.servelog import serve_table
from inkling.v1 import resources_pb2

pytestmark = pytest.mark.spark

T0 = datetime(2026, 11, 1, 23, 50, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def answer(
    request_id: str, minutes: float, items: list[str], user: str = "", session: str = "s1",
    arm: str = "",
) -> resources_pb2.ServeRecord:  # fmt: skip
    record = resources_pb2.ServeRecord(
        request_id=request_id,
        user_id=user,
        session_id=session,
        operation="recommend",
        item_ids=items,
        scores=[10.0 - k for k in range(len(items))],
        sources=[resources_pb2.CANDIDATE_SOURCE_ANN] * len(items),
        propensities=[1.0] * len(items),
        model_version="sasrec:v1",
        experiment="ranker-candidate" if arm else "",
        arm=arm,
    )
    record.served_at.FromDatetime(at(minutes))
    return record


# Answers (serve log), in order served; s1 is u1's session, s2 anonymous.
SERVES = [
    answer("r1", 0, ["A", "B", "C"], user="u1", arm="control"),
    answer("r2", 5, ["B", "D"], user="u1", arm="control"),
    answer("r3", 6, ["E", "A"], session="s2"),
    answer("r4", 20, ["F"], user="u1", session="s3", arm="candidate"),  # 2026-11-02
]

# (event_id, user, session, item, type, minutes, request_id); what each should do is named.
EVENTS = [
    ("view-A", "u1", "s1", "A", "item_view", 0.1, "r1"),  # shown, by id
    ("click-A", "u1", "s1", "A", "click", 1, "r1"),  # by id
    ("click-B-r1", "u1", "s1", "B", "click", 5.5, "r1"),  # by id: to r1, though r2 is newer
    ("cart-B", "u1", "s1", "B", "add_to_cart", 7, None),  # by user: the newest, r2
    ("click-E", None, "s2", "E", "click", 8, None),  # by session: r3
    ("click-A-s2", None, "s2", "A", "click", 40, None),  # past the 30-minute window: none
    ("click-D-early", "u1", "s1", "D", "click", 4, None),  # before r2 showed D: none
    ("click-D-early-id", "u1", "s1", "D", "click", 4.5, "r2"),  # before its own list: none
    ("buy-F", "u1", "s9", "F", "purchase", 25, None),  # by user, another session: r4
    ("click-C-lost", "u1", "s1", "C", "click", 2, "gone"),  # unknown id: none
    ("page", "u1", "s1", None, "page_view", 3, None),  # not an outcome
]


@pytest.fixture(scope="module")
def attributed(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("attribution")
    serves = serve_table(SERVES)
    dates = [r.served_at.ToDatetime(UTC).date().isoformat() for r in SERVES]
    for date in sorted(set(dates)):
        folder = root / "serves" / f"date={date}"
        folder.mkdir(parents=True)
        keep = pa.array([d == date for d in dates])
        pq.write_table(serves.filter(keep), folder / "stream-p0-1-2-w.parquet")
    names = ["event_id", "user_id", "session_id", "item_id", "event_type", "timestamp"]
    rows = [
        dict(zip([*names, "request_id"], (*e[:5], at(e[5]), e[6]), strict=True)) for e in EVENTS
    ]
    result = validate(conform(pa.Table.from_pylist(rows)))
    assert result.rejected == []
    EventLog(root / "events").append(result.valid)
    stats = run_attribution(spark, root / "serves", root / "events", root / "impressions", 1800)
    table = ds.dataset(str(root / "impressions"), partitioning="hive").to_table()
    return stats, {(r["request_id"], r["item_id"]): r for r in table.to_pylist()}


def labels(row: dict) -> tuple[bool, bool, bool, bool]:
    return row["shown"], row["clicked"], row["added_to_cart"], row["purchased"]


def test_every_served_item_is_one_impression_with_its_position_and_arm(attributed):
    _, rows = attributed
    assert sorted(rows) == [
        ("r1", "A"), ("r1", "B"), ("r1", "C"), ("r2", "B"), ("r2", "D"), ("r3", "A"),
        ("r3", "E"), ("r4", "F"),
    ]  # fmt: skip
    assert [rows[("r1", i)]["position"] for i in "ABC"] == [0, 1, 2]
    assert rows[("r3", "A")]["position"] == 1 and rows[("r3", "A")]["score"] == 9.0
    assert rows[("r1", "A")]["arm"] == "control" and rows[("r4", "F")]["arm"] == "candidate"
    assert rows[("r3", "E")]["arm"] is None and rows[("r1", "A")]["source"] == "ann"
    assert str(rows[("r4", "F")]["date"]) == "2026-11-02"  # partitioned by the date served
    assert str(rows[("r1", "A")]["date"]) == "2026-11-01"


def test_a_request_id_attributes_to_that_list_only(attributed):
    _, rows = attributed
    assert labels(rows[("r1", "A")]) == (True, True, False, False)
    assert rows[("r1", "B")]["clicked"] and not rows[("r2", "B")]["clicked"]
    assert not rows[("r1", "C")]["clicked"]  # its click named an answer never logged


def test_without_an_id_the_latest_list_of_the_user_or_session_gets_it(attributed):
    _, rows = attributed
    assert rows[("r2", "B")]["added_to_cart"] and not rows[("r1", "B")]["added_to_cart"]
    assert rows[("r3", "E")]["clicked"]
    assert rows[("r4", "F")]["purchased"]  # the same user in another session


def test_nothing_is_credited_to_a_later_list_or_past_the_window(attributed):
    _, rows = attributed
    assert not rows[("r2", "D")]["clicked"]  # both clicks on D came before r2 was served
    assert not rows[("r3", "A")]["clicked"]  # 34 minutes after r3


def test_the_stats_count_each_way_of_matching(attributed):
    stats, _ = attributed
    assert (stats.answers, stats.impressions, stats.outcome_events) == (4, 8, 10)
    assert stats.by_request_id == {"item_view": 1, "click": 2}
    assert stats.by_user_or_session == {"add_to_cart": 1, "click": 1, "purchase": 1}
    assert stats.unmatched_request_ids == 2  # "gone", and r2 named before it was served


def test_no_serve_log_says_how_one_is_made(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="serve_log on and a stream worker"):
        run_attribution(spark, tmp_path / "serves", tmp_path / "events", tmp_path / "out")


@pytest.mark.parametrize("p_request_id", [1.0, 0.0])
def test_attribution_recovers_what_the_simulated_users_did(spark, tmp_path, p_request_id):
    import numpy as np

    from batch.simulate import SimulationConfig, simulate
    from inkling.events.servelog import ServeLog

    rng = np.random.default_rng(2)
    items = pa.table(
        {
            "item_id": [f"i{i}" for i in range(300)],
            "category": [f"c{i % 6}" for i in range(300)],
            "price": rng.uniform(5, 50, 300),
        }
    )
    config = SimulationConfig(
        requests=1_500, users=300, hours=6, candidates=40, p_request_id=p_request_id, seed=9
    )
    sim = simulate(config, items)
    ServeLog(tmp_path / "serves").append(sim.serves)
    EventLog(tmp_path / "events").append(sim.events)
    stats = run_attribution(spark, tmp_path / "serves", tmp_path / "events", tmp_path / "out")
    got = ds.dataset(str(tmp_path / "out"), partitioning="hive").to_table()
    key = ["request_id", "item_id"]
    labels = ["shown", "clicked", "added_to_cart", "purchased"]
    truth = sim.impressions.select([*key, *labels]).to_pandas().set_index(key).sort_index()
    found = got.select([*key, *labels, "position", "arm"]).to_pandas().set_index(key).sort_index()
    assert len(found) == len(truth) == stats.impressions == 15_000
    agree = (found[labels] == truth[labels]).all(axis=1).mean()
    if p_request_id == 1.0:
        assert agree == 1.0  # every event named its answer
        assert stats.by_user_or_session == {}
    else:
        # By user and item only: a later answer that showed the same item to the same user
        # takes an outcome meant for an earlier one. Rare here, never more than that.
        assert agree > 0.99, agree
        assert stats.by_request_id == {}
    assert found["clicked"].sum() == truth["clicked"].sum()  # each click credited once
    imp = sim.impressions.to_pandas().set_index(key).sort_index()
    assert (found["position"] == imp["position"]).all() and (found["arm"] == imp["arm"]).all()
