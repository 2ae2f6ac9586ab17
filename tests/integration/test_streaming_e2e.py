"""Streaming end to end: events tracked through the ingest server reach the online store
through a stream worker, and `Recommend` follows a session whose intent moves.

Real parts throughout: a redis-server process, a Feast repository applied and
materialized from Spark features, the ingest, retrieval and ranking gRPC servers on
loopback (port 0), and a stream worker on a thread of this process. The last test runs
every process as `inkling` children and a real Prometheus server that scrapes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from batch.generate import GeneratorConfig
from bench.harness.processes import cli_process, server_process, wait_serving
from bench.harness.scrape import scrape_histogram
from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.feature_store.feast_store import open_store
from inkling.redis_embedded import free_port
from inkling.serving.runtime import Running, start_server
from inkling.telemetry.providers import METRICS_PORT_STRIDE
from inkling.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
)
from stream_worker.app import run_worker
from stream_worker.settings import WorkerSettings
from tests.integration.test_servers import Loop, served, start_pair

pytestmark = [pytest.mark.spark, pytest.mark.redis]

DB = 6  # this module's database of the shared test Redis (3, 4, 5 and 7 belong to others)


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server):
    return served(
        tmp_path_factory.mktemp("streaming"), spark, redis_server, DB,
        GeneratorConfig(users=150, items=400, sessions=700, days=3, seed=11),
    )  # fmt: skip


@contextlib.contextmanager
def streaming_stack(settings: Settings) -> Iterator[tuple[int, int]]:
    """(events port, ranking port): the ingest, retrieval and ranking servers over
    `settings`' online store, with a stream worker on a thread consuming the bus; all
    stopped at the end, so that the next test's workers own the bus alone."""
    loop = Loop()
    events: Running = loop.run(start_server(EventsApp(settings, EventsSettings(port=0)), port=0))
    retrieval, ranking = start_pair(loop, settings, grace_s=1)
    stop = threading.Event()
    worker_settings = WorkerSettings(batch_max_wait_ms=20.0, log_flush_s=0.5, poll_ms=50.0)
    worker = threading.Thread(
        target=run_worker, args=(settings, worker_settings, stop), daemon=True
    )
    worker.start()
    try:
        yield events.port, ranking.port
    finally:
        stop.set()
        worker.join(20)
        for server in (ranking, retrieval, events):
            loop.run(server.stop())
        loop.close()


@pytest.fixture
def running(built) -> Iterator[tuple[int, int]]:
    with streaming_stack(built) as ports:
        yield ports


def _catalogue(built) -> dict[str, list[str]]:
    """Item ids by category, most popular first (so they are candidates somewhere)."""
    items = pq.read_table(built.catalog_dir / "items.parquet").to_pandas()
    items = items[items.in_stock & ~items.blocked]
    pop = pq.read_table(built.features_dir / "item_features").to_pandas()
    pop = pop.sort_values("event_timestamp").groupby("item_id").item_pop_30d.last()
    items["pop"] = items.item_id.map(pop).fillna(0)
    items = items.sort_values("pop", ascending=False)
    return {c: list(g.item_id) for c, g in items.groupby("category")}


def _event(n: int, session: str, item: str, kind: int, at: datetime) -> resources_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(at)
    return resources_pb2.Event(
        event_id=f"e2e-{session}-{n}", user_id="", session_id=session, item_id=item,
        event_type=kind, timestamp=ts, dwell_ms=40_000 if kind == resources_pb2.EVENT_TYPE_CLICK else 0,
    )  # fmt: skip


def _top_categories(stub, session: str, k: int = 10) -> list[str]:
    """The categories of the top k, best first. (The policy keeps at most 3 of one
    category in the top 20, so it is the order that shows the intent, not the counts.)"""
    reply = stub.Recommend(
        ranking_service_pb2.RecommendRequest(session_id=session, num_results=k), timeout=5
    )
    assert not reply.degradation.degraded, reply.degradation
    return [item.category for item in reply.items]


def _wait_for_intent(built, session: str, category: str, timeout: float = 20.0) -> float:
    """Seconds until the session's online row (read through Feast) shows `category`."""
    store = open_store(built)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        row = store.get_online_features(
            features=["session_features:session_intent_category"],
            entity_rows=[{"session_id": session}],
        ).to_dict()
        if row["session_intent_category"][0] == category:
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"session {session} never showed intent {category} in {timeout} s")


def test_recommend_follows_a_session_whose_intent_moves(built, running):
    follow_a_moving_intent(built, *running)


