"""The item index's keys on a Redis Cluster and the parsing of a cluster address."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from inkling.errors import ConfigurationError
from inkling.feature_store import feast_codec
from inkling.feature_store.cluster import (
    SLOTS,
    item_index_key,
    item_index_key_of,
    item_index_keys,
    startup_nodes,
    sync_cluster_client,
)


def test_every_slots_index_set_lies_in_that_slot() -> None:
    keys = item_index_keys("inkling", "item_id")
    assert len(keys) == len(set(keys)) == SLOTS
    assert [key_slot(k) for k in keys] == list(range(SLOTS))
    assert item_index_key("inkling", "item_id", 7) == keys[7]
    rows = feast_codec.entity_keys("item_id", [f"i{n}" for n in range(200)], "inkling")
    for row in rows:
        assert key_slot(item_index_key_of("inkling", "item_id", row)) == key_slot(row)
    # Another project or entity has sets of its own.
    assert item_index_keys("other", "item_id")[7] != keys[7]


def test_a_cluster_address_names_its_nodes_and_refuses_what_a_cluster_lacks() -> None:
    address = "127.0.0.1:7000, 10.0.0.2:7001,username=reader,password=x"
    assert startup_nodes(address) == [("127.0.0.1", 7000), ("10.0.0.2", 7001)]
    with pytest.raises(ConfigurationError, match="names no host:port"):
        startup_nodes("password=x")
    with pytest.raises(ConfigurationError, match="'redis-1' is not host:port"):
        startup_nodes("redis-1,127.0.0.1:7000")
    with pytest.raises(ConfigurationError, match="only database 0"):
        sync_cluster_client("127.0.0.1:1,db=3")
    with pytest.raises(ConfigurationError, match="unknown"):
        sync_cluster_client("127.0.0.1:1,colour=blue")
