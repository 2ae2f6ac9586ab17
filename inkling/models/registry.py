"""The model registry: versioned artifacts on disk and a `current` pointer per model.

Layout under the registry root (`<data_dir>/registry` by default)::

    <model>/
      <version>/            one published artifact, never changed after publishing
        manifest.json       what it is (see `Manifest`)
        ...                 the model's own files
      CURRENT               the version servers load; replaced atomically (rename)
      CANARY                a candidate serving a small share of users through an
                            experiment (JSON: version, share, experiment); absent
                            when none runs
      decisions.jsonl       every promotion, canary and rollback with its reasons
                            (`inkling retrain`), one JSON object per line
      erasures.jsonl        one line per user forgotten (`inkling forget`): when, and
                            the versions published before it, which still hold what
                            they learned from that user until a retrain replaces them

A manifest names the Feast feature service the model was trained on and that
service's columns and types at training time. `check_feature_service` compares them
with the live registry: a server refuses to start a model whose service is missing
or whose columns or types changed, naming the difference, instead of serving scores
computed from features it never saw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feast import FeatureStore

from inkling.errors import ConfigurationError, InvalidInputError, NotFoundError
from inkling.feature_store.columns import ServiceColumns, resolve_service

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
CANARY = "CANARY"
TRAIN_COMMAND = {
    "ranker": "run `inkling train --model ranker` to train and publish one",
    "retrieval": "run `inkling train --model retrieval` to train and publish one",
}
"""What publishes a CURRENT version of each model the servers load."""
DECISIONS = "decisions.jsonl"
ERASURES = "erasures.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Manifest:
    """What a published model version is and what it was trained on."""

    model: str
    version: str
    kind: str
    """e.g. "als", "sasrec", "two-tower"."""
    feature_service: str
    columns: dict[str, str]
    """`view:feature` → Feast value type name, as resolved when the model was trained."""
    training_data: dict[str, Any] = field(default_factory=dict)
    """The data range and counts the model saw (start, end, rows, ...)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    """How it was trained: for the ranker its loss, settings, epochs and throughput."""
    created_at: str = ""
    files: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise InvalidInputError(f"{where} is not a valid model manifest: {e}") from e


def service_columns(columns: ServiceColumns) -> dict[str, str]:
    """A resolved feature service as the manifest records it."""
    return {
        f"{view.name}:{feature.name}": feature.value_type.name
        for view in columns.views
        for feature in view.features
    }


def check_feature_service(manifest: Manifest, live: ServiceColumns | None) -> None:
    """Raise ConfigurationError when the live service differs from the one trained on."""
    if live is None:
        raise ConfigurationError(
            f"model {manifest.model} {manifest.version} was trained on feature service "
            f"{manifest.feature_service}, which the Feast registry does not have"
        )
    now = service_columns(live)
    missing = sorted(set(manifest.columns) - set(now))
    added = sorted(set(now) - set(manifest.columns))
    retyped = sorted(
        f"{name} ({manifest.columns[name]} -> {now[name]})"
        for name in set(manifest.columns) & set(now)
        if manifest.columns[name] != now[name]
    )
    problems = [
        f"missing now: {', '.join(missing)}" if missing else "",
        f"added since training: {', '.join(added)}" if added else "",
        f"type changed: {', '.join(retyped)}" if retyped else "",
    ]
    found = [p for p in problems if p]
    if found:
        raise ConfigurationError(
            f"model {manifest.model} {manifest.version} does not match feature service "
            f"{manifest.feature_service} in the Feast registry: {'; '.join(found)}"
        )


def check_against_store(manifest: Manifest, store: FeatureStore) -> None:
    """`check_feature_service` against the live Feast registry of `store`."""
    try:
        live = resolve_service(store, manifest.feature_service)
    except ConfigurationError:
        live = None
    check_feature_service(manifest, live)


def check_servable(
    manifest: Manifest, store: FeatureStore, feature_service: str, kind: str
) -> None:
    """What a server checks before it loads a version: the manifest's service against the
    live Feast registry (`check_against_store`), and that it is the service this server
    reads and a model kind it serves. Raises ConfigurationError naming the difference."""
    check_against_store(manifest, store)
    where = f"model {manifest.model} {manifest.version}"
    if manifest.feature_service != feature_service:
        raise ConfigurationError(
            f"{where} was trained on {manifest.feature_service}, "
            f"but this server reads {feature_service}"
        )
    if manifest.kind != kind:
        raise ConfigurationError(
            f"{where} is of kind {manifest.kind!r}; this server serves {kind!r} models"
        )


@dataclass(frozen=True)
class Canary:
    version: str
    share: float
    experiment: str


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise InvalidInputError(
            f"{kind} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'"
        )
    return value


