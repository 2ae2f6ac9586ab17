"""The deferred-servicer gate on a real grpc.aio server: UNAVAILABLE while the app
loads, then every call forwarded to the loaded servicer."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inkling.serving.runtime import DeferredServicer
from inkling.v1 import ranking_service_pb2 as rk
from inkling.v1 import ranking_service_pb2_grpc as rk_grpc

SERVICE = rk.DESCRIPTOR.services_by_name["RankingService"]


class _Loaded:
    """A servicer that names which RPC answered (in `served_by.model_version`)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Recommend(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append("Recommend")
        reply = rk.RecommendResponse()
        reply.served_by.model_version = f"recommend:{request.user_id}"
        return reply

    async def RankCandidates(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append("RankCandidates")
        reply = rk.RankCandidatesResponse()
        reply.served_by.model_version = f"rank:{request.user_id}"
        return reply


def test_unavailable_until_loaded_then_forwards_every_rpc() -> None:
    loaded = _Loaded()
    state: dict[str, object | None] = {"servicer": None}
    asked: list[int] = []

    def ready() -> object | None:
        asked.append(1)
        return state["servicer"]

    async def run() -> None:
        server = grpc.aio.server()
        gate = DeferredServicer(SERVICE, ready, "ranking")
        rk_grpc.add_RankingServiceServicer_to_server(gate, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rk_grpc.RankingServiceStub(channel)
                for call in (stub.Recommend(rk.RecommendRequest(user_id="u1"), timeout=5),
                             stub.RankCandidates(rk.RankCandidatesRequest(user_id="u1"), timeout=5)):  # fmt: skip
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert err.value.details() == "ranking is still loading"
                assert loaded.calls == []

                state["servicer"] = loaded
                reply = await stub.Recommend(rk.RecommendRequest(user_id="u2"), timeout=5)
                assert reply.served_by.model_version == "recommend:u2"
                ranked = await stub.RankCandidates(
                    rk.RankCandidatesRequest(user_id="u3"), timeout=5
                )
                assert ranked.served_by.model_version == "rank:u3"
                asked_once_loaded = len(asked)
                await stub.Recommend(rk.RecommendRequest(user_id="u4"), timeout=5)
                assert len(asked) == asked_once_loaded  # the loaded servicer is kept
                assert loaded.calls == ["Recommend", "RankCandidates", "Recommend"]
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_only_the_services_rpcs_are_forwarded() -> None:
    gate = DeferredServicer(SERVICE, lambda: None, "ranking")
    assert callable(gate.Recommend)
    with pytest.raises(AttributeError):
        _ = gate.TrackEvents  # another service's RPC
    with pytest.raises(AttributeError):
        _ = gate._servicer_of_someone_else
