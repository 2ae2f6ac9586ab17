"""The stream worker against a real Redis server, a real Feast repository, the Parquet
event log and (for the batch comparison) local Spark.

Events are appended to the bus exactly as `inkling/events/bus.py` documents the layout
(XADD of id / e / r to `inkling:events:<p>`, the group created at id 0); serve records
the same way with their payload in `s`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from feast.data_source import PushMode

from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.bandit import CONTEXT_FEATURES, DIM, Statistics, increments, stats_key
from inkling.config import PROJECT_ROOT, Settings
from inkling.events.bus import (
    DEAD_LETTER,
    GROUP,
    dead_letter_key,
    is_cluster,
    partition_of,
    read_partition,
    routing_key,
    stream_key,
)
from inkling.events.eventlog import EventLog
from inkling.events.schema import ITEM_SCHEMA
from inkling.events.servelog import ServeLog
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_codec import entity_keys
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.rows import RowReader
from inkling.redis_cluster import LocalRedisCluster
from inkling.serving.runtime import start_server
from inkling.v1 import event_service_pb2, event_service_pb2_grpc, resources_pb2
from stream_worker.app import build_worker
from stream_worker.cluster_commit import row_field
from stream_worker.commit import applied_key, inflight_key, parse_id
from stream_worker.logfiles import StreamLogWriter
from stream_worker.online import SessionRow, counter_command, resolve_layout, session_commands
from stream_worker.ownership import lease_key
from stream_worker.settings import WorkerSettings
from stream_worker.worker import Worker
from tests.conftest import temp_settings

pytestmark = [pytest.mark.redis]

DB = 4  # this module's database of the shared test Redis (3, 5 and 7 are others')
P = 4
TYPES = {
    "page_view": resources_pb2.EVENT_TYPE_PAGE_VIEW,
    "item_view": resources_pb2.EVENT_TYPE_ITEM_VIEW,
    "click": resources_pb2.EVENT_TYPE_CLICK,
    "add_to_cart": resources_pb2.EVENT_TYPE_ADD_TO_CART,
    "purchase": resources_pb2.EVENT_TYPE_PURCHASE,
}
SESSION_FEATURES = [
    "session_recent_items",
    "session_page_views",
    "session_item_views",
    "session_clicks",
    "session_carts",
    "session_purchases",
    "session_intent_category",
    "session_last_event_timestamp",
]
FAST = {
    "lease_ttl_ms": 1_500,
    "rebalance_interval_ms": 250,
    "claim_min_idle_ms": 300,
    "poll_ms": 50,
    "log_flush_s": 0.3,
}


ON_CLUSTER = pytest.mark.parametrize("mode", ["one-server", "cluster"], indirect=True)
"""Runs a test on one Redis server and on a Redis Cluster (three masters, three replicas)."""


@pytest.fixture(scope="module")
def mode(request) -> str:
    """`one-server` unless a test asks for both (`ON_CLUSTER`)."""
    return getattr(request, "param", "one-server")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("worker-cluster"), persistent=False) as c:
        yield c


@pytest.fixture(scope="module")
def repo(tmp_path_factory, request, mode) -> Settings:
    if mode == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        settings = temp_settings(
            tmp_path_factory.mktemp("stream-worker-cluster"),
            online_store="redis_cluster",
            redis_address=cluster.address,
        )
    else:
        server = request.getfixturevalue("redis_server")
        settings = temp_settings(
            tmp_path_factory.mktemp("stream-worker"), redis_address=f"{server.address},db={DB}"
        )
    feast_cli(settings, "apply", quiet=True)
    settings.export_env()
    return settings


@pytest.fixture
def client(repo, request, mode) -> Iterator[redis.Redis]:
    if mode == "cluster":
        c: redis.Redis = request.getfixturevalue("redis_cluster").client()
        c.flushall(target_nodes=redis.RedisCluster.PRIMARIES)  # type: ignore[call-arg]
    else:
        c = redis.Redis(host="127.0.0.1", port=request.getfixturevalue("redis_server").port, db=DB)
        c.flushdb()
    yield c
    c.close()


def skey(c: redis.Redis, partition: int) -> str:
    """A partition's stream for the client's kind of Redis."""
    return stream_key(partition, is_cluster(c))


def lease(c: redis.Redis, partition: int) -> str:
    return lease_key(partition, is_cluster(c))


def dead_letters(c: redis.Redis) -> list[Any]:
    """Every dead letter (on a cluster, of every partition's dead-letter stream)."""
    if not is_cluster(c):
        return c.xrange(DEAD_LETTER)
    return sorted(
        (d for p in range(P) for d in c.xrange(dead_letter_key(p, True))),
        key=lambda d: d[1][b"source_id"],
    )


@pytest.fixture
def settings(repo, tmp_path) -> Settings:
    """The module's Feast repository with a fresh data dir for the log and catalogue."""
    data = tmp_path / "data"
    fresh = replace(repo, data_dir=data)
    (data / "feast").mkdir(parents=True)
    (data / "feast" / "registry.db").write_bytes((repo.feast_dir / "registry.db").read_bytes())
    fresh.export_env()
    return fresh


def write_catalog(settings: Settings, categories: dict[str, str]) -> None:
    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    items = pa.table(
        {
            "item_id": list(categories),
            "category": list(categories.values()),
            "price": [1.0] * len(categories),
            "created_at": pa.array([None] * len(categories), ITEM_SCHEMA.field("created_at").type),
            "title": [None] * len(categories),
            "in_stock": [True] * len(categories),
            "blocked": [False] * len(categories),
        },
        schema=ITEM_SCHEMA,
    )
    pq.write_table(items, settings.catalog_dir / "items.parquet")


def event(
    eid: str,
    kind: str,
    session: str,
    item: str = "",
    user: str = "",
    ts_us: int | None = None,
    dwell: int = 0,
) -> resources_pb2.Event:
    e = resources_pb2.Event(
        event_id=eid,
        session_id=session,
        user_id=user,
        item_id=item,
        event_type=TYPES[kind],
        dwell_ms=dwell,
    )
    e.timestamp.FromMicroseconds(ts_us if ts_us is not None else int(time.time() * 1e6))
    return e


def ensure_group(c: redis.Redis, partitions: int = P) -> None:
    for p in range(partitions):
        try:
            c.xgroup_create(skey(c, p), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise


def append(c: redis.Redis, events: list[resources_pb2.Event], partitions: int = P) -> list[str]:
    """XADD events in the bus layout; the entry ids."""
    ensure_group(c, partitions)
    pipe = c.pipeline(transaction=False)
    for e in events:
        p = partition_of(routing_key(e.user_id, e.session_id), partitions)
        pipe.xadd(
            skey(c, p),
            {"id": e.event_id, "e": e.SerializeToString(), "r": str(int(time.time() * 1e6))},
        )
    return [i.decode() for i in pipe.execute()]


def serve(
    request_id: str, session: str, items: list[str], user: str = ""
) -> resources_pb2.ServeRecord:
    """A ranking answer's serve record, served now."""
    record = resources_pb2.ServeRecord(
        request_id=request_id,
        user_id=user,
        session_id=session,
        surface="home",
        operation="recommend",
        item_ids=items,
        scores=[1.0 / (k + 1) for k in range(len(items))],
        sources=[resources_pb2.CANDIDATE_SOURCE_ANN] * len(items),
        propensities=[1.0] * len(items),
        model_version="sasrec:v1",
        feature_service="ranker_v1",
    )
    record.served_at.FromMicroseconds(int(time.time() * 1e6))
    return record


def append_serves(
    c: redis.Redis, records: list[resources_pb2.ServeRecord], partitions: int = P
) -> list[str]:
    """XADD serve records in the bus layout (partitioned like the user's events)."""
    ensure_group(c, partitions)
    pipe = c.pipeline(transaction=False)
    for r in records:
        p = partition_of(routing_key(r.user_id, r.session_id), partitions)
        pipe.xadd(
            skey(c, p),
            {"id": r.request_id, "s": r.SerializeToString(), "r": str(int(time.time() * 1e6))},
        )
    return [i.decode() for i in pipe.execute()]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def backlog(c: redis.Redis, partitions: int = P) -> int:
    """Entries not yet acknowledged by the group (pending + never delivered)."""
    total = 0
    for p in range(partitions):
        key = skey(c, p)
        if not c.exists(key):
            continue
        total += int(c.xpending(key, GROUP)["pending"])
        info = next(g for g in c.xinfo_groups(key) if g["name"] == GROUP.encode())
        last = info["last-delivered-id"]
        total += len(c.xrange(key, min=b"(" + last, max="+"))
    return total


class Running:
    """A worker on a thread of this process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as e:  # a simulated crash ends up here
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)


def start(settings: Settings, worker_id: str, **overrides: Any) -> Running:
    ws = WorkerSettings(partitions=P, worker_id=worker_id, fsync=False, **{**FAST, **overrides})
    return Running(build_worker(settings, ws))


def store_rows(settings: Settings, sessions: list[str]) -> list[dict[str, Any]]:
    out = open_store(settings).get_online_features(
        features=[f"session_features:{f}" for f in SESSION_FEATURES],
        entity_rows=[{"session_id": s} for s in sessions],
    )
    table = out.to_dict()
    return [{f: table[f][i] for f in SESSION_FEATURES} for i in range(len(sessions))]


def reader_rows(settings: Settings, c: redis.Redis, sessions: list[str], ttl: bool = True):
    columns = resolve_service(open_store(settings), "ranker_v1")
    return RowReader(c, columns, enforce_ttl=ttl).read_sync("session_features", sessions)


def counters(settings: Settings, items: list[str]) -> dict[str, tuple[int, int]]:
    out = (
        open_store(settings)
        .get_online_features(
            features=["item_stream_features:item_views_5m", "item_stream_features:item_clicks_5m"],
            entity_rows=[{"item_id": i} for i in items],
        )
        .to_dict()
    )
    return {
        i: (out["item_views_5m"][k], out["item_clicks_5m"][k]) for k, i in enumerate(out["item_id"])
    }


CATEGORIES = {"i1": "shoes", "i2": "shoes", "i3": "hats", "i4": "hats", "i5": "bags"}


# ------------------------------------------------------------------ (a) end to end


@ON_CLUSTER
def test_events_become_session_rows_counters_log_files_and_acks(settings, client):
    write_catalog(settings, CATEGORIES)
    now = int(time.time() * 1e6)
    shoes = [
        event("a1", "page_view", "web-1", ts_us=now - 9_000_000),
        event("a2", "item_view", "web-1", "i1", ts_us=now - 8_000_000),
        event("a3", "click", "web-1", "i1", ts_us=now - 7_000_000, dwell=20_000),
        event("a4", "click", "web-1", "i2", ts_us=now - 6_000_000, dwell=3_000),
    ]
    append(client, shoes)
    running = start(settings, "wa")
    try:
        wait_until(lambda: backlog(client) == 0, what="the first events to be processed")
        assert store_rows(settings, ["web-1"])[0]["session_intent_category"] == "shoes"
        # The user moves to hats: clicks, a cart; the row follows.
        clicked_from_a_list = event(
            "a6", "click", "web-1", "i3", ts_us=now - 4_000_000, dwell=15_000
        )
        clicked_from_a_list.request_id = "9f2c" * 8  # the answer it was shown in
        hats = [
            event("a5", "item_view", "web-1", "i3", ts_us=now - 5_000_000),
            clicked_from_a_list,
            event("a7", "add_to_cart", "web-1", "i3", ts_us=now - 3_000_000),
        ]
        append(client, hats)
        wait_until(lambda: backlog(client) == 0, what="the new intent to be processed")
        # A logged-in user on two devices: one visit, one state, both session rows.
        user = [
            event("u1", "click", "phone-7", "i5", user="alice", ts_us=now - 2_000_000, dwell=9_000),
            event("u2", "click", "laptop-7", "i5", user="alice", ts_us=now - 1_000_000),
        ]
        append(client, user)
        wait_until(lambda: backlog(client) == 0, what="the user's events")
    finally:
        running.close()
    assert running.error is None

    feast_row, phone, laptop = store_rows(settings, ["web-1", "phone-7", "laptop-7"])
    assert feast_row == {
        "session_recent_items": ["i1", "i2", "i3", "i3"],
        "session_page_views": 1,
        "session_item_views": 2,
        "session_clicks": 3,
        "session_carts": 1,
        "session_purchases": 0,
        "session_intent_category": "hats",  # 15 s + 30 s > 20 s + 3 s
        "session_last_event_timestamp": datetime.fromtimestamp((now - 3_000_000) // 10**6, UTC),
    }
    if not is_cluster(client):
        assert reader_rows(settings, client, ["web-1"]) == [feast_row]
    else:  # Feast read the rows above past the worker's per-partition mark in each
        (row_key,) = entity_keys("session_id", ["web-1"], "inkling")
        marks = [f for f in client.hkeys(row_key) if f.startswith(b"_w:")]
        assert marks == [row_field(partition_of("s:web-1", P)).encode()]
    assert phone == laptop and phone["session_clicks"] == 2
    assert phone["session_intent_category"] == "bags"

    assert counters(settings, ["i1", "i3", "i5", "i4"]) == {
        "i1": (1, 1),
        "i3": (1, 1),
        "i5": (0, 2),
        "i4": (None, None),
    }
    logged = EventLog(settings.events_dir).read()
    request_ids = dict(
        zip(
            logged.column("event_id").to_pylist(),
            logged.column("request_id").to_pylist(),
            strict=True,
        )
    )
    assert request_ids["a6"] == "9f2c" * 8 and request_ids["a5"] is None
    assert sorted(logged.column("event_id").to_pylist()) == sorted(
        e.event_id for e in shoes + hats + user
    )
    files = list(settings.events_dir.glob("date=*/stream-p*.parquet"))
    assert files and not list((settings.events_dir / "_staging").glob("*"))
    for p in range(P):
        assert client.xpending(skey(client, p), GROUP)["pending"] == 0
    assert running.worker.stats.applied == 9 and running.worker.stats.batches >= 3
    assert all(client.get(lease(client, p)) is None for p in range(P))  # released on stop


# ------------------------------------------------------------------ the fast writer


def test_the_worker_writes_what_feast_push_writes(settings, client):
    store = open_store(settings)
    layout = resolve_layout(store)
    rng = random.Random(4)
    n = 500
    base = int(time.time()) * 10**6
    rows = []
    for i in range(n):
        values = {
            "session_recent_items": [f"i{rng.randrange(50)}" for _ in range(rng.randrange(11))],
            "session_page_views": rng.randrange(5),
            "session_item_views": rng.randrange(40),
            "session_clicks": rng.randrange(10),
            "session_carts": rng.randrange(3),
            "session_purchases": rng.randrange(2),
            "session_intent_category": rng.choice(["shoes", "hats", "unknown"]),
            "session_last_event_timestamp": datetime.fromtimestamp(
                (base - i * 1_000_003) / 1e6, UTC
            ),
        }
        rows.append((f"s{i}", base - i * 1_000_003, values))

    began = time.perf_counter()
    commands = session_commands(layout, [SessionRow(f"fast-{s}", ts, v) for s, ts, v in rows])
    pipe = client.pipeline(transaction=True)
    for command in commands:
        pipe.execute_command(*command)
    pipe.execute()
    fast_s = time.perf_counter() - began

    frame = pd.DataFrame(
        [
            {"session_id": f"push-{s}", "event_timestamp": v["session_last_event_timestamp"], **v}
            for s, _, v in rows
        ]
    )
    frame["event_timestamp"] = [
        pd.Timestamp(ts, unit="us", tz="UTC") for _, ts, _ in rows
    ]  # the row's _ts: the latest event time, to the microsecond
    began = time.perf_counter()
    store.push("session_push", frame, to=PushMode.ONLINE)
    push_s = time.perf_counter() - began
    print(
        f"\n500 session rows: fast writer {fast_s * 1000:.1f} ms, Feast push {push_s * 1000:.1f} ms"
    )

    reader = RowReader(client, resolve_service(store, "ranker_v1"), enforce_ttl=False)
    for s, _, _ in rows[:50]:
        fast_key = reader.redis_key("session_features", f"fast-{s}")
        push_key = reader.redis_key("session_features", f"push-{s}")
        assert client.hgetall(fast_key) == client.hgetall(push_key)
    fast_rows = store_rows(settings, [f"fast-{s}" for s, _, _ in rows])
    assert fast_rows == store_rows(settings, [f"push-{s}" for s, _, _ in rows])
    assert fast_rows[7]["session_recent_items"] == rows[7][2]["session_recent_items"]

    # Item counters: the Lua script's bytes equal Feast's for the same counts.
    now_us = int(time.time() * 1e6)
    minute = now_us // 60_000_000
    command = counter_command(layout, {"fast-x": {minute: [3, 1]}}, minute, now_us)
    assert command is not None
    client.execute_command(*command)
    store.push(
        "item_stream_push",
        pd.DataFrame(
            {
                "item_id": ["push-x"],
                "event_timestamp": [pd.Timestamp(now_us, unit="us", tz="UTC")],
                "item_views_5m": [3],
                "item_clicks_5m": [1],
            }
        ),
        to=PushMode.ONLINE,
    )
    from inkling.feature_store import feast_codec

    keys = feast_codec.entity_keys("item_id", ["fast-x", "push-x"], layout.project)
    assert client.hgetall(keys[0]) == client.hgetall(keys[1])
    assert counters(settings, ["fast-x"]) == {"fast-x": (3, 1)}
    # Recomputed later, the counts age out of the window and their buckets are dropped.
    for later, expected in ((minute + 4, (3, 1)), (minute + 5, (0, 0))):
        command = counter_command(
            layout, {"fast-x": {}}, later, now_us + (later - minute) * 60_000_000
        )
        assert command is not None
        assert client.execute_command(*command) == list(expected)
    assert counters(settings, ["fast-x"]) == {"fast-x": (0, 0)}
    assert not client.exists("inkling:worker:counts:fast-x")


# ------------------------------------------------------------------ (d) poison


@ON_CLUSTER
def test_poison_goes_to_the_dead_letter_stream_and_the_partition_continues(settings, client):
    write_catalog(settings, CATEGORIES)
    ensure_group(client)
    good_before = event("g1", "click", "p-1", "i1")
    good_after = [event("g2", "click", "p-1", "i3"), event("g3", "add_to_cart", "p-1", "i3")]
    p = partition_of(routing_key("", "p-1"), P)
    stream = skey(client, p)
    append(client, [good_before])
    bad = [
        ({"id": "x1", "e": b"\x08\xff\xff", "r": "1"}, "not an inkling.v1.Event"),
        ({"id": "x2", "e": event("x2", "click", "p-1", "i1").SerializeToString().replace(b"(\x03", b"(c"), "r": "1"}, "not a known event type"),
        ({"id": "x3", "e": event("x3", "click", "p-1").SerializeToString(), "r": "1"}, "item_id is missing"),
        ({"id": "x4", "r": "1"}, "has no 'e' field"),
        ({"id": "x5", "e": event("x6", "page_view", "p-1").SerializeToString(), "r": "1"}, "differs from event_id"),
    ]  # fmt: skip
    bad_ids = [client.xadd(stream, fields).decode() for fields, _ in bad]
    append(client, good_after)
    running = start(settings, "wd")
    try:
        wait_until(lambda: backlog(client) == 0, what="the partition to drain")
    finally:
        running.close()
    dead = dead_letters(client)
    assert [d[1][b"source_id"].decode() for d in dead] == bad_ids
    for (_, fields), (fields_in, reason) in zip(dead, bad, strict=True):
        assert reason in fields[b"reason"].decode()
        assert fields[b"source"].decode() == stream
        assert fields[b"id"].decode() == fields_in["id"]
    row = store_rows(settings, ["p-1"])[0]
    assert (row["session_clicks"], row["session_carts"]) == (2, 1)
    assert row["session_intent_category"] == "hats"
    assert sorted(EventLog(settings.events_dir).read().column("event_id").to_pylist()) == [
        "g1",
        "g2",
        "g3",
    ]
    assert client.xpending(stream, GROUP)["pending"] == 0
    applied = client.get(applied_key(p, is_cluster(client)))
    assert applied.decode() == client.xrevrange(stream, count=1)[0][0].decode()


def test_serve_records_go_to_the_serve_log_and_bad_ones_to_the_dead_letters(settings, client):
    write_catalog(settings, CATEGORIES)
    ensure_group(client)
    first = serve("r1", "v-1", ["i1", "i3", "i2"], user="bob")
    append(client, [event("v1", "click", "v-1", "i3", user="bob")])
    append_serves(client, [first, serve("r2", "v-2", [])])  # an empty answer is kept
    p = partition_of(routing_key("bob", "v-1"), P)
    lopsided = serve("x2", "v-1", ["i1", "i2"], user="bob")
    del lopsided.scores[1:]
    no_model = serve("x4", "v-1", ["i1"], user="bob")
    no_model.model_version = ""
    bad = [
        ({"id": "x1", "s": b"\x0a\xff", "r": "1"}, "does not decode"),
        ({"id": "x2", "s": lopsided.SerializeToString(), "r": "1"}, "scores has 1 values for 2 items"),
        ({"id": "x3", "s": first.SerializeToString(), "r": "1"}, "differs from the bus entry's"),
        ({"id": "x4", "s": no_model.SerializeToString(), "r": "1"}, "model_version is empty"),
    ]  # fmt: skip
    bad_ids = [client.xadd(stream_key(p), fields).decode() for fields, _ in bad]
    append_serves(client, [serve("r3", "v-1", ["i5"], user="bob")])
    running = start(settings, "ws")
    try:
        wait_until(lambda: backlog(client) == 0, what="the serve records to be processed")
    finally:
        running.close()
    assert running.error is None
    dead = dead_letters(client)
    assert [d[1][b"source_id"].decode() for d in dead] == bad_ids
    for (_, fields), (fields_in, reason) in zip(dead, bad, strict=True):
        assert reason in fields[b"reason"].decode()
        assert fields[b"s"] == fields_in["s"]  # the record is kept for a look
    served = ServeLog(settings.serves_dir).read().to_pylist()
    by_id = {r["request_id"]: r for r in served}
    assert sorted(by_id) == ["r1", "r2", "r3"] and len(served) == 3
    r1 = by_id["r1"]
    assert r1["item_ids"] == ["i1", "i3", "i2"] and r1["sources"] == ["ann"] * 3
    assert r1["scores"] == pytest.approx([1.0, 0.5, 1 / 3])
    assert r1["propensities"] == [1.0] * 3 and r1["degraded"] == []
    assert (r1["user_id"], r1["session_id"], r1["surface"]) == ("bob", "v-1", "home")
    assert r1["model_version"] == "sasrec:v1" and r1["experiment"] is None
    assert r1["served_at"].timestamp() == pytest.approx(first.served_at.ToMicroseconds() / 1e6)
    assert by_id["r2"]["item_ids"] == [] and by_id["r2"]["user_id"] is None
    # Serve records are logged, not applied: the session saw one click, no more.
    assert store_rows(settings, ["v-1"])[0]["session_clicks"] == 1
    assert EventLog(settings.events_dir).read().column("event_id").to_pylist() == ["v1"]
    files = list(settings.serves_dir.glob("date=*/stream-p*.parquet"))
    assert files and not list((settings.serves_dir / "_staging").glob("*"))
    assert running.worker.stats.serves_logged == 3 and running.worker.stats.applied == 1


def explored(request_id: str, session: str, user: str, pool: list[str], shown: list[str]):
    """An exploring answer's serve record: its pool carries the bandit's context rows."""
    record = serve(request_id, session, shown, user=user)
    record.policy = "bandit(epsilon=0.1,temperature=0.5,pool=50)"
    record.seed = 7
    record.explored.extend([False] * len(shown))
    record.propensities[:] = [0.5] * len(shown)
    rows = np.random.default_rng(len(request_id)).normal(size=(len(pool), DIM))
    record.pool.item_ids.extend(pool)
    record.pool.scores.extend([1.0] * len(pool))
    record.pool.categories.extend(["c"] * len(pool))
    record.pool.values.extend([1.0] * len(pool))
    record.pool.feature_names.extend(CONTEXT_FEATURES)
    record.pool.features.extend(rows.ravel().tolist())
    return record, dict(zip(pool, rows, strict=True))


@ON_CLUSTER
def test_the_bandit_learns_each_impression_and_click_once_even_when_replayed(settings, client):
    write_catalog(settings, CATEGORIES)
    ensure_group(client)
    shown_x, clicked_x = [], []
    records, clicks = [], []
    for k in range(30):
        user, session = f"b{k % 7}", f"bs-{k % 7}"
        record, rows = explored(f"q{k}", session, user, ["i1", "i2", "i3", "i4"], ["i3", "i1"])
        records.append(record)
        shown_x += [rows["i3"], rows["i1"]]
        if k % 3 == 0:  # a click on the first item, carrying the answer's request id
            click = event(f"c{k}", "click", session, "i3", user=user)
            click.request_id = f"q{k}"
            clicks.append(click)
            clicked_x.append(rows["i3"])
            if k % 6 == 0:  # clicked twice: credited once
                again = event(f"c{k}b", "click", session, "i3", user=user)
                again.request_id = f"q{k}"
                clicks.append(again)
    stray = event("c-stray", "click", "bs-1", "i2", user="b1")
    stray.request_id = "q-unknown"  # no such answer: not credited
    append_serves(client, records)
    append(client, [*clicks, stray])
    expected = Statistics.empty().plus(increments(np.array(shown_x), np.array(clicked_x)))

    def learned() -> Statistics:
        return Statistics.from_hash(client.hgetall(stats_key("home")))

    running = start(settings, "wb")
    try:
        wait_until(lambda: backlog(client) == 0, what="the answers and clicks to be processed")
        wait_until(lambda: learned().n == len(shown_x), what="the impressions to be learned")
        for p in range(P):  # every entry delivered again, as after a lost acknowledgement
            client.xgroup_setid(skey(client, p), GROUP, id="0")
        wait_until(lambda: backlog(client) == 0, what="the replay to be processed")
    finally:
        running.close()
    assert running.error is None
    got = learned()
    assert got.n == len(shown_x) == 60
    assert got.a == pytest.approx(expected.a) and got.b == pytest.approx(expected.b)
    assert running.worker.bandit.unmatched == 1


# ------------------------------------------------------------------ (b) SIGKILL


def stream_events(n: int, seed: int) -> list[resources_pb2.Event]:
    """Anonymous sessions and single-session users, timestamped within the last minute."""
    rng = random.Random(seed)
    now = int(time.time() * 1e6)
    out = []
    for i in range(n):
        s = rng.randrange(200)
        user = f"user-{s}" if s % 3 == 0 else ""
        kind = rng.choice(
            ["page_view", "item_view", "item_view", "click", "add_to_cart", "purchase"]
        )
        item = "" if kind == "page_view" else f"i{rng.randrange(1, 6)}"
        out.append(
            event(
                f"k{i}", kind, f"ks-{s}", item, user, now - 60_000_000 + i * 5, rng.randrange(9000)
            )
        )
    return out


def expected_counts(events: list[resources_pb2.Event]) -> dict[str, Counter[str]]:
    names = {v: k for k, v in TYPES.items()}
    out: dict[str, Counter[str]] = {}
    for e in events:
        out.setdefault(e.session_id, Counter())[names[e.event_type]] += 1
    return out


# Runs the worker's own entrypoint with one change: once `INKLING_TEST_HOLD_AFTER` log
# flushes that wrote files have committed, the next one writes its Parquet files, touches
# `INKLING_TEST_HOLD_MARKER` and sleeps instead of committing. The log thread stays in the
# window between writing the files and committing them (a few ms in real life) until the
# test kills the process, so catching the worker there is deterministic.
HOLD_BEFORE_LOG_COMMIT = """
import os, sys, time
from pathlib import Path
from stream_worker import logfiles
from stream_worker.__main__ import main

after = int(os.environ["INKLING_TEST_HOLD_AFTER"])
marker = Path(os.environ["INKLING_TEST_HOLD_MARKER"])
written = logfiles.StreamLogWriter.write

def write(self, files):
    global after
    written(self, files)
    if files:
        after -= 1
        if after < 0:
            marker.write_text(",".join(f.relative for f in files))
            time.sleep(3600)

logfiles.StreamLogWriter.write = write
sys.exit(main(sys.argv[1:]))
"""


# On a cluster, the window that matters more: after the (n+1)-th micro-batch wrote its
# rows, counters and statistics (the idempotent one-key scripts) and before its fenced
# partition commit. The marker gets the partition's applied key and the batch's last id.
HOLD_BEFORE_PARTITION_COMMIT = """
import os, sys, time
from pathlib import Path
from stream_worker.__main__ import main
from stream_worker.worker import Worker

after = int(os.environ["INKLING_TEST_HOLD_AFTER"])
marker = Path(os.environ["INKLING_TEST_HOLD_MARKER"])
commit = Worker._commit

def held(self, expected, commands, counters, calls=()):
    global after
    if calls:
        after -= 1
        if after < 0:
            self._run_calls(calls)
            rows = [c for c in calls if c[2] == 1]  # ROW_SCRIPT calls: (EVAL, s, 1, key, f, id)
            applied = [k for k in expected if "applied" in k][0]
            marker.write_text(applied + " " + rows[0][5].decode())
            time.sleep(3600)
    return commit(self, expected, commands, counters, calls)

Worker._commit = held
sys.exit(main(sys.argv[1:]))
"""


def spawn(
    settings: Settings, worker_id: str, log_path: Path, hold: tuple[int, Path] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m stream_worker` for `worker_id`; with `hold=(n, marker)`, the worker that
    stops between writing and committing its (n+1)-th log flush (HOLD_BEFORE_LOG_COMMIT),
    on a cluster between its (n+1)-th batch's row writes and its partition commit
    (HOLD_BEFORE_PARTITION_COMMIT)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "INKLING_DATA_DIR": str(settings.data_dir),
        "INKLING_FEATURE_REPO": str(settings.feature_repo),
        "INKLING_REDIS_ADDRESS": str(settings.redis_address),
        "INKLING_ONLINE_STORE": settings.online_store,
        "INKLING_WORKER_BATCH_MAX_EVENTS": "50",
        **{f"INKLING_WORKER_{k.upper()}": str(v) for k, v in FAST.items()},
    }
    env.pop("INKLING_CONFIG", None)
    entry = ["-m", "stream_worker"]
    if hold is not None:
        env["INKLING_TEST_HOLD_AFTER"], env["INKLING_TEST_HOLD_MARKER"] = str(hold[0]), str(hold[1])
        cluster = settings.online_store == "redis_cluster"
        entry = ["-c", HOLD_BEFORE_PARTITION_COMMIT if cluster else HOLD_BEFORE_LOG_COMMIT]
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                *entry,
                "--partitions",
                str(P),
                "--worker-id",
                worker_id,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@ON_CLUSTER
def test_sigkill_mid_batch_and_restart_lose_nothing_and_count_nothing_twice(
    settings, client, tmp_path
):
    write_catalog(settings, CATEGORIES)
    stream = stream_events(40_000, seed=11)
    # One answer served for every 20 events, in the same partitions, interleaved.
    answers = [
        serve(f"req-{k}", e.session_id, [e.item_id or "i1", "i2"], user=e.user_id)
        for k, e in enumerate(stream[::20])
    ]
    append(client, stream[:1_000])
    append_serves(client, answers[:50])
    sent = [1_000]
    killed = threading.Event()
    logfile = tmp_path / "workers.log"

    def produce() -> None:
        """The stream goes on until the worker was killed between writing its files and
        committing them, then for 2,000 more events."""
        end = len(stream)
        while sent[0] < end:
            if killed.is_set():
                end = min(end, sent[0] + 2_000)
            append(client, stream[sent[0] : sent[0] + 100])
            append_serves(client, answers[sent[0] // 20 : sent[0] // 20 + 5])
            sent[0] += 100
            time.sleep(0.04)

    producer = threading.Thread(target=produce, daemon=True)

    def registered() -> set[str]:
        cluster = is_cluster(client)
        return {m.decode() for p in range(P) for m in client.smembers(inflight_key(p, cluster))}

    def mid_batch() -> bool:
        """Some log files committed, and Parquet files written for a flush not committed."""
        files = {
            str(f.relative_to(settings.events_dir))
            for f in settings.events_dir.glob("date=*/*.parquet")
        }
        uncommitted = registered()
        return len(files - uncommitted) >= 4 and bool(files & uncommitted)

    marker = tmp_path / "held"
    first = spawn(settings, "k1", logfile, hold=(4, marker))
    wait_until(lambda: client.exists(lease(client, 0)), timeout=60, what="the worker to start")
    producer.start()
    try:
        wait_until(marker.exists, timeout=60, what="the worker to hold before a commit")
        if is_cluster(client):  # rows written past the partition's committed watermark
            time.sleep(0.2)  # the marker's text lands
            applied, last = marker.read_text().split()
            assert parse_id(client.get(applied) or b"0-0") < parse_id(last)
        else:
            assert mid_batch(), logfile.read_text()[-3000:]
    finally:
        first.kill()
        first.wait(10)
        killed.set()
    held = sum(client.xpending(skey(client, p), GROUP)["pending"] for p in range(P))
    assert held > 0 and backlog(client) > 0  # read, unacknowledged, and more to come
    second = spawn(settings, "k1", logfile)  # restarted (same consumer name)
    producer.join(60)
    assert not producer.is_alive()
    events = stream[: sent[0]]
    try:
        # A restarted worker process takes long to start on a loaded machine.
        wait_until(lambda: backlog(client) == 0, timeout=180, what="the backlog to drain")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    output = logfile.read_text()
    assert "[worker] stopped" in output
    if not is_cluster(client):  # there the kill came before the partition commit instead
        assert "uncommitted log file(s)" in output

    logged = EventLog(settings.events_dir).read(["event_id", "session_id"])
    ids = Counter(logged.column("event_id").to_pylist())
    assert len(ids) == len(events) and max(ids.values()) == 1  # every event exactly once
    assert set(ids) == {e.event_id for e in events}
    served = Counter(ServeLog(settings.serves_dir).read(["request_id"]).column(0).to_pylist())
    assert len(served) == sent[0] // 20 and max(served.values()) == 1  # every answer once
    assert set(served) == {r.request_id for r in answers[: sent[0] // 20]}

    expected = expected_counts(events)
    sessions = sorted(expected)
    rows = (
        store_rows(settings, sessions)
        if is_cluster(client)
        else reader_rows(settings, client, sessions)
    )
    for session, row in zip(sessions, rows, strict=True):
        want = expected[session]
        got = {
            "page_view": row["session_page_views"],
            "item_view": row["session_item_views"],
            "click": row["session_clicks"],
            "add_to_cart": row["session_carts"],
            "purchase": row["session_purchases"],
        }
        assert got == {k: want.get(k, 0) for k in got}, session
    views = Counter(e.item_id for e in events if e.event_type == TYPES["item_view"])
    clicks = Counter(e.item_id for e in events if e.event_type == TYPES["click"])
    assert counters(settings, list(CATEGORIES)) == {i: (views[i], clicks[i]) for i in CATEGORIES}
    assert dead_letters(client) == []
    assert all(client.get(lease(client, p)) is None for p in range(P))  # SIGTERM released them


# ------------------------------------------------------------------ (c) two workers


class CrashingLog(StreamLogWriter):
    """Writes the files of a batch, then 'dies' before the commit, after `after` batches."""

    def __init__(self, root: Path, after: int) -> None:
        super().__init__(root, root.parent / "serves", fsync=False)
        self.after = after
        self.crashed = threading.Event()

    def write(self, files):
        super().write(files)
        self.after -= 1
        if self.after < 0:
            self.crashed.set()
            raise SystemExit("simulated crash after writing the batch's files")


class NoGoodbye(Worker):
    """A worker whose crash leaves its leases, heartbeat and pending entries behind."""

    def shutdown(self) -> None:
        if not isinstance(self.log_writer, CrashingLog) or not self.log_writer.crashed.is_set():
            super().shutdown()


def test_two_workers_share_partitions_and_one_takes_over_a_crashed_ones(settings, client):
    write_catalog(settings, CATEGORIES)
    a = start(settings, "wa", batch_max_events=40)
    wait_until(lambda: len(a.worker.owned) == P, what="the first worker to own everything")
    built = build_worker(
        settings,
        WorkerSettings(partitions=P, worker_id="wb", fsync=False, batch_max_events=40, **FAST),
    )
    log = CrashingLog(settings.events_dir, after=0)  # dies in its first log flush
    b = Running(NoGoodbye(built.client, built.layout, built.catalog, log, built.settings))
    try:
        wait_until(
            lambda: len(a.worker.owned) == 2 and len(b.worker.owned) == 2,
            what="a fair share of two partitions each",
        )
        owners = {p: client.get(lease_key(p)).decode() for p in range(P)}
        assert sorted(owners.values()) == ["wa", "wa", "wb", "wb"]
        events = stream_events(3_000, seed=5)
        append(client, events)
        wait_until(log.crashed.is_set, what="the second worker to crash")
        b.thread.join(10)
        wait_until(lambda: len(a.worker.owned) == P, timeout=20, what="the takeover")
        wait_until(lambda: backlog(client) == 0, timeout=30, what="the backlog to drain")
    finally:
        a.close()
        b.close()
    assert isinstance(b.error, SystemExit)
    stats = a.worker.stats
    # The crashed worker had applied batches online but not logged them: the survivor claimed
    # them, logged them again without applying them twice, and removed the half-written files.
    assert stats.claimed > 0 and stats.cleaned_files > 0 and stats.replayed > 0
    ids = Counter(EventLog(settings.events_dir).read(["event_id"]).column("event_id").to_pylist())
    assert len(ids) == len(events) and max(ids.values()) == 1
    expected = expected_counts(events)
    sessions = sorted(expected)
    rows = reader_rows(settings, client, sessions)
    assert [r["session_clicks"] for r in rows] == [expected[s]["click"] for s in sessions]
    assert [r["session_item_views"] for r in rows] == [expected[s]["item_view"] for s in sessions]


# ------------------------------------------------------------------ (e) equal to the batch job


@pytest.mark.spark
def test_streamed_session_state_equals_the_spark_jobs(settings, client, spark):
    from batch.features import read_events, read_items, session_features
    from batch.generate import GeneratorConfig, generate

    data = generate(GeneratorConfig(users=30, items=120, sessions=100, days=2, seed=3))
    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(data.items, settings.catalog_dir / "items.parquet")
    log = data.events.sort_by([("timestamp", "ascending"), ("event_id", "ascending")]).to_pylist()
    # A few neighbours swapped: the state must not depend on arrival order within a session.
    for i in range(0, len(log) - 1, 97):
        if log[i]["session_id"] == log[i + 1]["session_id"]:
            log[i], log[i + 1] = log[i + 1], log[i]
    protos = []
    for row in log:
        e = resources_pb2.Event(
            event_id=row["event_id"],
            user_id=row["user_id"] or "",
            session_id=row["session_id"],
            item_id=row["item_id"] or "",
            event_type=TYPES[row["event_type"]],
            dwell_ms=row["dwell_ms"] or 0,
            scroll_depth=row["scroll_depth"] or 0.0,
            device=row["device"] or "",
            surface=row["surface"] or "",
            position=row["position"] or 0,
        )
        e.timestamp.FromDatetime(row["timestamp"])
        protos.append(e)
    append(client, protos)
    running = start(settings, "we")
    try:
        wait_until(lambda: backlog(client) == 0, timeout=60, what="the log to be streamed")
    finally:
        running.close()

    # The cross-device rule, written out again here: a user's events form visits; an event
    # in a session the visit has not seen, more than the gap after its latest event, starts
    # the next one. Anonymous sessions are their own visits. The row under a session id is
    # the state of the last visit that used it.
    gap_us, keep = WorkerSettings().session_gap_us, WorkerSettings().max_visit_sessions
    crowded: set[str] = set()  # visits with more sessions than a visit keeps rows for
    visit_of: dict[str, str] = {}
    current: dict[str, tuple[str, set[str], int]] = {}
    last_visit: dict[str, str] = {}
    for row in log:
        ts = int(row["timestamp"].timestamp() * 1e6)
        user, session = row["user_id"], row["session_id"]
        if user is None:
            visit_of[row["event_id"]] = last_visit[session] = session
            continue
        name, sessions, latest = current.get(user, ("", set(), 0))
        if not name or (session not in sessions and ts - latest > gap_us):
            name, sessions, latest = f"{user}#{len(visit_of)}", set(), ts
        sessions.add(session)
        if len(sessions) > keep:
            crowded.add(name)
        current[user] = (name, sessions, max(latest, ts))
        visit_of[row["event_id"]] = last_visit[session] = name

    # Spark reads the log the worker wrote (the batch jobs see the streamed events), with
    # each event's session replaced by its visit.
    from pyspark.sql import functions as F

    events = read_events(spark, str(settings.events_dir))
    visits = spark.createDataFrame(
        pd.DataFrame({"event_id": list(visit_of), "visit": list(visit_of.values())})
    )
    events = events.join(visits, "event_id").withColumn("session_id", F.col("visit")).drop("visit")
    assert events.count() == len(log)
    items = read_items(spark, str(settings.catalog_dir))
    batch = session_features(events, items).toPandas()
    final = (
        batch.sort_values("event_timestamp").groupby("session_id").tail(1).set_index("session_id")
    )

    sessions = sorted(s for s, v in last_visit.items() if v not in crowded)
    assert len(sessions) > 0.8 * len(last_visit)
    rows = reader_rows(settings, client, sessions, ttl=False)
    for session, row in zip(sessions, rows, strict=True):
        want = final.loc[last_visit[session]]
        expected = {f: want[f] for f in SESSION_FEATURES}
        expected["session_recent_items"] = list(want["session_recent_items"])
        expected["session_last_event_timestamp"] = datetime.fromtimestamp(
            want["session_last_event_timestamp"].timestamp() // 1, UTC
        )
        assert row == expected, session
    sizes = Counter(last_visit[s] for s in sessions)
    alone = sum(sizes[last_visit[s]] == 1 for s in sessions)
    assert alone > 30 and alone < len(sessions)  # both kinds were compared
    print(
        f"\n{len(sessions)} of {len(last_visit)} sessions equal Spark's; {alone} alone in a visit"
    )


# ------------------------------------------------------------------ telemetry


def test_every_committed_event_is_timed_from_ingest_to_commit(otel, settings, client):
    write_catalog(settings, CATEGORIES)

    def freshness() -> tuple[int, float]:
        points = otel.points("inkling.event.freshness")
        return sum(p.count for p in points), sum(p.sum for p in points)

    def batches() -> int:
        return sum(p.count for p in otel.points("inkling.worker.batch.size"))

    (count_before, sum_before), batches_before = freshness(), batches()
    now = int(time.time() * 1e6)
    sent = [event(f"f{i}", "click", "fresh-1", "i1", ts_us=now - 1_000_000 + i) for i in range(7)]
    started = time.monotonic()
    append(client, sent)
    running = start(settings, "wf")
    try:
        wait_until(lambda: backlog(client) == 0, what="the events to be processed")
    finally:
        running.close()
    elapsed = time.monotonic() - started
    count, total = freshness()
    assert count - count_before == len(sent)
    mean = (total - sum_before) / len(sent)
    assert 0 <= mean <= elapsed  # received at append, committed before the backlog emptied
    assert batches() > batches_before


def test_a_traced_ingest_is_linked_from_the_worker_batch_that_commits_it(otel, settings, client):
    """TrackEvents inside a caller's sampled trace stores its traceparent on the bus entry;
    the worker's batch span (sampled because of that link) links to the ingest span and
    holds the read, apply and commit stages in order. An unsampled call stores none."""
    write_catalog(settings, CATEGORIES)
    otel.spans.clear()
    trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736"
    sampled = f"00-{trace_hex}-00f067aa0ba902b7-01"
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    now = int(time.time() * 1e6)
    traced_event = event("traced-1", "click", "trace-1", "i1", ts_us=now - 1_000)
    plain_event = event("plain-1", "click", "trace-2", "i2", ts_us=now - 1_000)

    async def ingest() -> None:
        app = EventsApp(settings, EventsSettings(partitions=P))
        running = await start_server(app, port=0, grace_s=1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = event_service_pb2_grpc.EventServiceStub(channel)
                for sent, parent in ((traced_event, sampled), (plain_event, unsampled)):
                    request = event_service_pb2.TrackEventsRequest(events=[sent])
                    reply = await stub.TrackEvents(
                        request, metadata=(("traceparent", parent),), timeout=10
                    )
                    assert reply.accepted == 1
        finally:
            await running.stop()

    asyncio.run(ingest())
    entries = {
        e.event_id: e for p in range(P) for e in read_partition(client, p) if e.event_id in
        ("traced-1", "plain-1")
    }  # fmt: skip
    assert entries["plain-1"].traceparent is None
    (ingest_span,) = [
        s for s in otel.spans.get_finished_spans() if s.name.endswith("EventService/TrackEvents")
    ]
    assert format(ingest_span.context.trace_id, "032x") == trace_hex
    stored = entries["traced-1"].traceparent
    assert stored == f"00-{trace_hex}-{ingest_span.context.span_id:016x}-01"

    running = start(settings, "wt")
    try:
        wait_until(lambda: backlog(client) == 0, what="the events to be processed")
    finally:
        running.close()
    spans = list(otel.spans.get_finished_spans())
    linked = [
        s
        for s in spans
        if s.name == "worker.batch"
        and any(link.context.span_id == ingest_span.context.span_id for link in s.links)
    ]
    assert len(linked) == 1, [s.name for s in spans]
    batch = linked[0]
    assert batch.context.trace_id != ingest_span.context.trace_id  # its own trace, linked
    stages = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == batch.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in stages] == ["read", "apply", "commit"]
    assert stages[-1].attributes["inkling.committed"] is True
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(stages))
    assert batch.start_time <= stages[0].start_time and stages[-1].end_time <= batch.end_time
