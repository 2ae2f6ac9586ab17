"""Typed settings for the batch side, loaded once at the entrypoint.

Precedence: explicit flags (the CLI passes them as overrides) > environment
variables > an optional TOML file (``INKLING_CONFIG`` or ``--config``) > defaults.

| field            | environment             | default                        |
| ---------------- | ----------------------- | ------------------------------ |
| `data_dir`       | `INKLING_DATA_DIR`      | `./data` (under the project)   |
| `feature_repo`   | `INKLING_FEATURE_REPO`  | `./feature_repo`               |
| `online_store`   | `INKLING_ONLINE_STORE`  | `redis` (or `redis_cluster`, `sqlite`) |
| `redis_address`  | `INKLING_REDIS_ADDRESS` | unset: start an embedded Redis |
| `spark_master`   | `INKLING_SPARK_MASTER`  | `local[*]`                     |
| `spark_conf`     | `INKLING_SPARK_CONF`    | none (`k=v,k=v`)               |

The Feast repository's `feature_store.yaml` reads `INKLING_DATA_DIR` and
`INKLING_REDIS_ADDRESS` from the environment; `Settings.export_env` sets them so
Feast and inkling agree, and `inkling env` prints them for a shell.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from inkling.errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ONLINE_STORES = ("redis", "redis_cluster", "sqlite")
FEATURE_STORE_YAML = {
    "redis": "feature_store.yaml",
    "redis_cluster": "feature_store.redis_cluster.yaml",
    "sqlite": "feature_store.sqlite.yaml",
}

_ENV = {
    "data_dir": "INKLING_DATA_DIR",
    "feature_repo": "INKLING_FEATURE_REPO",
    "online_store": "INKLING_ONLINE_STORE",
    "redis_address": "INKLING_REDIS_ADDRESS",
    "spark_master": "INKLING_SPARK_MASTER",
    "spark_conf": "INKLING_SPARK_CONF",
}


@dataclass(frozen=True)
class Settings:
    """Where data lives and which online store, Redis and Spark to use."""

    data_dir: Path = PROJECT_ROOT / "data"
    """Root of everything inkling writes: event log, features, Feast registry, Redis data."""
    feature_repo: Path = PROJECT_ROOT / "feature_repo"
    """The Feast repository (feature_store.yaml and the definitions)."""
    online_store: str = "redis"
    """`redis` (one Redis server: what the servers use), `redis_cluster` (a Redis Cluster) or
    `sqlite` (Feast's local default, for quick experiments)."""
    redis_address: str | None = None
    """`host:port[,options]` of a running Redis; for a cluster, its startup nodes
    `host:port,host:port,...[,options]`. None starts an embedded Redis (never a cluster)."""
    spark_master: str = "local[*]"
    """Spark master URL: `local[*]`, `spark://host:7077`, `yarn`, ..."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark properties, e.g. `spark.executor.memory`."""

    def __post_init__(self) -> None:
        if self.online_store not in ONLINE_STORES:
            raise ConfigurationError(
                f"online_store must be one of {', '.join(ONLINE_STORES)}, got {self.online_store!r}"
            )

    @property
    def uses_redis(self) -> bool:
        """Whether the online store is Redis, one server or a cluster."""
        return self.online_store in ("redis", "redis_cluster")

    # Derived locations; one place names them all.
    @property
    def events_dir(self) -> Path:
        return self.data_dir / "events"

    @property
    def serves_dir(self) -> Path:
        """The serve log (`inkling.events.servelog`), beside the event log."""
        return self.data_dir / "serves"

    @property
    def impressions_dir(self) -> Path:
        """Labelled impressions: the serve log joined with outcomes (`inkling attribute`)."""
        return self.data_dir / "impressions"

    @property
    def catalog_dir(self) -> Path:
        return self.data_dir / "catalog"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"

    @property
    def feast_dir(self) -> Path:
        return self.data_dir / "feast"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def training_dir(self) -> Path:
        return self.data_dir / "training"

    @property
    def privacy_ledger(self) -> Path:
        """Every differentially private release and its (ε, δ) (`inkling.privacy.ledger`)."""
        return self.data_dir / "privacy" / "ledger.jsonl"

    @property
    def feature_store_yaml(self) -> Path:
        return self.feature_repo / FEATURE_STORE_YAML[self.online_store]

    def with_redis(self, address: str) -> Settings:
        return replace(self, redis_address=address)

    def export_env(self) -> None:
        """Put the values Feast's feature_store.yaml reads into this process's environment."""
        os.environ[_ENV["data_dir"]] = str(self.data_dir)
        if self.redis_address:
            os.environ[_ENV["redis_address"]] = self.redis_address
        else:
            os.environ.pop(_ENV["redis_address"], None)

    def env_lines(self) -> list[str]:
        lines = [f"export {_ENV['data_dir']}={self.data_dir}"]
        if self.redis_address:
            lines.append(f"export {_ENV['redis_address']}={self.redis_address}")
        return lines


def _parse_conf(text: str) -> dict[str, str]:
    conf = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"spark_conf entry {part!r} is not key=value")
        conf[key.strip()] = value.strip()
    return conf


PROCESS_TABLES = ("retrieval", "ranking", "events", "worker", "telemetry", "security", "privacy")
"""Tables of the settings file that belong to one process or concern: read by
`inkling.serving.settings.load_server_settings` (`[security]` too),
`inkling.telemetry.settings` and `inkling.privacy.settings`."""


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a TOML file, the environment and explicit overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env["INKLING_CONFIG"]) if env.get("INKLING_CONFIG") else None)
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError as e:
            raise ConfigurationError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"config file {path} is not valid TOML: {e}") from e
    for name, var in _ENV.items():
        if env.get(var):
            values[name] = env[var]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    known = {f.name for f in fields(Settings)}
    for table in PROCESS_TABLES:  # each is read by its own loader, not here
        values.pop(table, None)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigurationError(f"unknown settings: {', '.join(unknown)}")
    for name in ("data_dir", "feature_repo"):
        if name in values:
            values[name] = Path(values[name]).expanduser().resolve()
    if isinstance(values.get("spark_conf"), str):
        values["spark_conf"] = _parse_conf(values["spark_conf"])
    return Settings(**values)
