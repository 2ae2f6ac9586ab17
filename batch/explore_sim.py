"""Exploration on simulated users with a known truth: off-policy estimates checked against
the value a target policy really has, and a week of the bandit against the greedy ranker.

World (`World.build`, all draws from `ExploreConfig.seed`)
    `items` items in `categories` categories, each with a quality q_i ~ Normal(0, 1);
    `users` users with a Dirichlet(0.3) taste over the categories. User u clicks item i
    at position k with probability e_k * a_ui (the position-based model of
    `batch.simulate`): e_k = (1 + k)^-`position_decay`, a_ui = sigmoid(log(C taste_u[c_i])
    + `quality_weight` q_i + `bias`).

Requests (`requests`)
    A uniformly drawn user and `candidates` items drawn uniformly from those available
    (retrieval's stand-in); the ranker scores each by its true logit plus
    Normal(0, `noise`) noise; the policy draws `list_size` positions from the best `pool`
    by its values, under the diversity rule, seeded per request (`inkling.exploration`).

The week (`bandit_week`)
    `days` days of `requests_per_day` requests, after `warmup_days` days that are not
    measured. A share `new_share` of the items arrives during the measured week
    (uniformly over it); the rest have a history. The greedy ranker is
    the production baseline's shape: log(C taste match) + log(2 + clicks observed so
    far) + log(recency): it knows the user's taste but learns items only through the
    clicks they get. The bandit (`inkling.bandit`) draws from the same candidates by the
    ranker's score plus its UCB value over the context (ranker score, popularity,
    freshness, intent match) plus the per-item exposure bonus, each standardised, as the
    ranking server does (`LinearUCB.over_ranker`). Popularity is the item's impressions
    as of the last midnight (the daily batch's `item_pop_7d`, which counts the item views
    of every shown item); its statistics are updated every hour from the
    impressions and clicks (as the stream workers do, with an hour's staleness instead
    of a second's). Reward is expected
    clicks per list (the click probabilities summed), so the curves show the policies,
    not the click noise; regret is against the best list of the same candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batch.ope import LoggedRequest
from inkling.bandit import LinearUCB, Statistics, contexts, increments
from inkling.exploration import Guardrails, PolicySpec, draw

RULES = Guardrails(max_per_category=3, window=20)


@dataclass(frozen=True)
class ExploreConfig:
    items: int = 1000
    categories: int = 10
    users: int = 500
    candidates: int = 60
    pool: int = 20
    list_size: int = 5
    noise: float = 1.0
    quality_weight: float = 1.0
    position_decay: float = 1.0
    bias: float = -1.5
    seed: int = 0


@dataclass(frozen=True)
class World:
    config: ExploreConfig
    category: np.ndarray
    quality: np.ndarray
    taste: np.ndarray
    examine: np.ndarray

    @classmethod
    def build(cls, config: ExploreConfig) -> World:
        rng = np.random.default_rng(config.seed)
        return cls(
            config,
            rng.integers(0, config.categories, size=config.items),
            rng.normal(size=config.items),
            rng.dirichlet(np.full(config.categories, 0.3), size=config.users),
            (1.0 + np.arange(config.list_size)) ** -config.position_decay,
        )

    def taste_logit(self, user: int, items: np.ndarray) -> np.ndarray:
        c = self.config
        return np.log(c.categories * self.taste[user, self.category[items]] + 1e-12)

    def logit(self, user: int, items: np.ndarray) -> np.ndarray:
        c = self.config
        return self.taste_logit(user, items) + c.quality_weight * self.quality[items] + c.bias

    def attractiveness(self, user: int, items: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(user, items)))


@dataclass(frozen=True)
class Request:
    user: int
    items: np.ndarray
    """The candidates, best first by the policy's values (the pool is the first `pool`)."""
    ranker: np.ndarray
    attract: np.ndarray
    features: np.ndarray
    seed: int


def requests(world: World, n: int, seed: int) -> list[Request]:
    """`n` requests whose pools are ranked by the noisy ranker."""
    c = world.config
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        user = int(rng.integers(c.users))
        cand = rng.choice(c.items, size=c.candidates, replace=False)
        score = world.logit(user, cand) + rng.normal(size=c.candidates) * c.noise
        top = np.argsort(-score, kind="stable")[: c.pool]
        items = cand[top]
        intent = world.category[items] == np.argmax(world.taste[user])
        x = contexts(score[top], np.zeros(len(top)), np.full(len(top), 365.0), intent)
        out.append(
            Request(user, items, score[top], world.attractiveness(user, items), x,
                    int(rng.integers(2**62)))
        )  # fmt: skip
    return out


