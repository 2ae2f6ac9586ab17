"""The stream worker's pure rules: decoding bus entries, session state, visits, counters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inkling.errors import ConfigurationError
from inkling.events.schema import validate
from inkling.v1 import resources_pb2
from stream_worker.settings import WorkerSettings, load_worker_settings
from stream_worker.state import (
    COUNTER_WINDOW_MINUTES,
    RECENT_ITEMS,
    PoisonEvent,
    SessionState,
    StreamEvent,
    apply_events,
    begins_new_visit,
    counter_increments,
    decode_event,
    events_table,
    intent_weight_ms,
    window_counts,
)

T0 = 1_780_000_000_000_000  # µs
GAP = 1_800_000_000
CATEGORIES = {"i1": "shoes", "i2": "hats", "i3": "bags", "i4": "hats"}


def ev(
    eid: str,
    kind: str,
    item: str | None = None,
    *,
    t: int = 0,
    session: str = "s1",
    user: str | None = None,
    dwell: int | None = None,
    received: int = 0,
) -> StreamEvent:
    return StreamEvent(
        event_id=eid,
        user_id=user,
        session_id=session,
        item_id=item,
        event_type=kind,
        ts_us=T0 + t,
        dwell_ms=dwell,
        received_us=received,
    )


def run(events: list[StreamEvent], states: dict[str, SessionState] | None = None, **kw):
    states = {} if states is None else states
    result = apply_events(
        states, events, CATEGORIES, session_gap_us=GAP, max_sessions=kw.pop("max_sessions", 8), **kw
    )
    return states, result


# ------------------------------------------------------------------ decoding


def payload(**fields) -> bytes:
    ts = fields.pop("ts", T0)
    message = resources_pb2.Event(**fields)
    if ts is not None:
        message.timestamp.FromMicroseconds(ts)
    return message.SerializeToString()


def test_decode_maps_proto_zero_values_to_absent():
    data = payload(
        event_id="e1", session_id="s1", event_type=resources_pb2.EVENT_TYPE_CLICK, item_id="i1"
    )
    event = decode_event(data, "e1", 5)
    assert event == StreamEvent("e1", None, "s1", "i1", "click", T0, received_us=5)


def test_decode_keeps_slot_zero_of_an_impression_and_the_dwell():
    data = payload(
        event_id="e1",
        session_id="s1",
        user_id="u1",
        item_id="i1",
        event_type=resources_pb2.EVENT_TYPE_ITEM_VIEW,
        position=0,
        dwell_ms=1500,
        device="mobile",
    )
    event = decode_event(data, "e1", 0)
    assert (event.position, event.dwell_ms, event.user_id, event.device) == (
        0,
        1500,
        "u1",
        "mobile",
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff", "not an inkling.v1.Event"),
        (payload(event_id="e1", session_id="s1", event_type=0), "not a known event type"),
        (payload(event_id="e1", session_id="s1", event_type=42), "not a known event type"),
        (payload(event_id="e1", session_id="s1", event_type=1, ts=None), "timestamp is missing"),
        (payload(event_id="e1", event_type=1), "session_id is missing"),
        (payload(event_id="e2", session_id="s1", event_type=1), "differs from event_id"),
    ],
)
def test_poison_payloads_name_their_reason(data, reason):
    with pytest.raises(PoisonEvent, match=reason):
        decode_event(data, "e1", 0)


def test_event_log_rules_reject_what_the_state_cannot_use():
    events = [ev("e1", "click", None), ev("e2", "page_view", "i1"), ev("e3", "click", "i1")]
    checked = validate(events_table(events))
    assert [(r.line, r.reason) for r in checked.rejected] == [
        (1, "item_id is missing for an item event"),
        (2, "item_id must be absent for a page_view"),
    ]
    assert checked.valid.column("event_id").to_pylist() == ["e3"]


# ------------------------------------------------------------------ session state


def test_counts_recent_items_intent_and_last_time():
    events = [
        ev("e1", "page_view", t=0),
        ev("e2", "item_view", "i1", t=1),
        ev("e3", "click", "i1", t=2, dwell=5_000),
        ev("e4", "click", "i2", t=3, dwell=2_000),
        ev("e5", "add_to_cart", "i2", t=4),
    ]
    states, result = run(events)
    row = states["s:s1"].row()
    assert row == {
        "session_recent_items": ["i1", "i2", "i2"],
        "session_page_views": 1,
        "session_item_views": 1,
        "session_clicks": 2,
        "session_carts": 1,
        "session_purchases": 0,
        "session_intent_category": "hats",  # 2 s + 30 s beat 5 s
        "session_last_event_timestamp": datetime.fromtimestamp((T0 + 4) / 1e6, UTC),
    }
    assert list(result.touched) == ["s:s1"]
    assert states["s:s1"].sessions == ["s1"]


def test_intent_weights_follow_the_batch_rules():
    assert intent_weight_ms(ev("e", "click", "i1", dwell=None)) == 1_000  # at least 1 s
    assert intent_weight_ms(ev("e", "click", "i1", dwell=400)) == 1_000
    assert intent_weight_ms(ev("e", "click", "i1", dwell=7_250)) == 7_250
    assert intent_weight_ms(ev("e", "add_to_cart", "i1")) == 30_000
    assert intent_weight_ms(ev("e", "purchase", "i1")) == 60_000
    assert intent_weight_ms(ev("e", "item_view", "i1", dwell=9_000)) is None
    assert intent_weight_ms(ev("e", "page_view")) is None


def test_intent_ties_go_to_the_greatest_category_and_unknown_items_count_as_unknown():
    states, _ = run([ev("e1", "click", "i1"), ev("e2", "click", "i3")])  # shoes, bags: 1 s each
    assert states["s:s1"].row()["session_intent_category"] == "shoes"
    states, _ = run([ev("e1", "click", "nope", dwell=9_000), ev("e2", "click", "i3")])
    assert states["s:s1"].row()["session_intent_category"] == "unknown"
    states, _ = run([ev("e1", "item_view", "i1")])
    assert states["s:s1"].row()["session_intent_category"] == "unknown"


def test_recent_items_keep_the_last_ten_interactions_by_time_then_type_then_id():
    events = [ev(f"e{i:02d}", "click", f"x{i}", t=i) for i in range(15)]
    states, _ = run(events)
    assert states["s:s1"].row()["session_recent_items"] == [f"x{i}" for i in range(5, 15)]
    # One timestamp: add_to_cart (rank 3) after click (rank 2), then by event id.
    tied = [ev("b", "add_to_cart", "i2"), ev("c", "click", "i3"), ev("a", "click", "i1")]
    states, _ = run(tied)
    assert states["s:s1"].row()["session_recent_items"] == ["i1", "i3", "i2"]
    # A late event lands in its place; one older than the ten kept is counted, not listed.
    states, _ = run([*events, ev("late", "click", "old", t=-5), ev("mid", "click", "mid", t=9)])
    state = states["s:s1"]
    assert state.row()["session_recent_items"][:2] == ["x6", "x7"]
    assert "mid" in state.row()["session_recent_items"]
    assert state.row()["session_clicks"] == 17
    assert len(state.recent) == RECENT_ITEMS


event_strategy = st.builds(
    lambda i, kind, item, t, dwell: ev(
        f"e{i}", kind, None if kind == "page_view" else item, t=t, dwell=dwell
    ),
    st.integers(0, 10_000),
    st.sampled_from(["page_view", "item_view", "click", "add_to_cart", "purchase"]),
    st.sampled_from(["i1", "i2", "i3", "i4", "zz"]),
    st.integers(0, 20),
    st.one_of(st.none(), st.integers(0, 20_000)),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(event_strategy, min_size=1, max_size=40, unique_by=lambda e: e.event_id), st.randoms()
)
def test_the_state_does_not_depend_on_arrival_order(events, rnd):
    ordered, _ = run(sorted(events, key=lambda e: (e.ts_us, e.seq)))
    shuffled = list(events)
    rnd.shuffle(shuffled)
    other, _ = run(shuffled)
    assert ordered["s:s1"].row() == other["s:s1"].row()


@settings(max_examples=40, deadline=None)
@given(st.lists(event_strategy, min_size=2, max_size=40, unique_by=lambda e: e.event_id), st.data())
def test_merging_two_states_equals_applying_all_events(events, data):
    cut = data.draw(st.integers(1, len(events) - 1))
    whole, _ = run(events)
    left, _ = run(events[:cut])
    right, _ = run(events[cut:])
    left["s:s1"].merge(right["s:s1"])
    assert left["s:s1"].row() == whole["s:s1"].row()


def test_state_survives_its_redis_encoding():
    states, _ = run([ev("e1", "click", "i1", dwell=3_000), ev("e2", "page_view", t=5)])
    state = states["s:s1"]
    assert SessionState.loads(state.dumps()) == state
    copy = state.copy()
    copy.apply(ev("e3", "click", "i2"), "hats")
    assert copy != state and SessionState.loads(state.dumps()) == state


# ------------------------------------------------------------------ the cross-device rule


def test_a_users_sessions_within_the_gap_share_one_visit():
    phone = ev("e1", "click", "i1", user="u1", session="phone", t=0, dwell=4_000)
    laptop = ev("e2", "add_to_cart", "i2", user="u1", session="laptop", t=60_000_000)
    states, result = run([phone, laptop])
    state = states["u:u1"]
    assert state.sessions == ["phone", "laptop"]
    assert state.row()["session_clicks"] == 1 and state.row()["session_carts"] == 1
    assert state.row()["session_intent_category"] == "hats"
    assert result.joined == {"u:u1": ["phone", "laptop"]}


def test_a_new_session_after_the_gap_starts_a_new_visit_but_the_same_session_continues():
    first = ev("e1", "click", "i1", user="u1", session="a", t=0)
    same = ev("e2", "click", "i1", user="u1", session="a", t=GAP * 3)
    states, _ = run([first, same])
    assert states["u:u1"].row()["session_clicks"] == 2  # the session itself never splits
    later = ev("e3", "click", "i2", user="u1", session="b", t=GAP * 5)
    states, _ = run([later], states)
    assert states["u:u1"].sessions == ["b"]
    assert states["u:u1"].row()["session_clicks"] == 1
    assert begins_new_visit(SessionState(), later, GAP) is False


def test_a_visit_keeps_its_most_recent_sessions():
    events = [ev(f"e{i}", "click", "i1", user="u1", session=f"s{i}", t=i) for i in range(5)]
    states, _ = run(events, max_sessions=3)
    assert states["u:u1"].sessions == ["s2", "s3", "s4"]
    states, _ = run([ev("e9", "click", "i1", user="u1", session="s3", t=9)], states, max_sessions=3)
    assert states["u:u1"].sessions == ["s2", "s4", "s3"]


def test_logging_in_merges_the_sessions_anonymous_events():
    before = [
        ev("a1", "click", "i3", session="s1", t=0, dwell=9_000),
        ev("a2", "page_view", session="s1", t=1),
    ]
    anonymous, _ = run(before)
    after = ev("u1", "click", "i1", user="u1", session="s1", t=2)
    states, _ = run([after], anonymous=anonymous)
    row = states["u:u1"].row()
    assert row["session_clicks"] == 2 and row["session_page_views"] == 1
    assert row["session_intent_category"] == "bags"
    # Merged once: the session is in the visit now.
    states, _ = run(
        [ev("u2", "click", "i1", user="u1", session="s1", t=3)], states, anonymous=anonymous
    )
    assert states["u:u1"].row()["session_clicks"] == 3


# ------------------------------------------------------------------ item counters


def test_counters_bucket_by_minute_and_ignore_events_outside_the_window():
    now_minute = (T0 // 60_000_000) + 10
    minute = 60_000_000
    events = [
        ev("e1", "item_view", "i1", t=10 * minute),
        ev("e2", "item_view", "i1", t=10 * minute + 5),
        ev("e3", "click", "i1", t=9 * minute),
        ev("e4", "click", "i2", t=(10 - COUNTER_WINDOW_MINUTES) * minute),  # just outside
        ev("e5", "add_to_cart", "i1", t=10 * minute),
        # A client clock ahead of the ingest's: bucketed at the receive time.
        ev("e6", "item_view", "i3", t=30 * minute, received=T0 + 10 * minute),
    ]
    increments = counter_increments(events, now_minute)
    assert increments == {
        "i1": {now_minute: [2, 0], now_minute - 1: [0, 1]},
        "i3": {now_minute: [1, 0]},
    }
    assert window_counts(increments["i1"], now_minute) == (2, 1)
    assert window_counts(increments["i1"], now_minute + COUNTER_WINDOW_MINUTES - 2) == (2, 1)
    assert window_counts(increments["i1"], now_minute + COUNTER_WINDOW_MINUTES - 1) == (2, 0)
    assert window_counts(increments["i1"], now_minute + COUNTER_WINDOW_MINUTES) == (0, 0)


# ------------------------------------------------------------------ settings


def test_worker_settings_precedence_and_validation(tmp_path):
    config = tmp_path / "inkling.toml"
    config.write_text("[worker]\npartitions = 4\nbatch_max_events = 100\nfsync = false\n")
    loaded = load_worker_settings(
        config,
        overrides={"batch_max_events": 50},
        environ={"INKLING_WORKER_PARTITIONS": "16", "INKLING_WORKER_FSYNC": "no"},
    )
    assert (loaded.partitions, loaded.batch_max_events, loaded.fsync) == (16, 50, False)
    assert load_worker_settings(environ={}) == WorkerSettings()
    with pytest.raises(ConfigurationError, match="unknown"):
        load_worker_settings(overrides={"partition": 3}, environ={})
    with pytest.raises(ConfigurationError, match="positive"):
        WorkerSettings(batch_max_wait_ms=0)
    with pytest.raises(ConfigurationError, match="half"):
        WorkerSettings(lease_ttl_ms=1000, rebalance_interval_ms=800)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_worker_settings(environ={"INKLING_WORKER_PARTITIONS": "many"})


def test_the_rules_use_the_batch_jobs_constants():
    from batch import features
    from stream_worker import state

    assert state.RECENT_ITEMS == features.SESSION_RECENT_ITEMS
    assert {k: v / 1000 for k, v in state.INTENT_WEIGHTS_MS.items()} == features.INTENT_WEIGHTS
    assert {k: f"session_{v}" for k, v in features.COUNT_COLUMNS.items()} == state.COUNT_FEATURES


def test_a_visit_replaced_within_one_batch_still_has_its_rows_written():
    first = ev("e1", "click", "i1", user="u1", session="a", t=0)
    second = ev("e2", "click", "i2", user="u1", session="b", t=GAP * 2)
    states, result = run([first, second])
    assert [s.sessions for s in result.ended] == [["a"]]
    assert result.ended[0].row()["session_recent_items"] == ["i1"]
    assert result.touched == {"u:u1": states["u:u1"]} and states["u:u1"].sessions == ["b"]
    # A visit loaded unchanged and replaced at once has nothing new to write.
    states, result = run([ev("e3", "click", "i3", user="u1", session="c", t=GAP * 4)], states)
    assert result.ended == []
