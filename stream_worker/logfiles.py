"""The worker's side of the event log: one Parquet file per partition, micro-batch and date.

`inkling.events.eventlog.EventLog.append` refuses ids already logged by reading every
event id of the log first, which is right for imports and far too slow every 50 ms.
The worker gets the same guarantee (each event once in the log) another way: files
are named by partition, first and last stream entry id and worker
(`date=<d>/stream-p<p>-<first>-<last>-<worker>.parquet`), written under `_staging/`
(readers skip names starting with `_`) and moved into place with `os.replace`, and
the worker records them in Redis as in flight before writing them. The commit
transaction that applies the batch clears that record; whoever owns the partition
next deletes what is still recorded (files of a batch that never committed) before
it processes the batch again. See the `stream_worker` module docstring.

The same flush writes the partition's serve records (`inkling.events.servelog`) into the
serve log, named the same way under its own root; in Redis their paths carry the prefix
`SERVE_PREFIX` (an event log path always starts with `date=`), so one record of files in
flight covers both logs.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inkling.events.schema import EVENT_SCHEMA
from inkling.events.servelog import SERVE_SCHEMA
from inkling.fsync import fsync_path

SERVE_PREFIX = "serves/"
"""How the path of a serve log file starts, relative to the writer (see the module doc)."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of a micro-batch: its path relative to the log's root and its rows."""

    relative: str
    table: pa.Table


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


def _name(partition: int, first_id: str, last_id: str, worker_id: str) -> str:
    return f"stream-p{partition}-{first_id}-{last_id}-{_safe(worker_id)}.parquet"


class StreamLogWriter:
    """Writes micro-batch files into the event log rooted at `root` and the serve log
    rooted at `serve_root`."""

    def __init__(self, root: Path, serve_root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.serve_root = Path(serve_root)
        self.fsync = fsync

    def plan(
        self, partition: int, first_id: str, last_id: str, worker_id: str, events: pa.Table
    ) -> list[PlannedFile]:
        """The event log files of one partition's micro-batch (one per UTC date)."""
        if events.num_rows == 0:
            return []
        events = events.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])
        return self._by_date(
            "", "timestamp", _name(partition, first_id, last_id, worker_id), events, EVENT_SCHEMA
        )

    def plan_serves(
        self, partition: int, first_id: str, last_id: str, worker_id: str, serves: pa.Table
    ) -> list[PlannedFile]:
        """The serve log files of one partition's micro-batch (one per UTC date served)."""
        if serves.num_rows == 0:
            return []
        serves = serves.sort_by([("served_at", "ascending"), ("request_id", "ascending")])
        name = _name(partition, first_id, last_id, worker_id)
        return self._by_date(SERVE_PREFIX, "served_at", name, serves, SERVE_SCHEMA)

    @staticmethod
    def _by_date(
        prefix: str, column: str, name: str, table: pa.Table, schema: pa.Schema
    ) -> list[PlannedFile]:
        dates = pc.strftime(table.column(column), format="%Y-%m-%d", locale="C")
        return [
            PlannedFile(
                f"{prefix}date={date}/{name}",
                table.filter(pc.equal(dates, date)).replace_schema_metadata(schema.metadata),
            )
            for date in pc.unique(dates).to_pylist()
        ]

    def _locate(self, relative: str) -> tuple[Path, Path]:
        """(the log's root, the file's path) of a planned file's relative path."""
        if relative.startswith(SERVE_PREFIX):
            return self.serve_root, self.serve_root / relative.removeprefix(SERVE_PREFIX)
        return self.root, self.root / relative

    def write(self, files: list[PlannedFile]) -> None:
        """Write each file under `_staging/` and move it into its date partition."""
        touched_dirs: set[Path] = set()
        for f in files:
            root, final = self._locate(f.relative)
            staging = root / "_staging"
            staging.mkdir(parents=True, exist_ok=True)
            tmp = staging / f"{final.parent.name}.{final.name}.tmp"
            pq.write_table(f.table, tmp)
            if self.fsync:
                fsync_path(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            touched_dirs.add(final.parent)
        if self.fsync:
            for directory in touched_dirs:
                fsync_path(directory)

    def remove(self, relative_paths: list[str]) -> int:
        """Delete files (and their staging copies) of a batch that did not commit."""
        removed = 0
        for relative in relative_paths:
            root, path = self._locate(relative)
            if not path.resolve().is_relative_to(root.resolve()):
                continue  # never delete outside the log, whatever Redis says
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            staged = root / "_staging" / f"{path.parent.name}.{path.name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        return removed
