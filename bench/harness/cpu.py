"""CPU time of a benchmark's processes per event: each process from `/proc`, and the
stream workers' stages from their `inkling.stage.cpu_time` counters (`/metrics`).

Sample before and after a window (load and drain), then `per_event` divides what was
spent by the events of the window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.harness.processes import cpu_seconds
from bench.harness.scrape import scrape_samples

STAGE_CPU_METRIC = "inkling_stage_cpu_time_seconds_total"


@dataclass(frozen=True)
class CpuSample:
    processes: dict[str, float]
    """CPU seconds so far by process name."""
    stages: dict[str, float]
    """CPU seconds so far by stage, summed over the staged processes."""


class CpuMeter:
    """Samples the CPU of named processes; `staged` names those (stream workers) whose
    stage counters are scraped from `stage_addresses`."""

    def __init__(
        self,
        pids: Mapping[str, int],
        stage_addresses: Sequence[str] = (),
        staged: Sequence[str] = (),
    ) -> None:
        self.pids = dict(pids)
        self.stage_addresses = list(stage_addresses)
        self.staged = list(staged)

    def sample(self) -> CpuSample:
        stages: dict[str, float] = {}
        if self.stage_addresses:
            for _, labels, value in scrape_samples(self.stage_addresses, STAGE_CPU_METRIC):
                stages[labels["stage"]] = stages.get(labels["stage"], 0.0) + value
        return CpuSample({name: cpu_seconds(pid) for name, pid in self.pids.items()}, stages)

    def per_event(
        self, before: CpuSample, after: CpuSample, events: int
    ) -> dict[str, dict[str, float]]:
        """µs of CPU per event between two samples: `processes` (and their `total`) and,
        for the staged processes, `stages` largest first, with `other` (their CPU on no
        stage: other threads, garbage collection, metric export)."""
        if events <= 0:
            return {"processes": {}, "stages": {}}

        def us(seconds: float) -> float:
            return round(seconds / events * 1e6, 1)

        spent = {k: v - before.processes.get(k, 0.0) for k, v in after.processes.items()}
        processes = {k: us(v) for k, v in spent.items()}
        processes["total"] = us(sum(spent.values()))
        staged = {k: v - before.stages.get(k, 0.0) for k, v in after.stages.items()}
        staged = {k: v for k, v in sorted(staged.items(), key=lambda kv: -kv[1]) if v > 0}
        stages = {k: us(v) for k, v in staged.items()}
        if self.staged:
            other = sum(spent[name] for name in self.staged) - sum(staged.values())
            stages["other"] = us(other)
        return {"processes": processes, "stages": stages}
