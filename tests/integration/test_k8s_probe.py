"""The production overlay's exec probe (deploy/k8s/overlays/production/grpc_health_check.py)
against a real inkling server speaking TLS, run as the kubelet runs it: a process whose
exit status decides. NOT_SERVING while the app loads is a failure, SERVING a success;
a certificate the CA did not sign, or a name it was not issued for, fails the check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from inkling.config import PROJECT_ROOT
from inkling.serving.certs import Authority
from inkling.serving.runtime import Running, start_server
from inkling.serving.security import SecuritySettings

PROBE = PROJECT_ROOT / "deploy" / "k8s" / "overlays" / "production" / "grpc_health_check.py"
SERVICE = "inkling.v1.RankingService"
NAME = "inkling-ranking"


class LoadingApp:
    """An app that stays loading until `loaded` is set (the health service says
    NOT_SERVING meanwhile), as a ranking server does while it builds its snapshot."""

    service_names: Sequence[str] = (SERVICE,)

    def __init__(self) -> None:
        self.loaded = asyncio.Event()

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self) -> None:
        await self.loaded.wait()

    async def close(self) -> None:
        pass


class Server:
    """start_server on its own event loop thread, so the probe can run meanwhile."""

    def __init__(self, security: SecuritySettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app: LoadingApp = self.call(self._make_app)
        self.port_ready: Future[int] = Future()
        self.running: Future[Running] = asyncio.run_coroutine_threadsafe(
            start_server(
                self.app, port=0, grace_s=1, security=security,
                on_bound=self.port_ready.set_result,
            ),
            self.loop,
        )  # fmt: skip

    def call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    @staticmethod
    def _make_app() -> LoadingApp:
        return LoadingApp()

    def finish_loading(self) -> None:
        self.call(self.app.loaded.set)
        self.running.result(timeout=10)

    def stop(self) -> None:
        self.call(self.app.loaded.set)  # a server still loading finishes, then stops
        running = self.running.result(timeout=10)
        asyncio.run_coroutine_threadsafe(running.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = Authority.create(tmp_path / "ca")
    other = Authority.create(tmp_path / "other", name="someone else's CA")
    return {"ca": ca, "other": other, "server": ca.issue(tmp_path / "server", NAME)}


@pytest.fixture
def server(pki: dict[str, Any]) -> Iterator[Server]:
    issued = pki["server"]
    running = Server(SecuritySettings(cert_file=issued.cert_file, key_file=issued.key_file))
    try:
        yield running
    finally:
        running.stop()


def probe(port: int, ca_file: Path, server_name: str = NAME, service: str = SERVICE) -> int:
    out = subprocess.run(
        [sys.executable, str(PROBE), "--port", str(port), "--service", service,
         "--ca-file", str(ca_file), "--server-name", server_name, "--timeout-s", "5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.returncode


def test_the_probe_fails_while_loading_and_passes_once_serving(
    server: Server, pki: dict[str, Any]
) -> None:
    port = server.port_ready.result(timeout=30)
    assert probe(port, pki["ca"].cert_file) == 1  # NOT_SERVING: the app is loading
    server.finish_loading()
    assert probe(port, pki["ca"].cert_file) == 0
    assert probe(port, pki["ca"].cert_file, service="") == 0


def test_the_probe_checks_the_certificate(server: Server, pki: dict[str, Any]) -> None:
    port = server.port_ready.result(timeout=30)
    server.finish_loading()
    assert probe(port, pki["other"].cert_file) == 2  # not signed by the CA it trusts
    assert probe(port, pki["ca"].cert_file, server_name="inkling-elsewhere") == 2


def test_the_probe_fails_on_an_unknown_service(server: Server, pki: dict[str, Any]) -> None:
    port = server.port_ready.result(timeout=30)
    server.finish_loading()
    assert probe(port, pki["ca"].cert_file, service="inkling.v1.NoSuchService") == 2