def follow_a_moving_intent(built: Settings, events_port: int, ranking_port: int) -> None:
    """Track clicks of one category, then of another, through the ingest server; each
    time the session row shows the new intent, and `Recommend` puts it first."""
    by_category = _catalogue(built)
    first, second = sorted(by_category, key=lambda c: -len(by_category[c]))[:2]
    session = "live-intent-shift"
    now = datetime.now(UTC)
    with (
        grpc.insecure_channel(f"127.0.0.1:{events_port}") as events_channel,
        grpc.insecure_channel(f"127.0.0.1:{ranking_port}") as ranking_channel,
    ):
        track = event_service_pb2_grpc.EventServiceStub(events_channel).TrackEvents
        ranking = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel)
        click = resources_pb2.EVENT_TYPE_CLICK
        before = [
            _event(n, session, item, click, now + timedelta(seconds=n))
            for n, item in enumerate(by_category[first][:4])
        ]
        reply = track(event_service_pb2.TrackEventsRequest(events=before), timeout=5)
        assert reply.accepted == 4 and not reply.rejected
        _wait_for_intent(built, session, first)
        shown_first = _top_categories(ranking, session)
        assert shown_first[:3] == [first] * 3, shown_first

        after = [
            _event(10 + n, session, item, click, now + timedelta(seconds=10 + n))
            for n, item in enumerate(by_category[second][:6])
        ]
        reply = track(event_service_pb2.TrackEventsRequest(events=after), timeout=5)
        assert reply.accepted == 6
        _wait_for_intent(built, session, second)
        shown_second = _top_categories(ranking, session)
        assert shown_second[:3] == [second] * 3, shown_second
        # The old intent still counts (its items are in the session), below the new one.
        assert second not in shown_first[:3] and first not in shown_second[:3]


# ------------------------------------------------------------------ Prometheus


def _free_metrics_base(stride: int, count: int) -> int:
    """A port p such that p, p + stride, ... (count ports) are all free now."""
    for _ in range(100):
        base = free_port()
        if base + stride * (count - 1) < 65536 and all(
            _port_free(base + stride * i) for i in range(1, count)
        ):
            return base
    raise RuntimeError("no free series of metrics ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def prometheus_server(workdir: Path, jobs: dict[str, list[str]]) -> Iterator[str]:
    """Debian's Prometheus server on a free loopback port, scraping `jobs` (job name ->
    host:port targets) every second; yields its base URL; stopped when the block ends."""
    binary = shutil.which("prometheus")
    assert binary, "the Prometheus server comes with Debian's prometheus package (make test)"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply,
            ):
                if reply.status == 200:
                    break
            assert time.monotonic() < deadline, "Prometheus never became ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(url: str, expr: str) -> list[tuple[dict[str, str], float]]:
    """Prometheus's instant query API: every series of `expr` with its labels and value."""
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


