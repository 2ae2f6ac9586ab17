"""Kafka as the event bus: the ingest side's producer, the settings both sides share, and
the mapping of a topic's records (ours, or an existing clickstream's) to inkling events.

The Redis Streams bus (`inkling.events.bus`) stays the embedded default; a non-empty
``[kafka] bootstrap_servers`` makes ``inkling serve events`` publish to a Kafka topic and
``inkling worker`` consume it (`stream_worker.kafka_source`).

Topic layout (records this module produces, ``format = "inkling"``):

- one topic (``[kafka] topic``), ``partitions`` partitions (created at start when missing,
  ``create_topic``); a topic with another number of partitions is used as it is;
- key: the routing key (:func:`inkling.events.bus.routing_key`: ``u:<user>``, else
  ``s:<session>``); the partition is chosen by this producer with the Redis bus's function
  (:func:`inkling.events.bus.partition_of`, CRC-32 of the key modulo the topic's partitions),
  so one user's events are in one partition, in the order they were accepted;
- value: the ``inkling.v1.Event`` message, serialized;
- headers :data:`H_EVENT_ID` (the event id) and :data:`H_RECEIVED_US` (the ingest's receive
  time, µs since the epoch, decimal text), and :data:`H_TRACE` when the append was traced.

Delivery: an idempotent producer with ``acks=all``; :meth:`KafkaEventBus.append` returns only
once the broker confirmed every record of the call (a failed or timed-out delivery fails the
call with ``DependencyUnavailableError``, and the client retries).

Dedupe (the existing Redis window, checked before producing and recorded after delivery):
an ``event_id`` recorded within ``dedupe_window_s`` (the same sorted sets as the Redis
bus, :func:`inkling.events.bus.seen_key`) is answered as a duplicate and not produced
again. Because the record is written only after the broker confirmed delivery, nothing
acknowledged is ever lost; the price is that an event can reach the topic twice when a
call fails after its records were delivered (the broker's confirmation lost, or Redis
down between delivery and the record) and the client retries, or when two calls carry
the same new id at the same moment. The worker drops a repeat within one micro-batch
only, so such a duplicate is counted twice downstream; the Redis bus, which dedupes and
appends in one script, has no such window.

Records of an existing topic (``format = "json"`` or ``"protobuf"``) are mapped by
:class:`RecordMapper`; one that cannot be mapped becomes a dead letter with its reason
(the worker writes it to the Redis dead-letter stream), never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from inkling.errors import ConfigurationError, DependencyUnavailableError, OverloadedError
from inkling.events.bus import (
    TOMBSTONES_KEY,
    Appended,
    BusEvent,
    bus_error,
    dedupe_key,
    dedupe_shard,
    found_fields,
    partition_of,
)
from inkling.serving.settings import load_server_settings
from inkling.v1 import resources_pb2

log = logging.getLogger(__name__)

SECTION = "kafka"
H_EVENT_ID = "inkling-event-id"
H_RECEIVED_US = "inkling-received-us"
H_TRACE = "traceparent"
FORMATS = ("inkling", "json", "protobuf")
START_FROM = ("earliest", "latest")
TIMESTAMP_UNITS = ("s", "ms", "us", "iso")
EVENT_FIELDS = (
    "event_id", "user_id", "session_id", "item_id", "event_type", "timestamp", "dwell_ms",
    "scroll_depth", "device", "surface", "position", "request_id",
)  # fmt: skip
"""The inkling.v1.Event fields a JSON record can be mapped to (`field_map`)."""
EVENT_TYPES = {
    "page_view": resources_pb2.EVENT_TYPE_PAGE_VIEW,
    "item_view": resources_pb2.EVENT_TYPE_ITEM_VIEW,
    "click": resources_pb2.EVENT_TYPE_CLICK,
    "add_to_cart": resources_pb2.EVENT_TYPE_ADD_TO_CART,
    "purchase": resources_pb2.EVENT_TYPE_PURCHASE,
}


@dataclass(frozen=True)
class KafkaSettings:
    """The Kafka bus (``[kafka]`` table, ``INKLING_KAFKA_<FIELD>``), read by the ingest
    server and the stream workers alike."""

    bootstrap_servers: str = ""
    """``host:port[,host:port]`` of the brokers; empty: the Redis Streams bus (the default)."""
    topic: str = "inkling-events"
    """The topic events are produced to and consumed from."""
    group: str = "inkling-workers"
    """The workers' consumer group: Kafka assigns its members the topic's partitions."""
    partitions: int = 4
    """Partitions of the topic when this process creates it (`create_topic`)."""
    replication_factor: int = 1
    """Replicas of the topic when this process creates it (3 on a production cluster)."""
    create_topic: bool = True
    """Create the topic at start when it does not exist; false: a missing topic is an error."""
    format: str = "inkling"
    """What a record's value holds: ``inkling`` (what `inkling serve events` produces),
    ``protobuf`` (``inkling.v1.Event`` bytes from another producer, without our headers)
    or ``json`` (an object, mapped by `field_map`)."""
    field_map: dict[str, str] = field(default_factory=dict)
    """For ``json``: inkling field -> the record's field (dotted for nested objects), e.g.
    ``{user_id = "user.id", item_id = "sku"}``; unmapped fields are read under their own
    name. Fields: event_id, user_id, session_id, item_id, event_type, timestamp, dwell_ms,
    scroll_depth, device, surface, position, request_id."""
    event_types: dict[str, str] = field(default_factory=dict)
    """For ``json``: the record's event type value -> ours (page_view, item_view, click,
    add_to_cart, purchase), e.g. ``{pdp_view = "item_view"}``; our own names are always
    understood."""
    timestamp_unit: str = "ms"
    """For ``json``: a number timestamp in ``s``, ``ms`` or ``us`` since the epoch, or
    ``iso`` (ISO 8601 text with a UTC offset)."""
    start_from: str = "earliest"
    """Where a worker starts in a partition it has no progress for: ``earliest`` (the whole
    retained topic) or ``latest`` (only what comes after)."""
    delivery_timeout_s: float = 10.0
    """The most the ingest waits for the brokers to confirm a call's records."""
    fetch_wait_max_ms: int = 100
    """The most a worker's fetch waits at the broker for records (librdkafka
    ``fetch.wait.max.ms``). Apache Kafka answers a waiting fetch as soon as records
    arrive, so this only bounds idle round trips; a broker that holds every fetch to the
    end adds up to this much to each record's latency."""
    session_timeout_ms: int = 10_000
    """A worker that sends no heartbeat for this long leaves the group; its partitions
    move to the others."""
    client_config: dict[str, str] = field(default_factory=dict)
    """More librdkafka properties for every client (e.g. ``security.protocol``,
    ``sasl.mechanism``), as ``key=value,key=value`` in the environment."""

    @property
    def enabled(self) -> bool:
        return bool(self.bootstrap_servers.strip())

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigurationError(
                f"[kafka] format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        if self.start_from not in START_FROM:
            raise ConfigurationError(
                f"[kafka] start_from must be one of {', '.join(START_FROM)}, got "
                f"{self.start_from!r}"
            )
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ConfigurationError(
                f"[kafka] timestamp_unit must be one of {', '.join(TIMESTAMP_UNITS)}, got "
                f"{self.timestamp_unit!r}"
            )
        unknown = sorted(set(self.field_map) - set(EVENT_FIELDS))
        if unknown:
            raise ConfigurationError(
                f"[kafka] field_map names unknown inkling fields: {', '.join(unknown)} "
                f"(known: {', '.join(EVENT_FIELDS)})"
            )
        wrong = sorted(v for v in self.event_types.values() if v not in EVENT_TYPES)
        if wrong:
            raise ConfigurationError(
                f"[kafka] event_types maps to unknown event types: {', '.join(wrong)} "
                f"(known: {', '.join(EVENT_TYPES)})"
            )
        for name in ("partitions", "replication_factor", "fetch_wait_max_ms"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"[kafka] {name} must be at least 1")
        if not self.topic.strip():
            raise ConfigurationError("[kafka] topic must not be empty")

    def client(self, **more: Any) -> dict[str, Any]:
        """librdkafka properties of a client of these brokers."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_config, **more}


def load_kafka_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> KafkaSettings:
    """The ``[kafka]`` table, the environment (``INKLING_KAFKA_*``) and flags."""
    return load_server_settings(KafkaSettings, SECTION, config_file, overrides, environ)


def ensure_topic(settings: KafkaSettings, timeout_s: float = 10.0) -> int:
    """The topic's number of partitions, creating the topic first when it is missing and
    `create_topic` allows.

    Raises:
        ConfigurationError: the topic is missing and may not be created.
        DependencyUnavailableError: the brokers did not answer in time.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.client())
    try:
        # Metadata of every topic: naming one would let a broker auto-create it, with its
        # default number of partitions.
        found = admin.list_topics(timeout=timeout_s).topics.get(settings.topic)
        if found is not None and found.error is None and found.partitions:
            return len(found.partitions)
        if not settings.create_topic:
            raise ConfigurationError(
                f"Kafka topic {settings.topic!r} does not exist (create_topic = false)"
            )
        wanted = NewTopic(settings.topic, settings.partitions, settings.replication_factor)
        for future in admin.create_topics([wanted], request_timeout=timeout_s).values():
            try:
                future.result(timeout_s)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            topic = admin.list_topics(timeout=timeout_s).topics.get(settings.topic)
            if topic is not None and topic.error is None and topic.partitions:
                return len(topic.partitions)
            time.sleep(0.05)
    except KafkaException as e:
        raise DependencyUnavailableError(f"the Kafka brokers are unavailable: {e}") from e
    raise DependencyUnavailableError(f"Kafka topic {settings.topic!r} did not appear in time")


