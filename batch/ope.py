"""Off-policy evaluation of ranking policies from logged, stochastic lists.

Each logged request holds the pool its list was drawn from (`inkling.exploration`), the
list (pool indices by position), the logging policy's probability of each position
given the ones above (`pi_b`), and the clicks per position. A target policy is
evaluated on the same pools: `inkling.exploration.probabilities` gives its probability
of each logged position given the logged positions above (`pi_e`) and its whole
distribution at each position. With w_k = prod_{j<=k} pi_e_j / pi_b_j (w_0 = 1) and
r_k the click at position k, the value per request (expected clicks per list) is
estimated by

- `ips`: the whole-list weight times the list's clicks, mean(w_K * sum_k r_k);
- `snips`: the same, self-normalised: sum(w_K * R) / sum(w_K);
- `cascade_ips` (the slate estimator): mean(sum_k w_k r_k); unbiased when a click at k
  depends on the items at k and above only (position-based and cascade click models),
  with far lighter weights than the whole list's;
- `dm` (direct method): a click model q(x, k) (logistic regression on the pool items'
  context rows and the position, fitted on the log) summed over lists the target draws
  (`dm_draws` per request; exact for a one-position list);
- `dr` (doubly robust, cascade form): mean(sum_k w_k (r_k - q(a_k, k)) + w_{k-1}
  sum_a pi_e(a | logged prefix) q(a, k)); unbiased under the same condition as
  `cascade_ips` if either the propensities or the click model is right.

Each estimate comes with a percentile bootstrap confidence interval over requests and
the effective sample size of its weights, (sum w)^2 / sum w^2 (for the cascade ones,
the smallest over positions); `warnings` says when the weights are too heavy to trust.

- `iips` (item-position IPS): mean(sum_k m_e(a_k, k) / m_b(a_k, k) r_k), with m the
  marginal probability of an item at a position; unbiased when a click depends only on
  the item and its position (the position-based model), with the lightest weights of
  all, but biased under a cascade (a click then depends on the items above). A
  sequential policy under the diversity rule has no closed form for m, so both are
  estimated from `marginal_samples` lists drawn per request
  (`inkling.exploration.position_marginals`); the logging policy's counts include
  the logged list itself, (count + 1) / (samples + 1), so no logged item gets m_b = 0.
  Estimated marginals in a denominator add a small bias of their own (of order
  1 / (samples x m_b)): read `iips` beside `cascade_ips` and `dr`, not alone. It
  needs the logging policy of each request (`LoggedRequest.policy`); without it
  `iips` is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from inkling.exploration import (
    Guardrails,
    PolicySpec,
    draw,
    position_marginals,
    probabilities,
)

ESTIMATORS = ("ips", "snips", "cascade_ips", "iips", "dm", "dr")
MIN_ESS = 100
DEFAULT_RULES = Guardrails()
MIN_ESS_SHARE = 0.01


@dataclass(frozen=True)
class LoggedRequest:
    """One logged list and what it was drawn from (pool arrays aligned, best first)."""

    ranker: np.ndarray
    """The ranker's score of each pool item (what greedy and PL target policies rank by)."""
    values: np.ndarray
    """What the logging policy ranked by (ranker scores, or the bandit's values)."""
    categories: np.ndarray
    """Integer category codes (the diversity rule's unit)."""
    features: np.ndarray
    """Context rows [pool, features] (the click model's input)."""
    order: np.ndarray
    """The logged list: pool indices by position."""
    propensities: np.ndarray
    """pi_b of each position given the positions above."""
    clicks: np.ndarray
    """0/1 per position."""
    policy: PolicySpec | None = None
    """The logging policy (ranking by `values`), for `iips`'s marginals."""


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    ess: float


@dataclass(frozen=True)
class Evaluation:
    target: str
    requests: int
    estimates: dict[str, Estimate]
    logged_value: float
    """The logging policy's own value: mean clicks per list."""
    warnings: list[str] = field(default_factory=list)


