"""A stream worker that consumes a Kafka topic (`inkling.events.kafka_bus`) instead of the
Redis streams, with the same effects exactly once.

Ownership comes from Kafka: the worker joins the consumer group ``[kafka] group``
(subscribed to ``[kafka] topic``) and processes the partitions the group assigns it; no
Redis lease is taken. Everything else is the Redis worker's (`stream_worker.worker`): the
micro-batch, the session rule, the one commit script per micro-batch, the log thread and
its in-flight files.

Progress lives in Redis beside the effects, not in Kafka. Per partition (keys under
``inkling:worker:kafka:<topic>:``):

- ``applied:<p>`` and ``logged:<p>``: the online and log watermarks, as entry ids
  ``"<n>-0"`` where ``n`` is the offset *after* the record (Kafka's "next offset to read"),
  so the Redis worker's comparisons work unchanged;
- ``inflight:<p>``: the log files written but not committed;
- ``owner:<p>`` and ``epoch:<p>``: the fence. On assignment the worker increments the
  epoch and stores ``<worker id>:<epoch>`` as the owner; every commit (micro-batch,
  files in flight, log watermark) checks the owner still holds that token inside its
  script, before it writes. A worker that lost the partition in a rebalance (or was
  thrown out of the group while stalled) can then write nothing: its token is gone.

On assignment (and after any failure whose outcome is unknown) the worker pauses the
partition, takes the fence, reads both watermarks, deletes files still in flight, and
seeks to the log watermark; a partition with no progress yet starts at ``start_from``
(its first retained offset, or its end), recorded as both watermarks in the same fenced
step. Records between the log and the online watermark are then only logged again;
records above the online watermark are applied. Kafka's own committed offset is
advisory: the worker commits the log watermark to the group after Redis, for lag
monitoring (and the ingest's backpressure); it is never read back.

So a rebalance or a SIGKILL at any point loses nothing and applies or logs nothing twice,
for the same reasons as on the Redis bus (package docstring), with the fence token in
place of the lease. What is different:

- a record a mapping cannot read (`inkling.events.kafka_bus.RecordMapper`) is
  dead-lettered to the Redis dead-letter stream with its reason, ``source``
  ``kafka:<topic>:<p>`` and ``source_id`` its offset;
- there is no delivery count: a record that crashes the worker every time stops the
  partition (the Redis bus dead-letters it after ``max_deliveries``);
- one user's events must be in one partition (ours are: the producer partitions by the
  routing key); a topic partitioned otherwise lets two workers update one user's state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from inkling.events.bus import F_EVENT, F_EVENT_ID, F_RECEIVED_US
from inkling.events.kafka_bus import (
    KafkaSettings,
    RecordMapper,
    UnmappableRecord,
    ensure_topic,
)
from stream_worker.catalog import Catalog
from stream_worker.logfiles import StreamLogWriter
from stream_worker.online import OnlineLayout
from stream_worker.partitions import Batch, Entry, LogFlush, Partition
from stream_worker.settings import WorkerSettings
from stream_worker.state import PoisonEvent, StreamEvent
from stream_worker.worker import Worker

log = logging.getLogger(__name__)

PREFIX = "inkling:worker:kafka"
_B_ID, _B_EVENT, _B_RECEIVED = F_EVENT_ID.encode(), F_EVENT.encode(), F_RECEIVED_US.encode()
_B_PROBLEM = b"!"

# KEYS: [1] owner, [2] epoch, [3] applied, [4] logged. ARGV: [1] worker id, [2] the start
# entry id for a partition without progress. Takes the fence (epoch + 1, owner = id:epoch),
# sets both watermarks to the start where there are none, returns {token, applied, logged}.
_TAKE = """
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], token)
if not redis.call('GET', KEYS[4]) then
  redis.call('SET', KEYS[4], ARGV[2])
  if not redis.call('GET', KEYS[3]) then redis.call('SET', KEYS[3], ARGV[2]) end
