"""The item snapshot: every item row of a service's item-keyed views as numpy columns.

It is read from the online store itself (SCAN + pipelined HMGET), so the hundreds of
candidates of a ranking request cost dictionary lookups and gathers. Lists are stored
flat (values + offsets), not as 100k Python lists: those would add ~100 ms to every
full garbage collection and the memory of 2M objects. TTLs are enforced as by
`inkling.feature_store.rows`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any, Literal

import hiredis
import numpy as np
import numpy.typing as npt
import redis
import redis.asyncio as aioredis
from feast.type_map import NULL_TIMESTAMP_INT_VALUE
from feast.value_type import ValueType

from inkling.errors import ConfigurationError, DependencyUnavailableError, NotFoundError
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import cluster_exchange, item_index_keys
from inkling.feature_store.columns import FeatureColumn, ServiceColumns, ViewColumns
from inkling.feature_store.rows import AsyncClient, pack_commands
from inkling.feature_store.values import Raw, timestamp_value, ts_nanos, value_decoder

log = logging.getLogger(__name__)


Kind = Literal[
    "float", "int", "bool", "timestamp", "string",
    "string_list", "int_list", "float_list", "bool_list", "object",
]  # fmt: skip

_KINDS: dict[ValueType, Kind] = {
    ValueType.DOUBLE: "float",
    ValueType.FLOAT: "float",
    ValueType.INT64: "int",
    ValueType.INT32: "int",
    ValueType.BOOL: "bool",
    ValueType.UNIX_TIMESTAMP: "timestamp",
    ValueType.STRING: "string",
    ValueType.STRING_LIST: "string_list",
    ValueType.INT64_LIST: "int_list",
    ValueType.INT32_LIST: "int_list",
    ValueType.DOUBLE_LIST: "float_list",
    ValueType.FLOAT_LIST: "float_list",
    ValueType.BOOL_LIST: "bool_list",
}
_FILL: dict[Kind, Any] = {"float": np.nan, "int": 0, "bool": False, "timestamp": 0, "string": -1}
_DTYPE: dict[Kind, Any] = {
    "float": np.float64,
    "int": np.int64,
    "bool": np.bool_,
    "timestamp": np.int64,
    "string": np.int32,
    "string_list": np.int32,
    "int_list": np.int64,
    "float_list": np.float64,
    "bool_list": np.bool_,
    "object": object,
}
_LISTS = ("string_list", "int_list", "float_list", "bool_list")
_NUMERIC = ("float", "int", "bool", "timestamp")
_DOUBLE_RECORD = np.dtype([("tag", "u1"), ("value", "<f8")])


@dataclass(frozen=True, eq=False)
class SnapshotColumn:
    """One feature over all snapshot rows (the last row is the empty row of unknown ids).

    Scalars: `values` holds one entry per row — float64 (NaN when missing) for
    DOUBLE/FLOAT, int64 for integers and UnixTimestamp seconds, bool, or int32 codes
    into `vocabulary` (-1 when missing) for strings. Lists are flat: row r is
    `values[offsets[r]:offsets[r + 1]]` (string lists as codes), so a snapshot of
    100k lists holds no Python containers for the garbage collector to walk. Other
    types are an object array of Feast's Python values. `present` says which rows hold
    a value.
    """

    feature: FeatureColumn
    view: str
    kind: Kind
    values: np.ndarray
    present: npt.NDArray[np.bool_]
    offsets: npt.NDArray[np.int64] | None = None
    vocabulary: tuple[str, ...] = ()

    def python(self, rows: npt.NDArray[np.int64], present: npt.NDArray[np.bool_]) -> list[Any]:
        """Values of `rows` as Feast's `to_dict()` gives them; None where not `present`."""
        kind = self.kind
        out: list[Any] = []
        if kind in _LISTS:
            if self.offsets is None:  # pragma: no cover - finish() always sets it for lists
                raise ValueError(f"list column {self.feature.name} has no offsets")
            starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
            flat, vocabulary = self.values, self.vocabulary
            for p, a, b in zip(present.tolist(), starts, ends, strict=True):
                if not p:
                    out.append(None)
                elif kind == "string_list":
                    out.append([vocabulary[c] for c in flat[a:b].tolist()])
                else:
                    out.append(flat[a:b].tolist())
            return out
        values = self.values[rows].tolist()
        if kind in ("float", "int", "bool"):
            return [v if p else None for v, p in zip(values, present.tolist(), strict=True)]
        if kind == "timestamp":
            return [
                timestamp_value(v) if p else None
                for v, p in zip(values, present.tolist(), strict=True)
            ]
        if kind == "string":
            vocabulary = self.vocabulary
            return [
                vocabulary[v] if p else None for v, p in zip(values, present.tolist(), strict=True)
            ]
        return [v if p else None for v, p in zip(values, present.tolist(), strict=True)]


