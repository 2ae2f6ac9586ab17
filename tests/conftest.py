"""Shared fixtures: real parts only (a redis-server process, local Spark, a temporary
copy of the Feast repository)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from inkling.config import PROJECT_ROOT, Settings, load_settings
from inkling.redis_embedded import EmbeddedRedis

DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"


def dataset(relative: str) -> Path:
    path = DATASETS / relative
    if not path.exists():
        pytest.skip(
            f"shared dataset {path} is absent (expected ../shared/datasets beside the project)"
        )
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from batch.spark import build_session

    session = build_session("local[2]", {"spark.driver.memory": "2g"}, "inkling-tests")
    yield session
    session.stop()


def temp_settings(
    root: Path, online_store: str = "redis", redis_address: str | None = None
) -> Settings:
    """Settings over a fresh data dir and a temporary copy of feature_repo/."""
    repo = root / "feature_repo"
    if not repo.exists():
        shutil.copytree(
            PROJECT_ROOT / "feature_repo",
            repo,
            ignore=shutil.ignore_patterns("__pycache__", "data"),
        )
    return load_settings(
        overrides={
            "data_dir": root / "data",
            "feature_repo": repo,
            "online_store": online_store,
            "redis_address": redis_address,
        },
        environ={},
    )
