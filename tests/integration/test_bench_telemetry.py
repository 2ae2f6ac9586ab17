"""Spans exported over real OTLP/gRPC on loopback to the benchmark's counting sink: the
telemetry-cost benchmark's own parts (its modes, the sink), and a CLI batch job's span."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from bench.telemetry_cost import MODES, mode_env, parse_modes, span_sink
from inkling.config import PROJECT_ROOT
from inkling.errors import InvalidInputError
from inkling.telemetry.settings import load_telemetry_settings


def test_spans_exported_over_otlp_reach_the_sink():
    with span_sink() as (endpoint, sink):
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        tracer = provider.get_tracer("test")
        for i in range(7):
            with tracer.start_as_current_span(f"s{i}"):
                pass
        assert provider.force_flush(10_000)
        provider.shutdown()
        assert sink.spans == 7


def test_each_mode_sets_what_it_says_and_nothing_leaks_from_the_caller():
    envs = {mode: mode_env(mode, "http://127.0.0.1:4317") for mode in MODES}
    assert envs["off"] == {"OTEL_SDK_DISABLED": "true"}
    ratios = {m: load_telemetry_settings(None, environ=envs[m]).trace_ratio for m in MODES[1:]}
    assert ratios == {"metrics": 0.0, "default": 0.01, "full": 1.0}
    assert envs["metrics"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    assert envs["full"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"
    assert all(envs[m]["OTEL_TRACES_SAMPLER"] == "" for m in MODES[1:])


@pytest.mark.parametrize("text", ["", "off,loud", "off,off", " , "])
def test_bad_mode_lists_are_refused_by_name(text):
    with pytest.raises(InvalidInputError, match="--telemetry takes distinct modes"):
        parse_modes(text)


def test_mode_lists_keep_their_order():
    assert parse_modes("off, full,metrics") == ["off", "full", "metrics"]


def test_a_cli_batch_job_is_one_span_sent_to_the_configured_collector(tmp_path):
    """`inkling generate` (a traced batch job) run as a user runs it, with the endpoint in
    the settings file: its span reaches the collector."""
    with span_sink() as (endpoint, sink):
        config = tmp_path / "inkling.toml"
        config.write_text(f'[telemetry]\notlp_endpoint = "{endpoint}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "INKLING_"))}
        done = subprocess.run(
            [sys.executable, "-m", "inkling.cli", "--config", str(config),
             "--data-dir", str(tmp_path / "data"), "generate",
             "--users", "20", "--items", "30", "--sessions", "40", "--days", "1"],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sink.spans == 1
