"""Exploring ranking policies, and the exact probability of every list they draw.

Every policy fills a list one position at a time from a *pool*: the `pool` best
candidates that may be shown (in stock, not blocked, passed the request's filters) by
the policy's values (below), best first. At position k the policy chooses among the pool's
*eligible* items E_k: those not placed yet and, while k is inside the diversity
window, not of a category that already has `max_per_category` items above (when no
such item is left, every remaining item is eligible, as in `diversify`). It draws item
j with probability

    pi_k(j) = (1 - epsilon) * g_k(j) + epsilon / |E_k|

where g_k is either one-hot on the eligible item the policy values most (temperature
0: ties go to the better ranker score) or the softmax of z / temperature over E_k, z
being the policy's values standardised over the pool (mean 0, standard deviation 1;
so a temperature means the same for any scorer's scale). The values are the ranker's
scores, or for the bandit the ranker's plus the contextual bandit's UCB values
(`inkling.bandit.LinearUCB.over_ranker`).

| kind             | epsilon | temperature | values            |
| ---------------- | ------- | ----------- | ----------------- |
| `greedy`         | 0       | 0           | ranker scores     |
| `epsilon_greedy` | epsilon | 0           | ranker scores     |
| `plackett_luce`  | 0       | temperature | ranker scores     |
| `bandit`         | epsilon | temperature | ranker + bandit   |
| `uniform`        | 1       | -           | -                 |

The draw at each position uses one uniform number from a generator seeded by the
request (`request_seed`), and the chosen item's probability pi_k is logged: the
probability of the item at its position *given the items above it*. The product of
the first k is the probability of the list's first k items (what a cascade or slate
estimator needs); the product of all is the probability of the list. `replay` redraws
a logged list from its pool, policy and seed; `probabilities` gives, for any list of
pool items, each position's pi_k and the whole distribution pi_k over the pool (what
off-policy evaluation of another policy needs, `batch.ope`).

A position is *explored* when its item is not the one the greedy ranker would have
put there given the items above (the ranker's best eligible item).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from inkling.errors import ConfigurationError

KINDS = ("greedy", "epsilon_greedy", "plackett_luce", "bandit", "uniform")
DEFAULT_POOL = 50


@dataclass(frozen=True)
class PolicySpec:
    """A policy of the ranking policy stage, as configured per surface and logged."""

    kind: str = "greedy"
    epsilon: float = 0.0
    temperature: float = 0.0
    pool: int = DEFAULT_POOL
    """How many of the best eligible candidates the policy may draw from."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigurationError(f"policy kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigurationError(f"policy epsilon {self.epsilon} is outside [0, 1]")
        if self.temperature < 0 or not np.isfinite(self.temperature):
            raise ConfigurationError(f"policy temperature {self.temperature} is negative")
        if self.pool < 1:
            raise ConfigurationError(f"policy pool {self.pool} is below 1")
        if self.kind == "greedy" and (self.epsilon or self.temperature):
            raise ConfigurationError("a greedy policy takes no epsilon or temperature")
        if self.kind == "epsilon_greedy" and (not self.epsilon or self.temperature):
            raise ConfigurationError("epsilon_greedy needs an epsilon above 0 and no temperature")
        if self.kind == "plackett_luce" and (not self.temperature or self.epsilon):
            raise ConfigurationError("plackett_luce needs a temperature above 0 and no epsilon")
        if self.kind == "uniform" and (self.epsilon != 1.0 or self.temperature):
            raise ConfigurationError("uniform is epsilon 1 and no temperature")

    @classmethod
    def of(cls, kind: str, **params: float) -> PolicySpec:
        """A spec by kind; `uniform` sets its own epsilon."""
        if kind == "uniform":
            params = {"epsilon": 1.0, **params}
        pool = int(params.pop("pool", DEFAULT_POOL))
        return cls(kind, pool=pool, **params)

    @property
    def stochastic(self) -> bool:
        return self.kind != "greedy"

    @property
    def name(self) -> str:
        """What serve records carry, e.g. `plackett_luce(temperature=0.5,pool=50)`;
        `parse` reads it back."""
        if self.kind == "greedy":
            return "greedy"
        parts = []
        if self.kind in ("epsilon_greedy", "bandit"):
            parts.append(f"epsilon={self.epsilon:g}")
        if self.kind in ("plackett_luce", "bandit"):
            parts.append(f"temperature={self.temperature:g}")
        parts.append(f"pool={self.pool}")
        return f"{self.kind}({','.join(parts)})"

    @classmethod
    def parse(cls, name: str) -> PolicySpec:
        """The spec of a logged name (`name`'s inverse); ValueError names what is wrong."""
        match = re.fullmatch(r"([a-z_]+)(?:\((.*)\))?", name.strip())
        if not match:
            raise ValueError(f"policy {name!r} is not of the form kind(param=value,...)")
        kind, body = match.group(1), match.group(2) or ""
        params: dict[str, float] = {}
        for part in filter(None, body.split(",")):
            key, _, value = part.partition("=")
            if key not in ("epsilon", "temperature", "pool"):
                raise ValueError(f"policy {name!r}: unknown parameter {key!r}")
            try:
                params[key] = float(value)
            except ValueError:
                raise ValueError(f"policy {name!r}: {key} is not a number") from None
        try:
            return cls.of(kind, **params)
        except ConfigurationError as e:
            raise ValueError(f"policy {name!r}: {e}") from None


