"""How long `inkling forget` takes on a large event log (`inkling bench erasure`).

Builds (or reuses) a synthetic event log of `events` rows over `days` UTC dates, in
files of `file_rows` rows (the worker writes many files per date; an import writes
one), with `users` users and sessions of about 8 events, then forgets users of three
kinds in a real embedded Redis and reports, per forget, the seconds and what was
removed: a typical user (few files), the heaviest user, and a user with no events (the
floor: every file's key columns are read once to find the sessions and once to find
the rows). The report (JSON and Markdown) goes to `out`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.harness.report import machine_info
from inkling.config import Settings, load_settings
from inkling.erasure import forget_user
from inkling.events.bus import sync_client
from inkling.events.eventlog import EventLog
from inkling.events.schema import EVENT_SCHEMA
from inkling.redis_embedded import EmbeddedRedis

EVENTS_PER_SESSION = 8


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(
        pa.scalar(prefix), pc.cast(pa.array(numbers), pa.string()), ""
    )


def write_log(events_dir: Path, events: int, users: int, days: int, file_rows: int) -> None:
    """A synthetic log: sessions are runs of `EVENTS_PER_SESSION` events in time order."""
    rng = np.random.default_rng(7)
    sessions = -(-events // EVENTS_PER_SESSION)
    # Skewed activity: user floor(users * x^3) for uniform x, so low ids hold many
    # sessions (user 0 about users^(-1/3) of them); one session in ten is anonymous.
    session_user = np.floor(users * rng.random(sessions) ** 3).astype(np.int64)
    session_user[rng.random(sessions) < 0.1] = -1
    start = datetime(2026, 1, 1, tzinfo=UTC)
    span_us = days * 86_400 * 1_000_000
    written = 0
    part = 0
    while written < events:
        n = min(file_rows, events - written)
        row = np.arange(written, written + n)
        session = row // EVENTS_PER_SESSION
        user = session_user[session]
        ts_us = int(start.timestamp() * 1_000_000) + (row * span_us) // events
        table = pa.table(
            {
                "event_id": _ids("e", row),
                "user_id": pc.if_else(
                    pa.array(user >= 0), _ids("u", np.maximum(user, 0)), pa.nulls(n, pa.string())
                ),
                "session_id": _ids("s", session),
                "item_id": _ids("i", rng.integers(0, 100_000, n)),
                "event_type": pa.array(np.full(n, "click")),
                "timestamp": pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            }
        )
        full = pa.table(
            {
                f.name: table.column(f.name)
                if f.name in table.column_names
                else pa.nulls(n, f.type)
                for f in EVENT_SCHEMA
            },
            schema=EVENT_SCHEMA,
        )
        date = (start + timedelta(microseconds=int(ts_us[0]) - int(start.timestamp() * 1e6))).date()
        target = events_dir / f"date={date.isoformat()}" / f"part-{part:05d}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(full, target)
        written += n
        part += 1
        if part % 10 == 0:
            print(f"[bench erasure] wrote {written:,} / {events:,} events", flush=True)


def run_erasure_benchmark(
    out: Path,
    *,
    events: int = 10_000_000,
    users: int = 1_000_000,
    days: int = 30,
    file_rows: int = 100_000,
    reuse: bool = False,
) -> dict[str, Any]:
    machine = machine_info()  # before the load
    out = Path(out)
    settings: Settings = load_settings(overrides={"data_dir": out / "data"})
    log = EventLog(settings.events_dir)
    if not (reuse and log.exists()):
        if settings.events_dir.exists():
            raise FileExistsError(f"{settings.events_dir} exists; pass --reuse or remove it")
        began = time.perf_counter()
        write_log(settings.events_dir, events, users, days, file_rows)
        print(f"[bench erasure] log written in {time.perf_counter() - began:.1f} s", flush=True)
    files = sorted(settings.events_dir.rglob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    counts = pc.value_counts(pc.drop_null(log.read(["user_id"]).column("user_id"))).to_pylist()
    counts.sort(key=lambda c: c["counts"])
    subjects = {
        "typical user": counts[len(counts) // 2]["values"],
        "heaviest user": counts[-1]["values"],
        "user with no events": "u-absent",
    }
    results = []
    with EmbeddedRedis(out / "redis", persistent=False) as redis_server:
        client = sync_client(redis_server.address)
        for kind, user in subjects.items():
            held = next((c["counts"] for c in counts if c["values"] == user), 0)
            began = time.perf_counter()
            report = forget_user(settings, client, user, flush_wait_s=0.0)
            seconds = time.perf_counter() - began
            print(f"[bench erasure] {kind}: {seconds:.1f} s\n{report.summary()}", flush=True)
            results.append(
                {
                    "kind": kind,
                    "events_of_user": held,
                    "seconds": round(seconds, 2),
                    "files_rewritten": report.files_rewritten,
                    "event_rows_removed": report.removed.get("event log rows", 0),
                    "sessions": report.sessions,
                }
            )
        client.close()
    summary = {
        "machine": machine,
        "log": {"events": rows, "files": len(files), "users": len(counts), "days": days},
        "forgets": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "erasure.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"Event log: {rows:,} events in {len(files)} files, {len(counts):,} users, {days} days.",
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_total_gib']} GiB, load average at start "
        f"{machine['load_average_at_start']}; one forget at a time, nothing else running.",
        "",
        "| forget | user's events | seconds | files rewritten | sessions |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['kind']} | {r['events_of_user']:,} | {r['seconds']:.1f} | "
        f"{r['files_rewritten']} | {r['sessions']} |"
        for r in results
    ]
    (out / "erasure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary
