"""Bulk materialization: offline feature tables into Feast's Redis online store, fast.

`feast materialize` converts every value through protobuf objects: 6,600-9,800
entities/s into Redis on this 2-core machine (`inkling bench`). This path writes the very same records (see
`inkling.feature_store.feast_codec`) column at a time:

1. read each feature view's batch source (from the Feast registry, never a
   hand-kept list) with Arrow, keep rows with start <= event_timestamp <= end
   (Feast's own bounds) and the latest row per entity;
2. encode keys, feature values and `_ts` fields in bulk;
3. per chunk of keys, one Lua call compares inside Redis each stored `_ts` with the
   row's, then one pipeline writes only the newer rows, as Feast does, so a late or
   repeated run never overwrites fresher values (for example session state pushed
   by the stream);
4. record the interval in the registry, so `feast materialize-incremental`
   continues from where this run stopped.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import hiredis
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.dataset as ds
import redis
from feast import FeatureStore, FeatureView, FileSource
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig

from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import (
    INDEXED_JOIN_KEYS,
    RETRYABLE,
    cluster_exchange_sync,
    item_index_key_of,
    item_index_keys,
    key_slots,
    slot_owners,
)

CHUNK = 500
"""Rows per check script and per write batch: the script holds Redis for its whole chunk
(a millisecond or two here), and the same throughput holds from 500 to 2,000."""

# Which rows of a chunk are newer than what Redis holds. KEYS: the chunk's entity keys;
# ARGV: the ts field, then per key the row's event time as seconds and nanos. Returns one
# character per key, "1" to write, "0" to skip. Few arguments per key keep it cheap.
NEWER_THAN_STORED = """
local function decode_ts(b)
  local secs, nanos, i = 0, 0, 1
  while i <= #b do
    local key = string.byte(b, i); i = i + 1
    local value, scale = 0, 1
    while true do
      local byte = string.byte(b, i); i = i + 1
      value = value + (byte % 128) * scale
      scale = scale * 128
      if byte < 128 then break end
    end
    if key == 8 then secs = value elseif key == 16 then nanos = value end
  end
  return secs, nanos
end
local out = {}
for k = 1, #KEYS do
  local prev = redis.call('HGET', KEYS[k], ARGV[1])
  local newer = '1'
  if prev then
    local ps, pn = decode_ts(prev)
    local secs, nanos = tonumber(ARGV[2 * k]), tonumber(ARGV[2 * k + 1])
    if ps > secs or (ps == secs and pn >= nanos) then newer = '0' end
  end
  out[k] = newer
end
return table.concat(out)
"""

_DECODE_TS = NEWER_THAN_STORED[: NEWER_THAN_STORED.index("local out = {}")]

# A Redis Cluster's write of one row: cluster-safe, as it touches one slot only. KEYS:
# [1] the row, [2] (optional) the item index set of the row's slot. ARGV: [1] the ts
# field, [2] the row's ts value, [3] and [4] its event time as seconds and nanos, [5]
# the key TTL (0: none), [6] the index member, then field, value pairs. Adds the index
# member, then writes the row (and re-arms its TTL) unless Redis holds a row as new or
# newer, as Feast's writer decides. Returns 1 when it wrote, 0 when it skipped.
WRITE_IF_NEWER = (
    _DECODE_TS
    + """
if #KEYS > 1 then redis.call('SADD', KEYS[2], ARGV[6]) end
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev then
  local ps, pn = decode_ts(prev)
  local secs, nanos = tonumber(ARGV[3]), tonumber(ARGV[4])
  if ps > secs or (ps == secs and pn >= nanos) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 7))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""
)


@dataclass(frozen=True)
class ViewResult:
    view: str
    rows_read: int
    entities: int
    written: int
    seconds: float


