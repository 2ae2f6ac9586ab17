"""The privacy ledger: every differentially private release, and the budget it spends.

File
    One JSON object per line (`<data-dir>/privacy/ledger.jsonl`), appended, never
    rewritten. A record names the release, its mechanism, (ε, δ), the UTC days of the
    event log it read (`first_day` .. `last_day`), when it was recorded and details
    (the contribution bound, the noise scale, the output).

Accounting
    A release is charged to every day of data it read, and each day may be charged
    at most the budget (`Budget`, the `[privacy]` table) over all releases: basic
    sequential composition, the ε and the δ of the releases that read a day add up.
    So the guarantee reads: for the data of any one day, and any one user's part of
    it, all releases together are (budget ε, budget δ)-DP. Charging days rather than
    naming windows is what keeps overlapping windows honest (a daily release of the
    last seven days reads each day seven times). A user active on several days that
    are covered by different releases is protected for each day's data at that level,
    and across days by the sum: the ledger's `spent` says how much.

    Basic composition rather than OpenDP's compositors: OpenDP composes measurements
    built together in one process over one input (`make_composition`,
    `make_sequential_composition`, privacy filters), while these releases happen in
    separate runs, days apart, and may mix pure ε-DP (Laplace) with (ε, δ) (Gaussian)
    releases. Adding the ε's and the δ's is valid for any such mix and tight for
    pure-DP releases; tighter accounting of many Gaussian releases (adding their
    zCDP ρ) would need each release's full privacy curve, which is not recorded.
    Sums use `math.fsum`, and a relative slack of 1e-9 forgives float representation
    (ten releases of 0.1 fill a budget of 1.0).

Durability
    An append happens under an exclusive `flock` of the file: read, check the budget,
    write the one line, `fsync`, unlock; two concurrent releases cannot both pass the
    check. A crash mid-write can leave a last line without its newline: it was never
    acknowledged, so readers do not count it and the next append cuts it off before
    writing. A complete line that is not a record fails loudly (`ConfigurationError`):
    accounting refuses to guess.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from inkling.errors import ConfigurationError, InvalidInputError, PrivacyBudgetExceededError
from inkling.fsync import fsync_path

SLACK = 1e-9
"""Relative slack of the budget check: a sum above the budget by less is float noise."""


@dataclass(frozen=True)
class Budget:
    """What the releases reading one day of data may spend together."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class LedgerRecord:
    """One release, as the ledger holds it."""

    release_id: str
    recorded_at: str
    release: str
    """What was released, e.g. "item_popularity"."""
    mechanism: str
    epsilon: float
    delta: float
    first_day: str
    """The first UTC day of data the release read (ISO date)."""
    last_day: str
    details: dict[str, Any] = field(default_factory=dict)

    def days(self) -> list[date]:
        return _days(date.fromisoformat(self.first_day), date.fromisoformat(self.last_day))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LedgerRecord:
        record = cls(
            release_id=str(doc["release_id"]),
            recorded_at=str(doc["recorded_at"]),
            release=str(doc["release"]),
            mechanism=str(doc["mechanism"]),
            epsilon=float(doc["epsilon"]),
            delta=float(doc["delta"]),
            first_day=str(doc["first_day"]),
            last_day=str(doc["last_day"]),
            details=dict(doc.get("details", {})),
        )
        record.days()  # the dates parse
        return record


