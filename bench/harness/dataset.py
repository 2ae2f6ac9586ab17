"""The benchmarks' data set: a synthetic log and everything serving needs, built once.

`prepare` generates a log over a catalogue of the requested size, runs the Spark
features, trains ALS, builds the FAISS index and applies the Feast repository under
the data directory (a marker file lets `--reuse` skip it); `materialize` loads the
online store; `publish_models` trains and publishes the two-tower and SASRec models
that the serving benchmarks serve. The batch jobs are imported inside them, so a benchmark that reuses a
prepared directory starts without Spark.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import UTC, datetime

from inkling.config import Settings
from inkling.feature_store.feast_store import open_store


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


RETRIEVAL_TRAIN_S = 30.0
RANKER_TRAIN_S = 45.0
RETRIEVAL_TRAIN_ROWS = 50_000
"""Training budgets of the production models a serving benchmark publishes: brief,
since the benchmark times serving them, not their quality. The two-tower's training
set is capped below `inkling train`'s default (200,000 rows): Feast's file offline
store (Dask) took over ten minutes on 200,000 entity rows of the 100k-item set and
then failed ("Divisions calculation failed for non-numeric column
'__event_timestamp'")."""


def prepare(settings: Settings, items: int, reuse: bool) -> None:
    """Build the data set, features, registry, embeddings and index under settings.data_dir."""
    from batch.als import AlsConfig, train_als
    from batch.build_index import build_retrieval_index
    from batch.features import compute_features
    from batch.generate import GeneratorConfig, write_synthetic
    from batch.spark import build_session
    from inkling.feature_store.feast_store import feast_cli

    marker = settings.data_dir / "bench-ready.json"
    if reuse and marker.exists():
        _progress(f"reusing {settings.data_dir}")
        return
    config = GeneratorConfig(
        users=max(items // 5, 100), items=items, sessions=max(items // 2, 300), days=7
    )
    _progress(f"generating {config}")
    write_synthetic(config, settings)
    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-bench")
    try:
        compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
        train_als(spark, settings.events_dir, settings.models_dir / "als", AlsConfig())
    finally:
        spark.stop()
    build_retrieval_index(settings.models_dir / "als", settings.models_dir / "index", k=500)
    feast_cli(settings, "apply", quiet=True)
    for model in PRODUCTION_MODELS:  # a new data set: models of an old one must not serve
        shutil.rmtree(settings.data_dir / "registry" / model, ignore_errors=True)
    marker.write_text(json.dumps({"items": items, "config": str(config)}))


PRODUCTION_MODELS = ("retrieval", "ranker")
"""The registry names the servers load by default (`RetrievalSettings.model`,
`RankingSettings.model`)."""


def publish_models(live: Settings, reuse: bool) -> None:
    """Train (briefly) and publish CURRENT the two-tower retrieval model and the SASRec
    ranker on the data set, what `inkling serve` then loads; with `reuse`, only those not
    published yet. `live` has the Redis the features were materialized into."""
    from batch.train_ranker import train_ranker
    from batch.train_retrieval import train_retrieval
    from inkling.models.registry import ModelRegistry

    registry = ModelRegistry(live.data_dir / "registry")
    have = {m for m in PRODUCTION_MODELS if reuse and registry.served_version(m) is not None}
    if "retrieval" not in have:
        _progress(f"training the two-tower retrieval model ({RETRIEVAL_TRAIN_S:.0f} s)")
        train_retrieval(live, seconds=RETRIEVAL_TRAIN_S, max_rows=RETRIEVAL_TRAIN_ROWS)
    if "ranker" not in have:
        _progress(f"training the SASRec ranker ({RANKER_TRAIN_S:.0f} s)")
        train_ranker(live, seconds=RANKER_TRAIN_S)


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
