"""Per-request rows read from Feast's Redis records without Feast.

`RowReader` reads user and session rows: one HMGET per key, all keys of a request in
one round trip, values decoded to what Feast's `to_dict()` returns. On a Redis Cluster
the HMGETs go to the masters that own their keys, one pipeline per master sent
concurrently (`inkling.feature_store.cluster`).

TTL: Feast 0.67's Redis `get_online_features` returns a row whatever its age (its
per-view TTL bounds only point-in-time joins, and ``precompute_online`` flags old
values without dropping them). Here a view's TTL is enforced by default, as the
training sets see it: a row whose event time is more than `ttl` before now reads as
missing. ``enforce_ttl=False`` gives Feast's online values exactly. The item snapshot
and the hydrator follow the same rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import hiredis
import redis
import redis.asyncio as aioredis
from feast import FeatureStore
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig

from inkling.errors import ConfigurationError, DependencyUnavailableError, NotFoundError
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import cluster_exchange, cluster_exchange_sync
from inkling.feature_store.columns import ServiceColumns, ViewColumns
from inkling.feature_store.values import Raw, Row, expired, ts_nanos, value_decoder
from inkling.telemetry.instruments import ONLINE_STORE_DURATION, ONLINE_STORE_ERRORS

log = logging.getLogger(__name__)

AsyncClient = aioredis.Redis | aioredis.RedisCluster
"""The online store's asyncio client: one Redis server or a Redis Cluster."""
SyncClient = redis.Redis | redis.RedisCluster
AnyRedis = AsyncClient | SyncClient


async def open_async_redis(store: FeatureStore) -> AsyncClient:
    """An asyncio client for the store's online Redis (`redis_type` redis or
    redis_cluster), connected as Feast connects; a cluster's slot map is loaded here."""
    config = store.config.online_store
    if not isinstance(config, RedisOnlineStoreConfig):
        raise ConfigurationError("the online feature reader needs Feast's Redis online store")
    if config.redis_type not in ("redis", "redis_cluster"):
        raise ConfigurationError(
            f"the online feature reader reads one Redis server or a Redis Cluster, not "
            f"redis_type {config.redis_type}"
        )
    client = await RedisOnlineStore()._get_client_async(config)
    if isinstance(client, aioredis.RedisCluster):
        try:
            await client.initialize()
        except redis.RedisError as e:
            raise DependencyUnavailableError(
                f"Redis Cluster at {config.connection_string.split(',', 1)[0]} cannot be "
                f"reached ({type(e).__name__})"
            ) from None
        return client
    if not isinstance(client, aioredis.Redis):  # pragma: no cover - redis_type checked above
        raise ConfigurationError("Feast built an unexpected Redis client")
    return client


def pack_commands(commands: Iterable[Sequence[bytes | str]]) -> bytes:
    # hiredis' stub declares a 1-tuple where any length is accepted.
    return b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]


async def _hmget_many(
    client: aioredis.Redis, commands: Sequence[Sequence[bytes | str]]
) -> list[list[Raw]]:
    """Send every HMGET at once on one pooled connection and read the replies in order.

    redis-py's Pipeline object costs ~100 µs of Python per call; this is one write and
    one read per reply. Any error or cancellation drops the connection, so no stale
    reply is ever read by its next user.
    """
    pool = client.connection_pool
    try:
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(pack_commands(commands))
            return [await connection.read_response() for _ in commands]
        except BaseException:  # replies may be left unread: never reuse the connection
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)
    except redis.RedisError as e:
        raise DependencyUnavailableError(f"online store read failed: {e}") from e


def _hmget_many_sync(
    client: redis.Redis, commands: Sequence[Sequence[bytes | str]]
) -> list[list[Raw]]:
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
        try:
            connection.send_packed_command([pack_commands(commands)])
            return [connection.read_response() for _ in commands]
        except BaseException:  # replies may be left unread: never reuse the connection
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
    except redis.RedisError as e:
        raise DependencyUnavailableError(f"online store read failed: {e}") from e


async def _cluster_hmget(
    client: aioredis.RedisCluster, commands: Sequence[Sequence[bytes | str]]
) -> list[list[Raw]]:
    """The HMGETs grouped by the master owning each key, one pipeline per master."""
    keys = [cast(bytes, c[1]) for c in commands]
    try:
        return await cluster_exchange(client, keys, [pack_commands([c]) for c in commands])
    except redis.RedisError as e:
        raise DependencyUnavailableError(f"online store read failed: {e}") from e


def _cluster_hmget_sync(
    client: redis.RedisCluster, commands: Sequence[Sequence[bytes | str]]
) -> list[list[Raw]]:
    keys = [cast(bytes, c[1]) for c in commands]
    try:
        return cluster_exchange_sync(client, keys, [pack_commands([c]) for c in commands])
    except redis.RedisError as e:
        raise DependencyUnavailableError(f"online store read failed: {e}") from e


