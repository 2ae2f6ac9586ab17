"""`inkling bench serving --sweep`: each scenario's knee, the highest rate it holds.

A sweep drives one call open-loop at rising rates, one step per rate, and stops at the
first rate that breaks: a p99 over the budget (50 ms), any request that failed or came
back degraded, or a rate the client could not send or the server could not answer
within 5 % (`LoadResult.sustained`). A step that breaks is run once more, and the rate
breaks only if both tries did: on a shared machine one noisy step would otherwise end
a sweep long before its knee. The knee is the last rate that held. Every step is kept
in the report, and the steps are drawn as latency against achieved throughput.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness.loadgen import Call, LoadResult, run_open_loop

BUDGET_MS = 50.0
SERVER_RATES = (25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0)
"""From 25/s: on a 2-core machine the production Recommend at 100k items can break at
50/s, and a knee 'below the first step' says nothing more."""
STOCK_RATES = (5.0, 10.0, 20.0, 40.0, 80.0)
"""Stock Feast's call is synchronous and tens of ms: its knee is far lower."""


@dataclass(frozen=True)
class Knee:
    scenario: str
    held: float | None
    """The highest rate that held; None when the first step broke."""
    broke_at: float | None
    """The rate that broke; None when every rate tried held."""
    reason: str


def why_broken(result: LoadResult, budget_ms: float = BUDGET_MS) -> str:
    """Why a step does not hold ('' when it holds)."""
    if result.error_count:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items()))
        return f"{result.error_count} of {result.count} failed or degraded ({kinds})"
    if not result.sustained:
        return f"not sustained: {result.throughput:.0f}/s of {result.target_rate:g}/s answered"
    if result.p99_ms > budget_ms:
        return f"p99 {result.p99_ms:.1f} ms over the {budget_ms:g} ms budget"
    return ""


async def sweep(
    call: Call,
    scenario: str,
    rates: Sequence[float],
    duration_s: float,
    budget_ms: float = BUDGET_MS,
) -> tuple[list[LoadResult], Knee]:
    """Step through `rates` until one breaks; every step's result and the knee."""
    steps: list[LoadResult] = []
    held: float | None = None
    for rate in rates:
        reason = ""
        for attempt in (1, 2):
            print(f"[bench] sweep {scenario} at {rate:g}/s", file=sys.stderr, flush=True)
            name = f"{scenario} @ {rate:g}/s" + (" (again)" if attempt == 2 else "")
            result = await run_open_loop(call, rate=rate, duration_s=duration_s, name=name)
            steps.append(result)
            reason = why_broken(result, budget_ms)
            if not reason:
                break
        if reason:
            return steps, Knee(scenario, held, rate, f"twice: {reason}")
        held = rate
    return steps, Knee(scenario, held, None, f"held every rate tried (up to {rates[-1]:g}/s)")


def knee_table(knees: Sequence[Knee], budget_ms: float = BUDGET_MS) -> str:
    lines = [
        f"Knees (highest open-loop rate with p99 <= {budget_ms:g} ms, nothing failed or "
        "degraded, sustained):",
        "",
        "| scenario | knee | broke at | why |",
        "| --- | ---: | ---: | --- |",
    ]
    for k in knees:
        held = f"{k.held:g}/s" if k.held is not None else "below the first step"
        broke = f"{k.broke_at:g}/s" if k.broke_at is not None else "-"
        lines.append(f"| {k.scenario} | {held} | {broke} | {k.reason} |")
    return "\n".join(lines)


def plot_sweep(
    steps: dict[str, list[LoadResult]], path: Path, budget_ms: float = BUDGET_MS
) -> None:
    """p50 and p99 against achieved throughput, one line pair per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (scenario, results) in enumerate(steps.items()):
        color = f"C{i % 10}"
        xs = [r.throughput for r in results]
        ax.plot(xs, [r.p99_ms for r in results], "o-", color=color, label=f"{scenario} p99")
        ax.plot(xs, [r.p50_ms for r in results], "x--", color=color, alpha=0.6)
    ax.axhline(budget_ms, color="grey", linestyle=":", label=f"{budget_ms:g} ms budget")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="achieved requests/s (OK answers)",
        ylabel="latency ms (p99 solid, p50 dashed)",
        title="inkling serving: latency against throughput, open loop",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Sweeps:
    """The sweeps of one benchmark run, as they are taken."""

    duration_s: float
    steps: dict[str, list[LoadResult]]
    knees: list[Knee]

    async def run(self, call: Call, scenario: str, rates: Sequence[float]) -> None:
        steps, knee = await sweep(call, scenario, rates, self.duration_s)
        self.steps[scenario] = steps
        self.knees.append(knee)

    def results(self) -> list[LoadResult]:
        return [r for steps in self.steps.values() for r in steps]
