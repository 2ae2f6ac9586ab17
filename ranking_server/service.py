"""The RankingService adapter and the gRPC client Recommend uses to reach retrieval."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import grpc

from inkling.exploration import request_seed
from inkling.pseudonym import Pseudonymizer
from inkling.serving.convert import degradation, filter_counts, row_features, timings
from inkling.serving.runtime import Deadline
from inkling.serving.serve_logger import Served, ServeLogger
from inkling.serving.validation import validate
from inkling.v1 import (
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
    retrieval_service_pb2,
    retrieval_service_pb2_grpc,
)
from ranking_server.core import (
    Ranked,
    RankingCore,
    RetrievalTimeout,
    RetrievalUnavailable,
    Retrieved,
)


class GrpcRetriever:
    """Recommend's port to the retrieval server, over a generated stub."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)

    async def retrieve(
        self,
        *,
        user_id: str,
        session_id: str,
        num_candidates: int,
        exclude_item_ids: Sequence[str],
        include_categories: Sequence[str],
        exclude_categories: Sequence[str],
        timeout_s: float,
    ) -> Retrieved:
        if timeout_s <= 0:
            raise RetrievalTimeout("no time left for retrieval")
        try:
            response = await self._stub.RetrieveCandidates(
                retrieval_service_pb2.RetrieveCandidatesRequest(
                    user_id=user_id,
                    session_id=session_id,
                    num_candidates=num_candidates,
                    exclude_item_ids=exclude_item_ids,
                    include_categories=include_categories,
                    exclude_categories=exclude_categories,
                    packed=True,
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RetrievalTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from e
            raise RetrievalUnavailable(f"{e.code().name}: {e.details()}") from e
        if response.HasField("packed"):  # columns: each read in C
            packed = response.packed
            ids, sources, scores = (
                list(packed.item_ids),
                list(packed.sources),
                list(packed.scores),
            )
        else:  # a retrieval server that predates `packed` answers one message each
            candidates = response.candidates
            ids = [c.item_id for c in candidates]
            sources = [c.source for c in candidates]
            scores = [c.score for c in candidates]
        return Retrieved(
            item_ids=ids,
            sources=sources,
            scores=scores,
            index_version=response.served_by.index_version,
            removed={f.filter: f.removed for f in response.filtered},
        )


def new_request_id() -> str:
    """An answer's id: a random `uuid4` (122 random bits) as 32 hex digits."""
    return uuid.uuid4().hex


class RankingServicer(ranking_service_pb2_grpc.RankingServiceServicer):
    def __init__(
        self,
        core: RankingCore,
        feature_service: str,
        default_deadline_s: float,
        serve_log: ServeLogger | None = None,
        pseudonyms: Pseudonymizer | None = None,
    ) -> None:
        self._core = core
        self._feature_service = feature_service
        self._default_deadline_s = default_deadline_s
        self._serve_log = serve_log
        self._pseudonyms = pseudonyms

    def _user(self, user_id: str) -> str:
        """The id the request's user is known by inside inkling (`inkling.pseudonym`)."""
        return self._pseudonyms(user_id) if self._pseudonyms is not None else user_id

    def _record(
        self,
        request_id: str,
        operation: str,
        user_id: str,
        session_id: str,
        context: resources_pb2.RequestContext,
        ranked: Ranked,
    ) -> None:
        """Hand the answer to the serve log (a queue append: the record is built later)."""
        if self._serve_log is None:
            return
        self._serve_log.log(
            Served(
                request_id=request_id,
                served_us=time.time_ns() // 1000,
                operation=operation,
                user_id=user_id,
                session_id=session_id,
                surface=context.surface,
                item_ids=ranked.item_ids,
                scores=ranked.scores,
                sources=ranked.sources,
                propensities=ranked.propensities,
                model_version=ranked.model_version,
                index_version=ranked.index_version,
                feature_service=self._feature_service,
                experiment=self._core.experiment if ranked.arm else "",  # one per server
                arm=ranked.arm,
                degraded=ranked.degraded,
                exploration=ranked.exploration,
            )
        )

    def _items(self, ranked: Ranked) -> list[resources_pb2.RankedItem]:
        return [
            resources_pb2.RankedItem(item_id=i, score=s, rank=r, source=src, category=c)
            for r, (i, s, src, c) in enumerate(
                zip(
                    ranked.item_ids,
                    ranked.scores.tolist(),
                    ranked.sources.tolist(),
                    ranked.categories,
                    strict=True,
                )
            )
        ]

    def _served_by(self, ranked: Ranked) -> resources_pb2.ServedBy:
        return resources_pb2.ServedBy(
            model_version=ranked.model_version,
            feature_service=self._feature_service,
            index_version=ranked.index_version,
        )

    def _debug(
        self, ranked: Ranked, request_user: str, request_session: str
    ) -> resources_pb2.DebugInfo:
        debug = resources_pb2.DebugInfo(timings=timings(ranked.timings))
        hydrated = ranked.hydrated
        if hydrated is None:
            return debug
        columns = self._core.feature_columns
        debug.features.extend(
            row_features(f"user_id={request_user}", hydrated.user, columns["user"])
        )
        debug.features.extend(
            row_features(f"session_id={request_session}", hydrated.session, columns["session"])
        )
        returned = set(ranked.item_ids)
        items = hydrated.items
        values = {name: items.to_python(name) for name in columns["item"]}
        for k, item in enumerate(items.ids):
            if item not in returned:
                continue
            row = None if items.missing[k] else {n: values[n][k] for n in columns["item"]}
            debug.features.extend(row_features(f"item_id={item}", row, columns["item"]))
        return debug

    async def RankCandidates(
        self,
        request: ranking_service_pb2.RankCandidatesRequest,
        context: grpc.aio.ServicerContext,
    ) -> ranking_service_pb2.RankCandidatesResponse:
        validate(request)
        request_id = new_request_id()
        user_id = self._user(request.user_id)
        ranked = await self._core.rank_candidates(
            user_id,
            request.session_id,
            [c.item_id for c in request.candidates],
            request.num_results,
            Deadline.from_context(context, self._default_deadline_s),
            surface=request.context.surface,
            seed=request_seed(request_id),
        )
        response = ranking_service_pb2.RankCandidatesResponse(
            request_id=request_id,
            items=self._items(ranked),
            served_by=self._served_by(ranked),
            degradation=degradation(ranked.degraded, ranked.detail),
        )
        if request.debug:
            response.debug.CopyFrom(self._debug(ranked, user_id, request.session_id))
        self._record(
            response.request_id,
            "rank_candidates",
            user_id,
            request.session_id,
            request.context,
            ranked,
        )
        return response

    async def Recommend(
        self,
        request: ranking_service_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext,
    ) -> ranking_service_pb2.RecommendResponse:
        validate(request)
        request_id = new_request_id()
        user_id = self._user(request.user_id)
        ranked = await self._core.recommend(
            user_id,
            request.session_id,
            request.num_results,
            Deadline.from_context(context, self._default_deadline_s),
            exclude_item_ids=request.exclude_item_ids,
            include_categories=request.include_categories,
            exclude_categories=request.exclude_categories,
            surface=request.context.surface,
            seed=request_seed(request_id),
        )
        response = ranking_service_pb2.RecommendResponse(
            request_id=request_id,
            items=self._items(ranked),
            served_by=self._served_by(ranked),
            degradation=degradation(ranked.degraded, ranked.detail),
            filtered=filter_counts(ranked.removed),
        )
        if request.debug:
            response.debug.CopyFrom(self._debug(ranked, user_id, request.session_id))
        self._record(
            response.request_id,
            "recommend",
            user_id,
            request.session_id,
            request.context,
            ranked,
        )
        return response
