"""The worker's writes on a Redis Cluster: per-key idempotent scripts for keys in any slot.

On one server a micro-batch commits in one script (`stream_worker.commit.COMMIT_BATCH`).
A cluster runs a script only over keys of one hash slot, and a batch's Feast rows and
item counters lie in arbitrary slots. So on a cluster the worker commits each
partition's part of a batch in two steps (`Worker._commit_cluster`):

1. Every key outside the partition's slot is written by a one-key (or one-slot) script
   that applies the write only if it is newer than what that key already holds from this
   partition, by stream entry id:

   - a session row (a Feast hash): `ROW_SCRIPT` keeps the last entry id applied to the
     row from partition `p` in the row's own field `_w:<p>` (Feast reads only the fields
     it asks for, so the extra field is invisible to `get_online_features`; the
     integration test checks it). The row is written, and the field set, only when the
     batch's last entry id is above the field. A row is a whole value (the session's
     state after the batch), so skipping an older write loses nothing.
   - an item's counters (increments, the hard part): `COUNTERS_SCRIPT` gets one increment
     per event with the event's entry id, and the last entry id counted from partition
     `p` (field `p` of `guard_key(row)`, in the row's slot): only increments above it
     are added, the mark moves to the newest, and the window's sums are written to the
     row (same slot: the bucket hash and the mark carry a hash tag chosen to hash to the
     row's slot, `slot_tag`). Per event, so a replay whose micro-batch boundaries differ
     from the first run's still adds each event exactly once.
   - the bandit's statistics (`BANDIT_SCRIPT`, `HINCRBYFLOAT` sums of a batch): a batch's
     additions are applied only when its first fresh entry id is above the partition's
     mark (`guard_key(stats key)`); a replayed batch at or below it adds nothing; a
     replay that straddles the mark (other batch boundaries than the first run's) adds
     nothing either, and that batch's additions beyond the mark are lost (counted in
     the worker's stats as `bandit_skipped`). Never counted twice; at most once.

2. Then the fenced partition commit: one `COMMIT_BATCH` over the partition's own keys,
   which all carry its hash tag (lease, online watermark, session states, dead-letter
   stream): it checks the lease and the watermark, then writes the states, the dead
   letters and the new watermark. Nothing of it runs when a fence fails.

A crash between the steps leaves the watermark behind: the entries are read again, the
same rows, counters and statistics are computed from the same committed states, and
step 1 finds them applied (a no-op) while step 2 commits. A worker that lost its lease
between the steps writes its rows (with entry ids the new owner will also apply, so the
owner's writes of the same entries are then skipped and its later ones go on top) and
fails at step 2; it computed them from the same committed state the new owner starts
from, so they are what the new owner would write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from redis.crc import key_slot

from inkling.feature_store.cluster import slot_tag
from stream_worker.online import COUNTERS_FUNCTION, OnlineLayout, counter_arguments
from stream_worker.state import (
    COUNTER_FEATURES,
    COUNTER_WINDOW_MINUTES,
    StreamEvent,
    event_minute,
)

GUARD_PREFIX = "inkling:worker:guard"
CLUSTER_COUNTS_PREFIX = "inkling:worker:counts"

_NEWER = """
local function newer(a, b)
  local a1, a2 = string.match(a, '^(%d+)-(%d+)$')
  local b1, b2 = string.match(b, '^(%d+)-(%d+)$')
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  return a1 > b1 or (a1 == b1 and a2 > b2)
end
"""

# KEYS: [1] the row. ARGV: [1] the guard field (_w:<p>), [2] the batch's last entry id, then
# per command on the row its word count and its words. Runs them and sets the field when
# the id is above the field's value: 1; else 0 (nothing written).
ROW_SCRIPT = (
    _NEWER
    + """
local applied = redis.call('HGET', KEYS[1], ARGV[1])
if applied and not newer(ARGV[2], applied) then return 0 end
local a = 3
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  redis.call(unpack(ARGV, a + 1, a + n))
  a = a + n + 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: [1] the guard hash, [2] the item's bucket hash, [3] its online row, [4] the item
# index set of the row's slot (all one slot). ARGV: [1] the guard field (the partition; ''
# for a refresh without increments), [2] h, [3 .. 2+h] item_counters' ARGV before its
# items (see stream_worker.online), [3+h] the item id, then per event: its entry id,
# minute, views, clicks. Adds the events above the guard, moves the guard to the newest,
# rewrites the row's sums (and indexes the item); returns the events added.
COUNTERS_SCRIPT = (
    COUNTERS_FUNCTION
    + _NEWER
    + """
local field, h = ARGV[1], tonumber(ARGV[2])
local applied = nil
if field ~= '' then applied = redis.call('HGET', KEYS[1], field) end
local args = {}
for i = 1, h do args[i] = ARGV[2 + i] end
local newest, tail, n = applied, {}, 0
for a = 4 + h, #ARGV, 4 do
  local id = ARGV[a]
  if not applied or newer(id, applied) then
    tail[#tail + 1] = ARGV[a + 1]
    tail[#tail + 1] = ARGV[a + 2]
    tail[#tail + 1] = ARGV[a + 3]
    n = n + 1
    if not newest or newer(id, newest) then newest = id end
  end
end
args[h + 1] = ARGV[3 + h]
args[h + 2] = n
for i = 1, #tail do args[h + 2 + i] = tail[i] end
item_counters({KEYS[2], KEYS[3], KEYS[4]}, args)
if field ~= '' and newest and newest ~= applied then
  redis.call('HSET', KEYS[1], field, newest)
end
if field ~= '' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5])) end
return n
"""
)

