"""The serve log's parts: its schema and checks, serve entries on the bus (a real Redis
server), and the ranking server's writer, which never fails or holds up a request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from inkling.events import bus
from inkling.events.bus import BusEvent, BusServe, EventBus, async_client, routing_key
from inkling.events.servelog import SERVE_SCHEMA, ServeLog, record_problem, serve_table
from inkling.redis_embedded import free_port
from inkling.serving.serve_logger import Served, ServeLogger, serve_record
from inkling.v1 import resources_pb2

pytestmark = pytest.mark.redis

DB = 12  # this module's database of the shared test Redis


def served(request_id: str = "r1", items: tuple[str, ...] = ("a", "b"), **changes: Any) -> Served:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "served_us": 1_767_225_600_000_000,  # 2026-01-01T00:00:00Z
        "operation": "recommend",
        "user_id": "u1",
        "session_id": "s1",
        "surface": "home",
        "item_ids": list(items),
        "scores": np.linspace(1.0, 0.5, len(items), dtype=np.float32),
        "sources": np.full(len(items), resources_pb2.CANDIDATE_SOURCE_COVISITATION, np.int32),
        "propensities": None,
        "model_version": "sasrec:v2",
        "index_version": "idx-7",
        "feature_service": "ranker_v1",
        "experiment": "",
        "arm": "",
        "degraded": [],
    }
    return Served(**(fields | changes))


# --- the record and the table -------------------------------------------------------------


def test_a_record_becomes_one_row_with_parallel_lists():
    record = serve_record(
        served(
            items=("a", "b", "c"),
            experiment="ranker-candidate",
            arm="candidate",
            degraded=[resources_pb2.DEGRADED_REASON_FEATURES_MISSING],
            propensities=np.array([1.0, 0.5, 0.25], np.float32),
        )
    )
    assert record_problem(record, "r1") is None
    table = serve_table([record, serve_record(served("r2", items=(), user_id=""))])
    assert table.schema == SERVE_SCHEMA
    first, empty = table.to_pylist()
    assert first["item_ids"] == ["a", "b", "c"] and first["sources"] == ["covisitation"] * 3
    assert first["scores"] == pytest.approx([1.0, 0.75, 0.5])
    assert first["propensities"] == [1.0, 0.5, 0.25]
    assert first["degraded"] == ["features_missing"]
    assert (first["experiment"], first["arm"], first["index_version"]) == (
        "ranker-candidate", "candidate", "idx-7",
    )  # fmt: skip
    assert first["served_at"].isoformat() == "2026-01-01T00:00:00+00:00"
    assert empty["item_ids"] == [] and empty["user_id"] is None and empty["arm"] is None


def test_a_deterministic_policy_logs_propensity_one():
    assert list(serve_record(served(items=("a", "b"))).propensities) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r.ClearField("request_id"), "request_id is empty"),
        (lambda r: setattr(r, "request_id", "other"), "differs from the bus entry's"),
        (lambda r: r.ClearField("served_at"), "served_at is missing"),
        (lambda r: r.ClearField("session_id"), "session_id is empty"),
        (lambda r: setattr(r, "operation", "search"), "operation 'search' is not one of"),
        (lambda r: r.sources.append(1), "sources has 3 values for 2 items"),
        (lambda r: r.ClearField("propensities"), "propensities has 0 values for 2 items"),
        (lambda r: r.propensities.__setitem__(0, 1.5), "a propensity is outside (0, 1]"),
        (lambda r: r.ClearField("model_version"), "model_version is empty"),
    ],
)
def test_a_record_that_cannot_be_logged_says_why(
    change: Callable[[resources_pb2.ServeRecord], object], problem: str
):
    record = serve_record(served())
    change(record)
    assert problem in (record_problem(record, "r1") or "")


def test_the_serve_log_reads_its_date_partitions(tmp_path):
    assert ServeLog(tmp_path).read().num_rows == 0
    table = serve_table([serve_record(served("r1")), serve_record(served("r2"))])
    (tmp_path / "date=2026-01-01").mkdir()
    pq.write_table(table, tmp_path / "date=2026-01-01" / "stream-p0-1-2-w.parquet")
    assert ServeLog(tmp_path).read(["request_id"]).column(0).to_pylist() == ["r1", "r2"]


# --- on the bus ---------------------------------------------------------------------------


@pytest.fixture
def address(redis_server):
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB).flushdb()
    return f"{redis_server.address},db={DB}"


@pytest.fixture
def sync(address):
    client = bus.sync_client(address)
    yield client
    client.close()


def run(address: str, scenario, partitions: int = 4, **client_options: Any):
    async def main():
        client = async_client(address, **client_options)
        try:
            return await scenario(EventBus(client, partitions), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def entries(sync: redis.Redis, partitions: int = 4) -> list[bus.BusEntry]:
    return [e for p in range(partitions) for e in bus.read_partition(sync, p)]


def test_serve_entries_share_the_event_streams_and_are_not_deduplicated(address, sync):
    record = serve_record(served("r1")).SerializeToString()

    async def scenario(b: EventBus, _client):
        await b.append([BusEvent("e1", routing_key("u1", "s1"), b"event")], 1)
        twice = [BusServe("r1", routing_key("u1", "s1"), record)] * 2
        return await b.append_serves(twice, 2), await b.measure_lag()

    appended, lag = run(address, scenario)
    assert appended == 2
    p = bus.partition_of("u:u1", 4)
    got = bus.read_partition(sync, p)
    assert [(e.event_id, e.serve, e.seq) for e in got] == [
        ("e1", False, 1), ("r1", True, 2), ("r1", True, 3),
    ]  # fmt: skip
    assert got[1].payload == record and got[1].received_us == 2
    assert lag[p].undelivered == 3  # the counter covers serve entries too
    assert sync.zcard(bus.seen_key("r1")) == 0  # nothing remembered for them


def test_serve_entries_respect_the_recorded_partitions(address, sync):
    sync.set(bus.PARTITIONS_KEY, 8)

    async def scenario(b: EventBus, _client):
        await b.append_serves([BusServe("r1", routing_key("u1", "s1"), b"x")], 1)

    with pytest.raises(bus.ConfigurationError, match="8 partitions"):
        run(address, scenario)
    assert entries(sync) == []


# --- the ranking server's writer ----------------------------------------------------------


def dropped(otel, reason: str) -> int:
    return sum(
        p.value
        for p in otel.points("inkling.serve_log.dropped")
        if p.attributes.get("reason") == reason
    )


def test_answers_reach_the_bus_in_order(address, sync):
    async def scenario(b: EventBus, _client):
        logger = ServeLogger(b, max_batch=7)
        await logger.start()
        for k in range(50):
            logger.log(served(f"r{k}", user_id="u1"))
        await logger.close()
        return logger

    logger = run(address, scenario, retries=0)
    assert logger.appended == 50 and logger.dropped == {}
    got = entries(sync)
    assert [e.event_id for e in got] == [f"r{k}" for k in range(50)]
    assert all(e.serve for e in got)
    record = resources_pb2.ServeRecord.FromString(got[3].payload)
    assert record.request_id == "r3" and list(record.item_ids) == ["a", "b"]
    assert record.served_at.ToMicroseconds() == 1_767_225_600_000_000


def test_a_full_queue_drops_and_counts_without_blocking(address, sync, otel):
    before = dropped(otel, "queue_full")

    async def scenario(b: EventBus, _client):
        logger = ServeLogger(b, max_queue=3)
        await logger.start()
        for k in range(10):  # no await between: the writer task cannot run meanwhile
            logger.log(served(f"r{k}"))
        await logger.close()
        return logger

    logger = run(address, scenario)
    assert logger.appended == 3 and logger.dropped == {"queue_full": 7}
    assert dropped(otel, "queue_full") - before == 7
    assert [e.event_id for e in entries(sync)] == ["r0", "r1", "r2"]


def test_a_bus_that_is_down_never_fails_a_request_and_counts_every_loss(otel):
    before = dropped(otel, "bus_unavailable")
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def scenario(b: EventBus, _client):
        logger = ServeLogger(b, max_queue=100, retry_after_s=0.05)
        await logger.start()
        for k in range(30):
            logger.log(served(f"r{k}"))  # never raises
            await asyncio.sleep(0.005)
        await logger.close(timeout_s=2.0)
        return logger

    logger = run(nowhere, scenario, retries=0, timeout_s=0.2)
    assert logger.appended == 0
    assert sum(logger.dropped.values()) == 30
    assert logger.dropped.get("bus_unavailable", 0) > 0
    assert dropped(otel, "bus_unavailable") - before == logger.dropped["bus_unavailable"]


def test_a_bus_with_other_partitions_counts_records_as_misconfigured(address, sync, otel):
    sync.set(bus.PARTITIONS_KEY, 8)
    before = dropped(otel, "misconfigured")

    async def scenario(b: EventBus, _client):
        logger = ServeLogger(b, retry_after_s=0.01)
        await logger.start()
        logger.log(served("r1"))
        await logger.close()
        return logger

    logger = run(address, scenario, partitions=4)
    assert logger.dropped == {"misconfigured": 1}
    assert dropped(otel, "misconfigured") - before == 1
    assert entries(sync, 8) == []
