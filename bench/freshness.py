"""`inkling bench freshness`: event accepted → session row online → `Recommend` reflects it.

Everything runs on loopback as its own process, as in production: an embedded Redis,
the ingest server (`inkling serve events`), one stream worker (`inkling worker`) and
the retrieval and ranking servers. For each rate in `--rates` (events per second):

- **Load**: `TrackEvents` calls of `--batch` events, open loop, over 2,000 background
  sessions (item views and clicks on catalogue items), for `--duration` seconds.
- **Probes**: every 200 ms, a fresh session gets one click on a random item. From the
  moment `TrackEvents` acknowledged it, the probe polls the session's online row
  (one HMGET in Feast's layout, every 2 ms) until the row's recent items hold the
  item: *visible*. Then it calls `Recommend(debug)` for the session and checks that
  the session features the ranker saw hold the item: *reflected*.
- **Bus lag**: the consumer group's backlog (undelivered + pending), sampled every
  second.
- **Loss**: after the load, the worker drains the bus; every acknowledged event id of
  the run must be in the Parquet event log exactly once.
- **Every event**: the workers' `inkling.event.freshness` histogram, scraped from their
  `/metrics` before and after each rate, gives p50 / p99 / p99.9 of commit time minus
  receive time over all the rate's events, beside the 5-per-second probes.
- **CPU per event**: each process's CPU time (`/proc`) over the rate's load and drain,
  in µs per accepted event, and the workers' by stage (`inkling.stage.cpu_time`).

With `--bus redis,kafka` each bus gets its own ingest server and workers in the same run
(the retrieval and ranking servers, the Redis and the data set are shared), every rate
on the Redis Streams bus first, then on Kafka (`inkling.events.kafka_bus`, a topic of 4
partitions on a Kafka-protocol broker started on loopback, `inkling.kafka_embedded`);
the bus lag there is the records the workers' group has not yet logged, and the
drain waits for it to reach 0.

Reports JSON, Markdown and a PNG of the freshness distributions under `--out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from google.protobuf.timestamp_pb2 import Timestamp

from bench.harness.cpu import CpuMeter
from bench.harness.dataset import materialize, prepare
from bench.harness.loadgen import run_open_loop
from bench.harness.processes import server_process, wait_serving, worker_processes
from bench.harness.report import machine_info
from bench.harness.scrape import Histogram, scrape_histogram
from inkling.config import Settings
from inkling.events.bus import async_client, measure_lag_sync, sync_client
from inkling.events.eventlog import EventLog
from inkling.events.kafka_bus import KafkaSettings, ensure_topic, group_lag, group_watcher
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.rows import RowReader
from inkling.kafka_embedded import EmbeddedKafka
from inkling.redis_embedded import EmbeddedRedis, free_port
from inkling.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
)
from stream_worker.kafka_source import kafka_key
from stream_worker.ownership import lease_key

PARTITIONS = 4
FRESHNESS_METRIC = "inkling_event_freshness_seconds"
PROBE_INTERVAL_S = 0.2
POLL_S = 0.002
BACKGROUND_SESSIONS = 2_000
BUSES = ("redis", "kafka")
KAFKA_TOPIC = "inkling-bench-events"


@dataclass
class Bus:
    """How the benchmark watches one bus: who owns its partitions, and its backlog."""

    name: str
    owner_key: Callable[[int], str]
    backlog: Callable[[], int]
    env: dict[str, str] = field(default_factory=dict)
    """What the ingest and worker processes need in their environment to use it."""


def _redis_bus(live: Settings) -> Bus:
    client = sync_client(live.redis_address or "")

    def backlog() -> int:
        return sum(b.total for b in measure_lag_sync(client, PARTITIONS).values())

    return Bus("redis", lease_key, backlog)


def _kafka_bus(kafka: KafkaSettings) -> Bus:
    watcher = group_watcher(kafka)

    def backlog() -> int:
        return sum(group_lag(watcher, kafka.topic, PARTITIONS).values())

    env = {
        "INKLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "INKLING_KAFKA_TOPIC": kafka.topic,
        "INKLING_KAFKA_GROUP": kafka.group,
        "INKLING_KAFKA_PARTITIONS": str(PARTITIONS),
        "INKLING_KAFKA_FETCH_WAIT_MAX_MS": str(kafka.fetch_wait_max_ms),
    }
    return Bus("kafka", lambda p: kafka_key(kafka.topic, "owner", p), backlog, env)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment (the children inherit it) for the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _progress(message: str) -> None:
    print(f"[freshness] {message}", file=sys.stderr, flush=True)


def _wait_owned(live: Settings, count: int, on: Bus, timeout_s: float = 60.0) -> None:
    """Until `count` workers hold the partitions between them (each its fair share)."""
    bus = sync_client(live.redis_address or "")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            owners = cast(list[bytes | None], [bus.get(on.owner_key(p)) for p in range(PARTITIONS)])
            workers = {o.rsplit(b":", 1)[0] if on.name == "kafka" else o for o in owners if o}
            if all(owners) and len(workers) == min(count, PARTITIONS):
                return
            time.sleep(0.25)
    finally:
        bus.close()
    raise TimeoutError(
        f"{count} workers did not share the {PARTITIONS} partitions in {timeout_s:.0f}s"
    )


def _timestamp() -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


@dataclass
class Phase:
    """What one rate produced."""

    rate: float
    bus: str = "redis"
    accepted: list[str] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)
    reflected_ms: list[float] = field(default_factory=list)
    probes_lost: int = 0
    lag: list[int] = field(default_factory=list)
    load: Any = None
    after: dict[str, Any] = field(default_factory=dict)
    committed: Histogram | None = None
    """`inkling.event.freshness` over the phase (load and drain), from the workers."""
    cpu_us: dict[str, dict[str, float]] = field(default_factory=dict)
    """µs of CPU per accepted event over the phase: by process, and the workers' stages."""


