"""The pure part of the stream worker: decoding bus entries and the state update rules.

Nothing here does I/O. `SessionState.apply` is the streamed form of
`batch.features.session_features`, rule for rule, so the state after a session's
events equals the batch job's last row for that session, whatever order the events
arrived in:

- counts by event type (`session_page_views` ... `session_purchases`);
- `session_recent_items`: the items of the last 10 interactions (click,
  add_to_cart, purchase) ordered by (timestamp, seq), newest last, where seq is the
  batch job's tie-break `"<type rank>:<event_id>"`. The state keeps those 10
  interactions with their order keys, so a late event lands in its place;
- `session_intent_category`: the category with the largest dwell-weighted weight:
  a click weighs its dwell (at least 1 s), add_to_cart 30 s, purchase 60 s. Weights
  are summed in integer milliseconds (exact in any order; the batch job sums
  seconds as doubles); ties go to the greatest category name, as Spark's max over
  (weight, category) structs does; no weighted event: `unknown`;
- `session_last_event_timestamp`: the latest event time.

Session keyed by user (the cross-device rule): an event with a user id updates the
state of the user's current *visit* (`state_key` "u:<user>"), an event without one
the state of its session ("s:<session>"). A visit holds the session ids it has seen
(at most `max_sessions`, most recent last); the state row is written under every one
of them, so a ranking request with any of the user's current session ids, from any
device, reads the same state. An event continues the visit when its session id is
already in it, or when it comes less than `session_gap_us` after the visit's latest
event; otherwise it starts a new visit with an empty state (the previous visit's
rows stay as they were). When a session id joins a visit, the anonymous state of
that session (events sent before the user logged in) is merged into the visit.

For a user whose sessions are more than the gap apart (the common case) every
session's row equals the batch job's; sessions of one user that overlap or follow
each other within the gap share one merged state online, while the batch job keeps
them apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
from google.protobuf.message import DecodeError

from inkling.events.bus import routing_key
from inkling.events.schema import EVENT_SCHEMA, EVENT_TYPES, INTERACTION_TYPES, UNKNOWN_CATEGORY
from inkling.v1 import resources_pb2

RECENT_ITEMS = 10
"""Interactions kept in `session_recent_items` (batch.features.SESSION_RECENT_ITEMS)."""
CLICK_MIN_WEIGHT_MS = 1_000
"""A click weighs its dwell, at least this (batch: greatest(dwell_s, 1.0))."""
INTENT_WEIGHTS_MS = {"add_to_cart": 30_000, "purchase": 60_000}
"""Fixed intent weights (batch.features.INTENT_WEIGHTS, in milliseconds)."""
COUNT_FEATURES = {
    "page_view": "session_page_views",
    "item_view": "session_item_views",
    "click": "session_clicks",
    "add_to_cart": "session_carts",
    "purchase": "session_purchases",
}
SESSION_FEATURES = (
    "session_recent_items",
    *COUNT_FEATURES.values(),
    "session_intent_category",
    "session_last_event_timestamp",
)
"""The features `session_row` produces (the `session_features` view's schema)."""
COUNTER_WINDOW_MINUTES = 5
"""Item counters cover the current minute and the 4 before it (`item_*_5m`)."""
COUNTER_FEATURES = {"item_view": "item_views_5m", "click": "item_clicks_5m"}

# The batch job breaks ties between events at one timestamp by type, then event id.
_TYPE_RANK = {"page_view": 0, "item_view": 1, "click": 2, "add_to_cart": 3, "purchase": 4}
_TYPE_NAMES = {
    resources_pb2.EVENT_TYPE_PAGE_VIEW: "page_view",
    resources_pb2.EVENT_TYPE_ITEM_VIEW: "item_view",
    resources_pb2.EVENT_TYPE_CLICK: "click",
    resources_pb2.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    resources_pb2.EVENT_TYPE_PURCHASE: "purchase",
}
_COUNT_INDEX = {kind: i for i, kind in enumerate(EVENT_TYPES)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PoisonEvent(ValueError):
    """A bus entry the worker cannot process; the message is the dead-letter reason."""


class StreamEvent(NamedTuple):
    """One event from the bus, converted to the event log's conventions (empty = None).

    A named tuple: the worker makes one per event, and a frozen dataclass took four times
    as long to construct."""

    event_id: str
    user_id: str | None
    session_id: str
    item_id: str | None
    event_type: str
    ts_us: int
    dwell_ms: int | None = None
    scroll_depth: float | None = None
    device: str | None = None
    surface: str | None = None
    position: int | None = None
    received_us: int = 0
    request_id: str | None = None

    @property
    def seq(self) -> str:
        """The batch job's order key for events sharing a timestamp."""
        return f"{_TYPE_RANK[self.event_type]}:{self.event_id}"

    @property
    def state_key(self) -> str:
        """Whose state the event updates: the user's visit, else the session."""
        return routing_key(self.user_id or "", self.session_id)


def _or_none(value: str) -> str | None:
    return value or None


def decode_event(payload: bytes, event_id: str, received_us: int) -> StreamEvent:
    """A serialized `inkling.v1.Event` as a `StreamEvent`.

    Proto3 zero values mean "absent": an empty user, item, device or surface, and a
    zero dwell or scroll depth ("0 when unknown" in the contract) become None; a
    position is kept for item_view (slot 0 is a slot) and for other types when set.
    The event log's own rules (`inkling.events.schema.row_problem`) are checked per event.

    Raises:
        PoisonEvent: the payload does not parse, or lacks what the state needs.
    """
    try:
        message = resources_pb2.Event.FromString(payload)
    except DecodeError as e:
        raise PoisonEvent(f"payload is not an inkling.v1.Event: {e}") from e
    kind = _TYPE_NAMES.get(message.event_type)
    if kind is None:
        raise PoisonEvent(f"event_type {message.event_type} is not a known event type")
    if not message.HasField("timestamp"):
        raise PoisonEvent("timestamp is missing")
    if not message.event_id:
        raise PoisonEvent("event_id is missing")
    if message.event_id != event_id:
        raise PoisonEvent(f"entry id field {event_id!r} differs from event_id {message.event_id!r}")
    if not message.session_id:
        raise PoisonEvent("session_id is missing")
    ts = message.timestamp
    position: int | None = message.position
    if kind != "item_view" and not position:
        position = None
    return StreamEvent(
        event_id=message.event_id,
        user_id=_or_none(message.user_id),
        session_id=message.session_id,
        item_id=_or_none(message.item_id),
        event_type=kind,
        ts_us=ts.seconds * 1_000_000 + ts.nanos // 1_000,
        dwell_ms=message.dwell_ms or None,
        scroll_depth=message.scroll_depth or None,
        device=_or_none(message.device),
        surface=_or_none(message.surface),
        position=position,
        received_us=received_us,
        request_id=_or_none(message.request_id),
    )


class EventColumns:
    """Events as one Python list per event-log column: the worker's log buffer.

    A buffer holds seconds of events; kept as event objects they were tens of thousands
    of objects for the garbage collector to walk in every full pass. Strings and ints
    are not tracked, so these lists cost a pass nothing, and they become Arrow arrays
    without another walk over the events.
    """

    _COLUMNS = ("event_id", "user_id", "session_id", "item_id", "event_type", "ts_us",
                "dwell_ms", "scroll_depth", "device", "surface", "position",
                "request_id")  # fmt: skip

    def __init__(self, events: Iterable[StreamEvent] = ()) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self._COLUMNS}
        self.extend(events)

    def __len__(self) -> int:
        return len(self.columns["event_id"])

    def extend(self, events: Iterable[StreamEvent]) -> None:
        appends = [self.columns[name].append for name in self._COLUMNS]
        for e in events:
            for append, value in zip(appends, _values(e), strict=True):
                append(value)

    def table(self) -> pa.Table:
        """The events with the event log's columns (nullable, before validation)."""
        c = self.columns
        loose = pa.schema(
            [f.with_nullable(True) for f in EVENT_SCHEMA], metadata=EVENT_SCHEMA.metadata
        )
        return pa.Table.from_arrays(
            [
                pa.array(c["event_id"], pa.string()),
                pa.array(c["user_id"], pa.string()),
                pa.array(c["session_id"], pa.string()),
                pa.array(c["item_id"], pa.string()),
                pa.array(c["event_type"], pa.string()),
                pa.array(c["ts_us"], pa.int64()).cast(EVENT_SCHEMA.field("timestamp").type),
                pa.array(c["dwell_ms"], pa.int64()),
                pa.array(c["scroll_depth"], pa.float64()),
                pa.array(c["device"], pa.string()),
                pa.array(c["surface"], pa.string()),
                pa.array(c["position"], pa.int32()),
                pa.array(c["request_id"], pa.string()),
            ],
            schema=loose,
        )


def _values(e: StreamEvent) -> tuple[Any, ...]:
    return (e.event_id, e.user_id, e.session_id, e.item_id, e.event_type, e.ts_us, e.dwell_ms,
            e.scroll_depth, e.device, e.surface, e.position, e.request_id)  # fmt: skip


def events_table(events: Iterable[StreamEvent]) -> pa.Table:
    """Events as a table with the event log's columns (nullable, before validation)."""
    return EventColumns(events).table()


def intent_weight_ms(event: StreamEvent) -> int | None:
    """The event's weight toward its item's category, None for events without one."""
    if event.event_type == "click":
        return max(event.dwell_ms or 0, CLICK_MIN_WEIGHT_MS)
    return INTENT_WEIGHTS_MS.get(event.event_type)


@dataclass
class SessionState:
    """The live state of one session (or of one user's visit)."""

    counts: list[int] = field(default_factory=lambda: [0] * len(EVENT_TYPES))
    """Events by type, in `EVENT_TYPES` order."""
    recent: list[tuple[int, str, str]] = field(default_factory=list)
    """The last `RECENT_ITEMS` interactions as (ts_us, seq, item_id), oldest first."""
    weights_ms: dict[str, int] = field(default_factory=dict)
    """Intent weight per category."""
    last_ts_us: int = 0
    """The latest event time; 0 before the first event."""
    sessions: list[str] = field(default_factory=list)
    """Session ids whose rows show this state, least recently used first."""

    def copy(self) -> SessionState:
        return SessionState(
            list(self.counts),
            list(self.recent),
            dict(self.weights_ms),
            self.last_ts_us,
            list(self.sessions),
        )

    @property
    def empty(self) -> bool:
        return self.last_ts_us == 0 and not any(self.counts)

    def apply(self, event: StreamEvent, category: str | None) -> None:
        """Fold one event in; `category` is its item's (None: not in the catalogue)."""
        self.counts[_COUNT_INDEX[event.event_type]] += 1
        if event.event_type in INTERACTION_TYPES and event.item_id is not None:
            bisect.insort(self.recent, (event.ts_us, event.seq, event.item_id))
            del self.recent[:-RECENT_ITEMS]
        weight = intent_weight_ms(event)
        if weight is not None:
            key = category or UNKNOWN_CATEGORY
            self.weights_ms[key] = self.weights_ms.get(key, 0) + weight
        self.last_ts_us = max(self.last_ts_us, event.ts_us)

    def merge(self, other: SessionState) -> None:
        """Add another state's events (all aggregates here are mergeable exactly)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.recent = sorted(self.recent + other.recent)[-RECENT_ITEMS:]
        for key, weight in other.weights_ms.items():
            self.weights_ms[key] = self.weights_ms.get(key, 0) + weight
        self.last_ts_us = max(self.last_ts_us, other.last_ts_us)

    def touch_session(self, session_id: str, max_sessions: int) -> bool:
        """Make `session_id` the most recent of the visit; True when it was not in it."""
        new = session_id not in self.sessions
        if not new:
            if self.sessions[-1] == session_id:
                return False
            self.sessions.remove(session_id)
        self.sessions.append(session_id)
        del self.sessions[:-max_sessions]
        return new

    @property
    def intent_category(self) -> str:
        if not self.weights_ms:
            return UNKNOWN_CATEGORY
        return max(self.weights_ms.items(), key=lambda kv: (kv[1], kv[0]))[0]

    def row(self) -> dict[str, Any]:
        """The `session_features` values of this state."""
        values: dict[str, Any] = {"session_recent_items": [item for _, _, item in self.recent]}
        for kind, name in COUNT_FEATURES.items():
            values[name] = self.counts[_COUNT_INDEX[kind]]
        values["session_intent_category"] = self.intent_category
        values["session_last_event_timestamp"] = _EPOCH + timedelta(microseconds=self.last_ts_us)
        return values

    # Stored in Redis (and in the worker's cache) as compact JSON.
    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "c": self.counts,
                "r": self.recent,
                "w": self.weights_ms,
                "t": self.last_ts_us,
                "s": self.sessions,
            }
        )

    @classmethod
    def loads_own(cls, data: bytes) -> SessionState:
        """`loads` for bytes this process wrote (`dumps`): types are not checked again."""
        raw = orjson.loads(data)
        return cls(raw["c"], [tuple(r) for r in raw["r"]], raw["w"], raw["t"], raw["s"])

    @classmethod
    def loads(cls, data: bytes) -> SessionState:
        raw = orjson.loads(data)
        return cls(
            counts=[int(c) for c in raw["c"]],
            recent=[(int(t), str(s), str(i)) for t, s, i in raw["r"]],
            weights_ms={str(k): int(v) for k, v in raw["w"].items()},
            last_ts_us=int(raw["t"]),
            sessions=[str(s) for s in raw["s"]],
        )


def begins_new_visit(state: SessionState, event: StreamEvent, session_gap_us: int) -> bool:
    """Whether a user's event starts a new visit rather than continuing `state`'s."""
    if state.empty or event.session_id in state.sessions:
        return False
    return event.ts_us - state.last_ts_us > session_gap_us


@dataclass
class ApplyResult:
    """What applying a sequence of events changed."""

    touched: dict[str, SessionState] = field(default_factory=dict)
    """State key -> its state after the events, for every state an event changed."""
    joined: dict[str, list[str]] = field(default_factory=dict)
    """User state key -> session ids that joined its visit (their anonymous states merge in)."""
    ended: list[SessionState] = field(default_factory=list)
    """Visits these events changed and then replaced by a new visit: their rows are due too."""


def apply_events(
    states: dict[str, SessionState],
    events: Iterable[StreamEvent],
    categories: Mapping[str, str],
    *,
    session_gap_us: int,
    max_sessions: int,
    anonymous: Mapping[str, SessionState] | None = None,
) -> ApplyResult:
    """Fold events, in order, into `states` (state key -> state; updated in place).

    Args:
        states: the current states of the events' keys; a missing key starts empty.
        categories: item id -> category (the catalogue).
        session_gap_us: a user's event this long after the visit's latest, in a session
            the visit has not seen, starts a new visit.
        max_sessions: session ids a visit keeps (its rows are written under each).
        anonymous: "s:<session>" -> the anonymous state of sessions users' events may
            join; merged into the visit when the session joins it.
    """
    result = ApplyResult()
    for event in events:
        key = event.state_key
        state = states.get(key)
        if state is None:
            state = states[key] = SessionState()
        if event.user_id is not None:
            if begins_new_visit(state, event, session_gap_us):
                if result.touched.get(key) is state:
                    result.ended.append(state)
                    del result.touched[key]
                state = states[key] = SessionState()
            if state.touch_session(event.session_id, max_sessions):
                before = (anonymous or {}).get(routing_key("", event.session_id))
                if before is not None:
                    state.merge(before)
                result.joined.setdefault(key, []).append(event.session_id)
        else:
            state.touch_session(event.session_id, 1)
        state.apply(event, categories.get(event.item_id) if event.item_id else None)
        result.touched[key] = state
    return result


def event_minute(event: StreamEvent) -> int:
    """The minute bucket of an item counter: event time, but never after it was received."""
    ts = event.ts_us if not event.received_us else min(event.ts_us, event.received_us)
    return ts // 60_000_000


def counter_increments(
    events: Iterable[StreamEvent], now_minute: int
) -> dict[str, dict[int, list[int]]]:
    """Item id -> minute -> [views, clicks] of events inside the counter window at `now_minute`."""
    out: dict[str, dict[int, list[int]]] = {}
    oldest = now_minute - COUNTER_WINDOW_MINUTES + 1
    for event in events:
        if event.event_type not in COUNTER_FEATURES or event.item_id is None:
            continue
        minute = event_minute(event)
        if minute < oldest:
            continue
        cell = out.setdefault(event.item_id, {}).setdefault(minute, [0, 0])
        cell[0 if event.event_type == "item_view" else 1] += 1
    return out


def window_counts(buckets: Mapping[int, list[int]], now_minute: int) -> tuple[int, int]:
    """(views, clicks) of the minute buckets inside the window ending at `now_minute`."""
    oldest = now_minute - COUNTER_WINDOW_MINUTES + 1
    views = clicks = 0
    for minute, (v, c) in buckets.items():
        if minute >= oldest:
            views += v
            clicks += c
    return views, clicks
