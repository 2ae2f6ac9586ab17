"""The event bus: Redis Streams, partitioned by a hash of the user id.

The layout every producer and consumer shares (the ingest process appends, stream
workers consume):

- ``partitions`` streams, keys ``inkling:events:<p>`` for ``p`` in ``0..partitions-1``
  (:func:`stream_key`). An event goes to :func:`partition_of` its routing key: the
  user id when it has one, else the session id. So all of a logged-in user's
  events, from any device or session, land in one partition and are processed in
  order by one worker.
- Each entry has the fields :data:`F_EVENT_ID` (the event's id), :data:`F_EVENT`
  (the ``inkling.v1.Event`` message, serialized) and :data:`F_RECEIVED_US` (the
  ingest process's receive time, microseconds since the epoch, as decimal text).
- Workers read through the consumer group :data:`GROUP`; events a worker cannot
  process go to the dead-letter stream :data:`DEAD_LETTER` with the fields above
  plus :data:`F_REASON`, :data:`F_SOURCE` (the partition's stream key) and
  :data:`F_SOURCE_ID` (the entry id there).
"""

from __future__ import annotations

import zlib

PREFIX = "inkling:events"
GROUP = "inkling-workers"
DEAD_LETTER = f"{PREFIX}:dead"

F_EVENT_ID = "id"
F_EVENT = "e"
F_RECEIVED_US = "r"
F_REASON = "reason"
F_SOURCE = "source"
F_SOURCE_ID = "source_id"


def stream_key(partition: int) -> str:
    """The stream of one partition."""
    return f"{PREFIX}:{partition}"


def routing_key(user_id: str, session_id: str) -> str:
    """What an event is partitioned by: the user when known, else the session."""
    return f"u:{user_id}" if user_id else f"s:{session_id}"


def partition_of(key: str, partitions: int) -> int:
    """A stable partition for a routing key (CRC-32, the same in every process)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return zlib.crc32(key.encode()) % partitions
