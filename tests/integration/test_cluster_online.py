"""Feast's online store on a real Redis Cluster (three masters, three replicas on
loopback): the bulk materializer writes what Feast's own materialize writes, the row
reader and the item snapshot read what Feast reads, and the servers answer as they do
from one Redis server holding the same data."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
import redis

from batch.generate import GeneratorConfig
from batch.materialize import bulk_materialize, index_items
from inkling.config import Settings
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import SLOTS, item_index_key
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.feature_store.snapshot import build_item_snapshot, refresh_item_snapshot
from inkling.redis_cluster import LocalRedisCluster
from inkling.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from stream_worker.online import counter_command, resolve_layout
from tests.integration.test_online_features import UNKNOWN, entity_rows, feast_dict, ids
from tests.integration.test_servers import END, START, Loop, served, start_pair
from tests.integration.test_streaming_e2e import follow_a_moving_intent, streaming_stack

pytestmark = [pytest.mark.spark, pytest.mark.redis, pytest.mark.slow]  # ~5 min set-up here

DB = 12  # the single-server twin's database of the shared test Redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as c:
        yield c


@pytest.fixture(scope="module")
def single(tmp_path_factory, spark, redis_server) -> Settings:
    """Small features materialized into one Redis server, with embeddings and an index."""
    return served(
        tmp_path_factory.mktemp("cluster-online"), spark, redis_server, DB,
        GeneratorConfig(users=60, items=150, sessions=200, days=3, seed=5),
    )  # fmt: skip


@pytest.fixture(scope="module")
def clustered(single: Settings, cluster: LocalRedisCluster) -> Settings:
    """The same repository and registry with the cluster as the online store."""
    return replace(single, online_store="redis_cluster", redis_address=cluster.address)


def _flush(cluster: LocalRedisCluster) -> None:
    for i in range(len(cluster.nodes)):
        with cluster.node_client(i) as node:
            if node.info("replication")["role"] == "master":
                node.flushall()


def _records(cluster: LocalRedisCluster) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash on the cluster's masters (Feast's rows), field by field."""
    out: dict[bytes, dict[bytes, bytes]] = {}
    client = cluster.client()
    try:
        for key in client.scan_iter(count=1000, _type="hash"):
            out[key] = client.hgetall(key)
    finally:
        client.close()
    return out


def _index(cluster: LocalRedisCluster, project: str) -> set[str]:
    client = cluster.client()
    try:
        found = set()
        for key in client.scan_iter(match=b"inkling:item_index:*", count=1000):
            found |= {m.decode() for m in client.smembers(key)}
        return found
    finally:
        client.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with(store: Any, fn: Any) -> Any:
    client = await open_async_redis(store)
    try:
        return await fn(client)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def materialized(clustered: Settings, cluster: LocalRedisCluster) -> dict[bytes, Any]:
    """Feast's own materialize into the cluster, its records, then the bulk path's run
    over the flushed cluster (left in place for the other tests)."""
    _flush(cluster)
    open_store(clustered).materialize(START, END)
    stock = _records(cluster)
    _flush(cluster)
    bulk_materialize(open_store(clustered), START, END, progress=False)
    return stock


def test_bulk_materialize_writes_feasts_records_on_every_master(clustered, cluster, materialized):
    stock = materialized
    bulk = _records(cluster)
    assert len(bulk) == len(stock) > 300
    assert bulk == stock  # byte for byte, field by field
    masters = {cluster.master_index(key) for key in bulk}
    assert masters == {0, 1, 2}
    # Every item row's id is in the index set of its slot, which lies in that slot.
    store = open_store(clustered)
    items = set(ids(clustered, "item_features", "item_id")) | set(
        ids(clustered, "item_covisitation", "item_id")
    )
    assert _index(cluster, store.project) == items
    some = sorted(items)[0]
    (row,) = feast_codec.entity_keys("item_id", [some], store.project)
    index = item_index_key(store.project, "item_id", redis.crc.key_slot(row))
    assert redis.crc.key_slot(index) == redis.crc.key_slot(row)
    client = cluster.client()
    assert client.sismember(index, some)
    client.close()


def test_bulk_materialize_never_overwrites_a_newer_row_on_the_cluster(
    clustered, cluster, materialized
):
    store = open_store(clustered)
    again = bulk_materialize(store, START, END, views=["item_features"], progress=False)
    assert again[0].entities > 100 and again[0].written == 0  # Redis holds them as new
    client = cluster.client()
    keys = feast_codec.entity_keys(
        "item_id", ids(clustered, "item_features", "item_id"), store.project
    )
    gone = keys[::5]
    for key in gone:
        client.delete(key)
    client.close()
    again = {r.view: r for r in bulk_materialize(store, START, END, progress=False)}
    assert again["item_features"].written == len(gone)  # exactly the rows Redis lacks
    assert again["user_features"].written == 0
    assert _records(cluster) == materialized


