"""Simulated users who answer served lists: the feedback loop on data with a known truth.

Each simulated request is served a list by its experiment arm's policy, and the user
responds by a documented click model. The simulator writes what production would: the
serve log (one `ServeRecord` row per answer) and the events (with the answer's
`request_id`, as a client that keeps it sends them), so `inkling attribute` and the
experiment report run on it unchanged; and it keeps the truth (each impression's click
probability, and what the user did) to check them against.

World (all draws from one `numpy.random.Generator` seeded by `SimulationConfig.seed`)
    The catalogue given (`item_id`, `category`, `price`; e.g. `inkling generate`'s), each
    item's popularity p_i ∝ rank_in_category^-1 × the category's share of the catalogue,
    and `users` users ("u1" .. "u<users>", the generator's ids) with a Dirichlet taste over the categories.

Requests
    `requests` requests spread uniformly over `hours` hours from `start`; each from a
    uniformly drawn user, in session "<user>-h<hour>"; assigned to an arm by
    `inkling.experiments.Experiment.assign` on the user id (the ranking server's rule).

Policy of an arm
    `candidates` items drawn by popularity without replacement (Gumbel top-k), scored by
    the log of their true attractiveness plus Normal(0, `noise`) noise; the best
    `list_size` are served, best first, with propensity 1 (deterministic given the draw).
    Less noise is a better ranker.

Click model (position-based: examination × attractiveness)
    P(click | user u, item i at position k) = min(1, e_k × a_ui × (1 + lift_arm)), where
    e_k = (1 + k)^-`position_decay` is the chance the user examines position k, and
    a_ui = sigmoid(`taste_weight` × log(C × taste_u[category_i]) + `popularity_weight` ×
    log(p_i × N) + `attractiveness_bias`) is how attractive item i is to u (C categories,
    N items). Clicks are independent across positions. A click leads to `add_to_cart`
    with probability `p_cart`, which leads to `purchase` with `p_purchase`; revenue is the
    item's price. `lift_arm` is the arm's known effect: with lift 0.05 its impressions
    are clicked 5 % more often than under the same lists without it (up to the cap).

Events of a request
    `item_view` of every served item 0.5 s after the answer (the client shows the whole
    list), `click` 2-60 s after it, `add_to_cart` 10-120 s after the click, `purchase`
    30-600 s after the cart: all within attribution's default 30-minute window. With
    probability `p_request_id` an event carries the answer's request id; otherwise
    attribution must match it by user and item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from inkling.events.schema import EVENT_SCHEMA, TIMESTAMP_TYPE
from inkling.events.servelog import SERVE_SCHEMA
from inkling.experiments import Arm, Experiment

LABELS = ("shown", "clicked", "added_to_cart", "purchased")


@dataclass(frozen=True)
class SimArm:
    name: str
    share: float
    noise: float = 1.0
    """The policy's ranking noise (standard deviation on the log-attractiveness scale)."""
    lift: float = 0.0
    """The known effect on every impression's click probability (0.05 = +5 %)."""
    model_version: str = ""
    """What the serve records name as the model; default `sim:<name>`."""


@dataclass(frozen=True)
class SimulationConfig:
    requests: int = 20_000
    users: int = 2_000
    hours: int = 24
    start: str = "2026-11-01T00:00:00"
    """UTC, ISO."""
    experiment: str = "ranker-ab"
    arms: tuple[SimArm, ...] = field(
        default_factory=lambda: (SimArm("control", 0.5), SimArm("candidate", 0.5))
    )
    salt: str = ""
    list_size: int = 10
    candidates: int = 100
    position_decay: float = 1.0
    taste_weight: float = 1.0
    popularity_weight: float = 0.3
    attractiveness_bias: float = -1.5
    p_cart: float = 0.3
    p_purchase: float = 0.5
    p_request_id: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.users < 1 or self.hours < 1:
            raise ValueError("requests, users and hours must be at least 1")
        if not 1 <= self.list_size <= self.candidates:
            raise ValueError("list_size must be between 1 and candidates")
        if any(a.lift <= -1 for a in self.arms):
            raise ValueError("a lift must be above -1 (-100 %)")

    @property
    def design(self) -> Experiment:
        return Experiment(
            self.experiment, tuple(Arm(a.name, a.share) for a in self.arms), salt=self.salt
        )


