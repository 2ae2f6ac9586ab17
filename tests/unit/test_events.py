from datetime import UTC, datetime, timedelta

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from inkling.events.schema import EVENT_SCHEMA, conform, row_problem, validate

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOOSE = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA])


def _table(rows: list[dict]) -> pa.Table:
    return conform(pa.Table.from_pylist(rows, schema=LOOSE))


BASE = {
    "event_id": "e1",
    "user_id": "u1",
    "session_id": "s1",
    "item_id": "i1",
    "event_type": "click",
    "timestamp": datetime(2026, 10, 1, tzinfo=UTC),
}


def test_valid_rows_pass_with_strict_schema():
    result = validate(
        _table([BASE, {**BASE, "event_id": "e2", "event_type": "page_view", "item_id": None}])
    )
    assert result.rejected == []
    assert result.valid.num_rows == 2
    assert result.valid.schema.remove_metadata() == EVENT_SCHEMA.remove_metadata()


def test_each_rule_names_its_reason_and_line():
    rows = [
        {**BASE, "event_id": None},
        {**BASE, "event_id": "e2", "event_type": "like"},
        {**BASE, "event_id": "e3", "item_id": None},
        {**BASE, "event_id": "e4", "event_type": "page_view"},
        {**BASE, "event_id": "e5", "timestamp": datetime(1970, 1, 1, tzinfo=UTC)},
        {**BASE, "event_id": "e6", "session_id": "   "},
        {**BASE, "event_id": "e7", "scroll_depth": 1.5},
        {**BASE, "event_id": "e8", "dwell_ms": -1},
        {**BASE, "event_id": "e9", "position": -2},
        {**BASE, "event_id": "e10"},
        {**BASE, "event_id": "e10"},
    ]
    result = validate(_table(rows), lines=list(range(10, 21)))
    reasons = {bad.line: bad.reason for bad in result.rejected}
    assert reasons == {
        10: "event_id is missing",
        11: "event_type is not one of page_view, item_view, click, add_to_cart, purchase",
        12: "item_id is missing for an item event",
        13: "item_id must be absent for a page_view",
        14: "timestamp is outside 1990-01-01 .. 2100-01-01",
        15: "session_id is empty or longer than 256 characters",
        16: "scroll_depth is outside 0 .. 1",
        17: "dwell_ms is outside 0 .. 86400000",
        18: "position is negative",
        20: "duplicate event_id",
    }
    assert result.valid.column("event_id").to_pylist() == ["e10"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "event_id": st.one_of(st.none(), st.text(max_size=300)),
                "session_id": st.one_of(st.none(), st.text(max_size=5)),
                "item_id": st.one_of(st.none(), st.text(max_size=5)),
                "event_type": st.one_of(
                    st.none(), st.sampled_from(["click", "page_view", "bogus", ""])
                ),
                "timestamp": st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
                "scroll_depth": st.one_of(st.none(), st.floats(allow_nan=True)),
                "dwell_ms": st.one_of(st.none(), st.integers(-(2**40), 2**40)),
            }
        ),
        max_size=30,
    )
)
def test_every_row_is_either_kept_or_rejected_with_a_reason(rows):
    table = conform(pa.Table.from_pylist(rows, schema=pa.schema([
        ("event_id", pa.string()), ("session_id", pa.string()), ("item_id", pa.string()),
        ("event_type", pa.string()), ("timestamp", pa.timestamp("us", tz="UTC")),
        ("scroll_depth", pa.float64()), ("dwell_ms", pa.int64()),
    ])))  # fmt: skip
    result = validate(table)
    assert result.valid.num_rows + len(result.rejected) == len(rows)
    assert all(bad.reason for bad in result.rejected)
    assert len(set(result.valid.column("event_id").to_pylist())) == result.valid.num_rows


_IDS = st.one_of(
    st.none(),
    st.text(max_size=4),
    st.sampled_from(["", " ", "\t\u3000", "\x1c", "a" * 256, "b" * 257, "é" * 257]),
)
_EDGES = {
    "session_id": _IDS,
    "user_id": _IDS,
    "item_id": _IDS,
    "event_type": st.one_of(
        st.none(), st.sampled_from(["click", "page_view", "item_view", "bogus", ""])
    ),
    "timestamp": st.one_of(
        st.none(),
        st.datetimes(timezones=st.just(UTC)),
        st.sampled_from(
            [
                datetime(1990, 1, 1, tzinfo=UTC),
                datetime(1989, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                datetime(2100, 1, 1, tzinfo=UTC),
            ]
        ),
    ),
    "dwell_ms": st.one_of(
        st.none(), st.integers(-(2**40), 2**40), st.sampled_from([-1, 0, 86_400_000, 86_400_001])
    ),
    "scroll_depth": st.one_of(
        st.none(), st.floats(allow_nan=True), st.sampled_from([0.0, -0.0, 1.0, 1.0000001, -1e-9])
    ),
    "position": st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0])),
    "request_id": _IDS,
}
VALID = {**BASE, "dwell_ms": 10, "scroll_depth": 0.5, "position": 3}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_one_row_at_a_time_gives_the_batch_rules_reasons(data):
    """`row_problem` (the stream worker's per-event check) and `validate` (imports) agree
    on every row: rejected or not, and for which reason. Rows are valid but for one to
    three fields drawn from edge cases, so every rule is reached."""
    rows = []
    for i in range(data.draw(st.integers(1, 8))):
        broken = data.draw(st.sets(st.sampled_from(sorted(_EDGES)), min_size=1, max_size=3))
        row = {**VALID, **{name: data.draw(_EDGES[name]) for name in broken}}
        rows.append({**row, "event_id": None if i % 7 == 6 else f"e{i}"})
    result = validate(_table(rows))
    batch = {bad.line - 1: bad.reason for bad in result.rejected}
    for i, row in enumerate(rows):
        ts = row["timestamp"]
        one = row_problem(
            row["event_id"],
            row["session_id"],
            row["event_type"],
            None if ts is None else (ts - EPOCH) // timedelta(microseconds=1),
            user_id=row["user_id"],
            item_id=row["item_id"],
            dwell_ms=row["dwell_ms"],
            scroll_depth=row["scroll_depth"],
            position=row["position"],
            request_id=row.get("request_id"),
        )
        assert one == batch.get(i), (row, one, batch.get(i))
