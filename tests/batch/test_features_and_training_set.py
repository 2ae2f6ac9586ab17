"""Spark feature jobs and point-in-time training sets on a hand-built timeline."""

from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from batch.features import compute_features
from batch.importers import write_table_atomic
from batch.training_set import build_training_set
from inkling.events.eventlog import EventLog
from inkling.events.schema import ITEM_SCHEMA, conform, validate
from inkling.feature_store.feast_store import feast_cli, open_store
from tests.conftest import temp_settings

pytestmark = pytest.mark.spark


def t(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 10, day, hour, minute, tzinfo=UTC)


# u1 shops on day 1 and day 2; session s2 (day 2) clicks A, then carts B, then clicks C.
TIMELINE = [
    ("e01", "u1", "s1", None, "page_view", t(1, 9)),
    ("e02", "u1", "s1", "A", "item_view", t(1, 9)),
    ("e03", "u1", "s1", "A", "click", t(1, 9, 1)),
    ("e04", "u1", "s1", "A", "purchase", t(1, 9, 5)),
    ("e05", "u2", "s9", "B", "click", t(1, 12)),
    ("e06", "u1", "s2", "A", "click", t(2, 10)),
    ("e07", "u1", "s2", "B", "item_view", t(2, 10, 1)),
    ("e08", "u1", "s2", "B", "add_to_cart", t(2, 10, 2)),
    ("e09", "u1", "s2", "C", "click", t(2, 10, 3)),
    ("e10", "u2", "s8", "C", "click", t(3, 8)),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark):
    settings = temp_settings(tmp_path_factory.mktemp("timeline"), online_store="sqlite")
    rows = [
        dict(
            zip(
                ["event_id", "user_id", "session_id", "item_id", "event_type", "timestamp"],
                r,
                strict=True,
            )
        )
        for r in TIMELINE
    ]
    result = validate(conform(pa.Table.from_pylist(rows)))
    assert result.rejected == []
    EventLog(settings.events_dir).append(result.valid)
    items = pa.Table.from_pylist(
        [
            {
                "item_id": "A",
                "category": "shoes",
                "price": 10.0,
                "created_at": t(1, 0),
                "title": None,
                "in_stock": True,
                "blocked": False,
            },
            {
                "item_id": "B",
                "category": "hats",
                "price": 30.0,
                "created_at": t(1, 0),
                "title": None,
                "in_stock": False,
                "blocked": False,
            },
            {
                "item_id": "C",
                "category": "hats",
                "price": None,
                "created_at": None,
                "title": None,
                "in_stock": True,
                "blocked": True,
            },
        ],
        schema=ITEM_SCHEMA,
    )
    write_table_atomic(items, settings.catalog_dir / "items.parquet")
    outputs = compute_features(
        spark, settings.events_dir, settings.catalog_dir, settings.features_dir
    )
    feast_cli(settings, "apply", quiet=True)
    return settings, outputs


def _read(settings, name):
    return ds.dataset(str(settings.features_dir / name)).to_table().to_pandas()


def test_item_features_are_daily_snapshots(built):
    settings, outputs = built
    items = _read(settings, "item_features").set_index(["item_id", "event_timestamp"])
    a_day1 = items.loc[("A", pd.Timestamp("2026-10-02", tz="UTC"))]
    assert (a_day1.item_pop_1d, a_day1.item_ctr_30d, a_day1.item_cvr_30d) == (2, 1.0, 1.0)
    a_day3 = items.loc[("A", pd.Timestamp("2026-10-04", tz="UTC"))]
    assert (a_day3.item_pop_1d, a_day3.item_pop_7d) == (0, 3)
    # C has no creation time: it is born at its first event (day 2).
    c_rows = items.loc["C"]
    assert c_rows.index.min() == pd.Timestamp("2026-10-03", tz="UTC")
    assert pd.isna(c_rows.iloc[0].item_price)
    availability = items.groupby(level="item_id")[["item_in_stock", "item_blocked"]].first()
    assert availability.to_dict("index") == {
        "A": {"item_in_stock": True, "item_blocked": False},
        "B": {"item_in_stock": False, "item_blocked": False},
        "C": {"item_in_stock": True, "item_blocked": True},
    }
    assert outputs.rows["item_features"] == 3 + 3 + 2


