"""The contextual bandit over the ranker's output: a linear model of the click, with an
upper confidence bound, learned online by the stream workers and read by the rankers.

Context of a candidate (`CONTEXT_FEATURES`, one row per pool item)

    bias          1
    ranker        the ranker's score, standardised over the candidates scored together
                  (the ranker's best 4 x pool: `ranking_server.core.BANDIT_SHORTLIST`)
    popularity    ln(1 + item_pop_7d)
    freshness     exp(-item_age_days / 30): 1 for a new item, towards 0 for an old one
    intent_match  1 when the item's category is the session's intent category

Model (ridge regression with a prior, one per surface)
    A = sum of x x^T over impressions, b = sum of x over clicked impressions, n = the
    impressions. theta = (prior I + A)^-1 (prior theta0 + b), theta0 puts `RANKER_PRIOR`
    on `ranker` (with no data the bandit follows the ranker). The value of an item is
    theta . x + alpha * sqrt(x^T (prior I + A)^-1 x): the predicted click rate plus a
    bonus where the data say little (rare contexts). The policy (kind `bandit` of
    `inkling.exploration`) draws from the ranker's score plus this value plus a
    per-item exposure bonus, each standardised over the candidates
    (`LinearUCB.over_ranker`). Measured over a simulated week with arriving items
    (`inkling evaluate-policy --simulate --week --week-seeds 10`): ranking by the UCB
    value alone replaced the ranker by a 5-feature linear model and lost reward on 3
    worlds of 5; added to the ranker's it gained on all 5 but left new items almost
    unexplored (a shared model explores feature directions, not items); the item
    bonus is what gets new items the impressions that reveal their click rates.

Why written here, not taken from a library: vowpalwabbit's `cb_explore_adf` and
mabwiser's LinUCB keep their state inside one process's learner object; here the
state must be shared by every stream worker (writers) and every ranking server
(readers). A, b and n are sums, so each worker adds its batch's part with
`HINCRBYFLOAT` inside its exactly-once commit, in any order, with no coordination, and
a reader solves a 5 x 5 system. Neither library exposes its statistics that way, and
the model is a dozen lines of numpy.

Storage: the hash `stats_key(surface)`, fields `n`, `A:<f>:<g>` (f <= g in
`CONTEXT_FEATURES` order) and `b:<f>`, as decimal strings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from inkling.exploration import standardised
from inkling.feature_store.snapshot import ItemRows, ItemSnapshot
from inkling.telemetry.sampled_log import SampledLog

CONTEXT_FEATURES = ("bias", "ranker", "popularity", "freshness", "intent_match")
POPULARITY, AGE = "item_pop_7d", "item_age_days"
"""The item features the popularity and freshness contexts come from."""
DIM = len(CONTEXT_FEATURES)
PREFIX = "inkling:bandit"
RANKER_PRIOR = 0.05
AGE_SCALE_DAYS = 30.0
DEFAULT_AGE_DAYS = 365.0
LOG_EVERY_S = 60.0
ITEM_BONUS = 0.2
"""Weight of the per-item exposure bonus in `LinearUCB.over_ranker` (chosen on simulated
worlds 0-4 among 0.1, 0.2, 0.5, 1; checked on worlds 5-9: see `batch.explore_sim`)."""
MAX_SURFACES = 64
"""The most surfaces a ranker keeps bandit parameters for (surfaces are caller-chosen)."""

log = logging.getLogger("inkling.bandit")


def stats_key(surface: str) -> str:
    """The hash of a surface's statistics (the empty surface is `default`)."""
    return f"{PREFIX}:{surface or 'default'}"


def popularity_term(popularity: np.ndarray) -> np.ndarray:
    """The `popularity` context of item_pop_7d values: ln(1 + pop); NaN (missing) is 0."""
    pop = np.asarray(popularity, np.float64)
    return np.log1p(np.maximum(np.where(np.isnan(pop), 0.0, pop), 0.0))


def freshness_term(age_days: np.ndarray) -> np.ndarray:
    """The `freshness` context of item_age_days values: exp(-age / 30); NaN (missing)
    counts as a year."""
    age = np.asarray(age_days, np.float64)
    age = np.where(np.isnan(age), DEFAULT_AGE_DAYS, age)
    return np.exp(-np.maximum(age, 0.0) / AGE_SCALE_DAYS)


