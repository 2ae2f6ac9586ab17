"""The telemetry set-up's own rules: the sampler, trace context on the bus, configuration."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from inkling.errors import ConfigurationError
from inkling.telemetry import providers
from inkling.telemetry.context import links_to, sampled_traceparent
from inkling.telemetry.settings import TelemetrySettings, load_telemetry_settings

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7


def context(sampled: bool, span_id: int = SPAN) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(TRACE, span_id, is_remote=True, trace_flags=flags)


def decide(**kwargs) -> Decision:
    sampler = providers.InklingSampler(ALWAYS_OFF)
    return sampler.should_sample(None, TRACE, "x", **kwargs).decision


def test_the_sampler_keeps_debug_requests_and_batches_linked_to_a_sampled_span():
    assert decide(attributes={providers.DEBUG_ATTRIBUTE: True}) == Decision.RECORD_AND_SAMPLE
    assert decide(links=[Link(context(False)), Link(context(True))]) == Decision.RECORD_AND_SAMPLE
    assert decide(links=[Link(context(False))]) == Decision.DROP  # the delegate decides
    assert decide(attributes={providers.DEBUG_ATTRIBUTE: False}) == Decision.DROP
    assert decide() == Decision.DROP


def test_only_a_sampled_context_is_carried_on_the_bus():
    assert sampled_traceparent() == ""  # no span at all
    with trace.use_span(NonRecordingSpan(context(False))):
        assert sampled_traceparent() == ""
    with trace.use_span(NonRecordingSpan(context(True))):
        assert sampled_traceparent() == f"00-{TRACE:032x}-{SPAN:016x}-01"


def test_links_are_distinct_valid_and_bounded():
    good = f"00-{TRACE:032x}-{SPAN:016x}-01"
    other = f"00-{TRACE:032x}-{SPAN + 1:016x}-01"
    values: list[str | bytes] = [good, good.encode(), "garbage", b"00-zz-zz-01", "", other, good]
    links = links_to(values)
    assert [link.context.span_id for link in links] == [SPAN, SPAN + 1]
    assert all(link.context.trace_flags.sampled for link in links)
    many = [f"00-{TRACE:032x}-{SPAN + i:016x}-01" for i in range(100)]
    assert len(links_to(many, limit=5)) == 5


def test_configuration_names_the_service_and_can_be_switched_off():
    off = providers.configure("worker", environ={"OTEL_SDK_DISABLED": "true"})
    assert off.tracer_provider is None and off.meter_provider is None
    assert off.service_name == "inkling-worker" and off.metrics_address is None
    with pytest.raises(ConfigurationError, match="unknown telemetry role 'nope'"):
        providers.configure("nope", environ={})


def test_the_settings_file_configures_telemetry_and_otel_variables_win(tmp_path):
    config = tmp_path / "inkling.toml"
    config.write_text('[telemetry]\ntrace_ratio = 0.25\notlp_endpoint = "http://127.0.0.1:1"\n')
    ts = load_telemetry_settings(config, environ={})
    assert (ts.trace_ratio, ts.otlp_endpoint, ts.enabled) == (0.25, "http://127.0.0.1:1", True)
    env = {"INKLING_TELEMETRY_TRACE_RATIO": "1"}
    assert load_telemetry_settings(config, environ=env).trace_ratio == 1.0

    configured = providers.configure("retrieval", metrics_port=0, environ={}, settings=ts)
    assert configured.tracer_provider is not None
    assert "TraceIdRatioBased{0.25}" in configured.tracer_provider.sampler.get_description()
    configured.shutdown()
    with_env = providers.configure(
        "retrieval",
        metrics_port=0,
        environ={"OTEL_TRACES_SAMPLER": "always_on"},
        settings=ts,
    )
    assert with_env.tracer_provider is not None
    assert "AlwaysOnSampler" in with_env.tracer_provider.sampler.get_description()
    with_env.shutdown()
    off = providers.configure("retrieval", environ={}, settings=TelemetrySettings(enabled=False))
    assert off.tracer_provider is None and off.metrics_address is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trace_ratio = 1.5", r"trace_ratio must be within \[0, 1\], got 1.5"),
        ("metrics_port = 70000", "metrics_port must be a port or 0, got 70000"),
        ("trace_ratio = 'often'", "setting trace_ratio: cannot read 'often'"),
        ("sampling = 1", r"unknown \[telemetry\] settings: sampling"),
    ],
)
def test_bad_telemetry_settings_say_what_is_wrong(tmp_path, text, message):
    config = tmp_path / "inkling.toml"
    config.write_text(f"[telemetry]\n{text}\n")
    with pytest.raises(ConfigurationError, match=message):
        load_telemetry_settings(config, environ={})


def test_cpu_clock_counts_the_threads_cpu_per_stage_not_its_waiting(otel):
    from inkling.telemetry.clock import CpuClock

    def seconds(stage: str) -> float:
        return sum(p.value for p in otel.points("inkling.stage.cpu_time")
                   if p.attributes.get("stage") == stage)  # fmt: skip

    def burn(cpu_s: float) -> None:
        began = time.thread_time()
        while time.thread_time() - began < cpu_s:
            pass

    clock = CpuClock()
    time.sleep(0.3)
    clock.lap("test.wait")
    burn(0.1)
    clock.lap("test.burn")
    assert seconds("test.wait") < 0.05
    assert 0.1 <= seconds("test.burn") < 0.5
    burn(0.1)
    clock.lap("test.burn")  # a stage's laps add up
    assert 0.2 <= seconds("test.burn") < 0.6


def test_sampled_log_writes_once_per_window_per_key_and_counts_what_it_held_back(caplog):
    import logging

    from inkling.telemetry.sampled_log import MAX_KEYS, SampledLog

    now = [0.0]
    sampled = SampledLog(logging.getLogger("test.sampled"), every_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.sampled")
    written = [sampled.log("a", logging.WARNING, "refused a") for _ in range(50)]
    assert written == [True] + [False] * 49
    assert sampled.log("b", logging.WARNING, "refused b")  # another key: its own window
    now[0] = 61.0
    assert sampled.log("a", logging.WARNING, "refused a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused a", "refused b", "refused a (50 times in the last 61 s)"]
    for i in range(MAX_KEYS + 10):  # caller-chosen keys cannot grow it without bound
        sampled.log(f"k{i}", logging.WARNING, "x")
    assert len(sampled._windows) <= MAX_KEYS
