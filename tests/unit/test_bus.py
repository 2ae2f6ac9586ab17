"""The event bus against a real redis-server: partitioning, atomic dedupe + append, lag."""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections import Counter
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.events import bus
from inkling.events.bus import BusEvent, EventBus, async_client, client_options, routing_key
from inkling.redis_cluster import LocalRedisCluster
from inkling.redis_embedded import free_port

pytestmark = pytest.mark.redis

DB = 3  # a database of the shared test Redis of its own (5 and 7 are others')


CLUSTERS: set[str] = set()
"""The addresses that are a Redis Cluster's startup nodes."""


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("bus-cluster"), persistent=False) as cluster:
        CLUSTERS.add(cluster.address)
        yield cluster


@pytest.fixture
def single_address(redis_server):
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB).flushdb()
    return f"{redis_server.address},db={DB}"


@pytest.fixture(params=["one-server", "cluster"])
def address(request):
    """The bus on one Redis server, then on a Redis Cluster (three masters, three replicas)."""
    if request.param == "one-server":
        return request.getfixturevalue("single_address")
    cluster = request.getfixturevalue("redis_cluster")
    with contextlib.closing(cluster.client()) as c:
        c.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    return cluster.address


@pytest.fixture
def sync(address):
    client = bus.sync_client(address, cluster=address in CLUSTERS)
    yield client
    client.close()


def stream(sync, partition):
    """A partition's stream key for the client's kind of Redis."""
    return bus.stream_key(partition, bus.is_cluster(sync))


