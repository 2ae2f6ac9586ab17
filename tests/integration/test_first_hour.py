"""What a new user meets first: the stock `feast` commands on a fresh data directory,
and the CLI's errors, each saying what to run next. Real Feast (its own CLI in a
subprocess), a real Redis, local Spark."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

from batch.features import compute_features
from batch.generate import GeneratorConfig, write_synthetic
from inkling.cli import main
from inkling.config import PROJECT_ROOT
from inkling.redis_embedded import free_port
from tests.conftest import temp_settings

DB = 15  # a database of the shared test Redis of its own (dbs 0-14 are taken)
FEAST = str(Path(sys.executable).with_name("feast"))


def _bare_env(**more: str) -> dict[str, str]:
    """This process's environment without inkling's variables: a new shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INKLING_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)  # this checkout's inkling, as installed
    return {**env, **more}


def _inkling_env(*flags: str) -> dict[str, str]:
    """What `eval "$(inkling ... env)"` leaves in a shell."""
    out = subprocess.run(
        [sys.executable, "-m", "inkling.cli", *flags, "env"],
        cwd=PROJECT_ROOT, env=_bare_env(), capture_output=True, text=True, check=True,
        timeout=120,
    )  # fmt: skip
    exported = {}
    for line in out.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        exported[name] = value
    return exported


def _feast(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEAST, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


@pytest.mark.spark
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_stock_feast_apply_materialize_teardown_on_a_fresh_data_directory(
    tmp_path, spark, redis_server
):
    settings = temp_settings(tmp_path)  # a copy of feature_repo/; data/ does not exist yet
    address = f"{redis_server.address},db={DB}"
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    client.flushdb()
    assert not settings.data_dir.exists()
    exported = _inkling_env("--data-dir", str(settings.data_dir), "--redis", address)
    assert exported == {
        "INKLING_DATA_DIR": str(settings.data_dir),
        "INKLING_REDIS_ADDRESS": address,
    }
    write_synthetic(GeneratorConfig(users=40, items=80, sessions=120, days=2, seed=3), settings)
    compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
    shell = _bare_env(**exported)

    applied = _feast(settings.feature_repo, shell, "apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert (settings.feast_dir / "registry.db").is_file()
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    loaded = _feast(settings.feature_repo, shell, "materialize-incremental", now)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert client.dbsize() > 40  # user and item rows at least
    down = _feast(settings.feature_repo, shell, "teardown")
    assert down.returncode == 0, down.stdout + down.stderr
    assert client.dbsize() == 0  # the online rows are gone, and so is the project
    registry = RegistryProto.FromString((settings.feast_dir / "registry.db").read_bytes())
    assert not registry.feature_views and not registry.projects
    assert not any(p.name.startswith("$") for p in settings.feature_repo.rglob("*"))


@pytest.mark.timeout(300)
def test_a_variable_feast_needs_is_named_with_the_command_that_sets_it(tmp_path):
    settings = temp_settings(tmp_path)
    repo = settings.feature_repo
    bare = _feast(repo, _bare_env(), "apply")
    assert bare.returncode != 0
    said = bare.stdout + bare.stderr
    assert 'INKLING_DATA_DIR is not set: run `eval "$(inkling env)"`' in said, said
    assert "INKLING_REDIS_ADDRESS is not set" in said
    assert not any(p.name.startswith("$") for p in repo.rglob("*"))  # no `${...}` folder
    # The data directory alone: the Redis yaml still needs its address...
    data_only = _bare_env(INKLING_DATA_DIR=str(settings.data_dir))
    redis_yaml = _feast(repo, data_only, "apply")
    said = redis_yaml.stdout + redis_yaml.stderr
    assert redis_yaml.returncode != 0
    assert 'INKLING_REDIS_ADDRESS is not set: run `eval "$(inkling redis start)"`' in said, said
    assert "INKLING_DATA_DIR is not set" not in said
    # ...and the SQLite one does not: it applies to a data directory that did not exist.
    sqlite = _feast(repo, data_only, "-f", "feature_store.sqlite.yaml", "apply")
    assert sqlite.returncode == 0, sqlite.stdout + sqlite.stderr
    assert (settings.feast_dir / "registry.db").is_file()


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_each_missing_step_is_named_by_the_command_that_does_it(
    tmp_path, redis_server, capsys, monkeypatch
):
    settings = temp_settings(tmp_path)
    monkeypatch.setenv("INKLING_FEATURE_REPO", str(settings.feature_repo))
    base = ["--data-dir", str(settings.data_dir), "--redis", f"{redis_server.address},db={DB}"]

    said = _error(capsys, [*base, "features"])
    assert "has no events: run `inkling import FILE --format ...`" in said
    assert "or `inkling generate`" in said

    said = _error(capsys, [*base, "materialize"])
    assert f"no Feast registry at {settings.feast_dir / 'registry.db'}" in said
    assert "run `inkling apply` first" in said

    assert main([*base, "apply"]) == 0
    capsys.readouterr()
    for command in ("materialize", "training-set"):
        said = _error(capsys, [*base, command])
        assert "no feature tables item_features, user_features" in said, said
        assert "run `inkling features` first" in said

    said = _error(capsys, [*base, "bench", "ranker"])
    assert "model ranker has no current version" in said
    assert "run `inkling train --model ranker`" in said


@pytest.mark.timeout(120)
def test_a_redis_that_cannot_be_reached_is_named_with_how_to_start_one(tmp_path, capsys):
    settings = temp_settings(tmp_path)
    nobody = f"127.0.0.1:{free_port()}"
    for command in (["materialize"], ["serve", "ranking", "--port", "0"]):
        argv = ["--data-dir", str(settings.data_dir), "--redis", f"{nobody},password=secret"]
        said = _error(capsys, [*argv, *command])
        assert f"Redis at {nobody} cannot be reached" in said, said
        assert "inkling redis start" in said and "embedded" in said
        assert "secret" not in said


def test_a_registry_without_current_names_the_training_command(tmp_path):
    from inkling.errors import NotFoundError
    from inkling.models.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry")
    for model in ("ranker", "retrieval"):
        with pytest.raises(NotFoundError, match=rf"run `inkling train --model {model}`"):
            registry.current(model)