GREEDY = PolicySpec()


@dataclass(frozen=True)
class Guardrails:
    """The diversity rule every list keeps: at most `max_per_category` items of one
    category among the first `window` positions."""

    max_per_category: int = 3
    window: int = 20


@dataclass(frozen=True)
class Slate:
    """A drawn list over a pool: pool indices, best first, with each position's
    probability given the positions above, and whether it was explored."""

    order: np.ndarray
    propensities: np.ndarray
    explored: np.ndarray


def request_seed(request_id: str) -> int:
    """The draw's seed, 63 bits (a signed 64-bit column holds it): from the first 16 hex
    digits of a request id (a uuid4's random bits), else from a stable hash of the id."""
    head = request_id[:16]
    try:
        if len(head) == 16:
            return int(head, 16) >> 1
    except ValueError:
        pass
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def standardised(values: np.ndarray) -> np.ndarray:
    """Mean 0, standard deviation 1 over the pool (all zeros when the values are equal)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    d = v - v.sum() / len(v)
    sd = math.sqrt(float(d @ d) / len(v))  # np.std's result, at a third of its cost here
    return d / sd if sd > 1e-12 else np.zeros_like(v)


class _Walk:
    """pi_k position after position, over the pool's lists (a pool is ~50 items, where a
    numpy call's overhead is most of its cost). The eligible items (with their softmax
    weights beside them), and the same items in the ranker's order, are kept as
    positions are filled rather than recomputed."""

    def __init__(
        self,
        spec: PolicySpec,
        values: np.ndarray,
        ranker: np.ndarray,
        categories: np.ndarray,
        rules: Guardrails,
    ) -> None:
        self.spec = spec
        self.rules = rules
        z_ = standardised(values)
        self.z = z = z_.tolist()
        self.softmax = spec.temperature > 0 and spec.kind in ("plackett_luce", "bandit")
        # Softmax weights, shifted by the pool's maximum once (1 elsewhere: unused).
        self.weight = (
            np.exp((z_ - z_.max()) / spec.temperature).tolist()
            if self.softmax and z
            else [1.0] * len(z)
        )
        self.cat = np.asarray(categories).tolist()
        self.counts: dict[Any, int] = {}
        self.placed: set[int] = set()
        # The ranker's order of the pool (stable: the first of equals): the greedy
        # choice is the first eligible item in it.
        self.by_ranker = np.argsort(-np.asarray(ranker, np.float64), kind="stable").tolist()
        self._reset()

    def _reset(self) -> None:
        """Every item not placed yet is eligible again."""
        placed = self.placed
        self.eligible = [j for j in range(len(self.z)) if j not in placed]  # pool order
        self.weights = [self.weight[j] for j in self.eligible]  # beside `eligible`
        self.usable = [j for j in self.by_ranker if j not in placed]  # the ranker's order

    def _widen(self, position: int) -> None:
        if position == self.rules.window or not self.eligible:  # past the window, or
            self._reset()  # none keeps the rule

    def distribution(self, position: int) -> tuple[list[int], float, list[float], float, int]:
        """At `position`: the eligible items (pool order), and a, w, b with
        pi(eligible[i]) = a * w[i] + b (0 for every other item), and the greedy choice."""
        self._widen(position)
        eligible, greedy = self.eligible, self.usable[0]
        spec, size = self.spec, len(self.eligible)
        if spec.kind == "greedy":
            return eligible, 1.0, [1.0 if j == greedy else 0.0 for j in eligible], 0.0, greedy
        b = spec.epsilon / size
        if spec.kind == "uniform":
            return eligible, 0.0, [0.0] * size, b, greedy
        z = self.z
        if self.softmax:
            w = self.weights
            total = sum(w)
            if total == 0.0:  # every eligible weight underflowed: shift by their max
                tau = spec.temperature
                local = max(z[j] for j in eligible) / tau
                w = [math.exp(z[j] / tau - local) for j in eligible]
                total = sum(w)
            return eligible, (1.0 - spec.epsilon) / total, w, b, greedy
        best = max(eligible, key=z.__getitem__)
        return (
            eligible,
            1.0 - spec.epsilon,
            [1.0 if j == best else 0.0 for j in eligible],
            b,
            greedy,
        )

    def choose(self, position: int, u: float) -> tuple[int, float, int]:
        """The draw of `distribution(position)` for the uniform `u`: the item, its
        probability and the greedy choice. pi(j) = a * w_j + b sums to 1: the walk
        goes along the cumulative sum to the uniform's place (for a softmax without
        building `distribution`'s lists: the serving path)."""
        self._widen(position)
        eligible, w = self.eligible, self.weights
        total = sum(w) if self.softmax else 0.0
        if total > 0.0:
            size = len(eligible)
            a, b = (1.0 - self.spec.epsilon) / total, self.spec.epsilon / size
            greedy = self.usable[0]
        else:  # not a softmax, or every weight underflowed
            eligible, a, w, b, greedy = self.distribution(position)
            size = len(eligible)
            total = sum(w)
        target = u * (a * total + b * size)
        acc, at = 0.0, size - 1
        for i, wi in enumerate(w):
            acc += a * wi + b
            if target < acc:
                at = i
                break
        while a * w[at] + b == 0.0:  # float edge at the top of the cumulative sum
            at -= 1
        return eligible[at], a * w[at] + b, greedy

    def place(self, choice: int, position: int) -> None:
        at = self.eligible.index(choice)
        del self.eligible[at], self.weights[at]
        self.usable.remove(choice)
        self.placed.add(choice)
        c = self.cat[choice]
        self.counts[c] = n = self.counts.get(c, 0) + 1
        if n == self.rules.max_per_category and position + 1 < self.rules.window:
            keep = [i for i, j in enumerate(self.eligible) if self.cat[j] != c]
            self.eligible = [self.eligible[i] for i in keep]
            self.weights = [self.weights[i] for i in keep]
            self.usable = [j for j in self.usable if self.cat[j] != c]


