"""Hypothesis strategies for any protobuf request, built from its descriptor: the fuzz
suite's input (`tests/integration/test_fuzz.py`).

`requests(cls)` draws serialized payloads of three kinds:

- well-formed messages whose fields take edge values (most of them, given a valid
  request, that request with one or two fields changed, so that many get past
  validation to the handler): empty, very long and non-ASCII
  strings, extreme and negative numbers, enum numbers the contract does not define,
  nested messages to the depth the contract has, repeated fields from empty to huge
  (tens of thousands of entries) and with duplicates;
- those messages' bytes damaged: truncated, a byte flipped, bytes inserted, a field
  repeated with another wire type, invalid UTF-8 where a string is;
- random bytes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HUGE = 20_000
"""Entries in a huge repeated field (more than any request limit allows)."""
EXAMPLES = int(os.environ.get("INKLING_FUZZ_EXAMPLES", "40"))
"""Examples per RPC: a bounded number in `make test`, more from `make fuzz`."""
DERANDOMIZE = "INKLING_FUZZ_EXAMPLES" not in os.environ
"""`make test` draws the same examples every run (its assertions cannot flake);
`make fuzz` draws new ones each time."""
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""How every fuzz test runs (`@SETTINGS` above its `@given`)."""

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)
_RANGES = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}

_strings = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet="abc", min_size=1, max_size=3),  # short ids that collide: duplicates
    st.integers(1_000, 100_000).map(lambda n: "x" * n),  # far past any length limit
    st.sampled_from(["\u0000", " ", "\u202e\u00e9\U0001f600", "../../etc/passwd", "%s%n"]),
)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, -1, 1, 10**6, -(10**6)) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _RANGES:
        return _integers(*_RANGES[kind])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width, allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _strings
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), _integers(*_INT32))  # undefined too
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth <= 0:
            return st.nothing()
        one: st.SearchStrategy[Any] = messages(field.message_type, depth - 1)
    else:
        one = _scalar(field)
    if not field.is_repeated:
        return one
    return st.one_of(
        st.lists(one, max_size=6),
        st.tuples(one, st.integers(2, 4)).map(lambda t: [t[0]] * t[1]),  # duplicates
    )


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    cls = message_factory.GetMessageClass(descriptor)
    out = cls()
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # no request of the contract has a map field
        if not draw(st.booleans()):
            continue  # absent
        _set(out, field, draw(_field(field, depth)))
    return out


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Give `message`'s `field` a drawn value (a list for a repeated field)."""
    target = getattr(message, field.name)
    if field.is_repeated:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def messages(descriptor: Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with edge values in any subset of their fields."""
    return _message(descriptor, depth)


@st.composite
def _damaged(draw: st.DrawFn, good: bytes) -> bytes:
    data = bytearray(good)
    how = draw(st.sampled_from(["truncate", "flip", "insert", "wire_type", "utf8"]))
    if how == "truncate" and data:
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=8)) + bytes(data[at:])
    if how == "wire_type":  # field 1 again, as a fixed64 where it is a string or varint
        return bytes(data) + b"\x09" + draw(st.binary(min_size=8, max_size=8))
    # field 1 as a length-delimited field holding invalid UTF-8
    return b"\x0a\x03\xff\xfe\xc0" + bytes(data)


@st.composite
def _huge(draw: st.DrawFn, descriptor: Descriptor, good: bytes) -> bytes:
    """`good` with one of its repeated fields given `HUGE` more entries: one entry's
    encoding repeated (a parser appends repeated fields as they come)."""
    field = draw(st.sampled_from([f for f in descriptor.fields if f.is_repeated]))
    one = message_factory.GetMessageClass(descriptor)()
    value = draw(_field(field, 2).filter(bool))
    target = getattr(one, field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        target.add().CopyFrom(value[0])
    else:
        target.append(value[0])
    entry = one.SerializeToString()
    return good + entry * min(HUGE, MAX_HUGE_BYTES // len(entry))


MAX_HUGE_BYTES = 8 * 1024 * 1024
"""A huge field's bytes at most (below the servers' 16 MiB message limit: what is
refused is the count, not the size)."""


@st.composite
def _nearly(draw: st.DrawFn, valid: Message) -> Message:
    """`valid` with one or two of its fields set to an edge value (or cleared): what gets
    past validation often enough to reach the handler."""
    out = type(valid)()
    out.CopyFrom(valid)
    fields = list(valid.DESCRIPTOR.fields)
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
        out.ClearField(field.name)
        if draw(st.booleans()):
            continue  # cleared
        _set(out, field, draw(_field(field, 2)))
    return out


def requests(descriptor: Descriptor, valid: Message | None = None) -> st.SearchStrategy[bytes]:
    """Serialized payloads for a method whose request is `descriptor` (see the module);
    with `valid`, a well-formed request, also that request with fields changed."""
    good = messages(descriptor).map(lambda m: m.SerializeToString())
    if valid is not None:
        near = _nearly(valid).map(lambda m: m.SerializeToString())
        good = st.one_of(near, near, good)  # two thirds near a valid request
    kinds = [good, good.flatmap(_damaged), st.binary(min_size=1, max_size=512)]
    if any(f.is_repeated for f in descriptor.fields):
        kinds.append(good.flatmap(lambda g: _huge(descriptor, g)))
    return st.one_of(kinds)


ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"}
"""The answers a fuzzed request may get: never UNKNOWN, INTERNAL or a dropped call."""


MEMORY_GROWTH_MIB = 512
"""The most a server process (`tests.server_process`) may grow over one RPC's fuzzing:
room for the allocator's high-water mark after the largest requests (8 MiB on the wire,
several times that decoded), far below what keeping the refused payloads would take."""


def report(method: str, statuses: Counter[str], rss_before: float, rss_after: float) -> None:
    """Append one RPC's status counts and the server process's memory before and after
    to the file `INKLING_FUZZ_REPORT` names, if any (`make fuzz` prints it)."""
    path = os.environ.get("INKLING_FUZZ_REPORT")
    if path:
        line = {
            "method": method,
            "requests": statuses.total(),
            **statuses,
            "rss_mib_before": round(rss_before, 1),
            "rss_mib_after": round(rss_after, 1),
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
