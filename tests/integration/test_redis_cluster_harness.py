"""The local Redis Cluster harness: three masters and three replicas on loopback form a
healthy cluster, and a killed master is replaced by its replica with what it had
replicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from inkling.errors import ConfigurationError
from inkling.redis_cluster import SLOTS, LocalRedisCluster, slot_ranges


def test_slot_ranges_cover_every_slot_once() -> None:
    ranges = slot_ranges(3)
    assert [len(r) for r in ranges] == [5461, 5461, 5462]
    assert sorted(s for r in ranges for s in r) == list(range(SLOTS))
    with pytest.raises(ConfigurationError, match="at least one master"):
        slot_ranges(0)


def test_three_masters_three_replicas_and_a_failover(tmp_path: Path) -> None:
    with LocalRedisCluster(tmp_path, masters=3, replicas=1) as cluster:
        views = [cluster.cluster_nodes(i) for i in range(6)]
        assert all(len(view) == 6 for view in views)
        masters = [n for n in views[0] if n.is_master]
        assert len(masters) == 3
        assert sorted(s for m in masters for r in m.slots for s in r) == list(range(SLOTS))
        assert sum(1 for n in views[0] if not n.is_master and n.master_id) == 3

        client = cluster.client()
        keys = [f"user:{i}" for i in range(300)]
        for i, key in enumerate(keys):
            client.set(key, i)
        # Every master holds some of them: the keys really are spread over the slots.
        owners = {cluster.master_index(key) for key in keys}
        assert owners == {0, 1, 2}
        victim = cluster.master_index(keys[0])
        # WAIT: the victim's replica acknowledged every write, so nothing may be lost.
        with cluster.node_client(victim) as node:
            assert node.execute_command("WAIT", 1, 5000) == 1
        cluster.kill(victim)
        promoted = cluster.wait_for_failover(victim)
        assert promoted not in (0, 1, 2)
        assert cluster.master_index(keys[0]) == promoted
        client.close()
        after = cluster.client()
        assert [int(after.get(key)) for key in keys] == list(range(300))
        after.close()
