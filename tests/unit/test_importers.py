import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.importers import FORMATS, import_file, sessionize
from inkling.errors import InklingError, InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from tests.conftest import dataset


def test_movielens_recbole_import(tmp_path):
    report = import_file(
        dataset("ml-100k/ml-100k.inter"), "recbole", tmp_path / "ev", tmp_path / "cat"
    )
    assert report.rows_read == 100_000
    assert report.events_appended == 100_000 and report.rejected == []
    assert report.items == 1682 and report.users == 943 and report.sessions > 943
    assert report.catalog_items == 1682 and report.user_profiles == 943
    assert report.timestamps == "epoch seconds (RecBole's timestamp field)"
    items = pq.read_table(tmp_path / "cat" / "items.parquet").to_pylist()
    toy = next(r for r in items if r["item_id"] == "1")
    assert toy["category"] == "Animation" and toy["title"] == "Toy Story"
    again = import_file(
        dataset("ml-100k/ml-100k.inter"), "recbole", tmp_path / "ev", tmp_path / "cat"
    )
    assert again.events_appended == 0 and len(again.rejected) == 100_000


def test_diginetica_import_keeps_sessions_and_anonymous_users(tmp_path):
    report = import_file(
        dataset("diginetica-sample/train-item-views.csv"),
        "diginetica",
        tmp_path / "ev",
        tmp_path / "c",
    )
    assert report.events_appended == report.rows_read > 12_000
    events = EventLog(tmp_path / "ev").read()
    assert events.column("user_id").null_count > 0
    assert pc.count_distinct(events.column("session_id")).as_py() > 900


def test_sasrec_lines_keep_order_and_bad_lines_are_reported(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10\n1 11\n1 12 13\n2 10\n\n2 14\n")
    report = import_file(path, "sasrec", tmp_path / "ev", tmp_path / "c")
    assert report.events_appended == 4
    assert [(b.line, b.reason) for b in report.rejected] == [(3, "expected 2 fields, found 3")]
    events = EventLog(tmp_path / "ev").read().sort_by("timestamp")
    assert events.column("item_id").to_pylist() == ["10", "11", "10", "14"]
    assert set(events.column("session_id").to_pylist()) == {"1-1", "2-1"}


def test_generic_csv_with_mapping_and_bad_rows(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(
        "visitor,product,when,action\n"
        "a,p1,2026-10-01T10:00:00,click\n"
        "a,p2,not-a-time,click\n"
        ",p3,2026-10-01T10:01:00,click\n"
        "b,p1,2026-10-01T10:02:00,stare\n"
        "b,p4,2026-10-01T10:03:00,purchase\n"
    )
    report = import_file(
        path, "csv", tmp_path / "ev", tmp_path / "c",
        mapping={"user_id": "visitor", "item_id": "product", "timestamp": "when", "event_type": "action"},
        timestamp_unit="iso",
    )  # fmt: skip
    assert report.events_appended == 2
    reasons = {b.line: b.reason for b in report.rejected}
    assert reasons[3] == "timestamp is not ISO-8601 text"
    assert reasons[5].startswith("event_type is not one of")
    assert reasons[4] == "user_id is missing and there is no session_id column"
    assert json.dumps(report.to_json())


def test_unreadable_files_fail_clearly_and_write_nothing(tmp_path):
    with pytest.raises(NotFoundError):
        import_file(tmp_path / "absent.inter", "recbole", tmp_path / "ev", tmp_path / "c")
    binary = tmp_path / "x.inter"
    binary.write_bytes(b"user_id:token\titem_id:token\n\xff\xfe\x00garbage\n")
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        import_file(binary, "recbole", tmp_path / "ev", tmp_path / "c")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InvalidInputError, match=r"empty\.csv is empty"):
        import_file(empty, "diginetica", tmp_path / "ev", tmp_path / "c")
    headerless = tmp_path / "h.csv"
    headerless.write_text("a;b\n1;2\n")
    with pytest.raises(InvalidInputError, match="required column"):
        import_file(headerless, "diginetica", tmp_path / "ev", tmp_path / "c")
    assert not EventLog(tmp_path / "ev").exists()
    assert not (tmp_path / "c").exists()


def test_sessionize_splits_at_thirty_minutes():
    import numpy as np

    t = np.array(
        ["2026-10-01T10:00", "2026-10-01T10:20", "2026-10-01T11:00", "2026-10-01T10:05"],
        dtype="datetime64[us]",
    )
    assert list(sessionize(np.array(["u", "u", "u", "v"], dtype=object), t)) == [
        "u-1",
        "u-1",
        "u-2",
        "v-1",
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(alphabet=st.sampled_from("ab;1 2\tNA-x"), max_size=25), max_size=25))
def test_malformed_diginetica_lines_are_counted_never_crash(tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "views.csv"
    path.write_text("session_id;user_id;item_id;timeframe;eventdate\n" + "\n".join(lines))
    non_blank = sum(1 for line in lines if line.strip())
    if non_blank == 0:  # a header and nothing else is refused, never "every row rejected"
        with pytest.raises(InvalidInputError, match="no rows to import, only a header line"):
            import_file(path, "diginetica", root / "ev", root / "c")
        return
    report = import_file(path, "diginetica", root / "ev", root / "c")
    assert report.rows_read == non_blank
    assert report.events_appended + len(report.rejected) == non_blank


def test_a_request_id_column_reaches_the_log_and_is_checked(tmp_path):
    path = tmp_path / "served.csv"
    long_id = "r" * 257
    path.write_text(
        "event_id,session_id,item_id,event_type,timestamp,shown_in\n"
        "e1,s1,i1,click,1760000000,abc123\n"
        "e2,s1,i2,click,1760000001,\n"
        f"e3,s1,i3,click,1760000002,{long_id}\n"
    )
    report = import_file(
        path, "csv", tmp_path / "ev", tmp_path / "c", mapping={"request_id": "shown_in"}
    )
    assert report.events_appended == 2
    assert [(b.line, b.reason) for b in report.rejected] == [
        (4, "request_id is empty or longer than 256 characters")
    ]
    logged = EventLog(tmp_path / "ev").read(["event_id", "request_id"]).to_pylist()
    assert sorted(logged, key=lambda r: r["event_id"]) == [
        {"event_id": "e1", "request_id": "abc123"},
        {"event_id": "e2", "request_id": None},
    ]


HEADERS = {
    "recbole": "user_id:token\titem_id:token\ttimestamp:float\n",
    "sasrec": "",
    "diginetica": "session_id;user_id;item_id;timeframe;eventdate\n",
    "csv": "user_id,item_id,timestamp,session_id\n",
    "parquet": "",
}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(FORMATS),
    header=st.booleans(),
    body=st.one_of(
        st.binary(max_size=300),  # anything, a binary file too
        st.lists(
            st.text(alphabet=st.sampled_from("ab1;,\t:. -NTZ\u00e9\x00"), max_size=30), max_size=20
        ).map(lambda lines: "\n".join(lines).encode()),
    ),
)
def test_malformed_files_of_every_format_get_a_report_or_a_clear_error(
    tmp_path_factory, fmt, header, body
):
    """Whatever the bytes: a report, or an InklingError naming the problem with nothing
    written; never another exception (a traceback for the user)."""
    root = tmp_path_factory.mktemp("malformed")
    path = root / f"input.{fmt}"
    path.write_bytes((HEADERS[fmt].encode() if header else b"") + body)
    try:
        report = import_file(path, fmt, root / "ev", root / "c")
    except InklingError as e:
        assert str(e)  # says what was wrong
        assert not EventLog(root / "ev").exists() and not (root / "c").exists()
        return
    assert report.events_appended + len(report.rejected) >= 0
    assert report.rows_read >= report.events_appended


