"""The online feature reader and the item snapshot against Feast's own reads, on a real
Feast repository, real Redis and Spark-computed, bulk-materialized features."""

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import redis

from batch.features import compute_features
from batch.generate import GeneratorConfig, write_synthetic
from batch.materialize import bulk_materialize
from inkling.bandit import ItemTerms, context_rows, contexts
from inkling.errors import ConfigurationError, DependencyUnavailableError
from inkling.feature_store import feast_codec
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.hydrator import Hydrator
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.feature_store.snapshot import build_item_snapshot, refresh_item_snapshot
from inkling.feature_store.snapshot_refresh import SnapshotRefresher
from tests.conftest import temp_settings

pytestmark = [pytest.mark.spark, pytest.mark.redis]

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
DB = 5  # test_online_store uses 0-2, 8, 10 and 11 of the shared server
UNKNOWN = ["nobody", "missing-1", ""]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, spark, redis_server):
    settings = temp_settings(
        tmp_path_factory.mktemp("online-features"),
        redis_address=f"{redis_server.address},db={DB}",
    )
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB).flushdb()
    write_synthetic(GeneratorConfig(users=60, items=150, sessions=200, days=3, seed=5), settings)
    compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
    feast_cli(settings, "apply", quiet=True)
    bulk_materialize(open_store(settings), START, END, progress=False)
    return settings


@pytest.fixture(scope="module")
def store(repo):
    return open_store(repo)


def ids(settings, view, key):
    table = ds.dataset(str(settings.features_dir / view)).to_table(columns=[key])
    return sorted(set(table.column(key).to_pylist()))


def feast_dict(store, service, rows):
    """Feast's own answer, without the entity columns."""
    out = store.get_online_features(
        features=store.get_feature_service(service), entity_rows=rows
    ).to_dict()
    return {k: v for k, v in out.items() if k not in ("user_id", "session_id", "item_id")}


def entity_rows(users, sessions, items):
    n = max(len(users), len(sessions), len(items))
    return [
        {"user_id": users[i % len(users)], "session_id": sessions[i % len(sessions)],
         "item_id": items[i % len(items)]}
        for i in range(n)
    ]  # fmt: skip


def run(coro):
    return asyncio.run(coro)


async def with_client(store, fn):
    client = await open_async_redis(store)
    try:
        return await fn(client)
    finally:
        await client.aclose()


def test_resolve_service_takes_the_columns_from_the_registry(store):
    ranker = resolve_service(store, "ranker_v1")
    assert [v.name for v in ranker.views] == ["user_features", "session_features", "item_features"]
    assert [v.join_key for v in ranker.views] == ["user_id", "session_id", "item_id"]
    assert ranker.project == store.project
    for view in ranker.views:
        registered = store.get_feature_view(view.name)
        assert view.feature_names == tuple(f.name for f in registered.features)
        assert [f.value_type for f in view.features] == [
            f.dtype.to_value_type() for f in registered.features
        ]
        assert view.ttl == registered.ttl
        assert all(f.redis_field == feast_codec.field_key(view.name, f.name) for f in view.features)
    retrieval = resolve_service(store, "retrieval_v1")
    projection = {
        p.name: [f.name for f in p.features]
        for p in store.get_feature_service("retrieval_v1").feature_view_projections
    }
    assert {v.name: list(v.feature_names) for v in retrieval.views} == projection
    assert retrieval.view("item_covisitation").join_key == "item_id"


def test_resolve_service_names_a_missing_service(store):
    with pytest.raises(ConfigurationError, match="ranker_v9"):
        resolve_service(store, "ranker_v9")


