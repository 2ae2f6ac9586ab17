"""Retraining's judgement: drift measures, the promotion gates, and canaries decided by
their experiment (a real registry on disk, experiments from the simulator)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast.value_type import ValueType

from batch.drift import DriftReport, drift_report, ks, measure, psi, wasserstein
from batch.retrain import Gates, OnVocabulary, decide, resolve_canary
from batch.simulate import SimArm, SimulationConfig, simulate
from inkling.feature_store.columns import FeatureColumn, ServiceColumns, ViewColumns
from inkling.models.registry import ModelRegistry

RNG = np.random.default_rng(4)


# --- the measures -------------------------------------------------------------------------


def test_psi_ks_and_wasserstein_see_a_shift_and_not_noise():
    reference = RNG.normal(0, 1, 20_000)
    same = RNG.normal(0, 1, 20_000)
    shifted = RNG.normal(0.5, 1, 20_000)
    assert psi(reference, same) < 0.01 < 0.1 < psi(reference, shifted)
    d_same, p_same = ks(reference, same)
    d_shift, p_shift = ks(reference, shifted)
    assert p_same > 0.01 and p_shift < 1e-10 and d_shift > 0.15 > d_same
    assert wasserstein(reference, shifted) == pytest.approx(0.5, abs=0.05)
    assert wasserstein(reference, same) < 0.05


def test_strings_and_lists_are_compared_by_category_and_by_length():
    cats = pa.array(RNG.choice(["shoes", "hats", "bags"], 5_000, p=[0.6, 0.3, 0.1]))
    moved = pa.array(RNG.choice(["shoes", "hats", "bags"], 5_000, p=[0.2, 0.3, 0.5]))
    assert measure("c", cats, moved, 0.2).drifted and not measure("c", cats, cats, 0.2).drifted
    lists = pa.array([["a"] * int(n) for n in RNG.integers(1, 5, 3_000)])
    longer = pa.array([["a"] * int(n) for n in RNG.integers(5, 9, 3_000)])
    drift = measure("l", lists, longer, 0.2)
    assert drift.kind == "list length" and drift.drifted
    stamps = pa.array(RNG.integers(0, 10**12, 2_000), pa.timestamp("us", tz="UTC"))
    later = pa.array(RNG.integers(10**12, 2 * 10**12, 2_000), pa.timestamp("us", tz="UTC"))
    moved_in_time = measure("t", stamps, later, 0.2)
    assert moved_in_time.psi > 1 and not moved_in_time.drifted  # reported, not gated
    assert moved_in_time.kind == "timestamp (not gated)"


def view(name: str, *features: str) -> ViewColumns:
    columns = tuple(FeatureColumn(f, ValueType.DOUBLE, f.encode()) for f in features)
    return ViewColumns(name, name, "item_id", columns, None)


def test_the_report_reads_each_views_offline_table_by_window(tmp_path):
    start = datetime(2026, 11, 1, tzinfo=UTC)
    stamps = [start + timedelta(hours=h) for h in range(48) for _ in range(100)]
    n = len(stamps)
    late = np.array([s >= start + timedelta(days=1) for s in stamps])
    table = pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
            "steady": RNG.normal(10, 2, n),
            "price": np.where(late, RNG.normal(14, 2, n), RNG.normal(10, 2, n)),
        }
    )
    (tmp_path / "item_features").mkdir()
    pq.write_table(table, tmp_path / "item_features" / "part.parquet")
    columns = ServiceColumns(
        "svc", "p", (view("item_features", "steady", "price"), view("gone", "x"))
    )
    windows = (
        (start, start + timedelta(days=1)),
        (start + timedelta(days=1), start + timedelta(days=2)),
    )
    report = drift_report(tmp_path, columns, *windows)
    by_name = {f.name: f for f in report.features}
    assert not by_name["item_features:steady"].drifted
    assert by_name["item_features:price"].drifted and by_name["item_features:price"].psi > 1
    assert by_name["item_features:price"].reference_rows == 2_400
    assert [f.name for f in report.unexplained] == ["item_features:price"]
    assert any("gone: no offline table" in note for note in report.notes)
    explained = drift_report(tmp_path, columns, *windows, explained={"price": "a sale"})
    assert explained.unexplained == [] and "explained: a sale" in explained.markdown()


# --- the gates ----------------------------------------------------------------------------


def report_with(drifted: bool, explained: str = "") -> DriftReport:
    a = pa.array(RNG.normal(0, 1, 2_000))
    b = pa.array(RNG.normal(2 if drifted else 0, 1, 2_000))
    report = DriftReport(("a", "b"), ("b", "c"), 0.2)
    report.features.append(measure("item_features:price", a, b, 0.2, explained))
    return report


def test_a_drifted_feature_blocks_promotion_and_a_clean_candidate_is_promoted():
    gates = Gates(tolerance=0.02)
    clean = decide(0.101, 0.100, report_with(False), gates)
    assert clean.action == "promote" and "within the 2% tolerance" in clean.reasons[0]
    drifted = decide(0.120, 0.100, report_with(True), gates)
    assert drifted.action == "canary"
    assert "item_features:price" in drifted.reasons[1] and "not explained" in drifted.reasons[1]
    assert decide(0.120, 0.100, report_with(True, "autumn sale"), gates).action == "promote"
    worse = decide(0.095, 0.100, report_with(False), gates)
    assert worse.action == "canary" and "below the 2% tolerance" in worse.reasons[0]
    assert decide(0.05, None, report_with(False), gates).action == "promote"  # nothing serves


# --- canaries -----------------------------------------------------------------------------


ITEMS = pa.table(
    {
        "item_id": [f"i{i}" for i in range(300)],
        "category": [f"c{i % 6}" for i in range(300)],
        "price": RNG.uniform(5, 50, 300),
    }
)


@pytest.fixture
def registry(tmp_path):
    reg = ModelRegistry(tmp_path / "registry")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "weights.bin").write_bytes(b"x")
    for version in ("v1", "v2"):
        reg.publish(
            artifact, model="ranker", kind="sasrec", feature_service="ranker_v1",
            columns={}, version=version, make_current=version == "v1",
        )  # fmt: skip
    return reg


def canary_impressions(lift: float, requests: int, experiment: str) -> pa.Table:
    arms = (SimArm("candidate", 0.5, lift=lift), SimArm("control", 0.5))
    config = SimulationConfig(
        requests=requests, users=2_000, candidates=50, hours=12, arms=arms, seed=8,
        experiment=experiment,
    )  # fmt: skip
    imp = simulate(config, ITEMS).impressions
    return imp.append_column("experiment", pa.array([experiment] * imp.num_rows))


@pytest.mark.parametrize(
    ("lift", "requests", "action", "current", "canary_left"),
    [
        (-0.3, 20_000, "rollback", "v1", False),
        (0.3, 20_000, "promote", "v2", False),
        (0.0, 2_000, "wait", "v1", True),
    ],
)
def test_a_canary_is_promoted_when_it_wins_and_rolled_back_when_it_loses(
    registry, lift, requests, action, current, canary_left
):
    registry.set_canary("ranker", "v2", 0.05, "canary-v2")
    impressions = canary_impressions(lift, requests, "canary-v2")
    decision = resolve_canary(registry, "ranker", impressions, {}, Gates())
    assert decision is not None and decision.action == action
    assert registry.current_version("ranker") == current
    assert (registry.canary("ranker") is not None) == canary_left
    logged = registry.decisions("ranker")[-1]
    assert logged["action"] == action and logged["version"] == "v2"
    assert "experiment canary-v2: CTR" in logged["reasons"][0]


def test_a_canary_without_impressions_waits(registry):
    registry.set_canary("ranker", "v2", 0.05, "canary-v2")
    decision = resolve_canary(
        registry, "ranker", canary_impressions(0.0, 500, "other"), {}, Gates()
    )
    assert decision is not None and decision.action == "wait"
    assert "no impressions of experiment 'canary-v2'" in decision.reasons[0]
    assert resolve_canary(ModelRegistry(registry.root / "x"), "ranker", None, {}, Gates()) is None


def test_a_model_is_scored_on_another_vocabulary():
    class Fitted:
        item_ids = ("<pad>", "a", "b", "c")

        def score(self, histories, flags=None):
            self.seen = histories
            return np.tile(np.array([0.0, 1.0, 2.0, 3.0], np.float32), (len(histories), 1))

    class Train:
        item_ids = ("<pad>", "c", "z", "a")

    class Split:
        train = Train()

    fitted = Fitted()
    adapter = OnVocabulary(fitted, Split(), "old")  # type: ignore[arg-type]
    scores = adapter.score([np.array([1, 2, 3])])
    assert fitted.seen[0].tolist() == [3, 1]  # "c" and "a" in its own vocabulary; "z" dropped
    assert scores[0, 1] == 3.0 and scores[0, 3] == 1.0 and scores[0, 2] < -1e8
