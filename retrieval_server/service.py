"""The RetrievalService adapter: proto → core → proto. Errors map in the interceptor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import grpc

from inkling.serving.convert import degradation, filter_counts, timings
from inkling.serving.validation import validate
from inkling.v1 import resources_pb2, retrieval_service_pb2, retrieval_service_pb2_grpc
from retrieval_server.core import RetrievalCore, RetrievalRequest


class RetrievalServicer(retrieval_service_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, core: RetrievalCore, feature_service: str) -> None:
        self._core = core
        self._feature_service = feature_service

    async def RetrieveCandidates(
        self,
        request: retrieval_service_pb2.RetrieveCandidatesRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_service_pb2.RetrieveCandidatesResponse:
        validate(request)
        result = await self._core.retrieve(
            RetrievalRequest(
                user_id=request.user_id,
                session_id=request.session_id,
                num_candidates=request.num_candidates,
                exclude_item_ids=request.exclude_item_ids,
                include_categories=request.include_categories,
                exclude_categories=request.exclude_categories,
            )
        )
        c = result.candidates
        ids = result.table.ids[c.rows].tolist()
        also = result.also_found_by
        response = retrieval_service_pb2.RetrieveCandidatesResponse(
            served_by=resources_pb2.ServedBy(
                model_version=result.model_version,
                feature_service=self._feature_service,
                index_version=result.index_version,
            ),
            degradation=degradation(result.degraded, result.detail),
            filtered=filter_counts(result.removed),
        )
        if request.packed:
            _pack(response.packed, ids, c.scores.tolist(), c.sources.tolist(), c.rows, also)
        else:
            # add() per candidate is the cheapest way to build a thousand messages.
            add = response.candidates.add
            for item, score, source in zip(ids, c.scores.tolist(), c.sources.tolist(), strict=True):
                add(item_id=item, score=score, source=cast(Any, source))
            if also:
                for k, row in enumerate(c.rows.tolist()):
                    if row in also:
                        response.candidates[k].sources.extend(cast(Any, also[row]))
        if request.debug:
            response.debug.timings.extend(timings(result.timings))
        return response


def _pack(
    packed: retrieval_service_pb2.PackedCandidates,
    ids: list[str],
    scores: list[float],
    sources: list[int],
    rows: Any,
    also: Mapping[int, Sequence[int]],
) -> None:
    """The candidates as columns: each column is filled by one call, in C."""
    packed.item_ids.extend(ids)
    packed.scores.extend(scores)
    packed.sources.extend(cast(Any, sources))
    if also:
        for k, row in enumerate(rows.tolist()):
            if row in also:
                found = also[row]
                packed.also_positions.extend([k] * len(found))
                packed.also_sources.extend(cast(Any, found))
