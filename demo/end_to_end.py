"""`make demo`: the batch half end to end on the embedded defaults.

events (generated or imported) → Spark features → `feast apply` → bulk
materialization into an embedded Redis → a point-in-time training set → one user's
and one item's online features read back through Feast → ALS embeddings and a
FAISS index → the retrieval and ranking servers on loopback, answering Recommend
for a few users through the generated stubs, then shut down; a live session through
ingest and a stream worker; and the feedback loop (`demo.feedback_loop`): the serve log,
a simulated experiment, attribution, the experiment report and one `inkling retrain`.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.compute as pc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from batch.als import AlsConfig, train_als
from batch.build_index import build_retrieval_index
from batch.evaluation import format_table
from batch.features import compute_features
from batch.generate import GeneratorConfig, write_synthetic
from batch.importers import import_file
from batch.materialize import bulk_materialize
from batch.spark import build_session
from batch.train_ranker import train_ranker
from batch.train_retrieval import render_metrics, train_retrieval
from batch.training_set import build_training_set
from bench.harness.scrape import metric_families
from demo.feedback_loop import feedback_loop_demo, render_loop
from demo.live_session import CLICKS_PER_STEP, live_session_demo, render_steps
from demo.recommend import recommend_demo, render
from demo.secured import render_secured, secured_demo
from inkling.config import Settings
from inkling.events.eventlog import EventLog
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.redis_embedded import EmbeddedRedis, free_port
from inkling.telemetry import providers

T = TypeVar("T")
TRAINING_ROWS = 40_000  # every interaction of the demo log (about 31k): the two-tower needs them
ANN_K = 500  # what the retrieval server asks the index for (ann_candidates)
RANKER_SECONDS = 60.0  # the demo's training budget; `inkling train` defaults to 240
RETRIEVAL_SECONDS = 60.0  # a cap: the two-tower stops early on validation in about 10 s


class Stages:
    """Runs named stages, printing progress and keeping their durations."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float, str]] = []

    def run(self, name: str, fn: Callable[[], T], describe: Callable[[T], str] = lambda _: "") -> T:
        print(f"==> {name}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        self.timings.append((name, seconds, describe(result)))
        return result

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.timings)
        lines = [f"{'stage'.ljust(width)}  seconds  result", f"{'-' * width}  -------  ------"]
        lines += [
            f"{name.ljust(width)}  {seconds:7.1f}  {what}" for name, seconds, what in self.timings
        ]
        total = sum(s for _, s, _ in self.timings)
        lines.append(f"{'total'.ljust(width)}  {total:7.1f}")
        return "\n".join(lines)


def _scrape(address: str | None) -> str:
    """Where the metrics were served, and what a scrape found there."""
    if address is None:
        return "telemetry is off (OTEL_SDK_DISABLED): no metrics were served"
    families = sorted(
        {f.name for f in metric_families(address) if f.name.startswith(("inkling_", "rpc_"))}
    )
    return (
        f"metrics: this demo ran retrieval, ranking, ingest and a stream worker in one "
        f"process, so http://{address}/metrics served them all while it ran "
        f"({len(families)} inkling and rpc metric families: {', '.join(families)}). "
        "`inkling serve` and `inkling worker` give each process its own port: retrieval "
        "9461, ranking 9462, events 9463, workers 9464 (README, Telemetry)."
    )


def _format_row(row: dict[str, Any]) -> str:
    return "\n".join(f"    {k:28s} {v}" for k, v in row.items())


def _demo_audience(events: Any) -> list[tuple[str, str]]:
    """The two users seen last, each in their latest session, and an anonymous newcomer."""
    order = pc.sort_indices(events, [("timestamp", "descending")])
    latest = events.take(order).select(["user_id", "session_id"]).to_pylist()
    picked: dict[str, str] = {}
    for row in latest:
        if row["user_id"] is not None and row["user_id"] not in picked:
            picked[row["user_id"]] = row["session_id"]
        if len(picked) == 2:
            break
    return [*picked.items(), ("", "demo-anonymous-session")]


