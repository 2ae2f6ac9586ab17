"""Recording every answer off the request path: the ranking server's side of the serve log.

A request hands `ServeLogger.log` one `Served` (references to what the answer already
holds: no copying, no encoding, no I/O) and returns. A background task turns what has
queued into ``inkling.v1.ServeRecord`` messages and appends them to the event bus in
one script call per batch (`inkling.events.bus.EventBus.append_serves`); the stream
workers write them to the Parquet serve log (`inkling.events.servelog`).

Never at the request's expense:

- the queue is bounded (`max_queue`); a record that finds it full is dropped;
- a bus that is down, slow or out of memory drops the batch being appended, and the
  task waits `retry_after_s` before the next append (records queue meanwhile, up to
  the bound);
- an append is never retried: its reply lost, a retry could log the answer twice, so
  the batch counts as dropped although it may have landed.

Every dropped record is counted in ``inkling.serve_log.dropped{reason}`` (`queue_full`,
`bus_unavailable`, `misconfigured`, `shutdown`, `error`), every appended one in
``inkling.serve_log.appended``; failures are logged at most once a minute per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from inkling.errors import ConfigurationError, InklingError
from inkling.events.bus import BusServe, EventBus, routing_key
from inkling.telemetry.instruments import SERVE_LOG_APPENDED, SERVE_LOG_DROPPED
from inkling.telemetry.sampled_log import SampledLog
from inkling.v1.resources_pb2 import ServeRecord

log = logging.getLogger("inkling.serve_log")

LOG_EVERY_S = 60.0


class Served(NamedTuple):
    """One answer, as the request path hands it over (built after the response was)."""

    request_id: str
    served_us: int
    """When the server answered, microseconds since the epoch."""
    operation: str
    user_id: str
    session_id: str
    surface: str
    item_ids: Sequence[str]
    scores: np.ndarray
    sources: np.ndarray
    propensities: np.ndarray | None
    """Per item; None for a deterministic policy (each 1)."""
    model_version: str
    index_version: str
    feature_service: str
    experiment: str
    arm: str
    degraded: Sequence[int]
    exploration: Explored | None = None
    """What a stochastic policy drew; None for a greedy one."""


class Explored(NamedTuple):
    """A stochastic policy's draw, as the serve record carries it."""

    policy: str
    seed: int
    explored: np.ndarray
    """Per shown item."""
    pool_item_ids: Sequence[str]
    pool_scores: np.ndarray
    pool_categories: Sequence[str]
    pool_values: np.ndarray
    feature_names: Sequence[str]
    features: np.ndarray
    """[pool items, features]."""


def serve_record(served: Served) -> ServeRecord:
    """The bus's message for one answer."""
    n = len(served.item_ids)
    propensities = [1.0] * n if served.propensities is None else served.propensities.tolist()
    drawn = served.exploration
    record = ServeRecord(
        request_id=served.request_id,
        user_id=served.user_id,
        session_id=served.session_id,
        surface=served.surface,
        operation=served.operation,
        item_ids=served.item_ids,
        scores=served.scores.tolist(),
        sources=served.sources.tolist(),
        propensities=propensities,
        model_version=served.model_version,
        index_version=served.index_version,
        feature_service=served.feature_service,
        experiment=served.experiment,
        arm=served.arm,
        degraded=served.degraded,  # type: ignore[arg-type]  # enum values as ints
    )
    record.served_at.FromMicroseconds(served.served_us)
    if drawn is None:
        record.policy = "greedy"
        return record
    record.policy = drawn.policy
    record.seed = drawn.seed
    record.explored.extend(drawn.explored.tolist())
    pool = record.pool
    pool.item_ids.extend(drawn.pool_item_ids)
    pool.scores.extend(drawn.pool_scores.tolist())
    pool.categories.extend(drawn.pool_categories)
    pool.values.extend(drawn.pool_values.tolist())
    pool.feature_names.extend(drawn.feature_names)
    pool.features.extend(drawn.features.ravel().tolist())
    return record


class ServeLogger:
    """Queues answers and appends them to the bus from one background task.

    Args:
        bus: the event bus (its client should not retry: see the module doc).
        max_queue: the most answers waiting; more are dropped (`queue_full`).
        max_batch: the most answers one append carries.
        retry_after_s: the pause after a failed append.
        linger_s: how long the task waits after the first queued answer for more, so that
            one append carries several: an append is one script call, about 0.3 ms of the
            server's CPU whether it carries 1 record or 16 (`python -m bench.serve_log_cost`).
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        max_queue: int = 10_000,
        max_batch: int = 64,
        retry_after_s: float = 1.0,
        linger_s: float = 0.05,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ConfigurationError("the serve log's max_queue and max_batch must be at least 1")
        self.bus = bus
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.retry_after_s = retry_after_s
        self.linger_s = linger_s
        self._queue: deque[Served] = deque()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._log = SampledLog(log, LOG_EVERY_S)
        self.appended = 0
        self.dropped: dict[str, int] = {}

    def log(self, served: Served) -> None:
        """Queue one answer (never blocks, never raises)."""
        if not self._accepting or len(self._queue) >= self.max_queue:
            self._drop("queue_full" if self._accepting else "shutdown", 1)
            return
        self._queue.append(served)
        self._ready.set()

    async def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="serve-log")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, append what is queued within `timeout_s`, drop the rest."""
        self._accepting = False
        self._ready.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._queue:
            self._drop("shutdown", len(self._queue))
            self._queue.clear()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if not self._accepting:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if self.linger_s > 0 and len(self._queue) < self.max_batch and self._accepting:
                await asyncio.sleep(self.linger_s)  # one append for what arrives meanwhile
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            if not await self._append(batch) and self._accepting:
                await asyncio.sleep(self.retry_after_s)

    async def _append(self, batch: list[Served]) -> bool:
        records: list[BusServe] = []
        for i, served in enumerate(batch):
            payload = serve_record(served).SerializeToString()
            records.append(
                BusServe(served.request_id, routing_key(served.user_id, served.session_id), payload)
            )
            if i % 16 == 15:
                await asyncio.sleep(0)  # let requests run between slices of a large batch
        try:
            await self.bus.append_serves(records, int(time.time() * 1_000_000))
        except ConfigurationError as e:
            self._drop("misconfigured", len(batch), e)
            return False
        except (InklingError, OSError) as e:  # unavailable, out of memory, timed out
            self._drop("bus_unavailable", len(batch), e)
            return False
        except Exception as e:  # a defect: keep the task (and the server) alive, say so
            log.exception("serve log: appending failed")
            self._drop("error", len(batch), e)
            return False
        self.appended += len(batch)
        SERVE_LOG_APPENDED.add(len(batch))
        return True

    def _drop(self, reason: str, count: int, error: Exception | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        SERVE_LOG_DROPPED.add(count, {"reason": reason})
        detail = f": {error}" if error is not None else ""
        self._log.log(
            reason,
            logging.WARNING,
            f"serve log: dropped {count} record(s) ({reason}){detail}; "
            f"{self.dropped[reason]} dropped so far for this reason",
        )