# KEYS: [1] the guard hash, [2] the statistics hash (one slot). ARGV: [1] the guard field
# (the partition), [2] the batch's first fresh entry id, [3] its last, then field, amount
# pairs. Applies the additions when [2] is above the guard: 1; at or below it with [3]
# above it (a replay that straddles the mark): -1, nothing added; else 0.
BANDIT_SCRIPT = (
    _NEWER
    + """
local applied = redis.call('HGET', KEYS[1], ARGV[1])
if applied and not newer(ARGV[2], applied) then
  if newer(ARGV[3], applied) then return -1 end
  return 0
end
for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)


def guard_key(key: bytes | str) -> bytes:
    """The hash of per-partition marks (last entry id applied) for writes to `key`, in
    `key`'s slot."""
    raw = key.encode() if isinstance(key, str) else key
    return b"%s:{%s}:%s" % (GUARD_PREFIX.encode(), slot_tag(key_slot(raw)), raw)


def cluster_counts_key(item_id: str, row_key: bytes) -> str:
    """An item's minute buckets on a cluster: in its online row's slot."""
    return f"{CLUSTER_COUNTS_PREFIX}:{{{slot_tag(key_slot(row_key)).decode()}}}:{item_id}"


def counter_events(
    events: Iterable[tuple[bytes, StreamEvent]], now_minute: int
) -> dict[str, list[tuple[bytes, int, int, int]]]:
    """Item -> per counted event (entry id, minute, views, clicks), in stream order: what
    `stream_worker.state.counter_increments` sums, kept per event."""
    oldest = now_minute - COUNTER_WINDOW_MINUTES + 1
    out: dict[str, list[tuple[bytes, int, int, int]]] = {}
    for entry_id, event in events:
        kind, item = event.event_type, event.item_id
        if kind not in COUNTER_FEATURES or item is None:
            continue
        minute = event_minute(event)
        if minute < oldest:
            continue
        views = 1 if kind == "item_view" else 0
        out.setdefault(item, []).append((entry_id, minute, views, 1 - views))
    return out


def counter_calls(
    layout: OnlineLayout,
    per_item: Mapping[str, Sequence[tuple[bytes, int, int, int]]],
    partition: int | None,
    now_minute: int,
    now_us: int,
) -> list[tuple[bytes | str | int, ...]]:
    """One `COUNTERS_SCRIPT` call (EVAL words) per item: its events counted under
    `partition`'s guard (None with no events: a refresh that only recomputes the row)."""
    calls: list[tuple[bytes | str | int, ...]] = []
    for item, events in per_item.items():
        arguments = counter_arguments(layout, {item: {}}, now_minute, now_us)
        if arguments is None:
            return []
        (_, row, index), header = arguments[0], arguments[1][:-2]  # less the item, its 0
        row_key = row if isinstance(row, bytes) else row.encode()
        field = "" if partition is None else str(partition)
        words: list[bytes | str | int] = [field, len(header), *header, item]
        for entry_id, minute, views, clicks in events:
            words += (entry_id, minute, views, clicks)
        calls.append(
            ("EVAL", COUNTERS_SCRIPT, 4, guard_key(row_key), cluster_counts_key(item, row_key),
             row_key, index, *words)
        )  # fmt: skip
    return calls


def row_field(partition: int) -> str:
    """The field of a Feast row that holds the last entry id applied from `partition`."""
    return f"_w:{partition}"


def row_calls(
    commands: Sequence[tuple[bytes | str | int, ...]], partition: int, last_id: bytes
) -> list[tuple[bytes | str | int, ...]]:
    """`ROW_SCRIPT` calls (EVAL words) for the row commands (`session_commands`): one per
    row key, its commands in order, guarded by the partition's field and `last_id`."""
    by_key: dict[bytes | str | int, list[tuple[bytes | str | int, ...]]] = {}
    for command in commands:
        by_key.setdefault(command[1], []).append(command)
    calls: list[tuple[bytes | str | int, ...]] = []
    for key, group in by_key.items():
        words: list[bytes | str | int] = [row_field(partition), last_id]
        for command in group:
            words += (len(command), *command)
        calls.append(("EVAL", ROW_SCRIPT, 1, key, *words))
    return calls


def bandit_calls(
    additions: Sequence[tuple[str, str, float]], partition: int, first: bytes, last: bytes
) -> list[tuple[bytes | str | int, ...]]:
    """`BANDIT_SCRIPT` calls (EVAL words), one per statistics hash."""
    by_key: dict[str, list[bytes | str | int]] = {}
    for key, name, amount in additions:
        by_key.setdefault(key, []).extend((name, repr(amount)))
    return [
        ("EVAL", BANDIT_SCRIPT, 2, guard_key(key), key, str(partition), first, last, *words)
        for key, words in by_key.items()
    ]
