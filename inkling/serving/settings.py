"""Typed settings of the server processes, loaded once at each entrypoint.

Precedence, as for the batch settings: flags > environment > the `[retrieval]` or
`[ranking]` table of the TOML config file (`INKLING_CONFIG` / `--config`) > defaults.
Environment variables are `INKLING_<SECTION>_<FIELD>`, e.g.
`INKLING_RANKING_RETRIEVAL_ADDRESS=127.0.0.1:50061`; a mapping field takes
`key=value,key=value`.

Every field is documented beside its default below; `inkling serve <role> --help`
lists the flags.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from inkling.errors import ConfigurationError
from inkling.exploration import PolicySpec

SECTIONS = ("retrieval", "ranking")


@dataclass(frozen=True)
class RetrievalSettings:
    """The L1 retrieval server."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default."""
    port: int = 50061
    """Port; 0 picks a free one."""
    workers: int = 1
    """Processes sharing the port (SO_REUSEPORT); 0 = one per core."""
    grace_s: float = 10.0
    """How long SIGTERM waits for in-flight calls."""
    feature_service: str = "retrieval_v1"
    """The Feast feature service whose columns retrieval reads."""
    embeddings_dir: Path | None = None
    """ALS embeddings (`inkling/models/embeddings.py`); default <data_dir>/models/als."""
    index_dir: Path | None = None
    """The FAISS index (batch/build_index.py); default <data_dir>/models/index."""
    model: str = "retrieval"
    """The registry model whose CURRENT two-tower version answers the ANN source (its
    query tower and its own index); the ALS embeddings and index above while it has
    none. An empty name always uses ALS."""
    registry_dir: Path | None = None
    """The model registry; default <data_dir>/registry."""
    model_poll_s: float = 5.0
    """How often CURRENT is checked; a new version is loaded, warmed and swapped in."""
    ann_candidates: int = 500
    """Nearest neighbours fetched per request (before filters)."""
    covisit_candidates: int = 200
    """Co-visited items fetched per request (before filters)."""
    session_items: int = 5
    """How many of the session's most recent items seed co-visitation and the session query."""
    snapshot_refresh_s: float = 30.0
    """How often the in-process item snapshot is rebuilt from the online store."""
    enforce_ttl: bool = True
    """Read rows older than their feature view's TTL as missing, as Feast does. False
    serves a historical data set (an imported log from years ago) as if it were current."""
    default_deadline_ms: float = 100.0
    """Budget of a call whose caller set no deadline."""


