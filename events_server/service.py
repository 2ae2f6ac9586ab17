"""The EventService adapter: proto → core → proto. Errors map in the interceptor."""

from __future__ import annotations

import grpc

from events_server.core import IngestCore
from inkling.pseudonym import Pseudonymizer
from inkling.v1 import event_service_pb2, event_service_pb2_grpc


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, core: IngestCore, pseudonyms: Pseudonymizer | None = None) -> None:
        self._core = core
        self._pseudonyms = pseudonyms

    async def TrackEvents(
        self,
        request: event_service_pb2.TrackEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> event_service_pb2.TrackEventsResponse:
        if self._pseudonyms is not None:  # raw ids go no further than this (inkling.pseudonym)
            for event in request.events:
                event.user_id = self._pseudonyms(event.user_id)
        result = await self._core.track(request)
        response = event_service_pb2.TrackEventsResponse(
            accepted=result.accepted, duplicates=result.duplicates
        )
        add = response.rejected.add
        for r in result.rejected:
            add(index=r.index, event_id=r.event_id, reason=r.reason)
        return response