def contexts(
    ranker_scores: np.ndarray,
    popularity: np.ndarray,
    age_days: np.ndarray,
    intent_match: np.ndarray,
) -> np.ndarray:
    """The context rows (float64, [items, DIM]) of a pool; missing values (NaN) count as
    no popularity and a year's age."""
    return context_rows(
        ranker_scores, popularity_term(popularity), freshness_term(age_days), intent_match
    )


def context_rows(
    ranker_scores: np.ndarray,
    popularity: np.ndarray,
    freshness: np.ndarray,
    intent_match: np.ndarray,
) -> np.ndarray:
    """`contexts` from the popularity and freshness terms (`popularity_term`,
    `freshness_term`), for a caller that keeps them per item."""
    x = np.empty((len(ranker_scores), DIM))
    x[:, 0] = 1.0
    x[:, 1] = standardised(ranker_scores)
    x[:, 2] = popularity
    x[:, 3] = freshness
    x[:, 4] = intent_match
    return x


@dataclass(frozen=True, eq=False)
class ItemTerms:
    """The popularity and freshness terms of every row of one item snapshot, computed
    once per snapshot so that a request only gathers its candidates' rows."""

    snapshot: ItemSnapshot
    popularity: np.ndarray
    freshness: np.ndarray

    @classmethod
    def of(cls, snapshot: ItemSnapshot) -> ItemTerms:
        def raw(name: str) -> np.ndarray:  # NaN where the row holds no value
            column = snapshot.features.get(name)
            if column is None:
                return np.full(len(snapshot.ids) + 1, np.nan)
            return np.where(column.present, column.values.astype(np.float64), np.nan)

        return cls(snapshot, popularity_term(raw(POPULARITY)), freshness_term(raw(AGE)))

    def take(self, items: ItemRows, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The terms of `items[positions]` (`items` read from this snapshot); a row past its
        view's TTL counts as missing, as `ItemRows.values` has it."""
        rows = items.rows[positions]
        out = []
        for name, terms, missing in (
            (POPULARITY, self.popularity, 0.0),
            (AGE, self.freshness, _MISSING_FRESHNESS),
        ):
            taken = terms[rows]
            feature = self.snapshot.features.get(name)
            if feature is not None:
                stale = ~items.valid[feature.view][positions]
                if stale.any():
                    taken[stale] = missing
            out.append(taken)
        return out[0], out[1]


_MISSING_FRESHNESS = float(np.exp(-DEFAULT_AGE_DAYS / AGE_SCALE_DAYS))
"""`freshness_term` of a missing age (`popularity_term` of a missing value is 0)."""

_UPPER = [(i, j) for i in range(DIM) for j in range(i, DIM)]
A_FIELDS = [f"A:{CONTEXT_FEATURES[i]}:{CONTEXT_FEATURES[j]}" for i, j in _UPPER]
B_FIELDS = [f"b:{f}" for f in CONTEXT_FEATURES]


def increments(impressions: np.ndarray, clicks: np.ndarray) -> dict[str, float]:
    """What a batch adds to the statistics: `impressions` are the context rows of every
    item shown, `clicks` those of every item clicked ([rows, DIM] each)."""
    x = np.asarray(impressions, np.float64).reshape(-1, DIM)
    c = np.asarray(clicks, np.float64).reshape(-1, DIM)
    out: dict[str, float] = {}
    if len(x):
        a = x.T @ x
        out["n"] = float(len(x))
        for name, (i, j) in zip(A_FIELDS, _UPPER, strict=True):
            out[name] = float(a[i, j])
    if len(c):
        for name, v in zip(B_FIELDS, c.sum(axis=0).tolist(), strict=True):
            out[name] = v
    return {k: v for k, v in out.items() if v != 0.0}


@dataclass(frozen=True)
class Statistics:
    a: np.ndarray
    b: np.ndarray
    n: float

    @classmethod
    def empty(cls) -> Statistics:
        return cls(np.zeros((DIM, DIM)), np.zeros(DIM), 0.0)

    @classmethod
    def from_hash(
        cls, fields: Mapping[bytes | str, bytes | str | float] | Mapping[str, float]
    ) -> Statistics:
        """The statistics of a Redis hash (`HGETALL`); absent fields are 0."""
        values = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in fields.items()}
        a = np.zeros((DIM, DIM))
        for name, (i, j) in zip(A_FIELDS, _UPPER, strict=True):
            a[i, j] = a[j, i] = values.get(name, 0.0)
        b = np.array([values.get(name, 0.0) for name in B_FIELDS])
        return cls(a, b, values.get("n", 0.0))

    def plus(self, other: Mapping[str, float]) -> Statistics:
        """These statistics with `increments` added (what Redis does with them)."""
        added = Statistics.from_hash(other)
        return Statistics(self.a + added.a, self.b + added.b, self.n + added.n)


