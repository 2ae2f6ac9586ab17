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


@dataclass(frozen=True)
class PlannedFile:
    """One file of a micro-batch: its path relative to the log's root and its rows."""

    relative: str
    table: pa.Table


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


class StreamLogWriter:
    """Writes micro-batch files into the event log rooted at `root`."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def plan(
        self, partition: int, first_id: str, last_id: str, worker_id: str, events: pa.Table
    ) -> list[PlannedFile]:
        """The files of one partition's micro-batch (one per UTC date of its events)."""
        if events.num_rows == 0:
            return []
        events = events.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])
        dates = pc.strftime(events.column("timestamp"), format="%Y-%m-%d", locale="C")
        name = f"stream-p{partition}-{first_id}-{last_id}-{_safe(worker_id)}.parquet"
        return [
            PlannedFile(
                f"date={date}/{name}",
                events.filter(pc.equal(dates, date)).replace_schema_metadata(EVENT_SCHEMA.metadata),
            )
            for date in pc.unique(dates).to_pylist()
        ]

    def write(self, files: list[PlannedFile]) -> None:
        """Write each file under `_staging/` and move it into its date partition."""
        staging = self.root / "_staging"
        staging.mkdir(parents=True, exist_ok=True)
        touched_dirs: set[Path] = set()
        for f in files:
            final = self.root / f.relative
            tmp = staging / f"{final.parent.name}.{final.name}.tmp"
            pq.write_table(f.table, tmp)
            if self.fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            touched_dirs.add(final.parent)
        if self.fsync:
            for directory in touched_dirs:
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def remove(self, relative_paths: list[str]) -> int:
        """Delete files (and their staging copies) of a batch that did not commit."""
        removed = 0
        for relative in relative_paths:
            path = self.root / relative
            if not path.resolve().is_relative_to(self.root.resolve()):
                continue  # never delete outside the log, whatever Redis says
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            staged = self.root / "_staging" / f"{path.parent.name}.{path.name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        return removed
