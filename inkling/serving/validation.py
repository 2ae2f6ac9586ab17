"""Request validation driven by the rules written in the contract.

Fields in protos/inkling/v1 carry ``(inkling.v1.rules)`` options (see validate.proto).
This module reads them from the generated descriptors once per message type and
checks messages against them, so the limits live in one place: the .proto file.
A violation names the field path, e.g. ``candidates[3].item_id: must not be empty``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from inkling.errors import InvalidInputError
from inkling.v1 import validate_pb2

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_ENUM = FieldDescriptor.TYPE_ENUM
_INTEGER = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
}
MAX_REPORTED = 5


@dataclass(frozen=True)
class Violation:
    """One broken rule: the field path and what is wrong with it."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True)
class _FieldPlan:
    name: str
    repeated: bool
    kind: int
    rules: validate_pb2.FieldRules | None
    enum_values: frozenset[int]
    message: Descriptor | None
    quick: Callable[[Message], bool] | None = None
    """True when the field of a message certainly breaks no rule, decided without
    building a path or a generator (None: always take the reporting path)."""


def _quick(plan: _FieldPlan) -> Callable[[Message], bool] | None:
    """`_FieldPlan.quick` for single scalar, string, enum and well-known-type fields: the
    reporting path (`_violations_of_field`) finds nothing exactly when this is True."""
    if plan.repeated:
        return None
    name, rules = plan.name, plan.rules
    required = rules is not None and rules.required
    if plan.kind == _STRING and rules is not None:
        return lambda m: _string_ok(getattr(m, name), rules)
    if plan.kind == _ENUM:
        values = plan.enum_values
        return lambda m: (v := getattr(m, name)) in values and (v != 0 or not required)
    if plan.kind in _INTEGER and rules is not None:
        low = rules.min if rules.HasField("min") else None
        high = rules.max if rules.HasField("max") else None
        return lambda m: (
            ((v := getattr(m, name)) == 0 and not required)
            or (v != 0 and (low is None or v >= low) and (high is None or v <= high))
        )  # fmt: skip
    if plan.kind == _MESSAGE and plan.message is None:
        return (lambda m: m.HasField(name)) if required else (lambda m: True)
    return None


@cache
def _plan(descriptor: Descriptor) -> tuple[_FieldPlan, ...]:
    plans = []
    for field in descriptor.fields:
        options = field.GetOptions()
        rules = (
            options.Extensions[validate_pb2.rules]
            if options.HasExtension(validate_pb2.rules)
            else None
        )
        nested = field.message_type if field.type == _MESSAGE else None
        # Descend into our own messages only; google.protobuf types carry no rules.
        if nested is not None and not nested.full_name.startswith("inkling."):
            nested = None
        if rules is None and nested is None and field.type != _ENUM:
            continue
        enum_values = (
            frozenset(v.number for v in field.enum_type.values)
            if field.type == _ENUM
            else frozenset()
        )
        plan = _FieldPlan(
            name=field.name,
            repeated=field.is_repeated,
            kind=field.type,
            rules=rules,
            enum_values=enum_values,
            message=nested,
        )
        plans.append(replace(plan, quick=_quick(plan)))
    return tuple(plans)


def _check_string(path: str, value: str, rules: validate_pb2.FieldRules) -> Iterator[Violation]:
    if rules.max_len and len(value) > rules.max_len:
        yield Violation(path, f"longer than {rules.max_len} characters ({len(value)})")
    if rules.non_blank and value and not value.strip():
        yield Violation(path, "must not be blank")


def _check_scalar(path: str, plan: _FieldPlan, value: object, present: bool) -> Iterator[Violation]:
    rules = plan.rules
    if plan.kind == _ENUM and value not in plan.enum_values:
        yield Violation(path, f"unknown enum value {value}")
    if rules is None:
        return
    if rules.required and not present:
        yield Violation(path, "is required" if plan.kind != _STRING else "must not be empty")
        return
    if plan.kind == _STRING:
        yield from _check_string(path, str(value), rules)
    elif plan.kind in _INTEGER and present:
        number = int(value)  # type: ignore[call-overload]
        if rules.HasField("min") and number < rules.min:
            yield Violation(path, f"must be at least {rules.min} (got {number})")
        if rules.HasField("max") and number > rules.max:
            yield Violation(path, f"must be at most {rules.max} (got {number})")


