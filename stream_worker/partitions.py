"""What a worker holds in memory: the partitions it owns, the entries it reads from
them, the micro-batch it builds, the log buffers it hands to its log thread, and its
counters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from inkling.events.bus import stream_key
from stream_worker.commit import EntryId, parse_id
from stream_worker.state import EventColumns, StreamEvent


@dataclass
class Partition:
    """What a worker knows about a partition it owns."""

    number: int
    mode: str = "init"
    """init (read the watermarks, clean up) -> claim (take over pending entries) ->
    pending (re-read this worker's own pending entries) -> live (new entries)."""
    applied: bytes | None = None
    """The online watermark as stored (None: nothing applied yet)."""
    logged: bytes | None = None
    """The log watermark as stored; never above `applied`."""
    cursor: bytes = b"0"
    entry_ids: list[bytes] = field(default_factory=list)
    """Entries above the log watermark read so far, in order: acknowledged at the flush."""
    events: EventColumns = field(default_factory=EventColumns)
    """Their valid events, for the next log file."""
    serves: list[bytes] = field(default_factory=list)
    """Their valid serve records (serialized), for the next serve log file."""
    buffered_since: float = 0.0
    cluster: bool = False
    """On a Redis Cluster: its keys carry the partition's hash tag."""

    @property
    def stream(self) -> str:
        return stream_key(self.number, self.cluster)

    @property
    def applied_id(self) -> EntryId:
        return parse_id(self.applied) if self.applied else (0, 0)

    @property
    def logged_id(self) -> EntryId:
        return parse_id(self.logged) if self.logged else (0, 0)

    def buffer_entries(
        self,
        entries: list[Entry],
        events: list[StreamEvent],
        serves: list[bytes],
        monotonic_now: float,
    ) -> None:
        if not self.entry_ids:
            self.buffered_since = monotonic_now
        self.entry_ids += [e.entry_id for e in entries]
        self.events.extend(events)
        self.serves += serves

    def clear_buffer(self) -> None:
        self.entry_ids = []
        self.events = EventColumns()
        self.serves = []


@dataclass(frozen=True)
class LogFlush:
    """A partition's log buffer handed to the log thread."""

    partition: int
    entry_ids: list[bytes]
    events: EventColumns
    serves: list[bytes]
    logged: bytes | None
    """The log watermark it starts from: the commit fails if it moved."""


@dataclass(frozen=True)
class LogFlushed:
    committed: bool
    files: int


@dataclass
class WorkerStats:
    """Counters since start (logged periodically and returned by `run`)."""

    batches: int = 0
    entries: int = 0
    applied: int = 0
    replayed: int = 0
    """Entries at or below the watermark (already committed): acknowledged, not applied."""
    duplicates: int = 0
    """Entries repeating an event id earlier in the same batch."""
    dead_lettered: int = 0
    forgotten: int = 0
    """Events and serve records dropped because their user or session was forgotten."""
    files: int = 0
    logged: int = 0
    """Events written to the Parquet log."""
    serves_logged: int = 0
    """Serve records written to the Parquet serve log."""
    commit_failures: int = 0
    acquired: int = 0
    released: int = 0
    lost: int = 0
    claimed: int = 0
    cleaned_files: int = 0
    bandit_skipped: int = 0
    """Cluster: batches of bandit additions a replay straddling the applied mark skipped."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Entry:
    partition: int
    entry_id: bytes
    fields: dict[bytes, bytes] | None
    deliveries: int = 1


@dataclass
class Poison:
    entry: Entry
    reason: str


@dataclass
class Batch:
    entries: dict[int, list[Entry]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def add(self, partition: int, entries: Iterable[Entry]) -> None:
        self.entries.setdefault(partition, []).extend(entries)
