"""A stream worker rides out a Redis outage: Redis stops under it and comes back on the
same port and data directory, and the worker carries on by itself; every event is
applied once and logged once."""

from __future__ import annotations

import time

import pytest
import redis

from inkling.events.eventlog import EventLog
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import feast_cli, open_store
from inkling.feature_store.rows import RowReader
from inkling.redis_embedded import EmbeddedRedis, free_port
from stream_worker.app import build_worker
from stream_worker.settings import WorkerSettings
from tests.conftest import temp_settings
from tests.integration.test_stream_worker import (
    FAST,
    Running,
    append,
    backlog,
    event,
    wait_until,
    write_catalog,
)

pytestmark = [pytest.mark.redis]


def test_worker_recovers_by_itself_after_redis_comes_back(tmp_path):
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port, persistent=True).start()
    try:
        settings = temp_settings(tmp_path, redis_address=f"127.0.0.1:{port}")
        feast_cli(settings, "apply", quiet=True)
        settings.export_env()
        write_catalog(settings, {f"i{n}": f"c{n % 3}" for n in range(30)})
        client = redis.Redis(host="127.0.0.1", port=port)
        running = Running(build_worker(settings, WorkerSettings(**FAST)))

        def logged_ids() -> list[str]:
            if not settings.events_dir.exists():
                return []
            return EventLog(settings.events_dir).read(["event_id"]).column("event_id").to_pylist()

        before = [event(f"a{n}", "click", f"s{n % 5}", f"i{n}", dwell=5_000) for n in range(20)]
        append(client, before)
        wait_until(lambda: backlog(client) == 0 and len(logged_ids()) == 20, what="first batch")

        server.stop()  # the worker now fails every call and backs off
        time.sleep(2.0)
        assert running.thread.is_alive() and running.error is None
        server.start()  # same port, same append-only file

        client = redis.Redis(host="127.0.0.1", port=port)
        after = [event(f"b{n}", "click", f"s{n % 5}", f"i{n + 20}", dwell=5_000) for n in range(20)]
        append(client, after)
        wait_until(
            lambda: backlog(client) == 0 and len(logged_ids()) == 40,
            timeout=60,
            what="the worker to carry on after the outage",
        )
        ids = logged_ids()
        assert sorted(ids) == sorted(e.event_id for e in before + after)  # once each

        reader = RowReader(client, resolve_service(open_store(settings), "ranker_v1"))
        rows = reader.read_sync("session_features", [f"s{k}" for k in range(5)])
        assert [r["session_clicks"] for r in rows] == [8] * 5  # 40 clicks over 5 sessions
        running.stop.set()
        running.thread.join(20)
        assert running.error is None
    finally:
        server.stop()
