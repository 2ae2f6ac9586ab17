"""Writing the worker's rows into Feast's Redis online store, byte for byte as Feast does.

The feature views fed by the push sources `session_push` and `item_stream_push` are
resolved from the Feast registry at start-up (never from a hand-kept list): their
Redis field names, value types, entity join key and `_ts` field. Rows are then
encoded in bulk with `inkling.feature_store.feast_codec` (tested against Feast's own
serialization) into `HSET` commands that the worker queues inside its commit
transaction. `FeatureStore.push(..., to=PushMode.ONLINE)` writes the same records
(see the integration test); it is not used because it costs ~4x more per row
(measured in the stream_worker package docstring) and it cannot join a transaction.

One difference from `push` is deliberate: Feast skips a row whose event time is not
newer than the stored `_ts`. A session row's `_ts` is its latest event time, and a
late event (older than the latest) still changes the state, so the worker always
writes. The batch materializer (`batch.materialize`) compares `_ts` and so never
overwrites a streamed row with an older batch row.

Item counters are kept per item in minute buckets (`inkling:worker:counts:<item>`,
fields `v:<minute>` and `c:<minute>`) and their window sums are written to the row
by one Lua script, so workers of different partitions updating one item serialize
inside Redis and the row always holds the sums of the buckets. The same script adds
the item to the item index (`inkling.feature_store.cluster.item_index_key`), whose set
lies in the row's hash slot, so an item that only the stream has written is in the
item snapshot of a Redis Cluster too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from feast import FeatureStore, FeatureView
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.value_type import ValueType

from inkling.errors import ConfigurationError
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import item_index_key_of
from stream_worker.resp import Words, bulk, unframe
from stream_worker.state import COUNTER_FEATURES, COUNTER_WINDOW_MINUTES, SESSION_FEATURES

SESSION_PUSH = "session_push"
COUNTER_PUSH = "item_stream_push"
COUNTS_PREFIX = "inkling:worker:counts"

Command = tuple[bytes | str | int, ...]

_ARROW_TYPES: dict[ValueType, pa.DataType] = {
    ValueType.STRING: pa.string(),
    ValueType.INT64: pa.int64(),
    ValueType.INT32: pa.int32(),
    ValueType.DOUBLE: pa.float64(),
    ValueType.FLOAT: pa.float32(),
    ValueType.BOOL: pa.bool_(),
    ValueType.UNIX_TIMESTAMP: pa.timestamp("us", tz="UTC"),
    ValueType.STRING_LIST: pa.list_(pa.string()),
    ValueType.INT64_LIST: pa.list_(pa.int64()),
    ValueType.DOUBLE_LIST: pa.list_(pa.float64()),
}


@dataclass(frozen=True)
class ViewTarget:
    """One online feature view a push source feeds, as its Redis records name things."""

    name: str
    storage_name: str
    join_key: str
    features: tuple[tuple[str, ValueType, bytes], ...]
    """(feature name, value type, Redis hash field) in the view's order."""

    @property
    def ts_field(self) -> bytes:
        return f"_ts:{self.storage_name}".encode()

    def field(self, feature: str) -> bytes:
        for name, _, redis_field in self.features:
            if name == feature:
                return redis_field
        raise ConfigurationError(f"feature view {self.name} has no feature {feature}")


@dataclass(frozen=True)
class OnlineLayout:
    """Where the worker's rows go in the online store."""

    project: str
    key_ttl_s: int
    """Feast's `key_ttl_seconds` (0: none): every write re-arms it on the entity key."""
    session_views: tuple[ViewTarget, ...]
    counter_views: tuple[ViewTarget, ...]
    connection_string: str


def _storage_name(store: FeatureStore, view: FeatureView) -> str:
    if store.config.registry.enable_online_feature_view_versioning:
        version = getattr(view, "current_version_number", None)
        if version:
            return f"{view.name}_v{version}"
    return view.name