def log_policy(
    world: World, reqs: list[Request], spec: PolicySpec, seed: int
) -> list[LoggedRequest]:
    """Serve each request with `spec` and draw the clicks: the logged data."""
    rng = np.random.default_rng(seed)
    k = world.config.list_size
    logged = []
    for r in reqs:
        cats = world.category[r.items]
        slate = draw(spec, r.ranker, r.ranker, cats, k, r.seed, RULES)
        p = world.examine[: len(slate.order)] * r.attract[slate.order]
        clicks = (rng.random(len(p)) < p).astype(np.float64)
        logged.append(
            LoggedRequest(r.ranker, r.ranker, cats, r.features, slate.order, slate.propensities,
                          clicks, spec)
        )  # fmt: skip
    return logged


def true_value(world: World, reqs: list[Request], spec: PolicySpec, draws: int = 50) -> float:
    """The target's expected clicks per list on these requests (its lists drawn `draws`
    times per request; one draw for a deterministic policy)."""
    k = world.config.list_size
    total = 0.0
    times = draws if spec.stochastic else 1
    for i, r in enumerate(reqs):
        cats = world.category[r.items]
        for d in range(times):
            slate = draw(spec, r.ranker, r.ranker, cats, k, i * 7919 + d, RULES)
            total += float((world.examine[: len(slate.order)] * r.attract[slate.order]).sum())
    return total / (len(reqs) * times)


# ---------------------------------------------------------------------------- the week


@dataclass(frozen=True)
class WeekConfig:
    world: ExploreConfig = ExploreConfig(items=600, candidates=100, pool=30, list_size=10)
    days: int = 7
    requests_per_day: int = 2000
    new_share: float = 0.3
    history_impressions: float = 400.0
    """Impressions an old item had before the week, scaled by its popularity rank."""
    alpha: float = 0.05
    temperature: float = 0.1
    epsilon: float = 0.0
    item_bonus: float = 0.2
    """`inkling.bandit.ITEM_BONUS`."""
    warmup_days: int = 1
    """Days each policy serves before the measured week, with the old items only (the
    bandit's statistics then start the week as a running system's would: learned)."""


@dataclass(frozen=True)
class WeekResult:
    policy: str
    reward: np.ndarray
    """Expected clicks of each request's list, in order."""
    oracle: np.ndarray
    """Expected clicks of the best list of the same candidates."""
    new_rank_correlation: np.ndarray
    """Per day: among the new items that have arrived, the Spearman correlation between
    their click-through rate as observed since arrival ((clicks + 1.5) / (impressions +
    10): a prior of 15 % over 10 impressions) and their true one (the mean over users of
    their attractiveness): 1 when the system has learned their true CTR ranking."""
    new_impressions: np.ndarray
    """Per day: mean impressions per arrived new item."""


