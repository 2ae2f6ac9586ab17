"""Feast apply + materialization into a real Redis server, read back through Feast."""

from datetime import UTC, datetime

import pytest
import redis

from batch.features import compute_features
from batch.generate import GeneratorConfig, write_synthetic
from batch.materialize import bulk_materialize
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.redis_embedded import EmbeddedRedis
from tests.conftest import temp_settings

pytestmark = [pytest.mark.spark, pytest.mark.redis]

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, spark, redis_server):
    settings = temp_settings(
        tmp_path_factory.mktemp("online"), redis_address=f"{redis_server.address},db=0"
    )
    write_synthetic(GeneratorConfig(users=80, items=200, sessions=300, days=4, seed=11), settings)
    compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
    feast_cli(settings, "apply", quiet=True)
    return settings


def _all_rows(settings):
    import pyarrow.dataset as ds

    keys = {}
    for name, key in (
        ("item_features", "item_id"),
        ("user_features", "user_id"),
        ("session_features", "session_id"),
    ):
        keys[key] = sorted(
            set(
                ds.dataset(str(settings.features_dir / name))
                .to_table(columns=[key])
                .column(key)
                .to_pylist()
            )
        )
    n = max(len(v) for v in keys.values())
    return [{k: v[i % len(v)] for k, v in keys.items()} for i in range(n)] + [
        {"user_id": "nobody", "session_id": "none", "item_id": "missing"}
    ]


def test_bulk_path_gives_feast_the_same_values_as_stock_materialize(repo, redis_server):
    stock = repo.with_redis(f"{redis_server.address},db=0")
    bulk = repo.with_redis(f"{redis_server.address},db=1")
    for s in (stock, bulk):
        redis.Redis(host="127.0.0.1", port=redis_server.port, db=int(s.redis_address[-1])).flushdb()
    open_store(stock).materialize(START, END)
    results = bulk_materialize(open_store(bulk), START, END, progress=False)
    assert {r.view for r in results} == {
        "item_features",
        "user_features",
        "session_features",
        "item_covisitation",
        "item_stream_features",  # the stream worker's view: its batch table is empty
    }
    assert next(r for r in results if r.view == "item_stream_features").rows_read == 0
    rows = _all_rows(repo)
    for service in ("ranker_v1", "retrieval_v1"):
        a = (
            open_store(stock)
            .get_online_features(
                features=open_store(stock).get_feature_service(service), entity_rows=rows
            )
            .to_dict()
        )
        b = (
            open_store(bulk)
            .get_online_features(
                features=open_store(bulk).get_feature_service(service), entity_rows=rows
            )
            .to_dict()
        )
        assert a == b
        assert sum(v is not None for v in a["item_category"]) >= 200
        assert a["item_category"][-1] is None  # unknown item: no row, not an error
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    assert (
        client.dbsize() > 0
        and redis.Redis(host="127.0.0.1", port=redis_server.port, db=1).dbsize() == client.dbsize()
    )


def test_bulk_path_never_overwrites_newer_rows_and_incremental_continues(repo, redis_server):
    live = repo.with_redis(f"{redis_server.address},db=2")
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=2).flushdb()
    store = open_store(live)
    bulk_materialize(store, START, END, views=["item_features"], progress=False)
    before = store.get_online_features(
        features=["item_features:item_pop_1d"], entity_rows=[{"item_id": "i1"}]
    ).to_dict()
    again = bulk_materialize(
        store, START, datetime(2026, 10, 2, tzinfo=UTC), views=["item_features"], progress=False
    )
    assert again[0].written == 0  # older snapshots than what Redis holds
    after = store.get_online_features(
        features=["item_features:item_pop_1d"], entity_rows=[{"item_id": "i1"}]
    ).to_dict()
    assert before == after
    out = feast_cli(live, "materialize-incremental", END.strftime("%Y-%m-%dT%H:%M:%S"), quiet=True)
    assert "item_features" in out


def _item_rows(store, ids):
    view = store.get_feature_view("item_features")
    return store.get_online_features(
        features=[f"item_features:{f.name}" for f in view.features],
        entity_rows=[{"item_id": i} for i in ids],
    ).to_dict()


def test_bulk_path_writes_exactly_the_rows_redis_lacks_or_holds_older(repo, redis_server):
    """A chunk that is partly newer writes just those rows, with the values stock Feast
    reads back; the rest of the chunk is left untouched."""
    live = repo.with_redis(f"{redis_server.address},db=8")
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=8)
    client.flushdb()
    store = open_store(live)
    bulk_materialize(store, START, END, views=["item_features"], progress=False)
    keys = sorted(client.scan_iter(count=1000))
    ids = sorted(_item_ids(repo))
    everything = _item_rows(store, ids)
    gone = keys[::7]  # scattered through every chunk
    client.delete(*gone)
    again = bulk_materialize(store, START, END, views=["item_features"], progress=False)
    assert again[0].written == len(gone) > 0
    assert _item_rows(store, ids) == everything


def test_bulk_path_sets_the_online_store_key_ttl(repo, redis_server):
    live = repo.with_redis(f"{redis_server.address},db=10")
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=10)
    client.flushdb()
    store = open_store(live)
    store.config.online_store.key_ttl_seconds = 3600
    result = bulk_materialize(store, START, END, views=["item_features"], progress=False)
    keys = list(client.scan_iter(count=1000))
    assert len(keys) == result[0].written > 0
    assert all(0 < client.ttl(k) <= 3600 for k in keys)
    reference = repo.with_redis(f"{redis_server.address},db=11")
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=11).flushdb()
    bulk_materialize(open_store(reference), START, END, views=["item_features"], progress=False)
    ids = sorted(_item_ids(repo))
    assert _item_rows(store, ids) == _item_rows(open_store(reference), ids)


def _item_ids(settings):
    import pyarrow.dataset as ds

    table = ds.dataset(str(settings.features_dir / "item_features")).to_table(columns=["item_id"])
    return set(table.column("item_id").to_pylist())


def test_sqlite_configuration_differs_only_in_online_store(repo):
    sqlite = temp_settings(repo.data_dir.parent, online_store="sqlite")
    feast_cli(sqlite, "apply", quiet=True)
    store = open_store(sqlite)
    store.materialize(START, END, feature_views=["user_features"])
    import pyarrow.dataset as ds

    user = (
        ds.dataset(str(repo.features_dir / "user_features")).to_table().column("user_id")[0].as_py()
    )
    row = store.get_online_features(
        features=["user_features:user_clicks"], entity_rows=[{"user_id": user}]
    ).to_dict()
    assert row["user_clicks"][0] is not None
    assert store.config.offline_store.type == "file"


def test_embedded_redis_keeps_its_data_across_restarts(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        redis.Redis(host="127.0.0.1", port=server.port).set("k", "v")
    assert (tmp_path / "appendonlydir").exists() or any(tmp_path.glob("*.aof"))
    with EmbeddedRedis(tmp_path) as server:
        assert redis.Redis(host="127.0.0.1", port=server.port).get("k") == b"v"