class ClickModel:
    """Logistic regression of a click on [context row, one-hot position], by Newton's
    method (a dozen parameters; ridge 1e-3 keeps it defined on separable data)."""

    def __init__(self, positions: int, dim: int) -> None:
        self.positions = positions
        self.weights = np.zeros(dim + positions)

    def _design(self, x: np.ndarray, position: np.ndarray) -> np.ndarray:
        onehot = np.zeros((len(x), self.positions))
        onehot[np.arange(len(x)), np.minimum(position, self.positions - 1)] = 1.0
        return np.hstack([x, onehot])

    def fit(self, x: np.ndarray, position: np.ndarray, y: np.ndarray) -> ClickModel:
        z = self._design(x, position)
        w = self.weights
        for _ in range(25):
            p = 1.0 / (1.0 + np.exp(-(z @ w)))
            grad = z.T @ (p - y) + 1e-3 * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + 1e-3 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w = w - step
            if np.abs(step).max() < 1e-8:
                break
        self.weights = w
        return self

    def predict(self, x: np.ndarray, position: int | np.ndarray) -> np.ndarray:
        pos = np.broadcast_to(np.asarray(position), (len(x),))
        return 1.0 / (1.0 + np.exp(-(self._design(x, pos) @ self.weights)))


def _ess(w: np.ndarray) -> float:
    s2 = float((w**2).sum())
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def _bootstrap(
    parts: np.ndarray, weights: np.ndarray | None, rng: np.random.Generator, rounds: int
) -> tuple[float, float]:
    """A 95 % percentile interval of the mean of `parts` (or, with `weights`, of
    sum(parts) / sum(weights)) over requests resampled with replacement."""
    n = len(parts)
    stats = np.empty(rounds)
    for lo in range(0, rounds, 50):
        idx = rng.integers(0, n, size=(min(50, rounds - lo), n))
        num = parts[idx].sum(axis=1)
        den = weights[idx].sum(axis=1) if weights is not None else np.full(len(idx), float(n))
        # A resample whose weights are all 0 has no self-normalised value: left out.
        stats[lo : lo + len(idx)] = np.divide(
            num, den, out=np.full(len(idx), np.nan), where=den > 0
        )
    if np.isnan(stats).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(stats, [2.5, 97.5])
    return float(low), float(high)


