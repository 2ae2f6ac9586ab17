"""`inkling`: the command line. Settings load once here and pass down explicitly."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inkling.config import ONLINE_STORES, Settings, load_settings
from inkling.errors import (
    ConfigurationError,
    DependencyUnavailableError,
    InklingError,
    InvalidInputError,
    NotFoundError,
)

if TYPE_CHECKING:
    from inkling.models.sasrec import SasRecConfig
    from inkling.serving.security import SecuritySettings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        config_file=args.config,
        overrides={
            "data_dir": args.data_dir,
            "online_store": args.online_store,
            "redis_address": args.redis,
            "spark_master": getattr(args, "master", None),
            "spark_conf": getattr(args, "spark_conf", None),
        },
    )


def configured_or_running(settings: Settings) -> Settings:
    """The configured Redis, else the `inkling redis start` server if one is running;
    settings without a Redis address when there is neither."""
    from inkling.redis_embedded import DEFAULT_PORT, daemon_address

    if settings.redis_address:
        return settings
    running = daemon_address(settings.redis_dir, DEFAULT_PORT)
    return settings.with_redis(running) if running else settings


def redis_security(config: Path | None) -> SecuritySettings:
    """The `[security]` table (its `redis_acl` decides how processes connect to Redis)."""
    from inkling.serving.security import SecuritySettings
    from inkling.serving.settings import load_server_settings

    return load_server_settings(SecuritySettings, "security", config)


@contextlib.contextmanager
def online_settings(
    settings: Settings, config: Path | None = None, role: str = "materializer"
) -> Iterator[Settings]:
    """Settings with a usable online store: the configured Redis, the running
    `inkling redis start` server, or a private embedded Redis for this command; with
    Redis ACLs on, connected as `role` (`inkling.redis_acl`)."""
    from inkling.redis_acl import connect_as
    from inkling.redis_embedded import EmbeddedRedis

    if not settings.uses_redis:
        yield settings
        return
    security = redis_security(config)
    if settings.online_store == "redis_cluster":
        from inkling.feature_store.feast_store import require_reachable_redis

        if not settings.redis_address:
            raise ConfigurationError(
                "online_store = redis_cluster needs the cluster's startup nodes in "
                "INKLING_REDIS_ADDRESS (host:port,host:port,...); inkling never starts one"
            )
        connected = connect_as(settings, role, security)
        assert connected.redis_address is not None
        require_reachable_redis(connected.redis_address, cluster=True)
        yield connected
        return
    live = configured_or_running(settings)
    if live.redis_address:
        from inkling.feature_store.feast_store import require_reachable_redis

        connected = connect_as(live, role, security)
        assert connected.redis_address is not None
        require_reachable_redis(connected.redis_address)
        yield connected
        return
    with EmbeddedRedis(settings.redis_dir, acl=security.redis_acl) as server:
        print(
            f"[redis] embedded redis-server on {server.address} (data in {settings.redis_dir})",
            file=sys.stderr,
        )
        yield connect_as(settings.with_redis(server.address), role, security)


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidInputError(f"{text!r} is not an ISO-8601 time") from e
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> None:
    from batch.generate import GeneratorConfig, write_synthetic

    config = GeneratorConfig(
        users=args.users, items=args.items, categories=args.categories, sessions=args.sessions,
        days=args.days, start=args.start, seed=args.seed,
    )  # fmt: skip
    summary: dict[str, object] = dict(write_synthetic(config, settings))
    if args.serve_requests:
        summary["simulation"] = _simulate_serving(args, settings)
    print(json.dumps(summary, indent=1))


def _simulate_serving(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    """`inkling generate --serve-requests N`: answers and the users' responses, logged."""
    import pyarrow.parquet as pq

    from batch.generate import default_start
    from batch.simulate import SimArm, SimulationConfig, simulate
    from inkling.events.eventlog import EventLog
    from inkling.events.servelog import ServeLog

    lifts = {}
    for pair in args.lift or []:
        arm, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInputError(
                f"--lift takes arm=fraction (e.g. candidate=0.05), got {pair!r}"
            )
        try:
            lifts[arm.strip()] = float(value)
        except ValueError:
            raise InvalidInputError(f"--lift {pair!r}: {value!r} is not a number") from None
    unknown = set(lifts) - {"control", "candidate"}
    if unknown:
        raise InvalidInputError(f"--lift names no arm of the simulation: {sorted(unknown)}")
    config = SimulationConfig(
        requests=args.serve_requests, users=args.users, hours=24,
        start=f"{default_start(1)}T00:00:00", experiment=args.experiment, seed=args.seed,
        arms=tuple(SimArm(a, 0.5, lift=lifts.get(a, 0.0)) for a in ("control", "candidate")),
    )  # fmt: skip
    items = pq.read_table(settings.catalog_dir / "items.parquet")
    sim = simulate(config, items)
    appended = EventLog(settings.events_dir).append(sim.events).appended
    ServeLog(settings.serves_dir).append(sim.serves, prefix="simulated")
    truth = sim.impressions.group_by("arm").aggregate([("click_probability", "mean")])
    return {
        "answers": sim.serves.num_rows,
        "events_appended": appended,
        "experiment": config.experiment,
        "true_ctr": dict(
            zip(truth.column("arm").to_pylist(), truth.column(1).to_pylist(), strict=True)
        ),
    }


def cmd_experiment_report(args: argparse.Namespace, settings: Settings) -> None:
    import pyarrow.dataset as ds

    from batch.experiment_report import build_report, catalogue_prices, write_report

    if not any(settings.impressions_dir.glob("date=*/*.parquet")):
        raise InvalidInputError(
            f"no labelled impressions in {settings.impressions_dir}: run `inkling attribute`"
        )
    impressions = ds.dataset(str(settings.impressions_dir), partitioning="hive").to_table()
    prices = catalogue_prices(settings.catalog_dir / "items.parquet")
    try:
        report = build_report(
            impressions, args.name, control=args.control, prices=prices, alpha=args.alpha,
            tau_relative=args.tau, checkpoint_s=args.checkpoint_s,
        )  # fmt: skip
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    out = Path(args.out) if args.out else settings.data_dir / "experiments" / args.name
    paths = write_report(report, out)
    print(report.markdown())
    print(f"\nwritten: {', '.join(str(p) for p in paths.values())}")


def cmd_experiment_validate(args: argparse.Namespace, settings: Settings) -> None:
    import pyarrow.parquet as pq

    from batch.experiment_report import validate

    items = pq.read_table(
        settings.catalog_dir / "items.parquet", columns=["item_id", "category", "price"]
    )
    for lift in (0.0, args.lift):
        v = validate(
            items,
            runs=args.runs,
            requests=args.requests,
            lift=lift,
            alpha=args.alpha,
            seed=args.seed,
        )
        what = "false positives (A/A)" if lift == 0 else f"detections of a {lift:+.0%} CTR lift"
        print(
            f"{what}: {v.decided} of {v.runs} runs of {v.requests:,} requests = {v.rate:.1%} "
            f"(95 % CI {v.low:.1%}-{v.high:.1%}); alpha {args.alpha}"
        )


def cmd_import(args: argparse.Namespace, settings: Settings) -> None:
    from batch.importers import import_file, write_report

    mapping = {}
    for pair in args.map or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInputError(f"--map takes field=column, got {pair!r}")
        mapping[key.strip()] = value.strip()
    report = import_file(
        Path(args.path), args.format, settings.events_dir, settings.catalog_dir,
        mapping=mapping, timestamp_unit=args.timestamp_unit, event_type=args.event_type, sep=args.sep,
    )  # fmt: skip
    print(report.summary())
    print(f"full report: {write_report(report, settings.data_dir / 'reports')}")
    if report.events_appended == 0:
        if all(bad.reason == "event_id already in the log" for bad in report.rejected):
            print(f"nothing new in {args.path}: every row is already in the event log")
            return
        raise InvalidInputError(
            f"nothing was imported from {args.path}: every row was rejected (reasons above)"
        )


