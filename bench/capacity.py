"""`inkling bench capacity`: the pods, cores, Redis, bus partitions and Spark executors a
population needs, from the benchmarks' figures, with every assumption printed beside them.

Inputs are figures, each with its provenance: a measurement (the command, commit and
date that produced it) or an assumption (with its reasoning). They come from the
committed `bench/capacity_inputs.toml`, and a figure found in a benchmark report under
`--reports DIR` replaces the committed one (the report's path becomes its source):

| report (file name, anywhere under DIR) | figures |
| --- | --- |
| `report.json` of `bench serving`, or `memory.json` of `bench serving --memory-only` | Redis bytes per user, session and item row (the memory table); the production `Recommend`'s sweep knee and the machine's cores when the run had `--sweep` |
| `freshness.json` of `bench freshness` | CPU µs per accepted event of the ingest server, the stream workers (summed) and Redis, from the highest rate that was sustained |
| `capacity_measure.json` of `python -m bench.capacity measure` | bus bytes per entry and dedupe bytes per event, from `MEMORY USAGE` after appending through the ingest path; Redis CPU per row read, per key a snapshot refresh's SCAN visits and per `_ts` read |

The model (`plan`) is arithmetic only:

- serving pods per role: the role's CPU per `Recommend` times the peak rate, over the
  share of a pod's cores the utilisation target allows after the item snapshot's
  refresh; then spread over zones so that losing one zone leaves enough;
- ingest and worker pods the same way from CPU per event; bus partitions at least the
  worker processes (a partition has one owner at a time), times a growth factor, since
  the number of partitions is fixed once the bus exists;
- Redis memory: rows times bytes per row, plus the bus at its backpressure bound and the
  dedupe window, times fragmentation and replicas; shards from a memory ceiling and a
  CPU ceiling (one core per shard: the event path's Redis CPU per event, the row reads
  of each `Recommend`, and every server process's snapshot refresh, which SCANs every
  key and reads every item's `_ts`), whichever needs more;
- Spark executors: the events one `inkling features` run reads (a window of days), over
  the measured events per core-second within the batch window.

It refuses inputs that are not positive and finite, or are beyond any population it
could mean, naming the flag or the input.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inkling.errors import InvalidInputError

INPUTS_PATH = Path(__file__).with_name("capacity_inputs.toml")
GB = 1e9


ZERO_ALLOWED = frozenset({"redis_replicas"})
"""Inputs that may be zero (no replica); every other one must be positive."""


def _acceptable(name: str, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value >= 0 if name in ZERO_ALLOWED else value > 0


def _wanted(name: str) -> str:
    return "finite number ≥ 0" if name in ZERO_ALLOWED else "positive finite number"


@dataclass(frozen=True)
class Figure:
    """One input of the model and where it comes from."""

    name: str
    value: float
    unit: str
    kind: str
    """`measured` or `assumption`."""
    source: str
    """For a measurement, the command, commit and date (or the report path); for an
    assumption, its reasoning."""

    def __post_init__(self) -> None:
        if self.kind not in ("measured", "assumption"):
            raise InvalidInputError(
                f"input {self.name}: kind must be 'measured' or 'assumption', got {self.kind!r}",
                field=self.name,
            )
        if not _acceptable(self.name, self.value):
            raise InvalidInputError(
                f"input {self.name} must be a {_wanted(self.name)}, got {self.value!r}",
                field=self.name,
            )


# Every input the model reads: name -> (unit, what it is). The inputs file must give each.
INPUTS: dict[str, tuple[str, str]] = {
    "retrieval_cpu_ms_per_recommend": ("ms", "retrieval process CPU per production Recommend"),
    "ranking_cpu_ms_per_recommend": ("ms", "ranking process CPU per production Recommend"),
    "recommend_knee_rps": ("req/s", "highest Recommend rate with p99 within budget (sweep knee)"),
    "knee_machine_cores": ("cores", "cores of the machine the knee was measured on"),
    "recommend_p99_budget_ms": ("ms", "the p99 budget the knee is measured against"),
    "snapshot_mb_per_million_items": ("MB", "item snapshot held per server process"),
    "snapshot_refresh_cpu_s_per_million_items": ("s", "CPU of one snapshot refresh"),
    "snapshot_build_cpu_s_per_million_items": ("s", "CPU of one full snapshot build"),
    "snapshot_full_every": ("refreshes", "every this many refreshes is a full build"),
    "snapshot_refresh_s": ("s", "how often each server process refreshes its snapshot"),
    "server_base_rss_mb": ("MB", "a server process's memory besides its snapshot"),
    "ingest_cpu_us_per_event": ("µs", "ingest server CPU per accepted event"),
    "worker_cpu_us_per_event": ("µs", "stream worker CPU per event"),
    "redis_cpu_us_per_event": ("µs", "Redis CPU per event (bus, dedupe, state, counters)"),
    "user_row_bytes": ("B", "Redis memory per user feature row"),
    "session_row_bytes": ("B", "Redis memory per session feature row"),
    "item_row_bytes": ("B", "Redis memory per item feature row"),
    "bus_entry_bytes": ("B", "Redis memory per bus stream entry"),
    "dedupe_bytes_per_event": ("B", "Redis memory per remembered event id"),
    "spark_events_per_core_s": ("events/s", "inkling features throughput per Spark core"),
    "utilisation": ("fraction", "target CPU utilisation of a process at peak"),
    "zones": ("zones", "availability zones; losing one leaves enough"),
    "cores_per_server_pod": ("cores", "cores per retrieval/ranking pod (one process)"),
    "cores_per_event_pod": ("cores", "cores per ingest/worker pod (one process)"),
    "redis_reads_per_recommend": ("reads", "row reads (HMGET) per Recommend"),
    "redis_us_per_row_read": ("µs", "Redis CPU per row HMGET, two to a round trip"),
    "redis_us_per_scanned_key": ("µs", "Redis CPU per key a snapshot refresh's SCAN visits"),
    "redis_us_per_ts_read": ("µs", "Redis CPU per _ts HMGET, 500 to a round trip"),
    "redis_shard_max_gb": ("GB", "most data per Redis shard"),
    "redis_replicas": ("replicas", "replicas per Redis shard"),
    "redis_fragmentation": ("ratio", "allocator overhead over MEMORY USAGE"),
    "sessions_per_active_per_day": ("sessions", "session ids per daily active user"),
    "session_row_days": ("days", "how long a session row stays in Redis (its view's TTL)"),
    "bus_max_lag": ("entries", "per partition: ingest refuses beyond this backlog"),
    "dedupe_window_s": ("s", "how long an event id is remembered"),
    "partition_growth": ("factor", "bus partitions over those needed today"),
    "peak_to_mean": ("ratio", "peak events/s over the day's mean"),
    "spark_window_days": ("days", "days of log one inkling features run reads"),
    "spark_batch_window_h": ("h", "time the daily features job may take"),
    "spark_executor_cores": ("cores", "cores per Spark executor"),
}


@dataclass(frozen=True)
class Population:
    """What the deployment must serve."""

    users: int = 100_000_000
    daily_actives: int = 10_000_000
    recommend_rps: float = 20_000.0
    events_rps: float = 50_000.0
    items: int = 10_000_000

    def __post_init__(self) -> None:
        limits = {
            "users": 1e11,
            "daily_actives": 1e11,
            "recommend_rps": 1e9,
            "events_rps": 1e9,
            "items": 1e11,
        }
        for name, most in limits.items():
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InvalidInputError(
                    f"{flag} must be a positive number, got {value!r}", field=name
                )
            if value > most:
                raise InvalidInputError(
                    f"{flag} {value:g} is beyond any population this model means (at most "
                    f"{most:g})",
                    field=name,
                )
        if self.daily_actives > self.users:
            raise InvalidInputError(
                f"--daily-actives ({self.daily_actives:,}) cannot exceed --users ({self.users:,})",
                field="daily_actives",
            )


@dataclass
class Row:
    """One line of the capacity table."""

    component: str
    quantity: str
    value: float
    unit: str
    how: str


@dataclass
class Plan:
    population: Population
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def value(self, component: str, quantity: str) -> float:
        for r in self.rows:
            if r.component == component and r.quantity == quantity:
                return r.value
        raise KeyError(f"{component} / {quantity}")


# ---------------------------------------------------------------------------- inputs


def _figure_from_toml(name: str, table: Any, where: Path) -> Figure:
    if not isinstance(table, dict):
        raise InvalidInputError(f"{where}: [{name}] must be a table", field=name)
    unknown = set(table) - {"value", "unit", "kind", "command", "commit", "date", "why"}
    if unknown:
        raise InvalidInputError(f"{where}: [{name}] has unknown keys {sorted(unknown)}", field=name)
    value = table.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{where}: [{name}] value must be a number", field=name)
    kind = str(table.get("kind", ""))
    why = str(table.get("why", "")).strip()
    if kind == "measured":
        missing = [k for k in ("command", "commit", "date") if not str(table.get(k, "")).strip()]
        if missing:
            raise InvalidInputError(
                f"{where}: measured [{name}] must name its {', '.join(missing)}", field=name
            )
        source = f"`{table['command']}` at {table['commit']}, {table['date']}"
        if why:
            source += f"; {why}"
    elif kind == "assumption":
        if not why:
            raise InvalidInputError(
                f"{where}: assumption [{name}] must give its reasoning (why)", field=name
            )
        source = why
    else:
        raise InvalidInputError(
            f"{where}: [{name}] kind must be 'measured' or 'assumption', got {kind!r}",
            field=name,
        )
    expected = INPUTS[name][0] if name in INPUTS else None
    unit = str(table.get("unit", expected or ""))
    if expected is not None and unit != expected:
        raise InvalidInputError(
            f"{where}: [{name}] is in {expected}, the file says {unit!r}", field=name
        )
    return Figure(name, float(value), unit, kind, source)


def load_inputs(path: Path = INPUTS_PATH) -> dict[str, Figure]:
    """Every input of `INPUTS` from a TOML file of `[name]` tables; refuses a missing,
    unknown or unsourced one."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidInputError(f"--inputs: cannot read {path}: {e}", field="inputs") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInputError(f"--inputs: {path} is not TOML: {e}", field="inputs") from None
    unknown = sorted(set(document) - set(INPUTS))
    if unknown:
        raise InvalidInputError(f"{path}: unknown inputs {unknown}", field="inputs")
    missing = sorted(set(INPUTS) - set(document))
    if missing:
        raise InvalidInputError(f"{path}: inputs missing: {missing}", field="inputs")
    return {name: _figure_from_toml(name, document[name], Path(path)) for name in INPUTS}