@pytest.mark.parametrize("service", ["ranker_v1", "retrieval_v1"])
def test_reader_rows_equal_feast_for_known_and_unknown_keys(repo, store, service):
    users = ids(repo, "user_features", "user_id") + UNKNOWN
    sessions = ids(repo, "session_features", "session_id") + UNKNOWN
    columns = resolve_service(store, service)
    expected = feast_dict(store, service, entity_rows(users, sessions, ["i1"]))

    async def read(client):
        reader = RowReader(client, columns, enforce_ttl=False)  # Feast's semantics
        return await reader.read_many({"user_features": users, "session_features": sessions})

    got = run(with_client(store, read))
    for view, keys in (("user_features", users), ("session_features", sessions)):
        names = columns.view(view).feature_names
        rows = got[view]
        assert len(rows) == len(keys)
        for i, row in enumerate(rows):
            want = {n: expected[n][i] for n in names}
            if row is None:
                assert all(v is None for v in want.values()), (view, keys[i])
            else:
                assert row == want, (view, keys[i])
        assert rows[-len(UNKNOWN) :] == [None] * len(UNKNOWN)
        assert sum(r is not None for r in rows) == len(keys) - len(UNKNOWN)
    # Lists come back as lists and UnixTimestamps as UTC datetimes, exactly as Feast returns.
    user = next(r for r in got["user_features"] if r is not None)
    assert isinstance(user["user_top_categories"], list)
    if service == "ranker_v1":
        assert isinstance(user["user_last_event_timestamp"], datetime)
        assert user["user_last_event_timestamp"].tzinfo is not None


def test_sync_reader_equals_async_reader(repo, store, redis_server):
    columns = resolve_service(store, "ranker_v1")
    users = ids(repo, "user_features", "user_id")[:10] + UNKNOWN
    sync = RowReader(
        redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB), columns, enforce_ttl=False
    )
    got = run(
        with_client(
            store, lambda c: RowReader(c, columns, enforce_ttl=False).read("user_features", users)
        )
    )
    assert sync.read_sync("user_features", users) == got
    assert (
        sync.redis_key("user_features", "u1")
        == feast_codec.entity_keys("user_id", ["u1"], store.project)[0]
    )


def test_a_failed_read_raises_and_leaves_no_stale_reply_behind(repo, store, redis_server):
    columns = resolve_service(store, "ranker_v1")
    user = ids(repo, "user_features", "user_id")[0]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    (key,) = feast_codec.entity_keys("user_id", ["not-a-hash"], store.project)
    client.set(key, b"a string where a hash belongs")

    async def scenario(c):
        reader = RowReader(c, columns, enforce_ttl=False)
        with pytest.raises(DependencyUnavailableError, match="WRONGTYPE"):
            await reader.read("user_features", ["not-a-hash", user])
        # Had the second reply stayed on the connection, this read would return it.
        return await reader.read("user_features", ["nobody"])

    try:
        assert run(with_client(store, scenario)) == [None]
    finally:
        client.delete(key)


def test_ttl_reads_an_expired_row_as_missing_where_feast_still_returns_it(store):
    """Feast 0.67 serves a Redis row whatever its age; the reader enforces the view's TTL."""
    now = datetime.now(UTC).replace(microsecond=0)
    fresh, stale = now - timedelta(hours=1), now - timedelta(days=2)  # session ttl: 1 day
    frame = pd.DataFrame(
        {
            "session_id": ["ttl-fresh", "ttl-stale"],
            "event_timestamp": [fresh, stale],
            "session_recent_items": [["i1", "i2"], ["i3"]],
            "session_page_views": [3, 4],
            "session_item_views": [2, 1],
            "session_clicks": [1, 0],
            "session_carts": [0, 0],
            "session_purchases": [0, 0],
            "session_intent_category": ["c01", "c02"],
            "session_last_event_timestamp": [fresh, stale],
        }
    )
    store.push("session_push", frame)
    columns = resolve_service(store, "ranker_v1")
    keys = ["ttl-fresh", "ttl-stale"]
    expected = feast_dict(store, "ranker_v1", entity_rows(["u1"], keys, ["i1"]))
    names = columns.view("session_features").feature_names
    feast_rows = [{n: expected[n][i] for n in names} for i in range(2)]
    assert feast_rows[1]["session_page_views"] == 4  # Feast: the stale row, as is

    async def read(client):
        enforced = await RowReader(client, columns).read("session_features", keys)
        raw = await RowReader(client, columns, enforce_ttl=False).read("session_features", keys)
        later = RowReader(client, columns, clock=lambda: time.time() + 86_400)
        return enforced, raw, await later.read("session_features", keys)

    enforced, raw, later = run(with_client(store, read))
    assert enforced == [feast_rows[0], None]
    assert raw == feast_rows
    assert feast_rows[0]["session_last_event_timestamp"] == fresh
    assert later == [None, None]  # a day on, the fresh row has expired too


