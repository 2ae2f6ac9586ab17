"""`inkling bench serving`: the serving path under open-loop load on loopback.

Set-up (once per data directory; `--reuse` keeps it): a synthetic log over a
`--items` catalogue, the Spark features, `feast apply`, bulk materialization into a
private Redis, ALS embeddings and the FAISS index chosen by measurement, and the
production models, briefly trained and published CURRENT: the two-tower retrieval
model with its index and the SASRec ranker. Then the servers start as their own
processes (`inkling serve retrieval|ranking`) twice: as deployed (the registry's
models: the *production* rows) and with no registry model (ALS and the baseline
scorer: the *baseline* comparison rows, the same requests). Scenarios, in one run:

| scenario                 | what one request is                                             |
| ------------------------ | --------------------------------------------------------------- |
| harness_floor            | nothing: what the open-loop client itself adds                  |
| hydrate_500              | in process: `Hydrator.hydrate`, 1 user + 1 session + 500 items    |
| stock_feast_500          | in process: Feast `get_online_features(ranker_v1)` for the same keys |
| rank_100, rank_500       | `RankCandidates` with 100 / 500 catalogue items                 |
| retrieve_1000            | `RetrieveCandidates(num_candidates=1000)`                        |
| retrieve_1000_packed     | the same as columns (`packed`), as the ranking server asks       |
| recommend_20             | `Recommend(num_results=20)`, which retrieves 1,000              |
| rank_500 (greedy / bandit) | `RankCandidates(500)` from the surface `bandit` (the contextual bandit) and from no surface (greedy), on one ranking server, `--rounds` rounds in turn (`bench.policy_cost`); `--policy-only` runs just this |
| recommend_20 (plaintext / tls / mutual tls) | `Recommend(20)` at `--rate` on three server pairs at once, one per `[security]` set-up, `--rounds` rounds in turn (`bench.tls_cost`); `--tls-only` runs just this |
| recommend_20 (serve log on / off) | the same at `--serve-log-rate` (20/s, a load the production path sustains here), on two ranking servers at once, one not recording its answers (`bench.serve_log_cost`), `--rounds` rounds in turn; `--serve-log-only` runs just this |

Every scenario runs open-loop at `--rate` for `--duration` seconds, except stock
Feast, which is synchronous and about 50 ms a call here: it runs at `--stock-rate`
(default 10/s) so that its numbers are its service time, not a queue. Over
recommend_20's window the ranking server's own stage metrics give each stage's share
of a `Recommend`. `--sweep` adds each scenario's knee (`bench.sweep`). The report
(JSON, Markdown, PNG) names the machine, the load and the percentiles; the index
measurement of the set-up is appended.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import grpc

from bench.harness.dataset import materialize, prepare, publish_models
from bench.harness.loadgen import Call, LoadResult, run_open_loop, sync_call
from bench.harness.processes import server_process, wait_serving
from bench.harness.report import machine_info, write_report
from bench.harness.scrape import mean_by
from bench.memory import MemoryTable, process_memory, redis_pid, redis_rows, snapshot_costs
from bench.policy_cost import run_policy_cost
from bench.serve_log_cost import run_serve_log_cost
from bench.sweep import SERVER_RATES, STOCK_RATES, Sweeps, knee_table, plot_sweep
from bench.telemetry_cost import ModeRun, overhead_table, parse_modes, run_telemetry_cost
from bench.tls_cost import run_tls_cost
from inkling.config import Settings
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.hydrator import Hydrator
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.feature_store.snapshot_refresh import SnapshotRefresher
from inkling.redis_embedded import EmbeddedRedis, free_port
from inkling.v1 import (
    ranking_service_pb2,
    ranking_service_pb2_grpc,
    resources_pb2,
    retrieval_service_pb2,
    retrieval_service_pb2_grpc,
)

OK = "OK"


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _keys(settings: Settings, seed: int) -> tuple[list[str], list[str], list[str]]:
    import pyarrow.dataset as ds

    def ids(view: str, key: str) -> list[str]:
        table = ds.dataset(str(settings.features_dir / view)).to_table(columns=[key])
        return sorted(set(table.column(key).to_pylist()))

    users, sessions = ids("user_features", "user_id"), ids("session_features", "session_id")
    items = ids("item_features", "item_id")
    return users, sessions, items


class Workload:
    """Requests drawn from the benchmark data set: a random user and session, random
    catalogue items, one seeded generator."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.rng = random.Random(seed)
        self.users, self.sessions, self.items = _keys(settings, seed)

    def who(self) -> tuple[str, str]:
        return self.rng.choice(self.users), self.rng.choice(self.sessions)

    def some_items(self, n: int) -> list[str]:
        return self.rng.sample(self.items, n)

    def rank(
        self, ranking: ranking_service_pb2_grpc.RankingServiceStub, n: int, surface: str = ""
    ) -> Call:
        """`RankCandidates` of `n` random catalogue items, top 20, from `surface`."""

        async def call() -> str:
            user, session = self.who()
            await ranking.RankCandidates(
                ranking_service_pb2.RankCandidatesRequest(
                    user_id=user,
                    session_id=session,
                    candidates=[
                        ranking_service_pb2.CallerCandidate(item_id=i) for i in self.some_items(n)
                    ],
                    num_results=20,
                    context=resources_pb2.RequestContext(surface=surface),
                ),
                timeout=1.0,
            )
            return OK

        return call

    def retrieve(
        self, retrieval: retrieval_service_pb2_grpc.RetrievalServiceStub, packed: bool = False
    ) -> Call:
        """`RetrieveCandidates(num_candidates=1000)`, as messages or as columns (`packed`,
        what the ranking server asks for)."""

        async def call() -> str:
            user, session = self.who()
            await retrieval.RetrieveCandidates(
                retrieval_service_pb2.RetrieveCandidatesRequest(
                    user_id=user, session_id=session, num_candidates=1000, packed=packed
                ),
                timeout=1.0,
            )
            return OK

        return call

    def recommend(self, ranking: ranking_service_pb2_grpc.RankingServiceStub) -> Call:
        """`Recommend(num_results=20)`; a degraded answer counts as the error DEGRADED."""

        async def call() -> str:
            user, session = self.who()
            reply = await ranking.Recommend(
                ranking_service_pb2.RecommendRequest(
                    user_id=user, session_id=session, num_results=20
                ),
                timeout=1.0,
            )
            return "DEGRADED" if reply.degradation.degraded else OK

        return call