def _measured(name: str, value: float, source: Path, detail: str) -> Figure:
    return Figure(name, float(value), INPUTS[name][0], "measured", f"{source} ({detail})")


def _from_memory_table(document: Mapping[str, Any], path: Path) -> dict[str, Figure]:
    out = {}
    names = {"user_id": "user_row_bytes", "session_id": "session_row_bytes",
             "item_id": "item_row_bytes"}  # fmt: skip
    for row in document.get("memory", {}).get("redis", []):
        name = names.get(row.get("entity"))
        if name and row.get("sampled") and row.get("bytes_per_row"):
            detail = f"MEMORY USAGE over {row['sampled']} of {row['rows']:,} rows"
            out[name] = _measured(name, row["bytes_per_row"], path, detail)
    return out


def _from_serving(document: Mapping[str, Any], path: Path) -> dict[str, Figure]:
    out = _from_memory_table(document, path)
    for knee in document.get("knees", []):
        if knee.get("scenario") == "recommend_20 (production)" and knee.get("held"):
            cores = document.get("machine", {}).get("cpu_affinity") or document.get(
                "machine", {}
            ).get("cpu_count")
            out["recommend_knee_rps"] = _measured(
                "recommend_knee_rps", knee["held"], path, f"sweep knee, {knee.get('reason')}"
            )
            if cores:
                out["knee_machine_cores"] = _measured(
                    "knee_machine_cores", cores, path, "the run's machine"
                )
    return out