def run_demo(
    settings: Settings,
    import_path: str | None = None,
    import_format: str = "recbole",
    fresh: bool = True,
) -> None:
    # Every server of the demo runs in this process: one /metrics serves them all, and
    # the spans are kept in memory so one Recommend's trace can be printed.
    spans = InMemorySpanExporter()
    with providers.configure("cli", metrics_port=free_port(), span_exporter=spans) as telemetry:
        _run_demo(settings, import_path, import_format, fresh, spans, telemetry)


def _run_demo(
    settings: Settings,
    import_path: str | None,
    import_format: str,
    fresh: bool,
    spans: InMemorySpanExporter,
    telemetry: providers.Telemetry,
) -> None:
    if fresh:
        for path in (settings.events_dir, settings.catalog_dir, settings.features_dir, settings.feast_dir,
                     settings.training_dir, settings.redis_dir, settings.models_dir,
                     settings.data_dir / "registry", settings.serves_dir,
                     settings.impressions_dir, settings.data_dir / "experiments",
                     settings.data_dir / "retrain", settings.data_dir / "tls"):  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
    stages = Stages()
    if import_path:
        stages.run(
            f"import {import_path}",
            lambda: import_file(
                Path(import_path), import_format, settings.events_dir, settings.catalog_dir
            ),
            lambda r: f"{r.events_appended} events, {len(r.rejected)} rejected",
        )
    else:
        stages.run(
            "generate synthetic clickstream",
            lambda: write_synthetic(GeneratorConfig(), settings),
            lambda s: f"{s['events_appended']} events, {s['users']} users, {s['items']} items",
        )
    spark = stages.run(
        "start Spark", lambda: build_session(settings.spark_master, settings.spark_conf, "inkling-demo"),
        lambda s: str(s.sparkContext.master),
    )  # fmt: skip
    outputs = stages.run(
        "Spark feature jobs",
        lambda: compute_features(
            spark, settings.events_dir, settings.catalog_dir, settings.features_dir
        ),
        lambda o: ", ".join(f"{k} {v}" for k, v in o.rows.items()),
    )
    with EmbeddedRedis(settings.redis_dir, persistent=False) as server:
        live = settings.with_redis(server.address)
        stages.run("start embedded Redis", lambda: server.address, lambda a: a)
        stages.run(
            "feast apply",
            lambda: feast_cli(live, "apply", quiet=True),
            lambda _: "registry updated",
        )
        store = open_store(live)
        end = datetime.now(UTC)
        stages.run(
            "materialize into Redis (bulk)",
            lambda: bulk_materialize(store, datetime(1990, 1, 1, tzinfo=UTC), end, progress=False),
            lambda rs: (
                ", ".join(f"{r.view} {r.written}" for r in rs)
                + f" ({sum(r.written for r in rs) / max(sum(r.seconds for r in rs), 1e-9):,.0f} rows/s)"
            ),
        )
        stages.run(
            "training set (next-item, point-in-time)",
            lambda: build_training_set(
                spark,
                store,
                settings.events_dir,
                settings.training_dir,
                kind="next-item",
                max_rows=TRAINING_ROWS,
            ),
            lambda t: f"{len(t.frame)} rows x {len(t.frame.columns)} columns -> {t.path}",
        )
        events = EventLog(settings.events_dir).read(
            ["user_id", "session_id", "item_id", "event_type", "timestamp"]
        )
        sample = events.filter(pc.equal(events.column("event_type"), "purchase"))
        sample = sample if sample.num_rows else events
        last = sample.num_rows - 1
        user_id = next(u for u in reversed(sample.column("user_id").to_pylist()) if u is not None)
        item_id = sample.column("item_id")[last].as_py()
        user_row = store.get_online_features(
            features=store.get_feature_service("ranker_v1"),
            entity_rows=[{"user_id": user_id, "session_id": "", "item_id": item_id}],
        ).to_dict()
        stages.run(
            "ALS embeddings (Spark)",
            lambda: train_als(spark, settings.events_dir, settings.models_dir / "als", AlsConfig()),
            lambda a: f"{len(a.user_ids)} users, {len(a.item_ids)} items x {a.rank}",
        )
        stages.run(
            "FAISS index (chosen by measurement)",
            lambda: build_retrieval_index(
                settings.models_dir / "als", settings.models_dir / "index", k=ANN_K
            ),
            lambda r: f"{r['chosen']} over {r['n_items']} items",
        )
        _, retrieval_metrics = stages.run(
            "train the two-tower retrieval model + its index, publish",
            lambda: train_retrieval(live, seconds=RETRIEVAL_SECONDS, spark=spark),
            lambda r: f"{r[0].model} {r[0].version} is CURRENT",
        )
        _, evaluation = stages.run(
            "train the SASRec ranker, publish to the registry",
            lambda: train_ranker(live, seconds=RANKER_SECONDS, spark=spark),
            lambda r: f"{r[0].model} {r[0].version} is CURRENT",
        )
        who = _demo_audience(events)
        served = stages.run(
            "serve both, Recommend via stubs, shut down",
            lambda: recommend_demo(live, who, enforce_ttl=import_path is None, spans=spans),
            lambda s: f"{len(s.latencies_ms)} calls, {s.where}",
        )
        secured = stages.run(
            "serve both with mutual TLS + allow-list, Recommend as four callers",
            lambda: secured_demo(
                live, who[0], settings.data_dir / "tls", enforce_ttl=import_path is None
            ),
            lambda calls: ", ".join(c.status for c in calls),
        )
        live_steps, intent_a, intent_b = stages.run(
            "live session: ingest + stream worker + Recommend",
            lambda: live_session_demo(live, enforce_ttl=import_path is None),
            lambda r: f"{len(r[0])} steps, intent {r[1]} then {r[2]}",
        )
        scraped = _scrape(telemetry.metrics_address)
        loop = stages.run(
            "feedback loop: serve log, simulated experiment, attribution, report, retrain",
            lambda: feedback_loop_demo(live, spark, RANKER_SECONDS),
            lambda r: (
                f"{r.report.comparison('candidate').verdict}; retrain: "
                f"{r.retrain.decisions[-1]['action']}"
            ),
        )
    spark.stop()

    print()
    print("inkling demo: events -> Spark features -> Feast (Redis) -> training set")
    print(stages.table())
    print()
    print(
        f"online features of user {user_id} and item {item_id}, read back through Feast get_online_features:"
    )
    shown = {k: v[0] for k, v in user_row.items() if k.startswith(("user_", "item_"))}
    print(_format_row(shown))
    print(f"feature rows: {outputs.rows}")
    print()
    ordered = sorted(served.latencies_ms)
    print(
        f"Recommend (top 10 from 1,000 retrieved) through the generated stubs, {len(ordered)} calls "
        f"one at a time: p50 {ordered[len(ordered) // 2]:.1f} ms, max {ordered[-1]:.1f} ms "
        "(a load test is `inkling bench serving`)"
    )
    print(render(served.calls))
    print()
    print(scraped)
    if served.trace:
        print("one more Recommend, sent with debug (always traced): its trace, both servers")
        print(served.trace)
    print()
    print(render_secured(secured))
    print()
    print(
        "offline evaluation, leave-last-out test split (last item per user), full ranking "
        "over the catalogue (a history's own items stay candidates where the training "
        "sequences revisit items, else they are excluded); sampled = the SASRec paper's "
        "protocol:"
    )
    print(format_table(evaluation, "test"))
    print()
    print(
        "two-tower retrieval, held out: the newest 10 % of clicks by time, exact recall over "
        "the catalogue, beside popularity and ALS fitted before the cut:"
    )
    print(render_metrics(retrieval_metrics))
    print()
    print(
        f"a live session, tracked through EventService and applied by a stream worker: "
        f"{CLICKS_PER_STEP} clicks per step in {intent_a}, then in {intent_b}; freshness = "
        "TrackEvents acknowledged -> the session row online; then Recommend for the session:"
    )
    print(render_steps(live_steps, intent_a, intent_b))
    print()
    print("the feedback loop: every answer recorded, outcomes attributed, experiments judged")
    print(render_loop(loop))
