"""The event-ingest server end to end: a real grpc.aio server on loopback (port 0) over a
real redis-server process."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import hypothesis
import numpy as np
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from events_server.app import EventsApp
from events_server.settings import EventsSettings, load_events_settings
from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.events import bus
from inkling.redis_embedded import EmbeddedRedis, free_port
from inkling.serving.runtime import RETRY_AFTER_KEY, start_server
from inkling.v1 import event_service_pb2, event_service_pb2_grpc, resources_pb2
from tests.proto_strategies import ALLOWED, MEMORY_GROWTH_MIB, report
from tests.proto_strategies import SETTINGS as FUZZ_SETTINGS
from tests.proto_strategies import requests as fuzzed
from tests.server_process import server_process

pytestmark = pytest.mark.redis

DB = 3  # a database of the shared test Redis of its own (5 and 7 are others')
CLICK = resources_pb2.EVENT_TYPE_CLICK
PAGE_VIEW = resources_pb2.EVENT_TYPE_PAGE_VIEW


def ts(seconds_from_now: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return t


def event(event_id: str, **fields: Any) -> resources_pb2.Event:
    values: dict[str, Any] = {
        "user_id": "u1",
        "session_id": "s1",
        "item_id": "i1",
        "event_type": CLICK,
        "timestamp": ts(-60),
    }
    values.update(fields)
    return resources_pb2.Event(event_id=event_id, **values)


Scenario = Callable[[event_service_pb2_grpc.EventServiceStub, Any], Awaitable[Any]]


def serve_and_run(address: str, es: EventsSettings, scenario: Scenario) -> Any:
    """Start the ingest server on port 0, run `scenario(stub, channel)`, stop the server."""

    async def main() -> Any:
        running = await start_server(
            EventsApp(Settings(redis_address=address), es), port=0, grace_s=1
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                return await scenario(event_service_pb2_grpc.EventServiceStub(channel), channel)
        finally:
            await running.stop()

    return asyncio.run(main())


async def track(stub, *events: resources_pb2.Event) -> event_service_pb2.TrackEventsResponse:
    return await stub.TrackEvents(event_service_pb2.TrackEventsRequest(events=events), timeout=10)


async def status_of(stub, *events: resources_pb2.Event) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await track(stub, *events)
    return caught.value


@pytest.fixture
def shared(redis_server):
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    client.flushdb()
    yield f"{redis_server.address},db={DB}", client
    client.close()


def on_bus(client: redis.Redis, partitions: int) -> list[tuple[int, bus.BusEntry]]:
    return [(p, e) for p in range(partitions) for e in bus.read_partition(client, p)]


def test_a_mixed_batch_gets_the_documented_treatment(shared):
    address, client = shared
    es = EventsSettings(partitions=4, max_future_s=300)
    sent = [
        event("e0"),  # 0 valid
        event("   "),  # 1 blank event_id
        event("e2", session_id=""),  # 2 no session
        event("e3", event_type=42),  # 3 unknown enum value
        event("e4", dwell_ms=10**9),  # 4 dwell out of range
        event("e0"),  # 5 repeats 0 within the batch
        event("e6", timestamp=ts(-7200)),  # 6 older than 0: out of order, accepted
        event("e7", timestamp=ts(3600)),  # 7 an hour in the future
        event("e8", event_type=PAGE_VIEW),  # 8 a page view naming an item
        event("e9", user_id="", session_id="anon", item_id="", event_type=PAGE_VIEW),  # 9 valid
        event("e10", timestamp=ts(60)),  # 10 a minute ahead: clock skew, accepted
        event("e12", request_id="r" * 65),  # 11 a request id longer than the contract allows
        event("e13", request_id="c" * 32),  # 12 valid: clicked in the answer c...c
    ]

    async def scenario(stub, _channel):
        before = time.time_ns() // 1000
        first = await track(stub, *sent)
        after = time.time_ns() // 1000
        # A replay of the accepted ones and a new one: each stored once.
        replay = await track(stub, sent[0], sent[6], event("e11", timestamp=ts(-86400)))
        # A corrected version of a rejected event is accepted: its id was not remembered.
        fixed = await track(stub, event("e2"))
        empty = await status_of(stub)
        too_many = await status_of(stub, *(event(f"m{i}") for i in range(1001)))
        return first, replay, fixed, empty, too_many, (before, after)

    first, replay, fixed, empty, too_many, (before, after) = serve_and_run(address, es, scenario)

    assert (first.accepted, first.duplicates) == (5, 1)
    reasons = {r.index: r.reason for r in first.rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 7, 8, 11]
    assert first.accepted + first.duplicates + len(first.rejected) == len(sent)
    assert reasons[1] == "event_id: must not be blank"
    assert reasons[2] == "session_id: must not be empty"
    assert reasons[3] == "event_type: unknown enum value 42"
    assert reasons[4].startswith("dwell_ms: must be at most 86400000")
    assert re.fullmatch(
        r"timestamp: 3\d{3}\.\d s ahead of the server clock \(at most 300 s\)", reasons[7]
    )
    assert reasons[8] == "item_id: must be empty for EVENT_TYPE_PAGE_VIEW"
    assert reasons[11] == "request_id: longer than 64 characters (65)"
    assert [r.event_id for r in first.rejected] == ["   ", "e2", "e3", "e4", "e7", "e8", "e12"]
    assert (replay.accepted, replay.duplicates, len(replay.rejected)) == (1, 2, 0)
    assert (fixed.accepted, fixed.duplicates, len(fixed.rejected)) == (1, 0, 0)
    for error in (empty, too_many):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events" in error.details()

    stored = on_bus(client, 4)
    ids = [e.event_id for _, e in stored]
    assert sorted(ids) == sorted(["e0", "e6", "e9", "e10", "e11", "e2", "e13"])  # each once
    by_id = {e.event_id: (p, e) for p, e in stored}
    for i in (0, 6, 9, 10, 12):
        p, entry = by_id[sent[i].event_id]
        assert resources_pb2.Event.FromString(entry.payload) == sent[i]
        assert p == bus.partition_of(bus.routing_key(sent[i].user_id, sent[i].session_id), 4)
    assert before <= by_id["e0"][1].received_us <= after
    # Out of order on the client's clock, appended in arrival order, timestamps kept.
    same_partition = [e.event_id for p, e in stored if p == by_id["e0"][0]]
    assert same_partition.index("e0") < same_partition.index("e6")


def test_a_bus_too_far_behind_is_resource_exhausted_with_a_retry_hint(shared):
    address, client = shared
    es = EventsSettings(partitions=1, max_lag=5, retry_after_s=0.25, lag_cache_s=0.001)
    key = bus.stream_key(0)

    async def scenario(stub, _channel):
        filled = await track(stub, *(event(f"f{i}") for i in range(6)))
        await asyncio.sleep(0.01)
        refused = await status_of(stub, event("late"))
        # A worker reads everything but has not acknowledged yet: still behind.
        read = client.xreadgroup(bus.GROUP, "w1", {key: ">"})
        await asyncio.sleep(0.01)
        still = await status_of(stub, event("late"))
        client.xack(key, bus.GROUP, *(entry_id for entry_id, _ in read[0][1]))
        await asyncio.sleep(0.01)
        admitted = await track(stub, event("late"))
        return filled, refused, still, admitted

    filled, refused, still, admitted = serve_and_run(address, es, scenario)
    assert filled.accepted == 6
    for error in (refused, still):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(error.trailing_metadata())[RETRY_AFTER_KEY] == "250"
        assert "partition 0 holds 6 unconsumed events" in error.details()
    assert admitted.accepted == 1
    assert [e.event_id for _, e in on_bus(client, 1)] == [*(f"f{i}" for i in range(6)), "late"]


def test_redis_down_is_unavailable_and_the_server_recovers_by_itself(tmp_path):
    port = free_port()
    redis_process = EmbeddedRedis(tmp_path / "redis", port=port, persistent=True)
    es = EventsSettings(partitions=2, lag_cache_s=0.001)
    batch = [event(f"d{i}", user_id=f"user{i}") for i in range(10)]

    async def health(channel) -> int:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return reply.status

    async def scenario(stub, channel):
        outcomes: dict[str, Any] = {}
        # Started before Redis: serving, but every call is UNAVAILABLE, never success.
        outcomes["health"] = await health(channel)
        outcomes["before"] = (await status_of(stub, *batch)).code()
        redis_process.start()
        outcomes["up"] = await track(stub, *batch)
        redis_process.stop()
        outcomes["down"] = [(await status_of(stub, *batch)).code() for _ in range(3)]
        redis_process.start()  # same port, same data directory
        outcomes["back"] = await track(stub, *batch, event("d10"))
        return outcomes

    try:
        got = serve_and_run(f"127.0.0.1:{port}", es, scenario)
        client = bus.sync_client(f"127.0.0.1:{port}")
        stored = sorted(e.event_id for _, e in on_bus(client, 2))
        client.close()
    finally:
        redis_process.stop()
    assert got["health"] == health_pb2.HealthCheckResponse.SERVING
    assert got["before"] == grpc.StatusCode.UNAVAILABLE
    assert got["up"].accepted == 10
    assert got["down"] == [grpc.StatusCode.UNAVAILABLE] * 3
    # The first call after the restart succeeds; what was acknowledged survived and is
    # recognised as already stored.
    assert (got["back"].accepted, got["back"].duplicates) == (1, 10)
    assert stored == sorted(f"d{i}" for i in range(11))


def test_settings_load_from_the_events_table_and_the_environment(tmp_path):
    config = tmp_path / "inkling.toml"
    config.write_text("[events]\npartitions = 8\nmax_lag = 50\n")
    es = load_events_settings(config, environ={"INKLING_EVENTS_MAX_LAG": "70"})
    assert (es.partitions, es.max_lag, es.port) == (8, 70, 50063)
    assert replace(es, port=0).port == 0
    with pytest.raises(ConfigurationError):
        load_events_settings(environ={"INKLING_EVENTS_PARTITIONS": "0"})
    with pytest.raises(ConfigurationError):
        load_events_settings(environ={"INKLING_EVENTS_RETRY_AFTER_S": "-1"})


def test_rejected_events_are_counted_by_the_field_they_fail_on(otel, shared):
    address, _ = shared

    def rejected() -> dict[str, int]:
        out: dict[str, int] = {}
        for p in otel.points("inkling.ingest.rejected"):
            reason = str(p.attributes["reason"])
            out[reason] = out.get(reason, 0) + int(p.value)
        return out

    before = rejected()

    async def scenario(stub, _channel):
        return await track(
            stub,
            event("ok-1"),
            event("   "),
            event("no-session", session_id=""),
            event("future", timestamp=ts(3600)),
            event("also-future", timestamp=ts(7200)),
        )

    reply = serve_and_run(address, EventsSettings(partitions=4), scenario)
    assert (reply.accepted, len(reply.rejected)) == (1, 4)
    after = rejected()
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert {k: v for k, v in grown.items() if v} == {"event_id": 1, "session_id": 1, "timestamp": 2}


@dataclass
class Raw:
    """What raw TrackEvents payloads got: status counts, the refusals' details, and the
    events OK answers said were accepted."""

    statuses: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    accepted: int = 0


async def track_raw(channel: Any, payloads: list[bytes], timeout_s: float) -> Raw:
    """Each payload sent as TrackEvents' raw request bytes, one after another."""
    call = channel.unary_unary("/inkling.v1.EventService/TrackEvents")
    seen = Raw()
    for payload in payloads:
        try:
            reply = event_service_pb2.TrackEventsResponse.FromString(
                await call(payload, timeout=timeout_s)
            )
            seen.statuses["OK"] += 1
            seen.accepted += reply.accepted
        except grpc.aio.AioRpcError as e:
            seen.statuses[e.code().name] += 1
            seen.details.append(e.details() or "")
    return seen


