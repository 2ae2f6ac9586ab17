"""Erasure: forget a user everywhere inkling keeps them (`inkling forget`, `ForgetUser`).

A forget of user U, in this order:

1. **Tombstone.** U (``u:<id>``) goes into the Redis hash `TOMBSTONES_KEY` (field →
   when, µs) and into the event log's tombstone file (`TOMBSTONE_FILE` under the log's
   root; readers skip names starting with ``_``). From then on the stream workers drop
   every event and serve record of a tombstoned user or session before applying or
   logging it (replays of entries read before the forget included), and
   `inkling.events.eventlog.EventLog.append` refuses their rows (an import, a replay
   of an old file). A tombstone is never lifted.
2. **Sessions.** U's sessions are found in the event log, the serve log, the worker's
   visit state and the bus, and tombstoned too, so the anonymous events of those
   sessions (before login) go as well.
3. **The log flush.** Events a worker read before the tombstone may still sit in its
   log buffer; while workers are alive, the forget waits (at most `flush_wait_s`) for
   every partition's log watermark to pass the last entry the bus held at step 1.
4. **Redis.** Feast's online rows of U and of each session (one hash per entity key
   holds every view's features, so deleting the key removes them from every view), the
   worker's states of U and the sessions, and U's entries on the bus, pending ones
   included, and in the dead-letter stream (XDEL; a pending entry deleted this way is
   dead-lettered by the worker without its fields).
5. **Files.** Every Parquet file under the event log, the serve log, the labelled
   impressions, the offline feature tables, the training sets and the user catalogue
   with a row of U or of
   one of the sessions is rewritten without those rows: written beside the original
   under a name readers skip, fsynced, and moved over it with ``os.replace``, so a
   reader sees the old file or the new one. Workers only ever add new files, so
   concurrent ingest of other users loses nothing. Spark's ``.crc`` checksum of a
   rewritten file is removed (it would no longer match).
6. **Models.** The user's vector is removed from the embeddings artifacts under the
   models folder (the ALS vectors retrieval reads). Every published model version created before the forget is flagged in
   the registry (`ModelRegistry.record_erasure`) until a retrain publishes a new one.

Each step is idempotent: a second forget of U finds nothing and removes nothing.
Items' aggregates (popularity, co-visitation, counters) are not per user and stay.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import redis

from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.events.bus import (
    DEAD_LETTER,
    F_EVENT,
    F_SERVE,
    PARTITIONS_KEY,
    TOMBSTONES_KEY,
    dead_letter_key,
    is_cluster,
    routing_key,
    stream_key,
    tombstone_fields,
)
from inkling.events.eventlog import TOMBSTONE_FILE, Tombstones, maintenance_lock
from inkling.feature_store.feast_codec import entity_keys
from inkling.fsync import fsync_path
from inkling.models.embeddings import EmbeddingsArtifact, load_embeddings, write_embeddings
from inkling.models.registry import ModelRegistry
from inkling.v1 import resources_pb2
from stream_worker.commit import logged_key, state_key
from stream_worker.ownership import MEMBERS as MEMBERS_KEY
from stream_worker.state import SessionState

_SCAN_COUNT = 5_000
_DELETE_BATCH = 1_000


def _reply(value: Any) -> Any:
    """A blocking client's reply (redis-py types every reply as maybe-awaitable)."""
    return value


def user_field(user_id: str) -> str:
    return tombstone_fields(user_id, None)[0]


def session_field(session_id: str) -> str:
    return tombstone_fields(None, session_id)[0]


def _append_tombstone(events_dir: Path, user_id: str, sessions: Iterable[str], at: str) -> None:
    path = Path(events_dir) / TOMBSTONE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"user": user_id, "sessions": sorted(sessions), "at": at}
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())