end
return {token, redis.call('GET', KEYS[3]), redis.call('GET', KEYS[4])}
"""


def kafka_key(topic: str, what: str, partition: int) -> str:
    """One of a Kafka partition's progress keys (module docstring)."""
    return f"{PREFIX}:{topic}:{what}:{partition}"


def entry_id(offset: int) -> bytes:
    """The watermark form of a record's offset: the next offset to read, as ``"<n>-0"``."""
    return b"%d-0" % (offset + 1)


def next_offset(watermark: bytes) -> int:
    """The offset to read after a watermark (`entry_id`)."""
    return int(watermark.split(b"-", 1)[0])


class KafkaWorker(Worker):
    """A stream worker reading a Kafka topic (module docstring). No I/O before `run`.

    Args:
        consumer_factory: builds the consumer from librdkafka properties (tests pass
            one that wraps the real client); default: ``confluent_kafka.Consumer``.
    """

    def __init__(
        self,
        client: redis.Redis,
        layout: OnlineLayout,
        catalog: Catalog,
        log_writer: StreamLogWriter,
        settings: WorkerSettings,
        kafka: KafkaSettings,
        clock: Callable[[], float] = time.time,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(client, layout, catalog, log_writer, settings, clock)
        self.kafka = kafka
        self.topic = kafka.topic
        self.mapper = RecordMapper(kafka)
        self._consumer_factory = consumer_factory
        self.consumer: Any = None
        self._tokens: dict[int, str] = {}
        self._next_offset: dict[int, int] = {}
        self._advised: dict[int, int] = {}
        self._take_script = client.register_script(_TAKE)

    # ------------------------------------------------------------------ keys and fence

    def _lease_key(self, partition: int) -> str:
        return kafka_key(self.topic, "owner", partition)

    def _token(self, partition: int) -> str:
        return self._tokens.get(partition, "")

    def _still_owner(self, partition: int) -> bool:
        token = self._tokens.get(partition)
        owner = cast(bytes | None, self.client.get(self._lease_key(partition)))
        return token is not None and owner is not None and owner.decode() == token

    def _applied_key(self, partition: int) -> str:
        return kafka_key(self.topic, "applied", partition)

    def _logged_key(self, partition: int) -> str:
        return kafka_key(self.topic, "logged", partition)

    def _inflight_key(self, partition: int) -> str:
        return kafka_key(self.topic, "inflight", partition)

    def _log_acks(self, job: LogFlush) -> list[bytes]:
        return []  # nothing to acknowledge on Kafka: progress is the watermark

    def _source(self, partition: int) -> str:
        return f"kafka:{self.topic}:{partition}"

    def _source_id(self, entry: Entry) -> bytes | str:
        return str(next_offset(entry.entry_id) - 1)

    # ------------------------------------------------------------------ the group

    def _connect(self) -> None:
        if self.consumer is not None:
            return
        ensure_topic(self.kafka)
        properties = self.kafka.client(
            **{
                "group.id": self.kafka.group,
                "client.id": self.worker_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": self.kafka.start_from,
                "session.timeout.ms": self.kafka.session_timeout_ms,
                "heartbeat.interval.ms": max(100, self.kafka.session_timeout_ms // 10),
                "enable.partition.eof": False,
                "fetch.wait.max.ms": self.kafka.fetch_wait_max_ms,
            }
        )
        if self._consumer_factory is not None:
            self.consumer = self._consumer_factory(properties)
        else:
            from confluent_kafka import Consumer

            self.consumer = Consumer(properties)
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )  # fmt: skip

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Called inside `consume`: take the partitions paused; `_init` seeks them."""
        consumer.assign(partitions)
        consumer.pause(partitions)
        for tp in partitions:
            self._drop(tp.partition)
            self.owned[tp.partition] = Partition(tp.partition)
            self.stats.acquired += 1
        log.info(
            "worker %s: assigned %s", self.worker_id, sorted(tp.partition for tp in partitions)
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Called inside `consume` (or `close`): log what is buffered, then let go."""
        for tp in partitions:
            p = tp.partition
            part = self.owned.get(p)
            try:
                self._await_flush(p)
                if (
                    part is not None
                    and self.owned.get(p) is part
                    and part.entry_ids
                    and part.mode == "live"
                ):
                    self._start_flush(part)
                    self._await_flush(p)
            except (redis.RedisError, OSError) as e:  # the next owner logs them again
                log.warning("worker %s: flush on revoke of %d failed: %s", self.worker_id, p, e)
            self._drop(p)
            self.stats.released += 1
        self._advise()
        log.info("worker %s: revoked %s", self.worker_id, sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        """The group moved on without us: drop, flush nothing (the fence would refuse)."""
        for tp in partitions:
            self._flushing.pop(tp.partition, None)
            self._drop(tp.partition)
            self.stats.lost += 1
        log.warning("worker %s: lost %s", self.worker_id, sorted(tp.partition for tp in partitions))

    def _drop(self, partition: int) -> None:
        super()._drop(partition)
        self._tokens.pop(partition, None)
        self._next_offset.pop(partition, None)

    def _drop_cache(self, partition: int) -> None:
        self._cache.clear()  # a topic's partitioner is not ours to recompute: forget all

    def _init(self, part: Partition) -> None:
        """Take the fence, read the watermarks, delete files in flight, seek, resume."""
        from confluent_kafka import KafkaException, TopicPartition

        p = part.number
        self._await_flush(p)
        if self.owned.get(p) is not part:
            return
        tp = TopicPartition(self.topic, p)
        try:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        except KafkaException as e:  # stays paused in init; tried again next step
            log.warning("worker %s: partition %d: %s", self.worker_id, p, e)
            return
        start = low if self.kafka.start_from == "earliest" else high
        token, applied, logged = cast(
            list[Any],
            self._take_script(
                keys=[
                    self._lease_key(p),
                    kafka_key(self.topic, "epoch", p),
                    self._applied_key(p),
                    self._logged_key(p),
                ],
                args=[self.worker_id, b"%d-0" % start],
            ),
        )
        self._tokens[p] = token.decode() if isinstance(token, bytes) else str(token)
        part.applied, part.logged = applied, logged
        part.clear_buffer()
        leftovers = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in cast(set[Any], self.client.smembers(self._inflight_key(p)))
        )
        if leftovers:
            removed = self.log_writer.remove(leftovers)
            self.stats.cleaned_files += removed
            log.info("partition %d: removed %d uncommitted log file(s)", p, removed)
            self.client.delete(self._inflight_key(p))
        offset = next_offset(logged)
        self._next_offset[p] = offset
        try:
            self.consumer.seek(TopicPartition(self.topic, p, offset))
            self.consumer.resume([tp])
        except KafkaException as e:  # stays paused in init; tried again next step
            log.warning("worker %s: partition %d: %s", self.worker_id, p, e)
            return
        part.mode = "live"
        self._drop_cache(p)
        log.info("worker %s: partition %d from offset %d (applied to %d)", self.worker_id, p,
                 offset, next_offset(applied))  # fmt: skip

    def _fence_failed(self, partitions: Any) -> None:
        """A commit found the fence or a watermark changed: start over from Redis where
        Kafka still assigns the partition to us (the group's next rebalance callback
        settles who owns it)."""
        for p in partitions:
            part = self.owned.get(p)
            if part is not None:
                self._pause(p)
                part.mode = "init"
        self._cache.clear()

    def _requeue(self, fresh: Any) -> None:
        for p in fresh:
            if p in self.owned:
                self._pause(p)
        super()._requeue(fresh)

    def _reset_all(self) -> None:
        for p in self.owned:
            self._pause(p)
        super()._reset_all()

    def _pause(self, partition: int) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        if self.consumer is None:
            return
        try:
            self.consumer.pause([TopicPartition(self.topic, partition)])
        except KafkaException as e:  # not assigned any more: the revoke follows
            log.info("worker %s: pause %d: %s", self.worker_id, partition, e)

    # ------------------------------------------------------------------ the loop

    def rebalance(self) -> None:
        """Group membership is Kafka's (it runs inside `consume`); here only the advisory
        offsets are committed."""
        self._connect()
        self._advise()

    def _advise(self) -> None:
        """Commit each owned partition's log watermark to the group (monitoring only)."""
        from confluent_kafka import KafkaException, TopicPartition

        offsets = []
        for p, part in self.owned.items():
            if part.logged is None or part.mode != "live":
                continue
            at = next_offset(part.logged)
            if self._advised.get(p) != at:
                offsets.append(TopicPartition(self.topic, p, at))
                self._advised[p] = at
        if offsets and self.consumer is not None:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as e:
                log.info("worker %s: advisory commit: %s", self.worker_id, e)

    def _collect(self) -> Batch:
        """Consume up to `batch_max_events` records; wait at most `poll_ms` for the first,
        then `batch_max_wait_ms` for more.

        The first record is awaited with `poll`, which returns as soon as one is there:
        `consume(n, timeout)` waits until it has n records or the timeout passed, which
        held every idle-time record for the whole `poll_ms`."""
        self._connect()
        batch = Batch()
        limit = self.settings.batch_max_events
        first = self.consumer.poll(self.settings.poll_ms / 1000)
        if first is None:
            return batch
        self._take_in([first], batch)
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        while batch.size and batch.size < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            self._take_in(self.consumer.consume(limit - batch.size, remaining), batch)
        # A rebalance inside `consume` may have taken partitions away (or back, unready).
        batch.entries = {
            p: entries
            for p, entries in batch.entries.items()
            if p in self.owned and self.owned[p].mode == "live"
        }
        return batch

    def _take_in(self, messages: list[Any], batch: Batch) -> None:
        for message in messages:
            error = message.error()
            if error is not None:
                log.warning("worker %s: consumer error: %s", self.worker_id, error)
                continue
            p, offset = message.partition(), message.offset()
            part = self.owned.get(p)
            if part is None or part.mode != "live" or offset < self._next_offset.get(p, 0):
                continue  # fetched before a seek, or for a partition not (yet) ready
            self._next_offset[p] = offset + 1
            batch.add(p, [self._entry(p, offset, message)])

    def _entry(self, partition: int, offset: int, message: Any) -> Entry:
        """The record as the worker's entry fields (the Redis bus's layout)."""
        kind, at = message.timestamp()
        try:
            mapped = self.mapper.map(message.value(), message.headers(), at if kind else 0)
        except UnmappableRecord as e:
            value = message.value() or b""
            fields = {_B_ID: b"", _B_EVENT: value, _B_RECEIVED: b"0", _B_PROBLEM: str(e).encode()}
            return Entry(partition, entry_id(offset), fields)
        fields = {
            _B_ID: mapped.event_id.encode(),
            _B_EVENT: mapped.payload,
            _B_RECEIVED: str(mapped.received_us).encode(),
        }
        return Entry(partition, entry_id(offset), fields)

    def _decode(self, entry: Entry) -> StreamEvent:
        problem = (entry.fields or {}).get(_B_PROBLEM)
        if problem is not None:
            raise PoisonEvent(f"unmappable Kafka record: {problem.decode()}")
        return super()._decode(entry)

    def _ack(self, acks: Any) -> None:
        return  # nothing to acknowledge on Kafka

    def trim(self) -> None:
        return  # the topic's retention is Kafka's

    def shutdown(self) -> None:
        """Flush the log buffers, commit the advisory offsets and leave the group."""
        try:
            self.flush_due(force=True)
        except (redis.RedisError, OSError) as e:
            log.warning("worker %s: could not flush the log on the way out: %s", self.worker_id, e)
        if self._log_thread is not None:
            self._log_thread.shutdown(wait=True)
            self._log_thread = None
        self._flushing.clear()
        self._advise()
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: the others are assigned at once
            except Exception as e:  # a closed or broken handle: nothing more to release
                log.warning("worker %s: closing the consumer: %s", self.worker_id, e)
            self.consumer = None
        log.info("worker %s: left the group", self.worker_id)
        self.owned.clear()
        self._cache.clear()