def _from_freshness(document: Mapping[str, Any], path: Path) -> dict[str, Figure]:
    phases = [
        p
        for p in document.get("phases", [])
        if p.get("cpu_us_per_event", {}).get("processes")
        and p.get("achieved_events_per_s", 0) >= 0.99 * p.get("rate", math.inf)
    ]
    if not phases:
        return {}
    phase = max(phases, key=lambda p: p["rate"])
    spent = phase["cpu_us_per_event"]["processes"]
    detail = f"{phase['rate']:g} events/s, CPU per accepted event"
    out = {}
    if spent.get("ingest"):
        out["ingest_cpu_us_per_event"] = _measured(
            "ingest_cpu_us_per_event", spent["ingest"], path, detail
        )
    workers = sum(v for k, v in spent.items() if k.startswith("worker"))
    if workers:
        out["worker_cpu_us_per_event"] = _measured(
            "worker_cpu_us_per_event", workers, path, detail + ", all workers"
        )
    if spent.get("redis"):
        out["redis_cpu_us_per_event"] = _measured(
            "redis_cpu_us_per_event", spent["redis"], path, detail
        )
    return out


def _from_measure(document: Mapping[str, Any], path: Path) -> dict[str, Figure]:
    out = {}
    for name in ("bus_entry_bytes", "dedupe_bytes_per_event"):
        if document.get(name):
            detail = f"{document.get('events', '?')} events through the ingest path"
            out[name] = _measured(name, document[name], path, detail)
    reads = document.get("reads", {})
    for name in ("redis_us_per_row_read", "redis_us_per_scanned_key", "redis_us_per_ts_read"):
        if reads.get(name):
            detail = f"Redis CPU over {reads.get('keys', '?'):,} Feast-layout hashes"
            out[name] = _measured(name, reads[name], path, detail)
    return out


