"""Trace context carried outside gRPC metadata: on the bus entries an append writes.

An ingest call that is traced stores its W3C `traceparent` on the entries it appends;
the stream worker turns the traceparents of a micro-batch into span links, so a trace
viewer leads from an event's `TrackEvents` span to the worker batch that committed it.
Only sampled contexts are carried: an unsampled one could never be found again.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()
MAX_LINKS = 32
"""The most distinct ingest spans one worker span links to (the SDK keeps 128)."""


def sampled_traceparent() -> str:
    """The current span's `traceparent` header value when it is sampled, else ''."""
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return ""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def links_to(traceparents: Iterable[str | bytes], limit: int = MAX_LINKS) -> list[Link]:
    """One link per distinct valid traceparent, in order of first appearance, at most
    `limit`; malformed values are skipped (they come from the bus, not from us only)."""
    links: list[Link] = []
    seen: set[str] = set()
    for value in traceparents:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text in seen:
            continue
        seen.add(text)
        context = trace.get_current_span(_W3C.extract({"traceparent": text})).get_span_context()
        if context.is_valid:
            links.append(Link(context))
            if len(links) >= limit:
                break
    return links