def run(address, scenario, **bus_options):
    """Run `scenario(bus, client)` with a fresh asyncio client and bus."""

    async def main():
        client = async_client(address, cluster=address in CLUSTERS)
        try:
            return await scenario(EventBus(client, **bus_options), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def events(*ids, user="u1"):
    return [BusEvent(i, routing_key(user, "s1"), f"payload-{i}".encode()) for i in ids]


def user_for(partition, partitions):
    """A user id whose events go to `partition`."""
    return next(
        f"u{i}" for i in range(1000) if bus.partition_of(f"u:u{i}", partitions) == partition
    )


def all_entries(sync, partitions):
    return [e for p in range(partitions) for e in bus.read_partition(sync, p)]


# --- layout ------------------------------------------------------------------------------


def test_partitioning_is_stable_and_spread():
    # CRC-32 of the routing key: the same in every process and every Python run.
    assert bus.partition_of("u:alice", 4) == zlib.crc32(b"u:alice") % 4
    assert bus.partition_of("u:alice", 4) == bus.partition_of("u:alice", 4)
    assert routing_key("alice", "s9") == "u:alice"  # the user wins over the session
    assert routing_key("", "s9") == "s:s9"
    spread = Counter(bus.partition_of(f"u:user{i}", 4) for i in range(4000))
    assert set(spread) == {0, 1, 2, 3}
    assert min(spread.values()) > 800
    with pytest.raises(ValueError):
        bus.partition_of("u:a", 0)


def test_client_options_read_the_feast_address_format():
    assert client_options("10.0.0.5:6380,db=3,password=p,ssl=true") == {
        "host": "10.0.0.5",
        "port": 6380,
        "db": 3,
        "password": "p",
        "ssl": True,
    }
    for bad in ("a:1,b:2", "nohost", "h:1,db=x"):
        with pytest.raises(ConfigurationError):
            client_options(bad)


# --- append and dedupe --------------------------------------------------------------------


def test_append_stores_each_event_once_with_its_fields(address, sync):
    async def scenario(b, _client):
        first = await b.append(events("e1", "e2", "e1"), received_us=1234)
        replay = await b.append(events("e2", "e3"), received_us=5678)
        return first, replay

    first, replay = run(address, scenario, partitions=4)
    assert [o.duplicate for o in first] == [False, False, True]  # a repeat inside the batch
    assert [o.duplicate for o in replay] == [True, False]
    entries = all_entries(sync, 4)
    assert [e.event_id for e in entries] == ["e1", "e2", "e3"]  # one user: one partition
    assert [e.payload for e in entries] == [b"payload-e1", b"payload-e2", b"payload-e3"]
    assert [e.received_us for e in entries] == [1234, 1234, 5678]
    assert [e.seq for e in entries] == [1, 2, 3]
    assert {o.partition for o in first} == {bus.partition_of("u:u1", 4)}
    assert [e.entry_id for e in entries] == [
        first[0].entry_id,
        first[1].entry_id,
        replay[1].entry_id,
    ]


def test_partitions_get_their_users_events_in_order(address, sync):
    batch = [
        BusEvent(f"e{i}", routing_key(f"user{i % 7}", "s"), str(i).encode()) for i in range(70)
    ]
    outcomes = run(address, lambda b, _c: b.append(batch, 1), partitions=3)
    for p in range(3):
        got = [int(e.payload) for e in bus.read_partition(sync, p)]
        assert got == sorted(got)  # request order kept within a partition
        assert {bus.partition_of(f"u:user{i % 7}", 3) for i in got} <= {p}
    assert sorted(o.partition for o in outcomes) == sorted(
        bus.partition_of(e.routing_key, 3) for e in batch
    )


def remembered(sync, *event_ids):
    """The event ids the dedupe sets hold."""
    if bus.is_cluster(sync):  # one set per partition
        sets = list(sync.scan_iter(match=f"{bus.SEEN_PREFIX}:*"))
        return [i for i in event_ids if any(sync.zscore(k, i) is not None for k in sets)]
    return [i for i in event_ids if sync.zscore(bus.seen_key(i), i) is not None]


def first_seen_ms(sync, event_id, partition):
    key = bus.partition_dedupe_key(partition) if bus.is_cluster(sync) else bus.seen_key(event_id)
    return sync.zscore(key, event_id)


def test_dedupe_window_is_bounded(address, sync):
    async def scenario(b, _client):
        await b.append(events("w1"), received_us=1)
        inside = await b.append(events("w1"), received_us=2)
        await asyncio.sleep(1.2)
        after = await b.append(events("w1"), received_us=3)
        return inside, after

    before_ms = time.time() * 1000
    probe = run(address, lambda b, _c: b.append(events("at"), 1), partitions=2)
    after_ms = time.time() * 1000
    assert not probe[0].duplicate
    # Scored by the first append on Redis's clock (this machine's, within a second of the
    # call; on a cluster the call also discovers the slots and sets up the partitions).
    assert before_ms - 1000 < first_seen_ms(sync, "at", probe[0].partition) < after_ms + 1000
    inside, after = run(address, scenario, partitions=2, dedupe_window_s=1)
    assert inside[0].duplicate
    assert not after[0].duplicate  # past the window it is stored again (documented)
    assert [e.event_id for e in all_entries(sync, 2) if e.event_id == "w1"] == ["w1", "w1"]


def test_an_id_past_the_window_is_new_before_it_is_trimmed(address, sync):
    # Three ids of one set; they share a score, so the trim takes them in member order.
    ids = sorted(f"t{i:03}" for i in range(200) if bus.dedupe_shard(f"t{i:03}") == 0)[:3]

    async def scenario(b, _client):
        first = await b.append(events(*ids), 1)
        await asyncio.sleep(1.2)
        again = await b.append(events(ids[2]), 2)  # trims one id: ids[0]
        return first, again

    first, again = run(address, scenario, partitions=2, dedupe_window_s=1, dedupe_trim=1)
    assert not any(o.duplicate for o in first)
    assert remembered(sync, *ids) == ids[1:]  # ids[1] expired, not trimmed yet
    assert not again[0].duplicate
    assert [e.event_id for e in all_entries(sync, 2)] == [*ids, ids[2]]


def test_dedupe_sets_hold_only_the_window_and_few_keys(single_address):
    """Ids past the window leave the sets at the next appends, a bounded number per set per
    call; the keyspace holds one set per shard, not one key per event."""
    address = single_address
    sync = bus.sync_client(address)
    many = [f"old{i}" for i in range(10_000)]
    fresh = [f"new{i}" for i in range(64)]  # touches every shard
    assert {bus.dedupe_shard(i) for i in fresh} == set(range(bus.DEDUPE_SHARDS))

    async def scenario(b, client):
        for lo in range(0, len(many), 1_000):
            await b.append(events(*many[lo : lo + 1_000]), 1)
        await asyncio.sleep(1.2)
        await b.append(events(*fresh), 2)
        left = [await client.zcard(bus.dedupe_key(s)) for s in range(bus.DEDUPE_SHARDS)]
        await b.append(events("last"), 3)
        await b.append(events(*(f"more{i}" for i in range(64))), 4)
        return left

    left = run(address, scenario, partitions=2, dedupe_window_s=1)
    per_shard = Counter(bus.dedupe_shard(i) for i in many)
    cap = bus.DEDUPE_TRIM_PER_CALL
    # Each set holds more than the cap (so the cap, not the window, bounds the first trim)
    # and less than twice it (so the next append to it finishes).
    assert cap < min(per_shard.values()) <= max(per_shard.values()) < 2 * cap
    fresh_per_shard = Counter(bus.dedupe_shard(i) for i in fresh)
    assert left == [per_shard[s] - cap + fresh_per_shard[s] for s in range(bus.DEDUPE_SHARDS)]
    assert remembered(sync, *many) == []  # the later appends finished the trim
    keys = {k.decode() for k in sync.keys(f"{bus.SEEN_PREFIX}:*")}
    assert keys == {bus.dedupe_key(s) for s in range(bus.DEDUPE_SHARDS)}
    assert sum(sync.zcard(k) for k in keys) == 64 + 1 + 64


def test_a_failed_append_writes_nothing(single_address):
    """Types are checked before the first write: no seen key without its entry."""
    address = single_address
    sync = bus.sync_client(address)
    p_bad = 0
    sync.set(bus.stream_key(p_bad), "not a stream")
    mixed = events("ok1", user=user_for(1, 2)) + events("bad1", user=user_for(0, 2))
    with pytest.raises(ConfigurationError, match="WRONGTYPE"):
        run(address, lambda b, _c: b.append(mixed, 1), partitions=2)
    assert remembered(sync, "ok1", "bad1") == []
    assert not sync.exists(bus.stream_key(1 - p_bad))
    sync.delete(bus.stream_key(p_bad))
    outcomes = run(address, lambda b, _c: b.append(mixed, 1), partitions=2)
    assert not any(o.duplicate for o in outcomes)  # the failed attempt left no trace


def test_on_a_cluster_each_partitions_part_is_atomic_and_a_retry_completes_the_batch(
    redis_cluster,
):
    """Cluster mode: one script per partition. A partition that fails writes nothing of its
    part; the other partitions' parts stand, and the client's retry of the whole batch
    stores only what is missing (the rest comes back as duplicates)."""
    address = redis_cluster.address
    with contextlib.closing(redis_cluster.client()) as sync:
        sync.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        run(address, lambda b, _c: b.ensure_streams(), partitions=2)
        sync.delete(bus.stream_key(0, True))
        sync.set(bus.stream_key(0, True), "not a stream")
        mixed = events("ok1", user=user_for(1, 2)) + events("bad1", user=user_for(0, 2))
        with pytest.raises(ConfigurationError, match="WRONGTYPE"):
            run(address, lambda b, _c: b.append(mixed, 1), partitions=2)
        assert remembered(sync, "ok1", "bad1") == ["ok1"]  # partition 1's part was written
        assert [e.event_id for e in bus.read_partition(sync, 1)] == ["ok1"]
        sync.delete(bus.stream_key(0, True))
        outcomes = run(address, lambda b, _c: b.append(mixed, 1), partitions=2)
        assert [o.duplicate for o in outcomes] == [True, False]
        assert [e.event_id for e in all_entries(sync, 2)] == ["bad1", "ok1"]
        # Every key of a partition lives in one slot; another partition's in another.
        slots = [
            {key_slot(k.encode()) for k in (bus.stream_key(p, True), bus.counter_key(p, True),
                                            bus.partition_dedupe_key(p),
                                            bus.partitions_copy_key(p),
                                            bus.dead_letter_key(p, True))}
            for p in range(2)
        ]  # fmt: skip
        assert [len(s) for s in slots] == [1, 1] and slots[0] != slots[1]
        # A producer counting more partitions than the bus has is refused at its first
        # append to a partition the bus lacks, and writes nothing there.
        with pytest.raises(ConfigurationError, match="bus has 2 partitions; this process"):
            run(address, lambda b, _c: b.append(events("x5", user=user_for(5, 8)), 3), partitions=8)
        assert not sync.exists(bus.stream_key(5, True))
        assert remembered(sync, "x5") == []


def test_a_process_with_another_number_of_partitions_is_refused_and_writes_nothing(address, sync):
    """The first producer records the number; a producer or worker counting otherwise would
    write streams nobody reads (or leave some unread), so it is refused."""
    run(address, lambda b, _c: b.append(events("p1"), 1), partitions=4)
    assert sync.get(bus.PARTITIONS_KEY) == b"4"
    with pytest.raises(
        ConfigurationError, match="bus has 4 partitions; this producer was configured with 2"
    ):
        run(address, lambda b, _c: b.append(events("p2", "p3"), 2), partitions=2)
    assert remembered(sync, "p2", "p3") == []
    assert [e.event_id for e in all_entries(sync, 4)] == ["p1"]
    with pytest.raises(ConfigurationError, match="delete inkling:bus:partitions"):
        run(address, lambda b, _c: b.ensure_streams(), partitions=8)
    with pytest.raises(ConfigurationError, match="bus has 4 partitions; this process"):
        bus.check_partitions(sync, 3)
    bus.check_partitions(sync, 4)  # the agreeing number passes
    run(address, lambda b, _c: b.append(events("p4"), 3), partitions=4)
    assert [e.event_id for e in all_entries(sync, 4)] == ["p1", "p4"]


def test_replaying_after_an_append_stores_nothing_twice(address, sync):
    async def scenario(b, _client):
        batch = events(*(f"r{i}" for i in range(50)))
        first = await b.append(batch, 1)
        again = await b.append(batch, 2)
        return first, again

    first, again = run(address, scenario, partitions=4)
    assert not any(o.duplicate for o in first)
    assert all(o.duplicate for o in again)
    assert len(all_entries(sync, 4)) == 50


def test_unreachable_redis_is_unavailable():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(DependencyUnavailableError):
        run(address, lambda b, _c: b.append(events("x"), 1), partitions=1)
    with pytest.raises(DependencyUnavailableError):
        run(address, lambda b, _c: b.lag(), partitions=1)


# --- the group, lag and trimming ----------------------------------------------------------


def test_streams_are_created_with_the_group_from_the_start(address, sync):
    run(address, lambda b, _c: b.append(events("g1"), 1), partitions=1)
    groups = sync.xinfo_groups(stream(sync, 0))
    assert [g["name"] for g in groups] == [bus.GROUP.encode()]
    # A worker joining now still reads the first event.
    read = sync.xreadgroup(bus.GROUP, "w", {stream(sync, 0): ">"})
    assert [bus.decode_entry(i, f).event_id for i, f in read[0][1]] == ["g1"]


def test_lag_counts_undelivered_and_unacknowledged_entries(address, sync):
    async def scenario(b, client):
        await b.ensure_streams()
        assert await b.measure_lag() == {0: bus.Backlog(0, 0), 1: bus.Backlog(0, 0)}
        await b.append(events(*(f"l{i}" for i in range(10))), 1)
        p = bus.partition_of("u:u1", 2)
        other = 1 - p
        steps = [await b.measure_lag()]
        read = await client.xreadgroup(bus.GROUP, "w", {bus.stream_key(p, b.cluster): ">"}, count=4)
        steps.append(await b.measure_lag())
        ids = [entry_id for entry_id, _ in read[0][1]]
        await client.xack(bus.stream_key(p, b.cluster), bus.GROUP, *ids[:3])
        steps.append(await b.measure_lag())
        return p, other, steps

    p, other, steps = run(address, scenario, partitions=2)
    assert [s[p] for s in steps] == [
        bus.Backlog(10, 0),
        bus.Backlog(6, 4),
        bus.Backlog(6, 1),
    ]
    assert all(s[other] == bus.Backlog(0, 0) for s in steps)
    assert bus.measure_lag_sync(sync, 2)[p] == bus.Backlog(6, 1)
    # The counted fallback, when the last-delivered entry is gone, agrees.
    last = sync.xinfo_groups(stream(sync, p))[0]["last-delivered-id"]
    sync.xdel(stream(sync, p), last)
    assert bus.measure_lag_sync(sync, 2)[p].undelivered == 6
    # Without the group every entry is unconsumed.
    sync.xgroup_destroy(stream(sync, p), bus.GROUP)
    assert bus.measure_lag_sync(sync, 2)[p] == bus.Backlog(sync.xlen(stream(sync, p)), 0)


def test_lag_is_cached_briefly(address):
    async def scenario(b, _client):
        before = await b.lag()
        await b.append(events("c1", "c2"), 1)
        cached = await b.lag()
        await asyncio.sleep(0.35)
        fresh = await b.lag()
        return before, cached, fresh

    started = time.monotonic()
    before, cached, fresh = run(address, scenario, partitions=1, lag_cache_s=0.3)
    assert time.monotonic() - started < 5
    assert before == cached == {0: 0}
    assert fresh == {0: 2}


def test_trim_removes_only_acknowledged_entries(address, sync):
    async def scenario(b, client):
        await b.append(events(*(f"t{i}" for i in range(8)), user="u1"), 1)
        p = bus.partition_of("u:u1", 1)
        key = bus.stream_key(p, b.cluster)
        nothing = await b.trim_consumed()  # nothing delivered yet
        read = await client.xreadgroup(bus.GROUP, "w", {key: ">"}, count=5)
        ids = [entry_id for entry_id, _ in read[0][1]]
        await client.xack(key, bus.GROUP, ids[0], ids[1], ids[3])  # t2 stays pending
        trimmed = await b.trim_consumed()
        return nothing, trimmed

    nothing, trimmed = run(address, scenario, partitions=1)
    assert nothing == {0: 0}
    assert trimmed == {0: 2}  # t0, t1: below the oldest pending entry t2
    assert [e.event_id for e in bus.read_partition(sync, 0)] == [f"t{i}" for i in range(2, 8)]
    assert bus.measure_lag_sync(sync, 1)[0] == bus.Backlog(3, 2)


def test_approximate_trim_removes_whole_nodes_below_what_is_still_needed(single_address):
    address = single_address
    sync = bus.sync_client(address)
    sync.config_set("stream-node-max-entries", 100)  # the default, made explicit

    async def scenario(b, client):
        await b.append(events(*(f"a{i}" for i in range(1_000)), user="u1"), 1)
        key = bus.stream_key(0)
        read = await client.xreadgroup(bus.GROUP, "w", {key: ">"}, count=750)
        ids = [entry_id for entry_id, _ in read[0][1]]
        await client.xack(key, bus.GROUP, *ids[:700])  # 700-749 stay pending
        return await b.trim_consumed(approximate=True)

    trimmed = run(address, scenario, partitions=1)
    left = [e.event_id for e in bus.read_partition(sync, 0)]
    assert 0 < trimmed[0] <= 700 and len(left) == 1_000 - trimmed[0]
    assert left == [f"a{i}" for i in range(trimmed[0], 1_000)]  # all of a700... kept


# --- the ingest core over a fake bus (no Redis) -------------------------------------------


class FakeBus:
    """Dedupes by event_id forever and records what was appended."""

    def __init__(self, partitions: int = 4, lag: dict[int, int] | None = None) -> None:
        self.partitions = partitions
        self.lags = lag or {}
        self.seen: set[str] = set()
        self.appended: list[BusEvent] = []
        self.tombstones: set[str] = set()

    def partition(self, key: str) -> int:
        return bus.partition_of(key, self.partitions)

    async def lag(self) -> dict[int, int]:
        return self.lags

    async def forgotten(self, fields):
        return set(fields) & self.tombstones

    async def append(self, batch, received_us, traceparent=""):
        out = []
        for e in batch:
            duplicate = e.event_id in self.seen
            self.seen.add(e.event_id)
            if not duplicate:
                self.appended.append(e)
            out.append(bus.Appended(self.partition(e.routing_key), None if duplicate else "1-0"))
        return out


NOW_US = 1_800_000_000 * 1_000_000


MUTATIONS: dict[str, dict[str, Any]] = {
    "blank id": {"event_id": "  "},
    "no id": {"event_id": ""},
    "no session": {"session_id": ""},
    "blank user": {"user_id": " "},
    "anonymous": {"user_id": ""},
    "no item": {"item_id": ""},
    "page view": {"event_type": 1},
    "unspecified": {"event_type": 0},
    "unknown type": {"event_type": 9},
    "old": {"offset_s": -86_400},
    "before 1990": {"offset_s": -1_200_000_000},
    "skewed": {"offset_s": 200},
    "far future": {"offset_s": 3_600},
    "no timestamp": {"offset_s": None},
    "long dwell": {"dwell_ms": 10**9},
    "negative dwell": {"dwell_ms": -1},
    "deep scroll": {"scroll_depth": 1.5},
    "nan scroll": {"scroll_depth": float("nan")},
    "negative position": {"position": -1},
}


def proto_events():
    """Mostly valid events, each with up to two of the mutations above."""
    from google.protobuf.timestamp_pb2 import Timestamp
    from hypothesis import strategies as st

    from inkling.v1 import resources_pb2

    def build(event_id, user, mutations):
        fields = {
            "event_id": event_id,
            "user_id": user,
            "session_id": "s1",
            "item_id": "i1",
            "event_type": 3,
            "offset_s": -60,
            "dwell_ms": 100,
            "scroll_depth": 0.5,
            "position": 2,
        }
        for name in mutations:
            fields.update(MUTATIONS[name])
        offset_s = fields.pop("offset_s")
        e = resources_pb2.Event(**fields)
        if offset_s is not None:
            e.timestamp.CopyFrom(Timestamp(seconds=NOW_US // 1_000_000 + offset_s))
        return e

    return st.builds(
        build,
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["u1", "u2", "u3"]),
        st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2),
    )


def test_the_core_accounts_for_every_event_and_appends_only_valid_ones():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from events_server.core import IngestCore, IngestLimits, schema_violations
    from inkling.serving.validation import violations
    from inkling.v1 import event_service_pb2, resources_pb2

    @settings(max_examples=200, deadline=None)
    @given(st.lists(proto_events(), min_size=1, max_size=12))
    def check(sent):
        fake = FakeBus()
        core = IngestCore(fake, IngestLimits(max_future_s=300), clock_us=lambda: NOW_US)
        result = asyncio.run(core.track(event_service_pb2.TrackEventsRequest(events=sent)))
        rejected = [r.index for r in result.rejected]
        assert rejected == sorted(set(rejected))
        assert result.accepted + result.duplicates + len(rejected) == len(sent)
        assert all(r.reason and r.event_id == sent[r.index].event_id for r in result.rejected)
        kept = [e for i, e in enumerate(sent) if i not in set(rejected)]
        first_of_each = [
            e for i, e in enumerate(kept) if e.event_id not in {k.event_id for k in kept[:i]}
        ]
        assert [e.event_id for e in fake.appended] == [e.event_id for e in first_of_each]
        assert result.accepted == len(fake.appended)
        assert result.duplicates == len(kept) - len(first_of_each)
        for e in fake.appended:
            parsed = resources_pb2.Event.FromString(e.payload)
            assert not violations(parsed)
            assert not schema_violations(parsed, NOW_US, 300)
            assert e.routing_key == routing_key(parsed.user_id, parsed.session_id)

    check()


def test_the_core_refuses_a_batch_for_a_partition_behind_and_appends_nothing():
    from events_server.core import IngestCore, IngestLimits
    from inkling.errors import OverloadedError
    from inkling.v1 import event_service_pb2, resources_pb2

    user = user_for(2, 4)
    fake = FakeBus(lag={2: 11, 3: 10})
    core = IngestCore(fake, IngestLimits(max_lag=10, retry_after_s=0.5))
    click = resources_pb2.Event(
        event_id="x",
        user_id=user,
        session_id="s",
        item_id="i",
        event_type=resources_pb2.EVENT_TYPE_ITEM_VIEW,
    )
    click.timestamp.GetCurrentTime()
    request = event_service_pb2.TrackEventsRequest(events=[click])
    with pytest.raises(OverloadedError, match="partition 2 holds 11") as caught:
        asyncio.run(core.track(request))
    assert caught.value.retry_after_s == 0.5
    assert fake.appended == []
    click.user_id = user_for(3, 4)  # at the limit, not above it
    request = event_service_pb2.TrackEventsRequest(events=[click])
    assert asyncio.run(core.track(request)).accepted == 1


def test_a_full_or_locked_redis_is_never_success_and_writes_nothing(tmp_path):
    from inkling.errors import OverloadedError
    from inkling.redis_embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        with pytest.raises(OverloadedError, match="out of memory"):
            run(server.address, lambda b, _c: b.append(events("m1", "m2"), 1), partitions=2)
        assert admin.dbsize() == 0
        admin.config_set("maxmemory", "0")
        outcomes = run(server.address, lambda b, _c: b.append(events("m1", "m2"), 1), partitions=2)
        assert not any(o.duplicate for o in outcomes)
        admin.config_set("requirepass", "s3cret")
        with pytest.raises(ConfigurationError, match="credentials"):
            run(server.address, lambda b, _c: b.lag(), partitions=2)
        admin.close()


def test_async_connections_pack_in_c_the_bytes_redis_py_would():
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    client = async_client("127.0.0.1:6379,db=3")  # no I/O until a command
    ours = client.connection_pool.make_connection()
    assert isinstance(ours, bus._HiredisPacking)
    theirs = Connection()
    for args in [
        ("EVALSHA", "a" * 40, 2, "k1", b"k\x002", 1.5, 10**20, "é", memoryview(b"mv"), b""),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", b"x"),
    ]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", True)


def test_ingest_refuses_the_events_of_a_forgotten_user_or_session() -> None:
    from events_server.core import IngestCore, IngestLimits
    from inkling.v1 import event_service_pb2, resources_pb2

    def event(event_id: str, user: str, session: str) -> resources_pb2.Event:
        e = resources_pb2.Event(
            event_id=event_id, user_id=user, session_id=session, item_id="i1", event_type=3
        )
        e.timestamp.FromSeconds(NOW_US // 1_000_000 - 60)
        return e

    fake = FakeBus()
    fake.tombstones = {"u:gone", "s:gone-session"}
    core = IngestCore(fake, IngestLimits(), clock_us=lambda: NOW_US)
    request = event_service_pb2.TrackEventsRequest(
        events=[event("a", "gone", "s1"), event("b", "", "gone-session"), event("c", "stays", "s2")]
    )
    result = asyncio.run(core.track(request))
    assert result.accepted == 1 and [e.event_id for e in fake.appended] == ["c"]
    assert [(r.index, r.reason.split(":")[0]) for r in result.rejected] == [
        (0, "user_id"),
        (1, "session_id"),
    ]


def test_client_options_pass_the_tls_keys_feast_passes(tmp_path):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key"))
    for path in (ca, cert, key):
        path.write_text("pem")
    address = (
        f"h:6380,username=worker,password=ipw,ssl=true,ssl_ca_certs={ca},ssl_certfile={cert},"
        f"ssl_keyfile={key},ssl_cert_reqs=required,ssl_check_hostname=false"
    )
    assert client_options(address) == {
        "host": "h",
        "port": 6380,
        "username": "worker",
        "password": "ipw",
        "ssl": True,
        "ssl_ca_certs": str(ca),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    for bad, named in (
        (f"h:1,ssl_ca_certs={ca}", "need ssl=true"),
        (f"h:1,ssl=true,ssl_certfile={cert}", "go together"),
        ("h:1,ssl=true,ssl_ca_certs=/no/such.pem", "/no/such.pem does not exist"),
        ("h:1,ssl=maybe", "ssl='maybe'"),
        ("h:1,ssl=true,ssl_cert_reqs=strict", "ssl_cert_reqs='strict'"),
        ("h:1,ssl_ca_cert=x", "'ssl_ca_cert' is unknown"),
    ):
        with pytest.raises(ConfigurationError, match=named):
            client_options(bad)
    assert client_options("h:1,skip_full_coverage_check=true") == {"host": "h", "port": 1}
