"""`inkling retrain`: one retraining run that promotes only what wins.

One run, meant for a scheduler (cron, Airflow, a Kubernetes CronJob), e.g. hourly:

1. **The canary first.** If the registry has a canary (a candidate serving a small
   share through an experiment), attribute the serve log (`batch.attribution`) and read
   its experiment report (`batch.experiment_report`, CTR, always-valid test): the canary
   becomes CURRENT when it wins, is rolled back when it loses, and keeps running when no
   decision is possible yet; while it runs, no new candidate is trained.
2. **Features** are recomputed from the event log (`batch.features`).
3. **A candidate** ranker is trained and published (not CURRENT), and evaluated beside
   CURRENT on the same newest held-out data (the last item of every sequence).
4. **Drift** (`batch.drift`): every feature of the served feature service between the
   reference window (the `reference_days` before the recent window) and the recent
   window (the last `recent_days` of the event log), and CURRENT's served scores.
5. **Gates.** The candidate becomes CURRENT only if its offline metric (test NDCG@10)
   is not below CURRENT's by more than `tolerance` (relative) and no feature drifted
   beyond its threshold unexplained. Otherwise it becomes the canary: `canary_share`
   of the users, experiment `canary-<version>`, decided by step 1 of later runs.

Every decision goes to the registry's decision log with its reasons
(`ModelRegistry.log_decision`), and the drift report to
`<data_dir>/retrain/<version>/drift.{json,md}`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batch.drift import DEFAULT_PSI_THRESHOLD, DriftReport, drift_report
from batch.evaluation import SequenceRecommender, Split
from batch.experiment_report import build_report, catalogue_prices
from inkling.config import Settings
from inkling.events.eventlog import EventLog
from inkling.events.servelog import ServeLog
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.models.registry import ModelRegistry

METRIC = "ndcg@10"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Gates:
    tolerance: float = 0.02
    """How far (relative) the candidate's test NDCG@10 may fall below CURRENT's."""
    psi_threshold: float = DEFAULT_PSI_THRESHOLD
    canary_share: float = 0.05
    """The share of users a canary serves."""
    alpha: float = 0.05
    """The canary's experiment test's false-positive rate."""


@dataclass(frozen=True)
class Decision:
    action: str
    """promote, canary (a new candidate), or for a running canary: promote, rollback, wait."""
    reasons: list[str] = field(default_factory=list)


def decide(candidate: float, current: float | None, drift: DriftReport, gates: Gates) -> Decision:
    """Promote a new candidate, or make it a canary; the reasons say why."""
    reasons: list[str] = []
    worse = False
    if current is None:
        reasons.append("no CURRENT version to compare with")
    else:
        floor = current * (1 - gates.tolerance)
        worse = candidate < floor
        relation = "below" if worse else "within"
        reasons.append(
            f"test {METRIC} {candidate:.4f} vs CURRENT {current:.4f}: {relation} the "
            f"{gates.tolerance:.0%} tolerance (floor {floor:.4f})"
        )
    unexplained = drift.unexplained
    if unexplained:
        names = ", ".join(f"{f.name} (PSI {f.psi:.2f})" for f in unexplained)
        reasons.append(f"drift beyond PSI {gates.psi_threshold} not explained: {names}")
    else:
        explained = [f.name for f in drift.features if f.drifted]
        reasons.append(
            "no unexplained drift" + (f" (explained: {', '.join(explained)})" if explained else "")
        )
    return Decision("canary" if worse or unexplained else "promote", reasons)


def resolve_canary(
    registry: ModelRegistry,
    model: str,
    impressions: Any,
    prices: Mapping[str, float],
    gates: Gates,
) -> Decision | None:
    """Decide a running canary from its experiment (None when no canary runs); the
    registry is changed and the decision logged."""
    canary = registry.canary(model)
    if canary is None:
        return None
    try:
        report = build_report(
            impressions, canary.experiment, prices=dict(prices), alpha=gates.alpha
        )
        ctr = report.comparison("candidate")
        verdict, last = ctr.verdict, ctr.checkpoints[-1]
        detail = (
            f"experiment {canary.experiment}: CTR {last.relative:+.1%} vs control, "
            f"always-valid p {last.p_value:.4f} (alpha {gates.alpha}): {verdict}"
        )
    except (ValueError, StopIteration, IndexError) as e:
        verdict, detail = "no decision yet", f"experiment {canary.experiment}: {e}"
    if verdict == "candidate wins":
        registry.set_current(model, canary.version)
        registry.end_canary(model)
        decision = Decision("promote", [detail, f"{canary.version} is CURRENT"])
    elif verdict == "candidate loses":
        registry.end_canary(model)
        decision = Decision("rollback", [detail, f"{canary.version} no longer serves"])
    else:
        decision = Decision("wait", [detail, "the canary keeps its share"])
    registry.log_decision(
        model,
        {"action": decision.action, "version": canary.version, "reasons": decision.reasons,
         "canary": {"share": canary.share, "experiment": canary.experiment}},
    )  # fmt: skip
    return decision


class OnVocabulary:
    """A fitted model evaluated on a split with another item vocabulary: histories are
    mapped into the model's, its scores back; items it never saw score lowest."""

    def __init__(self, model: Any, split: Split, name: str) -> None:
        self.name = name
        self._model = model
        theirs = {item: i for i, item in enumerate(model.item_ids)}
        ours = split.train.item_ids
        self._to_model = np.array([theirs.get(item, -1) for item in ours], np.int64)
        self._to_model[0] = -1  # padding

    def fit(self, split: Split, progress: Any = None) -> None:  # pragma: no cover - fitted
        raise RuntimeError("OnVocabulary wraps a fitted model")

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        mapped, kept = [], []
        for h in histories:
            m = self._to_model[h]
            keep = m > 0
            mapped.append(m[keep])
            kept.append(keep)
        their_flags = None
        if flags is not None:
            their_flags = [f[k] for f, k in zip(flags, kept, strict=True)]
        scores = np.asarray(self._model.score(mapped, their_flags), np.float32)
        known = self._to_model > 0
        out = np.full((len(histories), len(self._to_model)), -1e9, np.float32)
        out[:, known] = scores[:, self._to_model[known]]
        return out


