"""Kafka as the event bus, against a real Kafka-protocol broker on loopback
(`inkling.kafka_embedded`: noida-db's broker, an emulation, not Apache Kafka), a Redis
server of this module's own, a real Feast repository and the Parquet event log.

- ingest (`EventsApp` with ``[kafka]``) -> topic -> worker -> online rows + event log,
  each event exactly once, duplicates refused at ingest;
- two worker processes share the topic through the consumer group; one is SIGKILLed
  mid-stream; nothing is lost and nothing counted or logged twice;
- an existing JSON topic read through a field mapping; unmappable records dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from confluent_kafka import Producer

from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import PROJECT_ROOT, Settings
from inkling.events.bus import DEAD_LETTER, partition_of, routing_key
from inkling.events.eventlog import EventLog
from inkling.events.kafka_bus import (
    H_EVENT_ID,
    H_RECEIVED_US,
    KafkaSettings,
    ensure_topic,
    group_lag,
    group_watcher,
)
from inkling.events.schema import ITEM_SCHEMA
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.rows import RowReader
from inkling.kafka_embedded import EmbeddedKafka
from inkling.redis_embedded import EmbeddedRedis
from inkling.serving.runtime import start_server
from inkling.v1 import event_service_pb2, event_service_pb2_grpc, resources_pb2
from stream_worker.app import build_worker
from stream_worker.kafka_source import _TAKE, KafkaWorker, kafka_key, next_offset
from stream_worker.settings import WorkerSettings
from tests.conftest import temp_settings

pytestmark = [pytest.mark.redis]

P = 4
TYPES = {
    "page_view": resources_pb2.EVENT_TYPE_PAGE_VIEW,
    "item_view": resources_pb2.EVENT_TYPE_ITEM_VIEW,
    "click": resources_pb2.EVENT_TYPE_CLICK,
    "add_to_cart": resources_pb2.EVENT_TYPE_ADD_TO_CART,
    "purchase": resources_pb2.EVENT_TYPE_PURCHASE,
}
NAMES = {v: k for k, v in TYPES.items()}
CATEGORIES = {"i1": "shoes", "i2": "shoes", "i3": "hats", "i4": "hats", "i5": "bags"}
FAST = {"poll_ms": 50, "log_flush_s": 0.3, "rebalance_interval_ms": 250, "lease_ttl_ms": 1_500}
SESSION_TIMEOUT_MS = 6_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka(tmp_path_factory.mktemp("kafka")) as running:
        yield running


@pytest.fixture(scope="module")
def evicting_broker(tmp_path_factory) -> Iterator[EmbeddedKafka]:
    """Tansu: it evicts a dead member after its session timeout (noida-db never does)."""
    with EmbeddedKafka(tmp_path_factory.mktemp("tansu"), kind="tansu") as running:
        yield running


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("kafka-redis"), persistent=False) as server:
        yield server


@pytest.fixture(scope="module")
def repo(tmp_path_factory, own_redis) -> Settings:
    settings = temp_settings(tmp_path_factory.mktemp("kafka-repo"), redis_address=own_redis.address)
    feast_cli(settings, "apply", quiet=True)
    return settings


@pytest.fixture
def settings(repo, tmp_path, own_redis) -> Iterator[Settings]:
    """The module's Feast repository, a fresh data dir and an empty Redis."""
    data = tmp_path / "data"
    fresh = replace(repo, data_dir=data)
    (data / "feast").mkdir(parents=True)
    (data / "feast" / "registry.db").write_bytes((repo.feast_dir / "registry.db").read_bytes())
    fresh.export_env()
    client = redis.Redis(host="127.0.0.1", port=own_redis.port)
    client.flushdb()
    client.close()
    write_catalog(fresh)
    yield fresh


@pytest.fixture
def client(own_redis) -> Iterator[redis.Redis]:
    c = redis.Redis(host="127.0.0.1", port=own_redis.port)
    yield c
    c.close()


