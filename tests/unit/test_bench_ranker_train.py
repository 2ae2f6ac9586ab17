"""The ranker's training benchmarks: throughput per loss, and the equal-budget comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.ranker_quality import _table, parse_config, plot_curves
from bench.ranker_train import run_training_benchmark, synthetic_sequences
from inkling.cli import main
from inkling.errors import InvalidInputError
from inkling.models.sasrec import SasRecConfig


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_synthetic_sequences_cover_the_catalogue_with_a_popular_head() -> None:
    seqs = synthetic_sequences(1000, 300, 20.0, seed=1)
    flat = np.concatenate(seqs)
    assert len(seqs) == 300 and min(map(len, seqs)) >= 3
    assert flat.min() >= 1 and flat.max() <= 1000
    counts = np.bincount(flat, minlength=1001)[1:]
    # Zipf-like: the 10 % most popular items take far more than 10 % of the events.
    assert np.sort(counts)[::-1][:100].sum() > 0.3 * len(flat)
    assert np.array_equal(np.concatenate(synthetic_sequences(1000, 300, 20.0, seed=1)), flat)
    with pytest.raises(InvalidInputError, match="at least 100 items"):
        synthetic_sequences(50, 10, 5.0)


def test_training_benchmark_times_every_loss_and_writes_its_report(tmp_path: Path) -> None:
    lines: list[str] = []
    path = run_training_benchmark(
        catalogues=[500], losses=["full", "logq", "gbce", "uniform"], users=60,
        mean_length=12.0, steps=2, warmup=1, threads=1, out=tmp_path,
        config=SasRecConfig(hidden=16, batch_size=8, max_len=10, n_negatives=32), say=lines.append,
    )  # fmt: skip
    report = json.loads((tmp_path / "train-throughput.json").read_text())
    rows = {r["loss"]: r for r in report["rows"]}
    assert set(rows) == {"full", "logq", "gbce", "uniform"}
    for row in rows.values():
        assert row["steps"] == 2 and row["positions_per_s"] > 0
        assert row["s_per_epoch"] == pytest.approx(row["batches_per_epoch"] * row["s_per_step"])
        assert np.isfinite(row["final_loss"])
    assert "gBCE (32 uniform negatives" in rows["gbce"]["described"]
    table = path.read_text()
    assert "| 500 | full softmax |" in table and "× faster than full" in table
    with pytest.raises(InvalidInputError, match="losses are"):
        run_training_benchmark(
            catalogues=[500], losses=["bpr"], users=10, mean_length=5.0, steps=1, warmup=0,
            threads=1, out=tmp_path,
        )  # fmt: skip


def test_bench_ranker_train_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "ranker", "--train", "--catalogues", "300", "--losses", "full,logq"]
    argv += ["--users", "40", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "| 300 | logQ-corrected softmax" in capsys.readouterr().out
    assert (out / "train-throughput.md").is_file()
    assert main([*argv[:4], "3k", "--out", str(out)]) == 2
    assert "--catalogues takes item counts" in capsys.readouterr().err


def test_config_overrides_are_typed_and_checked() -> None:
    name, values = parse_config("new:loss=logq, ffn=swiglu,gated_residual=true,n_negatives=256")
    assert name == "new"
    assert values == {"loss": "logq", "ffn": "swiglu", "gated_residual": True, "n_negatives": 256}
    assert SasRecConfig.parse_overrides("threads=none,lr=0.002") == {"threads": None, "lr": 0.002}
    for bad, message in [
        ("loss=bpr", "loss must be one of"),
        ("n_negatives=many", "n_negatives='many': expected int"),
        ("gated_residual=yes", "expected bool"),
        ("hiden=32", "not field=value"),
        ("hidden", "not field=value"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            SasRecConfig.parse_overrides(bad)
    with pytest.raises(InvalidInputError, match="give it a name"):
        parse_config(":loss=full")


def test_the_comparison_table_and_the_wall_clock_curves(tmp_path: Path) -> None:
    def part(ndcg: float) -> dict[str, dict[str, float]]:
        return {
            "full": {"recall@10": 2 * ndcg, "ndcg@10": ndcg, "mrr": ndcg},
            "sampled": {"hr@10": 0.5, "ndcg@10": 0.3},
        }

    runs = [
        {
            "name": name,
            "loss": loss,
            "epochs": 3,
            "best_epoch": 2,
            "s_per_epoch": 1.5,
            "test": part(ndcg),
            "history": [
                {"elapsed_s": 10.0 * k, "valid_ndcg10": ndcg * k / 3, "valid_recall10": 0.1 * k}
                for k in (1, 2, 3)
            ],
        }
        for name, loss, ndcg in [("today", "full", 0.10), ("new", "logq", 0.12)]
    ]
    table = _table(runs, [{"name": "item_knn", "test": part(0.09)}])
    assert "| today | full | 3 (2) |" in table and "+0.0 %" in table and "+20.0 %" in table
    png = plot_curves(runs, tmp_path / "curves.png", "toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