@dataclass
class ForgetReport:
    """What one forget removed where (counts), and what it could not finish."""

    user_id: str
    new: bool
    """False when the user was already tombstoned (a repeated forget)."""
    sessions: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    files_rewritten: int = 0
    models_flagged: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, where: str, count: int) -> None:
        self.removed[where] = self.removed.get(where, 0) + count

    def summary(self) -> str:
        lines = [
            f"forgot user {self.user_id!r}"
            + ("" if self.new else " (already forgotten: removed what was left)")
            + f" in {self.seconds:.1f} s; {self.sessions} sessions",
        ]
        lines += [f"  {where}: {count} removed" for where, count in sorted(self.removed.items())]
        lines.append(f"  files rewritten: {self.files_rewritten}")
        if self.models_flagged:
            lines.append(
                "  models flagged until retrained: " + ", ".join(sorted(self.models_flagged))
            )
        lines += [f"  INCOMPLETE: {what}" for what in self.incomplete]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "new": self.new,
            "sessions": self.sessions,
            "removed": dict(self.removed),
            "files_rewritten": self.files_rewritten,
            "models_flagged": list(self.models_flagged),
            "incomplete": list(self.incomplete),
            "seconds": self.seconds,
        }


# --- files -------------------------------------------------------------------------------


def _parquet_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.parquet")):
        relative = path.relative_to(root)
        if any(part.startswith(("_", ".")) for part in relative.parts):
            continue  # staging, tombstones, temporary files: not data
        yield path


def _key_columns(path: Path) -> list[str]:
    names = pq.read_schema(path).names
    return [c for c in ("user_id", "session_id") if c in names]


def sessions_in_files(roots: Sequence[Path], user_id: str) -> set[str]:
    """Session ids of the rows with `user_id` in the Parquet files under `roots`."""
    found: set[str] = set()
    for root in roots:
        for path in _parquet_files(root):
            if _key_columns(path) != ["user_id", "session_id"]:
                continue
            table = pq.read_table(
                path, columns=["session_id"], filters=ds.field("user_id") == user_id
            )
            found.update(s for s in table.column("session_id").to_pylist() if s)
    return found


