"""The retrieval and ranking servers end to end: real grpc.aio servers on loopback
(port 0), a real Redis server process, a temporary Feast repository materialized
from Spark features, ALS embeddings and a FAISS index built by the batch jobs."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batch.als import AlsConfig, train_als
from batch.build_index import build_retrieval_index
from batch.features import compute_features
from batch.generate import GeneratorConfig, write_synthetic
from batch.materialize import bulk_materialize
from inkling.bandit import CONTEXT_FEATURES
from inkling.config import PROJECT_ROOT, Settings
from inkling.errors import ConfigurationError
from inkling.events import bus
from inkling.exploration import PolicySpec, replay
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.redis_embedded import free_port
from inkling.serving.certs import Authority
from inkling.serving.convert import render
from inkling.serving.runtime import Running, start_server
from inkling.serving.security import SecuritySettings
from inkling.serving.settings import RankingSettings, RetrievalSettings
from inkling.telemetry.tree import trace_tree
from inkling.v1 import (
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
    retrieval_service_pb2,
    retrieval_service_pb2_grpc,
)
from ranking_server.app import RankingApp
from retrieval_server.app import RetrievalApp
from tests.conftest import temp_settings
from tests.proto_strategies import ALLOWED, MEMORY_GROWTH_MIB, report
from tests.proto_strategies import SETTINGS as FUZZ_SETTINGS
from tests.proto_strategies import requests as fuzzed
from tests.server_process import ServerProcess, server_process

pytestmark = [pytest.mark.spark, pytest.mark.redis]

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
DB = 7  # a database of the shared test Redis of its own (test_online_features uses 5)


class Loop:
    """An asyncio loop on a thread hosting servers, so tests can call them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def materialized(
    root: Path, spark: Any, redis_server: Any, db: int, generator: GeneratorConfig
) -> Settings:
    """A synthetic log under `root`, its Spark features, the Feast repository applied, and
    every view materialized into database `db` of the shared test Redis (emptied first)."""
    settings = temp_settings(root, redis_address=f"{redis_server.address},db={db}")
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=db).flushdb()
    write_synthetic(generator, settings)
    compute_features(spark, settings.events_dir, settings.catalog_dir, settings.features_dir)
    feast_cli(settings, "apply", quiet=True)
    bulk_materialize(open_store(settings), START, END, progress=False)
    return settings


def served(
    root: Path, spark: Any, redis_server: Any, db: int, generator: GeneratorConfig
) -> Settings:
    """`materialized`, plus the ALS embeddings and their FAISS index that the retrieval
    server reads; the settings exported to the environment."""
    settings = materialized(root, spark, redis_server, db, generator)
    train_als(
        spark, settings.events_dir, settings.models_dir / "als", AlsConfig(rank=16, max_iter=5)
    )
    build_retrieval_index(settings.models_dir / "als", settings.models_dir / "index")
    settings.export_env()
    return settings


def start_pair(
    loop: Loop, settings: Settings, grace_s: float, **ranking: Any
) -> tuple[Running, Running]:
    """A retrieval server and a ranking server reading from it (`ranking`: more
    RankingSettings), on free ports of the loopback."""
    retrieval: Running = loop.run(
        start_server(RetrievalApp(settings, RetrievalSettings(port=0)), port=0, grace_s=grace_s)
    )
    rs = RankingSettings(port=0, retrieval_address=f"127.0.0.1:{retrieval.port}", **ranking)
    return retrieval, loop.run(start_server(RankingApp(settings, rs), port=0, grace_s=grace_s))


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server):
    return served(
        tmp_path_factory.mktemp("servers"), spark, redis_server, DB,
        GeneratorConfig(users=200, items=600, sessions=900, days=4, seed=5),
    )  # fmt: skip


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


POLICIES = {
    "explore": "plackett_luce(temperature=0.5,pool=30)",
    "bandit": "bandit(epsilon=0.05,temperature=0.5,pool=30)",
}


@pytest.fixture(scope="module")
def servers(built, loop):
    retrieval, ranking = start_pair(loop, built, grace_s=2, policies=POLICIES)
    yield retrieval, ranking
    loop.run(ranking.stop())
    loop.run(retrieval.stop())


@pytest.fixture(scope="module")
def ranking_stub(servers):
    channel = grpc.insecure_channel(f"127.0.0.1:{servers[1].port}")
    yield ranking_service_pb2_grpc.RankingServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def retrieval_stub(servers):
    channel = grpc.insecure_channel(f"127.0.0.1:{servers[0].port}")
    yield retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
    channel.close()


def _user_with_history(built) -> tuple[str, str]:
    import pyarrow.dataset as ds

    users = ds.dataset(str(built.features_dir / "user_features")).to_table().to_pandas()
    sessions = ds.dataset(str(built.features_dir / "session_features")).to_table().to_pandas()
    user = users.sort_values("user_clicks").iloc[-1].user_id
    # The freshest session: sessions expire from the online store after a day.
    session = sessions.sort_values("session_last_event_timestamp").iloc[-1].session_id
    return str(user), str(session)


