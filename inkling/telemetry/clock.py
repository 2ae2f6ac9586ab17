"""Stage timing: wall time per stage of one request (debug timings,
`inkling.stage.duration` and stage spans), and thread CPU time per stage of a loop
(`inkling.stage.cpu_time`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from inkling.telemetry.instruments import STAGE_DURATION, add_stage_cpu

_tracer = trace.get_tracer("inkling.stages")


class StageClock:
    """Wall time per stage of one request: debug output, a metric and a span per stage.

    `lap(stage)` closes the stage that began at the previous lap (or at construction):
    its microseconds go to `timings` (the response's debug output), its seconds to
    `inkling.stage.duration{stage}`, and, when the request's span is sampled, a child
    span named `stage` covering exactly that interval, with `attributes`.
    """

    def __init__(self) -> None:
        self.timings: list[tuple[str, int]] = []
        self._t = time.perf_counter()
        self._wall_ns = time.time_ns()

    @property
    def stage_start_ns(self) -> int:
        """Wall time (ns since the epoch) at which the current stage began."""
        return self._wall_ns

    def lap(
        self,
        stage: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        phases: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """Close the current stage; `phases` (name, start ns, end ns) become its child spans."""
        now = time.perf_counter()
        wall_ns = time.time_ns()
        seconds = now - self._t
        self.timings.append((stage, int(seconds * 1e6)))
        STAGE_DURATION.record(seconds, {"stage": stage})
        if trace.get_current_span().is_recording():
            span = _tracer.start_span(stage, start_time=self._wall_ns, attributes=attributes)
            inside = trace.set_span_in_context(span)
            for name, start_ns, end_ns in phases:
                _tracer.start_span(f"{stage}.{name}", context=inside, start_time=start_ns).end(
                    end_time=end_ns
                )
            span.end(end_time=wall_ns)
        self._t = now
        self._wall_ns = wall_ns


class CpuClock:
    """CPU time of the calling thread per stage, for a loop that runs its stages in turn
    on one thread (the stream worker's loop, its log thread).

    `lap(stage)` adds the thread's CPU time since the previous lap (or construction) to
    `inkling.stage.cpu_time{stage}`. Time blocked in a read costs no CPU,
    so waiting for work is not counted. Not for asyncio servers: there other requests run
    between two laps on the same thread and their CPU would be counted too.
    """

    def __init__(self) -> None:
        self._t = time.thread_time()

    def lap(self, stage: str) -> None:
        now = time.thread_time()
        seconds = now - self._t
        self._t = now
        if seconds > 0:
            add_stage_cpu(stage, seconds)
