"""Spark sessions for the batch jobs: local by default, any master by configuration."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("inkling.spark")

LOCAL_DEFAULTS = {
    # Small local data: a few shuffle partitions beat the default 200 by a wide margin.
    "spark.sql.shuffle.partitions": "8",
    "spark.driver.memory": "4g",
    "spark.ui.enabled": "false",
}
ALWAYS = {
    "spark.sql.session.timeZone": "UTC",
    # Parquet timestamps as INT64 micros, which pyarrow and Feast read as they are.
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower(),
}


def build_session(
    master: str = "local[*]", conf: Mapping[str, str] | None = None, app_name: str = "inkling"
) -> SparkSession:
    """A Spark session for `master`; local masters get small-data defaults."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    settings = dict(LOCAL_DEFAULTS) if master.startswith("local") else {}
    settings.update(ALWAYS)
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log a job stage's start and end with its duration; Spark's own bar shows tasks."""
    print(f"[spark] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[spark] {name} done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


class Heartbeat:
    """Prints the running Spark jobs' task progress every few seconds while a stage runs.

    Spark's console bar only draws on a terminal; this line also shows in logs and CI.
    """

    def __init__(self, spark: SparkSession, every_s: float = 5.0) -> None:
        self._tracker = spark.sparkContext.statusTracker()
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            parts = []
            for stage_id in self._tracker.getActiveStageIds():
                info = self._tracker.getStageInfo(stage_id)
                if info is not None:
                    parts.append(
                        f"stage {stage_id}: {info.numCompletedTasks}/{info.numTasks} tasks"
                    )
            if parts:
                print(f"[spark]   {'; '.join(parts)}", file=sys.stderr, flush=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def write_parquet(
    df: DataFrame, path: str, files: int | None = None, partition_by: Sequence[str] = ()
) -> None:
    """Write `df` to `path`, replacing what was there only once the write has succeeded;
    in at most `files` files when given (`coalesce`: no shuffle); in Hive-style folders
    by the values of `partition_by` (`date=2026-11-01/`) when given.

    Local paths are written beside the target and swapped in by rename; other file
    systems (HDFS, S3) use Spark's own overwrite.
    """
    if files is not None:
        df = df.coalesce(files)
    writer = df.write.partitionBy(*partition_by) if partition_by else df.write
    if "://" in path and not path.startswith("file://"):
        writer.mode("overwrite").parquet(path)
        return
    target = Path(path.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    writer.parquet(str(tmp))
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