def test_recommend_end_to_end(built, ranking_stub):
    user, session = _user_with_history(built)
    response = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(
            user_id=user, session_id=session, num_results=20, debug=True
        ),
        timeout=5,
    )
    assert len(response.items) == 20
    assert len({i.item_id for i in response.items}) == 20
    assert [i.rank for i in response.items] == list(range(20))
    assert re.fullmatch(r"[0-9a-f]{32}", response.request_id)
    scores = [i.score for i in response.items]
    assert all(s > 0 for s in scores)
    assert not response.degradation.degraded, response.degradation.detail
    assert response.served_by.feature_service == "ranker_v1"
    assert response.served_by.model_version.startswith("baseline")
    assert response.served_by.index_version.startswith("als-")
    sources = {i.source for i in response.items}
    assert sources - {resources_pb2.CANDIDATE_SOURCE_POPULARITY}, "only popularity answered"
    # Diversity: at most 3 of one category in the top 20.
    categories = [i.category for i in response.items]
    assert max(categories.count(c) for c in set(categories)) <= 3
    stages = [t.stage for t in response.debug.timings]
    assert {"retrieve", "hydrate", "score", "policy"} <= set(stages)
    features = {(f.entity, f.feature) for f in response.debug.features}
    assert (f"user_id={user}", "user_top_categories") in features
    assert (f"item_id={response.items[0].item_id}", "item_pop_7d") in features
    # Item rows come from the rows retrieval's candidates map to, not a second lookup:
    # each returned item's debug value is its own row's, as Feast reads it.
    shown = [i.item_id for i in response.items]
    pop = {
        f.entity.removeprefix("item_id="): f.value
        for f in response.debug.features
        if f.feature == "item_pop_7d" and f.entity.startswith("item_id=")
    }
    feast_pop = (
        open_store(built)
        .get_online_features(
            features=["item_features:item_pop_7d"], entity_rows=[{"item_id": i} for i in shown]
        )
        .to_dict()["item_pop_7d"]
    )
    assert [pop[i] for i in shown] == [render(v) for v in feast_pop]
    # Filter counts come back from retrieval.
    assert {f.filter for f in response.filtered} >= {"already_purchased", "unavailable"}


def test_retrieval_merges_sources_and_applies_filters(built, retrieval_stub):
    user, session = _user_with_history(built)
    plain = retrieval_stub.RetrieveCandidates(
        retrieval_service_pb2.RetrieveCandidatesRequest(
            user_id=user, session_id=session, num_candidates=300
        ),
        timeout=5,
    )
    ids = [c.item_id for c in plain.candidates]
    assert len(ids) == 300 and len(set(ids)) == 300
    found_by = {c.source for c in plain.candidates}
    assert resources_pb2.CANDIDATE_SOURCE_ANN in found_by
    assert resources_pb2.CANDIDATE_SOURCE_COVISITATION in found_by
    excluded = ids[:10]
    category = plain.candidates[0]
    filtered = retrieval_stub.RetrieveCandidates(
        retrieval_service_pb2.RetrieveCandidatesRequest(
            user_id=user, session_id=session, num_candidates=300, exclude_item_ids=excluded
        ),
        timeout=5,
    )
    assert not set(excluded) & {c.item_id for c in filtered.candidates}
    counts = {f.filter: f.removed for f in filtered.filtered}
    assert counts["excluded_by_caller"] >= 1
    del category


def test_packed_candidates_carry_exactly_what_the_messages_carry(built, retrieval_stub):
    user, session = _user_with_history(built)

    def ask(packed: bool) -> retrieval_service_pb2.RetrieveCandidatesResponse:
        return retrieval_stub.RetrieveCandidates(
            retrieval_service_pb2.RetrieveCandidatesRequest(
                user_id=user, session_id=session, num_candidates=500, packed=packed
            ),
            timeout=5,
        )

    plain, packed = ask(False), ask(True)
    assert not plain.HasField("packed") and not packed.candidates
    columns = packed.packed
    assert list(columns.item_ids) == [c.item_id for c in plain.candidates]
    assert list(columns.scores) == [c.score for c in plain.candidates]
    assert list(columns.sources) == [c.source for c in plain.candidates]
    several = {k: list(c.sources) for k, c in enumerate(plain.candidates) if c.sources}
    assert several, "no candidate was found by two sources: the comparison proves less"
    pairs: dict[int, list[int]] = {}
    for k, source in zip(columns.also_positions, columns.also_sources, strict=True):
        pairs.setdefault(k, []).append(source)
    assert pairs == several
    assert packed.served_by == plain.served_by and list(packed.filtered) == list(plain.filtered)


def test_category_filter_is_honoured_by_recommend(built, ranking_stub):
    user, session = _user_with_history(built)
    first = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(user_id=user, session_id=session, num_results=5),
        timeout=5,
    )
    wanted = first.items[-1].category
    only = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(
            user_id=user, session_id=session, num_results=10, include_categories=[wanted]
        ),
        timeout=5,
    )
    assert only.items and {i.category for i in only.items} == {wanted}


def test_rank_candidates_ranks_exactly_the_callers_items(built, ranking_stub):
    import pyarrow.parquet as pq

    items = pq.read_table(built.catalog_dir / "items.parquet").column("item_id").to_pylist()
    mine = [*items[:150], "never-seen-item"]
    response = ranking_stub.RankCandidates(
        ranking_service_pb2.RankCandidatesRequest(
            user_id="brand-new-user",
            session_id="brand-new-session",
            candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in mine],
        ),
        timeout=5,
    )
    assert sorted(i.item_id for i in response.items) == sorted(mine)
    assert {i.source for i in response.items} == {resources_pb2.CANDIDATE_SOURCE_CALLER}
    # The unknown item is scored with defaults, and the response says so.
    assert resources_pb2.DEGRADED_REASON_FEATURES_MISSING in response.degradation.reasons
    top = ranking_stub.RankCandidates(
        ranking_service_pb2.RankCandidatesRequest(
            session_id="s",
            candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in mine],
            num_results=7,
        ),
        timeout=5,
    )
    assert len(top.items) == 7
    # Every answer has its own id, degraded ones too (the unknown item above).
    assert re.fullmatch(r"[0-9a-f]{32}", response.request_id)
    assert re.fullmatch(r"[0-9a-f]{32}", top.request_id)
    assert response.request_id != top.request_id


