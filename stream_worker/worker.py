"""The worker loop: own partitions, read micro-batches, apply, log, commit, acknowledge.

One thread reads, applies and commits, in order: there is never a write racing a
lease renewal or a commit of the same worker. A second thread writes the Parquet log
and commits the log watermark, one partition's buffer at a time. The design
(idempotence, ownership, the session rule) is described in the `stream_worker` package
docstring.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import hiredis
import pyarrow as pa
import redis
from opentelemetry import trace
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from inkling.events.bus import (
    F_EVENT,
    F_EVENT_ID,
    F_REASON,
    F_RECEIVED_US,
    F_SERVE,
    F_SOURCE,
    F_SOURCE_ID,
    F_TRACE,
    GROUP,
    TOMBSTONES_KEY,
    TRIM_SCRIPT,
    check_partitions,
    dead_letter_key,
    found_fields,
    is_cluster,
    is_forgotten,
    owners_fields,
    partition_of,
    routing_key,
    stream_key,
)
from inkling.events.schema import EVENT_SCHEMA, row_problem
from inkling.events.servelog import record_problem, serve_table
from inkling.feature_store.cluster import slot_tag
from inkling.telemetry.clock import CpuClock, StageClock
from inkling.telemetry.context import links_to
from inkling.telemetry.instruments import (
    DEAD_LETTERS,
    EVENT_FRESHNESS,
    STAGE_DURATION,
    WORKER_BATCH_SIZE,
)
from inkling.v1.resources_pb2 import ServeRecord
from stream_worker.catalog import Catalog
from stream_worker.cluster_commit import (
    bandit_calls,
    counter_calls,
    counter_events,
    row_calls,
)
from stream_worker.commit import (
    COMMIT_BATCH,
    COMMIT_LOG,
    REGISTER_INFLIGHT,
    CommitError,
    applied_key,
    inflight_key,
    logged_key,
    parse_id,
    state_key,
)
from stream_worker.logfiles import PlannedFile, StreamLogWriter
from stream_worker.online import (
    OnlineLayout,
    SessionRow,
    SessionRowEncoder,
    counter_arguments,
    counter_command,
    session_commands,
)
from stream_worker.ownership import Leases, fair_share, lease_key, preference
from stream_worker.partitions import (
    Batch,
    Entry,
    LogFlush,
    LogFlushed,
    Partition,
    Poison,
    WorkerStats,
)
from stream_worker.resp import Words, bulk, script_call
from stream_worker.rewards import REWARD_EVENT, BanditLearner
from stream_worker.settings import WorkerSettings
from stream_worker.state import (
    COUNTER_WINDOW_MINUTES,
    PoisonEvent,
    SessionState,
    StreamEvent,
    apply_events,
    counter_increments,
    decode_event,
    events_table,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("inkling.worker")

Command = tuple[bytes | str | int, ...]

_B_ID, _B_EVENT, _B_RECEIVED = F_EVENT_ID.encode(), F_EVENT.encode(), F_RECEIVED_US.encode()
_B_TRACE = F_TRACE.encode()
_B_SERVE = F_SERVE.encode()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One stream worker. No I/O happens before `run` (or `step`)."""

    def __init__(
        self,
        client: redis.Redis,
        layout: OnlineLayout,
        catalog: Catalog,
        log_writer: StreamLogWriter,
        settings: WorkerSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        """On a Redis Cluster: partition keys carry hash tags, and a batch commits per
        partition in two steps (`stream_worker.cluster_commit`)."""
        self._state_parts = settings.partitions if self.cluster else None
        self.layout = layout
        self.catalog = catalog
        self.log_writer = log_writer
        self.settings = settings
        self.worker_id = settings.worker_id or default_worker_id()
        self.leases = Leases(client, self.worker_id, settings.lease_ttl_ms)
        self.stats = WorkerStats()
        self.bandit = BanditLearner()
        self.owned: dict[int, Partition] = {}
        self._clock = clock
        # State key -> the state as stored in Redis: serialized, so that a large cache
        # adds no objects for the garbage collector's full passes to walk.
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._counter_items: dict[str, int] = {}  # item -> the minute it last changed
        self._refresh_queue: list[str] = []
        self._refresh_total = 0
        self._refresh_began = 0.0  # monotonic
        self._register = client.register_script(REGISTER_INFLIGHT)
        self._commit_log = client.register_script(COMMIT_LOG)
        self._commit_batch = client.register_script(COMMIT_BATCH)
        self._trim = client.register_script(TRIM_SCRIPT)
        # Log flushes run on their own thread (started with the first), one at a time, so
        # a flush (tens of ms under load) never holds up a micro-batch. At most one per
        # partition is in flight.
        self._log_thread: ThreadPoolExecutor | None = None
        self._flushing: dict[int, tuple[LogFlush, Future[LogFlushed]]] = {}
        self._next_flush = 0.0  # monotonic; see flush_due
        self._next: dict[str, float] = {}
        self._stop = threading.Event()
        self.cpu = CpuClock()
        """CPU of the loop's thread per stage (`inkling.stage.cpu_time`): housekeeping,
        read, decode, validate, load_states, apply, encode, commit, after_commit,
        log_handoff; the log thread's own clock adds log_write and log_commit."""
        self._rows = SessionRowEncoder(layout)
        # SET <state key> <state> PX <ttl>, as the commit reads it, framed but for the two.
        self._set_state = (bulk(5) + bulk("SET"), bulk("PX") + bulk(settings.state_ttl_s * 1000))

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> WorkerStats:
        """Process until `stop` is set; then finish the batch, release leases, return."""
        if stop is not None:
            self._stop = stop
        log.info("worker %s: starting, %d partitions", self.worker_id, self.settings.partitions)
        self.warm()
        if self.cluster:
            slot_tag(0)  # builds the slot tag table (a fraction of a second) before any lease
        backoff = 0.1
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                    backoff = 0.1
                except (redis.RedisError, OSError) as e:
                    log.warning("worker %s: %s; retrying in %.1fs", self.worker_id, e, backoff)
                    self._reset_all()
                    if self.cluster:  # a node may have failed over: re-read the layout
                        try:
                            cast(redis.RedisCluster, self.client).nodes_manager.initialize()
                        except redis.RedisError as again:
                            log.warning("worker %s: cluster layout: %s", self.worker_id, again)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.shutdown()
        return self.stats

    @staticmethod
    def warm() -> None:
        """Pay one-time costs before the first batch: a process's first Arrow cast builds
        its kernel registry (~200 ms), which made the first micro-batch the slowest."""
        now_us = int(time.time() * 1_000_000)
        event = StreamEvent("warm", None, "warm", "warm", "click", now_us, received_us=now_us)
        events_table([event]).cast(EVENT_SCHEMA)

    def step(self) -> int:
        """One iteration: housekeeping when due, then one micro-batch; entries handled."""
        mono = time.monotonic()
        if self._due("rebalance", self.settings.rebalance_interval_ms / 1000, mono):
            self.rebalance()
        if self._due("counters", self.settings.counter_refresh_s, mono):
            self.refresh_counters()
        self._refresh_some()
        if self._due("trim", self.settings.trim_interval_s, mono):
            self.trim()
        if self._due("stats", 30.0, mono):
            log.info("worker %s: %s", self.worker_id, self.stats.as_dict())
        for part in list(self.owned.values()):
            if part.mode == "init":
                self._init(part)
            if part.mode == "claim":
                self._claim(part)
        self.cpu.lap("housekeeping")
        clock = StageClock()
        batch = self._collect()
        self.cpu.lap("read")
        if batch.size:
            with tracer.start_as_current_span(
                "worker.batch",
                start_time=clock.stage_start_ns,
                links=links_to(_traceparents(batch)),
                attributes={
                    "inkling.entries": batch.size,
                    "inkling.partitions": len(batch.entries),
                },
            ):
                clock.lap("read")
                if self.cluster:  # a commit per partition: see stream_worker.cluster_commit
                    for p, entries in list(batch.entries.items()):
                        if p in self.owned:
                            self._process(Batch({p: entries}), clock)
                else:
                    self._process(batch, clock)
        self.flush_due()
        self.cpu.lap("log_handoff")
        if not batch.size and not any(p.mode in ("live", "pending") for p in self.owned.values()):
            self._stop.wait(min(self.settings.poll_ms, self.settings.rebalance_interval_ms) / 1000)
        return batch.size

    def _due(self, what: str, interval_s: float, mono: float) -> bool:
        if mono >= self._next.get(what, 0.0):
            self._next[what] = mono + interval_s
            return True
        return False

    def shutdown(self) -> None:
        """Flush the log buffers, give up every partition, leave the live workers (best effort)."""
        try:
            self.flush_due(force=True)
        except (redis.RedisError, OSError) as e:
            log.warning("worker %s: could not flush the log on the way out: %s", self.worker_id, e)
        if self._log_thread is not None:
            self._log_thread.shutdown(wait=True)  # a flush that failed above may still run
            self._log_thread = None
        self._flushing.clear()
        try:
            self.leases.release(sorted(self.owned))
            self.leases.leave()
            log.info("worker %s: released %s", self.worker_id, sorted(self.owned))
        except redis.RedisError as e:
            log.warning("worker %s: could not release leases: %s", self.worker_id, e)
        self.owned.clear()
        self._cache.clear()

    def _reset_all(self) -> None:
        for part in self.owned.values():
            part.mode = "init"
        self._cache.clear()

    # ------------------------------------------------------------------ ownership

    def rebalance(self) -> None:
        """Heartbeat, renew leases, and move toward a fair share of the partitions."""
        check_partitions(self.client, self.settings.partitions)
        now_ms = int(self._clock() * 1000)
        live = self.leases.heartbeat(now_ms)
        for p in self.leases.renew(sorted(self.owned)):
            log.warning("worker %s: lost the lease of partition %d", self.worker_id, p)
            self._drop(p)
            self.stats.lost += 1
        target = fair_share(self.settings.partitions, live)
        if len(self.owned) > target:
            extra = sorted(self.owned, reverse=True)[: len(self.owned) - target]
            for p in extra:  # flush first, else the next owner logs them again
                part = self.owned[p]
                self._await_flush(p)
                if (
                    self.owned.get(p) is part
                    and part.entry_ids
                    and part.mode in ("pending", "live")
                ):
                    self._start_flush(part)
                    self._await_flush(p)
            extra = [p for p in extra if p in self.owned]
            self.leases.release(extra)
            for p in extra:
                self._drop(p)
                self.stats.released += 1
            log.info("worker %s: released %s (%d live workers)", self.worker_id, extra, live)
        elif len(self.owned) < target:
            for p in preference(self.worker_id, self.settings.partitions):
                if len(self.owned) >= target:
                    break
                if p not in self.owned and self.leases.try_acquire(p):
                    self._take(p)
                    self.stats.acquired += 1
                    log.info("worker %s: took partition %d", self.worker_id, p)

    def _take(self, partition: int) -> None:
        self._await_flush(partition)  # a flush from an earlier ownership
        try:
            self.client.xgroup_create(
                stream_key(partition, self.cluster), GROUP, id="0", mkstream=True
            )
        except ResponseError as e:
            if not str(e).startswith("BUSYGROUP"):
                raise
        self._drop_cache(partition)
        self.owned[partition] = Partition(partition, cluster=self.cluster)

    def _drop(self, partition: int) -> None:
        self.owned.pop(partition, None)
        self._drop_cache(partition)

    def _drop_cache(self, partition: int) -> None:
        stale = [k for k in self._cache if partition_of(k, self.settings.partitions) == partition]
        for k in stale:
            del self._cache[k]

    def _init(self, part: Partition) -> None:
        """Read the watermarks, forget the log buffer, delete files that never committed."""
        p = part.number
        self._await_flush(p)  # its files must not be deleted under it
        if self.owned.get(p) is not part:
            return  # the flush found the partition taken over
        c = self.cluster
        part.applied, part.logged = cast(
            list[bytes | None], self.client.mget([applied_key(p, c), logged_key(p, c)])
        )
        part.clear_buffer()
        leftovers = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in cast(set[Any], self.client.smembers(inflight_key(p, c)))
        )
        if leftovers:
            removed = self.log_writer.remove(leftovers)
            self.stats.cleaned_files += removed
            log.info("partition %d: removed %d uncommitted log file(s)", p, removed)
            self.client.delete(inflight_key(p, c))
        part.mode = "claim"
        self._drop_cache(p)

    def _claim(self, part: Partition) -> None:
        """Claim earlier owners' pending entries once idle; pending mode when none remain.

        XPENDING lists them (with IDLE time) and XCLAIM ... JUSTID takes the idle ones
        without counting a delivery. Entries of another consumer that are not idle long
        enough yet keep the partition here: new entries are not read before them.
        """
        stream, me = part.stream, self.worker_id
        min_idle = self.settings.claim_min_idle_ms
        start = "-"
        waiting = False
        while True:
            details = _sync(
                self.client.xpending_range(stream, GROUP, min=start, max="+", count=1000)
            )
            theirs = [d for d in details if _text(d["consumer"]) != me]
            idle = [d["message_id"] for d in theirs if int(d["time_since_delivered"]) >= min_idle]
            waiting = waiting or len(idle) < len(theirs)
            if idle:
                claimed = _sync(self.client.xclaim(stream, GROUP, me, min_idle, idle, justid=True))
                self.stats.claimed += len(claimed)
                waiting = waiting or len(claimed) < len(idle)
            if len(details) < 1000:
                break
            start = "(" + _text(details[-1]["message_id"])
        if waiting:
            return
        self._forget_dead_consumers(stream)
        part.mode = "pending"
        part.cursor = b"0"

    def _forget_dead_consumers(self, stream: str) -> None:
        live = self.leases.live_workers(int(self._clock() * 1000))
        for consumer in _sync(self.client.xinfo_consumers(stream, GROUP)):
            name = _text(consumer["name"])
            if name != self.worker_id and name not in live and int(consumer["pending"]) == 0:
                self.client.xgroup_delconsumer(stream, GROUP, name)

    # ------------------------------------------------------------------ reading

    def _collect(self) -> Batch:
        batch = Batch()
        limit = self.settings.batch_max_events
        pending = [p for p in self.owned.values() if p.mode == "pending"]
        for part in pending:
            if batch.size >= limit:
                break
            entries = self._read_pending(part, limit - batch.size)
            if entries:
                batch.add(part.number, entries)
            else:
                part.mode = "live"
        if batch.size:
            return batch
        live = [p for p in self.owned.values() if p.mode == "live"]
        if not live:
            return batch
        self._read_new(live, batch, block_ms=int(self.settings.poll_ms))
        if not batch.size:
            return batch
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        while batch.size < limit:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms < 1:
                break
            self._read_new(live, batch, block_ms=int(remaining_ms))
        return batch

    def _xreadgroup(
        self, streams: Mapping[str, bytes | str], count: int, block_ms: int | None = None
    ) -> list[tuple[str, list[_RawEntry]]]:
        """XREADGROUP with the reply as hiredis parsed it: redis-py's own parsing (a
        dict per entry, in Python) was a fifth of the worker's time under load."""
        args: list[bytes | str | int] = ["XREADGROUP", "GROUP", GROUP, self.worker_id]
        args += ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        if self.cluster and len(streams) > 1:  # one slot per call: a read per partition
            return [
                reply
                for stream, cursor in streams.items()
                for reply in self._xreadgroup({stream: cursor}, count)
            ]
        args += ["STREAMS", *streams, *streams.values()]
        reply = self._raw(args, key=next(iter(streams)))
        return [(_text(stream), entries) for stream, entries in reply or []]

    def _read_pending(self, part: Partition, count: int) -> list[Entry]:
        reply = self._xreadgroup({part.stream: part.cursor}, count)
        raw = reply[0][1] if reply else []
        if not raw:
            return []
        entries = [Entry(part.number, eid, _fields(flat)) for eid, flat in raw]
        part.cursor = entries[-1].entry_id
        details = _sync(
            self.client.xpending_range(
                part.stream,
                GROUP,
                min=entries[0].entry_id,
                max=entries[-1].entry_id,
                count=len(entries),
                consumername=self.worker_id,
            )
        )
        times = {d["message_id"]: int(d["times_delivered"]) for d in details}
        for e in entries:
            e.deliveries = times.get(e.entry_id, 1)
        return entries

    def _read_new(self, live: list[Partition], batch: Batch, block_ms: int) -> None:
        """Read new entries of the live partitions: one XREADGROUP blocking up to
        `block_ms`; on a cluster one non-blocking read per partition (their streams are in
        different slots), then a wait of at most 5 ms when none had anything."""
        room = self.settings.batch_max_events - batch.size
        per_stream = max(1, room // len(live))
        streams = {p.stream: ">" for p in live}
        if self.cluster:
            reply = self._xreadgroup(streams, per_stream)
            if not any(raw for _, raw in reply):
                self._stop.wait(min(block_ms, 5) / 1000)
        else:
            reply = self._xreadgroup(streams, per_stream, block_ms=max(1, block_ms))
        by_stream = {p.stream: p.number for p in live}
        for stream, raw in reply:
            p = by_stream[stream]
            batch.add(p, (Entry(p, eid, _fields(flat)) for eid, flat in raw))

    # ------------------------------------------------------------------ processing

    def _process(self, batch: Batch, clock: StageClock) -> None:
        """Apply a micro-batch online (one commit), then buffer its events for the log.

        `clock` times the stages `apply` (decode, validate, compute the new state) and
        `commit` (the one script), as metrics and, inside a sampled span, child spans.

        Per partition, an entry at or below the log watermark is done (acknowledged now);
        one at or below the online watermark only goes to the log buffer again (a
        replay after a crash); the rest is decoded, applied and buffered.
        """
        now = self._clock()
        now_us = int(now * 1_000_000)
        WORKER_BATCH_SIZE.record(batch.size)
        done: dict[int, list[bytes]] = {}
        todo: dict[int, list[Entry]] = {}
        fresh: dict[int, list[Entry]] = {}
        for p, entries in batch.entries.items():
            part = self.owned[p]
            logged, applied = part.logged_id, part.applied_id
            for e in entries:
                eid = parse_id(e.entry_id)
                if eid <= logged:
                    done.setdefault(p, []).append(e.entry_id)
                else:
                    todo.setdefault(p, []).append(e)
                    if eid > applied:
                        fresh.setdefault(p, []).append(e)
            self.stats.replayed += len(entries) - len(fresh.get(p, []))
        self.stats.entries += batch.size

        poison: list[Poison] = []
        good: list[tuple[Entry, StreamEvent]] = []
        serves: dict[int, list[bytes]] = {}
        served: list[tuple[Entry, bytes, ServeRecord]] = []
        seen: set[str] = set()
        duplicates = 0
        is_fresh = {id(e) for entries in fresh.values() for e in entries}
        for entries in todo.values():
            for entry in entries:
                if entry.fields is not None and _B_SERVE in entry.fields:
                    try:
                        payload, record = self._check_serve(entry)
                    except PoisonEvent as e:
                        poison.append(Poison(entry, str(e)))
                        continue
                    served.append((entry, payload, record))
                    continue
                try:
                    event = self._decode(entry)
                except PoisonEvent as e:
                    poison.append(Poison(entry, str(e)))
                    continue
                if event.event_id in seen:
                    duplicates += 1
                    continue
                seen.add(event.event_id)
                good.append((entry, event))
        forgotten = self._forgotten(
            [(e.user_id, e.session_id) for _, e in good]
            + [(r.user_id, r.session_id) for _, _, r in served]
        )
        if forgotten:
            kept = [
                (entry, e)
                for entry, e in good
                if not is_forgotten(forgotten, e.user_id, e.session_id)
            ]
            self.stats.forgotten += len(good) - len(kept)
            good = kept
            kept_serves = [
                s for s in served if not is_forgotten(forgotten, s[2].user_id, s[2].session_id)
            ]
            self.stats.forgotten += len(served) - len(kept_serves)
            served = kept_serves
            for key in forgotten:
                self._cache.pop(key, None)
        for entry, payload, record in served:
            serves.setdefault(entry.partition, []).append(payload)
            self.bandit.observe(record, fresh=id(entry) in is_fresh)
        self.cpu.lap("decode")
        valid = []
        for entry, event in good:
            problem = row_problem(
                event.event_id,
                event.session_id,
                event.event_type,
                event.ts_us,
                user_id=event.user_id,
                item_id=event.item_id,
                dwell_ms=event.dwell_ms,
                scroll_depth=event.scroll_depth,
                position=event.position,
                request_id=event.request_id,
            )
            if problem is None:
                valid.append((entry, event))
            else:
                poison.append(Poison(entry, problem))
        self.cpu.lap("validate")
        poison = sorted(
            (d for d in poison if id(d.entry) in is_fresh),
            key=lambda d: (d.entry.partition, parse_id(d.entry.entry_id)),
        )
        events = [e for entry, e in valid if id(entry) in is_fresh]

        touched: dict[str, SessionState] = {}
        stored: dict[str, bytes] = {}
        increments: dict[str, dict[int, list[int]]] = {}
        now_minute = now_us // 60_000_000
        if fresh:
            work, anonymous = self._load_states(events)
            self.cpu.lap("load_states")
            result = apply_events(
                work,
                events,
                self.catalog.categories,
                session_gap_us=self.settings.session_gap_us,
                max_sessions=self.settings.max_visit_sessions,
                anonymous=ChainMap(work, anonymous),
            )
            touched = result.touched
            self.cpu.lap("apply")
            stored = {key: state.dumps() for key, state in touched.items()}
            increments = counter_increments(events, now_minute)
            rows = self._session_rows(touched, result.ended)
            commands = self._online_commands(fresh, stored, rows, poison)
            for event in events:
                if event.event_type == REWARD_EVENT and event.request_id and event.item_id:
                    self.bandit.reward(event.request_id, event.item_id, event.ts_us)
            additions = self.bandit.take()
            calls: list[Command] = []
            counters = None
            if self.cluster:
                (p,) = fresh  # one partition per batch on a cluster
                first, last = fresh[p][0].entry_id, fresh[p][-1].entry_id
                counted = counter_events(
                    ((entry.entry_id, e) for entry, e in valid if id(entry) in is_fresh),
                    now_minute,
                )
                calls = row_calls(session_commands(self.layout, rows), p, last)
                calls += counter_calls(self.layout, counted, p, now_minute, now_us)
                calls += bandit_calls(additions, p, first, last)
            else:
                for key, name, amount in additions:
                    commands.command("HINCRBYFLOAT", key, name, repr(amount))
                counters = counter_arguments(self.layout, increments, now_minute, now_us)
            fence: dict[str, bytes | None] = {
                self._lease_key(p): self._token(p).encode() for p in fresh
            }
            fence |= {self._applied_key(p): self.owned[p].applied for p in fresh}
            clock.lap("apply", {"inkling.events": len(events), "inkling.states": len(stored)})
            self.cpu.lap("encode")
            try:
                committed = self._commit(fence, commands, counters, calls)
            except BaseException:
                self.bandit.abandoned()
                self._requeue(batch.entries)  # the outcome is unknown: start over from Redis
                raise
            clock.lap("commit", {"inkling.committed": committed, "inkling.dead": len(poison)})
            self.cpu.lap("commit")
            if not committed:
                self.bandit.abandoned()
                self.stats.commit_failures += 1
                self._fence_failed(batch.entries)
                return
            self.bandit.committed()
            committed_us = int(self._clock() * 1_000_000)
            for event in events:
                if event.received_us:
                    EVENT_FRESHNESS.record((committed_us - event.received_us) / 1e6)
        self._ack(done)

        for p, entries in fresh.items():
            self.owned[p].applied = entries[-1].entry_id
        for key in sorted(stored, key=lambda k: k.startswith("u:")):
            self._cache[key] = stored[key]
            self._cache.move_to_end(key)
        while len(self._cache) > self.settings.max_cached_states:
            self._cache.popitem(last=False)
        for item in increments:
            self._counter_items[item] = now_minute
        mono = time.monotonic()
        for p, entries in todo.items():
            self.owned[p].buffer_entries(
                entries, [e for entry, e in valid if entry.partition == p], serves.get(p, []), mono
            )
        if fresh:
            self.stats.batches += 1
        self.stats.applied += len(events)
        self.stats.duplicates += duplicates
        self.stats.dead_lettered += len(poison)
        if poison:
            DEAD_LETTERS.add(len(poison))
        for dead in poison:
            log.warning(
                "partition %d entry %s dead-lettered: %s",
                dead.entry.partition,
                _text(dead.entry.entry_id),
                dead.reason,
            )
        self.cpu.lap("after_commit")

    def flush_due(self, force: bool = False) -> None:
        """Hand the log buffers past their bound (every buffer when forced) to the log
        thread, oldest first; with `force`, wait until all flushes finished.

        Flushes are spread out: past its time bound, a buffer waits until
        `log_flush_s / <partitions owned>` after the previous flush began. Partitions
        that started buffering together (at start, or when load begins) would otherwise
        flush together every `log_flush_s`, and the loop slowed down under all of them at
        once. A buffer at `log_max_events` goes at once. A partition whose previous
        flush is still running waits for it: its next flush starts from the watermark
        that one commits.
        """
        self._finish_flushes()
        mono = time.monotonic()
        buffered = sorted(
            (p for p in self.owned.values() if p.entry_ids and p.mode in ("pending", "live")),
            key=lambda part: part.buffered_since,
        )
        for part in buffered:
            full = len(part.entry_ids) >= self.settings.log_max_events
            if not (force or full or mono - part.buffered_since >= self.settings.log_flush_s):
                continue
            if part.number in self._flushing:
                if not force:
                    continue
                self._await_flush(part.number)
                if self.owned.get(part.number) is not part or not part.entry_ids:
                    continue
            if not (force or full or mono >= self._next_flush):
                break
            self._start_flush(part)
            self._next_flush = mono + self.settings.log_flush_s / max(1, len(self.owned))
        if force:
            for p in list(self._flushing):
                self._await_flush(p)

    def _start_flush(self, part: Partition) -> None:
        job = LogFlush(part.number, part.entry_ids, part.events, part.serves, part.logged)
        part.clear_buffer()
        if self._log_thread is None:
            self._log_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-log")
        self._flushing[part.number] = (job, self._log_thread.submit(self._write_log, job))

    def _finish_flushes(self) -> None:
        """Take in the flushes the log thread has finished."""
        for p, (_, future) in list(self._flushing.items()):
            if future.done():
                self._await_flush(p)

    def _await_flush(self, partition: int) -> None:
        """Wait for the partition's flush (if any) and take in its outcome.

        Raises:
            the flush's error (Redis or disk): the loop then starts over from Redis.
        """
        if partition not in self._flushing:
            return
        job, future = self._flushing.pop(partition)
        part = self.owned.get(partition)
        try:
            outcome = future.result()
        except BaseException:
            self._requeue({partition: []})  # the outcome is unknown: start over from Redis
            raise
        if not outcome.committed:
            self.stats.commit_failures += 1
            if part is not None:
                self._fence_failed({partition: []})
            return
        if part is not None:
            part.logged = job.entry_ids[-1]
        self.stats.files += outcome.files
        self.stats.logged += len(job.events)
        self.stats.serves_logged += len(job.serves)

    def _write_log(self, job: LogFlush) -> LogFlushed:
        """On the log thread: one Parquet file per date of the events; then, in one
        script, the log watermark and the acknowledgements (XACK). Timed as the stage
        `log_flush`, in a span of its own."""
        started = time.perf_counter()
        attributes = {"inkling.partition": job.partition, "inkling.events": len(job.events)}
        with tracer.start_as_current_span("worker.log_flush", attributes=attributes) as span:
            outcome = self._write_log_files(job, CpuClock())
            span.set_attributes(
                {"inkling.committed": outcome.committed, "inkling.files": outcome.files}
            )
        STAGE_DURATION.record(time.perf_counter() - started, {"stage": "log_flush"})
        return outcome

    def _write_log_files(self, job: LogFlush, cpu: CpuClock) -> LogFlushed:
        p = job.partition
        first, last = _text(job.entry_ids[0]), _text(job.entry_ids[-1])
        planned: list[PlannedFile] = []
        if job.events:
            table = job.events.table().cast(EVENT_SCHEMA)
            planned = self.log_writer.plan(p, first, last, self.worker_id, table)
        if job.serves:
            serves = serve_table(ServeRecord.FromString(b) for b in job.serves)
            planned += self.log_writer.plan_serves(p, first, last, self.worker_id, serves)
        paths = [f.relative for f in planned]
        if paths and not self._register(
            keys=[self._lease_key(p), self._inflight_key(p)], args=[self._token(p), *paths]
        ):
            return LogFlushed(committed=False, files=0)
        self.log_writer.write(planned)
        cpu.lap("log_write")
        committed = self._commit_log(
            keys=[
                self._lease_key(p),
                self._logged_key(p),
                self._inflight_key(p),
                stream_key(p, self.cluster),
            ],
            args=[self._token(p), job.logged or b"", last, GROUP, *self._log_acks(job)],
        )
        cpu.lap("log_commit")
        if not committed:
            self.log_writer.remove(paths)
            return LogFlushed(committed=False, files=0)
        return LogFlushed(committed=True, files=len(paths))

    # Where a partition's progress lives and who may commit it: the Redis bus's keys and
    # leases here; a worker of another bus (`stream_worker.kafka_source`) overrides these.

    def _lease_key(self, partition: int) -> str:
        """The key a commit checks holds `_token` (the partition's lease)."""
        return lease_key(partition, self.cluster)

    def _token(self, partition: int) -> str:
        return self.worker_id

    def _still_owner(self, partition: int) -> bool:
        return self.leases.owner(partition) == self.worker_id

    def _applied_key(self, partition: int) -> str:
        return applied_key(partition, self.cluster)

    def _logged_key(self, partition: int) -> str:
        return logged_key(partition, self.cluster)

    def _inflight_key(self, partition: int) -> str:
        return inflight_key(partition, self.cluster)

    def _log_acks(self, job: LogFlush) -> list[bytes]:
        """The stream entries a committed log flush acknowledges (XACK)."""
        return job.entry_ids

    def _source(self, partition: int) -> str:
        """Where a dead letter came from (`F_SOURCE`)."""
        return stream_key(partition, self.cluster)

    def _source_id(self, entry: Entry) -> bytes | str:
        """The dead letter's place in its source (`F_SOURCE_ID`)."""
        return entry.entry_id

    def _fence_failed(self, partitions: Mapping[int, Any]) -> None:
        """A commit found a lease or watermark changed: drop lost partitions, restart others."""
        for p in partitions:
            if not self._still_owner(p):
                log.warning("worker %s: partition %d was taken over", self.worker_id, p)
                self._drop(p)
                self.stats.lost += 1
        self._requeue(partitions)

    def _forgotten(self, owners: list[tuple[str | None, str]]) -> set[str]:
        """The tombstone fields (`inkling.erasure`) among the owners of a batch's events
        and serve records: one HMGET per batch, nothing when the batch has no owner."""
        fields = owners_fields(owners)
        if not fields:
            return set()
        return found_fields(fields, _sync(self.client.hmget(TOMBSTONES_KEY, fields)))

    def _decode(self, entry: Entry) -> StreamEvent:
        fields = entry.fields
        if fields is None:
            raise PoisonEvent("the entry was deleted from the stream before it was processed")
        if entry.deliveries > self.settings.max_deliveries:
            raise PoisonEvent(f"delivered {entry.deliveries} times without being processed")
        payload, event_id, received = (
            fields.get(_B_EVENT),
            fields.get(_B_ID),
            fields.get(_B_RECEIVED),
        )
        if payload is None or event_id is None:
            missing = F_EVENT if payload is None else F_EVENT_ID
            raise PoisonEvent(f"the entry has no {missing!r} field")
        try:
            received_us = int(received) if received is not None else 0
        except ValueError:
            raise PoisonEvent(f"the entry's {F_RECEIVED_US!r} field is not a number") from None
        try:
            text_id = event_id.decode()
        except UnicodeDecodeError:
            raise PoisonEvent("the entry's event id is not UTF-8") from None
        return decode_event(payload, text_id, received_us)

    def _check_serve(self, entry: Entry) -> tuple[bytes, ServeRecord]:
        """A serve entry's payload and record, checked (`record_problem`) as the serve log
        will parse it.

        Raises:
            PoisonEvent: why the record cannot be logged (it is then dead-lettered).
        """
        fields = cast(dict[bytes, bytes], entry.fields)
        if entry.deliveries > self.settings.max_deliveries:
            raise PoisonEvent(f"delivered {entry.deliveries} times without being processed")
        payload, request_id = fields[_B_SERVE], fields.get(_B_ID)
        if request_id is None:
            raise PoisonEvent(f"the serve entry has no {F_EVENT_ID!r} field")
        try:
            record = ServeRecord.FromString(payload)
            problem = record_problem(record, request_id.decode())
        except UnicodeDecodeError:
            problem = "the entry's request id is not UTF-8"
        except Exception as e:  # a payload protobuf cannot parse
            problem = f"the serve record does not decode: {type(e).__name__}"
        if problem is not None:
            raise PoisonEvent(problem)
        return payload, record

    def _load_states(
        self, events: list[StreamEvent]
    ) -> tuple[dict[str, SessionState], dict[str, SessionState]]:
        """Copies of the events' states (cache, else Redis), and anonymous states users may join."""
        work: dict[str, SessionState] = {}
        missing: list[str] = []
        for key in dict.fromkeys(e.state_key for e in events):
            cached = self._cache.get(key)
            if cached is not None:
                work[key] = SessionState.loads_own(cached)
            else:
                missing.append(key)
        joinable = [
            routing_key("", e.session_id)
            for e in events
            if e.user_id is not None and not self._in_visit(work, e)
        ]
        joinable = [k for k in dict.fromkeys(joinable) if k not in work and k not in missing]
        wanted = missing + joinable
        anonymous: dict[str, SessionState] = {}
        if wanted:
            keys = [state_key(k, self._state_parts) for k in wanted]
            values = _sync(
                self.client.mget_nonatomic(keys)  # type: ignore[attr-defined]
                if self.cluster
                else self.client.mget(keys)
            )
            for key, value in zip(wanted, values, strict=True):
                if value is None:
                    continue
                state = SessionState.loads(value)
                if key in missing:
                    work[key] = state
                else:
                    anonymous[key] = state
        return work, anonymous

    @staticmethod
    def _in_visit(work: Mapping[str, SessionState], event: StreamEvent) -> bool:
        state = work.get(event.state_key)
        return state is not None and event.session_id in state.sessions

    @staticmethod
    def _session_rows(
        touched: Mapping[str, SessionState], ended: Sequence[SessionState]
    ) -> list[SessionRow]:
        """The session rows a micro-batch writes, in the order they are written."""
        rows: list[SessionRow] = []
        # Visits that ended in this batch first; a user's visit after anonymous states: later
        # rows win where they share a session id.
        states = [*ended, *(touched[k] for k in sorted(touched, key=lambda k: k.startswith("u:")))]
        for state in states:
            values = state.row()
            rows += [SessionRow(sid, state.last_ts_us, values) for sid in state.sessions]
        return rows

    def _online_commands(
        self,
        fresh: Mapping[int, list[Entry]],
        stored: Mapping[str, bytes],
        rows: Sequence[SessionRow],
        poison: list[Poison],
    ) -> Words:
        """Everything a micro-batch writes but the item counters (and the bandit's
        additions), as the commit script's words (see `_commit`); on a cluster without
        the session rows, which go by `stream_worker.cluster_commit.ROW_SCRIPT`."""
        commands = Words()
        head, tail = self._set_state
        for k, data in stored.items():
            commands.add_framed(head + bulk(state_key(k, self._state_parts)) + bulk(data) + tail, 6)
        if not self.cluster:
            self._rows.frame(rows, commands)
        for item in poison:
            fields = item.entry.fields or {}
            serve = _B_SERVE in fields
            commands.command(
                "XADD",
                dead_letter_key(item.entry.partition, self.cluster),
                "MAXLEN",
                "~",
                self.settings.dead_letter_max,
                "*",
                F_EVENT_ID,
                fields.get(_B_ID, b""),
                F_SERVE if serve else F_EVENT,
                fields.get(_B_SERVE if serve else _B_EVENT, b""),
                F_RECEIVED_US,
                fields.get(_B_RECEIVED, b""),
                F_REASON,
                item.reason,
                F_SOURCE,
                self._source(item.entry.partition),
                F_SOURCE_ID,
                self._source_id(item.entry),
            )
        for p, entries in fresh.items():
            commands.command("SET", self._applied_key(p), entries[-1].entry_id)
        return commands

    def _commit(
        self,
        expected: Mapping[str, bytes | None],
        commands: Words,
        counters: tuple[list[bytes | str], list[bytes | str | int]] | None,
        calls: Sequence[Command] = (),
    ) -> bool:
        """Check the fences and run the commands and the counter update, as one script.

        One round trip and one reply: the MULTI/EXEC it replaces took two round trips
        and a reply per command, read one by one (a sixth of the worker's time). The
        call is sent as framed words (`stream_worker.resp`): packing its few thousand
        arguments on each call was a tenth of the worker's time.
        Returns False when a fence did not hold (nothing was written).

        On a cluster, `calls` (the idempotent one-key scripts of `stream_worker.cluster_commit`)
        run first, in one pipeline per node, and the fenced script then goes to the
        partition's node; a fence that fails there leaves the calls' writes, which a
        replay of the same entries finds applied.

        Raises:
            CommitError: a command failed (those before it were applied).
        """
        if calls:
            self._run_calls(calls)
        fences = list(expected)
        counter_keys, counter_args = counters if counters is not None else ([], [])
        keys = Words()
        keys.extend(fences)
        keys.extend(counter_keys)
        args = Words()
        args.extend((len(fences), len(counter_keys), len(counter_args)))
        args.extend(expected[k] or b"" for k in fences)
        args.extend(counter_args)
        args.add_words(commands)
        try:
            return bool(self._send_script(self._commit_batch, keys, args, key=fences[0]))
        except ResponseError as e:
            raise CommitError(f"the commit failed: {e}") from e

    def _run_calls(self, calls: Sequence[Command]) -> None:
        """Cluster: run one-key scripts (EVAL words), batched per node by the cluster
        pipeline; counts the bandit batches a straddling replay skipped (-1 replies)."""
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call)
        try:
            replies = pipe.execute()
        except ResponseError as e:
            raise CommitError(f"a row write of the commit failed: {e}") from e
        self.stats.bandit_skipped += sum(1 for r in replies if r == -1)

    def _send_script(self, script: Script, keys: Words, args: Words, key: str | None = None) -> Any:
        """EVALSHA of framed words (loading the script when Redis lost it); on a cluster,
        sent to the node that serves `key` (one of the script's keys)."""
        call = script_call(script.sha, keys, args)
        try:
            return self._send(call, key)
        except NoScriptError:
            if self.cluster:
                self._node(key).script_load(script.script)
            else:
                self.client.script_load(script.script)
            return self._send(call, key)

    def _raw(self, command: Sequence[bytes | str | int], key: str | None = None) -> Any:
        """One command on a pooled connection, packed by hiredis and its reply as hiredis
        parsed it (redis-py's own packing and reply callbacks cost the worker dearly); on
        a cluster to the node that serves `key`."""
        return self._send(hiredis.pack_command(tuple(command)), key)  # type: ignore[arg-type]

    def _node(self, key: str | None) -> redis.Redis:
        """On a cluster: the client of the master that serves `key`'s slot now."""
        cluster = cast(redis.RedisCluster, self.client)
        node = cluster.get_node_from_key(key or "")
        return cluster.get_redis_connection(node)

    def _send(self, packed: bytes, key: str | None = None) -> Any:
        """A packed command on a pooled connection; its reply as hiredis parsed it."""
        pool = self._node(key).connection_pool if self.cluster else self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([packed])  # a list: it sends each item
            return connection.read_response()
        except (MovedError, AskError, ClusterDownError, TryAgainError) as e:
            # The slot moved (a failover): learn the new layout; the loop retries.
            cast(redis.RedisCluster, self.client).nodes_manager.initialize()
            raise redis.ConnectionError(f"the cluster's layout changed: {e}") from e
        except ResponseError:
            raise  # an error reply was read: the connection is in a clean state
        except BaseException:
            connection.disconnect()  # a reply may be left unread: never reuse it
            raise
        finally:
            pool.release(connection)

    def _ack(self, acks: Mapping[int, list[bytes]]) -> None:
        commands: list[Command] = [
            ("XACK", stream_key(p, self.cluster), GROUP, *ids) for p, ids in acks.items() if ids
        ]
        if not commands:
            return
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()

    def _requeue(self, fresh: Mapping[int, Any]) -> None:
        """After a failure: re-read these partitions' watermarks and pending entries."""
        for p in fresh:
            part = self.owned.get(p)
            if part is not None:
                part.mode = "init"
        self._cache.clear()

    # ------------------------------------------------------------------ housekeeping

    def refresh_counters(self) -> None:
        """Queue the counter rows of items whose window still holds this worker's events."""
        now_minute = int(self._clock()) // 60
        self._counter_items = {
            item: minute
            for item, minute in self._counter_items.items()
            if now_minute - minute <= COUNTER_WINDOW_MINUTES
        }
        self._refresh_queue = list(self._counter_items)
        self._refresh_total = len(self._refresh_queue)
        self._refresh_began = time.monotonic()

    def _refresh_some(self, limit: int = 500) -> None:
        """Recompute the queued counter rows due by now: the queue is spread evenly over
        the first half of `counter_refresh_s`, a short script per step.

        3,000 rows in scripts of 500 on consecutive steps held Redis for tens of ms
        six times in a row every 15 s; the ingest and the commits queued behind them,
        and at 5,000 events/s the backlog took seconds to drain.
        """
        if not self._refresh_queue:
            return
        spread_s = self.settings.counter_refresh_s / 2
        elapsed = time.monotonic() - self._refresh_began
        due = self._refresh_total * min(1.0, elapsed / spread_s) if spread_s > 0 else math.inf
        done = self._refresh_total - len(self._refresh_queue)
        n = min(limit, math.ceil(due) - done)
        if n <= 0:
            return
        chunk, self._refresh_queue = self._refresh_queue[:n], self._refresh_queue[n:]
        now = self._clock()
        if self.cluster:  # per item, in its row's slot
            self._run_calls(
                counter_calls(
                    self.layout, {item: [] for item in chunk}, None, int(now) // 60,
                    int(now * 1_000_000),
                )
            )  # fmt: skip
            return
        empty: dict[str, dict[int, list[int]]] = {item: {} for item in chunk}
        command = counter_command(self.layout, empty, int(now) // 60, int(now * 1_000_000))
        if command is not None:
            self.client.execute_command(*command)

    def trim(self) -> None:
        """Drop entries every group has acknowledged from the owned streams."""
        streams = [stream_key(p, self.cluster) for p in sorted(self.owned)]
        if self.cluster:  # one script per stream: each in its partition's slot
            for stream in streams:
                self._trim(keys=[stream], args=["approx"])
        elif streams:
            self._trim(keys=streams, args=["approx"])


class _LostLease(Exception):
    def __init__(self, partition: int) -> None:
        super().__init__(f"lost the lease of partition {partition}")
        self.partition = partition


_RawEntry = tuple[bytes, list[bytes] | None]
"""A stream entry as Redis sends it: the id, then field, value, field, value ... (None:
the entry was deleted while pending)."""


def _traceparents(batch: Batch) -> Iterable[bytes]:
    """The traceparents the batch's entries carry (only traced appends store one)."""
    for entries in batch.entries.values():
        for entry in entries:
            if entry.fields is not None and _B_TRACE in entry.fields:
                yield entry.fields[_B_TRACE]


def _fields(flat: list[bytes] | None) -> dict[bytes, bytes] | None:
    if flat is None:
        return None
    pairs = iter(flat)
    return dict(zip(pairs, pairs, strict=True))


def _sync(reply: Any) -> Any:
    """A reply of the blocking client (redis-py types every reply as maybe awaitable)."""
    return reply


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def table_of(values: Iterable[StreamEvent]) -> pa.Table:
    """The strict event-schema table of valid events (tests and tools)."""
    return events_table(values).cast(EVENT_SCHEMA)