def _csv(path, times: list[str], header: str = "user_id,item_id,timestamp") -> object:
    path.write_text(header + "\n" + "".join(f"u{i % 2},i{i},{t}\n" for i, t in enumerate(times)))
    return path


def _logged_times(root) -> list[str]:
    events = EventLog(root).read(["event_id", "timestamp"]).sort_by("event_id")
    return [t.isoformat() for t in events.column("timestamp").to_pylist()]


@pytest.mark.parametrize(
    ("times", "form", "expected"),
    [
        (["1704067200", "1704067260.5"], "epoch seconds",
         ["2024-01-01T00:00:00+00:00", "2024-01-01T00:01:00.500000+00:00"]),
        (["1704067200000", "1704067260000"], "epoch milliseconds",
         ["2024-01-01T00:00:00+00:00", "2024-01-01T00:01:00+00:00"]),
        (["1704067200000000", "1704067260000001"], "epoch microseconds",
         ["2024-01-01T00:00:00+00:00", "2024-01-01T00:01:00.000001+00:00"]),
        (["2024-01-01T00:00:00Z", "2024-01-01T02:01:00+02:00"], "ISO-8601 with a zone",
         ["2024-01-01T00:00:00+00:00", "2024-01-01T00:01:00+00:00"]),
        (["2024-01-01T00:00:00", "2024-01-01 00:01:00.25"], "ISO-8601 without a zone",
         ["2024-01-01T00:00:00+00:00", "2024-01-01T00:01:00.250000+00:00"]),
    ],
)  # fmt: skip
def test_the_timestamp_form_is_detected_and_said(tmp_path, times, form, expected):
    path = _csv(tmp_path / "mine.csv", times)
    report = import_file(path, "csv", tmp_path / "ev", tmp_path / "c")
    assert report.rejected == [] and report.events_appended == 2
    assert report.timestamps == f"{form} (detected; --timestamp-unit overrides)"
    assert f"timestamps: {form} (detected" in report.summary()
    assert _logged_times(tmp_path / "ev") == expected


def test_parquet_timestamps_are_read_as_they_are(tmp_path):
    import datetime as dt

    import pyarrow as pa

    path = tmp_path / "mine.parquet"
    pq.write_table(
        pa.table({
            "user_id": ["u1", "u1"], "item_id": ["i1", "i2"],
            "timestamp": pa.array([dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 1, 0, 1)],
                                  type=pa.timestamp("ms", tz="UTC")),
        }),
        path,
    )  # fmt: skip
    report = import_file(path, "parquet", tmp_path / "ev", tmp_path / "c")
    assert report.timestamps.startswith("Parquet timestamps (detected")
    assert _logged_times(tmp_path / "ev") == [
        "2024-01-01T00:00:00+00:00",
        "2024-01-01T00:01:00+00:00",
    ]


