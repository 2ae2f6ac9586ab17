"""Trace ids in the logs: a record written inside a span names its trace and span."""

from __future__ import annotations

import logging

from opentelemetry import trace

LOG_FORMAT_SUFFIX = "%(otel)s"
"""Append to a log format: ` trace_id=<32 hex> span_id=<16 hex>` inside a span, else ''."""


class TraceContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` and `otel` (both, formatted, or '') to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        span_id = format(context.span_id, "016x") if context.is_valid else ""
        record.__dict__.update(
            trace_id=trace_id,
            span_id=span_id,
            otel=f" trace_id={trace_id} span_id={span_id}" if trace_id else "",
        )
        return True


def install(format_: str, level: int = logging.INFO) -> None:
    """`logging.basicConfig(format_ + trace ids)` with the filter on the root handlers."""
    logging.basicConfig(level=level, format=format_ + LOG_FORMAT_SUFFIX)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())