class _ViewReader:
    """Precomputed HMGET fields and decoders of one view."""

    def __init__(self, view: ViewColumns, project: str) -> None:
        self.view = view
        self.fields: tuple[bytes, ...] = (
            *(f.redis_field for f in view.features),
            view.ts_field,
        )
        self.names = view.feature_names
        self.decoders = tuple(value_decoder(f.value_type) for f in view.features)
        self.project = project
        self.ttl_ns = view.ttl_ns

    def keys(self, entity_ids: Sequence[str]) -> list[bytes]:
        return feast_codec.entity_keys(self.view.join_key, entity_ids, self.project)

    def decode(self, reply: list[Raw], now_ns: int | None) -> Row | None:
        *values, ts = reply
        if ts is None and not any(values):
            return None  # no row (Feast answers all nulls)
        if now_ns is not None and expired(ts_nanos(ts), self.ttl_ns, now_ns):
            return None
        return {n: d(v) for n, d, v in zip(self.names, self.decoders, values, strict=True)}


class RowReader:
    """Per-request rows of a service's views by entity id: one HMGET per key, one round trip.

    Args:
        client: the online store's Redis; `redis.asyncio.Redis` for `read`/`read_many`,
            `redis.Redis` for `read_sync`.
        columns: the resolved service (its project names the keys).
        enforce_ttl: read rows older than their view's TTL as missing (see the module doc).
        clock: seconds since the epoch, for the TTL.
    """

    def __init__(
        self,
        client: AnyRedis,
        columns: ServiceColumns,
        enforce_ttl: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.columns = columns
        self.enforce_ttl = enforce_ttl
        self._clock = clock
        self._views = {v.name: _ViewReader(v, columns.project) for v in columns.views}

    def now(self) -> float:
        """The reader's clock (seconds since the epoch), which TTL checks use."""
        return self._clock()

    def redis_key(self, view_name: str, entity_id: str) -> bytes:
        """The Redis key of one entity's row, byte for byte as Feast builds it."""
        return self._view(view_name).keys([entity_id])[0]

    def _view(self, name: str) -> _ViewReader:
        try:
            return self._views[name]
        except KeyError:
            raise NotFoundError(
                f"feature service {self.columns.service} has no feature view {name}"
            ) from None

    def _commands(
        self, requests: Mapping[str, Sequence[str]]
    ) -> tuple[list[tuple[_ViewReader, int]], list[tuple[bytes | str, ...]]]:
        plan: list[tuple[_ViewReader, int]] = []
        commands: list[tuple[bytes | str, ...]] = []
        for name, ids in requests.items():
            reader = self._view(name)
            plan.append((reader, len(ids)))
            commands += [("HMGET", key, *reader.fields) for key in reader.keys(ids)]
        return plan, commands

    def _decode(
        self, plan: list[tuple[_ViewReader, int]], replies: list[list[Raw]]
    ) -> dict[str, list[Row | None]]:
        now_ns = int(self._clock() * 1e9) if self.enforce_ttl else None
        out: dict[str, list[Row | None]] = {}
        at = 0
        for reader, n in plan:
            out[reader.view.name] = [reader.decode(r, now_ns) for r in replies[at : at + n]]
            at += n
        return out

    async def read_many(self, requests: Mapping[str, Sequence[str]]) -> dict[str, list[Row | None]]:
        """Rows of several views (view name -> entity ids) in one round trip (on a cluster,
        one per master, concurrently)."""
        client = self.client
        if not isinstance(client, aioredis.Redis | aioredis.RedisCluster):
            raise ConfigurationError("RowReader.read needs a redis.asyncio client")
        plan, commands = self._commands(requests)
        if not commands:
            return self._decode(plan, [])
        started = time.perf_counter()
        try:
            if isinstance(client, aioredis.RedisCluster):
                replies = await _cluster_hmget(client, commands)
            else:
                replies = await _hmget_many(client, commands)
        except DependencyUnavailableError:
            ONLINE_STORE_ERRORS.add(1, {"operation": "read_rows"})
            raise
        finally:
            ONLINE_STORE_DURATION.record(time.perf_counter() - started, {"operation": "read_rows"})
        return self._decode(plan, replies)

    async def read(self, view_name: str, keys: Sequence[str]) -> list[Row | None]:
        """One row per entity id of `view_name`: feature name -> value, or None when missing."""
        return (await self.read_many({view_name: keys}))[view_name]

    def read_sync(self, view_name: str, keys: Sequence[str]) -> list[Row | None]:
        """`read` over a synchronous `redis.Redis` client (batch jobs, scripts)."""
        client = self.client
        if not isinstance(client, redis.Redis | redis.RedisCluster):
            raise ConfigurationError("RowReader.read_sync needs a synchronous redis client")
        plan, commands = self._commands({view_name: keys})
        if not commands:
            replies: list[list[Raw]] = []
        elif isinstance(client, redis.RedisCluster):
            replies = _cluster_hmget_sync(client, commands)
        else:
            replies = _hmget_many_sync(client, commands)
        return self._decode(plan, replies)[view_name]