@dataclass(frozen=True)
class LinearUCB:
    """A solved model: values of context rows."""

    theta: np.ndarray
    covariance: np.ndarray
    alpha: float
    impressions: float
    item_bonus: float = ITEM_BONUS

    @classmethod
    def solve(
        cls,
        stats: Statistics,
        alpha: float = 1.0,
        prior: float = 1.0,
        item_bonus: float = ITEM_BONUS,
    ) -> LinearUCB:
        theta0 = np.zeros(DIM)
        theta0[1] = RANKER_PRIOR
        precision = prior * np.eye(DIM) + stats.a
        covariance = np.linalg.inv(precision)
        theta = covariance @ (prior * theta0 + stats.b)
        return cls(theta, covariance, alpha, stats.n, item_bonus)

    def mean(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.theta

    def values(self, x: np.ndarray) -> np.ndarray:
        """Predicted click rate plus the confidence bonus, per row."""
        x = np.asarray(x, np.float64)
        spread = ((x @ self.covariance) * x).sum(axis=1)
        return x @ self.theta + self.alpha * np.sqrt(np.maximum(spread, 0.0))

    def over_ranker(self, x: np.ndarray) -> np.ndarray:
        """What the `bandit` policy ranks by: the ranker's scores plus the UCB values plus
        `item_bonus` x the item's own uncertainty 1 / sqrt(1 + item_pop_7d), each
        standardised over the candidates. The ranker's order stays the base; the model
        corrects it where the clicks disagree; the item term lifts items with little
        exposure (a new item most), which the shared model cannot tell apart. `x`: the
        candidates' `contexts`, whose `ranker` column is the ranker's scores standardised."""
        x = np.asarray(x, np.float64)
        values = x[:, 1] + standardised(self.values(x))
        if self.item_bonus:  # x's popularity is ln(1 + pop): exp(-it / 2) = 1 / sqrt(1 + pop)
            values = values + self.item_bonus * standardised(np.exp(-0.5 * x[:, 2]))
        return values


class BanditCache:
    """The ranking server's view of the bandits: each surface's solved model (the
    statistics the workers keep under the surface of each serve record), read from
    Redis every `refresh_s` by `run`. `model` gives None for a surface whose last good
    read is older than `max_staleness_s` (the policy stage then serves greedily), so a
    ranker never explores on parameters older than that bound."""

    def __init__(
        self,
        client: Any,
        surfaces: Sequence[str],
        *,
        alpha: float = 1.0,
        prior: float = 1.0,
        item_bonus: float = ITEM_BONUS,
        refresh_s: float = 1.0,
        max_staleness_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.surfaces = list(surfaces)
        self.alpha = alpha
        self.prior = prior
        self.item_bonus = item_bonus
        self.refresh_s = refresh_s
        self.max_staleness_s = max_staleness_s
        self._clock = clock
        self._models: dict[str, tuple[LinearUCB, float]] = {}
        self._log = SampledLog(log, LOG_EVERY_S, clock)

    def model(self, surface: str) -> LinearUCB | None:
        """The surface's model; a surface not read yet joins the next refresh (None until
        then), up to `MAX_SURFACES` surfaces."""
        if surface not in self.surfaces and len(self.surfaces) < MAX_SURFACES:
            self.surfaces.append(surface)
        held = self._models.get(surface)
        if held is None or self._clock() - held[1] > self.max_staleness_s:
            return None
        return held[0]

    async def refresh(self) -> None:
        """Read and solve every surface's statistics (an empty hash is the prior)."""
        for surface in self.surfaces:
            fields = await self.client.hgetall(stats_key(surface))
            stats = Statistics.from_hash(fields)
            model = LinearUCB.solve(stats, self.alpha, self.prior, self.item_bonus)
            self._models[surface] = (model, self._clock())

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError, ValueError) as e:
                self._log.log("refresh", logging.WARNING, f"bandit parameters not refreshed: {e}")
            await asyncio.sleep(self.refresh_s)
