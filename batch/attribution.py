"""Attribution: the serve log joined with later events into labelled impressions.

An impression is one item of one served answer (`inkling.events.servelog`: one row per
answer, exploded here with the item's position). An outcome event (`item_view`,
`click`, `add_to_cart`, `purchase` with an item) is attributed to at most one
impression of the same item, served at or before the event and at most `window_s`
before it:

- **by request id**, when the event carries one (`Event.request_id`, event schema v2):
  that answer's impression of the item, and nothing else (an id that matches no logged
  answer, or one whose answer came later than the event or outside the window, leaves the
  event unattributed: guessing another list would credit the wrong arm);
- **by user, else session**, when the event carries none: the latest answer that
  showed the item to the same user (both logged in), or in the same session.

Never to an answer served after the event. Labels per impression: `shown` (an
`item_view` of it: the client displayed it), `clicked`, `added_to_cart`, `purchased`,
with how each was matched counted in `AttributionStats`. The impressions keep
everything the serve log knew (position, score, source, propensity, model, index and
feature-service versions, experiment, arm) and are written as Parquet partitioned by
the UTC date served (`date=<d>`), the whole table replaced per run: an answer served
within `window_s` of the newest event can still gain outcomes on the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from batch.features import read_events
from batch.spark import Heartbeat, stage, write_parquet
from inkling.events.schema import TIMESTAMP_TYPE
from inkling.events.servelog import SERVE_SCHEMA

DEFAULT_WINDOW_S = 1800
"""How long after an answer an event may be attributed to it, by default (30 minutes)."""
OUTCOMES = {
    "item_view": "shown",
    "click": "clicked",
    "add_to_cart": "added_to_cart",
    "purchase": "purchased",
}
"""Event type -> the impression's label it sets."""

IMPRESSION_COLUMNS = (
    "request_id", "served_at", "user_id", "session_id", "surface", "operation", "position",
    "item_id", "score", "source", "propensity", "model_version", "index_version",
    "feature_service", "experiment", "arm",
)  # fmt: skip


@dataclass(frozen=True)
class AttributionStats:
    """What one run found."""

    answers: int
    impressions: int
    outcome_events: int
    """Events of the OUTCOMES types with an item."""
    by_request_id: dict[str, int]
    """Attributed through their request id, by event type."""
    by_user_or_session: dict[str, int]
    """Attributed through the user or session, by event type."""
    unmatched_request_ids: int
    """Events whose request id matched no impression of their item in the window."""


def _spark_type(arrow: pa.DataType) -> T.DataType:
    if pa.types.is_list(arrow):
        return T.ArrayType(_spark_type(arrow.value_type), True)
    types = {
        pa.string(): T.StringType(),
        pa.float32(): T.FloatType(),
        pa.int32(): T.IntegerType(),
        pa.int64(): T.LongType(),
        pa.bool_(): T.BooleanType(),
        TIMESTAMP_TYPE: T.TimestampType(),
    }
    return types[arrow]


def serve_log_schema() -> T.StructType:
    """The serve log as Spark reads it: `SERVE_SCHEMA`'s columns, then `date`."""
    fields = [T.StructField(f.name, _spark_type(f.type), True) for f in SERVE_SCHEMA]
    return T.StructType([*fields, T.StructField("date", T.StringType(), True)])


def read_serves(spark: SparkSession, serves_dir: str) -> DataFrame:
    """The serve log, one row per answer.

    Raises:
        FileNotFoundError: there is no serve log yet (no answer was recorded).
    """
    if not any(Path(serves_dir).glob("date=*/*.parquet")):
        raise FileNotFoundError(
            f"no serve log at {serves_dir}: it fills while the ranking server answers with "
            "serve_log on and a stream worker runs (`inkling worker`)"
        )
    reader = spark.read.schema(serve_log_schema()).option("basePath", serves_dir)
    return reader.parquet(serves_dir).drop("date")


def impressions_of(serves: DataFrame) -> DataFrame:
    """One row per served item, with its position (0 = first) in the answer."""
    zipped = F.arrays_zip("item_ids", "scores", "sources", "propensities")
    exploded = serves.select("*", F.posexplode(zipped).alias("position", "shown_item"))
    return exploded.select(
        "request_id", "served_at", "user_id", "session_id", "surface", "operation",
        F.col("position").cast("int").alias("position"),
        F.col("shown_item.item_ids").alias("item_id"),
        F.col("shown_item.scores").alias("score"),
        F.col("shown_item.sources").alias("source"),
        F.col("shown_item.propensities").alias("propensity"),
        "model_version", "index_version", "feature_service", "experiment", "arm",
    )  # fmt: skip


def _in_window(window_s: int) -> Column:
    """The event at or after the answer, and at most `window_s` after it."""
    at, served = F.col("at").cast("double"), F.col("served_at").cast("double")
    return (at >= served) & (at <= served + F.lit(float(window_s)))


_ATTRIBUTED = ("event_id", "event_type", "request_id", "item_id")


