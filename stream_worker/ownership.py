"""Partition ownership: leases, heartbeats and a fair share (see the package docstring).

Keys (the bus's Redis; on a Redis Cluster each lease carries its partition's hash tag,
`inkling:worker:lease:{p<n>}`, and a renewal or release runs per lease):

- `inkling:worker:members`: sorted set, worker id -> heartbeat expiry (ms). Live
  workers are the members whose expiry is in the future.
- `inkling:worker:lease:<p>`: the owner's worker id, set with `NX PX` and renewed by
  compare-and-`PEXPIRE`; released by compare-and-`DEL`.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, cast

import redis

from inkling.events.bus import is_cluster, partition_tag

MEMBERS = "inkling:worker:members"
LEASE_PREFIX = "inkling:worker:lease"

# KEYS: leases. ARGV: [1] token, [2] ttl ms. Renews the leases still held by token; returns
# 1 or 0 per lease.
_RENEW = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: leases. ARGV: [1] token. Deletes the leases still held by token.
_RELEASE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""


def lease_key(partition: int, cluster: bool = False) -> str:
    """The partition's lease (in cluster mode with the partition's hash tag)."""
    return f"{LEASE_PREFIX}:{partition_tag(partition) if cluster else partition}"


def fair_share(partitions: int, live_workers: int) -> int:
    """How many partitions one worker should own: ceil(partitions / live workers)."""
    return math.ceil(partitions / max(1, live_workers))


def preference(worker_id: str, partitions: int) -> list[int]:
    """The order in which a worker tries free partitions: from a hash of its id, so
    workers starting together reach for different ones first."""
    start = zlib.crc32(worker_id.encode()) % partitions
    return [(start + i) % partitions for i in range(partitions)]


class Leases:
    """One worker's heartbeat and partition leases."""

    def __init__(self, client: redis.Redis, worker_id: str, ttl_ms: int) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self.worker_id = worker_id
        self.ttl_ms = ttl_ms
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def heartbeat(self, now_ms: int) -> int:
        """Announce this worker alive for a lease TTL; the number of live workers."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(MEMBERS, {self.worker_id: now_ms + self.ttl_ms})
        pipe.zremrangebyscore(MEMBERS, "-inf", now_ms)
        pipe.zcard(MEMBERS)
        return int(pipe.execute()[-1])

    def live_workers(self, now_ms: int) -> set[str]:
        members = cast(list[Any], self.client.zrangebyscore(MEMBERS, now_ms, "+inf"))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def leave(self) -> None:
        self.client.zrem(MEMBERS, self.worker_id)

    def try_acquire(self, partition: int) -> bool:
        key = lease_key(partition, self.cluster)
        return bool(self.client.set(key, self.worker_id, nx=True, px=self.ttl_ms))

    def renew(self, partitions: list[int]) -> list[int]:
        """Renew the leases of `partitions`; the ones no longer held (lost). On a cluster,
        one script per lease (each in its partition's slot)."""
        if not partitions:
            return []
        args: list[str | int] = [self.worker_id, self.ttl_ms]
        if self.cluster:
            held = [
                cast(list[int], self._renew(keys=[lease_key(p, True)], args=args))[0]
                for p in partitions
            ]
        else:
            held = cast(list[int], self._renew(keys=[lease_key(p) for p in partitions], args=args))
        return [p for p, ok in zip(partitions, held, strict=True) if not ok]

    def release(self, partitions: list[int]) -> int:
        if not partitions:
            return 0
        if self.cluster:
            return sum(
                int(cast(int, self._release(keys=[lease_key(p, True)], args=[self.worker_id])))
                for p in partitions
            )
        return int(
            cast(int, self._release(keys=[lease_key(p) for p in partitions], args=[self.worker_id]))
        )

    def owner(self, partition: int) -> str | None:
        value = self.client.get(lease_key(partition, self.cluster))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
