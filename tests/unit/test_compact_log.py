"""Log compaction: every row kept once, forgotten rows dropped, settled files only, an
interrupted run finished by the next, and the maintenance lock shared with erasure."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch.compact_log import MANIFEST_PREFIX, OUTPUT_PREFIX, compact_log
from inkling.errors import InvalidInputError
from inkling.events.eventlog import TOMBSTONE_FILE, maintenance_lock

OLD = time.time() - 7200


def write(folder: Path, name: str, ids: list[int], user: str = "u1", old: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "event_id": [f"e{i}" for i in ids],
            "user_id": [user] * len(ids),
            "session_id": [f"s-{user}"] * len(ids),
            # newest first within a file: compaction sorts them
            "timestamp": pa.array([10_000 - i for i in ids], pa.timestamp("us", tz="UTC")),
        }
    )
    path = folder / name
    pq.write_table(table, path)
    if old:
        os.utime(path, (OLD, OLD))
    return path


def ids_in(folder: Path) -> list[str]:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
    return sorted(
        e for p in files for e in pq.read_table(p, partitioning=None).column("event_id").to_pylist()
    )


def test_small_settled_files_become_few_sorted_files_with_every_row_once(tmp_path):
    day = tmp_path / "date=2026-11-01"
    for f in range(10):
        write(day, f"p0-{f:02d}.parquet", list(range(f * 4, f * 4 + 4)))
    fresh = write(day, "p0-fresh.parquet", [100, 101], old=False)  # the worker may replace it
    large = write(day, "p0-large.parquet", list(range(200, 220)))  # already large enough
    before = ids_in(day)

    report = compact_log(tmp_path, target_rows=16, progress=False)

    assert ids_in(day) == before  # nothing lost, nothing doubled
    assert fresh.exists() and large.exists()
    outputs = sorted(day.glob(f"{OUTPUT_PREFIX}*.parquet"))
    assert report.files_in == 10 and report.files_out == len(outputs) == 3  # 16 + 16 + 8 rows
    for path in outputs:
        times = pq.read_table(path, partitioning=None).column("timestamp")
        assert len(times) <= 16
        assert times.to_pylist() == sorted(times.to_pylist())
    assert not list(day.glob(f"{MANIFEST_PREFIX}*")) and not list(day.glob(".*.parquet"))
    assert compact_log(tmp_path, target_rows=16, progress=False).files_in == 0  # idempotent


def test_forgotten_users_rows_are_dropped(tmp_path):
    day = tmp_path / "date=2026-11-02"
    write(day, "a.parquet", [1, 2], user="gone")
    write(day, "b.parquet", [3, 4], user="stays")
    (tmp_path / TOMBSTONE_FILE).write_text(json.dumps({"user": "gone", "sessions": []}) + "\n")
    report = compact_log(tmp_path, target_rows=100, progress=False)
    assert report.dropped == 2 and ids_in(day) == ["e3", "e4"]


def test_a_run_cut_after_the_rename_is_finished_by_the_next(tmp_path):
    day = tmp_path / "date=2026-11-03"
    a, b = write(day, "a.parquet", [1, 2]), write(day, "b.parquet", [3, 4])
    merged = pa.concat_tables([pq.read_table(a, partitioning=None), pq.read_table(b)])
    pq.write_table(merged, day / f"{OUTPUT_PREFIX}cut.parquet")  # renamed in, inputs still there
    (day / f"{MANIFEST_PREFIX}cut.json").write_text(
        json.dumps(
            {"inputs": ["a.parquet", "b.parquet"], "outputs": [f"{OUTPUT_PREFIX}cut.parquet"]}
        )
    )
    report = compact_log(tmp_path, target_rows=100, progress=False)
    assert report.recovered == 2 and ids_in(day) == ["e1", "e2", "e3", "e4"]


def test_a_run_cut_before_the_rename_leaves_the_inputs_as_the_data(tmp_path):
    day = tmp_path / "date=2026-11-04"
    write(day, "a.parquet", [1, 2], old=False)
    write(day, "b.parquet", [3, 4], old=False)
    (day / f".{OUTPUT_PREFIX}cut.parquet").write_bytes(b"half a file")
    (day / f"{MANIFEST_PREFIX}cut.json").write_text(
        json.dumps(
            {"inputs": ["a.parquet", "b.parquet"], "outputs": [f"{OUTPUT_PREFIX}cut.parquet"]}
        )
    )
    report = compact_log(tmp_path, target_rows=100, progress=False)
    assert report.recovered == 0 and report.files_in == 0  # the inputs are too fresh
    assert ids_in(day) == ["e1", "e2", "e3", "e4"]
    assert sorted(p.name for p in day.iterdir()) == ["a.parquet", "b.parquet"]


def test_bad_input_is_refused_and_nothing_is_removed(tmp_path):
    with pytest.raises(InvalidInputError, match="target_rows"):
        compact_log(tmp_path, target_rows=1)
    with pytest.raises(InvalidInputError, match="min_age_s"):
        compact_log(tmp_path, min_age_s=-1)
    day = tmp_path / "date=2026-11-05"
    write(day, "a.parquet", [1, 2])
    other = day / "b.parquet"  # another schema: event_id as a number
    pq.write_table(pa.table({"event_id": [3], "user_id": ["u"]}), other)
    os.utime(other, (OLD, OLD))
    with pytest.raises(InvalidInputError, match="date=2026-11-05"):
        compact_log(tmp_path, target_rows=100, progress=False)
    assert sorted(p.name for p in day.iterdir() if not p.name.startswith("_")) == [
        "a.parquet",
        "b.parquet",
    ]
    assert compact_log(tmp_path / "missing", progress=False).files_in == 0


def test_compaction_waits_for_the_maintenance_lock_a_forget_holds(tmp_path):
    day = tmp_path / "date=2026-11-06"
    write(day, "a.parquet", [1])
    write(day, "b.parquet", [2])
    held, released = threading.Event(), []

    def forget() -> None:
        with maintenance_lock(tmp_path):
            held.set()
            time.sleep(0.5)
            released.append(time.monotonic())

    thread = threading.Thread(target=forget)
    thread.start()
    held.wait(5)
    compact_log(tmp_path, target_rows=100, progress=False)
    finished = time.monotonic()
    thread.join()
    assert released and finished >= released[0]
    assert pc.sum(pc.equal(pa.array(ids_in(day)), "e1")).as_py() == 1