def draw(
    spec: PolicySpec,
    values: np.ndarray,
    ranker: np.ndarray,
    categories: np.ndarray,
    k: int,
    seed: int,
    rules: Guardrails = Guardrails(),
) -> Slate:
    """Fill min(k, pool) positions from a pool (arrays aligned).

    `values` are what the policy ranks by (the ranker's scores, or the bandit's),
    `ranker` the ranker's scores (the greedy reference for `explored`), `categories`
    codes for the guardrails. The draw at position k takes the k-th of `min(k, pool)`
    uniforms from `numpy.random.default_rng(seed)`.
    """
    walk = _Walk(spec, values, ranker, categories, rules)
    n = min(k, len(walk.z))
    order, props, explored = [], [], []
    if spec.stochastic:
        uniforms = np.random.default_rng(seed).random(n).tolist()
        for pos, u in enumerate(uniforms):
            choice, p, greedy = walk.choose(pos, u)
            order.append(choice)
            props.append(p)
            explored.append(choice != greedy)
            walk.place(choice, pos)
    else:
        for pos in range(n):
            choice = walk.distribution(pos)[4]
            order.append(choice)
            walk.place(choice, pos)
        props, explored = [1.0] * n, [False] * n
    return Slate(np.array(order, np.int64), np.array(props, np.float64), np.array(explored, bool))


replay = draw
"""The list a logged request drew: `draw` again with its pool, values, policy and seed."""


