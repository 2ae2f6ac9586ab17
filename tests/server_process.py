"""A server in a process of its own, for tests that measure what the server holds.

The fuzz tests send payloads of up to 8 MiB; measured in the test's own process, the
client's copies and the servers' buffers are one number. Here the server runs in a
spawned child (a fresh interpreter: gRPC does not survive a fork), so its resident
memory (`rss_mib(pid)`) is the server's alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any, Literal

from inkling.config import Settings

Kind = Literal["events", "retrieval", "ranking"]
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServerProcess:
    pid: int
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        return rss_mib(self.pid)


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory (``/proc/<pid>/statm``), MiB."""
    with open(f"/proc/{pid}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _app(kind: Kind, settings: Settings, server_settings: Any) -> Any:
    if kind == "events":
        from events_server.app import EventsApp

        return EventsApp(settings, server_settings)
    if kind == "retrieval":
        from retrieval_server.app import RetrievalApp

        return RetrievalApp(settings, server_settings)
    from ranking_server.app import RankingApp

    return RankingApp(settings, server_settings)


def _serve(kind: Kind, settings: Settings, server_settings: Any, conn: Connection) -> None:
    from inkling.serving.runtime import start_server

    settings.export_env()

    async def main() -> None:
        running = await start_server(_app(kind, settings, server_settings), port=0, grace_s=1)
        conn.send(running.port)
        await asyncio.to_thread(conn.recv)  # the parent's "stop"
        await running.stop()

    asyncio.run(main())


@contextmanager
def server_process(kind: Kind, settings: Settings, server_settings: Any) -> Iterator[ServerProcess]:
    """Start `kind`'s server on a free loopback port in a child process; stop it after."""
    context = get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_serve, args=(kind, settings, server_settings, child), daemon=True
    )
    process.start()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise AssertionError(f"the {kind} server did not start within {START_TIMEOUT_S:g} s")
        assert process.pid is not None
        yield ServerProcess(process.pid, int(parent.recv()))
    finally:
        if process.is_alive():
            with suppress(OSError):
                parent.send("stop")
            process.join(30)
        if process.is_alive():
            process.kill()
            process.join(5)
