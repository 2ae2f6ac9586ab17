"""`inkling bench capacity`: the model's arithmetic on hand-made inputs, its refusals,
the committed inputs file, and figures read from reports the benchmarks write."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from bench.capacity import (
    INPUTS,
    INPUTS_PATH,
    Figure,
    Population,
    load_inputs,
    plan,
    read_reports,
    run_capacity,
)
from bench.harness.loadgen import LoadResult
from bench.harness.report import machine_info, write_report
from inkling.cli import main
from inkling.errors import InvalidInputError

# Round numbers, so each expectation below can be worked out by hand.
HAND = {
    "retrieval_cpu_ms_per_recommend": 10.0,
    "ranking_cpu_ms_per_recommend": 5.0,
    "recommend_knee_rps": 50.0,
    "knee_machine_cores": 2.0,
    "recommend_p99_budget_ms": 50.0,
    "snapshot_mb_per_million_items": 100.0,
    "snapshot_refresh_cpu_s_per_million_items": 3.0,
    "snapshot_build_cpu_s_per_million_items": 3.0,
    "snapshot_full_every": 10.0,
    "snapshot_refresh_s": 30.0,
    "server_base_rss_mb": 500.0,
    "ingest_cpu_us_per_event": 50.0,
    "worker_cpu_us_per_event": 100.0,
    "redis_cpu_us_per_event": 50.0,
    "user_row_bytes": 1000.0,
    "session_row_bytes": 300.0,
    "item_row_bytes": 400.0,
    "bus_entry_bytes": 200.0,
    "dedupe_bytes_per_event": 100.0,
    "spark_events_per_core_s": 10_000.0,
    "utilisation": 0.5,
    "zones": 3.0,
    "cores_per_server_pod": 2.0,
    "cores_per_event_pod": 1.0,
    "redis_reads_per_recommend": 4.0,
    "redis_us_per_row_read": 10.0,
    "redis_us_per_scanned_key": 1.0,
    "redis_us_per_ts_read": 2.0,
    "redis_shard_max_gb": 25.0,
    "redis_replicas": 1.0,
    "redis_fragmentation": 1.0,
    "sessions_per_active_per_day": 2.0,
    "session_row_days": 1.0,
    "bus_max_lag": 100_000.0,
    "dedupe_window_s": 3600.0,
    "partition_growth": 2.0,
    "peak_to_mean": 2.0,
    "spark_window_days": 30.0,
    "spark_batch_window_h": 2.0,
    "spark_executor_cores": 4.0,
}


def _inputs(**changes: float) -> dict[str, Figure]:
    values = HAND | changes
    return {
        name: Figure(name, values[name], INPUTS[name][0], "assumption", "hand-made for a test")
        for name in INPUTS
    }


SMALL = Population(
    users=1_000_000, daily_actives=100_000, recommend_rps=1000, events_rps=2000, items=1_000_000
)


def test_the_hand_made_inputs_cover_every_input():
    assert set(HAND) == set(INPUTS)


def test_serving_pods_round_up_and_spread_so_one_zone_may_fail():
    result = plan(SMALL, _inputs())
    # refresh: 3 s per 1M items every 30 s = 0.1 core; usable 2 × 0.5 − 0.1 = 0.9 core.
    # retrieval: 1000/s × 10 ms = 10 cores → ceil(10 / 0.9) = 12; 6 per zone on 2 zones.
    assert result.value("retrieval", "pods") == 18
    assert result.value("retrieval", "cores") == 36
    # ranking: 1000/s × 5 ms = 5 cores → ceil(5.56) = 6 → 3 per zone.
    assert result.value("ranking", "pods") == 9
    # 500 MB + 2 × 100 MB of snapshot.
    assert result.value("ranking", "memory per pod") == pytest.approx(0.7)
    assert not result.warnings


def test_event_pods_partitions_redis_and_spark():
    result = plan(SMALL, _inputs())
    # ingest: 2000 × 50 µs = 0.1 core → 0.2 → 1 → 1 per zone on 2 zones → 3.
    assert result.value("ingest", "pods") == 3
    # worker: 2000 × 100 µs = 0.2 core / 0.5 → 1 → 3 pods.
    assert result.value("worker", "pods") == 3
    # a partition carries 10,000/s × 0.5; max(3 pods, 0.4) × 2 growth.
    assert result.value("bus", "partitions") == 6
    gb = {
        "user rows": 1e6 * 1000 / 1e9,
        "session rows": 100_000 * 2 * 300 / 1e9,
        "item rows": 1e6 * 400 / 1e9,
        "bus (backpressure bound)": 6 * 100_000 * 200 / 1e9,
        "dedupe window": 2000 * 3600 * 100 / 1e9,
    }
    for part, expected in gb.items():
        assert result.value("redis", part) == pytest.approx(expected)
    data = sum(gb.values())
    assert result.value("redis", "data, one copy") == pytest.approx(data)
    assert result.value("redis", "memory with replicas") == pytest.approx(2 * data)
    # CPU: events 2000 × 50 µs = 0.1 core; reads 1000 × 4 × 10 µs = 0.04 core;
    # refreshes: 27 processes × (2.2M keys × 1 µs + 1M _ts × 2 µs) / 30 s = 3.78 cores.
    assert result.value("redis", "CPU: event path") == pytest.approx(0.1)
    assert result.value("redis", "CPU: Recommend row reads") == pytest.approx(0.04)
    assert result.value("redis", "CPU: snapshot refreshes") == pytest.approx(3.78)
    # (0.1 + 0.04 + 3.78) / 0.5 = 7.84 → 8 shards; memory 2.3 GB → 1.
    assert result.value("redis", "primary shards") == 8
    # Spark: 2000/2 × 86,400 × 30 = 2.592e9 events ÷ (10,000 × 7,200) = 36 cores → 9.
    assert result.value("spark", "events per features run") == pytest.approx(2.592e9)
    assert result.value("spark", "executors") == 9
    # knee: 50/s on 2 cores = 25/s per core → 1000 / 25.
    assert result.value("cross-check", "cores at the measured knee") == 40


def test_a_hair_over_a_whole_number_rounds_up():
    exact = plan(SMALL, _inputs(spark_events_per_core_s=10_000.0))
    over = plan(SMALL, _inputs(spark_events_per_core_s=9_999.0))
    assert exact.value("spark", "executors") == 9
    assert over.value("spark", "executors") == 10


def test_redis_shards_follow_whichever_ceiling_binds():
    by_memory = plan(SMALL, _inputs(redis_shard_max_gb=0.05, snapshot_refresh_s=3000.0))
    # 1.0 + 0.06 + 0.4 + 0.12 + 0.72 = 2.3 GB of data.
    assert by_memory.value("redis", "primary shards") == math.ceil(2.3 / 0.05)
    by_cpu = plan(SMALL, _inputs(redis_cpu_us_per_event=10_000.0))
    # 2000 × 10,000 µs = 20 cores + 0.04 + 3.78, over 0.5 → 48 shards.
    assert by_cpu.value("redis", "primary shards") == 48


def test_a_refresh_that_cannot_keep_up_leaves_serving_unsized_and_says_why():
    result = plan(SMALL, _inputs(snapshot_refresh_cpu_s_per_million_items=40.0))
    assert result.warnings and "refresh" in result.warnings[0]
    assert "--snapshot-refresh-s" in result.warnings[0]
    with pytest.raises(KeyError):
        result.value("retrieval", "pods")
    assert any("count no snapshot refresh" in w for w in result.warnings)
    with pytest.raises(KeyError):
        result.value("redis", "CPU: snapshot refreshes")
    assert result.value("worker", "pods") == 3  # the rest is still sized


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"users": 0}, "--users"),
        ({"daily_actives": -5}, "--daily-actives"),
        ({"recommend_rps": float("nan")}, "--recommend-rps"),
        ({"events_rps": float("inf")}, "--events-rps"),
        ({"items": 10**13}, "--items"),
        ({"users": 10, "daily_actives": 20}, "--daily-actives"),
    ],
)
def test_a_population_that_makes_no_sense_is_refused_naming_the_flag(changes, flag):
    values = {"users": 100, "daily_actives": 10, "recommend_rps": 1.0, "events_rps": 1.0,
              "items": 10} | changes  # fmt: skip
    with pytest.raises(InvalidInputError, match=re.escape(flag)):
        Population(**values)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"utilisation": 0.0}, "--utilisation"),
        ({"utilisation": 1.5}, "--utilisation"),
        ({"zones": -1}, "--zones"),
        ({"cores_per_server_pod": float("nan")}, "--cores-per-server-pod"),
        ({"redis_replicas": -1}, "--redis-replicas"),
    ],
)
def test_a_bad_assumption_flag_is_refused_naming_it(overrides, flag):
    with pytest.raises(InvalidInputError, match=re.escape(flag)):
        run_capacity(SMALL, overrides=overrides)


def test_no_replica_is_a_choice():
    result, _ = run_capacity(SMALL, overrides={"redis_replicas": 0})
    one_copy = result.value("redis", "data, one copy")
    assert result.value("redis", "memory with replicas") == pytest.approx(one_copy)


def test_the_committed_inputs_name_their_sources():
    inputs = load_inputs(INPUTS_PATH)
    assert set(inputs) == set(INPUTS)
    measured = [f for f in inputs.values() if f.kind == "measured"]
    assert len(measured) >= 15
    for fig in inputs.values():
        assert "SEE-BELOW" not in fig.source, fig.name
        assert len(fig.source) > 20, fig.name
    for fig in measured:
        assert re.search(r"at [0-9a-f]{7,40}, 20\d\d-\d\d-\d\d", fig.source), fig.name


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: t.replace('commit = "66407a2"', 'commit = ""', 1), "commit"),
        (lambda t: t.replace('"ms"\nkind = "measured"', '"ms"\nkind = "guess"', 1), "kind"),
        (lambda t: t + '\n[nonsense]\nvalue = 1\nkind = "assumption"\nwhy = "x"\n', "nonsense"),
        (lambda t: t.replace("value = 11.0", "value = -11.0", 1), "retrieval_cpu_ms"),
        (lambda t: t.replace('unit = "ms"', 'unit = "s"', 1), "retrieval_cpu_ms"),
    ],
)
def test_an_inputs_file_without_a_source_or_with_a_bad_figure_is_refused(tmp_path, edit, says):
    path = tmp_path / "inputs.toml"
    path.write_text(edit(INPUTS_PATH.read_text()))
    with pytest.raises(InvalidInputError, match=says):
        load_inputs(path)


def _load(name: str) -> LoadResult:
    latencies = np.array([5.0, 6.0, 7.0])
    return LoadResult(
        name=name, target_rate=50.0, duration_s=1.0, warmup_s=0.0, max_in_flight=10, count=3,
        ok=3, errors={}, send_rate=50.0, throughput=50.0, p50_ms=6.0, p95_ms=7.0, p99_ms=7.0,
        max_ms=7.0, mean_ms=6.0, service_p50_ms=6.0, service_p99_ms=7.0, send_lag_p99_ms=0.1,
        sustained=True, started_at="", finished_at="", latencies_ms=latencies,
    )  # fmt: skip


def test_figures_are_read_from_a_serving_report_the_harness_wrote(tmp_path):
    memory = {
        "redis": [
            {"entity": "user_id", "rows": 1000, "sampled": 500, "bytes_per_row": 900.0,
             "total_mb": 0.9},
            {"entity": "session_id", "rows": 2000, "sampled": 500, "bytes_per_row": 280.0,
             "total_mb": 0.5},
            {"entity": "item_id", "rows": 3000, "sampled": 500, "bytes_per_row": 360.0,
             "total_mb": 1.0},
            {"entity": "(the whole server: used_memory, every key)", "rows": 9000, "sampled": 0,
             "bytes_per_row": 400.0, "total_mb": 3.4},
        ],
        "processes": [],
        "snapshots": [],
    }  # fmt: skip
    knees = [
        {"scenario": "recommend_20 (baseline)", "held": 100.0, "broke_at": 150.0, "reason": "x"},
        {"scenario": "recommend_20 (production)", "held": 75.0, "broke_at": 100.0, "reason": "y"},
    ]
    paths = write_report(
        [_load("recommend_20 (production)")], tmp_path / "serving",
        title="inkling serving benchmark", config={"items": 1000}, machine=machine_info(),
        extra={"memory": memory, "knees": knees},
    )  # fmt: skip
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "freshness.json").write_text(
        json.dumps(
            {
                "phases": [
                    {"rate": 1000.0, "achieved_events_per_s": 1000.0, "cpu_us_per_event": {
                        "processes": {"ingest": 90.0, "worker0": 300.0, "redis": 99.0}}},
                    {"rate": 5000.0, "achieved_events_per_s": 4995.0, "cpu_us_per_event": {
                        "processes": {"ingest": 40.0, "worker0": 60.0, "worker1": 50.0,
                                      "redis": 55.0}}},
                    {"rate": 10000.0, "achieved_events_per_s": 7000.0, "cpu_us_per_event": {
                        "processes": {"ingest": 1.0, "worker0": 1.0, "redis": 1.0}}},
                ]
            }
        )
    )  # fmt: skip
    found = read_reports(tmp_path)
    assert found["user_row_bytes"].value == 900.0
    assert found["session_row_bytes"].value == 280.0
    assert found["item_row_bytes"].value == 360.0
    assert str(paths["json"]) in found["item_row_bytes"].source
    assert found["recommend_knee_rps"].value == 75.0
    assert found["knee_machine_cores"].value == machine_info()["cpu_affinity"]
    # The highest rate that was sustained (10,000/s was not), workers summed.
    assert found["ingest_cpu_us_per_event"].value == 40.0
    assert found["worker_cpu_us_per_event"].value == 110.0
    assert found["redis_cpu_us_per_event"].value == 55.0
    assert all(f.kind == "measured" for f in found.values())


def test_reports_must_be_a_directory(tmp_path):
    with pytest.raises(InvalidInputError, match="--reports"):
        read_reports(tmp_path / "missing")


def test_the_command_prints_the_table_and_writes_the_report(tmp_path, capsys):
    code = main(["bench", "capacity", "--items", "1000000", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| retrieval | pods |" in printed and "Assumptions:" in printed
    document = json.loads((tmp_path / "capacity.json").read_text())
    assert document["population"]["items"] == 1_000_000
    rows = {(r["component"], r["quantity"]): r["value"] for r in document["rows"]}
    assert rows[("bus", "partitions")] >= rows[("worker", "pods")]
    assert (tmp_path / "capacity.md").read_text().startswith("# inkling capacity model")


def test_the_command_refuses_a_bad_flag_with_its_name(capsys):
    assert main(["bench", "capacity", "--events-rps", "-1"]) == 2
    assert "--events-rps" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "capacity", "--help"])
    text = capsys.readouterr().out
    for flag in ("--users", "--daily-actives", "--recommend-rps", "--events-rps", "--items",
                 "--inputs", "--reports", "--utilisation", "--zones", "--cores-per-server-pod",
                 "--cores-per-event-pod", "--redis-replicas", "--snapshot-refresh-s", "--out"):  # fmt: skip
        assert flag in text
