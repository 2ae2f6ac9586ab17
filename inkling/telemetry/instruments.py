"""Every metric inkling records, created once on the global meter.

Names follow the OpenTelemetry semantic conventions where one exists
(`rpc.server.call.duration`, `rpc.client.call.duration`) and live under `inkling.`
otherwise. Attributes are bounded sets (stage, source, reason, method, status): never a
user, session or item id. Durations are seconds, in buckets chosen for a service whose
calls take 1-100 ms (the SDK's default buckets start at 5 ms and jump to 10, 25, 50).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from inkling.v1 import resources_pb2

DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Fine where the targets are (2 ms hydration, 15-25 ms p99s, a 50 ms budget)."""
COUNT_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
"""For candidate counts and batch sizes."""

meter = metrics.get_meter("inkling")

RPC_SERVER_DURATION = meter.create_histogram(
    "rpc.server.call.duration",
    unit="s",
    description="Duration of an RPC served, by method and status code.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
RPC_REFUSED = meter.create_counter(
    "inkling.rpc.refused",
    unit="{call}",
    description=(
        "Calls a server refused before or outside their handler, by method and reason "
        "(`unauthenticated`, `permission_denied`: the allow-list; `undecodable`: the "
        "payload is not the request message; `internal`: a bug)."
    ),
)
RPC_CLIENT_DURATION = meter.create_histogram(
    "rpc.client.call.duration",
    unit="s",
    description="Duration of an RPC made (ranking to retrieval), by method and status code.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
STAGE_DURATION = meter.create_histogram(
    "inkling.stage.duration",
    unit="s",
    description="Duration of one stage of a request (retrieve, hydrate, score, ...).",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
_stage_cpu_s: dict[str, float] = {}
"""CPU seconds per stage of this process's loops, added by `add_stage_cpu`."""


def add_stage_cpu(stage: str, seconds: float) -> None:
    """Count `seconds` of CPU to `stage` (`inkling.stage.cpu_time`). A plain dict add:
    one thread adds to a stage (the worker's loop or its log thread), and the metric
    reads the totals only when it is collected, so a stage costs nothing more per lap."""
    _stage_cpu_s[stage] = _stage_cpu_s.get(stage, 0.0) + seconds


def _observe_stage_cpu(options: CallbackOptions) -> Iterable[Observation]:
    for stage, seconds in list(_stage_cpu_s.items()):
        yield Observation(seconds, {"stage": stage})


STAGE_CPU = meter.create_observable_counter(
    "inkling.stage.cpu_time",
    callbacks=[_observe_stage_cpu],
    unit="s",
    description="CPU time of the thread that ran a stage of a synchronous loop (the stream "
    "worker's read, decode, apply, commit, ...), summed; divide by events for CPU per event.",
)
DEGRADED = meter.create_counter(
    "inkling.recommend.degraded",
    unit="{response}",
    description="Answers served degraded, by the reason named in the response.",
)


def count_degraded(reasons: Iterable[int], operation: str) -> None:
    """One `inkling.recommend.degraded` count per reason an answer names."""
    for reason in reasons:
        DEGRADED.add(
            1, {"reason": resources_pb2.DegradedReason.Name(reason), "operation": operation}
        )


def declare_counters(*operations: str) -> None:
    """Start at zero the counter series a process may later count for `operations`
    (every degraded reason, the online store's errors), so that `rate()` and
    `increase()` see the first real count: Prometheus cannot take the rate of a series
    that begins at its first increment."""
    for operation in operations:
        for value in resources_pb2.DegradedReason.values():
            if value != resources_pb2.DEGRADED_REASON_UNSPECIFIED:
                name = resources_pb2.DegradedReason.Name(value)
                DEGRADED.add(0, {"reason": name, "operation": operation})
    ONLINE_STORE_ERRORS.add(0, {"operation": "read_rows"})


CANDIDATES = meter.create_histogram(
    "inkling.candidates",
    unit="{candidate}",
    description="Candidates one retrieval request kept from each source.",
    explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
)
SNAPSHOT_BUILD_DURATION = meter.create_histogram(
    "inkling.snapshot.build.duration",
    unit="s",
    description="Time to build the in-process item snapshot from the online store.",
    explicit_bucket_boundaries_advisory=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
ONLINE_STORE_DURATION = meter.create_histogram(
    "inkling.online_store.duration",
    unit="s",
    description="One round trip to the online store for a request's rows.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
ONLINE_STORE_ERRORS = meter.create_counter(
    "inkling.online_store.errors",
    unit="{error}",
    description="Reads of the online store that failed.",
)


# --------------------------------------------------------------------------- observed
# Gauges are read at collection time from what the running apps registered; an app
# registers on start and removes its entry on close, so tests that start several apps
# in one process never report a closed one.

_snapshot_ages: dict[int, tuple[str, Callable[[], float]]] = {}
_models: dict[tuple[int, str], Mapping[str, str]] = {}
_tokens = itertools.count()


def _register(registry: dict[int, Any], entry: Any) -> Callable[[], None]:
    """Add `entry` under a fresh token; the returned undo removes that entry only."""
    token = next(_tokens)
    registry[token] = entry

    def undo() -> None:
        registry.pop(token, None)

    return undo


def _observe_snapshot_ages(options: CallbackOptions) -> Iterable[Observation]:
    for name, age in list(_snapshot_ages.values()):
        yield Observation(age(), {"snapshot": name})


def _observe_models(options: CallbackOptions) -> Iterable[Observation]:
    for attributes in list(_models.values()):
        yield Observation(1, dict(attributes))


SNAPSHOT_AGE = meter.create_observable_gauge(
    "inkling.snapshot.age",
    callbacks=[_observe_snapshot_ages],
    unit="s",
    description="Age of the item snapshot being served (how far it may lag the online store).",
)
MODEL_INFO = meter.create_observable_gauge(
    "inkling.model.info",
    callbacks=[_observe_models],
    unit="1",
    description="1 for what serves now: model, version, index and feature service as attributes.",
)


def track_snapshot(name: str, age_s: Callable[[], float]) -> Callable[[], None]:
    """Report `age_s()` as `inkling.snapshot.age{snapshot=name}` until the returned undo
    is called (which removes this registration only, not another app's of that name)."""
    return _register(_snapshot_ages, (name, age_s))


def set_model_info(owner: object, role: str, **attributes: str) -> None:
    """What `owner` (an app) serves as `role` now (retrieval, ranking, ranking-candidate)."""
    _models[(id(owner), role)] = {"role": role, **attributes}


def clear_model_info(owner: object, role: str) -> None:
    _models.pop((id(owner), role), None)


# --------------------------------------------------------------------------- events
INGEST_REJECTED = meter.create_counter(
    "inkling.ingest.rejected",
    unit="{event}",
    description="Events ingest did not put on the bus: the invalid field, or backpressure.",
)
EVENT_FRESHNESS = meter.create_histogram(
    "inkling.event.freshness",
    unit="s",
    description="Per committed event: the worker's commit time minus ingest's receive time.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
WORKER_BATCH_SIZE = meter.create_histogram(
    "inkling.worker.batch.size",
    unit="{entry}",
    description="Bus entries in one micro-batch of a stream worker.",
    explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
)
DEAD_LETTERS = meter.create_counter(
    "inkling.bus.dead_letters",
    unit="{entry}",
    description="Bus entries a stream worker moved to the dead-letter stream.",
)
SERVE_LOG_APPENDED = meter.create_counter(
    "inkling.serve_log.appended",
    unit="{record}",
    description="Serve records (one per ranking answer) the ranking server put on the bus.",
)
POLICY_IMPRESSIONS = meter.create_counter(
    "inkling.policy.impressions",
    unit="{item}",
    description=(
        "Items the ranking policy placed, by policy kind and `explored` (true where the "
        "greedy ranker would have placed another item): the explored share is their ratio."
    ),
)
SERVE_LOG_DROPPED = meter.create_counter(
    "inkling.serve_log.dropped",
    unit="{record}",
    description="Serve records the ranking server did not put on the bus, by reason.",
)


_bus_lags: dict[int, Callable[[], Mapping[int, int]]] = {}


def _observe_bus_lag(options: CallbackOptions) -> Iterable[Observation]:
    for lag in list(_bus_lags.values()):
        try:
            backlog = lag()
        except Exception:  # Redis away: no observation this time, never a failed scrape
            continue
        for partition, entries in backlog.items():
            yield Observation(entries, {"partition": str(partition)})


BUS_LAG = meter.create_observable_gauge(
    "inkling.bus.lag",
    callbacks=[_observe_bus_lag],
    unit="{entry}",
    description="Entries of a bus partition its consumer group has not acknowledged yet.",
)


def track_bus_lag(lag: Callable[[], Mapping[int, int]]) -> Callable[[], None]:
    """Report `lag()` (partition -> entries) as `inkling.bus.lag`; returns the undo."""
    return _register(_bus_lags, lag)