def _join_tail(parts: list[Any], start: int) -> None:
    if len(parts) > start + 1:
        parts[start:] = [np.concatenate(parts[start:])]


class _ColumnBuilder:
    """Decodes one feature, chunk by chunk, into the arrays of a `SnapshotColumn`."""

    def __init__(self, feature: FeatureColumn, view: str) -> None:
        self.feature = feature
        self.view = view
        self.kind: Kind = _KINDS.get(feature.value_type, "object")
        self.decode = value_decoder(feature.value_type)
        self.codes: dict[Any, int] = {}  # strings: stored bytes or str -> vocabulary code
        self.vocabulary: list[str] = []
        self.cache: dict[bytes, int] = {}  # integer scalars: stored bytes -> value
        self.values: list[np.ndarray] = []
        self.lengths: list[npt.NDArray[np.int64]] = []
        self.present: list[npt.NDArray[np.bool_]] = []
        self.sealed = 0  # leading entries of the lists above that are whole chunks

    def add(self, raw: list[Raw]) -> npt.NDArray[np.bool_]:
        """Decode one chunk; returns which of its rows hold a value."""
        n = len(raw)
        present = np.fromiter((bool(b) for b in raw), dtype=np.bool_, count=n)
        kind = self.kind
        if kind == "float":
            values = self._floats(raw, present)
        elif kind == "string":
            values = np.fromiter((self._code(b) if b else -1 for b in raw), np.int32, n)
        elif kind in ("int", "bool", "timestamp"):
            values = np.fromiter((self._scalar(b) if b else 0 for b in raw), np.int64, n)
        elif kind in _LISTS:
            values = self._lists(raw, present)
        else:
            values = np.empty(n, dtype=object)
            values[:] = [self.decode(b) for b in raw]
            present &= np.fromiter((v is not None for v in values), np.bool_, n)
        self.values.append(values)
        self.present.append(present)
        return present

    def _floats(self, raw: list[Raw], present: npt.NDArray[np.bool_]) -> np.ndarray:
        out = np.full(len(raw), np.nan)
        if self.feature.value_type == ValueType.DOUBLE:
            full = [b for b in raw if b]
            joined = b"".join(full)
            if len(joined) == 9 * len(full):
                records = np.frombuffer(joined, dtype=_DOUBLE_RECORD)
                if bool((records["tag"] == 0x29).all()):
                    out[present] = records["value"]
                    return out
        for i, b in enumerate(raw):
            if b:
                v = self.decode(b)
                out[i] = np.nan if v is None else v
        return out

    def _scalar(self, data: bytes) -> int:
        v = self.cache.get(data)
        if v is None:
            decoded = self.decode(data)
            if self.kind == "timestamp":  # whole seconds, as stored
                v = NULL_TIMESTAMP_INT_VALUE if decoded is None else int(decoded.timestamp())
            else:
                v = int(decoded)
            self.cache[data] = v
        return v

    def _code(self, value: Any) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.vocabulary)
            self.vocabulary.append(self.decode(value) if isinstance(value, bytes) else value)
        return code

    def _lists(self, raw: list[Raw], present: npt.NDArray[np.bool_]) -> np.ndarray:
        lengths = np.zeros(len(raw), dtype=np.int64)
        flat: list[Any] = []
        strings = self.kind == "string_list"
        for i, b in enumerate(raw):
            if not b:
                continue
            v = self.decode(b)
            if v is None:
                present[i] = False
                continue
            lengths[i] = len(v)
            if strings:
                get = self.codes.get
                codes = [get(s) for s in v]
                if None in codes:
                    codes = [self._code(s) for s in v]
                flat += codes
            else:
                flat += v
        self.lengths.append(lengths)
        return np.array(flat, dtype=_DTYPE[self.kind])

    def seal(self) -> None:
        """Join the arrays of the slices decoded since the last seal, so `finish` joins few."""
        for parts in (self.values, self.lengths, self.present):
            _join_tail(parts, self.sealed)
        self.sealed += 1

    def finish(self) -> SnapshotColumn:
        present = np.concatenate([*self.present, np.zeros(1, dtype=np.bool_)])
        dtype = _DTYPE[self.kind]
        offsets = None
        if self.kind in _LISTS:
            values = np.concatenate([*self.values, np.zeros(0, dtype=dtype)])
            lengths = np.concatenate([*self.lengths, np.zeros(1, dtype=np.int64)])
            offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        elif self.kind == "object":
            values = np.empty(len(present), dtype=object)
            if self.values:
                values[:-1] = np.concatenate(self.values)
        else:
            fill = np.array([_FILL[self.kind]], dtype=dtype)
            values = np.concatenate([*self.values, fill]).astype(dtype, copy=False)
        return SnapshotColumn(
            feature=self.feature,
            view=self.view,
            kind=self.kind,
            values=values,
            present=present,
            offsets=offsets,
            vocabulary=tuple(self.vocabulary),
        )


