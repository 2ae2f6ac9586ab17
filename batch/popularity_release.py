"""`inkling export popularity`: item popularity released with user-level differential privacy.

What is released
    For every item of the catalogue (`catalog/items.parquet`), how many users
    interacted with it (click, add_to_cart or purchase: the events `item_pop_7d`
    counts) during the `days` UTC days ending with `last_day`, with each user counted
    towards at most `max_items` distinct items, plus noise
    (`inkling.privacy.noisy_counts`: Laplace for δ = 0, Gaussian for δ > 0), rounded
    and clamped at 0 (post-processing, no privacy cost). With the defaults it is the
    window of `item_pop_7d`; it differs from that feature in counting users rather than
    events (repeat interactions of a user with an item count once), in the bound, and
    in the noise.

Privacy unit
    A user (`user_id`). An anonymous event's unit is its session: a person with
    several anonymous sessions is protected per session, not as one person.

Keys
    Every catalogue item gets a count, observed or not, so no key is selected from
    the data and no δ is spent on selection. Events of items outside the catalogue
    are dropped before bounding. This holds when the catalogue is public
    information; a catalogue built from the events (an import without an item file
    does that) makes which items exist a fact about the private data, which the
    release then does not protect.

Window
    `last_day` defaults to the UTC day of the log's latest interaction: that date is
    then read from the data and is not protected. Pass it to keep the release's
    shape independent of the data.

Order
    Inputs are read and checked, the mechanism built, the release charged to the
    ledger (refused when a day of its window has too little budget left), and only
    then is the noise drawn and the file written (atomically: a temporary file
    renamed). A release that fails after its charge has spent its budget.

Output (JSON)
    ``{"release": "item_popularity", "release_id", "created_at", "window":
    {"first_day", "last_day", "days"}, "definition", "privacy": {"epsilon", "delta",
    "mechanism", "construction", "noise_scale", "max_items_per_unit", "sensitivity",
    "privacy_map_at_sensitivity", "unit", "keys", "post_processing"}, "items":
    [{"item_id", "count"}, ...]}``: nothing in it depends on the private data but the
    noisy counts (and the default `last_day`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import INTERACTION_TYPES
from inkling.privacy.ledger import LedgerRecord, PrivacyLedger
from inkling.privacy.noisy_counts import bound_contributions, count_mechanism

RELEASE = "item_popularity"
UNIT = "user (user_id); an anonymous event's session (session_id)"
DEFINITION = (
    "users who interacted (click, add_to_cart, purchase) with the item in the window, "
    "each user counted towards at most max_items_per_unit distinct items"
)
POST_PROCESSING = "noisy counts rounded to integers and clamped at 0"


@dataclass(frozen=True)
class PopularityRelease:
    """What `release_popularity` wrote and recorded."""

    path: Path
    record: LedgerRecord
    items: int
    first_day: date
    last_day: date


def release_popularity(
    events_dir: Path,
    catalog_path: Path,
    ledger: PrivacyLedger,
    out: Path,
    epsilon: float,
    delta: float,
    max_items: int,
    days: int = 7,
    last_day: date | None = None,
    rng: np.random.Generator | None = None,
) -> PopularityRelease:
    """Release the catalogue's popularity over a window (module docstring) into `out`.

    Args:
        rng: the contribution bound's selection; None (a release) draws fresh entropy.

    Raises:
        NotFoundError: no event log or no catalogue.
        InvalidInputError: a bad parameter, an empty catalogue, or no interactions in
            the window.
        PrivacyBudgetExceededError: the ledger has too little budget left for the window.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidInputError(f"days must be an integer of at least 1, got {days!r}", "days")
    mechanism = count_mechanism(epsilon, delta, max_items)
    log = EventLog(Path(events_dir))
    if not log.exists():
        raise NotFoundError(f"the event log at {events_dir} has no events to release")
    catalogue = _catalogue(Path(catalog_path))
    interactions = (
        pc.field("event_type").isin(list(INTERACTION_TYPES)) & pc.field("item_id").is_valid()
    )
    if last_day is None:
        last_day = _latest_interaction_day(log, interactions, Path(events_dir))
    first_day = last_day - timedelta(days=days - 1)
    window = (pc.field("date") >= first_day.isoformat()) & (
        pc.field("date") <= last_day.isoformat()
    )
    rows = log.dataset().to_table(
        columns=["user_id", "session_id", "item_id"], filter=interactions & window
    )
    if rows.num_rows == 0:
        raise InvalidInputError(
            f"the event log at {events_dir} has no interactions ({', '.join(INTERACTION_TYPES)}) "
            f"between {first_day} and {last_day}"
        )
    units, keys = _codes(rows, catalogue)

    record = ledger.charge(
        release=RELEASE,
        mechanism=mechanism.name,
        epsilon=mechanism.epsilon,
        delta=mechanism.delta,
        first_day=first_day,
        last_day=last_day,
        details={
            "max_items_per_unit": mechanism.max_keys,
            "noise_scale": mechanism.scale,
            "items": len(catalogue),
            "output": str(out),
        },
    )
    bounded = bound_contributions(units, keys, len(catalogue), mechanism.max_keys, rng)
    counts = np.maximum(mechanism.release(bounded.counts), 0)
    document: dict[str, Any] = {
        "release": RELEASE,
        "release_id": record.release_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "window": {
            "first_day": first_day.isoformat(),
            "last_day": last_day.isoformat(),
            "days": days,
        },
        "definition": DEFINITION,
        "privacy": {
            **mechanism.describe(),
            "unit": UNIT,
            "keys": "every catalogue item, observed or not: no key selection, no δ spent on it",
            "post_processing": POST_PROCESSING,
            "ledger_record": record.release_id,
        },
        "items": [
            {"item_id": item, "count": int(c)}
            for item, c in zip(catalogue.to_pylist(), counts, strict=True)
        ],
    }
    _write_atomic(Path(out), json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return PopularityRelease(Path(out), record, len(catalogue), first_day, last_day)


def _catalogue(path: Path) -> pa.Array:
    if not path.is_file():
        raise NotFoundError(
            f"no catalogue at {path}: the release covers the catalogue's items (import or "
            "generate one)"
        )
    ids = pc.unique(pc.drop_null(pq.read_table(path, columns=["item_id"]).column("item_id")))
    if len(ids) == 0:
        raise InvalidInputError(f"the catalogue at {path} lists no items")
    return ids.take(pc.sort_indices(ids))


def _latest_interaction_day(log: EventLog, interactions: pc.Expression, root: Path) -> date:
    dates = log.dataset().to_table(columns=["date"], filter=interactions).column("date")
    latest = pc.max(dates).as_py()
    if latest is None:
        raise InvalidInputError(
            f"the event log at {root} has no interactions ({', '.join(INTERACTION_TYPES)})"
        )
    return date.fromisoformat(latest)


def _codes(rows: pa.Table, catalogue: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each row's unit code (user, else session) and catalogue index; rows of items
    outside the catalogue are dropped."""
    user = rows.column("user_id")
    units = pc.if_else(
        pc.is_valid(user),
        pc.binary_join_element_wise("u", user, "\x1f"),
        pc.binary_join_element_wise("s", rows.column("session_id"), "\x1f"),
    )
    keys = pc.index_in(rows.column("item_id"), value_set=catalogue)
    known = pc.is_valid(keys)
    units, keys = units.filter(known), keys.filter(known)
    unit_codes = pc.dictionary_encode(units).combine_chunks().indices
    return (
        np.asarray(unit_codes.to_numpy(zero_copy_only=False), dtype=np.int64),
        np.asarray(keys.to_numpy(zero_copy_only=False), dtype=np.int64),
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