def _targets(store: FeatureStore, push_source: str, produced: Sequence[str]) -> list[ViewTarget]:
    views = [
        v
        for v in store.list_feature_views()
        if v.stream_source is not None and v.stream_source.name == push_source and v.online
    ]
    if not views:
        raise ConfigurationError(
            f"no online feature view in the Feast registry of project {store.project} reads "
            f"the push source {push_source}; run `feast apply` (inkling apply)?"
        )
    out = []
    for view in views:
        if len(view.entities) != 1:
            raise ConfigurationError(f"feature view {view.name}: the worker writes one entity")
        entity = store.get_entity(view.entities[0])
        if entity.value_type not in (ValueType.STRING, ValueType.UNKNOWN):
            raise ConfigurationError(f"feature view {view.name}: entity keys must be strings")
        unknown = [f.name for f in view.features if f.name not in produced]
        if unknown:
            raise ConfigurationError(
                f"feature view {view.name} declares {', '.join(unknown)}, which the stream "
                f"worker does not compute (it computes {', '.join(produced)})"
            )
        storage = _storage_name(store, view)
        features = []
        for f in view.features:
            value_type = f.dtype.to_value_type()
            if value_type not in _ARROW_TYPES:
                raise ConfigurationError(
                    f"feature view {view.name}: {f.name} has type {value_type.name}, "
                    "which the worker does not write"
                )
            features.append((f.name, value_type, feast_codec.field_key(storage, f.name)))
        out.append(ViewTarget(view.name, storage, entity.join_key, tuple(features)))
    return out


def resolve_layout(store: FeatureStore) -> OnlineLayout:
    """The targets of both push sources, from the registry.

    Raises:
        ConfigurationError: the online store is not Redis (one server or a cluster), a push source
            feeds no online view, or a view declares a feature the worker cannot write.
    """
    config = store.config.online_store
    if not isinstance(config, RedisOnlineStoreConfig) or config.redis_type not in (
        "redis",
        "redis_cluster",
    ):
        raise ConfigurationError(
            "the stream worker writes Feast's Redis online store (one server or a cluster)"
        )
    counters = _targets(store, COUNTER_PUSH, tuple(COUNTER_FEATURES.values()))
    for view in counters:
        for name, value_type, _ in view.features:
            if value_type != ValueType.INT64:
                raise ConfigurationError(f"feature view {view.name}: {name} must be Int64")
    return OnlineLayout(
        project=store.project,
        key_ttl_s=int(config.key_ttl_seconds or 0),
        session_views=tuple(_targets(store, SESSION_PUSH, SESSION_FEATURES)),
        counter_views=tuple(counters),
        connection_string=config.connection_string,
    )


@dataclass(frozen=True)
class SessionRow:
    """One session row to write: the entity id, the row's event time, the values."""

    session_id: str
    ts_us: int
    values: Mapping[str, Any]