def test_undecodable_payloads_are_invalid_argument_and_store_nothing(shared, caplog):
    """Random bytes and invalid UTF-8 sent as TrackEvents: INVALID_ARGUMENT naming the
    message (never UNKNOWN), one log line for all of them, and nothing on the bus beyond
    what an OK answer says it accepted."""
    address, client = shared
    rng = np.random.default_rng(23)
    payloads = [rng.bytes(int(n)) for n in rng.integers(1, 400, size=150)] + [
        b"\x0a\x06\x0a\x02\xff\xfe\x12\x00",  # events[0].event_id holding invalid UTF-8
    ]
    caplog.set_level("WARNING", logger="inkling.serving")

    async def scenario(stub, channel) -> Raw:
        return await track_raw(channel, payloads, timeout_s=5)

    seen = serve_and_run(address, EventsSettings(partitions=2), scenario)
    assert set(seen.statuses) <= {"OK", "INVALID_ARGUMENT"}, seen
    undecodable = sum(
        "is not a valid inkling.v1.TrackEventsRequest message" in d for d in seen.details
    )
    assert undecodable > len(payloads) // 2, seen
    assert len(on_bus(client, 2)) == seen.accepted
    lines = [r for r in caplog.records if r.name == "inkling.serving"]
    assert len(lines) == 1 and not lines[0].exc_info, [r.getMessage() for r in lines]