def bandit_week(config: WeekConfig, policy: str) -> WeekResult:
    """One week of `policy` ("greedy" or "bandit") on a fresh copy of the world."""
    wc = config.world
    world = World.build(wc)
    rng = np.random.default_rng(wc.seed + 1)
    n_items = wc.items
    is_new = rng.random(n_items) < config.new_share
    arrival_h = np.where(is_new, rng.uniform(0, 24 * config.days, n_items), -np.inf)
    # The history of the old items: impressions by a popularity rank, clicks by quality.
    rank = rng.permutation(n_items) + 1
    shown_before = np.where(is_new, 0.0, config.history_impressions / np.sqrt(rank))
    clicks_before = rng.poisson(
        shown_before * 0.15 / (1 + np.exp(-wc.quality_weight * world.quality))
    )
    clicks = clicks_before.astype(np.float64)
    impressions = shown_before.copy()
    age_days = np.where(is_new, 0.0, rng.uniform(30, 365, n_items))
    spec = (
        PolicySpec.of("bandit", epsilon=config.epsilon, temperature=config.temperature,
                      pool=wc.pool)
        if policy == "bandit" else PolicySpec()
    )  # fmt: skip
    true_ctr = np.mean(
        [world.attractiveness(u, np.arange(n_items)) for u in range(wc.users)], axis=0
    )
    stats = Statistics.empty()
    model = LinearUCB.solve(stats, config.alpha, item_bonus=config.item_bonus)
    pending_x: list[np.ndarray] = []
    pending_c: list[np.ndarray] = []
    rewards, oracle = [], []
    rank_corr, new_shown = [], []
    per_hour = config.requests_per_day // 24
    k = wc.list_size
    exposure = impressions.copy()
    for hour in range(-24 * config.warmup_days, 24 * config.days):
        if hour % 24 == 0:  # the daily batch's item_pop_7d: exposure as of midnight
            exposure = impressions.copy()
        now_h = hour + 0.5
        measured = hour >= 0
        arrived = np.flatnonzero(arrival_h <= now_h)
        fresh_age = np.where(is_new, np.maximum(now_h - arrival_h, 0) / 24, age_days + hour / 24)
        for _ in range(per_hour):
            user = int(rng.integers(wc.users))
            cand = rng.choice(arrived, size=min(wc.candidates, len(arrived)), replace=False)
            ranker = (
                world.taste_logit(user, cand)
                + np.log(2.0 + clicks[cand])
                + np.log(0.75 + 0.25 * np.exp(-fresh_age[cand] / 30))
            )
            intent = world.category[cand] == np.argmax(world.taste[user])
            x = contexts(ranker, exposure[cand], fresh_age[cand], intent)
            values = model.over_ranker(x) if spec.kind == "bandit" else ranker
            top = np.argsort(-values, kind="stable")[: wc.pool]
            cats = world.category[cand[top]]
            slate = draw(spec, values[top], ranker[top], cats, k, int(rng.integers(2**62)), RULES)
            shown = cand[top][slate.order]
            a = world.attractiveness(user, shown)
            p = world.examine[: len(shown)] * a
            if measured:
                rewards.append(float(p.sum()))
                best = np.sort(world.attractiveness(user, cand))[::-1][: len(shown)]
                oracle.append(float((world.examine[: len(best)] * best).sum()))
            got = rng.random(len(p)) < p
            impressions[shown] += 1
            clicks[shown[got]] += 1
            pending_x.append(x[top][slate.order])
            pending_c.append(x[top][slate.order][got])
        # The hour's statistics, as the workers add them; the rankers read them.
        stats = stats.plus(increments(np.vstack(pending_x), np.vstack(pending_c)))
        model = LinearUCB.solve(stats, config.alpha, item_bonus=config.item_bonus)
        pending_x, pending_c = [], []
        if measured and (hour + 1) % 24 == 0:
            new = arrived[is_new[arrived]]
            observed = (clicks[new] + 1.5) / (impressions[new] + 10.0)
            rank_corr.append(_spearman(observed, true_ctr[new]))
            new_shown.append(float(impressions[new].mean()) if len(new) else 0.0)
    return WeekResult(
        policy, np.array(rewards), np.array(oracle), np.array(rank_corr), np.array(new_shown)
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by position; 0 for fewer than 3 items)."""
    if len(a) < 3:
        return 0.0
    ra = np.argsort(np.argsort(a, kind="stable")).astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable")).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_week(results: list[WeekResult], path: str) -> None:
    """Over the week: each policy's cumulative regret, its cumulative reward minus the
    first policy's (the baseline), and how well the new items' observed CTR ranks them
    by day (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (regret, gain, ranks) = plt.subplots(1, 3, figsize=(15, 4))
    base = results[0]
    for r in results:
        regret.plot(np.cumsum(r.oracle - r.reward), label=r.policy)
        gain.plot(np.cumsum(r.reward - base.reward), label=f"{r.policy} - {base.policy}")
        ranks.plot(np.arange(1, len(r.new_rank_correlation) + 1), r.new_rank_correlation,
                   marker="o", label=r.policy)  # fmt: skip
    regret.set(title="Cumulative regret (vs the best list of the candidates)", xlabel="request")
    gain.set(title=f"Cumulative reward minus {base.policy}'s (expected clicks)", xlabel="request")
    gain.axhline(0, color="grey", lw=0.8)
    ranks.set(title="New items: observed vs true CTR, rank correlation", xlabel="day")
    for ax in (regret, gain, ranks):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "ExploreConfig",
    "WeekConfig",
    "World",
    "bandit_week",
    "log_policy",
    "plot_week",
    "requests",
    "true_value",
]