def evaluate(
    logged: Sequence[LoggedRequest],
    target: PolicySpec,
    *,
    rules: Guardrails = DEFAULT_RULES,
    target_uses: str = "ranker",
    dm_draws: int = 4,
    bootstrap: int = 500,
    seed: int = 0,
    click_model: ClickModel | None = None,
    marginal_samples: int = 200,
) -> Evaluation:
    """Estimate `target`'s clicks per list on the logged requests.

    `target_uses`: "ranker" (the target ranks the pool by the ranker's scores) or
    "values" (by the values the logging policy used, e.g. the same bandit's).
    `click_model`: the direct method's model; None fits one on the log.
    `marginal_samples`: lists drawn per request and policy for `iips`'s marginals.

    Raises:
        ValueError: nothing was logged, or a request is malformed (named).
    """
    if not logged:
        raise ValueError("no logged requests: nothing to evaluate")
    k = max(len(r.order) for r in logged)
    dim = logged[0].features.shape[1]
    n = len(logged)
    ratio = np.ones((n, k))
    clicks = np.zeros((n, k))
    present = np.zeros((n, k), bool)
    dists: list[np.ndarray] = []  # the target's distribution at each logged position
    for i, r in enumerate(logged):
        m = len(r.order)
        if not (len(r.propensities) == len(r.clicks) == m):
            raise ValueError(f"request {i}: order, propensities and clicks differ in length")
        if (r.propensities <= 0).any():
            raise ValueError(f"request {i}: a logged propensity is not above 0")
        scores = r.ranker if target_uses == "ranker" else r.values
        pe, dist = probabilities(target, scores, r.ranker, r.categories, r.order, rules)
        dists.append(dist)
        ratio[i, :m] = pe / r.propensities
        clicks[i, :m] = r.clicks
        present[i, :m] = True

    # Click model on every logged impression.
    xs = np.concatenate([r.features[r.order] for r in logged])
    pos = np.concatenate([np.arange(len(r.order)) for r in logged])
    ys = np.concatenate([r.clicks for r in logged]).astype(np.float64)
    model = click_model or ClickModel(k, dim).fit(xs, pos, ys)

    cumulative = np.cumprod(ratio, axis=1)
    w = cumulative * present  # w_k, zero past a list's end
    w_prev = np.hstack([np.ones((n, 1)), w[:, :-1]]) * present
    whole = cumulative[:, -1]  # the ratio is 1 past a list's end
    total = clicks.sum(axis=1)

    q_logged = np.zeros((n, k))
    q_expected = np.zeros((n, k))
    dm = np.zeros(n)
    rng = np.random.default_rng(seed)
    for i, r in enumerate(logged):
        m = len(r.order)
        scores = r.ranker if target_uses == "ranker" else r.values
        q = np.stack([model.predict(r.features, pos_k) for pos_k in range(m)])  # [m, pool]
        q_logged[i, :m] = q[np.arange(m), r.order]
        q_expected[i, :m] = (dists[i] * q).sum(axis=1)
        if m == 1:  # one position: the expectation itself
            dm[i] = q_expected[i, 0]
            continue
        draws = 1 if not target.stochastic else dm_draws
        got = 0.0
        for _ in range(draws):
            slate = draw(target, scores, r.ranker, r.categories, m, int(rng.integers(2**62)), rules)
            got += float(q[np.arange(len(slate.order)), slate.order].sum())
        dm[i] = got / draws

    parts = {
        "ips": whole * total,
        "cascade_ips": (w * clicks).sum(axis=1),
        "dm": dm,
        "dr": (w * (clicks - q_logged) + w_prev * q_expected).sum(axis=1),
    }
    cascade_ess = min(_ess(w[:, j][present[:, j]]) for j in range(k))
    ess = {
        "ips": _ess(whole),
        "snips": _ess(whole),
        "cascade_ips": cascade_ess,
        "dm": float(n),
        "dr": cascade_ess,
    }
    if all(r.policy is not None for r in logged):
        marginal = _marginal_ratios(logged, target, rules, target_uses, marginal_samples, rng)
        parts["iips"] = (marginal * clicks).sum(axis=1)
        ess["iips"] = min(_ess(marginal[:, j][present[:, j]]) for j in range(k))
    estimates: dict[str, Estimate] = {}
    for name, contrib in parts.items():
        low, high = _bootstrap(contrib, None, rng, bootstrap)
        estimates[name] = Estimate(float(contrib.mean()), low, high, ess[name])
    sn_value = float((whole * total).sum() / whole.sum()) if whole.sum() > 0 else float("nan")
    low, high = _bootstrap(whole * total, whole, rng, bootstrap)
    estimates["snips"] = Estimate(sn_value, low, high, ess["snips"])
    estimates = {name: estimates[name] for name in ESTIMATORS if name in estimates}

    warnings = []
    floor = max(MIN_ESS, MIN_ESS_SHARE * n)
    for name in ("ips", "cascade_ips", "iips", "dr"):
        if name in estimates and estimates[name].ess < floor:
            warnings.append(
                f"{name}: effective sample size {estimates[name].ess:.0f} of {n} requests is "
                f"below {floor:.0f}: its weights are too heavy to trust (the target strays far "
                "from what was logged; log with more exploration or evaluate a closer target)"
            )
    return Evaluation(target.name, n, estimates, float(total.mean()), warnings)


