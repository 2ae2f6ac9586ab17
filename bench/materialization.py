"""Benchmark: stock `feast materialize` vs the bulk path, into Redis, in one run.

Both load the same item-feature table (`items` entities x `days` daily snapshots,
the 9 features of `item_features`) into two databases of one private Redis server,
one after the other; the report gives entities written per second end to end (read,
latest-per-entity, encode, write), checks that Feast reads identical values back
from both, and records the machine. With `cluster`, a local Redis Cluster (three
masters, three replicas, `inkling.redis_cluster`) is started beside the server and the
bulk path's run into it is measured in the same report, its values checked the same way.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.materialize import bulk_materialize
from bench.harness.report import cpu_model
from inkling.config import Settings
from inkling.events.schema import TIMESTAMP_TYPE
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.redis_cluster import LocalRedisCluster
from inkling.redis_embedded import EmbeddedRedis


def synthetic_item_features(items: int, days: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = items * days
    ids = np.repeat(np.arange(items), days)
    day = np.tile(np.arange(days), items)
    start = np.datetime64("2026-10-01T00:00:00", "us")
    return pa.table(
        {
            "item_id": pa.array([f"i{i}" for i in ids]),
            "event_timestamp": pa.array(
                start + (day * 86_400_000_000).astype("timedelta64[us]")
            ).cast(TIMESTAMP_TYPE),
            "item_pop_1d": rng.poisson(5, n),
            "item_pop_7d": rng.poisson(35, n),
            "item_pop_30d": rng.poisson(150, n),
            "item_ctr_30d": rng.random(n),
            "item_atc_rate_30d": rng.random(n),
            "item_cvr_30d": rng.random(n),
            "item_category": pa.array([f"c{c:02d}" for c in rng.integers(0, 20, n)]),
            "item_price": np.round(rng.lognormal(3, 1, n), 2),
            "item_age_days": rng.random(n) * 365,
            "item_in_stock": rng.random(n) < 0.97,
            "item_blocked": rng.random(n) < 0.005,
        }
    )


def run_materialize_benchmark(
    settings: Settings, items: int, days: int, out: Path, cluster: bool = False
) -> dict[str, object]:
    bench = replace(
        settings, data_dir=settings.data_dir / "bench-materialize", online_store="redis"
    )
    table = synthetic_item_features(items, days)
    target = bench.features_dir / "item_features"
    target.mkdir(parents=True, exist_ok=True)

    pq.write_table(table, target / "part-0.parquet")
    start = datetime(2026, 9, 1, tzinfo=UTC)
    end = datetime(2026, 10, 1, tzinfo=UTC) + timedelta(days=days)
    report: dict[str, object] = {
        "machine": {
            "cores": os.cpu_count(),
            "cpu": cpu_model() or "unknown",
            "python": platform.python_version(),
        },
        "load": {
            "entities": items,
            "rows": table.num_rows,
            "features": table.num_columns - 2,
            "view": "item_features",
        },
    }
    with EmbeddedRedis(bench.redis_dir, persistent=False) as server:
        stock = bench.with_redis(f"{server.address},db=0")
        bulk = bench.with_redis(f"{server.address},db=1")
        feast_cli(stock, "apply", quiet=True)
        rates = {}
        for name, live in (("stock", stock), ("bulk", bulk)):
            store = open_store(live)
            began = time.perf_counter()
            if name == "stock":
                store.materialize(start, end, feature_views=["item_features"])
            else:
                bulk_materialize(store, start, end, views=["item_features"], progress=False)
            seconds = time.perf_counter() - began
            rates[name] = {"seconds": round(seconds, 3), "entities_per_s": round(items / seconds)}
        keys = [{"item_id": f"i{i}"} for i in range(0, items, max(1, items // 500))]
        features = [f"item_features:{f}" for f in table.column_names[2:]]
        a = open_store(stock).get_online_features(features=features, entity_rows=keys).to_dict()
        b = open_store(bulk).get_online_features(features=features, entity_rows=keys).to_dict()
        if cluster:
            where = bench.redis_dir / "cluster"
            shutil.rmtree(where, ignore_errors=True)  # a fresh cluster: no old nodes.conf
            with LocalRedisCluster(where, persistent=False) as nodes:
                on_cluster = replace(
                    bench, online_store="redis_cluster", redis_address=nodes.address
                )
                store = open_store(on_cluster)
                began = time.perf_counter()
                bulk_materialize(store, start, end, views=["item_features"], progress=False)
                seconds = time.perf_counter() - began
                rates["bulk_cluster"] = {
                    "seconds": round(seconds, 3),
                    "entities_per_s": round(items / seconds),
                    "masters": nodes.masters,
                    "replicas_per_master": nodes.replicas,
                }
                c = store.get_online_features(features=features, entity_rows=keys).to_dict()
            report["identical_online_values_cluster"] = a == c
    report["results"] = rates
    report["speedup"] = round(rates["bulk"]["entities_per_s"] / rates["stock"]["entities_per_s"], 1)
    report["identical_online_values"] = a == b
    report["checked_keys"] = len(keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report
