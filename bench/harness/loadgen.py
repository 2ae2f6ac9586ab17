"""Open-loop load generator: the client every benchmark drives its servers with.

Every latency number the project quotes comes from here. Load is open-loop:
request ``i`` is due at ``t0 + i / rate`` whether or not earlier requests have
answered, and its latency is measured from that due time, so a slow server
cannot hide its queueing by slowing the client down (no coordinated omission).
Traffic is bounded in count (at most ``MAX_REQUESTS`` per run) and in time
(scheduling stops after ``warmup_s + duration_s``; in-flight requests get at
most ``drain_timeout_s`` more).

Run the gRPC health-check baseline from the command line::

    python -m bench.harness.loadgen --rates 100,500,1000 --duration 3 --out /tmp/health-bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.harness.processes import server_in_child
from bench.harness.report import machine_info, markdown_table, write_report
from inkling.errors import InvalidInputError

MAX_REQUESTS = 1_000_000
"""Upper bound on warm-up plus measured requests in one run."""

OK = "OK"
DROPPED = "DROPPED_CLIENT_SIDE"
"""Due while ``max_in_flight`` requests were outstanding, so never sent."""
UNFINISHED = "UNFINISHED_CLIENT_SIDE"
"""Sent, but still in flight when the drain cap ran out; cancelled."""

SUSTAINED_TOLERANCE = 0.05

Call = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class LoadResult:
    """One scenario's outcome; latency fields are over successful requests only.

    ``count`` is the number of measured requests that fell due (warm-up
    excluded); every one of them is either in ``ok`` or in ``errors``.
    Latency is measured from the due time, service time from the actual send.
    Percentiles are nearest-rank; they are NaN when nothing succeeded.
    """

    name: str
    target_rate: float
    duration_s: float
    warmup_s: float
    max_in_flight: int
    count: int
    ok: int
    errors: dict[str, int]
    send_rate: float
    """Measured requests actually sent per second, from the first due time to the last send."""
    throughput: float
    """OK completions per second between the first and the last measured OK completion
    (plus one send interval), at most the target rate: a backlog draining in a burst
    does not count as extra capacity."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    service_p50_ms: float
    service_p99_ms: float
    send_lag_p99_ms: float
    """Client-side delay between due time and send (timer granularity, a busy loop)."""
    sustained: bool
    """Send rate and throughput within 5 % of target, nothing dropped or left unfinished
    client-side; errors lower throughput, so more than 5 % of them fail it too."""
    started_at: str
    finished_at: str
    latencies_ms: np.ndarray = field(repr=False, compare=False)
    """Per-request latency of successful requests, for plotting; not serialized."""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """Every field except the raw latency array, NaN written as None."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name == "latencies_ms":
                continue
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[name] = value
        return out


def _validate(
    rate: float, duration_s: float, warmup_s: float, max_in_flight: int, drain_timeout_s: float
) -> tuple[int, int]:
    """Return (warm-up count, measured count) or raise InvalidInputError."""
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidInputError(f"rate must be a positive finite number, got {rate!r}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise InvalidInputError(f"duration_s must be a positive finite number, got {duration_s!r}")
    if not (math.isfinite(warmup_s) and warmup_s >= 0):
        raise InvalidInputError(f"warmup_s must be a finite number >= 0, got {warmup_s!r}")
    if not (math.isfinite(drain_timeout_s) and drain_timeout_s >= 0):
        raise InvalidInputError(
            f"drain_timeout_s must be a finite number >= 0, got {drain_timeout_s!r}"
        )
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise InvalidInputError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
    if rate * (duration_s + warmup_s) > MAX_REQUESTS:
        raise InvalidInputError(
            f"rate * (duration_s + warmup_s) = {rate * (duration_s + warmup_s):.0f} requests "
            f"exceeds the bound of {MAX_REQUESTS}"
        )
    measured = round(rate * duration_s)
    if measured < 1:
        raise InvalidInputError(
            f"rate * duration_s = {rate * duration_s:.3f} schedules no request; need at least one"
        )
    return round(rate * warmup_s), measured


def _percentile(values: np.ndarray, q: float) -> float:
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, q, method="inverted_cdf"))


def _status_of(exc: BaseException) -> str:
    """Name a failed call: the gRPC status code where there is one, else the exception type."""
    if isinstance(exc, grpc.RpcError):  # grpc.aio.AioRpcError included
        code = getattr(exc, "code", None)
        if callable(code):
            status = code()
            if isinstance(status, grpc.StatusCode):
                return status.name
    return type(exc).__name__


async def run_open_loop(
    call: Call,
    *,
    rate: float,
    duration_s: float,
    max_in_flight: int = 1000,
    warmup_s: float = 1.0,
    drain_timeout_s: float = 5.0,
    name: str,
) -> LoadResult:
    """Drive ``call`` open-loop at ``rate`` per second and summarize the measured window.

    ``call`` returns ``"OK"`` or a status name; an exception is counted under its
    gRPC status code name or its type name. Warm-up requests (the first
    ``warmup_s``) are sent on the same schedule but left out of every number.

    Raises:
        InvalidInputError: a non-positive rate or duration, or more than
            ``MAX_REQUESTS`` requests in all.
    """
    n_warm, n_measured = _validate(rate, duration_s, warmup_s, max_in_flight, drain_timeout_s)
    total = n_warm + n_measured
    interval = 1.0 / rate
    due = np.full(n_measured, math.nan)
    sent = np.full(n_measured, math.nan)
    done = np.full(n_measured, math.nan)
    statuses: list[str | None] = [None] * n_measured
    in_flight: set[asyncio.Task[None]] = set()

    async def one(j: int) -> None:
        """Send one request; ``j`` < 0 marks a warm-up request, whose result is discarded."""
        started = time.perf_counter()
        if j >= 0:
            sent[j] = started
        try:
            status = str(await call())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled by the drain cap: counted as UNFINISHED below
            status = "CANCELLED"
        except Exception as exc:
            status = _status_of(exc)
        finished = time.perf_counter()
        if j >= 0:
            done[j] = finished
            statuses[j] = status

    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        for i in range(total):
            when = t0 + i * interval
            # Sleeping even when late lets the requests already started run, so a late
            # scheduler catches up without piling every due request into the in-flight set.
            await asyncio.sleep(max(0.0, when - time.perf_counter()))
            j = i - n_warm
            if j >= 0:
                due[j] = when
            if len(in_flight) >= max_in_flight:
                if j >= 0:
                    statuses[j] = DROPPED
                continue
            task = asyncio.create_task(one(j))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=drain_timeout_s)
    finally:
        # Past the drain cap, or when the run itself is cancelled: leave nothing running.
        leftover = list(in_flight)
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
    finished_at = datetime.now(UTC)

    for j, status in enumerate(statuses):
        if status is None:
            statuses[j] = UNFINISHED
    counts = Counter(s for s in statuses if s is not None)
    ok_count = counts.pop(OK, 0)
    ok_mask = np.array([s == OK for s in statuses], dtype=bool)
    latencies_ms = (done[ok_mask] - due[ok_mask]) * 1e3
    service_ms = (done[ok_mask] - sent[ok_mask]) * 1e3
    was_sent = ~np.isnan(sent)
    lag_ms = (sent[was_sent] - due[was_sent]) * 1e3

    window_start = t0 + n_warm * interval
    last_send = float(np.nanmax(sent)) if was_sent.any() else window_start
    send_span = max(last_send - window_start + interval, interval)
    send_rate = int(was_sent.sum()) / send_span
    ok_done = done[ok_mask]
    throughput = 0.0
    if ok_count:
        # A server that keeps up returns completions as spaced as the sends, whatever its
        # latency; one that falls behind spreads them out, which lowers this number.
        span = float(ok_done.max() - ok_done.min()) + interval
        throughput = ok_count / max(span, ok_count * interval)

    floor = (1.0 - SUSTAINED_TOLERANCE) * rate
    sustained = (
        send_rate >= floor
        and throughput >= floor
        and counts.get(DROPPED, 0) == 0
        and counts.get(UNFINISHED, 0) == 0
    )
    return LoadResult(
        name=name,
        target_rate=float(rate),
        duration_s=float(duration_s),
        warmup_s=float(warmup_s),
        max_in_flight=max_in_flight,
        count=n_measured,
        ok=ok_count,
        errors=dict(sorted(counts.items())),
        send_rate=send_rate,
        throughput=throughput,
        p50_ms=_percentile(latencies_ms, 50),
        p95_ms=_percentile(latencies_ms, 95),
        p99_ms=_percentile(latencies_ms, 99),
        max_ms=float(latencies_ms.max()) if latencies_ms.size else math.nan,
        mean_ms=float(latencies_ms.mean()) if latencies_ms.size else math.nan,
        service_p50_ms=_percentile(service_ms, 50),
        service_p99_ms=_percentile(service_ms, 99),
        send_lag_p99_ms=_percentile(lag_ms, 99),
        sustained=sustained,
        started_at=started_at.isoformat(),
        finished_at=finished_at.isoformat(),
        latencies_ms=latencies_ms,
    )


def sync_call(fn: Callable[[], object]) -> Call:
    """Wrap a synchronous function as a call that succeeds unless ``fn`` raises.

    ``fn`` runs inline on the event loop and blocks it, so requests that fall due
    meanwhile wait: latency is service time plus the queueing of one server
    thread, which is what an in-process stage (a hydrator, a scorer) costs a
    single-threaded server.
    """

    async def call() -> str:
        fn()
        return OK

    return call


# --- gRPC health-check baseline ------------------------------------------------------------


async def start_health_server(
    host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int]:
    """Start a ``grpc.aio`` server with only the standard health service; return it and its port.

    Every service reports ``SERVING`` for the empty name; its cost is the floor
    that any RPC of the project pays, so benchmarks measure it alongside.
    """
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def health_check_call(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 5.0) -> Call:
    """A call of ``Health.Check`` that reports any status but ``SERVING`` by name."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def call() -> str:
        response = await stub.Check(request, timeout=timeout_s)
        if response.status == serving:
            return OK
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    return call


