"""What TLS and mutual TLS cost `Recommend`: part of `inkling bench serving`
(`--tls-only` runs just this).

Three pairs of servers run at once, as deployed (the registry's models), each pair a
retrieval and a ranking server under one `[security]` table: plaintext (the default);
TLS (the client and ranking verify the servers' certificate); mutual TLS (every caller
presents a certificate, and the allow-list admits only `frontend` to the ranking
service and only `ranking` to retrieval). The certificates come from a throw-away CA
made for the run (`inkling.serving.certs`). The same `Recommend(num_results=20)`
requests go open-loop at `--rate` to each pair in turn for `--rounds` rounds, the
order rotating per round; the client keeps one channel per pair and round, so the
handshake is paid once per round and what is measured is the steady per-call cost.
Reported per side: the medians over rounds of p50 and p99 and the ranking server's
CPU per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.harness.loadgen import LoadResult, run_open_loop
from bench.harness.processes import cli_process, cpu_seconds, wait_serving
from bench.harness.report import sides_table
from inkling.config import Settings
from inkling.errors import InvalidInputError
from inkling.redis_embedded import free_port
from inkling.serving.certs import Authority
from inkling.serving.security import open_channel
from inkling.v1 import ranking_service_pb2_grpc

SIDES = ("plaintext", "tls", "mutual tls")


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TlsRun:
    side: str
    round: int
    load: LoadResult
    cpu_ms_per_request: float


@dataclass(frozen=True)
class TlsCost:
    runs: list[TlsRun]

    def markdown(self) -> str:
        lines = [
            "Transport security on Recommend(20): three server pairs at once (plaintext, "
            "TLS, mutual TLS with the allow-list), the same requests to each in turn, "
            "medians over rounds (`bench.tls_cost`):",
            "",
        ]
        table, p99s, _ = sides_table(
            "side", SIDES, self.runs, "ranking CPU ms/req", lambda r: r.cpu_ms_per_request
        )
        lines += table
        lines += [
            "",
            f"p99 minus plaintext: TLS {p99s['tls'] - p99s['plaintext']:+.2f} ms, mutual TLS "
            f"{p99s['mutual tls'] - p99s['plaintext']:+.2f} ms.",
        ]
        return "\n".join(lines)


def _configs(
    directory: Path,
) -> tuple[dict[str, Path | None], dict[str, grpc.ChannelCredentials | None]]:
    """Per side: the config file both servers of its pair read, and the client's
    credentials."""
    ca = Authority.create(directory / "ca", name="inkling bench CA")
    server = ca.issue(directory / "server", "localhost")
    ranking = ca.issue(directory / "ranking", "ranking")
    frontend = ca.issue(directory / "frontend", "frontend")
    tls = directory / "tls.toml"
    tls.write_text(
        f'[security]\ncert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n'
        f'ca_file = "{ca.cert_file}"\n'
    )
    mutual = directory / "mutual-tls.toml"
    mutual.write_text(
        tls.read_text() + f'client_ca_file = "{ca.cert_file}"\n'
        f'client_cert_file = "{ranking.cert_file}"\nclient_key_file = "{ranking.key_file}"\n'
        'allow = { "inkling.v1.RetrievalService/*" = "ranking", '
        '"inkling.v1.RankingService/*" = "frontend" }\n'
    )
    root = ca.cert_file.read_bytes()
    credentials = {
        "plaintext": None,
        "tls": grpc.ssl_channel_credentials(root_certificates=root),
        "mutual tls": grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=frontend.key_file.read_bytes(),
            certificate_chain=frontend.cert_file.read_bytes(),
        ),
    }
    return {"plaintext": None, "tls": tls, "mutual tls": mutual}, credentials


def run_tls_cost(
    live: Settings, *, rate: float, duration_s: float, rounds: int, seed: int = 0
) -> TlsCost:
    """The comparison above, on the servers `live` describes (its Redis, its registry)."""
    from bench.servers import Workload

    if rounds < 1:
        raise InvalidInputError(f"--rounds must be at least 1, got {rounds}")
    configs, credentials = _configs(live.data_dir / "bench-tls")
    ports = {side: (free_port(), free_port()) for side in SIDES}  # retrieval, ranking
    runs: list[TlsRun] = []
    with contextlib.ExitStack() as stack:
        pids: dict[str, int] = {}
        for side in SIDES:
            retrieval, ranking = ports[side]
            env = {"INKLING_CONFIG": str(configs[side])} if configs[side] else {}
            name = side.replace(" ", "-")
            stack.enter_context(
                cli_process(live, f"retrieval-{name}", "serve", "retrieval", "--port",
                            str(retrieval), "--metrics-port", "0", env=env)
            )  # fmt: skip
            proc = stack.enter_context(
                cli_process(live, f"ranking-{name}", "serve", "ranking", "--port", str(ranking),
                            "--retrieval-address", f"127.0.0.1:{retrieval}",
                            "--metrics-port", "0", env=env)
            )  # fmt: skip
            pids[side] = proc.pid
        for side in SIDES:
            for port in ports[side]:
                # Health is open to any caller; over TLS where the side speaks it.
                asyncio.run(wait_serving(port, credentials=credentials[side]))

        async def drive(side: str, round_: int) -> TlsRun:
            work = Workload(live, seed + round_)  # every side gets the same requests
            target = f"127.0.0.1:{ports[side][1]}"
            async with open_channel(target, credentials[side]) as channel:
                call = work.recommend(ranking_service_pb2_grpc.RankingServiceStub(channel))
                await run_open_loop(call, rate=rate, duration_s=2, name="warm")  # + handshake
                before = cpu_seconds(pids[side])
                load = await run_open_loop(
                    call, rate=rate, duration_s=duration_s, name=f"recommend_20 ({side})"
                )
                used = cpu_seconds(pids[side]) - before
                sent = load.count + round(rate * load.warmup_s)
                return TlsRun(side, round_, load, used * 1000 / max(sent, 1))

        for round_ in range(rounds):
            order = SIDES[round_ % 3 :] + SIDES[: round_ % 3]
            for side in order:
                _progress(f"tls cost: {side}, round {round_ + 1} of {rounds}")
                runs.append(asyncio.run(drive(side, round_)))
    return TlsCost(runs)
