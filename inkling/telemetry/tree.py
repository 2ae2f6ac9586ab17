"""A trace as text: the spans of one trace as an indented tree with their durations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

SHOWN_ATTRIBUTES = (
    "rpc.response.status_code",
    "inkling.candidates",
    "inkling.results",
    "inkling.model.version",
    "inkling.index.version",
    "inkling.experiment.arm",
    "inkling.degraded.reasons",
)
"""Attributes printed beside a span's name when it has them (others are left out)."""


def _text(value: object) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _line(span: ReadableSpan, depth: int) -> str:
    start, end = span.start_time or 0, span.end_time or 0
    attributes = span.attributes or {}
    shown = [
        f"{k.removeprefix('inkling.')}={_text(attributes[k])}"
        for k in SHOWN_ATTRIBUTES
        if k in attributes
    ]
    extra = f"  ({', '.join(shown)})" if shown else ""
    kind = f" [{span.kind.name.lower()}]" if span.kind in (SpanKind.CLIENT, SpanKind.SERVER) else ""
    return f"{'  ' * depth}{span.name}{kind}  {(end - start) / 1e6:.2f} ms{extra}"


def trace_tree(spans: Iterable[ReadableSpan], trace_id: int) -> str:
    """The spans of trace `trace_id`, children under their parent in start order; a span
    whose parent is not among them (another process's, not collected) starts a root."""
    mine: Sequence[ReadableSpan] = [
        s for s in spans if s.context is not None and s.context.trace_id == trace_id
    ]
    ids = {s.context.span_id for s in mine if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in mine:
        parent = span.parent.span_id if span.parent is not None else None
        children[parent if parent in ids else None].append(span)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        lines.append(_line(span, depth))
        assert span.context is not None
        for child in sorted(children[span.context.span_id], key=lambda s: s.start_time or 0):
            walk(child, depth + 1)

    for root in sorted(children[None], key=lambda s: s.start_time or 0):
        walk(root, 0)
    return "\n".join(lines)
