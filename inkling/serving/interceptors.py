"""The one way a server interceptor wraps a call: around each unary handler.

grpc.aio's interceptors see a call's method and metadata, not its request; what needs
the request or the outcome (error mapping, telemetry, auth) wraps the handler's
behaviour instead. A `UnaryServerInterceptor` says only how (`wrap`); streaming
handlers pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


Deserializer = Callable[[bytes], Any]


class UnaryServerInterceptor(grpc.aio.ServerInterceptor):
    """Replaces each unary handler's behaviour by `wrap(behaviour, details)`, and its
    request deserializer by `deserializer(deserializer, details)` (unchanged unless
    overridden: the one place that sees a payload grpc could not decode)."""

    def wrap(self, inner: Behavior, details: grpc.HandlerCallDetails) -> Behavior:
        raise NotImplementedError

    def deserializer(
        self, inner: Deserializer | None, details: grpc.HandlerCallDetails
    ) -> Deserializer | None:
        return inner

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self.wrap(handler.unary_unary, handler_call_details),
            request_deserializer=self.deserializer(
                handler.request_deserializer, handler_call_details
            ),
            response_serializer=handler.response_serializer,
        )
