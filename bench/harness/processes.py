"""The process launcher: inkling's own processes started as a deployment runs them.

Servers and workers run as `python -m inkling.cli ...` children on one `Settings`, so a
benchmark measures the real processes over loopback, never an in-process stand-in;
each child is stopped (SIGTERM, then SIGKILL) when its block ends, and its output goes
to a log file under the data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inkling.config import PROJECT_ROOT, Settings
from inkling.serving.security import open_channel


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with `settings` (data dir, feature repo, Redis) and
    `extra` as `INKLING_*` variables, for a child that loads its settings itself."""
    return {
        **os.environ,
        "INKLING_DATA_DIR": str(settings.data_dir),
        "INKLING_FEATURE_REPO": str(settings.feature_repo),
        "INKLING_REDIS_ADDRESS": settings.redis_address or "",
        **extra,
    }


def spawn(
    argv: Sequence[str], env: Mapping[str, str], log: Path, append: bool = False
) -> subprocess.Popen[bytes]:
    """`python <argv>` from the project root, stdout and stderr into `log`."""
    with log.open("ab" if append else "wb") as out:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=PROJECT_ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


@contextlib.contextmanager
def cli_process(
    settings: Settings,
    log_name: str,
    *argv: str,
    stop_timeout_s: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`inkling <argv>` as its own process on `settings` (and `env` added to its
    environment), until the block ends (SIGTERM, then SIGKILL after `stop_timeout_s`);
    its output goes to `<data_dir>/bench-<log_name>.log`. Yields the process."""
    log = settings.data_dir / f"bench-{log_name}.log"
    proc = spawn(["-m", "inkling.cli", *argv], child_env(settings, **(env or {})), log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def server_process(
    role: str, settings: Settings, port: int, *extra: str, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`inkling serve <role>` as its own process, until the block ends (SIGTERM)."""
    return cli_process(settings, role, "serve", role, "--port", str(port), *extra, env=env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (Linux `/proc`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_serving(
    port: int, timeout_s: float = 300, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Until the server on `port` reports SERVING (`credentials`: over TLS)."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(f"127.0.0.1:{port}", credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the server on port {port} did not report SERVING in {timeout_s:.0f}s")


@dataclass(frozen=True)
class Workers:
    """Stream worker processes a benchmark started."""

    addresses: list[str]
    """Their `/metrics` addresses."""
    pids: list[int]


@contextlib.contextmanager
def worker_processes(settings: Settings, count: int, partitions: int) -> Iterator[Workers]:
    """`count` `inkling worker` processes, until the block ends (SIGTERM; a worker flushes
    its log before it exits, so it gets longer than the servers). They share the
    partitions through their leases; each serves `/metrics` on a free port."""
    from inkling.redis_embedded import free_port

    with contextlib.ExitStack() as stack:
        workers = Workers([], [])
        for n in range(count):
            name = f"worker{n}" if count > 1 else "worker"
            port = free_port()
            argv = ("worker", "--partitions", str(partitions), "--metrics-port", str(port))
            proc = stack.enter_context(cli_process(settings, name, *argv, stop_timeout_s=60.0))
            workers.addresses.append(f"127.0.0.1:{port}")
            workers.pids.append(proc.pid)
        yield workers


@contextlib.contextmanager
def server_in_child(
    serve: Callable[..., None], *args: Any, start_timeout_s: float = 60.0
) -> Iterator[int]:
    """A server run by `serve(conn, *args)` in a spawned child; yields the port it sends.

    `serve` must be a module-level function (spawn pickles it) that starts its server,
    sends the bound port through `conn` and serves until it is terminated. The child is
    terminated when the block ends.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(child, *args), daemon=True)
    process.start()
    try:
        if not parent.poll(start_timeout_s):
            raise RuntimeError(f"the server did not start within {start_timeout_s:.0f} s")
        yield int(parent.recv())
    finally:
        process.terminate()
        process.join(10)
