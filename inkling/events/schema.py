"""The event schema (version 2) and its validation.

One row is one thing a user did. The event log (``inkling.events.eventlog``) stores these
rows as Parquet partitioned by UTC date; every feature is recomputed from it.

| column         | type                | rule                                                      |
| -------------- | ------------------- | --------------------------------------------------------- |
| `event_id`     | string              | required, unique across the whole log                     |
| `user_id`      | string              | optional: absent for anonymous sessions                   |
| `session_id`   | string              | required                                                  |
| `item_id`      | string              | required for item events, absent for `page_view`          |
| `event_type`   | string              | one of `EVENT_TYPES`                                      |
| `timestamp`    | timestamp[us, UTC]  | required, 1990-01-01 <= t < 2100-01-01                    |
| `dwell_ms`     | int64               | optional, 0 <= x <= 24 h                                  |
| `scroll_depth` | float64             | optional, 0 <= x <= 1                                     |
| `device`       | string              | optional (`desktop`, `mobile`, `tablet`, free text)       |
| `surface`      | string              | optional (`home`, `search`, `pdp`, `cart`, free text)     |
| `position`     | int32               | optional, >= 0: the slot an item was shown in             |
| `request_id`   | string              | optional: the answer the item was shown in (version 2)    |

Version 2 added `request_id` (a `Recommend` / `RankCandidates` answer's id). Logs
written as version 1 lack the column; `EventLog` reads them with it null.

Meaning of the event types: `page_view` a page load with no item; `item_view` an
item was shown to the user (an impression) at `position`; `click` the user opened
the item; `add_to_cart`; `purchase`. Implicit-feedback imports (ratings, item page
views) are recorded as `click`.

Validation never drops a row silently: every rejected row comes back with the
reason, and callers report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EVENT_SCHEMA_VERSION = 2

EVENT_TYPES: tuple[str, ...] = ("page_view", "item_view", "click", "add_to_cart", "purchase")
ITEM_EVENT_TYPES: tuple[str, ...] = EVENT_TYPES[1:]
# Event types that say the user chose an item (as opposed to being shown one).
INTERACTION_TYPES: tuple[str, ...] = ("click", "add_to_cart", "purchase")

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
MIN_TIMESTAMP = np.datetime64("1990-01-01T00:00:00", "us")
MAX_TIMESTAMP = np.datetime64("2100-01-01T00:00:00", "us")
MAX_DWELL_MS = 24 * 3600 * 1000
MAX_ID_LENGTH = 256

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string()),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", TIMESTAMP_TYPE, nullable=False),
        pa.field("dwell_ms", pa.int64()),
        pa.field("scroll_depth", pa.float64()),
        pa.field("device", pa.string()),
        pa.field("surface", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("request_id", pa.string()),
    ],
    metadata={b"inkling.event_schema_version": str(EVENT_SCHEMA_VERSION).encode()},
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("price", pa.float64()),
        pa.field("created_at", TIMESTAMP_TYPE),
        pa.field("title", pa.string()),
        pa.field("in_stock", pa.bool_(), nullable=False),
        pa.field("blocked", pa.bool_(), nullable=False),
    ]
)
"""Item attributes. `category` is `unknown` when the source has none; `blocked` items
(withdrawn, under review) are never recommended, whatever their stock."""

UNKNOWN_CATEGORY = "unknown"


REASON_SEPARATOR = "; "
"""Between the reasons of a row that fails several rules (`validate(every_reason=True)`)."""


@dataclass(frozen=True)
class BadRow:
    """A rejected input row: where it came from and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class ValidationResult:
    """Rows that passed, and every row that did not, with its reason."""

    valid: pa.Table
    rejected: list[BadRow]


def conform(table: pa.Table) -> pa.Table:
    """Select and cast the schema's columns, adding absent optional ones as nulls.

    Raises:
        ValueError: a required column is missing or a column cannot be cast.
    """
    columns = []
    for field in EVENT_SCHEMA:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                column = column.cast(field.type)
            columns.append(column)
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"required column {field.name!r} is missing")
    # Keep required fields declared non-nullable only after validation removed nulls.
    loose = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA], metadata=EVENT_SCHEMA.metadata)
    return pa.Table.from_arrays(columns, schema=loose)


