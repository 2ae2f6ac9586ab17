"""The registry store `feature_repo/*.yaml` name: Feast's file registry store, checked.

Feast builds its registry store first in every command (`feast apply`,
`materialize-incremental`, `teardown`, ...) and in every `FeatureStore`, so this is
where the repository's environment is checked before anything else happens:

- a `${VARIABLE}` the yaml reads but the shell has not set (Feast leaves it as text and
  would make a folder of that name) is reported by name with the command that sets
  it; the Redis variant also requires `INKLING_REDIS_ADDRESS`, which the Redis online
  store reads;
- the registry's folder is created with its parents when the registry is first
  written, so a fresh data directory works (Feast's store creates one level only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from feast.infra.registry.file import FileRegistryStore

from inkling.errors import ConfigurationError

HOW_TO_SET = {
    "INKLING_DATA_DIR": 'run `eval "$(inkling env)"` in this shell (from the project root; '
    "`inkling --data-dir DIR env` for another data directory)",
    "INKLING_REDIS_ADDRESS": 'run `eval "$(inkling redis start)"` for an embedded Redis, or '
    "`export INKLING_REDIS_ADDRESS=host:port` for yours; or use SQLite: "
    "`feast -f feature_store.sqlite.yaml ...`",
}
"""What sets each variable the repository's yaml files read."""

_UNEXPANDED = re.compile(r"\$\{(\w+)\}")


def missing_variables_message(names: list[str]) -> str:
    """One sentence per unset variable: its name and the command that sets it."""
    return " ".join(
        f"{name} is not set: {HOW_TO_SET.get(name, f'export {name}')}." for name in names
    )


class RepoRegistryStore(FileRegistryStore):
    """Feast's file registry store that names unset variables and creates its folder."""

    required: tuple[str, ...] = ()
    """Variables the repository needs besides those in the registry path."""

    def __init__(self, registry_config: Any, repo_path: Path) -> None:
        unexpanded = _UNEXPANDED.findall(str(registry_config.path))
        missing = [*unexpanded, *(v for v in self.required if not os.environ.get(v))]
        if missing:
            raise ConfigurationError(
                "the Feast repository reads environment variables that are not set. "
                + missing_variables_message(list(dict.fromkeys(missing)))
            )
        super().__init__(registry_config, repo_path)

    def _write_registry(self, registry_proto: Any) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        super()._write_registry(registry_proto)


class RedisRepoRegistryStore(RepoRegistryStore):
    """For `feature_store.yaml`, whose online store is Redis at `INKLING_REDIS_ADDRESS`."""

    required = ("INKLING_REDIS_ADDRESS",)