@dataclass(frozen=True, eq=False)
class SnapshotView:
    """Per-row state of one item-keyed view: whether the row exists, and its event time."""

    view: ViewColumns
    exists: npt.NDArray[np.bool_]
    ts_ns: npt.NDArray[np.int64]

    def valid(self, rows: npt.NDArray[np.int64], now_ns: int | None) -> npt.NDArray[np.bool_]:
        """Rows that exist and, when `now_ns` is given, are within the view's TTL."""
        ok = self.exists[rows]
        ttl = self.view.ttl_ns
        if now_ns is not None and ttl is not None:
            ok &= (now_ns - self.ts_ns[rows]) <= ttl
        return ok


@dataclass(frozen=True, eq=False)
class ItemSnapshot:
    """An in-process, read-only columnar copy of the item-keyed views of a service.

    Row `n_items` is an empty row: unknown ids map to it, so every gather is safe.
    """

    columns: ServiceColumns
    join_key: str
    ids: tuple[str, ...]
    id_to_row: dict[str, int]
    views: dict[str, SnapshotView]
    features: dict[str, SnapshotColumn]
    built_at: float
    """Wall-clock seconds when the build started: every row is at least this fresh."""
    build_seconds: float
    max_chunk_seconds: float
    """The longest the build held the event loop decoding one slice of rows (wall clock)."""
    max_chunk_cpu_seconds: float
    """The same in this thread's CPU time: the work itself, without preemption."""
    keys_scanned: int
    rows_read: int = -1
    """Rows read and decoded by this build: every row for a full build, only the changed
    and new ones for `refresh_item_snapshot` (-1: not recorded)."""

    @property
    def n_items(self) -> int:
        return len(self.ids)

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.built_at

    def nbytes(self) -> int:
        """Bytes this snapshot holds: every array, the ids with their strings, the id map
        and the vocabularies. The Python values inside an `object` column (a type the
        snapshot keeps as Feast's objects) are not counted, only their pointers."""
        arrays = 0
        for column in self.features.values():
            arrays += column.values.nbytes + column.present.nbytes
            arrays += 0 if column.offsets is None else column.offsets.nbytes
            arrays += sys.getsizeof(column.vocabulary) + sum(map(sys.getsizeof, column.vocabulary))
        for view in self.views.values():
            arrays += view.exists.nbytes + view.ts_ns.nbytes
        ids = sys.getsizeof(self.ids) + sum(map(sys.getsizeof, self.ids))
        index = sys.getsizeof(self.id_to_row) + sum(map(sys.getsizeof, self.id_to_row.values()))
        return arrays + ids + index

    def column(self, feature: str) -> SnapshotColumn:
        try:
            return self.features[feature]
        except KeyError:
            raise NotFoundError(f"the item snapshot has no feature {feature}") from None

    def lookup(
        self, item_ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Snapshot rows of `item_ids` (the empty row for unknown ones) and which were known."""
        missing = len(self.ids)
        rows = np.fromiter(
            map(self.id_to_row.get, item_ids, repeat(missing)), np.int64, len(item_ids)
        )
        return rows, rows != missing

    def take(
        self,
        item_ids: Sequence[str],
        enforce_ttl: bool = True,
        now: float | None = None,
        rows: npt.NDArray[np.int64] | None = None,
    ) -> ItemRows:
        """The rows of `item_ids`, each view's rows checked against its TTL at `now`.
        `rows`: this snapshot's rows of those ids, when the caller has them already."""
        if rows is None:
            rows, found = self.lookup(item_ids)
        else:
            found = rows != len(self.ids)
        now_ns = int((time.time() if now is None else now) * 1e9) if enforce_ttl else None
        valid = {name: v.valid(rows, now_ns) for name, v in self.views.items()}
        return ItemRows(ids=item_ids, rows=rows, found=found, valid=valid, snapshot=self)


@dataclass(frozen=True, eq=False)
class ItemRows:
    """The items of one request, gathered from a snapshot; O(request) to read."""

    ids: Sequence[str]
    rows: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    """Ids the snapshot knows (some item view has a row for them), before TTL."""
    valid: Mapping[str, npt.NDArray[np.bool_]]
    """Per item view: the row exists and is within the view's TTL."""
    snapshot: ItemSnapshot

    @property
    def missing(self) -> npt.NDArray[np.bool_]:
        """Items with no valid row in any item view: callers use defaults for them."""
        if not self.valid:
            return np.ones(len(self.ids), dtype=np.bool_)
        return ~np.logical_or.reduce(list(self.valid.values()))

    def present(self, feature: str) -> npt.NDArray[np.bool_]:
        column = self.snapshot.column(feature)
        return column.present[self.rows] & self.valid[column.view]

    def values(self, feature: str) -> np.ndarray:
        """A scalar feature per item, missing ones filled: NaN, 0, False, or code -1 (strings).

        Lists and other types come as an object array of `to_python` values.
        """
        column = self.snapshot.column(feature)
        if column.kind not in _FILL:
            out = np.empty(len(self.ids), dtype=object)
            out[:] = self.to_python(feature)
            return out
        out = column.values[self.rows]
        absent = ~(column.present[self.rows] & self.valid[column.view])
        if absent.any():
            out[absent] = _FILL[column.kind]
        return out

    def matrix(self, features: Sequence[str]) -> npt.NDArray[np.float64]:
        """Numeric features as a float64 (items x features) matrix, NaN where missing."""
        out = np.empty((len(self.ids), len(features)), dtype=np.float64)
        for j, name in enumerate(features):
            column = self.snapshot.column(name)
            if column.kind not in _NUMERIC:
                raise ConfigurationError(f"feature {name} is {column.kind}, not numeric")
            out[:, j] = column.values[self.rows]
            out[~self.present(name), j] = np.nan
        return out

    def to_python(self, feature: str) -> list[Any]:
        """The feature per item exactly as Feast's `to_dict()` gives it (None when missing)."""
        return self.snapshot.column(feature).python(self.rows, self.present(feature))

    def to_dict(self) -> dict[str, list[Any]]:
        return {name: self.to_python(name) for name in self.snapshot.features}


async def _hmget_bulk(
    client: AsyncClient, keys: Sequence[bytes], fields: Sequence[bytes]
) -> list[list[Raw]]:
    """One HMGET per key, pipelined on one pooled connection, replies parsed in C.

    redis-py's `read_response` costs ~10 µs of Python per reply, which would hold the
    event loop for milliseconds per chunk. The pool hands out a connection with nothing
    left to read (`get_connection` checks), so the replies to these commands are exactly
    what its stream yields next; they are read 64 KiB at a time (the loop runs between
    reads) and parsed by hiredis, the parser redis-py itself uses. Without that stream
    (another redis-py), it falls back to `read_response`. Any error drops the connection.
    On a cluster: one such pipeline per master, concurrently (`cluster_exchange`).
    """
    if isinstance(client, aioredis.RedisCluster):
        packed = [pack_commands([(b"HMGET", key, *fields)]) for key in keys]
        return await cluster_exchange(client, keys, packed, "snapshot read")
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(pack_commands(("HMGET", key, *fields) for key in keys))
        stream = getattr(connection, "_reader", None)
        if not isinstance(stream, asyncio.StreamReader):
            return [await connection.read_response() for _ in keys]
        parser = hiredis.Reader()
        out: list[list[Raw]] = []
        while len(out) < len(keys):
            data = await stream.read(1 << 16)
            if not data:
                raise redis.ConnectionError("Redis closed the connection during a snapshot read")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise redis.ResponseError(str(reply))
                out.append(reply)
        return out
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


def _stamp_decoder() -> Callable[[Raw], int]:
    """`ts_nanos`, memoized: the rows of a build share few distinct event times."""
    seen: dict[Raw, int] = {}

    def stamp_ns(data: Raw) -> int:
        ns = seen.get(data)
        if ns is None:
            ns = seen[data] = ts_nanos(data)
        return ns

    return stamp_ns


def _views_or_refuse(columns: ServiceColumns, join_key: str) -> list[ViewColumns]:
    views = list(columns.views_keyed_by(join_key))
    if not views:
        raise ConfigurationError(
            f"feature service {columns.service} has no view keyed by {join_key}"
        )
    return views


async def _scan_entity_keys(
    client: aioredis.Redis | aioredis.RedisCluster, project: str, join_key: str, scan_count: int
) -> AsyncIterator[tuple[int, list[tuple[str, bytes]]]]:
    """SCAN for the project's keys of `join_key` entities: per call, how many keys it
    returned and the (entity id, key) pairs among them (a key may come twice). On a
    cluster, every master is scanned in turn."""
    pattern = feast_codec.entity_key_pattern(join_key, project)

    def found(keys: Sequence[bytes]) -> list[tuple[str, bytes]]:
        out = []
        for key in keys:
            entity = feast_codec.parse_entity_key(key, join_key, project)
            if entity is not None:
                out.append((entity, key))
        return out

    if isinstance(client, aioredis.RedisCluster):
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=scan_count):
            batch.append(key)
            if len(batch) >= scan_count:
                yield len(batch), found(batch)
                batch = []
        yield len(batch), found(batch)
        return
    cursor: int = 0
    while True:
        cursor, keys = await client.scan(cursor=cursor, match=pattern, count=scan_count)
        yield len(keys), found(keys)
        if cursor == 0:
            return