@pytest.mark.parametrize("service", ["ranker_v1", "retrieval_v1"])
def test_row_reader_reads_what_feast_reads_from_the_cluster(
    clustered, cluster, materialized, service
):
    store = open_store(clustered)
    users = ids(clustered, "user_features", "user_id") + UNKNOWN
    sessions = ids(clustered, "session_features", "session_id") + UNKNOWN
    columns = resolve_service(store, service)
    expected = feast_dict(store, service, entity_rows(users, sessions, ["i1"]))

    async def read(client):
        reader = RowReader(client, columns, enforce_ttl=False)
        return await reader.read_many({"user_features": users, "session_features": sessions})

    got = run(_with(store, read))
    for view, keys in (("user_features", users), ("session_features", sessions)):
        names = columns.view(view).feature_names
        want = [
            None
            if all(expected[n][i] is None for n in names)
            else {n: expected[n][i] for n in names}
            for i in range(len(keys))
        ]
        assert got[view] == want, view
        assert sum(r is not None for r in got[view]) == len(keys) - len(UNKNOWN)
    client = cluster.client()
    try:
        sync = RowReader(client, columns, enforce_ttl=False)
        assert sync.read_sync("user_features", users) == got["user_features"]
    finally:
        client.close()


def _snapshot_dict(snapshot: Any) -> dict[str, Any]:
    ids_ = sorted(snapshot.ids)
    return {"ids": ids_, **snapshot.take(ids_, enforce_ttl=False).to_dict()}


def test_snapshot_from_the_index_equals_one_servers_snapshot(
    single, clustered, cluster, materialized
):
    columns = resolve_service(open_store(single), "retrieval_v1")
    one = run(_with(open_store(single), lambda c: build_item_snapshot(c, columns)))
    store = open_store(clustered)
    indexed = run(_with(store, lambda c: build_item_snapshot(c, columns, chunk_size=64)))
    assert one.n_items > 100
    assert _snapshot_dict(indexed) == _snapshot_dict(one)
    assert indexed.keys_scanned == one.n_items  # the index's ids, not the keyspace
    # A changed row: the incremental refresh reads just that one, as one server's does.
    (item,) = ids(clustered, "item_features", "item_id")[:1]
    (key,) = feast_codec.entity_keys("item_id", [item], store.project)
    ts_field = b"_ts:item_features"
    client = cluster.client()
    stamp = client.hget(key, ts_field)
    later = feast_codec.timestamp_bytes(int(END.timestamp() * 1_000_000))
    client.hset(key, ts_field, later)
    try:
        refreshed = run(_with(store, lambda c: refresh_item_snapshot(c, indexed)))
        assert refreshed.rows_read == 1
        full = run(_with(store, lambda c: build_item_snapshot(c, columns)))
        assert _snapshot_dict(refreshed) == _snapshot_dict(full)
    finally:
        client.hset(key, ts_field, stamp)
    # Without the index (rows Feast's materialize wrote), the build scans every master;
    # `index_items` rebuilds the index from those rows.
    for slot in range(SLOTS):
        client.delete(item_index_key(store.project, "item_id", slot))
    client.close()
    scanned = run(_with(store, lambda c: build_item_snapshot(c, columns)))
    assert _snapshot_dict(scanned) == _snapshot_dict(one)
    assert index_items(open_store(clustered)) == one.n_items
    assert _index(cluster, store.project) == set(one.ids)


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


def _answers(
    loop: Loop, settings: Settings, users: list[tuple[str, str]], items: list[str]
) -> list[Any]:
    """Recommend and RankCandidates (with debug: the features the ranker saw) per user."""
    retrieval, ranking = start_pair(loop, settings, grace_s=1)
    channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
    try:
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
        out = []
        for user, session in users:
            reply = stub.Recommend(
                ranking_service_pb2.RecommendRequest(
                    user_id=user, session_id=session, num_results=10, debug=True
                ),
                timeout=30,
            )
            ranked = stub.RankCandidates(
                ranking_service_pb2.RankCandidatesRequest(
                    user_id=user,
                    session_id=session,
                    candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in items],
                    debug=True,
                ),
                timeout=30,
            )
            for response in (reply, ranked):
                out.append(
                    {
                        "items": [(i.item_id, round(i.score, 9)) for i in response.items],
                        "features": sorted(
                            (f.entity, f.feature, f.value) for f in response.debug.features
                        ),
                        "degraded": list(response.degradation.reasons),
                    }
                )
        return out
    finally:
        channel.close()
        loop.run(ranking.stop())
        loop.run(retrieval.stop())


