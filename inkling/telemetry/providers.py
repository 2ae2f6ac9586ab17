"""One telemetry set-up per process: tracer and meter providers, sampler, exporters.

Standard variables are honoured as the OpenTelemetry SDK defines them:
`OTEL_SDK_DISABLED=true` turns everything off; `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` override the resource; `OTEL_TRACES_SAMPLER` /
`OTEL_TRACES_SAMPLER_ARG` choose the sampler; `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) sends traces over OTLP/gRPC. Below them come
the `[telemetry]` table of the settings file (`inkling.telemetry.settings`: switch,
trace ratio, OTLP endpoint, metrics port), then these defaults:

- traces are sampled parent-based at `DEFAULT_TRACE_RATIO` (a caller's sampled trace
  is always continued), and always for a request that asks for debug output (its server
  span carries `inkling.debug`) and for a worker batch that holds an event whose ingest
  was sampled (its span links to that ingest span); they are exported only when an
  endpoint is set;
- metrics are always on and served for Prometheus on `/metrics` at the process's
  metrics port (`DEFAULT_METRICS_PORTS`; 0 disables the endpoint). A process started
  with `--workers N` gives worker i the port `base + METRICS_PORT_STRIDE * i`, so each
  is scraped as its own target (the Prometheus exporter keeps one registry per
  process); the stride keeps the roles' port series apart on one host (ranking's
  second worker is 9472, never events' 9463). When the default
  port is taken (several workers on one host), a free port is used and logged.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
    _get_from_env_or_default,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from inkling.errors import ConfigurationError
from inkling.telemetry.settings import TelemetrySettings

log = logging.getLogger(__name__)

SERVICE_NAMES = {
    "retrieval": "inkling-retrieval",
    "ranking": "inkling-ranking",
    "events": "inkling-events",
    "worker": "inkling-worker",
    "cli": "inkling-cli",
}
DEFAULT_METRICS_PORTS = {"retrieval": 9461, "ranking": 9462, "events": 9463, "worker": 9464}
METRICS_PORT_STRIDE = 10
"""Worker i of a `--workers N` process serves its metrics on `base + 10 * i`."""
DEFAULT_TRACE_RATIO = TelemetrySettings.trace_ratio
DEBUG_ATTRIBUTE = "inkling.debug"


class InklingSampler(Sampler):
    """Samples every span started with `inkling.debug` true, and every span that links
    to a sampled span (a worker batch holding a traced event); asks `delegate` otherwise.
    """

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if attributes and attributes.get(DEBUG_ATTRIBUTE):
            parent = trace.get_current_span(parent_context).get_span_context()
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state)
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"Inkling{{debug,linked,{self._delegate.get_description()}}}"


@dataclass
class Telemetry:
    """The configured providers of this process, and where its metrics are served; as a
    context manager, shut down when the block ends."""

    service_name: str
    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    metrics_address: str | None = None
    """`host:port` of the `/metrics` endpoint; None when there is none."""
    _closers: list[Any] = field(default_factory=list)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Flush and stop the exporters (spans still queued are sent)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        for close in self._closers:
            close()


def _package_version() -> str:
    try:
        return version("inkling")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _sampler(environ: Mapping[str, str], ratio: float) -> Sampler:
    if environ.get("OTEL_TRACES_SAMPLER"):
        return InklingSampler(_get_from_env_or_default())
    return InklingSampler(ParentBased(TraceIdRatioBased(ratio)))


def _otlp_exporter(environ: Mapping[str, str], endpoint: str) -> SpanExporter | None:
    from_env = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not (from_env or endpoint):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    if from_env:
        return OTLPSpanExporter()  # reads the endpoint, headers and TLS settings from OTEL_*
    return OTLPSpanExporter(endpoint=endpoint)  # an http:// endpoint is plaintext


def _serve_metrics(host: str, port: int, strict: bool) -> tuple[Any, int]:
    from prometheus_client import REGISTRY, start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        if strict:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {e} (set --metrics-port; 0 for none)"
            ) from e
        log.warning(
            "metrics port %s:%d is taken (%s): serving on a free port instead", host, port, e
        )
        server, _ = start_http_server(0, addr=host, registry=REGISTRY)
    return server, int(server.server_port)


def configure(
    role: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    worker_index: int | None = None,
    environ: Mapping[str, str] | None = None,
    settings: TelemetrySettings | None = None,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Set this process's global tracer and meter providers for `role`.

    Args:
        role: retrieval, ranking, events, worker or cli: names the service.
        metrics_port: where `/metrics` is served, 0 for nowhere; None for the settings'
            port, else the role's default, or a free port when the default is taken
            (several workers on a host). An explicit port that is taken refuses to start.
        metrics_host: the address the endpoint binds; None: the settings' host, else
            loopback.
        worker_index: i for worker i of a `--workers N` process: its port is the
            base + `METRICS_PORT_STRIDE` * i.
        environ: the `OTEL_*` variables (default: the process environment).
        settings: the `[telemetry]` table (default: its defaults); `OTEL_*` wins.
        span_exporter: an extra exporter, every span sent at once (tests use the SDK's
            in-memory exporter).
        metric_readers: extra metric readers (tests use the SDK's in-memory reader).
    """
    env = os.environ if environ is None else environ
    ts = settings or TelemetrySettings()
    if role not in SERVICE_NAMES:
        raise ConfigurationError(f"unknown telemetry role {role!r}")
    service_name = env.get("OTEL_SERVICE_NAME") or SERVICE_NAMES[role]
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or not ts.enabled:
        return Telemetry(service_name, None, None)
    resource = Resource.create(
        {
            "service.name": SERVICE_NAMES[role],
            "service.version": _package_version(),
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        }
    )  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME are merged in by Resource.create
    tracer_provider = TracerProvider(resource=resource, sampler=_sampler(env, ts.trace_ratio))
    exporter = _otlp_exporter(env, ts.otlp_endpoint)
    if exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))

    readers = list(metric_readers)
    telemetry = Telemetry(service_name, tracer_provider, None)
    if metrics_port is None:
        metrics_port = ts.metrics_port
    host = metrics_host or ts.metrics_host or "127.0.0.1"
    base = DEFAULT_METRICS_PORTS.get(role, 0) if metrics_port is None else metrics_port
    if base:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
        port = base + METRICS_PORT_STRIDE * (worker_index or 0)
        server, bound = _serve_metrics(host, port, strict=metrics_port is not None)
        telemetry.metrics_address = f"{host}:{bound}"
        telemetry._closers.append(server.shutdown)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    telemetry.meter_provider = meter_provider
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    if telemetry.metrics_address:
        log.info("metrics for Prometheus at http://%s/metrics", telemetry.metrics_address)
    return telemetry