async def _in_process(
    settings: Settings,
    work: Workload,
    rate: float,
    stock_rate: float,
    duration_s: float,
    sweeps: Sweeps | None = None,
) -> list[LoadResult]:
    """The harness floor, inkling's hydration and stock Feast, in this process."""
    who, some_items = work.who, work.some_items
    results: list[LoadResult] = []
    store = open_store(settings)
    columns = resolve_service(store, "ranker_v1")
    client = await open_async_redis(store)
    refresher = SnapshotRefresher(client, columns, refresh_interval_s=3600)
    began = time.perf_counter()
    await refresher.start()
    _progress(f"in-process snapshot built in {time.perf_counter() - began:.1f}s")
    hydrator = Hydrator(RowReader(client, columns), refresher)
    service = store.get_feature_service("ranker_v1")

    async def hydrate() -> str:
        user, session = who()
        await hydrator.hydrate(user, session, some_items(500))
        return OK

    def stock() -> None:
        user, session = who()
        rows = [{"user_id": user, "session_id": session, "item_id": i} for i in some_items(500)]
        store.get_online_features(features=service, entity_rows=rows)

    async def nothing() -> str:
        return OK

    # What the client alone adds (timer resolution, scheduling): read the rows below against it.
    _progress("harness_floor")
    results.append(
        await run_open_loop(nothing, rate=rate, duration_s=duration_s, name="harness_floor")
    )
    _progress("hydrate_500")
    results.append(
        await run_open_loop(hydrate, rate=rate, duration_s=duration_s, name="hydrate_500")
    )
    _progress("stock_feast_500")
    results.append(
        await run_open_loop(
            sync_call(stock), rate=stock_rate, duration_s=duration_s, name="stock_feast_500"
        )
    )
    if sweeps is not None:
        await sweeps.run(hydrate, "hydrate_500", SERVER_RATES)
        await sweeps.run(sync_call(stock), "stock_feast_500", STOCK_RATES)
    await refresher.stop()
    await client.aclose()
    return results