async def _probe(
    n: int,
    run: str,
    items: list[str],
    track: Any,
    recommend: Any,
    reader: RowReader,
    phase: Phase,
    rng: np.random.Generator,
    timeout_s: float = 10.0,
) -> None:
    session, item = f"probe-{run}-{n}", items[int(rng.integers(len(items)))]
    event = resources_pb2.Event(
        event_id=f"{run}-probe-{n}", session_id=session, item_id=item,
        event_type=resources_pb2.EVENT_TYPE_CLICK, timestamp=_timestamp(), dwell_ms=20_000,
    )  # fmt: skip
    reply = await track(event_service_pb2.TrackEventsRequest(events=[event]), timeout=5)
    if reply.accepted != 1:
        phase.probes_lost += 1
        return
    accepted = time.perf_counter()
    phase.accepted.append(event.event_id)
    while True:
        [row] = await reader.read("session_features", [session])
        if row is not None and item in (row.get("session_recent_items") or []):
            break
        if time.perf_counter() - accepted > timeout_s:
            phase.probes_lost += 1
            return
        await asyncio.sleep(POLL_S)
    phase.visible_ms.append((time.perf_counter() - accepted) * 1e3)
    answer = await recommend(
        ranking_service_pb2.RecommendRequest(session_id=session, num_results=10, debug=True),
        timeout=5,
    )
    seen = [
        f.value.strip("[]").split(", ")
        for f in answer.debug.features
        if f.feature == "session_recent_items"
    ]
    if any(item in items for items in seen):
        phase.reflected_ms.append((time.perf_counter() - accepted) * 1e3)
    else:
        phase.probes_lost += 1