def new_version(now: datetime | None = None) -> str:
    """A sortable version name: UTC time to the microsecond."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")


class ModelRegistry:
    """Publishes artifact directories as immutable versions and moves `CURRENT`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _model_dir(self, model: str) -> Path:
        return self.root / _check_name("model name", model)

    def path(self, model: str, version: str) -> Path:
        return self._model_dir(model) / _check_name("version", version)

    def publish(
        self,
        artifact_dir: Path,
        *,
        model: str,
        kind: str,
        feature_service: str,
        columns: Mapping[str, str],
        training_data: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
        version: str | None = None,
        make_current: bool = False,
    ) -> Manifest:
        """Copy `artifact_dir` in as a new version with its manifest; optionally make it current."""
        source = Path(artifact_dir)
        if not source.is_dir():
            raise NotFoundError(f"artifact directory {source} does not exist")
        version = version or new_version()
        target = self.path(model, version)
        if target.exists():
            raise InvalidInputError(f"model {model} already has a version {version}")
        files = sorted(
            str(p.relative_to(source))
            for p in source.rglob("*")
            if p.is_file() and p.name != MANIFEST
        )
        manifest = Manifest(
            model=model,
            version=version,
            kind=kind,
            feature_service=feature_service,
            columns=dict(columns),
            training_data=dict(training_data or {}),
            metrics=dict(metrics or {}),
            training=dict(training or {}),
            created_at=datetime.now(UTC).isoformat(),
            files=files,
        )
        staging = target.with_name(f".{version}.{uuid.uuid4().hex}")
        try:
            shutil.copytree(source, staging)
            (staging / MANIFEST).write_text(manifest.to_json())
            staging.rename(target)  # a version appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if make_current:
            self.set_current(model, version)
        return manifest

    def versions(self, model: str) -> list[str]:
        directory = self._model_dir(model)
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if (p / MANIFEST).is_file())

    def manifest(self, model: str, version: str) -> Manifest:
        path = self.path(model, version) / MANIFEST
        if not path.is_file():
            raise NotFoundError(f"model {model} has no version {version} ({path})")
        return Manifest.from_json(path.read_text(), path)

    def set_current(self, model: str, version: str) -> None:
        """Point CURRENT at `version`; readers see the old or the new pointer, never half."""
        self.manifest(model, version)  # refuse a pointer to nothing
        pointer = self._model_dir(model) / CURRENT
        tmp = pointer.with_name(f".{CURRENT}.{uuid.uuid4().hex}")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)

    def current_version(self, model: str) -> str:
        pointer = self._model_dir(model) / CURRENT
        if not pointer.is_file():
            how = TRAIN_COMMAND.get(model, "publish one with `ModelRegistry.set_current`")
            raise NotFoundError(f"model {model} has no current version (no {pointer}): {how}")
        return pointer.read_text().strip()

    def served_version(self, model: str) -> str | None:
        """What a server should load for `model`: its CURRENT version, or None when the
        name is empty (the server is configured without one) or nothing is published."""
        if not model:
            return None
        try:
            return self.current_version(model)
        except NotFoundError:
            return None

    def set_canary(self, model: str, version: str, share: float, experiment: str) -> Canary:
        """Serve `version` to `share` of the users as the arm "candidate" of `experiment`
        (the ranking servers pick it up as they pick up CURRENT)."""
        self.manifest(model, version)
        if not 0 < share < 1:
            raise InvalidInputError(f"a canary's share must be in (0, 1), got {share}")
        canary = Canary(version, share, _check_name("experiment", experiment))
        pointer = self._model_dir(model) / CANARY
        tmp = pointer.with_name(f".{CANARY}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(asdict(canary)) + "\n")
        os.replace(tmp, pointer)
        return canary

    def canary(self, model: str) -> Canary | None:
        """The canary running for `model`, if any."""
        pointer = self._model_dir(model) / CANARY
        try:
            data = json.loads(pointer.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ConfigurationError(f"{pointer} is not a canary record: {e}") from e
        return Canary(str(data["version"]), float(data["share"]), str(data["experiment"]))

    def end_canary(self, model: str) -> None:
        (self._model_dir(model) / CANARY).unlink(missing_ok=True)

    def log_decision(self, model: str, decision: Mapping[str, Any]) -> dict[str, Any]:
        """Append one decision (with the time) to the model's decision log."""
        record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **decision}
        path = self._model_dir(model) / DECISIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())
        return record

    def decisions(self, model: str) -> list[dict[str, Any]]:
        path = self._model_dir(model) / DECISIONS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def models(self) -> list[str]:
        """The models with at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def record_erasure(self, at: datetime) -> list[str]:
        """Flag every version published before `at` as trained on a since-forgotten user;
        the flagged versions as ``model@version``. No user id is written."""
        flagged = []
        for model in self.models():
            before = [
                v
                for v in self.versions(model)
                if datetime.fromisoformat(self.manifest(model, v).created_at or at.isoformat()) < at
            ]
            if not before:
                continue
            path = self._model_dir(model) / ERASURES
            with path.open("a") as out:
                out.write(json.dumps({"at": at.isoformat(), "versions": before}) + "\n")
                out.flush()
                os.fsync(out.fileno())
            flagged += [f"{model}@{v}" for v in before]
        return flagged

    def erasures(self, model: str, version: str) -> int:
        """How many forgotten users `version` was trained with (0: none, or retrained)."""
        path = self._model_dir(model) / ERASURES
        if not path.is_file():
            return 0
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return sum(version in r.get("versions", ()) for r in records)

    def current(self, model: str) -> tuple[Manifest, Path]:
        version = self.current_version(model)
        return self.manifest(model, version), self.path(model, version)