def cmd_features(args: argparse.Namespace, settings: Settings) -> None:
    from batch.features import compute_features
    from batch.spark import build_session

    if not any(settings.events_dir.glob("date=*/*.parquet")):
        raise NotFoundError(
            f"the event log at {settings.events_dir} has no events: run `inkling import FILE "
            "--format ...` (your data) or `inkling generate` (synthetic) first"
        )
    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-features")
    outputs = compute_features(
        spark, settings.events_dir, settings.catalog_dir, settings.features_dir
    )
    print(json.dumps(outputs.rows, indent=1))


def cmd_evaluate_policy(args: argparse.Namespace, settings: Settings) -> None:
    from batch.ope import evaluate, format_evaluation, logged_from_serve_log
    from inkling.exploration import Guardrails, PolicySpec

    try:
        target = PolicySpec.parse(args.target)
    except ValueError as e:
        raise InvalidInputError(f"--target: {e}") from None
    if args.simulate:
        try:
            logging = PolicySpec.parse(args.logging_policy or "plackett_luce(temperature=1)")
        except ValueError as e:
            raise InvalidInputError(f"--logging-policy: {e}") from None
        _evaluate_policy_simulated(args, target, logging)
        return
    import pyarrow.dataset as ds

    from inkling.events.servelog import ServeLog

    serves = ServeLog(settings.serves_dir).read()
    if not any(settings.impressions_dir.glob("date=*/*.parquet")):
        raise InvalidInputError(
            f"no labelled impressions in {settings.impressions_dir}: run `inkling attribute`"
        )
    impressions = ds.dataset(
        str(settings.impressions_dir), format="parquet", partitioning="hive"
    ).to_table(columns=["request_id", "position", "clicked"])
    logged, skipped = logged_from_serve_log(serves, impressions, args.logging_policy)
    print(f"serve log: {len(logged)} exploring answers; left out {skipped}")
    if not logged:
        raise InvalidInputError(
            "no answer of an exploring policy with labelled impressions: set a stochastic "
            "policy for a surface ([ranking] policies) and run `inkling attribute`"
        )
    rules = Guardrails(args.max_per_category, args.diversity_window)
    result = evaluate(
        logged,
        target,
        rules=rules,
        bootstrap=args.bootstrap,
        seed=args.seed,
        marginal_samples=args.marginal_samples,
    )
    print(format_evaluation(result))


def _evaluate_policy_simulated(args: argparse.Namespace, target: Any, logging: Any) -> None:
    from dataclasses import replace
    from pathlib import Path

    import numpy as np

    from batch.explore_sim import (
        RULES,
        ExploreConfig,
        WeekConfig,
        World,
        bandit_week,
        log_policy,
        plot_week,
        requests,
        true_value,
    )
    from batch.ope import evaluate, format_evaluation
    from inkling.exploration import PolicySpec

    world = World.build(ExploreConfig(seed=args.seed))
    reqs = requests(world, args.requests, seed=args.seed + 1)
    truth = true_value(world, reqs, target, draws=20)
    for policy in (PolicySpec.of("uniform"), logging):
        logged = log_policy(world, reqs, policy, seed=args.seed + 2)
        result = evaluate(
            logged,
            target,
            rules=RULES,
            bootstrap=args.bootstrap,
            seed=args.seed,
            marginal_samples=args.marginal_samples,
        )
        print(f"\nlogged by {policy.name}")
        print(format_evaluation(result, truth))
    if args.repetitions:
        _coverage(args, world, reqs, target, logging, truth)
    if not args.week:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    week = WeekConfig(world=replace(WeekConfig().world, seed=args.seed))
    results = [bandit_week(week, policy) for policy in ("greedy", "bandit")]
    print("\na week with arriving items (2,000 requests a day):")
    for r in results:
        per_day = r.reward.reshape(7, -1).mean(axis=1)
        print(
            f"{r.policy:<7} clicks/list {r.reward.mean():.4f}  regret/list "
            f"{(r.oracle - r.reward).mean():.4f}  by day {np.round(per_day, 3).tolist()}\n"
            f"        new items' observed-vs-true CTR rank correlation by day "
            f"{np.round(r.new_rank_correlation, 2).tolist()}; "
            f"impressions per new item {np.round(r.new_impressions, 1).tolist()}"
        )
    plot_week(results, str(out / "bandit_week.png"))
    print(f"plot: {out / 'bandit_week.png'}")
    if args.week_seeds > 1:
        print(f"\nthe week on {args.week_seeds} worlds (seeds {args.seed}..):")
        print(
            "seed  greedy clicks/list  bandit clicks/list  bandit vs greedy  new-item CTR rank corr."
        )
        for seed in range(args.seed, args.seed + args.week_seeds):
            world_s = replace(WeekConfig().world, seed=seed)
            g, b = (  # the first world's week is the one plotted above
                results if seed == args.seed
                else [bandit_week(WeekConfig(world=world_s), p) for p in ("greedy", "bandit")]
            )  # fmt: skip
            print(
                f"{seed:>4}  {g.reward.mean():18.4f}  {b.reward.mean():18.4f}  "
                f"{100 * (b.reward.sum() / g.reward.sum() - 1):+15.2f}%  "
                f"{g.new_rank_correlation[-1]:.2f} -> {b.new_rank_correlation[-1]:.2f}"
            )


def _coverage(
    args: argparse.Namespace, world: Any, reqs: Any, target: Any, logging: Any, truth: float
) -> None:
    """Each estimator's error and interval coverage over logs redrawn with new seeds (the
    same requests: the logging policy's draws and the clicks change)."""
    from dataclasses import replace

    import numpy as np

    from batch.explore_sim import RULES, log_policy
    from batch.ope import ESTIMATORS, evaluate

    errors: dict[str, list[float]] = {}
    covered: dict[str, int] = {}
    for rep in range(args.repetitions):
        redrawn = [replace(r, seed=r.seed + 1 + rep) for r in reqs]
        logged = log_policy(world, redrawn, logging, seed=args.seed + 100 + rep)
        result = evaluate(
            logged,
            target,
            rules=RULES,
            bootstrap=args.bootstrap,
            seed=rep,
            marginal_samples=args.marginal_samples,
        )
        for name, e in result.estimates.items():
            errors.setdefault(name, []).append((e.value - truth) / truth)
            covered[name] = covered.get(name, 0) + (e.low <= truth <= e.high)
        print(f"[evaluate-policy] repetition {rep + 1} of {args.repetitions}", file=sys.stderr)
    print(
        f"\n{args.repetitions} logs by {logging.name}, {len(reqs)} requests each; truth {truth:.4f}"
    )
    print(f"{'estimator':<12} {'median |error|':>15} {'max |error|':>12} {'CI covers truth':>16}")
    for name in (name for name in ESTIMATORS if name in errors):
        err = np.abs(errors[name])
        print(
            f"{name:<12} {100 * np.median(err):14.1f}% {100 * err.max():11.1f}% "
            f"{covered[name]:>8} of {args.repetitions}"
        )


def cmd_attribute(args: argparse.Namespace, settings: Settings) -> None:
    from batch.attribution import run_attribution
    from batch.spark import build_session

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-attribute")
    stats = run_attribution(
        spark, settings.serves_dir, settings.events_dir, settings.impressions_dir, args.window
    )
    print(json.dumps(dataclasses.asdict(stats), indent=1))
    print(f"labelled impressions in {settings.impressions_dir}")


def cmd_retrain(args: argparse.Namespace, settings: Settings) -> None:
    from batch.retrain import Gates, run_retrain
    from batch.spark import build_session

    explained = {}
    for pair in args.explain or []:
        feature, sep, why = pair.partition("=")
        if not sep or not why.strip():
            raise InvalidInputError(f"--explain takes feature=why, got {pair!r}")
        explained[feature.strip()] = why.strip()
    gates = Gates(
        tolerance=args.tolerance, psi_threshold=args.psi, canary_share=args.canary_share,
        alpha=args.alpha,
    )  # fmt: skip
    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-retrain")
    with online_settings(settings, args.config) as live:
        result = run_retrain(
            live, spark, seconds=args.seconds, gates=gates, explained=explained,
            recent_days=args.recent_days, reference_days=args.reference_days,
        )  # fmt: skip
    print(json.dumps(result.decisions, indent=1, default=str))
    if result.drift is not None:
        print(result.drift.read_text())


