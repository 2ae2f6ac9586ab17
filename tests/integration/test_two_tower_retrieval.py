"""The two-tower retrieval model end to end: a point-in-time training set from Feast
historical retrieval, trained and published by `train_retrieval`, served by a real
grpc.aio retrieval server on loopback over a real Redis, swapped live when CURRENT
moves, refused at start-up when its manifest no longer matches the Feast registry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batch.generate import GeneratorConfig
from batch.train_retrieval import train_retrieval
from batch.training_set import build_training_set
from inkling.errors import ConfigurationError
from inkling.feature_store.feast_store import open_store
from inkling.models.registry import ModelRegistry
from inkling.models.two_tower import TwoTowerConfig
from inkling.serving.runtime import Running, start_server
from inkling.serving.settings import RetrievalSettings
from inkling.v1 import resources_pb2, retrieval_service_pb2, retrieval_service_pb2_grpc
from retrieval_server.app import RetrievalApp
from tests.integration.test_servers import Loop, materialized

pytestmark = [pytest.mark.spark, pytest.mark.redis]

DB = 9  # this module's own database of the shared test Redis
ANN = resources_pb2.CANDIDATE_SOURCE_ANN


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server):
    settings = materialized(
        tmp_path_factory.mktemp("two_tower"), spark, redis_server, DB,
        GeneratorConfig(users=200, items=400, sessions=900, days=4, seed=11),
    )  # fmt: skip
    build_training_set(
        spark,
        open_store(settings),
        settings.events_dir,
        settings.training_dir,
        feature_service="retrieval_v1",
    )
    settings.export_env()
    return settings


@pytest.fixture(scope="module")
def published(built):
    lines: list[str] = []
    config = TwoTowerConfig(max_train_seconds=10, max_epochs=15, batch_size=256)
    manifest, metrics = train_retrieval(
        built, seconds=10, config=config, index_k=100, progress=lines.append
    )
    return manifest, metrics, lines


def _fresh_sessions(built, n: int) -> list[tuple[str, str, str]]:
    """The newest sessions with at least two recent items and a known intent:
    (user id or "", session id, intent category)."""
    sessions = ds.dataset(str(built.features_dir / "session_features")).to_table().to_pandas()
    sessions = sessions.sort_values("session_last_event_timestamp")
    latest = sessions.drop_duplicates("session_id", keep="last")
    latest = latest[latest["session_recent_items"].map(len) >= 2]
    latest = latest[latest["session_intent_category"] != "unknown"]
    events = ds.dataset(str(built.events_dir), partitioning="hive").to_table(
        columns=["session_id", "user_id"]
    )
    user_of = dict(zip(*(events.column(c).to_pylist() for c in ("session_id", "user_id")),
                       strict=True))  # fmt: skip
    return [
        (user_of.get(r.session_id) or "", r.session_id, r.session_intent_category)
        for r in latest.tail(n).itertuples()
    ]


def test_training_publishes_a_measured_index_and_an_honest_comparison(built, published):
    manifest, metrics, lines = published
    assert manifest.kind == "two-tower" and manifest.feature_service == "retrieval_v1"
    assert "user_features:user_top_categories" in manifest.columns
    registry = ModelRegistry(built.data_dir / "registry")
    assert registry.current_version("retrieval") == manifest.version
    path = registry.path("retrieval", manifest.version)
    for name in ("two_tower.pt", "vocab.json", "index/index.faiss", "index/index_report.md",
                 "training.png", "evaluation.md", "item_vectors.npy"):  # fmt: skip
        assert (path / name).is_file(), name
    index = metrics["index"]
    assert index["recall@100"] >= 0.95 and index["p99_us@100"] > 0
    models = metrics["test"]["models"]
    assert {"two_tower", "two_tower_ann", "most_popular", "als"} <= set(models)
    assert models["two_tower"]["recall@100"] > 0
    assert metrics["test"]["rows"] == manifest.training_data["test_rows"] > 0
    assert metrics["query_tower"]["scripted"]["p50_us"] > 0
    assert any("valid recall@100" in line for line in lines)


def test_the_server_answers_from_the_two_tower_with_session_relevant_items(built, published, loop):
    manifest, _, _ = published
    items = pq.read_table(built.catalog_dir / "items.parquet").to_pandas()
    category = dict(zip(items["item_id"], items["category"], strict=True))
    share = items["category"].value_counts(normalize=True)
    rs = RetrievalSettings(port=0, model_poll_s=0.2)
    running: Running = loop.run(start_server(RetrievalApp(built, rs), port=0, grace_s=1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
            matching, baseline = [], []
            for user, session, intent in _fresh_sessions(built, 15):
                reply = stub.RetrieveCandidates(
                    retrieval_service_pb2.RetrieveCandidatesRequest(
                        user_id=user, session_id=session, num_candidates=300
                    ),
                    timeout=5,
                )
                assert reply.served_by.model_version == f"retrieval:{manifest.version}"
                assert reply.served_by.index_version == f"two-tower-{manifest.version}"
                assert reply.served_by.feature_service == "retrieval_v1"
                assert not reply.degradation.degraded, reply.degradation.detail
                # What the two-tower found, in its order (an item co-visitation found first
                # is listed there, with ANN among its other sources).
                ann = [c.item_id for c in reply.candidates if ANN in (c.source, *c.sources)]
                assert len(ann) >= 20, "the two-tower ANN source found too little"
                matching.append(sum(category.get(i) == intent for i in ann[:20]) / 20)
                baseline.append(float(share.get(intent, 0.0)))
            # The session's intent steers the query: its category is over-represented among
            # the nearest items, far beyond its share of the catalogue.
            mean_match, mean_share = sum(matching) / len(matching), sum(baseline) / len(baseline)
            assert mean_match > max(0.25, 2.5 * mean_share), (mean_match, mean_share)

            # An unknown user with a fresh session has no query: popularity answers.
            cold = stub.RetrieveCandidates(
                retrieval_service_pb2.RetrieveCandidatesRequest(
                    session_id="never-seen", num_candidates=20
                ),
                timeout=5,
            )
            assert len(cold.candidates) == 20
            assert ANN not in {c.source for c in cold.candidates}

            # A new CURRENT is picked up while serving, with no failed call.
            registry = ModelRegistry(built.data_dir / "registry")
            registry.publish(
                registry.path("retrieval", manifest.version), model="retrieval",
                kind=manifest.kind, feature_service=manifest.feature_service,
                columns=manifest.columns, version="v2",
            )  # fmt: skip
            session = _fresh_sessions(built, 1)[0][0]
            request = retrieval_service_pb2.RetrieveCandidatesRequest(
                session_id=session, num_candidates=50
            )
            registry.set_current("retrieval", "v2")
            deadline = time.monotonic() + 30
            served = []
            while time.monotonic() < deadline:
                served.append(stub.RetrieveCandidates(request, timeout=5).served_by.model_version)
                if served[-1] == "retrieval:v2":
                    break
                time.sleep(0.05)
            assert served[-1] == "retrieval:v2", served[-5:]
    finally:
        loop.run(running.stop())


def test_a_model_that_no_longer_matches_the_feast_registry_refuses_to_start(
    built, published, loop, tmp_path
):
    manifest, _, _ = published
    source = ModelRegistry(built.data_dir / "registry").path("retrieval", manifest.version)
    registry = ModelRegistry(tmp_path / "registry")
    retyped = {**manifest.columns, "user_features:user_top_category_weights": "STRING_LIST"}
    registry.publish(
        source, model="retrieval", kind="two-tower", feature_service="retrieval_v1",
        columns=retyped, version="bad", make_current=True,
    )  # fmt: skip
    rs = RetrievalSettings(port=0, registry_dir=tmp_path / "registry")
    with pytest.raises(ConfigurationError, match=r"user_top_category_weights \(STRING_LIST"):
        loop.run(start_server(RetrievalApp(built, rs), port=0, grace_s=1))
    other = replace(rs, model="")  # no model: ALS, which this data dir does not have
    with pytest.raises(Exception, match="embeddings"):
        loop.run(start_server(RetrievalApp(built, other), port=0, grace_s=1))
