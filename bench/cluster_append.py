"""What `wait_replicas` costs an append on a Redis Cluster: `python -m bench.cluster_append`.

Starts a local cluster (three masters, three replicas, append-only files, on loopback;
`inkling.redis_cluster`), then appends batches of 10 events (200-byte payloads, users
spread over 4 partitions) through `EventBus` one after the other, with `wait_replicas`
0 and 1 in turn, `--rounds` times each, and prints the latency percentiles per run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from inkling.events.bus import BusEvent, EventBus, async_client, routing_key
from inkling.redis_cluster import LocalRedisCluster


async def _run(address: str, wait: int, batches: int, tag: str) -> list[float]:
    client = async_client(address, cluster=True)
    bus = EventBus(client, 4, wait_replicas=wait)
    await bus.ensure_streams()
    latencies = []
    try:
        for k in range(batches):
            batch = [
                BusEvent(f"{tag}-{k}-{i}", routing_key(f"u{(k * 10 + i) % 97}", "s"), b"x" * 200)
                for i in range(10)
            ]
            started = time.perf_counter()
            await bus.append(batch, 1)
            latencies.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    latencies.sort()
    return [round(1000 * latencies[int(len(latencies) * q)], 2) for q in (0.5, 0.9, 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with LocalRedisCluster(Path(tempfile.mkdtemp(prefix="cluster-append-"))) as cluster:
        for r in range(args.rounds):
            for wait in (0, 1):
                p50, p90, p99 = asyncio.run(
                    _run(cluster.address, wait, args.batches, f"r{r}w{wait}")
                )
                print(f"round {r} wait_replicas={wait}: p50 {p50} ms, p90 {p90} ms, p99 {p99} ms")


if __name__ == "__main__":
    main()