@pytest.mark.parametrize("service", ["ranker_v1", "retrieval_v1"])
def test_snapshot_values_equal_feast(repo, store, service):
    items = ids(repo, "item_features", "item_id")
    covisit_only = sorted(set(ids(repo, "item_covisitation", "item_id")) - set(items))
    keys = items + covisit_only + UNKNOWN
    columns = resolve_service(store, service)
    expected = feast_dict(store, service, entity_rows(["u1"], ["s1"], keys))
    snapshot = run(with_client(store, lambda c: build_item_snapshot(c, columns, chunk_size=64)))
    known = set(items)
    if service == "retrieval_v1":  # item_covisitation rows count too
        known |= set(covisit_only)
    assert snapshot.n_items == len(known) and set(snapshot.ids) == known
    assert snapshot.keys_scanned >= snapshot.n_items
    rows = snapshot.take(keys, enforce_ttl=False)
    got = rows.to_dict()
    assert set(got) == {f.name for v in columns.views_keyed_by("item_id") for f in v.features}
    for name, values in got.items():
        assert values == expected[name], name
    assert rows.found.tolist() == [k in known for k in keys]
    assert rows.missing[-len(UNKNOWN) :].all() and not rows.missing[: len(items)].any()
    # Typed columns agree with the Python values, missing ones filled.
    price = rows.values("item_price")
    assert np.array_equal(np.isnan(price), np.array([v is None for v in expected["item_price"]]))
    matrix = rows.matrix(["item_pop_7d", "item_price"])
    assert matrix.shape == (len(keys), 2)
    assert np.isnan(matrix[-1]).all()
    assert matrix[0, 0] == expected["item_pop_7d"][0]
    category = rows.values("item_category")
    column = snapshot.column("item_category")
    assert [column.vocabulary[c] if c >= 0 else None for c in category] == expected["item_category"]


def test_snapshot_enforces_item_ttls_at_request_time(repo, store):
    columns = resolve_service(store, "retrieval_v1")
    snapshot = run(with_client(store, lambda c: build_item_snapshot(c, columns)))
    items = ids(repo, "item_features", "item_id")
    stamps = snapshot.views["item_features"].ts_ns[snapshot.lookup(items)[0]]
    newest = int(stamps.max()) / 1e9
    at_data_time = snapshot.take(items, enforce_ttl=True, now=newest + 60)
    assert at_data_time.valid["item_features"][np.argmax(stamps)]
    assert at_data_time.to_python("item_category")[np.argmax(stamps)] is not None
    years_later = snapshot.take(items, enforce_ttl=True, now=newest + 3 * 365 * 86_400)
    assert years_later.missing.all()
    assert years_later.to_python("item_pop_7d") == [None] * len(items)
    assert np.isnan(years_later.matrix(["item_price"])).all()


