"""`inkling`: the command line. Settings load once here and pass down explicitly."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from inkling.config import Settings, load_settings
from inkling.errors import InklingError, InvalidInputError


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


@contextlib.contextmanager
def online_settings(settings: Settings) -> Iterator[Settings]:
    """Settings with a usable online store: the configured Redis, the running
    `inkling redis start` server, or a private embedded Redis for this command."""
    from inkling.redis_embedded import DEFAULT_PORT, EmbeddedRedis, daemon_address

    if settings.online_store != "redis" or settings.redis_address:
        yield settings
        return
    running = daemon_address(settings.redis_dir, DEFAULT_PORT)
    if running:
        yield settings.with_redis(running)
        return
    with EmbeddedRedis(settings.redis_dir) as server:
        print(
            f"[redis] embedded redis-server on {server.address} (data in {settings.redis_dir})",
            file=sys.stderr,
        )
        yield settings.with_redis(server.address)


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidInputError(f"{text!r} is not an ISO-8601 time") from e
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> None:
    from batch.generate import GeneratorConfig
    from batch.pipeline import write_synthetic

    config = GeneratorConfig(
        users=args.users, items=args.items, categories=args.categories, sessions=args.sessions,
        days=args.days, start=args.start, seed=args.seed,
    )  # fmt: skip
    summary = write_synthetic(config, settings)
    print(json.dumps(summary, indent=1))


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


def cmd_features(args: argparse.Namespace, settings: Settings) -> None:
    from batch.features import compute_features
    from batch.spark import build_session

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-features")
    outputs = compute_features(
        spark, settings.events_dir, settings.catalog_dir, settings.features_dir
    )
    print(json.dumps(outputs.rows, indent=1))


def cmd_apply(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.feast_store import feast_cli

    with online_settings(settings) as live:
        feast_cli(live, "apply")


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> None:
    from batch.materialize import bulk_materialize
    from inkling.feast_store import open_store

    end = _parse_time(args.end) if args.end else datetime.now(UTC)
    start = _parse_time(args.start) if args.start else datetime(1990, 1, 1, tzinfo=UTC)
    with online_settings(settings) as live:
        store = open_store(live)
        began = time.perf_counter()
        if args.stock or live.online_store != "redis":
            store.materialize(start, end, feature_views=args.views)
        else:
            bulk_materialize(store, start, end, views=args.views)
        print(
            f"materialized {start.isoformat()} .. {end.isoformat()} in {time.perf_counter() - began:.1f}s"
        )


def cmd_training_set(args: argparse.Namespace, settings: Settings) -> None:
    from batch.spark import build_session
    from batch.training_set import build_training_set
    from inkling.feast_store import open_store

    spark = build_session(settings.spark_master, settings.spark_conf, "inkling-training-set")
    with online_settings(settings) as live:
        result = build_training_set(
            spark, open_store(live), settings.events_dir, settings.training_dir,
            kind=args.kind, feature_service=args.feature_service, max_rows=args.max_rows,
        )  # fmt: skip
    frame = result.frame
    print(
        f"{len(frame)} rows, {len(frame.columns)} columns, label mean {frame['label'].mean():.3f} -> {result.path}"
    )


def cmd_redis(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.redis_embedded import DEFAULT_PORT, start_daemon, stop_daemon

    if args.action == "start":
        address = start_daemon(settings.redis_dir, args.port or DEFAULT_PORT)
        print(f"export INKLING_REDIS_ADDRESS={address}")
    else:
        stopped = stop_daemon(settings.redis_dir, args.port or DEFAULT_PORT)
        print("stopped" if stopped else "no embedded redis was running")


def cmd_env(args: argparse.Namespace, settings: Settings) -> None:
    from inkling.redis_embedded import DEFAULT_PORT, daemon_address

    if not settings.redis_address:
        running = daemon_address(settings.redis_dir, DEFAULT_PORT)
        settings = settings.with_redis(running) if running else settings
    print("\n".join(settings.env_lines()))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    from batch.demo import run_demo

    run_demo(settings, import_path=args.import_path, import_format=args.format, fresh=not args.keep)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> None:
    from batch.bench_materialize import run_materialize_benchmark

    run_materialize_benchmark(settings, items=args.items, days=args.days, out=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inkling", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (or INKLING_CONFIG)")
    parser.add_argument("--data-dir", help="where inkling keeps its data (or INKLING_DATA_DIR)")
    parser.add_argument(
        "--online-store", choices=["redis", "sqlite"], help="(or INKLING_ONLINE_STORE)"
    )
    parser.add_argument(
        "--redis", help="host:port of a running Redis (or INKLING_REDIS_ADDRESS); default: embedded"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a synthetic clickstream into the event log")
    p.add_argument("--users", type=int, default=1_500)
    p.add_argument("--items", type=int, default=3_000)
    p.add_argument("--categories", type=int, default=20)
    p.add_argument("--sessions", type=int, default=6_000, help="about 35 events each")
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--start", default="2026-10-01", help="first day (UTC)")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import", help="import real data into the event log")
    p.add_argument("path")
    p.add_argument(
        "--format", required=True, choices=["recbole", "sasrec", "diginetica", "csv", "parquet"]
    )
    p.add_argument("--map", action="append", help="field=column for csv/parquet (repeatable)")
    p.add_argument("--timestamp-unit", default="s", choices=["s", "ms", "us", "iso"])
    p.add_argument("--event-type", default="click", help="event type when the file has none")
    p.add_argument("--sep", default=",", help="csv field separator")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("features", help="compute features from the event log with Spark")
    p.add_argument("--master", help="Spark master (or INKLING_SPARK_MASTER); default local[*]")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v (or INKLING_SPARK_CONF)")
    p.set_defaults(func=cmd_features)

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
    p.add_argument("--kind", default="next-item", choices=["next-item", "click"])
    p.add_argument("--feature-service", default="ranker_v1")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--master", help="Spark master")
    p.add_argument("--spark-conf", help="extra Spark properties k=v,k=v")
    p.set_defaults(func=cmd_training_set)

    p = sub.add_parser(
        "redis", help="start or stop a long-running embedded Redis for feast commands"
    )
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_redis)

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

    p = sub.add_parser("bench", help="benchmark bulk vs stock materialization into Redis")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--out", default="data/bench/materialize.json")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args, _settings(args))
    except InklingError as e:
        print(f"inkling: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
