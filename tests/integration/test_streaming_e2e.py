"""Streaming end to end: events tracked through the ingest server reach the online store
through a stream worker, and `Recommend` follows a session whose intent moves.

Real parts throughout: a redis-server process, a Feast repository applied and
materialized from Spark features, the ingest, retrieval and ranking gRPC servers on
loopback (port 0), and a stream worker on a thread of this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pyarrow.parquet as pq
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from batch.generate import GeneratorConfig
from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.feature_store.feast_store import open_store
from inkling.serving.runtime import Running, start_server
from inkling.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
)
from stream_worker.app import run_worker
from stream_worker.settings import WorkerSettings
from tests.integration.test_servers import Loop, served, start_pair

pytestmark = [pytest.mark.spark, pytest.mark.redis]

DB = 6  # this module's database of the shared test Redis (3, 4, 5 and 7 belong to others)


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server):
    return served(
        tmp_path_factory.mktemp("streaming"), spark, redis_server, DB,
        GeneratorConfig(users=150, items=400, sessions=700, days=3, seed=11),
    )  # fmt: skip


@pytest.fixture(scope="module")
def running(built) -> Iterator[tuple[int, int]]:
    """(events port, ranking port) with a stream worker consuming the bus."""
    loop = Loop()
    events: Running = loop.run(start_server(EventsApp(built, EventsSettings(port=0)), port=0))
    retrieval, ranking = start_pair(loop, built, grace_s=1)
    stop = threading.Event()
    worker_settings = WorkerSettings(batch_max_wait_ms=20.0, log_flush_s=0.5, poll_ms=50.0)
    worker = threading.Thread(target=run_worker, args=(built, worker_settings, stop), daemon=True)
    worker.start()
    yield events.port, ranking.port
    stop.set()
    worker.join(20)
    for server in (ranking, retrieval, events):
        loop.run(server.stop())
    loop.close()


def _catalogue(built) -> dict[str, list[str]]:
    """Item ids by category, most popular first (so they are candidates somewhere)."""
    items = pq.read_table(built.catalog_dir / "items.parquet").to_pandas()
    items = items[items.in_stock & ~items.blocked]
    pop = pq.read_table(built.features_dir / "item_features").to_pandas()
    pop = pop.sort_values("event_timestamp").groupby("item_id").item_pop_30d.last()
    items["pop"] = items.item_id.map(pop).fillna(0)
    items = items.sort_values("pop", ascending=False)
    return {c: list(g.item_id) for c, g in items.groupby("category")}


def _event(n: int, session: str, item: str, kind: int, at: datetime) -> resources_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(at)
    return resources_pb2.Event(
        event_id=f"e2e-{session}-{n}", user_id="", session_id=session, item_id=item,
        event_type=kind, timestamp=ts, dwell_ms=40_000 if kind == resources_pb2.EVENT_TYPE_CLICK else 0,
    )  # fmt: skip


def _top_categories(stub, session: str, k: int = 10) -> list[str]:
    """The categories of the top k, best first. (The policy keeps at most 3 of one
    category in the top 20, so it is the order that shows the intent, not the counts.)"""
    reply = stub.Recommend(
        ranking_service_pb2.RecommendRequest(session_id=session, num_results=k), timeout=5
    )
    assert not reply.degradation.degraded, reply.degradation
    return [item.category for item in reply.items]


def _wait_for_intent(built, session: str, category: str, timeout: float = 20.0) -> float:
    """Seconds until the session's online row (read through Feast) shows `category`."""
    store = open_store(built)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        row = store.get_online_features(
            features=["session_features:session_intent_category"],
            entity_rows=[{"session_id": session}],
        ).to_dict()
        if row["session_intent_category"][0] == category:
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"session {session} never showed intent {category} in {timeout} s")


def test_recommend_follows_a_session_whose_intent_moves(built, running):
    events_port, ranking_port = running
    by_category = _catalogue(built)
    first, second = sorted(by_category, key=lambda c: -len(by_category[c]))[:2]
    session = "live-intent-shift"
    now = datetime.now(UTC)
    with (
        grpc.insecure_channel(f"127.0.0.1:{events_port}") as events_channel,
        grpc.insecure_channel(f"127.0.0.1:{ranking_port}") as ranking_channel,
    ):
        track = event_service_pb2_grpc.EventServiceStub(events_channel).TrackEvents
        ranking = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel)
        click = resources_pb2.EVENT_TYPE_CLICK
        before = [
            _event(n, session, item, click, now + timedelta(seconds=n))
            for n, item in enumerate(by_category[first][:4])
        ]
        reply = track(event_service_pb2.TrackEventsRequest(events=before), timeout=5)
        assert reply.accepted == 4 and not reply.rejected
        _wait_for_intent(built, session, first)
        shown_first = _top_categories(ranking, session)
        assert shown_first[:3] == [first] * 3, shown_first

        after = [
            _event(10 + n, session, item, click, now + timedelta(seconds=10 + n))
            for n, item in enumerate(by_category[second][:6])
        ]
        reply = track(event_service_pb2.TrackEventsRequest(events=after), timeout=5)
        assert reply.accepted == 6
        _wait_for_intent(built, session, second)
        shown_second = _top_categories(ranking, session)
        assert shown_second[:3] == [second] * 3, shown_second
        # The old intent still counts (its items are in the session), below the new one.
        assert second not in shown_first[:3] and first not in shown_second[:3]