def _serve_health_in_child(conn: Connection, host: str) -> None:
    async def serve() -> None:
        server, port = await start_health_server(host)
        conn.send(port)
        await server.wait_for_termination()

    asyncio.run(serve())


async def _no_op() -> str:
    return OK


async def _bench_health(args: argparse.Namespace) -> list[LoadResult]:
    """At each rate: the harness floor (a no-op call), when asked, then ``Health.Check``."""
    results = []
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        scenarios: list[tuple[str, Call]] = [("health.Check", health_check_call(channel))]
        if args.floor:
            scenarios.insert(0, ("no-op (harness floor)", _no_op))
        for rate in args.rates:
            for label, call in scenarios:
                results.append(
                    await run_open_loop(
                        call,
                        rate=rate,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                        max_in_flight=args.max_in_flight,
                        name=f"{label} {rate:g}/s",
                    )
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Benchmark ``grpc.health.v1.Health/Check`` at each rate and write a report."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.harness.loadgen", description=main.__doc__
    )
    parser.add_argument(
        "--rates", default="100,500,1000", help="comma-separated requests per second"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per rate")
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument(
        "--target",
        help="host:port of a running server; by default a health server is started "
        "on 127.0.0.1 in a child process",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the no-op scenario that measures the load generator's own latency",
    )
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
    for rate in args.rates or [math.nan]:
        try:
            _validate(rate, args.duration, args.warmup, args.max_in_flight, 5.0)
        except InvalidInputError as exc:
            parser.error(str(exc))

    machine = machine_info()
    spawned = args.target is None
    with contextlib.ExitStack() as stack:
        if spawned:
            port = stack.enter_context(
                server_in_child(_serve_health_in_child, "127.0.0.1", start_timeout_s=30)
            )
            args.target = f"127.0.0.1:{port}"
        results = asyncio.run(_bench_health(args))
    config = {
        "target": args.target,
        "server": "child process" if spawned else "external",
        "rpc": "grpc.health.v1.Health/Check",
        "rates": args.rates,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_in_flight": args.max_in_flight,
        "harness_floor_measured": args.floor,
        "command": " ".join(["python -m bench.harness.loadgen", *(argv or sys.argv[1:])]),
    }
    notes = ["Client and server share this machine; one gRPC channel (one HTTP/2 connection)."]
    if args.floor:
        notes.append(
            "The no-op rows time an empty coroutine on the same schedule: the client's own "
            "latency floor (timer granularity, event-loop wake-ups), included in every row."
        )
    paths = write_report(
        results,
        args.out,
        title="gRPC health-check baseline",
        config=config,
        machine=machine,
        notes=notes,
    )
    print(markdown_table(results))
    print(f"\nreport: {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
