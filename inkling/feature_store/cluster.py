"""Feast's online store on a Redis Cluster: commands grouped by the node that owns each key.

Feast's Redis keys carry no hash tag, so a request's rows lie in many slots on every
master. Readers here send one pipeline per master, all at once, and read the replies
back in the callers' order (`cluster_exchange`, or `cluster_exchange_sync` for batch
code). A redirect (MOVED after a failover or a resharding, ASK while a slot migrates),
a node that is loading or a dropped connection sends only the affected commands again:
after MOVED or a connection error the slot map is read anew, after ASK the command goes
to the named node behind `ASKING`. Use it only for commands that may run twice
(reads, and the materializer's compare-and-set script).

The item index: per hash slot, a Redis set of the ids of the item entities whose rows
live in that slot (`item_index_key`). Its key carries a hash tag chosen so that it
lies in that very slot, so a one-slot script can write a row and its index entry
together on a cluster (the bulk materializer and the stream worker do), and the item
snapshot reads the catalogue's ids from the index (O(items + slots)) instead of
scanning every node's whole keyspace.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import numpy as np
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from inkling.errors import DependencyUnavailableError

SLOTS = 16384
"""Hash slots of a Redis Cluster."""

INDEXED_JOIN_KEYS = ("item_id",)
"""Entities whose ids the materializer and the stream worker add to the item index."""

ATTEMPTS = 6
"""Rounds of sending again what was redirected or failed, before giving up."""

RETRYABLE = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "NOSCRIPT")
"""Error replies that a later round may cure (a redirect, a failover in progress)."""

AnyCluster = redis.RedisCluster | aioredis.RedisCluster


def is_cluster(client: object) -> bool:
    """Whether `client` is a redis-py cluster client (blocking or asyncio)."""
    return isinstance(client, redis.RedisCluster | aioredis.RedisCluster)


def _crc16_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.int32)
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table[byte] = crc & 0xFFFF
    return table


@functools.cache
def _slot_tags() -> tuple[bytes, ...]:
    """Per slot, the smallest 6-digit decimal string whose CRC16 (Redis Cluster's key
    hash, computed here for all candidates at once) falls in it: a hash tag."""
    table = _crc16_table()
    numbers = np.arange(300_000, dtype=np.int32)
    digits = [(numbers // 10**p) % 10 + ord("0") for p in range(5, -1, -1)]
    crc = np.zeros(len(numbers), dtype=np.int32)
    for byte in digits:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    covered, first = np.unique(crc % SLOTS, return_index=True)
    if len(covered) != SLOTS:  # pragma: no cover - 300,000 candidates cover every slot
        raise AssertionError("no hash tag found for some slot")
    return tuple(b"%06d" % i for i in first.tolist())


def slot_tag(slot: int) -> bytes:
    """A hash tag (`{tag}` in a key name) that puts a key into `slot`."""
    return _slot_tags()[slot]


def item_index_key(project: str, join_key: str, slot: int) -> bytes:
    """The set of `join_key` ids of `project` whose rows lie in `slot`; the key lies in
    `slot` itself."""
    return item_index_keys(project, join_key)[slot]


@functools.cache
def item_index_keys(project: str, join_key: str) -> tuple[bytes, ...]:
    """`item_index_key` of every slot, in slot order."""
    head = b"inkling:item_index:%s:%s:" % (project.encode(), join_key.encode())
    return tuple(head + b"{" + tag + b"}" for tag in _slot_tags())


def item_index_key_of(project: str, join_key: str, row_key: bytes) -> bytes:
    """The index set that holds the entity whose Feast row is `row_key`."""
    return item_index_key(project, join_key, key_slot(row_key))


def key_slots(keys: Sequence[bytes]) -> np.ndarray:
    """The hash slot of every key, as an int64 array."""
    return np.fromiter(map(key_slot, keys), np.int64, len(keys))


def _redirect(message: str) -> tuple[str, str | None]:
    """(kind, node name for ASK) of a retryable error reply's text; kind '' otherwise."""
    kind = message.split(" ", 1)[0]
    if kind not in RETRYABLE:
        return "", None
    if kind == "ASK":
        parts = message.split()
        return kind, parts[2] if len(parts) > 2 else None
    return kind, None


