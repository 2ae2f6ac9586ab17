"""Event ingest, free of gRPC: validate each event, stamp the receive time, append to the bus.

What `IngestCore.track` does with a batch, and what the caller hears back:

- **Request-level errors fail the whole call** with ``InvalidInputError``
  (INVALID_ARGUMENT): an empty batch or more than 1,000 events (the limits are the
  contract's, ``TrackEventsRequest.events``). Nothing is appended.
- **Invalid events are reported, the valid ones accepted.** Each event is checked on
  its own against the contract's rules (``inkling.serving.validation``: required and non-blank
  ``event_id`` and ``session_id``, a known ``event_type``, a ``timestamp``, lengths,
  ``dwell_ms`` within 0 .. 24 h, ``position`` within 0 .. 100,000) and against the
  event schema's rules (``inkling.events.schema``) the contract cannot express: ``item_id``
  required for item events and empty for ``EVENT_TYPE_PAGE_VIEW``, ``user_id`` and
  ``item_id`` not blank, ``scroll_depth`` within 0 .. 1, a timestamp not before
  1990-01-01 and not far in the future (below). Every invalid event comes back in
  ``rejected`` with its index in the request, its ``event_id`` as sent and every
  broken rule (``"session_id: must not be empty; dwell_ms: must be at most ..."``);
  it is never stored, and its ``event_id`` is not remembered, so a corrected event
  with the same id is accepted later. ``accepted + duplicates + len(rejected)``
  always equals the number of events sent: nothing is dropped silently.
- **Forgotten users: rejected.** An event of a user or session that was forgotten
  (``inkling.erasure``: a tombstone in ``TOMBSTONES_KEY``, one HMGET per call) is
  rejected with the reason ``"user_id: forgotten ..."`` and never stored.
- **Far future: rejected.** The timestamp is the client's clock; one more than
  ``max_future_s`` (default 300 s) ahead of the server's receive time is rejected
  with its reason (``"timestamp: 3600.0 s ahead of the server clock (at most 300 s)"``).
  There is no lower bound beyond 1990-01-01: late events (offline clients) are fine.
- **Out of order: accepted as they are.** Events are appended in request order and
  their timestamps are kept; the stream workers order a session's events by
  timestamp. Only the receive time (``F_RECEIVED_US``, one stamp per call, the
  server's clock in µs) is added, and, when the call is traced (sampled), its W3C
  ``traceparent`` (``F_TRACE``), which the stream worker's span links to.
- **Duplicates: acknowledged, stored once.** An ``event_id`` already appended within
  the dedupe window (``dedupe_window_s``, default one hour from its first append) —
  by an earlier call, by an earlier attempt of this one, or earlier in this same
  batch — is counted in ``duplicates`` and not stored again. After the window it
  is stored again, and then reaches the event log and the online state twice: the
  stream workers guarantee each bus entry once, not each event id.
- **All or nothing per call.** The valid events of a batch are deduplicated and
  appended by one atomic Redis script (``inkling.events.bus.EventBus.append``): the
  response is sent only after it succeeded. If Redis cannot be reached the call
  fails with ``DependencyUnavailableError`` (UNAVAILABLE), never success; the client
  retries the same batch, and because of the dedupe a retry of a batch whose append
  did land (its reply lost) is safe: those events come back as duplicates.
- **Backpressure.** Before appending, the backlog of every partition the batch goes
  to (entries the stream workers' group has not yet been delivered or not yet
  acknowledged, measured at most ``lag_cache_s`` ago) is compared with ``max_lag``;
  above it the call fails with ``OverloadedError`` (RESOURCE_EXHAUSTED) and nothing
  is appended; the status carries the trailing metadata ``retry-after-ms``
  (``retry_after_s``). The limit is soft by up to one cache period of appends.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from inkling.errors import InvalidInputError, OverloadedError
from inkling.events.bus import Appended, BusEvent, is_forgotten, owners_fields, routing_key
from inkling.serving.validation import violations
from inkling.telemetry.clock import StageClock
from inkling.telemetry.context import sampled_traceparent
from inkling.telemetry.instruments import INGEST_REJECTED
from inkling.v1 import event_service_pb2, resources_pb2

MIN_TIMESTAMP_US = 631_152_000 * 1_000_000  # 1990-01-01T00:00:00Z, the event schema's floor
ITEM_EVENT_TYPES = frozenset(
    {
        resources_pb2.EVENT_TYPE_ITEM_VIEW,
        resources_pb2.EVENT_TYPE_CLICK,
        resources_pb2.EVENT_TYPE_ADD_TO_CART,
        resources_pb2.EVENT_TYPE_PURCHASE,
    }
)
_ELEMENT = re.compile(r"^events\[(\d+)\](?:\.(.*))?$")


class Bus(Protocol):
    """What ingest needs of the event bus (``inkling.events.bus.EventBus``)."""

    def partition(self, key: str) -> int: ...

    async def lag(self) -> Mapping[int, int]: ...
    async def forgotten(self, fields: Sequence[str]) -> set[str]: ...

    async def append(
        self, events: Sequence[BusEvent], received_us: int, traceparent: str = ""
    ) -> Sequence[Appended]: ...


@dataclass(frozen=True)
class IngestLimits:
    max_future_s: float = 300.0
    """Events stamped more than this ahead of the receive time are rejected."""
    max_lag: int = 100_000
    """Refuse a batch when a partition it goes to holds more unconsumed entries."""
    retry_after_s: float = 1.0
    """The retry hint of a refused batch."""


@dataclass(frozen=True)
class Rejected:
    """An event that was not accepted: where it was, what it claimed to be, and why."""

    index: int
    event_id: str
    reason: str


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejected: tuple[Rejected, ...]


def _now_us() -> int:
    return time.time_ns() // 1000


def _timestamp_us(ts: object) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000  # type: ignore[attr-defined]


def schema_violations(
    event: resources_pb2.Event, received_us: int, max_future_s: float
) -> list[str]:
    """The event schema's rules the contract's options cannot express."""
    found = []
    if event.user_id and not event.user_id.strip():
        found.append("user_id: must not be blank")
    kind = event.event_type
    if event.item_id and not event.item_id.strip():
        found.append("item_id: must not be blank")
    elif kind in ITEM_EVENT_TYPES and not event.item_id:
        found.append(f"item_id: must not be empty for {resources_pb2.EventType.Name(kind)}")
    elif kind == resources_pb2.EVENT_TYPE_PAGE_VIEW and event.item_id:
        found.append("item_id: must be empty for EVENT_TYPE_PAGE_VIEW")
    depth = event.scroll_depth
    if math.isnan(depth) or not 0.0 <= depth <= 1.0:
        found.append(f"scroll_depth: must be within 0 .. 1 (got {depth})")
    if event.HasField("timestamp"):
        ts = event.timestamp
        if not 0 <= ts.nanos < 1_000_000_000:
            found.append(f"timestamp: nanos must be within 0 .. 999999999 (got {ts.nanos})")
        else:
            at = _timestamp_us(ts)
            ahead_s = (at - received_us) / 1e6
            if at < MIN_TIMESTAMP_US:
                found.append("timestamp: before 1990-01-01")
            elif ahead_s > max_future_s:
                found.append(
                    f"timestamp: {ahead_s:.1f} s ahead of the server clock "
                    f"(at most {max_future_s:g} s)"
                )
    return found


class IngestCore:
    """Validates a batch, applies backpressure, and appends the valid events to the bus."""

    def __init__(
        self, bus: Bus, limits: IngestLimits, clock_us: Callable[[], int] = _now_us
    ) -> None:
        self._bus = bus
        self._limits = limits
        self._clock_us = clock_us

    def check(
        self, request: event_service_pb2.TrackEventsRequest, received_us: int
    ) -> dict[int, list[str]]:
        """Every invalid event's reasons by index; raises for request-level violations."""
        reasons: dict[int, list[str]] = {}
        for v in violations(request):
            match = _ELEMENT.match(v.field)
            if match is None:  # the list itself: empty or too long
                raise InvalidInputError(f"invalid TrackEventsRequest: {v}", field=v.field)
            index, field = int(match[1]), match[2] or "event"
            reasons.setdefault(index, []).append(f"{field}: {v.reason}")
        max_future_s = self._limits.max_future_s
        for i, event in enumerate(request.events):
            extra = schema_violations(event, received_us, max_future_s)
            if extra:
                reasons.setdefault(i, []).extend(extra)
        return reasons

    async def track(self, request: event_service_pb2.TrackEventsRequest) -> IngestResult:
        clock = StageClock()
        received_us = self._clock_us()
        reasons = self.check(request, received_us)
        events = request.events
        await self._refuse_forgotten(events, reasons)
        rejected = tuple(
            Rejected(i, events[i].event_id, "; ".join(reasons[i])) for i in sorted(reasons)
        )
        for found in reasons.values():
            # The field the first reason names: a bounded label ("timestamp", "item_id", ...).
            INGEST_REJECTED.add(1, {"reason": found[0].split(":", 1)[0]})
        valid = [
            BusEvent(e.event_id, routing_key(e.user_id, e.session_id), e.SerializeToString())
            for i, e in enumerate(events)
            if i not in reasons
        ]
        clock.lap("validate", {"inkling.events": len(events), "inkling.rejected": len(rejected)})
        if not valid:
            return IngestResult(0, 0, rejected)
        try:
            await self._admit({self._bus.partition(e.routing_key) for e in valid})
        except OverloadedError:
            INGEST_REJECTED.add(len(valid), {"reason": "backpressure"})
            raise
        clock.lap("admit")
        outcomes = await self._bus.append(valid, received_us, sampled_traceparent())
        duplicates = sum(1 for o in outcomes if o.duplicate)
        clock.lap("bus_append", {"inkling.events": len(valid), "inkling.duplicates": duplicates})
        return IngestResult(len(outcomes) - duplicates, duplicates, rejected)

    async def _refuse_forgotten(
        self, events: Sequence[resources_pb2.Event], reasons: dict[int, list[str]]
    ) -> None:
        """Add a reason to each valid event of a forgotten user or session."""
        valid = {i: e for i, e in enumerate(events) if i not in reasons}
        owners = owners_fields((e.user_id, e.session_id) for e in valid.values())
        forgotten = await self._bus.forgotten(owners)
        if not forgotten:
            return
        for i, e in valid.items():
            if is_forgotten(forgotten, e.user_id, e.session_id):
                what = "user_id" if f"u:{e.user_id}" in forgotten else "session_id"
                reasons[i] = [f"{what}: forgotten (inkling forget); never stored again"]

    async def _admit(self, partitions: set[int]) -> None:
        """Refuse the batch when a partition it goes to is too far behind."""
        lag = await self._bus.lag()
        limit = self._limits.max_lag
        behind = sorted((p, lag[p]) for p in partitions if lag.get(p, 0) > limit)
        if behind:
            p, n = behind[0]
            raise OverloadedError(
                f"the event bus is behind: partition {p} holds {n} unconsumed events "
                f"(max_lag {limit}); retry in {self._limits.retry_after_s:g} s",
                retry_after_s=self._limits.retry_after_s,
            )