def _redis_client(store: FeatureStore) -> redis.Redis | redis.RedisCluster:
    config = store.config.online_store
    if not isinstance(config, RedisOnlineStoreConfig):
        raise ConfigurationError(
            "bulk materialization writes Redis; the configured online store is not Redis"
        )
    if config.redis_type not in ("redis", "redis_cluster"):
        raise ConfigurationError(
            f"bulk materialization writes one Redis server or a Redis Cluster, not "
            f"redis_type {config.redis_type}"
        )
    # Connect exactly as Feast does, so every connection-string option means the same.
    return cast(redis.Redis | redis.RedisCluster, RedisOnlineStore()._get_client(config))


def _source_table(
    store: FeatureStore, view: FeatureView, start: datetime, end: datetime
) -> pa.Table:
    source = view.batch_source
    if not isinstance(source, FileSource):
        raise ConfigurationError(
            f"feature view {view.name}: bulk path reads file sources, not {type(source).__name__}"
        )
    if source.field_mapping:
        raise ConfigurationError(
            f"feature view {view.name}: field_mapping is not supported by the bulk path"
        )
    path = FileSource.get_uri_for_file_path(store.repo_path, source.path)
    ts = source.timestamp_field
    join_keys = [store.get_entity(e).join_key for e in view.entities]
    if len(join_keys) != 1:
        raise ConfigurationError(f"feature view {view.name}: the bulk path supports one join key")
    columns = [*join_keys, ts, *[f.name for f in view.features]]
    dataset = ds.dataset(path, format="parquet")
    lo = pa.scalar(start, type=pa.timestamp("us", tz="UTC"))
    hi = pa.scalar(end, type=pa.timestamp("us", tz="UTC"))
    table = dataset.to_table(columns=columns, filter=(ds.field(ts) >= lo) & (ds.field(ts) <= hi))
    return table.rename_columns([*["__key", "__ts"], *columns[2:]])


def _latest_per_key(table: pa.Table) -> pa.Table:
    """The row with the latest timestamp per key; of equal ones, the last in the table (as Feast)."""
    if table.num_rows == 0:
        return table
    indexed = table.select(["__key", "__ts"]).append_column(
        "__row", pa.array(np.arange(table.num_rows))
    )
    newest = (
        indexed.group_by("__key").aggregate([("__ts", "max")]).rename_columns(["__key", "__ts"])
    )
    candidates = indexed.join(newest, ["__key", "__ts"], join_type="inner")
    rows = candidates.group_by("__key").aggregate([("__row", "max")]).column("__row_max")
    return table.take(pa.array(np.sort(rows.to_numpy())))


def _bulk(values: Sequence[bytes], prefix: bytes = b"") -> list[bytes]:
    """Each value as a RESP bulk string, after `prefix`."""
    heads = {n: b"%s$%d\r\n" % (prefix, n) for n in set(map(len, values))}
    return [heads[len(v)] + v + b"\r\n" for v in values]


def _bulk1(value: bytes | str | int) -> bytes:
    b = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