def position_marginals(
    spec: PolicySpec,
    values: np.ndarray,
    ranker: np.ndarray,
    categories: np.ndarray,
    k: int,
    samples: int,
    rng: np.random.Generator,
    rules: Guardrails = Guardrails(),
) -> np.ndarray:
    """Estimated marginal probabilities of each pool item at each of the first
    min(k, pool) positions ([positions, pool]): the shares of `samples` lists drawn from
    `spec`'s pi_k (the same distribution as `draw`, every list at once, with `rng`'s
    numbers rather than a request's seed). A sequential policy under the diversity rule
    has no closed form for these; item-position estimators need them (`batch.ope`).

    Pools of one size can go together: `values`, `ranker` and `categories` as
    [pools, pool] arrays give [pools, positions, pool]."""
    many = np.ndim(values) == 2
    z = np.atleast_2d(np.asarray(values, np.float64))
    m, p = z.shape
    n = min(k, p)
    if n == 0 or m == 0:
        return np.zeros((m, n, p)) if many else np.zeros((n, p))
    mean = z.mean(axis=1, keepdims=True)  # `standardised`, pool by pool
    sd = z.std(axis=1, keepdims=True)
    z = np.where(sd > 1e-12, (z - mean) / np.where(sd > 1e-12, sd, 1.0), 0.0)
    _, cat = np.unique(np.atleast_2d(np.asarray(categories)), return_inverse=True)
    cat = cat.reshape(m, p)
    rank = np.argsort(np.argsort(-np.atleast_2d(np.asarray(ranker, np.float64)), axis=1,
                                 kind="stable"), axis=1)  # fmt: skip
    # One row per drawn list: pool i's lists are rows i * samples .. (i + 1) * samples.
    z = np.repeat(z, samples, axis=0)
    cat = np.repeat(cat, samples, axis=0)
    rank = np.repeat(rank, samples, axis=0)
    lists = m * samples
    rows = np.arange(lists)
    placed = np.zeros((lists, p), bool)
    eligible = np.ones((lists, p), bool)
    counts = np.zeros((lists, int(cat.max()) + 1), np.int64)
    out = np.zeros((m, n, p))
    softmax = spec.temperature > 0 and spec.kind in ("plackett_luce", "bandit")
    for pos in range(n):
        # As `_Walk._widen`: past the window, or where no item keeps the rule, every
        # item not placed yet is eligible again.
        reset = ~eligible.any(axis=1) if pos != rules.window else np.ones(lists, bool)
        eligible[reset] = ~placed[reset]
        size = eligible.sum(axis=1, keepdims=True)
        if spec.kind == "greedy":
            pi = np.zeros((lists, p))
            pi[rows, np.where(eligible, rank, p).argmin(axis=1)] = 1.0
        elif spec.kind == "uniform":
            pi = eligible / size
        else:
            if softmax:  # shifted by each list's eligible maximum: no underflow
                scaled = np.where(eligible, z / spec.temperature, -np.inf)
                g = np.exp(scaled - scaled.max(axis=1, keepdims=True))
                g /= g.sum(axis=1, keepdims=True)
            else:  # one-hot on the eligible item valued most (the first of equals)
                g = np.zeros((lists, p))
                g[rows, np.where(eligible, z, -np.inf).argmax(axis=1)] = 1.0
            pi = (1.0 - spec.epsilon) * g + spec.epsilon * eligible / size
        cumulative = np.cumsum(pi, axis=1)
        u = rng.random(lists) * cumulative[:, -1]
        choice = np.minimum((cumulative <= u[:, None]).sum(axis=1), p - 1)
        while not eligible[rows, choice].all():  # float edge at the top of the sum
            choice[~eligible[rows, choice]] -= 1
        np.add.at(out[:, pos], (rows // samples, choice), 1.0)
        placed[rows, choice] = True
        eligible[rows, choice] = False
        c = cat[rows, choice]
        counts[rows, c] += 1
        if pos + 1 < rules.window:
            full = counts[rows, c] == rules.max_per_category
            eligible[full] &= cat[full] != c[full, None]
    out /= samples
    return out if many else out[0]


def probabilities(
    spec: PolicySpec,
    values: np.ndarray,
    ranker: np.ndarray,
    categories: np.ndarray,
    order: np.ndarray,
    rules: Guardrails = Guardrails(),
) -> tuple[np.ndarray, np.ndarray]:
    """For a list of pool indices: each position's probability under `spec` given the
    positions above, and the whole distribution at each position ([positions, pool])."""
    walk = _Walk(spec, values, ranker, categories, rules)
    dists = np.zeros((len(order), len(values)))
    for pos, choice in enumerate(np.asarray(order).tolist()):
        eligible, a, w, b, _ = walk.distribution(pos)
        dists[pos, eligible] = a * np.asarray(w) + b
        walk.place(choice, pos)
    return dists[np.arange(len(order)), np.asarray(order, np.int64)], dists