@dataclass
class RetrainResult:
    decisions: list[dict[str, Any]]
    candidate: str | None = None
    drift: Path | None = None


def _event_time_range(events_dir: Path) -> tuple[datetime, datetime]:
    table = EventLog(events_dir).read(["timestamp"])
    if table.num_rows == 0:
        raise ValueError(f"the event log at {events_dir} is empty: nothing to retrain on")
    bounds = pc.min_max(table.column("timestamp"))
    return bounds["min"].as_py(), bounds["max"].as_py()


def _test_metric(row: Mapping[str, Any]) -> float:
    return float(row["test"]["full"][METRIC])


def run_retrain(
    settings: Settings,
    spark: Any,
    *,
    seconds: float,
    gates: Gates = Gates(),
    explained: Mapping[str, str] | None = None,
    recent_days: float = 1.0,
    reference_days: float = 7.0,
    model: str = "ranker",
) -> RetrainResult:
    """One run of the steps above; returns what was decided (also in the decision log)."""
    from batch.attribution import run_attribution
    from batch.features import compute_features
    from batch.train_ranker import FEATURE_SERVICE, train_ranker
    from inkling.models import SasRecRecommender

    registry = ModelRegistry(settings.data_dir / "registry")
    result = RetrainResult(decisions=[])
    prices = catalogue_prices(settings.catalog_dir / "items.parquet")
    if registry.canary(model) is not None:
        _say("[retrain] a canary runs: attributing the serve log to decide it")
        impressions = None
        if ServeLog(settings.serves_dir).exists():
            run_attribution(
                spark, settings.serves_dir, settings.events_dir, settings.impressions_dir
            )
            impressions = ds.dataset(str(settings.impressions_dir), partitioning="hive").to_table()
        outcome = resolve_canary(registry, model, impressions, prices, gates)
        assert outcome is not None
        result.decisions.append(registry.decisions(model)[-1])
        _say(f"[retrain] canary: {outcome.action}: {'; '.join(outcome.reasons)}")
        if outcome.action == "wait":
            return result  # one experiment at a time
    first, last = _event_time_range(settings.events_dir)
    _say("[retrain] recomputing features")
    compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
    current = registry.served_version(model)

    def in_service(split: Split) -> Sequence[SequenceRecommender]:
        if current is None:
            return []
        loaded = SasRecRecommender.load(registry.path(model, current))
        return [OnVocabulary(loaded, split, f"CURRENT ({current})")]

    manifest, table = train_ranker(
        settings,
        seconds=seconds,
        model_name=model,
        make_current=False,
        compare_with=in_service,
    )  # fmt: skip  (no Spark: the ALS baseline is not what the gate compares)
    result.candidate = manifest.version
    candidate_metric = _test_metric(manifest.metrics)
    current_metric = _test_metric(table[-1]) if current is not None else None
    recent_start = last - timedelta(days=recent_days)
    reference = (max(first, recent_start - timedelta(days=reference_days)), recent_start)
    serves = (
        ServeLog(settings.serves_dir).read() if ServeLog(settings.serves_dir).exists() else None
    )
    current_label = ""
    if current is not None:
        current_label = f"{registry.manifest(model, current).model}:{current}"
    drift = drift_report(
        settings.features_dir,
        resolve_service(open_store(settings), FEATURE_SERVICE),
        reference,
        (recent_start, last + timedelta(microseconds=1)),
        psi_threshold=gates.psi_threshold,
        explained=explained,
        serves=serves,
        model_version=current_label,
    )
    out = settings.data_dir / "retrain" / manifest.version
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(drift.to_dict(), indent=1, default=str))
    (out / "drift.md").write_text(drift.markdown() + "\n")
    result.drift = out / "drift.md"
    decision = decide(candidate_metric, current_metric, drift, gates)
    if decision.action == "promote":
        registry.set_current(model, manifest.version)
    else:
        canary = registry.set_canary(
            model, manifest.version, gates.canary_share, f"canary-{manifest.version}"
        )
        decision.reasons.append(
            f"canary: {canary.share:.0%} of users in experiment {canary.experiment}"
        )
    record = registry.log_decision(
        model,
        {
            "action": decision.action, "version": manifest.version, "current": current,
            "reasons": decision.reasons,
            "offline": {"candidate": candidate_metric, "current": current_metric, "metric": METRIC},
            "drift": {"report": str(out / "drift.json"),
                      "unexplained": [f.name for f in drift.unexplained]},
        },
    )  # fmt: skip
    result.decisions.append(record)
    _say(f"[retrain] {manifest.version}: {decision.action}: {'; '.join(decision.reasons)}")
    return result