def slot_owners(client: AnyCluster) -> tuple[list[Any], np.ndarray]:
    """The primaries and, per slot, the index of its owner in that list."""
    cache = client.nodes_manager.slots_cache
    nodes: list[Any] = []
    index: dict[str, int] = {}
    owner = np.full(SLOTS, -1, dtype=np.int64)
    for slot in range(SLOTS):
        holders = cache.get(slot)
        if not holders:
            continue
        node = holders[0]
        at = index.get(node.name)
        if at is None:
            at = index[node.name] = len(nodes)
            nodes.append(node)
        owner[slot] = at
    return nodes, owner


def _plan(
    client: AnyCluster, slots: np.ndarray, pending: np.ndarray
) -> list[tuple[Any, np.ndarray]]:
    """`pending` command indices grouped by the primary that owns their slot."""
    nodes, owner = slot_owners(client)
    at = owner[slots[pending]]
    if (at < 0).any():
        raise DependencyUnavailableError(
            f"Redis Cluster: slot {int(slots[pending][at < 0][0])} is not served by any node"
        )
    order = np.argsort(at, kind="stable")
    groups = np.split(pending[order], np.flatnonzero(np.diff(at[order])) + 1)
    return [(nodes[int(owner[slots[g[0]]])], g) for g in groups if len(g)]


def _parse_replies(reader: hiredis.Reader, n: int, feed: Callable[[], bytes]) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:
        reply = reader.gets()
        if reply is False:
            data = feed()
            if not data:
                raise redis.ConnectionError("Redis closed the connection during a pipeline")
            reader.feed(data)
            continue
        out.append(reply)
    return out


class _Round:
    """One round's bookkeeping: which commands need another round, and where to."""

    def __init__(self) -> None:
        self.again: list[int] = []
        self.asking: dict[int, str] = {}  # command -> node name (ASK)
        self.refresh = False
        self.first_error = ""

    def failed(self, i: int, message: str) -> None:
        kind, target = _redirect(message)
        if not kind:
            raise redis.ResponseError(message)
        self.first_error = self.first_error or message
        self.again.append(i)
        if kind == "ASK" and target:
            self.asking[i] = target
        elif kind != "NOSCRIPT":
            self.refresh = True

    def lost(self, indices: np.ndarray, error: Exception) -> None:
        self.first_error = self.first_error or f"{type(error).__name__}: {error}"
        self.again += indices.tolist()
        self.refresh = True


def _giving_up(what: str, state: _Round) -> DependencyUnavailableError:
    return DependencyUnavailableError(
        f"Redis Cluster {what}: {len(state.again)} commands still failing after "
        f"{ATTEMPTS} rounds (first: {state.first_error})"
    )


async def cluster_exchange(
    client: aioredis.RedisCluster,
    keys: Sequence[bytes],
    packed: Sequence[bytes],
    what: str = "read",
) -> list[Any]:
    """Send `packed[i]` (one RESP command about `keys[i]`) to the owner of its key and
    return the replies in order: one pipeline per primary, all concurrently.

    Error replies other than redirects raise `redis.ResponseError`; commands still
    redirected or unreachable after `ATTEMPTS` rounds raise `DependencyUnavailableError`.
    """
    if not keys:
        return []
    if not client.nodes_manager.slots_cache:
        await client.initialize()
    slots = key_slots(keys)
    replies: list[Any] = [None] * len(keys)
    pending = np.arange(len(keys))
    asking: dict[int, str] = {}
    for attempt in range(ATTEMPTS):
        state = _Round()
        groups = _plan(client, slots, pending[[i not in asking for i in pending.tolist()]])
        by_name: dict[str, list[int]] = {}
        for i, name in asking.items():
            by_name.setdefault(name, []).append(i)
        for name, indices in by_name.items():
            node = client.get_node(node_name=name)
            if node is None:
                state.lost(np.array(indices), redis.ConnectionError(f"unknown node {name}"))
                continue
            groups.append((node, np.array(indices)))
        results = await asyncio.gather(
            *(
                _exchange_node(node, [packed[i] for i in g.tolist()], bool(asking))
                for node, g in groups
            ),
            return_exceptions=True,
        )
        for (_, g), result in zip(groups, results, strict=True):
            if isinstance(result, redis.ConnectionError | redis.TimeoutError | OSError):
                state.lost(g, result)
                continue
            if isinstance(result, BaseException):
                raise result
            for i, reply in zip(g.tolist(), result, strict=True):
                if isinstance(reply, hiredis.ReplyError):
                    state.failed(i, str(reply))
                else:
                    replies[i] = reply
        if not state.again:
            return replies
        if attempt + 1 == ATTEMPTS:
            raise _giving_up(what, state)
        if state.refresh:
            await asyncio.sleep(0.05 * 2**attempt)
            await client.nodes_manager.initialize()
        pending, asking = np.array(sorted(state.again)), state.asking
    raise AssertionError("unreachable")  # pragma: no cover