def kafka_settings(broker: EmbeddedKafka, name: str, **more: Any) -> KafkaSettings:
    """A topic and group of the test's own (the broker is shared by the module)."""
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    return KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        topic=tag,
        group=f"g-{tag}",
        partitions=P,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        **more,
    )


def write_catalog(settings: Settings) -> None:
    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    items = pa.table(
        {
            "item_id": list(CATEGORIES),
            "category": list(CATEGORIES.values()),
            "price": [1.0] * len(CATEGORIES),
            "created_at": pa.array([None] * len(CATEGORIES), ITEM_SCHEMA.field("created_at").type),
            "title": [None] * len(CATEGORIES),
            "in_stock": [True] * len(CATEGORIES),
            "blocked": [False] * len(CATEGORIES),
        },
        schema=ITEM_SCHEMA,
    )
    pq.write_table(items, settings.catalog_dir / "items.parquet")


def stream_events(n: int, seed: int, prefix: str) -> list[resources_pb2.Event]:
    """Anonymous sessions and users, timestamped within the last minute."""
    rng = random.Random(seed)
    now = int(time.time() * 1e6)
    out = []
    for i in range(n):
        s = rng.randrange(150)
        kind = rng.choice(["page_view", "item_view", "item_view", "click", "add_to_cart"])
        e = resources_pb2.Event(
            event_id=f"{prefix}{i}",
            session_id=f"{prefix}s-{s}",
            user_id=f"{prefix}u-{s}" if s % 3 == 0 else "",
            item_id="" if kind == "page_view" else f"i{rng.randrange(1, 6)}",
            event_type=TYPES[kind],
            dwell_ms=rng.randrange(9000),
        )
        e.timestamp.FromMicroseconds(now - 60_000_000 + i * 5)
        out.append(e)
    return out


def produce(kafka: KafkaSettings, events: list[resources_pb2.Event]) -> None:
    """Records as the ingest server writes them (`inkling.events.kafka_bus`)."""
    producer = Producer(kafka.client(**{"enable.idempotence": True, "acks": "all"}))
    received = str(int(time.time() * 1e6)).encode()
    for e in events:
        key = routing_key(e.user_id, e.session_id)
        producer.produce(
            kafka.topic,
            value=e.SerializeToString(),
            key=key.encode(),
            partition=partition_of(key, P),
            headers=[(H_EVENT_ID, e.event_id.encode()), (H_RECEIVED_US, received)],
        )
        producer.poll(0)
    assert producer.flush(30) == 0