def test_bandit_item_terms_equal_the_contexts_of_each_requests_values(repo, store):
    """The per-snapshot popularity and freshness terms the ranker gathers equal the
    contexts computed from the request's own values, an expired row included."""
    columns = resolve_service(store, "ranker_v1")
    snapshot = run(with_client(store, lambda c: build_item_snapshot(c, columns)))
    items = [*ids(repo, "item_features", "item_id")[:40], "no-such-item"]
    rows = snapshot.take(items, enforce_ttl=False)
    # Rows past the view's TTL at request time: as `take` marks them, every third one.
    expired = np.arange(len(items)) % 3 == 0
    rows = replace(
        rows, valid={**rows.valid, "item_features": rows.valid["item_features"] & ~expired}
    )
    positions = np.arange(len(items))[::-1]
    terms = ItemTerms.of(snapshot)
    popularity, freshness = terms.take(rows, positions)
    ranker = np.linspace(1.0, 0.0, len(items))
    expected = contexts(
        ranker,
        rows.values("item_pop_7d")[positions],
        rows.values("item_age_days")[positions],
        np.zeros(len(items)),
    )
    got = context_rows(ranker, popularity, freshness, np.zeros(len(items)))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert freshness[0] == pytest.approx(np.exp(-365 / 30))  # the unknown id: a year old


def test_snapshot_keeps_only_this_projects_item_keys(repo, store, redis_server):
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    (key,) = feast_codec.entity_keys("item_id", ["other-project-item"], "x" + store.project)
    client.hset(key, "_ts:item_features", b"\x08\x01")
    try:
        columns = resolve_service(store, "ranker_v1")
        snapshot = run(with_client(store, lambda c: build_item_snapshot(c, columns)))
        assert "other-project-item" not in snapshot.id_to_row
        others = ids(repo, "user_features", "user_id") + ids(repo, "session_features", "session_id")
        assert not set(snapshot.ids) & set(others)  # user and session keys are not items
        assert snapshot.n_items == len(ids(repo, "item_features", "item_id"))
    finally:
        client.delete(key)


def test_refresher_swaps_in_a_rebuilt_snapshot_with_a_changed_row(repo, store):
    columns = resolve_service(store, "ranker_v1")
    item = ids(repo, "item_features", "item_id")[0]
    later = datetime(2026, 12, 31, tzinfo=UTC)  # after every materialized row

    async def scenario(client):
        refresher = SnapshotRefresher(client, columns, refresh_interval_s=0.2)
        first = await refresher.start()
        try:
            before = first.take([item, "brand-new-item"], enforce_ttl=False)
            store.write_to_online_store(
                "item_features",
                pd.DataFrame(
                    {
                        "item_id": [item, "brand-new-item"],
                        "event_timestamp": [later, later],
                        **{
                            f.name: [None, None]
                            for f in store.get_feature_view("item_features").features
                        },
                    }
                ).assign(item_pop_7d=[123_456, 7], item_category=["changed", "new"]),
            )
            deadline = time.monotonic() + 20
            while refresher.snapshot is first and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            second = refresher.snapshot
            return refresher, first, second, before
        finally:
            await refresher.stop()

    refresher, first, second, before = run(with_client(store, scenario))
    assert second is not first
    after = second.take([item, "brand-new-item"], enforce_ttl=False)
    assert after.to_python("item_pop_7d") == [123_456, 7]
    assert after.to_python("item_category") == ["changed", "new"]
    assert after.found.all()
    # A reader holding the old snapshot keeps seeing it, unchanged.
    assert (
        first.take([item], enforce_ttl=False).to_python("item_pop_7d")
        == (before.to_python("item_pop_7d")[:1])
    )
    assert before.found.tolist() == [True, False]
    assert refresher.stats.builds >= 2 and refresher.stats.failures == 0
    assert refresher.max_staleness_s >= 0.2 + second.build_seconds
    assert 0 <= second.age_s() < 60


