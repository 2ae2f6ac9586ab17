r"""The serve log: what the ranking server answered, one row per answer (schema version 2).

Every ``Recommend`` and ``RankCandidates`` answer becomes one ``inkling.v1.ServeRecord``
on the event bus (``inkling.events.bus``); the stream workers write those records as
Parquet beside the event log, partitioned by the UTC date of ``served_at``, with the
same guarantee as the event log (each record once, through a worker crash). Outcomes
(clicks, carts, purchases) join back to these rows by ``request_id``.

| column            | type                   | meaning                                             |
| ----------------- | ---------------------- | --------------------------------------------------- |
| `request_id`      | string                 | the answer's id, as returned to the caller          |
| `served_at`       | timestamp[us, UTC]     | when the server answered                            |
| `user_id`         | string                 | null for an anonymous session                       |
| `session_id`      | string                 | the request's session                               |
| `surface`         | string                 | `RequestContext.surface`; null when not sent        |
| `operation`       | string                 | `recommend` or `rank_candidates`                    |
| `item_ids`        | list<string>           | the items shown, best first; position = list index  |
| `scores`          | list<float32>          | each item's score (parallel to `item_ids`)          |
| `sources`         | list<string>           | each item's candidate source (`ann`, `covisitation`, `popularity`, `caller`) |
| `propensities`    | list<float32>          | P(the item at its position \| the items above) under the policy; 1 for a deterministic one |
| `model_version`   | string                 | the ranker that scored the list                     |
| `index_version`   | string                 | retrieval's index; null when retrieval did not answer |
| `feature_service` | string                 | the Feast feature service the ranker read           |
| `experiment`      | string                 | the experiment of the request; null when none ran   |
| `arm`             | string                 | its arm (`control`, `candidate`); null when none    |
| `degraded`        | list<string>           | the fallbacks that shaped the answer (reason names) |
| `policy`          | string                 | the ranking policy (`inkling.exploration`); null before version 2 (greedy) |
| `seed`            | int64                  | the policy's draw seed; null for a greedy policy    |
| `explored`        | list<bool>             | per item: not where the greedy ranker would have put it; null for greedy |
| `pool_item_ids`   | list<string>           | what a stochastic policy drew from, best `pool_values` first; null for greedy |
| `pool_scores`     | list<float32>          | the ranker's score of each pool item                |
| `pool_categories` | list<string>           | the category of each pool item                      |
| `pool_values`     | list<float32>          | what the policy ranked by (ranker or bandit values) |
| `pool_features`   | list<float32>          | context rows, row-major, pool items x `pool_feature_names` |
| `pool_feature_names` | list<string>        | the context features' names                         |

Version 2 added the last nine columns; files of version 1 read with them null.

One row per answer keeps an answer whole (an empty list stays visible as an empty
answer); readers explode the parallel lists into impressions with their position (in
Spark, ``posexplode`` over ``arrays_zip``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from inkling.events.schema import MAX_ID_LENGTH, TIMESTAMP_TYPE
from inkling.v1 import resources_pb2

SERVE_SCHEMA_VERSION = 2
OPERATIONS = ("recommend", "rank_candidates")
MAX_SERVED_ITEMS = 10_000
"""The most items one record may list (RankCandidates takes at most this many)."""

SERVE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("served_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("surface", pa.string()),
        pa.field("operation", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),
        pa.field("propensities", pa.list_(pa.float32()), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("index_version", pa.string()),
        pa.field("feature_service", pa.string()),
        pa.field("experiment", pa.string()),
        pa.field("arm", pa.string()),
        pa.field("degraded", pa.list_(pa.string()), nullable=False),
        pa.field("policy", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("explored", pa.list_(pa.bool_())),
        pa.field("pool_item_ids", pa.list_(pa.string())),
        pa.field("pool_scores", pa.list_(pa.float32())),
        pa.field("pool_categories", pa.list_(pa.string())),
        pa.field("pool_values", pa.list_(pa.float32())),
        pa.field("pool_features", pa.list_(pa.float32())),
        pa.field("pool_feature_names", pa.list_(pa.string())),
    ],
    metadata={b"inkling.serve_schema_version": str(SERVE_SCHEMA_VERSION).encode()},
)

_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
_SOURCE_PREFIX = "CANDIDATE_SOURCE_"
_REASON_PREFIX = "DEGRADED_REASON_"


def source_name(source: int) -> str:
    """`CANDIDATE_SOURCE_ANN` -> `ann`; a number this build does not know stays a number."""
    try:
        name = resources_pb2.CandidateSource.Name(source)
    except ValueError:
        return str(source)
    return name.removeprefix(_SOURCE_PREFIX).lower()


def reason_name(reason: int) -> str:
    """`DEGRADED_REASON_SCORER_FAILED` -> `scorer_failed` (a number when unknown)."""
    try:
        name = resources_pb2.DegradedReason.Name(reason)
    except ValueError:
        return str(reason)
    return name.removeprefix(_REASON_PREFIX).lower()


def record_problem(record: resources_pb2.ServeRecord, request_id: str) -> str | None:
    """Why a serve record cannot be logged (None when it can); `request_id` is the id the
    bus entry carries, which the record must repeat."""
    if not record.request_id or len(record.request_id) > MAX_ID_LENGTH:
        return "request_id is empty or longer than 256 characters"
    if record.request_id != request_id:
        return "the record's request_id differs from the bus entry's"
    if not record.HasField("served_at"):
        return "served_at is missing"
    if not record.session_id:
        return "session_id is empty"
    if record.operation not in OPERATIONS:
        return f"operation {record.operation!r} is not one of {', '.join(OPERATIONS)}"
    n = len(record.item_ids)
    if n > MAX_SERVED_ITEMS:
        return f"{n} items, more than {MAX_SERVED_ITEMS}"
    for name in ("scores", "sources", "propensities"):
        if len(getattr(record, name)) != n:
            return f"{name} has {len(getattr(record, name))} values for {n} items"
    if any(not (0.0 < p <= 1.0) for p in record.propensities):
        return "a propensity is outside (0, 1] (a shown item had a chance above 0)"
    if not record.model_version:
        return "model_version is empty"
    if record.explored and len(record.explored) != n:
        return f"explored has {len(record.explored)} values for {n} items"
    if record.HasField("pool"):
        pool = record.pool
        m = len(pool.item_ids)
        for name in ("scores", "categories", "values"):
            if len(getattr(pool, name)) != m:
                return f"pool.{name} has {len(getattr(pool, name))} values for {m} pool items"
        if len(pool.features) != m * len(pool.feature_names):
            return (
                f"pool.features has {len(pool.features)} values, not {m} items x "
                f"{len(pool.feature_names)} features"
            )
        if not set(record.item_ids[: min(n, m)]) <= set(pool.item_ids):
            return "a shown item is not in the pool it was drawn from"
    return None


def serve_table(records: Iterable[resources_pb2.ServeRecord]) -> pa.Table:
    """Serve records (each passed `record_problem`) as rows of `SERVE_SCHEMA`."""
    columns: dict[str, list[object]] = {name: [] for name in SERVE_SCHEMA.names}
    optional = ("user_id", "surface", "index_version", "feature_service", "experiment", "arm")
    for r in records:
        columns["request_id"].append(r.request_id)
        columns["served_at"].append(r.served_at.ToMicroseconds())
        columns["session_id"].append(r.session_id)
        columns["operation"].append(r.operation)
        columns["model_version"].append(r.model_version)
        for name in optional:
            columns[name].append(getattr(r, name) or None)
        columns["item_ids"].append(list(r.item_ids))
        columns["scores"].append(list(r.scores))
        columns["sources"].append([source_name(s) for s in r.sources])
        columns["propensities"].append(list(r.propensities))
        columns["degraded"].append([reason_name(d) for d in r.degraded])
        columns["policy"].append(r.policy or None)
        stochastic = r.HasField("pool")
        columns["seed"].append(r.seed if stochastic else None)
        columns["explored"].append(list(r.explored) if r.explored else None)
        pool = r.pool
        columns["pool_item_ids"].append(list(pool.item_ids) if stochastic else None)
        columns["pool_scores"].append(list(pool.scores) if stochastic else None)
        columns["pool_categories"].append(list(pool.categories) if stochastic else None)
        columns["pool_values"].append(list(pool.values) if stochastic else None)
        columns["pool_features"].append(list(pool.features) if stochastic else None)
        columns["pool_feature_names"].append(list(pool.feature_names) if stochastic else None)
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) for f in SERVE_SCHEMA], schema=SERVE_SCHEMA
    )


class ServeLog:
    """The Parquet serve log rooted at `root` (``date=<d>/*.parquet``), for readers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def exists(self) -> bool:
        return any(self.root.glob("date=*/*.parquet"))

    def dataset(self) -> ds.Dataset:
        schema = SERVE_SCHEMA.append(pa.field("date", pa.string()))
        return ds.dataset(
            str(self.root), format="parquet", partitioning=_PARTITIONING, schema=schema
        )

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole log (or some columns), without the partition column unless asked."""
        wanted = columns if columns is not None else SERVE_SCHEMA.names
        if not self.exists():
            return SERVE_SCHEMA.empty_table().select(wanted)
        return self.dataset().to_table(columns=wanted)

    def append(self, serves: pa.Table, prefix: str = "part") -> list[Path]:
        """Write rows of `SERVE_SCHEMA` (e.g. a simulation's) as new files, one per date
        served, each staged under `_staging/` and moved into place. The stream workers
        write their own files (`stream_worker.logfiles`); this is for everything else."""
        if serves.schema.remove_metadata() != SERVE_SCHEMA.remove_metadata():
            raise ValueError("serve records do not have the serve log's schema (SERVE_SCHEMA)")
        if serves.num_rows == 0:
            return []
        staging = self.root / "_staging"
        staging.mkdir(parents=True, exist_ok=True)
        dates = pc.strftime(serves.column("served_at"), format="%Y-%m-%d", locale="C")
        batch = uuid.uuid4().hex
        written = []
        for date in pc.unique(dates).to_pylist():
            final = self.root / f"date={date}" / f"{prefix}-{batch}.parquet"
            tmp = staging / f"{date}.{final.name}"
            rows = serves.filter(pc.equal(dates, date))
            pq.write_table(rows.replace_schema_metadata(SERVE_SCHEMA.metadata), tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            written.append(final)
        return written
