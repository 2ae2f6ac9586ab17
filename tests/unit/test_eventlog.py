from datetime import UTC, datetime

import pyarrow as pa
import pytest

from inkling.events.eventlog import EventLog
from inkling.events.schema import conform, validate


def _events(ids: list[str], day: int = 1) -> pa.Table:
    rows = [
        {"event_id": i, "user_id": "u", "session_id": "s", "item_id": "x", "event_type": "click",
         "timestamp": datetime(2026, 10, day, 12, tzinfo=UTC)}
        for i in ids
    ]  # fmt: skip
    return validate(conform(pa.Table.from_pylist(rows))).valid


def test_append_partitions_by_date_and_refuses_logged_ids(tmp_path):
    log = EventLog(tmp_path / "events")
    first = log.append(pa.concat_tables([_events(["a", "b"], 1), _events(["c"], 2)]))
    assert first.appended == 3
    assert sorted(p.parent.name for p in first.files) == ["date=2026-10-01", "date=2026-10-02"]
    again = log.append(_events(["b", "d"], 3), lines=[7, 8])
    assert again.appended == 1
    assert [(d.line, d.reason) for d in again.duplicates] == [(7, "event_id already in the log")]
    assert sorted(log.read(["event_id"]).column("event_id").to_pylist()) == ["a", "b", "c", "d"]
    assert not any((tmp_path / "events" / "_staging").iterdir())


def test_unvalidated_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="validate them first"):
        EventLog(tmp_path).append(pa.table({"event_id": ["a"]}))
    assert not EventLog(tmp_path).exists()


def test_a_version_1_file_still_reads_with_request_id_null(tmp_path):
    """Logs written before `request_id` (event schema version 1) read beside new ones."""
    import pyarrow.parquet as pq

    from inkling.events.schema import EVENT_SCHEMA

    log = EventLog(tmp_path / "events")
    log.append(_events(["new"], 2).set_column(11, "request_id", pa.array(["r1"])))
    old = _events(["old"], 1).drop_columns(["request_id"])
    v1 = old.replace_schema_metadata({b"inkling.event_schema_version": b"1"})
    (tmp_path / "events" / "date=2026-10-01").mkdir(parents=True)
    pq.write_table(v1, tmp_path / "events" / "date=2026-10-01" / "v1.parquet")
    table = log.read()
    assert table.schema.names == EVENT_SCHEMA.names
    got = dict(
        zip(
            table.column("event_id").to_pylist(),
            table.column("request_id").to_pylist(),
            strict=True,
        )
    )
    assert got == {"old": None, "new": "r1"}