def test_every_answer_goes_to_the_bus_as_a_serve_record(built, ranking_stub):
    user, session = _user_with_history(built)
    recommended = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(
            user_id=user,
            session_id=session,
            num_results=12,
            context=resources_pb2.RequestContext(surface="home"),
        ),
        timeout=5,
    )
    ranked = ranking_stub.RankCandidates(
        ranking_service_pb2.RankCandidatesRequest(
            session_id="anon-7",
            candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in ("x", "y")],
        ),
        timeout=5,
    )
    client = bus.sync_client(built.redis_address)

    def records() -> dict[str, resources_pb2.ServeRecord]:
        return {
            e.event_id: resources_pb2.ServeRecord.FromString(e.payload)
            for p in range(4)
            for e in bus.read_partition(client, p)
            if e.serve
        }

    deadline = time.monotonic() + 10
    while {recommended.request_id, ranked.request_id} - set(records()):
        assert time.monotonic() < deadline, "the answers never reached the bus"
        time.sleep(0.05)
    client.close()
    got = records()
    record = got[recommended.request_id]
    items = recommended.items
    assert list(record.item_ids) == [i.item_id for i in items]
    assert list(record.scores) == pytest.approx([i.score for i in items])
    assert list(record.sources) == [i.source for i in items]
    assert list(record.propensities) == [1.0] * len(items)  # the policy is deterministic
    assert (record.operation, record.surface, record.user_id, record.session_id) == (
        "recommend", "home", user, session,
    )  # fmt: skip
    served_by = recommended.served_by
    assert (record.model_version, record.index_version, record.feature_service) == (
        served_by.model_version, served_by.index_version, served_by.feature_service,
    )  # fmt: skip
    assert (record.experiment, record.arm) == ("", "")
    assert abs(record.served_at.ToMicroseconds() / 1e6 - time.time()) < 30
    other = got[ranked.request_id]
    assert other.operation == "rank_candidates" and other.user_id == ""
    assert sorted(other.item_ids) == ["x", "y"]
    assert resources_pb2.DEGRADED_REASON_FEATURES_MISSING in other.degraded


def _serve_records(built, request_ids: set[str]) -> dict[str, resources_pb2.ServeRecord]:
    """The serve records of these answers, once all of them reached the bus."""
    client = bus.sync_client(built.redis_address)
    deadline = time.monotonic() + 10
    while True:
        got = {
            e.event_id: resources_pb2.ServeRecord.FromString(e.payload)
            for p in range(4)
            for e in bus.read_partition(client, p)
            if e.serve and e.event_id in request_ids
        }
        if set(got) == request_ids:
            client.close()
            return got
        assert time.monotonic() < deadline, "the answers never reached the bus"
        time.sleep(0.05)