class PrivacyLedger:
    """The ledger at `path`, charged against `budget` per day of data."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path = Path(path)
        self.budget = budget

    def records(self) -> list[LedgerRecord]:
        """Every complete record, oldest first; none when the file does not exist."""
        if not self.path.exists():
            return []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._parse(_read_all(fd))
        finally:
            os.close(fd)

    def spent(self, first_day: date, last_day: date) -> dict[date, Budget]:
        """Per day of `first_day` .. `last_day`, the (ε, δ) its releases spent so far."""
        return _spent(self.records(), _days(first_day, last_day))

    def remaining(self, first_day: date, last_day: date) -> Budget:
        """What a new release over `first_day` .. `last_day` may still spend: the budget
        less the most any of its days has spent."""
        spent = self.spent(first_day, last_day).values()
        return Budget(
            max(0.0, self.budget.epsilon - max((s.epsilon for s in spent), default=0.0)),
            max(0.0, self.budget.delta - max((s.delta for s in spent), default=0.0)),
        )

    def charge(
        self,
        *,
        release: str,
        mechanism: str,
        epsilon: float,
        delta: float,
        first_day: date,
        last_day: date,
        details: Mapping[str, Any] | None = None,
    ) -> LedgerRecord:
        """Record a release, durably, if every day it reads has (ε, δ) left.

        Call it before the noise is drawn: a release is spent once it is recorded,
        whether or not its output is written afterwards.

        Raises:
            InvalidInputError: ε ≤ 0, δ < 0, or `first_day` after `last_day`.
            PrivacyBudgetExceededError: a day would exceed the budget; the message names
                the day and what the window has left.
        """
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise InvalidInputError(f"epsilon must be positive, got {epsilon}", field="epsilon")
        if not (math.isfinite(delta) and delta >= 0):
            raise InvalidInputError(f"delta must not be negative, got {delta}", field="delta")
        days = _days(first_day, last_day)
        record = LedgerRecord(
            release_id=uuid.uuid4().hex,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            release=release,
            mechanism=mechanism,
            epsilon=float(epsilon),
            delta=float(delta),
            first_day=first_day.isoformat(),
            last_day=last_day.isoformat(),
            details=dict(details or {}),
        )
        line = (json.dumps(asdict(record), sort_keys=True, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _read_all(fd)
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) < len(data):
                os.ftruncate(fd, len(complete))  # a torn line from a crashed append
            spent = _spent(self._parse(complete), days)
            self._check(spent, days, record)
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path.parent)
        return record

    def _check(self, spent: dict[date, Budget], days: list[date], record: LedgerRecord) -> None:
        window = f"{days[0]}..{days[-1]}"
        most_eps = max((s.epsilon for s in spent.values()), default=0.0)
        most_delta = max((s.delta for s in spent.values()), default=0.0)
        left = Budget(
            max(0.0, self.budget.epsilon - most_eps), max(0.0, self.budget.delta - most_delta)
        )
        for day in days:
            used = spent.get(day, Budget(0.0, 0.0))
            for name, have, want, cap in (
                ("ε", used.epsilon, record.epsilon, self.budget.epsilon),
                ("δ", used.delta, record.delta, self.budget.delta),
            ):
                if want > 0 and math.fsum([have, want]) > cap * (1 + SLACK):
                    raise PrivacyBudgetExceededError(
                        f"privacy budget exceeded: releasing {record.release} with "
                        f"ε={record.epsilon:g}, δ={record.delta:g} over {window} would bring "
                        f"{day} to {name}={math.fsum([have, want]):g}, above the "
                        f"{name}={cap:g} allowed per day of data ([privacy] in the "
                        f"settings); the window has ε={left.epsilon:g}, δ={left.delta:g} "
                        f"left (ledger {self.path})"
                    )

    def _parse(self, data: bytes) -> list[LedgerRecord]:
        records = []
        complete = data[: data.rfind(b"\n") + 1]
        for number, raw in enumerate(complete.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                records.append(LedgerRecord.from_json(json.loads(raw)))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigurationError(
                    f"privacy ledger {self.path} line {number} is not a release record ({e}); "
                    "no release is possible until it is repaired"
                ) from None
        return records


def _days(first_day: date, last_day: date) -> list[date]:
    if first_day > last_day:
        raise InvalidInputError(f"the window's first day {first_day} is after its last {last_day}")
    return [first_day + timedelta(days=i) for i in range((last_day - first_day).days + 1)]


def _spent(records: list[LedgerRecord], days: list[date]) -> dict[date, Budget]:
    wanted = set(days)
    eps: dict[date, list[float]] = {}
    deltas: dict[date, list[float]] = {}
    for record in records:
        for day in record.days():
            if day in wanted:
                eps.setdefault(day, []).append(record.epsilon)
                deltas.setdefault(day, []).append(record.delta)
    return {day: Budget(math.fsum(eps[day]), math.fsum(deltas[day])) for day in sorted(eps)}


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