async def _indexed_entity_keys(
    client: aioredis.RedisCluster, project: str, join_key: str, scan_count: int
) -> AsyncIterator[tuple[int, list[tuple[str, bytes]]]]:
    """The (entity id, key) pairs of the item index (`inkling.feature_store.cluster`):
    every slot's set, read with one pipeline per master; when the index holds no id at
    all (rows written before it existed, or by Feast's own materialize), a SCAN of
    every master instead."""
    index_keys = list(item_index_keys(project, join_key))
    members = await cluster_exchange(client, index_keys, _smembers(project, join_key), "index")
    ids = sorted({m.decode("utf-8") for ms in members for m in ms})
    if not ids:
        log.info("the item index of %s is empty: scanning every master", join_key)
        async for batch in _scan_entity_keys(client, project, join_key, scan_count):
            yield batch
        return
    keys = feast_codec.entity_keys(join_key, ids, project)
    yield len(ids), list(zip(ids, keys, strict=True))


@functools.cache
def _smembers(project: str, join_key: str) -> list[bytes]:
    return [pack_commands([(b"SMEMBERS", k)]) for k in item_index_keys(project, join_key)]


def _entity_keys(
    client: aioredis.Redis | aioredis.RedisCluster, project: str, join_key: str, scan_count: int
) -> AsyncIterator[tuple[int, list[tuple[str, bytes]]]]:
    """Where a snapshot finds its keys: the item index on a cluster, SCAN on one server."""
    if isinstance(client, aioredis.RedisCluster):
        return _indexed_entity_keys(client, project, join_key, scan_count)
    return _scan_entity_keys(client, project, join_key, scan_count)


