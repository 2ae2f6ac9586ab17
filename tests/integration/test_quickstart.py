"""The README's quick start, run as written: its shell lines in one bash session, from a
CSV with ISO-8601 timestamps to a `Recommend` answered by the servers it started.

Only the surroundings are the test's: a fresh data directory and a copy of the Feast
repository (by environment), free ports for the servers (`INKLING_RETRIEVAL_PORT`,
`INKLING_RANKING_PORT`), no `/metrics` listeners, and `inkling redis start` given a free
port, so that the run meets nothing else on the machine."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inkling.config import PROJECT_ROOT
from inkling.redis_embedded import free_port
from inkling.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from tests.conftest import temp_settings

pytestmark = [pytest.mark.spark, pytest.mark.redis]


def quickstart_lines() -> list[str]:
    """The shell lines of the README's quick-start block."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"<!-- quick-start:[^>]*-->\n```sh\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README.md has no quick-start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def write_events(path: Path, users: int = 60, per_user: int = 40, seed: int = 0) -> Path:
    """A CSV as an export would have it: ISO-8601 times with a zone, on the day before
    yesterday (a day's item and user features are stamped at its next midnight UTC, so
    they are online once that has passed). Each user browses one of four item ranges."""
    rng = np.random.default_rng(seed)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=2)
    rows = ["user_id,item_id,timestamp"]
    for u in range(users):
        base = int(rng.integers(0, 4)) * 15
        t = start + timedelta(minutes=int(rng.integers(0, 300)))
        for _ in range(per_user):
            t += timedelta(seconds=int(rng.integers(20, 400)))
            item = base + int(rng.integers(1, 16))
            rows.append(f"u{u},i{item},{t.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _wait_serving(channel: grpc.Channel, shell: subprocess.Popen[str], log: Path) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert shell.poll() is None, log.read_text()
        time.sleep(0.5)
    raise AssertionError(f"the ranking server never reported SERVING:\n{log.read_text()}")


@pytest.mark.timeout(600)
def test_the_readme_quick_start_serves_a_recommend(tmp_path):
    lines = quickstart_lines()
    assert len(lines) == 5, lines
    settings = temp_settings(tmp_path)
    write_events(tmp_path / "my-events.csv")
    retrieval, ranking, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INKLING_", "OTEL_"))}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        INKLING_DATA_DIR=str(settings.data_dir),
        INKLING_FEATURE_REPO=str(settings.feature_repo),
        INKLING_SPARK_MASTER="local[2]",
        INKLING_RETRIEVAL_PORT=str(retrieval),
        INKLING_RANKING_PORT=str(ranking),
        INKLING_RANKING_RETRIEVAL_ADDRESS=f"127.0.0.1:{retrieval}",
        INKLING_TELEMETRY_METRICS_PORT="0",
    )
    script = "\n".join(
        [
            "set -euo pipefail",
            # `inkling` as the installed command is this interpreter's CLI; `redis start`
            # gets a free port instead of the default 6390.
            f'inkling() {{ if [ "${{1-}} ${{2-}}" = "redis start" ]; then '
            f'"{sys.executable}" -m inkling.cli redis start --port {redis_port}; '
            f'else "{sys.executable}" -m inkling.cli "$@"; fi; }}',
            *(f"echo '$ {line.split('#')[0].strip()}'\n{line}" for line in lines),
            "wait",
        ]
    )
    log = tmp_path / "quickstart.log"
    with log.open("w") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=tmp_path, env=env, stdout=out,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranking}") as channel:
            _wait_serving(channel, shell, log)
            reply = ranking_service_pb2_grpc.RankingServiceStub(channel).Recommend(
                ranking_service_pb2.RecommendRequest(
                    user_id="u7", session_id="s-new", num_results=5
                ),
                timeout=10,
            )
        assert len(reply.items) == 5
        assert not reply.degradation.degraded, reply.degradation.detail
        assert all(re.fullmatch(r"i\d+", item.item_id) for item in reply.items)
        printed = log.read_text()
        assert "timestamps: ISO-8601 with a zone (detected" in printed, printed
        assert "2400 events appended (60 users" in printed, printed
        assert "chosen index:" in printed and "SERVING on" in printed
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(timeout=60)
        deadline = time.monotonic() + 30  # the servers drain before their Redis goes
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(shell.pid, 0)
                time.sleep(0.2)
        pid = settings.redis_dir / "redis.pid"
        if pid.exists():
            os.kill(int(pid.read_text().strip()), signal.SIGTERM)
