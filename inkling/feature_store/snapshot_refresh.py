"""Keeps a current item snapshot: `SnapshotRefresher` refreshes it off the request path
(reading only the changed rows, with a full build now and then) and swaps it in with one
assignment; what it serves is at most `max_staleness_s` behind Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.feature_store.columns import ServiceColumns
from inkling.feature_store.rows import AsyncClient
from inkling.feature_store.snapshot import (
    ItemSnapshot,
    build_item_snapshot,
    refresh_item_snapshot,
)
from inkling.telemetry.instruments import SNAPSHOT_BUILD_DURATION

log = logging.getLogger(__name__)


class SnapshotSource(Protocol):
    """Anything that hands out the current snapshot (a `SnapshotRefresher`)."""

    @property
    def snapshot(self) -> ItemSnapshot: ...


@dataclass
class RefreshStats:
    """Counters of a `SnapshotRefresher`: builds, failures, the longest build, the last error."""

    builds: int = 0
    full_builds: int = 0
    rows_read: int = 0
    """Rows read and decoded over all builds (a full build reads every row)."""
    failures: int = 0
    longest_build_s: float = 0.0
    last_error: str | None = None


class SnapshotRefresher:
    """Keeps an `ItemSnapshot` fresh: rebuilds every `refresh_interval_s`, swaps atomically.

    Builds start `refresh_interval_s` apart (back to back when a build takes longer).
    The first build and every `full_every`-th one read every row; the others read only
    the rows whose event time changed (`refresh_item_snapshot`), so a catalogue that
    did not change costs one SCAN and one `_ts` read per item, not a decode.
    A request takes `snapshot` once and keeps that object; a swap is one attribute
    assignment. A failed build keeps the previous snapshot and is retried next
    interval; `is_stale` then turns true once the bound is exceeded.

    Staleness: a row written at time t is in a snapshot swapped in by
    t + interval + build time, so what is served lags Redis by at most
    `max_staleness_s` = max(interval, longest build) + longest build.
    """

    def __init__(
        self,
        client: AsyncClient,
        columns: ServiceColumns,
        refresh_interval_s: float = 30.0,
        join_key: str = "item_id",
        chunk_size: int = 200,
        clock: Callable[[], float] = time.time,
        full_every: int = 10,
    ) -> None:
        if refresh_interval_s <= 0:
            raise ConfigurationError("refresh_interval_s must be positive")
        if full_every < 1:
            raise ConfigurationError("full_every must be at least 1")
        self.full_every = full_every
        self.client = client
        self.columns = columns
        self.refresh_interval_s = refresh_interval_s
        self.join_key = join_key
        self.chunk_size = chunk_size
        self._clock = clock
        self._snapshot: ItemSnapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = RefreshStats()

    @property
    def snapshot(self) -> ItemSnapshot:
        if self._snapshot is None:
            raise DependencyUnavailableError("the item snapshot is not built yet; call start()")
        return self._snapshot

    @property
    def max_staleness_s(self) -> float:
        longest = self.stats.longest_build_s
        return max(self.refresh_interval_s, longest) + longest

    def age_s(self) -> float:
        """Seconds since the current snapshot's build started."""
        return self.snapshot.age_s(self._clock())

    @property
    def is_stale(self) -> bool:
        return self._snapshot is None or self.age_s() > self.max_staleness_s

    async def refresh(self) -> ItemSnapshot:
        """Refresh the snapshot now (a full build when it is due) and swap it in."""
        previous = self._snapshot
        if previous is None or self.stats.builds % self.full_every == 0:
            snapshot = await build_item_snapshot(
                self.client,
                self.columns,
                join_key=self.join_key,
                chunk_size=self.chunk_size,
                clock=self._clock,
            )
        else:
            snapshot = await refresh_item_snapshot(self.client, previous, clock=self._clock)
        if snapshot.rows_read == snapshot.n_items:
            self.stats.full_builds += 1
        self.stats.rows_read += snapshot.rows_read
        self.stats.builds += 1
        self.stats.longest_build_s = max(self.stats.longest_build_s, snapshot.build_seconds)
        SNAPSHOT_BUILD_DURATION.record(snapshot.build_seconds, {"snapshot": self.columns.service})
        self._snapshot = snapshot
        return snapshot

    async def start(self) -> ItemSnapshot:
        """Build the first snapshot (errors propagate: no snapshot, no serving), then refresh."""
        snapshot = await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="item-snapshot-refresher")
        return snapshot

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.refresh_interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.refresh_interval_s
            try:
                await self.refresh()
                self.stats.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving the previous snapshot
                self.stats.failures += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.warning("item snapshot refresh failed: %s", self.stats.last_error)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