def test_fuzzed_track_events_get_ok_or_a_client_error_and_store_only_what_was_accepted(
    shared,
):
    """Generated TrackEvents requests (`tests.proto_strategies`) to an ingest server in a
    process of its own: every answer is OK or a client error, the bus holds exactly the
    events OK answers say were accepted, and the server's memory stays bounded."""
    address, client = shared
    method = event_service_pb2.DESCRIPTOR.services_by_name["EventService"].methods_by_name[
        "TrackEvents"
    ]
    valid = event_service_pb2.TrackEventsRequest(events=[event("f1"), event("f2")])
    seen = Raw()
    es = EventsSettings(partitions=2)
    with server_process("events", Settings(redis_address=address), es) as server:
        rss_before = server.rss_mib()
        with grpc.insecure_channel(server.address) as channel:
            call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}")

            @FUZZ_SETTINGS
            @hypothesis.given(payload=fuzzed(method.input_type, valid))
            def one(payload: bytes) -> None:
                try:
                    reply = event_service_pb2.TrackEventsResponse.FromString(
                        call(payload, timeout=30)
                    )
                    seen.statuses["OK"] += 1
                    seen.accepted += reply.accepted
                except grpc.RpcError as e:
                    seen.statuses[e.code().name] += 1

            one()
        rss_after = server.rss_mib()
    report(method.full_name, seen.statuses, rss_before, rss_after)
    assert set(seen.statuses) <= ALLOWED, seen
    assert len(on_bus(client, 2)) == seen.accepted
    assert rss_after - rss_before < MEMORY_GROWTH_MIB, (rss_before, rss_after)