def _check_repeated(path: str, plan: _FieldPlan, values: object) -> Iterator[Violation]:
    items = list(values)  # type: ignore[call-overload]
    rules = plan.rules
    if rules is not None:
        if rules.required and not items:
            yield Violation(path, "must not be empty")
            return
        if rules.max_items and len(items) > rules.max_items:
            # Do not walk a huge list element by element: the size alone is the answer.
            yield Violation(path, f"has {len(items)} elements; at most {rules.max_items} allowed")
            return
    if plan.kind == _MESSAGE and plan.message is not None:
        yield from _check_elements(path, plan.message, items)
    for i, item in enumerate(items if plan.kind != _MESSAGE else ()):
        element = f"{path}[{i}]"
        if plan.kind == _STRING and rules is not None:
            if rules.non_blank and not item.strip():
                yield Violation(element, "must not be empty or blank")
            if rules.max_len and len(item) > rules.max_len:
                yield Violation(element, f"longer than {rules.max_len} characters ({len(item)})")
        elif plan.kind == _ENUM and item not in plan.enum_values:
            yield Violation(element, f"unknown enum value {item}")
    if rules is not None and (rules.unique or rules.unique_by):
        seen: dict[object, int] = {}
        for i, item in enumerate(items):
            key = getattr(item, rules.unique_by) if rules.unique_by else item
            if key in seen:
                suffix = f".{rules.unique_by}" if rules.unique_by else ""
                yield Violation(
                    f"{path}[{i}]{suffix}", f"duplicates {path}[{seen[key]}]{suffix} ({key!r})"
                )
            else:
                seen[key] = i


def _string_ok(value: str, rules: validate_pb2.FieldRules) -> bool:
    """The common case, decided without building a violation: a sane string, or an
    empty one where the field is optional."""
    if not value:
        return not rules.required
    return (not rules.max_len or len(value) <= rules.max_len) and (
        not rules.non_blank or not value[0].isspace() or bool(value.strip())
    )


def _check_elements(path: str, descriptor: Descriptor, items: list[Message]) -> Iterator[Violation]:
    """Check a list of messages a field at a time, which keeps 1,000 candidates cheap."""
    for plan in _plan(descriptor):
        quick = plan.quick
        for i, item in enumerate(items):
            if quick is not None and quick(item):
                continue
            yield from _violations_of_field(item, plan, f"{path}[{i}]")


def _violations_of_field(message: Message, plan: _FieldPlan, prefix: str) -> Iterator[Violation]:
    path = f"{prefix}.{plan.name}" if prefix else plan.name
    value = getattr(message, plan.name)
    if plan.repeated:
        yield from _check_repeated(path, plan, value)
    elif plan.kind == _MESSAGE:
        present = message.HasField(plan.name)
        if plan.rules is not None and plan.rules.required and not present:
            yield Violation(path, "is required")
        elif present and plan.message is not None:
            yield from _violations(value, path)
    else:
        yield from _check_scalar(path, plan, value, present=bool(value))


def _violations(message: Message, prefix: str = "") -> Iterator[Violation]:
    for plan in _plan(message.DESCRIPTOR):
        if plan.quick is not None and plan.quick(message):
            continue
        yield from _violations_of_field(message, plan, prefix)


def violations(message: Message) -> list[Violation]:
    """Every rule the message breaks, in field order."""
    return list(_violations(message))


def validate(message: Message) -> None:
    """Raise InvalidInputError naming the broken rules (the first few) if there are any."""
    found = violations(message)
    if found:
        shown = "; ".join(str(v) for v in found[:MAX_REPORTED])
        more = f" (and {len(found) - MAX_REPORTED} more)" if len(found) > MAX_REPORTED else ""
        raise InvalidInputError(
            f"invalid {message.DESCRIPTOR.name}: {shown}{more}", field=found[0].field
        )
