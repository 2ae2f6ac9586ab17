"""Benchmark reports: the machine a run was on, and its results as JSON, Markdown and a plot.

Every benchmark of `bench/` writes through `write_report` (or states the machine with
`machine_info` in a report of its own), so each figure carries its machine, load and
percentiles.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

if TYPE_CHECKING:
    from bench.harness.loadgen import LoadResult


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name (from /proc/cpuinfo), or None where it cannot be read."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.lower().startswith("model name")
        ),
        platform.processor() or None,
    )


def machine_info() -> dict[str, Any]:
    """Describe the host a benchmark ran on; call it before the load starts."""
    model = cpu_model()
    mem_total: int | None = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cpu_max = _read("/sys/fs/cgroup/cpu.max")
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cgroup_cpu_max": cpu_max.strip() if cpu_max else None,
        "cpu_model": model,
        "memory_total_bytes": mem_total,
        "memory_total_gib": round(mem_total / 2**30, 1) if mem_total else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "load_average_at_start": load,
    }


def _ms(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _errors_cell(result: LoadResult) -> str:
    if not result.errors:
        return "0"
    detail = ", ".join(f"{k}: {v}" for k, v in result.errors.items())
    return f"{result.error_count} ({detail})"


def markdown_table(results: Iterable[LoadResult]) -> str:
    """The report's results table, one row per scenario."""
    lines = [
        "| scenario | target /s | achieved /s | n | errors | p50 ms | p95 ms | p99 ms | max ms | sustained? |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in results:
        lines.append(
            f"| {_md_cell(r.name)} | {r.target_rate:g} | {r.throughput:.1f} | {r.count} "
            f"| {_md_cell(_errors_cell(r))} | {_ms(r.p50_ms)} | {_ms(r.p95_ms)} "
            f"| {_ms(r.p99_ms)} | {_ms(r.max_ms)} | {'yes' if r.sustained else 'no'} |"
        )
    return "\n".join(lines)


def _plot(results: Sequence[LoadResult], path: Path, title: str) -> None:
    """ECDFs of all scenarios on top, then one histogram per scenario with percentile lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(results)
    fig, axes = plt.subplots(
        n + 1, 1, figsize=(9, 3.2 + 2.4 * n), squeeze=False, constrained_layout=True
    )
    finite = [r.latencies_ms[r.latencies_ms > 0] for r in results]
    nonempty = [a for a in finite if a.size]
    lo = max(min(float(a.min()) for a in nonempty), 1e-3) / 1.25 if nonempty else 0.1
    hi = max(max(float(a.max()) for a in nonempty) * 1.25, lo * 10) if nonempty else 10.0
    bins = np.geomspace(lo, hi, 60)
    markers = (
        ("p50", "p50_ms", "tab:green"),
        ("p95", "p95_ms", "tab:orange"),
        ("p99", "p99_ms", "tab:red"),
        ("max", "max_ms", "black"),
    )

    overview = axes[0][0]
    for r, lat in zip(results, finite, strict=True):
        if lat.size:
            xs = np.sort(lat)
            ys = np.arange(1, xs.size + 1) / xs.size
            overview.step(xs, ys, where="post", label=r.name)
    overview.set_xscale("log")
    overview.set_xlim(lo, hi)
    overview.set_ylim(0, 1.02)
    overview.set_xlabel("latency from scheduled send (ms, log scale)")
    overview.set_ylabel("fraction of requests ≤ x")
    overview.set_title(title)
    overview.grid(True, which="both", alpha=0.3)
    if nonempty:
        overview.legend(loc="lower right", fontsize="small")

    for ax, r, lat in zip((row[0] for row in axes[1:]), results, finite, strict=True):
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylabel("requests")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        errors = f", {r.error_count} errors" if r.errors else ""
        ax.set_title(
            f"{r.name}: target {r.target_rate:g}/s, achieved {r.throughput:.1f}/s, "
            f"n={r.count}{errors}",
            fontsize="medium",
        )
        if not lat.size:
            ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
            continue
        ax.hist(lat, bins=bins, color="tab:blue", alpha=0.7)
        for label, attr, color in markers:
            value = getattr(r, attr)
            if math.isfinite(value):
                ax.axvline(
                    value,
                    color=color,
                    linestyle="--",
                    linewidth=1.2,
                    label=f"{label} {_ms(value)} ms",
                )
        ax.legend(loc="upper left", fontsize="small", framealpha=0.8)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1][0].set_xlabel("latency from scheduled send (ms, log scale)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: list[LoadResult],
    out_dir: Path,
    *,
    title: str,
    config: dict[str, Any],
    machine: dict[str, Any],
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``latency.png`` into ``out_dir``;
    `extra`'s keys join the JSON document as they are.

    Returns:
        The written paths under the keys ``"json"``, ``"markdown"`` and ``"plot"``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat()
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "plot": out_dir / "latency.png",
    }
    document = {
        "title": title,
        "created_at": created,
        "config": config,
        "machine": machine,
        "notes": list(notes),
        "scenarios": [r.to_dict() for r in results],
        **(extra or {}),
    }
    paths["json"].write_text(json.dumps(document, indent=2, default=str, allow_nan=False) + "\n")

    cores = f"{machine.get('cpu_affinity') or machine.get('cpu_count')} cores"
    md = [
        f"# {title}",
        "",
        f"Generated {created}. Open-loop load; latency is measured from each request's "
        "scheduled send time over successful requests; `achieved` counts OK responses per "
        "second over the measured window.",
        "",
        markdown_table(results),
        "",
        f"Machine: {machine.get('cpu_model') or 'unknown CPU'}, {cores}, "
        f"{machine.get('memory_total_gib')} GiB, Python {machine.get('python')}, "
        f"load average at start {machine.get('load_average_at_start')}.",
        "",
        "Config: " + ", ".join(f"`{k}={v}`" for k, v in config.items()),
    ]
    if notes:
        md += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    md += ["", "![latency](latency.png)", ""]
    paths["markdown"].write_text("\n".join(md))
    _plot(results, paths["plot"], title)
    return paths


def sides_table(
    first: str,
    sides: Sequence[str],
    runs: Sequence[Any],
    extra: str,
    value: Callable[[Any], float],
    digits: int = 2,
) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """The table of a comparison that sends the same requests to each side in turn:
    per side (`first` heads its column), the rounds, the medians over rounds of p50 and
    p99, the p99 range, the median of `value` (a run's figure, column `extra`) and the
    errors. `runs` carry `.side` and `.load` (a `LoadResult`). Returns the lines, and
    per side the p99 and `value` medians."""
    lines = [
        f"| {first} | rounds | p50 ms | p99 ms | p99 range | {extra} | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    p99s: dict[str, float] = {}
    values: dict[str, float] = {}
    for side in sides:
        own = [r for r in runs if r.side == side]
        p99 = [r.load.p99_ms for r in own]
        p99s[side] = statistics.median(p99)
        values[side] = statistics.median(value(r) for r in own)
        lines.append(
            f"| {side} | {len(own)} | {statistics.median(r.load.p50_ms for r in own):.2f} "
            f"| {p99s[side]:.2f} | {min(p99):.2f}-{max(p99):.2f} "
            f"| {values[side]:.{digits}f} | {sum(r.load.error_count for r in own)} |"
        )
    return lines, p99s, values
