"""The server interceptors on a real grpc.aio server (inkling.serving.runtime): a call
past its caller's deadline ends DEADLINE_EXCEEDED for the caller, and is measured and
traced as such on the server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from inkling.serving.runtime import start_server
from inkling.v1 import ranking_service_pb2 as rk
from inkling.v1 import ranking_service_pb2_grpc as rk_grpc

METHOD = "inkling.v1.RankingService/Recommend"


class _Slow:
    """A servicer that takes longer than its callers wait."""

    async def Recommend(self, request: Any, context: Any) -> rk.RecommendResponse:
        await asyncio.sleep(2.0)
        return rk.RecommendResponse()

    async def RankCandidates(self, request: Any, context: Any) -> rk.RankCandidatesResponse:
        return rk.RankCandidatesResponse()


class _SlowApp:
    service_names = ("inkling.v1.RankingService",)

    def register(self, server: grpc.aio.Server) -> None:
        rk_grpc.add_RankingServiceServicer_to_server(_Slow(), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _count(otel: Any, status: str) -> int:
    return sum(
        p.count
        for p in otel.points("rpc.server.call.duration")
        if p.attributes.get("rpc.method") == METHOD
        and p.attributes.get("rpc.response.status_code") == status
    )


def test_a_call_past_its_deadline_is_deadline_exceeded_on_both_sides(otel):
    before = _count(otel, "DEADLINE_EXCEEDED")
    otel.spans.clear()

    async def run() -> grpc.StatusCode:
        running = await start_server(_SlowApp(), port=0, grace_s=0.5)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = rk_grpc.RankingServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Recommend(
                        rk.RecommendRequest(session_id="s", debug=True), timeout=0.2
                    )
                # The handler is cancelled by the deadline; its measurement follows.
                deadline = time.monotonic() + 5
                while _count(otel, "DEADLINE_EXCEEDED") == before and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                return err.value.code()
        finally:
            await running.stop()

    assert asyncio.run(run()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _count(otel, "DEADLINE_EXCEEDED") == before + 1
    (span,) = [s for s in otel.spans.get_finished_spans() if s.name == METHOD]
    assert span.attributes["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert not span.status.is_ok
