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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import hiredis
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import redis
from feast import FeatureStore, FeatureView, FileSource
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig

from inkling.errors import ConfigurationError
from inkling.feature_store import feast_codec

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


@dataclass(frozen=True)
class ViewResult:
    view: str
    rows_read: int
    entities: int
    written: int
    seconds: float


def _redis_client(store: FeatureStore) -> redis.Redis:
    config = store.config.online_store
    if not isinstance(config, RedisOnlineStoreConfig):
        raise ConfigurationError(
            "bulk materialization writes Redis; the configured online store is not Redis"
        )
    if config.redis_type != "redis":
        raise ConfigurationError(
            "bulk materialization supports a single Redis server, not a cluster"
        )
    # Connect exactly as Feast does, so every connection-string option means the same.
    return cast(redis.Redis, RedisOnlineStore()._get_client(config))


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

    def replies(self, n: int) -> list[object]:
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
        if errors:
            raise redis.ResponseError(f"{len(errors)} commands failed, first: {errors[0]}")
        return out

    def close(self, failed: bool) -> None:
        if failed:
            self._connection.disconnect()  # replies may still be in flight; never reuse it
        self._client.connection_pool.release(self._connection)


def materialize_view(
    store: FeatureStore, client: redis.Redis, view: FeatureView, start: datetime, end: datetime
) -> ViewResult:
    began = time.perf_counter()
    table = _source_table(store, view, start, end)
    rows_read = table.num_rows
    latest = _latest_per_key(table)
    keys = feast_codec.entity_keys(
        store.get_entity(view.entities[0]).join_key,
        latest.column("__key").to_pylist(),
        store.project,
    )
    ts_bytes, ts_nanos = feast_codec.timestamps(latest.column("__ts"))
    ts_field = f"_ts:{view.name}".encode()
    ttl = store.config.online_store.key_ttl_seconds or 0
    sha = str(client.script_load(NEWER_THAN_STORED))
    seconds, nanos = np.divmod(ts_nanos, 1_000_000_000)
    key_pieces = _bulk(keys)
    # The check's arguments per row: the event time as seconds and nanos.
    pairs: dict[tuple[int, int], bytes] = {}  # rows share few distinct event times
    times = [
        pairs.get(t) or pairs.setdefault(t, _bulk1(t[0]) + _bulk1(t[1]))
        for t in zip(seconds.tolist(), nanos.tolist(), strict=True)
    ]
    # Each row's HSET as RESP pieces: a head (the array length, the command), the key,
    # the ts field and value, then one "name, value" piece per feature; EXPIRE after it.
    # Values are encoded chunk by chunk, while Redis writes the chunk before.
    features = [
        (
            _bulk1(feast_codec.field_key(view.name, f.name)),
            feast_codec.value_encoder(f.dtype.to_value_type()),
            latest.column(f.name),
        )
        for f in view.features
    ]
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
