"""Spark jobs: item, user and session features and co-visitation from the event log.

Every output carries `event_timestamp`, the moment its values became true, so
Feast's point-in-time joins can use them:

item_features (one row per catalogue item per day, from the item's first day)
    `event_timestamp` = the next midnight UTC: a snapshot covers every event up to
    the end of its day. Popularity = interactions (click, add_to_cart, purchase)
    over the last 1, 7 and 30 days. Rates over the last 30 days, 0 when the
    denominator is 0: `item_ctr_30d` = clicks / impressions (`item_view`),
    `item_atc_rate_30d` = add_to_cart / clicks, `item_cvr_30d` = purchases / clicks.
    `item_category`, `item_price` (null when unknown) from the catalogue;
    `item_age_days` since `created_at`, or since the first event when unknown;
    `item_in_stock` and `item_blocked` from the catalogue (in stock and not blocked
    when the catalogue does not list the item).

user_features (one row per user per day the user was active)
    `event_timestamp` = the next midnight UTC; values cover the whole history up to
    the end of that day and do not change on days without activity. Counts by event
    type; `user_top_categories` and `user_top_category_weights`: the 3 heaviest
    categories of the user's interactions (click 1, add_to_cart 3, purchase 5) and
    their share of the total; `user_price_affinity`: the same weights' mean price;
    `user_last_event_timestamp`; `user_last_items`: the last 20 interacted items,
    newest last; `user_purchased_items`: the last 100 distinct items bought, newest last.

session_features (one row per session per distinct event time)
    The session's state right after its events at that time: `session_recent_items`
    (last 10 interacted items, newest last), counts by event type,
    `session_intent_category` (the category with the largest dwell-weighted weight
    so far: a click counts its dwell seconds, at least 1; add_to_cart 30; purchase
    60) and `session_last_event_timestamp`. The stream worker pushes the same state
    online; this job recomputes it from the log for training.

covisitation and item_covisitation
    Pairs of different items interacted with in the same session within 5 positions
    of each other, counted once per session; `item_covisitation` keeps each item's
    20 most frequent neighbours, stamped with the time of the log's last event.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import WindowSpec

from batch.spark import Heartbeat, stage, write_parquet
from inkling.events.schema import (
    EVENT_SCHEMA,
    INTERACTION_TYPES,
    TIMESTAMP_TYPE,
    UNKNOWN_CATEGORY,
)

FEAST_TABLE_FILES = 1
"""Files per feature table Feast reads (see `compute_features`)."""

LAST_ITEMS = 20
PURCHASED_ITEMS = 100
SESSION_RECENT_ITEMS = 10
TOP_CATEGORIES = 3
COVISIT_WINDOW = 5
COVISIT_NEIGHBOURS = 20
AFFINITY_WEIGHTS = {"click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
INTENT_WEIGHTS = {"add_to_cart": 30.0, "purchase": 60.0}
COUNT_COLUMNS = {
    "page_view": "page_views",
    "item_view": "item_views",
    "click": "clicks",
    "add_to_cart": "carts",
    "purchase": "purchases",
}
OUTPUTS = (
    "item_features",
    "user_features",
    "session_features",
    "covisitation",
    "item_covisitation",
)


@dataclass(frozen=True)
class FeatureOutputs:
    """Row counts of what a run wrote, by output name."""

    rows: dict[str, int]


def _event_log_schema() -> T.StructType:
    """The event log as Spark reads it: the event schema's columns, then the `date`
    partition. Given rather than inferred, so files written before a column existed
    (event schema version 1 lacks `request_id`) read with it null, whichever file Spark
    would have taken its schema from."""
    spark_types = {
        pa.string(): T.StringType(),
        pa.int64(): T.LongType(),
        pa.int32(): T.IntegerType(),
        pa.float64(): T.DoubleType(),
        TIMESTAMP_TYPE: T.TimestampType(),
    }
    fields = [T.StructField(f.name, spark_types[f.type], True) for f in EVENT_SCHEMA]
    return T.StructType([*fields, T.StructField("date", T.StringType(), True)])


def read_events(spark: SparkSession, events_dir: str) -> DataFrame:
    """The event log with `day` (UTC date) and an ordering key for ties."""
    reader = spark.read.schema(_event_log_schema()).option("basePath", events_dir)
    events = reader.parquet(events_dir)
    return events.drop("date").withColumn("day", F.to_date("timestamp"))


def read_items(spark: SparkSession, catalog_dir: str) -> DataFrame:
    items = spark.read.parquet(f"{catalog_dir}/items.parquet")
    return items.select(
        "item_id",
        F.coalesce(F.col("category"), F.lit(UNKNOWN_CATEGORY)).alias("category"),
        F.col("price").cast("double").alias("price"),
        "created_at",
        F.col("in_stock") if "in_stock" in items.columns else F.lit(True).alias("in_stock"),
        F.col("blocked") if "blocked" in items.columns else F.lit(False).alias("blocked"),
    )


def _next_midnight(day: Column) -> Column:
    return F.to_timestamp(F.date_add(day, 1))


def _is_interaction() -> Column:
    return F.col("event_type").isin(*INTERACTION_TYPES)


def _counts(prefix: str) -> list[Column]:
    return [
        F.sum(F.when(F.col("event_type") == kind, 1).otherwise(0))
        .cast("long")
        .alias(f"{prefix}_{name}")
        for kind, name in COUNT_COLUMNS.items()
    ]


def _safe_div(num: Column, den: Column) -> Column:
    return F.when(den > 0, num / den).otherwise(F.lit(0.0)).cast("double")


def item_features(events: DataFrame, items: DataFrame) -> DataFrame:
    days = events.agg(F.min("day").alias("lo"), F.max("day").alias("hi"))
    calendar = days.select(F.explode(F.sequence("lo", "hi")).alias("day"))
    first_seen = (
        events.where(F.col("item_id").isNotNull())
        .groupBy("item_id")
        .agg(F.min("day").alias("first_day"))
    )
    lo = F.to_timestamp(F.lit(days.first()[0]))  # type: ignore[index]
    catalogue = items.join(first_seen, "item_id", "full_outer").select(
        "item_id",
        F.coalesce("category", F.lit(UNKNOWN_CATEGORY)).alias("category"),
        "price",
        # Born at creation, or at the first event when that came earlier or creation is unknown;
        # items with neither have been there since the log began.
        F.coalesce(F.least("created_at", F.to_timestamp("first_day")), lo).alias("born"),
        F.coalesce("in_stock", F.lit(True)).alias("in_stock"),
        F.coalesce("blocked", F.lit(False)).alias("blocked"),
    )
    grid = catalogue.crossJoin(calendar).where(F.to_date("born") <= F.col("day"))
    daily = (
        events.where(F.col("item_id").isNotNull())
        .groupBy("item_id", "day")
        .agg(
            F.sum(F.when(_is_interaction(), 1).otherwise(0)).alias("inter"),
            F.sum(F.when(F.col("event_type") == "item_view", 1).otherwise(0)).alias("views"),
            F.sum(F.when(F.col("event_type") == "click", 1).otherwise(0)).alias("clicks"),
            F.sum(F.when(F.col("event_type") == "add_to_cart", 1).otherwise(0)).alias("carts"),
            F.sum(F.when(F.col("event_type") == "purchase", 1).otherwise(0)).alias("buys"),
        )
    )
    dense = grid.join(daily, ["item_id", "day"], "left").fillna(
        0, ["inter", "views", "clicks", "carts", "buys"]
    )
    dense = dense.withColumn("d", F.datediff("day", F.lit("1970-01-01")))
    by_item = Window.partitionBy("item_id").orderBy("d")

    def trailing(col: str, days_back: int) -> Column:
        return F.sum(col).over(by_item.rangeBetween(-(days_back - 1), 0))

    return dense.select(
        "item_id",
        _next_midnight(F.col("day")).alias("event_timestamp"),
        F.col("inter").cast("long").alias("item_pop_1d"),
        trailing("inter", 7).cast("long").alias("item_pop_7d"),
        trailing("inter", 30).cast("long").alias("item_pop_30d"),
        _safe_div(trailing("clicks", 30), trailing("views", 30)).alias("item_ctr_30d"),
        _safe_div(trailing("carts", 30), trailing("clicks", 30)).alias("item_atc_rate_30d"),
        _safe_div(trailing("buys", 30), trailing("clicks", 30)).alias("item_cvr_30d"),
        F.col("category").alias("item_category"),
        F.col("price").alias("item_price"),
        F.greatest(
            F.lit(0.0),
            (F.unix_timestamp(_next_midnight(F.col("day"))) - F.unix_timestamp("born")) / 86400.0,
        ).alias("item_age_days"),
        F.col("in_stock").alias("item_in_stock"),
        F.col("blocked").alias("item_blocked"),
    )


def _weight(weights: dict[str, float], default: Column | float = 0.0) -> Column:
    expr = None
    for kind, w in weights.items():
        expr = (
            F.when(F.col("event_type") == kind, F.lit(w))
            if expr is None
            else expr.when(F.col("event_type") == kind, F.lit(w))
        )
    assert expr is not None
    return expr.otherwise(default if isinstance(default, Column) else F.lit(default))


def _ordered(*keys: str) -> WindowSpec:
    return Window.partitionBy(*keys).orderBy("timestamp", "seq")


def _with_seq(events: DataFrame) -> DataFrame:
    """A stable order for events that share a timestamp."""
    rank = F.when(F.col("event_type") == "page_view", 0).when(F.col("event_type") == "item_view", 1)
    rank = (
        rank.when(F.col("event_type") == "click", 2)
        .when(F.col("event_type") == "add_to_cart", 3)
        .otherwise(4)
    )
    return events.withColumn("seq", F.concat(rank.cast("string"), F.lit(":"), F.col("event_id")))


def snap_days_of(daily: DataFrame) -> DataFrame:
    """(user_id, snap): the days a user was active, on which a snapshot is written."""
    return daily.select("user_id", F.col("day").alias("snap"))


def user_features(events: DataFrame, items: DataFrame) -> DataFrame:
    known = _with_seq(events.where(F.col("user_id").isNotNull()))
    daily = known.groupBy("user_id", "day").agg(*_counts("d"), F.max("timestamp").alias("last_ts"))
    cumulative = (
        Window.partitionBy("user_id").orderBy("day").rowsBetween(Window.unboundedPreceding, 0)
    )
    counts = daily.select(
        "user_id",
        "day",
        "last_ts",
        *[
            F.sum(f"d_{name}").over(cumulative).cast("long").alias(f"user_{name}")
            for name in COUNT_COLUMNS.values()
        ],
    )

    inter = known.where(_is_interaction())
    recent = inter.withColumn(
        "last_items",
        F.collect_list("item_id").over(_ordered("user_id").rowsBetween(-(LAST_ITEMS - 1), 0)),
    ).withColumn(
        "rn",
        F.row_number().over(
            Window.partitionBy("user_id", "day").orderBy(F.desc("timestamp"), F.desc("seq"))
        ),
    )
    last_items = recent.where("rn = 1").select("user_id", "day", "last_items")

    # Distinct purchased items as of each active day, newest purchase last.
    bought = (
        known.where(F.col("event_type") == "purchase")
        .groupBy("user_id", "item_id")
        .agg(F.min("day").alias("first_day"), F.max("timestamp").alias("bought_ts"))
    )
    purchased_upto = (
        snap_days_of(daily).join(bought, "user_id").where(F.col("first_day") <= F.col("snap"))
    )
    purchased = (
        purchased_upto.withColumn(
            "r",
            F.row_number().over(
                Window.partitionBy("user_id", "snap").orderBy(F.desc("bought_ts"), "item_id")
            ),
        )
        .where(F.col("r") <= PURCHASED_ITEMS)
        .groupBy("user_id", "snap")
        .agg(F.sort_array(F.collect_list(F.struct("bought_ts", "item_id"))).alias("p"))
        .select(
            "user_id",
            F.col("snap").alias("day"),
            F.transform("p", lambda s: s["item_id"]).alias("purchased_items"),
        )
    )

    weighted = inter.join(items.select("item_id", "category", "price"), "item_id", "left").select(
        "user_id",
        "day",
        F.coalesce("category", F.lit(UNKNOWN_CATEGORY)).alias("category"),
        _weight(AFFINITY_WEIGHTS).alias("w"),
        "price",
    )
    per_cat = weighted.groupBy("user_id", "day", "category").agg(
        F.sum("w").alias("w"),
        F.sum(F.when(F.col("price").isNotNull(), F.col("w") * F.col("price"))).alias("wp"),
        F.sum(F.when(F.col("price").isNotNull(), F.col("w"))).alias("wpriced"),
    )
    snap_days = snap_days_of(daily)
    upto = snap_days.join(per_cat, "user_id").where(F.col("day") <= F.col("snap"))
    cat_totals = upto.groupBy("user_id", "snap", "category").agg(
        F.sum("w").alias("w"), F.sum("wp").alias("wp"), F.sum("wpriced").alias("wpriced")
    )
    ranked = cat_totals.withColumn(
        "r",
        F.row_number().over(Window.partitionBy("user_id", "snap").orderBy(F.desc("w"), "category")),
    )
    affinity = ranked.groupBy("user_id", "snap").agg(
        F.sort_array(
            F.collect_list(F.when(F.col("r") <= TOP_CATEGORIES, F.struct("r", "category", "w")))
        ).alias("top"),
        F.sum("w").alias("total"),
        (F.sum("wp") / F.sum("wpriced")).alias("user_price_affinity"),
    )
    affinity = affinity.select(
        "user_id",
        F.col("snap").alias("day"),
        F.transform("top", lambda s: s["category"]).alias("user_top_categories"),
        F.transform("top", lambda s: (s["w"] / F.col("total")).cast("double")).alias(
            "user_top_category_weights"
        ),
        F.col("user_price_affinity").cast("double"),
    )

    carried = Window.partitionBy("user_id").orderBy("day").rowsBetween(Window.unboundedPreceding, 0)
    joined = (
        counts.join(last_items, ["user_id", "day"], "left")
        .join(affinity, ["user_id", "day"], "left")
        .join(purchased, ["user_id", "day"], "left")
    )
    return joined.select(
        "user_id",
        _next_midnight(F.col("day")).alias("event_timestamp"),
        *[f"user_{name}" for name in COUNT_COLUMNS.values()],
        F.coalesce(
            F.last("user_top_categories", ignorenulls=True).over(carried),
            F.array().cast("array<string>"),
        ).alias("user_top_categories"),
        F.coalesce(
            F.last("user_top_category_weights", ignorenulls=True).over(carried),
            F.array().cast("array<double>"),
        ).alias("user_top_category_weights"),
        F.last("user_price_affinity", ignorenulls=True).over(carried).alias("user_price_affinity"),
        F.col("last_ts").alias("user_last_event_timestamp"),
        F.coalesce(
            F.last("last_items", ignorenulls=True).over(carried), F.array().cast("array<string>")
        ).alias("user_last_items"),
        F.coalesce("purchased_items", F.array().cast("array<string>")).alias(
            "user_purchased_items"
        ),
    )


def session_features(events: DataFrame, items: DataFrame) -> DataFrame:
    ev = _with_seq(events).join(items.select("item_id", "category"), "item_id", "left")
    order = _ordered("session_id")
    upto_now = order.rowsBetween(Window.unboundedPreceding, 0)
    intent_w = F.when(
        F.col("event_type") == "click",
        F.greatest(F.coalesce(F.col("dwell_ms"), F.lit(0)) / 1000.0, F.lit(1.0)),
    )
    for kind, w in INTENT_WEIGHTS.items():
        intent_w = intent_w.when(F.col("event_type") == kind, F.lit(w))
    ev = ev.withColumn("iw", intent_w.otherwise(F.lit(None)))
    ev = ev.withColumn(
        "cat_w",
        F.when(
            F.col("iw").isNotNull(),
            F.sum(F.coalesce("iw", F.lit(0.0))).over(
                Window.partitionBy("session_id", F.coalesce("category", F.lit(UNKNOWN_CATEGORY)))
                .orderBy("timestamp", "seq")
                .rowsBetween(Window.unboundedPreceding, 0)
            ),
        ),
    )
    # Per-category weights only grow, so the current leader is the best weight seen so far.
    leader = F.max(
        F.when(
            F.col("cat_w").isNotNull(),
            F.struct("cat_w", F.coalesce("category", F.lit(UNKNOWN_CATEGORY)).alias("c")),
        )
    ).over(upto_now)

    inter = ev.where(_is_interaction()).select(
        "event_id",
        F.collect_list("item_id")
        .over(order.rowsBetween(-(SESSION_RECENT_ITEMS - 1), 0))
        .alias("recent"),
    )
    ev = ev.join(inter, "event_id", "left")
    state = ev.select(
        "session_id",
        "timestamp",
        "seq",
        F.coalesce(
            F.last("recent", ignorenulls=True).over(upto_now), F.array().cast("array<string>")
        ).alias("session_recent_items"),
        *[
            F.sum(F.when(F.col("event_type") == kind, 1).otherwise(0))
            .over(upto_now)
            .cast("long")
            .alias(f"session_{name}")
            for kind, name in COUNT_COLUMNS.items()
        ],
        F.coalesce(leader["c"], F.lit(UNKNOWN_CATEGORY)).alias("session_intent_category"),
    )
    last_at_time = Window.partitionBy("session_id", "timestamp").orderBy(F.desc("seq"))
    return (
        state.withColumn("rn", F.row_number().over(last_at_time))
        .where("rn = 1")
        .select(
            "session_id",
            F.col("timestamp").alias("event_timestamp"),
            "session_recent_items",
            *[f"session_{name}" for name in COUNT_COLUMNS.values()],
            "session_intent_category",
            F.col("timestamp").alias("session_last_event_timestamp"),
        )
    )


def covisitation(events: DataFrame) -> DataFrame:
    inter = _with_seq(events.where(_is_interaction()))
    pos = inter.withColumn("pos", F.row_number().over(_ordered("session_id"))).select(
        "session_id", "item_id", "pos"
    )
    a, b = pos.alias("a"), pos.alias("b")
    pairs = (
        a.join(
            b,
            (F.col("a.session_id") == F.col("b.session_id"))
            & (F.abs(F.col("a.pos") - F.col("b.pos")) <= COVISIT_WINDOW)
            & (F.col("a.item_id") != F.col("b.item_id")),
        )
        .select(
            F.col("a.session_id").alias("session_id"),
            F.col("a.item_id").alias("item_id"),
            F.col("b.item_id").alias("neighbor_id"),
        )
        .distinct()
    )
    return pairs.groupBy("item_id", "neighbor_id").agg(F.count("*").cast("long").alias("count"))


def item_covisitation(pairs: DataFrame, stamp: Column) -> DataFrame:
    ranked = pairs.withColumn(
        "r",
        F.row_number().over(Window.partitionBy("item_id").orderBy(F.desc("count"), "neighbor_id")),
    ).where(F.col("r") <= COVISIT_NEIGHBOURS)
    top = ranked.groupBy("item_id").agg(
        F.sort_array(F.collect_list(F.struct("r", "neighbor_id", "count"))).alias("top")
    )
    return top.select(
        "item_id",
        stamp.alias("event_timestamp"),
        F.transform("top", lambda s: s["neighbor_id"]).alias("covisit_items"),
        F.transform("top", lambda s: s["count"]).alias("covisit_counts"),
    )


STREAM_TABLES = {
    "item_stream_features": pa.schema(
        [
            ("item_id", pa.string()),
            ("item_views_5m", pa.int64()),
            ("item_clicks_5m", pa.int64()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ]
    )
}
"""Batch sources of views only the stream worker writes (online, through their push
sources). Feast needs a table behind every push source and `feast materialize` reads
it, so the batch side writes each one empty: there is nothing to backfill, since
minute counters are worthless once their minutes have passed."""


def write_empty_stream_tables(out_dir: Path) -> None:
    """Write an empty `<out_dir>/<name>/part-0.parquet` for each of `STREAM_TABLES`."""
    for name, schema in STREAM_TABLES.items():
        folder = out_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        pq.write_table(schema.empty_table(), folder / "part-0.parquet")


def compute_features(
    spark: SparkSession, events_dir: Path | str, catalog_dir: Path | str, out_dir: Path | str
) -> FeatureOutputs:
    """Run every feature job and write `<out_dir>/<name>` Parquet directories."""
    out = str(out_dir)
    events = read_events(spark, str(events_dir)).cache()
    items = read_items(spark, str(catalog_dir)).cache()
    rows: dict[str, int] = {}
    with Heartbeat(spark):
        with stage(f"read event log ({events_dir})"):
            n_events = events.count()
            if n_events == 0:
                raise ValueError(f"the event log at {events_dir} is empty")
            rows["events"] = n_events
        # Co-visitation counts are true once the log's last event has happened; stamping them
        # then (not at the end of that day) makes them materializable as soon as they exist.
        last_event = events.agg(F.max("timestamp")).first()[0]  # type: ignore[index]
        jobs = {
            "item_features": lambda: item_features(events, items),
            "user_features": lambda: user_features(events, items),
            "session_features": lambda: session_features(events, items),
        }
        # Feast reads these tables (offline store: files, through Dask). One file each: over
        # a table of several files, Feast's point-in-time join fails whenever an entity
        # row has no feature row ("Divisions calculation failed for non-numeric column
        # '__event_timestamp'", Feast 0.67 with Dask 2026.8), which broke `inkling train`
        # for retrieval on a 100k-item log.
        for name, job in jobs.items():
            with stage(name):
                write_parquet(job(), f"{out}/{name}", files=FEAST_TABLE_FILES)
                rows[name] = spark.read.parquet(f"{out}/{name}").count()
        with stage("covisitation"):
            write_parquet(covisitation(events), f"{out}/covisitation")
            pairs = spark.read.parquet(f"{out}/covisitation")
            rows["covisitation"] = pairs.count()
        with stage("item_covisitation"):
            write_parquet(
                item_covisitation(pairs, F.lit(last_event).cast("timestamp")),
                f"{out}/item_covisitation",
                files=FEAST_TABLE_FILES,
            )
            rows["item_covisitation"] = spark.read.parquet(f"{out}/item_covisitation").count()
    write_empty_stream_tables(Path(out))
    events.unpersist()
    items.unpersist()
    return FeatureOutputs(rows)
