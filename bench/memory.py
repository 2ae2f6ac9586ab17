"""Memory and size for `inkling bench serving`: what a row costs in Redis, what each
process holds, and what the item snapshot costs to build, to refresh and to keep.

- Redis: `MEMORY USAGE key SAMPLES 0` (every field counted) over a seeded sample of each
  entity's keys, times the entity's row count, beside the server's own `used_memory`.
- Processes: resident set (VmRSS) and its peak (VmHWM) from `/proc/<pid>/status`,
  read after a variant's scenarios ran, so the snapshot, the models and the gRPC
  buffers of a warm server are all in it.
- Snapshot: built in this process against the benchmark's Redis: a full build, then a
  refresh when nothing changed (`refresh_item_snapshot`), each as wall and CPU seconds,
  and the bytes the snapshot holds (`ItemSnapshot.nbytes`).
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from inkling.config import Settings
from inkling.events.bus import sync_client
from inkling.feature_store import feast_codec
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.rows import open_async_redis
from inkling.feature_store.snapshot import build_item_snapshot, refresh_item_snapshot

MB = 1 << 20


@dataclass
class MemoryTable:
    """Rows of the memory table: Redis per entity, processes, snapshots."""

    redis: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            "Memory and size (`bench.memory`):",
            "",
            "| Redis rows | rows | bytes per row (mean of a sample) | total MB |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in self.redis:
            lines.append(
                f"| {r['entity']} | {r['rows']:,} | {r['bytes_per_row']:,.0f} "
                f"| {r['total_mb']:,.1f} |"
            )
        lines += [
            "",
            "| process | RSS MB | peak RSS MB |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| {p['process']} | {p['rss_mb']:,.0f} | {p['peak_mb']:,.0f} |" for p in self.processes
        ]
        lines += [
            "",
            "| item snapshot | items | full build s (CPU s) | refresh, nothing changed s "
            "(CPU s) | MB held |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {s['service']} | {s['items']:,} | {s['build_s']:.2f} ({s['build_cpu_s']:.2f}) "
            f"| {s['refresh_s']:.2f} ({s['refresh_cpu_s']:.2f}) | {s['mb']:,.1f} |"
            for s in self.snapshots
        ]
        return "\n".join(lines)


def redis_rows(
    live: Settings, entities: Mapping[str, Sequence[str]], sample: int = 500, seed: int = 0
) -> list[dict[str, Any]]:
    """Per join key (`entities`: join key -> every id the features hold), the mean bytes
    of a row in Redis over up to `sample` seeded keys, and that times the row count;
    then the server's whole `used_memory` as one more row."""
    if live.redis_address is None:
        raise ValueError("redis_rows needs the Redis the benchmark materialized into")
    client = sync_client(live.redis_address)
    project = open_store(live).project
    rng = random.Random(seed)
    out = []
    try:
        for join_key, ids in entities.items():
            chosen = rng.sample(list(ids), min(sample, len(ids)))
            keys = feast_codec.entity_keys(join_key, chosen, project)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
            sizes = [s for s in pipe.execute() if s is not None]
            mean = sum(sizes) / len(sizes) if sizes else 0.0
            out.append(
                {
                    "entity": join_key,
                    "rows": len(ids),
                    "sampled": len(sizes),
                    "bytes_per_row": mean,
                    "total_mb": mean * len(ids) / MB,
                }
            )
        used = int(cast(dict[str, Any], client.info("memory"))["used_memory"])
        n_keys = int(cast(int, client.dbsize()))
        out.append(
            {
                "entity": "(the whole server: used_memory, every key)",
                "rows": n_keys,
                "sampled": 0,
                "bytes_per_row": used / max(n_keys, 1),
                "total_mb": used / MB,
            }
        )
    finally:
        client.close()
    return out


def redis_pid(live: Settings) -> int:
    """The process id of the Redis server at `live.redis_address` (from INFO)."""
    if live.redis_address is None:
        raise ValueError("redis_pid needs a Redis address")
    client = sync_client(live.redis_address)
    try:
        return int(cast(dict[str, Any], client.info("server"))["process_id"])
    finally:
        client.close()


def process_memory(name: str, pid: int | None = None) -> dict[str, Any]:
    """RSS and peak RSS of `pid` (this process when None), in MB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    kb = {
        line.split(":")[0]: int(line.split()[1])
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    return {
        "process": name,
        "pid": pid,
        "rss_mb": kb.get("VmRSS", 0) / 1024,
        "peak_mb": kb.get("VmHWM", 0) / 1024,
    }


async def snapshot_costs(live: Settings, service: str) -> dict[str, Any]:
    """A full build of `service`'s item snapshot and a refresh with nothing changed."""
    store = open_store(live)
    columns = resolve_service(store, service)
    client = await open_async_redis(store)
    try:
        wall, cpu = time.perf_counter(), _cpu_s()
        snapshot = await build_item_snapshot(client, columns)
        build_s, build_cpu_s = time.perf_counter() - wall, _cpu_s() - cpu
        wall, cpu = time.perf_counter(), _cpu_s()
        refreshed = await refresh_item_snapshot(client, snapshot)
        refresh_s, refresh_cpu_s = time.perf_counter() - wall, _cpu_s() - cpu
    finally:
        await client.aclose()
    return {
        "service": service,
        "items": snapshot.n_items,
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "refresh_s": refresh_s,
        "refresh_cpu_s": refresh_cpu_s,
        "refresh_rows_read": refreshed.rows_read,
        "mb": snapshot.nbytes() / MB,
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
