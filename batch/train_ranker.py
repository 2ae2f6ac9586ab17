"""`inkling train`: the sequence ranker, trained, evaluated and published to the registry.

The model (SASRec, `inkling/models/sasrec.py`) learns from each user's (or, for a log
without users, each session's) interaction sequence. Training uses the leave-last-out
split's training part with the validation part for early stopping; the test part is
scored once, after training, and its metrics go into the manifest. The version is
published under `<data_dir>/registry/ranker` and made CURRENT, which a running
ranking server picks up, warms and swaps in.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.evaluation import (
    AlsBaseline,
    HistoryOnly,
    ItemKNN,
    MostPopular,
    SequenceRecommender,
    Split,
    describe,
    evaluate,
    evaluate_all,
    leave_last_out,
    load_sequences,
)
from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.models import SasRecConfig, SasRecRecommender
from inkling.models.inference import write_checked_onnx
from inkling.models.registry import Manifest, ModelRegistry, service_columns

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

FEATURE_SERVICE = "ranker_v1"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_ranker(
    settings: Settings,
    *,
    seconds: float,
    model_name: str = "ranker",
    make_current: bool = True,
    config: SasRecConfig | None = None,
    registry_dir: Path | None = None,
    spark: SparkSession | None = None,
    compare_with: Callable[[Split], Sequence[SequenceRecommender]] | None = None,
) -> tuple[Manifest, list[dict[str, Any]]]:
    """Train, evaluate on the held-out last items beside the baselines on the same split
    (most popular, ItemKNN, ALS when given a Spark session, and the ranker itself with
    the session part cut off), publish; returns the manifest and the evaluation rows.
    `compare_with(split)`: fitted models (e.g. the version in service) also evaluated on
    that split, without fitting; their rows come last."""
    if config is not None and config.time_gaps:
        raise InvalidInputError(
            "time_gaps is an offline experiment (inkling evaluate, bench.ranker_quality): the "
            "serving path has no item times to feed it",
            field="time_gaps",
        )
    # The feature service is resolved first: a missing one fails before minutes of training.
    columns = service_columns(resolve_service(open_store(settings), FEATURE_SERVICE))
    sequences = load_sequences(
        settings.events_dir, by="auto", catalog=settings.catalog_dir / "items.parquet"
    )
    split = leave_last_out(sequences)
    model = SasRecRecommender(config or SasRecConfig(max_train_seconds=seconds))
    began = time.perf_counter()
    model.fit(split.without_test(), progress=_say)
    metrics: dict[str, Any] = evaluate(model, split)
    metrics["fit_s"] = time.perf_counter() - began
    _say(f"[train] test {metrics['test']}")
    baselines: list[SequenceRecommender] = [MostPopular(), ItemKNN()]
    if spark is not None:
        baselines.append(AlsBaseline(spark))
    table = [
        *evaluate_all(baselines, split, progress=_say),
        metrics,
        *evaluate_all([HistoryOnly(model)], split, fit=False),
        *(evaluate_all(list(compare_with(split)), split, fit=False) if compare_with else []),
    ]
    registry = ModelRegistry(registry_dir or settings.data_dir / "registry")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        model.save(artifact)
        model.plot_curves(artifact / "training.png")
        _, inference = write_checked_onnx(model, artifact)
        _say(f"[train] {inference}")
        metrics["inference"] = inference
        manifest = registry.publish(
            artifact,
            model=model_name,
            kind="sasrec",
            feature_service=FEATURE_SERVICE,
            columns=columns,
            training_data=describe(split),
            metrics=metrics,
            training=model.training_summary(),
            make_current=make_current,
        )
    _say(
        f"[train] published {model_name} {manifest.version}"
        + (" (CURRENT)" if make_current else "")
        + f" -> {registry.path(model_name, manifest.version)}"
    )
    return manifest, table
