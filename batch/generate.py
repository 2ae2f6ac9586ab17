"""A synthetic clickstream in which the current session's intent matters.

The generative model (all draws from one `numpy.random.Generator` seeded by
`GeneratorConfig.seed`, so a seed gives the same events byte for byte):

Catalogue
    `categories` categories with Zipf-like shares (rank^-0.7). Each item gets a
    category by those shares, a popularity weight rank_in_category^-`zipf_alpha`
    (a few hits, a long tail), a log-normal price around a per-category level, a
    creation time up to a year before the log starts, `in_stock` (97 %) and
    `blocked` (0.5 %).

Users
    A long-term taste: a Dirichlet draw over categories concentrated on a few of
    them; an activity weight (log-normal) that decides how many sessions each
    user has; a primary device used in 80 % of sessions.

Sessions
    A user (by activity), a start time (a uniform day, evening-heavy hour), a
    number of steps (1 + geometric, mean ~`mean_steps`), and a short-term intent
    category: from the user's taste with probability `p_intent_from_taste`, else
    from the global category shares, so it often differs from the long-term taste.
    At each later step the intent drifts to a fresh draw with probability `p_drift`.

Steps
    One `page_view`, then a slate of `slate_size` items (`item_view` events with
    `position`): each slot comes from the intent category (50 %), the user's taste
    (20 %) or the global popularity (30 %). The user clicks at most one slot,
    chosen by a random-utility model (Gumbel noise) whose utility is
    2.5·[item in intent] + 2.0·taste(category) + 0.4·log popularity − 0.3·position,
    against an outside option (no click). The clicked item's utility is its
    *interest*: dwell time (log-normal) and scroll depth (beta) rise with it, and so
    do the chances of `add_to_cart` (falling with price) and then `purchase` (35 %).

Because clicks follow the session's intent far more than the long-term taste,
what the user did a moment ago predicts the next click better than their history.

`write_synthetic` appends a generated log to the event log and writes its catalogue:
what `inkling generate`, the demo and the benchmarks run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.importers import write_table_atomic
from inkling.config import Settings
from inkling.events.eventlog import EventLog
from inkling.events.schema import EVENT_SCHEMA, ITEM_SCHEMA, TIMESTAMP_TYPE

DEVICES = np.array(["mobile", "desktop", "tablet"])
DEVICE_SHARES = np.array([0.6, 0.35, 0.05])
SURFACES = np.array(["home", "search", "category", "pdp"])


@dataclass(frozen=True)
class GeneratorConfig:
    users: int = 1_500
    items: int = 3_000
    categories: int = 20
    sessions: int = 6_000
    days: int = 14
    start: str | None = None
    """First day (UTC, ISO date); None = `days` days before today, so the log ends at
    midnight and what is materialized from it is within the feature views' TTLs."""
    seed: int = 7
    mean_steps: float = 6.0
    slate_size: int = 4
    zipf_alpha: float = 1.0
    p_intent_from_taste: float = 0.35
    p_drift: float = 0.12

    def __post_init__(self) -> None:
        for name in ("users", "items", "categories", "sessions", "days", "slate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mean_steps < 1:
            raise ValueError(f"mean_steps must be at least 1, got {self.mean_steps}")
        for name in ("p_intent_from_taste", "p_drift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0 .. 1")


@dataclass(frozen=True)
class SyntheticData:
    events: pa.Table
    items: pa.Table
    users: pa.Table


def _draw_rows(rng: np.random.Generator, cdf: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One categorical draw per entry of `rows`, from row `rows[i]` of a row-wise CDF."""
    n_cols = cdf.shape[1]
    offsets = np.arange(cdf.shape[0])[:, None].astype(np.float64)
    flat = (cdf + offsets).ravel()
    u = rng.random(len(rows))
    idx = np.searchsorted(flat, rows + u * (1 - 1e-12), side="right")
    return np.clip(idx - rows * n_cols, 0, n_cols - 1)


def _draw_in_groups(
    rng: np.random.Generator,
    member_cdf: np.ndarray,
    member_group: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    groups: np.ndarray,
) -> np.ndarray:
    """Draw one member of group `groups[i]` for each i, by within-group weights.

    Members are sorted by group; `member_cdf` restarts from 0 at each group and ends
    at 1, so shifting it by the group number makes one sorted array to search.
    """
    u = rng.random(len(groups))
    idx = np.searchsorted(member_cdf + member_group, groups + u * (1 - 1e-12), side="right")
    return np.clip(idx, starts[groups], ends[groups] - 1)


def default_start(days: int) -> str:
    """The ISO date `days` days before today (UTC)."""
    today = np.datetime64(datetime.now(UTC).date(), "D")
    return str(today - np.timedelta64(days, "D"))


def generate(config: GeneratorConfig) -> SyntheticData:
    rng = np.random.default_rng(config.seed)
    n_cat, n_items, n_users, n_sess = config.categories, config.items, config.users, config.sessions
    start = np.datetime64(config.start or default_start(config.days), "us")

    # --- catalogue -------------------------------------------------------------------------
    cat_share = (np.arange(1, n_cat + 1) ** -0.7).astype(np.float64)
    cat_share /= cat_share.sum()
    item_cat = rng.choice(n_cat, size=n_items, p=cat_share)
    order = np.argsort(item_cat, kind="stable")  # items grouped by category
    sorted_cat = item_cat[order]
    cat_start = np.searchsorted(sorted_cat, np.arange(n_cat), side="left")
    cat_end = np.searchsorted(sorted_cat, np.arange(n_cat), side="right")
    rank_in_cat = np.arange(n_items) - cat_start[sorted_cat] + 1
    weight_sorted = rank_in_cat.astype(np.float64) ** -config.zipf_alpha
    cat_total = np.bincount(sorted_cat, weights=weight_sorted, minlength=n_cat)
    within = weight_sorted / np.where(cat_total[sorted_cat] > 0, cat_total[sorted_cat], 1)
    cum_within = np.cumsum(within)
    within_cdf = cum_within - np.concatenate([[0.0], cum_within])[cat_start[sorted_cat]]
    popularity_sorted = cat_share[sorted_cat] * within
    global_cdf = np.cumsum(popularity_sorted)
    global_cdf /= global_cdf[-1]
    # A category that drew no items falls back to the global distribution.
    empty_cat = cat_end == cat_start

    cat_price_level = rng.uniform(np.log(5), np.log(300), size=n_cat)
    price_sorted = np.round(np.exp(rng.normal(cat_price_level[sorted_cat], 0.5)), 2)
    created_sorted = start - (rng.uniform(1, 365 * 24 * 3600, size=n_items) * 1e6).astype(
        "timedelta64[us]"
    )
    in_stock_sorted = rng.random(n_items) < 0.97
    blocked_sorted = rng.random(n_items) < 0.005

    # --- users -----------------------------------------------------------------------------
    alpha = np.maximum(0.08 * n_cat * cat_share, 0.02)
    taste = rng.dirichlet(alpha, size=n_users)
    taste_cdf = np.cumsum(taste, axis=1)
    taste_cdf /= taste_cdf[:, -1:]
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    primary_device = rng.choice(len(DEVICES), size=n_users, p=DEVICE_SHARES)

    # --- sessions --------------------------------------------------------------------------
    sess_user = rng.choice(n_users, size=n_sess, p=activity / activity.sum())
    day = rng.integers(0, config.days, size=n_sess)
    hour = np.clip(rng.normal(19.0, 4.0, size=n_sess), 0, 23.99)
    sess_start = (
        start
        + (day * 86_400_000_000).astype("timedelta64[us]")
        + (hour * 3_600_000_000).astype("timedelta64[us]")
    )
    steps = np.minimum(rng.geometric(1.0 / config.mean_steps, size=n_sess), 40)  # >= 1
    device = np.where(
        rng.random(n_sess) < 0.8,
        primary_device[sess_user],
        rng.choice(len(DEVICES), size=n_sess, p=DEVICE_SHARES),
    )

    def draw_intent(users: np.ndarray) -> np.ndarray:
        from_taste = rng.random(len(users)) < config.p_intent_from_taste
        taste_draw = _draw_rows(rng, taste_cdf, users)
        global_draw = rng.choice(n_cat, size=len(users), p=cat_share)
        return np.where(from_taste, taste_draw, global_draw)

    # --- steps (one row per page of a session) -----------------------------------------------
    n_steps = int(steps.sum())
    step_sess = np.repeat(np.arange(n_sess), steps)
    first_step = np.concatenate([[0], np.cumsum(steps)[:-1]])
    step_idx = np.arange(n_steps) - np.repeat(first_step, steps)
    step_user = sess_user[step_sess]
    fresh_intent = draw_intent(step_user)
    switch = (step_idx == 0) | (rng.random(n_steps) < config.p_drift)
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(n_steps), 0))
    intent = fresh_intent[last_switch]

    # --- slates ----------------------------------------------------------------------------
    k = config.slate_size
    slot_step = np.repeat(np.arange(n_steps), k)
    slot_pos = np.tile(np.arange(k), n_steps)
    source = rng.choice(3, size=n_steps * k, p=[0.5, 0.2, 0.3])
    slot_cat = np.where(
        source == 0, intent[slot_step], _draw_rows(rng, taste_cdf, step_user[slot_step])
    )
    from_cat = (source != 2) & ~empty_cat[slot_cat]
    slot_item = np.empty(n_steps * k, dtype=np.int64)
    slot_item[from_cat] = _draw_in_groups(
        rng, within_cdf, sorted_cat, cat_start, cat_end, slot_cat[from_cat]
    )
    n_global = int((~from_cat).sum())
    slot_item[~from_cat] = np.minimum(
        np.searchsorted(global_cdf, rng.random(n_global), side="right"), n_items - 1
    )
    item_cat_of_slot = sorted_cat[slot_item]

    utility = (
        2.5 * (item_cat_of_slot == intent[slot_step])
        + 2.0 * taste[step_user[slot_step], item_cat_of_slot]
        + 0.4 * np.log(popularity_sorted[slot_item] * n_items)
        - 0.3 * slot_pos
    )
    noisy = (utility + rng.gumbel(size=n_steps * k)).reshape(n_steps, k)
    outside = 3.0 + rng.gumbel(size=n_steps)
    best = noisy.argmax(axis=1)
    clicked = noisy[np.arange(n_steps), best] > outside
    click_step = np.flatnonzero(clicked)
    click_slot = click_step * k + best[clicked]
    click_item = slot_item[click_slot]
    interest = utility[click_slot]

    # --- times -----------------------------------------------------------------------------
    dwell = np.clip(rng.lognormal(np.log(12_000) + 0.35 * interest, 0.6), 500, 3_600_000).astype(
        np.int64
    )
    step_dwell = np.zeros(n_steps, dtype=np.int64)
    step_dwell[click_step] = dwell
    gap_us = (rng.exponential(20.0, size=n_steps) * 1e6).astype(np.int64) + 1_000_000
    gap_us += np.concatenate([[0], step_dwell[:-1]]) * 1000  # reading the last click takes time
    gap_us[step_idx == 0] = 0
    offset = np.cumsum(gap_us) - np.repeat(np.cumsum(gap_us)[first_step], steps)
    step_time = sess_start[step_sess] + offset.astype("timedelta64[us]")
    click_time = step_time[click_step] + (
        rng.exponential(3.0, size=len(click_step)) * 1e6 + 200_000
    ).astype("timedelta64[us]")
    scroll = np.round(rng.beta(1.0 + np.maximum(interest, 0.0), 2.0), 3)

    p_cart = 1.0 / (
        1.0 + np.exp(-(-2.3 + 0.6 * interest - 0.25 * np.log(price_sorted[click_item])))
    )
    carted = rng.random(len(click_step)) < p_cart
    cart_time = click_time[carted] + (dwell[carted] * 600).astype("timedelta64[us]")
    bought = rng.random(int(carted.sum())) < 0.35
    buy_time = cart_time[bought] + (rng.exponential(40.0, size=int(bought.sum())) * 1e6).astype(
        "timedelta64[us]"
    )

    surface_step = np.where(
        step_idx == 0,
        0,
        np.where(np.concatenate([[False], clicked[:-1]]), 3, rng.choice([1, 2], size=n_steps)),
    )

    # --- events ----------------------------------------------------------------------------
    def part(
        kind: str, steps_of: np.ndarray, times: np.ndarray, items: np.ndarray | None,
        dwell_ms: np.ndarray | None = None, scroll_depth: np.ndarray | None = None,
        position: np.ndarray | None = None, order: int = 0,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        n = len(steps_of)
        return {
            "step": steps_of,
            "order": np.full(n, order),
            "event_type": np.full(n, kind, dtype=object),
            "timestamp": times,
            "item": items if items is not None else np.full(n, -1),
            "dwell_ms": dwell_ms if dwell_ms is not None else np.full(n, -1),
            "scroll_depth": scroll_depth if scroll_depth is not None else np.full(n, np.nan),
            "position": position if position is not None else np.full(n, -1),
        }

    cart_steps = click_step[carted]
    parts = [
        part("page_view", np.arange(n_steps), step_time, None, order=0),
        part("item_view", slot_step, step_time[slot_step], slot_item, position=slot_pos, order=1),
        part(
            "click",
            click_step,
            click_time,
            click_item,
            dwell,
            scroll,
            position=best[clicked],
            order=2,
        ),
        part("add_to_cart", cart_steps, cart_time, click_item[carted], order=3),
        part("purchase", cart_steps[bought], buy_time, click_item[carted][bought], order=4),
    ]
    cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    ev_order = np.lexsort(
        (cols["position"], cols["order"], cols["timestamp"], step_sess[cols["step"]])
    )
    cols = {key: value[ev_order] for key, value in cols.items()}
    ev_step = cols["step"]
    ev_sess = step_sess[ev_step]
    n_events = len(ev_step)

    item_ids_sorted = _ids("i", order + 1)  # external id follows the original draw order
    item_id_col = pc.if_else(
        pa.array(cols["item"] >= 0),
        pc.take(item_ids_sorted, pa.array(np.maximum(cols["item"], 0))),
        None,
    )

    def optional(values: np.ndarray, missing: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.array(values, type=typ, mask=missing)

    events = pa.Table.from_arrays(
        [
            _ids(f"g{config.seed}-", np.arange(n_events)),
            pc.take(_ids("u", np.arange(n_users) + 1), pa.array(sess_user[ev_sess])),
            _ids("s", ev_sess + 1),
            item_id_col,
            pa.array(cols["event_type"], type=pa.string()),
            pa.array(cols["timestamp"]).cast(TIMESTAMP_TYPE),
            optional(cols["dwell_ms"], cols["dwell_ms"] < 0, pa.int64()),
            optional(cols["scroll_depth"], np.isnan(cols["scroll_depth"]), pa.float64()),
            pa.array(DEVICES[device[ev_sess]]),
            pa.array(SURFACES[surface_step[ev_step]]),
            optional(cols["position"].astype(np.int32), cols["position"] < 0, pa.int32()),
            pa.nulls(n_events, pa.string()),  # request_id: no served lists simulated yet
        ],
        schema=EVENT_SCHEMA,
    )

    items = pa.Table.from_arrays(
        [
            item_ids_sorted,
            pa.array([f"c{c:02d}" for c in range(n_cat)]).take(pa.array(sorted_cat)),
            pa.array(price_sorted),
            pa.array(created_sorted).cast(TIMESTAMP_TYPE),
            pa.nulls(n_items, pa.string()),
            pa.array(in_stock_sorted),
            pa.array(blocked_sorted),
        ],
        schema=ITEM_SCHEMA,
    ).sort_by("item_id")
    top_taste = np.argsort(-taste, axis=1)[:, :3]
    users = pa.table(
        {
            "user_id": _ids("u", np.arange(n_users) + 1),
            "primary_device": pa.array(DEVICES[primary_device]),
            # The generator's hidden truth, kept so evaluations can check what a model learnt.
            "true_top_categories": pa.array([[f"c{c:02d}" for c in row] for row in top_taste]),
        }
    )
    return SyntheticData(events=events, items=items, users=users)


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(numbers).cast(pa.string()), "")


def write_synthetic(config: GeneratorConfig, settings: Settings) -> dict[str, int]:
    """Generate a clickstream and append it to the event log; write its catalogue."""
    data = generate(config)
    result = EventLog(settings.events_dir).append(data.events)
    write_table_atomic(data.items, settings.catalog_dir / "items.parquet")
    write_table_atomic(data.users, settings.catalog_dir / "users.parquet")
    return {
        "events_generated": data.events.num_rows,
        "events_appended": result.appended,
        "duplicates_refused": len(result.duplicates),
        "items": data.items.num_rows,
        "users": data.users.num_rows,
    }