RECOMMEND_METHOD = "inkling.v1.RankingService/Recommend"
VARIANTS = {
    "production": "",
    "baseline": '[retrieval]\nmodel = ""\n[ranking]\nmodel = ""\n',
}
"""Served variants, each a settings file for both servers: the registry's CURRENT
two-tower and SASRec models (what serves), and ALS with the baseline scorer (the
comparison rows)."""


async def _served(
    variant: str,
    ports: Mapping[str, int],
    work: Workload,
    rate: float,
    duration_s: float,
    notes: list[str],
    sweeps: Sweeps | None = None,
) -> list[LoadResult]:
    """RankCandidates, RetrieveCandidates and Recommend against one pair of servers;
    `Recommend`'s time split by stage from the servers' own stage metrics."""
    results: list[LoadResult] = []
    metrics = [f"127.0.0.1:{ports['ranking_metrics']}"]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['ranking']}") as ranking_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['retrieval']}") as retrieval_channel,
    ):
        ranking = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel)
        retrieval = retrieval_service_pb2_grpc.RetrievalServiceStub(retrieval_channel)
        user, session = work.who()
        probe = await ranking.Recommend(
            ranking_service_pb2.RecommendRequest(
                user_id=user, session_id=session, num_results=20, debug=True
            ),
            timeout=1.0,
        )
        notes.append(
            f"{variant}: Recommend served by {probe.served_by.model_version}, index "
            f"{probe.served_by.index_version or '(ALS)'}."
        )
        for name, call in (
            ("rank_100", work.rank(ranking, 100)),
            ("rank_500", work.rank(ranking, 500)),
            ("retrieve_1000", work.retrieve(retrieval)),
            ("retrieve_1000_packed", work.retrieve(retrieval, packed=True)),
            ("recommend_20", work.recommend(ranking)),
        ):
            _progress(f"{name} ({variant})")
            if name == "recommend_20":
                stages_before = mean_by(metrics, STAGE_METRIC, "stage")
                rpc_before = mean_by(metrics, RPC_METRIC, "rpc_method")
            results.append(
                await run_open_loop(
                    call, rate=rate, duration_s=duration_s, name=f"{name} ({variant})"
                )
            )
        stages = _window(stages_before, mean_by(metrics, STAGE_METRIC, "stage"))
        rpc = _window(rpc_before, mean_by(metrics, RPC_METRIC, "rpc_method"))
        notes.append(_stage_shares(variant, stages, rpc.get(RECOMMEND_METHOD, (0.0, 0.0))))
        if sweeps is not None:
            await sweeps.run(work.rank(ranking, 500), f"rank_500 ({variant})", SERVER_RATES)
            await sweeps.run(
                work.retrieve(retrieval, packed=True),
                f"retrieve_1000_packed ({variant})",
                SERVER_RATES,
            )
            await sweeps.run(work.recommend(ranking), f"recommend_20 ({variant})", SERVER_RATES)
    return results


STAGE_METRIC = "inkling_stage_duration_seconds"
RPC_METRIC = "rpc_server_call_duration_seconds"


