"""Open-loop load against a real grpc.aio health server on loopback, then the report."""

from __future__ import annotations

import asyncio
import json
import struct

import grpc

from bench.harness.loadgen import LoadResult, health_check_call, run_open_loop, start_health_server
from bench.harness.report import machine_info, write_report


async def _bench() -> tuple[LoadResult, LoadResult]:
    server, port = await start_health_server("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=5)
            serving = await run_open_loop(
                health_check_call(channel),
                rate=200,
                duration_s=1.0,
                warmup_s=0.1,
                name="health.Check",
            )
            # The health service answers NOT_FOUND for a service it does not know.
            unknown = await run_open_loop(
                health_check_call(channel, service="no.such.Service"),
                rate=50,
                duration_s=0.2,
                warmup_s=0,
                name="health.Check unknown",
            )
    finally:
        await server.stop(grace=None)
    return serving, unknown


def test_health_check_open_loop_and_report(tmp_path):
    serving, unknown = asyncio.run(_bench())

    assert serving.count == 200
    assert serving.errors == {}
    assert serving.ok == 200
    assert 150 <= serving.throughput <= 200 * (1 + 1e-9)
    assert 0 < serving.service_p50_ms <= serving.p50_ms <= serving.p99_ms <= serving.max_ms
    assert serving.p50_ms < 250  # loopback on a shared 2-core machine: loose but finite

    assert unknown.errors == {"NOT_FOUND": 10}
    assert unknown.ok == 0

    config = {"rpc": "grpc.health.v1.Health/Check", "rate": 200}
    paths = write_report(
        [serving, unknown],
        tmp_path / "report",
        title="health baseline",
        config=config,
        machine=machine_info(),
        notes=["test run"],
    )
    assert set(paths) == {"json", "markdown", "plot"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())

    document = json.loads(paths["json"].read_text())
    assert set(document) == {"title", "created_at", "config", "machine", "notes", "scenarios"}
    assert document["config"] == config
    assert document["notes"] == ["test run"]
    assert [s["name"] for s in document["scenarios"]] == ["health.Check", "health.Check unknown"]
    first = document["scenarios"][0]
    for key in ("target_rate", "throughput", "count", "errors", "p50_ms", "p95_ms", "p99_ms"):
        assert key in first
    assert first["p99_ms"] == serving.p99_ms
    assert first["errors"] == {}
    assert first["sustained"] == serving.sustained

    markdown = paths["markdown"].read_text()
    assert "| health.Check | 200 | " in markdown
    assert "NOT_FOUND: 10" in markdown
    assert "latency.png" in markdown

    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 600
