"""`python -m stream_worker`: one stream worker in the foreground (until SIGTERM).

Settings as everywhere: flags > environment (`INKLING_*`, `INKLING_WORKER_*`) > the
TOML config file > defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from inkling.config import load_settings
from inkling.errors import InklingError
from inkling.telemetry import logs, providers
from inkling.telemetry.settings import load_telemetry_settings
from stream_worker.settings import load_worker_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream_worker", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file ([worker] table)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--feature-repo", type=Path)
    parser.add_argument("--redis", dest="redis_address", help="host:port[,db=N] of the bus")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--worker-id")
    parser.add_argument("--metrics-port", type=int, help="/metrics port (default 9464; 0 = none)")
    args = parser.parse_args(argv)
    logs.install(f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    try:
        settings = load_settings(
            args.config,
            {
                "data_dir": args.data_dir,
                "feature_repo": args.feature_repo,
                "redis_address": args.redis_address,
            },
        )
        worker_settings = load_worker_settings(
            args.config, {"partitions": args.partitions, "worker_id": args.worker_id}
        )
        from inkling.events.kafka_bus import load_kafka_settings
        from stream_worker.app import serve_worker

        kafka = load_kafka_settings(args.config)

        telemetry = load_telemetry_settings(args.config)
        with providers.configure("worker", metrics_port=args.metrics_port, settings=telemetry):
            stats = serve_worker(settings, worker_settings, kafka)
    except InklingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[worker] stopped: {stats.as_dict()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