def test_pseudonymised_ingest_puts_no_raw_user_id_on_the_bus(shared):
    from inkling.pseudonym import Pseudonymizer, parse_keys

    address, client = shared
    pseudonyms = Pseudonymizer(parse_keys("k1 " + "ef" * 32, "test keys"))

    async def main() -> event_service_pb2.TrackEventsResponse:
        app = EventsApp(Settings(redis_address=address), EventsSettings(), pseudonyms=pseudonyms)
        running = await start_server(app, port=0, grace_s=1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = event_service_pb2_grpc.EventServiceStub(channel)
                return await track(
                    stub, event("p1", user_id="alice"), event("p2", user_id="", session_id="s9")
                )
        finally:
            await running.stop()

    reply = asyncio.run(main())
    assert reply.accepted == 2
    users = sorted(
        resources_pb2.Event.FromString(e.payload).user_id
        for _, e in on_bus(client, EventsSettings().partitions)
    )
    assert users == ["", pseudonyms("alice")]
    assert not any(b"alice" in v for key in client.scan_iter() for v in _values(client, key))


def _values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    if kind == b"stream":
        return [v for _, fields in client.xrange(key) for v in fields.values()]
    if kind == b"zset":
        return list(client.zrange(key, 0, -1))
    if kind == b"string":
        return [client.get(key) or b""]
    return []
