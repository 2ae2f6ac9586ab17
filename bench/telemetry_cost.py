"""`inkling bench serving --telemetry off,metrics,default,full`: what telemetry costs.

For each mode both servers restart with that telemetry, and the two requests the
latency budget is about, `RankCandidates(500)` and `Recommend` (top 20 of 1,000),
run open-loop at one rate. The modes take turns over `rounds` rounds, each round
starting one mode later than the one before, so that a machine that drifts or has
periodic noise (these are shared) hits every mode alike; the table gives medians over
the rounds and the range of the p99s.

| mode    | the servers' telemetry                                                       |
| ------- | ---------------------------------------------------------------------------- |
| off     | `OTEL_SDK_DISABLED=true`: no providers, every span and measurement a no-op    |
| metrics | metrics on `/metrics`; `trace_ratio` 0, so spans are created but not recorded |
| default | as deployed: metrics, and 1 % of requests traced and exported over OTLP       |
| full    | metrics, and every request traced and exported over OTLP                      |

Traces go to a span sink on loopback (an OTLP/gRPC `TraceService` in this process
that counts what it receives), so export is paid as in production; while a mode with
metrics runs, this process scrapes both servers' `/metrics` every 5 s, as Prometheus
would. Measured per mode and request: latency percentiles, and both servers' CPU
seconds per request (from `/proc`), which bounds what a CPU-bound host sustains:
requests/s <= cores / CPU seconds per request.

`python -m bench.telemetry_cost` prints what each telemetry call costs (CPU µs per
histogram record, counter add, unsampled span, sampled and exported span), the parts a
request's overhead is the sum of.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import sys
import threading
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.harness.loadgen import LoadResult, run_open_loop
from bench.harness.processes import cpu_seconds, server_process, wait_serving
from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.redis_embedded import free_port
from inkling.v1 import ranking_service_pb2_grpc

MODES = ("off", "metrics", "default", "full")
SCENARIOS = ("rank_500", "recommend_20")
SCRAPE_INTERVAL_S = 5.0


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_modes(text: str) -> list[str]:
    """`off,metrics,...` as a list; an unknown or repeated mode is refused by name."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise InvalidInputError(
            f"--telemetry takes distinct modes from {', '.join(MODES)}; got {text!r}"
        )
    return modes


class _SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts the spans it is sent and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def span_sink() -> Iterator[tuple[str, _SpanSink]]:
    """The sink on a free loopback port: (its OTLP endpoint URL, the sink)."""
    sink = _SpanSink()
    server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp-sink"))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        server.stop(grace=1)


def mode_env(mode: str, endpoint: str) -> dict[str, str]:
    """The servers' environment for `mode` (set in full, so the caller's own `OTEL_*`
    variables cannot leak into a mode)."""
    off = {"OTEL_SDK_DISABLED": "true"}
    on = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_SAMPLER": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    return {
        "off": off,
        "metrics": {**on, "OTEL_EXPORTER_OTLP_ENDPOINT": "", "INKLING_TELEMETRY_TRACE_RATIO": "0"},
        "default": {**on, "INKLING_TELEMETRY_TRACE_RATIO": "0.01"},
        "full": {**on, "INKLING_TELEMETRY_TRACE_RATIO": "1"},
    }[mode]


@contextlib.contextmanager
def _scraping(addresses: Sequence[str]) -> Iterator[None]:
    """Fetch every address's `/metrics` each `SCRAPE_INTERVAL_S` until the block ends."""
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(SCRAPE_INTERVAL_S):
            for address in addresses:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply,
                ):
                    reply.read()

    thread = threading.Thread(target=scrape, name="scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@dataclass(frozen=True)
class ModeRun:
    """One scenario under one mode in one round."""

    mode: str
    round: int
    load: LoadResult
    cpu_s: float
    """Both servers' CPU seconds over the scenario, warm-up included."""
    requests: int
    """Requests sent over the same window."""
    spans: int
    """Spans the sink received while the mode ran (all its scenarios)."""

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / max(self.requests, 1)


def _run_mode(
    live: Settings,
    mode: str,
    round_: int,
    endpoint: str,
    sink: _SpanSink,
    rate: float,
    duration_s: float,
    seed: int,
) -> list[ModeRun]:
    from bench.servers import Workload

    env = mode_env(mode, endpoint)
    retrieval_port, ranking_port = free_port(), free_port()
    metrics = {"retrieval": 0, "ranking": 0} if mode == "off" else {
        "retrieval": free_port(), "ranking": free_port(),
    }  # fmt: skip
    spans_before = sink.spans
    with (
        server_process("retrieval", live, retrieval_port,
                       "--metrics-port", str(metrics["retrieval"]), env=env) as retrieval,
        server_process("ranking", live, ranking_port,
                       "--retrieval-address", f"127.0.0.1:{retrieval_port}",
                       "--metrics-port", str(metrics["ranking"]), env=env) as ranking,
        _scraping([f"127.0.0.1:{p}" for p in metrics.values() if p]),
    ):  # fmt: skip
        asyncio.run(wait_serving(retrieval_port))
        asyncio.run(wait_serving(ranking_port))
        work = Workload(live, seed + round_)
        pids = (retrieval.pid, ranking.pid)

        async def drive() -> list[tuple[LoadResult, float, int]]:
            out = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ranking_port}") as channel:
                stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
                calls = {"rank_500": work.rank(stub, 500), "recommend_20": work.recommend(stub)}
                # Warm both paths (first calls load lazily), outside every measurement.
                await run_open_loop(calls["recommend_20"], rate=rate, duration_s=2, name="warm")
                for name in SCENARIOS:
                    before = sum(cpu_seconds(p) for p in pids)
                    load = await run_open_loop(
                        calls[name], rate=rate, duration_s=duration_s, name=f"{mode}/{name}"
                    )
                    used = sum(cpu_seconds(p) for p in pids) - before
                    sent = load.count + round(rate * load.warmup_s)
                    out.append((load, used, sent))
            return out

        measured = asyncio.run(drive())
    spans = sink.spans - spans_before  # the servers flushed their spans as they stopped
    return [ModeRun(mode, round_, load, cpu, sent, spans) for load, cpu, sent in measured]