def read_reports(directory: Path) -> dict[str, Figure]:
    """Figures found in the benchmark reports under `directory` (see the module's
    table); a later file (by path order) wins over an earlier one for the same figure."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"--reports: {directory} is not a directory", field="reports")
    readers = {
        "report.json": _from_serving,
        "memory.json": _from_memory_table,
        "freshness.json": _from_freshness,
        "capacity_measure.json": _from_measure,
    }
    found: dict[str, Figure] = {}
    for path in sorted(directory.rglob("*.json")):
        reader = readers.get(path.name)
        if reader is None:
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidInputError(
                f"--reports: cannot read {path}: {e}", field="reports"
            ) from None
        if path.name == "report.json" and document.get("title") != "inkling serving benchmark":
            continue
        found.update(reader(document, path))
    return found


# ---------------------------------------------------------------------------- the model


def _spread(needed: int, zones: int) -> tuple[int, int]:
    """Processes per zone and in all, so that `zones - 1` zones still hold `needed`."""
    survivors = max(zones - 1, 1)
    per_zone = max(math.ceil(needed / survivors), 1)
    return per_zone, per_zone * zones


def plan(population: Population, inputs: Mapping[str, Figure]) -> Plan:
    """The capacity table for `population` from `inputs` (every name of `INPUTS`)."""
    missing = sorted(set(INPUTS) - set(inputs))
    if missing:
        raise InvalidInputError(f"inputs missing: {missing}", field="inputs")
    f = {name: inputs[name].value for name in INPUTS}
    if f["utilisation"] > 1:
        raise InvalidInputError(
            f"--utilisation must be in (0, 1], got {f['utilisation']:g}", field="utilisation"
        )
    zones = round(f["zones"])
    if zones < 1 or zones != f["zones"]:
        raise InvalidInputError(f"--zones must be a whole number ≥ 1, got {f['zones']:g}", "zones")
    p = population
    out = Plan(p)
    add = out.rows.append
    util = f["utilisation"]

    # Serving: one process per pod; its snapshot refresh takes CPU whatever the rate (a
    # full build every `snapshot_full_every`-th time, a refresh of changed rows between).
    full_every = f["snapshot_full_every"]
    refresh_cpu_s = (
        (full_every - 1) * f["snapshot_refresh_cpu_s_per_million_items"]
        + f["snapshot_build_cpu_s_per_million_items"]
    ) / full_every
    refresh_cores = refresh_cpu_s * p.items / 1e6 / f["snapshot_refresh_s"]
    server_cores = f["cores_per_server_pod"]
    usable = server_cores * util - refresh_cores
    snapshot_mb = f["snapshot_mb_per_million_items"] * p.items / 1e6
    # A full build holds a second snapshot until the swap.
    server_mb = f["server_base_rss_mb"] + 2 * snapshot_mb
    # The refresh runs on the process's one event loop: past a core it never catches up.
    serving_sized = refresh_cores < 1.0 and usable > 0.05 * server_cores
    if not serving_sized:
        out.warnings.append(
            f"At {p.items:,} items the item snapshot's refresh alone takes {refresh_cores:.2f} "
            f"cores per server process (every {f['snapshot_refresh_s']:g} s): more than the "
            f"{server_cores * util:.2f} the utilisation target leaves of a "
            f"{server_cores:g}-core pod, or more than the one core of the event loop it runs on: "
            "serving pods are not sized. Raise --snapshot-refresh-s (a staler snapshot) or "
            "--cores-per-server-pod, or make the refresh read only changed rows."
        )
    for role in ("retrieval", "ranking"):
        cpu_ms = f[f"{role}_cpu_ms_per_recommend"]
        per_core = 1000.0 / cpu_ms
        if not serving_sized:
            continue
        needed = math.ceil(p.recommend_rps * cpu_ms / 1000.0 / usable)
        per_zone, pods = _spread(needed, zones)
        add(Row(role, "pods", pods, "pods",
                f"ceil({p.recommend_rps:g}/s × {cpu_ms:g} ms / ({server_cores:g}-core pod × "
                f"{util:g} − {refresh_cores:.2f} refresh)) = {needed}, {per_zone}/zone × "
                f"{zones} zones (one zone may fail); {per_core:.0f} Recommend/s per core"))  # fmt: skip
        add(Row(role, "cores", pods * server_cores, "cores", f"{pods} pods × {server_cores:g}"))
        add(Row(role, "memory per pod", server_mb / 1000, "GB",
                f"{f['server_base_rss_mb']:g} MB + 2 × {snapshot_mb:,.0f} MB snapshot "
                f"({p.items:,} items; two while a build replaces it)"))  # fmt: skip

    # Events: ingest and workers, one process per pod.
    event_cores = f["cores_per_event_pod"]
    for role, key in (("ingest", "ingest_cpu_us_per_event"), ("worker", "worker_cpu_us_per_event")):
        cpu_us = f[key]
        needed = math.ceil(p.events_rps * cpu_us / 1e6 / (event_cores * util))
        per_zone, pods = _spread(needed, zones)
        add(Row(role, "pods", pods, "pods",
                f"ceil({p.events_rps:g}/s × {cpu_us:g} µs / ({event_cores:g}-core pod × {util:g})) "
                f"= {needed}, {per_zone}/zone × {zones} zones; "
                f"{1e6 / cpu_us:,.0f} events/s per core"))  # fmt: skip
        add(Row(role, "cores", pods * event_cores, "cores", f"{pods} pods × {event_cores:g}"))
    workers = out.value("worker", "pods")
    per_partition = 1e6 / f["worker_cpu_us_per_event"] * event_cores * util
    partitions = math.ceil(max(workers, p.events_rps / per_partition) * f["partition_growth"])
    add(Row("bus", "partitions", partitions, "partitions",
            f"max({workers:g} worker pods, {p.events_rps:g}/s ÷ {per_partition:,.0f}/s per "
            f"partition (one owner each)) × {f['partition_growth']:g} growth: the count is "
            "fixed once the bus exists; with [kafka] it is the topic's partition count "
            "([kafka] partitions, events routed by the bus's partition_of)"))  # fmt: skip

    # Redis: memory, then shards from memory and from CPU.
    sessions = p.daily_actives * f["sessions_per_active_per_day"] * f["session_row_days"]
    parts = {
        "user rows": p.users * f["user_row_bytes"],
        "session rows": sessions * f["session_row_bytes"],
        "item rows": p.items * f["item_row_bytes"],
        "bus (backpressure bound)": partitions * f["bus_max_lag"] * f["bus_entry_bytes"],
        "dedupe window": p.events_rps * f["dedupe_window_s"] * f["dedupe_bytes_per_event"],
    }
    how = {
        "user rows": f"{p.users:,} users × {f['user_row_bytes']:g} B (every user)",
        "session rows": f"{sessions:,.0f} sessions × {f['session_row_bytes']:g} B "
        f"({p.daily_actives:,} actives × {f['sessions_per_active_per_day']:g} × "
        f"{f['session_row_days']:g} d)",
        "item rows": f"{p.items:,} items × {f['item_row_bytes']:g} B",
        "bus (backpressure bound)": f"{partitions} partitions × {f['bus_max_lag']:,.0f} "
        f"entries × {f['bus_entry_bytes']:g} B",
        "dedupe window": f"{p.events_rps:g}/s × {f['dedupe_window_s']:g} s × "
        f"{f['dedupe_bytes_per_event']:g} B",
    }
    for name, size in parts.items():
        add(Row("redis", name, size / GB, "GB", how[name]))
    data = sum(parts.values()) * f["redis_fragmentation"]
    add(Row("redis", "data, one copy", data / GB, "GB",
            f"sum above × {f['redis_fragmentation']:g} fragmentation"))  # fmt: skip
    total = data * (1 + f["redis_replicas"])
    add(Row("redis", "memory with replicas", total / GB, "GB",
            f"× (1 + {f['redis_replicas']:g} replica)"))  # fmt: skip
    by_memory = math.ceil(data / (f["redis_shard_max_gb"] * GB))
    event_load = p.events_rps * f["redis_cpu_us_per_event"] / 1e6
    add(Row("redis", "CPU: event path", event_load, "cores",
            f"{p.events_rps:g}/s × {f['redis_cpu_us_per_event']:g} µs"))  # fmt: skip
    read_load = p.recommend_rps * f["redis_reads_per_recommend"] * f["redis_us_per_row_read"] / 1e6
    add(Row("redis", "CPU: Recommend row reads", read_load, "cores",
            f"{p.recommend_rps:g}/s × {f['redis_reads_per_recommend']:g} reads × "
            f"{f['redis_us_per_row_read']:g} µs"))  # fmt: skip
    # Every refresh of every server process SCANs the whole keyspace (MATCH filters after
    # the visit) and reads each item's _ts: O(catalogue + keys), not O(changed).
    refresh_load = 0.0
    if not serving_sized:
        out.warnings.append(
            "The Redis shards in the table count no snapshot refresh, since the server processes "
            "that would run them are not sized."
        )
    else:
        processes = out.value("retrieval", "pods") + out.value("ranking", "pods")
        keys = p.users + sessions + p.items
        per_refresh_us = keys * f["redis_us_per_scanned_key"] + p.items * f["redis_us_per_ts_read"]
        refresh_load = processes * per_refresh_us / 1e6 / f["snapshot_refresh_s"]
        add(Row("redis", "CPU: snapshot refreshes", refresh_load, "cores",
                f"{processes:g} server processes × ({keys:,.0f} keys SCANned × "
                f"{f['redis_us_per_scanned_key']:g} µs + {p.items:,} _ts reads × "
                f"{f['redis_us_per_ts_read']:g} µs) every {f['snapshot_refresh_s']:g} s"))  # fmt: skip
    by_cpu = math.ceil((event_load + read_load + refresh_load) / util)
    shards = max(by_memory, by_cpu, 1)
    add(Row("redis", "primary shards", shards, "shards",
            f"max(memory: {data / GB:,.1f} GB ÷ {f['redis_shard_max_gb']:g} GB = {by_memory}, "
            f"CPU: {event_load + read_load + refresh_load:,.2f} cores ÷ {util:g} = {by_cpu})"))  # fmt: skip
    add(Row("redis", "memory per shard", data / shards / GB, "GB",
            f"{data / GB:,.1f} GB ÷ {shards} (before the hash slots' imbalance)"))  # fmt: skip

    # Spark: the daily features job over its window of the log.
    daily_events = p.events_rps / f["peak_to_mean"] * 86_400
    run_events = daily_events * f["spark_window_days"]
    window_s = f["spark_batch_window_h"] * 3600
    cores = run_events / (f["spark_events_per_core_s"] * window_s)
    executors = math.ceil(cores / f["spark_executor_cores"])
    add(Row("spark", "events per features run", run_events, "events",
            f"{p.events_rps:g}/s ÷ {f['peak_to_mean']:g} peak/mean × 86,400 s × "
            f"{f['spark_window_days']:g} days"))  # fmt: skip
    add(Row("spark", "executors", executors, "executors",
            f"ceil({run_events:,.0f} ÷ ({f['spark_events_per_core_s']:,.0f}/s per core × "
            f"{window_s:,.0f} s) ÷ {f['spark_executor_cores']:g} cores) = {cores:,.1f} cores"))  # fmt: skip

    # Cross-check: the knee, everything (servers, client, Redis) on the same cores.
    knee_per_core = f["recommend_knee_rps"] / f["knee_machine_cores"]
    add(Row("cross-check", "cores at the measured knee", math.ceil(p.recommend_rps / knee_per_core),
            "cores",
            f"{p.recommend_rps:g}/s ÷ ({f['recommend_knee_rps']:g}/s knee at p99 ≤ "
            f"{f['recommend_p99_budget_ms']:g} ms ÷ {f['knee_machine_cores']:g} cores, both "
            "servers, Redis and the client sharing them)"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------- output


def _number(value: float, unit: str) -> str:
    if unit == "GB":
        return f"{value:,.1f}" if value >= 1 else f"{value:,.3f}"
    if unit == "events":
        return f"{value:,.3g}"
    if unit == "cores" and value != round(value):
        return f"{value:,.1f}" if value >= 1 else f"{value:,.2f}"
    return f"{value:,.0f}"


def markdown(result: Plan, inputs: Mapping[str, Figure]) -> str:
    """The capacity table, its warnings and every input with its source."""
    p = result.population
    lines = [
        f"Population: {p.users:,} users, {p.daily_actives:,} daily actives, "
        f"{p.recommend_rps:,g} Recommend/s at peak, {p.events_rps:,g} events/s at peak, "
        f"{p.items:,} items.",
        "",
        "| component | quantity | value | unit | how |",
        "| --- | --- | ---: | --- | --- |",
    ]
    lines += [
        f"| {r.component} | {r.quantity} | {_number(r.value, r.unit)} | {r.unit} | {r.how} |"
        for r in result.rows
    ]
    if result.warnings:
        lines += ["", *(f"**Warning:** {w}" for w in result.warnings)]
    for kind, title in (("measured", "Measured inputs"), ("assumption", "Assumptions")):
        lines += [
            "",
            f"{title}:",
            "",
            "| input | value | unit | source |",
            "| --- | ---: | --- | --- |",
        ]
        lines += [
            f"| {fig.name} | {fig.value:,.4g} | {fig.unit} | {fig.source.replace('|', '/')} |"
            for fig in inputs.values()
            if fig.kind == kind
        ]
    return "\n".join(lines)


def write_capacity_report(result: Plan, inputs: Mapping[str, Figure], out: Path) -> dict[str, Path]:
    """`capacity.json` and `capacity.md` under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "capacity.json", "markdown": out / "capacity.md"}
    document = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "population": asdict(result.population),
        "rows": [asdict(r) for r in result.rows],
        "warnings": result.warnings,
        "inputs": {name: asdict(fig) for name, fig in inputs.items()},
    }
    paths["json"].write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text("# inkling capacity model\n\n" + markdown(result, inputs) + "\n")
    return paths


