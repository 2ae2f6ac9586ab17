"""The EventService adapter: proto → core → proto. Errors map in the interceptor."""

from __future__ import annotations

import grpc

from events_server.core import IngestCore
from inkling.v1 import event_service_pb2, event_service_pb2_grpc


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, core: IngestCore) -> None:
        self._core = core

    async def TrackEvents(
        self,
        request: event_service_pb2.TrackEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> event_service_pb2.TrackEventsResponse:
        result = await self._core.track(request)
        response = event_service_pb2.TrackEventsResponse(
            accepted=result.accepted, duplicates=result.duplicates
        )
        add = response.rejected.add
        for r in result.rejected:
            add(index=r.index, event_id=r.event_id, reason=r.reason)
        return response