@dataclass(frozen=True)
class RankingSettings:
    """The L2 ranking server (RankCandidates and Recommend)."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default."""
    port: int = 50062
    """Port; 0 picks a free one."""
    workers: int = 1
    """Processes sharing the port (SO_REUSEPORT); 0 = one per core."""
    grace_s: float = 10.0
    """How long SIGTERM waits for in-flight calls."""
    feature_service: str = "ranker_v1"
    """The Feast feature service the ranker reads."""
    model: str = "ranker"
    """The registry model whose CURRENT version scores; the baseline scorer while it has
    none. An empty name always uses the baseline."""
    registry_dir: Path | None = None
    """The model registry; default <data_dir>/registry."""
    model_poll_s: float = 5.0
    """How often CURRENT is checked; a new version is loaded, warmed and swapped in."""
    candidate_version: str = ""
    """An experiment: a registry version of `model` that scores `candidate_share` of traffic."""
    candidate_share: float = 0.0
    """The share of users (by a hash of the user id, else the session id) the candidate serves."""
    experiment: str = "ranker-candidate"
    """The experiment's name while a candidate serves a share: in every serve record, and
    what `inkling experiment report` is given."""
    experiment_salt: str = ""
    """Mixed into the user id before hashing (default: the experiment's name), so that a
    new experiment splits users independently of the last one."""
    serve_log: bool = True
    """Record every answer (request id, items with position, score, source and propensity,
    versions, experiment arm) in the serve log, through the event bus on the Redis of
    `redis_address`, off the request path (`inkling.serving.serve_logger`). Needs the redis
    online store; with sqlite nothing is recorded (said at start)."""
    serve_log_queue: int = 10_000
    """Answers waiting for the bus at most; more are dropped and counted
    (`inkling.serve_log.dropped`), never failing a request."""
    serve_log_batch: int = 64
    """The most answers one bus append carries."""
    serve_log_linger_ms: float = 50.0
    """How long the writer waits after an answer for more to append together (the records
    reach the bus this much later; the server spends less CPU per answer)."""
    bus_partitions: int = 4
    """The bus's partitions, used only while the bus has not recorded its number (the
    recorded number wins); must equal `[events] partitions`."""
    retrieval_address: str = "127.0.0.1:50061"
    """Where Recommend finds the retrieval server."""
    retrieve_candidates: int = 1000
    """Candidates Recommend asks retrieval for."""
    retrieval_budget_ms: float = 40.0
    """The most Recommend waits for retrieval before serving popularity instead."""
    scorer_budget_ms: float = 20.0
    """The most the scorer may take before candidates keep their retrieval order."""
    default_deadline_ms: float = 100.0
    """Budget of a call whose caller set no deadline."""
    max_per_category: int = 3
    """Diversity: at most this many items of one category in the first `diversity_window`."""
    diversity_window: int = 20
    """How many top positions the diversity rule governs."""
    category_boosts: dict[str, float] = field(default_factory=dict)
    """Business boosts: score multipliers by category, e.g. {"c01": 1.2}."""
    snapshot_refresh_s: float = 30.0
    """How often the in-process item snapshot is rebuilt from the online store."""
    enforce_ttl: bool = True
    """Read rows older than their feature view's TTL as missing, as Feast does. False
    serves a historical data set (an imported log from years ago) as if it were current."""
    policies: dict[str, str] = field(default_factory=dict)
    """The ranking policy per request surface (`inkling.exploration`), e.g. in TOML
    `policies = {home = "plackett_luce(temperature=0.5,pool=50)", "*" = "greedy"}`;
    "*" is every surface not named; unnamed surfaces are greedy without it."""
    bandit_alpha: float = 1.0
    """The bandit's confidence-bonus weight (`inkling.bandit`)."""
    bandit_item_bonus: float = 0.2
    """The weight of the bandit's per-item exposure bonus (`inkling.bandit.ITEM_BONUS`)."""
    bandit_refresh_s: float = 1.0
    """How often a ranker reads the bandit's parameters from Redis."""
    bandit_max_staleness_s: float = 30.0
    """Parameters older than this are not served: the surface ranks greedily until a read
    succeeds again."""


S = TypeVar("S")


def _convert(name: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None or value == "":
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin is dict:
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("expected key=value,key=value")
                value = {k.strip(): v.strip() for k, v in pairs}
            return {str(k): args[1](v) for k, v in dict(value).items()}
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("expected true or false")
            return value.lower() in ("1", "true", "yes")
        if kind is Path:
            return Path(value).expanduser().resolve()
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigurationError(f"setting {name}: cannot read {value!r} as {kind}: {e}") from e


def load_server_settings(
    cls: type[S],
    section: str,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build one process's settings from its TOML table, the environment and flags."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env["INKLING_CONFIG"]) if env.get("INKLING_CONFIG") else None)
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text()).get(section, {})
        except FileNotFoundError as e:
            raise ConfigurationError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"config file {path} is not valid TOML: {e}") from e
        values.update(table)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for name in names:
        var = f"INKLING_{section.upper()}_{name.upper()}"
        if env.get(var):
            values[name] = env[var]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigurationError(f"unknown [{section}] settings: {', '.join(unknown)}")
    converted = {name: _convert(name, hints[name], value) for name, value in values.items()}
    settings = cls(**converted)
    _check(settings)
    return settings


def _check(settings: Any) -> None:
    for name in ("workers", "port"):  # absent from a stream worker's settings
        if getattr(settings, name, 0) < 0:
            raise ConfigurationError(f"{name} must not be negative")
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "policies":
            for surface, name in value.items():
                try:
                    PolicySpec.parse(name)
                except ValueError as e:
                    raise ConfigurationError(f"policies[{surface!r}]: {e}") from None
        if f.name == "candidate_share" and not 0.0 <= value <= 1.0:
            raise ConfigurationError(f"candidate_share must be within [0, 1], got {value}")
        if f.name.endswith(("_ms", "_s")) and value <= 0:
            raise ConfigurationError(f"{f.name} must be positive, got {value}")
        if f.name.endswith(("_candidates", "_items", "per_category", "_window")) and value < 1:
            raise ConfigurationError(f"{f.name} must be at least 1, got {value}")