OVERRIDES = {
    "utilisation": "utilisation",
    "zones": "zones",
    "cores_per_server_pod": "cores_per_server_pod",
    "cores_per_event_pod": "cores_per_event_pod",
    "redis_replicas": "redis_replicas",
    "snapshot_refresh_s": "snapshot_refresh_s",
}
"""Flags of `inkling bench capacity` (argparse dest) that replace an input, as assumptions."""


def run_capacity(
    population: Population,
    *,
    inputs_path: Path = INPUTS_PATH,
    reports: Path | None = None,
    overrides: Mapping[str, float | None] | None = None,
    out: Path | None = None,
) -> tuple[Plan, dict[str, Figure]]:
    """Load the inputs (the file, then reports, then flags), plan, print the Markdown and,
    with `out`, write the report."""
    inputs = load_inputs(inputs_path)
    if reports is not None:
        inputs.update(read_reports(reports))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not _acceptable(name, value):
            raise InvalidInputError(f"{flag} must be a {_wanted(name)}, got {value!r}", name)
        inputs[name] = Figure(name, float(value), INPUTS[name][0], "assumption", f"set by {flag}")
    result = plan(population, inputs)
    print(markdown(result, inputs))
    if out is not None:
        paths = write_capacity_report(result, inputs, out)
        print(f"\nreport: {paths['json']} and {paths['markdown']}")
    return result, inputs


