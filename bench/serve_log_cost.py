"""What recording every answer costs `Recommend`: part of `inkling bench serving`.

One retrieval server and two ranking servers run at once, as deployed (the registry's
models): one records every answer in the serve log (the default), the other has
`[ranking] serve_log = false`. The same `Recommend(num_results=20)` requests go
open-loop at `--rate` to each in turn for `--rounds` rounds, the order alternating per
round so that drift on a shared machine hits both alike. Reported per side: the medians
over rounds of p50 and p99, the p99 difference, both ranking servers' CPU per request,
and what the recording side did with its records: appended and dropped as it counted
them (`inkling.serve_log.*` on its `/metrics`) and the serve entries actually on the bus.

No stream worker runs: the records stay on the bus, and what writing them to Parquet
costs is the workers' (`inkling bench freshness`), on their own machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import cast

import grpc

from bench.harness.loadgen import LoadResult, run_open_loop
from bench.harness.processes import cli_process, cpu_seconds, wait_serving
from bench.harness.report import sides_table
from bench.harness.scrape import scrape_samples
from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.events import bus
from inkling.redis_embedded import free_port
from inkling.v1 import ranking_service_pb2_grpc

SIDES = ("serve log on", "serve log off")


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SideRun:
    side: str
    round: int
    load: LoadResult
    cpu_ms_per_request: float


@dataclass(frozen=True)
class ServeLogCost:
    runs: list[SideRun]
    requests: int
    """Recommend calls the recording server answered (warm-up included)."""
    appended: float
    dropped: dict[str, float]
    on_bus: int
    """Serve entries the runs added to the bus's streams."""

    def markdown(self) -> str:
        lines = [
            "Serve log overhead on Recommend(20): two ranking servers at once, the same "
            "requests to each in turn, medians over rounds (`bench.serve_log_cost`):",
            "",
        ]
        table, p99s, _ = sides_table(
            "ranking server", SIDES, self.runs, "ranking CPU ms/req", lambda r: r.cpu_ms_per_request
        )
        lines += table
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.dropped.items())) or "none"
        lines += [
            "",
            f"p99 with the serve log minus without: "
            f"{p99s[SIDES[0]] - p99s[SIDES[1]]:+.2f} ms (the issue allows +0.5 ms). "
            f"The recording server answered {self.requests:,} Recommends, appended "
            f"{self.appended:,.0f} serve records and dropped {dropped}; the bus gained "
            f"{self.on_bus:,} serve entries.",
        ]
        return "\n".join(lines)


def _count_on_bus(settings: Settings) -> int:
    client = bus.sync_client(settings.redis_address or "")
    try:
        partitions = int(cast(bytes | None, client.get(bus.PARTITIONS_KEY)) or 4)
        return sum(1 for p in range(partitions) for e in bus.read_partition(client, p) if e.serve)
    finally:
        client.close()


def run_serve_log_cost(
    live: Settings, *, rate: float, duration_s: float, rounds: int, seed: int = 0
) -> ServeLogCost:
    """The comparison above, on the servers `live` describes (its Redis, its registry)."""
    from bench.servers import Workload

    if rounds < 1:
        raise InvalidInputError(f"--rounds must be at least 1, got {rounds}")
    ports = {name: free_port() for name in ("retrieval", "on", "off", "on_metrics", "off_metrics")}
    retrieval = f"127.0.0.1:{ports['retrieval']}"

    def ranking(
        side: str, serve_log: str
    ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        return cli_process(
            live, f"ranking-serve-log-{side}", "serve", "ranking", "--port", str(ports[side]),
            "--retrieval-address", retrieval, "--metrics-port", str(ports[f"{side}_metrics"]),
            env={"INKLING_RANKING_SERVE_LOG": serve_log},
        )  # fmt: skip

    runs: list[SideRun] = []
    on_bus_before = _count_on_bus(live)
    with (
        cli_process(live, "retrieval-serve-log", "serve", "retrieval", "--port",
                    str(ports["retrieval"]), "--metrics-port", "0"),
        ranking("on", "true") as on,
        ranking("off", "false") as off,
    ):  # fmt: skip
        for port in (ports["retrieval"], ports["on"], ports["off"]):
            asyncio.run(wait_serving(port))
        pids = {SIDES[0]: on.pid, SIDES[1]: off.pid}
        port_of = {SIDES[0]: ports["on"], SIDES[1]: ports["off"]}

        async def drive(side: str, round_: int) -> SideRun:
            work = Workload(live, seed + round_)  # both sides get the same requests
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of[side]}") as channel:
                call = work.recommend(ranking_service_pb2_grpc.RankingServiceStub(channel))
                if round_ == 0:  # first calls load lazily: outside every measurement
                    await run_open_loop(call, rate=rate, duration_s=2, name="warm")
                before = cpu_seconds(pids[side])
                load = await run_open_loop(
                    call, rate=rate, duration_s=duration_s, name=f"recommend_20 ({side})"
                )
                used = cpu_seconds(pids[side]) - before
                sent = load.count + round(rate * load.warmup_s)
                return SideRun(side, round_, load, used * 1000 / max(sent, 1))

        for round_ in range(rounds):
            order = SIDES if round_ % 2 == 0 else SIDES[::-1]
            for side in order:
                _progress(f"serve log cost: {side}, round {round_ + 1} of {rounds}")
                runs.append(asyncio.run(drive(side, round_)))
        # The last answers may still be queued: wait (briefly) until every one is accounted for.
        deadline = time.monotonic() + 10
        while True:
            requests, appended, dropped = _records(f"127.0.0.1:{ports['on_metrics']}")
            if appended + sum(dropped.values()) >= requests or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return ServeLogCost(runs, requests, appended, dropped, _count_on_bus(live) - on_bus_before)