class SessionRowEncoder:
    """Session rows as the commit script's framed words (`stream_worker.resp`): per row
    and session view its HSET (and, with a key TTL, EXPIRE), each preceded by its word
    count. Field names and the command words are framed once; values through small
    per-process caches (counts, categories, item ids, seconds), since consecutive
    batches write mostly the same ones."""

    _CACHE_LIMIT = 100_000
    """Entries per value cache; a full cache is emptied and refilled."""

    def __init__(self, layout: OnlineLayout) -> None:
        self.project = layout.project
        self.ttl = bulk(layout.key_ttl_s) if layout.key_ttl_s else None
        self.views = []
        for view in layout.session_views:
            words = 2 + 2 * (1 + len(view.features))
            plan = [(bulk(f), name, self._encoder(t)) for name, t, f in view.features]
            self.views.append((view.join_key, bulk(words) + bulk(b"HSET"), 1 + words,
                               bulk(view.ts_field), plan))  # fmt: skip
        self._expire = bulk(3) + bulk(b"EXPIRE")
        self._seconds: dict[int, bytes] = {}

    def frame(self, rows: Sequence[SessionRow], out: Words) -> None:
        """Append the commands writing `rows` to every session view to `out`."""
        if not rows:
            return
        stamps: dict[int, bytes] = {}
        ts = [stamps.get(r.ts_us) or stamps.setdefault(r.ts_us, self._stamp(r.ts_us))
              for r in rows]  # fmt: skip
        ids = [r.session_id for r in rows]
        for join_key, head, words, ts_field, plan in self.views:
            keys = [bulk(k) for k in feast_codec.entity_keys(join_key, ids, self.project)]
            for row, key, stamp in zip(rows, keys, ts, strict=True):
                values = row.values
                parts = [head, key, ts_field, stamp]
                for field, name, encode in plan:
                    parts += (field, encode(values[name]))
                out.add_framed(b"".join(parts), words)
                if self.ttl is not None:
                    out.add_framed(self._expire + key + self.ttl, 4)

    def _stamp(self, micros: int) -> bytes:
        """A row's `_ts` framed: `feast_codec.timestamp_bytes`, its seconds part cached."""
        seconds, rest = divmod(micros, 1_000_000)
        head = self._seconds.get(seconds)
        if head is None:
            if len(self._seconds) >= self._CACHE_LIMIT:
                self._seconds.clear()
            head = self._seconds[seconds] = feast_codec.timestamp_bytes(seconds * 1_000_000)
        return bulk(head + b"\x10" + feast_codec.varint(rest * 1000) if rest else head)

    @classmethod
    def _encoder(cls, value_type: ValueType) -> Callable[[Any], bytes]:
        """One value to its framed Feast `Value` bytes, through a cache where values repeat."""
        if value_type == ValueType.STRING_LIST:
            return cls._string_list()
        if value_type == ValueType.UNIX_TIMESTAMP:
            by_seconds = cls._cached(feast_codec.timestamp_value)
            return lambda v: by_seconds(feast_codec.whole_seconds(v))
        one = feast_codec.row_encoder(value_type)
        if one is not None:
            return cls._cached(lambda v: one([v])[0])
        column = feast_codec.value_encoder(value_type)
        arrow_type = _ARROW_TYPES[value_type]
        return lambda v: bulk(column(pa.array([v], arrow_type))[0])

    @classmethod
    def _cached(cls, encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        cache: dict[Any, bytes] = {}
        limit = cls._CACHE_LIMIT

        def framed(value: Any) -> bytes:
            b = cache.get(value)
            if b is None:
                if len(cache) >= limit:
                    cache.clear()
                b = cache[value] = bulk(encode(value))
            return b

        return framed

    @classmethod
    def _string_list(cls) -> Callable[[Any], bytes]:
        elements: dict[str, bytes] = {}
        limit = cls._CACHE_LIMIT

        def framed(values: Sequence[str] | None) -> bytes:
            if values is None:
                return bulk(b"")  # Feast's null Value
            if not all(s in elements for s in values):
                if len(elements) >= limit:
                    elements.clear()
                for s in values:
                    if s not in elements:
                        elements[s] = feast_codec.string_element(s)
            return bulk(feast_codec.string_list_value([elements[s] for s in values]))

        return framed


def session_commands(layout: OnlineLayout, rows: Sequence[SessionRow]) -> list[Command]:
    """HSET (and EXPIRE, with a key TTL) commands writing `rows` to every session view:
    `SessionRowEncoder`'s words read back into commands (tests and tools)."""
    words = Words()
    SessionRowEncoder(layout).frame(rows, words)
    flat = unframe(words.parts)
    commands: list[Command] = []
    i = 0
    while i < len(flat):
        n = int(flat[i])
        commands.append(tuple(flat[i + 1 : i + 1 + n]))
        i += 1 + n
    return commands


# KEYS: per item its bucket hash, its online row, then the item index set of the row's
# slot (inkling.feature_store.cluster). ARGV: [1] the current minute,
# [2] the window in minutes, [3] the bucket TTL (s), [4] the row key TTL (s, 0 none),
# [5] the row's _ts (serialized Timestamp), [6] n views, then per view its views field,
# clicks field and _ts field; then per item: its id, n buckets, and per bucket minute,
# views, clicks. Adds the increments, drops buckets older than the window, writes the
# window's sums (Feast int64 Values), adds the item to the index and returns the sums
# per item.
COUNTERS_FUNCTION = """
local function item_counters(KEYS, ARGV)
  local now = tonumber(ARGV[1])
  local oldest = now - tonumber(ARGV[2]) + 1
  local bucket_ttl, key_ttl, ts = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local nviews = tonumber(ARGV[6])
  local a = 7 + 3 * nviews
  local function int64(n)
    local out = {'\\32'}
    while n >= 128 do
      out[#out + 1] = string.char(n % 128 + 128)
      n = math.floor(n / 128)
    end
    out[#out + 1] = string.char(n)
    return table.concat(out)
  end
  local result = {}
  for k = 1, #KEYS, 3 do
    local bucket, row = KEYS[k], KEYS[k + 1]
    redis.call('SADD', KEYS[k + 2], ARGV[a])
    local n = tonumber(ARGV[a + 1]); a = a + 2
    for i = 1, n do
      local m, dv, dc = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]); a = a + 3
      if dv > 0 then redis.call('HINCRBY', bucket, 'v:' .. m, dv) end
      if dc > 0 then redis.call('HINCRBY', bucket, 'c:' .. m, dc) end
    end
    local views, clicks = 0, 0
    local all = redis.call('HGETALL', bucket)
    for j = 1, #all, 2 do
      local kind, m = string.match(all[j], '^(%a):(%-?%d+)$')
      if tonumber(m) < oldest then
        redis.call('HDEL', bucket, all[j])
      elseif kind == 'v' then
        views = views + tonumber(all[j + 1])
      else
        clicks = clicks + tonumber(all[j + 1])
      end
    end
    if #all > 0 then redis.call('EXPIRE', bucket, bucket_ttl) end
    for v = 0, nviews - 1 do
      redis.call('HSET', row, ARGV[7 + 3 * v], int64(views), ARGV[8 + 3 * v], int64(clicks),
        ARGV[9 + 3 * v], ts)
    end
    if key_ttl > 0 then redis.call('EXPIRE', row, key_ttl) end
    result[#result + 1] = views
    result[#result + 1] = clicks
  end
  return result
end
"""
"""The counter update as a Lua function of (KEYS, ARGV), for scripts that do more."""
COUNTERS_LUA = COUNTERS_FUNCTION + "return item_counters(KEYS, ARGV)\n"


def counts_key(item_id: str) -> str:
    return f"{COUNTS_PREFIX}:{item_id}"


def counter_command(
    layout: OnlineLayout,
    increments: Mapping[str, Mapping[int, Sequence[int]]],
    now_minute: int,
    now_us: int,
) -> Command | None:
    """One EVAL adding `increments` (item -> minute -> [views, clicks]) and writing the rows.

    An item with no increments is only recomputed (its counts age out).
    """
    arguments = counter_arguments(layout, increments, now_minute, now_us)
    if arguments is None:
        return None
    keys, args = arguments
    return ("EVAL", COUNTERS_LUA, len(keys), *keys, *args)


def counter_arguments(
    layout: OnlineLayout,
    increments: Mapping[str, Mapping[int, Sequence[int]]],
    now_minute: int,
    now_us: int,
) -> tuple[list[bytes | str], list[bytes | str | int]] | None:
    """`counter_command`'s KEYS and ARGV (None: nothing to do)."""
    if not increments or not layout.counter_views:
        return None
    items = list(increments)
    rows = {view.join_key for view in layout.counter_views}
    if len(rows) != 1:
        raise ConfigurationError("item counter views must share one join key")
    join_key = rows.pop()
    row_keys = feast_codec.entity_keys(join_key, items, layout.project)
    keys: list[bytes | str] = []
    for item, row_key in zip(items, row_keys, strict=True):
        keys += (counts_key(item), row_key, item_index_key_of(layout.project, join_key, row_key))
    args: list[bytes | str | int] = [
        now_minute,
        COUNTER_WINDOW_MINUTES,
        COUNTER_WINDOW_MINUTES * 60 + 120,
        layout.key_ttl_s,
        feast_codec.timestamp_bytes(now_us),
        len(layout.counter_views),
    ]
    for view in layout.counter_views:
        args += (
            view.field(COUNTER_FEATURES["item_view"]),
            view.field(COUNTER_FEATURES["click"]),
            view.ts_field,
        )
    for item in items:
        buckets = increments[item]
        args += (item, len(buckets))
        for minute, (views, clicks) in buckets.items():
            args += (minute, views, clicks)
    return keys, args