# --- mapping records ------------------------------------------------------------------------


class UnmappableRecord(ValueError):
    """A record that cannot become an inkling event; the message is the reason."""


@dataclass(frozen=True)
class MappedRecord:
    """A record as an inkling event: its id, the serialized ``inkling.v1.Event`` and the
    receive time (µs)."""

    event_id: str
    payload: bytes
    received_us: int


def _header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


class RecordMapper:
    """Turns a topic's records into inkling events, as `KafkaSettings.format` says."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.format = settings.format
        self.paths = {name: settings.field_map.get(name, name).split(".") for name in EVENT_FIELDS}
        self.types = {**EVENT_TYPES, **{k: EVENT_TYPES[v] for k, v in settings.event_types.items()}}
        self.unit = settings.timestamp_unit

    def map(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
        timestamp_ms: int,
    ) -> MappedRecord:
        """One record's event.

        The receive time is the :data:`H_RECEIVED_US` header when present, else the
        record's own timestamp.

        Raises:
            UnmappableRecord: why the record is not an event this mapping understands.
        """
        received = _header(headers, H_RECEIVED_US)
        try:
            received_us = int(received) if received is not None else timestamp_ms * 1000
        except ValueError:
            raise UnmappableRecord(f"header {H_RECEIVED_US} is not a number") from None
        if value is None:
            raise UnmappableRecord("the record has no value (a tombstone)")
        if self.format == "json":
            event = self._from_json(value)
            return MappedRecord(event.event_id, event.SerializeToString(), received_us)
        event_id = _header(headers, H_EVENT_ID) if self.format == "inkling" else None
        if event_id is None:
            try:
                message = resources_pb2.Event.FromString(value)
            except DecodeError as e:
                raise UnmappableRecord(f"the value is not an inkling.v1.Event: {e}") from None
            if not message.event_id:
                raise UnmappableRecord("the event has no event_id")
            return MappedRecord(message.event_id, value, received_us)
        try:
            return MappedRecord(event_id.decode(), value, received_us)
        except UnicodeDecodeError:
            raise UnmappableRecord(f"header {H_EVENT_ID} is not UTF-8") from None

    def _get(self, record: Mapping[str, Any], name: str) -> Any:
        value: Any = record
        for step in self.paths[name]:
            if not isinstance(value, Mapping) or step not in value:
                return None
            value = value[step]
        return value

    def _from_json(self, value: bytes) -> resources_pb2.Event:
        try:
            record = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnmappableRecord(f"the value is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise UnmappableRecord(f"the value is JSON {type(record).__name__}, not an object")
        event = resources_pb2.Event()
        for name in ("event_id", "session_id", "event_type", "timestamp"):
            if self._get(record, name) in (None, ""):
                where = ".".join(self.paths[name])
                raise UnmappableRecord(f"{name}: field {where!r} is missing")
        for name in ("event_id", "user_id", "session_id", "item_id", "device", "surface",
                     "request_id"):  # fmt: skip
            found = self._get(record, name)
            if found is None:
                continue
            if isinstance(found, bool) or not isinstance(found, str | int):
                raise UnmappableRecord(f"{name}: {type(found).__name__} is not text")
            setattr(event, name, str(found))
        kind = self._get(record, "event_type")
        if not isinstance(kind, str) or kind not in self.types:
            raise UnmappableRecord(f"event_type: {kind!r} is not a mapped event type")
        event.event_type = cast(Any, self.types[kind])
        event.timestamp.FromMicroseconds(self._timestamp_us(self._get(record, "timestamp")))
        for name, kinds in (("dwell_ms", int), ("position", int), ("scroll_depth", float)):
            found = self._get(record, name)
            if found is None:
                continue
            if isinstance(found, bool) or not isinstance(found, int | float):
                raise UnmappableRecord(f"{name}: {found!r} is not a number")
            if kinds is int and found != int(found):
                raise UnmappableRecord(f"{name}: {found!r} is not a whole number")
            try:
                setattr(event, name, kinds(found))
            except ValueError as e:  # out of the field's range
                raise UnmappableRecord(f"{name}: {e}") from None
        return event

    def _timestamp_us(self, value: Any) -> int:
        if self.unit == "iso":
            if not isinstance(value, str):
                raise UnmappableRecord(f"timestamp: {value!r} is not ISO 8601 text")
            try:
                at = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise UnmappableRecord(f"timestamp: {value!r} is not ISO 8601") from None
            if at.tzinfo is None:
                raise UnmappableRecord(f"timestamp: {value!r} has no UTC offset")
            return int(at.timestamp() * 1_000_000)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise UnmappableRecord(f"timestamp: {value!r} is not a number of {self.unit}")
        scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[self.unit]
        return int(value * scale)


# --- the producer ---------------------------------------------------------------------------


# KEYS: the dedupe sets. ARGV: [1] window ms, [2] 'check' or 'record', then pairs (slot, id).
# check: per id 1 when remembered within the window, else 0. record: remembers each id not
# remembered within the window (first time wins), trims expired ids (bounded), returns {}.
_DEDUPE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local out = {}
for i = 3, #ARGV, 2 do
  local key, id = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local at = redis.call('ZSCORE', key, id)
  local live = at and tonumber(at) >= cutoff
  if ARGV[2] == 'check' then
    out[#out + 1] = live and 1 or 0
  elseif not live then
    redis.call('ZADD', key, now, id)
  end
end
if ARGV[2] == 'record' then
  for i = 1, #KEYS do
    local expired = redis.call('ZCOUNT', KEYS[i], '-inf', '(' .. cutoff)
    if expired > 0 then redis.call('ZREMRANGEBYRANK', KEYS[i], 0, math.min(expired, 1000) - 1) end
  end
end
return out
"""


