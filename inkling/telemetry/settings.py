"""The `[telemetry]` table of the settings file (also `INKLING_TELEMETRY_<NAME>`).

The standard `OTEL_*` variables win over these: an operator who sets
`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_SDK_DISABLED` gets what
the OpenTelemetry specification says, whatever the file holds.

```toml
[telemetry]
trace_ratio = 0.05                            # share of requests traced (parent-based)
otlp_endpoint = "http://otel-collector:4317"  # where traces go over OTLP/gRPC
metrics_port = 9462                           # this process's /metrics (0: none)
metrics_host = "0.0.0.0"                      # scraped from another machine
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inkling.errors import ConfigurationError

SECTION = "telemetry"


@dataclass(frozen=True)
class TelemetrySettings:
    """How one process reports itself."""

    enabled: bool = True
    """False turns traces and metrics off (as `OTEL_SDK_DISABLED=true` does)."""
    trace_ratio: float = 0.01
    """Share of requests without a sampled caller that are traced (parent-based: a
    caller's sampled trace is always continued; `debug` requests always are); 0 traces
    only those. `OTEL_TRACES_SAMPLER` replaces the sampler."""
    otlp_endpoint: str = ""
    """OTLP/gRPC endpoint that traces are exported to; empty: none (the default).
    `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` wins."""
    metrics_port: int | None = None
    """The `/metrics` port; None: the role's default (`providers.DEFAULT_METRICS_PORTS`);
    0: none. Meant for one process per file (a pod); `--metrics-port` wins."""
    metrics_host: str = ""
    """The interface `/metrics` binds; empty: a server's own `--host`, loopback for a
    stream worker (set 0.0.0.0 for a Prometheus on another machine)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.trace_ratio <= 1.0:
            raise ConfigurationError(f"trace_ratio must be within [0, 1], got {self.trace_ratio}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigurationError(f"metrics_port must be a port or 0, got {self.metrics_port}")


def load_telemetry_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TelemetrySettings:
    """The `[telemetry]` table, `INKLING_TELEMETRY_*` variables, then `overrides`."""
    from inkling.serving.settings import load_server_settings

    return load_server_settings(TelemetrySettings, SECTION, config_file, overrides, environ)