def test_a_column_that_mixes_forms_is_refused_with_the_lines_that_disagree(tmp_path):
    times = ["1704067200"] * 5 + ["1704067200000", "2024-01-01T00:00:00Z", "1704067300"]
    path = _csv(tmp_path / "mixed.csv", times)
    with pytest.raises(InvalidInputError) as refused:
        import_file(path, "csv", tmp_path / "ev", tmp_path / "c")
    message = str(refused.value)
    assert "mixes forms" in message
    assert "epoch seconds on 6 rows (lines 2, 3, 4, ...)" in message
    assert "epoch milliseconds on 1 row (line 7)" in message
    assert "ISO-8601 with a zone on 1 row (line 8)" in message
    assert "--timestamp-unit" in message
    assert not EventLog(tmp_path / "ev").exists() and not (tmp_path / "c").exists()
    # Zoned and zoneless text is a mix too: which zone the latter is in is a guess...
    _csv(path, ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00"])
    with pytest.raises(InvalidInputError, match=r"without a zone on 1 row \(line 3\)"):
        import_file(path, "csv", tmp_path / "ev", tmp_path / "c")
    # ...that the user can make: --timestamp-unit iso reads zoneless text as UTC.
    report = import_file(path, "csv", tmp_path / "ev", tmp_path / "c", timestamp_unit="iso")
    assert report.events_appended == 2 and report.timestamps == "ISO-8601 (--timestamp-unit iso)"


def test_a_chosen_unit_rejects_the_rows_that_do_not_fit_and_points_to_iso(tmp_path):
    path = _csv(tmp_path / "bad.csv", ["2024-01-01T00:00:00Z", "1704067200", ""])
    report = import_file(path, "csv", tmp_path / "ev", tmp_path / "c", timestamp_unit="s")
    assert report.events_appended == 1
    assert {b.line: b.reason for b in report.rejected} == {
        2: "timestamp is not a number (it is ISO-8601: --timestamp-unit iso)",
        4: "timestamp is missing",
    }


def test_every_reason_a_row_fails_is_reported(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "user_id,item_id,timestamp,event_type\n"
        "u1,i1,2024-01-01T00:00:00Z,click\n"
        "u1,,not-a-time,click\n"
        ",,2024-01-01T00:02:00Z,stare\n"
        "u2,i3,2024-01-01T00:03:00Z,stare\n"
    )
    report = import_file(path, "csv", tmp_path / "ev", tmp_path / "c")
    assert report.events_appended == 1
    reasons = {b.line: b.reason.split("; ") for b in report.rejected}
    assert reasons[3] == ["timestamp is not a number or an ISO-8601 time", "item_id is missing"]
    assert reasons[4][:2] == [
        "item_id is missing",
        "user_id is missing and there is no session_id column",
    ]
    assert reasons[4][2].startswith("event_type is not one of")
    assert len(reasons[5]) == 1 and reasons[5][0].startswith("event_type is not one of")
    counted = report.reasons()
    assert counted["item_id is missing"] == 2 and sum(counted.values()) == 6
    assert "  2 x item_id is missing (lines 3, 4)" in report.summary()


def test_empty_files_say_they_are_empty(tmp_path):
    for fmt, name in (("csv", "e.csv"), ("sasrec", "e.txt"), ("recbole", "e.inter")):
        (tmp_path / name).write_text("\n  \n" if fmt == "sasrec" else "")
        with pytest.raises(InvalidInputError, match=rf"{name} is empty$"):
            import_file(tmp_path / name, fmt, tmp_path / "ev", tmp_path / "c")
    header_only = tmp_path / "h.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(InvalidInputError, match=r"h\.csv has no rows to import, only a header"):
        import_file(header_only, "csv", tmp_path / "ev", tmp_path / "c")
    assert not EventLog(tmp_path / "ev").exists() and not (tmp_path / "c").exists()


def test_the_summary_counts_users_sessions_and_items_and_names_profile_rows(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10\n1 11\n2 10\n3 12\n3 12\n")
    report = import_file(path, "sasrec", tmp_path / "ev", tmp_path / "c")
    assert (report.users, report.sessions, report.items) == (3, 3, 3)
    assert report.catalog_items == 3 and report.user_profiles is None
    summary = report.summary()
    assert "5 events appended (3 users, 3 sessions, 3 items)" in summary
    assert "catalogue: 3 items\n" in summary + "\n" and "profile" not in summary
    assert report.timestamps.startswith("none in the file")
    # A second file adds to the catalogue; its own counts are of what it appended.
    more = tmp_path / "more.txt"
    more.write_text("4 13\n")
    again = import_file(more, "sasrec", tmp_path / "ev", tmp_path / "c")
    assert (again.users, again.items, again.catalog_items) == (1, 1, 4)
