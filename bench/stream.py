"""Measure one stream worker: sustained events/s, and XADD -> session row latency.

    python -m bench.stream [--events 100000] [--rates 200,1000,3000] [--seconds 10]

Everything runs on loopback in a temporary directory: a private Redis, a copy of
the Feast repository (`feast apply`), a synthetic catalogue and clickstream
(`batch.generate`). The worker is a separate process (`python -m stream_worker`, default
settings, 4 partitions), so the producer and the latency probe do not share its
interpreter.

- throughput: `--events` events are appended first; the clock runs from the worker's
  first committed micro-batch until every partition's online watermark reached the last
  entry appended to it, then until every entry is in the Parquet log and acknowledged.
- latency: an open-loop producer appends at each rate for `--seconds` (every ~2 ms,
  the events due by then, pipelined; each event in its own new session). A probe reads
  the partitions' online watermarks every ~1 ms: a session row is written in the same
  script as its partition's watermark, so it is visible exactly when the watermark
  reaches its entry. Reported: p50, p95, p99 and max of (visible - XADD sent), which
  includes up to one probe interval.
- CPU per event: for the throughput run and each rate, the worker's CPU time in µs per
  event, by stage (its `inkling.stage.cpu_time` counter, scraped from `/metrics` before
  and after: the loop's thread per stage, the log thread's `log_write` / `log_commit`)
  and for the worker and Redis processes (`/proc/<pid>/stat`); `other` is the worker's
  CPU on no stage (other threads: metrics export, garbage collection, ...).
- writer: 500 session rows encoded by the worker's path and written in one MULTI/EXEC
  against Feast's `FeatureStore.push(..., to=PushMode.ONLINE)` of the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import redis

from batch.generate import GeneratorConfig, generate
from bench.harness.cpu import CpuMeter
from bench.harness.processes import child_env, spawn
from inkling.config import PROJECT_ROOT, Settings
from inkling.events.bus import GROUP, partition_of, routing_key, stream_key
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.redis_embedded import EmbeddedRedis, free_port
from inkling.v1 import resources_pb2
from stream_worker.commit import applied_key, parse_id

PARTITIONS = 4
_TYPES = {
    "page_view": resources_pb2.EVENT_TYPE_PAGE_VIEW,
    "item_view": resources_pb2.EVENT_TYPE_ITEM_VIEW,
    "click": resources_pb2.EVENT_TYPE_CLICK,
    "add_to_cart": resources_pb2.EVENT_TYPE_ADD_TO_CART,
    "purchase": resources_pb2.EVENT_TYPE_PURCHASE,
}


def _entry(event: resources_pb2.Event) -> tuple[str, dict[Any, Any]]:
    p = partition_of(routing_key(event.user_id, event.session_id), PARTITIONS)
    fields: dict[Any, Any] = {
        "id": event.event_id,
        "e": event.SerializeToString(),
        "r": int(time.time() * 1e6),
    }
    return stream_key(p), fields


def _backlog(client: redis.Redis) -> int:
    total = 0
    for p in range(PARTITIONS):
        key = stream_key(p)
        total += int(client.xpending(key, GROUP)["pending"])  # type: ignore[index]
        groups: Any = client.xinfo_groups(key)
        last = next(g for g in groups if g["name"] == GROUP.encode())["last-delivered-id"]
        total += len(client.xrange(key, min=b"(" + last, max="+"))  # type: ignore[arg-type]
    return total


def _setup(root: Path, address: str, n: int) -> tuple[Settings, list[resources_pb2.Event]]:
    repo = root / "feature_repo"
    shutil.copytree(
        PROJECT_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__", "data")
    )
    settings = Settings(data_dir=root / "data", feature_repo=repo, redis_address=address)
    feast_cli(settings, "apply", quiet=True)
    data = generate(GeneratorConfig(users=3000, items=5000, sessions=n // 25 + 100, days=1, seed=1))
    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(data.items, settings.catalog_dir / "items.parquet")
    table = data.events.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])
    rows = table.slice(max(0, table.num_rows - n)).to_pylist()  # the latest n, moved to now
    shift = int(time.time() * 1e6) - int(rows[-1]["timestamp"].timestamp() * 1e6)
    events = []
    for row in rows:
        e = resources_pb2.Event(
            event_id=row["event_id"],
            user_id=row["user_id"] or "",
            session_id=row["session_id"],
            item_id=row["item_id"] or "",
            event_type=_TYPES[row["event_type"]],
            dwell_ms=row["dwell_ms"] or 0,
            device=row["device"] or "",
            position=row["position"] or 0,
        )
        e.timestamp.FromMicroseconds(int(row["timestamp"].timestamp() * 1e6) + shift)
        events.append(e)
    return settings, events


def _spawn(settings: Settings, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    env = child_env(settings, INKLING_WORKER_PARTITIONS=str(PARTITIONS))
    env.pop("INKLING_CONFIG", None)
    argv = ["-m", "stream_worker", "--metrics-port", str(metrics_port)]
    return spawn(argv, env, log, append=True)


def _serves_metrics(cpu: CpuMeter) -> bool:
    try:
        cpu.sample()
    except OSError:
        return False
    return True


def _wait(condition: Any, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError("the worker did not get there in time")


def _caught_up(client: redis.Redis, last: dict[int, tuple[int, int]]) -> bool:
    """Every partition's online watermark at or past the last entry appended to it (the
    entries themselves may be trimmed by then, so they are not counted)."""
    marks: Any = client.mget([applied_key(p) for p in last])
    return all(m is not None and parse_id(m) >= last[p] for p, m in zip(last, marks, strict=True))


def throughput(
    client: redis.Redis, events: list[resources_pb2.Event], cpu: CpuMeter
) -> dict[str, Any]:
    last: dict[int, tuple[int, int]] = {}
    pipe = client.pipeline(transaction=False)
    streams: list[str] = []

    def execute() -> None:
        for stream, entry_id in zip(streams, pipe.execute(), strict=True):
            last[int(stream.rsplit(":", 1)[1])] = parse_id(entry_id)
        streams.clear()

    before = cpu.sample()
    for i, event in enumerate(events):
        key, fields = _entry(event)
        pipe.xadd(key, fields)
        streams.append(key)
        if i % 5000 == 4999:
            execute()
    execute()
    started = _wait(lambda: client.exists(*[applied_key(p) for p in range(PARTITIONS)]), 120)
    online = _wait(lambda: _caught_up(client, last), 300)
    done = _wait(lambda: _backlog(client) == 0, 300)
    return {
        "events": len(events),
        "online_s": round(online - started, 2),
        "online_events_per_s": round(len(events) / (online - started)),
        "logged_and_acked_s": round(done - started, 2),
        "events_per_s": round(len(events) / (done - started)),
        "cpu_us_per_event": cpu.per_event(before, cpu.sample(), len(events)),
    }


def latency(
    client: redis.Redis, rate: float, seconds: float, tag: str, cpu: CpuMeter
) -> dict[str, Any]:
    n = int(rate * seconds)
    before = cpu.sample()
    sent: list[tuple[int, tuple[int, int], float]] = []  # partition, entry id, XADD time
    seen: dict[int, float] = {}
    lock = threading.Lock()
    finished = threading.Event()

    def probe() -> None:
        # A session row is written in the same script as its partition's online
        # watermark, so the row is visible exactly when the watermark reaches its entry.
        prober = redis.Redis(connection_pool=client.connection_pool)
        keys = [applied_key(p) for p in range(PARTITIONS)]
        done = 0
        while True:
            marks = [parse_id(m) if m else (0, 0) for m in prober.mget(keys)]  # type: ignore[union-attr]
            now = time.monotonic()
            with lock:
                pending = sent[done:]
            for k, (p, entry, _) in enumerate(pending, start=done):
                if k not in seen and marks[p] >= entry:
                    seen[k] = now
            while done in seen:
                done += 1
            if finished.is_set() and (done >= len(sent) or time.monotonic() - stop_at > 30):
                break
            time.sleep(0.001)

    stop_at = float("inf")
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    start = time.monotonic()
    i = 0
    while i < n:
        # Open loop: every ~2 ms, append (in one pipeline) the events whose time has come.
        due = min(n, int((time.monotonic() - start) * rate) + 1)
        pipe = client.pipeline(transaction=False)
        parts = []
        for j in range(i, due):
            e = resources_pb2.Event(
                event_id=f"{tag}-e{j}",
                session_id=f"{tag}-{j}",
                item_id=f"i{j % 5000}",
                event_type=resources_pb2.EVENT_TYPE_CLICK,
            )
            e.timestamp.FromMicroseconds(int(time.time() * 1e6))
            stream, fields = _entry(e)
            parts.append(int(stream.rsplit(":", 1)[1]))
            pipe.xadd(stream, fields)
        now = time.monotonic()
        ids = pipe.execute()
        with lock:
            sent.extend((p, parse_id(x), now) for p, x in zip(parts, ids, strict=True))
        i = due
        time.sleep(0.002)
    achieved = n / (time.monotonic() - start)
    stop_at = time.monotonic()
    finished.set()
    thread.join(60)
    _wait(lambda: _backlog(client) == 0, 300)  # logged and acknowledged: its CPU is in
    lat = np.array([(seen[k] - sent[k][2]) * 1000 for k in range(len(sent)) if k in seen])
    return {
        "rate": rate,
        "achieved_rate": round(achieved),
        "events": n,
        "visible": len(lat),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "cpu_us_per_event": cpu.per_event(before, cpu.sample(), n),
    }


def writer(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    from feast.data_source import PushMode

    from stream_worker.online import SessionRow, resolve_layout, session_commands

    store = open_store(settings)
    layout = resolve_layout(store)
    rng = np.random.default_rng(0)
    base = int(time.time() * 1e6)
    rows = [
        SessionRow(
            f"w{i}",
            base - i,
            {
                "session_recent_items": [f"i{j}" for j in rng.integers(0, 5000, 10)],
                "session_page_views": 3,
                "session_item_views": int(rng.integers(0, 50)),
                "session_clicks": int(rng.integers(0, 10)),
                "session_carts": 1,
                "session_purchases": 0,
                "session_intent_category": "c03",
                "session_last_event_timestamp": datetime.fromtimestamp((base - i) / 1e6, UTC),
            },
        )
        for i in range(500)
    ]
    fast: list[float] = []
    push: list[float] = []
    for _ in range(5):
        began = time.perf_counter()
        commands = session_commands(layout, rows)
        connection = client.connection_pool.get_connection()
        packed = [hiredis.pack_command(c) for c in [("MULTI",), *commands, ("EXEC",)]]  # type: ignore[arg-type]
        connection.send_packed_command([b"".join(packed)])
        for _ in range(len(commands) + 2):
            connection.read_response()
        client.connection_pool.release(connection)
        fast.append(time.perf_counter() - began)
        frame = pd.DataFrame([{"session_id": f"p{r.session_id}", **r.values} for r in rows]).assign(
            event_timestamp=[pd.Timestamp(r.ts_us, unit="us", tz="UTC") for r in rows]
        )
        frame["event_timestamp"] += pd.Timedelta(microseconds=len(push) + 1)
        began = time.perf_counter()
        store.push("session_push", frame, to=PushMode.ONLINE)
        push.append(time.perf_counter() - began)
    return {
        "rows": len(rows),
        "worker_path_ms": round(float(np.median(fast)) * 1000, 1),
        "feast_push_ms": round(float(np.median(push)) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rates", default="200,1000,3000")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="inkling-worker-bench-"))
    report: dict[str, Any] = {"cpus": os.cpu_count(), "partitions": PARTITIONS}
    try:
        with EmbeddedRedis(root / "redis", persistent=False) as server:
            settings, events = _setup(root, server.address, args.events)
            settings.export_env()
            client = redis.Redis(host="127.0.0.1", port=server.port)
            report["writer"] = writer(settings, client)
            print(json.dumps(report["writer"]), file=sys.stderr, flush=True)
            metrics_port = free_port()
            worker = _spawn(settings, root / "worker.log", metrics_port)
            try:
                pids = {"worker": worker.pid, "redis": server.pid}
                cpu = CpuMeter(pids, [f"127.0.0.1:{metrics_port}"], staged=["worker"])
                _wait(lambda: _serves_metrics(cpu), 60)
                report["throughput"] = throughput(client, events[: args.events], cpu)
                print(json.dumps(report["throughput"]), file=sys.stderr, flush=True)
                report["latency"] = []
                for rate in [float(r) for r in args.rates.split(",")]:
                    result = latency(client, rate, args.seconds, f"r{int(rate)}", cpu)
                    print(json.dumps(result), file=sys.stderr, flush=True)
                    report["latency"].append(result)
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
            lines = (root / "worker.log").read_text().splitlines()
            stats = [line for line in lines if "stopped" in line]
            report["worker"] = stats[-1] if stats else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