@pytest.mark.timeout(420)
def test_prometheus_scrapes_every_process_and_sees_requests_stages_freshness_and_lag(
    built, tmp_path
):
    """The four processes run as a deployment runs them (retrieval with `--workers 2`,
    each worker its own metrics port), a real Prometheus scrapes them, and its query API
    shows the series an operator's dashboard reads, with the labels and counts driven."""
    grpc_ports = {role: free_port() for role in ("retrieval", "ranking", "events")}
    retrieval_metrics = _free_metrics_base(METRICS_PORT_STRIDE, 2)
    metrics = {"ranking": free_port(), "events": free_port(), "worker": free_port()}
    retrieval_address = f"127.0.0.1:{grpc_ports['retrieval']}"
    recommends, tracks, per_track = 5, 3, 4
    with contextlib.ExitStack() as stack:
        stack.enter_context(server_process(
            "retrieval", built, grpc_ports["retrieval"],
            "--workers", "2", "--metrics-port", str(retrieval_metrics),
        ))  # fmt: skip
        stack.enter_context(server_process(
            "ranking", built, grpc_ports["ranking"], "--retrieval-address", retrieval_address,
            "--metrics-port", str(metrics["ranking"]),
        ))  # fmt: skip
        stack.enter_context(server_process(
            "events", built, grpc_ports["events"], "--metrics-port", str(metrics["events"])
        ))  # fmt: skip
        stack.enter_context(
            cli_process(built, "worker", "worker", "--metrics-port", str(metrics["worker"]))
        )
        for port in grpc_ports.values():
            asyncio.run(wait_serving(port, timeout_s=240))
        jobs = {
            "inkling-retrieval": [
                f"127.0.0.1:{retrieval_metrics}",
                f"127.0.0.1:{retrieval_metrics + METRICS_PORT_STRIDE}",
            ],
            **{f"inkling-{role}": [f"127.0.0.1:{port}"] for role, port in metrics.items()},
        }
        url = stack.enter_context(prometheus_server(tmp_path, jobs))

        with (
            grpc.insecure_channel(f"127.0.0.1:{grpc_ports['ranking']}") as ranking_channel,
            grpc.insecure_channel(f"127.0.0.1:{grpc_ports['events']}") as events_channel,
        ):
            ranking = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel)
            for n in range(recommends):
                request = ranking_service_pb2.RecommendRequest(
                    session_id=f"prom-{n}", num_results=5
                )
                assert len(ranking.Recommend(request, timeout=30).items) == 5
            track = event_service_pb2_grpc.EventServiceStub(events_channel).TrackEvents
            item = next(iter(_catalogue(built).values()))[0]
            now = datetime.now(UTC)
            for t in range(tracks):
                batch = [
                    _event(n, f"prom-track-{t}", item, resources_pb2.EVENT_TYPE_CLICK, now)
                    for n in range(per_track)
                ]
                reply = track(event_service_pb2.TrackEventsRequest(events=batch), timeout=10)
                assert reply.accepted == per_track

        recommend = 'rpc_method="inkling.v1.RankingService/Recommend"'
        expected: dict[str, tuple[str, float]] = {
            "targets up": ('count(up{job=~"inkling-.*"} == 1)', 5),
            "Recommend OK": (
                f'sum(rpc_server_call_duration_seconds_count{{job="inkling-ranking",{recommend},'
                'rpc_response_status_code="OK",rpc_system_name="grpc"})',
                recommends,
            ),
            "ranking -> retrieval, client side": (
                'sum(rpc_client_call_duration_seconds_count{job="inkling-ranking",'
                'rpc_method="inkling.v1.RetrievalService/RetrieveCandidates"})',
                recommends,
            ),
            "RetrieveCandidates over both retrieval workers": (
                'sum(rpc_server_call_duration_seconds_count{job="inkling-retrieval",'
                'rpc_method="inkling.v1.RetrievalService/RetrieveCandidates"})',
                recommends,
            ),
            "TrackEvents": (
                'sum(rpc_server_call_duration_seconds_count{job="inkling-events",'
                'rpc_method="inkling.v1.EventService/TrackEvents"})',
                tracks,
            ),
            "freshness, one per committed event": (
                'sum(inkling_event_freshness_seconds_count{job="inkling-worker"})',
                tracks * per_track,
            ),
            "lag partitions reported, all caught up": (
                'count(inkling_bus_lag{job="inkling-worker"} == 0)',
                4,
            ),
            "model info, one per serving role": (
                'count(inkling_model_info{role=~"retrieval|ranking"} == 1)',
                3,  # two retrieval workers and one ranking server
            ),
        }
        for stage in ("retrieve", "hydrate", "score", "policy"):
            expected[f"stage {stage}"] = (
                f'sum(inkling_stage_duration_seconds_count{{job="inkling-ranking",stage="{stage}"}})',
                recommends,
            )
        for stage in ("validate", "bus_append"):
            expected[f"stage {stage}"] = (
                f'sum(inkling_stage_duration_seconds_count{{job="inkling-events",stage="{stage}"}})',
                tracks,
            )

        def seen() -> dict[str, float | None]:
            values: dict[str, float | None] = {}
            for name, (expr, _) in expected.items():
                result = _query(url, expr)
                values[name] = result[0][1] if result else None
            return values

        deadline = time.monotonic() + 90
        values = seen()
        while time.monotonic() < deadline and any(
            values[name] != want for name, (_, want) in expected.items()
        ):
            time.sleep(1)
            values = seen()
        wrong = {n: (values[n], w) for n, (_, w) in expected.items() if values[n] != w}
        assert wrong == {}, "(seen, expected) per series: " + repr(wrong)

        # The labels a dashboard groups by: one series per bus partition, per stage, per
        # retrieval worker (two instances of one job), and the status code of each call.
        partitions = {
            m["partition"] for m, _ in _query(url, 'inkling_bus_lag{job="inkling-worker"}')
        }
        assert partitions == {"0", "1", "2", "3"}
        instances = {m["instance"] for m, _ in _query(url, 'up{job="inkling-retrieval"}')}
        assert instances == set(jobs["inkling-retrieval"])
        codes = _query(url, f"sum by (rpc_response_status_code) "
                       f"(rpc_server_call_duration_seconds_count{{{recommend}}})")  # fmt: skip
        assert [m["rpc_response_status_code"] for m, _ in codes] == ["OK"]
        p99 = _query(url, "histogram_quantile(0.99, sum by (le) "
                     '(inkling_event_freshness_seconds_bucket{job="inkling-worker"}))')  # fmt: skip
        assert p99 and 0 < p99[0][1] < 60, p99
        # Every process's own exposition is valid for Prometheus's checker.
        promtool = shutil.which("promtool")
        assert promtool, "promtool comes with Debian's prometheus package (make test)"
        for target in (t for targets in jobs.values() for t in targets):
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as reply:
                exposition = reply.read().decode()
            check = subprocess.run([promtool, "check", "metrics"], input=exposition,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            assert check.returncode == 0, (target, check.stdout + check.stderr)
        # The benchmarks read the same histogram straight from /metrics: same quantile.
        scraped = scrape_histogram(
            [f"127.0.0.1:{metrics['worker']}"], "inkling_event_freshness_seconds"
        )
        assert scraped.count == tracks * per_track
        assert scraped.quantile(0.99) == pytest.approx(p99[0][1], rel=1e-9)