def cmd_apply(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.feature_store.feast_store import feast_cli

    with online_settings(settings, args.config) as live:
        feast_cli(live, "apply")


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> None:
    from batch.materialize import bulk_materialize
    from inkling.feature_store.feast_store import open_store, require_feature_tables

    end = _parse_time(args.end) if args.end else datetime.now(UTC)
    start = _parse_time(args.start) if args.start else datetime(1990, 1, 1, tzinfo=UTC)
    with online_settings(settings, args.config) as live:
        store = open_store(live)
        require_feature_tables(live)
        began = time.perf_counter()
        if args.stock or not live.uses_redis:
            store.materialize(start, end, feature_views=args.views)
            if live.online_store == "redis_cluster":
                from batch.materialize import index_items

                # Feast's writer does not keep the item index the snapshot reads.
                print(f"item index: {index_items(store)} item rows indexed")
        else:
            bulk_materialize(store, start, end, views=args.views)
        print(
            f"materialized {start.isoformat()} .. {end.isoformat()} in {time.perf_counter() - began:.1f}s"
        )


def cmd_forget(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.erasure import forget_user
    from inkling.events.bus import sync_client
    from inkling.feature_store.feast_store import open_store
    from inkling.pseudonym import configured
    from inkling.serving.security import SecuritySettings
    from inkling.serving.settings import load_server_settings

    security = load_server_settings(SecuritySettings, "security", args.config)
    pseudonyms = configured(
        security.pseudonymising, security.pseudonym_keys_file, settings.data_dir
    )
    # Stored under a pseudonym per key of the file (inkling.pseudonym), else as sent.
    stored = pseudonyms.every_version(args.user) if pseudonyms is not None else [args.user]
    reports = []
    with online_settings(settings, args.config, role="eraser") as live:
        assert live.redis_address is not None  # online_settings gives the Redis store one
        client = sync_client(live.redis_address, timeout_s=30.0)
        try:
            project = open_store(live).project if live.feature_store_yaml.exists() else "inkling"
            for user_id in stored:
                reports.append(
                    forget_user(
                        live, client, user_id, project=project, flush_wait_s=args.flush_wait
                    )
                )
        finally:
            client.close()
    for report in reports:
        print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    if any(report.incomplete for report in reports):
        raise DependencyUnavailableError(
            "the forget is incomplete; run it again (it is idempotent)"
        )


def cmd_training_set(args: argparse.Namespace, settings: Settings) -> None:
    from batch.spark import build_session
    from batch.training_set import build_training_set
    from inkling.feature_store.feast_store import open_store, require_feature_tables

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-training-set")
    with online_settings(settings, args.config) as live:
        store = open_store(live)
        require_feature_tables(live)
        result = build_training_set(
            spark, store, settings.events_dir, settings.training_dir,
            kind=args.kind, feature_service=args.feature_service, max_rows=args.max_rows,
        )  # fmt: skip
    frame = result.frame
    print(
        f"{len(frame)} rows, {len(frame.columns)} columns, label mean {frame['label'].mean():.3f} -> {result.path}"
    )


def cmd_redis(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.redis_acl import ROLES, rules_text
    from inkling.redis_embedded import DEFAULT_PORT, start_daemon, stop_daemon

    if args.action == "acl":
        print(rules_text(list(ROLES), args.redis_major))
    elif args.action == "start":
        acl = redis_security(args.config).redis_acl
        address = start_daemon(settings.redis_dir, args.port or DEFAULT_PORT, acl=acl)
        print(f"export INKLING_REDIS_ADDRESS={address}")
    else:
        stopped = stop_daemon(settings.redis_dir, args.port or DEFAULT_PORT)
        print("stopped" if stopped else "no embedded redis was running")


def cmd_compact_log(args: argparse.Namespace, settings: Settings) -> None:
    from batch.compact_log import compact_log

    for root in (settings.events_dir, settings.serves_dir):
        report = compact_log(
            root,
            tombstones_dir=settings.events_dir,
            target_rows=args.target_rows,
            min_age_s=args.min_age_s,
        )
        print(f"{root.name}: {report.summary()}")


def cmd_env(args: argparse.Namespace, settings: Settings) -> None:
    live = configured_or_running(settings)
    live.feast_dir.mkdir(parents=True, exist_ok=True)  # where `feast apply` puts the registry
    print("\n".join(live.env_lines()))
    if not live.redis_address:
        print(
            "# INKLING_REDIS_ADDRESS is not set: no Redis is configured or running. For "
            'feature_store.yaml run `eval "$(inkling redis start)"` first; '
            "feature_store.sqlite.yaml needs none.",
            file=sys.stderr,
        )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    from demo.end_to_end import run_demo

    run_demo(settings, import_path=args.import_path, import_format=args.format, fresh=not args.keep)


def cmd_bench_materialize(args: argparse.Namespace, settings: Settings) -> None:
    from bench.materialization import run_materialize_benchmark

    run_materialize_benchmark(
        settings, items=args.items, days=args.days, out=Path(args.out), cluster=args.cluster
    )


def cmd_bench_serving(args: argparse.Namespace, settings: Settings) -> None:
    from bench.servers import run_serving_benchmark

    run_serving_benchmark(
        settings, items=args.items, rate=args.rate, stock_rate=args.stock_rate,
        duration_s=args.duration, out=Path(args.out), reuse=args.reuse,
        telemetry=args.telemetry, rounds=args.rounds, sweep=args.sweep,
        memory_only=args.memory_only, serve_log_rate=args.serve_log_rate,
        serve_log_only=args.serve_log_only,
        policy_only=args.policy_only,
        tls_only=args.tls_only,
    )  # fmt: skip


EVALUATION_MODELS = ("most_popular", "item_knn", "als", "sasrec")
RANKER_BENCH_OUT = "data/bench/ranker"


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from batch.evaluation import (
        AlsBaseline,
        HistoryOnly,
        ItemKNN,
        MostPopular,
        SequenceRecommender,
        format_table,
        run_evaluation,
    )

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EVALUATION_MODELS))
    if unknown or not names:
        raise InvalidInputError(
            f"--models takes {', '.join(EVALUATION_MODELS)}; got {args.models!r}", field="models"
        )
    models: list[SequenceRecommender] = []
    if "most_popular" in names:
        models.append(MostPopular())
    if "item_knn" in names:
        models.append(ItemKNN())
    if "als" in names:
        from batch.als import AlsConfig
        from batch.spark import build_session

        spark = build_session(settings.spark_master, settings.spark_conf, "inkling-evaluate")
        models.append(AlsBaseline(spark, AlsConfig()))
    if "sasrec" in names:
        from inkling.models import SasRecRecommender

        ranker = SasRecRecommender(
            ranker_config(args.sasrec_seconds, args.sasrec_loss, args.sasrec_set)
        )
        # The session-aware ranker, then the same weights without the session part.
        models += [ranker, HistoryOnly(ranker)]
    out = Path(args.out) if args.out else settings.data_dir / "reports" / "evaluation"
    results, paths = run_evaluation(
        settings.events_dir, out, models, dataset=args.dataset, by=args.by,
        min_length=args.min_length, k=args.k, sampled_negatives=args.negatives, seed=args.seed,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        catalog=settings.catalog_dir / "items.parquet",
    )  # fmt: skip
    print(format_table(results, "test"))
    print(f"report: {paths[0]} and {paths[1]}")
    for model in models:
        plot = getattr(model, "plot_curves", None)
        if plot is not None:
            curves = out / f"{model.name}-training.png"
            plot(curves)
            print(f"training curves: {curves}")


def cmd_export(args: argparse.Namespace, settings: Settings) -> None:
    """`inkling export popularity`: a differentially private release, charged to the ledger."""
    from datetime import date

    from batch.popularity_release import release_popularity
    from inkling.privacy.ledger import Budget, PrivacyLedger
    from inkling.privacy.settings import load_privacy_settings

    privacy = load_privacy_settings(args.config)
    last_day = None
    if args.last_day is not None:
        try:
            last_day = date.fromisoformat(args.last_day)
        except ValueError:
            raise InvalidInputError(
                f"--last-day takes a date YYYY-MM-DD, got {args.last_day!r}", field="last_day"
            ) from None
    ledger = PrivacyLedger(
        settings.privacy_ledger, Budget(privacy.epsilon_per_day, privacy.delta_per_day)
    )
    released = release_popularity(
        settings.events_dir, settings.catalog_dir / "items.parquet", ledger, Path(args.out),
        epsilon=args.epsilon, delta=args.delta,
        max_items=privacy.max_items_per_user if args.max_items is None else args.max_items,
        days=args.days, last_day=last_day,
    )  # fmt: skip
    left = ledger.remaining(released.first_day, released.last_day)
    summary = {
        "out": str(released.path), "release_id": released.record.release_id,
        "window": f"{released.first_day}..{released.last_day}", "items": released.items,
        "epsilon": released.record.epsilon, "delta": released.record.delta,
        "mechanism": released.record.mechanism, "ledger": str(settings.privacy_ledger),
        "window_budget_left": {"epsilon": left.epsilon, "delta": left.delta},
    }  # fmt: skip
    print(json.dumps(summary, indent=1))


def add_ranker_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """``--{prefix}loss`` and ``--{prefix}set``: the SASRec ranker's loss and settings
    (checked by SasRecConfig; the parser does not import torch)."""
    p.add_argument(
        f"--{prefix}loss", default=None,
        help="the ranker's training loss: full, uniform, logq, gbce or auto (the default: full "
        "softmax on small catalogues, logQ-corrected sampled softmax above "
        "SasRecConfig.full_softmax_max_items items)",
    )  # fmt: skip
    p.add_argument(
        f"--{prefix}set", default="", metavar="FIELD=VALUE,...",
        help="other ranker settings (SasRecConfig fields), e.g. n_negatives=2048,ffn=swiglu",
    )  # fmt: skip


def ranker_config(seconds: float, loss: str | None, overrides: str) -> SasRecConfig:
    """The ranker's config from the command line: the budget, --loss, then --set."""
    from inkling.models.sasrec import SasRecConfig

    values: dict[str, object] = {"max_train_seconds": seconds}
    if loss is not None:
        values["loss"] = loss
    values.update(SasRecConfig.parse_overrides(overrides))
    return SasRecConfig(**values)  # type: ignore[arg-type]


def cmd_train(args: argparse.Namespace, settings: Settings) -> None:
    from batch.evaluation import format_table
    from batch.spark import build_session
    from batch.train_ranker import train_ranker

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-train")
    with online_settings(settings, args.config) as live:
        if args.model in ("ranker", "all"):
            manifest, table = train_ranker(
                live, seconds=args.seconds, make_current=not args.no_current, spark=spark,
                config=ranker_config(args.seconds, args.loss, args.set),
            )  # fmt: skip
            print(format_table(table, "test"))
            print(f"published ranker {manifest.version}")
        if args.model in ("retrieval", "all"):
            from batch.train_retrieval import render_metrics, train_retrieval

            manifest, metrics = train_retrieval(
                live, seconds=args.seconds, make_current=not args.no_current, spark=spark
            )
            print(render_metrics(metrics))
            print(f"published retrieval {manifest.version}")


def cmd_bench_ranker(args: argparse.Namespace, settings: Settings) -> None:
    if args.train:
        from bench.ranker_train import run_training_benchmark
        from inkling.models.sasrec import SasRecConfig

        try:
            catalogues = [int(n) for n in args.catalogues.split(",") if n.strip()]
        except ValueError:
            raise InvalidInputError(
                f"--catalogues takes item counts like 3000,24000; got {args.catalogues!r}",
                field="catalogues",
            ) from None
        run_training_benchmark(
            catalogues=catalogues, losses=[x.strip() for x in args.losses.split(",") if x.strip()],
            users=args.users, mean_length=args.mean_length, steps=args.steps,
            warmup=args.warmup, threads=args.threads,
            config=SasRecConfig(prefetch=args.prefetch),
            out=Path(args.out if args.out != RANKER_BENCH_OUT else f"{RANKER_BENCH_OUT}-train"),
        )  # fmt: skip
        return
    from bench.ranker import run_ranker_benchmark

    run_ranker_benchmark(
        settings, candidates=args.candidates, seq_len=args.seq_len, rate=args.rate,
        duration_s=args.duration, out=Path(args.out),
    )  # fmt: skip


def cmd_bench_freshness(args: argparse.Namespace, settings: Settings) -> None:
    from bench.freshness import run_freshness_benchmark

    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or min(rates) <= 0:
        raise InvalidInputError(f"--rates takes positive events/s, got {args.rates!r}", "rates")
    if args.workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {args.workers}", "workers")
    buses = tuple(b.strip() for b in args.bus.split(",") if b.strip())
    if not buses or any(b not in ("redis", "kafka") for b in buses):
        raise InvalidInputError(f"--bus takes redis and/or kafka, got {args.bus!r}", "bus")
    run_freshness_benchmark(
        settings, rates=rates, batch=args.batch, duration_s=args.duration, items=args.items,
        out=Path(args.out), reuse=args.reuse, workers=args.workers, buses=buses,
        kafka_broker=args.kafka_broker,
    )  # fmt: skip


def cmd_bench_capacity(args: argparse.Namespace, settings: Settings) -> None:
    from bench.capacity import INPUTS_PATH, OVERRIDES, Population, run_capacity

    population = Population(
        users=args.users, daily_actives=args.daily_actives, recommend_rps=args.recommend_rps,
        events_rps=args.events_rps, items=args.items,
    )  # fmt: skip
    run_capacity(
        population,
        inputs_path=Path(args.inputs) if args.inputs else INPUTS_PATH,
        reports=Path(args.reports) if args.reports else None,
        overrides={name: getattr(args, dest) for name, dest in OVERRIDES.items()},
        out=Path(args.out) if args.out else None,
    )


def cmd_bench_erasure(args: argparse.Namespace, settings: Settings) -> None:
    from bench.erasure_time import run_erasure_benchmark

    for name in ("events", "users", "days", "file_rows"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1", name)
    run_erasure_benchmark(
        Path(args.out), events=args.events, users=args.users, days=args.days,
        file_rows=args.file_rows, reuse=args.reuse,
    )  # fmt: skip


def cmd_embeddings(args: argparse.Namespace, settings: Settings) -> None:
    from batch.als import AlsConfig, train_als
    from batch.spark import build_session

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-embeddings")
    config = AlsConfig(
        rank=args.rank, max_iter=args.iterations, seed=args.seed,
        alpha=args.alpha, reg_param=args.reg_param,
    )  # fmt: skip
    artifact = train_als(spark, settings.events_dir, settings.models_dir / "als", config)
    print(
        f"{len(artifact.user_ids)} users and {len(artifact.item_ids)} items x {artifact.rank} "
        f"dims -> {settings.models_dir / 'als'}"
    )


def cmd_index(args: argparse.Namespace, settings: Settings) -> None:
    from batch.build_index import build_retrieval_index

    report = build_retrieval_index(
        settings.models_dir / "als", settings.models_dir / "index",
        specs=args.spec or None, k=args.k, min_recall=args.min_recall,
    )  # fmt: skip
    print(f"chosen index: {report['chosen']} -> {settings.models_dir / 'index'}")


def serving_settings(settings: Settings, role: str, security: SecuritySettings) -> Settings:
    """Servers need the Redis the features were materialized into: the configured one
    or the `inkling redis start` server; an empty private one would serve nothing. With
    Redis ACLs on, connected as `role` (`inkling.redis_acl`)."""
    from inkling.redis_acl import connect_as

    if not settings.uses_redis:
        raise ConfigurationError(
            "the servers read Redis: set online_store = redis or redis_cluster"
        )
    cluster = settings.online_store == "redis_cluster"
    live = settings if cluster else configured_or_running(settings)
    if not live.redis_address:
        raise ConfigurationError(
            "no Redis to serve from: pass --redis host:port or run `inkling redis start` "
            "(and materialize into it) first"
        )
    from inkling.feature_store.feast_store import require_reachable_redis

    connected = connect_as(live, role, security)
    assert connected.redis_address is not None
    require_reachable_redis(connected.redis_address, cluster=cluster)
    return connected


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import asyncio

    from events_server.settings import EventsSettings
    from inkling.serving.runtime import run_workers, serve, worker_count
    from inkling.serving.security import SecuritySettings
    from inkling.serving.settings import RankingSettings, RetrievalSettings, load_server_settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "grace_s": args.grace_s,
    }
    if args.role == "ranking":
        overrides["retrieval_address"] = args.retrieval_address
    cls: type[Any] = {
        "ranking": RankingSettings,
        "retrieval": RetrievalSettings,
        "events": EventsSettings,
    }[args.role]
    rs: Any = load_server_settings(cls, args.role, args.config, overrides)
    security = load_server_settings(SecuritySettings, "security", args.config)
    workers = worker_count(rs.workers)
    if workers > 1 and not args.reuse_port:
        if rs.port == 0:
            raise ConfigurationError("--workers above 1 needs a fixed --port to share")
        argv = [
            "-m",
            "inkling.cli",
            *args.argv,
            "--workers",
            "1",
            "--port",
            str(rs.port),
            "--reuse-port",
        ]
        raise SystemExit(run_workers(argv, workers, rs.grace_s))
    from inkling.serving.runtime import WORKER_INDEX_ENV
    from inkling.telemetry import logs, providers
    from inkling.telemetry.settings import load_telemetry_settings

    logs.install(f"%(asctime)s {args.role}[%(process)d] %(message)s")
    index = os.environ.get(WORKER_INDEX_ENV)
    telemetry_settings = load_telemetry_settings(args.config)
    telemetry = providers.configure(
        args.role,
        metrics_port=args.metrics_port,
        metrics_host=telemetry_settings.metrics_host or rs.host,
        worker_index=int(index) if index else None,
        settings=telemetry_settings,
    )
    from inkling.redis_acl import SERVE_ROLES

    live = serving_settings(settings, SERVE_ROLES[args.role], security)
    live.export_env()
    from inkling.pseudonym import configured

    pseudonyms = configured(security.pseudonymising, security.pseudonym_keys_file, live.data_dir)
    if args.role == "ranking":
        from ranking_server.app import RankingApp

        app: Any = RankingApp(live, rs, security, pseudonyms)
    elif args.role == "events":
        from events_server.admin import admin_allowed
        from events_server.app import EventsApp

        admin = admin_allowed(security.allow)
        eraser = serving_settings(settings, "eraser", security) if admin else live
        from inkling.events.kafka_bus import load_kafka_settings

        app = EventsApp(
            live, rs, pseudonyms=pseudonyms, admin=admin, admin_redis=eraser.redis_address,
            kafka=load_kafka_settings(args.config),
        )  # fmt: skip
    else:
        from retrieval_server.app import RetrievalApp

        app = RetrievalApp(live, rs)

    def ready(running: Any) -> None:
        metrics = (
            f", metrics at http://{telemetry.metrics_address}/metrics"
            if telemetry.metrics_address
            else ""
        )
        print(
            f"[serve] {args.role} SERVING on {rs.host}:{running.port}{metrics}; "
            f"{security.describe()}"
            + (
                f"; user ids pseudonymised (key {pseudonyms.keys[0].version})"
                if pseudonyms is not None and args.role != "retrieval"
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )

    with telemetry:
        asyncio.run(
            serve(
                app,
                host=rs.host,
                port=rs.port,
                grace_s=rs.grace_s,
                reuse_port=args.reuse_port,
                on_ready=ready,
                security=security,
            )
        )


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:

    from inkling.telemetry import logs, providers
    from inkling.telemetry.settings import load_telemetry_settings
    from stream_worker.app import serve_worker
    from stream_worker.settings import load_worker_settings

    logs.install("%(asctime)s worker[%(process)d] %(message)s")
    worker_settings = load_worker_settings(
        Path(args.config) if args.config else None,
        {"partitions": args.partitions, "worker_id": args.worker_id},
    )
    telemetry = load_telemetry_settings(Path(args.config) if args.config else None)
    with providers.configure("worker", metrics_port=args.metrics_port, settings=telemetry):
        live = serving_settings(settings, "worker", redis_security(args.config))
        from inkling.events.kafka_bus import load_kafka_settings

        kafka = load_kafka_settings(Path(args.config) if args.config else None)
        stats = serve_worker(live, worker_settings, kafka)
    print(f"[worker] stopped: {stats.as_dict()}", file=sys.stderr)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or "%(default)" in text
            or "default" in text.lower()
            or not action.option_strings
        ):
            return text
        shown = _shown(default)
        if re.search(rf"(?<![\w.]){re.escape(shown)}(?![\w.])", text):
            return text  # said in the text, e.g. "(240)"
        return f"{text} (default: {shown.replace('%', '%%')})"


def _shown(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    """`inkling`'s parsers: every subcommand's help through `_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def version_text() -> str:
    """The package, the gRPC contract, the event schema and Feast, one per line."""
    from importlib import metadata

    from inkling.config import PROJECT_ROOT
    from inkling.events.schema import EVENT_SCHEMA_VERSION
    from inkling.v1 import resources_pb2

    try:
        package = metadata.version("inkling")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        import tomllib

        package = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    return (
        f"inkling {package}\n"
        f"contract {resources_pb2.DESCRIPTOR.package} (protos/inkling/v1)\n"
        f"event schema {EVENT_SCHEMA_VERSION}\n"
        f"feast {metadata.version('feast')}"
    )


class _VersionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inkling", description=__doc__)
    parser.add_argument(
        "--version", action=_VersionAction, nargs=0, default=argparse.SUPPRESS,
        help="print the versions of inkling, its gRPC contract, its event schema and Feast",
    )  # fmt: skip
    parser.add_argument("--config", type=Path, help="TOML settings file (or INKLING_CONFIG)")
    parser.add_argument("--data-dir", help="where inkling keeps its data (or INKLING_DATA_DIR)")
    parser.add_argument(
        "--online-store", choices=list(ONLINE_STORES), help="(or INKLING_ONLINE_STORE)"
    )
    parser.add_argument(
        "--redis",
        help="host:port of a running Redis, or a cluster's host:port,host:port,... "
        "(or INKLING_REDIS_ADDRESS); default: embedded",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a synthetic clickstream into the event log")
    p.add_argument("--users", type=int, default=1_500, help="logged-in users")
    p.add_argument("--items", type=int, default=3_000, help="catalogue size")
    p.add_argument("--categories", type=int, default=20, help="item categories")
    p.add_argument("--sessions", type=int, default=6_000, help="about 35 events each")
    p.add_argument("--days", type=int, default=14, help="days of events, ending yesterday")
    p.add_argument("--start", help="first day (UTC); default: --days days before today")
    p.add_argument("--seed", type=int, default=7, help="random seed: the same seed, the same data")
    p.add_argument(
        "--serve-requests",
        type=int,
        default=0,
        help="also simulate this many served answers over the last day, an experiment "
        "between the arms control and candidate (half the users each), and the users' "
        "responses by the click model of batch/simulate.py: written to the serve log and the "
        "event log (default 0: none)",
    )
    p.add_argument(
        "--lift",
        action="append",
        help="arm=fraction: the arm's known effect on every click probability, e.g. "
        "candidate=0.05 (+5 %%); repeatable; default none",
    )
    p.add_argument(
        "--experiment", default="ranker-ab", help="the simulated experiment's name (ranker-ab)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "import",
        help="import real data into the event log",
        description="Append a file of events to the event log (importing a file twice "
        "appends nothing) and its items to the catalogue; every rejected row is reported "
        "with its line and reasons (batch/importers.py documents each format).",
    )
    p.add_argument("path", help="the file to import")
    p.add_argument(
        "--format", required=True, choices=["recbole", "sasrec", "diginetica", "csv", "parquet"],
        help="recbole: a RecBole .inter file (with its .item and .user beside it); sasrec: "
        "`user item` lines in time order; diginetica: the CIKM Cup 2016 views; csv / "
        "parquet: a table whose columns are named like the event schema (user_id, "
        "session_id, item_id, event_type, timestamp, ...) or renamed with --map",
    )  # fmt: skip
    p.add_argument(
        "--map", action="append", metavar="FIELD=COLUMN",
        help="csv/parquet: read event field FIELD from column COLUMN, e.g. --map "
        "user_id=visitor --map item_id=product; repeatable; default: columns by their names",
    )  # fmt: skip
    p.add_argument(
        "--timestamp-unit", choices=["s", "ms", "us", "iso"],
        help="csv/parquet: how the timestamp column is written: s, ms or us since the "
        "epoch, or iso (ISO-8601 text; without a zone it is UTC); default: detected from "
        "the column and printed, and a column that mixes forms is refused",
    )  # fmt: skip
    p.add_argument(
        "--event-type", default="click",
        help="csv/parquet: the event type of every row when there is no event_type column",
    )  # fmt: skip
    p.add_argument("--sep", default=",", help="csv: the field separator")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("features", help="compute features from the event log with Spark")
    p.add_argument("--master", help="Spark master (or INKLING_SPARK_MASTER); default local[*]")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v (or INKLING_SPARK_CONF)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser(
        "attribute",
        help="join the serve log with later events into labelled impressions (Spark)",
        description="Every served item becomes one impression with its position, arm and "
        "versions; an item_view, click, add_to_cart or purchase of it within the window after "
        "the answer labels it: matched by the event's request_id, else by user or session "
        "(the latest answer that showed the item). Writes <data_dir>/impressions/date=<d>/.",
    )
    p.add_argument(
        "--window",
        type=int,
        default=1800,
        help="seconds after an answer during which its items' outcomes count (default 1800)",
    )
    p.add_argument("--master", help="Spark master (or INKLING_SPARK_MASTER); default local[*]")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v (or INKLING_SPARK_CONF)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("experiment", help="experiments: report one, or validate the test")
    esub = p.add_subparsers(dest="action", required=True)
    p = esub.add_parser(
        "report",
        help="per-arm CTR, conversion, revenue per request and an always-valid sequential "
        "test over the labelled impressions (run `inkling attribute` first)",
    )
    p.add_argument("name", help="the experiment's name, as the serve records carry it")
    p.add_argument("--control", default="control", help="the control arm (default control)")
    p.add_argument("--alpha", type=float, default=0.05, help="false-positive rate (0.05)")
    p.add_argument(
        "--tau", type=float, default=0.05,
        help="the mSPRT's mixing scale, relative to the metric: the effect size it is most "
        "sensitive to (0.05 = 5 %%)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-s", type=int, default=3600,
        help="how often the test looks, in seconds of serving (3600: hourly)",
    )  # fmt: skip
    p.add_argument("--out", help="report directory (default <data_dir>/experiments/NAME)")
    p.set_defaults(func=cmd_experiment_report)
    p = esub.add_parser(
        "validate",
        help="run the report on repeated simulated experiments: its false-positive rate "
        "(A/A) and its power against a known lift",
    )
    p.add_argument("--runs", type=int, default=100, help="simulated experiments per case (100)")
    p.add_argument("--requests", type=int, default=20_000, help="answers per experiment")
    p.add_argument("--lift", type=float, default=0.05, help="the known lift (0.05)")
    p.add_argument("--alpha", type=float, default=0.05, help="false-positive rate (0.05)")
    p.add_argument("--seed", type=int, default=0, help="the first run's seed")
    p.set_defaults(func=cmd_experiment_validate)

    p = sub.add_parser(
        "evaluate-policy",
        help="off-policy evaluation of a ranking policy from the serve log (or a simulation)",
    )
    p.add_argument(
        "--target",
        required=True,
        help="the policy to evaluate, as inkling.exploration names it, e.g. "
        '"plackett_luce(temperature=0.5)" or "greedy"',
    )
    p.add_argument(
        "--logging-policy",
        default="",
        help="only answers whose logged policy starts with this (default: every exploring "
        "one); with --simulate, the exploring logging policy (plackett_luce(temperature=1))",
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="on simulated users with a known truth: the estimates beside the true value, "
        "logged by a uniform and by the exploring policy",
    )
    p.add_argument("--requests", type=int, default=14_000, help="simulated requests (14000)")
    p.add_argument(
        "--repetitions",
        type=int,
        default=0,
        help="with --simulate: redraw the exploring log this many times and report each "
        "estimator's error and how often its interval covers the truth (0: none)",
    )
    p.add_argument(
        "--week",
        action="store_true",
        help="with --simulate: also a week of the bandit against greedy, with a plot",
    )
    p.add_argument("--out", default="exploration", help="where --week writes its plot")
    p.add_argument(
        "--week-seeds",
        type=int,
        default=1,
        help="with --week: also the week's outcome on this many worlds (seeds from --seed)",
    )
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap rounds (500)")
    p.add_argument(
        "--marginal-samples",
        type=int,
        default=200,
        help="lists drawn per request and policy to estimate the item-position "
        "estimator's marginals (200)",
    )
    p.add_argument("--max-per-category", type=int, default=3, help="the diversity rule (3)")
    p.add_argument("--diversity-window", type=int, default=20, help="its window (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and simulation")
    p.set_defaults(func=cmd_evaluate_policy)

    p = sub.add_parser("apply", help="`feast apply` the feature repository")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "materialize", help="load features into the online store (bulk path for Redis)"
    )
    p.add_argument("--start", help="ISO time; default: the beginning")
    p.add_argument("--end", help="ISO time; default: now")
    p.add_argument("--views", nargs="*", help="feature views (default: all online ones)")
    p.add_argument("--stock", action="store_true", help="use Feast's own materialize instead")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser(
        "training-set", help="point-in-time training set via Feast historical retrieval"
    )
    p.add_argument(
        "--kind", default="next-item", choices=["next-item", "click"],
        help="next-item: a row per interaction, the item chosen next; click: a row per "
        "impression, labelled 1 when the session clicked it (batch/training_set.py)",
    )  # fmt: skip
    p.add_argument(
        "--feature-service", default="ranker_v1", help="the Feast feature service to join"
    )
    p.add_argument(
        "--max-rows", type=int, help="sample down to at most this many rows; default: all"
    )
    p.add_argument("--master", help="Spark master")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v")
    p.set_defaults(func=cmd_training_set)

    p = sub.add_parser(
        "redis", help="start or stop a long-running embedded Redis for feast commands"
    )
    p.add_argument(
        "action",
        choices=["start", "stop", "acl"],
        help="start prints its address to `eval`; acl prints the role users' ACL SETUSER "
        "commands for an external Redis",
    )
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 6390)")
    p.add_argument(
        "--redis-major",
        type=int,
        default=7,
        help="acl: the rules for this Redis major version, 6 or 7 (default: 7)",
    )
    p.set_defaults(func=cmd_redis)

    p = sub.add_parser(
        "forget",
        help="erase a user: online rows, sessions, bus, event and serve logs, features",
        description="Erase one user everywhere inkling keeps them and tombstone them so that "
        "late or replayed events never bring them back (inkling/erasure.py). Idempotent.",
    )
    p.add_argument("--user", required=True, help="the user id as stored (no default)")
    p.add_argument(
        "--flush-wait",
        type=float,
        default=30.0,
        help="seconds to wait for live stream workers to log what they read before the "
        "forget (default: 30)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "compact-log",
        help="merge the event and serve logs' small Parquet files into large ones",
        description="Rewrite each date folder's small files (the stream worker writes one "
        "per partition per flush) as files of at most --target-rows rows, dropping "
        "forgotten users' rows; run it before the Spark jobs, not during them "
        "(batch/compact_log.py).",
    )
    p.add_argument(
        "--target-rows",
        type=int,
        default=1_000_000,
        help="the most rows per compacted file; files under half of it are merged "
        "(default: 1000000)",
    )
    p.add_argument(
        "--min-age-s",
        type=float,
        default=3600.0,
        help="leave files modified more recently than this alone: the stream worker may "
        "still replace them (default: 3600)",
    )
    p.set_defaults(func=cmd_compact_log)

    p = sub.add_parser("env", help="print the environment feature_store.yaml reads, for `eval`")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("demo", help="the main job end to end on the embedded defaults")
    p.add_argument(
        "--import", dest="import_path", help="import this file instead of generating data"
    )
    p.add_argument("--format", default="recbole", help="format of --import")
    p.add_argument(
        "--keep", action="store_true", help="keep earlier demo data instead of starting fresh"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("embeddings", help="train ALS user and item embeddings with Spark")
    p.add_argument("--rank", type=int, default=32, help="dimensions of each vector")
    p.add_argument("--iterations", type=int, default=10, help="ALS iterations")
    p.add_argument("--alpha", type=float, default=10.0, help="confidence = 1 + alpha * weight")
    p.add_argument("--reg-param", type=float, default=0.05, help="L2 regularization")
    p.add_argument("--seed", type=int, default=7, help="random seed of the initial factors")
    p.add_argument("--master", help="Spark master")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v")
    p.set_defaults(func=cmd_embeddings)
    p = sub.add_parser(
        "index", help="measure FAISS index types on the embeddings and build the best one"
    )
    p.add_argument("--k", type=int, default=500, help="neighbours retrieval asks the index for")
    p.add_argument("--min-recall", type=float, default=0.95, help="recall@k an index must reach")
    p.add_argument(
        "--spec", action="append", help='a candidate, e.g. "IVF1024,Flat nprobe=64 mips_to_l2"'
    )
    p.set_defaults(func=cmd_index)
    p = sub.add_parser("train", help="train a model, evaluate it, publish it to the registry")
    p.add_argument(
        "--model",
        choices=["ranker", "retrieval", "all"],
        default="ranker",
        help="the session-aware ranker (SASRec), the two-tower retrieval model, or both",
    )
    p.add_argument("--seconds", type=float, default=240.0, help="training time budget per model")
    p.add_argument("--no-current", action="store_true", help="publish without making it CURRENT")
    add_ranker_options(p, "")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "retrain",
        help="one retraining run: decide a running canary, recompute features, train a "
        "candidate ranker, compare it with CURRENT, report drift, promote or canary it",
        description="Meant for a scheduler, e.g. hourly from cron: "
        "`0 * * * * cd /srv/inkling && inkling --data-dir /data retrain >> retrain.log 2>&1`. "
        "Every decision and its reasons go to <data_dir>/registry/ranker/decisions.jsonl; the "
        "drift report to <data_dir>/retrain/<version>/drift.md (batch/retrain.py).",
    )
    p.add_argument("--seconds", type=float, default=240.0, help="training time budget (240)")
    p.add_argument(
        "--tolerance", type=float, default=0.02,
        help="how far (relative) the candidate's test NDCG@10 may fall below CURRENT's (0.02)",
    )  # fmt: skip
    p.add_argument(
        "--psi", type=float, default=0.2, help="a feature drifted above this PSI blocks promotion"
    )
    p.add_argument(
        "--explain", action="append", metavar="FEATURE=WHY",
        help="accept a feature's drift (e.g. item_price=\"autumn sale\"); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--canary-share", type=float, default=0.05, help="the share of users a canary serves (0.05)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="the canary test's alpha (0.05)")
    p.add_argument("--recent-days", type=float, default=1.0, help="the recent window (1 day)")
    p.add_argument(
        "--reference-days", type=float, default=7.0,
        help="the reference window before it (7 days)",
    )  # fmt: skip
    p.add_argument("--master", help="Spark master (or INKLING_SPARK_MASTER); default local[*]")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v (or INKLING_SPARK_CONF)")
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("evaluate", help="leave-last-out offline evaluation of the models")
    p.add_argument(
        "--models", default=",".join(EVALUATION_MODELS), help="comma separated; default: all"
    )
    p.add_argument(
        "--by", default="auto", choices=["auto", "user", "session"],
        help="sequences per user or per session; default: auto, per user when at least half "
        "of the interactions carry a user_id, else per session",
    )  # fmt: skip
    p.add_argument(
        "--sasrec-seconds", type=float, default=240.0, help="training budget of the SASRec model"
    )
    add_ranker_options(p, "sasrec-")
    p.add_argument("--min-length", type=int, default=3, help="shortest sequence kept")
    p.add_argument("--k", type=int, default=10, help="the cut-off of Recall@k and NDCG@k")
    p.add_argument("--negatives", type=int, default=100, help="sampled protocol: negatives")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed of the sampled negatives and training"
    )
    p.add_argument("--dataset", help="a name for the data in the report")
    p.add_argument("--out", help="report directory (default <data-dir>/reports/evaluation)")
    p.add_argument("--master", help="Spark master (ALS)")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("export", help="release aggregates with differential privacy")
    p = p.add_subparsers(dest="what", required=True).add_parser(
        "popularity",
        help="per-item user counts over a window, with user-level (ε, δ)-DP; the release "
        "is charged to <data-dir>/privacy/ledger.jsonl against the [privacy] budget",
    )
    p.add_argument(
        "--epsilon", type=float, required=True, help="ε this release spends (required; > 0)"
    )
    p.add_argument(
        "--delta", type=float, default=0.0,
        help="δ this release spends (default 0: Laplace noise; > 0: Gaussian noise)",
    )  # fmt: skip
    p.add_argument(
        "--max-items", type=int,
        help="distinct items one user counts towards (default: [privacy] max_items_per_user, 10)",
    )  # fmt: skip
    p.add_argument(
        "--days", type=int, default=7, help="UTC days in the window (default 7, as item_pop_7d)"
    )
    p.add_argument(
        "--last-day",
        help="the window's last UTC day, YYYY-MM-DD (default: the day of the log's latest "
        "interaction, which is then not protected)",
    )
    p.add_argument("--out", required=True, help="the JSON file to write (required)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="run a gRPC server: retrieval, ranking or event ingest")
    p.add_argument(
        "role", choices=["retrieval", "ranking", "events"],
        help="retrieval (L1), ranking (L2: Recommend, RankCandidates) or events (TrackEvents)",
    )  # fmt: skip
    p.add_argument("--host", help="interface (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, help="port (retrieval 50061, ranking 50062, events 50063; 0 = any)"
    )
    p.add_argument("--workers", type=int, help="processes sharing the port; 0 = one per core")
    p.add_argument("--grace-s", type=float, help="SIGTERM drain time for in-flight calls")
    p.add_argument("--retrieval-address", help="ranking: host:port of the retrieval server")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port (default retrieval 9461, ranking 9462, events 9463; worker i of --workers N adds 10*i; 0 = none)",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "worker", help="a stream worker: bus → session state and item counters online + event log"
    )
    p.add_argument("--partitions", type=int, help="bus partitions (must equal the ingest's)")
    p.add_argument("--worker-id", help="consumer name and lease token (default host-pid-random)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port (default 9464, a free one when taken; 0 = none)",
    )
    p.set_defaults(func=cmd_worker)
    bench = sub.add_parser("bench", help="benchmarks: materialization, or the serving path")
    bsub = bench.add_subparsers(dest="scenario", required=True)
    p = bsub.add_parser("materialize", help="bulk vs stock materialization into Redis")
    p.add_argument("--items", type=int, default=20_000, help="catalogue size")
    p.add_argument("--days", type=int, default=3, help="days of events")
    p.add_argument("--out", default="data/bench/materialize.json", help="the JSON report")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also bulk-load a local Redis Cluster (3 masters + 3 replicas) in the same run",
    )
    p.set_defaults(func=cmd_bench_materialize)
    p = bsub.add_parser("serving", help="hydration, ranking, retrieval, Recommend under load")
    p.add_argument("--items", type=int, default=100_000, help="catalogue size")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second per scenario")
    p.add_argument("--stock-rate", type=float, default=10.0, help="rate for stock Feast")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per scenario")
    p.add_argument("--out", default="data/bench/serving", help="report directory")
    p.add_argument("--reuse", action="store_true", help="reuse the data set built earlier")
    p.add_argument(
        "--telemetry",
        help="instead of the scenarios, what telemetry costs: RankCandidates(500) and "
        "Recommend under each of these modes, e.g. off,metrics,default,full (the first is "
        "the baseline); servers restart per mode",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="how often each side of a comparison runs, in turn: every --telemetry mode, or "
        "the serve log on and off",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also raise each scenario's rate step by step until p99 passes 50 ms or a request "
        "fails or degrades: the knee of each, and a latency-throughput plot (sweep.png)",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only the set-up and the memory table (Redis bytes per row, snapshot build, "
        "refresh and size): no model training, no servers; for catalogues too large to "
        "train on here (e.g. --items 1000000)",
    )
    p.add_argument(
        "--serve-log-rate",
        type=float,
        default=20.0,
        help="Recommends per second of the serve-log comparison (20): a load the production "
        "path sustains, so that the difference is the serve log's and not a queue's",
    )
    p.add_argument(
        "--serve-log-only",
        action="store_true",
        help="only the set-up and the serve-log comparison (written under OUT/serve_log)",
    )
    p.add_argument(
        "--policy-only",
        action="store_true",
        help="only the set-up and the greedy-vs-bandit policy stage comparison on "
        "RankCandidates(500) (written under OUT/policy)",
    )
    p.add_argument(
        "--tls-only",
        action="store_true",
        help="only the set-up and the plaintext / TLS / mutual TLS comparison on "
        "Recommend(20) (written under OUT/tls)",
    )
    p.set_defaults(func=cmd_bench_serving)
    p = bsub.add_parser(
        "ranker",
        help="the CURRENT ranker's scoring latency in four inference forms; with --train, "
        "training throughput per loss on synthetic catalogues",
    )
    p.add_argument("--candidates", type=int, default=500, help="items scored per request")
    p.add_argument("--seq-len", type=int, default=50, help="history length per request")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per inference form")
    p.add_argument(
        "--out", default=RANKER_BENCH_OUT,
        help=f"report directory (default {RANKER_BENCH_OUT}, with --train {RANKER_BENCH_OUT}-train)",
    )  # fmt: skip
    p.add_argument(
        "--train", action="store_true",
        help="measure training throughput (positions/s, s/epoch) per loss instead of scoring",
    )  # fmt: skip
    p.add_argument(
        "--catalogues", default="3000,24000,100000",
        help="--train: item counts of the synthetic logs (default 3000,24000,100000)",
    )  # fmt: skip
    p.add_argument(
        "--losses", default="full,uniform,logq,gbce",
        help="--train: the losses timed (default full,uniform,logq,gbce)",
    )  # fmt: skip
    p.add_argument("--users", type=int, default=20000, help="--train: users per synthetic log")
    p.add_argument(
        "--mean-length", type=float, default=40.0, help="--train: mean events per user (40)"
    )
    p.add_argument("--steps", type=int, default=30, help="--train: timed steps per loss (30)")
    p.add_argument("--warmup", type=int, default=3, help="--train: untimed steps first (3)")
    p.add_argument("--threads", type=int, default=2, help="--train: torch intra-op threads (2)")
    p.add_argument(
        "--prefetch", type=int, default=4,
        help="--train: batches the loader thread prepares ahead (0: on the training thread)",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench_ranker)
    p = bsub.add_parser(
        "erasure", help="how long `inkling forget` takes on a large synthetic event log"
    )
    p.add_argument(
        "--events", type=int, default=10_000_000, help="events in the log (default: 10M)"
    )
    p.add_argument("--users", type=int, default=1_000_000, help="users (default: 1M)")
    p.add_argument("--days", type=int, default=30, help="UTC dates the log spans (default: 30)")
    p.add_argument(
        "--file-rows", type=int, default=100_000, help="events per Parquet file (default: 100k)"
    )
    p.add_argument("--out", default="data/bench/erasure", help="report directory")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the log written earlier in --out, as the earlier forgets left it "
        "(its heaviest user is gone: the heaviest case is then a lighter one)",
    )
    p.set_defaults(func=cmd_bench_erasure)

    p = bsub.add_parser(
        "capacity",
        help="pods, cores, Redis, bus partitions and Spark executors for a population, from "
        "the benchmarks' figures (bench/capacity_inputs.toml, or reports), assumptions beside",
    )
    p.add_argument("--users", type=int, default=100_000_000, help="users (default: 100M)")
    p.add_argument(
        "--daily-actives", type=int, default=10_000_000, help="daily active users (default: 10M)"
    )
    p.add_argument(
        "--recommend-rps", type=float, default=20_000.0, help="Recommend/s at peak (default: 20000)"
    )
    p.add_argument(
        "--events-rps",
        type=float,
        default=50_000.0,
        help="tracked events/s at peak (default: 50000)",
    )
    p.add_argument("--items", type=int, default=10_000_000, help="catalogue size (default: 10M)")
    p.add_argument(
        "--inputs",
        help="a TOML file of the measured figures and assumptions, each with its source "
        "(default: bench/capacity_inputs.toml)",
    )
    p.add_argument(
        "--reports",
        help="a directory of benchmark reports (bench serving's report.json or memory.json, "
        "bench freshness's freshness.json, python -m bench.capacity measure's "
        "capacity_measure.json); their figures replace the inputs file's (default: none)",
    )
    p.add_argument(
        "--utilisation",
        type=float,
        help="target CPU utilisation of a process at peak, in (0, 1] (default: the inputs "
        "file's, 0.5)",
    )
    p.add_argument(
        "--zones", type=int, help="availability zones, one may fail (default: the inputs file's, 3)"
    )
    p.add_argument(
        "--cores-per-server-pod",
        type=float,
        help="cores of a retrieval or ranking pod (default: the inputs file's, 2)",
    )
    p.add_argument(
        "--cores-per-event-pod",
        type=float,
        help="cores of an ingest or worker pod (default: the inputs file's, 1)",
    )
    p.add_argument(
        "--redis-replicas",
        type=int,
        help="replicas per Redis shard (default: the inputs file's, 1)",
    )
    p.add_argument(
        "--snapshot-refresh-s",
        type=float,
        help="seconds between item snapshot refreshes per server process (default: the "
        "inputs file's, 30, the servers' setting)",
    )
    p.add_argument(
        "--out", help="also write capacity.json and capacity.md into this directory (default: none)"
    )
    p.set_defaults(func=cmd_bench_capacity)

    p = bsub.add_parser(
        "freshness", help="event accepted → online session row → Recommend, under event load"
    )
    p.add_argument("--rates", default="1000,5000,10000", help="events per second, one run each")
    p.add_argument("--batch", type=int, default=100, help="events per TrackEvents call")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    p.add_argument("--items", type=int, default=3000, help="catalogue size of the data set")
    p.add_argument("--out", default="data/bench/freshness", help="report directory")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes")
    p.add_argument(
        "--bus",
        default="redis",
        help="event bus(es), each with its own ingest and workers in this run: redis, kafka "
        "or redis,kafka (Kafka: a Kafka-protocol broker started on loopback)",
    )
    p.add_argument(
        "--kafka-broker",
        choices=("noida", "tansu"),
        default="noida",
        help="the Kafka-protocol broker --bus kafka starts (inkling/kafka_embedded.py)",
    )
    p.add_argument("--reuse", action="store_true", help="reuse the data set built earlier")
    p.set_defaults(func=cmd_bench_freshness)
    return parser


TRACED_JOBS = frozenset(
    {"generate", "import", "features", "materialize", "training-set", "embeddings", "index",
     "train", "evaluate"}
)  # fmt: skip
"""Batch jobs that run as one span, always sampled, sent where `[telemetry]` or
`OTEL_EXPORTER_OTLP_ENDPOINT` says (nowhere by default); they serve no `/metrics`."""


def _traced_job(args: argparse.Namespace, settings: Settings) -> None:
    from dataclasses import replace

    from opentelemetry import trace

    from inkling.telemetry import providers
    from inkling.telemetry.settings import load_telemetry_settings

    job = replace(load_telemetry_settings(args.config), trace_ratio=1.0, metrics_port=0)
    with providers.configure("cli", settings=job):
        tracer = trace.get_tracer("inkling.cli")
        with tracer.start_as_current_span(f"inkling {args.command}"):
            args.func(args, settings)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command in TRACED_JOBS:
            _traced_job(args, _settings(args))
        else:
            args.func(args, _settings(args))
    except InklingError as e:
        print(f"inkling: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
