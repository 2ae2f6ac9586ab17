"""Ingest and the stream worker on a Redis Cluster while a master is killed (SIGKILL).

Three masters and three replicas on loopback. Events go through the real ingest server
(gRPC TrackEvents) while a stream worker consumes them; a master is killed mid-ingest,
its replica takes over, and ingest and the worker go on. Then the test compares what
ingest acknowledged with what the worker logged (what the bus delivered):

- with `wait_replicas = 1` (the ingest WAITs for the replica before acknowledging), no
  acknowledged event may be missing;
- without it, the events lost are the ones acknowledged in the replication window just
  before the kill, never earlier.

To open that window on purpose, the victim's replica is stopped (SIGSTOP) for 0.6 s
before the master is killed (and continued right after): with WAIT nothing of the
victim's partitions is acknowledged meanwhile; without it the master goes on
acknowledging what exists nowhere else. Whether those events are then lost depends on
how much of the replication stream already sat in the replica's socket buffer (on
loopback usually all of it): the test asserts the bound, and prints the count.

The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.events.bus import measure_lag_sync, partition_of, stream_key
from inkling.events.eventlog import EventLog
from inkling.feature_store.feast_store import feast_cli
from inkling.redis_cluster import LocalRedisCluster
from inkling.serving.runtime import start_server
from inkling.v1 import event_service_pb2, event_service_pb2_grpc
from stream_worker.app import build_worker
from stream_worker.settings import WorkerSettings
from tests.conftest import temp_settings
from tests.integration.test_servers import Loop
from tests.integration.test_stream_worker import CATEGORIES, FAST, Running, event, write_catalog

pytestmark = [pytest.mark.redis]

P = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalRedisCluster]:
    root = tmp_path_factory.mktemp("failover-cluster")
    with LocalRedisCluster(root, persistent=True, node_timeout_ms=1000) as c:
        yield c


@pytest.fixture(scope="module")
def settings(tmp_path_factory, cluster) -> Settings:
    settings = temp_settings(
        tmp_path_factory.mktemp("failover"),
        online_store="redis_cluster",
        redis_address=cluster.address,
    )
    feast_cli(settings, "apply", quiet=True)
    settings.export_env()
    write_catalog(settings, CATEGORIES)
    return settings


class Producer:
    """Sends batches of new events to TrackEvents until stopped, retrying a batch that
    failed (as a client does: the same event ids); records when each was acknowledged."""

    def __init__(self, port: int, tag: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.track = event_service_pb2_grpc.EventServiceStub(self.channel).TrackEvents
        self.tag = tag
        self.acked: dict[str, float] = {}  # event id -> monotonic time of the acknowledgement
        self.sessions: dict[str, str] = {}
        self.sent: dict[str, float] = {}  # event id -> when its acknowledged call was sent
        self.failures: Counter[str] = Counter()
        self.last_error = ""
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self.stop.is_set():
            batch = [
                event(f"{self.tag}-{k}-{i}", "item_view", f"{self.tag}-s{(k + i) % 40}",
                      f"i{1 + (k + i) % 5}")
                for i in range(10)
            ]  # fmt: skip
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    reply = self.track(
                        event_service_pb2.TrackEventsRequest(events=batch), timeout=5
                    )
                except grpc.RpcError as e:
                    self.failures[e.code().name] += 1
                    self.last_error = f"{e.code().name}: {e.details()}"
                    time.sleep(0.05)
                    continue
                now = time.monotonic()
                self.latencies.append(now - started)
                assert not reply.rejected and reply.accepted + reply.duplicates == len(batch)
                for e in batch:
                    self.acked[e.event_id] = now
                    self.sent[e.event_id] = started
                    self.sessions[e.event_id] = e.session_id
                break
            k += 1
            time.sleep(0.005)

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        self.channel.close()


def _replica_of(cluster: LocalRedisCluster, master: int) -> int:
    """Index of the replica of node `master`."""
    nodes = cluster.cluster_nodes(master)
    me = next(n for n in nodes if n.port == cluster.nodes[master].port)
    replica = next(n for n in nodes if n.master_id == me.node_id)
    return [node.port for node in cluster.nodes].index(replica.port)


def _replica_online(node: redis.Redis) -> bool:
    info: dict[str, Any] = node.info("replication")  # type: ignore[assignment]
    return int(info.get("connected_slaves", 0)) >= 1 and (
        info.get("slave0", {}).get("state") == "online"
    )


def _phase(
    settings: Settings,
    cluster: LocalRedisCluster,
    client: redis.Redis,
    wait_replicas: int,
    spare: set[int],
) -> dict[str, Any]:
    """Ingest + worker, kill the master of the first partition whose master is not in
    `spare` (one that still has its replica) mid-ingest, go on, drain; what was
    acknowledged, stored, logged."""
    tag = f"w{wait_replicas}"
    loop = Loop()
    es = EventsSettings(port=0, partitions=P, wait_replicas=wait_replicas, redis_timeout_s=1.0)
    server = loop.run(start_server(EventsApp(settings, es), port=0))
    worker = Running(
        build_worker(
            settings, WorkerSettings(partitions=P, worker_id=f"f{tag}", fsync=False, **FAST)
        )
    )
    masters = [cluster.master_index(stream_key(p, True)) for p in range(P)]
    victim = next(m for m in masters if m not in spare)
    killed_partitions = [p for p in range(P) if masters[p] == victim]
    try:
        with Producer(server.port, tag) as producer:
            time.sleep(2.0)
            # The victim's replica stops reading (SIGSTOP) for a moment before the kill:
            # what the master acknowledges meanwhile exists nowhere else. WAIT refuses to
            # acknowledge it; without WAIT it is acknowledged and at risk.
            replica = cluster.nodes[_replica_of(cluster, victim)]
            pid = replica._process.pid  # type: ignore[union-attr]
            os.kill(pid, signal.SIGSTOP)
            paused_at = time.monotonic()
            time.sleep(0.6)
            before = len(producer.acked)
            kill_at = time.monotonic()
            cluster.kill(victim)
            os.kill(pid, signal.SIGCONT)
            promoted = cluster.wait_for_failover(victim)
            failover_s = time.monotonic() - kill_at
            # The killed node comes back and rejoins as the new master's replica (until it
            # does, an ingest with wait_replicas refuses that master's partitions).
            cluster.nodes[victim].start()
            with contextlib.closing(cluster.node_client(promoted)) as node:
                deadline = time.monotonic() + 60
                while not _replica_online(node) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert _replica_online(node), "the killed node did not rejoin as a replica"
            rejoined_s = time.monotonic() - kill_at
            deadline = time.monotonic() + 30
            while len(producer.acked) < before + 200 and time.monotonic() < deadline:
                time.sleep(0.05)  # ingest goes on after the failover
        acked = producer.acked
        assert len(acked) >= before + 200, (
            f"ingest did not resume after the failover: {dict(producer.failures)}, "
            f"{producer.last_error}"
        )
        deadline = time.monotonic() + 60
        while sum(b.total for b in measure_lag_sync(client, P).values()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert not sum(b.total for b in measure_lag_sync(client, P).values()), "no drain"
        time.sleep(1.0)  # the last log flush
    finally:
        worker.close()
        loop.run(server.stop())
        loop.close()
    assert worker.error is None
    # What the worker logged is what the bus delivered (it trims what it acknowledged, so
    # the streams alone no longer hold everything): an acknowledged event it never logged
    # vanished from the bus.
    logged = Counter(
        i for i in EventLog(settings.events_dir).read(["event_id"]).column(0).to_pylist()
        if i.startswith(f"{tag}-")
    )  # fmt: skip
    lost = {i: kill_at - acked[i] for i in acked if i not in logged}
    # Sent after the replica stopped and acknowledged before the kill (a call sent just
    # before the stop can be answered just after it, having been replicated in time).
    at_risk = [
        i
        for i, at in acked.items()
        if producer.sent[i] >= paused_at
        and at <= kill_at
        and partition_of(f"s:{producer.sessions[i]}", P) in killed_partitions
    ]
    latencies = sorted(producer.latencies)
    return {
        "victim": victim,
        "promoted": promoted,
        "killed_partitions": killed_partitions,
        "failover_s": round(failover_s, 2),
        "replica_back_s": round(rejoined_s, 2),
        "acked": len(acked),
        "acked_before_kill": before,
        "acked_while_replica_stopped": len(at_risk),
        "lost": len(lost),
        "lost_acked_s_before_kill": sorted(round(v, 3) for v in lost.values()),
        "failed_calls": dict(producer.failures),
        "logged": len(logged),
        "logged_not_acknowledged": len(set(logged) - set(acked)),
        "logged_twice": sum(1 for n in logged.values() if n > 1),
        "logged_twice_partitions": sorted(
            {partition_of(f"s:{producer.sessions[i]}", P) for i, n in logged.items() if n > 1}
        ),
        "append_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "append_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
    }


def test_a_master_killed_during_ingest_loses_nothing_acknowledged_with_wait_and_a_bounded_window_without(
    settings, cluster
):
    client = cluster.client()
    try:
        # First with WAIT: the ingest acknowledges once the replica has the events.
        waited = _phase(settings, cluster, client, wait_replicas=1, spare=set())
        print("\nwith wait_replicas=1:", waited)
        # Nothing of the victim's partitions was acknowledged while its replica was
        # stopped, and nothing acknowledged was lost.
        assert waited["acked_while_replica_stopped"] == 0
        assert waited["lost"] == 0
        # Then without, killing another master (the first one's partitions now have a
        # master without a replica): what dies with the master is what it acknowledged
        # and had not replicated, a window of well under a second on loopback.
        plain = _phase(
            settings, cluster, client, wait_replicas=0, spare={waited["victim"], waited["promoted"]}
        )
        print("without WAIT:", plain)
        # Without WAIT the master went on acknowledging while its replica was stopped;
        # whatever was lost was acknowledged in that window (or the replication lag just
        # before it), never earlier.
        assert plain["acked_while_replica_stopped"] > 0
        assert all(age < 0.6 + 0.5 for age in plain["lost_acked_s_before_kill"])
        for result in (waited, plain):
            assert result["failover_s"] < 15
    finally:
        client.close()