def _window(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    return {
        k: (s - before.get(k, (0.0, 0.0))[0], c - before.get(k, (0.0, 0.0))[1])
        for k, (s, c) in after.items()
    }


def _stage_shares(
    variant: str, stages: Mapping[str, tuple[float, float]], rpc: tuple[float, float]
) -> str:
    """Markdown: mean ms per stage of the window's Recommends and its share of the
    ranking server's mean call time; the rest is what no stage times."""
    total_s, calls = rpc
    if not calls:
        return f"{variant}: no Recommend was measured by the ranking server."
    mean_ms = total_s / calls * 1000
    lines = [
        f"Where a Recommend's time goes ({variant}; the ranking server's own stage metrics "
        f"over recommend_20's window, {calls:.0f} calls, mean {mean_ms:.2f} ms):",
        "",
        "| stage | mean ms | share |",
        "| --- | ---: | ---: |",
    ]
    timed = 0.0
    for stage in ("retrieve", "hydrate", "score", "policy"):
        s, c = stages.get(stage, (0.0, 0.0))
        ms = s / c * 1000 if c else 0.0
        timed += ms
        lines.append(f"| {stage} | {ms:.2f} | {ms / mean_ms:.0%} |")
    rest = mean_ms - timed
    lines.append(
        f"| not in a stage (decode, interceptors, response) | {rest:.2f} | {rest / mean_ms:.0%} |"
    )
    return "\n".join(lines)


def run_serving_benchmark(
    settings: Settings,
    *,
    items: int,
    rate: float,
    stock_rate: float,
    duration_s: float,
    out: Path,
    reuse: bool,
    seed: int = 0,
    telemetry: str | None = None,
    rounds: int = 2,
    sweep: bool = False,
    memory_only: bool = False,
    serve_log_rate: float = 20.0,
    serve_log_only: bool = False,
    policy_only: bool = False,
    tls_only: bool = False,
) -> dict[str, Path]:
    """The scenarios above; with `telemetry` (modes, e.g. `off,metrics,default,full`),
    instead what telemetry costs (`bench.telemetry_cost`), written under `out/telemetry`;
    with `memory_only`, only the set-up's data and the memory table (no models, no
    servers), written under `out/memory`."""
    modes = parse_modes(telemetry) if telemetry is not None else None
    settings = replace(settings, online_store="redis")
    prepare(settings, items, reuse)
    with EmbeddedRedis(settings.redis_dir, persistent=False) as redis_server:
        live = settings.with_redis(redis_server.address)
        live.export_env()
        began = time.perf_counter()
        materialize(live)
        materialize_s = time.perf_counter() - began
        if memory_only:
            return _memory_report(live, out / "memory", items, materialize_s)
        publish_models(live, reuse)
        if policy_only:
            policy = run_policy_cost(live, rate=rate, duration_s=duration_s, rounds=rounds,
                                     seed=seed)  # fmt: skip
            return _comparison_report(
                [r.load for r in policy.runs], policy.markdown(), out / "policy",
                "inkling serving benchmark: what the exploring policy stage costs RankCandidates",
                {"items": items, "rate": rate, "duration_s": duration_s},
            )  # fmt: skip
        if tls_only:
            tls = run_tls_cost(live, rate=rate, duration_s=duration_s, rounds=rounds, seed=seed)
            return _comparison_report(
                [r.load for r in tls.runs], tls.markdown(), out / "tls",
                "inkling serving benchmark: what TLS and mutual TLS cost Recommend",
                {"items": items, "rate": rate, "duration_s": duration_s},
            )  # fmt: skip
        if serve_log_only:
            cost = run_serve_log_cost(
                live, rate=serve_log_rate, duration_s=duration_s, rounds=rounds, seed=seed
            )
            return _comparison_report(
                [r.load for r in cost.runs], cost.markdown(), out / "serve_log",
                "inkling serving benchmark: what the serve log costs Recommend",
                {"items": items, "rate": serve_log_rate, "duration_s": duration_s},
            )  # fmt: skip
        if modes is not None:
            runs = run_telemetry_cost(
                live, modes, rate=rate, duration_s=duration_s, rounds=rounds, seed=seed
            )
            return _telemetry_report(runs, out / "telemetry", items, rate, duration_s, rounds)
        work = Workload(live, seed)
        _progress(
            f"{len(work.users)} users, {len(work.sessions)} sessions, {len(work.items)} items "
            "in the store"
        )
        memory = MemoryTable(
            redis=redis_rows(
                live, {"user_id": work.users, "session_id": work.sessions, "item_id": work.items}
            ),
            snapshots=[asyncio.run(snapshot_costs(live, s)) for s in ("ranker_v1", "retrieval_v1")],
        )
        memory.processes.append(process_memory("Redis", redis_pid(live)))
        sweeps = Sweeps(duration_s, {}, []) if sweep else None
        results = asyncio.run(_in_process(live, work, rate, stock_rate, duration_s, sweeps))
        memory.processes.append(process_memory("benchmark client (in-process scenarios run)"))
        stage_notes: list[str] = []
        for variant, config in VARIANTS.items():
            env = {}
            if config:
                path = settings.data_dir / f"bench-{variant}.toml"
                path.write_text(config)
                env["INKLING_CONFIG"] = str(path)
            ports = {name: free_port() for name in ("retrieval", "ranking", "ranking_metrics")}
            with (
                server_process("retrieval", live, ports["retrieval"], "--metrics-port", "0",
                               env=env) as retrieval_process,
                server_process("ranking", live, ports["ranking"], "--retrieval-address",
                               f"127.0.0.1:{ports['retrieval']}",
                               "--metrics-port", str(ports["ranking_metrics"]),
                               env=env) as ranking_process,
            ):  # fmt: skip
                asyncio.run(wait_serving(ports["retrieval"]))
                asyncio.run(wait_serving(ports["ranking"]))
                _progress(f"both servers SERVING ({variant})")
                same = Workload(live, seed)  # every variant gets the same requests
                results += asyncio.run(
                    _served(variant, ports, same, rate, duration_s, stage_notes, sweeps)
                )
                for role, process in (("retrieval", retrieval_process),
                                      ("ranking", ranking_process)):  # fmt: skip
                    memory.processes.append(process_memory(f"{role} ({variant})", process.pid))
        serve_log = run_serve_log_cost(
            live, rate=serve_log_rate, duration_s=duration_s, rounds=rounds, seed=seed
        )
        results += [r.load for r in serve_log.runs]
        policy = run_policy_cost(live, rate=rate, duration_s=duration_s, rounds=rounds, seed=seed)
        results += [r.load for r in policy.runs]
    index_report = settings.models_dir / "index" / "index_report.md"
    notes = [
        "Open-loop load from one asyncio client process; latency counts from the scheduled send "
        "time, so queueing is included.",
        f"stock_feast_500 runs at {stock_rate}/s: Feast's call is synchronous and blocks its "
        "loop, so at the others' rate it would only measure a queue.",
        "recommend_20 counts a degraded answer (a fallback served it) as an error named DEGRADED.",
        "Servers: one process each (`inkling serve`), the client and Redis on the same 2 cores.",
    ]
    notes.extend(stage_notes)
    notes.append(serve_log.markdown())
    notes.append(policy.markdown())
    notes.append(memory.markdown())
    if sweeps is not None:
        out.mkdir(parents=True, exist_ok=True)
        plot_sweep(sweeps.steps, out / "sweep.png")
        notes.append(knee_table(sweeps.knees) + "\n\n![sweep](sweep.png)")
        results = results + sweeps.results()
    if index_report.exists():
        notes.append(
            "FAISS index choice (recall@100 vs exact, per-query latency):\n\n"
            + index_report.read_text()
        )
    paths = write_report(
        results,
        out,
        title="inkling serving benchmark",
        config={
            "items": items,
            "rate": rate,
            "stock_rate": stock_rate,
            "duration_s": duration_s,
            "data_dir": str(settings.data_dir),
        },
        machine=machine_info(),
        notes=notes,
        extra={
            "memory": memory.to_dict(),
            # The knees as data, for `inkling bench capacity --reports`.
            "knees": [asdict(k) for k in sweeps.knees] if sweeps is not None else [],
        },
    )
    hydrate = next(r for r in results if r.name == "hydrate_500")
    stock = next(r for r in results if r.name == "stock_feast_500")
    _progress(
        f"hydration p99 {hydrate.p99_ms:.2f} ms vs stock Feast p99 {stock.p99_ms:.2f} ms "
        f"({stock.p99_ms / max(hydrate.p99_ms, 1e-9):.0f}x); p50 {hydrate.p50_ms:.2f} vs "
        f"{stock.p50_ms:.2f} ms"
    )
    print(paths["markdown"].read_text())
    return paths


def _memory_report(live: Settings, out: Path, items: int, materialize_s: float) -> dict[str, Path]:
    """The memory table of the data set in `live`'s Redis, as JSON and Markdown."""
    work = Workload(live, 0)
    _progress(f"memory table over {len(work.items)} items")
    memory = MemoryTable(
        redis=redis_rows(
            live, {"user_id": work.users, "session_id": work.sessions, "item_id": work.items}
        ),
        snapshots=[asyncio.run(snapshot_costs(live, s)) for s in ("ranker_v1", "retrieval_v1")],
    )
    memory.processes.append(process_memory("Redis", redis_pid(live)))
    memory.processes.append(process_memory("benchmark process (after the snapshot builds)"))
    out.mkdir(parents=True, exist_ok=True)
    rows = len(work.users) + len(work.sessions) + len(work.items)
    document = {
        "items": items,
        "machine": machine_info(),
        "materialize_s": materialize_s,
        "memory": memory.to_dict(),
    }
    paths = {"json": out / "memory.json", "markdown": out / "memory.md"}
    paths["json"].write_text(json.dumps(document, indent=2, default=str) + "\n")
    paths["markdown"].write_text(
        f"# inkling memory and size, {items:,}-item catalogue\n\n"
        f"Set-up materialized every view ({rows:,} user, session and item rows among them) "
        f"in {materialize_s:.1f} s.\n\n" + memory.markdown() + "\n"
    )
    print(paths["markdown"].read_text())
    return paths


def _comparison_report(
    loads: list[LoadResult], markdown: str, out: Path, title: str, config: dict[str, float]
) -> dict[str, Path]:
    """The report of one comparison run alone (`--serve-log-only`, `--policy-only`)."""
    paths = write_report(
        loads, out, title=title, config=config, machine=machine_info(), notes=[markdown]
    )
    print(paths["markdown"].read_text())
    return paths


def _telemetry_report(
    runs: list[ModeRun], out: Path, items: int, rate: float, duration_s: float, rounds: int
) -> dict[str, Path]:
    machine = machine_info()
    cores = int(machine.get("cpu_affinity") or machine.get("cpu_count") or 1)
    table = overhead_table(runs, cores)
    notes = [
        "What telemetry costs (`bench/telemetry_cost.py`): both servers restarted per mode, "
        f"modes in turn over {rounds} rounds; medians over the rounds. Server CPU is both "
        "servers' user+system seconds over a scenario (warm-up included) per request sent; "
        "the rate bound is cores / that, what a CPU-bound host could sustain. Spans were "
        "exported over OTLP/gRPC to a counting sink on loopback; /metrics was scraped every "
        "5 s.",
        table,
    ]
    paths = write_report(
        [r.load for r in runs],
        out,
        title="inkling telemetry cost",
        config={"items": items, "rate": rate, "duration_s": duration_s, "rounds": rounds},
        machine=machine,
        notes=notes,
    )
    print(table)
    return paths