def test_an_exploring_surface_logs_what_replays_its_list_and_keeps_the_guardrails(
    built, ranking_stub
):
    import pyarrow.dataset as ds

    user, session = _user_with_history(built)
    answers = [
        ranking_stub.Recommend(
            ranking_service_pb2.RecommendRequest(
                user_id=user,
                session_id=session,
                num_results=10,
                context=resources_pb2.RequestContext(surface=surface),
            ),
            timeout=5,
        )
        for surface in ["explore"] * 6 + ["bandit"] * 2
    ]
    records = _serve_records(built, {a.request_id for a in answers})
    items = ds.dataset(str(built.features_dir / "item_features")).to_table().to_pandas()
    unavailable = set(
        items[~items.item_in_stock.astype(bool) | items.item_blocked.astype(bool)].item_id
    )
    lists = set()
    for answer in answers:
        record = records[answer.request_id]
        shown = [i.item_id for i in answer.items]
        assert list(record.item_ids) == shown and len(shown) == 10
        spec = PolicySpec.parse(record.policy)
        assert spec.kind in ("plackett_luce", "bandit") and spec.pool == 30
        pool = record.pool
        assert len(pool.item_ids) == 30 and tuple(pool.feature_names) == CONTEXT_FEATURES
        _, codes = np.unique(np.array(pool.categories), return_inverse=True)
        slate = replay(spec, np.array(pool.values), np.array(pool.scores), codes, 10, record.seed)
        assert [pool.item_ids[i] for i in slate.order] == shown  # the same list, redrawn
        assert list(record.propensities) == pytest.approx(slate.propensities.tolist(), rel=1e-4)
        assert list(record.explored) == slate.explored.tolist()
        top = Counter(i.category for i in answer.items)
        assert max(top.values()) <= 3  # the diversity rule (max_per_category) still holds
        assert not set(shown) & unavailable  # nothing out of stock or blocked
        lists.add(tuple(shown))
    assert len(lists) > 1  # the same request got different lists: it explores


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ranking_service_pb2.RecommendRequest(session_id="", num_results=5), "session_id"),
        (
            ranking_service_pb2.RecommendRequest(session_id="s" * 10_000, num_results=5),
            "session_id",
        ),
        (ranking_service_pb2.RecommendRequest(session_id="s", num_results=0), "num_results"),
        (ranking_service_pb2.RecommendRequest(session_id="s", num_results=10**6), "num_results"),
    ],
)
def test_bad_recommend_requests_are_invalid_argument(ranking_stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        ranking_stub.Recommend(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_huge_and_duplicate_candidate_lists_are_invalid_argument(ranking_stub):
    huge = ranking_service_pb2.RankCandidatesRequest(
        session_id="s",
        candidates=[ranking_service_pb2.CallerCandidate(item_id=f"i{i}") for i in range(100_000)],
    )
    with pytest.raises(grpc.RpcError) as info:
        ranking_stub.RankCandidates(huge, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates" in info.value.details() and "100000" in info.value.details()
    dupes = ranking_service_pb2.RankCandidatesRequest(
        session_id="s",
        candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in ("a", "b", "a")],
    )
    with pytest.raises(grpc.RpcError) as info:
        ranking_stub.RankCandidates(dupes, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates[2].item_id" in info.value.details()


def _raw_calls(port: int, service: Any, payloads: list[bytes]) -> dict[str, Counter[str]]:
    """Each method of `service` called with each payload as its raw request bytes: the
    status codes per method, and the details of the refusals."""
    out: dict[str, Counter[str]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in service.methods:
            call = channel.unary_unary(f"/{service.full_name}/{method.name}")
            seen: Counter[str] = Counter()
            for payload in payloads:
                try:
                    call(payload, timeout=5)
                    seen["OK"] += 1
                except grpc.RpcError as e:
                    seen[e.code().name] += 1
                    seen[f"details: {e.details()}"] += 1
            out[method.name] = seen
    return out


def test_undecodable_payloads_are_invalid_argument_and_logged_in_bounded_volume(
    otel, servers, caplog
):
    """Random bytes, truncated messages and invalid UTF-8 in a string field: each is
    INVALID_ARGUMENT naming the message expected (never UNKNOWN from grpc's own
    deserializer), counted, and logged once a minute per method, not once per call."""
    rng = np.random.default_rng(17)
    valid = ranking_service_pb2.RecommendRequest(session_id="s", num_results=5)
    payloads = [rng.bytes(int(n)) for n in rng.integers(1, 300, size=100)] + [
        valid.SerializeToString()[:-1],  # truncated
        b"\x0a\x02\xff\xfe",  # field 1 (a string) holding invalid UTF-8
        b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the payload's end
    ]
    before = sum(p.value for p in otel.points("inkling.rpc.refused"))
    caplog.set_level("WARNING", logger="inkling.serving")
    retrieval, ranking = servers
    results = {
        **_raw_calls(ranking.port, ranking_service_pb2.DESCRIPTOR.services_by_name["RankingService"], payloads),
        **_raw_calls(retrieval.port, retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"], payloads),
    }  # fmt: skip
    undecodable = 0
    for method, seen in results.items():
        codes = {k for k in seen if not k.startswith("details: ")}
        assert codes <= {"OK", "INVALID_ARGUMENT"}, (method, seen)
        refused = [k for k in seen if "is not a valid inkling.v1." in k]
        assert refused, (method, seen)  # most random bytes do not decode
        undecodable += sum(seen[k] for k in refused)
    deadline = time.monotonic() + 5
    while sum(p.value for p in otel.points("inkling.rpc.refused")) - before < undecodable:
        assert time.monotonic() < deadline, "refusals not counted"
        time.sleep(0.05)
    lines = [r for r in caplog.records if r.name == "inkling.serving"]
    assert 0 < len(lines) <= len(results), [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in lines)  # no traceback for a client's bad bytes


@pytest.fixture(scope="module")
def fuzzed_servers(built) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Retrieval and ranking, each in a process of its own (`tests.server_process`)."""
    with server_process("retrieval", built, RetrievalSettings(port=0)) as retrieval:
        rs = RankingSettings(port=0, retrieval_address=retrieval.address)
        with server_process("ranking", built, rs) as ranking:
            yield retrieval, ranking


@pytest.mark.parametrize(
    "method",
    [
        *ranking_service_pb2.DESCRIPTOR.services_by_name["RankingService"].methods,
        *retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"].methods,
    ],
    ids=lambda m: m.name,
)
def test_fuzzed_requests_get_ok_or_a_client_error_never_unknown(built, fuzzed_servers, method):
    """Generated requests (`tests.proto_strategies`: edge values, damaged bytes, random
    bytes, huge repeated fields, and a valid request with fields changed) to every RPC
    of both servers, `EXAMPLES` of them; each server runs in its own process, whose
    memory stays bounded."""
    retrieval, ranking = fuzzed_servers
    user, session = _user_with_history(built)
    items = [f"i{i}" for i in range(40)]
    valid = {
        "Recommend": ranking_service_pb2.RecommendRequest(
            user_id=user, session_id=session, num_results=10, exclude_item_ids=items[:3]
        ),
        "RankCandidates": ranking_service_pb2.RankCandidatesRequest(
            user_id=user, session_id=session, num_results=10,
            candidates=[ranking_service_pb2.CallerCandidate(item_id=i) for i in items],
        ),
        "RetrieveCandidates": retrieval_service_pb2.RetrieveCandidatesRequest(
            user_id=user, session_id=session, num_candidates=50
        ),
    }[method.name]  # fmt: skip
    port = ranking.port if method.containing_service.name == "RankingService" else retrieval.port
    statuses: Counter[str] = Counter()
    server = ranking if method.containing_service.name == "RankingService" else retrieval
    rss_before = server.rss_mib()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}")

        @FUZZ_SETTINGS
        @hypothesis.given(payload=fuzzed(method.input_type, valid))
        @hypothesis.example(payload=b"\x0a" + b"\xff" * 17 * 1024 * 1024)  # over the limit
        def one(payload: bytes) -> None:
            try:
                call(payload, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            statuses[code] += 1
            assert code in ALLOWED, (code, payload[:200])

        one()
    rss_after = server.rss_mib()
    report(method.full_name, statuses, rss_before, rss_after)
    assert rss_after - rss_before < MEMORY_GROWTH_MIB, (rss_before, rss_after)
    assert statuses["INVALID_ARGUMENT"] > 0 and statuses["RESOURCE_EXHAUSTED"] > 0
    assert statuses["OK"] > 0  # some reached the handler and were answered


def test_the_demo_secured_round_admits_only_the_allowed_certificate(built, tmp_path):
    from demo.secured import secured_demo

    calls = secured_demo(built, _user_with_history(built), tmp_path / "tls")
    assert [(c.status, c.items, c.degraded) for c in calls] == [
        ("OK", 10, False),  # storefront, the demo CA: through ranking and, as ranking, retrieval
        ("PERMISSION_DENIED", 0, False),  # intruder: a valid certificate the list does not name
        ("UNAVAILABLE", 0, False),  # another CA's certificate: the handshake fails
        ("UNAVAILABLE", 0, False),  # no certificate: mutual TLS requires one
    ]


def test_unknown_user_and_session_get_a_cold_start_answer(ranking_stub):
    response = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(
            user_id="nobody-we-know", session_id="fresh-session", num_results=10
        ),
        timeout=5,
    )
    assert len(response.items) == 10
    assert not response.degradation.degraded


def test_health_goes_from_not_serving_to_serving(built, loop):
    gate = asyncio.Event()
    bound: Future[int] = Future()

    class Gated(RetrievalApp):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    async def begin() -> asyncio.Task[Running]:
        app = Gated(built, RetrievalSettings(port=0))
        return asyncio.create_task(start_server(app, port=0, on_bound=bound.set_result))

    task = loop.run(begin())
    channel = grpc.insecure_channel(f"127.0.0.1:{bound.result(timeout=30)}")
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service="inkling.v1.RetrievalService")
    assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        retrieval_service_pb2_grpc.RetrievalServiceStub(channel).RetrieveCandidates(
            retrieval_service_pb2.RetrieveCandidatesRequest(session_id="s", num_candidates=5),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    loop.loop.call_soon_threadsafe(gate.set)
    running = loop.run(_await(task))
    assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    loop.run(running.stop())
    channel.close()


async def _await(task: asyncio.Task[Running]) -> Running:
    return await task


def test_retrieval_down_means_degraded_popularity_not_failure(built, loop):
    rs = RankingSettings(port=0, retrieval_address="127.0.0.1:1", retrieval_budget_ms=200)
    app = RankingApp(built, rs)
    ranking: Running = loop.run(start_server(app, port=0, grace_s=1))
    try:
        # The reads the request makes of the online store (a spy around the real reader).
        reader = app.core._hydrator.reader
        requested: list[str] = []
        read_many = reader.read_many

        async def counted(requests):
            requested.extend(requests)
            return await read_many(requests)

        reader.read_many = counted
        user, session = _user_with_history(built)
        channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
        response = stub.Recommend(
            ranking_service_pb2.RecommendRequest(user_id=user, session_id=session, num_results=10),
            timeout=5,
        )
        # The fallback reads the user's row (for what they bought) and ranking reuses it.
        assert sorted(requested) == ["session_features", "user_features"]
        assert len(response.items) == 10
        assert response.degradation.degraded
        assert re.fullmatch(r"[0-9a-f]{32}", response.request_id)
        assert response.degradation.reasons[0] in (
            resources_pb2.DEGRADED_REASON_RETRIEVAL_UNAVAILABLE,
            resources_pb2.DEGRADED_REASON_RETRIEVAL_DEADLINE,
        )
        assert {i.source for i in response.items} == {resources_pb2.CANDIDATE_SOURCE_POPULARITY}
        channel.close()
    finally:
        loop.run(ranking.stop())


def test_ranking_calls_retrieval_over_mutual_tls_as_an_allowed_caller(built, loop, tmp_path):
    """Retrieval requires a client certificate and admits only `ranking`: a ranker with
    that certificate gets its candidates; one with another name is refused and serves
    the popularity fallback, degraded, as for a retrieval that is down."""
    ca = Authority.create(tmp_path / "ca")
    server, ranker, other = (ca.issue(tmp_path / n, n) for n in ("retrieval", "ranking", "batch"))
    retrieval_security = SecuritySettings(
        cert_file=server.cert_file, key_file=server.key_file, client_ca_file=ca.cert_file,
        allow={"inkling.v1.RetrievalService/*": "ranking"},
    )  # fmt: skip
    retrieval: Running = loop.run(
        start_server(
            RetrievalApp(built, RetrievalSettings(port=0)), port=0, grace_s=1,
            security=retrieval_security,
        )
    )  # fmt: skip
    user, session = _user_with_history(built)
    try:
        for who, degraded in ((ranker, False), (other, True)):
            client = SecuritySettings(
                ca_file=ca.cert_file, client_cert_file=who.cert_file, client_key_file=who.key_file
            )
            rs = RankingSettings(port=0, retrieval_address=f"127.0.0.1:{retrieval.port}")
            ranking = loop.run(start_server(RankingApp(built, rs, client), port=0, grace_s=1))
            try:
                with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
                    response = ranking_service_pb2_grpc.RankingServiceStub(channel).Recommend(
                        ranking_service_pb2.RecommendRequest(
                            user_id=user, session_id=session, num_results=10
                        ),
                        timeout=10,
                    )
                assert response.degradation.degraded is degraded, (who, response.degradation)
                sources = {i.source for i in response.items}
                if degraded:
                    assert sources == {resources_pb2.CANDIDATE_SOURCE_POPULARITY}
                else:
                    assert resources_pb2.CANDIDATE_SOURCE_ANN in sources
            finally:
                loop.run(ranking.stop())
    finally:
        loop.run(retrieval.stop())


class _SlowRetrieval(retrieval_service_pb2_grpc.RetrievalServiceServicer):
    """A retrieval stand-in that takes its time, so a call is in flight at SIGTERM."""

    def __init__(self, items: list[str], delay_s: float) -> None:
        self.items = items
        self.delay_s = delay_s

    async def RetrieveCandidates(self, request, context):
        await asyncio.sleep(self.delay_s)
        return retrieval_service_pb2.RetrieveCandidatesResponse(
            candidates=[
                resources_pb2.Candidate(
                    item_id=i, score=1.0, source=resources_pb2.CANDIDATE_SOURCE_ANN
                )
                for i in self.items
            ]
        )


def _spawn_ranking(
    built, port: int, retrieval: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    full_env = {
        **os.environ,
        "INKLING_DATA_DIR": str(built.data_dir),
        "INKLING_FEATURE_REPO": str(built.feature_repo),
        "INKLING_REDIS_ADDRESS": built.redis_address,
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "inkling.cli", "serve", "ranking", "--port", str(port),
         "--retrieval-address", retrieval, *extra],
        cwd=PROJECT_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _wait_serving(channel: grpc.Channel, procs: list[subprocess.Popen[str]]) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        for proc in procs:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    raise AssertionError("the server never reported SERVING")


def test_sigterm_drains_an_in_flight_call(built, loop, tmp_path):
    import pyarrow.parquet as pq

    items = pq.read_table(built.catalog_dir / "items.parquet").column("item_id").to_pylist()[:50]

    async def start_slow() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server(
            _SlowRetrieval(items, 2.0), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    slow, slow_port = loop.run(start_slow())
    port = free_port()
    proc = _spawn_ranking(
        built, port, f"127.0.0.1:{slow_port}", "--grace-s", "5",
        env={"INKLING_RANKING_RETRIEVAL_BUDGET_MS": "5000",
             "INKLING_RANKING_DEFAULT_DEADLINE_MS": "8000"},
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        _wait_serving(channel, [proc])
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
        call = stub.Recommend.future(
            ranking_service_pb2.RecommendRequest(session_id="s", num_results=5), timeout=15
        )
        time.sleep(0.7)  # the call is now waiting on the slow retrieval
        proc.send_signal(signal.SIGTERM)
        response = call.result()
        assert len(response.items) == 5
        assert not response.degradation.degraded, response.degradation.detail
        assert {i.source for i in response.items} == {resources_pb2.CANDIDATE_SOURCE_ANN}
        assert proc.wait(timeout=15) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        loop.run(slow.stop(0))


def test_settings_from_the_environment_reach_the_server():
    from inkling.serving.settings import load_server_settings

    rs = load_server_settings(
        RankingSettings,
        "ranking",
        environ={"INKLING_RANKING_CATEGORY_BOOSTS": "c01=1.5,c02=0.5", "INKLING_RANKING_PORT": "0"},
    )
    assert rs.category_boosts == {"c01": 1.5, "c02": 0.5}
    assert replace(rs, port=1).port == 1


@pytest.mark.timeout(240)
def test_workers_share_one_port_and_stop_together(built):
    port = free_port()
    parent = _spawn_ranking(built, port, "127.0.0.1:1", "--workers", "2", "--grace-s", "2")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        _wait_serving(channel, [parent])
        # Both workers come up; then fresh connections reach the port, whichever answers.
        deadline = time.monotonic() + 120
        lines: list[str] = []
        while time.monotonic() < deadline and sum("SERVING on" in x for x in lines) < 2:
            assert parent.stdout is not None
            lines.append(parent.stdout.readline())
        assert sum("SERVING on" in x for x in lines) == 2, lines
        pids = {x.split("[")[1].split("]")[0] for x in lines if "ranking ready" in x}
        assert len(pids) == 2, lines
        for _ in range(5):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                reply = ranking_service_pb2_grpc.RankingServiceStub(fresh).Recommend(
                    ranking_service_pb2.RecommendRequest(session_id="s", num_results=3), timeout=5
                )
                assert len(reply.items) == 3
        channel.close()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_model_manifest_is_checked_against_the_live_feast_registry(built):
    from inkling.feature_store.columns import resolve_service
    from inkling.models.registry import Manifest, check_against_store, service_columns

    store = open_store(built)
    columns = service_columns(resolve_service(store, "ranker_v1"))
    assert columns["item_features:item_in_stock"] == "BOOL"
    manifest = Manifest("ranker", "v1", "baseline", "ranker_v1", columns)
    check_against_store(manifest, store)
    with pytest.raises(ConfigurationError, match="ranker_v9, which the Feast registry does not"):
        check_against_store(replace(manifest, feature_service="ranker_v9"), store)
    retyped = {**columns, "item_features:item_pop_7d": "DOUBLE"}
    with pytest.raises(ConfigurationError, match=r"item_pop_7d \(DOUBLE -> INT64\)"):
        check_against_store(replace(manifest, columns=retyped), store)


def test_a_trained_ranker_is_served_and_a_new_version_swaps_in_under_load(built, loop, tmp_path):
    from batch.train_ranker import train_ranker
    from inkling.models import SasRecConfig
    from inkling.models.registry import ModelRegistry

    registry_dir = tmp_path / "registry"
    quick = SasRecConfig(max_epochs=2, eval_every=1, max_train_seconds=20)
    first, table = train_ranker(built, seconds=20, config=quick, registry_dir=registry_dir)
    assert [row["model"] for row in table] == [
        "most_popular", "item_knn", "sasrec", "sasrec_history_only"
    ]  # fmt: skip
    registry = ModelRegistry(registry_dir)
    assert registry.current_version("ranker") == first.version
    assert first.metrics["test"]["full"], first.metrics
    # The server scores through TorchScript; it must agree with the eager model.
    import numpy as np

    from inkling.models import SasRecRecommender
    from ranking_server.scoring import SequenceScorer

    model = SasRecRecommender.load(registry.path("ranker", first.version))
    scorer = SequenceScorer(model, "check")
    for history, flags in (
        (np.array([1, 2, 3]), np.array([1, 0, 1])),
        (np.arange(1, 80) % model.n_items + 1, np.arange(79) % 2),
        (np.array([], int), np.array([], int)),
    ):
        np.testing.assert_allclose(
            scorer._catalogue_scores(history, flags)[1:],
            model.score([history], [flags])[0][1:],
            atol=1e-5,
        )

    retrieval: Running = loop.run(
        start_server(RetrievalApp(built, RetrievalSettings(port=0)), port=0, grace_s=2)
    )
    rs = RankingSettings(port=0, retrieval_address=f"127.0.0.1:{retrieval.port}",
                         registry_dir=registry_dir, model_poll_s=0.2)  # fmt: skip
    ranking: Running = loop.run(start_server(RankingApp(built, rs), port=0, grace_s=2))
    user, session = _user_with_history(built)
    request = ranking_service_pb2.RecommendRequest(user_id=user, session_id=session, num_results=10)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
        reply = stub.Recommend(request, timeout=5)
        assert reply.served_by.model_version == f"ranker:{first.version}"
        assert len(reply.items) == 10 and not reply.degradation.degraded

        # A second version (the same weights re-published), made CURRENT while calls run.
        second = registry.publish(
            registry.path("ranker", first.version), model="ranker", kind="sasrec",
            feature_service=first.feature_service, columns=first.columns, version="v2",
        )  # fmt: skip
        calls = [stub.Recommend.future(request, timeout=10) for _ in range(40)]
        registry.set_current("ranker", second.version)
        deadline = time.monotonic() + 30
        versions: list[str] = []
        while time.monotonic() < deadline:
            calls.append(stub.Recommend.future(request, timeout=10))
            time.sleep(0.02)
            if calls[-1].result().served_by.model_version == "ranker:v2":
                break
        for _ in range(20):
            calls.append(stub.Recommend.future(request, timeout=10))
        for call in calls:
            response = call.result()  # raises if any call failed
            assert len(response.items) == 10
            versions.append(response.served_by.model_version)
        assert versions[0] == f"ranker:{first.version}"
        assert versions[-20:] == ["ranker:v2"] * 20
        channel.close()
    finally:
        loop.run(ranking.stop())

    # An experiment: the first version serves half of the users, by a hash of the user id.
    rs = replace(rs, candidate_version=first.version, candidate_share=0.5)
    ranking = loop.run(start_server(RankingApp(built, rs), port=0, grace_s=2))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
        served = {}
        for i in range(60):
            reply = stub.Recommend(
                ranking_service_pb2.RecommendRequest(
                    user_id=f"visitor-{i}", session_id=f"s-{i}", num_results=3
                ),
                timeout=5,
            )
            served[f"visitor-{i}"] = reply.served_by.model_version
        assert set(served.values()) == {f"ranker:{first.version}", "ranker:v2"}
        again = stub.Recommend(
            ranking_service_pb2.RecommendRequest(
                user_id="visitor-7", session_id="another", num_results=3
            ),
            timeout=5,
        )
        assert again.served_by.model_version == served["visitor-7"]  # sticky per user
        channel.close()
        # Every answer's serve record names the experiment and the arm that served it.
        client = bus.sync_client(built.redis_address)
        deadline = time.monotonic() + 10
        while True:
            records = {
                record.user_id: record
                for p in range(4)
                for e in bus.read_partition(client, p)
                if e.serve
                and (record := resources_pb2.ServeRecord.FromString(e.payload)).user_id.startswith(
                    "visitor-"
                )
            }
            if len(records) == 60 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        client.close()
        assert len(records) == 60
        for user, version in served.items():
            record = records[user]
            arm = "candidate" if version == f"ranker:{first.version}" else "control"
            assert (record.experiment, record.arm, record.model_version) == (
                "ranker-candidate", arm, version,
            )  # fmt: skip
    finally:
        loop.run(ranking.stop())

    # A canary from the registry (what `inkling retrain` writes) is followed while serving:
    # started, then ended, without a restart.
    rs = RankingSettings(port=0, retrieval_address=f"127.0.0.1:{retrieval.port}",
                         registry_dir=registry_dir, model_poll_s=0.2)  # fmt: skip
    ranking = loop.run(start_server(RankingApp(built, rs), port=0, grace_s=2))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
        stub = ranking_service_pb2_grpc.RankingServiceStub(channel)

        def versions_served() -> set[str]:
            return {
                stub.Recommend(
                    ranking_service_pb2.RecommendRequest(
                        user_id=f"visitor-{i}", session_id=f"s-{i}", num_results=3
                    ),
                    timeout=5,
                ).served_by.model_version
                for i in range(40)
            }

        assert versions_served() == {"ranker:v2"}
        registry.set_canary("ranker", first.version, 0.5, "canary-test")
        deadline = time.monotonic() + 20
        while versions_served() != {"ranker:v2", f"ranker:{first.version}"}:
            assert time.monotonic() < deadline, "the canary never started"
        registry.end_canary("ranker")
        deadline = time.monotonic() + 20
        while versions_served() != {"ranker:v2"}:
            assert time.monotonic() < deadline, "the canary never ended"
        channel.close()
    finally:
        loop.run(ranking.stop())
        loop.run(retrieval.stop())


# --------------------------------------------------------------------------- telemetry


def _children(spans: list[Any], parent: Any) -> list[Any]:
    """`parent`'s direct children, by start time."""
    ctx = parent.get_span_context()
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == ctx.span_id]
    return sorted(kids, key=lambda s: s.start_time)


def test_one_debug_recommend_is_one_trace_across_both_servers(otel, built, ranking_stub):
    from opentelemetry.trace import SpanKind

    user, session = _user_with_history(built)
    otel.spans.clear()
    reply = ranking_stub.Recommend(
        ranking_service_pb2.RecommendRequest(
            user_id=user, session_id=session, num_results=10, debug=True
        ),
        timeout=10,
    )
    assert len(reply.items) == 10
    spans = list(otel.spans.get_finished_spans())
    (ranking,) = [s for s in spans if s.name == "inkling.v1.RankingService/Recommend"]
    (client,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    (retrieval,) = [s for s in spans if s.name == "inkling.v1.RetrievalService/RetrieveCandidates"
                    and s.kind == SpanKind.SERVER]  # fmt: skip
    # One trace: the caller's context crossed to retrieval in the gRPC metadata.
    assert {s.context.trace_id for s in spans} == {ranking.context.trace_id}
    assert ranking.parent is None and ranking.kind == SpanKind.SERVER
    assert client.name == "inkling.v1.RetrievalService/RetrieveCandidates"
    assert client.parent.span_id == ranking.context.span_id
    assert retrieval.parent.span_id == client.context.span_id
    assert ranking.attributes["rpc.system.name"] == "grpc"
    assert ranking.attributes["rpc.response.status_code"] == "OK"
    assert ranking.attributes["inkling.debug"] is True
    assert ranking.attributes["inkling.model.version"] == reply.served_by.model_version
    assert ranking.attributes["inkling.experiment.arm"] == "none"
    assert ranking.attributes["inkling.feature_service"] == "ranker_v1"
    assert ranking.attributes["inkling.degraded.reasons"] == ()
    # The stages, in order, under each server span.
    stages = [s for s in _children(spans, ranking) if s.kind == SpanKind.INTERNAL]
    assert [s.name for s in stages] == ["retrieve", "hydrate", "score", "policy"]
    hydrate = stages[1]
    assert [s.name for s in _children(spans, hydrate)] == [
        "hydrate.online_store",
        "hydrate.snapshot",
    ]
    assert hydrate.attributes["inkling.candidates"] > 0
    assert stages[2].attributes["inkling.model.version"] == reply.served_by.model_version
    assert [s.name for s in _children(spans, retrieval)] == [
        "read_rows",
        "covisitation",
        "ann",
        "filter",
        "popularity",
    ]
    for parent in (ranking, retrieval):
        kids = _children(spans, parent)
        assert all(parent.start_time <= k.start_time <= k.end_time <= parent.end_time for k in kids)
        assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(kids)
                   if a.kind == b.kind == SpanKind.INTERNAL)  # fmt: skip
    # The tree `make demo` prints: every span once, each under its parent.
    tree = trace_tree(spans, ranking.context.trace_id).splitlines()
    assert len(tree) == len(spans)
    assert tree[0].startswith("inkling.v1.RankingService/Recommend [server]  ")
    indent = {line.strip().split("  ")[0]: len(line) - len(line.lstrip()) for line in tree}
    assert indent["hydrate.online_store"] == indent["hydrate"] + 2 == 4
    retrieve = "inkling.v1.RetrievalService/RetrieveCandidates"
    assert indent[f"{retrieve} [server]"] == indent[f"{retrieve} [client]"] + 2
    assert indent["ann"] == indent[f"{retrieve} [server]"] + 2


def test_invalid_argument_keeps_its_status_and_details_and_is_measured(otel, ranking_stub):
    def invalid_count() -> int:
        return sum(
            p.count
            for p in otel.points("rpc.server.call.duration")
            if p.attributes.get("rpc.method") == "inkling.v1.RankingService/Recommend"
            and p.attributes.get("rpc.response.status_code") == "INVALID_ARGUMENT"
        )

    before = invalid_count()
    with pytest.raises(grpc.RpcError) as err:
        ranking_stub.Recommend(
            ranking_service_pb2.RecommendRequest(session_id="s", num_results=0), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_results" in err.value.details()
    # An abort sends its status before the handler unwinds: the measurement follows.
    deadline = time.monotonic() + 5
    while invalid_count() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert invalid_count() == before + 1


def test_metrics_are_served_for_prometheus_and_pass_promtool(otel, built, ranking_stub):
    import shutil
    import subprocess
    import urllib.request

    user, session = _user_with_history(built)
    for _ in range(3):
        ranking_stub.Recommend(
            ranking_service_pb2.RecommendRequest(user_id=user, session_id=session, num_results=5),
            timeout=10,
        )
    address = otel.telemetry.metrics_address
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    method = 'rpc_method="inkling.v1.RankingService/Recommend"'
    expected = [
        ("rpc_server_call_duration_seconds_bucket", method),
        ("rpc_client_call_duration_seconds_bucket", 'rpc_response_status_code="OK"'),
        ("inkling_stage_duration_seconds_bucket", 'stage="hydrate"'),
        ("inkling_stage_duration_seconds_bucket", 'stage="ann"'),
        ("inkling_candidates", 'source="covisitation"'),
        ("inkling_snapshot_age_seconds", 'snapshot="ranker_v1"'),
        ("inkling_snapshot_build_duration_seconds_bucket", 'snapshot="retrieval_v1"'),
        ("inkling_model_info", 'role="ranking"'),
        ("inkling_online_store_duration_seconds_bucket", 'operation="read_rows"'),
        ("target_info", 'service_name="inkling-ranking"'),
    ]
    lines = text.splitlines()
    missing = [
        (name, label)
        for name, label in expected
        if not any(line.startswith(name) and label in line for line in lines)
    ]
    assert missing == []
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (Debian's prometheus package)"
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