class _RawConnection:
    """One pooled connection written with packed bytes and read with a hiredis parser.

    redis-py spends several microseconds of Python per command packed and per reply
    read; at a million rows that was most of a run. Here commands arrive already
    packed as RESP (built column by column), replies are parsed by hiredis (the C
    parser redis-py itself uses) straight from the socket, and any number of commands
    may be in flight: `send` never waits, `replies(n)` reads the next n. An error
    reply fails the run. The pool hands out a connection with nothing left to read.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._connection = client.connection_pool.get_connection()
        self._connection.connect()
        sock = self._connection._sock
        if sock is None:  # pragma: no cover - connect() either sets it or raises
            raise redis.ConnectionError("the Redis connection has no socket")
        self._sock: socket.socket = sock
        self._reader: hiredis.Reader = hiredis.Reader()

    def send(self, packed: list[bytes]) -> None:
        # One buffer: redis-py writes each list item with its own sendall.
        self._connection.send_packed_command([b"".join(packed)])

    def replies(self, n: int, strict: bool = True) -> list[object]:
        """The next `n` replies; an error reply raises unless `strict` is off (then it is
        returned as a `hiredis.ReplyError`)."""
        out: list[object] = []
        errors: list[str] = []
        while len(out) < n:
            reply = self._reader.gets()
            if reply is False:
                data = self._sock.recv(1 << 16)
                if not data:
                    raise redis.ConnectionError("Redis closed the connection during a write")
                self._reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                errors.append(str(reply))
            out.append(reply)
        if errors and strict:
            raise redis.ResponseError(f"{len(errors)} commands failed, first: {errors[0]}")
        return out

    def close(self, failed: bool) -> None:
        if failed:
            self._connection.disconnect()  # replies may still be in flight; never reuse it
        self._client.connection_pool.release(self._connection)


@dataclass
class _Rows:
    """A view's latest row per entity, encoded for writing: keys, `_ts` values, the check
    arguments and a packer of the feature values."""

    view: FeatureView
    rows_read: int
    latest: pa.Table
    keys: list[bytes]
    key_pieces: list[bytes]
    ts_bytes: list[bytes]
    times: list[bytes]
    ts_field: bytes
    ttl: int
    features: list[tuple[bytes, feast_codec.Encoder, pa.ChunkedArray]]


def _prepare(store: FeatureStore, view: FeatureView, start: datetime, end: datetime) -> _Rows:
    table = _source_table(store, view, start, end)
    latest = _latest_per_key(table)
    keys = feast_codec.entity_keys(
        store.get_entity(view.entities[0]).join_key,
        latest.column("__key").to_pylist(),
        store.project,
    )
    ts_bytes, ts_nanos = feast_codec.timestamps(latest.column("__ts"))
    seconds, nanos = np.divmod(ts_nanos, 1_000_000_000)
    # The check's arguments per row: the event time as seconds and nanos.
    pairs: dict[tuple[int, int], bytes] = {}  # rows share few distinct event times
    times = [
        pairs.get(t) or pairs.setdefault(t, _bulk1(t[0]) + _bulk1(t[1]))
        for t in zip(seconds.tolist(), nanos.tolist(), strict=True)
    ]
    features = [
        (
            _bulk1(feast_codec.field_key(view.name, f.name)),
            feast_codec.value_encoder(f.dtype.to_value_type()),
            latest.column(f.name),
        )
        for f in view.features
    ]
    return _Rows(
        view=view,
        rows_read=table.num_rows,
        latest=latest,
        keys=keys,
        key_pieces=_bulk(keys),
        ts_bytes=ts_bytes,
        times=times,
        ts_field=f"_ts:{view.name}".encode(),
        ttl=store.config.online_store.key_ttl_seconds or 0,
        features=features,
    )


def materialize_view(
    store: FeatureStore, client: redis.Redis, view: FeatureView, start: datetime, end: datetime
) -> ViewResult:
    began = time.perf_counter()
    prepared = _prepare(store, view, start, end)
    rows_read, keys, ts_bytes = prepared.rows_read, prepared.keys, prepared.ts_bytes
    key_pieces, times, ts_field = prepared.key_pieces, prepared.times, prepared.ts_field
    ttl, features = prepared.ttl, prepared.features
    sha = str(client.script_load(NEWER_THAN_STORED))
    # Each row's HSET as RESP pieces: a head (the array length, the command), the key,
    # the ts field and value, then one "name, value" piece per feature; EXPIRE after it.
    # Values are encoded chunk by chunk, while Redis writes the chunk before.
    head = b"*%d\r\n%s" % (2 + 2 * (1 + len(features)), _bulk1(b"HSET"))
    expire = (b"*3\r\n%s" % _bulk1(b"EXPIRE"), _bulk1(ttl)) if ttl else None
    width = 3 + len(features) + (3 if expire else 0)  # pieces per row

    def pack(lo: int, hi: int, rows: list[int]) -> list[bytes]:
        """The HSETs (and EXPIREs) of `rows`, all within [lo, hi), as one list of pieces."""
        every = len(rows) == hi - lo
        local = [i - lo for i in rows]

        def pick(column: list[bytes]) -> list[bytes]:
            return column if every else [column[i] for i in local]

        flat: list[bytes] = [b""] * (len(rows) * width)
        flat[0::width] = [head] * len(rows)
        flat[1::width] = pick(key_pieces[lo:hi])
        flat[2::width] = pick(_bulk(ts_bytes[lo:hi], _bulk1(ts_field)))
        for j, (name, encode, column) in enumerate(features, 3):
            flat[j::width] = pick(_bulk(encode(column.slice(lo, hi - lo)), name))
        if expire:
            n = 3 + len(features)
            flat[n::width] = [expire[0]] * len(rows)
            flat[n + 1 :: width] = flat[1::width]
            flat[n + 2 :: width] = [expire[1]] * len(rows)
        return flat

    def check(lo: int, hi: int) -> None:
        """Ask which rows of [lo, hi) are newer than Redis holds (the reply comes later)."""
        args = [_bulk1(b"EVALSHA"), _bulk1(sha), _bulk1(hi - lo), *key_pieces[lo:hi]]
        args += (_bulk1(ts_field), *times[lo:hi])
        connection.send([b"*%d\r\n" % (4 + 3 * (hi - lo)), *args])

    written = 0
    connection = _RawConnection(client)
    failed = True
    try:
        # On the wire: check(0); check(1), writes(0); check(2), writes(1); ... so the
        # check of chunk k is answered while Redis still writes chunk k-1, and chunk k
        # is packed meanwhile. Keys are unique within a view, so checking chunk k while
        # chunk k-1 is being written cannot race with it. A concurrent writer could land
        # a newer row between check and write; Feast's own Redis writer has that window.
        pending = 0  # write replies not read yet
        chunks = [(lo, min(lo + CHUNK, len(keys))) for lo in range(0, len(keys), CHUNK)]
        if chunks:
            check(*chunks[0])
        for k, (lo, hi) in enumerate(chunks):
            (newer,) = connection.replies(1)
            if k + 1 < len(chunks):
                check(*chunks[k + 1])
            flags = cast(bytes, newer)
            rows = [i for i, flag in zip(range(lo, hi), flags, strict=True) if flag == 49]
            flat = pack(lo, hi, rows) if rows else []
            connection.replies(pending)
            if flat:
                connection.send(flat)
            pending = len(rows) * (2 if expire else 1)
            written += len(rows)
        connection.replies(pending)
        failed = False
    finally:
        connection.close(failed)
    return ViewResult(view.name, rows_read, len(keys), written, time.perf_counter() - began)


def _cluster_packer(
    rows: _Rows, project: str, join_key: str, slots: npt.NDArray[np.int64]
) -> Callable[[npt.NDArray[np.int64], bytes], list[bytes]]:
    """`pack(idx, head)`: the one-row scripts writing rows `idx` (in that order), each a
    list of RESP pieces after `head` (the command and its script: EVALSHA + sha or EVAL
    + text), flattened into one list."""
    indexed = join_key in INDEXED_JOIN_KEYS
    index_pieces: list[bytes] = []
    members: list[bytes] = []
    if indexed:
        by_slot = _bulk(list(item_index_keys(project, join_key)))
        index_pieces = [by_slot[s] for s in slots.tolist()]
        members = _bulk([str(v).encode() for v in rows.latest.column("__key").to_pylist()])
    ts_pieces = _bulk(rows.ts_bytes, _bulk1(rows.ts_field))
    ttl = _bulk1(rows.ttl)
    empty = _bulk1(b"")
    numkeys = 2 if indexed else 1
    words = 3 + numkeys + 6 + 2 * len(rows.features)
    width = 1 + numkeys + 4 + len(rows.features)  # pieces per row after the head

    def pack(idx: npt.NDArray[np.int64], head: bytes) -> list[bytes]:
        local = idx.tolist()
        n = len(local)
        take = pa.array(idx)
        flat: list[bytes] = [b""] * (n * (width + 1))
        step = width + 1
        flat[0::step] = [b"*%d\r\n%s%s" % (words, head, _bulk1(numkeys))] * n
        flat[1::step] = [rows.key_pieces[i] for i in local]
        at = 2
        if indexed:
            flat[at::step] = [index_pieces[i] for i in local]
            at += 1
        flat[at::step] = [ts_pieces[i] for i in local]
        flat[at + 1 :: step] = [rows.times[i] for i in local]
        flat[at + 2 :: step] = [ttl] * n
        flat[at + 3 :: step] = [members[i] for i in local] if indexed else [empty] * n
        for j, (name, encode, column) in enumerate(rows.features, at + 4):
            flat[j::step] = _bulk(encode(column.take(take)), name)
        return flat

    return pack


def materialize_view_cluster(
    store: FeatureStore,
    client: redis.RedisCluster,
    view: FeatureView,
    start: datetime,
    end: datetime,
) -> ViewResult:
    """`materialize_view` on a Redis Cluster: the same records, one pipeline per master.

    Rows are grouped by the master that owns their key's slot and written by the
    one-slot script `WRITE_IF_NEWER` (the `_ts` comparison and the write in one step),
    `CHUNK` rows per batch with the next batch sent before the previous one's replies
    are read; the masters are written concurrently, one thread each. Item rows
    (`INDEXED_JOIN_KEYS`) also add their id to the item index set of their slot in the
    same script. Rows redirected (MOVED/ASK), refused while a node fails over, or lost
    with a connection are written again through `cluster_exchange_sync`, which follows
    the new slot map; a row applied whose reply was lost is then skipped as not newer,
    so `written` may undercount but no row is written out of order.
    """
    began = time.perf_counter()
    rows = _prepare(store, view, start, end)
    join_key = store.get_entity(view.entities[0]).join_key
    slots = key_slots(rows.keys)
    pack = _cluster_packer(rows, store.project, join_key, slots)
    primaries = client.get_primaries()
    shas = {str(client.get_redis_connection(n).script_load(WRITE_IF_NEWER)) for n in primaries}
    if len(shas) != 1:  # pragma: no cover - SHA1 of one text
        raise ConfigurationError("the masters disagree on the script's SHA1")
    evalsha = _bulk1(b"EVALSHA") + _bulk1(shas.pop())
    nodes, owner = slot_owners(client)
    at = owner[slots]
    if (at < 0).any():
        raise DependencyUnavailableError(
            f"Redis Cluster: slot {int(slots[at < 0][0])} is not served by any node"
        )
    order = np.argsort(at, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(at[order])) + 1)

    def write_node(idx: npt.NDArray[np.int64]) -> tuple[int, list[tuple[int, str]], list[int]]:
        """Rows `idx` into their master: (written, failed rows with the error, rows whose
        reply never came)."""
        written, failed = 0, list[tuple[int, str]]()
        node = nodes[int(at[idx[0]])]
        chunks = [idx[lo : lo + CHUNK] for lo in range(0, len(idx), CHUNK)]
        sent: list[npt.NDArray[np.int64]] = []
        done = 0
        connection = None
        ok = False

        def read(chunk: npt.NDArray[np.int64]) -> None:
            nonlocal written
            assert connection is not None
            for i, reply in zip(chunk.tolist(), connection.replies(len(chunk), False), strict=True):
                if isinstance(reply, hiredis.ReplyError):
                    failed.append((i, str(reply)))
                else:
                    written += int(cast(int, reply))

        try:
            connection = _RawConnection(client.get_redis_connection(node))
            for chunk in chunks:
                connection.send(pack(chunk, evalsha))
                sent.append(chunk)
                done += 1
                if len(sent) > 1:
                    read(sent[0])  # a chunk leaves `sent` only once all its replies are in
                    sent.pop(0)
            while sent:
                read(sent[0])
                sent.pop(0)
            ok = True
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            lost = [i for c in sent + chunks[done:] for i in c.tolist()]
            return written, failed, lost
        finally:
            if connection is not None:
                connection.close(not ok)
        return written, failed, []

    written = 0
    again: list[int] = []
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        for w, failed, lost in pool.map(write_node, [g for g in groups if len(g)]):
            written += w
            for i, message in failed:
                if message.split(" ", 1)[0] not in RETRYABLE:
                    raise redis.ResponseError(f"writing {view.name} failed: {message}")
                again.append(i)
            again += lost
    if again:
        retry = np.array(sorted(again), dtype=np.int64)
        whole = _bulk1(b"EVAL") + _bulk1(WRITE_IF_NEWER)
        flat = pack(retry, whole)
        step = len(flat) // len(retry)
        commands = [b"".join(flat[k : k + step]) for k in range(0, len(flat), step)]
        replies = cluster_exchange_sync(
            client, [rows.keys[i] for i in retry.tolist()], commands, "materialize"
        )
        written += sum(int(r) for r in replies)
    return ViewResult(
        view.name, rows.rows_read, len(rows.keys), written, time.perf_counter() - began
    )


def index_items(store: FeatureStore, scan_count: int = 2_000) -> int:
    """Add every item row of the project found on the cluster's masters (SCAN) to the item
    index; returns how many ids were added or already there. For rows written by
    something that does not keep the index (Feast's own `materialize`)."""
    client = _redis_client(store)
    if not isinstance(client, redis.RedisCluster):
        raise ConfigurationError("the item index is kept on a Redis Cluster only")
    total = 0
    try:
        for join_key in INDEXED_JOIN_KEYS:
            pattern = feast_codec.entity_key_pattern(join_key, store.project)
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=scan_count):
                batch.append(key)
                if len(batch) >= 10_000:
                    total += _index_keys(client, store.project, join_key, batch)
                    batch = []
            total += _index_keys(client, store.project, join_key, batch)
    finally:
        client.close()
    return total


