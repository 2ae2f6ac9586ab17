"""The demo's streaming half: a live session whose intent shifts, tracked through the
ingest server, turned into online session features by a stream worker, and answered
by `Recommend` after every few events, with the freshness each step measured."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pyarrow.parquet as pq
from google.protobuf.timestamp_pb2 import Timestamp

from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.events.bus import async_client
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.rows import RowReader
from inkling.serving.runtime import start_server
from inkling.serving.security import SecuritySettings
from inkling.serving.settings import RankingSettings, RetrievalSettings
from inkling.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
)
from ranking_server.app import RankingApp
from retrieval_server.app import RetrievalApp
from stream_worker.app import run_worker
from stream_worker.settings import WorkerSettings

CLICKS_PER_STEP = 2
STEPS_PER_INTENT = 3


@dataclass
class Step:
    intent: str
    clicked: list[str]
    freshness_ms: float
    recommend_ms: float
    top: list[tuple[str, str]]

    def share(self, category: str) -> int:
        return sum(1 for _, c in self.top if c == category)


def _two_intents(settings: Settings) -> tuple[str, str, dict[str, list[str]]]:
    items = pq.read_table(settings.catalog_dir / "items.parquet").to_pandas()
    items = items[items.in_stock & ~items.blocked]
    by_category = {str(c): [str(i) for i in g.item_id] for c, g in items.groupby("category")}
    first, second = sorted(by_category, key=lambda c: -len(by_category[c]))[:2]
    return first, second, by_category


async def _live(settings: Settings, enforce_ttl: bool) -> tuple[list[Step], str, str]:
    first, second, by_category = _two_intents(settings)
    events = await start_server(EventsApp(settings, EventsSettings(port=0)), port=0, grace_s=2)
    retrieval = await start_server(
        RetrievalApp(settings, RetrievalSettings(port=0, enforce_ttl=enforce_ttl)), port=0
    )
    rs = RankingSettings(
        port=0, retrieval_address=f"127.0.0.1:{retrieval.port}", enforce_ttl=enforce_ttl
    )
    ranking = await start_server(RankingApp(settings, rs), port=0, grace_s=2)
    print(
        f"[demo] servers on 127.0.0.1 ports {events.port}, {retrieval.port}, {ranking.port}: "
        f"{SecuritySettings().describe()}",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(settings, WorkerSettings(batch_max_wait_ms=10.0, poll_ms=20.0), stop),
        daemon=True,
    )
    worker.start()
    client = async_client(settings.redis_address or "")
    reader = RowReader(client, resolve_service(open_store(settings), "ranker_v1"), enforce_ttl)
    session = f"live-{uuid.uuid4().hex[:8]}"
    steps: list[Step] = []
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{events.port}") as events_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{ranking.port}") as ranking_channel,
        ):
            track = event_service_pb2_grpc.EventServiceStub(events_channel).TrackEvents
            recommend = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel).Recommend
            n = 0
            for intent in [first] * STEPS_PER_INTENT + [second] * STEPS_PER_INTENT:
                pool = by_category[intent]
                clicked = [pool[(n + k) % len(pool)] for k in range(CLICKS_PER_STEP)]
                batch = []
                for item in clicked:
                    ts = Timestamp()
                    ts.FromDatetime(datetime.now(UTC))
                    batch.append(
                        resources_pb2.Event(
                            event_id=f"{session}-{n}",
                            session_id=session,
                            item_id=item,
                            event_type=resources_pb2.EVENT_TYPE_CLICK,
                            timestamp=ts,
                            dwell_ms=30_000,
                        )
                    )
                    n += 1
                await track(event_service_pb2.TrackEventsRequest(events=batch), timeout=5)
                accepted = time.perf_counter()
                while True:
                    [row] = await reader.read("session_features", [session])
                    recent = (row or {}).get("session_recent_items") or []
                    if recent and recent[-1] == clicked[-1]:
                        break
                    if time.perf_counter() - accepted > 10:
                        raise TimeoutError(f"session {session} was not updated within 10 s")
                    await asyncio.sleep(0.002)
                fresh = (time.perf_counter() - accepted) * 1000
                began = time.perf_counter()
                reply = await recommend(
                    ranking_service_pb2.RecommendRequest(session_id=session, num_results=10),
                    timeout=2,
                )
                steps.append(
                    Step(
                        intent,
                        clicked,
                        fresh,
                        (time.perf_counter() - began) * 1000,
                        [(i.item_id, i.category) for i in reply.items],
                    )
                )
    finally:
        stop.set()
        await client.aclose()
        await asyncio.to_thread(worker.join, 30)
        for server in (ranking, retrieval, events):
            await server.stop()
    return steps, first, second


def live_session_demo(settings: Settings, enforce_ttl: bool = True) -> tuple[list[Step], str, str]:
    """Replay a live session: clicks in one category, then in another; after every
    `CLICKS_PER_STEP` clicks, wait for the session row and call `Recommend`."""
    return asyncio.run(_live(settings, enforce_ttl))


def render_steps(steps: list[Step], first: str, second: str) -> str:
    lines = [
        f"step  intent  clicked              freshness  Recommend  top-10 by category "
        f"({first} / {second} / other), top 5",
    ]
    for k, step in enumerate(steps, 1):
        counts = Counter(c for _, c in step.top)
        other = sum(v for c, v in counts.items() if c not in (first, second))
        lines.append(
            f"{k:4d}  {step.intent:6s}  {', '.join(step.clicked):19s}  {step.freshness_ms:6.1f} ms"
            f"  {step.recommend_ms:6.1f} ms  {counts[first]:2d} / {counts[second]:2d} / {other:2d}   "
            + " ".join(f"{i}({c})" for i, c in step.top[:5])
        )
    return "\n".join(lines)
