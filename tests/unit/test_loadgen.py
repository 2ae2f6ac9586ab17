"""The open-loop load generator against fake calls of known cost."""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import pytest

from bench.harness.loadgen import DROPPED, UNFINISHED, LoadResult, run_open_loop, sync_call
from bench.harness.report import machine_info, markdown_table, write_report
from inkling.errors import InvalidInputError


class SleepCall:
    """An async call that sleeps a fixed time and records how many calls overlap."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.active = 0
        self.max_active = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.active -= 1
        return "OK"


def run(call, **kwargs) -> LoadResult:
    kwargs.setdefault("name", "fake")
    return asyncio.run(run_open_loop(call, **kwargs))


def test_known_sleep_gives_exact_count_and_latencies_at_least_the_sleep():
    call = SleepCall(0.020)
    r = run(call, rate=200, duration_s=0.3, warmup_s=0.05)

    assert call.calls == 70  # 10 warm-up requests were sent too ...
    assert r.count == 60  # ... but only the measured window is counted
    assert r.ok == 60
    assert r.errors == {}
    assert r.latencies_ms.shape == (60,)
    assert r.latencies_ms.min() >= 20.0
    assert 20.0 <= r.p50_ms <= r.p95_ms <= r.p99_ms <= r.max_ms
    assert r.mean_ms >= 20.0
    assert 20.0 <= r.service_p50_ms <= r.service_p99_ms
    assert r.p50_ms >= r.service_p50_ms  # latency counts from the scheduled send
    assert r.p50_ms < 500  # generous: a shared 2-core machine, but not absurd
    assert 0.6 * 200 <= r.throughput <= 200 * (1 + 1e-9)  # capped at the target
    assert r.send_rate <= 200 * 1.02
    assert r.target_rate == 200.0


def test_open_loop_keeps_sending_while_earlier_requests_are_outstanding():
    call = SleepCall(0.200)
    r = run(call, rate=100, duration_s=0.2, warmup_s=0)

    assert r.ok == 20
    # A closed loop would have one outstanding; open loop has all of them by 0.2 s.
    assert call.max_active >= 15
    assert r.p50_ms >= 200.0
    # A constant latency does not lower the completion rate: it is the send rate.
    assert r.throughput >= 0.6 * 100


def test_statuses_and_exceptions_are_counted_by_name():
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        k = calls % 10
        calls += 1
        await asyncio.sleep(0.001)
        if k in (0, 1):
            return "UNAVAILABLE"
        if k == 2:
            raise ValueError("boom")
        if k == 3:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        return "OK"

    r = run(flaky, rate=500, duration_s=0.2, warmup_s=0)

    assert r.count == 100
    assert r.ok == 60
    assert r.errors == {"DEADLINE_EXCEEDED": 10, "UNAVAILABLE": 20, "ValueError": 10}
    assert r.error_count == 40
    assert r.latencies_ms.shape == (60,)  # latency is over successful requests only


def test_requests_over_max_in_flight_are_dropped_and_counted():
    call = SleepCall(0.200)
    r = run(call, rate=100, duration_s=0.3, warmup_s=0, max_in_flight=2)

    assert call.max_active <= 2
    dropped = r.errors.get(DROPPED, 0)
    assert dropped > 0
    assert r.ok + dropped == r.count == 30
    assert not r.sustained


def test_drain_cap_cancels_and_counts_stragglers():
    call = SleepCall(30.0)
    started = time.perf_counter()
    r = run(call, rate=100, duration_s=0.05, warmup_s=0, drain_timeout_s=0.1)

    assert time.perf_counter() - started < 5.0
    assert r.errors == {UNFINISHED: 5}
    assert r.send_rate > 0  # they were sent, just never answered
    assert r.ok == 0
    assert math.isnan(r.p50_ms)
    assert not r.sustained
    assert call.active == 0  # every call was cancelled, none left running


def test_cancelling_the_run_cancels_its_requests():
    call = SleepCall(30.0)

    async def cancelled_run() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                run_open_loop(call, rate=100, duration_s=5, warmup_s=0, name="x"), timeout=0.1
            )

    asyncio.run(cancelled_run())
    assert 0 < call.calls < 100
    assert call.active == 0


def test_sync_call_measures_the_queueing_of_a_blocked_loop():
    r = run(sync_call(lambda: time.sleep(0.020)), rate=100, duration_s=0.2, warmup_s=0)

    assert r.ok == 20
    assert r.service_p50_ms >= 20.0
    # 20 ms of work every 10 ms: requests queue behind each other, so the last waits
    # far longer than one service time, and the loop cannot keep up the send rate.
    assert r.max_ms > 5 * r.service_p50_ms
    assert r.throughput < 0.7 * 100  # one completion per 20 ms, not per 10 ms
    assert not r.sustained


def test_sync_call_counts_exceptions():
    def fails() -> None:
        raise KeyError("x")

    r = run(sync_call(fails), rate=100, duration_s=0.1, warmup_s=0)
    assert r.errors == {"KeyError": 10}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "duration_s": 1},
        {"rate": -5, "duration_s": 1},
        {"rate": math.nan, "duration_s": 1},
        {"rate": math.inf, "duration_s": 1},
        {"rate": 10, "duration_s": 0},
        {"rate": 10, "duration_s": -1},
        {"rate": 2e6, "duration_s": 1, "warmup_s": 0},
        {"rate": 1e5, "duration_s": 9.5, "warmup_s": 1},  # warm-up counts toward the bound
        {"rate": 1, "duration_s": 0.1},  # no request at all
        {"rate": 10, "duration_s": 1, "max_in_flight": 0},
        {"rate": 10, "duration_s": 1, "warmup_s": -1},
        {"rate": 10, "duration_s": 1, "drain_timeout_s": -1},
    ],
)
def test_bad_arguments_raise_before_any_request(kwargs):
    call = SleepCall(0)
    with pytest.raises(InvalidInputError):
        run(call, **kwargs)
    assert call.calls == 0


def test_report_of_a_scenario_without_successes(tmp_path):
    async def unavailable() -> str:
        return "UNAVAILABLE"

    r = run(unavailable, rate=100, duration_s=0.1, warmup_s=0, name="down | out")
    paths = write_report(
        [r], tmp_path, title="t", config={"rate": 100}, machine=machine_info(), notes=["n"]
    )

    document = json.loads(paths["json"].read_text())
    (scenario,) = document["scenarios"]
    assert scenario["errors"] == {"UNAVAILABLE": 10}
    assert scenario["p50_ms"] is None  # NaN is written as null, the file stays strict JSON
    assert "latencies_ms" not in scenario
    assert "down \\| out" in paths["markdown"].read_text()  # a pipe cannot break the table
    assert "| – |" in markdown_table([r])
    assert paths["plot"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_machine_info_describes_the_host():
    info = machine_info()
    assert info["cpu_count"] >= 1
    assert 1 <= info["cpu_affinity"] <= info["cpu_count"]
    assert info["python"].startswith("3.11")
    assert info["memory_total_bytes"] > 0
    assert len(info["load_average_at_start"]) == 3
    json.dumps(info)
