"""gRPC telemetry: a span and a duration per call, on both sides, W3C context between.

The server interceptor wraps each unary handler (the place where the request is
known): it continues the caller's trace from the `traceparent` metadata, opens one
SERVER span named by the method, marks a request with `debug` set so the sampler
keeps it, and records `rpc.server.call.duration` with `rpc.system.name`,
`rpc.method` and `rpc.response.status_code`. A call that aborts (INVALID_ARGUMENT,
DEADLINE_EXCEEDED, ...) keeps its status and details: the interceptor only reads the
code from the context and re-raises. Streaming handlers pass through untouched.

The client interceptor opens a CLIENT span, injects its context into the call's
metadata and records `rpc.client.call.duration` when the call completes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.metrics import Histogram
from opentelemetry.trace import SpanKind, Status, StatusCode

from inkling.serving.interceptors import Behavior, UnaryServerInterceptor
from inkling.telemetry.instruments import RPC_CLIENT_DURATION, RPC_SERVER_DURATION
from inkling.telemetry.providers import DEBUG_ATTRIBUTE

tracer = trace.get_tracer("inkling.rpc")
_OK = grpc.StatusCode.OK.name


def _code_name(code: grpc.StatusCode | None, failed: bool) -> str:
    if code is None:
        return "UNKNOWN" if failed else _OK
    return code.name


def _end_call(
    span: trace.Span,
    duration: Histogram,
    base: dict[str, str],
    code: str,
    started: float,
) -> None:
    """Either side's end of a call: the status on its span (an error unless OK) and its
    duration under the status code."""
    span.set_attribute("rpc.response.status_code", code)
    if code != _OK:
        span.set_status(Status(StatusCode.ERROR, code))
    duration.record(time.perf_counter() - started, {**base, "rpc.response.status_code": code})


def _server_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the call ends with: what the handler set or aborted with; a handler
    cancelled by its caller's deadline is DEADLINE_EXCEEDED, by the caller CANCELLED."""
    code = context.code()
    if code is None and isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    return _code_name(code, error is not None)


class ServerTelemetry(UnaryServerInterceptor):
    """One SERVER span and one `rpc.server.call.duration` measurement per unary call."""

    def wrap(self, inner: Behavior, details: grpc.HandlerCallDetails) -> Behavior:
        method = details.method.lstrip("/")
        metadata = details.invocation_metadata or ()
        base = {"rpc.system.name": "grpc", "rpc.method": method}

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            carrier = {k: v for k, v in metadata if isinstance(v, str)}
            attributes: dict[str, Any] = dict(base)
            if getattr(request, "debug", False):
                attributes[DEBUG_ATTRIBUTE] = True
            error: BaseException | None = None
            with tracer.start_as_current_span(
                method,
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    _end_call(
                        span, RPC_SERVER_DURATION, base, _server_code(context, error), started
                    )

        return observed


class ClientTelemetry(grpc.aio.UnaryUnaryClientInterceptor):
    """A CLIENT span per call, its W3C context sent as metadata, and the call's duration."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = (method.decode() if isinstance(method, bytes) else method).lstrip("/")
        base = {"rpc.system.name": "grpc", "rpc.method": name}
        started = time.perf_counter()
        with tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes=base, record_exception=False
        ) as span:
            metadata = grpc.aio.Metadata(*(tuple(client_call_details.metadata or ())))
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            for key, value in carrier.items():
                metadata.add(key, value)
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            call = await continuation(details, request)
            code: grpc.StatusCode | None = None
            try:
                code = await call.code()
            finally:
                code_name = _code_name(code, failed=code is None)
                _end_call(span, RPC_CLIENT_DURATION, base, code_name, started)
            return call
