"""`inkling bench materialize` on a small catalogue: its synthetic table must match
the live `item_features` view, and both loaders must leave the same online values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.materialization import run_materialize_benchmark
from tests.conftest import temp_settings

pytestmark = [pytest.mark.redis]


def test_stock_and_bulk_materialization_agree(tmp_path: Path) -> None:
    settings = temp_settings(tmp_path)
    report = run_materialize_benchmark(settings, items=120, days=2, out=tmp_path / "r.json")
    assert report["load"] == {
        "entities": 120,
        "rows": 240,
        "features": 11,
        "view": "item_features",
    }
    assert report["identical_online_values"] is True
    assert report["checked_keys"] == 120
    assert (tmp_path / "r.json").exists()


def test_the_cluster_run_loads_the_same_values_into_a_local_cluster(tmp_path: Path) -> None:
    settings = temp_settings(tmp_path)
    report = run_materialize_benchmark(
        settings, items=120, days=2, out=tmp_path / "r.json", cluster=True
    )
    results = report["results"]
    assert isinstance(results, dict)
    assert results["bulk_cluster"]["masters"] == 3
    assert results["bulk_cluster"]["entities_per_s"] > 0
    assert report["identical_online_values_cluster"] is True