async def _each_chunk(
    batches: AsyncIterator[tuple[int, list[tuple[str, bytes]]]],
    chunk_size: int,
    handle: Callable[[list[tuple[str, bytes]]], Awaitable[None]],
    what: str,
) -> int:
    """Hand the (entity id, key) pairs of `batches` to `handle`, `chunk_size` at a time
    (the rest at the end); returns how many keys the batches counted. A Redis error is
    `DependencyUnavailableError`, naming `what` failed."""
    scanned = 0
    pending: list[tuple[str, bytes]] = []
    try:
        async for count, found in batches:
            scanned += count
            pending += found
            while len(pending) >= chunk_size:
                chunk, pending = pending[:chunk_size], pending[chunk_size:]
                await handle(chunk)
        if pending:
            await handle(pending)
    except redis.RedisError as e:
        raise DependencyUnavailableError(f"item snapshot {what} failed: {e}") from e
    return scanned


async def build_item_snapshot(
    client: AsyncClient,
    columns: ServiceColumns,
    join_key: str = "item_id",
    chunk_size: int = 200,
    scan_count: int = 2_000,
    slice_budget_s: float = 0.0005,
    pause_s: float = 0.0,
    clock: Callable[[], float] = time.time,
    keys: Sequence[tuple[str, bytes]] | None = None,
) -> ItemSnapshot:
    """Read every row keyed by `join_key` of `columns`' views from Redis into a snapshot.

    SCAN walks the project's keys of that entity (decoding each serialized entity key
    and keeping exactly this project's), `scan_count` keys of the whole keyspace per
    call: the keyspace also holds every session's row and the stream worker's state
    (when the event bus still kept one dedupe key per event, 450,000 of them made a
    build take 0.45 s of this process's CPU at 200 per call against 0.08 s at 2,000; a
    call then holds Redis about a millisecond); `chunk_size` keys at a time are read in one
    round trip (one pipelined HMGET per key). Decoding runs in slices of rows sized
    to take about `slice_budget_s` of CPU each, with the event loop free between them
    (for `pause_s` more, which trades a longer build for less contention with requests).
    With `keys` ((entity id, key) pairs), exactly those rows are read and nothing is
    scanned: `refresh_item_snapshot` reads only what changed that way.
    """
    views = _views_or_refuse(columns, join_key)
    began, began_wall = time.perf_counter(), clock()
    fields: list[bytes] = []
    spans: list[tuple[ViewColumns, list[_ColumnBuilder], int]] = []  # view, columns, ts at
    for v in views:
        fields += [f.redis_field for f in v.features]
        spans.append((v, [_ColumnBuilder(f, v.name) for f in v.features], len(fields)))
        fields.append(v.ts_field)
    ids: list[str] = []
    id_to_row: dict[str, int] = {}
    exists: dict[str, list[npt.NDArray[np.bool_]]] = {v.name: [] for v in views}
    ts_ns: dict[str, list[npt.NDArray[np.int64]]] = {v.name: [] for v in views}
    longest = longest_cpu = 0.0
    stamp_ns = _stamp_decoder()

    def decode(replies: list[list[Raw]]) -> None:
        start = 0
        for v, builders, ts_at in spans:
            any_value = np.zeros(len(replies), dtype=np.bool_)
            for k, builder in enumerate(builders, start):
                any_value |= builder.add([r[k] for r in replies])
            stamps = [r[ts_at] for r in replies]
            has_ts = np.fromiter((s is not None for s in stamps), np.bool_, len(stamps))
            exists[v.name].append(any_value | has_ts)
            ts_ns[v.name].append(np.fromiter((stamp_ns(s) for s in stamps), np.int64))
            start = ts_at + 1

    step = 16  # rows decoded per slice, adapted so that a slice takes about slice_budget_s
    sealed = 0  # chunks joined into one array per column

    async def read_chunk(chunk: list[tuple[str, bytes]]) -> None:
        nonlocal longest, longest_cpu, step, sealed
        replies = await _hmget_bulk(client, [key for _, key in chunk], fields)
        keep = []
        for j, reply in enumerate(replies):
            entity_id = chunk[j][0]
            # SCAN may return a key twice; a key none of the views has a row in is skipped.
            if entity_id not in id_to_row and any(x is not None for x in reply):
                id_to_row[entity_id] = len(ids)
                ids.append(entity_id)
                keep.append(j)
        if len(keep) < len(replies):
            replies = [replies[j] for j in keep]
        lo = 0
        while lo < len(replies):
            part = replies[lo : lo + step]
            lo += len(part)
            t, cpu = time.perf_counter(), time.thread_time()
            decode(part)
            wall, cpu = time.perf_counter() - t, time.thread_time() - cpu
            longest, longest_cpu = max(longest, wall), max(longest_cpu, cpu)
            step = max(1, min(chunk_size, int(len(part) * slice_budget_s / max(cpu, 1e-6))))
            await asyncio.sleep(pause_s)
        if replies:
            for _, builders, _ in spans:
                for builder in builders:
                    builder.seal()
            for v in views:
                _join_tail(exists[v.name], sealed)
                _join_tail(ts_ns[v.name], sealed)
            sealed += 1

    async def given() -> AsyncIterator[tuple[int, list[tuple[str, bytes]]]]:
        yield 0, list(keys or ())

    batches = (
        given() if keys is not None else _entity_keys(client, columns.project, join_key, scan_count)
    )
    scanned = await _each_chunk(batches, chunk_size, read_chunk, "build")

    def stack(parts: list[Any], fill: Any, dtype: Any) -> Any:
        return np.concatenate([*parts, np.array([fill], dtype=dtype)])

    features = {}
    for _, builders, _ in spans:
        for builder in builders:
            features[builder.feature.name] = builder.finish()
            await asyncio.sleep(pause_s)

    return ItemSnapshot(
        columns=columns,
        join_key=join_key,
        ids=tuple(ids),
        id_to_row=id_to_row,
        views={
            v.name: SnapshotView(
                view=v,
                exists=stack(exists[v.name], False, np.bool_),
                ts_ns=stack(ts_ns[v.name], 0, np.int64),
            )
            for v in views
        },
        features=features,
        built_at=began_wall,
        build_seconds=time.perf_counter() - began,
        max_chunk_seconds=longest,
        max_chunk_cpu_seconds=longest_cpu,
        keys_scanned=scanned,
        rows_read=len(ids),
    )