def test_incremental_refresh_reads_only_changed_rows_and_equals_a_full_build(repo, store):
    """Changed, new and list rows read alone give what a full build gives, for every id;
    the old snapshot is untouched; nothing changed reads nothing; a deleted row forces
    a full build."""
    columns = resolve_service(store, "retrieval_v1")  # scalars, strings and string lists
    items = ids(repo, "item_features", "item_id")
    later = datetime(2027, 1, 2, tzinfo=UTC)  # after every row other tests wrote
    features = {
        v: [f.name for f in store.get_feature_view(v).features]
        for v in ("item_features", "item_covisitation")
    }

    def write(view, rows):
        frame = pd.DataFrame(rows)
        for name in features[view]:
            if name not in frame:
                frame[name] = None
        store.write_to_online_store(view, frame.assign(event_timestamp=later))

    def everything(snapshot, keys):
        rows = snapshot.take(keys, enforce_ttl=False)
        return rows.to_dict(), rows.found.tolist()

    async def scenario(client):
        first = await build_item_snapshot(client, columns)
        keys = [*items, "added-item", *UNKNOWN]
        before = everything(first, keys)
        same = await refresh_item_snapshot(client, first)
        write(
            "item_features",
            {
                "item_id": [items[0], "added-item"],
                "item_pop_7d": [98_765, 3],
                "item_category": ["a-category-never-seen", "another-new-one"],
            },
        )
        write(
            "item_covisitation",
            {
                "item_id": [items[1]],
                "covisit_items": [["added-item", items[0], "not-in-the-catalogue"]],
                "covisit_counts": [[5, 4, 1]],
            },
        )
        patched = await refresh_item_snapshot(client, first)
        full = await build_item_snapshot(client, columns)
        gone_key = feast_codec.entity_keys("item_id", [items[2]], store.project)[0]
        saved = await client.dump(gone_key)
        await client.delete(gone_key)
        try:
            rebuilt = await refresh_item_snapshot(client, patched)
        finally:
            await client.restore(gone_key, 0, saved)
        return first, keys, before, same, patched, full, rebuilt

    first, keys, before, same, patched, full, rebuilt = run(with_client(store, scenario))
    assert same.rows_read == 0 and same.features is first.features
    assert same.built_at >= first.built_at
    assert everything(same, keys) == before
    assert patched.rows_read == 3  # two item rows and one co-visitation row
    assert patched.n_items == first.n_items + 1 == full.n_items
    got, found = everything(patched, keys)
    assert (got, found) == everything(full, keys)
    assert got["item_category"][:2] == ["a-category-never-seen", got["item_category"][1]]
    assert got["covisit_items"][1] == ["added-item", items[0], "not-in-the-catalogue"]
    assert found[len(items)] is True  # the added item
    assert everything(first, keys) == before  # readers of the old snapshot see no change
    assert rebuilt.rows_read == rebuilt.n_items == patched.n_items - 1
    assert items[2] not in rebuilt.id_to_row


def test_hydrator_reads_user_session_and_items_and_flags_missing_rows(repo, store):
    columns = resolve_service(store, "ranker_v1")
    user = ids(repo, "user_features", "user_id")[0]
    session = ids(repo, "session_features", "session_id")[0]
    items = [*ids(repo, "item_features", "item_id")[:5], "missing-item"]
    expected = feast_dict(store, "ranker_v1", entity_rows([user], [session], items))

    async def scenario(client):
        refresher = SnapshotRefresher(client, columns, refresh_interval_s=3600)
        await refresher.refresh()
        hydrator = Hydrator(RowReader(client, columns, enforce_ttl=False), refresher)
        known = await hydrator.hydrate(user, session, items)
        unknown = await hydrator.hydrate("nobody", None, [])
        return known, unknown

    known, unknown = run(with_client(store, scenario))
    assert known.user == {n: expected[n][0] for n in columns.view("user_features").feature_names}
    assert known.session == {
        n: expected[n][0] for n in columns.view("session_features").feature_names
    }
    assert known.items.to_dict() == {
        n: expected[n] for n in columns.view("item_features").feature_names
    }
    assert known.missing_items.tolist() == [False] * 5 + [True]
    assert unknown.user is None and unknown.session is None
    assert len(unknown.items.rows) == 0 and unknown.views == {"user_features": None}
