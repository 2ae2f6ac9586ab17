"""Erasure (`inkling.erasure`): after a forget, no store holds the user or their sessions,
late and replayed events do not bring them back, and other users' events that were
ingested during the forget are all in the log, once.

Real parts: a redis-server process of this module's own, a Feast repository applied and
materialized from Spark features, ALS embeddings, a model registry with a published
version, the ingest gRPC server on loopback and a stream worker on a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from batch.als import AlsConfig, train_als
from batch.generate import GeneratorConfig
from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.erasure import TOMBSTONES_KEY, delete_from_bus, forget_user, rewrite_without
from inkling.events.bus import (
    F_EVENT,
    F_EVENT_ID,
    F_RECEIVED_US,
    PARTITIONS_KEY,
    partition_of,
    routing_key,
    stream_key,
    sync_client,
)
from inkling.events.eventlog import EventLog, Tombstones
from inkling.events.schema import EVENT_SCHEMA
from inkling.feature_store.feast_codec import entity_keys
from inkling.models.embeddings import load_embeddings
from inkling.models.registry import ModelRegistry
from inkling.redis_embedded import EmbeddedRedis
from inkling.serving.runtime import Running, start_server
from inkling.v1 import event_service_pb2, event_service_pb2_grpc, resources_pb2
from stream_worker.app import run_worker
from stream_worker.commit import logged_key, state_key
from stream_worker.settings import WorkerSettings
from tests.integration.test_servers import Loop, materialized

pytestmark = [pytest.mark.spark, pytest.mark.redis]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("erasure-redis"), persistent=False) as server:
        yield server


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, own_redis):
    root = tmp_path_factory.mktemp("erasure")
    settings = materialized(
        root,
        spark,
        own_redis,
        0,
        GeneratorConfig(users=60, items=200, sessions=300, days=3, seed=3),
    )
    train_als(
        spark, settings.events_dir, settings.models_dir / "als", AlsConfig(rank=4, max_iter=2)
    )
    artifact = root / "artifact"
    artifact.mkdir()
    (artifact / "weights.bin").write_bytes(b"\0" * 16)
    ModelRegistry(settings.data_dir / "registry").publish(
        artifact, model="ranker", kind="sasrec", feature_service="ranker_v1", columns={},
        make_current=True,
    )  # fmt: skip
    settings.export_env()
    return settings


def _log(settings) -> pa.Table:
    return EventLog(settings.events_dir).read(["event_id", "user_id", "session_id"])


def _event(event_id: str, user: str, session: str, item: str) -> resources_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    return resources_pb2.Event(
        event_id=event_id, user_id=user, session_id=session, item_id=item,
        event_type=resources_pb2.EVENT_TYPE_CLICK, timestamp=ts,
    )  # fmt: skip


def _id(entry: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in entry.split(b"-"))


def _track(stub, events: list[resources_pb2.Event]) -> None:
    reply = stub.TrackEvents(event_service_pb2.TrackEventsRequest(events=events), timeout=10)
    assert reply.accepted == len(events) and not reply.rejected


def _wait_logged(settings, event_ids: set[str], timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        logged = set(_log(settings).column("event_id").to_pylist()) & event_ids
        if logged == event_ids or time.monotonic() > deadline:
            return logged
        time.sleep(0.2)


def test_forget_erases_every_store_and_loses_no_other_users_events(built, own_redis) -> None:
    settings = built
    client = sync_client(settings.redis_address or "")
    log = _log(settings)
    users = pc.drop_null(log.column("user_id")).to_pylist()
    user = max(set(users), key=users.count)
    sessions = set(
        log.filter(pc.equal(log.column("user_id"), user)).column("session_id").to_pylist()
    )
    item = EventLog(settings.events_dir).read(["item_id"]).column("item_id").drop_null()[0].as_py()
    assert user in load_embeddings(settings.models_dir / "als").user_ids
    assert client.exists(*entity_keys("user_id", [user], "inkling")) == 1

    loop = Loop()
    events: Running = loop.run(start_server(EventsApp(settings, EventsSettings(port=0)), port=0))
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(
            settings,
            WorkerSettings(batch_max_wait_ms=20.0, log_flush_s=0.3, poll_ms=50.0),
            stop,
        ),
        daemon=True,
    )
    worker.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{events.port}")
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    try:
        # The user's live session: in the worker's state, the online store and the log.
        _track(stub, [_event(f"live-{i}", user, "live-session", item) for i in range(5)])
        assert _wait_logged(settings, {f"live-{i}" for i in range(5)}) == {
            f"live-{i}" for i in range(5)
        }
        assert client.exists(*entity_keys("session_id", ["live-session"], "inkling")) == 1

        # Other users keep sending while the forget runs.
        others: list[str] = []
        sending = threading.Event()
        sending.set()

        def ingest_others() -> None:
            n = 0
            while sending.is_set():
                batch = [
                    _event(f"other-{n}-{k}", f"other-user-{k}", f"other-session-{k}", item)
                    for k in range(5)
                ]
                _track(stub, batch)
                others.extend(e.event_id for e in batch)
                n += 1
                time.sleep(0.02)

        sender = threading.Thread(target=ingest_others)
        sender.start()
        time.sleep(0.3)
        report = forget_user(settings, client, user, flush_wait_s=20.0)
        # A late event of the user and one of a forgotten session (anonymous) arrive
        # after: refused at ingest, with the reason.
        late = stub.TrackEvents(
            event_service_pb2.TrackEventsRequest(
                events=[
                    _event("late-user", user, "late-session", item),
                    _event("late-session", "", "live-session", item),
                ]
            ),
            timeout=10,
        )
        assert late.accepted == 0
        assert [r.reason.split(":")[0] for r in late.rejected] == ["user_id", "session_id"]
        # One that got onto the bus before the tombstone (written here straight into the
        # user's partition, as ingest would have): the worker drops it.
        partitions = int(client.get(PARTITIONS_KEY))
        late_partition = partition_of(routing_key(user, ""), partitions)
        late_entry = client.xadd(
            stream_key(late_partition),
            {
                F_EVENT_ID: "late-on-bus",
                F_EVENT: _event("late-on-bus", user, "bus-session", item).SerializeToString(),
                F_RECEIVED_US: str(time.time_ns() // 1000),
            },
        )
        time.sleep(0.3)
        sending.clear()
        sender.join(10)
        assert len(others) > 20
        assert _wait_logged(settings, set(others)) == set(others)
        # The worker got past the late entry: its log watermark covers it.
        deadline = time.monotonic() + 20
        while _id(client.get(logged_key(late_partition)) or b"0-0") < _id(late_entry):
            assert time.monotonic() < deadline, "the worker never took in the late entry"
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(20)
        channel.close()
        loop.run(events.stop())
        loop.close()

    assert report.new and not report.incomplete
    assert report.removed["event log rows"] > 0 and report.removed["online user rows"] == 1
    assert report.removed["worker states"] >= 1 and report.removed["embedding artifacts"] == 1
    assert report.models_flagged and report.models_flagged[0].startswith("ranker@")
    forgotten_sessions = sessions | {"live-session"}
    assert report.sessions >= len(forgotten_sessions)

    log = _log(settings)
    ids = log.column("event_id").to_pylist()
    assert user not in set(log.column("user_id").to_pylist())
    assert not set(log.column("session_id").to_pylist()) & (forgotten_sessions | {"late-session"})
    assert not {"late-user", "late-session", "late-on-bus"} & set(ids)
    assert not client.exists(*entity_keys("session_id", ["bus-session"], "inkling"))
    logged_others = [i for i in ids if i.startswith("other-")]
    assert sorted(logged_others) == sorted(others)  # none lost, none twice

    for view_key in entity_keys("session_id", sorted(forgotten_sessions), "inkling"):
        assert not client.exists(view_key)
    assert not client.exists(*entity_keys("user_id", [user], "inkling"))
    assert not client.exists(state_key(f"u:{user}"))
    assert not client.exists(*entity_keys("session_id", ["late-session"], "inkling"))
    # At most the entry written past ingest is left on the bus (dropped by the worker,
    # not yet trimmed).
    assert delete_from_bus(client, user, forgotten_sessions) <= 1
    assert client.hget(TOMBSTONES_KEY, f"u:{user}") is not None

    for table in ("user_features", "session_features"):
        data = ds.dataset(str(settings.features_dir / table), format="parquet").to_table()
        column = "user_id" if table == "user_features" else "session_id"
        kept = set(data.column(column).to_pylist())
        assert user not in kept and not kept & forgotten_sessions
    users_catalog = ds.dataset(str(settings.catalog_dir / "users.parquet")).to_table()
    assert user not in set(users_catalog.column("user_id").to_pylist())
    assert user not in load_embeddings(settings.models_dir / "als").user_ids
    registry = ModelRegistry(settings.data_dir / "registry")
    assert registry.erasures("ranker", registry.current_version("ranker")) == 1

    # An import of an old file holding the user's rows refuses them, with the reason.
    replay = pa.table(
        {
            "event_id": ["replayed-1", "replayed-2"],
            "user_id": [user, "someone-else"],
            "session_id": ["s-x", "s-y"],
            "item_id": [item, item],
            "event_type": ["click", "click"],
            "timestamp": pa.array([datetime.now(UTC)] * 2, EVENT_SCHEMA.field("timestamp").type),
        }
    )
    replay = replay.cast(pa.schema([EVENT_SCHEMA.field(n) for n in replay.column_names]))
    full = pa.table(
        {
            f.name: replay.column(f.name) if f.name in replay.column_names else pa.nulls(2, f.type)
            for f in EVENT_SCHEMA
        },
        schema=EVENT_SCHEMA,
    )
    result = EventLog(settings.events_dir).append(full)
    assert result.appended == 1
    assert [b.reason for b in result.duplicates] == [
        "the user or session was forgotten (inkling forget)"
    ]

    again = forget_user(settings, client, user, flush_wait_s=1.0)
    assert not again.new and again.files_rewritten == 0
    assert all(count == 0 for count in again.removed.values()), again.removed
    assert registry.erasures("ranker", registry.current_version("ranker")) == 2
    client.close()


def test_rewrite_without_keeps_other_rows_and_schema(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events")
    now = datetime.now(UTC)
    rows = {
        "event_id": ["a", "b", "c", "d"],
        "user_id": ["u1", None, "u2", "u1"],
        "session_id": ["s1", "s1", "s2", "s3"],
        "item_id": ["i", "i", "i", "i"],
        "event_type": ["click"] * 4,
        "timestamp": [now] * 4,
    }
    table = pa.table(
        {f.name: pa.array(rows.get(f.name, [None] * 4), f.type) for f in EVENT_SCHEMA},
        schema=EVENT_SCHEMA,
    )
    log.append(table)
    removed, files = rewrite_without(log.root, Tombstones(frozenset({"u1"}), frozenset({"s1"})))
    assert (removed, files) == (3, 1)
    left = log.read()
    assert left.column("event_id").to_pylist() == ["c"]
    assert left.schema.metadata == EVENT_SCHEMA.metadata
    assert rewrite_without(log.root, Tombstones(frozenset({"u1"}), frozenset())) == (0, 0)


def test_forget_user_rpc_is_refused_by_default_and_answers_behind_an_allow_rule(
    built, tmp_path: Path
) -> None:
    from events_server.admin import admin_allowed
    from inkling.serving.security import SecuritySettings
    from inkling.v1 import admin_service_pb2, admin_service_pb2_grpc

    settings = built
    log = _log(settings)
    user = sorted(set(pc.drop_null(log.column("user_id")).to_pylist()))[0]
    tokens = tmp_path / "tokens"
    tokens.write_text("privacy privacy-token\ningest ingest-token\n")
    allow = {
        "inkling.v1.AdminService/ForgetUser": "privacy",
        "inkling.v1.EventService/TrackEvents": "ingest",
    }
    assert admin_allowed(allow) and not admin_allowed({"*": "ingest"})

    def call(admin: bool, security: SecuritySettings, token: str | None, user_id: str) -> object:
        loop = Loop()
        app = EventsApp(settings, EventsSettings(port=0), admin=admin)
        running = loop.run(start_server(app, port=0, grace_s=1, security=security))
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        try:
            return stub.ForgetUser(
                admin_service_pb2.ForgetUserRequest(user_id=user_id), timeout=60, metadata=metadata
            )
        except grpc.RpcError as e:
            return e.code()
        finally:
            channel.close()
            loop.run(running.stop())
            loop.close()

    # No rule for it: refused even on the open loopback default.
    assert call(False, SecuritySettings(), None, user) == grpc.StatusCode.PERMISSION_DENIED
    guarded = SecuritySettings(tokens_file=tokens, allow=allow)
    assert call(True, guarded, None, user) == grpc.StatusCode.UNAUTHENTICATED
    assert call(True, guarded, "ingest-token", user) == grpc.StatusCode.PERMISSION_DENIED
    assert call(True, guarded, "privacy-token", "  ") == grpc.StatusCode.INVALID_ARGUMENT
    assert user in set(_log(settings).column("user_id").to_pylist())
    reply = call(True, guarded, "privacy-token", user)
    assert isinstance(reply, admin_service_pb2.ForgetUserResponse), reply
    assert reply.first_time and not reply.incomplete and reply.removed["event log rows"] > 0
    assert user not in set(_log(settings).column("user_id").to_pylist())
    again = call(True, guarded, "privacy-token", user)
    assert isinstance(again, admin_service_pb2.ForgetUserResponse)
    assert not again.first_time and sum(again.removed.values()) == 0
