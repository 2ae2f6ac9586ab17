"""Collaborative-filtering embeddings: implicit ALS over the event log's interactions.

Each (user, item) pair's confidence is the sum of its interaction weights (click 1,
add_to_cart 3, purchase 5: `batch.features.AFFINITY_WEIGHTS`); anonymous events and
impressions are left out. Spark's ALS (Hu, Koren & Volinsky's implicit-feedback
model) factorises the pairs into user and item vectors whose inner product scores
an item for a user.

The vectors are written as the embeddings artifact of
`inkling.models.embeddings` (its docstring lists the files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inkling.errors import InvalidInputError, NotFoundError
from inkling.models.embeddings import FORMAT_VERSION, EmbeddingsArtifact, write_embeddings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


@dataclass(frozen=True)
class AlsConfig:
    """Implicit-ALS hyperparameters."""

    rank: int = 32
    """32 dimensions hold the catalogue's category structure (tens of categories) with room
    for finer taste, and keep the ANN index small: 128 bytes per item."""
    max_iter: int = 10
    """Implicit ALS settles within about ten alternating sweeps (Hu et al. 2008 report the
    same); more barely moves the factors and lengthens Spark's lineage."""
    reg_param: float = 0.05
    """Spark scales the L2 penalty by each row's number of ratings (ALS-WR), so a small
    value already regularises heavy users and items; 0.05 keeps long-tail items usable."""
    alpha: float = 10.0
    """Confidence is 1 + alpha * weight. Weights here are already graded (a purchase
    brings 9), so a lower alpha than the paper's 40 for raw counts keeps one purchase
    from outweighing all unobserved items."""
    seed: int = 7

    def __post_init__(self) -> None:
        for name in ("rank", "max_iter"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("reg_param", "alpha"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must not be negative, got {getattr(self, name)}")


def als_estimator(spark: SparkSession, config: AlsConfig) -> Any:
    """Spark's implicit ALS over columns user, item, rating, configured from `config`."""
    from pyspark.ml.recommendation import ALS

    # Spark's default of 10 blocks, fewer when there are fewer cores to fill.
    blocks = max(1, min(10, spark.sparkContext.defaultParallelism))
    return ALS(
        rank=config.rank,
        maxIter=config.max_iter,
        regParam=config.reg_param,
        alpha=config.alpha,
        implicitPrefs=True,
        seed=config.seed,
        numUserBlocks=blocks,
        numItemBlocks=blocks,
        userCol="user",
        itemCol="item",
        ratingCol="rating",
    )


def train_als(
    spark: SparkSession, events_dir: Path, out_dir: Path, config: AlsConfig
) -> EmbeddingsArtifact:
    """Train implicit ALS on the event log at `events_dir` and write the artifact to `out_dir`."""
    from pyspark.ml.feature import StringIndexer
    from pyspark.sql import functions as F

    from batch.spark import Heartbeat, stage

    pairs = _pairs(spark, str(events_dir)).cache()
    try:
        with Heartbeat(spark):
            with stage(f"read interactions ({events_dir})"):
                stats = pairs.agg(
                    F.count(F.lit(1)).alias("pairs"),
                    F.sum("interactions").alias("interactions"),
                    F.min("first_us").alias("first_us"),
                    F.max("last_us").alias("last_us"),
                ).first()
                if stats is None or stats["pairs"] == 0:
                    raise InvalidInputError(
                        f"the event log at {events_dir} has no interactions (click, add_to_cart, "
                        "purchase) by known users to train ALS on"
                    )
            with stage("index user and item ids"):
                indexer = StringIndexer(
                    inputCols=["user_id", "item_id"],
                    outputCols=["user_ix", "item_ix"],
                    stringOrderType="alphabetAsc",
                ).fit(pairs)
                user_labels, item_labels = (list(labels) for labels in indexer.labelsArray)
                ratings = indexer.transform(pairs).select(
                    F.col("user_ix").cast("int").alias("user"),
                    F.col("item_ix").cast("int").alias("item"),
                    F.col("confidence").cast("float").alias("rating"),
                )
            with stage(
                f"ALS rank {config.rank}, {config.max_iter} iterations over {stats['pairs']} "
                f"pairs ({len(user_labels)} users x {len(item_labels)} items)"
            ):
                model = als_estimator(spark, config).fit(ratings)
            with stage("collect factors"):
                user_ids, user_vectors = _factors(model.userFactors, user_labels, config.rank)
                item_ids, item_vectors = _factors(model.itemFactors, item_labels, config.rank)
    finally:
        pairs.unpersist()

    manifest = {
        "model": "als",
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "interaction_weights": _weights(),
        "counts": {
            "interactions": int(stats["interactions"]),
            "pairs": int(stats["pairs"]),
            "users": len(user_ids),
            "items": len(item_ids),
        },
        "data": {
            "events_dir": str(events_dir),
            "first_event": _iso(stats["first_us"]),
            "last_event": _iso(stats["last_us"]),
        },
        "created_at": datetime.now(UTC).isoformat(),
    }
    artifact = EmbeddingsArtifact(item_ids, item_vectors, user_ids, user_vectors, manifest)
    write_embeddings(artifact, out_dir)
    return artifact


def _weights() -> dict[str, float]:
    from batch.features import AFFINITY_WEIGHTS

    return dict(AFFINITY_WEIGHTS)


def _pairs(spark: SparkSession, events_dir: str) -> DataFrame:
    """One row per (known user, item) with the summed interaction weight as confidence."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    from batch.features import read_events

    if "://" not in events_dir and not Path(events_dir).exists():
        raise NotFoundError(f"event log directory {events_dir} does not exist")
    try:
        events = read_events(spark, events_dir)
    except AnalysisException as e:
        raise InvalidInputError(f"the event log at {events_dir} has no readable events") from e
    weights = _weights()
    weight = F.create_map(*[F.lit(x) for pair in weights.items() for x in pair])[
        F.col("event_type")
    ]
    ts = F.unix_micros(F.col("timestamp"))
    return (
        events.where(
            F.col("user_id").isNotNull()
            & F.col("item_id").isNotNull()
            & F.col("event_type").isin(*weights)
        )
        .groupBy("user_id", "item_id")
        .agg(
            F.sum(weight).alias("confidence"),
            F.count(F.lit(1)).alias("interactions"),
            F.min(ts).alias("first_us"),
            F.max(ts).alias("last_us"),
        )
    )


def _factors(factors: DataFrame, labels: list[str], rank: int) -> tuple[list[str], np.ndarray]:
    """ALS factors as a float32 matrix in index order, with the ids they belong to."""
    table = factors.toArrow()
    ids = table.column("id").to_numpy()
    flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    order = np.argsort(ids, kind="stable")
    vectors = np.ascontiguousarray(flat.reshape(len(ids), rank)[order], dtype=np.float32)
    return [labels[i] for i in ids[order]], vectors


def _iso(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat()