def validate(
    table: pa.Table,
    lines: Sequence[int] | np.ndarray | None = None,
    every_reason: bool = False,
) -> ValidationResult:
    """Check every row of a conformed event table against the schema's rules.

    Args:
        table: rows with the event schema's columns (see `conform`).
        lines: the source line of each row, for the report; defaults to 1-based row numbers.
        every_reason: name every rule a row fails, joined by "; " (imports report them
            all); by default the first failing rule is the reason, as `row_problem` gives.

    Returns:
        The valid rows (with the strict schema) and one `BadRow` per rejected row.
        Duplicate `event_id`s within the table keep their first occurrence.
    """
    n = table.num_rows
    line_numbers = np.arange(1, n + 1) if lines is None else np.asarray(lines)
    if len(line_numbers) != n:
        raise ValueError(f"lines has {len(line_numbers)} entries for {n} rows")
    reason = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, why: str) -> None:
        fresh = mask & (reason == "")
        reason[fresh] = why
        if every_reason:
            more = mask & ~fresh
            reason[more] = reason[more] + REASON_SEPARATOR + why

    def is_null(name: str) -> np.ndarray:
        return np.asarray(pc.is_null(table.column(name)).to_numpy(zero_copy_only=False))

    def bad_id(name: str) -> np.ndarray:
        col = table.column(name)
        length = pc.fill_null(pc.utf8_length(col), 1)
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), False)
        return np.asarray(pc.or_(pc.greater(length, MAX_ID_LENGTH), blank).to_numpy())

    for name in ("event_id", "session_id", "event_type", "timestamp"):
        reject(is_null(name), f"{name} is missing")
    for name in ("event_id", "session_id", "user_id", "item_id", "request_id"):
        reject(bad_id(name), f"{name} is empty or longer than {MAX_ID_LENGTH} characters")

    event_type = table.column("event_type")
    known = pc.fill_null(pc.is_in(event_type, value_set=pa.array(EVENT_TYPES)), True)
    reject(~np.asarray(known.to_numpy()), f"event_type is not one of {', '.join(EVENT_TYPES)}")

    needs_item = np.asarray(
        pc.fill_null(pc.is_in(event_type, value_set=pa.array(ITEM_EVENT_TYPES)), False).to_numpy()
    )
    has_item = ~is_null("item_id")
    reject(needs_item & ~has_item, "item_id is missing for an item event")
    is_page = np.asarray(pc.fill_null(pc.equal(event_type, "page_view"), False).to_numpy())
    reject(is_page & has_item, "item_id must be absent for a page_view")

    ts = table.column("timestamp").cast(pa.timestamp("us", tz="UTC"))
    ts_np = ts.to_numpy(zero_copy_only=False).astype("datetime64[us]")
    valid_ts = ~np.isnat(ts_np)
    out_of_range = valid_ts & ((ts_np < MIN_TIMESTAMP) | (ts_np >= MAX_TIMESTAMP))
    reject(out_of_range, "timestamp is outside 1990-01-01 .. 2100-01-01")

    def out_of(name: str, low: float, high: float) -> np.ndarray:
        col = table.column(name)
        nan = pc.fill_null(pc.is_nan(col), False) if pa.types.is_floating(col.type) else None
        outside = pc.fill_null(pc.or_(pc.less(col, low), pc.greater(col, high)), False)
        mask = np.asarray(outside.to_numpy())
        if nan is not None:
            mask |= np.asarray(nan.to_numpy())
        return mask

    reject(out_of("dwell_ms", 0, MAX_DWELL_MS), f"dwell_ms is outside 0 .. {MAX_DWELL_MS}")
    reject(out_of("scroll_depth", 0.0, 1.0), "scroll_depth is outside 0 .. 1")
    reject(out_of("position", 0, 2**31 - 1), "position is negative")

    ids = table.column("event_id").to_numpy(zero_copy_only=False)
    still_ok = reason == ""
    _, first_index = np.unique(ids[still_ok].astype(str), return_index=True)
    keep_ok = np.zeros(int(still_ok.sum()), dtype=bool)
    keep_ok[first_index] = True
    duplicate = np.zeros(n, dtype=bool)
    duplicate[np.flatnonzero(still_ok)[~keep_ok]] = True
    reject(duplicate, "duplicate event_id")

    ok = reason == ""
    rejected = [BadRow(int(line_numbers[i]), str(reason[i])) for i in np.flatnonzero(~ok)]
    valid = table.filter(pa.array(ok)).cast(EVENT_SCHEMA)
    return ValidationResult(valid=valid, rejected=rejected)


_EPOCH = np.datetime64(0, "us")
_MIN_TS_US = int((MIN_TIMESTAMP - _EPOCH).astype(np.int64))
_MAX_TS_US = int((MAX_TIMESTAMP - _EPOCH).astype(np.int64))
_ID_REASON = f"is empty or longer than {MAX_ID_LENGTH} characters"
_TYPE_REASON = f"event_type is not one of {', '.join(EVENT_TYPES)}"


def row_problem(
    event_id: str | None,
    session_id: str | None,
    event_type: str | None,
    ts_us: int | None,
    user_id: str | None = None,
    item_id: str | None = None,
    dwell_ms: int | None = None,
    scroll_depth: float | None = None,
    position: int | None = None,
    request_id: str | None = None,
) -> str | None:
    """The reason `validate` rejects one row for, or None when it passes: the same rules
    in the same order (the first failing one is the reason), for one row in Python.
    Duplicate ids are the caller's to check. `ts_us` is microseconds since the epoch.

    For a stream of small batches: `validate` costs about a millisecond per call in Arrow
    kernel dispatch however few its rows are, this a few microseconds per row. A test
    holds the two to the same answers.
    """
    for name, value in (
        ("event_id", event_id),
        ("session_id", session_id),
        ("event_type", event_type),
        ("timestamp", ts_us),
    ):
        if value is None:
            return f"{name} is missing"
    for name, text in (
        ("event_id", event_id),
        ("session_id", session_id),
        ("user_id", user_id),
        ("item_id", item_id),
        ("request_id", request_id),
    ):
        if text is not None and (len(text) > MAX_ID_LENGTH or not text.strip()):
            return f"{name} {_ID_REASON}"
    if event_type not in EVENT_TYPES:
        return _TYPE_REASON
    if item_id is None and event_type in ITEM_EVENT_TYPES:
        return "item_id is missing for an item event"
    if item_id is not None and event_type == "page_view":
        return "item_id must be absent for a page_view"
    assert ts_us is not None
    if not _MIN_TS_US <= ts_us < _MAX_TS_US:
        return "timestamp is outside 1990-01-01 .. 2100-01-01"
    if dwell_ms is not None and not 0 <= dwell_ms <= MAX_DWELL_MS:
        return f"dwell_ms is outside 0 .. {MAX_DWELL_MS}"
    if scroll_depth is not None and not 0.0 <= scroll_depth <= 1.0:  # NaN fails too
        return "scroll_depth is outside 0 .. 1"
    if position is not None and not 0 <= position <= 2**31 - 1:
        return "position is negative"
    return None