def run_telemetry_cost(
    live: Settings,
    modes: Sequence[str],
    *,
    rate: float,
    duration_s: float,
    rounds: int,
    seed: int = 0,
) -> list[ModeRun]:
    """Every mode, `rounds` times over, taking turns; servers restarted for each."""
    if rounds < 1:
        raise InvalidInputError(f"--rounds must be at least 1, got {rounds}")
    runs: list[ModeRun] = []
    with span_sink() as (endpoint, sink):
        for round_ in range(rounds):
            shift = round_ % len(modes)
            for mode in [*modes[shift:], *modes[:shift]]:
                _progress(f"telemetry {mode}, round {round_ + 1} of {rounds}")
                runs += _run_mode(live, mode, round_, endpoint, sink, rate, duration_s, seed)
    return runs


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def overhead_table(runs: Sequence[ModeRun], cores: int) -> str:
    """Markdown: per scenario and mode, the medians over rounds and the change from the
    first mode given (the baseline, `off` when it was run)."""
    modes = list(dict.fromkeys(r.mode for r in runs))
    baseline = modes[0]
    lines = [
        f"| scenario | telemetry | p50 ms | p99 ms | p99 range | p99 vs {baseline} "
        f"| server CPU ms/req | CPU vs {baseline} | rate bound ({cores} cores) "
        "| spans exported | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        by_mode: Mapping[str, list[ModeRun]] = {
            m: [r for r in runs if r.mode == m and r.load.name.endswith(scenario)] for m in modes
        }
        base_p99 = _median([r.load.p99_ms for r in by_mode[baseline]])
        base_cpu = _median([r.cpu_ms_per_request for r in by_mode[baseline]])
        for mode in modes:
            rs = by_mode[mode]
            p50 = _median([r.load.p50_ms for r in rs])
            p99s = [r.load.p99_ms for r in rs]
            p99 = _median(p99s)
            cpu = _median([r.cpu_ms_per_request for r in rs])
            spans = sum(r.spans for r in rs)  # each run carries its mode-round's total
            errors = sum(r.load.error_count for r in rs)
            lines.append(
                f"| {scenario} | {mode} | {p50:.2f} | {p99:.2f} "
                f"| {min(p99s, default=math.nan):.0f}-{max(p99s, default=math.nan):.0f} "
                f"| {p99 / base_p99 - 1:+.1%} "
                f"| {cpu:.2f} | {cpu / base_cpu - 1:+.1%} | {cores * 1000 / cpu:,.0f}/s "
                f"| {spans:,} | {errors} |"
            )
    return "\n".join(lines)


def operation_costs(n: int = 100_000) -> dict[str, float]:
    """Process CPU µs of each telemetry call a request makes, on this process's own
    providers (Prometheus reader; OTLP export to the sink): what the per-request cost is
    made of. Sets this process's global meter provider."""
    import time

    from opentelemetry import metrics
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    from inkling.telemetry.instruments import DEGRADED, EVENT_FRESHNESS, STAGE_DURATION

    def per_call(fn: Any, count: int) -> float:
        fn()
        began = time.process_time()
        for _ in range(count):
            fn()
        return (time.process_time() - began) / count * 1e6

    unsampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0))).get_tracer("cost")

    def span_unsampled() -> None:
        with unsampled.start_as_current_span("stage"):
            pass

    costs = {
        "histogram record, 1 attribute": per_call(
            lambda: STAGE_DURATION.record(0.003, {"stage": "hydrate"}), n
        ),
        "histogram record, no attribute": per_call(lambda: EVENT_FRESHNESS.record(0.003), n),
        "counter add, 2 attributes": per_call(
            lambda: DEGRADED.add(1, {"reason": "r", "operation": "recommend"}), n
        ),
        "span, not sampled": per_call(span_unsampled, n),
    }
    with span_sink() as (endpoint, _):
        provider = TracerProvider(sampler=ALWAYS_ON)
        # A queue as large as the burst, so that no span is dropped unmeasured.
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), max_queue_size=n // 4 + 1)
        )
        sampled = provider.get_tracer("cost")

        def span_sampled() -> None:
            with sampled.start_as_current_span("stage", attributes={"inkling.candidates": 500}):
                pass

        began = time.process_time()
        for _ in range(n // 4):
            span_sampled()
        provider.force_flush(60_000)
        costs["span, sampled and exported (OTLP, sink in process)"] = (
            (time.process_time() - began) / (n // 4) * 1e6
        )
        provider.shutdown()
    return costs


if __name__ == "__main__":
    for name, micros in operation_costs().items():
        print(f"{name:55s} {micros:6.2f} µs")
