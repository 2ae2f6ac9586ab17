"""Byte-exact encoders for the records Feast keeps in its Redis online store.

Feast stores one Redis hash per entity key: the key is the serialized entity key
(serialization version 3) followed by the project name; each feature is a field
named by the 4-byte murmur3 hash of ``<view>:<feature>`` whose value is a
serialized ``feast.types.Value`` protobuf; ``_ts:<view>`` holds the row's event
time as a serialized ``google.protobuf.Timestamp``.

Building those bytes with protobuf objects costs microseconds per value, which
caps a bulk load at a few thousand rows a second. These functions write the same
protobuf wire format directly, column at a time, caching repeated strings. Tests
check every encoder against Feast's own serialization.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
from feast.infra.key_encoding_utils import serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3
from feast.value_type import ValueType

Encoder = Callable[[pa.ChunkedArray | pa.Array], list[bytes]]
RowEncoder = Callable[[Sequence[Any]], list[bytes]]
"""The same, from Python values (None: null), for the types encoded value by value."""

_STRING = 2  # feast ValueType.STRING, as written into serialized entity keys
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values take ten bytes (two's complement)."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


# feast.types.Value oneof field numbers (feast/protos/feast/types/Value.proto).
_FIELDS = {
    ValueType.STRING: 2,
    ValueType.INT32: 3,
    ValueType.INT64: 4,
    ValueType.DOUBLE: 5,
    ValueType.FLOAT: 6,
    ValueType.BOOL: 7,
    ValueType.UNIX_TIMESTAMP: 8,
    ValueType.STRING_LIST: 12,
    ValueType.INT32_LIST: 13,
    ValueType.INT64_LIST: 14,
    ValueType.DOUBLE_LIST: 15,
    ValueType.FLOAT_LIST: 16,
    ValueType.BOOL_LIST: 17,
}
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_TIMESTAMP_TAG = _tag(_FIELDS[ValueType.UNIX_TIMESTAMP], _VARINT)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _tag(field_number, _LEN) + varint(len(payload)) + payload


def string_element(value: str) -> bytes:
    """One element of a serialized string list (`string_list_value` joins them)."""
    return _length_delimited(1, value.encode("utf-8"))


def string_list_value(elements: Sequence[bytes]) -> bytes:
    """The `feast.types.Value` of a string list from its `string_element`s."""
    return _length_delimited(_FIELDS[ValueType.STRING_LIST], b"".join(elements))


def whole_seconds(value: datetime) -> int:
    """What Feast keeps of a timestamp value: whole seconds since the epoch (a naive
    datetime is UTC, as Arrow reads one)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _SECOND


def timestamp_value(seconds: int) -> bytes:
    """The `feast.types.Value` of a timestamp of `seconds` since the epoch."""
    return _TIMESTAMP_TAG + varint(seconds)


def _float_encoder(value_type: ValueType) -> Encoder:
    fixed = value_type in (ValueType.DOUBLE,)
    tag = _tag(_FIELDS[value_type], _FIXED64 if fixed else _FIXED32)
    width = 8 if fixed else 4

    def encode(values: pa.ChunkedArray | pa.Array) -> list[bytes]:
        arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        missing = np.isnan(arr)  # Feast stores NaN and null alike as an empty value
        packed = arr.astype("<f8" if fixed else "<f4").tobytes()
        out = [tag + packed[i * width : (i + 1) * width] for i in range(len(arr))]
        for i in np.flatnonzero(missing):
            out[i] = b""
        return out

    return encode


def _varint_encoder(value_type: ValueType) -> RowEncoder:
    tag = _tag(_FIELDS[value_type], _VARINT)

    def encode(rows: Sequence[Any]) -> list[bytes]:
        cache: dict[int, bytes] = {}
        out = []
        for v in rows:
            if v is None:
                out.append(b"")
                continue
            if value_type == ValueType.BOOL:
                v = int(bool(v))
            elif value_type == ValueType.INT32:
                v = int(v)
            b = cache.get(v)
            if b is None:
                b = cache[v] = tag + varint(v)
            out.append(b)
        return out

    return encode


def _timestamp_encoder() -> Encoder:
    tag = _tag(_FIELDS[ValueType.UNIX_TIMESTAMP], _VARINT)

    def encode(values: pa.ChunkedArray | pa.Array) -> list[bytes]:
        if values.null_count:
            raise ValueError(
                "Feast cannot store a null UnixTimestamp; fill it before materializing"
            )
        seconds = pa.compute.cast(values, pa.timestamp("us", tz="UTC")).to_numpy(
            zero_copy_only=False
        )
        secs = seconds.astype("datetime64[us]").astype(np.int64) // 1_000_000
        return [tag + varint(int(s)) for s in secs]

    return encode


def _string_encoder() -> RowEncoder:
    field = _FIELDS[ValueType.STRING]

    def encode(rows: Sequence[Any]) -> list[bytes]:
        cache: dict[str, bytes] = {}
        out = []
        for v in rows:
            if v is None:
                out.append(b"")
                continue
            b = cache.get(v)
            if b is None:
                b = cache[v] = _length_delimited(field, v.encode("utf-8"))
            out.append(b)
        return out

    return encode


def _string_list_encoder() -> RowEncoder:
    def encode(rows: Sequence[Any]) -> list[bytes]:
        elements: dict[str, bytes] = {}
        out = []
        for row in rows:
            if row is None:
                out.append(b"")
                continue
            parts = []
            for s in row:
                e = elements.get(s)
                if e is None:
                    e = elements[s] = string_element(s)
                parts.append(e)
            out.append(string_list_value(parts))
        return out

    return encode


