"""Feast's serialized online values, decoded to what its `to_dict()` returns.

One decoder per value type (`value_decoder`): fast paths for the layouts Feast writes,
protobuf for anything else, so a malformed value fails as it would in Feast.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import NULL_TIMESTAMP_INT_VALUE, feast_value_type_to_python_type
from feast.value_type import ValueType

from inkling.feature_store import feast_codec

log = logging.getLogger(__name__)

Raw = bytes | None
"""One HMGET reply field: the serialized value, or None when the hash lacks the field."""
Row = dict[str, Any]
"""One entity's features by name, as Feast's `to_dict()` gives them."""


_SLOW = object()  # a fast decoder's "not the layout I expected": ask protobuf instead


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _generic_decoder(value_type: ValueType) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        return feast_value_type_to_python_type(ValueProto.FromString(data), value_type)

    return decode


def _fixed_decoder(tag: int, fmt: str) -> Callable[[bytes], Any]:
    unpack = struct.Struct(fmt).unpack_from
    size = 1 + struct.calcsize(fmt)

    def decode(data: bytes) -> Any:
        if len(data) == size and data[0] == tag:
            return unpack(data, 1)[0]
        return _SLOW

    return decode


def _varint_decoder(tag: int, convert: Callable[[int], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if len(data) == 2 and data[0] == tag and data[1] < 0x80:
            return convert(data[1])
        if not data or data[0] != tag:
            return _SLOW
        value, end = _varint(data, 1)
        return convert(_signed64(value)) if end == len(data) else _SLOW

    return decode


def timestamp_value(seconds: int) -> datetime | None:
    if seconds == NULL_TIMESTAMP_INT_VALUE:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC)


def _string_decoder(data: bytes) -> Any:
    if not data or data[0] != 0x12:
        return _SLOW
    n, i = _varint(data, 1)
    if i + n != len(data):
        return _SLOW
    return data[i:].decode("utf-8")


def _proto_list_decoder(attribute: str) -> Callable[[bytes], Any]:
    # Lists parse fastest in protobuf's C code; Feast itself returns `list(x_list_val.val)`.
    def decode(data: bytes) -> Any:
        value = ValueProto.FromString(data)
        if value.WhichOneof("val") != attribute:
            return _SLOW
        return list(getattr(value, attribute).val)

    return decode


_FAST: dict[ValueType, Callable[[bytes], Any]] = {
    ValueType.DOUBLE: _fixed_decoder(0x29, "<d"),
    ValueType.FLOAT: _fixed_decoder(0x35, "<f"),
    ValueType.INT64: _varint_decoder(0x20, int),
    ValueType.INT32: _varint_decoder(0x18, int),
    ValueType.BOOL: _varint_decoder(0x38, bool),
    ValueType.UNIX_TIMESTAMP: _varint_decoder(0x40, timestamp_value),
    ValueType.STRING: _string_decoder,
    ValueType.STRING_LIST: _proto_list_decoder("string_list_val"),
    ValueType.INT32_LIST: _proto_list_decoder("int32_list_val"),
    ValueType.INT64_LIST: _proto_list_decoder("int64_list_val"),
    ValueType.DOUBLE_LIST: _proto_list_decoder("double_list_val"),
    ValueType.FLOAT_LIST: _proto_list_decoder("float_list_val"),
    ValueType.BOOL_LIST: _proto_list_decoder("bool_list_val"),
}


def value_decoder(value_type: ValueType) -> Callable[[Raw], Any]:
    """A decoder from a stored `Value` (or None) to what Feast's `to_dict()` returns.

    Common layouts are read directly; anything else goes through protobuf and
    `feast_value_type_to_python_type`, so the result never differs from Feast's.
    """
    generic = _generic_decoder(value_type)
    fast = _FAST.get(value_type)
    if fast is None:

        def slow(data: Raw) -> Any:
            return generic(data) if data else None

        return slow

    def decode(data: Raw) -> Any:
        if not data:
            return None
        try:
            value = fast(data)
        except (IndexError, UnicodeDecodeError):  # malformed: let protobuf raise as for Feast
            value = _SLOW
        return generic(data) if value is _SLOW else value

    return decode


def ts_nanos(data: Raw) -> int:
    return feast_codec.decode_timestamp_nanos(data) if data else 0


def expired(ts_ns: int, ttl_ns: int | None, now_ns: int) -> bool:
    return ttl_ns is not None and now_ns - ts_ns > ttl_ns
