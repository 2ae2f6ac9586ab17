"""The path a user takes with their own file, through the CLI only: import a SASRec-style
`user item` file → features → apply → train → evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inkling.cli import main
from inkling.models.registry import ModelRegistry
from tests.conftest import temp_settings

pytestmark = pytest.mark.spark


def write_sasrec_file(path: Path, users: int = 120, length: int = 12, seed: int = 0) -> Path:
    """`user item` lines, each user's in time order: walks along one of four item
    cycles of 15, so the next item is predictable from the last and no user sees an
    item twice (held-out targets are never in their history)."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        cycle = int(rng.integers(0, 4))
        step = int(rng.integers(0, 15))
        for _ in range(length):
            lines.append(f"{user} {cycle * 15 + step % 15 + 1}")
            step += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_features_apply_train_evaluate(tmp_path, redis_server, spark, monkeypatch, capsys):
    settings = temp_settings(tmp_path)
    monkeypatch.setenv("INKLING_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("INKLING_FEATURE_REPO", str(settings.feature_repo))
    monkeypatch.setenv("INKLING_REDIS_ADDRESS", redis_server.address)
    source = write_sasrec_file(tmp_path / "mine.txt")

    assert main(["import", str(source), "--format", "sasrec"]) == 0
    assert main(["features"]) == 0
    assert main(["apply"]) == 0
    capsys.readouterr()

    # The loss and a layer choice from the command line, recorded in the manifest.
    assert main(["train", "--seconds", "3", "--loss", "logq", "--set", "ffn=swiglu"]) == 0
    printed = capsys.readouterr()
    for row in ("most_popular", "item_knn", "als", "| sasrec |", "sasrec_history_only"):
        assert row in printed.out, printed.out
    assert "epoch" in printed.err and "stopped" in printed.err  # progress and early stop
    manifest, version_dir = ModelRegistry(settings.data_dir / "registry").current("ranker")
    assert manifest.feature_service == "ranker_v1" and manifest.metrics["test"]["full"]
    assert manifest.training["loss"] == "logq" and manifest.training["config"]["ffn"] == "swiglu"
    assert manifest.training["epochs"] >= 1 and manifest.training["positions_per_s"] > 0
    capsys.readouterr()
    assert main(["train", "--seconds", "3", "--loss", "bpr"]) == 2
    assert "loss must be one of" in capsys.readouterr().err
    assert (version_dir / "model.onnx").is_file() and (version_dir / "training.png").is_file()

    out = tmp_path / "report"
    argv = ["evaluate", "--models", "most_popular,sasrec", "--sasrec-seconds", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| sasrec |" in printed.out and "sasrec_history_only" in printed.out
    report = json.loads((out / "evaluation.json").read_text())
    rows = {r["model"]: r for r in report["results"]}
    assert set(rows) == {"most_popular", "sasrec", "sasrec_history_only"}
    # The cycles are learnable: the ranker is far above popularity on the held-out items.
    recall = {name: r["test"]["full"]["recall@10"] for name, r in rows.items()}
    assert recall["sasrec"] > recall["most_popular"] + 0.15, recall
    assert (out / "evaluation.md").read_text().count("sasrec") >= 2
    assert (out / "sasrec-training.png").read_bytes()[:4] == b"\x89PNG"

    # A file that is not what it claims is refused with the reason, and nothing is imported.
    bad = tmp_path / "bad.txt"
    bad.write_text("only-one-column\n")
    assert (
        main(["--data-dir", str(tmp_path / "other"), "import", str(bad), "--format", "sasrec"]) == 2
    )
    printed = capsys.readouterr()
    assert "nothing was imported" in printed.err and "bad.txt" in printed.err
    assert "expected 2 fields, found 1 (lines 1)" in printed.out