def logged_ids(settings: Settings) -> Counter[str]:
    if not any(settings.events_dir.glob("date=*/*.parquet")):
        return Counter()
    table = EventLog(settings.events_dir).read(["event_id"])
    return Counter(table.column("event_id").to_pylist())


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def expected_counts(events: list[resources_pb2.Event]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for e in events:
        out.setdefault(e.session_id, Counter())[NAMES[e.event_type]] += 1
    return out


def check_rows(settings: Settings, client: redis.Redis, events: list[resources_pb2.Event]) -> None:
    """Every session's online counts equal its events counted once; item counters too."""
    expected = expected_counts(events)
    sessions = sorted(expected)
    columns = resolve_service(open_store(settings), "ranker_v1")
    rows = RowReader(client, columns).read_sync("session_features", sessions)
    for session, row in zip(sessions, rows, strict=True):
        want = expected[session]
        got = {
            "page_view": row["session_page_views"],
            "item_view": row["session_item_views"],
            "click": row["session_clicks"],
            "add_to_cart": row["session_carts"],
        }
        assert got == {k: want.get(k, 0) for k in got}, session
    out = (
        open_store(settings)
        .get_online_features(
            features=["item_stream_features:item_views_5m", "item_stream_features:item_clicks_5m"],
            entity_rows=[{"item_id": i} for i in CATEGORIES],
        )
        .to_dict()
    )
    counted = {
        i: (out["item_views_5m"][k], out["item_clicks_5m"][k]) for k, i in enumerate(out["item_id"])
    }
    views = Counter(e.item_id for e in events if e.event_type == TYPES["item_view"])
    clicks = Counter(e.item_id for e in events if e.event_type == TYPES["click"])
    assert counted == {i: (views[i], clicks[i]) for i in CATEGORIES}


class Running:
    """A worker on a thread of this process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def start_worker(settings: Settings, kafka: KafkaSettings, worker_id: str) -> Running:
    ws = WorkerSettings(partitions=P, worker_id=worker_id, fsync=False, **FAST)
    worker = build_worker(settings, ws, kafka)
    assert isinstance(worker, KafkaWorker)
    return Running(worker)


# ------------------------------------------------------------------ ingest -> Kafka -> worker


def test_ingest_to_kafka_to_worker_applies_and_logs_each_event_once(settings, client, broker):
    kafka = kafka_settings(broker, "ingest")
    events = stream_events(600, seed=1, prefix="a")
    bad = resources_pb2.Event(event_id="bad-1", session_id="", event_type=TYPES["click"])
    replies: list[Any] = []

    async def ingest() -> None:
        app = EventsApp(settings, EventsSettings(partitions=P), kafka=kafka)
        running = await start_server(app, port=0, grace_s=1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                track = event_service_pb2_grpc.EventServiceStub(channel).TrackEvents
                batches = [
                    [*events[:300], events[5], bad],  # a repeat within the call, one invalid
                    events[:100],  # a client's retry: all duplicates
                    events[300:],
                ]
                for batch in batches:
                    request = event_service_pb2.TrackEventsRequest(events=batch)
                    replies.append(await track(request, timeout=20))
        finally:
            await running.stop()

    asyncio.run(ingest())
    assert [(r.accepted, r.duplicates, len(r.rejected)) for r in replies] == [
        (300, 1, 1),
        (0, 100, 0),
        (300, 0, 0),
    ]
    watcher = group_watcher(kafka)
    try:
        assert sum(group_lag(watcher, kafka.topic, P).values()) == 600  # nothing consumed yet
        first = start_worker(settings, kafka, "ka")
        try:
            wait_until(lambda: sum(logged_ids(settings).values()) >= 600, 60, "the log")
            # The advisory offsets reach the group once the log watermark did.
            wait_until(
                lambda: sum(group_lag(watcher, kafka.topic, P).values()) == 0, 30, "the group"
            )
        finally:
            first.close()
    finally:
        watcher.close()
    assert first.error is None
    ids = logged_ids(settings)
    assert set(ids) == {e.event_id for e in events} and max(ids.values()) == 1
    check_rows(settings, client, events)
    assert client.xlen(DEAD_LETTER) == 0
    stats = first.worker.stats
    assert stats.applied == 600 and stats.logged == 600 and stats.acquired == P
    # Progress is in Redis beside the effects: the next offset to read per partition.
    ends = Counter(partition_of(routing_key(e.user_id, e.session_id), P) for e in events)
    for p in range(P):
        applied = client.get(kafka_key(kafka.topic, "applied", p))
        assert applied is not None and next_offset(applied) == ends[p]

    # A restarted worker resumes at the watermarks: it applies and logs nothing again.
    again = start_worker(settings, kafka, "kb")
    try:
        wait_until(lambda: len(again.worker.owned) == P, 30, "the restart to own the topic")
        wait_until(
            lambda: all(p.mode == "live" for p in again.worker.owned.values()), 30, "seeking"
        )
        time.sleep(1.0)
    finally:
        again.close()
    assert again.worker.stats.entries == 0 and again.worker.stats.applied == 0
    assert logged_ids(settings) == ids


# ------------------------------------------------------------------ rebalance and SIGKILL


def spawn(
    settings: Settings, kafka: KafkaSettings, worker_id: str, log: Path
) -> subprocess.Popen[bytes]:
    """`python -m stream_worker` on the Kafka topic, as `worker_id`."""
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "INKLING_DATA_DIR": str(settings.data_dir),
        "INKLING_FEATURE_REPO": str(settings.feature_repo),
        "INKLING_REDIS_ADDRESS": str(settings.redis_address),
        "INKLING_WORKER_BATCH_MAX_EVENTS": "100",
        "INKLING_WORKER_FSYNC": "false",
        **{f"INKLING_WORKER_{k.upper()}": str(v) for k, v in FAST.items()},
        "INKLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "INKLING_KAFKA_TOPIC": kafka.topic,
        "INKLING_KAFKA_GROUP": kafka.group,
        "INKLING_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
    }
    env.pop("INKLING_CONFIG", None)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream_worker",
                "--partitions",
                str(P),
                "--worker-id",
                worker_id,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def owners(client: redis.Redis, kafka: KafkaSettings) -> list[str]:
    """The fence tokens' worker ids, per partition ('' where none)."""
    out = []
    for p in range(P):
        token = client.get(kafka_key(kafka.topic, "owner", p))
        out.append(token.decode().rsplit(":", 1)[0] if token else "")
    return out


@pytest.mark.slow
def test_a_rebalance_and_a_sigkill_lose_nothing_and_count_nothing_twice(
    settings, client, evicting_broker, tmp_path
):
    kafka = kafka_settings(evicting_broker, "rebalance")
    ensure_topic(kafka)
    events = stream_events(12_000, seed=7, prefix="r")
    sent = [0]
    log = tmp_path / "workers.log"

    def producer() -> None:
        while sent[0] < len(events):
            produce(kafka, events[sent[0] : sent[0] + 200])
            sent[0] += 200
            time.sleep(0.2)  # ~1,000 events/s: the stream flows through the rebalance and kill

    a = spawn(settings, kafka, "wa", log)
    b: subprocess.Popen[bytes] | None = None
    thread = threading.Thread(target=producer, daemon=True)
    try:
        wait_until(lambda: owners(client, kafka) == ["wa"] * P, 60, "worker a to own all")
        thread.start()
        wait_until(lambda: sent[0] >= 2_000, 60, "the stream to flow")
        b = spawn(settings, kafka, "wb", log)
        wait_until(lambda: sorted(set(owners(client, kafka))) == ["wa", "wb"], 60, "the rebalance")
        wait_until(lambda: sent[0] >= 8_000, 60, "more of the stream")
        applied_before = logged_ids(settings)
        a.send_signal(signal.SIGKILL)  # mid-stream: batches applied, their log not written
        a.wait(10)
        wait_until(lambda: owners(client, kafka) == ["wb"] * P, 60, "b to take over all")
        thread.join(120)
        assert not thread.is_alive()
        wait_until(lambda: sum(logged_ids(settings).values()) >= len(events), 90, "the log")
        time.sleep(1.0)  # anything logged twice would show up by now
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(10)
        if b is not None:
            b.send_signal(signal.SIGTERM)
            assert b.wait(30) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "[worker] stopped" in output
    assert len(applied_before) < len(events)  # the kill came mid-stream
    ids = logged_ids(settings)
    assert set(ids) == {e.event_id for e in events}
    assert max(ids.values()) == 1  # every event in the log exactly once
    check_rows(settings, client, events)  # every event counted online exactly once
    assert client.xlen(DEAD_LETTER) == 0


# ------------------------------------------------------------------ an existing JSON topic


def test_an_existing_json_topic_is_read_through_a_field_mapping(settings, client, broker):
    kafka = kafka_settings(
        broker,
        "clicks",
        format="json",
        field_map={
            "event_id": "id",
            "user_id": "user.id",
            "session_id": "sid",
            "item_id": "sku",
            "event_type": "type",
            "timestamp": "ts",
        },
        event_types={"pdp_view": "item_view", "tap": "click"},
        timestamp_unit="ms",
    )
    ensure_topic(kafka)
    now_ms = int(time.time() * 1000)
    theirs = {"item_view": "pdp_view", "click": "tap"}
    good = [
        {"id": f"j{i}", "user": {"id": f"ju{i % 7}"}, "sid": f"js{i % 7}", "sku": f"i{i % 5 + 1}",
         "type": theirs["click" if i % 4 == 0 else "item_view"], "ts": now_ms - 30_000 + i}
        for i in range(200)
    ]  # fmt: skip
    bad = [
        b"{not json",
        json.dumps({"id": "jx1", "sid": "s", "sku": "i1", "type": "teleport", "ts": now_ms}),
        json.dumps({"id": "jx2", "sku": "i1", "type": "tap", "ts": now_ms}),  # no session
        json.dumps({"id": "jx3", "sid": "s", "sku": "i1", "type": "tap", "ts": "yesterday"}),
    ]
    producer = Producer(kafka.client())
    for record in good:
        key = f"u:{record['user']['id']}"  # type: ignore[index]
        producer.produce(kafka.topic, json.dumps(record).encode(), key=key.encode())
    for n, value in enumerate(bad):
        producer.produce(kafka.topic, value, key=b"bad", partition=n % P)
    assert producer.flush(30) == 0

    running = start_worker(settings, kafka, "kj")
    try:
        wait_until(lambda: sum(logged_ids(settings).values()) >= len(good), 60, "the log")
        wait_until(lambda: client.xlen(DEAD_LETTER) >= len(bad), 30, "the dead letters")
    finally:
        running.close()
    assert running.error is None
    ids = logged_ids(settings)
    assert set(ids) == {r["id"] for r in good} and max(ids.values()) == 1
    events = []
    for r in good:
        e = resources_pb2.Event(
            event_id=str(r["id"]), session_id=str(r["sid"]), item_id=str(r["sku"]),
            event_type=TYPES["click" if r["type"] == "tap" else "item_view"],
        )  # fmt: skip
        events.append(e)
    check_rows(settings, client, events)
    dead = client.xrange(DEAD_LETTER)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert len(dead) == len(bad)
    assert any("not JSON" in r for r in reasons)
    assert any("'teleport' is not a mapped event type" in r for r in reasons)
    assert any("session_id: field 'sid' is missing" in r for r in reasons)
    assert any("timestamp: 'yesterday' is not a number of ms" in r for r in reasons)
    sources = {fields[b"source"].decode() for _, fields in dead}
    assert sources <= {f"kafka:{kafka.topic}:{p}" for p in range(P)}
    assert b"{not json" in {fields[b"e"] for _, fields in dead}  # the record as it came


# ------------------------------------------------------------------ the fence


def test_a_commit_under_a_replaced_owner_token_writes_nothing(settings, client, broker):
    """Another owner's token (as a rebalance's new owner takes it) makes the worker's next
    commit fail whole; it then takes the partition afresh and nothing is applied or
    logged twice."""
    kafka = kafka_settings(broker, "fence")
    ensure_topic(kafka)
    events = stream_events(400, seed=3, prefix="f")
    produce(kafka, events[:200])
    running = start_worker(settings, kafka, "kf")
    try:
        wait_until(lambda: sum(logged_ids(settings).values()) >= 200, 60, "the first events")
        p = partition_of(routing_key(events[200].user_id, events[200].session_id), P)
        keys = [kafka_key(kafka.topic, k, p) for k in ("owner", "epoch", "applied", "logged")]
        client.eval(_TAKE, 4, *keys, "thief", b"0-0")  # a new owner, as after a rebalance
        applied = client.get(keys[2])
        produce(kafka, events[200:])
        wait_until(lambda: sum(logged_ids(settings).values()) >= 400, 60, "the rest")
    finally:
        running.close()
    assert running.error is None
    stats = running.worker.stats
    assert stats.commit_failures >= 1  # the commit under the old token was refused
    assert applied is not None and next_offset(client.get(keys[2])) > next_offset(applied)
    assert client.get(keys[0]).decode().startswith("kf:")  # taken back, epoch bumped again
    ids = logged_ids(settings)
    assert set(ids) == {e.event_id for e in events} and max(ids.values()) == 1
    check_rows(settings, client, events)
