"""Typed settings of a stream worker process, loaded once at its entrypoint.

Precedence, as for the servers: explicit overrides (flags) > environment variables
`INKLING_WORKER_<FIELD>` (e.g. `INKLING_WORKER_PARTITIONS=16`) > the `[worker]` table
of the TOML config file (`INKLING_CONFIG` / `--config`) > defaults. Every field is
documented beside its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from inkling.errors import ConfigurationError
from inkling.serving.settings import load_server_settings

SECTION = "worker"


@dataclass(frozen=True)
class WorkerSettings:
    """One stream worker (`inkling worker`); run several to share the partitions."""

    partitions: int = 4
    """Streams of the event bus; must equal the ingest's (`[events] partitions`, also 4).
    The bus records the number (`inkling.events.bus.PARTITIONS_KEY`); a worker configured with
    another one stops with an error instead of leaving partitions unread."""
    worker_id: str = ""
    """This worker's consumer name and lease token; empty: `<host>-<pid>-<random>`. Two
    live workers must never share one."""
    batch_max_events: int = 500
    """A micro-batch closes at this many entries (over all owned partitions) ..."""
    batch_max_wait_ms: float = 5.0
    """... or this long after its first entry arrived, whichever comes first. Kept short:
    under load a batch grows by itself with the entries that arrive while the previous
    one is applied, so waiting longer only adds latency (50 ms gave a 50 ms median at
    1,000 events/s; 5 ms, 8-10 ms)."""
    log_flush_s: float = 5.0
    """A partition's events go to the Parquet log (one file per date) this long after the
    first of them was read, or at `log_max_events`; their entries are acknowledged then.
    Longer: fewer, bigger files and more entries pending on the bus meanwhile."""
    log_max_events: int = 20_000
    """... or once this many entries of one partition wait for the log. Keep it well below
    the ingest's `max_lag` (100,000): waiting entries count as pending bus lag."""
    poll_ms: float = 200.0
    """How long an idle read blocks; bounds how fast an idle worker sees a stop or a
    rebalance."""
    lease_ttl_ms: int = 10_000
    """A partition lease (and a worker heartbeat) lives this long unless renewed: the
    time after which a crashed worker's partitions are taken over."""
    rebalance_interval_ms: int = 1_000
    """How often leases and the heartbeat are renewed and partitions taken or given up
    toward a fair share. Must be well below `lease_ttl_ms`."""
    claim_min_idle_ms: int = 2_000
    """A taken-over partition's pending entries are claimed once idle this long; new
    entries wait until no other consumer holds pending ones (order is kept)."""
    max_deliveries: int = 20
    """An entry delivered this many times without being acknowledged is dead-lettered."""
    session_gap_s: float = 1_800.0
    """A logged-in user's event in a new session continues the user's visit (one shared
    state) when it comes less than this after the visit's latest event."""
    max_visit_sessions: int = 8
    """Session ids a visit keeps; its state row is written under each."""
    state_ttl_s: int = 86_400
    """How long an idle session or visit state is kept in Redis."""
    max_cached_states: int = 200_000
    """States kept in memory between batches (least recently used evicted)."""
    catalog_poll_s: float = 30.0
    """How often the catalogue file is checked for changes (item categories)."""
    counter_refresh_s: float = 15.0
    """How often item counter rows touched within their window are recomputed, so
    counts age out even when an item gets no new events."""
    trim_interval_s: float = 1.0
    """How often entries every group has acknowledged are trimmed from owned streams, a
    bounded amount each time (whole stream nodes, at most 10,000 entries per stream). An
    exact trim once a minute removed up to 300,000 entries in one script at 5,000
    events/s, and Redis answered nothing else meanwhile."""
    fsync: bool = True
    """fsync each event log file before it is moved into place (durable once acked)."""
    dead_letter_max: int = 100_000
    """The dead-letter stream is capped near this many entries (oldest dropped)."""

    @property
    def session_gap_us(self) -> int:
        return int(self.session_gap_s * 1_000_000)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or f.name == "worker_id":
                continue
            if value <= 0:
                raise ConfigurationError(f"worker setting {f.name} must be positive, got {value}")
        if self.rebalance_interval_ms * 2 > self.lease_ttl_ms:
            raise ConfigurationError(
                "worker setting rebalance_interval_ms must be at most half of lease_ttl_ms"
            )


def load_worker_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkerSettings:
    """Build the worker's settings from the `[worker]` table, the environment and flags
    (the servers' loader: `inkling.serving.settings.load_server_settings`)."""
    return load_server_settings(WorkerSettings, SECTION, config_file, overrides, environ)
