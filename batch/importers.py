"""Real data into the event log and the item/user attribute tables.

Formats (`inkling import --format ...`):

``recbole``
    RecBole atomic files: ``<name>.inter`` (tab separated, header of ``field:type``
    tokens; needs ``user_id`` and ``item_id``, uses ``timestamp`` when present), and
    beside it, when present, ``<name>.item`` (``item_id``; category from the first
    token of ``class``/``genre``/``category``; title from ``*title``; ``price``) and
    ``<name>.user`` (every column kept as a string attribute).
``sasrec``
    One ``user item`` pair per line (whitespace separated), in time order per user,
    no timestamps. Line k (1-based) gets the time 2020-01-01T00:00:00Z + k seconds,
    which keeps each user's order and makes the data reproducible.
``diginetica``
    ``session_id;user_id;item_id;timeframe;eventdate`` with a header. ``NA`` users
    are anonymous; the time is ``eventdate`` (UTC midnight) + ``timeframe`` ms.
``csv`` / ``parquet``
    A generic table. Columns named like the event schema are used as they are;
    ``--map field=column`` renames others. ``timestamp`` is read per
    ``--timestamp-unit`` (``s``, ``ms``, ``us`` since the epoch, or ``iso`` text); without
    it the form is detected from the column (`read_timestamps`) and reported, and a
    column mixing forms is refused with the lines of each. ``event_type`` defaults to
    ``--event-type`` (``click``); a missing ``session_id`` is derived; a missing
    ``event_id`` is ``<file stem>:<line>``.

Every interaction of implicit-feedback data (ratings, item page views) becomes a
``click``. When a format has no sessions, a user's events are split into sessions
at gaps of more than 30 minutes (``<user>-<n>``). Event ids are derived from the
file name and line, so importing the same file twice appends nothing.

Bad rows (wrong field count, empty ids, unparsable times, ...) are counted and
reported with line numbers and every reason each fails for; they are never dropped
silently. A file that cannot be read at all (missing, empty, not UTF-8, no header, no
rows, required columns absent, a timestamp column of mixed forms) raises
`InvalidInputError` before anything is written. The report counts the distinct users,
sessions and items of the events appended, apart from the catalogue's size and the
user profile rows (RecBole's ``.user``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import (
    ITEM_SCHEMA,
    REASON_SEPARATOR,
    TIMESTAMP_TYPE,
    UNKNOWN_CATEGORY,
    BadRow,
    conform,
    validate,
)

FORMATS = ("recbole", "sasrec", "diginetica", "csv", "parquet")
SESSION_GAP_S = 30 * 60
SASREC_EPOCH = np.datetime64("2020-01-01T00:00:00", "us")
SYNTHETIC_TIMES = "none in the file: line k is 2020-01-01T00:00:00Z + k seconds"


@dataclass
class ImportReport:
    """What an import read, wrote and refused."""

    source: str
    format: str
    rows_read: int = 0
    events_appended: int = 0
    users: int = 0
    """Distinct users among the events appended."""
    sessions: int = 0
    """Distinct sessions among the events appended."""
    items: int = 0
    """Distinct items among the events appended."""
    catalog_items: int = 0
    """Rows of the item catalogue after the import (every item ever imported)."""
    user_profiles: int | None = None
    """Rows of the user attribute table after the import; None when the format has no
    user file (only RecBole's `.user`)."""
    timestamps: str = ""
    """How the times were read: the form detected or chosen, or how they were made up."""
    rejected: list[BadRow] = field(default_factory=list)

    def reasons(self) -> Counter[str]:
        """Rows per reason; a row that fails for several counts once under each."""
        return Counter(why for bad in self.rejected for why in bad.reason.split(REASON_SEPARATOR))

    def summary(self, examples: int = 5) -> str:
        lines = [
            f"{self.format} import of {self.source}: {self.rows_read} rows read, "
            f"{self.events_appended} events appended ({self.users} users, {self.sessions} "
            f"sessions, {self.items} items), {len(self.rejected)} rejected",
            f"  timestamps: {self.timestamps}",
        ]
        catalogue = f"  catalogue: {self.catalog_items} items"
        if self.user_profiles is not None:
            catalogue += f", {self.user_profiles} user profile rows"
        lines.append(catalogue)
        for reason, count in self.reasons().most_common():
            where = [
                str(b.line) for b in self.rejected if reason in b.reason.split(REASON_SEPARATOR)
            ][:examples]
            lines.append(
                f"  {count} x {reason} (lines {', '.join(where)}{', ...' if count > examples else ''})"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "format": self.format,
            "rows_read": self.rows_read,
            "events_appended": self.events_appended,
            "users": self.users,
            "sessions": self.sessions,
            "items": self.items,
            "catalog_items": self.catalog_items,
            "user_profiles": self.user_profiles,
            "timestamps": self.timestamps,
            "rejected": [{"line": b.line, "reason": b.reason} for b in self.rejected],
        }


@dataclass(frozen=True)
class Parsed:
    """Rows parsed from a source: columns of equal length and each row's line number."""

    columns: dict[str, np.ndarray]
    lines: np.ndarray
    rejected: list[BadRow]


# --- reading text ---------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInputError(f"{path} is not UTF-8 text (bad byte at line {line})") from e


def read_delimited(
    path: Path, sep: str | None, names: list[str] | None = None, header: bool = True
) -> Parsed:
    """Split a text file into string columns, one bad row per line of the wrong width.

    Args:
        sep: the field separator; None splits on runs of whitespace.
        names: column names when the file has no header.
        header: whether line 1 names the columns.
    """
    text = _read_text(path)
    if not text.strip():
        raise InvalidInputError(f"{path} is empty")
    raw_lines = text.splitlines()
    if header:
        if not raw_lines or not raw_lines[0].strip():
            raise InvalidInputError(f"{path} is empty or has no header line")
        names = [h.strip() for h in (raw_lines[0].split(sep) if sep else raw_lines[0].split())]
        first = 2
        body = raw_lines[1:]
    else:
        if names is None:
            raise ValueError("names are needed when there is no header")
        first = 1
        body = raw_lines
    width = len(names)
    good_lines: list[int] = []
    rows: list[list[str]] = []
    rejected: list[BadRow] = []
    for offset, line in enumerate(body):
        number = first + offset
        if not line.strip():
            continue  # blank lines carry nothing; a trailing newline is not an error
        fields = line.split(sep) if sep else line.split()
        if len(fields) != width:
            rejected.append(BadRow(number, f"expected {width} fields, found {len(fields)}"))
            continue
        rows.append(fields)
        good_lines.append(number)
    matrix = np.array(rows, dtype=object).reshape(len(rows), width)
    columns = {name: matrix[:, i] for i, name in enumerate(names)}
    return Parsed(columns, np.array(good_lines, dtype=np.int64), rejected)


def _strip_types(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """RecBole headers say `name:type`; keep the name."""
    return {name.split(":", 1)[0]: values for name, values in columns.items()}


# --- building events --------------------------------------------------------------------------------


class _Rows:
    """Columns being turned into events, with a per-row rejection reason."""

    def __init__(self, parsed: Parsed) -> None:
        self.columns = parsed.columns
        self.lines = parsed.lines
        self.rejected = list(parsed.rejected)
        self.unparsed = len(parsed.rejected)
        """Lines rejected before any column was read (wrong field count)."""
        self.reason = np.full(len(parsed.lines), "", dtype=object)
        self.timestamps = ""
        """How the times were read, for the report."""

    def __len__(self) -> int:
        return len(self.lines)

    def reject(self, mask: np.ndarray, why: str) -> None:
        """Add `why` to the rows of `mask`, unless a row already has a reason about the
        same field (its first word): a row's report names each thing wrong with it once."""
        for i in np.flatnonzero(mask):
            self.reason[i] = add_reason(str(self.reason[i]), why)

    def require(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise InvalidInputError(
                f"required column {name!r} is missing (have: {', '.join(self.columns)})"
            )
        return self.columns[name]

    def strings(self, name: str, na: tuple[str, ...] = ("",)) -> np.ndarray:
        """A column as trimmed strings, None where missing or an NA token."""
        values = np.array(
            [None if v is None else str(v).strip() for v in self.require(name)], dtype=object
        )
        missing = np.array([v is None or v in na for v in values], dtype=bool)
        values[missing] = None
        return values

    def numbers(self, name: str) -> np.ndarray:
        """A column as float64; unparsable entries become NaN and reject their row."""
        raw = self.require(name)
        out = np.full(len(raw), np.nan)
        bad = np.zeros(len(raw), dtype=bool)
        for i, v in enumerate(raw):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                bad[i] = True
        bad |= ~np.isfinite(out)
        self.reject(bad, f"{name} is not a number")
        return out


def add_reason(reasons: str, why: str) -> str:
    """`reasons` ("; "-joined) with `why` added, unless it names a field already named."""
    if not reasons:
        return why
    field = why.split(" ", 1)[0]
    if any(r.split(" ", 1)[0] == field for r in reasons.split(REASON_SEPARATOR)):
        return reasons
    return reasons + REASON_SEPARATOR + why


def _epoch_to_us(seconds: np.ndarray, scale: float) -> np.ndarray:
    """Epoch numbers as datetimes; NaN and values past int64 microseconds come out as
    meaningless times, which the rows' time checks reject (not a warning per file)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (np.round(seconds * scale)).astype(np.int64).astype("datetime64[us]")


def sessionize(users: np.ndarray, times: np.ndarray, gap_s: int = SESSION_GAP_S) -> np.ndarray:
    """Session ids `<user>-<n>`: a new session after `gap_s` of inactivity."""
    n = len(users)
    if n == 0:
        return np.array([], dtype=object)
    keys = np.array(["" if u is None else str(u) for u in users], dtype=object)
    order = np.lexsort((times.astype(np.int64), keys))
    k, t = keys[order], times[order].astype(np.int64)
    new_user = np.concatenate([[True], k[1:] != k[:-1]])
    gap = np.concatenate([[True], (t[1:] - t[:-1]) > gap_s * 1_000_000])
    starts = new_user | gap
    session_no = np.cumsum(starts)
    first_of_user = np.maximum.accumulate(np.where(new_user, session_no, 0))
    within = session_no - first_of_user + 1
    out = np.empty(n, dtype=object)
    out[order] = [f"{u}-{w}" for u, w in zip(k, within, strict=True)]
    return out


def _events(
    rows: _Rows,
    user: np.ndarray,
    item: np.ndarray,
    time_us: np.ndarray,
    event_ids: np.ndarray,
    session: np.ndarray | None = None,
    event_type: np.ndarray | str = "click",
    extra: Mapping[str, np.ndarray] | None = None,
) -> tuple[pa.Table, np.ndarray]:
    """Rows → a validated event table; every rejection lands in `rows.rejected`, with
    every reason its row fails for (the importer's checks, then the schema's rules)."""
    rows.reject(np.array([v is None for v in item], dtype=bool), "item_id is missing")
    rows.reject(np.isnat(time_us), "timestamp is missing or unparsable")
    if session is None:
        # Sessions are derived per user, so a row with neither cannot be placed in one.
        anonymous = np.array([u is None for u in user], dtype=bool)
        rows.reject(anonymous, "user_id is missing and there is no session_id column")
    ok = rows.reason == ""
    n_all = len(rows)
    types_all = (
        np.full(n_all, event_type, dtype=object) if isinstance(event_type, str) else event_type
    )
    if session is None:
        # Derived from the good rows only, so a bad row never shifts a good one's number.
        session = np.full(n_all, "unplaced", dtype=object)
        session[ok] = sessionize(user[ok], time_us[ok])

    def table(mask: np.ndarray) -> pa.Table:
        times = time_us[mask].astype("datetime64[us]")
        data: dict[str, pa.Array] = {
            "event_id": pa.array(event_ids[mask], type=pa.string()),
            "user_id": pa.array(user[mask], type=pa.string()),
            "session_id": pa.array(session[mask], type=pa.string()),
            "item_id": pa.array(item[mask], type=pa.string()),
            "event_type": pa.array(types_all[mask], type=pa.string()),
            "timestamp": pa.array(times, mask=np.isnat(times)).cast(TIMESTAMP_TYPE),
        }
        for name, values in (extra or {}).items():
            data[name] = pa.array(values[mask])
        return conform(pa.table(data))

    bad = np.flatnonzero(~ok)
    if len(bad):
        # The schema's rules on the rows the importer refused, for their other reasons;
        # the importer's reasons come first and win per field.
        checked = validate(table(~ok), np.arange(len(bad)), every_reason=True)
        for b in checked.rejected:
            for why in b.reason.split(REASON_SEPARATOR):
                if why != "duplicate event_id":
                    rows.reason[bad[b.line]] = add_reason(str(rows.reason[bad[b.line]]), why)
        for i in bad:
            rows.rejected.append(BadRow(int(rows.lines[i]), str(rows.reason[i])))
    lines = rows.lines[ok]
    result = validate(table(ok), lines, every_reason=True)
    rows.rejected.extend(result.rejected)
    refused = np.array([b.line for b in result.rejected], dtype=np.int64)
    return result.valid, lines[~np.isin(lines, refused)]  # one line per valid row


def _line_ids(stem: str, lines: np.ndarray) -> np.ndarray:
    return np.array([f"{stem}:{n}" for n in lines], dtype=object)


# --- formats ---------------------------------------------------------------------------------------


def _recbole(path: Path) -> tuple[pa.Table, np.ndarray, _Rows, pa.Table | None, pa.Table | None]:
    rows = _Rows(_with_columns(read_delimited(path, "\t"), _strip_types))
    user = rows.strings("user_id")
    item = rows.strings("item_id")
    rows.reject(np.array([u is None for u in user], dtype=bool), "user_id is missing")
    if "timestamp" in rows.columns:
        time_us = _epoch_to_us(rows.numbers("timestamp"), 1e6)
        rows.timestamps = "epoch seconds (RecBole's timestamp field)"
    else:
        time_us = SASREC_EPOCH + rows.lines.astype("timedelta64[s]")
        rows.timestamps = SYNTHETIC_TIMES
    events, lines = _events(rows, user, item, time_us, _line_ids(path.stem, rows.lines))
    item_file, user_file = path.with_suffix(".item"), path.with_suffix(".user")
    items = _recbole_items(item_file) if item_file.exists() else None
    users = _recbole_users(user_file) if user_file.exists() else None
    return events, lines, rows, items, users


def _with_columns(
    parsed: Parsed, fn: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
) -> Parsed:
    return Parsed(fn(parsed.columns), parsed.lines, parsed.rejected)


def _recbole_items(path: Path) -> pa.Table:
    parsed = _with_columns(read_delimited(path, "\t"), _strip_types)
    cols = parsed.columns
    if "item_id" not in cols:
        raise InvalidInputError(f"{path} has no item_id column")
    ids = np.array([str(v).strip() for v in cols["item_id"]], dtype=object)
    cat_col = next((c for c in ("category", "class", "genre", "genres") if c in cols), None)
    categories = (
        np.array([(str(v).split() or [UNKNOWN_CATEGORY])[0] for v in cols[cat_col]], dtype=object)
        if cat_col
        else np.full(len(ids), UNKNOWN_CATEGORY, dtype=object)
    )
    title_col = next((c for c in cols if c.endswith("title")), None)
    price = np.full(len(ids), np.nan)
    if "price" in cols:
        for i, v in enumerate(cols["price"]):
            try:
                price[i] = float(v)
            except ValueError:
                price[i] = np.nan
    return _items_table(ids, categories, price, cols[title_col] if title_col else None)


def _items_table(
    ids: np.ndarray,
    categories: np.ndarray,
    price: np.ndarray | None = None,
    titles: np.ndarray | None = None,
) -> pa.Table:
    n = len(ids)
    price_arr = (
        pa.nulls(n, pa.float64()) if price is None else pa.array(price, mask=np.isnan(price))
    )
    table = pa.Table.from_arrays(
        [
            pa.array(ids, type=pa.string()),
            pa.array(categories, type=pa.string()),
            price_arr,
            pa.nulls(n, TIMESTAMP_TYPE),
            pa.nulls(n, pa.string()) if titles is None else pa.array(titles, type=pa.string()),
            pa.array(np.ones(n, dtype=bool)),
            pa.array(np.zeros(n, dtype=bool)),
        ],
        schema=ITEM_SCHEMA,
    )
    # One row per id: the last definition wins.
    _, last = np.unique(np.asarray(ids, dtype=str)[::-1], return_index=True)
    return table.take(pa.array(np.sort(n - 1 - last)))


def _recbole_users(path: Path) -> pa.Table:
    parsed = _with_columns(read_delimited(path, "\t"), _strip_types)
    if "user_id" not in parsed.columns:
        raise InvalidInputError(f"{path} has no user_id column")
    return pa.table(
        {
            name: pa.array([str(v).strip() for v in values])
            for name, values in parsed.columns.items()
        }
    )


def _sasrec(path: Path) -> tuple[pa.Table, np.ndarray, _Rows]:
    rows = _Rows(read_delimited(path, None, names=["user_id", "item_id"], header=False))
    user, item = rows.strings("user_id"), rows.strings("item_id")
    time_us = SASREC_EPOCH + rows.lines.astype("timedelta64[s]")
    rows.timestamps = SYNTHETIC_TIMES
    events, lines = _events(rows, user, item, time_us, _line_ids(path.stem, rows.lines))
    return events, lines, rows


def _diginetica(path: Path) -> tuple[pa.Table, np.ndarray, _Rows]:
    rows = _Rows(read_delimited(path, ";"))
    session = rows.strings("session_id")
    rows.reject(np.array([s is None for s in session], dtype=bool), "session_id is missing")
    user = rows.strings("user_id", na=("", "NA"))
    item = rows.strings("item_id")
    frame_ms = rows.numbers("timeframe")
    days = np.array([_parse_date(v) for v in rows.require("eventdate")], dtype="datetime64[us]")
    rows.reject(np.isnat(days), "eventdate is not a YYYY-MM-DD date")
    rows.reject(frame_ms < 0, "timeframe is negative")
    frame = np.where(np.isfinite(frame_ms), frame_ms, 0).astype(np.int64) * 1000
    time_us = days + frame.astype("timedelta64[us]")
    rows.timestamps = "eventdate (UTC midnight) + timeframe milliseconds"
    events, lines = _events(
        rows, user, item, time_us, _line_ids(path.stem, rows.lines), session=session
    )
    return events, lines, rows


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _parse_date(value: object) -> np.datetime64:
    text = str(value).strip()
    if not _DATE.match(text):
        return np.datetime64("NaT", "us")
    try:
        return np.datetime64(text, "us")
    except ValueError:
        return np.datetime64("NaT", "us")


TIMESTAMP_UNITS = {"s": 1e6, "ms": 1e3, "us": 1.0}
"""`--timestamp-unit` for numbers: microseconds per unit (`iso` reads ISO-8601 text)."""
TIMESTAMP_UNIT_CHOICES = (*TIMESTAMP_UNITS, "iso")

FORM_NAMES = {
    "s": "epoch seconds",
    "ms": "epoch milliseconds",
    "us": "epoch microseconds",
    "iso_zone": "ISO-8601 with a zone",
    "iso_naive": "ISO-8601 without a zone",
    "native": "Parquet timestamps",
}
"""The forms a timestamp column can be detected as."""

_NUMBER_FORMS = (("s", 1e11), ("ms", 1e14), ("us", 1e17))
"""A number's form by its size: below 1e11 it is seconds (up to the year 5138), below
1e14 milliseconds, below 1e17 microseconds; anything larger is refused."""

_ISO_TEXT = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?"
    r"(?P<zone>\s*(?:Z|[+-]\d{2}(?::?\d{2})?))?$",
    re.IGNORECASE,
)


@dataclass
class _Stamps:
    """A timestamp column read value by value: each one's form and how it reads."""

    form: np.ndarray
    """`s`/`ms`/`us`/`iso_zone`/`iso_naive`/`native`, or `missing`/`bad`/`huge`."""
    number: np.ndarray
    """The value as a number where it is one, else NaN."""
    us: np.ndarray
    """Microseconds since the epoch for ISO text and native timestamps, else 0."""


def _read_stamps(raw: np.ndarray) -> _Stamps:
    n = len(raw)
    form = np.full(n, "bad", dtype=object)
    number = np.full(n, np.nan)
    us = np.zeros(n, dtype=np.int64)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for i, v in enumerate(raw):
        if isinstance(v, datetime):
            aware = v if v.tzinfo else v.replace(tzinfo=UTC)
            form[i], us[i] = "native", (aware - epoch) // timedelta(microseconds=1)
            continue
        if v is None or isinstance(v, bool):
            form[i] = "missing" if v is None else "bad"
            continue
        text = str(v).strip()
        if not text:
            form[i] = "missing"
            continue
        try:
            x = float(text)
        except ValueError:
            x = None
        if x is not None:
            if np.isfinite(x):
                number[i] = x
                form[i] = next((f for f, limit in _NUMBER_FORMS if abs(x) < limit), "huge")
            continue
        match = _ISO_TEXT.match(text)
        if match is None:
            continue
        try:
            stamp = datetime.fromisoformat(text.replace(",", ".").replace(" Z", "Z"))
        except ValueError:
            continue  # the shape of a date but not a real one (month 13, ...)
        zoned = stamp.tzinfo is not None
        stamp = stamp if zoned else stamp.replace(tzinfo=UTC)
        form[i] = "iso_zone" if zoned else "iso_naive"
        us[i] = (stamp - epoch) // timedelta(microseconds=1)
    return _Stamps(form, number, us)


def _lines_text(lines: np.ndarray, most: int) -> str:
    shown = ", ".join(str(x) for x in lines[:most])
    return f"line{'s' if len(lines) > 1 else ''} {shown}{', ...' if len(lines) > most else ''}"


def read_timestamps(rows: _Rows, unit: str | None) -> tuple[np.ndarray, str]:
    """The `timestamp` column as datetimes (NaT where a row is rejected) and what it was
    read as. With `unit` None the form is detected from the values: epoch seconds,
    milliseconds or microseconds by size, ISO-8601 text with or without a zone (without
    one it is UTC), or the Parquet file's own timestamps. A column that mixes forms is
    refused, naming the lines of each, rather than guessed at.
    """
    if unit is not None and unit not in TIMESTAMP_UNIT_CHOICES:
        raise InvalidInputError(
            f"--timestamp-unit must be one of {', '.join(TIMESTAMP_UNIT_CHOICES)}; got {unit!r}"
        )
    stamps = _read_stamps(rows.require("timestamp"))
    form = stamps.form
    rows.reject(form == "missing", "timestamp is missing")
    if unit is None:
        rows.reject(form == "bad", "timestamp is not a number or an ISO-8601 time")
        rows.reject(
            form == "huge", "timestamp is too large for epoch seconds, milliseconds or microseconds"
        )
        found = Counter(f for f in form if f in FORM_NAMES)
        if len(found) > 1:
            parts = []
            for rank, (f, count) in enumerate(found.most_common()):
                where = rows.lines[form == f]
                parts.append(
                    f"{FORM_NAMES[f]} on {count} row{'s' if count > 1 else ''} "
                    f"({_lines_text(where, 3 if rank == 0 else 10)})"
                )
            raise InvalidInputError(
                f"the timestamp column mixes forms, so none is guessed: {'; '.join(parts)}. "
                "Write it in one form, or choose one with --timestamp-unit "
                f"({', '.join(TIMESTAMP_UNIT_CHOICES)}; ISO-8601 without a zone is read as "
                "UTC): the rows that do not fit it are then rejected with their lines",
                field="timestamp",
            )
        chosen = next(iter(found), None)
        how = "no readable value" if chosen is None else f"{FORM_NAMES[chosen]}"
        how += " (detected; --timestamp-unit overrides)"
    else:
        chosen = unit
        how = f"{FORM_NAMES.get(unit, 'ISO-8601')} (--timestamp-unit {unit})"
        if unit == "iso":
            rows.reject(
                ~np.isin(form, ["iso_zone", "iso_naive", "native", "missing"]),
                "timestamp is not ISO-8601 text",
            )
        else:
            is_number = np.isin(form, ["s", "ms", "us", "huge"])
            looks_iso = np.isin(form, ["iso_zone", "iso_naive"])
            rows.reject(
                looks_iso, "timestamp is not a number (it is ISO-8601: --timestamp-unit iso)"
            )
            rows.reject(~is_number & ~looks_iso & (form != "missing") & (form != "native"),
                        "timestamp is not a number")  # fmt: skip
    out = np.full(len(form), np.datetime64("NaT"), dtype="datetime64[us]")
    text_like = np.isin(form, ["iso_zone", "iso_naive", "native"])
    if chosen in TIMESTAMP_UNITS:
        numeric = np.isfinite(stamps.number)
        out[numeric] = _epoch_to_us(stamps.number[numeric], TIMESTAMP_UNITS[chosen])
        out[form == "native"] = stamps.us[form == "native"].astype("datetime64[us]")
    elif chosen is not None:
        out[text_like] = stamps.us[text_like].astype("datetime64[us]")
    return out, how


def _generic(
    path: Path,
    kind: str,
    mapping: Mapping[str, str],
    timestamp_unit: str | None,
    event_type: str,
    sep: str,
) -> tuple[pa.Table, np.ndarray, _Rows]:
    if kind == "parquet":
        if not path.exists():
            raise NotFoundError(f"{path} does not exist")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InvalidInputError(f"{path} is not a readable Parquet file: {e}") from e
        columns = {
            name: np.asarray(table.column(name).to_pylist(), dtype=object)
            for name in table.column_names
        }
        parsed = Parsed(columns, np.arange(1, table.num_rows + 1), [])
    else:
        parsed = read_delimited(path, sep)
    unknown = sorted(set(mapping) - {"event_id", "user_id", "session_id", "item_id", "event_type", "timestamp",
                                      "dwell_ms", "scroll_depth", "device", "surface", "position",
                                      "request_id"})  # fmt: skip
    if unknown:
        raise InvalidInputError(f"--map names unknown event fields: {', '.join(unknown)}")
    missing_cols = sorted(set(mapping.values()) - set(parsed.columns))
    if missing_cols:
        raise InvalidInputError(f"{path} has no column(s) {', '.join(missing_cols)} named in --map")
    renamed = dict(parsed.columns)
    for target, source in mapping.items():
        renamed[target] = parsed.columns[source]
    rows = _Rows(Parsed(renamed, parsed.lines, parsed.rejected))
    user = (
        rows.strings("user_id") if "user_id" in renamed else np.full(len(rows), None, dtype=object)
    )
    item = rows.strings("item_id")
    time_us, rows.timestamps = read_timestamps(rows, timestamp_unit)
    session = rows.strings("session_id") if "session_id" in renamed else None
    types = rows.strings("event_type") if "event_type" in renamed else event_type
    ids = rows.strings("event_id") if "event_id" in renamed else _line_ids(path.stem, rows.lines)
    extra: dict[str, np.ndarray] = {}
    for name, cast in (("dwell_ms", "int"), ("scroll_depth", "float"), ("position", "int")):
        if name in renamed:
            values = rows.numbers(name)
            extra[name] = values.astype(np.int64) if cast == "int" else values
    for name in ("device", "surface", "request_id"):
        if name in renamed:
            extra[name] = rows.strings(name)
    if session is not None:
        rows.reject(np.array([s is None for s in session], dtype=bool), "session_id is missing")
    if isinstance(types, np.ndarray):
        rows.reject(np.array([t is None for t in types], dtype=bool), "event_type is missing")
    events, lines = _events(
        rows, user, item, time_us, ids, session=session, event_type=types, extra=extra
    )
    return events, lines, rows


# --- catalogue tables -------------------------------------------------------------------------------


def items_from_events(events: pa.Table) -> pa.Table:
    """An item table for items that have no attribute file: category unknown."""
    ids = pc.unique(pc.drop_null(events.column("item_id"))).to_numpy(zero_copy_only=False)
    return _items_table(ids, np.full(len(ids), UNKNOWN_CATEGORY, dtype=object))


def write_table_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def merge_items(existing_path: Path, new: pa.Table) -> pa.Table:
    """Upsert: rows of `new` replace those with the same item_id."""
    if not existing_path.exists():
        return new
    old = pq.read_table(existing_path)
    if "blocked" not in old.column_names:  # catalogues written before the column existed
        old = old.append_column("blocked", pa.array(np.zeros(old.num_rows, dtype=bool)))
    old = old.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA)
    keep = pc.invert(pc.is_in(old.column("item_id"), value_set=new.column("item_id")))
    return pa.concat_tables([old.filter(keep), new]).sort_by("item_id")


def merge_users(existing_path: Path, new: pa.Table) -> pa.Table:
    if not existing_path.exists():
        return new
    old = pq.read_table(existing_path)
    keep = pc.invert(pc.is_in(old.column("user_id"), value_set=new.column("user_id")))
    return pa.concat_tables([old.filter(keep), new], promote_options="default").sort_by("user_id")


# --- entry point -----------------------------------------------------------------------------------


def import_file(
    path: Path,
    fmt: str,
    events_dir: Path,
    catalog_dir: Path,
    mapping: Mapping[str, str] | None = None,
    timestamp_unit: str | None = None,
    event_type: str = "click",
    sep: str = ",",
) -> ImportReport:
    """Parse `path` fully, then append its events and upsert its attributes.

    Nothing is written unless the whole file could be read. `timestamp_unit` (csv and
    parquet) is `s`, `ms`, `us` or `iso`; None detects it from the column.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    items: pa.Table | None = None
    users: pa.Table | None = None
    if fmt == "recbole":
        events, lines, rows, items, users = _recbole(path)
    elif fmt == "sasrec":
        events, lines, rows = _sasrec(path)
    elif fmt == "diginetica":
        events, lines, rows = _diginetica(path)
    else:
        events, lines, rows = _generic(path, fmt, mapping or {}, timestamp_unit, event_type, sep)

    rows_read = len(rows) + rows.unparsed
    if rows_read == 0:
        raise InvalidInputError(f"{path} has no rows to import, only {_only(fmt)}")
    report = ImportReport(
        source=str(path), format=fmt, rows_read=rows_read, timestamps=rows.timestamps
    )
    result = EventLog(events_dir).append(events, lines)
    report.events_appended = result.appended
    report.rejected = sorted(rows.rejected + result.duplicates, key=lambda b: b.line)
    refused = np.array([b.line for b in result.duplicates], dtype=np.int64)
    appended = events.filter(pa.array(~np.isin(lines, refused)))
    for name in ("users", "sessions", "items"):
        column = appended.column(f"{name[:-1]}_id")
        setattr(report, name, pc.count_distinct(column).as_py() if len(column) else 0)

    known_items = items if items is not None else items_from_events(events)
    if items is not None:
        # Items seen in events but absent from the attribute file still need a row.
        extra = items_from_events(events)
        missing = pc.invert(pc.is_in(extra.column("item_id"), value_set=items.column("item_id")))
        known_items = pa.concat_tables([items, extra.filter(missing)])
    items_path = catalog_dir / "items.parquet"
    if items is None and items_path.exists():
        # Do not overwrite real attributes with "unknown" for items already known.
        old_ids = pq.read_table(items_path, columns=["item_id"]).column("item_id")
        known_items = known_items.filter(
            pc.invert(pc.is_in(known_items.column("item_id"), value_set=old_ids))
        )
    merged_items = merge_items(items_path, known_items)
    write_table_atomic(merged_items, items_path)
    report.catalog_items = merged_items.num_rows
    if users is not None:
        merged_users = merge_users(catalog_dir / "users.parquet", users)
        write_table_atomic(merged_users, catalog_dir / "users.parquet")
        report.user_profiles = merged_users.num_rows
    elif fmt == "recbole":
        report.user_profiles = 0  # the format has a user file; this import had none
    return report


def _only(fmt: str) -> str:
    return "a Parquet schema" if fmt == "parquet" else "a header line"


def write_report(report: ImportReport, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"import-{Path(report.source).stem}.json"
    path.write_text(json.dumps(report.to_json(), indent=1))
    return path
