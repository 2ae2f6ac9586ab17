"""A Spark standalone cluster on this machine: one master and N workers on loopback.

The jobs take any master (`--master spark://host:port`, or ``INKLING_SPARK_MASTER``);
this module starts a real standalone cluster with the ``spark-class`` launcher that
ships inside pyspark, for the tests that check a job gives on a cluster what it gives
on ``local[2]``, and for trying cluster settings before a real cluster. Each daemon is
a JVM of its own (``org.apache.spark.deploy.master.Master`` / ``...worker.Worker``)
bound to 127.0.0.1; its log goes to a file under the cluster's directory. The master
answers its state as JSON on its web UI port (``/json/``), which is how `start` waits
for every worker to register.

The executors share this machine's file system, so ``file://`` paths (the event log,
the feature tables) mean the same to the driver and to every executor, as a shared
volume or HDFS/S3 would on a real cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pyspark

from inkling.errors import DependencyUnavailableError
from inkling.redis_embedded import free_port

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
HOST = "127.0.0.1"


def spark_class() -> Path:
    """The ``spark-class`` launcher of the installed pyspark."""
    path = Path(pyspark.__file__).parent / "bin" / "spark-class"
    if not path.is_file():
        raise DependencyUnavailableError(f"pyspark has no launcher at {path}")
    return path


def _distinct_ports(n: int, taken: set[int]) -> list[int]:
    """`n` free loopback ports, none in `taken` and no two alike (a daemon that finds its
    port taken moves to the next one, and then is not where we look for it)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    return ports


@dataclass
class StandaloneCluster:
    """Master and workers as child processes; a context manager that stops them all.

    Args:
        directory: logs, and each worker's scratch space (``SPARK_WORKER_DIR``).
        workers: how many workers.
        cores: cores each worker offers.
        memory: memory each worker offers to executors (Spark's size syntax).
    """

    directory: Path
    workers: int = 2
    cores: int = 1
    memory: str = "1g"
    start_timeout_s: float = 120.0
    port: int = 0
    ui_port: int = 0
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env["SPARK_LOCAL_IP"] = HOST
        env["SPARK_WORKER_DIR"] = str(self.directory / "work")
        # The REST submission server listens on a fixed port (6066): off, so that two
        # clusters on one machine do not meet; applications connect to the master port.
        env["SPARK_MASTER_OPTS"] = "-Dspark.master.rest.enabled=false"
        return env

    def _launch(self, name: str, args: list[str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [str(spark_class()), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,  # a stop signals the JVM, not the launcher script only
        )
        log.close()
        self._processes.append(process)

    def state(self) -> dict[str, object]:
        """The master's state (``/json/``): its workers, cores, running applications."""
        with urllib.request.urlopen(f"http://{HOST}:{self.ui_port}/json/", timeout=2) as reply:
            state: dict[str, object] = json.load(reply)
        return state

    def start(self) -> StandaloneCluster:
        """Start the master and the workers; return once every worker is ALIVE.

        Raises:
            DependencyUnavailableError: a daemon exited, or the workers did not register
                within `start_timeout_s` (the logs' tails are in the message).
        """
        ports = _distinct_ports(2 + self.workers, {self.port, self.ui_port} - {0})
        self.port = self.port or ports.pop()
        self.ui_port = self.ui_port or ports.pop()
        self._launch(
            "master",
            [MASTER_CLASS, "--host", HOST, "--port", str(self.port),
             "--webui-port", str(self.ui_port)],
        )  # fmt: skip
        for i in range(self.workers):
            self._launch(
                f"worker-{i}",
                [WORKER_CLASS, "--host", HOST, "--cores", str(self.cores), "--memory",
                 self.memory, "--webui-port", str(ports.pop()), self.master_url],
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            dead = [p for p in self._processes if p.poll() is not None]
            if dead:
                self.stop()
                raise DependencyUnavailableError(f"a Spark daemon exited: {self._tails()}")
            try:
                workers = self.state().get("aliveworkers")
            except (OSError, ValueError):  # not listening yet, or not yet the master's page
                workers = None
            if workers == self.workers:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise DependencyUnavailableError(
                    f"{workers or 0} of {self.workers} Spark workers registered within "
                    f"{self.start_timeout_s:g} s: {self._tails()}"
                )
            time.sleep(0.5)

    def _tails(self) -> str:
        tails = []
        for log in sorted(self.directory.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-5:]
            tails.append(f"{log.name}: " + " | ".join(lines))
        return "; ".join(tails)

    def stop(self) -> None:
        """SIGTERM every daemon (workers first), SIGKILL what remains after 15 s."""
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        deadline = time.monotonic() + 15
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)
        self._processes.clear()

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
