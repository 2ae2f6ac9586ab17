"""Experiments as configuration, and the one assignment rule every process shares.

An experiment splits units (a user, else the session) into arms by a stable hash:
`bucket` places a key in [0, 1) the same way in every process and every run, and
`Experiment.assign` gives the arm whose slice of [0, 1) holds the salted key, so an
experiment with another salt reshuffles users independently of earlier ones. The
ranking server routes by it and records the arm in every serve record; the simulator
(`batch.simulate`) assigns its synthetic users by it too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from inkling.errors import ConfigurationError


def bucket(key: str) -> float:
    """A stable position in [0, 1) for an experiment split, the same in every process."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    """The share of units it serves, in (0, 1]; the arms' shares sum to at most 1 (the rest
    of the units are outside the experiment)."""
    version: str = ""
    """What it serves: a model version, or a policy name."""


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    salt: str = ""
    """Mixed into every key before hashing; defaults to the name."""
    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigurationError("an experiment needs a name")
        names = [a.name for a in self.arms]
        if len(names) < 2 or len(set(names)) != len(names) or not all(names):
            raise ConfigurationError(
                f"experiment {self.name!r} needs at least two arms with distinct names"
            )
        if any(not 0 < a.share <= 1 for a in self.arms):
            raise ConfigurationError(f"experiment {self.name!r}: every share must be in (0, 1]")
        if sum(a.share for a in self.arms) > 1 + 1e-9:
            raise ConfigurationError(f"experiment {self.name!r}: the shares sum to more than 1")
        if self.start and self.end and self.end <= self.start:
            raise ConfigurationError(f"experiment {self.name!r} ends before it starts")

    def assign(self, key: str) -> str | None:
        """The arm of a unit (its user id, else its session id); None outside the shares."""
        position = bucket(f"{self.salt or self.name}:{key}")
        edge = 0.0
        for arm in self.arms:
            edge += arm.share
            if position < edge:
                return arm.name
        return None
