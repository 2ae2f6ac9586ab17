"""Opening the project's Feast repository with the configured online store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from feast import FeatureStore

from inkling.config import Settings
from inkling.errors import ConfigurationError, NotFoundError


def open_store(settings: Settings) -> FeatureStore:
    """A `FeatureStore` over `settings.feature_repo`, its yaml chosen by `online_store`.

    The yaml reads INKLING_DATA_DIR and INKLING_REDIS_ADDRESS; they are exported
    first so Feast, the feature definitions and inkling agree on every path.
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
