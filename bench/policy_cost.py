"""What the exploring policy stage costs `RankCandidates(500)`: part of `inkling bench
serving` (`--policy-only` runs just this).

One retrieval server and one ranking server run as deployed (the registry's models),
with `[ranking] policies` giving the surface `bandit` the contextual bandit
(`inkling.bandit`, its parameters read from Redis every second) and every other surface
the greedy ranker. The same `RankCandidates` requests (500 catalogue items, top 20) go
open-loop at `--rate`, alternately without a surface (greedy) and with surface
`bandit`, for `--rounds` rounds, the order alternating per round. Reported per side:
the medians over rounds of p50 and p99 of the RPC as the client saw it, and the mean of
the server's own `policy` stage (`inkling.stage.duration`) over each side's window, the
part that differs between the two. Then the stage alone, in process and unloaded:
each request's `policy` lap of the stage clock, greedy and bandit alternating over the
same 2,000 requests, with its percentiles.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

import grpc
import numpy as np

from bench.harness.loadgen import LoadResult, run_open_loop
from bench.harness.processes import cli_process, wait_serving
from bench.harness.report import sides_table
from bench.harness.scrape import mean_by
from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.redis_embedded import free_port
from inkling.v1 import ranking_service_pb2_grpc

SIDES = ("greedy", "bandit")
BANDIT = "bandit(epsilon=0.05,temperature=0.1,pool=50)"
STAGE_METRIC = "inkling_stage_duration_seconds"


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PolicyRun:
    side: str
    round: int
    load: LoadResult
    policy_stage_ms: float
    """The server's mean `policy` stage over the run's window."""


@dataclass(frozen=True)
class PolicyCost:
    runs: list[PolicyRun]
    in_process_us: dict[str, list[int]]
    """Per side, the policy stage of each in-process request (microseconds)."""

    def markdown(self) -> str:
        lines = [
            "The policy stage on RankCandidates(500, top 20): one ranking server, surface "
            f"`bandit` = `{BANDIT}` against the greedy ranker, the same requests to each in "
            "turn, medians over rounds (`bench.policy_cost`):",
            "",
        ]
        table, p99s, stages = sides_table(
            "policy", SIDES, self.runs, "policy stage mean ms", lambda r: r.policy_stage_ms, 3
        )
        lines += table
        lines += [
            "",
            f"p99 with the bandit minus greedy: {p99s['bandit'] - p99s['greedy']:+.2f} ms; the "
            f"policy stage's mean: {stages['bandit'] - stages['greedy']:+.3f} ms "
            "(the issue allows +1 ms at p99).",
            "",
            "The policy stage alone, in process (the ranking server's own code and models, "
            "no gRPC, no load: `RankingCore.rank_candidates` timed by its stage clock, the "
            "sides alternating request by request over the same requests):",
            "",
            "| policy | requests | p50 ms | p90 ms | p99 ms | max ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        p99 = {}
        for side in SIDES:
            us = np.asarray(self.in_process_us[side], np.float64) / 1000
            p50, p90, p99[side] = np.percentile(us, [50, 90, 99])
            lines.append(
                f"| {side} | {len(us)} | {p50:.3f} | {p90:.3f} | {p99[side]:.3f} | {us.max():.3f} |"
            )
        lines += [
            "",
            f"Policy stage p99, bandit minus greedy, in process: "
            f"{p99['bandit'] - p99['greedy']:+.3f} ms.",
        ]
        return "\n".join(lines)


async def _in_process(live: Settings, requests: int, seed: int) -> dict[str, list[int]]:
    """The policy stage's microseconds per request and side, from a ranking app started
    in this process (the registry's models; retrieval is not needed by RankCandidates)."""
    from bench.servers import Workload
    from inkling.serving.runtime import Deadline
    from inkling.serving.settings import RankingSettings
    from ranking_server.app import RankingApp

    rs = RankingSettings(port=0, serve_log=False, policies={"bandit": BANDIT})
    app = RankingApp(live, rs)
    await app.start()
    core = app.core
    assert core is not None
    await asyncio.sleep(2 * rs.bandit_refresh_s)  # the bandit's parameters read once
    work = Workload(live, seed)
    out: dict[str, list[int]] = {side: [] for side in SIDES}
    try:
        for i in range(requests + 50):
            user, session = work.who()
            items = work.some_items(500)
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                ranked = await core.rank_candidates(
                    user, session, items, 20, Deadline(1.0),
                    surface="bandit" if side == "bandit" else "", seed=i,
                )  # fmt: skip
                if i >= 50:  # the first requests warm caches: not measured
                    out[side].append(dict(ranked.timings)["policy"])
    finally:
        await app.close()
    return out


def run_policy_cost(
    live: Settings,
    *,
    rate: float,
    duration_s: float,
    rounds: int,
    seed: int = 0,
    in_process_requests: int = 2000,
) -> PolicyCost:
    """The comparison above, on the servers `live` describes (its Redis, its registry)."""
    from bench.servers import Workload

    if rounds < 1:
        raise InvalidInputError(f"--rounds must be at least 1, got {rounds}")
    ports = {name: free_port() for name in ("retrieval", "ranking", "metrics")}
    config = live.data_dir / "bench-policy.toml"
    config.write_text(f'[ranking]\npolicies = {{ bandit = "{BANDIT}" }}\n')
    metrics = [f"127.0.0.1:{ports['metrics']}"]
    runs: list[PolicyRun] = []
    with (
        cli_process(live, "retrieval-policy", "serve", "retrieval", "--port",
                    str(ports["retrieval"]), "--metrics-port", "0"),
        cli_process(live, "ranking-policy", "serve", "ranking", "--port", str(ports["ranking"]),
                    "--retrieval-address", f"127.0.0.1:{ports['retrieval']}",
                    "--metrics-port", str(ports["metrics"]),
                    env={"INKLING_CONFIG": str(config)}),
    ):  # fmt: skip
        for port in (ports["retrieval"], ports["ranking"]):
            asyncio.run(wait_serving(port))

        async def drive(side: str, round_: int) -> PolicyRun:
            work = Workload(live, seed + round_)  # both sides get the same requests
            surface = "bandit" if side == "bandit" else ""
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['ranking']}") as channel:
                call = work.rank(
                    ranking_service_pb2_grpc.RankingServiceStub(channel), 500, surface=surface
                )
                if round_ == 0:  # first calls load lazily: outside every measurement
                    await run_open_loop(call, rate=rate, duration_s=2, name="warm")
                before = mean_by(metrics, STAGE_METRIC, "stage").get("policy", (0.0, 0.0))
                load = await run_open_loop(
                    call, rate=rate, duration_s=duration_s, name=f"rank_500 ({side})"
                )
                after = mean_by(metrics, STAGE_METRIC, "stage").get("policy", (0.0, 0.0))
                count = after[1] - before[1]
                stage_ms = 1000 * (after[0] - before[0]) / count if count else float("nan")
                return PolicyRun(side, round_, load, stage_ms)

        for round_ in range(rounds):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                _progress(f"policy cost: {side}, round {round_ + 1} of {rounds}")
                runs.append(asyncio.run(drive(side, round_)))
    _progress("policy cost: the stage alone, in process")
    return PolicyCost(runs, asyncio.run(_in_process(live, in_process_requests, seed)))