def _marginal_ratios(
    logged: Sequence[LoggedRequest],
    target: PolicySpec,
    rules: Guardrails,
    target_uses: str,
    samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """m_e(a_k, k) / m_b(a_k, k) per request and logged position ([requests, positions],
    0 past a list's end), from `samples` lists of each policy per request (requests of
    one logging policy, pool size and list length drawn together)."""
    if samples < 1:
        raise ValueError(f"marginal_samples must be at least 1, got {samples}")
    k = max(len(r.order) for r in logged)
    out = np.zeros((len(logged), k))
    groups: dict[tuple[PolicySpec | None, int, int], list[int]] = {}
    for i, r in enumerate(logged):
        groups.setdefault((r.policy, len(r.ranker), len(r.order)), []).append(i)
    chunk = max(1, 20_000 // samples)  # lists drawn at once: bounded memory
    for (policy, _, m), members in groups.items():
        assert policy is not None  # checked by the caller
        for lo in range(0, len(members), chunk):
            part = [logged[i] for i in members[lo : lo + chunk]]
            ranker = np.stack([r.ranker for r in part])
            values = np.stack([r.values for r in part])
            cats = np.stack([r.categories for r in part])
            order = np.stack([r.order for r in part])
            at = (np.arange(len(part))[:, None], np.arange(m)[None, :], order)
            logging = position_marginals(policy, values, ranker, cats, m, samples, rng, rules)
            m_b = (logging[at] * samples + 1.0) / (samples + 1.0)  # the logged list counts
            scores = ranker if target_uses == "ranker" else values
            m_e = position_marginals(target, scores, ranker, cats, m, samples, rng, rules)[at]
            out[members[lo : lo + chunk], :m] = m_e / m_b
    return out


def format_evaluation(result: Evaluation, truth: float | None = None) -> str:
    lines = [
        f"target {result.target} on {result.requests} logged requests "
        f"(logging policy's own value: {result.logged_value:.4f} clicks per list)",
        f"{'estimator':<12} {'value':>8} {'95% CI':>19} {'ESS':>9}"
        + ("  error vs truth" if truth is not None else ""),
    ]
    for name, e in result.estimates.items():
        row = f"{name:<12} {e.value:8.4f} [{e.low:8.4f}, {e.high:8.4f}] {e.ess:9.0f}"
        if truth is not None:
            row += f"  {100 * (e.value - truth) / truth:+6.1f} %"
        lines.append(row)
    if truth is not None:
        lines.append(f"{'truth':<12} {truth:8.4f}")
    lines.append(
        "dm's interval holds its fitted click model fixed: it shows sampling noise, not the "
        "model's bias"
    )
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def logged_from_serve_log(
    serves: pa.Table, impressions: pa.Table, policy_prefix: str = ""
) -> tuple[list[LoggedRequest], dict[str, int]]:
    """The logged requests of a serve log (`inkling.events.servelog`) whose policy drew
    from a pool, with their clicks from `inkling attribute`'s labelled impressions.

    Returns the requests and counts of what was left out and why: `greedy` (no pool: a
    deterministic list carries no exploration), `other_policy` (not `policy_prefix`),
    `unlabelled` (no labelled impression: attribution has not run over it).
    """
    clicked: dict[str, set[int]] = {}
    labelled: set[str] = set()
    ids = impressions.column("request_id").to_pylist()
    positions = impressions.column("position").to_pylist()
    for rid, pos, c in zip(ids, positions, impressions.column("clicked").to_pylist(), strict=True):
        labelled.add(rid)
        if c:
            clicked.setdefault(rid, set()).add(int(pos))
    skipped = {"greedy": 0, "other_policy": 0, "unlabelled": 0}
    out: list[LoggedRequest] = []
    for row in serves.to_pylist():
        pool_ids = row["pool_item_ids"]
        if not pool_ids:
            skipped["greedy"] += 1
            continue
        if not (row["policy"] or "").startswith(policy_prefix):
            skipped["other_policy"] += 1
            continue
        if row["request_id"] not in labelled:
            skipped["unlabelled"] += 1
            continue
        index = {item: i for i, item in enumerate(pool_ids)}
        shown = [index[i] for i in row["item_ids"] if i in index]
        m = len(shown)  # the drawn positions: the rest of a list is greedy (probability 1)
        _, codes = np.unique(np.asarray(row["pool_categories"], dtype=object), return_inverse=True)
        names = row["pool_feature_names"] or []
        hit = clicked.get(row["request_id"], set())
        out.append(
            LoggedRequest(
                ranker=np.asarray(row["pool_scores"], np.float64),
                values=np.asarray(row["pool_values"], np.float64),
                categories=codes,
                features=np.asarray(row["pool_features"], np.float64).reshape(
                    len(pool_ids), len(names)
                ),
                order=np.asarray(shown, np.int64),
                propensities=np.asarray(row["propensities"][:m], np.float64),
                clicks=np.array([1.0 if p in hit else 0.0 for p in range(m)]),
                policy=PolicySpec.parse(row["policy"]),
            )
        )
    return out, skipped
