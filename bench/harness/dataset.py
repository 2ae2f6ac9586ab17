"""The benchmarks' data set: a synthetic log and everything serving needs, built once.

`prepare` generates a log over a catalogue of the requested size, runs the Spark
features, trains ALS, builds the FAISS index and applies the Feast repository under
the data directory, and for the serving benchmarks trains and publishes the two-tower
and SASRec models (a marker file lets `--reuse` skip what is done); `materialize`
loads the online store. The batch jobs are imported inside them, so a benchmark that reuses a
prepared directory starts without Spark.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

from inkling.config import Settings
from inkling.feature_store.feast_store import open_store


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


RETRIEVAL_TRAIN_S = 30.0
RANKER_TRAIN_S = 45.0
"""Training budgets of the production models a serving benchmark publishes: brief,
since the benchmark times serving them, not their quality."""


def prepare(settings: Settings, items: int, reuse: bool, models: bool = False) -> None:
    """Build the data set, features, registry, embeddings and index under
    settings.data_dir; with `models`, also train and publish (CURRENT) the two-tower
    retrieval model and the SASRec ranker, what `inkling serve` then loads."""
    from batch.als import AlsConfig, train_als
    from batch.build_index import build_retrieval_index
    from batch.features import compute_features
    from batch.generate import GeneratorConfig, write_synthetic
    from batch.spark import build_session
    from inkling.feature_store.feast_store import feast_cli

    marker = settings.data_dir / "bench-ready.json"
    ready = json.loads(marker.read_text()) if reuse and marker.exists() else None
    if ready is not None and (ready.get("models") or not models):
        _progress(f"reusing {settings.data_dir}")
        return
    config = GeneratorConfig(
        users=max(items // 5, 100), items=items, sessions=max(items // 2, 300), days=7
    )
    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-bench")
    try:
        if ready is None:
            _progress(f"generating {config}")
            write_synthetic(config, settings)
            compute_features(
                spark, settings.events_dir, settings.catalog_dir, settings.features_dir
            )
            train_als(spark, settings.events_dir, settings.models_dir / "als", AlsConfig())
            build_retrieval_index(settings.models_dir / "als", settings.models_dir / "index", k=500)
            feast_cli(settings, "apply", quiet=True)
        if models:
            from batch.train_retrieval import train_retrieval

            _progress(f"training the two-tower retrieval model ({RETRIEVAL_TRAIN_S:.0f} s)")
            train_retrieval(settings, seconds=RETRIEVAL_TRAIN_S, spark=spark)
    finally:
        spark.stop()
    if models:
        from batch.train_ranker import train_ranker

        _progress(f"training the SASRec ranker ({RANKER_TRAIN_S:.0f} s)")
        train_ranker(settings, seconds=RANKER_TRAIN_S)
    marker.write_text(json.dumps({"items": items, "config": str(config), "models": models}))


def materialize(settings: Settings) -> None:
    from batch.materialize import bulk_materialize

    began = time.perf_counter()
    bulk_materialize(
        open_store(settings),
        datetime(1990, 1, 1, tzinfo=UTC),
        datetime.now(UTC),
        progress=False,
    )
    _progress(f"materialized in {time.perf_counter() - began:.1f}s")