# ---------------------------------------------------------------------------- measurement


def _event(index: int, now_s: float) -> Any:
    """A click as a client would send it: UUID event id, realistic id lengths."""
    import uuid

    from inkling.v1 import resources_pb2

    e = resources_pb2.Event(
        event_id=str(uuid.uuid4()),
        user_id=f"u{index % 50_000:09d}",
        session_id=str(uuid.UUID(int=index % 200_000 + 1)),
        item_id=f"i{(index * 7919) % 1_000_000:08d}",
        event_type=resources_pb2.EVENT_TYPE_CLICK,
        dwell_ms=1200,
        device="mobile",
        surface="home",
        position=index % 20,
    )
    e.timestamp.FromNanoseconds(int((now_s - 5) * 1e9))
    return e


async def _append(address: str, events: int, batch: int, partitions: int) -> None:
    import time

    from events_server.core import IngestCore, IngestLimits
    from inkling.events.bus import EventBus, async_client
    from inkling.v1 import event_service_pb2

    client = async_client(address)
    try:
        bus = EventBus(client, partitions)
        core = IngestCore(bus, IngestLimits(max_lag=10**9))
        now = time.time()
        for start in range(0, events, batch):
            request = event_service_pb2.TrackEventsRequest(
                events=[_event(i, now) for i in range(start, min(start + batch, events))]
            )
            result = await core.track(request)
            if result.accepted != len(request.events):
                raise RuntimeError(f"ingest accepted {result.accepted} of {len(request.events)}")
    finally:
        await client.aclose()