async def refresh_item_snapshot(
    client: AsyncClient,
    previous: ItemSnapshot,
    chunk_size: int = 500,
    scan_count: int = 2_000,
    max_changed_share: float = 0.5,
    clock: Callable[[], float] = time.time,
) -> ItemSnapshot:
    """A snapshot as fresh as `build_item_snapshot` would give, reading only what changed.

    Every write through Feast (stock materialize, push, inkling's bulk path) stores the
    row's event time in the view's `_ts` field, so a row changed since `previous` is
    one whose `_ts` (or existence) differs. One SCAN finds the keys, one HMGET of just
    the `_ts` fields per key finds the changed and the new rows, and only those are
    read in full and decoded (`rows_read`); the result is `previous` with them
    overwritten or appended, new arrays throughout, so readers of `previous` are
    untouched. Nothing changed: `previous`'s arrays with a new `built_at`. A row gone
    from Redis (or from every view of the service), or more than `max_changed_share`
    of the rows changed: a full build.
    A row rewritten with an unchanged event time is not seen; callers bound that with
    a periodic full build (`SnapshotRefresher.full_every`). Keys are compared
    `chunk_size` at a time, one round trip each, the event loop free in between.
    """
    columns, join_key = previous.columns, previous.join_key
    views = _views_or_refuse(columns, join_key)
    began, began_wall = time.perf_counter(), clock()
    ts_fields = [v.ts_field for v in views]
    n = previous.n_items
    seen: set[str] = set()
    changed: list[tuple[str, bytes]] = []
    known = 0
    stamp_ns = _stamp_decoder()

    async def compare(pairs: list[tuple[str, bytes]]) -> None:
        nonlocal known
        chunk = [pair for pair in pairs if pair[0] not in seen]  # SCAN may repeat a key
        seen.update(entity for entity, _ in chunk)
        if not chunk:
            return
        replies = await _hmget_bulk(client, [key for _, key in chunk], ts_fields)
        rows, found = previous.lookup([entity for entity, _ in chunk])
        known += int(found.sum())
        differs = np.zeros(len(chunk), dtype=np.bool_)
        for j, v in enumerate(views):
            stamps = [r[j] for r in replies]
            has = np.fromiter((x is not None for x in stamps), np.bool_, len(stamps))
            ns = np.fromiter((stamp_ns(x) for x in stamps), np.int64, len(stamps))
            state = previous.views[v.name]
            differs |= (has != state.exists[rows]) | (ns != state.ts_ns[rows])
        for j in np.flatnonzero(differs).tolist():
            changed.append(chunk[j])

    scanned = await _each_chunk(
        _entity_keys(client, columns.project, join_key, scan_count),
        chunk_size,
        compare,
        "refresh",
    )
    if known < n or len(changed) > max_changed_share * max(n, 1):
        return await build_item_snapshot(client, columns, join_key=join_key, clock=clock)
    if not changed:
        return replace(
            previous,
            built_at=began_wall,
            build_seconds=time.perf_counter() - began,
            max_chunk_seconds=0.0,
            max_chunk_cpu_seconds=0.0,
            keys_scanned=scanned,
            rows_read=0,
        )
    delta = await build_item_snapshot(client, columns, join_key=join_key, clock=clock, keys=changed)
    if delta.n_items < len(changed):  # a key that lost every row of these views
        return await build_item_snapshot(client, columns, join_key=join_key, clock=clock)
    merged = _merge(previous, delta)
    return replace(
        merged,
        built_at=began_wall,
        build_seconds=time.perf_counter() - began,
        max_chunk_seconds=delta.max_chunk_seconds,
        max_chunk_cpu_seconds=delta.max_chunk_cpu_seconds,
        keys_scanned=scanned,
        rows_read=delta.n_items,
    )