def _index_keys(client: redis.RedisCluster, project: str, join_key: str, keys: list[bytes]) -> int:
    by_index: dict[bytes, list[bytes]] = {}
    added = 0
    for key in keys:
        entity = feast_codec.parse_entity_key(key, join_key, project)
        if entity is not None:
            added += 1
            index = item_index_key_of(project, join_key, key)
            by_index.setdefault(index, []).append(entity.encode())
    index_keys = list(by_index)
    commands = [hiredis.pack_command((b"SADD", k, *by_index[k])) for k in index_keys]  # type: ignore[arg-type]
    cluster_exchange_sync(client, index_keys, commands, "item index")
    return added


def bulk_materialize(
    store: FeatureStore,
    start: datetime,
    end: datetime,
    views: Sequence[str] | None = None,
    progress: bool = True,
) -> list[ViewResult]:
    """Materialize the named online feature views (all by default) over [start, end]."""
    client = _redis_client(store)
    chosen = [
        v for v in store.list_feature_views() if v.online and (views is None or v.name in views)
    ]
    missing = sorted(set(views or []) - {v.name for v in chosen})
    if missing:
        raise ConfigurationError(
            f"no online feature view named {', '.join(missing)} in the registry"
        )
    results: list[ViewResult] = []
    for view in chosen:
        if isinstance(client, redis.RedisCluster):
            result = materialize_view_cluster(store, client, view, start, end)
        else:
            result = materialize_view(store, client, view, start, end)
        store.registry.apply_materialization(view, store.project, start, end)
        if progress:
            rate = result.entities / result.seconds if result.seconds else 0.0
            print(
                f"[materialize] {view.name}: {result.rows_read} rows read, {result.entities} entities, "
                f"{result.written} written in {result.seconds:.2f}s ({rate:,.0f} rows/s)",
                file=sys.stderr,
                flush=True,
            )
        results.append(result)
    client.close()
    return results
