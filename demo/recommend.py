"""The demo's serving half: both servers on loopback, a few Recommend calls through
the generated stubs, one more with `debug` (always traced) whose trace is kept, then a
clean shutdown."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inkling.config import Settings
from inkling.serving.runtime import start_server
from inkling.serving.settings import RankingSettings, RetrievalSettings
from inkling.telemetry.tree import trace_tree
from inkling.v1 import ranking_service_pb2, ranking_service_pb2_grpc, resources_pb2
from ranking_server.app import RankingApp
from retrieval_server.app import RetrievalApp

SOURCE_NAMES = {
    resources_pb2.CANDIDATE_SOURCE_ANN: "ann",
    resources_pb2.CANDIDATE_SOURCE_COVISITATION: "covisit",
    resources_pb2.CANDIDATE_SOURCE_POPULARITY: "popular",
    resources_pb2.CANDIDATE_SOURCE_CALLER: "caller",
}


@dataclass
class ServedDemo:
    calls: list[DemoCall]
    """The last round's calls, one per (user, session)."""
    latencies_ms: list[float]
    where: str
    trace: str
    """The debug call's trace as an indented tree ('' when no spans were collected)."""


@dataclass
class DemoCall:
    user_id: str
    session_id: str
    response: ranking_service_pb2.RecommendResponse
    millis: float


async def _recommend_for(
    settings: Settings,
    who: list[tuple[str, str]],
    num_results: int,
    repeats: int,
    enforce_ttl: bool,
    spans: InMemorySpanExporter | None,
) -> ServedDemo:
    retrieval = await start_server(
        RetrievalApp(settings, RetrievalSettings(port=0, enforce_ttl=enforce_ttl)),
        port=0,
        grace_s=2,
    )
    rs = RankingSettings(
        port=0, retrieval_address=f"127.0.0.1:{retrieval.port}", enforce_ttl=enforce_ttl
    )
    ranking = await start_server(RankingApp(settings, rs), port=0, grace_s=2)
    where = f"retrieval 127.0.0.1:{retrieval.port}, ranking 127.0.0.1:{ranking.port}"
    calls: list[DemoCall] = []
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
            stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
            for round_ in range(repeats):
                for user_id, session_id in who:
                    began = time.perf_counter()
                    response = await stub.Recommend(
                        ranking_service_pb2.RecommendRequest(
                            user_id=user_id, session_id=session_id, num_results=num_results
                        ),
                        timeout=2.0,
                    )
                    millis = (time.perf_counter() - began) * 1000
                    latencies.append(millis)
                    if round_ == repeats - 1:
                        calls.append(DemoCall(user_id, session_id, response, millis))
            tree = await _traced_call(stub, *who[0], num_results, spans) if who else ""
    finally:
        await ranking.stop()
        await retrieval.stop()
    return ServedDemo(calls, latencies, where, tree)


async def _traced_call(
    stub: ranking_service_pb2_grpc.RankingServiceStub,
    user_id: str,
    session_id: str,
    num_results: int,
    spans: InMemorySpanExporter | None,
) -> str:
    """One `debug` Recommend (the sampler always keeps it); its trace as a tree."""
    if spans is None:
        return ""
    spans.clear()
    request = ranking_service_pb2.RecommendRequest(
        user_id=user_id, session_id=session_id, num_results=num_results, debug=True
    )
    await stub.Recommend(request, timeout=2.0)
    server = "inkling.v1.RankingService/Recommend"
    deadline = time.monotonic() + 2.0  # the server span ends just after the reply is sent
    while time.monotonic() < deadline:
        finished = spans.get_finished_spans()
        root = next((s for s in finished if s.name == server and s.parent is None), None)
        if root is not None and root.context is not None:
            return trace_tree(finished, root.context.trace_id)
        await asyncio.sleep(0.01)
    return ""


def recommend_demo(
    settings: Settings,
    who: list[tuple[str, str]],
    num_results: int = 10,
    repeats: int = 20,
    enforce_ttl: bool = True,
    spans: InMemorySpanExporter | None = None,
) -> ServedDemo:
    """Start both servers, call Recommend `repeats` times for each (user, session), then
    once more with debug for the first, whose trace `spans` (the exporter the process's
    telemetry was configured with) collects; stop.

    `enforce_ttl=False` for an imported historical log, whose rows are all past their TTL.
    """
    return asyncio.run(_recommend_for(settings, who, num_results, repeats, enforce_ttl, spans))


def render(calls: list[DemoCall]) -> str:
    lines = []
    for call in calls:
        r = call.response
        flag = " DEGRADED" if r.degradation.degraded else ""
        lines.append(
            f"user {call.user_id or '(anonymous)'}, session {call.session_id} "
            f"({call.millis:.1f} ms, {r.served_by.model_version}, index {r.served_by.index_version}){flag}"
        )
        for item in r.items:
            lines.append(
                f"  {item.rank + 1:2d}. {item.item_id:10s} {item.category:8s} score {item.score:7.3f}"
                f"  via {SOURCE_NAMES.get(item.source, '?')}"
            )
    return "\n".join(lines)