def _packed_list_encoder(value_type: ValueType) -> RowEncoder:
    field = _FIELDS[value_type]

    def element(v: Any) -> bytes:
        if value_type == ValueType.DOUBLE_LIST:
            return struct.pack("<d", v)
        if value_type == ValueType.FLOAT_LIST:
            return struct.pack("<f", v)
        if value_type == ValueType.BOOL_LIST:
            return varint(int(bool(v)))
        return varint(int(v))

    def encode(rows: Sequence[Any]) -> list[bytes]:
        out = []
        for row in rows:
            if row is None:
                out.append(b"")
                continue
            packed = b"".join(element(v) for v in row)
            inner = _length_delimited(1, packed) if row else b""
            out.append(_length_delimited(field, inner))
        return out

    return encode


def _timestamp_row_encoder() -> RowEncoder:
    def encode(rows: Sequence[Any]) -> list[bytes]:
        out = []
        for v in rows:
            if v is None:
                raise ValueError(
                    "Feast cannot store a null UnixTimestamp; fill it before materializing"
                )
            out.append(timestamp_value(whole_seconds(v)))
        return out

    return encode


def row_encoder(value_type: ValueType) -> RowEncoder | None:
    """An encoder from Python values to serialized Feast `Value` bytes, for the types
    encoded value by value (no Arrow round trip); None for the others. Timestamps are
    `datetime`s (naive ones are UTC)."""
    if value_type == ValueType.UNIX_TIMESTAMP:
        return _timestamp_row_encoder()
    if value_type in (ValueType.INT64, ValueType.INT32, ValueType.BOOL):
        return _varint_encoder(value_type)
    if value_type == ValueType.STRING:
        return _string_encoder()
    if value_type == ValueType.STRING_LIST:
        return _string_list_encoder()
    if value_type in (ValueType.INT64_LIST, ValueType.INT32_LIST, ValueType.DOUBLE_LIST,
                      ValueType.FLOAT_LIST, ValueType.BOOL_LIST):  # fmt: skip
        return _packed_list_encoder(value_type)
    return None


def value_encoder(value_type: ValueType) -> Encoder:
    """An encoder from an Arrow column to serialized Feast `Value` bytes, one per row."""
    if value_type in (ValueType.DOUBLE, ValueType.FLOAT):
        return _float_encoder(value_type)
    if value_type == ValueType.UNIX_TIMESTAMP:
        return _timestamp_encoder()
    rows = row_encoder(value_type)
    if rows is None:
        raise ValueError(f"no bulk encoder for Feast value type {value_type.name}")
    return lambda values: rows(values.to_pylist())


def timestamps(values: pa.ChunkedArray | pa.Array) -> tuple[list[bytes], np.ndarray]:
    """Serialized `google.protobuf.Timestamp`s and the same instants in nanoseconds."""
    micros = (
        pa.compute.cast(values, pa.timestamp("us", tz="UTC"))
        .to_numpy(zero_copy_only=False)
        .astype("datetime64[us]")
        .astype(np.int64)
    )
    seen: dict[int, bytes] = {}  # rows share few distinct event times
    out = [seen.get(us) or seen.setdefault(us, timestamp_bytes(us)) for us in micros.tolist()]
    return out, micros * 1000


def timestamp_bytes(micros: int) -> bytes:
    """A serialized `google.protobuf.Timestamp` of microseconds since the epoch."""
    seconds, rest = divmod(micros, 1_000_000)
    b = (b"\x08" + varint(seconds)) if seconds else b""
    if rest:
        b += b"\x10" + varint(rest * 1000)
    return b


def decode_timestamp_nanos(data: bytes) -> int:
    """Nanoseconds of a serialized `google.protobuf.Timestamp` (fields 1 and 2, varints)."""
    seconds = nanos = 0
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if key == 0x08:
            seconds = value - (1 << 64) if value >= 1 << 63 else value
        elif key == 0x10:
            nanos = value
    return seconds * 1_000_000_000 + nanos


def entity_keys(join_key: str, values: Sequence[str], project: str) -> list[bytes]:
    """Redis keys for single-join-key string entities, as Feast's `_redis_key` builds them."""
    prefix = serialize_entity_key_prefix([join_key], 3)
    suffix = project.encode("utf-8")
    type_tag = struct.pack("<I", _STRING)
    out = []
    for v in values:
        b = v.encode("utf-8")
        out.append(prefix + type_tag + struct.pack("<I", len(b)) + b + suffix)
    return out


def field_key(view: str, feature: str) -> bytes:
    return bytes(_mmh3(f"{view}:{feature}"))


def _glob_escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out.append(0x5C)
        out.append(byte)
    return bytes(out)


def entity_key_pattern(join_key: str, project: str) -> bytes:
    """A SCAN MATCH pattern for `project`'s keys of `join_key` entities (it may also
    match another project whose name ends with this one: `parse_entity_key` tells)."""
    prefix = serialize_entity_key_prefix([join_key], 3)
    return _glob_escape(prefix) + b"*" + _glob_escape(project.encode("utf-8"))


def parse_entity_key(key: bytes, join_key: str, project: str) -> str | None:
    """The string entity id of a key `entity_keys` builds, or None when `key` is not one
    of `project`'s keys of `join_key`."""
    head = serialize_entity_key_prefix([join_key], 3) + struct.pack("<I", _STRING)
    suffix = project.encode("utf-8")
    if not key.startswith(head) or not key.endswith(suffix) or len(key) < len(head) + 4:
        return None
    (n,) = struct.unpack_from("<I", key, len(head))
    body = len(head) + 4
    if body + n + len(suffix) != len(key):
        return None  # another project whose name ends with ours
    return key[body : body + n].decode("utf-8")