def _records(address: str) -> tuple[int, float, dict[str, float]]:
    """Recommends answered, serve records appended, and dropped by reason, as one ranking
    server counted them."""
    samples = scrape_samples(
        [address],
        "inkling_serve_log_appended_total",
        "inkling_serve_log_dropped_total",
        "rpc_server_call_duration_seconds_count",
    )
    appended = sum(v for n, _, v in samples if n == "inkling_serve_log_appended_total")
    dropped: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "inkling_serve_log_dropped_total":
            dropped[labels.get("reason", "")] = dropped.get(labels.get("reason", ""), 0) + value
    requests = sum(
        v
        for n, labels, v in samples
        if n == "rpc_server_call_duration_seconds_count"
        and labels.get("rpc_method") == "inkling.v1.RankingService/Recommend"
    )
    return int(requests), appended, dropped


def handoff_costs(address: str, n: int = 20_000) -> dict[str, float]:
    """In-process µs per answer of each part of recording it, against the Redis at
    `address`: the hand-off the request path pays (`ServeLogger.log`), building and
    serializing the record, and the bus append per record at batch sizes 1, 16 and 64
    (process CPU, not wall time: what the ranking server's core spends)."""
    import numpy as np

    from inkling.events.bus import BusServe, EventBus, async_client, routing_key
    from inkling.serving.serve_logger import Served, ServeLogger, serve_record
    from inkling.v1 import resources_pb2

    served = Served(
        request_id="0" * 32, served_us=time.time_ns() // 1000, operation="recommend",
        user_id="u1", session_id="s1", surface="home",
        item_ids=[f"item-{i}" for i in range(20)],
        scores=np.linspace(1, 0, 20, dtype=np.float32),
        sources=np.full(20, resources_pb2.CANDIDATE_SOURCE_ANN, np.int32), propensities=None,
        model_version="ranker:v1", index_version="idx", feature_service="ranker_v1",
        experiment="", arm="", degraded=[],
    )  # fmt: skip
    out: dict[str, float] = {}

    async def measure() -> None:
        client = async_client(address, retries=0)
        bus = EventBus(client, 4)
        logger = ServeLogger(bus, max_queue=n + 1, max_batch=256)
        await logger.start()
        began = time.process_time()
        for _ in range(n):  # no await: the writer task cannot run meanwhile
            logger.log(served)
        out["handoff_us"] = (time.process_time() - began) / n * 1e6
        await logger.close(timeout_s=60)
        began = time.process_time()
        for _ in range(n // 4):
            serve_record(served).SerializeToString()
        out["build_us"] = (time.process_time() - began) / (n // 4) * 1e6
        payload = serve_record(served).SerializeToString()
        record = BusServe("0" * 32, routing_key("u1", "s1"), payload)
        for batch in (1, 16, 64):
            calls = max(20, 2_000 // batch)
            began = time.process_time()
            for _ in range(calls):
                await bus.append_serves([record] * batch, time.time_ns() // 1000)
            out[f"append_us_per_record_batch_{batch}"] = (
                (time.process_time() - began) / (calls * batch) * 1e6
            )
        await client.aclose()

    asyncio.run(measure())
    return out


if __name__ == "__main__":
    import json
    import tempfile
    from pathlib import Path

    from inkling.redis_embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), persistent=False) as server:
        print(json.dumps(handoff_costs(server.address), indent=1))