async def _scan_all(address: str, rounds: int) -> int:
    """SCAN for the item keys as a snapshot refresh does, `rounds` times; keys visited
    (SCAN's MATCH filters after visiting: every key of the database is visited)."""
    from inkling.events.bus import async_client
    from inkling.feature_store.snapshot import _scan_entity_keys

    client = async_client(address)
    visited = 0
    try:
        for _ in range(rounds):
            async for _n, _found in _scan_entity_keys(client, "inkling", "item_id", 2_000):
                pass
            visited += int(await client.dbsize())
    finally:
        await client.aclose()
    return visited


def measure_redis_reads(address: str, pid: int, users: int, items: int) -> dict[str, float]:
    """Redis CPU (`/proc`) per key a refresh's SCAN visits, per `_ts` HMGET in chunks of 500
    (the refresh), and per row HMGET two to a round trip (a server's `read_many` of a
    user and a session row), over `users` + `items` Feast-layout hashes."""
    import asyncio

    from bench.harness.processes import cpu_seconds
    from inkling.events.bus import sync_client
    from inkling.feature_store.feast_codec import entity_keys

    client = sync_client(address)
    try:
        user_keys = entity_keys("user_id", [f"u{i:09d}" for i in range(users)], "inkling")
        item_keys = entity_keys("item_id", [f"i{i:08d}" for i in range(items)], "inkling")
        row = {f"user_features:f{k}".encode(): b"x" * 24 for k in range(10)}
        fields = {**row, b"_ts:item_features": b"\x08\x01\x10\x02"}
        for start in range(0, users + items, 1_000):
            pipe = client.pipeline(transaction=False)
            for key in (user_keys + item_keys)[start : start + 1_000]:
                pipe.execute_command("HSET", key, *(x for kv in fields.items() for x in kv))
            pipe.execute()

        def spent(work: Any) -> tuple[float, int]:
            before = cpu_seconds(pid)
            n = work()
            return cpu_seconds(pid) - before, n

        def scan() -> int:
            return asyncio.run(_scan_all(address, 10))

        def ts_reads() -> int:
            for _ in range(5):
                for start in range(0, items, 500):
                    pipe = client.pipeline(transaction=False)
                    for key in item_keys[start : start + 500]:
                        pipe.execute_command("HMGET", key, b"_ts:item_features")
                    pipe.execute()
            return 5 * items

        def row_reads() -> int:
            names = list(row)
            n = min(users, 20_000)
            for i in range(0, n, 2):
                pipe = client.pipeline(transaction=False)
                pipe.execute_command("HMGET", user_keys[i], *names)
                pipe.execute_command("HMGET", user_keys[i + 1], *names)
                pipe.execute()
            return n - n % 2

        scan_s, visited = spent(scan)
        ts_s, ts_n = spent(ts_reads)
        row_s, row_n = spent(row_reads)
    finally:
        client.close()
    return {
        "keys": users + items,
        "redis_us_per_scanned_key": round(scan_s / visited * 1e6, 3),
        "scanned_keys": visited,
        "redis_us_per_ts_read": round(ts_s / ts_n * 1e6, 3),
        "ts_reads": ts_n,
        "redis_us_per_row_read": round(row_s / row_n * 1e6, 3),
        "row_reads": row_n,
    }


