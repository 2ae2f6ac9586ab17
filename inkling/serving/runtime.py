"""What every inkling server process shares: the grpc.aio server, health, reflection,
error mapping, deadlines, graceful shutdown and worker processes.

A process is an `App`: it names its gRPC services, registers its servicers (behind a
`DeferredServicer` until it has loaded), and loads what it needs (features, index,
model) in `start()`. `serve()` binds the
port first and reports NOT_SERVING through the standard health service while the
app loads, SERVING once it has, and NOT_SERVING again when SIGTERM arrives; then
it stops taking new calls and gives in-flight ones `grace_s` to finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from inkling.errors import (
    ConfigurationError,
    DependencyUnavailableError,
    InklingError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
)
from inkling.serving.interceptors import Behavior, Deserializer, UnaryServerInterceptor
from inkling.serving.security import AuthInterceptor, SecuritySettings, server_credentials
from inkling.telemetry.instruments import RPC_REFUSED
from inkling.telemetry.rpc import ServerTelemetry
from inkling.telemetry.sampled_log import SampledLog

log = logging.getLogger("inkling.serving")

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: tuple[tuple[type[InklingError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DependencyUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ConfigurationError, grpc.StatusCode.FAILED_PRECONDITION),
    (InklingError, grpc.StatusCode.INTERNAL),
)
RETRY_AFTER_KEY = "retry-after-ms"
LOG_EVERY_S = 60.0
"""The longest a refused or failing call's kind goes unlogged while it repeats."""
WORKER_INDEX_ENV = "INKLING_WORKER_INDEX"


def status_for(error: InklingError) -> grpc.StatusCode:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class Undecodable(NamedTuple):
    """What a request's deserializer gives for bytes that are not its message."""

    message: str
    """The full name of the message expected, e.g. `inkling.v1.RankRequest`."""
    error: str


class ErrorInterceptor(UnaryServerInterceptor):
    """Maps the project's errors to status codes in one place.

    An `InklingError` becomes its status with the error's message (safe to log by
    construction); anything else is logged with its traceback and answered INTERNAL
    without details, so a bug never leaks internals to a caller nor kills the process.
    A payload that does not decode as the method's request message is answered
    INVALID_ARGUMENT naming the message (grpc would answer UNKNOWN and log a traceback
    per call). Refusals and failures are counted (``inkling.rpc.refused{reason}``) and
    logged in bounded volume (`SampledLog`): a flood of bad calls writes a line a minute.
    """

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self._log = SampledLog(log, every_s)

    def deserializer(
        self, inner: Deserializer | None, details: grpc.HandlerCallDetails
    ) -> Deserializer | None:
        if inner is None:
            return None
        owner = getattr(inner, "__self__", None)  # the message class of `Message.FromString`
        descriptor = getattr(owner, "DESCRIPTOR", None)
        name = getattr(descriptor, "full_name", "request")

        def safe(data: bytes) -> Any:
            try:
                return inner(data)
            except Exception as e:  # DecodeError, or whatever malformed bytes raise
                return Undecodable(name, type(e).__name__)

        return safe

    def wrap(self, inner: Behavior, details: grpc.HandlerCallDetails) -> Behavior:
        method = details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                RPC_REFUSED.add(1, {"rpc.method": method, "reason": "undecodable"})
                self._log.log(
                    f"undecodable {method}",
                    logging.WARNING,
                    f"refused {method}: the payload is not a valid {request.message} "
                    f"({request.error})",
                )
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {request.message} message",
                )
            try:
                return await inner(request, context)
            except InklingError as error:
                if isinstance(error, OverloadedError):
                    millis = str(int(error.retry_after_s * 1000))
                    context.set_trailing_metadata(((RETRY_AFTER_KEY, millis),))
                await context.abort(status_for(error), str(error))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                RPC_REFUSED.add(1, {"rpc.method": method, "reason": "internal"})
                self._log.log(
                    f"internal {method}",
                    logging.ERROR,
                    f"unhandled error in {method}",
                    exc_info=True,
                )
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")

        return guarded


class Deadline:
    """The time a call has left, from the caller's deadline capped by our own default.

    Budgets for downstream calls and stages come out of it, so a caller's deadline
    propagates: a stage never waits longer than the caller will.
    """

    def __init__(self, seconds: float) -> None:
        self._expires = time.monotonic() + seconds

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext | None, default_s: float) -> Deadline:
        remaining = context.time_remaining() if context is not None else None
        return cls(default_s if remaining is None else min(remaining, default_s))

    def remaining(self) -> float:
        return max(0.0, self._expires - time.monotonic())

    def budget(self, stage_s: float, reserve_s: float = 0.0) -> float:
        """At most `stage_s`, leaving `reserve_s` for the stages after this one."""
        return max(0.0, min(stage_s, self.remaining() - reserve_s))


class App(Protocol):
    """One server process: its services and its loading."""

    @property
    def service_names(self) -> Sequence[str]:
        """Full names of the gRPC services the app registers (for health and reflection)."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicers to the server."""

    async def start(self) -> None:
        """Load features, index and model; raise to refuse to serve."""

    async def close(self) -> None:
        """Release what start() took."""


