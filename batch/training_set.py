"""Point-in-time training sets: labels from the event log, features from Feast.

Label kinds:

``next-item``
    One row per interaction (click, add_to_cart, purchase) in a session: the item the
    user chose next, with everything the session and history showed before it.
    `label` is 1 (negatives are sampled by the trainer).
``click``
    One row per impression (`item_view`): `label` is 1 when the same session clicked
    that item afterwards, else 0 (shown but not clicked).

Every row carries `label_timestamp` (the labelled event's time) and
`event_timestamp` = `label_timestamp` − 1 ms: the moment a recommendation for that
event would have been requested. Feast's historical retrieval joins, per feature
view, the latest row with a timestamp at or before `event_timestamp`, so no value
observed at or after the labelled event can reach its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
from feast import FeatureStore
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from batch.features import read_events
from inkling.errors import InvalidInputError
from inkling.events.schema import INTERACTION_TYPES

KINDS = ("next-item", "click")
REQUEST_OFFSET = timedelta(milliseconds=1)
ANONYMOUS_USER = "__anonymous__"
"""Stands in for a missing user_id in the entity frame; no feature row has it."""


@dataclass(frozen=True)
class TrainingSet:
    frame: pd.DataFrame
    path: Path
    kind: str
    feature_service: str


def labels(events: DataFrame, kind: str) -> DataFrame:
    """Label rows (user_id, session_id, item_id, label_timestamp, label, ...) from events."""
    if kind not in KINDS:
        raise InvalidInputError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "next-item":
        inter = events.where(F.col("event_type").isin(*INTERACTION_TYPES))
        order = Window.partitionBy("session_id").orderBy("timestamp", "event_id")
        rows = inter.select(
            "user_id",
            "session_id",
            "item_id",
            F.col("timestamp").alias("label_timestamp"),
            "event_type",
            (F.row_number().over(order) - 1).alias("session_position"),
            F.lit(1).alias("label"),
        )
    else:
        shown = events.where(F.col("event_type") == "item_view").select(
            "user_id",
            "session_id",
            "item_id",
            F.col("timestamp").alias("label_timestamp"),
            "position",
        )
        clicks = (
            events.where(F.col("event_type") == "click")
            .groupBy("session_id", "item_id")
            .agg(F.max("timestamp").alias("last_click"))
        )
        rows = shown.join(clicks, ["session_id", "item_id"], "left").select(
            "user_id",
            "session_id",
            "item_id",
            "label_timestamp",
            "position",
            F.when(F.col("last_click") > F.col("label_timestamp"), 1).otherwise(0).alias("label"),
        )
    return rows.withColumn(
        "event_timestamp",
        F.col("label_timestamp")
        - F.expr(f"INTERVAL {int(REQUEST_OFFSET.total_seconds() * 1000)} MILLISECONDS"),
    )


def build_training_set(
    spark: SparkSession,
    store: FeatureStore,
    events_dir: Path,
    out_dir: Path,
    kind: str = "next-item",
    feature_service: str = "ranker_v1",
    max_rows: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Label rows from the log, joined point-in-time with a feature service's features."""
    service = store.get_feature_service(feature_service)
    rows = labels(read_events(spark, str(events_dir)), kind)
    total = rows.count()
    if total == 0:
        raise InvalidInputError(f"the event log has no rows for {kind} labels")
    if max_rows is not None and total > max_rows:
        rows = rows.sample(fraction=min(1.0, 1.1 * max_rows / total), seed=seed).limit(max_rows)
    entity_df = rows.toPandas()
    entity_df["user_id"] = entity_df["user_id"].fillna(ANONYMOUS_USER)
    for col in ("event_timestamp", "label_timestamp"):
        entity_df[col] = pd.to_datetime(entity_df[col], utc=True)
    entity_df["__row"] = range(len(entity_df))
    # Feast 0.67's file offline store drops an entity row when a view of the request has
    # no row at or before its timestamp (seen here: a user's first day, an item's first
    # day), and then loses that row's other views too. So each view is retrieved on its
    # own and joined back by row: a missing view leaves only its own columns null.
    joined = entity_df
    for projection in service.feature_view_projections:
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        found = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
        columns = [c for c in found.columns if c not in entity_df.columns]
        joined = joined.merge(found[["__row", *columns]], on="__row", how="left")
    joined = joined.drop(columns="__row")
    joined = joined.sort_values(
        ["label_timestamp", "session_id", "item_id"], kind="stable"
    ).reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{feature_service}.parquet"
    joined.to_parquet(path, index=False)
    return TrainingSet(joined, path, kind, feature_service)