def test_servers_answer_from_the_cluster_as_from_one_server(single, clustered, materialized, loop):
    sessions = ids(single, "session_features", "session_id")
    users = [
        *zip(ids(single, "user_features", "user_id")[:3], sessions[-3:], strict=True),
        ("nobody", "none"),
    ]
    items = ids(single, "item_features", "item_id")[:40]
    one = _answers(loop, single, users, items)
    many = _answers(loop, clustered, users, items)
    assert many == one
    assert all(answer["items"] for answer in one)
    assert all(answer["features"] for answer in one[:2])  # features were really read


def test_the_worker_adds_an_item_it_writes_to_the_index(single, redis_server):
    """The stream worker's counter script adds the item to its slot's index set."""
    store = open_store(single)
    layout = resolve_layout(store)
    command = counter_command(layout, {"streamed-only": {29_000_000: [2, 1]}}, 29_000_000, 0)
    assert command is not None
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    try:
        client.execute_command(*command)
        (row,) = feast_codec.entity_keys("item_id", ["streamed-only"], store.project)
        index = item_index_key(store.project, "item_id", redis.crc.key_slot(row))
        assert client.smembers(index) == {b"streamed-only"}
    finally:
        client.close()


def _slot_without_keys(cluster: LocalRedisCluster, project: str) -> tuple[str, int]:
    """A user id that has no row, whose slot holds no key at all."""
    client = cluster.client()
    try:
        for n in range(10_000):
            user = f"nobody-{n}"
            (key,) = feast_codec.entity_keys("user_id", [user], project)
            slot = redis.crc.key_slot(key)
            owner = cluster.master_index(key)
            with cluster.node_client(owner) as node:
                if node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
                    return user, slot
    finally:
        client.close()
    raise AssertionError("no empty slot found")  # pragma: no cover


def test_recommend_follows_a_moving_intent_through_ingest_and_a_worker_on_the_cluster(
    clustered, cluster, materialized
):
    """The streaming path unchanged on the cluster: events through the ingest server onto
    the cluster's bus, a stream worker's session rows, and `Recommend` reading them. The
    cluster is then put back as `materialized` left it (the worker wrote session rows,
    item counters and its own keys), for the tests that compare records with it."""
    try:
        with streaming_stack(clustered) as (events_port, ranking_port):
            follow_a_moving_intent(clustered, events_port, ranking_port)
    finally:
        _flush(cluster)
        bulk_materialize(open_store(clustered), START, END, progress=False)


def test_reads_follow_ask_and_moved_redirects_and_a_failover(clustered, cluster, materialized):
    store = open_store(clustered)
    project = store.project
    columns = resolve_service(store, "ranker_v1")
    users = ids(clustered, "user_features", "user_id")
    user, slot = _slot_without_keys(cluster, project)
    (key,) = feast_codec.entity_keys("user_id", [user], project)
    source = cluster.master_index(key)
    target = next(i for i in range(3) if i != source)
    ids_ = {
        i: n.node_id
        for i in range(6)
        for n in cluster.cluster_nodes(i)
        if n.port == cluster.nodes[i].port
    }

    async def scenario(client):
        reader = RowReader(client, columns, enforce_ttl=False)
        before = await reader.read("user_features", [*users, user])
        assert before[-1] is None and all(r is not None for r in before[:-1])
        # The slot migrates: its source answers ASK for a key it lacks.
        with cluster.node_client(target) as t, cluster.node_client(source) as s:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids_[source])
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids_[target])
            with pytest.raises(redis.exceptions.AskError):
                s.hmget(key, "x")
            assert await reader.read("user_features", [*users, user]) == before
            # The migration ends: the old owner answers MOVED; the stale map is refreshed.
            for i in range(3):
                with cluster.node_client(i) as node:
                    node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids_[target])
            with pytest.raises(redis.exceptions.MovedError):
                s.hmget(key, "x")
        assert await reader.read("user_features", [*users, user]) == before
        # A master dies; once its replica took over, the same client reads every row.
        victim = cluster.master_index(feast_codec.entity_keys("user_id", [users[0]], project)[0])
        cluster.kill(victim)
        cluster.wait_for_failover(victim)
        assert await reader.read("user_features", [*users, user]) == before
        return before

    run(_with(store, scenario))
    # The materializer writes through the new topology; nothing is newer, nothing lost.
    again = {r.view: r for r in bulk_materialize(open_store(clustered), START, END, progress=False)}
    assert again["user_features"].written == 0
    assert _records(cluster) == materialized