class DeferredServicer:
    """A process's servicer from the moment it binds until its app has loaded.

    `serve()` registers servicers before `App.start()` so that the health service
    answers while the app loads. Registered in the real servicer's place, this gate
    answers every unary RPC of `service` with UNAVAILABLE ("`what` is still loading")
    while `ready()` returns None; from the first call at which `ready()` returns a
    servicer, it forwards every call to that servicer (asked for once, then kept).

    Args:
        service: the gRPC service's descriptor; its methods are the RPCs forwarded.
        ready: the app's servicer once it has loaded, None before.
        what: the process, as the UNAVAILABLE message names it.
    """

    def __init__(
        self, service: ServiceDescriptor, ready: Callable[[], object | None], what: str
    ) -> None:
        self._methods = frozenset(m.name for m in service.methods)
        self._ready = ready
        self._what = what
        self._servicer: object | None = None

    async def _target(self, context: grpc.aio.ServicerContext) -> object:
        if self._servicer is None:
            servicer = self._ready()
            if servicer is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._what} is still loading")
            self._servicer = servicer
        return self._servicer

    def __getattr__(self, name: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        # The generated add_*Servicer_to_server looks each RPC up once, at registration.
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(name)

        async def forward(request: Any, context: grpc.aio.ServicerContext) -> Any:
            servicer = await self._target(context)
            return await getattr(servicer, name)(request, context)

        forward.__name__ = name
        return forward


@dataclass
class Running:
    """A started server: its bound port and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    app: App
    grace_s: float

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.app.service_names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within the grace."""
        await self.set_serving(False)
        await self.server.stop(self.grace_s)
        await self.app.close()


async def start_server(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    grace_s: float = 10.0,
    reuse_port: bool = False,
    max_message_bytes: int = 16 * 1024 * 1024,
    max_concurrent_rpcs: int = 1_000,
    max_streams_per_connection: int = 256,
    on_bound: Callable[[int], None] | None = None,
    security: SecuritySettings | None = None,
) -> Running:
    """Bind, start answering health checks (NOT_SERVING), load the app, then SERVING.

    Port 0 binds a free port (tests); `reuse_port` lets worker processes share one.
    Limits: a message over `max_message_bytes` either way is RESOURCE_EXHAUSTED (the
    largest legal request, 10,000 excluded ids of up to 256 characters, is under 3 MiB);
    past `max_concurrent_rpcs` calls in flight a new one is RESOURCE_EXHAUSTED rather
    than queued without bound (a server answers in milliseconds: 1,000 in flight is a
    flood, not load); a connection opens at most `max_streams_per_connection` at once.
    `security`: TLS and the callers' allow-list (`inkling.serving.security`); None is
    plaintext with every caller admitted.
    """
    security = security or SecuritySettings()
    # Telemetry outermost: its span and duration include the refusals and the error
    # mapping; callers are checked before a request is decoded or handled.
    interceptors: list[grpc.aio.ServerInterceptor] = [ServerTelemetry()]
    if security.identifies:
        interceptors.append(AuthInterceptor(security))
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_concurrent_streams", max_streams_per_connection),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    app.register(server)
    reflection.enable_server_reflection(
        (
            *app.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        address = f"{host}:{port}"
        if security.tls:
            bound = server.add_secure_port(address, server_credentials(security))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {e}") from e
    running = Running(server, bound, health, app, grace_s)
    await running.set_serving(False)
    await server.start()
    if on_bound is not None:
        on_bound(bound)
    try:
        await app.start()
    except BaseException:
        await server.stop(0)
        raise
    # What start() loaded lives as long as the process: keep it out of the collector's
    # full passes, which otherwise walk Feast's and the snapshot's objects (~170 ms).
    gc.collect()
    gc.freeze()
    await running.set_serving(True)
    return running


async def serve(
    app: App,
    *,
    host: str,
    port: int,
    grace_s: float,
    reuse_port: bool = False,
    on_ready: Callable[[Running], None] | None = None,
    security: SecuritySettings | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(
        app, host=host, port=port, grace_s=grace_s, reuse_port=reuse_port, security=security
    )
    if on_ready is not None:
        on_ready(running)
    await stop.wait()
    log.info("stopping: draining in-flight calls (grace %.1fs)", grace_s)
    await running.stop()


def run_workers(argv: Sequence[str], workers: int, grace_s: float) -> int:
    """Start `workers` copies of this process's server sharing one port (SO_REUSEPORT).

    `argv` is the command line of one worker; worker i also gets `INKLING_WORKER_INDEX=i`
    (its metrics port is the base port + i). SIGTERM/SIGINT are forwarded; the exit
    status is the first non-zero one of the workers.
    """
    if workers < 1:
        raise ConfigurationError(f"workers must be at least 1, got {workers}")
    children = [
        subprocess.Popen([sys.executable, *argv], env={**os.environ, WORKER_INDEX_ENV: str(i)})
        for i in range(workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for child in children:
        try:
            codes.append(child.wait())
        except KeyboardInterrupt:
            forward(signal.SIGTERM, None)
            codes.append(child.wait(timeout=grace_s + 5))
    failed = [c for c in codes if c]
    return failed[0] if failed else 0


def worker_count(requested: int) -> int:
    """`--workers 0` means one per core this process may use."""
    return requested if requested > 0 else len(os.sched_getaffinity(0))
