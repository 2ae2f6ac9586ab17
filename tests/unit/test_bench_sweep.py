"""The capacity sweep's stopping rule, on calls whose outcome is known."""

from __future__ import annotations

import asyncio
import itertools

from bench.sweep import sweep


def test_a_call_that_always_holds_reaches_the_last_rate():
    async def fine() -> str:
        return "OK"

    steps, knee = asyncio.run(sweep(fine, "fine", (20.0, 40.0), duration_s=0.5))
    assert [s.name for s in steps] == ["fine @ 20/s", "fine @ 40/s"]
    assert (knee.held, knee.broke_at) == (40.0, None)


def test_a_rate_breaks_only_when_its_second_try_breaks_too():
    async def degraded() -> str:
        return "DEGRADED"

    steps, knee = asyncio.run(sweep(degraded, "bad", (20.0, 40.0), duration_s=0.5))
    assert len(steps) == 2 and steps[1].name == "bad @ 20/s (again)"
    assert (knee.held, knee.broke_at) == (None, 20.0)
    assert knee.reason.startswith("twice:") and "DEGRADED" in knee.reason

    calls = itertools.count()

    async def one_bad_step() -> str:  # only the first try's requests degrade
        return "DEGRADED" if next(calls) < 25 else "OK"  # 20 warm-up calls, then 5

    steps, knee = asyncio.run(sweep(one_bad_step, "flaky", (20.0,), duration_s=0.5))
    assert [s.error_count > 0 for s in steps] == [True, False]
    assert (knee.held, knee.broke_at) == (20.0, None)
