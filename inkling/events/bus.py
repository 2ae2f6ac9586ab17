"""The event bus: Redis Streams, partitioned by a hash of the user id.

The layout every producer and consumer shares (the ingest process appends, stream
workers consume):

- ``partitions`` streams, keys ``inkling:events:<p>`` for ``p`` in ``0..partitions-1``
  (:func:`stream_key`). An event goes to :func:`partition_of` its routing key: the
  user id when it has one, else the session id. So all of a logged-in user's
  events, from any device or session, land in one partition and are processed in
  order by one worker.
- Each entry has the fields :data:`F_EVENT_ID` (the event's id), :data:`F_EVENT`
  (the ``inkling.v1.Event`` message, serialized) and :data:`F_RECEIVED_US` (the
  ingest process's receive time, microseconds since the epoch, as decimal text).
  Entries appended by :class:`EventBus` also carry :data:`F_SEQ`, the entry's
  1-based sequence number in its partition (decimal text; consumers may ignore it).
  An entry appended inside a sampled trace also carries :data:`F_TRACE`, the W3C
  ``traceparent`` of that append (its ingest span), so a worker's span can link to it;
  unsampled appends (most of them, at the default 1 % sampling) store nothing more.
- The same streams carry the ranking server's serve records (one per answer of
  ``Recommend`` and ``RankCandidates``, see ``inkling.events.servelog``), so the worker
  that owns a user's partition sees that user's answers and events in one order, and
  writes both logs under one watermark. A serve entry has :data:`F_SERVE` (the
  ``inkling.v1.ServeRecord``) where an event entry has :data:`F_EVENT`, the request id in
  :data:`F_EVENT_ID`, and the other fields as above. Serve records are not deduplicated:
  the ranking server appends each answer once and never retries
  (:meth:`EventBus.append_serves`).
- :data:`PARTITIONS_KEY` records the number of partitions. The first producer or
  worker sets it; one configured with another number is refused
  (:class:`~inkling.errors.ConfigurationError`, also on every append), because a
  worker reading 4 streams would never see what a producer wrote to a fifth.
  Changing the number means draining the bus, deleting the key and restarting every
  process with the new number.
- Workers read through the consumer group :data:`GROUP`; events a worker cannot
  process go to the dead-letter stream :data:`DEAD_LETTER` with the fields above
  plus :data:`F_REASON`, :data:`F_SOURCE` (the partition's stream key) and
  :data:`F_SOURCE_ID` (the entry id there).

How :class:`EventBus` appends (the ingest side):

- **Atomic dedupe + append.** One Lua script per call: for each event in order,
  ``ZADD NX`` its ``event_id`` into its dedupe set (below); when that adds it, ``XADD``
  the entry with the partition's next sequence number, and finally store each
  partition's counter (:func:`counter_key`). A script runs as one unit (nothing
  else interleaves; it reaches the AOF and replicas as one MULTI/EXEC), so an id is
  never recorded as seen without its entry, nor the other way round, and a batch
  is never half-written. Types are checked before
  the first write, so a misconfigured key fails the script before it changes
  anything.
- **Dedupe window.** An ``event_id`` is remembered for ``dedupe_window_s`` seconds
  (default one hour) from its first append, by the Redis server's clock (one clock
  for every ingest process); a replay does not extend it. A replay inside the window
  is acknowledged as a duplicate and not stored; one after it is stored again. The
  ids live in :data:`DEDUPE_SHARDS` sorted sets (:func:`seen_key`, the shard a hash of
  the id), scored by first append in ms: an id whose score is older than the window
  counts as new even before it is trimmed. Each append trims the sets it touches of
  ids past the window, at most :data:`DEDUPE_TRIM_PER_CALL` per set, so no call pays
  for a long idle spell at once; nothing else expires, and the keyspace holds
  :data:`DEDUPE_SHARDS` keys however many events there are (the servers' snapshot
  SCANs walk the whole keyspace). Memory: about 125 bytes per remembered id of 36
  characters (200,000 uuid4 ids on Redis 6.2: 122 B by ``MEMORY USAGE``, the same as
  one key per id cost), i.e. events/s x window x 125 B: 2.2 GB for an hour at a
  sustained 5,000 events/s, 54 GB for a day. The Redis must not evict keys
  (``maxmemory-policy noeviction``), or dedupe weakens and, worse, streams can be
  evicted.
- **The group is created with the stream.** When the script creates a partition's
  stream it also creates :data:`GROUP` at id ``0``, so a worker that starts later
  still reads every event from the first one.
- **No trimming on append.** The ingest process never trims a stream, so no
  unconsumed entry is ever dropped. :meth:`EventBus.trim_consumed` removes only
  entries every group has already acknowledged (below each group's oldest
  pending entry and its last-delivered id); workers or an operator call it.
- **Lag** (:meth:`EventBus.lag`): per partition, the entries :data:`GROUP` has not
  finished, ``undelivered + pending`` (pending = delivered, not yet acknowledged).
  ``undelivered`` is ``XINFO GROUPS`` ``lag`` on Redis >= 7; on older servers (the
  embedded one is 6.2) or when Redis cannot tell, it is the partition's counter
  minus the :data:`F_SEQ` of the group's last-delivered entry (O(log n)); only
  when that entry is gone (deleted by hand) is it counted by ``XRANGE``, with
  ``COUNT`` capped at ``lag_cap`` (beyond which the count saturates). A partition
  without the group counts every entry as unconsumed.

Redis Cluster (``online_store = redis_cluster``; the client is a ``RedisCluster``,
:func:`is_cluster`): a script may only touch keys of one hash slot, so in cluster mode
every key of one partition carries the partition's hash tag ``{p<n>}``
(:func:`partition_tag`): its stream ``inkling:events:{p<n>}``, counter
``inkling:bus:appended:{p<n>}``, dedupe set ``inkling:bus:seen:{p<n>}``
(:func:`partition_dedupe_key`, one per partition in place of the shared shards), copy of
the number of partitions ``inkling:bus:partitions:{p<n>}`` (:func:`partitions_copy_key`)
and dead-letter stream ``inkling:events:dead:{p<n>}`` (:func:`dead_letter_key`); the
stream worker's keys of the partition carry the same tag. One server keeps the names
above (no tags). What changes on a cluster:

- an append is one script per partition the batch touches (run concurrently), each
  atomic as above; a batch spanning partitions is no longer all-or-nothing across them.
  When one part fails the caller hears the error and retries the batch; the parts that
  landed come back as duplicates, so the retry stores exactly what was missing.
- dedupe is per partition: an event id is recognised again when it comes back with the
  same routing key (a client's retry does); the same id under another user or session
  lands in another partition and is stored. Re-partitioning forgets the remembered ids.
- each append checks the partition's copy of the number of partitions; a missing copy
  makes the append run :meth:`EventBus.ensure_streams` (which checks
  :data:`PARTITIONS_KEY` and writes the copies) and try once more, so a producer
  counting more partitions than the bus has is refused, as on one server. Changing the
  number also means deleting the copies.
- lag and trimming run one script per partition.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from inkling.errors import (
    ConfigurationError,
    DependencyUnavailableError,
    InklingError,
    OverloadedError,
)

PREFIX = "inkling:events"
GROUP = "inkling-workers"
DEAD_LETTER = f"{PREFIX}:dead"

F_EVENT_ID = "id"
F_EVENT = "e"
F_SERVE = "s"
F_RECEIVED_US = "r"
F_REASON = "reason"
F_SOURCE = "source"
F_SOURCE_ID = "source_id"
F_SEQ = "n"
F_TRACE = "tp"

SEEN_PREFIX = "inkling:bus:seen"
COUNTER_PREFIX = "inkling:bus:appended"
PARTITIONS_KEY = "inkling:bus:partitions"
_PARTITIONS_ERROR = "INKLING_PARTITIONS"
_UNSET_ERROR = "INKLING_UNSET"
DEFAULT_DEDUPE_WINDOW_S = 3600
"""How long an event_id is remembered after its first append, by default (one hour)."""
DEDUPE_SHARDS = 8
"""Sorted sets the remembered event ids are spread over (by a CRC-32 of the id). Fixed,
not the number of partitions, so that re-partitioning the bus keeps what is remembered."""
DEDUPE_TRIM_PER_CALL = 1_000
"""The most ids past the window one append removes from each dedupe set it touches."""
DEFAULT_LAG_CACHE_S = 0.1
"""How long a lag measurement is reused before the next one, by default."""


TOMBSTONES_KEY = "inkling:privacy:forgotten"
"""Hash of forgotten users (``u:<id>``) and sessions (``s:<id>``) → when (µs); see
`inkling.erasure`. Ingest refuses their events and the stream workers drop them."""


def tombstone_fields(user_id: str | None, session_id: str | None) -> list[str]:
    """The `TOMBSTONES_KEY` fields an event or serve record of (user, session) matches
    (the same strings as `routing_key`'s)."""
    fields = [f"s:{session_id}"] if session_id else []
    if user_id:
        fields.append(f"u:{user_id}")
    return fields


def owners_fields(owners: Iterable[tuple[str | None, str | None]]) -> list[str]:
    """The distinct tombstone fields of many (user, session) owners, in first-seen order:
    the fields one HMGET of `TOMBSTONES_KEY` asks for."""
    return list(
        dict.fromkeys(f for user, session in owners for f in tombstone_fields(user, session))
    )


def found_fields(fields: Sequence[str], replies: Sequence[Any]) -> set[str]:
    """The fields an HMGET of `TOMBSTONES_KEY` for `fields` found (a non-nil reply)."""
    return {f for f, at in zip(fields, replies, strict=True) if at is not None}


def is_forgotten(forgotten: set[str], user_id: str | None, session_id: str | None) -> bool:
    """Whether an event or record of (user, session) matches a found tombstone field."""
    return any(f in forgotten for f in tombstone_fields(user_id, session_id))


def partition_tag(partition: int) -> str:
    """The hash tag every cluster-mode key of one partition carries (``{p<n>}``), so that
    Redis Cluster keeps them in one slot and one script may touch them together."""
    return f"{{p{partition}}}"


def stream_key(partition: int, cluster: bool = False) -> str:
    """The stream of one partition (in cluster mode, with the partition's hash tag)."""
    return f"{PREFIX}:{partition_tag(partition) if cluster else partition}"


def dead_letter_key(partition: int, cluster: bool = False) -> str:
    """Where a partition's poison entries go: :data:`DEAD_LETTER` on one server; in
    cluster mode one dead-letter stream per partition, in the partition's slot, so the
    worker's fenced commit can write it."""
    return f"{DEAD_LETTER}:{partition_tag(partition)}" if cluster else DEAD_LETTER


def partitions_copy_key(partition: int) -> str:
    """Cluster mode: the bus's number of partitions as recorded in one partition's slot,
    which that partition's append script checks (it cannot read :data:`PARTITIONS_KEY`,
    another slot). Written by :meth:`EventBus.ensure_streams` only."""
    return f"{PARTITIONS_KEY}:{partition_tag(partition)}"


def partition_dedupe_key(partition: int) -> str:
    """Cluster mode: the dedupe set of one partition (its slot), in place of the
    :data:`DEDUPE_SHARDS` shared sets."""
    return f"{SEEN_PREFIX}:{partition_tag(partition)}"


def is_cluster(client: Any) -> bool:
    """Whether a redis-py client (blocking or asyncio) is a Redis Cluster client."""
    return isinstance(client, redis.cluster.RedisCluster | aioredis.cluster.RedisCluster)


def routing_key(user_id: str, session_id: str) -> str:
    """What an event is partitioned by: the user when known, else the session."""
    return f"u:{user_id}" if user_id else f"s:{session_id}"


def partition_of(key: str, partitions: int) -> int:
    """A stable partition for a routing key (CRC-32, the same in every process)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return zlib.crc32(key.encode()) % partitions


def dedupe_shard(event_id: str) -> int:
    """Which dedupe set remembers an event id."""
    return partition_of(event_id, DEDUPE_SHARDS)


def dedupe_key(shard: int) -> str:
    """One dedupe set (members: event ids; scores: their first append, ms, Redis's clock)."""
    return f"{SEEN_PREFIX}:{shard}"


def seen_key(event_id: str) -> str:
    """The dedupe set that remembers an event id."""
    return dedupe_key(dedupe_shard(event_id))


def counter_key(partition: int, cluster: bool = False) -> str:
    """How many entries :class:`EventBus` has appended to a partition (its last F_SEQ)."""
    return f"{COUNTER_PREFIX}:{partition_tag(partition) if cluster else partition}"


# --- connecting ----------------------------------------------------------------------------


_TLS_PATHS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("none", "optional", "required")
_BOOLEAN = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_CLUSTER_ONLY = ("skip_full_coverage_check",)


def client_options(address: str) -> dict[str, Any]:
    """redis-py keyword arguments for an inkling Redis address.

    The format is the one Feast's Redis online store reads (``Settings.redis_address``):
    ``host:port[,key=value...]``, e.g. ``127.0.0.1:6379,db=3,username=worker,password=s3cret``.
    Only one node: the bus needs a single Redis server. The keys, each passed to
    redis-py as Feast passes it, so one address serves both:

    - ``db``, ``username``, ``password`` (an ACL user, ``inkling.redis_acl``);
    - ``ssl`` (``true``: TLS), ``ssl_ca_certs`` / ``ssl_ca_path`` (the CAs that sign the
      server's certificate), ``ssl_certfile`` + ``ssl_keyfile`` (this client's
      certificate, for a server that demands one), ``ssl_cert_reqs``
      (``required``, the default, ``optional`` or ``none``), ``ssl_check_hostname``
      (``true``/``false``), ``ssl_password`` (of an encrypted key file);
    - ``skip_full_coverage_check`` concerns Redis Cluster and is ignored here.

    Raises:
        ConfigurationError: not exactly one ``host:port``, an unknown key, a value of the
            wrong kind, TLS options without ``ssl=true``, a certificate without its key,
            or a TLS file that does not exist.
    """
    nodes = _nodes(address)
    if len(nodes) != 1:
        raise ConfigurationError(
            f"the event bus needs exactly one Redis host:port, got {len(nodes)} in the address "
            "(for a Redis Cluster's startup nodes set online_store = redis_cluster)"
        )
    host, port = nodes[0]
    return {"host": host, "port": port} | _options(address)


def cluster_options(address: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """A Redis Cluster address: its startup nodes (``host:port``, one or more; any reachable
    node will do) and the redis-py keyword arguments of the options, as
    :func:`client_options` reads them; ``db`` must be 0 (a cluster has one database).

    Raises:
        ConfigurationError: no node, a node that is not ``host:port``, ``db`` other than 0,
            or an option :func:`client_options` refuses.
    """
    nodes = _nodes(address)
    if not nodes:
        raise ConfigurationError("the Redis Cluster address names no host:port")
    options = _options(address)
    if options.pop("db", 0) != 0:
        raise ConfigurationError("a Redis Cluster has only database 0: drop db= from the address")
    return nodes, options


def _nodes(address: str) -> list[tuple[str, int]]:
    nodes = []
    for part in (p.strip() for p in address.split(",") if p.strip() and "=" not in p):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(f"Redis address {part!r} is not host:port")
        nodes.append((host, int(port)))
    return nodes


def _options(address: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in address.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "db":
            if not value.isdigit():
                raise ConfigurationError(f"Redis address option db={value!r} is not a number")
            options["db"] = int(value)
        elif key in ("password", "username", "ssl_password"):
            options[key] = value
        elif key in ("ssl", "ssl_check_hostname"):
            if value.lower() not in _BOOLEAN:
                raise ConfigurationError(f"Redis address option {key}={value!r} is not true/false")
            options[key] = _BOOLEAN[value.lower()]
        elif key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise ConfigurationError(
                    f"Redis address option ssl_cert_reqs={value!r} is not one of "
                    f"{', '.join(_CERT_REQS)}"
                )
            options[key] = value.lower()
        elif key in _TLS_PATHS:
            if not Path(value).exists():
                raise ConfigurationError(f"Redis address option {key}: {value} does not exist")
            options[key] = value
        elif key not in _CLUSTER_ONLY:
            raise ConfigurationError(
                f"Redis address option {key!r} is unknown; known: db, username, password, "
                f"ssl, ssl_cert_reqs, ssl_check_hostname, ssl_password, {', '.join(_TLS_PATHS)}"
            )
    tls = sorted(k for k in options if k.startswith("ssl_"))
    if tls and not options.get("ssl"):
        raise ConfigurationError(f"Redis address options {', '.join(tls)} need ssl=true")
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        raise ConfigurationError("Redis address options ssl_certfile and ssl_keyfile go together")
    return options


def _backoff() -> ExponentialWithJitterBackoff:
    # A stale pooled connection (Redis restarted) is replaced on the first retry; a
    # Redis that is down costs at most ~0.2 s before the caller hears UNAVAILABLE.
    return ExponentialWithJitterBackoff(base=0.01, cap=0.1)


class _HiredisPacking:
    """Commands packed by hiredis in C, as redis-py's blocking client already does: its
    asyncio connections pack in Python, a tenth of the ingest server's CPU on the append
    script's few hundred arguments. Same bytes; anything hiredis refuses (a bool) goes
    to redis-py's packer, which raises its usual DataError."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            args = tuple(first.encode().split()) + args[1:]
        elif b" " in first:
            args = tuple(first.split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc]


class _PackedConnection(_HiredisPacking, aioredis.Connection):
    pass


class _PackedSSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def async_client(
    address: str, timeout_s: float = 2.0, retries: int = 2, *, cluster: bool = False
) -> aioredis.Redis:
    """An asyncio client for the bus (connects on first use; no I/O here). `retries`:
    how often a command that failed on the connection is sent again (0 for writes that
    must not repeat: a lost reply hides whether the first one ran). `cluster`: `address`
    lists a Redis Cluster's startup nodes (`online_store = redis_cluster`); the client is
    then a ``redis.asyncio.RedisCluster`` (typed as the plain client it stands in for)."""
    if cluster:
        nodes, options = cluster_options(address)
        return cast(
            aioredis.Redis,
            aioredis.RedisCluster(
                startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in nodes],
                **options,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=AsyncRetry(_backoff(), retries=retries),
            ),
        )
    options = client_options(address)
    ssl = options.pop("ssl", False)
    pool = aioredis.ConnectionPool(
        connection_class=_PackedSSLConnection if ssl else _PackedConnection,
        **options,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=AsyncRetry(_backoff(), retries=retries),
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def sync_client(address: str, timeout_s: float = 2.0, *, cluster: bool = False) -> redis.Redis:
    """A blocking client for the bus (tools, tests, benchmarks); `cluster` as for
    :func:`async_client`."""
    if cluster:
        nodes, options = cluster_options(address)
        return cast(
            redis.Redis,
            redis.RedisCluster(
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
                **options,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            ),
        )
    return redis.Redis(
        **client_options(address),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(_backoff(), retries=2),
    )


# --- the scripts ---------------------------------------------------------------------------

# KEYS: for each of the m partitions the batch touches (j = 1..m): its stream at 2j-1 and its
# counter at 2j; then the k dedupe sets the batch touches at 2m+1 .. 2m+k; last, PARTITIONS_KEY.
# ARGV: [1] window_ms, [2] group, [3] received_us, [4] m, [5] the number of partitions, [6] k,
# [7] the most expired ids to trim per set, [8] the traceparent to store ('' for none), [9] the
# field that holds the payload (F_EVENT or F_SERVE), [10] '1' when the last key must already
# hold the number (cluster mode: a partition's copy of it), else ''; then per entry i, from
# 11+4(i-1): the slot j of its partition, the slot s of its dedupe set (0: not deduplicated),
# its id, its payload. Returns per entry its new entry id, or 0 for a duplicate.
_APPEND_LUA = """
local recorded = redis.call('GET', KEYS[#KEYS])
if not recorded and ARGV[10] == '1' then
  return redis.error_reply('$UNSET ' .. KEYS[#KEYS] .. ' is not set')
end
if recorded and recorded ~= ARGV[5] then
  return redis.error_reply('INKLING_PARTITIONS the bus has ' .. recorded ..
    ' partitions; this producer was configured with ' .. ARGV[5])
end
local m, k = tonumber(ARGV[4]), tonumber(ARGV[6])
local created, seqs, first = {}, {}, {}
for j = 1, m do
  local t = redis.call('TYPE', KEYS[2*j-1]).ok
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[2*j-1] .. ' holds a ' .. t .. ', not a stream')
  end
  local count = redis.call('GET', KEYS[2*j])
  seqs[j] = tonumber(count or '0')
  if seqs[j] == nil then
    return redis.error_reply('WRONGTYPE ' .. KEYS[2*j] .. ' does not hold a counter')
  end
  first[j] = seqs[j]
  created[j] = (t == 'none')
end
for s = 1, k do
  local t = redis.call('TYPE', KEYS[2*m + s]).ok
  if t ~= 'zset' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[2*m + s] .. ' holds a ' .. t ..
      ', not a sorted set')
  end
end
if not recorded then redis.call('SET', KEYS[#KEYS], ARGV[5]) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
for s = 1, k do
  local expired = redis.call('ZCOUNT', KEYS[2*m + s], '-inf', '(' .. cutoff)
  if expired > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[2*m + s], 0, math.min(expired, tonumber(ARGV[7])) - 1)
  end
end
for j = 1, m do
  if created[j] then
    redis.call('XGROUP', 'CREATE', KEYS[2*j-1], ARGV[2], '0', 'MKSTREAM')
  end
end
local out = {}
local trace, field = ARGV[8], ARGV[9]
local n = (#ARGV - 10) / 4
for i = 1, n do
  local base = 10 + 4 * (i - 1)
  local j, s, id = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  local new = true
  if s > 0 then
    local seen = KEYS[2*m + s]
    new = redis.call('ZADD', seen, 'NX', now, id) == 1
    if not new and tonumber(redis.call('ZSCORE', seen, id)) < cutoff then
      redis.call('ZADD', seen, now, id)  -- remembered past the window, not yet trimmed
      new = true
    end
  end
  if new then
    seqs[j] = seqs[j] + 1
    if trace == '' then
      out[i] = redis.call('XADD', KEYS[2*j-1], '*', $F_EVENT_ID, id,
        field, ARGV[base + 4], $F_RECEIVED_US, ARGV[3], $F_SEQ, seqs[j])
    else
      out[i] = redis.call('XADD', KEYS[2*j-1], '*', $F_EVENT_ID, id,
        field, ARGV[base + 4], $F_RECEIVED_US, ARGV[3], $F_SEQ, seqs[j], $F_TRACE, trace)
    end
  else
    out[i] = 0
  end
end
for j = 1, m do
  if seqs[j] ~= first[j] then redis.call('SET', KEYS[2*j], seqs[j]) end
end
return out
"""

# KEYS: per partition its stream at 2j-1 and its counter at 2j. ARGV: [1] group, [2] the cap
# of a counted fallback. Returns per partition: undelivered, pending.
_LAG_LUA = """
local out = {}
for j = 1, #KEYS / 2 do
  local stream, counter = KEYS[2*j-1], KEYS[2*j]
  local undelivered, pending = 0, 0
  if redis.call('EXISTS', stream) == 1 then
    local info = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local f = {}
      for k = 1, #g, 2 do f[g[k]] = g[k + 1] end
      if f['name'] == ARGV[1] then info = f break end
    end
    if info == nil then
      undelivered = redis.call('XLEN', stream)
    else
      pending = info['pending']
      local last = info['last-delivered-id']
      if info['lag'] then
        undelivered = info['lag']
      elseif last == '0-0' then
        undelivered = redis.call('XLEN', stream)
      else
        local seq = nil
        local entry = redis.call('XRANGE', stream, last, last)
        if #entry == 1 then
          local fields = entry[1][2]
          for k = 1, #fields, 2 do
            if fields[k] == $F_SEQ then seq = tonumber(fields[k + 1]) end
          end
        end
        if seq then
          local appended = tonumber(redis.call('GET', counter) or '0') or 0
          undelivered = math.max(0, appended - seq)
        else
          undelivered = #redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', ARGV[2])
        end
      end
    end
  end
  out[2*j-1] = undelivered
  out[2*j] = pending
end
return out
"""

# KEYS: the streams. ARGV: [1] (optional) 'approx'. Trims each below the oldest entry some
# group still needs: its oldest pending entry, else its last-delivered entry (kept, so the
# lag measure can read its F_SEQ). A stream without groups is left alone. 'approx' removes
# only whole stream nodes below that entry, at most 100 nodes per stream (XTRIM MINID ~, its
# default LIMIT): a call costs little however far behind trimming is, and removes less,
# never more. Returns per stream the entries removed.
_TRIM_LUA = """
local function older(a, b)
  local a1, a2 = string.match(a, '^(%d+)-(%d+)$')
  local b1, b2 = string.match(b, '^(%d+)-(%d+)$')
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  return a1 < b1 or (a1 == b1 and a2 < b2)
end
local out = {}
for j = 1, #KEYS do
  local removed = 0
  if redis.call('EXISTS', KEYS[j]) == 1 then
    local floor = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[j])) do
      local f = {}
      for k = 1, #g, 2 do f[g[k]] = g[k + 1] end
      local keep = f['last-delivered-id']
      if f['pending'] > 0 then
        local summary = redis.call('XPENDING', KEYS[j], f['name'])
        keep = summary[2]
      end
      if floor == nil or older(keep, floor) then floor = keep end
    end
    if floor ~= nil and floor ~= '0-0' then
      if ARGV[1] == 'approx' then
        removed = redis.call('XTRIM', KEYS[j], 'MINID', '~', floor)
      else
        removed = redis.call('XTRIM', KEYS[j], 'MINID', floor)
      end
    end
  end
  out[j] = removed
end
return out
"""


def _lua(source: str) -> str:
    """Put the entry field names into a script as Lua string literals."""
    names = {"F_EVENT_ID": F_EVENT_ID, "F_EVENT": F_EVENT, "F_RECEIVED_US": F_RECEIVED_US}
    names |= {"F_SEQ": F_SEQ, "F_TRACE": F_TRACE}
    text = Template(source).safe_substitute({k: f"'{v}'" for k, v in names.items()})
    text = text.replace("$UNSET", _UNSET_ERROR)
    if "$F_" in text:  # pragma: no cover - a typo in a script above
        raise ValueError("a bus script names an unknown field")
    return text


APPEND_SCRIPT = _lua(_APPEND_LUA)
LAG_SCRIPT = _lua(_LAG_LUA)
TRIM_SCRIPT = _lua(_TRIM_LUA)


# --- errors --------------------------------------------------------------------------------


def bus_error(error: RedisError) -> InklingError:
    """What a Redis failure means for a caller of the bus."""
    text = str(error)
    if isinstance(error, AuthenticationError | AuthorizationError | NoPermissionError):
        return ConfigurationError(f"the event bus (Redis) refused the credentials: {text}")
    if isinstance(error, ResponseError):
        # Redis 6.2 wraps a script's error ("ERR Error running script ... -OOM ..."); Redis 7
        # passes its code on, and redis-py raises OutOfMemoryError without it in the text.
        if isinstance(error, OutOfMemoryError) or "OOM" in text:
            return OverloadedError(f"the event bus (Redis) is out of memory: {text}")
        if "WRONGTYPE" in text:
            return ConfigurationError(f"the event bus keys are misconfigured: {text}")
        if _PARTITIONS_ERROR in text:
            return ConfigurationError(_partitions_message(text))
    # ConnectionError (refused, reset, loading), TimeoutError, READONLY, MISCONF, ...
    return DependencyUnavailableError(f"the event bus (Redis) is unavailable: {text}")


def _partitions_message(text: str) -> str:
    detail = text[text.index(_PARTITIONS_ERROR) + len(_PARTITIONS_ERROR) :].strip()
    detail = detail.split(" script:")[0]  # Redis appends where in the script it failed
    return (
        f"{detail}. Every producer and worker must use one number ([events] partitions, "
        f"[worker] partitions); to change it, drain the bus and delete {PARTITIONS_KEY}"
    )


def check_partitions(client: redis.Redis, partitions: int) -> None:
    """Record the bus's number of partitions, or check it against the recorded one.

    Raises:
        ConfigurationError: the bus was set up with another number.
        redis.RedisError: as the client raises it (a worker retries those).
    """
    client.set(PARTITIONS_KEY, partitions, nx=True)
    _check_recorded(client.get(PARTITIONS_KEY), partitions)


def _check_recorded(recorded: Any, partitions: int) -> None:
    if recorded is not None and int(recorded) != partitions:
        raise ConfigurationError(
            _partitions_message(
                f"{_PARTITIONS_ERROR} the bus has {int(recorded)} partitions; "
                f"this process was configured with {partitions}"
            )
        )


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except RedisError as e:
        raise bus_error(e) from e


# --- the bus -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusEvent:
    """One event to append: its id, what it is partitioned by, and the serialized Event."""

    event_id: str
    routing_key: str
    payload: bytes


@dataclass(frozen=True)
class BusServe:
    """One serve record to append: its request id, what it is partitioned by (the
    request's :func:`routing_key`), and the serialized ``inkling.v1.ServeRecord``."""

    request_id: str
    routing_key: str
    payload: bytes


@dataclass(frozen=True)
class Appended:
    """What happened to one event of an append."""

    partition: int
    entry_id: str | None
    """The new stream entry's id; None when the event_id was a duplicate (not stored)."""

    @property
    def duplicate(self) -> bool:
        return self.entry_id is None


@dataclass(frozen=True)
class Backlog:
    """How far one partition's consumer group is behind."""

    undelivered: int
    """Entries not yet delivered to any consumer of the group."""
    pending: int
    """Entries delivered but not yet acknowledged."""

    @property
    def total(self) -> int:
        return self.undelivered + self.pending


@dataclass(frozen=True)
class BusEntry:
    """A stream entry decoded (for workers, tools and tests)."""

    entry_id: str
    event_id: str
    payload: bytes
    received_us: int
    seq: int | None
    traceparent: str | None = None
    """The W3C traceparent of the append, when it was traced."""
    serve: bool = False
    """A serve record (``event_id`` is then its request id, ``payload`` the record)."""


def decode_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> BusEntry:
    """Decode one entry as redis-py returns it (without decode_responses)."""
    seq = fields.get(F_SEQ.encode())
    trace = fields.get(F_TRACE.encode())
    event = fields.get(F_EVENT.encode())
    return BusEntry(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        event_id=fields[F_EVENT_ID.encode()].decode(),
        payload=event if event is not None else fields[F_SERVE.encode()],
        received_us=int(fields[F_RECEIVED_US.encode()]),
        seq=int(seq) if seq is not None else None,
        traceparent=trace.decode() if trace is not None else None,
        serve=event is None,
    )


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _slots(numbers: Sequence[int]) -> dict[int, int]:
    """Each distinct number's 1-based slot, in order of first appearance (a script's keys)."""
    slots: dict[int, int] = {}
    for n in numbers:
        slots.setdefault(n, len(slots) + 1)
    return slots


def _lag_keys(partitions: Sequence[int], cluster: bool = False) -> list[str]:
    return [k for p in partitions for k in (stream_key(p, cluster), counter_key(p, cluster))]


def _backlogs(partitions: Sequence[int], reply: Sequence[Any]) -> dict[int, Backlog]:
    return {p: Backlog(int(reply[2 * j]), int(reply[2 * j + 1])) for j, p in enumerate(partitions)}


class EventBus:
    """Appends events to the partitioned streams and measures how far workers are behind.

    Args:
        client: an asyncio Redis client of the bus's server (see :func:`async_client`);
            the bus does not close it.
        partitions: the number of streams; every producer and consumer must agree.
        dedupe_window_s: how long an event_id is remembered after its first append.
        dedupe_trim: the most ids past the window one append removes per dedupe set.
        lag_cache_s: how long :meth:`lag` reuses a measurement.
        group: the consumer group whose lag is measured (and created with each stream).
        lag_cap: the most entries the counted fallback of the lag measure walks; set it
            just above the backpressure limit.
        wait_replicas: cluster mode: after each partition's append, ``WAIT`` until this
            many replicas of its master have it (0: do not wait; Redis replication is
            asynchronous, so a master that dies right after an append can take it along).
            An append they do not confirm within `wait_timeout_ms` raises
            DependencyUnavailableError (the events stay; the client's retry finds them as
            duplicates).
        wait_timeout_ms: how long one ``WAIT`` may take.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        partitions: int,
        *,
        dedupe_window_s: int = DEFAULT_DEDUPE_WINDOW_S,
        dedupe_trim: int = DEDUPE_TRIM_PER_CALL,
        lag_cache_s: float = DEFAULT_LAG_CACHE_S,
        group: str = GROUP,
        lag_cap: int = 1_000_000,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1_000,
    ) -> None:
        if partitions < 1:
            raise ConfigurationError(f"partitions must be at least 1, got {partitions}")
        if dedupe_window_s < 1:
            raise ConfigurationError(f"dedupe_window_s must be at least 1, got {dedupe_window_s}")
        if dedupe_trim < 1:
            raise ConfigurationError(f"dedupe_trim must be at least 1, got {dedupe_trim}")
        self.client = client
        self.cluster = is_cluster(client)
        self.partitions = partitions
        self.dedupe_window_s = int(dedupe_window_s)
        self.dedupe_trim = int(dedupe_trim)
        self.lag_cache_s = lag_cache_s
        self.group = group
        self.lag_cap = lag_cap
        if wait_replicas < 0 or wait_timeout_ms < 0:
            raise ConfigurationError("wait_replicas and wait_timeout_ms must be >= 0")
        if wait_replicas and not self.cluster:
            raise ConfigurationError("wait_replicas applies to a Redis Cluster bus only")
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._append = client.register_script(APPEND_SCRIPT)
        self._measure = client.register_script(LAG_SCRIPT)
        self._trim = client.register_script(TRIM_SCRIPT)
        self._lag: dict[int, int] | None = None
        self._lag_at = 0.0
        self._lag_lock = asyncio.Lock()

    def partition(self, key: str) -> int:
        """The partition of a routing key (:func:`routing_key`)."""
        return partition_of(key, self.partitions)

    async def append(
        self, events: Sequence[BusEvent], received_us: int, traceparent: str = ""
    ) -> list[Appended]:
        """Dedupe by event_id and append the new events, atomically, in order.

        An event_id seen within the dedupe window (in an earlier call, or earlier in
        this batch) is a duplicate and not stored again. A `traceparent` (W3C) is
        stored on every new entry as :data:`F_TRACE`.

        Raises:
            DependencyUnavailableError: Redis could not be reached or refused the write;
                nothing or everything of the batch may have been written (the script is
                atomic; a lost reply hides which), so the caller retries the batch and
                the events that did land come back as duplicates.
            OverloadedError: Redis is out of memory.
            ConfigurationError: a bus key holds another type, or the bus has another
                number of partitions.
        """
        if not events:
            return []
        parts = [self.partition(e.routing_key) for e in events]
        shards = [dedupe_shard(e.event_id) for e in events]
        entries = [(e.event_id, e.payload) for e in events]
        reply = await self._add(F_EVENT, parts, shards, entries, received_us, traceparent)
        return [
            Appended(p, _as_str(r) if r not in (0, None) else None)
            for p, r in zip(parts, reply, strict=True)
        ]

    async def forgotten(self, fields: Sequence[str]) -> set[str]:
        """Which of the tombstone fields (`tombstone_fields`) are tombstoned: one HMGET."""
        if not fields:
            return set()
        with _translated():
            found = await cast(
                Awaitable[list[Any]], self.client.hmget(TOMBSTONES_KEY, list(fields))
            )
        return found_fields(fields, found)

    async def append_serves(self, records: Sequence[BusServe], received_us: int) -> int:
        """Append serve records, atomically, in order, without deduplication; returns how
        many were appended (all of them).

        Raises:
            as :meth:`append`. Whether a batch whose reply was lost landed cannot be told;
            the ranking server does not retry (a retry could log an answer twice) and
            counts the batch as dropped.
        """
        if not records:
            return 0
        parts = [self.partition(r.routing_key) for r in records]
        entries = [(r.request_id, r.payload) for r in records]
        reply = await self._add(F_SERVE, parts, None, entries, received_us, "")
        return len(reply)

    async def _add(
        self,
        field: str,
        parts: Sequence[int],
        shards: Sequence[int] | None,
        entries: Sequence[tuple[str, bytes]],
        received_us: int,
        traceparent: str,
    ) -> list[Any]:
        """One run of the append script: entries (id, payload) into their partitions, the
        payload under `field`, deduplicated by id in their `shards` (None: not at all).

        In cluster mode, one run per partition the entries touch (each in the partition's
        slot, concurrently), deduplicated in the partition's own set; the replies are put
        back in the entries' order. Each partition's part is atomic; the batch as a whole
        is not, and when one part fails the error is raised after every part finished
        (those that ran stay written; a retry finds their events as duplicates)."""
        if self.cluster:
            return await self._add_per_partition(
                field, parts, shards is not None, entries, received_us, traceparent
            )
        slots = _slots(parts)
        shard_slots = _slots(shards) if shards is not None else {}
        keys: list[str] = []
        for p in slots:
            keys += (stream_key(p), counter_key(p))
        keys += [dedupe_key(s) for s in shard_slots]
        keys.append(PARTITIONS_KEY)
        args: list[Any] = [
            self.dedupe_window_s * 1000, self.group, received_us, len(slots), self.partitions,
            len(shard_slots), self.dedupe_trim, traceparent, field, "",
        ]  # fmt: skip
        for i, (p, (entry_id, payload)) in enumerate(zip(parts, entries, strict=True)):
            shard = shard_slots[shards[i]] if shards is not None else 0
            args += (slots[p], shard, entry_id, payload)
        with _translated():
            return list(await self._append(keys=keys, args=args))

    async def _add_per_partition(
        self,
        field: str,
        parts: Sequence[int],
        dedupe: bool,
        entries: Sequence[tuple[str, bytes]],
        received_us: int,
        traceparent: str,
    ) -> list[Any]:
        by_partition: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            by_partition.setdefault(p, []).append(i)
        order = list(by_partition)
        replies = await asyncio.gather(
            *(
                self._add_partition(
                    field, p, dedupe, [entries[i] for i in by_partition[p]], received_us,
                    traceparent,
                )
                for p in order
            ),
            return_exceptions=True,
        )  # fmt: skip
        out: list[Any] = [None] * len(parts)
        for p, reply in zip(order, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for i, r in zip(by_partition[p], reply, strict=True):
                out[i] = r
        return out

    async def _add_partition(
        self,
        field: str,
        partition: int,
        dedupe: bool,
        entries: Sequence[tuple[str, bytes]],
        received_us: int,
        traceparent: str,
    ) -> list[Any]:
        """Cluster mode: one partition's entries, by the append script over the keys of the
        partition's slot (its stream, counter, dedupe set and copy of the number of
        partitions). A partition whose copy is missing gets it from `ensure_streams` (which
        checks :data:`PARTITIONS_KEY`), then the append runs once more."""
        keys = [
            stream_key(partition, True),
            counter_key(partition, True),
            *([partition_dedupe_key(partition)] if dedupe else []),
            partitions_copy_key(partition),
        ]
        args: list[Any] = [
            self.dedupe_window_s * 1000, self.group, received_us, 1, self.partitions,
            1 if dedupe else 0, self.dedupe_trim, traceparent, field, "1",
        ]  # fmt: skip
        for entry_id, payload in entries:
            args += (1, 1 if dedupe else 0, entry_id, payload)
        run = self._append_replicated if self.wait_replicas else self._append_once
        with _translated():
            try:
                return await run(keys, args)
            except ResponseError as e:
                if _UNSET_ERROR not in str(e):
                    raise
            await self.ensure_streams()
            return await run(keys, args)

    async def _append_once(self, keys: list[str], args: list[Any]) -> list[Any]:
        return list(await self._on_node(self._append, keys, args))

    async def _on_node(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Cluster mode: EVALSHA of `script` (all `keys` in one slot); when the node lacks
        the script (a replica promoted since it was loaded), load it on that node and run
        it once more. redis-py's own reload sends SCRIPT LOAD to the primaries it knew,
        which after a failover can miss the new one."""
        try:
            return await script(keys=keys, args=args)
        except NoScriptError:
            cluster = cast(aioredis.RedisCluster, self.client)
            await cluster.initialize()
            node = cluster.get_node_from_key(keys[0])
            if node is None:
                raise
            await node.execute_command("SCRIPT", "LOAD", script.script)
            return await script(keys=keys, args=args)

    async def _append_replicated(self, keys: list[str], args: list[Any]) -> list[Any]:
        """The append script and ``WAIT`` on one connection to the partition's master
        (``WAIT`` counts the replicas that have this connection's writes).

        Raises:
            DependencyUnavailableError: fewer replicas than `wait_replicas` confirmed it.
            redis.RedisError: as the connection raises it.
        """
        cluster = cast(aioredis.RedisCluster, self.client)
        node = cluster.get_node_from_key(keys[0])
        if node is None:
            await cluster.initialize()
            node = cluster.get_node_from_key(keys[0])
            if node is None:
                raise DependencyUnavailableError(f"no Redis Cluster node serves {keys[0]}")
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(
                connection.pack_commands(
                    [
                        ("EVAL", APPEND_SCRIPT, len(keys), *keys, *args),
                        ("WAIT", self.wait_replicas, self.wait_timeout_ms),
                    ]
                )
            )
            try:
                reply = await connection.read_response()
            finally:
                acked = await connection.read_response()
        except BaseException as e:
            await connection.disconnect()  # a reply may be left unread: never reuse it
            if isinstance(e, MovedError | AskError | RedisConnectionError | RedisTimeoutError):
                await cluster.initialize()  # a failover moved the slot: learn the layout
            raise
        finally:
            node.release(connection)
        if int(acked) < self.wait_replicas:
            raise DependencyUnavailableError(
                f"the event bus appended to {keys[0]} but {int(acked)} of "
                f"{self.wait_replicas} replica(s) confirmed it within {self.wait_timeout_ms} "
                "ms; retry (the events come back as duplicates)"
            )
        return list(reply)

    async def measure_lag(self, partitions: Sequence[int] | None = None) -> dict[int, Backlog]:
        """Measure the group's backlog now (no cache), per partition.

        Raises:
            DependencyUnavailableError: Redis could not be reached.
        """
        chosen = list(range(self.partitions)) if partitions is None else list(partitions)
        with _translated():
            if self.cluster:  # one script per partition: their keys are in different slots
                parts = await asyncio.gather(
                    *(
                        self._on_node(
                            self._measure, _lag_keys([p], True), [self.group, self.lag_cap]
                        )
                        for p in chosen
                    )
                )
                reply = [n for part in parts for n in part]
            else:
                reply = await self._measure(keys=_lag_keys(chosen), args=[self.group, self.lag_cap])
        return _backlogs(chosen, reply)

    async def lag(self) -> dict[int, int]:
        """Unconsumed entries (undelivered + pending) per partition, at most `lag_cache_s` old.

        Concurrent callers share one measurement.
        """
        if self._lag is not None and time.monotonic() - self._lag_at < self.lag_cache_s:
            return self._lag
        async with self._lag_lock:
            if self._lag is not None and time.monotonic() - self._lag_at < self.lag_cache_s:
                return self._lag
            measured = await self.measure_lag()
            self._lag = {p: b.total for p, b in measured.items()}
            self._lag_at = time.monotonic()
            return self._lag

    async def ensure_streams(self) -> None:
        """Record (or check) the number of partitions; create every partition's stream with
        the group at id 0, where missing.

        Raises:
            ConfigurationError: the bus was set up with another number of partitions.
            DependencyUnavailableError: Redis could not be reached.
        """
        with _translated():
            await self.client.set(PARTITIONS_KEY, self.partitions, nx=True)
            _check_recorded(await self.client.get(PARTITIONS_KEY), self.partitions)
            for p in range(self.partitions):
                if self.cluster:  # each partition's copy, which its appends check
                    await self.client.set(partitions_copy_key(p), self.partitions, nx=True)
                    _check_recorded(await self.client.get(partitions_copy_key(p)), self.partitions)
                try:
                    await self.client.xgroup_create(
                        stream_key(p, self.cluster), self.group, id="0", mkstream=True
                    )
                except ResponseError as e:
                    if not str(e).startswith("BUSYGROUP"):
                        raise

    async def trim_consumed(self, approximate: bool = False) -> dict[int, int]:
        """Remove entries every consumer group has acknowledged; entries removed per partition.

        Never removes an entry some group has not yet been delivered or not yet
        acknowledged; leaves a stream without groups alone. `approximate`: only whole
        stream nodes, a bounded amount per call (what a worker does every second).
        """
        chosen = list(range(self.partitions))
        args = ["approx"] if approximate else []
        with _translated():
            if self.cluster:
                parts = await asyncio.gather(
                    *(self._on_node(self._trim, [stream_key(p, True)], args) for p in chosen)
                )
                reply = [n for part in parts for n in part]
            else:
                reply = await self._trim(keys=[stream_key(p) for p in chosen], args=args)
        return {p: int(n) for p, n in zip(chosen, reply, strict=True)}


# --- blocking helpers (tests, tools, benchmarks) --------------------------------------------


def measure_lag_sync(
    client: redis.Redis, partitions: int, group: str = GROUP, lag_cap: int = 1_000_000
) -> dict[int, Backlog]:
    """:meth:`EventBus.measure_lag` for a blocking client."""
    chosen = list(range(partitions))
    reply: list[Any] = []
    with _translated():
        if is_cluster(client):  # one script per partition: their keys are in different slots
            for p in chosen:
                reply += cast(list[Any], client.eval(LAG_SCRIPT, 2, *_lag_keys([p], True), group,
                                                     lag_cap))  # fmt: skip
        else:
            reply = cast(
                list[Any],
                client.eval(LAG_SCRIPT, 2 * len(chosen), *_lag_keys(chosen), group, lag_cap),
            )
    return _backlogs(chosen, reply)


def read_partition(client: redis.Redis, partition: int) -> list[BusEntry]:
    """Every entry of one partition, oldest first (tests and tools; not for big streams)."""
    with _translated():
        entries = client.xrange(stream_key(partition, is_cluster(client)))
    return [decode_entry(entry_id, fields) for entry_id, fields in entries]  # type: ignore[union-attr]
