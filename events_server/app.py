"""The ingest process's composition root: the bus connection and how it is wired.

For the CLI: ``EventsApp(settings, events_settings)`` is an ``App`` for
``inkling.serving.runtime.start_server``/``serve``; :func:`serve_events` runs it until
SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from events_server.admin import SERVICE as ADMIN_SERVICE
from events_server.admin import AdminServicer
from events_server.core import IngestCore, IngestLimits
from events_server.service import EventServicer
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.events.bus import EventBus, async_client
from inkling.events.kafka_bus import KafkaEventBus, KafkaSettings, ensure_topic
from inkling.pseudonym import Pseudonymizer
from inkling.serving.runtime import DeferredServicer, Running, serve
from inkling.telemetry.instruments import INGEST_REJECTED
from inkling.v1 import admin_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc

log = logging.getLogger("inkling.events")
SERVICE_DESCRIPTOR = event_service_pb2.DESCRIPTOR.services_by_name["EventService"]
SERVICE = SERVICE_DESCRIPTOR.full_name


class EventsApp:
    """Connects to the bus's Redis and serves TrackEvents.

    Start-up does not wait for Redis: when it is unreachable the process still starts
    (logging a warning) and answers UNAVAILABLE until Redis is back, then recovers by
    itself (the client reconnects on the next call). A Redis that answers but refuses
    (bad password, a bus key of the wrong type) refuses to start.

    Args:
        settings: the main settings; ``redis_address`` names the bus's Redis.
        es: the ingest settings.
        client: an asyncio Redis client to use instead of one built from
            ``redis_address`` (tests); the app then does not close it.
        pseudonyms: replaces each event's user id before anything else sees it
            (`inkling.pseudonym`); None keeps ids as sent.
        admin: answer the AdminService (`events_server.admin`); False refuses it.
        admin_redis: the Redis address a forget connects with (with ACLs on, the
            ``eraser`` role's); None: ``settings.redis_address``.
        kafka: when enabled (``[kafka] bootstrap_servers``), accepted events are produced
            to the Kafka topic (`inkling.events.kafka_bus`) instead of the Redis streams;
            Redis still keeps the dedupe window and the tombstones. Unlike Redis, the
            brokers must answer at start (the topic's partitions are read then).
    """

    service_names: tuple[str, ...] = (SERVICE, ADMIN_SERVICE)

    def __init__(
        self,
        settings: Settings,
        es: EventsSettings,
        client: aioredis.Redis | None = None,
        pseudonyms: Pseudonymizer | None = None,
        admin: bool = False,
        admin_redis: str | None = None,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.settings = settings
        self.pseudonyms = pseudonyms
        self.admin = AdminServicer(settings, admin, pseudonyms, admin_redis)
        self.es = es
        self._given_client = client
        self.client: aioredis.Redis | None = None
        self.kafka = kafka if kafka is not None and kafka.enabled else None
        self.bus: EventBus | None = None
        self.kafka_bus: KafkaEventBus | None = None
        self.core: IngestCore | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gate = DeferredServicer(SERVICE_DESCRIPTOR, self._loaded_servicer, "events")
        event_service_pb2_grpc.add_EventServiceServicer_to_server(gate, server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, server)

    def _loaded_servicer(self) -> EventServicer | None:
        return EventServicer(self.core, self.pseudonyms) if self.core is not None else None

    async def start(self) -> None:
        es = self.es
        INGEST_REJECTED.add(0, {"reason": "backpressure"})  # rate() sees the first refusal
        if self._given_client is not None:
            client = self._given_client
        elif self.settings.redis_address:
            client = async_client(
                self.settings.redis_address,
                es.redis_timeout_s,
                cluster=self.settings.online_store == "redis_cluster",
            )
        else:
            raise ConfigurationError("the events server needs a Redis: set redis_address")
        self.client = client
        bus = EventBus(
            client,
            es.partitions,
            dedupe_window_s=es.dedupe_window_s,
            lag_cache_s=es.lag_cache_s,
            lag_cap=es.max_lag + 1,
            wait_replicas=es.wait_replicas,
            wait_timeout_ms=es.wait_timeout_ms,
        )
        try:
            await bus.ensure_streams()
            await self._check_eviction(client)
        except DependencyUnavailableError as e:
            log.warning("starting without the event bus (answering UNAVAILABLE): %s", e)
        except BaseException:
            await self.close()
            raise
        self.bus = bus
        core_bus: EventBus | KafkaEventBus = bus
        if self.kafka is not None:
            try:
                partitions = await asyncio.to_thread(ensure_topic, self.kafka)
            except BaseException:
                await self.close()
                raise
            self.kafka_bus = KafkaEventBus(
                client,
                self.kafka,
                partitions,
                dedupe_window_s=es.dedupe_window_s,
                lag_cache_s=max(es.lag_cache_s, 0.5),
            )
            self.kafka_bus.start()
            core_bus = self.kafka_bus
            log.info("events go to Kafka topic %s (%d partitions)", self.kafka.topic, partitions)
        self.core = IngestCore(
            core_bus,
            IngestLimits(
                max_future_s=es.max_future_s,
                max_lag=es.max_lag,
                retry_after_s=es.retry_after_s,
            ),
        )
        log.info(
            "events ready: %d partitions, dedupe window %d s, max lag %d",
            es.partitions, es.dedupe_window_s, es.max_lag,
        )  # fmt: skip

    @staticmethod
    async def _check_eviction(client: aioredis.Redis) -> None:
        """Warn when Redis may evict keys: dedupe keys, or worse, streams would go."""
        try:
            config = await client.config_get("maxmemory-policy")
        except RedisError:  # CONFIG may be disabled (managed Redis): nothing to check
            return
        if not isinstance(config, dict):  # a cluster client's per-node replies: not checked
            return
        policy = config.get("maxmemory-policy") or config.get(b"maxmemory-policy")
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and policy != "noeviction":
            log.warning(
                "the bus's Redis has maxmemory-policy %s: events and dedupe keys may be "
                "evicted; use noeviction",
                policy,
            )

    async def close(self) -> None:
        if self.kafka_bus is not None:
            await asyncio.to_thread(self.kafka_bus.close)
            self.kafka_bus = None
        if self.client is not None and self._given_client is None:
            await self.client.aclose()
        self.client = None


async def serve_events(
    settings: Settings,
    es: EventsSettings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[Running], None] | None = None,
) -> None:
    """Run the ingest server until SIGTERM or SIGINT, then drain and stop."""
    await serve(
        EventsApp(settings, es),
        host=es.host,
        port=es.port,
        grace_s=es.grace_s,
        reuse_port=reuse_port,
        on_ready=on_ready,
    )