class KafkaEventBus:
    """The ingest's bus on Kafka (what `events_server.core.Bus` asks for): produces each
    accepted event to the topic, deduplicated by the Redis window (module docstring).

    Args:
        client: an asyncio client of the Redis that keeps the dedupe window and the
            tombstones; the bus does not close it.
        settings: the Kafka settings.
        partitions: the topic's number of partitions (`ensure_topic`).
        dedupe_window_s: how long an event id is remembered after its delivery.
        lag_cache_s: how long a lag measurement is reused.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        settings: KafkaSettings,
        partitions: int,
        *,
        dedupe_window_s: int,
        lag_cache_s: float = 0.5,
    ) -> None:
        self.client = client
        self.settings = settings
        self.partitions = partitions
        self.dedupe_window_s = dedupe_window_s
        self.lag_cache_s = lag_cache_s
        self._dedupe = client.register_script(_DEDUPE_LUA)
        self._producer: Any = None
        self._watcher: Any = None
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self._lag: dict[int, int] | None = None
        self._lag_at = 0.0
        self._lag_lock = asyncio.Lock()

    def start(self) -> None:
        """Create the producer and the thread that serves its delivery reports."""
        from confluent_kafka import Producer

        self._producer = Producer(
            self.settings.client(
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 2,
                    "delivery.timeout.ms": int(self.settings.delivery_timeout_s * 1000),
                }
            )
        )
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.05)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (at most `timeout_s`) and stop."""
        if self._producer is None:
            return
        self._closing.set()
        if self._poller is not None:
            self._poller.join(5)
        self._producer.flush(timeout_s)
        if self._watcher is not None:
            self._watcher.close()
        self._producer = None

    def partition(self, key: str) -> int:
        return partition_of(key, self.partitions)

    async def forgotten(self, fields: Sequence[str]) -> set[str]:
        """Which of the tombstone fields are tombstoned (Redis, as on the Redis bus)."""
        if not fields:
            return set()
        try:
            found = await self.client.hmget(TOMBSTONES_KEY, list(fields))  # type: ignore[misc]
        except RedisError as e:
            raise bus_error(e) from e
        return found_fields(fields, found)

    async def append(
        self, events: Sequence[BusEvent], received_us: int, traceparent: str = ""
    ) -> list[Appended]:
        """Produce the events not seen within the dedupe window, wait for the brokers to
        confirm all of them, then remember their ids.

        Raises:
            DependencyUnavailableError: Redis or the brokers failed, or delivery was not
                confirmed within `delivery_timeout_s` (some records may have been
                delivered: a retry may then put them on the topic twice).
            OverloadedError: the producer's local queue is full.
        """
        if not events:
            return []
        if self._producer is None:
            raise DependencyUnavailableError("the Kafka producer is not started")
        shards = sorted({dedupe_shard(e.event_id) for e in events})
        slot = {s: i + 1 for i, s in enumerate(shards)}
        keys = [dedupe_key(s) for s in shards]
        pairs: list[Any] = []
        for e in events:
            pairs += (slot[dedupe_shard(e.event_id)], e.event_id)
        window_ms = self.dedupe_window_s * 1000
        try:
            seen = await self._dedupe(keys=keys, args=[window_ms, "check", *pairs])
        except RedisError as error:
            raise bus_error(error) from error
        loop = asyncio.get_running_loop()
        outcomes: list[Appended] = []
        futures: list[asyncio.Future[int]] = []
        first: set[str] = set()
        headers_common = [(H_RECEIVED_US, str(received_us).encode())]
        if traceparent:
            headers_common.append((H_TRACE, traceparent.encode()))
        for e, was_seen in zip(events, seen, strict=True):
            p = self.partition(e.routing_key)
            if was_seen or e.event_id in first:
                outcomes.append(Appended(p, None))
                continue
            first.add(e.event_id)
            future: asyncio.Future[int] = loop.create_future()
            futures.append(future)
            outcomes.append(Appended(p, ""))
            try:
                self._producer.produce(
                    self.settings.topic,
                    value=e.payload,
                    key=e.routing_key.encode(),
                    partition=p,
                    headers=[(H_EVENT_ID, e.event_id.encode()), *headers_common],
                    on_delivery=_resolver(loop, future),
                )
            except BufferError as error:
                for f in futures[:-1]:
                    f.cancel()  # the queued ones still go; their outcome is not awaited
                raise OverloadedError(
                    f"the Kafka producer's queue is full: {error}", retry_after_s=1.0
                ) from error
        try:
            offsets = await asyncio.wait_for(
                asyncio.gather(*futures), self.settings.delivery_timeout_s + 1
            )
        except TimeoutError:
            raise DependencyUnavailableError(
                f"Kafka did not confirm delivery within {self.settings.delivery_timeout_s:g} s"
            ) from None
        delivered = [e for e, o in zip(events, outcomes, strict=True) if o.entry_id == ""]
        if delivered:
            record: list[Any] = []
            for e in delivered:
                record += (slot[dedupe_shard(e.event_id)], e.event_id)
            try:
                await self._dedupe(keys=keys, args=[window_ms, "record", *record])
            except RedisError as error:
                raise bus_error(error) from error
        it = iter(offsets)
        return [
            Appended(o.partition, f"{self.settings.topic}:{o.partition}:{next(it)}")
            if o.entry_id == ""
            else o
            for o in outcomes
        ]

    async def lag(self) -> dict[int, int]:
        """Per partition, records the workers' group has not logged yet (the topic's end
        minus the group's committed offset, which workers advance as they log), at most
        `lag_cache_s` old; a partition the group never committed counts from its start."""
        if self._lag is not None and time.monotonic() - self._lag_at < self.lag_cache_s:
            return self._lag
        async with self._lag_lock:
            if self._lag is not None and time.monotonic() - self._lag_at < self.lag_cache_s:
                return self._lag
            self._lag = await asyncio.to_thread(self.measure_lag)
            self._lag_at = time.monotonic()
            return self._lag

    def measure_lag(self) -> dict[int, int]:
        """:meth:`lag`, measured now (blocking).

        Raises:
            DependencyUnavailableError: the brokers did not answer.
        """
        if self._watcher is None:
            self._watcher = group_watcher(self.settings)
        return group_lag(self._watcher, self.settings.topic, self.partitions)


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int]) -> Any:
    """A delivery callback (on the poll thread) that settles `future` on `loop`."""

    def settle(error: Any, message: Any) -> None:
        def done() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(
                    DependencyUnavailableError(f"Kafka did not take the event: {error}")
                )
            else:
                future.set_result(int(message.offset()))

        loop.call_soon_threadsafe(done)

    return settle


def group_watcher(settings: KafkaSettings) -> Any:
    """A consumer handle of the workers' group that never subscribes: it only reads the
    group's committed offsets and the topic's ends."""
    from confluent_kafka import Consumer

    return Consumer(settings.client(**{"group.id": settings.group, "enable.auto.commit": False}))


def group_lag(watcher: Any, topic: str, partitions: int, timeout_s: float = 5.0) -> dict[int, int]:
    """Per partition: the topic's end offset minus the group's committed offset."""
    from confluent_kafka import KafkaException, TopicPartition

    try:
        watcher.list_topics(timeout=timeout_s)  # a fresh handle learns the partitions
        wanted = [TopicPartition(topic, p) for p in range(partitions)]
        committed = {tp.partition: tp.offset for tp in watcher.committed(wanted, timeout=timeout_s)}
        out = {}
        for p in range(partitions):
            low, high = watcher.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            at = committed.get(p, -1)
            out[p] = max(0, high - (at if at >= 0 else low))
        return out
    except KafkaException as e:
        raise DependencyUnavailableError(f"the Kafka brokers are unavailable: {e}") from e