def test_user_and_session_features(built):
    settings, _ = built
    users = _read(settings, "user_features").set_index(["user_id", "event_timestamp"])
    day2 = users.loc[("u1", pd.Timestamp("2026-10-03", tz="UTC"))]
    assert (day2.user_clicks, day2.user_purchases, day2.user_carts) == (3, 1, 1)
    assert list(day2.user_last_items) == ["A", "A", "A", "B", "C"]
    # A was bought on day 1; a cart is not a purchase.
    assert list(day2.user_purchased_items) == ["A"]
    u2 = users.loc[("u2", pd.Timestamp("2026-10-02", tz="UTC"))]
    assert list(u2.user_purchased_items) == []
    # weights: shoes 1+5+1 = 7, hats 3+1 = 4
    assert list(day2.user_top_categories) == ["shoes", "hats"]
    assert list(day2.user_top_category_weights) == pytest.approx([7 / 11, 4 / 11])
    sessions = _read(settings, "session_features")
    s2 = sessions[sessions.session_id == "s2"].sort_values("event_timestamp")
    assert [list(x) for x in s2.session_recent_items] == [["A"], ["A"], ["A", "B"], ["A", "B", "C"]]
    # clicks weigh their dwell (1 s minimum), add_to_cart 30: hats lead once B is carted.
    assert list(s2.session_intent_category) == ["shoes", "shoes", "hats", "hats"]
    covisit = _read(settings, "covisitation")
    pairs = {(r.item_id, r.neighbor_id): r.count for r in covisit.itertuples()}
    assert pairs[("A", "B")] == 1 and pairs[("B", "C")] == 1 and ("A", "A") not in pairs


def test_training_set_is_point_in_time_correct(built, spark):
    settings, _ = built
    store = open_store(settings)
    ts = build_training_set(
        spark, store, settings.events_dir, settings.training_dir, kind="next-item"
    )
    frame = ts.frame.set_index("label_timestamp")
    assert len(frame) == 7
    row = frame.loc[pd.Timestamp(t(2, 10, 3))]  # u1 clicks C in s2
    # session: A clicked and B carted before; not C itself.
    assert list(row.session_recent_items) == ["A", "B"]
    assert row.session_clicks == 1 and row.session_carts == 1
    # user: only the day-1 snapshot (stamped day 2, 00:00); nothing from day 2.
    assert row.user_clicks == 1 and list(row.user_last_items) == ["A", "A"]
    # item C: first snapshot is stamped 2026-10-03 00:00, after this label: no value.
    assert pd.isna(row.item_pop_1d)
    for _, r in ts.frame.iterrows():
        for col in ("session_last_event_timestamp", "user_last_event_timestamp"):
            if not pd.isna(r[col]):
                assert r[col] < r.label_timestamp, (col, r.label_timestamp)
    first = frame.loc[pd.Timestamp(t(2, 10))]  # first click of s2: empty session so far
    assert pd.isna(first.session_clicks)
    clicks = build_training_set(
        spark, store, settings.events_dir, settings.training_dir, kind="click"
    )
    assert sorted(clicks.frame.label.tolist()) == [
        0,
        1,
    ]  # B shown then not clicked; A shown then clicked


def test_spark_reads_a_log_mixing_event_schema_versions(spark, tmp_path):
    """Files of version 1 (no request_id) and 2 in one log: every row, request_id null
    where a file lacks it."""
    import pyarrow.parquet as pq

    from batch.features import read_events

    def events(event_id: str, day: int) -> pa.Table:
        row = {"event_id": event_id, "session_id": "s", "item_id": "i", "event_type": "click",
               "timestamp": datetime(2026, 10, day, 12, tzinfo=UTC)}  # fmt: skip
        return validate(conform(pa.Table.from_pylist([row]))).valid

    log = EventLog(tmp_path / "events")
    log.append(events("new", 2).set_column(11, "request_id", pa.array(["r1"])))
    (tmp_path / "events" / "date=2026-10-01").mkdir(parents=True)
    pq.write_table(
        events("old", 1).drop_columns(["request_id"]),
        tmp_path / "events" / "date=2026-10-01" / "v1.parquet",
    )
    rows = read_events(spark, str(tmp_path / "events")).collect()
    assert {r.event_id: r.request_id for r in rows} == {"new": "r1", "old": None}
    assert {r.event_id: str(r.day) for r in rows} == {"new": "2026-10-02", "old": "2026-10-01"}
