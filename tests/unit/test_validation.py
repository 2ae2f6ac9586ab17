"""The contract's validation rules, read from the descriptors."""

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from inkling.errors import InvalidInputError
from inkling.serving.validation import validate, violations
from inkling.v1 import (
    event_service_pb2,
    ranking_service_pb2,
    resources_pb2,
    retrieval_service_pb2,
)


def _fields(message):
    return [v.field for v in violations(message)]


def test_a_sane_request_passes():
    request = ranking_service_pb2.RankCandidatesRequest(
        user_id="u1",
        session_id="s1",
        candidates=[ranking_service_pb2.CallerCandidate(item_id=f"i{i}") for i in range(1000)],
        num_results=10,
    )
    validate(request)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ranking_service_pb2.RecommendRequest(num_results=5), "session_id"),
        (ranking_service_pb2.RecommendRequest(session_id="   ", num_results=5), "session_id"),
        (ranking_service_pb2.RecommendRequest(session_id="s", num_results=0), "num_results"),
        (ranking_service_pb2.RecommendRequest(session_id="s", num_results=10**6), "num_results"),
        (ranking_service_pb2.RecommendRequest(session_id="s", num_results=-3), "num_results"),
        (
            ranking_service_pb2.RecommendRequest(session_id="s", user_id="u" * 257, num_results=1),
            "user_id",
        ),
        (
            ranking_service_pb2.RecommendRequest(
                session_id="s", num_results=1, exclude_item_ids=["a", ""]
            ),
            "exclude_item_ids[1]",
        ),
        (
            ranking_service_pb2.RecommendRequest(
                session_id="s", num_results=1, context=resources_pb2.RequestContext(locale="x" * 40)
            ),
            "context.locale",
        ),
        (ranking_service_pb2.RankCandidatesRequest(session_id="s"), "candidates"),
        (
            retrieval_service_pb2.RetrieveCandidatesRequest(session_id="s", num_candidates=5001),
            "num_candidates",
        ),
        (event_service_pb2.TrackEventsRequest(), "events"),
    ],
)
def test_each_broken_rule_names_its_field(request_, field):
    with pytest.raises(InvalidInputError) as info:
        validate(request_)
    assert info.value.field == field
    assert field in str(info.value)


def test_too_many_candidates_is_answered_by_the_count_alone():
    request = ranking_service_pb2.RankCandidatesRequest(
        session_id="s",
        candidates=[ranking_service_pb2.CallerCandidate(item_id="") for _ in range(100_000)],
    )
    found = violations(request)
    assert [v.field for v in found] == ["candidates"]
    assert "100000 elements; at most 1000" in found[0].reason


def test_duplicate_candidates_point_at_both_positions():
    request = ranking_service_pb2.RankCandidatesRequest(
        session_id="s",
        candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in ("a", "b", "a")],
    )
    (violation,) = violations(request)
    assert violation.field == "candidates[2].item_id"
    assert "candidates[0].item_id" in violation.reason


def test_events_need_a_type_a_time_and_known_enum_values():
    event = resources_pb2.Event(event_id="e1", session_id="s1")
    assert _fields(event) == ["event_type", "timestamp"]
    event.event_type = 42  # an enum value this contract does not define
    event.timestamp.CopyFrom(Timestamp(seconds=1))
    assert _fields(event) == ["event_type"]
    event.event_type = resources_pb2.EVENT_TYPE_CLICK
    event.dwell_ms = -1
    assert _fields(event) == ["dwell_ms"]


@given(
    ids=st.lists(st.text(min_size=0, max_size=300), min_size=0, max_size=40),
    num_results=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_validation_accepts_exactly_what_the_rules_allow(ids, num_results):
    request = ranking_service_pb2.RankCandidatesRequest(
        session_id="s",
        candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in ids],
        num_results=num_results,
    )
    expected_ok = (
        0 < len(ids) <= 1000
        and len(set(ids)) == len(ids)
        and all(i.strip() and len(i) <= 256 for i in ids)
        and 0 <= num_results <= 1000
    )
    assert (violations(request) == []) == expected_ok


_TEXT = st.one_of(
    st.just(""), st.sampled_from([" ", "\t", "a" * 257, "é" * 65]), st.text(max_size=6)
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "event_id": _TEXT,
                "user_id": _TEXT,
                "session_id": _TEXT,
                "item_id": _TEXT,
                "event_type": st.integers(0, 7),
                "dwell_ms": st.integers(-(2**40), 2**40),
                "device": _TEXT,
                "position": st.integers(-(2**31), 2**31 - 1),
                "timestamp": st.booleans(),
            }
        ),
        max_size=6,
    )
)
def test_the_quick_checks_skip_only_fields_the_full_checks_find_nothing_in(rows):
    """Each field's shortcut (`quick`) says 'fine' only where the reporting path finds
    nothing, so every violation is still reported with its path."""
    from inkling.serving.validation import _plan, _violations_of_field

    events = []
    for row in rows:
        event = resources_pb2.Event(**{k: v for k, v in row.items() if k != "timestamp"})
        if row["timestamp"]:
            event.timestamp.FromSeconds(1_700_000_000)
        events.append(event)
    request = event_service_pb2.TrackEventsRequest(events=events)
    for event in events:
        for plan in _plan(event.DESCRIPTOR):
            full = list(_violations_of_field(event, plan, ""))
            if plan.quick is not None and plan.quick(event):
                assert full == [], (plan.name, full)
            elif plan.quick is not None:
                assert full, (plan.name, getattr(event, plan.name))
    reported = violations(request)
    slow = [
        v
        for i, event in enumerate(events)
        for plan in _plan(event.DESCRIPTOR)
        for v in _violations_of_field(event, plan, f"events[{i}]")
    ]
    assert sorted(map(str, reported)) == sorted(map(str, slow)) or not events
