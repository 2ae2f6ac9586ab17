"""The stream worker's composition root and entrypoints (`inkling worker`)."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from types import FrameType
from typing import cast

import redis
import redis.cluster

from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.events.bus import client_options, cluster_options, measure_lag_sync
from inkling.events.kafka_bus import KafkaSettings, group_lag, group_watcher
from inkling.feature_store.feast_store import open_store
from inkling.telemetry.instruments import DEAD_LETTERS, track_bus_lag
from stream_worker.catalog import Catalog
from stream_worker.logfiles import StreamLogWriter
from stream_worker.online import resolve_layout
from stream_worker.partitions import WorkerStats
from stream_worker.settings import WorkerSettings
from stream_worker.worker import Worker

log = logging.getLogger(__name__)


def connect(address: str, worker_settings: WorkerSettings, cluster: bool = False) -> redis.Redis:
    """A blocking client for the bus (and the online store, the same server); `cluster`:
    `address` lists a Redis Cluster's startup nodes (a ``RedisCluster`` client)."""
    if cluster:
        nodes, options = cluster_options(address)
        return cast(
            redis.Redis,
            redis.RedisCluster(
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
                **options,
                socket_timeout=max(10.0, worker_settings.poll_ms / 1000 + 5),
                socket_connect_timeout=5.0,
            ),
        )
    return redis.Redis(
        **client_options(address),
        socket_timeout=max(10.0, worker_settings.poll_ms / 1000 + 5),
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )


def build_worker(
    settings: Settings, worker_settings: WorkerSettings, kafka: KafkaSettings | None = None
) -> Worker:
    """Wire a worker from the settings: the Feast registry, Redis, the catalogue, the log;
    with `kafka` enabled (``[kafka] bootstrap_servers``), one that consumes the Kafka topic
    (`stream_worker.kafka_source`) instead of the Redis streams.

    Raises:
        ConfigurationError: no Redis address, an online store other than that Redis (one
            server or a cluster), or a registry without the push sources' views (run
            `inkling apply`).
    """
    if not settings.uses_redis or not settings.redis_address:
        raise ConfigurationError(
            "the stream worker needs online_store = redis (or redis_cluster) and a Redis "
            "address (the bus's)"
        )
    layout = resolve_layout(open_store(settings))
    if layout.connection_string != settings.redis_address:
        raise ConfigurationError(
            "the stream worker commits online rows and bus progress in one transaction: "
            f"Feast's online store ({layout.connection_string}) must be the bus's Redis "
            f"({settings.redis_address})"
        )
    parts = (
        connect(
            settings.redis_address,
            worker_settings,
            cluster=settings.online_store == "redis_cluster",
        ),
        layout,
        Catalog(settings.catalog_dir / "items.parquet", worker_settings.catalog_poll_s),
        StreamLogWriter(settings.events_dir, settings.serves_dir, fsync=worker_settings.fsync),
        worker_settings,
    )
    if kafka is not None and kafka.enabled:
        from stream_worker.kafka_source import KafkaWorker

        return KafkaWorker(*parts, kafka=kafka)
    return Worker(*parts)


def run_worker(
    settings: Settings,
    worker_settings: WorkerSettings,
    stop: threading.Event,
    *,
    freeze_heap: bool = False,
    kafka: KafkaSettings | None = None,
) -> WorkerStats:
    """Run one worker until `stop` is set; it then finishes its micro-batch, releases its
    partitions (another worker takes them at once) and returns its counters.

    `freeze_heap` (for a process that is only this worker): once built, move every object
    loaded so far (Feast, pyarrow, the registry; they live as long as the process) out of
    the garbage collector's reach. Its full passes otherwise walk them every few seconds
    under load, ~170 ms each: the worker's longest stall in `inkling bench freshness`.
    """
    worker = build_worker(settings, worker_settings, kafka)
    if freeze_heap:
        gc.collect()
        gc.freeze()
    client, partitions = worker.client, worker_settings.partitions
    DEAD_LETTERS.add(0)  # the series exists from the start: increase() sees the first one
    if kafka is not None and kafka.enabled:
        watcher = group_watcher(kafka)
        topic = kafka.topic

        def kafka_lag() -> dict[int, int]:
            count = len(watcher.list_topics(timeout=5).topics[topic].partitions)
            return group_lag(watcher, topic, count)

        untrack = track_bus_lag(kafka_lag)
    else:
        untrack = track_bus_lag(
            lambda: {p: b.total for p, b in measure_lag_sync(client, partitions).items()},
        )
    try:
        return worker.run(stop)
    finally:
        untrack()
        worker.client.close()


def serve_worker(
    settings: Settings, worker_settings: WorkerSettings, kafka: KafkaSettings | None = None
) -> WorkerStats:
    """`run_worker` in the foreground until SIGTERM or SIGINT (call from the main thread)."""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batch and releasing partitions", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return run_worker(settings, worker_settings, stop, freeze_heap=True, kafka=kafka)
