"""Typed settings of the event-ingest process, loaded once at its entrypoint.

Precedence, as for the other servers (``inkling.serving.settings``): flags >
environment (``INKLING_EVENTS_<FIELD>``, e.g. ``INKLING_EVENTS_PARTITIONS=8``) > the
``[events]`` table of the TOML config file (``INKLING_CONFIG`` / ``--config``) >
defaults. Which Redis holds the bus is the main settings' ``redis_address``
(``inkling.config.Settings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inkling.errors import ConfigurationError
from inkling.events.bus import DEFAULT_DEDUPE_WINDOW_S, DEFAULT_LAG_CACHE_S
from inkling.serving.settings import load_server_settings

SECTION = "events"


@dataclass(frozen=True)
class EventsSettings:
    """The event-ingest server (EventService.TrackEvents)."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default."""
    port: int = 50063
    """Port; 0 picks a free one."""
    workers: int = 1
    """Processes sharing the port (SO_REUSEPORT); 0 = one per core. Appends are atomic in
    Redis, so any number of ingest processes may write the same bus."""
    grace_s: float = 10.0
    """How long SIGTERM waits for in-flight calls."""
    partitions: int = 4
    """Streams the bus is split into (by a hash of the user id, else the session id).
    Producers and stream workers must agree: the bus records the number, and a process
    configured with another one is refused (FAILED_PRECONDITION on TrackEvents, an
    error at start). Change it only with the bus drained (see `inkling.events.bus`)."""
    dedupe_window_s: int = DEFAULT_DEDUPE_WINDOW_S
    """How long an event_id is remembered after its first append (default one hour): a
    replay within it is acknowledged as a duplicate and not stored again. Redis memory is
    about events/s x window x 125 bytes (2.2 GB for an hour at 5,000/s; `inkling.events.bus`);
    size the window to how late clients retry."""
    max_lag: int = 100_000
    """Backpressure: when a partition a batch goes to holds more unconsumed entries than
    this (not yet delivered to the stream workers' group, or not yet acknowledged), the
    batch is refused with RESOURCE_EXHAUSTED."""
    retry_after_s: float = 1.0
    """The retry hint sent with RESOURCE_EXHAUSTED (trailing metadata `retry-after-ms`)."""
    max_future_s: float = 300.0
    """Events stamped more than this ahead of the server's clock are rejected."""
    lag_cache_s: float = DEFAULT_LAG_CACHE_S
    """How long one lag measurement is reused (it costs one Redis round trip)."""
    redis_timeout_s: float = 2.0
    """Socket timeout of the bus connection; a slower Redis answers UNAVAILABLE."""
    wait_replicas: int = 0
    """On a Redis Cluster (`online_store = redis_cluster`): acknowledge a batch only once
    this many replicas of each partition's master have it (`WAIT` after the append;
    UNAVAILABLE when they do not confirm within `wait_timeout_ms`, and the client's retry
    is deduplicated). 0: acknowledge once the master has it; a master that dies before
    replicating can then lose acknowledged events (README, "Redis Cluster")."""
    wait_timeout_ms: int = 1_000
    """How long an append waits for `wait_replicas` confirmations."""

    def __post_init__(self) -> None:
        for name in ("partitions", "max_lag", "dedupe_window_s"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("wait_replicas", "wait_timeout_ms"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be at least 0, got {getattr(self, name)}")


def load_events_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> EventsSettings:
    """Build the ingest settings from the `[events]` table, the environment and flags."""
    return load_server_settings(EventsSettings, SECTION, config_file, overrides, environ)
