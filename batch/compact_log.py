"""Compaction of the event and serve logs: many small Parquet files into few large ones.

The stream worker writes one file per partition per flush (every few seconds), so a
busy day holds tens of thousands of small files; every Spark job then pays a task and
a footer read per file. `compact_log` rewrites each date folder's small files as files
of about `target_rows` rows, sorted by time, and removes the small ones.

Guarantees:

- **No row lost or doubled in the result.** Output files are written under a hidden name
  (readers skip names starting with ``.``), fsynced, renamed in, the folder fsynced, and
  only then are the inputs removed. A crash before the rename leaves the inputs as they
  were (and a hidden file the next run removes); a crash after it leaves inputs and
  output both visible, and the next run finds the output's manifest
  (``_compacted-*.json``, written before the rename) and removes the inputs it names.
- **Only settled files.** A file younger than `min_age_s` is left alone: the stream
  worker may still delete a file it wrote but did not commit (after a crash the next
  owner removes such files by name and re-reads their entries), and a compaction that
  had already merged it would keep its rows twice. The default (an hour) is far beyond
  the worker's lease and flush interval.
- **Forgotten users stay forgotten.** Rows of tombstoned users and sessions
  (``_forgotten.jsonl``) are dropped, and the job holds the log's maintenance lock
  (`inkling.events.eventlog.maintenance_lock`), which a forget also takes, so the two
  never interleave.

Not atomic for a concurrent reader: between the rename and the removal of the inputs
(milliseconds per folder) a reader listing the folder sees both. Schedule compaction
before, not during, the batch jobs (it is one of them).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inkling.errors import InvalidInputError
from inkling.events.eventlog import Tombstones, maintenance_lock
from inkling.fsync import fsync_path

MANIFEST_PREFIX = "_compacted-"
OUTPUT_PREFIX = "compacted-"


@dataclass
class CompactionReport:
    folders: int = 0
    """Date folders compacted."""
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    """Rows written to the compacted files."""
    dropped: int = 0
    """Rows of forgotten users or sessions left out."""
    recovered: int = 0
    """Inputs of an earlier, interrupted run removed."""
    seconds: float = 0.0
    per_folder: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Folder -> (files in, files out)."""

    def summary(self) -> str:
        return (
            f"compacted {self.files_in} files into {self.files_out} in {self.folders} date "
            f"folders ({self.rows:,} rows; {self.dropped} rows of forgotten users dropped; "
            f"{self.recovered} leftovers of an interrupted run removed) in {self.seconds:.1f} s"
        )


def _recover(folder: Path) -> int:
    """Finish an interrupted run: remove the inputs a manifest names whose output is in
    place, then the manifest; remove hidden outputs that never got renamed."""
    removed = 0
    for manifest in sorted(folder.glob(f"{MANIFEST_PREFIX}*.json")):
        record = json.loads(manifest.read_text())
        if all((folder / name).exists() for name in record["outputs"]):
            for name in record["inputs"]:
                path = folder / name
                if path.exists():
                    path.unlink()
                    removed += 1
        else:  # the crash came before the rename: the inputs are still the data
            for name in record["outputs"]:
                (folder / name).unlink(missing_ok=True)
        manifest.unlink()
    for stale in folder.glob(f".{OUTPUT_PREFIX}*"):
        stale.unlink()
    if removed:
        fsync_path(folder)
    return removed


def _groups(folder: Path, target_rows: int, cutoff: float) -> list[list[Path]]:
    """The folder's settled data files smaller than half the target, oldest name first,
    in groups of at most `target_rows` rows (one compacted file each); a group of one
    file is left as it is."""
    groups: list[list[Path]] = [[]]
    rows = 0
    for path in sorted(folder.glob("*.parquet")):
        if path.name.startswith((".", "_")) or path.stat().st_mtime > cutoff:
            continue
        try:
            n = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InvalidInputError(f"{path} is not a readable Parquet file: {e}") from e
        if n >= target_rows // 2:
            continue
        if rows + n > target_rows and groups[-1]:
            groups.append([])
            rows = 0
        groups[-1].append(path)
        rows += n
    return [g for g in groups if len(g) >= 2]


def _compact_group(folder: Path, inputs: list[Path], forgotten: Tombstones) -> tuple[int, int]:
    """Rewrite `inputs` as one compacted file; (rows written, rows dropped)."""
    try:
        table = pa.concat_tables(
            [pq.read_table(p, partitioning=None) for p in inputs], promote_options="default"
        )
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"cannot compact {folder}: {e}; nothing was changed") from e
    dropped = 0
    if forgotten:
        hit = forgotten.mask(table)
        dropped = int(pc.sum(hit).as_py() or 0)
        table = table.filter(pc.invert(hit))
    if "timestamp" in table.column_names:
        table = table.sort_by("timestamp")
    run = uuid.uuid4().hex[:12]
    output = f"{OUTPUT_PREFIX}{run}.parquet"
    manifest = folder / f"{MANIFEST_PREFIX}{run}.json"
    manifest.write_text(json.dumps({"inputs": [p.name for p in inputs], "outputs": [output]}))
    fsync_path(manifest)
    hidden = folder / f".{output}"
    pq.write_table(table, hidden)
    fsync_path(hidden)
    os.replace(hidden, folder / output)
    fsync_path(folder)
    for path in inputs:
        path.unlink()
        path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
    manifest.unlink()
    fsync_path(folder)
    return table.num_rows, dropped


def compact_log(
    root: Path,
    *,
    tombstones_dir: Path | None = None,
    target_rows: int = 1_000_000,
    min_age_s: float = 3600.0,
    now: float | None = None,
    progress: bool = True,
) -> CompactionReport:
    """Compact every ``date=*`` folder of the log at `root` (see the module doc).

    Args:
        root: the event log or the serve log.
        tombstones_dir: where ``_forgotten.jsonl`` lives (the event log's root);
            default `root`.
        target_rows: the most rows per compacted file; files under half of it are
            compacted.
        min_age_s: leave files modified more recently than this alone.
        now: the clock (tests).
    """
    if target_rows < 2:
        raise InvalidInputError(f"target_rows must be at least 2, not {target_rows}")
    if min_age_s < 0:
        raise InvalidInputError(f"min_age_s must not be negative, not {min_age_s}")
    began = time.monotonic()
    report = CompactionReport()
    if not root.is_dir():
        return report
    cutoff = (time.time() if now is None else now) - min_age_s
    with maintenance_lock(root):
        forgotten = Tombstones.read(tombstones_dir or root)
        for folder in sorted(p for p in root.glob("date=*") if p.is_dir()):
            report.recovered += _recover(folder)
            groups = _groups(folder, target_rows, cutoff)
            for inputs in groups:
                rows, dropped = _compact_group(folder, inputs, forgotten)
                report.files_in += len(inputs)
                report.files_out += 1
                report.rows += rows
                report.dropped += dropped
            if groups:
                report.folders += 1
                files_in = sum(len(g) for g in groups)
                report.per_folder[folder.name] = (files_in, len(groups))
                if progress:
                    print(
                        f"[compact] {root.name}/{folder.name}: {files_in} files -> {len(groups)}",
                        file=sys.stderr,
                        flush=True,
                    )
    report.seconds = time.monotonic() - began
    return report
