"""Mapping a Kafka topic's records to inkling events (`inkling.events.kafka_bus.RecordMapper`)
and the `[kafka]` settings' checks: pure functions, no broker."""

from __future__ import annotations

import json
import re

import pytest

from inkling.errors import ConfigurationError
from inkling.events.kafka_bus import (
    H_EVENT_ID,
    H_RECEIVED_US,
    KafkaSettings,
    RecordMapper,
    UnmappableRecord,
    load_kafka_settings,
)
from inkling.v1 import resources_pb2

MAPPED = KafkaSettings(
    format="json",
    field_map={
        "event_id": "id",
        "user_id": "user.id",
        "session_id": "sid",
        "item_id": "sku",
        "event_type": "type",
        "timestamp": "ts",
    },
    event_types={"pdp_view": "item_view"},
)


def record(**fields: object) -> bytes:
    base: dict[str, object] = {
        "id": "e1", "user": {"id": "u1"}, "sid": "s1", "sku": "i1", "type": "pdp_view",
        "ts": 1_700_000_000_123,
    }  # fmt: skip
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_a_json_record_becomes_the_event_its_mapping_names():
    mapped = RecordMapper(MAPPED).map(record(dwell_ms=1200, position=3), None, 1_700_000_001_000)
    event = resources_pb2.Event.FromString(mapped.payload)
    assert mapped.event_id == "e1" and mapped.received_us == 1_700_000_001_000_000
    assert (event.user_id, event.session_id, event.item_id) == ("u1", "s1", "i1")
    assert event.event_type == resources_pb2.EVENT_TYPE_ITEM_VIEW
    assert event.timestamp.ToMicroseconds() == 1_700_000_000_123_000
    assert (event.dwell_ms, event.position) == (1200, 3)


def test_our_own_type_names_and_iso_timestamps_are_understood():
    settings = KafkaSettings(format="json", timestamp_unit="iso")
    value = json.dumps(
        {"event_id": "e", "session_id": "s", "event_type": "click", "item_id": "i",
         "timestamp": "2026-01-02T03:04:05.5Z"}
    ).encode()  # fmt: skip
    event = resources_pb2.Event.FromString(RecordMapper(settings).map(value, None, 0).payload)
    assert event.event_type == resources_pb2.EVENT_TYPE_CLICK
    assert event.timestamp.ToJsonString() == "2026-01-02T03:04:05.500Z"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{oops", "the value is not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (record(sid=None), "session_id: field 'sid' is missing"),
        (record(type="teleport"), "event_type: 'teleport' is not a mapped event type"),
        (record(ts="soon"), "timestamp: 'soon' is not a number of ms"),
        (record(user={"id": ["a"]}), "user_id: list is not text"),
        (record(dwell_ms=1.5), "dwell_ms: 1.5 is not a whole number"),
        (record(position="top"), "position: 'top' is not a number"),
    ],
)
def test_a_record_the_mapping_cannot_read_is_refused_with_its_reason(value, reason):
    with pytest.raises(UnmappableRecord, match=re.escape(reason)):
        RecordMapper(MAPPED).map(value, None, 0)


def test_inkling_records_take_the_id_and_receive_time_from_their_headers():
    event = resources_pb2.Event(event_id="e9", session_id="s")
    headers = [(H_EVENT_ID, b"e9"), (H_RECEIVED_US, b"123")]
    mapped = RecordMapper(KafkaSettings()).map(event.SerializeToString(), headers, 5)
    assert (mapped.event_id, mapped.received_us) == ("e9", 123)
    with pytest.raises(UnmappableRecord, match=r"not an inkling\.v1\.Event"):
        RecordMapper(KafkaSettings(format="protobuf")).map(b"\xff\xff", None, 0)
    with pytest.raises(UnmappableRecord, match="no value"):
        RecordMapper(KafkaSettings()).map(None, headers, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": "avro"}, "format must be one of inkling, json, protobuf"),
        ({"start_from": "middle"}, "start_from must be one of earliest, latest"),
        ({"field_map": "colour=c"}, "field_map names unknown inkling fields: colour"),
        ({"event_types": "x=teleport"}, "event_types maps to unknown event types: teleport"),
        ({"partitions": "0"}, "partitions must be at least 1"),
    ],
)
def test_bad_kafka_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        load_kafka_settings(overrides=overrides, environ={})


def test_kafka_is_off_unless_brokers_are_named():
    assert not load_kafka_settings(environ={}).enabled
    on = load_kafka_settings(environ={"INKLING_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"})
    assert on.enabled and on.client()["bootstrap.servers"] == "127.0.0.1:9092"
