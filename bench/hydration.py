"""Benchmark: hydrating a ranking request (1 user + 1 session + N items) vs stock Feast.

One private Redis holds `items` items (item_features and item_covisitation), `users`
users and `sessions` sessions, bulk-materialized with event times an hour old (so every
view's TTL holds). In one run, on one event loop, it measures:

- the item snapshot build (`ItemSnapshot` over ranker_v1's item views, and over
  retrieval_v1's, which adds the co-visitation lists): seconds, longest chunk, and the
  longest the event loop was held during a build (a 1 ms timer's worst lateness);
- `Hydrator.hydrate` latency, closed loop, one call at a time, `calls` calls, alone
  and while a snapshot rebuild runs concurrently;
- stock `FeatureStore.get_online_features(features=<ranker_v1>, entity_rows=...)`
  (without `to_dict()`) for the same keys, `stock_calls` calls;
- that both give the same values for a sample of requests.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, FileSource
from feast.value_type import ValueType

from batch.materialize import bulk_materialize
from bench.harness.report import cpu_model
from inkling.config import Settings
from inkling.events.schema import TIMESTAMP_TYPE
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.hydrator import Hydrator
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.feature_store.snapshot import build_item_snapshot
from inkling.feature_store.snapshot_refresh import SnapshotRefresher
from inkling.redis_embedded import EmbeddedRedis


def _column(
    value_type: ValueType, n: int, rng: np.random.Generator, at: datetime, items: int
) -> pa.Array:
    """Plausible values of one Feast type: ids of items in string lists, 20 categories."""
    if value_type in (ValueType.INT64, ValueType.INT32):
        return pa.array(rng.poisson(20, n), type=pa.int64())
    if value_type in (ValueType.DOUBLE, ValueType.FLOAT):
        return pa.array(np.round(rng.lognormal(1, 1, n), 4))
    if value_type == ValueType.BOOL:
        return pa.array(rng.random(n) < 0.95)
    if value_type == ValueType.STRING:
        return pa.array([f"c{c:02d}" for c in rng.integers(0, 20, n)])
    if value_type == ValueType.UNIX_TIMESTAMP:
        minutes = rng.integers(1, 600, n)
        return pa.array([at - timedelta(minutes=int(m)) for m in minutes], type=TIMESTAMP_TYPE)
    if value_type == ValueType.STRING_LIST:
        picks = rng.integers(0, items, size=(n, 20)).tolist()
        return pa.array([[f"i{j}" for j in row] for row in picks])
    if value_type == ValueType.INT64_LIST:
        counts = np.sort(rng.poisson(4, (n, 20)) + 1, axis=1)[:, ::-1]
        return pa.array(counts.tolist(), type=pa.list_(pa.int64()))
    if value_type == ValueType.DOUBLE_LIST:
        return pa.array(rng.dirichlet(np.ones(3), n).tolist())
    raise ValueError(f"the benchmark has no generator for {value_type.name}")


_ID_PREFIX = {"item_id": "i", "user_id": "u", "session_id": "s"}


def write_synthetic_features(
    store: FeatureStore, sizes: dict[str, int], at: datetime, seed: int = 0
) -> dict[str, int]:
    """One row per entity, stamped `at`, for every online view in the registry (its schema).

    Entities are `i<n>`, `u<n>`, `s<n>` for item, user and session ids; `sizes` gives
    their counts by join key. Returns rows written per view.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for view in store.list_feature_views():
        if not view.online:
            continue
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise ValueError(f"view {view.name}: the benchmark writes file sources only")
        join_key = store.get_entity(view.entities[0]).join_key
        n = sizes.get(join_key, 1000)
        prefix = _ID_PREFIX.get(join_key, join_key[:1])
        columns: dict[str, pa.Array] = {
            join_key: pa.array([f"{prefix}{i}" for i in range(n)]),
            source.timestamp_field: pa.array([at] * n, type=TIMESTAMP_TYPE),
        }
        for f in view.features:
            columns[f.name] = _column(f.dtype.to_value_type(), n, rng, at, sizes["item_id"])
        target = Path(FileSource.get_uri_for_file_path(store.repo_path, source.path))
        target.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), target / "part-0.parquet")
        written[view.name] = n
    return written


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


