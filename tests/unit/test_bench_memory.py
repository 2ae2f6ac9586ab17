"""The memory table of `inkling bench serving`: process memory read from /proc, and the
Markdown and JSON it reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.memory import MemoryTable, process_memory


def test_process_memory_reads_a_childs_resident_set_and_its_peak():
    # A child that holds about 200 MB, then waits to be measured.
    child = subprocess.Popen(
        [sys.executable, "-c", "b = bytearray(200 << 20); import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        for _ in range(200):  # until the child has touched its 200 MB, at most 10 s
            row = process_memory("child", child.pid)
            if row["rss_mb"] > 200:
                break
            time.sleep(0.05)
        assert row["process"] == "child" and row["pid"] == child.pid
        assert 200 < row["rss_mb"] <= row["peak_mb"]
    finally:
        child.kill()
        child.wait()
    me = process_memory("me")
    assert me["pid"] is None and 0 < me["rss_mb"] <= me["peak_mb"]


def test_the_table_renders_every_row_and_round_trips_through_json():
    table = MemoryTable(
        redis=[{"entity": "item_id", "rows": 100_000, "sampled": 500, "bytes_per_row": 430.4,
                "total_mb": 41.0}],
        processes=[{"process": "ranking (production)", "pid": 7, "rss_mb": 812.2,
                    "peak_mb": 900.0}],
        snapshots=[{"service": "ranker_v1", "items": 100_000, "build_s": 1.5, "build_cpu_s": 1.2,
                    "refresh_s": 0.2, "refresh_cpu_s": 0.1, "refresh_rows_read": 0, "mb": 12.5}],
    )  # fmt: skip
    text = table.markdown()
    assert "| item_id | 100,000 | 430 | 41.0 |" in text
    assert "| ranking (production) | 812 | 900 |" in text
    assert "| ranker_v1 | 100,000 | 1.50 (1.20) | 0.20 (0.10) | 12.5 |" in text
    assert MemoryTable(**json.loads(json.dumps(table.to_dict()))) == table
