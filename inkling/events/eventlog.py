"""The event log: append-only Parquet, partitioned by UTC date.

Layout under the log's root::

    date=2026-11-01/part-<batch>.parquet
    date=2026-11-02/part-<batch>.parquet
    _staging/                 (in-flight appends; readers ignore names starting with _)

An append writes every file of its batch under ``_staging`` first and only then
moves them into their partitions, so a failed append leaves nothing a reader sees.
Files are rewritten only to erase a user (`inkling.erasure`). Event ids already in the
log are refused (reported as duplicates), which makes a replayed batch a no-op; so are
rows of a forgotten user or session (`TOMBSTONE_FILE`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from inkling.errors import InvalidInputError
from inkling.events.schema import EVENT_SCHEMA, BadRow

TOMBSTONE_FILE = "_forgotten.jsonl"
"""Users and sessions that were forgotten (`inkling.erasure`), one JSON object a line, in
the log's root; `append` refuses their rows."""

MAINTENANCE_LOCK = ".maintenance.lock"
"""A log root's lock file (`maintenance_lock`)."""


@contextlib.contextmanager
def maintenance_lock(root: Path) -> Iterator[None]:
    """Hold `root`'s maintenance lock (an exclusive ``flock``) while rewriting its files.

    Compaction (`batch.compact_log`) and erasure (`inkling.erasure`) each replace files
    they read: run together, a compaction could write back the rows a forget had just
    removed. Both take this lock, so one waits for the other. Appenders (the import,
    the stream worker) write new files only and need no lock. A root that does not
    exist has nothing to rewrite: no lock is taken and none is made.
    """
    if not root.is_dir():
        yield
        return
    with open(root / MAINTENANCE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


@dataclass(frozen=True)
class Tombstones:
    """Forgotten users and sessions as the offline side reads them (`TOMBSTONE_FILE`)."""

    users: frozenset[str] = frozenset()
    sessions: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.users or self.sessions)

    def mask(self, table: pa.Table) -> pa.Array:
        """True for each row of `table` that belongs to a forgotten user or session."""
        hit = pa.array([False] * table.num_rows)
        for column, values in (("user_id", self.users), ("session_id", self.sessions)):
            if values and column in table.column_names:
                found = pc.is_in(table.column(column), value_set=pa.array(sorted(values)))
                hit = pc.or_(hit, pc.fill_null(found, False))
        return hit

    @classmethod
    def read(cls, events_dir: Path) -> Tombstones:
        path = Path(events_dir) / TOMBSTONE_FILE
        users: set[str] = set()
        sessions: set[str] = set()
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return cls()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):
                    continue  # a write cut short by a crash: its forget is redone when rerun
                raise InvalidInputError(f"{path}:{number} is not a tombstone record") from None
            users.add(str(record["user"]))
            sessions.update(str(s) for s in record.get("sessions", ()))
        return cls(frozenset(users), frozenset(sessions))


@dataclass(frozen=True)
class AppendResult:
    """What an append wrote."""

    appended: int
    duplicates: list[BadRow]
    files: list[Path]


class EventLog:
    """The Parquet event log rooted at `root` (a directory, created on first append)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def exists(self) -> bool:
        return any(self.root.glob("date=*/*.parquet"))

    def dataset(self) -> ds.Dataset:
        return ds.dataset(
            str(self.root), format="parquet", partitioning=PARTITIONING, schema=self._schema()
        )

    @staticmethod
    def _schema() -> pa.Schema:
        return EVENT_SCHEMA.append(pa.field("date", pa.string()))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole log (or some columns), without the partition column unless asked."""
        if not self.exists():
            return (
                EVENT_SCHEMA.empty_table()
                if columns is None
                else EVENT_SCHEMA.empty_table().select(columns)
            )
        wanted = columns if columns is not None else EVENT_SCHEMA.names
        return self.dataset().to_table(columns=wanted)

    def event_ids(self) -> pa.ChunkedArray:
        return self.read(["event_id"]).column("event_id")

    def append(self, events: pa.Table, lines: np.ndarray | None = None) -> AppendResult:
        """Append validated events; rows whose event_id is already logged are refused.

        Args:
            events: rows with exactly the event schema (see `inkling.events.schema.validate`).
            lines: source line per row, used to report duplicates.
        """
        if events.schema.remove_metadata() != EVENT_SCHEMA.remove_metadata():
            raise ValueError("events do not have the event schema; validate them first")
        line_numbers = np.arange(1, events.num_rows + 1) if lines is None else np.asarray(lines)
        duplicates: list[BadRow] = []
        existing = self.event_ids()
        if len(existing):
            # Arrow's hash lookup; numpy's isin on object arrays is quadratic (minutes at 100k).
            seen = np.asarray(
                pc.is_in(events.column("event_id"), value_set=existing).to_numpy(
                    zero_copy_only=False
                )
            )
            duplicates = [
                BadRow(int(line_numbers[i]), "event_id already in the log")
                for i in np.flatnonzero(seen)
            ]
            events = events.filter(pa.array(~seen))
            line_numbers = line_numbers[~seen]
        forgotten = Tombstones.read(self.root)
        if forgotten and events.num_rows:
            hit = np.asarray(forgotten.mask(events).to_numpy(zero_copy_only=False), dtype=bool)
            duplicates += [
                BadRow(int(line_numbers[i]), "the user or session was forgotten (inkling forget)")
                for i in np.flatnonzero(hit)
            ]
            events = events.filter(pa.array(~hit))
        if events.num_rows == 0:
            return AppendResult(0, duplicates, [])

        batch = uuid.uuid4().hex
        staging = self.root / "_staging" / batch
        staging.mkdir(parents=True, exist_ok=True)
        events = events.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])
        dates = pc.strftime(events.column("timestamp"), format="%Y-%m-%d", locale="C")
        staged: list[tuple[Path, Path]] = []
        try:
            for date in pc.unique(dates).to_pylist():
                part = events.filter(pc.equal(dates, date))
                src = staging / f"date={date}" / f"part-{batch}.parquet"
                src.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(part.replace_schema_metadata(EVENT_SCHEMA.metadata), src)
                staged.append((src, self.root / f"date={date}" / src.name))
            moved: list[Path] = []
            try:
                for src, dst in staged:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                    moved.append(dst)
            except BaseException:
                for dst in moved:
                    dst.unlink(missing_ok=True)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return AppendResult(events.num_rows, duplicates, [dst for _, dst in staged])