def rewrite_without(root: Path, forgotten: Tombstones) -> tuple[int, int]:
    """Rewrite every Parquet file under `root` that holds forgotten rows without them.

    Returns (rows removed, files rewritten). A file left with no rows is deleted.
    """
    removed = files = 0
    for path in _parquet_files(root):
        keys = _key_columns(path)
        if not keys:
            continue
        hits = int(pc.sum(forgotten.mask(pq.read_table(path, columns=keys))).as_py() or 0)
        if not hits:
            continue
        parquet = pq.ParquetFile(path)
        table = parquet.read()
        kept = table.filter(pc.invert(forgotten.mask(table)))
        crc = path.with_name(f".{path.name}.crc")
        if kept.num_rows == 0:
            path.unlink()
        else:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.forget")
            try:
                pq.write_table(kept.replace_schema_metadata(table.schema.metadata), tmp)
                fsync_path(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        crc.unlink(missing_ok=True)
        fsync_path(path.parent)
        removed += hits
        files += 1
    return removed, files


def scrub_embeddings(root: Path, user_id: str) -> int:
    """Remove the user's vector from every embeddings artifact under `root` (the ALS
    vectors the retrieval server reads); the number of artifacts changed."""
    changed = 0
    if not root.is_dir():
        return 0
    for ids in sorted(root.rglob("user_ids.json")):
        if any(part.startswith(".") for part in ids.relative_to(root).parts):
            continue
        if user_id not in json.loads(ids.read_text()):
            continue
        artifact = load_embeddings(ids.parent)
        keep = [i for i, u in enumerate(artifact.user_ids) if u != user_id]
        write_embeddings(
            EmbeddingsArtifact(
                artifact.item_ids,
                artifact.item_vectors,
                [artifact.user_ids[i] for i in keep],
                artifact.user_vectors[keep],
                artifact.manifest,
            ),
            ids.parent,
        )
        changed += 1
    return changed


# --- Redis -------------------------------------------------------------------------------


def _partitions(client: redis.Redis) -> int:
    recorded = _reply(client.get(PARTITIONS_KEY))
    return int(recorded) if recorded is not None else 0


def _partition_streams(client: redis.Redis) -> dict[int, str]:
    """Each partition's stream (hash-tagged on a Redis Cluster)."""
    cluster = is_cluster(client)
    return {p: stream_key(p, cluster) for p in range(_partitions(client))}


def _streams(client: redis.Redis) -> list[str]:
    """Every stream that may hold a user's entries: the partitions' and the dead letters
    (one per partition on a cluster)."""
    streams = list(_partition_streams(client).values())
    if is_cluster(client):
        return streams + [dead_letter_key(p, True) for p in range(len(streams))]
    return [*streams, DEAD_LETTER]


def _state_key(client: redis.Redis, key: str) -> str:
    """The worker's state key of a routing key (in its partition's slot on a cluster)."""
    return state_key(key, _partitions(client) if is_cluster(client) else None)


def _owner(fields: dict[bytes, bytes]) -> tuple[str, str]:
    """(user id, session id) of a bus entry's event or serve record ('' when unknown)."""
    try:
        if (payload := fields.get(F_EVENT.encode())) is not None:
            event = resources_pb2.Event.FromString(payload)
            return event.user_id, event.session_id
        if (payload := fields.get(F_SERVE.encode())) is not None:
            record = resources_pb2.ServeRecord.FromString(payload)
            return record.user_id, record.session_id
    except Exception:  # an undecodable (poison) entry belongs to nobody we can name
        return "", ""
    return "", ""


def _entries(client: redis.Redis, stream: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    start = "-"
    while True:
        chunk = _reply(client.xrange(stream, min=start, max="+", count=_SCAN_COUNT))
        if not chunk:
            return
        yield from chunk
        last = chunk[-1][0].decode()
        millis, seq = last.split("-")
        start = f"{millis}-{int(seq) + 1}"
        if len(chunk) < _SCAN_COUNT:
            return


def sessions_on_bus(client: redis.Redis, user_id: str) -> set[str]:
    found = set()
    for stream in _streams(client):
        for _, fields in _entries(client, stream):
            user, session = _owner(fields)
            if user == user_id and session:
                found.add(session)
    return found


def delete_from_bus(client: redis.Redis, user_id: str, sessions: set[str]) -> int:
    """XDEL every entry of the user or one of the sessions; the number deleted."""
    deleted = 0
    for stream in _streams(client):
        doomed = [
            entry_id
            for entry_id, fields in _entries(client, stream)
            if (owner := _owner(fields))[0] == user_id or owner[1] in sessions
        ]
        for i in range(0, len(doomed), _DELETE_BATCH):
            deleted += int(_reply(client.xdel(stream, *doomed[i : i + _DELETE_BATCH])))
    return deleted


def visit_sessions(client: redis.Redis, user_id: str) -> set[str]:
    """The sessions the worker's state of the user's current visit lists."""
    data = _reply(client.get(_state_key(client, routing_key(user_id, ""))))
    return set(SessionState.loads(data).sessions) if data is not None else set()


def _wait_for_log(client: redis.Redis, marks: dict[int, bytes], timeout_s: float) -> list[str]:
    """Wait until every partition's log watermark reaches the id it had at the tombstone;
    the partitions that did not (only while workers are alive)."""
    deadline = time.monotonic() + timeout_s
    cluster = is_cluster(client)
    while True:
        behind = []
        for partition, last in marks.items():
            logged = _reply(client.get(logged_key(partition, cluster)))
            if logged is None or _entry_id(logged) < _entry_id(last):
                behind.append(str(partition))
        now_ms = int(time.time() * 1000)
        alive = bool(client.zrangebyscore(MEMBERS_KEY, now_ms, "+inf"))
        if not behind or not alive or time.monotonic() > deadline:
            return behind if alive else []
        time.sleep(0.05)


def _entry_id(value: bytes) -> tuple[int, int]:
    millis, _, seq = value.decode().partition("-")
    return int(millis), int(seq or 0)


def _last_ids(client: redis.Redis) -> dict[int, bytes]:
    """Each partition stream's last entry id (streams with entries only)."""
    out = {}
    for partition, stream in _partition_streams(client).items():
        last = _reply(client.xrevrange(stream, count=1))
        if last:
            out[partition] = last[0][0]
    return out


# --- the procedure -----------------------------------------------------------------------


def forget_user(
    settings: Settings,
    client: redis.Redis,
    user_id: str,
    *,
    project: str = "inkling",
    flush_wait_s: float = 30.0,
    registry: ModelRegistry | None = None,
) -> ForgetReport:
    """Forget `user_id` everywhere (see the module doc); idempotent.

    Args:
        settings: where the logs, features, training sets and models live.
        client: the online store's Redis (also the bus's).
        user_id: the id as stored (a pseudonym when pseudonymisation is on).
        project: the Feast project whose online rows to delete.
        flush_wait_s: the longest wait for live workers to flush what they read before
            the tombstone; a partition still behind is reported in `incomplete`.
        registry: the model registry to flag (default: `settings.models_dir`).
    """
    if not user_id or not user_id.strip():
        raise InvalidInputError("user_id must not be empty")
    started = time.monotonic()
    now = datetime.now(UTC)
    at_us = int(now.timestamp() * 1_000_000)
    new = bool(client.hsetnx(TOMBSTONES_KEY, user_field(user_id), str(at_us)))
    marks = _last_ids(client)

    sessions = sessions_in_files([settings.events_dir, settings.serves_dir], user_id)
    sessions |= visit_sessions(client, user_id)
    sessions |= sessions_on_bus(client, user_id)
    if sessions:
        client.hset(TOMBSTONES_KEY, mapping={session_field(s): at_us for s in sessions})
    _append_tombstone(settings.events_dir, user_id, sessions, now.isoformat())
    report = ForgetReport(user_id=user_id, new=new, sessions=len(sessions))

    behind = _wait_for_log(client, marks, flush_wait_s)
    if behind:
        report.incomplete.append(
            f"partitions {', '.join(behind)}: the workers did not log what they read before "
            f"the forget within {flush_wait_s:g} s; run the forget again once they have"
        )

    report.add("bus entries", delete_from_bus(client, user_id, sessions))
    user_rows = entity_keys("user_id", [user_id], project)
    session_rows = entity_keys("session_id", sorted(sessions), project) if sessions else []
    report.add("online user rows", int(_reply(client.delete(*user_rows))))
    if session_rows:
        report.add("online session rows", int(_reply(client.delete(*session_rows))))
    states = [_state_key(client, routing_key(user_id, ""))]
    states += [_state_key(client, routing_key("", s)) for s in sorted(sessions)]
    report.add("worker states", int(_reply(client.delete(*states))))

    forgotten = Tombstones(frozenset({user_id}), frozenset(sessions))
    for where, root in (
        ("event log rows", settings.events_dir),
        ("serve log rows", settings.serves_dir),
        ("impression rows", settings.impressions_dir),
        ("feature table rows", settings.features_dir),
        ("training set rows", settings.training_dir),
        ("user catalogue rows", settings.catalog_dir),
    ):
        with maintenance_lock(root):
            rows, files = rewrite_without(root, forgotten)
        report.add(where, rows)
        report.files_rewritten += files

    report.add("embedding artifacts", scrub_embeddings(settings.models_dir, user_id))
    registry = registry or ModelRegistry(settings.data_dir / "registry")
    report.models_flagged = registry.record_erasure(now)
    report.seconds = time.monotonic() - started
    return report