async def _exchange_node(node: Any, commands: list[bytes], asking: bool) -> list[Any]:
    """Write `commands` on one pooled connection of `node` and read their replies (error
    replies as `hiredis.ReplyError` values). With `asking`, each is preceded by ASKING,
    whose OK is dropped. A failure drops the connection: no reply is left unread."""
    if asking:
        commands = [hiredis.pack_command((b"ASKING",)) + c for c in commands]
    n = len(commands) * (2 if asking else 1)
    connection = node.acquire_connection()
    try:
        if hasattr(node, "disconnect_if_needed"):
            await node.disconnect_if_needed(connection)
        await connection.send_packed_command(b"".join(commands))
        stream = getattr(connection, "_reader", None)
        if not isinstance(stream, asyncio.StreamReader):  # pragma: no cover - other redis-py
            raise redis.ConnectionError("this redis-py connection has no stream to read")
        reader = hiredis.Reader()
        out: list[Any] = []
        while len(out) < n:
            data = await stream.read(1 << 16)
            if not data:
                raise redis.ConnectionError("Redis closed the connection during a pipeline")
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                out.append(reply)
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        node.release(connection)
    return out[1::2] if asking else out


def cluster_exchange_sync(
    client: redis.RedisCluster,
    keys: Sequence[bytes],
    packed: Sequence[bytes],
    what: str = "read",
) -> list[Any]:
    """`cluster_exchange` for blocking code: the primaries' pipelines one after another."""
    if not keys:
        return []
    slots = key_slots(keys)
    replies: list[Any] = [None] * len(keys)
    pending = np.arange(len(keys))
    asking: dict[int, str] = {}
    for attempt in range(ATTEMPTS):
        state = _Round()
        groups = _plan(client, slots, pending[[i not in asking for i in pending.tolist()]])
        for i, name in asking.items():
            node = client.get_node(node_name=name)
            if node is None:
                state.lost(np.array([i]), redis.ConnectionError(f"unknown node {name}"))
            else:
                groups.append((node, np.array([i])))
        for node, g in groups:
            try:
                result = exchange_sync(
                    client.get_redis_connection(node),
                    [packed[i] for i in g.tolist()],
                    asking=int(g[0]) in asking,
                )
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                state.lost(g, e)
                continue
            for i, reply in zip(g.tolist(), result, strict=True):
                if isinstance(reply, hiredis.ReplyError):
                    state.failed(i, str(reply))
                else:
                    replies[i] = reply
        if not state.again:
            return replies
        if attempt + 1 == ATTEMPTS:
            raise _giving_up(what, state)
        if state.refresh:
            time.sleep(0.05 * 2**attempt)
            client.nodes_manager.initialize()
        pending, asking = np.array(sorted(state.again)), state.asking
    raise AssertionError("unreachable")  # pragma: no cover


def exchange_sync(node: redis.Redis, commands: Sequence[bytes], asking: bool = False) -> list[Any]:
    """`_exchange_node` over a blocking client of one node."""
    if asking:
        commands = [hiredis.pack_command((b"ASKING",)) + c for c in commands]
    pool = node.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command([b"".join(commands)])
        sock = connection._sock
        if sock is None:  # pragma: no cover - send_packed_command connects or raises
            raise redis.ConnectionError("the Redis connection has no socket")
        n = len(commands) * (2 if asking else 1)
        out = _parse_replies(hiredis.Reader(), n, lambda: sock.recv(1 << 16))
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    return out[1::2] if asking else out


def startup_nodes(address: str) -> list[tuple[str, int]]:
    """The `host:port` parts of a cluster address (its options are the `k=v` parts).

    Raises:
        ConfigurationError: as `inkling.events.bus.cluster_options`.
    """
    from inkling.events.bus import cluster_options

    return cluster_options(address)[0]


def sync_cluster_client(address: str, timeout_s: float = 2.0) -> redis.RedisCluster:
    """A blocking cluster client over the address's startup nodes, with its options
    (credentials, TLS) checked and passed as `inkling.events.bus.client_options` reads
    them. Connects (reads the slot map) here.

    Raises:
        ConfigurationError: a bad address or option, or `db` (a cluster has only db 0).
        redis.RedisError: no startup node answered.
    """
    from inkling.events.bus import cluster_options

    nodes, options = cluster_options(address)
    return redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        **options,
    )
