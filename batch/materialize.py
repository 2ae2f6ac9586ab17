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

CHUNK = 2000

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


class _PipelinedWriter:
    """Raw commands on one connection, one chunk in flight while the next is built.

    redis-py's Pipeline object costs several microseconds per command in Python;
    packing a chunk with hiredis (the C protocol library redis-py itself uses) at once
    is several times faster. `send` first collects the
    replies of the previous chunk, so Redis executes chunk k while Python prepares
    chunk k+1. Every reply is checked; an error fails the run.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._connection = client.connection_pool.get_connection()
        self._in_flight = 0

    def send(self, commands: list[tuple[bytes | str | int, ...]]) -> None:
        self.drain()
        if commands:
            # hiredis' stub declares a 1-tuple where any length is accepted.
            packed = b"".join(hiredis.pack_command(c) for c in commands)  # type: ignore[arg-type]
            self._connection.send_packed_command([packed])
            self._in_flight = len(commands)

    def drain(self) -> None:
        errors = []
        for _ in range(self._in_flight):
            try:
                self._connection.read_response()
            except redis.ResponseError as e:
                errors.append(str(e))
        self._in_flight = 0
        if errors:
            raise redis.ResponseError(f"{len(errors)} writes failed, first: {errors[0]}")

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
    names = [feast_codec.field_key(view.name, f.name) for f in view.features]
    values = [
        feast_codec.value_encoder(f.dtype.to_value_type())(latest.column(f.name))
        for f in view.features
    ]
    ts_field = f"_ts:{view.name}".encode()
    ttl = store.config.online_store.key_ttl_seconds or 0
    sha = str(client.script_load(NEWER_THAN_STORED))
    seconds, nanos = np.divmod(ts_nanos, 1_000_000_000)
    written = 0
    writer = _PipelinedWriter(client)
    failed = True
    try:
        for lo in range(0, len(keys), CHUNK):
            hi = min(lo + CHUNK, len(keys))
            check: list[bytes | int] = [ts_field]
            for i in range(lo, hi):
                check += (int(seconds[i]), int(nanos[i]))
            # Keys are unique within a view, so checking chunk k+1 while chunk k is still
            # being written cannot race with it. A concurrent writer could land a newer row
            # between check and write; Feast's own Redis writer has the same window.
            newer = cast(bytes, client.evalsha(sha, hi - lo, *keys[lo:hi], *check))
            commands: list[tuple[bytes | str | int, ...]] = []
            for i, flag in zip(range(lo, hi), newer, strict=True):
                if flag != ord("1"):
                    continue  # the online store already holds this row or a newer one
                args: list[bytes] = [ts_field, ts_bytes[i]]
                for name, column in zip(names, values, strict=True):
                    args += (name, column[i])
                commands.append(("HSET", keys[i], *args))
                if ttl:
                    commands.append(("EXPIRE", keys[i], ttl))
                written += 1
            writer.send(commands)
        writer.drain()
        failed = False
    finally:
        writer.close(failed)
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