async def _phase(
    live: Settings,
    events_port: int,
    ranking_port: int,
    rate: float,
    batch: int,
    duration_s: float,
    items: list[str],
    run: str,
    on: Bus,
) -> Phase:
    phase = Phase(rate=rate, bus=on.name)
    rng = np.random.default_rng(int(rate))
    counter = iter(range(10**9))
    store = open_store(live)
    client = async_client(live.redis_address or "")
    reader = RowReader(client, resolve_service(store, "ranker_v1"))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{events_port}") as events_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{ranking_port}") as ranking_channel,
    ):
        track = event_service_pb2_grpc.EventServiceStub(events_channel).TrackEvents
        recommend = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel).Recommend

        async def send() -> str:
            events = []
            for _ in range(batch):
                n = next(counter)
                kind = (
                    resources_pb2.EVENT_TYPE_CLICK
                    if n % 3 == 0
                    else resources_pb2.EVENT_TYPE_ITEM_VIEW
                )
                events.append(
                    resources_pb2.Event(
                        event_id=f"{run}-{n}",
                        session_id=f"bg-{run}-{n % BACKGROUND_SESSIONS}",
                        item_id=items[n * 7919 % len(items)],
                        event_type=kind,
                        timestamp=_timestamp(),
                        dwell_ms=5_000 if n % 3 == 0 else 0,
                    )
                )
            try:
                reply = await track(event_service_pb2.TrackEventsRequest(events=events), timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code().name
            rejected = {r.index for r in reply.rejected}
            phase.accepted += [e.event_id for i, e in enumerate(events) if i not in rejected]
            return "OK" if not rejected else "REJECTED"

        async def probes() -> None:
            tasks = []
            began = time.perf_counter()
            n = 0
            while time.perf_counter() - began < duration_s:
                tasks.append(
                    asyncio.create_task(_probe(n, run, items, track, recommend, reader, phase, rng))
                )
                n += 1
                await asyncio.sleep(PROBE_INTERVAL_S)
            await asyncio.gather(*tasks)

        async def lag() -> None:
            began = time.perf_counter()
            while time.perf_counter() - began < duration_s + 1:
                phase.lag.append(await asyncio.to_thread(on.backlog))
                await asyncio.sleep(1.0)

        load, _, _ = await asyncio.gather(
            run_open_loop(
                send,
                rate=rate / batch,
                duration_s=duration_s,
                warmup_s=0.0,
                name=f"track_{int(rate)}_per_s",
            ),
            probes(),
            lag(),
        )
        phase.load = load
    await client.aclose()
    return phase


def _drain(on: Bus, timeout_s: float = 120.0) -> float:
    """Seconds until the consumer group has nothing undelivered or pending (Redis) or
    unlogged (Kafka)."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout_s:
        if on.backlog() == 0:
            return time.perf_counter() - began
        time.sleep(0.25)
    raise TimeoutError(f"the {on.name} bus did not drain in {timeout_s:.0f}s")


def _loss(live: Settings, run: str, accepted: list[str]) -> dict[str, int]:
    """Acknowledged ids against the event log: missing, duplicated, unexpected."""
    table = EventLog(live.events_dir).read(["event_id"])
    ids = table.column("event_id")
    ours = ids.filter(pc.starts_with(ids, f"{run}-")).to_pylist()
    logged, wanted = set(ours), set(accepted)
    return {
        "accepted": len(accepted),
        "logged": len(ours),
        "missing": len(wanted - logged),
        "logged_twice": len(ours) - len(logged),
        "not_accepted_but_logged": len(logged - wanted),
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {
        "n": len(a),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def _plot(phases: list[Phase], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_vis, ax_rec = fig.subplots(1, 2)
    for phase in phases:
        for ax, values in ((ax_vis, phase.visible_ms), (ax_rec, phase.reflected_ms)):
            if values:
                xs = np.sort(values)
                ax.plot(
                    xs,
                    np.arange(1, len(xs) + 1) / len(xs),
                    label=f"{phase.bus} {phase.rate:.0f} ev/s",
                )
    ax_vis.set(title="accepted → session row online", xlabel="ms", ylabel="share of probes")
    ax_rec.set(title="accepted → Recommend reflects it", xlabel="ms")
    for ax in (ax_vis, ax_rec):
        ax.set_xscale("log")
        ax.axvline(100, color="grey", linestyle=":")
        ax.legend()
    fig.savefig(path, dpi=100)


def _cpu_table(rows: list[dict[str, Any]], part: str, caption: str) -> list[str]:
    """Markdown lines: one row per rate of `cpu_us_per_event[part]` (processes or stages)."""
    names = list(rows[0]["cpu_us_per_event"].get(part, {})) if rows else []
    lines = ["", caption, "", "| bus | events/s target | " + " | ".join(names) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(names))
    for p in rows:
        spent = p["cpu_us_per_event"].get(part, {})
        cells = " | ".join(f"{spent.get(n, 0):.1f}" for n in names)
        lines.append(f"| {p['bus']} | {p['rate']:.0f} | {cells} |")
    return lines


def _histogram_ms(histogram: Histogram | None) -> dict[str, float]:
    if histogram is None or not histogram.count:
        return {}
    return {
        name: round(histogram.quantile(q) * 1000, 2)
        for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
    }


def _run_bus(
    live: Settings,
    on: Bus,
    shared: dict[str, int],
    ranking_port: int,
    rates: list[float],
    batch: int,
    duration_s: float,
    item_ids: list[str],
    workers: int,
) -> list[Phase]:
    """Every rate on one bus: its own ingest server and workers, started and stopped here."""
    phases = []
    events_port = free_port()
    with (
        _environment(on.env),
        server_process("events", live, events_port) as ingest,
        worker_processes(live, workers, PARTITIONS) as worker_group,
    ):
        worker_metrics = worker_group.addresses
        worker_names = [f"worker{n}" for n in range(workers)]
        pids = {"ingest": ingest.pid, **dict(zip(worker_names, worker_group.pids, strict=True))}
        pids |= shared | {"load generator": os.getpid()}
        cpu = CpuMeter(pids, worker_metrics, staged=worker_names)
        for port in (events_port, ranking_port):
            asyncio.run(wait_serving(port))
        _wait_owned(live, workers, on)
        _progress(f"{on.name} bus: ingest SERVING; {workers} worker(s) own the partitions")
        for rate in rates:
            run = f"f{int(rate)}-{on.name}-{uuid.uuid4().hex[:6]}"
            _progress(f"{on.name}: {rate:.0f} events/s for {duration_s:.0f}s ({run})")
            before = scrape_histogram(worker_metrics, FRESHNESS_METRIC)
            cpu_before = cpu.sample()
            phase = asyncio.run(
                _phase(live, events_port, ranking_port, rate, batch, duration_s, item_ids, run,
                       on)
            )  # fmt: skip
            drained = _drain(on)
            phase.cpu_us = cpu.per_event(cpu_before, cpu.sample(), len(phase.accepted))
            phase.committed = scrape_histogram(worker_metrics, FRESHNESS_METRIC) - before
            loss = _loss(live, run, phase.accepted)
            phase.after = {"drain_s": round(drained, 1), **loss}
            _progress(
                f"{on.name} {rate:.0f}/s: visible p99 "
                f"{_percentiles(phase.visible_ms).get('p99', 0):.1f} ms, loss {loss}"
            )
            phases.append(phase)
    return phases


def run_freshness_benchmark(
    settings: Settings,
    *,
    rates: list[float],
    batch: int,
    duration_s: float,
    items: int,
    out: Path,
    reuse: bool,
    workers: int = 1,
    buses: tuple[str, ...] = ("redis",),
    kafka_broker: str = "noida",
) -> Path:
    settings = replace(settings, online_store="redis")
    prepare(settings, items, reuse)
    catalogue = pq.read_table(settings.catalog_dir / "items.parquet", columns=["item_id"])
    item_ids = [str(i) for i in catalogue.column("item_id").to_pylist()]
    unknown = sorted(set(buses) - set(BUSES))
    if unknown or not buses:
        raise ValueError(f"buses must be some of {', '.join(BUSES)}, got {buses!r}")
    phases: list[Phase] = []
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(EmbeddedRedis(settings.redis_dir, persistent=False))
        live = settings.with_redis(redis_server.address)
        live.export_env()
        materialize(live)
        ports = {role: free_port() for role in ("retrieval", "ranking")}
        retrieval = stack.enter_context(server_process("retrieval", live, ports["retrieval"]))
        ranking = stack.enter_context(
            server_process(
                "ranking", live, ports["ranking"],
                "--retrieval-address", f"127.0.0.1:{ports['retrieval']}",
            )
        )  # fmt: skip
        shared = {"redis": redis_server.pid, "retrieval": retrieval.pid, "ranking": ranking.pid}
        for port in ports.values():
            asyncio.run(wait_serving(port))
        for name in buses:
            if name == "kafka":
                broker = stack.enter_context(
                    EmbeddedKafka(live.data_dir / "kafka" / uuid.uuid4().hex[:8], kind=kafka_broker)
                )
                kafka = KafkaSettings(
                    bootstrap_servers=broker.bootstrap_servers,
                    topic=KAFKA_TOPIC,
                    group=f"inkling-bench-{uuid.uuid4().hex[:6]}",
                    partitions=PARTITIONS,
                    fetch_wait_max_ms=10,
                )
                ensure_topic(kafka)
                on = _kafka_bus(kafka)
                shared["broker"] = broker.pid
            else:
                on = _redis_bus(live)
            phases += _run_bus(
                live, on, shared, ports["ranking"], rates, batch, duration_s, item_ids, workers
            )
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "rates": rates,
            "batch": batch,
            "duration_s": duration_s,
            "items": items,
            "workers": workers,
            "buses": list(buses),
            "kafka_broker": kafka_broker if "kafka" in buses else None,
        },
        "phases": [
            {
                "bus": p.bus,
                "rate": p.rate,
                "achieved_calls_per_s": p.load.throughput,
                "achieved_events_per_s": p.load.throughput * batch,
                "track_p50_ms": p.load.p50_ms,
                "track_p99_ms": p.load.p99_ms,
                "errors": p.load.errors,
                "visible_ms": _percentiles(p.visible_ms),
                "reflected_ms": _percentiles(p.reflected_ms),
                "probes_lost": p.probes_lost,
                "bus_lag_max": max(p.lag, default=0),
                "bus_lag_p50": float(np.median(p.lag)) if p.lag else 0.0,
                "committed_events": p.committed.count if p.committed else 0,
                "committed_ms": _histogram_ms(p.committed),
                "cpu_us_per_event": p.cpu_us,
                **p.after,
            }
            for p in phases
        ],
    }
    (out / "freshness.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    _plot(phases, out / "freshness.png")
    lines = [
        "# inkling freshness benchmark",
        "",
        f"Machine: {report['machine']}. All processes on loopback; batches of {batch} events; "
        f"{workers} stream worker process(es)"
        + (
            f"; Kafka: the {kafka_broker} broker (an emulation of the protocol, not Apache "
            "Kafka), 4 partitions."
            if "kafka" in buses
            else "."
        ),
        "",
        "| bus | events/s target | achieved | TrackEvents p99 ms | visible p50 / p99 ms | "
        "Recommend reflects p50 / p99 ms | bus lag max | accepted | missing | logged twice |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: list[dict[str, Any]] = report["phases"]
    for p in rows:
        v, r = p["visible_ms"], p["reflected_ms"]
        lines.append(
            f"| {p['bus']} | {p['rate']:.0f} | {p['achieved_events_per_s']:.0f} "
            f"| {p['track_p99_ms']:.1f} "
            f"| {v.get('p50', 0):.1f} / {v.get('p99', 0):.1f} "
            f"| {r.get('p50', 0):.1f} / {r.get('p99', 0):.1f} | {p['bus_lag_max']} "
            f"| {p['accepted']} | {p['missing']} | {p['logged_twice']} |"
        )
    lines += [
        "",
        "Every committed event, from the workers' `inkling.event.freshness` histogram "
        "(commit time minus ingest's receive time; load and drain of each rate; quantiles "
        "interpolated within buckets as PromQL's `histogram_quantile` does, so only as fine "
        "as the buckets: 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 25, 30, 40, 50, 75, 100 ms, ...):",
        "",
        "| bus | events/s target | events committed | p50 ms | p99 ms | p99.9 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in rows:
        c = p["committed_ms"]
        lines.append(
            f"| {p['bus']} | {p['rate']:.0f} | {p['committed_events']:,.0f} "
            f"| {c.get('p50', 0):.1f} "
            f"| {c.get('p99', 0):.1f} | {c.get('p99.9', 0):.1f} |"
        )
    lines += _cpu_table(
        rows,
        "processes",
        "CPU per accepted event, µs, over each rate's load and drain (`/proc/<pid>/stat`; "
        "the load generator is the benchmark process, probes included):",
    )
    lines += _cpu_table(
        rows,
        "stages",
        "The stream workers' CPU per event by stage, µs (`inkling.stage.cpu_time`; `other`: "
        "their CPU outside every stage):",
    )
    lines += ["", "![freshness](freshness.png)", ""]
    (out / "freshness.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return out