@dataclass(frozen=True)
class Simulation:
    """What a simulation wrote, and its truth."""

    serves: pa.Table
    """SERVE_SCHEMA rows, one per answer."""
    events: pa.Table
    """EVENT_SCHEMA rows."""
    impressions: pa.Table
    """One row per served item: request_id, user_id, arm, served_at, position, item_id,
    click_probability (the truth), and the labels the user's events set."""
    revenue: dict[str, float]
    """Revenue per arm (the prices of purchased items)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate(config: SimulationConfig, items: pa.Table) -> Simulation:
    """Run the simulation over the catalogue `items` (item_id, category, price)."""
    rng = np.random.default_rng(config.seed)
    item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    categories, cat_of = np.unique(
        np.asarray(items.column("category").to_pylist(), dtype=object), return_inverse=True
    )
    prices = np.nan_to_num(np.asarray(items.column("price").to_pylist(), dtype=np.float64))
    n_items, n_cat, n = len(item_ids), len(categories), config.requests
    if n_items < config.candidates:
        raise ValueError(f"{n_items} items, fewer than {config.candidates} candidates")

    # --- world -----------------------------------------------------------------------------
    order = np.lexsort((np.arange(n_items), cat_of))
    rank = np.empty(n_items)
    first = np.searchsorted(cat_of[order], np.arange(n_cat))
    rank[order] = np.arange(n_items) - first[cat_of[order]] + 1
    cat_share = np.bincount(cat_of, minlength=n_cat) / n_items
    popularity = cat_share[cat_of] / rank
    popularity /= popularity.sum()
    taste = rng.dirichlet(np.full(n_cat, 0.3), size=config.users)

    # --- requests --------------------------------------------------------------------------
    start_us = int(datetime.fromisoformat(config.start).replace(tzinfo=UTC).timestamp() * 1e6)
    served_us = np.sort(rng.integers(0, config.hours * 3_600_000_000, size=n)) + start_us
    user = rng.integers(0, config.users, size=n)
    user_ids = np.array([f"u{u + 1}" for u in range(config.users)], dtype=object)[user]
    hour = (served_us - start_us) // 3_600_000_000
    session_ids = np.array([f"{u}-h{h}" for u, h in zip(user_ids, hour, strict=True)], dtype=object)
    design = config.design
    arm_of_user = {u: design.assign(u) for u in np.unique(user_ids)}
    arm_names = np.array([arm_of_user[u] or "" for u in user_ids], dtype=object)
    arms = {a.name: a for a in config.arms}
    noise = np.array([arms[a].noise if a else 1.0 for a in arm_names])
    lift = np.array([arms[a].lift if a else 0.0 for a in arm_names])

    # --- policy: candidates by popularity, ranked by noisy attractiveness ------------------
    k, c = config.list_size, config.candidates
    shown = np.empty((n, k), np.int64)
    attract = np.empty((n, k))
    served_scores = np.empty((n, k), np.float32)
    chunk = max(1, 4_000_000 // n_items)  # requests per Gumbel draw: bounded memory
    log_pop = np.log(popularity)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        pool = np.argpartition(
            -(log_pop[None, :] + rng.gumbel(size=(hi - lo, n_items))), c - 1, axis=1
        )[:, :c]
        logit = (
            config.taste_weight * np.log(n_cat * taste[user[lo:hi, None], cat_of[pool]] + 1e-12)
            + config.popularity_weight * np.log(popularity[pool] * n_items)
            + config.attractiveness_bias
        )
        scores = logit + rng.normal(size=(hi - lo, c)) * noise[lo:hi, None]
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        shown[lo:hi] = np.take_along_axis(pool, best, axis=1)
        attract[lo:hi] = _sigmoid(np.take_along_axis(logit, best, axis=1))
        served_scores[lo:hi] = np.take_along_axis(scores, best, axis=1)
    examine = (1.0 + np.arange(k)) ** -config.position_decay
    p_click = np.minimum(1.0, examine[None, :] * attract * (1.0 + lift[:, None]))
    clicked = rng.random((n, k)) < p_click
    carted = clicked & (rng.random((n, k)) < config.p_cart)
    bought = carted & (rng.random((n, k)) < config.p_purchase)

    request_ids = np.array([f"sim{config.seed}-{i:08d}" for i in range(n)], dtype=object)
    serves = _serve_table(config, request_ids, served_us, user_ids, session_ids, arm_names,
                          item_ids[shown], served_scores)  # fmt: skip
    events = _event_table(config, rng, request_ids, served_us, user_ids, session_ids,
                          item_ids[shown], clicked, carted, bought)  # fmt: skip
    flat = np.repeat(np.arange(n), k)
    impressions = pa.table(
        {
            "request_id": pa.array(request_ids[flat], pa.string()),
            "user_id": pa.array(user_ids[flat], pa.string()),
            "arm": pa.array(arm_names[flat], pa.string()),
            "served_at": pa.array(served_us[flat], pa.int64()).cast(TIMESTAMP_TYPE),
            "position": pa.array(np.tile(np.arange(k), n), pa.int32()),
            "item_id": pa.array(item_ids[shown].ravel(), pa.string()),
            "click_probability": pa.array(p_click.ravel()),
            "shown": pa.array(np.ones(n * k, bool)),
            "clicked": pa.array(clicked.ravel()),
            "added_to_cart": pa.array(carted.ravel()),
            "purchased": pa.array(bought.ravel()),
        }
    )
    spent = (bought * prices[shown]).sum(axis=1)
    revenue = {a.name: float(spent[arm_names == a.name].sum()) for a in config.arms}
    return Simulation(serves, events, impressions, revenue)


def _serve_table(
    config: SimulationConfig,
    request_ids: np.ndarray,
    served_us: np.ndarray,
    user_ids: np.ndarray,
    session_ids: np.ndarray,
    arm_names: np.ndarray,
    shown: np.ndarray,
    scores: np.ndarray,
) -> pa.Table:
    n, k = shown.shape
    versions = {a.name: a.model_version or f"sim:{a.name}" for a in config.arms}
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))

    def lists(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values)

    columns = {
        "request_id": pa.array(request_ids, pa.string()),
        "served_at": pa.array(served_us, pa.int64()).cast(TIMESTAMP_TYPE),
        "user_id": pa.array(user_ids, pa.string()),
        "session_id": pa.array(session_ids, pa.string()),
        "surface": pa.array(["home"] * n, pa.string()),
        "operation": pa.array(["recommend"] * n, pa.string()),
        "item_ids": lists(pa.array(shown.ravel(), pa.string())),
        "scores": lists(pa.array(scores.ravel(), pa.float32())),
        "sources": lists(pa.array(["ann"] * (n * k), pa.string())),
        "propensities": lists(pa.array(np.ones(n * k, np.float32))),
        "model_version": pa.array([versions.get(a, "sim:control") for a in arm_names], pa.string()),
        "index_version": pa.nulls(n, pa.string()),
        "feature_service": pa.array(["ranker_v1"] * n, pa.string()),
        "experiment": pa.array([config.experiment if a else None for a in arm_names], pa.string()),
        "arm": pa.array([a or None for a in arm_names], pa.string()),
        "degraded": pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())
        ),
        "policy": pa.array(["greedy"] * n, pa.string()),
    }
    for f in SERVE_SCHEMA:
        if f.name not in columns:  # what only a stochastic policy logs
            columns[f.name] = pa.nulls(n, f.type)
    return pa.Table.from_arrays([columns[f.name] for f in SERVE_SCHEMA], schema=SERVE_SCHEMA)


def _event_table(
    config: SimulationConfig,
    rng: np.random.Generator,
    request_ids: np.ndarray,
    served_us: np.ndarray,
    user_ids: np.ndarray,
    session_ids: np.ndarray,
    shown: np.ndarray,
    clicked: np.ndarray,
    carted: np.ndarray,
    bought: np.ndarray,
) -> pa.Table:
    n, k = shown.shape
    request_of = np.repeat(np.arange(n), k).reshape(n, k)
    position = np.tile(np.arange(k), (n, 1))
    click_at = served_us[:, None] + rng.integers(2_000_000, 60_000_000, size=(n, k))
    cart_at = click_at + rng.integers(10_000_000, 120_000_000, size=(n, k))
    buy_at = cart_at + rng.integers(30_000_000, 600_000_000, size=(n, k))
    parts = [
        ("item_view", np.ones((n, k), bool), served_us[:, None] + np.zeros((n, k), np.int64) + 500_000),
        ("click", clicked, click_at),
        ("add_to_cart", carted, cart_at),
        ("purchase", bought, buy_at),
    ]  # fmt: skip
    kinds, rows, slots, times = [], [], [], []
    for name, mask, at in parts:
        kinds.append(np.full(int(mask.sum()), name, dtype=object))
        rows.append(request_of[mask])
        slots.append(position[mask])
        times.append(at[mask])
    kind = np.concatenate(kinds)
    row = np.concatenate(rows)
    slot = np.concatenate(slots)
    ts = np.concatenate(times)
    keeps_id = rng.random(len(row)) < config.p_request_id
    event_ids = [f"{request_ids[r]}-{s}-{t}" for r, s, t in zip(row, slot, kind, strict=True)]
    columns = {
        "event_id": pa.array(event_ids, pa.string()),
        "user_id": pa.array(user_ids[row], pa.string()),
        "session_id": pa.array(session_ids[row], pa.string()),
        "item_id": pa.array(shown[row, slot], pa.string()),
        "event_type": pa.array(kind, pa.string()),
        "timestamp": pa.array(ts, pa.int64()).cast(TIMESTAMP_TYPE),
        "dwell_ms": pa.nulls(len(row), pa.int64()),
        "scroll_depth": pa.nulls(len(row), pa.float64()),
        "device": pa.array(["mobile"] * len(row), pa.string()),
        "surface": pa.array(["home"] * len(row), pa.string()),
        "position": pa.array(slot, pa.int32()),
        "request_id": pa.array(np.where(keeps_id, request_ids[row], None), pa.string()),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)
    return table.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])