class _LoopLag:
    """A 1 ms timer on the event loop: how late it fires is how long the loop was held."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - t - 0.001)

    def summary(self) -> dict[str, float]:
        if not self.lags:
            return {}
        ms = np.asarray(self.lags) * 1000
        return {
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3),
        }

    def __enter__(self) -> _LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def _collections() -> list[int]:
    return [s["collections"] for s in gc.get_stats()]


def _requests(
    rng: random.Random, n: int, items: int, users: int, sessions: int, k: int, unknown: float
) -> list[tuple[str, str, list[str]]]:
    out = []
    for _ in range(n):
        ids = [
            f"x{rng.randrange(10**9)}" if rng.random() < unknown else f"i{rng.randrange(items)}"
            for _ in range(k)
        ]
        out.append((f"u{rng.randrange(users)}", f"s{rng.randrange(sessions)}", ids))
    return out


async def hydration_bench(
    settings: Settings,
    items: int = 100_000,
    users: int = 10_000,
    sessions: int = 20_000,
    candidates: int = 500,
    calls: int = 2_000,
    stock_calls: int = 2_000,
    unknown_fraction: float = 0.02,
    seed: int = 0,
) -> dict[str, Any]:
    """Set up the store under `settings.data_dir`/bench-hydration and measure; returns the report.

    Stock Feast is synchronous: its calls run on this event loop, with nothing else
    scheduled meanwhile.
    """
    bench = replace(settings, data_dir=settings.data_dir / "bench-hydration", online_store="redis")
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    report: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "cpu": cpu_model() or "unknown",
            "python": platform.python_version(),
        },
        "load": {
            "items": items,
            "users": users,
            "sessions": sessions,
            "candidates_per_request": candidates,
            "unknown_item_fraction": unknown_fraction,
            "service": "ranker_v1",
        },
    }
    with EmbeddedRedis(bench.redis_dir, persistent=False) as server:
        live = bench.with_redis(f"{server.address},db=0")
        feast_cli(live, "apply", quiet=True)
        store = open_store(live)
        sizes = {"item_id": items, "user_id": users, "session_id": sessions}
        report["load"]["rows"] = write_synthetic_features(store, sizes, at, seed)
        began = time.perf_counter()
        bulk_materialize(store, at - timedelta(days=1), at + timedelta(minutes=1), progress=False)
        report["materialize_s"] = round(time.perf_counter() - began, 2)
        ranker = resolve_service(store, "ranker_v1")
        report["load"]["features"] = {v.name: len(v.features) for v in ranker.views}
        client = await open_async_redis(store)
        try:
            report.update(await _measure(store, client, ranker, items, users, sessions,
                                         candidates, calls, stock_calls, unknown_fraction,
                                         seed))  # fmt: skip
        finally:
            await client.aclose()
    return report


async def _measure(
    store: Any,
    client: Any,
    ranker: Any,
    items: int,
    users: int,
    sessions: int,
    candidates: int,
    calls: int,
    stock_calls: int,
    unknown: float,
    seed: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    retrieval = resolve_service(store, "retrieval_v1")
    with _LoopLag() as idle:
        await asyncio.sleep(3)
    out["loop_lag_idle"] = idle.summary()
    builds = {}
    for name, columns in (("ranker_v1", ranker), ("retrieval_v1", retrieval)):
        with _LoopLag() as lag:
            snap = await build_item_snapshot(client, columns)
        builds[name] = {
            "n_items": snap.n_items,
            "build_s": round(snap.build_seconds, 3),
            "longest_slice_ms": round(snap.max_chunk_seconds * 1000, 2),
            "longest_slice_cpu_ms": round(snap.max_chunk_cpu_seconds * 1000, 2),
            "loop_lag": lag.summary(),
        }
        del snap
    out["snapshot_build"] = builds
    began = time.perf_counter()
    gc.collect()
    out["full_gc_collection_ms"] = round((time.perf_counter() - began) * 1000, 1)

    refresher = SnapshotRefresher(client, ranker, refresh_interval_s=30.0)
    await refresher.refresh()
    hydrator = Hydrator(RowReader(client, ranker), refresher)
    rng = random.Random(seed)
    warm = _requests(rng, 200, items, users, sessions, candidates, unknown)
    for u, s, ids in warm:
        await hydrator.hydrate(u, s, ids)

    reqs = _requests(rng, calls, items, users, sessions, candidates, unknown)
    seconds = []
    before = _collections()
    for u, s, ids in reqs:
        t = time.perf_counter()
        await hydrator.hydrate(u, s, ids)
        seconds.append(time.perf_counter() - t)
    out["hydrate"] = _summary(seconds)
    out["hydrate"]["gc_collections_by_generation"] = [
        b - a for a, b in zip(before, _collections(), strict=True)
    ]

    # Fresh calls while a rebuild of the snapshot runs on the same loop.
    during: list[float] = []
    rebuild = asyncio.create_task(refresher.refresh())
    more = _requests(rng, calls, items, users, sessions, candidates, unknown)
    i = 0
    while not rebuild.done():
        u, s, ids = more[i % len(more)]
        t = time.perf_counter()
        await hydrator.hydrate(u, s, ids)
        during.append(time.perf_counter() - t)
        i += 1
    await rebuild
    out["hydrate_during_rebuild"] = _summary(during) if during else {}
    out["staleness"] = {
        "refresh_interval_s": refresher.refresh_interval_s,
        "longest_build_s": round(refresher.stats.longest_build_s, 3),
        "max_staleness_s": round(refresher.max_staleness_s, 3),
    }

    service = store.get_feature_service("ranker_v1")
    stock: list[float] = []
    for u, s, ids in (reqs[i % len(reqs)] for i in range(stock_calls)):
        rows = [{"user_id": u, "session_id": s, "item_id": i} for i in ids]
        t = time.perf_counter()
        store.get_online_features(features=service, entity_rows=rows)
        stock.append(time.perf_counter() - t)
    out["stock_feast"] = _summary(stock)
    out["speedup_p50"] = round(out["stock_feast"]["p50_ms"] / out["hydrate"]["p50_ms"], 1)
    out["speedup_p99"] = round(out["stock_feast"]["p99_ms"] / out["hydrate"]["p99_ms"], 1)

    same = True
    for u, s, ids in reqs[:20]:
        rows = [{"user_id": u, "session_id": s, "item_id": i} for i in ids]
        expected = store.get_online_features(features=service, entity_rows=rows).to_dict()
        got = await hydrator.hydrate(u, s, ids)
        mine = got.items.to_dict()
        for view in ranker.views:
            if view.name in got.views:
                row = got.views[view.name] or dict.fromkeys(view.feature_names)
                mine.update((f, [row[f]] * len(ids)) for f in view.feature_names)
        same &= mine == {
            k: v for k, v in expected.items() if k not in ("user_id", "session_id", "item_id")
        }
    out["identical_values"] = same
    out["gc_enabled"] = gc.isenabled()
    return out


def run_hydration_benchmark(
    settings: Settings, out: Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`hydration_bench` on a fresh event loop; writes the report as JSON to `out`."""
    report = asyncio.run(hydration_bench(settings, **kwargs))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from inkling.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m bench.hydration", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="default: the settings' data dir")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--stock-calls", type=int, default=2_000)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    run_hydration_benchmark(
        load_settings(overrides=overrides),
        args.out,
        items=args.items,
        users=args.users,
        sessions=args.sessions,
        candidates=args.candidates,
        calls=args.calls,
        stock_calls=args.stock_calls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
