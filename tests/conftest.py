"""Shared fixtures: real parts only (a redis-server process, local Spark, a temporary
copy of the Feast repository)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inkling.config import PROJECT_ROOT, Settings, load_settings
from inkling.redis_embedded import EmbeddedRedis

DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"


def dataset(relative: str) -> Path:
    path = DATASETS / relative
    if not path.exists():
        pytest.skip(
            f"shared dataset {path} is absent (expected ../shared/datasets beside the project)"
        )
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from batch.spark import build_session

    session = build_session("local[2]", {"spark.driver.memory": "2g"}, "inkling-tests")
    yield session
    session.stop()


def temp_settings(
    root: Path, online_store: str = "redis", redis_address: str | None = None
) -> Settings:
    """Settings over a fresh data dir and a temporary copy of feature_repo/."""
    repo = root / "feature_repo"
    if not repo.exists():
        shutil.copytree(
            PROJECT_ROOT / "feature_repo",
            repo,
            ignore=shutil.ignore_patterns("__pycache__", "data"),
        )
    return load_settings(
        overrides={
            "data_dir": root / "data",
            "feature_repo": repo,
            "online_store": online_store,
            "redis_address": redis_address,
        },
        environ={},
    )


@dataclass
class OtelCapture:
    """This test process's telemetry: finished spans and metrics, in memory."""

    telemetry: Any
    spans: Any
    """An `InMemorySpanExporter`: `get_finished_spans()`, `clear()`."""
    metrics: Any
    """An `InMemoryMetricReader`: `get_metrics_data()`."""

    def points(self, name: str) -> list[Any]:
        """Every data point of metric `name` collected now."""
        data = self.metrics.get_metrics_data()
        return [
            point
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture(scope="session", autouse=True)
def otel() -> Iterator[OtelCapture]:
    """OpenTelemetry for this pytest process, configured once as a server configures it
    (default sampler, Prometheus endpoint on a free port), plus in-memory exporters.
    Autouse: configured before any test starts a server, so no measurement is lost to
    the API's no-op default and every test runs the instrumented code."""
    from opentelemetry import trace
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inkling.redis_embedded import free_port
    from inkling.telemetry import providers

    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = providers.configure(
        "ranking",
        metrics_port=free_port(),
        environ={},
        span_exporter=spans,
        metric_readers=[reader],
    )
    if trace.get_tracer_provider() is not telemetry.tracer_provider:
        raise RuntimeError("another tracer provider was set in this process before the fixture")
    yield OtelCapture(telemetry, spans, reader)
    telemetry.shutdown()