def attribute(impressions: DataFrame, events: DataFrame, window_s: int) -> DataFrame:
    """(event_id, event_type, request_id, item_id, method) for every attributed event:
    `method` is `request_id` or `user_or_session`."""
    outcomes = events.where(
        F.col("event_type").isin(*OUTCOMES) & F.col("item_id").isNotNull()
    ).select(
        "event_id", "event_type", "item_id",
        F.col("timestamp").alias("at"),
        F.col("user_id").alias("event_user"),
        F.col("session_id").alias("event_session"),
        F.col("request_id").alias("event_request"),
    )  # fmt: skip
    keys = impressions.select("request_id", "item_id", "served_at", "user_id", "session_id")
    by_id = (
        outcomes.where(F.col("event_request").isNotNull())
        .join(keys.withColumnRenamed("request_id", "event_request"), ["event_request", "item_id"])
        .where(_in_window(window_s))
        .withColumnRenamed("event_request", "request_id")
        .select(*_ATTRIBUTED, F.lit("request_id").alias("method"))
    )
    anonymous = outcomes.where(F.col("event_request").isNull())
    matched = ("event_id", "event_type", "request_id", "item_id", "at", "served_at")
    by_user = anonymous.join(
        keys.where(F.col("user_id").isNotNull()).withColumnRenamed("user_id", "event_user"),
        ["event_user", "item_id"],
    ).select(*matched)
    by_session = anonymous.join(
        keys.withColumnRenamed("session_id", "event_session"), ["event_session", "item_id"]
    ).select(*matched)
    latest = Window.partitionBy("event_id").orderBy(F.desc("served_at"), F.desc("request_id"))
    by_keys = (
        by_user.unionByName(by_session)
        .where(_in_window(window_s))
        .withColumn("rank", F.row_number().over(latest))
        .where(F.col("rank") == 1)
        .select(*_ATTRIBUTED, F.lit("user_or_session").alias("method"))
    )
    return by_id.unionByName(by_keys)


def label(impressions: DataFrame, attributed: DataFrame) -> DataFrame:
    """The impressions with one boolean column per OUTCOMES label, and `date` served."""
    flags = attributed.groupBy("request_id", "item_id").agg(
        *[
            F.max(F.when(F.col("event_type") == kind, True).otherwise(False)).alias(name)
            for kind, name in OUTCOMES.items()
        ]
    )
    labelled = impressions.join(flags, ["request_id", "item_id"], "left")
    return labelled.select(
        *IMPRESSION_COLUMNS,
        *[F.coalesce(F.col(name), F.lit(False)).alias(name) for name in OUTCOMES.values()],
        F.date_format("served_at", "yyyy-MM-dd").alias("date"),
    )


def _by_type(rows: list[tuple[str, int]]) -> dict[str, int]:
    return {kind: count for kind, count in rows}


def run_attribution(
    spark: SparkSession,
    serves_dir: Path | str,
    events_dir: Path | str,
    out_dir: Path | str,
    window_s: int = DEFAULT_WINDOW_S,
) -> AttributionStats:
    """Attribute the event log to the serve log; write the labelled impressions to
    `out_dir` (`date=<d>/`), replacing what a previous run wrote.

    Raises:
        ValueError: `window_s` is not positive.
        FileNotFoundError: there is no serve log.
    """
    if window_s <= 0:
        raise ValueError(f"the attribution window must be positive, got {window_s} s")
    with Heartbeat(spark):
        with stage(f"read the serve log ({serves_dir})"):
            serves = read_serves(spark, str(serves_dir)).cache()
            answers = serves.count()
            impressions = impressions_of(serves).cache()
            n_impressions = impressions.count()
        with stage(f"attribute the event log ({events_dir})"):
            events = read_events(spark, str(events_dir))
            attributed = attribute(impressions, events, window_s).cache()
            counts = attributed.groupBy("method", "event_type").count().collect()
            outcome_events = events.where(
                F.col("event_type").isin(*OUTCOMES) & F.col("item_id").isNotNull()
            ).count()
            with_id = events.where(
                F.col("event_type").isin(*OUTCOMES)
                & F.col("item_id").isNotNull()
                & F.col("request_id").isNotNull()
            ).count()
        with stage(f"write the labelled impressions ({out_dir})"):
            write_parquet(label(impressions, attributed), str(out_dir), partition_by=["date"])
    by_id = _by_type([(r["event_type"], r["count"]) for r in counts if r["method"] == "request_id"])
    by_keys = _by_type(
        [(r["event_type"], r["count"]) for r in counts if r["method"] == "user_or_session"]
    )
    for frame in (serves, impressions, attributed):
        frame.unpersist()
    return AttributionStats(
        answers=answers,
        impressions=n_impressions,
        outcome_events=outcome_events,
        by_request_id=by_id,
        by_user_or_session=by_keys,
        unmatched_request_ids=with_id - sum(by_id.values()),
    )
