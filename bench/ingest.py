"""Throughput of one ingest process: open-loop TrackEvents on loopback (not a test).

One redis-server (append-only file, fsync every second, as deployed), one ingest
process (a child process, 4 partitions, no consumer, backpressure off), and this
process driving ``bench.harness.loadgen.run_open_loop`` at each rate with batches of the
given size. Requests are built and serialized before the run, every event with a
fresh id (so every event is really appended), so the client spends its time
sending. A ``Health.Check`` at the same rate is the baseline of the same run.

    python -m bench.ingest --batch 100 --rates 100,200,400 --out /tmp/events-bench

Events per second = the highest sustained request rate x the batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from bench.harness.loadgen import OK, Call, LoadResult, health_check_call, run_open_loop
from bench.harness.processes import server_in_child
from bench.harness.report import machine_info, markdown_table, write_report
from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.redis_embedded import EmbeddedRedis
from inkling.serving.runtime import start_server
from inkling.v1 import event_service_pb2, resources_pb2

METHOD = "/inkling.v1.EventService/TrackEvents"


def _serve_in_child(conn: Connection, address: str, partitions: int) -> None:
    async def serve() -> None:
        es = EventsSettings(port=0, partitions=partitions, max_lag=10**9)
        running = await start_server(EventsApp(Settings(redis_address=address), es))
        conn.send(running.port)
        await running.server.wait_for_termination()

    asyncio.run(serve())


def requests(prefix: str, count: int, batch: int) -> list[bytes]:
    """`count` serialized requests of `batch` events each, every event id unique."""
    now = time.time()
    out = []
    for r in range(count):
        events = []
        for i in range(batch):
            e = resources_pb2.Event(
                event_id=f"{prefix}-{r}-{i}",
                user_id=f"user{(r * batch + i) % 5000}",
                session_id=f"sess{(r * batch + i) % 20000}",
                item_id=f"item{(r * 7 + i * 13) % 50000}",
                event_type=resources_pb2.EVENT_TYPE_CLICK,
                dwell_ms=1200,
                device="mobile",
                surface="home",
                position=i % 20,
            )
            e.timestamp.FromNanoseconds(int((now - 5) * 1e9))
            events.append(e)
        request = event_service_pb2.TrackEventsRequest(events=events)
        out.append(request.SerializeToString())
    return out


def track_call(channel: grpc.aio.Channel, prepared: list[bytes], batch: int) -> Call:
    """Send the prepared requests in turn; OK when every event was accepted."""
    send = channel.unary_unary(
        METHOD,
        request_serializer=None,
        response_deserializer=event_service_pb2.TrackEventsResponse.FromString,
    )
    position = iter(range(len(prepared)))

    async def call() -> str:
        response = await send(prepared[next(position)], timeout=10)
        return OK if response.accepted == batch else "NOT_ALL_ACCEPTED"

    return call


async def bench(
    port: int, batch: int, rates: Sequence[float], duration_s: float, warmup_s: float
) -> list[LoadResult]:
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        health = health_check_call(channel)
        for rate in rates:
            results.append(
                await run_open_loop(
                    health,
                    rate=rate,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    name=f"health.Check {rate:g}/s (baseline)",
                )
            )
            count = int(rate * (duration_s + warmup_s)) + 10
            prepared = requests(f"b{batch}-r{rate:g}-{time.time_ns()}", count, batch)
            results.append(
                await run_open_loop(
                    track_call(channel, prepared, batch),
                    rate=rate,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    name=f"TrackEvents x{batch} {rate:g}/s ({rate * batch:g} events/s)",
                )
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument(
        "--rates", default="50,100,200", help="requests per second, comma-separated"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per rate")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write report.json/.md/latency.png here")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    machine = machine_info()
    with (
        tempfile.TemporaryDirectory(prefix="events-bench-") as tmp,
        EmbeddedRedis(Path(tmp), persistent=True) as server,
        server_in_child(_serve_in_child, server.address, args.partitions) as port,
    ):
        results = asyncio.run(bench(port, args.batch, rates, args.duration, args.warmup))
    print(markdown_table(results))
    sustained = [r for r in results if r.name.startswith("TrackEvents") and r.sustained]
    best = max(sustained, key=lambda r: r.target_rate, default=None)
    if best is not None:
        print(
            f"\nhighest sustained: {best.target_rate:g} requests/s x {args.batch} = "
            f"{best.target_rate * args.batch:g} events/s (p99 {best.p99_ms:.1f} ms)"
        )
    else:
        print("\nno rate was sustained")
    if args.out is not None:
        config = {
            "batch": args.batch,
            "partitions": args.partitions,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "redis": "embedded, appendonly yes, appendfsync everysec",
        }
        paths = write_report(
            results,
            args.out,
            title=f"TrackEvents throughput, batches of {args.batch}",
            config=config,
            machine=machine,
        )
        print(f"report: {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