def measure_bus(out: Path, events: int = 20_000, batch: int = 100, partitions: int = 4) -> Path:
    """Append `events` through the ingest core (`IngestCore` over `EventBus`) into a private
    redis-server, then `MEMORY USAGE` of every stream and dedupe set per event; then in
    the same server `measure_redis_reads`; writes `capacity_measure.json` under `out`."""
    import asyncio
    import tempfile
    from typing import cast

    from bench.harness.report import machine_info
    from inkling.events.bus import SEEN_PREFIX, stream_key, sync_client
    from inkling.redis_embedded import EmbeddedRedis

    if events < 1 or batch < 1 or partitions < 1:
        raise InvalidInputError("--events, --batch and --partitions must be at least 1")
    with (
        tempfile.TemporaryDirectory(prefix="inkling-capacity-") as root,
        EmbeddedRedis(Path(root), persistent=False) as server,
    ):
        client = sync_client(server.address)
        try:
            before = int(cast(dict[str, Any], client.info("memory"))["used_memory"])
            asyncio.run(_append(server.address, events, batch, partitions))
            used = int(cast(dict[str, Any], client.info("memory"))["used_memory"]) - before

            def usage(keys: Sequence[str]) -> int:
                sizes = [client.execute_command("MEMORY", "USAGE", k, "SAMPLES", "0") for k in keys]
                return sum(int(s) for s in sizes if s is not None)

            entries = sum(int(cast(int, client.xlen(stream_key(p)))) for p in range(partitions))
            streams = usage([stream_key(p) for p in range(partitions)])
            dedupe_keys = [
                k.decode() if isinstance(k, bytes) else str(k)
                for k in cast(list[Any], client.keys(SEEN_PREFIX + ":*"))
            ]
            dedupe = usage(dedupe_keys)
        finally:
            client.close()
        reads = measure_redis_reads(server.address, server.pid, users=150_000, items=50_000)
    if entries != events:
        raise RuntimeError(f"the bus holds {entries} entries, {events} were appended")
    document = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "events": events,
        "batch": batch,
        "partitions": partitions,
        "bus_entry_bytes": round(streams / entries, 1),
        "dedupe_bytes_per_event": round(dedupe / events, 1),
        "dedupe_sets": len(dedupe_keys),
        "used_memory_bytes_per_event": round(used / events, 1),
        "reads": reads,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "capacity_measure.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.capacity measure`: the bus figures the model reads."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser(
        "measure", help="bus bytes per entry, dedupe bytes per event, Redis CPU per read"
    )
    p.add_argument("--events", type=int, default=20_000, help="events appended (default 20000)")
    p.add_argument("--batch", type=int, default=100, help="events per TrackEvents (default 100)")
    p.add_argument("--partitions", type=int, default=4, help="bus partitions (default 4)")
    p.add_argument("--out", default="data/bench/capacity", help="report directory")
    args = parser.parse_args(argv)
    measure_bus(Path(args.out), args.events, args.batch, args.partitions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