def _merge(previous: ItemSnapshot, delta: ItemSnapshot) -> ItemSnapshot:
    """`previous` with `delta`'s rows: an id both hold takes `delta`'s row in place, a new
    id is appended. Every array is new; `previous` is left as it was."""
    n = previous.n_items
    new_ids = [i for i in delta.ids if i not in previous.id_to_row]
    total = n + len(new_ids)
    id_to_row = dict(previous.id_to_row)
    for k, item in enumerate(new_ids, n):
        id_to_row[item] = k
    target = np.fromiter(map(id_to_row.__getitem__, delta.ids), np.int64, delta.n_items)
    m = delta.n_items

    def scalars(old: np.ndarray, new: np.ndarray, fill: Any) -> np.ndarray:
        out = np.empty(total + 1, dtype=old.dtype)
        out[:n] = old[:n]
        out[n:] = fill
        out[target] = new[:m]
        return out

    features = {}
    for name, old in previous.features.items():
        new = delta.features[name]
        values, offsets, vocabulary = new.values, None, old.vocabulary
        if old.kind in ("string", "string_list"):
            vocabulary, codes = _extend_vocabulary(old.vocabulary, new.vocabulary)
            values = np.where(values >= 0, codes[values], -1).astype(values.dtype)
        if old.kind in _LISTS:
            assert old.offsets is not None and new.offsets is not None  # lists always have them
            lengths = scalars(np.diff(old.offsets), np.diff(new.offsets), 0)
            starts = scalars(old.offsets[:-1], len(old.values) + new.offsets[:-1], 0)
            offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
            pool = np.concatenate([old.values, values])
            gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            values = pool[gather]
        else:
            values = scalars(old.values, values, old.values[-1])
        features[name] = replace(
            old,
            values=values,
            present=scalars(old.present, new.present, False),
            offsets=offsets,
            vocabulary=vocabulary,
        )
    views = {
        name: SnapshotView(
            view=state.view,
            exists=scalars(state.exists, delta.views[name].exists, False),
            ts_ns=scalars(state.ts_ns, delta.views[name].ts_ns, 0),
        )
        for name, state in previous.views.items()
    }
    return replace(
        previous,
        ids=previous.ids + tuple(new_ids),
        id_to_row=id_to_row,
        views=views,
        features=features,
    )


def _extend_vocabulary(
    old: tuple[str, ...], new: tuple[str, ...]
) -> tuple[tuple[str, ...], npt.NDArray[np.int32]]:
    """`old` with the strings of `new` it lacks appended, and each of `new`'s codes in it."""
    index = {s: i for i, s in enumerate(old)}
    added = [s for s in new if s not in index]
    for s in added:
        index[s] = len(index)
    codes = np.fromiter((index[s] for s in new), np.int32, len(new))
    return old + tuple(added), np.concatenate([codes, np.full(1, -1, np.int32)])
