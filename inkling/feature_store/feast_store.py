"""Opening the project's Feast repository with the configured online store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from feast import FeatureStore

from inkling.config import Settings
from inkling.errors import ConfigurationError, DependencyUnavailableError, NotFoundError

REGISTRY_FILE = "registry.db"
"""The Feast registry's file name under `Settings.feast_dir` (feature_store.yaml's path)."""

FEATURE_TABLES = (
    "item_features",
    "user_features",
    "session_features",
    "item_covisitation",
    "item_stream_features",
)
"""The Parquet tables under `Settings.features_dir` that the Feast sources read."""


def registry_path(settings: Settings) -> Path:
    return settings.feast_dir / REGISTRY_FILE


def open_store(settings: Settings) -> FeatureStore:
    """A `FeatureStore` over `settings.feature_repo`, its yaml chosen by `online_store`.

    The yaml reads INKLING_DATA_DIR and INKLING_REDIS_ADDRESS; they are exported
    first so Feast, the feature definitions and inkling agree on every path. The
    registry must exist (`inkling apply`): Feast would otherwise start an empty one and
    every feature view would be reported missing instead.
    """
    yaml = settings.feature_store_yaml
    if not yaml.exists():
        raise NotFoundError(
            f"{yaml} does not exist; is {settings.feature_repo} a Feast repository?"
        )
    if settings.online_store == "redis" and not settings.redis_address:
        raise ConfigurationError(
            "the Redis online store needs an address (start one with `inkling redis start`)"
        )
    if settings.online_store == "redis_cluster" and not settings.redis_address:
        raise ConfigurationError(
            "online_store = redis_cluster needs redis_address (INKLING_REDIS_ADDRESS): the "
            "cluster's startup nodes as host:port,host:port,...; inkling never starts a cluster"
        )
    if not registry_path(settings).is_file():
        raise NotFoundError(
            f"no Feast registry at {registry_path(settings)}: run `inkling apply` first "
            f"(it registers the definitions of {settings.feature_repo})"
        )
    settings.export_env()
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(settings.feature_repo), fs_yaml_file=yaml)


def feast_cli(settings: Settings, *args: str, quiet: bool = False) -> str:
    """Run the `feast` command line in the repository, as a feature engineer would."""
    settings.export_env()
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    feast = Path(sys.executable).with_name("feast")
    cmd = [str(feast), "-f", str(settings.feature_store_yaml), *args]
    result = subprocess.run(
        cmd,
        cwd=settings.feature_repo,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigurationError(
            f"`feast {' '.join(args)}` failed:\n{result.stdout}{result.stderr}"
        )
    if not quiet:
        print(result.stdout, end="")
    return result.stdout


def require_feature_tables(settings: Settings) -> None:
    """Refuse, naming the command to run, when the Spark feature tables are not there."""
    missing = [
        name for name in FEATURE_TABLES if not any((settings.features_dir / name).glob("*.parquet"))
    ]
    if missing:
        raise NotFoundError(
            f"no feature tables {', '.join(missing)} under {settings.features_dir}: run "
            "`inkling features` first (it computes them from the event log)"
        )


def require_reachable_redis(address: str, cluster: bool = False) -> None:
    """Refuse, naming the address and what to do, when Redis does not answer a PING
    (`cluster`: when no startup node of the Redis Cluster gives its slot map)."""
    import redis

    from inkling.events.bus import sync_client
    from inkling.feature_store.cluster import sync_cluster_client

    where = address.split(",", 1)[0]  # options may hold a password
    if cluster:
        try:
            sync_cluster_client(address, timeout_s=2.0).close()
        except redis.RedisError as e:
            raise DependencyUnavailableError(
                f"Redis Cluster at {where} cannot be reached ({type(e).__name__}): start it "
                "or list reachable startup nodes in INKLING_REDIS_ADDRESS"
            ) from None
        return
    client = sync_client(address, timeout_s=2.0)
    try:
        client.ping()
    except redis.RedisError as e:
        raise DependencyUnavailableError(
            f"Redis at {where} cannot be reached ({type(e).__name__}): start it, or unset "
            "INKLING_REDIS_ADDRESS and --redis to let inkling start an embedded Redis for "
            'the command (`eval "$(inkling redis start)"` for one that outlives it)'
        ) from None
    finally:
        client.close()
