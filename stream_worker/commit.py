"""The worker's commit protocol in Redis: the keys it keeps and the scripts that commit.

Per partition, an online watermark (`applied_key`: the last entry whose effects are
committed), a log watermark (`logged_key`: the last entry whose event is in the Parquet
log) and the set of log files written but not yet committed (`inflight_key`); per
routing key, the session (or visit) state (`state_key`). Every commit is one Lua
script that first checks the lease (and the watermark it started from), so a worker
that lost a partition can write nothing to it. The protocol as a whole is described
in the `stream_worker` package docstring; on a Redis Cluster the partition's keys carry
its hash tag and the keys outside its slot are written first, by the idempotent scripts
of `stream_worker.cluster_commit`.
"""

from __future__ import annotations

from inkling.events.bus import partition_of, partition_tag
from stream_worker.online import COUNTERS_FUNCTION

APPLIED_PREFIX = "inkling:worker:applied"
LOGGED_PREFIX = "inkling:worker:logged"
INFLIGHT_PREFIX = "inkling:worker:inflight"
STATE_PREFIX = "inkling:worker:state"

EntryId = tuple[int, int]

# KEYS: [1] the lease, [2] the in-flight set. ARGV: [1] token, then paths. Records the paths
# only while token holds the lease.
REGISTER_INFLIGHT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
return 1
"""


# KEYS: [1] the lease, [2] the log watermark, [3] the in-flight set, [4] the stream.
# ARGV: [1] token, [2] the watermark the flush started from ('' for none), [3] the new
# watermark, [4] the group, then the entry ids to acknowledge. Commits a log flush only
# while token holds the lease and nobody moved the watermark: 1, else 0 (nothing done).
COMMIT_LOG = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
for i = 5, #ARGV, 1000 do
  redis.call('XACK', KEYS[4], ARGV[4], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
"""


# KEYS: the fences (f), then the item counters' keys (k). ARGV: [1] f, [2] k, [3] m, the
# fences' expected values ('' for none), the counters' m arguments, then per command its
# word count and its words. A micro-batch's commit: when every fence holds, runs the
# commands and the counter update (see stream_worker.online) and returns 1; else 0.
COMMIT_BATCH = (
    COUNTERS_FUNCTION
    + """
local f, k, m = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, f do
  if (redis.call('GET', KEYS[i]) or '') ~= ARGV[3 + i] then return 0 end
end
local a = 4 + f + m
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  redis.call(unpack(ARGV, a + 1, a + n))
  a = a + n + 1
end
if k > 0 then
  local keys, args = {}, {}
  for i = 1, k do keys[i] = KEYS[f + i] end
  for i = 1, m do args[i] = ARGV[3 + f + i] end
  item_counters(keys, args)
end
return 1
"""
)


def _part(partition: int, cluster: bool) -> str:
    return partition_tag(partition) if cluster else str(partition)


def applied_key(partition: int, cluster: bool = False) -> str:
    """The partition's watermark: the id of the last entry whose effects are committed
    (in cluster mode, with the partition's hash tag, as every key of the partition)."""
    return f"{APPLIED_PREFIX}:{_part(partition, cluster)}"


def logged_key(partition: int, cluster: bool = False) -> str:
    """The partition's log watermark: the last entry whose event is in the Parquet log."""
    return f"{LOGGED_PREFIX}:{_part(partition, cluster)}"


def inflight_key(partition: int, cluster: bool = False) -> str:
    """Event log files written for the partition's batch that has not committed yet."""
    return f"{INFLIGHT_PREFIX}:{_part(partition, cluster)}"


def state_key(key: str, partitions: int | None = None) -> str:
    """Where the session (or visit) state of a routing key is kept. `partitions` (cluster
    mode: the bus's number of partitions) puts it in its partition's slot, behind the
    partition's hash tag, so the partition's commit script can write it."""
    if partitions is None:
        return f"{STATE_PREFIX}:{key}"
    return f"{STATE_PREFIX}:{partition_tag(partition_of(key, partitions))}:{key}"


def parse_id(value: bytes | str) -> EntryId:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class CommitError(RuntimeError):
    """A command inside the commit transaction failed (the others were applied)."""
